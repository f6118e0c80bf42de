//! The one configuration file (`/etc/edgerelay/edgerelay.toml` in production): loading it, the
//! top-level [`Config`] that puts the sections together, the `[relay]` section, and the rules
//! that span several sections.
//!
//! Each component owns its section's types, defaults and `problems()`:
//! [`crate::ingest::config`] (`[https]`, `[quic]`, `[idempotency]`), [`crate::auth::config`],
//! [`crate::batch::config`], [`crate::sink::config`] (`[nats]`, `[stream]`),
//! [`crate::spool::config`], [`crate::audit::config`] and [`crate::admin::config`]; the
//! components never import this module. Every field has a default suited to a production PoP
//! unless it names something that only the operator knows (certificate paths, NATS URLs,
//! tokens). Unknown fields are refused, and [`Config::validate`] reports every problem at once
//! so one `check-config` run fixes a file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::admin::config::AdminConfig;
use crate::audit::config::AuditConfig;
use crate::auth::config::AuthConfig;
use crate::batch::config::BatchConfig;
use crate::ingest::config::{
    AckMode, HttpsConfig, IdempotencyConfig, PeersConfig, QuicConfig, Settings, DECODED_EVENT_BYTES,
};
use crate::section::{ms, Exposed, Problems};
use crate::sink::config::{NatsConfig, StreamConfig};
use crate::spool::config::SpoolConfig;
use crate::subject::Pattern;

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Identity of this relay instance and how it answers the edge.
    pub relay: RelayConfig,
    /// The HTTPS (HTTP/1.1 + HTTP/2) listener.
    pub https: HttpsConfig,
    /// The QUIC listener (native `edgerelay/1` protocol); off unless `quic.listen` is set.
    pub quic: QuicConfig,
    /// How events are coalesced into batches.
    pub batch: BatchConfig,
    /// The NATS cluster the relay publishes to.
    pub nats: NatsConfig,
    /// The JetStream stream that stores the batches.
    pub stream: StreamConfig,
    /// Who may publish where.
    pub auth: AuthConfig,
    /// Remembering idempotency keys so client retries are answered, not stored twice.
    pub idempotency: IdempotencyConfig,
    /// What the relay grants its peers: the memory budget and its shares, source prefixes.
    pub peers: PeersConfig,
    /// The admin listener: health, readiness and Prometheus metrics.
    pub admin: AdminConfig,
    /// The audit trail of refusals and per-identity publish counts.
    pub audit: AuditConfig,
    /// The disk spool: batches kept on local disk while no NATS cluster takes them.
    pub spool: SpoolConfig,
}

/// The `[relay]` section: this relay instance, and when and how it answers the edge.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Name of this relay, unique per PoP (e.g. `fra1-a`); first part of every `Nats-Msg-Id`.
    /// Tokens of `[A-Za-z0-9_-]`, so it can also appear in subjects.
    pub id: String,
    /// When the edge gets its 202: `durable` (after the PubAck), `spooled` (after the PubAck,
    /// or after the disk spool holds it when no cluster does) or `accepted` (after enqueue).
    pub ack_mode: AckMode,
    /// On SIGTERM/SIGINT: how long to keep flushing queued batches and waiting for acks before
    /// giving up and exiting (anything still unanswered gets 503 `shutting_down`).
    pub shutdown_grace_ms: u64,
    /// Longest subject accepted for publishing, bytes.
    pub max_subject_bytes: usize,
}

/// Every problem found in a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML or has unknown or wrongly typed fields.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// Fields with values that cannot work, one line each.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            id: "edgerelay".into(),
            ack_mode: AckMode::Durable,
            shutdown_grace_ms: 10_000,
            max_subject_bytes: 256,
        }
    }
}

impl RelayConfig {
    /// Everything wrong with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Problems::default();
        p.name("relay.id", &self.id);
        p.nonzero("relay.max_subject_bytes", self.max_subject_bytes);
        p.into_vec()
    }
}

