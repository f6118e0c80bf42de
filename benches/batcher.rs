//! The per-event CPU of the batching core, parameterised by batch size (`max_events`;
//! `max_events = 1` is the "batching off" baseline of the same run):
//!
//! - `batcher_push_flush`: pushing events through the sans-IO batcher until every batch is
//!   flushed (by count, the rest by a drain), events built beforehand;
//! - `batch_encode/<payload>/<events>`: encoding one protobuf `Batch` of that many events, as
//!   the sink does once per batch, by payload size (throughput in encoded bytes);
//! - `batch_and_encode_256B`: both together, building the events too.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{
    criterion_group, criterion_main, BatchSize, Bencher, BenchmarkId, Criterion, Throughput,
};
use edgerelay::batch::batcher::{Batcher, FlushReason, Item, Limits, Ready};
use edgerelay::proto;
use prost::Message;

const EVENTS: usize = 4096;
const BATCH_SIZES: [usize; 4] = [1, 16, 64, 256];
const SUBJECTS: [&str; 8] =
    ["edge.a", "edge.b", "edge.c", "edge.d", "edge.e", "edge.f", "edge.g", "edge.h"];

struct Ev(proto::Event);

impl Item for Ev {
    fn subject(&self) -> &str {
        &self.0.subject
    }
    fn size(&self) -> usize {
        self.0.encoded_len() + 3
    }
}

fn event(i: usize, payload: &Bytes) -> proto::Event {
    proto::Event {
        subject: SUBJECTS[i % SUBJECTS.len()].into(),
        payload: payload.clone(),
        id: format!("key-{i}"),
        edge_time_unix_ms: 1_700_000_000_000,
        ingest_time_unix_us: 1_700_000_000_000_000,
        publisher: "edge-bench".into(),
        ..Default::default()
    }
}

fn limits(max_events: usize) -> Limits {
    Limits { max_events, max_bytes: 512 << 10, linger: Duration::from_millis(2) }
}

/// Batches `events`, all pushed at one instant, then drained: every batch the batcher made.
fn batched(max_events: usize, events: impl IntoIterator<Item = Ev>) -> Vec<Ready<Ev>> {
    let mut batcher = Batcher::new(limits(max_events));
    let mut ready = Vec::new();
    let now = Instant::now();
    for e in events {
        batcher.push(e, now, &mut ready);
    }
    batcher.flush_all(FlushReason::Drain, &mut ready);
    ready
}

/// The batch the relay would publish, carrying `events`.
fn batch(sequence: u64, events: Vec<proto::Event>) -> proto::Batch {
    proto::Batch { relay_id: "bench".into(), boot_id: "0123456789ab".into(), sequence, events }
}

/// Group `name`, one benchmark per batch size `max_events` over [`EVENTS`] events of 256-byte
/// `payload`: `bench(b, &payload, max_events)`.
fn per_batch_size(
    c: &mut Criterion,
    name: &str,
    mut bench: impl FnMut(&mut Bencher<'_>, &Bytes, usize),
) {
    let payload = Bytes::from(vec![b'x'; 256]);
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(EVENTS as u64));
    for max_events in BATCH_SIZES {
        group.bench_with_input(BenchmarkId::from_parameter(max_events), &max_events, |b, &n| {
            bench(b, &payload, n)
        });
    }
    group.finish();
}

fn push_flush(c: &mut Criterion) {
    per_batch_size(c, "batcher_push_flush", |b, payload, n| {
        b.iter_batched(
            || (0..EVENTS).map(|i| Ev(event(i, payload))).collect::<Vec<_>>(),
            // Returned, so dropping the events is not timed.
            |events| batched(n, events),
            BatchSize::LargeInput,
        )
    });
}

fn batch_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch_encode");
    for payload_bytes in [64usize, 256, 1024] {
        let payload = Bytes::from(vec![b'x'; payload_bytes]);
        for n in BATCH_SIZES {
            let batch = batch(1, (0..n).map(|i| event(i, &payload)).collect());
            group.throughput(Throughput::Bytes(batch.encoded_len() as u64));
            let id = BenchmarkId::new(format!("{payload_bytes}B"), n);
            group.bench_with_input(id, &batch, |b, batch| b.iter(|| batch.encode_to_vec()));
        }
    }
    group.finish();
}

fn batch_and_encode(c: &mut Criterion) {
    per_batch_size(c, "batch_and_encode_256B", |b, payload, n| {
        b.iter(|| {
            let ready = batched(n, (0..EVENTS).map(|i| Ev(event(i, payload))));
            let mut bytes = 0;
            for (seq, r) in ready.into_iter().enumerate() {
                let events = r.items.into_iter().map(|e| e.0).collect();
                bytes += batch(seq as u64, events).encode_to_vec().len();
            }
            bytes
        })
    });
}

criterion_group!(benches, push_flush, batch_encode, batch_and_encode);
criterion_main!(benches);
