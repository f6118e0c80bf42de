//! The HTTPS front-end: TLS (rustls) with HTTP/1.1 and HTTP/2 chosen by ALPN, served by hyper.
//! The routes themselves are [`HttpApi`] (shared with HTTP/3, bodies read and paced in
//! [`super::body`]); limits on connections, handshake and header time, idleness and age live
//! here.
//!
//! A connection is asked to close (HTTP/2 GOAWAY, HTTP/1.1 `Connection: close` or an
//! immediate close when idle) when it has had no request in flight for `idle_timeout_ms`,
//! once it is `max_connection_age_ms` old, once one of its requests was cut for a stalled body
//! (408), and on shutdown. Its requests under way then get `max_connection_age_grace_ms` to
//! finish (on shutdown, the caller bounds the wait).

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::budget::{Slot, Slots};
use super::config::HttpsConfig;
use super::http_api::HttpApi;
use crate::auth::Peer;
use crate::metrics::Protocol;
use crate::section::ms;
use crate::shutdown::Shutdown;

/// ALPN protocols offered, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A bound HTTPS listener, ready to serve.
pub struct Server {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<Ctx>,
    max_connections: usize,
    /// Connections open per source.
    per_source: Arc<Slots>,
}

/// What every connection shares.
struct Ctx {
    api: Arc<HttpApi>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    limits: ConnectionLimits,
}

/// When a connection is asked to close, and how long it then has.
#[derive(Clone, Copy, Debug)]
struct ConnectionLimits {
    handshake_timeout: Duration,
    idle_timeout: Duration,
    /// `None`: no maximum age.
    max_age: Option<Duration>,
    grace: Duration,
}

/// When a connection last finished a request, and how many it has in flight.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
    /// A request was cut for a stalled body: the peer is not worth keeping.
    stalled: Notify,
}

/// Counts one request in flight for its connection's idle timer.
struct InFlight(Arc<Activity>);

impl Server {
    /// Binds the listener on `https.listen`; `tls` must offer [`ALPN`].
    pub async fn bind(
        cfg: &HttpsConfig,
        tls: Arc<rustls::ServerConfig>,
        api: Arc<HttpApi>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(cfg.listen).await?;
        Ok(Self::new(listener, cfg, tls, api))
    }

