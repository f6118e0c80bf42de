//! The native QUIC protocol, ALPN `edgerelay/1`: the connections [`super`] hands over once
//! the handshake picked it.
//!
//! On each bidirectional stream the client writes varint-length-delimited `PublishRequest`
//! frames ([`crate::ingest::framing`]) and reads `PublishResponse` frames back in the same order;
//! many requests may be in flight per stream and many streams per connection. Everything after
//! decoding is the shared [`Ingest`] stage.
//!
//! What a stream does — the in-flight cap, the pre-auth limit, slow frames, broken framing and
//! its stop codes, end of stream and shutdown — is decided by [`StreamState`]
//! ([`super::stream`]); this module only moves bytes between it, the QUIC stream and the
//! ingest stage, and keeps the clock. A frame is read token first
//! ([`edgerelay_proto::request`]): its token is found and its events counted (and refused past
//! the limit) before one event is decoded, and the stream is authenticated before the events
//! are. A request that decodes but is wrong (bad protobuf, no token) is answered with an error
//! and the stream goes on.
//!
//! A connection ends when the client closes it, when the relay drains
//! ([`CONNECTION_SHUTTING_DOWN`]), when it is older than `quic.max_connection_age_ms`
//! ([`CONNECTION_GOING_AWAY`]: its streams stop reading and answer what they read first, as in
//! a drain, for at most `quic.max_connection_age_grace_ms`), or when its last stream was stopped as too slow ([`CONNECTION_STALLED`]).

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use edgerelay_proto::request;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use prost::Message;
use quinn::VarInt;
use tokio::task::JoinSet;

use super::stream::{Action, Limits, StreamState};
use crate::auth::{Identity, Peer, Session};
use crate::error::{ErrorCode, Refusal};
use crate::ingest::budget::{Held, Share};
use crate::ingest::framing;
use crate::ingest::{
    events_of, invalid_request, proto_refusal, results, scan_publish_request, EventIn, Ingest,
    DECODED_EVENT_BYTES,
};
use crate::metrics::Protocol;
use crate::proto;
use crate::shutdown::{self, Shutdown};

pub use edgerelay_proto::ALPN_EDGERELAY;

pub use edgerelay_proto::{CONNECTION_GOING_AWAY, CONNECTION_SHUTTING_DOWN};
/// CONNECTION_CLOSE code of a connection whose last streams were stopped as too slow.
pub const CONNECTION_STALLED: u32 = 0x22;

/// What every native connection shares.
pub(super) struct Native {
    ingest: Arc<Ingest>,
    limits: Limits,
    /// Connections older than this go away (`None`: never)...
    max_age: Option<Duration>,
    /// ...after letting their streams finish for at most this long.
    age_grace: Duration,
}

/// How a stream ended, for its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// Stopped because a frame was too slow.
    TooSlow,
    /// Anything else.
    Done,
}

impl Native {
    /// Streams bounded by `limits`; connections go away after `max_age` (zero: never), their
    /// streams given `age_grace` to finish.
    pub(super) fn new(
        ingest: Arc<Ingest>,
        limits: Limits,
        max_age: Duration,
        age_grace: Duration,
    ) -> Self {
        let max_age = (!max_age.is_zero()).then_some(max_age);
        Self { ingest, limits, max_age, age_grace }
    }
}

/// Serves one connection that chose `edgerelay/1`: a task per stream, until the client closes
/// the connection, `stop`, its maximum age, or its last stream stalled; then lets the streams
/// finish (a drain: they stop reading and answer what they read) and closes it with the code
/// that says why.
pub(super) async fn connection(conn: quinn::Connection, native: Arc<Native>, mut stop: Shutdown) {
    // A client certificate is every stream's credential until a token replaces it.
    let mut peer = Peer::new(super::peer_certificates(&conn).as_deref());
    let authenticated = native.ingest.peer_identity(&mut peer).is_some();
    let from = conn.remote_address();
    let share = native.ingest.share(from.ip());
    let (drain, draining) = shutdown::channel();
    let age = async {
        match native.max_age {
            Some(age) => tokio::time::sleep(age).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(age);
    let mut streams = JoinSet::new();
    let (code, reason): (u32, &[u8]) = loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let session = Session::new(peer.clone());
                    let share = share.clone();
                    let stream = Stream { send, recv, from, session, authenticated, share };
                    streams.spawn(stream.serve(native.clone(), draining.clone()));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "QUIC connection ended");
                    break (CONNECTION_SHUTTING_DOWN, b"shutting down");
                }
            },
            Some(ended) = streams.join_next() => {
                if matches!(ended, Ok(Ended::TooSlow)) && streams.is_empty() {
                    break (CONNECTION_STALLED, b"stalled");
                }
            }
            () = &mut age => break (CONNECTION_GOING_AWAY, b"going away: reconnect"),
            _ = stop.requested() => break (CONNECTION_SHUTTING_DOWN, b"shutting down"),
        }
    };
    drain.signal();
    let finished = async { while streams.join_next().await.is_some() {} };
    if code == CONNECTION_GOING_AWAY {
        // Streams still busy after the grace are cut by the close (their tasks are aborted
        // when `streams` drops): their clients retry with the same idempotency keys.
        let _ = tokio::time::timeout(native.age_grace, finished).await;
    } else {
        finished.await;
    }
    conn.close(VarInt::from_u32(code), reason);
}

/// One stream and what it is served with.
struct Stream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    from: SocketAddr,
    session: Session,
    /// The connection's certificate names an identity.
    authenticated: bool,
    /// The connection's share of the memory budget.
    share: Share,
}

