//! Tests of the spool store through its API: appends, replay, rotation and deletion, a full
//! spool, recovery from torn and damaged segments, fsync policies, the directory lock.

use std::collections::HashSet;

use super::*;
use crate::spool::config::FsyncPolicy;

fn cfg(dir: &Path, max_bytes: u64, segment_bytes: u64, fsync: FsyncPolicy) -> SpoolConfig {
    SpoolConfig {
        enabled: true,
        dir: dir.join("spool"),
        max_bytes,
        segment_bytes,
        fsync,
        fsync_interval_ms: 20,
    }
}

fn rec(i: u64) -> SpoolRecord {
    SpoolRecord {
        msg_id: format!("r.b.{i}"),
        subject: format!("edge.s{}", i % 3),
        batch: vec![i as u8; 40].into(),
        events: 2,
        spooled_unix_ms: 1_700_000_000_000 + i,
    }
}

/// Every record has the same frame length.
fn frame() -> u64 {
    segment::frame_len(&rec(0))
}

fn open(c: &SpoolConfig) -> (Spool, Recovery, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let (spool, recovery) = Spool::open(c, metrics.clone()).unwrap();
    (spool, recovery, metrics)
}

/// Appends records `0..n` to the spool at `c` and closes it, leaving them on disk.
async fn left_on_disk(c: &SpoolConfig, n: u64) {
    let (spool, _, _) = open(c);
    for i in 0..n {
        spool.append(&rec(i)).await.unwrap();
    }
    spool.close().await;
}

/// Rewrites the file at `path` as `change` leaves its bytes: a crash or a disk fault.
fn tamper(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    change(&mut bytes);
    std::fs::write(path, &bytes).unwrap();
}

/// A spool at `tmp` of `segment_bytes` segments (fsync always) left holding records `0..n`,
/// its first segment then changed by `change` ([`tamper`]): its config and that segment's path.
async fn damaged(
    tmp: &Path,
    segment_bytes: u64,
    n: u64,
    change: impl FnOnce(&mut Vec<u8>),
) -> (SpoolConfig, PathBuf) {
    let c = cfg(tmp, 1 << 20, segment_bytes, FsyncPolicy::Always);
    left_on_disk(&c, n).await;
    let first = seg_path(&c, 1);
    tamper(&first, change);
    (c, first)
}

fn ids(records: &[Spooled]) -> Vec<String> {
    records.iter().map(|r| r.record.msg_id.clone()).collect()
}

fn names(range: std::ops::Range<u64>) -> Vec<String> {
    range.map(|i| format!("r.b.{i}")).collect()
}

fn files(c: &SpoolConfig) -> Vec<String> {
    list_segments(&c.dir).unwrap().into_iter().map(|(seq, _)| segment_name(seq)).collect()
}

fn seg_path(c: &SpoolConfig, seq: u64) -> PathBuf {
    c.dir.join(segment_name(seq))
}

/// Waits for the writer thread to catch up with `check`.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn appended_records_survive_a_reopen_and_replay_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), 1 << 20, 1 << 20, FsyncPolicy::Always);
    let (spool, recovery, metrics) = open(&c);
    assert_eq!(recovery, Recovery { segments: 0, ..Recovery::default() });
    for i in 0..10 {
        spool.append(&rec(i)).await.unwrap();
    }
    assert_eq!((spool.len(), spool.bytes()), (10, 10 * frame()));
    let text = metrics.render();
    assert!(text.contains("edgerelay_spool_records 10"), "{text}");
    assert!(text.contains("edgerelay_spool_appends_total 10"), "{text}");
    spool.close().await;
    assert!(matches!(spool.append(&rec(99)).await, Err(SpoolError::Closed)));

    let (spool, recovery, _) = open(&c);
    assert_eq!(recovery.segments, 1);
    assert_eq!(
        (recovery.total.records, recovery.total.events, recovery.total.bytes),
        (10, 20, 10 * frame())
    );
    assert_eq!(recovery.total.oldest_unix_ms, Some(1_700_000_000_000));
    assert_eq!(recovery.total.newest_unix_ms, Some(1_700_000_000_009));
    assert_eq!((recovery.total.torn_bytes, recovery.total.corrupt), (0, 0));
    let first = spool.next_batch(4).await.unwrap();
    assert_eq!(ids(&first), names(0..4));
    assert_eq!(first[0].record, rec(0));
    let rest = spool.next_batch(100).await.unwrap();
    assert_eq!(ids(&rest), names(4..10));
    assert!(spool.next_batch(100).await.unwrap().is_empty());
    // Nothing done: everything is still there after another restart (at least once).
    spool.close().await;
    let (spool, recovery, _) = open(&c);
    assert_eq!(recovery.total.records, 10);
    assert_eq!(ids(&spool.next_batch(100).await.unwrap()), names(0..10));
}

