//! `loadtest global`: the WAN scenario of a PoP fleet on one machine. Three relays stand for
//! three regions, each with its own distance to its edge and to NATS; one consumer sits 30 ms
//! (round trip) from NATS. Every region is loaded at once and the report says, per region,
//! whether edge send → consumer stays under the delivery budget (100 ms at p99) and how much of
//! that the relay itself takes.
//!
//! Topology, all on loopback, every delay from an in-process [`wan`] proxy:
//!
//! ```text
//!  loadtest ──edge proxy (edge RTT)──▶ relay <name> ──NATS proxy (NATS RTT)──┐
//!  (one load per region, concurrently)      (one per region)                  ▼
//!                                                                        nats-server ◀── consumer proxy ── consumer
//!                                                                     stream GLOBAL: global.>      (consumer RTT)
//! ```
//!
//! - **Budget arithmetic.** Delivery pays each path one way: edge → relay (edge RTT / 2), relay
//!   → NATS (NATS RTT / 2), NATS → consumer (consumer RTT / 2). That sum is the region's network
//!   *floor*; the rest of its budget is what the relay, JetStream and the consumer may spend.
//!   The edge's answer instead waits for the PubAck, so send→ack pays both round trips in full
//!   (edge RTT + NATS RTT): it is reported, not held to the delivery budget.
//! - **The relay's own share**: its `ingest_to_ack` p99 (`/debug/latency`: the last
//!   `window_secs` when the measured phase is at least that long, else since start) minus its
//!   measured round trip to NATS (the lowest `edgerelay_nats_rtt_seconds` read during the run;
//!   the configured RTT if the probe has no value). What is left is what the relay adds (queue wait, batching, encoding) plus
//!   JetStream's own storage work, with the emulated network taken out.
//! - **Events** carry a per-region run nonce in their payload stamp; one ordered consumer on
//!   `global.>` attributes each one to its region by that nonce and measures send→consumer from
//!   the request's *intended* send time (coordinated-omission-correct).
//! - **Processes**: one nats-server (JetStream, temporary store) and one relay per region, each
//!   with a generated config (its own ports, the shared stream `GLOBAL`, a token that may only
//!   publish on `global.<region>.>`). They are killed when the scenario ends, fails, times out,
//!   or is interrupted (Ctrl-C, SIGTERM); the whole scenario is bounded in time.
//!
//! Writes to `--out DIR`: `summary.json`, `<region>-e2e.hgrm` (send→consumer), `<region>.hgrm`
//! (send→ack), `table.md` (what is printed to stdout), `percentiles.svg`, and `logs/` (the
//! nats-server and relay logs).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use edgerelay_ops::top::latency::{Latency, Summary as StageSummary};
use edgerelay_ops::top::{prom, state::names};
use futures::future::join_all;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::timeout;

use crate::consume::{Acked, Consumer, Decoding, Source};
use crate::events::{self, EventArgs};
use crate::harness::Target;
use crate::mode::https::HttpVersion;
use crate::mode::{h3, https, quic, Mode};
use crate::model::{E2e, Measured, Percentiles, Summary};
use crate::plot::{self, Series};
use crate::procs::{
    self, admin_get, free_shared_port, free_tcp_port, local, toml_string, wait_ready, Children,
};
use crate::report;
use crate::schedule::{parse_duration, RunArgs};
use crate::token::TokenArgs;
use crate::wan::{self, Limits, Model, Route};

/// The regions when no `--region` is given: name, edge RTT ms, relay↔NATS RTT ms.
const DEFAULT_REGIONS: [(&str, u64, u64); 3] =
    [("near", 20, 10), ("mid", 60, 20), ("far", 120, 30)];

/// The stream every relay publishes into, and the subjects it captures (`global.>`).
const STREAM: &str = "GLOBAL";
const SUBJECT_ROOT: &str = "global";

/// Time allowed around the measured run: starting the processes (each within
/// [`READY_TIMEOUT`], one after the other), scraping the relays and stopping everything.
const SET_UP_ALLOWANCE: Duration = Duration::from_secs(150);

