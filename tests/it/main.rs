//! Integration tests: the real relay against a real nats-server with JetStream, real TLS and
//! real HTTP/1.1 and HTTP/2 clients. Each test starts its own nats-server on a free port.
//! One test binary keeps link time down on small CI machines.

mod support;

mod audit;
mod bad_input;
mod binary;
mod bodies;
mod dashboard;
mod dedup;
mod edgeworker;
mod failover;
mod h3;
mod interop;
mod jwt;
mod limits;
mod metrics;
mod mtls;
mod nats_auth;
mod nats_faults;
mod package;
mod publish;
mod quic;
mod quic_limits;
mod reload;
mod revocation;
mod spool;
mod spooled;
mod systemd;
mod top;
