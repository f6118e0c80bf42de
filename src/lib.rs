//! edgerelay: a regional relay from CDN edge code to NATS JetStream.
//!
//! Edge functions send small events over HTTPS; the relay authenticates and authorizes them,
//! coalesces them into protobuf batches on lock-free queues, publishes each batch to
//! JetStream, and answers every event once JetStream has acknowledged its batch.
//!
//! # Layout
//!
//! The folders follow the data path of `DESIGN.md`:
//!
//! | step | where |
//! |---|---|
//! | TLS, HTTP/1.1 + HTTP/2, request decoding | [`ingest::https`] (with [`tls`]) |
//! | authentication, publish rules | [`auth`] (subjects and patterns in [`subject`]) |
//! | validation, idempotency, enqueue, waiting for the answer | [`ingest`] |
//! | sharded bounded queues, per-subject batching (sans-IO) | [`batch`] |
//! | nearest healthy NATS cluster, failover, JetStream publish, ack window, retries, answers | [`sink`] |
//! | batches kept on disk while no NATS cluster takes them | [`spool`] |
//! | health, readiness, `/metrics`, `/debug/latency` | [`admin`] |
//! | metric names, exact latency percentiles (HdrHistogram) | [`metrics`] |
//! | readiness, watchdog and socket activation under systemd | [`systemd`] |
//! | live reload of certificates, auth and batch parameters (SIGHUP) | [`reload`] |
//!
//! [`event`] is what travels along the path; [`error`] is how refusals are told; [`config`] is
//! the one configuration file. [`Relay`] wires it all together; `main.rs` only parses the
//! command line.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod batch;
pub mod config;
pub mod error;
pub mod event;
pub mod ingest;
pub mod metrics;
pub mod reload;
pub mod shutdown;
pub mod sink;
pub mod spool;
pub mod subject;
pub mod systemd;
pub mod tls;

/// The protobuf messages of `proto/edgerelay/v1` (the `edgerelay-proto` crate).
pub use edgerelay_proto as proto;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admin::Health;
use crate::audit::Audit;
use crate::auth::Auth;
use crate::batch::queue::Queues;
use crate::config::{ms, Config};
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::reload::{ReloadError, Reloaded};
use crate::sink::{Sink, SinkError};
use crate::systemd::{Notifier, Systemd};

/// Why the relay could not start (or had to stop).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Certificate or key unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The QUIC endpoint could not be set up.
    #[error(transparent)]
    Quic(#[from] ingest::quic::QuicError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// NATS options or the stream are wrong.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The authentication stage could not be set up.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// The disk spool could not be opened (unwritable directory, locked by another relay).
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
}

/// A running relay.
pub struct Relay {
    https_addr: SocketAddr,
    quic_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    stop: shutdown::Trigger,
    queues: Arc<Queues>,
    sink: Arc<Sink>,
    spool: Option<Arc<spool::Spool>>,
    health: Arc<Health>,
    /// Front-ends: they finish answering during a drain.
    servers: Vec<JoinHandle<()>>,
    drivers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    fatal: mpsc::Receiver<SinkError>,
    grace: Duration,
    /// systemd's notification socket, for `STOPPING=1`.
    notifier: Option<Arc<Notifier>>,
    /// What a reload can change, and the config it is compared against.
    live: Live,
}

/// The parts of a running relay a reload swaps.
struct Live {
    /// Held for a whole reload, so reloads never overlap.
    current: tokio::sync::Mutex<Current>,
    cert: Arc<tls::CertSlot>,
    clients: Arc<tls::ClientCerts>,
    ingest: Arc<Ingest>,
    metrics: Arc<Metrics>,
    batching: watch::Sender<batch::driver::Batching>,
    stop: shutdown::Shutdown,
}

/// The config in effect, and the task started for it.
struct Current {
    /// A reload compares the new config with it.
    config: Config,
    /// The task keeping the identity provider's keys current, when JWTs are configured.
    keys_refresh: Option<JoinHandle<()>>,
}

/// What a shutdown achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Every queued event was handed to JetStream and every batch answered in time.
    pub complete: bool,
}

