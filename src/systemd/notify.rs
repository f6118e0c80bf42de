//! `sd_notify(3)` over the `NOTIFY_SOCKET` datagram socket (a path, or an abstract name
//! written `@name`), and the task that tells systemd about readiness, health and liveness.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admin::Health;
use crate::batch::driver::Heartbeats;
use crate::spool::Spool;

/// How often readiness is looked at until the relay is ready.
const READY_POLL: Duration = Duration::from_millis(100);
/// How often the `STATUS=` line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// A connection to systemd's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

/// What the notification task watches.
pub struct Watch {
    pub health: Arc<Health>,
    pub heartbeats: Arc<Heartbeats>,
    pub spool: Option<Arc<Spool>>,
    /// `WATCHDOG_USEC`: ping every half of it while no driver is older than all of it.
    pub watchdog: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`; `None` when it is unset or unusable (that is logged).
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        match Self::connect(&path) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(socket = ?path, error = %e, "NOTIFY_SOCKET unusable: not notifying systemd");
                None
            }
        }
    }

    /// A notifier for `path`: a filesystem path, or `@name` for an abstract socket.
    pub fn connect(path: &std::ffi::OsStr) -> std::io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_bytes();
        let addr = match bytes.first() {
            Some(b'@') => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(&bytes[1..])?
            }
            Some(b'/') => SocketAddr::from_pathname(path)?,
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "neither an absolute path nor an @abstract name",
                ))
            }
        };
        let socket = UnixDatagram::unbound()?;
        // A full systemd queue drops the message rather than stalling the runtime.
        socket.set_nonblocking(true)?;
        Ok(Self { socket, addr })
    }

    /// Sends one notification (`KEY=value` lines); failures are logged, never fatal.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            tracing::debug!(error = %e, state, "sd_notify failed");
        }
    }
}

/// `WATCHDOG_USEC`, when set, non-zero, and meant for this process (`WATCHDOG_PID` unset or
/// ours).
pub fn watchdog_from_env() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// The heartbeat tick for the batch drivers: a quarter of the watchdog interval, between
/// 50 ms and 1 s.
pub fn heartbeat_tick(watchdog: Option<Duration>) -> Duration {
    watchdog
        .map(|w| w / 4)
        .unwrap_or(Duration::from_secs(1))
        .clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Sends `READY=1` once the relay is ready, a `STATUS=` line every [`STATUS_EVERY`], and
/// `WATCHDOG=1` every half watchdog interval while every batch driver is making progress.
/// Runs until aborted (the relay aborts it after its drain, so pings go on while it drains).
pub async fn run(notifier: Arc<Notifier>, watch: Watch) {
    let mut ready = false;
    let mut withholding = false;
    let mut poll = tokio::time::interval(READY_POLL);
    let mut status = tokio::time::interval(STATUS_EVERY);
    let mut ping =
        tokio::time::interval(watch.watchdog.map_or(Duration::from_secs(3600), |w| w / 2));
    for i in [&mut poll, &mut status, &mut ping] {
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = poll.tick(), if !ready => {
                if watch.health.not_ready().is_none() {
                    ready = true;
                    notifier.send(&format!("READY=1\nSTATUS={}", status_line(&watch)));
                    tracing::info!("told systemd: ready");
                }
            }
            _ = status.tick() => notifier.send(&format!("STATUS={}", status_line(&watch))),
            _ = ping.tick(), if watch.watchdog.is_some() => {
                let limit = watch.watchdog.unwrap_or_default();
                let oldest = watch.heartbeats.oldest(Instant::now());
                if oldest < limit {
                    notifier.send("WATCHDOG=1");
                    if withholding {
                        tracing::info!("batch drivers making progress again: watchdog pings resume");
                        withholding = false;
                    }
                } else if !withholding {
                    tracing::error!(stalled_ms = oldest.as_millis() as u64,
                        watchdog_ms = limit.as_millis() as u64,
                        "a batch driver has made no progress for longer than the watchdog interval: withholding watchdog pings");
                    withholding = true;
                }
            }
        }
    }
}

/// One line for `systemctl status`: readiness, active cluster, queue, batches in flight, spool.
fn status_line(watch: &Watch) -> String {
    let health = &watch.health;
    let mut line = match health.not_ready() {
        None => "ready".to_owned(),
        Some(why) => format!("not ready: {why}"),
    };
    let clusters = health.sink.cluster_status();
    match clusters.iter().find(|c| c.active) {
        Some(c) => {
            line.push_str(&format!("; cluster {}", c.name));
            if let Some(rtt) = c.rtt_ms {
                line.push_str(&format!(" (rtt {rtt:.1} ms)"));
            }
        }
        None => line.push_str("; no cluster"),
    }
    line.push_str(&format!(
        "; queue {}; in flight {} batches",
        health.queues.depth(),
        health.sink.in_flight()
    ));
    if let Some(spool) = watch.spool.as_ref().filter(|s| !s.is_empty()) {
        line.push_str(&format!("; spool {} batches ({} bytes)", spool.len(), spool.bytes()));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifies_path_and_abstract_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        Notifier::connect(path.as_os_str()).unwrap().send("READY=1");
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("edgerelay-notify-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        Notifier::connect(format!("@{name}").as_ref()).unwrap().send("WATCHDOG=1");
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");

        assert!(Notifier::connect("relative".as_ref()).is_err());
    }

    #[test]
    fn the_heartbeat_tick_is_a_quarter_of_the_watchdog_within_bounds() {
        assert_eq!(heartbeat_tick(None), Duration::from_secs(1));
        assert_eq!(heartbeat_tick(Some(Duration::from_millis(500))), Duration::from_millis(125));
        assert_eq!(heartbeat_tick(Some(Duration::from_secs(30))), Duration::from_secs(1));
        assert_eq!(heartbeat_tick(Some(Duration::from_millis(100))), Duration::from_millis(50));
    }
}
