//! The audit trail: every refusal of the edge's making (who, which subject, which code and
//! reason) and, periodically, how many events each identity published — as JSON records in a
//! JetStream stream (`audit.stream`, default `EDGERELAY_AUDIT`) and as structured log lines
//! (target `edgerelay::audit`).
//!
//! What an unauthenticated peer can make the relay write is bounded, not proportional to what
//! it sends: refusals of requests that never authenticated are counted per protocol, code,
//! reason and source prefix ([`refusals`]) and written once per `audit.refusals_interval_ms` as
//! `refusals` records; authenticated refusals keep one `refused` record each, with every text
//! taken from the request cut to an excerpt; refusal log lines are capped per kind and interval
//! with a "suppressed N" summary ([`log_limit`]); the stream has `max_bytes` as well as
//! `max_age`.
//!
//! Auditing never blocks the data path: records go through a bounded queue to a background
//! publisher, and when the queue is full they are dropped and counted
//! (`edgerelay_audit_dropped_total`). Refusals that are not the edge's fault (NATS down,
//! queues full) are counted in the metrics but not audited: they say nothing about who tried
//! what, and would flood the trail exactly when NATS cannot take it.
//!
//! [`config`] is the `[audit]` section of the config file.

pub mod config;
pub mod log_limit;
pub mod refusals;

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::auth::Identity;
use crate::error::{excerpt, Refusal, Side};
use crate::metrics::{Metrics, Protocol, RefusalLabels};
use crate::section::ms;
use crate::shutdown::Shutdown;
use config::AuditConfig;
use log_limit::LogLimit;
use refusals::{Counted, Key, Prefixes, Refusals, Source, Window};

/// Publishes awaiting their PubAck at most.
const ACK_WINDOW: usize = 256;

/// One audit record, as stored (JSON).
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// A request or event the relay refused.
    Refused {
        at_unix_ms: u64,
        relay: Arc<str>,
        protocol: Protocol,
        /// The authenticated identity, when authentication got that far.
        #[serde(skip_serializing_if = "Option::is_none")]
        identity: Option<Arc<str>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        subject: Option<String>,
        code: &'static str,
        reason: &'static str,
        message: String,
    },
    /// How many requests that never authenticated were refused for one reason from one source
    /// between `since_unix_ms` and `at_unix_ms`: one record per (protocol, code, reason,
    /// source) and interval.
    Refusals {
        at_unix_ms: u64,
        since_unix_ms: u64,
        relay: Arc<str>,
        protocol: Protocol,
        code: &'static str,
        reason: &'static str,
        /// The peer's address prefix (`192.0.2.7/32`, `2001:db8:1:2::/64`), `other` for the
        /// sources beyond `audit.refusals_max_keys`, `unknown` when not known.
        source: String,
        count: u64,
    },
    /// Events accepted per identity since the previous `counts` record.
    Counts { at_unix_ms: u64, relay: Arc<str>, interval_secs: u64, events: HashMap<Arc<str>, u64> },
}

/// The audit stage's front: cheap to call from the data path.
#[derive(Debug)]
pub struct Audit {
    relay: Arc<str>,
    metrics: Arc<Metrics>,
    queue: Option<mpsc::Sender<Record>>,
    counts: Mutex<HashMap<Arc<str>, u64>>,
    prefixes: Prefixes,
    /// Refusals of requests that never authenticated, counted until their interval ends.
    refusals: Mutex<Refusals>,
    /// The ceiling on refusal log lines, per record kind.
    log: Mutex<LogLimit<&'static str>>,
}

/// The kinds of refusal log lines, each with its own ceiling.
const REFUSED: &str = "refused";
const REFUSALS: &str = "refusals";

