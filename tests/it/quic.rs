//! The native QUIC protocol (`edgerelay/1`) with the Rust client against a real nats-server.

use std::collections::HashMap;
use std::time::Duration;

use edgerelay::ingest::framing;
use edgerelay::proto::{self, event_result::Outcome};
use edgerelay_client::event;

use crate::support::*;

fn accepted(r: &proto::EventResult) -> &proto::Accepted {
    match &r.outcome {
        Some(Outcome::Accepted(a)) => a,
        other => panic!("not accepted: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_on_many_streams_and_connections_are_all_stored() {
    let (nats, setup, relay) = start_relay(|_| {}).await;
    const CONNS: usize = 2;
    const STREAMS: usize = 3;
    const REQUESTS: usize = 10;
    const EVENTS: usize = 4;
    let mut tasks = Vec::new();
    for c in 0..CONNS {
        let client = std::sync::Arc::new(setup.quic_client(&relay, TOKEN).await);
        for s in 0..STREAMS {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut stream = client.stream().await.unwrap();
                // All requests go out before any answer is read.
                for r in 0..REQUESTS {
                    let events = (0..EVENTS)
                        .map(|e| event(&format!("edge.quic.{c}"), format!("c{c}-s{s}-r{r}-e{e}")))
                        .collect();
                    stream.send(events).await.unwrap();
                }
                let mut answers = Vec::new();
                for r in 0..REQUESTS {
                    let resp = stream.recv().await.unwrap();
                    assert!(resp.error.is_none(), "{resp:?}");
                    assert_eq!(resp.results.len(), EVENTS);
                    for (e, result) in resp.results.iter().enumerate() {
                        let a = accepted(result);
                        answers.push((format!("c{c}-s{s}-r{r}-e{e}"), a.seq, a.index));
                    }
                }
                stream.finish();
                answers
            }));
        }
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await.unwrap());
    }
    assert_eq!(answers.len(), CONNS * STREAMS * REQUESTS * EVENTS);
    let stored = read_stream(&nats.url()).await;
    let by_seq: HashMap<u64, &StoredMsg> = stored.iter().map(|m| (m.seq, m)).collect();
    for (payload, seq, index) in &answers {
        let ev = &by_seq[seq].batch.events[*index as usize];
        assert_eq!(ev.payload, payload.as_bytes(), "answer points at the wrong event");
        assert_eq!(ev.publisher, "static:edge-test");
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn bad_requests_are_answered_and_the_stream_goes_on() {
    let (nats, setup, relay) = start_relay(|_| {}).await;
    let client = setup.quic_client(&relay, TOKEN).await;

    // No token on the stream's first request.
    let conn = client.connection().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let req = proto::PublishRequest { events: vec![event("edge.q", "x")], token: String::new() };
    send.write_all(&framing::frame(&req)).await.unwrap();
    send.finish().unwrap();
    let body = recv.read_to_end(1 << 20).await.unwrap();
    let resp = decode_one(&body);
    assert_eq!(resp.error.unwrap().code, "unauthorized");

    // Malformed protobuf, wrong token, then a good request: answered in order, stream alive.
    let mut stream = client.stream().await.unwrap();
    stream.send(vec![event("edge.q", "first")]).await.unwrap();
    let mut garbage = bytes::BytesMut::new();
    framing::put_len(4, &mut garbage);
    garbage.extend_from_slice(&[0xff, 0xff, 0xff, 0x0f]);
    stream.send_raw(&garbage).await.unwrap();
    stream.send(vec![event("edge.secret.x", "denied"), event("edge.q..bad", "bad")]).await.unwrap();
    stream.send(vec![event("edge.q", "last")]).await.unwrap();
    assert!(accepted(&stream.recv().await.unwrap().results[0]).seq > 0);
    assert_eq!(stream.recv().await.unwrap().error.unwrap().code, "bad_request");
    let mixed = stream.recv().await.unwrap();
    let codes: Vec<&str> = mixed
        .results
        .iter()
        .map(|r| match &r.outcome {
            Some(Outcome::Refused(x)) => x.code.as_str(),
            _ => "accepted",
        })
        .collect();
    assert_eq!(codes, ["forbidden", "bad_subject"]);
    assert!(accepted(&stream.recv().await.unwrap().results[0]).seq > 0);

    let wrong = setup.quic_client(&relay, "not-a-valid-token-at-all").await;
    let resp = wrong.publish(vec![event("edge.q", "x")]).await.unwrap();
    assert_eq!(resp.error.unwrap().code, "unauthorized");
    relay.shutdown().await;
    let payloads: Vec<String> = read_stream(&nats.url())
        .await
        .iter()
        .flat_map(|m| &m.batch.events)
        .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
        .collect();
    assert_eq!(payloads, ["first", "last"]);
}

#[tokio::test]
async fn an_oversize_frame_is_refused_from_its_prefix_and_the_connection_goes_on() {
    let (_nats, setup, relay) = start_relay(|c| c.quic.max_frame_bytes = 8 << 10).await;
    let client = setup.quic_client(&relay, TOKEN).await;

    let mut stream = client.stream().await.unwrap();
    stream.send(vec![event("edge.q", "before")]).await.unwrap();
    // Announce 1 GiB and send a little: the relay must refuse without waiting for the rest.
    let mut huge = bytes::BytesMut::new();
    framing::put_len(1 << 30, &mut huge);
    huge.extend_from_slice(&[0u8; 100]);
    stream.send_raw(&huge).await.unwrap();
    assert!(accepted(&stream.recv().await.unwrap().results[0]).seq > 0);
    let refusal =
        tokio::time::timeout(Duration::from_secs(5), stream.recv()).await.unwrap().unwrap();
    assert_eq!(refusal.error.unwrap().code, "too_large");
    assert!(stream.recv().await.is_err(), "the relay ends the stream after a framing error");

    // Same connection, new stream: fine.
    let resp = client.publish(vec![event("edge.q", "after")]).await.unwrap();
    assert!(accepted(&resp.results[0]).seq > 0);
    relay.shutdown().await;
}

#[tokio::test]
async fn streams_beyond_the_limit_wait_and_idle_connections_close() {
    let (_nats, setup, relay, _client, conn) = start_quic_relay(|c| {
        c.quic.max_streams_per_connection = 2;
        c.quic.idle_timeout_ms = 500;
    })
    .await;
    let (mut s1, _r1) = conn.open_bi().await.unwrap();
    let (mut s2, _r2) = conn.open_bi().await.unwrap();
    // Streams only count once they carry data.
    s1.write_all(&[0]).await.unwrap();
    s2.write_all(&[0]).await.unwrap();
    let third = tokio::time::timeout(Duration::from_millis(500), async {
        let (mut s3, _r3) = conn.open_bi().await.unwrap();
        s3.write_all(&[0]).await
    })
    .await;
    assert!(third.is_err(), "a third stream was allowed past max_streams_per_connection = 2");

    let idle = setup.quic_client(&relay, TOKEN).await;
    let idle_conn = idle.connection().await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(5), idle_conn.closed()).await;
    assert!(reason.is_ok(), "idle connection was not closed");
    relay.shutdown().await;
}

