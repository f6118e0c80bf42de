//! The `[auth]` section: who may publish where — static tokens, JWTs and their roles, client
//! certificates, rate limits — with its defaults and [`AuthConfig::problems`].
//!
//! The checks of values that the stage itself parses live here too ([`check_url`],
//! [`algorithm`], role templates through [`super::template`]), so that this module needs
//! nothing from the stage it configures.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};

use super::template::Template;
use crate::section::Problems;
use crate::subject::Pattern;

/// Who may publish where.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Static bearer tokens, for development and tests; production uses `auth.jwt`.
    pub static_tokens: Vec<StaticToken>,
    /// OIDC / JWT bearer tokens from the company's identity provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
    /// What JWT claims grant: each role that applies to a token adds its patterns.
    pub roles: Vec<RoleConfig>,
    /// Events per second per identity (and per tenant); off by default.
    pub rate_limit: RateLimitConfig,
    /// Client certificates as identities (edge collectors), on HTTPS, HTTP/3 and QUIC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsConfig>,
}

/// Mutual TLS: a client certificate that chains to `ca_file` and carries one of the
/// configured DNS names is that identity; a request with a bearer token uses the token.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MtlsConfig {
    /// PEM CA certificate(s) that client certificates must chain to.
    pub ca_file: PathBuf,
    /// Which certificate is which identity.
    pub identities: Vec<CertIdentity>,
}

/// One client-certificate identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CertIdentity {
    /// Identity name; recorded as `publisher` as `mtls:<name>`.
    pub name: String,
    /// A DNS subject alternative name the certificate must carry.
    pub dns_name: String,
    /// Subject patterns this identity may publish on.
    pub allow: Vec<String>,
    /// Subject patterns refused even when allowed; deny wins.
    pub deny: Vec<String>,
}

/// Token buckets of events. Over the limit a request is refused as a whole with 429
/// `rate_limited` and a `Retry-After` of when it would pass; a request of more events than the
/// burst is refused with no `Retry-After` (it never would).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Events a second each identity (static token name or the JWT identity claim) may
    /// publish; 0 = no limit.
    pub events_per_sec: u64,
    /// Events an identity may publish at once beyond the rate; 0 = one second's worth.
    pub burst: u64,
    /// A JWT claim naming the tenant (e.g. `tenant`): with `tenant_events_per_sec`, all the
    /// identities of one tenant share one more bucket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_claim: Option<String>,
    /// Events a second per tenant; 0 = no tenant limit. When set, a token without a usable
    /// `tenant_claim` is refused (401), so the tenant bucket cannot be escaped.
    pub tenant_events_per_sec: u64,
    /// Tenant burst; 0 = one second's worth.
    pub tenant_burst: u64,
    /// Identities (and tenants) tracked at once; beyond it refilled buckets are forgotten.
    pub max_tracked: usize,
}

/// Validation of JWT bearer tokens against the identity provider's published keys (JWKS).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// The expected `iss` claim, exactly. With `discovery`, also where
    /// `/.well-known/openid-configuration` is fetched from.
    pub issuer: String,
    /// Accepted `aud` values: a token must name at least one.
    pub audiences: Vec<String>,
    /// Where the keys come from — exactly one of `jwks_url`, `discovery` or `jwks_file`.
    /// `https://` (or `http://` on a loopback address, for the dev IdP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Find the JWKS through the issuer's OIDC discovery document.
    pub discovery: bool,
    /// A local JWKS file, read again at every refresh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// PEM CA certificates to trust for the identity provider's TLS, besides the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Signature algorithms accepted: any of RS256, RS384, RS512, PS256, PS384, PS512, ES256,
    /// ES384, EdDSA. `none` and HMAC (HS*) cannot be configured.
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, seconds.
    pub leeway_secs: u64,
    /// Longest token lifetime accepted (`exp - iat`, or `exp - now` without `iat`), seconds:
    /// a leaked long-lived token is useless.
    pub max_token_lifetime_secs: u64,
    /// The claim naming the publisher (recorded on every event and in the audit stream).
    pub identity_claim: String,
    /// How often the key set is fetched again, seconds.
    pub refresh_secs: u64,
    /// Fewest seconds between two fetches, and how long a `kid` found missing stays missing:
    /// a flood of tokens with random `kid`s costs at most one fetch per cooldown.
    pub fetch_cooldown_secs: u64,
    /// One fetch's timeout, milliseconds.
    pub fetch_timeout_ms: u64,
    /// How long the last good key set keeps serving while the IdP is unreachable, seconds;
    /// beyond it every token is refused (503 `auth_unavailable`).
    pub max_stale_secs: u64,
    /// How long a key that left the key set (rotated out) still verifies tokens, seconds.
    pub key_grace_secs: u64,
    /// Validated tokens remembered (by SHA-256), so a reused token costs no signature check;
    /// never past the token's `exp`.
    pub token_cache_entries: usize,
}

