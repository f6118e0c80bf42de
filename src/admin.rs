//! The admin listener (plain HTTP/1.1, keep it off the public network): `/healthz` answers
//! while the process runs; `/readyz` answers 200 only when the listeners are bound and
//! JetStream is reachable with the stream in place (and, with JWTs, the identity provider's
//! keys are loaded), so a load balancer sends no traffic to a relay that could only refuse it.
//! `/metrics` is the Prometheus (OpenMetrics) exposition of [`crate::metrics`];
//! `/debug/latency` and `/debug/latency/{stage}.hgrm` the exact percentiles of
//! [`crate::metrics::latency`]; `/debug/clusters` the state of every NATS cluster (JSON).
//!
//! [`config`] is the `[admin]` section of the config file.

pub mod config;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::batch::queue::Queues;
use crate::ingest::Ingest;
use crate::metrics::hgrm;
use crate::metrics::latency::{Range, Stage, WINDOW_SECS};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::sink::Sink;

/// Where the exact latency percentiles are served.
pub const LATENCY_PATH: &str = "/debug/latency";
/// `.hgrm` values are in milliseconds; the histograms hold microseconds.
const MICROS_PER_MS: f64 = 1000.0;

/// What readiness depends on.
#[derive(Debug)]
pub struct Health {
    /// All ingest listeners are bound and serving.
    pub listening: AtomicBool,
    /// Set once shutdown began: not ready any more.
    pub draining: AtomicBool,
    pub sink: Arc<Sink>,
    /// Its authentication stage holds the identity provider's keys, when JWTs are configured
    /// (a reload may swap them).
    pub ingest: Arc<Ingest>,
    /// Served on `/metrics`.
    pub metrics: Arc<Metrics>,
    /// For the queue depth gauge.
    pub queues: Arc<Queues>,
}

impl Health {
    pub fn new(
        sink: Arc<Sink>,
        ingest: Arc<Ingest>,
        metrics: Arc<Metrics>,
        queues: Arc<Queues>,
    ) -> Self {
        Self {
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            sink,
            ingest,
            metrics,
            queues,
        }
    }

    /// `None` when ready, else why not.
    pub fn not_ready(&self) -> Option<String> {
        if self.draining.load(Ordering::Relaxed) {
            Some("draining".into())
        } else if !self.listening.load(Ordering::Relaxed) {
            Some("listeners not bound yet".into())
        } else if self.ingest.auth().key_store().is_some_and(|k| !k.is_usable()) {
            Some("the identity provider's keys are not loaded, or older than max_stale_secs".into())
        } else {
            self.sink.unavailable().map(|r| r.message.into_owned())
        }
    }
}

/// Serves the admin endpoints until `stop` turns true.
pub async fn serve(listener: TcpListener, health: Arc<Health>, mut stop: Shutdown) {
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.requested() => return,
        };
        let health = health.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let health = health.clone();
                async move { Ok::<_, Infallible>(route(req.uri(), &health)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// The admin listener from one already bound (inherited from systemd).
pub fn from_std(listener: std::net::TcpListener) -> std::io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

fn route(uri: &http::Uri, health: &Health) -> Response<Full<Bytes>> {
    let path = uri.path();
    if let Some(rest) = path.strip_prefix(LATENCY_PATH) {
        return latency(rest, uri.query(), &health.metrics);
    }
    let (status, body) = match path {
        "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
        "/readyz" => match health.not_ready() {
            None => (StatusCode::OK, "ready\n".to_owned()),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        "/debug/clusters" => {
            let mut json =
                serde_json::to_vec_pretty(&health.sink.cluster_status()).unwrap_or_default();
            json.push(b'\n');
            return typed(StatusCode::OK, json, "application/json");
        }
        "/metrics" => {
            let m = &health.metrics;
            m.queue_depth.set(health.queues.depth() as i64);
            m.queue_bytes.set(health.queues.bytes() as i64);
            m.inflight_batches.set(health.sink.in_flight() as i64);
            m.peers_memory.set(health.ingest.held_for_peers() as i64);
            let mut resp = Response::new(Full::new(Bytes::from(m.render())));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                // What prometheus-client writes: OpenMetrics text (counters' samples end in
                // `_total`, `# EOF` closes it). Prometheus parses it by this type; announced
                // as the classic `text/plain`, counters would lose their type.
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            return resp;
        }
        _ => (
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics, /debug/latency or /debug/clusters\n"
                .to_owned(),
        ),
    };
    text(status, body)
}

/// `/debug/latency` (JSON, every stage, last 10 s and since start, microseconds) and
/// `/debug/latency/{stage}.hgrm` (percentile distribution in milliseconds; since start, or the
/// last 10 s with `?window` or `?range=window`). `rest` is the path after `/debug/latency`.
fn latency(rest: &str, query: Option<&str>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let now = Instant::now();
    if rest.is_empty() || rest == "/" {
        let mut json = serde_json::to_vec(&metrics.latency.report(now)).unwrap_or_default();
        json.push(b'\n');
        return typed(StatusCode::OK, json, "application/json");
    }
    let stage = rest.strip_prefix('/').and_then(|r| r.strip_suffix(".hgrm")).and_then(Stage::parse);
    let Some(stage) = stage else {
        let names: Vec<String> =
            Stage::ALL.iter().map(|s| format!("{LATENCY_PATH}/{}.hgrm", s.as_str())).collect();
        let body =
            format!("no such latency stage; try {LATENCY_PATH} or one of: {}\n", names.join(", "));
        return text(StatusCode::NOT_FOUND, body);
    };
    let range = match query.unwrap_or("") {
        "" | "range=since_start" => Range::SinceStart,
        "window" | "range=window" => Range::Window,
        other => {
            let body = format!(
                "unknown query {other:?}: use ?range=window (the last {WINDOW_SECS} s) or \
                 ?range=since_start (the default)\n"
            );
            return text(StatusCode::BAD_REQUEST, body);
        }
    };
    let hist = metrics.latency.histogram(stage, range, now);
    let body = hgrm::percentile_distribution(&hist, MICROS_PER_MS);
    typed(StatusCode::OK, body.into_bytes(), "text/plain; charset=utf-8")
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    typed(status, body.into_bytes(), "text/plain")
}

fn typed(status: StatusCode, body: Vec<u8>, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    resp
}
