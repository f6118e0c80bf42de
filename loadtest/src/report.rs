//! Turns [`Measurements`] into the end-of-run table (stdout), a JSON summary and an HdrHistogram
//! `.hgrm` percentile distribution, the same for every mode.
//!
//! Latencies are recorded in microseconds and reported in milliseconds. Counts and rates are in
//! events; send→answer latency is per request (a request may carry several events),
//! send→consumer latency (`--consume`) per event. With `--hgrm FILE` the send→consumer
//! distribution goes next to it as `FILE` with `-e2e` before the extension.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::consume::E2e;
use crate::harness::{FindMax, Run, Step};
use crate::probe;
use crate::schedule::{Failure, Measurements, Schedule};

/// Highest latency the histograms track, in microseconds; larger values are clamped to it.
const MAX_MICROS: u64 = 60_000_000;

/// Significant decimal digits kept by the histograms (and printed in `.hgrm`).
const SIGFIG: u8 = 3;

/// Microseconds per reported unit (milliseconds).
const MICROS_PER_MS: f64 = 1000.0;

/// Output flags shared by every mode.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ReportArgs {
    /// Name of this run in the report and JSON [default: the mode name]
    #[arg(long, value_name = "NAME")]
    pub label: Option<String>,

    /// Write a JSON summary of the run to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Write the latency percentile distribution to FILE in HdrHistogram `.hgrm` text format
    /// (milliseconds), as read by the HdrHistogram plotter.
    #[arg(long, value_name = "FILE")]
    pub hgrm: Option<PathBuf>,
}

/// What a mode tells the report about itself.
#[derive(Clone, Debug)]
pub struct RunInfo {
    /// Subcommand name, e.g. `https`.
    pub mode: &'static str,
    /// HTTP version (`"1.1"`, `"2"`), for HTTP modes.
    pub http: Option<&'static str>,
    /// Connections opened.
    pub connections: usize,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// What counts as the answer to a request, for the latency heading (`202`, `PubAck`).
    pub answer: &'static str,
    /// Mode-specific settings worth showing, e.g. `streams=4 in_flight=8`.
    pub detail: Option<String>,
}

/// The JSON summary; also the source of the printed table.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub label: String,
    pub mode: &'static str,
    /// HTTP version (`"1.1"` or `"2"`), for HTTP modes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<&'static str>,
    pub connections: usize,
    pub concurrency: usize,
    /// Mode-specific settings, e.g. `streams=4 in_flight=8`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Events in each request.
    pub events_per_request: u32,
    /// `--rate 0`: as fast as answers come back; latency is from the actual send time.
    pub closed_loop: bool,
    /// Offered events per second; `null` in a closed loop.
    pub offered_rate: Option<f64>,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Window the achieved rate is computed over (see `schedule::measured_window`).
    pub measured_s: f64,
    /// Accepted events per second over `measured_s`.
    pub achieved_rate: f64,
    /// Events offered in the measurement window; `null` in a closed loop.
    pub offered: Option<u64>,
    /// Events accepted.
    pub ok: u64,
    /// Events not accepted, by why: HTTP status code, refusal code (`queue_full`, ...),
    /// `timeout`, `connect`, `transport`, `protocol`, `unsent`.
    pub errors: BTreeMap<String, u64>,
    pub error_total: u64,
    pub warmup_ok: u64,
    pub warmup_errors: u64,
    pub interrupted: bool,
    /// Per request whose events were all accepted: intended send time -> answer,
    /// coordinated-omission-corrected; in a closed loop actual send time -> answer.
    pub latency_ms: Percentiles,
    /// Intended -> actual send time: waiting for a free worker inside the generator.
    pub queueing_ms: Percentiles,
    /// With `--consume`: intended send time -> consumer, per acknowledged event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e2e: Option<E2eSummary>,
    /// With `--find-max`: the search that led to this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub find_max: Option<FindMaxSummary>,
    /// With `--relay-pid`: the relay's CPU time (user + system) over the whole run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_cpu_s: Option<f64>,
    /// With `--relay-pid`: `relay_cpu_s` per event answered in the run (warm-up included,
    /// since the CPU time covers it too), in microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay_cpu_us_per_event: Option<f64>,
}

