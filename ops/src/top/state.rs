//! What `edgerelay top` knows about the relay, updated from one scrape at a time. Sans-IO: a
//! scrape's bodies and the instant it was taken go in; rates come from the counter deltas
//! between two good scrapes divided by the time between them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::latency::Latency;
use super::prom::{self, Samples};

/// The metric names `top` reads, as the relay's `metrics.rs` registers them (with the
/// `edgerelay_` prefix and the `_total` suffix of counters).
pub mod names {
    pub const ACCEPTED: &str = "edgerelay_accepted_events_total";
    pub const REFUSALS: &str = "edgerelay_refusals_total";
    pub const DUPLICATES: &str = "edgerelay_duplicates_total";
    pub const BATCHES: &str = "edgerelay_batches_total";
    pub const RETRIES: &str = "edgerelay_batch_retries_total";
    pub const RECEIVED_BYTES: &str = "edgerelay_received_bytes_total";
    pub const PUBLISHED_BYTES: &str = "edgerelay_published_bytes_total";
    pub const QUEUE_DEPTH: &str = "edgerelay_queue_depth_events";
    pub const INFLIGHT: &str = "edgerelay_inflight_batches";
    pub const CONNECTIONS: &str = "edgerelay_connections";
    pub const ACTIVE_CLUSTER: &str = "edgerelay_nats_active_cluster";
    pub const RTT: &str = "edgerelay_nats_rtt_seconds";
}

/// What one poll of the admin listener brought back.
#[derive(Clone, Debug)]
pub struct Scrape {
    /// When the `/metrics` answer arrived.
    pub at: Instant,
    /// The `/metrics` body, or why there is none.
    pub metrics: Result<String, String>,
    /// The `/debug/latency` body; `Ok(None)` when the relay does not serve it (404).
    pub latency: Result<Option<Vec<u8>>, String>,
}

/// The counters and gauges of one good scrape. `None` = the relay does not export it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The counters' totals since the relay started.
    pub totals: Counters,
    pub queue_depth: Option<f64>,
    pub inflight_batches: Option<f64>,
    /// Open connections by protocol.
    pub connections: BTreeMap<String, f64>,
    /// The cluster the relay publishes to, when it says.
    pub active_cluster: Option<String>,
    /// Measured RTT per cluster, seconds.
    pub rtt_secs: BTreeMap<String, f64>,
}

/// The relay's counters: totals in a [`Snapshot`], or per-second rates between two of them
/// ([`Counters::per_second`]). `None` = the relay does not export it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    pub accepted: Option<f64>,
    pub refused: Option<f64>,
    pub refused_by_code: BTreeMap<String, f64>,
    pub duplicates: Option<f64>,
    pub batches: Option<f64>,
    pub retries: Option<f64>,
    pub received_bytes: Option<f64>,
    pub published_bytes: Option<f64>,
}

/// Whether the relay answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Link {
    /// No answer yet.
    Connecting,
    Up,
    /// The last `failures` polls in a row failed; `error` is the latest reason.
    Down {
        error: String,
        failures: u32,
    },
}

/// What `/debug/latency` gave.
#[derive(Clone, Debug, PartialEq)]
pub enum LatencyState {
    /// Nothing asked yet, or the relay is unreachable.
    Unknown,
    /// The relay has no `/debug/latency` (404).
    NotServed,
    /// The relay answered something unusable.
    Failed(String),
    Ok(Latency),
}

/// Everything the screen shows; [`super::render::render`] draws it.
#[derive(Clone, Debug)]
pub struct View {
    /// The admin URL, as shown in the title.
    pub admin: String,
    pub interval: Duration,
    pub link: Link,
    /// The latest good snapshot (`None` while the relay is unreachable).
    pub snapshot: Option<Snapshot>,
    /// Rates over the latest two good scrapes in a row.
    pub rates: Option<Counters>,
    pub latency: LatencyState,
    /// Lines of the latest `/metrics` body that were not readable samples.
    pub skipped_lines: usize,
    prev: Option<(Instant, Snapshot)>,
}

impl Snapshot {
    pub fn from_samples(s: &Samples) -> Self {
        use names::*;
        let active_cluster = s
            .iter(ACTIVE_CLUSTER)
            .filter(|x| x.value >= 1.0)
            .find_map(|x| x.label("cluster"))
            .map(str::to_owned);
        Self {
            totals: Counters::from_samples(s),
            queue_depth: s.sum(QUEUE_DEPTH),
            inflight_batches: s.sum(INFLIGHT),
            connections: s.sum_by(CONNECTIONS, "protocol"),
            active_cluster,
            rtt_secs: s.sum_by(RTT, "cluster"),
        }
    }

