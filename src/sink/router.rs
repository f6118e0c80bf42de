//! Which NATS cluster gets the next batch: the nearest healthy one, with hysteresis.
//!
//! Sans-IO: the sink reports what it observes (connection changes, stream checks, probe round
//! trips, publish outcomes) with the time, and the router answers with a [`Switch`] when the
//! active cluster changes. It reads no clock and touches no socket.
//!
//! Rules:
//! - A cluster is **usable** while it is connected and its stream is checked, and **healthy**
//!   while it is usable and fewer than `unhealthy_after` probes or publishes in a row failed.
//! - Failover: when the active cluster stops being healthy, the relay moves at once to the
//!   healthy cluster with the lowest round trip (preferring ones that have been healthy for
//!   `failback_after`). With no healthy cluster it stays on (or moves to) a usable one, so a
//!   lone slow cluster is still tried; with none usable there is no active cluster.
//! - Fail-back: a healthy active cluster is left for another one only when that one has been
//!   healthy for `failback_after` and its round trip is lower by more than `margin`. A
//!   cluster never seen failing counts as stable from its first success, so the relay picks
//!   the nearest cluster at start without waiting.

use std::time::{Duration, Instant};

/// The router's settings (from `[nats.failover]`).
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// Failures in a row that make a cluster unhealthy.
    pub unhealthy_after: u32,
    /// How long a recovered cluster must stay healthy before the relay moves back to it.
    pub failback_after: Duration,
    /// How much lower another cluster's round trip must be to move to it.
    pub margin: Duration,
}

/// Why the active cluster changed (the `reason` label of `edgerelay_nats_failovers_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The first cluster became usable.
    Start,
    /// The active cluster stopped being healthy.
    Unhealthy,
    /// A healthy, stable cluster is nearer than the active one.
    Nearer,
    /// A cluster became usable while none was.
    Recovered,
}

/// A change of the active cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switch {
    pub from: Option<usize>,
    pub to: Option<usize>,
    pub reason: Reason,
}

/// The state of every cluster and the choice among them.
#[derive(Debug)]
pub struct Router {
    params: Params,
    clusters: Vec<State>,
    active: Option<usize>,
}

#[derive(Clone, Debug, Default)]
struct State {
    connected: bool,
    stream_ok: bool,
    failures: u32,
    /// Smoothed round trip; `None` until the first probe answered.
    rtt: Option<Duration>,
    /// Since when it has been healthy (`None` while it is not).
    healthy_since: Option<Instant>,
    /// It was healthy once and then was not: from now on it must prove itself for
    /// `failback_after` before the relay moves back to it.
    ever_failed: bool,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Start => "start",
            Reason::Unhealthy => "unhealthy",
            Reason::Nearer => "nearer",
            Reason::Recovered => "recovered",
        }
    }
}

impl Router {
    /// A router over `clusters` clusters, none of them connected yet.
    pub fn new(clusters: usize, params: Params) -> Self {
        Self { params, clusters: vec![State::default(); clusters], active: None }
    }

    /// The cluster batches go to now, if any is usable.
    pub fn active(&self) -> Option<usize> {
        self.active
    }

    /// Connected with its stream checked.
    pub fn is_usable(&self, i: usize) -> bool {
        self.clusters.get(i).is_some_and(State::usable)
    }

    pub fn is_healthy(&self, i: usize) -> bool {
        self.clusters.get(i).is_some_and(|c| c.healthy(self.params.unhealthy_after))
    }

    /// The smoothed round trip to cluster `i`, once measured.
    pub fn rtt(&self, i: usize) -> Option<Duration> {
        self.clusters.get(i).and_then(|c| c.rtt)
    }

    /// Probes and publishes that failed in a row on cluster `i`.
    pub fn failures(&self, i: usize) -> u32 {
        self.clusters.get(i).map_or(0, |c| c.failures)
    }

    /// Cluster `i` connected or lost its connection.
    pub fn connection(&mut self, i: usize, connected: bool, now: Instant) -> Option<Switch> {
        self.update(i, now, |c| c.connected = connected)
    }

    /// Cluster `i`'s stream was checked good, or found missing.
    pub fn stream(&mut self, i: usize, ok: bool, now: Instant) -> Option<Switch> {
        self.update(i, now, |c| c.stream_ok = ok)
    }

    /// A probe of cluster `i` answered after `rtt`.
    pub fn probed(&mut self, i: usize, rtt: Duration, now: Instant) -> Option<Switch> {
        self.update(i, now, |c| {
            c.failures = 0;
            // Smooth one slow answer away, but follow a lasting change within a few probes.
            c.rtt = Some(match c.rtt {
                Some(old) => (old * 3 + rtt) / 4,
                None => rtt,
            });
        })
    }

