//! Ingest: taking events in from the edge. The protocol front-ends ([`https`] for HTTP/1.1 and
//! HTTP/2, [`quic`] for HTTP/3 and the native `edgerelay/1` protocol, both HTTP versions through
//! [`http_api`]) only decode requests into [`EventIn`]s and encode answers; everything else —
//! authentication, authorization, validation, idempotency, enqueueing and waiting for the
//! answer — is [`Ingest`], one code path for every protocol.

pub mod body;
pub mod budget;
pub mod config;
pub mod http_api;
pub mod https;
pub mod idempotency;
pub mod json;
pub mod pace;
pub mod quic;
pub mod results;

/// The native protocol's framing, shared with the client (`edgerelay-proto`).
pub use edgerelay_proto::framing;
use edgerelay_proto::request::{self, Scan, ScanError};

pub use config::DECODED_EVENT_BYTES;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message;
use tokio::sync::oneshot;

use crate::audit::Audit;
use crate::auth::{Auth, Credentials, Current, Identity, Peer, Session};
use crate::batch::queue::{PushError, Queues};
use crate::error::{ErrorCode, Refusal, Side};
use crate::event::{Ack, Answers, Event, Names, Outcome, Pending, Remember, Reply, Slot};
use crate::metrics::latency::Stage;
use crate::metrics::{Metrics, Protocol};
use crate::proto;
use crate::section::ms;
use crate::sink::Sink;
use crate::subject::{self, Pattern};
use budget::{Budget, Share};
use config::{AckMode, Settings};
use idempotency::{Claim, Idempotency};

/// Most headers one event may carry.
pub const MAX_EVENT_HEADERS: usize = 32;
/// Longest idempotency key, bytes.
pub const MAX_KEY_BYTES: usize = 128;

/// One event as a front-end decoded it, not yet checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventIn {
    pub subject: String,
    pub payload: Bytes,
    pub headers: HashMap<String, String>,
    /// Idempotency key; empty for none.
    pub id: String,
    /// Unix milliseconds, 0 when the edge did not say.
    pub edge_time_unix_ms: u64,
}

/// The shared ingest stage.
#[derive(Debug)]
pub struct Ingest {
    /// Swapped whole by a reload; each call reads the current one.
    auth: Current,
    audit: Arc<Audit>,
    metrics: Arc<Metrics>,
    queues: Arc<Queues>,
    sink: Arc<Sink>,
    idempotency: Arc<Idempotency>,
    /// What peers may make the relay hold.
    budget: Arc<Budget>,
    stream_subjects: Vec<Pattern>,
    ack_mode: AckMode,
    /// How long a retry waits for the outcome of the first request with its idempotency key.
    wait_for_first: std::time::Duration,
    max_subject_bytes: usize,
    max_event_bytes: usize,
    max_events_per_request: usize,
}

/// The answer to one submitted event: known now, to come through its [`Slot`], or to come
/// from an earlier event with the same idempotency key.
enum Ticket {
    Now(Outcome),
    InSlot,
    Waiting(oneshot::Receiver<Outcome>),
}

impl Ingest {
    pub fn new(
        cfg: &Settings,
        auth: Arc<Auth>,
        audit: Arc<Audit>,
        metrics: Arc<Metrics>,
        queues: Arc<Queues>,
        sink: Arc<Sink>,
    ) -> Self {
        Self {
            auth: Current::new(auth),
            audit,
            metrics,
            queues,
            sink,
            idempotency: Arc::new(Idempotency::new(
                ms(cfg.idempotency.window_ms),
                cfg.idempotency.max_keys,
            )),
            budget: {
                let limits = cfg.peers.limits(budget::memory_limit(), cfg.largest_request);
                tracing::info!(
                    total = limits.total,
                    per_source = limits.per_source,
                    per_connection = limits.per_connection,
                    "memory budget for peers"
                );
                Budget::new(limits, cfg.peers.prefixes())
            },
            stream_subjects: cfg
                .stream_subjects
                .iter()
                .filter_map(|s| Pattern::parse(s).ok())
                .collect(),
            ack_mode: cfg.ack_mode,
            wait_for_first: cfg.wait_for_first,
            max_subject_bytes: cfg.max_subject_bytes,
            max_event_bytes: cfg.max_event_bytes,
            max_events_per_request: cfg.max_events_per_request,
        }
    }

    /// The authentication stage requests use now.
    pub fn auth(&self) -> Arc<Auth> {
        self.auth.load()
    }