/// How often each relay's `/metrics` is read during the run for its NATS round trip (the
/// relay itself probes every 5 s).
const RTT_SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Flags of `loadtest global`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// A region: its name (`[A-Za-z0-9_-]`, also the relay id and the subject token), the
    /// round trip between its edge and its relay, and between its relay and NATS, in
    /// milliseconds. Repeatable. [default: near:20:10, mid:60:20, far:120:30]
    #[arg(long = "region", value_name = "NAME:EDGE_RTT_MS:NATS_RTT_MS", value_parser = parse_region)]
    regions: Vec<Region>,

    /// Round trip between the consumer and NATS, milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 30)]
    consumer_rtt_ms: u64,

    /// Protocol between the edge and its relay.
    #[arg(long, value_name = "MODE", value_enum, default_value = "quic")]
    mode: GlobalMode,

    /// Offered load per region, events per second (open loop, constant rate).
    #[arg(long, value_name = "EVENTS_PER_SEC", default_value_t = 500.0, value_parser = parse_positive)]
    rate: f64,

    /// How long to measure, after the warm-up (e.g. 10s, 1m).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    duration: Duration,

    /// Warm-up before measuring, at the same rate (connections are set up by then).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,

    /// Per-request timeout, from the moment the request is sent.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,

    /// The pacers busy-wait this long before each due time (three pacers run at once: keep it
    /// 0 on a small machine).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = parse_duration)]
    pacer_spin: Duration,

    /// Connections per region.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,

    /// Requests in flight at most per region (quic: spread over --streams per connection).
    /// Needs to exceed rate × send→ack latency: 500/s × 150 ms = 75 for the far default.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,

    /// quic: bidirectional streams per connection.
    #[arg(long, value_name = "M", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    streams: u32,

    /// quic: events per request (https and h3 send one).
    #[arg(long, value_name = "E", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    events_per_request: u32,

    /// Distinct subjects per region, `global.<region>.0` …
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    subjects: u32,

    /// Size of each event payload, bytes (at least 24: the send-time stamp).
    #[arg(long, value_name = "N", default_value_t = 256)]
    payload_bytes: usize,

    /// How long after the run the consumer may take to deliver the last acknowledged events
    /// before they count as missing.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    consume_grace: Duration,

    /// The delivery budget: send→consumer p99 per region, milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 100.0, value_parser = parse_positive)]
    budget_ms: f64,

    /// The target for the relay's own share of it (p99), milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5.0, value_parser = parse_positive)]
    relay_share_ms: f64,

    /// The nats-server binary [default: $NATS_SERVER_BIN, else nats-server on the PATH]
    #[arg(long, value_name = "FILE", env = "NATS_SERVER_BIN")]
    nats_server_bin: Option<PathBuf>,

    /// The relay binary [default: edgerelay next to this loadtest binary]
    #[arg(long, value_name = "FILE")]
    relay_bin: Option<PathBuf>,

    /// Directory for summary.json, table.md, the .hgrm files, percentiles.svg and logs/
    /// (created).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// How the edge talks to its relay.
#[derive(Clone, Copy, Debug, Eq, PartialEq, clap::ValueEnum)]
enum GlobalMode {
    /// HTTPS over HTTP/2.
    Https,
    /// HTTP/3.
    H3,
    /// The native QUIC protocol.
    Quic,
}

/// One region as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Region {
    name: String,
    edge_rtt_ms: u64,
    nats_rtt_ms: u64,
}

/// Everything running for the scenario; dropping it kills the processes, stops the proxies
/// and removes the temporary directory, in that order (fields drop in declaration order).
struct Topology {
    children: Children,
    /// Every proxy, kept alive for the run.
    _proxies: Vec<wan::Proxy>,
    /// The temporary store, certificates and configs.
    work: tempfile::TempDir,
    regions: Vec<RegionSite>,
    /// Where the consumer connects: the consumer proxy in front of NATS.
    consumer_nats: String,
}

/// Every region's load, over one mode for all.
enum Loads {
    Https(Vec<Target<https::Args>>),
    H3(Vec<Target<h3::Args>>),
    Quic(Vec<Target<quic::Args>>),
}

/// One region's running relay and where to reach it.
struct RegionSite {
    region: Region,
    /// Where the load goes: the edge proxy in front of the relay (TCP and UDP, one port).
    edge: SocketAddr,
    /// The relay's admin listener (direct, not through a proxy).
    admin: SocketAddr,
}

/// What a relay's admin listener said about its own latency after the run.
#[derive(Clone, Debug, Serialize)]
struct RelayShare {
    /// Which `/debug/latency` range the percentiles cover: `window` (the last
    /// `window_secs`, measured phase only) or `since_start` (warm-up included).
    source: &'static str,
    window_secs: f64,
    /// ingest→ack p99: from the event's arrival at the relay to its PubAck.
    ingest_to_ack_p99_ms: f64,
    /// Queue wait p99: from enqueue to the batch's publish.
    queue_wait_p99_ms: f64,
    /// Flush p99: from publish to PubAck (one NATS round trip plus JetStream's work).
    flush_p99_ms: f64,
    /// The relay's round trip to NATS, subtracted from ingest→ack.
    nats_rtt_ms: f64,
    /// `measured` (the lowest `edgerelay_nats_rtt_seconds` read during the run) or
    /// `configured` (the proxy's RTT, when the relay had no probe value).
    nats_rtt_source: &'static str,
    /// How many probe values were read.
    nats_rtt_samples: usize,
    /// ingest→ack p99 − NATS RTT (not below zero).
    own_share_p99_ms: f64,
}

/// One region in `summary.json`.
#[derive(Clone, Debug, Serialize)]
struct RegionSummary {
    name: String,
    edge_rtt_ms: u64,
    nats_rtt_ms: u64,
    /// The network's share of send→consumer: (edge + NATS + consumer RTT) / 2.
    floor_send_to_consumer_ms: f64,
    /// The network's share of send→ack: edge RTT + NATS RTT.
    floor_send_to_ack_ms: f64,
    /// Budget minus the delivery floor: what the relay, JetStream and the consumer may spend.
    headroom_ms: f64,
    achieved_rate: f64,
    /// Events accepted in the measured phase.
    ok: u64,
    errors: BTreeMap<String, u64>,
    error_total: u64,
    send_to_ack_ms: Percentiles,
    send_to_consumer_ms: Percentiles,
    /// Acknowledged events of the measured phase, those the consumer saw, and the rest.
    expected: u64,
    seen: u64,
    missing: u64,
    duplicates: u64,
    /// The relay's own share, when its admin listener answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    relay: Option<RelayShare>,
    /// Why there is no `relay`.
    #[serde(skip_serializing_if = "Option::is_none")]
    relay_error: Option<String>,
    /// send→consumer p99 under the budget, with no errors and nothing missing.
    delivery_pass: bool,
    /// The relay's own share under its target.
    relay_pass: bool,
    pass: bool,
}

