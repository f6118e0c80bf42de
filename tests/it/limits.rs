//! Connection limits: idle connections and slow headers are closed, and connections beyond
//! `https.max_connections` wait until one closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::support::*;

/// A raw TLS connection speaking HTTP/1.1 (ALPN), so the test controls every byte.
pub async fn tls_connect(setup: &Setup, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
    let cfg = tls_client_config(&setup.certs, b"http/1.1");
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await
}

/// Waits for the server to close the connection; true if it did within `within`.
pub async fn closed_within(conn: &mut TlsStream<TcpStream>, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // e.g. a 408 before the close
            }
        }
    };
    tokio::time::timeout(within, read).await.is_ok()
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let (_nats, setup, relay) = start_relay(|c| c.https.idle_timeout_ms = 300).await;
    let mut idle = tls_connect(&setup, relay.addr()).await.unwrap();
    let req = format!(
        "POST /v1/publish/edge.limits HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 2\r\n\r\nhi"
    );
    idle.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 202"));
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await, "idle connection kept open");
    relay.shutdown().await;
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let (_nats, setup, relay) = start_relay(|c| {
        c.https.header_read_timeout_ms = 300;
        c.https.idle_timeout_ms = 600_000; // so only the header timeout can close it
    })
    .await;
    // Half a request line, then nothing (slowloris).
    let mut slow = tls_connect(&setup, relay.addr()).await.unwrap();
    slow.write_all(b"POST /v1/publish/edge.limits HTTP/1.1\r\nHost: loc").await.unwrap();
    assert!(closed_within(&mut slow, Duration::from_secs(5)).await, "slow headers kept open");
    relay.shutdown().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let (_nats, setup, relay) = start_relay(|c| c.https.max_connections = 1).await;

    let first = tls_connect(&setup, relay.addr()).await.unwrap();
    let second = tls_connect(&setup, relay.addr());
    tokio::pin!(second);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut second).await.is_err(),
        "a second connection was served past max_connections = 1"
    );
    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(5), second).await;
    assert!(matches!(second, Ok(Ok(_))), "the waiting connection was never served");
    relay.shutdown().await;
}

#[tokio::test]
async fn a_request_larger_than_the_burst_is_refused_with_429_not_let_through() {
    let (nats, setup, relay) = start_relay(|c| {
        c.auth.rate_limit.events_per_sec = 10;
        c.auth.rate_limit.burst = 10;
    })
    .await;
    let events: Vec<_> = (0..1_000)
        .map(|i| serde_json::json!({"subject": "edge.rl.big", "data": i.to_string()}))
        .collect();
    let body = serde_json::json!({ "events": events });

    // HTTPS (h2, then h1 a second later: a full bucket does not let it through either).
    for client in [&relay.h2, &relay.h1] {
        let resp = relay.publish_events(client).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 429);
        assert!(!resp.headers().contains_key("retry-after"), "a retry can never help");
        let v: serde_json::Value = resp.json().await.unwrap();
        let first = &v["results"][0]["error"];
        assert_eq!(
            (first["code"].as_str(), first["reason"].as_str()),
            (Some("rate_limited"), Some("request_over_burst"))
        );
        assert!(first["message"].as_str().unwrap().contains("burst is 10"), "{first}");
        tokio::time::sleep(Duration::from_millis(1_000)).await;
    }

    // HTTP/3: the same answer.
    let h3 = h3_client(&setup, &relay, TOKEN).await;
    let json = [("content-type", "application/json")];
    let (status, headers, answer) =
        h3.post("/v1/publish", &json, Bytes::from(body.to_string())).await.unwrap();
    assert_eq!(status, 429);
    assert!(!headers.contains_key("retry-after"), "a retry can never help");
    let v: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(v["results"][0]["error"]["reason"], "request_over_burst", "{v}");
    tokio::time::sleep(Duration::from_millis(1_000)).await;

    // The native protocol: every event refused, with no retry delay.
    let client = setup.quic_client(&relay, TOKEN).await;
    let big: Vec<_> =
        (0..1_000).map(|i| edgerelay_client::event("edge.rl.big", i.to_string())).collect();
    let answer = client.publish(big).await.unwrap();
    assert_eq!(answer.results.len(), 1_000);
    for result in &answer.results {
        match &result.outcome {
            Some(edgerelay::proto::event_result::Outcome::Refused(r)) => {
                assert_eq!(
                    (r.code.as_str(), r.reason.as_str()),
                    ("rate_limited", "request_over_burst")
                );
                assert_eq!(r.retry_after_ms, 0, "{r:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    // Nothing was drawn from the bucket: a request within the burst still passes.
    let resp = relay.publish(&relay.h2, "edge.rl.small", "x").send().await.unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(stream_messages(&nats.url()).await, 1);
    relay.shutdown().await;
}
