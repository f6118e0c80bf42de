//! JWT bearer tokens from the identity provider (sans-IO: the caller passes the time and the
//! key; [`super::idp`] finds the key).
//!
//! What a token must be, in the order it is checked (each failure has its own reason):
//!
//! 1. three base64url parts, at most [`MAX_TOKEN_BYTES`]; a header naming an allowed
//!    asymmetric algorithm (`none` and HMAC can never be allowed) and no `crit` extensions;
//! 2. signed by a key of the provider's key set that may use that algorithm;
//! 3. `exp`, `iss` and `aud` present, `iss` equal to the configured issuer, `aud` naming a
//!    configured audience, `exp` not past and `nbf`/`iat` not in the future (with the
//!    leeway); a claim of the wrong type is a refusal, never "absent";
//! 4. short-lived: `exp - iat` (or `exp - now` without `iat`) at most the configured maximum;
//! 5. the identity claim (`sub` by default) a non-empty string;
//! 6. when a tenant rate limit is configured, the tenant claim a non-empty string too: a token
//!    without one would escape the tenant's bucket, so it is refused (fails closed).
//!
//! Validated tokens are remembered by their SHA-256 until their `exp` (and only while the key
//! set is unchanged), so an edge function reusing one token pays for one signature check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::config::{algorithm, JwtConfig};
use super::jwks::Key;
use super::rbac::Roles;
use super::{Identity, Source};
use crate::error::{excerpt, ErrorCode, Refusal};

/// Longest token accepted.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Longest identity claim accepted.
pub const MAX_IDENTITY_BYTES: usize = 256;

/// The header fields the relay reads before it looks for a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

/// Checks tokens against the configuration and remembers the good ones.
#[derive(Debug)]
pub struct Validator {
    issuer: String,
    audiences: Vec<String>,
    allowed: Vec<Algorithm>,
    leeway: u64,
    max_lifetime: u64,
    identity_claim: String,
    tenant_claim: Option<String>,
    /// A token must carry the tenant claim (a tenant rate limit is configured).
    tenant_required: bool,
    roles: Roles,
    cache: Mutex<Cache>,
}

/// A validated token, as remembered.
#[derive(Clone, Debug)]
pub struct Valid {
    pub identity: Identity,
    /// `exp`, unix seconds.
    pub expires: u64,
}

#[derive(Debug)]
struct Cache {
    /// Token digest → (result, key set generation, remembered until: unix seconds).
    entries: HashMap<[u8; 32], (Valid, u64, u64)>,
    max: usize,
}

/// A 401 with a finer reason.
pub(crate) fn unauthorized(
    reason: &'static str,
    message: impl Into<std::borrow::Cow<'static, str>>,
) -> Refusal {
    Refusal::new(ErrorCode::Unauthorized, message).because(reason)
}

impl Validator {
    /// Builds the validator from (validated) configuration.
    pub fn new(cfg: &JwtConfig, roles: Roles, tenant_claim: Option<String>) -> Self {
        Self {
            issuer: cfg.issuer.clone(),
            audiences: cfg.audiences.clone(),
            allowed: cfg.algorithms.iter().filter_map(|a| algorithm(a)).collect(),
            leeway: cfg.leeway_secs,
            max_lifetime: cfg.max_token_lifetime_secs,
            identity_claim: cfg.identity_claim.clone(),
            tenant_claim,
            tenant_required: false,
            roles,
            cache: Mutex::new(Cache { entries: HashMap::new(), max: cfg.token_cache_entries }),
        }
    }

    /// The same validator refusing tokens without a usable tenant claim when `required` (a
    /// tenant rate limit is configured and must not be escaped by leaving the claim out).
    pub fn requiring_tenant(mut self, required: bool) -> Self {
        self.tenant_required = required && self.tenant_claim.is_some();
        self
    }

    /// The algorithms tokens may be signed with.
    pub fn allowed(&self) -> &[Algorithm] {
        &self.allowed
    }

