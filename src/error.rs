//! The refusals the relay answers the edge with: one code per reason, each knowing whose fault
//! it is and whether a retry helps. The code picks the HTTP status, the `Retry-After` header,
//! the protobuf `Refused` result and (later) the metric label, so every protocol says the same.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// Most bytes of input (a value, a name, a decoder's complaint about it) a refusal message,
/// log line or audit record repeats: enough to recognise it, never enough to flood with it.
pub const ECHO_BYTES: usize = 64;

/// Longest refusal message built at run time, bytes (see [`Refusal::new`]).
pub const MAX_MESSAGE_BYTES: usize = 256;

/// Whose fault a refusal is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The request was wrong; the edge must change it (4xx).
    Edge,
    /// NATS / JetStream did not take the event in time (503/504).
    Upstream,
    /// The relay itself: overload, shutting down, or a bug (500/503).
    Internal,
}

/// Why the relay did not accept an event. Stable strings: clients and dashboards key on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// Malformed subject: wildcard, empty token, bad character, too long.
    BadSubject,
    /// Malformed body, header or request (bad JSON, bad protobuf, bad base64, bad header).
    BadRequest,
    /// Missing, unknown or expired credentials.
    Unauthorized,
    /// The identity may not publish on this subject.
    Forbidden,
    /// Body, event or batch of events larger than the configured limits.
    TooLarge,
    /// `Content-Type` the route does not take.
    UnsupportedMediaType,
    /// No such route.
    NotFound,
    /// The route exists but not for this method.
    MethodNotAllowed,
    /// The request's body stalled: no bytes for `https.body_timeout_ms`, or slower on average
    /// than `https.body_min_bytes_per_sec`.
    RequestTimeout,
    /// Too many requests from this identity.
    RateLimited,
    /// The relay's bounded queues are full: back off and retry.
    QueueFull,
    /// No NATS server is reachable (or the stream is not ready).
    NatsUnavailable,
    /// JetStream did not acknowledge the batch within the publish deadline. The event may or
    /// may not be stored: retry with the same idempotency key.
    AckTimeout,
    /// JetStream refused the batch (e.g. stream full with discard-new).
    Rejected,
    /// The relay is draining for shutdown.
    ShuttingDown,
    /// The identity provider's keys are not available (never fetched, or older than
    /// `auth.jwt.max_stale_secs`), so no token can be checked.
    AuthUnavailable,
    /// A bug in the relay.
    Internal,
}

/// A refusal of one event or one request, as answered to the edge.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    pub code: ErrorCode,
    /// Finer than the code, for logs, audit records and the `reason` metric label: a fixed
    /// string such as `token_expired` or `no_rule_allows`. The code's own string by default.
    pub reason: &'static str,
    pub message: Cow<'static, str>,
    /// How long to wait before retrying; `None` when a retry will not help. The code's
    /// default unless the refusal knows better (a rate limit knows when tokens come back).
    pub retry_after: Option<Duration>,
}

impl ErrorCode {
    /// Every code, for clients and dashboards that enumerate them.
    pub const ALL: [ErrorCode; 17] = [
        Self::BadSubject,
        Self::BadRequest,
        Self::Unauthorized,
        Self::Forbidden,
        Self::TooLarge,
        Self::UnsupportedMediaType,
        Self::NotFound,
        Self::MethodNotAllowed,
        Self::RequestTimeout,
        Self::RateLimited,
        Self::QueueFull,
        Self::NatsUnavailable,
        Self::AckTimeout,
        Self::Rejected,
        Self::ShuttingDown,
        Self::AuthUnavailable,
        Self::Internal,
    ];

