//! What recording one latency into an HdrHistogram costs (`Histogram<u64>`, 1 µs to 60 s, 3
//! significant figures, values in µs), the way the relay keeps exact percentiles:
//!
//! - `hdr_record/plain`: one thread owning the histogram;
//! - `hdr_record/mutex_per_value`: behind an (uncontended) `Mutex`, locked per value, as when
//!   every request records its own latency;
//! - `hdr_record/mutex_per_batch/<n>`: locked once for a batch of `n` values, as when a batch's
//!   answers record every event's latency at once.
//!
//! The values spread log-uniformly from 100 µs to 1 s, so they land in many buckets.

use std::sync::Mutex;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hdrhistogram::Histogram;

/// Values recorded per iteration.
const VALUES: usize = 4096;
const BATCH_SIZES: [usize; 3] = [16, 64, 256];

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

/// `VALUES` latencies in µs, log-uniform over 100 µs..1 s (a fixed, deterministic spread).
fn latencies() -> Vec<u64> {
    (0..VALUES)
        .map(|i| {
            // A permutation of 0..VALUES, so consecutive values are far apart.
            let k = (i * 2_654_435_761) % VALUES;
            let exp = 2.0 + 4.0 * k as f64 / VALUES as f64;
            10f64.powf(exp) as u64
        })
        .collect()
}

fn hdr_record(c: &mut Criterion) {
    let values = latencies();
    let mut group = c.benchmark_group("hdr_record");
    group.throughput(Throughput::Elements(VALUES as u64));

    let mut h = histogram();
    group.bench_function("plain", |b| {
        b.iter(|| values.iter().for_each(|&v| h.saturating_record(v)))
    });

    let shared = Mutex::new(histogram());
    group.bench_function("mutex_per_value", |b| {
        b.iter(|| {
            for &v in &values {
                if let Ok(mut h) = shared.lock() {
                    h.saturating_record(v);
                }
            }
        })
    });
    for n in BATCH_SIZES {
        group.bench_with_input(BenchmarkId::new("mutex_per_batch", n), &n, |b, &n| {
            b.iter(|| {
                for chunk in values.chunks(n) {
                    if let Ok(mut h) = shared.lock() {
                        chunk.iter().for_each(|&v| h.saturating_record(v));
                    }
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, hdr_record);
criterion_main!(benches);
