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
use http_body_util::Full;
use hyper::body::Body;

use super::body::{self, BodyLimits};
use super::budget::{Held, Share};
use super::json::{self, Answer};
use super::{EventIn, Ingest};
use crate::auth::{bearer_token, Credentials, Identity, Peer};
use crate::error::{ErrorCode, Refusal};
use crate::metrics::Protocol;

const PROTOBUF: &str = "application/x-protobuf";
const JSON: &str = "application/json";

/// The routes of the API over the shared ingest stage.
pub struct HttpApi {
    ingest: Arc<Ingest>,
    limits: BodyLimits,
}

/// What a request asks for, known from its head.
enum Route {
    /// `POST /v1/publish/{subject}`: the body is one event's payload.
    One(String),
    /// `POST /v1/publish`: the body is many events, protobuf or JSON.
    Many { protobuf: bool },
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl HttpApi {
    pub fn new(ingest: Arc<Ingest>, limits: BodyLimits) -> Self {
        Self { ingest, limits }
    }

    /// The identity a connection's client certificate proves now, for its next request:
    /// derived again only when a reload changed the auth stage since the last request.
    pub fn peer_identity(&self, peer: &mut Peer) -> Option<Identity> {
        self.ingest.peer_identity(peer)
    }

    /// The memory budget's share of a new connection from `peer`.
    pub fn share(&self, peer: std::net::IpAddr) -> Share {
        self.ingest.share(peer)
    }

    /// The shared ingest stage.
    pub fn ingest(&self) -> &Arc<Ingest> {
        &self.ingest
    }

    /// Counts a connection of `protocol` as open until the guard is dropped.
    pub fn connection_opened(&self, protocol: Protocol) -> crate::metrics::OpenConnection {
        self.ingest.connection_opened(protocol)
    }

    /// Answers one request from the client at `from`; `peer` is the connection's
    /// client-certificate identity. Route, method, credentials and (for one event) the
    /// subject are checked from the head before any of the body is read: a refused request's
    /// body is drained and dropped ([`body::discard`]), never buffered.
    pub async fn handle<B>(
        &self,
        req: Request<B>,
        from: SocketAddr,
        peer: Option<&Identity>,
        share: &Share,
    ) -> Response<Full<Bytes>>
    where
        B: Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let protocol =
            if req.version() == http::Version::HTTP_3 { Protocol::H3 } else { Protocol::Https };
        let (head, body) = req.into_parts();
        // Set once authenticated, so a refusal of the request says whose it was.
        let mut identity = None;
        let route = match self.admit(&head, peer, &mut identity).await {
            Ok(route) => route,
            Err((r, subject)) => {
                self.ingest.refused(protocol, from, identity.as_ref(), subject.as_deref(), &r);
                self.discard(protocol, &head, body);
                let mut resp = refusal(&r);
                if r.code == ErrorCode::MethodNotAllowed {
                    resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
                }
                return resp;
            }
        };
        let Some(identity) = identity else {
            let r = Refusal::new(ErrorCode::Internal, "admitted without an identity");
            return refusal(&r);
        };
        let (limit, subject) = match &route {
            Route::One(subject) => (self.ingest.max_event_bytes(), Some(subject.as_str())),
            Route::Many { .. } => (self.limits.max_body_bytes, None),
        };
        let (bytes, mut held) =
            match body::read(&head.headers, body, limit, self.limits.pace, share).await {
                Ok(read) => read,
                Err(unread) => {
                    self.ingest.refused(protocol, from, Some(&identity), subject, &unread.refusal);
                    if let Some(rest) = unread.rest {
                        self.discard(protocol, &head, rest);
                    }
                    return refusal(&unread.refusal);
                }
            };
        self.ingest.received(protocol, bytes.len());
        let req = Request::from_parts(head, bytes);
        let result = match &route {
            Route::One(subject) => self.publish_one(req, subject, protocol, &identity).await,
            Route::Many { protobuf } => {
                self.publish_many(req, *protobuf, protocol, &identity, &mut held).await
            }
        };
        result.unwrap_or_else(|r| {
            self.ingest.refused(protocol, from, Some(&identity), subject, &r);
            refusal(&r)
        })
    }

