//! Live reload of the real binary on SIGHUP: a new certificate and batch size under load with
//! no failed request and no dropped connection, refused reloads that leave everything as it
//! was, and static tokens added and removed.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgerelay::config::Config;
use edgerelay_ops::dev_certs::DevCerts;
use edgerelay_testkit::{local, RelayConfigBuilder};

use crate::support::*;

/// Batches fill up to `max_events` = 8 (no idle flush; the linger is longer than a round trip).
fn batches_of_8(config: RelayConfigBuilder) -> RelayConfigBuilder {
    config.id("reload").with(|c| {
        c.batch.max_events = 8;
        c.batch.linger_ms = 100;
        c.batch.flush_when_idle = false;
    })
}

/// Fresh certificates (a new CA and server certificate) written into `dir`.
fn new_certs(dir: &Path) -> DevCerts {
    let certs =
        edgerelay_ops::dev_certs::generate_dev_certs(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
    certs.write(dir).unwrap();
    certs
}

/// The leaf certificate a new TLS connection to `port` is served, if it chains to `certs`' CA.
async fn served_leaf(port: u16, certs: &DevCerts) -> Option<Vec<u8>> {
    let tls = tls_client_config(certs, b"h2");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
    let tls = connector.connect(name, tcp).await.ok()?;
    Some(tls.get_ref().1.peer_certificates()?.first()?.as_ref().to_vec())
}

fn leaf_der(certs: &DevCerts) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(certs.server_cert.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec()
}

/// Waits (up to 10 s) until `log` holds `needle` `count` times.
async fn until_logged(log: &Path, needle: &str, count: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(needle).count() >= count {
            return text;
        }
        assert!(Instant::now() < deadline, "never logged {needle:?} x{count}:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The relay binary on `nats` with [`batches_of_8`], ready, logging to the returned file.
async fn start_logged(nats: &NatsServer) -> (Setup, BinaryRelay, PathBuf, Child) {
    let setup = Setup::new(&nats.url());
    let relay = BinaryRelay::new(&setup, setup.binary_config(batches_of_8));
    let log = setup.dir.path().join("relay.log");
    let child = relay.spawn(Stdio::from(std::fs::File::create(&log).unwrap()));
    relay.wait_ready().await;
    (setup, relay, log, child)
}

/// `config` with the certificate and key in `dir`.
fn with_certs_in(config: &Config, dir: &Path) -> Config {
    let mut config = config.clone();
    config.https.tls_cert = dir.join("cert.pem");
    config.https.tls_key = dir.join("key.pem");
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_swaps_certificate_and_batch_size_without_a_failed_request() {
    let nats = NatsServer::start();
    let (setup, relay, log, mut child) = start_logged(&nats).await;
    let new_dir = setup.dir.path().join("new-certs");
    let fresh = new_certs(&new_dir);
    assert_eq!(served_leaf(relay.port, &setup.certs).await, Some(leaf_der(&setup.certs)));

    // 8 clients (HTTP/2 and HTTP/1.1) publishing back to back. They trust only the old CA: a
    // connection closed by the reload would have to reconnect, meet the new certificate and
    // fail — so zero failures also means no connection was dropped.
    let reloaded = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..8)
        .map(|c| {
            let client = client(&setup.certs, c % 2 == 0);
            let (before, after) =
                (relay.url("/v1/publish/edge.rl.before"), relay.url("/v1/publish/edge.rl.after"));
            let (reloaded, stop) = (reloaded.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut sent, mut failed) = (0u32, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let url = if reloaded.load(Ordering::Relaxed) { &after } else { &before };
                    sent += 1;
                    match client
                        .post(url)
                        .bearer_auth(TOKEN)
                        .body(format!("c{c}-{sent}"))
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 202 => {}
                        Ok(r) => failed.push(r.status().to_string()),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (sent, failed)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut cfg = with_certs_in(&relay.config, &new_dir);
    cfg.batch.max_events = 3;
    relay.write_config(&cfg);
    BinaryRelay::hup(&child);
    let text = until_logged(&log, "config reloaded", 1).await;
    assert!(
        text.contains("certificate, batch.max_events, https.tls_cert, https.tls_key"),
        "{text}"
    );
    reloaded.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);

    let (mut sent, mut failed) = (0, Vec::new());
    for task in load {
        let (s, f) = task.await.unwrap();
        sent += s;
        failed.extend(f);
    }
    assert!(failed.is_empty(), "{} of {sent} requests failed: {failed:?}", failed.len());

    // New handshakes get the new certificate; the old CA no longer verifies it.
    assert_eq!(served_leaf(relay.port, &fresh).await, Some(leaf_der(&fresh)));
    assert_eq!(served_leaf(relay.port, &setup.certs).await, None);

    let batches = read_stream(&nats.url()).await;
    let sizes = |subject: &str| -> Vec<usize> {
        batches.iter().filter(|m| m.subject == subject).map(|m| m.batch.events.len()).collect()
    };
    let (before, after) = (sizes("edge.rl.before"), sizes("edge.rl.after"));
    eprintln!(
        "reload under load: {sent} requests, {} failed; batch sizes before (max_events 8): max {:?} over {} batches, after (max_events 3): max {:?} over {} batches",
        failed.len(),
        before.iter().max(),
        before.len(),
        after.iter().max(),
        after.len()
    );
    assert!(before.iter().max() > Some(&3), "before: {before:?}");
    assert!(!after.is_empty() && after.iter().all(|&n| n <= 3), "after: {after:?}");
    assert_eq!(after.iter().max(), Some(&3), "after: {after:?}");
    for m in batches.iter().filter(|m| m.subject == "edge.rl.after") {
        assert_eq!(m.events_header, m.batch.events.len().to_string());
    }

    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_keeps_the_old_config_and_a_valid_one_swaps_tokens() {
    let nats = NatsServer::start();
    let (setup, relay, log, mut child) = start_logged(&nats).await;
    let original = &relay.config;
    let old_leaf = leaf_der(&setup.certs);
    let new_dir = setup.dir.path().join("new-certs");
    let fresh = new_certs(&new_dir);
    let url = relay.url("/v1/publish/edge.rl.tokens");
    // The status of one publish with `token` by a client trusting `certs`' CA.
    let status = |certs: &DevCerts, token: &'static str| {
        let (h2, url) = (client(certs, true), url.clone());
        async move { h2.post(url).bearer_auth(token).body("x").send().await.unwrap().status().as_u16() }
    };
    const NEW_TOKEN: &str = "test-token-reloaded-01";
    let swapped = || {
        let mut cfg = with_certs_in(original, &new_dir);
        cfg.auth.static_tokens[0].token = NEW_TOKEN.into();
        cfg
    };

    // Not a valid config at all: Config::load refuses it.
    let mut cfg = swapped();
    cfg.batch.max_events = 0;
    relay.write_config(&cfg);
    BinaryRelay::hup(&child);
    until_logged(&log, "batch.max_events must be > 0", 1).await;

    // Valid, but it moves the listener: the whole reload is refused, the new certificate and
    // tokens included.
    let mut cfg = swapped();
    cfg.https.listen = local(free_port());
    relay.write_config(&cfg);
    BinaryRelay::hup(&child);
    let text = until_logged(&log, "reload refused", 2).await;
    assert!(text.contains("restart to apply: https.listen"), "{text}");
    assert!(child.try_wait().unwrap().is_none(), "the relay must keep running");
    assert_eq!(served_leaf(relay.port, &setup.certs).await, Some(old_leaf));
    assert_eq!(status(&setup.certs, TOKEN).await, 202);
    assert_eq!(status(&setup.certs, NEW_TOKEN).await, 401);

    // A valid reload: the added token works, the removed one is refused.
    relay.write_config(&swapped());
    BinaryRelay::hup(&child);
    until_logged(&log, "config reloaded", 1).await;
    assert_eq!(status(&fresh, NEW_TOKEN).await, 202);
    assert_eq!(status(&fresh, TOKEN).await, 401);

    let _ = child.kill();
    let _ = child.wait();
}

/// A publish over HTTPS with `token`: the status and, for a refusal, its reason.
async fn answer_to(relay: &TestRelay, token: &str, subject: &str) -> (u16, String) {
    error_reason(relay.publish_as(&relay.h2, token, subject, "x").send().await.unwrap()).await
}

/// A token of tenant `acme` from `idp` for `aud`.
fn tenant_token(idp: &TestIdp, aud: &str) -> String {
    idp.token(serde_json::json!({"aud": aud, "scope": "edge:publish", "tenant": "acme"}))
}

#[tokio::test]
async fn jwt_settings_and_the_identity_provider_reload_without_a_restart() {
    let (idp_a, idp_b) = (TestIdp::start().await, TestIdp::start().await);
    let (_nats, setup, relay) = start_jwt_relay(&idp_a, |_| {}).await;
    let a_token = tenant_token(&idp_a, "edgerelay");
    assert_eq!(answer_to(&relay, &a_token, "edge.acme.x").await.0, 202);

    // A new audience only: the key store (and its keys) stays, nothing is fetched again.
    let fetches = idp_a.idp.jwks_fetches();
    let mut cfg = setup.config.clone();
    cfg.auth.jwt.as_mut().unwrap().audiences = vec!["edgerelay-v2".into()];
    let r = relay.reload(cfg.clone()).await.unwrap();
    assert_eq!(r.fields, ["auth.jwt.audiences"]);
    assert_eq!(idp_a.idp.jwks_fetches(), fetches);
    assert_eq!(answer_to(&relay, &a_token, "edge.acme.x").await, (401, "wrong_audience".into()));
    let a_v2 = tenant_token(&idp_a, "edgerelay-v2");
    assert_eq!(answer_to(&relay, &a_v2, "edge.acme.x").await.0, 202);

    // Another identity provider: its keys are loaded before the swap, A's tokens stop working.
    cfg.auth.jwt.as_mut().unwrap().issuer = idp_b.issuer().into();
    relay.reload(cfg.clone()).await.unwrap();
    let b_token = tenant_token(&idp_b, "edgerelay-v2");
    assert_eq!(answer_to(&relay, &b_token, "edge.acme.x").await.0, 202);
    assert_eq!(answer_to(&relay, &a_v2, "edge.acme.x").await.0, 401);
    let ready = relay.h1.get(relay.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    // An identity provider that does not answer: refused whole, B's tokens go on working.
    let mut dead = cfg.clone();
    dead.auth.jwt.as_mut().unwrap().issuer = format!("http://127.0.0.1:{}", free_port());
    dead.auth.static_tokens.clear();
    let err = relay.reload(dead).await.unwrap_err();
    assert!(
        matches!(err, edgerelay::reload::ReloadError::Keys(_)),
        "{err}: a reload must not leave the relay unable to check tokens"
    );
    assert_eq!(answer_to(&relay, &b_token, "edge.acme.x").await.0, 202);
    assert_eq!(answer_to(&relay, TOKEN, "edge.acme.x").await.0, 202);

    // JWTs off: tokens of B are unknown, the static token still publishes.
    let mut off = cfg.clone();
    off.auth.jwt = None;
    off.auth.roles.clear();
    relay.reload(off).await.unwrap();
    assert_eq!(answer_to(&relay, &b_token, "edge.acme.x").await, (401, "unknown_token".into()));
    assert_eq!(answer_to(&relay, TOKEN, "edge.acme.x").await.0, 202);
    let ready = relay.h1.get(relay.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    relay.shutdown().await;
}
