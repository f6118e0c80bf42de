//! The one configuration file (`/etc/edgerelay/edgerelay.toml` in production).
//!
//! Every field has a default suited to a production PoP unless it names something that only
//! the operator knows (certificate paths, NATS URLs, tokens). Unknown fields are refused, and
//! [`Config::validate`] reports every problem at once so one `check-config` run fixes a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
    /// The admin listener: health, readiness and Prometheus metrics.
    pub admin: AdminConfig,
    /// The audit trail of refusals and per-identity publish counts.
    pub audit: AuditConfig,
    /// The disk spool: batches kept on local disk while no NATS cluster takes them.
    pub spool: SpoolConfig,
}

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

/// When the edge is answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Answer 202 only after JetStream acknowledged the batch holding the event (default).
    #[default]
    Durable,
    /// Answer 202 as soon as the event is queued in the relay. Lower latency, but an event
    /// queued when the relay crashes (or that JetStream later refuses) is lost; with the
    /// spool on, a batch no cluster takes goes to disk instead of being dropped.
    Accepted,
    /// Answer 202 once the event is durable somewhere: after the PubAck as in `durable`, or,
    /// when no cluster acknowledges, once its batch is written (and fsynced, per
    /// `spool.fsync`) to the disk spool, answered `{"spooled": true}`. Needs `spool.enabled`.
    Spooled,
}

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

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpsConfig {
    /// Address to listen on for HTTPS (TCP).
    pub listen: SocketAddr,
    /// PEM certificate chain served to clients.
    pub tls_cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    pub tls_key: PathBuf,
    /// Connections open at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Largest request body (a multi-event request), bytes. Larger bodies get 413.
    pub max_body_bytes: usize,
    /// Largest single event payload, bytes. Must fit in one batch (`batch.max_bytes`).
    pub max_event_bytes: usize,
    /// Most events in one multi-event request.
    pub max_events_per_request: usize,
    /// Time allowed for the TLS handshake, milliseconds.
    pub tls_handshake_timeout_ms: u64,
    /// Time allowed to receive a request's headers (HTTP/1.1), milliseconds.
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight for this long is closed, milliseconds.
    pub idle_timeout_ms: u64,
    /// HTTP/2: concurrent streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: initial per-stream flow-control window, bytes. The protocol default (64 KiB)
    /// throttles a busy multiplexed edge connection; 1 MiB lets one stream carry a full body.
    pub h2_stream_window_bytes: u32,
    /// HTTP/2: initial per-connection flow-control window, bytes.
    pub h2_connection_window_bytes: u32,
    /// HTTP/2: streams the client may reset before they are accepted (rapid-reset guard).
    pub h2_max_pending_accept_reset_streams: usize,
    /// HTTP/2: streams this side may reset because of client errors before the connection is
    /// closed (error-reset flood guard).
    pub h2_max_local_error_reset_streams: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuicConfig {
    /// UDP address for QUIC, e.g. `0.0.0.0:8443`. Unset: no QUIC listener. Uses the
    /// certificate of `https.tls_cert` / `https.tls_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// QUIC connections open at once; more are refused.
    pub max_connections: usize,
    /// QUIC connections open at once from one source address.
    pub max_connections_per_ip: usize,
    /// Bidirectional streams a client may have open at once on one connection.
    pub max_streams_per_connection: u32,
    /// Flow-control window of one stream, bytes: what a stream may have in flight unread.
    pub stream_window_bytes: u32,
    /// Flow-control window of a whole connection, bytes (quinn's default is unbounded).
    pub connection_window_bytes: u32,
    /// Longest frame (one `PublishRequest`), bytes; refused from its length prefix.
    pub max_frame_bytes: usize,
    /// Requests a stream may have waiting for their answers; beyond it the relay stops reading
    /// the stream and flow control pushes back on the client.
    pub max_requests_in_flight_per_stream: usize,
    /// A connection with no traffic for this long is closed, milliseconds.
    pub idle_timeout_ms: u64,
    /// With more handshakes than this under way, new clients must first prove their address
    /// (QUIC Retry), which costs them a round trip and an attacker its spoofed addresses.
    pub retry_above_handshakes: usize,
    /// Kernel send and receive buffer of the UDP socket, bytes (0: the kernel's default).
    /// Every connection shares the one socket: at the default ~200 KiB, a few milliseconds'
    /// stall of the relay under load overflows it and QUIC has to recover the lost packets.
    /// Capped by the `net.core.rmem_max` / `wmem_max` sysctls; the relay warns if it gets less.
    pub socket_buffer_bytes: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Flush a subject's batch once it holds this many events. `1` turns batching off.
    pub max_events: usize,
    /// Flush a subject's batch before it would exceed this many bytes of encoded events. Keep
    /// it under the NATS server's `max_payload` (1 MiB by default).
    pub max_bytes: usize,
    /// Flush a batch this long after its first event arrived, milliseconds, even if not full.
    /// The main latency/throughput knob.
    pub linger_ms: u64,
    /// Publish at once when no batch is waiting for its PubAck, and linger only while acks are
    /// outstanding: unbatched latency at low rates, full batches under load (the ack clock
    /// sets the batch size). Off: every batch waits `linger_ms` unless it fills up.
    pub flush_when_idle: bool,
    /// Number of queue shards (each with its own batcher task). 0 = number of CPUs. Events of
    /// one subject always go to the same shard, so their order is kept.
    pub shards: usize,
    /// Capacity of each shard's lock-free queue, events. A full queue answers 503.
    pub queue_capacity: usize,
}

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

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Static bearer tokens, for development and tests; production uses `auth.jwt`.
    pub static_tokens: Vec<StaticToken>,
    /// OIDC / JWT bearer tokens from the company's identity provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
    /// What JWT claims grant: each role that applies to a token adds its patterns.
    pub roles: Vec<RoleConfig>,
    /// Events per second per identity (and per tenant); off by default.
    pub rate_limit: RateLimitConfig,
    /// Client certificates as identities (edge collectors), on HTTPS, HTTP/3 and QUIC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsConfig>,
}