    /// Everything checked from the head of a request: route, method, credentials, the subject
    /// of a one-event request, the content type of a multi-event one, and whether the relay
    /// takes requests now. A refusal comes with the subject it was for; `identity` is set
    /// once the credentials are good.
    async fn admit(
        &self,
        head: &http::request::Parts,
        peer: Option<&Identity>,
        identity: &mut Option<Identity>,
    ) -> Result<Route, (Refusal, Option<String>)> {
        let path = head.uri.path();
        let route = if let Some(subject) = path.strip_prefix("/v1/publish/") {
            Route::One(subject.to_owned())
        } else if path == "/v1/publish" {
            Route::Many { protobuf: false }
        } else {
            let r = Refusal::new(ErrorCode::NotFound, "no such route; POST /v1/publish/{subject}");
            return Err((r, None));
        };
        let subject = match &route {
            Route::One(subject) => Some(subject.clone()),
            Route::Many { .. } => None,
        };
        let with_subject = |r| (r, subject.clone());
        if head.method != Method::POST {
            return Err(with_subject(Refusal::new(ErrorCode::MethodNotAllowed, "use POST")));
        }
        let who = self.authenticate(&head.headers, peer).await.map_err(with_subject)?;
        let who = identity.insert(who);
        let route = match route {
            Route::One(subject) => {
                self.ingest.check_subject(who, &subject).map_err(with_subject)?;
                Route::One(subject)
            }
            Route::Many { .. } => Route::Many {
                protobuf: content_type_is_protobuf(&head.headers).map_err(with_subject)?,
            },
        };
        match self.ingest.refuse_early() {
            Some(r) => Err(with_subject(r)),
            None => Ok(route),
        }
    }

    /// Drains a refused request's body on a task of its own, counting what it drops. Not an
    /// HTTP/1.1 body the client holds back for `100 Continue`: the answer went out instead of
    /// it, so the client may never send the body; dropped, hyper closes the connection after
    /// the answer rather than read the client's next bytes as this body.
    fn discard<B>(&self, protocol: Protocol, head: &http::request::Parts, body: B)
    where
        B: Body + Send + Unpin + 'static,
        B::Data: Send,
    {
        let expects_continue = head.version <= http::Version::HTTP_11
            && head
                .headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !expects_continue {
            body::discard(body, self.limits, self.ingest.discarded(protocol));
        }
    }

    async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        peer: Option<&Identity>,
    ) -> Result<Identity, Refusal> {
        let bearer = match headers.get(header::AUTHORIZATION) {
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
        identity: &Identity,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
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
        let outcome = self.ingest.publish(protocol, identity, event).await;
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
        protobuf: bool,
        protocol: Protocol,
        identity: &Identity,
        held: &mut Held,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        let body = req.into_body();
        // What decoding allocates is reserved first: a JSON body's payloads are copies.
        let copies = if protobuf { 0 } else { body.len() };
        held.grow(self.ingest.decoded_bytes(body.len()) + copies)?;
        let events = if protobuf {
            super::decode_publish_request(body, self.ingest.max_events_per_request())?
        } else {
            json::decode_request(&body, self.ingest.max_events_per_request())?
        };
        self.ingest.check_request(&events)?;
        let outcomes = self.ingest.publish_all(protocol, identity, events).await;
        // 202 only when every event was taken; otherwise the first refusal's status, so a client
        // that looks only at the status never takes an unacknowledged event for stored.
        let first_refusal = outcomes.iter().find_map(|o| o.as_ref().err());
        let status = first_refusal.map_or(StatusCode::ACCEPTED, |r| status_of(r.code));
        let mut resp = if protobuf {
            let mut body = Vec::new();
            super::results::encode(&outcomes, self.ingest.names(), false, &mut body);
            let mut resp = Response::new(Full::new(Bytes::from(body)));
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

/// Whether a multi-event body is protobuf (else JSON), from its `Content-Type`.
fn content_type_is_protobuf(headers: &http::HeaderMap) -> Result<bool, Refusal> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default();
    match content_type.as_str() {
        PROTOBUF | "application/protobuf" => Ok(true),
        JSON => Ok(false),
        _ => Err(Refusal::new(
            ErrorCode::UnsupportedMediaType,
            "POST /v1/publish takes application/json or application/x-protobuf",
        )),
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
