//! What the generated events look like, the same for every mode: subjects used round robin, a
//! fixed payload, and an idempotency key unique to the run and the event.
//!
//! Events are numbered from 0 across the whole run (warm-up included); a mode that puts `E`
//! events in one request sends events `seq·E .. seq·E + E` in request `seq`.
//!
//! With `--consume` every payload starts with a [`Stamp`]: the run's nonce, the event number
//! and the request's *intended* send time (unix ns), so a consumer that reads the stream can
//! measure send→consumer latency per event, coordinated-omission-corrected like send→ack, and
//! tell which acknowledged events it never saw.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::ensure;
use bytes::{BufMut, Bytes, BytesMut};

/// Bytes a [`Stamp`] takes at the start of a payload.
pub const STAMP_LEN: usize = 24;

/// Event shape flags shared by every mode.
#[derive(Clone, Debug, clap::Args)]
pub struct EventArgs {
    /// Number of distinct subjects, used round robin.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub subjects: u32,

    /// Subjects are `{prefix}.0` .. `{prefix}.{N-1}` [default: edge.load; direct-js:
    /// direct.load]
    #[arg(long, value_name = "PREFIX")]
    pub subject_prefix: Option<String>,

    /// Size of each event payload in bytes.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub payload_bytes: usize,

    /// Send events without idempotency keys (direct-js: without `Nats-Msg-Id`), so neither
    /// the relay nor JetStream checks them for duplicates: what those checks cost.
    #[arg(long)]
    pub no_keys: bool,
}

/// Everything needed to build event `n`; shared by all workers of a run.
#[derive(Clone, Debug)]
pub struct Events {
    /// The subject prefix in use (`--subject-prefix` or the mode's default).
    prefix: String,
    subjects: Vec<String>,
    payload: Bytes,
    /// Makes idempotency keys unique across runs: `lt-{run_id}-{n}`.
    run_id: String,
    /// Whether events carry keys (not `--no-keys`).
    keyed: bool,
    /// The run nonce of the [`Stamp`] every payload starts with; `None`: the fixed payload.
    stamp: Option<u64>,
}

/// What a stamped payload starts with (24 bytes, big-endian): which run sent the event, its
/// number, and when its request was due.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Stamp {
    /// Random per run, so events of other runs on the same stream are told apart.
    pub nonce: u64,
    /// The event number (from 0, warm-up included).
    pub event: u64,
    /// Intended send time of the event's request (open loop), or its actual send time (closed
    /// loop), in unix nanoseconds on [`unix_ns`]'s clock.
    pub intended_unix_ns: u64,
}

impl Events {
    /// The events of `args`, with `default_prefix` when `--subject-prefix` is not given.
    pub fn new(args: &EventArgs, default_prefix: &str) -> anyhow::Result<Self> {
        let prefix = args.subject_prefix.clone().unwrap_or_else(|| default_prefix.to_owned());
        ensure!(
            !prefix.is_empty() && !prefix.contains(['*', '>', ' ']),
            "--subject-prefix `{prefix}` must be a literal NATS subject (no wildcards, no spaces)"
        );
        ensure!(args.subjects > 0, "--subjects must be at least 1");
        let subjects = (0..args.subjects).map(|n| format!("{prefix}.{n}")).collect();
        let started = SystemTime::now().duration_since(UNIX_EPOCH)?;
        Ok(Self {
            prefix,
            subjects,
            payload: Bytes::from(vec![b'x'; args.payload_bytes]),
            run_id: format!("{:x}{:04x}", started.as_millis(), std::process::id() & 0xffff),
            keyed: !args.no_keys,
            stamp: None,
        })
    }

    /// Starts every payload with a [`Stamp`] of run `nonce` (for `--consume`); the payload
    /// must have room for it.
    pub fn stamped(mut self, nonce: Option<u64>) -> anyhow::Result<Self> {
        if nonce.is_some() {
            ensure!(
                self.payload.len() >= STAMP_LEN,
                "--consume stamps the send time into the payload: --payload-bytes must be at \
                 least {STAMP_LEN}"
            );
        }
        self.stamp = nonce;
        Ok(self)
    }

    /// The subject prefix in use.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every subject, in round-robin order.
    pub fn subjects(&self) -> &[String] {
        &self.subjects
    }

    /// Position of event `n`'s subject in [`Events::subjects`].
    pub fn subject_index(&self, n: u64) -> usize {
        // `subjects` is never empty: --subjects is at least 1.
        (n % self.subjects.len() as u64) as usize
    }

    /// Subject of event `n`.
    pub fn subject(&self, n: u64) -> &str {
        &self.subjects[self.subject_index(n)]
    }

    /// The payload of event `n`, whose request was due at `intended_unix_ns`: the fixed
    /// payload (cheap to clone), or with `--consume` the same bytes starting with a [`Stamp`].
    pub fn payload(&self, n: u64, intended_unix_ns: u64) -> Bytes {
        let Some(nonce) = self.stamp else {
            return self.payload.clone();
        };
        let mut out = BytesMut::with_capacity(self.payload.len());
        Stamp { nonce, event: n, intended_unix_ns }.put(&mut out);
        out.extend_from_slice(&self.payload[STAMP_LEN..]);
        out.freeze()
    }

