//! Record framing of a spool segment file, sans-IO: bytes in, records out.
//!
//! A segment is a sequence of records, each
//!
//! ```text
//! [u32 LE payload length][u32 LE CRC-32C of the payload][payload: one protobuf SpoolRecord]
//! ```
//!
//! Reading a segment back ([`Decoder`]) tells three cases apart:
//!
//! - [`Item::Record`]: the checksum matches and the payload decodes.
//! - [`Item::Corrupt`]: the length is plausible and the whole payload is there, but the checksum
//!   does not match or the payload is not a `SpoolRecord` (a flipped bit on disk). The record is
//!   skipped and reading goes on at the next frame. A flipped bit *in the length field* usually
//!   lands on garbage next, which then reads as torn: the rest of that segment is lost, and
//!   reported.
//! - [`Item::Torn`]: the header or the payload is cut short (a crash in the middle of a write),
//!   or the length is zero or above [`MAX_RECORD_BYTES`] (a zero-filled or garbled tail). Nothing
//!   after it can be trusted; it is always the decoder's last item.
//!
//! The length is checked against [`MAX_RECORD_BYTES`] before anything is allocated, and nothing
//! here panics on any input (fuzzed by `fuzz/fuzz_targets/spool_segment.rs`).

use std::fmt;

use prost::Message;
use serde::Serialize;

use crate::proto::SpoolRecord;

/// Bytes of a record's header: length and checksum.
pub const HEADER_BYTES: usize = 8;

/// Largest payload of one record, bytes. A record holds one batch (at most `batch.max_bytes`,
/// itself at most 8 MiB) plus its Msg-Id and subject; a length above this is garbage.
pub const MAX_RECORD_BYTES: u32 = 16 << 20;

// The largest batch (`batch.max_bytes` <= 8 MiB) leaves room for the Msg-Id and subject.
const _: () = assert!(MAX_RECORD_BYTES > (8 << 20) + (64 << 10));

/// A record that cannot be framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The record encodes to nothing (every field empty): a zero length marks a torn tail.
    #[error("empty spool record")]
    Empty,
    /// The encoded record is larger than [`MAX_RECORD_BYTES`].
    #[error("spool record of {bytes} bytes is larger than the limit of {MAX_RECORD_BYTES}")]
    TooLarge { bytes: usize },
}

/// One step of reading a segment.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// An intact record at `offset`, whose payload is `len` bytes (the frame is
    /// `HEADER_BYTES + len`).
    Record { offset: u64, len: u32, record: SpoolRecord },
    /// A damaged record at `offset` with a payload of `len` bytes, skipped.
    Corrupt { offset: u64, len: u32, why: Corruption },
    /// The segment is unusable from `offset` on; the decoder ends here.
    Torn { offset: u64, why: Torn },
}

/// Why a complete frame was not a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// The payload's CRC-32C is not the one in the header.
    Checksum { expected: u32, actual: u32 },
    /// The checksum matches but the payload is not a `SpoolRecord`.
    Decode(String),
}

/// Why the rest of a segment is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Torn {
    /// Fewer than [`HEADER_BYTES`] bytes left.
    ShortHeader { have: usize },
    /// The header announces `len` bytes of payload, fewer are there.
    ShortPayload { len: u32, have: usize },
    /// A length of zero or above [`MAX_RECORD_BYTES`]: not a header the spool wrote.
    BadLength { len: u32 },
}

/// A checked record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Payload length, bytes: 1..=[`MAX_RECORD_BYTES`].
    pub len: u32,
    /// CRC-32C of the payload.
    pub crc: u32,
}

/// What a segment holds, from one pass over its bytes ([`scan`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scan {
    /// Intact records.
    pub records: u64,
    /// Events in the intact records.
    pub events: u64,
    /// Damaged records: offset, payload length, why.
    pub corrupt: Vec<(u64, u32, Corruption)>,
    /// Where the segment stops being usable, and why; `None` when it ends on a frame boundary.
    pub torn: Option<(u64, Torn)>,
    /// End of the usable part: the torn offset, or the length of the bytes.
    pub end: u64,
    /// Earliest and latest `spooled_unix_ms` of the intact records.
    pub oldest_unix_ms: Option<u64>,
    pub newest_unix_ms: Option<u64>,
}