/// One role: which claims it requires, and the subjects it grants.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoleConfig {
    /// Name, for logs and audit records.
    pub name: String,
    /// Claims the token must carry for the role to apply, `claim = "value"`: a string claim
    /// equal to the value or listing it among space-separated words (`scope`), or an array
    /// claim holding it. Nested claims by path (`"org.tier"`). Empty: applies to every token.
    pub require: BTreeMap<String, String>,
    /// Subject patterns granted; `{claims.<name>}` is filled in from the token (a claim that
    /// is not one subject token drops the pattern).
    pub allow: Vec<String>,
    /// Subject patterns refused even when allowed; deny wins. A placeholder that cannot be
    /// filled in denies everything.
    pub deny: Vec<String>,
}

/// One static bearer token and what its holder may publish.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaticToken {
    /// Identity name recorded as `publisher` on every event and in logs.
    pub name: String,
    /// The secret bearer token (at least 16 characters).
    pub token: String,
    /// Subject patterns this identity may publish on (NATS wildcards).
    pub allow: Vec<String>,
    /// Subject patterns refused even when `allow` matches; deny wins.
    pub deny: Vec<String>,
}

impl AuthConfig {
    /// Everything wrong with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Problems::default();
        for (i, t) in self.static_tokens.iter().enumerate() {
            let at = format!("auth.static_tokens[{i}] ({:?})", t.name);
            identity_problems(&mut p, &at, &t.name, &t.allow, &t.deny);
            p.bad(t.token.len() < 16, format!("{at}: token must be at least 16 characters"));
        }
        let tokens = &self.static_tokens;
        for (i, t) in tokens.iter().enumerate() {
            p.bad(
                tokens[..i].iter().any(|o| o.token == t.token),
                format!("auth.static_tokens[{i}]: token is used twice"),
            );
        }
        if let Some(jwt) = &self.jwt {
            p.nested("auth.jwt: ", jwt.problems());
        }
        for (i, role) in self.roles.iter().enumerate() {
            let at = format!("auth.roles[{i}] ({:?})", role.name);
            p.bad(role.name.is_empty(), format!("{at}: name is required"));
            p.bad(
                role.allow.is_empty() && role.deny.is_empty(),
                format!("{at}: allow or deny must list at least one pattern"),
            );
            let templates = role.allow.iter().chain(&role.deny);
            if let Some(e) = templates.map(|t| Template::parse(t)).find_map(Result::err) {
                p.bad(true, format!("{at}: {e}"));
            }
        }
        let rl = &self.rate_limit;
        p.bad(rl.max_tracked == 0, "auth.rate_limit.max_tracked must be > 0");
        p.bad(
            rl.tenant_events_per_sec > 0 && rl.tenant_claim.is_none(),
            "auth.rate_limit.tenant_events_per_sec needs tenant_claim",
        );
        p.bad(
            rl.tenant_claim.is_some() && self.jwt.is_none(),
            "auth.rate_limit.tenant_claim is a JWT claim: configure auth.jwt",
        );
        p.bad(
            !self.roles.is_empty() && self.jwt.is_none(),
            "auth.roles apply to JWT claims: configure auth.jwt",
        );
        if let Some(m) = &self.mtls {
            p.bad(
                !m.ca_file.is_file(),
                format!("auth.mtls.ca_file: {} is not a readable file", m.ca_file.display()),
            );
            p.bad(m.identities.is_empty(), "auth.mtls.identities must list at least one identity");
            for (i, c) in m.identities.iter().enumerate() {
                let at = format!("auth.mtls.identities[{i}] ({:?})", c.name);
                identity_problems(&mut p, &at, &c.name, &c.allow, &c.deny);
                p.bad(
                    rustls::pki_types::DnsName::try_from(c.dns_name.as_str()).is_err(),
                    format!("{at}: dns_name {:?} is not a DNS name", c.dns_name),
                );
            }
        }
        p.bad(
            self.static_tokens.is_empty() && self.jwt.is_none() && self.mtls.is_none(),
            "auth: no identity configured (auth.static_tokens, auth.jwt or auth.mtls): nothing \
             could publish",
        );
        p.into_vec()
    }
}

