//! Client certificates as identities (edge collectors). rustls has already checked that the
//! certificate chains to `auth.mtls.ca_file`; here a certificate is matched to a configured
//! identity by a DNS subject alternative name it carries.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};

use super::config::MtlsConfig;
use super::{Identity, Rules, Source};
use crate::subject::SubjectError;

/// The configured certificate identities.
#[derive(Debug)]
pub struct CertIdentities {
    entries: Vec<(ServerName<'static>, Identity)>,
}

impl CertIdentities {
    pub fn new(cfg: &MtlsConfig) -> Result<Self, SubjectError> {
        let mut entries = Vec::new();
        for c in &cfg.identities {
            // Validated at load; a name that does not parse matches nothing.
            let Ok(name) = ServerName::try_from(c.dns_name.clone()) else { continue };
            let identity = Identity {
                name: Source::Mtls(&c.name).name(),
                rules: Arc::new(Rules::parse(&c.allow, &c.deny)?),
                expires: None,
                tenant: None,
            };
            entries.push((name, identity));
        }
        Ok(Self { entries })
    }

    /// The identity of a verified client certificate chain (end entity first), if one is
    /// configured for it.
    pub fn identify(&self, chain: &[CertificateDer<'_>]) -> Option<Identity> {
        let cert = webpki::EndEntityCert::try_from(chain.first()?).ok()?;
        self.entries
            .iter()
            .find(|(name, _)| cert.verify_is_valid_for_subject_name(name).is_ok())
            .map(|(_, identity)| identity.clone())
    }
}
