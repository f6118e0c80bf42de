//! Interop with an independent QUIC stack: Python's aioquic publishes over raw QUIC
//! (`edgerelay/1`, protobuf encoded by hand from the .proto) and over HTTP/3, and the events
//! are read back from JetStream.

use std::path::PathBuf;
use std::process::Command;

use crate::support::*;

fn aioquic(
    mode: &str,
    setup: &Setup,
    relay: &TestRelay,
    subject: &str,
    payloads: &[&str],
) -> Vec<serde_json::Value> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .env("PYTHONPATH", root.join(".tools/python"))
        .arg(root.join("tests/interop/aioquic_client.py"))
        .args([mode, "127.0.0.1", &relay.quic_addr().port().to_string()])
        .arg(setup.dir.path().join("ca.pem"))
        .args([TOKEN, subject])
        .args(payloads)
        .output()
        .expect("python3 runs (scripts/setup-tools installs aioquic)");
    assert!(
        out.status.success(),
        "aioquic {mode} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioquic_publishes_over_native_quic_and_http3() {
    let (nats, setup, relay) = start_relay(|_| {}).await;

    let native = tokio::task::block_in_place(|| {
        aioquic("native", &setup, &relay, "edge.interop.native", &["n0", "n1", "n2"])
    });
    let h3 = tokio::task::block_in_place(|| {
        aioquic("h3", &setup, &relay, "edge.interop.h3", &["h0", "h1"])
    });
    assert_eq!(native.len(), 3, "{native:?}");
    assert_eq!(h3.len(), 2, "{h3:?}");
    for a in native.iter().chain(&h3) {
        assert_eq!(a["stream"], STREAM, "{a}");
        assert!(a["seq"].as_u64().unwrap() > 0);
    }
    assert!(h3.iter().all(|a| a["status"] == 202));
    relay.shutdown().await;

    let stored = read_stream(&nats.url()).await;
    let events: Vec<(String, String, String)> = stored
        .iter()
        .flat_map(|m| &m.batch.events)
        .map(|e| {
            (e.subject.clone(), String::from_utf8_lossy(&e.payload).into_owned(), e.id.clone())
        })
        .collect();
    for (i, p) in ["n0", "n1", "n2"].iter().enumerate() {
        let want = ("edge.interop.native".to_owned(), p.to_string(), format!("aioquic-native-{i}"));
        assert!(events.contains(&want), "{want:?} missing from {events:?}");
    }
    for (i, p) in ["h0", "h1"].iter().enumerate() {
        let want = ("edge.interop.h3".to_owned(), p.to_string(), format!("aioquic-h3-{i}"));
        assert!(events.contains(&want), "{want:?} missing from {events:?}");
    }
}
