//! The disk spool: store-and-forward for batches that no NATS cluster takes right now.
//!
//! [`segment`] frames `edgerelay.v1.SpoolRecord`s (one batch each, exactly as published) with a
//! length and a CRC-32C; the segment files and the writer come next.

pub mod segment;
