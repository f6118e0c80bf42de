//! Open-loop, coordinated-omission-correct request driver shared by every mode.
//!
//! Request `i` has an intended send time `start + i / rate`, fixed before the run starts. A
//! pacer thread releases one permit per request when its intended time comes; a pool of
//! workers takes permits, claims indices in order and sends. Latency is measured from the
//! *intended* time to completion (like wrk2): when every worker is busy, permits pile up and
//! the wait shows up as latency instead of silently lowering the offered load.
//!
//! Rates are in events per second; a mode that packs `E` events into one request runs the
//! schedule at `rate / E` requests per second. Outcomes are counted per event (a request may
//! have some events accepted and others refused), latency once per request whose events were
//! all accepted.
//!
//! `--rate 0` runs a *closed loop* instead, to find the maximum throughput: every worker sends
//! its next request as soon as the previous one is answered, for the warm-up and the
//! measurement window (a request belongs to the phase in which it was sent). Latency is then
//! measured from the actual send time, so it is not coordinated-omission-corrected.
//!
//! The pacer is an OS thread rather than a tokio timer because tokio rounds every deadline up
//! to the next whole millisecond, which would add up to 1 ms of the generator's own lateness to
//! every sub-millisecond latency. It sleeps until shortly before each due time and spins the
//! rest (`--pacer-spin`): a sleeping thread wakes ~0.1 ms late (timer slack), spinning brings
//! that to a few microseconds at the cost of up to one core. What lateness remains is reported
//! as "generator queueing".
//!
//! Nothing here knows about HTTP: a mode hands in one [`Worker`] per unit of concurrency and
//! gets [`Measurements`] back.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use hdrhistogram::Histogram;
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, MissedTickBehavior};

use crate::events;
use crate::model::{self, Failure, Measurements, Outcome, Phase, Schedule, Tally};

/// Longest the pacer sleeps at once, so it notices Ctrl-C promptly even at very low rates.
const PACER_MAX_SLEEP: Duration = Duration::from_millis(20);

/// Load shape flags shared by every mode.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Offered load in events per second: open loop, constant rate, independent of how fast the
    /// server answers. 0 = closed loop: every worker sends again as soon as it is answered, to
    /// measure the maximum rate (latency then counts from the actual send time and is not
    /// coordinated-omission-corrected).
    #[arg(long, value_name = "EVENTS_PER_SEC", value_parser = parse_rate)]
    pub rate: f64,

    /// How long to measure, after the warm-up (e.g. 500ms, 10s, 2m).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Warm-up before measuring: requests are sent at the same rate but not recorded.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Per-request timeout, from the moment the request is sent (includes any reconnect).
    /// Requests still waiting for a free worker this long after the measurement window are
    /// counted as `unsent` instead of being sent.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// The pacer thread busy-waits this long before each due time instead of sleeping: more
    /// precise send times (a few µs instead of ~0.1 ms late) for up to one CPU core. 0 = never
    /// spin.
    #[arg(long, value_name = "DURATION", default_value = "200us", value_parser = parse_duration)]
    pub pacer_spin: Duration,
}

/// One unit of concurrency of a mode: sends one request at a time.
pub trait Worker: Send + 'static {
    /// Sends request number `seq`, due at `intended_unix_ns` (see [`crate::events::unix_ns`];
    /// for the payload stamp), and waits until it is answered, failed or timed out. Must
    /// return within about `--timeout`; the driver does not cancel it.
    fn send(&mut self, seq: u64, intended_unix_ns: u64) -> impl Future<Output = Outcome> + Send;
}

/// What one worker task measured; merged into [`Measurements`].
struct WorkerMeasurements {
    latency: Histogram<u64>,
    queueing: Histogram<u64>,
    measured: Tally,
    warmup: Tally,
    acked: Vec<u64>,
    last_completion: Option<Instant>,
    interrupted: bool,
}

/// State shared by the pacer, the worker tasks and the progress printer.
struct Shared {
    schedule: Schedule,
    start: Instant,
    /// After this instant requests are no longer sent but counted as [`Failure::Unsent`].
    hard_stop: Instant,
    /// One permit per request whose intended time has come, plus one end-of-run permit per
    /// worker; closed on Ctrl-C.
    due: Semaphore,
    /// Next request index to claim.
    next: AtomicU64,
    /// Requests sent.
    sent: AtomicU64,
    /// Events accepted.
    ok: AtomicU64,
    /// Events not accepted.
    failed: AtomicU64,
}

