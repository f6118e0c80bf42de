//! A ceiling on refusal log lines: at most `per_interval` lines of one kind per interval, the
//! rest counted and summed up in one "suppressed N" line (sans-IO: time comes in as `now`).
//!
//! Each kind has its own interval, opened by its first line. A line asked for after the
//! interval ended opens the next one and carries the summary of the last one
//! ([`Admit::summary`]); [`LogLimit::expire`] hands out the summaries of intervals that ended
//! with nobody asking since, so a flood that stops is still summed up. The table holds one
//! entry per kind with an open interval: kinds are a fixed set of names.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The limiter.
#[derive(Debug)]
pub struct LogLimit<K> {
    interval: Duration,
    per_interval: u32,
    kinds: HashMap<K, Open>,
}

/// One kind's open interval.
#[derive(Debug)]
struct Open {
    since: Instant,
    logged: u32,
    suppressed: u64,
}

/// What to do with one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admit {
    /// Write the line.
    pub log: bool,
    /// Write first a summary: this many lines of the kind were suppressed in its last interval.
    pub summary: Option<u64>,
}

impl<K: Copy + Eq + Hash> LogLimit<K> {
    pub fn new(interval: Duration, per_interval: u32) -> Self {
        Self { interval, per_interval, kinds: HashMap::new() }
    }

    /// Whether a line of `kind` may be written at `now`, counting it either way.
    pub fn admit(&mut self, kind: K, now: Instant) -> Admit {
        let open = self.kinds.entry(kind).or_insert(Open { since: now, logged: 0, suppressed: 0 });
        let mut summary = None;
        if now.saturating_duration_since(open.since) >= self.interval {
            summary = (open.suppressed > 0).then_some(open.suppressed);
            *open = Open { since: now, logged: 0, suppressed: 0 };
        }
        let log = open.logged < self.per_interval;
        if log {
            open.logged += 1;
        } else {
            open.suppressed += 1;
        }
        Admit { log, summary }
    }

    /// Closes the intervals that ended by `now`: the kinds that suppressed lines in theirs,
    /// with how many.
    pub fn expire(&mut self, now: Instant) -> Vec<(K, u64)> {
        let interval = self.interval;
        let mut summaries = Vec::new();
        self.kinds.retain(|kind, open| {
            let ended = now.saturating_duration_since(open.since) >= interval;
            if ended && open.suppressed > 0 {
                summaries.push((*kind, open.suppressed));
            }
            !ended
        });
        summaries
    }

    /// Closes every interval, ended or not (at shutdown): the kinds that suppressed lines in
    /// theirs, with how many.
    pub fn drain(&mut self) -> Vec<(K, u64)> {
        let open = self.kinds.drain().filter(|(_, open)| open.suppressed > 0);
        open.map(|(kind, open)| (kind, open.suppressed)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_beyond_the_ceiling_are_suppressed_and_summed_up_once() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut limit = LogLimit::new(ms(1_000), 2);
        let (log, quiet) =
            (Admit { log: true, summary: None }, Admit { log: false, summary: None });
        // (at ms, kind, what the limiter says)
        for (at, kind, want) in [
            (0, "refused", log),
            (10, "refused", log),
            (20, "refused", quiet),
            (30, "refusals", log), // each kind has its own ceiling
            (999, "refused", quiet),
            // The next interval: the summary of the last one comes with its first line.
            (1_000, "refused", Admit { log: true, summary: Some(2) }),
            (1_001, "refused", log),
            (1_002, "refused", quiet),
            // Nothing suppressed in the interval before: no summary.
            (2_500, "refusals", log),
        ] {
            assert_eq!(limit.admit(kind, t0 + ms(at)), want, "{kind} at {at} ms");
        }
        assert_eq!(limit.expire(t0 + ms(1_999)), [], "no interval ended yet");
        // `refused` ended with one line suppressed; `refusals` is still open.
        assert_eq!(limit.expire(t0 + ms(2_000)), [("refused", 1)]);
        assert_eq!(limit.expire(t0 + ms(3_000)), [], "refusals suppressed nothing");
        assert_eq!(limit.expire(t0 + ms(9_000)), [], "expired intervals are forgotten");
        assert_eq!(limit.admit("refused", t0 + ms(9_000)), log);
    }

    #[test]
    fn a_flood_writes_the_ceiling_and_one_summary_per_interval() {
        let t0 = Instant::now();
        let mut limit = LogLimit::new(Duration::from_secs(10), 20);
        let (mut lines, mut summaries) = (0, Vec::new());
        // 1,000 refusals a second for a minute.
        for i in 0..60_000u64 {
            let admit = limit.admit("refused", t0 + Duration::from_millis(i));
            lines += u64::from(admit.log);
            summaries.extend(admit.summary);
        }
        summaries.extend(limit.expire(t0 + Duration::from_secs(70)).into_iter().map(|(_, n)| n));
        assert_eq!(lines, 6 * 20);
        assert_eq!(summaries, [9_980; 6]);
        assert_eq!(lines + summaries.iter().sum::<u64>(), 60_000);
    }

    #[test]
    fn a_ceiling_of_zero_writes_only_summaries() {
        let t0 = Instant::now();
        let mut limit = LogLimit::new(Duration::from_secs(1), 0);
        assert!(!limit.admit("refused", t0).log);
        assert_eq!(limit.expire(t0 + Duration::from_secs(1)), [("refused", 1)]);
        assert!(!limit.admit("refused", t0 + Duration::from_secs(2)).log);
        assert_eq!(limit.drain(), [("refused", 1)], "at shutdown, whether ended or not");
    }
}
