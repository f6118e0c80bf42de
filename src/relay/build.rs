//! Building the relay's parts, one short function per part, before anything is spawned (as
//! linkerd's `Config::build` comes before `App::spawn`): a part opens, connects, loads and
//! binds, but starts no task, so a part that fails leaves nothing running behind it.
//!
//! In data-path order: [`sink`] (spool, NATS, the stream), [`ingest`] (queues, auth, audit,
//! the ingest stage, health), [`front_ends`] (TLS, HTTPS, QUIC + HTTP/3, admin), [`drivers`]
//! (what the batch drivers follow). [`crate::Relay::start_with`] spawns them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::StartError;
use crate::admin::{self, Health};
use crate::audit::{self, Audit};
use crate::auth::Auth;
use crate::batch::driver::{self, Batching, Heartbeats, Options};
use crate::batch::queue::{Bounds, Queues, ShardKey};
use crate::config::Config;
use crate::ingest::{self, Ingest};
use crate::metrics::Metrics;
use crate::section::ms;
use crate::sink::Sink;
use crate::spool::config::SpoolConfig;
use crate::spool::{Spool, SpoolError};
use crate::systemd::listen::Inherited;
use crate::{batch, systemd, tls};

/// The way out: NATS, with the spool behind it.
pub struct Upstream {
    pub sink: Arc<Sink>,
    pub spool: Option<Arc<Spool>>,
}

/// The protocol-independent stage and what it feeds.
pub struct Stage {
    pub queues: Arc<Queues>,
    pub auth: Arc<Auth>,
    pub audit: Arc<Audit>,
    /// Audit records to publish, when `[audit]` is on.
    pub audit_queue: Option<mpsc::Receiver<audit::Record>>,
    pub ingest: Arc<Ingest>,
    pub health: Arc<Health>,
}

/// The listeners, bound, and the certificate slots a reload swaps.
pub struct FrontEnds {
    pub https: ingest::https::Server,
    pub quic: Option<ingest::quic::Server>,
    pub admin: TcpListener,
    pub cert: Arc<tls::CertSlot>,
    pub clients: Arc<tls::ClientCerts>,
    pub https_addr: SocketAddr,
    pub quic_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
}

/// What the batch drivers follow: the batch parameters (a reload sends new ones), the test
/// hooks, and the heartbeats the watchdog reads.
pub struct Drivers {
    pub batching: watch::Sender<Batching>,
    pub options: Options,
    pub heartbeats: Arc<Heartbeats>,
}

/// Opens the spool (when on), connects to NATS and checks the stream.
pub async fn sink(
    config: &Config,
    boot_id: &str,
    metrics: &Arc<Metrics>,
) -> Result<Upstream, StartError> {
    let spool = match config.spool.enabled {
        true => Some(Arc::new(open_spool(config.spool.clone(), metrics.clone()).await?)),
        false => None,
    };
    let sink = Sink::connect(
        &config.nats,
        &config.stream,
        &config.relay.id,
        boot_id,
        spool.clone(),
        metrics.clone(),
    )
    .await?;
    sink.start(ms(config.nats.connect_timeout_ms)).await?;
    Ok(Upstream { sink, spool })
}

/// The queues, authentication, audit and the ingest stage in front of `upstream`.
pub fn ingest(
    config: &Config,
    upstream: &Upstream,
    metrics: &Arc<Metrics>,
) -> Result<Stage, StartError> {
    let sink = &upstream.sink;
    let bounds =
        Bounds { events: config.batch.queue_capacity, bytes: config.batch.queue_max_bytes };
    let queues = Arc::new(Queues::new(config.batch.shard_count(), bounds, shard_key()?));
    let auth = Arc::new(Auth::new(&config.auth, metrics.clone())?);
    let (audit, audit_queue) = Audit::new(&config.audit, &config.relay.id, metrics.clone());
    let audit = Arc::new(audit);
    let ingest = Arc::new(Ingest::new(
        &config.ingest(),
        auth.clone(),
        audit.clone(),
        metrics.clone(),
        queues.clone(),
        sink.clone(),
    ));
    let health =
        Arc::new(Health::new(sink.clone(), ingest.clone(), metrics.clone(), queues.clone()));
    Ok(Stage { queues, auth, audit, audit_queue, ingest, health })
}

