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
    /// Records go to `<subject_prefix>.<relay.id>.refused` and `….counts`; the stream captures
    /// `<subject_prefix>.>`.
    pub subject_prefix: String,
    /// How long the stream keeps records, seconds.
    pub max_age_secs: u64,
    /// Records waiting to be published, at most; beyond it they are dropped and counted
    /// (`edgerelay_audit_dropped_total`): auditing never slows the data path.
    pub queue_capacity: usize,
    /// How often the per-identity publish counts are written, seconds.
    pub counts_interval_secs: u64,
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
            ..AuditConfig::default()
        };
        let all = audit.problems().join("\n");
        assert_reported(
            &all,
            &["audit.stream is required", "audit.subject_prefix \"a.>\"", "audit.queue_capacity"],
        );
        assert!(AuditConfig::default().problems().is_empty());
    }
}
