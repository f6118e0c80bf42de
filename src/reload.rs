//! Live reload (SIGHUP, `systemctl reload`): which parts of a new [`Config`] can be applied to a
//! running relay, and how a reload is told. [`crate::Relay::reload`] applies one.
//!
//! Reloadable: the TLS certificate and key (HTTPS, HTTP/3 and QUIC alike: new handshakes get the
//! new certificate, established connections keep theirs), all of `[auth]` (static tokens, JWT
//! settings and the identity provider, roles, rate limits, mTLS on or off, its CA and
//! identities) and the batch parameters. Anything else that differs — listen addresses, NATS,
//! the stream, the spool, the audit stream … — refuses the whole reload, so a reload never
//! half-applies.

use std::fmt;

use serde_json::Value;

use crate::config::Config;

/// The config fields (dotted paths, and everything under them) a running relay can change.
pub const RELOADABLE: &[&str] = &[
    "https.tls_cert",
    "https.tls_key",
    "auth",
    "batch.max_events",
    "batch.max_bytes",
    "batch.linger_ms",
    "batch.flush_when_idle",
];

/// What a reload changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// The config fields that differ from the previous config (dotted paths).
    pub fields: Vec<String>,
    /// The leaf certificate served is a different one (the files may have been replaced in
    /// place, under the same paths).
    pub certificate: bool,
}

/// Why a reload was refused. The relay keeps running on its previous config, all of it.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Fields that only take effect at start-up differ.
    #[error("restart to apply: {}", .0.join(", "))]
    Restart(Vec<String>),
    /// The new certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The new authentication settings cannot be used.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// The keys of the newly configured identity provider could not be loaded (the relay would
    /// refuse every token).
    #[error("auth.jwt: the identity provider's keys could not be loaded: {0}")]
    Keys(crate::auth::idp::FetchError),
}

/// The fields that differ between `old` and `new`, split into (reloadable, restart-only).
pub fn diff(old: &Config, new: &Config) -> (Vec<String>, Vec<String>) {
    let (old, new) = (to_value(old), to_value(new));
    let mut changed = Vec::new();
    walk("", &old, &new, &mut changed);
    changed.into_iter().partition(|path| reloadable(path))
}

fn reloadable(path: &str) -> bool {
    RELOADABLE
        .iter()
        .any(|r| path == *r || path.strip_prefix(r).is_some_and(|rest| rest.starts_with('.')))
}

fn to_value(config: &Config) -> Value {
    serde_json::to_value(config).unwrap_or(Value::Null)
}

/// Collects the paths where `a` and `b` differ: objects are compared key by key, anything else
/// (arrays included) as a whole.
fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                let (x, y) = (a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null));
                walk(&sub, x, y, out);
            }
        }
        (a, b) if a != b => out.push(path.to_owned()),
        _ => {}
    }
}

impl fmt::Display for Reloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<&str> = self.fields.iter().map(String::as_str).collect();
        if self.certificate {
            parts.insert(0, "certificate");
        }
        match parts.is_empty() {
            true => f.write_str("nothing"),
            false => f.write_str(&parts.join(", ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloadable_fields_are_told_apart_from_restart_ones() {
        let old = Config::default();
        let mut new = old.clone();
        new.batch.max_events = 7;
        new.https.tls_cert = "/new/cert.pem".into();
        new.https.listen = "127.0.0.1:1".parse().unwrap();
        new.relay.id = "other".into();
        let (reload, restart) = diff(&old, &new);
        assert_eq!(reload, ["batch.max_events", "https.tls_cert"]);
        assert_eq!(restart, ["https.listen", "relay.id"]);
    }

    #[test]
    fn all_of_auth_reloads_mtls_and_jwt_switched_on_included() {
        let old = Config::default();
        let mut new = old.clone();
        new.auth.mtls = Some(Default::default());
        new.auth.jwt = Some(Default::default());
        new.audit.enabled = !old.audit.enabled;
        let (reload, restart) = diff(&old, &new);
        assert_eq!(reload, ["auth.jwt", "auth.mtls"]);
        assert_eq!(restart, ["audit.enabled"]);
    }

    #[test]
    fn a_prefix_is_not_a_parent() {
        assert!(reloadable("batch.max_events"));
        assert!(reloadable("auth.rate_limit.burst"));
        assert!(!reloadable("batch.max_events_x"));
        assert!(reloadable("auth.jwt.audiences"));
        assert!(!reloadable("authx"));
    }
}
