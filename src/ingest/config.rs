//! The sections of the ingest front-ends — `[https]`, `[quic]` and `[idempotency]` — with their
//! defaults and checks, and [`AckMode`] (`relay.ack_mode`), which decides when ingest answers.
//!
//! [`Settings`] is what the pipeline ([`super::Ingest`]) is built from; the top-level config
//! gathers it from several sections.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::budget;
use crate::section::Problems;
use crate::source::Prefixes;

/// What one decoded event takes beyond its payload and strings, bytes: the memory budget
/// reserves this much per event a request may hold.
pub const DECODED_EVENT_BYTES: usize = 192;

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

/// The HTTPS (HTTP/1.1 + HTTP/2) listener.
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
    /// Connections open at once from one source (an IPv4 address, an IPv6 /64: see
    /// `[peers]`); a further one is closed at once, before its TLS handshake.
    pub max_connections_per_ip: usize,
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
    /// Longest wait for the next bytes of a request body (HTTP/1.1, HTTP/2 and HTTP/3),
    /// milliseconds; also the grace before `body_min_bytes_per_sec` counts. A body that
    /// stalls is answered 408 and dropped (like nginx's `client_body_timeout`).
    pub body_timeout_ms: u64,
    /// Least average rate of a request body once `body_timeout_ms` has passed, bytes a second
    /// (0: none). Cuts a trickle that never quite stalls.
    pub body_min_bytes_per_sec: u64,
    /// Most bytes of a refused request's body read and dropped (never kept) after the early
    /// answer (401, 403, 413, …), so that clients that send the whole body before reading
    /// the answer (curl over HTTP/2) read the status. Past it the stream is reset.
    pub discard_body_bytes: u64,
    /// A connection older than this is asked to close (HTTP/2 GOAWAY; HTTP/1.1 `Connection:
    /// close` on its next answer), milliseconds (0: no limit). The client reconnects.
    pub max_connection_age_ms: u64,
    /// How long requests under way may finish after `max_connection_age_ms` before the
    /// connection is closed, milliseconds.
    pub max_connection_age_grace_ms: u64,
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

/// The QUIC listener (native `edgerelay/1` protocol and HTTP/3); off unless `listen` is set.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuicConfig {
    /// UDP address for QUIC, e.g. `0.0.0.0:8443`. Unset: no QUIC listener. Uses the
    /// certificate of `https.tls_cert` / `https.tls_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// QUIC connections open at once; more are refused.
    pub max_connections: usize,
    /// QUIC connections open at once from one source (an IPv4 address, an IPv6 /64: see
    /// `[peers]`); a further one is refused at its first packet.
    pub max_connections_per_ip: usize,
    /// Bidirectional streams a client may have open at once on one connection.
    pub max_streams_per_connection: u32,
    /// Flow-control window of one stream, bytes: what a stream may have in flight unread.
    pub stream_window_bytes: u32,
    /// Flow-control window of a whole connection, bytes (quinn's default is unbounded).
    pub connection_window_bytes: u32,
    /// Longest frame (one `PublishRequest`), bytes; refused from its length prefix.
    pub max_frame_bytes: usize,
    /// Most bytes of frame a stream holds before it has an identity (a token accepted, or a
    /// client certificate that names one). A longer first frame must carry its token in its
    /// first this-many bytes (the Rust client writes it first), else the stream is refused.
    /// Above `max_frame_bytes` it is `max_frame_bytes`.
    pub preauth_frame_bytes: usize,
    /// A frame that has started must get a byte at least this often, milliseconds; else the
    /// stream is stopped (`frame_timeout`). Counted only while the relay is reading the stream.
    pub frame_timeout_ms: u64,
    /// After the first `frame_timeout_ms` of a frame, it must arrive at least this fast on
    /// average, bytes per second; else the stream is stopped (`frame_too_slow`). 0: no minimum.
    pub frame_min_bytes_per_sec: u64,
    /// Requests a stream may have waiting for their answers; beyond it the relay stops reading
    /// the stream and flow control pushes back on the client.
    pub max_requests_in_flight_per_stream: usize,
    /// A connection with no traffic for this long is closed, milliseconds.
    pub idle_timeout_ms: u64,
    /// A connection older than this is asked to close (HTTP/3: GOAWAY), milliseconds (0: no
    /// limit); its requests under way get `max_connection_age_grace_ms` to finish.
    pub max_connection_age_ms: u64,
    /// How long requests under way may finish after `max_connection_age_ms` before the
    /// connection is closed, milliseconds.
    pub max_connection_age_grace_ms: u64,
    /// With more handshakes than this under way, new clients must first prove their address
    /// (QUIC Retry), which costs them a round trip and an attacker its spoofed addresses.
    pub retry_above_handshakes: usize,
    /// Kernel send and receive buffer of the UDP socket, bytes (0: the kernel's default).
    /// Every connection shares the one socket: at the default ~200 KiB, a few milliseconds'
    /// stall of the relay under load overflows it and QUIC has to recover the lost packets.
    /// Capped by the `net.core.rmem_max` / `wmem_max` sysctls; the relay warns if it gets less.
    pub socket_buffer_bytes: usize,
}