/// `summary.json`.
#[derive(Clone, Debug, Serialize)]
struct GlobalSummary {
    /// The command line, for the record.
    command: String,
    mode: &'static str,
    /// Offered events/s per region.
    rate_per_region: f64,
    warmup_s: f64,
    duration_s: f64,
    consumer_rtt_ms: u64,
    budget_ms: f64,
    relay_share_target_ms: f64,
    /// The run was cut short (Ctrl-C or SIGTERM): the numbers cover less than asked.
    interrupted: bool,
    /// Every region passed both.
    pass: bool,
    regions: Vec<RegionSummary>,
}

impl Args {
    /// The regions to run: `--region`s, or the defaults.
    fn regions(&self) -> Vec<Region> {
        if !self.regions.is_empty() {
            return self.regions.clone();
        }
        DEFAULT_REGIONS
            .iter()
            .map(|(name, edge, nats)| Region {
                name: (*name).to_owned(),
                edge_rtt_ms: *edge,
                nats_rtt_ms: *nats,
            })
            .collect()
    }

    fn validate(&self) -> anyhow::Result<()> {
        let regions = self.regions();
        let mut names: Vec<&str> = regions.iter().map(|r| r.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        ensure!(names.len() == regions.len(), "--region names a region twice");
        ensure!(
            self.payload_bytes >= events::STAMP_LEN,
            "--payload-bytes must be at least {} (the send-time stamp)",
            events::STAMP_LEN
        );
        ensure!(!self.timeout.is_zero(), "--timeout must be positive");
        ensure!(!self.duration.is_zero(), "--duration must be positive");
        Ok(())
    }

    fn run_args(&self) -> RunArgs {
        RunArgs {
            rate: self.rate,
            duration: self.duration,
            warmup: self.warmup,
            timeout: self.timeout,
            pacer_spin: self.pacer_spin,
        }
    }

    /// Every region's load over `--mode`, aimed at its edge proxy.
    fn loads(&self, sites: &[RegionSite], ca: &Path, token: &str) -> anyhow::Result<Loads> {
        let token = TokenArgs {
            token: Some(token.to_owned()),
            token_from: None,
            token_claims: String::new(),
            token_lifetime_secs: 0,
        };
        let quic_target = |site: &RegionSite| quic::Target {
            addr: site.edge.to_string(),
            server_name: None,
            ca: ca.to_owned(),
            token: token.clone(),
        };
        Ok(match self.mode {
            GlobalMode::Https => Loads::Https(
                sites
                    .iter()
                    .map(|site| {
                        let url = format!("https://{}", site.edge).parse();
                        let args = https::Args {
                            url: url.context("edge proxy URL")?,
                            server_name: None,
                            ca: Some(ca.to_owned()),
                            insecure: false,
                            token: token.clone(),
                            http: HttpVersion::Http2,
                            connections: self.connections,
                            concurrency: self.concurrency,
                        };
                        Ok(self.target(site, args))
                    })
                    .collect::<anyhow::Result<_>>()?,
            ),
            GlobalMode::H3 => Loads::H3(
                sites
                    .iter()
                    .map(|site| {
                        let args = h3::Args {
                            target: quic_target(site),
                            connections: self.connections,
                            concurrency: self.concurrency,
                        };
                        self.target(site, args)
                    })
                    .collect(),
            ),
            GlobalMode::Quic => Loads::Quic(
                sites
                    .iter()
                    .map(|site| {
                        let args = quic::Args::spread(
                            quic_target(site),
                            self.connections,
                            self.streams,
                            self.concurrency,
                            self.events_per_request,
                        );
                        self.target(site, args)
                    })
                    .collect(),
            ),
        })
    }

    /// `mode` sending `site`'s events. The consumer is run here, once for every region; the
    /// modes only measure.
    fn target<M>(&self, site: &RegionSite, mode: M) -> Target<M> {
        let events = EventArgs {
            subjects: self.subjects,
            subject_prefix: Some(site.region.subject_prefix()),
            payload_bytes: self.payload_bytes,
            no_keys: false,
        };
        Target { mode, events, relay_pid: None }
    }

    /// The longest the whole scenario may take.
    fn time_limit(&self) -> Duration {
        SET_UP_ALLOWANCE + self.warmup + self.duration + self.timeout + self.consume_grace
    }
}

impl GlobalMode {
    fn name(self) -> &'static str {
        match self {
            GlobalMode::Https => "https",
            GlobalMode::H3 => "h3",
            GlobalMode::Quic => "quic",
        }
    }
}

impl Loads {
    /// Every region's run at once, each stamped with its own nonce (in region order).
    async fn measure(
        &self,
        run: &RunArgs,
        nonces: &[u64],
        stop: &watch::Receiver<bool>,
    ) -> Vec<anyhow::Result<Measured>> {
        match self {
            Loads::Https(targets) => measure_all(targets, run, nonces, stop).await,
            Loads::H3(targets) => measure_all(targets, run, nonces, stop).await,
            Loads::Quic(targets) => measure_all(targets, run, nonces, stop).await,
        }
    }
}

impl Region {
    /// Subjects of the region: `global.<name>.N`.
    fn subject_prefix(&self) -> String {
        format!("{SUBJECT_ROOT}.{}", self.name)
    }

