//! The sections of the sink: `[nats]` (with `[[nats.clusters]]` and `[nats.failover]`) and
//! `[stream]`, with their defaults and checks.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::section::Problems;
use crate::subject::Pattern;

/// Where batches go: one NATS cluster (`urls` and the credentials here), or several
/// (`[[nats.clusters]]`), of which the relay publishes to the nearest healthy one.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs of the cluster, e.g. `nats://10.0.0.1:4222`; the client picks and fails
    /// over among them. With `clusters` set, leave this empty.
    pub urls: Vec<String>,
    /// Several clusters, each with its own URLs (e.g. this region's and the next region's).
    /// The relay measures its round trip to each and publishes to the nearest healthy one
    /// ([`FailoverConfig`]). Credentials given here override those of `[nats]`, which every
    /// cluster inherits otherwise.
    pub clusters: Vec<ClusterConfig>,
    /// When to leave a cluster and when to come back to a nearer one.
    pub failover: FailoverConfig,
    /// Client connection name, shown by the NATS server's monitoring.
    pub client_name: String,
    /// NATS credentials file (JWT + nkey seed), if the cluster uses decentralized auth.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// User name (with `password`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Password (with `user`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Token authentication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file holding the NATS user's nkey seed (`SU…`), for nkey authentication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_seed_file: Option<PathBuf>,
    /// PEM CA that signed the NATS servers' certificates, to use TLS to NATS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate (with `tls_key`) for mutual TLS to NATS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Timeout of one connection attempt, milliseconds.
    pub connect_timeout_ms: u64,
    /// Batches published and not yet acknowledged, at most (over all clusters). Beyond it the
    /// batchers wait and the queues fill (backpressure).
    pub max_inflight_batches: usize,
    /// How long to wait for one PubAck before publishing the batch again (same Msg-Id).
    pub ack_timeout_ms: u64,
    /// Total time a batch may take, from flush to PubAck, including retries; then its events
    /// are answered 504 `ack_timeout` (or 503 `nats_unavailable` if disconnected). Keep it
    /// under the edge's own request timeout.
    pub publish_deadline_ms: u64,
    /// First pause before a retry, milliseconds; doubles up to 1 s.
    pub retry_backoff_ms: u64,
}

/// One NATS cluster of `[[nats.clusters]]`. Credential fields left out are taken from
/// `[nats]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Short name, used in logs, metrics (`cluster` label) and answers. Tokens of
    /// `[A-Za-z0-9_-]`, unique.
    pub name: String,
    /// Where the cluster runs (e.g. `eu-central`), for logs and `/debug/clusters`.
    pub region: String,
    /// Server URLs of this cluster.
    pub urls: Vec<String>,
    /// As `nats.creds_file`, for this cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// As `nats.user`, for this cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// As `nats.password`, for this cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// As `nats.token`, for this cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// As `nats.nkey_seed_file`, for this cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_seed_file: Option<PathBuf>,
    /// As `nats.tls_ca`, for this cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// As `nats.tls_cert`, for this cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// As `nats.tls_key`, for this cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
}

/// How the relay chooses among several clusters. A cluster is healthy while it is connected,
/// its stream is checked, and fewer than `unhealthy_after_failures` probes or publishes in a
/// row failed. The relay publishes to the healthy cluster with the lowest measured round
/// trip; it leaves the active cluster as soon as it turns unhealthy (failover), and moves to a
/// nearer one only after that one has been healthy for `failback_after_ms` and is nearer by
/// `failback_margin_ms` (fail-back with hysteresis, so a flapping cluster is not followed).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailoverConfig {
    /// How often the round trip to every cluster is measured (a JetStream `STREAM.INFO`
    /// request), milliseconds.
    pub probe_interval_ms: u64,
    /// A probe unanswered after this long counts as a failure, milliseconds.
    pub probe_timeout_ms: u64,
    /// Failed probes or publish attempts (ack timeout, JetStream unavailable) in a row that
    /// make a cluster unhealthy. A lost connection makes it unhealthy at once.
    pub unhealthy_after_failures: u32,
    /// How long a recovered, nearer cluster must stay healthy before the relay moves back to
    /// it, milliseconds.
    pub failback_after_ms: u64,
    /// How much nearer (lower round trip) another healthy cluster must be before the relay
    /// moves to it, milliseconds.
    pub failback_margin_ms: u64,
}

/// JetStream storage backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    #[default]
    File,
    Memory,
}

