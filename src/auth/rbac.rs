//! Roles: which token claims grant which publish subjects (sans-IO).
//!
//! A role applies to a token when every claim it `require`s holds; its `allow` and `deny`
//! patterns may name claims (`edge.{claims.tenant}.>`), filled in from the token. A token's
//! rules are the allow and deny patterns of every role that applies to it: deny wins, and
//! nothing is allowed that no pattern allows.
//!
//! A claim filled into a subject must be one subject token ([`super::template`]). When it is
//! not, the allow pattern is dropped, and a deny pattern denies everything: a broken claim can
//! only take rights away.

use serde_json::{Map, Value};

use super::config::RoleConfig;
use super::rules::Rules;
use super::template::{lookup, RoleError, Template};
use crate::subject::Pattern;

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
    use serde_json::json;

    use super::*;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn tenant_roles() -> Roles {
        Roles::parse(&[
            RoleConfig::new(
                "tenant",
                &[("scope", "edge:publish")],
                &["edge.{claims.tenant}.>"],
                &["edge.{claims.tenant}.admin.>"],
            ),
            RoleConfig::new("ops", &[("groups", "sre")], &["ops.>"], &[]),
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
            RoleConfig::new("wide", &[], &["edge.>"], &[]),
            RoleConfig::new("fence", &[], &[], &["edge.{claims.region}.>"]),
        ])
        .unwrap();
        assert!(roles.grant(&claims(json!({"region": "eu"}))).rules.permits("edge.us.x"));
        assert!(!roles.grant(&claims(json!({}))).rules.permits("edge.us.x"));
    }

    #[test]
    fn nested_claims_and_partial_tokens() {
        let roles = Roles::parse(&[RoleConfig::new(
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
}