    /// One-way delays of the delivery path, summed: edge → relay → NATS → consumer.
    fn delivery_floor_ms(&self, consumer_rtt_ms: u64) -> f64 {
        (self.edge_rtt_ms + self.nats_rtt_ms + consumer_rtt_ms) as f64 / 2.0
    }

    /// Round trips the edge's answer waits for: edge ↔ relay and relay ↔ NATS.
    fn ack_floor_ms(&self) -> f64 {
        (self.edge_rtt_ms + self.nats_rtt_ms) as f64
    }
}

/// Runs `loadtest global`.
pub async fn run(args: Args, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    args.validate()?;
    let stop = with_sigterm(stop)?;
    let limit = args.time_limit();
    match timeout(limit, scenario(&args, stop)).await {
        Ok(result) => result,
        Err(_) => bail!("the scenario did not finish within {limit:?}; every process was stopped"),
    }
}

/// `stop`, also turned true by SIGTERM, so a terminated run still stops its children.
fn with_sigterm(mut stop: watch::Receiver<bool>) -> anyhow::Result<watch::Receiver<bool>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let (tx, rx) = watch::channel(*stop.borrow());
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => {}
            _ = term.recv() => eprintln!("global: SIGTERM: finishing requests in flight"),
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// One run per target at once, target `i` stamped with `nonces[i]`.
async fn measure_all<M: Mode>(
    targets: &[Target<M>],
    run: &RunArgs,
    nonces: &[u64],
    stop: &watch::Receiver<bool>,
) -> Vec<anyhow::Result<Measured>> {
    let runs = targets.iter().zip(nonces).map(|(t, n)| t.measure(run, Some(*n), stop.clone()));
    join_all(runs).await
}