    /// Requests from now on go through `auth` (a reload); requests under way finish with the
    /// stage they started with. Identities of open connections and streams are derived again
    /// from what they presented on their next request.
    pub fn set_auth(&self, auth: Arc<Auth>) {
        self.auth.store(auth);
    }

    pub async fn authenticate(&self, creds: Credentials<'_>) -> Result<Identity, Refusal> {
        self.auth().authenticate(creds).await
    }

    /// The identity a connection's client certificate proves under the current auth stage.
    pub fn peer_identity(&self, peer: &mut Peer) -> Option<Identity> {
        peer.identity(&self.auth).cloned()
    }

    /// The identity of a native stream's next request (`token`: the one it carries, if any).
    pub async fn stream_identity(
        &self,
        session: &mut Session,
        token: Option<&str>,
    ) -> Result<Identity, Refusal> {
        session.identity(&self.auth, token).await
    }

    /// Checks that `identity` may publish on `subject`: well-formed (400), captured by the
    /// stream (403) and allowed by the identity's rules (403).
    pub fn check_subject(&self, identity: &Identity, subject: &str) -> Result<(), Refusal> {
        self.check_subject_with(&self.auth(), identity, subject)
    }

    /// [`Ingest::check_subject`] with the auth stage the request already holds.
    fn check_subject_with(
        &self,
        auth: &Auth,
        identity: &Identity,
        subject: &str,
    ) -> Result<(), Refusal> {
        subject::validate(subject, self.max_subject_bytes)
            .map_err(|e| Refusal::new(ErrorCode::BadSubject, format!("invalid subject: {e}")))?;
        if !self.stream_subjects.iter().any(|p| p.matches(subject)) {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                "subject is outside the subjects this relay publishes to",
            ));
        }
        auth.authorize(identity, subject)
    }

    /// What answers call the stream and the batches.
    pub fn names(&self) -> &Names {
        self.sink.names()
    }

    /// Counts `bytes` of request body or frame read on `protocol`.
    pub fn received(&self, protocol: Protocol, bytes: usize) {
        self.metrics.protocol(protocol).received_bytes.inc_by(bytes as u64);
    }

    /// What counts the bytes of refused request bodies drained on `protocol`.
    pub fn discarded(&self, protocol: Protocol) -> impl Fn(usize) + Send + 'static {
        let counter = self.metrics.protocol(protocol).discarded_bytes.clone();
        move |n| {
            counter.inc_by(n as u64);
        }
    }

    /// The memory budget's share of a new connection from `peer`.
    pub fn share(&self, peer: std::net::IpAddr) -> Share {
        self.budget.connection(peer)
    }

    /// The memory a request of `wire_bytes` may take once decoded, beyond its payloads (which
    /// stay slices of what was read): its events, at most one per two bytes on the wire and
    /// `max_events_per_request`, at [`DECODED_EVENT_BYTES`] each.
    pub fn decoded_bytes(&self, wire_bytes: usize) -> usize {
        (wire_bytes / 2).min(self.max_events_per_request) * DECODED_EVENT_BYTES
    }

    /// Bytes held for peers now (the memory budget's use).
    pub fn held_for_peers(&self) -> usize {
        self.budget.used()
    }

    /// Counts a connection of `protocol` refused before its handshake, for `reason`.
    pub fn connection_refused(&self, protocol: Protocol, reason: &'static str) {
        let labels = crate::metrics::ConnectionRefusedLabels { protocol, reason };
        self.metrics.connections_refused.get_or_create(&labels).inc();
    }

    /// Per-source connection slots, at most `max` per source.
    pub fn slots(&self, max: usize) -> Arc<budget::Slots> {
        budget::Slots::new(max, self.budget.prefixes())
    }

    /// Counts a connection of `protocol` as open until the guard is dropped.
    pub fn connection_opened(&self, protocol: Protocol) -> crate::metrics::OpenConnection {
        self.metrics.connection_opened(protocol)
    }

    /// Largest single event payload.
    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }

    /// Most events in one multi-event request.
    pub fn max_events_per_request(&self) -> usize {
        self.max_events_per_request
    }

    /// Refuses a multi-event request as a whole: no events, or more than the limit.
    pub fn check_request(&self, events: &[EventIn]) -> Result<(), Refusal> {
        let max = self.max_events_per_request;
        if events.is_empty() {
            Err(Refusal::new(ErrorCode::BadRequest, "no events in the request"))
        } else if events.len() > max {
            Err(Refusal::new(ErrorCode::TooLarge, format!("more than {max} events in one request")))
        } else {
            Ok(())
        }
    }

    /// Refuses the whole request before decoding its body when nothing could be taken in.
    pub fn refuse_early(&self) -> Option<Refusal> {
        if self.queues.is_closed() {
            return Some(Refusal::new(ErrorCode::ShuttingDown, "the relay is shutting down"));
        }
        self.sink.unavailable()
    }

    /// Counts and audits a refusal of a whole request (or of one event the caller refused)
    /// from the peer at `from`. Every refusal the edge gets passes through here or through
    /// [`Ingest::publish_all`].
    pub fn refused(
        &self,
        protocol: Protocol,
        from: SocketAddr,
        identity: Option<&Identity>,
        subject: Option<&str>,
        r: &Refusal,
    ) {
        self.audit.refused(protocol, Some(from.ip()), identity, subject, r);
    }

    /// Publishes one event and waits for its outcome (per the ack mode).
    pub async fn publish(
        &self,
        protocol: Protocol,
        identity: &Identity,
        event: EventIn,
    ) -> Outcome {
        let outcome = self.publish_all(protocol, identity, vec![event]).await.pop();
        outcome.unwrap_or_else(|| Err(Refusal::new(ErrorCode::Internal, "no answer")))
    }

    /// Publishes many events: all are queued first, then their outcomes awaited together.
    /// Refusals are counted and audited here.
    pub async fn publish_all(
        &self,
        protocol: Protocol,
        identity: &Identity,
        events: Vec<EventIn>,
    ) -> Vec<Outcome> {
        let at = Arrival::now();
        // The oldest Edge-Timestamp of the request, for the edge→ack histogram.
        let edge_ms = events.iter().map(|e| e.edge_time_unix_ms).filter(|t| *t > 0).min();
        // One auth stage for the whole request, even if a reload swaps it meanwhile.
        let auth = self.auth();
        if let Err(r) = auth.limit(identity, events.len(), at.instant) {
            self.audit.refused(protocol, None, Some(identity), None, &r);
            return vec![Err(r); events.len()];
        }
        let answers = Answers::new(events.len());
        let mut waiting = Vec::new();
        for (index, ev) in events.into_iter().enumerate() {
            match self.submit(&auth, protocol, identity, ev, at, (answers.clone(), index)) {
                Ticket::Now(outcome) => answers.set(index, outcome),
                Ticket::InSlot => {}
                Ticket::Waiting(rx) => waiting.push((index, rx)),
            }
        }
        // Retries of keys in flight (rare) get the first event's answer, all of the request's
        // at once under one deadline.
        for (index, outcome) in
            wait_for_firsts(waiting, tokio::time::sleep(self.wait_for_first)).await
        {
            answers.set(index, outcome);
        }
        let outcomes = answers.all().await;
        let (mut accepted, mut duplicates) = (0, 0);
        for o in &outcomes {
            match o {
                Ok(Ack::Stored(s)) if s.duplicate => duplicates += 1,
                Ok(_) => accepted += 1,
                // The edge's own refusals were audited with their subject in `submit`.
                Err(r) if r.code.side() != Side::Edge => {
                    self.audit.refused(protocol, None, Some(identity), None, r)
                }
                Err(_) => {}
            }
        }
        self.audit.accepted(protocol, identity, accepted);
        let series = self.metrics.protocol(protocol);
        if duplicates > 0 {
            series.duplicates.inc_by(duplicates);
        }
        let now = Instant::now();
        let since_arrival = now.saturating_duration_since(at.instant);
        series.ingest_to_ack.observe(since_arrival.as_secs_f64());
        let latency = &self.metrics.latency;
        latency.record(Stage::IngestToAck, since_arrival, now);
        if let Some(edge_ms) = edge_ms {
            let since_edge =
                Duration::from_millis((at.unix_us / 1_000).saturating_sub(edge_ms)) + since_arrival;
            series.edge_to_ack.observe(since_edge.as_secs_f64());
            latency.record(Stage::EdgeToAck, since_edge, now);
        }
        outcomes
    }

    fn submit(
        &self,
        auth: &Auth,
        protocol: Protocol,
        identity: &Identity,
        ev: EventIn,
        at: Arrival,
        slot: Slot,
    ) -> Ticket {
        if let Err(r) = self.check(auth, identity, &ev) {
            self.audit.refused(protocol, None, Some(identity), Some(&ev.subject), &r);
            return Ticket::Now(Err(r));
        }
        if let Some(r) = self.refuse_early() {
            return Ticket::Now(Err(r));
        }
        let key = (!ev.id.is_empty()).then(|| self.idempotency.key(&identity.name, &ev.id));
        if let Some(key) = key {
            match self.idempotency.claim(key, at.instant) {
                Claim::New => {}
                Claim::Done(stored) => return Ticket::Now(Ok(Ack::Stored(stored))),
                Claim::Wait(rx) => return Ticket::Waiting(rx),
            }
        }
        let event = Event {
            subject: ev.subject,
            payload: ev.payload,
            headers: ev.headers,
            id: ev.id,
            edge_time_unix_ms: ev.edge_time_unix_ms,
            ingest_time_unix_us: at.unix_us,
            publisher: identity.name.clone(),
        };
        let len = event.encoded_len();
        let size = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        let key = key.map(|k| (self.idempotency.clone() as Arc<dyn Remember>, k));
        let (request, ticket) = match self.ack_mode {
            AckMode::Durable | AckMode::Spooled => (Some(slot), Ticket::InSlot),
            AckMode::Accepted => (None, Ticket::Now(Ok(Ack::Queued))),
        };
        let reply = Reply::new(request, key);
        let pending = Pending { event, size, enqueued: at.instant, reply };
        match self.queues.push(pending) {
            Ok(()) => ticket,
            Err(PushError::Full(p)) => {
                refuse(p, ErrorCode::QueueFull, "the relay's queues are full")
            }
            Err(PushError::Closed(p)) => {
                refuse(p, ErrorCode::ShuttingDown, "the relay is shutting down")
            }
        }
    }

    fn check(&self, auth: &Auth, identity: &Identity, ev: &EventIn) -> Result<(), Refusal> {
        self.check_subject_with(auth, identity, &ev.subject)?;
        let header_bytes: usize = ev.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if ev.payload.len() + header_bytes > self.max_event_bytes {
            return Err(Refusal::new(
                ErrorCode::TooLarge,
                format!("event is larger than {} bytes", self.max_event_bytes),
            ));
        }
        if ev.headers.len() > MAX_EVENT_HEADERS {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("more than {MAX_EVENT_HEADERS} event headers"),
            ));
        }
        if ev.id.len() > MAX_KEY_BYTES || !ev.id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!(
                    "idempotency key must be at most {MAX_KEY_BYTES} printable ASCII characters"
                ),
            ));
        }
        Ok(())
    }
}

