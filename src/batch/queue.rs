//! Bounded, sharded, lock-free queues between ingest and the batchers. Events of one subject
//! always land in the same shard (so one batcher sees them in order); a full shard refuses the
//! event instead of growing, which the edge sees as 503 `queue_full`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crossbeam_queue::ArrayQueue;
use tokio::sync::Notify;

use super::batcher::Item;
use crate::event::Pending;

/// Why an event was not queued.
#[derive(Debug)]
pub enum PushError {
    /// The shard is full.
    Full(Pending),
    /// The relay is draining.
    Closed(Pending),
}

/// All shards.
#[derive(Debug)]
pub struct Queues {
    shards: Box<[Shard]>,
    closed: AtomicBool,
}

/// One shard: its queue and the wake-up of its batcher task.
#[derive(Debug)]
pub struct Shard {
    queue: ArrayQueue<Pending>,
    notify: Notify,
    /// Pushes under way; draining waits for them so no event is left behind.
    pushing: AtomicUsize,
}

impl Queues {
    pub fn new(shards: usize, capacity: usize) -> Self {
        let shards = (0..shards.max(1))
            .map(|_| Shard {
                queue: ArrayQueue::new(capacity),
                notify: Notify::new(),
                pushing: AtomicUsize::new(0),
            })
            .collect();
        Self { shards, closed: AtomicBool::new(false) }
    }

    /// Queues `p` on its subject's shard and wakes that shard's batcher. A refused event comes
    /// back (by value: the refusal path must not allocate) so the caller can answer it.
    #[allow(clippy::result_large_err)]
    pub fn push(&self, p: Pending) -> Result<(), PushError> {
        let shard = &self.shards[shard_index(&p.event.subject, self.shards.len())];
        shard.pushing.fetch_add(1, Ordering::SeqCst);
        let result = if self.closed.load(Ordering::SeqCst) {
            Err(PushError::Closed(p))
        } else {
            shard.queue.push(p).map_err(PushError::Full)
        };
        shard.pushing.fetch_sub(1, Ordering::SeqCst);
        // Also on refusal: a draining batcher may be waiting for this push to end.
        shard.notify.notify_one();
        result
    }

    /// Refuses further pushes and wakes every batcher so it drains.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for s in self.shards.iter() {
            s.notify.notify_one();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn shard(&self, i: usize) -> &Shard {
        &self.shards[i]
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Events waiting in all shards.
    pub fn depth(&self) -> usize {
        self.shards.iter().map(|s| s.queue.len()).sum()
    }
}

impl Shard {
    pub fn pop(&self) -> Option<Pending> {
        self.queue.pop()
    }

    /// Waits until something was pushed (or the queues were closed) since the last call.
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// True once nothing is queued and no push is under way (meaningful after `close`).
    pub fn is_drained(&self) -> bool {
        self.pushing.load(Ordering::SeqCst) == 0 && self.queue.is_empty()
    }
}

/// FNV-1a: cheap, stable, good enough to spread subjects over a few shards.
fn shard_index(subject: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in subject.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

impl Item for Pending {
    fn subject(&self) -> &str {
        &self.event.subject
    }

    fn size(&self) -> usize {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Reply;
    use std::time::Instant;

    fn pending(subject: &str) -> Pending {
        Pending {
            event: crate::proto::Event { subject: subject.into(), ..Default::default() },
            size: 10,
            enqueued: Instant::now(),
            reply: Reply::default(),
        }
    }

    #[test]
    fn full_and_closed_queues_refuse() {
        let q = Queues::new(1, 2);
        assert!(q.push(pending("a")).is_ok());
        assert!(q.push(pending("a")).is_ok());
        assert!(matches!(q.push(pending("a")), Err(PushError::Full(_))));
        assert_eq!(q.depth(), 2);
        q.close();
        assert!(q.shard(0).pop().is_some());
        assert!(matches!(q.push(pending("a")), Err(PushError::Closed(_))));
    }

    #[test]
    fn a_subject_always_maps_to_the_same_shard() {
        for s in ["a", "edge.x.y", "edge.load.17"] {
            let i = shard_index(s, 7);
            assert!(i < 7);
            assert_eq!(i, shard_index(s, 7));
        }
    }
}