impl Audit {
    /// The audit front and the receiving end of its queue (`None` when `audit.enabled` is off:
    /// then only log lines and metrics are written).
    pub fn new(
        cfg: &AuditConfig,
        relay: &str,
        metrics: Arc<Metrics>,
    ) -> (Self, Option<mpsc::Receiver<Record>>) {
        let (queue, rx) = if cfg.enabled {
            let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let audit = Self {
            relay: relay.into(),
            metrics,
            queue,
            counts: Mutex::new(HashMap::new()),
            prefixes: Prefixes { ipv4: cfg.ipv4_prefix_len, ipv6: cfg.ipv6_prefix_len },
            refusals: Mutex::new(Refusals::new(
                ms(cfg.refusals_interval_ms),
                cfg.refusals_max_keys,
            )),
            log: Mutex::new(LogLimit::new(ms(cfg.log_interval_ms), cfg.log_lines_per_interval)),
        };
        (audit, rx)
    }

    /// Records a refusal: counted always; audited when it is the edge's doing — one record
    /// and (within the log ceiling) one log line each when `identity` is known, else counted
    /// per source prefix of `from` (the peer's address) and written once per interval.
    pub fn refused(
        &self,
        protocol: Protocol,
        from: Option<IpAddr>,
        identity: Option<&Identity>,
        subject: Option<&str>,
        r: &Refusal,
    ) {
        self.metrics
            .refusals
            .get_or_create(&RefusalLabels { protocol, code: r.code.as_str(), reason: r.reason })
            .inc();
        if r.code.side() != Side::Edge {
            return;
        }
        let now = Instant::now();
        let Some(identity) = identity else {
            let source = Source::of(from, self.prefixes);
            let key = Key { protocol, code: r.code.as_str(), reason: r.reason, source };
            return self.count_refusal(key, now);
        };
        // A JWT's identity claim is the edge's text too.
        let identity: Arc<str> = match excerpt(&identity.name) {
            Cow::Borrowed(_) => identity.name.clone(),
            Cow::Owned(cut) => cut.into(),
        };
        let subject = subject.map(excerpt);
        if self.may_log(REFUSED, now) {
            tracing::info!(
                target: "edgerelay::audit",
                protocol = ?protocol,
                identity = %identity,
                subject = subject.as_deref(),
                code = r.code.as_str(),
                reason = r.reason,
                message = %r.message,
                "refused"
            );
        }
        self.send(Record::Refused {
            at_unix_ms: unix_ms(),
            relay: self.relay.clone(),
            protocol,
            identity: Some(identity),
            subject: subject.map(|s| s.into_owned()),
            code: r.code.as_str(),
            reason: r.reason,
            message: r.message.to_string(),
        });
    }

    /// Counts an unauthenticated refusal into the open window, writing the last one first if
    /// it is due.
    fn count_refusal(&self, key: Key, now: Instant) {
        let (due, counted) = {
            let mut refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            let due = refusals.poll(now);
            (due, refusals.count(key, now))
        };
        self.metrics.audit_refusals_aggregated.inc();
        if counted == Counted::Folded {
            self.metrics.audit_refusals_folded.inc();
        }
        if let Some(window) = due {
            self.write_refusals(window, now);
        }
    }

    /// Writes the counts of a finished window: a record and a log line per key.
    fn write_refusals(&self, window: Window, now: Instant) {
        let at_unix_ms = unix_ms();
        let lasted = now.saturating_duration_since(window.opened).as_millis() as u64;
        for (key, count) in window.counts {
            let source = key.source.to_string();
            if self.may_log(REFUSALS, now) {
                tracing::info!(
                    target: "edgerelay::audit",
                    protocol = ?key.protocol,
                    source = %source,
                    code = key.code,
                    reason = key.reason,
                    count,
                    interval_ms = lasted,
                    "refusals"
                );
            }
            self.send(Record::Refusals {
                at_unix_ms,
                since_unix_ms: at_unix_ms.saturating_sub(lasted),
                relay: self.relay.clone(),
                protocol: key.protocol,
                code: key.code,
                reason: key.reason,
                source,
                count,
            });
        }
    }

    /// Whether a log line of `kind` fits under the ceiling at `now`; writes the summary of the
    /// kind's last interval first when it suppressed lines.
    fn may_log(&self, kind: &'static str, now: Instant) -> bool {
        let admit = self.log.lock().unwrap_or_else(|p| p.into_inner()).admit(kind, now);
        if let Some(n) = admit.summary {
            suppressed(kind, n);
        }
        if !admit.log {
            self.metrics.audit_log_suppressed.inc();
        }
        admit.log
    }

    /// Writes what is due at `now`: the window of unauthenticated refusals, and the summaries
    /// of log intervals that ended.
    pub fn tick(&self, now: Instant) {
        let due = self.refusals.lock().unwrap_or_else(|p| p.into_inner()).poll(now);
        if let Some(window) = due {
            self.write_refusals(window, now);
        }
        let ended = self.log.lock().unwrap_or_else(|p| p.into_inner()).expire(now);
        for (kind, n) in ended {
            suppressed(kind, n);
        }
    }

    /// Writes everything still counted, due or not (at shutdown).
    pub fn drain(&self, now: Instant) {
        let open = self.refusals.lock().unwrap_or_else(|p| p.into_inner()).drain();
        if let Some(window) = open {
            self.write_refusals(window, now);
        }
        let open = self.log.lock().unwrap_or_else(|p| p.into_inner()).drain();
        for (kind, n) in open {
            suppressed(kind, n);
        }
    }

    /// Counts `n` events taken in from `identity`.
    pub fn accepted(&self, protocol: Protocol, identity: &Identity, n: u64) {
        if n == 0 {
            return;
        }
        self.metrics.protocol(protocol).accepted.inc_by(n);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry(identity.name.clone()).or_default() += n;
    }

    /// Queues the per-identity counts since the last call (and logs them).
    pub fn flush_counts(&self, interval: Duration) {
        let events = std::mem::take(&mut *self.counts.lock().unwrap_or_else(|p| p.into_inner()));
        if events.is_empty() {
            return;
        }
        tracing::info!(target: "edgerelay::audit", identities = events.len(), total = events.values().sum::<u64>(), "published");
        self.send(Record::Counts {
            at_unix_ms: unix_ms(),
            relay: self.relay.clone(),
            interval_secs: interval.as_secs(),
            events,
        });
    }

    fn send(&self, record: Record) {
        let Some(queue) = &self.queue else { return };
        match queue.try_send(record) {
            Ok(()) => self.metrics.audit_records.inc(),
            Err(_) => self.metrics.audit_dropped.inc(),
        };
    }
}

impl Record {
    /// The record's kind: its `kind` field and the last token of its subject.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Refused { .. } => REFUSED,
            Self::Refusals { .. } => REFUSALS,
            Self::Counts { .. } => "counts",
        }
    }
}

