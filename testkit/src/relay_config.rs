//! The relay's configuration for tests: the real [`Config`] with test defaults, changed through
//! typed setters or plain field access, and written as TOML (`toml::to_string`) for tests that
//! run the `edgerelay` binary. A test never writes relay TOML by hand, so a renamed field
//! breaks the build, not a test at run time.

use std::path::Path;

use anyhow::Context as _;
use edgerelay::auth::config::StaticToken;
use edgerelay::config::Config;
use edgerelay_ops::dev_certs::DevCerts;

use crate::ports::{free_port, free_shared_port, local};

/// The static token of [`RelayConfigBuilder::new`]: identity `edge-test`, may publish on
/// `edge.>`.
pub const TOKEN: &str = "test-token-edge-0001";

/// Builds a relay [`Config`] for a test.
#[derive(Clone, Debug)]
#[must_use]
pub struct RelayConfigBuilder {
    config: Config,
}

impl RelayConfigBuilder {
    /// The test defaults: relay `test-relay` with a 5 s shutdown grace, HTTPS and admin on
    /// `127.0.0.1:0` (QUIC off), NATS at `nats_url` with a 2 s connect timeout, the default
    /// stream (`EDGE` on `edge.>`), and one static token, [`TOKEN`] (`edge-test`, `edge.>`).
    /// Certificates are still to be named ([`RelayConfigBuilder::certs_in`]).
    pub fn new(nats_url: &str) -> Self {
        Self::for_nats(vec![nats_url.to_owned()])
    }

    /// [`RelayConfigBuilder::new`] with NATS at `nats_urls`: several servers of one cluster,
    /// or none for a test that names `[[nats.clusters]]` itself.
    pub fn for_nats(nats_urls: Vec<String>) -> Self {
        let mut config = Config::default();
        config.relay.id = "test-relay".into();
        config.relay.shutdown_grace_ms = 5_000;
        config.https.listen = local(0);
        config.admin.listen = local(0);
        config.nats.urls = nats_urls;
        config.nats.connect_timeout_ms = 2_000;
        config.auth.static_tokens = vec![static_token("edge-test", TOKEN, &["edge.>"], &[])];
        Self { config }
    }

    /// The relay's id (`relay.id`: batch ids and the NATS client name start with it).
    pub fn id(mut self, id: &str) -> Self {
        self.config.relay.id = id.into();
        self
    }

    /// The HTTPS certificate and key: `cert.pem` and `key.pem` in `dir` (as
    /// [`DevCerts::write`] and `edgerelay dev-certs` name them).
    pub fn certs_in(mut self, dir: &Path) -> Self {
        self.config.https.tls_cert = dir.join("cert.pem");
        self.config.https.tls_key = dir.join("key.pem");
        self
    }

    /// A QUIC listener on `127.0.0.1:0`.
    pub fn quic(mut self) -> Self {
        self.config.quic.listen = Some(local(0));
        self
    }

    /// The stream `name` on `subjects`.
    pub fn stream(mut self, name: &str, subjects: &[&str]) -> Self {
        self.config.stream.name = name.into();
        self.config.stream.subjects = subjects.iter().map(|&s| s.into()).collect();
        self
    }

    /// Another static token: `name` with `token` may publish on `allow` except `deny`.
    pub fn token(mut self, name: &str, token: &str, allow: &[&str], deny: &[&str]) -> Self {
        self.config.auth.static_tokens.push(static_token(name, token, allow, deny));
        self
    }

    /// No static token (add others with [`RelayConfigBuilder::token`]).
    pub fn no_tokens(mut self) -> Self {
        self.config.auth.static_tokens.clear();
        self
    }

    /// Every listener on a free loopback port instead of port 0, for a relay process whose
    /// addresses the test must know beforehand (QUIC's on a port free for UDP and TCP).
    pub fn free_ports(mut self) -> Self {
        self.config.https.listen = local(free_port());
        self.config.admin.listen = local(free_port());
        if self.config.quic.listen.is_some() {
            self.config.quic.listen = Some(local(free_shared_port()));
        }
        self
    }

    /// Any other change, on the config itself.
    pub fn with(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(&mut self.config);
        self
    }