    /// The code with this stable string, if there is one.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The stable string used in JSON bodies, protobuf results and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadSubject => "bad_subject",
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::TooLarge => "too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::RequestTimeout => "request_timeout",
            Self::RateLimited => "rate_limited",
            Self::QueueFull => "queue_full",
            Self::NatsUnavailable => "nats_unavailable",
            Self::AckTimeout => "ack_timeout",
            Self::Rejected => "rejected",
            Self::ShuttingDown => "shutting_down",
            Self::AuthUnavailable => "auth_unavailable",
            Self::Internal => "internal",
        }
    }

    /// HTTP status for this code.
    pub fn status(self) -> u16 {
        match self {
            Self::BadSubject | Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::RequestTimeout => 408,
            Self::TooLarge => 413,
            Self::UnsupportedMediaType => 415,
            Self::RateLimited => 429,
            Self::Internal => 500,
            Self::QueueFull
            | Self::NatsUnavailable
            | Self::Rejected
            | Self::ShuttingDown
            | Self::AuthUnavailable => 503,
            Self::AckTimeout => 504,
        }
    }

    /// Whose fault it is.
    pub fn side(self) -> Side {
        match self {
            Self::BadSubject
            | Self::BadRequest
            | Self::Unauthorized
            | Self::Forbidden
            | Self::TooLarge
            | Self::UnsupportedMediaType
            | Self::NotFound
            | Self::MethodNotAllowed
            | Self::RequestTimeout
            | Self::RateLimited => Side::Edge,
            Self::NatsUnavailable | Self::AckTimeout | Self::Rejected | Self::AuthUnavailable => {
                Side::Upstream
            }
            Self::QueueFull | Self::ShuttingDown | Self::Internal => Side::Internal,
        }
    }

    /// How long the client should wait before retrying the same request, or `None` when a
    /// retry of the same request will not help.
    pub fn retry_after(self) -> Option<Duration> {
        match self {
            Self::RateLimited | Self::QueueFull => Some(Duration::from_secs(1)),
            Self::NatsUnavailable | Self::ShuttingDown | Self::Rejected => {
                Some(Duration::from_secs(2))
            }
            Self::AckTimeout => Some(Duration::from_secs(1)),
            Self::Internal | Self::AuthUnavailable => Some(Duration::from_secs(5)),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Refusal {
    /// A refusal with the code's default reason and retry delay. A message built at run time
    /// is cut to [`MAX_MESSAGE_BYTES`]: whatever it interpolated, an answer, a log line or an
    /// audit record never carries more.
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        let message = match message.into() {
            Cow::Owned(m) if m.len() > MAX_MESSAGE_BYTES => {
                Cow::Owned(bounded(&m, MAX_MESSAGE_BYTES).into_owned())
            }
            m => m,
        };
        Self { code, reason: code.as_str(), message, retry_after: code.retry_after() }
    }

    /// The same refusal with a finer reason.
    pub fn because(mut self, reason: &'static str) -> Self {
        self.reason = reason;
        self
    }

    /// The same refusal with its own retry delay.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The same refusal saying a retry of the same request will not help (no `Retry-After`),
    /// for a code that is retryable as a rule (a request larger than a rate limit's burst).
    pub fn no_retry(mut self) -> Self {
        self.retry_after = None;
        self
    }

    /// `Retry-After` in whole seconds (at least 1), when a retry helps.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after.map(|d| (d.as_millis().div_ceil(1000) as u64).max(1))
    }
}

/// `text` cut to at most [`ECHO_BYTES`] (see [`bounded`]): for input quoted in a message.
pub fn excerpt(text: &str) -> Cow<'_, str> {
    bounded(text, ECHO_BYTES)
}

/// `text` unchanged if it has at most `max` bytes; else its first bytes up to a char boundary,
/// followed by `…(+N bytes)` saying how much was cut.
pub fn bounded(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…(+{} bytes)", &text[..end], text.len() - end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_parses_back_from_its_string() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::parse("nope"), None);
    }

    #[test]
    fn retryable_codes_carry_retry_after_and_edge_faults_do_not() {
        for code in [
            ErrorCode::BadSubject,
            ErrorCode::BadRequest,
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
            ErrorCode::TooLarge,
            ErrorCode::UnsupportedMediaType,
        ] {
            assert_eq!(code.side(), Side::Edge);
            assert!(code.retry_after().is_none(), "{code}");
            assert!((400..500).contains(&code.status()));
        }
        for code in [ErrorCode::RateLimited, ErrorCode::QueueFull, ErrorCode::NatsUnavailable] {
            assert!(code.retry_after().is_some(), "{code}");
            assert!(matches!(code.status(), 429 | 503));
        }
    }

    #[test]
    fn input_is_echoed_bounded_and_cut_on_a_char_boundary() {
        for (text, max, want) in [
            ("short", 8, "short"),
            ("exactly8", 8, "exactly8"),
            ("nine byte", 8, "nine byt…(+1 bytes)"),
            // 'é' is two bytes: a cut inside it moves back to its start.
            ("abcdefgé", 8, "abcdefg…(+2 bytes)"),
            ("ééé", 3, "é…(+4 bytes)"),
            ("", 0, ""),
        ] {
            assert_eq!(bounded(text, max), want, "{text:?} at {max}");
        }
        let huge = "x".repeat(1 << 20);
        assert_eq!(excerpt(&huge).len(), ECHO_BYTES + "…(+1048512 bytes)".len());
    }

    #[test]
    fn run_time_messages_are_bounded_and_static_ones_kept() {
        let long = format!("invalid thing: {}", "y".repeat(10_000));
        let r = Refusal::new(ErrorCode::BadRequest, long);
        assert!(r.message.len() < MAX_MESSAGE_BYTES + 32, "{}", r.message.len());
        assert!(r.message.ends_with("bytes)"), "{}", r.message);
        let r = Refusal::new(ErrorCode::BadRequest, "a static message");
        assert!(matches!(r.message, Cow::Borrowed("a static message")));
    }
}
