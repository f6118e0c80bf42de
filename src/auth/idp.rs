//! Talking to the identity provider: fetching its key set (JWKS) from a URL, through OIDC
//! discovery or from a file, and keeping [`Keys`] current — a refresh task in the background,
//! and single-flight fetches when a token names a `kid` the set lacks.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::config::{check_url, JwtConfig};
use super::jwks::{Changes, Keys, Lookup, Missing, Policy};
use crate::metrics::{Metrics, ResultLabels};
use crate::shutdown::Shutdown;

/// Key-set changes of every key store of the process, for what keeps an identity across
/// requests (a native stream) without checking its token each time: a change sends it back to
/// the key set, where a rotated-out key's tokens last only until its grace ends.
static KEY_CHANGES: AtomicU64 = AtomicU64::new(0);

/// How many times any key store's usable keys changed (see [`KEY_CHANGES`]).
pub fn key_changes() -> u64 {
    KEY_CHANGES.load(Ordering::Acquire)
}

/// Largest JWKS or discovery document read.
const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// Why a fetch failed (the relay keeps serving the last good key set).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("GET {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("GET {url}: status {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: document larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge { url: String },
    #[error("{what}: not valid JSON of the expected shape: {source}")]
    Json { what: String, source: serde_json::Error },
    #[error("discovery document names issuer {found:?}, not {expected:?}")]
    IssuerMismatch { expected: String, found: String },
    #[error("discovery document: jwks_uri {0:?} is not usable: {1}")]
    BadJwksUri(String, String),
    #[error("reading {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("building the HTTP client: {0}")]
    Client(String),
}

/// Where the keys come from.
#[derive(Debug)]
enum Source {
    Url(String),
    /// The issuer; the JWKS URL once discovered.
    Discovery {
        issuer: String,
        jwks_uri: std::sync::Mutex<Option<String>>,
    },
    File(PathBuf),
}

/// The provider's key set, kept current.
#[derive(Debug)]
pub struct KeyStore {
    /// The settings it was built from ([`KeyStore::settings`]).
    settings: JwtConfig,
    keys: RwLock<Keys>,
    source: Source,
    http: reqwest::Client,
    /// Held while fetching: one fetch at a time (single flight).
    fetching: Mutex<()>,
    metrics: Arc<Metrics>,
}

