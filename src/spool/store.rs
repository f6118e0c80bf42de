//! The file side of the spool: the directory, the writer thread, the replay cursor.
//!
//! Every change to the directory — appending, rotating, deleting segments, fsync — happens on
//! one dedicated writer thread (`edgerelay-spool`), fed by a channel: it takes every append
//! waiting, writes them in one go, fsyncs once per the policy (group commit) and then answers
//! each caller through a oneshot, so no tokio worker ever blocks on the disk. Replay reads go
//! through `spawn_blocking`. The in-memory state (segment sizes and record counts, what is
//! done, the byte count) sits behind one short-held mutex.
//!
//! This file holds [`Spool`], its API and the state it shares with the writer; [`writer`] is the
//! writer thread and the reading of segment files, [`recovery`] what a start-up recovery found.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify, Semaphore};

use super::config::SpoolConfig;
use super::segment;
use super::{list_segments, segment_name, SpoolError};
use crate::metrics::Metrics;
use crate::proto::SpoolRecord;

mod recovery;
mod writer;

pub use recovery::{Damage, DamageKind, Recovery};
use writer::{read_records, sync_dir, Command, Pending, ReadPlan, Writer};

/// Appends handed to the writer thread and not yet answered, at most; further callers wait.
const MAX_PENDING_APPENDS: usize = 4096;

/// The spool of one relay. Share it in an `Arc`: appends may come from any number of tasks at
/// once; replay ([`Spool::next_batch`], [`Spool::done`], [`Spool::rewind`]) is meant for one task.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    pending: Arc<Semaphore>,
    cursor: tokio::sync::Mutex<Cursor>,
}

/// Where a record is: its segment and its offset in that segment's file. Ordered as the spool
/// is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId {
    pub segment: u64,
    pub offset: u64,
}

/// A record handed out for replay.
#[derive(Clone, Debug, PartialEq)]
pub struct Spooled {
    /// Pass it to [`Spool::done`] once JetStream acknowledged the batch.
    pub id: RecordId,
    pub record: SpoolRecord,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// One permit per group of appends written (the replay task sleeps on it).
    appended: Notify,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
struct State {
    segments: BTreeMap<u64, Segment>,
    /// The segment appends go to.
    active: u64,
    /// Bytes of all segment files.
    bytes: u64,
    /// Bytes of appends accepted and not yet written.
    reserved: u64,
    /// Intact records not yet done.
    waiting: u64,
    broken: Option<String>,
    closed: bool,
}

#[derive(Debug, Default)]
struct Segment {
    /// File length.
    size: u64,
    /// End of the usable records (before a torn tail).
    end: u64,
    /// Intact records.
    records: u64,
    /// Offsets of the records marked done.
    done: BTreeSet<u64>,
    /// Offsets of records found damaged (not counted in `records`).
    corrupt: BTreeSet<u64>,
    /// Deletion asked of the writer.
    retiring: bool,
}

/// The next record to hand out for replay.
#[derive(Clone, Copy, Debug, Default)]
struct Cursor {
    segment: u64,
    offset: u64,
}

impl Spool {
    /// Opens (creating it with mode 0700 if needed) and recovers the spool directory, and
    /// starts its writer thread. See [`Recovery`] for what is reported.
    ///
    /// Blocking: it reads every segment file once (one at a time, so a segment's size of
    /// memory at most). Call it at start-up before serving, or through `spawn_blocking`.
    pub fn open(cfg: &SpoolConfig, metrics: Arc<Metrics>) -> Result<(Self, Recovery), SpoolError> {
        let dir = cfg.dir.clone();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(SpoolError::io("create directory", &dir))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(SpoolError::io("open", &lock_path))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Err(SpoolError::Locked { dir }),
            Err(e) => return Err(SpoolError::io("lock", &lock_path)(e.into())),
        }

        let files = list_segments(&dir)?;
        let mut recovery = Recovery { segments: files.len(), ..Recovery::default() };
        let mut segments = BTreeMap::new();
        let last = files.last().map(|(seq, _)| *seq);
        for (seq, path) in &files {
            let bytes = std::fs::read(path).map_err(SpoolError::io("read", path))?;
            let scan = segment::scan(&bytes, |_, _| {});
            let name = segment_name(*seq);
            let mut seg = Segment {
                size: bytes.len() as u64,
                end: scan.end,
                records: scan.records,
                ..Segment::default()
            };
            let mut tally = scan.tally(seg.size);
            for (offset, len, why) in scan.corrupt {
                seg.corrupt.insert(offset);
                recovery.damage.push(Damage {
                    file: name.clone(),
                    offset,
                    kind: DamageKind::Corrupt { len, why },
                });
            }
            if let Some((offset, why)) = scan.torn {
                let torn = seg.size - offset;
                let truncated = Some(*seq) == last;
                if truncated {
                    let file = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(SpoolError::io("open", path))?;
                    file.set_len(offset).map_err(SpoolError::io("truncate", path))?;
                    file.sync_all().map_err(SpoolError::io("fsync", path))?;
                    seg.size = offset;
                }
                recovery.damage.push(Damage {
                    file: name,
                    offset,
                    kind: DamageKind::Torn { bytes: torn, why, truncated },
                });
            }
            // The bytes left after a torn tail was cut off; the torn bytes count nonetheless.
            tally.bytes = seg.size;
            recovery.total.add(&tally);
            segments.insert(*seq, seg);
        }

