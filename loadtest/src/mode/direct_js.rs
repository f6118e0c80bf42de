//! `loadtest direct-js`: the baseline without the relay. Every event is its own JetStream
//! publish with async-nats, the way a service would write to JetStream directly, with the same
//! schedule, latency measurement and report as the relay modes.
//!
//! `--max-inflight` workers share `--connections` NATS connections (worker `w` publishes on
//! connection `w mod N`). Each worker publishes one event and awaits its PubAck, so at most
//! `--max-inflight` acks are outstanding in total: the ack window, while other workers keep
//! publishing (the publishes of one connection are pipelined on it). Every publish carries a
//! unique `Nats-Msg-Id`, as an idempotent publisher's would, so JetStream does the same
//! de-duplication bookkeeping per event that it does per batch for the relay.
//!
//! The stream is created if missing (file storage, subjects `<subject-prefix>.>`, server
//! defaults otherwise); an existing stream is used as it is.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::{self, Context};
use async_nats::Subject;
use futures::future::try_join_all;
use tokio::time::{timeout_at, Instant};

use super::{Connected, Mode, Stored};
use crate::consume::Decoding;
use crate::events::Events;
use crate::model::{Failure, Outcome, RunInfo};
use crate::schedule::{RunArgs, Worker};

/// Subjects are `direct.load.N` unless `--subject-prefix` says otherwise.
const DEFAULT_SUBJECT_PREFIX: &str = "direct.load";

/// Flags of `loadtest direct-js`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// NATS server to publish to.
    #[arg(long, value_name = "URL", default_value = "nats://127.0.0.1:4222")]
    pub(crate) nats_url: String,

    /// JetStream stream to publish into; created if missing (file storage, subjects
    /// `<subject-prefix>.>`).
    #[arg(long, value_name = "NAME", default_value = "LOADTEST_DIRECT")]
    pub(crate) stream: String,

    /// Number of NATS connections to spread the publishes over.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) connections: u32,

    /// Publishes awaiting their PubAck at most, in total (the ack window).
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_inflight: u32,
}

/// Builds the publish of event `seq`; shared by all workers.
struct Publishes {
    events: Events,
    /// [`Events::subjects`] as NATS subjects (cheap to clone).
    subjects: Vec<Subject>,
    /// Set once the first error has been printed, so a failing run does not flood.
    reported_error: AtomicBool,
}

/// One unit of concurrency: one publish awaiting its PubAck at a time.
pub struct JsWorker {
    js: Context,
    publishes: Arc<Publishes>,
    timeout: Duration,
}

impl Publishes {
    fn new(events: Events) -> Self {
        let subjects = events.subjects().iter().map(|s| Subject::from(s.as_str())).collect();
        Self { events, subjects, reported_error: AtomicBool::new(false) }
    }

    /// Subject and message of event `seq`: its own `Nats-Msg-Id`.
    fn build(&self, seq: u64, intended_unix_ns: u64) -> (Subject, PublishMessage) {
        let subject = self.subjects[self.events.subject_index(seq)].clone();
        let publish = PublishMessage::build().payload(self.events.payload(seq, intended_unix_ns));
        match self.events.key(seq) {
            Some(key) => (subject, publish.message_id(key)),
            None => (subject, publish),
        }
    }

    /// Prints the first publish error of the run; later ones are only counted.
    fn report_error(&self, error: &PublishError) {
        if !self.reported_error.swap(true, Ordering::Relaxed) {
            eprintln!("publish failed (further failures are only counted): {error}");
        }
    }
}

impl JsWorker {
    async fn publish(&self, seq: u64, intended_unix_ns: u64) -> Result<(), PublishError> {
        let (subject, publish) = self.publishes.build(seq, intended_unix_ns);
        let ack = self.js.send_publish(subject, publish).await?;
        // A duplicate ack still means the event is stored; with unique ids it does not happen.
        ack.await.map(drop)
    }
}

impl Worker for JsWorker {
    async fn send(&mut self, seq: u64, intended_unix_ns: u64) -> Outcome {
        let deadline = Instant::now() + self.timeout;
        match timeout_at(deadline, self.publish(seq, intended_unix_ns)).await {
            Ok(Ok(())) => Outcome::Accepted,
            Ok(Err(error)) => {
                self.publishes.report_error(&error);
                Outcome::Failed(failure(error.kind()))
            }
            Err(_elapsed) => Outcome::Failed(Failure::Timeout),
        }
    }
}

impl Mode for Args {
    type Worker = JsWorker;

