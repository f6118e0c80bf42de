//! A Rust client for edgerelay's native QUIC protocol (`edgerelay/1`), for edge collectors,
//! the load generator and tests, plus a minimal HTTP/3 client of its HTTP API. It depends on
//! the wire format (`edgerelay-proto`, re-exported as [`proto`]), not on the relay.
//!
//! ```no_run
//! # async fn demo() -> Result<(), edgerelay_client::ClientError> {
//! use edgerelay_client::{Client, ClientConfig};
//! let client = Client::connect(ClientConfig {
//!     server: "127.0.0.1:8443".parse().unwrap(),
//!     server_name: "localhost".into(),
//!     ca_pem: std::fs::read_to_string("ca.pem").ok(),
//!     token: "secret-token".into(),
//!     client_cert: None,
//! })
//! .await?;
//! // One request on its own stream...
//! let answer = client.publish(vec![edgerelay_client::event("edge.demo", "hello")]).await?;
//! // ...or many pipelined on one stream, answers in order.
//! let mut stream = client.stream().await?;
//! for i in 0..10 {
//!     stream.send(vec![edgerelay_client::event("edge.demo", format!("e{i}"))]).await?;
//! }
//! for _ in 0..10 {
//!     let answer = stream.recv().await?;
//! }
//! # Ok(()) }
//! ```
//!
//! A lost connection is re-established by the next [`Client::stream`] or [`Client::publish`];
//! requests that were in flight on it are not retried (their answers never came: retry them
//! with the same event ids, and the relay's idempotency answers the duplicates).
//!
//! A relay closes connections past its maximum age, and all of them when it shuts down, after
//! answering every request it read: that is [`ClientError::GoingAway`], not a failure. The
//! client then drops the connection at once (the next stream goes to a new one), and
//! [`Client::publish`] retries its request once on a new connection by itself, since the
//! relay did not read it.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use edgerelay_proto::framing::FrameDecoder;
use edgerelay_proto::request;
use edgerelay_proto::{
    ALPN_EDGERELAY, ALPN_H3, CONNECTION_GOING_AWAY, CONNECTION_SHUTTING_DOWN, STREAM_SHUTTING_DOWN,
};
use prost::Message;
use tokio::sync::Mutex;

/// The wire messages (`Event`, `PublishRequest`, `PublishResponse`, ...).
pub use edgerelay_proto as proto;

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub server: SocketAddr,
    /// Name the server certificate must carry.
    pub server_name: String,
    /// PEM CA(s) to trust. With `None` no server certificate verifies: set it.
    pub ca_pem: Option<String>,
    /// Bearer token sent on the first request of every stream; empty to rely on a client
    /// certificate.
    pub token: String,
    /// PEM client certificate chain and private key, for relays that take client
    /// certificates as identities (`auth.mtls`).
    pub client_cert: Option<(String, String)>,
}

/// Client errors: transport problems (retry helps) or a broken answer stream (a bug on one
/// side; retry on a new stream).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TLS or local socket setup failed.
    #[error("setup: {0}")]
    Setup(String),
    /// The connection could not be made or was lost.
    #[error("connection: {0}")]
    Connection(String),
    /// The stream ended or was reset before an answer arrived.
    #[error("stream: {0}")]
    Stream(String),
    /// An answer did not decode.
    #[error("bad answer: {0}")]
    Decode(String),
    /// The relay is closing this connection (maximum age or shutdown) after answering what it
    /// read; this request was not read. Retry it on a new connection.
    #[error("the relay is going away: {0}")]
    GoingAway(String),
}

/// A connection to one relay, re-established on demand.
pub struct Client {
    endpoint: quinn::Endpoint,
    config: ClientConfig,
    connection: Mutex<Option<quinn::Connection>>,
}

/// One bidirectional stream: requests go out pipelined, answers come back in order.
pub struct PublishStream {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
    decoder: FrameDecoder,
    token: Option<String>,
}

/// A handshake that has not finished by then fails (instead of waiting for QUIC's idle
/// timeout while every stream of the client waits behind it).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Kernel buffers of a client's UDP socket, as the relay's default `quic.socket_buffer_bytes`:
/// a busy client (the load generator) drops answers with the kernel's ~200 KiB default.
const CLIENT_SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Longest answer the client accepts.
const MAX_ANSWER_BYTES: usize = 4 << 20;