impl JwtConfig {
    /// Everything wrong with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Problems::default();
        p.bad(self.issuer.is_empty(), "issuer is required");
        p.bad(self.audiences.is_empty(), "audiences must list at least one audience");
        let sources = [self.jwks_url.is_some(), self.discovery, self.jwks_file.is_some()];
        p.bad(
            sources.iter().filter(|s| **s).count() != 1,
            "exactly one of jwks_url, discovery or jwks_file is required",
        );
        if let Some(url) = &self.jwks_url {
            p.refused(check_url(url), |e| format!("jwks_url: {e}"));
        }
        if self.discovery {
            p.refused(check_url(&self.issuer), |e| format!("issuer (for discovery): {e}"));
        }
        p.bad(self.algorithms.is_empty(), "algorithms must list at least one algorithm");
        for a in &self.algorithms {
            p.bad(
                algorithm(a).is_none(),
                format!(
                    "algorithm {a:?} is not accepted (one of RS256, RS384, RS512, PS256, PS384, \
                     PS512, ES256, ES384, EdDSA; never none or HMAC)"
                ),
            );
        }
        p.bad(self.identity_claim.is_empty(), "identity_claim is required");
        p.bad(self.max_token_lifetime_secs == 0, "max_token_lifetime_secs must be > 0");
        p.bad(self.refresh_secs == 0, "refresh_secs must be > 0");
        p.bad(self.fetch_timeout_ms == 0, "fetch_timeout_ms must be > 0");
        p.bad(self.max_stale_secs < self.refresh_secs, "max_stale_secs must be >= refresh_secs");
        p.bad(self.token_cache_entries == 0, "token_cache_entries must be > 0");
        p.into_vec()
    }
}

impl RoleConfig {
    /// A role from borrowed parts: `require` as `(claim, value)` pairs.
    pub fn new(name: &str, require: &[(&str, &str)], allow: &[&str], deny: &[&str]) -> Self {
        Self {
            name: name.into(),
            require: require.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            events_per_sec: 0,
            burst: 0,
            tenant_claim: None,
            tenant_events_per_sec: 0,
            tenant_burst: 0,
            max_tracked: 100_000,
        }
    }
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audiences: Vec::new(),
            jwks_url: None,
            discovery: false,
            jwks_file: None,
            ca_file: None,
            algorithms: ["RS256", "PS256", "ES256", "EdDSA"].map(String::from).to_vec(),
            leeway_secs: 30,
            max_token_lifetime_secs: 3_600,
            identity_claim: "sub".into(),
            refresh_secs: 300,
            fetch_cooldown_secs: 10,
            fetch_timeout_ms: 5_000,
            max_stale_secs: 86_400,
            key_grace_secs: 600,
            token_cache_entries: 10_000,
        }
    }
}

