//! Credentials to NATS: user/password holding only the permissions the README documents,
//! an nkey seed, a token, mutual TLS, and a creds file in operator (decentralized JWT) mode —
//! each against a nats-server configured to demand it.

use crate::support::*;

/// Publishes one event and triggers one audited refusal; both must reach JetStream.
async fn publish_and_audit(relay: &TestRelay) {
    let resp = relay.publish(&relay.h2, "edge.auth.ok", "stored").send().await.unwrap();
    assert_eq!(resp.status(), 202, "{:?}", resp.text().await);
    let refused = relay.publish_as(&relay.h2, "wrong", "edge.auth.no", "x").send().await.unwrap();
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
        edgerelay_ops::dev_certs::generate_dev_certs(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
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

/// A NATS JWT (`ed25519-nkey`) with `claims`, issued and signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut claims = serde_json::json!({
        "iat": now, "iss": issuer.public_key(), "name": name, "sub": subject, "nats": nats,
    });
    // jti: a hash of the claims without it, as the NATS JWT library computes it.
    let digest = ring::digest::digest(&ring::digest::SHA256, claims.to_string().as_bytes());
    claims["jti"] = serde_json::json!(base32(digest.as_ref()));
    let payload = b64(claims.to_string().as_bytes());
    let signature = issuer.sign(format!("{header}.{payload}").as_bytes()).unwrap();
    format!("{header}.{payload}.{}", b64(&signature))
}

/// Base32 (RFC 4648, no padding), for the jti.
fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0);
    for b in bytes {
        buffer = (buffer << 8) | u32::from(*b);
        bits += 8;
        while bits >= 5 {
            out.push(ALPHABET[((buffer >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[tokio::test]
async fn a_creds_file_authenticates_in_operator_mode() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let unlimited = serde_json::json!({
        "subs": -1, "conn": -1, "leaf": -1, "imports": -1, "exports": -1, "data": -1,
        "payload": -1, "wildcards": true, "mem_storage": -1, "disk_storage": -1,
        "streams": -1, "consumer": -1,
    });
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "op",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "edge",
        serde_json::json!({"type": "account", "version": 2, "limits": unlimited}),
    );
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        "relay",
        serde_json::json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    );
    let dir = tempfile::tempdir().unwrap();
    let operator_file = dir.path().join("operator.jwt");
    std::fs::write(&operator_file, &operator_jwt).unwrap();
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = nats_jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2}),
    );
    let nats = NatsServer::start_with_config(&format!(
        "operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\n\
         resolver_preload: {{ {}: \"{}\", {}: \"{}\" }}\n",
        operator_file.display(),
        system.public_key(),
        account.public_key(),
        account_jwt,
        system.public_key(),
        system_jwt,
    ));
    let creds = dir.path().join("relay.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    let mut setup = Setup::new(&nats.url());
    setup.config.nats.creds_file = Some(creds);
    let relay = setup.start().await;
    let resp = relay.publish(&relay.h2, "edge.auth.creds", "stored").send().await.unwrap();
    assert_eq!(resp.status(), 202, "{:?}", resp.text().await);
}
