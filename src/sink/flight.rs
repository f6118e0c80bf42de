//! One batch's life on its way to JetStream, as a sans-IO state machine.
//!
//! The publish window ([`super::window`]) makes a [`Flight`] per batch, tells it the time and
//! what happened — the batch was sent, JetStream acknowledged it, an attempt failed (classified
//! permanent or retryable), the spool took it or not — together with where batches can go now
//! ([`Active`]), and does what the returned [`Step`] says. The flight reads no clock, touches no
//! socket and spawns nothing, so the rules below are tested as tables on a simulated clock.
//!
//! Rules (the README's "Semantics", "Several NATS clusters" and "Disk spool", RELIABILITY.md):
//! - **One Msg-Id.** Every attempt publishes the same batch with the same `Nats-Msg-Id`, to
//!   the cluster active when the attempt is made: after a failover, the new one.
//! - **Retry.** A failed attempt (no PubAck within `nats.ack_timeout_ms`, a JetStream 503, a lost
//!   connection, no usable cluster) is tried again after a pause that starts at
//!   `nats.retry_backoff_ms` and doubles up to [`MAX_BACKOFF`].
//! - **Permanent errors** (stream full, batch over `max_payload`: JetStream gives the same answer
//!   to the same batch) refuse the events at once.
//! - **Deadline** (`nats.publish_deadline_ms` after the batch was sent): when the next pause would
//!   end past it, a batch no cluster acknowledged is spooled (spool on), refused if no attempt
//!   ever reached a cluster (503 `nats_unavailable` when none is usable, else 504
//!   `ack_timeout`), or else *told*: the requests are answered now, but the idempotency keys
//!   stay claimed and the batch goes on being published with its Msg-Id until JetStream answers
//!   (`stored_late`) or `stream.duplicate_window_ms` after it was sent has passed.
//! - **Spool on silence.** With the spool on, a batch no cluster can take now is spooled at
//!   once instead of waiting out its deadline.
//! - **Full window.** A batch that found no room in the ack window before its deadline was
//!   never sent: it is spooled (spool on) or refused with 503 `queue_full`/`ack_window_full`.

use std::time::{Duration, Instant};

use crate::error::{ErrorCode, Refusal};

/// Longest pause between two attempts of a batch.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The settings every flight follows (from `[nats]`, `[stream]` and `[spool]`).
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// `nats.publish_deadline_ms`: how long the edge waits for an answer, from the send.
    pub deadline: Duration,
    /// `stream.duplicate_window_ms`: how long, from the send, a told batch keeps being
    /// published to learn whether it was stored (retries are harmless inside the window).
    pub resolve_within: Duration,
    /// `nats.retry_backoff_ms`: the first pause between two attempts.
    pub backoff: Duration,
    /// Batches no cluster takes go to the disk spool.
    pub spool: bool,
}

/// Where batches can go when the flight is asked to decide: the router's active cluster, or
/// why there is none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Active {
    /// Cluster number `.0` takes batches.
    Cluster(usize),
    /// A NATS server is connected, but no cluster's stream is checked yet.
    NoStream,
    /// No NATS server is connected.
    NoServer,
}

/// What went wrong with one attempt, as the window classified it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// JetStream answered with an error it will give the same batch again: refuse with this.
    Permanent(Refusal),
    /// Anything a later attempt may fix: no PubAck in time, a JetStream 503, no connection,
    /// the stream missing.
    Retryable,
}

/// What the window does next for a flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Publish the batch, with its one `Nats-Msg-Id`, to cluster `cluster`; then report
    /// [`Flight::sent`] if it left, and [`Flight::acked`] or [`Flight::failed`].
    Publish { cluster: usize },
    /// Wait until `at`, then call [`Flight::retry`].
    Retry { at: Instant },
    /// Answer every event's request now with this refusal, but keep the idempotency keys
    /// claimed: the batch may be stored and is still being resolved. Then call
    /// [`Flight::told`].
    Tell(Refusal),
    /// Write the batch to the disk spool; then call [`Flight::spooled`] or
    /// [`Flight::spool_refused`].
    Spool(Cause),
    /// The flight is over: answer every event (request and idempotency key) with this.
    Done(End),
}

