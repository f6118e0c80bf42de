//! Credentials presented once and kept: a connection's client certificate chain (for all its
//! requests) and a native QUIC stream's token (for the stream's later requests, until another
//! token replaces it). What matters is what was presented, not the identity it proved at the
//! time: that identity is cached with the generation of the auth stage that derived it, and
//! derived again from what was presented as soon as a reload put a stage of another generation
//! in [`Current`]. So a reload that removes an identity (401), narrows its rules (403) or turns
//! mTLS off (the next request needs a token) reaches the next request of an open connection or
//! stream, and between reloads a request costs one atomic load and compare: no lock, no hash of
//! the token, no certificate parsing.
//!
//! - [`Current`]: the auth stage in effect, swapped whole by a reload, and its generation.
//! - [`Peer`]: a connection's verified client certificate chain and the identity it proves
//!   (HTTPS, HTTP/3 and native QUIC).
//! - [`Session`]: what a native stream presented: its connection's certificate until a request
//!   carries a token, then that token. It still ends at the token's `exp`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::pki_types::CertificateDer;

use super::{idp, Auth, Credentials, Identity};
use crate::error::{ErrorCode, Refusal};

/// The auth stage every request uses now: swapped whole by a reload.
#[derive(Debug)]
pub struct Current {
    stage: RwLock<Arc<Auth>>,
    /// `stage`'s generation, readable without the lock.
    generation: AtomicU64,
}

/// A connection's verified client certificate chain, and the identity it proves.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    chain: Option<Arc<[CertificateDer<'static>]>>,
    /// The identity `chain` proves (`None`: none configured for it) under the stage of that
    /// generation; `None` until first asked.
    cached: Option<(u64, Option<Identity>)>,
}

/// What a native QUIC stream presented, and the identity its token proves.
#[derive(Debug)]
pub struct Session {
    peer: Peer,
    presented: Presented,
    /// The identity the token proves under the stage of that generation.
    /// The identity of the token, with the stage generation and key-set changes it was
    /// derived under.
    cached: Option<((u64, u64), Identity)>,
}

/// The credentials a stream's next request stands on.
#[derive(Debug, PartialEq)]
enum Presented {
    /// Nothing (yet, or any more after a 401): the next request must carry a token.
    Nothing,
    /// The connection's client certificate.
    Certificate,
    /// The token of the last request that carried one.
    Token(Box<str>),
}

impl Current {
    pub fn new(auth: Arc<Auth>) -> Self {
        Self { generation: AtomicU64::new(auth.generation()), stage: RwLock::new(auth) }
    }

