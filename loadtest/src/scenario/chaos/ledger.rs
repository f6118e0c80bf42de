//! The ledger client: what an EdgeWorker does, with a record of everything. It offers events
//! at a fixed rate (`POST /v1/publish/{subject}` over HTTPS/HTTP2, bearer token), each with its
//! own `Idempotency-Key` and a payload that starts with the run's [`Stamp`] (nonce, event
//! number, intended send time), so the verifier can find it in the stream. An event is retried
//! with the *same* key and payload after a non-2xx answer or a transport error: after
//! `Retry-After` (capped) when the relay gives one, else after a doubling backoff, for a
//! bounded number of attempts and a bounded time. Attempts in flight are bounded by a
//! semaphore (the concurrency), connections by the pool.
//!
//! Per event the [`Ledger`] keeps every attempt (when it was sent and answered, relative to
//! the run's start, and what came back) and, when it was answered 2xx, the answer's body
//! (`stream`, `seq`, `duplicate`, and `spooled` if the relay says). Such an event is
//! *acknowledged*.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::{BufMut as _, Bytes, BytesMut};
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_rustls::TlsConnector;

use crate::backoff::Backoff;
use crate::events;
use crate::mode::https::HttpVersion;
use crate::mode::tls::tls_config;

/// Largest answer body kept; the relay's are well under 2 KiB.
const MAX_BODY: usize = 16 * 1024;

/// Part of a transport error's text kept per attempt.
const MAX_ERROR_TEXT: usize = 160;

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// How hard an event is retried.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RetryPolicy {
    /// Attempts at most, the first included.
    pub max_attempts: u32,
    /// No attempt starts later than this after the event's first.
    pub max_time: Duration,
    /// One attempt's time limit, from sending to the whole answer.
    pub request_timeout: Duration,
    /// `Retry-After` is honoured up to this long (an EdgeWorker has seconds, not minutes).
    pub max_retry_after: Duration,
    /// First pause after a failure without `Retry-After`; doubles per attempt.
    pub backoff: Duration,
}

/// The offered load.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Events per second, open loop.
    pub rate: f64,
    /// How long events are offered (retries may run on after it).
    pub duration: Duration,
    /// HTTP/2 connections.
    pub connections: usize,
    /// Attempts in flight at most.
    pub concurrency: usize,
    /// Events go round-robin to `<prefix>.0` … `<prefix>.<subjects-1>`.
    pub subject_prefix: String,
    pub subjects: u32,
    /// Payload size, bytes (at least the 24-byte stamp).
    pub payload_bytes: usize,
    pub retry: RetryPolicy,
}

/// Where the load goes.
#[derive(Clone, Debug)]
pub struct Target {
    /// The relay's HTTPS listener.
    pub addr: SocketAddr,
    /// PEM CA of its certificate (issued for `localhost` and `127.0.0.1`).
    pub ca: std::path::PathBuf,
    pub token: String,
}

/// What came back for one attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// An HTTP answer: status, the JSON error `code` if any, `Retry-After` seconds if any.
    Status { status: u16, code: Option<String>, retry_after: Option<u64> },
    /// No connection could be made: the request was never sent.
    Unsent(String),
    /// The request was sent (or may have been) and no answer came: reset, closed connection.
    Transport(String),
    /// No answer within the request timeout.
    Timeout,
}

/// One attempt at an event.
#[derive(Clone, Debug, Serialize)]
pub struct Attempt {
    /// When it was sent, since the run's start.
    #[serde(serialize_with = "as_ms")]
    pub sent: Duration,
    /// When its answer (or failure) came, since the run's start.
    #[serde(serialize_with = "as_ms")]
    pub answered: Duration,
    pub answer: Answer,
}

/// The body of a 2xx answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Acked {
    pub stream: String,
    /// The NATS cluster that stored it (empty for a spooled or queued answer).
    pub cluster: String,
    pub seq: u64,
    pub duplicate: bool,
    /// `Some(true)` when the relay says the event went to its disk spool, not (yet) to NATS.
    pub spooled: Option<bool>,
}

/// Everything about one event.
#[derive(Clone, Debug, Serialize)]
pub struct EventRecord {
    pub n: u64,
    /// When it was due, since the run's start.
    #[serde(serialize_with = "as_ms")]
    pub intended: Duration,
    pub attempts: Vec<Attempt>,
    /// The 2xx answer, if one came: the event is acknowledged.
    pub ack: Option<Acked>,
}

