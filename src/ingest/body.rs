//! Reading HTTP request bodies from peers, whatever the HTTP version: the one place every body
//! byte the relay keeps goes through ([`read`], and [`Buffered::push`] in it), and the one
//! place bodies it will not keep are drained ([`discard`]).
//!
//! Every read is paced ([`Pace`], sans-IO, in [`super::pace`]): the next bytes must arrive within
//! `https.body_timeout_ms` of the last ones, and after that long the body must average at
//! least `https.body_min_bytes_per_sec`. A body that misses either is cut: the request is
//! answered 408 `request_timeout` and the rest of its body is dropped (the stream reset, the
//! HTTP/1.1 connection closed).
//!
//! A request refused before its body is read (401, 403, 404, 413 from `Content-Length`, …)
//! is answered at once, and its body is read and dropped — never buffered — by a task bounded
//! by `https.discard_body_bytes` and the same pace. Draining it lets a client that sends its
//! whole body before reading (curl 7.88 over HTTP/2, the h3 crate's client) end the stream
//! cleanly and read the status: dropped at once, h2 resets the stream (RST_STREAM NO_ERROR
//! after the answer), and curl 7.88 reports "(92) Stream error in the HTTP/2 framing layer"
//! instead of the status. Past the bound the body is dropped all the same — the answer is
//! complete by then, which RFC 9113 §8.1 and RFC 9114 §4.1 allow.

use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Body;

use super::budget::{Held, Share};
use super::config::HttpsConfig;
use super::pace::{Pace, PaceLimits};
use crate::error::{ErrorCode, Refusal};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How bodies are read: sizes and pace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyLimits {
    /// Largest multi-event body (`https.max_body_bytes`).
    pub max_body_bytes: usize,
    /// The pace every body read keeps.
    pub pace: PaceLimits,
    /// Most bytes of an unwanted body read and dropped after an early answer.
    pub discard_bytes: u64,
}

/// A body read that did not end with the body: the refusal, and the unread rest of the body
/// when draining it lets the client read the answer (see [`discard`]).
pub struct Unread<B> {
    pub refusal: Refusal,
    pub rest: Option<B>,
}

/// The bytes of one body kept so far, bounded by its limit and reserved from the memory
/// budget before they are kept.
struct Buffered {
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    held: Held,
}

impl BodyLimits {
    /// The limits of the `[https]` section (HTTP/3 bodies keep the same).
    pub fn of(cfg: &HttpsConfig) -> Self {
        Self {
            max_body_bytes: cfg.max_body_bytes,
            pace: PaceLimits {
                timeout: Duration::from_millis(cfg.body_timeout_ms),
                min_bytes_per_sec: cfg.body_min_bytes_per_sec,
            },
            discard_bytes: cfg.discard_body_bytes,
        }
    }
}

impl Buffered {
    fn new(limit: usize, held: Held) -> Self {
        Self { chunks: Vec::new(), len: 0, limit, held }
    }

    /// Keeps `chunk`, or says why not: the body is over its limit (413), or the memory budget
    /// has no room for it (503). What was reserved up front (a declared length) is used first.
    fn push(&mut self, chunk: Bytes) -> Result<(), Refusal> {
        if self.len + chunk.len() > self.limit {
            return Err(too_large(self.limit));
        }
        let len = self.len + chunk.len();
        if len > self.held.bytes() {
            self.held.grow(len - self.held.bytes())?;
        }
        self.len = len;
        if !chunk.is_empty() {
            self.chunks.push(chunk);
        }
        Ok(())
    }

    fn into_bytes(mut self) -> (Bytes, Held) {
        if self.chunks.len() == 1 {
            return (self.chunks.pop().unwrap_or_default(), self.held);
        }
        let mut all = BytesMut::with_capacity(self.len);
        for c in self.chunks {
            all.extend_from_slice(&c);
        }
        (all.freeze(), self.held)
    }
}

fn too_large(limit: usize) -> Refusal {
    Refusal::new(ErrorCode::TooLarge, format!("body is larger than {limit} bytes"))
}

/// Reads a whole body of at most `limit` bytes at the pace of `limits`, its bytes reserved
/// from `share` of the memory budget before they are kept (the declared `Content-Length` up
/// front). A body declared or found larger is refused 413, one the budget has no room for 503,
/// each with its rest to drain; a body that misses its pace is refused 408 and must be
/// dropped. The body comes with what it holds of the budget: keep it until the request is
/// answered.
pub async fn read<B>(
    headers: &http::HeaderMap,
    mut body: B,
    limit: usize,
    limits: PaceLimits,
    share: &Share,
) -> Result<(Bytes, Held), Unread<B>>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Unread { refusal: too_large(limit), rest: Some(body) });
    }
    let held = match share.reserve(declared.unwrap_or(0) as usize) {
        Ok(held) => held,
        Err(refusal) => return Err(Unread { refusal, rest: Some(body) }),
    };
    let mut kept = Buffered::new(limit, held);
    let mut pace = Pace::new(limits, Instant::now());
    loop {
        let frame = tokio::time::timeout_at(pace.deadline().into(), body.frame()).await;
        let now = Instant::now();
        match frame {
            Err(_) => match pace.check(now) {
                Err(stall) => return Err(Unread { refusal: stall.refusal(limits), rest: None }),
                Ok(()) => continue,
            },
            Ok(None) => return Ok(kept.into_bytes()),
            Ok(Some(Err(e))) => {
                let e: BoxError = e.into();
                let refusal =
                    Refusal::new(ErrorCode::BadRequest, format!("reading the body failed: {e}"));
                return Err(Unread { refusal, rest: None });
            }
            Ok(Some(Ok(frame))) => {
                let Ok(mut data) = frame.into_data() else { continue }; // trailers
                let chunk = data.copy_to_bytes(data.remaining());
                pace.on_data(chunk.len(), now);
                if let Err(refusal) = kept.push(chunk) {
                    return Err(Unread { refusal, rest: Some(body) });
                }
            }
        }
    }
}

/// Reads and drops what is left of `body` on a task of its own, at most `limits.discard_bytes`
/// and at the pace of `limits.pace`, then drops the body (resetting it if unfinished). Bytes
/// drained are counted with `drained`.
pub fn discard<B>(body: B, limits: BodyLimits, drained: impl Fn(usize) + Send + 'static)
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
{
    if body.is_end_stream() {
        return;
    }
    tokio::spawn(async move {
        let mut body = body;
        let mut pace = Pace::new(limits.pace, Instant::now());
        let mut left = limits.discard_bytes;
        loop {
            let frame = tokio::time::timeout_at(pace.deadline().into(), body.frame()).await;
            let now = Instant::now();
            match frame {
                Err(_) if pace.check(now).is_ok() => {}
                Ok(Some(Ok(frame))) => {
                    let n = frame.data_ref().map_or(0, Buf::remaining);
                    pace.on_data(n, now);
                    drained(n);
                    match left.checked_sub(n as u64) {
                        Some(l) => left = l,
                        None => break,
                    }
                }
                // Ended, failed, or stalled: done either way.
                _ => break,
            }
        }
    });
}
