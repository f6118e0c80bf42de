//! What the generated events look like, the same for every mode: subjects used round robin, a
//! fixed payload, and an idempotency key unique to the run and the event.
//!
//! Events are numbered from 0 across the whole run (warm-up included); a mode that puts `E`
//! events in one request sends events `seq·E .. seq·E + E` in request `seq`.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::ensure;
use bytes::Bytes;

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
        })
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

    /// The payload every event carries (cheap to clone).
    pub fn payload(&self) -> Bytes {
        self.payload.clone()
    }

    /// Idempotency key of event `n`, unique across runs: ≤ 40 printable ASCII characters;
    /// none with `--no-keys`.
    pub fn key(&self, n: u64) -> Option<String> {
        self.keyed.then(|| format!("lt-{}-{n}", self.run_id))
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
        assert_eq!(events.payload().len(), 8);
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
    fn no_keys_means_no_keys() {
        let args = EventArgs { no_keys: true, ..args(1, None) };
        assert_eq!(Events::new(&args, "edge.load").unwrap().key(7), None);
    }
}
