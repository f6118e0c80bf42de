//! The audit trail: per-identity publish counts in the audit stream, a full audit queue that
//! drops (and counts) records instead of slowing the data path, and what refusals may cost:
//! unauthenticated ones counted per source into one record per interval, input quoted in a few
//! dozen bytes, a stream bounded in bytes.

use std::time::{Duration, Instant};

use bytes::Bytes;
use edgerelay::config::Config;

use crate::support::*;

/// [`start_relay`] with unauthenticated refusals counted in windows of 2 s (long enough for
/// every request of a test to fall into one), its config changed by `change` after.
async fn counting_relay(change: impl FnOnce(&mut Config)) -> (NatsServer, Setup, TestRelay) {
    start_relay(|c| {
        c.audit.refusals_interval_ms = 2_000;
        change(c);
    })
    .await
}

#[tokio::test]
async fn publish_counts_per_identity_reach_the_audit_stream() {
    let (nats, _setup, relay) = start_relay(|c| c.audit.counts_interval_secs = 1).await;
    for _ in 0..3 {
        let resp = relay.publish(&relay.h2, "edge.audit.a", "x").send().await.unwrap();
        assert_eq!(resp.status(), 202);
    }
    let other = relay.publish_as(&relay.h2, OTHER_TOKEN, "edge.other.b", "y").send().await.unwrap();
    assert_eq!(other.status(), 202);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let records = audit_records(&nats.url(), 1).await;
    let counts: Vec<_> = records.iter().filter(|r| r["kind"] == "counts").collect();
    let total =
        |who: &str| counts.iter().map(|r| r["events"][who].as_u64().unwrap_or(0)).sum::<u64>();
    assert_eq!((total("static:edge-test"), total("static:other")), (3, 1), "{records:?}");
    assert_eq!(metric(&relay, r#"edgerelay_accepted_events_total{protocol="https"}"#).await, 4);
}

#[tokio::test]
async fn a_full_audit_queue_drops_and_counts_records_and_requests_are_still_answered() {
    let (_nats, _setup, relay) = start_relay(|c| c.audit.queue_capacity = 1).await;
    // Authenticated refusals: one record each.
    let answers = futures::future::join_all(
        (0..200).map(|_| relay.publish(&relay.h2, "edge.secret.x", "x").send()),
    )
    .await;
    assert!(answers.iter().all(|a| a.as_ref().is_ok_and(|r| r.status() == 403)));
    let sample =
        r#"edgerelay_refusals_total{protocol="https",code="forbidden",reason="no_rule_allows"}"#;
    assert_eq!(metric(&relay, sample).await, 200);
    let queued = metric(&relay, "edgerelay_audit_records_total").await;
    let dropped = metric(&relay, "edgerelay_audit_dropped_total").await;
    assert_eq!(queued + dropped, 200);
    assert!(dropped > 0, "a queue of 1 cannot hold a burst of 200");
}

#[tokio::test]
async fn unauthenticated_refusals_from_one_source_become_one_record_with_their_count() {
    let (nats, setup, relay) = counting_relay(|c| c.audit.log_lines_per_interval = 1).await;
    let no_token =
        (0..100).map(|_| relay.h2.post(relay.url("/v1/publish/edge.x")).body("x").send());
    let answers = futures::future::join_all(no_token).await;
    assert!(answers.iter().all(|a| a.as_ref().is_ok_and(|r| r.status() == 401)));
    let h3 = h3_client(&setup, &relay, "not-a-valid-token").await;
    for _ in 0..10 {
        let (status, _, _) =
            h3.post("/v1/publish/edge.x", &[], Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(status, 401);
    }
    let quic = setup.quic_client(&relay, "not-a-valid-token").await;
    for _ in 0..10 {
        let answer = quic.publish(vec![edgerelay_client::event("edge.x", "x")]).await.unwrap();
        assert_eq!(answer.error.map(|e| e.code).as_deref(), Some("unauthorized"));
    }

    let counted = counted_refusals(&nats.url(), 120).await;
    let mut rows: Vec<_> = counted
        .iter()
        .map(|r| {
            let field = |f: &str| r[f].as_str().unwrap_or_default().to_owned();
            (field("protocol"), field("reason"), field("source"), r["count"].as_u64())
        })
        .collect();
    rows.sort();
    let row = |protocol: &str, reason: &str, n| {
        (protocol.to_owned(), reason.to_owned(), "127.0.0.1/32".to_owned(), Some(n))
    };
    assert_eq!(
        rows,
        [
            row("h3", "unknown_token", 10),
            row("https", "missing_token", 100),
            row("quic", "unknown_token", 10)
        ],
        "one record per protocol, reason and source: {counted:?}"
    );
    let window = &counted[0];
    assert!(window["since_unix_ms"].as_u64() <= window["at_unix_ms"].as_u64(), "{window}");
    let records = audit_records(&nats.url(), 0).await;
    assert!(records.iter().all(|r| r["kind"] != "refused"), "no record per refusal: {records:?}");
    assert_eq!(metric(&relay, "edgerelay_audit_refusals_aggregated_total").await, 120);
    assert_eq!(metric(&relay, "edgerelay_audit_refusals_folded_total").await, 0);
    // One log line per key, at most one per interval: the other two were suppressed.
    assert_eq!(metric(&relay, "edgerelay_audit_log_suppressed_total").await, 2);
}

#[tokio::test]
async fn sources_beyond_the_key_limit_are_counted_as_other() {
    let (nats, setup, relay) = counting_relay(|c| c.audit.refusals_max_keys = 1).await;
    // Two keys of one window: the QUIC refusal takes the only slot, the HTTPS one is folded.
    let quic = setup.quic_client(&relay, "not-a-valid-token").await;
    quic.publish(vec![edgerelay_client::event("edge.x", "x")]).await.unwrap();
    let no_token = relay.h2.post(relay.url("/v1/publish/edge.x")).body("x").send().await.unwrap();
    assert_eq!(no_token.status(), 401);
    let counted = counted_refusals(&nats.url(), 2).await;
    let https: Vec<_> = counted.iter().filter(|r| r["protocol"] == "https").collect();
    assert_eq!(https.len(), 1, "{counted:?}");
    assert_eq!((&https[0]["source"], &https[0]["count"]), (&"other".into(), &1.into()));
    assert_eq!(metric(&relay, "edgerelay_audit_refusals_folded_total").await, 1);
}

#[tokio::test]
async fn a_mebibyte_of_bad_json_is_answered_and_audited_in_a_few_dozen_bytes() {
    let (nats, setup, relay) = start_relay(|c| c.https.max_body_bytes = 2 << 20).await;
    let huge = "z".repeat(1 << 20);
    let body =
        format!(r#"{{"events":[{{"subject":"edge.a","data":"x","edge_time_unix_ms":"{huge}"}}]}}"#);
    let resp = relay.post_events("application/json", body.clone()).await;
    assert_eq!(resp.status(), 400);
    let answer = resp.text().await.unwrap();
    assert!(answer.len() < 400, "{} bytes answered: {answer}", answer.len());
    assert!(answer.contains("bytes)"), "the answer says what was cut: {answer}");
    let h3 = h3_client(&setup, &relay, TOKEN).await;
    let headers = [("content-type", "application/json")];
    let (status, _, h3_answer) = h3.post("/v1/publish", &headers, Bytes::from(body)).await.unwrap();
    assert_eq!((status.as_u16(), h3_answer.len() < 400), (400, true), "{h3_answer:?}");
    // A subject too long to publish on is quoted cut short, too.
    let long = format!("edge.{}", "s".repeat(4_000));
    let resp = relay.publish(&relay.h2, &long, "x").send().await.unwrap();
    assert_eq!(resp.status(), 400);

    let records = audit_records(&nats.url(), 3).await;
    let refused: Vec<_> = records.iter().filter(|r| r["kind"] == "refused").collect();
    assert_eq!(refused.len(), 3, "{records:?}");
    for r in &refused {
        assert_eq!(r["identity"], "static:edge-test");
        let text = r.to_string();
        assert!(text.len() < 600, "{} bytes in one audit record: {text}", text.len());
    }
    assert!(refused
        .iter()
        .any(|r| r["subject"].as_str().is_some_and(|s| s.starts_with("edge.sss"))));
}

#[tokio::test]
async fn the_audit_stream_is_created_with_max_bytes_and_an_existing_one_is_kept() {
    let (nats, _setup, relay) = start_relay(|c| c.audit.max_bytes = 5 << 20).await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    // The audit task creates the stream in the background, after the relay is up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let created = loop {
        match js.get_stream("EDGERELAY_AUDIT").await {
            Ok(stream) => break stream.cached_info().config.clone(),
            Err(e) if Instant::now() > deadline => panic!("no audit stream after 10 s: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(created.max_bytes, 5 << 20);
    assert_eq!(created.max_age, Duration::from_secs(7 * 86_400));
    drop(relay);

    // A stream the operator made (or changed) keeps its limits.
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "EDGERELAY_AUDIT".into(),
        subjects: vec!["edgerelay.audit.>".into()],
        max_bytes: 1 << 20,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut setup = Setup::new(&nats.url());
    setup.config.audit.max_bytes = 5 << 20;
    let relay = setup.start().await;
    let resp = relay.publish(&relay.h2, "edge.secret.x", "x").send().await.unwrap();
    assert_eq!(resp.status(), 403);
    assert!(!audit_records(&nats.url(), 1).await.is_empty(), "records still reach it");
    let kept = js.get_stream("EDGERELAY_AUDIT").await.unwrap().cached_info().config.clone();
    assert_eq!(kept.max_bytes, 1 << 20);
}