impl Stream {
    /// Serves the stream: carries out what its [`StreamState`] decides.
    async fn serve(self, native: Arc<Native>, mut stop: Shutdown) -> Ended {
        let Self { mut send, mut recv, from, mut session, authenticated, share } = self;
        let mut state: StreamState<Bytes> =
            StreamState::new(native.limits, authenticated, stop.is_shutdown());
        // What the stream's buffer holds of the memory budget.
        let mut reading = share.hold();
        let mut answers = FuturesUnordered::new();
        loop {
            match state.poll(Instant::now()) {
                Action::Decode { id, frame } => {
                    let held = reading.split_off(frame.len());
                    reading.shrink_to(state.buffered());
                    let answer = request(frame, held, from, &mut session, &native).await;
                    state.authenticated(session.last().is_some());
                    answers.push(async move { (id, answer.await) });
                }
                Action::Authenticate { head } => {
                    state.head_checked(authenticate_head(&head, &mut session, &native).await);
                }
                Action::Write(answer) => {
                    if send.write_all(&answer).await.is_err() {
                        return Ended::Done; // the client went away; what it was answered stays
                    }
                }
                Action::Refuse(r) => {
                    native.ingest.refused(Protocol::Quic, from, session.last(), None, &r);
                    let _ = send.write_all(&refused(r)).await;
                }
                Action::Stop(code) => {
                    let _ = recv.stop(VarInt::from_u32(code));
                }
                Action::Finish => {
                    let _ = send.finish();
                    let _ = send.stopped().await;
                    return if state.too_slow() { Ended::TooSlow } else { Ended::Done };
                }
                // The read is reserved before it happens; with no room in the budget the
                // stream waits (flow control holds the client back) and tries again.
                Action::Wait(wait) => {
                    let room = wait.read > 0 && reading.cover(state.buffered() + wait.read).is_ok();
                    let read = if room { wait.read } else { 0 };
                    tokio::select! {
                    Some((id, answer)) = answers.next(), if wait.answers => {
                        state.answered(id, answer)
                    }
                    chunk = recv.read_chunk(read, true), if read > 0 => match chunk {
                        Ok(Some(chunk)) => {
                            native.ingest.received(Protocol::Quic, chunk.bytes.len());
                            state.received(&chunk.bytes, Instant::now());
                            reading.shrink_to(state.buffered());
                        }
                        Ok(None) => state.end_of_stream(),
                        Err(_) => return Ended::Done, // reset by the client, or connection gone
                    },
                    () = tokio::time::sleep(BUDGET_RETRY), if wait.read > 0 && !room => {
                        state.held(BUDGET_RETRY);
                    }
                    _ = stop.requested(), if wait.shutdown => state.shutdown(),
                    // The frame under way is due: poll again.
                    () = sleep_until(wait.deadline), if wait.deadline.is_some() => {}
                    // Never reached: a wait always asks for something.
                    else => return Ended::Done,
                    }
                }
            }
        }
    }
}

/// How long a stream the memory budget has no room for waits before it tries to read again.
const BUDGET_RETRY: Duration = Duration::from_millis(20);

/// Sleeps until `deadline` (forever without one).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Authenticates a stream from the head of a frame over the pre-auth limit: its token must be
/// there (written first).
async fn authenticate_head(
    head: &[u8],
    session: &mut Session,
    native: &Native,
) -> Result<(), Refusal> {
    let Some(token) = request::token_in_head(head) else {
        return Err(Refusal::new(
            ErrorCode::Unauthorized,
            format!(
                "the first frame of a stream must be at most {} bytes or carry its token first",
                head.len()
            ),
        )
        .because("token_not_first"));
    };
    native.ingest.stream_identity(session, Some(token)).await.map(drop)
}

/// One request frame: find its token and count its events, authenticate (a token on the frame
/// replaces the stream's credentials; without one, what the stream presented is checked
/// against the current auth stage), decode, and return the future of its answer. A refused
/// request is counted and audited; an authentication refusal also drops the stream's
/// credentials.
async fn request(
    frame: Bytes,
    mut held: Held,
    from: SocketAddr,
    session: &mut Session,
    native: &Native,
) -> BoxFuture<'static, Bytes> {
    match admit(frame, &mut held, session, native).await {
        Ok((id, events)) => {
            let ingest = native.ingest.clone();
            Box::pin(async move {
                let outcomes = ingest.publish_all(Protocol::Quic, &id, events).await;
                drop(held); // the frame and its events, held until answered
                let mut answer = BytesMut::new();
                results::encode(&outcomes, ingest.names(), true, &mut answer);
                answer.freeze()
            })
        }
        Err(r) => {
            native.ingest.refused(Protocol::Quic, from, session.last(), None, &r);
            Box::pin(std::future::ready(refused(r)))
        }
    }
}

/// Finds who sent a request frame, then decodes it: the token and the event count come from a
/// scan of the frame's fields, so no event is decoded before the stream is authenticated, and
/// none at all past the per-request limit.
async fn admit(
    frame: Bytes,
    held: &mut Held,
    session: &mut Session,
    native: &Native,
) -> Result<(Identity, Vec<EventIn>), Refusal> {
    let scan = scan_publish_request(&frame, native.ingest.max_events_per_request())?;
    let id = native.ingest.stream_identity(session, scan.token).await?;
    held.grow(scan.events * DECODED_EVENT_BYTES)?;
    let req = proto::PublishRequest::decode(frame).map_err(|e| invalid_request(&e))?;
    let events = events_of(req);
    native.ingest.check_request(&events)?;
    Ok((id, events))
}

/// A request refused as a whole, framed.
fn refused(r: Refusal) -> Bytes {
    framing::frame(&proto::PublishResponse { results: Vec::new(), error: Some(proto_refusal(&r)) })
}
