//! The verifier: reads the stream(s) back after the load and holds them against the ledger.
//!
//! Reading: an ordered consumer (deliver all) per stream and source, up to the stream's last
//! sequence as it was when reading began; every message is an `edgerelay.v1.Batch` whose
//! events' payloads start with the ledger's [`Stamp`]. Events of other runs are skipped.
//!
//! Checks ([`judge`]):
//! - **missing**: acknowledged events found in no stream. Must be 0, except for events whose
//!   spool records the scenario itself destroyed (*written off*, counted apart).
//! - **duplicated**: events stored more than once. Must be 0 unless the event's attempts
//!   spanned a relay restart (the relay's `Idempotency-Key` memory is per process) or the
//!   copies sit in different clusters' streams (the duplicate window is per stream); those are
//!   counted apart as *excused*. Duplicates that followed an ambiguous answer (504, timeout,
//!   reset) are counted too, since they say where the duplicate came from.
//! - **stored, never acknowledged**: fine (the relay may store and then fail to answer);
//!   reported.
//! - **2xx while nothing could acknowledge**: for each known all-down interval, a fresh (not
//!   `duplicate`, not `spooled`) 2xx whose attempt was sent and answered entirely inside it.
//!   Must be 0.
//! - **recovery**: from each recovery mark (a fault repaired, or a fault that repairs itself)
//!   to the first 2xx answer of an attempt sent after it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use edgerelay::proto;
use futures::StreamExt as _;
use prost::Message as _;
use serde::Serialize;
use tokio::time::{timeout_at, Instant};

use super::ledger::Ledger;
use crate::events::Stamp;
use crate::model::{self, Percentiles};

/// What happened when, on the load's clock.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timeline {
    pub marks: Vec<Mark>,
    /// Intervals in which nothing could acknowledge an event (every NATS server down).
    pub all_down: Vec<Interval>,
}

/// One thing done to the system.
#[derive(Clone, Debug, Serialize)]
pub struct Mark {
    #[serde(serialize_with = "as_ms")]
    pub at: Duration,
    pub what: String,
    pub kind: MarkKind,
}

/// What a mark means for the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MarkKind {
    /// A fault injected.
    Fault,
    /// Recovery time is measured from here (a fault repaired, or a self-healing fault).
    Recovery,
    /// A relay process started again: its idempotency memory starts empty.
    RelayRestart,
    /// For the record only.
    Note,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Interval {
    #[serde(serialize_with = "as_ms")]
    pub from: Duration,
    #[serde(serialize_with = "as_ms")]
    pub to: Duration,
}

/// What the streams hold of one run.
#[derive(Clone, Debug, Default)]
pub struct Stored {
    /// Event number → times stored.
    pub counts: HashMap<u64, u32>,
    /// Events found in more than one of the sources merged (clusters): JetStream's
    /// duplicate window is per stream, so across clusters a copy is allowed.
    pub across: HashSet<u64>,
    /// Events the scenario destroyed on purpose (records of a spool segment it corrupted):
    /// missing is the expected outcome for them, reported apart.
    pub written_off: HashSet<u64>,
    /// Messages read (all runs).
    pub messages: u64,
    /// Messages that were no batch, or events without a stamp.
    pub undecodable: u64,
}

/// What a run comes to in the result table: the verdict's first counts, which the table's row
/// shows too.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counts {
    pub sent: u64,
    pub acknowledged: u64,
    pub missing: u64,
    pub duplicated: u64,
    pub stored_unacknowledged: u64,
    /// Longest recovery over the recovery marks; `None` without marks.
    pub recovery_ms: Option<f64>,
}

