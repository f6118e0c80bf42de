//! `--consume`: end-to-end delivery. Before the run starts, an ordered JetStream consumer
//! (ephemeral, no acks, deliver new) is created on the stream that captures the run's subjects;
//! it reads every message, decodes relay batches (`edgerelay.v1.Batch`) or, for `direct-js`,
//! the bare event, and notes per event of this run (its payload's [`Stamp`]) how long after its
//! *intended* send time it arrived. When the run is over the acknowledged events are looked up;
//! those the consumer has not seen after `--consume-grace` are *missing*. One consumer can
//! follow several runs on the same subjects at once (`global`: one run per region), each told
//! apart by its nonce.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use edgerelay::proto;
use futures::StreamExt as _;
use prost::Message as _;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::events::{self, Stamp};
use crate::model::E2e;
use crate::schedule::parse_duration;

/// How often the end-of-run check looks whether the consumer has caught up.
const CATCH_UP_POLL: Duration = Duration::from_millis(20);

/// Flags of `--consume`, shared by every relay mode, `direct-js` and `compare`.
#[derive(Clone, Debug, clap::Args)]
pub struct ConsumeArgs {
    /// Also read the stream back and report send→consumer latency per event (from the
    /// intended send time, stamped into the first 24 payload bytes) and events never delivered.
    #[arg(long)]
    pub consume: bool,

    /// NATS server the consumer reads from [default: direct-js's --nats-url, compare's
    /// --nats, else nats://127.0.0.1:4222]
    #[arg(long, value_name = "URL")]
    pub consume_nats: Option<String>,

    /// How long after the run the consumer may take to deliver the last acknowledged events
    /// before they count as missing.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub consume_grace: Duration,
}

/// How the messages on the stream carry events.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Decoding {
    /// One `edgerelay.v1.Batch` per message (what the relay publishes).
    Batch,
    /// One event payload per message (`direct-js`).
    Raw,
}

/// Where the consumer reads.
#[derive(Clone, Debug)]
pub struct Source {
    pub nats_url: String,
    /// Subjects of the run, `<prefix>.>`; the stream is the one that captures `<prefix>.0`.
    pub prefix: String,
    pub decoding: Decoding,
}

/// A running consumer.
pub struct Consumer {
    seen: Arc<Seen>,
    task: JoinHandle<()>,
    grace: Duration,
}

/// What the consumer saw of the runs it follows (one per nonce; `global` follows one run per
/// region on one stream).
struct Seen {
    runs: HashMap<u64, RunSeen>,
    /// Messages (or events in them) that could not be decoded.
    undecodable: AtomicU64,
}

/// What the consumer saw of one run.
#[derive(Default)]
struct RunSeen {
    /// Event number -> intended send time to delivery, µs (first delivery).
    latency: Mutex<HashMap<u64, u64>>,
    /// Deliveries of an event already seen.
    duplicates: AtomicU64,
}

/// The acknowledged events of one followed run, for [`Consumer::finish_runs`].
#[derive(Clone, Copy, Debug)]
pub struct Acked<'a> {
    /// The run's nonce, as given to [`Consumer::start_runs`].
    pub nonce: u64,
    /// The accepted measured requests.
    pub requests: &'a [u64],
    pub events_per_request: u32,
}

impl Consumer {
    /// Creates the consumer (deliver new: only what is published from now on) and starts
    /// reading; events of other runs (another `nonce`) are ignored.
    pub async fn start(source: &Source, nonce: u64, grace: Duration) -> anyhow::Result<Self> {
        Self::start_runs(source, &[nonce], grace).await
    }

    /// Like [`Consumer::start`], following several runs on the same subjects at once, each
    /// told apart by its nonce.
    pub async fn start_runs(
        source: &Source,
        nonces: &[u64],
        grace: Duration,
    ) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .name("loadtest-consumer")
            .connect(source.nats_url.as_str())
            .await
            .with_context(|| format!("consumer: connecting to {}", source.nats_url))?;
        let js = async_nats::jetstream::new(client);
        let sample = format!("{}.0", source.prefix);
        let name = js
            .stream_by_subject(sample.clone())
            .await
            .with_context(|| format!("consumer: no JetStream stream captures {sample}"))?;
        let stream = js
            .get_stream(&name)
            .await
            .with_context(|| format!("consumer: opening stream {name}"))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: format!("{}.>", source.prefix),
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .with_context(|| format!("consumer: creating an ordered consumer on {name}"))?;
        let messages =
            consumer.messages().await.with_context(|| format!("consumer: reading {name}"))?;
        let seen = Arc::new(Seen::new(nonces));
        let task = tokio::spawn(read(messages, source.decoding, Arc::clone(&seen)));
        Ok(Self { seen, task, grace })
    }

    /// Waits (at most the grace) until every event in `acked` was seen, stops reading and
    /// reports. `acked` holds the accepted measured requests, `events_per_request` events each.
    pub async fn finish(self, acked: &[u64], events_per_request: u32) -> E2e {
        let nonce = self.seen.runs.keys().next().copied().unwrap_or_default();
        let run = Acked { nonce, requests: acked, events_per_request };
        let mut e2e = self.finish_runs(&[run]).await;
        e2e.pop().unwrap_or_else(|| E2e::empty(0))
    }

    /// [`Consumer::finish`] for several runs: waits (at most the grace, shared) until every
    /// acknowledged event of every run was seen, stops reading and reports each run, in the
    /// order of `runs`. `undecodable` is the consumer's whole count in each.
    pub async fn finish_runs(self, runs: &[Acked<'_>]) -> Vec<E2e> {
        let mut waiting: Vec<(&RunSeen, Vec<u64>)> = runs
            .iter()
            .filter_map(|run| {
                let seen = self.seen.runs.get(&run.nonce)?;
                Some((seen, run.events().collect()))
            })
            .collect();
        let deadline = Instant::now() + self.grace;
        loop {
            for (seen, events) in &mut waiting {
                let latency = seen.latency.lock().unwrap_or_else(PoisonError::into_inner);
                events.retain(|n| !latency.contains_key(n));
            }
            if waiting.iter().all(|(_, events)| events.is_empty()) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
        self.task.abort();
        let undecodable = self.seen.undecodable.load(Ordering::Relaxed);
        runs.iter()
            .map(|run| {
                let Some(seen) = self.seen.runs.get(&run.nonce) else {
                    // Not followed: nothing of it was looked for, so all of it is missing.
                    let mut e2e = E2e::empty(undecodable);
                    e2e.counts.expected = run.events().count() as u64;
                    e2e.counts.missing = e2e.counts.expected;
                    return e2e;
                };
                let latency_by_event = seen.latency.lock().unwrap_or_else(PoisonError::into_inner);
                let mut e2e = E2e::empty(undecodable);
                for n in run.events() {
                    e2e.counts.expected += 1;
                    if let Some(&us) = latency_by_event.get(&n) {
                        e2e.latency.saturating_record(us);
                        e2e.counts.seen += 1;
                    }
                }
                e2e.counts.missing = e2e.counts.expected - e2e.counts.seen;
                e2e.counts.duplicates = seen.duplicates.load(Ordering::Relaxed);
                e2e
            })
            .collect()
    }
}

impl Acked<'_> {
    /// Numbers of the run's acknowledged events.
    fn events(&self) -> impl Iterator<Item = u64> + '_ {
        let per = u64::from(self.events_per_request);
        self.requests.iter().flat_map(move |seq| {
            let first = seq.saturating_mul(per);
            first..first.saturating_add(per)
        })
    }
}