/// Starts everything, runs the load, reports; every process is stopped on return.
async fn scenario(args: &Args, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let regions = args.regions();
    std::fs::create_dir_all(args.out.join("logs"))
        .with_context(|| format!("creating {}", args.out.join("logs").display()))?;
    let token = format!("global-{:016x}", events::nonce());
    let mut topology = Topology::start(args, &regions, &token, &stop).await?;
    eprint!("{}", arithmetic(args, &regions));

    let ca = topology.work.path().join("certs").join("ca.pem");
    let loads = args.loads(&topology.regions, &ca, &token)?;
    let nonces: Vec<u64> = regions.iter().map(|_| events::nonce()).collect();
    let source = Source {
        nats_url: topology.consumer_nats.clone(),
        prefix: SUBJECT_ROOT.to_owned(),
        decoding: Decoding::Batch,
    };
    let consumer = Consumer::start_runs(&source, &nonces, args.consume_grace).await?;

    eprintln!(
        "global: {} regions over {} at {}/s each: {} warm-up, {} measured (progress lines of \
         the regions interleave)",
        regions.len(),
        args.mode.name(),
        args.rate,
        report::format_duration(args.warmup),
        report::format_duration(args.duration),
    );
    if args.duration < Duration::from_secs(10) {
        eprintln!(
            "global: --duration is shorter than the relays' 10 s latency window: their share \
             is computed since start, warm-up included"
        );
    }
    let run = args.run_args();
    let (done, sampling) = watch::channel(false);
    let load = async {
        let measured = loads.measure(&run, &nonces, &stop).await;
        let _ = done.send(true);
        measured
    };
    let samplers =
        join_all(topology.regions.iter().map(|site| sample_rtt(site.admin, sampling.clone())));
    let (measured, rtt_samples): (Vec<anyhow::Result<Measured>>, _) = tokio::join!(load, samplers);
    // Scraped before the consumer's grace, so the relays' windows still hold the run.
    // The measured phase as it ran (shorter when interrupted) decides the relays' range.
    let phases: Vec<Duration> = measured
        .iter()
        .map(|m| m.as_ref().map_or(args.duration, |m| m.measurements.window))
        .collect();
    let shares = join_all(
        topology
            .regions
            .iter()
            .zip(rtt_samples)
            .zip(phases)
            .map(|((site, rtt), phase)| relay_share(site, phase, rtt)),
    )
    .await;
    let measured = regions
        .iter()
        .zip(measured)
        .map(|(region, m)| m.with_context(|| format!("region {}", region.name)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let acked: Vec<Acked<'_>> = measured
        .iter()
        .zip(&nonces)
        .map(|(m, nonce)| Acked {
            nonce: *nonce,
            requests: &m.measurements.acked,
            events_per_request: m.schedule.events_per_request(),
        })
        .collect();
    let e2e = consumer.finish_runs(&acked).await;
    topology.children.stop().await;

    let mut summaries = Vec::with_capacity(regions.len());
    for (((region, m), e2e), share) in regions.iter().zip(&measured).zip(&e2e).zip(shares) {
        let path = args.out.join(format!("{}.hgrm", region.name));
        report::write(&path, &report::hgrm(&m.measurements.latency))?;
        report::write(&report::e2e_path(&path), &report::hgrm(&e2e.latency))?;
        let run_summary = Summary::new(region.name.clone(), &m.info, &m.schedule, &m.measurements);
        summaries.push(region_summary(args, region, run_summary, e2e, share));
    }
    let summary = GlobalSummary {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        mode: args.mode.name(),
        rate_per_region: args.rate,
        warmup_s: args.warmup.as_secs_f64(),
        duration_s: args.duration.as_secs_f64(),
        consumer_rtt_ms: args.consumer_rtt_ms,
        budget_ms: args.budget_ms,
        relay_share_target_ms: args.relay_share_ms,
        interrupted: measured.iter().any(|m| m.measurements.interrupted),
        pass: summaries.iter().all(|r| r.pass),
        regions: summaries,
    };
    let table = markdown(&summary);
    print!("{table}");
    report::write(&args.out.join("table.md"), &table)?;
    report::write_json(&args.out.join("summary.json"), &summary)?;
    report::write(&args.out.join("percentiles.svg"), &svg(args, &regions, &measured, &e2e))?;
    println!(
        "\nwrote {}/{{summary.json,table.md,percentiles.svg,*.hgrm,logs/}}",
        args.out.display()
    );
    Ok(())
}

impl Topology {
    /// nats-server, the consumer proxy, then per region its NATS proxy, its relay (ready) and
    /// its edge proxy. The first relay creates the stream; the others find it as configured.
    async fn start(
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
        edgerelay_ops::dev_certs::generate_dev_certs(&[
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .and_then(|c| c.write(&certs))
        .context("generating the relays' certificates")?;

        let mut children = Children::default();
        let mut proxies = Vec::new();
        let nats = SocketAddr::from((Ipv4Addr::LOCALHOST, free_tcp_port()?));
        children.spawn(
            "nats-server",
            Command::new(&nats_bin)
                .args(["-js", "-a", "127.0.0.1", "-p", &nats.port().to_string(), "-sd"])
                .arg(work.path().join("jetstream")),
            &logs.join("nats-server.log"),
        )?;
        wait_ready(&mut children, &logs, stop, "nats-server", || async move {
            TcpStream::connect(nats).await.is_ok()
        })
        .await?;

        let consumer_proxy = tcp_proxy(nats, args.consumer_rtt_ms, 0).await?;
        let consumer_nats = format!("nats://{}", consumer_proxy.local_addr());
        proxies.push(consumer_proxy);

        let mut sites = Vec::with_capacity(regions.len());
        for (i, region) in regions.iter().enumerate() {
            let seed = 1 + i as u64;
            let nats_proxy = tcp_proxy(nats, region.nats_rtt_ms, seed).await?;
            let relay = SocketAddr::from((Ipv4Addr::LOCALHOST, free_shared_port()?));
            let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_tcp_port()?));
            let config = work.path().join(format!("relay-{}.toml", region.name));
            let text = relay_config(region, relay, admin, nats_proxy.local_addr(), &certs, token);
            report::write(&config, &text)?;
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
        Ok(Self { children, _proxies: proxies, work, regions: sites, consumer_nats })
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
) -> String {
    let s = |text: &str| toml_string(text);
    let path = |name: &str| toml_string(&certs.join(name).to_string_lossy());
    format!(
        r#"# Generated by `loadtest global` for region {name}.
[relay]
id = {id}
[https]
listen = "{listen}"
tls_cert = {cert}
tls_key = {key}
[quic]
listen = "{listen}"
[admin]
listen = "{admin}"
[nats]
urls = ["nats://{nats}"]
client_name = {client}
[stream]
name = "{STREAM}"
subjects = ["{SUBJECT_ROOT}.>"]
[audit]
enabled = false
[[auth.static_tokens]]
name = {id}
token = {token}
allow = [{allow}]
"#,
        name = region.name,
        id = s(&region.name),
        cert = path("cert.pem"),
        key = path("key.pem"),
        client = s(&format!("edgerelay-{}", region.name)),
        token = s(token),
        allow = s(&format!("{}.>", region.subject_prefix())),
    )
}

/// The relay's NATS round trip as its `/metrics` shows it, every [`RTT_SAMPLE_EVERY`] until
/// `done` turns true (or its sender is gone); unreadable answers are skipped.
async fn sample_rtt(admin: SocketAddr, mut done: watch::Receiver<bool>) -> Vec<f64> {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(RTT_SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.wait_for(|done| *done) => return samples,
        }
        if let Ok((200, body)) = admin_get(admin, "/metrics").await {
            samples.extend(nats_rtt_seconds(&String::from_utf8_lossy(&body)));
        }
    }
}

/// The relay's own share of the run, from its admin listener, with the NATS round trips
/// sampled during the run (`rtt_samples`, seconds) and one more read now.
async fn relay_share(
    site: &RegionSite,
    measured_phase: Duration,
    mut rtt_samples: Vec<f64>,
) -> anyhow::Result<RelayShare> {
    let (status, body) = admin_get(site.admin, "/debug/latency").await?;
    ensure!(status == 200, "/debug/latency answered {status}");
    let latency = Latency::parse(&body)?;
    let (status, metrics) = admin_get(site.admin, "/metrics").await?;
    ensure!(status == 200, "/metrics answered {status}");
    rtt_samples.extend(nats_rtt_seconds(&String::from_utf8_lossy(&metrics)));
    share_of(&latency, &rtt_samples, site.region.nats_rtt_ms, measured_phase)
}

/// The relay's NATS round trip from its `/metrics`, if it has a usable one.
fn nats_rtt_seconds(metrics: &str) -> Option<f64> {
    prom::parse(metrics)
        .iter(names::RTT)
        .map(|s| s.value)
        .filter(|v| v.is_finite() && *v >= 0.0)
        .reduce(f64::min)
}

/// [`RelayShare`] from a `/debug/latency` document (µs) and the relay's RTT to NATS: the
/// window when the measured phase filled it, else since start. The RTT is the lowest of the
/// relay's probes (`rtt_samples`, seconds): each probe is a JetStream API request, so the
/// server's handling of it under load adds to some samples, never to the network's share.
fn share_of(
    latency: &Latency,
    rtt_samples: &[f64],
    configured_rtt_ms: u64,
    measured_phase: Duration,
) -> anyhow::Result<RelayShare> {
    let use_window =
        measured_phase.as_secs_f64() >= latency.window_secs && latency.window_secs > 0.0;
    let stage = |name: &str| -> anyhow::Result<&StageSummary> {
        let stage = latency
            .stages
            .get(name)
            .with_context(|| format!("/debug/latency has no stage {name}"))?;
        Ok(if use_window { &stage.window } else { &stage.since_start })
    };
    let ingest = stage("ingest_to_ack")?;
    ensure!(ingest.count > 0, "the relay recorded no ingest→ack latency");
    let lowest =
        rtt_samples.iter().copied().filter(|s| s.is_finite() && *s >= 0.0).reduce(f64::min);
    let (nats_rtt_ms, nats_rtt_source) = match lowest {
        Some(s) => (s * 1e3, "measured"),
        None => (configured_rtt_ms as f64, "configured"),
    };
    let ms = |us: f64| round3(us / 1e3);
    Ok(RelayShare {
        source: if use_window { "window" } else { "since_start" },
        window_secs: latency.window_secs,
        ingest_to_ack_p99_ms: ms(ingest.p99),
        queue_wait_p99_ms: ms(stage("queue_wait")?.p99),
        flush_p99_ms: ms(stage("flush")?.p99),
        nats_rtt_ms: round3(nats_rtt_ms),
        nats_rtt_source,
        nats_rtt_samples: rtt_samples.len(),
        own_share_p99_ms: round3((ingest.p99 / 1e3 - nats_rtt_ms).max(0.0)),
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One region's line of the summary, judged against the budget and the relay-share target.
fn region_summary(
    args: &Args,
    region: &Region,
    run: Summary,
    e2e: &E2e,
    share: anyhow::Result<RelayShare>,
) -> RegionSummary {
    let send_to_consumer_ms = Percentiles::of(&e2e.latency);
    let delivery_pass = run.error_total == 0
        && e2e.missing == 0
        && e2e.seen > 0
        && send_to_consumer_ms.p99 < args.budget_ms;
    let (relay, relay_error) = match share {
        Ok(share) => (Some(share), None),
        Err(error) => (None, Some(format!("{error:#}"))),
    };
    let relay_pass = relay.as_ref().is_some_and(|r| r.own_share_p99_ms < args.relay_share_ms);
    let floor = region.delivery_floor_ms(args.consumer_rtt_ms);
    RegionSummary {
        name: region.name.clone(),
        edge_rtt_ms: region.edge_rtt_ms,
        nats_rtt_ms: region.nats_rtt_ms,
        floor_send_to_consumer_ms: floor,
        floor_send_to_ack_ms: region.ack_floor_ms(),
        headroom_ms: args.budget_ms - floor,
        achieved_rate: run.achieved_rate,
        ok: run.ok,
        errors: run.errors,
        error_total: run.error_total,
        send_to_ack_ms: run.latency_ms,
        send_to_consumer_ms,
        expected: e2e.expected,
        seen: e2e.seen,
        missing: e2e.missing,
        duplicates: e2e.duplicates,
        relay,
        relay_error,
        delivery_pass,
        relay_pass,
        pass: delivery_pass && relay_pass,
    }
}

/// The topology and budget arithmetic, printed before the run.
fn arithmetic(args: &Args, regions: &[Region]) -> String {
    let mut out = String::new();
    let c = args.consumer_rtt_ms;
    let _ = writeln!(
        out,
        "global: delivery budget {} ms at p99; the network's one-way share per region is \
         edge RTT/2 + NATS RTT/2 + consumer RTT/2 ({c}/2):",
        args.budget_ms
    );
    for r in regions {
        let floor = r.delivery_floor_ms(c);
        let _ = writeln!(
            out,
            "global:   {:<8} {}/2 + {}/2 + {c}/2 = {floor:.1} ms -> {:.1} ms left for relay, \
             JetStream and consumer{}; send->ack pays {} + {} = {:.0} ms of round trips",
            r.name,
            r.edge_rtt_ms,
            r.nats_rtt_ms,
            args.budget_ms - floor,
            if floor >= args.budget_ms { " (cannot fit)" } else { "" },
            r.edge_rtt_ms,
            r.nats_rtt_ms,
            r.ack_floor_ms(),
        );
    }
    out
}

/// The markdown table (and its notes) for stdout, `table.md` and BENCHMARKS.md.
fn markdown(s: &GlobalSummary) -> String {
    let mut out = String::new();
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
    let _ = writeln!(
        out,
        "#### `loadtest global`: {} regions over {}, {}/s per region, {} s measured after {} s \
         warm-up\n",
        s.regions.len(),
        s.mode,
        s.rate_per_region,
        s.duration_s,
        s.warmup_s
    );
    let _ = writeln!(out, "`{}`\n", s.command);
    if s.interrupted {
        let _ = writeln!(out, "**Interrupted**: the measured phase was cut short.\n");
    }
    let _ = writeln!(
        out,
        "| region | edge RTT ms | relay↔NATS RTT ms | network floor ms | events/s | errors | \
         missing | send→ack p50 / p99 ms | send→consumer p50 / p99 / p99.9 ms | p99 < {} ms | \
         relay queue wait p99 ms | relay ingest→ack p99 ms | relay NATS RTT ms | relay own share \
         p99 ms | < {} ms |",
        s.budget_ms, s.relay_share_target_ms
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|:---:|"
    );
    for r in &s.regions {
        let (a, e) = (&r.send_to_ack_ms, &r.send_to_consumer_ms);
        let relay = match &r.relay {
            Some(x) => format!(
                "{:.2} | {:.2} | {:.2}{} | {:.2}",
                x.queue_wait_p99_ms,
                x.ingest_to_ack_p99_ms,
                x.nats_rtt_ms,
                if x.nats_rtt_source == "measured" { "" } else { " (configured)" },
                x.own_share_p99_ms
            ),
            None => "n/a | n/a | n/a | n/a".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | \
             {} | {relay} | {} |",
            r.name,
            r.edge_rtt_ms,
            r.nats_rtt_ms,
            r.floor_send_to_consumer_ms,
            r.achieved_rate,
            r.error_total,
            r.missing,
            a.p50,
            a.p99,
            e.p50,
            e.p99,
            e.p999,
            verdict(r.delivery_pass),
            verdict(r.relay_pass),
        );
    }
    let source = match s.regions.iter().find_map(|r| r.relay.as_ref()) {
        Some(r) if r.source == "window" => {
            format!("its last {} s, measured phase only", r.window_secs)
        }
        Some(r) => format!(
            "since the relay started, warm-up included: the measured phase is shorter than \
             its {} s window",
            r.window_secs
        ),
        None => "not available".to_owned(),
    };
    let _ = writeln!(
        out,
        "\nThe consumer is {c} ms (round trip) from NATS. Network floor = edge RTT/2 + relay↔NATS \
         RTT/2 + consumer RTT/2 ({c}/2): delivery pays each leg one way, so the rest of the {b} ms \
         budget is what the relay, JetStream and the consumer may spend. The edge's answer \
         waits for the PubAck and pays both round trips in full (edge RTT + NATS RTT), so \
         send→ack is shown but not held to the budget. Latencies run from each request's \
         intended send time (open loop, coordinated-omission-corrected). Relay own share = \
         the relay's ingest→ack p99 from its `/debug/latency` ({source}) minus its measured \
         round trip to NATS (the lowest `edgerelay_nats_rtt_seconds` read during the run): \
         queue wait, batching, encoding and \
         JetStream's own storage work, with the emulated network taken out.",
        c = s.consumer_rtt_ms,
        b = s.budget_ms,
    );
    let failed: Vec<String> = s
        .regions
        .iter()
        .filter(|r| !r.pass)
        .map(|r| {
            let mut why = Vec::new();
            if r.error_total > 0 {
                why.push(format!("{} errors", r.error_total));
            }
            if r.missing > 0 {
                why.push(format!("{} events missing", r.missing));
            }
            if r.send_to_consumer_ms.p99 >= s.budget_ms {
                why.push(format!(
                    "send→consumer p99 {:.2} ms is {:.2} ms over the budget",
                    r.send_to_consumer_ms.p99,
                    r.send_to_consumer_ms.p99 - s.budget_ms
                ));
            }
            match &r.relay {
                Some(x) if !r.relay_pass => why.push(format!(
                    "relay own share {:.2} ms is {:.2} ms over its target",
                    x.own_share_p99_ms,
                    x.own_share_p99_ms - s.relay_share_target_ms
                )),
                Some(_) => {}
                None => why.push(format!(
                    "no relay share ({})",
                    r.relay_error.as_deref().unwrap_or("unknown")
                )),
            }
            if why.is_empty() {
                why.push("nothing delivered".to_owned());
            }
            format!("{}: {}", r.name, why.join(", "))
        })
        .collect();
    if failed.is_empty() {
        let _ = writeln!(
            out,
            "\n**PASS**: every region's send→consumer p99 is under {} ms and every relay's own \
             share under {} ms.",
            s.budget_ms, s.relay_share_target_ms
        );
    } else {
        let _ = writeln!(out, "\n**FAIL**: {}.", failed.join("; "));
    }
    out
}

/// Every region's send→consumer (solid) and send→ack (dashed) percentile spectrum.
fn svg(args: &Args, regions: &[Region], measured: &[Measured], e2e: &[E2e]) -> String {
    let mut series = Vec::new();
    for ((region, m), e) in regions.iter().zip(measured).zip(e2e) {
        series.push(Series::of(format!("{} send->consumer", region.name), &e.latency, false));
        series.push(Series::of(
            format!("{} send->ack", region.name),
            &m.measurements.latency,
            true,
        ));
    }
    let title = format!(
        "loadtest global: {} over {}, {}/s per region",
        regions.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", "),
        args.mode.name(),
        args.rate
    );
    plot::spectrum(&title, &series, Some(args.budget_ms))
}

/// Parses `--region NAME:EDGE_RTT_MS:NATS_RTT_MS`.
fn parse_region(s: &str) -> Result<Region, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let [name, edge, nats] = parts[..] else {
        return Err(format!("`{s}` is not NAME:EDGE_RTT_MS:NATS_RTT_MS"));
    };
    if name.is_empty()
        || name.len() > 32
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!("region name `{name}` must be 1-32 characters of [A-Za-z0-9_-]"));
    }
    let ms = |v: &str, what: &str| {
        v.parse::<u64>().ok().filter(|ms| *ms <= 10_000).ok_or_else(|| {
            format!("{what} `{v}` is not a whole number of milliseconds up to 10000")
        })
    };
    Ok(Region {
        name: name.to_owned(),
        edge_rtt_ms: ms(edge, "edge RTT")?,
        nats_rtt_ms: ms(nats, "NATS RTT")?,
    })
}

/// A positive, finite number.
fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("`{s}` is not a positive number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        testing::parse(argv)
    }

    fn summary(p99: f64) -> StageSummary {
        StageSummary { count: 10, p99, ..StageSummary::default() }
    }

    #[test]
    fn regions_parse_and_default_to_three() {
        let regions = parse(&["global", "--out", "o"]).unwrap().regions();
        assert_eq!(regions.len(), 3);
        assert_eq!((regions[2].name.as_str(), regions[2].edge_rtt_ms), ("far", 120));
        let args =
            parse(&["global", "--out", "o", "--region", "a:5:1", "--region", "b-2:10:2"]).unwrap();
        assert_eq!(
            args.regions(),
            [
                Region { name: "a".into(), edge_rtt_ms: 5, nats_rtt_ms: 1 },
                Region { name: "b-2".into(), edge_rtt_ms: 10, nats_rtt_ms: 2 }
            ]
        );
        for bad in ["a:5", "a:5:1:2", "a.b:5:1", ":5:1", "a:x:1", "a:5:-1", "a:99999:1"] {
            assert!(parse_region(bad).is_err(), "{bad}");
        }
        let dup =
            parse(&["global", "--out", "o", "--region", "a:1:1", "--region", "a:2:2"]).unwrap();
        assert!(dup.validate().is_err());
    }

    #[test]
    fn the_floor_adds_each_leg_one_way() {
        let far = Region { name: "far".into(), edge_rtt_ms: 120, nats_rtt_ms: 30 };
        // 60 edge→relay + 15 relay→NATS + 15 NATS→consumer.
        assert_eq!(far.delivery_floor_ms(30), 90.0);
        assert_eq!(far.ack_floor_ms(), 150.0);
    }

    #[test]
    fn the_relay_share_takes_the_nats_round_trip_out() {
        let mut latency = Latency { window_secs: 10.0, unit: "us".into(), ..Latency::default() };
        for (name, window, since) in [
            ("ingest_to_ack", 13_000.0, 40_000.0),
            ("queue_wait", 2_000.0, 3_000.0),
            ("flush", 11_000.0, 12_000.0),
        ] {
            latency.stages.insert(
                name.into(),
                edgerelay_ops::top::latency::Stage {
                    window: summary(window),
                    since_start: summary(since),
                },
            );
        }
        let share =
            share_of(&latency, &[0.012, 0.0105, f64::NAN], 10, Duration::from_secs(10)).unwrap();
        assert_eq!(share.source, "window");
        assert_eq!((share.ingest_to_ack_p99_ms, share.nats_rtt_ms), (13.0, 10.5));
        assert_eq!(share.own_share_p99_ms, 2.5);
        assert_eq!(share.queue_wait_p99_ms, 2.0);
        // A run shorter than the window: since start; no probe value: the configured RTT.
        let share = share_of(&latency, &[], 10, Duration::from_secs(1)).unwrap();
        assert_eq!((share.source, share.nats_rtt_source), ("since_start", "configured"));
        assert_eq!(share.own_share_p99_ms, 30.0);
        // Never below zero.
        let share = share_of(&latency, &[0.5], 10, Duration::from_secs(10)).unwrap();
        assert_eq!(share.own_share_p99_ms, 0.0);
        latency.stages.clear();
        assert!(share_of(&latency, &[], 10, Duration::from_secs(10)).is_err());
    }

    #[test]
    fn the_nats_rtt_comes_from_the_gauge() {
        let text = "# TYPE edgerelay_nats_rtt_seconds gauge\n\
                    edgerelay_nats_rtt_seconds{cluster=\"default\"} 0.0123\n\
                    edgerelay_nats_rtt_seconds_other 5\n";
        assert_eq!(nats_rtt_seconds(text), Some(0.0123));
        assert_eq!(nats_rtt_seconds("edgerelay_nats_rtt_seconds{cluster=\"a\"} NaN\n"), None);
        assert_eq!(nats_rtt_seconds(""), None);
    }

    #[test]
    fn the_config_is_valid_toml_for_the_relay() {
        let region = Region { name: "near".into(), edge_rtt_ms: 20, nats_rtt_ms: 10 };
        let text = relay_config(
            &region,
            local(8443),
            local(9090),
            local(4222),
            Path::new("/tmp/we\"ird\\certs"),
            "tok",
        );
        let config = edgerelay::config::Config::parse(&text).unwrap();
        assert_eq!(config.relay.id, "near");
        assert_eq!(config.stream.subjects, ["global.>"]);
        assert_eq!(config.auth.static_tokens[0].allow, ["global.near.>"]);
        assert_eq!(config.https.tls_cert, Path::new("/tmp/we\"ird\\certs/cert.pem"));
        assert!(!config.audit.enabled);
    }
}