/// The ledger held against the streams.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verdict {
    #[serde(flatten)]
    pub counts: Counts,
    pub attempts: u64,
    /// Acknowledged with `spooled: true`.
    pub spooled: u64,
    /// Of `duplicated`: the event's attempts spanned a relay restart.
    pub duplicated_excused: u64,
    /// Of `duplicated`: the copies are in different clusters' streams (not a failure: the
    /// duplicate window is per stream).
    pub duplicated_across_clusters: u64,
    /// Acknowledged events missing because the scenario destroyed their spool records.
    pub missing_written_off: u64,
    /// Of `duplicated`: an earlier attempt had an ambiguous answer (504, timeout, reset).
    pub duplicated_after_ambiguous: u64,
    pub never_acknowledged: u64,
    pub false_acks: u64,
    /// Recovery marks after which no 2xx came.
    pub never_recovered: Vec<String>,
    /// Send→answer of the 2xx attempts.
    pub ack_latency_ms: Percentiles,
    /// Answers by label (`202`, `503 queue_full`, `timeout` …), every attempt.
    pub answers: std::collections::BTreeMap<String, u64>,
    /// Stretches of more than [`gap_threshold`] without a 2xx answer: (stop, resume) ms.
    pub ack_gaps_ms: Vec<(f64, f64)>,
    /// A few missing event numbers, for the logs.
    pub missing_examples: Vec<u64>,
    /// A few events stored more than once and not excused, with every attempt, for the logs.
    pub duplicated_examples: Vec<super::ledger::EventRecord>,
    pub failures: Vec<String>,
}

impl Timeline {
    pub fn mark(&mut self, at: Duration, kind: MarkKind, what: impl Into<String>) {
        let what = what.into();
        eprintln!("chaos:   {:>8.3} s  {what}", at.as_secs_f64());
        self.marks.push(Mark { at, what, kind });
    }

    pub fn all_down(&mut self, from: Duration, to: Duration) {
        self.all_down.push(Interval { from, to });
    }

    fn restarts(&self) -> impl Iterator<Item = Duration> + '_ {
        self.marks.iter().filter(|m| m.kind == MarkKind::RelayRestart).map(|m| m.at)
    }
}

impl Stored {
    /// Adds what another stream or source holds.
    pub fn merge(&mut self, other: Stored) {
        for (n, c) in other.counts {
            let seen = self.counts.entry(n).or_default();
            if *seen > 0 {
                self.across.insert(n);
            }
            *seen += c;
        }
        self.across.extend(other.across);
        self.written_off.extend(other.written_off);
        self.messages += other.messages;
        self.undecodable += other.undecodable;
    }
}

/// Reads every `(nats_url, stream)` (one per cluster the relay may have published to) and
/// adds up what they hold of run `nonce`.
pub async fn read_streams(
    sources: &[(String, &str)],
    nonce: u64,
    within: Duration,
) -> anyhow::Result<Stored> {
    let mut stored = Stored::default();
    for (url, stream) in sources {
        stored.merge(read_stream(url, stream, nonce, within).await?);
    }
    Ok(stored)
}

/// Reads stream `stream` on `nats_url` up to its last sequence (bounded by `within`) and
/// counts the events of run `nonce`.
pub async fn read_stream(
    nats_url: &str,
    stream: &str,
    nonce: u64,
    within: Duration,
) -> anyhow::Result<Stored> {
    let deadline = Instant::now() + within;
    let read = async {
        let client = async_nats::ConnectOptions::new()
            .name("chaos-verifier")
            .connect(nats_url)
            .await
            .with_context(|| format!("verifier: connecting to {nats_url}"))?;
        let js = async_nats::jetstream::new(client);
        let mut handle =
            js.get_stream(stream).await.with_context(|| format!("verifier: stream {stream}"))?;
        let last = handle.info().await.context("verifier: stream info")?.state.last_sequence;
        let mut stored = Stored::default();
        if last == 0 {
            return Ok(stored);
        }
        let consumer = handle
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .context("verifier: creating a consumer")?;
        let mut messages = consumer.messages().await.context("verifier: reading")?;
        while let Some(message) = messages.next().await {
            let Ok(message) = message else { continue };
            stored.messages += 1;
            match proto::Batch::decode(message.payload.as_ref()) {
                Ok(batch) => {
                    for event in &batch.events {
                        match Stamp::read(&event.payload) {
                            Some(s) if s.nonce == nonce => {
                                *stored.counts.entry(s.event).or_default() += 1
                            }
                            Some(_) => {}
                            None => stored.undecodable += 1,
                        }
                    }
                }
                Err(_) => stored.undecodable += 1,
            }
            let seq = message.info().map(|i| i.stream_sequence).unwrap_or_default();
            if seq >= last {
                break;
            }
        }
        anyhow::Ok(stored)
    };
    timeout_at(deadline, read)
        .await
        .with_context(|| format!("verifier: reading {stream} took longer than {within:?}"))?
}