    /// The stage in effect.
    pub fn load(&self) -> Arc<Auth> {
        self.stage.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Requests from now on go through `auth`; requests under way finish with the stage they
    /// hold. Identities cached under the previous stage are derived again on their next use.
    pub fn store(&self, auth: Arc<Auth>) {
        let mut stage = self.stage.write().unwrap_or_else(|e| e.into_inner());
        self.generation.store(auth.generation(), Ordering::Release);
        *stage = auth;
    }

    /// The generation of the stage in effect.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

impl Peer {
    /// `chain`: the connection's verified client certificates (end entity first), if any.
    pub fn new(chain: Option<&[CertificateDer<'_>]>) -> Self {
        let chain = chain.map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
        Self { chain, cached: None }
    }

    /// The identity the certificate proves under the current stage: `None` without a
    /// certificate, or when the stage has no identity for it (no longer, or mTLS is off).
    pub fn identity(&mut self, current: &Current) -> Option<&Identity> {
        self.chain.as_ref()?;
        let generation = current.generation();
        if !matches!(self.cached, Some((g, _)) if g == generation) {
            let auth = current.load();
            self.cached = Some((auth.generation(), auth.peer_identity(self.chain.as_deref())));
        }
        self.cached.as_ref()?.1.as_ref()
    }
}

impl Session {
    /// A new stream of a connection that presented `peer`: until a request carries a token,
    /// the certificate is the stream's credential.
    pub fn new(peer: Peer) -> Self {
        let presented =
            if peer.chain.is_some() { Presented::Certificate } else { Presented::Nothing };
        Self { peer, presented, cached: None }
    }

    /// The identity of the stream's next request under the current stage. `token`, when the
    /// request carries one, replaces what the stream presented before. A 401 (unknown, expired
    /// or revoked credentials) also forgets what the stream presented: its next request must
    /// carry a token.
    pub async fn identity(
        &mut self,
        current: &Current,
        token: Option<&str>,
    ) -> Result<Identity, Refusal> {
        let found = self.derive(current, token).await;
        let found = found.and_then(|id| id.check_current().map(|()| id));
        if found.as_ref().is_err_and(|r| r.code == ErrorCode::Unauthorized) {
            self.presented = Presented::Nothing;
            self.cached = None;
        }
        found
    }

    /// Who the stream's last request was, for the audit of a refusal.
    pub fn last(&self) -> Option<&Identity> {
        match self.presented {
            Presented::Nothing => None,
            Presented::Certificate => self.peer.cached.as_ref()?.1.as_ref(),
            Presented::Token(_) => self.cached.as_ref().map(|(_, id)| id),
        }
    }

    async fn derive(
        &mut self,
        current: &Current,
        token: Option<&str>,
    ) -> Result<Identity, Refusal> {
        if let Some(token) = token {
            // A token on the request is checked whatever was cached (that is the token cache's
            // job), and becomes the stream's credential.
            if !matches!(&self.presented, Presented::Token(t) if **t == *token) {
                self.presented = Presented::Token(token.into());
            }
            self.cached = None;
        }
        let token = match &self.presented {
            Presented::Nothing => {
                return Err(Refusal::new(
                    ErrorCode::Unauthorized,
                    "missing credentials: the first request of a stream must carry a token",
                )
                .because("missing_token"))
            }
            Presented::Certificate => {
                return self.peer.identity(current).cloned().ok_or_else(|| {
                    Refusal::new(
                        ErrorCode::Unauthorized,
                        "the connection's client certificate is not (or no longer) an identity: \
                         send a token",
                    )
                    .because("unknown_certificate")
                })
            }
            Presented::Token(token) => token,
        };
        let generation = (current.generation(), idp::key_changes());
        if let Some((g, id)) = &self.cached {
            if *g == generation {
                return Ok(id.clone());
            }
        }
        let auth = current.load();
        let id = auth.authenticate(Credentials { bearer: Some(token), peer: None }).await?;
        self.cached = Some(((auth.generation(), generation.1), id.clone()));
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::config::{AuthConfig, CertIdentity, MtlsConfig, StaticToken};
    use crate::metrics::Metrics;

    const TOKEN: &str = "0123456789abcdef";

    fn token(allow: &str) -> StaticToken {
        StaticToken {
            name: "edge".into(),
            token: TOKEN.into(),
            allow: vec![allow.into()],
            deny: vec![],
        }
    }

    fn collector(allow: &str) -> MtlsConfig {
        MtlsConfig {
            ca_file: "unused.pem".into(),
            identities: vec![CertIdentity {
                name: "collector".into(),
                dns_name: "collector.edge.test".into(),
                allow: vec![allow.into()],
                deny: vec![],
            }],
        }
    }

    fn stage(static_tokens: Vec<StaticToken>, mtls: Option<MtlsConfig>) -> Arc<Auth> {
        let cfg = AuthConfig { static_tokens, mtls, ..AuthConfig::default() };
        Arc::new(Auth::new(&cfg, Arc::new(Metrics::new())).unwrap())
    }

    /// A (self-signed) client certificate for `dns_name`; rustls checked chains before us.
    fn chain(dns_name: &str) -> Vec<CertificateDer<'static>> {
        let cert = rcgen::generate_simple_self_signed(vec![dns_name.to_owned()]).unwrap();
        vec![cert.cert.der().clone()]
    }

    fn reason(r: Result<Identity, Refusal>) -> (ErrorCode, &'static str) {
        let r = r.unwrap_err();
        (r.code, r.reason)
    }

    #[test]
    fn every_stage_has_its_own_generation() {
        let (a, b) = (stage(vec![], None), stage(vec![], None));
        assert_ne!(a.generation(), b.generation());
        let current = Current::new(a.clone());
        assert_eq!(current.generation(), a.generation());
        current.store(b.clone());
        assert_eq!(current.generation(), b.generation());
        assert!(Arc::ptr_eq(&current.load(), &b));
    }

    #[test]
    fn a_certificate_identity_is_derived_once_per_generation() {
        let current = Current::new(stage(vec![], Some(collector("edge.collector.>"))));
        let mut peer = Peer::new(Some(&chain("collector.edge.test")));
        let first = peer.identity(&current).unwrap().clone();
        assert!(first.rules.permits("edge.collector.cpu"));
        // Same generation: the cached identity itself, nothing derived again.
        assert!(Arc::ptr_eq(&peer.identity(&current).unwrap().rules, &first.rules));

        // Narrowed, removed, mTLS off: each reaches the next request.
        current.store(stage(vec![], Some(collector("edge.collector.mem"))));
        let narrowed = peer.identity(&current).unwrap();
        assert!(!narrowed.rules.permits("edge.collector.cpu"));
        assert!(narrowed.rules.permits("edge.collector.mem"));
        let mut other = collector("edge.collector.>");
        other.identities[0].dns_name = "other.edge.test".into();
        current.store(stage(vec![], Some(other)));
        assert!(peer.identity(&current).is_none());
        current.store(stage(vec![], None));
        assert!(peer.identity(&current).is_none());
        // Back on: the same certificate is that identity again.
        current.store(stage(vec![], Some(collector("edge.collector.>"))));
        assert!(peer.identity(&current).is_some());

        // No certificate: never an identity, whatever the stage.
        assert!(Peer::new(None).identity(&current).is_none());
    }

    #[tokio::test]
    async fn a_stream_token_is_checked_again_after_a_reload_only() {
        let current = Current::new(stage(vec![token("edge.>")], None));
        let mut session = Session::new(Peer::new(None));
        assert_eq!(
            reason(session.identity(&current, None).await),
            (ErrorCode::Unauthorized, "missing_token")
        );
        let first = session.identity(&current, Some(TOKEN)).await.unwrap();
        let again = session.identity(&current, None).await.unwrap();
        assert!(Arc::ptr_eq(&first.rules, &again.rules), "cached within a generation");
        assert_eq!(session.last().map(|id| &*id.name), Some("static:edge"));

        current.store(stage(vec![token("edge.a.>")], None));
        let narrowed = session.identity(&current, None).await.unwrap();
        assert!(!narrowed.rules.permits("edge.b.x") && narrowed.rules.permits("edge.a.x"));

        // The token removed: 401 on the next request, and the stream forgets it.
        current.store(stage(vec![], None));
        assert_eq!(
            reason(session.identity(&current, None).await),
            (ErrorCode::Unauthorized, "unknown_token")
        );
        assert!(session.last().is_none());
        current.store(stage(vec![token("edge.>")], None));
        assert_eq!(
            reason(session.identity(&current, None).await),
            (ErrorCode::Unauthorized, "missing_token")
        );
        assert!(session.identity(&current, Some(TOKEN)).await.is_ok());
    }

    #[tokio::test]
    async fn a_stream_stands_on_its_certificate_until_a_token_replaces_it() {
        let tokens = vec![token("edge.token.>")];
        let current = Current::new(stage(tokens.clone(), Some(collector("edge.collector.>"))));
        let mut session = Session::new(Peer::new(Some(&chain("collector.edge.test"))));
        let id = session.identity(&current, None).await.unwrap();
        assert_eq!(&*id.name, "mtls:collector");
        assert_eq!(session.last().map(|id| &*id.name), Some("mtls:collector"));

        // mTLS off: the certificate proves nothing any more, a token is needed.
        current.store(stage(tokens.clone(), None));
        assert_eq!(
            reason(session.identity(&current, None).await),
            (ErrorCode::Unauthorized, "unknown_certificate")
        );
        let id = session.identity(&current, Some(TOKEN)).await.unwrap();
        assert_eq!(&*id.name, "static:edge");
        // The token, not the certificate, from now on, even with mTLS back on.
        current.store(stage(tokens, Some(collector("edge.collector.>"))));
        assert_eq!(&*session.identity(&current, None).await.unwrap().name, "static:edge");
    }

    #[tokio::test]
    async fn a_bad_token_leaves_the_stream_without_credentials() {
        let current = Current::new(stage(vec![token("edge.>")], Some(collector("edge.>"))));
        let mut session = Session::new(Peer::new(Some(&chain("collector.edge.test"))));
        assert!(session.identity(&current, None).await.is_ok());
        assert_eq!(
            reason(session.identity(&current, Some("not-a-known-token")).await),
            (ErrorCode::Unauthorized, "unknown_token")
        );
        assert_eq!(
            reason(session.identity(&current, None).await),
            (ErrorCode::Unauthorized, "missing_token")
        );
    }
}
