//! Bounded, sharded, lock-free queues between ingest and the batchers. Events of one subject
//! always land in the same shard (so one batcher sees them in order); a full shard refuses the
//! event instead of growing, which the edge sees as 503 `queue_full`.
//!
//! A shard is full at `queue_capacity` events or at `queue_max_bytes` bytes of encoded events,
//! whichever comes first (an empty shard takes any one event, so no event is refused forever),
//! so a few large events cannot hold more memory than many small ones. The shard of a subject
//! is picked by a hash keyed with a random key drawn once per process: a client choosing its
//! subjects cannot aim them at the shard another tenant's subjects use.

use std::hash::Hasher;
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

/// How big each shard may grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Events a shard holds at most.
    pub events: usize,
    /// Bytes of encoded events (`Pending::size`) a shard holds at most.
    pub bytes: usize,
}

/// The key of the hash that picks a subject's shard: random, drawn once per process.
#[derive(Clone, Copy)]
pub struct ShardKey(pub [u8; 16]);

/// All shards.
#[derive(Debug)]
pub struct Queues {
    shards: Box<[Shard]>,
    closed: AtomicBool,
    key: ShardKey,
}

/// One shard: its queue and the wake-up of its batcher task.
#[derive(Debug)]
pub struct Shard {
    queue: ArrayQueue<Pending>,
    notify: Notify,
    /// Pushes under way; draining waits for them so no event is left behind.
    pushing: AtomicUsize,
    /// Bytes of the events queued (and being pushed).
    bytes: AtomicUsize,
    max_bytes: usize,
}

impl Queues {
    pub fn new(shards: usize, bounds: Bounds, key: ShardKey) -> Self {
        let shards = (0..shards.max(1))
            .map(|_| Shard {
                queue: ArrayQueue::new(bounds.events.max(1)),
                notify: Notify::new(),
                pushing: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                max_bytes: bounds.bytes.max(1),
            })
            .collect();
        Self { shards, closed: AtomicBool::new(false), key }
    }

    /// Queues `p` on its subject's shard and wakes that shard's batcher. A refused event comes
    /// back (by value: the refusal path must not allocate) so the caller can answer it.
    #[allow(clippy::result_large_err)]
    pub fn push(&self, p: Pending) -> Result<(), PushError> {
        let shard = &self.shards[shard_index(&self.key, &p.event.subject, self.shards.len())];
        shard.pushing.fetch_add(1, Ordering::SeqCst);
        let result = if self.closed.load(Ordering::SeqCst) {
            Err(PushError::Closed(p))
        } else if !shard.reserve(p.size) {
            Err(PushError::Full(p))
        } else {
            shard.queue.push(p).map_err(|p| {
                shard.bytes.fetch_sub(p.size, Ordering::SeqCst);
                PushError::Full(p)
            })
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

    /// Bytes of the events waiting in all shards.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.bytes.load(Ordering::SeqCst)).sum()
    }
}

impl Shard {
    pub fn pop(&self) -> Option<Pending> {
        let p = self.queue.pop()?;
        self.bytes.fetch_sub(p.size, Ordering::SeqCst);
        Some(p)
    }

    /// Counts `size` more bytes if they fit under the bound (or the shard holds nothing).
    fn reserve(&self, size: usize) -> bool {
        self.bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                (held == 0 || held.saturating_add(size) <= self.max_bytes)
                    .then(|| held.saturating_add(size))
            })
            .is_ok()
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

/// SipHash-2-4 keyed with `key`: the same shard for a subject all through the process, and
/// no way to tell (or aim at) another subject's shard without the key.
fn shard_index(key: &ShardKey, subject: &str, shards: usize) -> usize {
    let (k0, k1) = key.0.split_at(8);
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    // std's SipHasher is deprecated only because HashMap's algorithm may change; a shard pick
    // needs the same hash within one process, nothing more.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new_with_keys(word(k0), word(k1));
    h.write(subject.as_bytes());
    (h.finish() % shards as u64) as usize
}

impl std::fmt::Debug for ShardKey {
    /// Never the key itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShardKey(..)")
    }
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

    const KEY: ShardKey = ShardKey([7; 16]);

    fn pending(subject: &str) -> Pending {
        sized(subject, 10)
    }

