//! What became of each request and what a run measured: per-request [`Outcome`]s, their
//! counts per phase ([`Tally`], in events) and the latency histograms ([`Measurements`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Why a request (or one event of it) did not end in success.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum Failure {
    /// The server answered with this status instead of the success status.
    Status(u16),
    /// The server refused the event or the request with this code (`queue_full`, ...).
    Refused(&'static str),
    /// The answer did not fit the request (wrong number of results, no outcome).
    Protocol,
    /// No complete answer within `--timeout`.
    Timeout,
    /// No connection could be established (TCP, TLS or protocol handshake).
    Connect,
    /// The connection failed while the request was in flight.
    Transport,
    /// Still waiting for a free worker when the run ended (`--timeout` after the measurement
    /// window): the generator was saturated, so the request was never sent.
    Unsent,
}

/// What became of one request.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Outcome {
    /// Answered, and every event of it accepted.
    Accepted,
    /// Failed as a whole: each of its events counts as this failure.
    Failed(Failure),
    /// Answered, with these of its events refused (one entry each); the others were accepted.
    Partial(Vec<Failure>),
}

/// Outcome counts of one phase, in events.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Tally {
    /// Events accepted.
    pub ok: u64,
    /// Events not accepted, by why.
    pub failed: BTreeMap<Failure, u64>,
}

/// Everything a run measured.
#[derive(Debug)]
pub struct Measurements {
    /// Intended send time (open loop) or actual send time (closed loop) -> success, in
    /// microseconds, measured requests whose events were all accepted.
    pub latency: Histogram<u64>,
    /// Intended send time -> actual send time, in microseconds, measured successes only: time
    /// spent waiting for a free worker (the generator's own queueing).
    pub queueing: Histogram<u64>,
    /// Outcomes of the events of measured requests.
    pub measured: Tally,
    /// Outcomes of the events of warm-up requests.
    pub warmup: Tally,
    /// Indices of the measured requests whose events were all accepted, unordered; empty
    /// unless the schedule tracks them ([`super::Schedule::tracking_acked`]).
    pub acked: Vec<u64>,
    /// Length of the measurement window used for the achieved rate.
    pub window: Duration,
    /// The run was stopped early (Ctrl-C).
    pub interrupted: bool,
}

impl Outcome {
    /// Events of a `events`-event request that were accepted.
    pub fn accepted(&self, events: u32) -> u64 {
        match self {
            Outcome::Accepted => u64::from(events),
            Outcome::Failed(_) => 0,
            Outcome::Partial(refused) => u64::from(events).saturating_sub(refused.len() as u64),
        }
    }

    /// True when every event was accepted: the request counts for latency.
    pub fn is_accepted(&self) -> bool {
        matches!(self, Outcome::Accepted)
    }

    /// `Accepted` when nothing was refused, else `Partial`.
    pub fn from_refusals(refused: Vec<Failure>) -> Self {
        if refused.is_empty() {
            Outcome::Accepted
        } else {
            Outcome::Partial(refused)
        }
    }
}

impl From<Result<(), Failure>> for Outcome {
    fn from(result: Result<(), Failure>) -> Self {
        match result {
            Ok(()) => Outcome::Accepted,
            Err(failure) => Outcome::Failed(failure),
        }
    }
}

impl Tally {
    /// Counts the events of one request of `events` events.
    pub fn record(&mut self, outcome: &Outcome, events: u32) {
        match outcome {
            Outcome::Accepted => self.ok += u64::from(events),
            Outcome::Failed(failure) => {
                *self.failed.entry(*failure).or_default() += u64::from(events);
            }
            Outcome::Partial(refused) => {
                self.ok += outcome.accepted(events);
                for failure in refused {
                    *self.failed.entry(*failure).or_default() += 1;
                }
            }
        }
    }

    /// Total number of failures.
    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }

    /// Adds `other`'s counts to this one.
    pub fn merge(&mut self, other: &Tally) {
        self.ok += other.ok;
        for (failure, n) in &other.failed {
            *self.failed.entry(*failure).or_default() += n;
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status(code) => write!(f, "{code}"),
            Failure::Refused(code) => f.write_str(code),
            Failure::Protocol => f.write_str("protocol"),
            Failure::Timeout => f.write_str("timeout"),
            Failure::Connect => f.write_str("connect"),
            Failure::Transport => f.write_str("transport"),
            Failure::Unsent => f.write_str("unsent"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_failures_by_kind() {
        let mut t = Tally::default();
        t.record(&Outcome::Accepted, 1);
        t.record(&Outcome::Failed(Failure::Status(503)), 1);
        t.record(&Outcome::Failed(Failure::Status(503)), 1);
        t.record(&Outcome::Failed(Failure::Timeout), 1);
        assert_eq!(t.ok, 1);
        assert_eq!(t.failures(), 3);
        assert_eq!(t.failed[&Failure::Status(503)], 2);
        assert_eq!(Failure::Status(503).to_string(), "503");
        assert_eq!(Failure::Refused("queue_full").to_string(), "queue_full");
    }

    #[test]
    fn tally_counts_events_not_requests() {
        let mut t = Tally::default();
        // Three requests of 16 events: all accepted, 2 refused, all timed out.
        t.record(&Outcome::Accepted, 16);
        let partial = Outcome::from_refusals(vec![
            Failure::Refused("queue_full"),
            Failure::Refused("forbidden"),
        ]);
        assert_eq!(partial.accepted(16), 14);
        assert!(!partial.is_accepted());
        t.record(&partial, 16);
        t.record(&Outcome::Failed(Failure::Timeout), 16);
        assert_eq!(t.ok, 30);
        assert_eq!(t.failures(), 18);
        assert_eq!(t.failed[&Failure::Timeout], 16);
        assert_eq!(t.failed[&Failure::Refused("queue_full")], 1);
        // Nothing refused is a plain success.
        assert_eq!(Outcome::from_refusals(Vec::new()), Outcome::Accepted);
        assert_eq!(Outcome::from(Err(Failure::Connect)), Outcome::Failed(Failure::Connect));
    }
}
