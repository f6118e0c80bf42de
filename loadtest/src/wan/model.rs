//! The path model of the WAN proxy: how a direction delays and loses what passes through it
//! ([`Model`]), the memory bounds ([`Limits`]), and the seeded generator the delays and losses
//! are drawn from.

use std::fmt;
use std::time::Duration;

use anyhow::ensure;

/// How a network path behaves, in each direction on its own.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Model {
    /// Round-trip time added; each direction gets half of it.
    pub rtt: Duration,
    /// Each one-way delay varies uniformly within ±`jitter` (and never goes below zero).
    pub jitter: Duration,
    /// Probability in `[0, 1]` that a UDP datagram is dropped, per datagram and direction.
    /// Not applied to TCP.
    pub loss: f64,
    /// Seed of the delay and loss generator.
    pub seed: u64,
    /// Memory and session bounds.
    pub limits: Limits,
}

/// Bounds that keep the proxy's memory finite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes waiting in one direction of one TCP connection or UDP session.
    pub max_queued_bytes: usize,
    /// UDP sessions (client addresses) per route; datagrams from further clients are dropped.
    pub max_udp_sessions: usize,
    /// A UDP session without a datagram in either direction for this long is closed.
    pub udp_idle: Duration,
}

/// SplitMix64: small, fast, and good enough to pick delays and losses.
#[derive(Clone, Debug)]
pub(super) struct Rng(u64);

impl Model {
    /// Rejects a model the proxy cannot apply.
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!((0.0..=1.0).contains(&self.loss), "loss {} is not within [0, 1]", self.loss);
        ensure!(self.limits.max_queued_bytes > 0, "max_queued_bytes must be at least 1");
        ensure!(self.limits.max_udp_sessions > 0, "max_udp_sessions must be at least 1");
        ensure!(!self.limits.udp_idle.is_zero(), "udp_idle must be above zero");
        Ok(())
    }

    /// One direction's delay for the next chunk or datagram.
    pub(super) fn one_way(&self, rng: &mut Rng) -> Duration {
        let half = self.rtt / 2;
        if self.jitter.is_zero() {
            return half;
        }
        let offset = (rng.unit() * 2.0 - 1.0) * self.jitter.as_secs_f64();
        Duration::from_secs_f64((half.as_secs_f64() + offset).max(0.0))
    }

    /// Whether the next datagram is lost.
    pub(super) fn lost(&self, rng: &mut Rng) -> bool {
        self.loss > 0.0 && rng.unit() < self.loss
    }

    /// The generator of one direction (`stream` names route, connection and direction).
    pub(super) fn rng(&self, stream: u64) -> Rng {
        Rng::new(self.seed ^ Rng::new(stream).next_u64())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queued_bytes: 4 << 20,
            max_udp_sessions: 65_536,
            udp_idle: Duration::from_secs(60),
        }
    }
}

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rtt {:?} jitter ±{:?} loss {}% seed {} queue {} B",
            self.rtt,
            self.jitter,
            self.loss * 100.0,
            self.seed,
            self.limits.max_queued_bytes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wan::tests::model;

    #[test]
    fn one_way_delay_stays_within_jitter_and_never_negative() {
        let m = model(40, 5, 0.0);
        let mut rng = m.rng(1);
        for _ in 0..10_000 {
            let d = m.one_way(&mut rng);
            assert!(d >= Duration::from_millis(15) && d <= Duration::from_millis(25), "{d:?}");
        }
        // Jitter wider than the one-way delay clamps at zero instead of going negative.
        let m = model(4, 10, 0.0);
        let mut rng = m.rng(1);
        let delays: Vec<_> = (0..10_000).map(|_| m.one_way(&mut rng)).collect();
        assert!(delays.contains(&Duration::ZERO));
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(12)));
        assert_eq!(model(40, 0, 0.0).one_way(&mut rng), Duration::from_millis(20));
    }

    #[test]
    fn the_same_seed_draws_the_same_delays() {
        let m = model(60, 20, 0.1);
        let draw = |stream| {
            let mut rng = m.rng(stream);
            (0..100).map(|_| (m.one_way(&mut rng), m.lost(&mut rng))).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }
}
