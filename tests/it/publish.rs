//! Publishing over HTTP/1.1 and HTTP/2, single and multi-event, and reading it back.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use edgerelay::ingest::config::AckMode;
use edgerelay::proto;
use prost::Message;

use crate::support::*;

#[tokio::test]
async fn single_events_round_trip_over_http1_and_http2() {
    let (nats, _setup, relay) = start_relay(|_| {}).await;
    for (client, version, key) in [
        (&relay.h1, reqwest::Version::HTTP_11, "key-h1"),
        (&relay.h2, reqwest::Version::HTTP_2, "key-h2"),
    ] {
        let resp = relay
            .publish(client, "edge.t1.click", "hello")
            .header("Idempotency-Key", key)
            .header("Edge-Timestamp", "1700000000123")
            .header("Content-Type", "text/plain")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.version(), version);
        assert_eq!(resp.status(), 202);
        assert!(resp.content_length().unwrap_or(0) < 2048);
        let ok: Accepted = resp.json().await.unwrap();
        assert_eq!(ok.stream, STREAM);
        assert!(!ok.duplicate);
        assert!(ok.batch.starts_with("test-relay."), "{}", ok.batch);

        let stored = read_stream(&nats.url()).await;
        let msg = stored.iter().find(|m| m.seq == ok.seq).expect("message at the acked seq");
        assert_eq!(msg.msg_id, ok.batch);
        assert_eq!(msg.subject, "edge.t1.click");
        assert_eq!(msg.content_type, "application/x-protobuf; messageType=edgerelay.v1.Batch");
        assert_eq!(msg.events_header, msg.batch.events.len().to_string());
        assert_eq!(msg.batch.relay_id, "test-relay");
        let ev = &msg.batch.events[ok.index as usize];
        assert_eq!(ev.subject, "edge.t1.click");
        assert_eq!(&ev.payload[..], b"hello");
        assert_eq!(ev.id, key);
        assert_eq!(ev.edge_time_unix_ms, 1_700_000_000_123);
        assert!(ev.ingest_time_unix_us > 1_700_000_000_000_000);
        assert_eq!(ev.publisher, "static:edge-test");
        assert_eq!(ev.headers.get("content-type").map(String::as_str), Some("text/plain"));
    }
    assert!(relay.shutdown().await.complete);
}

/// NATS 200 ms away (a WAN round trip, longer than the 150 ms linger): three events 20 ms
/// apart. Without early flushes (`early_flushes_per_sec = 0`, the rule before it existed) only
/// the first goes at once; the others wait for the linger and share a batch. With them, each
/// goes at once, in its own batch.
#[tokio::test]
async fn with_nats_far_away_events_go_at_once_by_early_flushes() {
    let nats = NatsServer::start();
    let far = delay_proxy(([127, 0, 0, 1], nats.port).into(), Duration::from_millis(100)).await;
    for (early, batches) in [(0, 2), (1_000, 3)] {
        let mut setup = Setup::new(&format!("nats://{far}"));
        // Shorter than the round trip, long enough to hold the later two events together.
        setup.config.batch.linger_ms = 150;
        setup.config.batch.max_events = 1_000;
        setup.config.batch.early_flushes_per_sec = early;
        let relay = setup.start().await;
        // Early flushes wait for the first probe to say NATS is far.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !far_probed(&relay).await {
            assert!(std::time::Instant::now() < deadline, "no round trip probed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let sends = (0..3u64).map(|i| {
            let req = relay.publish(&relay.h2, "edge.far", format!("event-{i}"));
            async move {
                tokio::time::sleep(Duration::from_millis(20 * i)).await;
                let resp = req.send().await.unwrap();
                assert_eq!(resp.status(), 202);
                resp.json::<Accepted>().await.unwrap().batch
            }
        });
        let ids: HashSet<String> = futures::future::join_all(sends).await.into_iter().collect();
        assert_eq!(ids.len(), batches, "early_flushes_per_sec = {early}: {ids:?}");
        relay.shutdown().await;
    }
}

/// The relay's probe measured a round trip to NATS of at least 100 ms.
async fn far_probed(relay: &TestRelay) -> bool {
    let text =
        relay.h1.get(relay.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("edgerelay_nats_rtt_seconds{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .any(|rtt| rtt >= 0.1)
}

#[tokio::test]
async fn concurrent_events_share_batches_and_each_answer_points_at_its_event() {
    let (nats, _setup, relay) = start_relay(|c| {
        c.batch.linger_ms = 50;
        c.batch.max_events = 1000;
        // Deterministic: batches form by linger, not by how fast the first ack returns.
        c.batch.flush_when_idle = false;
    })
    .await;
    const N: usize = 60;
    let sends = (0..N).map(|i| {
        let req = relay.publish(&relay.h2, "edge.batching", format!("event-{i}"));
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 202);
            (i, resp.json::<Accepted>().await.unwrap())
        }
    });
    let answers = futures::future::join_all(sends).await;
    let stored = read_stream(&nats.url()).await;
    assert!(stored.len() < N, "{N} events became {} messages: no batching", stored.len());
    let by_seq: HashMap<u64, &StoredMsg> = stored.iter().map(|m| (m.seq, m)).collect();
    for (i, a) in &answers {
        let msg = by_seq[&a.seq];
        assert_eq!(msg.msg_id, a.batch);
        assert_eq!(msg.batch.events[a.index as usize].payload, format!("event-{i}").into_bytes());
    }
    let total: usize = stored.iter().map(|m| m.batch.events.len()).sum();
    assert_eq!(total, N);
    relay.shutdown().await;
}