/// The audit stream's settings, as the relay creates it.
pub fn stream_config(cfg: &AuditConfig) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![format!("{}.>", cfg.subject_prefix)],
        max_age: Duration::from_secs(cfg.max_age_secs),
        max_bytes: i64::try_from(cfg.max_bytes).unwrap_or(i64::MAX),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    }
}

/// Creates the audit stream if it is missing. One that exists keeps its settings (an
/// operator may have changed them on purpose); a warning says when its limits differ.
async fn ensure_stream(js: &jetstream::Context, cfg: &AuditConfig) {
    let want = stream_config(cfg);
    match js.get_or_create_stream(want.clone()).await {
        Ok(stream) => {
            let have = &stream.cached_info().config;
            if (have.max_age, have.max_bytes) != (want.max_age, want.max_bytes) {
                tracing::warn!(
                    stream = %cfg.stream,
                    max_age_secs = have.max_age.as_secs(),
                    max_bytes = have.max_bytes,
                    "the audit stream exists with other limits than audit.max_age_secs / audit.max_bytes: kept as it is"
                );
            }
        }
        Err(e) => {
            tracing::warn!(stream = %cfg.stream, error = %e, "audit stream not available: audit records will fail until it is");
        }
    }
}

/// Publishes queued records to the audit stream until `stop` (none when `rx` is `None`:
/// `audit.enabled` is off), the per-identity counts every `counts_interval_secs`, and what
/// [`Audit::tick`] finds due. Records that JetStream does not acknowledge are counted as
/// failed, not retried: the log line is the fallback.
pub async fn run(
    audit: Arc<Audit>,
    mut rx: Option<mpsc::Receiver<Record>>,
    client: async_nats::Client,
    cfg: AuditConfig,
    mut stop: Shutdown,
) {
    let js = jetstream::new(client);
    if rx.is_some() {
        ensure_stream(&js, &cfg).await;
    }
    let prefix = format!("{}.{}", cfg.subject_prefix, audit.relay);
    let interval = Duration::from_secs(cfg.counts_interval_secs.max(1));
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    // Often enough that a window or a log interval is written soon after it ends.
    let shortest = cfg.refusals_interval_ms.min(cfg.log_interval_ms) / 4;
    let mut due = tokio::time::interval(ms(shortest.clamp(10, 1_000)));
    let mut acks = FuturesUnordered::new();
    let mut stopping = false;
    loop {
        tokio::select! {
            record = next(&mut rx) => {
                let Some(record) = record else { break };
                let kind = record.kind();
                let body = match serde_json::to_vec(&record) {
                    Ok(b) => b,
                    Err(_) => continue,
                };
                match js.publish(format!("{prefix}.{kind}"), body.into()).await {
                    Ok(ack) => acks.push(ack.into_future()),
                    Err(_) => {
                        audit.metrics.audit_failed.inc();
                    }
                }
                while acks.len() >= ACK_WINDOW {
                    if let Some(Err(_)) = acks.next().await {
                        audit.metrics.audit_failed.inc();
                    }
                }
            }
            Some(result) = acks.next(), if !acks.is_empty() => {
                if result.is_err() {
                    audit.metrics.audit_failed.inc();
                }
            }
            _ = tick.tick() => audit.flush_counts(interval),
            _ = due.tick() => audit.tick(Instant::now()),
            _ = stop.requested(), if !stopping => {
                stopping = true;
                audit.flush_counts(interval);
                audit.drain(Instant::now());
                match &mut rx {
                    Some(rx) => rx.close(),
                    None => break,
                }
            }
        }
    }
    while let Some(result) = acks.next().await {
        if result.is_err() {
            audit.metrics.audit_failed.inc();
        }
    }
}