/// Mutual TLS: a client certificate that chains to `ca_file` and carries one of the
/// configured DNS names is that identity; a request with a bearer token uses the token.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MtlsConfig {
    /// PEM CA certificate(s) that client certificates must chain to.
    pub ca_file: PathBuf,
    /// Which certificate is which identity.
    pub identities: Vec<CertIdentity>,
}

/// One client-certificate identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CertIdentity {
    /// Identity name, recorded as `publisher`.
    pub name: String,
    /// A DNS subject alternative name the certificate must carry.
    pub dns_name: String,
    /// Subject patterns this identity may publish on.
    pub allow: Vec<String>,
    /// Subject patterns refused even when allowed; deny wins.
    pub deny: Vec<String>,
}

/// Token buckets of events. Over the limit a request is refused as a whole with 429
/// `rate_limited` and a `Retry-After` of when it would pass.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Events a second each identity (static token name or the JWT identity claim) may
    /// publish; 0 = no limit.
    pub events_per_sec: u64,
    /// Events an identity may publish at once beyond the rate; 0 = one second's worth.
    pub burst: u64,
    /// A JWT claim naming the tenant (e.g. `tenant`): with `tenant_events_per_sec`, all the
    /// identities of one tenant share one more bucket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_claim: Option<String>,
    /// Events a second per tenant; 0 = no tenant limit.
    pub tenant_events_per_sec: u64,
    /// Tenant burst; 0 = one second's worth.
    pub tenant_burst: u64,
    /// Identities (and tenants) tracked at once; beyond it refilled buckets are forgotten.
    pub max_tracked: usize,
}

/// Validation of JWT bearer tokens against the identity provider's published keys (JWKS).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// The expected `iss` claim, exactly. With `discovery`, also where
    /// `/.well-known/openid-configuration` is fetched from.
    pub issuer: String,
    /// Accepted `aud` values: a token must name at least one.
    pub audiences: Vec<String>,
    /// Where the keys come from — exactly one of `jwks_url`, `discovery` or `jwks_file`.
    /// `https://` (or `http://` on a loopback address, for the dev IdP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Find the JWKS through the issuer's OIDC discovery document.
    pub discovery: bool,
    /// A local JWKS file, read again at every refresh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// PEM CA certificates to trust for the identity provider's TLS, besides the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Signature algorithms accepted: any of RS256, RS384, RS512, PS256, PS384, PS512, ES256,
    /// ES384, EdDSA. `none` and HMAC (HS*) cannot be configured.
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, seconds.
    pub leeway_secs: u64,
    /// Longest token lifetime accepted (`exp - iat`, or `exp - now` without `iat`), seconds:
    /// a leaked long-lived token is useless.
    pub max_token_lifetime_secs: u64,
    /// The claim naming the publisher (recorded on every event and in the audit stream).
    pub identity_claim: String,
    /// How often the key set is fetched again, seconds.
    pub refresh_secs: u64,
    /// Fewest seconds between two fetches, and how long a `kid` found missing stays missing:
    /// a flood of tokens with random `kid`s costs at most one fetch per cooldown.
    pub fetch_cooldown_secs: u64,
    /// One fetch's timeout, milliseconds.
    pub fetch_timeout_ms: u64,
    /// How long the last good key set keeps serving while the IdP is unreachable, seconds;
    /// beyond it every token is refused (503 `auth_unavailable`).
    pub max_stale_secs: u64,
    /// How long a key that left the key set (rotated out) still verifies tokens, seconds.
    pub key_grace_secs: u64,
    /// Validated tokens remembered (by SHA-256), so a reused token costs no signature check;
    /// never past the token's `exp`.
    pub token_cache_entries: usize,
}

