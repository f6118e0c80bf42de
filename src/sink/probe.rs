//! Keeping each cluster's state current in the background: the stream keeper (checks the
//! stream until it is good, and again when a publish or probe says it is gone) and the
//! round-trip probe every `nats.failover.probe_interval_ms`. Both feed the
//! [`router`](super::router) through `Sink::observe`.

use std::sync::Arc;
use std::time::Duration;

use super::cluster::{Cluster, Probe};
use super::{Sink, SinkError};
use crate::section::ms;
use crate::shutdown::Shutdown;

impl Sink {
    /// Keeps cluster `i`'s stream checked: until it is good, and again whenever a publish or
    /// probe says it is gone. Ends with an error only for a conflict an operator must fix.
    pub(super) async fn keep_stream(&self, i: usize) -> Result<(), SinkError> {
        let c = &self.clusters[i];
        loop {
            if c.stream_ok() {
                c.recheck_requested().await;
            }
            match c.ensure_stream(&self.stream).await? {
                Some(replicas) => {
                    self.warn_if_fragile(c, replicas);
                    self.observe(i, |r, now| r.stream(i, true, now));
                }
                None => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Measures the round trip to cluster `i` every `failover.probe_interval_ms` until `stop`
    /// turns true ([`Cluster::probe`]); feeds the router and sets
    /// `edgerelay_nats_rtt_seconds{cluster}` (NaN when the probe failed).
    pub(super) async fn probe_rtt(self: Arc<Self>, i: usize, mut stop: Shutdown) {
        let mut tick = tokio::time::interval(ms(self.failover.probe_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.requested() => return,
            }
            self.probe_once(i).await;
        }
    }

    /// One probe of cluster `i`, its result fed to the router and the RTT gauge.
    pub(super) async fn probe_once(&self, i: usize) {
        let c = &self.clusters[i];
        match c.probe(&self.stream.name, ms(self.failover.probe_timeout_ms)).await {
            Probe::Answered(rtt) => {
                c.rtt_gauge.set(rtt.as_secs_f64());
                self.observe(i, |r, now| r.probed(i, rtt, now));
            }
            Probe::Failed => {
                c.rtt_gauge.set(f64::NAN);
                self.observe(i, |r, now| r.failed(i, now));
            }
            Probe::StreamMissing => {
                c.rtt_gauge.set(f64::NAN);
                c.stream_lost();
                self.observe(i, |r, now| r.stream(i, false, now));
            }
        }
    }

    /// Warns when an acknowledged event on this cluster could be lost to a power cut: an R1
    /// stream whose server fsyncs lazily (nats-server's default, every 2 minutes).
    pub(super) fn warn_if_fragile(&self, c: &Cluster, replicas: usize) {
        if replicas == 1 && !self.stream.server_sync_always {
            tracing::warn!(cluster = %c.name, stream = %self.stream.name,
                "the stream has 1 replica and nats-server fsyncs lazily by default: an acknowledged \
                 event survives a nats-server crash but not a power loss of its host until the next \
                 sync (sync_interval, 2 min by default). Use replicas = 3 in production, or run the \
                 servers with `sync_interval: always` and set stream.server_sync_always = true");
        }
    }
}