/// Remembering idempotency keys so client retries are answered, not stored twice.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long the result for an `Idempotency-Key` is remembered, milliseconds. A retry with
    /// the same key (by the same identity) within it is answered with the first result.
    pub window_ms: u64,
    /// Most keys remembered. The newest half are always kept; older keys are forgotten half
    /// the cache at a time (see `ingest::idempotency`). Memory: about 140 bytes a key (~140 MB
    /// at the default), allocated at start-up so that nothing is allocated or grown under load.
    pub max_keys: usize,
}

/// What the relay grants its peers, whatever the protocol: a memory budget for what they make
/// it hold (bodies and frames while read, the requests decoded from them until answered), with
/// a share per source and per connection, and how addresses are grouped into sources (also for
/// `https.max_connections_per_ip` and `quic.max_connections_per_ip`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeersConfig {
    /// Bytes held for all peers at most; a read beyond it is refused with 503 `queue_full`
    /// (reason `memory_budget`) and `Retry-After`. 0: a quarter of the memory the relay may
    /// use (its cgroup's `memory.max`, else the machine's RAM), within 64 MiB and 8 GiB.
    pub memory_budget_bytes: usize,
    /// Bytes held for one source (all its connections) at most. 0: an eighth of the budget.
    pub memory_per_source_bytes: usize,
    /// Bytes held for one connection (all its requests) at most. 0: two of the largest
    /// requests (a largest read — `https.max_body_bytes`, `quic.max_frame_bytes` — kept, its
    /// decoded copies and its events).
    pub memory_per_connection_bytes: usize,
    /// An IPv4 peer's source: its address cut to this prefix length (32: the address).
    pub ipv4_prefix_len: u8,
    /// An IPv6 peer's source: its address cut to this prefix length (64: its /64, which one
    /// host usually has whole).
    pub ipv6_prefix_len: u8,
}

/// What the ingest pipeline ([`super::Ingest`]) is built from, gathered from several sections
/// by `Config::ingest`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// When the edge is answered (`relay.ack_mode`).
    pub ack_mode: AckMode,
    /// Longest subject accepted, bytes (`relay.max_subject_bytes`).
    pub max_subject_bytes: usize,
    /// Largest single event payload, bytes (`https.max_event_bytes`, for every protocol).
    pub max_event_bytes: usize,
    /// Most events in one multi-event request (`https.max_events_per_request`).
    pub max_events_per_request: usize,
    /// The patterns of `stream.subjects`: a subject outside all of them is refused.
    pub stream_subjects: Vec<String>,
    /// How long a retry waits for the outcome of the first request with its idempotency key
    /// (`nats.publish_deadline_ms`).
    pub wait_for_first: Duration,
    /// The `[idempotency]` section.
    pub idempotency: IdempotencyConfig,
    /// The `[peers]` section.
    pub peers: PeersConfig,
    /// The most one request may hold of the memory budget, bytes (see
    /// `Config::largest_request`).
    pub largest_request: usize,
}

impl Default for HttpsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            max_connections: 10_000,
            max_connections_per_ip: 256,
            max_body_bytes: 1 << 20,
            max_event_bytes: 64 << 10,
            max_events_per_request: 1000,
            tls_handshake_timeout_ms: 5_000,
            header_read_timeout_ms: 5_000,
            idle_timeout_ms: 60_000,
            body_timeout_ms: 10_000,
            body_min_bytes_per_sec: 4096,
            discard_body_bytes: 4 << 20,
            max_connection_age_ms: 3_600_000,
            max_connection_age_grace_ms: 30_000,
            h2_max_concurrent_streams: 256,
            h2_stream_window_bytes: 1 << 20,
            h2_connection_window_bytes: 16 << 20,
            h2_max_pending_accept_reset_streams: 100,
            h2_max_local_error_reset_streams: 1024,
        }
    }
}

