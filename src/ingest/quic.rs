//! The QUIC front-end: one UDP endpoint (quinn + rustls) serving two protocols, picked per
//! connection by ALPN — the native `edgerelay/1` protocol ([`native`], each stream's rules in
//! [`stream`]) and HTTP/3 ([`h3`], the same [`HttpApi`] as HTTPS). This module owns the
//! endpoint, the accept loop and what both protocols share: the transport config and the
//! connection limits.
//!
//! Limits, all sized so memory stays bounded: connections in total and per source (`[peers]`),
//! concurrent streams per connection, per-stream and per-connection flow-control windows
//! (quinn's connection window is unbounded by default), requests in flight per stream (beyond
//! it the relay stops reading, so flow control pushes back), the frame length (checked from
//! the prefix, before any of the body is buffered), the pre-auth frame limit of a stream with
//! no identity yet, deadlines and a minimum rate for frames, a maximum connection age, the idle
//! timeout, and address validation (Retry) once many handshakes are under way. 0-RTT is off: a
//! replayed publish would be stored twice.

pub mod h3;
pub mod native;
pub mod stream;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use quinn::{IdleTimeout, TransportConfig, VarInt};
use tokio::task::JoinSet;

use self::native::Native;
use self::stream::Limits;
use super::budget::Slots;
use super::config::QuicConfig;
use super::framing::FrameDecoder;
use super::http_api::HttpApi;
use super::pace::PaceLimits;
use super::Ingest;
use crate::metrics::Protocol;
use crate::section::ms;
use crate::shutdown::Shutdown;

pub use self::h3::ALPN_H3;
pub use self::native::ALPN_EDGERELAY;

/// A bound QUIC endpoint, ready to serve.
pub struct Server {
    endpoint: quinn::Endpoint,
    ctx: Arc<Ctx>,
}

struct Ctx {
    ingest: Arc<Ingest>,
    native: Arc<Native>,
    api: Arc<HttpApi>,
    h3_lifetime: h3::Lifetime,
    max_connections: usize,
    retry_above: usize,
    handshaking: AtomicUsize,
    /// Connections open per source.
    per_source: Arc<Slots>,
}

/// Errors binding the QUIC endpoint. The operator's side.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The certificate cannot be used for QUIC (needs TLS 1.3).
    #[error("QUIC TLS config: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("cannot listen on udp {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A UDP socket bound to `addr` with kernel send and receive buffers of `buffer_bytes` (0:
/// the kernel's default); an IPv6 wildcard address also takes IPv4. Warns when the kernel
/// caps the buffers lower (`net.core.rmem_max` / `wmem_max`).
pub(crate) fn udp_socket(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Not every host allows dual-stack sockets; IPv6 alone still works then.
        let _ = socket.set_only_v6(false);
    }
    set_buffers(&socket, buffer_bytes)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Sets the kernel send and receive buffers of `socket` to `buffer_bytes` (0: leaves them).
fn set_buffers(socket: &socket2::Socket, buffer_bytes: usize) -> std::io::Result<()> {
    if buffer_bytes > 0 {
        socket.set_recv_buffer_size(buffer_bytes)?;
        socket.set_send_buffer_size(buffer_bytes)?;
        let got = socket.recv_buffer_size()?.min(socket.send_buffer_size()?);
        if got < buffer_bytes {
            tracing::warn!(
                wanted = buffer_bytes,
                got,
                "UDP socket buffers are smaller than quic.socket_buffer_bytes: raise the \
                 net.core.rmem_max and net.core.wmem_max sysctls, or bursts will drop packets"
            );
        }
    }
    Ok(())
}

/// A quinn endpoint on `socket` on the current tokio runtime; a server if `server` is given.
pub(crate) fn endpoint(
    socket: UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let runtime = Arc::new(quinn::TokioRuntime);
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
}

impl Server {
    /// The UDP socket to serve on, bound on `listen` with the configured buffer sizes (unless
    /// systemd handed one over: see [`Server::on_socket`]).
    pub fn bind(cfg: &QuicConfig, listen: SocketAddr) -> Result<UdpSocket, QuicError> {
        udp_socket(listen, cfg.socket_buffer_bytes)
            .map_err(|source| QuicError::Bind { addr: listen, source })
    }

