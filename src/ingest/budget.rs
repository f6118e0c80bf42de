//! The memory budget: the bytes the relay holds for its peers — request bodies and native
//! frames while they are read, and the requests decoded from them until they are answered —
//! under one limit for the whole relay, with a share per source (address prefix, see
//! [`crate::source`]) and per connection, checked *before* anything is allocated. When a share
//! is used up, the read is refused (503 `queue_full`, reason `memory_budget`, with
//! `Retry-After`): overload is an answer, never growth, and one source cannot take what the
//! others need.
//!
//! [`Ledger`] decides, on plain counts (sans-IO, table-tested); [`Budget`] shares one ledger
//! between tasks; a connection reserves through its [`Share`], and a [`Held`] gives its bytes
//! back when dropped, so no path can forget to.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{ErrorCode, Refusal};
use crate::source::{Prefix, Prefixes};

/// What a client is told to wait before retrying a read the budget refused.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How much the relay may hold for peers, bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Everything held for every peer.
    pub total: usize,
    /// Held for one source (address prefix), all its connections together.
    pub per_source: usize,
    /// Held for one connection, all its requests together.
    pub per_connection: usize,
}

/// Which share a reservation would have overrun.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    Total,
    Source,
    Connection,
}

/// The counts behind the budget (sans-IO): bytes held in all and per source.
#[derive(Debug)]
pub struct Ledger {
    limits: Limits,
    used: usize,
    by_source: HashMap<Prefix, usize>,
}

/// The relay's budget, shared by every front-end.
#[derive(Debug)]
pub struct Budget {
    ledger: Mutex<Ledger>,
    limits: Limits,
    prefixes: Prefixes,
}

/// One connection's share of the budget: reservations through it count against its source
/// and itself as well as the total.
#[derive(Clone, Debug)]
pub struct Share {
    budget: Arc<Budget>,
    source: Prefix,
    used: Arc<AtomicUsize>,
}

/// Bytes reserved for one read (and what is decoded from it); given back when dropped.
#[derive(Debug)]
#[must_use = "the bytes are given back when this is dropped"]
pub struct Held {
    share: Share,
    bytes: usize,
}

impl Ledger {
    pub fn new(limits: Limits) -> Self {
        Self { limits, used: 0, by_source: HashMap::new() }
    }

    /// Takes `bytes` for `source`, whose connection already holds `connection`, unless a
    /// share would be overrun; then nothing is taken.
    pub fn take(&mut self, source: Prefix, connection: usize, bytes: usize) -> Result<(), Over> {
        let held = self.by_source.get(&source).copied().unwrap_or(0);
        if connection.saturating_add(bytes) > self.limits.per_connection {
            return Err(Over::Connection);
        }
        if held.saturating_add(bytes) > self.limits.per_source {
            return Err(Over::Source);
        }
        if self.used.saturating_add(bytes) > self.limits.total {
            return Err(Over::Total);
        }
        self.used += bytes;
        *self.by_source.entry(source).or_insert(0) += bytes;
        Ok(())
    }

    /// Gives back `bytes` that `source` took.
    pub fn give(&mut self, source: Prefix, bytes: usize) {
        self.used = self.used.saturating_sub(bytes);
        if let Some(held) = self.by_source.get_mut(&source) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                self.by_source.remove(&source);
            }
        }
    }

    /// Bytes held in all.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Sources holding anything (the table never outgrows them).
    pub fn sources(&self) -> usize {
        self.by_source.len()
    }
}

impl Over {
    /// The refusal of a read that would overrun this share.
    pub fn refusal(self) -> Refusal {
        let (reason, whose) = match self {
            Over::Total => ("memory_budget", "the relay holds as much from its peers as it may"),
            Over::Source => ("source_memory_budget", "this source holds as much as one source may"),
            Over::Connection => {
                ("connection_memory_budget", "this connection holds as much as one connection may")
            }
        };
        Refusal::new(ErrorCode::QueueFull, format!("{whose}: retry shortly"))
            .because(reason)
            .retry_after(RETRY_AFTER)
    }
}

impl Budget {
    pub fn new(limits: Limits, prefixes: Prefixes) -> Arc<Self> {
        Arc::new(Self { ledger: Mutex::new(Ledger::new(limits)), limits, prefixes })
    }

