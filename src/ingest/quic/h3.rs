//! The HTTP/3 front-end: the same [`HttpApi`] as HTTPS, over h3 + h3-quinn on the QUIC
//! endpoint (ALPN `h3`), so one UDP port serves both the native protocol and HTTP/3.
//!
//! Request bodies are read up to the API's largest limit and refused with 413 beyond it
//! before more is buffered; the route then applies its own limit.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::task::JoinSet;

use crate::auth::{Identity, Peer};
use crate::error::{ErrorCode, Refusal};
use crate::ingest::http_api::{refusal, HttpApi};
use crate::metrics::Protocol;
use crate::shutdown::Shutdown;

pub use edgerelay_proto::ALPN_H3;

type Stream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Serves one QUIC connection that chose HTTP/3, until the client closes it or `stop`.
pub async fn connection(conn: quinn::Connection, api: Arc<HttpApi>, mut stop: Shutdown) {
    let mut peer = Peer::new(super::peer_certificates(&conn).as_deref());
    let from = conn.remote_address();
    let mut h3 = match h3::server::builder()
        .max_field_section_size(16 << 10)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn))
        .await
    {
        Ok(c) => c,
        Err(e) => return tracing::debug!(error = %e, "HTTP/3 setup failed"),
    };
    let mut requests = JoinSet::new();
    loop {
        tokio::select! {
            accepted = h3.accept() => match accepted {
                Ok(Some(resolver)) => {
                    let (api, peer) = (api.clone(), api.peer_identity(&mut peer));
                    requests.spawn(async move {
                        match resolver.resolve_request().await {
                            Ok((req, stream)) => request(req, stream, &api, from, peer.as_ref()).await,
                            Err(e) => tracing::debug!(error = %e, "HTTP/3 request headers"),
                        }
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP/3 connection ended");
                    break;
                }
            },
            _ = stop.requested() => {
                // GOAWAY: no new requests; the ones under way finish below.
                let _ = h3.shutdown(0).await;
                break;
            }
        }
        while requests.try_join_next().is_some() {}
    }
    while requests.join_next().await.is_some() {}
}

async fn request(
    req: Request<()>,
    mut stream: Stream,
    api: &HttpApi,
    from: SocketAddr,
    peer: Option<&Identity>,
) {
    let limit = api.max_body_bytes();
    let mut body = BytesMut::new();
    let resp = loop {
        match stream.recv_data().await {
            Ok(Some(mut chunk)) => {
                if body.len() + chunk.remaining() > limit {
                    let r = Refusal::new(
                        ErrorCode::TooLarge,
                        format!("body is larger than {limit} bytes"),
                    );
                    api.refused(Protocol::H3, from, &r);
                    break refusal(&r);
                }
                while chunk.has_remaining() {
                    let part = chunk.chunk();
                    body.extend_from_slice(part);
                    let n = part.len();
                    chunk.advance(n);
                }
            }
            Ok(None) => {
                let (parts, ()) = req.into_parts();
                let req = Request::from_parts(parts, Full::new(body.freeze()));
                break api.handle(req, from, peer).await;
            }
            Err(e) => return tracing::debug!(error = %e, "HTTP/3 request body"),
        }
    };
    let (parts, body) = resp.into_parts();
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(never) => match never {},
    };
    if stream.send_response(Response::from_parts(parts, ())).await.is_err() {
        return;
    }
    if !bytes.is_empty() && stream.send_data(bytes).await.is_err() {
        return;
    }
    let _ = stream.finish().await;
}
