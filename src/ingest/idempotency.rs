//! Client-side retries: an event sent again with the same `Idempotency-Key` (by the same
//! identity) within the window is answered with the first event's result, marked
//! `duplicate`, and not published again. While the first is still in flight, the retry waits
//! for its result.
//!
//! How far this holds: one relay process, keys remembered for `idempotency.window_ms` and at
//! most `idempotency.max_keys` of them. Across relays or restarts the key still travels in the
//! event (`Event.id`), so consumers can de-duplicate.
//!
//! Almost every key is new, and at high rates the cache is far larger than the CPU's caches,
//! so the layout is chosen to touch main memory as little as possible per key: keys in flight
//! sit in a small table; completed keys go into the current of two *generations*. A generation
//! is a table of 64-byte buckets, each holding the tags of [`SLOTS`] keys and where their
//! entries are, beside the entries in the order they were stored: a new key is recognised as
//! new from one bucket (one cache line) per generation, and its completion, milliseconds later,
//! writes into the bucket its claim just read and appends to the entries. A generation is
//! dropped whole, never key by key: when the current one is full (half of a shard's keys) or
//! older than the window, it becomes the previous one and the previous one is dropped.
//!
//! Both generations are allocated at their full size at start-up and reused: the one dropped
//! is cleared and becomes the new current one. Nothing is allocated, grown or freed while
//! serving. The shards fill evenly, so they all grow or rotate within a few milliseconds of
//! each other: growing tables (rehashing a shard under its lock) stalled requests by 20–60 ms
//! at 50,000 events/s, and allocating fresh multi-megabyte tables at each rotation by 15–30 ms.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use crate::event::Key;
use crate::event::{Ack, Outcome, Remember, Stored};

/// Independently locked parts of the cache, so concurrent requests rarely wait on each other.
const SHARDS: usize = 16;

// A [`Key`] is a fingerprint under two randomly seeded SipHash keys, made by
// [`Idempotency::key`]. Two distinct keys share a fingerprint with probability about 2^-128 per
// pair, and since the seeds are secret, clients cannot search for a collision offline.
impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a keyed hash: its low half is the table's hash, its high half picks the shard.
        state.write_u64(self.0 as u64);
    }
}

/// Passes a [`Key`]'s own bits through as the table hash.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The cache of recent keys.
#[derive(Debug)]
pub struct Idempotency {
    shards: Box<[Mutex<Inner>]>,
    /// Seeds of the two halves of a key's fingerprint: random, so clients cannot aim at one
    /// shard or bucket, nor find colliding keys.
    seeds: [RandomState; 2],
    window: Duration,
}

type Table<V> = HashMap<Key, V, BuildHasherDefault<KeyHasher>>;

#[derive(Debug)]
struct Inner {
    /// Claimed keys whose event is not answered yet, with the retries waiting for it.
    in_flight: Table<Vec<oneshot::Sender<Outcome>>>,
    /// Completed keys: the current generation (taking new keys) and the previous one.
    current: Generation,
    previous: Generation,
}

/// Completed keys: a table of buckets over the entries, in the order they were stored.
#[derive(Debug)]
struct Generation {
    /// When its first key was stored.
    started: Option<Instant>,
    /// A power of two of them; a key's bucket comes from its low bits, and a full bucket
    /// passes keys on to the next one.
    buckets: Box<[Bucket]>,
    /// At most the generation's keys: allocated once, never grown.
    entries: Vec<Entry>,
}

/// Keys per bucket.
const SLOTS: usize = 5;

/// One cache line of the table: the tags of up to [`SLOTS`] keys (0: free; slots fill in
/// order) and the index of each one's entry.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
struct Bucket {
    tags: [u64; SLOTS],
    entries: [u32; SLOTS],
}

/// A completed key: read only for a retry, when a tag matches.
#[derive(Clone, Copy, Debug)]
struct Entry {
    key: Key,
    stored: Stored,
    at: Instant,
}