/// Why a batch is spooled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// No cluster is usable now.
    NoCluster,
    /// No room in the ack window before the deadline; never sent.
    WindowFull,
    /// No cluster acknowledged it before its deadline.
    Deadline,
}

/// How a flight ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// JetStream on cluster `cluster` stored the batch at stream sequence `seq`; `late` when
    /// the requests were already told it timed out.
    Stored { cluster: usize, seq: u64, late: bool },
    /// The batch is in the disk spool.
    Spooled,
    /// The events are refused.
    Refused { refusal: Refusal, why: Why },
}

/// Why a flight's events are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// JetStream gave an error a retry will not change.
    Permanent,
    /// No room in the ack window before the deadline, and no spool; never sent.
    WindowFull,
    /// The deadline came and no attempt ever reached a cluster.
    NeverReached,
    /// Told at the deadline, then no answer from JetStream within the duplicate window.
    Unresolved,
    /// The spool could not take the batch.
    SpoolRefused,
}

/// One batch from its send to its answer.
#[derive(Debug)]
pub struct Flight {
    params: Params,
    sent: Instant,
    deadline: Instant,
    /// The next pause between attempts.
    backoff: Duration,
    tries: u32,
    /// Some attempt left for a cluster: JetStream may have stored the batch.
    maybe_stored: bool,
    /// The requests were told at the deadline; the batch is being resolved.
    told: bool,
    /// When the failure that asked for [`Step::Tell`] happened ([`Flight::told`] goes on
    /// from there).
    telling: Option<Instant>,
}

impl Active {
    /// Why events cannot be published now; `None` while a cluster is active.
    pub fn refusal(self) -> Option<Refusal> {
        match self {
            Active::Cluster(_) => None,
            Active::NoStream => Some(Refusal::new(
                ErrorCode::NatsUnavailable,
                "the JetStream stream is not available yet",
            )),
            Active::NoServer => {
                Some(Refusal::new(ErrorCode::NatsUnavailable, "no NATS server is reachable"))
            }
        }
    }
}

impl Step {
    /// The `outcome` label of `edgerelay_batches_total` this step counts, if it counts one.
    pub fn batch_outcome(&self) -> Option<&'static str> {
        match self {
            Step::Tell(_) => Some("timeout"),
            Step::Done(End::Stored { late: false, .. }) => Some("stored"),
            Step::Done(End::Stored { late: true, .. }) => Some("stored_late"),
            Step::Done(End::Spooled) => Some("spooled"),
            Step::Done(End::Refused { why, .. }) => match why {
                Why::NeverReached => Some("timeout"),
                Why::Unresolved => None, // counted as `timeout` when it was told
                Why::Permanent | Why::WindowFull | Why::SpoolRefused => Some("refused"),
            },
            Step::Publish { .. } | Step::Retry { .. } | Step::Spool(_) => None,
        }
    }
}

impl Flight {
    /// A batch sent at `now`: its deadline is `params.deadline` later.
    pub fn new(now: Instant, params: Params) -> Self {
        Self {
            params,
            sent: now,
            deadline: now + params.deadline,
            backoff: params.backoff,
            tries: 1,
            maybe_stored: false,
            told: false,
            telling: None,
        }
    }

    /// When the batch was sent (the flush time runs from here).
    pub fn sent_at(&self) -> Instant {
        self.sent
    }

    /// Attempts made so far, the current one included.
    pub fn tries(&self) -> u32 {
        self.tries
    }

    /// The first attempt, at `now`.
    pub fn start(&mut self, now: Instant, active: Active) -> Step {
        self.attempt(now, active)
    }

