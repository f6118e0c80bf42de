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
//!
//! # Layout
//!
//! - `topology`: the processes and proxies, and each relay's config.
//! - `share`: the relay's own share, from its admin listener.
//! - `summary`: `summary.json`, the markdown table, the arithmetic and the plot.

mod share;
mod summary;
mod topology;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use futures::future::join_all;
use tokio::sync::watch;
use tokio::time::timeout;

use crate::consume::{Acked, Consumer, Decoding, Source};
use crate::events::{self, EventArgs};
use crate::harness::Target;
use crate::mode::args::parse_positive;
use crate::mode::https::HttpVersion;
use crate::mode::{h3, https, quic, Mode};
use crate::model::{Measured, Summary};
use crate::report;
use crate::schedule::{parse_duration, RunArgs};
use crate::token::TokenArgs;
use share::{relay_share, sample_rtt};
use summary::{arithmetic, markdown, region_summary, svg, GlobalSummary};
use topology::{RegionSite, Topology};

/// The regions when no `--region` is given: name, edge RTT ms, relay↔NATS RTT ms.
const DEFAULT_REGIONS: [(&str, u64, u64); 3] =
    [("near", 20, 10), ("mid", 60, 20), ("far", 120, 30)];

/// The stream every relay publishes into, and the subjects it captures (`global.>`).
const STREAM: &str = "GLOBAL";
const SUBJECT_ROOT: &str = "global";

/// Time allowed around the measured run: starting the processes (each within
/// [`READY_TIMEOUT`], one after the other), scraping the relays and stopping everything.
const SET_UP_ALLOWANCE: Duration = Duration::from_secs(150);

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

    /// The relays' `batch.early_flushes_per_sec` [default: the relay's own default]: 0 is the
    /// rule before it existed (publish at once only when no batch is in flight).
    #[arg(long, value_name = "N")]
    early_flushes_per_sec: Option<u32>,

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

/// Every region's load, over one mode for all.
enum Loads {
    Https(Vec<Target<https::Args>>),
    H3(Vec<Target<h3::Args>>),
    Quic(Vec<Target<quic::Args>>),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        testing::parse(argv)
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
}
