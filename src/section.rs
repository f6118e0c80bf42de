//! What every section of the configuration file shares. Each component owns its section
//! (`ingest::config`, `auth::config`, `batch::config`, `sink::config`, `spool::config`,
//! `audit::config`, `admin::config`); [`crate::config`] loads the file, puts the sections
//! together and checks the rules that span several of them.
//!
//! A leaf: it imports nothing from the crate, so any component can use it.

use std::path::{Path, PathBuf};
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

/// A file holding secrets (the config file, a private key, NATS credentials) that other users
/// can read. Shown as the warning the relay logs at start and `check-config` prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposed {
    /// The config field naming the file (`config` for the config file itself).
    pub field: String,
    pub path: PathBuf,
    /// The file's permission bits.
    pub mode: u32,
}

impl Exposed {
    /// `path` (named by `field`) when users other than the relay's can read it: its mode lets
    /// everyone read it, or its group when that group is not the relay's own (the packaged
    /// `root:edgerelay 0640` is fine). `None` for a file that is private, missing (the
    /// problems say so) or on a system without Unix modes.
    pub fn check(field: &str, path: &Path) -> Option<Self> {
        Self::check_for(field, path, relay_group())
    }

    /// [`Exposed::check`] for a relay running with group id `relay_group` (unknown: `None`).
    fn check_for(field: &str, path: &Path, relay_group: Option<u32>) -> Option<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path).ok()?;
            let mode = meta.mode() & 0o7777;
            let group_reads = mode & 0o040 != 0 && relay_group != Some(meta.gid());
            let exposed = mode & 0o004 != 0 || group_reads;
            exposed.then(|| Self { field: field.to_owned(), path: path.to_owned(), mode })
        }
        #[cfg(not(unix))]
        {
            let _ = (field, path, relay_group);
            None
        }
    }
}

/// The relay process's effective group id.
fn relay_group() -> Option<u32> {
    #[cfg(unix)]
    {
        Some(rustix::process::getegid().as_raw())
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// A field in milliseconds (`…_ms`) as a `Duration`.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl std::fmt::Display for Exposed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (path, mode) = (self.path.display(), self.mode);
        let who = if mode & 0o004 != 0 { "every user" } else { "its group" };
        write!(
            f,
            "{}: {path} holds secrets and {who} can read it (mode {mode:04o}): run `chmod 600 \
             {path}` (or `chmod 640` with the relay's own group as the file's group)",
            self.field
        )
    }
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

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    #[test]
    fn files_other_users_can_read_are_exposed_with_the_command_that_fixes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, "secret").unwrap();
        let gid = std::fs::metadata(&path).unwrap().gid();
        let other = gid.wrapping_add(1);
        // (mode, the relay's group, exposed)
        let cases = [
            (0o600, Some(gid), false),
            (0o400, Some(other), false),
            (0o640, Some(gid), false),
            (0o640, Some(other), true),
            (0o640, None, true),
            (0o644, Some(gid), true),
            (0o604, Some(gid), true),
            (0o620, Some(other), false),
        ];
        for (mode, group, exposed) in cases {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let found = Exposed::check_for("https.tls_key", &path, group);
            assert_eq!(found.is_some(), exposed, "mode {mode:o}, relay group {group:?}");
            if let Some(e) = found {
                assert_eq!(e.mode, mode);
                let line = e.to_string();
                for needle in ["https.tls_key: ", &format!("mode {mode:04o}"), "chmod 600 "] {
                    assert!(line.contains(needle), "{needle:?} in {line}");
                }
                assert!(line.contains(&path.display().to_string()), "{line}");
            }
        }
        assert_eq!(Exposed::check("x", &dir.path().join("missing")), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Exposed::check("x", &path), None, "owner-only is fine for this process");
    }
}
