//! `edgerelay spool inspect`: the real binary on a spool directory with a damaged record, a
//! torn older segment and a torn tail being written; it reports each and changes nothing.

use std::process::Command;
use std::sync::Arc;

use edgerelay::metrics::Metrics;
use edgerelay::proto::SpoolRecord;
use edgerelay::spool::config::{FsyncPolicy, SpoolConfig};
use edgerelay::spool::{segment, Spool};

const BIN: &str = env!("CARGO_BIN_EXE_edgerelay");

fn record(i: u64, subject: &str, events: u32) -> SpoolRecord {
    SpoolRecord {
        msg_id: format!("fra1-a.0badc0ffee00.{i}"),
        subject: subject.into(),
        batch: vec![7; 100].into(),
        events,
        spooled_unix_ms: 1_795_814_100_000 + i * 1000,
    }
}

#[tokio::test]
async fn inspect_reports_damage_per_segment_and_waiting_events_per_subject() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool");
    let frame = segment::frame_len(&record(0, "edge.a", 1));
    // Two records per segment: 6 records make segments 1, 2 and 3.
    let cfg = SpoolConfig {
        enabled: true,
        dir: dir.clone(),
        max_bytes: 1 << 20,
        segment_bytes: 2 * frame,
        fsync: FsyncPolicy::Always,
        fsync_interval_ms: 100,
    };
    let (spool, _) = Spool::open(&cfg, Arc::new(Metrics::new())).unwrap();
    for (i, subject) in
        ["edge.a", "edge.b", "edge.a", "edge.a", "edge.b", "edge.a"].iter().enumerate()
    {
        spool.append(&record(i as u64, subject, 10 + i as u32)).await.unwrap();
    }
    spool.close().await;
    let seg = |n: u64| dir.join(format!("{n:020}.seg"));
    // Segment 1: a bit flipped in its second record (edge.b, 11 events).
    let mut bytes = std::fs::read(seg(1)).unwrap();
    bytes[frame as usize + 30] ^= 0x01;
    std::fs::write(seg(1), &bytes).unwrap();
    // Segment 2: its second record (edge.a, 13 events) cut short.
    let mut bytes = std::fs::read(seg(2)).unwrap();
    bytes.truncate(bytes.len() - 7);
    std::fs::write(seg(2), &bytes).unwrap();
    // Segment 3: half a header of a record being written.
    let mut bytes = std::fs::read(seg(3)).unwrap();
    bytes.extend_from_slice(&[0x10, 0, 0, 0]);
    std::fs::write(seg(3), &bytes).unwrap();
    let before: Vec<u64> = (1..=3).map(|n| std::fs::metadata(seg(n)).unwrap().len()).collect();

    let out = Command::new(BIN).args(["spool", "inspect", "--dir"]).arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let total = 6 * frame - 7 + 4;
    for needle in [
        format!(
            "3 segments, {total} bytes, 4 records waiting (51 events), 1 corrupt, {} torn bytes",
            frame - 7 + 4
        ),
        "oldest 2026-11-27T21:15:00.000Z".to_string(),
        "newest 2026-11-27T21:15:05.000Z".to_string(),
    ] {
        assert!(text.contains(&needle), "missing {needle:?} in:\n{text}");
    }
    let row = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name} in:\n{text}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    // file, bytes, records, events, corrupt, torn bytes.
    assert_eq!(
        row("00000000000000000001.seg")[..6],
        ["00000000000000000001.seg", &(2 * frame).to_string(), "1", "10", "1", "0"]
    );
    assert_eq!(
        row("00000000000000000002.seg")[..6],
        [
            "00000000000000000002.seg",
            &(2 * frame - 7).to_string(),
            "1",
            "12",
            "0",
            &(frame - 7).to_string()
        ]
    );
    assert_eq!(
        row("00000000000000000003.seg")[..6],
        ["00000000000000000003.seg", &(2 * frame + 4).to_string(), "2", "29", "0", "4"]
    );
    // Waiting per subject: edge.a has records 0, 2, 5 (10 + 12 + 15), edge.b has record 4.
    assert_eq!(row("edge.a")[1..], ["3", "37"]);
    assert_eq!(row("edge.b")[1..], ["1", "14"]);

    let out =
        Command::new(BIN).args(["spool", "inspect", "--json", "--dir"]).arg(&dir).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["records"], 4);
    assert_eq!(json["corrupt"], 1);
    assert_eq!(json["torn_bytes"], frame - 7 + 4);
    assert_eq!(json["segments"][1]["torn_bytes"], frame - 7);
    assert_eq!(json["subjects"]["edge.a"]["events"], 37);
    assert_eq!(json["oldest_unix_ms"], 1_795_814_100_000u64);

    // Read only: nothing was truncated, not even the last segment's torn tail.
    let after: Vec<u64> = (1..=3).map(|n| std::fs::metadata(seg(n)).unwrap().len()).collect();
    assert_eq!(before, after);

    // The directory from a config file's [spool] section (values not validated).
    let conf = tmp.path().join("relay.toml");
    std::fs::write(&conf, format!("[spool]\ndir = {:?}\n", dir.display().to_string())).unwrap();
    let out = Command::new(BIN).args(["spool", "inspect", "--config"]).arg(&conf).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 records waiting"));
}

#[test]
fn inspect_exits_78_on_an_unreadable_directory_and_64_on_bad_usage() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let out = Command::new(BIN).args(["spool", "inspect", "--dir"]).arg(&missing).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    let conf = tmp.path().join("bad.toml");
    std::fs::write(&conf, "[spool]\ndirr = \"/x\"\n").unwrap();
    let out = Command::new(BIN).args(["spool", "inspect", "--config"]).arg(&conf).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let out = Command::new(BIN)
        .args(["spool", "inspect", "--dir", "/tmp", "--config", "/etc/x.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}
