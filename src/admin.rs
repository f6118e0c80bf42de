//! The admin listener (plain HTTP/1.1, keep it off the public network): `/healthz` answers
//! while the process runs; `/readyz` answers 200 only when the listeners are bound and
//! JetStream is reachable with the stream in place (and, with JWTs, the identity provider's
//! keys are loaded), so a load balancer sends no traffic to a relay that could only refuse it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::idp::KeyStore;
use crate::batch::queue::Queues;
use crate::metrics::Metrics;
use crate::sink::Sink;

/// What readiness depends on.
#[derive(Debug)]
pub struct Health {
    /// All ingest listeners are bound and serving.
    pub listening: AtomicBool,
    /// Set once shutdown began: not ready any more.
    pub draining: AtomicBool,
    pub sink: Arc<Sink>,
    /// The identity provider's keys, when JWTs are configured.
    pub keys: Option<Arc<KeyStore>>,
    /// Served on `/metrics`.
    pub metrics: Arc<Metrics>,
    /// For the queue depth gauge.
    pub queues: Arc<Queues>,
}

impl Health {
    pub fn new(
        sink: Arc<Sink>,
        keys: Option<Arc<KeyStore>>,
        metrics: Arc<Metrics>,
        queues: Arc<Queues>,
    ) -> Self {
        Self {
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            sink,
            keys,
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
        } else if self.keys.as_ref().is_some_and(|k| !k.is_usable()) {
            Some("the identity provider's keys are not loaded, or older than max_stale_secs".into())
        } else {
            self.sink.unavailable().map(|r| r.message.into_owned())
        }
    }
}

/// Serves the admin endpoints until `stop` turns true.
pub async fn serve(listener: TcpListener, health: Arc<Health>, mut stop: watch::Receiver<bool>) {
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
            _ = stop.changed() => return,
        };
        let health = health.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let health = health.clone();
                async move { Ok::<_, Infallible>(route(req.uri().path(), &health)) }
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

fn route(path: &str, health: &Health) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
        "/readyz" => match health.not_ready() {
            None => (StatusCode::OK, "ready\n".to_owned()),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        "/metrics" => {
            let m = &health.metrics;
            m.queue_depth.set(health.queues.depth() as i64);
            m.inflight_batches.set(health.sink.in_flight() as i64);
            let mut resp = Response::new(Full::new(Bytes::from(m.render())));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return resp;
        }
        _ => (StatusCode::NOT_FOUND, "not found: try /healthz, /readyz or /metrics\n".to_owned()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    resp
}
