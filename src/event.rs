//! The unit of work on the data path: an event waiting for its answer ([`Pending`]), and the
//! answer ([`Outcome`]). Every `Pending` is answered exactly once — by the sink on PubAck or
//! failure, or with `shutting_down` if it is dropped unanswered — so no edge request waits
//! forever and no idempotency key stays claimed.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::batch::batcher::Item;
use crate::error::{ErrorCode, Refusal};
use crate::ingest::idempotency::{Idempotency, Key};
use crate::proto;

/// Where JetStream stored an event. Plain numbers (`Copy`, no shared strings): one is made,
/// copied and cached per event on several threads; [`Names`] spells out the stream and batch
/// when an answer is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    /// The batch's sequence in the stream.
    pub seq: u64,
    /// The batch's number in this relay process ([`Names::batch`] is its `Nats-Msg-Id`).
    pub batch: u64,
    /// Index of the event within the batch.
    pub index: u32,
    /// This answer repeats an earlier one (idempotency-key retry).
    pub duplicate: bool,
}

/// The names answers give: the stream, and the batches' `Nats-Msg-Id`s
/// (`{relay.id}.{boot id}.{batch}`), the same for every event of one relay process.
#[derive(Clone, Debug)]
pub struct Names {
    pub stream: String,
    /// `{relay.id}.{boot id}`.
    batch_prefix: String,
}

impl Names {
    pub fn new(stream: &str, relay_id: &str, boot_id: &str) -> Self {
        Self { stream: stream.to_owned(), batch_prefix: format!("{relay_id}.{boot_id}") }
    }

    /// The `Nats-Msg-Id` of batch number `batch`.
    pub fn batch(&self, batch: u64) -> String {
        format!("{}.{batch}", self.batch_prefix)
    }
}

/// What the edge is told about one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ack {
    /// Durable in JetStream.
    Stored(Stored),
    /// Queued in the relay (ack mode `accepted`).
    Queued,
}

pub type Outcome = Result<Ack, Refusal>;

/// An event in a queue or batch, with the means to answer it.
#[derive(Debug)]
pub struct Pending {
    pub event: proto::Event,
    /// Encoded size of the event inside a `Batch`.
    pub size: usize,
    /// When it was enqueued.
    pub enqueued: Instant,
    pub reply: Reply,
}

/// Answers one event: to the waiting request (if any) and to the idempotency cache (if the
/// event carried a key).
#[derive(Debug, Default)]
pub struct Reply {
    tx: Option<oneshot::Sender<Outcome>>,
    key: Option<(Arc<Idempotency>, Key)>,
}

impl Reply {
    pub fn new(tx: Option<oneshot::Sender<Outcome>>, key: Option<(Arc<Idempotency>, Key)>) -> Self {
        Self { tx, key }
    }

    /// Sends the outcome. The request may have gone away (client disconnected); the
    /// idempotency cache still learns the result.
    pub fn send(mut self, outcome: Outcome) {
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some((cache, key)) = self.key.take() {
            cache.complete(key, &outcome, Instant::now());
        }
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(outcome);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.tx.is_some() || self.key.is_some() {
            self.finish(Err(Refusal::new(
                ErrorCode::ShuttingDown,
                "the relay stopped before the event was acknowledged",
            )));
        }
    }
}

impl Item for Pending {
    fn subject(&self) -> &str {
        &self.event.subject
    }

    fn size(&self) -> usize {
        self.size
    }
}
