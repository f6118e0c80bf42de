//! Publishing batches to JetStream with async-nats.
//!
//! Each batch is encoded once, published with `Nats-Msg-Id = <relay-id>.<boot-id>.<seq>`, and
//! its PubAck awaited in its own task, holding one permit of a bounded window: when the window
//! is full, [`Sink::publish`] waits, the batchers stop popping and the queues fill up, which
//! ingest answers with 503. A missing or failed ack is retried with the same Msg-Id (so
//! JetStream stores the batch once) until the batch's deadline; then its events are refused.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, Context};
use bytes::Bytes;
use prost::Message;
use tokio::sync::{watch, Notify, Semaphore};

use super::stream;
use crate::batch::Ready;
use crate::config::{ms, NatsConfig, StreamConfig};
use crate::error::{ErrorCode, Refusal};
use crate::event::{Ack, Names, Pending, Reply, Stored};
use crate::metrics::latency::Stage;
use crate::metrics::{ClusterLabels, Metrics, OutcomeLabels, DEFAULT_CLUSTER};
use crate::proto;

/// Header carrying the number of events in a batch.
pub const EVENTS_HEADER: &str = "Edgerelay-Events";
/// `Content-Type` of every batch.
pub const CONTENT_TYPE: &str = "application/x-protobuf; messageType=edgerelay.v1.Batch";
/// How often [`Sink::probe_rtt`] measures the round trip to NATS.
pub const RTT_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Longest pause between two retries of a batch.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Errors of the sink that stop the relay from starting.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The NATS options could not be built (e.g. unreadable credentials file). Our side.
    #[error("NATS client options: {0}")]
    Options(String),
    /// The stream exists with a configuration the relay cannot use. Operator's side; a retry
    /// does not help until the stream or the config changes.
    #[error("stream {stream} conflicts with the configuration:\n  {}", .conflicts.join("\n  "))]
    StreamConflict { stream: String, conflicts: Vec<String> },
    /// JetStream refused to create the stream (e.g. subjects overlap another stream).
    #[error("cannot create stream {stream}: {message}")]
    StreamCreate { stream: String, message: String },
    /// The stream is missing and `stream.create` is off.
    #[error("stream {0} does not exist and stream.create is false")]
    StreamMissing(String),
}

/// The JetStream side of the relay. Shared by the batcher tasks and ingest (for readiness).
#[derive(Debug)]
pub struct Sink {
    client: async_nats::Client,
    js: Context,
    stream: StreamConfig,
    relay_id: String,
    boot_id: String,
    names: Names,
    next_seq: AtomicU64,
    window: Arc<Semaphore>,
    window_size: u32,
    deadline: Duration,
    backoff: Duration,
    /// The stream was found or created and matches the config.
    stream_ok: AtomicBool,
    /// Asks the stream keeper to check the stream again (e.g. after "no stream found").
    recheck: Notify,
    /// Signalled when the last batch in flight was answered.
    idle: Notify,
    metrics: Arc<Metrics>,
}

/// One batch on its way to JetStream.
struct Flight {
    subject: String,
    /// The batch's number ([`Stored::batch`]) and its `Nats-Msg-Id`.
    seq: u64,
    msg_id: String,
    payload: Bytes,
    events: usize,
    replies: Vec<Reply>,
    deadline: Instant,
    sent: Instant,
}

