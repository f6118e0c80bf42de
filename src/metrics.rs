//! Every metric the relay exports, defined in one place: names, help texts and labels. Served
//! in the Prometheus text format on the admin listener's `/metrics`.
//!
//! Labels have bounded cardinality: a protocol, an error code, a fixed reason string, an
//! outcome — never a subject, a peer address, an identity or a token.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: Protocol,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// The relay's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Events and requests refused, by protocol, code and reason.
    pub refusals: Family<RefusalLabels, Counter>,
    /// Events taken in (queued or stored, per the ack mode), by protocol.
    pub accepted: Family<ProtocolLabels, Counter>,
    /// Audit records handed to the audit stream's queue.
    pub audit_records: Counter,
    /// Audit records dropped because the audit queue was full (the data path never waits).
    pub audit_dropped: Counter,
    /// Audit records the audit stream did not take (NATS down, stream missing).
    pub audit_failed: Counter,
    /// JWKS fetches, by result (`ok`, `error`).
    pub jwks_fetches: Family<ResultLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("edgerelay");
        let refusals = Family::default();
        registry.register(
            "refusals",
            "Events and requests refused, by protocol, error code and reason",
            refusals.clone(),
        );
        let accepted = Family::default();
        registry.register("accepted_events", "Events taken in, by protocol", accepted.clone());
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
        let jwks_fetches = Family::default();
        registry.register(
            "jwks_fetches",
            "Fetches of the identity provider's keys, by result",
            jwks_fetches.clone(),
        );
        Self {
            registry,
            refusals,
            accepted,
            audit_records,
            audit_dropped,
            audit_failed,
            jwks_fetches,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
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
