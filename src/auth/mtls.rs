//! Client certificates as identities (edge collectors). rustls has already checked that the
//! certificate chains to `auth.mtls.ca_file`; here a certificate is matched to a configured
//! identity by a DNS subject alternative name it carries.
//!
//! A certificate with a wildcard DNS name (`*.edge.example.com`) is no identity at all: it
//! would match every configured identity under that domain, so one certificate could speak
//! for all the collectors of a region. It is refused (logged with the name), and its
//! connection needs a token like one without a certificate.

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
        if let Some(wildcard) = cert.valid_dns_names().find(|n| n.contains('*')) {
            tracing::warn!(
                dns_name = wildcard,
                "client certificate refused as an identity: a wildcard DNS name would match \
                 every identity under its domain"
            );
            return None;
        }
        self.entries
            .iter()
            .find(|(name, _)| cert.verify_is_valid_for_subject_name(name).is_ok())
            .map(|(_, identity)| identity.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::config::CertIdentity;

    fn identities() -> CertIdentities {
        let identity = |name: &str, dns_name: &str| CertIdentity {
            name: name.into(),
            dns_name: dns_name.into(),
            allow: vec!["edge.collector.>".into()],
            deny: vec![],
        };
        CertIdentities::new(&MtlsConfig {
            identities: vec![
                identity("fra1", "collector-fra1.edge.test"),
                identity("ams1", "collector-ams1.edge.test"),
            ],
            ..Default::default()
        })
        .unwrap()
    }

    fn cert(dns_names: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let names = dns_names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let params = rcgen::CertificateParams::new(names).unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_certificate_is_the_identity_of_its_dns_name_but_never_a_wildcard() {
        let ids = identities();
        // (DNS names the certificate carries, identity it gets)
        let cases: [(&[&str], Option<&str>); 6] = [
            (&["collector-fra1.edge.test"], Some("mtls:fra1")),
            (&["collector-ams1.edge.test"], Some("mtls:ams1")),
            (&["collector-xyz.edge.test"], None),
            // A wildcard would match both identities: it gets none.
            (&["*.edge.test"], None),
            // Also beside an exact name: the certificate as a whole is refused.
            (&["collector-fra1.edge.test", "*.edge.test"], None),
            (&["*.edge.test", "collector-fra1.edge.test"], None),
        ];
        for (names, expected) in cases {
            let got = ids.identify(&[cert(names)]).map(|id| id.name);
            assert_eq!(got.as_deref(), expected, "{names:?}");
        }
        assert!(ids.identify(&[]).is_none());
    }
}
