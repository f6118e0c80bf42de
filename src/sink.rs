//! The sink: publishes batches to JetStream and answers their events when the PubAck comes.
//!
//! [`Sink`] is shared by the batch drivers (which hand it batches through
//! [`batch::driver::Publish`](crate::batch::driver::Publish)), ingest (readiness) and the admin
//! listener (`/debug/clusters`). Its decisions live in sans-IO cores; the other files only
//! move bytes and timers:
//!
//! - [`flight`]: one batch's life — publish, retry with the same `Nats-Msg-Id` (on another
//!   cluster after a failover), tell the edge at the deadline, spool, give up (sans-IO).
//! - [`router`]: which cluster is active — the nearest healthy one, with hysteresis (sans-IO).
//! - [`stream`]: the stream the relay wants, and whether an existing one fits.
//! - [`window`]: the bounded ack window; carries out each batch's [`flight`] and answers it.
//! - [`replay`]: publishes what the disk spool holds once a cluster takes it.
//! - [`connect`]: connecting the clusters, the start-up checks and the background tasks.
//! - [`probe`]: the stream keeper and the round-trip probe of each cluster.
//! - [`cluster`]: one cluster's connection, stream check and round-trip probe.
//! - [`config`]: the `[nats]` and `[stream]` sections of the config file.

pub mod cluster;
pub mod config;
pub mod connect;
pub mod flight;
pub mod probe;
pub mod replay;
pub mod router;
pub mod stream;
pub mod window;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify, Semaphore};

use self::cluster::{Cluster, ConnectionEvent};
use self::config::{FailoverConfig, StreamConfig};
use self::flight::Active;
use self::router::{Reason, Router, Switch};
use crate::error::Refusal;
use crate::event::Names;
use crate::metrics::{FailoverLabels, Metrics};
use crate::spool::Spool;

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
    /// The rules every batch's [`flight::Flight`] follows.
    flight: flight::Params,
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

impl Sink {
    /// Some cluster is usable: events can be taken in.
    pub fn is_ready(&self) -> bool {
        self.active.load(Ordering::Relaxed) != NONE
    }

    /// Why events cannot be taken in now, if they cannot.
    pub fn unavailable(&self) -> Option<Refusal> {
        if self.spool.is_some() {
            return None; // with a spool, what no cluster takes waits on disk
        }
        self.active_now().refusal()
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

    /// What answers call the stream, the clusters and the batches.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The NATS client of the active cluster (or the first one while none is usable): for
    /// the audit stream and `tail`-like readers in tests and tools.
    pub fn client(&self) -> &async_nats::Client {
        &self.active_cluster().unwrap_or(&self.clusters[0]).client
    }

    /// The cluster batches go to now.
    fn active_cluster(&self) -> Option<&Cluster> {
        self.clusters.get(self.active.load(Ordering::Relaxed))
    }

    /// Where batches can go now, as a [`flight::Flight`] wants to know it.
    /// The last round trip probed to the cluster batches go to (none before the first probe,
    /// after a failed one, or with no cluster usable).
    pub fn round_trip(&self) -> Option<Duration> {
        let Active::Cluster(i) = self.active_now() else { return None };
        let secs = self.clusters[i].rtt_gauge.get();
        (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
    }

    fn active_now(&self) -> Active {
        let i = self.active.load(Ordering::Relaxed);
        if i < self.clusters.len() {
            Active::Cluster(i)
        } else if self.clusters.iter().any(Cluster::is_connected) {
            Active::NoStream
        } else {
            Active::NoServer
        }
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
}
