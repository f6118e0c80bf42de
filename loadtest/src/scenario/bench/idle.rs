//! `loadtest bench idle-rss` (`scripts/quic-idle-rss`): the relay's memory per idle QUIC
//! connection. Starts nats-server and a relay with QUIC, reads the relay's RSS, opens
//! CONNECTIONS idle native-protocol connections from one client socket (`loadtest quic-idle`),
//! reads the RSS again while they are held, and prints the difference per connection.
//! Loopback only; about a minute for 10,000 connections.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::sleep;

use super::stack::Stack;
use super::Binaries;
use edgerelay_testkit::{free_shared_port, local};

use crate::procs::Memory;

/// Connections the relay may take beyond those opened (the admin probe, stragglers).
const HEADROOM: usize = 100;

/// How long the connections are held once all are open (under the relay's idle timeout).
const HOLD: &str = "20s";

/// Let the relay settle before reading its RSS, and again once the connections are open.
const SETTLE_BEFORE: Duration = Duration::from_secs(1);
const SETTLE_AFTER: Duration = Duration::from_secs(3);

/// Flags of `loadtest bench idle-rss`; each also reads the environment variable named.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    bins: Binaries,
    /// Idle connections to open.
    #[arg(long, env = "CONNECTIONS", default_value_t = 10_000)]
    connections: usize,
    /// Handshakes under way at once.
    #[arg(long, env = "PARALLEL", default_value_t = 64)]
    parallel: usize,
    /// Where the configs and logs go (emptied first).
    #[arg(long, default_value = ".bench-quic/idle")]
    out: PathBuf,
}

pub async fn run(args: Args, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut stack = Stack::start(&args.bins, &args.out, &stop).await?;
    let mut config = stack.relay_config("idle")?;
    config.relay.id = "idle-rss".into();
    let quic = local(free_shared_port());
    config.quic.listen = Some(quic);
    config.quic.max_connections = args.connections + HEADROOM;
    config.quic.max_connections_per_ip = args.connections + HEADROOM;
    config.quic.idle_timeout_ms = 120_000;
    let relay = stack.start_relay("relay", &config, None).await?;
    sleep(SETTLE_BEFORE).await;
    let rss = || Memory::of(relay.pid).map(|m| m.rss_kib).context("the relay has exited");
    let before = rss()?;

    let ready = args.out.join("ready");
    let mut client = Command::new(std::env::current_exe().context("locating loadtest")?)
        .arg("quic-idle")
        .arg("--addr")
        .arg(quic.to_string())
        .arg("--ca")
        .arg(stack.ca())
        .arg("--connections")
        .arg(args.connections.to_string())
        .arg("--parallel")
        .arg(args.parallel.to_string())
        .arg("--hold")
        .arg(HOLD)
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting loadtest quic-idle")?;
    while !ready.exists() {
        ensure!(client.try_wait()?.is_none(), "quic-idle exited early");
        ensure!(!*stop.borrow(), "interrupted");
        sleep(Duration::from_millis(200)).await;
    }
    sleep(SETTLE_AFTER).await;
    let held: usize =
        std::fs::read_to_string(&ready)?.trim().parse().context("reading the ready file")?;
    let after = rss()?;
    client.wait().await?;
    stack.stop().await;

    println!("idle QUIC connections held: {held} of {}", args.connections);
    println!(
        "relay RSS: {:.1} MiB before, {:.1} MiB with them open",
        before as f64 / 1024.0,
        after as f64 / 1024.0
    );
    println!("per idle connection: {:.1} KiB", (after as f64 - before as f64) / held.max(1) as f64);
    Ok(())
}
