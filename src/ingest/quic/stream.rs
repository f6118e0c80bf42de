//! The life of one `edgerelay/1` stream, as a sans-IO state machine: what to read and how
//! much, which requests to take in, when to authenticate from a frame's first bytes, which
//! answer to write next, when a frame is too slow, when to stop the client's side and with
//! which code, and when the stream is over. [`super::native`] moves the bytes.
//!
//! The driver reports what happened — bytes read ([`StreamState::received`]), the client's FIN
//! ([`StreamState::end_of_stream`]), the relay's drain ([`StreamState::shutdown`]), whether the
//! stream has an identity after a request ([`StreamState::authenticated`]), the verdict on a
//! frame's head ([`StreamState::head_checked`]), a request's answer
//! ([`StreamState::answered`]) — and then calls [`StreamState::poll`] with the time until it
//! says [`Action::Wait`], carrying out each [`Action`] in turn. It reads no clock and touches
//! no socket.
//!
//! Rules:
//! - **In-flight cap.** At most `max_in_flight` requests are taken in and not yet answered on
//!   the wire. At the cap the machine decodes no more frames, even from bytes already read,
//!   and asks for no more reads, so QUIC flow control pushes back on the client; each answer
//!   written frees a place.
//! - **Order.** Answers are written in request order, whatever order they become ready in.
//! - **Pre-auth limit.** A stream without an identity (none yet, or lost with a 401) holds at
//!   most `preauth_frame_bytes` of frame plus one length prefix: reads are sized so that no
//!   more is buffered. A frame announcing more than that is not read to its end: once its
//!   first `preauth_frame_bytes` are in, the machine asks the driver to authenticate from the
//!   token in them ([`Action::Authenticate`]) and reads nothing meanwhile; on success the full
//!   `max_frame_bytes` applies, otherwise the refusal ends the stream with
//!   [`STREAM_UNAUTHENTICATED`]. The driver reports after every request whether the stream
//!   has an identity; while it authenticates a request, it polls nothing, so pipelined frames
//!   wait unread.
//! - **Slow frames.** A frame that has started must keep coming (the [`Pace`] of HTTP bodies:
//!   a timeout between reads, a minimum rate), measured only while the machine asks for
//!   bytes. A frame too slow ends reading: the requests before it are answered, then a refusal
//!   (`request_timeout`, reason `frame_timeout` or `frame_too_slow`) is written, the client's side
//!   is stopped with [`STREAM_TOO_SLOW`], and [`StreamState::too_slow`] says so.
//! - **Broken framing.** A length prefix over the frame limit or a malformed prefix ends
//!   reading at once and drops what was buffered after it; the requests before it are answered,
//!   then a refusal (`too_large` / `bad_request`) is written, the client's side is stopped with
//!   [`STREAM_FRAME_TOO_LARGE`] / [`STREAM_MALFORMED`], and the relay's side is finished.
//! - **End of stream.** After the client's FIN, the complete frames already read are taken in
//!   and answered, a trailing partial frame is dropped, and the relay's side is finished after
//!   the last answer.
//! - **Shutdown.** A drain (of the relay, or of a connection past its maximum age) stops the
//!   client's side with [`STREAM_SHUTTING_DOWN`] (unless reading had already ended), then
//!   behaves as end of stream: what was read is answered. A stream that opens while its
//!   connection is already draining reads nothing and finishes at once.
//!
//! The memory budget: every byte buffered here is asked for by a [`Wait::read`] of at most
//! that many bytes, so the driver reserves `read` bytes before it reads, holds what stays
//! [`buffered`](StreamState::buffered), and hands each frame's bytes to its request.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::error::{ErrorCode, Refusal};
use crate::ingest::framing::{FrameDecoder, FrameError, MAX_VARINT_BYTES};
use crate::ingest::pace::{Pace, PaceLimits, Stall};

