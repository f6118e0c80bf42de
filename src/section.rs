//! What every section of the configuration file shares. Each component owns its section
//! (`ingest::config`, `auth::config`, `batch::config`, `sink::config`, `spool::config`,
//! `audit::config`, `admin::config`); [`crate::config`] loads the file, puts the sections
//! together and checks the rules that span several of them.
//!
//! A leaf: it imports nothing from the crate, so any component can use it.

use std::path::Path;
use std::time::Duration;

/// The problems found in a section, one line each, as `check-config` prints them. A
/// section's `problems()` reports every problem at once, so one run fixes a file.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    /// Notes `message` when `bad` holds.
    pub fn bad(&mut self, bad: bool, message: impl Into<String>) {
        if bad {
            self.0.push(message.into());
        }
    }

    /// Notes the error of `result`, if any, in the words of `message`.
    pub fn refused<T, E>(&mut self, result: Result<T, E>, message: impl FnOnce(E) -> String) {
        if let Err(e) = result {
            self.0.push(message(e));
        }
    }

    /// Notes that `field` must be > 0 when it is 0.
    pub fn nonzero<T: Default + PartialEq>(&mut self, field: &str, value: T) {
        self.bad(value == T::default(), format!("{field} must be > 0"));
    }

    /// Notes that `field` is not a name of 1-64 characters of `[A-Za-z0-9_-]` (a name that can
    /// be a subject token, a metric label or a JetStream stream name).
    pub fn name(&mut self, field: &str, value: &str) {
        let ok = (1..=64).contains(&value.len())
            && value.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
        self.bad(!ok, format!("{field}: {value:?} must be 1-64 characters of [A-Za-z0-9_-]"));
    }

    /// Notes that `field` names no readable file when `path` is not one.
    pub fn file(&mut self, field: &str, path: &Path) {
        self.bad(!path.is_file(), format!("{field}: {} is not a readable file", path.display()));
    }

    /// Notes every problem of a subsection, each after `prefix`.
    pub fn nested(&mut self, prefix: &str, problems: Vec<String>) {
        self.0.extend(problems.into_iter().map(|p| format!("{prefix}{p}")));
    }

    /// The problems, in the order they were noted.
    pub fn into_vec(self) -> Vec<String> {
        self.0
    }
}

/// A field in milliseconds (`…_ms`) as a `Duration`.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// The problems `check` finds in a section parsed from `text`, one a line.
#[cfg(test)]
pub fn problems_in<T: serde::de::DeserializeOwned>(
    text: &str,
    check: fn(&T) -> Vec<String>,
) -> String {
    check(&toml::from_str(text).unwrap()).join("\n")
}

/// Asserts that every one of `needles` is in `all`, the problems a test found (one a line).
#[cfg(test)]
pub fn assert_reported(all: &str, needles: &[&str]) {
    for needle in needles {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
}
