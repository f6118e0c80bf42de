//! The relay's own share of a region's latency: its ingest→ack p99 from `/debug/latency` minus
//! its measured round trip to NATS (sampled from `/metrics` during the run).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use edgerelay_ops::top::latency::{Latency, Summary as StageSummary};
use edgerelay_ops::top::{prom, state::names};
use serde::Serialize;
use tokio::sync::watch;

use super::topology::RegionSite;
use crate::procs::admin_get;

/// How often each relay's `/metrics` is read during the run for its NATS round trip (the
/// relay itself probes every 5 s).
const RTT_SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// What a relay's admin listener said about its own latency after the run.
#[derive(Clone, Debug, Serialize)]
pub(super) struct RelayShare {
    /// Which `/debug/latency` range the percentiles cover: `window` (the last
    /// `window_secs`, measured phase only) or `since_start` (warm-up included).
    pub(super) source: &'static str,
    pub(super) window_secs: f64,
    /// ingest→ack p99: from the event's arrival at the relay to its PubAck.
    pub(super) ingest_to_ack_p99_ms: f64,
    /// Queue wait p99: from enqueue to the batch's publish.
    pub(super) queue_wait_p99_ms: f64,
    /// Flush p99: from publish to PubAck (one NATS round trip plus JetStream's work).
    pub(super) flush_p99_ms: f64,
    /// The relay's round trip to NATS, subtracted from ingest→ack.
    pub(super) nats_rtt_ms: f64,
    /// `measured` (the lowest `edgerelay_nats_rtt_seconds` read during the run) or
    /// `configured` (the proxy's RTT, when the relay had no probe value).
    pub(super) nats_rtt_source: &'static str,
    /// How many probe values were read.
    pub(super) nats_rtt_samples: usize,
    /// ingest→ack p99 − NATS RTT (not below zero).
    pub(super) own_share_p99_ms: f64,
}

/// The relay's NATS round trip as its `/metrics` shows it, every [`RTT_SAMPLE_EVERY`] until
/// `done` turns true (or its sender is gone); unreadable answers are skipped.
pub(super) async fn sample_rtt(admin: SocketAddr, mut done: watch::Receiver<bool>) -> Vec<f64> {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(RTT_SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.wait_for(|done| *done) => return samples,
        }
        if let Ok((200, body)) = admin_get(admin, "/metrics").await {
            samples.extend(nats_rtt_seconds(&String::from_utf8_lossy(&body)));
        }
    }
}

/// The relay's own share of the run, from its admin listener, with the NATS round trips
/// sampled during the run (`rtt_samples`, seconds) and one more read now.
pub(super) async fn relay_share(
    site: &RegionSite,
    measured_phase: Duration,
    mut rtt_samples: Vec<f64>,
) -> anyhow::Result<RelayShare> {
    let (status, body) = admin_get(site.admin, "/debug/latency").await?;
    ensure!(status == 200, "/debug/latency answered {status}");
    let latency = Latency::parse(&body)?;
    let (status, metrics) = admin_get(site.admin, "/metrics").await?;
    ensure!(status == 200, "/metrics answered {status}");
    rtt_samples.extend(nats_rtt_seconds(&String::from_utf8_lossy(&metrics)));
    share_of(&latency, &rtt_samples, site.region.nats_rtt_ms, measured_phase)
}

/// The relay's NATS round trip from its `/metrics`, if it has a usable one.
pub(super) fn nats_rtt_seconds(metrics: &str) -> Option<f64> {
    prom::parse(metrics)
        .iter(names::RTT)
        .map(|s| s.value)
        .filter(|v| v.is_finite() && *v >= 0.0)
        .reduce(f64::min)
}