/// One role: which claims it requires, and the subjects it grants.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoleConfig {
    /// Name, for logs and audit records.
    pub name: String,
    /// Claims the token must carry for the role to apply, `claim = "value"`: a string claim
    /// equal to the value or listing it among space-separated words (`scope`), or an array
    /// claim holding it. Nested claims by path (`"org.tier"`). Empty: applies to every token.
    pub require: std::collections::BTreeMap<String, String>,
    /// Subject patterns granted; `{claims.<name>}` is filled in from the token (a claim that
    /// is not one subject token drops the pattern).
    pub allow: Vec<String>,
    /// Subject patterns refused even when allowed; deny wins. A placeholder that cannot be
    /// filled in denies everything.
    pub deny: Vec<String>,
}

/// One static bearer token and what its holder may publish.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaticToken {
    /// Identity name recorded as `publisher` on every event and in logs.
    pub name: String,
    /// The secret bearer token (at least 16 characters).
    pub token: String,
    /// Subject patterns this identity may publish on (NATS wildcards).
    pub allow: Vec<String>,
    /// Subject patterns refused even when `allow` matches; deny wins.
    pub deny: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long the result for an `Idempotency-Key` is remembered, milliseconds. A retry with
    /// the same key (by the same identity) within it is answered with the first result.
    pub window_ms: u64,
    /// Most keys remembered. The newest half are always kept; older keys are forgotten half
    /// the cache at a time (see `ingest::idempotency`). Memory: about 140 bytes a key (~140 MB at the
    /// default), allocated at start-up so that nothing is allocated or grown under load.
    pub max_keys: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener (`/healthz`, `/readyz`, `/metrics`, `/debug/latency`).
    /// Plain HTTP: keep it on a management network or loopback.
    pub listen: SocketAddr,
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

impl Default for HttpsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            max_connections: 10_000,
            max_body_bytes: 1 << 20,
            max_event_bytes: 64 << 10,
            max_events_per_request: 1000,
            tls_handshake_timeout_ms: 5_000,
            header_read_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            h2_max_concurrent_streams: 256,
            h2_stream_window_bytes: 1 << 20,
            h2_connection_window_bytes: 16 << 20,
            h2_max_pending_accept_reset_streams: 100,
            h2_max_local_error_reset_streams: 1024,
        }
    }
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            listen: None,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            max_streams_per_connection: 64,
            stream_window_bytes: 256 << 10,
            connection_window_bytes: 1 << 20,
            max_frame_bytes: 1 << 20,
            max_requests_in_flight_per_stream: 32,
            idle_timeout_ms: 30_000,
            retry_above_handshakes: 256,
            socket_buffer_bytes: 4 << 20,
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_events: 256,
            max_bytes: 512 << 10,
            linger_ms: 2,
            flush_when_idle: true,
            shards: 0,
            queue_capacity: 16_384,
        }
    }
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