    /// Serves QUIC on a bound UDP socket ([`Server::bind`], or inherited from systemd), with
    /// the configured buffer sizes; the native protocol and HTTP/3 share `api`'s ingest stage.
    pub fn on_socket(
        cfg: &QuicConfig,
        socket: UdpSocket,
        tls: Arc<rustls::ServerConfig>,
        api: Arc<HttpApi>,
    ) -> Result<Self, QuicError> {
        let ingest = api.ingest().clone();
        let listen = socket.local_addr().map_err(|source| QuicError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let bind_error = |source| QuicError::Bind { addr: listen, source };
        set_buffers(&socket2::SockRef::from(&socket), cfg.socket_buffer_bytes)
            .map_err(bind_error)?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| QuicError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport(cfg)));
        server.max_incoming(cfg.max_connections.max(1) * 2);
        let endpoint = endpoint(socket, Some(server)).map_err(bind_error)?;
        Ok(Self {
            endpoint,
            ctx: Arc::new(Ctx {
                native: Arc::new(Native::new(
                    ingest.clone(),
                    limits(cfg),
                    ms(cfg.max_connection_age_ms),
                    ms(cfg.max_connection_age_grace_ms),
                )),
                per_source: ingest.slots(cfg.max_connections_per_ip),
                ingest,
                api,
                h3_lifetime: h3::Lifetime::of(cfg),
                max_connections: cfg.max_connections,
                retry_above: cfg.retry_above_handshakes,
                handshaking: AtomicUsize::new(0),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Accepts connections until `stop` turns true; then lets every connection finish the
    /// streams it has, closes it, and returns.
    pub async fn serve(self, mut stop: Shutdown) {
        let mut connections = JoinSet::new();
        loop {
            let incoming = tokio::select! {
                i = self.endpoint.accept() => match i { Some(i) => i, None => break },
                _ = stop.requested() => break,
            };
            while connections.try_join_next().is_some() {}
            let ip = incoming.remote_address().ip();
            if self.endpoint.open_connections() >= self.ctx.max_connections {
                incoming.refuse();
                continue;
            }
            if !incoming.remote_address_validated()
                && self.ctx.handshaking.load(Ordering::Relaxed) >= self.ctx.retry_above
                && incoming.may_retry()
            {
                // Many handshakes at once: make clients prove their address first.
                let _ = incoming.retry();
                continue;
            }
            let Some(slot) = self.ctx.per_source.take(ip) else {
                self.ctx.ingest.connection_refused(Protocol::Quic, "per_source");
                incoming.refuse();
                continue;
            };
            let (ctx, stop) = (self.ctx.clone(), stop.clone());
            connections.spawn(async move {
                ctx.handshaking.fetch_add(1, Ordering::Relaxed);
                let conn = match incoming.accept() {
                    Ok(connecting) => connecting.await,
                    Err(e) => Err(e),
                };
                ctx.handshaking.fetch_sub(1, Ordering::Relaxed);
                match conn {
                    Ok(conn) if alpn(&conn).as_deref() == Some(ALPN_H3) => {
                        let _open = ctx.ingest.connection_opened(Protocol::H3);
                        h3::connection(conn, ctx.api.clone(), ctx.h3_lifetime, stop).await
                    }
                    Ok(conn) => {
                        let _open = ctx.ingest.connection_opened(Protocol::Quic);
                        native::connection(conn, ctx.native.clone(), stop).await
                    }
                    Err(e) => tracing::debug!(error = %e, "QUIC handshake failed"),
                }
                drop(slot);
            });
        }
        self.endpoint.set_server_config(None);
        while connections.join_next().await.is_some() {}
        self.endpoint.wait_idle().await;
    }
}

/// Flow control and stream limits from the config.
fn transport(cfg: &QuicConfig) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(cfg.max_streams_per_connection))
        // HTTP/3 clients open three: control, QPACK encoder and decoder.
        .max_concurrent_uni_streams(VarInt::from_u32(3))
        .stream_receive_window(VarInt::from_u32(cfg.stream_window_bytes))
        .receive_window(VarInt::from_u32(cfg.connection_window_bytes))
        .send_window(u64::from(cfg.connection_window_bytes))
        .max_idle_timeout(IdleTimeout::try_from(ms(cfg.idle_timeout_ms)).ok());
    t
}

/// What bounds a native stream, from the config.
fn limits(cfg: &QuicConfig) -> Limits {
    Limits {
        decoder: FrameDecoder::new(cfg.max_frame_bytes),
        preauth_frame_bytes: cfg.preauth_frame_bytes.min(cfg.max_frame_bytes),
        max_in_flight: cfg.max_requests_in_flight_per_stream,
        pace: PaceLimits {
            timeout: ms(cfg.frame_timeout_ms),
            min_bytes_per_sec: cfg.frame_min_bytes_per_sec,
        },
    }
}

/// The client's verified certificate chain, if it presented one.
pub(super) fn peer_certificates(
    conn: &quinn::Connection,
) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()
        .map(|b| *b)
}

/// The protocol the handshake agreed on.
fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}