impl RunArgs {
    /// The schedule these flags ask for, for requests of `events_per_request` events: open
    /// loop at `--rate`, or closed loop for `--rate 0`.
    pub fn schedule(&self, events_per_request: u32) -> anyhow::Result<Schedule> {
        if self.rate == 0.0 {
            Schedule::closed(events_per_request, self.warmup, self.duration)
        } else {
            Schedule::open(self.rate, events_per_request, self.warmup, self.duration)
        }
    }
}

impl WorkerMeasurements {
    fn new() -> Self {
        Self {
            latency: model::histogram(),
            queueing: model::histogram(),
            measured: Tally::default(),
            warmup: Tally::default(),
            acked: Vec::new(),
            last_completion: None,
            interrupted: false,
        }
    }

    fn merge(&mut self, other: &WorkerMeasurements) -> anyhow::Result<()> {
        self.latency.add(&other.latency)?;
        self.queueing.add(&other.queueing)?;
        self.measured.merge(&other.measured);
        self.warmup.merge(&other.warmup);
        self.acked.extend_from_slice(&other.acked);
        self.last_completion = self.last_completion.max(other.last_completion);
        self.interrupted |= other.interrupted;
        Ok(())
    }
}

/// Runs `schedule` over `workers` until every request has been sent (closed loop: until the
/// time is up) or `stop` turns true.
///
/// Requests still waiting for a worker `--timeout` after the measurement window ends are
/// counted as [`Failure::Unsent`] instead of being sent. Prints a progress line to stderr every
/// second.
pub async fn run<W: Worker>(
    schedule: Schedule,
    args: &RunArgs,
    workers: Vec<W>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Measurements> {
    ensure!(!workers.is_empty(), "no workers to drive");
    let start = Instant::now();
    let shared = Arc::new(Shared {
        schedule,
        start,
        hard_stop: start + schedule.warmup() + schedule.duration() + args.timeout,
        due: Semaphore::new(0),
        next: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });

    let pacer = {
        let shared = Arc::clone(&shared);
        let workers = workers.len();
        let spin = args.pacer_spin;
        std::thread::Builder::new()
            .name("loadtest-pacer".to_owned())
            .spawn(move || pace(&shared, workers, spin, &stop))
            .context("starting the pacer thread")?
    };

    let mut live = Vec::with_capacity(workers.len());
    let mut tasks = Vec::with_capacity(workers.len());
    for worker in workers {
        let recent = Arc::new(Mutex::new(model::histogram()));
        live.push(Arc::clone(&recent));
        tasks.push(tokio::spawn(drive(worker, Arc::clone(&shared), recent)));
    }
    let progress = tokio::spawn(print_progress(Arc::clone(&shared), live));

    let mut total = WorkerMeasurements::new();
    let mut joined: anyhow::Result<()> = Ok(());
    for task in tasks {
        let merged = match task.await {
            Ok(measured) => total.merge(&measured),
            Err(error) => Err(error).context("worker task failed"),
        };
        joined = joined.and(merged);
    }
    progress.abort();
    // Ends the pacer, which waits for this (or for Ctrl-C) once everything is released.
    shared.due.close();
    let pacer = tokio::task::spawn_blocking(move || pacer.join()).await;
    if !matches!(pacer, Ok(Ok(()))) {
        joined = joined.and(Err(anyhow::anyhow!("pacer thread panicked")));
    }
    joined?;

    let measure_start = start + schedule.warmup();
    let window = measured_window(
        measure_start,
        measure_start + schedule.duration(),
        total.last_completion,
        total.interrupted,
    );
    Ok(Measurements {
        latency: total.latency,
        queueing: total.queueing,
        measured: total.measured,
        warmup: total.warmup,
        acked: total.acked,
        window,
        interrupted: total.interrupted,
    })
}

/// Releases a permit for each request as its intended time comes, then one end-of-run permit
/// per worker, then waits for the run to end. On `stop` it closes the semaphore, which ends
/// every worker once its request in flight is done; `run` closes it when the workers are done.
/// In a closed loop it only watches `stop`.
fn pace(shared: &Shared, workers: usize, spin: Duration, stop: &watch::Receiver<bool>) {
    let schedule = &shared.schedule;
    let start = shared.start.into_std();
    let Some(total) = schedule.total_requests() else {
        loop {
            if *stop.borrow() {
                shared.due.close();
            }
            if shared.due.is_closed() {
                return;
            }
            std::thread::sleep(PACER_MAX_SLEEP);
        }
    };
    let mut released = 0;
    loop {
        if *stop.borrow() {
            shared.due.close();
        }
        if shared.due.is_closed() {
            return;
        }
        if released == total {
            // Lets each worker claim an index past the end and return; workers still working
            // through a backlog can still be stopped.
            shared.due.add_permits(workers);
            released += 1;
        }
        if released > total {
            std::thread::sleep(PACER_MAX_SLEEP);
            continue;
        }
        let elapsed = start.elapsed();
        let mut due = released;
        while due < total && schedule.offset(due) <= elapsed {
            due += 1;
        }
        if due > released {
            shared.due.add_permits((due - released) as usize);
            released = due;
        }
        if released < total {
            let wait = schedule.offset(released).saturating_sub(start.elapsed());
            if wait > spin {
                std::thread::sleep((wait - spin).min(PACER_MAX_SLEEP));
            } else if !wait.is_zero() {
                std::thread::yield_now();
            }
        }
    }
}

/// One worker task. Open loop: take a permit, claim the next index, send, record. Closed
/// loop: claim the next index and send at once, until the time is up.
async fn drive<W: Worker>(
    mut worker: W,
    shared: Arc<Shared>,
    recent: Arc<Mutex<Histogram<u64>>>,
) -> WorkerMeasurements {
    let schedule = shared.schedule;
    let events = schedule.events_per_request();
    let closed_loop = schedule.is_closed_loop();
    let mut m = WorkerMeasurements::new();
    loop {
        let (i, phase, intended, sent_at) = if closed_loop {
            if shared.due.is_closed() {
                m.interrupted = true;
                break;
            }
            let now = Instant::now();
            let Some(phase) = schedule.phase_at(now.duration_since(shared.start)) else {
                break;
            };
            (shared.next.fetch_add(1, Ordering::Relaxed), phase, now, now)
        } else {
            match shared.due.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_closed) => {
                    m.interrupted = true;
                    break;
                }
            }
            // Permits are released in index order, so the claimed request is already due.
            let i = shared.next.fetch_add(1, Ordering::Relaxed);
            let Some(phase) = schedule.phase(i) else {
                break;
            };
            let sent_at = Instant::now();
            if sent_at >= shared.hard_stop {
                if phase == Phase::Measured {
                    m.measured.record(&Outcome::Failed(Failure::Unsent), events);
                }
                continue;
            }
            (i, phase, shared.start + schedule.offset(i), sent_at)
        };

        shared.sent.fetch_add(1, Ordering::Relaxed);
        let outcome = worker.send(i, events::unix_ns(intended.into_std())).await;
        let done = Instant::now();

        let accepted = outcome.accepted(events);
        shared.ok.fetch_add(accepted, Ordering::Relaxed);
        shared.failed.fetch_add(u64::from(events) - accepted, Ordering::Relaxed);
        if outcome.is_accepted() {
            recent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .saturating_record(micros(latency(intended, done)));
        }
        match phase {
            Phase::Warmup => m.warmup.record(&outcome, events),
            Phase::Measured => {
                m.measured.record(&outcome, events);
                m.last_completion = m.last_completion.max(Some(done));
                if outcome.is_accepted() {
                    m.latency.saturating_record(micros(latency(intended, done)));
                    m.queueing.saturating_record(micros(latency(intended, sent_at)));
                    if schedule.tracks_acked() {
                        m.acked.push(i);
                    }
                }
            }
        }
    }
    m
}

