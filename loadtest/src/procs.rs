//! Process control shared by the scenarios that run their own nats-servers and relays
//! (`global`, `chaos`): child processes killed on drop, readiness polling, signals, the
//! relay's admin listener, and a process's memory from `/proc`. Free loopback ports and
//! nats-server come from the shared test kit (`edgerelay-testkit`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};

/// Longest a relay or nats-server may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often readiness is polled.
pub const READY_POLL: Duration = Duration::from_millis(50);

/// Longest one admin request (`/readyz`, `/metrics`, `/debug/latency`) may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest admin answer read.
const MAX_ADMIN_BYTES: usize = 8 << 20;

/// How long a killed child may take to be reaped.
pub const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// Child processes, killed when dropped (however the scenario ends) or by [`Children::stop`].
#[derive(Debug, Default)]
pub struct Children(Vec<(String, Child)>);

/// A process's memory as `/proc/PID/status` shows it, KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size now (`VmRSS`).
    pub rss_kib: u64,
    /// Peak resident set size (`VmHWM`).
    pub hwm_kib: u64,
}

impl Children {
    /// Starts `command` (killed on drop), its stderr to `log`.
    pub fn spawn(&mut self, name: &str, command: &mut Command, log: &Path) -> anyhow::Result<()> {
        let child = spawn_logged(name, command, log)?;
        self.0.push((name.to_owned(), child));
        Ok(())
    }

    /// The process id of the child started as `name`, while it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.0.iter().find(|(n, _)| n == name).and_then(|(_, child)| child.id())
    }

    /// Fails if a child has exited, naming it and pointing at its log.
    pub fn check_alive(&mut self, logs: &Path) -> anyhow::Result<()> {
        for (name, child) in &mut self.0 {
            if let Some(status) = child.try_wait().context("checking a child process")? {
                bail!("{name} exited ({status}); see {}", logs.display());
            }
        }
        Ok(())
    }

    /// Kills every child and waits for each (bounded).
    pub async fn stop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.start_kill();
        }
        for (name, child) in &mut self.0 {
            if timeout(REAP_TIMEOUT, child.wait()).await.is_err() {
                eprintln!("{name} did not exit within {REAP_TIMEOUT:?} of SIGKILL");
            }
        }
        self.0.clear();
    }
}

impl Memory {
    /// Parses the `VmRSS` and `VmHWM` lines of a `/proc/PID/status` text.
    pub fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()
        };
        Some(Memory { rss_kib: field("VmRSS:")?, hwm_kib: field("VmHWM:")? })
    }

    /// The memory of process `pid`, if it is alive (a zombie has no `VmRSS`).
    pub fn of(pid: u32) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
    }
}

/// Starts `command` with stdin and stdout closed and stderr appended to `log`, killed when the
/// returned child is dropped.
pub fn spawn_logged(name: &str, command: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

/// Sends `signal` (`TERM`, `KILL`, `STOP`, `CONT`) to `pid` with kill(1) (this crate has no
/// unsafe code and no libc binding).
pub fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    ensure!(status.success(), "kill -{signal} {pid} failed ({status})");
    Ok(())
}

/// Polls `ready` until it holds, a child exits, `stop` turns true or [`READY_TIMEOUT`] passes.
pub async fn wait_ready<F, Fut>(
    children: &mut Children,
    logs: &Path,
    stop: &watch::Receiver<bool>,
    what: &str,
    ready: F,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if ready().await {
            return Ok(());
        }
        children.check_alive(logs)?;
        ensure!(!*stop.borrow(), "interrupted while waiting for {what}");
        ensure!(
            Instant::now() < deadline,
            "{what} not ready after {READY_TIMEOUT:?}; see {}",
            logs.display()
        );
        sleep(READY_POLL).await;
    }
}

/// The nats-server to run: `--nats-server-bin` (or `$NATS_SERVER_BIN`), else `nats-server` on
/// the PATH.
pub fn nats_server_bin(given: Option<&Path>) -> PathBuf {
    given.map_or_else(|| "nats-server".into(), Path::to_path_buf)
}

/// The relay to run: `--relay-bin`, else `edgerelay` next to this loadtest binary.
pub fn relay_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(bin) => Ok(bin.to_path_buf()),
        None => Ok(std::env::current_exe()
            .context("locating the loadtest binary")?
            .with_file_name("edgerelay")),
    }
}

/// `GET path` on a relay's admin listener: status and body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Bytes)> {
    let request = async {
        let tcp = TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_ADMIN_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
            .to_bytes();
        anyhow::Ok((status, body))
    };
    timeout(ADMIN_TIMEOUT, request)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out"))?
        .with_context(|| format!("GET http://{addr}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_comes_from_the_status_lines() {
        let status =
            "Name:\tedgerelay\nVmPeak:\t  999 kB\nVmHWM:\t   52100 kB\nVmRSS:\t   48000 kB\n";
        assert_eq!(Memory::parse(status), Some(Memory { rss_kib: 48_000, hwm_kib: 52_100 }));
        assert_eq!(Memory::parse("Name:\tzombie\n"), None);
        let me = Memory::of(std::process::id()).unwrap();
        assert!(me.rss_kib > 0 && me.hwm_kib >= me.rss_kib, "{me:?}");
    }
}
