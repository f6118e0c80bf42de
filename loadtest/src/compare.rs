//! `loadtest compare`: several modes one after the other, with the same offered load (or each
//! its own `--find-max` search), against a relay and NATS that are already running; the bare
//! server runs in-process. Ratios come from one invocation, so they compare like with like.
//!
//! Writes to `--out DIR`: `<mode>.hgrm` (send→answer), `<mode>-e2e.hgrm` (send→consumer, with
//! `--consume`), `summary.json` (every mode's summary plus the ratios), `table.txt` (what is
//! printed) and `percentiles.svg` (the percentile spectrum of every mode).
//!
//! Beyond the modes against one relay, for issue 5's targets from one run:
//! - `https-nobatch`: the https load against a second relay with batching off
//!   (`[batch] max_events = 1`, `--relay-https-nobatch`), its events on their own subjects;
//! - `quic-e1`: the quic mode with one event per request (`quic` uses `--events-per-request`);
//! - `--relay-pid` / `--relay-nobatch-pid`: relay CPU µs per event of every run;
//! - `--at-fraction F` (after `--find-max`): each mode again at F × its own max with the
//!   consumer on, plus the relay's exact ingest→ack from `/debug/latency` (`--relay-admin`),
//!   written as `<mode>-at-fraction.hgrm` and `percentiles-at-fraction.svg`;
//! - `targets` in `summary.json` and the table: each of the ratio targets with its
//!   measured value and PASS / MISS.
//!
//! The modes' own flag structs are filled from the shared flags here: one `--connections`,
//! `--concurrency`, token, CA and event shape for all, so only the protocol differs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use http::Uri;
use serde::Serialize;
use tokio::sync::watch;

use crate::bare::BareServer;
use crate::events::EventArgs;
use crate::harness::{HarnessArgs, Run, Target};
use crate::https::HttpVersion;
use crate::plot::{self, Series};
use crate::probe::{self, RelayLatency};
use crate::report::{self, FindMaxSummary, ReportArgs, Summary};
use crate::schedule::{parse_duration, RunArgs};
use crate::token::TokenArgs;
use crate::{direct_js, h3, https, quic};

/// Flags of `loadtest compare`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Modes to run, in order, comma-separated: https, https-nobatch, h3, quic, quic-e1,
    /// direct-js, bare.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "https,h3,quic,direct-js,bare"
    )]
    modes: Vec<ModeName>,

    /// Base URL of the relay's HTTPS listener (https mode).
    #[arg(long, value_name = "URL", default_value = "https://127.0.0.1:8443")]
    relay_https: Uri,

    /// Base URL of the HTTPS listener of a second relay with batching off (`[batch]
    /// max_events = 1`), for the https-nobatch mode: the https load, one JetStream message
    /// per event.
    #[arg(long, value_name = "URL")]
    relay_https_nobatch: Option<Uri>,

    /// Subjects of the https-nobatch mode: `{prefix}.0`... Only the batching-off relay's
    /// stream may hold them, so its consumer reads only its events.
    #[arg(long, value_name = "PREFIX", default_value = "edge.nobatch.load")]
    nobatch_subject_prefix: String,

    /// Process id of the batching-off relay: its CPU per event in the https-nobatch mode.
    /// (`--relay-pid` is the relay of https, h3, quic and quic-e1.)
    #[arg(long, value_name = "PID")]
    relay_nobatch_pid: Option<u32>,

    /// Admin listener of the relay (`http://HOST:PORT`): with --at-fraction its exact
    /// ingest→ack percentiles are read from `/debug/latency` (the 10 s window) after each run.
    #[arg(long, value_name = "URL")]
    relay_admin: Option<String>,

    /// Admin listener of the batching-off relay, like --relay-admin.
    #[arg(long, value_name = "URL")]
    relay_nobatch_admin: Option<String>,

    /// After --find-max, run every mode again at this fraction of its own max rate (e.g. 0.5),
    /// with the consumer on, and report send→answer, send→consumer and the relay's
    /// ingest→ack there.
    #[arg(long, value_name = "F", requires = "find_max", value_parser = parse_fraction)]
    at_fraction: Option<f64>,

    /// Measured duration of each --at-fraction run (after --warmup). Before a run with a relay
    /// admin URL the relay is left idle until warm-up + duration + idle ≥ the relay's 10 s
    /// window, so the window scraped after the run holds only that run's requests.
    #[arg(long, value_name = "DURATION", default_value = "8s", value_parser = parse_duration)]
    at_fraction_duration: Duration,

    /// UDP address of the relay's QUIC listener (h3 and quic modes).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8443")]
    relay_quic: String,

    /// NATS server: direct-js publishes there, and `--consume` reads from it.
    #[arg(long, value_name = "URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,

    /// PEM file with the CA that signed the relay's certificate.
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,

    /// TLS server name of the relay [default: the host of its URL / address]
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,

    #[command(flatten)]
    token: TokenArgs,

    /// HTTP version of the https and bare modes: 1 or 2.
    #[arg(long = "http", value_name = "VERSION", value_enum, default_value = "2")]
    http: HttpVersion,

    /// Connections per mode (https, h3, quic, bare; direct-js uses one NATS connection).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    connections: u32,

    /// Requests in flight at most per mode (direct-js: the ack window). quic: spread over
    /// --streams per connection, pipelined.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    concurrency: u32,

    /// quic: bidirectional streams per connection.
    #[arg(long, value_name = "M", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    streams: u32,

    /// quic: events per request (quic-e1 and the other modes send one event per request).
    #[arg(long, value_name = "E", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    events_per_request: u32,

    /// direct-js: the stream it publishes into (subjects `direct.load.>`), created if missing.
    #[arg(long, value_name = "NAME", default_value = "LOADTEST_DIRECT")]
    direct_stream: String,

    /// Serve this certificate (PEM, with --bare-key) from the bare server, e.g. the relay's,
    /// so both stacks do the same TLS work. Default: a throw-away certificate.
    #[arg(long, value_name = "FILE", requires = "bare_key")]
    bare_cert: Option<PathBuf>,

    /// Private key of --bare-cert.
    #[arg(long, value_name = "FILE", requires = "bare_cert")]
    bare_key: Option<PathBuf>,

    /// Where the bare server listens.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:0")]
    bare_listen: SocketAddr,

    /// Directory for the .hgrm files, summary.json, table.txt and percentiles.svg (created).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    #[command(flatten)]
    events: EventArgs,

    #[command(flatten)]
    run: RunArgs,

    #[command(flatten)]
    harness: HarnessArgs,
}