/// What [`Idempotency::claim`] found.
#[derive(Debug)]
pub enum Claim {
    /// The key is new: publish the event, and complete the key with its outcome.
    New,
    /// The key was published and stored before: here is that result, marked duplicate.
    Done(Stored),
    /// An event with this key is in flight: its outcome arrives here.
    Wait(oneshot::Receiver<Outcome>),
}

impl Idempotency {
    /// Remembers keys for `window`, at most `max_keys` of them; the newest `max_keys / 2` are
    /// always kept, so at high rates the effective window is between `max_keys / (2 · rate)`
    /// and `max_keys / rate`.
    pub fn new(window: Duration, max_keys: usize) -> Self {
        let generation_keys = (max_keys / 2).div_ceil(SHARDS).max(1);
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Inner::new(generation_keys))).collect(),
            seeds: [RandomState::new(), RandomState::new()],
            window,
        }
    }

    /// The key `key` of `identity`.
    pub fn key(&self, identity: &str, key: &str) -> Key {
        let half = |seed: &RandomState| seed.hash_one((identity, key));
        Key(u128::from(half(&self.seeds[0])) << 64 | u128::from(half(&self.seeds[1])))
    }

    /// Claims `key` at `now`.
    pub fn claim(&self, key: Key, now: Instant) -> Claim {
        let mut inner = self.lock(key);
        if let Some(waiters) = inner.in_flight.get_mut(&key) {
            let (tx, rx) = oneshot::channel();
            waiters.push(tx);
            return Claim::Wait(rx);
        }
        if let Some(stored) = inner.stored(key, now, self.window) {
            return Claim::Done(Stored { duplicate: true, ..*stored });
        }
        inner.in_flight.insert(key, Vec::new());
        Claim::New
    }

    /// Records the outcome of a claimed key at `now`: a stored event is remembered; a refused
    /// one forgets the key so a retry publishes again. Waiting retries get the outcome.
    pub fn complete(&self, key: Key, outcome: &Outcome, now: Instant) {
        let mut inner = self.lock(key);
        let Some(waiters) = inner.in_flight.remove(&key) else {
            return; // not claimed, or already completed
        };
        if let Ok(Ack::Stored(stored)) = outcome {
            inner.rotate(now, self.window);
            inner.current.insert(key, *stored, now);
        }
        drop(inner);
        if waiters.is_empty() {
            return;
        }
        let answer = match outcome {
            Ok(Ack::Stored(stored)) => Ok(Ack::Stored(Stored { duplicate: true, ..*stored })),
            other => other.clone(),
        };
        for w in waiters {
            let _ = w.send(answer.clone());
        }
    }

    /// Keys remembered (completed or in flight), including expired ones not yet dropped.
    pub fn len(&self) -> usize {
        let count =
            |i: &Inner| i.in_flight.len() + i.current.entries.len() + i.previous.entries.len();
        self.shards.iter().map(|s| count(&lock(s))).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self, key: Key) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.shards[(key.0 >> 64) as usize % self.shards.len()])
    }
}

/// A panic while holding a shard cannot leave it in a state worse than refusing keyed
/// events, so recover the guard.
fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn new(generation_keys: usize) -> Self {
        Self {
            in_flight: Table::default(),
            current: Generation::new(generation_keys),
            previous: Generation::new(generation_keys),
        }
    }

    /// The stored result of `key`, if it was completed less than `window` before `now`.
    fn stored(&self, key: Key, now: Instant, window: Duration) -> Option<&Stored> {
        [&self.current, &self.previous].into_iter().find_map(|g| {
            let entry = g.get(key)?;
            (now.saturating_duration_since(entry.at) < window).then_some(&entry.stored)
        })
    }

    /// Starts a new current generation if the current one is full or older than `window`
    /// (so everything in the previous one has expired): the previous one is forgotten and its
    /// memory becomes the new current one. Returns whether it rotated.
    fn rotate(&mut self, now: Instant, window: Duration) -> bool {
        let old = self.current.started.is_some_and(|t| now.saturating_duration_since(t) >= window);
        if !self.current.is_full() && !old {
            return false;
        }
        std::mem::swap(&mut self.current, &mut self.previous);
        self.current.clear();
        true
    }
}

