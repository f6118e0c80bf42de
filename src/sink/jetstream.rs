//! Publishing batches to JetStream with async-nats.
//!
//! Each batch is encoded once, published with `Nats-Msg-Id = <relay-id>.<boot-id>.<seq>` to
//! the [`router`](super::router)'s active cluster, and its PubAck awaited in its own task,
//! holding one permit of a bounded window: when the window is full, [`Sink::publish`] waits,
//! the batchers stop popping and the queues fill up, which ingest answers with 503. A missing
//! or failed ack is retried with the same Msg-Id (so JetStream stores the batch once; after a
//! failover, on the new cluster) until the batch's deadline. Then its events are refused — or,
//! with the disk spool, the batch is spooled and replayed later by [`Sink::spawn_services`]'
//! replay task.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use bytes::Bytes;
use prost::Message;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;

use super::cluster::{Cluster, ConnectionEvent, Probe};
use super::router::{Params, Reason, Router, Switch};
use crate::batch::driver::Publish;
use crate::batch::Ready;
use crate::config::{ms, FailoverConfig, NatsConfig, StreamConfig};
use crate::error::{ErrorCode, Refusal};
use crate::event::{Ack, Names, Pending, Reply, Stored};
use crate::metrics::latency::Stage;
use crate::metrics::{FailoverLabels, Metrics, OutcomeLabels};
use crate::proto::{self, SpoolRecord};
use crate::shutdown::Shutdown;
use crate::spool::{Spool, Spooled};

/// Header carrying the number of events in a batch.
pub const EVENTS_HEADER: &str = "Edgerelay-Events";
/// `Content-Type` of every batch.
pub const CONTENT_TYPE: &str = "application/x-protobuf; messageType=edgerelay.v1.Batch";
/// Longest pause between two retries of a batch.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Spooled batches replayed at once (published before their acks are awaited).
const REPLAY_WINDOW: usize = 64;

/// Errors of the sink that stop the relay from starting.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The NATS options could not be built (e.g. unreadable credentials file). Our side.
    #[error("NATS cluster {cluster}: client options: {message}")]
    Options { cluster: String, message: String },
    /// The stream exists with a configuration the relay cannot use. Operator's side; a retry
    /// does not help until the stream or the config changes.
    #[error("stream {stream} on NATS cluster {cluster} conflicts with the configuration:\n  {}", .conflicts.join("\n  "))]
    StreamConflict { cluster: String, stream: String, conflicts: Vec<String> },
    /// JetStream refused to create the stream (e.g. subjects overlap another stream).
    #[error("cannot create stream {stream} on NATS cluster {cluster}: {message}")]
    StreamCreate { cluster: String, stream: String, message: String },
    /// The stream is missing and `stream.create` is off.
    #[error("stream {stream} does not exist on NATS cluster {cluster} and stream.create is false")]
    StreamMissing { cluster: String, stream: String },
}

/// The JetStream side of the relay. Shared by the batcher tasks and ingest (for readiness).
#[derive(Debug)]
pub struct Sink {
    clusters: Vec<Cluster>,
    router: Mutex<Router>,
    /// The router's active cluster, for readers that only look ([`NONE`] when none).
    active: AtomicUsize,
    /// Connection changes reported by the clients, taken by [`Sink::spawn_services`].
    events: Mutex<Option<mpsc::UnboundedReceiver<ConnectionEvent>>>,
    stream: StreamConfig,
    failover: FailoverConfig,
    relay_id: String,
    boot_id: String,
    names: Names,
    next_seq: AtomicU64,
    window: Arc<Semaphore>,
    window_size: u32,
    deadline: Duration,
    /// How long a batch answered `ack_timeout` keeps being published with its Msg-Id to learn
    /// whether it was stored: the stream's duplicate window, in which retries are harmless.
    resolve_within: Duration,
    backoff: Duration,
    /// Signalled when the last batch in flight was answered.
    idle: Notify,
    /// Where batches no cluster takes go (ack modes `spooled` and `accepted` with
    /// `spool.enabled`).
    spool: Option<Arc<Spool>>,
    /// Signalled when the active cluster changes (the spool replay waits for one).
    switched: Notify,
    metrics: Arc<Metrics>,
}

/// One cluster as `/debug/clusters` shows it.
#[derive(Debug, serde::Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub region: String,
    /// Batches go here now.
    pub active: bool,
    pub connected: bool,
    /// The stream was checked on this cluster.
    pub stream_ok: bool,
    pub healthy: bool,
    pub failures_in_a_row: u32,
    /// Smoothed round trip of the probes, once one answered.
    pub rtt_ms: Option<f64>,
}