    /// JetStream acknowledged a batch on cluster `i`.
    pub fn acked(&mut self, i: usize, now: Instant) -> Option<Switch> {
        if self.clusters.get(i).is_some_and(|c| c.failures == 0) {
            return None; // the common case: nothing changes
        }
        self.update(i, now, |c| c.failures = 0)
    }

    /// A probe or a publish attempt on cluster `i` failed (timeout, JetStream unavailable).
    pub fn failed(&mut self, i: usize, now: Instant) -> Option<Switch> {
        self.update(i, now, |c| c.failures = c.failures.saturating_add(1))
    }

    fn update(
        &mut self,
        i: usize,
        now: Instant,
        change: impl FnOnce(&mut State),
    ) -> Option<Switch> {
        let threshold = self.params.unhealthy_after;
        let c = self.clusters.get_mut(i)?;
        let was = c.healthy(threshold);
        change(c);
        match (was, c.healthy(threshold)) {
            (false, true) => {
                let trusted = !c.ever_failed;
                c.healthy_since = Some(if trusted {
                    now.checked_sub(self.params.failback_after).unwrap_or(now)
                } else {
                    now
                });
            }
            (true, false) => {
                c.healthy_since = None;
                c.ever_failed = true;
            }
            _ => {}
        }
        self.decide(now)
    }

    fn decide(&mut self, now: Instant) -> Option<Switch> {
        let threshold = self.params.unhealthy_after;
        let stable = |c: &State| {
            c.healthy_since
                .is_some_and(|s| now.saturating_duration_since(s) >= self.params.failback_after)
        };
        let rtt = |c: &State| c.rtt.unwrap_or(Duration::MAX);
        // The best healthy cluster: stable ones first, then by round trip, then config order.
        let best_healthy = (0..self.clusters.len())
            .filter(|&i| self.clusters[i].healthy(threshold))
            .min_by_key(|&i| (!stable(&self.clusters[i]), rtt(&self.clusters[i]), i));
        let current = self.active.map(|i| &self.clusters[i]);
        let (to, reason) = match current {
            Some(c) if c.healthy(threshold) => {
                let active = self.active?;
                let nearer = (0..self.clusters.len()).filter(|&i| i != active).find(|&i| {
                    let o = &self.clusters[i];
                    o.healthy(threshold)
                        && stable(o)
                        && o.rtt.is_some_and(|r| r.saturating_add(self.params.margin) < rtt(c))
                });
                match nearer {
                    // Of several nearer ones, the nearest.
                    Some(_) => (best_healthy, Reason::Nearer),
                    None => return None,
                }
            }
            _ => match best_healthy {
                Some(i) => (Some(i), self.reason_for_change()),
                None => {
                    if current.is_some_and(State::usable) {
                        return None; // nothing better: keep trying the degraded one
                    }
                    let usable = (0..self.clusters.len())
                        .filter(|&i| self.clusters[i].usable())
                        .min_by_key(|&i| (rtt(&self.clusters[i]), i));
                    (usable, self.reason_for_change())
                }
            },
        };
        if to == self.active {
            return None;
        }
        let switch = Switch { from: self.active, to, reason };
        self.active = to;
        Some(switch)
    }

    fn reason_for_change(&self) -> Reason {
        match self.active {
            Some(_) => Reason::Unhealthy,
            None if self.clusters.iter().any(|c| c.ever_failed) => Reason::Recovered,
            None => Reason::Start,
        }
    }
}

impl State {
    fn usable(&self) -> bool {
        self.connected && self.stream_ok
    }