/// Checks that a provider URL is `https://`, or `http://` on a loopback address (the dev IdP).
pub fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => {
            let host = parsed.host_str().unwrap_or_default();
            let ip = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>();
            if host == "localhost" || ip.is_ok_and(|ip| ip.is_loopback()) {
                Ok(())
            } else {
                Err(format!("{url:?}: plain http is only allowed on loopback; use https"))
            }
        }
        other => Err(format!("{url:?}: scheme {other:?} is not http(s)")),
    }
}

/// The algorithm a configured or header name stands for, if it is an allowed kind: asymmetric
/// signatures only. `none` and `HS*` are not in the list, so they cannot be configured.
pub fn algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// What a static token and a certificate identity both need: a name, and subject patterns
/// that parse, at least one of them allowing something.
fn identity_problems(p: &mut Problems, at: &str, name: &str, allow: &[String], deny: &[String]) {
    p.bad(name.is_empty(), format!("{at}: name is required"));
    p.bad(allow.is_empty(), format!("{at}: allow must list at least one pattern"));
    for pattern in allow.iter().chain(deny) {
        p.refused(Pattern::parse(pattern), |e| format!("{at}: pattern {pattern:?}: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::section::{assert_reported, problems_in};

    #[test]
    fn jwt_settings_are_checked() {
        let all = problems_in(
            r#"
            [jwt]
            issuer = "http://idp.example.com"
            discovery = true
            jwks_file = "/etc/keys.json"
            algorithms = ["RS256", "HS256", "none"]
            max_stale_secs = 10
            [[roles]]
            name = "r"
            allow = ["edge.{tenant}.>"]
            "#,
            AuthConfig::problems,
        );
        assert_reported(
            &all,
            &[
                "audiences must list",
                "exactly one of jwks_url, discovery or jwks_file",
                "plain http is only allowed on loopback",
                "algorithm \"HS256\" is not accepted",
                "algorithm \"none\" is not accepted",
                "max_stale_secs must be >= refresh_secs",
                "auth.roles[0] (\"r\"): placeholder \"tenant\" must be {claims.<name>}",
            ],
        );
        let ok = problems_in(
            r#"
            [jwt]
            issuer = "https://idp.example.com"
            audiences = ["edgerelay"]
            discovery = true
            [[roles]]
            name = "r"
            require = { scope = "edge:publish" }
            allow = ["edge.{claims.tenant}.>"]
            "#,
            AuthConfig::problems,
        );
        assert_eq!(ok, "");
    }

    #[test]
    fn mtls_settings_are_checked() {
        let all = problems_in(
            r#"
            [mtls]
            ca_file = "/nonexistent/ca.pem"
            [[mtls.identities]]
            name = ""
            dns_name = "not a name"
            allow = ["edge.>.x"]
            "#,
            AuthConfig::problems,
        );
        assert_reported(
            &all,
            &[
                "auth.mtls.ca_file: /nonexistent/ca.pem is not a readable file",
                "name is required",
                "dns_name \"not a name\" is not a DNS name",
                "pattern \"edge.>.x\"",
            ],
        );
        assert!(!all.contains("no identity configured"), "mTLS alone is an identity source");
    }

    #[test]
    fn static_tokens_are_checked() {
        let tokens = r#"static_tokens = [
            { name = "t", token = "short", allow = ["a.*"] },
            { token = "short", allow = ["a.>.b"] },
        ]"#;
        let all = problems_in(tokens, AuthConfig::problems);
        assert_reported(
            &all,
            &[
                "auth.static_tokens[0] (\"t\"): token must be at least 16 characters",
                "auth.static_tokens[1] (\"\"): name is required",
                "auth.static_tokens[1] (\"\"): pattern \"a.>.b\"",
                "auth.static_tokens[1]: token is used twice",
            ],
        );
        assert!(problems_in("", AuthConfig::problems).contains("auth: no identity configured"));
    }
}