    /// RTT to the active cluster, seconds (or the only cluster's, when none is marked).
    pub fn active_rtt_secs(&self) -> Option<f64> {
        match &self.active_cluster {
            Some(c) => self.rtt_secs.get(c).copied(),
            None if self.rtt_secs.len() == 1 => self.rtt_secs.values().next().copied(),
            None => None,
        }
    }
}

impl Counters {
    pub fn from_samples(s: &Samples) -> Self {
        use names::*;
        Self {
            accepted: s.sum(ACCEPTED),
            refused: s.sum(REFUSALS),
            refused_by_code: s.sum_by(REFUSALS, "code"),
            duplicates: s.sum(DUPLICATES),
            batches: s.sum(BATCHES),
            retries: s.sum(RETRIES),
            received_bytes: s.sum(RECEIVED_BYTES),
            published_bytes: s.sum(PUBLISHED_BYTES),
        }
    }

    /// Rates from the totals `prev` to the totals `cur`, `elapsed` apart. A counter that went
    /// down was reset (the relay restarted): its whole current value counts as the delta, as
    /// Prometheus does.
    pub fn per_second(prev: &Counters, cur: &Counters, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        let r = |p: Option<f64>, c: Option<f64>| rate(p, c, secs);
        Self {
            accepted: r(prev.accepted, cur.accepted),
            refused: r(prev.refused, cur.refused),
            refused_by_code: cur
                .refused_by_code
                .iter()
                .filter_map(|(code, &c)| {
                    let p = prev.refused_by_code.get(code).copied().unwrap_or(0.0);
                    rate(Some(p), Some(c), secs).map(|v| (code.clone(), v))
                })
                .collect(),
            duplicates: r(prev.duplicates, cur.duplicates),
            batches: r(prev.batches, cur.batches),
            retries: r(prev.retries, cur.retries),
            received_bytes: r(prev.received_bytes, cur.received_bytes),
            published_bytes: r(prev.published_bytes, cur.published_bytes),
        }
    }
}

/// `(cur - prev) / secs`, with a reset counted from zero; `None` if either side is missing or
/// no time passed.
pub fn rate(prev: Option<f64>, cur: Option<f64>, secs: f64) -> Option<f64> {
    let (p, c) = (prev?, cur?);
    if secs.is_nan() || secs <= 0.0 || !p.is_finite() || !c.is_finite() {
        return None;
    }
    let delta = if c >= p { c - p } else { c };
    Some(delta / secs)
}

impl View {
    pub fn new(admin: impl Into<String>, interval: Duration) -> Self {
        Self {
            admin: admin.into(),
            interval,
            link: Link::Connecting,
            snapshot: None,
            rates: None,
            latency: LatencyState::Unknown,
            skipped_lines: 0,
            prev: None,
        }
    }