/// [`RelayShare`] from a `/debug/latency` document (µs) and the relay's RTT to NATS: the
/// window when the measured phase filled it, else since start. The RTT is the lowest of the
/// relay's probes (`rtt_samples`, seconds): each probe is a JetStream API request, so the
/// server's handling of it under load adds to some samples, never to the network's share.
pub(super) fn share_of(
    latency: &Latency,
    rtt_samples: &[f64],
    configured_rtt_ms: u64,
    measured_phase: Duration,
) -> anyhow::Result<RelayShare> {
    let use_window =
        measured_phase.as_secs_f64() >= latency.window_secs && latency.window_secs > 0.0;
    let stage = |name: &str| -> anyhow::Result<&StageSummary> {
        let stage = latency
            .stages
            .get(name)
            .with_context(|| format!("/debug/latency has no stage {name}"))?;
        Ok(if use_window { &stage.window } else { &stage.since_start })
    };
    let ingest = stage("ingest_to_ack")?;
    ensure!(ingest.count > 0, "the relay recorded no ingest→ack latency");
    let lowest =
        rtt_samples.iter().copied().filter(|s| s.is_finite() && *s >= 0.0).reduce(f64::min);
    let (nats_rtt_ms, nats_rtt_source) = match lowest {
        Some(s) => (s * 1e3, "measured"),
        None => (configured_rtt_ms as f64, "configured"),
    };
    let ms = |us: f64| round3(us / 1e3);
    Ok(RelayShare {
        source: if use_window { "window" } else { "since_start" },
        window_secs: latency.window_secs,
        ingest_to_ack_p99_ms: ms(ingest.p99),
        queue_wait_p99_ms: ms(stage("queue_wait")?.p99),
        flush_p99_ms: ms(stage("flush")?.p99),
        nats_rtt_ms: round3(nats_rtt_ms),
        nats_rtt_source,
        nats_rtt_samples: rtt_samples.len(),
        own_share_p99_ms: round3((ingest.p99 / 1e3 - nats_rtt_ms).max(0.0)),
    })
}

pub(super) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(p99: f64) -> StageSummary {
        StageSummary { count: 10, p99, ..StageSummary::default() }
    }

    #[test]
    fn the_relay_share_takes_the_nats_round_trip_out() {
        let mut latency = Latency { window_secs: 10.0, unit: "us".into(), ..Latency::default() };
        for (name, window, since) in [
            ("ingest_to_ack", 13_000.0, 40_000.0),
            ("queue_wait", 2_000.0, 3_000.0),
            ("flush", 11_000.0, 12_000.0),
        ] {
            latency.stages.insert(
                name.into(),
                edgerelay_ops::top::latency::Stage {
                    window: summary(window),
                    since_start: summary(since),
                },
            );
        }
        let share =
            share_of(&latency, &[0.012, 0.0105, f64::NAN], 10, Duration::from_secs(10)).unwrap();
        assert_eq!(share.source, "window");
        assert_eq!((share.ingest_to_ack_p99_ms, share.nats_rtt_ms), (13.0, 10.5));
        assert_eq!(share.own_share_p99_ms, 2.5);
        assert_eq!(share.queue_wait_p99_ms, 2.0);
        // A run shorter than the window: since start; no probe value: the configured RTT.
        let share = share_of(&latency, &[], 10, Duration::from_secs(1)).unwrap();
        assert_eq!((share.source, share.nats_rtt_source), ("since_start", "configured"));
        assert_eq!(share.own_share_p99_ms, 30.0);
        // Never below zero.
        let share = share_of(&latency, &[0.5], 10, Duration::from_secs(10)).unwrap();
        assert_eq!(share.own_share_p99_ms, 0.0);
        latency.stages.clear();
        assert!(share_of(&latency, &[], 10, Duration::from_secs(10)).is_err());
    }

    #[test]
    fn the_nats_rtt_comes_from_the_gauge() {
        let text = "# TYPE edgerelay_nats_rtt_seconds gauge\n\
                    edgerelay_nats_rtt_seconds{cluster=\"default\"} 0.0123\n\
                    edgerelay_nats_rtt_seconds_other 5\n";
        assert_eq!(nats_rtt_seconds(text), Some(0.0123));
        assert_eq!(nats_rtt_seconds("edgerelay_nats_rtt_seconds{cluster=\"a\"} NaN\n"), None);
        assert_eq!(nats_rtt_seconds(""), None);
    }
}