/// STOP_SENDING / RESET code: a frame's length prefix exceeded the limit.
pub const STREAM_FRAME_TOO_LARGE: u32 = 0x10;
/// STOP_SENDING / RESET code: a frame's length prefix was malformed.
pub const STREAM_MALFORMED: u32 = 0x11;
pub use edgerelay_proto::STREAM_SHUTTING_DOWN;
/// STOP_SENDING code: a frame over the pre-auth limit on a stream without an identity did not
/// carry an accepted token in its first `preauth_frame_bytes`.
pub const STREAM_UNAUTHENTICATED: u32 = 0x13;
/// STOP_SENDING code: a frame stalled or came slower than the minimum rate.
pub const STREAM_TOO_SLOW: u32 = 0x14;
/// Most bytes read at once.
pub const READ_CHUNK: usize = 64 << 10;

/// What bounds a stream.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Frames of at most `max_frame_bytes` (`quic.max_frame_bytes`).
    pub decoder: FrameDecoder,
    /// Most bytes of frame held by a stream without an identity (`quic.preauth_frame_bytes`).
    pub preauth_frame_bytes: usize,
    /// Requests taken in and not yet answered on the wire (at least one).
    pub max_in_flight: usize,
    /// How fast a started frame must come.
    pub pace: PaceLimits,
}

/// One stream's state; `A` is an answer as the driver writes it.
#[derive(Debug)]
pub struct StreamState<A> {
    limits: Limits,
    /// Bytes read and not yet taken in as frames.
    buf: BytesMut,
    /// One slot per request in flight, oldest first; `None` until its answer is ready.
    answers: VecDeque<Option<A>>,
    /// The id of the request in the front slot of `answers`.
    front_id: u64,
    /// Slots of `answers` still `None`.
    unanswered: usize,
    /// A STOP_SENDING code to send before anything else.
    stop: Option<u32>,
    /// The stream has an identity: the full frame limit applies.
    authenticated: bool,
    /// An [`Action::Authenticate`] awaits its [`StreamState::head_checked`].
    authenticating: bool,
    /// The frame under way, while the machine asks for bytes.
    progress: Option<Pace>,
    /// Why reading broke, and the STOP_SENDING code that says so (phase `Broken`).
    broken: Option<(Refusal, u32)>,
    /// Reading ended because a frame was too slow.
    too_slow: bool,
    phase: Phase,
}

/// Where the stream is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading requests.
    Reading,
    /// Reading is over (the client's FIN or a drain): taking in the complete frames already
    /// read, answering, then finishing.
    Draining,
    /// Reading broke (framing, pre-auth, slowness): answering the requests before it, then
    /// refusing.
    Broken,
    /// Answering what is in flight, then finishing; no more frames are taken in.
    Ending,
    /// The relay's side is finished.
    Finished,
}

/// What the driver does next.
#[derive(Debug, PartialEq)]
pub enum Action<A> {
    /// Take `frame` in as a request, report whether the stream has an identity after it with
    /// [`StreamState::authenticated`], and its answer under `id` with
    /// [`StreamState::answered`].
    Decode { id: u64, frame: Bytes },
    /// A stream without an identity announced a frame over the pre-auth limit; `head` is its
    /// first `preauth_frame_bytes`. Authenticate from the token in it and report with
    /// [`StreamState::head_checked`].
    Authenticate { head: Bytes },
    /// Write this answer, the oldest request's.
    Write(A),
    /// Reading broke: count and audit this refusal and write it as the stream's last answer.
    Refuse(Refusal),
    /// Stop the client's side (STOP_SENDING) with this code.
    Stop(u32),
    /// Finish the relay's side. The stream is over; polling again says `Finish` again.
    Finish,
    /// Nothing to do until one of these happens; at least one is asked for.
    Wait(Wait),
}

/// What a waiting driver waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wait {
    /// More bytes, at most this many (0: none; at the in-flight cap, while authenticating,
    /// at the pre-auth limit, once reading is over).
    pub read: usize,
    /// An answer to a request in flight.
    pub answers: bool,
    /// The relay's drain (while still reading).
    pub shutdown: bool,
    /// Poll again at this time, if nothing else happened (the frame under way is due).
    pub deadline: Option<Instant>,
}

