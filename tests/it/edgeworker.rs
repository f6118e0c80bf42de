//! The EdgeWorker example (`examples/edgeworker/`) run under Node.js with the shim of the
//! EdgeWorkers modules, against a live relay over HTTPS (the test CA through
//! `NODE_EXTRA_CA_CERTS`), with the events read back from JetStream.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::support::*;

/// `node`, or `EDGERELAY_NODE` when set.
fn node_bin() -> String {
    std::env::var("EDGERELAY_NODE").unwrap_or_else(|_| "node".into())
}

fn example_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/edgeworker")
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// One line of the runner's output.
#[derive(Debug, serde::Deserialize)]
struct Call {
    request_id: Option<String>,
    result: serde_json::Value,
    threw: Option<String>,
}

/// Runs `calls` simulated requests through main.js's onClientRequest with `token`; request i
/// carries the request id `{rid_prefix}{i}`.
async fn run_worker(
    relay: &TestRelay,
    ca: &Path,
    token: &str,
    rid_prefix: &str,
    calls: usize,
) -> Vec<Call> {
    let out = tokio::process::Command::new(node_bin())
        .current_dir(example_dir())
        .args(["--import", "./shim/register.mjs", "run-under-node.mjs"])
        .env("NODE_EXTRA_CA_CERTS", ca)
        .env("EDGERELAY_HOST", format!("127.0.0.1:{}", relay.addr().port()))
        .env("EDGERELAY_TOKEN", token)
        .env("EDGERELAY_SUBJECT_PREFIX", "edge.ew")
        .env("EW_HOST", "shop.example.com")
        .env("EW_PATH", "/cart/add")
        .env("EW_COUNTRY", "NL")
        .env("EW_CALLS", calls.to_string())
        .env("EW_REQUEST_ID_PREFIX", rid_prefix)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{}` ({e}): the EdgeWorker test needs Node.js >= 20.6 on PATH \
                 (or EDGERELAY_NODE); scripts/setup-tools checks for it",
                node_bin()
            )
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run-under-node.mjs failed: {}\n{stderr}", out.status);
    let calls: Vec<Call> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect();
    for c in &calls {
        assert!(c.threw.is_none(), "the handler threw: {c:?}\n{stderr}");
    }
    calls
}

#[tokio::test]
async fn the_edgeworker_example_publishes_each_request_once_under_node() {
    let nats = NatsServer::start();
    let setup = Setup::new(&nats.url());
    let relay = setup.start().await;
    let ca = setup.dir.path().join("ca.pem");
    // Global Request Numbers look like this (dots included).
    let rid = "0.5313217.1567801841.1457a";

    let before = now_ms();
    let first = run_worker(&relay, &ca, TOKEN, rid, 3).await;
    let after = now_ms();
    assert_eq!(first.len(), 3);
    for c in &first {
        assert_eq!(c.result["status"], 202, "{c:?}");
        assert_eq!(c.result["attempts"], 1, "{c:?}");
        assert_eq!(c.result["duplicate"], false, "{c:?}");
    }

    let stored = read_stream(&nats.url()).await;
    let events: Vec<_> = stored.iter().flat_map(|m| &m.batch.events).collect();
    assert_eq!(events.len(), 3, "{events:?}");
    let mut ids: Vec<_> = events.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    let want: Vec<String> = (0..3).map(|i| format!("{rid}{i}")).collect();
    assert_eq!(ids, want.iter().map(String::as_str).collect::<Vec<_>>());
    for m in &stored {
        // The host token is sanitized: dots are not allowed inside a subject token.
        assert_eq!(m.subject, "edge.ew.shop_example_com");
    }
    for e in &events {
        assert_eq!(e.subject, "edge.ew.shop_example_com");
        assert_eq!(e.publisher, "edge-test");
        assert_eq!(e.headers.get("content-type").map(String::as_str), Some("application/json"));
        assert!(
            (before..=after).contains(&e.edge_time_unix_ms),
            "edge timestamp {} outside the run [{before}, {after}]",
            e.edge_time_unix_ms
        );
        let payload: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
        assert_eq!(payload["method"], "GET");
        assert_eq!(payload["path"], "/cart/add");
        assert_eq!(payload["country"], "NL");
        assert_eq!(payload["edge_ts"].as_u64(), Some(e.edge_time_unix_ms));
        assert!(e.payload.len() < 200, "the event stays small: {} bytes", e.payload.len());
    }

    // The same requests again (a re-run with the same request ids): answered as duplicates
    // with the original placement, nothing new stored.
    let again = run_worker(&relay, &ca, TOKEN, rid, 3).await;
    for (c, orig) in again.iter().zip(&first) {
        assert_eq!(c.request_id, orig.request_id);
        assert_eq!(c.result["status"], 202, "{c:?}");
        assert_eq!(c.result["duplicate"], true, "{c:?}");
        assert_eq!(c.result["seq"], orig.result["seq"], "{c:?}");
    }
    assert_eq!(stream_messages(&nats.url()).await, stored.len() as u64);

    // A wrong token: 401, no retry, and the handler still completes without throwing.
    let denied = run_worker(&relay, &ca, "not-a-valid-token", "0.denied.", 2).await;
    for c in &denied {
        assert_eq!(c.result["status"], 401, "{c:?}");
        assert_eq!(c.result["attempts"], 1, "{c:?}");
        assert_eq!(c.result["error"], "unauthorized", "{c:?}");
    }
    assert_eq!(stream_messages(&nats.url()).await, stored.len() as u64);
    relay.shutdown().await;
}
