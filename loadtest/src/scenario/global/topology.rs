//! The processes and proxies of `loadtest global`: one nats-server, per region a relay behind
//! an edge proxy and in front of a NATS proxy, and the consumer's proxy; each relay's generated
//! config. Everything is stopped when the [`Topology`] is dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use tokio::process::Command;
use tokio::sync::watch;

use super::{Args, Region, STREAM, SUBJECT_ROOT};
use edgerelay::config::Config;
use edgerelay_testkit::relay_config::write_toml;
use edgerelay_testkit::{
    dev_certs, free_port, free_shared_port, local, NatsOptions, NatsServer, RelayConfigBuilder,
};

use crate::procs::{self, admin_get, wait_ready, Children};
use crate::wan::{self, Limits, Model, Route};

/// Everything running for the scenario; dropping it kills the processes, stops the proxies
/// and removes the temporary directory, in that order (fields drop in declaration order).
pub(super) struct Topology {
    pub(super) children: Children,
    /// Every proxy, kept alive for the run.
    pub(super) _proxies: Vec<wan::Proxy>,
    /// The nats-server every relay publishes to (its store is in `work`).
    pub(super) _nats: NatsServer,
    /// The temporary store, certificates and configs.
    pub(super) work: tempfile::TempDir,
    pub(super) regions: Vec<RegionSite>,
    /// Where the consumer connects: the consumer proxy in front of NATS.
    pub(super) consumer_nats: String,
}

/// One region's running relay and where to reach it.
pub(super) struct RegionSite {
    pub(super) region: Region,
    /// Where the load goes: the edge proxy in front of the relay (TCP and UDP, one port).
    pub(super) edge: SocketAddr,
    /// The relay's admin listener (direct, not through a proxy).
    pub(super) admin: SocketAddr,
}

impl Topology {
    /// nats-server, the consumer proxy, then per region its NATS proxy, its relay (ready) and
    /// its edge proxy. The first relay creates the stream; the others find it as configured.
    pub(super) async fn start(
        args: &Args,
        regions: &[Region],
        token: &str,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let nats_bin = procs::nats_server_bin(args.nats_server_bin.as_deref());
        let relay_bin = procs::relay_bin(args.relay_bin.as_deref())?;
        ensure!(
            relay_bin.exists(),
            "relay binary {} not found: build it (cargo build -p edgerelay) or pass --relay-bin",
            relay_bin.display()
        );
        let work = tempfile::Builder::new()
            .prefix("loadtest-global-")
            .tempdir()
            .context("creating a temporary directory")?;
        let logs = args.out.join("logs");
        let certs = work.path().join("certs");
        dev_certs(&certs).context("generating the relays' certificates")?;

        let mut children = Children::default();
        let mut proxies = Vec::new();
        let mut nats_server = NatsServer::launch(NatsOptions {
            name: "nats-server".into(),
            log: Some(logs.join("nats-server.log")),
            dir: Some(work.path().to_owned()),
            bin: Some(nats_bin),
            ..NatsOptions::default()
        })?;
        nats_server.ready().await?;
        let nats = local(nats_server.port);

        let consumer_proxy = tcp_proxy(nats, args.consumer_rtt_ms, 0).await?;
        let consumer_nats = format!("nats://{}", consumer_proxy.local_addr());
        proxies.push(consumer_proxy);

        let mut sites = Vec::with_capacity(regions.len());
        for (i, region) in regions.iter().enumerate() {
            let seed = 1 + i as u64;
            let nats_proxy = tcp_proxy(nats, region.nats_rtt_ms, seed).await?;
            let relay = local(free_shared_port());
            let admin = local(free_port());
            let config = work.path().join(format!("relay-{}.toml", region.name));
            let nats = nats_proxy.local_addr();
            let mut relay_cfg = relay_config(region, relay, admin, nats, &certs, token);
            if let Some(n) = args.early_flushes_per_sec {
                relay_cfg.batch.early_flushes_per_sec = n;
            }
            write_toml(&relay_cfg, &config)?;
            let name = format!("relay {}", region.name);
            children.spawn(
                &name,
                Command::new(&relay_bin)
                    .args(["run", "--config"])
                    .arg(&config)
                    .env("EDGERELAY_LOG", "warn"),
                &logs.join(format!("relay-{}.log", region.name)),
            )?;
            wait_ready(&mut children, &logs, stop, &name, || async move {
                matches!(admin_get(admin, "/readyz").await, Ok((200, _)))
            })
            .await?;
            let edge = wan::spawn(
                &Route { listen: local(0), upstream: relay, tcp: true, udp: true },
                &model(region.edge_rtt_ms, seed + 100),
            )
            .await
            .with_context(|| format!("starting region {}'s edge proxy", region.name))?;
            eprintln!(
                "global: region {}: edge proxy {} ({} ms) -> relay {relay} (admin {admin}) -> \
                 NATS proxy {} ({} ms) -> nats-server {nats}",
                region.name,
                edge.local_addr(),
                region.edge_rtt_ms,
                nats_proxy.local_addr(),
                region.nats_rtt_ms,
            );
            sites.push(RegionSite { region: region.clone(), edge: edge.local_addr(), admin });
            proxies.push(nats_proxy);
            proxies.push(edge);
        }
        eprintln!(
            "global: consumer -> consumer proxy {consumer_nats} ({} ms) -> nats-server {nats}",
            args.consumer_rtt_ms
        );
        Ok(Self {
            children,
            _proxies: proxies,
            _nats: nats_server,
            work,
            regions: sites,
            consumer_nats,
        })
    }
}

