//! The HTTP API, whatever the HTTP version: routes, request decoding into [`EventIn`]s, and
//! the answers. HTTPS (h1/h2, [`super::https`]) and HTTP/3 ([`super::quic::h3`]) both call
//! [`HttpApi::handle`]; everything after decoding is the shared [`Ingest`] stage.
//!
//! Routes: `POST /v1/publish/{subject}` (body = one event's payload) and `POST /v1/publish`
//! (many events, `application/json` or `application/x-protobuf`).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use prost::Message;

use super::json::{self, Answer};
use super::{EventIn, Ingest};
use crate::auth::{bearer_token, Credentials, Identity, Peer};
use crate::error::{ErrorCode, Refusal};
use crate::metrics::Protocol;
use crate::proto;

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

/// The routes of the API over the shared ingest stage.
pub struct HttpApi {
    ingest: Arc<Ingest>,
    max_body_bytes: usize,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl HttpApi {
    pub fn new(ingest: Arc<Ingest>, max_body_bytes: usize) -> Self {
        Self { ingest, max_body_bytes }
    }

    /// Largest body any route takes.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes.max(self.ingest.max_event_bytes())
    }

    /// The identity a connection's client certificate proves now, for its next request:
    /// derived again only when a reload changed the auth stage since the last request.
    pub fn peer_identity(&self, peer: &mut Peer) -> Option<Identity> {
        self.ingest.peer_identity(peer)
    }

    /// Counts a connection of `protocol` as open until the guard is dropped.
    pub fn connection_opened(&self, protocol: Protocol) -> crate::metrics::OpenConnection {
        self.ingest.connection_opened(protocol)
    }

    /// Counts and audits a refusal of a request that never reached [`HttpApi::handle`] (its
    /// body was too large to read) from the client at `from`.
    pub fn refused(&self, protocol: Protocol, from: SocketAddr, r: &Refusal) {
        self.ingest.refused(protocol, from, None, None, r);
    }

    /// Answers one request from the client at `from`; `peer` is the connection's
    /// client-certificate identity.
    pub async fn handle<B>(
        &self,
        req: Request<B>,
        from: SocketAddr,
        peer: Option<&Identity>,
    ) -> Response<Full<Bytes>>
    where
        B: Body + Send,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let protocol =
            if req.version() == http::Version::HTTP_3 { Protocol::H3 } else { Protocol::Https };
        let path = req.uri().path();
        let route = if let Some(subject) = path.strip_prefix("/v1/publish/") {
            Some(subject.to_owned())
        } else if path == "/v1/publish" {
            None
        } else {
            let r = Refusal::new(ErrorCode::NotFound, "no such route; POST /v1/publish/{subject}");
            self.ingest.refused(protocol, from, None, None, &r);
            return refusal(&r);
        };
        if req.method() != Method::POST {
            let r = Refusal::new(ErrorCode::MethodNotAllowed, "use POST");
            self.ingest.refused(protocol, from, None, None, &r);
            let mut resp = refusal(&r);
            resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
        // The body is read before anything can refuse the request: an HTTP/2 answer sent
        // before the request body arrived resets the stream, and some clients (curl 7.88)
        // report that as a failure instead of reading the answer. It is bounded by the limit.
        let limit = match route {
            Some(_) => self.ingest.max_event_bytes(),
            None => self.max_body_bytes,
        };
        let (parts, body) = req.into_parts();
        let req = match read_body(&parts.headers, body, limit).await {
            Ok(body) => {
                self.ingest.received(protocol, body.len());
                Request::from_parts(parts, body)
            }
            Err(r) => {
                self.ingest.refused(protocol, from, None, route.as_deref(), &r);
                return refusal(&r);
            }
        };
        // Set once authenticated, so a refusal of the request says whose it was.
        let mut identity = None;
        let result = match &route {
            Some(subject) => self.publish_one(req, subject, protocol, peer, &mut identity).await,
            None => self.publish_many(req, protocol, peer, &mut identity).await,
        };
        result.unwrap_or_else(|r| {
            self.ingest.refused(protocol, from, identity.as_ref(), route.as_deref(), &r);
            refusal(&r)
        })
    }

    async fn authenticate<B>(
        &self,
        req: &Request<B>,
        peer: Option<&Identity>,
    ) -> Result<Identity, Refusal> {
        let bearer = match req.headers().get(header::AUTHORIZATION) {
            None => None,
            Some(v) => Some(v.to_str().ok().and_then(bearer_token).ok_or_else(|| {
                Refusal::new(ErrorCode::Unauthorized, "Authorization must be: Bearer <token>")
            })?),
        };
        self.ingest.authenticate(Credentials { bearer, peer }).await
    }