/// Prints one line per second to stderr: phase, send rate (events/s), event totals and the
/// last second's p99.
async fn print_progress(shared: Arc<Shared>, live: Vec<Arc<Mutex<Histogram<u64>>>>) {
    let mut tick =
        tokio::time::interval_at(shared.start + Duration::from_secs(1), Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_sent = 0;
    let mut last_tick = shared.start;
    let mut second = model::histogram();
    loop {
        let now = tick.tick().await;
        second.reset();
        for recent in &live {
            let mut recent = recent.lock().unwrap_or_else(PoisonError::into_inner);
            // Same bounds on both sides, so this cannot fail.
            let _ = second.add(&*recent);
            recent.reset();
        }
        let sent = shared.sent.load(Ordering::Relaxed);
        let elapsed = now.duration_since(shared.start);
        let rate = (sent - last_sent) as f64 * f64::from(shared.schedule.events_per_request())
            / now.duration_since(last_tick).as_secs_f64();
        // The phase the past second started in.
        let since = last_tick.duration_since(shared.start);
        let phase = if since < shared.schedule.warmup() {
            "warmup"
        } else if since < shared.schedule.warmup() + shared.schedule.duration() {
            "run"
        } else {
            "drain"
        };
        let p99 = if second.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.2}ms", model::millis(second.value_at_quantile(0.99)))
        };
        let offered = match shared.schedule.rate() {
            Some(rate) => format!("{rate}/s"),
            None => "max".to_owned(),
        };
        eprintln!(
            "[{:>4}s] {phase:<6} offered {offered}  sent {rate:.0}/s  ok {}  failed {}  p99(1s) {p99}",
            elapsed.as_secs(),
            shared.ok.load(Ordering::Relaxed),
            shared.failed.load(Ordering::Relaxed),
        );
        last_sent = sent;
        last_tick = now;
    }
}