/// A stretch without 2xx longer than this is a gap: a second, or 20 events' worth.
pub fn gap_threshold(rate: f64) -> Duration {
    Duration::from_secs_f64((20.0 / rate).max(1.0))
}

/// Holds the ledger against what is stored and the timeline; see the module docs.
pub fn judge(ledger: &Ledger, stored: &Stored, timeline: &Timeline, gap: Duration) -> Verdict {
    let sent = ledger.events.len() as u64;
    let mut v = Verdict { counts: Counts { sent, ..Counts::default() }, ..Verdict::default() };
    let mut latency = model::histogram();
    let restarts: Vec<Duration> = timeline.restarts().collect();
    let mut ack_times = Vec::new();
    for e in &ledger.events {
        v.attempts += e.attempts.len() as u64;
        for a in &e.attempts {
            *v.answers.entry(a.answer.label()).or_default() += 1;
        }
        let count = stored.counts.get(&e.n).copied().unwrap_or(0);
        match (&e.ack, e.acked_attempt()) {
            (Some(ack), Some(a)) => {
                v.counts.acknowledged += 1;
                v.spooled += u64::from(ack.spooled == Some(true));
                latency.saturating_record((a.answered - a.sent).as_micros() as u64);
                ack_times.push(a.answered);
                if count == 0 && stored.written_off.contains(&e.n) {
                    v.missing_written_off += 1;
                } else if count == 0 {
                    v.counts.missing += 1;
                    if v.missing_examples.len() < 10 {
                        v.missing_examples.push(e.n);
                    }
                }
                // A spooled answer is the relay's promise of its disk, not of NATS.
                let fresh = !ack.duplicate && ack.spooled != Some(true);
                let false_ack = timeline
                    .all_down
                    .iter()
                    .any(|d| fresh && a.sent >= d.from && a.answered <= d.to);
                v.false_acks += u64::from(false_ack);
            }
            _ => {
                v.never_acknowledged += 1;
                v.counts.stored_unacknowledged += u64::from(count > 0);
            }
        }
        if count > 1 {
            v.counts.duplicated += 1;
            // From the first attempt's send to the last one's answer: a retry may wait for a
            // connection and be handled by the process started meanwhile.
            let (first, last) = match (e.attempts.first(), e.attempts.last()) {
                (Some(f), Some(l)) => (f.sent, l.answered),
                _ => (Duration::ZERO, Duration::ZERO),
            };
            if stored.across.contains(&e.n) {
                v.duplicated_across_clusters += 1;
            } else if restarts.iter().any(|r| *r > first && *r < last) {
                v.duplicated_excused += 1;
            } else if v.duplicated_examples.len() < 5 {
                v.duplicated_examples.push(e.clone());
            }
            let n = e.attempts.len();
            if e.attempts[..n.saturating_sub(1)].iter().any(|a| a.answer.is_ambiguous()) {
                v.duplicated_after_ambiguous += 1;
            }
        }
    }
    v.ack_latency_ms = Percentiles::of(&latency);

    // Recovery: from each recovery mark to the first 2xx of an attempt sent after it.
    for m in timeline.marks.iter().filter(|m| m.kind == MarkKind::Recovery) {
        let first = ledger
            .events
            .iter()
            .flat_map(|e| &e.attempts)
            .filter(|a| a.sent >= m.at && a.answer.is_success())
            .map(|a| a.answered)
            .min();
        match first {
            Some(t) => {
                let ms = (t - m.at).as_secs_f64() * 1e3;
                v.counts.recovery_ms = Some(v.counts.recovery_ms.map_or(ms, |r: f64| r.max(ms)));
            }
            None => v.never_recovered.push(m.what.clone()),
        }
    }

    ack_times.sort();
    for pair in ack_times.windows(2) {
        if pair[1] - pair[0] > gap {
            v.ack_gaps_ms.push((ms(pair[0]), ms(pair[1])));
        }
    }

    if v.counts.missing > 0 {
        v.failures.push(format!(
            "{} acknowledged events missing from every stream (e.g. {:?})",
            v.counts.missing, v.missing_examples
        ));
    }
    let unexcused = v.counts.duplicated - v.duplicated_excused - v.duplicated_across_clusters;
    if unexcused > 0 {
        v.failures.push(format!(
            "{unexcused} events stored more than once although every retry carried the same \
             Idempotency-Key to the same relay process ({} after a 504/timeout/reset answer)",
            v.duplicated_after_ambiguous
        ));
    }
    if v.false_acks > 0 {
        v.failures
            .push(format!("{} fresh 2xx answers while nothing could acknowledge", v.false_acks));
    }
    for what in &v.never_recovered {
        v.failures.push(format!("no 2xx after `{what}`"));
    }
    if v.counts.acknowledged == 0 {
        v.failures.push("nothing was acknowledged".into());
    }
    v
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(ms(*d))
}

