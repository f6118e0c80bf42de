//! The `[audit]` section: where the audit trail goes, with its defaults and checks.

use serde::{Deserialize, Serialize};

use crate::section::Problems;
use crate::subject::Pattern;

/// Where audit records go. A structured log line (target `edgerelay::audit`) is written for
/// each whatever this says.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Publish audit records to JetStream.
    pub enabled: bool,
    /// The JetStream stream holding them; created if missing (file storage).
    pub stream: String,
    /// Records go to `<subject_prefix>.<relay.id>.refused`, `….refusals` and `….counts`; the
    /// stream captures `<subject_prefix>.>`.
    pub subject_prefix: String,
    /// How long the stream keeps records, seconds. Set when the relay creates the stream; an
    /// existing stream keeps its own limits.
    pub max_age_secs: u64,
    /// Most bytes the stream keeps; beyond it the oldest records go. Set when the relay creates
    /// the stream, like `max_age_secs`: what refusals cost the NATS cluster has a ceiling.
    pub max_bytes: u64,
    /// Records waiting to be published, at most; beyond it they are dropped and counted
    /// (`edgerelay_audit_dropped_total`): auditing never slows the data path.
    pub queue_capacity: usize,
    /// How often the per-identity publish counts are written, seconds.
    pub counts_interval_secs: u64,
    /// Refusals of requests that never authenticated are not written one by one: they are
    /// counted per protocol, code, reason and source prefix, and every this many milliseconds
    /// each count becomes one `refusals` record and one log line.
    pub refusals_interval_ms: u64,
    /// Distinct (protocol, code, reason, source) counts kept per interval, at most; refusals
    /// from further sources are folded into the source `other` (and counted in
    /// `edgerelay_audit_refusals_folded_total`).
    pub refusals_max_keys: usize,
    /// The source of an IPv4 peer: its address cut to this prefix length (32: the address).
    pub ipv4_prefix_len: u8,
    /// The source of an IPv6 peer: its address cut to this prefix length (64: its /64, which
    /// one host usually holds whole).
    pub ipv6_prefix_len: u8,
    /// Refusal log lines (target `edgerelay::audit`) of one kind (`refused`, `refusals`) per
    /// `log_interval_ms`, at most; the rest are counted and summed up in one "suppressed"
    /// line when the interval ends. Audit records are not affected.
    pub log_lines_per_interval: u32,
    /// See `log_lines_per_interval`, milliseconds.
    pub log_interval_ms: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            stream: "EDGERELAY_AUDIT".into(),
            subject_prefix: "edgerelay.audit".into(),
            max_age_secs: 7 * 86_400,
            queue_capacity: 10_000,
            counts_interval_secs: 60,
            max_bytes: 1 << 30,
            refusals_interval_ms: 60_000,
            refusals_max_keys: 256,
            ipv4_prefix_len: 32,
            ipv6_prefix_len: 64,
            log_lines_per_interval: 20,
            log_interval_ms: 10_000,
        }
    }
}

impl AuditConfig {
    /// Everything wrong with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Problems::default();
        p.bad(self.enabled && self.stream.is_empty(), "audit.stream is required");
        let prefix = &self.subject_prefix;
        p.refused(Pattern::parse(&format!("{prefix}.>")), |e| {
            format!("audit.subject_prefix {prefix:?}: {e}")
        });
        p.nonzero("audit.queue_capacity", self.queue_capacity);
        p.nonzero("audit.counts_interval_secs", self.counts_interval_secs);
        p.nonzero("audit.max_bytes", self.max_bytes);
        p.bad(self.max_bytes > i64::MAX as u64, "audit.max_bytes is too large");
        p.nonzero("audit.refusals_interval_ms", self.refusals_interval_ms);
        p.nonzero("audit.refusals_max_keys", self.refusals_max_keys);
        p.nonzero("audit.log_interval_ms", self.log_interval_ms);
        p.bad(self.ipv4_prefix_len > 32, "audit.ipv4_prefix_len must be at most 32");
        p.bad(self.ipv6_prefix_len > 128, "audit.ipv6_prefix_len must be at most 128");
        p.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::assert_reported;

    #[test]
    fn audit_settings_are_checked() {
        let audit = AuditConfig {
            stream: String::new(),
            subject_prefix: "a.>".into(),
            queue_capacity: 0,
            max_bytes: 0,
            refusals_interval_ms: 0,
            refusals_max_keys: 0,
            ipv4_prefix_len: 33,
            ipv6_prefix_len: 129,
            log_interval_ms: 0,
            ..AuditConfig::default()
        };
        let all = audit.problems().join("\n");
        assert_reported(
            &all,
            &[
                "audit.stream is required",
                "audit.subject_prefix \"a.>\"",
                "audit.queue_capacity",
                "audit.max_bytes",
                "audit.refusals_interval_ms",
                "audit.refusals_max_keys",
                "audit.ipv4_prefix_len",
                "audit.ipv6_prefix_len",
                "audit.log_interval_ms",
            ],
        );
        assert!(AuditConfig::default().problems().is_empty());
    }
}
