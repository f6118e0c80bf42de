//! One task per queue shard: pops events, feeds them to its [`Batcher`] with the current time,
//! and hands ready batches to the sink (which waits for room in its ack window — backpressure
//! that ends up as `queue_full` at ingest). On shutdown it drains its shard and every open
//! batch before it ends.
//!
//! Each driver records a heartbeat in [`Heartbeats`] every time it goes round its loop; an
//! idle driver still wakes every [`Options::heartbeat`] to record one. The systemd watchdog
//! ([`crate::systemd`]) pings only while every heartbeat is fresh, so a driver stuck inside a
//! call (the sink's publish waits at most `nats.publish_deadline_ms` for the ack window) stops
//! the pings.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::batcher::{Batcher, FlushReason, Limits, Ready};
use super::early::EarlyFlushes;
use super::queue::Queues;
use crate::event::Pending;
use crate::shutdown::Shutdown;

/// Events popped before the driver looks at deadlines and the sink again.
const POP_BUDGET: usize = 4096;

/// Test hook, read once at start-up: `EDGERELAY_FAULT_WEDGE_FLUSH=1` makes every driver block
/// forever after handing its first batch to the sink — a wedged flush path, for the test that
/// the watchdog pings stop. Inert unless set to exactly `1`; never set it in production.
pub const FAULT_WEDGE_FLUSH_ENV: &str = "EDGERELAY_FAULT_WEDGE_FLUSH";

/// A heartbeat value meaning "this driver has finished" (it drained and returned): not stuck.
const DONE: u64 = u64::MAX;

/// Where a driver hands its ready batches: the sink ([`crate::sink::Sink`]), seen from the
/// batch side so that batching does not depend on publishing.
pub trait Publish: Send + Sync + 'static {
    /// Publishes one ready batch. May wait for room in the ack window (at most the publish
    /// deadline); every event of the batch is answered once, now or later.
    fn publish(self: &Arc<Self>, batch: Ready<Pending>) -> impl Future<Output = ()> + Send;

    /// Batches published and not yet answered.
    fn in_flight(&self) -> usize;

    /// Resolves the next time the last batch in flight is answered.
    fn idle(&self) -> impl Future<Output = ()> + Send;

    /// The round trip to NATS lately, if known.
    fn round_trip(&self) -> Option<Duration>;
}

/// How a driver batches: the part of `[batch]` a reload may change. Drivers read it from a
/// `watch` channel at the top of each loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub limits: Limits,
    /// Flush open batches as soon as nothing is in flight (`batch.flush_when_idle`)...
    pub flush_when_idle: bool,
    /// ...and, while batches are in flight, at up to this many times a second
    /// (`batch.early_flushes_per_sec`, [`EarlyFlushes`]).
    pub early_flushes_per_sec: u32,
}

/// How a driver paces itself (fixed for the life of the process).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The longest an idle driver waits on its queue before it records a heartbeat anyway.
    pub heartbeat: Duration,
    /// [`FAULT_WEDGE_FLUSH_ENV`]: block forever after the first batch (tests only).
    pub wedge_after_first_batch: bool,
}

/// When each driver last went round its loop (milliseconds since `start`).
#[derive(Debug)]
pub struct Heartbeats {
    start: Instant,
    beats: Box<[AtomicU64]>,
}