/// Waits for the first attempts of a request's retried keys (`(index, receiver)`), all of them
/// at once, until `deadline`: a request with many keys in flight waits one deadline, not one
/// per key. A key still unresolved then is refused (`first_attempt_unresolved`): the retry must
/// not publish the event again, so it is told to come back later with the same key.
async fn wait_for_firsts(
    waiting: Vec<(usize, oneshot::Receiver<Outcome>)>,
    deadline: impl std::future::Future<Output = ()>,
) -> Vec<(usize, Outcome)> {
    use futures::FutureExt;
    let deadline = deadline.shared();
    let waits = waiting.into_iter().map(|(index, rx)| {
        let deadline = deadline.clone();
        async move {
            // An answer already there wins over a deadline that passed meanwhile.
            let outcome = tokio::select! {
                biased;
                outcome = rx => outcome.unwrap_or_else(|_| {
                    Err(Refusal::new(ErrorCode::ShuttingDown, "the relay stopped before answering"))
                }),
                () = deadline => Err(Refusal::new(
                    ErrorCode::AckTimeout,
                    "an earlier request with this Idempotency-Key is still waiting for JetStream; retry later with the same key",
                )
                .because("first_attempt_unresolved")),
            };
            (index, outcome)
        }
    });
    futures::future::join_all(waits).await
}

