//! `loadtest https`: drives `POST /v1/publish/{subject}` over HTTP/1.1 or HTTP/2 on TLS.
//!
//! HTTP/1.1 sends one request at a time per keep-alive connection, so there is one worker per
//! connection. HTTP/2 multiplexes: `--concurrency` workers share `--connections` connections,
//! each worker pinned to one of them. A broken connection is re-established with a small
//! backoff; requests that fail meanwhile are counted, the run goes on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use futures::future::try_join_all;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::tls::tls_config;
use super::{Connected, Mode};
use crate::backoff::Backoff;
use crate::events::{self, Events};
use crate::model::{Failure, Outcome, RunInfo};
use crate::schedule::{RunArgs, Worker};

/// Largest response body read; the relay's answers are a few hundred bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// HTTP/2 per-stream receive window.
const H2_STREAM_WINDOW: u32 = 1 << 20;

/// HTTP/2 per-connection receive window.
const H2_CONNECTION_WINDOW: u32 = 8 << 20;

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const EDGE_TIMESTAMP: HeaderName = HeaderName::from_static("edge-timestamp");

/// Flags of `loadtest https`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Base URL of the relay; requests go to `{url}/v1/publish/{subject}`.
    #[arg(long, value_name = "URL", default_value = "https://127.0.0.1:8443")]
    pub(crate) url: Uri,

    /// TLS server name for SNI and certificate verification [default: the URL host; an IP
    /// address is verified as an IP]
    #[arg(long, value_name = "NAME")]
    pub(crate) server_name: Option<String>,

    /// PEM file with the CA certificate(s) to trust. Required unless --insecure.
    #[arg(long, value_name = "FILE", required_unless_present = "insecure")]
    pub(crate) ca: Option<PathBuf>,

    /// Do not verify the server certificate at all (lab use only).
    #[arg(long, conflicts_with = "ca")]
    pub(crate) insecure: bool,

    #[command(flatten)]
    pub(crate) token: crate::token::TokenArgs,

    /// HTTP version: 1 = HTTP/1.1 keep-alive, one request at a time per connection; 2 = HTTP/2,
    /// requests multiplexed over each connection. Negotiated with ALPN.
    #[arg(long = "http", value_name = "VERSION", value_enum, default_value = "2")]
    pub(crate) http: HttpVersion,

    /// Number of TLS connections to open.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) connections: u32,

    /// Requests in flight at most, in total. HTTP/1.1: capped by --connections. HTTP/2: spread
    /// evenly over the connections.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) concurrency: u32,
}

/// `--http`.
#[derive(Clone, Copy, Debug, Eq, PartialEq, clap::ValueEnum)]
pub(crate) enum HttpVersion {
    /// HTTP/1.1
    #[value(name = "1", alias = "1.1")]
    Http1,
    /// HTTP/2
    #[value(name = "2")]
    Http2,
}

/// Where and how to connect: resolved address, TLS settings, HTTP/2 settings.
struct Target {
    addrs: Vec<SocketAddr>,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    h2: http2::Builder<TokioExecutor>,
    /// Set once the first transport error has been printed, so a failing run does not flood.
    reported_transport_error: AtomicBool,
}

/// Everything needed to build request `seq` (one event: event `seq`); shared by all workers.
struct Requests {
    events: Events,
    /// One URI per subject: origin-form for HTTP/1.1, absolute for HTTP/2.
    uris: Vec<Uri>,
    /// `Host` header, HTTP/1.1 only (HTTP/2 carries the authority in the URI).
    host: Option<HeaderValue>,
    authorization: HeaderValue,
    content_type: HeaderValue,
}

/// A worker of either HTTP version.
pub enum HttpsWorker {
    H1(H1Worker),
    H2(H2Worker),
}

/// An HTTP/1.1 worker: owns one connection and uses it for one request at a time.
pub struct H1Worker {
    target: Arc<Target>,
    requests: Arc<Requests>,
    timeout: Duration,
    conn: Option<http1::SendRequest<Full<Bytes>>>,
    backoff: Backoff,
}

