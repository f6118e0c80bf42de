//! The data the load generator works on, at the bottom of the crate: the timetable of a run,
//! what became of each request, what a run measured and its summary. Plain types, `serde` and
//! arithmetic, no I/O: the driver (`schedule`), the consumer (`consume`), the reports
//! (`report`, `plot`), the modes and the scenarios all build on these and nothing here knows
//! about them.
//!
//! Latencies are recorded in microseconds ([`histogram`]) and reported in milliseconds.
//!
//! # Layout
//!
//! - `timetable`: [`Schedule`], which request is due when and which ones are measured.
//! - `outcome`: [`Outcome`] and [`Failure`] of one request, [`Tally`] and [`Measurements`]
//!   of a run.
//! - `summary`: [`RunInfo`], [`Measured`], [`Run`], [`E2e`], [`FindMax`] and the JSON
//!   summaries ([`Summary`], [`Percentiles`]).

mod outcome;
mod summary;
mod timetable;

use hdrhistogram::Histogram;

pub use outcome::{Failure, Measurements, Outcome, Tally};
pub use summary::{
    E2e, FindMax, FindMaxSummary, Measured, Percentiles, Run, RunInfo, Step, Summary,
};
pub use timetable::{Phase, Schedule};

/// Highest latency the histograms track, in microseconds; larger values are clamped to it.
const MAX_MICROS: u64 = 60_000_000;

/// Significant decimal digits kept by the histograms (and printed in `.hgrm`).
const SIGFIG: u8 = 3;

/// Microseconds per reported unit (milliseconds).
pub const MICROS_PER_MS: f64 = 1000.0;

/// A fresh microsecond latency histogram: 3 significant digits, up to 60 s.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, SIGFIG).expect("constant histogram bounds are valid")
}

/// Microseconds to milliseconds.
pub fn millis(micros: u64) -> f64 {
    micros as f64 / MICROS_PER_MS
}
