//! One task per queue shard: pops events, feeds them to its [`Batcher`] with the current time,
//! and hands ready batches to the sink (which waits for room in its ack window — backpressure
//! that ends up as `queue_full` at ingest). On shutdown it drains its shard and every open
//! batch before it ends.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::batcher::{Batcher, FlushReason, Limits};
use super::queue::Queues;
use crate::sink::Sink;

/// Events popped before the driver looks at deadlines and the sink again.
const POP_BUDGET: usize = 4096;

/// Runs shard `index` until `stop` turns true and everything queued is handed to the sink.
pub async fn run(
    queues: Arc<Queues>,
    index: usize,
    limits: Limits,
    flush_when_idle: bool,
    sink: Arc<Sink>,
    mut stop: watch::Receiver<bool>,
) {
    let shard = queues.shard(index);
    let mut batcher = Batcher::new(limits);
    let mut ready = Vec::new();
    let mut closing = *stop.borrow();
    loop {
        let now = Instant::now();
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
            if flush_when_idle && sink.in_flight() == 0 {
                batcher.flush_all(FlushReason::Idle, &mut ready);
            }
        }
        for batch in ready.drain(..) {
            sink.publish(batch).await;
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
            _ = sink.idle(), if flush_when_idle && deadline.is_some() => {}
            _ = stop.changed(), if !closing => closing = true,
        }
        closing |= queues.is_closed();
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d.into()).await
    }
}