#[tokio::test]
async fn segments_rotate_and_are_deleted_once_every_record_is_done() {
    let tmp = tempfile::tempdir().unwrap();
    // Three records per segment.
    let c = cfg(tmp.path(), 1 << 20, 3 * frame() + 1, FsyncPolicy::Always);
    let (spool, _, metrics) = open(&c);
    for i in 0..10 {
        spool.append(&rec(i)).await.unwrap();
    }
    assert_eq!(files(&c).len(), 4);
    assert_eq!(std::fs::metadata(seg_path(&c, 1)).unwrap().len(), 3 * frame());
    let all = spool.next_batch(100).await.unwrap();
    assert_eq!(ids(&all), names(0..10));
    assert_eq!(all[3].id, RecordId { segment: 2, offset: 0 });
    assert_eq!(all[4].id, RecordId { segment: 2, offset: frame() });

    // Done out of order within the first two segments.
    for r in [&all[1], &all[0], &all[4], &all[3]] {
        spool.done(r.id);
    }
    spool.done(all[0].id); // twice: no effect
    assert_eq!(spool.len(), 6);
    assert!(seg_path(&c, 1).exists(), "segment 1 still has record 2");
    spool.done(all[2].id);
    eventually("segment 1 deleted", || spool.bytes() == 7 * frame()).await;
    assert!(!seg_path(&c, 1).exists());
    assert!(seg_path(&c, 2).exists());
    for r in &all[5..] {
        spool.done(r.id);
    }
    // The last (active) segment is closed and deleted too; appends go to a fresh one.
    eventually("every replayed segment deleted", || spool.bytes() == 0).await;
    assert_eq!(files(&c), [segment_name(5)]);
    assert!(spool.is_empty());
    let text = metrics.render();
    assert!(text.contains("edgerelay_spool_replayed_total 10"), "{text}");
    assert!(text.contains("edgerelay_spool_bytes 0"), "{text}");
    spool.append(&rec(10)).await.unwrap();
    assert_eq!(ids(&spool.next_batch(10).await.unwrap()), names(10..11));
    assert_eq!(files(&c), [segment_name(5)]);
}

#[tokio::test]
async fn rewind_hands_out_again_what_is_not_done() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), 1 << 20, 4 * frame(), FsyncPolicy::Always);
    let (spool, _, _) = open(&c);
    for i in 0..8 {
        spool.append(&rec(i)).await.unwrap();
    }
    let got = spool.next_batch(5).await.unwrap();
    for i in [0, 2, 3] {
        spool.done(got[i].id);
    }
    spool.rewind().await;
    let again = spool.next_batch(100).await.unwrap();
    assert_eq!(ids(&again), ["r.b.1", "r.b.4", "r.b.5", "r.b.6", "r.b.7"]);
}

#[tokio::test]
async fn a_full_spool_refuses_appends_until_replay_frees_a_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), 6 * frame(), 2 * frame(), FsyncPolicy::Always);
    let (spool, _, _) = open(&c);
    for i in 0..6 {
        spool.append(&rec(i)).await.unwrap();
    }
    let err = spool.append(&rec(6)).await.unwrap_err();
    assert!(
        matches!(err, SpoolError::Full { bytes, max_bytes } if bytes == 6 * frame() && max_bytes == 6 * frame()),
        "{err}"
    );
    assert!(err.retryable());
    assert_eq!(spool.len(), 6, "a refused append stores nothing");
    let first = spool.next_batch(2).await.unwrap();
    first.iter().for_each(|r| spool.done(r.id));
    eventually("a segment freed", || spool.bytes() == 4 * frame()).await;
    spool.append(&rec(6)).await.unwrap();
    // A record that can never fit is not "full" but too large.
    let huge = SpoolRecord { batch: vec![0; 7 * frame() as usize].into(), ..rec(7) };
    assert!(matches!(spool.append(&huge).await, Err(SpoolError::TooLarge { .. })));
    assert!(matches!(spool.append(&SpoolRecord::default()).await, Err(SpoolError::Empty)));
}

#[tokio::test]
async fn a_torn_tail_is_truncated_on_open_and_appends_continue_after_it() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), 1 << 20, 1 << 20, FsyncPolicy::Always);
    left_on_disk(&c, 3).await;
    // A crash in the middle of writing record 3.
    let path = seg_path(&c, 1);
    let intact = std::fs::read(&path).unwrap();
    tamper(&path, |b| b.extend_from_slice(&segment::encode(&rec(3)).unwrap()[..20]));

    let (spool, recovery, metrics) = open(&c);
    assert_eq!((recovery.total.records, recovery.total.torn_bytes), (3, 20));
    assert_eq!(
        recovery.damage,
        [Damage {
            file: segment_name(1),
            offset: 3 * frame(),
            kind: DamageKind::Torn {
                bytes: 20,
                why: segment::Torn::ShortPayload { len: frame() as u32 - 8, have: 12 },
                truncated: true
            },
        }]
    );
    assert!(recovery.to_string().contains("torn tail of 20 bytes"), "{recovery}");
    assert!(metrics.render().contains("edgerelay_spool_torn_bytes_total 20"));
    assert_eq!(std::fs::read(&path).unwrap(), intact, "cut back to the intact records");
    spool.append(&rec(3)).await.unwrap();
    spool.close().await;
    let (spool, recovery, _) = open(&c);
    assert_eq!((recovery.total.records, recovery.total.torn_bytes), (4, 0));
    assert_eq!(ids(&spool.next_batch(10).await.unwrap()), names(0..4));
}

