//! Revocation reaches live connections: a reload (the relay's own reload path) that narrows an
//! identity's rules, removes a static token or an mTLS identity, turns mTLS off or changes JWT
//! roles applies to the next request of an HTTP/2 connection, an HTTP/3 connection and a native
//! QUIC stream opened before it — each kept open across the reload, never reconnected.

use std::sync::Arc;

use bytes::Bytes;
use edgerelay::proto::event_result::Outcome;
use edgerelay_client::{Client, ClientConfig, H3Client, PublishStream};
use http_body_util::{BodyExt, Full};

use crate::mtls::{client_tls, collector_setup, quic_config};
use crate::support::*;

/// One HTTP/2 connection to the relay, and never another: every request rides on it.
struct H2Conn {
    send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    port: u16,
}

impl H2Conn {
    async fn open(relay: &TestRelay, tls: rustls::ClientConfig) -> Self {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let tcp = tokio::net::TcpStream::connect(relay.addr()).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        Self { send, port: relay.addr().port() }
    }

    /// Publishes one event on `subject`, with `token` if any: the status and, for a refusal,
    /// its reason.
    async fn publish(&mut self, subject: &str, token: Option<&str>) -> (u16, String) {
        let url = format!("https://localhost:{}/v1/publish/{subject}", self.port);
        let mut req = http::Request::post(url);
        if let Some(token) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(Full::new(Bytes::from_static(b"1"))).unwrap();
        let resp = self.send.send_request(req).await.expect("the connection is still open");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, reason_in(&body))
    }
}

/// The reason of a JSON refusal body; empty for anything else.
fn reason_in(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["error"]["reason"].as_str().unwrap_or("").to_owned()
}

/// One event on `subject` over HTTP/3: the status and, for a refusal, its reason.
async fn h3_publish(h3: &H3Client, subject: &str) -> (u16, String) {
    let path = format!("/v1/publish/{subject}");
    let (status, _, body) = h3.post(&path, &[], Bytes::from_static(b"1")).await.unwrap();
    (status.as_u16(), reason_in(&body))
}

/// One event on `subject` on an open native stream: `accepted`, or the reason of the refusal
/// (of the request as a whole or of the event).
async fn on_stream(stream: &mut PublishStream, subject: &str) -> String {
    stream.send(vec![edgerelay_client::event(subject, "1")]).await.unwrap();
    let answer = stream.recv().await.unwrap();
    if let Some(e) = answer.error {
        return e.reason;
    }
    match answer.results.first().and_then(|r| r.outcome.as_ref()) {
        Some(Outcome::Accepted(_)) => "accepted".into(),
        Some(Outcome::Refused(r)) => r.reason.clone(),
        other => format!("{other:?}"),
    }
}

/// A relay of [`collector_setup`] for `collector-fra1.edge.test` on `nats`, one HTTP/2
/// connection presenting the collector's certificate, and a QUIC client config presenting it.
async fn collector_relay(nats: &NatsServer) -> (Setup, TestRelay, H2Conn, ClientConfig) {
    let (setup, cert, key) = collector_setup(nats, "collector-fra1.edge.test");
    let relay = setup.start().await;
    let h2 = H2Conn::open(&relay, client_tls(&setup.certs, &cert, &key)).await;
    let quic = quic_config(&setup, &relay, &cert, &key);
    (setup, relay, h2, quic)
}

fn ok() -> (u16, String) {
    (202, String::new())
}

fn refused(status: u16, reason: &str) -> (u16, String) {
    (status, reason.into())
}

#[tokio::test]
async fn a_reload_that_narrows_rules_refuses_the_next_request_on_open_h2_h3_and_quic_connections() {
    let nats = NatsServer::start();
    // Opened before the reload: the collector's certificate on HTTP/2, HTTP/3 and a native
    // stream; the static token on HTTP/3 and a native stream (sent on its first request only).
    let (setup, relay, mut h2, with_cert) = collector_relay(&nats).await;
    let h3 = H3Client::connect(with_cert.clone()).await.unwrap();
    let h3_token = h3_client(&setup, &relay, TOKEN).await;
    let cert_quic = Client::connect(with_cert).await.unwrap();
    let mut cert_stream = cert_quic.stream().await.unwrap();
    let token_quic = setup.quic_client(&relay, TOKEN).await;
    let mut token_stream = token_quic.stream().await.unwrap();
    assert_eq!(h2.publish("edge.collector.a", None).await, ok());
    assert_eq!(h3_publish(&h3, "edge.collector.a").await, ok());
    assert_eq!(h3_publish(&h3_token, "edge.a.x").await, ok());
    assert_eq!(on_stream(&mut cert_stream, "edge.collector.a").await, "accepted");
    assert_eq!(on_stream(&mut token_stream, "edge.a.x").await, "accepted");

    // The collector narrowed to `edge.collector.b`, the token to `edge.b.>`.
    let mut cfg = setup.config.clone();
    cfg.auth.mtls.as_mut().unwrap().identities[0].allow = vec!["edge.collector.b".into()];
    cfg.auth.static_tokens[0].allow = vec!["edge.b.>".into()];
    relay.reload(cfg).await.unwrap();

    assert_eq!(h2.publish("edge.collector.a", None).await, refused(403, "no_rule_allows"));
    assert_eq!(h2.publish("edge.collector.b", None).await, ok());
    assert_eq!(h3_publish(&h3, "edge.collector.a").await, refused(403, "no_rule_allows"));
    assert_eq!(h3_publish(&h3, "edge.collector.b").await, ok());
    assert_eq!(h3_publish(&h3_token, "edge.a.x").await, refused(403, "no_rule_allows"));
    assert_eq!(h3_publish(&h3_token, "edge.b.x").await, ok());
    assert_eq!(on_stream(&mut cert_stream, "edge.collector.a").await, "no_rule_allows");
    assert_eq!(on_stream(&mut cert_stream, "edge.collector.b").await, "accepted");
    assert_eq!(on_stream(&mut token_stream, "edge.a.x").await, "no_rule_allows");
    assert_eq!(on_stream(&mut token_stream, "edge.b.x").await, "accepted");
    relay.shutdown().await;
}