/// End-to-end delivery in the JSON summary.
#[derive(Clone, Debug, Serialize)]
pub struct E2eSummary {
    /// Intended send time -> consumer, per event (CO-corrected like `latency_ms`).
    pub latency_ms: Percentiles,
    /// Acknowledged events of the measured phase.
    pub expected: u64,
    /// Of those, seen by the consumer.
    pub seen: u64,
    /// Of those, not seen within `--consume-grace`.
    pub missing: u64,
    /// Events delivered more than once.
    pub duplicates: u64,
    /// Messages or events on the run's subjects that could not be decoded.
    pub undecodable: u64,
}

/// A `--find-max` search in the JSON summary.
#[derive(Clone, Debug, Serialize)]
pub struct FindMaxSummary {
    pub slo_p99_ms: f64,
    /// Highest offered rate that met the SLO; `null` if none did.
    pub max_rate: Option<f64>,
    pub steps: Vec<Step>,
}

/// Percentiles in milliseconds; all zero when nothing succeeded.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// Summarises a finished run.
    pub fn new(
        label: String,
        info: &RunInfo,
        schedule: &Schedule,
        measured: &Measurements,
    ) -> Self {
        let window = measured.window.as_secs_f64();
        let achieved_rate = if window > 0.0 {
            // Two decimals are plenty and keep the JSON readable.
            (measured.measured.ok as f64 / window * 100.0).round() / 100.0
        } else {
            0.0
        };
        Self {
            label,
            mode: info.mode,
            http: info.http,
            connections: info.connections,
            concurrency: info.concurrency,
            detail: info.detail.clone(),
            events_per_request: schedule.events_per_request(),
            closed_loop: schedule.is_closed_loop(),
            offered_rate: schedule.rate(),
            warmup_s: schedule.warmup().as_secs_f64(),
            duration_s: schedule.duration().as_secs_f64(),
            measured_s: measured.window.as_millis() as f64 / 1000.0,
            achieved_rate,
            offered: schedule
                .measured_requests()
                .map(|n| n * u64::from(schedule.events_per_request())),
            ok: measured.measured.ok,
            errors: failure_map(&measured.measured.failed),
            error_total: measured.measured.failures(),
            warmup_ok: measured.warmup.ok,
            warmup_errors: measured.warmup.failures(),
            interrupted: measured.interrupted,
            latency_ms: Percentiles::of(&measured.latency),
            queueing_ms: Percentiles::of(&measured.queueing),
            e2e: None,
            find_max: None,
            relay_cpu_s: None,
            relay_cpu_us_per_event: None,
        }
    }

    /// Summarises a run with what its consumer saw.
    pub fn of_run(label: String, run: &Run) -> Self {
        let mut summary = Self::new(label, &run.info, &run.schedule, &run.measurements);
        summary.e2e = run.e2e.as_ref().map(E2eSummary::of);
        if let Some(cpu) = run.relay_cpu {
            summary.relay_cpu_s = Some(cpu.as_secs_f64());
            summary.relay_cpu_us_per_event =
                probe::micros_per_event(cpu, summary.ok + summary.warmup_ok);
        }
        summary
    }

    /// The human-readable end-of-run table; `answer` names what ends a request.
    pub fn table(&self, schedule: &Schedule, answer: &str) -> String {
        let mut out = String::new();
        let http = self.http.map(|version| format!("  http={version}")).unwrap_or_default();
        let detail = self.detail.as_ref().map(|d| format!("  {d}")).unwrap_or_default();
        let per_request = if self.events_per_request == 1 {
            String::new()
        } else {
            format!("  events/request={}", self.events_per_request)
        };
        let offered = match self.offered_rate {
            Some(rate) => format!("{rate}/s"),
            None => "max (closed loop)".to_owned(),
        };
        let _ = writeln!(
            out,
            "loadtest {}  label={}{http}  connections={}  concurrency={}{detail}{per_request}  \
             offered={offered}  duration={}  warmup={}",
            self.mode,
            self.label,
            self.connections,
            self.concurrency,
            format_duration(schedule.duration()),
            format_duration(schedule.warmup()),
        );
        let statuses = if self.errors.is_empty() {
            "-".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(kind, n)| format!("{kind}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "achieved  {:.1} events/s   ok {}   errors {}   (status: {statuses})",
            self.achieved_rate, self.ok, self.error_total
        );
        if self.interrupted {
            let _ = writeln!(out, "interrupted after {:.1}s of measurement", self.measured_s);
        }
        if let Some(unsent) = self.errors.get(&Failure::Unsent.to_string()) {
            let _ = writeln!(
                out,
                "{unsent} events were never sent: every worker was still busy when the run \
                 ended (raise the concurrency or lower --rate)"
            );
        }
        let requests = if self.events_per_request == 1 { "" } else { ", per request" };
        if self.closed_loop {
            let _ = writeln!(
                out,
                "latency send->{answer} (ms{requests}, closed loop: from the actual send time, \
                 NOT CO-corrected)"
            );
        } else {
            let _ = writeln!(out, "latency send->{answer} (ms{requests}, CO-corrected)");
        }
        let l = &self.latency_ms;
        if l.count == 0 {
            let _ = writeln!(out, "  (no successful requests)");
        } else {
            for (name, value) in [
                ("p50", l.p50),
                ("p90", l.p90),
                ("p99", l.p99),
                ("p99.9", l.p999),
                ("max", l.max),
                ("mean", l.mean),
            ] {
                let _ = writeln!(out, "  {name:<6}{value:>8.2}");
            }
            if let Some(e2e) = &self.e2e {
                let e = &e2e.latency_ms;
                let _ = writeln!(
                    out,
                    "latency send->consumer (ms, per event, {}): p50 {:.2}  p90 {:.2}  p99 {:.2}  \
                     p99.9 {:.2}  max {:.2}",
                    if self.closed_loop { "from the actual send time" } else { "CO-corrected" },
                    e.p50,
                    e.p90,
                    e.p99,
                    e.p999,
                    e.max
                );
                let _ = writeln!(
                    out,
                    "consumer saw {} of {} acknowledged events: {} missing, {} duplicates{}",
                    e2e.seen,
                    e2e.expected,
                    e2e.missing,
                    e2e.duplicates,
                    if e2e.undecodable > 0 {
                        format!(", {} undecodable", e2e.undecodable)
                    } else {
                        String::new()
                    }
                );
            }
            if let (Some(cpu), Some(per_event)) = (self.relay_cpu_s, self.relay_cpu_us_per_event) {
                let _ = writeln!(
                    out,
                    "relay CPU {cpu:.2} s over the run (warm-up included): {per_event:.1} µs per \
                     event"
                );
            }
            if !self.closed_loop {
                let q = &self.queueing_ms;
                let _ = writeln!(
                    out,
                    "generator queueing (ms, waiting for a free worker)  p50 {:.2}  p99 {:.2}  \
                     max {:.2}",
                    q.p50, q.p99, q.max
                );
            }
        }
        out
    }
}