/// Answers a pending event that could not be queued (so its idempotency key is released),
/// and the request with the same refusal unless the reply already did.
fn refuse(p: Pending, code: ErrorCode, message: &'static str) -> Ticket {
    let refusal = Refusal::new(code, message);
    let answered = p.reply.answers_request();
    p.reply.send(Err(refusal.clone()));
    if answered {
        Ticket::InSlot
    } else {
        Ticket::Now(Err(refusal))
    }
}

/// When a request's events arrived: read once per request, not per event.
#[derive(Clone, Copy)]
struct Arrival {
    instant: Instant,
    unix_us: u64,
}

impl Arrival {
    fn now() -> Self {
        let unix_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros());
        Self { instant: Instant::now(), unix_us: unix_us as u64 }
    }
}

pub use results::proto_refusal;

/// Scans a protobuf `PublishRequest` (HTTP body or QUIC frame) at the field level: its token,
/// and its events counted — refused past `max_events` before any event is decoded, so a
/// request of empty events (2 bytes each on the wire, ~200 decoded) cannot make the relay
/// allocate a hundred times what it read.
pub fn scan_publish_request(frame: &[u8], max_events: usize) -> Result<Scan<'_>, Refusal> {
    request::scan(frame, max_events).map_err(|e| match e {
        ScanError::TooManyEvents { .. } => {
            Refusal::new(ErrorCode::TooLarge, e.to_string()).because("too_many_events")
        }
        ScanError::Malformed(_) => Refusal::new(ErrorCode::BadRequest, e.to_string()),
    })
}

