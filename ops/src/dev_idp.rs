//! A development identity provider, for the demo, the load generator and the tests — never
//! for production. It serves OIDC discovery and a JWKS over plain HTTP on a loopback address
//! and mints tokens with whatever claims and lifetime it is asked for.
//!
//! Endpoints (`edgerelay dev-idp`, or [`serve`] in-process):
//!
//! - `GET /.well-known/openid-configuration`: `issuer`, `jwks_uri`.
//! - `GET /jwks.json`: the public keys (one per algorithm, plus keys rotated out but kept).
//! - `POST /token` with `{"claims": {...}, "lifetime_secs": 300, "alg": "ES256"}`: answers
//!   `{"access_token": "...", "token_type": "Bearer", "expires_in": 300}`. `iss`, `aud`
//!   (`edgerelay`), `sub` (`dev`), `iat` and `exp` are filled in unless the claims set them.
//! - `POST /rotate` with `{"alg": "ES256", "retire": true}`: a new signing key for `alg`; the
//!   old one stays in the JWKS unless `retire`.
//! - `GET /stats`: `{"jwks_fetches": n}`, how often the JWKS was served.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Algorithms the dev IdP can sign with.
pub const ALGORITHMS: [&str; 4] = ["ES256", "RS256", "PS256", "EdDSA"];

/// Why the dev IdP could not do something.
#[derive(Debug, thiserror::Error)]
pub enum DevIdpError {
    #[error("algorithm {0:?} is not one of ES256, RS256, PS256, EdDSA")]
    Algorithm(String),
    #[error("generating a key failed")]
    KeyGeneration,
    #[error("signing failed")]
    Signing,
    #[error("the dev IdP only listens on loopback addresses, not {0}")]
    NotLoopback(SocketAddr),
}

/// The provider: its issuer URL and signing keys.
pub struct DevIdp {
    issuer: String,
    keys: Mutex<Keys>,
    jwks_fetches: AtomicU64,
}

#[derive(Default)]
struct Keys {
    /// The key each algorithm signs with.
    signing: HashMap<String, Arc<SigningKey>>,
    /// Public keys published besides the signing ones (rotated out, not retired).
    kept: Vec<Arc<SigningKey>>,
    next: u64,
}

/// One key pair.
pub struct SigningKey {
    pub kid: String,
    pub alg: String,
    pair: Pair,
}

enum Pair {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

/// What `POST /token` takes.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MintRequest {
    pub claims: Map<String, Value>,
    pub lifetime_secs: Option<u64>,
    pub alg: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    alg: String,
    #[serde(default)]
    retire: bool,
}

