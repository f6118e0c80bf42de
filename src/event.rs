//! The unit of work on the data path: an event waiting for its answer ([`Pending`]), and the
//! answer ([`Outcome`]). Every `Pending` is answered exactly once — by the sink on PubAck or
//! failure, or with `shutting_down` if it is dropped unanswered — so no edge request waits
//! forever and no idempotency key stays claimed.
//!
//! A leaf: ingest makes these, the queues and batches carry them, the sink answers them, and
//! this module depends on none of those. The idempotency cache a [`Reply`] settles is seen
//! through [`Remember`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Instant;

use bytes::{BufMut, Bytes};
use futures::task::AtomicWaker;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

use crate::error::{ErrorCode, Refusal};

/// Where JetStream stored an event. Plain numbers (`Copy`, no shared strings): one is made,
/// copied and cached per event on several threads; [`Names`] spells out the stream and batch
/// when an answer is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The batch's sequence in the stream.
    pub seq: u64,
    /// The batch's number in this relay process ([`Names::batch`] is its `Nats-Msg-Id`).
    pub batch: u64,
    /// Index of the event within the batch.
    pub index: u32,
    /// Which NATS cluster stored it (an index into [`Names::clusters`]).
    pub cluster: u8,
    /// This answer repeats an earlier one (idempotency-key retry).
    pub duplicate: bool,
}

#[cfg(test)]
impl Stored {
    /// For tests: stored at `seq` as the first event of `batch` on the first cluster.
    pub(crate) fn answer(seq: u64, batch: u64, duplicate: bool) -> Outcome {
        Ok(Ack::Stored(Stored { seq, batch, index: 0, cluster: 0, duplicate }))
    }
}

/// The names answers give: the stream, the clusters, and the batches' `Nats-Msg-Id`s
/// (`{relay.id}.{boot id}.{batch}`), the same for every event of one relay process.
#[derive(Clone, Debug)]
pub struct Names {
    pub stream: String,
    /// The configured NATS clusters' names, in config order.
    pub clusters: Vec<String>,
    /// `{relay.id}.{boot id}`.
    batch_prefix: String,
}

impl Names {
    pub fn new(stream: &str, clusters: Vec<String>, relay_id: &str, boot_id: &str) -> Self {
        Self { stream: stream.to_owned(), clusters, batch_prefix: format!("{relay_id}.{boot_id}") }
    }

    /// The name of cluster number `i`.
    pub fn cluster(&self, i: u8) -> &str {
        self.clusters.get(usize::from(i)).map_or("", String::as_str)
    }

    /// The `Nats-Msg-Id` of batch number `batch`.
    pub fn batch(&self, batch: u64) -> String {
        format!("{}.{batch}", self.batch_prefix)
    }

    /// The length of [`Names::batch`], without making it.
    pub fn batch_len(&self, batch: u64) -> usize {
        self.batch_prefix.len() + 1 + itoa::Buffer::new().format(batch).len()
    }

    /// Writes [`Names::batch`] to `out`, without allocating.
    pub fn put_batch(&self, batch: u64, out: &mut impl bytes::BufMut) {
        out.put_slice(self.batch_prefix.as_bytes());
        out.put_u8(b'.');
        out.put_slice(itoa::Buffer::new().format(batch).as_bytes());
    }
}

/// What the edge is told about one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ack {
    /// Durable in JetStream.
    Stored(Stored),
    /// Queued in the relay (ack mode `accepted`).
    Queued,
    /// Written to the relay's disk spool, to be published when a cluster takes it (ack mode
    /// `spooled`).
    Spooled,
}

pub type Outcome = Result<Ack, Refusal>;

/// One event as the relay publishes it (`edgerelay.v1.Event` in a `Batch`): what the edge sent
/// and what the relay adds. Not prost's `Event`: the publisher is the request's identity name,
/// shared by its events instead of copied into each, and the batch encoder writes the bytes
/// prost would ([`Event::encode`], tested against prost).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Event {
    pub subject: String,
    pub payload: Bytes,
    pub headers: HashMap<String, String>,
    /// Idempotency key; empty for none.
    pub id: String,
    pub edge_time_unix_ms: u64,
    pub ingest_time_unix_us: u64,
    pub publisher: Arc<str>,
}

