//! Table tests of the stream state machine on a simulated clock: the in-flight cap, answer
//! order, broken framing, end of stream and shutdown, the pre-auth limit and head
//! authentication, and slow frames.

use super::*;
use std::time::Duration;

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
    /// The clock moves on this many milliseconds.
    Later(u64),
    /// The driver held off reading this many milliseconds (no room in the memory budget),
    /// and the clock moved on as much.
    Held(u64),
    /// The driver reports whether the stream has an identity after a request.
    Authed(bool),
    /// The verdict on a head: accepted, or refused as unauthorized.
    Head(bool),
}

/// An action, as a table row expects it.
#[derive(Clone, Debug, PartialEq)]
enum Out {
    Decode(u64),
    /// Authenticate from a head of this many bytes.
    Auth(usize),
    Write(u64),
    Refuse(ErrorCode, &'static str),
    Stop(u32),
    Finish,
    /// Wait for: read (at most this many bytes), answers, shutdown.
    Wait(usize, bool, bool),
}

use In::*;
use Out::{Auth as Au, Decode as D, Finish as F, Stop as S, Wait as W, Write as Wr};

const LIMIT: usize = 100;
const PREAUTH: usize = 20;
/// What an authenticated stream may read at once.
const ANY: usize = READ_CHUNK;
const PACE: PaceLimits =
    PaceLimits { timeout: Duration::from_millis(1000), min_bytes_per_sec: 100 };

fn limits(max_in_flight: usize) -> Limits {
    Limits {
        decoder: FrameDecoder::new(LIMIT),
        preauth_frame_bytes: PREAUTH,
        max_in_flight,
        pace: PACE,
    }
}

#[allow(non_snake_case)]
fn R(code: ErrorCode) -> Out {
    Out::Refuse(code, "")
}

/// Frames with bodies of these lengths, back to back.
fn frames(lens: &[u64]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for &len in lens {
        framing::put_len(len, &mut b);
        b.extend_from_slice(&vec![0; len as usize]);
    }
    b.to_vec()
}

/// An authenticated stream: see [`run_as`].
fn run(max_in_flight: usize, draining: bool, rows: &[(In, &[Out])]) {
    run_as(true, max_in_flight, draining, rows)
}

/// Feeds each row's input to one stream and checks the actions polled after it, up to and
/// including the first `Wait` or `Finish`. Refusals are compared by code, and by reason
/// when the row names one.
fn run_as(authenticated: bool, max_in_flight: usize, draining: bool, rows: &[(In, &[Out])]) {
    let mut s = StreamState::new(limits(max_in_flight), authenticated, draining);
    let mut now = Instant::now();
    for (n, (input, want)) in rows.iter().enumerate() {
        match input {
            Read(bytes) => s.received(bytes, now),
            Fin => s.end_of_stream(),
            Shutdown => s.shutdown(),
            Answer(id) => s.answered(*id, *id),
            Later(ms) => now += Duration::from_millis(*ms),
            Held(ms) => {
                s.held(Duration::from_millis(*ms));
                now += Duration::from_millis(*ms);
            }
            Authed(yes) => s.authenticated(*yes),
            Head(true) => s.head_checked(Ok(())),
            Head(false) => s.head_checked(Err(Refusal::new(ErrorCode::Unauthorized, "no"))),
        }
        let got = actions(&mut s, now);
        let got: Vec<Out> = got
            .into_iter()
            .zip(want.iter().map(Some).chain(std::iter::repeat(None)))
            .map(|(g, w)| match (g, w) {
                (Out::Refuse(c, _), Some(Out::Refuse(_, ""))) => Out::Refuse(c, ""),
                (g, _) => g,
            })
            .collect();
        assert_eq!(got, *want, "row {n}: {input:?}");
    }
}

fn actions(s: &mut StreamState<u64>, now: Instant) -> Vec<Out> {
    let mut out = Vec::new();
    loop {
        let action = match s.poll(now) {
            Action::Decode { id, .. } => D(id),
            Action::Authenticate { head } => Au(head.len()),
            Action::Write(a) => Wr(a),
            Action::Refuse(r) => Out::Refuse(r.code, r.reason),
            Action::Stop(code) => S(code),
            Action::Finish => F,
            Action::Wait(w) => {
                assert!(w.read > 0 || w.answers || w.shutdown, "a wait for nothing");
                assert_eq!(w.deadline.is_some(), w.read > 0 && !s.buf.is_empty());
                W(w.read, w.answers, w.shutdown)
            }
        };
        let last = matches!(action, W(..) | F | Au(..));
        out.push(action);
        if last {
            return out;
        }
    }
}

#[test]
fn a_new_stream_waits_to_read() {
    run(4, false, &[(Read(vec![]), &[W(ANY, false, true)])]);
}

#[test]
fn the_in_flight_cap_stops_taking_in_frames_and_reading_until_an_answer_is_written() {
    run(
        2,
        false,
        &[
            // Three frames in one read: two are taken in, the third waits in the buffer,
            // and nothing more is read.
            (Read(frames(&[1, 2, 3])), &[D(0), D(1), W(0, true, true)]),
            // The second answer alone frees nothing: the first is not written yet.
            (Answer(1), &[W(0, true, true)]),
            // Writing the first frees a place: the buffered frame is taken in.
            (Answer(0), &[Wr(0), D(2), Wr(1), W(ANY, true, true)]),
            (Answer(2), &[Wr(2), W(ANY, false, true)]),
        ],
    );
}

#[test]
fn a_cap_of_one_takes_one_request_at_a_time() {
    run(
        1,
        false,
        &[
            (Read(frames(&[0, 0, 0])), &[D(0), W(0, true, true)]),
            (Answer(0), &[Wr(0), D(1), W(0, true, true)]),
            (Answer(1), &[Wr(1), D(2), W(0, true, true)]),
            (Answer(2), &[Wr(2), W(ANY, false, true)]),
        ],
    );
}

#[test]
fn answers_are_written_in_request_order_whatever_order_they_are_ready_in() {
    run(
        8,
        false,
        &[
            (Read(frames(&[5, 5, 5, 5])), &[D(0), D(1), D(2), D(3), W(ANY, true, true)]),
            (Answer(3), &[W(ANY, true, true)]),
            (Answer(1), &[W(ANY, true, true)]),
            (Answer(0), &[Wr(0), Wr(1), W(ANY, true, true)]),
            (Answer(2), &[Wr(2), Wr(3), W(ANY, false, true)]),
        ],
    );
}

#[test]
fn unknown_and_repeated_answers_are_ignored() {
    run(
        8,
        false,
        &[
            (Read(frames(&[1, 1])), &[D(0), D(1), W(ANY, true, true)]),
            (Answer(7), &[W(ANY, true, true)]),
            (Answer(0), &[Wr(0), W(ANY, true, true)]),
            (Answer(0), &[W(ANY, true, true)]),
            (Answer(1), &[Wr(1), W(ANY, false, true)]),
        ],
    );
}

#[test]
fn a_frame_split_across_reads_is_taken_in_once_complete() {
    run(
        4,
        false,
        &[
            (Read(vec![3, 0xaa]), &[W(ANY, false, true)]),
            (Read(vec![0xbb]), &[W(ANY, false, true)]),
            (Read(vec![0xcc, 0]), &[D(0), D(1), W(ANY, true, true)]),
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
            (Read(frames(&[1])), &[D(0), W(ANY, true, true)]),
            (Read(vec![101, 0, 0]), &[W(0, true, false)]),
            (Answer(0), &[Wr(0), R(ErrorCode::TooLarge), S(STREAM_FRAME_TOO_LARGE), F]),
        ],
    );
}

#[test]
fn a_malformed_prefix_is_refused_and_stops_the_stream_with_its_code() {
    run(4, false, &[(Read(vec![0xff; 11]), &[R(ErrorCode::BadRequest), S(STREAM_MALFORMED), F])]);
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
            (Read(bytes), &[D(0), D(1), W(0, true, false)]),
            (Answer(1), &[W(0, true, false)]),
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
            (Read(bytes), &[D(0), W(0, true, true)]),
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
            (Read(frames(&[1, 1])), &[D(0), D(1), W(ANY, true, true)]),
            (Fin, &[W(0, true, false)]),
            (Answer(0), &[Wr(0), W(0, true, false)]),
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
            (Read(bytes), &[D(0), W(0, true, true)]),
            (Answer(0), &[Wr(0), D(1), W(0, true, true)]),
            (Answer(1), &[Wr(1), W(ANY, false, true)]),
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
            (Read(frames(&[1, 1])), &[D(0), W(0, true, true)]),
            (Shutdown, &[S(STREAM_SHUTTING_DOWN), W(0, true, false)]),
            // The frame read before the drain is still taken in and answered.
            (Answer(0), &[Wr(0), D(1), W(0, true, false)]),
            (Answer(1), &[Wr(1), F]),
        ],
    );
}

