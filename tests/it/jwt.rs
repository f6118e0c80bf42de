//! OIDC / JWT bearer tokens and RBAC: a real identity provider (the dev IdP, over HTTP on
//! loopback), the real relay, and hostile tokens over HTTPS, HTTP/3 and the native protocol.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use edgerelay::auth::config::JwtConfig;
use edgerelay::error::ErrorCode;
use edgerelay_ops::dev_idp::{encode_part, SigningKey};
use serde_json::{json, Value};

use crate::support::*;

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Claims of a good token of tenant `acme`.
fn good_claims(idp: &TestIdp) -> Value {
    let now = now();
    json!({
        "iss": idp.issuer(), "aud": "edgerelay", "sub": "edge-fn-acme", "iat": now,
        "exp": now + 300, "scope": "openid edge:publish", "tenant": "acme",
    })
}

/// `good_claims` with `changes` applied (`null` removes a claim).
fn claims_with(idp: &TestIdp, changes: Value) -> Value {
    let mut c = good_claims(idp);
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

/// A token signed by the IdP's current ES256 key.
fn signed(idp: &TestIdp, claims: &Value) -> String {
    let key = idp.idp.key("ES256").unwrap();
    key.sign(&json!({"alg": "ES256", "typ": "JWT", "kid": key.kid}), claims).unwrap()
}

/// A nats-server and a relay accepting `idp`'s tokens, its JWT settings changed by `change`.
async fn jwt_relay(
    idp: &TestIdp,
    change: impl FnOnce(&mut JwtConfig),
) -> (NatsServer, Setup, TestRelay) {
    start_setup(|setup| change(setup.with_jwt(idp))).await
}

/// One hostile token and the refusal it must get.
struct Case {
    name: &'static str,
    token: String,
    code: ErrorCode,
    reason: &'static str,
}

fn hostile_cases(idp: &TestIdp) -> Vec<Case> {
    let now = now();
    let good = good_claims(idp);
    let es = idp.idp.key("ES256").unwrap();
    let rs = idp.idp.key("RS256").unwrap();
    let stranger = SigningKey::generate("stranger", "ES256").unwrap();
    let by_stranger = |kid: &str| {
        stranger.sign(&json!({"alg": "ES256", "typ": "JWT", "kid": kid}), &good).unwrap()
    };
    let hs256_with_public_key = {
        use aws_lc_rs::hmac;
        let input = format!(
            "{}.{}",
            encode_part(&json!({"alg": "HS256", "typ": "JWT", "kid": rs.kid})),
            encode_part(&good)
        );
        let tag =
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &rs.public_bytes()), input.as_bytes());
        use base64::Engine;
        format!("{input}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag))
    };
    let unauthorized =
        |name, token, reason| Case { name, token, code: ErrorCode::Unauthorized, reason };
    vec![
        unauthorized(
            "alg none",
            format!(
                "{}.{}.",
                encode_part(&json!({"alg": "none", "typ": "JWT"})),
                encode_part(&good)
            ),
            "algorithm_not_allowed",
        ),
        unauthorized(
            "HS256 signed with the RSA public key",
            hs256_with_public_key,
            "algorithm_not_allowed",
        ),
        unauthorized("unknown kid", by_stranger("stranger"), "unknown_key"),
        unauthorized("kid with a path", by_stranger("../../../etc/passwd"), "unknown_key"),
        unauthorized(
            "kid with SQL",
            by_stranger("' OR '1'='1'; DROP TABLE keys; --"),
            "unknown_key",
        ),
        unauthorized("known kid, wrong key", by_stranger(&es.kid), "bad_signature"),
        unauthorized(
            "no kid with several keys",
            es.sign(&json!({"alg": "ES256", "typ": "JWT"}), &good).unwrap(),
            "missing_kid",
        ),
        unauthorized(
            "expired",
            signed(idp, &claims_with(idp, json!({"iat": now - 600, "exp": now - 300}))),
            "token_expired",
        ),
        unauthorized(
            "not yet valid (nbf)",
            signed(idp, &claims_with(idp, json!({"nbf": now + 600}))),
            "token_not_yet_valid",
        ),
        unauthorized(
            "issued in the future (iat)",
            signed(idp, &claims_with(idp, json!({"iat": now + 600, "exp": now + 700}))),
            "token_not_yet_valid",
        ),
        unauthorized(
            "wrong iss",
            signed(idp, &claims_with(idp, json!({"iss": "https://evil.example"}))),
            "wrong_issuer",
        ),
        unauthorized(
            "wrong aud",
            signed(idp, &claims_with(idp, json!({"aud": "other"}))),
            "wrong_audience",
        ),
        unauthorized(
            "missing exp",
            signed(idp, &claims_with(idp, json!({"exp": null}))),
            "missing_claim",
        ),
        unauthorized(
            "exp as a string",
            signed(idp, &claims_with(idp, json!({"exp": (now + 300).to_string()}))),
            "bad_claim_type",
        ),
        unauthorized(
            "iat as a string",
            signed(idp, &claims_with(idp, json!({"iat": now.to_string()}))),
            "bad_claim_type",
        ),
        unauthorized(
            "lifetime longer than allowed",
            signed(idp, &claims_with(idp, json!({"iat": now, "exp": now + 3_600}))),
            "lifetime_too_long",
        ),
        unauthorized(
            "no iat and exp too far",
            signed(idp, &claims_with(idp, json!({"iat": null, "exp": now + 3_600}))),
            "lifetime_too_long",
        ),
        unauthorized(
            "missing sub",
            signed(idp, &claims_with(idp, json!({"sub": null}))),
            "missing_claim",
        ),
        unauthorized(
            "sub as a number",
            signed(idp, &claims_with(idp, json!({"sub": 42}))),
            "bad_claim_type",
        ),
        unauthorized("not a JWT", "not-a-jwt".into(), "malformed_token"),
        unauthorized("garbage header", "e30K.e30.e30".into(), "malformed_token"),
        unauthorized("oversized", "a".repeat(9_000), "malformed_token"),
    ]
}

