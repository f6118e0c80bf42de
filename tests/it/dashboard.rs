//! The shipped Grafana dashboard and alerting rules use only metrics the relay exports.

use std::collections::{BTreeSet, HashMap};

use crate::support::*;

/// Every `edgerelay_*` name in the dashboard's queries (panel targets and template variables).
fn queried_metrics(dashboard: &serde_json::Value) -> BTreeSet<String> {
    let mut queries = Vec::new();
    collect_queries(dashboard, &mut queries);
    metric_names(&queries)
}

/// Every `edgerelay_*` name in `texts`.
fn metric_names(texts: &[String]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for q in texts {
        let mut rest = q.as_str();
        while let Some(at) = rest.find("edgerelay_") {
            let tail = &rest[at..];
            let end =
                tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

fn collect_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => collect_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_queries(v, out)),
        _ => {}
    }
}

/// Sample names a `/metrics` text can contain: every sample line's name, and for each declared
/// family (`# TYPE`), the names its type produces, so a labelled family that has seen no
/// event yet still counts as exported.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut types = HashMap::new();
    for line in text.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut parts = decl.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                types.insert(name.to_owned(), kind.to_owned());
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    for (family, kind) in types {
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{family}{s}")));
    }
    names
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_use_is_exported() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/edgerelay.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let queried = queried_metrics(&dashboard);
    assert!(queried.len() > 10, "the dashboard queries suspiciously few metrics: {queried:?}");
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/alerts.yml");
    let alerting = metric_names(&[std::fs::read_to_string(rules).unwrap()]);
    assert!(alerting.len() > 10, "the alerts use suspiciously few metrics: {alerting:?}");

    // Labelled series appear once something happened: a JWT (JWKS fetch), an accepted event
    // with an edge timestamp, its duplicate, a refusal.
    let idp = TestIdp::start().await;
    let (_nats, _setup, relay) = start_jwt_relay(&idp, |_| {}).await;
    let token = idp.token(serde_json::json!({"tenant": "acme", "scope": "edge:publish"}));
    for (subject, status) in [("edge.acme.x", 202), ("edge.acme.x", 202), ("edge.globex.x", 403)] {
        let resp = relay
            .h2
            .post(relay.url(&format!("/v1/publish/{subject}")))
            .bearer_auth(&token)
            .header("idempotency-key", "dashboard-1")
            .header("edge-timestamp", "1700000000000")
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), status, "{subject}");
    }
    let text =
        relay.h1.get(relay.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    let exported = exported_names(&text);
    for (what, used) in [("dashboard", &queried), ("alerting rules", &alerting)] {
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(missing.is_empty(), "the {what} use metrics /metrics lacks: {missing:?}\n{text}");
    }
}

#[test]
fn panels_have_unique_ids_and_every_target_a_datasource() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/edgerelay.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let ids: BTreeSet<_> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "duplicate panel ids");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {}", p["title"]);
        }
    }
}
