//! Bad input: each refused with its status and code, and nothing published.

use crate::support::*;

#[tokio::test]
async fn bad_requests_are_refused_with_clear_codes_and_nothing_is_published() {
    let (nats, _setup, relay) = start_relay(|_| {}).await;
    let c = &relay.h2;
    let url = |p: &str| relay.url(p);
    // One event to `subject`, with no credentials yet.
    let to = |subject: &str| c.post(url(&format!("/v1/publish/{subject}")));
    // One event to `subject` with the test token.
    let publish = |subject: &str| to(subject).bearer_auth(TOKEN);
    // A multi-event request of `content_type` with the test token.
    let events = |content_type: &str| {
        c.post(url("/v1/publish")).bearer_auth(TOKEN).header("Content-Type", content_type)
    };
    let json = "application/json";
    let too_long = format!("edge.{}", "a".repeat(300));
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("wildcard *", publish("edge.*").body("x"), 400, "bad_subject"),
        ("wildcard >", publish("edge.>").body("x"), 400, "bad_subject"),
        ("empty token", publish("edge..x").body("x"), 400, "bad_subject"),
        ("bad char", publish("edge.a%20b").body("x"), 400, "bad_subject"),
        ("too long", publish(&too_long).body("x"), 400, "bad_subject"),
        ("oversize", publish("edge.big").body("x".repeat(5000)), 413, "too_large"),
        ("no token", to("edge.x").body("x"), 401, "unauthorized"),
        (
            "unknown token",
            to("edge.x").bearer_auth("nope-nope-nope-nope").body("x"),
            401,
            "unauthorized",
        ),
        ("basic auth", to("edge.x").basic_auth("a", Some("b")).body("x"), 401, "unauthorized"),
        ("denied subject", publish("edge.secret.x").body("x"), 403, "forbidden"),
        ("outside rules", to("edge.x").bearer_auth(OTHER_TOKEN).body("x"), 403, "forbidden"),
        ("outside stream", publish("other.x").body("x"), 403, "forbidden"),
        (
            "bad edge ts",
            publish("edge.x").header("Edge-Timestamp", "yesterday").body("x"),
            400,
            "bad_request",
        ),
        (
            "bad key",
            publish("edge.x").header("Idempotency-Key", "has space").body("x"),
            400,
            "bad_request",
        ),
        ("wrong content type", events("text/plain").body("x"), 415, "unsupported_media_type"),
        (
            "no content type",
            c.post(url("/v1/publish")).bearer_auth(TOKEN).body("x"),
            415,
            "unsupported_media_type",
        ),
        (
            "bad protobuf",
            events("application/x-protobuf").body(vec![0xff, 0xff, 0xff, 0x0f]),
            400,
            "bad_request",
        ),
        ("bad json", events(json).body("{\"events\":[{"), 400, "bad_request"),
        (
            "json wrong shape",
            events(json).body("{\"events\":[{\"subject\":\"edge.x\"}]}"),
            400,
            "bad_request",
        ),
        ("empty batch", events(json).body("{\"events\":[]}"), 400, "bad_request"),
        ("oversize body", events(json).body("x".repeat(70_000)), 413, "too_large"),
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
        let resp = relay.publish(&relay.h1, "edge.*", "x").send().await.unwrap();
        assert_eq!(error_code(resp).await, (400, "bad_subject".into()));
    }
    relay.shutdown().await;
    assert_eq!(stream_messages(&nats.url()).await, 0, "nothing may be published for bad input");
}
