//! What a start-up recovery found in the spool directory: [`Recovery`] and its [`Damage`],
//! and how they read in the log.

use std::fmt;

use crate::spool::segment;

/// What [`Spool::open`](super::Spool::open) found in the directory, for the caller to log.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovery {
    /// Segment files found.
    pub segments: usize,
    /// What they hold: intact records (batches) waiting for replay, damaged records found (and
    /// skipped), bytes of segment files after recovery, and torn bytes at the end of segments
    /// (cut off the last segment, left in place and never read in the others).
    pub total: segment::Tally,
    /// Each damaged place, by file.
    pub damage: Vec<Damage>,
}

/// One damaged place in a segment file.
#[derive(Clone, Debug, PartialEq)]
pub struct Damage {
    pub file: String,
    pub offset: u64,
    pub kind: DamageKind,
}

/// What was wrong there.
#[derive(Clone, Debug, PartialEq)]
pub enum DamageKind {
    /// A record of `len` payload bytes that failed its checksum or did not decode; skipped.
    Corrupt { len: u32, why: segment::Corruption },
    /// The file is unusable from here on (`bytes` of it); `truncated` when it was the last
    /// segment and the tail was cut off so appends go on after the last intact record.
    Torn { bytes: u64, why: segment::Torn, truncated: bool },
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} segments, {} records ({} events), {} bytes; {} corrupt records skipped, {} torn bytes",
            self.segments,
            self.total.records,
            self.total.events,
            self.total.bytes,
            self.total.corrupt,
            self.total.torn_bytes
        )?;
        for d in &self.damage {
            write!(f, "\n  {} at {}: ", d.file, d.offset)?;
            match &d.kind {
                DamageKind::Corrupt { len, why } => {
                    write!(f, "corrupt record of {len} bytes skipped: {why}")?
                }
                DamageKind::Torn { bytes, why, truncated } => write!(
                    f,
                    "torn tail of {bytes} bytes ({why}){}",
                    if *truncated { ", truncated" } else { ", left in place" }
                )?,
            }
        }
        Ok(())
    }
}
