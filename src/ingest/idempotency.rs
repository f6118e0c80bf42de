//! Client-side retries: an event sent again with the same `Idempotency-Key` (by the same
//! identity) within the window is answered with the first event's result, marked
//! `duplicate`, and not published again. While the first is still in flight, the retry waits
//! for its result.
//!
//! How far this holds: one relay process, keys remembered for `idempotency.window_ms` and at
//! most `idempotency.max_keys` of them. Across relays or restarts the key still travels in the
//! event (`Event.id`), so consumers can de-duplicate.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::event::{Ack, Outcome, Stored};

/// Independently locked parts of the cache, so concurrent requests rarely wait on each other.
const SHARDS: usize = 16;

/// An idempotency key as scoped by the relay: (identity, client key). Shared (`Arc`) between
/// the cache, its expiry queue and the event's reply, so it is allocated once.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub identity: Arc<str>,
    pub key: String,
}

/// The cache of recent keys.
#[derive(Debug)]
pub struct Idempotency {
    shards: Box<[Mutex<Inner>]>,
    /// Picks a key's shard; randomly seeded, so clients cannot aim at one shard.
    hasher: RandomState,
    window: Duration,
    max_keys_per_shard: usize,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Arc<Key>, Entry>,
    /// Completed keys in completion order, for expiry and eviction.
    done: VecDeque<(Instant, Arc<Key>)>,
}

#[derive(Debug)]
enum Entry {
    InFlight(Vec<oneshot::Sender<Outcome>>),
    Done(Stored, Instant),
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
    /// Remembers keys for `window`, at most `max_keys` of them (oldest forgotten first): at
    /// high rates the effective window is `max_keys / rate`.
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Inner::default())).collect(),
            hasher: RandomState::new(),
            window,
            max_keys_per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    /// Claims `key` at `now`.
    pub fn claim(&self, key: &Arc<Key>, now: Instant) -> Claim {
        let mut inner = self.lock(key);
        inner.expire(now, self.window, self.max_keys_per_shard);
        match inner.entries.get_mut(key.as_ref()) {
            Some(Entry::Done(stored, _)) => {
                Claim::Done(Stored { duplicate: true, ..stored.clone() })
            }
            Some(Entry::InFlight(waiters)) => {
                let (tx, rx) = oneshot::channel();
                waiters.push(tx);
                Claim::Wait(rx)
            }
            None => {
                inner.entries.insert(key.clone(), Entry::InFlight(Vec::new()));
                Claim::New
            }
        }
    }

    /// Records the outcome of a claimed key: a stored event is remembered; a refused one
    /// forgets the key so a retry publishes again. Waiting retries get the outcome.
    pub fn complete(&self, key: &Arc<Key>, outcome: &Outcome) {
        let now = Instant::now();
        let mut inner = self.lock(key);
        let waiters = match inner.entries.get_mut(key.as_ref()) {
            Some(Entry::InFlight(w)) => std::mem::take(w),
            _ => return, // not claimed, or already completed
        };
        let answer = match outcome {
            Ok(Ack::Stored(stored)) => {
                inner.entries.insert(key.clone(), Entry::Done(stored.clone(), now));
                inner.done.push_back((now, key.clone()));
                Ok(Ack::Stored(Stored { duplicate: true, ..stored.clone() }))
            }
            other => {
                inner.entries.remove(key.as_ref());
                other.clone()
            }
        };
        drop(inner);
        for w in waiters {
            let _ = w.send(answer.clone());
        }
    }

    /// Keys remembered (completed or in flight).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self, key: &Key) -> std::sync::MutexGuard<'_, Inner> {
        let shard = self.hasher.hash_one(key) as usize % self.shards.len();
        lock(&self.shards[shard])
    }
}

/// A panic while holding a shard cannot leave it in a state worse than refusing keyed
/// events, so recover the guard.
fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn expire(&mut self, now: Instant, window: Duration, max_keys: usize) {
        while let Some((at, _)) = self.done.front() {
            let expired = now.saturating_duration_since(*at) >= window;
            if !expired && self.entries.len() < max_keys {
                break;
            }
            let Some((at, key)) = self.done.pop_front() else { break };
            // Only remove the entry this queue slot refers to (not a newer claim of the key).
            if matches!(self.entries.get(key.as_ref()), Some(Entry::Done(_, t)) if *t == at) {
                self.entries.remove(key.as_ref());
            }
        }
    }
}

impl Key {
    pub fn new(identity: Arc<str>, key: String) -> Arc<Self> {
        Arc::new(Self { identity, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorCode, Refusal};

    fn key(k: &str) -> Arc<Key> {
        Key::new(Arc::from("edge"), k.to_owned())
    }

    fn stored(seq: u64) -> Stored {
        Stored { stream: "S".into(), seq, batch: "b".into(), index: 0, duplicate: false }
    }

    #[test]
    fn a_stored_key_is_answered_as_duplicate_within_the_window() {
        let c = Idempotency::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        assert!(matches!(c.claim(&key("a"), t0), Claim::New));
        c.complete(&key("a"), &Ok(Ack::Stored(stored(7))));
        match c.claim(&key("a"), t0) {
            Claim::Done(s) => assert_eq!((s.seq, s.duplicate), (7, true)),
            other => panic!("{other:?}"),
        }
        // After the window the key is forgotten.
        let later = Instant::now() + Duration::from_secs(11);
        assert!(matches!(c.claim(&key("a"), later), Claim::New));
    }

    #[test]
    fn a_refused_key_can_be_retried_and_waiters_get_the_refusal() {
        let c = Idempotency::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        assert!(matches!(c.claim(&key("a"), t0), Claim::New));
        let Claim::Wait(mut rx) = c.claim(&key("a"), t0) else { panic!() };
        let refusal = Refusal::new(ErrorCode::AckTimeout, "x");
        c.complete(&key("a"), &Err(refusal.clone()));
        assert_eq!(rx.try_recv().unwrap(), Err(refusal));
        assert!(matches!(c.claim(&key("a"), t0), Claim::New));
    }

    #[test]
    fn waiters_get_the_stored_result_marked_duplicate() {
        let c = Idempotency::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        assert!(matches!(c.claim(&key("a"), t0), Claim::New));
        let Claim::Wait(mut rx) = c.claim(&key("a"), t0) else { panic!() };
        c.complete(&key("a"), &Ok(Ack::Stored(stored(3))));
        let Ok(Ack::Stored(s)) = rx.try_recv().unwrap() else { panic!() };
        assert!(s.duplicate);
    }

    #[test]
    fn the_cache_is_bounded() {
        let c = Idempotency::new(Duration::from_secs(10), 3 * SHARDS);
        let t0 = Instant::now();
        for i in 0..1000 {
            let k = key(&i.to_string());
            assert!(matches!(c.claim(&k, t0), Claim::New));
            c.complete(&k, &Ok(Ack::Stored(stored(i))));
        }
        assert!(c.len() <= 4 * SHARDS, "{}", c.len());
    }

    #[test]
    fn keys_are_scoped_by_identity() {
        let c = Idempotency::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        assert!(matches!(c.claim(&key("a"), t0), Claim::New));
        c.complete(&key("a"), &Ok(Ack::Stored(stored(1))));
        assert!(matches!(c.claim(&Key::new(Arc::from("other"), "a".into()), t0), Claim::New));
    }
}
