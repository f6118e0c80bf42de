//! What deciding whether an event may be published costs, per event: validating its subject,
//! matching it against one wildcard pattern, and an identity's publish rules (RBAC) — the
//! rules of a token granted by a handful of roles with templated patterns — allowing it,
//! finding no rule that allows it, and denying it although a rule allows it (deny wins).
//! `rbac_grant` is the once-per-token cost of turning claims into those rules.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgerelay::auth::config::RoleConfig;
use edgerelay::auth::rbac::Roles;
use edgerelay::subject::{self, Pattern};

const MAX_SUBJECT_BYTES: usize = 256;

fn subject_validate(c: &mut Criterion) {
    let mut group = c.benchmark_group("subject_validate");
    group.throughput(Throughput::Elements(1));
    let cases = [
        ("3_tokens", "edge.acme.click"),
        ("6_tokens", "edge.tenant-0042.web.checkout.payment_ok.v2"),
        ("bad_char", "edge.acme.cl!ck"),
    ];
    for (name, s) in cases {
        group.bench_with_input(BenchmarkId::from_parameter(name), s, |b, s| {
            b.iter(|| subject::validate(s, MAX_SUBJECT_BYTES))
        });
    }
    group.finish();
}

fn pattern_match(c: &mut Criterion) {
    let mut group = c.benchmark_group("pattern_match");
    group.throughput(Throughput::Elements(1));
    let subject = "edge.acme.web.click";
    let cases = [
        ("literal", "edge.acme.web.click"),
        ("tail_wildcard", "edge.acme.>"),
        ("token_wildcard", "edge.*.web.click"),
        ("miss", "edge.other.>"),
    ];
    for (name, p) in cases {
        let pattern = Pattern::parse(p).unwrap();
        assert_eq!(pattern.matches(subject), name != "miss");
        group.bench_with_input(BenchmarkId::from_parameter(name), &pattern, |b, p| {
            b.iter(|| p.matches(subject))
        });
    }
    group.finish();
}

/// Four roles as a multi-tenant deployment writes them; the token below gets three of them.
fn roles() -> Roles {
    Roles::parse(&[
        RoleConfig::new(
            "tenant",
            &[("scope", "edge:publish")],
            &["edge.{claims.tenant}.>"],
            &["edge.{claims.tenant}.admin.>"],
        ),
        RoleConfig::new(
            "region",
            &[("scope", "edge:publish")],
            &["region.{claims.region}.{claims.tenant}.*"],
            &[],
        ),
        RoleConfig::new(
            "org",
            &[("org.plan", "enterprise")],
            &["org.{claims.org.id}.>"],
            &["org.*.billing"],
        ),
        RoleConfig::new("ops", &[("groups", "sre")], &["ops.>"], &[]),
    ])
    .unwrap()
}

fn rbac(c: &mut Criterion) {
    let roles = roles();
    let claims = serde_json::json!({
        "sub": "edge-fn-1",
        "tenant": "acme",
        "region": "eu-west",
        "scope": "openid edge:publish",
        "org": {"id": "org-7", "plan": "enterprise"},
        "groups": ["dev"],
    });
    let claims = claims.as_object().cloned().unwrap_or_default();

    let mut group = c.benchmark_group("rbac_grant");
    group.throughput(Throughput::Elements(1));
    group.bench_function("4_roles", |b| b.iter(|| roles.grant(&claims)));
    group.finish();

    let grant = roles.grant(&claims);
    assert_eq!(grant.roles, ["tenant", "region", "org"]);
    let rules = grant.rules;
    let mut group = c.benchmark_group("rbac_permits");
    group.throughput(Throughput::Elements(1));
    let cases = [
        // The third allow pattern matches; no deny does.
        ("allowed", "org.org-7.web.click", true),
        // Every pattern is tried, none matches.
        ("no_rule", "ops.deploy", false),
        // The first allow pattern matches, and so does a deny.
        ("deny_wins", "edge.acme.admin.reset", false),
    ];
    for (name, subject, want) in cases {
        assert_eq!(rules.permits(subject), want, "{name}");
        group.bench_with_input(BenchmarkId::from_parameter(name), subject, |b, s| {
            b.iter(|| rules.permits(s))
        });
    }
    group.finish();
}

criterion_group!(benches, subject_validate, pattern_match, rbac);
criterion_main!(benches);