impl Percentiles {
    /// Percentiles of a microsecond histogram, in milliseconds.
    pub fn of(hist: &Histogram<u64>) -> Self {
        if hist.is_empty() {
            return Self::default();
        }
        Self {
            count: hist.len(),
            p50: millis(hist.value_at_quantile(0.50)),
            p90: millis(hist.value_at_quantile(0.90)),
            p99: millis(hist.value_at_quantile(0.99)),
            p999: millis(hist.value_at_quantile(0.999)),
            max: millis(hist.max()),
            // Whole microseconds, like every other value.
            mean: hist.mean().round() / MICROS_PER_MS,
        }
    }
}

/// A fresh microsecond latency histogram: 3 significant digits, up to 60 s.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, SIGFIG).expect("constant histogram bounds are valid")
}

/// Microseconds to milliseconds.
pub fn millis(micros: u64) -> f64 {
    micros as f64 / MICROS_PER_MS
}

impl E2eSummary {
    pub fn of(e2e: &E2e) -> Self {
        Self {
            latency_ms: Percentiles::of(&e2e.latency),
            expected: e2e.expected,
            seen: e2e.seen,
            missing: e2e.missing,
            duplicates: e2e.duplicates,
            undecodable: e2e.undecodable,
        }
    }
}

impl FindMaxSummary {
    pub fn of(found: &FindMax) -> Self {
        Self {
            slo_p99_ms: found.slo_p99_ms,
            max_rate: found.best.as_ref().and_then(|best| best.schedule.rate()),
            steps: found.steps.clone(),
        }
    }
}