    fn sized(subject: &str, size: usize) -> Pending {
        Pending {
            event: crate::event::Event { subject: subject.into(), ..Default::default() },
            size,
            enqueued: Instant::now(),
            reply: Reply::default(),
        }
    }

    #[test]
    fn full_and_closed_queues_refuse() {
        let q = Queues::new(1, Bounds { events: 2, bytes: 1 << 20 }, KEY);
        assert!(q.push(pending("a")).is_ok());
        assert!(q.push(pending("a")).is_ok());
        assert!(matches!(q.push(pending("a")), Err(PushError::Full(_))));
        assert_eq!(q.depth(), 2);
        q.close();
        assert!(q.shard(0).pop().is_some());
        assert!(matches!(q.push(pending("a")), Err(PushError::Closed(_))));
    }

    #[test]
    fn a_shard_is_full_in_bytes_as_well_as_in_events() {
        // (event sizes pushed one after the other, then whether each was taken), 100 bytes
        // and 10 events a shard.
        let cases: [(&[usize], &[bool]); 5] = [
            (&[40, 40, 20], &[true, true, true]),
            (&[40, 40, 40], &[true, true, false]),
            // A refused event takes no room: a smaller one after it still fits.
            (&[60, 50, 40], &[true, false, true]),
            // An empty shard takes one event larger than the bound, and nothing more.
            (&[500, 1], &[true, false]),
            // Small events stop at the event bound.
            (&[1; 11], &[true, true, true, true, true, true, true, true, true, true, false]),
        ];
        for (sizes, taken) in cases {
            let q = Queues::new(1, Bounds { events: 10, bytes: 100 }, KEY);
            let got: Vec<bool> = sizes.iter().map(|&n| q.push(sized("a", n)).is_ok()).collect();
            assert_eq!(got, taken, "{sizes:?}");
            let held: usize = sizes.iter().zip(taken).filter(|(_, t)| **t).map(|(n, _)| n).sum();
            assert_eq!(q.bytes(), held, "{sizes:?}");
        }
    }

    #[test]
    fn popping_frees_the_bytes_of_a_full_shard() {
        let q = Queues::new(1, Bounds { events: 10, bytes: 100 }, KEY);
        assert!(q.push(sized("a", 70)).is_ok());
        assert!(matches!(q.push(sized("a", 70)), Err(PushError::Full(_))));
        assert_eq!(q.shard(0).pop().map(|p| p.size), Some(70));
        assert_eq!(q.bytes(), 0);
        assert!(q.push(sized("a", 70)).is_ok());
        assert!(q.shard(0).pop().is_some() && q.shard(0).is_drained());
    }

    #[test]
    fn a_full_shard_leaves_the_others_room() {
        let q = Queues::new(16, Bounds { events: 10, bytes: 100 }, KEY);
        let shard_of = |s: &str| shard_index(&KEY, s, 16);
        let (hog, other) = (
            "edge.hog",
            (0..)
                .map(|i| format!("edge.t{i}"))
                .find(|s| shard_of(s) != shard_of("edge.hog"))
                .unwrap(),
        );
        // Three events of 30 bytes fill the hog's shard in bytes, far below its event bound...
        let taken = (0..10).take_while(|_| q.push(sized(hog, 30)).is_ok()).count();
        assert_eq!(taken, 3);
        // ...and another subject's shard still takes its 90.
        assert!(q.push(sized(&other, 90)).is_ok());
    }

    #[test]
    fn a_subject_always_maps_to_the_same_shard_of_its_process_key() {
        let subjects: Vec<String> = (0..64).map(|i| format!("edge.tenant{i}.click")).collect();
        let shards = |key: &ShardKey| -> Vec<usize> {
            subjects.iter().map(|s| shard_index(key, s, 16)).collect()
        };
        let a = shards(&KEY);
        assert!(a.iter().all(|i| *i < 16));
        assert_eq!(a, shards(&KEY), "the same key, the same shards");
        // Another process (another key) spreads the same subjects differently, so where a
        // subject lands cannot be worked out without the key.
        assert_ne!(a, shards(&ShardKey([8; 16])));
        assert!(format!("{KEY:?}").ends_with("(..)"));
    }
}