/// Loads the certificates and binds HTTPS, QUIC (when `quic.listen` is set) and admin, or
/// takes the sockets systemd passed.
pub async fn front_ends(
    config: &Config,
    ingest: &Arc<Ingest>,
    sockets: Inherited,
) -> Result<FrontEnds, StartError> {
    let cert = tls::CertSlot::load(&config.https.tls_cert, &config.https.tls_key)?;
    let clients = tls::ClientCerts::load(client_ca(config))?;
    let tls = tls::server_config(cert.clone(), clients.clone(), &ingest::https::ALPN)?;
    let bind_err = |addr| move |source| StartError::Bind { addr, source };
    let api = Arc::new(ingest::http_api::HttpApi::new(
        ingest.clone(),
        ingest::body::BodyLimits::of(&config.https),
    ));
    let https = match sockets.https {
        Some(l) => ingest::https::Server::from_std(l, &config.https, tls, api.clone()),
        None => ingest::https::Server::bind(&config.https, tls, api.clone()).await,
    }
    .map_err(bind_err(config.https.listen))?;
    if config.quic.listen.is_none() && sockets.quic.is_some() {
        tracing::warn!("systemd passed a quic socket but quic.listen is not set: QUIC stays off");
    }
    let quic = match config.quic.listen {
        Some(listen) => {
            let tls = tls::server_config(
                cert.clone(),
                clients.clone(),
                &[ingest::quic::ALPN_EDGERELAY, ingest::quic::ALPN_H3],
            )?;
            let socket = match sockets.quic {
                Some(inherited) => inherited,
                None => ingest::quic::Server::bind(&config.quic, listen)?,
            };
            Some(ingest::quic::Server::on_socket(&config.quic, socket, tls, api)?)
        }
        None => None,
    };
    let quic_addr = match &quic {
        Some(q) => Some(q.local_addr().map_err(bind_err(config.https.listen))?),
        None => None,
    };
    let https_addr = https.local_addr().map_err(bind_err(config.https.listen))?;
    let admin = match sockets.admin {
        Some(l) => admin::from_std(l),
        None => admin::bind(config.admin.listen).await,
    }
    .map_err(bind_err(config.admin.listen))?;
    let admin_addr = admin.local_addr().map_err(bind_err(config.admin.listen))?;
    Ok(FrontEnds { https, quic, admin, cert, clients, https_addr, quic_addr, admin_addr })
}

/// What `shards` batch drivers follow, under systemd's `watchdog` when it set one.
pub fn drivers(config: &Config, shards: usize, watchdog: Option<Duration>) -> Drivers {
    let (batching, _) = watch::channel(batching_of(config));
    let wedge = std::env::var(driver::FAULT_WEDGE_FLUSH_ENV).is_ok_and(|v| v == "1");
    if wedge {
        tracing::warn!(
            "{}=1: test hook on, the batch drivers will wedge after their first batch",
            driver::FAULT_WEDGE_FLUSH_ENV
        );
    }
    let options = Options {
        heartbeat: systemd::notify::heartbeat_tick(watchdog),
        wedge_after_first_batch: wedge,
    };
    let heartbeats = Arc::new(Heartbeats::new(shards, Instant::now()));
    Drivers { batching, options, heartbeats }
}

/// The CA client certificates must chain to, when mTLS is on.
pub fn client_ca(config: &Config) -> Option<&std::path::Path> {
    config.auth.mtls.as_ref().map(|m| m.ca_file.as_path())
}