/// A mode `compare` can run.
#[derive(Clone, Copy, Debug, Eq, Ord, PartialEq, PartialOrd, clap::ValueEnum)]
enum ModeName {
    Https,
    HttpsNobatch,
    H3,
    Quic,
    QuicE1,
    DirectJs,
    Bare,
}

/// What `compare` learned about one mode.
struct Outcome {
    name: &'static str,
    /// The run reported (with `--find-max`: the run at the highest rate that met the SLO).
    run: Option<Run>,
    summary: Option<Summary>,
    /// Why the mode has no result (it failed to run, or no rate met the SLO).
    failed: Option<String>,
    /// With `--at-fraction`, once the mode has a max: the run at that fraction of it.
    at_fraction: Option<(AtFraction, Option<Run>)>,
}

/// One mode's `--at-fraction` run in `summary.json`.
#[derive(Clone, Debug, Serialize)]
struct AtFraction {
    fraction: f64,
    /// Offered events/s: `fraction` × the mode's max rate.
    rate: f64,
    /// Set when the run failed, with why.
    #[serde(skip_serializing_if = "Option::is_none")]
    failed: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<Summary>,
    /// The relay's own arrival→answer per request, from `/debug/latency`'s window scraped
    /// after the run (modes through a relay whose admin URL was given).
    #[serde(skip_serializing_if = "Option::is_none")]
    relay_ingest_to_ack_ms: Option<RelayLatency>,
    /// Why the relay's latency could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    relay_ingest_to_ack_error: Option<String>,
}

/// One of the targets, checked on this run.
#[derive(Clone, Debug, PartialEq, Serialize)]
struct TargetCheck {
    /// What is measured, e.g. `https max rate / bare max rate`.
    name: String,
    /// The objective, e.g. `>= 0.70`.
    objective: String,
    /// `null` when a mode it needs has no result.
    measured: Option<f64>,
    /// `PASS`, `MISS`, or `N/A` (not measured).
    verdict: &'static str,
}

/// How a target compares a measured value to its threshold.
#[derive(Clone, Copy, Debug)]
enum Objective {
    AtLeast(f64),
    Above(f64),
    Below(f64),
}

/// `summary.json`.
#[derive(Debug, Serialize)]
struct CompareSummary {
    /// The command line, for the record.
    command: String,
    /// Offered events/s (`null` with `--find-max` or a closed loop).
    offered_rate: Option<f64>,
    slo_p99_ms: Option<f64>,
    /// `--at-fraction`, if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    at_fraction: Option<f64>,
    modes: Vec<ModeSummary>,
    /// The targets that this run's modes can answer.
    targets: Vec<TargetCheck>,
}

/// One mode in `summary.json`.
#[derive(Debug, Serialize)]
struct ModeSummary {
    mode: &'static str,
    /// Set when the mode produced no result, with why.
    #[serde(skip_serializing_if = "Option::is_none")]
    failed: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<Summary>,
    /// This mode's rate (achieved; with `--find-max` the max rate) and p99 divided by the
    /// baseline's, per baseline in the run (`bare`, `direct-js`, `https-nobatch`).
    ratios: BTreeMap<&'static str, Ratio>,
    #[serde(skip_serializing_if = "Option::is_none")]
    at_fraction: Option<AtFraction>,
}

/// A mode against a baseline.
#[derive(Clone, Copy, Debug, Serialize)]
struct Ratio {
    rate: f64,
    p99: f64,
}

/// The modes compared against.
const BASELINES: [&str; 3] = ["bare", "direct-js", "https-nobatch"];

/// Modes whose requests go through a relay, in the order targets are listed.
const RELAY_MODES: [&str; 5] = ["https", "h3", "quic", "quic-e1", "https-nobatch"];

/// Ceiling of the relay's ingest→ack p99 at `--at-fraction` of max, ms (issue 5).
const INGEST_TO_ACK_P99_MS: f64 = 5.0;

