//! The test kit of the edgerelay workspace: what the daemon's integration tests (`tests/it`),
//! the load generator (`loadtest/`) and the benches share, written once (as nats.rs keeps its
//! `nats-server` helper crate).
//!
//! - [`nats`]: a real nats-server with JetStream — alone or as a 3-node cluster — on free
//!   loopback ports, with its own store, killed when dropped; stopped, restarted and frozen
//!   for fault tests.
//! - [`ports`]: free loopback ports (TCP, or free on both TCP and UDP) and waiting for one to
//!   open.
//! - [`proxy`]: a TCP proxy that delays every chunk: a NATS cluster farther away.
//! - [`relay_config`]: the relay's real [`edgerelay::config::Config`] with test defaults,
//!   serialized for tests that run the binary — so no test writes relay TOML by hand.
//!
//! Starting and waiting come in two forms where callers differ: tests call the blocking
//! shorthands ([`NatsServer::start`], [`NatsServer::restart`]); async scenarios that must not
//! block their runtime call [`NatsServer::launch`] and [`NatsServer::ready`]. Both share one
//! readiness rule. Failures of the environment (no loopback, no binary) panic in the
//! shorthands and are errors in the rest.

#![forbid(unsafe_code)]

pub mod nats;
pub mod ports;
pub mod proxy;
pub mod relay_config;

pub use nats::{nats_server_bin, NatsCluster, NatsOptions, NatsServer};
pub use ports::{free_port, free_shared_port, local, wait_for_port};
pub use proxy::delay_proxy;
pub use relay_config::{dev_certs, RelayConfigBuilder, TOKEN};
