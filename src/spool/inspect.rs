//! `edgerelay spool inspect`: what a spool directory holds, read without changing anything.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::segment::{self, Tally};
use super::{list_segments, segment_name, SpoolError};

/// A spool directory's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Inspection {
    pub dir: PathBuf,
    /// Segment files, oldest first.
    pub segments: Vec<SegmentInfo>,
    /// Sums over the segments.
    #[serde(flatten)]
    pub total: Tally,
    /// What waits, by subject.
    pub subjects: BTreeMap<String, SubjectWaiting>,
}

/// One segment file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SegmentInfo {
    pub file: String,
    #[serde(flatten)]
    pub tally: Tally,
}

/// Records and events waiting for one subject.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SubjectWaiting {
    pub records: u64,
    pub events: u64,
}

/// Reads every segment of `dir`. Takes no lock and writes nothing: safe beside a running
/// relay. Note that records already replayed but in a segment not yet deleted are still
/// counted (the relay keeps "done" in memory).
pub fn inspect(dir: &Path) -> Result<Inspection, SpoolError> {
    let mut out = Inspection { dir: dir.to_owned(), ..Inspection::default() };
    for (seq, path) in list_segments(dir)? {
        let bytes = std::fs::read(&path).map_err(SpoolError::io("read", &path))?;
        let subjects = &mut out.subjects;
        let scan = segment::scan(&bytes, |_, r| {
            let s = subjects.entry(r.subject.clone()).or_default();
            s.records += 1;
            s.events += u64::from(r.events);
        });
        let info = SegmentInfo { file: segment_name(seq), tally: scan.tally(bytes.len() as u64) };
        out.total.add(&info.tally);
        out.segments.push(info);
    }
    Ok(out)
}

impl Inspection {
    /// Renders the report as text with ages relative to `now_unix_ms`.
    pub fn render(&self, now_unix_ms: u64) -> String {
        let mut out = String::new();
        let _ = self.write(&mut out, now_unix_ms);
        out
    }

    fn write(&self, f: &mut impl fmt::Write, now: u64) -> fmt::Result {
        writeln!(f, "spool {}", self.dir.display())?;
        writeln!(
            f,
            "{} segments, {} bytes, {} records waiting ({} events), {} corrupt, {} torn bytes",
            self.segments.len(),
            self.total.bytes,
            self.total.records,
            self.total.events,
            self.total.corrupt,
            self.total.torn_bytes
        )?;
        if let (Some(o), Some(n)) = (self.total.oldest_unix_ms, self.total.newest_unix_ms) {
            writeln!(f, "oldest {}, newest {}", when(o, now), when(n, now))?;
        }
        if self.segments.is_empty() {
            return Ok(());
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<24} {:>12} {:>8} {:>8} {:>7} {:>10}  {:<24}  newest",
            "segment", "bytes", "records", "events", "corrupt", "torn_bytes", "oldest"
        )?;
        for s in &self.segments {
            writeln!(
                f,
                "{:<24} {:>12} {:>8} {:>8} {:>7} {:>10}  {:<24}  {}",
                s.file,
                s.tally.bytes,
                s.tally.records,
                s.tally.events,
                s.tally.corrupt,
                s.tally.torn_bytes,
                s.tally.oldest_unix_ms.map_or("-".into(), utc),
                s.tally.newest_unix_ms.map_or("-".into(), utc),
            )?;
        }
        if !self.subjects.is_empty() {
            writeln!(f)?;
            writeln!(f, "{:<40} {:>8} {:>8}", "subject", "records", "events")?;
            for (subject, w) in &self.subjects {
                writeln!(f, "{subject:<40} {:>8} {:>8}", w.records, w.events)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.write(f, now)
    }
}

/// `2026-11-27T21:15:03.250Z (3m12s ago)`.
fn when(unix_ms: u64, now: u64) -> String {
    let ago = now.saturating_sub(unix_ms) / 1000;
    let age = match ago {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    };
    format!("{} ({age} ago)", utc(unix_ms))
}

/// Unix milliseconds as an RFC 3339 UTC timestamp.
fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(1_795_814_103_250), "2026-11-27T21:15:03.250Z");
        assert_eq!(when(1_000, 193_000), "1970-01-01T00:00:01.000Z (3m12s ago)");
    }

    #[test]
    fn a_missing_directory_is_an_error_and_an_empty_one_is_not() {
        assert!(matches!(
            inspect(Path::new("/nonexistent/spool")),
            Err(SpoolError::Io { op: "read directory", .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let i = inspect(dir.path()).unwrap();
        assert_eq!((i.segments.len(), i.total.records), (0, 0));
        assert!(i.render(0).contains("0 segments"));
    }
}