impl Sink {
    /// Connects to NATS. Returns at once even if no server answers yet: the client keeps
    /// trying, and the relay reports itself unready and answers 503 until it connects.
    pub async fn connect(
        nats: &NatsConfig,
        stream: &StreamConfig,
        relay_id: &str,
        boot_id: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, SinkError> {
        let mut opts = match &nats.creds_file {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| SinkError::Options(format!("{}: {e}", path.display())))?,
            None => async_nats::ConnectOptions::new(),
        };
        if let (Some(user), Some(pass)) = (&nats.user, &nats.password) {
            opts = opts.user_and_password(user.clone(), pass.clone());
        }
        if let Some(token) = &nats.token {
            opts = opts.token(token.clone());
        }
        if let Some(path) = &nats.nkey_seed_file {
            let seed = std::fs::read_to_string(path)
                .map_err(|e| SinkError::Options(format!("{}: {e}", path.display())))?;
            opts = opts.nkey(seed.trim().to_owned());
        }
        if let Some(ca) = &nats.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&nats.tls_cert, &nats.tls_key) {
            opts = opts.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
        }
        let opts = opts
            .name(&nats.client_name)
            .connection_timeout(ms(nats.connect_timeout_ms))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((50u64 << attempt.min(5)).min(1_000))
            })
            .event_callback(|event| async move {
                tracing::info!(%event, "nats connection event");
            });
        let client = opts
            .connect(nats.urls.join(","))
            .await
            .map_err(|e| SinkError::Options(e.to_string()))?;
        let window = nats.max_inflight_batches;
        let js = jetstream::ContextBuilder::new()
            .timeout(ms(nats.ack_timeout_ms))
            .max_ack_inflight(window * 2)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Ok(Arc::new(Self {
            client,
            js,
            stream: stream.clone(),
            relay_id: relay_id.to_owned(),
            boot_id: boot_id.to_owned(),
            names: Names::new(&stream.name, relay_id, boot_id),
            next_seq: AtomicU64::new(1),
            window: Arc::new(Semaphore::new(window)),
            window_size: u32::try_from(window).unwrap_or(u32::MAX),
            deadline: ms(nats.publish_deadline_ms),
            backoff: ms(nats.retry_backoff_ms),
            stream_ok: AtomicBool::new(false),
            recheck: Notify::new(),
            idle: Notify::new(),
            metrics,
        }))
    }

    /// Connected to NATS and the stream is known good: events can be taken in.
    pub fn is_ready(&self) -> bool {
        self.stream_ok.load(Ordering::Relaxed) && self.client.connection_state() == State::Connected
    }

    /// Why events cannot be taken in now, if they cannot.
    pub fn unavailable(&self) -> Option<Refusal> {
        if self.client.connection_state() != State::Connected {
            Some(Refusal::new(ErrorCode::NatsUnavailable, "no NATS server is reachable"))
        } else if !self.stream_ok.load(Ordering::Relaxed) {
            Some(Refusal::new(
                ErrorCode::NatsUnavailable,
                "the JetStream stream is not available yet",
            ))
        } else {
            None
        }
    }

    /// Creates the stream if it is missing, or checks that the existing one fits.
    /// `Ok(false)`: NATS could not be asked now (try again later).
    pub async fn ensure_stream(&self) -> Result<bool, SinkError> {
        let name = &self.stream.name;
        let existing = match self.js.get_stream(name).await {
            Ok(mut s) => match s.info().await {
                Ok(info) => Some(info.config.clone()),
                Err(e) => {
                    tracing::debug!(error = %e, "stream info failed");
                    return Ok(false);
                }
            },
            Err(e) => match e.kind() {
                async_nats::jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    None
                }
                _ => {
                    tracing::debug!(error = %e, "stream lookup failed");
                    return Ok(false);
                }
            },
        };
        match existing {
            Some(config) => {
                let conflicts = stream::conflicts(&config, &self.stream);
                if !conflicts.is_empty() {
                    return Err(SinkError::StreamConflict { stream: name.clone(), conflicts });
                }
            }
            None if !self.stream.create => return Err(SinkError::StreamMissing(name.clone())),
            None => match self.js.create_stream(stream::spec(&self.stream)).await {
                Ok(_) => tracing::info!(stream = %name, "created stream"),
                Err(e) => match e.kind() {
                    async_nats::jetstream::context::CreateStreamErrorKind::JetStream(j) => {
                        return Err(SinkError::StreamCreate {
                            stream: name.clone(),
                            message: j.to_string(),
                        })
                    }
                    _ => {
                        tracing::debug!(error = %e, "stream create failed");
                        return Ok(false);
                    }
                },
            },
        }
        self.stream_ok.store(true, Ordering::Relaxed);
        Ok(true)
    }

    /// Keeps the stream checked: until it is good, and again whenever a publish says it is
    /// gone. Ends with an error only for a conflict an operator must fix.
    pub async fn keep_stream(self: Arc<Self>) -> Result<(), SinkError> {
        loop {
            match self.ensure_stream().await? {
                true => self.recheck.notified().await,
                false => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Measures the round trip to NATS every `every` until `stop` turns true, off the data
    /// path: a JetStream API request the relay's NATS user may already send (the stream's
    /// INFO) timed from send to answer — the network round trip plus the server's handling of
    /// a small API request (microseconds when healthy). async-nats has no public PING/PONG
    /// timer (nats.rs#909), and `flush()` only writes the socket. Sets
    /// `edgerelay_nats_rtt_seconds` (NaN when no answer came within `every`) and
    /// `edgerelay_nats_active_cluster` (1 while connected).
    pub async fn probe_rtt(self: Arc<Self>, every: Duration, mut stop: watch::Receiver<bool>) {
        let labels = ClusterLabels { cluster: DEFAULT_CLUSTER.to_owned() };
        let rtt = self.metrics.nats_rtt.get_or_create(&labels).clone();
        let active = self.metrics.nats_active_cluster.get_or_create(&labels).clone();
        let subject = format!("$JS.API.STREAM.INFO.{}", self.stream.name);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let connected = self.client.connection_state() == State::Connected;
            active.set(i64::from(connected));
            let started = Instant::now();
            let request = self.client.request(subject.clone(), Bytes::new());
            let seconds = match tokio::time::timeout(every, request).await {
                Ok(Ok(_)) => started.elapsed().as_secs_f64(),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "NATS round-trip probe failed");
                    f64::NAN
                }
                Err(_) => f64::NAN,
            };
            rtt.set(seconds);
        }
    }

    /// Publishes one ready batch: waits for room in the ack window, sends it, and leaves a
    /// task to await the PubAck, retry, and answer the events.
    pub async fn publish(self: &Arc<Self>, batch: Ready<Pending>) {
        let Ok(permit) = self.window.clone().acquire_owned().await else { return };
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let msg_id = self.names.batch(seq);
        let now = Instant::now();
        let mut oldest = now;
        let mut events = Vec::with_capacity(batch.items.len());
        let mut replies = Vec::with_capacity(batch.items.len());
        for p in batch.items {
            oldest = oldest.min(p.enqueued);
            events.push(p.event);
            replies.push(p.reply);
        }
        let waited = now.saturating_duration_since(oldest);
        self.metrics.queue_wait.observe(waited.as_secs_f64());
        self.metrics.latency.record(Stage::QueueWait, waited, now);
        let payload = proto::Batch {
            relay_id: self.relay_id.clone(),
            boot_id: self.boot_id.clone(),
            sequence: seq,
            events,
        }
        .encode_to_vec();
        self.metrics.batch_events.observe(replies.len() as f64);
        self.metrics.batch_bytes.observe(payload.len() as f64);
        let flight = Flight {
            subject: batch.subject,
            seq,
            msg_id,
            payload: Bytes::from(payload),
            events: replies.len(),
            replies,
            deadline: now + self.deadline,
            sent: now,
        };
        let first = self.send(&flight).await;
        let sink = Arc::clone(self);
        tokio::spawn(async move {
            sink.complete(flight, first).await;
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
    /// What answers call the stream and the batches.
    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn in_flight(&self) -> usize {
        self.window_size as usize - self.window.available_permits()
    }

    /// The NATS client (for `tail`-like readers in tests and tools).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    fn batch_outcome(&self, outcome: &'static str) {
        self.metrics.batches.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    async fn send(&self, f: &Flight) -> Result<PublishAckFuture, PublishError> {
        let msg = PublishMessage::build()
            .payload(f.payload.clone())
            .message_id(&*f.msg_id)
            .header("Content-Type", CONTENT_TYPE)
            .header(EVENTS_HEADER, f.events.to_string().as_str());
        self.js.send_publish(f.subject.clone(), msg).await
    }

    async fn complete(&self, f: Flight, first: Result<PublishAckFuture, PublishError>) {
        let mut attempt = first;
        let mut backoff = self.backoff;
        let mut tries = 1u32;
        loop {
            let result = match attempt {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            let err = match result {
                Ok(ack) => {
                    let now = Instant::now();
                    let took = now.saturating_duration_since(f.sent);
                    self.metrics.flush.observe(took.as_secs_f64());
                    self.metrics.latency.record(Stage::Flush, took, now);
                    self.metrics.published_bytes.inc_by(f.payload.len() as u64);
                    self.batch_outcome("stored");
                    if ack.duplicate {
                        tracing::debug!(batch = %f.msg_id, tries, "retried batch was already stored");
                    }
                    // The stream is the configured one: JetStream lets only one stream
                    // capture a subject, and the relay checked that this one does.
                    for (index, reply) in f.replies.into_iter().enumerate() {
                        reply.send(Ok(Ack::Stored(Stored {
                            seq: ack.sequence,
                            batch: f.seq,
                            index: index as u32,
                            duplicate: false,
                        })));
                    }
                    return;
                }
                Err(e) => e,
            };
            if let Some(refusal) = permanent(&err) {
                tracing::warn!(batch = %f.msg_id, error = %err, "JetStream refused the batch");
                self.batch_outcome("refused");
                answer_all(f.replies, refusal);
                return;
            }
            if err.kind() == PublishErrorKind::StreamNotFound {
                self.stream_ok.store(false, Ordering::Relaxed);
                self.recheck.notify_one();
            }
            if Instant::now() + backoff >= f.deadline {
                tracing::warn!(batch = %f.msg_id, tries, error = %err, "giving up on batch");
                self.batch_outcome("timeout");
                let refusal = match self.unavailable() {
                    Some(r) => r,
                    None => Refusal::new(
                        ErrorCode::AckTimeout,
                        format!(
                            "JetStream did not acknowledge within {} ms; retry with the same Idempotency-Key",
                            self.deadline.as_millis()
                        ),
                    ),
                };
                answer_all(f.replies, refusal);
                return;
            }
            tracing::debug!(batch = %f.msg_id, tries, error = %err, "retrying batch");
            self.metrics.batch_retries.inc();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            tries += 1;
            attempt = self.send(&f).await;
        }
    }
}

/// A JetStream error response that a retry will not change (stream full, message too big…).
fn permanent(err: &PublishError) -> Option<Refusal> {
    match err.kind() {
        PublishErrorKind::MaxPayloadExceeded => Some(Refusal::new(
            ErrorCode::TooLarge,
            "the batch exceeds the NATS server's max_payload; lower batch.max_bytes",
        )),
        PublishErrorKind::Other => {
            let js =
                std::error::Error::source(err)?.downcast_ref::<async_nats::jetstream::Error>()?;
            // 503s from JetStream (no quorum, leader election) are worth retrying.
            (js.code() != 503).then(|| {
                Refusal::new(ErrorCode::Rejected, format!("JetStream refused the batch: {js}"))
            })
        }
        _ => None,
    }
}

fn answer_all(replies: Vec<Reply>, refusal: Refusal) {
    for reply in replies {
        reply.send(Err(refusal.clone()));
    }
}