    /// The ack window had no room for the batch before its deadline: it was never sent.
    pub fn no_room(&mut self) -> Step {
        if self.params.spool {
            return Step::Spool(Cause::WindowFull);
        }
        Step::Done(End::Refused {
            refusal: Refusal::new(
                ErrorCode::QueueFull,
                format!(
                    "JetStream has not acknowledged the batches in flight for {} ms; retry with the same Idempotency-Key",
                    self.params.deadline.as_millis()
                ),
            )
            .because("ack_window_full"),
            why: Why::WindowFull,
        })
    }

    /// The attempt left for its cluster: from now on JetStream may have stored the batch.
    pub fn sent(&mut self) {
        self.maybe_stored = true;
    }

    /// JetStream on `cluster` acknowledged the batch at stream sequence `seq`.
    pub fn acked(&mut self, cluster: usize, seq: u64) -> Step {
        Step::Done(End::Stored { cluster, seq, late: self.told })
    }

    /// The attempt failed at `now`; `active` is where batches can go after it.
    pub fn failed(&mut self, now: Instant, failure: Failure, active: Active) -> Step {
        match failure {
            Failure::Permanent(refusal) => {
                Step::Done(End::Refused { refusal, why: Why::Permanent })
            }
            Failure::Retryable => self.after_failure(now, active),
        }
    }

    /// The requests were told ([`Step::Tell`]): go on from the failure that asked for it.
    pub fn told(&mut self) -> Step {
        let now = self.telling.take().unwrap_or(self.deadline);
        self.resolve_or_retry(now)
    }

    /// The pause after a failure is over: the next attempt, at `now`.
    pub fn retry(&mut self, now: Instant, active: Active) -> Step {
        self.tries += 1;
        self.attempt(now, active)
    }

    /// The spool stored the batch.
    pub fn spooled(&mut self) -> Step {
        Step::Done(End::Spooled)
    }

    /// The spool could not store the batch; `refusal` says why.
    pub fn spool_refused(&mut self, refusal: Refusal) -> Step {
        Step::Done(End::Refused { refusal, why: Why::SpoolRefused })
    }

    fn attempt(&mut self, now: Instant, active: Active) -> Step {
        match active {
            Active::Cluster(cluster) => Step::Publish { cluster },
            // Nothing could take it now: waiting out the deadline only delays the answer.
            Active::NoStream | Active::NoServer if self.params.spool && !self.told => {
                Step::Spool(Cause::NoCluster)
            }
            Active::NoStream | Active::NoServer => self.after_failure(now, active),
        }
    }

    fn after_failure(&mut self, now: Instant, active: Active) -> Step {
        if !self.told && now + self.backoff >= self.deadline {
            if self.params.spool {
                return Step::Spool(Cause::Deadline);
            }
            let refusal = active.refusal().unwrap_or_else(|| self.ack_timeout());
            if !self.maybe_stored {
                return Step::Done(End::Refused { refusal, why: Why::NeverReached });
            }
            // The edge's time is up, but the batch may be stored: answer now, and go on
            // publishing it with the same Msg-Id until JetStream says, so that an event
            // retried with its Idempotency-Key waits for this outcome instead of being
            // published a second time.
            self.told = true;
            self.telling = Some(now);
            return Step::Tell(refusal);
        }
        self.resolve_or_retry(now)
    }

    fn resolve_or_retry(&mut self, now: Instant) -> Step {
        if self.told && now >= self.sent + self.params.resolve_within {
            return Step::Done(End::Refused { refusal: self.ack_timeout(), why: Why::Unresolved });
        }
        let at = now + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Step::Retry { at }
    }