#[cfg(test)]
mod tests {
    use super::super::ledger::{Acked, Answer, Attempt, EventRecord};
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn status(status: u16) -> Answer {
        Answer::Status { status, code: None, retry_after: None }
    }

    /// An event with attempts (sent, answered, status) and an ack if the last is 2xx.
    fn event(n: u64, attempts: &[(f64, f64, u16)], duplicate: bool) -> EventRecord {
        let attempts: Vec<Attempt> = attempts
            .iter()
            .map(|&(s, a, st)| Attempt { sent: secs(s), answered: secs(a), answer: status(st) })
            .collect();
        let ack = attempts.last().filter(|a| a.answer.is_success()).map(|_| Acked {
            stream: "S".into(),
            cluster: "c".into(),
            seq: n,
            duplicate,
            spooled: None,
        });
        EventRecord { n, intended: secs(0.0), attempts, ack }
    }

    fn stored(counts: &[(u64, u32)]) -> Stored {
        Stored { counts: counts.iter().copied().collect(), ..Stored::default() }
    }

    #[test]
    fn missing_duplicated_and_unacknowledged_are_told_apart() {
        let ledger = Ledger {
            nonce: 1,
            elapsed: secs(10.0),
            offered_in: secs(10.0),
            events: vec![
                event(0, &[(0.0, 0.01, 202)], false),                 // fine
                event(1, &[(0.1, 0.11, 202)], false),                 // missing
                event(2, &[(0.2, 1.2, 504), (2.2, 2.3, 202)], false), // stored twice
                event(3, &[(0.3, 0.31, 503)], false),                 // stored, never acked
                event(4, &[(0.4, 0.41, 503)], false),                 // neither
            ],
        };
        let v = judge(&ledger, &stored(&[(0, 1), (2, 2), (3, 1)]), &Timeline::default(), secs(1.0));
        assert_eq!((v.counts.sent, v.counts.acknowledged, v.counts.missing), (5, 3, 1));
        assert_eq!(
            (v.counts.duplicated, v.duplicated_after_ambiguous, v.duplicated_excused),
            (1, 1, 0)
        );
        assert_eq!((v.counts.stored_unacknowledged, v.never_acknowledged), (1, 2));
        assert_eq!(v.failures.len(), 2, "{:?}", v.failures);
        assert_eq!(v.answers["202"], 3);
        assert_eq!(v.ack_latency_ms.count, 3);
        // The 2xx answers at 0.01, 0.11 and 2.3 s: one gap over a second.
        assert_eq!(v.ack_gaps_ms, [(110.0, 2300.0)]);
    }