impl Client {
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        let endpoint = quic_endpoint(&config, ALPN_EDGERELAY)?;
        let client = Self { endpoint, config, connection: Mutex::new(None) };
        client.connection().await?;
        Ok(client)
    }

    /// Opens a new stream (reconnecting first if the connection was lost or is going away).
    pub async fn stream(&self) -> Result<PublishStream, ClientError> {
        let conn = self.connection().await?;
        let (send, recv) = match conn.open_bi().await {
            Ok(streams) => streams,
            Err(e) => return Err(self.forget_if_going_away(&conn, connection_error(&e))),
        };
        Ok(PublishStream {
            conn,
            send,
            recv,
            buf: BytesMut::new(),
            decoder: FrameDecoder::new(MAX_ANSWER_BYTES),
            token: Some(self.config.token.clone()),
        })
    }

    /// Publishes `events` as one request on a fresh stream and returns the answer. A relay
    /// going away before reading it gets it again on a new connection, once.
    pub async fn publish(
        &self,
        events: Vec<proto::Event>,
    ) -> Result<proto::PublishResponse, ClientError> {
        let req = proto::PublishRequest { events, token: self.config.token.clone() };
        let mut frame = BytesMut::new();
        request::encode_token_first(&req, &mut frame);
        match self.publish_once(&frame).await {
            Err(ClientError::GoingAway(_)) => self.publish_once(&frame).await,
            other => other,
        }
    }

    /// Sends one request `frame` (carrying the token) on a new stream and reads its answer.
    async fn publish_once(&self, frame: &[u8]) -> Result<proto::PublishResponse, ClientError> {
        let mut stream = self.stream().await?;
        let answer = match stream.send_raw(frame).await {
            Ok(()) => stream.recv().await,
            Err(e) => Err(e),
        };
        stream.finish();
        answer.map_err(|e| self.forget_if_going_away(&stream.conn, e))
    }

    /// Passes `e` on; when it says the relay is going away, the next stream goes to a new
    /// connection without waiting for this one to close.
    fn forget_if_going_away(&self, conn: &quinn::Connection, e: ClientError) -> ClientError {
        if matches!(e, ClientError::GoingAway(_)) {
            if let Ok(mut guard) = self.connection.try_lock() {
                if guard.as_ref().is_some_and(|c| c.stable_id() == conn.stable_id()) {
                    *guard = None;
                }
            }
        }
        e
    }

    /// The live connection, or a new one.
    pub async fn connection(&self) -> Result<quinn::Connection, ClientError> {
        let mut guard = self.connection.lock().await;
        if let Some(c) = guard.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let connecting = self
            .endpoint
            .connect(self.config.server, &self.config.server_name)
            .map_err(|e| ClientError::Connection(e.to_string()))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| ClientError::Connection("handshake timed out".into()))?
            .map_err(|e| ClientError::Connection(e.to_string()))?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.endpoint.close(quinn::VarInt::from_u32(0), b"bye");
    }
}

impl PublishStream {
    /// Sends one request (the first one on the stream carries the token).
    pub async fn send(&mut self, events: Vec<proto::Event>) -> Result<(), ClientError> {
        let req = proto::PublishRequest { events, token: self.token.take().unwrap_or_default() };
        // Token first: a relay reads at most its pre-auth limit of a stream's first frame
        // before that frame's token has authenticated the stream.
        let mut frame = BytesMut::new();
        request::encode_token_first(&req, &mut frame);
        self.send_raw(&frame).await
    }

    /// Sends raw bytes (for tests of malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.send.write_all(bytes).await.map_err(|e| match e {
            quinn::WriteError::Stopped(code)
                if code.into_inner() == STREAM_SHUTTING_DOWN.into() =>
            {
                ClientError::GoingAway(e.to_string())
            }
            quinn::WriteError::ConnectionLost(e) => connection_error(&e),
            e => ClientError::Stream(e.to_string()),
        })
    }

    /// Reads the next answer.
    pub async fn recv(&mut self) -> Result<proto::PublishResponse, ClientError> {
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    return proto::PublishResponse::decode(frame)
                        .map_err(|e| ClientError::Decode(e.to_string()))
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Decode(e.to_string())),
            }
            match self.recv.read_chunk(64 << 10, true).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) => {
                    return Err(ClientError::Stream("the relay finished the stream".into()))
                }
                Err(quinn::ReadError::ConnectionLost(e)) => return Err(connection_error(&e)),
                Err(e) => return Err(ClientError::Stream(e.to_string())),
            }
        }
    }

    /// Says no more requests will come on this stream.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}

