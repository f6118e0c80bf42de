//! Refusals of requests that never authenticated, counted instead of written one by one.
//!
//! Anyone on the internet can make the relay refuse a request (no token, a wrong route, a bad
//! body), as fast as they can send. Writing an audit record and a log line for each would let
//! them fill the shared NATS cluster and the disk at their rate, so these refusals are counted
//! per [`Key`] — protocol, code, reason and the peer's [`Source`] prefix — and each count is
//! written once per interval. The contract, on a clock the caller passes in:
//!
//! - a window opens with the first refusal counted into an empty table and is [`due`] once
//!   `interval` has passed; [`Refusals::poll`] then hands out its counts and the table starts
//!   over. Nothing counted, nothing written.
//! - at most `max_keys` keys per window carry a source prefix; a refusal whose key would be one
//!   more is counted under its protocol, code and reason with the source [`Source::Other`]
//!   ([`Counted::Folded`]). Those keys are bounded by the fixed sets of protocols, codes and
//!   reasons, so a window's table — and what it writes — is bounded whatever the peers do.
//!
//! [`due`]: Refusals::due

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::metrics::Protocol;
pub use crate::source::{Prefix, Prefixes};

/// Where a refused request came from, as precisely as it is counted.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// The peer's address cut to the configured prefix length.
    Prefix(Prefix),
    /// The front-end did not know the peer's address.
    Unknown,
    /// Any source beyond the window's `max_keys`.
    Other,
}

/// What one count is about.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    pub protocol: Protocol,
    pub code: &'static str,
    pub reason: &'static str,
    pub source: Source,
}

/// Whether a refusal was counted under its own source or folded into [`Source::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    Kept,
    Folded,
}

/// The counts of one finished window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// When its first refusal was counted.
    pub opened: Instant,
    /// Every key with its count, the largest first.
    pub counts: Vec<(Key, u64)>,
}

/// The counting table (sans-IO: time comes in as `now`).
#[derive(Debug)]
pub struct Refusals {
    interval: Duration,
    max_keys: usize,
    opened: Option<Instant>,
    counts: HashMap<Key, u64>,
    /// Keys in `counts` with a source other than [`Source::Other`].
    keyed: usize,
}

impl Source {
    /// `ip`'s source at these prefix lengths.
    pub fn of(ip: Option<IpAddr>, prefixes: Prefixes) -> Self {
        ip.map_or(Self::Unknown, |ip| Self::Prefix(prefixes.of(ip)))
    }
}

impl Refusals {
    pub fn new(interval: Duration, max_keys: usize) -> Self {
        Self { interval, max_keys, opened: None, counts: HashMap::new(), keyed: 0 }
    }

    /// Counts one refusal at `now` into the open window (opening one if there is none).
    /// Callers [`poll`](Self::poll) first, so a due window is not stretched.
    pub fn count(&mut self, mut key: Key, now: Instant) -> Counted {
        self.opened.get_or_insert(now);
        let mut counted = Counted::Kept;
        if key.source != Source::Other && !self.counts.contains_key(&key) {
            if self.keyed >= self.max_keys {
                key.source = Source::Other;
                counted = Counted::Folded;
            } else {
                self.keyed += 1;
            }
        }
        *self.counts.entry(key).or_default() += 1;
        counted
    }

