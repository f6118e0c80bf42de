//! The identity provider's signing keys, cached by `kid` (sans-IO: every decision takes the
//! time as an argument; fetching is [`super::idp`]'s job).
//!
//! - A key set is refreshed every `refresh`, and at once when a token names a `kid` the set
//!   does not hold — but never more often than once per `cooldown`, and a `kid` found missing
//!   is remembered as missing for a `cooldown` (the negative cache), so a flood of tokens with
//!   random `kid`s costs at most one fetch per cooldown.
//! - When the provider is unreachable the last good set keeps serving, up to `max_stale`
//!   after its fetch; beyond that tokens are refused until a fetch succeeds.
//! - A key that disappears from the set (rotated out) still verifies tokens for `grace`, so
//!   tokens signed just before a rotation live out their short lifetime.
//! - `kid` is only ever a map key, and bounded in length.
//! - Only asymmetric signing keys are taken: a symmetric (`oct`) key in the set is ignored, so
//!   an HMAC token can never be verified with a public key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Longest `kid` looked up; longer ones are refused without a lookup.
pub const MAX_KID_BYTES: usize = 256;
/// Most `kid`s remembered as missing; the negative cache is cleared when it is full.
const MAX_UNKNOWN_KIDS: usize = 4096;

/// How keys are refreshed and how long they are trusted.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub refresh: Duration,
    pub cooldown: Duration,
    pub max_stale: Duration,
    pub grace: Duration,
}

/// One verification key.
pub struct Key {
    pub kid: String,
    pub decoding: DecodingKey,
    /// The algorithms this key may verify: the JWK's `alg` when it names one, else every
    /// allowed algorithm of the key's type.
    pub algorithms: Vec<Algorithm>,
    /// The public key's parameters as published, to tell an unchanged key from a new one
    /// under the same `kid`.
    material: AlgorithmParameters,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("kid", &self.kid).field("algorithms", &self.algorithms).finish()
    }
}

/// What [`Keys::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    /// The key, and for a rotated-out key the end of its grace.
    Found(Arc<Key>, Option<Instant>),
    /// Not known (yet): fetch the set, then look again.
    Fetch,
    /// Refused, with the reason.
    Refused(Missing),
}

/// Why no key can verify a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// No key with this `kid`, and the set was fetched recently.
    UnknownKid,
    /// The token names no `kid` and the set holds more than one key.
    NoKid,
    /// The `kid` is too long to be one.
    BadKid,
    /// The key was rotated out longer ago than the grace period.
    Retired,
    /// No key set yet, or the last one is older than `max_stale`.
    NoKeys,
}

/// What changed with a new key set. A refresh that finds the same keys changes nothing.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Keys not in the set before (new, or back from retirement).
    pub added: usize,
    /// Keys no longer in the set (usable for the grace period).
    pub retired: usize,
    /// Keys published under a `kid` the set held with other parameters: the old key stops
    /// verifying at once.
    pub replaced: usize,
    /// Keys in the document that are not usable signing keys (symmetric, encryption-only,
    /// unsupported type or algorithm).
    pub skipped: usize,
}

/// The cached key set.
#[derive(Debug)]
pub struct Keys {
    policy: Policy,
    allowed: Vec<Algorithm>,
    current: HashMap<String, Arc<Key>>,
    /// Keys rotated out, with when they disappeared.
    retired: HashMap<String, (Arc<Key>, Instant)>,
    /// `kid`s found missing, with when.
    unknown: HashMap<String, Instant>,
    fetched: Option<Instant>,
    attempted: Option<Instant>,
    /// Bumped whenever the usable keys change, so cached tokens are checked again.
    generation: u64,
}

impl Changes {
    /// Whether the usable keys changed (a skipped key changes nothing: it never verified).
    pub fn any(&self) -> bool {
        self.added > 0 || self.retired > 0 || self.replaced > 0
    }
}

