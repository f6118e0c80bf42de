//! Client certificates as identities: a collector's certificate, signed by the configured CA
//! and carrying a configured DNS name, publishes without a token over HTTPS, HTTP/3 and QUIC;
//! other certificates and no credentials are refused.

use bytes::Bytes;
use edgerelay::auth::config::{CertIdentity, MtlsConfig};
use edgerelay_client::{ClientConfig, H3Client};
use edgerelay_ops::dev_certs::DevCerts;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

use crate::support::*;

/// A CA and a client certificate for `dns_name` signed by it: (ca, cert, key) PEM.
pub(crate) fn client_pki(dns_name: &str) -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "collectors CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![dns_name.to_owned()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// An HTTP/2 client trusting the relay's certificates `server` and presenting `cert`/`key`.
fn h2_with_cert(server: &DevCerts, cert: &str, key: &str) -> reqwest::Client {
    let tls = client_tls(server, cert, key);
    reqwest::Client::builder().use_preconfigured_tls(tls).http2_prior_knowledge().build().unwrap()
}

/// A TLS client config (ALPN h2) trusting the relay's certificates `server` and presenting
/// `cert`/`key`.
pub(crate) fn client_tls(server: &DevCerts, cert: &str, key: &str) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let server_side = tls_client_config(server, b"h2");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(server.ca_cert.as_bytes()).unwrap()).unwrap();
    let chain =
        CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(edgerelay::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap())
        .unwrap();
    tls.alpn_protocols = server_side.alpn_protocols;
    tls
}

/// Where and how a QUIC or HTTP/3 client reaches `relay`, presenting `cert`/`key`, no token.
pub(crate) fn quic_config(setup: &Setup, relay: &TestRelay, cert: &str, key: &str) -> ClientConfig {
    ClientConfig {
        client_cert: Some((cert.to_owned(), key.to_owned())),
        ..setup.client_config(relay, "")
    }
}

/// A relay taking certificates of a fresh collectors CA for `collector-fra1.edge.test` (on
/// `edge.collector.>`), and a client certificate of that CA for `cert_name`: (cert, key).
pub(crate) fn collector_setup(nats: &NatsServer, cert_name: &str) -> (Setup, String, String) {
    let mut setup = Setup::new(&nats.url());
    let (ca, cert, key) = client_pki(cert_name);
    let ca_file = setup.dir.path().join("collectors-ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    setup.config.auth.mtls = Some(MtlsConfig {
        ca_file,
        identities: vec![CertIdentity {
            name: "collector-fra1".into(),
            dns_name: "collector-fra1.edge.test".into(),
            allow: vec!["edge.collector.>".into()],
            deny: vec![],
        }],
    });
    (setup, cert, key)
}

/// A running relay of [`collector_setup`], its client certificate (`cert`, `key`) and an
/// HTTP/2 client presenting it.
struct Collector {
    nats: NatsServer,
    setup: Setup,
    relay: TestRelay,
    h2: reqwest::Client,
    cert: String,
    key: String,
}

/// The [`Collector`] whose client certificate names `cert_name`.
async fn collector(cert_name: &str) -> Collector {
    let nats = NatsServer::start();
    let (setup, cert, key) = collector_setup(&nats, cert_name);
    let relay = setup.start().await;
    let h2 = h2_with_cert(&setup.certs, &cert, &key);
    Collector { nats, setup, relay, h2, cert, key }
}

#[tokio::test]
async fn a_collector_certificate_is_an_identity_on_https_h3_and_quic() {
    let Collector { nats, setup, relay, h2, cert, key } =
        collector("collector-fra1.edge.test").await;

    // HTTPS: no Authorization header, the certificate speaks.
    let ok = h2.post(relay.url("/v1/publish/edge.collector.cpu")).body("42").send().await.unwrap();
    assert_eq!(ok.status(), 202);
    let other = h2.post(relay.url("/v1/publish/edge.other.cpu")).body("42").send().await.unwrap();
    assert_eq!(error_code(other).await, (403, "forbidden".into()));
    // A bearer token wins over the certificate.
    let with_token = relay.publish(&h2, "edge.other.x", "t").send().await.unwrap();
    assert_eq!(with_token.status(), 202);

    // HTTP/3 and the native protocol on the QUIC port.
    let h3 = H3Client::connect(quic_config(&setup, &relay, &cert, &key)).await.unwrap();
    let (status, _, _) =
        h3.post("/v1/publish/edge.collector.h3", &[], Bytes::from_static(b"1")).await.unwrap();
    assert_eq!(status, 202);
    let quic =
        edgerelay_client::Client::connect(quic_config(&setup, &relay, &cert, &key)).await.unwrap();
    let answer =
        quic.publish(vec![edgerelay_client::event("edge.collector.quic", "1")]).await.unwrap();
    assert!(answer.error.is_none(), "{answer:?}");

    // Without a certificate or token: 401; with a certificate from another CA: no TLS at all.
    let anonymous =
        relay.h2.post(relay.url("/v1/publish/edge.collector.cpu")).body("x").send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let (_, rogue_cert, rogue_key) = client_pki("collector-fra1.edge.test");
    let rogue = h2_with_cert(&setup.certs, &rogue_cert, &rogue_key);
    assert!(rogue
        .post(relay.url("/v1/publish/edge.collector.cpu"))
        .body("x")
        .send()
        .await
        .is_err());

    let stored = read_stream(&nats.url()).await;
    let publishers: Vec<_> =
        stored.iter().flat_map(|m| m.batch.events.iter().map(|e| e.publisher.as_str())).collect();
    assert_eq!(
        publishers.iter().filter(|p| **p == "mtls:collector-fra1").count(),
        3,
        "{publishers:?}"
    );
}

