//! The HTTPS front-end: TLS (rustls) with HTTP/1.1 and HTTP/2 chosen by ALPN, served by hyper.
//! It decodes requests into [`EventIn`]s, hands them to [`Ingest`], and encodes the answers;
//! limits on connections, handshake and header time, idleness and body size live here.
//!
//! Routes: `POST /v1/publish/{subject}` (body = one event's payload) and `POST /v1/publish`
//! (many events, `application/json` or `application/x-protobuf`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::json::{self, Answer};
use super::{EventIn, Ingest};
use crate::auth::{bearer_token, Credentials, Identity};
use crate::config::{ms, HttpsConfig};
use crate::error::{ErrorCode, Refusal};
use crate::proto;

/// ALPN protocols offered, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

/// A bound HTTPS listener, ready to serve.
pub struct Server {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<Ctx>,
    max_connections: usize,
}

/// What every connection shares.
struct Ctx {
    ingest: Arc<Ingest>,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    handshake_timeout: Duration,
    idle_timeout: Duration,
    max_body_bytes: usize,
}

/// When a connection last finished a request, and how many it has in flight.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
}

/// Counts one request in flight for its connection's idle timer.
struct InFlight(Arc<Activity>);

/// hyper's HTTP/1 and HTTP/2 connections, driven alike.
trait Graceful: Future<Output = hyper::Result<()>> {
    fn graceful(self: Pin<&mut Self>);
}