impl Keys {
    /// An empty cache taking keys of the `allowed` (asymmetric) algorithms.
    pub fn new(policy: Policy, allowed: Vec<Algorithm>) -> Self {
        Self {
            policy,
            allowed,
            current: HashMap::new(),
            retired: HashMap::new(),
            unknown: HashMap::new(),
            fetched: None,
            attempted: None,
            generation: 0,
        }
    }

    /// The key for a token's `kid` (or its absence) at `now`.
    pub fn lookup(&self, kid: Option<&str>, now: Instant) -> Lookup {
        let fresh =
            self.fetched.is_some_and(|t| now.saturating_duration_since(t) <= self.policy.max_stale);
        if !fresh {
            return if self.may_fetch(now) {
                Lookup::Fetch
            } else {
                Lookup::Refused(Missing::NoKeys)
            };
        }
        let Some(kid) = kid else {
            let mut keys = self.current.values();
            return match (keys.next(), keys.next()) {
                (Some(only), None) => Lookup::Found(only.clone(), None),
                _ => Lookup::Refused(Missing::NoKid),
            };
        };
        if kid.len() > MAX_KID_BYTES {
            return Lookup::Refused(Missing::BadKid);
        }
        if let Some(key) = self.current.get(kid) {
            return Lookup::Found(key.clone(), None);
        }
        if let Some((key, since)) = self.retired.get(kid) {
            let until = *since + self.policy.grace;
            return if now < until {
                Lookup::Found(key.clone(), Some(until))
            } else {
                Lookup::Refused(Missing::Retired)
            };
        }
        let known_missing = self
            .unknown
            .get(kid)
            .is_some_and(|t| now.saturating_duration_since(*t) < self.policy.cooldown);
        if !known_missing && self.may_fetch(now) {
            Lookup::Fetch
        } else {
            Lookup::Refused(Missing::UnknownKid)
        }
    }

    /// Whether a fetch may start at `now`: none in the last `cooldown`.
    pub fn may_fetch(&self, now: Instant) -> bool {
        self.attempted.is_none_or(|t| now.saturating_duration_since(t) >= self.policy.cooldown)
    }

    /// When the next scheduled refresh is due: `refresh` after the last good fetch, or one
    /// `cooldown` after a failed attempt.
    pub fn next_refresh(&self) -> Option<Instant> {
        match (self.fetched, self.attempted) {
            (Some(f), Some(a)) if a > f => Some(a + self.policy.cooldown),
            (Some(f), _) => Some(f + self.policy.refresh),
            (None, Some(a)) => Some(a + self.policy.cooldown),
            (None, None) => None,
        }
    }

    /// A fetch starts at `now`.
    pub fn attempt(&mut self, now: Instant) {
        self.attempted = Some(now);
    }

    /// Remembers that `kid` was not in a set fetched at `now`.
    pub fn missing(&mut self, kid: &str, now: Instant) {
        if self.current.contains_key(kid) || kid.len() > MAX_KID_BYTES {
            return;
        }
        if self.unknown.len() >= MAX_UNKNOWN_KIDS {
            self.unknown.clear();
        }
        self.unknown.insert(kid.to_owned(), now);
    }

    /// Installs a freshly fetched set at `now`. Keys no longer in it are retired (usable for
    /// the grace period); the negative cache is cleared. The generation moves only when the
    /// usable keys changed: a periodic refresh that finds the same keys keeps every cached
    /// token valid.
    pub fn update(&mut self, jwks: &[Jwk], now: Instant) -> Changes {
        let mut changes = Changes::default();
        let mut next = HashMap::new();
        for jwk in jwks {
            match self.key_of(jwk) {
                Some(key) => {
                    next.insert(key.kid.clone(), Arc::new(key));
                }
                None => changes.skipped += 1,
            }
        }
        let mut previous = std::mem::take(&mut self.current);
        for (kid, key) in &mut next {
            match previous.remove(kid) {
                // The same key: keep the one tokens were verified with.
                Some(old) if old.same_as(key) => *key = old,
                Some(_) => changes.replaced += 1,
                None => {
                    self.retired.remove(kid);
                    changes.added += 1;
                }
            }
        }
        for (kid, key) in previous {
            self.retired.insert(kid, (key, now));
            changes.retired += 1;
        }
        let grace = self.policy.grace;
        self.retired.retain(|_, (_, since)| now.saturating_duration_since(*since) < grace);
        if changes.any() {
            self.generation += 1;
        }
        self.current = next;
        self.unknown.clear();
        self.fetched = Some(now);
        self.attempted = Some(now);
        changes
    }