/// The code and reason a refusal over HTTPS (HTTP/2) carries; checks the status matches.
async fn over_https(relay: &TestRelay, token: &str, subject: &str) -> (String, String) {
    let resp = relay.publish_as(&relay.h2, token, subject, "hostile").send().await.unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    let code = v["error"]["code"].as_str().unwrap_or("accepted").to_owned();
    if let Some(c) = ErrorCode::parse(&code) {
        assert_eq!(status, c.status(), "{v}");
    }
    (code, v["error"]["reason"].as_str().unwrap_or("").to_owned())
}

/// A good token of `idp`'s ([`good_claims`]), once `relay` has accepted it on `edge.acme.a`.
async fn accepted_token(idp: &TestIdp, relay: &TestRelay) -> String {
    let token = idp.token(good_claims(idp));
    assert_eq!(over_https(relay, &token, "edge.acme.a").await.0, "accepted");
    token
}

async fn over_h3(setup: &Setup, relay: &TestRelay, token: &str, subject: &str) -> (String, String) {
    let client = h3_client(setup, relay, token).await;
    let (status, _, body) = client
        .post(&format!("/v1/publish/{subject}"), &[], Bytes::from_static(b"hostile"))
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    let code = v["error"]["code"].as_str().unwrap_or("accepted").to_owned();
    if let Some(c) = ErrorCode::parse(&code) {
        assert_eq!(status.as_u16(), c.status(), "{v}");
    }
    (code, v["error"]["reason"].as_str().unwrap_or("").to_owned())
}

async fn over_quic(
    setup: &Setup,
    relay: &TestRelay,
    token: &str,
    subject: &str,
) -> (String, String) {
    let client = setup.quic_client(relay, token).await;
    let answer = client.publish(vec![edgerelay_client::event(subject, "hostile")]).await.unwrap();
    let refused = answer.error.or_else(|| {
        answer.results.into_iter().find_map(|r| match r.outcome {
            Some(edgerelay::proto::event_result::Outcome::Refused(r)) => Some(r),
            _ => None,
        })
    });
    match refused {
        Some(r) => (r.code, r.reason),
        None => ("accepted".into(), String::new()),
    }
}