/// The batch parameters a driver follows, from `config`.
pub fn batching_of(config: &Config) -> Batching {
    Batching {
        limits: batch::Limits {
            max_events: config.batch.max_events,
            max_bytes: config.batch.max_bytes,
            linger: ms(config.batch.linger_ms),
        },
        flush_when_idle: config.batch.flush_when_idle,
        early_flushes_per_sec: config.batch.early_flushes_per_sec,
    }
}

/// A random id for this process start, so batch ids never repeat across restarts.
pub fn boot_id() -> Result<String, StartError> {
    boot_id_from(system_random)
}

/// A boot id from the bytes `fill` draws; its failure stops the start (a fixed id would repeat
/// the last run's Msg-Ids, and JetStream would drop the new batches as duplicates).
fn boot_id_from(fill: impl FnOnce(&mut [u8]) -> Fill) -> Result<String, StartError> {
    let bytes: [u8; 6] = drawn(fill)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The key of the queues' shard hash, drawn once per process start.
fn shard_key() -> Result<ShardKey, StartError> {
    shard_key_from(system_random)
}

/// A shard key from the bytes `fill` draws; its failure stops the start (a fixed key would let
/// clients work out which subjects share a shard).
fn shard_key_from(fill: impl FnOnce(&mut [u8]) -> Fill) -> Result<ShardKey, StartError> {
    drawn(fill).map(ShardKey)
}

/// What filling bytes from a random number generator gives.
type Fill = Result<(), ring::error::Unspecified>;

/// Fills `bytes` from the operating system's random number generator.
fn system_random(bytes: &mut [u8]) -> Fill {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new().fill(bytes)
}

/// `N` bytes from `fill`, or the error that stops the start.
fn drawn<const N: usize>(fill: impl FnOnce(&mut [u8]) -> Fill) -> Result<[u8; N], StartError> {
    let mut bytes = [0u8; N];
    fill(&mut bytes).map_err(|_| StartError::Random)?;
    Ok(bytes)
}

/// Opens the spool (off the runtime: it reads every segment once) and logs what it
/// recovered (after a crash: a torn tail cut off, damaged records skipped).
async fn open_spool(cfg: SpoolConfig, metrics: Arc<Metrics>) -> Result<Spool, SpoolError> {
    let dir = cfg.dir.clone();
    let (spool, recovery) = tokio::task::spawn_blocking(move || Spool::open(&cfg, metrics))
        .await
        .map_err(|e| SpoolError::Io {
            op: "open",
            path: dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })??;
    if recovery.total.torn_bytes > 0 || recovery.total.corrupt > 0 {
        tracing::warn!(dir = %dir.display(), %recovery, "spool recovered with damage");
    } else if recovery.total.records > 0 {
        // A backlog from the last run (a crash, or a stop while no cluster took batches).
        tracing::warn!(dir = %dir.display(), %recovery, "spool recovered: replaying when a cluster is up");
    }
    Ok(spool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_id_is_twelve_hex_digits_of_what_the_rng_drew() {
        let id = boot_id_from(|b| {
            b.copy_from_slice(&[0x01, 0x23, 0x45, 0x67, 0x89, 0xab]);
            Ok(())
        });
        assert_eq!(id.unwrap(), "0123456789ab");
        let a = boot_id().unwrap();
        assert_eq!(a.len(), 12);
        assert_ne!(a, boot_id().unwrap(), "two starts, two ids");
    }

    #[test]
    fn a_failed_rng_stops_the_start_instead_of_an_all_zero_id() {
        let err = boot_id_from(|_| Err(ring::error::Unspecified)).unwrap_err();
        assert!(matches!(err, StartError::Random), "{err:?}");
        assert!(err.to_string().contains("random number generator"), "{err}");
        let err = shard_key_from(|_| Err(ring::error::Unspecified)).unwrap_err();
        assert!(matches!(err, StartError::Random), "{err:?}");
        let drawn = shard_key_from(|b| {
            b.fill(9);
            Ok(())
        });
        assert_eq!(drawn.unwrap().0, [9; 16]);
    }
}
