//! The life of one `edgerelay/1` stream, as a sans-IO state machine: what to read, which
//! requests to take in, which answer to write next, when to stop the client's side and with
//! which code, and when the stream is over. [`super::native`] moves the bytes.
//!
//! The driver reports what happened — bytes read ([`StreamState::received`]), the client's FIN
//! ([`StreamState::end_of_stream`]), the relay's drain ([`StreamState::shutdown`]), a request's
//! answer ([`StreamState::answered`]) — and then calls [`StreamState::poll`] until it says
//! [`Action::Wait`], carrying out each [`Action`] in turn. No rule depends on time (the
//! deadlines of a stream are QUIC's idle timeout and the ingest stage's publish deadline), so
//! nothing here takes `now`; it reads no clock and touches no socket.
//!
//! Rules:
//! - **In-flight cap.** At most `max_in_flight` requests are taken in and not yet answered on
//!   the wire. At the cap the machine decodes no more frames, even from bytes already read,
//!   and asks for no more reads, so QUIC flow control pushes back on the client; each answer
//!   written frees a place.
//! - **Order.** Answers are written in request order, whatever order they become ready in.
//! - **Broken framing.** A length prefix over the frame limit or a malformed prefix ends
//!   reading at once and drops what was buffered after it; the requests before it are answered,
//!   then a refusal (`too_large` / `bad_request`) is written, the client's side is stopped with
//!   [`STREAM_FRAME_TOO_LARGE`] / [`STREAM_MALFORMED`], and the relay's side is finished.
//! - **End of stream.** After the client's FIN, the complete frames already read are taken in
//!   and answered, a trailing partial frame is dropped, and the relay's side is finished after
//!   the last answer.
//! - **Shutdown.** A drain stops the client's side with [`STREAM_SHUTTING_DOWN`] (unless
//!   reading had already ended), then behaves as end of stream: what was read is answered. A
//!   stream that opens while the relay is already draining reads nothing and finishes at once.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::error::{ErrorCode, Refusal};
use crate::ingest::framing::{FrameDecoder, FrameError};

/// STOP_SENDING / RESET code: a frame's length prefix exceeded the limit.
pub const STREAM_FRAME_TOO_LARGE: u32 = 0x10;
/// STOP_SENDING / RESET code: a frame's length prefix was malformed.
pub const STREAM_MALFORMED: u32 = 0x11;
/// STOP_SENDING code: the relay is draining and reads no more requests on this stream.
pub const STREAM_SHUTTING_DOWN: u32 = 0x12;

/// One stream's state; `A` is an answer as the driver writes it.
#[derive(Debug)]
pub struct StreamState<A> {
    decoder: FrameDecoder,
    max_in_flight: usize,
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
    /// The framing broke: answering the requests before it, then refusing.
    Broken(FrameError),
    /// Answering what is in flight, then finishing; no more frames are taken in.
    Ending,
    /// The relay's side is finished.
    Finished,
}

/// What the driver does next.
#[derive(Debug, PartialEq)]
pub enum Action<A> {
    /// Take `frame` in as a request and report its answer under `id` with
    /// [`StreamState::answered`].
    Decode { id: u64, frame: Bytes },
    /// Write this answer, the oldest request's.
    Write(A),
    /// The framing broke: count and audit this refusal and write it as the stream's last answer.
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
    /// More bytes (false at the in-flight cap or once reading is over).
    pub read: bool,
    /// An answer to a request in flight.
    pub answers: bool,
    /// The relay's drain (while still reading).
    pub shutdown: bool,
}

impl<A> StreamState<A> {
    /// A new stream taking frames from `decoder` with at most `max_in_flight` requests
    /// unanswered (at least one). `draining`: the relay was already draining when it opened.
    pub fn new(decoder: FrameDecoder, max_in_flight: usize, draining: bool) -> Self {
        Self {
            decoder,
            max_in_flight: max_in_flight.max(1),
            buf: BytesMut::new(),
            answers: VecDeque::new(),
            front_id: 0,
            unanswered: 0,
            stop: None,
            phase: if draining { Phase::Draining } else { Phase::Reading },
        }
    }

