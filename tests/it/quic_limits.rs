//! What an unauthenticated or slow native-protocol peer can make the relay hold, with real
//! QUIC clients against a real nats-server: the pre-auth frame limit and token-first frames,
//! the event count checked before decoding, frame deadlines and minimum rates, and the
//! maximum connection age with the client reconnecting.

use std::time::Duration;

use bytes::BytesMut;
use edgerelay::ingest::framing;
use edgerelay::proto::{self, event_result::Outcome};
use edgerelay_client::{event, ClientError};
use prost::Message;

use crate::support::*;

/// The bytes the relay read on native QUIC streams.
const QUIC_RECEIVED: &str = "edgerelay_received_bytes_total{protocol=\"quic\"}";

/// The next answer on a raw stream, within a few seconds.
async fn answer(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> proto::PublishResponse {
    let decoder = framing::FrameDecoder::new(1 << 20);
    loop {
        if let Some(frame) = decoder.decode(buf).unwrap() {
            return proto::PublishResponse::decode(frame).unwrap();
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), recv.read_chunk(1 << 16, true))
            .await
            .expect("an answer in time")
            .unwrap()
            .expect("an answer before the end of the stream");
        buf.extend_from_slice(&chunk.bytes);
    }
}

fn reason(answer: &proto::PublishResponse) -> &str {
    &answer.error.as_ref().expect("a refusal").reason
}

fn accepted(answer: &proto::PublishResponse) -> bool {
    !answer.results.is_empty()
        && answer.results.iter().all(|r| matches!(r.outcome, Some(Outcome::Accepted(_))))
}

/// Waits until the relay stops the client's side of `send`; its STOP_SENDING code.
async fn stopped(send: &mut quinn::SendStream) -> u64 {
    let code = tokio::time::timeout(Duration::from_secs(10), send.stopped()).await;
    code.expect("stopped in time").unwrap().expect("a STOP_SENDING code").into_inner()
}

#[tokio::test]
async fn a_large_frame_announced_without_a_token_is_refused_after_the_pre_auth_limit() {
    let (_nats, _setup, relay, client, conn) = start_quic_relay(|_| {}).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // 1 MiB announced, 200 KiB sent at once, no token anywhere.
    let mut frame = BytesMut::new();
    framing::put_len(1 << 20, &mut frame);
    frame.extend_from_slice(&vec![0x0a; 200 << 10]);
    let writer = tokio::spawn(async move {
        let _ = send.write_all(&frame).await;
        send
    });
    let refusal = answer(&mut recv, &mut BytesMut::new()).await;
    assert_eq!(reason(&refusal), "token_not_first");
    assert_eq!(refusal.error.as_ref().unwrap().code, "unauthorized");
    let mut send = writer.await.unwrap();
    assert_eq!(stopped(&mut send).await, 0x13);
    let read = metric(&relay, QUIC_RECEIVED).await;
    assert!(read <= (16 << 10) + 10, "read {read} bytes of an unauthenticated frame");

    // The connection goes on.
    assert!(accepted(&client.publish(vec![event("edge.q", "after")]).await.unwrap()));
    relay.shutdown().await;
}

#[tokio::test]
async fn a_100_kb_first_frame_works_token_first_and_an_old_client_gets_a_clear_refusal() {
    let (_nats, setup, relay) = start_relay(|_| {}).await;
    let client = setup.quic_client(&relay, TOKEN).await;
    // 30 events of 3,500 bytes (the test relay's https.max_event_bytes is 4096): a ~100 KB
    // frame, far over the pre-auth limit.
    let big = || (0..30).map(|_| event("edge.q", vec![b'x'; 3500])).collect::<Vec<_>>();
    let first = client.publish(big()).await.unwrap();
    assert!(accepted(&first), "{first:?}");

    // An old client encodes with prost: events first, token last.
    let old = |events| framing::frame(&proto::PublishRequest { events, token: TOKEN.into() });
    let conn = client.connection().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&old(vec![event("edge.q", "small")])).await.unwrap();
    assert!(accepted(&answer(&mut recv, &mut BytesMut::new()).await));
    // Authenticated now: a large frame without its token first is fine on this stream.
    send.write_all(&old(big())).await.unwrap();
    let mut buf = BytesMut::new();
    assert!(accepted(&answer(&mut recv, &mut buf).await));

    // On a new stream the same large frame comes before any token.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let frame = old(big());
    let writer = tokio::spawn(async move { send.write_all(&frame).await });
    let refusal = answer(&mut recv, &mut BytesMut::new()).await;
    assert_eq!(reason(&refusal), "token_not_first");
    let message = &refusal.error.as_ref().unwrap().message;
    assert!(message.contains("must be at most 16384 bytes or carry its token first"), "{message}");
    let _ = writer.await;
    relay.shutdown().await;
}