    async fn publish_one(
        &self,
        req: Request<Bytes>,
        subject: &str,
        protocol: Protocol,
        peer: Option<&Identity>,
        authenticated: &mut Option<Identity>,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        let identity = authenticated.insert(self.authenticate(&req, peer).await?).clone();
        self.ingest.check_subject(&identity, subject)?;
        if let Some(r) = self.ingest.refuse_early() {
            return Err(r);
        }
        let headers = req.headers();
        let id = match headers.get("idempotency-key") {
            Some(v) => v
                .to_str()
                .map_err(|_| Refusal::new(ErrorCode::BadRequest, "Idempotency-Key must be ASCII"))?
                .to_owned(),
            None => String::new(),
        };
        let edge_time_unix_ms = match headers.get("edge-timestamp") {
            Some(v) => v.to_str().ok().and_then(|s| s.trim().parse().ok()).ok_or_else(|| {
                Refusal::new(ErrorCode::BadRequest, "Edge-Timestamp must be unix milliseconds")
            })?,
            None => 0,
        };
        let mut event_headers = std::collections::HashMap::new();
        if let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
            event_headers.insert("content-type".to_owned(), ct.to_owned());
        }
        let payload = req.into_body();
        let event = EventIn {
            subject: subject.to_owned(),
            payload,
            headers: event_headers,
            id,
            edge_time_unix_ms,
        };
        let outcome = self.ingest.publish(protocol, &identity, event).await;
        Ok(match &outcome {
            Ok(_) => json_response(
                StatusCode::ACCEPTED,
                json::encode(&Answer::of(&outcome, self.ingest.names())),
            ),
            Err(r) => refusal(r),
        })
    }

    async fn publish_many(
        &self,
        req: Request<Bytes>,
        protocol: Protocol,
        peer: Option<&Identity>,
        authenticated: &mut Option<Identity>,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        let identity = authenticated.insert(self.authenticate(&req, peer).await?).clone();
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
            .unwrap_or_default();
        let protobuf = match content_type.as_str() {
            PROTOBUF | "application/protobuf" => true,
            JSON => false,
            _ => {
                return Err(Refusal::new(
                    ErrorCode::UnsupportedMediaType,
                    "POST /v1/publish takes application/json or application/x-protobuf",
                ))
            }
        };
        if let Some(r) = self.ingest.refuse_early() {
            return Err(r);
        }
        let body = req.into_body();
        let events = if protobuf {
            super::decode_publish_request(body)?
        } else {
            json::decode_request(&body)?
        };
        self.ingest.check_request(&events)?;
        let outcomes = self.ingest.publish_all(protocol, &identity, events).await;
        // 202 only when every event was taken; otherwise the first refusal's status, so a client
        // that looks only at the status never takes an unacknowledged event for stored.
        let first_refusal = outcomes.iter().find_map(|o| o.as_ref().err());
        let status = first_refusal.map_or(StatusCode::ACCEPTED, |r| status_of(r.code));
        let mut resp = if protobuf {
            let body = proto::PublishResponse {
                results: super::results_of(&outcomes, self.ingest.names()),
                error: None,
            };
            let mut resp = Response::new(Full::new(Bytes::from(body.encode_to_vec())));
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROTOBUF));
            resp
        } else {
            json_response(StatusCode::OK, json::encode_many(&outcomes, self.ingest.names()))
        };
        *resp.status_mut() = status;
        if let Some(r) = first_refusal {
            set_retry_after(&mut resp, r);
        }
        Ok(resp)
    }
}

async fn read_body<B>(headers: &http::HeaderMap, body: B, limit: usize) -> Result<Bytes, Refusal>
where
    B: Body + Send,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let too_large =
        || Refusal::new(ErrorCode::TooLarge, format!("body is larger than {limit} bytes"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(Refusal::new(ErrorCode::BadRequest, format!("reading the body failed: {e}"))),
    }
}

fn status_of(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    resp
}

/// The answer to a refused request: status, JSON error body, `Retry-After` when it helps.
pub fn refusal(r: &Refusal) -> Response<Full<Bytes>> {
    let mut resp = json_response(status_of(r.code), json::encode(&Answer::refused(r)));
    set_retry_after(&mut resp, r);
    if r.code == ErrorCode::Unauthorized {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

fn set_retry_after(resp: &mut Response<Full<Bytes>>, r: &Refusal) {
    if let Some(secs) = r.retry_after_secs() {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
}