    /// Idempotency key of event `n`, unique across runs: ≤ 40 printable ASCII characters;
    /// none with `--no-keys`.
    pub fn key(&self, n: u64) -> Option<String> {
        self.keyed.then(|| format!("lt-{}-{n}", self.run_id))
    }
}

impl Stamp {
    /// Appends the 24 bytes of the stamp.
    fn put(&self, out: &mut BytesMut) {
        out.put_u64(self.nonce);
        out.put_u64(self.event);
        out.put_u64(self.intended_unix_ns);
    }

    /// The stamp a payload starts with, if it is long enough; the bytes are not checked
    /// further (compare [`Stamp::nonce`] with the run's).
    pub fn read(payload: &[u8]) -> Option<Self> {
        let word = |i: usize| -> Option<u64> {
            let bytes: [u8; 8] = payload.get(i * 8..i * 8 + 8)?.try_into().ok()?;
            Some(u64::from_be_bytes(bytes))
        };
        Some(Self { nonce: word(0)?, event: word(1)?, intended_unix_ns: word(2)? })
    }
}

/// A fresh run nonce for [`Events::stamped`]: the clock's nanoseconds mixed with the process
/// id, so two runs (or two modes of one `compare`) never share one.
pub fn nonce() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    // splitmix64 of the mix: spreads nearby times over all bits.
    let mut z = now ^ (u64::from(std::process::id()) << 32) ^ count.wrapping_mul(0x9e37);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `at` in unix nanoseconds on a clock that is anchored to the wall clock once per process and
/// then follows the monotonic clock, so send and receive times taken in one process are
/// comparable to the nanosecond even if the wall clock is adjusted during the run.
pub fn unix_ns(at: Instant) -> u64 {
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    let (anchor, anchor_ns) = *ANCHOR.get_or_init(|| {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        (Instant::now(), now)
    });
    if at >= anchor {
        anchor_ns.saturating_add(at.duration_since(anchor).as_nanos() as u64)
    } else {
        anchor_ns.saturating_sub(anchor.duration_since(at).as_nanos() as u64)
    }
}

/// Current wall-clock time in unix milliseconds, for the edge timestamp; 0 if the clock is
/// before 1970.
pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(subjects: u32, prefix: Option<&str>) -> EventArgs {
        EventArgs {
            subjects,
            subject_prefix: prefix.map(str::to_owned),
            payload_bytes: 8,
            no_keys: false,
        }
    }

    #[test]
    fn subjects_go_round_robin() {
        let events = Events::new(&args(3, Some("a.b")), "edge.load").unwrap();
        assert_eq!(events.prefix(), "a.b");
        assert_eq!(events.subjects(), ["a.b.0", "a.b.1", "a.b.2"]);
        assert_eq!(events.subject(0), "a.b.0");
        assert_eq!(events.subject(4), "a.b.1");
        assert_eq!(events.subject_index(5), 2);
        assert_eq!(events.payload(0, 0).len(), 8);
    }

    #[test]
    fn the_mode_default_prefix_applies_unless_given() {
        let events = Events::new(&args(1, None), "direct.load").unwrap();
        assert_eq!(events.subject(7), "direct.load.0");
        assert!(Events::new(&args(1, Some("a.*")), "x").is_err());
        assert!(Events::new(&args(1, Some("")), "x").is_err());
    }

    #[test]
    fn keys_are_unique_and_printable() {
        let events = Events::new(&args(1, None), "edge.load").unwrap();
        let (a, b) = (events.key(41).unwrap(), events.key(42).unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("lt-") && a.ends_with("-41"), "{a}");
        assert!(a.len() <= 40 && a.bytes().all(|c| c.is_ascii_graphic()), "{a}");
    }

    #[test]
    fn stamped_payloads_carry_event_and_send_time() {
        let plain = Events::new(&EventArgs { payload_bytes: 32, ..args(1, None) }, "e").unwrap();
        assert_eq!(plain.payload(3, 7), Bytes::from(vec![b'x'; 32]));
        let events = plain.stamped(Some(42)).unwrap();
        let payload = events.payload(3, 1_700_000_000_123_456_789);
        assert_eq!(payload.len(), 32);
        assert_eq!(&payload[STAMP_LEN..], b"xxxxxxxx");
        let stamp = Stamp::read(&payload).unwrap();
        assert_eq!(
            stamp,
            Stamp { nonce: 42, event: 3, intended_unix_ns: 1_700_000_000_123_456_789 }
        );
        // Too short to carry a stamp: refused up front, and never read.
        let short = Events::new(&EventArgs { payload_bytes: 8, ..args(1, None) }, "e").unwrap();
        assert!(short.stamped(Some(1)).is_err());
        assert_eq!(Stamp::read(b"short"), None);
        assert_ne!(nonce(), nonce());
    }

    #[test]
    fn the_unix_clock_follows_the_monotonic_one() {
        let a = Instant::now();
        let b = a + std::time::Duration::from_millis(5);
        assert_eq!(unix_ns(b) - unix_ns(a), 5_000_000);
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        // Anchored to the wall clock (within a generous second).
        assert!(unix_ns(Instant::now()).abs_diff(wall) < 1_000_000_000);
    }

    #[test]
    fn no_keys_means_no_keys() {
        let args = EventArgs { no_keys: true, ..args(1, None) };
        assert_eq!(Events::new(&args, "edge.load").unwrap().key(7), None);
    }
}