#[tokio::test]
async fn a_frame_of_a_million_empty_events_is_refused_without_decoding_them() {
    let (_nats, _setup, relay, _client, conn) =
        start_quic_relay(|c| c.quic.max_frame_bytes = 4 << 20).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // Token first, then 1,000,001 empty events (two bytes each): ~2 MB that would decode to
    // ~170 MB of `Event`s.
    let mut body = BytesMut::new();
    prost::encoding::string::encode(2, &TOKEN.to_owned(), &mut body);
    body.extend_from_slice(&[0x0a, 0x00].repeat(1_000_001));
    let mut frame = BytesMut::new();
    framing::put_len(body.len() as u64, &mut frame);
    frame.extend_from_slice(&body);
    let writer = tokio::spawn(async move { send.write_all(&frame).await });
    let refusal = answer(&mut recv, &mut BytesMut::new()).await;
    assert_eq!(reason(&refusal), "too_many_events");
    assert_eq!(refusal.error.as_ref().unwrap().code, "too_large");
    writer.await.unwrap().unwrap();
    relay.shutdown().await;
}

#[tokio::test]
async fn a_stalled_frame_is_stopped_at_the_timeout_and_its_connection_closed() {
    let (_nats, _setup, relay, _client, conn) =
        start_quic_relay(|c| c.quic.frame_timeout_ms = 300).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut first = BytesMut::new();
    proto::request::encode_token_first(
        &proto::PublishRequest { events: vec![event("edge.q", "ok")], token: TOKEN.into() },
        &mut first,
    );
    send.write_all(&first).await.unwrap();
    // Then the start of a frame that never completes.
    let mut stall = BytesMut::new();
    framing::put_len(100, &mut stall);
    stall.extend_from_slice(&[0x0a; 10]);
    send.write_all(&stall).await.unwrap();
    let mut buf = BytesMut::new();
    assert!(accepted(&answer(&mut recv, &mut buf).await));
    assert_eq!(reason(&answer(&mut recv, &mut buf).await), "frame_timeout");
    assert_eq!(stopped(&mut send).await, 0x14);
    // Its only stream stalled: the connection is closed as stalled.
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.unwrap();
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code.into_inner() == 0x22),
        "{closed:?}"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn a_trickle_below_the_minimum_rate_is_stopped() {
    let (_nats, _setup, relay, _client, conn) = start_quic_relay(|c| {
        c.quic.frame_timeout_ms = 300;
        c.quic.frame_min_bytes_per_sec = 1000;
    })
    .await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut start = BytesMut::new();
    framing::put_len(1000, &mut start);
    send.write_all(&start).await.unwrap();
    // One byte every 100 ms: never a 300 ms gap, ~10 bytes/s.
    let trickle = tokio::spawn(async move {
        for _ in 0..200 {
            if send.write_all(&[0x0a]).await.is_err() {
                return Some(send);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    });
    assert_eq!(reason(&answer(&mut recv, &mut BytesMut::new()).await), "frame_too_slow");
    let mut send = trickle.await.unwrap().expect("the trickle was stopped");
    assert_eq!(stopped(&mut send).await, 0x14);
    relay.shutdown().await;
}

#[tokio::test]
async fn a_connection_past_its_max_age_answers_then_goes_away_and_the_client_reconnects() {
    let (_nats, _setup, relay, client, conn) =
        start_quic_relay(|c| c.quic.max_connection_age_ms = 1000).await;
    // A request read before the age is answered.
    let mut stream = client.stream().await.unwrap();
    stream.send(vec![event("edge.q", "before")]).await.unwrap();
    assert!(accepted(&stream.recv().await.unwrap()));
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.unwrap();
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code.into_inner() == 0x21),
        "{closed:?}"
    );
    // The open stream says the relay went away, not that something failed.
    let err = stream.send(vec![event("edge.q", "late")]).await.err();
    let err = match err {
        Some(e) => e,
        None => stream.recv().await.unwrap_err(),
    };
    assert!(matches!(err, ClientError::GoingAway(_)), "{err:?}");

    // Publishing across several ages: every request is answered, on new connections.
    let first = conn.stable_id();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(2500);
    while tokio::time::Instant::now() < deadline {
        let answer = client.publish(vec![event("edge.q", "again")]).await.unwrap();
        assert!(accepted(&answer), "{answer:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(client.connection().await.unwrap().stable_id(), first);
    relay.shutdown().await;
}
