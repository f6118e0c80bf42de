//! The sink: publishes batches to JetStream and answers their events when the PubAck comes.
//!
//! - [`jetstream`]: the bounded ack window, publishing to the active cluster, retries with
//!   the same `Nats-Msg-Id` (on another cluster after a failover), and the answers.
//! - [`router`]: which cluster is active — the nearest healthy one, with hysteresis (sans-IO).
//! - [`flight`]: one batch's life as a sans-IO state machine: publish, retry, tell, spool, give up.
//! - [`cluster`]: one cluster's connection, stream check and round-trip probe.
//! - [`stream`]: the stream the relay wants, and whether an existing one fits.

pub mod cluster;
pub mod flight;
pub mod jetstream;
pub mod router;
pub mod stream;

pub use jetstream::{Sink, SinkError};
