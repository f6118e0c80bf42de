//! `edgerelay dev-certs`: a throw-away CA and a server certificate signed by it, for the demo
//! and the tests. Never for production: the CA's key is discarded, nothing is revoked.

use std::path::{Path, PathBuf};

/// Development certificates, PEM-encoded.
#[derive(Clone, Debug)]
pub struct DevCerts {
    pub ca_cert: String,
    pub server_cert: String,
    pub server_key: String,
}

/// Why development certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DevCertsError {
    /// Generating the certificates failed.
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing them failed.
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

impl DevCerts {
    /// Writes `ca.pem`, `cert.pem` and `key.pem` into `dir`; `key.pem` is created with mode
    /// 0600 ([`crate::private_file`]).
    pub fn write(&self, dir: &Path) -> Result<(), DevCertsError> {
        let failed = |path: PathBuf| move |source| DevCertsError::Write { path, source };
        std::fs::create_dir_all(dir).map_err(failed(dir.into()))?;
        for (name, text) in [("ca.pem", &self.ca_cert), ("cert.pem", &self.server_cert)] {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(failed(path))?;
        }
        let key = dir.join("key.pem");
        crate::private_file::write(&key, &self.server_key).map_err(failed(key))
    }
}

/// Generates a CA and a server certificate for `names` (DNS names or IP addresses).
pub fn generate_dev_certs(names: &[String]) -> Result<DevCerts, DevCertsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "edgerelay dev CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, "edgerelay dev server");
    let cert = params.signed_by(&key, &issuer)?;
    Ok(DevCerts {
        ca_cert: ca_cert.pem(),
        server_cert: cert.pem(),
        server_key: key.serialize_pem(),
    })
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_key_is_owner_only_and_the_certificates_are_not_secret() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        generate_dev_certs(&["localhost".into()]).unwrap().write(&out).unwrap();
        let mode = |name| std::fs::metadata(out.join(name)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("key.pem"), 0o600);
        assert!(std::fs::read_to_string(out.join("key.pem")).unwrap().contains("PRIVATE KEY"));
        assert_eq!(mode("cert.pem") & 0o600, 0o600);
    }
}
