//! Exact latency percentiles: one HdrHistogram per stage, over a sliding window (the last
//! [`WINDOW_SECS`] seconds) and since start, served by the admin listener at `/debug/latency`
//! (JSON) and `/debug/latency/{stage}.hgrm` (HdrHistogram percentile distribution).
//!
//! The Prometheus histograms (`edgerelay_*_seconds`) give rates and SLO burn across a fleet;
//! these give one relay's exact p50…p99.9 (3 significant digits) for `edgerelay top`, the
//! HdrHistogram plotter and load-test qualification.
//!
//! [`Window`] is the sans-IO core: it takes the time of each record and read as an argument
//! and keeps a ring of one-second interval histograms plus a since-start one. [`Latency`]
//! holds one per stage behind a mutex.
//!
//! # Cost on the data path
//!
//! `ingest_to_ack` and `edge_to_ack` are recorded once per request, `queue_wait` and `flush`
//! once per batch. A record is one uncontended-in-practice mutex (tens of ns), two array
//! increments (the current second and since start), and once a second per stage a clear of
//! the slot being reused. Reads (`/debug/latency`, about once a second while someone looks)
//! merge the ten slots under the lock: tens of microseconds.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Length of the sliding window, seconds: that many one-second slots.
pub const WINDOW_SECS: u64 = 10;
/// Significant decimal digits kept (HdrHistogram precision: 0.1% of the value).
pub const SIGFIG: u8 = 3;
/// Highest latency tracked, microseconds (60 s); larger values are counted as this.
pub const MAX_MICROS: u64 = 60_000_000;
/// Upper bound of the first `distribution` bucket, microseconds; each next one doubles.
pub const FIRST_BOUND_MICROS: u64 = 100;
/// Most `distribution` buckets: 100 µs · 2^16 ≈ 6.6 s; the last also counts everything above.
pub const MAX_BOUNDS: usize = 17;

/// A latency stage with exact percentiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Request arrival at the relay → its answer (all protocols).
    IngestToAck,
    /// The request's oldest `Edge-Timestamp` → its answer (includes the edge's clock skew).
    EdgeToAck,
    /// A batch's oldest event: enqueued → handed to NATS.
    QueueWait,
    /// A batch: published → PubAck (retries included).
    Flush,
}

/// Which part of the recorded history a read covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    /// The last [`WINDOW_SECS`] seconds.
    Window,
    /// Since the relay started.
    SinceStart,
}

/// The sans-IO core of one stage: a ring of [`WINDOW_SECS`] one-second histograms and one
/// since `start`. Every call takes the current time.
#[derive(Debug)]
pub struct Window {
    start: Instant,
    /// Slot `s % WINDOW_SECS` holds second `s` after `start`, if `seconds` says so.
    slots: Vec<Histogram<u64>>,
    /// The second each slot holds (`u64::MAX`: none yet).
    seconds: Vec<u64>,
    since_start: Histogram<u64>,
}

/// One stage's summary, values in microseconds. All zero when nothing was recorded.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    /// `[upper_bound_us, count]` over doubling bounds from [`FIRST_BOUND_MICROS`] up to the
    /// first bound ≥ `max` (at most [`MAX_BOUNDS`]; the last also counts everything above it).
    /// Counts are per bucket, not cumulative; a bucket holds values above the previous bound.
    pub distribution: Vec<(u64, u64)>,
}

/// A stage's window and since-start summaries.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StageSummary {
    pub window: Summary,
    pub since_start: Summary,
}

/// Every stage, in the order `/debug/latency` lists them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stages {
    pub ingest_to_ack: StageSummary,
    pub edge_to_ack: StageSummary,
    pub queue_wait: StageSummary,
    pub flush: StageSummary,
}

/// The `/debug/latency` document.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub uptime_secs: f64,
    pub window_secs: u64,
    /// Always `us`: every value is in microseconds.
    pub unit: &'static str,
    pub stages: Stages,
}

