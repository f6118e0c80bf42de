//! The native QUIC protocol, ALPN `edgerelay/1`: the connections [`super`] hands over once
//! the handshake picked it.
//!
//! On each bidirectional stream the client writes varint-length-delimited `PublishRequest`
//! frames ([`crate::ingest::framing`]) and reads `PublishResponse` frames back in the same order;
//! many requests may be in flight per stream and many streams per connection. Everything after
//! decoding is the shared [`Ingest`] stage.
//!
//! What a stream does — the in-flight cap, broken framing and its stop codes, end of stream and
//! shutdown — is decided by [`StreamState`] ([`super::stream`]); this module only moves bytes
//! between it, the QUIC stream and the ingest stage. A request that decodes but is wrong (bad
//! protobuf, no token) is answered with an error and the stream goes on.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use prost::Message;
use quinn::VarInt;
use tokio::task::JoinSet;

use super::stream::{Action, StreamState};
use crate::auth::{Identity, Peer, Session};
use crate::error::Refusal;
use crate::ingest::framing::{self, FrameDecoder};
use crate::ingest::{events_of, invalid_request, proto_refusal, results_of, EventIn, Ingest};
use crate::metrics::Protocol;
use crate::proto;
use crate::shutdown::Shutdown;

pub use edgerelay_proto::ALPN_EDGERELAY;

/// CONNECTION_CLOSE code when the relay shuts down.
pub const CONNECTION_SHUTTING_DOWN: u32 = 0x20;
/// Bytes read from a stream at once.
const READ_CHUNK: usize = 64 << 10;

/// What every native connection shares.
pub(super) struct Native {
    ingest: Arc<Ingest>,
    decoder: FrameDecoder,
    max_in_flight: usize,
}

impl Native {
    /// Frames of at most `max_frame_bytes`, at most `max_in_flight` requests unanswered per
    /// stream.
    pub(super) fn new(ingest: Arc<Ingest>, max_frame_bytes: usize, max_in_flight: usize) -> Self {
        Self { ingest, decoder: FrameDecoder::new(max_frame_bytes), max_in_flight }
    }
}

/// Serves one connection that chose `edgerelay/1`: a task per stream, until the client closes
/// the connection or `stop`; then lets the streams finish and closes it with
/// [`CONNECTION_SHUTTING_DOWN`].
pub(super) async fn connection(conn: quinn::Connection, native: Arc<Native>, mut stop: Shutdown) {
    // A client certificate is every stream's credential until a token replaces it.
    let peer = Peer::new(super::peer_certificates(&conn).as_deref());
    let from = conn.remote_address();
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let session = Session::new(peer.clone());
                    streams.spawn(stream(send, recv, native.clone(), from, stop.clone(), session));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "QUIC connection ended");
                    break;
                }
            },
            _ = stop.requested() => break,
        }
        while streams.try_join_next().is_some() {}
    }
    while streams.join_next().await.is_some() {}
    conn.close(VarInt::from_u32(CONNECTION_SHUTTING_DOWN), b"shutting down");
}

/// Serves one stream: carries out what its [`StreamState`] decides.
async fn stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    native: Arc<Native>,
    from: SocketAddr,
    mut stop: Shutdown,
    mut session: Session,
) {
    let mut state = StreamState::new(native.decoder, native.max_in_flight, stop.is_shutdown());
    let mut answers = FuturesUnordered::new();
    loop {
        match state.poll() {
            Action::Decode { id, frame } => {
                let answer = request(frame, from, &mut session, &native).await;
                answers.push(async move { (id, answer.await) });
            }
            Action::Write(answer) => {
                if send.write_all(&framing::frame(&answer)).await.is_err() {
                    return; // the client went away; what it was answered stays answered
                }
            }
            Action::Refuse(r) => {
                native.ingest.refused(Protocol::Quic, from, session.last(), None, &r);
                let _ = send.write_all(&framing::frame(&refused(r))).await;
            }
            Action::Stop(code) => {
                let _ = recv.stop(VarInt::from_u32(code));
            }
            Action::Finish => {
                let _ = send.finish();
                let _ = send.stopped().await;
                return;
            }
            Action::Wait(wait) => tokio::select! {
                Some((id, answer)) = answers.next(), if wait.answers => state.answered(id, answer),
                chunk = recv.read_chunk(READ_CHUNK, true), if wait.read => match chunk {
                    Ok(Some(chunk)) => state.received(&chunk.bytes),
                    Ok(None) => state.end_of_stream(),
                    Err(_) => return, // reset by the client or the connection is gone
                },
                _ = stop.requested(), if wait.shutdown => state.shutdown(),
                // Never reached: a wait always asks for something.
                else => return,
            },
        }
    }
}

/// One request frame: decode, authenticate (a token on the frame replaces the stream's
/// credentials; without one, what the stream presented is checked against the current auth
/// stage), and return the future of its answer. A refused request is counted and audited; an
/// authentication refusal also drops the stream's credentials.
async fn request(
    frame: Bytes,
    from: SocketAddr,
    session: &mut Session,
    native: &Native,
) -> BoxFuture<'static, proto::PublishResponse> {
    native.ingest.received(Protocol::Quic, frame.len());
    match admit(frame, session, native).await {
        Ok((id, events)) => {
            let ingest = native.ingest.clone();
            Box::pin(async move {
                let outcomes = ingest.publish_all(Protocol::Quic, &id, events).await;
                proto::PublishResponse {
                    results: results_of(&outcomes, ingest.names()),
                    error: None,
                }
            })
        }
        Err(r) => {
            native.ingest.refused(Protocol::Quic, from, session.last(), None, &r);
            Box::pin(std::future::ready(refused(r)))
        }
    }
}

/// Decodes a request frame and finds who sent it.
async fn admit(
    frame: Bytes,
    session: &mut Session,
    native: &Native,
) -> Result<(Identity, Vec<EventIn>), Refusal> {
    let req = proto::PublishRequest::decode(frame).map_err(|e| invalid_request(&e))?;
    let token = (!req.token.is_empty()).then_some(req.token.as_str());
    let id = native.ingest.stream_identity(session, token).await?;
    let events = events_of(req);
    native.ingest.check_request(&events)?;
    Ok((id, events))
}

/// A request refused as a whole.
fn refused(r: Refusal) -> proto::PublishResponse {
    proto::PublishResponse { results: Vec::new(), error: Some(proto_refusal(&r)) }
}
