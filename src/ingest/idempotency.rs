//! Client-side retries: an event sent again with the same `Idempotency-Key` (by the same
//! identity) within the window is answered with the first event's result, marked
//! `duplicate`, and not published again. While the first is still in flight, the retry waits
//! for its result.
//!
//! How far this holds: one relay process, keys remembered for `idempotency.window_ms` and at
//! most `idempotency.max_keys` of them. Across relays or restarts the key still travels in the
//! event (`Event.id`), so consumers can de-duplicate.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::event::{Ack, Outcome, Stored};

/// (identity, client key).
pub type Key = (Arc<str>, String);

/// The cache of recent keys.
#[derive(Debug)]
pub struct Idempotency {
    inner: Mutex<Inner>,
    window: Duration,
    max_keys: usize,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// Completed keys in completion order, for expiry and eviction.
    done: VecDeque<(Instant, Key)>,
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
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), window, max_keys }
    }

    /// Claims `key` at `now`.
    pub fn claim(&self, key: &Key, now: Instant) -> Claim {
        let mut inner = self.lock();
        inner.expire(now, self.window, self.max_keys);
        match inner.entries.get_mut(key) {
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
    pub fn complete(&self, key: &Key, outcome: &Outcome) {
        let now = Instant::now();
        let mut inner = self.lock();
        let waiters = match inner.entries.remove(key) {
            Some(Entry::InFlight(w)) => w,
            other => {
                // Not claimed (or already completed): put back whatever was there.
                if let Some(e) = other {
                    inner.entries.insert(key.clone(), e);
                }
                return;
            }
        };
        let answer = match outcome {
            Ok(Ack::Stored(stored)) => {
                inner.entries.insert(key.clone(), Entry::Done(stored.clone(), now));
                inner.done.push_back((now, key.clone()));
                Ok(Ack::Stored(Stored { duplicate: true, ..stored.clone() }))
            }
            other => other.clone(),
        };
        drop(inner);
        for w in waiters {
            let _ = w.send(answer.clone());
        }
    }

    /// Keys remembered (completed or in flight).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way that
        // matters more than refusing all keyed events, so recover the guard.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
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
            if matches!(self.entries.get(&key), Some(Entry::Done(_, t)) if *t == at) {
                self.entries.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorCode, Refusal};

    fn key(k: &str) -> Key {
        (Arc::from("edge"), k.to_owned())
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
        let c = Idempotency::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        for i in 0..10 {
            let k = key(&i.to_string());
            assert!(matches!(c.claim(&k, t0), Claim::New));
            c.complete(&k, &Ok(Ack::Stored(stored(i))));
        }
        assert!(c.len() <= 4, "{}", c.len());
    }

    #[test]
    fn keys_are_scoped_by_identity() {
        let c = Idempotency::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        assert!(matches!(c.claim(&key("a"), t0), Claim::New));
        c.complete(&key("a"), &Ok(Ack::Stored(stored(1))));
        assert!(matches!(c.claim(&(Arc::from("other"), "a".into()), t0), Claim::New));
    }
}