impl Server {
    /// Binds the listener; `tls` must offer [`ALPN`].
    pub async fn bind(
        cfg: &HttpsConfig,
        tls: Arc<rustls::ServerConfig>,
        ingest: Arc<Ingest>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(ms(cfg.header_read_timeout_ms))
            .keep_alive(true)
            .max_headers(64);
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
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(tls),
            ctx: Arc::new(Ctx {
                ingest,
                h1,
                h2,
                handshake_timeout: ms(cfg.tls_handshake_timeout_ms),
                idle_timeout: ms(cfg.idle_timeout_ms),
                max_body_bytes: cfg.max_body_bytes,
            }),
            max_connections: cfg.max_connections,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until `stop` turns true, then asks every connection to finish its
    /// requests and close, and returns once all have (the caller bounds the wait).
    pub async fn serve(self, mut stop: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(self.max_connections));
        loop {
            if *stop.borrow() {
                break;
            }
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                // Changed (to true) or the relay was dropped: stop either way.
                _ = stop.changed() => break,
            };
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = stop.changed() => break,
            };
            match accepted {
                Ok((tcp, _peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let (acceptor, ctx, stop) =
                        (self.acceptor.clone(), self.ctx.clone(), stop.clone());
                    tokio::spawn(connection(tcp, acceptor, ctx, stop, permit));
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
    acceptor: TlsAcceptor,
    ctx: Arc<Ctx>,
    stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let tls = match tokio::time::timeout(ctx.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => return tracing::debug!("TLS handshake timed out"),
    };
    let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let activity = Arc::new(Activity {
        start: Instant::now(),
        in_flight: AtomicUsize::new(0),
        last_ms: AtomicU64::new(0),
    });
    let svc = {
        let (ctx, activity) = (ctx.clone(), activity.clone());
        service_fn(move |req| {
            let ctx = ctx.clone();
            let guard = InFlight::start(activity.clone());
            async move {
                let resp = handle(req, &ctx).await;
                drop(guard);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let io = TokioIo::new(tls);
    if is_h2 {
        drive(ctx.h2.serve_connection(io, svc), &activity, ctx.idle_timeout, stop).await
    } else {
        drive(ctx.h1.serve_connection(io, svc), &activity, ctx.idle_timeout, stop).await
    }
}

/// Runs a connection to its end, closing it gracefully when idle too long or on shutdown.
async fn drive(
    conn: impl Graceful,
    activity: &Activity,
    idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    tokio::pin!(conn);
    let mut closing = false;
    if *stop.borrow() {
        conn.as_mut().graceful();
        closing = true;
    }
    let mut tick = tokio::time::interval((idle_timeout / 4).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if !closing => {
                conn.as_mut().graceful();
                closing = true;
            }
            _ = tick.tick(), if !closing => {
                if activity.idle_for() >= idle_timeout {
                    conn.as_mut().graceful();
                    closing = true;
                }
            }
        }
    }
}

async fn handle(req: Request<Incoming>, ctx: &Ctx) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let route = if let Some(subject) = path.strip_prefix("/v1/publish/") {
        Some(subject.to_owned())
    } else if path == "/v1/publish" {
        None
    } else {
        return refusal(&Refusal::new(
            ErrorCode::NotFound,
            "no such route; POST /v1/publish/{subject}",
        ));
    };
    if req.method() != Method::POST {
        let mut resp = refusal(&Refusal::new(ErrorCode::MethodNotAllowed, "use POST"));
        resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    let result = match route {
        Some(subject) => publish_one(req, subject, ctx).await,
        None => publish_many(req, ctx).await,
    };
    result.unwrap_or_else(|r| refusal(&r))
}

async fn authenticate(req: &Request<Incoming>, ctx: &Ctx) -> Result<Identity, Refusal> {
    let bearer = match req.headers().get(header::AUTHORIZATION) {
        None => None,
        Some(v) => Some(v.to_str().ok().and_then(bearer_token).ok_or_else(|| {
            Refusal::new(ErrorCode::Unauthorized, "Authorization must be: Bearer <token>")
        })?),
    };
    ctx.ingest.authenticate(Credentials { bearer }).await
}

async fn publish_one(
    req: Request<Incoming>,
    subject: String,
    ctx: &Ctx,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let identity = authenticate(&req, ctx).await?;
    ctx.ingest.check_subject(&identity, &subject)?;
    if let Some(r) = ctx.ingest.refuse_early() {
        return Err(r);
    }
    let headers = req.headers();
    let id = match headers.get("idempotency-key") {
        Some(v) => v
            .to_str()
            .map_err(|_| Refusal::new(ErrorCode::BadRequest, "Idempotency-Key must be ASCII"))?
            .to_owned(),
        None => String::new(),
    };
    let edge_time_unix_ms = match headers.get("edge-timestamp") {
        Some(v) => v.to_str().ok().and_then(|s| s.trim().parse().ok()).ok_or_else(|| {
            Refusal::new(ErrorCode::BadRequest, "Edge-Timestamp must be unix milliseconds")
        })?,
        None => 0,
    };
    let mut event_headers = std::collections::HashMap::new();
    if let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        event_headers.insert("content-type".to_owned(), ct.to_owned());
    }
    let payload = read_body(req, ctx.ingest.max_event_bytes()).await?;
    let event = EventIn { subject, payload, headers: event_headers, id, edge_time_unix_ms };
    let outcome = ctx.ingest.publish(&identity, event).await;
    Ok(match &outcome {
        Ok(_) => json_response(StatusCode::ACCEPTED, json::encode(&Answer::of(&outcome))),
        Err(r) => refusal(r),
    })
}

async fn publish_many(req: Request<Incoming>, ctx: &Ctx) -> Result<Response<Full<Bytes>>, Refusal> {
    let identity = authenticate(&req, ctx).await?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default();
    let protobuf = match content_type.as_str() {
        PROTOBUF | "application/protobuf" => true,
        JSON => false,
        _ => {
            return Err(Refusal::new(
                ErrorCode::UnsupportedMediaType,
                "POST /v1/publish takes application/json or application/x-protobuf",
            ))
        }
    };
    if let Some(r) = ctx.ingest.refuse_early() {
        return Err(r);
    }
    let body = read_body(req, ctx.max_body_bytes).await?;
    let events =
        if protobuf { super::decode_publish_request(&body)? } else { json::decode_request(&body)? };
    if events.is_empty() {
        return Err(Refusal::new(ErrorCode::BadRequest, "no events in the request"));
    }
    let max = ctx.ingest.max_events_per_request();
    if events.len() > max {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!("more than {max} events in one request"),
        ));
    }
    let outcomes = ctx.ingest.publish_all(&identity, events).await;
    // 202 only when every event was taken; otherwise the first refusal's status, so a client
    // that looks only at the status never takes an unacknowledged event for stored.
    let first_refusal = outcomes.iter().find_map(|o| o.as_ref().err());
    let status = first_refusal.map_or(StatusCode::ACCEPTED, |r| status_of(r.code));
    let mut resp = if protobuf {
        let body = proto::PublishResponse {
            results: outcomes.iter().map(super::to_proto).collect(),
            error: None,
        };
        let mut resp = Response::new(Full::new(Bytes::from(body.encode_to_vec())));
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROTOBUF));
        resp
    } else {
        json_response(StatusCode::OK, json::encode_many(&outcomes))
    };
    *resp.status_mut() = status;
    if let Some(r) = first_refusal {
        set_retry_after(&mut resp, r.code);
    }
    Ok(resp)
}

async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Refusal> {
    let too_large =
        || Refusal::new(ErrorCode::TooLarge, format!("body is larger than {limit} bytes"));
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(Refusal::new(ErrorCode::BadRequest, format!("reading the body failed: {e}"))),
    }
}

fn status_of(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    resp
}

fn refusal(r: &Refusal) -> Response<Full<Bytes>> {
    let mut resp = json_response(status_of(r.code), json::encode(&Answer::refused(r)));
    set_retry_after(&mut resp, r.code);
    if r.code == ErrorCode::Unauthorized {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

fn set_retry_after(resp: &mut Response<Full<Bytes>>, code: ErrorCode) {
    if let Some(after) = code.retry_after() {
        let secs = after.as_millis().div_ceil(1000).max(1) as u64;
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
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

impl<I, S, B> Graceful for http1::Connection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

impl<I, S, B, E> Graceful for http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}