/// What one segment file holds, or the sum over several: what `spool inspect` shows per file
/// and in all, and what start-up recovery found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Bytes of the file(s).
    pub bytes: u64,
    /// Intact records (batches) and their events.
    pub records: u64,
    pub events: u64,
    /// Damaged records (skipped by replay).
    pub corrupt: u64,
    /// Bytes from the torn offset to the end of the file (0 when none).
    pub torn_bytes: u64,
    /// Earliest and latest spool time of the intact records, unix milliseconds.
    pub oldest_unix_ms: Option<u64>,
    pub newest_unix_ms: Option<u64>,
}

/// Iterates over the items of a segment held in memory; see the module docs.
#[derive(Clone, Debug)]
pub struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
    base: u64,
    done: bool,
}

/// Appends the frame of `record` to `out`.
pub fn encode_into(record: &SpoolRecord, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let len = record.encoded_len();
    if len == 0 {
        return Err(EncodeError::Empty);
    }
    if len > MAX_RECORD_BYTES as usize {
        return Err(EncodeError::TooLarge { bytes: len });
    }
    out.reserve(HEADER_BYTES + len);
    let start = out.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    // Encoding into a Vec cannot run out of room.
    let _ = record.encode(out);
    let crc = crc32c::crc32c(&out[start + HEADER_BYTES..]);
    out[start + 4..start + HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The frame of `record`.
pub fn encode(record: &SpoolRecord) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(record, &mut out)?;
    Ok(out)
}

/// Bytes the frame of `record` takes in a segment.
pub fn frame_len(record: &SpoolRecord) -> u64 {
    (HEADER_BYTES + record.encoded_len()) as u64
}

/// Reads a whole segment, calling `on_record` with each intact record and its offset.
pub fn scan(buf: &[u8], mut on_record: impl FnMut(u64, &SpoolRecord)) -> Scan {
    let mut out = Scan { end: buf.len() as u64, ..Scan::default() };
    for item in Decoder::new(buf, 0) {
        match item {
            Item::Record { offset, record, .. } => {
                out.records += 1;
                out.events += u64::from(record.events);
                let at = record.spooled_unix_ms;
                out.oldest_unix_ms = Some(out.oldest_unix_ms.map_or(at, |o| o.min(at)));
                out.newest_unix_ms = Some(out.newest_unix_ms.map_or(at, |n| n.max(at)));
                on_record(offset, &record);
            }
            Item::Corrupt { offset, len, why } => out.corrupt.push((offset, len, why)),
            Item::Torn { offset, why } => {
                out.torn = Some((offset, why));
                out.end = offset;
            }
        }
    }
    out
}

impl Header {
    /// Reads and checks a header; an impossible length means a torn (or garbled) tail.
    pub fn parse(bytes: [u8; HEADER_BYTES]) -> Result<Self, Torn> {
        let [l0, l1, l2, l3, c0, c1, c2, c3] = bytes;
        let len = u32::from_le_bytes([l0, l1, l2, l3]);
        let crc = u32::from_le_bytes([c0, c1, c2, c3]);
        if len == 0 || len > MAX_RECORD_BYTES {
            return Err(Torn::BadLength { len });
        }
        Ok(Self { len, crc })
    }

    /// Checks `payload` (exactly `self.len` bytes) against the checksum and decodes it.
    pub fn record(&self, payload: &[u8]) -> Result<SpoolRecord, Corruption> {
        let actual = crc32c::crc32c(payload);
        if actual != self.crc {
            return Err(Corruption::Checksum { expected: self.crc, actual });
        }
        SpoolRecord::decode(payload).map_err(|e| Corruption::Decode(e.to_string()))
    }
}

impl Scan {
    /// The tally of a segment file of `file_bytes` bytes that scanned as this.
    pub fn tally(&self, file_bytes: u64) -> Tally {
        Tally {
            bytes: file_bytes,
            records: self.records,
            events: self.events,
            corrupt: self.corrupt.len() as u64,
            torn_bytes: file_bytes - self.end,
            oldest_unix_ms: self.oldest_unix_ms,
            newest_unix_ms: self.newest_unix_ms,
        }
    }
}

impl Tally {
    /// Adds `other` (another segment's tally) to this sum.
    pub fn add(&mut self, other: &Tally) {
        self.bytes += other.bytes;
        self.records += other.records;
        self.events += other.events;
        self.corrupt += other.corrupt;
        self.torn_bytes += other.torn_bytes;
        self.oldest_unix_ms = match (self.oldest_unix_ms, other.oldest_unix_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.newest_unix_ms = self.newest_unix_ms.max(other.newest_unix_ms);
    }
}

impl<'a> Decoder<'a> {
    /// Reads `buf`, a whole segment (or its part from `base` on).
    pub fn new(buf: &'a [u8], base: u64) -> Self {
        Self { buf, pos: 0, base, done: false }
    }

    fn torn(&mut self, why: Torn) -> Option<Item> {
        self.done = true;
        Some(Item::Torn { offset: self.base + self.pos as u64, why })
    }
}

impl Item {
    /// Where the next frame starts, for a record or a corrupt frame; `None` after a torn tail.
    pub fn next_offset(&self) -> Option<u64> {
        match self {
            Self::Record { offset, len, .. } | Self::Corrupt { offset, len, .. } => {
                Some(offset + HEADER_BYTES as u64 + u64::from(*len))
            }
            Self::Torn { .. } => None,
        }
    }
}

impl Iterator for Decoder<'_> {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        if self.done {
            return None;
        }
        let rest = &self.buf[self.pos..];
        if rest.is_empty() {
            self.done = true;
            return None;
        }
        let Some((head, rest)) = rest.split_first_chunk::<HEADER_BYTES>() else {
            return self.torn(Torn::ShortHeader { have: rest.len() });
        };
        let header = match Header::parse(*head) {
            Ok(h) => h,
            Err(why) => return self.torn(why),
        };
        let len = header.len as usize;
        let Some(payload) = rest.get(..len) else {
            return self.torn(Torn::ShortPayload { len: header.len, have: rest.len() });
        };
        let offset = self.base + self.pos as u64;
        self.pos += HEADER_BYTES + len;
        Some(match header.record(payload) {
            Ok(record) => Item::Record { offset, len: header.len, record },
            Err(why) => Item::Corrupt { offset, len: header.len, why },
        })
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Checksum { expected, actual } => {
                write!(f, "checksum mismatch (header {expected:#010x}, payload {actual:#010x})")
            }
            Self::Decode(e) => write!(f, "not a SpoolRecord: {e}"),
        }
    }
}

