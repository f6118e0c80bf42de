//! Disk spool append throughput per fsync policy: 256 appends of a 4 KiB batch, issued by one
//! task in turn or by 64 tasks at once (where group commit shares one fsync among the appends
//! waiting together). Only the appends are timed; between iterations everything is replayed
//! so the segments are deleted and the bench does not fill the disk. The directory is under
//! `$TMPDIR` (or `EDGERELAY_SPOOL_BENCH_DIR`): on a tmpfs an fsync costs nothing, so point it
//! at the disk the spool will live on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgerelay::metrics::Metrics;
use edgerelay::proto::SpoolRecord;
use edgerelay::spool::config::{FsyncPolicy, SpoolConfig};
use edgerelay::spool::Spool;

const APPENDS: u64 = 256;

async fn appends(spool: &Arc<Spool>, record: &SpoolRecord, tasks: u64) -> Duration {
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (spool, record) = (spool.clone(), record.clone());
            tokio::spawn(async move {
                for _ in 0..APPENDS / tasks {
                    spool.append(&record).await.unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let took = start.elapsed();
    loop {
        let got = spool.next_batch(APPENDS as usize).await.unwrap();
        if got.is_empty() {
            break;
        }
        got.iter().for_each(|r| spool.done(r.id));
    }
    took
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let base =
        std::env::var_os("EDGERELAY_SPOOL_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let mut group = c.benchmark_group("spool_append");
    group.throughput(Throughput::Elements(APPENDS));
    group.sample_size(10);
    let record = SpoolRecord {
        msg_id: "fra1-a.0badc0ffee00.1".into(),
        subject: "edge.bench".into(),
        batch: vec![0x5a; 4096].into(),
        events: 32,
        spooled_unix_ms: 1_795_814_100_000,
    };
    let policies = [
        ("always", FsyncPolicy::Always),
        ("interval", FsyncPolicy::Interval),
        ("never", FsyncPolicy::Never),
    ];
    for (name, fsync) in policies {
        let tmp = tempfile::tempdir_in(&base).unwrap();
        let cfg = SpoolConfig {
            enabled: true,
            dir: tmp.path().join("spool"),
            max_bytes: 1 << 30,
            segment_bytes: 4 << 20,
            fsync,
            fsync_interval_ms: 100,
        };
        let (spool, _) = Spool::open(&cfg, Arc::new(Metrics::new())).unwrap();
        let spool = Arc::new(spool);
        for tasks in [1u64, 64] {
            let id = BenchmarkId::new(name, format!("{tasks}_tasks"));
            group.bench_with_input(id, &tasks, |b, &tasks| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut took = Duration::ZERO;
                        for _ in 0..iters {
                            took += appends(&spool, &record, tasks).await;
                        }
                        took
                    })
                })
            });
        }
        rt.block_on(spool.close());
    }
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