impl Args {
    /// `https` flags aimed at `url`, trusting `ca`.
    fn https(&self, url: Uri, ca: PathBuf) -> https::Args {
        https::Args {
            url,
            server_name: self.server_name.clone(),
            ca: Some(ca),
            insecure: false,
            token: self.token.clone(),
            http: self.http,
            connections: self.connections,
            concurrency: self.concurrency,
            events: self.events.clone(),
            run: self.run.clone(),
            report: ReportArgs::default(),
            harness: self.harness.clone(),
        }
    }

    fn quic_target(&self) -> quic::Target {
        quic::Target {
            addr: self.relay_quic.clone(),
            server_name: self.server_name.clone(),
            ca: self.ca.clone(),
            token: self.token.clone(),
        }
    }

    /// The flags of mode `name`; the bare server must be running for `bare`.
    fn target(
        &self,
        name: ModeName,
        bare: Option<(&BareServer, &PathBuf)>,
    ) -> anyhow::Result<Target> {
        // Relay CPU is read only for the relay the mode loads.
        let relay_pid = match name {
            ModeName::Https | ModeName::H3 | ModeName::Quic | ModeName::QuicE1 => {
                self.harness.relay_pid
            }
            ModeName::HttpsNobatch => self.relay_nobatch_pid,
            ModeName::DirectJs | ModeName::Bare => None,
        };
        let harness = HarnessArgs { relay_pid, ..self.harness.clone() };
        Ok(match name {
            ModeName::Https => Target::Https(Box::new(https::Args {
                harness,
                ..self.https(self.relay_https.clone(), self.ca.clone())
            })),
            ModeName::HttpsNobatch => {
                let url = self.relay_https_nobatch.clone().context(
                    "the https-nobatch mode needs --relay-https-nobatch (a relay with batching off)",
                )?;
                let mut args = https::Args { harness, ..self.https(url, self.ca.clone()) };
                args.events.subject_prefix = Some(self.nobatch_subject_prefix.clone());
                Target::Https(Box::new(args))
            }
            ModeName::Bare => {
                let (server, ca) = bare.context("the bare server is not running")?;
                let url: Uri = format!("https://{}", server.addr()).parse()?;
                // The bare server's certificate is for localhost / 127.0.0.1 (or the relay's).
                let mut args = self.https(url, ca.clone());
                if self.bare_cert.is_none() {
                    args.server_name = None;
                }
                Target::Bare(Box::new(https::Args { harness, ..args }))
            }
            ModeName::H3 => {
                // A QUIC-port budget like the relay modes': `--concurrency` requests in flight.
                Target::H3(Box::new(h3::Args {
                    target: self.quic_target(),
                    connections: self.connections,
                    concurrency: self.concurrency,
                    events: self.events.clone(),
                    run: self.run.clone(),
                    report: ReportArgs::default(),
                    harness,
                }))
            }
            ModeName::Quic | ModeName::QuicE1 => {
                let lanes = self.connections * self.streams;
                Target::Quic(Box::new(quic::Args {
                    target: self.quic_target(),
                    connections: self.connections,
                    streams: self.streams,
                    in_flight: self.concurrency.div_ceil(lanes).max(1),
                    events_per_request: if name == ModeName::QuicE1 {
                        1
                    } else {
                        self.events_per_request
                    },
                    events: self.events.clone(),
                    run: self.run.clone(),
                    report: ReportArgs::default(),
                    harness,
                }))
            }
            ModeName::DirectJs => Target::DirectJs(Box::new(direct_js::Args {
                nats_url: self.nats.clone(),
                stream: self.direct_stream.clone(),
                connections: 1,
                max_inflight: self.concurrency,
                // Its own subjects, outside the relay's stream.
                events: EventArgs { subject_prefix: None, ..self.events.clone() },
                run: self.run.clone(),
                report: ReportArgs::default(),
                harness,
            })),
        })
    }

    /// The admin URL of the relay mode `name` loads, if given.
    fn admin(&self, name: ModeName) -> Option<&str> {
        match name {
            ModeName::Https | ModeName::H3 | ModeName::Quic | ModeName::QuicE1 => {
                self.relay_admin.as_deref()
            }
            ModeName::HttpsNobatch => self.relay_nobatch_admin.as_deref(),
            ModeName::DirectJs | ModeName::Bare => None,
        }
    }
}

impl ModeName {
    fn name(self) -> &'static str {
        match self {
            ModeName::Https => "https",
            ModeName::HttpsNobatch => "https-nobatch",
            ModeName::H3 => "h3",
            ModeName::Quic => "quic",
            ModeName::QuicE1 => "quic-e1",
            ModeName::DirectJs => "direct-js",
            ModeName::Bare => "bare",
        }
    }
}

impl Objective {
    fn met(self, value: f64) -> bool {
        match self {
            Objective::AtLeast(t) => value >= t,
            Objective::Above(t) => value > t,
            Objective::Below(t) => value < t,
        }
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Objective::AtLeast(t) => write!(f, ">= {t:.2}"),
            Objective::Above(t) => write!(f, "> {t:.2}"),
            Objective::Below(t) => write!(f, "< {t:.2}"),
        }
    }
}

impl TargetCheck {
    fn new(name: String, objective: Objective, measured: Option<f64>) -> Self {
        let measured = measured.filter(|v| v.is_finite());
        let verdict = match measured {
            Some(v) if objective.met(v) => "PASS",
            Some(_) => "MISS",
            None => "N/A",
        };
        Self { name, objective: objective.to_string(), measured, verdict }
    }
}

