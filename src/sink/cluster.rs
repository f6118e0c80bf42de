//! One NATS cluster: its connection, its JetStream context, the check of its stream, and the
//! round-trip probe. Which cluster gets a batch is the [`super::router`]'s business.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::{self, Context};
use async_nats::Event;
use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, Notify};

use super::config::{ClusterConfig, NatsConfig, StreamConfig};
use super::stream;
use super::SinkError;
use crate::metrics::{ClusterLabels, Metrics};
use crate::section::ms;

/// What a cluster's connection reports to the sink.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionEvent {
    pub cluster: usize,
    pub connected: bool,
}

/// One configured cluster.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub region: String,
    pub client: async_nats::Client,
    pub js: Context,
    /// The stream was found or created on this cluster and matches the config.
    stream_ok: AtomicBool,
    /// Asks the stream keeper to check the stream again (e.g. after "no stream found").
    recheck: Notify,
    pub rtt_gauge: Gauge<f64, AtomicU64>,
    pub active_gauge: Gauge,
    pub healthy_gauge: Gauge,
}

/// What a probe found.
#[derive(Debug)]
pub enum Probe {
    /// JetStream answered the stream's INFO after this long.
    Answered(Duration),
    /// No answer in time, an error answer, or no connection.
    Failed,
    /// JetStream answered that the stream does not exist (it was deleted, or the cluster
    /// lost its state).
    StreamMissing,
}

