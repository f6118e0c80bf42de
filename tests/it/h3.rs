//! HTTP/3 on the QUIC port: the same routes, statuses and bodies as HTTPS.

use bytes::Bytes;

use crate::support::*;

fn json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).expect("JSON body")
}

#[tokio::test]
async fn http3_publishes_like_https() {
    let (nats, setup, relay) = start_relay(|_| {}).await;
    let client = h3_client(&setup, &relay, TOKEN).await;

    let (status, headers, body) = client
        .post(
            "/v1/publish/edge.h3.click",
            &[("idempotency-key", "h3-key-1"), ("edge-timestamp", "1700000000999")],
            Bytes::from_static(b"over h3"),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body:?}");
    assert_eq!(headers["content-type"], "application/json");
    let ok = json(&body);
    assert_eq!(ok["stream"], STREAM);
    assert_eq!(ok["duplicate"], false);
    let seq = ok["seq"].as_u64().unwrap();

    // The retry with the same key: the original answer, marked duplicate.
    let (_, _, again) = client
        .post(
            "/v1/publish/edge.h3.click",
            &[("idempotency-key", "h3-key-1")],
            Bytes::from_static(b"over h3"),
        )
        .await
        .unwrap();
    assert_eq!(
        (json(&again)["seq"].as_u64(), json(&again)["duplicate"].as_bool()),
        (Some(seq), Some(true))
    );

    let multi = serde_json::json!({"events": [
        {"subject": "edge.h3.a", "data": "one"},
        {"subject": "edge.secret.b", "data": "two"},
    ]});
    let (status, _, body) = client
        .post(
            "/v1/publish",
            &[("content-type", "application/json")],
            Bytes::from(multi.to_string()),
        )
        .await
        .unwrap();
    assert_eq!(status, 403);
    let v = json(&body);
    assert_eq!(v["results"][0]["stream"], STREAM);
    assert_eq!(v["results"][1]["error"]["code"], "forbidden");

    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Bytes, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("/v1/publish/edge.*", vec![], Bytes::from_static(b"x"), 400, "bad_subject"),
        ("/v1/publish/edge.big", vec![], Bytes::from(vec![b'x'; 5000]), 413, "too_large"),
        (
            "/v1/publish",
            vec![("content-type", "text/plain")],
            Bytes::from_static(b"x"),
            415,
            "unsupported_media_type",
        ),
        (
            "/v1/publish",
            vec![("content-type", "application/json")],
            Bytes::from(vec![b'x'; 200_000]),
            413,
            "too_large",
        ),
        ("/v2/nothing", vec![], Bytes::new(), 404, "not_found"),
    ];
    for (path, headers, body, want_status, want_code) in cases {
        let (status, _, resp) = client.post(path, &headers, body).await.unwrap();
        assert_eq!(
            (status.as_u16(), json(&resp)["error"]["code"].as_str()),
            (want_status, Some(want_code)),
            "{path}"
        );
    }
    let stranger = h3_client(&setup, &relay, "not-a-valid-token-at-all").await;
    let (status, _, resp) =
        stranger.post("/v1/publish/edge.h3.x", &[], Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(
        (status.as_u16(), json(&resp)["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );

    relay.shutdown().await;
    let stored = read_stream(&nats.url()).await;
    let payloads: Vec<&[u8]> =
        stored.iter().flat_map(|m| &m.batch.events).map(|e| &e.payload[..]).collect();
    assert_eq!(payloads, [&b"over h3"[..], b"one"]);
}