/// Coordinated-omission-correct latency: from when the request *should* have been sent, not
/// from when it was.
pub fn latency(intended: Instant, completed: Instant) -> Duration {
    completed.saturating_duration_since(intended)
}

/// The window the achieved rate is computed over: the nominal window, stretched to the last
/// measured completion (a slow server delivers its answers late), or cut short on interruption.
pub fn measured_window(
    measure_start: Instant,
    measure_end: Instant,
    last_completion: Option<Instant>,
    interrupted: bool,
) -> Duration {
    let last = last_completion.unwrap_or(measure_start);
    let end = if interrupted { last.min(measure_end) } else { last.max(measure_end) };
    end.saturating_duration_since(measure_start)
}

/// Whole microseconds, saturating.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Parses `--rate`: a positive, finite number of events per second, or 0 for a closed loop.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(rate),
        _ => Err(format!(
            "`{s}` is not a number of events per second (0 = closed loop, as fast as answered)"
        )),
    }
}

/// Parses a duration like `250us`, `500ms`, `10s`, `1.5s`, `2m`, `1h`, or a bare `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{s}` has no unit (use us, ms, s, m or h, e.g. 10s)"))?;
    let (number, unit) = s.split_at(split);
    let unit_nanos: u64 = match unit {
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use us, ms, s, m or h)")),
    };
    let nanos = match number.parse::<u64>() {
        Ok(whole) => whole.checked_mul(unit_nanos),
        Err(_) => {
            let value: f64 =
                number.parse().map_err(|_| format!("`{s}` does not start with a number"))?;
            let nanos = (value * unit_nanos as f64).round();
            (nanos < u64::MAX as f64).then_some(nanos as u64)
        }
    };
    nanos.map(Duration::from_nanos).ok_or_else(|| format!("`{s}` is out of range"))
}

/// A watch that turns true on the first Ctrl-C.
pub fn stop_on_ctrl_c() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: finishing requests in flight (Ctrl-C again to quit now)");
            let _ = tx.send(true);
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_bad_durations() {
        for bad in ["10", "", "s", "10x", "-1s", "1..2s", "ms10"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn latency_counts_from_the_intended_time() {
        let start = Instant::now();
        let s = Schedule::open(100.0, 1, Duration::ZERO, Duration::from_secs(1)).unwrap();
        let intended = start + s.offset(10); // 100ms
                                             // Sent 400ms late because every worker was busy, answered 5ms after sending.
        let sent = intended + Duration::from_millis(400);
        let done = sent + Duration::from_millis(5);
        assert_eq!(latency(intended, done), Duration::from_millis(405));
        assert_eq!(latency(intended, sent), Duration::from_millis(400));
        // Never negative.
        assert_eq!(latency(done, intended), Duration::ZERO);
    }

    #[test]
    fn window_stretches_to_late_completions_and_shrinks_on_interrupt() {
        let start = Instant::now();
        let end = start + Duration::from_secs(10);
        let late = end + Duration::from_secs(2);
        let early = start + Duration::from_secs(4);
        assert_eq!(measured_window(start, end, Some(late), false), Duration::from_secs(12));
        assert_eq!(measured_window(start, end, Some(early), false), Duration::from_secs(10));
        assert_eq!(measured_window(start, end, Some(early), true), Duration::from_secs(4));
        assert_eq!(measured_window(start, end, None, true), Duration::ZERO);
    }

    #[test]
    fn a_closed_loop_is_phased_by_the_clock() {
        let args = RunArgs {
            rate: 0.0,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
            pacer_spin: Duration::ZERO,
        };
        let s = args.schedule(4).unwrap();
        assert!(s.is_closed_loop());
        assert_eq!(s.rate(), None);
        assert_eq!(s.measured_requests(), None);
        assert_eq!(s.events_per_request(), 4);
        assert_eq!(s.phase_at(Duration::from_millis(1999)), Some(Phase::Warmup));
        assert_eq!(s.phase_at(Duration::from_secs(2)), Some(Phase::Measured));
        assert_eq!(s.phase_at(Duration::from_millis(11_999)), Some(Phase::Measured));
        assert_eq!(s.phase_at(Duration::from_secs(12)), None);
        assert_eq!(parse_rate("0"), Ok(0.0));
        assert!(parse_rate("-1").is_err());
        assert!(!RunArgs { rate: 5.0, ..args }.schedule(1).unwrap().is_closed_loop());
    }
}