/// Runs `loadtest compare`.
pub async fn run(mut args: Args, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    // The consumer reads from the NATS server the modes publish to.
    if args.harness.consume.consume_nats.is_none() {
        args.harness.consume.consume_nats = Some(args.nats.clone());
    }
    ensure!(!args.modes.is_empty(), "--modes names no mode");
    let mut seen = args.modes.clone();
    seen.sort();
    seen.dedup();
    ensure!(seen.len() == args.modes.len(), "--modes names a mode twice");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    let bare = if args.modes.contains(&ModeName::Bare) {
        let cert_key = args.bare_cert.as_ref().zip(args.bare_key.as_ref());
        let server = BareServer::start(args.bare_listen, cert_key).await?;
        let ca = match server.ca_pem() {
            Some(pem) => {
                let path = args.out.join("bare-ca.pem");
                report::write(&path, pem)?;
                path
            }
            None => args.ca.clone(),
        };
        eprintln!("compare: bare server on https://{}", server.addr());
        Some((server, ca))
    } else {
        None
    };

    let mut outcomes = Vec::new();
    for &mode in &args.modes {
        if *stop.borrow() {
            break;
        }
        eprintln!("compare: {} ...", mode.name());
        let target = args.target(mode, bare.as_ref().map(|(s, ca)| (s, ca)))?;
        let mut outcome = measure_mode(&args, mode.name(), &target, stop.clone()).await;
        if let (Some(fraction), Some(max)) =
            (args.at_fraction, outcome.summary.as_ref().map(rate_of))
        {
            if !*stop.borrow() {
                let admin = args.admin(mode);
                outcome.at_fraction = Some(
                    at_fraction(&args, &outcome, &target, admin, fraction, max, stop.clone()).await,
                );
            }
        }
        outcomes.push(outcome);
    }

    for outcome in &outcomes {
        if let Some(run) = &outcome.run {
            let path = args.out.join(format!("{}.hgrm", outcome.name));
            report::write(&path, &report::hgrm(&run.measurements.latency))?;
            if let Some(e2e) = &run.e2e {
                report::write(&report::e2e_path(&path), &report::hgrm(&e2e.latency))?;
            }
        }
        if let Some((_, Some(run))) = &outcome.at_fraction {
            let path = args.out.join(format!("{}-at-fraction.hgrm", outcome.name));
            report::write(&path, &report::hgrm(&run.measurements.latency))?;
            if let Some(e2e) = &run.e2e {
                report::write(&report::e2e_path(&path), &report::hgrm(&e2e.latency))?;
            }
        }
    }
    let summary = compare_summary(&args, outcomes.iter());
    let table = table(&summary, args.harness.find_max.find_max);
    print!("{table}");
    report::write(&args.out.join("table.txt"), &table)?;
    report::write_json(&args.out.join("summary.json"), &summary)?;
    report::write(&args.out.join("percentiles.svg"), &svg(&args, &outcomes))?;
    if let Some(fraction) = args.at_fraction {
        report::write(
            &args.out.join("percentiles-at-fraction.svg"),
            &svg_at_fraction(&args, fraction, &outcomes),
        )?;
    }
    println!("wrote {}/{{summary.json,table.txt,percentiles*.svg,*.hgrm}}", args.out.display());
    let mut failed: Vec<String> =
        outcomes.iter().filter(|o| o.failed.is_some()).map(|o| o.name.to_owned()).collect();
    failed.extend(
        outcomes
            .iter()
            .filter(|o| o.at_fraction.as_ref().is_some_and(|(a, _)| a.failed.is_some()))
            .map(|o| format!("{} (at fraction)", o.name)),
    );
    ensure!(failed.is_empty(), "no result for: {}", failed.join(", "));
    Ok(())
}

/// One mode: a run at the shared rate, or a `--find-max` search. A mode that fails is reported
/// as such; the others still run.
async fn measure_mode(
    args: &Args,
    name: &'static str,
    target: &Target,
    stop: watch::Receiver<bool>,
) -> Outcome {
    let harness = &args.harness;
    let failed = |why: String| {
        eprintln!("compare: {name}: {why}");
        Outcome { name, run: None, summary: None, failed: Some(why), at_fraction: None }
    };
    let ok = |run: Run, summary: Summary| Outcome {
        name,
        run: Some(run),
        summary: Some(summary),
        failed: None,
        at_fraction: None,
    };
    if harness.find_max.find_max {
        match target.find_max(&args.run, &harness.consume, &harness.find_max, stop).await {
            Ok(found) => {
                eprint!("{}", report::steps_table(&found));
                let find_max = FindMaxSummary::of(&found);
                match found.best {
                    Some(run) => {
                        let mut summary = Summary::of_run(name.to_owned(), &run);
                        summary.find_max = Some(find_max);
                        ok(run, summary)
                    }
                    None => failed(format!(
                        "no rate tried met p99 <= {} ms without errors",
                        found.slo_p99_ms
                    )),
                }
            }
            Err(error) => failed(format!("{error:#}")),
        }
    } else {
        match target.run(&args.run, &harness.consume, stop).await {
            Ok(run) => {
                let summary = Summary::of_run(name.to_owned(), &run);
                ok(run, summary)
            }
            Err(error) => failed(format!("{error:#}")),
        }
    }
}