impl Cluster {
    /// Connects to cluster number `index`. Returns at once even if no server answers yet: the
    /// client keeps trying, and reports connection changes on `events`.
    pub async fn connect(
        index: usize,
        cfg: &ClusterConfig,
        nats: &NatsConfig,
        events: mpsc::UnboundedSender<ConnectionEvent>,
        metrics: &Metrics,
    ) -> Result<Self, SinkError> {
        let options_err = |e: String| SinkError::Options { cluster: cfg.name.clone(), message: e };
        let mut opts = match &cfg.creds_file {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| options_err(format!("{}: {e}", path.display())))?,
            None => async_nats::ConnectOptions::new(),
        };
        if let (Some(user), Some(pass)) = (&cfg.user, &cfg.password) {
            opts = opts.user_and_password(user.clone(), pass.clone());
        }
        if let Some(token) = &cfg.token {
            opts = opts.token(token.clone());
        }
        if let Some(path) = &cfg.nkey_seed_file {
            let seed = std::fs::read_to_string(path)
                .map_err(|e| options_err(format!("{}: {e}", path.display())))?;
            opts = opts.nkey(seed.trim().to_owned());
        }
        if let Some(ca) = &cfg.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
            opts = opts.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
        }
        let name = cfg.name.clone();
        let opts = opts
            .name(&nats.client_name)
            .connection_timeout(ms(nats.connect_timeout_ms))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((50u64 << attempt.min(5)).min(1_000))
            })
            .event_callback(move |event| {
                let events = events.clone();
                let name = name.clone();
                async move {
                    tracing::info!(cluster = %name, %event, "nats connection event");
                    let connected = match event {
                        Event::Connected => true,
                        Event::Disconnected | Event::Closed => false,
                        _ => return,
                    };
                    let _ = events.send(ConnectionEvent { cluster: index, connected });
                }
            });
        let client =
            opts.connect(cfg.urls.as_slice()).await.map_err(|e| options_err(e.to_string()))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(ms(nats.ack_timeout_ms))
            .max_ack_inflight(nats.max_inflight_batches * 2)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let labels = ClusterLabels { cluster: cfg.name.clone() };
        Ok(Self {
            name: cfg.name.clone(),
            region: cfg.region.clone(),
            client,
            js,
            stream_ok: AtomicBool::new(false),
            recheck: Notify::new(),
            rtt_gauge: metrics.nats_rtt.get_or_create(&labels).clone(),
            active_gauge: metrics.nats_active_cluster.get_or_create(&labels).clone(),
            healthy_gauge: metrics.nats_cluster_healthy.get_or_create(&labels).clone(),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    pub fn stream_ok(&self) -> bool {
        self.stream_ok.load(Ordering::Relaxed)
    }

    /// A publish said the stream is gone: mark it and have the keeper look again.
    pub fn stream_lost(&self) {
        self.stream_ok.store(false, Ordering::Relaxed);
        self.recheck.notify_one();
    }

    /// Creates the stream if it is missing, or checks that the existing one fits.
    /// `Ok(None)`: NATS could not be asked now (try again later). `Ok(Some(replicas))`: the
    /// stream is good; its replica count is for the durability warning.
    pub async fn ensure_stream(&self, want: &StreamConfig) -> Result<Option<usize>, SinkError> {
        let name = &want.name;
        let existing = match self.js.get_stream(name).await {
            Ok(mut s) => match s.info().await {
                Ok(info) => Some(info.config.clone()),
                Err(e) => {
                    tracing::debug!(cluster = %self.name, error = %e, "stream info failed");
                    return Ok(None);
                }
            },
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    None
                }
                _ => {
                    tracing::debug!(cluster = %self.name, error = %e, "stream lookup failed");
                    return Ok(None);
                }
            },
        };
        let replicas = match existing {
            Some(config) => {
                let conflicts = stream::conflicts(&config, want);
                if !conflicts.is_empty() {
                    return Err(SinkError::StreamConflict {
                        cluster: self.name.clone(),
                        stream: name.clone(),
                        conflicts,
                    });
                }
                config.num_replicas.max(1)
            }
            None if !want.create => {
                return Err(SinkError::StreamMissing {
                    cluster: self.name.clone(),
                    stream: name.clone(),
                })
            }
            None => match self.js.create_stream(stream::spec(want)).await {
                Ok(_) => {
                    tracing::info!(cluster = %self.name, stream = %name, "created stream");
                    want.replicas
                }
                Err(e) => match e.kind() {
                    CreateStreamErrorKind::JetStream(j) => {
                        return Err(SinkError::StreamCreate {
                            cluster: self.name.clone(),
                            stream: name.clone(),
                            message: j.to_string(),
                        })
                    }
                    _ => {
                        tracing::debug!(cluster = %self.name, error = %e, "stream create failed");
                        return Ok(None);
                    }
                },
            },
        };
        self.stream_ok.store(true, Ordering::Relaxed);
        Ok(Some(replicas))
    }

    /// Resolves when the stream should be checked again.
    pub async fn recheck_requested(&self) {
        self.recheck.notified().await
    }

    /// Times a JetStream API request the relay's NATS user may already send (the stream's
    /// INFO) from send to answer: the network round trip plus the server's handling of a
    /// small API request (microseconds when healthy). async-nats has no public PING/PONG
    /// timer (nats.rs#909), and `flush()` only writes the socket. An error answer (JetStream
    /// down, stream missing) is a failure.
    pub async fn probe(&self, stream: &str, timeout: Duration) -> Probe {
        if !self.is_connected() {
            return Probe::Failed;
        }
        let started = Instant::now();
        let request = self.client.request(format!("$JS.API.STREAM.INFO.{stream}"), Bytes::new());
        match tokio::time::timeout(timeout, request).await {
            Ok(Ok(msg)) => {
                let took = started.elapsed();
                let answer = serde_json::from_slice::<serde_json::Value>(&msg.payload);
                let error = answer.as_ref().ok().map(|v| v.get("error"));
                match error {
                    Some(None) => Probe::Answered(took),
                    Some(Some(e)) if e.get("err_code").and_then(|c| c.as_u64()) == Some(10059) => {
                        Probe::StreamMissing
                    }
                    _ => {
                        tracing::debug!(cluster = %self.name, "probe: JetStream answered with an error");
                        Probe::Failed
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(cluster = %self.name, error = %e, "probe failed");
                Probe::Failed
            }
            Err(_) => Probe::Failed,
        }
    }
}