#[tokio::test]
async fn a_certificate_without_a_configured_name_needs_a_token() {
    let Collector { nats: _nats, setup: _setup, relay, h2, .. } =
        collector("unknown.edge.test").await;
    let resp = h2.post(relay.url("/v1/publish/edge.collector.cpu")).body("x").send().await.unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn a_wildcard_certificate_is_no_identity_on_https_and_quic() {
    // Signed by the configured CA, and `*.edge.test` would match `collector-fra1.edge.test`.
    let Collector { nats, setup, relay, h2, cert, key } = collector("*.edge.test").await;
    let resp = h2.post(relay.url("/v1/publish/edge.collector.cpu")).body("x").send().await.unwrap();
    assert_eq!(error_reason(resp).await, (401, "missing_token".into()));
    let quic =
        edgerelay_client::Client::connect(quic_config(&setup, &relay, &cert, &key)).await.unwrap();
    let answer =
        quic.publish(vec![edgerelay_client::event("edge.collector.quic", "1")]).await.unwrap();
    let error = answer.error.expect("refused");
    // A native stream stands on its certificate until it sends a token: that proves nothing.
    assert_eq!(
        (error.code.as_str(), error.reason.as_str()),
        ("unauthorized", "unknown_certificate")
    );
    // With a token the connection is served as any other.
    assert_eq!(relay.publish(&h2, "edge.other.x", "t").send().await.unwrap().status(), 202);
    let stored = read_stream(&nats.url()).await;
    let publishers: Vec<_> =
        stored.iter().flat_map(|m| m.batch.events.iter().map(|e| e.publisher.as_str())).collect();
    assert_eq!(publishers, ["static:edge-test"]);
}

/// Publishes one event on `edge.collector.reload` over HTTPS: the status, or `None` when the TLS
/// handshake (or the connection) failed.
async fn collector_publish(client: &reqwest::Client, relay: &TestRelay) -> Option<u16> {
    let url = relay.url("/v1/publish/edge.collector.reload");
    client.post(url).body("1").send().await.ok().map(|r| r.status().as_u16())
}

#[tokio::test]
async fn the_client_ca_and_server_certificate_reload_on_https_h3_and_quic() {
    let Collector { nats: _nats, setup, relay, h2: before, cert, key } =
        collector("collector-fra1.edge.test").await;
    assert_eq!(collector_publish(&before, &relay).await, Some(202));

    // A new collectors CA, and a new server certificate from a new server CA.
    let (ca2, cert2, key2) = client_pki("collector-fra1.edge.test");
    let mut cfg = setup.config.clone();
    let mtls = cfg.auth.mtls.as_mut().unwrap();
    mtls.ca_file = setup.dir.path().join("collectors-ca-2.pem");
    std::fs::write(&mtls.ca_file, ca2).unwrap();
    let server_dir = setup.dir.path().join("server-2");
    let server =
        edgerelay_ops::dev_certs::generate_dev_certs(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
    server.write(&server_dir).unwrap();
    cfg.https.tls_cert = server_dir.join("cert.pem");
    cfg.https.tls_key = server_dir.join("key.pem");
    let r = relay.reload(cfg.clone()).await.unwrap();
    assert!(r.certificate, "{r}");
    assert_eq!(r.fields, ["auth.mtls.ca_file", "https.tls_cert", "https.tls_key"]);

    // The connection made before keeps its (already checked) identity; new handshakes meet the
    // new server certificate and the new collectors CA.
    assert_eq!(collector_publish(&before, &relay).await, Some(202));
    assert_eq!(collector_publish(&h2_with_cert(&setup.certs, &cert2, &key2), &relay).await, None);
    assert_eq!(collector_publish(&h2_with_cert(&server, &cert, &key), &relay).await, None);
    let after = h2_with_cert(&server, &cert2, &key2);
    assert_eq!(collector_publish(&after, &relay).await, Some(202));
    let quic_cfg = |server: &DevCerts, cert: &str, key: &str| ClientConfig {
        ca_pem: Some(server.ca_cert.clone()),
        ..quic_config(&setup, &relay, cert, key)
    };
    let h3 = H3Client::connect(quic_cfg(&server, &cert2, &key2)).await.unwrap();
    let (status, _, _) =
        h3.post("/v1/publish/edge.collector.h3", &[], Bytes::from_static(b"1")).await.unwrap();
    assert_eq!(status, 202);
    let quic = edgerelay_client::Client::connect(quic_cfg(&server, &cert2, &key2)).await.unwrap();
    let answer =
        quic.publish(vec![edgerelay_client::event("edge.collector.quic", "1")]).await.unwrap();
    assert!(answer.error.is_none(), "{answer:?}");
    assert!(edgerelay_client::Client::connect(quic_cfg(&setup.certs, &cert2, &key2))
        .await
        .is_err());

    // A CA file that is not PEM: refused whole, the new CA stays.
    let mut bad = cfg.clone();
    bad.auth.mtls.as_mut().unwrap().ca_file = setup.dir.path().join("key.pem");
    let err = relay.reload(bad).await.unwrap_err().to_string();
    assert!(err.contains("key.pem"), "{err}");
    let again = h2_with_cert(&server, &cert2, &key2);
    assert_eq!(collector_publish(&again, &relay).await, Some(202));

    // mTLS off: no certificate is asked for, so the collector needs a token now.
    let mut off = cfg.clone();
    off.auth.mtls = None;
    relay.reload(off).await.unwrap();
    let no_mtls = h2_with_cert(&server, &cert2, &key2);
    assert_eq!(collector_publish(&no_mtls, &relay).await, Some(401));
    relay.shutdown().await;
}
