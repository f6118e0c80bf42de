//! `loadtest compare`: several modes one after the other, with the same offered load (or each
//! its own `--find-max` search), against a relay and NATS that are already running; the bare
//! server runs in-process. Ratios come from one invocation, so they compare like with like.
//!
//! Writes to `--out DIR`: `<mode>.hgrm` (send→answer), `<mode>-e2e.hgrm` (send→consumer, with
//! `--consume`), `summary.json` (every mode's summary plus the ratios), `table.txt` (what is
//! printed) and `percentiles.svg` (the percentile spectrum of every mode).
//!
//! Beyond the modes against one relay:
//! - `https-nobatch`: the https load against a second relay with batching off
//!   (`[batch] max_events = 1`, `--relay-https-nobatch`), its events on their own subjects;
//! - `quic-e1`: the quic mode with one event per request (`quic` uses `--events-per-request`);
//! - `--relay-pid` / `--relay-nobatch-pid`: relay CPU µs per event of every run;
//! - `--at-fraction F` (after `--find-max`): each mode again at F × its own max with the
//!   consumer on, plus the relay's exact ingest→ack from `/debug/latency` (`--relay-admin`),
//!   written as `<mode>-at-fraction.hgrm` and `percentiles-at-fraction.svg`.
//!
//! The table and `summary.json` hold measurements and ratios only; what counts as good enough
//! is for the scripts and documents that read them to say.
//!
//! The modes' own flag structs are filled from the shared flags here: one `--connections`,
//! `--concurrency`, token, CA and event shape for all, so only the protocol differs.

mod summary;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use http::Uri;
use serde::Serialize;
use tokio::sync::watch;

use crate::events::EventArgs;
use crate::harness::{HarnessArgs, Target};
use crate::mode::bare::{Bare, BareServer};
use crate::mode::https::HttpVersion;
use crate::mode::{direct_js, h3, https, quic, Mode};
use crate::model::{FindMaxSummary, Run, Summary};
use crate::probe::{self, RelayLatency};
use crate::report;
use crate::schedule::{parse_duration, RunArgs};
use crate::token::TokenArgs;
use summary::{compare_summary, svg, svg_at_fraction, table};

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

    /// `mode` with the shared event shape and the relay `name` loads (whose CPU is read).
    fn target<M>(&self, name: ModeName, mode: M) -> Target<M> {
        let relay_pid = match name {
            ModeName::Https | ModeName::H3 | ModeName::Quic | ModeName::QuicE1 => {
                self.harness.relay_pid
            }
            ModeName::HttpsNobatch => self.relay_nobatch_pid,
            ModeName::DirectJs | ModeName::Bare => None,
        };
        Target { mode, events: self.events.clone(), relay_pid }
    }

    /// `https` against the relay, or `https-nobatch` against the batching-off one.
    fn https_target(&self, name: ModeName) -> anyhow::Result<Target<https::Args>> {
        if name != ModeName::HttpsNobatch {
            return Ok(self.target(name, self.https(self.relay_https.clone(), self.ca.clone())));
        }
        let url = self.relay_https_nobatch.clone().context(
            "the https-nobatch mode needs --relay-https-nobatch (a relay with batching off)",
        )?;
        let mut target = self.target(name, self.https(url, self.ca.clone()));
        target.events.subject_prefix = Some(self.nobatch_subject_prefix.clone());
        Ok(target)
    }

    /// `bare`: the https load against the bare server, which must be running.
    fn bare_target(&self, bare: Option<(&BareServer, &PathBuf)>) -> anyhow::Result<Target<Bare>> {
        let (server, ca) = bare.context("the bare server is not running")?;
        let url: Uri = format!("https://{}", server.addr()).parse()?;
        // The bare server's certificate is for localhost / 127.0.0.1 (or the relay's).
        let mut args = self.https(url, ca.clone());
        if self.bare_cert.is_none() {
            args.server_name = None;
        }
        Ok(self.target(ModeName::Bare, Bare(args)))
    }

    /// `h3`: a QUIC-port budget like the relay modes', `--concurrency` requests in flight.
    fn h3_target(&self) -> Target<h3::Args> {
        let args = h3::Args {
            target: self.quic_target(),
            connections: self.connections,
            concurrency: self.concurrency,
        };
        self.target(ModeName::H3, args)
    }

    /// `quic` with `--events-per-request`, or `quic-e1` with one event per request.
    fn quic_mode_target(&self, name: ModeName) -> Target<quic::Args> {
        let events_per_request = if name == ModeName::QuicE1 { 1 } else { self.events_per_request };
        let args = quic::Args::spread(
            self.quic_target(),
            self.connections,
            self.streams,
            self.concurrency,
            events_per_request,
        );
        self.target(name, args)
    }

    fn direct_js_target(&self) -> Target<direct_js::Args> {
        let args = direct_js::Args {
            nats_url: self.nats.clone(),
            stream: self.direct_stream.clone(),
            connections: 1,
            max_inflight: self.concurrency,
        };
        let mut target = self.target(ModeName::DirectJs, args);
        // Its own subjects, outside the relay's stream.
        target.events.subject_prefix = None;
        target
    }

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
        let bare = bare.as_ref().map(|(s, ca)| (s, ca));
        let stop = stop.clone();
        let outcome = match mode {
            ModeName::Https | ModeName::HttpsNobatch => {
                compare_mode(&args, mode, &args.https_target(mode)?, stop).await
            }
            ModeName::Bare => compare_mode(&args, mode, &args.bare_target(bare)?, stop).await,
            ModeName::H3 => compare_mode(&args, mode, &args.h3_target(), stop).await,
            ModeName::Quic | ModeName::QuicE1 => {
                compare_mode(&args, mode, &args.quic_mode_target(mode), stop).await
            }
            ModeName::DirectJs => compare_mode(&args, mode, &args.direct_js_target(), stop).await,
        };
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