/// [`Sink::active`] when no cluster is usable.
const NONE: usize = usize::MAX;

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

/// One publish attempt: the cluster it went to and its PubAck to come, or why it failed.
type Attempt = Result<(usize, PublishAckFuture), Failed>;

/// Why a publish attempt failed.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error("no NATS cluster is usable")]
    NoCluster,
    #[error("cluster {cluster}: {error}")]
    Publish { cluster: usize, error: PublishError },
}

impl Sink {
    /// Connects to every configured cluster. Returns at once even if no server answers yet:
    /// the clients keep trying, and the relay reports itself unready and answers 503 until one
    /// cluster is usable.
    pub async fn connect(
        nats: &NatsConfig,
        stream: &StreamConfig,
        relay_id: &str,
        boot_id: &str,
        spool: Option<Arc<Spool>>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, SinkError> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let mut clusters = Vec::new();
        for (i, c) in nats.resolved_clusters().iter().enumerate() {
            clusters.push(Cluster::connect(i, c, nats, events_tx.clone(), &metrics).await?);
        }
        let f = &nats.failover;
        let router = Router::new(
            clusters.len(),
            Params {
                unhealthy_after: f.unhealthy_after_failures,
                failback_after: ms(f.failback_after_ms),
                margin: ms(f.failback_margin_ms),
            },
        );
        let window = nats.max_inflight_batches;
        let cluster_names = clusters.iter().map(|c| c.name.clone()).collect();
        Ok(Arc::new(Self {
            clusters,
            router: Mutex::new(router),
            active: AtomicUsize::new(NONE),
            events: Mutex::new(Some(events)),
            stream: stream.clone(),
            failover: nats.failover.clone(),
            relay_id: relay_id.to_owned(),
            boot_id: boot_id.to_owned(),
            names: Names::new(&stream.name, cluster_names, relay_id, boot_id),
            next_seq: AtomicU64::new(1),
            window: Arc::new(Semaphore::new(window)),
            window_size: u32::try_from(window).unwrap_or(u32::MAX),
            deadline: ms(nats.publish_deadline_ms),
            resolve_within: ms(stream.duplicate_window_ms),
            backoff: ms(nats.retry_backoff_ms),
            idle: Notify::new(),
            spool,
            switched: Notify::new(),
            metrics,
        }))
    }

    /// Start-up: waits (up to `timeout`) for the clusters to connect, checks the stream on
    /// each, measures each round trip once, and picks the active cluster. Fails only for a
    /// stream an operator must fix; a cluster that cannot be reached now is retried by
    /// [`Sink::spawn_services`].
    pub async fn start(self: &Arc<Self>, timeout: Duration) -> Result<(), SinkError> {
        let checks = (0..self.clusters.len()).map(|i| async move {
            let c = &self.clusters[i];
            let deadline = Instant::now() + timeout;
            while !c.is_connected() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.observe(i, |r, now| r.connection(i, c.is_connected(), now));
            let replicas = c.ensure_stream(&self.stream).await?;
            match replicas {
                Some(replicas) => {
                    self.warn_if_fragile(c, replicas);
                    self.observe(i, |r, now| r.stream(i, true, now));
                    self.probe_once(i).await;
                }
                None => tracing::warn!(cluster = %c.name,
                    "NATS cluster not reachable yet: retrying in the background"),
            }
            Ok::<_, SinkError>(())
        });
        for result in futures::future::join_all(checks).await {
            result?;
        }
        match self.active_cluster() {
            Some(c) => {
                tracing::info!(cluster = %c.name, region = %c.region, "publishing to NATS cluster")
            }
            None if self.spool.is_some() => {
                tracing::warn!("no NATS cluster reachable yet: spooling to disk until one is")
            }
            None => tracing::warn!("no NATS cluster reachable yet: serving 503 until one is"),
        }
        Ok(())
    }