/// The next queued record; never, when there is no queue.
async fn next(rx: &mut Option<mpsc::Receiver<Record>>) -> Option<Record> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The summary line of `n` suppressed log lines of `kind`.
fn suppressed(kind: &'static str, n: u64) {
    tracing::info!(target: "edgerelay::audit", kind, suppressed = n, "suppressed {n} {kind} log lines");
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn unauthenticated_refusals_are_written_once_their_window_ends() {
        let cfg = AuditConfig { refusals_interval_ms: 60_000, ..AuditConfig::default() };
        let metrics = Arc::new(Metrics::new());
        let (audit, rx) = Audit::new(&cfg, "r1", metrics.clone());
        let mut rx = rx.expect("audit.enabled");
        let start = Instant::now();
        let missing = Refusal::new(ErrorCode::Unauthorized, "no token").because("missing_token");
        let from = |s: &str| Some(s.parse().unwrap());
        for _ in 0..5 {
            audit.refused(Protocol::Https, from("192.0.2.1"), None, None, &missing);
        }
        audit.refused(Protocol::Quic, from("2001:db8::9"), None, None, &missing);
        // Not the edge's fault: counted, never audited.
        let full = Refusal::new(ErrorCode::QueueFull, "full");
        audit.refused(Protocol::Https, from("192.0.2.1"), None, None, &full);
        assert!(rx.try_recv().is_err(), "nothing written before the window ends");
        audit.tick(start + Duration::from_secs(61));
        let mut rows = Vec::new();
        while let Ok(record) = rx.try_recv() {
            let Record::Refusals { protocol, reason, source, count, relay, .. } = record else {
                panic!("{record:?}");
            };
            assert_eq!(&*relay, "r1");
            rows.push((protocol, reason, source, count));
        }
        assert_eq!(
            rows,
            [
                (Protocol::Https, "missing_token", "192.0.2.1/32".to_owned(), 5),
                (Protocol::Quic, "missing_token", "2001:db8::/64".to_owned(), 1),
            ]
        );
        assert_eq!(metrics.audit_refusals_aggregated.get(), 6);
        // Drained at shutdown whether due or not.
        audit.refused(Protocol::H3, None, None, None, &missing);
        audit.drain(Instant::now());
        let Ok(Record::Refusals { source, count: 1, .. }) = rx.try_recv() else { panic!() };
        assert_eq!(source, "unknown");
    }
}