/// The whole run's record.
#[derive(Debug)]
pub struct Ledger {
    /// The run's nonce: the first 8 bytes of every payload.
    pub nonce: u64,
    pub events: Vec<EventRecord>,
    /// How long the load ran, retries included.
    pub elapsed: Duration,
    /// How long offering the events took (the last one's send, first attempt): longer than
    /// the planned duration when the client could not keep up with the rate.
    pub offered_in: Duration,
}

/// Live counters of a running load, for scenarios that wait for traffic before a fault.
#[derive(Debug, Default)]
pub struct Progress {
    acked: AtomicU64,
}

/// A load running in the background.
pub struct Load {
    progress: Arc<Progress>,
    started: Instant,
    task: tokio::task::JoinHandle<anyhow::Result<Ledger>>,
}

/// The HTTP/2 connections, each replaced when it closes.
struct Pool {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    h2: http2::Builder<TokioExecutor>,
    slots: Vec<Mutex<Slot>>,
}

#[derive(Default)]
struct Slot {
    sender: Option<http2::SendRequest<Full<Bytes>>>,
    backoff: Backoff,
}

/// What every event task shares.
struct Shared {
    pool: Pool,
    uris: Vec<Uri>,
    authorization: HeaderValue,
    permits: Semaphore,
    spec: LoadSpec,
    nonce: u64,
    start: Instant,
    progress: Arc<Progress>,
}

impl Answer {
    /// A 2xx status.
    pub fn is_success(&self) -> bool {
        matches!(self, Answer::Status { status, .. } if (200..300).contains(status))
    }