/// `--at-fraction`: the mode again at `fraction` × its `max` rate with the consumer on, then
/// (with the relay's `admin` URL) the relay's ingest→ack over its `/debug/latency` window.
async fn at_fraction(
    args: &Args,
    outcome: &Outcome,
    target: &Target,
    admin: Option<&str>,
    fraction: f64,
    max: f64,
    stop: watch::Receiver<bool>,
) -> (AtFraction, Option<Run>) {
    let name = outcome.name;
    let rate = (max * fraction).round().max(1.0);
    let mut result = AtFraction {
        fraction,
        rate,
        failed: None,
        summary: None,
        relay_ingest_to_ack_ms: None,
        relay_ingest_to_ack_error: None,
    };
    let run_args = RunArgs { rate, duration: args.at_fraction_duration, ..args.run.clone() };
    if admin.is_some() {
        // Let earlier (faster) runs age out of the relay's window before this one starts.
        let window = Duration::from_secs(edgerelay::metrics::latency::WINDOW_SECS + 1);
        let idle = window.saturating_sub(run_args.warmup + run_args.duration);
        if !idle.is_zero() {
            eprintln!("compare: {name}: relay idle for {idle:?} so its 10 s window holds one run");
            let mut stop = stop.clone();
            let _ = tokio::time::timeout(idle, stop.wait_for(|s| *s)).await;
        }
    }
    eprintln!("compare: {name} at {fraction} of {max:.0}/s: {rate:.0}/s ...");
    let mut consume = args.harness.consume.clone();
    consume.consume = true;
    let run = match target.run(&run_args, &consume, stop).await {
        Ok(run) => run,
        Err(error) => {
            let why = format!("{error:#}");
            eprintln!("compare: {name} at {fraction}: {why}");
            result.failed = Some(why);
            return (result, None);
        }
    };
    if let Some(admin) = admin {
        match probe::ingest_to_ack(admin).await {
            Ok(latency) => result.relay_ingest_to_ack_ms = Some(latency),
            Err(error) => {
                let why = format!("{error:#}");
                eprintln!("compare: {name}: relay latency: {why}");
                result.relay_ingest_to_ack_error = Some(why);
            }
        }
    }
    result.summary = Some(Summary::of_run(name.to_owned(), &run));
    (result, Some(run))
}

/// Parses `--at-fraction`: a number in (0, 1].
fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("`{s}` is not a fraction in (0, 1]")),
    }
}

/// The rate a mode is compared on: its max with `--find-max`, else what it achieved.
fn rate_of(summary: &Summary) -> f64 {
    summary.find_max.as_ref().and_then(|f| f.max_rate).unwrap_or(summary.achieved_rate)
}