impl Generation {
    /// An empty generation with room for `keys` keys, its buckets at most 2/5 full.
    fn new(keys: usize) -> Self {
        let buckets = (keys * 2).div_ceil(SLOTS).next_power_of_two();
        Self {
            started: None,
            buckets: vec![Bucket::default(); buckets].into_boxed_slice(),
            entries: Vec::with_capacity(keys),
        }
    }

    fn is_full(&self) -> bool {
        self.entries.len() >= self.entries.capacity()
    }

    /// Forgets every key, keeping the memory.
    fn clear(&mut self) {
        self.started = None;
        self.buckets.fill(Bucket::default());
        self.entries.clear();
    }

    /// The tag of `key` (never 0, the free slot) and its first bucket. The fingerprint is
    /// already random, so its bits are used directly: the high half's low bits pick the
    /// shard, so the bucket comes from the low half.
    fn place(&self, key: Key) -> (u64, usize) {
        ((key.0 >> 64) as u64 | 1, key.0 as usize & (self.buckets.len() - 1))
    }

    /// Where `key` is (`Ok((bucket, slot))`), or else the free slot it would take (`Err`;
    /// `None` only if no slot is free, which [`Generation::is_full`] prevents).
    fn slot(&self, key: Key) -> Result<(usize, usize), Option<(usize, usize)>> {
        let (tag, first) = self.place(key);
        let mask = self.buckets.len() - 1;
        for i in 0..self.buckets.len() {
            let b = (first + i) & mask;
            let bucket = &self.buckets[b];
            for s in 0..SLOTS {
                match bucket.tags[s] {
                    0 => return Err(Some((b, s))),
                    t if t == tag && self.entry(b, s).is_some_and(|e| e.key == key) => {
                        return Ok((b, s))
                    }
                    _ => {}
                }
            }
        }
        Err(None)
    }

    fn entry(&self, bucket: usize, slot: usize) -> Option<&Entry> {
        self.entries.get(self.buckets[bucket].entries[slot] as usize)
    }

    fn get(&self, key: Key) -> Option<&Entry> {
        let (b, s) = self.slot(key).ok()?;
        self.entry(b, s)
    }

    /// Stores `key` (again, if it is here already and expired); a full generation takes
    /// nothing (the caller rotates first).
    fn insert(&mut self, key: Key, stored: Stored, now: Instant) {
        let entry = Entry { key, stored, at: now };
        match self.slot(key) {
            Ok((b, s)) => {
                let index = self.buckets[b].entries[s] as usize;
                if let Some(e) = self.entries.get_mut(index) {
                    *e = entry;
                }
            }
            Err(Some((b, s))) if !self.is_full() => {
                self.started.get_or_insert(now);
                self.buckets[b].tags[s] = self.place(key).0;
                self.buckets[b].entries[s] = self.entries.len() as u32;
                self.entries.push(entry);
            }
            Err(_) => {}
        }
    }
}

