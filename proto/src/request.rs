//! A `PublishRequest` at the level of its protobuf fields, for the native protocol's
//! token-first rule: the relay finds a frame's token and counts its events without decoding
//! (or allocating) a single `Event`, and the client writes the token before the events.
//!
//! Protobuf allows a message's fields in any order, but prost writes them in field-number
//! order, so a `PublishRequest` it encodes has its events (field 1) before its token (field 2).
//! [`encode_token_first`] writes the token field first; every protobuf decoder reads the same
//! message either way, so an old relay reads it too. On the relay's side:
//! - [`scan`] reads a complete frame's fields: its token (the last `token` field, as protobuf
//!   says) and its number of `events` fields, refusing more than a limit as soon as the count
//!   passes it;
//! - [`token_in_head`] looks for the token in the first bytes of a frame that is not all there
//!   yet (a stream's first frame over the pre-auth limit).
//!
//! Both are total over arbitrary bytes: they never panic and never read past what they are
//! given.

use bytes::BytesMut;
use prost::encoding::{self, WireType};
use prost::Message;

use crate::PublishRequest;

/// Protobuf field number of `PublishRequest.events`.
const EVENTS: u32 = 1;
/// Protobuf field number of `PublishRequest.token`.
const TOKEN: u32 = 2;

/// What [`scan`] found in a complete frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scan<'a> {
    /// The token; `None` when the frame carries none or an empty one.
    pub token: Option<&'a str>,
    /// Number of `events` fields.
    pub events: usize,
}

/// Why [`scan`] refused a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    /// More `events` fields than the limit (counted up to the first one over it).
    #[error("more than {max} events in one request")]
    TooManyEvents { max: usize },
    /// Not a well-formed protobuf message of this shape.
    #[error("malformed PublishRequest: {0}")]
    Malformed(&'static str),
}

/// One field of a message: its number and, for length-delimited fields, its bytes.
struct Field<'a> {
    number: u32,
    wire_type: u64,
    bytes: &'a [u8],
}

/// Reads the token and counts the events of a complete `PublishRequest` frame, refusing more
/// than `max_events` events before looking at the rest.
pub fn scan(frame: &[u8], max_events: usize) -> Result<Scan<'_>, ScanError> {
    let mut rest = frame;
    let mut scan = Scan { token: None, events: 0 };
    while !rest.is_empty() {
        let field = next_field(&mut rest)?.ok_or(ScanError::Malformed("truncated field"))?;
        let length_delimited = field.wire_type == WireType::LengthDelimited as u64;
        match field.number {
            EVENTS if !length_delimited => return Err(ScanError::Malformed("events: wire type")),
            TOKEN if !length_delimited => return Err(ScanError::Malformed("token: wire type")),
            EVENTS => {
                scan.events += 1;
                if scan.events > max_events {
                    return Err(ScanError::TooManyEvents { max: max_events });
                }
            }
            TOKEN => {
                let token = std::str::from_utf8(field.bytes)
                    .map_err(|_| ScanError::Malformed("token: not UTF-8"))?;
                scan.token = (!token.is_empty()).then_some(token);
            }
            _ => {}
        }
    }
    Ok(scan)
}

/// The token of a frame of which only `head`, its first bytes, is at hand: the last non-empty
/// `token` field that lies wholly in `head`. `None` if there is none, or if `head` is
/// malformed before one.
pub fn token_in_head(head: &[u8]) -> Option<&str> {
    let mut rest = head;
    let mut token = None;
    while let Ok(Some(field)) = next_field(&mut rest) {
        if field.number == TOKEN && field.wire_type == WireType::LengthDelimited as u64 {
            match std::str::from_utf8(field.bytes) {
                Ok(t) if !t.is_empty() => token = Some(t),
                Ok(_) => token = None,
                Err(_) => return None,
            }
        }
    }
    token
}

/// Appends `req` as one frame (length prefix included) with its token field before its
/// events: the same message as prost's encoding, in the order a relay reads best.
pub fn encode_token_first(req: &PublishRequest, out: &mut BytesMut) {
    let token_len =
        if req.token.is_empty() { 0 } else { encoding::string::encoded_len(TOKEN, &req.token) };
    let len = token_len + encoding::message::encoded_len_repeated(EVENTS, &req.events);
    out.reserve(len + encoding::encoded_len_varint(len as u64));
    encoding::encode_varint(len as u64, out);
    if !req.token.is_empty() {
        encoding::string::encode(TOKEN, &req.token, out);
    }
    for event in &req.events {
        encoding::message::encode(EVENTS, event, out);
    }
    debug_assert_eq!(len, req.encoded_len());
}

