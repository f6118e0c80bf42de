//! `/metrics` and `/debug/latency`: valid exposition text whose histograms and counters move
//! when events flow, and exact percentiles that agree with what a client measures.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use edgerelay::metrics::latency::histogram;
use edgerelay_client::event;
use futures::StreamExt as _;
use serde_json::Value;

use crate::support::*;

/// One sample of the exposition: `name{labels} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses Prometheus / OpenMetrics text strictly: every line is a `# HELP`, `# TYPE`,
/// `# UNIT` or `# EOF` comment or a `name{labels} value` sample; every sample belongs to a
/// family announced by `# HELP` and `# TYPE` (a counter's samples end in `_total`, a
/// histogram's in `_bucket`, `_sum` or `_count`). Panics, naming the line, on anything else.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut help = BTreeSet::new();
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    let mut eof = false;
    for line in text.lines() {
        assert!(!eof, "text after # EOF: {line:?}");
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), Some(_)) => assert!(help.insert(name.to_owned())),
                (Some("TYPE"), Some(name), Some(kind)) => {
                    assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                    assert!(types.insert(name.to_owned(), kind.to_owned()).is_none(), "{line}");
                }
                (Some("UNIT"), Some(_), Some(_)) => {}
                (Some("EOF"), None, None) => eof = true,
                _ => panic!("bad comment line {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').unwrap_or_else(|| panic!("bad labels {line:?}"));
                (name, parse_labels(inner, line))
            }
            None => (series, BTreeMap::new()),
        };
        assert!(
            !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in {line:?}"
        );
        let family = family_of(name, &types).unwrap_or_else(|| panic!("no # TYPE for {line:?}"));
        assert!(help.contains(&family), "no # HELP for {line:?}");
        samples.push(Sample { name: name.to_owned(), labels, value });
    }
    assert!(eof, "no # EOF at the end");
    samples
}

fn parse_labels(inner: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = inner;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad label {line:?}"));
        assert!(key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line:?}");
        // Label values in these metrics carry no escaped quotes.
        let (value, after) = after.split_once('"').unwrap_or_else(|| panic!("{line:?}"));
        assert!(labels.insert(key.to_owned(), value.to_owned()).is_none(), "{line:?}");
        rest = after.strip_prefix(',').unwrap_or(after);
        assert!(after.is_empty() || after.starts_with(','), "{line:?}");
    }
    labels
}

/// The family a sample name belongs to, given the announced types.
fn family_of(name: &str, types: &BTreeMap<String, String>) -> Option<String> {
    let kind = |f: &str| types.get(f).map(String::as_str);
    if kind(name).is_some_and(|k| k != "counter") {
        return Some(name.to_owned());
    }
    if let Some(f) = name.strip_suffix("_total").filter(|f| kind(f) == Some("counter")) {
        return Some(f.to_owned());
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s).filter(|f| kind(f) == Some("histogram")))
        .map(str::to_owned)
}

/// The value of the sample `name` with exactly `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> =
        labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    samples.iter().find(|s| s.name == name && s.labels == want).map(|s| s.value)
}