fn decode_one(body: &[u8]) -> proto::PublishResponse {
    let mut buf = bytes::BytesMut::from(body);
    let frame = framing::FrameDecoder::new(1 << 20).decode(&mut buf).unwrap().unwrap();
    prost::Message::decode(frame).unwrap()
}

#[tokio::test]
async fn a_corpus_of_malformed_frames_never_hurts_the_connection() {
    let (_nats, _setup, relay, client, conn) =
        start_quic_relay(|c| c.quic.max_frame_bytes = 8 << 10).await;
    let prefix = |n: u64| {
        let mut b = bytes::BytesMut::new();
        framing::put_len(n, &mut b);
        b.to_vec()
    };
    let corpus: Vec<(&str, Vec<u8>)> = vec![
        ("11-byte varint", vec![0xff; 11]),
        ("truncated varint then FIN", vec![0x80, 0x80]),
        ("prefix longer than the data then FIN", [prefix(50), vec![1, 2, 3]].concat()),
        ("empty frame", prefix(0)),
        ("garbage protobuf", [prefix(4), vec![0xff, 0xff, 0xff, 0x0f]].concat()),
        ("wrong wire type", [prefix(2), vec![0x0d, 0x00]].concat()),
        ("nested length past the end", [prefix(3), vec![0x0a, 0x7f, 0x00]].concat()),
        ("prefix at the limit + 1", prefix((8 << 10) + 1)),
        ("max u64 prefix", prefix(u64::MAX)),
    ];
    for (name, bytes) in &corpus {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        let _ = send.finish();
        // Whatever the relay does with the stream (answer, stop, finish), it must end it.
        let read = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20)).await;
        assert!(read.is_ok(), "{name}: the relay left the stream hanging");
    }
    assert!(conn.close_reason().is_none(), "the connection died");
    let resp = client.publish(vec![event("edge.q", "still fine")]).await.unwrap();
    assert!(accepted(&resp.results[0]).seq > 0);
    relay.shutdown().await;
}

