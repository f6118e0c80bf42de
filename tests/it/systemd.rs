//! The relay under systemd: the shipped units pass `systemd-analyze verify` and rate 1.5 or
//! lower in `systemd-analyze security`; the binary tells a `NOTIFY_SOCKET` READY=1, STATUS=
//! and WATCHDOG=1 (and stops the pings when its flush path is wedged), survives SIGHUP, and
//! serves on listeners passed as systemd passes them (`LISTEN_FDS`).

use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_edgerelay");
const UNITS: [&str; 4] =
    ["edgerelay.service", "edgerelay.socket", "edgerelay-quic.socket", "edgerelay-admin.socket"];

/// `systemd-analyze`, or `None` (with a note) where systemd is not installed.
fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze").arg("--version").output().is_ok();
    if !found {
        eprintln!("systemd-analyze not installed: skipping the unit checks");
    }
    found.then_some("systemd-analyze")
}

/// Copies of the shipped units in `dir`, with `/usr/bin/edgerelay` pointing at the test build
/// (verify checks that the executables exist).
fn units_in(dir: &Path) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    UNITS
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(src.join(name)).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, text.replace("/usr/bin/edgerelay", BIN)).unwrap();
            path
        })
        .collect()
}

#[test]
fn the_units_verify_clean_and_rate_at_most_1_5_in_systemd_analyze_security() {
    let Some(analyze) = systemd_analyze() else { return };
    let dir = tempfile::tempdir().unwrap();
    let units = units_in(dir.path());
    let out = Command::new(analyze).arg("verify").args(&units).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify failed: {err}");
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("edgerelay")).collect();
    assert!(ours.is_empty(), "verify complains about our units: {ours:#?}");

    let out = Command::new(analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&units[0])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for edgerelay.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!("no overall exposure level in: {text}{}", String::from_utf8_lossy(&out.stderr))
        });
    eprintln!("systemd-analyze security: edgerelay.service exposure {score}");
    assert!(score <= 1.5, "exposure {score} > 1.5:\n{text}");
}

/// A datagram socket standing in for systemd's `NOTIFY_SOCKET`: every line received, with
/// when it arrived.
struct NotifySocket {
    /// What to put in `NOTIFY_SOCKET`.
    name: String,
    lines: mpsc::Receiver<(Instant, String)>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    /// On a filesystem path, or on an abstract name (`@…`).
    fn new(abstract_name: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (socket, name) = if abstract_name {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("edgerelay-it-{}-{}", std::process::id(), free_port());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
            (UnixDatagram::bind_addr(&addr).unwrap(), format!("@{name}"))
        } else {
            let path = dir.path().join("notify");
            (UnixDatagram::bind(&path).unwrap(), path.display().to_string())
        };
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                // A timeout counts as an empty datagram: a chance to see the test is over.
                let n: usize = socket.recv(&mut buf).unwrap_or_default();
                let now = Instant::now();
                for line in String::from_utf8_lossy(&buf[..n]).lines() {
                    if tx.send((now, line.to_owned())).is_err() {
                        return;
                    }
                }
                if n == 0 && tx.send((now, String::new())).is_err() {
                    return; // the test is over
                }
            }
        });
        Self { name, lines, _dir: dir }
    }

    /// Every line received within `d` from now.
    fn collect(&self, d: Duration) -> Vec<String> {
        let end = Instant::now() + d;
        let mut got = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok((_, l)) if !l.is_empty() => got.push(l),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        got
    }

    /// Waits (up to `within`) for a line starting with `prefix`; returns it.
    fn wait_for(&self, prefix: &str, within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            let left = end.checked_duration_since(Instant::now()).unwrap_or_default();
            match self.lines.recv_timeout(left) {
                Ok((_, l)) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(_) => panic!("no {prefix} within {within:?}"),
            }
        }
    }
}

fn count(lines: &[String], exact: &str) -> usize {
    lines.iter().filter(|l| *l == exact).count()
}

/// The relay with `NOTIFY_SOCKET` and a 500 ms watchdog (and the wedge hook, if asked).
fn spawn_notifying(relay: &BinaryRelay, notify: &NotifySocket, wedge: bool) -> Child {
    let mut cmd = relay.command();
    cmd.env("NOTIFY_SOCKET", &notify.name)
        .env("WATCHDOG_USEC", "500000")
        .env_remove("WATCHDOG_PID")
        .stderr(Stdio::inherit());
    if wedge {
        cmd.env("EDGERELAY_FAULT_WEDGE_FLUSH", "1");
    }
    cmd.spawn().unwrap()
}

async fn readyz(admin: u16) -> u16 {
    let url = format!("http://127.0.0.1:{admin}/readyz");
    reqwest::get(&url).await.map(|r| r.status().as_u16()).unwrap_or(0)
}