#[tokio::test]
async fn hostile_tokens_are_refused_over_https_h3_and_quic() {
    let idp = TestIdp::start().await;
    let (nats, setup, relay) = jwt_relay(&idp, |_| {}).await;

    for case in hostile_cases(&idp) {
        let want = (case.code.as_str().to_owned(), case.reason.to_owned());
        let subject = "edge.acme.click";
        assert_eq!(over_https(&relay, &case.token, subject).await, want, "HTTPS: {}", case.name);
        assert_eq!(
            over_h3(&setup, &relay, &case.token, subject).await,
            want,
            "HTTP/3: {}",
            case.name
        );
        assert_eq!(
            over_quic(&setup, &relay, &case.token, subject).await,
            want,
            "QUIC: {}",
            case.name
        );
    }
    let missing =
        relay.h2.post(relay.url("/v1/publish/edge.acme.click")).body("x").send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    assert_eq!(stream_messages(&nats.url()).await, 0, "nothing refused may be published");

    // Every reason is counted, per protocol...
    let mut expected = std::collections::BTreeMap::new();
    for case in hostile_cases(&idp) {
        *expected.entry((case.code.as_str(), case.reason)).or_insert(0u64) += 1;
    }
    for protocol in ["https", "h3", "quic"] {
        for ((code, reason), n) in &expected {
            let sample = format!(
                r#"edgerelay_refusals_total{{protocol="{protocol}",code="{code}",reason="{reason}"}}"#
            );
            assert_eq!(metric(&relay, &sample).await, *n, "{sample}");
        }
    }
    // ...and audited without a record each (no identity: anyone can send these): counted per
    // protocol, reason and source, one `refusals` record per count and interval.
    let cases = hostile_cases(&idp).len() as u64;
    let counted = counted_refusals(&nats.url(), 3 * cases + 1).await;
    let total = |protocol: &str| {
        let of = counted.iter().filter(|r| r["protocol"] == protocol);
        of.filter_map(|r| r["count"].as_u64()).sum::<u64>()
    };
    let totals = (total("https"), total("h3"), total("quic"));
    assert_eq!(totals, (cases + 1, cases, cases), "{counted:?}");
    assert!(counted.iter().any(|r| r["protocol"] == "h3" && r["reason"] == "token_expired"));
    assert!(counted.iter().all(|r| r["relay"] == "test-relay"
        && r["code"] == "unauthorized"
        && r["source"] == "127.0.0.1/32"));
    let records = audit_records(&nats.url(), 0).await;
    assert!(records.iter().all(|r| r["kind"] != "refused"), "{records:?}");
}

