//! Credentials to NATS: user/password holding only the permissions the README documents,
//! an nkey seed, a token, and mutual TLS — each against a nats-server configured to demand it.

use crate::support::*;

/// Publishes one event and triggers one audited refusal; both must reach JetStream.
async fn publish_and_audit(relay: &TestRelay) {
    let resp = relay.publish(&relay.h2, "edge.auth.ok", "stored").send().await.unwrap();
    assert_eq!(resp.status(), 202, "{:?}", resp.text().await);
    let refused = relay
        .h2
        .post(relay.url("/v1/publish/edge.auth.no"))
        .bearer_auth("wrong")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
}

#[tokio::test]
async fn a_user_with_only_the_documented_permissions_can_publish_and_audit() {
    let nats = NatsServer::start_with_config(
        r#"
        authorization {
          users = [
            { user: relay, password: "relay-password-0001",
              permissions: {
                publish: { allow: ["edge.>", "edgerelay.audit.>",
                  "$JS.API.STREAM.INFO.EDGE", "$JS.API.STREAM.CREATE.EDGE",
                  "$JS.API.STREAM.INFO.EDGERELAY_AUDIT", "$JS.API.STREAM.CREATE.EDGERELAY_AUDIT"] }
                subscribe: { allow: ["_INBOX.>"] }
              } }
            { user: admin, password: "admin-password-0001" }
          ]
        }
        # The test reads the streams back without credentials, as admin.
        no_auth_user: admin
        "#,
    );
    let admin = nats.url();
    let mut setup = Setup::new(&nats.url());
    setup.config.nats.user = Some("relay".into());
    setup.config.nats.password = Some("relay-password-0001".into());
    let relay = setup.start().await;
    publish_and_audit(&relay).await;
    assert_eq!(stream_messages(&admin).await, 1);
    let audit = audit_records(&admin, 1).await;
    assert!(audit.iter().any(|r| r["reason"] == "unknown_token"), "{audit:?}");
}

#[tokio::test]
async fn an_nkey_seed_file_authenticates() {
    let user = nkeys::KeyPair::new_user();
    let nats = NatsServer::start_with_config(&format!(
        r#"authorization {{ users = [ {{ nkey: "{}" }} ] }}"#,
        user.public_key()
    ));
    let mut setup = Setup::new(&nats.url());
    let seed = setup.dir.path().join("relay.nk");
    std::fs::write(&seed, user.seed().unwrap()).unwrap();
    setup.config.nats.nkey_seed_file = Some(seed);
    let relay = setup.start().await;
    let resp = relay.publish(&relay.h2, "edge.auth.nkey", "stored").send().await.unwrap();
    assert_eq!(resp.status(), 202);
}

#[tokio::test]
async fn a_token_authenticates() {
    let nats = NatsServer::start_with_config(r#"authorization { token: "nats-token-0000001" }"#);
    let mut setup = Setup::new(&nats.url());
    setup.config.nats.token = Some("nats-token-0000001".into());
    let relay = setup.start().await;
    let resp = relay.publish(&relay.h2, "edge.auth.token", "stored").send().await.unwrap();
    assert_eq!(resp.status(), 202);
}

#[tokio::test]
async fn mutual_tls_to_nats() {
    // The dev certificate has no extended key usage, so it serves as server and client cert.
    let dir = tempfile::tempdir().unwrap();
    let certs =
        edgerelay::tls::generate_dev_certs(&["localhost".into(), "127.0.0.1".into()]).unwrap();
    certs.write(dir.path()).unwrap();
    let path = |f: &str| dir.path().join(f).display().to_string();
    let nats = NatsServer::start_with_config(&format!(
        r#"tls {{ cert_file: "{}", key_file: "{}", ca_file: "{}", verify: true, timeout: 5 }}"#,
        path("cert.pem"),
        path("key.pem"),
        path("ca.pem")
    ));
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let mut setup = Setup::new(&url);
    setup.config.nats.tls_ca = Some(dir.path().join("ca.pem"));
    setup.config.nats.tls_cert = Some(dir.path().join("cert.pem"));
    setup.config.nats.tls_key = Some(dir.path().join("key.pem"));
    let relay = setup.start().await;
    let resp = relay.publish(&relay.h2, "edge.auth.mtls", "stored").send().await.unwrap();
    assert_eq!(resp.status(), 202, "{:?}", resp.text().await);

    // Without a client certificate the server refuses the relay: it stays unready and answers 503.
    let mut no_cert = Setup::new(&url);
    no_cert.config.nats.tls_ca = Some(dir.path().join("ca.pem"));
    no_cert.config.nats.connect_timeout_ms = 500;
    let unready = no_cert.start().await;
    let resp = unready.publish(&unready.h2, "edge.auth.mtls", "x").send().await.unwrap();
    assert_eq!(resp.status(), 503);
}
