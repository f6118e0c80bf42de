//! The file side of the spool: the directory, the writer thread, the replay cursor.
//!
//! Every change to the directory — appending, rotating, deleting segments, fsync — happens on
//! one dedicated writer thread (`edgerelay-spool`), fed by a channel: it takes every append
//! waiting, writes them in one go, fsyncs once per the policy (group commit) and then answers
//! each caller through a oneshot, so no tokio worker ever blocks on the disk. Replay reads go
//! through `spawn_blocking`. The in-memory state (segment sizes and record counts, what is
//! done, the byte count) sits behind one short-held mutex.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use super::config::{FsyncPolicy, SpoolConfig};
use super::segment::{self, Header, HEADER_BYTES};
use super::{list_segments, segment_name, SpoolError};
use crate::metrics::Metrics;
use crate::proto::SpoolRecord;

/// Appends handed to the writer thread and not yet answered, at most; further callers wait.
const MAX_PENDING_APPENDS: usize = 4096;
/// Appends written together before one fsync, at most.
const MAX_GROUP: usize = 1024;
/// A [`Spool::next_batch`] stops adding records past this many payload bytes.
const REPLAY_BUDGET_BYTES: u64 = 8 << 20;

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

/// What [`Spool::open`] found in the directory, for the caller to log.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovery {
    /// Segment files found.
    pub segments: usize,
    /// Intact records (batches) waiting for replay, and their events.
    pub records: u64,
    pub events: u64,
    /// Bytes of segment files after recovery.
    pub bytes: u64,
    /// Torn bytes at the end of segments: cut off the last segment, left in place (and never
    /// read) in the others.
    pub torn_bytes: u64,
    /// Damaged records found (and skipped).
    pub corrupt_records: u64,
    /// Earliest and latest spool time of the intact records, unix milliseconds.
    pub oldest_unix_ms: Option<u64>,
    pub newest_unix_ms: Option<u64>,
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

enum Command {
    Append(Pending),
    /// Delete this segment if every record in it is done (closing it first if it is active).
    Retire(u64),
    Close(oneshot::Sender<()>),
}

/// An append on its way to the disk.
struct Pending {
    frame: Vec<u8>,
    reply: oneshot::Sender<Result<(), SpoolError>>,
    /// One of [`MAX_PENDING_APPENDS`], released once answered.
    _permit: OwnedSemaphorePermit,
}

struct Writer {
    dir: PathBuf,
    shared: Arc<Shared>,
    file: File,
    active: u64,
    size: u64,
    segment_bytes: u64,
    fsync: FsyncPolicy,
    interval: Duration,
    /// Written and not yet fsynced.
    dirty: bool,
    last_sync: Instant,
    /// Held for the writer's lifetime: the directory's flock.
    _lock: File,
}

/// One segment's part of a replay read.
struct ReadPlan {
    segment: u64,
    start: u64,
    end: u64,
    /// Not the active segment: the cursor may move past its end.
    sealed: bool,
    skip: BTreeSet<u64>,
}