    #[test]
    fn copies_in_two_clusters_and_written_off_events_are_counted_apart() {
        let ledger = Ledger {
            nonce: 1,
            elapsed: secs(5.0),
            offered_in: secs(5.0),
            events: vec![event(0, &[(1.0, 1.5, 202)], false), event(1, &[(1.0, 1.1, 202)], false)],
        };
        let mut both = stored(&[(0, 1)]);
        both.merge(stored(&[(0, 1)]));
        both.written_off.insert(1);
        let v = judge(&ledger, &both, &Timeline::default(), secs(1.0));
        assert_eq!((v.counts.duplicated, v.duplicated_across_clusters), (1, 1));
        assert_eq!((v.counts.missing, v.missing_written_off), (0, 1));
        assert!(v.failures.is_empty(), "{:?}", v.failures);
    }

    #[test]
    fn a_spooled_2xx_while_nats_is_down_is_no_false_ack() {
        let mut e = event(0, &[(2.5, 2.6, 202)], false);
        e.ack.as_mut().unwrap().spooled = Some(true);
        let ledger =
            Ledger { nonce: 1, elapsed: secs(5.0), offered_in: secs(5.0), events: vec![e] };
        let mut t = Timeline::default();
        t.all_down(secs(2.0), secs(4.0));
        let v = judge(&ledger, &stored(&[(0, 1)]), &t, secs(1.0));
        assert_eq!((v.false_acks, v.spooled), (0, 1));
    }

    #[test]
    fn a_relay_restart_between_attempts_excuses_a_duplicate() {
        let ledger = Ledger {
            nonce: 1,
            elapsed: secs(5.0),
            offered_in: secs(5.0),
            events: vec![event(0, &[(1.0, 1.5, 503), (3.0, 3.1, 202)], false)],
        };
        let mut t = Timeline::default();
        t.mark(secs(2.0), MarkKind::RelayRestart, "relay restarted");
        let v = judge(&ledger, &stored(&[(0, 2)]), &t, secs(1.0));
        assert_eq!((v.counts.duplicated, v.duplicated_excused), (1, 1));
        assert!(v.failures.is_empty(), "{:?}", v.failures);
    }

    #[test]
    fn a_fresh_2xx_inside_an_all_down_interval_fails_and_recovery_is_measured() {
        let ledger = Ledger {
            nonce: 1,
            elapsed: secs(10.0),
            offered_in: secs(10.0),
            events: vec![
                event(0, &[(2.5, 2.6, 202)], false), // inside the outage: false ack
                event(1, &[(2.7, 2.8, 202)], true),  // a duplicate answer: fine
                event(2, &[(1.0, 3.5, 202)], false), // sent before the outage
                event(3, &[(4.1, 4.4, 202)], false), // after the repair at 4.0
            ],
        };
        let mut t = Timeline::default();
        t.all_down(secs(2.0), secs(4.0));
        t.mark(secs(4.0), MarkKind::Recovery, "nats restarted");
        t.mark(secs(9.0), MarkKind::Recovery, "never");
        let v = judge(&ledger, &stored(&[(0, 1), (1, 1), (2, 1), (3, 1)]), &t, secs(1.0));
        assert_eq!(v.false_acks, 1);
        assert!((v.counts.recovery_ms.unwrap() - 400.0).abs() < 1e-6, "{:?}", v.counts.recovery_ms);
        assert_eq!(v.never_recovered, ["never"]);
        assert_eq!(v.failures.len(), 2, "{:?}", v.failures);
    }
}
