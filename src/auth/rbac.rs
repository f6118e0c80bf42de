//! Roles: which token claims grant which publish subjects (sans-IO).
//!
//! A role applies to a token when every claim it `require`s holds; its `allow` and `deny`
//! patterns may name claims (`edge.{claims.tenant}.>`), filled in from the token. A token's
//! rules are the allow and deny patterns of every role that applies to it: deny wins, and
//! nothing is allowed that no pattern allows.
//!
//! A claim filled into a subject must be one subject token (`[A-Za-z0-9_-]`, at most
//! [`MAX_CLAIM_TOKEN_BYTES`] bytes), so a claim can never smuggle in a `.`, `*` or `>`. When it
//! is not, the allow pattern is dropped, and a deny pattern denies everything: a broken claim
//! can only take rights away.

use serde_json::{Map, Value};

use super::rules::Rules;
use crate::config::RoleConfig;
use crate::subject::{Pattern, SubjectError};

/// Longest claim value filled into a subject pattern.
pub const MAX_CLAIM_TOKEN_BYTES: usize = 64;

/// The configured roles.
#[derive(Clone, Debug, Default)]
pub struct Roles {
    roles: Vec<Role>,
}

#[derive(Clone, Debug)]
struct Role {
    name: String,
    require: Vec<(Vec<String>, String)>,
    allow: Vec<Template>,
    deny: Vec<Template>,
}

/// A subject pattern with `{claims.<path>}` placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// A claim, by its path (`org.id` → `{"org": {"id": …}}`).
    Claim(Vec<String>),
}

/// A role or template that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("unclosed or empty placeholder in {0:?}")]
    Placeholder(String),
    #[error("placeholder {0:?} must be {{claims.<name>}}")]
    NotAClaim(String),
    #[error("pattern {pattern:?} is not a valid subject pattern: {error}")]
    Pattern { pattern: String, error: SubjectError },
}

/// What a token's claims grant.
#[derive(Clone, Debug)]
pub struct Grant {
    pub rules: Rules,
    /// Names of the roles that applied.
    pub roles: Vec<String>,
}

impl Roles {
    pub fn parse(roles: &[RoleConfig]) -> Result<Self, RoleError> {
        let roles = roles
            .iter()
            .map(|r| {
                let templates = |v: &[String]| {
                    v.iter().map(|p| Template::parse(p)).collect::<Result<Vec<_>, _>>()
                };
                Ok(Role {
                    name: r.name.clone(),
                    require: r
                        .require
                        .iter()
                        .map(|(k, v)| (k.split('.').map(str::to_owned).collect(), v.clone()))
                        .collect(),
                    allow: templates(&r.allow)?,
                    deny: templates(&r.deny)?,
                })
            })
            .collect::<Result<_, RoleError>>()?;
        Ok(Self { roles })
    }

    /// The rules a token with these claims gets.
    pub fn grant(&self, claims: &Map<String, Value>) -> Grant {
        let mut allow = Vec::new();
        let mut deny = Vec::new();
        let mut roles = Vec::new();
        for role in &self.roles {
            if !role.require.iter().all(|(path, want)| holds(lookup(claims, path), want)) {
                continue;
            }
            roles.push(role.name.clone());
            allow.extend(role.allow.iter().filter_map(|t| t.fill(claims)));
            for t in &role.deny {
                // A deny that cannot be filled in denies everything.
                deny.push(t.fill(claims).unwrap_or_else(Pattern::everything));
            }
        }
        Grant { rules: Rules::new(allow, deny), roles }
    }
}

impl Template {
    pub fn parse(s: &str) -> Result<Self, RoleError> {
        let mut pieces = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or_else(|| RoleError::Placeholder(s.to_owned()))?;
            let inner = &after[..close];
            let path = inner
                .strip_prefix("claims.")
                .ok_or_else(|| RoleError::NotAClaim(inner.to_owned()))?;
            let path: Vec<String> = path.split('.').map(str::to_owned).collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(RoleError::Placeholder(s.to_owned()));
            }
            pieces.push(Piece::Claim(path));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(RoleError::Placeholder(s.to_owned()));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        let template = Self { pieces };
        // Filled with a valid token everywhere, it must be a valid pattern.
        let sample = template.render(|_| Some("x")).unwrap_or_default();
        Pattern::parse(&sample)
            .map_err(|error| RoleError::Pattern { pattern: s.to_owned(), error })?;
        Ok(template)
    }

    /// The pattern with the token's claims filled in; `None` when a claim is missing or not
    /// a single subject token.
    pub fn fill(&self, claims: &Map<String, Value>) -> Option<Pattern> {
        let rendered = self.render(|path| lookup(claims, path).and_then(as_subject_token))?;
        Pattern::parse(&rendered).ok()
    }

    fn render<'a>(&self, mut claim: impl FnMut(&[String]) -> Option<&'a str>) -> Option<String> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Claim(path) => out.push_str(claim(path)?),
            }
        }
        Some(out)
    }
}

