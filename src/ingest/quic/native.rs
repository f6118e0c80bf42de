//! The native QUIC protocol, ALPN `edgerelay/1`: the connections [`super`] hands over once
//! the handshake picked it.
//!
//! On each bidirectional stream the client writes varint-length-delimited `PublishRequest`
//! frames ([`crate::ingest::framing`]) and reads `PublishResponse` frames back in the same order;
//! many requests may be in flight per stream and many streams per connection. Everything after
//! decoding is the shared [`Ingest`] stage.
//!
//! A stream whose framing is broken (a length over the limit, a malformed prefix) gets a
//! `PublishResponse` whose `error` says why, after the answers to its earlier requests; then the
//! relay finishes its side and stops the client's side with STOP_SENDING and the code
//! [`STREAM_FRAME_TOO_LARGE`] or [`STREAM_MALFORMED`]. The connection and its other streams go
//! on. A request that decodes but is wrong (bad protobuf, no token) is answered with an error
//! and the stream goes on.

use std::sync::Arc;

use bytes::Bytes;
use bytes::BytesMut;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use prost::Message;
use quinn::VarInt;
use tokio::task::JoinSet;

use crate::auth::{Credentials, Identity};
use crate::error::{ErrorCode, Refusal};
use crate::ingest::framing::{self, FrameDecoder, FrameError};
use crate::ingest::{events_of, proto_refusal, results_of, EventIn, Ingest};
use crate::metrics::Protocol;
use crate::proto;
use crate::shutdown::Shutdown;

/// ALPN of the native protocol.
pub const ALPN_EDGERELAY: &[u8] = b"edgerelay/1";
/// STOP_SENDING / RESET code: a frame's length prefix exceeded the limit.
pub const STREAM_FRAME_TOO_LARGE: u32 = 0x10;
/// STOP_SENDING / RESET code: a frame's length prefix was malformed.
pub const STREAM_MALFORMED: u32 = 0x11;
/// STOP_SENDING code: the relay is draining and reads no more requests on this stream.
pub const STREAM_SHUTTING_DOWN: u32 = 0x12;
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
    // A configured client certificate is every stream's identity until a token replaces it.
    let peer = native.ingest.peer_identity(super::peer_certificates(&conn).as_deref());
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    streams.spawn(stream(send, recv, native.clone(), stop.clone(), peer.clone()));
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

/// Serves one stream: reads frames, answers each request in order. On shutdown it stops
/// reading (STOP_SENDING [`STREAM_SHUTTING_DOWN`]) and answers what it has read.
async fn stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    native: Arc<Native>,
    mut stop: Shutdown,
    mut identity: Option<Identity>,
) {
    let mut buf = BytesMut::new();
    let mut answers = FuturesOrdered::new();
    let mut reading = !stop.is_shutdown();
    let mut broken: Option<(FrameError, u32)> = None;
    loop {
        // Take in the buffered frames, up to the in-flight limit: a chunk full of tiny frames
        // must not queue more answers than that.
        while broken.is_none() && answers.len() < native.max_in_flight {
            match native.decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let answer = request(frame, &mut identity, &native).await;
                    answers.push_back(answer);
                }
                Ok(None) => break,
                Err(e) => {
                    let code = match e {
                        FrameError::TooLong { .. } => STREAM_FRAME_TOO_LARGE,
                        FrameError::BadLength => STREAM_MALFORMED,
                    };
                    broken = Some((e, code));
                    reading = false;
                    buf.clear();
                }
            }
        }
        let can_read = reading && answers.len() < native.max_in_flight;
        tokio::select! {
            Some(answer) = answers.next(), if !answers.is_empty() => {
                if send.write_all(&framing::frame(&answer)).await.is_err() {
                    return; // the client went away; what it was answered stays answered
                }
            }
            chunk = recv.read_chunk(READ_CHUNK, true), if can_read => match chunk {
                Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                Ok(None) => reading = false,
                Err(_) => return, // reset by the client or the connection is gone
            },
            _ = stop.requested(), if reading => {
                reading = false;
                let _ = recv.stop(VarInt::from_u32(STREAM_SHUTTING_DOWN));
            }
            else => break,
        }
    }
    if let Some((e, code)) = broken {
        let code_str = match e {
            FrameError::TooLong { .. } => ErrorCode::TooLarge,
            FrameError::BadLength => ErrorCode::BadRequest,
        };
        let r = Refusal::new(code_str, e.to_string());
        native.ingest.refused(Protocol::Quic, identity.as_ref(), None, &r);
        let answer = refused(r);
        let _ = send.write_all(&framing::frame(&answer)).await;
        let _ = recv.stop(VarInt::from_u32(code));
    }
    let _ = send.finish();
    let _ = send.stopped().await;
}

/// One request frame: authenticate (a token on the frame replaces the stream's identity),
/// decode, and return the future of its answer. A refused request is counted and audited; an
/// authentication refusal also drops the stream's identity.
async fn request(
    frame: Bytes,
    identity: &mut Option<Identity>,
    native: &Native,
) -> BoxFuture<'static, proto::PublishResponse> {
    native.ingest.received(Protocol::Quic, frame.len());
    match admit(frame, identity, native).await {
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
            native.ingest.refused(Protocol::Quic, identity.as_ref(), None, &r);
            if r.code == ErrorCode::Unauthorized {
                *identity = None;
            }
            Box::pin(std::future::ready(refused(r)))
        }
    }
}

/// Decodes a request frame and finds who sent it.
async fn admit(
    frame: Bytes,
    identity: &mut Option<Identity>,
    native: &Native,
) -> Result<(Identity, Vec<EventIn>), Refusal> {
    let req = proto::PublishRequest::decode(frame)
        .map_err(|e| Refusal::new(ErrorCode::BadRequest, format!("invalid PublishRequest: {e}")))?;
    if !req.token.is_empty() {
        *identity = None;
        let creds = Credentials { bearer: Some(&req.token), peer: None };
        *identity = Some(native.ingest.authenticate(creds).await?);
    }
    let id = identity.clone().ok_or_else(|| {
        Refusal::new(
            ErrorCode::Unauthorized,
            "missing credentials: the first request of a stream must carry a token",
        )
        .because("missing_token")
    })?;
    id.check_current()?;
    let events = events_of(req);
    native.ingest.check_request(&events)?;
    Ok((id, events))
}

/// A request refused as a whole.
fn refused(r: Refusal) -> proto::PublishResponse {
    proto::PublishResponse { results: Vec::new(), error: Some(proto_refusal(&r)) }
}
