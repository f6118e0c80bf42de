//! One harness for every mode: what sits above one measured run. It builds the run's
//! schedule and events, connects the mode ([`Mode::connect`]), drives its workers with
//! `schedule`, and adds what is the same for every mode: `--consume` (a consumer reading the
//! stream during the run, see `consume`), `--relay-pid` (the relay's CPU time over the run)
//! and `--find-max` (a ramp of runs that finds the highest rate whose p99 stays under an SLO).
//! The scenarios (`compare`, `global`) use the same [`Target`] for several modes.
//!
//! A mode only knows how to connect and send; it is handed the [`RunArgs`] to use, so a ramp can
//! change the rate without touching its flags.

use std::time::Duration;

use anyhow::{bail, ensure};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::consume::{ConsumeArgs, Consumer, Source};
use crate::events::{self, EventArgs, Events};
pub use crate::mode::args::{FindMaxArgs, HarnessArgs, ModeArgs};
use crate::mode::{Connected, Mode};
use crate::model::{FindMax, Measured, Percentiles, Run, Step};
use crate::probe;
use crate::report;
use crate::schedule::{self, RunArgs};

/// NATS server of the consumer when nothing says otherwise.
const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";

/// Relative gap between the last good and the first bad rate at which the bisection stops.
const BISECT_PRECISION: f64 = 0.05;

/// Factor the ramp raises the rate by per step.
const RAMP_FACTOR: f64 = 1.5;

/// A mode with the events it sends and the relay it loads, ready to be measured at any load
/// shape.
#[derive(Clone, Debug)]
pub struct Target<M> {
    pub mode: M,
    pub events: EventArgs,
    /// The relay whose CPU time is read over each run (`--relay-pid`).
    pub relay_pid: Option<u32>,
}

/// Ramp, then bisection: the rates a `--find-max` search tries, given what passed.
#[derive(Clone, Debug)]
struct Search {
    next: Option<f64>,
    /// Highest rate that passed.
    good: Option<f64>,
    /// Lowest rate that failed.
    bad: Option<f64>,
}