impl Event {
    /// The length of the encoded message.
    pub fn encoded_len(&self) -> usize {
        use prost::encoding::{bytes, hash_map, string, uint64};
        let str_len = |tag: u32, v: &str| {
            if v.is_empty() {
                0
            } else {
                key_len(tag) + encoded_len_varint(v.len() as u64) + v.len()
            }
        };
        let u64_len = |tag: u32, v: u64| if v == 0 { 0 } else { uint64::encoded_len(tag, &v) };
        str_len(1, &self.subject)
            + if self.payload.is_empty() { 0 } else { bytes::encoded_len(2, &self.payload) }
            + hash_map::encoded_len(string::encoded_len, string::encoded_len, 3, &self.headers)
            + str_len(4, &self.id)
            + u64_len(5, self.edge_time_unix_ms)
            + u64_len(6, self.ingest_time_unix_us)
            + str_len(7, &self.publisher)
    }

    /// Writes the message (without a length prefix), fields in order and defaults left out,
    /// as prost does.
    pub fn encode(&self, out: &mut impl BufMut) {
        use prost::encoding::{hash_map, string};
        put_str(1, &self.subject, out);
        if !self.payload.is_empty() {
            encode_key(2, WireType::LengthDelimited, out);
            encode_varint(self.payload.len() as u64, out);
            out.put_slice(&self.payload);
        }
        hash_map::encode(
            |t, v, b| string::encode(t, v, b),
            string::encoded_len,
            |t, v, b| string::encode(t, v, b),
            string::encoded_len,
            3,
            &self.headers,
            out,
        );
        put_str(4, &self.id, out);
        put_u64(5, self.edge_time_unix_ms, out);
        put_u64(6, self.ingest_time_unix_us, out);
        put_str(7, &self.publisher, out);
    }
}

/// A string field, left out when empty (as prost writes proto3 fields).
pub(crate) fn put_str(tag: u32, v: &str, out: &mut impl BufMut) {
    if !v.is_empty() {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(v.len() as u64, out);
        out.put_slice(v.as_bytes());
    }
}

/// A varint field, left out when zero (as prost writes proto3 fields).
pub(crate) fn put_u64(tag: u32, v: u64, out: &mut impl BufMut) {
    if v != 0 {
        encode_key(tag, WireType::Varint, out);
        encode_varint(v, out);
    }
}

/// An event in a queue or batch, with the means to answer it.
#[derive(Debug)]
pub struct Pending {
    pub event: Event,
    /// Encoded size of the event inside a `Batch`.
    pub size: usize,
    /// When it was enqueued.
    pub enqueued: Instant,
    pub reply: Reply,
}

/// The outcomes of one request's events, filled in by whoever answers each (the sink, a
/// refusal, a dropped [`Reply`]) and awaited together: one allocation and one wake-up per
/// request, where a channel per event would wake the request for every batch it touches.
#[derive(Debug)]
pub struct Answers {
    outcomes: Mutex<Vec<Option<Outcome>>>,
    missing: AtomicUsize,
    waker: AtomicWaker,
}

/// Event `.1` of the request `.0`.
pub type Slot = (Arc<Answers>, usize);

impl Answers {
    pub fn new(events: usize) -> Arc<Self> {
        Arc::new(Self {
            outcomes: Mutex::new((0..events).map(|_| None).collect()),
            missing: AtomicUsize::new(events),
            waker: AtomicWaker::new(),
        })
    }

    /// Records event `index`'s outcome; each event is answered once.
    pub fn set(&self, index: usize, outcome: Outcome) {
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        match outcomes.get_mut(index) {
            Some(slot @ None) => *slot = Some(outcome),
            _ => return,
        }
        drop(outcomes);
        if self.missing.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.waker.wake();
        }
    }

    /// Every event's outcome, in order, once all are in.
    pub async fn all(&self) -> Vec<Outcome> {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            if self.missing.load(Ordering::Acquire) > 0 {
                return Poll::Pending;
            }
            let mut outcomes = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
            let unanswered = || Err(Refusal::new(ErrorCode::Internal, "event left unanswered"));
            Poll::Ready(outcomes.drain(..).map(|o| o.unwrap_or_else(unanswered)).collect())
        })
        .await
    }
}

/// An idempotency key as scoped by the relay: a 128-bit fingerprint of (identity, client
/// key), made by the idempotency cache (`ingest::idempotency`), which also hashes it. The cache
/// keeps fingerprints rather than strings: hashed once per event, 16 bytes per entry, no
/// allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key(pub(crate) u128);