fn compare_summary<'a>(
    args: &Args,
    outcomes: impl Iterator<Item = &'a Outcome> + Clone,
) -> CompareSummary {
    let baseline =
        |name: &str| outcomes.clone().find(|o| o.name == name).and_then(|o| o.summary.clone());
    let baselines: Vec<(&'static str, Summary)> =
        BASELINES.iter().filter_map(|b| baseline(b).map(|s| (*b, s))).collect();
    let modes: Vec<ModeSummary> = outcomes
        .map(|o| {
            let ratios = match &o.summary {
                Some(summary) => baselines
                    .iter()
                    .filter(|(b, _)| *b != o.name)
                    .map(|(b, base)| {
                        let ratio = |x: f64, y: f64| if y > 0.0 { round2(x / y) } else { f64::NAN };
                        (
                            *b,
                            Ratio {
                                rate: ratio(rate_of(summary), rate_of(base)),
                                p99: ratio(summary.latency_ms.p99, base.latency_ms.p99),
                            },
                        )
                    })
                    .collect(),
                None => BTreeMap::new(),
            };
            ModeSummary {
                mode: o.name,
                failed: o.failed.clone(),
                summary: o.summary.clone(),
                ratios,
                at_fraction: o.at_fraction.as_ref().map(|(a, _)| a.clone()),
            }
        })
        .collect();
    let targets = targets(&modes, args.at_fraction);
    CompareSummary {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        offered_rate: (!args.harness.find_max.find_max && args.run.rate > 0.0)
            .then_some(args.run.rate),
        slo_p99_ms: args.harness.find_max.slo_p99_ms,
        at_fraction: args.at_fraction,
        modes,
        targets,
    }
}

/// Issue 5's targets that the modes of this run can answer; a target is listed when every
/// mode it needs was run (N/A when one of them has no result).
fn targets(modes: &[ModeSummary], at_fraction: Option<f64>) -> Vec<TargetCheck> {
    let find = |name: &str| modes.iter().find(|m| m.mode == name);
    let rate = |name: &str| find(name).and_then(|m| m.summary.as_ref()).map(rate_of);
    let mut checks = Vec::new();
    for (mode, base, objective) in [
        ("https", "bare", Objective::AtLeast(0.7)),
        ("https", "https-nobatch", Objective::Above(1.0)),
        ("quic", "direct-js", Objective::AtLeast(4.0)),
    ] {
        if find(mode).is_none() || find(base).is_none() {
            continue;
        }
        let ratio = rate(mode).zip(rate(base)).filter(|(_, b)| *b > 0.0).map(|(m, b)| m / b);
        checks.push(TargetCheck::new(
            format!("{mode} max rate / {base} max rate"),
            objective,
            ratio.map(round2),
        ));
    }
    if let Some(fraction) = at_fraction {
        for mode in RELAY_MODES.iter().filter(|m| **m != "https-nobatch") {
            let Some(m) = find(mode) else { continue };
            let p99 = m
                .at_fraction
                .as_ref()
                .and_then(|a| a.relay_ingest_to_ack_ms.as_ref())
                .filter(|l| l.count > 0)
                .map(|l| l.p99);
            checks.push(TargetCheck::new(
                format!("{mode}: relay ingest->ack p99 ms at {fraction} of max"),
                Objective::Below(INGEST_TO_ACK_P99_MS),
                p99,
            ));
        }
    }
    checks
}

/// Two decimals (NaN stays NaN, written as `null` in JSON).
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The percentile table: one row per mode (send→answer), one more per mode with `--consume`
/// (send→consumer), and the ratios of rate and p99 to each baseline in the run.
fn table(summary: &CompareSummary, find_max: bool) -> String {
    let mut out = String::new();
    let rate = match (find_max, summary.offered_rate) {
        (true, _) => format!("max rate with p99 <= {} ms", summary.slo_p99_ms.unwrap_or_default()),
        (false, Some(r)) => format!("offered {r}/s to every mode"),
        (false, None) => "closed loop (as fast as answered)".to_owned(),
    };
    let _ = writeln!(out, "loadtest compare: {rate}; latency in ms from the intended send time");
    out.push_str(&header());
    let present: Vec<&str> = BASELINES
        .iter()
        .copied()
        .filter(|b| summary.modes.iter().any(|m| m.mode == *b && m.summary.is_some()))
        .collect();
    for b in &present {
        let _ = write!(out, " {:>14}", format!("×{b} rate/p99"));
    }
    out.push('\n');
    for m in &summary.modes {
        let Some(s) = &m.summary else {
            let _ =
                writeln!(out, "{:<20} no result: {}", m.mode, m.failed.as_deref().unwrap_or("-"));
            continue;
        };
        let offered = s.offered_rate.map_or_else(|| "max".to_owned(), |r| format!("{r:.0}"));
        let l = &s.latency_ms;
        let _ = write!(
            out,
            "{:<24} {:>10} {:>11.1} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9}",
            format!("{} send->{}", m.mode, answer_of(m.mode)),
            offered,
            s.achieved_rate,
            s.error_total,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            cpu_of(s)
        );
        for b in &present {
            match m.ratios.get(b) {
                Some(r) => {
                    let _ = write!(out, " {:>14}", format!("{:.2}/{:.2}", r.rate, r.p99));
                }
                None => {
                    let _ = write!(out, " {:>14}", "-");
                }
            }
        }
        out.push('\n');
        e2e_row(&mut out, m.mode, s);
    }
    if !present.is_empty() {
        let _ = writeln!(
            out,
            "×baseline: this mode's {} and p99 divided by the baseline's",
            if find_max { "max rate" } else { "achieved rate" }
        );
    }
    if let Some(fraction) = summary.at_fraction {
        at_fraction_table(&mut out, summary, fraction);
    }
    if !summary.targets.is_empty() {
        let _ = writeln!(out, "\ntargets (issue 5):");
        for t in &summary.targets {
            let measured = t.measured.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
            let _ = writeln!(
                out,
                "  {:<4}  {:<52} {:>8}  (target {})",
                t.verdict, t.name, measured, t.objective
            );
        }
    }
    out
}

/// What ends a request of `mode`.
fn answer_of(mode: &str) -> &'static str {
    if mode == "direct-js" {
        "ack"
    } else {
        "202"
    }
}

/// The relay CPU column: µs per event, `-` when not measured.
fn cpu_of(s: &Summary) -> String {
    s.relay_cpu_us_per_event.map_or_else(|| "-".to_owned(), |c| format!("{c:.1}"))
}

/// The send→consumer row under a mode's row, with `--consume`.
fn e2e_row(out: &mut String, mode: &str, s: &Summary) {
    if let Some(e2e) = &s.e2e {
        let e = &e2e.latency_ms;
        let _ = writeln!(
            out,
            "{:<24} {:>10} {:>11} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  seen {}/{}, missing {}",
            format!("{mode} ->consumer"),
            "",
            "",
            "",
            e.p50,
            e.p90,
            e.p99,
            e.p999,
            e.max,
            e2e.seen,
            e2e.expected,
            e2e.missing
        );
    }
}

/// The `--at-fraction` runs: send→answer, send→consumer and the relay's own ingest→ack.
/// The column titles of both tables (no newline).
fn header() -> String {
    format!(
        "{:<24} {:>10} {:>11} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "mode",
        "offered/s",
        "achieved/s",
        "errors",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "CPU µs/ev"
    )
}

