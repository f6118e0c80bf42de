//! Bad input: each refused with its status and code, and nothing published.

use crate::support::*;

#[tokio::test]
async fn bad_requests_are_refused_with_clear_codes_and_nothing_is_published() {
    let nats = NatsServer::start();
    let relay = Setup::new(&nats.url()).start().await;
    let c = &relay.h2;
    let big = "x".repeat(5000);
    let url = |p: &str| relay.url(p);
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "wildcard *",
            c.post(url("/v1/publish/edge.*")).bearer_auth(TOKEN).body("x"),
            400,
            "bad_subject",
        ),
        (
            "wildcard >",
            c.post(url("/v1/publish/edge.>")).bearer_auth(TOKEN).body("x"),
            400,
            "bad_subject",
        ),
        (
            "empty token",
            c.post(url("/v1/publish/edge..x")).bearer_auth(TOKEN).body("x"),
            400,
            "bad_subject",
        ),
        (
            "bad char",
            c.post(url("/v1/publish/edge.a%20b")).bearer_auth(TOKEN).body("x"),
            400,
            "bad_subject",
        ),
        (
            "too long",
            c.post(url(&format!("/v1/publish/edge.{}", "a".repeat(300))))
                .bearer_auth(TOKEN)
                .body("x"),
            400,
            "bad_subject",
        ),
        (
            "oversize",
            c.post(url("/v1/publish/edge.big")).bearer_auth(TOKEN).body(big.clone()),
            413,
            "too_large",
        ),
        ("no token", c.post(url("/v1/publish/edge.x")).body("x"), 401, "unauthorized"),
        (
            "unknown token",
            c.post(url("/v1/publish/edge.x")).bearer_auth("nope-nope-nope-nope").body("x"),
            401,
            "unauthorized",
        ),
        (
            "basic auth",
            c.post(url("/v1/publish/edge.x")).basic_auth("a", Some("b")).body("x"),
            401,
            "unauthorized",
        ),
        (
            "denied subject",
            c.post(url("/v1/publish/edge.secret.x")).bearer_auth(TOKEN).body("x"),
            403,
            "forbidden",
        ),
        (
            "outside rules",
            c.post(url("/v1/publish/edge.x")).bearer_auth(OTHER_TOKEN).body("x"),
            403,
            "forbidden",
        ),
        (
            "outside stream",
            c.post(url("/v1/publish/other.x")).bearer_auth(TOKEN).body("x"),
            403,
            "forbidden",
        ),
        (
            "bad edge ts",
            c.post(url("/v1/publish/edge.x"))
                .bearer_auth(TOKEN)
                .header("Edge-Timestamp", "yesterday")
                .body("x"),
            400,
            "bad_request",
        ),
        (
            "bad key",
            c.post(url("/v1/publish/edge.x"))
                .bearer_auth(TOKEN)
                .header("Idempotency-Key", "has space")
                .body("x"),
            400,
            "bad_request",
        ),
        (
            "wrong content type",
            c.post(url("/v1/publish"))
                .bearer_auth(TOKEN)
                .header("Content-Type", "text/plain")
                .body("x"),
            415,
            "unsupported_media_type",
        ),
        (
            "no content type",
            c.post(url("/v1/publish")).bearer_auth(TOKEN).body("x"),
            415,
            "unsupported_media_type",
        ),
        (
            "bad protobuf",
            c.post(url("/v1/publish"))
                .bearer_auth(TOKEN)
                .header("Content-Type", "application/x-protobuf")
                .body(vec![0xff, 0xff, 0xff, 0x0f]),
            400,
            "bad_request",
        ),
        (
            "bad json",
            c.post(url("/v1/publish"))
                .bearer_auth(TOKEN)
                .header("Content-Type", "application/json")
                .body("{\"events\":[{"),
            400,
            "bad_request",
        ),
        (
            "json wrong shape",
            c.post(url("/v1/publish"))
                .bearer_auth(TOKEN)
                .header("Content-Type", "application/json")
                .body("{\"events\":[{\"subject\":\"edge.x\"}]}"),
            400,
            "bad_request",
        ),
        (
            "empty batch",
            c.post(url("/v1/publish"))
                .bearer_auth(TOKEN)
                .header("Content-Type", "application/json")
                .body("{\"events\":[]}"),
            400,
            "bad_request",
        ),
        (
            "oversize body",
            c.post(url("/v1/publish"))
                .bearer_auth(TOKEN)
                .header("Content-Type", "application/json")
                .body("x".repeat(70_000)),
            413,
            "too_large",
        ),
        ("GET", c.get(url("/v1/publish/edge.x")).bearer_auth(TOKEN), 405, "method_not_allowed"),
        ("unknown path", c.post(url("/v2/things")).bearer_auth(TOKEN).body("x"), 404, "not_found"),
    ];
    for (name, req, status, code) in cases {
        let resp = req.send().await.unwrap();
        let retry_after = resp.headers().contains_key("retry-after");
        let len = resp.content_length();
        let (got_status, got_code) = error_code(resp).await;
        assert_eq!((got_status, got_code.as_str()), (status, code), "case {name}");
        assert!(!retry_after, "case {name}: a retry does not help, so no Retry-After");
        assert!(len.unwrap_or(0) < 2048, "case {name}: body too large for an edge worker");
    }
    // The same over HTTP/1.1, for a couple of them (connection must stay usable).
    for _ in 0..2 {
        let resp = relay
            .h1
            .post(url("/v1/publish/edge.*"))
            .bearer_auth(TOKEN)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(resp).await, (400, "bad_subject".into()));
    }
    relay.shutdown().await;
    assert_eq!(stream_messages(&nats.url()).await, 0, "nothing may be published for bad input");
}