impl Remember for Idempotency {
    fn complete(&self, key: Key, outcome: &Outcome, now: Instant) {
        Idempotency::complete(self, key, outcome, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorCode, Refusal};

    fn key(c: &Idempotency, k: &str) -> Key {
        c.key("edge", k)
    }

    /// A cache of a 10 s window in which key `a` was just claimed, at `t0`.
    fn claimed_a(t0: Instant) -> Idempotency {
        let c = Idempotency::new(Duration::from_secs(10), 100);
        assert!(matches!(c.claim(key(&c, "a"), t0), Claim::New));
        c
    }

    fn stored(seq: u64) -> Stored {
        Stored { seq, batch: 1, index: 0, cluster: 0, duplicate: false }
    }

    /// Key `a` claimed at `t0`, claimed again (that claim waits), then completed with
    /// `answer`: the cache, and what the waiter was told.
    fn waiter_told(t0: Instant, answer: Outcome) -> (Idempotency, Outcome) {
        let c = claimed_a(t0);
        let Claim::Wait(mut rx) = c.claim(key(&c, "a"), t0) else { panic!() };
        c.complete(key(&c, "a"), &answer, t0);
        let told = rx.try_recv().unwrap();
        (c, told)
    }

    #[test]
    fn a_stored_key_is_answered_as_duplicate_within_the_window() {
        let t0 = Instant::now();
        let c = claimed_a(t0);
        c.complete(key(&c, "a"), &Ok(Ack::Stored(stored(7))), t0);
        match c.claim(key(&c, "a"), t0) {
            Claim::Done(s) => assert_eq!((s.seq, s.duplicate), (7, true)),
            other => panic!("{other:?}"),
        }
        // After the window the key is forgotten.
        let later = Instant::now() + Duration::from_secs(11);
        assert!(matches!(c.claim(key(&c, "a"), later), Claim::New));
    }

    #[test]
    fn a_refused_key_can_be_retried_and_waiters_get_the_refusal() {
        let t0 = Instant::now();
        let refusal = Refusal::new(ErrorCode::AckTimeout, "x");
        let (c, told) = waiter_told(t0, Err(refusal.clone()));
        assert_eq!(told, Err(refusal));
        assert!(matches!(c.claim(key(&c, "a"), t0), Claim::New));
    }

    #[test]
    fn waiters_get_the_stored_result_marked_duplicate() {
        let (_, told) = waiter_told(Instant::now(), Ok(Ack::Stored(stored(3))));
        let Ok(Ack::Stored(s)) = told else { panic!() };
        assert!(s.duplicate);
    }

    #[test]
    fn the_cache_is_bounded() {
        let c = Idempotency::new(Duration::from_secs(10), 3 * SHARDS);
        let t0 = Instant::now();
        for i in 0..1000 {
            let k = key(&c, &i.to_string());
            assert!(matches!(c.claim(k, t0), Claim::New));
            c.complete(k, &Ok(Ack::Stored(stored(i))), t0);
        }
        assert!(c.len() <= 4 * SHARDS, "{}", c.len());
    }

    #[test]
    fn generations_are_allocated_at_their_full_size_and_reused() {
        let mut inner = Inner::new(1_000);
        let capacity = inner.current.entries.capacity();
        let buckets = inner.current.buckets.as_ptr();
        assert!(capacity >= 1_000, "{capacity}");
        let t0 = Instant::now();
        for i in 0..3_000u64 {
            inner.rotate(t0, Duration::from_secs(10));
            inner.current.insert(Key(u128::from(i) << 64 | u128::from(i)), stored(i), t0);
        }
        assert_eq!(inner.current.entries.capacity(), capacity);
        assert_eq!(inner.previous.entries.capacity(), capacity);
        let tables = [inner.current.buckets.as_ptr(), inner.previous.buckets.as_ptr()];
        assert!(tables.contains(&buckets));
    }

    #[test]
    fn keys_are_scoped_by_identity() {
        let t0 = Instant::now();
        let c = claimed_a(t0);
        c.complete(key(&c, "a"), &Ok(Ack::Stored(stored(1))), t0);
        assert!(matches!(c.claim(c.key("other", "a"), t0), Claim::New));
    }

    #[test]
    fn identity_and_key_do_not_run_together() {
        let c = Idempotency::new(Duration::from_secs(10), 100);
        assert_ne!(c.key("ab", "c"), c.key("a", "bc"));
        assert_eq!(c.key("a", "bc"), c.key("a", "bc"));
    }

    #[test]
    fn a_full_generation_becomes_the_previous_and_the_one_before_is_dropped() {
        let c = Idempotency::new(Duration::from_secs(10), 100);
        let mut inner = Inner::new(2);
        let t0 = Instant::now();
        let window = Duration::from_secs(10);
        let keys: Vec<Key> = (0..5).map(|i| key(&c, &i.to_string())).collect();
        for (i, k) in keys.iter().enumerate() {
            inner.rotate(t0, window);
            inner.current.insert(*k, stored(i as u64), t0);
        }
        // Generations of 2: {4} current, {2, 3} previous, {0, 1} dropped.
        let seqs: Vec<Option<u64>> =
            keys.iter().map(|k| inner.stored(*k, t0, window).map(|s| s.seq)).collect();
        assert_eq!(seqs, [None, None, Some(2), Some(3), Some(4)]);
    }

    #[test]
    fn a_generation_older_than_the_window_is_dropped_with_the_next_one() {
        let c = Idempotency::new(Duration::from_secs(10), 100);
        let window = Duration::from_secs(10);
        let mut inner = Inner::new(1_000);
        let t0 = Instant::now();
        let (a, b) = (key(&c, "a"), key(&c, "b"));
        inner.current.insert(a, stored(1), t0);
        assert!(!inner.rotate(t0 + Duration::from_secs(9), window));
        // Older than the window: it becomes the previous generation...
        assert!(inner.rotate(t0 + Duration::from_secs(10), window));
        inner.current.insert(b, stored(2), t0 + Duration::from_secs(10));
        assert!(inner.previous.get(a).is_some());
        // ...and is dropped with the next rotation, one window later.
        assert!(inner.rotate(t0 + Duration::from_secs(20), window));
        assert!(inner.previous.get(b).is_some() && inner.previous.get(a).is_none());
        assert!(inner.current.get(a).is_none() && inner.current.entries.is_empty());
    }

    #[test]
    fn keys_that_share_a_bucket_spill_into_the_next_and_are_all_found() {
        let t0 = Instant::now();
        let mut g = Generation::new(100);
        // Twelve keys with the same low bits (so the same first bucket) and distinct tags, and
        // three with the same tag too (told apart by their entries), then one key per bucket.
        let crowded = (0..12u128).map(|i| Key(i << 64 | 3));
        let same_tag = (1..4u128).map(|i| Key(1 << 64 | i << 32 | 3));
        let spread = (0..20u128).map(|i| Key((i + 1000) << 64 | i));
        let keys: Vec<Key> = crowded.chain(same_tag).chain(spread).collect();
        for (i, k) in keys.iter().enumerate() {
            assert!(g.get(*k).is_none());
            g.insert(*k, stored(i as u64), t0);
        }
        let seqs: Vec<u64> =
            keys.iter().map(|k| g.get(*k).map_or(u64::MAX, |e| e.stored.seq)).collect();
        assert_eq!(seqs, (0..keys.len() as u64).collect::<Vec<_>>());
        // Storing a key again updates its entry in place.
        g.insert(keys[4], stored(99), t0);
        assert_eq!(g.get(keys[4]).map(|e| e.stored.seq), Some(99));
        assert_eq!(g.entries.len(), keys.len());
        // A key never stored is not found, whatever bucket it starts in.
        assert!((100..200u128).all(|i| g.get(Key(i << 64 | 3)).is_none()));
    }

    #[test]
    fn a_full_generation_takes_no_more_keys() {
        let t0 = Instant::now();
        let mut g = Generation::new(3);
        for i in 0..10u128 {
            g.insert(Key(i << 64 | i), stored(i as u64), t0);
        }
        assert!(g.is_full());
        let found = (0..10u128).filter(|i| g.get(Key(i << 64 | i)).is_some()).count();
        assert_eq!(found, 3);
    }
}