    fn name(&self) -> &'static str {
        "direct-js"
    }

    fn default_subject_prefix(&self) -> &'static str {
        DEFAULT_SUBJECT_PREFIX
    }

    fn stored(&self) -> Option<Stored> {
        Some(Stored { nats_url: Some(self.nats_url.clone()), decoding: Decoding::Raw })
    }

    async fn prepare(&self, prefix: &str) -> anyhow::Result<()> {
        let client = async_nats::connect(self.nats_url.as_str()).await?;
        ensure_stream(&jetstream::new(client), &self.stream, prefix).await
    }

    async fn connect(&self, run: &RunArgs, events: Events) -> anyhow::Result<Connected<JsWorker>> {
        let clients = try_join_all((0..self.connections).map(|n| {
            async_nats::ConnectOptions::new()
                .name(format!("loadtest-direct-js-{n}"))
                .connect(self.nats_url.as_str())
        }))
        .await
        .with_context(|| format!("connecting to {}", self.nats_url))?;

        // Room for every ack of the window on any one connection, so async-nats never holds a
        // publish back on its own.
        let ack_capacity = self.max_inflight as usize * 2;
        let contexts: Vec<Context> = clients
            .iter()
            .map(|client| {
                jetstream::ContextBuilder::new()
                    .timeout(run.timeout)
                    .ack_timeout(run.timeout)
                    .max_ack_inflight(ack_capacity)
                    .backpressure_on_inflight(true)
                    .build(client.clone())
            })
            .collect();
        ensure_stream(&contexts[0], &self.stream, events.prefix()).await?;

        let publishes = Arc::new(Publishes::new(events));
        let workers: Vec<JsWorker> = (0..self.max_inflight as usize)
            .map(|w| JsWorker {
                js: contexts[w % contexts.len()].clone(),
                publishes: Arc::clone(&publishes),
                timeout: run.timeout,
            })
            .collect();
        let info = RunInfo {
            mode: "direct-js",
            http: None,
            connections: clients.len(),
            concurrency: workers.len(),
            answer: "PubAck",
            detail: Some(format!("stream={}", self.stream)),
        };
        Ok(Connected::new(info, workers).closing_with(async move {
            for client in &clients {
                // Best effort: the run is measured already.
                let _ = client.flush().await;
            }
        }))
    }
}

/// Creates stream `name` capturing `<prefix>.>` if it is missing; says so when an existing
/// stream may not capture the subjects.
async fn ensure_stream(js: &Context, name: &str, prefix: &str) -> anyhow::Result<()> {
    let wanted = format!("{prefix}.>");
    let config = StreamConfig {
        name: name.to_owned(),
        subjects: vec![wanted.clone()],
        storage: StorageType::File,
        ..Default::default()
    };
    let stream = js
        .get_or_create_stream(config)
        .await
        .with_context(|| format!("getting or creating stream {name}"))?;
    let subjects = &stream.cached_info().config.subjects;
    if !subjects.iter().any(|pattern| covers(pattern, prefix)) {
        eprintln!(
            "note: stream {name} exists with subjects {subjects:?}, which do not capture \
             {wanted}: publishes go to another stream or fail with `no_stream`"
        );
    }
    Ok(())
}

/// True when the NATS subject pattern `pattern` matches every subject under `prefix.>`.
fn covers(pattern: &str, prefix: &str) -> bool {
    let mut space = prefix.split('.').chain(std::iter::once(">"));
    for token in pattern.split('.') {
        if token == ">" {
            // Matches one or more tokens, and the space has at least one left.
            return true;
        }
        match space.next() {
            // A literal or `*` cannot stand for the whole tail of the space.
            Some(">") | None => return false,
            Some(literal) if token == "*" || token == literal => {}
            Some(_) => return false,
        }
    }
    false
}

/// The report's name for a failed publish.
fn failure(kind: PublishErrorKind) -> Failure {
    match kind {
        PublishErrorKind::TimedOut => Failure::Timeout,
        PublishErrorKind::BrokenPipe => Failure::Transport,
        PublishErrorKind::StreamNotFound => Failure::Refused("no_stream"),
        PublishErrorKind::MaxAckPending => Failure::Refused("max_ack_pending"),
        PublishErrorKind::MaxPayloadExceeded => Failure::Refused("too_large"),
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence => {
            Failure::Refused("wrong_last")
        }
        // A JetStream error answer (e.g. the stream is full) or a connection-level failure.
        PublishErrorKind::Other => Failure::Refused("jetstream_error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mode::args::ModeArgs;
    use crate::testing;

    fn parse(extra: &[&str]) -> ModeArgs<Args> {
        let base = ["loadtest", "--rate", "0"];
        testing::parse(&[&base[..], extra].concat()).unwrap()
    }

    #[test]
    fn defaults_suit_a_local_nats_server() {
        let flags = parse(&[]);
        let args = &flags.mode;
        assert_eq!(args.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(args.stream, "LOADTEST_DIRECT");
        assert_eq!((args.connections, args.max_inflight), (1, 256));
        assert_eq!(flags.run.rate, 0.0);
        assert_eq!(
            testing::events(&flags.events, args.default_subject_prefix()).prefix(),
            "direct.load"
        );
    }

    #[test]
    fn events_go_to_their_subjects_round_robin() {
        let flags = parse(&["--subjects", "2", "--payload-bytes", "10"]);
        let publishes = Publishes::new(testing::events(&flags.events, DEFAULT_SUBJECT_PREFIX));
        let (subject, _) = publishes.build(3, 0);
        assert_eq!(subject.as_str(), "direct.load.1");
        let (subject, _) = publishes.build(4, 0);
        assert_eq!(subject.as_str(), "direct.load.0");
    }

    #[test]
    fn stream_subjects_cover_the_prefix_space() {
        assert!(covers("direct.load.>", "direct.load"));
        assert!(covers("direct.>", "direct.load"));
        assert!(covers(">", "direct.load"));
        assert!(covers("*.load.>", "direct.load"));
        assert!(!covers("direct.load.*", "direct.load"));
        assert!(!covers("direct.load", "direct.load"));
        assert!(!covers("edge.>", "direct.load"));
        assert!(!covers("direct.load.0.>", "direct.load"));
    }

    #[test]
    fn publish_errors_have_report_names() {
        assert_eq!(failure(PublishErrorKind::TimedOut), Failure::Timeout);
        assert_eq!(failure(PublishErrorKind::StreamNotFound).to_string(), "no_stream");
        assert_eq!(failure(PublishErrorKind::Other).to_string(), "jetstream_error");
    }
}