impl<A> StreamState<A> {
    /// A new stream; `authenticated`: its connection's certificate already names an identity;
    /// `draining`: the relay or the connection was already draining when it opened.
    pub fn new(limits: Limits, authenticated: bool, draining: bool) -> Self {
        Self {
            limits: Limits { max_in_flight: limits.max_in_flight.max(1), ..limits },
            buf: BytesMut::new(),
            answers: VecDeque::new(),
            front_id: 0,
            unanswered: 0,
            stop: None,
            authenticated,
            authenticating: false,
            progress: None,
            broken: None,
            too_slow: false,
            phase: if draining { Phase::Draining } else { Phase::Reading },
        }
    }

    /// Bytes read from the client at `now`. Ignored once reading is over.
    pub fn received(&mut self, bytes: &[u8], now: Instant) {
        if self.phase == Phase::Reading {
            self.buf.extend_from_slice(bytes);
            let pace = self.limits.pace;
            self.progress.get_or_insert_with(|| Pace::new(pace, now)).on_data(bytes.len(), now);
        }
    }

    /// The relay held off reading for `d` (no room in the memory budget): the frame under
    /// way is not late by that time.
    pub fn held(&mut self, d: Duration) {
        if let Some(progress) = &mut self.progress {
            progress.hold(d);
        }
    }

    /// The client finished its side.
    pub fn end_of_stream(&mut self) {
        if self.phase == Phase::Reading {
            self.phase = Phase::Draining;
        }
    }

    /// The relay (or the connection) drains: no more reading; what was read is answered.
    pub fn shutdown(&mut self) {
        if self.phase == Phase::Reading {
            self.phase = Phase::Draining;
            self.stop = Some(STREAM_SHUTTING_DOWN);
        }
    }

    /// Whether the stream has an identity after its last request's authentication.
    pub fn authenticated(&mut self, yes: bool) {
        self.authenticated = yes;
    }

    /// The verdict on the head of [`Action::Authenticate`]: the stream has an identity now,
    /// or reading ends with this refusal.
    pub fn head_checked(&mut self, verdict: Result<(), Refusal>) {
        if !std::mem::take(&mut self.authenticating) {
            return;
        }
        match verdict {
            Ok(()) => self.authenticated = true,
            Err(r) => self.break_off(r, STREAM_UNAUTHENTICATED),
        }
    }