/// The HTTP/2 connections shared by all HTTP/2 workers.
struct H2Pool {
    target: Arc<Target>,
    slots: Vec<Mutex<H2Slot>>,
}

/// One HTTP/2 connection of the pool, replaced when it closes.
#[derive(Default)]
struct H2Slot {
    sender: Option<http2::SendRequest<Full<Bytes>>>,
    backoff: Backoff,
}

/// An HTTP/2 worker: one request at a time on its pool slot's connection.
pub struct H2Worker {
    pool: Arc<H2Pool>,
    slot: usize,
    requests: Arc<Requests>,
    timeout: Duration,
    sender: Option<http2::SendRequest<Full<Bytes>>>,
}

impl HttpVersion {
    /// The ALPN protocol id.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            HttpVersion::Http1 => b"http/1.1",
            HttpVersion::Http2 => b"h2",
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            HttpVersion::Http1 => "1.1",
            HttpVersion::Http2 => "2",
        }
    }
}

impl Target {
    /// Resolves the URL host and prepares TLS for `args`.
    async fn new(args: &Args) -> anyhow::Result<Self> {
        let host = url_host(&args.url)?;
        let port = args.url.port_u16().unwrap_or(443);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .collect();
        ensure!(!addrs.is_empty(), "{host} resolves to no address");

        let name = args.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned())
            .with_context(|| format!("invalid TLS server name `{name}`"))?;

        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .adaptive_window(false);