impl NatsConfig {
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

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self { window_ms: 120_000, max_keys: 1_000_000 }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 9090)) }
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

    /// Checks every field and reports all problems together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        let mut bad = |cond: bool, msg: String| {
            if cond {
                errs.push(msg)
            }
        };
        let r = &self.relay;
        bad(
            crate::subject::validate(&r.id, 64).is_err() || r.id.contains('.'),
            format!("relay.id: {:?} must be 1-64 characters of [A-Za-z0-9_-]", r.id),
        );
        bad(r.max_subject_bytes == 0, "relay.max_subject_bytes must be > 0".into());

        let h = &self.https;
        bad(h.tls_cert.as_os_str().is_empty(), "https.tls_cert is required".into());
        bad(h.tls_key.as_os_str().is_empty(), "https.tls_key is required".into());
        for (name, path) in [("https.tls_cert", &h.tls_cert), ("https.tls_key", &h.tls_key)] {
            bad(
                !path.as_os_str().is_empty() && !path.is_file(),
                format!("{name}: {} is not a readable file", path.display()),
            );
        }
        bad(h.max_connections == 0, "https.max_connections must be > 0".into());
        bad(h.max_event_bytes == 0, "https.max_event_bytes must be > 0".into());
        bad(
            h.max_body_bytes < h.max_event_bytes,
            "https.max_body_bytes must be >= https.max_event_bytes".into(),
        );
        bad(h.max_events_per_request == 0, "https.max_events_per_request must be > 0".into());
        bad(h.h2_max_concurrent_streams == 0, "https.h2_max_concurrent_streams must be > 0".into());
        bad(
            !(65_535..=(1 << 31) - 1).contains(&h.h2_stream_window_bytes),
            "https.h2_stream_window_bytes must be between 65535 and 2^31-1".into(),
        );
        bad(
            !(65_535..=(1 << 31) - 1).contains(&h.h2_connection_window_bytes),
            "https.h2_connection_window_bytes must be between 65535 and 2^31-1".into(),
        );
        bad(
            h.listen.port() != 0 && h.listen == self.admin.listen,
            "https.listen and admin.listen are the same address".into(),
        );

        let q = &self.quic;
        bad(
            q.listen.is_some_and(|a| a.port() != 0 && a == self.admin.listen),
            "quic.listen and admin.listen are the same address".into(),
        );
        bad(q.max_connections == 0, "quic.max_connections must be > 0".into());
        bad(q.max_connections_per_ip == 0, "quic.max_connections_per_ip must be > 0".into());
        bad(
            q.max_streams_per_connection == 0,
            "quic.max_streams_per_connection must be > 0".into(),
        );
        bad(q.stream_window_bytes < 1024, "quic.stream_window_bytes must be at least 1024".into());
        bad(
            q.connection_window_bytes < q.stream_window_bytes,
            "quic.connection_window_bytes must be >= quic.stream_window_bytes".into(),
        );
        bad(
            q.max_frame_bytes < h.max_event_bytes + 1024,
            "quic.max_frame_bytes must exceed https.max_event_bytes by at least 1 KiB".into(),
        );
        bad(
            q.max_requests_in_flight_per_stream == 0,
            "quic.max_requests_in_flight_per_stream must be > 0".into(),
        );
        bad(q.idle_timeout_ms == 0, "quic.idle_timeout_ms must be > 0".into());

        let b = &self.batch;
        bad(b.max_events == 0, "batch.max_events must be > 0 (1 turns batching off)".into());
        bad(
            b.max_bytes < h.max_event_bytes + 1024,
            format!(
                "batch.max_bytes ({}) must exceed https.max_event_bytes ({}) by at least 1 KiB so any event fits a batch",
                b.max_bytes, h.max_event_bytes
            ),
        );
        bad(
            b.max_bytes > 8 << 20,
            "batch.max_bytes must be at most 8 MiB (NATS max_payload)".into(),
        );
        bad(b.queue_capacity == 0, "batch.queue_capacity must be > 0".into());
        bad(b.shards > 1024, "batch.shards must be at most 1024".into());

        let n = &self.nats;
        bad(
            !n.clusters.is_empty() && !n.urls.is_empty() && n.urls != NatsConfig::default().urls,
            "nats: give either urls (one cluster) or [[nats.clusters]], not both".into(),
        );
        let clusters = n.resolved_clusters();
        let mut names = std::collections::HashSet::new();
        for (i, c) in clusters.iter().enumerate() {
            let at = if n.clusters.is_empty() {
                "nats".to_owned()
            } else {
                format!("nats.clusters[{i}]")
            };
            if !n.clusters.is_empty() {
                bad(
                    crate::subject::validate(&c.name, 64).is_err() || c.name.contains('.'),
                    format!("{at}.name: {:?} must be 1-64 characters of [A-Za-z0-9_-]", c.name),
                );
                bad(!names.insert(&c.name), format!("{at}.name: {:?} is used twice", c.name));
            }
            bad(c.urls.is_empty(), format!("{at}.urls must list at least one server"));
            for u in &c.urls {
                bad(
                    u.parse::<async_nats::ServerAddr>().is_err(),
                    format!("{at}.urls: {u:?} is not a NATS URL"),
                );
            }
            bad(
                c.user.is_some() != c.password.is_some(),
                format!("{at}: user and password go together"),
            );
            let methods = [
                c.creds_file.is_some(),
                c.nkey_seed_file.is_some(),
                c.user.is_some(),
                c.token.is_some(),
            ];
            bad(
                methods.iter().filter(|m| **m).count() > 1,
                format!("{at}: use only one of creds_file, nkey_seed_file, user/password, token"),
            );
            bad(
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
                if let Some(p) = path {
                    bad(
                        !p.is_file(),
                        format!("{at}.{name}: {} is not a readable file", p.display()),
                    );
                }
            }
        }
        bad(clusters.len() > 16, "nats.clusters: at most 16 clusters".into());
        let f = &n.failover;
        bad(f.probe_interval_ms == 0, "nats.failover.probe_interval_ms must be > 0".into());
        bad(f.probe_timeout_ms == 0, "nats.failover.probe_timeout_ms must be > 0".into());
        bad(
            f.unhealthy_after_failures == 0,
            "nats.failover.unhealthy_after_failures must be > 0".into(),
        );
        bad(n.max_inflight_batches == 0, "nats.max_inflight_batches must be > 0".into());
        bad(n.ack_timeout_ms == 0, "nats.ack_timeout_ms must be > 0".into());
        bad(
            n.publish_deadline_ms < n.ack_timeout_ms,
            "nats.publish_deadline_ms must be >= nats.ack_timeout_ms".into(),
        );

        let s = &self.stream;
        bad(
            s.name.is_empty()
                || s.name.len() > 64
                || !s.name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'),
            format!("stream.name: {:?} must be 1-64 characters of [A-Za-z0-9_-]", s.name),
        );
        bad(s.subjects.is_empty(), "stream.subjects must list at least one subject".into());
        for p in &s.subjects {
            if let Err(e) = Pattern::parse(p) {
                bad(true, format!("stream.subjects: {p:?}: {e}"));
            }
        }
        bad(!matches!(s.replicas, 1 | 3 | 5), "stream.replicas must be 1, 3 or 5".into());
        bad(
            s.duplicate_window_ms < 1_000,
            "stream.duplicate_window_ms must be at least 1000".into(),
        );

        for (i, t) in self.auth.static_tokens.iter().enumerate() {
            let at = format!("auth.static_tokens[{i}] ({:?})", t.name);
            bad(t.name.is_empty(), format!("{at}: name is required"));
            bad(t.token.len() < 16, format!("{at}: token must be at least 16 characters"));
            bad(t.allow.is_empty(), format!("{at}: allow must list at least one pattern"));
            for p in t.allow.iter().chain(&t.deny) {
                if let Err(e) = Pattern::parse(p) {
                    bad(true, format!("{at}: pattern {p:?}: {e}"));
                }
            }
        }
        let tokens = &self.auth.static_tokens;
        for (i, t) in tokens.iter().enumerate() {
            bad(
                tokens[..i].iter().any(|o| o.token == t.token),
                format!("auth.static_tokens[{i}]: token is used twice"),
            );
        }
        if let Some(jwt) = &self.auth.jwt {
            for e in jwt.problems() {
                bad(true, format!("auth.jwt: {e}"));
            }
        }
        for (i, role) in self.auth.roles.iter().enumerate() {
            let at = format!("auth.roles[{i}] ({:?})", role.name);
            bad(role.name.is_empty(), format!("{at}: name is required"));
            bad(
                role.allow.is_empty() && role.deny.is_empty(),
                format!("{at}: allow or deny must list at least one pattern"),
            );
            if let Err(e) = crate::auth::rbac::Roles::parse(std::slice::from_ref(role)) {
                bad(true, format!("{at}: {e}"));
            }
        }
        let rl = &self.auth.rate_limit;
        bad(rl.max_tracked == 0, "auth.rate_limit.max_tracked must be > 0".into());
        bad(
            rl.tenant_events_per_sec > 0 && rl.tenant_claim.is_none(),
            "auth.rate_limit.tenant_events_per_sec needs tenant_claim".into(),
        );
        bad(
            rl.tenant_claim.is_some() && self.auth.jwt.is_none(),
            "auth.rate_limit.tenant_claim is a JWT claim: configure auth.jwt".into(),
        );
        bad(
            !self.auth.roles.is_empty() && self.auth.jwt.is_none(),
            "auth.roles apply to JWT claims: configure auth.jwt".into(),
        );
        if let Some(m) = &self.auth.mtls {
            bad(
                !m.ca_file.is_file(),
                format!("auth.mtls.ca_file: {} is not a readable file", m.ca_file.display()),
            );
            bad(
                m.identities.is_empty(),
                "auth.mtls.identities must list at least one identity".into(),
            );
            for (i, c) in m.identities.iter().enumerate() {
                let at = format!("auth.mtls.identities[{i}] ({:?})", c.name);
                bad(c.name.is_empty(), format!("{at}: name is required"));
                bad(
                    rustls::pki_types::DnsName::try_from(c.dns_name.as_str()).is_err(),
                    format!("{at}: dns_name {:?} is not a DNS name", c.dns_name),
                );
                bad(c.allow.is_empty(), format!("{at}: allow must list at least one pattern"));
                for p in c.allow.iter().chain(&c.deny) {
                    if let Err(e) = Pattern::parse(p) {
                        bad(true, format!("{at}: pattern {p:?}: {e}"));
                    }
                }
            }
        }
        bad(
            self.auth.static_tokens.is_empty()
                && self.auth.jwt.is_none()
                && self.auth.mtls.is_none(),
            "auth: no identity configured (auth.static_tokens, auth.jwt or auth.mtls): nothing \
             could publish"
                .into(),
        );

        bad(self.idempotency.max_keys == 0, "idempotency.max_keys must be > 0".into());
        bad(self.audit.enabled && self.audit.stream.is_empty(), "audit.stream is required".into());
        if let Err(e) = Pattern::parse(&format!("{}.>", self.audit.subject_prefix)) {
            bad(true, format!("audit.subject_prefix {:?}: {e}", self.audit.subject_prefix));
        }
        bad(
            self.stream.subjects.iter().filter_map(|s| Pattern::parse(s).ok()).any(|p| {
                p.matches(&format!("{}.{}.refused", self.audit.subject_prefix, self.relay.id))
            }),
            "audit.subject_prefix overlaps stream.subjects: audit records would land in the event stream".into(),
        );
        bad(self.audit.queue_capacity == 0, "audit.queue_capacity must be > 0".into());
        bad(self.audit.counts_interval_secs == 0, "audit.counts_interval_secs must be > 0".into());

        let sp = &self.spool;
        bad(
            r.ack_mode == AckMode::Spooled && !sp.enabled,
            "relay.ack_mode = \"spooled\" needs spool.enabled = true".into(),
        );
        bad(
            r.ack_mode == AckMode::Durable && sp.enabled,
            "spool.enabled has no effect with relay.ack_mode = \"durable\" (an event is answered only once JetStream has it): use \"spooled\" or \"accepted\", or turn the spool off".into(),
        );
        if sp.enabled {
            bad(sp.dir.as_os_str().is_empty(), "spool.dir is required when spool.enabled".into());
            bad(
                !sp.dir.as_os_str().is_empty() && !sp.dir.is_absolute(),
                format!("spool.dir: {} must be an absolute path", sp.dir.display()),
            );
            // A record is one batch plus its Msg-Id, subject and framing (well under 4 KiB).
            let record = b.max_bytes as u64 + 4096;
            bad(
                sp.segment_bytes < record,
                format!(
                    "spool.segment_bytes ({}) must hold the largest record ({record} bytes: batch.max_bytes + 4 KiB)",
                    sp.segment_bytes
                ),
            );
            bad(
                sp.max_bytes < sp.segment_bytes,
                format!(
                    "spool.max_bytes ({}) must be >= spool.segment_bytes ({})",
                    sp.max_bytes, sp.segment_bytes
                ),
            );
            bad(
                sp.fsync == FsyncPolicy::Interval && sp.fsync_interval_ms == 0,
                "spool.fsync_interval_ms must be > 0 with fsync = \"interval\"".into(),
            );
        }

        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errs))
        }
    }

    /// Number of queue shards to run.
    pub fn shards(&self) -> usize {
        match self.batch.shards {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            events_per_sec: 0,
            burst: 0,
            tenant_claim: None,
            tenant_events_per_sec: 0,
            tenant_burst: 0,
            max_tracked: 100_000,
        }
    }
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audiences: Vec::new(),
            jwks_url: None,
            discovery: false,
            jwks_file: None,
            ca_file: None,
            algorithms: ["RS256", "PS256", "ES256", "EdDSA"].map(String::from).to_vec(),
            leeway_secs: 30,
            max_token_lifetime_secs: 3_600,
            identity_claim: "sub".into(),
            refresh_secs: 300,
            fetch_cooldown_secs: 10,
            fetch_timeout_ms: 5_000,
            max_stale_secs: 86_400,
            key_grace_secs: 600,
            token_cache_entries: 10_000,
        }
    }
}