async fn scrape(relay: &TestRelay) -> Vec<Sample> {
    let resp = relay.h1.get(relay.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    parse_exposition(&resp.text().await.unwrap())
}

async fn latency_json(relay: &TestRelay) -> Value {
    let resp = relay.h1.get(relay.admin_url("/debug/latency")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    resp.json().await.unwrap()
}

#[tokio::test]
async fn latency_histograms_and_batch_counters_are_exported() {
    let (_nats, _setup, relay) = start_relay(|_| {}).await;
    let before = scrape(&relay).await;
    // Every protocol's series exist before the first event.
    for protocol in ["https", "h3", "quic"] {
        for name in [
            "edgerelay_accepted_events_total",
            "edgerelay_duplicates_total",
            "edgerelay_received_bytes_total",
        ] {
            assert_eq!(value(&before, name, &[("protocol", protocol)]), Some(0.0), "{name}");
        }
        assert!(value(&before, "edgerelay_connections", &[("protocol", protocol)]).is_some());
    }
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
        "edgerelay_queue_depth_bytes 0",
        "edgerelay_inflight_batches 0",
    ] {
        assert!(text.contains(sample), "missing {sample:?} in\n{text}");
    }
    // The edge timestamp is years old: every edge→ack observation lands in +Inf only.
    assert!(
        text.contains(r#"edgerelay_edge_to_ack_seconds_bucket{le="5.0",protocol="https"} 0"#),
        "{text}"
    );

    let after = parse_exposition(&text);
    let https = [("protocol", "https")];
    // One byte of body per request; the batches' encoded bytes were all acknowledged.
    assert_eq!(value(&after, "edgerelay_received_bytes_total", &https), Some(5.0));
    let published = value(&after, "edgerelay_published_bytes_total", &[]).unwrap();
    let batch_bytes = value(&after, "edgerelay_batch_bytes_sum", &[]).unwrap();
    assert_eq!(published, batch_bytes);
    assert!(published > 0.0);
    // The h2 client keeps its connection open.
    assert!(value(&after, "edgerelay_connections", &https).unwrap() >= 1.0);
    let cluster = [("cluster", "default")];
    assert_eq!(value(&after, "edgerelay_nats_active_cluster", &cluster), Some(1.0));
    let rtt = value(&after, "edgerelay_nats_rtt_seconds", &cluster).unwrap();
    assert!(rtt > 0.0 && rtt < 5.0, "rtt {rtt}");
    // Histograms moved: every latency family has as many observations as requests/batches.
    for (name, n) in
        [("edgerelay_ingest_to_ack_seconds_count", 5.0), ("edgerelay_flush_seconds_count", 5.0)]
    {
        let before_n = value(&before, name, &[]).or(value(&before, name, &https)).unwrap_or(0.0);
        let after_n = value(&after, name, &[]).or(value(&after, name, &https)).unwrap();
        assert_eq!(after_n - before_n, n, "{name}");
    }
}

#[tokio::test]
async fn duplicates_connections_and_quic_bytes_are_counted() {
    let (_nats, setup, relay) = start_relay(|_| {}).await;
    for _ in 0..3 {
        relay.publish_accepted_with_key("edge.metrics.dup", "once", "metrics-1").await;
    }
    // A refusal, by code and reason.
    let resp = relay.publish(&relay.h2, "edge.secret.x", "no").send().await.unwrap();
    assert_eq!(resp.status(), 403);

    let quic = setup.quic_client(&relay, TOKEN).await;
    let answer = quic.publish(vec![event("edge.metrics.q", "abc")]).await.unwrap();
    assert!(answer.error.is_none(), "{answer:?}");
    let m = scrape(&relay).await;
    let https = [("protocol", "https")];
    let q = [("protocol", "quic")];
    // Accepted, duplicate and refused events are disjoint.
    assert_eq!(value(&m, "edgerelay_accepted_events_total", &https), Some(1.0));
    assert_eq!(value(&m, "edgerelay_duplicates_total", &https), Some(2.0));
    assert_eq!(value(&m, "edgerelay_accepted_events_total", &q), Some(1.0));
    let refusals: f64 = m
        .iter()
        .filter(|s| s.name == "edgerelay_refusals_total")
        .filter(|s| s.labels["protocol"] == "https" && s.labels["code"] == "forbidden")
        .map(|s| s.value)
        .sum();
    assert_eq!(refusals, 1.0);
    // The QUIC frame is the encoded PublishRequest: more than the 3 payload bytes.
    assert!(value(&m, "edgerelay_received_bytes_total", &q).unwrap() > 3.0);
    assert_eq!(value(&m, "edgerelay_connections", &q), Some(1.0));

    // Closing the connection takes it off the gauge.
    quic.close();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(&relay).await;
        if value(&m, "edgerelay_connections", &q) == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "the QUIC connection stayed counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Checks one `/debug/latency` summary's fields and returns its count.
fn check_summary(s: &Value) -> u64 {
    let keys: BTreeSet<&str> = s.as_object().unwrap().keys().map(String::as_str).collect();
    let want: BTreeSet<&str> =
        ["count", "min", "mean", "p50", "p90", "p99", "p999", "max", "distribution"].into();
    assert_eq!(keys, want, "{s}");
    let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k} is not a u64 in {s}"));
    assert!(s["mean"].is_f64(), "{s}");
    assert!(n("min") <= n("p50") && n("p50") <= n("p90") && n("p90") <= n("p99"), "{s}");
    assert!(n("p99") <= n("p999") && n("p999") <= n("max"), "{s}");
    let dist = s["distribution"].as_array().unwrap();
    assert!(!dist.is_empty() && dist.len() <= 17, "{s}");
    let mut bound = 100;
    let mut total = 0;
    for pair in dist {
        let pair = pair.as_array().unwrap();
        assert_eq!(pair.len(), 2);
        assert_eq!(pair[0].as_u64(), Some(bound), "{s}");
        total += pair[1].as_u64().unwrap();
        bound *= 2;
    }
    assert_eq!(total, n("count"), "{s}");
    if dist.len() < 17 {
        // The last bound is the first one at or above the maximum.
        let last = dist[dist.len() - 1][0].as_u64().unwrap();
        assert!(last >= n("max") && (last == 100 || last / 2 < n("max")), "{s}");
    }
    n("count")
}

#[tokio::test]
async fn debug_latency_counts_every_request_and_batch() {
    let (_nats, _setup, relay) = start_relay(|_| {}).await;
    let empty = latency_json(&relay).await;
    for stage in ["ingest_to_ack", "edge_to_ack", "queue_wait", "flush"] {
        for range in ["window", "since_start"] {
            let s = &empty["stages"][stage][range];
            assert_eq!(check_summary(s), 0);
            assert_eq!((s["p50"].as_u64(), s["max"].as_u64()), (Some(0), Some(0)));
        }
    }
    const N: u64 = 12;
    const WITH_EDGE_TIME: u64 = 4;
    for i in 0..N {
        let mut req = relay.publish(&relay.h2, &format!("edge.lat.{}", i % 3), "x");
        if i < WITH_EDGE_TIME {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis();
            req = req.header("edge-timestamp", now_ms.to_string());
        }
        assert_eq!(req.send().await.unwrap().status(), 202);
    }
    let j = latency_json(&relay).await;
    let top: BTreeSet<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(top, ["stages", "unit", "uptime_secs", "window_secs"].into());
    assert_eq!(j["unit"], "us");
    assert_eq!(j["window_secs"], 10);
    assert!(j["uptime_secs"].as_f64().unwrap() > 0.0);
    let stages: BTreeSet<&str> =
        j["stages"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(stages, ["edge_to_ack", "flush", "ingest_to_ack", "queue_wait"].into());
    let count = |stage: &str, range: &str| check_summary(&j["stages"][stage][range]);
    let batches = scrape(&relay)
        .await
        .iter()
        .find(|s| s.name == "edgerelay_batches_total" && s.labels["outcome"] == "stored")
        .map(|s| s.value as u64)
        .unwrap();
    assert!(batches >= 1);
    // The test runs well within the 10 s window, so the window holds everything too.
    for range in ["window", "since_start"] {
        assert_eq!(count("ingest_to_ack", range), N);
        assert_eq!(count("edge_to_ack", range), WITH_EDGE_TIME);
        assert_eq!(count("queue_wait", range), batches);
        assert_eq!(count("flush", range), batches);
    }
    let p50 = j["stages"]["ingest_to_ack"]["since_start"]["p50"].as_u64().unwrap();
    assert!(p50 > 0);

    // The same histograms as percentile-distribution text, in milliseconds.
    for query in ["", "?window", "?range=window", "?range=since_start"] {
        let path = format!("/debug/latency/ingest_to_ack.hgrm{query}");
        let resp = relay.h1.get(relay.admin_url(&path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let hgrm = parse_hgrm(&resp.text().await.unwrap());
        assert_eq!(hgrm.total, N, "{path}");
        // The median row is the JSON's p50, in ms.
        let median = hgrm.rows.iter().find(|r| r.1 >= 0.5).unwrap().0;
        assert!((median - p50 as f64 / 1000.0).abs() < 0.002, "{median} vs {p50} us");
    }
    let resp = relay.h1.get(relay.admin_url("/debug/latency/nope.hgrm")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body = resp.text().await.unwrap();
    for stage in ["ingest_to_ack", "edge_to_ack", "queue_wait", "flush"] {
        assert!(body.contains(stage), "{body}");
    }
    let resp = relay.h1.get(relay.admin_url("/debug/latency/flush.hgrm?x=1")).send().await.unwrap();
    assert_eq!(resp.status(), 400);
}

/// A parsed `.hgrm`: `(value_ms, percentile, total_count)` rows and the footer's total.
struct Hgrm {
    rows: Vec<(f64, f64, u64)>,
    total: u64,
}

fn parse_hgrm(text: &str) -> Hgrm {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]);
    assert_eq!(lines.next(), Some(""));
    let mut rows = Vec::new();
    let mut footer = Vec::new();
    for line in lines {
        if line.starts_with("#[") {
            footer.push(line);
            continue;
        }
        assert!(footer.is_empty(), "a row after the footer: {line:?}");
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert!(cols.len() == 4 || cols.len() == 3, "{line:?}");
        let row = (cols[0].parse().unwrap(), cols[1].parse().unwrap(), cols[2].parse().unwrap());
        rows.push(row);
    }
    assert_eq!(footer.len(), 3, "{text}");
    assert!(footer[0].starts_with("#[Mean    = "), "{text}");
    assert!(footer[2].starts_with("#[Buckets = "), "{text}");
    let total = footer[1]
        .rsplit_once('=')
        .and_then(|(_, n)| n.trim().trim_end_matches(']').parse().ok())
        .unwrap();
    assert!(rows.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1 && w[0].2 <= w[1].2));
    if let Some(last) = rows.last() {
        assert_eq!((last.1, last.2), (1.0, total));
    }
    Hgrm { rows, total }
}

/// The relay's ingest→ack is part of what the client measures (send → answer), so at every
/// percentile the relay's value is at most the client's (within HdrHistogram's 0.1%), and
/// both count the same requests. A client measuring itself stands in for the loadtest
/// binary, which a test of this package cannot run (`CARGO_BIN_EXE_loadtest` is only set for
/// the loadtest package's own tests); it records the same way (µs, 3 digits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_latency_percentiles_are_within_what_the_client_measured() {
    let (_nats, _setup, relay) = start_relay(|_| {}).await;
    const REQUESTS: usize = 200;
    const CONCURRENCY: usize = 8;
    let sends = futures::stream::iter(0..REQUESTS).map(|i| {
        let req = relay.publish(&relay.h2, &format!("edge.cmp.{}", i % 4), "payload");
        async move {
            let sent = Instant::now();
            let resp = req.send().await.unwrap();
            let status = resp.status();
            resp.bytes().await.unwrap();
            assert_eq!(status, 202);
            sent.elapsed()
        }
    });
    let took: Vec<Duration> = sends.buffer_unordered(CONCURRENCY).collect().await;
    let mut client = histogram();
    for t in &took {
        client.saturating_record(t.as_micros() as u64);
    }
    let j = latency_json(&relay).await;
    let relay_side = &j["stages"]["ingest_to_ack"]["since_start"];
    assert_eq!(relay_side["count"].as_u64(), Some(client.len()));
    for (field, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)] {
        let server = relay_side[field].as_u64().unwrap();
        let mine = client.value_at_quantile(q);
        assert!(
            client.lowest_equivalent(server) <= mine,
            "relay {field} {server} us > client {mine} us"
        );
    }
}
