//! The `[batch]` section: how events are coalesced into batches, with its defaults and checks.

use serde::{Deserialize, Serialize};

use crate::section::Problems;

/// How events are coalesced into batches.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Flush a subject's batch once it holds this many events. `1` turns batching off.
    pub max_events: usize,
    /// Flush a subject's batch before it would exceed this many bytes of encoded events. Keep
    /// it under the NATS server's `max_payload` (1 MiB by default).
    pub max_bytes: usize,
    /// Flush a batch this long after its first event arrived, milliseconds, even if not full.
    /// The main latency/throughput knob.
    pub linger_ms: u64,
    /// Publish at once when no batch is waiting for its PubAck, and linger only while acks are
    /// outstanding: unbatched latency at low rates, full batches under load (the ack clock
    /// sets the batch size). Off: every batch waits `linger_ms` unless it fills up.
    pub flush_when_idle: bool,
    /// With `flush_when_idle`, also publish at once while acks are outstanding from a cluster
    /// whose probed round trip is longer than `linger_ms`, up to this many batches a second
    /// per queue shard (0: never). With NATS a WAN round trip away a batch is almost always in
    /// flight, so without it every event waits its whole linger; the rate bounds the extra
    /// JetStream messages under load, when batching takes over again.
    pub early_flushes_per_sec: u32,
    /// Number of queue shards (each with its own batcher task). 0 = number of CPUs. Events of
    /// one subject always go to the same shard, so their order is kept.
    pub shards: usize,
    /// Capacity of each shard's lock-free queue, events. A full queue answers 503.
    pub queue_capacity: usize,
    /// Bytes of encoded events each shard holds at most (an empty shard still takes one larger
    /// event); past it the shard is full like at `queue_capacity` (503 `queue_full`). The
    /// default, 32 MiB, is the default 16,384 events at 2 KiB each: small events meet the event
    /// bound first, large ones this one.
    pub queue_max_bytes: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_events: 256,
            max_bytes: 512 << 10,
            linger_ms: 2,
            flush_when_idle: true,
            early_flushes_per_sec: 1_000,
            shards: 0,
            queue_capacity: 16_384,
            queue_max_bytes: 32 << 20,
        }
    }
}

impl BatchConfig {
    /// Everything wrong with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Problems::default();
        p.bad(self.max_events == 0, "batch.max_events must be > 0 (1 turns batching off)");
        p.bad(self.max_bytes > 8 << 20, "batch.max_bytes must be at most 8 MiB (NATS max_payload)");
        p.nonzero("batch.queue_capacity", self.queue_capacity);
        p.nonzero("batch.queue_max_bytes", self.queue_max_bytes);
        p.bad(self.shards > 1024, "batch.shards must be at most 1024");
        p.into_vec()
    }

    /// Number of queue shards to run: `shards`, or one per CPU when it is 0.
    pub fn shard_count(&self) -> usize {
        match self.shards {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_settings_are_checked() {
        let batch =
            BatchConfig { max_events: 0, max_bytes: 9 << 20, shards: 2048, ..Default::default() };
        assert_eq!(
            batch.problems(),
            [
                "batch.max_events must be > 0 (1 turns batching off)",
                "batch.max_bytes must be at most 8 MiB (NATS max_payload)",
                "batch.shards must be at most 1024",
            ]
        );
        assert!(BatchConfig::default().problems().is_empty());
        assert!(BatchConfig::default().shard_count() >= 1);
    }
}