        metrics.spool_corrupt_records.inc_by(recovery.total.corrupt);
        metrics.spool_torn_bytes.inc_by(recovery.total.torn_bytes);
        let (active, size) = match segments.last_key_value() {
            Some((seq, seg)) => (*seq, seg.size),
            None => {
                segments.insert(1, Segment::default());
                (1, 0)
            }
        };
        let path = dir.join(segment_name(active));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(SpoolError::io("open", &path))?;
        if files.is_empty() {
            sync_dir(&dir).map_err(SpoolError::io("fsync", &dir))?;
        }
        let first = *segments.keys().next().unwrap_or(&active);
        let state = State {
            segments,
            active,
            bytes: recovery.total.bytes,
            reserved: 0,
            waiting: recovery.total.records,
            broken: None,
            closed: false,
        };
        state.export(&metrics);
        let shared =
            Arc::new(Shared { state: Mutex::new(state), appended: Notify::new(), metrics });
        let writer = Writer {
            dir: dir.clone(),
            shared: shared.clone(),
            file,
            active,
            size,
            segment_bytes: cfg.segment_bytes.max(1),
            fsync: cfg.fsync,
            interval: Duration::from_millis(cfg.fsync_interval_ms),
            dirty: false,
            last_sync: Instant::now(),
            _lock: lock,
        };
        let (commands, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("edgerelay-spool".into())
            .spawn(move || writer.run(rx))
            .map_err(SpoolError::io("start writer thread for", &dir))?;
        let spool = Self {
            dir,
            max_bytes: cfg.max_bytes,
            shared,
            commands,
            pending: Arc::new(Semaphore::new(MAX_PENDING_APPENDS)),
            cursor: tokio::sync::Mutex::new(Cursor { segment: first, offset: 0 }),
        };
        Ok((spool, recovery))
    }

    /// Stores `record`; returns once it is durable per `spool.fsync` (module docs). Fails with
    /// [`SpoolError::Full`] when it would take the spool beyond `spool.max_bytes`.
    ///
    /// Cancel-safe in the at-least-once sense: dropped after the record went to the writer, the
    /// record is still stored (and replayed).
    pub async fn append(&self, record: &SpoolRecord) -> Result<(), SpoolError> {
        let frame = segment::encode(record).map_err(|e| match e {
            segment::EncodeError::Empty => SpoolError::Empty,
            segment::EncodeError::TooLarge { bytes } => {
                SpoolError::TooLarge { bytes: bytes as u64 }
            }
        })?;
        let len = frame.len() as u64;
        if len > self.max_bytes {
            return Err(SpoolError::TooLarge { bytes: len });
        }
        let permit = self.pending.clone().acquire_owned().await.map_err(|_| SpoolError::Closed)?;
        {
            let mut s = self.shared.lock();
            if s.closed {
                return Err(SpoolError::Closed);
            }
            if let Some(reason) = &s.broken {
                return Err(SpoolError::Broken { reason: reason.clone() });
            }
            let bytes = s.bytes + s.reserved;
            if bytes + len > self.max_bytes {
                return Err(SpoolError::Full { bytes, max_bytes: self.max_bytes });
            }
            s.reserved += len;
        }
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Append(Pending { frame, reply, _permit: permit })).is_err() {
            self.shared.lock().reserved -= len;
            return Err(SpoolError::Closed);
        }
        answer.await.unwrap_or(Err(SpoolError::Closed))
    }

