//! The audit trail: every refusal of the edge's making (who, which subject, which code and
//! reason) and, periodically, how many events each identity published — as JSON records in a
//! JetStream stream (`audit.stream`, default `EDGERELAY_AUDIT`) and as structured log lines
//! (target `edgerelay::audit`).
//!
//! Auditing never blocks the data path: records go through a bounded queue to a background
//! publisher, and when the queue is full they are dropped and counted
//! (`edgerelay_audit_dropped_total`). Refusals that are not the edge's fault (NATS down,
//! queues full) are counted in the metrics but not audited: they say nothing about who tried
//! what, and would flood the trail exactly when NATS cannot take it.
//!
//! [`config`] is the `[audit]` section of the config file.

pub mod config;

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::auth::Identity;
use crate::error::{Refusal, Side};
use crate::metrics::{Metrics, Protocol, RefusalLabels};
use crate::shutdown::Shutdown;
use config::AuditConfig;

/// Publishes awaiting their PubAck at most.
const ACK_WINDOW: usize = 256;

/// One audit record, as stored (JSON).
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A request or event the relay refused.
    Refused {
        at_unix_ms: u64,
        relay: Arc<str>,
        protocol: Protocol,
        /// The authenticated identity, when authentication got that far.
        #[serde(skip_serializing_if = "Option::is_none")]
        identity: Option<Arc<str>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
        code: &'static str,
        reason: &'static str,
        message: String,
    },
    /// Events accepted per identity since the previous `counts` record.
    Counts { at_unix_ms: u64, relay: Arc<str>, interval_secs: u64, events: HashMap<Arc<str>, u64> },
}

/// The audit stage's front: cheap to call from the data path.
#[derive(Debug)]
pub struct Audit {
    relay: Arc<str>,
    metrics: Arc<Metrics>,
    queue: Option<mpsc::Sender<Record>>,
    counts: Mutex<HashMap<Arc<str>, u64>>,
}

impl Audit {
    /// The audit front and the receiving end of its queue (`None` when `audit.enabled` is off:
    /// then only log lines and metrics are written).
    pub fn new(
        cfg: &AuditConfig,
        relay: &str,
        metrics: Arc<Metrics>,
    ) -> (Self, Option<mpsc::Receiver<Record>>) {
        let (queue, rx) = if cfg.enabled {
            let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        (Self { relay: relay.into(), metrics, queue, counts: Mutex::new(HashMap::new()) }, rx)
    }

    /// Records a refusal: counted always; logged and queued when it is the edge's doing.
    pub fn refused(
        &self,
        protocol: Protocol,
        identity: Option<&Identity>,
        subject: Option<&str>,
        r: &Refusal,
    ) {
        self.metrics
            .refusals
            .get_or_create(&RefusalLabels { protocol, code: r.code.as_str(), reason: r.reason })
            .inc();
        if r.code.side() != Side::Edge {
            return;
        }
        let identity = identity.map(|i| i.name.clone());
        tracing::info!(
            target: "edgerelay::audit",
            protocol = ?protocol,
            identity = identity.as_deref(),
            subject,
            code = r.code.as_str(),
            reason = r.reason,
            message = %r.message,
            "refused"
        );
        self.send(Record::Refused {
            at_unix_ms: unix_ms(),
            relay: self.relay.clone(),
            protocol,
            identity,
            subject: subject.map(|s| s.chars().take(256).collect()),
            code: r.code.as_str(),
            reason: r.reason,
            message: r.message.to_string(),
        });
    }

    /// Counts `n` events taken in from `identity`.
    pub fn accepted(&self, protocol: Protocol, identity: &Identity, n: u64) {
        if n == 0 {
            return;
        }
        self.metrics.protocol(protocol).accepted.inc_by(n);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry(identity.name.clone()).or_default() += n;
    }

    /// Queues the per-identity counts since the last call (and logs them).
    pub fn flush_counts(&self, interval: Duration) {
        let events = std::mem::take(&mut *self.counts.lock().unwrap_or_else(|p| p.into_inner()));
        if events.is_empty() {
            return;
        }
        tracing::info!(target: "edgerelay::audit", identities = events.len(), total = events.values().sum::<u64>(), "published");
        self.send(Record::Counts {
            at_unix_ms: unix_ms(),
            relay: self.relay.clone(),
            interval_secs: interval.as_secs(),
            events,
        });
    }

    fn send(&self, record: Record) {
        let Some(queue) = &self.queue else { return };
        match queue.try_send(record) {
            Ok(()) => self.metrics.audit_records.inc(),
            Err(_) => self.metrics.audit_dropped.inc(),
        };
    }
}

/// The audit stream's settings.
pub fn stream_config(cfg: &AuditConfig) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![format!("{}.>", cfg.subject_prefix)],
        max_age: Duration::from_secs(cfg.max_age_secs),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// Publishes queued records to the audit stream until `stop`, and the per-identity counts
/// every `counts_interval_secs`. Records that JetStream does not acknowledge are counted as
/// failed, not retried: the log line is the fallback.
pub async fn run(
    audit: Arc<Audit>,
    mut rx: mpsc::Receiver<Record>,
    client: async_nats::Client,
    cfg: AuditConfig,
    mut stop: Shutdown,
) {
    let js = jetstream::new(client);
    if let Err(e) = js.get_or_create_stream(stream_config(&cfg)).await {
        tracing::warn!(stream = %cfg.stream, error = %e, "audit stream not available: audit records will fail until it is");
    }
    let prefix = format!("{}.{}", cfg.subject_prefix, audit.relay);
    let interval = Duration::from_secs(cfg.counts_interval_secs.max(1));
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    let mut acks = FuturesUnordered::new();
    let mut stopping = false;
    loop {
        tokio::select! {
            record = rx.recv() => {
                let Some(record) = record else { break };
                let kind = match record { Record::Refused { .. } => "refused", Record::Counts { .. } => "counts" };
                let body = match serde_json::to_vec(&record) {
                    Ok(b) => b,
                    Err(_) => continue,
                };
                match js.publish(format!("{prefix}.{kind}"), body.into()).await {
                    Ok(ack) => acks.push(ack.into_future()),
                    Err(_) => {
                        audit.metrics.audit_failed.inc();
                    }
                }
                while acks.len() >= ACK_WINDOW {
                    if let Some(Err(_)) = acks.next().await {
                        audit.metrics.audit_failed.inc();
                    }
                }
            }
            Some(result) = acks.next(), if !acks.is_empty() => {
                if result.is_err() {
                    audit.metrics.audit_failed.inc();
                }
            }
            _ = tick.tick() => audit.flush_counts(interval),
            _ = stop.requested(), if !stopping => {
                stopping = true;
                audit.flush_counts(interval);
                rx.close();
            }
        }
    }
    while let Some(result) = acks.next().await {
        if result.is_err() {
            audit.metrics.audit_failed.inc();
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