    /// The share of a new connection from `peer`.
    pub fn connection(self: &Arc<Self>, peer: IpAddr) -> Share {
        Share {
            budget: self.clone(),
            source: self.prefixes.of(peer),
            used: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The configured shares.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// How addresses are grouped into sources.
    pub fn prefixes(&self) -> Prefixes {
        self.prefixes
    }

    /// Bytes held for peers now.
    pub fn used(&self) -> usize {
        self.lock().used()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Share {
    /// Holds nothing yet: what a stream's buffer holds grows and shrinks with it.
    pub fn hold(&self) -> Held {
        Held { share: self.clone(), bytes: 0 }
    }

    /// Reserves `bytes` before they are read or allocated.
    pub fn reserve(&self, bytes: usize) -> Result<Held, Refusal> {
        let mut held = Held { share: self.clone(), bytes: 0 };
        held.grow(bytes)?;
        Ok(held)
    }

    /// Bytes this connection holds now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl Held {
    /// Reserves `more` bytes on top (a body of unknown length as it arrives, the events
    /// decoded from it); on refusal what was held stays held.
    pub fn grow(&mut self, more: usize) -> Result<(), Refusal> {
        let share = &self.share;
        let mut ledger = share.budget.lock();
        ledger.take(share.source, share.used(), more).map_err(Over::refusal)?;
        share.used.fetch_add(more, Ordering::Relaxed);
        self.bytes += more;
        Ok(())
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds at least `bytes` in all, reserving what is missing (see [`Held::grow`]).
    pub fn cover(&mut self, bytes: usize) -> Result<(), Refusal> {
        match bytes.checked_sub(self.bytes) {
            Some(more) if more > 0 => self.grow(more),
            _ => Ok(()),
        }
    }

    /// Gives back what is held beyond `bytes`.
    pub fn shrink_to(&mut self, bytes: usize) {
        if let Some(less) = self.bytes.checked_sub(bytes).filter(|l| *l > 0) {
            let share = &self.share;
            share.budget.lock().give(share.source, less);
            share.used.fetch_sub(less, Ordering::Relaxed);
            self.bytes = bytes;
        }
    }

    /// Moves `bytes` of what is held (all of it, if less) to a [`Held`] of their own: a frame
    /// taken out of a stream's buffer keeps its bytes until its request is answered.
    pub fn split_off(&mut self, bytes: usize) -> Held {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        Held { share: self.share.clone(), bytes }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let share = &self.share;
            share.budget.lock().give(share.source, self.bytes);
            share.used.fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// Connections open per source, at most `max` each (`https.max_connections_per_ip`,
/// `quic.max_connections_per_ip`): one host cannot take the connection slots the others need.
#[derive(Debug)]
pub struct Slots {
    max: usize,
    prefixes: Prefixes,
    open: Mutex<HashMap<Prefix, usize>>,
}

/// One connection's slot; freed when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    source: Prefix,
}

impl Slots {
    pub fn new(max: usize, prefixes: Prefixes) -> Arc<Self> {
        Arc::new(Self { max, prefixes, open: Mutex::new(HashMap::new()) })
    }

    /// A slot for a connection from `peer`, unless its source has `max` open.
    pub fn take(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let source = self.prefixes.of(peer);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(source).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot { slots: self.clone(), source })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.source);
            }
        }
    }
}

/// The budget to use when none is configured: a quarter of the memory the relay may use
/// (`limit`, the cgroup's `memory.max` or the machine's RAM), within 64 MiB and 8 GiB.
pub fn default_total(limit: Option<u64>) -> usize {
    const MIB: u64 = 1 << 20;
    let quarter = limit.map_or(1 << 30, |l| l / 4);
    quarter.clamp(64 * MIB, 8 << 30) as usize
}

/// The memory the relay may use: its cgroup's `memory.max` if set, else the machine's RAM.
pub fn memory_limit() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok();
    let cgroup = cgroup.and_then(|s| s.trim().parse::<u64>().ok());
    cgroup.or_else(|| {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { total: 100, per_source: 60, per_connection: 40 };

    fn source(ip: &str) -> Prefix {
        Prefixes::DEFAULT.of(ip.parse().unwrap())
    }

    /// Has `sources` hold `bytes` between them, as many small reads.
    fn fill(ledger: &mut Ledger, sources: &[Prefix], mut bytes: usize) {
        for &s in sources.iter().cycle() {
            if bytes == 0 {
                break;
            }
            let n = bytes.min(10);
            if ledger.take(s, 0, n).is_ok() {
                bytes -= n;
            }
        }
    }

    #[test]
    fn a_read_is_refused_by_the_first_share_it_would_overrun() {
        // (held by the connection, by its source, by everyone) + bytes → outcome
        for (case, connection, by_source, total, bytes, want) in [
            ("fits every share", 0, 0, 0, 40, Ok(())),
            ("fills the connection exactly", 30, 30, 30, 10, Ok(())),
            ("over the connection", 30, 30, 30, 11, Err(Over::Connection)),
            ("over the source", 0, 50, 50, 11, Err(Over::Source)),
            ("over the total", 0, 0, 95, 6, Err(Over::Total)),
            ("nothing is free", 0, 0, 100, 1, Err(Over::Total)),
            ("zero bytes always fit", 40, 60, 100, 0, Ok(())),
            ("a huge read overflows nothing", 0, 0, 0, usize::MAX, Err(Over::Connection)),
        ] {
            let mut ledger = Ledger::new(LIMITS);
            let mine = source("192.0.2.1");
            fill(&mut ledger, &[mine], by_source);
            fill(&mut ledger, &[source("198.51.100.1"), source("198.51.100.2")], total - by_source);
            let before = ledger.used();
            assert_eq!(ledger.take(mine, connection, bytes), want, "{case}");
            let taken = if want.is_ok() { bytes } else { 0 };
            assert_eq!(ledger.used(), before + taken, "{case}: refused reads take nothing");
        }
    }

    #[test]
    fn what_is_given_back_is_free_again_and_sources_leave_the_table() {
        let mut ledger = Ledger::new(LIMITS);
        let (a, b) = (source("2001:db8:1:2::1"), source("2001:db8:1:2::99"));
        ledger.take(a, 0, 30).unwrap();
        ledger.take(b, 0, 30).unwrap();
        assert_eq!(ledger.sources(), 1, "one /64 is one source");
        assert_eq!(ledger.take(a, 0, 1), Err(Over::Source));
        ledger.give(a, 30);
        ledger.give(b, 30);
        assert_eq!((ledger.used(), ledger.sources()), (0, 0));
        assert_eq!(ledger.take(a, 0, 40), Ok(()));
    }

    #[test]
    fn held_bytes_come_back_when_dropped_and_a_refused_growth_keeps_what_was_held() {
        let budget = Budget::new(LIMITS, Prefixes::DEFAULT);
        let conn = budget.connection("192.0.2.1".parse().unwrap());
        let other = budget.connection("192.0.2.1".parse().unwrap());
        let mut body = conn.reserve(25).unwrap();
        body.grow(10).unwrap();
        let refused = body.grow(10).unwrap_err();
        assert_eq!(
            (refused.code, refused.reason),
            (ErrorCode::QueueFull, "connection_memory_budget")
        );
        assert!(refused.retry_after.is_some(), "a retry helps once reads finish");
        assert_eq!((body.bytes(), conn.used(), budget.used()), (35, 35, 35));
        // The other connection of the same source gets the rest of the source's share.
        assert_eq!(other.reserve(26).unwrap_err().reason, "source_memory_budget");
        let second = other.reserve(25).unwrap();
        drop(body);
        assert_eq!((conn.used(), budget.used()), (0, 25));
        drop(second);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_stream_s_holding_follows_its_buffer_and_frames_leave_with_their_bytes() {
        let budget = Budget::new(LIMITS, Prefixes::DEFAULT);
        let conn = budget.connection("192.0.2.1".parse().unwrap());
        let mut reading = conn.reserve(0).unwrap();
        reading.cover(30).unwrap(); // a read of up to 30 bytes
        reading.shrink_to(12); // 12 came
        assert_eq!(budget.used(), 12);
        let frame = reading.split_off(10); // a 10-byte frame leaves the buffer
        assert_eq!((reading.bytes(), frame.bytes(), budget.used()), (2, 10, 12));
        reading.cover(2).unwrap();
        assert_eq!(budget.used(), 12, "covering what is held takes nothing");
        assert_eq!(reading.cover(41).unwrap_err().reason, "connection_memory_budget");
        drop(frame);
        drop(reading);
        assert_eq!((budget.used(), conn.used()), (0, 0));
    }

    #[test]
    fn a_source_has_at_most_max_connections_and_a_closed_one_frees_its_slot() {
        let slots = Slots::new(2, Prefixes::DEFAULT);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = slots.take(ip("2001:db8:1:2::1")).unwrap();
        let _b = slots.take(ip("2001:db8:1:2::2")).unwrap();
        assert!(slots.take(ip("2001:db8:1:2::3")).is_none(), "one /64, one source");
        assert!(slots.take(ip("2001:db8:1:3::1")).is_some(), "the next /64 is another source");
        drop(a);
        assert!(slots.take(ip("2001:db8:1:2::3")).is_some());
    }

    #[test]
    fn the_default_is_a_quarter_of_the_memory_within_bounds() {
        const MIB: u64 = 1 << 20;
        for (limit, want) in [
            (None, 1024 * MIB),
            (Some(16 * 1024 * MIB), 4096 * MIB),
            (Some(128 * MIB), 64 * MIB),
            (Some(1 << 40), 8192 * MIB),
        ] {
            assert_eq!(default_total(limit) as u64, want, "{limit:?}");
        }
    }
}