    fn healthy(&self, threshold: u32) -> bool {
        self.usable() && self.failures < threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMS: Params = Params {
        unhealthy_after: 3,
        failback_after: Duration::from_secs(30),
        margin: Duration::from_millis(5),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Two clusters, both up, 10 ms (near, 0) and 40 ms (far, 1) away, at `t0`.
    /// `n` clusters, each connected with its stream checked at `t0`, none probed yet.
    fn all_up(n: usize, t0: Instant) -> Router {
        let mut r = Router::new(n, PARAMS);
        for i in 0..n {
            r.connection(i, true, t0);
            r.stream(i, true, t0);
        }
        r
    }

    fn two_up(t0: Instant) -> Router {
        let mut r = all_up(2, t0);
        r.probed(1, ms(40), t0);
        r.probed(0, ms(10), t0);
        r
    }

    #[test]
    fn starts_on_the_first_usable_cluster_and_moves_to_the_nearest_at_once() {
        let t0 = Instant::now();
        let mut r = Router::new(2, PARAMS);
        assert_eq!(r.active(), None);
        r.connection(1, true, t0);
        let s = r.stream(1, true, t0).unwrap();
        assert_eq!((s.from, s.to, s.reason), (None, Some(1), Reason::Start));
        r.probed(1, ms(40), t0);
        r.connection(0, true, t0);
        r.stream(0, true, t0);
        // Never failed: no need to wait failback_after before using the nearer one.
        let s = r.probed(0, ms(10), t0).unwrap();
        assert_eq!((s.from, s.to, s.reason), (Some(1), Some(0), Reason::Nearer));
    }

    #[test]
    fn fails_over_after_consecutive_failures_not_before() {
        let t0 = Instant::now();
        let mut r = two_up(t0);
        assert_eq!(r.active(), Some(0));
        assert_eq!(r.failed(0, t0), None);
        assert_eq!(r.failed(0, t0), None);
        let s = r.failed(0, t0).unwrap();
        assert_eq!((s.from, s.to, s.reason), (Some(0), Some(1), Reason::Unhealthy));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut r = two_up(t0);
        r.failed(0, t0);
        r.failed(0, t0);
        r.acked(0, t0);
        r.failed(0, t0);
        r.failed(0, t0);
        assert_eq!(r.active(), Some(0));
    }

    #[test]
    fn a_lost_connection_fails_over_at_once() {
        let t0 = Instant::now();
        let mut r = two_up(t0);
        let s = r.connection(0, false, t0).unwrap();
        assert_eq!(s.to, Some(1));
        assert!(!r.is_usable(0));
    }

    #[test]
    fn fails_back_only_after_the_nearer_cluster_stayed_healthy_long_enough() {
        let t0 = Instant::now();
        let mut r = two_up(t0);
        r.connection(0, false, t0);
        assert_eq!(r.active(), Some(1));
        let t1 = t0 + ms(5_000);
        assert_eq!(r.connection(0, true, t1), None);
        assert_eq!(r.probed(0, ms(10), t1), None, "just recovered: not yet");
        assert_eq!(r.probed(0, ms(10), t1 + ms(29_000)), None);
        let s = r.probed(0, ms(10), t1 + ms(30_000)).unwrap();
        assert_eq!((s.from, s.to, s.reason), (Some(1), Some(0), Reason::Nearer));
    }

    #[test]
    fn a_flapping_cluster_is_not_followed_back() {
        let t0 = Instant::now();
        let mut r = two_up(t0);
        let mut t = t0;
        for _ in 0..10 {
            r.connection(0, false, t);
            t += ms(10_000);
            r.connection(0, true, t);
            r.probed(0, ms(10), t);
            t += ms(10_000);
            assert_eq!(r.active(), Some(1), "followed a flapping cluster back");
        }
    }

    #[test]
    fn the_margin_keeps_it_on_a_cluster_that_is_about_as_near() {
        let t0 = Instant::now();
        let mut r = all_up(2, t0);
        r.probed(0, ms(12), t0);
        r.probed(1, ms(10), t0 + ms(1));
        assert_eq!(r.active(), Some(0), "2 ms nearer is within the 5 ms margin");
    }

    #[test]
    fn rtt_is_smoothed_so_one_slow_probe_does_not_move_it() {
        let t0 = Instant::now();
        let mut r = two_up(t0);
        r.probed(0, ms(90), t0);
        assert_eq!(r.active(), Some(0));
        assert!(r.rtt(0).unwrap() < ms(40));
    }

    #[test]
    fn with_no_healthy_cluster_it_stays_on_a_usable_one_and_with_none_usable_has_none() {
        let t0 = Instant::now();
        let mut r = all_up(1, t0);
        for _ in 0..5 {
            r.failed(0, t0);
        }
        assert_eq!(r.active(), Some(0), "a lone failing cluster is still tried");
        let s = r.connection(0, false, t0).unwrap();
        assert_eq!((s.to, s.reason), (None, Reason::Unhealthy));
        // Back, still counted as failing: usable, so tried again at once.
        let s = r.connection(0, true, t0).unwrap();
        assert_eq!((s.to, s.reason), (Some(0), Reason::Recovered));
        assert!(!r.is_healthy(0));
        assert_eq!(r.probed(0, ms(1), t0), None);
        assert!(r.is_healthy(0));
    }

    #[test]
    fn failover_prefers_a_stable_cluster_over_a_nearer_fresh_one() {
        let t0 = Instant::now();
        let mut r = all_up(3, t0);
        r.probed(0, ms(10), t0);
        r.probed(1, ms(20), t0);
        r.probed(2, ms(40), t0);
        // 1 fails and comes back: fresh. Then 0 fails: 2 (stable) wins over 1 (nearer, fresh).
        r.connection(1, false, t0);
        r.connection(1, true, t0 + ms(1_000));
        r.probed(1, ms(20), t0 + ms(1_000));
        let s = r.connection(0, false, t0 + ms(2_000)).unwrap();
        assert_eq!(s.to, Some(2));
    }

    #[test]
    fn a_missing_stream_makes_a_cluster_unusable() {
        let t0 = Instant::now();
        let mut r = two_up(t0);
        assert_eq!(r.stream(0, false, t0).map(|s| s.to), Some(Some(1)));
    }
}