#[tokio::test]
async fn a_dropped_connection_loses_nothing_answered_and_a_drain_ends_open_streams() {
    let (nats, setup, relay) = start_relay(|_| {}).await;
    let client = setup.quic_client(&relay, TOKEN).await;
    let mut stream = client.stream().await.unwrap();
    for i in 0..5 {
        stream.send(vec![event("edge.q.drop", format!("d{i}"))]).await.unwrap();
    }
    let mut answered = Vec::new();
    for i in 0..3 {
        answered.push((format!("d{i}"), accepted(&stream.recv().await.unwrap().results[0]).seq));
    }
    // The client vanishes mid-stream with answers outstanding.
    client.connection().await.unwrap().close(0u32.into(), b"gone");
    let again = setup.quic_client(&relay, TOKEN).await;
    let resp = again.publish(vec![event("edge.q.drop", "after")]).await.unwrap();
    assert!(accepted(&resp.results[0]).seq > 0);

    // A stream left open does not hold the drain for its grace period.
    let mut open = again.stream().await.unwrap();
    open.send(vec![event("edge.q.drop", "open")]).await.unwrap();
    assert!(accepted(&open.recv().await.unwrap().results[0]).seq > 0);
    let started = std::time::Instant::now();
    assert!(relay.shutdown().await.complete);
    assert!(started.elapsed() < Duration::from_secs(4), "drain waited for the idle stream");

    let stored = read_stream(&nats.url()).await;
    for (payload, seq) in answered {
        let msg = stored.iter().find(|m| m.seq == seq).expect("answered seq stored");
        assert!(
            msg.batch.events.iter().any(|e| e.payload == payload.as_bytes()),
            "{payload} missing"
        );
    }
}

#[tokio::test]
async fn thousands_of_tiny_frames_in_one_chunk_are_all_answered_in_order() {
    let (_nats, setup, relay) = start_relay(|c| c.quic.max_requests_in_flight_per_stream = 4).await;
    let client = setup.quic_client(&relay, TOKEN).await;
    let mut stream = client.stream().await.unwrap();
    // One real request, then 3,000 empty frames (each an empty PublishRequest) in one write.
    stream.send(vec![event("edge.q.tiny", "real")]).await.unwrap();
    stream.send_raw(&vec![0u8; 3000]).await.unwrap();
    stream.finish();
    assert!(accepted(&stream.recv().await.unwrap().results[0]).seq > 0);
    for i in 0..3000 {
        let resp = stream.recv().await.unwrap_or_else(|e| panic!("answer {i}: {e}"));
        assert_eq!(resp.error.map(|e| e.code).as_deref(), Some("bad_request"), "answer {i}");
    }
    relay.shutdown().await;
}