fn at_fraction_table(out: &mut String, summary: &CompareSummary, fraction: f64) {
    let _ = writeln!(
        out,
        "\nat {fraction} of each mode's max rate, consumer on (relay ingest->ack: /debug/latency, \
         last 10 s, per request)"
    );
    out.push_str(&header());
    out.push('\n');
    for m in &summary.modes {
        let Some(at) = &m.at_fraction else { continue };
        let Some(s) = &at.summary else {
            let _ =
                writeln!(out, "{:<24} no result: {}", m.mode, at.failed.as_deref().unwrap_or("-"));
            continue;
        };
        let l = &s.latency_ms;
        let _ = writeln!(
            out,
            "{:<24} {:>10.0} {:>11.1} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9}",
            format!("{} send->{}", m.mode, answer_of(m.mode)),
            at.rate,
            s.achieved_rate,
            s.error_total,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            cpu_of(s)
        );
        e2e_row(out, m.mode, s);
        if let Some(r) = &at.relay_ingest_to_ack_ms {
            let _ = writeln!(
                out,
                "{:<24} {:>10} {:>11} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {} requests",
                format!("{} relay ingest->ack", m.mode),
                "",
                "",
                "",
                r.p50,
                r.p90,
                r.p99,
                r.p999,
                r.max,
                r.count
            );
        } else if let Some(why) = &at.relay_ingest_to_ack_error {
            let _ = writeln!(out, "{:<24} relay ingest->ack unavailable: {why}", m.mode);
        }
    }
}

/// The percentile spectrum of every mode (send→consumer dashed under its mode).
fn svg(args: &Args, outcomes: &[Outcome]) -> String {
    let mut series = Vec::new();
    for o in outcomes {
        if let Some(run) = &o.run {
            series.push(Series::of(
                format!("{} send->answer", o.name),
                &run.measurements.latency,
                false,
            ));
            if let Some(e2e) = &run.e2e {
                series.push(Series::of(format!("{} send->consumer", o.name), &e2e.latency, true));
            }
        }
    }
    let title = if args.harness.find_max.find_max {
        "loadtest compare: each mode at its max rate under the SLO".to_owned()
    } else if args.run.rate > 0.0 {
        format!("loadtest compare: {} events/s offered", args.run.rate)
    } else {
        "loadtest compare: closed loop".to_owned()
    };
    plot::spectrum(&title, &series, args.harness.find_max.slo_p99_ms)
}

