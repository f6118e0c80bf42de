//! The publish window: publishing batches to JetStream with async-nats.
//!
//! Each batch is encoded once, published with `Nats-Msg-Id = <relay-id>.<boot-id>.<seq>` to
//! the [`router`](super::router)'s active cluster, and its PubAck awaited in its own task,
//! holding one permit of a bounded window: when the window is full, [`Sink::publish`] waits,
//! the batchers stop popping and the queues fill up, which ingest answers with 503. What
//! happens to a batch after that — retries, failover, the deadline, the spool, the answers —
//! is decided by its [`Flight`]; this file carries the steps out and moves the bytes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use prost::encoding::{encode_key, encode_varint, WireType};

use super::flight::{Active, Cause, End, Failure, Flight, Step, Why};
use super::Sink;
use crate::batch::driver::Publish;
use crate::batch::Ready;
use crate::error::{ErrorCode, Refusal};
use crate::event::{put_str, put_u64, Ack, Pending, Reply, Stored};
use crate::metrics::latency::Stage;
use crate::metrics::OutcomeLabels;
use crate::proto::SpoolRecord;

/// Header carrying the number of events in a batch.
pub const EVENTS_HEADER: &str = "Edgerelay-Events";
/// `Content-Type` of every batch.
pub const CONTENT_TYPE: &str = "application/x-protobuf; messageType=edgerelay.v1.Batch";

/// One batch on its way to JetStream: what is published, and whom to answer.
struct Encoded {
    subject: String,
    /// The batch's number ([`Stored::batch`]) and its `Nats-Msg-Id`.
    seq: u64,
    msg_id: String,
    payload: Bytes,
    events: usize,
    replies: Vec<Reply>,
}

/// Why an attempt failed, for the logs.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error("no NATS cluster is usable")]
    NoCluster,
    #[error("cluster {cluster}: {error}")]
    Publish { cluster: usize, error: PublishError },
}

impl Sink {
    /// Publishes one ready batch: waits for room in the ack window, sends it, and leaves a
    /// task to await the PubAck, retry, and answer the events.
    pub async fn publish(self: &Arc<Self>, batch: Ready<Pending>) {
        let oldest = batch.items.iter().map(|p| p.enqueued).min().unwrap_or_else(Instant::now);
        // The window may be full of batches JetStream has not answered (NATS slow or dark, and
        // batches past their deadline still being resolved): an event waits for room at most
        // its publish deadline, counted from its enqueue, so the edge is answered in time.
        let room = self.window.clone().acquire_owned();
        let permit =
            match tokio::time::timeout_at((oldest + self.flight.deadline).into(), room).await {
                Ok(Ok(permit)) => Some(permit),
                Ok(Err(_)) => return, // closed
                Err(_) => None,
            };
        let now = Instant::now();
        let batch = self.encode(batch, oldest, now);
        let mut flight = Flight::new(now, self.flight);
        let Some(permit) = permit else {
            let step = flight.no_room();
            return self.fly(flight, batch, step, Failed::NoCluster).await;
        };
        let step = flight.start(now, self.active_now());
        // The first send happens here, in the driver's task: the client's backpressure on
        // acks in flight holds the driver too.
        let first = match step {
            Step::Publish { cluster } => Some((cluster, self.send(&batch, cluster).await)),
            _ => None,
        };
        let sink = Arc::clone(self);
        tokio::spawn(async move {
            let (step, error) = match first {
                Some((cluster, sent)) => sink.settle(&mut flight, &batch, cluster, sent).await,
                None => (step, None),
            };
            let error = error.unwrap_or(Failed::NoCluster);
            sink.fly(flight, batch, step, error).await;
            drop(permit);
            if sink.in_flight() == 0 {
                sink.idle.notify_waiters();
            }
        });
    }

