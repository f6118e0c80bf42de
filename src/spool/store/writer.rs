//! The spool's writer thread and the reading of segment files.
//!
//! [`Writer`] owns the directory's files: it takes every append waiting on its channel, writes
//! them in one go and fsyncs once per the policy (group commit), rotates and deletes segments,
//! then answers each caller. [`read_records`] reads records for replay along a [`ReadPlan`] on
//! a blocking thread. Both keep the shared counts in [`Shared`](super::Shared) up to date.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::{Cursor, RecordId, Segment, Shared, Spooled};
use crate::spool::config::FsyncPolicy;
use crate::spool::segment::{self, Header, HEADER_BYTES};
use crate::spool::{segment_name, SpoolError};

/// Appends written together before one fsync, at most.
const MAX_GROUP: usize = 1024;
/// A [`Spool::next_batch`](super::Spool::next_batch) stops adding records past this many
/// payload bytes.
const REPLAY_BUDGET_BYTES: u64 = 8 << 20;

pub(super) enum Command {
    Append(Pending),
    /// Delete this segment if every record in it is done (closing it first if it is active).
    Retire(u64),
    Close(oneshot::Sender<()>),
}

/// An append on its way to the disk.
pub(super) struct Pending {
    pub(super) frame: Vec<u8>,
    pub(super) reply: oneshot::Sender<Result<(), SpoolError>>,
    /// One of [`MAX_PENDING_APPENDS`](super::MAX_PENDING_APPENDS), released once answered.
    pub(super) _permit: OwnedSemaphorePermit,
}

pub(super) struct Writer {
    pub(super) dir: PathBuf,
    pub(super) shared: Arc<Shared>,
    pub(super) file: File,
    pub(super) active: u64,
    pub(super) size: u64,
    pub(super) segment_bytes: u64,
    pub(super) fsync: FsyncPolicy,
    pub(super) interval: Duration,
    /// Written and not yet fsynced.
    pub(super) dirty: bool,
    pub(super) last_sync: Instant,
    /// Held for the writer's lifetime: the directory's flock.
    pub(super) _lock: File,
}

/// One segment's part of a replay read.
pub(super) struct ReadPlan {
    pub(super) segment: u64,
    pub(super) start: u64,
    pub(super) end: u64,
    /// Not the active segment: the cursor may move past its end.
    pub(super) sealed: bool,
    pub(super) skip: BTreeSet<u64>,
}

pub(super) struct ReadResult {
    pub(super) records: Vec<Spooled>,
    pub(super) cursor: Cursor,
    /// Records that were intact at open and no longer are.
    pub(super) newly_corrupt: Vec<RecordId>,
}

impl Writer {
    pub(super) fn run(mut self, rx: mpsc::Receiver<Command>) {
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
pub(super) fn read_records(
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

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
