//! The modes: one per way of sending events, each behind the one [`Mode`] trait. A mode knows
//! how to connect (its own flags), what one request carries and how to read its answer; the
//! harness above decides how many runs, at which rate, with which consumer, and the schedule
//! below decides when each request is sent. A mode never calls back up.
//!
//! # Layout
//!
//! - `args`: the flags of a mode's subcommand (the mode's own, then those every mode takes).
//! - `https`: `POST /v1/publish/{subject}` over HTTP/1.1 or HTTP/2 on TLS (with `tls`, the
//!   client's rustls set-up).
//! - `h3`: the same over HTTP/3 on the relay's QUIC port.
//! - `quic`: the native `edgerelay/1` protocol, pipelined, one or more events per request.
//! - `direct_js`: the baseline without the relay, one JetStream publish per event.
//! - `bare`: the bare hyper + rustls server that answers 202 doing nothing, and the `bare`
//!   mode (`https` against it).
//! - `quic_idle`: many idle QUIC connections held open (the relay's memory per connection);
//!   not a measured mode, it has no requests.

pub mod args;
pub mod bare;
pub mod direct_js;
pub mod h3;
pub mod https;
pub mod quic;
pub mod quic_idle;
pub mod tls;

use std::future::Future;

use futures::future::BoxFuture;

use crate::consume::Decoding;
use crate::events::Events;
use crate::model::RunInfo;
use crate::schedule::{RunArgs, Worker};

/// Subjects are `edge.load.N` unless `--subject-prefix` says otherwise (every relay mode).
pub const RELAY_SUBJECT_PREFIX: &str = "edge.load";

/// One way of sending events, configured by its own flags (the implementing type).
pub trait Mode: Sync {
    /// One unit of concurrency: sends one request at a time.
    type Worker: Worker;

    /// The mode's name in reports (`https`, `quic`, ...).
    fn name(&self) -> &'static str;

    /// Subjects are `{prefix}.N` unless `--subject-prefix` says otherwise.
    fn default_subject_prefix(&self) -> &'static str {
        RELAY_SUBJECT_PREFIX
    }

    /// Events in each request.
    fn events_per_request(&self) -> u32 {
        1
    }

    /// Where the events end up, for `--consume`; `None` when nothing stores them. Relay
    /// batches on the consumer's default NATS server unless the mode says otherwise.
    fn stored(&self) -> Option<Stored> {
        Some(Stored::relay())
    }

    /// Runs before the consumer starts (direct-js creates its stream, so the consumer finds
    /// it); `prefix` is the subject prefix in use.
    fn prepare(&self, prefix: &str) -> impl Future<Output = anyhow::Result<()>> + Send {
        let _ = prefix;
        async { Ok(()) }
    }

    /// Connects for a run with the load shape of `run` (its `--timeout` bounds each request)
    /// and builds the workers, each sending `events`.
    fn connect(
        &self,
        run: &RunArgs,
        events: Events,
    ) -> impl Future<Output = anyhow::Result<Connected<Self::Worker>>> + Send;
}

/// Where a mode's events are stored.
#[derive(Clone, Debug)]
pub struct Stored {
    /// The NATS server that has them; `None`: the consumer's default.
    pub nats_url: Option<String>,
    pub decoding: Decoding,
}

/// A mode connected for one run.
pub struct Connected<W> {
    /// What the report says about the mode (its name is filled in by the harness).
    pub info: RunInfo,
    pub workers: Vec<W>,
    /// What to do once the run is over: drain streams, close connections, flush.
    pub close: Option<BoxFuture<'static, ()>>,
}

impl Stored {
    /// Relay batches on the consumer's default NATS server.
    pub fn relay() -> Self {
        Self { nats_url: None, decoding: Decoding::Batch }
    }
}

impl<W> Connected<W> {
    /// `workers` described by `info`, nothing to do after the run.
    pub fn new(info: RunInfo, workers: Vec<W>) -> Self {
        Self { info, workers, close: None }
    }

    /// The same, running `close` once the run is over.
    pub fn closing_with(self, close: impl Future<Output = ()> + Send + 'static) -> Self {
        Self { close: Some(Box::pin(close)), ..self }
    }
}
