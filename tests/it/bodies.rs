//! Request bodies under attack, over HTTP/1.1, HTTP/2 (curl and hyper) and HTTP/3: refused
//! before they are buffered, cut when they stall or trickle, and connections that live too
//! long asked to go.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgerelay::config::Config;
use futures::stream::BoxStream;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::limits::{closed_within, tls_connect};
use crate::support::*;

/// `curl` (the system's, 7.88 on the reference box) posting `body_bytes` to `path` over
/// `--http1.1` or `--http2` with `token` (none if empty): its exit code and the status.
async fn curl(
    setup: &Setup,
    relay: &TestRelay,
    version: &str,
    path: &str,
    token: &str,
    body_bytes: usize,
) -> (i32, u16) {
    let dir = setup.dir.path();
    let ca = dir.join("curl-ca.pem");
    let body = dir.join(format!("curl-body-{body_bytes}"));
    std::fs::write(&ca, &setup.certs.ca_cert).unwrap();
    std::fs::write(&body, vec![b'x'; body_bytes]).unwrap();
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", version, "--cacert"]).arg(&ca);
    cmd.args(["-o", "/dev/null", "-w", "%{http_code}", "-H", "Content-Type: application/json"]);
    if !token.is_empty() {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    cmd.arg("--data-binary").arg(format!("@{}", body.display())).arg(relay.url(path));
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("curl finished")
        .expect("curl runs");
    let status = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
    let code = out.status.code().unwrap_or(-1);
    if code != 0 {
        eprintln!("curl {version}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (code, status)
}

/// An HTTP/2 connection of hyper's client to the relay, driven on its own task.
async fn h2_connection(
    setup: &Setup,
    relay: &TestRelay,
) -> (hyper::client::conn::http2::SendRequest<Piecewise>, tokio::task::JoinHandle<()>) {
    let tls = tls_client_config(&setup.certs, b"h2");
    let tcp = tokio::net::TcpStream::connect(relay.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, driver)
}

/// A raw HTTP/3 connection to the relay (the h3 crate's client), for requests whose body the
/// test sends piece by piece.
async fn h3_connection(
    setup: &Setup,
    relay: &TestRelay,
) -> (h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>, quinn::Endpoint) {
    let tls = tls_client_config(&setup.certs, b"h3");
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint.connect(relay.quic_addr(), "localhost").unwrap().await.unwrap();
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await.unwrap();
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    (send, endpoint)
}

/// A request body the test sends piece by piece, through the sender.
type Piecewise = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

fn piecewise() -> (tokio::sync::mpsc::Sender<Bytes>, Piecewise) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
    });
    (tx, StreamBody::new(Box::pin(frames)))
}

