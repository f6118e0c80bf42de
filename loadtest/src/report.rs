//! Turns a run's [`Summary`] into the end-of-run table (stdout), the `--json` summary and the
//! HdrHistogram `.hgrm` percentile distribution, the same for every mode; and the file writing
//! the scenarios share.
//!
//! Counts and rates are in events; send→answer latency is per request (a request may carry
//! several events), send→consumer latency (`--consume`) per event. With `--hgrm FILE` the
//! send→consumer distribution goes next to it as `FILE` with `-e2e` before the extension.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::model::{Failure, FindMax, FindMaxSummary, Run, Schedule, Summary, MICROS_PER_MS};

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

/// The human-readable end-of-run table of `summary`; `answer` names what ends a request.
pub fn table(summary: &Summary, schedule: &Schedule, answer: &str) -> String {
    let s = summary;
    let mut out = String::new();
    let http = s.http.map(|version| format!("  http={version}")).unwrap_or_default();
    let detail = s.detail.as_ref().map(|d| format!("  {d}")).unwrap_or_default();
    let per_request = if s.events_per_request == 1 {
        String::new()
    } else {
        format!("  events/request={}", s.events_per_request)
    };
    let offered = match s.offered_rate {
        Some(rate) => format!("{rate}/s"),
        None => "max (closed loop)".to_owned(),
    };
    let _ = writeln!(
        out,
        "loadtest {}  label={}{http}  connections={}  concurrency={}{detail}{per_request}  \
         offered={offered}  duration={}  warmup={}",
        s.mode,
        s.label,
        s.connections,
        s.concurrency,
        format_duration(schedule.duration()),
        format_duration(schedule.warmup()),
    );
    let statuses = if s.errors.is_empty() {
        "-".to_owned()
    } else {
        s.errors.iter().map(|(kind, n)| format!("{kind}: {n}")).collect::<Vec<_>>().join(", ")
    };
    let _ = writeln!(
        out,
        "achieved  {:.1} events/s   ok {}   errors {}   (status: {statuses})",
        s.achieved_rate, s.ok, s.error_total
    );
    if s.interrupted {
        let _ = writeln!(out, "interrupted after {:.1}s of measurement", s.measured_s);
    }
    if let Some(unsent) = s.errors.get(&Failure::Unsent.to_string()) {
        let _ = writeln!(
            out,
            "{unsent} events were never sent: every worker was still busy when the run \
             ended (raise the concurrency or lower --rate)"
        );
    }
    let requests = if s.events_per_request == 1 { "" } else { ", per request" };
    if s.closed_loop {
        let _ = writeln!(
            out,
            "latency send->{answer} (ms{requests}, closed loop: from the actual send time, \
             NOT CO-corrected)"
        );
    } else {
        let _ = writeln!(out, "latency send->{answer} (ms{requests}, CO-corrected)");
    }
    let l = &s.latency_ms;
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
        if let Some(e2e) = &s.e2e {
            let e = &e2e.latency_ms;
            let _ = writeln!(
                out,
                "latency send->consumer (ms, per event, {}): p50 {:.2}  p90 {:.2}  p99 {:.2}  \
                 p99.9 {:.2}  max {:.2}",
                if s.closed_loop { "from the actual send time" } else { "CO-corrected" },
                e.p50,
                e.p90,
                e.p99,
                e.p999,
                e.max
            );
            let _ = writeln!(
                out,
                "consumer saw {} of {} acknowledged events: {} missing, {} duplicates{}",
                e2e.counts.seen,
                e2e.counts.expected,
                e2e.counts.missing,
                e2e.counts.duplicates,
                if e2e.counts.undecodable > 0 {
                    format!(", {} undecodable", e2e.counts.undecodable)
                } else {
                    String::new()
                }
            );
        }
        if let (Some(cpu), Some(per_event)) = (s.relay_cpu_s, s.relay_cpu_us_per_event) {
            let _ = writeln!(
                out,
                "relay CPU {cpu:.2} s over the run (warm-up included): {per_event:.1} µs per \
                 event"
            );
        }
        if !s.closed_loop {
            let q = &s.queueing_ms;
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

/// Prints the table of `run` to stdout and writes the `--json` and `--hgrm` files (and the
/// send→consumer `.hgrm` next to it).
pub fn emit(args: &ReportArgs, run: &Run, find_max: Option<&FindMax>) -> anyhow::Result<()> {
    let label = args.label.clone().unwrap_or_else(|| run.info.mode.to_owned());
    let mut summary = Summary::of_run(label, run);
    summary.find_max = find_max.map(FindMaxSummary::of);
    print!("{}", table(&summary, &run.schedule, run.info.answer));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{histogram, Measurements, Percentiles, RunInfo, Tally};
    use std::collections::BTreeMap;

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
            measured: Tally { ok, failed: BTreeMap::new() },
            warmup: Tally::default(),
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
        let table = table(&summary, &s, "answer");
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
        let table = table(&summary, &s, "answer");
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