/// Prints the table of `run` to stdout and writes the `--json` and `--hgrm` files (and the
/// send→consumer `.hgrm` next to it).
pub fn emit(args: &ReportArgs, run: &Run, find_max: Option<&FindMax>) -> anyhow::Result<()> {
    let label = args.label.clone().unwrap_or_else(|| run.info.mode.to_owned());
    let mut summary = Summary::of_run(label, run);
    summary.find_max = find_max.map(FindMaxSummary::of);
    print!("{}", summary.table(&run.schedule, run.info.answer));
    if let Some(path) = &args.json {
        write_json(path, &summary)?;
    }
    if let Some(path) = &args.hgrm {
        write(path, &hgrm(&run.measurements.latency))?;
        if let Some(e2e) = &run.e2e {
            write(&e2e_path(path), &hgrm(&e2e.latency))?;
        }
    }
    Ok(())
}

/// Prints the steps of a `--find-max` search, then the report of its best run as [`emit`]
/// does; with no best run only the steps go to `--json`.
pub fn emit_find_max(args: &ReportArgs, found: &FindMax) -> anyhow::Result<()> {
    print!("{}", steps_table(found));
    match &found.best {
        Some(best) => emit(args, best, Some(found)),
        None => match &args.json {
            Some(path) => {
                write_json(path, &serde_json::json!({ "find_max": FindMaxSummary::of(found) }))
            }
            None => Ok(()),
        },
    }
}

/// One line per step of a `--find-max` search.
pub fn steps_table(found: &FindMax) -> String {
    let mut out = format!("find-max: p99 SLO {} ms\n", found.slo_p99_ms);
    let _ = writeln!(
        out,
        "  {:>4} {:>12} {:>12} {:>8} {:>10} {:>12}  verdict",
        "step", "offered/s", "achieved/s", "errors", "p99 ms", "e2e p99 ms"
    );
    for (i, step) in found.steps.iter().enumerate() {
        let e2e = step.e2e_p99_ms.map_or_else(|| "-".to_owned(), |p| format!("{p:.2}"));
        let _ = writeln!(
            out,
            "  {:>4} {:>12.0} {:>12.1} {:>8} {:>10.2} {:>12}  {}",
            i + 1,
            step.rate,
            step.achieved_rate,
            step.errors,
            step.p99_ms,
            e2e,
            step.why.as_deref().unwrap_or("ok")
        );
    }
    out
}

/// `dir/name.hgrm` -> `dir/name-e2e.hgrm` (the send→consumer distribution).
pub fn e2e_path(path: &Path) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-e2e.{}", ext.to_string_lossy()),
        None => format!("{stem}-e2e"),
    };
    path.with_file_name(name)
}

/// Writes `value` as pretty JSON with a final newline.
pub fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let mut json = serde_json::to_string_pretty(value)?;
    json.push('\n');
    write(path, &json)
}

/// Writes `text` to `path`, saying which file failed.
pub fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The classic HdrHistogram percentile distribution in milliseconds, as the relay's
/// `/debug/latency/{stage}.hgrm` writes it ([`edgerelay::metrics::hgrm`]).
pub fn hgrm(hist: &Histogram<u64>) -> String {
    edgerelay::metrics::hgrm::percentile_distribution(hist, MICROS_PER_MS)
}