fn post(path: &str, declared: usize) -> http::request::Builder {
    http::Request::post(format!("https://localhost{path}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-length", declared.to_string())
}

/// A config change for [`start_relay`]: how long a body may go without bytes, in
/// milliseconds, and the slowest rate it may arrive at.
fn body_deadlines(timeout_ms: u64, min_bytes_per_sec: u64) -> impl FnOnce(&mut Config) {
    move |c| {
        c.https.body_timeout_ms = timeout_ms;
        c.https.body_min_bytes_per_sec = min_bytes_per_sec;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_bodies_are_answered_401_without_being_buffered() {
    let (_nats, setup, relay) = start_relay(|_| {}).await;
    let mib = 1 << 20;
    for version in ["--http1.1", "--http2"] {
        let (code, status) = curl(&setup, &relay, version, "/v1/publish/edge.x", "", mib).await;
        assert_eq!((code, status), (0, 401), "{version}");
    }
    let stranger = h3_client(&setup, &relay, "").await;
    let (status, _, _) =
        stranger.post("/v1/publish/edge.x", &[], Bytes::from(vec![b'x'; mib])).await.unwrap();
    assert_eq!(status, 401);

    for protocol in ["https", "h3"] {
        let received = format!(r#"edgerelay_received_bytes_total{{protocol="{protocol}"}}"#);
        assert_eq!(metric(&relay, &received).await, 0, "{protocol}: a refused body was kept");
    }
    // The HTTP/3 client sends its whole body before reading the answer: the relay drained it
    // (read and dropped). curl stops sending once answered (HTTP/1.1: closes the connection;
    // HTTP/2: ends or resets the stream), so what it drained there depends on timing.
    let drained = r#"edgerelay_discarded_bytes_total{protocol="h3"}"#;
    let mut got = 0;
    for _ in 0..50 {
        got = metric(&relay, drained).await;
        if got >= mib as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got, mib as u64, "the refused HTTP/3 body was drained");
    relay.shutdown().await;
}

/// One HTTP/1.1 answer read off `conn`: its head and body, as text.
async fn h1_answer<S: tokio::io::AsyncRead + Unpin>(conn: &mut S) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned)
                })
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "connection closed after {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_http1_body_is_drained_and_the_connection_serves_the_next_request() {
    let (_nats, setup, relay) = start_relay(|_| {}).await;
    let conn = tls_connect(&setup, relay.addr()).await.unwrap();
    let body = "x".repeat(100_000);
    let refused = format!(
        "POST /v1/publish/edge.x HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let next = format!(
        "POST /v1/publish/edge.keep HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 2\r\n\r\nhi"
    );
    // The whole refused request is sent before its answer is read, as a client would.
    let (mut read, mut write) = tokio::io::split(conn);
    let writer = tokio::spawn(async move {
        write.write_all(refused.as_bytes()).await.unwrap();
        write
    });
    let answer = h1_answer(&mut read).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let mut write = writer.await.unwrap();
    write.write_all(next.as_bytes()).await.unwrap();
    let answer = h1_answer(&mut read).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    drop(read.unsplit(write));
    let received = metric(&relay, r#"edgerelay_received_bytes_total{protocol="https"}"#).await;
    assert_eq!(received, 2, "only the accepted body was kept");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_large_body_reaches_curl_as_413_over_http2_and_http1() {
    let (_nats, setup, relay) = start_relay(|_| {}).await;
    for version in ["--http2", "--http1.1"] {
        let (code, status) = curl(&setup, &relay, version, "/v1/publish", TOKEN, 2_000_000).await;
        assert_eq!((code, status), (0, 413), "{version}");
    }
    // The connection pool's connections still work after it.
    let resp = relay.publish(&relay.h2, "edge.after", "x").send().await.unwrap();
    assert_eq!(resp.status(), 202);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_cut_at_the_body_timeout_on_every_http_version() {
    let (_nats, setup, relay) = start_relay(body_deadlines(500, 0)).await;
    let within = Duration::from_secs(5);

    // HTTP/1.1: part of the body, then nothing: 408, then the connection is closed.
    let mut h1 = tls_connect(&setup, relay.addr()).await.unwrap();
    let head = format!(
        "POST /v1/publish/edge.stall HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\n0123456789"
    );
    h1.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(within, h1.read(&mut buf)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(closed_within(&mut h1, within).await, "the stalled HTTP/1.1 connection stayed open");

    // HTTP/2: the same on one stream; the connection then gets GOAWAY and closes.
    let (mut h2, driver) = h2_connection(&setup, &relay).await;
    let (body_tx, body) = piecewise();
    body_tx.send(Bytes::from_static(b"0123456789")).await.unwrap();
    let req = post("/v1/publish/edge.stall", 1000).body(body).unwrap();
    let resp = tokio::time::timeout(within, h2.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 408);
    tokio::time::timeout(within, driver).await.expect("the stalled h2 connection closed").unwrap();
    drop(body_tx);

    // HTTP/3.
    let (mut h3, _endpoint) = h3_connection(&setup, &relay).await;
    let mut stream =
        h3.send_request(post("/v1/publish/edge.stall", 1000).body(()).unwrap()).await.unwrap();
    stream.send_data(Bytes::from_static(b"0123456789")).await.unwrap();
    let resp = tokio::time::timeout(within, stream.recv_response()).await.unwrap().unwrap();
    assert_eq!(resp.status(), 408);

    // Each was counted as cut (h1 and h2 both as `https`), and none was kept.
    for (protocol, cut) in [("https", 2), ("h3", 1)] {
        let sample = format!(
            r#"edgerelay_refusals_total{{protocol="{protocol}",code="request_timeout",reason="body_timeout"}}"#
        );
        assert_eq!(metric(&relay, &sample).await, cut, "{sample}");
        let received = format!(r#"edgerelay_received_bytes_total{{protocol="{protocol}"}}"#);
        assert_eq!(metric(&relay, &received).await, 0, "{received}");
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickling_below_the_minimum_rate_is_cut() {
    let (_nats, setup, relay) = start_relay(body_deadlines(600, 1000)).await;
    // 10 bytes every 100 ms: never 600 ms without bytes, but 100 bytes a second. HTTP/2 first.
    let (mut h2, _driver) = h2_connection(&setup, &relay).await;
    let (body_tx, body) = piecewise();
    let trickle = tokio::spawn(async move {
        for _ in 0..300 {
            if body_tx.send(Bytes::from_static(b"0123456789")).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let req = post("/v1/publish/edge.trickle", 3000).body(body).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), h2.send_request(req))
        .await
        .expect("the trickle was cut")
        .unwrap();
    assert_eq!(resp.status(), 408);
    let answer = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(v["error"]["reason"], "body_too_slow", "{v}");
    trickle.abort();

    // The same over HTTP/3.
    let (mut h3, _endpoint) = h3_connection(&setup, &relay).await;
    let stream =
        h3.send_request(post("/v1/publish/edge.trickle", 3000).body(()).unwrap()).await.unwrap();
    let (mut send, mut recv) = stream.split();
    let trickle = tokio::spawn(async move {
        for _ in 0..300 {
            if send.send_data(Bytes::from_static(b"0123456789")).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let resp = tokio::time::timeout(Duration::from_secs(10), recv.recv_response())
        .await
        .expect("the HTTP/3 trickle was cut")
        .unwrap();
    assert_eq!(resp.status(), 408);
    trickle.abort();
    let sample =
        r#"edgerelay_refusals_total{protocol="h3",code="request_timeout",reason="body_too_slow"}"#;
    assert_eq!(metric(&relay, sample).await, 1);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_their_max_age_get_goaway_and_new_connections_work() {
    let (_nats, setup, relay) = start_relay(|c| {
        c.https.max_connection_age_ms = 1_500;
        c.https.max_connection_age_grace_ms = 1_000;
        c.quic.max_connection_age_ms = 1_500;
        c.quic.max_connection_age_grace_ms = 1_000;
    })
    .await;
    let within = Duration::from_secs(5);

    // HTTP/2: the connection serves a request, then ends (GOAWAY) of its own accord.
    let (mut h2, driver) = h2_connection(&setup, &relay).await;
    let (body_tx, body) = piecewise();
    let req = post("/v1/publish/edge.age", 1).body(body).unwrap();
    let sending = tokio::spawn(async move { body_tx.send(Bytes::from_static(b"x")).await });
    let resp = tokio::time::timeout(within, h2.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 202);
    sending.await.unwrap().unwrap();
    tokio::time::timeout(within, driver).await.expect("an old h2 connection closed").unwrap();
    let resp = relay.publish(&relay.h2, "edge.age", "again").send().await.unwrap();
    assert_eq!(resp.status(), 202, "a new connection works");

    // HTTP/3: the old connection is gone; a new one works.
    let old = h3_client(&setup, &relay, TOKEN).await;
    let (status, _, _) =
        old.post("/v1/publish/edge.age", &[], Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(status, 202);
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert!(old.post("/v1/publish/edge.age", &[], Bytes::from_static(b"x")).await.is_err());
    let new = h3_client(&setup, &relay, TOKEN).await;
    let (status, _, _) =
        new.post("/v1/publish/edge.age", &[], Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(status, 202);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_beyond_the_memory_budget_are_refused_503_and_the_bytes_come_back() {
    let mib = 1 << 20;
    // One source may hold one largest request (a 1 MiB JSON body, its copies, its events).
    let share = 2 * mib + 1000 * edgerelay::ingest::DECODED_EVENT_BYTES;
    let (_nats, setup, relay) = start_relay(|c| {
        c.https.max_body_bytes = mib;
        c.quic.max_frame_bytes = mib;
        c.peers.memory_per_source_bytes = share;
        c.peers.memory_per_connection_bytes = share;
    })
    .await;
    let within = Duration::from_secs(5);
    let held = || metric(&relay, "edgerelay_peers_memory_bytes");
    let until_held = |want: u64| async move {
        let deadline = tokio::time::Instant::now() + within;
        while held().await != want {
            assert!(tokio::time::Instant::now() < deadline, "never held {want} bytes");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // Two authenticated bodies declared at 1 MiB hold their declared size while they come.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let (mut conn, driver) = h2_connection(&setup, &relay).await;
        let (body_tx, body) = piecewise();
        body_tx.send(Bytes::from_static(b"[")).await.unwrap();
        let req = post("/v1/publish", mib).header("content-type", "application/json");
        let req = req.body(body).unwrap();
        let pending = tokio::spawn(async move { conn.send_request(req).await });
        stalled.push((body_tx, pending, driver));
    }
    until_held(2 * mib as u64).await;
    // A third body from the same source finds no room: refused before anything is read.
    let (mut third, third_driver) = h2_connection(&setup, &relay).await;
    let (third_tx, body) = piecewise();
    let req = post("/v1/publish", 300_000).header("content-type", "application/json");
    let req = req.body(body).unwrap();
    let resp = tokio::time::timeout(within, third.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let sample = r#"edgerelay_refusals_total{protocol="https",code="queue_full",reason="source_memory_budget"}"#;
    assert_eq!(metric(&relay, sample).await, 1);
    // The clients go away mid-body: every reservation is given back.
    drop(third_tx);
    third_driver.abort();
    for (body_tx, pending, driver) in stalled {
        drop(body_tx);
        pending.abort();
        driver.abort();
    }
    until_held(0).await;
    let resp = relay.publish(&relay.h2, "edge.budget", "fits again").send().await.unwrap();
    assert_eq!(resp.status(), 202);
    relay.shutdown().await;
}
