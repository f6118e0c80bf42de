//! The client against an in-process stand-in for the relay: a QUIC endpoint offering
//! `edgerelay/1` that answers each `PublishRequest` frame with one `Accepted` per event, whose
//! `stream` is the request's token and whose `seq` counts the requests of its stream. Enough to
//! check framing, pipelining, the token rule, reconnection and broken answers without a relay
//! or NATS (tests/it runs the client against the real relay).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use edgerelay_client::proto::{self, event_result::Outcome, framing};
use edgerelay_client::{event, Client, ClientConfig, ClientError};
use prost::Message;

/// What the stand-in does with a stream.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Answers every request.
    Answer,
    /// Answers the first request, then closes the whole connection.
    AnswerThenClose,
    /// Answers the first request with a length prefix that is not a varint.
    Garbage,
}

/// A stand-in relay on a loopback UDP port; returns its address and the CA to trust.
fn stand_in(behaviour: Behaviour) -> (SocketAddr, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    tls.alpn_protocols = vec![proto::ALPN_EDGERELAY.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(serve_stream(conn.clone(), send, recv, behaviour));
                }
            });
        }
    });
    (addr, cert.pem())
}

async fn serve_stream(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    behaviour: Behaviour,
) {
    let decoder = framing::FrameDecoder::new(1 << 20);
    let mut buf = BytesMut::new();
    let mut seq = 0;
    loop {
        while let Ok(Some(frame)) = decoder.decode(&mut buf) {
            let req = proto::PublishRequest::decode(frame).unwrap();
            if let Behaviour::Garbage = behaviour {
                send.write_all(&[0xff; 11]).await.unwrap();
                let _ = send.finish();
                let _ = send.stopped().await;
                return;
            }
            seq += 1;
            let accepted = |e: &proto::Event| proto::EventResult {
                outcome: Some(Outcome::Accepted(proto::Accepted {
                    stream: req.token.clone(),
                    seq,
                    batch: e.subject.clone(),
                    ..Default::default()
                })),
            };
            let answer = proto::PublishResponse {
                results: req.events.iter().map(accepted).collect(),
                error: None,
            };
            send.write_all(&framing::frame(&answer)).await.unwrap();
            if let Behaviour::AnswerThenClose = behaviour {
                // Let the answer leave before the connection goes.
                let _ = send.finish();
                let _ = send.stopped().await;
                conn.close(quinn::VarInt::from_u32(0), b"gone");
                return;
            }
        }
        match recv.read_chunk(64 << 10, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            _ => return,
        }
    }
}

fn config(addr: SocketAddr, ca: String) -> ClientConfig {
    ClientConfig {
        server: addr,
        server_name: "localhost".into(),
        ca_pem: Some(ca),
        token: "secret".into(),
        client_cert: None,
    }
}

/// The `Accepted` of the `i`th result.
fn accepted(answer: &proto::PublishResponse, i: usize) -> &proto::Accepted {
    match &answer.results[i].outcome {
        Some(Outcome::Accepted(a)) => a,
        other => panic!("result {i}: {other:?}"),
    }
}

#[tokio::test]
async fn publish_sends_one_request_with_the_token_and_returns_its_answer() {
    let (addr, ca) = stand_in(Behaviour::Answer);
    let client = Client::connect(config(addr, ca)).await.unwrap();
    let answer = client.publish(vec![event("edge.a", "1"), event("edge.b", "2")]).await.unwrap();
    assert_eq!(answer.results.len(), 2);
    assert_eq!(accepted(&answer, 0).stream, "secret");
    assert_eq!(accepted(&answer, 1).batch, "edge.b");
    client.close();
}

#[tokio::test]
async fn a_stream_pipelines_requests_answers_in_order_and_sends_the_token_once() {
    let (addr, ca) = stand_in(Behaviour::Answer);
    let client = Client::connect(config(addr, ca)).await.unwrap();
    let mut stream = client.stream().await.unwrap();
    for i in 0..5 {
        stream.send(vec![event(&format!("edge.{i}"), "x")]).await.unwrap();
    }
    for i in 0..5u64 {
        let answer = stream.recv().await.unwrap();
        let a = accepted(&answer, 0);
        assert_eq!((a.seq, a.batch.as_str()), (i + 1, format!("edge.{i}").as_str()));
        assert_eq!(a.stream, if i == 0 { "secret" } else { "" }, "request {i}");
    }
    stream.finish();
}

#[tokio::test]
async fn a_lost_connection_is_made_again_by_the_next_publish() {
    let (addr, ca) = stand_in(Behaviour::AnswerThenClose);
    let client = Client::connect(config(addr, ca)).await.unwrap();
    let first = client.connection().await.unwrap();
    client.publish(vec![event("edge.a", "1")]).await.unwrap();
    first.closed().await;
    let answer = client.publish(vec![event("edge.a", "2")]).await.unwrap();
    assert_eq!(accepted(&answer, 0).stream, "secret");
    assert_ne!(client.connection().await.unwrap().stable_id(), first.stable_id());
}

#[tokio::test]
async fn a_broken_answer_is_a_decode_error() {
    let (addr, ca) = stand_in(Behaviour::Garbage);
    let client = Client::connect(config(addr, ca)).await.unwrap();
    let err = client.publish(vec![event("edge.a", "1")]).await.unwrap_err();
    assert!(matches!(err, ClientError::Decode(_)), "{err:?}");
}

#[tokio::test]
async fn an_untrusted_relay_certificate_fails_the_connect() {
    let (addr, _) = stand_in(Behaviour::Answer);
    let (_, other_ca) = stand_in(Behaviour::Answer);
    let err = Client::connect(config(addr, other_ca)).await.err().unwrap();
    assert!(matches!(err, ClientError::Connection(_)), "{err:?}");
}