    /// Serves on a listener already bound (inherited from systemd); it must be non-blocking.
    pub fn from_std(
        listener: std::net::TcpListener,
        cfg: &HttpsConfig,
        tls: Arc<rustls::ServerConfig>,
        api: Arc<HttpApi>,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self::new(TcpListener::from_std(listener)?, cfg, tls, api))
    }

    fn new(
        listener: TcpListener,
        cfg: &HttpsConfig,
        tls: Arc<rustls::ServerConfig>,
        api: Arc<HttpApi>,
    ) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(ms(cfg.header_read_timeout_ms))
            .keep_alive(true)
            .max_headers(64)
            // hyper's read buffer grows to ~400 KiB on a fast body, outside the memory budget:
            // 256 connections draining refused 1 MiB bodies held 217 MiB. 64 KiB reads cost a
            // legitimate body nothing measurable; it also bounds an HTTP/1.1 head (h2: 16 KiB).
            .max_buf_size(64 << 10);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(cfg.h2_max_concurrent_streams)
            .initial_stream_window_size(cfg.h2_stream_window_bytes)
            .initial_connection_window_size(cfg.h2_connection_window_bytes)
            .max_pending_accept_reset_streams(cfg.h2_max_pending_accept_reset_streams)
            .max_local_error_reset_streams(cfg.h2_max_local_error_reset_streams)
            .max_header_list_size(16 << 10)
            .keep_alive_interval(ms(cfg.idle_timeout_ms / 2))
            .keep_alive_timeout(Duration::from_secs(20));
        let per_source = api.ingest().slots(cfg.max_connections_per_ip);
        Self {
            listener,
            acceptor: TlsAcceptor::from(tls),
            ctx: Arc::new(Ctx {
                api,
                h1,
                h2,
                limits: ConnectionLimits {
                    handshake_timeout: ms(cfg.tls_handshake_timeout_ms),
                    idle_timeout: ms(cfg.idle_timeout_ms),
                    max_age: (cfg.max_connection_age_ms > 0).then(|| ms(cfg.max_connection_age_ms)),
                    grace: ms(cfg.max_connection_age_grace_ms),
                },
            }),
            max_connections: cfg.max_connections,
            per_source,
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `stop` turns true, then asks every connection to finish its
    /// requests and close, and returns once all have (the caller bounds the wait).
    pub async fn serve(self, mut stop: Shutdown) {
        let slots = Arc::new(Semaphore::new(self.max_connections));
        loop {
            if stop.is_shutdown() {
                break;
            }
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                // Requested, or the relay was dropped: stop either way.
                _ = stop.requested() => break,
            };
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = stop.requested() => break,
            };
            match accepted {
                Ok((tcp, from)) => {
                    let Some(slot) = self.per_source.take(from.ip()) else {
                        // Closed before the handshake: it costs the relay no TLS state.
                        self.ctx.api.ingest().connection_refused(Protocol::Https, "per_source");
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let (acceptor, ctx, stop) =
                        (self.acceptor.clone(), self.ctx.clone(), stop.clone());
                    tokio::spawn(connection(tcp, from, acceptor, ctx, stop, (permit, slot)));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(self.listener);
        let _ = slots.acquire_many(self.max_connections as u32).await;
    }
}

async fn connection(
    tcp: TcpStream,
    from: SocketAddr,
    acceptor: TlsAcceptor,
    ctx: Arc<Ctx>,
    stop: Shutdown,
    _slots: (OwnedSemaphorePermit, Slot),
) {
    let tls = match tokio::time::timeout(ctx.limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => return tracing::debug!("TLS handshake timed out"),
    };
    let _open = ctx.api.connection_opened(Protocol::Https);
    let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    // Only this connection's task calls the service, one request at a time.
    let peer = RefCell::new(Peer::new(tls.get_ref().1.peer_certificates()));
    let share = ctx.api.share(from.ip());
    let activity = Arc::new(Activity {
        start: Instant::now(),
        in_flight: AtomicUsize::new(0),
        last_ms: AtomicU64::new(0),
        stalled: Notify::new(),
    });
    let svc = {
        let (ctx, activity) = (ctx.clone(), activity.clone());
        service_fn(move |req| {
            let peer = ctx.api.peer_identity(&mut peer.borrow_mut());
            let (ctx, share) = (ctx.clone(), share.clone());
            let guard = InFlight::start(activity.clone());
            let activity = activity.clone();
            async move {
                let resp = ctx.api.handle(req, from, peer.as_ref(), &share).await;
                if resp.status() == hyper::StatusCode::REQUEST_TIMEOUT {
                    activity.stalled.notify_one();
                }
                drop(guard);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let io = TokioIo::new(tls);
    if is_h2 {
        let conn = ctx.h2.serve_connection(io, svc);
        drive(conn, |c| c.graceful_shutdown(), &activity, ctx.limits, stop).await
    } else {
        let conn = ctx.h1.serve_connection(io, svc);
        drive(conn, |c| c.graceful_shutdown(), &activity, ctx.limits, stop).await
    }
}

/// Runs a connection to its end, asking it to close gracefully when idle too long, too old,
/// after a stalled request, or on shutdown; then closes it after the grace (not on shutdown:
/// the caller bounds that wait). `graceful` asks hyper's HTTP/1 or HTTP/2 connection to close.
async fn drive<C: Future<Output = hyper::Result<()>>>(
    conn: C,
    graceful: impl Fn(Pin<&mut C>),
    activity: &Activity,
    limits: ConnectionLimits,
    mut stop: Shutdown,
) {
    tokio::pin!(conn);
    let mut closing = false;
    if stop.is_shutdown() {
        graceful(conn.as_mut());
        closing = true;
    }
    let far = tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    let old_at =
        limits.max_age.map_or(far, |age| tokio::time::Instant::from_std(activity.start) + age);
    // Set when the connection is asked to close for age, idleness or a stall.
    let mut close_at = far;
    let mut tick = tokio::time::interval((limits.idle_timeout / 4).max(Duration::from_millis(100)));
    loop {
        let ask = tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.requested(), if !closing => {
                graceful(conn.as_mut());
                closing = true;
                false
            }
            _ = tokio::time::sleep_until(old_at), if !closing => true,
            _ = tick.tick(), if !closing => activity.idle_for() >= limits.idle_timeout,
            _ = activity.stalled.notified(), if !closing => true,
            _ = tokio::time::sleep_until(close_at) => {
                return tracing::debug!("connection closed after its grace");
            }
        };
        if ask {
            graceful(conn.as_mut());
            closing = true;
            close_at = tokio::time::Instant::now() + limits.grace;
        }
    }
}

impl Activity {
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.last_ms.store(a.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
