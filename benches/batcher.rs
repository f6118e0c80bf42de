//! The per-event CPU of the batching core: pushing events through the sans-IO batcher and
//! encoding the resulting protobuf `Batch`, parameterised by batch size. `max_events = 1` is
//! the "batching off" baseline of the same run.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgerelay::batch::batcher::{Batcher, FlushReason, Item, Limits};
use edgerelay::proto;
use prost::Message;

const EVENTS: usize = 4096;
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

fn batch_and_encode(c: &mut Criterion) {
    let payload = Bytes::from(vec![b'x'; 256]);
    let mut group = c.benchmark_group("batch_and_encode_256B");
    group.throughput(Throughput::Elements(EVENTS as u64));
    for max_events in [1usize, 16, 64, 256] {
        group.bench_with_input(BenchmarkId::from_parameter(max_events), &max_events, |b, &n| {
            let limits =
                Limits { max_events: n, max_bytes: 512 << 10, linger: Duration::from_millis(2) };
            b.iter(|| {
                let mut batcher = Batcher::new(limits);
                let mut ready = Vec::new();
                let now = Instant::now();
                let mut bytes = 0;
                for i in 0..EVENTS {
                    batcher.push(Ev(event(i, &payload)), now, &mut ready);
                }
                batcher.flush_all(FlushReason::Drain, &mut ready);
                for (seq, r) in ready.drain(..).enumerate() {
                    let batch = proto::Batch {
                        relay_id: "bench".into(),
                        boot_id: "0123456789ab".into(),
                        sequence: seq as u64,
                        events: r.items.into_iter().map(|e| e.0).collect(),
                    };
                    bytes += batch.encode_to_vec().len();
                }
                bytes
            })
        });
    }
    group.finish();
}

criterion_group!(benches, batch_and_encode);
criterion_main!(benches);