    /// Whether tokens can be checked at `now`: keys fetched, and not longer than `max_stale`
    /// ago.
    pub fn usable(&self, now: Instant) -> bool {
        !self.current.is_empty()
            && self
                .fetched
                .is_some_and(|t| now.saturating_duration_since(t) <= self.policy.max_stale)
    }

    /// Bumped whenever the set of usable keys changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The usable key a JWK describes, if any.
    fn key_of(&self, jwk: &Jwk) -> Option<Key> {
        let kid = jwk.common.key_id.clone().filter(|k| !k.is_empty() && k.len() <= MAX_KID_BYTES);
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            return None;
        }
        let family: &[Algorithm] = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => &[
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => &[Algorithm::ES256],
                EllipticCurve::P384 => &[Algorithm::ES384],
                _ => &[],
            },
            AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
                _ => &[],
            },
            // Symmetric keys never verify anything here.
            AlgorithmParameters::OctetKey(_) => &[],
        };
        let named = match jwk.common.key_algorithm {
            Some(a) => Some(algorithm_of(a)?),
            None => None,
        };
        let algorithms: Vec<Algorithm> = family
            .iter()
            .copied()
            .filter(|a| self.allowed.contains(a) && named.is_none_or(|n| n == *a))
            .collect();
        if algorithms.is_empty() {
            return None;
        }
        let decoding = DecodingKey::from_jwk(jwk).ok()?;
        // A key without a kid can only be used while it is the only key (see `lookup`).
        Some(Key {
            kid: kid.unwrap_or_default(),
            decoding,
            algorithms,
            material: jwk.algorithm.clone(),
        })
    }
}

impl Key {
    /// Whether `other` is this key: the same `kid`, parameters and algorithms.
    fn same_as(&self, other: &Key) -> bool {
        self.kid == other.kid
            && self.material == other.material
            && self.algorithms == other.algorithms
    }
}