impl Heartbeats {
    /// `drivers` heartbeats, all fresh at `now`.
    pub fn new(drivers: usize, now: Instant) -> Self {
        Self { start: now, beats: (0..drivers).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Driver `index` is alive at `now`.
    pub fn beat(&self, index: usize, now: Instant) {
        let ms = now.saturating_duration_since(self.start).as_millis() as u64;
        self.beats[index].store(ms.min(DONE - 1), Ordering::Relaxed);
    }

    /// Driver `index` returned: it no longer counts as stuck.
    pub fn done(&self, index: usize) {
        self.beats[index].store(DONE, Ordering::Relaxed);
    }

    /// The longest any running driver has gone without a heartbeat, at `now`.
    pub fn oldest(&self, now: Instant) -> Duration {
        let now_ms = now.saturating_duration_since(self.start).as_millis() as u64;
        let oldest = self
            .beats
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .filter(|&b| b != DONE)
            .min()
            .map_or(0, |b| now_ms.saturating_sub(b));
        Duration::from_millis(oldest)
    }
}

/// Runs shard `index` until `stop` turns true and everything queued is handed to the sink.
pub async fn run<P: Publish>(
    queues: Arc<Queues>,
    index: usize,
    options: Options,
    batching: watch::Receiver<Batching>,
    sink: Arc<P>,
    heartbeats: Arc<Heartbeats>,
    stop: Shutdown,
) {
    drive(&queues, index, options, batching, &sink, &heartbeats, stop).await;
    heartbeats.done(index);
}

async fn drive<P: Publish>(
    queues: &Queues,
    index: usize,
    options: Options,
    mut batching: watch::Receiver<Batching>,
    sink: &Arc<P>,
    heartbeats: &Heartbeats,
    mut stop: Shutdown,
) {
    let Options { heartbeat, wedge_after_first_batch } = options;
    let shard = queues.shard(index);
    let mut current = *batching.borrow_and_update();
    let mut batcher = Batcher::new(current.limits);
    let mut early = EarlyFlushes::new(current.early_flushes_per_sec);
    let mut ready = Vec::new();
    let mut closing = stop.is_shutdown();
    loop {
        let now = Instant::now();
        heartbeats.beat(index, now);
        if batching.has_changed().unwrap_or(false) {
            current = *batching.borrow_and_update();
            batcher.set_limits(current.limits);
            early.set_rate(current.early_flushes_per_sec);
        }
        let mut popped = 0;
        while popped < POP_BUDGET {
            let Some(p) = shard.pop() else { break };
            batcher.push(p, now, &mut ready);
            popped += 1;
        }
        if closing {
            batcher.flush_all(FlushReason::Drain, &mut ready);
        } else {
            batcher.poll_flush(now, &mut ready);
            if current.flush_when_idle && !batcher.is_empty() {
                let (open, linger) = (batcher.open_batches(), current.limits.linger);
                let due = early.due(open, sink.in_flight(), sink.round_trip(), linger, now);
                batcher.flush_oldest(due, FlushReason::Idle, &mut ready);
            }
        }
        let published = !ready.is_empty();
        for batch in ready.drain(..) {
            sink.publish(batch).await;
        }
        if published && wedge_after_first_batch {
            tracing::warn!(
                shard = index,
                "{FAULT_WEDGE_FLUSH_ENV}: batch driver wedged on purpose"
            );
            return std::future::pending().await;
        }
        if closing && batcher.is_empty() && shard.is_drained() {
            return;
        }
        if popped == POP_BUDGET {
            tokio::task::yield_now().await;
            continue;
        }
        let deadline = batcher.next_deadline();
        tokio::select! {
            _ = shard.notified() => {}
            _ = sleep_until(deadline), if deadline.is_some() => {}
            // A missed wake-up here costs at most the linger time.
            _ = sink.idle(), if current.flush_when_idle && deadline.is_some() => {}
            _ = stop.requested(), if !closing => closing = true,
            // Idle, but alive: go round the loop to record a heartbeat.
            _ = tokio::time::sleep(heartbeat) => {}
        }
        closing |= queues.is_closed();
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d.into()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_heartbeat_ignores_finished_drivers() {
        let t0 = Instant::now();
        let h = Heartbeats::new(3, t0);
        h.beat(0, t0 + Duration::from_millis(900));
        h.beat(1, t0 + Duration::from_millis(400));
        h.beat(2, t0 + Duration::from_millis(100));
        let now = t0 + Duration::from_millis(1000);
        assert_eq!(h.oldest(now), Duration::from_millis(900));
        h.done(2);
        assert_eq!(h.oldest(now), Duration::from_millis(600));
        h.done(0);
        h.done(1);
        assert_eq!(h.oldest(now), Duration::ZERO);
    }
}