    /// Bytes read from the client. Ignored once reading is over.
    pub fn received(&mut self, bytes: &[u8]) {
        if self.phase == Phase::Reading {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The client finished its side.
    pub fn end_of_stream(&mut self) {
        if self.phase == Phase::Reading {
            self.phase = Phase::Draining;
        }
    }

    /// The relay drains: no more reading; what was read is answered.
    pub fn shutdown(&mut self) {
        if self.phase == Phase::Reading {
            self.phase = Phase::Draining;
            self.stop = Some(STREAM_SHUTTING_DOWN);
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

    /// Requests taken in whose answers are not written yet.
    pub fn in_flight(&self) -> usize {
        self.answers.len()
    }

    /// The next thing to do.
    pub fn poll(&mut self) -> Action<A> {
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
                Phase::Broken(e) => {
                    let (code, stop) = match e {
                        FrameError::TooLong { .. } => (ErrorCode::TooLarge, STREAM_FRAME_TOO_LARGE),
                        FrameError::BadLength => (ErrorCode::BadRequest, STREAM_MALFORMED),
                    };
                    self.phase = Phase::Ending;
                    self.stop = Some(stop);
                    return Action::Refuse(Refusal::new(code, e.to_string()));
                }
                Phase::Draining | Phase::Ending | Phase::Finished => {
                    self.phase = Phase::Finished;
                    return Action::Finish;
                }
            }
        }
        let reading = self.phase == Phase::Reading;
        Action::Wait(Wait {
            read: reading && self.answers.len() < self.max_in_flight,
            answers: self.unanswered > 0,
            shutdown: reading,
        })
    }

    /// Takes the next buffered frame in as a request, if the phase and the cap allow.
    fn take_frame(&mut self) -> Option<Action<A>> {
        if !matches!(self.phase, Phase::Reading | Phase::Draining)
            || self.answers.len() >= self.max_in_flight
        {
            return None;
        }
        match self.decoder.decode(&mut self.buf) {
            Ok(Some(frame)) => {
                let id = self.front_id + self.answers.len() as u64;
                self.answers.push_back(None);
                self.unanswered += 1;
                Some(Action::Decode { id, frame })
            }
            Ok(None) => None,
            Err(e) => {
                self.buf = BytesMut::new();
                self.phase = Phase::Broken(e);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::framing;

    /// What happens to the stream, in a table row.
    #[derive(Clone, Debug)]
    enum In {
        /// One read of these bytes.
        Read(Vec<u8>),
        Fin,
        Shutdown,
        /// The answer to request `id` is ready (the answer is the id itself).
        Answer(u64),
    }

    /// An action, as a table row expects it.
    #[derive(Clone, Debug, PartialEq)]
    enum Out {
        Decode(u64),
        Write(u64),
        Refuse(ErrorCode),
        Stop(u32),
        Finish,
        /// Wait for: read, answers, shutdown.
        Wait(bool, bool, bool),
    }

    use In::*;
    use Out::{Decode as D, Finish as F, Refuse as R, Stop as S, Wait as W, Write as Wr};

    const LIMIT: usize = 100;

    /// Frames with bodies of these lengths, back to back.
    fn frames(lens: &[u64]) -> Vec<u8> {
        let mut b = BytesMut::new();
        for &len in lens {
            framing::put_len(len, &mut b);
            b.extend_from_slice(&vec![0; len as usize]);
        }
        b.to_vec()
    }

    /// Feeds each row's input to one stream and checks the actions polled after it, up to and
    /// including the first `Wait` or `Finish`.
    fn run(max_in_flight: usize, draining: bool, rows: &[(In, &[Out])]) {
        let mut s = StreamState::new(FrameDecoder::new(LIMIT), max_in_flight, draining);
        for (n, (input, want)) in rows.iter().enumerate() {
            match input {
                Read(bytes) => s.received(bytes),
                Fin => s.end_of_stream(),
                Shutdown => s.shutdown(),
                Answer(id) => s.answered(*id, *id),
            }
            assert_eq!(actions(&mut s), *want, "row {n}: {input:?}");
        }
    }

    fn actions(s: &mut StreamState<u64>) -> Vec<Out> {
        let mut out = Vec::new();
        loop {
            let action = match s.poll() {
                Action::Decode { id, .. } => D(id),
                Action::Write(a) => Wr(a),
                Action::Refuse(r) => R(r.code),
                Action::Stop(code) => S(code),
                Action::Finish => F,
                Action::Wait(w) => {
                    assert!(w.read || w.answers || w.shutdown, "a wait for nothing");
                    W(w.read, w.answers, w.shutdown)
                }
            };
            let last = matches!(action, W(..) | F);
            out.push(action);
            if last {
                return out;
            }
        }
    }

    #[test]
    fn a_new_stream_waits_to_read() {
        run(4, false, &[(Read(vec![]), &[W(true, false, true)])]);
    }

    #[test]
    fn the_in_flight_cap_stops_taking_in_frames_and_reading_until_an_answer_is_written() {
        run(
            2,
            false,
            &[
                // Three frames in one read: two are taken in, the third waits in the buffer,
                // and nothing more is read.
                (Read(frames(&[1, 2, 3])), &[D(0), D(1), W(false, true, true)]),
                // The second answer alone frees nothing: the first is not written yet.
                (Answer(1), &[W(false, true, true)]),
                // Writing the first frees a place: the buffered frame is taken in.
                (Answer(0), &[Wr(0), D(2), Wr(1), W(true, true, true)]),
                (Answer(2), &[Wr(2), W(true, false, true)]),
            ],
        );
    }

    #[test]
    fn a_cap_of_one_takes_one_request_at_a_time() {
        run(
            1,
            false,
            &[
                (Read(frames(&[0, 0, 0])), &[D(0), W(false, true, true)]),
                (Answer(0), &[Wr(0), D(1), W(false, true, true)]),
                (Answer(1), &[Wr(1), D(2), W(false, true, true)]),
                (Answer(2), &[Wr(2), W(true, false, true)]),
            ],
        );
    }

    #[test]
    fn answers_are_written_in_request_order_whatever_order_they_are_ready_in() {
        run(
            8,
            false,
            &[
                (Read(frames(&[5, 5, 5, 5])), &[D(0), D(1), D(2), D(3), W(true, true, true)]),
                (Answer(3), &[W(true, true, true)]),
                (Answer(1), &[W(true, true, true)]),
                (Answer(0), &[Wr(0), Wr(1), W(true, true, true)]),
                (Answer(2), &[Wr(2), Wr(3), W(true, false, true)]),
            ],
        );
    }

    #[test]
    fn unknown_and_repeated_answers_are_ignored() {
        run(
            8,
            false,
            &[
                (Read(frames(&[1, 1])), &[D(0), D(1), W(true, true, true)]),
                (Answer(7), &[W(true, true, true)]),
                (Answer(0), &[Wr(0), W(true, true, true)]),
                (Answer(0), &[W(true, true, true)]),
                (Answer(1), &[Wr(1), W(true, false, true)]),
            ],
        );
    }

    #[test]
    fn a_frame_split_across_reads_is_taken_in_once_complete() {
        run(
            4,
            false,
            &[
                (Read(vec![3, 0xaa]), &[W(true, false, true)]),
                (Read(vec![0xbb]), &[W(true, false, true)]),
                (Read(vec![0xcc, 0]), &[D(0), D(1), W(true, true, true)]),
            ],
        );
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_from_its_prefix_after_the_earlier_answers() {
        // 101 > LIMIT: announced, not sent. The request before it is answered first; nothing
        // more is read, and a drain no longer has a stream to stop.
        run(
            4,
            false,
            &[
                (Read(frames(&[1])), &[D(0), W(true, true, true)]),
                (Read(vec![101, 0, 0]), &[W(false, true, false)]),
                (Answer(0), &[Wr(0), R(ErrorCode::TooLarge), S(STREAM_FRAME_TOO_LARGE), F]),
            ],
        );
    }

    #[test]
    fn a_malformed_prefix_is_refused_and_stops_the_stream_with_its_code() {
        run(
            4,
            false,
            &[(Read(vec![0xff; 11]), &[R(ErrorCode::BadRequest), S(STREAM_MALFORMED), F])],
        );
    }

    #[test]
    fn frames_after_a_broken_one_are_dropped_even_if_complete() {
        let mut bytes = frames(&[0, 0]);
        framing::put_len(1 << 30, &mut bytes);
        bytes.extend_from_slice(&frames(&[0, 0]));
        run(
            8,
            false,
            &[
                (Read(bytes), &[D(0), D(1), W(false, true, false)]),
                (Answer(1), &[W(false, true, false)]),
                (Answer(0), &[Wr(0), Wr(1), R(ErrorCode::TooLarge), S(STREAM_FRAME_TOO_LARGE), F]),
            ],
        );
    }

    #[test]
    fn a_broken_frame_behind_the_cap_is_found_once_there_is_room() {
        // The cap keeps the decoder away from the bad prefix until an answer is written.
        let bytes = [frames(&[0]), vec![0xff; 10]].concat();
        run(
            1,
            false,
            &[
                (Read(bytes), &[D(0), W(false, true, true)]),
                (Answer(0), &[Wr(0), R(ErrorCode::BadRequest), S(STREAM_MALFORMED), F]),
            ],
        );
    }

    #[test]
    fn after_the_client_s_fin_pending_answers_are_written_then_the_stream_finishes() {
        run(
            4,
            false,
            &[
                (Read(frames(&[1, 1])), &[D(0), D(1), W(true, true, true)]),
                (Fin, &[W(false, true, false)]),
                (Answer(0), &[Wr(0), W(false, true, false)]),
                (Answer(1), &[Wr(1), F]),
            ],
        );
    }

    #[test]
    fn after_the_fin_frames_behind_the_cap_are_still_answered_and_a_partial_one_dropped() {
        let bytes = [frames(&[1, 1]), vec![9, 1, 2]].concat();
        run(
            1,
            false,
            &[
                (Read(bytes), &[D(0), W(false, true, true)]),
                (Answer(0), &[Wr(0), D(1), W(false, true, true)]),
                (Answer(1), &[Wr(1), W(true, false, true)]),
                (Fin, &[F]),
            ],
        );
    }

    #[test]
    fn a_fin_with_nothing_in_flight_finishes_at_once() {
        run(4, false, &[(Fin, &[F])]);
    }

    #[test]
    fn shutdown_stops_reading_with_its_code_and_answers_what_was_read() {
        run(
            1,
            false,
            &[
                (Read(frames(&[1, 1])), &[D(0), W(false, true, true)]),
                (Shutdown, &[S(STREAM_SHUTTING_DOWN), W(false, true, false)]),
                // The frame read before the drain is still taken in and answered.
                (Answer(0), &[Wr(0), D(1), W(false, true, false)]),
                (Answer(1), &[Wr(1), F]),
            ],
        );
    }

    #[test]
    fn shutdown_after_the_fin_sends_no_stop() {
        run(
            4,
            false,
            &[
                (Read(frames(&[1])), &[D(0), W(true, true, true)]),
                (Fin, &[W(false, true, false)]),
                (Shutdown, &[W(false, true, false)]),
                (Answer(0), &[Wr(0), F]),
            ],
        );
    }

    #[test]
    fn an_idle_stream_finishes_at_once_on_shutdown() {
        run(4, false, &[(Shutdown, &[S(STREAM_SHUTTING_DOWN), F])]);
    }

    #[test]
    fn a_stream_opened_while_draining_reads_nothing_and_finishes_without_a_stop() {
        run(4, true, &[(Shutdown, &[F])]);
    }

    #[test]
    fn inputs_after_reading_ended_change_nothing() {
        // The driver reads nothing once the machine stops asking; were it to, nothing changes.
        run(
            4,
            false,
            &[
                (Read(frames(&[1])), &[D(0), W(true, true, true)]),
                (Fin, &[W(false, true, false)]),
                (Read(frames(&[1])), &[W(false, true, false)]),
                (Fin, &[W(false, true, false)]),
                (Shutdown, &[W(false, true, false)]),
                (Answer(0), &[Wr(0), F]),
                (Read(frames(&[1])), &[F]),
                (Answer(1), &[F]),
            ],
        );
    }

    #[test]
    fn answers_in_any_order_with_reads_split_anywhere_come_out_in_order() {
        // Every cut of the byte stream and every cap; answers come in reverse order of arrival.
        let wire = frames(&[0, 3, 1, 7, 2]);
        for cap in 1..=5 {
            for cut in 0..=wire.len() {
                let mut s = StreamState::new(FrameDecoder::new(LIMIT), cap, false);
                let (mut written, mut ready) = (Vec::new(), Vec::new());
                let mut reads = [&wire[..cut], &wire[cut..]].into_iter();
                loop {
                    match s.poll() {
                        Action::Decode { id, .. } => ready.push(id),
                        Action::Write(a) => written.push(a),
                        Action::Finish => break,
                        Action::Wait(w) if w.answers && !ready.is_empty() => {
                            for id in ready.drain(..).rev() {
                                s.answered(id, id);
                            }
                        }
                        Action::Wait(w) if w.read => match reads.next() {
                            Some(bytes) => s.received(bytes),
                            None => s.end_of_stream(),
                        },
                        other => panic!("cap {cap} cut {cut}: {other:?}"),
                    }
                    assert!(s.in_flight() <= cap);
                }
                assert_eq!(written, [0, 1, 2, 3, 4], "cap {cap} cut {cut}");
            }
        }
    }
}