/// The signing algorithm a JWK's `alg` names; `None` for anything that is not one.
fn algorithm_of(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgerelay_ops::dev_idp::SigningKey;

    const ALLOWED: [Algorithm; 3] = [Algorithm::ES256, Algorithm::RS256, Algorithm::EdDSA];

    fn policy() -> Policy {
        Policy {
            refresh: Duration::from_secs(300),
            cooldown: Duration::from_secs(30),
            max_stale: Duration::from_secs(3_600),
            grace: Duration::from_secs(600),
        }
    }

    fn jwk(kid: &str, alg: &str) -> Jwk {
        serde_json::from_value(SigningKey::generate(kid, alg).unwrap().jwk()).unwrap()
    }

    fn found(l: Lookup) -> Option<String> {
        match l {
            Lookup::Found(k, _) => Some(k.kid.clone()),
            _ => None,
        }
    }

    #[test]
    fn nothing_is_found_before_the_first_fetch_and_only_one_fetch_per_cooldown_starts() {
        let t0 = Instant::now();
        let mut keys = Keys::new(policy(), ALLOWED.to_vec());
        assert!(matches!(keys.lookup(Some("a"), t0), Lookup::Fetch));
        keys.attempt(t0);
        assert!(matches!(keys.lookup(Some("a"), t0), Lookup::Refused(Missing::NoKeys)));
        assert!(!keys.usable(t0));
        keys.update(&[jwk("a", "ES256")], t0 + Duration::from_secs(1));
        assert_eq!(
            found(keys.lookup(Some("a"), t0 + Duration::from_secs(1))).as_deref(),
            Some("a")
        );
        assert!(keys.usable(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn an_unknown_kid_fetches_once_per_cooldown_and_is_remembered_as_missing() {
        let t0 = Instant::now();
        let mut keys = Keys::new(policy(), ALLOWED.to_vec());
        keys.update(&[jwk("a", "ES256")], t0);
        // Within the cooldown of the last fetch: refused without a fetch.
        assert!(matches!(
            keys.lookup(Some("b"), t0 + Duration::from_secs(5)),
            Lookup::Refused(Missing::UnknownKid)
        ));
        let t1 = t0 + Duration::from_secs(31);
        assert!(matches!(keys.lookup(Some("b"), t1), Lookup::Fetch));
        keys.attempt(t1);
        keys.update(&[jwk("a", "ES256")], t1);
        keys.missing("b", t1);
        // Still missing after the cooldown of the fetch... for one more cooldown of the kid.
        let t2 = t1 + Duration::from_secs(31);
        assert!(matches!(keys.lookup(Some("c"), t2), Lookup::Fetch));
        keys.missing("b", t2);
        assert!(matches!(
            keys.lookup(Some("b"), t2 + Duration::from_secs(29)),
            Lookup::Refused(Missing::UnknownKid)
        ));
    }

    #[test]
    fn rotated_out_keys_verify_for_the_grace_then_are_refused() {
        let t0 = Instant::now();
        let mut keys = Keys::new(policy(), ALLOWED.to_vec());
        keys.update(&[jwk("old", "ES256")], t0);
        let g0 = keys.generation();
        let changes = keys.update(&[jwk("new", "ES256")], t0 + Duration::from_secs(60));
        assert_eq!((changes.added, changes.retired), (1, 1));
        assert_ne!(keys.generation(), g0, "cached tokens are checked again");
        let in_grace = keys.lookup(Some("old"), t0 + Duration::from_secs(600));
        assert!(
            matches!(in_grace, Lookup::Found(_, Some(end)) if end == t0 + Duration::from_secs(660))
        );
        assert!(matches!(
            keys.lookup(Some("old"), t0 + Duration::from_secs(660)),
            Lookup::Refused(Missing::Retired)
        ));
        assert_eq!(
            found(keys.lookup(Some("new"), t0 + Duration::from_secs(660))).as_deref(),
            Some("new")
        );
    }

    #[test]
    fn the_last_good_set_serves_until_max_stale() {
        let t0 = Instant::now();
        let mut keys = Keys::new(policy(), ALLOWED.to_vec());
        keys.update(&[jwk("a", "ES256")], t0);
        keys.attempt(t0 + Duration::from_secs(300)); // a refresh that failed
        assert_eq!(keys.next_refresh(), Some(t0 + Duration::from_secs(330)));
        assert!(found(keys.lookup(Some("a"), t0 + Duration::from_secs(3_600))).is_some());
        let late = t0 + Duration::from_secs(3_601);
        assert!(!keys.usable(late));
        assert!(matches!(keys.lookup(Some("a"), late), Lookup::Fetch));
    }

    #[test]
    fn only_asymmetric_signing_keys_of_allowed_algorithms_are_taken() {
        let t0 = Instant::now();
        let mut keys = Keys::new(policy(), vec![Algorithm::ES256]);
        let hmac: Jwk =
            serde_json::from_value(serde_json::json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0"}))
                .unwrap();
        let mut enc = jwk("enc", "ES256");
        enc.common.public_key_use = Some(PublicKeyUse::Encryption);
        let changes = keys.update(&[hmac, enc, jwk("rsa", "RS256"), jwk("ec", "ES256")], t0);
        assert_eq!((changes.added, changes.skipped), (1, 3));
        assert!(matches!(keys.lookup(Some("h"), t0), Lookup::Refused(Missing::UnknownKid)));
        assert_eq!(
            found(keys.lookup(None, t0)).as_deref(),
            Some("ec"),
            "the only key serves tokens without kid"
        );
        assert!(matches!(
            keys.lookup(Some(&"k".repeat(300)), t0),
            Lookup::Refused(Missing::BadKid)
        ));
    }

    #[test]
    fn a_refresh_moves_the_generation_only_when_the_usable_keys_change() {
        let (a, b, a2) = (jwk("a", "ES256"), jwk("b", "ES256"), jwk("a", "ES256"));
        let hmac: Jwk =
            serde_json::from_value(serde_json::json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0"}))
                .unwrap();
        let mut unnamed = b.clone();
        unnamed.common.key_algorithm = None;
        let changes =
            |added, retired, replaced, skipped| Changes { added, retired, replaced, skipped };
        // (what, set before, set fetched, changes, generation moves)
        type Case<'a> = (&'static str, &'a [&'a Jwk], &'a [&'a Jwk], Changes, bool);
        let cases: [Case; 7] = [
            ("same keys", &[&a, &b], &[&a, &b], changes(0, 0, 0, 0), false),
            ("same keys, other order", &[&a, &b], &[&b, &a], changes(0, 0, 0, 0), false),
            ("an unusable key appears", &[&a], &[&a, &hmac], changes(0, 0, 0, 1), false),
            ("a key appears", &[&a], &[&a, &b], changes(1, 0, 0, 0), true),
            ("a key is rotated out", &[&a, &b], &[&a], changes(0, 1, 0, 0), true),
            ("new material under a known kid", &[&a, &b], &[&a2, &b], changes(0, 0, 1, 0), true),
            (
                "the same key without its alg (it verifies the same)",
                &[&a, &b],
                &[&a, &unnamed],
                changes(0, 0, 0, 0),
                false,
            ),
        ];
        let owned = |keys: &[&Jwk]| keys.iter().map(|&k| k.clone()).collect::<Vec<_>>();
        for (what, before, fetched, expected, moves) in cases {
            let (before, fetched) = (owned(before), owned(fetched));
            let t0 = Instant::now();
            let mut keys = Keys::new(policy(), ALLOWED.to_vec());
            keys.update(&before, t0);
            let g0 = keys.generation();
            let t1 = t0 + Duration::from_secs(300);
            assert_eq!(keys.update(&fetched, t1), expected, "{what}");
            assert_eq!(keys.generation() != g0, moves, "{what}: generation");
            // Every key of the fetched set verifies, whatever changed.
            for jwk in fetched.iter().filter(|j| j.common.key_id.as_deref() != Some("h")) {
                let kid = jwk.common.key_id.as_deref();
                assert_eq!(found(keys.lookup(kid, t1)).as_deref(), kid, "{what}");
            }
        }
    }

    #[test]
    fn a_key_back_from_retirement_is_added_and_a_replaced_key_stops_verifying_at_once() {
        let t0 = Instant::now();
        let (a, b, b2) = (jwk("a", "ES256"), jwk("b", "ES256"), jwk("b", "ES256"));
        let mut keys = Keys::new(policy(), ALLOWED.to_vec());
        keys.update(&[a.clone(), b.clone()], t0);
        assert_eq!(keys.update(std::slice::from_ref(&a), t0 + Duration::from_secs(1)).retired, 1);
        let g = keys.generation();
        let back = keys.update(&[a.clone(), b.clone()], t0 + Duration::from_secs(2));
        assert_eq!((back.added, back.retired), (1, 0));
        assert_ne!(keys.generation(), g);
        assert!(matches!(
            keys.lookup(Some("b"), t0 + Duration::from_secs(2)),
            Lookup::Found(_, None)
        ));
        let old = match keys.lookup(Some("b"), t0) {
            Lookup::Found(k, _) => k,
            other => panic!("{other:?}"),
        };
        assert_eq!(keys.update(&[a, b2], t0 + Duration::from_secs(3)).replaced, 1);
        let Lookup::Found(new, None) = keys.lookup(Some("b"), t0 + Duration::from_secs(3)) else {
            panic!("the new b is current");
        };
        assert!(!old.same_as(&new), "the old material is gone, not kept for a grace");
    }
}