    /// The remembered result for `token`, if it was validated under key set `generation` and
    /// has not expired at `now` (unix seconds).
    pub fn cached(&self, digest: &[u8; 32], generation: u64, now: u64) -> Option<Valid> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match cache.entries.get(digest) {
            Some((v, g, until)) if *g == generation && now < *until => Some(v.clone()),
            Some(_) => {
                cache.entries.remove(digest);
                None
            }
            None => None,
        }
    }

    /// Remembers a validated token until `until` (unix seconds; at most its `exp`). A full
    /// cache first drops what expired, then everything.
    pub fn remember(&self, digest: [u8; 32], valid: Valid, generation: u64, until: u64, now: u64) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.entries.len() >= cache.max {
            cache.entries.retain(|_, (_, _, until)| now < *until);
            if cache.entries.len() >= cache.max {
                cache.entries.clear();
            }
        }
        cache.entries.insert(digest, (valid, generation, until));
    }

    /// Reads a token's header: its shape, algorithm and `kid`.
    pub fn header(&self, token: &str) -> Result<Header, Refusal> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(unauthorized(
                "malformed_token",
                format!("token is longer than {MAX_TOKEN_BYTES} bytes"),
            ));
        }
        let mut parts = token.split('.');
        let (Some(head), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(unauthorized(
                "malformed_token",
                "token is not a JWT (header.claims.signature)",
            ));
        };
        let fields: Map<String, Value> = URL_SAFE_NO_PAD
            .decode(head)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| unauthorized("malformed_token", "token header is not base64url JSON"))?;
        let Some(Value::String(alg)) = fields.get("alg") else {
            return Err(unauthorized("malformed_token", "token header has no alg"));
        };
        let alg = algorithm(alg).filter(|a| self.allowed.contains(a)).ok_or_else(|| {
            unauthorized(
                "algorithm_not_allowed",
                format!("tokens signed with {:?} are not accepted", excerpt(alg)),
            )
        })?;
        if fields.contains_key("crit") {
            return Err(unauthorized("malformed_token", "token header has critical extensions"));
        }
        let kid = match fields.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => {
                return Err(unauthorized("malformed_token", "token header kid is not a string"))
            }
        };
        Ok(Header { alg, kid })
    }

    /// Checks the signature and claims of `token` (whose header is `header`) with `key` at
    /// `now` (unix seconds), and works out the identity and its rules.
    pub fn verify(
        &self,
        token: &str,
        header: &Header,
        key: &Key,
        now: u64,
    ) -> Result<Valid, Refusal> {
        if !key.algorithms.contains(&header.alg) {
            return Err(unauthorized(
                "algorithm_not_allowed",
                "the token's algorithm does not match its key",
            ));
        }
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&self.audiences);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.leeway = self.leeway;
        v.validate_nbf = true;
        let claims = match jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &v) {
            Ok(data) => data.claims,
            // The library reports a required claim of the wrong type as missing: say which.
            Err(e) => match e.kind() {
                ErrorKind::MissingRequiredClaim(c)
                    if unverified_claims(token).is_some_and(|m| m.contains_key(c)) =>
                {
                    return Err(unauthorized(
                        "bad_claim_type",
                        format!("token claim {} has the wrong type", excerpt(c)),
                    ));
                }
                kind => return Err(refusal_of(kind)),
            },
        };
        let expires = time_claim(&claims, "exp")?.unwrap_or(0);
        let issued = time_claim(&claims, "iat")?;
        // The library checks nbf's value; its type is checked here like iat's.
        time_claim(&claims, "nbf")?;
        if issued.is_some_and(|iat| iat > now + self.leeway) {
            return Err(unauthorized("token_not_yet_valid", "token is issued in the future (iat)"));
        }
        let lifetime = expires.saturating_sub(issued.unwrap_or(now));
        if lifetime > self.max_lifetime {
            return Err(unauthorized(
                "lifetime_too_long",
                format!(
                    "token lives {lifetime} s, longer than the {} s accepted",
                    self.max_lifetime
                ),
            ));
        }
        let name = match claims.get(&self.identity_claim) {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_IDENTITY_BYTES => s.clone(),
            Some(Value::String(_)) | None => {
                return Err(unauthorized(
                    "missing_claim",
                    format!("token has no usable {} claim", self.identity_claim),
                ));
            }
            Some(_) => {
                return Err(unauthorized(
                    "bad_claim_type",
                    format!("token claim {} is not a string", self.identity_claim),
                ));
            }
        };
        let tenant = self.tenant(&claims)?;
        let grant = self.roles.grant(&claims);
        Ok(Valid {
            identity: Identity {
                name: Source::Jwt { issuer: &self.issuer, subject: &name }.name(),
                rules: Arc::new(grant.rules),
                expires: Some(expires + self.leeway),
                tenant,
            },
            expires,
        })
    }

    /// The tenant claim, when configured: a non-empty string of at most
    /// [`MAX_IDENTITY_BYTES`]; anything else is no tenant, or a refusal when one is required.
    fn tenant(&self, claims: &Map<String, Value>) -> Result<Option<Arc<str>>, Refusal> {
        let Some(claim) = &self.tenant_claim else { return Ok(None) };
        match claims.get(claim) {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_IDENTITY_BYTES => {
                Ok(Some(Arc::from(s.as_str())))
            }
            _ if !self.tenant_required => Ok(None),
            Some(Value::String(_)) | None => Err(unauthorized(
                "missing_claim",
                format!("token has no usable {claim} claim: the tenant rate limit needs it"),
            )),
            Some(_) => Err(unauthorized(
                "bad_claim_type",
                format!("token claim {claim} is not a string: the tenant rate limit needs it"),
            )),
        }
    }
}

