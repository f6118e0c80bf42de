//! `/metrics`: the latency histograms and batch counters move when events flow.

use crate::support::*;

#[tokio::test]
async fn latency_histograms_and_batch_counters_are_exported() {
    let nats = NatsServer::start();
    let setup = Setup::new(&nats.url());
    let relay = setup.start().await;
    for i in 0..5 {
        let resp = relay
            .publish(&relay.h2, &format!("edge.metrics.{i}"), "x")
            .header("edge-timestamp", "1700000000000")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
    }
    let text =
        relay.h1.get(relay.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    for sample in [
        r#"edgerelay_ingest_to_ack_seconds_count{protocol="https"} 5"#,
        r#"edgerelay_edge_to_ack_seconds_count{protocol="https"} 5"#,
        r#"edgerelay_ingest_to_ack_seconds_bucket{le="0.1",protocol="https"} 5"#,
        r#"edgerelay_batches_total{outcome="stored"} 5"#,
        "edgerelay_flush_seconds_count 5",
        "edgerelay_queue_wait_seconds_count 5",
        "edgerelay_batch_events_count 5",
        r#"edgerelay_accepted_events_total{protocol="https"} 5"#,
        "edgerelay_queue_depth_events 0",
        "edgerelay_inflight_batches 0",
    ] {
        assert!(text.contains(sample), "missing {sample:?} in\n{text}");
    }
    // The edge timestamp is years old: every edge→ack observation lands in +Inf only.
    assert!(
        text.contains(r#"edgerelay_edge_to_ack_seconds_bucket{le="5.0",protocol="https"} 0"#),
        "{text}"
    );
}