impl JwtConfig {
    /// Everything wrong with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut bad = |cond: bool, msg: String| {
            if cond {
                out.push(msg);
            }
        };
        bad(self.issuer.is_empty(), "issuer is required".into());
        bad(self.audiences.is_empty(), "audiences must list at least one audience".into());
        let sources = [self.jwks_url.is_some(), self.discovery, self.jwks_file.is_some()];
        bad(
            sources.iter().filter(|s| **s).count() != 1,
            "exactly one of jwks_url, discovery or jwks_file is required".into(),
        );
        if let Some(url) = &self.jwks_url {
            if let Err(e) = crate::auth::idp::check_url(url) {
                bad(true, format!("jwks_url: {e}"));
            }
        }
        if self.discovery {
            if let Err(e) = crate::auth::idp::check_url(&self.issuer) {
                bad(true, format!("issuer (for discovery): {e}"));
            }
        }
        bad(self.algorithms.is_empty(), "algorithms must list at least one algorithm".into());
        for a in &self.algorithms {
            bad(
                crate::auth::jwt::algorithm(a).is_none(),
                format!(
                    "algorithm {a:?} is not accepted (one of RS256, RS384, RS512, PS256, PS384, \
                     PS512, ES256, ES384, EdDSA; never none or HMAC)"
                ),
            );
        }
        bad(self.identity_claim.is_empty(), "identity_claim is required".into());
        bad(self.max_token_lifetime_secs == 0, "max_token_lifetime_secs must be > 0".into());
        bad(self.refresh_secs == 0, "refresh_secs must be > 0".into());
        bad(self.fetch_timeout_ms == 0, "fetch_timeout_ms must be > 0".into());
        bad(
            self.max_stale_secs < self.refresh_secs,
            "max_stale_secs must be >= refresh_secs".into(),
        );
        bad(self.token_cache_entries == 0, "token_cache_entries must be > 0".into());
        out
    }
}

