//! `loadtest compare`: several modes one after the other, with the same offered load (or each
//! its own `--find-max` search), against a relay and NATS that are already running; the bare
//! server runs in-process. Ratios come from one invocation, so they compare like with like.
//!
//! Writes to `--out DIR`: `<mode>.hgrm` (send→answer), `<mode>-e2e.hgrm` (send→consumer, with
//! `--consume`), `summary.json` (every mode's summary plus the ratios), `table.txt` (what is
//! printed) and `percentiles.svg` (the percentile spectrum of every mode).
//!
//! The modes' own flag structs are filled from the shared flags here: one `--connections`,
//! `--concurrency`, token, CA and event shape for all, so only the protocol differs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{ensure, Context as _};
use http::Uri;
use serde::Serialize;
use tokio::sync::watch;

use crate::bare::BareServer;
use crate::events::EventArgs;
use crate::harness::{HarnessArgs, Run, Target};
use crate::https::HttpVersion;
use crate::plot::{self, Series};
use crate::report::{self, FindMaxSummary, ReportArgs, Summary};
use crate::schedule::RunArgs;
use crate::token::TokenArgs;
use crate::{direct_js, h3, https, quic};

/// Flags of `loadtest compare`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Modes to run, in order, comma-separated: https, h3, quic, direct-js, bare.
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

    /// quic: events per request (the other modes send one event per request).
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
    H3,
    Quic,
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
}

/// `summary.json`.
#[derive(Debug, Serialize)]
struct CompareSummary {
    /// The command line, for the record.
    command: String,
    /// Offered events/s (`null` with `--find-max` or a closed loop).
    offered_rate: Option<f64>,
    slo_p99_ms: Option<f64>,
    modes: Vec<ModeSummary>,
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
    /// baseline's, per baseline in the run (`bare`, `direct-js`).
    ratios: BTreeMap<&'static str, Ratio>,
}

/// A mode against a baseline.
#[derive(Clone, Copy, Debug, Serialize)]
struct Ratio {
    rate: f64,
    p99: f64,
}

/// The modes compared against.
const BASELINES: [&str; 2] = ["bare", "direct-js"];

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
        let harness = self.harness.clone();
        Ok(match name {
            ModeName::Https => Target::Https(Box::new(https::Args {
                harness,
                ..self.https(self.relay_https.clone(), self.ca.clone())
            })),
            ModeName::Bare => {
                let (server, ca) = bare.context("the bare server is not running")?;
                let url: Uri = format!("https://{}", server.addr()).parse()?;
                // The bare server's certificate is for localhost / 127.0.0.1 (or the relay's).
                let mut args = self.https(url, ca.clone());
                if self.bare_cert.is_none() {
                    args.server_name = None;
                }
                Target::Bare(Box::new(args))
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
            ModeName::Quic => {
                let lanes = self.connections * self.streams;
                Target::Quic(Box::new(quic::Args {
                    target: self.quic_target(),
                    connections: self.connections,
                    streams: self.streams,
                    in_flight: self.concurrency.div_ceil(lanes).max(1),
                    events_per_request: self.events_per_request,
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
}

impl ModeName {
    fn name(self) -> &'static str {
        match self {
            ModeName::Https => "https",
            ModeName::H3 => "h3",
            ModeName::Quic => "quic",
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
        let target = args.target(mode, bare.as_ref().map(|(s, ca)| (s, ca)))?;
        outcomes.push(measure_mode(&args, &target, stop.clone()).await);
    }

    for outcome in &outcomes {
        if let Some(run) = &outcome.run {
            let path = args.out.join(format!("{}.hgrm", outcome.name));
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
    println!("wrote {}/{{summary.json,table.txt,percentiles.svg,*.hgrm}}", args.out.display());
    let failed: Vec<&str> =
        outcomes.iter().filter(|o| o.failed.is_some()).map(|o| o.name).collect();
    ensure!(failed.is_empty(), "no result for: {}", failed.join(", "));
    Ok(())
}

/// One mode: a run at the shared rate, or a `--find-max` search. A mode that fails is reported
/// as such; the others still run.
async fn measure_mode(args: &Args, target: &Target, stop: watch::Receiver<bool>) -> Outcome {
    let name = target.name();
    let harness = &args.harness;
    let failed = |why: String| {
        eprintln!("compare: {name}: {why}");
        Outcome { name, run: None, summary: None, failed: Some(why) }
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
                        Outcome { name, run: Some(run), summary: Some(summary), failed: None }
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
                Outcome { name, run: Some(run), summary: Some(summary), failed: None }
            }
            Err(error) => failed(format!("{error:#}")),
        }
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
    let modes = outcomes
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
            }
        })
        .collect();
    CompareSummary {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        offered_rate: (!args.harness.find_max.find_max && args.run.rate > 0.0)
            .then_some(args.run.rate),
        slo_p99_ms: args.harness.find_max.slo_p99_ms,
        modes,
    }
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
    let _ = write!(
        out,
        "{:<20} {:>10} {:>11} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "mode", "offered/s", "achieved/s", "errors", "p50", "p90", "p99", "p99.9", "max"
    );
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
            "{:<20} {:>10} {:>11.1} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            format!("{} send->{}", m.mode, if m.mode == "direct-js" { "ack" } else { "202" }),
            offered,
            s.achieved_rate,
            s.error_total,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max
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
        if let Some(e2e) = &s.e2e {
            let e = &e2e.latency_ms;
            let _ = writeln!(
                out,
                "{:<20} {:>10} {:>11} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  seen {}/{}, missing {}",
                format!("{} ->consumer", m.mode),
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
    if !present.is_empty() {
        let _ = writeln!(
            out,
            "×baseline: this mode's {} and p99 divided by the baseline's",
            if find_max { "max rate" } else { "achieved rate" }
        );
    }
    out
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