    /// Whether the open window has lasted its interval at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.next_deadline().is_some_and(|at| now >= at)
    }

    /// When the open window is due, if one is open.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.opened.map(|at| at + self.interval)
    }

    /// The open window's counts if it is due at `now`, starting a new table.
    pub fn poll(&mut self, now: Instant) -> Option<Window> {
        if self.due(now) {
            self.drain()
        } else {
            None
        }
    }

    /// The open window's counts whether due or not (at shutdown).
    pub fn drain(&mut self) -> Option<Window> {
        let opened = self.opened.take()?;
        self.keyed = 0;
        let mut counts: Vec<(Key, u64)> = self.counts.drain().collect();
        counts.sort_by(|(a, n), (b, m)| {
            m.cmp(n).then_with(|| (a.source, a.code, a.reason).cmp(&(b.source, b.code, b.reason)))
        });
        Some(Window { opened, counts })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Prefix(prefix) => prefix.fmt(f),
            Self::Unknown => f.write_str("unknown"),
            Self::Other => f.write_str("other"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const PREFIXES: Prefixes = Prefixes { ipv4: 32, ipv6: 64 };

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn key(source: &str, reason: &'static str) -> Key {
        Key {
            protocol: Protocol::Https,
            code: "unauthorized",
            reason,
            source: Source::of(ip(source), PREFIXES),
        }
    }

    /// A window as `(source, reason, count)` rows.
    fn rows(w: &Window) -> Vec<(String, &'static str, u64)> {
        w.counts.iter().map(|(k, n)| (k.source.to_string(), k.reason, *n)).collect()
    }

    #[test]
    fn sources_are_prefixes_or_unknown() {
        // The cutting itself is `source`'s (tested there).
        assert_eq!(
            Source::of(ip("2001:db8:1:2:ffff::1"), PREFIXES).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(Source::of(None, PREFIXES).to_string(), "unknown");
    }

    #[test]
    fn a_window_writes_each_key_once_with_its_count_when_due() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut r = Refusals::new(s(10), 8);
        assert_eq!(r.poll(t0), None, "nothing counted, nothing written");
        assert_eq!(r.next_deadline(), None);
        // (at, source, reason) counted; then what a poll at `at` hands out.
        for (at, source, reason) in [
            (0, "192.0.2.1", "missing_token"),
            (1, "192.0.2.1", "missing_token"),
            (2, "2001:db8::1", "missing_token"),
            (3, "2001:db8::2", "missing_token"), // same /64
            (4, "192.0.2.1", "unknown_token"),
            (9, "192.0.2.1", "missing_token"),
        ] {
            assert_eq!(r.poll(t0 + s(at)), None, "not due at {at} s");
            assert_eq!(r.count(key(source, reason), t0 + s(at)), Counted::Kept);
        }
        assert_eq!(r.next_deadline(), Some(t0 + s(10)));
        let w = r.poll(t0 + s(10)).expect("due after the interval");
        assert_eq!(w.opened, t0);
        assert_eq!(
            rows(&w),
            [
                ("192.0.2.1/32".into(), "missing_token", 3),
                ("2001:db8::/64".into(), "missing_token", 2),
                ("192.0.2.1/32".into(), "unknown_token", 1),
            ]
        );
        assert_eq!(r.poll(t0 + s(100)), None, "the table started over");
        // The next window opens with its first refusal, not at the last poll.
        r.count(key("192.0.2.1", "missing_token"), t0 + s(100));
        assert_eq!(r.poll(t0 + s(109)), None);
        assert_eq!(
            rows(&r.poll(t0 + s(110)).unwrap()),
            [("192.0.2.1/32".into(), "missing_token", 1)]
        );
    }

    #[test]
    fn sources_beyond_max_keys_are_folded_into_other() {
        let t0 = Instant::now();
        let mut r = Refusals::new(Duration::from_secs(1), 2);
        let counted: Vec<Counted> = [
            ("192.0.2.1", "missing_token"),
            ("192.0.2.2", "missing_token"),
            ("192.0.2.1", "missing_token"), // a kept key stays kept
            ("192.0.2.3", "missing_token"),
            ("192.0.2.4", "missing_token"),
            ("192.0.2.5", "unknown_token"),
        ]
        .into_iter()
        .map(|(source, reason)| r.count(key(source, reason), t0))
        .collect();
        use Counted::{Folded, Kept};
        assert_eq!(counted, [Kept, Kept, Kept, Folded, Folded, Folded]);
        let w = r.drain().unwrap();
        assert_eq!(
            rows(&w),
            [
                ("192.0.2.1/32".into(), "missing_token", 2),
                ("other".into(), "missing_token", 2),
                ("192.0.2.2/32".into(), "missing_token", 1),
                ("other".into(), "unknown_token", 1),
            ]
        );
        // A new window has room again.
        assert_eq!(r.count(key("192.0.2.9", "missing_token"), t0), Kept);
    }

    #[test]
    fn a_flood_from_many_sources_writes_a_bounded_window() {
        let t0 = Instant::now();
        let mut r = Refusals::new(Duration::from_secs(60), 16);
        for i in 0..100_000u32 {
            let source = Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
            let key = Key {
                protocol: Protocol::ALL[i as usize % 3],
                code: "not_found",
                reason: ["not_found", "method_not_allowed"][i as usize % 2],
                source: Source::of(source, PREFIXES),
            };
            r.count(key, t0);
        }
        let w = r.drain().unwrap();
        assert!(w.counts.len() <= 16 + 3 * 2, "{} keys", w.counts.len());
        assert_eq!(w.counts.iter().map(|(_, n)| n).sum::<u64>(), 100_000);
    }
}