struct ReadResult {
    records: Vec<Spooled>,
    cursor: Cursor,
    /// Records that were intact at open and no longer are.
    newly_corrupt: Vec<RecordId>,
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
            recovery.records += scan.records;
            recovery.events += scan.events;
            recovery.corrupt_records += scan.corrupt.len() as u64;
            for t in [scan.oldest_unix_ms, scan.newest_unix_ms].into_iter().flatten() {
                recovery.oldest_unix_ms = Some(recovery.oldest_unix_ms.map_or(t, |o| o.min(t)));
                recovery.newest_unix_ms = Some(recovery.newest_unix_ms.map_or(t, |n| n.max(t)));
            }
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
                recovery.torn_bytes += torn;
                recovery.damage.push(Damage {
                    file: name,
                    offset,
                    kind: DamageKind::Torn { bytes: torn, why, truncated },
                });
            }
            recovery.bytes += seg.size;
            segments.insert(*seq, seg);
        }

        metrics.spool_corrupt_records.inc_by(recovery.corrupt_records);
        metrics.spool_torn_bytes.inc_by(recovery.torn_bytes);
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
            bytes: recovery.bytes,
            reserved: 0,
            waiting: recovery.records,
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

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        let mut close = None;
        while close.is_none() {
            let first = if self.dirty && self.fsync == FsyncPolicy::Interval {
                let wait = self.interval.saturating_sub(self.last_sync.elapsed());
                match rx.recv_timeout(wait) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(e) = self.sync() {
                            self.break_down(format!("fsync: {e}"));
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(c) => c,
                    Err(_) => break,
                }
            };
            let mut appends = Vec::new();
            let mut retire = Vec::new();
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Append(p) => appends.push(p),
                    Command::Retire(seq) => retire.push(seq),
                    Command::Close(reply) => close = Some(reply),
                }
                if close.is_none() && appends.len() < MAX_GROUP {
                    next = rx.try_recv().ok();
                }
            }
            if !appends.is_empty() {
                self.append(appends);
            }
            for seq in retire {
                if let Err(e) = self.retire(seq) {
                    tracing::warn!(segment = seq, error = %e, "spool: cannot delete a replayed segment");
                }
            }
        }
        if self.dirty {
            if let Err(e) = self.sync() {
                tracing::error!(error = %e, "spool: final fsync failed");
            }
        }
        // Release the lock before answering, so the directory can be opened again at once.
        drop(self);
        if let Some(reply) = close {
            let _ = reply.send(());
        }
    }

    /// Writes a group of frames (rotating segments as they fill), syncs per the policy, then
    /// answers every caller.
    fn append(&mut self, appends: Vec<Pending>) {
        let total: u64 = appends.iter().map(|p| p.frame.len() as u64).sum();
        let broken = self.shared.lock().broken.clone();
        let result = match broken {
            Some(reason) => Err(reason),
            None => self.write_group(&appends),
        };
        let mut s = self.shared.lock();
        s.reserved = s.reserved.saturating_sub(total);
        if let Err(reason) = &result {
            s.broken.get_or_insert_with(|| reason.clone());
        }
        s.export(&self.shared.metrics);
        drop(s);
        if result.is_ok() {
            self.shared.metrics.spool_appends.inc_by(appends.len() as u64);
            self.shared.appended.notify_one();
        }
        for p in appends {
            let _ = p.reply.send(result.clone().map_err(|reason| SpoolError::Broken { reason }));
        }
    }

    fn write_group(&mut self, appends: &[Pending]) -> Result<(), String> {
        let mut buf = Vec::new();
        let mut records = 0;
        for Pending { frame, .. } in appends {
            let len = frame.len() as u64;
            if self.size + buf.len() as u64 > 0
                && self.size + buf.len() as u64 + len > self.segment_bytes
            {
                self.flush(&mut buf, &mut records)?;
                self.rotate()?;
            }
            buf.extend_from_slice(frame);
            records += 1;
        }
        self.flush(&mut buf, &mut records)?;
        let due = match self.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval => self.last_sync.elapsed() >= self.interval,
            FsyncPolicy::Never => false,
        };
        if due {
            self.sync().map_err(|e| format!("fsync {}: {e}", self.path().display()))?;
        }
        Ok(())
    }

    /// Writes `buf` at the end of the active segment and counts its records in the state; on
    /// failure cuts the file back to where it was.
    fn flush(&mut self, buf: &mut Vec<u8>, records: &mut u64) -> Result<(), String> {
        if buf.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_all(buf) {
            let undo = self.file.set_len(self.size);
            return Err(format!(
                "write {}: {e}{}",
                self.path().display(),
                undo.err()
                    .map(|u| format!(" (and truncating back failed: {u})"))
                    .unwrap_or_default()
            ));
        }
        let len = buf.len() as u64;
        self.size += len;
        self.dirty = true;
        let mut s = self.shared.lock();
        s.bytes += len;
        s.waiting += *records;
        if let Some(seg) = s.segments.get_mut(&self.active) {
            seg.size += len;
            seg.end += len;
            seg.records += *records;
        }
        buf.clear();
        *records = 0;
        Ok(())
    }

    /// Closes the active segment (fsynced unless the policy is `never`) and starts the next.
    fn rotate(&mut self) -> Result<(), String> {
        if self.dirty && self.fsync != FsyncPolicy::Never {
            self.sync().map_err(|e| format!("fsync {}: {e}", self.path().display()))?;
        }
        let next = self.active + 1;
        let path = self.dir.join(segment_name(next));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("create {}: {e}", path.display()))?;
        sync_dir(&self.dir).map_err(|e| format!("fsync {}: {e}", self.dir.display()))?;
        self.file = file;
        self.active = next;
        self.size = 0;
        self.dirty = false;
        let mut s = self.shared.lock();
        s.segments.insert(next, Segment::default());
        s.active = next;
        Ok(())
    }

    /// Deletes segment `seq` if every record in it is done, closing it first if it is active.
    fn retire(&mut self, seq: u64) -> io::Result<()> {
        {
            let mut s = self.shared.lock();
            let Some(seg) = s.segments.get_mut(&seq) else { return Ok(()) };
            if !seg.finished() {
                seg.retiring = false;
                return Ok(());
            }
        }
        if seq == self.active {
            if self.size == 0 {
                if let Some(seg) = self.shared.lock().segments.get_mut(&seq) {
                    seg.retiring = false;
                }
                return Ok(());
            }
            if let Err(reason) = self.rotate() {
                self.break_down(reason.clone());
                return Err(io::Error::other(reason));
            }
        }
        let path = self.dir.join(segment_name(seq));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                if let Some(seg) = self.shared.lock().segments.get_mut(&seq) {
                    seg.retiring = false;
                }
                return Err(e);
            }
        }
        sync_dir(&self.dir)?;
        let mut s = self.shared.lock();
        if let Some(seg) = s.segments.remove(&seq) {
            s.bytes = s.bytes.saturating_sub(seg.size);
        }
        s.export(&self.shared.metrics);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    fn break_down(&self, reason: String) {
        tracing::error!(%reason, "spool: refusing appends until restart");
        self.shared.lock().broken.get_or_insert(reason);
    }

    fn path(&self) -> PathBuf {
        self.dir.join(segment_name(self.active))
    }
}