impl Relay {
    /// Binds the listeners, connects to NATS, checks the stream, and starts serving.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        Self::start_with(config, Systemd::default()).await
    }

    /// [`Relay::start`] under systemd: takes the listeners it passed (binding the others),
    /// and notifies it of readiness, health and liveness (see [`systemd`]).
    pub async fn start_with(config: Config, systemd: Systemd) -> Result<Self, StartError> {
        let Systemd { notifier, watchdog, sockets } = systemd;
        let boot_id = boot_id();
        let metrics = Arc::new(Metrics::new());
        let spool = match config.spool.enabled {
            true => Some(Arc::new(open_spool(config.spool.clone(), metrics.clone()).await?)),
            false => None,
        };
        let sink = Sink::connect(
            &config.nats,
            &config.stream,
            &config.relay.id,
            &boot_id,
            spool.clone(),
            metrics.clone(),
        )
        .await?;
        sink.start(ms(config.nats.connect_timeout_ms)).await?;
        let (fatal_tx, fatal) = mpsc::channel(1);

        let queues = Arc::new(Queues::new(config.shards(), config.batch.queue_capacity));
        let auth = Arc::new(Auth::new(&config.auth, metrics.clone())?);
        let (audit, audit_queue) = Audit::new(&config.audit, &config.relay.id, metrics.clone());
        let audit = Arc::new(audit);
        let ingest = Arc::new(Ingest::new(
            &config,
            auth.clone(),
            audit.clone(),
            metrics.clone(),
            queues.clone(),
            sink.clone(),
        ));
        let health =
            Arc::new(Health::new(sink.clone(), ingest.clone(), metrics.clone(), queues.clone()));
        let (stop, stop_rx) = shutdown::channel();
        let mut background = sink.spawn_services(stop_rx.clone(), fatal_tx);
        if let Some(queue) = audit_queue {
            let client = sink.client().clone();
            background.push(tokio::spawn(audit::run(
                audit,
                queue,
                client,
                config.audit.clone(),
                stop_rx.clone(),
            )));
        }
        let keys_refresh = match auth.key_store() {
            Some(keys) => {
                if let Err(e) = keys.load().await {
                    tracing::warn!(error = %e, "identity provider keys not loaded: refusing tokens (503) until they are");
                }
                Some(tokio::spawn(keys.refresh(stop_rx.clone())))
            }
            None => None,
        };

        let cert = tls::CertSlot::load(&config.https.tls_cert, &config.https.tls_key)?;
        let clients = tls::ClientCerts::load(client_ca(&config))?;
        let tls = tls::server_config(cert.clone(), clients.clone(), &ingest::https::ALPN)?;
        let bind_err = |addr| move |source| StartError::Bind { addr, source };
        let api =
            Arc::new(ingest::http_api::HttpApi::new(ingest.clone(), config.https.max_body_bytes));
        let https = match sockets.https {
            Some(l) => ingest::https::Server::from_std(l, &config.https, tls, api.clone()),
            None => ingest::https::Server::bind(&config.https, tls, api.clone()).await,
        }
        .map_err(bind_err(config.https.listen))?;
        if config.quic.listen.is_none() && sockets.quic.is_some() {
            tracing::warn!(
                "systemd passed a quic socket but quic.listen is not set: QUIC stays off"
            );
        }
        let quic = match config.quic.listen {
            Some(listen) => {
                let tls = tls::server_config(
                    cert.clone(),
                    clients.clone(),
                    &[ingest::quic::ALPN_EDGERELAY, ingest::quic::ALPN_H3],
                )?;
                let ingest = ingest.clone();
                Some(match sockets.quic {
                    Some(s) => ingest::quic::Server::on_socket(&config.quic, s, tls, ingest, api)?,
                    None => ingest::quic::Server::bind(&config.quic, listen, tls, ingest, api)?,
                })
            }
            None => None,
        };
        let quic_addr = match &quic {
            Some(q) => Some(q.local_addr().map_err(bind_err(config.https.listen))?),
            None => None,
        };
        let https_addr = https.local_addr().map_err(bind_err(config.https.listen))?;
        let admin_listener = match sockets.admin {
            Some(l) => admin::from_std(l),
            None => admin::bind(config.admin.listen).await,
        }
        .map_err(bind_err(config.admin.listen))?;
        let admin_addr = admin_listener.local_addr().map_err(bind_err(config.admin.listen))?;

        let (batching, batching_rx) = watch::channel(batching_of(&config));
        let wedge = std::env::var(batch::driver::FAULT_WEDGE_FLUSH_ENV).is_ok_and(|v| v == "1");
        if wedge {
            tracing::warn!(
                "{}=1: test hook on, the batch drivers will wedge after their first batch",
                batch::driver::FAULT_WEDGE_FLUSH_ENV
            );
        }
        let options = batch::driver::Options {
            heartbeat: systemd::notify::heartbeat_tick(watchdog),
            wedge_after_first_batch: wedge,
        };
        let heartbeats =
            Arc::new(batch::driver::Heartbeats::new(queues.shard_count(), Instant::now()));
        let drivers = (0..queues.shard_count())
            .map(|i| {
                tokio::spawn(batch::driver::run(
                    queues.clone(),
                    i,
                    options,
                    batching_rx.clone(),
                    sink.clone(),
                    heartbeats.clone(),
                    stop_rx.clone(),
                ))
            })
            .collect();
        let admin = tokio::spawn(admin::serve(admin_listener, health.clone(), stop_rx.clone()));
        let mut servers = vec![tokio::spawn(https.serve(stop_rx.clone()))];
        if let Some(q) = quic {
            servers.push(tokio::spawn(q.serve(stop_rx.clone())));
        }
        health.listening.store(true, Ordering::Relaxed);
        let notifier = notifier.map(Arc::new);
        if let Some(n) = &notifier {
            if let Some(w) = watchdog {
                let deadline = ms(config.nats.publish_deadline_ms);
                if w <= deadline {
                    tracing::warn!(watchdog_ms = w.as_millis() as u64, publish_deadline_ms = config.nats.publish_deadline_ms,
                        "WatchdogSec is not above nats.publish_deadline_ms: a driver waiting for the ack window may be taken for stuck");
                }
            }
            let watch = systemd::notify::Watch {
                health: health.clone(),
                heartbeats,
                spool: spool.clone(),
                watchdog,
            };
            background.push(tokio::spawn(systemd::notify::run(n.clone(), watch)));
        }
        tracing::info!(%https_addr, ?quic_addr, %admin_addr, relay = %config.relay.id, boot = %boot_id,
            ack_mode = ?config.relay.ack_mode, "edgerelay serving");
        Ok(Self {
            https_addr,
            quic_addr,
            admin_addr,
            stop,
            queues,
            sink,
            spool,
            health,
            servers,
            drivers,
            background: {
                background.push(admin);
                background
            },
            fatal,
            grace: ms(config.relay.shutdown_grace_ms),
            notifier,
            live: Live {
                current: tokio::sync::Mutex::new(Current { config, keys_refresh }),
                cert,
                clients,
                ingest,
                metrics,
                batching,
                stop: stop_rx,
            },
        })
    }

    /// Applies a new (validated) config to the running relay without closing a connection: a
    /// new certificate and client CA for new TLS handshakes, a new authentication stage for new
    /// requests, new batch limits for the drivers' next round. When `auth.jwt` changes where or
    /// how keys are fetched, the new identity provider's keys are loaded first. If any field
    /// that only takes effect at start-up differs (see [`reload`]), or the new certificate,
    /// CA, auth settings or keys are unusable, nothing is applied and the relay keeps its
    /// previous config.
    pub async fn reload(&self, new: Config) -> Result<Reloaded, ReloadError> {
        let live = &self.live;
        let mut current = live.current.lock().await;
        let (fields, restart) = reload::diff(&current.config, &new);
        if !restart.is_empty() {
            return Err(ReloadError::Restart(restart));
        }
        // Everything that can fail comes before the first swap.
        let old = live.ingest.auth();
        let auth = Arc::new(old.reloaded(&new.auth, live.metrics.clone())?);
        let kept =
            |k: &Arc<auth::idp::KeyStore>| old.key_store().is_some_and(|o| Arc::ptr_eq(&o, k));
        let new_keys = auth.key_store().filter(|k| !kept(k));
        if let Some(keys) = &new_keys {
            keys.load().await.map_err(ReloadError::Keys)?;
        }
        let clients = tls::ClientCerts::verifier(client_ca(&new))?;
        let certificate = live.cert.reload(&new.https.tls_cert, &new.https.tls_key)?;
        live.clients.store(clients);
        if new_keys.is_some() || auth.key_store().is_none() {
            if let Some(task) = current.keys_refresh.take() {
                task.abort();
            }
            current.keys_refresh = new_keys.map(|k| tokio::spawn(k.refresh(live.stop.clone())));
        }
        live.ingest.set_auth(auth);
        live.batching.send_replace(batching_of(&new));
        current.config = new;
        Ok(Reloaded { fields, certificate })
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// The QUIC (UDP) address, when `quic.listen` is set.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Resolves when the relay cannot go on (the stream conflicts with the config).
    pub async fn fatal(&mut self) -> SinkError {
        match self.fatal.recv().await {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }

    /// Drains: refuses new events, flushes every queued batch, waits for their acks (within
    /// the grace period), lets connections finish their answers, then stops.
    pub async fn shutdown(self) -> Drained {
        let deadline = Instant::now() + self.grace;
        let left = || deadline.saturating_duration_since(Instant::now());
        self.health.draining.store(true, Ordering::Relaxed);
        if let Some(n) = &self.notifier {
            n.send("STOPPING=1\nSTATUS=draining");
        }
        self.queues.close();
        self.stop.signal();
        let queued = self.queues.depth();
        tracing::info!(queued, in_flight = self.sink.in_flight(), "draining");
        let mut complete = true;
        for d in self.drivers {
            complete &= tokio::time::timeout(left(), d).await.is_ok();
        }
        complete &= self.sink.wait_idle(left()).await;
        // Connections finish writing their answers; an idle one closes at once.
        let _ = tokio::time::timeout(
            left().max(Duration::from_millis(200)),
            futures::future::join_all(self.servers),
        )
        .await;
        for t in self.background {
            t.abort();
        }
        if let Some(t) = self.live.current.lock().await.keys_refresh.take() {
            t.abort();
        }
        if let Some(spool) = &self.spool {
            spool.close().await;
            if !spool.is_empty() {
                tracing::info!(
                    batches = spool.len(),
                    bytes = spool.bytes(),
                    "spooled batches stay on disk for the next start"
                );
            }
        }
        if complete {
            tracing::info!("drained");
        } else {
            tracing::warn!(
                queued = self.queues.depth(),
                in_flight = self.sink.in_flight(),
                "grace period over before everything was acknowledged"
            );
        }
        Drained { complete }
    }
}

/// Runs the relay (under `systemd`, when it started it) until `shutdown` resolves, then
/// drains it. Each config from `reloads` is applied with [`Relay::reload`]; a refused one is
/// logged and the relay goes on as it was.
pub async fn run(
    config: Config,
    systemd: Systemd,
    shutdown: impl Future<Output = ()>,
    mut reloads: mpsc::Receiver<Config>,
) -> Result<Drained, StartError> {
    let mut relay = Relay::start_with(config, systemd).await?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(relay.shutdown().await),
            e = relay.fatal() => {
                tracing::error!(error = %e, "stopping");
                relay.shutdown().await;
                return Err(e.into());
            }
            Some(new) = reloads.recv() => match relay.reload(new).await {
                Ok(r) => tracing::info!(changed = %r, "config reloaded"),
                Err(e) => tracing::error!(error = %e, "config reload refused: still running on the previous config"),
            },
        }
    }
}

