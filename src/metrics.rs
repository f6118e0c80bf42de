//! Every metric the relay exports, defined in one place: names, help texts and labels. Served
//! in the Prometheus text format on the admin listener's `/metrics`.
//!
//! Labels have bounded cardinality: a protocol, an error code, a fixed reason string, an
//! outcome, a configured NATS cluster — never a subject, a peer address, an identity or a token.
//!
//! Exact percentiles per latency stage (HdrHistogram, last 10 s and since start) are in
//! [`latency`], served on `/debug/latency`; [`hgrm`] writes them as percentile-distribution
//! text.

pub mod hgrm;
pub mod latency;

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The front-end a request came in on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2 over TLS.
    Https,
    H3,
    /// The native `edgerelay/1` protocol.
    Quic,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Self::Https, Self::H3, Self::Quic];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Https => "https",
            Self::H3 => "h3",
            Self::Quic => "quic",
        }
    }
}

impl EncodeLabelValue for Protocol {
    fn encode(&self, w: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(w, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub protocol: Protocol,
    pub code: &'static str,
    pub reason: &'static str,
}

/// A connection refused before its handshake: on which front-end, and why (`per_source`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionRefusedLabels {
    pub protocol: Protocol,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: Protocol,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    /// The NATS cluster's configured name (`default` for the one cluster of `nats.urls`).
    pub cluster: String,
}

/// A change of the active NATS cluster: to which one (`none` when no cluster is usable) and
/// why (`start`, `unhealthy`, `nearer`, `recovered`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailoverLabels {
    pub to: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Bucket bounds of every latency histogram, seconds: fine from 100 µs to the 100 ms delivery
/// SLO, coarser up to 5 s.
pub const LATENCY_BUCKETS: [f64; 22] = [
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
    0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// One protocol's series in [`Metrics`]' families (handles sharing their values).
#[derive(Debug)]
pub struct ProtocolMetrics {
    pub accepted: Counter,
    pub duplicates: Counter,
    pub received_bytes: Counter,
    pub discarded_bytes: Counter,
    pub ingest_to_ack: Histogram,
    pub edge_to_ack: Histogram,
}

/// The relay's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The series of [`Protocol::ALL`], in that order (see [`Metrics::protocol`]).
    by_protocol: [ProtocolMetrics; 3],
    /// Events and requests refused, by protocol, code and reason.
    pub refusals: Family<RefusalLabels, Counter>,
    /// Events taken in (queued or stored, per the ack mode), by protocol; duplicates not
    /// included.
    pub accepted: Family<ProtocolLabels, Counter>,
    /// Events answered from the idempotency cache (an `Idempotency-Key` retry), by protocol.
    pub duplicates: Family<ProtocolLabels, Counter>,
    /// Request bodies (HTTP) and native stream bytes as read (QUIC, refused frames included),
    /// bytes, by protocol.
    pub received_bytes: Family<ProtocolLabels, Counter>,
    /// Bodies of refused HTTP requests read and dropped unbuffered, bytes, by protocol.
    pub discarded_bytes: Family<ProtocolLabels, Counter>,
    /// Encoded batches JetStream acknowledged, bytes.
    pub published_bytes: Counter,
    /// Open connections (handshake done), by protocol.
    pub connections: Family<ProtocolLabels, Gauge>,
    /// Connections refused before their handshake, by protocol and reason (`per_source`:
    /// their source had `max_connections_per_ip` open).
    pub connections_refused: Family<ConnectionRefusedLabels, Counter>,
    /// 1 for the NATS cluster batches are published to, else 0.
    pub nats_active_cluster: Family<ClusterLabels, Gauge>,
    /// Round trip of a JetStream API request to the cluster, seconds (NaN when it failed).
    pub nats_rtt: Family<ClusterLabels, Gauge<f64, AtomicU64>>,
    /// 1 while the cluster is connected, its stream checked and its probes and publishes
    /// succeed, else 0.
    pub nats_cluster_healthy: Family<ClusterLabels, Gauge>,
    /// Changes of the active cluster, by new cluster and reason.
    pub nats_failovers: Family<FailoverLabels, Counter>,
    /// Exact percentiles of the latency stages (`/debug/latency`).
    pub latency: latency::Latency,
    /// Audit records handed to the audit stream's queue.
    pub audit_records: Counter,
    /// Audit records dropped because the audit queue was full (the data path never waits).
    pub audit_dropped: Counter,
    /// Audit records the audit stream did not take (NATS down, stream missing).
    pub audit_failed: Counter,
    /// Refusals of requests that never authenticated, counted into `refusals` records instead
    /// of written one by one.
    pub audit_refusals_aggregated: Counter,
    /// Of those, refusals counted under the source `other`: the window already had
    /// `audit.refusals_max_keys` sources.
    pub audit_refusals_folded: Counter,
    /// Refusal log lines not written because their kind was over its ceiling
    /// (`audit.log_lines_per_interval`); each interval's are summed up in one line.
    pub audit_log_suppressed: Counter,
    /// JWKS fetches, by result (`ok`, `error`).
    pub jwks_fetches: Family<ResultLabels, Counter>,
    /// JWKS fetches that changed the usable keys (and so made cached tokens be checked again).
    pub jwks_key_changes: Counter,
    /// Token signatures checked: tokens not answered from the token cache.
    pub jwt_verifications: Counter,
    /// Request arrival at the relay → its answer (all its events acknowledged, or refused).
    pub ingest_to_ack: Family<ProtocolLabels, Histogram, fn() -> Histogram>,
    /// The edge's `Edge-Timestamp` → the answer, for the oldest event of a request that sent
    /// one (includes the edge's clock skew).
    pub edge_to_ack: Family<ProtocolLabels, Histogram, fn() -> Histogram>,
    /// A batch's oldest event: enqueued → handed to NATS.
    pub queue_wait: Histogram,
    /// A batch: published → PubAck (retries included).
    pub flush: Histogram,
    /// Events per published batch.
    pub batch_events: Histogram,
    /// Bytes per published batch (encoded).
    pub batch_bytes: Histogram,
    /// Batches, by outcome: `stored`; `timeout` (answered `ack_timeout`, still being
    /// resolved), then `stored_late` if JetStream took it after all; `spooled`; `refused`.
    pub batches: Family<OutcomeLabels, Counter>,
    /// Batch publishes retried.
    pub batch_retries: Counter,
    /// Events waiting in the queues (set when scraped).
    pub queue_depth: Gauge,
    /// Encoded bytes of the events waiting in the queues (set when scraped).
    pub queue_bytes: Gauge,
    /// Batches published and not yet acknowledged (set when scraped).
    pub inflight_batches: Gauge,
    /// Bytes held for peers under the memory budget: bodies and frames being read, requests
    /// decoded and not yet answered (set when scraped).
    pub peers_memory: Gauge,
    /// Bytes of the disk spool's segment files.
    pub spool_bytes: Gauge,
    /// Records (batches) in the disk spool not yet replayed.
    pub spool_records: Gauge,
    /// Records appended to the disk spool.
    pub spool_appends: Counter,
    /// Spooled records replayed (published and acknowledged, so marked done).
    pub spool_replayed: Counter,
    /// Damaged spool records found (and skipped) when the spool was opened.
    pub spool_corrupt_records: Counter,
    /// Torn bytes found at the end of spool segments when the spool was opened.
    pub spool_torn_bytes: Counter,
}

/// Counts one open connection in `edgerelay_connections` until dropped.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl Metrics {
    pub fn new() -> Self {
        Self::started_at(Instant::now())
    }