        let config = tls_config(args.ca.as_deref(), args.insecure, args.http.alpn())?;
        Ok(Self {
            addrs,
            server_name,
            tls: TlsConnector::from(Arc::new(config)),
            h2,
            reported_transport_error: AtomicBool::new(false),
        })
    }

    /// TCP connect and TLS handshake.
    async fn tls(&self) -> anyhow::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(&self.addrs[..])
            .await
            .with_context(|| format!("connecting to {:?}", self.addrs))?;
        tcp.set_nodelay(true)?;
        self.tls.connect(self.server_name.clone(), tcp).await.context("TLS handshake")
    }

    async fn connect_h1(&self) -> anyhow::Result<http1::SendRequest<Full<Bytes>>> {
        let tls = self.tls().await?;
        let alpn = tls.get_ref().1.alpn_protocol();
        ensure!(
            alpn.is_none() || alpn == Some(HttpVersion::Http1.alpn()),
            "server negotiated {:?} instead of http/1.1",
            alpn.map(String::from_utf8_lossy)
        );
        let (sender, conn) =
            http1::handshake(TokioIo::new(tls)).await.context("HTTP/1.1 handshake")?;
        // Errors surface to the worker as failed requests.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn connect_h2(&self) -> anyhow::Result<http2::SendRequest<Full<Bytes>>> {
        let tls = self.tls().await?;
        let alpn = tls.get_ref().1.alpn_protocol();
        ensure!(
            alpn == Some(HttpVersion::Http2.alpn()),
            "server did not negotiate h2 via ALPN (got {:?}); try --http 1",
            alpn.map(String::from_utf8_lossy)
        );
        let (sender, conn) =
            self.h2.handshake(TokioIo::new(tls)).await.context("HTTP/2 handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Prints the first transport error of the run; later ones are only counted.
    fn report_transport_error(&self, error: &hyper::Error) {
        if !self.reported_transport_error.swap(true, Ordering::Relaxed) {
            eprintln!("transport error (further ones are only counted): {error}");
        }
    }
}

impl Requests {
    fn new(args: &Args, token: &str, events: Events) -> anyhow::Result<Self> {
        let authority = args.url.authority().context("--url needs a host")?.as_str().to_owned();
        let base = args.url.path().trim_end_matches('/');
        let uris = events
            .subjects()
            .iter()
            .map(|subject| {
                let path = format!("{base}/v1/publish/{subject}");
                let uri = match args.http {
                    HttpVersion::Http1 => path,
                    HttpVersion::Http2 => format!("https://{authority}{path}"),
                };
                uri.parse::<Uri>().with_context(|| format!("invalid request URI `{uri}`"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let host = match args.http {
            HttpVersion::Http1 => Some(HeaderValue::from_str(&authority)?),
            HttpVersion::Http2 => None,
        };
        let mut authorization = HeaderValue::from_str(&format!("Bearer {token}"))
            .context("--token contains characters not allowed in a header")?;
        authorization.set_sensitive(true);
        Ok(Self {
            events,
            uris,
            host,
            authorization,
            content_type: HeaderValue::from_static("application/octet-stream"),
        })
    }

    /// Request number `seq`, due at `intended_unix_ns`: subject `seq mod N`, a unique
    /// idempotency key, the current time.
    fn build(&self, seq: u64, intended_unix_ns: u64) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.events.payload(seq, intended_unix_ns)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uris[self.events.subject_index(seq)].clone();
        let headers = req.headers_mut();
        if let Some(host) = &self.host {
            headers.insert(HOST, host.clone());
        }
        headers.insert(AUTHORIZATION, self.authorization.clone());
        headers.insert(CONTENT_TYPE, self.content_type.clone());
        if let Some(Ok(key)) = self.events.key(seq).map(HeaderValue::try_from) {
            headers.insert(IDEMPOTENCY_KEY, key);
        }
        headers.insert(EDGE_TIMESTAMP, HeaderValue::from(events::now_unix_ms()));
        req
    }
}

impl H1Worker {
    /// Connects (after any backoff) unless the current connection is ready for a request.
    async fn ready(&mut self) -> Result<&mut http1::SendRequest<Full<Bytes>>, Failure> {
        if let Some(conn) = self.conn.as_mut() {
            if conn.ready().await.is_err() {
                // Closed by the server since the last request (idle timeout, Connection:
                // close): nothing was sent on it, so reconnecting is safe.
                self.conn = None;
            }
        }
        if self.conn.is_none() {
            self.backoff.wait().await;
            match self.target.connect_h1().await {
                Ok(mut conn) => {
                    conn.ready().await.map_err(|_| Failure::Connect)?;
                    self.backoff.succeeded();
                    self.conn = Some(conn);
                }
                Err(error) => {
                    if self.backoff.failed(Instant::now()) {
                        eprintln!("connect failed (retrying with backoff): {error:#}");
                    }
                    return Err(Failure::Connect);
                }
            }
        }
        self.conn.as_mut().ok_or(Failure::Connect)
    }

    async fn attempt(&mut self, seq: u64, intended_unix_ns: u64) -> Result<(), Failure> {
        let request = self.requests.build(seq, intended_unix_ns);
        let conn = self.ready().await?;
        let result = exchange(conn.send_request(request)).await;
        if let Err((Failure::Transport, error)) = &result {
            self.conn = None;
            if let Some(error) = error {
                self.target.report_transport_error(error);
            }
        }
        result.map_err(|(failure, _)| failure)
    }
}

impl H2Pool {
    /// A live sender on connection `slot`, reconnecting (after any backoff) if it closed.
    /// Holds the slot's lock while connecting, so its workers wait instead of piling on.
    async fn sender(&self, slot: usize) -> Result<http2::SendRequest<Full<Bytes>>, Failure> {
        let mut slot = self.slots[slot].lock().await;
        if let Some(sender) = &slot.sender {
            if !sender.is_closed() {
                return Ok(sender.clone());
            }
        }
        slot.sender = None;
        slot.backoff.wait().await;
        match self.target.connect_h2().await {
            Ok(sender) => {
                slot.backoff.succeeded();
                slot.sender = Some(sender.clone());
                Ok(sender)
            }
            Err(error) => {
                if slot.backoff.failed(Instant::now()) {
                    eprintln!("connect failed (retrying with backoff): {error:#}");
                }
                Err(Failure::Connect)
            }
        }
    }
}

impl H2Worker {
    async fn attempt(&mut self, seq: u64, intended_unix_ns: u64) -> Result<(), Failure> {
        let request = self.requests.build(seq, intended_unix_ns);
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            self.sender = Some(self.pool.sender(self.slot).await?);
        }
        let sender = self.sender.as_mut().ok_or(Failure::Connect)?;
        if sender.ready().await.is_err() {
            self.sender = None;
            return Err(Failure::Transport);
        }
        let result = exchange(sender.send_request(request)).await;
        if let Err((Failure::Transport, Some(error))) = &result {
            self.pool.target.report_transport_error(error);
        }
        result.map_err(|(failure, _)| failure)
    }
}

impl Worker for H1Worker {
    async fn send(&mut self, seq: u64, intended_unix_ns: u64) -> Outcome {
        let deadline = Instant::now() + self.timeout;
        match timeout_at(deadline, self.attempt(seq, intended_unix_ns)).await {
            Ok(result) => result.into(),
            Err(_) => {
                // The answer may still arrive on this connection; it cannot carry another
                // request until then, so start over on a fresh one.
                self.conn = None;
                Outcome::Failed(Failure::Timeout)
            }
        }
    }
}

impl Worker for HttpsWorker {
    async fn send(&mut self, seq: u64, intended_unix_ns: u64) -> Outcome {
        match self {
            HttpsWorker::H1(worker) => worker.send(seq, intended_unix_ns).await,
            HttpsWorker::H2(worker) => worker.send(seq, intended_unix_ns).await,
        }
    }
}

impl Worker for H2Worker {
    async fn send(&mut self, seq: u64, intended_unix_ns: u64) -> Outcome {
        let deadline = Instant::now() + self.timeout;
        // Dropping a timed-out HTTP/2 request resets just its stream.
        timeout_at(deadline, self.attempt(seq, intended_unix_ns))
            .await
            .unwrap_or(Err(Failure::Timeout))
            .into()
    }
}

impl Mode for Args {
    type Worker = HttpsWorker;

    fn name(&self) -> &'static str {
        "https"
    }

    async fn connect(
        &self,
        run: &RunArgs,
        events: Events,
    ) -> anyhow::Result<Connected<HttpsWorker>> {
        let target = Arc::new(Target::new(self).await?);
        let token = self.token.resolve().await?;
        let requests = Arc::new(Requests::new(self, &token, events)?);
        let timeout = run.timeout;
        let connections = self.connections as usize;
        let concurrency = self.concurrency as usize;
        match self.http {
            HttpVersion::Http1 => {
                // One request at a time per connection: in flight = connections.
                let n = connections.min(concurrency);
                if concurrency != n || connections != n {
                    eprintln!(
                        "note: HTTP/1.1 sends one request at a time per connection: using {n} \
                         connections, {n} in flight"
                    );
                }
                let conns = try_join_all((0..n).map(|_| target.connect_h1()))
                    .await
                    .context("opening HTTP/1.1 connections")?;
                let workers = conns
                    .into_iter()
                    .map(|conn| {
                        HttpsWorker::H1(H1Worker {
                            target: Arc::clone(&target),
                            requests: Arc::clone(&requests),
                            timeout,
                            conn: Some(conn),
                            backoff: Backoff::default(),
                        })
                    })
                    .collect();
                Ok(Connected::new(run_info(self.http, n, n), workers))
            }
            HttpVersion::Http2 => {
                let connections = connections.min(concurrency);
                let senders = try_join_all((0..connections).map(|_| target.connect_h2()))
                    .await
                    .context("opening HTTP/2 connections")?;
                let pool = Arc::new(H2Pool {
                    target: Arc::clone(&target),
                    slots: senders
                        .into_iter()
                        .map(|sender| {
                            Mutex::new(H2Slot { sender: Some(sender), backoff: Backoff::default() })
                        })
                        .collect(),
                });
                let workers = (0..concurrency)
                    .map(|w| {
                        HttpsWorker::H2(H2Worker {
                            pool: Arc::clone(&pool),
                            slot: w % connections,
                            requests: Arc::clone(&requests),
                            timeout,
                            sender: None,
                        })
                    })
                    .collect();
                Ok(Connected::new(run_info(self.http, connections, concurrency), workers))
            }
        }
    }
}

fn run_info(http: HttpVersion, connections: usize, concurrency: usize) -> RunInfo {
    RunInfo {
        mode: "https",
        http: Some(http.name()),
        connections,
        concurrency,
        answer: "202",
        detail: None,
    }
}

/// Sends one request and reads the whole answer; success is `202 Accepted`. Transport errors
/// come back with the hyper error, for the first-error message.
async fn exchange(
    response: impl std::future::Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>>,
) -> Result<(), (Failure, Option<hyper::Error>)> {
    let response = response.await.map_err(|e| (Failure::Transport, Some(e)))?;
    let status = response.status();
    Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|_| (Failure::Transport, None))?;
    if status == StatusCode::ACCEPTED {
        Ok(())
    } else {
        Err((Failure::Status(status.as_u16()), None))
    }
}

/// The host of `url` without IPv6 brackets; `url` must be `https://`.
fn url_host(url: &Uri) -> anyhow::Result<&str> {
    match url.scheme_str() {
        Some("https") => {}
        Some(other) => bail!("--url must be https://, not {other}://"),
        None => bail!("--url must be an absolute https:// URL"),
    }
    let host = url.host().context("--url needs a host")?;
    Ok(host.trim_start_matches('[').trim_end_matches(']'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mode::args::ModeArgs;
    use crate::mode::RELAY_SUBJECT_PREFIX;
    use crate::testing;

    fn parse(extra: &[&str]) -> ModeArgs<Args> {
        let base = ["loadtest", "--insecure", "--token", "t", "--rate", "100"];
        testing::parse(&[&base[..], extra].concat()).unwrap()
    }

    fn requests(flags: &ModeArgs<Args>) -> Requests {
        Requests::new(&flags.mode, "t", testing::events(&flags.events, RELAY_SUBJECT_PREFIX))
            .unwrap()
    }

    #[test]
    fn requests_carry_the_relay_headers() {
        let requests =
            requests(&parse(&["--subjects", "3", "--payload-bytes", "16", "--http", "1"]));
        let req = requests.build(4, 0);
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), "/v1/publish/edge.load.1");
        assert_eq!(req.headers()[HOST], "127.0.0.1:8443");
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer t");
        assert_eq!(req.headers()[CONTENT_TYPE], "application/octet-stream");
        let key = req.headers()[IDEMPOTENCY_KEY].to_str().unwrap();
        assert!(key.starts_with("lt-") && key.ends_with("-4"), "{key}");
        let ts: u64 = req.headers()[EDGE_TIMESTAMP].to_str().unwrap().parse().unwrap();
        assert!(ts > 1_600_000_000_000);
        assert_ne!(requests.build(5, 0).headers()[IDEMPOTENCY_KEY], req.headers()[IDEMPOTENCY_KEY]);
    }

    #[test]
    fn http2_requests_use_absolute_uris() {
        let requests = requests(&parse(&[
            "--url",
            "https://relay.example:9443/base/",
            "--subject-prefix",
            "a.b",
        ]));
        let req = requests.build(0, 0);
        assert_eq!(req.uri(), "https://relay.example:9443/base/v1/publish/a.b.0");
        assert!(req.headers().get(HOST).is_none());
    }

    #[test]
    fn url_must_be_https() {
        assert_eq!(url_host(&"https://[::1]:8443".parse().unwrap()).unwrap(), "::1");
        assert_eq!(url_host(&"https://relay:8443".parse().unwrap()).unwrap(), "relay");
        assert!(url_host(&"http://relay".parse().unwrap()).is_err());
        assert!(url_host(&"relay:8443".parse().unwrap()).is_err());
    }

    #[test]
    fn ca_is_required_unless_insecure() {
        let err = testing::parse::<ModeArgs<Args>>(&["loadtest", "--token", "t", "--rate", "1"])
            .unwrap_err();
        assert!(err.to_string().contains("--ca"), "{err}");
        let flags = parse(&[]);
        let args = &flags.mode;
        assert_eq!(args.http, HttpVersion::Http2);
        assert_eq!(args.connections, 4);
        assert_eq!(args.concurrency, 256);
        assert_eq!(flags.run.duration, Duration::from_secs(10));
    }
}