    /// Waits until every published batch is answered, or `timeout` passes. Returns whether
    /// everything was answered.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.window.acquire_many(self.window_size)).await.is_ok()
    }

    /// Resolves the next time the last batch in flight is answered.
    pub async fn idle(&self) {
        self.idle.notified().await
    }

    /// Batches published and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.window_size as usize - self.window.available_permits()
    }

    /// Numbers and encodes a batch that got its turn at `now`: an `edgerelay.v1.Batch`, its
    /// events written one after the other into a buffer of the size the queues counted.
    fn encode(&self, batch: Ready<Pending>, oldest: Instant, now: Instant) -> Encoded {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let msg_id = self.names.batch(seq);
        let waited = now.saturating_duration_since(oldest);
        self.metrics.queue_wait.observe(waited.as_secs_f64());
        self.metrics.latency.record(Stage::QueueWait, waited, now);
        let mut payload =
            Vec::with_capacity(self.relay_id.len() + self.boot_id.len() + 16 + batch.bytes);
        put_str(1, &self.relay_id, &mut payload);
        put_str(2, &self.boot_id, &mut payload);
        put_u64(3, seq, &mut payload);
        for p in &batch.items {
            encode_key(4, WireType::LengthDelimited, &mut payload);
            encode_varint(p.event.encoded_len() as u64, &mut payload);
            p.event.encode(&mut payload);
        }
        let replies: Vec<Reply> = batch.items.into_iter().map(|p| p.reply).collect();
        self.metrics.batch_events.observe(replies.len() as f64);
        self.metrics.batch_bytes.observe(payload.len() as f64);
        Encoded {
            subject: batch.subject,
            seq,
            msg_id,
            payload: Bytes::from(payload),
            events: replies.len(),
            replies,
        }
    }

    /// Carries out a flight's steps, from `step` on, until its events are answered. `error`
    /// is the last attempt's failure, for the logs.
    async fn fly(&self, mut f: Flight, mut b: Encoded, mut step: Step, mut error: Failed) {
        loop {
            if let Some(outcome) = step.batch_outcome() {
                self.metrics.batches.get_or_create(&OutcomeLabels { outcome }).inc();
            }
            step = match step {
                Step::Publish { cluster } => {
                    let sent = self.send(&b, cluster).await;
                    let (next, failed) = self.settle(&mut f, &b, cluster, sent).await;
                    error = failed.unwrap_or(error);
                    next
                }
                Step::Retry { at } => {
                    tracing::debug!(batch = %b.msg_id, tries = f.tries(), %error, "retrying batch");
                    self.metrics.batch_retries.inc();
                    tokio::time::sleep_until(at.into()).await;
                    let active = self.active_now();
                    if !matches!(active, Active::Cluster(_)) {
                        error = Failed::NoCluster;
                    }
                    f.retry(Instant::now(), active)
                }
                Step::Tell(refusal) => {
                    tracing::warn!(batch = %b.msg_id, tries = f.tries(), %error,
                        "batch not acknowledged in time: answered, still resolving");
                    for reply in &mut b.replies {
                        reply.tell(Err(refusal.clone()));
                    }
                    f.told()
                }
                Step::Spool(cause) => {
                    if cause == Cause::Deadline {
                        tracing::warn!(batch = %b.msg_id, tries = f.tries(), %error,
                            "no cluster acknowledged the batch in time: spooling it");
                    }
                    self.spool_batch(&mut f, &b).await
                }
                Step::Done(end) => return self.answer(&f, b, end, &error),
            };
        }
    }

    /// Publishes `b` to cluster `i`: the PubAck to come, or why it could not be sent.
    async fn send(&self, b: &Encoded, i: usize) -> Result<PublishAckFuture, PublishError> {
        let msg = message(&b.msg_id, b.payload.clone(), b.events);
        self.clusters[i].js.send_publish(b.subject.clone(), msg).await
    }

    /// Awaits the PubAck of an attempt on cluster `i` and tells the flight how it went; with
    /// the attempt's failure, if it failed.
    async fn settle(
        &self,
        f: &mut Flight,
        b: &Encoded,
        i: usize,
        sent: Result<PublishAckFuture, PublishError>,
    ) -> (Step, Option<Failed>) {
        let acked = match sent {
            Ok(ack) => {
                f.sent();
                ack.await
            }
            Err(e) => Err(e),
        };
        let error = match acked {
            Ok(ack) => {
                if ack.duplicate {
                    tracing::debug!(batch = %b.msg_id, tries = f.tries(),
                        "retried batch was already stored");
                }
                return (f.acked(i, ack.sequence), None);
            }
            Err(error) => error,
        };
        let failure = match permanent(&error) {
            Some(refusal) => Failure::Permanent(refusal),
            None => {
                if error.kind() == PublishErrorKind::StreamNotFound {
                    self.clusters[i].stream_lost();
                    self.observe(i, |r, now| r.stream(i, false, now));
                } else {
                    self.observe(i, |r, now| r.failed(i, now));
                }
                Failure::Retryable
            }
        };
        let step = f.failed(Instant::now(), failure, self.active_now());
        (step, Some(Failed::Publish { cluster: i, error }))
    }

    /// Writes a batch no cluster took to the spool, and tells the flight whether it could.
    async fn spool_batch(&self, f: &mut Flight, b: &Encoded) -> Step {
        let Some(spool) = &self.spool else {
            return f.spool_refused(Refusal::new(ErrorCode::Internal, "no disk spool"));
        };
        let record = SpoolRecord {
            msg_id: b.msg_id.clone(),
            subject: b.subject.clone(),
            batch: b.payload.clone(),
            events: u32::try_from(b.events).unwrap_or(u32::MAX),
            spooled_unix_ms: unix_ms(),
        };
        match spool.append(&record).await {
            Ok(()) => f.spooled(),
            Err(e) => {
                let answered = b.replies.first().is_some_and(Reply::answers_request);
                if answered {
                    tracing::warn!(batch = %b.msg_id, error = %e, "cannot spool the batch: refusing its events");
                } else {
                    tracing::error!(batch = %b.msg_id, events = b.events, error = %e,
                        "cannot spool a batch already answered (ack mode accepted): its events are lost");
                }
                f.spool_refused(e.refusal())
            }
        }
    }

    /// The flight is over: answers every event of `b` (requests and idempotency keys).
    fn answer(&self, f: &Flight, b: Encoded, end: End, error: &Failed) {
        let tries = f.tries();
        match end {
            End::Stored { cluster, seq, late: _ } => {
                let now = Instant::now();
                let took = now.saturating_duration_since(f.sent_at());
                self.metrics.flush.observe(took.as_secs_f64());
                self.metrics.latency.record(Stage::Flush, took, now);
                self.metrics.published_bytes.inc_by(b.payload.len() as u64);
                self.observe(cluster, |r, now| r.acked(cluster, now));
                // The stream is the configured one: JetStream lets only one stream capture a
                // subject, and the relay checked that this one does.
                for (index, reply) in b.replies.into_iter().enumerate() {
                    reply.send(Ok(Ack::Stored(Stored {
                        seq,
                        batch: b.seq,
                        index: index as u32,
                        cluster: cluster as u8,
                        duplicate: false,
                    })));
                }
            }
            End::Spooled => {
                for reply in b.replies {
                    reply.send(Ok(Ack::Spooled));
                }
            }
            End::Refused { refusal, why } => {
                match why {
                    Why::Permanent => tracing::warn!(batch = %b.msg_id, err = %error,
                        "JetStream refused the batch"),
                    Why::NeverReached => tracing::warn!(batch = %b.msg_id, tries, %error,
                        "giving up on batch: never reached a cluster"),
                    Why::Unresolved => tracing::warn!(batch = %b.msg_id, tries, %error,
                        "giving up on batch: no answer from JetStream within the duplicate window"),
                    Why::WindowFull | Why::SpoolRefused => {}
                }
                for reply in b.replies {
                    reply.send(Err(refusal.clone()));
                }
            }
        }
    }
}

