//! The sink: publishes batches to JetStream and answers their events when the PubAck comes.
//!
//! - [`jetstream`]: the NATS connection, the bounded ack window, retries with the same
//!   `Nats-Msg-Id`, and the answers.
//! - [`stream`]: creating or checking the configured stream at start-up.

pub mod jetstream;
pub mod stream;

pub use jetstream::{Sink, SinkError};
