//! The QUIC front-end: the native `edgerelay/1` protocol on a UDP port (quinn + rustls), and
//! HTTP/3 (ALPN `h3`, [`super::h3`]) on the same port, picked per connection by ALPN.
//!
//! On each bidirectional stream the client writes varint-length-delimited `PublishRequest`
//! frames ([`super::framing`]) and reads `PublishResponse` frames back in the same order; many
//! requests may be in flight per stream and many streams per connection. Everything after
//! decoding is the shared [`Ingest`] stage.
//!
//! Limits, all sized so memory stays bounded: connections in total and per source address,
//! concurrent streams per connection, per-stream and per-connection flow-control windows
//! (quinn's connection window is unbounded by default), requests in flight per stream (beyond
//! it the relay stops reading, so flow control pushes back), the frame length (checked from
//! the prefix, before any of the body is buffered), the idle timeout, and address validation
//! (Retry) once many handshakes are under way. 0-RTT is off: a replayed publish would be
//! stored twice.
//!
//! A stream whose framing is broken (a length over the limit, a malformed prefix) gets a
//! `PublishResponse` whose `error` says why, after the answers to its earlier requests; then the
//! relay finishes its side and stops the client's side with STOP_SENDING and the code
//! [`STREAM_FRAME_TOO_LARGE`] or [`STREAM_MALFORMED`]. The connection and its other streams go
//! on. A request that decodes but is wrong (bad protobuf, no token) is answered with an error
//! and the stream goes on.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use futures::stream::{FuturesOrdered, StreamExt};
use prost::Message;
use quinn::{IdleTimeout, TransportConfig, VarInt};
use tokio::task::JoinSet;

use super::framing::{self, FrameDecoder, FrameError};
use super::http_api::HttpApi;
use super::{events_of, results_of, Ingest};
use crate::auth::{Credentials, Identity};
use crate::config::{ms, QuicConfig};
use crate::error::{ErrorCode, Refusal};
use crate::metrics::Protocol;
use crate::proto;
use crate::shutdown::Shutdown;

/// ALPN of the native protocol.
pub const ALPN_EDGERELAY: &[u8] = b"edgerelay/1";
/// STOP_SENDING / RESET code: a frame's length prefix exceeded the limit.
pub const STREAM_FRAME_TOO_LARGE: u32 = 0x10;
/// STOP_SENDING / RESET code: a frame's length prefix was malformed.
pub const STREAM_MALFORMED: u32 = 0x11;
/// STOP_SENDING code: the relay is draining and reads no more requests on this stream.
pub const STREAM_SHUTTING_DOWN: u32 = 0x12;
/// CONNECTION_CLOSE code when the relay shuts down.
pub const CONNECTION_SHUTTING_DOWN: u32 = 0x20;
/// Bytes read from a stream at once.
const READ_CHUNK: usize = 64 << 10;

/// A bound QUIC endpoint, ready to serve.
pub struct Server {
    endpoint: quinn::Endpoint,
    ctx: Arc<Ctx>,
}

struct Ctx {
    ingest: Arc<Ingest>,
    api: Arc<HttpApi>,
    decoder: FrameDecoder,
    max_in_flight: usize,
    max_connections: usize,
    max_per_ip: usize,
    retry_above: usize,
    handshaking: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Releases a source address's connection slot when its connection ends.
struct IpSlot {
    ctx: Arc<Ctx>,
    ip: IpAddr,
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
    /// Binds the UDP socket on `listen` and serves QUIC on it.
    pub fn bind(
        cfg: &QuicConfig,
        listen: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        ingest: Arc<Ingest>,
        api: Arc<HttpApi>,
    ) -> Result<Self, QuicError> {
        let socket = udp_socket(listen, cfg.socket_buffer_bytes)
            .map_err(|source| QuicError::Bind { addr: listen, source })?;
        Self::on_socket(cfg, socket, tls, ingest, api)
    }

    /// Serves QUIC on a UDP socket already bound (inherited from systemd), with the
    /// configured buffer sizes.
    pub fn on_socket(
        cfg: &QuicConfig,
        socket: UdpSocket,
        tls: Arc<rustls::ServerConfig>,
        ingest: Arc<Ingest>,
        api: Arc<HttpApi>,
    ) -> Result<Self, QuicError> {
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
                ingest,
                api,
                decoder: FrameDecoder::new(cfg.max_frame_bytes),
                max_in_flight: cfg.max_requests_in_flight_per_stream,
                max_connections: cfg.max_connections,
                max_per_ip: cfg.max_connections_per_ip,
                retry_above: cfg.retry_above_handshakes,
                handshaking: AtomicUsize::new(0),
                per_ip: Mutex::new(HashMap::new()),
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
            let Some(slot) = IpSlot::take(&self.ctx, ip) else {
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
                    Ok(conn) if alpn(&conn).as_deref() == Some(super::h3::ALPN_H3) => {
                        let _open = ctx.ingest.connection_opened(Protocol::H3);
                        super::h3::connection(conn, ctx.api.clone(), stop).await
                    }
                    Ok(conn) => {
                        let _open = ctx.ingest.connection_opened(Protocol::Quic);
                        connection(conn, ctx, stop).await
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

async fn connection(conn: quinn::Connection, ctx: Arc<Ctx>, mut stop: Shutdown) {
    // A configured client certificate is every stream's identity until a token replaces it.
    let peer = ctx.ingest.peer_identity(peer_certificates(&conn).as_deref());
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    streams.spawn(stream(send, recv, ctx.clone(), stop.clone(), peer.clone()));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "QUIC connection ended");
                    break;
                }
            },
            _ = stop.requested() => break,
        }
        while streams.try_join_next().is_some() {}
    }
    while streams.join_next().await.is_some() {}
    conn.close(VarInt::from_u32(CONNECTION_SHUTTING_DOWN), b"shutting down");
}