/// The JetStream stream that stores the batches.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Stream name.
    pub name: String,
    /// Subjects the stream captures (NATS wildcards allowed). Every subject the relay may
    /// publish on must fall under one of them; others are refused at ingest with 403.
    pub subjects: Vec<String>,
    /// Replicas (1, 3 or 5). Production streams should be R3: an R1 stream loses what it has
    /// not fsynced when its server's machine dies.
    pub replicas: usize,
    /// `file` or `memory`.
    pub storage: Storage,
    /// JetStream's de-duplication window for `Nats-Msg-Id`, milliseconds. A batch retried
    /// within it is stored once.
    pub duplicate_window_ms: u64,
    /// Oldest message kept, seconds; 0 = no limit.
    pub max_age_secs: u64,
    /// Most bytes kept; -1 = no limit.
    pub max_bytes: i64,
    /// Create the stream if it does not exist. When false the relay only checks it.
    pub create: bool,
    /// The NATS servers run with `jetstream { sync_interval: always }` (fsync before every
    /// acknowledgement). Only silences the start-up warning about an R1 stream on servers
    /// that fsync lazily; the relay cannot read the servers' setting itself.
    pub server_sync_always: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: vec!["nats://127.0.0.1:4222".into()],
            clusters: Vec::new(),
            failover: FailoverConfig::default(),
            client_name: "edgerelay".into(),
            creds_file: None,
            user: None,
            password: None,
            token: None,
            nkey_seed_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            connect_timeout_ms: 2_000,
            max_inflight_batches: 256,
            ack_timeout_ms: 1_000,
            publish_deadline_ms: 5_000,
            retry_backoff_ms: 50,
        }
    }
}

impl NatsConfig {
    /// The files of this section that hold secrets (credentials, nkey seeds, TLS private
    /// keys, of `[nats]` and of each cluster), with their fields.
    pub fn secret_files(&self) -> Vec<(String, &std::path::Path)> {
        let sections = std::iter::once((
            "nats.".to_owned(),
            [&self.creds_file, &self.nkey_seed_file, &self.tls_key],
        ))
        .chain(self.clusters.iter().enumerate().map(|(i, c)| {
            (format!("nats.clusters[{i}]."), [&c.creds_file, &c.nkey_seed_file, &c.tls_key])
        }));
        let mut files = Vec::new();
        for (prefix, paths) in sections {
            for (name, path) in ["creds_file", "nkey_seed_file", "tls_key"].into_iter().zip(paths) {
                if let Some(path) = path {
                    files.push((format!("{prefix}{name}"), path.as_path()));
                }
            }
        }
        files
    }

    /// The clusters to connect to, with inherited credentials filled in: `clusters`, or one
    /// cluster named `default` from `urls`.
    pub fn resolved_clusters(&self) -> Vec<ClusterConfig> {
        let inherit = |c: &ClusterConfig| ClusterConfig {
            name: c.name.clone(),
            region: c.region.clone(),
            urls: c.urls.clone(),
            creds_file: c.creds_file.clone().or_else(|| self.creds_file.clone()),
            user: c.user.clone().or_else(|| self.user.clone()),
            password: c.password.clone().or_else(|| self.password.clone()),
            token: c.token.clone().or_else(|| self.token.clone()),
            nkey_seed_file: c.nkey_seed_file.clone().or_else(|| self.nkey_seed_file.clone()),
            tls_ca: c.tls_ca.clone().or_else(|| self.tls_ca.clone()),
            tls_cert: c.tls_cert.clone().or_else(|| self.tls_cert.clone()),
            tls_key: c.tls_key.clone().or_else(|| self.tls_key.clone()),
        };
        if self.clusters.is_empty() {
            let single = ClusterConfig {
                name: "default".into(),
                urls: self.urls.clone(),
                ..ClusterConfig::default()
            };
            vec![inherit(&single)]
        } else {
            self.clusters.iter().map(inherit).collect()
        }
    }

