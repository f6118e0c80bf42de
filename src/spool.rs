//! The disk spool: store-and-forward for batches that no NATS cluster takes right now.
//!
//! A directory (`spool.dir`) of append-only segment files named by a zero-padded 20-digit
//! sequence (`00000000000000000001.seg`), each a run of length + CRC-32C framed
//! `edgerelay.v1.SpoolRecord`s ([`segment`]). A record is one batch exactly as it would be
//! published: its `Nats-Msg-Id`, subject and encoded `Batch`.
//!
//! - [`Spool::append`] stores a record; it returns once the record is durable per
//!   `spool.fsync` (see [`FsyncPolicy`](config::FsyncPolicy)): `always` after an fsync
//!   (appends waiting together share one, group commit), `interval` after the write with an
//!   fsync at most `fsync_interval_ms` later, `never` after the write. `always` survives a power
//!   loss; `interval` and `never` survive a crash of the relay process (the data is in the
//!   kernel's page cache) but may lose their last records to a power loss or kernel crash.
//!   Beyond `spool.max_bytes` an append fails with [`SpoolError::Full`]: the caller refuses the
//!   event (503 with Retry-After), nothing is dropped silently.
//! - [`Spool::next_batch`] hands out the oldest records not yet replayed, in spool order, each
//!   with a [`RecordId`]; [`Spool::done`] marks one replayed (JetStream acknowledged it). A
//!   segment whose every record is done is deleted and its bytes leave the size count (the
//!   segment being appended to is closed first). [`Spool::appended`] lets an idle replay task
//!   sleep until something is appended.
//! - [`Spool::open`] recovers after a crash: it scans every segment, truncates a torn tail of
//!   the last one (a write cut short), counts damaged records (skipped), and reports it all in a
//!   [`Recovery`] for the caller to log.
//! - [`inspect`] reads a spool directory without changing it (`edgerelay spool inspect`).
//! - [`config`] is the `[spool]` section of the config file.
//!
//! # Restart semantics
//!
//! Replay is **at least once**. "Done" lives in memory: the records of a segment that was not
//! yet deleted when the relay stopped or crashed are replayed again after the restart, with
//! their original Msg-Ids, so JetStream drops the copies it already holds — as long as the
//! replay happens within the stream's `duplicate_window`. Older than that, a replayed batch can
//! be stored twice; consumers that must not see duplicates de-duplicate on the Msg-Id.
//!
//! One relay process per directory: [`Spool::open`] takes an exclusive `flock` on
//! `<dir>/lock`. [`inspect`] takes no lock and never writes, so it is safe beside a running
//! relay (a record being written at that moment may show as a torn tail).

pub mod config;
pub mod segment;

mod inspect;
mod store;

use std::path::{Path, PathBuf};

pub use inspect::{inspect, Inspection, SegmentInfo, SubjectWaiting};
pub use store::{Damage, DamageKind, RecordId, Recovery, Spool, Spooled};

use crate::error::{ErrorCode, Refusal, Side};

/// File name extension of segment files.
const SEGMENT_EXT: &str = "seg";

/// Why the spool could not store or read a record.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool holds `spool.max_bytes` already. The relay's side (capacity); a retry helps
    /// once replay has freed segments: answered 503 with Retry-After.
    #[error("spool full: {bytes} bytes stored, limit {max_bytes}")]
    Full { bytes: u64, max_bytes: u64 },
    /// The record is larger than one record may be ([`segment::MAX_RECORD_BYTES`]) or than the
    /// whole spool. A bug or a misconfiguration on the relay's side; a retry does not help.
    #[error("spool record of {bytes} bytes can never be stored")]
    TooLarge { bytes: u64 },
    /// The record is empty (no Msg-Id, no batch). A bug on the relay's side.
    #[error("empty spool record")]
    Empty,
    /// A file operation failed (opening, scanning, reading). The host's side (disk,
    /// permissions); retrying the same operation rarely helps.
    #[error("spool {op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    /// Another process holds the spool directory's lock (a second relay on the same `dir`).
    #[error("spool directory {dir} is locked by another process")]
    Locked { dir: PathBuf },
    /// A write or fsync failed; after a failed fsync the kernel may have dropped the data, so
    /// the spool refuses every append until the relay restarts and recovers the directory.
    /// Records stored before stay replayable. The host's side; a retry does not help.
    #[error("spool unusable since a failed write: {reason}")]
    Broken { reason: String },
    /// The spool was closed (the relay is shutting down).
    #[error("spool closed")]
    Closed,
}

impl SpoolError {
    /// Whose fault it is.
    pub fn side(&self) -> Side {
        Side::Internal
    }

    /// The refusal an event gets when its batch could not be spooled.
    pub fn refusal(&self) -> Refusal {
        match self {
            Self::Full { .. } => {
                Refusal::new(ErrorCode::QueueFull, "the relay's disk spool is full")
                    .because("spool_full")
            }
            Self::Closed => Refusal::new(ErrorCode::ShuttingDown, "the relay is shutting down")
                .because("spool_closed"),
            _ => Refusal::new(ErrorCode::Internal, "the relay's disk spool failed")
                .because("spool_failed"),
        }
    }

    /// Whether the same append may succeed later without a restart.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Full { .. })
    }

    fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io { op, path, source }
    }
}

/// `00000000000000000042.seg`.
fn segment_name(seq: u64) -> String {
    format!("{seq:020}.{SEGMENT_EXT}")
}

/// The sequence of a segment file name, if it is one.
fn segment_seq(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_EXT)?.strip_suffix('.')?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segment files of `dir`, oldest first.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(SpoolError::io("read directory", dir))? {
        let entry = entry.map_err(SpoolError::io("read directory", dir))?;
        if let Some(seq) = entry.file_name().to_str().and_then(segment_seq) {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_roundtrip_and_sort_by_sequence() {
        assert_eq!(segment_name(1), "00000000000000000001.seg");
        assert_eq!(segment_seq(&segment_name(u64::MAX)), Some(u64::MAX));
        for bad in ["1.seg", "0000000000000000000a.seg", "00000000000000000001.tmp", "lock"] {
            assert_eq!(segment_seq(bad), None, "{bad}");
        }
        assert!(segment_name(9) < segment_name(10));
    }

    #[test]
    fn only_a_full_spool_is_worth_retrying() {
        let full = SpoolError::Full { bytes: 10, max_bytes: 10 };
        assert!(full.retryable());
        let r = full.refusal();
        assert_eq!((r.code.status(), r.reason), (503, "spool_full"));
        assert!(r.retry_after.is_some());
        let broken = SpoolError::Broken { reason: "EIO".into() };
        assert!(!broken.retryable());
        assert_eq!(broken.refusal().code, ErrorCode::Internal);
        assert_eq!(SpoolError::Closed.refusal().code.status(), 503);
    }
}