impl Config {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config = Self::read(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a file without validating the values (for tools such as `edgerelay
    /// spool inspect` that need one section of a config, not a startable relay).
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse { path: path.into(), message })
    }

    /// Parses TOML text without validating the values.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks every field and reports all problems together: each section's own, then the
    /// rules that span sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let errs = [
            self.relay.problems(),
            self.https.problems(),
            self.quic.problems(),
            self.batch.problems(),
            self.nats.problems(),
            self.stream.problems(),
            self.auth.problems(),
            self.idempotency.problems(),
            self.peers.problems(),
            self.audit.problems(),
            self.spool.problems(),
            self.cross_section_problems(),
        ]
        .concat();
        match errs.is_empty() {
            true => Ok(()),
            false => Err(ConfigError::Invalid(errs)),
        }
    }

    /// The file `path` this config was read from and the files it names that hold secrets
    /// (TLS and NATS keys, NATS credentials), where users other than the relay's can read
    /// them: one warning each, logged at start and on reload and printed by `check-config`.
    /// Certificates, CA files and JWKS files are public and not checked.
    pub fn exposed_files(&self, path: &Path) -> Vec<Exposed> {
        let mut files = vec![("config".to_owned(), path)];
        files.extend(self.https.secret_files());
        files.extend(self.nats.secret_files());
        files.iter().filter_map(|(field, path)| Exposed::check(field, path)).collect()
    }

    /// Settings that are valid but probably not meant: a warning each, logged at start and on
    /// reload and printed by `check-config`.
    pub fn doubts(&self) -> Vec<String> {
        let rl = &self.auth.rate_limit;
        let most = self.https.max_events_per_request as u64;
        let buckets = [
            ("auth.rate_limit.burst", rl.events_per_sec, rl.burst),
            ("auth.rate_limit.tenant_burst", rl.tenant_events_per_sec, rl.tenant_burst),
        ];
        buckets
            .into_iter()
            .filter_map(|(field, per_sec, burst)| {
                // 0 is one second's worth.
                let burst = if burst == 0 { per_sec } else { burst };
                (per_sec > 0 && burst < most).then(|| {
                    format!(
                        "{field} is {burst} events, fewer than https.max_events_per_request ({most}): \
                         a request of more events than {burst} is always refused (429 request_over_burst)"
                    )
                })
            })
            .collect()
    }

    /// What the ingest pipeline is built from.
    pub fn ingest(&self) -> Settings {
        Settings {
            ack_mode: self.relay.ack_mode,
            max_subject_bytes: self.relay.max_subject_bytes,
            max_event_bytes: self.https.max_event_bytes,
            max_events_per_request: self.https.max_events_per_request,
            stream_subjects: self.stream.subjects.clone(),
            wait_for_first: ms(self.nats.publish_deadline_ms),
            idempotency: self.idempotency.clone(),
            peers: self.peers.clone(),
            largest_request: self.largest_request(),
        }
    }

    /// The most one request may hold of the memory budget, bytes: its largest read (a whole
    /// body or a native frame) kept, a JSON body's decoded copies of it, and its events.
    pub fn largest_request(&self) -> usize {
        let h = &self.https;
        let read = h.max_body_bytes.max(h.max_event_bytes).max(self.quic.max_frame_bytes);
        2 * read + h.max_events_per_request * DECODED_EVENT_BYTES
    }

    /// The rules that involve more than one section.
    fn cross_section_problems(&self) -> Vec<String> {
        let mut p = Problems::default();
        let (h, q, b) = (&self.https, &self.quic, &self.batch);
        p.bad(
            h.listen.port() != 0 && h.listen == self.admin.listen,
            "https.listen and admin.listen are the same address",
        );
        p.bad(
            q.listen.is_some_and(|a| a.port() != 0 && a == self.admin.listen),
            "quic.listen and admin.listen are the same address",
        );
        p.bad(
            q.max_frame_bytes < h.max_event_bytes + 1024,
            "quic.max_frame_bytes must exceed https.max_event_bytes by at least 1 KiB",
        );
        p.bad(
            b.max_bytes < h.max_event_bytes + 1024,
            format!(
                "batch.max_bytes ({}) must exceed https.max_event_bytes ({}) by at least 1 KiB so any event fits a batch",
                b.max_bytes, h.max_event_bytes
            ),
        );
        let (largest, peers) = (self.largest_request(), &self.peers);
        for (name, share) in [
            ("peers.memory_budget_bytes", peers.memory_budget_bytes),
            ("peers.memory_per_source_bytes", peers.memory_per_source_bytes),
            ("peers.memory_per_connection_bytes", peers.memory_per_connection_bytes),
        ] {
            p.bad(
                share > 0 && share < largest,
                format!("{name} ({share}) must hold the largest request ({largest} bytes: twice the larger of https.max_body_bytes and quic.max_frame_bytes, plus {DECODED_EVENT_BYTES} bytes per event of https.max_events_per_request), or it is refused always"),
            );
        }
        let refused = format!("{}.{}.refused", self.audit.subject_prefix, self.relay.id);
        let mut stream_patterns =
            self.stream.subjects.iter().filter_map(|s| Pattern::parse(s).ok());
        p.bad(
            stream_patterns.any(|s| s.matches(&refused)),
            "audit.subject_prefix overlaps stream.subjects: audit records would land in the event stream",
        );
        let (ack_mode, sp) = (self.relay.ack_mode, &self.spool);
        p.bad(
            ack_mode == AckMode::Spooled && !sp.enabled,
            "relay.ack_mode = \"spooled\" needs spool.enabled = true",
        );
        p.bad(
            ack_mode == AckMode::Durable && sp.enabled,
            "spool.enabled has no effect with relay.ack_mode = \"durable\" (an event is answered only once JetStream has it): use \"spooled\" or \"accepted\", or turn the spool off",
        );
        // A record is one batch plus its Msg-Id, subject and framing (well under 4 KiB).
        let record = b.max_bytes as u64 + 4096;
        p.bad(
            sp.enabled && sp.segment_bytes < record,
            format!(
                "spool.segment_bytes ({}) must hold the largest record ({record} bytes: batch.max_bytes + 4 KiB)",
                sp.segment_bytes
            ),
        );
        p.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::auth::config::{CertIdentity, JwtConfig, MtlsConfig, RoleConfig, StaticToken};
    use crate::section::assert_reported;
    use crate::sink::config::{ClusterConfig, Storage};
    use crate::spool::config::FsyncPolicy;

    fn problems(text: &str) -> String {
        match Config::parse(text).unwrap().validate() {
            Ok(()) => String::new(),
            Err(ConfigError::Invalid(e)) => e.join("\n"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Config::parse("[batch]\nmax_event = 3\n").unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let all = problems(
            r#"
            [relay]
            id = "a.b"
            [batch]
            max_events = 0
            [stream]
            replicas = 2
            subjects = ["edge.>.x"]
            [auth]
            static_tokens = [{ name = "t", token = "short", allow = ["a.*"] }]
            "#,
        );
        assert_reported(
            &all,
            &[
                "relay.id",
                "https.tls_cert is required",
                "batch.max_events",
                "stream.replicas",
                "stream.subjects",
                "at least 16 characters",
            ],
        );
    }

    #[test]
    fn rules_across_sections_are_checked() {
        let all = problems(
            r#"
            [relay]
            id = "r"
            [https]
            listen = "127.0.0.1:9090"
            max_event_bytes = 600000
            max_body_bytes = 600000
            [quic]
            listen = "127.0.0.1:9090"
            max_frame_bytes = 1000
            [stream]
            subjects = [">"]
            [peers]
            memory_per_connection_bytes = 1048576
            "#,
        );
        assert_reported(
            &all,
            &[
                "peers.memory_per_connection_bytes (1048576) must hold the largest request (1392000 bytes",
                "https.listen and admin.listen are the same address",
                "quic.listen and admin.listen are the same address",
                "quic.max_frame_bytes must exceed https.max_event_bytes",
                "batch.max_bytes (524288) must exceed https.max_event_bytes (600000)",
                "audit.subject_prefix overlaps stream.subjects",
            ],
        );
    }

    #[test]
    fn the_shipped_example_is_valid_but_for_its_certificate_paths() {
        let text = include_str!("../config/edgerelay.example.toml");
        let cfg = Config::parse(text).unwrap();
        let Err(ConfigError::Invalid(errs)) = cfg.validate() else { panic!("cert paths missing") };
        assert!(errs.iter().all(|e| e.starts_with("https.tls_")), "{errs:?}");
    }

    #[test]
    fn the_spooled_ack_mode_and_the_spool_go_together() {
        for (text, needle) in [
            ("[relay]\nack_mode = \"spooled\"\n", "needs spool.enabled"),
            ("[spool]\nenabled = true\n", "has no effect with relay.ack_mode = \"durable\""),
        ] {
            let all = problems(text);
            assert!(all.contains(needle), "{all}");
        }
    }

    #[test]
    fn a_spool_segment_holds_the_largest_batch() {
        let text =
            "[relay]\nack_mode = \"spooled\"\n[spool]\nenabled = true\nsegment_bytes = 4096\n";
        assert!(problems(text).contains("spool.segment_bytes (4096) must hold the largest record"));
        // Off, the spool is not checked.
        assert!(!problems("[spool]\nsegment_bytes = 4096\n").contains("spool"));
    }

    #[test]
    fn defaults_are_documented_values() {
        let cfg = Config::default();
        assert_eq!(cfg.relay.ack_mode, AckMode::Durable);
        assert_eq!(cfg.stream.duplicate_window_ms, 120_000);
        assert!(cfg.batch.max_bytes > cfg.https.max_event_bytes);
        assert!(!cfg.spool.enabled);
        assert_eq!(cfg.spool.dir, Path::new("/var/lib/edgerelay/spool"));
        assert_eq!((cfg.spool.max_bytes, cfg.spool.segment_bytes), (1 << 30, 64 << 20));
        assert_eq!((cfg.spool.fsync, cfg.spool.fsync_interval_ms), (FsyncPolicy::Always, 100));
        // The default segment holds the largest record and the largest batch fits a record.
        let mut enabled = Config {
            spool: SpoolConfig { enabled: true, ..SpoolConfig::default() },
            ..Config::default()
        };
        enabled.relay.ack_mode = AckMode::Spooled;
        let errs = match enabled.validate() {
            Ok(()) => Vec::new(),
            Err(ConfigError::Invalid(e)) => e,
            Err(e) => panic!("{e}"),
        };
        assert!(!errs.iter().any(|e| e.contains("spool")), "{errs:?}");
    }

    /// A config with every list of tables, optional table and optional value given one
    /// element or value, so that serializing it shows every field (`None`s are skipped). A new
    /// `Option` field must be set here too.
    fn every_field_set() -> Config {
        let path = |p: &str| Some(PathBuf::from(p));
        let mut cfg = Config::default();
        cfg.quic.listen = Some(SocketAddr::from(([0, 0, 0, 0], 8443)));
        let n = &mut cfg.nats;
        (n.creds_file, n.nkey_seed_file) = (path("/n.creds"), path("/n.seed"));
        (n.user, n.password, n.token) = (Some("u".into()), Some("p".into()), Some("t".into()));
        (n.tls_ca, n.tls_cert, n.tls_key) = (path("/ca"), path("/cert"), path("/key"));
        cfg.nats.clusters.push(ClusterConfig {
            name: "fra".into(),
            region: "eu-central".into(),
            urls: vec!["nats://10.0.0.1:4222".into()],
            creds_file: path("/c.creds"),
            user: Some("cu".into()),
            password: Some("cp".into()),
            token: Some("ct".into()),
            nkey_seed_file: path("/c.seed"),
            tls_ca: path("/cca"),
            tls_cert: path("/ccert"),
            tls_key: path("/ckey"),
        });
        cfg.auth.static_tokens.push(StaticToken::default());
        cfg.auth.roles.push(RoleConfig {
            require: [("org.tier".to_owned(), "gold".to_owned())].into(),
            ..RoleConfig::default()
        });
        cfg.auth.rate_limit.tenant_claim = Some("tenant".into());
        cfg.auth.jwt = Some(JwtConfig {
            jwks_url: Some("https://idp.example.com/jwks".into()),
            jwks_file: path("/jwks.json"),
            ca_file: path("/idp-ca.pem"),
            ..JwtConfig::default()
        });
        cfg.auth.mtls =
            Some(MtlsConfig { identities: vec![CertIdentity::default()], ..Default::default() });
        cfg
    }

    /// `(table, key)` of every field, as the TOML file spells them.
    fn every_field() -> Vec<(String, String)> {
        fn walk(table: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
            let Some(map) = v.as_object() else { return };
            for (key, value) in map {
                let path = if table.is_empty() { key.clone() } else { format!("{table}.{key}") };
                match value {
                    serde_json::Value::Object(_) if key != "require" => walk(&path, value, out),
                    serde_json::Value::Array(items)
                        if items.first().is_some_and(|i| i.is_object()) =>
                    {
                        walk(&path, &items[0], out)
                    }
                    _ => out.push((table.to_owned(), key.clone())),
                }
            }
        }
        let mut out = Vec::new();
        walk("", &serde_json::to_value(every_field_set()).unwrap(), &mut out);
        out
    }

    #[test]
    fn a_serialized_config_parses_back_to_the_same_config() {
        let example = Config::parse(include_str!("../config/edgerelay.example.toml")).unwrap();
        let mut spooled = Config::default();
        spooled.relay.ack_mode = AckMode::Spooled;
        spooled.spool =
            SpoolConfig { enabled: true, fsync: FsyncPolicy::Interval, ..SpoolConfig::default() };
        spooled.stream.storage = Storage::Memory;
        for cfg in [example, Config::default(), every_field_set(), spooled] {
            let text = toml::to_string(&cfg).unwrap();
            assert_eq!(Config::parse(&text).as_ref(), Ok(&cfg), "{text}");
        }
        let text = toml::to_string(&Config::default()).unwrap();
        assert!(!text.contains("creds_file"), "None fields are left out:\n{text}");
    }

    #[test]
    fn the_example_config_mentions_every_field() {
        // The reference for operators is config/edgerelay.example.toml (every field, commented
        // out where the default is fine): a field added to the struct must be added there.
        let text = include_str!("../config/edgerelay.example.toml");
        let mut table = String::new();
        let mut mentioned = std::collections::HashSet::new();
        for line in text.lines() {
            let line = line.trim().trim_start_matches('#').trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
                table = name.trim_start_matches('[').to_owned();
            } else if let Some((key, _)) = line.split_once('=') {
                let key = key.trim();
                if !key.is_empty()
                    && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                {
                    mentioned.insert((table.clone(), key.to_owned()));
                }
            }
        }
        let missing: Vec<String> = every_field()
            .into_iter()
            .filter(|f| !mentioned.contains(f))
            .map(|(t, k)| format!("[{t}] {k}"))
            .collect();
        assert!(
            missing.is_empty(),
            "not in config/edgerelay.example.toml:\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn a_burst_smaller_than_the_largest_request_is_doubted() {
        let mut config = Config::default();
        assert_eq!(config.doubts(), Vec::<String>::new(), "no limit, no doubt");
        config.https.max_events_per_request = 1_000;
        config.auth.rate_limit.events_per_sec = 100; // burst 0: one second's worth, 100
        config.auth.rate_limit.tenant_events_per_sec = 5_000;
        let doubts = config.doubts();
        assert_eq!(doubts.len(), 1, "{doubts:?}");
        assert!(doubts[0].starts_with("auth.rate_limit.burst is 100 events"), "{doubts:?}");
        config.auth.rate_limit.burst = 1_000;
        config.auth.rate_limit.tenant_burst = 10;
        let doubts = config.doubts();
        assert_eq!(doubts.len(), 1, "{doubts:?}");
        assert!(doubts[0].starts_with("auth.rate_limit.tenant_burst is 10 events"), "{doubts:?}");
    }

    #[cfg(unix)]
    #[test]
    fn the_config_and_the_secret_files_it_names_are_checked_and_public_files_are_not() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, "x").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let mut config = Config::default();
        config.https.tls_cert = file("cert.pem", 0o644);
        config.https.tls_key = file("key.pem", 0o600);
        config.nats.creds_file = Some(file("nats.creds", 0o644));
        config.nats.tls_ca = Some(file("nats-ca.pem", 0o644));
        config.nats.clusters = vec![
            ClusterConfig { tls_key: Some(file("c0.key", 0o600)), ..Default::default() },
            ClusterConfig { nkey_seed_file: Some(file("c1.nk", 0o604)), ..Default::default() },
        ];
        config.auth.jwt =
            Some(JwtConfig { jwks_file: Some(file("jwks.json", 0o644)), ..Default::default() });
        let path = file("edgerelay.toml", 0o644);
        let fields: Vec<String> =
            config.exposed_files(&path).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["config", "nats.creds_file", "nats.clusters[1].nkey_seed_file"]);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(config.exposed_files(&path).len(), 2);
    }
}