/// One mode: [`measure_mode`], then with `--at-fraction` and a result [`at_fraction`].
async fn compare_mode<M: Mode>(
    args: &Args,
    mode: ModeName,
    target: &Target<M>,
    stop: watch::Receiver<bool>,
) -> Outcome {
    let mut outcome = measure_mode(args, mode.name(), target, stop.clone()).await;
    if let (Some(fraction), Some(max)) = (args.at_fraction, outcome.summary.as_ref().map(rate_of)) {
        if !*stop.borrow() {
            let admin = args.admin(mode);
            outcome.at_fraction =
                Some(at_fraction(args, &outcome, target, admin, fraction, max, stop).await);
        }
    }
    outcome
}

/// One mode: a run at the shared rate, or a `--find-max` search. A mode that fails is reported
/// as such; the others still run.
async fn measure_mode<M: Mode>(
    args: &Args,
    name: &'static str,
    target: &Target<M>,
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
async fn at_fraction<M: Mode>(
    args: &Args,
    outcome: &Outcome,
    target: &Target<M>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    /// What every `compare` needs.
    const BASE: [&str; 9] =
        ["compare", "--ca", "ca.pem", "--token", "t", "--rate", "500", "--out", "o"];

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        testing::parse(argv)
    }

    #[test]
    fn flags_parse_and_fill_every_mode() {
        let args = parse(
            &[
                &BASE[..],
                &["--modes", "https,quic,direct-js,bare", "--consume", "--concurrency", "64"],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(
            args.modes,
            [ModeName::Https, ModeName::Quic, ModeName::DirectJs, ModeName::Bare]
        );
        // Every mode's run gets the consumer of the shared flags.
        assert!(args.harness.consume.consume);
        let quic = args.quic_mode_target(ModeName::Quic).mode;
        // 4 connections × 4 streams × 4 pipelined = 64 in flight.
        assert_eq!(quic.in_flight, 4);
        let js = args.direct_js_target().mode;
        assert_eq!(js.max_inflight, 64);
        assert!(args.bare_target(None).is_err());
    }

    #[test]
    fn nobatch_and_e1_modes_load_their_own_relay() {
        let args = parse(
            &[
                &BASE[..],
                &[
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
                ],
            ]
            .concat(),
        )
        .unwrap();
        let https = args.https_target(ModeName::Https).unwrap();
        assert_eq!(https.relay_pid, Some(11));
        assert_eq!(https.events.subject_prefix, None);
        let nobatch = args.https_target(ModeName::HttpsNobatch).unwrap();
        assert_eq!(nobatch.mode.url, "https://127.0.0.1:9443");
        assert_eq!(nobatch.relay_pid, Some(22));
        assert_eq!(nobatch.events.subject_prefix.as_deref(), Some("edge.nobatch.load"));
        let quic = args.quic_mode_target(ModeName::Quic);
        assert_eq!(quic.mode.events_per_request, 16);
        let e1 = args.quic_mode_target(ModeName::QuicE1);
        assert_eq!(e1.mode.events_per_request, 1);
        assert_eq!(e1.relay_pid, Some(11));
        let js = args.direct_js_target();
        assert_eq!(js.relay_pid, None);

        let without = parse(&BASE).unwrap();
        let err = without.https_target(ModeName::HttpsNobatch).unwrap_err();
        assert!(err.to_string().contains("--relay-https-nobatch"), "{err}");
    }

    #[test]
    fn at_fraction_needs_find_max_and_a_fraction() {
        let base = BASE;
        assert!(parse(&[&base[..], &["--at-fraction", "0.5"]].concat()).is_err());
        let find = ["--find-max", "--slo-p99-ms", "25", "--at-fraction"];
        let ok = parse(&[&base[..], &find, &["0.5"]].concat()).unwrap();
        assert_eq!(ok.at_fraction, Some(0.5));
        assert_eq!(ok.at_fraction_duration, Duration::from_secs(8));
        for bad in ["0", "1.5", "-1", "half"] {
            assert!(parse(&[&base[..], &find, &[bad]].concat()).is_err(), "{bad}");
        }
    }

    #[test]
    fn find_max_needs_an_slo() {
        let base = BASE;
        let err = parse(&[&base[..], &["--find-max"]].concat()).unwrap_err();
        assert!(err.to_string().contains("--slo-p99-ms"), "{err}");
        assert!(parse(&[&base[..], &["--find-max", "--slo-p99-ms", "100"]].concat()).is_ok());
        assert!(parse(&[&base[..], &["--modes", "https,smtp"]].concat()).is_err());
    }
}
