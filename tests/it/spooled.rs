//! Ack mode `spooled` with the disk spool: with every cluster down, events are answered
//! `{"spooled":true}` once on disk, replayed in order with their Msg-Ids when a cluster is
//! back (each stored once), kept across a `kill -9` of the relay, and refused with 503 and
//! Retry-After when the spool is full — never dropped.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use edgerelay::ingest::config::AckMode;

use crate::support::*;

/// A spooled-mode relay config for `nats`, its spool under the setup's directory.
fn spooled_setup(nats: &NatsServer) -> Setup {
    let mut setup = Setup::new(&nats.url());
    setup.config.relay.ack_mode = AckMode::Spooled;
    setup.config.nats.connect_timeout_ms = 300;
    let spool = &mut setup.config.spool;
    spool.enabled = true;
    spool.dir = setup.dir.path().join("spool");
    spool.segment_bytes = 1 << 20;
    spool.max_bytes = 8 << 20;
    setup
}

/// Publishes `n` distinct events (`{prefix}-{i}`, each with its idempotency key) from 8 tasks;
/// returns the answers' status and JSON body by payload.
async fn publish_n(
    client: &reqwest::Client,
    url: &str,
    prefix: &str,
    n: usize,
) -> HashMap<String, (u16, serde_json::Value)> {
    let mut out = HashMap::new();
    let payloads: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for chunk in payloads.chunks(8) {
        let sends = chunk.iter().map(|p| async move {
            let resp = client
                .post(url)
                .bearer_auth(TOKEN)
                .header("Idempotency-Key", p)
                .body(p.clone())
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (p.clone(), (status, resp.json::<serde_json::Value>().await.unwrap_or_default()))
        });
        out.extend(futures::future::join_all(sends).await);
    }
    out
}

/// Event payloads in the stream, with how often each is stored; waits (up to `within`) until
/// at least `want` events are there.
async fn stored_events(url: &str, want: usize, within: Duration) -> HashMap<String, usize> {
    let deadline = Instant::now() + within;
    loop {
        let mut counts = HashMap::new();
        if stream_messages(url).await > 0 {
            for m in read_stream(url).await {
                for e in m.batch.events {
                    *counts.entry(String::from_utf8(e.payload.to_vec()).unwrap()).or_default() += 1;
                }
            }
        }
        if counts.len() >= want || Instant::now() > deadline {
            return counts;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_cluster_down_events_are_spooled_then_replayed_once() {
    let mut nats = NatsServer::start();
    nats.stop();
    let setup = spooled_setup(&nats);
    let relay = setup.start().await;
    let plain = reqwest::Client::new();
    assert_eq!(
        plain.get(relay.admin_url("/readyz")).send().await.unwrap().status(),
        200,
        "with a spool the relay takes events while no cluster does"
    );
    let answers = publish_n(&relay.h2, &relay.url("/v1/publish/edge.spool"), "down", 40).await;
    for (p, (status, body)) in &answers {
        assert_eq!((*status, body["spooled"].as_bool()), (202, Some(true)), "{p}: {body}");
    }
    assert!(metric(&relay, "edgerelay_spool_records").await > 0);

    nats.restart();
    let stored = stored_events(&nats.url(), 40, Duration::from_secs(20)).await;
    for p in answers.keys() {
        assert_eq!(stored.get(p), Some(&1), "{p} stored {:?} times", stored.get(p));
    }
    // Once replayed, the spool is empty and its segments are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&relay, "edgerelay_spool_records").await > 0 {
        assert!(Instant::now() < deadline, "spool never emptied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // With the cluster up, events are stored directly again.
    let resp = relay.publish(&relay.h2, "edge.spool", "after").send().await.unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(resp.json::<Accepted>().await.unwrap().cluster, "default");
    relay.shutdown().await;
    let segments = std::fs::read_dir(&setup.config.spool.dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
        .filter(|e| e.as_ref().unwrap().metadata().unwrap().len() > 0)
        .count();
    assert_eq!(segments, 0, "replayed segments are deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_refuses_with_503_and_retry_after_and_loses_nothing_it_answered() {
    let mut nats = NatsServer::start();
    nats.stop();
    let mut setup = spooled_setup(&nats);
    setup.config.batch.max_bytes = 64 << 10;
    setup.config.spool.segment_bytes = 128 << 10;
    setup.config.spool.max_bytes = 256 << 10;
    let relay = setup.start().await;
    let body = "x".repeat(4000);
    let mut spooled = Vec::new();
    let mut full = None;
    for i in 0..200 {
        let payload = format!("{i:04}{body}");
        let resp = relay.publish(&relay.h2, "edge.full", payload.clone()).send().await.unwrap();
        if resp.status() == 202 {
            spooled.push(payload);
            continue;
        }
        let retry_after = resp.headers().get("retry-after").cloned();
        let v: serde_json::Value = resp.json().await.unwrap();
        full = Some((v, retry_after));
        break;
    }
    let (v, retry_after) = full.expect("the spool never filled");
    assert_eq!(v["error"]["code"], "queue_full", "{v}");
    assert_eq!(v["error"]["reason"], "spool_full", "{v}");
    assert!(retry_after.is_some());
    assert!(spooled.len() >= 40, "only {} events fit 256 KiB", spooled.len());

    nats.restart();
    let stored = stored_events(&nats.url(), spooled.len(), Duration::from_secs(20)).await;
    for p in &spooled {
        assert_eq!(stored.get(p), Some(&1), "spooled event {} not stored once", &p[..4]);
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_with_a_spool_replays_it_at_the_next_start() {
    let mut nats = NatsServer::start();
    nats.stop();
    let setup = spooled_setup(&nats);
    let config = setup.binary_config(|c| {
        c.with(|c| {
            c.nats.connect_timeout_ms = 300;
            c.relay.ack_mode = AckMode::Spooled;
            c.spool.enabled = true;
            c.spool.dir = setup.config.spool.dir.clone();
            c.spool.segment_bytes = 1 << 20;
        })
    });
    let binary = BinaryRelay::new(&setup, config);
    let start = || binary.spawn(Stdio::inherit());
    let mut relay = start();
    binary.wait_ready().await;
    let client = client(&setup.certs, true);
    let url = binary.url("/v1/publish/edge.crash");
    let answers = publish_n(&client, &url, "crash", 24).await;
    assert!(answers.values().all(|(s, b)| *s == 202 && b["spooled"] == true), "{answers:?}");
    relay.kill().unwrap();
    relay.wait().unwrap();

    nats.restart();
    let mut relay = start();
    binary.wait_ready().await;
    let stored = stored_events(&nats.url(), 24, Duration::from_secs(20)).await;
    relay.kill().unwrap();
    relay.wait().unwrap();
    for p in answers.keys() {
        assert_eq!(stored.get(p), Some(&1), "{p} stored {:?} times", stored.get(p));
    }
}