/// Every stage's windows, shared by the data path (recording) and the admin listener.
#[derive(Debug)]
pub struct Latency {
    start: Instant,
    ingest_to_ack: Mutex<Window>,
    edge_to_ack: Mutex<Window>,
    queue_wait: Mutex<Window>,
    flush: Mutex<Window>,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Self::IngestToAck, Self::EdgeToAck, Self::QueueWait, Self::Flush];

    /// The name in `/debug/latency` and its `.hgrm` paths.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IngestToAck => "ingest_to_ack",
            Self::EdgeToAck => "edge_to_ack",
            Self::QueueWait => "queue_wait",
            Self::Flush => "flush",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl Window {
    /// An empty window whose second 0 begins at `start`.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            slots: (0..WINDOW_SECS).map(|_| histogram()).collect(),
            seconds: vec![u64::MAX; WINDOW_SECS as usize],
            since_start: histogram(),
        }
    }

    /// Records `micros` at `now`. Values above [`MAX_MICROS`] count as it.
    pub fn record(&mut self, micros: u64, now: Instant) {
        let second = self.second(now);
        let i = (second % WINDOW_SECS) as usize;
        if self.seconds[i] != second {
            self.slots[i].reset();
            self.seconds[i] = second;
        }
        self.slots[i].saturating_record(micros);
        self.since_start.saturating_record(micros);
    }

    /// What `range` holds at `now`. The window is the current second and the nine before it
    /// (9 to 10 s of history).
    pub fn histogram(&self, range: Range, now: Instant) -> Histogram<u64> {
        match range {
            Range::SinceStart => self.since_start.clone(),
            Range::Window => {
                let current = self.second(now);
                let mut merged = histogram();
                for (slot, &second) in self.slots.iter().zip(&self.seconds) {
                    if second <= current && current - second < WINDOW_SECS {
                        // Same bounds and counter type: adding cannot fail.
                        let _ = merged.add(slot);
                    }
                }
                merged
            }
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs()
    }
}

impl Summary {
    /// The summary of a microsecond histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self { distribution: distribution(h), ..Self::default() };
        }
        Self {
            count: h.len(),
            min: h.min(),
            // Whole microseconds, like every other value.
            mean: h.mean().round(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            distribution: distribution(h),
        }
    }
}

impl Latency {
    pub fn new(start: Instant) -> Self {
        let window = || Mutex::new(Window::new(start));
        Self {
            start,
            ingest_to_ack: window(),
            edge_to_ack: window(),
            queue_wait: window(),
            flush: window(),
        }
    }

    /// Records `elapsed` for `stage` at `now`.
    pub fn record(&self, stage: Stage, elapsed: Duration, now: Instant) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.lock(stage).record(micros, now);
    }

    /// A copy of `stage`'s `range` at `now`.
    pub fn histogram(&self, stage: Stage, range: Range, now: Instant) -> Histogram<u64> {
        self.lock(stage).histogram(range, now)
    }

    /// The `/debug/latency` document at `now`.
    pub fn report(&self, now: Instant) -> Report {
        let stage = |s| StageSummary {
            window: Summary::of(&self.histogram(s, Range::Window, now)),
            since_start: Summary::of(&self.histogram(s, Range::SinceStart, now)),
        };
        Report {
            uptime_secs: now.saturating_duration_since(self.start).as_secs_f64(),
            window_secs: WINDOW_SECS,
            unit: "us",
            stages: Stages {
                ingest_to_ack: stage(Stage::IngestToAck),
                edge_to_ack: stage(Stage::EdgeToAck),
                queue_wait: stage(Stage::QueueWait),
                flush: stage(Stage::Flush),
            },
        }
    }

    fn lock(&self, stage: Stage) -> std::sync::MutexGuard<'_, Window> {
        let window = match stage {
            Stage::IngestToAck => &self.ingest_to_ack,
            Stage::EdgeToAck => &self.edge_to_ack,
            Stage::QueueWait => &self.queue_wait,
            Stage::Flush => &self.flush,
        };
        // A panic while recording leaves at worst a half-counted sample: keep going.
        window.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A fresh microsecond histogram: 1 µs to [`MAX_MICROS`], [`SIGFIG`] digits.
pub fn histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, MAX_MICROS, SIGFIG) {
        Ok(h) => h,
        // The bounds are constants that HdrHistogram accepts (1 < 2 · 60e6, 3 digits).
        Err(e) => unreachable!("constant histogram bounds: {e}"),
    }
}