#[tokio::test]
async fn multi_event_json_and_protobuf_get_one_result_per_event() {
    let (nats, _setup, relay) = start_relay(|_| {}).await;

    let body = serde_json::json!({"events": [
        {"subject": "edge.multi.a", "data": "one", "id": "m-1"},
        {"subject": "edge.multi.b", "data_base64": "AAEC", "headers": {"k": "v"}},
    ]});
    let resp = relay.publish_events(&relay.h2).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    let v: serde_json::Value = resp.json().await.unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| r["stream"] == STREAM && r["seq"].as_u64().unwrap() > 0));

    // A forbidden event among allowed ones: per-event results, and no 2xx for the request.
    let body = serde_json::json!({"events": [
        {"subject": "edge.multi.a", "data": "fine"},
        {"subject": "edge.secret.x", "data": "nope"},
    ]});
    let resp = relay.publish_events(&relay.h1).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["results"][0]["stream"], STREAM);
    assert_eq!(v["results"][1]["error"]["code"], "forbidden");

    let req = proto::PublishRequest {
        events: vec![
            proto::Event {
                subject: "edge.proto.a".into(),
                payload: b"p1".to_vec().into(),
                id: "pk-1".into(),
                ..Default::default()
            },
            proto::Event {
                subject: "edge..bad".into(),
                payload: b"p2".to_vec().into(),
                ..Default::default()
            },
        ],
        token: String::new(),
    };
    let resp = relay.post_events("application/x-protobuf", req.encode_to_vec()).await;
    assert_eq!(resp.status(), 400);
    let out = proto::PublishResponse::decode(resp.bytes().await.unwrap()).unwrap();
    use proto::event_result::Outcome;
    match &out.results[0].outcome {
        Some(Outcome::Accepted(a)) => assert_eq!(a.stream, STREAM),
        other => panic!("{other:?}"),
    }
    match &out.results[1].outcome {
        Some(Outcome::Refused(r)) => assert_eq!(r.code, "bad_subject"),
        other => panic!("{other:?}"),
    }
    let stored = read_stream(&nats.url()).await;
    let events: Vec<&proto::Event> = stored.iter().flat_map(|m| &m.batch.events).collect();
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(events.iter().all(|e| !e.subject.contains("secret") && !e.subject.contains("..")));
    let b = events.iter().find(|e| e.subject == "edge.multi.b").unwrap();
    assert_eq!((&b.payload[..], b.headers["k"].as_str()), (&[0u8, 1, 2][..], "v"));
    relay.shutdown().await;
}

#[tokio::test]
async fn accepted_mode_answers_on_enqueue_and_still_stores() {
    let (nats, _setup, relay) = start_relay(|c| c.relay.ack_mode = AckMode::Accepted).await;
    let resp = relay.publish(&relay.h2, "edge.fast", "quick").send().await.unwrap();
    assert_eq!(resp.status(), 202);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v, serde_json::json!({"queued": true}));
    assert!(relay.shutdown().await.complete);
    assert_eq!(stream_messages(&nats.url()).await, 1);
}

#[tokio::test]
async fn health_readiness_and_tail() {
    let (nats, _setup, relay) = start_relay(|_| {}).await;
    let plain = reqwest::Client::new();
    assert_eq!(plain.get(relay.admin_url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(plain.get(relay.admin_url("/readyz")).send().await.unwrap().status(), 200);
    for i in 0..3 {
        let body: &'static str = ["a", "b", "c"][i];
        assert_eq!(relay.publish(&relay.h1, "edge.tail", body).send().await.unwrap().status(), 202);
    }
    let mut out = Vec::new();
    let opts = edgerelay_ops::tail::TailOptions {
        nats_url: nats.url(),
        subject: "edge.>".into(),
        stream: Some(STREAM.into()),
        from_seq: 1,
        count: Some(3),
        idle_timeout: Some(std::time::Duration::from_secs(5)),
    };
    assert_eq!(edgerelay_ops::tail::run(opts, &mut out).await.unwrap(), 3);
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let payloads: Vec<&str> = lines.iter().map(|l| l["payload"].as_str().unwrap()).collect();
    assert_eq!(payloads, ["a", "b", "c"]);
    assert!(lines
        .iter()
        .all(|l| l["publisher"] == "static:edge-test" && l["stream_seq"].as_u64().unwrap() > 0));
    relay.shutdown().await;
}

#[tokio::test]
async fn a_conflicting_stream_stops_the_relay_from_starting() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["elsewhere.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let setup = Setup::new(&nats.url());
    let err = edgerelay::Relay::start(setup.config.clone()).await.err().expect("refused");
    let text = err.to_string();
    assert!(text.contains("conflicts") && text.contains("elsewhere.>"), "{text}");
}
