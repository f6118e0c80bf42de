//! The per-event CPU of the idempotency cache: claiming a fresh key and completing it as
//! stored, on a cache already holding its steady-state number of keys (the common case: every
//! event carries a new key). `keys` is the cache's `max_keys`; the small cache fits in the CPU's
//! caches, the default (1M) does not.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgerelay::event::{Ack, Stored};
use edgerelay::ingest::idempotency::{Claim, Idempotency};

const BATCH: u64 = 4096;

fn claim_and_complete(c: &mut Criterion) {
    let mut group = c.benchmark_group("idempotency");
    group.throughput(Throughput::Elements(BATCH));
    let stored = Stored { seq: 1, batch: 1, index: 0, cluster: 0, duplicate: false };
    for max_keys in [10_000usize, 1_000_000] {
        let cache = Idempotency::new(Duration::from_secs(3600), max_keys);
        let now = Instant::now();
        let mut n = 0u64;
        let mut fresh = |cache: &Idempotency| {
            n += 1;
            let key = cache.key("edge-collector", &format!("key-{n}"));
            assert!(matches!(cache.claim(key, now), Claim::New));
            cache.complete(key, &Ok(Ack::Stored(stored)), now);
        };
        // Fill to the steady state: both generations in use.
        for _ in 0..max_keys {
            fresh(&cache);
        }
        group.bench_with_input(BenchmarkId::new("max_keys", max_keys), &max_keys, |b, _| {
            b.iter(|| (0..BATCH).for_each(|_| fresh(&cache)))
        });
    }
    group.finish();
}

criterion_group!(benches, claim_and_complete);
criterion_main!(benches);