#[tokio::test]
async fn tenants_publish_only_to_their_own_subjects() {
    let idp = TestIdp::start().await;
    let (nats, setup, relay) = jwt_relay(&idp, |_| {}).await;
    let acme = idp.token(json!({"sub": "edge-fn-acme", "tenant": "acme", "scope": "edge:publish"}));
    let no_scope = idp.token(json!({"sub": "edge-fn-x", "tenant": "acme", "scope": "openid"}));
    let smuggler = idp.token(json!({"sub": "edge-fn-y", "tenant": "*", "scope": "edge:publish"}));

    for (token, subject, want) in [
        (&acme, "edge.acme.click", ("accepted", "")),
        (&acme, "edge.globex.click", ("forbidden", "no_rule_allows")),
        (&acme, "edge.acme.admin.reset", ("forbidden", "no_rule_allows")),
        (&no_scope, "edge.acme.click", ("forbidden", "no_rule_allows")),
        (&smuggler, "edge.acme.click", ("forbidden", "no_rule_allows")),
        (&acme, "edge.acme.*", ("bad_subject", "bad_subject")),
        (&acme, "edge.acme.>", ("bad_subject", "bad_subject")),
        (&acme, "edge..click", ("bad_subject", "bad_subject")),
        (&acme, "edge.acme.%C3%BC", ("bad_subject", "bad_subject")),
    ] {
        let got = over_https(&relay, token, subject).await;
        assert_eq!((got.0.as_str(), got.1.as_str()), want, "{subject}");
    }
    let long = format!("edge.acme.{}", "x".repeat(300));
    assert_eq!(over_https(&relay, &acme, &long).await.0, "bad_subject");
    assert_eq!(over_h3(&setup, &relay, &acme, "edge.acme.h3").await.0, "accepted");
    assert_eq!(over_quic(&setup, &relay, &acme, "edge.acme.quic").await.0, "accepted");
    assert_eq!(
        over_quic(&setup, &relay, &acme, "edge.globex.quic").await,
        ("forbidden".into(), "no_rule_allows".into())
    );

    let stored = read_stream(&nats.url()).await;
    let events: Vec<_> = stored.iter().flat_map(|m| m.batch.events.iter()).collect();
    assert_eq!(events.len(), 3);
    // The audit trail says who tried which subject.
    // Identities are namespaced by kind: a JWT's is `jwt:<issuer>:<sub>`.
    let who = format!("jwt:{}:edge-fn-acme", idp.issuer());
    let records = audit_records(&nats.url(), 1).await;
    assert!(records.iter().any(|r| r["kind"] == "refused"
        && r["identity"] == who.as_str()
        && r["subject"] == "edge.globex.click"
        && r["reason"] == "no_rule_allows"));
    assert!(events.iter().all(|e| e.publisher == who && e.subject.starts_with("edge.acme.")));
}

#[tokio::test]
async fn key_rotation_is_picked_up_and_rotated_out_keys_stop_after_the_grace() {
    let idp = TestIdp::start().await;
    let (_nats, _setup, relay) = jwt_relay(&idp, |jwt| jwt.key_grace_secs = 2).await;
    let old = accepted_token(&idp, &relay).await;

    // The IdP signs with a new key and drops the old one; the relay has never seen the new kid.
    idp.idp.rotate("ES256", true).unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await; // one fetch cooldown
    let new = idp.token(good_claims(&idp));
    assert_eq!(over_https(&relay, &new, "edge.acme.b").await.0, "accepted", "no restart needed");
    // Within the grace the old key still verifies (tokens signed just before the rotation).
    assert_eq!(over_https(&relay, &old, "edge.acme.c").await.0, "accepted");
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(
        over_https(&relay, &old, "edge.acme.d").await,
        ("unauthorized".into(), "retired_key".into()),
        "after the grace the rotated-out key is refused, cached or not"
    );
    assert_eq!(over_https(&relay, &new, "edge.acme.e").await.0, "accepted");
}

#[tokio::test]
async fn a_quic_stream_signed_by_a_rotated_out_key_is_refused_once_the_grace_ends() {
    let idp = TestIdp::start().await;
    let (nats, setup, relay) = jwt_relay(&idp, |jwt| {
        jwt.key_grace_secs = 2;
        jwt.refresh_secs = 1;
    })
    .await;
    let old = idp.token(good_claims(&idp));
    let client = setup.quic_client(&relay, &old).await;
    let mut stream = client.stream().await.unwrap();
    assert_eq!(on_stream(&mut stream, "edge.acme.a").await, None);
    // The IdP drops the old key; the relay's refresh finds that within a second. The stream
    // (no token on its later requests) keeps working within the grace...
    idp.idp.rotate("ES256", true).unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(on_stream(&mut stream, "edge.acme.b").await, None);
    // ...and not after it, although the token's exp is an hour away.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let late = on_stream(&mut stream, "edge.acme.c").await.expect("refused after the grace");
    assert_eq!(late.0, "unauthorized", "{late:?}");
    // The key is retired, or forgotten already (a refresh after the grace drops it).
    assert!(["retired_key", "unknown_key", "token_expired"].contains(&late.1.as_str()), "{late:?}");
    assert_eq!(stream_messages(&nats.url()).await, 2);
}

