//! The per-event CPU of the idempotency cache: claiming a fresh key and completing it as
//! stored, on a cache already holding its steady-state number of keys (the common case: every
//! event carries a new key). `keys` is the cache's `max_keys`; the small cache fits in the CPU's
//! caches, the default (1M) does not. `*-in-flight`: each key is completed only after
//! [`IN_FLIGHT`] newer keys were claimed, as when the PubAck comes back milliseconds later,
//! so what a claim brought into the CPU's caches may have left them by its completion.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgerelay::event::{Ack, Stored};
use edgerelay::ingest::idempotency::{Claim, Idempotency};

const BATCH: u64 = 4096;
/// Keys claimed and not completed yet in the `*-in-flight` runs: ~10 ms at 200,000 events/s.
const IN_FLIGHT: usize = 2048;

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
        let mut claimed = VecDeque::with_capacity(IN_FLIGHT + 1);
        let mut m = 0u64;
        let id = BenchmarkId::new("max_keys-in-flight", max_keys);
        group.bench_with_input(id, &max_keys, |b, _| {
            b.iter(|| {
                for _ in 0..BATCH {
                    m += 1;
                    let key = cache.key("edge-collector", &format!("later-{m}"));
                    assert!(matches!(cache.claim(key, now), Claim::New));
                    claimed.push_back(key);
                    if claimed.len() > IN_FLIGHT {
                        let done = claimed.pop_front().unwrap_or(key);
                        cache.complete(done, &Ok(Ack::Stored(stored)), now);
                    }
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, claim_and_complete);
criterion_main!(benches);