/// The next field off the front of `rest`: `Ok(None)` when `rest` ends inside it.
fn next_field<'a>(rest: &mut &'a [u8]) -> Result<Option<Field<'a>>, ScanError> {
    let Some(key) = varint(rest)? else { return Ok(None) };
    let number = u32::try_from(key >> 3).map_err(|_| ScanError::Malformed("field number"))?;
    if number == 0 {
        return Err(ScanError::Malformed("field number 0"));
    }
    let wire_type = key & 7;
    let skip = match wire_type {
        0 => return Ok(varint(rest)?.map(|_| Field { number, wire_type, bytes: &[] })),
        1 => 8,
        2 => {
            let Some(len) = varint(rest)? else { return Ok(None) };
            usize::try_from(len).map_err(|_| ScanError::Malformed("field length"))?
        }
        5 => 4,
        // Groups (3, 4) are deprecated and not part of this message; 6 and 7 do not exist.
        _ => return Err(ScanError::Malformed("wire type")),
    };
    if rest.len() < skip {
        return Ok(None);
    }
    let (bytes, after) = rest.split_at(skip);
    *rest = after;
    Ok(Some(Field { number, wire_type, bytes }))
}

/// A varint off the front of `rest`: `Ok(None)` when `rest` ends inside it.
fn varint(rest: &mut &[u8]) -> Result<Option<u64>, ScanError> {
    let mut value = 0u64;
    for (i, &b) in rest.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            *rest = &rest[i + 1..];
            return Ok(Some(value));
        }
    }
    if rest.len() >= 10 {
        Err(ScanError::Malformed("varint longer than 10 bytes"))
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::FrameDecoder;
    use crate::Event;

    fn request(events: usize, token: &str) -> PublishRequest {
        let events = (0..events)
            .map(|i| Event {
                subject: format!("edge.{i}"),
                payload: vec![1; i].into(),
                ..Default::default()
            })
            .collect();
        PublishRequest { events, token: token.into() }
    }

    /// The body of the frame `encode_token_first` writes.
    fn token_first(req: &PublishRequest) -> bytes::Bytes {
        let mut out = BytesMut::new();
        encode_token_first(req, &mut out);
        FrameDecoder::new(1 << 20).decode(&mut out).unwrap().unwrap()
    }

    #[test]
    fn token_first_encoding_decodes_as_the_same_message_and_scans_alike() {
        for (events, token) in
            [(0, ""), (0, "t"), (3, ""), (3, "secret"), (200, "x".repeat(300).as_str())]
        {
            let req = request(events, token);
            let body = token_first(&req);
            assert_eq!(PublishRequest::decode(body.clone()).unwrap(), req);
            let prost_order = req.encode_to_vec();
            let want = Scan { token: (!token.is_empty()).then_some(token), events };
            assert_eq!(scan(&body, 1000), Ok(want));
            assert_eq!(scan(&prost_order, 1000), Ok(want));
        }
    }

    #[test]
    fn the_token_is_in_the_head_of_a_token_first_frame_only() {
        let req = request(50, "secret");
        let first = token_first(&req);
        assert_eq!(token_in_head(&first[..10]), Some("secret"));
        // Cut inside the token: not found yet.
        assert_eq!(token_in_head(&first[..5]), None);
        let prost_order = req.encode_to_vec();
        assert_eq!(token_in_head(&prost_order[..prost_order.len() - 10]), None);
        assert_eq!(token_in_head(&prost_order), Some("secret"));
    }

    #[test]
    fn too_many_events_are_refused_on_counting() {
        let body = request(11, "t").encode_to_vec();
        assert_eq!(scan(&body, 10), Err(ScanError::TooManyEvents { max: 10 }));
        assert_eq!(scan(&body, 11).map(|s| s.events), Ok(11));
        // A million empty events: two bytes each, counted and refused at the limit.
        let empty = [0x0a, 0x00].repeat(1_000_001);
        assert_eq!(scan(&empty, 1000), Err(ScanError::TooManyEvents { max: 1000 }));
    }

    #[test]
    fn malformed_frames_are_refused_and_unknown_fields_skipped() {
        let cases: &[(&[u8], Result<usize, &str>)] = &[
            (&[], Ok(0)),
            // Unknown fields of every wire type are skipped.
            (&[0x18, 0x05, 0x21, 0, 0, 0, 0, 0, 0, 0, 0, 0x2d, 0, 0, 0, 0, 0x0a, 0], Ok(1)),
            (&[0x0a], Err("truncated field")),
            (&[0x0a, 0x05, 1], Err("truncated field")),
            (&[0x08, 0x01], Err("events: wire type")),
            (&[0x10, 0x01], Err("token: wire type")),
            (&[0x12, 0x01, 0xff], Err("token: not UTF-8")),
            (&[0x00, 0x00], Err("field number 0")),
            (&[0x0b], Err("wire type")),
            (
                &[0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                Err("varint longer than 10 bytes"),
            ),
        ];
        for (bytes, want) in cases {
            let got = scan(bytes, 10).map(|s| s.events).map_err(|e| match e {
                ScanError::Malformed(m) => m,
                other => panic!("{other:?}"),
            });
            assert_eq!(got, *want, "{bytes:?}");
            assert_eq!(token_in_head(bytes), None);
        }
    }
}
