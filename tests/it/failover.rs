//! Several NATS clusters: the relay publishes to the nearest healthy one, fails over when it
//! stops acknowledging or disconnects, fails back with hysteresis, and never answers 202 for
//! an event that the named cluster did not store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;

/// Events answered 202, by payload, with the cluster each answer named; and every other status.
#[derive(Default)]
struct Ledger {
    acked: HashMap<String, String>,
    other: Vec<u16>,
}

/// Publishes distinct events from `workers` tasks until `stop` turns true.
fn publish_until(
    relay: &TestRelay,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Ledger>>, Vec<tokio::task::JoinHandle<()>>) {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let tasks = (0..workers)
        .map(|w| {
            let (client, url, stop, ledger) = (
                relay.h2.clone(),
                relay.url("/v1/publish/edge.failover"),
                stop.clone(),
                ledger.clone(),
            );
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let payload = format!("w{w}-e{i}");
                    i += 1;
                    let resp = client
                        .post(&url)
                        .bearer_auth(TOKEN)
                        .header("Idempotency-Key", &payload)
                        .body(payload.clone())
                        .send()
                        .await
                        .expect("relay answers");
                    let status = resp.status().as_u16();
                    if status == 202 {
                        let a: Accepted = resp.json().await.unwrap();
                        ledger.lock().unwrap().acked.insert(payload, a.cluster);
                    } else {
                        ledger.lock().unwrap().other.push(status);
                    }
                }
            })
        })
        .collect();
    (ledger, tasks)
}

/// Event payloads stored in the stream of the NATS server at `url`.
async fn stored_payloads(url: &str) -> Vec<String> {
    read_stream(url)
        .await
        .into_iter()
        .flat_map(|m| m.batch.events)
        .map(|e| String::from_utf8(e.payload.to_vec()).unwrap())
        .collect()
}

/// Checks that every acknowledged event is in the cluster its answer named.
async fn check_stored(ledger: &Ledger, urls: &[(&str, String)]) -> HashMap<String, usize> {
    let mut per_cluster = HashMap::new();
    for (name, url) in urls {
        let stored: std::collections::HashSet<String> =
            stored_payloads(url).await.into_iter().collect();
        for (payload, cluster) in &ledger.acked {
            if cluster == name {
                assert!(
                    stored.contains(payload),
                    "{payload} answered from {name} but not stored there"
                );
                *per_cluster.entry(name.to_string()).or_default() += 1;
            }
        }
    }
    per_cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_cluster_fails_over_and_the_nearer_one_is_taken_back_after_the_hold_time() {
    let near = NatsServer::start();
    let far = NatsServer::start();
    let far_proxy = delay_proxy(([127, 0, 0, 1], far.port).into(), Duration::from_millis(15)).await;
    let mut setup = Setup::new(&near.url());
    use_clusters(
        &mut setup.config,
        &[("near", near.url()), ("far", format!("nats://{far_proxy}"))],
    );
    let relay = setup.start().await;
    until_active(&relay, "near", Duration::from_secs(5)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (ledger, tasks) = publish_until(&relay, 8, stop.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    // SIGSTOP: the connection stays up, nothing is answered (a black hole).
    near.freeze(true);
    let failover = until_active(&relay, "far", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    near.freeze(false);
    let failback = until_active(&relay, "near", Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        failback >= Duration::from_secs(2),
        "fail-back did not wait the hold time: {failback:?}"
    );

    let failovers =
        metric(&relay, "edgerelay_nats_failovers_total{to=\"far\",reason=\"unhealthy\"}").await;
    let failbacks =
        metric(&relay, "edgerelay_nats_failovers_total{to=\"near\",reason=\"nearer\"}").await;
    relay.shutdown().await;
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(ledger.other.is_empty(), "failover cost requests: {:?}", ledger.other);
    let per_cluster = check_stored(&ledger, &[("near", near.url()), ("far", far.url())]).await;
    assert!(per_cluster.get("far").copied().unwrap_or(0) > 0, "{per_cluster:?}");
    assert!(per_cluster.get("near").copied().unwrap_or(0) > 0, "{per_cluster:?}");
    assert_eq!((failovers, failbacks), (1, 1));
    eprintln!("failover after {failover:?}, fail-back after {failback:?}, acked {per_cluster:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_down_at_start_is_skipped_and_a_killed_cluster_fails_over_at_once() {
    let mut a = NatsServer::start();
    let b = NatsServer::start();
    a.stop();
    let mut setup = Setup::new(&b.url());
    use_clusters(&mut setup.config, &[("a", a.url()), ("b", b.url())]);
    setup.config.nats.connect_timeout_ms = 500;
    let relay = setup.start().await;
    let plain = reqwest::Client::new();
    assert_eq!(plain.get(relay.admin_url("/readyz")).send().await.unwrap().status(), 200);
    let resp = relay.publish(&relay.h2, "edge.failover", "one").send().await.unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(resp.json::<Accepted>().await.unwrap().cluster, "b");

    // `a` comes up, `b` dies: the relay moves to `a` without waiting for a probe.
    a.restart();
    drop(b);
    until_active(&relay, "a", Duration::from_secs(10)).await;
    let resp = relay.publish(&relay.h2, "edge.failover", "two").send().await.unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(resp.json::<Accepted>().await.unwrap().cluster, "a");
    relay.shutdown().await;
    assert_eq!(stored_payloads(&a.url()).await, ["two"]);
}