impl<M: Mode> Target<M> {
    /// The mode's name in reports.
    pub fn name(&self) -> &'static str {
        self.mode.name()
    }

    /// The subject prefix in use: `--subject-prefix` or the mode's default.
    fn prefix(&self) -> String {
        let default = self.mode.default_subject_prefix();
        self.events.subject_prefix.clone().unwrap_or_else(|| default.to_owned())
    }

    /// Where `--consume` reads this mode's events; `None` when nothing stores them.
    fn source(&self, consume: &ConsumeArgs) -> Option<Source> {
        let stored = self.mode.stored()?;
        let nats_url = consume
            .consume_nats
            .clone()
            .or(stored.nats_url)
            .unwrap_or_else(|| DEFAULT_NATS.to_owned());
        Some(Source { nats_url, prefix: self.prefix(), decoding: stored.decoding })
    }

    /// Measures one run at the load shape of `run`, payloads stamped with `stamp` (and accepted
    /// requests tracked, for a consumer).
    pub async fn measure(
        &self,
        run: &RunArgs,
        stamp: Option<u64>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Measured> {
        ensure!(!run.timeout.is_zero(), "--timeout must be positive");
        let schedule =
            run.schedule(self.mode.events_per_request())?.tracking_acked(stamp.is_some());
        let events =
            Events::new(&self.events, self.mode.default_subject_prefix())?.stamped(stamp)?;
        let Connected { mut info, workers, close } = self.mode.connect(run, events).await?;
        info.mode = self.name();
        let measurements = schedule::run(schedule, run, workers, stop).await;
        if let Some(close) = close {
            close.await;
        }
        Ok(Measured { info, schedule, measurements: measurements? })
    }

    /// One run at `run`, with a consumer when `consume.consume` asks for one.
    pub async fn run(
        &self,
        run: &RunArgs,
        consume: &ConsumeArgs,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Run> {
        let source = consume.consume.then(|| self.source(consume)).flatten();
        let (consumer, stamp) = match &source {
            Some(source) => {
                self.mode.prepare(&source.prefix).await?;
                let nonce = events::nonce();
                (Some(Consumer::start(source, nonce, consume.consume_grace).await?), Some(nonce))
            }
            None => (None, None),
        };
        let pid = self.relay_pid;
        let cpu_before = pid.map(probe::cpu_time).transpose()?;
        let Measured { info, schedule, measurements } = self.measure(run, stamp, stop).await?;
        let relay_cpu = match (pid, cpu_before) {
            (Some(pid), Some(before)) => Some(probe::cpu_time(pid)?.saturating_sub(before)),
            _ => None,
        };
        let e2e = match consumer {
            Some(consumer) => {
                Some(consumer.finish(&measurements.acked, schedule.events_per_request()).await)
            }
            None => None,
        };
        Ok(Run { info, schedule, measurements, e2e, relay_cpu })
    }

    /// Searches the highest rate whose p99 meets `find.slo_p99_ms`, from `run.rate` up.
    pub async fn find_max(
        &self,
        run: &RunArgs,
        consume: &ConsumeArgs,
        find: &FindMaxArgs,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<FindMax> {
        let Some(slo) = find.slo_p99_ms else { bail!("--find-max needs --slo-p99-ms") };
        ensure!(run.rate > 0.0, "--find-max ramps up from --rate, which must be positive");
        let started = Instant::now();
        let step_time =
            run.warmup + run.duration + consume.consume_grace / 2 + Duration::from_secs(1);
        let mut search = Search::new(run.rate);
        let mut result = FindMax { slo_p99_ms: slo, steps: Vec::new(), best: None };
        while let Some(rate) = search.next() {
            if result.steps.len() >= find.find_max_steps as usize
                || started.elapsed() + step_time > find.find_max_time
                || *stop.borrow()
            {
                break;
            }
            let step_args = RunArgs { rate, ..run.clone() };
            let measured = self.run(&step_args, consume, stop.clone()).await?;
            let step = judge(rate, &measured, slo);
            eprintln!(
                "find-max {} step {}: {rate:.0}/s -> achieved {:.0}/s, p99 {:.2} ms{}, {} errors: {}",
                self.name(),
                result.steps.len() + 1,
                step.achieved_rate,
                step.p99_ms,
                step.e2e_p99_ms.map(|p| format!(", send->consumer p99 {p:.2} ms")).unwrap_or_default(),
                step.errors,
                step.why.as_deref().unwrap_or("meets the SLO"),
            );
            search.record(rate, step.ok);
            if step.ok {
                result.best = Some(measured);
            }
            result.steps.push(step);
        }
        Ok(result)
    }
}

impl Search {
    fn new(start: f64) -> Self {
        Self { next: Some(start), good: None, bad: None }
    }

    /// The next rate to try; `None` once the gap is within [`BISECT_PRECISION`].
    fn next(&self) -> Option<f64> {
        self.next
    }

    /// Records how `rate` did and picks the next one: ×1.5 while nothing failed, then the
    /// middle of the gap (from zero when even the first rate failed).
    fn record(&mut self, rate: f64, ok: bool) {
        if ok {
            self.good = Some(self.good.map_or(rate, |g| g.max(rate)));
        } else {
            self.bad = Some(self.bad.map_or(rate, |b| b.min(rate)));
        }
        self.next = match (self.good, self.bad) {
            (_, None) => Some(rate * RAMP_FACTOR),
            (good, Some(bad)) => {
                let good = good.unwrap_or(0.0);
                if (bad - good) / bad <= BISECT_PRECISION {
                    None
                } else {
                    // Whole events per second are plenty.
                    Some(((good + bad) / 2.0).round().max(1.0))
                        .filter(|mid| *mid > good && *mid < bad)
                }
            }
        };
    }
}

/// How a run at `rate` did against the SLO.
fn judge(rate: f64, run: &Run, slo: f64) -> Step {
    let latency = Percentiles::of(&run.measurements.latency);
    let errors = run.measurements.measured.failures();
    let e2e = run.e2e.as_ref().map(|e| (Percentiles::of(&e.latency), e.counts.missing));
    let why = if errors > 0 {
        Some(format!("{errors} errors"))
    } else if latency.count == 0 {
        Some("no answers".to_owned())
    } else if latency.p99 > slo {
        Some(format!("p99 {:.2} ms > {slo} ms", latency.p99))
    } else if let Some((_, missing)) = e2e.as_ref().filter(|(_, missing)| *missing > 0) {
        Some(format!("{missing} acknowledged events never reached the consumer"))
    } else if let Some((p, _)) = e2e.as_ref().filter(|(p, _)| p.p99 > slo) {
        Some(format!("send->consumer p99 {:.2} ms > {slo} ms", p.p99))
    } else {
        None
    };
    let window = run.measurements.window.as_secs_f64();
    Step {
        rate,
        achieved_rate: if window > 0.0 {
            run.measurements.measured.ok as f64 / window
        } else {
            0.0
        },
        errors,
        p99_ms: latency.p99,
        e2e_p99_ms: e2e.map(|(p, _)| p.p99),
        ok: why.is_none(),
        why,
    }
}

/// Runs one mode from its own subcommand: one run (or a `--find-max` search), then the table,
/// `--json` and `--hgrm`.
pub async fn run_single<M: Mode + clap::Args>(
    args: ModeArgs<M>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let ModeArgs { mode, events, run, report: report_args, harness } = args;
    let target = Target { mode, events, relay_pid: harness.relay_pid };
    if harness.find_max.find_max {
        let found = target.find_max(&run, &harness.consume, &harness.find_max, stop).await?;
        report::emit_find_max(&report_args, &found)?;
        let Some(best) = &found.best else {
            bail!(
                "no rate tried met p99 <= {} ms without errors (lowest tried: {:.0}/s)",
                found.slo_p99_ms,
                found.steps.iter().map(|s| s.rate).fold(f64::INFINITY, f64::min)
            );
        };
        println!(
            "max rate with p99 <= {} ms: {:.0} events/s ({} runs)",
            found.slo_p99_ms,
            best.schedule.rate().unwrap_or_default(),
            found.steps.len()
        );
        Ok(())
    } else {
        let measured = target.run(&run, &harness.consume, stop).await?;
        report::emit(&report_args, &measured, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a search against a server whose p99 breaks above `capacity`.
    fn search(start: f64, capacity: f64, max_steps: usize) -> (Vec<f64>, Option<f64>) {
        let mut s = Search::new(start);
        let mut tried = Vec::new();
        while let Some(rate) = s.next() {
            if tried.len() >= max_steps {
                break;
            }
            tried.push(rate);
            s.record(rate, rate <= capacity);
        }
        (tried, s.good)
    }

    #[test]
    fn the_search_ramps_then_bisects() {
        let (tried, best) = search(1000.0, 4000.0, 20);
        // Ramp ×1.5: 1000, 1500, 2250, 3375, 5062.5 (fails), then bisect 3375..5062.5.
        assert_eq!(&tried[..5], [1000.0, 1500.0, 2250.0, 3375.0, 5062.5]);
        let best = best.unwrap();
        assert!((4000.0 * (1.0 - 2.0 * BISECT_PRECISION)..=4000.0).contains(&best), "{best}");
        assert!(tried.len() < 12, "{tried:?}");
    }

    #[test]
    fn a_failing_start_bisects_down_from_zero() {
        let (tried, best) = search(1000.0, 300.0, 20);
        assert_eq!(&tried[..3], [1000.0, 500.0, 250.0]);
        let best = best.unwrap();
        assert!(best <= 300.0 && best > 250.0, "{best} from {tried:?}");
    }

    #[test]
    fn the_search_is_bounded_by_steps() {
        let (tried, _) = search(1.0, 1e12, 6);
        assert_eq!(tried.len(), 6);
        // Nothing passes: the search ends once the rates are whole events per second apart.
        let (tried, best) = search(10.0, 0.0, 100);
        assert_eq!(best, None);
        assert!(tried.len() < 10, "{tried:?}");
    }
}