/// Milliseconds from config as a `Duration`.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_refused() {
        let err = Config::parse("[batch]\nmax_event = 3\n").unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn jwt_settings_are_checked() {
        let text = r#"
            [auth.jwt]
            issuer = "http://idp.example.com"
            discovery = true
            jwks_file = "/etc/keys.json"
            algorithms = ["RS256", "HS256", "none"]
            max_stale_secs = 10
            [[auth.roles]]
            name = "r"
            allow = ["edge.{tenant}.>"]
        "#;
        let cfg = Config::parse(text).unwrap();
        let ConfigError::Invalid(errs) = cfg.validate().unwrap_err() else { panic!() };
        let all = errs.join("\n");
        for needle in [
            "audiences must list",
            "exactly one of jwks_url, discovery or jwks_file",
            "plain http is only allowed on loopback",
            "algorithm \"HS256\" is not accepted",
            "algorithm \"none\" is not accepted",
            "max_stale_secs must be >= refresh_secs",
            "auth.roles[0] (\"r\"): placeholder \"tenant\" must be {claims.<name>}",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        let ok = r#"
            [auth.jwt]
            issuer = "https://idp.example.com"
            audiences = ["edgerelay"]
            discovery = true
            [[auth.roles]]
            name = "r"
            require = { scope = "edge:publish" }
            allow = ["edge.{claims.tenant}.>"]
        "#;
        let cfg = Config::parse(ok).unwrap();
        let errs = match cfg.validate() {
            Ok(()) => Vec::new(),
            Err(ConfigError::Invalid(e)) => e,
            Err(e) => panic!("{e}"),
        };
        assert!(!errs.iter().any(|e| e.contains("auth")), "{errs:?}");
    }

    #[test]
    fn mtls_settings_are_checked() {
        let text = r#"
            [auth.mtls]
            ca_file = "/nonexistent/ca.pem"
            [[auth.mtls.identities]]
            name = ""
            dns_name = "not a name"
            allow = ["edge.>.x"]
        "#;
        let cfg = Config::parse(text).unwrap();
        let ConfigError::Invalid(errs) = cfg.validate().unwrap_err() else { panic!() };
        let all = errs.join("\n");
        for needle in [
            "auth.mtls.ca_file: /nonexistent/ca.pem is not a readable file",
            "name is required",
            "dns_name \"not a name\" is not a DNS name",
            "pattern \"edge.>.x\"",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(!all.contains("no identity configured"), "mTLS alone is an identity source");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
            [relay]
            id = "a.b"
            [batch]
            max_events = 0
            [stream]
            replicas = 2
            subjects = ["edge.>.x"]
            [[auth.static_tokens]]
            name = "t"
            token = "short"
            allow = ["a.*"]
        "#;
        let cfg = Config::parse(text).unwrap();
        let ConfigError::Invalid(errs) = cfg.validate().unwrap_err() else { panic!() };
        let all = errs.join("\n");
        for needle in [
            "relay.id",
            "https.tls_cert is required",
            "batch.max_events",
            "stream.replicas",
            "stream.subjects",
            "at least 16 characters",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn the_shipped_example_is_valid_but_for_its_certificate_paths() {
        let text = include_str!("../config/edgerelay.example.toml");
        let cfg = Config::parse(text).unwrap();
        let Err(ConfigError::Invalid(errs)) = cfg.validate() else { panic!("cert paths missing") };
        assert!(errs.iter().all(|e| e.starts_with("https.tls_")), "{errs:?}");
    }

    #[test]
    fn spool_settings_are_checked_when_enabled() {
        let text = r#"
            [relay]
            ack_mode = "spooled"
            [spool]
            enabled = true
            dir = "relative/spool"
            max_bytes = 1048576
            segment_bytes = 4096
            fsync = "interval"
            fsync_interval_ms = 0
        "#;
        let cfg = Config::parse(text).unwrap();
        let ConfigError::Invalid(errs) = cfg.validate().unwrap_err() else { panic!() };
        let all = errs.join("\n");
        for needle in [
            "spool.dir: relative/spool must be an absolute path",
            "spool.segment_bytes (4096) must hold the largest record",
            "spool.fsync_interval_ms must be > 0",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        let text = "[relay]\nack_mode = \"accepted\"\n[spool]\nenabled = true\ndir = \"\"\nmax_bytes = 1\n";
        let ConfigError::Invalid(errs) = Config::parse(text).unwrap().validate().unwrap_err()
        else {
            panic!()
        };
        let all = errs.join("\n");
        assert!(all.contains("spool.dir is required"), "{all}");
        assert!(all.contains("spool.max_bytes (1) must be >= spool.segment_bytes"), "{all}");
        // Off, the section is not checked; an unknown policy is refused by the parser.
        let off = Config::parse("[spool]\nmax_bytes = 1\n").unwrap();
        let errs = match off.validate() {
            Ok(()) => Vec::new(),
            Err(ConfigError::Invalid(e)) => e,
            Err(e) => panic!("{e}"),
        };
        assert!(!errs.iter().any(|e| e.contains("spool")), "{errs:?}");
        assert!(Config::parse("[spool]\nfsync = \"sometimes\"\n").is_err());
        assert!(Config::parse("[spool]\nfsync_ms = 3\n").unwrap_err().contains("unknown field"));
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

    #[test]
    fn clusters_inherit_credentials_they_do_not_set() {
        let cfg = Config::parse(
            r#"
            [nats]
            urls = []
            token = "shared"
            [[nats.clusters]]
            name = "fra"
            region = "eu-central"
            urls = ["nats://10.0.0.1:4222"]
            [[nats.clusters]]
            name = "ams"
            urls = ["nats://10.1.0.1:4222"]
            token = "own"
            "#,
        )
        .unwrap();
        let c = cfg.nats.resolved_clusters();
        assert_eq!((c[0].name.as_str(), c[0].token.as_deref()), ("fra", Some("shared")));
        assert_eq!((c[1].name.as_str(), c[1].token.as_deref()), ("ams", Some("own")));
        let single = Config::default().nats.resolved_clusters();
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].name, "default");
    }

    #[test]
    fn bad_clusters_are_reported() {
        let cfg = Config::parse(
            r#"
            [nats]
            urls = ["nats://10.9.9.9:4222"]
            [[nats.clusters]]
            name = "a.b"
            urls = []
            [[nats.clusters]]
            name = "dup"
            urls = ["nats://x:1"]
            user = "u"
            [[nats.clusters]]
            name = "dup"
            urls = ["nats://x:1"]
            [nats.failover]
            unhealthy_after_failures = 0
            "#,
        )
        .unwrap();
        let ConfigError::Invalid(errs) = cfg.validate().unwrap_err() else { panic!() };
        let all = errs.join("\n");
        for needle in [
            "either urls (one cluster) or [[nats.clusters]]",
            "nats.clusters[0].name",
            "nats.clusters[0].urls must list",
            "nats.clusters[1]: user and password go together",
            "nats.clusters[2].name: \"dup\" is used twice",
            "unhealthy_after_failures",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn the_spooled_ack_mode_and_the_spool_go_together() {
        for (text, needle) in [
            ("[relay]\nack_mode = \"spooled\"\n", "needs spool.enabled"),
            ("[spool]\nenabled = true\n", "has no effect with relay.ack_mode = \"durable\""),
        ] {
            let ConfigError::Invalid(errs) = Config::parse(text).unwrap().validate().unwrap_err()
            else {
                panic!()
            };
            assert!(errs.iter().any(|e| e.contains(needle)), "{errs:?}");
        }
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
}
