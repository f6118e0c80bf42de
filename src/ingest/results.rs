//! A request's answer as protobuf (`PublishResponse`), written straight from its outcomes.
//!
//! Every accepted event's result spells out the stream, the cluster and its batch's
//! `Nats-Msg-Id`, which the events of a request share. Building prost's `Accepted` would make
//! three strings per event, and formatting batch ids one more per batch a request touches; this
//! encoder copies the shared names from [`Names`] into the output instead, with no allocation
//! per event. The bytes are exactly what prost writes for the same message (tested against it),
//! so clients see no difference.

use bytes::BufMut;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;

use super::Outcome;
use crate::error::Refusal;
use crate::event::{put_str, put_u64, Ack, Names, Stored};
use crate::proto;

/// `PublishResponse.results`.
const RESULTS: u32 = 1;
/// The fields of `EventResult.outcome`.
const ACCEPTED: u32 = 1;
const REFUSED: u32 = 2;
const QUEUED: u32 = 3;
const SPOOLED: u32 = 4;

/// Appends the `PublishResponse` of `outcomes` (one result per event, in order) to `out`,
/// preceded by its length as a varint when `framed` (the native protocol's framing).
pub fn encode(outcomes: &[Outcome], names: &Names, framed: bool, out: &mut impl BufMut) {
    // Refusals are rare and carry their own strings: prost encodes those.
    let refusals: Vec<proto::Refused> =
        outcomes.iter().filter_map(|o| o.as_ref().err()).map(proto_refusal).collect();
    let results = || {
        let mut refusals = refusals.iter();
        outcomes.iter().map(move |o| (o, o.is_err().then(|| refusals.next()).flatten()))
    };
    if framed {
        let len: usize = results().map(|(o, r)| field_len(RESULTS, result_len(o, r, names))).sum();
        encode_varint(len as u64, out);
    }
    for (o, refusal) in results() {
        encode_key(RESULTS, WireType::LengthDelimited, out);
        encode_varint(result_len(o, refusal, names) as u64, out);
        match (o, refusal) {
            (Ok(Ack::Stored(s)), _) => {
                encode_key(ACCEPTED, WireType::LengthDelimited, out);
                encode_varint(accepted_len(s, names) as u64, out);
                accepted(s, names, out);
            }
            (Ok(Ack::Queued), _) => empty(QUEUED, out),
            (Ok(Ack::Spooled), _) => empty(SPOOLED, out),
            (Err(_), Some(r)) => {
                encode_key(REFUSED, WireType::LengthDelimited, out);
                encode_varint(r.encoded_len() as u64, out);
                // Writing into a growable buffer cannot fail.
                let _ = r.encode(out);
            }
            (Err(_), None) => {}
        }
    }
}

/// A refusal as protobuf (shared by every protobuf front-end).
pub fn proto_refusal(r: &Refusal) -> proto::Refused {
    proto::Refused {
        code: r.code.as_str().to_owned(),
        message: r.message.to_string(),
        retry_after_ms: r.retry_after.map_or(0, |d| d.as_millis().min(u128::from(u32::MAX)) as u32),
        reason: r.reason.to_owned(),
    }
}

/// The length of one `EventResult` (`refusal`: the outcome's, if it is one).
fn result_len(o: &Outcome, refusal: Option<&proto::Refused>, names: &Names) -> usize {
    match o {
        Ok(Ack::Stored(s)) => field_len(ACCEPTED, accepted_len(s, names)),
        Ok(Ack::Queued) => field_len(QUEUED, 0),
        Ok(Ack::Spooled) => field_len(SPOOLED, 0),
        Err(_) => refusal.map_or(0, |r| field_len(REFUSED, r.encoded_len())),
    }
}

/// Bytes of a length-delimited field `tag` holding `len` bytes.
fn field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// An empty message in field `tag`.
fn empty(tag: u32, out: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(0, out);
}