impl DevIdp {
    /// A provider with one signing key per algorithm in `algs`.
    pub fn new(issuer: &str, algs: &[&str]) -> Result<Self, DevIdpError> {
        let idp = Self {
            issuer: issuer.trim_end_matches('/').to_owned(),
            keys: Mutex::new(Keys::default()),
            jwks_fetches: AtomicU64::new(0),
        };
        for alg in algs {
            idp.rotate(alg, true)?;
        }
        Ok(idp)
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The OIDC discovery document.
    pub fn discovery(&self) -> Value {
        json!({
            "issuer": self.issuer,
            "jwks_uri": format!("{}/jwks.json", self.issuer),
            "id_token_signing_alg_values_supported": ALGORITHMS,
        })
    }

    /// The public keys, as a JWKS document.
    pub fn jwks(&self) -> Value {
        let keys = self.lock();
        let mut all: Vec<&Arc<SigningKey>> = keys.signing.values().chain(&keys.kept).collect();
        all.sort_by(|a, b| a.kid.cmp(&b.kid));
        json!({ "keys": all.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
    }

    /// How often the JWKS was served over HTTP.
    pub fn jwks_fetches(&self) -> u64 {
        self.jwks_fetches.load(Ordering::Relaxed)
    }

    /// A new signing key for `alg`; the old one stays published unless `retire`. Returns the
    /// new key's `kid`.
    pub fn rotate(&self, alg: &str, retire: bool) -> Result<String, DevIdpError> {
        let mut keys = self.lock();
        keys.next += 1;
        let kid = format!("dev-{}-{}", alg.to_ascii_lowercase(), keys.next);
        let key = Arc::new(SigningKey::generate(&kid, alg)?);
        if let Some(old) = keys.signing.insert(alg.to_owned(), key) {
            if !retire {
                keys.kept.push(old);
            }
        }
        Ok(kid)
    }

    /// Removes every kept (rotated-out) key from the JWKS.
    pub fn retire_kept(&self) {
        self.lock().kept.clear();
    }

    /// The current signing key of `alg`.
    pub fn key(&self, alg: &str) -> Result<Arc<SigningKey>, DevIdpError> {
        self.lock().signing.get(alg).cloned().ok_or_else(|| DevIdpError::Algorithm(alg.into()))
    }

    /// A token with the standard claims filled in (unless `claims` sets them) and `lifetime`.
    pub fn mint(&self, req: &MintRequest) -> Result<String, DevIdpError> {
        let now = unix_now();
        let lifetime = req.lifetime_secs.unwrap_or(300);
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(self.issuer));
        claims.insert("aud".into(), json!("edgerelay"));
        claims.insert("sub".into(), json!("dev"));
        claims.insert("iat".into(), json!(now));
        claims.insert("exp".into(), json!(now + lifetime));
        claims.extend(req.claims.clone());
        let key = self.key(req.alg.as_deref().unwrap_or("ES256"))?;
        key.sign(&json!({"alg": key.alg, "typ": "JWT", "kid": key.kid}), &Value::Object(claims))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SigningKey {
    /// A fresh key pair for `alg`.
    pub fn generate(kid: &str, alg: &str) -> Result<Self, DevIdpError> {
        let rng = SystemRandom::new();
        let gen = |_| DevIdpError::KeyGeneration;
        let pair = match alg {
            "RS256" | "PS256" => {
                Pair::Rsa(RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).map_err(gen)?)
            }
            "ES256" => {
                let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
                let doc = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(gen)?;
                Pair::Ec(
                    EcdsaKeyPair::from_pkcs8(alg, doc.as_ref())
                        .map_err(|_| DevIdpError::KeyGeneration)?,
                )
            }
            "EdDSA" => {
                let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(gen)?;
                Pair::Ed(
                    Ed25519KeyPair::from_pkcs8(doc.as_ref())
                        .map_err(|_| DevIdpError::KeyGeneration)?,
                )
            }
            other => return Err(DevIdpError::Algorithm(other.into())),
        };
        Ok(Self { kid: kid.to_owned(), alg: alg.to_owned(), pair })
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        match &self.pair {
            Pair::Rsa(k) => json!({
                "kty": "RSA", "use": "sig", "alg": self.alg, "kid": self.kid,
                "n": b64(k.public_key().modulus().big_endian_without_leading_zero()),
                "e": b64(k.public_key().exponent().big_endian_without_leading_zero()),
            }),
            Pair::Ec(k) => {
                // Uncompressed point: 0x04 || x || y.
                let point = k.public_key().as_ref();
                json!({
                    "kty": "EC", "use": "sig", "alg": self.alg, "kid": self.kid, "crv": "P-256",
                    "x": b64(&point[1..33]), "y": b64(&point[33..65]),
                })
            }
            Pair::Ed(k) => json!({
                "kty": "OKP", "use": "sig", "alg": self.alg, "kid": self.kid, "crv": "Ed25519",
                "x": b64(k.public_key().as_ref()),
            }),
        }
    }

    /// The public key's raw bytes (for tests that misuse it as an HMAC secret).
    pub fn public_bytes(&self) -> Vec<u8> {
        match &self.pair {
            Pair::Rsa(k) => k.public_key().as_ref().to_vec(),
            Pair::Ec(k) => k.public_key().as_ref().to_vec(),
            Pair::Ed(k) => k.public_key().as_ref().to_vec(),
        }
    }

    /// Signs any header and claims (tests use this to craft hostile tokens).
    pub fn sign(&self, header: &Value, claims: &Value) -> Result<String, DevIdpError> {
        let input = format!("{}.{}", encode_part(header), encode_part(claims));
        let rng = SystemRandom::new();
        let sig = match &self.pair {
            Pair::Rsa(k) => {
                let padding: &dyn signature::RsaEncoding = if self.alg == "PS256" {
                    &signature::RSA_PSS_SHA256
                } else {
                    &signature::RSA_PKCS1_SHA256
                };
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(padding, &rng, input.as_bytes(), &mut sig)
                    .map_err(|_| DevIdpError::Signing)?;
                sig
            }
            Pair::Ec(k) => {
                k.sign(&rng, input.as_bytes()).map_err(|_| DevIdpError::Signing)?.as_ref().to_vec()
            }
            Pair::Ed(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
        };
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

/// base64url of a JSON value.
pub fn encode_part(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Binds a loopback listener for the dev IdP.
pub async fn bind(
    addr: SocketAddr,
) -> Result<TcpListener, Box<dyn std::error::Error + Send + Sync>> {
    if !addr.ip().is_loopback() {
        return Err(Box::new(DevIdpError::NotLoopback(addr)));
    }
    Ok(TcpListener::bind(addr).await?)
}

/// Runs a dev IdP on `listen` (loopback only), its issuer `http://<listen>`, until `shutdown`.
pub async fn run(
    listen: SocketAddr,
    algs: &[&str],
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let listener = bind(listen).await?;
    let addr = listener.local_addr()?;
    let idp = Arc::new(DevIdp::new(&format!("http://{addr}"), algs)?);
    tracing::info!(issuer = idp.issuer(), algs = ?algs, "dev identity provider serving (not for production)");
    let (stop, stop_rx) = watch::channel(false);
    let server = tokio::spawn(serve(idp, listener, stop_rx));
    shutdown.await;
    let _ = stop.send(true);
    let _ = server.await;
    Ok(())
}

/// Serves the endpoints until `stop` turns true.
pub async fn serve(idp: Arc<DevIdp>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let tcp = tokio::select! {
            a = listener.accept() => match a {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
            _ = stop.changed() => return,
        };
        let idp = idp.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let idp = idp.clone();
                async move { Ok::<_, Infallible>(route(&idp, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(tcp), svc);
            // Stopping closes kept-alive connections too: the IdP is really gone.
            tokio::select! {
                _ = conn => {}
                _ = stop.changed() => {}
            }
        });
    }
}

async fn route(idp: &DevIdp, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/.well-known/openid-configuration") => {
            reply(StatusCode::OK, &idp.discovery())
        }
        (Method::GET, "/jwks.json") => {
            idp.jwks_fetches.fetch_add(1, Ordering::Relaxed);
            reply(StatusCode::OK, &idp.jwks())
        }
        (Method::GET, "/stats") => {
            reply(StatusCode::OK, &json!({"jwks_fetches": idp.jwks_fetches()}))
        }
        (Method::POST, "/token") => match body::<MintRequest>(req).await {
            Ok(mint) => match idp.mint(&mint) {
                Ok(token) => reply(
                    StatusCode::OK,
                    &json!({
                        "access_token": token,
                        "token_type": "Bearer",
                        "expires_in": mint.lifetime_secs.unwrap_or(300),
                    }),
                ),
                Err(e) => reply(StatusCode::BAD_REQUEST, &json!({"error": e.to_string()})),
            },
            Err(e) => reply(StatusCode::BAD_REQUEST, &json!({"error": e})),
        },
        (Method::POST, "/rotate") => match body::<RotateRequest>(req).await {
            Ok(r) => match idp.rotate(&r.alg, r.retire) {
                Ok(kid) => reply(StatusCode::OK, &json!({"kid": kid})),
                Err(e) => reply(StatusCode::BAD_REQUEST, &json!({"error": e.to_string()})),
            },
            Err(e) => reply(StatusCode::BAD_REQUEST, &json!({"error": e})),
        },
        _ => reply(StatusCode::NOT_FOUND, &json!({"error": "not found"})),
    }
}

async fn body<T: serde::de::DeserializeOwned>(
    req: Request<hyper::body::Incoming>,
) -> Result<T, String> {
    let bytes = Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| format!("invalid JSON: {e}"))
}

fn reply(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(v.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_signs_a_token_its_jwk_verifies() {
        let idp = DevIdp::new("http://127.0.0.1:1", &ALGORITHMS).unwrap();
        for alg in ALGORITHMS {
            let token =
                idp.mint(&MintRequest { alg: Some(alg.into()), ..Default::default() }).unwrap();
            let key = idp.key(alg).unwrap();
            let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.jwk()).unwrap();
            let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
            let mut v =
                jsonwebtoken::Validation::new(edgerelay::auth::config::algorithm(alg).unwrap());
            v.set_audience(&["edgerelay"]);
            let data = jsonwebtoken::decode::<Map<String, Value>>(&token, &decoding, &v);
            assert!(data.is_ok(), "{alg}: {data:?}");
        }
    }

    #[test]
    fn rotation_keeps_or_retires_the_old_key() {
        let idp = DevIdp::new("http://127.0.0.1:1", &["ES256"]).unwrap();
        let first = idp.key("ES256").unwrap().kid.clone();
        idp.rotate("ES256", false).unwrap();
        let kids = |idp: &DevIdp| -> Vec<String> {
            idp.jwks()["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["kid"].as_str().unwrap().to_owned())
                .collect()
        };
        assert!(kids(&idp).contains(&first));
        assert_eq!(kids(&idp).len(), 2);
        idp.rotate("ES256", true).unwrap();
        assert_eq!(kids(&idp).len(), 2, "the kept key stays, the one replaced is retired");
        idp.retire_kept();
        assert_eq!(kids(&idp).len(), 1);
    }
}
