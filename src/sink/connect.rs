//! Bringing the sink up: connecting to every configured cluster, the start-up checks (stream,
//! first round trip, the active cluster), and the background tasks that keep the clusters'
//! state current ([`Sink::spawn_services`]).

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;

use super::cluster::Cluster;
use super::config::{NatsConfig, StreamConfig};
use super::flight;
use super::router::{Params, Router};
use super::{Sink, SinkError, NONE};
use crate::event::Names;
use crate::metrics::Metrics;
use crate::section::ms;
use crate::shutdown::Shutdown;
use crate::spool::Spool;

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
            flight: flight::Params {
                deadline: ms(nats.publish_deadline_ms),
                resolve_within: ms(stream.duplicate_window_ms),
                backoff: ms(nats.retry_backoff_ms),
                spool: spool.is_some(),
            },
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
}
