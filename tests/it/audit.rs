//! The audit trail: per-identity publish counts in the audit stream, and a full audit queue
//! that drops (and counts) records instead of slowing the data path.

use std::time::Duration;

use crate::support::*;

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
    assert_eq!((total("edge-test"), total("other")), (3, 1), "{records:?}");
    assert_eq!(metric(&relay, r#"edgerelay_accepted_events_total{protocol="https"}"#).await, 4);
}

#[tokio::test]
async fn a_full_audit_queue_drops_and_counts_records_and_requests_are_still_answered() {
    let (_nats, _setup, relay) = start_relay(|c| c.audit.queue_capacity = 1).await;
    let answers = futures::future::join_all(
        (0..200).map(|_| relay.publish_as(&relay.h2, "not-a-valid-token", "edge.x", "x").send()),
    )
    .await;
    assert!(answers.iter().all(|a| a.as_ref().is_ok_and(|r| r.status() == 401)));
    let sample =
        r#"edgerelay_refusals_total{protocol="https",code="unauthorized",reason="unknown_token"}"#;
    assert_eq!(metric(&relay, sample).await, 200);
    let queued = metric(&relay, "edgerelay_audit_records_total").await;
    let dropped = metric(&relay, "edgerelay_audit_dropped_total").await;
    assert_eq!(queued + dropped, 200);
    assert!(dropped > 0, "a queue of 1 cannot hold a burst of 200");
}