    /// The background work of the sink, each task ending when `stop` turns true: the
    /// connection events, and per cluster the stream keeper and the round-trip probe. A stream
    /// conflict an operator must fix is sent on `fatal`.
    pub fn spawn_services(
        self: &Arc<Self>,
        stop: Shutdown,
        fatal: mpsc::Sender<SinkError>,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        let events = self.events.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut events) = events {
            let sink = self.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(e) = events.recv().await {
                    sink.observe(e.cluster, |r, now| r.connection(e.cluster, e.connected, now));
                }
            }));
        }
        for i in 0..self.clusters.len() {
            let (sink, fatal, mut stop_keeper) = (self.clone(), fatal.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    Err(e) = sink.keep_stream(i) => { let _ = fatal.send(e).await; }
                    _ = stop_keeper.requested() => {}
                }
            }));
            tasks.push(tokio::spawn(self.clone().probe_rtt(i, stop.clone())));
        }
        if let Some(spool) = &self.spool {
            tasks.push(tokio::spawn(self.clone().replay(spool.clone(), stop)));
        }
        tasks
    }

    /// Some cluster is usable: events can be taken in.
    pub fn is_ready(&self) -> bool {
        self.active.load(Ordering::Relaxed) != NONE
    }

    /// Why events cannot be taken in now, if they cannot.
    pub fn unavailable(&self) -> Option<Refusal> {
        if self.is_ready() || self.spool.is_some() {
            return None; // with a spool, what no cluster takes waits on disk
        }
        Some(if self.clusters.iter().any(Cluster::is_connected) {
            Refusal::new(ErrorCode::NatsUnavailable, "the JetStream stream is not available yet")
        } else {
            Refusal::new(ErrorCode::NatsUnavailable, "no NATS server is reachable")
        })
    }

    /// Every cluster's state, for `/debug/clusters`.
    pub fn cluster_status(&self) -> Vec<ClusterStatus> {
        let router = self.router.lock().unwrap_or_else(|p| p.into_inner());
        let active = router.active();
        self.clusters
            .iter()
            .enumerate()
            .map(|(i, c)| ClusterStatus {
                name: c.name.clone(),
                region: c.region.clone(),
                active: active == Some(i),
                connected: c.is_connected(),
                stream_ok: c.stream_ok(),
                healthy: router.is_healthy(i),
                failures_in_a_row: router.failures(i),
                rtt_ms: router.rtt(i).map(|d| d.as_secs_f64() * 1e3),
            })
            .collect()
    }

    /// The cluster batches go to now.
    fn active_cluster(&self) -> Option<&Cluster> {
        self.clusters.get(self.active.load(Ordering::Relaxed))
    }

    /// Applies an observation to the router; on a change of the active cluster, logs it and
    /// updates the gauges.
    fn observe(&self, i: usize, f: impl FnOnce(&mut Router, Instant) -> Option<Switch>) {
        let mut router = self.router.lock().unwrap_or_else(|p| p.into_inner());
        let switch = f(&mut router, Instant::now());
        for (j, c) in self.clusters.iter().enumerate() {
            c.healthy_gauge.set(i64::from(router.is_healthy(j)));
        }
        let Some(s) = switch else { return };
        self.active.store(s.to.unwrap_or(NONE), Ordering::Relaxed);
        self.switched.notify_waiters();
        let name = |k: Option<usize>| k.map_or("none", |k| self.clusters[k].name.as_str());
        for (j, c) in self.clusters.iter().enumerate() {
            c.active_gauge.set(i64::from(s.to == Some(j)));
        }
        self.metrics
            .nats_failovers
            .get_or_create(&FailoverLabels { to: name(s.to).to_owned(), reason: s.reason.as_str() })
            .inc();
        let rtt = |k: Option<usize>| k.and_then(|k| router.rtt(k)).map(|d| d.as_secs_f64() * 1e3);
        let (from, to, reason) = (name(s.from), name(s.to), s.reason.as_str());
        match s.reason {
            Reason::Start => tracing::info!(cluster = to, "NATS cluster usable"),
            Reason::Nearer | Reason::Recovered => tracing::info!(
                from, to, reason, from_rtt_ms = ?rtt(s.from), to_rtt_ms = ?rtt(s.to),
                "switching NATS cluster"),
            Reason::Unhealthy => tracing::warn!(
                from, to, reason, observed = %self.clusters[i].name,
                "failing over: the active NATS cluster stopped acknowledging"),
        }
    }

    /// Keeps cluster `i`'s stream checked: until it is good, and again whenever a publish or
    /// probe says it is gone. Ends with an error only for a conflict an operator must fix.
    async fn keep_stream(&self, i: usize) -> Result<(), SinkError> {
        let c = &self.clusters[i];
        loop {
            if c.stream_ok() {
                c.recheck_requested().await;
            }
            match c.ensure_stream(&self.stream).await? {
                Some(replicas) => {
                    self.warn_if_fragile(c, replicas);
                    self.observe(i, |r, now| r.stream(i, true, now));
                }
                None => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Measures the round trip to cluster `i` every `failover.probe_interval_ms` until `stop`
    /// turns true ([`Cluster::probe`]); feeds the router and sets
    /// `edgerelay_nats_rtt_seconds{cluster}` (NaN when the probe failed).
    async fn probe_rtt(self: Arc<Self>, i: usize, mut stop: Shutdown) {
        let mut tick = tokio::time::interval(ms(self.failover.probe_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.requested() => return,
            }
            self.probe_once(i).await;
        }
    }

    async fn probe_once(&self, i: usize) {
        let c = &self.clusters[i];
        match c.probe(&self.stream.name, ms(self.failover.probe_timeout_ms)).await {
            Probe::Answered(rtt) => {
                c.rtt_gauge.set(rtt.as_secs_f64());
                self.observe(i, |r, now| r.probed(i, rtt, now));
            }
            Probe::Failed => {
                c.rtt_gauge.set(f64::NAN);
                self.observe(i, |r, now| r.failed(i, now));
            }
            Probe::StreamMissing => {
                c.rtt_gauge.set(f64::NAN);
                c.stream_lost();
                self.observe(i, |r, now| r.stream(i, false, now));
            }
        }
    }

    /// Warns when an acknowledged event on this cluster could be lost to a power cut: an R1
    /// stream whose server fsyncs lazily (nats-server's default, every 2 minutes).
    fn warn_if_fragile(&self, c: &Cluster, replicas: usize) {
        if replicas == 1 && !self.stream.server_sync_always {
            tracing::warn!(cluster = %c.name, stream = %self.stream.name,
                "the stream has 1 replica and nats-server fsyncs lazily by default: an acknowledged \
                 event survives a nats-server crash but not a power loss of its host until the next \
                 sync (sync_interval, 2 min by default). Use replicas = 3 in production, or run the \
                 servers with `sync_interval: always` and set stream.server_sync_always = true");
        }
    }

    /// Publishes one ready batch: waits for room in the ack window, sends it, and leaves a
    /// task to await the PubAck, retry, and answer the events.
    pub async fn publish(self: &Arc<Self>, batch: Ready<Pending>) {
        let oldest = batch.items.iter().map(|p| p.enqueued).min().unwrap_or_else(Instant::now);
        // The window may be full of batches JetStream has not answered (NATS slow or dark, and
        // batches past their deadline still being resolved): an event waits for room at most
        // its publish deadline, counted from its enqueue, so the edge is answered in time.
        let room = self.window.clone().acquire_owned();
        let permit = match tokio::time::timeout_at((oldest + self.deadline).into(), room).await {
            Ok(Ok(permit)) => Some(permit),
            Ok(Err(_)) => return, // closed
            Err(_) => None,
        };
        let now = Instant::now();
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let msg_id = self.names.batch(seq);
        let mut events = Vec::with_capacity(batch.items.len());
        let mut replies = Vec::with_capacity(batch.items.len());
        for p in batch.items {
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
        let Some(permit) = permit else {
            if self.spool.is_some() {
                return self.spool_flight(flight).await;
            }
            self.batch_outcome("refused");
            let refusal = Refusal::new(
                ErrorCode::QueueFull,
                format!(
                    "JetStream has not acknowledged the batches in flight for {} ms; retry with the same Idempotency-Key",
                    self.deadline.as_millis()
                ),
            )
            .because("ack_window_full");
            answer_all(flight.replies, refusal);
            return;
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

    /// What answers call the stream, the clusters and the batches.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Batches published and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.window_size as usize - self.window.available_permits()
    }

    /// The NATS client of the active cluster (or the first one while none is usable): for
    /// the audit stream and `tail`-like readers in tests and tools.
    pub fn client(&self) -> &async_nats::Client {
        &self.active_cluster().unwrap_or(&self.clusters[0]).client
    }

    fn batch_outcome(&self, outcome: &'static str) {
        self.metrics.batches.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Publishes `f` to the active cluster.
    async fn send(&self, f: &Flight) -> Attempt {
        let i = self.active.load(Ordering::Relaxed);
        let Some(cluster) = self.clusters.get(i) else { return Err(Failed::NoCluster) };
        let msg = message(&f.msg_id, f.payload.clone(), f.events);
        match cluster.js.send_publish(f.subject.clone(), msg).await {
            Ok(ack) => Ok((i, ack)),
            Err(error) => Err(Failed::Publish { cluster: i, error }),
        }
    }

    async fn complete(&self, mut f: Flight, first: Attempt) {
        let mut attempt = first;
        let mut backoff = self.backoff;
        let mut tries = 1u32;
        // Some attempt reached a cluster: JetStream may have stored the batch.
        let mut maybe_stored = false;
        // The deadline passed and the requests were answered; the batch is being resolved.
        let mut told = false;
        loop {
            maybe_stored |= attempt.is_ok();
            let err = match attempt {
                Ok((cluster, ack)) => match ack.await {
                    Ok(ack) => return self.stored(f, cluster, &ack, tries, told),
                    Err(error) => Failed::Publish { cluster, error },
                },
                Err(e) => e,
            };
            if matches!(err, Failed::NoCluster) && self.spool.is_some() && !told {
                // Nothing could take it now: waiting out the deadline only delays the answer.
                return self.spool_flight(f).await;
            }
            if let Failed::Publish { cluster: i, error } = &err {
                let i = *i;
                if let Some(refusal) = permanent(error) {
                    tracing::warn!(batch = %f.msg_id, %err, "JetStream refused the batch");
                    self.batch_outcome("refused");
                    answer_all(f.replies, refusal);
                    return;
                }
                if error.kind() == PublishErrorKind::StreamNotFound {
                    self.clusters[i].stream_lost();
                    self.observe(i, |r, now| r.stream(i, false, now));
                } else {
                    self.observe(i, |r, now| r.failed(i, now));
                }
            }
            let now = Instant::now();
            if !told && now + backoff >= f.deadline {
                if self.spool.is_some() {
                    tracing::warn!(batch = %f.msg_id, tries, error = %err,
                        "no cluster acknowledged the batch in time: spooling it");
                    return self.spool_flight(f).await;
                }
                self.batch_outcome("timeout");
                let refusal = self.unavailable().unwrap_or_else(|| self.ack_timeout());
                if !maybe_stored {
                    tracing::warn!(batch = %f.msg_id, tries, error = %err, "giving up on batch: never reached a cluster");
                    answer_all(f.replies, refusal);
                    return;
                }
                // The edge's time is up, but the batch may be stored: answer now, and go on
                // publishing it with the same Msg-Id until JetStream says, so that an event
                // retried with its Idempotency-Key waits for this outcome instead of being
                // published a second time.
                tracing::warn!(batch = %f.msg_id, tries, error = %err,
                    "batch not acknowledged in time: answered, still resolving");
                for reply in &mut f.replies {
                    reply.tell(Err(refusal.clone()));
                }
                told = true;
            }
            if told && now >= f.sent + self.resolve_within {
                tracing::warn!(batch = %f.msg_id, tries, error = %err,
                    "giving up on batch: no answer from JetStream within the duplicate window");
                answer_all(f.replies, self.ack_timeout());
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

    fn ack_timeout(&self) -> Refusal {
        Refusal::new(
            ErrorCode::AckTimeout,
            format!(
                "JetStream did not acknowledge within {} ms; retry with the same Idempotency-Key",
                self.deadline.as_millis()
            ),
        )
    }

    /// JetStream on cluster `i` stored the batch: answers its events.
    fn stored(&self, f: Flight, i: usize, ack: &PublishAck, tries: u32, late: bool) {
        let now = Instant::now();
        let took = now.saturating_duration_since(f.sent);
        self.metrics.flush.observe(took.as_secs_f64());
        self.metrics.latency.record(Stage::Flush, took, now);
        self.metrics.published_bytes.inc_by(f.payload.len() as u64);
        self.batch_outcome(if late { "stored_late" } else { "stored" });
        self.observe(i, |r, now| r.acked(i, now));
        if ack.duplicate {
            tracing::debug!(batch = %f.msg_id, tries, "retried batch was already stored");
        }
        // The stream is the configured one: JetStream lets only one stream capture a subject,
        // and the relay checked that this one does.
        for (index, reply) in f.replies.into_iter().enumerate() {
            reply.send(Ok(Ack::Stored(Stored {
                seq: ack.sequence,
                batch: f.seq,
                index: index as u32,
                cluster: i as u8,
                duplicate: false,
            })));
        }
    }

    /// Writes a batch no cluster took to the spool and answers its events `spooled` (ack mode
    /// `spooled`; in `accepted` they were answered at enqueue), or refuses them when the spool
    /// cannot take it (full: 503 with Retry-After).
    async fn spool_flight(&self, f: Flight) {
        let Some(spool) = &self.spool else { return };
        let record = SpoolRecord {
            msg_id: f.msg_id.clone(),
            subject: f.subject.clone(),
            batch: f.payload.clone(),
            events: u32::try_from(f.events).unwrap_or(u32::MAX),
            spooled_unix_ms: unix_ms(),
        };
        match spool.append(&record).await {
            Ok(()) => {
                self.batch_outcome("spooled");
                for reply in f.replies {
                    reply.send(Ok(Ack::Spooled));
                }
            }
            Err(e) => {
                self.batch_outcome("refused");
                let answered = f.replies.first().is_some_and(Reply::answers_request);
                if answered {
                    tracing::warn!(batch = %f.msg_id, error = %e, "cannot spool the batch: refusing its events");
                } else {
                    tracing::error!(batch = %f.msg_id, events = f.events, error = %e,
                        "cannot spool a batch already answered (ack mode accepted): its events are lost");
                }
                answer_all(f.replies, e.refusal());
            }
        }
    }

    /// Publishes what the spool holds, oldest first, with the original Msg-Ids, whenever a
    /// cluster is active; marks each record done on its PubAck (a segment is deleted once all
    /// of its records are). On a failure it starts over from the oldest record not done:
    /// JetStream drops the copies it already has (duplicate window).
    async fn replay(self: Arc<Self>, spool: Arc<Spool>, mut stop: Shutdown) {
        let mut backoff = self.backoff;
        let mut replayed = 0u64;
        loop {
            if spool.is_empty() {
                if replayed > 0 {
                    tracing::info!(batches = replayed, "spool replayed: nothing waits on disk");
                    replayed = 0;
                }
                tokio::select! {
                    _ = spool.appended() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.requested() => return,
                }
                continue;
            }
            let i = self.active.load(Ordering::Relaxed);
            if i == NONE {
                tokio::select! {
                    _ = self.switched.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = stop.requested() => return,
                }
                continue;
            }
            let records = match spool.next_batch(REPLAY_WINDOW).await {
                Ok(r) if r.is_empty() => {
                    // Everything handed out is in flight or done; look again shortly.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the spool");
                    tokio::time::sleep(MAX_BACKOFF).await;
                    continue;
                }
            };
            match self.replay_on(i, &spool, records).await {
                Ok(n) => {
                    replayed += n;
                    backoff = self.backoff;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "spool replay attempt failed; starting over from the oldest");
                    spool.rewind().await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Publishes `records` to cluster `i`, all at once, and marks each acknowledged one done.
    async fn replay_on(
        &self,
        i: usize,
        spool: &Spool,
        records: Vec<Spooled>,
    ) -> Result<u64, PublishError> {
        let js = &self.clusters[i].js;
        let mut acks = Vec::with_capacity(records.len());
        for r in &records {
            let events = r.record.events as usize;
            let msg = message(&r.record.msg_id, r.record.batch.clone(), events);
            acks.push(js.send_publish(r.record.subject.clone(), msg).await);
        }
        let mut replayed = 0;
        let mut failure = None;
        for (r, ack) in records.iter().zip(acks) {
            let result = match ack {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match result {
                Ok(_) => {
                    spool.done(r.id);
                    replayed += 1;
                }
                Err(e) => {
                    if let Some(refusal) = permanent(&e) {
                        // A retry will not change it (e.g. the batch is over max_payload):
                        // replaying it forever would block everything behind it.
                        tracing::error!(batch = %r.record.msg_id, %refusal,
                            "JetStream refuses a spooled batch: dropping it from the spool");
                        spool.done(r.id);
                        continue;
                    }
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            None => {
                self.observe(i, |r, now| r.acked(i, now));
                Ok(replayed)
            }
            Some(e) => {
                self.observe(i, |r, now| r.failed(i, now));
                Err(e)
            }
        }
    }
}

/// The NATS message of a batch: its payload, `Nats-Msg-Id` and the batch headers.
fn message(msg_id: &str, payload: Bytes, events: usize) -> PublishMessage {
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
fn permanent(err: &PublishError) -> Option<Refusal> {
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
}

fn answer_all(replies: Vec<Reply>, refusal: Refusal) {
    for reply in replies {
        reply.send(Err(refusal.clone()));
    }
}
