//! What authentication costs per request: a static token lookup, a JWT found in the cache of
//! validated tokens (what an edge function reusing its token pays), and a full JWT validation
//! (header, key lookup, signature, claims, roles) per signature algorithm (what a new token
//! pays once).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edgerelay::auth::config::{JwtConfig, RoleConfig, StaticToken};
use edgerelay::auth::jwks::{Keys, Lookup, Policy};
use edgerelay::auth::jwt::{self, Validator};
use edgerelay::auth::rbac::Roles;
use edgerelay::auth::static_tokens::StaticTokens;
use edgerelay_ops::dev_idp::{DevIdp, MintRequest};

const ALGS: [&str; 3] = ["ES256", "RS256", "EdDSA"];

fn authenticate(c: &mut Criterion) {
    let idp = DevIdp::new("https://idp.example.com", &ALGS).unwrap();
    let cfg = JwtConfig {
        issuer: idp.issuer().into(),
        audiences: vec!["edgerelay".into()],
        algorithms: ALGS.map(String::from).to_vec(),
        ..Default::default()
    };
    let roles = Roles::parse(&[RoleConfig {
        name: "tenant".into(),
        require: [("scope".to_string(), "edge:publish".to_string())].into(),
        allow: vec!["edge.{claims.tenant}.>".into()],
        deny: vec!["edge.{claims.tenant}.admin.>".into()],
    }])
    .unwrap();
    let validator = Validator::new(&cfg, roles, None);
    let policy = Policy {
        refresh: Duration::from_secs(300),
        cooldown: Duration::from_secs(10),
        max_stale: Duration::from_secs(3600),
        grace: Duration::from_secs(600),
    };
    let mut keys = Keys::new(policy, validator.allowed().to_vec());
    let jwks: Vec<_> = idp.jwks()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| serde_json::from_value(k.clone()).unwrap())
        .collect();
    let t0 = Instant::now();
    keys.update(&jwks, t0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({"sub": "edge-fn-1", "tenant": "acme", "scope": "edge:publish"});
    let mint = |alg: &str| {
        idp.mint(&MintRequest {
            claims: claims.as_object().cloned().unwrap(),
            alg: Some(alg.into()),
            ..Default::default()
        })
        .unwrap()
    };

    let mut group = c.benchmark_group("authenticate");
    group.throughput(Throughput::Elements(1));
    let statics = StaticTokens::new(&[StaticToken {
        name: "edge".into(),
        token: "static-token-0123456789".into(),
        allow: vec!["edge.>".into()],
        deny: vec![],
    }]);
    group.bench_function("static", |b| {
        b.iter(|| statics.identify("static-token-0123456789").unwrap())
    });
    let token = mint("ES256");
    let full = |token: &str| {
        let header = validator.header(token).unwrap();
        let Lookup::Found(key, _) = keys.lookup(header.kid.as_deref(), t0) else { panic!() };
        validator.verify(token, &header, &key, now).unwrap()
    };
    validator.remember(jwt::digest(&token), full(&token), keys.generation(), now + 600, now);
    group.bench_function("jwt_cached", |b| {
        b.iter(|| validator.cached(&jwt::digest(&token), keys.generation(), now).unwrap())
    });
    for alg in ALGS {
        let token = mint(alg);
        group.bench_with_input(BenchmarkId::new("jwt_validate", alg), &token, |b, t| {
            b.iter(|| full(t))
        });
    }
    group.finish();
}

criterion_group!(benches, authenticate);
criterion_main!(benches);
