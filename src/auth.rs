//! Authentication and authorization: the one stage every request passes through, whatever
//! protocol it came in on. It turns credentials into an [`Identity`], and an identity plus a
//! subject into yes or no. Publishing is the only thing the edge can ever be allowed to do.
//!
//! - [`config`]: the `[auth]` section of the config file, its defaults and checks.
//! - [`jwt`]: OIDC / JWT bearer tokens: header, signature and claims (sans-IO), and the cache
//!   of validated tokens.
//! - [`jwks`]: the provider's keys by `kid`, with refresh, cooldown and grace rules (sans-IO).
//! - [`idp`]: fetching the keys (URL, OIDC discovery or file) and keeping them current.
//! - [`rbac`]: roles mapping claims to subject patterns (sans-IO).
//! - [`template`]: subject patterns with claims filled in from a token (sans-IO).
//! - [`mtls`]: client certificates as identities.
//! - [`rules`]: allow/deny subject patterns (sans-IO).
//! - [`session`]: credentials a connection or stream presented once, and the identity they prove
//!   under the current auth stage (derived again after a reload: revocation reaches open
//!   connections).
//! - [`static_tokens`]: bearer tokens from the config (development and tests).

pub mod config;
pub mod idp;
pub mod jwks;
pub mod jwt;
pub mod mtls;
pub mod rate_limit;
pub mod rbac;
pub mod rules;
pub mod session;
pub mod static_tokens;
pub mod template;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub use rules::Rules;
pub use session::{Current, Peer, Session};

use crate::error::{excerpt, ErrorCode, Refusal};
use crate::metrics::Metrics;
use config::AuthConfig;

/// What a request presents to prove who it is.
#[derive(Clone, Copy, Debug, Default)]
pub struct Credentials<'a> {
    /// The token of an `Authorization: Bearer …` header.
    pub bearer: Option<&'a str>,
    /// The identity of the connection's client certificate, if it has a configured one. A
    /// bearer token, when present, wins.
    pub peer: Option<&'a Identity>,
}

/// Who is publishing, and where they may.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Namespaced by the kind of credentials ([`Source::name`]): the idempotency scope, the
    /// rate-limit bucket, the audit records and the `publisher` of each event.
    pub name: Arc<str>,
    pub rules: Arc<Rules>,
    /// When the credentials stop being valid, unix seconds (a JWT's `exp` plus the leeway);
    /// `None` for credentials that do not expire (static tokens).
    pub expires: Option<u64>,
    /// The tenant (`auth.rate_limit.tenant_claim` of a JWT), for the tenant rate limit.
    pub tenant: Option<Arc<str>>,
}

/// Where an identity comes from. Its name is namespaced by it (`static:<name>`,
/// `mtls:<name>`, `jwt:<issuer>:<subject>`), so one kind of credentials can never speak for
/// another: a JWT whose `sub` equals a static token's name is another identity, with its own
/// idempotency keys, rate bucket and `publisher`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source<'a> {
    /// A static token of `auth.static_tokens`, by its configured name.
    Static(&'a str),
    /// A client certificate of `auth.mtls.identities`, by its configured name.
    Mtls(&'a str),
    /// A JWT: the issuer it was validated against and its identity claim.
    Jwt { issuer: &'a str, subject: &'a str },
}

impl Source<'_> {
    /// The identity's namespaced name.
    pub fn name(self) -> Arc<str> {
        match self {
            Self::Static(name) => format!("static:{name}"),
            Self::Mtls(name) => format!("mtls:{name}"),
            Self::Jwt { issuer, subject } => format!("jwt:{issuer}:{subject}"),
        }
        .into()
    }
}

impl Identity {
    /// Refuses an identity whose credentials expired since they were checked: a QUIC stream
    /// keeps its identity across requests, but not past its token's `exp`.
    pub fn check_current(&self) -> Result<(), Refusal> {
        match self.expires {
            Some(exp) if unix_now() >= exp => Err(Refusal::new(
                ErrorCode::Unauthorized,
                "the token of this stream has expired: send a fresh one",
            )
            .because("token_expired")),
            _ => Ok(()),
        }
    }
}

/// The authentication and authorization stage. Built whole from the config and swapped whole
/// by a reload ([`Current`]); each build has its own [`Auth::generation`].
#[derive(Debug)]
pub struct Auth {
    generation: u64,
    static_tokens: static_tokens::StaticTokens,
    jwt: Option<Jwt>,
    certs: Option<mtls::CertIdentities>,
    per_identity: Option<rate_limit::Limiter>,
    per_tenant: Option<rate_limit::Limiter>,
}

