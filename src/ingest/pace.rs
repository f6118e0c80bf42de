//! The pace of a read the peer controls — an HTTP body or a native frame: the next bytes must
//! come within a timeout of the last ones, and after that long the read must average at least a
//! minimum rate. Sans-IO: time comes in as `now`; the front-ends (`body.rs` for every HTTP
//! version, `quic/stream.rs` for native frames) wait and cut.

use std::time::{Duration, Instant};

use crate::error::{ErrorCode, Refusal};

/// The deadline and minimum rate of a body read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PaceLimits {
    /// Longest wait for the next body bytes; also the grace before the rate counts.
    pub timeout: Duration,
    /// Least average rate once `timeout` has passed since the first read, bytes a second
    /// (0: no minimum).
    pub min_bytes_per_sec: u64,
}

/// One body read's progress against its [`PaceLimits`]. Takes the time as an argument.
#[derive(Clone, Debug)]
pub struct Pace {
    limits: PaceLimits,
    started: Instant,
    last: Instant,
    bytes: u64,
}

/// Why a body read was cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    /// No bytes for `body_timeout_ms`.
    Timeout,
    /// Bytes, but on average fewer than `body_min_bytes_per_sec`.
    TooSlow,
}

impl Pace {
    pub fn new(limits: PaceLimits, now: Instant) -> Self {
        Self { limits, started: now, last: now, bytes: 0 }
    }

    /// `n` bytes arrived at `now`.
    pub fn on_data(&mut self, n: usize, now: Instant) {
        self.bytes = self.bytes.saturating_add(n as u64);
        self.last = self.last.max(now);
    }

    /// The relay did not read for `d` (no room in the memory budget): that time is not the
    /// peer's, so the read's clock moves on by it.
    pub fn hold(&mut self, d: Duration) {
        self.started += d;
        self.last += d;
    }

    /// The time by which more bytes must have arrived for the read to keep its pace.
    pub fn deadline(&self) -> Instant {
        let gap = self.last + self.limits.timeout;
        match self.limits.min_bytes_per_sec {
            0 => gap,
            rate => {
                // The average stays >= rate until bytes / rate seconds after the start.
                let earned = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
                gap.min(self.started + earned.max(self.limits.timeout))
            }
        }
    }

    /// Whether the read has missed its pace at `now`, and how.
    pub fn check(&self, now: Instant) -> Result<(), Stall> {
        if now < self.deadline() {
            Ok(())
        } else if now >= self.last + self.limits.timeout {
            Err(Stall::Timeout)
        } else {
            Err(Stall::TooSlow)
        }
    }
}

impl Stall {
    /// The answer to a request whose body was cut.
    pub fn refusal(self, limits: PaceLimits) -> Refusal {
        let timeout = limits.timeout.as_millis();
        match self {
            Self::Timeout => {
                Refusal::new(ErrorCode::RequestTimeout, format!("no body bytes for {timeout} ms"))
                    .because("body_timeout")
            }
            Self::TooSlow => Refusal::new(
                ErrorCode::RequestTimeout,
                format!("body slower than {} bytes/s", limits.min_bytes_per_sec),
            )
            .because("body_too_slow"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_body_must_keep_its_pace() {
        let limits = PaceLimits { timeout: T, min_bytes_per_sec: 1000 };
        // (arrivals as (ms, bytes), checked at ms, expected)
        type Case = (&'static str, Vec<(u64, usize)>, u64, Result<(), Stall>);
        let cases: Vec<Case> = vec![
            ("nothing yet, within the timeout", vec![], 9_999, Ok(())),
            ("nothing at all", vec![], 10_000, Err(Stall::Timeout)),
            ("a burst then silence", vec![(1_000, 1 << 20)], 10_999, Ok(())),
            (
                "a burst then too long a silence",
                vec![(1_000, 1 << 20)],
                11_000,
                Err(Stall::Timeout),
            ),
            (
                "steady above the rate",
                (1..=20).map(|s| (s * 1_000, 1_500)).collect(),
                20_500,
                Ok(()),
            ),
            // 100 bytes every 5 s: never 10 s of silence, but 20 B/s after the grace.
            ("a trickle", (1..=4).map(|s| (s * 5_000, 100)).collect(), 10_000, Err(Stall::TooSlow)),
            ("a trickle, within the grace", vec![(5_000, 100)], 9_999, Ok(())),
            // 30 kB by 19 s earns 30 s; the gap ends first, at 29 s.
            ("ahead of the rate", vec![(1_000, 20_000), (19_000, 10_000)], 28_999, Ok(())),
            ("then silent", vec![(1_000, 20_000), (19_000, 10_000)], 29_000, Err(Stall::Timeout)),
            // 23 kB earns 23 s, and the last bytes at 22 s leave the gap open until 32 s.
            (
                "fell behind the rate",
                vec![(1_000, 20_000), (15_000, 1_000), (21_000, 1_000), (22_000, 1_000)],
                23_000,
                Err(Stall::TooSlow),
            ),
        ];
        for (name, arrivals, check_at, want) in cases {
            let t0 = Instant::now();
            let mut pace = Pace::new(limits, t0);
            for (ms, n) in arrivals {
                pace.on_data(n, at(t0, ms));
            }
            assert_eq!(pace.check(at(t0, check_at)), want, "{name}");
        }
    }

    #[test]
    fn without_a_minimum_rate_only_the_gap_counts() {
        let t0 = Instant::now();
        let mut pace = Pace::new(PaceLimits { timeout: T, min_bytes_per_sec: 0 }, t0);
        for s in 1..100 {
            pace.on_data(1, at(t0, s * 9_000));
        }
        assert_eq!(pace.check(at(t0, 99 * 9_000 + 9_999)), Ok(()));
        assert_eq!(pace.deadline(), at(t0, 99 * 9_000 + 10_000));
    }

    #[test]
    fn the_deadline_is_the_first_moment_the_check_fails() {
        let limits = PaceLimits { timeout: T, min_bytes_per_sec: 1000 };
        let t0 = Instant::now();
        let mut pace = Pace::new(limits, t0);
        pace.on_data(2_000, at(t0, 9_000));
        // 2 kB earns 2 s, less than the grace: the rate deadline is the grace, at 10 s.
        assert_eq!(pace.deadline(), at(t0, 10_000));
        assert_eq!(pace.check(at(t0, 9_999)), Ok(()));
        assert_eq!(pace.check(at(t0, 10_000)), Err(Stall::TooSlow));
        // Time the relay held the read (no room in the memory budget) is not the peer's.
        pace.hold(Duration::from_secs(30));
        assert_eq!(pace.deadline(), at(t0, 40_000));
    }

    #[test]
    fn stalls_are_answered_408_with_their_reason() {
        let limits = PaceLimits { timeout: T, min_bytes_per_sec: 1000 };
        let r = Stall::Timeout.refusal(limits);
        assert_eq!((r.code.status(), r.reason), (408, "body_timeout"));
        let r = Stall::TooSlow.refusal(limits);
        assert_eq!((r.code.status(), r.reason), (408, "body_too_slow"));
    }
}
