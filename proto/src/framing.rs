//! Framing of the native QUIC protocol (`edgerelay/1`): each message on a stream is a protobuf
//! varint length followed by that many bytes. Sans-IO: the decoder looks at a buffer the
//! caller fills, and refuses a length over the limit before a byte of the body is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// Longest varint prefix (a u64).
pub const MAX_VARINT_BYTES: usize = 10;

/// Why the byte stream cannot be framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the limit.
    #[error("frame of {len} bytes is longer than the limit of {max}")]
    TooLong { len: u64, max: usize },
    /// The length prefix is not a valid varint (more than 10 bytes).
    #[error("malformed length prefix")]
    BadLength,
}

/// Splits a byte stream into frames of at most `max_frame` bytes.
#[derive(Clone, Copy, Debug)]
pub struct FrameDecoder {
    max_frame: usize,
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame }
    }

    /// Takes the next complete frame off the front of `buf`; `Ok(None)` if more bytes are
    /// needed. An error is final for the stream.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let Some((prefix, len)) = self.header(buf)? else { return Ok(None) };
        if buf.len() < prefix + len {
            return Ok(None);
        }
        buf.advance(prefix);
        Ok(Some(buf.split_to(len).freeze()))
    }

    /// The length prefix at the front of `buf`, once complete: its own length and the length it
    /// announces (checked against the limit). An error is final for the stream.
    pub fn header(&self, buf: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
        let Some((len, prefix)) = read_varint(buf)? else { return Ok(None) };
        if len > self.max_frame as u64 {
            return Err(FrameError::TooLong { len, max: self.max_frame });
        }
        Ok(Some((prefix, len as usize)))
    }

    /// Bytes still needed for the frame at the front of `buf` (to size reads), if known.
    pub fn missing(&self, buf: &[u8]) -> Option<usize> {
        match read_varint(buf) {
            Ok(Some((len, prefix))) if len <= self.max_frame as u64 => {
                Some((prefix + len as usize).saturating_sub(buf.len()))
            }
            _ => None,
        }
    }
}

/// Appends `msg` as one frame.
pub fn encode(msg: &impl Message, out: &mut BytesMut) {
    let len = msg.encoded_len();
    out.reserve(len + MAX_VARINT_BYTES);
    prost::encoding::encode_varint(len as u64, out);
    // Encoding into a buffer with enough room cannot fail.
    let _ = msg.encode(out);
}

/// One message as a frame.
pub fn frame(msg: &impl Message) -> Bytes {
    let mut out = BytesMut::new();
    encode(msg, &mut out);
    out.freeze()
}

/// Writes a raw length prefix (for tests and tools that build frames by hand).
pub fn put_len(len: u64, out: &mut impl BufMut) {
    prost::encoding::encode_varint(len, out);
}

/// `Ok(None)` when the buffer ends inside the varint.
fn read_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, FrameError> {
    let mut value = 0u64;
    for (i, b) in buf.iter().take(MAX_VARINT_BYTES).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= MAX_VARINT_BYTES {
        Err(FrameError::BadLength)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate as proto;

    #[test]
    fn frames_round_trip_and_split_anywhere() {
        let msgs: Vec<proto::PublishRequest> = (0..3)
            .map(|i| proto::PublishRequest {
                events: vec![proto::Event { subject: format!("edge.{i}"), ..Default::default() }],
                token: "t".repeat(i * 100),
            })
            .collect();
        let mut wire = BytesMut::new();
        for m in &msgs {
            encode(m, &mut wire);
        }
        let wire = wire.freeze();
        // Feed the bytes in every possible two-part split.
        for cut in 0..=wire.len() {
            let d = FrameDecoder::new(1024);
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(f) = d.decode(&mut buf).unwrap() {
                got.push(proto::PublishRequest::decode(f).unwrap());
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = d.decode(&mut buf).unwrap() {
                got.push(proto::PublishRequest::decode(f).unwrap());
            }
            assert_eq!(got, msgs, "cut at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn a_long_frame_is_refused_from_its_prefix_alone() {
        let d = FrameDecoder::new(100);
        let mut buf = BytesMut::new();
        put_len(101, &mut buf);
        assert_eq!(d.decode(&mut buf), Err(FrameError::TooLong { len: 101, max: 100 }));
        let mut huge = BytesMut::new();
        put_len(u64::MAX, &mut huge);
        assert!(matches!(d.decode(&mut huge), Err(FrameError::TooLong { .. })));
    }

    #[test]
    fn malformed_and_partial_prefixes() {
        let d = FrameDecoder::new(100);
        let mut bad = BytesMut::from(&[0xff; 11][..]);
        assert_eq!(d.decode(&mut bad), Err(FrameError::BadLength));
        let mut partial = BytesMut::from(&[0x80, 0x80][..]);
        assert_eq!(d.decode(&mut partial), Ok(None));
        let mut empty_frame = BytesMut::from(&[0x00][..]);
        assert_eq!(d.decode(&mut empty_frame), Ok(Some(Bytes::new())));
        let mut waiting = BytesMut::from(&[0x05, 1, 2][..]);
        assert_eq!(d.missing(&waiting), Some(3));
        assert_eq!(d.decode(&mut waiting), Ok(None));
    }
}
