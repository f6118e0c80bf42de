//! Deadlines for reads the peer controls (a native frame; meant for request bodies too): once a
//! read has started, the peer must keep it moving. Sans-IO: every decision takes `now`.
//!
//! Two rules, both from the read's first byte:
//! - **Timeout between reads.** No `timeout` without a byte (a stalled read).
//! - **Minimum rate.** After a grace of one `timeout`, the bytes read must keep up with
//!   `min_bytes_per_sec` counted from the start: by `start + timeout + t`, at least
//!   `min_bytes_per_sec × t` bytes. A trickle that never stalls long enough for the first rule
//!   fails this one; a fast read is never judged by it. 0 turns the rule off.
//!
//! The caller restarts the clock ([`Pace::start`]) when it starts reading again after a pause
//! of its own (a full in-flight window, an authentication), so the peer is only held to the
//! time the relay was actually asking for bytes.

use std::time::{Duration, Instant};

/// The rules for one kind of read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    /// Longest time without a byte.
    pub timeout: Duration,
    /// Lowest average rate after the first `timeout`, bytes per second (0: no minimum).
    pub min_bytes_per_sec: u64,
}

/// One read under way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    started: Instant,
    last: Instant,
    bytes: u64,
}

/// Why a read is too slow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slow {
    /// No byte for `timeout`.
    Stalled,
    /// Fewer bytes than the minimum rate asks for.
    TooSlow,
}

impl Pace {
    /// A read starting at `now`, no bytes yet.
    pub fn start(&self, now: Instant) -> Progress {
        Progress { started: now, last: now, bytes: 0 }
    }

    /// When `progress` becomes too slow if no more bytes come.
    pub fn deadline(&self, progress: &Progress) -> Instant {
        let stalled = progress.last + self.timeout;
        if self.min_bytes_per_sec == 0 {
            return stalled;
        }
        let earned =
            Duration::from_millis(progress.bytes.saturating_mul(1000) / self.min_bytes_per_sec);
        stalled.min(progress.started + self.timeout + earned)
    }

    /// Whether `progress` is too slow at `now`.
    pub fn check(&self, progress: &Progress, now: Instant) -> Result<(), Slow> {
        if now < self.deadline(progress) {
            Ok(())
        } else if now >= progress.last + self.timeout {
            Err(Slow::Stalled)
        } else {
            Err(Slow::TooSlow)
        }
    }
}

impl Progress {
    /// `bytes` more arrived at `now`.
    pub fn read(&mut self, bytes: usize, now: Instant) {
        self.bytes = self.bytes.saturating_add(bytes as u64);
        self.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// Reads as (ms after the start, bytes), when checked (ms after the start), the verdict.
    type Row = (&'static [(u64, usize)], u64, Result<(), Slow>);

    #[test]
    fn reads_are_judged_by_the_gap_and_by_the_rate_after_the_grace() {
        let pace = Pace { timeout: MS(1000), min_bytes_per_sec: 100 };
        let rows: &[Row] = &[
            (&[], 999, Ok(())),
            (&[], 1000, Err(Slow::Stalled)),
            // A read resets the gap...
            (&[(900, 10_000)], 1899, Ok(())),
            (&[(900, 10_000)], 1900, Err(Slow::Stalled)),
            // ...and earns time at the minimum rate: 1 byte earns 10 ms past the grace.
            (&[(900, 1)], 1010, Err(Slow::TooSlow)),
            (&[(900, 1)], 1009, Ok(())),
            // 100 bytes a second keeps a read alive indefinitely.
            (&[(500, 100), (1400, 100), (2300, 100)], 3000, Ok(())),
            (&[(500, 100), (1400, 100), (2300, 100)], 3299, Ok(())),
            (&[(500, 100), (1400, 100), (2300, 100)], 3300, Err(Slow::Stalled)),
            // A fast start earns time, but not past the gap.
            (&[(10, 1_000_000)], 1009, Ok(())),
            (&[(10, 1_000_000)], 1010, Err(Slow::Stalled)),
        ];
        let t0 = Instant::now();
        for (n, (reads, at, want)) in rows.iter().enumerate() {
            let mut p = pace.start(t0);
            for &(ms, bytes) in *reads {
                p.read(bytes, t0 + MS(ms));
            }
            assert_eq!(pace.check(&p, t0 + MS(*at)), *want, "row {n}");
            let due = pace.deadline(&p);
            assert!(pace.check(&p, due).is_err(), "row {n}: the deadline is when it fails");
            assert!(pace.check(&p, due - MS(1)).is_ok(), "row {n}: and not before");
        }
    }

    #[test]
    fn without_a_minimum_rate_only_the_gap_counts() {
        let pace = Pace { timeout: MS(1000), min_bytes_per_sec: 0 };
        let t0 = Instant::now();
        let mut p = pace.start(t0);
        for s in 1..100 {
            p.read(1, t0 + MS(s * 900));
        }
        assert_eq!(pace.check(&p, t0 + MS(99 * 900 + 999)), Ok(()));
        assert_eq!(pace.check(&p, t0 + MS(99 * 900 + 1000)), Err(Slow::Stalled));
    }
}