    /// Up to `max` of the oldest records not yet handed out (fewer when they add up to more
    /// than 8 MiB), in spool order; empty when there is nothing to replay. Records handed out
    /// are not handed out again unless [`Spool::rewind`] is called.
    pub async fn next_batch(&self, max: usize) -> Result<Vec<Spooled>, SpoolError> {
        let mut cursor = self.cursor.lock().await;
        loop {
            let plan = self.plan(*cursor);
            if plan.is_empty() || max == 0 {
                return Ok(Vec::new());
            }
            let dir = self.dir.clone();
            let from = *cursor;
            let read = tokio::task::spawn_blocking(move || read_records(&dir, from, plan, max))
                .await
                .map_err(|e| SpoolError::Io {
                    op: "read",
                    path: self.dir.clone(),
                    source: io::Error::other(e.to_string()),
                })??;
            let moved =
                read.cursor.segment != cursor.segment || read.cursor.offset != cursor.offset;
            *cursor = read.cursor;
            self.after_read(*cursor, &read.newly_corrupt);
            if !read.records.is_empty() || !moved {
                return Ok(read.records);
            }
        }
    }

    /// Marks a record handed out by [`Spool::next_batch`] as replayed (JetStream acknowledged
    /// it). Once every record of a segment is done, the segment is deleted. Marking a record
    /// twice, or one of a deleted segment, does nothing.
    pub fn done(&self, id: RecordId) {
        let mut s = self.shared.lock();
        let active = s.active;
        let Some(seg) = s.segments.get_mut(&id.segment) else { return };
        if id.offset >= seg.end || seg.corrupt.contains(&id.offset) || !seg.done.insert(id.offset) {
            return;
        }
        let retire = seg.finished() && !seg.retiring && (id.segment != active || seg.size > 0);
        if retire {
            seg.retiring = true;
        }
        s.waiting = s.waiting.saturating_sub(1);
        self.shared.metrics.spool_replayed.inc();
        s.export(&self.shared.metrics);
        drop(s);
        if retire {
            let _ = self.commands.send(Command::Retire(id.segment));
        }
    }

    /// Hands out again, from the oldest, every record not yet done (after a replay attempt
    /// failed and the caller dropped what it held).
    pub async fn rewind(&self) {
        let first = self.shared.lock().segments.keys().next().copied();
        let mut cursor = self.cursor.lock().await;
        *cursor = Cursor { segment: first.unwrap_or(cursor.segment), offset: 0 };
    }

    /// Resolves once records were appended since the last call (or the first): a replay task
    /// that found [`Spool::next_batch`] empty awaits this, then looks again.
    pub async fn appended(&self) {
        self.shared.appended.notified().await;
    }

    /// Records stored and not yet done.
    pub fn len(&self) -> u64 {
        self.shared.lock().waiting
    }

    /// No record waits for replay.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of segment files on disk (what `spool.max_bytes` limits).
    pub fn bytes(&self) -> u64 {
        self.shared.lock().bytes
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes and fsyncs whatever is pending, stops the writer thread and releases the
    /// directory lock; later appends fail with [`SpoolError::Closed`]. Records not yet done
    /// stay on disk for the next start.
    pub async fn close(&self) {
        self.shared.lock().closed = true;
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// What to read next: the segments from the cursor on.
    fn plan(&self, cursor: Cursor) -> Vec<ReadPlan> {
        let s = self.shared.lock();
        s.segments
            .range(cursor.segment..)
            .map(|(seq, seg)| ReadPlan {
                segment: *seq,
                start: if *seq == cursor.segment { cursor.offset } else { 0 },
                end: seg.end,
                sealed: *seq != s.active,
                skip: seg.done.union(&seg.corrupt).copied().collect(),
            })
            .filter(|p| p.start < p.end || p.sealed)
            .collect()
    }

    /// Records damage found while reading, and retires the segments the cursor left behind
    /// with nothing left to replay (all done, or nothing intact in them).
    fn after_read(&self, cursor: Cursor, newly_corrupt: &[RecordId]) {
        let mut s = self.shared.lock();
        for id in newly_corrupt {
            if let Some(seg) = s.segments.get_mut(&id.segment) {
                if seg.corrupt.insert(id.offset) {
                    seg.records = seg.records.saturating_sub(1);
                    s.waiting = s.waiting.saturating_sub(1);
                    self.shared.metrics.spool_corrupt_records.inc();
                }
            }
        }
        let active = s.active;
        let mut retire = Vec::new();
        for (seq, seg) in s.segments.range_mut(..cursor.segment) {
            if *seq != active && seg.finished() && !seg.retiring {
                seg.retiring = true;
                retire.push(*seq);
            }
        }
        s.export(&self.shared.metrics);
        drop(s);
        for seq in retire {
            let _ = self.commands.send(Command::Retire(seq));
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts that are still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn export(&self, metrics: &Metrics) {
        metrics.spool_bytes.set(self.bytes as i64);
        metrics.spool_records.set(self.waiting as i64);
    }
}

impl Segment {
    /// Every intact record is done.
    fn finished(&self) -> bool {
        self.done.len() as u64 >= self.records
    }
}

#[cfg(test)]
mod tests;