#[tokio::test]
async fn a_bit_flipped_record_is_skipped_counted_and_its_segment_still_retires() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, path) =
        damaged(tmp.path(), 3 * frame(), 6, |b| b[(frame() + 20) as usize] ^= 0x08).await;
    // And a torn tail in the middle segment-to-be: a non-last segment keeps it.
    let (spool, recovery, metrics) = open(&c);
    assert_eq!((recovery.total.records, recovery.total.corrupt), (5, 1));
    assert!(matches!(
        &recovery.damage[0],
        Damage { offset, kind: DamageKind::Corrupt { why: segment::Corruption::Checksum { .. }, .. }, .. }
            if *offset == frame()
    ));
    assert!(metrics.render().contains("edgerelay_spool_corrupt_records_total 1"));
    let all = spool.next_batch(10).await.unwrap();
    assert_eq!(ids(&all), ["r.b.0", "r.b.2", "r.b.3", "r.b.4", "r.b.5"]);
    spool.done(all[0].id);
    spool.done(all[1].id);
    eventually("the damaged segment deleted", || !path.exists()).await;
}

#[tokio::test]
async fn a_torn_tail_of_an_older_segment_is_reported_and_left_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, first) = damaged(tmp.path(), 2 * frame(), 4, |b| b.truncate(b.len() - 5)).await;
    let (spool, recovery, _) = open(&c);
    assert_eq!((recovery.total.records, recovery.total.torn_bytes), (3, frame() - 5));
    assert!(matches!(recovery.damage[0].kind, DamageKind::Torn { truncated: false, .. }));
    assert_eq!(std::fs::metadata(&first).unwrap().len(), 2 * frame() - 5);
    assert_eq!(ids(&spool.next_batch(10).await.unwrap()), ["r.b.0", "r.b.2", "r.b.3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_from_many_tasks_are_all_stored_once() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), 1 << 20, 16 * frame(), FsyncPolicy::Always);
    let (spool, _, _) = open(&c);
    let spool = Arc::new(spool);
    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let spool = spool.clone();
            tokio::spawn(async move {
                for i in 0..20 {
                    spool.append(&rec(t * 1000 + i)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(spool.len(), 640);
    spool.close().await;
    let (spool, recovery, _) = open(&c);
    assert_eq!(
        (recovery.total.records, recovery.total.corrupt, recovery.total.torn_bytes),
        (640, 0, 0)
    );
    let mut seen = HashSet::new();
    loop {
        let got = spool.next_batch(100).await.unwrap();
        if got.is_empty() {
            break;
        }
        for r in got {
            assert!(seen.insert(r.record.msg_id.clone()), "{} twice", r.record.msg_id);
        }
    }
    assert_eq!(seen.len(), 640);
    // Group commits rotate like single appends: no segment grew past its size.
    for (_, path) in list_segments(&c.dir).unwrap() {
        assert!(std::fs::metadata(&path).unwrap().len() <= c.segment_bytes);
    }
}

#[tokio::test]
async fn every_fsync_policy_stores_and_recovers_records() {
    for fsync in [FsyncPolicy::Always, FsyncPolicy::Interval, FsyncPolicy::Never] {
        let tmp = tempfile::tempdir().unwrap();
        let c = cfg(tmp.path(), 1 << 20, 4 * frame(), fsync);
        let (spool, _, _) = open(&c);
        for i in 0..10 {
            spool.append(&rec(i)).await.unwrap();
        }
        if fsync == FsyncPolicy::Interval {
            // The writer's timer syncs without another append.
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        spool.close().await;
        let (spool, recovery, _) = open(&c);
        assert_eq!(recovery.total.records, 10, "{fsync:?}");
        assert_eq!(ids(&spool.next_batch(100).await.unwrap()), names(0..10), "{fsync:?}");
    }
}

#[tokio::test]
async fn an_idle_replayer_wakes_up_on_append() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), 1 << 20, 1 << 20, FsyncPolicy::Never);
    let (spool, _, _) = open(&c);
    let spool = Arc::new(spool);
    assert!(spool.next_batch(10).await.unwrap().is_empty());
    let replayer = {
        let spool = spool.clone();
        tokio::spawn(async move {
            loop {
                let got = spool.next_batch(10).await.unwrap();
                if !got.is_empty() {
                    return ids(&got);
                }
                spool.appended().await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    spool.append(&rec(1)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), replayer).await.unwrap().unwrap();
    assert_eq!(got, ["r.b.1"]);
}

#[tokio::test]
async fn one_relay_per_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cfg(tmp.path(), 1 << 20, 1 << 20, FsyncPolicy::Always);
    let (spool, _, _) = open(&c);
    let err = Spool::open(&c, Arc::new(Metrics::new())).unwrap_err();
    assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
    spool.close().await;
    let (_spool, _, _) = open(&c);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&c.dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}
