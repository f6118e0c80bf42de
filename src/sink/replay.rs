//! Replay from the disk spool: publishes what the spool holds, oldest first, with the original
//! Msg-Ids, whenever a cluster is active, and marks each record done on its PubAck (a segment
//! is deleted once all of its records are). On a failure it starts over from the oldest record
//! not done: JetStream drops the copies it already has (duplicate window).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::flight::MAX_BACKOFF;
use super::window::{message, permanent};
use super::{Sink, NONE};
use crate::shutdown::Shutdown;
use crate::spool::{Spool, Spooled};
use async_nats::jetstream::context::PublishError;

/// Spooled batches replayed at once (published before their acks are awaited).
const REPLAY_WINDOW: usize = 64;

impl Sink {
    /// The replay task: runs until `stop` turns true.
    pub(super) async fn replay(self: Arc<Self>, spool: Arc<Spool>, mut stop: Shutdown) {
        let mut backoff = self.flight.backoff;
        let mut replayed = 0u64;
        loop {
            if spool.is_empty() {
                if replayed > 0 {
                    tracing::info!(batches = replayed, "spool replayed: nothing waits on disk");
                    replayed = 0;
                }
                tokio::select! {
                    _ = spool.appended() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.requested() => return,
                }
                continue;
            }
            let i = self.active.load(Ordering::Relaxed);
            if i == NONE {
                tokio::select! {
                    _ = self.switched.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = stop.requested() => return,
                }
                continue;
            }
            let records = match spool.next_batch(REPLAY_WINDOW).await {
                Ok(r) if r.is_empty() => {
                    // Everything handed out is in flight or done; look again shortly.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the spool");
                    tokio::time::sleep(MAX_BACKOFF).await;
                    continue;
                }
            };
            match self.replay_on(i, &spool, records).await {
                Ok(n) => {
                    replayed += n;
                    backoff = self.flight.backoff;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "spool replay attempt failed; starting over from the oldest");
                    spool.rewind().await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Publishes `records` to cluster `i`, all at once, and marks each acknowledged one done.
    async fn replay_on(
        &self,
        i: usize,
        spool: &Spool,
        records: Vec<Spooled>,
    ) -> Result<u64, PublishError> {
        let js = &self.clusters[i].js;
        let mut acks = Vec::with_capacity(records.len());
        for r in &records {
            let events = r.record.events as usize;
            let msg = message(&r.record.msg_id, r.record.batch.clone(), events);
            acks.push(js.send_publish(r.record.subject.clone(), msg).await);
        }
        let mut replayed = 0;
        let mut failure = None;
        for (r, ack) in records.iter().zip(acks) {
            let result = match ack {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match result {
                Ok(_) => {
                    spool.done(r.id);
                    replayed += 1;
                }
                Err(e) => {
                    if let Some(refusal) = permanent(&e) {
                        // A retry will not change it (e.g. the batch is over max_payload):
                        // replaying it forever would block everything behind it.
                        tracing::error!(batch = %r.record.msg_id, %refusal,
                            "JetStream refuses a spooled batch: dropping it from the spool");
                        spool.done(r.id);
                        continue;
                    }
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            None => {
                self.observe(i, |r, now| r.acked(i, now));
                Ok(replayed)
            }
            Some(e) => {
                self.observe(i, |r, now| r.failed(i, now));
                Err(e)
            }
        }
    }
}
