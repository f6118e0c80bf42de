//! Per-identity (and optionally per-tenant) rate limits: token buckets of events (sans-IO:
//! the caller passes the time).
//!
//! A request of `n` events takes `n` tokens from its identity's bucket (and its tenant's);
//! when a bucket lacks them the whole request is refused with 429 `rate_limited` and a
//! `Retry-After` of when the tokens will be there. A request larger than the burst can never
//! pass (the bucket never holds that many tokens): it is refused with no retry delay, and
//! takes nothing, so one big request a second cannot slip through a small limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One limit: a rate and a burst.
#[derive(Debug)]
pub struct Limiter {
    per_sec: f64,
    burst: f64,
    max_tracked: usize,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
}

/// Why [`Limiter::take`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// The tokens will be there after this long.
    Wait(Duration),
    /// More events than the burst: no wait helps; the request must be split.
    OverBurst {
        /// The bucket's burst, events.
        burst: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Limiter {
    /// `per_sec` events a second, bursts of `burst`, for at most `max_tracked` keys at once.
    pub fn new(per_sec: u64, burst: u64, max_tracked: usize) -> Self {
        Self {
            per_sec: per_sec as f64,
            burst: burst.max(1) as f64,
            max_tracked: max_tracked.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `n` tokens for `key` at `now`, or says how long until they are there (or that
    /// they never will be).
    pub fn take(&self, key: &Arc<str>, n: usize, now: Instant) -> Result<(), Denied> {
        self.fits(n)?;
        let cost = n as f64;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= self.max_tracked && !buckets.contains_key(key) {
            self.forget_full(&mut buckets, now);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket { tokens: self.burst, at: now });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_sec).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            Ok(())
        } else {
            Err(Denied::Wait(Duration::from_secs_f64((cost - bucket.tokens) / self.per_sec)))
        }
    }

    /// Refuses a request of `n` events that no bucket of this limit can ever take.
    pub fn fits(&self, n: usize) -> Result<(), Denied> {
        match n as f64 > self.burst {
            true => Err(Denied::OverBurst { burst: self.burst as u64 }),
            false => Ok(()),
        }
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Drops the buckets that have refilled (forgetting them changes nothing); if that frees
    /// nothing, drops them all: a flood of identities must not grow memory without bound.
    fn forget_full(&self, buckets: &mut HashMap<Arc<str>, Bucket>, now: Instant) {
        let refill = Duration::from_secs_f64(self.burst / self.per_sec);
        buckets.retain(|_, b| now.saturating_duration_since(b.at) < refill);
        if buckets.len() >= self.max_tracked {
            tracing::warn!(
                tracked = buckets.len(),
                "rate limit table full: forgetting every bucket"
            );
            buckets.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let limiter = Limiter::new(10, 20, 100);
        let id: Arc<str> = "fn-1".into();
        let t0 = Instant::now();
        assert!(limiter.take(&id, 20, t0).is_ok());
        let wait = limiter.take(&id, 5, t0).unwrap_err();
        assert_eq!(wait, Denied::Wait(Duration::from_millis(500)));
        assert!(limiter.take(&id, 5, t0 + Duration::from_millis(499)).is_err());
        assert!(limiter.take(&id, 5, t0 + Duration::from_millis(1_000)).is_ok());
    }

    #[test]
    fn identities_have_their_own_buckets() {
        let limiter = Limiter::new(1, 1, 100);
        let t0 = Instant::now();
        assert!(limiter.take(&"a".into(), 1, t0).is_ok());
        assert!(limiter.take(&"b".into(), 1, t0).is_ok());
        assert!(limiter.take(&"a".into(), 1, t0).is_err());
    }

    #[test]
    fn a_request_costs_its_event_count() {
        // (rate, burst, request sizes one after the other at t0 + ms, expected answers)
        let over = Denied::OverBurst { burst: 10 };
        let wait = |ms| Denied::Wait(Duration::from_millis(ms));
        /// Requests (events, at t0 + ms) and their expected answers.
        type Case<'a> = (&'a [(usize, u64)], &'a [Result<(), Denied>]);
        let cases: [Case; 5] = [
            // One 1,000-event request a second never passes a 10/s limit, full bucket or not.
            (&[(1_000, 0), (1_000, 1_000), (1_000, 2_000)], &[Err(over), Err(over), Err(over)]),
            // Exactly the burst passes on a full bucket, then waits a whole refill.
            (&[(10, 0), (10, 0), (10, 1_000)], &[Ok(()), Err(wait(1_000)), Ok(())]),
            // One event over the burst is refused even on a full bucket.
            (&[(11, 0)], &[Err(over)]),
            // A refused oversized request takes nothing: the next small one still passes.
            (&[(50, 0), (10, 0)], &[Err(over), Ok(())]),
            // Many small requests cost their sum.
            (&[(4, 0), (4, 0), (4, 0), (2, 200)], &[Ok(()), Ok(()), Err(wait(200)), Ok(())]),
        ];
        for (requests, expected) in cases {
            let limiter = Limiter::new(10, 10, 100);
            let id: Arc<str> = "fn".into();
            let t0 = Instant::now();
            let got: Vec<_> = requests
                .iter()
                .map(|&(n, ms)| limiter.take(&id, n, t0 + Duration::from_millis(ms)))
                .collect();
            assert_eq!(got, expected, "{requests:?}");
        }
    }

    #[test]
    fn the_table_is_bounded() {
        let limiter = Limiter::new(1, 1, 10);
        let t0 = Instant::now();
        for i in 0..1_000 {
            let _ = limiter.take(&i.to_string().into(), 1, t0);
            assert!(limiter.tracked() <= 10);
        }
        // Refilled buckets are forgotten first, and forgetting them changes nothing.
        let later = t0 + Duration::from_secs(2);
        assert!(limiter.take(&"new".into(), 1, later).is_ok());
        assert_eq!(limiter.tracked(), 1);
    }
}
