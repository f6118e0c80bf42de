//! The `[spool]` section: where and how batches no cluster takes are kept on disk, with its
//! defaults and checks.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::section::Problems;

/// The disk spool (store-and-forward, see `spool`): append-only segment files under `dir`,
/// replayed in order with their original Msg-Ids once a cluster is back.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Keep batches on disk when no NATS cluster acknowledges them. Off: such events are
    /// refused (503) instead.
    pub enabled: bool,
    /// The spool's own directory (created with mode 0700; one relay per directory, held by a
    /// lock). Put it on a local disk: the spool is only as durable as this file system.
    pub dir: PathBuf,
    /// Most bytes of segment files kept; an append beyond it is refused (503 with Retry-After),
    /// never dropped silently.
    pub max_bytes: u64,
    /// A segment file is closed and a new one started past this size, bytes. Disk space comes
    /// back a whole segment at a time, once every batch in it was published.
    pub segment_bytes: u64,
    /// When an append counts as stored: `always` (after fsync), `interval` (after the write; an
    /// fsync at most every `fsync_interval_ms`) or `never` (after the write; the kernel flushes
    /// when it likes). Only `always` survives a power loss; the others survive a crash of the
    /// relay process.
    pub fsync: FsyncPolicy,
    /// With `fsync = "interval"`: longest time written records wait for their fsync,
    /// milliseconds.
    pub fsync_interval_ms: u64,
}

/// When spooled records are flushed to stable storage (see [`SpoolConfig::fsync`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// fsync before an append returns; appends waiting together share one fsync (group commit).
    #[default]
    Always,
    /// An append returns after its write; an fsync follows within `fsync_interval_ms`.
    Interval,
    /// An append returns after its write; never fsynced by the relay (the kernel writes back
    /// on its own, typically within 30 s). Survives a relay crash, not a power loss.
    Never,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            dir: PathBuf::from("/var/lib/edgerelay/spool"),
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: 100,
        }
    }
}

impl SpoolConfig {
    /// Everything wrong with this section; nothing when the spool is off.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Problems::default();
        if !self.enabled {
            return p.into_vec();
        }
        p.bad(self.dir.as_os_str().is_empty(), "spool.dir is required when spool.enabled");
        p.bad(
            !self.dir.as_os_str().is_empty() && !self.dir.is_absolute(),
            format!("spool.dir: {} must be an absolute path", self.dir.display()),
        );
        p.bad(
            self.max_bytes < self.segment_bytes,
            format!(
                "spool.max_bytes ({}) must be >= spool.segment_bytes ({})",
                self.max_bytes, self.segment_bytes
            ),
        );
        p.bad(
            self.fsync == FsyncPolicy::Interval && self.fsync_interval_ms == 0,
            "spool.fsync_interval_ms must be > 0 with fsync = \"interval\"",
        );
        p.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::{assert_reported, problems_in};

    #[test]
    fn spool_settings_are_checked_when_enabled() {
        let all = problems_in(
            r#"
            enabled = true
            dir = "relative/spool"
            max_bytes = 1048576
            segment_bytes = 4096
            fsync = "interval"
            fsync_interval_ms = 0
            "#,
            SpoolConfig::problems,
        );
        assert_reported(
            &all,
            &[
                "spool.dir: relative/spool must be an absolute path",
                "spool.fsync_interval_ms must be > 0",
            ],
        );
        let all = problems_in("enabled = true\ndir = \"\"\nmax_bytes = 1\n", SpoolConfig::problems);
        assert!(all.contains("spool.dir is required"), "{all}");
        assert!(all.contains("spool.max_bytes (1) must be >= spool.segment_bytes"), "{all}");
        // Off, the section is not checked; an unknown policy is refused by the parser.
        assert_eq!(problems_in("max_bytes = 1\n", SpoolConfig::problems), "");
        assert!(toml::from_str::<SpoolConfig>("fsync = \"sometimes\"\n").is_err());
        let err = toml::from_str::<SpoolConfig>("fsync_ms = 3\n").unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
}