impl fmt::Display for Torn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ShortHeader { have } => {
                write!(f, "short header ({have} of {HEADER_BYTES} bytes)")
            }
            Self::ShortPayload { len, have } => {
                write!(f, "short payload ({have} of {len} bytes)")
            }
            Self::BadLength { len } => write!(f, "impossible record length {len}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64) -> SpoolRecord {
        SpoolRecord {
            msg_id: format!("relay.boot.{i}"),
            subject: "edge.test".into(),
            batch: vec![i as u8; 10 + i as usize].into(),
            events: 1 + i as u32,
            spooled_unix_ms: 1_700_000_000_000 + i,
        }
    }

    fn segment(n: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        for i in 0..n {
            encode_into(&record(i), &mut buf).unwrap();
        }
        buf
    }

    fn records(items: &[Item]) -> Vec<SpoolRecord> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Record { record, .. } => Some(record.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn records_roundtrip_with_their_offsets() {
        let buf = segment(5);
        let items: Vec<Item> = Decoder::new(&buf, 0).collect();
        assert_eq!(records(&items), (0..5).map(record).collect::<Vec<_>>());
        let mut next = 0;
        for item in &items {
            let Item::Record { offset, record, .. } = item else { panic!("{item:?}") };
            assert_eq!(*offset, next);
            next = item.next_offset().unwrap();
            assert_eq!(next - offset, frame_len(record));
        }
        assert_eq!(next, buf.len() as u64);
        // The base shifts every offset.
        let first = frame_len(&record(0));
        let Some(Item::Record { offset, .. }) = Decoder::new(&buf[first as usize..], first).next()
        else {
            panic!()
        };
        assert_eq!(offset, first);
        assert_eq!(Decoder::new(&[], 0).next(), None);
    }

    #[test]
    fn a_flipped_bit_is_corrupt_and_the_next_record_still_reads() {
        let buf = segment(3);
        let second = frame_len(&record(0)) as usize;
        let payload_start = second + HEADER_BYTES;
        let end = second + frame_len(&record(1)) as usize;
        // Every bit of the second record's checksum and payload.
        for byte in second + 4..end {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                let items: Vec<Item> = Decoder::new(&bad, 0).collect();
                assert_eq!(items.len(), 3, "byte {byte} bit {bit}: {items:?}");
                assert!(
                    matches!(&items[1], Item::Corrupt { offset, why: Corruption::Checksum { .. }, .. }
                        if *offset == second as u64),
                    "byte {byte} bit {bit}: {:?}",
                    items[1]
                );
                assert_eq!(records(&items), vec![record(0), record(2)], "byte {byte}");
            }
        }
        assert!(payload_start < end);
    }

    #[test]
    fn a_checksummed_payload_that_is_not_a_record_is_corrupt() {
        let payload = [0xff_u8; 12];
        let mut buf = Vec::new();
        buf.extend_from_slice(&12u32.to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        buf.extend_from_slice(&payload);
        encode_into(&record(7), &mut buf).unwrap();
        let items: Vec<Item> = Decoder::new(&buf, 0).collect();
        assert!(matches!(&items[0], Item::Corrupt { why: Corruption::Decode(_), len: 12, .. }));
        assert_eq!(records(&items), vec![record(7)]);
    }

    #[test]
    fn a_cut_at_every_byte_of_the_last_record_is_torn_after_the_intact_ones() {
        let buf = segment(4);
        let last = buf.len() - frame_len(&record(3)) as usize;
        for cut in last + 1..buf.len() {
            let items: Vec<Item> = Decoder::new(&buf[..cut], 0).collect();
            assert_eq!(records(&items), (0..3).map(record).collect::<Vec<_>>(), "cut {cut}");
            let Some(Item::Torn { offset, why }) = items.last() else { panic!("cut {cut}") };
            assert_eq!(*offset, last as u64, "cut {cut}");
            if cut - last < HEADER_BYTES {
                assert_eq!(*why, Torn::ShortHeader { have: cut - last });
            } else {
                assert!(matches!(why, Torn::ShortPayload { .. }), "cut {cut}: {why}");
            }
            assert_eq!(items.len(), 4);
        }
        // Cut exactly at the boundary: nothing torn.
        let items: Vec<Item> = Decoder::new(&buf[..last], 0).collect();
        assert_eq!(items.len(), 3);
    }

    #[test]
    fn an_absurd_or_zero_length_is_torn_and_ends_the_segment() {
        for len in [0, MAX_RECORD_BYTES + 1, u32::MAX] {
            let mut buf = segment(2);
            let at = buf.len();
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&[0; 4]);
            buf.extend_from_slice(&segment(2));
            let items: Vec<Item> = Decoder::new(&buf, 0).collect();
            assert_eq!(
                items.last(),
                Some(&Item::Torn { offset: at as u64, why: Torn::BadLength { len } })
            );
            assert_eq!(records(&items).len(), 2, "nothing after a bad length is read");
        }
        // A zero-filled tail (preallocated blocks after a crash) is torn at its start.
        let mut buf = segment(1);
        let at = buf.len() as u64;
        buf.resize(buf.len() + 4096, 0);
        let items: Vec<Item> = Decoder::new(&buf, 0).collect();
        assert_eq!(items[1], Item::Torn { offset: at, why: Torn::BadLength { len: 0 } });
    }

    #[test]
    fn a_scan_sums_up_intact_records_damage_and_the_usable_end() {
        let mut buf = segment(4);
        let second = frame_len(&record(0)) as usize;
        buf[second + HEADER_BYTES] ^= 0x40;
        let usable = buf.len() as u64;
        buf.extend_from_slice(&[9, 0, 0]);
        let mut seen = Vec::new();
        let scan = scan(&buf, |offset, r| seen.push((offset, r.msg_id.clone())));
        assert_eq!(scan.records, 3);
        assert_eq!(scan.events, 1 + 3 + 4);
        assert_eq!(scan.corrupt.len(), 1);
        assert_eq!(scan.corrupt[0].0, second as u64);
        assert_eq!(scan.torn, Some((usable, Torn::ShortHeader { have: 3 })));
        assert_eq!(scan.end, usable);
        assert_eq!(scan.oldest_unix_ms, Some(1_700_000_000_000));
        assert_eq!(scan.newest_unix_ms, Some(1_700_000_000_003));
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0], (0, "relay.boot.0".to_string()));
    }

    #[test]
    fn empty_and_oversized_records_are_not_framed() {
        assert_eq!(encode(&SpoolRecord::default()), Err(EncodeError::Empty));
        let big = SpoolRecord { batch: vec![0; MAX_RECORD_BYTES as usize].into(), ..record(1) };
        assert!(matches!(encode(&big), Err(EncodeError::TooLarge { .. })));
        let mut buf = vec![1, 2, 3];
        encode_into(&record(1), &mut buf).unwrap();
        assert_eq!(&buf[..3], &[1, 2, 3], "appends, keeps what was there");
    }
}