    /// Metrics of a relay started at `start` (the `/debug/latency` uptime and windows).
    pub fn started_at(start: Instant) -> Self {
        let mut registry = Registry::with_prefix("edgerelay");
        let refusals = Family::default();
        registry.register(
            "refusals",
            "Events and requests refused, by protocol, error code and reason",
            refusals.clone(),
        );
        let accepted: Family<ProtocolLabels, Counter> = Family::default();
        registry.register(
            "accepted_events",
            "Events taken in (queued or stored), duplicates excluded, by protocol",
            accepted.clone(),
        );
        let duplicates: Family<ProtocolLabels, Counter> = Family::default();
        registry.register(
            "duplicates",
            "Events answered from the idempotency cache (Idempotency-Key retries), by protocol",
            duplicates.clone(),
        );
        let received_bytes: Family<ProtocolLabels, Counter> = Family::default();
        registry.register(
            "received_bytes",
            "Request bodies (HTTP) and request frames (QUIC) read, bytes, by protocol",
            received_bytes.clone(),
        );
        let discarded_bytes: Family<ProtocolLabels, Counter> = Family::default();
        registry.register(
            "discarded_bytes",
            "Bodies of refused HTTP requests read and dropped without being kept, bytes, by protocol",
            discarded_bytes.clone(),
        );
        let published_bytes = Counter::default();
        registry.register(
            "published_bytes",
            "Encoded batches JetStream acknowledged, bytes",
            published_bytes.clone(),
        );
        let connections = Family::default();
        registry.register(
            "connections",
            "Open connections (TLS or QUIC handshake done), by protocol",
            connections.clone(),
        );
        let nats_active_cluster = Family::default();
        registry.register(
            "nats_active_cluster",
            "1 for the NATS cluster batches are published to, else 0",
            nats_active_cluster.clone(),
        );
        let nats_cluster_healthy = Family::default();
        registry.register(
            "nats_cluster_healthy",
            "1 while the NATS cluster is connected, its stream checked and its probes and publishes succeed",
            nats_cluster_healthy.clone(),
        );
        let nats_failovers = Family::default();
        registry.register(
            "nats_failovers",
            "Changes of the active NATS cluster, by new cluster and reason",
            nats_failovers.clone(),
        );
        let nats_rtt = Family::default();
        registry.register(
            "nats_rtt_seconds",
            "Round trip of a JetStream API request to the NATS cluster (NaN when it failed)",
            nats_rtt.clone(),
        );
        let audit_records = Counter::default();
        registry.register(
            "audit_records",
            "Audit records queued for the audit stream",
            audit_records.clone(),
        );
        let audit_dropped = Counter::default();
        registry.register(
            "audit_dropped",
            "Audit records dropped because the audit queue was full",
            audit_dropped.clone(),
        );
        let audit_failed = Counter::default();
        registry.register(
            "audit_failed",
            "Audit records the audit stream did not acknowledge",
            audit_failed.clone(),
        );
        let audit_refusals_aggregated = Counter::default();
        registry.register(
            "audit_refusals_aggregated",
            "Refusals of unauthenticated requests counted into per-source refusals records instead of one record each",
            audit_refusals_aggregated.clone(),
        );
        let audit_refusals_folded = Counter::default();
        registry.register(
            "audit_refusals_folded",
            "Unauthenticated refusals counted under the source other: the interval had audit.refusals_max_keys sources",
            audit_refusals_folded.clone(),
        );
        let audit_log_suppressed = Counter::default();
        registry.register(
            "audit_log_suppressed",
            "Refusal log lines suppressed by the ceiling audit.log_lines_per_interval",
            audit_log_suppressed.clone(),
        );
        let jwks_fetches = Family::default();
        registry.register(
            "jwks_fetches",
            "Fetches of the identity provider's keys, by result",
            jwks_fetches.clone(),
        );
        let jwks_key_changes = Counter::default();
        registry.register(
            "jwks_key_changes",
            "Fetches of the identity provider's keys that changed the usable keys",
            jwks_key_changes.clone(),
        );
        let jwt_verifications = Counter::default();
        registry.register(
            "jwt_verifications",
            "Token signatures checked (tokens not answered from the token cache)",
            jwt_verifications.clone(),
        );
        let ingest_to_ack = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "ingest_to_ack_seconds",
            "Request arrival at the relay to its answer",
            ingest_to_ack.clone(),
        );
        let edge_to_ack = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "edge_to_ack_seconds",
            "Edge-Timestamp of a request's oldest event to the answer",
            edge_to_ack.clone(),
        );
        let queue_wait = latency_histogram();
        registry.register(
            "queue_wait_seconds",
            "A batch's oldest event, enqueued to handed to NATS",
            queue_wait.clone(),
        );
        let flush = latency_histogram();
        registry.register("flush_seconds", "A batch, published to PubAck", flush.clone());
        let batch_events = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register("batch_events", "Events per published batch", batch_events.clone());
        let batch_bytes = Histogram::new(exponential_buckets(256.0, 2.0, 14));
        registry.register("batch_bytes", "Encoded bytes per published batch", batch_bytes.clone());
        let batches = Family::default();
        registry.register("batches", "Batches, by outcome", batches.clone());
        let batch_retries = Counter::default();
        registry.register("batch_retries", "Batch publishes retried", batch_retries.clone());
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth_events",
            "Events waiting in the queues",
            queue_depth.clone(),
        );
        let queue_bytes = Gauge::default();
        registry.register(
            "queue_depth_bytes",
            "Encoded bytes of the events waiting in the queues",
            queue_bytes.clone(),
        );
        let connections_refused = Family::default();
        registry.register(
            "connections_refused",
            "Connections refused before their handshake, by protocol and reason",
            connections_refused.clone(),
        );
        let peers_memory = Gauge::default();
        registry.register(
            "peers_memory_bytes",
            "Bytes held for peers under the memory budget (bodies and frames read, requests not yet answered)",
            peers_memory.clone(),
        );
        let inflight_batches = Gauge::default();
        registry.register(
            "inflight_batches",
            "Batches published and not yet acknowledged",
            inflight_batches.clone(),
        );
        let spool_bytes = Gauge::default();
        registry.register(
            "spool_bytes",
            "Bytes of the disk spool's segment files",
            spool_bytes.clone(),
        );
        let spool_records = Gauge::default();
        registry.register(
            "spool_records",
            "Records (batches) in the disk spool not yet replayed",
            spool_records.clone(),
        );
        let spool_appends = Counter::default();
        registry.register(
            "spool_appends",
            "Records appended to the disk spool",
            spool_appends.clone(),
        );
        let spool_replayed = Counter::default();
        registry.register(
            "spool_replayed",
            "Spooled records replayed and acknowledged",
            spool_replayed.clone(),
        );
        let spool_corrupt_records = Counter::default();
        registry.register(
            "spool_corrupt_records",
            "Damaged disk spool records skipped",
            spool_corrupt_records.clone(),
        );
        let spool_torn_bytes = Counter::default();
        registry.register(
            "spool_torn_bytes",
            "Torn bytes found at the end of disk spool segments on start-up",
            spool_torn_bytes.clone(),
        );
        // Every protocol's series exist from the start, at 0: dashboards and alerts see the
        // names before the first event. The request path keeps handles to them, so it never
        // looks a label set up per request.
        let by_protocol = Protocol::ALL.map(|protocol| {
            let labels = ProtocolLabels { protocol };
            let _ = connections.get_or_create(&labels);
            ProtocolMetrics {
                accepted: accepted.get_or_create(&labels).clone(),
                duplicates: duplicates.get_or_create(&labels).clone(),
                received_bytes: received_bytes.get_or_create(&labels).clone(),
                discarded_bytes: discarded_bytes.get_or_create(&labels).clone(),
                ingest_to_ack: ingest_to_ack.get_or_create(&labels).clone(),
                edge_to_ack: edge_to_ack.get_or_create(&labels).clone(),
            }
        });
        Self {
            registry,
            by_protocol,
            refusals,
            accepted,
            duplicates,
            received_bytes,
            discarded_bytes,
            published_bytes,
            connections,
            nats_active_cluster,
            nats_rtt,
            nats_cluster_healthy,
            nats_failovers,
            latency: latency::Latency::new(start),
            audit_records,
            audit_dropped,
            audit_failed,
            audit_refusals_aggregated,
            audit_refusals_folded,
            audit_log_suppressed,
            jwks_fetches,
            jwks_key_changes,
            jwt_verifications,
            ingest_to_ack,
            edge_to_ack,
            queue_wait,
            flush,
            batch_events,
            batch_bytes,
            batches,
            batch_retries,
            queue_depth,
            queue_bytes,
            inflight_batches,
            peers_memory,
            connections_refused,
            spool_bytes,
            spool_records,
            spool_appends,
            spool_replayed,
            spool_corrupt_records,
            spool_torn_bytes,
        }
    }

    /// The per-protocol series the request path updates.
    pub fn protocol(&self, protocol: Protocol) -> &ProtocolMetrics {
        let index = match protocol {
            Protocol::Https => 0,
            Protocol::H3 => 1,
            Protocol::Quic => 2,
        };
        &self.by_protocol[index]
    }

    /// Counts a connection of `protocol` as open until the returned guard is dropped.
    pub fn connection_opened(&self, protocol: Protocol) -> OpenConnection {
        let gauge = self.connections.get_or_create(&ProtocolLabels { protocol }).clone();
        gauge.inc();
        OpenConnection(gauge)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_their_labels() {
        let m = Metrics::new();
        m.refusals
            .get_or_create(&RefusalLabels {
                protocol: Protocol::Quic,
                code: "unauthorized",
                reason: "token_expired",
            })
            .inc();
        m.audit_dropped.inc();
        let text = m.render();
        assert!(
            text.contains(r#"edgerelay_refusals_total{protocol="quic",code="unauthorized",reason="token_expired"} 1"#),
            "{text}"
        );
        assert!(text.contains("edgerelay_audit_dropped_total 1"), "{text}");
    }
}