impl Seen {
    /// Follows the runs of `nonces`.
    fn new(nonces: &[u64]) -> Self {
        Self {
            runs: nonces.iter().map(|n| (*n, RunSeen::default())).collect(),
            undecodable: AtomicU64::new(0),
        }
    }

    /// Notes one event payload delivered at `received_ns` (unix ns, [`events::unix_ns`]).
    fn event(&self, payload: &[u8], received_ns: u64) {
        let Some(stamp) = Stamp::read(payload) else {
            self.undecodable.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(run) = self.runs.get(&stamp.nonce) else {
            return; // another run's event
        };
        let us = received_ns.saturating_sub(stamp.intended_unix_ns) / 1000;
        let mut latency = run.latency.lock().unwrap_or_else(PoisonError::into_inner);
        match latency.entry(stamp.event) {
            // Keep the first delivery's latency.
            Entry::Occupied(_) => {
                run.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            Entry::Vacant(slot) => {
                slot.insert(us);
            }
        }
    }
}

/// Reads messages until the stream of them ends (or the task is aborted).
async fn read(mut messages: pull::Ordered, decoding: Decoding, seen: Arc<Seen>) {
    let mut reported = false;
    while let Some(message) = messages.next().await {
        let received_ns = events::unix_ns(std::time::Instant::now());
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                // The ordered consumer re-creates itself after most errors; say so once.
                if !reported {
                    eprintln!("consumer: {error} (further errors are not shown)");
                    reported = true;
                }
                continue;
            }
        };
        match decoding {
            Decoding::Raw => seen.event(&message.payload, received_ns),
            Decoding::Batch => match proto::Batch::decode(message.payload.as_ref()) {
                Ok(batch) => {
                    for event in &batch.events {
                        seen.event(&event.payload, received_ns);
                    }
                }
                Err(_) => {
                    seen.undecodable.fetch_add(1, Ordering::Relaxed);
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    fn stamped(nonce: u64, event: u64, intended_unix_ns: u64) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u64(nonce);
        b.put_u64(event);
        b.put_u64(intended_unix_ns);
        b.put_slice(b"payload");
        b.to_vec()
    }

    #[test]
    fn events_are_matched_by_run_and_number() {
        let seen = Seen::new(&[7]);
        seen.event(&stamped(7, 1, 1_000_000), 3_500_000);
        seen.event(&stamped(8, 2, 1_000_000), 3_500_000); // another run: ignored
        seen.event(b"short", 3_500_000);
        seen.event(&stamped(7, 1, 1_000_000), 9_000_000); // redelivered: the first counts
        let run = &seen.runs[&7];
        let latency = run.latency.lock().unwrap();
        assert_eq!(latency.len(), 1);
        assert_eq!(latency[&1], 2500);
        assert_eq!(run.duplicates.load(Ordering::Relaxed), 1);
        assert_eq!(seen.undecodable.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn several_runs_are_told_apart_by_nonce() {
        let seen = Seen::new(&[7, 9]);
        seen.event(&stamped(7, 1, 1_000_000), 3_000_000);
        seen.event(&stamped(9, 1, 1_000_000), 5_000_000);
        seen.event(&stamped(9, 2, 1_000_000), 6_000_000);
        assert_eq!(seen.runs[&7].latency.lock().unwrap().len(), 1);
        let nine = seen.runs[&9].latency.lock().unwrap();
        assert_eq!((nine[&1], nine[&2]), (4000, 5000));
    }

    #[test]
    fn acked_requests_expand_to_their_events() {
        let acked = Acked { nonce: 1, requests: &[0, 3], events_per_request: 2 };
        assert_eq!(acked.events().collect::<Vec<_>>(), [0, 1, 6, 7]);
    }
}