/// One request without a token on `stream`: its refusal (code, reason), if refused.
async fn on_stream(
    stream: &mut edgerelay_client::PublishStream,
    subject: &str,
) -> Option<(String, String)> {
    stream.send(vec![edgerelay_client::event(subject, "1")]).await.unwrap();
    stream.recv().await.unwrap().error.map(|e| (e.code, e.reason))
}

#[tokio::test]
async fn a_refresh_that_finds_the_same_keys_keeps_checked_tokens_cached() {
    let idp = TestIdp::start().await;
    let (_nats, _setup, relay) = jwt_relay(&idp, |jwt| jwt.refresh_secs = 1).await;
    let token = accepted_token(&idp, &relay).await;
    let counts = || async {
        (
            metric(&relay, "edgerelay_jwks_key_changes_total").await,
            metric(&relay, "edgerelay_jwt_verifications_total").await,
        )
    };
    assert_eq!(counts().await, (1, 1), "the first fetch, the first check");

    // Periodic refreshes find the same keys: the token stays cached, nothing is logged as new.
    let wait_for_fetches = |n: u64| {
        let idp = &idp;
        async move {
            let target = idp.idp.jwks_fetches() + n;
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while idp.idp.jwks_fetches() < target {
                assert!(std::time::Instant::now() < deadline, "the relay stopped refreshing");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for_fetches(2).await;
    assert_eq!(over_https(&relay, &token, "edge.acme.b").await.0, "accepted");
    assert_eq!(counts().await, (1, 1), "unchanged keys: no change, no second check");

    // A new key (the old one kept) is a change: the cached token is checked again, once.
    idp.idp.rotate("ES256", false).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while counts().await.0 < 2 {
        assert!(std::time::Instant::now() < deadline, "the new key was never picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(over_https(&relay, &token, "edge.acme.c").await.0, "accepted");
    assert_eq!(over_https(&relay, &token, "edge.acme.d").await.0, "accepted");
    assert_eq!(counts().await, (2, 2));
}

#[tokio::test]
async fn a_flood_of_random_kids_costs_at_most_one_fetch_per_cooldown() {
    let idp = TestIdp::start().await;
    let (nats, _setup, relay) = jwt_relay(&idp, |jwt| jwt.fetch_cooldown_secs = 30).await;
    let before = idp.idp.jwks_fetches();
    let stranger = SigningKey::generate("x", "ES256").unwrap();
    let claims = good_claims(&idp);
    let tokens: Vec<String> = (0..10_000)
        .map(|i| {
            stranger
                .sign(&json!({"alg": "ES256", "typ": "JWT", "kid": format!("random-{i}")}), &claims)
                .unwrap()
        })
        .collect();
    let started = std::time::Instant::now();
    let results = futures::future::join_all(tokens.chunks(157).map(|chunk| {
        let relay = &relay;
        async move {
            let mut refused = 0;
            for t in chunk {
                let (code, reason) = over_https(relay, t, "edge.acme.flood").await;
                refused += usize::from(code == "unauthorized" && reason == "unknown_key");
            }
            refused
        }
    }))
    .await;
    assert_eq!(results.iter().sum::<usize>(), 10_000);
    let fetches = idp.idp.jwks_fetches() - before;
    let cooldowns = started.elapsed().as_secs() / 30 + 1;
    assert!(
        fetches <= cooldowns,
        "{fetches} JWKS fetches for 10,000 random kids in {:?}",
        started.elapsed()
    );
    assert_eq!(stream_messages(&nats.url()).await, 0);
}

#[tokio::test]
async fn the_last_good_keys_serve_while_the_idp_is_down_until_the_stale_limit() {
    let mut idp = TestIdp::start().await;
    let (_nats, _setup, relay) = jwt_relay(&idp, |jwt| {
        jwt.refresh_secs = 1;
        jwt.max_stale_secs = 3;
    })
    .await;
    let token = idp.token(good_claims(&idp));
    idp.stop().await;
    // Fresh tokens (not cached) still verify with the keys fetched before the IdP went down.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let fresh = idp.token(claims_with(&idp, json!({"sub": "edge-fn-2"})));
    assert_eq!(over_https(&relay, &fresh, "edge.acme.a").await.0, "accepted");
    assert_eq!(over_https(&relay, &token, "edge.acme.b").await.0, "accepted");
    // Past the stale limit nothing can be checked: 503 with Retry-After, and not ready.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let another = idp.token(claims_with(&idp, json!({"sub": "edge-fn-3"})));
    let resp = relay.publish_as(&relay.h2, &another, "edge.acme.c", "x").send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(error_code(resp).await.1, "auth_unavailable");
    let ready = relay.h1.get(relay.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
}

#[tokio::test]
async fn a_quic_stream_keeps_its_identity_only_until_the_token_expires() {
    let idp = TestIdp::start().await;
    let (nats, setup, relay) = jwt_relay(&idp, |jwt| jwt.leeway_secs = 0).await;
    let now = now();
    let short = idp.token(claims_with(&idp, json!({"iat": now, "exp": now + 2})));
    let client = setup.quic_client(&relay, &short).await;
    let mut stream = client.stream().await.unwrap();
    stream.send(vec![edgerelay_client::event("edge.acme.a", "1")]).await.unwrap();
    let first = stream.recv().await.unwrap();
    assert!(first.error.is_none(), "{first:?}");
    // Later requests on the stream carry no token: the stream's identity answers for them...
    stream.send(vec![edgerelay_client::event("edge.acme.b", "2")]).await.unwrap();
    assert!(stream.recv().await.unwrap().error.is_none());
    // ...until its token expires.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    stream.send(vec![edgerelay_client::event("edge.acme.c", "3")]).await.unwrap();
    let late = stream.recv().await.unwrap().error.expect("refused");
    assert_eq!((late.code.as_str(), late.reason.as_str()), ("unauthorized", "token_expired"));
    assert_eq!(stream_messages(&nats.url()).await, 2);
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_then_recover() {
    let idp = TestIdp::start().await;
    let (_nats, setup, relay) = start_jwt_relay(&idp, |c| {
        let rl = &mut c.auth.rate_limit;
        rl.events_per_sec = 4;
        rl.burst = 4;
        rl.tenant_claim = Some("tenant".into());
        rl.tenant_events_per_sec = 6;
    })
    .await;

    // Per identity: a static token.
    for i in 0..4 {
        let resp = relay.publish(&relay.h2, "edge.rl.a", "x").send().await.unwrap();
        assert_eq!(resp.status(), 202, "event {i} is within the burst");
    }
    let over = relay.publish(&relay.h2, "edge.rl.a", "x").send().await.unwrap();
    assert_eq!(over.status(), 429);
    assert_eq!(over.headers()["retry-after"], "1");
    assert_eq!(error_code(over).await.1, "rate_limited");
    // The native protocol refuses each event with the same code and a retry delay.
    let client = setup.quic_client(&relay, TOKEN).await;
    let answer = client.publish(vec![edgerelay_client::event("edge.rl.q", "x")]).await.unwrap();
    match &answer.results[0].outcome {
        Some(edgerelay::proto::event_result::Outcome::Refused(r)) => {
            assert_eq!(r.code, "rate_limited");
            assert!((1..=1_000).contains(&r.retry_after_ms), "{r:?}");
        }
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let resp = relay.publish(&relay.h2, "edge.rl.a", "x").send().await.unwrap();
    assert_eq!(resp.status(), 202, "the bucket refilled");

    // Per tenant: two identities of tenant acme share 6 events a second.
    let a = idp.token(json!({"sub": "fn-a", "tenant": "acme", "scope": "edge:publish"}));
    let b = idp.token(json!({"sub": "fn-b", "tenant": "acme", "scope": "edge:publish"}));
    for token in [&a, &a, &a, &b, &b, &b] {
        assert_eq!(over_https(&relay, token, "edge.acme.t").await.0, "accepted");
    }
    assert_eq!(
        over_https(&relay, &b, "edge.acme.t").await,
        ("rate_limited".into(), "tenant_rate_limited".into())
    );
}

#[tokio::test]
async fn a_token_without_a_usable_tenant_claim_is_refused_when_a_tenant_limit_is_set() {
    let idp = TestIdp::start().await;
    let (nats, setup, relay) = start_jwt_relay(&idp, |c| {
        c.auth.rate_limit.tenant_claim = Some("tenant".into());
        c.auth.rate_limit.tenant_events_per_sec = 1_000;
    })
    .await;

    let with = |tenant: Value| {
        let mut claims = json!({"sub": "fn-t", "scope": "edge:publish"});
        if !tenant.is_null() {
            claims["tenant"] = tenant;
        }
        idp.token(claims)
    };
    // The tenant bucket fails closed: no tenant, an empty one or a non-string one is a 401,
    // on HTTPS and on the native protocol, and nothing is stored.
    for (tenant, reason) in [
        (Value::Null, "missing_claim"),
        (json!(""), "missing_claim"),
        (json!(42), "bad_claim_type"),
        (json!({"id": "acme"}), "bad_claim_type"),
    ] {
        let token = with(tenant.clone());
        assert_eq!(
            over_https(&relay, &token, "edge.acme.t").await,
            ("unauthorized".into(), reason.into()),
            "{tenant}"
        );
        let client = setup.quic_client(&relay, &token).await;
        let answer = client.publish(vec![edgerelay_client::event("edge.acme.t", "x")]).await;
        let error = answer.unwrap().error.expect("refused");
        assert_eq!((error.code.as_str(), error.reason.as_str()), ("unauthorized", reason));
    }
    assert_eq!(stream_messages(&nats.url()).await, 0);
    // A token with its tenant passes.
    assert_eq!(over_https(&relay, &with(json!("acme")), "edge.acme.t").await.0, "accepted");
    relay.shutdown().await;

    // Without a tenant limit the claim is not needed to authenticate (only the roles that name
    // it then allow nothing).
    let mut setup = Setup::new(&nats.url());
    setup.with_jwt(&idp);
    setup.config.auth.rate_limit.tenant_claim = Some("tenant".into());
    let relay = setup.start().await;
    assert_eq!(
        over_https(&relay, &with(Value::Null), "edge.acme.t").await,
        ("forbidden".into(), "no_rule_allows".into())
    );
}

#[tokio::test]
async fn keys_from_a_jwks_url_or_a_local_file() {
    let nats = NatsServer::start();
    let idp = TestIdp::start().await;
    let token = idp.token(good_claims(&idp));

    // A JWKS URL, without discovery.
    let mut setup = Setup::new(&nats.url());
    let jwt = setup.with_jwt(&idp);
    jwt.discovery = false;
    jwt.jwks_url = Some(format!("{}/jwks.json", idp.issuer()));
    let relay = setup.start().await;
    assert_eq!(over_https(&relay, &token, "edge.acme.url").await.0, "accepted");
    relay.shutdown().await;

    // A local file, read again at every refresh: a key added to it is picked up.
    let mut setup = Setup::new(&nats.url());
    let file = setup.dir.path().join("jwks.json");
    std::fs::write(&file, idp.idp.jwks().to_string()).unwrap();
    let jwt = setup.with_jwt(&idp);
    jwt.discovery = false;
    jwt.jwks_file = Some(file.clone());
    jwt.refresh_secs = 1;
    let relay = setup.start().await;
    assert_eq!(over_https(&relay, &token, "edge.acme.file").await.0, "accepted");
    idp.idp.rotate("ES256", false).unwrap();
    let rotated = idp.token(good_claims(&idp));
    std::fs::write(&file, idp.idp.jwks().to_string()).unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(over_https(&relay, &rotated, "edge.acme.file").await.0, "accepted");
}