/// The CA client certificates must chain to, when mTLS is on.
fn client_ca(config: &Config) -> Option<&std::path::Path> {
    config.auth.mtls.as_ref().map(|m| m.ca_file.as_path())
}

/// The batch parameters a driver follows, from `config`.
fn batching_of(config: &Config) -> batch::driver::Batching {
    batch::driver::Batching {
        limits: batch::Limits {
            max_events: config.batch.max_events,
            max_bytes: config.batch.max_bytes,
            linger: ms(config.batch.linger_ms),
        },
        flush_when_idle: config.batch.flush_when_idle,
    }
}

/// Opens the spool (off the runtime: it reads every segment once) and logs what it
/// recovered (after a crash: a torn tail cut off, damaged records skipped).
async fn open_spool(
    cfg: config::SpoolConfig,
    metrics: Arc<Metrics>,
) -> Result<spool::Spool, spool::SpoolError> {
    let dir = cfg.dir.clone();
    let (spool, recovery) = tokio::task::spawn_blocking(move || spool::Spool::open(&cfg, metrics))
        .await
        .map_err(|e| spool::SpoolError::Io {
            op: "open",
            path: dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })??;
    if recovery.torn_bytes > 0 || recovery.corrupt_records > 0 {
        tracing::warn!(dir = %dir.display(), %recovery, "spool recovered with damage");
    } else if recovery.records > 0 {
        // A backlog from the last run (a crash, or a stop while no cluster took batches).
        tracing::warn!(dir = %dir.display(), %recovery, "spool recovered: replaying when a cluster is up");
    }
    Ok(spool)
}

/// A random id for this process start, so batch ids never repeat across restarts.
fn boot_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 6];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
