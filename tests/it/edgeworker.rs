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

/// Fails (never skips) when Node.js is missing or older than 20.6 (`module.register`).
fn check_node() {
    let hint = "the EdgeWorker test needs Node.js >= 20.6 on PATH (or EDGERELAY_NODE); \
                scripts/setup-tools checks for it";
    let out = std::process::Command::new(node_bin())
        .args(["-p", "process.versions.node"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}` ({e}): {hint}", node_bin()));
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!((major, minor) >= (20, 6), "`{}` is Node.js {version:?}: {hint}", node_bin());
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
    /// How long the handler took, milliseconds.
    ms: u64,
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
    run_worker_with(relay, ca, token, rid_prefix, calls, &[]).await
}

/// [`run_worker`] with extra environment variables for the runner.
async fn run_worker_with(
    relay: &TestRelay,
    ca: &Path,
    token: &str,
    rid_prefix: &str,
    calls: usize,
    extra_env: &[(&str, &str)],
) -> Vec<Call> {
    check_node();
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
        .envs(extra_env.iter().copied())
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
    let (nats, setup, relay) = start_relay(|_| {}).await;
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
        assert_eq!(e.publisher, "static:edge-test");
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

#[tokio::test]
async fn the_edgeworker_retries_once_after_retry_after_only_when_it_fits_the_budget() {
    let nats = NatsServer::start();
    let mut setup = Setup::new(&nats.url());
    let rl = &mut setup.config.auth.rate_limit;
    rl.events_per_sec = 1;
    rl.burst = 1;
    let relay = setup.start().await;
    let ca = setup.dir.path().join("ca.pem");

    // A 4 s budget (1 s per attempt; roomy so a slow first attempt on a loaded machine still
    // leaves room): the second request is rate limited with `Retry-After: 1`, waits a second
    // and is accepted on its one retry.
    let roomy = [("EDGERELAY_BUDGET_MS", "4000")];
    let calls = run_worker_with(&relay, &ca, TOKEN, "0.rl.", 2, &roomy).await;
    assert_eq!(
        (&calls[0].result["status"], &calls[0].result["attempts"]),
        (&202.into(), &1.into())
    );
    assert_eq!(calls[1].result["status"], 202, "{:?}", calls[1]);
    assert_eq!(calls[1].result["attempts"], 2, "{:?}", calls[1]);
    assert!(calls[1].ms >= 900, "the retry honoured Retry-After: {:?}", calls[1]);

    // A budget of 1.5 s cannot fit a 1 s wait plus a 1 s attempt: no retry, no wait, the
    // refusal is logged and the request goes on.
    let tight =
        run_worker_with(&relay, &ca, TOKEN, "0.tight.", 3, &[("EDGERELAY_BUDGET_MS", "1500")])
            .await;
    for c in &tight {
        assert_eq!(c.result["attempts"], 1, "{c:?}");
        assert!(c.ms < 900, "did not wait: {c:?}");
    }
    assert!(
        tight.iter().any(|c| c.result["status"] == 429 && c.result["error"] == "rate_limited"),
        "{tight:?}"
    );
    relay.shutdown().await;
}