#[tokio::test]
async fn a_reload_that_removes_a_static_token_refuses_the_next_request_on_an_open_quic_stream() {
    let nats = NatsServer::start();
    let setup = Setup::new(&nats.url());
    let relay = setup.start().await;
    let mut h2 = H2Conn::open(&relay, tls_client_config(&setup.certs, b"h2")).await;
    let quic = setup.quic_client(&relay, TOKEN).await;
    let mut stream = quic.stream().await.unwrap();
    assert_eq!(on_stream(&mut stream, "edge.x").await, "accepted");
    assert_eq!(h2.publish("edge.x", Some(TOKEN)).await, ok());

    let mut cfg = setup.config.clone();
    cfg.auth.static_tokens.retain(|t| t.token != TOKEN);
    relay.reload(cfg).await.unwrap();

    // The stream's token is checked again: refused, and forgotten (the next request needs one).
    assert_eq!(on_stream(&mut stream, "edge.x").await, "unknown_token");
    assert_eq!(on_stream(&mut stream, "edge.x").await, "missing_token");
    assert_eq!(h2.publish("edge.x", Some(TOKEN)).await, refused(401, "unknown_token"));
    assert_eq!(h2.publish("edge.other.x", Some(OTHER_TOKEN)).await, ok());
    relay.shutdown().await;
}

#[tokio::test]
async fn a_reload_that_removes_an_mtls_identity_or_turns_mtls_off_refuses_the_next_request() {
    let nats = NatsServer::start();
    let (setup, relay, mut h2, with_cert) = collector_relay(&nats).await;
    let quic = Client::connect(with_cert).await.unwrap();
    let mut stream = quic.stream().await.unwrap();
    assert_eq!(h2.publish("edge.collector.a", None).await, ok());
    assert_eq!(on_stream(&mut stream, "edge.collector.a").await, "accepted");

    // The identity removed (another collector's remains): no identity, no token, 401.
    let mut removed = setup.config.clone();
    let identity = &mut removed.auth.mtls.as_mut().unwrap().identities[0];
    identity.name = "collector-ams1".into();
    identity.dns_name = "collector-ams1.edge.test".into();
    relay.reload(removed).await.unwrap();
    assert_eq!(h2.publish("edge.collector.a", None).await, refused(401, "missing_token"));
    assert_eq!(on_stream(&mut stream, "edge.collector.a").await, "unknown_certificate");
    assert_eq!(on_stream(&mut stream, "edge.collector.a").await, "missing_token");

    // Back: the same connections are that identity again (a new stream for QUIC).
    relay.reload(setup.config.clone()).await.unwrap();
    assert_eq!(h2.publish("edge.collector.a", None).await, ok());
    let mut stream = quic.stream().await.unwrap();
    assert_eq!(on_stream(&mut stream, "edge.collector.a").await, "accepted");

    // mTLS off: the certificate proves nothing any more, a token is needed.
    let mut off = setup.config.clone();
    off.auth.mtls = None;
    relay.reload(off).await.unwrap();
    assert_eq!(h2.publish("edge.collector.a", None).await, refused(401, "missing_token"));
    assert_eq!(h2.publish("edge.collector.a", Some(TOKEN)).await, ok());
    assert_eq!(on_stream(&mut stream, "edge.collector.a").await, "unknown_certificate");
    relay.shutdown().await;
}

#[tokio::test]
async fn a_reload_that_changes_roles_reaches_a_jwt_on_an_open_quic_stream_before_its_exp() {
    let idp = TestIdp::start().await;
    let (_nats, setup, relay) = start_jwt_relay(&idp, |_| {}).await;
    let claims = serde_json::json!({"aud": "edgerelay", "scope": "edge:publish", "tenant": "acme"});
    let quic = setup.quic_client(&relay, &idp.token(claims)).await;
    let mut stream = quic.stream().await.unwrap();
    assert_eq!(on_stream(&mut stream, "edge.acme.a").await, "accepted");

    let mut cfg = setup.config.clone();
    cfg.auth.roles[0].deny.push("edge.{claims.tenant}.a".into());
    relay.reload(cfg).await.unwrap();
    assert_eq!(on_stream(&mut stream, "edge.acme.a").await, "no_rule_allows");
    assert_eq!(on_stream(&mut stream, "edge.acme.b").await, "accepted");
    relay.shutdown().await;
}