    /// The HTTP status, if an answer came.
    pub fn status(&self) -> Option<u16> {
        match self {
            Answer::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the event may have been stored although it was not acknowledged: no answer
    /// after sending, or the relay's own "may or may not be stored" (504).
    pub fn is_ambiguous(&self) -> bool {
        match self {
            Answer::Status { status, .. } => *status == 504,
            Answer::Transport(_) | Answer::Timeout => true,
            Answer::Unsent(_) => false,
        }
    }

    /// A short label for tables: `202`, `503 queue_full`, `transport`, `timeout`, `unsent`.
    pub fn label(&self) -> String {
        match self {
            Answer::Status { status, code: Some(code), .. } => format!("{status} {code}"),
            Answer::Status { status, code: None, .. } => status.to_string(),
            Answer::Unsent(_) => "unsent".into(),
            Answer::Transport(_) => "transport".into(),
            Answer::Timeout => "timeout".into(),
        }
    }

    /// Whether a retry of the same request may help: 5xx, 429, 408, and every failure to get
    /// an answer.
    fn retryable(&self) -> bool {
        match self {
            Answer::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            _ => true,
        }
    }
}

impl Acked {
    /// Reads a 2xx answer's JSON body; missing fields stay at their defaults.
    pub fn parse(body: &[u8]) -> Self {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        Acked {
            stream: v["stream"].as_str().unwrap_or_default().to_owned(),
            cluster: v["cluster"].as_str().unwrap_or_default().to_owned(),
            seq: v["seq"].as_u64().unwrap_or_default(),
            duplicate: v["duplicate"].as_bool().unwrap_or(false),
            spooled: v["spooled"].as_bool(),
        }
    }
}

impl EventRecord {
    /// The attempt that was answered 2xx.
    pub fn acked_attempt(&self) -> Option<&Attempt> {
        self.attempts.iter().find(|a| a.answer.is_success())
    }
}

impl Progress {
    /// Events answered 2xx so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }
}

impl Load {
    /// Starts offering `spec` to `target`; the run's clock starts now.
    pub async fn start(target: &Target, spec: LoadSpec) -> anyhow::Result<Self> {
        anyhow::ensure!(spec.rate > 0.0 && spec.rate.is_finite(), "the rate must be positive");
        anyhow::ensure!(spec.payload_bytes >= events::STAMP_LEN, "payload too small for a stamp");
        let pool = Pool::new(target, spec.connections.max(1))?;
        let uris = (0..spec.subjects.max(1))
            .map(|i| {
                format!("https://{}/v1/publish/{}.{i}", target.addr, spec.subject_prefix)
                    .parse::<Uri>()
                    .context("request URI")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", target.token))?;
        authorization.set_sensitive(true);
        let progress = Arc::new(Progress::default());
        let started = Instant::now();
        let shared = Arc::new(Shared {
            pool,
            uris,
            authorization,
            permits: Semaphore::new(spec.concurrency.max(1)),
            spec,
            nonce: events::nonce(),
            start: started,
            progress: progress.clone(),
        });
        let task = tokio::spawn(drive(shared));
        Ok(Load { progress, started, task })
    }

    /// Time since the load started: the timeline's clock.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until `n` events were acknowledged (true) or `within` passed (false).
    pub async fn wait_acked(&self, n: u64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.progress.acked() < n {
            if Instant::now() >= deadline {
                return false;
            }
            sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Sleeps until `at` on the load's clock.
    pub async fn until(&self, at: Duration) {
        sleep_until(self.started + at).await;
    }

    /// Waits for the first acknowledgement (at most 10 s), then until 3 s on the load's clock:
    /// the steady state a scenario's first fault breaks into.
    pub async fn warm_up(&self) {
        self.wait_acked(1, Duration::from_secs(10)).await;
        self.until(Duration::from_secs(3)).await;
    }

    /// Waits for the load to end (every event acknowledged or given up) and returns the ledger.
    pub async fn finish(self) -> anyhow::Result<Ledger> {
        self.task.await.context("the load task failed")?
    }
}

impl Pool {
    fn new(target: &Target, connections: usize) -> anyhow::Result<Self> {
        let config = tls_config(Some(&target.ca), false, HttpVersion::Http2.alpn())?;
        let server_name = ServerName::try_from(target.addr.ip().to_string())?;
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(8 << 20);
        Ok(Pool {
            addr: target.addr,
            server_name,
            tls: TlsConnector::from(Arc::new(config)),
            h2,
            slots: (0..connections).map(|_| Mutex::new(Slot::default())).collect(),
        })
    }

    /// A live sender on connection `slot`, reconnecting (after any backoff) if it closed.
    async fn sender(&self, slot: usize) -> anyhow::Result<http2::SendRequest<Full<Bytes>>> {
        let mut slot = self.slots[slot % self.slots.len()].lock().await;
        if let Some(sender) = &slot.sender {
            if !sender.is_closed() {
                return Ok(sender.clone());
            }
        }
        slot.sender = None;
        slot.backoff.wait().await;
        match timeout(Duration::from_secs(5), self.connect()).await {
            Ok(Ok(sender)) => {
                slot.backoff.succeeded();
                slot.sender = Some(sender.clone());
                Ok(sender)
            }
            Ok(Err(e)) => {
                slot.backoff.failed(Instant::now());
                Err(e)
            }
            Err(_) => {
                slot.backoff.failed(Instant::now());
                anyhow::bail!("connect timed out")
            }
        }
    }

    async fn connect(&self) -> anyhow::Result<http2::SendRequest<Full<Bytes>>> {
        let tcp = TcpStream::connect(self.addr).await.context("connect")?;
        tcp.set_nodelay(true)?;
        let tls = self.tls.connect(self.server_name.clone(), tcp).await.context("TLS")?;
        let (sender, conn) = self.h2.handshake(TokioIo::new(tls)).await.context("HTTP/2")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

impl Shared {
    fn payload(&self, n: u64, intended_unix_ns: u64) -> Bytes {
        let mut b = BytesMut::with_capacity(self.spec.payload_bytes);
        b.put_u64(self.nonce);
        b.put_u64(n);
        b.put_u64(intended_unix_ns);
        b.resize(self.spec.payload_bytes, b'.');
        b.freeze()
    }

    fn request(&self, n: u64, payload: &Bytes, key: &HeaderValue) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(payload.clone()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uris[(n % self.uris.len() as u64) as usize].clone();
        let h = req.headers_mut();
        h.insert(AUTHORIZATION, self.authorization.clone());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        h.insert(IDEMPOTENCY_KEY, key.clone());
        req
    }

    /// One attempt: the answer and, if 2xx, its body.
    async fn attempt(&self, slot: usize, req: Request<Full<Bytes>>) -> (Answer, Bytes) {
        let exchange = async {
            let mut sender = match self.pool.sender(slot).await {
                Ok(sender) => sender,
                Err(e) => return (Answer::Unsent(short(&format!("{e:#}"))), Bytes::new()),
            };
            if sender.ready().await.is_err() {
                return (Answer::Unsent("connection closed".into()), Bytes::new());
            }
            let resp = match sender.send_request(req).await {
                Ok(resp) => resp,
                Err(e) => return (Answer::Transport(short(&e.to_string())), Bytes::new()),
            };
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let body = match Limited::new(resp.into_body(), MAX_BODY).collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => return (Answer::Transport(short(&e.to_string())), Bytes::new()),
            };
            let code = (!(200..300).contains(&status)).then(|| error_code(&body)).flatten();
            (Answer::Status { status, code, retry_after }, body)
        };
        timeout(self.spec.retry.request_timeout, exchange)
            .await
            .unwrap_or((Answer::Timeout, Bytes::new()))
    }
}

/// Offers the events at their due times, then waits for every one to finish.
async fn drive(shared: Arc<Shared>) -> anyhow::Result<Ledger> {
    let total = (shared.spec.rate * shared.spec.duration.as_secs_f64()).round() as u64;
    let mut tasks = JoinSet::new();
    for n in 0..total {
        let intended = Duration::from_secs_f64(n as f64 / shared.spec.rate);
        sleep_until(shared.start + intended).await;
        tasks.spawn(event(shared.clone(), n, intended));
    }
    let offered_in = shared.start.elapsed();
    let mut events = Vec::with_capacity(total as usize);
    while let Some(done) = tasks.join_next().await {
        events.push(done.context("an event task panicked")?);
    }
    events.sort_by_key(|e| e.n);
    Ok(Ledger { nonce: shared.nonce, events, elapsed: shared.start.elapsed(), offered_in })
}

/// One event: attempts until it is acknowledged, refused for good, or out of attempts/time.
async fn event(shared: Arc<Shared>, n: u64, intended: Duration) -> EventRecord {
    let policy = shared.spec.retry;
    let payload = shared.payload(n, events::unix_ns(std::time::Instant::now()));
    let key = HeaderValue::from_str(&format!("chaos-{:016x}-{n}", shared.nonce))
        .unwrap_or_else(|_| HeaderValue::from_static("chaos"));
    let mut record = EventRecord { n, intended, attempts: Vec::new(), ack: None };
    let first = Instant::now();
    let slot = n as usize;
    for attempt in 1..=policy.max_attempts.max(1) {
        let (answer, body) = {
            let Ok(_permit) = shared.permits.acquire().await else { break };
            let sent = shared.start.elapsed();
            let (answer, body) = shared.attempt(slot, shared.request(n, &payload, &key)).await;
            let answered = shared.start.elapsed();
            record.attempts.push(Attempt { sent, answered, answer: answer.clone() });
            (answer, body)
        };
        if answer.is_success() {
            record.ack = Some(Acked::parse(&body));
            shared.progress.acked.fetch_add(1, Ordering::Relaxed);
            break;
        }
        if !answer.retryable() || attempt == policy.max_attempts {
            break;
        }
        let pause = match &answer {
            Answer::Status { retry_after: Some(secs), .. } => {
                Duration::from_secs(*secs).min(policy.max_retry_after)
            }
            _ => policy.backoff * 2u32.saturating_pow(attempt - 1).min(16),
        };
        if first.elapsed() + pause > policy.max_time {
            break;
        }
        sleep(pause).await;
    }
    record
}

/// The `error.code` of a JSON error body.
fn error_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v["error"]["code"].as_str().map(str::to_owned)
}

fn short(text: &str) -> String {
    text.chars().take(MAX_ERROR_TEXT).collect()
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_classify_for_retries_and_duplicates() {
        let s = |status, code: Option<&str>| Answer::Status {
            status,
            code: code.map(str::to_owned),
            retry_after: None,
        };
        assert!(s(202, None).is_success());
        assert!(!s(503, Some("queue_full")).is_success());
        assert!(s(503, None).retryable() && s(429, None).retryable());
        assert!(!s(400, Some("bad_subject")).retryable());
        assert!(s(504, Some("ack_timeout")).is_ambiguous());
        assert!(!s(503, Some("nats_unavailable")).is_ambiguous());
        assert!(Answer::Timeout.is_ambiguous() && Answer::Transport("reset".into()).is_ambiguous());
        assert!(!Answer::Unsent("refused".into()).is_ambiguous());
        assert_eq!(s(503, Some("queue_full")).label(), "503 queue_full");
    }

    #[test]
    fn acked_bodies_parse_with_and_without_spooled() {
        let a = Acked::parse(
            br#"{"stream":"S","cluster":"c","seq":7,"batch":"r.b.1","index":0,"duplicate":true}"#,
        );
        let want = Acked {
            stream: "S".into(),
            cluster: "c".into(),
            seq: 7,
            duplicate: true,
            spooled: None,
        };
        assert_eq!(a, want);
        assert_eq!(Acked::parse(br#"{"spooled":true}"#).spooled, Some(true));
        assert_eq!(Acked::parse(b"not json"), Acked::default());
        assert_eq!(
            error_code(br#"{"error":{"code":"ack_timeout","message":"x"}}"#).as_deref(),
            Some("ack_timeout")
        );
    }
}