/// The generation of the next stage built.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// The JWT path: the validator and the provider's keys.
#[derive(Debug)]
struct Jwt {
    validator: jwt::Validator,
    keys: Arc<idp::KeyStore>,
    metrics: Arc<Metrics>,
}

/// Why the stage could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth.roles: {0}")]
    Roles(#[from] template::RoleError),
    #[error("auth.jwt: {0}")]
    Keys(#[from] idp::FetchError),
    #[error("auth.mtls: {0}")]
    Certs(#[from] crate::subject::SubjectError),
}

impl Auth {
    /// Builds the stage from (validated) configuration. The provider's keys are fetched by
    /// [`Auth::key_store`]'s refresh task and on demand.
    pub fn new(cfg: &AuthConfig, metrics: Arc<Metrics>) -> Result<Self, AuthError> {
        Self::build(cfg, metrics, None)
    }

    /// A new stage for a reloaded `cfg`. It starts with an empty token cache and full
    /// rate-limit buckets. It keeps this stage's provider keys (and their refresh task) unless
    /// `auth.jwt` changes where or how keys are fetched; a new key store is empty until loaded
    /// (see [`Auth::key_store`]).
    pub fn reloaded(&self, cfg: &AuthConfig, metrics: Arc<Metrics>) -> Result<Self, AuthError> {
        let keys = match (self.key_store(), &cfg.jwt) {
            (Some(keys), Some(j)) if keys.serves(j) => Some(keys),
            _ => None,
        };
        Self::build(cfg, metrics, keys)
    }

    fn build(
        cfg: &AuthConfig,
        metrics: Arc<Metrics>,
        keys: Option<Arc<idp::KeyStore>>,
    ) -> Result<Self, AuthError> {
        let jwt = match &cfg.jwt {
            Some(j) => {
                let roles = rbac::Roles::parse(&cfg.roles)?;
                let rl = &cfg.rate_limit;
                let validator = jwt::Validator::new(j, roles, rl.tenant_claim.clone())
                    .requiring_tenant(rl.tenant_events_per_sec > 0);
                let keys = match keys {
                    Some(k) => k,
                    None => Arc::new(idp::KeyStore::new(
                        j,
                        validator.allowed().to_vec(),
                        metrics.clone(),
                    )?),
                };
                Some(Jwt { validator, keys, metrics })
            }
            None => None,
        };
        let rl = &cfg.rate_limit;
        let limiter = |per_sec: u64, burst: u64| {
            (per_sec > 0).then(|| {
                let burst = if burst == 0 { per_sec } else { burst };
                rate_limit::Limiter::new(per_sec, burst, rl.max_tracked)
            })
        };
        Ok(Self {
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            static_tokens: static_tokens::StaticTokens::new(&cfg.static_tokens),
            jwt,
            certs: cfg.mtls.as_ref().map(mtls::CertIdentities::new).transpose()?,
            per_identity: limiter(rl.events_per_sec, rl.burst),
            per_tenant: limiter(rl.tenant_events_per_sec, rl.tenant_burst),
        })
    }

    /// Which build this is: no two stages of a process share it, so an identity cached with it
    /// is current exactly while the stage in effect has the same generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Takes `events` from the identity's (and its tenant's) rate limit at `now`. A request
    /// larger than a burst is refused with no retry delay: it can never pass, only a split can.
    pub fn limit(&self, identity: &Identity, events: usize, now: Instant) -> Result<(), Refusal> {
        let over = |denied: rate_limit::Denied, whose: &str, tenant: bool| match denied {
            rate_limit::Denied::Wait(after) => Refusal::new(
                ErrorCode::RateLimited,
                format!("{whose} is over its rate limit: retry in {} ms", after.as_millis()),
            )
            .retry_after(after)
            .because(if tenant { "tenant_rate_limited" } else { "rate_limited" }),
            rate_limit::Denied::OverBurst { burst } => Refusal::new(
                ErrorCode::RateLimited,
                format!(
                    "{whose}'s burst is {burst} events: a request of {events} can never pass \
                     (retrying will not help); send at most {burst} events a request"
                ),
            )
            .no_retry()
            .because(if tenant {
                "request_over_tenant_burst"
            } else {
                "request_over_burst"
            }),
        };
        let tenant = self.per_tenant.as_ref().zip(identity.tenant.as_ref());
        // Neither bucket is drawn from for a request one of them can never take.
        if let Some(l) = &self.per_identity {
            l.fits(events).map_err(|d| over(d, &excerpt(&identity.name), false))?;
        }
        if let Some((l, _)) = tenant {
            l.fits(events).map_err(|d| over(d, "the tenant", true))?;
        }
        if let Some(l) = &self.per_identity {
            l.take(&identity.name, events, now)
                .map_err(|d| over(d, &excerpt(&identity.name), false))?;
        }
        if let Some((l, tenant)) = tenant {
            l.take(tenant, events, now).map_err(|d| over(d, "the tenant", true))?;
        }
        Ok(())
    }

    /// The identity of a connection's verified client certificate chain, if configured.
    pub fn peer_identity(
        &self,
        chain: Option<&[rustls::pki_types::CertificateDer<'_>]>,
    ) -> Option<Identity> {
        self.certs.as_ref()?.identify(chain?)
    }

    /// The provider's key set, when JWTs are configured: its `refresh` task keeps it current.
    pub fn key_store(&self) -> Option<Arc<idp::KeyStore>> {
        self.jwt.as_ref().map(|j| j.keys.clone())
    }

    /// Checks the credentials. Asynchronous because a token may name a key not fetched yet.
    pub async fn authenticate(&self, creds: Credentials<'_>) -> Result<Identity, Refusal> {
        let Some(token) = creds.bearer else {
            if let Some(peer) = creds.peer {
                return Ok(peer.clone());
            }
            return Err(Refusal::new(
                ErrorCode::Unauthorized,
                "missing credentials: send Authorization: Bearer <token>",
            )
            .because("missing_token"));
        };
        if let Some(id) = self.static_tokens.identify(token) {
            return Ok(id);
        }
        match &self.jwt {
            Some(jwt) => jwt.authenticate(token).await,
            None => Err(Refusal::new(ErrorCode::Unauthorized, "unknown or expired token")
                .because("unknown_token")),
        }
    }

    /// May `identity` publish on `subject` (an already valid subject)?
    pub fn authorize(&self, identity: &Identity, subject: &str) -> Result<(), Refusal> {
        if identity.rules.permits(subject) {
            Ok(())
        } else {
            Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("{} may not publish on this subject", excerpt(&identity.name)),
            )
            .because("no_rule_allows"))
        }
    }
}

impl Jwt {
    async fn authenticate(&self, token: &str) -> Result<Identity, Refusal> {
        let now = unix_now();
        let digest = jwt::digest(token);
        if let Some(valid) = self.validator.cached(&digest, self.keys.generation(), now) {
            return Ok(valid.identity);
        }
        let header = self.validator.header(token)?;
        let generation = self.keys.generation();
        let at = Instant::now();
        let (key, grace_ends) = match self.keys.lookup(header.kid.as_deref(), at).await {
            jwks::Lookup::Found(key, grace_ends) => (key, grace_ends),
            jwks::Lookup::Refused(missing) => return Err(missing_key(missing)),
            jwks::Lookup::Fetch => return Err(missing_key(jwks::Missing::NoKeys)),
        };
        self.metrics.jwt_verifications.inc();
        let mut valid = self.validator.verify(token, &header, &key, now)?;
        // A rotated-out key's tokens are remembered only until its grace ends, and a native
        // stream that keeps the identity holds it no longer than that either.
        let until = grace_ends.map_or(valid.expires, |end| {
            valid.expires.min(now + end.saturating_duration_since(at).as_secs())
        });
        if grace_ends.is_some() {
            valid.identity.expires = valid.identity.expires.map(|exp| exp.min(until));
        }
        self.validator.remember(digest, valid.clone(), generation, until, now);
        Ok(valid.identity)
    }
}

fn missing_key(m: jwks::Missing) -> Refusal {
    use jwks::Missing;
    use jwt::unauthorized;
    match m {
        Missing::UnknownKid => unauthorized(
            "unknown_key",
            "token is signed by a key the identity provider does not publish",
        ),
        Missing::NoKid => unauthorized(
            "missing_kid",
            "token names no key (kid) and the identity provider has several",
        ),
        Missing::BadKid => unauthorized("malformed_token", "token kid is too long"),
        Missing::Retired => {
            unauthorized("retired_key", "token is signed by a key the identity provider retired")
        }
        Missing::NoKeys => Refusal::new(
            ErrorCode::AuthUnavailable,
            "the identity provider's keys are not available: cannot check tokens",
        ),
    }
}

/// Seconds since the unix epoch (JWT times).
fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Extracts the token of an `Authorization` header value (`Bearer <token>`, case-insensitive
/// scheme). `None` for any other form.
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_namespaced_by_kind() {
        let cases = [
            (Source::Static("edge"), "static:edge"),
            (Source::Mtls("edge"), "mtls:edge"),
            (
                Source::Jwt { issuer: "https://idp.example", subject: "edge" },
                "jwt:https://idp.example:edge",
            ),
        ];
        for (source, name) in cases {
            assert_eq!(&*source.name(), name);
        }
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