/// A proxy model with `rtt_ms` and nothing else (no jitter, no loss).
fn model(rtt_ms: u64, seed: u64) -> Model {
    Model {
        rtt: Duration::from_millis(rtt_ms),
        jitter: Duration::ZERO,
        loss: 0.0,
        seed,
        limits: Limits::default(),
    }
}

/// A TCP-only proxy to `upstream` with `rtt_ms`.
async fn tcp_proxy(upstream: SocketAddr, rtt_ms: u64, seed: u64) -> anyhow::Result<wan::Proxy> {
    let route = Route { listen: local(0), upstream, tcp: true, udp: false };
    wan::spawn(&route, &model(rtt_ms, seed)).await.context("starting a NATS proxy")
}

/// The relay config of `region`: HTTPS (TCP) and QUIC (UDP) on the same port, so one edge
/// proxy carries both; the shared stream; a token that may publish only on the region's
/// subjects; no audit stream.
fn relay_config(
    region: &Region,
    listen: SocketAddr,
    admin: SocketAddr,
    nats: SocketAddr,
    certs: &Path,
    token: &str,
) -> Config {
    let defaults = Config::default();
    let allow = format!("{}.>", region.subject_prefix());
    RelayConfigBuilder::new(&format!("nats://{nats}"))
        .id(&region.name)
        .certs_in(certs)
        .stream(STREAM, &[&format!("{SUBJECT_ROOT}.>")])
        .no_tokens()
        .token(&region.name, token, &[&allow], &[])
        .with(|c| {
            c.relay.shutdown_grace_ms = defaults.relay.shutdown_grace_ms;
            c.https.listen = listen;
            c.quic.listen = Some(listen);
            c.admin.listen = admin;
            c.nats.client_name = format!("edgerelay-{}", region.name);
            c.nats.connect_timeout_ms = defaults.nats.connect_timeout_ms;
            c.audit.enabled = false;
        })
        .build()
}

#[cfg(test)]
mod tests {
    use edgerelay_testkit::relay_config::to_toml;

    use super::*;

    #[test]
    fn the_config_reads_back_as_built() {
        let region = Region { name: "near".into(), edge_rtt_ms: 20, nats_rtt_ms: 10 };
        let certs = Path::new("/tmp/we\"ird\\certs");
        let (listen, admin, nats) = (local(8443), local(9090), local(4222));
        let config = relay_config(&region, listen, admin, nats, certs, "global-token-0123");
        let read = Config::parse(&to_toml(&config)).unwrap();
        assert_eq!(read, config);
        assert_eq!(read.relay.id, "near");
        assert_eq!(read.relay.shutdown_grace_ms, Config::default().relay.shutdown_grace_ms);
        assert_eq!((read.https.listen, read.quic.listen), (listen, Some(listen)));
        assert_eq!(read.nats.urls, ["nats://127.0.0.1:4222"]);
        assert_eq!(read.stream.subjects, ["global.>"]);
        assert_eq!(read.auth.static_tokens.len(), 1);
        assert_eq!(read.auth.static_tokens[0].allow, ["global.near.>"]);
        assert_eq!(read.https.tls_cert, certs.join("cert.pem"));
        assert!(!read.audit.enabled);
    }
}
