//! `--consume`: end-to-end delivery. Before the run starts, an ordered JetStream consumer
//! (ephemeral, no acks, deliver new) is created on the stream that captures the run's subjects;
//! it reads every message, decodes relay batches (`edgerelay.v1.Batch`) or, for `direct-js`,
//! the bare event, and notes per event of this run (its payload's [`Stamp`]) how long after its
//! *intended* send time it arrived. When the run is over the acknowledged events are looked up;
//! those the consumer has not seen after `--consume-grace` are *missing*.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use edgerelay::proto;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use prost::Message as _;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::events::{self, Stamp};
use crate::report;
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

/// What the consumer saw of the run with `nonce`.
struct Seen {
    nonce: u64,
    /// Event number -> intended send time to delivery, µs (first delivery).
    latency: Mutex<HashMap<u64, u64>>,
    /// Deliveries of an event already seen.
    duplicates: AtomicU64,
    /// Messages (or events in them) that could not be decoded.
    undecodable: AtomicU64,
}

/// End-to-end delivery of one run's acknowledged events.
#[derive(Debug)]
pub struct E2e {
    /// Intended send time -> consumer, µs, one value per acknowledged event seen.
    pub latency: Histogram<u64>,
    /// Acknowledged events of the measured phase (requests with every event accepted).
    pub expected: u64,
    /// Of those, the ones the consumer saw.
    pub seen: u64,
    /// Of those, the ones it did not see within `--consume-grace`.
    pub missing: u64,
    /// Events delivered more than once (whole run).
    pub duplicates: u64,
    /// Messages or events on the subjects that were not decodable (whole run).
    pub undecodable: u64,
}

impl Consumer {
    /// Creates the consumer (deliver new: only what is published from now on) and starts
    /// reading; events of other runs (another `nonce`) are ignored.
    pub async fn start(source: &Source, nonce: u64, grace: Duration) -> anyhow::Result<Self> {
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
        let seen = Arc::new(Seen {
            nonce,
            latency: Mutex::new(HashMap::new()),
            duplicates: AtomicU64::new(0),
            undecodable: AtomicU64::new(0),
        });
        let task = tokio::spawn(read(messages, source.decoding, Arc::clone(&seen)));
        Ok(Self { seen, task, grace })
    }

    /// Waits (at most the grace) until every event in `acked` was seen, stops reading and
    /// reports. `acked` holds the accepted measured requests, `events_per_request` events each.
    pub async fn finish(self, acked: &[u64], events_per_request: u32) -> E2e {
        let per = u64::from(events_per_request);
        let mut waiting: Vec<u64> = acked
            .iter()
            .flat_map(|seq| {
                let first = seq.saturating_mul(per);
                first..first.saturating_add(per)
            })
            .collect();
        let expected = waiting.len() as u64;
        let deadline = Instant::now() + self.grace;
        loop {
            {
                let latency = self.seen.latency.lock().unwrap_or_else(PoisonError::into_inner);
                waiting.retain(|n| !latency.contains_key(n));
            }
            if waiting.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
        self.task.abort();
        let latency_by_event = self.seen.latency.lock().unwrap_or_else(PoisonError::into_inner);
        let mut latency = report::histogram();
        let mut seen = 0;
        for seq in acked {
            let first = seq.saturating_mul(per);
            for n in first..first.saturating_add(per) {
                if let Some(&us) = latency_by_event.get(&n) {
                    latency.saturating_record(us);
                    seen += 1;
                }
            }
        }
        E2e {
            latency,
            expected,
            seen,
            missing: expected - seen,
            duplicates: self.seen.duplicates.load(Ordering::Relaxed),
            undecodable: self.seen.undecodable.load(Ordering::Relaxed),
        }
    }
}

impl Seen {
    /// Notes one event payload delivered at `received_ns` (unix ns, [`events::unix_ns`]).
    fn event(&self, payload: &[u8], received_ns: u64) {
        let Some(stamp) = Stamp::read(payload) else {
            self.undecodable.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if stamp.nonce != self.nonce {
            return; // another run's event
        }
        let us = received_ns.saturating_sub(stamp.intended_unix_ns) / 1000;
        let mut latency = self.latency.lock().unwrap_or_else(PoisonError::into_inner);
        match latency.entry(stamp.event) {
            // Keep the first delivery's latency.
            Entry::Occupied(_) => {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
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
        let seen = Seen {
            nonce: 7,
            latency: Mutex::new(HashMap::new()),
            duplicates: AtomicU64::new(0),
            undecodable: AtomicU64::new(0),
        };
        seen.event(&stamped(7, 1, 1_000_000), 3_500_000);
        seen.event(&stamped(8, 2, 1_000_000), 3_500_000); // another run: ignored
        seen.event(b"short", 3_500_000);
        seen.event(&stamped(7, 1, 1_000_000), 9_000_000); // redelivered: the first counts
        let latency = seen.latency.lock().unwrap();
        assert_eq!(latency.len(), 1);
        assert_eq!(latency[&1], 2500);
        assert_eq!(seen.duplicates.load(Ordering::Relaxed), 1);
        assert_eq!(seen.undecodable.load(Ordering::Relaxed), 1);
    }
}