    /// Everything wrong with this section, `[[nats.clusters]]` and `[nats.failover]` included.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Problems::default();
        p.bad(
            !self.clusters.is_empty() && !self.urls.is_empty() && self.urls != Self::default().urls,
            "nats: give either urls (one cluster) or [[nats.clusters]], not both",
        );
        let clusters = self.resolved_clusters();
        let mut names = HashSet::new();
        for (i, c) in clusters.iter().enumerate() {
            let at = match self.clusters.is_empty() {
                true => "nats".to_owned(),
                false => format!("nats.clusters[{i}]"),
            };
            if !self.clusters.is_empty() {
                p.name(&format!("{at}.name"), &c.name);
                p.bad(!names.insert(&c.name), format!("{at}.name: {:?} is used twice", c.name));
            }
            p.bad(c.urls.is_empty(), format!("{at}.urls must list at least one server"));
            for u in &c.urls {
                p.refused(u.parse::<async_nats::ServerAddr>(), |_| {
                    format!("{at}.urls: {u:?} is not a NATS URL")
                });
            }
            p.bad(
                c.user.is_some() != c.password.is_some(),
                format!("{at}: user and password go together"),
            );
            let methods = [
                c.creds_file.is_some(),
                c.nkey_seed_file.is_some(),
                c.user.is_some(),
                c.token.is_some(),
            ];
            p.bad(
                methods.iter().filter(|m| **m).count() > 1,
                format!("{at}: use only one of creds_file, nkey_seed_file, user/password, token"),
            );
            p.bad(
                c.tls_cert.is_some() != c.tls_key.is_some(),
                format!("{at}: tls_cert and tls_key go together"),
            );
            for (name, path) in [
                ("creds_file", &c.creds_file),
                ("nkey_seed_file", &c.nkey_seed_file),
                ("tls_ca", &c.tls_ca),
                ("tls_cert", &c.tls_cert),
                ("tls_key", &c.tls_key),
            ] {
                if let Some(path) = path {
                    p.file(&format!("{at}.{name}"), path);
                }
            }
        }
        p.bad(clusters.len() > 16, "nats.clusters: at most 16 clusters");
        let f = &self.failover;
        p.nonzero("nats.failover.probe_interval_ms", f.probe_interval_ms);
        p.nonzero("nats.failover.probe_timeout_ms", f.probe_timeout_ms);
        p.nonzero("nats.failover.unhealthy_after_failures", f.unhealthy_after_failures);
        p.nonzero("nats.max_inflight_batches", self.max_inflight_batches);
        p.nonzero("nats.ack_timeout_ms", self.ack_timeout_ms);
        p.bad(
            self.publish_deadline_ms < self.ack_timeout_ms,
            "nats.publish_deadline_ms must be >= nats.ack_timeout_ms",
        );
        p.into_vec()
    }
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            probe_interval_ms: 1_000,
            probe_timeout_ms: 1_000,
            unhealthy_after_failures: 3,
            failback_after_ms: 30_000,
            failback_margin_ms: 5,
        }
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            name: "EDGE".into(),
            subjects: vec!["edge.>".into()],
            replicas: 1,
            storage: Storage::File,
            duplicate_window_ms: 120_000,
            max_age_secs: 0,
            max_bytes: -1,
            create: true,
            server_sync_always: false,
        }
    }
}

impl StreamConfig {
    /// Everything wrong with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Problems::default();
        p.name("stream.name", &self.name);
        p.bad(self.subjects.is_empty(), "stream.subjects must list at least one subject");
        for s in &self.subjects {
            p.refused(Pattern::parse(s), |e| format!("stream.subjects: {s:?}: {e}"));
        }
        p.bad(!matches!(self.replicas, 1 | 3 | 5), "stream.replicas must be 1, 3 or 5");
        p.bad(self.duplicate_window_ms < 1_000, "stream.duplicate_window_ms must be at least 1000");
        p.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::{assert_reported, problems_in};

    #[test]
    fn clusters_inherit_credentials_they_do_not_set() {
        let nats: NatsConfig = toml::from_str(
            r#"
            urls = []
            token = "shared"
            [[clusters]]
            name = "fra"
            region = "eu-central"
            urls = ["nats://10.0.0.1:4222"]
            [[clusters]]
            name = "ams"
            urls = ["nats://10.1.0.1:4222"]
            token = "own"
            "#,
        )
        .unwrap();
        let c = nats.resolved_clusters();
        assert_eq!((c[0].name.as_str(), c[0].token.as_deref()), ("fra", Some("shared")));
        assert_eq!((c[1].name.as_str(), c[1].token.as_deref()), ("ams", Some("own")));
        let single = NatsConfig::default().resolved_clusters();
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].name, "default");
    }

    #[test]
    fn bad_clusters_are_reported() {
        let nats: NatsConfig = toml::from_str(
            r#"
            urls = ["nats://10.9.9.9:4222"]
            [[clusters]]
            name = "a.b"
            urls = []
            [[clusters]]
            name = "dup"
            urls = ["nats://x:1"]
            user = "u"
            [[clusters]]
            name = "dup"
            urls = ["nats://x:1"]
            [failover]
            unhealthy_after_failures = 0
            "#,
        )
        .unwrap();
        let all = nats.problems().join("\n");
        assert_reported(
            &all,
            &[
                "either urls (one cluster) or [[nats.clusters]]",
                "nats.clusters[0].name",
                "nats.clusters[0].urls must list",
                "nats.clusters[1]: user and password go together",
                "nats.clusters[2].name: \"dup\" is used twice",
                "unhealthy_after_failures",
            ],
        );
        assert!(NatsConfig::default().problems().is_empty());
    }

    #[test]
    fn stream_settings_are_checked() {
        let text = "name = \"a.b\"\nreplicas = 2\nsubjects = [\"edge.>.x\"]\n";
        let all = problems_in(text, StreamConfig::problems);
        assert_reported(
            &all,
            &[
                "stream.name: \"a.b\" must be 1-64 characters of [A-Za-z0-9_-]",
                "stream.subjects: \"edge.>.x\"",
                "stream.replicas must be 1, 3 or 5",
            ],
        );
        assert!(StreamConfig::default().problems().is_empty());
    }
}
