//! What `compare` says: `summary.json` (every mode's summary and its ratios to the
//! baselines), the printed table and the percentile plots. Measurements and ratios only; no
//! verdicts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::{rate_of, Args, AtFraction, Outcome};
use crate::model::Summary;
use crate::plot::{self, Series};

/// `summary.json`.
#[derive(Debug, Serialize)]
pub struct CompareSummary {
    /// The command line, for the record.
    command: String,
    /// Offered events/s (`null` with `--find-max` or a closed loop).
    offered_rate: Option<f64>,
    slo_p99_ms: Option<f64>,
    /// `--at-fraction`, if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    at_fraction: Option<f64>,
    modes: Vec<ModeSummary>,
}

/// One mode in `summary.json`.
#[derive(Debug, Serialize)]
pub struct ModeSummary {
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

pub fn compare_summary<'a>(
    args: &Args,
    outcomes: impl Iterator<Item = &'a Outcome> + Clone,
) -> CompareSummary {
    let baseline =
        |name: &str| outcomes.clone().find(|o| o.name == name).and_then(|o| o.summary.clone());
    let baselines: Vec<(&'static str, Summary)> =
        BASELINES.iter().filter_map(|b| baseline(b).map(|s| (*b, s))).collect();
    let modes: Vec<ModeSummary> = outcomes
        .map(|o| {
            let ratios = o.summary.as_ref().map(|s| ratios(o.name, s, &baselines));
            ModeSummary {
                mode: o.name,
                failed: o.failed.clone(),
                summary: o.summary.clone(),
                ratios: ratios.unwrap_or_default(),
                at_fraction: o.at_fraction.as_ref().map(|(a, _)| a.clone()),
            }
        })
        .collect();
    CompareSummary {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        offered_rate: (!args.harness.find_max.find_max && args.run.rate > 0.0)
            .then_some(args.run.rate),
        slo_p99_ms: args.harness.find_max.slo_p99_ms,
        at_fraction: args.at_fraction,
        modes,
    }
}

/// The rate (achieved; with `--find-max` the max rate) and p99 of mode `name` divided by
/// those of each baseline that is not itself.
fn ratios(
    name: &str,
    summary: &Summary,
    baselines: &[(&'static str, Summary)],
) -> BTreeMap<&'static str, Ratio> {
    let ratio = |x: f64, y: f64| if y > 0.0 { round2(x / y) } else { f64::NAN };
    baselines
        .iter()
        .filter(|(b, _)| *b != name)
        .map(|(b, base)| {
            let rate = ratio(rate_of(summary), rate_of(base));
            (*b, Ratio { rate, p99: ratio(summary.latency_ms.p99, base.latency_ms.p99) })
        })
        .collect()
}

/// Two decimals (NaN stays NaN, written as `null` in JSON).
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The percentile table: one row per mode (send→answer), one more per mode with `--consume`
/// (send→consumer), and the ratios of rate and p99 to each baseline in the run.
pub fn table(summary: &CompareSummary, find_max: bool) -> String {
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
        out.push_str(&row(m.mode, &offered, s));
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

/// A mode's send→answer row (no newline): `offered` events/s and what `s` measured.
fn row(mode: &str, offered: &str, s: &Summary) -> String {
    let l = &s.latency_ms;
    format!(
        "{:<24} {:>10} {:>11.1} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9}",
        format!("{mode} send->{}", answer_of(mode)),
        offered,
        s.achieved_rate,
        s.error_total,
        l.p50,
        l.p90,
        l.p99,
        l.p999,
        l.max,
        cpu_of(s)
    )
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
            e2e.counts.seen,
            e2e.counts.expected,
            e2e.counts.missing
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
        out.push_str(&row(m.mode, &format!("{:.0}", at.rate), s));
        out.push('\n');
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
pub fn svg(args: &Args, outcomes: &[Outcome]) -> String {
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
pub fn svg_at_fraction(args: &Args, fraction: f64, outcomes: &[Outcome]) -> String {
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
    use std::time::Duration;

    use super::*;
    use crate::model::{self, Measurements, RunInfo, Schedule, Tally};

    /// A summary of `rate` events/s achieved (in a one-second window) with p99 `p99_us`.
    fn summary(rate: u64, p99_us: u64) -> Summary {
        let schedule =
            Schedule::open(1e6, 1, Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        let mut latency = model::histogram();
        latency.record(p99_us).unwrap();
        let measured = Measurements {
            latency,
            queueing: model::histogram(),
            measured: Tally { ok: rate, failed: BTreeMap::new() },
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
        Summary::new("x".to_owned(), &info, &schedule, &measured)
    }

    #[test]
    fn ratios_divide_by_every_other_baseline() {
        let baselines = [("bare", summary(10_000, 2000)), ("direct-js", summary(4_000, 8000))];
        let https = ratios("https", &summary(7_000, 4000), &baselines);
        assert_eq!(https.len(), 2);
        assert_eq!((https["bare"].rate, https["bare"].p99), (0.7, 2.0));
        assert_eq!((https["direct-js"].rate, https["direct-js"].p99), (1.75, 0.5));
        // A baseline is not compared with itself.
        let bare = ratios("bare", &baselines[0].1, &baselines);
        assert_eq!(bare.keys().copied().collect::<Vec<_>>(), ["direct-js"]);
        assert_eq!(bare["direct-js"].rate, 2.5);
    }

    #[test]
    fn a_baseline_without_answers_gives_no_number() {
        let baselines = [("bare", summary(0, 2000))];
        let r = ratios("https", &summary(100, 1000), &baselines);
        assert!(r["bare"].rate.is_nan());
        let json = serde_json::to_value(r["bare"]).unwrap();
        assert!(json["rate"].is_null(), "{json}");
    }
}
