//! The configured JetStream stream: the config the relay wants, and the comparison with an
//! existing stream that decides whether the relay may use it. Pure functions; the NATS calls
//! live in [`super::cluster`].

use std::time::Duration;

use async_nats::jetstream::stream::{Config as StreamSpec, StorageType};

use super::config::{Storage, StreamConfig};

/// The stream config the relay creates when the stream is missing.
pub fn spec(cfg: &StreamConfig) -> StreamSpec {
    StreamSpec {
        name: cfg.name.clone(),
        subjects: cfg.subjects.clone(),
        num_replicas: cfg.replicas,
        storage: match cfg.storage {
            Storage::File => StorageType::File,
            Storage::Memory => StorageType::Memory,
        },
        duplicate_window: Duration::from_millis(cfg.duplicate_window_ms),
        max_age: Duration::from_secs(cfg.max_age_secs),
        max_bytes: cfg.max_bytes,
        ..Default::default()
    }
}

/// Differences between an existing stream and the configuration that make it unusable as
/// configured, one line each; empty when the stream fits.
pub fn conflicts(existing: &StreamSpec, cfg: &StreamConfig) -> Vec<String> {
    let want = spec(cfg);
    let mut out = Vec::new();
    let mut have_subjects = existing.subjects.clone();
    let mut want_subjects = want.subjects.clone();
    have_subjects.sort();
    want_subjects.sort();
    if have_subjects != want_subjects {
        out.push(format!("subjects are {have_subjects:?}, config wants {want_subjects:?}"));
    }
    if existing.storage != want.storage {
        out.push(format!("storage is {:?}, config wants {:?}", existing.storage, want.storage));
    }
    if existing.num_replicas.max(1) != want.num_replicas {
        out.push(format!(
            "replicas are {}, config wants {}",
            existing.num_replicas, want.num_replicas
        ));
    }
    if existing.duplicate_window < want.duplicate_window {
        out.push(format!(
            "duplicate window is {:?}, config wants at least {:?} (retried batches could be stored twice)",
            existing.duplicate_window, want.duplicate_window
        ));
    }
    if existing.no_ack {
        out.push("no_ack is set: JetStream would never acknowledge a publish".into());
    }
    if existing.sealed {
        out.push("the stream is sealed: it refuses every publish".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relays_own_spec_has_no_conflicts() {
        let cfg = StreamConfig::default();
        assert!(conflicts(&spec(&cfg), &cfg).is_empty());
    }

    #[test]
    fn differing_subjects_storage_and_window_are_conflicts() {
        let cfg = StreamConfig::default();
        let mut other = spec(&cfg);
        other.subjects = vec!["other.>".into()];
        other.storage = StorageType::Memory;
        other.duplicate_window = Duration::from_secs(1);
        let c = conflicts(&other, &cfg);
        assert_eq!(c.len(), 3, "{c:?}");
    }
}