/// A JWKS document, each key read on its own so one odd key does not spoil the set.
#[derive(Deserialize)]
struct JwksDocument {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl KeyStore {
    pub fn new(
        cfg: &JwtConfig,
        allowed: Vec<jsonwebtoken::Algorithm>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, FetchError> {
        let policy = Policy {
            refresh: Duration::from_secs(cfg.refresh_secs),
            cooldown: Duration::from_secs(cfg.fetch_cooldown_secs),
            max_stale: Duration::from_secs(cfg.max_stale_secs),
            grace: Duration::from_secs(cfg.key_grace_secs),
        };
        let source = match (&cfg.jwks_url, &cfg.jwks_file) {
            (Some(url), _) => Source::Url(url.clone()),
            (None, Some(path)) => Source::File(path.clone()),
            (None, None) => Source::Discovery {
                issuer: cfg.issuer.trim_end_matches('/').to_owned(),
                jwks_uri: std::sync::Mutex::new(None),
            },
        };
        Ok(Self {
            settings: Self::settings(cfg),
            keys: RwLock::new(Keys::new(policy, allowed)),
            source,
            http: http_client(cfg)?,
            fetching: Mutex::new(()),
            metrics,
        })
    }

    /// Whether this store fetches and keeps keys as `cfg` asks: a reload that changes only
    /// how tokens are checked (audiences, leeway, lifetime, identity claim, cache size) keeps
    /// the store and its keys.
    pub fn serves(&self, cfg: &JwtConfig) -> bool {
        self.settings == Self::settings(cfg)
    }

    /// The part of `cfg` a store is built from.
    fn settings(cfg: &JwtConfig) -> JwtConfig {
        let discovery = cfg.jwks_url.is_none() && cfg.jwks_file.is_none();
        JwtConfig {
            issuer: if discovery { cfg.issuer.clone() } else { String::new() },
            audiences: Vec::new(),
            leeway_secs: 0,
            max_token_lifetime_secs: 0,
            identity_claim: String::new(),
            token_cache_entries: 0,
            ..cfg.clone()
        }
    }

    /// Fetches the key set once unless a usable one is loaded: at start-up, so the first
    /// requests find keys.
    pub async fn load(&self) -> Result<(), FetchError> {
        let _flight = self.fetching.lock().await;
        let now = Instant::now();
        if self.read().usable(now) {
            return Ok(());
        }
        self.fetch_now(now).await.map(|_| ())
    }

    /// Looks a key up at `now`, fetching the set first (once, whoever else is waiting) when
    /// the set lacks it and a fetch is allowed. Without usable keys it waits for a fetch in
    /// flight before it gives up.
    pub async fn lookup(&self, kid: Option<&str>, now: Instant) -> Lookup {
        match self.read().lookup(kid, now) {
            Lookup::Fetch | Lookup::Refused(Missing::NoKeys) => {}
            found => return found,
        }
        let _flight = self.fetching.lock().await;
        // Whoever held the lock may have fetched already.
        let now = Instant::now();
        match self.read().lookup(kid, now) {
            Lookup::Fetch => {}
            other => return other,
        }
        if let Err(e) = self.fetch_now(now).await {
            tracing::warn!(error = %e, "fetching the identity provider's keys failed");
        }
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        match keys.lookup(kid, now) {
            Lookup::Fetch => {
                if let Some(kid) = kid {
                    keys.missing(kid, now);
                }
                keys.lookup(kid, now)
            }
            other => other,
        }
    }

    /// Bumped whenever the usable keys change.
    pub fn generation(&self) -> u64 {
        self.read().generation()
    }

    /// Whether tokens can be checked now: a key set is loaded and not older than the stale
    /// limit.
    pub fn is_usable(&self) -> bool {
        self.read().usable(Instant::now())
    }

    /// Fetches and installs the key set now (callers hold `fetching`, or it is start-up).
    async fn fetch_now(&self, now: Instant) -> Result<Changes, FetchError> {
        self.keys.write().unwrap_or_else(|p| p.into_inner()).attempt(now);
        let fetched = self.fetch().await;
        let result = if fetched.is_ok() { "ok" } else { "error" };
        self.metrics.jwks_fetches.get_or_create(&ResultLabels { result }).inc();
        let jwks = fetched?;
        let changes = self.keys.write().unwrap_or_else(|p| p.into_inner()).update(&jwks, now);
        if changes.any() {
            KEY_CHANGES.fetch_add(1, Ordering::AcqRel);
            self.metrics.jwks_key_changes.inc();
            tracing::info!(
                added = changes.added,
                retired = changes.retired,
                replaced = changes.replaced,
                skipped = changes.skipped,
                "identity provider keys changed"
            );
        }
        Ok(changes)
    }

    /// Keeps the key set current until `stop`: fetches at once, then at every refresh (or a
    /// cooldown after a failure).
    pub async fn refresh(self: Arc<Self>, mut stop: Shutdown) {
        loop {
            {
                let _flight = self.fetching.lock().await;
                let now = Instant::now();
                let due = self.read().next_refresh().is_none_or(|t| t <= now);
                if due {
                    if let Err(e) = self.fetch_now(now).await {
                        tracing::warn!(error = %e, "refreshing the identity provider's keys failed");
                    }
                }
            }
            let next = self
                .read()
                .next_refresh()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = stop.requested() => return,
            }
            if stop.is_shutdown() {
                return;
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    /// One fetch of the key set from the source.
    async fn fetch(&self) -> Result<Vec<Jwk>, FetchError> {
        let body = match &self.source {
            Source::Url(url) => self.get(url).await?,
            Source::File(path) => tokio::fs::read(path)
                .await
                .map_err(|source| FetchError::File { path: path.clone(), source })?,
            Source::Discovery { issuer, jwks_uri } => {
                let known = jwks_uri.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let uri = match known {
                    Some(uri) => uri,
                    None => {
                        let uri = self.discover(issuer).await?;
                        *jwks_uri.lock().unwrap_or_else(|p| p.into_inner()) = Some(uri.clone());
                        uri
                    }
                };
                self.get(&uri).await?
            }
        };
        let doc: JwksDocument = serde_json::from_slice(&body)
            .map_err(|source| FetchError::Json { what: "JWKS".into(), source })?;
        Ok(doc
            .keys
            .into_iter()
            .filter_map(|k| match serde_json::from_value::<Jwk>(k) {
                Ok(jwk) => Some(jwk),
                Err(e) => {
                    tracing::debug!(error = %e, "skipping a JWKS key the relay cannot read");
                    None
                }
            })
            .collect())
    }

    /// The JWKS URL from the issuer's discovery document.
    async fn discover(&self, issuer: &str) -> Result<String, FetchError> {
        let url = format!("{issuer}/.well-known/openid-configuration");
        let body = self.get(&url).await?;
        let doc: Discovery = serde_json::from_slice(&body)
            .map_err(|source| FetchError::Json { what: url.clone(), source })?;
        // OIDC Discovery §4.3: the document must name the issuer it was fetched for.
        if doc.issuer.trim_end_matches('/') != issuer {
            return Err(FetchError::IssuerMismatch { expected: issuer.into(), found: doc.issuer });
        }
        check_url(&doc.jwks_uri).map_err(|e| FetchError::BadJwksUri(doc.jwks_uri.clone(), e))?;
        Ok(doc.jwks_uri)
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, FetchError> {
        let http = |source| FetchError::Http { url: url.to_owned(), source };
        let mut resp = self.http.get(url).send().await.map_err(http)?;
        if !resp.status().is_success() {
            return Err(FetchError::Status { url: url.to_owned(), status: resp.status().as_u16() });
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(http)? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(FetchError::TooLarge { url: url.to_owned() });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// An HTTP client trusting the system's CAs and `ca_file`, with the fetch timeout.
fn http_client(cfg: &JwtConfig) -> Result<reqwest::Client, FetchError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = &cfg.ca_file {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| FetchError::Client(format!("reading {}: {e}", path.display())))?;
        for cert in certs {
            roots.add(cert).map_err(|e| FetchError::Client(format!("{}: {e}", path.display())))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| FetchError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_millis(cfg.fetch_timeout_ms))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("edgerelay/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| FetchError::Client(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_serves_configs_that_differ_only_in_how_tokens_are_checked() {
        let cfg = JwtConfig {
            issuer: "https://idp.example".into(),
            jwks_url: Some("https://idp.example/jwks".into()),
            ..Default::default()
        };
        let store = KeyStore::new(&cfg, Vec::new(), Arc::new(Metrics::new())).unwrap();
        let with = |change: fn(&mut JwtConfig)| {
            let mut c = cfg.clone();
            change(&mut c);
            store.serves(&c)
        };
        assert!(with(|c| c.audiences = vec!["other".into()]));
        assert!(with(|c| c.leeway_secs = 99));
        // Without discovery the issuer is only checked in tokens.
        assert!(with(|c| c.issuer = "https://new.example".into()));
        assert!(!with(|c| c.jwks_url = Some("https://idp.example/jwks2".into())));
        assert!(!with(|c| c.algorithms = vec!["RS256".into()]));
        assert!(!with(|c| c.max_stale_secs += 1));
        assert!(!with(|c| {
            c.jwks_url = None;
            c.discovery = true;
        }));
    }
}
