//! TLS plumbing: the one crypto provider (ring), and server configs whose certificate and
//! client certificate trust can be swapped at run time (SIGHUP reload). Development
//! certificates are `edgerelay-ops`'s (`edgerelay dev-certs`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// Errors loading TLS material. Always the operator's side; a retry does not help.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// The certificate and key do not make a usable server config.
    #[error("TLS config: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto provider every TLS config of the relay uses. async-nats brings ring; naming it
/// explicitly keeps rustls from having to guess (it panics if two providers are compiled in).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide default provider (for libraries that build their own
/// configs, like the NATS client). Call once at start-up; later calls are harmless.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The server certificate and key every TLS config of the relay presents, swappable at run
/// time: a reload stores a new one, new handshakes pick it up, and connections already
/// established keep the session they have.
#[derive(Debug)]
pub struct CertSlot {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertSlot {
    /// A slot holding the certificate chain and key of these PEM files.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self { current: RwLock::new(certified_key(cert, key)?) }))
    }

    /// Reads the PEM files again and, if they are usable, serves them from the next handshake
    /// on. Returns whether the leaf certificate changed. On error the slot keeps what it had.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<bool, TlsError> {
        let new = certified_key(cert, key)?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let changed = current.end_entity_cert().ok() != new.end_entity_cert().ok();
        *current = new;
        Ok(changed)
    }

    /// The certificate and key served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A certificate chain and its key from PEM files, checked to belong together.
fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let file_err = |path: &Path, message: String| TlsError::File { path: path.into(), message };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(file_err(cert, "no certificate in file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e.to_string()))?;
    let certified = CertifiedKey::from_der(chain, key_der, &provider())?;
    Ok(Arc::new(certified))
}

/// What checks client certificates: `None` when none are asked for.
pub type ClientVerifier = Option<Arc<dyn ClientCertVerifier>>;

/// Which client certificates the relay accepts (mTLS), swappable at run time like
/// [`CertSlot`]: a reload stores a new CA (or turns client certificates on or off) for the
/// next handshakes. Client certificates are optional: a client without one is still served
/// and authenticates with a token; one that presents a certificate must chain to the CA.
///
/// The `certificate_authorities` hint of a certificate request is left empty (the CA can
/// change under a handshake, and the hint would have to borrow it): a client offers the one
/// certificate it has, which is what collectors do.
#[derive(Debug)]
pub struct ClientCerts {
    current: RwLock<Option<Arc<dyn ClientCertVerifier>>>,
    schemes: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ClientCerts {
    /// Client certificates chaining to `ca`, or none asked for.
    pub fn load(ca: Option<&Path>) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: RwLock::new(Self::verifier(ca)?),
            schemes: provider().signature_verification_algorithms,
        }))
    }

    /// Reads the PEM CA certificates in `ca` into a verifier for [`ClientCerts::store`]: built
    /// before it is stored, so a bad CA file changes nothing.
    pub fn verifier(ca: Option<&Path>) -> Result<ClientVerifier, TlsError> {
        let Some(ca) = ca else { return Ok(None) };
        let file_err = |message: String| TlsError::File { path: ca.into(), message };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(e.to_string()))? {
            roots.add(c.map_err(|e| file_err(e.to_string()))?)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| file_err(e.to_string()))?;
        Ok(Some(verifier))
    }

    /// Handshakes from now on check client certificates with `verifier`.
    pub fn store(&self, verifier: ClientVerifier) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = verifier;
    }

    fn current(&self) -> ClientVerifier {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ClientCertVerifier for ClientCerts {
    fn offer_client_auth(&self) -> bool {
        self.current.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.current() {
            Some(v) => v.verify_client_cert(end_entity, intermediates, now),
            // Client certificates were turned off during this handshake.
            None => Err(rustls::Error::General("client certificates are not accepted".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.schemes)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.schemes)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.supported_schemes()
    }
}

/// A server config presenting the certificate in `cert` and checking client certificates with
/// `clients`, offering `alpn` protocols in order of preference.
pub fn server_config(
    cert: Arc<CertSlot>,
    clients: Arc<ClientCerts>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}
