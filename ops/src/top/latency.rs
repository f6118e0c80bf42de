//! The `/debug/latency` document `edgerelay top` reads: exact percentiles per stage over the
//! relay's sliding window and since start. Every field defaults when missing, so an older or
//! newer relay still shows what both know.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The stages `top` shows, in pipeline order.
pub const STAGES: [&str; 4] = ["edge_to_ack", "ingest_to_ack", "queue_wait", "flush"];

/// The stage whose distribution `top` draws.
pub const DISTRIBUTION_STAGE: &str = "ingest_to_ack";

/// The whole document, as served.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Latency {
    pub uptime_secs: f64,
    /// Length of the sliding window, seconds.
    pub window_secs: f64,
    /// Unit of every latency value: `us` (the relay's), `ns`, `ms` or `s`.
    pub unit: String,
    pub stages: BTreeMap<String, Stage>,
}

/// One stage: the sliding window and everything since start.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Stage {
    pub window: Summary,
    pub since_start: Summary,
}

/// Percentiles of one histogram, in the document's unit.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Summary {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// `[upper_bound, count]` pairs, bounds doubling, counts not cumulative.
    pub distribution: Vec<(f64, u64)>,
}

/// Why a `/debug/latency` body could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LatencyError {
    /// Not the JSON shape `top` knows.
    #[error("unreadable /debug/latency: {0}")]
    Json(#[from] serde_json::Error),
    /// A unit `top` cannot convert.
    #[error("/debug/latency has unknown unit {0:?}")]
    Unit(String),
}

impl Latency {
    /// Parses a body and converts every value to microseconds.
    pub fn parse(body: &[u8]) -> Result<Self, LatencyError> {
        let mut doc: Self = serde_json::from_slice(body)?;
        let to_us = match doc.unit.as_str() {
            "us" | "µs" | "" => 1.0,
            "ns" => 1e-3,
            "ms" => 1e3,
            "s" => 1e6,
            other => return Err(LatencyError::Unit(other.to_owned())),
        };
        if to_us != 1.0 {
            for stage in doc.stages.values_mut() {
                stage.window.scale(to_us);
                stage.since_start.scale(to_us);
            }
        }
        doc.unit = "us".into();
        Ok(doc)
    }

    /// The window summary of `stage`, if the relay reports it.
    pub fn window(&self, stage: &str) -> Option<&Summary> {
        self.stages.get(stage).map(|s| &s.window)
    }
}

impl Summary {
    fn scale(&mut self, k: f64) {
        for v in [
            &mut self.min,
            &mut self.mean,
            &mut self.p50,
            &mut self.p90,
            &mut self.p99,
            &mut self.p999,
            &mut self.max,
        ] {
            *v *= k;
        }
        for (bound, _) in &mut self.distribution {
            *bound *= k;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_shape() {
        let body = br#"{"uptime_secs": 123.4, "window_secs": 10, "unit": "us",
          "stages": {"ingest_to_ack": {"window": {"count": 3, "min": 90, "mean": 150.5,
            "p50": 120, "p90": 300, "p99": 310, "p999": 310, "max": 311,
            "distribution": [[100, 1], [200, 1], [400, 1]]},
            "since_start": {"count": 9}}}}"#;
        let doc = Latency::parse(body).unwrap();
        assert_eq!(doc.window_secs, 10.0);
        let w = doc.window("ingest_to_ack").unwrap();
        assert_eq!((w.count, w.p99, w.max), (3, 310.0, 311.0));
        assert_eq!(w.distribution, vec![(100.0, 1), (200.0, 1), (400.0, 1)]);
        assert_eq!(doc.stages["ingest_to_ack"].since_start.count, 9);
        assert!(doc.window("flush").is_none());
    }

    #[test]
    fn converts_other_units_to_microseconds() {
        let doc = Latency::parse(
            br#"{"unit":"ms","stages":{"flush":{"window":{"p99":2.5,"distribution":[[0.1,4]]}}}}"#,
        )
        .unwrap();
        let w = doc.window("flush").unwrap();
        assert_eq!(w.p99, 2500.0);
        assert_eq!(w.distribution, vec![(100.0, 4)]);
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        assert!(matches!(Latency::parse(b"not json"), Err(LatencyError::Json(_))));
        assert!(matches!(Latency::parse(br#"{"unit":"furlongs"}"#), Err(LatencyError::Unit(_))));
        assert!(matches!(Latency::parse(br#"{"stages": 3}"#), Err(LatencyError::Json(_))));
    }
}
