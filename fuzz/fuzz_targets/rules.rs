//! Token claims (JSON from the network) → roles with claim templating → publish rules. Must
//! never panic, and a claim can never widen what a tenant may publish on: whatever the claims
//! say, a token may only publish on `edge.<one token>.…`, never on `edge.admin.…` or outside
//! `edge.`.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use edgerelay::auth::rbac::Roles;
use edgerelay::auth::config::RoleConfig;
use libfuzzer_sys::fuzz_target;

fn roles() -> &'static Roles {
    static ROLES: OnceLock<Roles> = OnceLock::new();
    ROLES.get_or_init(|| {
        Roles::parse(&[RoleConfig {
            name: "tenant".into(),
            require: BTreeMap::from([("scope".to_string(), "edge:publish".to_string())]),
            allow: vec!["edge.{claims.tenant}.>".into(), "edge.{claims.org.id}.{claims.app}".into()],
            deny: vec!["edge.admin.>".into(), "edge.{claims.tenant}.secret.>".into()],
        }])
        .expect("the roles parse")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(serde_json::Value::Object(claims)) = serde_json::from_slice(data) else { return };
    let grant = roles().grant(&claims);
    for subject in ["edge.admin.x", "other.x", "edge", "edge.a.secret.b"] {
        if subject == "edge.a.secret.b" && claims.get("tenant").and_then(|t| t.as_str()) != Some("a") {
            continue;
        }
        assert!(!grant.rules.permits(subject), "{subject} allowed by {claims:?}");
    }
});