/// Serves one stream: reads frames, answers each request in order. On shutdown it stops
/// reading (STOP_SENDING [`STREAM_SHUTTING_DOWN`]) and answers what it has read.
async fn stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    ctx: Arc<Ctx>,
    mut stop: Shutdown,
    mut identity: Option<Identity>,
) {
    let mut buf = BytesMut::new();
    let mut answers = FuturesOrdered::new();
    let mut reading = !stop.is_shutdown();
    let mut broken: Option<(FrameError, u32)> = None;
    loop {
        // Take in the buffered frames, up to the in-flight limit: a chunk full of tiny frames
        // must not queue more answers than that.
        while broken.is_none() && answers.len() < ctx.max_in_flight {
            match ctx.decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let answer = request(frame, &mut identity, &ctx).await;
                    answers.push_back(answer);
                }
                Ok(None) => break,
                Err(e) => {
                    let code = match e {
                        FrameError::TooLong { .. } => STREAM_FRAME_TOO_LARGE,
                        FrameError::BadLength => STREAM_MALFORMED,
                    };
                    broken = Some((e, code));
                    reading = false;
                    buf.clear();
                }
            }
        }
        let can_read = reading && answers.len() < ctx.max_in_flight;
        tokio::select! {
            Some(answer) = answers.next(), if !answers.is_empty() => {
                if send.write_all(&framing::frame(&answer)).await.is_err() {
                    return; // the client went away; what it was answered stays answered
                }
            }
            chunk = recv.read_chunk(READ_CHUNK, true), if can_read => match chunk {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                Ok(None) => reading = false,
                Err(_) => return, // reset by the client or the connection is gone
            },
            _ = stop.requested(), if reading => {
                reading = false;
                let _ = recv.stop(VarInt::from_u32(STREAM_SHUTTING_DOWN));
            }
            else => break,
        }
    }
    if let Some((e, code)) = broken {
        let code_str = match e {
            FrameError::TooLong { .. } => ErrorCode::TooLarge,
            FrameError::BadLength => ErrorCode::BadRequest,
        };
        let r = Refusal::new(code_str, e.to_string());
        ctx.ingest.refused(Protocol::Quic, identity.as_ref(), None, &r);
        let answer = refused(r);
        let _ = send.write_all(&framing::frame(&answer)).await;
        let _ = recv.stop(VarInt::from_u32(code));
    }
    let _ = send.finish();
    let _ = send.stopped().await;
}

/// One request frame: authenticate (a token on the frame replaces the stream's identity),
/// decode, and return the future of its answer. A refused request is counted and audited; an
/// authentication refusal also drops the stream's identity.
async fn request(
    frame: bytes::Bytes,
    identity: &mut Option<Identity>,
    ctx: &Arc<Ctx>,
) -> futures::future::BoxFuture<'static, proto::PublishResponse> {
    ctx.ingest.received(Protocol::Quic, frame.len());
    match admit(frame, identity, ctx).await {
        Ok((id, events)) => {
            let ingest = ctx.ingest.clone();
            Box::pin(async move {
                let outcomes = ingest.publish_all(Protocol::Quic, &id, events).await;
                proto::PublishResponse {
                    results: results_of(&outcomes, ingest.names()),
                    error: None,
                }
            })
        }
        Err(r) => {
            ctx.ingest.refused(Protocol::Quic, identity.as_ref(), None, &r);
            if r.code == ErrorCode::Unauthorized {
                *identity = None;
            }
            Box::pin(std::future::ready(refused(r)))
        }
    }
}

/// Decodes a request frame and finds who sent it.
async fn admit(
    frame: bytes::Bytes,
    identity: &mut Option<Identity>,
    ctx: &Arc<Ctx>,
) -> Result<(Identity, Vec<super::EventIn>), Refusal> {
    let req = proto::PublishRequest::decode(frame)
        .map_err(|e| Refusal::new(ErrorCode::BadRequest, format!("invalid PublishRequest: {e}")))?;
    if !req.token.is_empty() {
        *identity = None;
        let creds = Credentials { bearer: Some(&req.token), peer: None };
        *identity = Some(ctx.ingest.authenticate(creds).await?);
    }
    let id = identity.clone().ok_or_else(|| {
        Refusal::new(
            ErrorCode::Unauthorized,
            "missing credentials: the first request of a stream must carry a token",
        )
        .because("missing_token")
    })?;
    id.check_current()?;
    let events = events_of(req);
    ctx.ingest.check_request(&events)?;
    Ok((id, events))
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

fn refused(r: Refusal) -> proto::PublishResponse {
    proto::PublishResponse { results: Vec::new(), error: Some(super::proto_refusal(&r)) }
}

impl IpSlot {
    fn take(ctx: &Arc<Ctx>, ip: IpAddr) -> Option<Self> {
        let mut map = ctx.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= ctx.max_per_ip {
            return None;
        }
        *n += 1;
        Some(Self { ctx: ctx.clone(), ip })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.ctx.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}