/// One frame read, then the client's fin: reading is over, the frame's answer awaited.
fn one_frame_then_the_fin() -> [(In, &'static [Out]); 2] {
    [(Read(frames(&[1])), &[D(0), W(ANY, true, true)]), (Fin, &[W(0, true, false)])]
}

#[test]
fn shutdown_after_the_fin_sends_no_stop() {
    let then: [(In, &[Out]); 2] = [(Shutdown, &[W(0, true, false)]), (Answer(0), &[Wr(0), F])];
    run(4, false, &[&one_frame_then_the_fin()[..], &then].concat());
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
    let then: [(In, &[Out]); 6] = [
        (Read(frames(&[1])), &[W(0, true, false)]),
        (Fin, &[W(0, true, false)]),
        (Shutdown, &[W(0, true, false)]),
        (Answer(0), &[Wr(0), F]),
        (Read(frames(&[1])), &[F]),
        (Answer(1), &[F]),
    ];
    run(4, false, &[&one_frame_then_the_fin()[..], &then].concat());
}

/// A frame announcing `len` bytes, with only its first `have` bytes.
fn partial(len: u64, have: usize) -> Vec<u8> {
    let mut b = BytesMut::new();
    framing::put_len(len, &mut b);
    b.extend_from_slice(&vec![0; have]);
    b.to_vec()
}

/// What a stream without an identity may still read: the pre-auth limit and one prefix.
const PRE: usize = PREAUTH + MAX_VARINT_BYTES;

#[test]
fn without_an_identity_reads_stop_at_the_pre_auth_limit() {
    run_as(
        false,
        4,
        false,
        &[
            (Read(vec![]), &[W(PRE, false, true)]),
            // A small frame is taken in; until the driver says how its authentication
            // went, the limit still applies.
            (Read(frames(&[5])), &[D(0), W(PRE, true, true)]),
            (Read(partial(15, 3)), &[W(PRE - 4, true, true)]),
            (Authed(true), &[W(ANY, true, true)]),
            // A 401 later drops the stream back under the limit.
            (Authed(false), &[W(PRE - 4, true, true)]),
        ],
    );
}

#[test]
fn a_large_first_frame_authenticates_from_its_head_then_reads_on() {
    run_as(
        false,
        4,
        false,
        &[
            (Read(partial(LIMIT as u64, 10)), &[W(PRE - 11, false, true)]),
            (Read(vec![0; 10]), &[Au(PREAUTH)]),
            // Nothing is read or taken in while the head is checked.
            (Later(0), &[W(0, false, true)]),
            (Head(true), &[W(ANY, false, true)]),
            (Read(vec![0; LIMIT - PREAUTH]), &[D(0), W(ANY, true, true)]),
        ],
    );
}

#[test]
fn a_large_frame_whose_head_is_refused_ends_the_stream_after_the_earlier_answers() {
    run_as(
        false,
        4,
        false,
        &[
            (Read(frames(&[1])), &[D(0), W(PRE, true, true)]),
            (Authed(false), &[W(PRE, true, true)]),
            (Read(partial(LIMIT as u64, PREAUTH)), &[Au(PREAUTH)]),
            (Head(false), &[W(0, true, false)]),
            (Answer(0), &[Wr(0), R(ErrorCode::Unauthorized), S(STREAM_UNAUTHENTICATED), F]),
        ],
    );
}

#[test]
fn a_partial_large_frame_at_the_fin_is_dropped_unchecked() {
    run_as(
        false,
        4,
        false,
        &[(Read(partial(LIMIT as u64, 5)), &[W(PRE - 6, false, true)]), (Fin, &[F])],
    );
}

#[test]
fn a_stalled_frame_is_refused_at_the_timeout_and_stops_the_stream() {
    let stalled = Out::Refuse(ErrorCode::RequestTimeout, "frame_timeout");
    run(
        4,
        false,
        &[
            (Read(frames(&[0])), &[D(0), W(ANY, true, true)]),
            (Read(partial(5, 1)), &[W(ANY, true, true)]),
            (Later(999), &[W(ANY, true, true)]),
            (Later(1), &[W(0, true, false)]),
            (Answer(0), &[Wr(0), stalled, S(STREAM_TOO_SLOW), F]),
        ],
    );
}

#[test]
fn a_trickle_below_the_minimum_rate_is_refused() {
    // 100 bytes/s on average once 1 s has passed: 3 bytes do not keep a frame alive past it,
    // though no gap reaches the timeout.
    let slow = Out::Refuse(ErrorCode::RequestTimeout, "frame_too_slow");
    run(
        4,
        false,
        &[
            (Read(partial(LIMIT as u64, 1)), &[W(ANY, false, true)]),
            (Later(500), &[W(ANY, false, true)]),
            (Read(vec![0]), &[W(ANY, false, true)]),
            (Later(499), &[W(ANY, false, true)]),
            (Later(1), &[slow, S(STREAM_TOO_SLOW), F]),
        ],
    );
}

#[test]
fn the_clock_runs_only_while_the_stream_asks_for_bytes() {
    let stalled = Out::Refuse(ErrorCode::RequestTimeout, "frame_timeout");
    // At the cap: a partial frame waits as long as the answer takes; then as long as the
    // driver holds off reading (no room in the memory budget).
    run(
        1,
        false,
        &[
            (Read([frames(&[1]), partial(5, 1)].concat()), &[D(0), W(0, true, true)]),
            (Later(5000), &[W(0, true, true)]),
            (Answer(0), &[Wr(0), W(ANY, false, true)]),
            (Held(5000), &[W(ANY, false, true)]),
            (Later(999), &[W(ANY, false, true)]),
            (Later(1), &[stalled.clone(), S(STREAM_TOO_SLOW), F]),
        ],
    );
    // While a head is checked.
    run_as(
        false,
        4,
        false,
        &[
            (Read(partial(LIMIT as u64, PREAUTH)), &[Au(PREAUTH)]),
            (Later(5000), &[W(0, false, true)]),
            (Head(true), &[W(ANY, false, true)]),
            (Later(999), &[W(ANY, false, true)]),
            (Later(1), &[stalled.clone(), S(STREAM_TOO_SLOW), F]),
        ],
    );
    // Each frame gets its own clock.
    run(
        4,
        false,
        &[
            (Read(partial(3, 1)), &[W(ANY, false, true)]),
            (Later(900), &[W(ANY, false, true)]),
            (Read([vec![0, 0], partial(2, 0)].concat()), &[D(0), W(ANY, true, true)]),
            (Later(999), &[W(ANY, true, true)]),
            (Later(1), &[W(0, true, false)]),
            (Answer(0), &[Wr(0), stalled, S(STREAM_TOO_SLOW), F]),
        ],
    );
}

#[test]
fn the_driver_learns_a_stream_ended_too_slow_and_when_to_poll() {
    let mut s = StreamState::<u64>::new(limits(4), true, false);
    let t0 = Instant::now();
    s.received(&partial(5, 1), t0);
    let Action::Wait(w) = s.poll(t0) else { panic!("not a wait") };
    assert_eq!(w.deadline, Some(t0 + PACE.timeout));
    assert!(!s.too_slow());
    assert!(matches!(s.poll(t0 + PACE.timeout), Action::Refuse(_)));
    assert!(s.too_slow());
}

#[test]
fn answers_in_any_order_with_reads_split_anywhere_come_out_in_order() {
    // Every cut of the byte stream and every cap; answers come in reverse order of arrival.
    let wire = frames(&[0, 3, 1, 7, 2]);
    for cap in 1..=5 {
        for cut in 0..=wire.len() {
            let mut s = StreamState::new(limits(cap), true, false);
            let now = Instant::now();
            let (mut written, mut ready) = (Vec::new(), Vec::new());
            let mut reads = [&wire[..cut], &wire[cut..]].into_iter();
            loop {
                match s.poll(now) {
                    Action::Decode { id, .. } => ready.push(id),
                    Action::Write(a) => written.push(a),
                    Action::Finish => break,
                    Action::Wait(w) if w.answers && !ready.is_empty() => {
                        for id in ready.drain(..).rev() {
                            s.answered(id, id);
                        }
                    }
                    Action::Wait(w) if w.read > 0 => match reads.next() {
                        Some(bytes) => s.received(bytes, now),
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