    fn ack_timeout(&self) -> Refusal {
        Refusal::new(
            ErrorCode::AckTimeout,
            format!(
                "JetStream did not acknowledge within {} ms; retry with the same Idempotency-Key",
                self.params.deadline.as_millis()
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;

    use Active::{Cluster, NoServer, NoStream};
    use Input::*;

    /// What the window tells a flight: times in milliseconds since the batch was sent.
    #[derive(Clone, Debug)]
    enum Input {
        Start(u64, Active),
        NoRoom,
        Sent,
        Acked(usize, u64),
        Failed(u64, Failure, Active),
        Told,
        Retry(u64, Active),
        Spooled,
        SpoolRefused(Refusal),
    }

    /// Deadline 1 s, duplicate window 5 s, first pause 100 ms.
    fn params(spool: bool) -> Params {
        Params {
            deadline: Duration::from_millis(1_000),
            resolve_within: Duration::from_millis(5_000),
            backoff: Duration::from_millis(100),
            spool,
        }
    }

    /// The simulated clock: `at(ms)` is `ms` milliseconds after the batch was sent.
    fn at(ms: u64) -> Instant {
        static T0: OnceLock<Instant> = OnceLock::new();
        *T0.get_or_init(Instant::now) + Duration::from_millis(ms)
    }

    /// One row of a table: an input and the step it must return (`None` for none).
    type Row = (Input, Option<Step>);

    /// Feeds `table`'s inputs to a flight sent at `at(0)` and checks each step (`None` for
    /// the inputs that return none), then the `edgerelay_batches_total` outcomes counted.
    fn check(params: Params, table: &[Row], outcomes: &[&str]) {
        let mut f = Flight::new(at(0), params);
        let mut counted = Vec::new();
        for (i, (input, want)) in table.iter().enumerate() {
            let step = match input {
                Start(ms, active) => Some(f.start(at(*ms), *active)),
                NoRoom => Some(f.no_room()),
                Sent => {
                    f.sent();
                    None
                }
                Acked(cluster, seq) => Some(f.acked(*cluster, *seq)),
                Failed(ms, failure, active) => Some(f.failed(at(*ms), failure.clone(), *active)),
                Told => Some(f.told()),
                Retry(ms, active) => Some(f.retry(at(*ms), *active)),
                Spooled => Some(f.spooled()),
                SpoolRefused(refusal) => Some(f.spool_refused(refusal.clone())),
            };
            assert_eq!(&step, want, "row {i}: {input:?}");
            counted.extend(step.as_ref().and_then(Step::batch_outcome));
        }
        assert_eq!(counted, outcomes, "edgerelay_batches_total");
    }

    fn retry_at(ms: u64) -> Option<Step> {
        Some(Step::Retry { at: at(ms) })
    }

    fn publish(cluster: usize) -> Option<Step> {
        Some(Step::Publish { cluster })
    }

    fn done(end: End) -> Option<Step> {
        Some(Step::Done(end))
    }

    fn refused(refusal: Refusal, why: Why) -> Option<Step> {
        done(End::Refused { refusal, why })
    }

    fn ack_timeout() -> Refusal {
        Refusal::new(
            ErrorCode::AckTimeout,
            "JetStream did not acknowledge within 1000 ms; retry with the same Idempotency-Key",
        )
    }

    fn stream_full() -> Refusal {
        Refusal::new(ErrorCode::Rejected, "the stream is full").because("stream_full")
    }

    /// A retryable failure at `ms` with cluster 0 still active.
    fn fail(ms: u64) -> Input {
        Failed(ms, Failure::Retryable, Cluster(0))
    }

    fn tell(refusal: Refusal) -> Option<Step> {
        Some(Step::Tell(refusal))
    }

    fn spool(cause: Cause) -> Option<Step> {
        Some(Step::Spool(cause))
    }

    /// The rows most tables open with: started with cluster 0 active, published there, sent.
    fn sent() -> Vec<Row> {
        vec![(Start(0, Cluster(0)), publish(0)), (Sent, None)]
    }

    /// A retryable failure at `failed` ms (cluster 0 still active) answered with a retry at
    /// `retry` ms, which publishes on cluster 0 again.
    fn retried(failed: u64, retry: u64) -> Vec<Row> {
        vec![(fail(failed), retry_at(retry)), (Retry(retry, Cluster(0)), publish(0))]
    }

    /// A retryable failure at `failed` ms that the deadline answers with a 504 (the requests
    /// are told), then the flight retried at `retry` ms on cluster 0 with its keys kept.
    fn told_504(failed: u64, retry: u64) -> Vec<Row> {
        vec![
            (fail(failed), tell(ack_timeout())),
            (Told, retry_at(retry)),
            (Retry(retry, Cluster(0)), publish(0)),
        ]
    }

    #[test]
    fn an_acknowledged_batch_is_answered_stored_by_the_cluster_that_stored_it() {
        let stored = done(End::Stored { cluster: 1, seq: 42, late: false });
        let table = [(Start(0, Cluster(1)), publish(1)), (Sent, None), (Acked(1, 42), stored)];
        check(params(false), &table, &["stored"]);
    }

    #[test]
    fn a_504_at_the_deadline_keeps_the_keys_and_the_batch_is_still_retried() {
        let table = [
            sent(),
            // No PubAck within ack_timeout: retried after 100 ms, then 200 ms.
            retried(300, 400),
            retried(700, 900),
            // The next pause would end past the deadline: the requests are told 504 now, and
            // the batch goes on being published with its Msg-Id.
            told_504(1_000, 1_400),
        ];
        check(params(false), &table.concat(), &["timeout"]);
    }

    #[test]
    fn a_late_ack_after_the_504_answers_the_kept_keys_stored_late() {
        let late = (Acked(0, 7), done(End::Stored { cluster: 0, seq: 7, late: true }));
        let table = [sent(), told_504(950, 1_050), vec![late]];
        check(params(false), &table.concat(), &["timeout", "stored_late"]);
    }

    #[test]
    fn retries_after_the_deadline_back_off_to_a_second_and_end_with_the_duplicate_window() {
        let table = [
            sent(),
            retried(100, 200),
            retried(300, 500),
            told_504(600, 1_000),
            retried(1_500, 2_300),
            retried(2_800, 3_800),
            retried(4_300, 5_300),
            // Past the duplicate window a retry could store it twice: give up, 504. Counted as
            // `timeout` when it was told, not again.
            vec![(fail(5_800), refused(ack_timeout(), Why::Unresolved))],
        ];
        check(params(false), &table.concat(), &["timeout"]);
    }

    #[test]
    fn a_failover_retries_the_batch_on_the_new_cluster_within_the_same_deadline() {
        // `Step::Publish` names a cluster and nothing else: the window publishes the flight's
        // one encoded batch, with its one Msg-Id, wherever the step says.
        let mut table = sent();
        // Cluster 0 went silent and the router moved to cluster 1.
        table.push((Failed(300, Failure::Retryable, Cluster(1)), retry_at(400)));
        table.push((Retry(400, Cluster(1)), publish(1)));
        // The edge sees a slower answer, not an error…
        let stored = (Acked(1, 3), done(End::Stored { cluster: 1, seq: 3, late: false }));
        check(params(false), &[&table[..], &[stored]].concat(), &["stored"]);
        // …and the deadline still counts from the first send.
        table.push((Failed(950, Failure::Retryable, Cluster(1)), tell(ack_timeout())));
        check(params(false), &table, &["timeout"]);
    }

    #[test]
    fn a_permanent_error_answers_at_once_even_after_the_504() {
        let permanent = || Failed(2, Failure::Permanent(stream_full()), Cluster(0));
        let refused_at_once = || vec![(permanent(), refused(stream_full(), Why::Permanent))];
        let at_once = [sent(), refused_at_once()];
        check(params(false), &at_once.concat(), &["refused"]);
        let after_504 = [sent(), told_504(990, 1_090), refused_at_once()];
        check(params(false), &after_504.concat(), &["timeout", "refused"]);
    }

    #[test]
    fn with_the_spool_a_batch_no_cluster_can_take_is_spooled_at_once() {
        for active in [NoServer, NoStream] {
            let table =
                [(Start(0, active), spool(Cause::NoCluster)), (Spooled, done(End::Spooled))];
            check(params(true), &table, &["spooled"]);
        }
        // Also when the active cluster is lost between two attempts.
        let lost = vec![
            (Failed(300, Failure::Retryable, NoServer), retry_at(400)),
            (Retry(400, NoServer), spool(Cause::NoCluster)),
            (Spooled, done(End::Spooled)),
        ];
        check(params(true), &[sent(), lost].concat(), &["spooled"]);
    }

    #[test]
    fn with_the_spool_a_silent_cluster_gets_the_batch_until_the_deadline_then_the_spool() {
        let to_spool = vec![(fail(900), spool(Cause::Deadline)), (Spooled, done(End::Spooled))];
        let table = [sent(), retried(500, 600), to_spool];
        check(params(true), &table.concat(), &["spooled"]);
    }

    #[test]
    fn a_spool_that_refuses_the_batch_refuses_its_events() {
        let full = Refusal::new(ErrorCode::QueueFull, "the relay's disk spool is full")
            .because("spool_full");
        let table = [
            (Start(0, NoServer), spool(Cause::NoCluster)),
            (SpoolRefused(full.clone()), refused(full, Why::SpoolRefused)),
        ];
        check(params(true), &table, &["refused"]);
    }

    #[test]
    fn without_the_spool_silence_gives_up_at_the_deadline_with_why_nothing_took_it() {
        let unreachable = Refusal::new(ErrorCode::NatsUnavailable, "no NATS server is reachable");
        let no_stream =
            Refusal::new(ErrorCode::NatsUnavailable, "the JetStream stream is not available yet");
        // No cluster all along: retried (it may come back) until the deadline, never sent.
        let table = [
            (Start(0, NoServer), retry_at(100)),
            (Retry(100, NoServer), retry_at(300)),
            (Retry(300, NoStream), retry_at(700)),
            (Retry(700, NoServer), refused(unreachable, Why::NeverReached)),
        ];
        check(params(false), &table, &["timeout"]);
        // A cluster whose connection refuses every send: nothing reached it, so nothing can
        // be stored; the refusal names what is missing when it comes.
        for (active, refusal) in [(Cluster(0), ack_timeout()), (NoStream, no_stream)] {
            let never = refused(refusal, Why::NeverReached);
            let table = [
                (Start(0, Cluster(0)), publish(0)),
                (Failed(950, Failure::Retryable, active), never),
            ];
            check(params(false), &table, &["timeout"]);
        }
    }

    #[test]
    fn a_full_window_spools_the_batch_or_refuses_it_as_never_sent() {
        let window_full = Refusal::new(
            ErrorCode::QueueFull,
            "JetStream has not acknowledged the batches in flight for 1000 ms; retry with the same Idempotency-Key",
        )
        .because("ack_window_full");
        assert_eq!((window_full.code.status(), window_full.retry_after.is_some()), (503, true));
        let refuse = [(NoRoom, refused(window_full, Why::WindowFull))];
        check(params(false), &refuse, &["refused"]);
        let spooled = [(NoRoom, spool(Cause::WindowFull)), (Spooled, done(End::Spooled))];
        check(params(true), &spooled, &["spooled"]);
    }

    #[test]
    fn told_past_the_duplicate_window_gives_up_right_after_telling() {
        let short_window = Params { resolve_within: Duration::from_millis(500), ..params(false) };
        let told_then_given_up =
            vec![(fail(950), tell(ack_timeout())), (Told, refused(ack_timeout(), Why::Unresolved))];
        check(short_window, &[sent(), told_then_given_up].concat(), &["timeout"]);
    }

    #[test]
    fn the_504_is_a_503_when_no_cluster_is_usable_at_the_deadline() {
        let unreachable = Refusal::new(ErrorCode::NatsUnavailable, "no NATS server is reachable");
        let no_cluster = vec![
            (Failed(950, Failure::Retryable, NoServer), tell(unreachable)),
            (Told, retry_at(1_050)),
            // Still resolving: with no cluster it waits for one instead of spooling.
            (Retry(1_050, NoServer), retry_at(1_250)),
            (Retry(1_250, Cluster(1)), publish(1)),
        ];
        check(params(false), &[sent(), no_cluster].concat(), &["timeout"]);
    }
}