impl HttpsConfig {
    /// The files of this section that hold secrets (the TLS private key), with their fields.
    pub fn secret_files(&self) -> Vec<(String, &std::path::Path)> {
        vec![("https.tls_key".to_owned(), self.tls_key.as_path())]
    }

    /// Everything wrong with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Problems::default();
        for (name, path) in [("https.tls_cert", &self.tls_cert), ("https.tls_key", &self.tls_key)] {
            match path.as_os_str().is_empty() {
                true => p.bad(true, format!("{name} is required")),
                false => p.file(name, path),
            }
        }
        p.nonzero("https.max_connections", self.max_connections);
        p.nonzero("https.max_connections_per_ip", self.max_connections_per_ip);
        p.nonzero("https.max_event_bytes", self.max_event_bytes);
        p.bad(
            self.max_body_bytes < self.max_event_bytes,
            "https.max_body_bytes must be >= https.max_event_bytes",
        );
        p.nonzero("https.max_events_per_request", self.max_events_per_request);
        p.nonzero("https.body_timeout_ms", self.body_timeout_ms);
        p.nonzero("https.h2_max_concurrent_streams", self.h2_max_concurrent_streams);
        for (name, window) in [
            ("https.h2_stream_window_bytes", self.h2_stream_window_bytes),
            ("https.h2_connection_window_bytes", self.h2_connection_window_bytes),
        ] {
            p.bad(
                !(65_535..=(1 << 31) - 1).contains(&window),
                format!("{name} must be between 65535 and 2^31-1"),
            );
        }
        p.into_vec()
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
            preauth_frame_bytes: 16 << 10,
            frame_timeout_ms: 10_000,
            frame_min_bytes_per_sec: 4096,
            max_requests_in_flight_per_stream: 32,
            idle_timeout_ms: 30_000,
            max_connection_age_ms: 3_600_000,
            max_connection_age_grace_ms: 30_000,
            retry_above_handshakes: 256,
            socket_buffer_bytes: 4 << 20,
        }
    }
}

impl QuicConfig {
    /// Everything wrong with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Problems::default();
        p.nonzero("quic.max_connections", self.max_connections);
        p.nonzero("quic.max_connections_per_ip", self.max_connections_per_ip);
        p.nonzero("quic.max_streams_per_connection", self.max_streams_per_connection);
        p.bad(self.stream_window_bytes < 1024, "quic.stream_window_bytes must be at least 1024");
        p.bad(
            self.connection_window_bytes < self.stream_window_bytes,
            "quic.connection_window_bytes must be >= quic.stream_window_bytes",
        );
        p.nonzero("quic.max_requests_in_flight_per_stream", self.max_requests_in_flight_per_stream);
        p.nonzero("quic.idle_timeout_ms", self.idle_timeout_ms);
        p.nonzero("quic.preauth_frame_bytes", self.preauth_frame_bytes);
        p.nonzero("quic.frame_timeout_ms", self.frame_timeout_ms);
        p.into_vec()
    }
}

impl Default for PeersConfig {
    fn default() -> Self {
        Self {
            memory_budget_bytes: 0,
            memory_per_source_bytes: 0,
            memory_per_connection_bytes: 0,
            ipv4_prefix_len: 32,
            ipv6_prefix_len: 64,
        }
    }
}

impl PeersConfig {
    /// Everything wrong with this section (shares larger than what holds them are checked
    /// once resolved, see [`PeersConfig::limits`]).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Problems::default();
        p.bad(self.ipv4_prefix_len > 32, "peers.ipv4_prefix_len must be at most 32");
        p.bad(self.ipv6_prefix_len > 128, "peers.ipv6_prefix_len must be at most 128");
        let set = |v: usize| (v > 0).then_some(v);
        let (total, source, conn) = (
            set(self.memory_budget_bytes),
            set(self.memory_per_source_bytes),
            set(self.memory_per_connection_bytes),
        );
        p.bad(
            matches!((total, source), (Some(t), Some(s)) if s > t),
            "peers.memory_per_source_bytes must be <= peers.memory_budget_bytes",
        );
        p.bad(
            matches!((source, conn), (Some(s), Some(c)) if c > s),
            "peers.memory_per_connection_bytes must be <= peers.memory_per_source_bytes",
        );
        p.into_vec()
    }

    /// The source prefixes.
    pub fn prefixes(&self) -> Prefixes {
        Prefixes { ipv4: self.ipv4_prefix_len, ipv6: self.ipv6_prefix_len }
    }

    /// The budget's shares, those left at 0 resolved: the total from `memory_limit` (see
    /// [`budget::default_total`]), a connection's from `largest_request`, which every share
    /// must hold at least.
    pub fn limits(&self, memory_limit: Option<u64>, largest_request: usize) -> budget::Limits {
        let or = |v: usize, default: usize| if v > 0 { v } else { default };
        let total = or(self.memory_budget_bytes, budget::default_total(memory_limit));
        let per_source = or(self.memory_per_source_bytes, total / 8);
        let per_connection =
            or(self.memory_per_connection_bytes, largest_request.saturating_mul(2));
        let per_connection =
            per_connection.max(largest_request).min(per_source.max(largest_request));
        let per_source = per_source.max(per_connection);
        budget::Limits { total: total.max(per_source), per_source, per_connection }
    }
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self { window_ms: 120_000, max_keys: 1_000_000 }
    }
}

