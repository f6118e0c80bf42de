//! What a run is and what is said about it: the mode's description of itself ([`RunInfo`]),
//! one measured run ([`Measured`], [`Run`] with what the consumer saw), a `--find-max` search
//! ([`FindMax`]), and their JSON summaries ([`Summary`], the `--json` file and the source of
//! every table). Plain data and arithmetic; printing and writing files is `report`'s job.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{histogram, millis, Failure, Measurements, Schedule, MICROS_PER_MS};

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

/// What a mode measured in one run.
#[derive(Debug)]
pub struct Measured {
    pub info: RunInfo,
    pub schedule: Schedule,
    pub measurements: Measurements,
}

/// One run of a mode, with what the consumer saw.
#[derive(Debug)]
pub struct Run {
    pub info: RunInfo,
    pub schedule: Schedule,
    pub measurements: Measurements,
    /// With `--consume`, for modes that publish to a stream.
    pub e2e: Option<E2e>,
    /// With `--relay-pid`: the relay's CPU time over the run (warm-up, measurement and the
    /// drain of answers; the consumer's catch-up after it excluded).
    pub relay_cpu: Option<Duration>,
}

/// End-to-end delivery of one run's acknowledged events.
#[derive(Debug)]
pub struct E2e {
    /// Intended send time -> consumer, µs, one value per acknowledged event seen.
    pub latency: Histogram<u64>,
    pub counts: Delivery,
}

/// What the consumer saw of a run's acknowledged events.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Delivery {
    /// Acknowledged events of the measured phase (requests with every event accepted).
    pub expected: u64,
    /// Of those, the ones the consumer saw.
    pub seen: u64,
    /// Of those, the ones it did not see within `--consume-grace`.
    pub missing: u64,
    /// Events delivered more than once (whole run).
    pub duplicates: u64,
    /// Messages or events on the run's subjects that were not decodable (whole run).
    pub undecodable: u64,
}

/// One step of a `--find-max` search.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// Offered events/s.
    pub rate: f64,
    pub achieved_rate: f64,
    pub errors: u64,
    pub p99_ms: f64,
    /// send→consumer p99, with `--consume`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e2e_p99_ms: Option<f64>,
    /// Met the SLO with no errors (and nothing missing).
    pub ok: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// The outcome of a `--find-max` search.
#[derive(Debug)]
pub struct FindMax {
    pub slo_p99_ms: f64,
    pub steps: Vec<Step>,
    /// The run at the highest rate that met the SLO, if any did.
    pub best: Option<Run>,
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
    #[serde(flatten)]
    pub counts: Delivery,
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
            summary.relay_cpu_us_per_event = micros_per_event(cpu, summary.ok + summary.warmup_ok);
        }
        summary
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

impl E2e {
    /// Nothing expected, nothing seen.
    pub fn empty(undecodable: u64) -> Self {
        E2e { latency: histogram(), counts: Delivery { undecodable, ..Delivery::default() } }
    }
}

impl E2eSummary {
    pub fn of(e2e: &E2e) -> Self {
        Self { latency_ms: Percentiles::of(&e2e.latency), counts: e2e.counts }
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

/// CPU microseconds per event; `None` without events.
pub fn micros_per_event(cpu: Duration, events: u64) -> Option<f64> {
    (events > 0).then(|| (cpu.as_micros() as f64 / events as f64 * 100.0).round() / 100.0)
}

/// Failure counts keyed by their report name.
fn failure_map(failed: &BTreeMap<Failure, u64>) -> BTreeMap<String, u64> {
    failed.iter().map(|(failure, n)| (failure.to_string(), *n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_per_event() {
        assert_eq!(micros_per_event(Duration::from_millis(30), 1000), Some(30.0));
        assert_eq!(micros_per_event(Duration::from_millis(10), 3), Some(3333.33));
        assert_eq!(micros_per_event(Duration::from_secs(1), 0), None);
    }
}