    /// Takes in one poll's result.
    pub fn observe(&mut self, scrape: Scrape) {
        let text = match scrape.metrics {
            Ok(text) => text,
            Err(error) => {
                let failures = match &self.link {
                    Link::Down { failures, .. } => failures.saturating_add(1),
                    _ => 1,
                };
                self.link = Link::Down { error, failures };
                // Nothing shown is current any more; rates restart after two good scrapes.
                self.snapshot = None;
                self.rates = None;
                self.prev = None;
                self.latency = LatencyState::Unknown;
                return;
            }
        };
        self.link = Link::Up;
        let samples = prom::parse(&text);
        self.skipped_lines = samples.skipped;
        let snap = Snapshot::from_samples(&samples);
        self.rates = self.prev.as_ref().and_then(|(at, prev)| {
            let elapsed = scrape.at.checked_duration_since(*at)?;
            Some(Counters::per_second(&prev.totals, &snap.totals, elapsed))
        });
        self.prev = Some((scrape.at, snap.clone()));
        self.snapshot = Some(snap);
        self.latency = match scrape.latency {
            Ok(None) => LatencyState::NotServed,
            Ok(Some(body)) => match Latency::parse(&body) {
                Ok(l) => LatencyState::Ok(l),
                Err(e) => LatencyState::Failed(e.to_string()),
            },
            Err(e) => LatencyState::Failed(e),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(accepted: u64, refused_401: u64, bytes: u64) -> String {
        format!(
            "edgerelay_accepted_events_total{{protocol=\"https\"}} {accepted}\n\
             edgerelay_accepted_events_total{{protocol=\"quic\"}} {accepted}\n\
             edgerelay_refusals_total{{protocol=\"https\",code=\"unauthorized\",reason=\"x\"}} {refused_401}\n\
             edgerelay_received_bytes_total{{protocol=\"https\"}} {bytes}\n\
             edgerelay_queue_depth_events 4\n\
             edgerelay_connections{{protocol=\"quic\"}} 3\n\
             edgerelay_nats_active_cluster{{cluster=\"west\"}} 1\n\
             edgerelay_nats_active_cluster{{cluster=\"east\"}} 0\n\
             edgerelay_nats_rtt_seconds{{cluster=\"west\"}} 0.0012\n\
             edgerelay_nats_rtt_seconds{{cluster=\"east\"}} 0.04\n"
        )
    }

    fn scrape(at: Instant, text: String) -> Scrape {
        Scrape { at, metrics: Ok(text), latency: Ok(None) }
    }

    #[test]
    fn rates_are_counter_deltas_over_elapsed_time() {
        let t0 = Instant::now();
        let mut v = View::new("http://x", Duration::from_secs(1));
        v.observe(scrape(t0, metrics(100, 10, 1000)));
        assert_eq!(v.link, Link::Up);
        assert!(v.rates.is_none(), "one scrape gives no rate");
        v.observe(scrape(t0 + Duration::from_secs(2), metrics(150, 14, 5000)));
        let r = v.rates.clone().unwrap();
        assert_eq!(r.accepted, Some(50.0), "(300 - 200) / 2 s");
        assert_eq!(r.refused, Some(2.0));
        assert_eq!(r.refused_by_code.get("unauthorized"), Some(&2.0));
        assert_eq!(r.received_bytes, Some(2000.0));
        assert_eq!(r.batches, None, "not exported: no rate");
        let s = v.snapshot.unwrap();
        assert_eq!(s.queue_depth, Some(4.0));
        assert_eq!(s.connections.get("quic"), Some(&3.0));
        assert_eq!(s.active_cluster.as_deref(), Some("west"));
        assert_eq!(s.active_rtt_secs(), Some(0.0012));
        assert_eq!(v.latency, LatencyState::NotServed);
    }

    #[test]
    fn a_reset_counter_counts_from_zero() {
        assert_eq!(rate(Some(500.0), Some(30.0), 3.0), Some(10.0));
        assert_eq!(rate(Some(1.0), Some(4.0), 0.0), None);
        assert_eq!(rate(None, Some(4.0), 1.0), None);
    }

    #[test]
    fn an_unreachable_relay_is_shown_and_retried() {
        let t0 = Instant::now();
        let mut v = View::new("http://x", Duration::from_secs(1));
        v.observe(scrape(t0, metrics(1, 0, 0)));
        for i in 1..=3 {
            v.observe(Scrape {
                at: t0 + Duration::from_secs(i),
                metrics: Err("connection refused".into()),
                latency: Err("connection refused".into()),
            });
            assert_eq!(
                v.link,
                Link::Down { error: "connection refused".into(), failures: i as u32 }
            );
            assert!(v.snapshot.is_none() && v.rates.is_none());
        }
        // Back: values at once, rates from the next scrape on.
        v.observe(scrape(t0 + Duration::from_secs(4), metrics(5, 0, 0)));
        assert_eq!(v.link, Link::Up);
        assert!(v.snapshot.is_some() && v.rates.is_none());
        v.observe(scrape(t0 + Duration::from_secs(5), metrics(6, 0, 0)));
        assert_eq!(v.rates.unwrap().accepted, Some(2.0));
    }

    #[test]
    fn latency_answers_are_classified() {
        let mut v = View::new("http://x", Duration::from_secs(1));
        let t0 = Instant::now();
        v.observe(Scrape { at: t0, metrics: Ok(String::new()), latency: Ok(Some(b"{".to_vec())) });
        assert!(matches!(v.latency, LatencyState::Failed(_)));
        v.observe(Scrape {
            at: t0,
            metrics: Ok(String::new()),
            latency: Ok(Some(br#"{"unit":"us","stages":{}}"#.to_vec())),
        });
        assert!(matches!(v.latency, LatencyState::Ok(_)));
    }

    #[test]
    fn reads_the_names_metrics_rs_registers() {
        use edgerelay::metrics::*;
        let m = Metrics::new();
        // A family is only announced once it has a label set.
        let _ = m.accepted.get_or_create(&ProtocolLabels { protocol: Protocol::Https });
        let _ = m.refusals.get_or_create(&RefusalLabels {
            protocol: Protocol::Https,
            code: "x",
            reason: "y",
        });
        let _ = m.batches.get_or_create(&OutcomeLabels { outcome: "stored" });
        let text = m.render();
        // Counters are announced without `_total` in `# TYPE` lines.
        for name in [
            names::ACCEPTED,
            names::REFUSALS,
            names::BATCHES,
            names::RETRIES,
            names::QUEUE_DEPTH,
            names::INFLIGHT,
        ] {
            let base = name.strip_suffix("_total").unwrap_or(name);
            assert!(text.contains(&format!("# TYPE {base} ")), "{name} not in\n{text}");
        }
    }
}
