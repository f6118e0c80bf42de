//! NATS unavailable before or during publishing: never a 2xx for what was not acknowledged,
//! 503 with Retry-After, and recovery without a restart once NATS is back.

use std::time::{Duration, Instant};

use crate::support::*;

/// Publishes until a 202 comes back or `within` passes; returns the statuses seen.
async fn until_accepted(relay: &TestRelay, within: Duration) -> Vec<u16> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let resp = relay.publish(&relay.h1, "edge.faults", "after").send().await.unwrap();
        seen.push(resp.status().as_u16());
        if resp.status() == 202 {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    seen
}

#[tokio::test]
async fn nats_down_before_publishing_gives_503_then_recovers() {
    let mut nats = NatsServer::start();
    nats.stop();
    let mut setup = Setup::new(&nats.url());
    setup.config.nats.connect_timeout_ms = 300;
    let relay = setup.start().await;
    let plain = reqwest::Client::new();
    assert_eq!(plain.get(relay.admin_url("/readyz")).send().await.unwrap().status(), 503);

    let resp = relay.publish(&relay.h2, "edge.faults", "before").send().await.unwrap();
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(error_code(resp).await, (503, "nats_unavailable".into()));

    nats.restart();
    let seen = until_accepted(&relay, Duration::from_secs(20)).await;
    assert_eq!(seen.last(), Some(&202), "never recovered: {seen:?}");
    assert!(seen.iter().all(|s| *s == 202 || *s == 503), "{seen:?}");
    assert_eq!(plain.get(relay.admin_url("/readyz")).send().await.unwrap().status(), 200);
    relay.shutdown().await;
    assert_eq!(stream_messages(&nats.url()).await, 1);
}

#[tokio::test]
async fn nats_killed_while_publishing_never_yields_a_false_202_and_recovers() {
    let (mut nats, _setup, relay) = start_relay(nats_deadlines(300, 1_500)).await;
    assert_eq!(
        relay.publish(&relay.h1, "edge.faults", "first").send().await.unwrap().status(),
        202
    );

    // Requests in flight while the server dies.
    let mut acked = Vec::new();
    let sends = (0..20).map(|i| {
        let req = relay.publish(&relay.h2, "edge.faults", format!("during-{i}"));
        async move { (i, req.send().await) }
    });
    let kill = async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        nats.stop();
    };
    let (results, ()) = tokio::join!(futures::future::join_all(sends), kill);
    for (i, r) in results {
        let resp = r.unwrap();
        let status = resp.status().as_u16();
        assert!(matches!(status, 202 | 503 | 504), "unexpected {status}");
        if status == 202 {
            acked.push(format!("during-{i}"));
        } else {
            assert!(resp.headers().contains_key("retry-after"));
        }
    }
    // While it is down: refusals only.
    let resp = relay.publish(&relay.h1, "edge.faults", "down").send().await.unwrap();
    assert!(matches!(resp.status().as_u16(), 503 | 504), "{}", resp.status());

    nats.restart();
    let seen = until_accepted(&relay, Duration::from_secs(20)).await;
    assert_eq!(seen.last(), Some(&202), "never recovered: {seen:?}");
    relay.shutdown().await;

    // Every event answered 202 is in the stream (file storage survives the kill).
    let stored = read_stream(&nats.url()).await;
    let payloads: Vec<String> = stored
        .iter()
        .flat_map(|m| &m.batch.events)
        .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
        .collect();
    for p in acked {
        assert!(payloads.contains(&p), "acknowledged {p} missing from the stream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_504_waits_for_the_first_attempt_and_is_never_stored_twice() {
    let (nats, _setup, relay) = start_relay(nats_deadlines(300, 1_000)).await;
    let send = || {
        relay.publish(&relay.h2, "edge.faults", "once").header("Idempotency-Key", "k-504").send()
    };
    // NATS stops answering: the first attempt times out, and so does its retry, which waits
    // for the first one instead of publishing the event again.
    nats.freeze(true);
    let first = send().await.unwrap();
    assert_eq!(error_code(first).await, (504, "ack_timeout".into()));
    let retry = send().await.unwrap();
    let body: serde_json::Value = retry.json().await.unwrap();
    assert_eq!(body["error"]["reason"], "first_attempt_unresolved", "{body}");

    // Back: the first batch is stored (it was kept publishing with its Msg-Id), and the next
    // retry gets its answer.
    nats.freeze(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    let accepted = loop {
        let resp = send().await.unwrap();
        if resp.status() == 202 {
            break resp.json::<Accepted>().await.unwrap();
        }
        assert!(Instant::now() < deadline, "never answered 202 after NATS came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(accepted.duplicate, "the retry is answered from the first attempt");
    relay.shutdown().await;
    let stored: Vec<_> = read_stream(&nats.url())
        .await
        .into_iter()
        .flat_map(|m| m.batch.events)
        .filter(|e| e.payload == "once")
        .collect();
    assert_eq!(stored.len(), 1, "the event was stored {} times", stored.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_held_by_unresolved_batches_refuses_new_events_within_the_deadline() {
    let (nats, _setup, relay) = start_relay(|c| {
        nats_deadlines(200, 800)(c);
        c.nats.max_inflight_batches = 1;
    })
    .await;
    nats.freeze(true);
    // The first batch times out and keeps the only window slot while it is being resolved.
    let first = relay.publish(&relay.h2, "edge.faults", "first").send().await.unwrap();
    assert_eq!(error_code(first).await, (504, "ack_timeout".into()));
    // The next event cannot be sent at all: refused within its deadline, not left hanging.
    let started = Instant::now();
    let second = relay.publish(&relay.h2, "edge.faults", "second").send().await.unwrap();
    let took = started.elapsed();
    assert!(second.headers().contains_key("retry-after"));
    let body: serde_json::Value = second.json().await.unwrap();
    assert_eq!(body["error"]["reason"], "ack_window_full", "{body}");
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    nats.freeze(false);
    relay.shutdown().await;
    let stored: Vec<_> = read_stream(&nats.url())
        .await
        .into_iter()
        .flat_map(|m| m.batch.events)
        .map(|e| String::from_utf8(e.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(stored, ["first"], "the refused event was never sent; the first one resolved");
}
