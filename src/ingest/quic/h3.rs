//! The HTTP/3 front-end: the same [`HttpApi`] as HTTPS, over h3 + h3-quinn on the QUIC
//! endpoint (ALPN `h3`), so one UDP port serves both the native protocol and HTTP/3.
//!
//! A request's body reaches the API as a [`hyper::body::Body`] ([`H3Body`]), so HTTP/3 bodies
//! are read, paced and drained by the same code as HTTP/1.1 and HTTP/2 ([`crate::ingest::body`]):
//! nothing is buffered before the request is authenticated. A body dropped before its end
//! (refused past `https.discard_body_bytes`, or stalled) gets STOP_SENDING from quinn (code
//! 0; h3-quinn cannot stop a stream with a read under way). A connection that stalled a request, or is older than
//! `quic.max_connection_age_ms`, gets GOAWAY; its requests under way then have
//! `quic.max_connection_age_grace_ms` to finish before it is closed.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::section::ms;

use crate::auth::{Identity, Peer};
use crate::ingest::budget::Share;
use crate::ingest::http_api::HttpApi;
use crate::shutdown::Shutdown;

pub use edgerelay_proto::ALPN_H3;

type Stream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;
type RecvStream = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;

/// How long an HTTP/3 connection may live.
#[derive(Clone, Copy, Debug)]
pub struct Lifetime {
    /// After this long the connection gets GOAWAY (`None`: never).
    pub max_age: Option<Duration>,
    /// After GOAWAY, how long its requests under way may take before it is closed.
    pub grace: Duration,
}

impl Lifetime {
    /// The lifetime `quic.max_connection_age_ms` and `..._grace_ms` give.
    pub fn of(cfg: &crate::ingest::config::QuicConfig) -> Self {
        Self {
            max_age: (cfg.max_connection_age_ms > 0).then(|| ms(cfg.max_connection_age_ms)),
            grace: ms(cfg.max_connection_age_grace_ms),
        }
    }
}

/// The receiving half of a request stream as a body.
struct H3Body {
    recv: RecvStream,
    ended: bool,
}

/// Serves one QUIC connection that chose HTTP/3, until the client closes it, it reaches its
/// [`Lifetime`], or `stop`.
pub async fn connection(
    conn: quinn::Connection,
    api: Arc<HttpApi>,
    lifetime: Lifetime,
    mut stop: Shutdown,
) {
    let mut peer = Peer::new(super::peer_certificates(&conn).as_deref());
    let from = conn.remote_address();
    let share = api.share(from.ip());
    let quic = conn.clone();
    let mut h3 = match h3::server::builder()
        .max_field_section_size(16 << 10)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn))
        .await
    {
        Ok(c) => c,
        Err(e) => return tracing::debug!(error = %e, "HTTP/3 setup failed"),
    };
    let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    let old_at = lifetime.max_age.map_or(far, |age| Instant::now() + age);
    let mut requests = JoinSet::new();
    // Whether to send GOAWAY and finish: shutdown, age, or a stalled request.
    let goaway = loop {
        tokio::select! {
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    let (api, peer) = (api.clone(), api.peer_identity(&mut peer));
                    let share = share.clone();
                    requests.spawn(async move {
                        match resolver.resolve_request().await {
                            Ok((req, stream)) => {
                                request(req, stream, &api, (from, &share), peer.as_ref()).await
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "HTTP/3 request headers");
                                false
                            }
                        }
                    });
                }
                Ok(None) => break false,
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP/3 connection ended");
                    break false;
                }
            },
            Some(Ok(true)) = requests.join_next() => break true,
            _ = tokio::time::sleep_until(old_at) => break true,
            _ = stop.requested() => break true,
        }
    };
    if goaway {
        // GOAWAY: no new requests; the ones under way get the grace to finish.
        let _ = h3.shutdown(0).await;
        // Then the client closes (its answers delivered); closing first would drop answers not
        // yet sent.
        let finish = async {
            while requests.join_next().await.is_some() {}
            quic.closed().await;
        };
        if tokio::time::timeout(lifetime.grace, finish).await.is_err() {
            requests.abort_all();
            quic.close(quinn::VarInt::from_u32(0x100), b""); // H3_NO_ERROR
        }
    }
    while requests.join_next().await.is_some() {}
}

/// Answers one request; true if it was cut for a stalled body.
async fn request(
    req: Request<()>,
    stream: Stream,
    api: &HttpApi,
    (from, share): (SocketAddr, &Share),
    peer: Option<&Identity>,
) -> bool {
    let (mut send, recv) = stream.split();
    let (head, ()) = req.into_parts();
    let req = Request::from_parts(head, H3Body { recv, ended: false });
    let resp = api.handle(req, from, peer, share).await;
    let stalled = resp.status() == StatusCode::REQUEST_TIMEOUT;
    let (parts, mut body) = resp.into_parts();
    if send.send_response(Response::from_parts(parts, ())).await.is_err() {
        return stalled;
    }
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            if send.send_data(data).await.is_err() {
                return stalled;
            }
        }
    }
    let _ = send.finish().await;
    stalled
}

impl Body for H3Body {
    type Data = Bytes;
    type Error = h3::error::StreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match ready!(self.recv.poll_recv_data(cx)) {
            Ok(Some(mut chunk)) => {
                let n = chunk.remaining();
                Poll::Ready(Some(Ok(Frame::data(chunk.copy_to_bytes(n)))))
            }
            Ok(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Err(e) => {
                self.ended = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}
