//! The flags of a mode's own subcommand: the mode's, then the event shape, the load shape, the
//! report and the harness flags every mode shares (`--consume`, `--find-max`, `--relay-pid`).
//! Data only: they sit here, below the harness that reads them, so that a mode's tests parse
//! exactly what its subcommand takes.

use std::time::Duration;

use crate::consume::ConsumeArgs;
use crate::events::EventArgs;
use crate::report::ReportArgs;
use crate::schedule::{parse_duration, RunArgs};

/// Harness flags shared by every mode and `compare`.
#[derive(Clone, Debug, clap::Args)]
pub struct HarnessArgs {
    #[command(flatten)]
    pub consume: ConsumeArgs,

    #[command(flatten)]
    pub find_max: FindMaxArgs,

    /// Process id of the relay under load: its CPU time (user + system, /proc/PID/stat) is
    /// read before and after each run and reported as relay CPU µs per event. `compare`: the
    /// relay of the https, h3 and quic modes.
    #[arg(long, value_name = "PID")]
    pub relay_pid: Option<u32>,
}

/// Flags of `--find-max`.
#[derive(Clone, Debug, clap::Args)]
pub struct FindMaxArgs {
    /// Find the highest rate whose p99 stays under --slo-p99-ms: runs of --warmup + --duration
    /// from --rate up, ×1.5 per step until the SLO breaks or errors appear, then a bisection
    /// between the last good and the first bad rate.
    #[arg(long, requires = "slo_p99_ms")]
    pub find_max: bool,

    /// The p99 latency objective in milliseconds (send→answer; with --consume also
    /// send→consumer). `compare` draws it on the plot even without --find-max.
    #[arg(long, value_name = "MS", value_parser = parse_slo)]
    pub slo_p99_ms: Option<f64>,

    /// Most runs a --find-max search makes (ramp and bisection together).
    #[arg(long, value_name = "N", default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..))]
    pub find_max_steps: u32,

    /// Longest a --find-max search may take; no step starts that would end after it.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub find_max_time: Duration,
}

/// The flags of a mode's own subcommand: the mode's, then the event shape, the load shape,
/// the report and the harness flags every mode shares.
#[derive(Clone, Debug, clap::Args)]
pub struct ModeArgs<M: clap::Args> {
    #[command(flatten)]
    pub mode: M,

    #[command(flatten)]
    pub events: EventArgs,

    #[command(flatten)]
    pub run: RunArgs,

    #[command(flatten)]
    pub report: ReportArgs,

    #[command(flatten)]
    pub harness: HarnessArgs,
}

/// Parses `--slo-p99-ms`: a positive number of milliseconds.
fn parse_slo(s: &str) -> Result<f64, String> {
    parse_positive(s).map_err(|_| format!("`{s}` is not a positive number of milliseconds"))
}

/// A positive, finite number (a flag's value parser).
pub fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("`{s}` is not a positive number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slo_must_be_positive() {
        assert_eq!(parse_slo("100"), Ok(100.0));
        assert!(parse_slo("0").is_err());
        assert!(parse_slo("-5").is_err());
        assert!(parse_slo("x").is_err());
    }
}