impl Publish for Sink {
    fn publish(
        self: &Arc<Self>,
        batch: Ready<Pending>,
    ) -> impl std::future::Future<Output = ()> + Send {
        Sink::publish(self, batch)
    }

    fn in_flight(&self) -> usize {
        Sink::in_flight(self)
    }

    fn idle(&self) -> impl std::future::Future<Output = ()> + Send {
        Sink::idle(self)
    }

    fn round_trip(&self) -> Option<Duration> {
        Sink::round_trip(self)
    }
}

/// The NATS message of a batch: its payload, `Nats-Msg-Id` and the batch headers.
pub(super) fn message(msg_id: &str, payload: Bytes, events: usize) -> PublishMessage {
    PublishMessage::build()
        .payload(payload)
        .message_id(msg_id)
        .header("Content-Type", CONTENT_TYPE)
        .header(EVENTS_HEADER, events.to_string().as_str())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A JetStream error response that a retry will not change (stream full, message too big…).
pub(super) fn permanent(err: &PublishError) -> Option<Refusal> {
    match err.kind() {
        PublishErrorKind::MaxPayloadExceeded => Some(Refusal::new(
            ErrorCode::TooLarge,
            "the batch exceeds the NATS server's max_payload; lower batch.max_bytes",
        )),
        PublishErrorKind::Other => {
            let js =
                std::error::Error::source(err)?.downcast_ref::<async_nats::jetstream::Error>()?;
            // A stream at its max_msgs / max_bytes with discard new answers 503 "maximum …
            // exceeded": retrying the same batch at once will not change it.
            if js.error_code() == async_nats::jetstream::ErrorCode::STREAM_STORE_FAILED
                && js.to_string().contains("maximum")
            {
                return Some(
                    Refusal::new(ErrorCode::Rejected, format!("the stream is full: {js}"))
                        .because("stream_full"),
                );
            }
            // Other 503s from JetStream (no quorum, leader election) are worth retrying.
            (js.code() != 503).then(|| {
                Refusal::new(ErrorCode::Rejected, format!("JetStream refused the batch: {js}"))
            })
        }
        _ => None,
    }
}
