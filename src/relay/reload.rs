//! Live reload (SIGHUP, `systemctl reload`): which parts of a new [`Config`] can be applied to a
//! running relay, how a reload is told, and [`Relay::reload`], which applies one.
//!
//! Reloadable: the TLS certificate and key (HTTPS, HTTP/3 and QUIC alike: new handshakes get the
//! new certificate, established connections keep theirs), all of `[auth]` (static tokens, JWT
//! settings and the identity provider, roles, rate limits, mTLS on or off, its CA and
//! identities) and the batch parameters. Anything else that differs — listen addresses, NATS,
//! the stream, the spool, the audit stream … — refuses the whole reload, so a reload never
//! half-applies.

use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use super::build::{batching_of, client_ca};
use super::Relay;
use crate::auth::idp::KeyStore;
use crate::batch::driver::Batching;
use crate::config::Config;
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::tls;

/// The config fields (dotted paths, and everything under them) a running relay can change.
pub const RELOADABLE: &[&str] = &[
    "https.tls_cert",
    "https.tls_key",
    "auth",
    "batch.max_events",
    "batch.max_bytes",
    "batch.linger_ms",
    "batch.flush_when_idle",
    "batch.early_flushes_per_sec",
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

/// The parts of a running relay a reload swaps.
pub(super) struct Live {
    /// Held for a whole reload, so reloads never overlap.
    pub current: Mutex<Current>,
    pub cert: Arc<tls::CertSlot>,
    pub clients: Arc<tls::ClientCerts>,
    pub ingest: Arc<Ingest>,
    pub metrics: Arc<Metrics>,
    pub batching: watch::Sender<Batching>,
    pub stop: Shutdown,
}

/// The config in effect, and the task started for it.
pub(super) struct Current {
    /// A reload compares the new config with it.
    pub config: Config,
    /// The task keeping the identity provider's keys current, when JWTs are configured.
    pub keys_refresh: Option<JoinHandle<()>>,
}

impl Relay {
    /// Applies a new (validated) config to the running relay without closing a connection: a
    /// new certificate and client CA for new TLS handshakes, a new authentication stage for new
    /// requests, new batch limits for the drivers' next round. When `auth.jwt` changes where or
    /// how keys are fetched, the new identity provider's keys are loaded first. If any field
    /// that only takes effect at start-up differs (see [`RELOADABLE`]), or the new certificate,
    /// CA, auth settings or keys are unusable, nothing is applied and the relay keeps its
    /// previous config.
    pub async fn reload(&self, new: Config) -> Result<Reloaded, ReloadError> {
        let live = &self.live;
        let mut current = live.current.lock().await;
        let (fields, restart) = diff(&current.config, &new);
        if !restart.is_empty() {
            return Err(ReloadError::Restart(restart));
        }
        // Everything that can fail comes before the first swap.
        let old = live.ingest.auth();
        let auth = Arc::new(old.reloaded(&new.auth, live.metrics.clone())?);
        let kept = |k: &Arc<KeyStore>| old.key_store().is_some_and(|o| Arc::ptr_eq(&o, k));
        let new_keys = auth.key_store().filter(|k| !kept(k));
        if let Some(keys) = &new_keys {
            keys.load().await.map_err(ReloadError::Keys)?;
        }
        let clients = tls::ClientCerts::verifier(client_ca(&new))?;
        let certificate = live.cert.reload(&new.https.tls_cert, &new.https.tls_key)?;
        live.clients.store(clients);
        if new_keys.is_some() || auth.key_store().is_none() {
            if let Some(task) = current.keys_refresh.take() {
                task.abort();
            }
            current.keys_refresh = new_keys.map(|k| tokio::spawn(k.refresh(live.stop.clone())));
        }
        live.ingest.set_auth(auth);
        live.batching.send_replace(batching_of(&new));
        current.config = new;
        Ok(Reloaded { fields, certificate })
    }
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