    pub fn build(self) -> Config {
        self.config
    }
}

/// A static token: `name` with `token` may publish on `allow` except `deny`.
pub fn static_token(name: &str, token: &str, allow: &[&str], deny: &[&str]) -> StaticToken {
    StaticToken {
        name: name.into(),
        token: token.into(),
        allow: allow.iter().map(|&s| s.into()).collect(),
        deny: deny.iter().map(|&s| s.into()).collect(),
    }
}

/// `config` as the TOML file the relay reads.
///
/// # Panics
/// If the config tree cannot be written as TOML (a bug in its `Serialize`).
pub fn to_toml(config: &Config) -> String {
    toml::to_string(config).expect("the relay's Config serializes as TOML")
}

/// Writes `config` as TOML to `path`, readable by its owner only (it holds tokens; the relay
/// warns about a config other users can read).
pub fn write_toml(config: &Config, path: &Path) -> anyhow::Result<()> {
    edgerelay_ops::private_file::write(path, to_toml(config))
        .with_context(|| format!("writing {}", path.display()))
}

/// Fresh development certificates for `localhost` and `127.0.0.1` (a CA and a server
/// certificate), written into `dir` as `ca.pem`, `cert.pem` and `key.pem`.
pub fn dev_certs(dir: &Path) -> anyhow::Result<DevCerts> {
    let certs =
        edgerelay_ops::dev_certs::generate_dev_certs(&["localhost".into(), "127.0.0.1".into()])
            .context("generating development certificates")?;
    certs.write(dir).with_context(|| format!("writing certificates to {}", dir.display()))?;
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use edgerelay::ingest::config::AckMode;

    use super::*;

    #[test]
    fn the_defaults_with_certificates_are_a_valid_config() {
        let dir = tempfile::tempdir().unwrap();
        dev_certs(dir.path()).unwrap();
        let config = RelayConfigBuilder::new("nats://127.0.0.1:4222").certs_in(dir.path()).build();
        config.validate().unwrap();
        assert_eq!(config.relay.id, "test-relay");
        assert_eq!(config.https.listen, local(0));
        assert_eq!(config.quic.listen, None);
        assert_eq!(config.auth.static_tokens[0].token, TOKEN);
    }

    #[test]
    fn the_written_toml_reads_back_as_the_same_config() {
        let dir = tempfile::tempdir().unwrap();
        dev_certs(dir.path()).unwrap();
        let config = RelayConfigBuilder::new("nats://127.0.0.1:4222")
            .id("round-trip")
            .certs_in(dir.path())
            .quic()
            .free_ports()
            .stream("SMOKE", &["edge.>", "more.>"])
            .token("other", "tok\"en-with-a-quote-01", &["edge.other.>"], &["edge.other.x"])
            .with(|c| {
                c.relay.ack_mode = AckMode::Spooled;
                c.spool.enabled = true;
                c.spool.dir = dir.path().join("spool");
                c.nats.token = Some("nats-token".into());
                c.batch.max_events = 8;
            })
            .build();
        let path = dir.path().join("relay.toml");
        write_toml(&config, &path).unwrap();
        let read = Config::load(&path).unwrap();
        assert_eq!(read, config);
        assert_eq!(read.relay.id, "round-trip");
        assert_eq!(read.relay.ack_mode, AckMode::Spooled);
        assert_eq!(read.https.listen, config.https.listen);
        assert_ne!(read.https.listen.port(), 0);
        assert_ne!(read.quic.listen.map(|a| a.port()), Some(0));
        assert_eq!(read.stream.subjects, ["edge.>", "more.>"]);
        assert_eq!(read.auth.static_tokens[1].token, "tok\"en-with-a-quote-01");
        assert_eq!(read.auth.static_tokens[1].deny, ["edge.other.x"]);
        assert_eq!(read.nats.token.as_deref(), Some("nats-token"));
        assert_eq!(read.batch.max_events, 8);
    }

    #[test]
    fn without_tokens_there_are_none_but_those_added() {
        let config =
            RelayConfigBuilder::new("nats://x").no_tokens().token("a", "t", &["a.>"], &[]).build();
        let names: Vec<&str> = config.auth.static_tokens.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a"]);
    }
}