/// Decodes a protobuf `PublishRequest` (HTTP body or QUIC frame) into events, scanned first
/// (see [`scan_publish_request`]). The relay's own fields (`ingest_time_unix_us`,
/// `publisher`) are ignored: the relay sets them.
///
/// Decoding from `Bytes` keeps payloads as slices of the request, without a copy.
pub fn decode_publish_request(body: Bytes, max_events: usize) -> Result<Vec<EventIn>, Refusal> {
    scan_publish_request(&body, max_events)?;
    let req = proto::PublishRequest::decode(body).map_err(|e| invalid_request(&e))?;
    Ok(events_of(req))
}

/// The refusal of a `PublishRequest` prost could not decode (HTTP body or QUIC frame). prost's
/// messages name message types, fields and wire types, never values, so they are kept whole
/// (within [`Refusal::new`]'s bound) rather than cut to an excerpt.
pub fn invalid_request(e: &prost::DecodeError) -> Refusal {
    Refusal::new(ErrorCode::BadRequest, format!("invalid PublishRequest: {e}"))
}

/// The events of a decoded `PublishRequest`.
pub fn events_of(req: proto::PublishRequest) -> Vec<EventIn> {
    req.events
        .into_iter()
        .map(|e| EventIn {
            subject: e.subject,
            payload: e.payload,
            headers: e.headers,
            id: e.id,
            edge_time_unix_ms: e.edge_time_unix_ms,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Stored;

    /// A retry's answer: the first attempt's, as a duplicate.
    fn stored(seq: u64) -> Outcome {
        Stored::answer(seq, 1, true)
    }

    #[tokio::test]
    async fn a_request_s_keyed_waits_share_one_deadline() {
        // Five retried keys: 1 and 3 resolve, 4's first attempt is dropped, 0 and 2 never do.
        let (senders, waiting): (Vec<_>, Vec<_>) = (0..5)
            .map(|i| {
                let (tx, rx) = oneshot::channel();
                (tx, (i * 10, rx))
            })
            .unzip();
        let (deadline_tx, deadline_rx) = oneshot::channel::<()>();
        let deadline = async move {
            let _ = deadline_rx.await;
        };
        let wait = tokio::spawn(wait_for_firsts(waiting, deadline));
        let [tx0, tx1, tx2, tx3, tx4]: [_; 5] = senders.try_into().unwrap();
        tx1.send(stored(11)).unwrap();
        tx3.send(stored(33)).unwrap();
        drop(tx4);
        // The one deadline passes once: every key still waiting is answered with it, and
        // answers already there win over it.
        deadline_tx.send(()).unwrap();
        let got = wait.await.unwrap();
        let got: Vec<_> = got
            .iter()
            .map(|(i, o)| match o {
                Ok(Ack::Stored(s)) => (*i, format!("seq {}", s.seq)),
                Err(r) => (*i, r.reason.to_owned()),
                Ok(other) => panic!("{other:?}"),
            })
            .collect();
        let want = [
            (0, "first_attempt_unresolved"),
            (10, "seq 11"),
            (20, "first_attempt_unresolved"),
            (30, "seq 33"),
            (40, "shutting_down"),
        ];
        let want: Vec<_> = want.iter().map(|(i, s)| (*i, s.to_string())).collect();
        assert_eq!(got, want);
        drop((tx0, tx2));
    }

    #[tokio::test]
    async fn keyed_waits_end_as_soon_as_all_resolve_without_the_deadline() {
        let (tx, rx) = oneshot::channel();
        tx.send(stored(7)).unwrap();
        let never = std::future::pending::<()>();
        let got = wait_for_firsts(vec![(3, rx)], never).await;
        assert!(matches!(got[..], [(3, Ok(Ack::Stored(Stored { seq: 7, .. })))]));
        assert!(wait_for_firsts(vec![], std::future::pending()).await.is_empty());
    }
}