/// The percentile spectrum of every mode's `--at-fraction` run.
fn svg_at_fraction(args: &Args, fraction: f64, outcomes: &[Outcome]) -> String {
    let mut series = Vec::new();
    for o in outcomes {
        if let Some((at, Some(run))) = &o.at_fraction {
            let name = format!("{} {:.0}/s", o.name, at.rate);
            series.push(Series::of(
                format!("{name} send->answer"),
                &run.measurements.latency,
                false,
            ));
            if let Some(e2e) = &run.e2e {
                series.push(Series::of(format!("{name} send->consumer"), &e2e.latency, true));
            }
        }
    }
    let title = format!("loadtest compare: each mode at {fraction} of its max rate");
    plot::spectrum(&title, &series, args.harness.find_max.slo_p99_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn flags_parse_and_fill_every_mode() {
        let cli = Cli::try_parse_from([
            "compare",
            "--ca",
            "ca.pem",
            "--token",
            "t",
            "--rate",
            "500",
            "--out",
            "o",
            "--modes",
            "https,quic,direct-js,bare",
            "--consume",
            "--concurrency",
            "64",
        ])
        .unwrap();
        let args = cli.args;
        assert_eq!(
            args.modes,
            [ModeName::Https, ModeName::Quic, ModeName::DirectJs, ModeName::Bare]
        );
        assert!(args.harness.consume.consume);
        let Target::Quic(quic) = args.target(ModeName::Quic, None).unwrap() else { panic!() };
        // 4 connections × 4 streams × 4 pipelined = 64 in flight.
        assert_eq!(quic.in_flight, 4);
        assert!(quic.harness.consume.consume);
        let Target::DirectJs(js) = args.target(ModeName::DirectJs, None).unwrap() else { panic!() };
        assert_eq!(js.max_inflight, 64);
        assert!(args.target(ModeName::Bare, None).is_err());
    }

    #[test]
    fn nobatch_and_e1_modes_load_their_own_relay() {
        let cli = Cli::try_parse_from([
            "compare",
            "--ca",
            "ca.pem",
            "--token",
            "t",
            "--rate",
            "500",
            "--out",
            "o",
            "--modes",
            "https,https-nobatch,quic,quic-e1,direct-js",
            "--events-per-request",
            "16",
            "--relay-https-nobatch",
            "https://127.0.0.1:9443",
            "--relay-pid",
            "11",
            "--relay-nobatch-pid",
            "22",
        ])
        .unwrap();
        let args = cli.args;
        let Target::Https(https) = args.target(ModeName::Https, None).unwrap() else { panic!() };
        assert_eq!(https.harness.relay_pid, Some(11));
        assert_eq!(https.events.subject_prefix, None);
        let Target::Https(nobatch) = args.target(ModeName::HttpsNobatch, None).unwrap() else {
            panic!()
        };
        assert_eq!(nobatch.url, "https://127.0.0.1:9443");
        assert_eq!(nobatch.harness.relay_pid, Some(22));
        assert_eq!(nobatch.events.subject_prefix.as_deref(), Some("edge.nobatch.load"));
        let Target::Quic(quic) = args.target(ModeName::Quic, None).unwrap() else { panic!() };
        assert_eq!(quic.events_per_request, 16);
        let Target::Quic(e1) = args.target(ModeName::QuicE1, None).unwrap() else { panic!() };
        assert_eq!(e1.events_per_request, 1);
        assert_eq!(e1.harness.relay_pid, Some(11));
        let Target::DirectJs(js) = args.target(ModeName::DirectJs, None).unwrap() else { panic!() };
        assert_eq!(js.harness.relay_pid, None);

        let without = Cli::try_parse_from([
            "compare", "--ca", "c", "--token", "t", "--rate", "5", "--out", "o",
        ])
        .unwrap();
        let err = without.args.target(ModeName::HttpsNobatch, None).unwrap_err();
        assert!(err.to_string().contains("--relay-https-nobatch"), "{err}");
    }

    #[test]
    fn at_fraction_needs_find_max_and_a_fraction() {
        let base = ["compare", "--ca", "c", "--token", "t", "--rate", "5", "--out", "o"];
        assert!(Cli::try_parse_from(base.iter().chain(&["--at-fraction", "0.5"])).is_err());
        let find = ["--find-max", "--slo-p99-ms", "25", "--at-fraction"];
        let ok = Cli::try_parse_from(base.iter().chain(&find).chain(&["0.5"])).unwrap();
        assert_eq!(ok.args.at_fraction, Some(0.5));
        assert_eq!(ok.args.at_fraction_duration, Duration::from_secs(8));
        for bad in ["0", "1.5", "-1", "half"] {
            assert!(Cli::try_parse_from(base.iter().chain(&find).chain(&[bad])).is_err(), "{bad}");
        }
    }

    /// A mode that achieved `rate` events/s (its max, as far as the targets can tell).
    fn mode(name: &'static str, rate: Option<f64>, ingest_p99_ms: Option<f64>) -> ModeSummary {
        use crate::report::RunInfo;
        use crate::schedule::{Measurements, Schedule, Tally};
        let summary = rate.map(|rate| {
            let schedule =
                Schedule::open(rate, 1, Duration::from_secs(1), Duration::from_secs(1)).unwrap();
            let measured = Measurements {
                latency: report::histogram(),
                queueing: report::histogram(),
                measured: Tally { ok: rate as u64, failed: BTreeMap::new() },
                warmup: Tally::default(),
                acked: Vec::new(),
                window: Duration::from_secs(1),
                interrupted: false,
            };
            let info = RunInfo {
                mode: "https",
                http: None,
                connections: 1,
                concurrency: 1,
                answer: "202",
                detail: None,
            };
            Summary::new(name.to_owned(), &info, &schedule, &measured)
        });
        let at_fraction = ingest_p99_ms.map(|p99| AtFraction {
            fraction: 0.5,
            rate: 1.0,
            failed: None,
            summary: None,
            relay_ingest_to_ack_ms: Some(RelayLatency { count: 10, p99, ..Default::default() }),
            relay_ingest_to_ack_error: None,
        });
        ModeSummary {
            mode: name,
            failed: rate.is_none().then(|| "no rate met the SLO".to_owned()),
            summary,
            ratios: BTreeMap::new(),
            at_fraction,
        }
    }

    #[test]
    fn targets_are_ratios_with_a_verdict() {
        let modes = [
            mode("https", Some(7000.0), Some(2.5)),
            mode("https-nobatch", Some(8000.0), Some(1.0)),
            mode("h3", Some(5000.0), Some(6.0)),
            mode("quic", Some(40_000.0), None),
            mode("direct-js", Some(10_000.0), None),
            mode("bare", Some(10_000.0), None),
        ];
        let checks = targets(&modes, Some(0.5));
        let verdicts: Vec<(&str, Option<f64>, &str)> =
            checks.iter().map(|c| (c.name.as_str(), c.measured, c.verdict)).collect();
        assert_eq!(
            verdicts,
            [
                ("https max rate / bare max rate", Some(0.7), "PASS"),
                ("https max rate / https-nobatch max rate", Some(0.88), "MISS"),
                ("quic max rate / direct-js max rate", Some(4.0), "PASS"),
                ("https: relay ingest->ack p99 ms at 0.5 of max", Some(2.5), "PASS"),
                ("h3: relay ingest->ack p99 ms at 0.5 of max", Some(6.0), "MISS"),
                ("quic: relay ingest->ack p99 ms at 0.5 of max", None, "N/A"),
            ]
        );
        assert_eq!(checks[0].objective, ">= 0.70");
        assert_eq!(checks[1].objective, "> 1.00");
        assert_eq!(checks[3].objective, "< 5.00");
    }

    #[test]
    fn targets_need_their_modes() {
        // Only the targets whose modes ran; a mode without a result gives N/A.
        let modes = [mode("quic", Some(1000.0), None), mode("direct-js", None, None)];
        let checks = targets(&modes, None);
        assert_eq!(checks.len(), 1);
        assert_eq!((checks[0].measured, checks[0].verdict), (None, "N/A"));
        assert!(targets(&[mode("https", Some(1.0), Some(1.0))], None).is_empty());
    }

    #[test]
    fn find_max_needs_an_slo() {
        let base = ["compare", "--ca", "c", "--token", "t", "--rate", "5", "--out", "o"];
        let err = Cli::try_parse_from(base.iter().chain(&["--find-max"])).unwrap_err();
        assert!(err.to_string().contains("--slo-p99-ms"), "{err}");
        assert!(
            Cli::try_parse_from(base.iter().chain(&["--find-max", "--slo-p99-ms", "100"])).is_ok()
        );
        assert!(Cli::try_parse_from(base.iter().chain(&["--modes", "https,smtp"])).is_err());
    }
}
