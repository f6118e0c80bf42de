//! How often a driver may publish open batches before their linger ends while other batches
//! still wait for their acks (sans-IO, time is an argument).
//!
//! With NATS close by, waiting for the batches in flight to be acknowledged is short and lets
//! events coalesce (the ack clock sets the batch size); with NATS a WAN round trip away a
//! batch is almost always in flight, so every event would wait its whole linger. A driver
//! therefore publishes early at up to `per_sec` times a second: at low rates every event goes
//! at once wherever NATS is, and under load the extra JetStream messages are bounded by that
//! rate while batching takes over again.

use std::time::{Duration, Instant};

/// A token bucket of early flushes, one per batch: `per_sec` a second, bursts of a tenth of a
/// second's worth.
#[derive(Debug, Clone)]
pub struct EarlyFlushes {
    per_sec: u32,
    burst: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl EarlyFlushes {
    /// `per_sec` early flushes a second (0: none).
    pub fn new(per_sec: u32) -> Self {
        let burst = (f64::from(per_sec) / 10.0).max(1.0);
        Self { per_sec, burst, tokens: burst, at: None }
    }

    /// The rate changed (a reload): the bucket keeps what it holds, up to the new burst.
    pub fn set_rate(&mut self, per_sec: u32) {
        if per_sec != self.per_sec {
            let tokens = self.tokens;
            *self = Self::new(per_sec);
            self.tokens = tokens.min(self.burst);
        }
    }

    /// How many of `open` batches to publish before their linger at `now`, with `in_flight`
    /// batches awaiting acks from a cluster `round_trip` away (if probed): all of them when
    /// nothing is in flight; as many as the rate allows when acks come back later than
    /// `linger` (the ack clock cannot batch anything in time); else none.
    pub fn due(
        &mut self,
        open: usize,
        in_flight: usize,
        round_trip: Option<Duration>,
        linger: Duration,
        now: Instant,
    ) -> usize {
        match in_flight {
            0 => open,
            _ if round_trip.is_some_and(|rtt| rtt > linger) => self.take(open, now),
            _ => 0,
        }
    }

    /// Takes up to `want` early flushes (one per batch) at `now`: as many as the rate allows.
    fn take(&mut self, want: usize, now: Instant) -> usize {
        if self.per_sec == 0 || want == 0 {
            return 0;
        }
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() * f64::from(self.per_sec);
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.at = Some(now);
        let took = (self.tokens.floor() as usize).min(want);
        self.tokens -= took as f64;
        took
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rate, then (wanted, at ms, taken) steps; `None` as wanted is a reload to that rate.
    type Case = (u32, &'static [(Option<usize>, u64, usize)]);

    #[test]
    fn only_acks_slower_than_the_linger_make_batches_due_early() {
        let t0 = Instant::now();
        let linger = Duration::from_millis(2);
        let ms = |n| Some(Duration::from_millis(n));
        // (in flight, round trip, due of 3 open batches)
        for (in_flight, rtt, due) in [
            (0, None, 3),
            (0, ms(0), 3),
            (2, None, 0),
            (2, ms(1), 0),
            (2, ms(2), 0),
            (2, ms(20), 3),
        ] {
            let mut e = EarlyFlushes::new(1_000);
            assert_eq!(e.due(3, in_flight, rtt, linger, t0), due, "{in_flight} {rtt:?}");
        }
        let mut none = EarlyFlushes::new(0);
        assert_eq!(none.due(3, 2, ms(20), linger, t0), 0);
    }

    #[test]
    fn early_flushes_follow_the_rate_and_the_burst() {
        let cases: &[Case] = &[
            // A burst of 100, then 10 per 10 ms; a long pause refills only up to the burst.
            (
                1_000,
                &[
                    (Some(8), 0, 8),
                    (Some(150), 0, 92),
                    (Some(1), 0, 0),
                    (Some(50), 10, 10),
                    (Some(500), 10_000, 100),
                ],
            ),
            // None at 0; a low rate still allows one at a time.
            (0, &[(Some(1), 0, 0)]),
            (2, &[(Some(3), 0, 1), (Some(3), 100, 0), (Some(3), 500, 1)]),
            // A reload keeps the tokens up to the new burst (5); the same rate changes nothing.
            (1_000, &[(None, 50, 0), (Some(20), 0, 5), (None, 50, 0), (Some(1), 0, 0)]),
        ];
        for (rate, steps) in cases {
            let t0 = Instant::now();
            let mut e = EarlyFlushes::new(*rate);
            for (i, &(want, at, taken)) in steps.iter().enumerate() {
                match want {
                    Some(want) => {
                        let got = e.take(want, t0 + Duration::from_millis(at));
                        assert_eq!(got, taken, "rate {rate}, step {i}");
                    }
                    None => e.set_rate(at as u32),
                }
            }
        }
    }
}
