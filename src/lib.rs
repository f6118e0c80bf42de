//! edgerelay: a regional relay from CDN edge code to NATS JetStream.
//!
//! Edge functions send small events over HTTPS (HTTP/1.1 and HTTP/2), HTTP/3, or the native
//! `edgerelay/1` protocol over QUIC; the relay authenticates and authorizes them, coalesces them
//! into protobuf batches on lock-free queues, publishes each batch to JetStream, and answers
//! every event once JetStream has acknowledged its batch (or, in the other ack modes, once it
//! is queued or spooled). The wire protocols are specified in `docs/protocol.md`.
//!
//! # Layout
//!
//! The folders follow the data path (the diagram in the README), front to back:
//!
//! | step | where |
//! |---|---|
//! | front-ends: HTTPS (h1/h2), HTTP/3 and native QUIC; request decoding | [`ingest`] (`https`, `quic/{h3,native}`, `http_api`), with [`tls`] |
//! | authentication, publish rules | [`auth`] (subjects and patterns in [`subject`]) |
//! | validation, idempotency, enqueue, waiting for the answer | [`ingest`] |
//! | sharded bounded queues, per-subject batching (sans-IO), one driver task per shard | [`batch`] |
//! | nearest healthy NATS cluster, failover, JetStream publish, ack window, retries, answers | [`sink`] |
//! | batches kept on disk while no NATS cluster takes them | [`spool`] |
//! | a record of refusals and per-identity counts, on its own stream | [`audit`] |
//!
//! Beside the path:
//!
//! | what | where |
//! |---|---|
//! | what travels along the path: an event, its answer, exactly once | [`event`] (a leaf) |
//! | how refusals are told: status, result code, metric label | [`error`] |
//! | the configuration file; each component owns its section (`ingest::config`, …) | [`config`], [`section`] |
//! | start, drain, live reload (SIGHUP); [`Relay`] and [`run`] | [`relay`], [`shutdown`] |
//! | health, readiness, `/metrics`, `/debug/latency` | [`admin`] |
//! | metric names, exact latency percentiles (HdrHistogram) | [`metrics`] |
//! | readiness, watchdog and socket activation under systemd | [`systemd`] |
//!
//! Other crates of the workspace: the wire format and the native protocol's framing
//! (`proto/`, re-exported as [`proto`]), the collector client (`client/`), the operator tools
//! `top`, `tail`, `dev-idp` and `dev-certs` (`ops/`), the load generator (`loadtest/`).
//! `main.rs` only parses the command line, loads the config and calls [`run`].

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod batch;
pub mod config;
pub mod error;
pub mod event;
pub mod ingest;
pub mod metrics;
pub mod relay;
pub mod section;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod spool;
pub mod subject;
pub mod systemd;
pub mod tls;

/// The protobuf messages of `proto/edgerelay/v1` (the `edgerelay-proto` crate).
pub use edgerelay_proto as proto;

pub use relay::{reload, run, Drained, Relay, StartError};