impl IdempotencyConfig {
    /// Everything wrong with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Problems::default();
        p.nonzero("idempotency.max_keys", self.max_keys);
        p.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::assert_reported;

    #[test]
    fn https_settings_are_checked() {
        let https: HttpsConfig = toml::from_str(
            "tls_key = \"/nonexistent/key.pem\"\nmax_body_bytes = 10\nh2_stream_window_bytes = 1\n",
        )
        .unwrap();
        let all = https.problems().join("\n");
        assert_reported(
            &all,
            &[
                "https.tls_cert is required",
                "https.tls_key: /nonexistent/key.pem is not a readable file",
                "https.max_body_bytes must be >= https.max_event_bytes",
                "https.h2_stream_window_bytes must be between 65535 and 2^31-1",
            ],
        );
        assert!(!all.contains("https.tls_key is required"), "{all}");
    }

    #[test]
    fn quic_and_idempotency_settings_are_checked() {
        let quic: QuicConfig = toml::from_str(
            "max_connections = 0\nstream_window_bytes = 2048\nconnection_window_bytes = 1024\n\
             preauth_frame_bytes = 0\nframe_timeout_ms = 0\nmax_connection_age_ms = 0\n\
             frame_min_bytes_per_sec = 0\n",
        )
        .unwrap();
        assert_eq!(
            quic.problems(),
            [
                "quic.max_connections must be > 0",
                "quic.connection_window_bytes must be >= quic.stream_window_bytes",
                "quic.preauth_frame_bytes must be > 0",
                "quic.frame_timeout_ms must be > 0",
            ]
        );
        assert!(QuicConfig::default().problems().is_empty());
        let idempotency = IdempotencyConfig { max_keys: 0, ..IdempotencyConfig::default() };
        assert_eq!(idempotency.problems(), ["idempotency.max_keys must be > 0"]);
    }

    #[test]
    fn peers_settings_are_checked_and_their_shares_resolved() {
        let peers: PeersConfig = toml::from_str(
            "memory_budget_bytes = 100\nmemory_per_source_bytes = 200\nipv6_prefix_len = 129\n",
        )
        .unwrap();
        assert_eq!(
            peers.problems(),
            [
                "peers.ipv6_prefix_len must be at most 128",
                "peers.memory_per_source_bytes must be <= peers.memory_budget_bytes",
            ]
        );
        assert!(PeersConfig::default().problems().is_empty());
        const MIB: usize = 1 << 20;
        let request = 3 * MIB;
        let set = |total, source, connection| PeersConfig {
            memory_budget_bytes: total,
            memory_per_source_bytes: source,
            memory_per_connection_bytes: connection,
            ..PeersConfig::default()
        };
        let limits = |total, per_source, per_connection| budget::Limits {
            total,
            per_source,
            per_connection,
        };
        for (case, peers, memory, want) in [
            (
                "defaults on 16 GiB",
                set(0, 0, 0),
                Some(16 << 30),
                limits(4 << 30, 512 * MIB, 6 * MIB),
            ),
            ("defaults, memory unknown", set(0, 0, 0), None, limits(1 << 30, 128 * MIB, 6 * MIB)),
            // A small budget's eighth is less than one request: the source still holds one.
            ("tiny budget", set(8 * MIB, 0, 0), None, limits(8 * MIB, 3 * MIB, 3 * MIB)),
            (
                "all set",
                set(64 * MIB, 16 * MIB, 4 * MIB),
                None,
                limits(64 * MIB, 16 * MIB, 4 * MIB),
            ),
        ] {
            assert_eq!(peers.limits(memory, request), want, "{case}");
        }
    }
}
