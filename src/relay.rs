//! The running relay, start to stop. [`Relay::start_with`] builds the parts (`build`: sink,
//! ingest, front-ends, drivers), then spawns every task in one place into one task set that
//! knows each task's phase (`tasks`); [`Relay::shutdown`] drains them in a fixed order;
//! [`Relay::reload`] ([`reload`]) swaps what a new config may change. [`run`] is the whole life
//! as `main.rs` lives it.

mod build;
pub mod reload;
mod tasks;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use self::reload::{Current, Live};
use self::tasks::{Phase, Tasks};
use crate::admin::{self, Health};
use crate::auth::Auth;
use crate::batch::queue::Queues;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::section::ms;
use crate::shutdown::{self, Shutdown, Trigger};
use crate::sink::{Sink, SinkError};
use crate::spool::Spool;
use crate::systemd::{self, Notifier, Systemd};
use crate::{audit, auth, batch, ingest, spool, tls};

/// How long front-ends get to write their answers in a drain, even when the grace period is
/// used up.
const ANSWER_TIME: Duration = Duration::from_millis(200);

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
    /// The operating system's random number generator failed, so no boot id (or no queue shard
    /// key) could be drawn. Starting with a fixed boot id would repeat an earlier run's
    /// `Nats-Msg-Id`s, and JetStream would drop the new batches as duplicates; a fixed shard key
    /// would let clients aim their subjects at another tenant's shard.
    #[error(
        "the operating system's random number generator failed: cannot draw a boot id \
         (a fixed one would make JetStream drop new batches as duplicates of an earlier run's) \
         or the queues' shard key"
    )]
    Random,
}

/// A running relay.
pub struct Relay {
    https_addr: SocketAddr,
    quic_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    stop: Trigger,
    queues: Arc<Queues>,
    sink: Arc<Sink>,
    spool: Option<Arc<Spool>>,
    health: Arc<Health>,
    tasks: Tasks,
    fatal: mpsc::Receiver<SinkError>,
    grace: Duration,
    /// systemd's notification socket, for `STOPPING=1`.
    notifier: Option<Arc<Notifier>>,
    /// What a reload can change, and the config it is compared against.
    live: Live,
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
        let boot_id = build::boot_id()?;
        let metrics = Arc::new(Metrics::new());
        let upstream = build::sink(&config, &boot_id, &metrics).await?;
        let stage = build::ingest(&config, &upstream, &metrics)?;
        let front = build::front_ends(&config, &stage.ingest, sockets).await?;
        let drivers = build::drivers(&config, stage.queues.shard_count(), watchdog);

        // Spawning: every task of the relay, with its phase.
        let (stop, shutdown) = shutdown::channel();
        let (fatal_tx, fatal) = mpsc::channel(1);
        let mut tasks = Tasks::default();
        let sink = upstream.sink;
        tasks.adopt(Phase::Background, sink.spawn_services(shutdown.clone(), fatal_tx));
        // Without a queue (`audit.enabled` off) it still writes the log lines that are due.
        let (audit, client) = (stage.audit, sink.client().clone());
        let queue = stage.audit_queue;
        let run = audit::run(audit, queue, client, config.audit.clone(), shutdown.clone());
        tasks.spawn(Phase::Background, run);
        let keys_refresh = keys_refresh(&stage.auth, &shutdown).await;
        let queues = stage.queues;
        for shard in 0..queues.shard_count() {
            let run = batch::driver::run(
                queues.clone(),
                shard,
                drivers.options,
                drivers.batching.subscribe(),
                sink.clone(),
                drivers.heartbeats.clone(),
                shutdown.clone(),
            );
            tasks.spawn(Phase::Driver, run);
        }
        let health = stage.health;
        tasks.spawn(Phase::Background, admin::serve(front.admin, health.clone(), shutdown.clone()));
        tasks.spawn(Phase::FrontEnd, front.https.serve(shutdown.clone()));
        if let Some(q) = front.quic {
            tasks.spawn(Phase::FrontEnd, q.serve(shutdown.clone()));
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
                heartbeats: drivers.heartbeats,
                spool: upstream.spool.clone(),
                watchdog,
            };
            tasks.spawn(Phase::Background, systemd::notify::run(n.clone(), watch));
        }
        let (https_addr, quic_addr, admin_addr) =
            (front.https_addr, front.quic_addr, front.admin_addr);
        tracing::info!(%https_addr, ?quic_addr, %admin_addr, relay = %config.relay.id, boot = %boot_id,
            ack_mode = ?config.relay.ack_mode, "edgerelay serving");
        Ok(Self {
            https_addr,
            quic_addr,
            admin_addr,
            stop,
            queues,
            sink,
            spool: upstream.spool,
            health,
            tasks,
            fatal,
            grace: ms(config.relay.shutdown_grace_ms),
            notifier,
            live: Live {
                current: tokio::sync::Mutex::new(Current { config, keys_refresh }),
                cert: front.cert,
                clients: front.clients,
                ingest: stage.ingest,
                metrics,
                batching: drivers.batching,
                stop: shutdown,
            },
        })
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
    pub async fn shutdown(mut self) -> Drained {
        let deadline = Instant::now() + self.grace;
        self.health.draining.store(true, Ordering::Relaxed);
        if let Some(n) = &self.notifier {
            n.send("STOPPING=1\nSTATUS=draining");
        }
        self.queues.close();
        self.stop.signal();
        let queued = self.queues.depth();
        tracing::info!(queued, in_flight = self.sink.in_flight(), "draining");
        let mut complete = self.tasks.join(Phase::Driver, deadline).await;
        complete &= self.sink.wait_idle(deadline.saturating_duration_since(Instant::now())).await;
        // Connections finish writing their answers; an idle one closes at once.
        self.tasks.join(Phase::FrontEnd, deadline.max(Instant::now() + ANSWER_TIME)).await;
        self.tasks.abort(Phase::Background);
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

/// Loads the identity provider's keys, when JWTs are configured, and starts the task that
/// keeps them current (until `shutdown`). Tokens are refused (503) until keys are loaded.
async fn keys_refresh(auth: &Auth, shutdown: &Shutdown) -> Option<tokio::task::JoinHandle<()>> {
    let keys = auth.key_store()?;
    if let Err(e) = keys.load().await {
        tracing::warn!(error = %e, "identity provider keys not loaded: refusing tokens (503) until they are");
    }
    Some(tokio::spawn(keys.refresh(shutdown.clone())))
}