/// The claims of a token whose signature did not verify, for a better refusal message only.
fn unverified_claims(token: &str) -> Option<Map<String, Value>> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

/// A numeric date claim (`exp`, `iat`, `nbf`): absent, or a non-negative integer number of
/// seconds. Any other type is a refusal.
fn time_claim(claims: &Map<String, Value>, name: &'static str) -> Result<Option<u64>, Refusal> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            match n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)) {
                Some(t) => Ok(Some(t)),
                None => Err(unauthorized(
                    "bad_claim_type",
                    format!("token claim {name} is not a valid time"),
                )),
            }
        }
        Some(_) => {
            Err(unauthorized("bad_claim_type", format!("token claim {name} is not a number")))
        }
    }
}

/// The refusal for a failed library check.
fn refusal_of(kind: &ErrorKind) -> Refusal {
    match kind {
        ErrorKind::ExpiredSignature => unauthorized("token_expired", "token has expired"),
        ErrorKind::ImmatureSignature => {
            unauthorized("token_not_yet_valid", "token is not valid yet (nbf)")
        }
        ErrorKind::InvalidIssuer => unauthorized("wrong_issuer", "token is from another issuer"),
        ErrorKind::InvalidAudience => {
            unauthorized("wrong_audience", "token is for another audience")
        }
        ErrorKind::MissingRequiredClaim(c) => {
            unauthorized("missing_claim", format!("token has no {} claim", excerpt(c)))
        }
        ErrorKind::InvalidClaimFormat(c) => {
            unauthorized("bad_claim_type", format!("token claim {} has the wrong type", excerpt(c)))
        }
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Provider(_) => {
            unauthorized("bad_signature", "token signature does not verify")
        }
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName => {
            unauthorized("algorithm_not_allowed", "token algorithm is not accepted")
        }
        _ => unauthorized("malformed_token", "token is not a well-formed JWT"),
    }
}

/// SHA-256 of a token: the key of the token cache and of the static tokens.
pub fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_tenant_claim_fails_closed_only_when_a_tenant_limit_needs_it() {
        let validator = |claim: Option<&str>, required| {
            Validator::new(&JwtConfig::default(), Roles::default(), claim.map(str::to_owned))
                .requiring_tenant(required)
        };
        let long = "t".repeat(MAX_IDENTITY_BYTES + 1);
        // (tenant claim configured, tenant limit configured, claims, tenant or refusal reason)
        let cases = [
            (Some("tenant"), true, json!({"tenant": "acme"}), Ok(Some("acme"))),
            (Some("tenant"), true, json!({}), Err("missing_claim")),
            (Some("tenant"), true, json!({"tenant": ""}), Err("missing_claim")),
            (Some("tenant"), true, json!({"tenant": long}), Err("missing_claim")),
            (Some("tenant"), true, json!({"tenant": 7}), Err("bad_claim_type")),
            (Some("tenant"), true, json!({"tenant": ["acme"]}), Err("bad_claim_type")),
            // Without a tenant limit a missing or odd tenant is only no tenant.
            (Some("tenant"), false, json!({}), Ok(None)),
            (Some("tenant"), false, json!({"tenant": 7}), Ok(None)),
            (Some("tenant"), false, json!({"tenant": "acme"}), Ok(Some("acme"))),
            (None, true, json!({"tenant": "acme"}), Ok(None)),
        ];
        for (claim, required, claims, expected) in cases {
            let Value::Object(claims) = claims else { unreachable!() };
            let got = validator(claim, required).tenant(&claims);
            let got = got.as_ref().map(|t| t.as_deref()).map_err(|r| r.reason);
            assert_eq!(got, expected, "{claim:?} {required} {claims:?}");
            if let Err(r) = validator(claim, required).tenant(&claims) {
                assert_eq!(r.code, ErrorCode::Unauthorized);
            }
        }
    }
}