/// Reads records along `plan` (on a blocking thread).
fn read_records(
    dir: &Path,
    from: Cursor,
    plan: Vec<ReadPlan>,
    max: usize,
) -> Result<ReadResult, SpoolError> {
    let mut out = ReadResult { records: Vec::new(), cursor: from, newly_corrupt: Vec::new() };
    let mut budget = 0u64;
    for p in plan {
        let path = dir.join(segment_name(p.segment));
        out.cursor = Cursor { segment: p.segment, offset: p.start };
        let file = match File::open(&path) {
            Ok(f) => Some(f),
            // Deleted meanwhile (every record done): nothing to read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(SpoolError::io("open", &path)(e)),
        };
        let mut pos = p.start;
        if let Some(file) = file {
            while pos < p.end {
                if out.records.len() >= max || budget >= REPLAY_BUDGET_BYTES {
                    out.cursor.offset = pos;
                    return Ok(out);
                }
                let mut head = [0u8; HEADER_BYTES];
                let header = match file.read_exact_at(&mut head, pos) {
                    Ok(()) => Header::parse(head),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        Err(segment::Torn::ShortHeader { have: 0 })
                    }
                    Err(e) => return Err(SpoolError::io("read", &path)(e)),
                };
                let header = match header {
                    Ok(h) if pos + (HEADER_BYTES as u64) + u64::from(h.len) <= p.end => h,
                    Ok(_) | Err(_) => {
                        // Recovery found this part intact; it changed under us. The rest of
                        // the segment cannot be trusted.
                        tracing::warn!(file = %path.display(), offset = pos, "spool: segment changed since start-up; skipping its rest");
                        pos = p.end;
                        break;
                    }
                };
                let next = pos + HEADER_BYTES as u64 + u64::from(header.len);
                if p.skip.contains(&pos) {
                    pos = next;
                    continue;
                }
                let mut payload = vec![0u8; header.len as usize];
                file.read_exact_at(&mut payload, pos + HEADER_BYTES as u64)
                    .map_err(SpoolError::io("read", &path))?;
                match header.record(&payload) {
                    Ok(record) => {
                        budget += u64::from(header.len);
                        out.records.push(Spooled {
                            id: RecordId { segment: p.segment, offset: pos },
                            record,
                        });
                    }
                    Err(why) => {
                        tracing::warn!(file = %path.display(), offset = pos, %why, "spool: damaged record skipped");
                        out.newly_corrupt.push(RecordId { segment: p.segment, offset: pos });
                    }
                }
                pos = next;
            }
        }
        out.cursor.offset = pos;
        if !p.sealed {
            break;
        }
        out.cursor = Cursor { segment: p.segment + 1, offset: 0 };
    }
    Ok(out)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} segments, {} records ({} events), {} bytes; {} corrupt records skipped, {} torn bytes",
            self.segments,
            self.records,
            self.events,
            self.bytes,
            self.corrupt_records,
            self.torn_bytes
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn cfg(dir: &Path, max_bytes: u64, segment_bytes: u64, fsync: FsyncPolicy) -> SpoolConfig {
        SpoolConfig {
            enabled: true,
            dir: dir.join("spool"),
            max_bytes,
            segment_bytes,
            fsync,
            fsync_interval_ms: 20,
        }
    }

    fn rec(i: u64) -> SpoolRecord {
        SpoolRecord {
            msg_id: format!("r.b.{i}"),
            subject: format!("edge.s{}", i % 3),
            batch: vec![i as u8; 40].into(),
            events: 2,
            spooled_unix_ms: 1_700_000_000_000 + i,
        }
    }

    /// Every record has the same frame length.
    fn frame() -> u64 {
        segment::frame_len(&rec(0))
    }

    fn open(c: &SpoolConfig) -> (Spool, Recovery, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let (spool, recovery) = Spool::open(c, metrics.clone()).unwrap();
        (spool, recovery, metrics)
    }

    fn ids(records: &[Spooled]) -> Vec<String> {
        records.iter().map(|r| r.record.msg_id.clone()).collect()
    }

    fn names(range: std::ops::Range<u64>) -> Vec<String> {
        range.map(|i| format!("r.b.{i}")).collect()
    }

    fn files(c: &SpoolConfig) -> Vec<String> {
        list_segments(&c.dir).unwrap().into_iter().map(|(seq, _)| segment_name(seq)).collect()
    }

    fn seg_path(c: &SpoolConfig, seq: u64) -> PathBuf {
        c.dir.join(segment_name(seq))
    }

    /// Waits for the writer thread to catch up with `check`.
    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn appended_records_survive_a_reopen_and_replay_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path(), 1 << 20, 1 << 20, FsyncPolicy::Always);
        let (spool, recovery, metrics) = open(&c);
        assert_eq!(recovery, Recovery { segments: 0, ..Recovery::default() });
        for i in 0..10 {
            spool.append(&rec(i)).await.unwrap();
        }
        assert_eq!((spool.len(), spool.bytes()), (10, 10 * frame()));
        let text = metrics.render();
        assert!(text.contains("edgerelay_spool_records 10"), "{text}");
        assert!(text.contains("edgerelay_spool_appends_total 10"), "{text}");
        spool.close().await;
        assert!(matches!(spool.append(&rec(99)).await, Err(SpoolError::Closed)));

        let (spool, recovery, _) = open(&c);
        assert_eq!(recovery.segments, 1);
        assert_eq!((recovery.records, recovery.events, recovery.bytes), (10, 20, 10 * frame()));
        assert_eq!(recovery.oldest_unix_ms, Some(1_700_000_000_000));
        assert_eq!(recovery.newest_unix_ms, Some(1_700_000_000_009));
        assert_eq!((recovery.torn_bytes, recovery.corrupt_records), (0, 0));
        let first = spool.next_batch(4).await.unwrap();
        assert_eq!(ids(&first), names(0..4));
        assert_eq!(first[0].record, rec(0));
        let rest = spool.next_batch(100).await.unwrap();
        assert_eq!(ids(&rest), names(4..10));
        assert!(spool.next_batch(100).await.unwrap().is_empty());
        // Nothing done: everything is still there after another restart (at least once).
        spool.close().await;
        let (spool, recovery, _) = open(&c);
        assert_eq!(recovery.records, 10);
        assert_eq!(ids(&spool.next_batch(100).await.unwrap()), names(0..10));
    }

    #[tokio::test]
    async fn segments_rotate_and_are_deleted_once_every_record_is_done() {
        let tmp = tempfile::tempdir().unwrap();
        // Three records per segment.
        let c = cfg(tmp.path(), 1 << 20, 3 * frame() + 1, FsyncPolicy::Always);
        let (spool, _, metrics) = open(&c);
        for i in 0..10 {
            spool.append(&rec(i)).await.unwrap();
        }
        assert_eq!(files(&c).len(), 4);
        assert_eq!(std::fs::metadata(seg_path(&c, 1)).unwrap().len(), 3 * frame());
        let all = spool.next_batch(100).await.unwrap();
        assert_eq!(ids(&all), names(0..10));
        assert_eq!(all[3].id, RecordId { segment: 2, offset: 0 });
        assert_eq!(all[4].id, RecordId { segment: 2, offset: frame() });

        // Done out of order within the first two segments.
        for r in [&all[1], &all[0], &all[4], &all[3]] {
            spool.done(r.id);
        }
        spool.done(all[0].id); // twice: no effect
        assert_eq!(spool.len(), 6);
        assert!(seg_path(&c, 1).exists(), "segment 1 still has record 2");
        spool.done(all[2].id);
        eventually("segment 1 deleted", || spool.bytes() == 7 * frame()).await;
        assert!(!seg_path(&c, 1).exists());
        assert!(seg_path(&c, 2).exists());
        for r in &all[5..] {
            spool.done(r.id);
        }
        // The last (active) segment is closed and deleted too; appends go to a fresh one.
        eventually("every replayed segment deleted", || spool.bytes() == 0).await;
        assert_eq!(files(&c), [segment_name(5)]);
        assert!(spool.is_empty());
        let text = metrics.render();
        assert!(text.contains("edgerelay_spool_replayed_total 10"), "{text}");
        assert!(text.contains("edgerelay_spool_bytes 0"), "{text}");
        spool.append(&rec(10)).await.unwrap();
        assert_eq!(ids(&spool.next_batch(10).await.unwrap()), names(10..11));
        assert_eq!(files(&c), [segment_name(5)]);
    }

    #[tokio::test]
    async fn rewind_hands_out_again_what_is_not_done() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path(), 1 << 20, 4 * frame(), FsyncPolicy::Always);
        let (spool, _, _) = open(&c);
        for i in 0..8 {
            spool.append(&rec(i)).await.unwrap();
        }
        let got = spool.next_batch(5).await.unwrap();
        for i in [0, 2, 3] {
            spool.done(got[i].id);
        }
        spool.rewind().await;
        let again = spool.next_batch(100).await.unwrap();
        assert_eq!(ids(&again), ["r.b.1", "r.b.4", "r.b.5", "r.b.6", "r.b.7"]);
    }

    #[tokio::test]
    async fn a_full_spool_refuses_appends_until_replay_frees_a_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path(), 6 * frame(), 2 * frame(), FsyncPolicy::Always);
        let (spool, _, _) = open(&c);
        for i in 0..6 {
            spool.append(&rec(i)).await.unwrap();
        }
        let err = spool.append(&rec(6)).await.unwrap_err();
        assert!(
            matches!(err, SpoolError::Full { bytes, max_bytes } if bytes == 6 * frame() && max_bytes == 6 * frame()),
            "{err}"
        );
        assert!(err.retryable());
        assert_eq!(spool.len(), 6, "a refused append stores nothing");
        let first = spool.next_batch(2).await.unwrap();
        first.iter().for_each(|r| spool.done(r.id));
        eventually("a segment freed", || spool.bytes() == 4 * frame()).await;
        spool.append(&rec(6)).await.unwrap();
        // A record that can never fit is not "full" but too large.
        let huge = SpoolRecord { batch: vec![0; 7 * frame() as usize].into(), ..rec(7) };
        assert!(matches!(spool.append(&huge).await, Err(SpoolError::TooLarge { .. })));
        assert!(matches!(spool.append(&SpoolRecord::default()).await, Err(SpoolError::Empty)));
    }

    #[tokio::test]
    async fn a_torn_tail_is_truncated_on_open_and_appends_continue_after_it() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path(), 1 << 20, 1 << 20, FsyncPolicy::Always);
        let (spool, _, _) = open(&c);
        for i in 0..3 {
            spool.append(&rec(i)).await.unwrap();
        }
        spool.close().await;
        // A crash in the middle of writing record 3.
        let path = seg_path(&c, 1);
        let intact = std::fs::read(&path).unwrap();
        let mut torn = intact.clone();
        torn.extend_from_slice(&segment::encode(&rec(3)).unwrap()[..20]);
        std::fs::write(&path, &torn).unwrap();

        let (spool, recovery, metrics) = open(&c);
        assert_eq!((recovery.records, recovery.torn_bytes), (3, 20));
        assert_eq!(
            recovery.damage,
            [Damage {
                file: segment_name(1),
                offset: 3 * frame(),
                kind: DamageKind::Torn {
                    bytes: 20,
                    why: segment::Torn::ShortPayload { len: frame() as u32 - 8, have: 12 },
                    truncated: true
                },
            }]
        );
        assert!(recovery.to_string().contains("torn tail of 20 bytes"), "{recovery}");
        assert!(metrics.render().contains("edgerelay_spool_torn_bytes_total 20"));
        assert_eq!(std::fs::read(&path).unwrap(), intact, "cut back to the intact records");
        spool.append(&rec(3)).await.unwrap();
        spool.close().await;
        let (spool, recovery, _) = open(&c);
        assert_eq!((recovery.records, recovery.torn_bytes), (4, 0));
        assert_eq!(ids(&spool.next_batch(10).await.unwrap()), names(0..4));
    }

    #[tokio::test]
    async fn a_bit_flipped_record_is_skipped_counted_and_its_segment_still_retires() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path(), 1 << 20, 3 * frame(), FsyncPolicy::Always);
        let (spool, _, _) = open(&c);
        for i in 0..6 {
            spool.append(&rec(i)).await.unwrap();
        }
        spool.close().await;
        let path = seg_path(&c, 1);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(frame() + 20) as usize] ^= 0x08;
        std::fs::write(&path, &bytes).unwrap();
        // And a torn tail in the middle segment-to-be: a non-last segment keeps it.
        let (spool, recovery, metrics) = open(&c);
        assert_eq!((recovery.records, recovery.corrupt_records), (5, 1));
        assert!(matches!(
            &recovery.damage[0],
            Damage { offset, kind: DamageKind::Corrupt { why: segment::Corruption::Checksum { .. }, .. }, .. }
                if *offset == frame()
        ));
        assert!(metrics.render().contains("edgerelay_spool_corrupt_records_total 1"));
        let all = spool.next_batch(10).await.unwrap();
        assert_eq!(ids(&all), ["r.b.0", "r.b.2", "r.b.3", "r.b.4", "r.b.5"]);
        spool.done(all[0].id);
        spool.done(all[1].id);
        eventually("the damaged segment deleted", || !path.exists()).await;
    }

    #[tokio::test]
    async fn a_torn_tail_of_an_older_segment_is_reported_and_left_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path(), 1 << 20, 2 * frame(), FsyncPolicy::Always);
        let (spool, _, _) = open(&c);
        for i in 0..4 {
            spool.append(&rec(i)).await.unwrap();
        }
        spool.close().await;
        let first = seg_path(&c, 1);
        let mut bytes = std::fs::read(&first).unwrap();
        bytes.truncate(bytes.len() - 5);
        std::fs::write(&first, &bytes).unwrap();
        let (spool, recovery, _) = open(&c);
        assert_eq!((recovery.records, recovery.torn_bytes), (3, frame() - 5));
        assert!(matches!(recovery.damage[0].kind, DamageKind::Torn { truncated: false, .. }));
        assert_eq!(std::fs::metadata(&first).unwrap().len(), 2 * frame() - 5);
        assert_eq!(ids(&spool.next_batch(10).await.unwrap()), ["r.b.0", "r.b.2", "r.b.3"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_from_many_tasks_are_all_stored_once() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path(), 1 << 20, 16 * frame(), FsyncPolicy::Always);
        let (spool, _, _) = open(&c);
        let spool = Arc::new(spool);
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                let spool = spool.clone();
                tokio::spawn(async move {
                    for i in 0..20 {
                        spool.append(&rec(t * 1000 + i)).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(spool.len(), 640);
        spool.close().await;
        let (spool, recovery, _) = open(&c);
        assert_eq!((recovery.records, recovery.corrupt_records, recovery.torn_bytes), (640, 0, 0));
        let mut seen = HashSet::new();
        loop {
            let got = spool.next_batch(100).await.unwrap();
            if got.is_empty() {
                break;
            }
            for r in got {
                assert!(seen.insert(r.record.msg_id.clone()), "{} twice", r.record.msg_id);
            }
        }
        assert_eq!(seen.len(), 640);
        // Group commits rotate like single appends: no segment grew past its size.
        for (_, path) in list_segments(&c.dir).unwrap() {
            assert!(std::fs::metadata(&path).unwrap().len() <= c.segment_bytes);
        }
    }

    #[tokio::test]
    async fn every_fsync_policy_stores_and_recovers_records() {
        for fsync in [FsyncPolicy::Always, FsyncPolicy::Interval, FsyncPolicy::Never] {
            let tmp = tempfile::tempdir().unwrap();
            let c = cfg(tmp.path(), 1 << 20, 4 * frame(), fsync);
            let (spool, _, _) = open(&c);
            for i in 0..10 {
                spool.append(&rec(i)).await.unwrap();
            }
            if fsync == FsyncPolicy::Interval {
                // The writer's timer syncs without another append.
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            spool.close().await;
            let (spool, recovery, _) = open(&c);
            assert_eq!(recovery.records, 10, "{fsync:?}");
            assert_eq!(ids(&spool.next_batch(100).await.unwrap()), names(0..10), "{fsync:?}");
        }
    }

    #[tokio::test]
    async fn an_idle_replayer_wakes_up_on_append() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path(), 1 << 20, 1 << 20, FsyncPolicy::Never);
        let (spool, _, _) = open(&c);
        let spool = Arc::new(spool);
        assert!(spool.next_batch(10).await.unwrap().is_empty());
        let replayer = {
            let spool = spool.clone();
            tokio::spawn(async move {
                loop {
                    let got = spool.next_batch(10).await.unwrap();
                    if !got.is_empty() {
                        return ids(&got);
                    }
                    spool.appended().await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        spool.append(&rec(1)).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), replayer).await.unwrap().unwrap();
        assert_eq!(got, ["r.b.1"]);
    }

    #[tokio::test]
    async fn one_relay_per_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path(), 1 << 20, 1 << 20, FsyncPolicy::Always);
        let (spool, _, _) = open(&c);
        let err = Spool::open(&c, Arc::new(Metrics::new())).unwrap_err();
        assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
        spool.close().await;
        let (_spool, _, _) = open(&c);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&c.dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