    /// The answer to request `id` is ready. An id not in flight (or answered already) is
    /// ignored.
    pub fn answered(&mut self, id: u64, answer: A) {
        let slot = id
            .checked_sub(self.front_id)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.answers.get_mut(i));
        if let Some(slot @ None) = slot {
            *slot = Some(answer);
            self.unanswered -= 1;
        }
    }

    /// Bytes read and not yet taken in as a frame (what the memory budget holds for the
    /// stream's reading).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Requests taken in whose answers are not written yet.
    pub fn in_flight(&self) -> usize {
        self.answers.len()
    }

    /// Reading ended because a frame was too slow.
    pub fn too_slow(&self) -> bool {
        self.too_slow
    }

    /// The next thing to do at `now`.
    pub fn poll(&mut self, now: Instant) -> Action<A> {
        if let Some(code) = self.stop.take() {
            return Action::Stop(code);
        }
        if let Some(action) = self.take_frame() {
            return action;
        }
        if let Some(Some(_)) = self.answers.front() {
            if let Some(Some(answer)) = self.answers.pop_front() {
                self.front_id += 1;
                return Action::Write(answer);
            }
        }
        if self.answers.is_empty() {
            match self.phase {
                Phase::Reading => {}
                Phase::Broken => {
                    self.phase = Phase::Ending;
                    if let Some((refusal, code)) = self.broken.take() {
                        self.stop = Some(code);
                        return Action::Refuse(refusal);
                    }
                }
                Phase::Draining | Phase::Ending | Phase::Finished => {
                    self.phase = Phase::Finished;
                    return Action::Finish;
                }
            }
        }
        let read = self.read_budget();
        if read == 0 || self.buf.is_empty() {
            // Not asking for bytes: the client is not to blame for the time this takes.
            self.progress = None;
        }
        if read > 0 && !self.buf.is_empty() {
            let pace = self.limits.pace;
            let progress = self.progress.get_or_insert_with(|| Pace::new(pace, now));
            if let Err(stall) = progress.check(now) {
                self.too_slow = true;
                self.break_off(slow_refusal(stall, &pace), STREAM_TOO_SLOW);
                return self.poll(now);
            }
        }
        let reading = self.phase == Phase::Reading;
        Action::Wait(Wait {
            read,
            answers: self.unanswered > 0,
            shutdown: reading,
            deadline: self.progress.as_ref().map(Pace::deadline),
        })
    }

    /// How many bytes to read next: none unless reading with room under the cap and not
    /// authenticating; without an identity, no more than the pre-auth limit holds.
    fn read_budget(&self) -> usize {
        if self.phase != Phase::Reading
            || self.authenticating
            || self.answers.len() >= self.limits.max_in_flight
        {
            0
        } else if self.authenticated {
            READ_CHUNK
        } else {
            (self.limits.preauth_frame_bytes + MAX_VARINT_BYTES)
                .saturating_sub(self.buf.len())
                .min(READ_CHUNK)
        }
    }

    /// Takes the next buffered frame in as a request (or asks to authenticate from its head),
    /// if the phase and the cap allow.
    fn take_frame(&mut self) -> Option<Action<A>> {
        if !matches!(self.phase, Phase::Reading | Phase::Draining)
            || self.authenticating
            || self.answers.len() >= self.limits.max_in_flight
        {
            return None;
        }
        let (prefix, len) = match self.limits.decoder.header(&self.buf) {
            Ok(Some(header)) => header,
            Ok(None) => return None,
            Err(e) => {
                let (code, stop) = match e {
                    FrameError::TooLong { .. } => (ErrorCode::TooLarge, STREAM_FRAME_TOO_LARGE),
                    FrameError::BadLength => (ErrorCode::BadRequest, STREAM_MALFORMED),
                };
                self.break_off(Refusal::new(code, e.to_string()), stop);
                return None;
            }
        };
        let preauth = self.limits.preauth_frame_bytes;
        if !self.authenticated && len > preauth {
            // Never all here (reads stop at the pre-auth limit); after the FIN it is a
            // trailing partial frame, dropped.
            if self.phase != Phase::Reading || self.buf.len() < prefix + preauth {
                return None;
            }
            self.authenticating = true;
            self.progress = None;
            let head = Bytes::copy_from_slice(&self.buf[prefix..prefix + preauth]);
            return Some(Action::Authenticate { head });
        }
        if self.buf.len() < prefix + len {
            return None;
        }
        let frame = self.buf.split_to(prefix + len).split_off(prefix).freeze();
        self.progress = None;
        let id = self.front_id + self.answers.len() as u64;
        self.answers.push_back(None);
        self.unanswered += 1;
        Some(Action::Decode { id, frame })
    }

    /// Reading ends: what was buffered is dropped, the requests before are answered, then
    /// `refusal` and the stop `code`.
    fn break_off(&mut self, refusal: Refusal, code: u32) {
        self.buf = BytesMut::new();
        self.progress = None;
        self.phase = Phase::Broken;
        self.broken = Some((refusal, code));
    }
}

/// The refusal of a frame too slow.
fn slow_refusal(stall: Stall, pace: &PaceLimits) -> Refusal {
    match stall {
        Stall::Timeout => Refusal::new(
            ErrorCode::RequestTimeout,
            format!("frame stalled: no bytes for {} ms", pace.timeout.as_millis()),
        )
        .because("frame_timeout"),
        Stall::TooSlow => Refusal::new(
            ErrorCode::RequestTimeout,
            format!("frame slower than {} bytes/s", pace.min_bytes_per_sec),
        )
        .because("frame_too_slow"),
    }
}

#[cfg(test)]
mod tests;