/// Where a keyed event's final outcome is remembered, so that a retry with the same key is
/// answered from it: the idempotency cache, as a [`Reply`] sees it.
pub trait Remember: fmt::Debug + Send + Sync {
    /// Records the outcome of the claimed `key` at `now` and wakes the retries waiting for it.
    fn complete(&self, key: Key, outcome: &Outcome, now: Instant);
}

/// Answers one event: to the waiting request (if any) and to the idempotency cache (if the
/// event carried a key).
#[derive(Debug, Default)]
pub struct Reply {
    request: Option<Slot>,
    key: Option<(Arc<dyn Remember>, Key)>,
}

impl Reply {
    pub fn new(request: Option<Slot>, key: Option<(Arc<dyn Remember>, Key)>) -> Self {
        Self { request, key }
    }

    /// Whether this reply answers a request (ack mode `durable`), not only the cache.
    pub fn answers_request(&self) -> bool {
        self.request.is_some()
    }

    /// Sends the outcome. The request may have gone away (client disconnected); the
    /// idempotency cache still learns the result.
    pub fn send(mut self, outcome: Outcome) {
        self.finish(outcome);
    }

    /// Answers the request now but keeps its idempotency key claimed, because the outcome is
    /// not final (a batch past its deadline may still be stored). A retry with the same key
    /// then waits for the final outcome instead of publishing the event a second time; the
    /// later [`Reply::send`] gives it (the request keeps this answer).
    pub fn tell(&mut self, outcome: Outcome) {
        if let Some((answers, index)) = self.request.take() {
            answers.set(index, outcome);
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some((cache, key)) = self.key.take() {
            cache.complete(key, &outcome, Instant::now());
        }
        if let Some((answers, index)) = self.request.take() {
            answers.set(index, outcome);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.request.is_some() || self.key.is_some() {
            self.finish(Err(Refusal::new(
                ErrorCode::ShuttingDown,
                "the relay stopped before the event was acknowledged",
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;
    use prost::Message;

    #[test]
    fn an_event_is_encoded_as_prost_encodes_it() {
        let full = proto::Event {
            subject: "edge.a.b".into(),
            payload: Bytes::from(vec![7; 300]),
            headers: [("k".to_owned(), "v".to_owned()), ("empty".to_owned(), String::new())].into(),
            id: "key-1".into(),
            edge_time_unix_ms: 1_700_000_000_000,
            ingest_time_unix_us: u64::MAX,
            publisher: "tenant-a".into(),
        };
        for want in
            [full.clone(), proto::Event::default(), proto::Event { headers: [].into(), ..full }]
        {
            let event = Event {
                subject: want.subject.clone(),
                payload: want.payload.clone(),
                headers: want.headers.clone(),
                id: want.id.clone(),
                edge_time_unix_ms: want.edge_time_unix_ms,
                ingest_time_unix_us: want.ingest_time_unix_us,
                publisher: want.publisher.as_str().into(),
            };
            let mut got = Vec::new();
            event.encode(&mut got);
            // A map's entries come in the map's order, the same for one map: decode to compare.
            assert_eq!(proto::Event::decode(&got[..]).unwrap(), want);
            assert_eq!(got.len(), want.encoded_len());
            assert_eq!(event.encoded_len(), want.encoded_len());
            if want.headers.len() < 2 {
                assert_eq!(got, want.encode_to_vec());
            }
        }
    }

    #[tokio::test]
    async fn answers_come_back_in_order_once_all_are_in() {
        let answers = Answers::new(3);
        let waiter = tokio::spawn({
            let answers = answers.clone();
            async move { answers.all().await }
        });
        answers.set(2, Stored::answer(3, 1, false));
        answers.set(0, Stored::answer(1, 1, false));
        // A second answer for an event changes nothing.
        answers.set(0, Stored::answer(9, 1, false));
        assert!(!waiter.is_finished());
        // A reply dropped unanswered still answers.
        drop(Reply::new(Some((answers.clone(), 1)), None));
        let outcomes = waiter.await.unwrap();
        assert_eq!(outcomes[0], Stored::answer(1, 1, false));
        assert_eq!(outcomes[1].as_ref().unwrap_err().code, ErrorCode::ShuttingDown);
        assert_eq!(outcomes[2], Stored::answer(3, 1, false));
    }
}