/// `10s`, `500ms`, `2m`, `1.5s`: the inverse of `schedule::parse_duration` for display.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if d.subsec_nanos() % 1_000_000 != 0 {
        format!("{}us", d.as_micros())
    } else if ms % 1000 != 0 {
        if ms > 1000 {
            format!("{}s", d.as_secs_f64())
        } else {
            format!("{ms}ms")
        }
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// Failure counts keyed by their report name.
fn failure_map(failed: &BTreeMap<Failure, u64>) -> BTreeMap<String, u64> {
    failed.iter().map(|(failure, n)| (failure.to_string(), *n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Histogram<u64> {
        let mut h = histogram();
        for us in 1..=1000u64 {
            h.record(us * 10).unwrap(); // 10 µs .. 10 ms
        }
        h
    }

    #[test]
    fn percentiles_are_in_milliseconds() {
        let p = Percentiles::of(&sample());
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 5.0).abs() < 0.01, "{p:?}");
        assert!((p.p99 - 9.9).abs() < 0.01, "{p:?}");
        assert!((p.max - 10.0).abs() < 0.01, "{p:?}");
        assert_eq!(Percentiles::of(&histogram()), Percentiles::default());
    }

    fn measurements(ok: u64, window: Duration) -> Measurements {
        Measurements {
            latency: sample(),
            queueing: histogram(),
            measured: crate::schedule::Tally { ok, failed: BTreeMap::new() },
            warmup: crate::schedule::Tally::default(),
            acked: Vec::new(),
            window,
            interrupted: false,
        }
    }

    fn info() -> RunInfo {
        RunInfo {
            mode: "quic",
            http: None,
            connections: 4,
            concurrency: 128,
            answer: "answer",
            detail: Some("streams=4 in_flight=8".into()),
        }
    }

    #[test]
    fn achieved_rate_counts_accepted_events_over_the_window() {
        // 100 requests/s of 16 events for 10 s, answered within 12.5 s: 1600 offered events/s.
        let s =
            Schedule::open(1600.0, 16, Duration::from_secs(2), Duration::from_secs(10)).unwrap();
        let m = measurements(15_000, Duration::from_millis(12_500));
        let summary = Summary::new("q".into(), &info(), &s, &m);
        assert_eq!(summary.offered, Some(16_000));
        assert_eq!(summary.offered_rate, Some(1600.0));
        assert_eq!(summary.achieved_rate, 1200.0);
        assert_eq!(summary.events_per_request, 16);
        assert!(!summary.closed_loop);
        let table = summary.table(&s, "answer");
        assert!(table.contains("events/request=16"), "{table}");
        assert!(table.contains("streams=4 in_flight=8"), "{table}");
        assert!(table.contains("achieved  1200.0 events/s"), "{table}");
        assert!(table.contains("CO-corrected"), "{table}");

        let empty = Summary::new("q".into(), &info(), &s, &measurements(0, Duration::ZERO));
        assert_eq!(empty.achieved_rate, 0.0);
    }

    #[test]
    fn a_closed_loop_says_so() {
        let s = Schedule::closed(1, Duration::from_secs(1), Duration::from_secs(4)).unwrap();
        let summary =
            Summary::new("q".into(), &info(), &s, &measurements(1000, Duration::from_secs(4)));
        assert_eq!(summary.offered, None);
        assert_eq!(summary.offered_rate, None);
        assert_eq!(summary.achieved_rate, 250.0);
        let table = summary.table(&s, "answer");
        assert!(table.contains("offered=max (closed loop)"), "{table}");
        assert!(table.contains("NOT CO-corrected"), "{table}");
        assert!(!table.contains("generator queueing"), "{table}");
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["closed_loop"], true);
        assert!(json["offered_rate"].is_null());
    }

    #[test]
    fn e2e_files_sit_next_to_the_hgrm() {
        assert_eq!(e2e_path(Path::new("out/https.hgrm")), Path::new("out/https-e2e.hgrm"));
        assert_eq!(e2e_path(Path::new("run")), Path::new("run-e2e"));
    }

    #[test]
    fn formats_durations_like_the_parser_reads_them() {
        for (d, s) in [
            (Duration::from_secs(10), "10s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_micros(250), "250us"),
            (Duration::ZERO, "0s"),
        ] {
            assert_eq!(format_duration(d), s);
            assert_eq!(crate::schedule::parse_duration(s), Ok(d));
        }
    }
}
