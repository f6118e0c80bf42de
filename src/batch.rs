//! Batching: events wait in bounded, sharded lock-free queues ([`queue`]); one task per shard
//! ([`driver`]) feeds them to the sans-IO [`batcher`] and hands ready batches to the sink,
//! early at a bounded rate ([`early`]) when acks are slow to come back.
//! [`config`] is the `[batch]` section of the config file.

pub mod batcher;
pub mod config;
pub mod driver;
pub mod early;
pub mod queue;

pub use batcher::{Batcher, FlushReason, Limits, Ready};