/// A lost connection as an error: [`ClientError::GoingAway`] when the relay closed it after
/// answering what it read.
fn connection_error(e: &quinn::ConnectionError) -> ClientError {
    match e {
        quinn::ConnectionError::ApplicationClosed(close)
            if [CONNECTION_GOING_AWAY, CONNECTION_SHUTTING_DOWN]
                .iter()
                .any(|&code| close.error_code.into_inner() == u64::from(code)) =>
        {
            ClientError::GoingAway(e.to_string())
        }
        e => ClientError::Connection(e.to_string()),
    }
}

/// A client endpoint whose connections offer `alpn` and trust `config.ca_pem` (for callers
/// that manage connections themselves, like the load generator).
pub fn quic_endpoint(config: &ClientConfig, alpn: &[u8]) -> Result<quinn::Endpoint, ClientError> {
    let setup = |e: &dyn std::fmt::Display| ClientError::Setup(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = &config.ca_pem {
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.map_err(|e| setup(&e))?).map_err(|e| setup(&e))?;
        }
    }
    // ring, as the relay and async-nats use: rustls panics if it has to pick between two.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| setup(&e))?
        .with_root_certificates(roots);
    let mut tls = match &config.client_cert {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            use rustls::pki_types::pem::PemObject;
            use rustls::pki_types::{CertificateDer, PrivateKeyDer};
            let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| setup(&e))?;
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| setup(&e))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| setup(&e))?
        }
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| setup(&e))?;
    let bind = if config.server.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    let socket = udp_socket(bind).map_err(|e| setup(&e))?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let mut endpoint =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
            .map_err(|e| setup(&e))?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    Ok(endpoint)
}

/// A UDP socket on `bind` with [`CLIENT_SOCKET_BUFFER_BYTES`] kernel buffers (as much of them
/// as the kernel allows).
fn udp_socket(bind: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_recv_buffer_size(CLIENT_SOCKET_BUFFER_BYTES)?;
    socket.set_send_buffer_size(CLIENT_SOCKET_BUFFER_BYTES)?;
    socket.bind(&bind.into())?;
    Ok(socket.into())
}

/// A minimal HTTP/3 client of the relay's HTTP API (for tests and the load generator).
pub struct H3Client {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    config: ClientConfig,
    _endpoint: quinn::Endpoint,
}

impl H3Client {
    /// Connects with ALPN `h3`; `config.token` goes in `Authorization` unless a request
    /// overrides it.
    pub async fn connect(config: ClientConfig) -> Result<Self, ClientError> {
        let endpoint = quic_endpoint(&config, ALPN_H3)?;
        let connecting = endpoint
            .connect(config.server, &config.server_name)
            .map_err(|e| ClientError::Connection(e.to_string()))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| ClientError::Connection("handshake timed out".into()))?
            .map_err(|e| ClientError::Connection(e.to_string()))?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
            .await
            .map_err(|e| ClientError::Connection(e.to_string()))?;
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(Self { send, config, _endpoint: endpoint })
    }

    /// `POST path` with `body`; returns the status, the content type and the body.
    pub async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(http::StatusCode, http::HeaderMap, Bytes), ClientError> {
        let stream_err = |e: &dyn std::fmt::Display| ClientError::Stream(e.to_string());
        let uri = format!("https://{}{path}", self.config.server_name);
        let mut req = http::Request::post(uri);
        if !self.config.token.is_empty() {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {}", self.config.token));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(()).map_err(|e| stream_err(&e))?;
        let mut send = self.send.clone();
        let mut stream = send.send_request(req).await.map_err(|e| stream_err(&e))?;
        if !body.is_empty() {
            stream.send_data(body).await.map_err(|e| stream_err(&e))?;
        }
        stream.finish().await.map_err(|e| stream_err(&e))?;
        let resp = stream.recv_response().await.map_err(|e| stream_err(&e))?;
        let mut out = BytesMut::new();
        while let Some(mut chunk) = stream.recv_data().await.map_err(|e| stream_err(&e))? {
            use bytes::Buf;
            while chunk.has_remaining() {
                let part = chunk.chunk();
                out.extend_from_slice(part);
                let n = part.len();
                chunk.advance(n);
            }
        }
        let (parts, ()) = resp.into_parts();
        Ok((parts.status, parts.headers, out.freeze()))
    }
}

/// An event with a subject and payload (the other fields default).
pub fn event(subject: &str, payload: impl Into<bytes::Bytes>) -> proto::Event {
    proto::Event { subject: subject.to_owned(), payload: payload.into(), ..Default::default() }
}