async fn publish_one(setup: &Setup, relay: &BinaryRelay, body: &str) {
    let resp = client(&setup.certs, true)
        .post(relay.url("/v1/publish/edge.systemd"))
        .bearer_auth(TOKEN)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_socket_gets_ready_status_watchdog_and_stopping() {
    let nats = NatsServer::start();
    let setup = Setup::new(&nats.url());
    let relay = BinaryRelay::new(&setup, setup.binary_config(|c| c.id("sdnotify")));
    let notify = NotifySocket::new(false);
    let mut child = spawn_notifying(&relay, &notify, false);

    notify.wait_for("READY=1", Duration::from_secs(15));
    assert_eq!(readyz(relay.admin).await, 200, "READY=1 before /readyz answered 200");
    let status = notify.wait_for("STATUS=", Duration::from_secs(5));
    assert!(
        status.starts_with("STATUS=ready; cluster ") && status.contains("; queue 0"),
        "{status}"
    );

    // Pings every 250 ms while healthy, before and after events flow.
    let lines = notify.collect(Duration::from_millis(1500));
    assert!(count(&lines, "WATCHDOG=1") >= 4, "{lines:?}");
    publish_one(&setup, &relay, "one").await;
    publish_one(&setup, &relay, "two").await;
    let lines = notify.collect(Duration::from_millis(1500));
    assert!(count(&lines, "WATCHDOG=1") >= 4, "pings stopped on a healthy relay: {lines:?}");

    // `systemctl reload` sends SIGHUP: logged and ignored until live reload lands, never fatal.
    Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP killed the relay");
    assert_eq!(readyz(relay.admin).await, 200);

    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    notify.wait_for("STOPPING=1", Duration::from_secs(5));
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_stop_when_the_flush_path_is_wedged() {
    let nats = NatsServer::start();
    let setup = Setup::new(&nats.url());
    let relay = BinaryRelay::new(&setup, setup.binary_config(|c| c.id("sdwedge")));
    let notify = NotifySocket::new(true); // and an abstract socket, as systemd often uses
    let mut child = spawn_notifying(&relay, &notify, true);

    notify.wait_for("READY=1", Duration::from_secs(15));
    let lines = notify.collect(Duration::from_millis(1000));
    assert!(count(&lines, "WATCHDOG=1") >= 2, "no pings before the wedge: {lines:?}");

    // The first batch goes out (and is answered); then its driver blocks for good.
    publish_one(&setup, &relay, "wedge").await;
    // Stale after 500 ms, looked at every 250 ms: no ping later than ~750 ms from now.
    let _ = notify.collect(Duration::from_millis(1000));
    let lines = notify.collect(Duration::from_millis(2000));
    assert_eq!(count(&lines, "WATCHDOG=1"), 0, "pings went on with a wedged flush path: {lines:?}");
    assert!(!lines.iter().any(|l| l.starts_with("STOPPING")), "{lines:?}");
    assert_eq!(readyz(relay.admin).await, 200, "the wedge is not a readiness matter");
    assert!(child.try_wait().unwrap().is_none(), "the relay exited");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_https_admin_and_quic_sockets_passed_as_listen_fds() {
    let nats = NatsServer::start();
    let setup = Setup::new(&nats.url());
    let mut relay = BinaryRelay::new(&setup, setup.binary_config(|c| c.id("sdsockets").quic()));
    // What systemd would bind from the socket units: the config's ports stay unused.
    let https = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let quic = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let log = setup.dir.path().join("relay.log");

    let inner = relay.command();
    let mut cmd = Command::new("/bin/sh");
    // LISTEN_PID must be the relay's pid: the shell's, which `exec` keeps.
    cmd.arg("-c")
        .arg(
            "LISTEN_PID=$$ LISTEN_FDS=3 LISTEN_FDNAMES=https:admin:quic; \
              export LISTEN_PID LISTEN_FDS LISTEN_FDNAMES; exec \"$0\" \"$@\"",
        )
        .arg(inner.get_program())
        .args(inner.get_args())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let fds = [https.as_fd().as_raw_fd(), admin.as_fd().as_raw_fd(), quic.as_fd().as_raw_fd()];
    // SAFETY: between fork and exec only async-signal-safe system calls (fcntl, dup2) on fds
    // this process owns; the OwnedFds standing for fds 3.. are forgotten, never closed.
    unsafe {
        cmd.pre_exec(move || {
            let moved = fds
                .iter()
                .map(|&fd| {
                    let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                    rustix::io::fcntl_dupfd_cloexec(fd, 10)
                })
                .collect::<Result<Vec<_>, _>>()?;
            for (i, fd) in moved.iter().enumerate() {
                let mut target = OwnedFd::from_raw_fd(3 + i as i32);
                let r = rustix::io::dup2(fd, &mut target);
                std::mem::forget(target);
                r?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    relay.port = https.local_addr().unwrap().port();
    relay.admin = admin.local_addr().unwrap().port();
    relay.wait_ready().await;
    publish_one(&setup, &relay, "inherited").await;
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
    let log = std::fs::read_to_string(&log).unwrap();
    let quic_addr = quic.local_addr().unwrap();
    assert!(log.contains(&format!("quic_addr=Some({quic_addr})")), "QUIC not on fd 5:\n{log}");
    for name in ["https", "admin", "quic"] {
        let inherited = log.lines().any(|l| {
            l.contains("listener inherited from systemd") && l.contains(&format!("name=\"{name}\""))
        });
        assert!(inherited, "{name} not taken from LISTEN_FDS:\n{log}");
    }
}