/// `Accepted`'s fields in field order, defaults left out, as prost writes them.
fn accepted_len(s: &Stored, names: &Names) -> usize {
    let string = |tag: u32, len: usize| if len == 0 { 0 } else { field_len(tag, len) };
    let varint = |tag: u32, v: u64| if v == 0 { 0 } else { key_len(tag) + encoded_len_varint(v) };
    string(1, names.stream.len())
        + varint(2, s.seq)
        + string(3, names.batch_len(s.batch))
        + varint(4, u64::from(s.index))
        + varint(5, u64::from(s.duplicate))
        + string(6, names.cluster(s.cluster).len())
}

fn accepted(s: &Stored, names: &Names, out: &mut impl BufMut) {
    put_str(1, &names.stream, out);
    put_u64(2, s.seq, out);
    encode_key(3, WireType::LengthDelimited, out);
    encode_varint(names.batch_len(s.batch) as u64, out);
    names.put_batch(s.batch, out);
    put_u64(4, u64::from(s.index), out);
    put_u64(5, u64::from(s.duplicate), out);
    put_str(6, names.cluster(s.cluster), out);
}

/// A request's outcomes as prost results: what [`encode`] writes, built the slow way.
#[cfg(test)]
pub fn results_of(outcomes: &[Outcome], names: &Names) -> Vec<proto::EventResult> {
    use proto::event_result::Outcome as O;
    let result = |outcome: &Outcome| match outcome {
        Ok(Ack::Stored(s)) => O::Accepted(proto::Accepted {
            stream: names.stream.clone(),
            cluster: names.cluster(s.cluster).to_owned(),
            seq: s.seq,
            batch: names.batch(s.batch),
            index: s.index,
            duplicate: s.duplicate,
        }),
        Ok(Ack::Queued) => O::Queued(proto::Queued {}),
        Ok(Ack::Spooled) => O::Spooled(proto::Spooled {}),
        Err(r) => O::Refused(proto_refusal(r)),
    };
    outcomes.iter().map(result).map(|o| proto::EventResult { outcome: Some(o) }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use std::time::Duration;

    fn stored(seq: u64, batch: u64, index: u32, cluster: u8, duplicate: bool) -> Outcome {
        Ok(Ack::Stored(Stored { seq, batch, index, cluster, duplicate }))
    }

    #[test]
    fn the_bytes_are_prost_s() {
        let names = Names::new("EDGE", vec!["default".into(), "eu-west".into()], "r1", "b0");
        let refused = Refusal::new(ErrorCode::QueueFull, "the relay's queues are full")
            .retry_after(Duration::from_millis(1500))
            .because("shard_full");
        let cases: Vec<Vec<Outcome>> = vec![
            vec![],
            vec![stored(1, 0, 0, 0, false)],
            // Zero fields are left out, large ones take long varints; a cluster past the
            // configured ones has no name.
            vec![stored(0, 0, 0, 0, false), stored(u64::MAX, u64::MAX, u32::MAX, 9, true)],
            vec![
                stored(9, 1, 0, 0, false),
                Err(refused.clone()),
                Ok(Ack::Queued),
                Ok(Ack::Spooled),
                stored(300, 1_000_000, 17, 1, true),
                Err(Refusal::new(ErrorCode::BadSubject, "")),
            ],
            (0..200).map(|i| stored(i, i / 16, i as u32 % 16, 0, i % 3 == 0)).collect(),
        ];
        for outcomes in cases {
            let want =
                proto::PublishResponse { results: results_of(&outcomes, &names), error: None };
            let mut got = Vec::new();
            encode(&outcomes, &names, false, &mut got);
            assert_eq!(got, want.encode_to_vec(), "{outcomes:?}");
            let mut framed = Vec::new();
            encode(&outcomes, &names, true, &mut framed);
            assert_eq!(framed, edgerelay_proto::framing::frame(&want).to_vec());
        }
    }
}
