//! `loadtest quic-idle`: opens many idle native-protocol QUIC connections to a relay and holds
//! them, so the relay's memory per idle connection can be read off its RSS
//! (`scripts/quic-idle-rss`). All connections share one UDP socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::stream::{self, StreamExt};
use tokio::sync::watch;

use crate::schedule::parse_duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// UDP address of the relay's QUIC listener.
    #[arg(long, default_value = "127.0.0.1:8443")]
    addr: SocketAddr,
    /// PEM CA that signed the relay's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// Name the relay's certificate carries.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Handshakes under way at once.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    /// How long to hold the connections once all are open (keep it under the relay's
    /// quic.idle_timeout_ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    hold: Duration,
    /// File created once every connection is open (for scripts that sample the relay then).
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

pub async fn run(args: Args, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let ca_pem = std::fs::read_to_string(&args.ca)
        .with_context(|| format!("reading {}", args.ca.display()))?;
    let config = edgerelay_client::ClientConfig {
        server: args.addr,
        server_name: args.server_name.clone(),
        ca_pem: Some(ca_pem),
        token: String::new(),
        client_cert: None,
    };
    let endpoint =
        edgerelay_client::quic_endpoint(&config, edgerelay::ingest::quic::ALPN_EDGERELAY)?;
    let started = Instant::now();
    let results: Vec<_> = stream::iter(0..args.connections)
        .map(|_| {
            let connecting = endpoint.connect(args.addr, &args.server_name);
            async move { connecting?.await.map_err(anyhow::Error::from) }
        })
        .buffer_unordered(args.parallel.max(1))
        .collect()
        .await;
    let mut failed = 0;
    let mut conns = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(c) => conns.push(c),
            Err(e) => {
                if failed == 0 {
                    eprintln!("quic-idle: first failure: {e:#}");
                }
                failed += 1;
            }
        }
    }
    eprintln!(
        "quic-idle: {} connections open, {failed} failed, in {:.1} s",
        conns.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.ready_file {
        std::fs::write(path, conns.len().to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    tokio::select! {
        _ = tokio::time::sleep(args.hold) => {}
        _ = stop.changed() => {}
    }
    let alive = conns.iter().filter(|c| c.close_reason().is_none()).count();
    println!("connections opened {} failed {failed} still open after hold {alive}", conns.len());
    endpoint.close(0u32.into(), b"done");
    Ok(())
}