/// Per-bucket counts over doubling bounds (see [`Summary::distribution`]).
fn distribution(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    let mut bounds = vec![FIRST_BOUND_MICROS];
    while bounds.len() < MAX_BOUNDS && bounds[bounds.len() - 1] < h.max() {
        bounds.push(bounds[bounds.len() - 1] * 2);
    }
    let mut counts = vec![0u64; bounds.len()];
    for v in h.iter_recorded() {
        // A value counts where the lowest value of its HdrHistogram bucket falls.
        let value = h.lowest_equivalent(v.value_iterated_to());
        let i = bounds.partition_point(|&b| b < value).min(bounds.len() - 1);
        counts[i] += v.count_at_value();
    }
    bounds.into_iter().zip(counts).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn values_age_out_of_the_window_and_stay_since_start() {
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        w.record(1_000, t0);
        w.record(2_000, t0 + S / 2);
        w.record(50_000, t0 + 3 * S);
        let count = |w: &Window, range, at| w.histogram(range, at).len();
        assert_eq!(count(&w, Range::Window, t0 + 3 * S), 3);
        // Second 0 is still inside the window during second 9, gone in second 10.
        assert_eq!(count(&w, Range::Window, t0 + 9 * S + S / 2), 3);
        assert_eq!(count(&w, Range::Window, t0 + 10 * S), 1);
        let h = w.histogram(Range::Window, t0 + 10 * S);
        assert!(h.equivalent(h.max(), 50_000), "{}", h.max());
        assert_eq!(count(&w, Range::Window, t0 + 13 * S), 0);
        assert_eq!(count(&w, Range::SinceStart, t0 + 13 * S), 3);
    }

    #[test]
    fn a_reused_slot_forgets_its_old_second() {
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        w.record(7, t0 + 2 * S);
        // Second 12 reuses second 2's slot.
        w.record(9, t0 + 12 * S);
        let h = w.histogram(Range::Window, t0 + 12 * S);
        assert_eq!((h.len(), h.min(), h.max()), (1, 9, 9));
        assert_eq!(w.histogram(Range::SinceStart, t0 + 12 * S).len(), 2);
    }

    #[test]
    fn a_read_from_before_a_record_does_not_see_it() {
        // The window never counts slots from the "future" (e.g. a reader's older `now`).
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        w.record(5, t0 + 5 * S);
        assert_eq!(w.histogram(Range::Window, t0 + 4 * S).len(), 0);
    }

    #[test]
    fn huge_values_are_clamped_not_lost() {
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        w.record(u64::MAX, t0);
        let h = w.histogram(Range::SinceStart, t0);
        assert_eq!(h.len(), 1);
        assert!(h.max() >= MAX_MICROS);
    }

    #[test]
    fn summary_percentiles_and_distribution() {
        let mut h = histogram();
        for us in 1..=1000u64 {
            h.record(us * 10).unwrap(); // 10 µs .. 10 ms
        }
        let s = Summary::of(&h);
        assert_eq!((s.count, s.min), (1000, 10));
        // Within HdrHistogram's precision (3 digits: 0.1%).
        let close = |got: f64, want: f64| (got - want).abs() <= want / 1000.0;
        assert!(close(s.p50 as f64, 5_000.0), "{s:?}");
        assert!(close(s.p99 as f64, 9_900.0), "{s:?}");
        assert!(close(s.max as f64, 10_000.0), "{s:?}");
        assert!(close(s.mean, 5_005.0), "{s:?}");
        let bounds: Vec<u64> = s.distribution.iter().map(|b| b.0).collect();
        assert_eq!(bounds, [100, 200, 400, 800, 1600, 3200, 6400, 12800]);
        let counts: Vec<u64> = s.distribution.iter().map(|b| b.1).collect();
        // ≤100: 10..=100 (10 values); (100, 200]: 110..=200 (10); …; (6400, 12800]: 360.
        assert_eq!(counts, [10, 10, 20, 40, 80, 160, 320, 360]);
        assert_eq!(counts.iter().sum::<u64>(), 1000);
    }

    #[test]
    fn the_distribution_is_capped_and_its_last_bucket_takes_the_rest() {
        let mut h = histogram();
        h.record(50).unwrap();
        h.record(30_000_000).unwrap();
        let d = Summary::of(&h).distribution;
        assert_eq!(d.len(), MAX_BOUNDS);
        assert_eq!(d[0], (100, 1));
        assert_eq!(d[MAX_BOUNDS - 1], (100 << 16, 1));
    }

    #[test]
    fn an_empty_summary_is_zero() {
        let s = Summary::of(&histogram());
        assert_eq!((s.count, s.p50, s.p99, s.max, s.mean), (0, 0, 0, 0, 0.0));
        assert_eq!(s.distribution, [(100, 0)]);
    }

    #[test]
    fn the_report_has_every_stage_in_microseconds() {
        let t0 = Instant::now();
        let l = Latency::new(t0);
        l.record(Stage::Flush, Duration::from_millis(2), t0 + S);
        let r = l.report(t0 + 2 * S);
        assert_eq!((r.uptime_secs, r.window_secs, r.unit), (2.0, 10, "us"));
        assert_eq!(r.stages.flush.window.count, 1);
        assert_eq!(r.stages.flush.since_start.p50, 2_000);
        assert_eq!(r.stages.ingest_to_ack.window.count, 0);
        let json = serde_json::to_value(&r).unwrap();
        let keys: Vec<&String> = json["stages"].as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 4);
        for s in Stage::ALL {
            assert_eq!(Stage::parse(s.as_str()), Some(s));
            assert!(json["stages"][s.as_str()]["since_start"]["distribution"].is_array());
        }
        assert_eq!(
            json["stages"]["flush"]["window"]["distribution"][4],
            serde_json::json!([1600, 0])
        );
        assert_eq!(
            json["stages"]["flush"]["window"]["distribution"][5],
            serde_json::json!([3200, 1])
        );
    }
}