/// The claim at `path`.
fn lookup<'a>(claims: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    rest.iter().try_fold(claims.get(first)?, |v, p| v.as_object()?.get(p))
}

/// A claim value usable inside a subject: a string of one subject token.
fn as_subject_token(v: &Value) -> Option<&str> {
    let s = v.as_str()?;
    let ok = !s.is_empty()
        && s.len() <= MAX_CLAIM_TOKEN_BYTES
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then_some(s)
}

/// Whether a claim holds `want`: a string equal to it or listing it among space-separated
/// words (as OAuth's `scope` does), or an array holding it.
fn holds(claim: Option<&Value>, want: &str) -> bool {
    match claim {
        Some(Value::String(s)) => s == want || s.split(' ').any(|w| w == want),
        Some(Value::Array(items)) => items.iter().any(|i| i.as_str() == Some(want)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    fn role(name: &str, require: &[(&str, &str)], allow: &[&str], deny: &[&str]) -> RoleConfig {
        RoleConfig {
            name: name.into(),
            require: require
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn tenant_roles() -> Roles {
        Roles::parse(&[
            role(
                "tenant",
                &[("scope", "edge:publish")],
                &["edge.{claims.tenant}.>"],
                &["edge.{claims.tenant}.admin.>"],
            ),
            role("ops", &[("groups", "sre")], &["ops.>"], &[]),
        ])
        .unwrap()
    }

    #[test]
    fn claims_fill_the_tenants_subjects() {
        let g = tenant_roles()
            .grant(&claims(json!({"scope": "openid edge:publish", "tenant": "acme"})));
        assert_eq!(g.roles, ["tenant"]);
        assert!(g.rules.permits("edge.acme.click"));
        assert!(!g.rules.permits("edge.other.click"), "tenant A may not publish as tenant B");
        assert!(!g.rules.permits("edge.acme.admin.x"), "deny wins");
        assert!(!g.rules.permits("ops.x"));
    }

    #[test]
    fn roles_apply_only_when_every_required_claim_holds() {
        let roles = tenant_roles();
        let none = roles.grant(&claims(json!({"tenant": "acme"})));
        assert!(none.roles.is_empty() && !none.rules.permits("edge.acme.click"));
        let ops = roles.grant(&claims(json!({"groups": ["dev", "sre"]})));
        assert_eq!(ops.roles, ["ops"]);
        assert!(ops.rules.permits("ops.deploy"));
        // Not a substring match, and a number is not a string.
        assert!(roles.grant(&claims(json!({"groups": "sre-team"}))).roles.is_empty());
        assert!(roles.grant(&claims(json!({"scope": 1, "tenant": "acme"}))).roles.is_empty());
    }

    #[test]
    fn a_claim_cannot_smuggle_wildcards_or_tokens_into_a_subject() {
        let roles = tenant_roles();
        for tenant in [
            json!(">"),
            json!("*"),
            json!("a.b"),
            json!(""),
            json!("ü"),
            json!(7),
            json!(["a"]),
            json!("x".repeat(65)),
        ] {
            let g = roles.grant(&claims(json!({"scope": "edge:publish", "tenant": tenant})));
            assert_eq!(g.roles, ["tenant"]);
            for subject in ["edge.a.click", "edge.b.c", "edge.x.admin.y"] {
                assert!(!g.rules.permits(subject), "{tenant} → {subject}");
            }
        }
    }

    #[test]
    fn an_unfillable_deny_denies_everything() {
        let roles = Roles::parse(&[
            role("wide", &[], &["edge.>"], &[]),
            role("fence", &[], &[], &["edge.{claims.region}.>"]),
        ])
        .unwrap();
        assert!(roles.grant(&claims(json!({"region": "eu"}))).rules.permits("edge.us.x"));
        assert!(!roles.grant(&claims(json!({}))).rules.permits("edge.us.x"));
    }

    #[test]
    fn nested_claims_and_partial_tokens() {
        let roles = Roles::parse(&[role(
            "org",
            &[("org.tier", "gold")],
            &["edge.t-{claims.org.id}.*"],
            &[],
        )])
        .unwrap();
        let g = roles.grant(&claims(json!({"org": {"id": "42", "tier": "gold"}})));
        assert!(g.rules.permits("edge.t-42.click"));
        assert!(!g.rules.permits("edge.t-43.click"));
    }

    #[test]
    fn bad_templates_are_refused_at_load() {
        for bad in [
            "edge.{claims.tenant",
            "edge.{tenant}.>",
            "edge.{claims.}.x",
            "edge.}.x",
            "edge..{claims.t}",
            "edge.{claims.t}x>",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
        assert!(Template::parse("edge.{claims.t}.>").is_ok());
    }
}
