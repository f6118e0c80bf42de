//! `loadtest relay-config`: prints a relay configuration built from flags with the test kit's
//! [`RelayConfigBuilder`] and serialized from the real [`Config`], so scripts that install a
//! relay (`scripts/systemd-pid1`) write no relay TOML by hand.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use edgerelay::auth::config::StaticToken;
use edgerelay::config::Config;
use edgerelay::ingest::config::AckMode;
use edgerelay_testkit::relay_config::{static_token, to_toml};
use edgerelay_testkit::RelayConfigBuilder;

/// Flags of `loadtest relay-config`. What no flag names keeps the relay's own default.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// `relay.id`.
    #[arg(long, value_name = "ID", default_value = "relay")]
    id: String,

    /// `https.listen`.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443")]
    https_listen: SocketAddr,

    /// `quic.listen` (QUIC off without it).
    #[arg(long, value_name = "ADDR")]
    quic_listen: Option<SocketAddr>,

    /// `admin.listen`.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
    admin_listen: SocketAddr,

    /// `nats.urls`; repeat for several.
    #[arg(long, value_name = "URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: Vec<String>,

    /// `stream.name`.
    #[arg(long, value_name = "NAME", default_value = "EDGE")]
    stream_name: String,

    /// `stream.subjects`; repeat for several.
    #[arg(long, value_name = "SUBJECT", default_value = "edge.>")]
    stream_subject: Vec<String>,

    /// `stream.replicas`.
    #[arg(long, value_name = "N", default_value_t = 1)]
    stream_replicas: usize,

    /// `https.tls_cert`.
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,

    /// `https.tls_key`.
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,

    /// One `[[auth.static_tokens]]`: `NAME:TOKEN:ALLOW[,ALLOW…][:DENY[,DENY…]]`; repeat for
    /// several, in order.
    #[arg(long = "static-token", value_name = "SPEC", value_parser = parse_static_token)]
    static_tokens: Vec<StaticToken>,

    /// `relay.ack_mode`: durable, accepted or spooled.
    #[arg(long, value_name = "MODE", default_value = "durable", value_parser = parse_ack_mode)]
    ack_mode: AckMode,

    /// `spool.enabled = true` (in its default directory).
    #[arg(long)]
    spool: bool,
}

impl Args {
    /// The configuration the flags describe: the test kit's builder, with the relay's own
    /// defaults where the builder has test ones (the shutdown grace).
    pub fn config(&self) -> Config {
        let tokens = self.static_tokens.clone();
        let default_grace = Config::default().relay.shutdown_grace_ms;
        RelayConfigBuilder::new(&self.nats_url[0])
            .id(&self.id)
            .no_tokens()
            .with(|c| {
                c.relay.shutdown_grace_ms = default_grace;
                c.relay.ack_mode = self.ack_mode;
                c.https.listen = self.https_listen;
                c.https.tls_cert.clone_from(&self.tls_cert);
                c.https.tls_key.clone_from(&self.tls_key);
                c.quic.listen = self.quic_listen;
                c.admin.listen = self.admin_listen;
                c.nats.urls.clone_from(&self.nats_url);
                c.stream.name.clone_from(&self.stream_name);
                c.stream.subjects.clone_from(&self.stream_subject);
                c.stream.replicas = self.stream_replicas;
                c.auth.static_tokens = tokens;
                c.spool.enabled = self.spool;
            })
            .build()
    }
}

/// Prints the configuration as TOML on stdout.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let config = args.config();
    config.validate().context("the flags make an invalid relay configuration")?;
    print!("{}", to_toml(&config));
    Ok(())
}

/// Parses `NAME:TOKEN:ALLOW[,ALLOW…][:DENY[,DENY…]]`.
fn parse_static_token(spec: &str) -> Result<StaticToken, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    match parts[..] {
        [name, token, allow] => Ok(static_token(name, token, &list(allow), &[])),
        [name, token, allow, deny] => Ok(static_token(name, token, &list(allow), &list(deny))),
        _ => Err(format!("`{spec}` is not NAME:TOKEN:ALLOW[,ALLOW…][:DENY[,DENY…]]")),
    }
}

/// The comma-separated subject patterns of `part`.
fn list(part: &str) -> Vec<&str> {
    part.split(',').filter(|s| !s.is_empty()).collect()
}

/// Parses `--ack-mode` as the config file spells it.
fn parse_ack_mode(mode: &str) -> Result<AckMode, String> {
    serde_json::from_value(serde_json::Value::String(mode.to_owned()))
        .map_err(|_| format!("`{mode}` is not durable, accepted or spooled"))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use edgerelay_testkit::dev_certs;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn the_printed_config_reads_back_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        dev_certs(dir.path()).unwrap();
        let cert = format!("--tls-cert={}", dir.path().join("cert.pem").display());
        let key = format!("--tls-key={}", dir.path().join("key.pem").display());
        let cli = Cli::try_parse_from([
            "relay-config",
            "--id=pid1test",
            "--quic-listen=127.0.0.1:8443",
            &cert,
            &key,
            "--static-token=edge-dev:pid1-test-token-0123456789abcdef:edge.>:edge.internal.>",
            "--static-token=edge-dev2:pid1-second-token-0123456789abcdef:edge.two.>,edge.2.>",
            "--ack-mode=spooled",
            "--spool",
        ])
        .unwrap();
        let config = cli.args.config();
        let read = Config::parse(&to_toml(&config)).unwrap();
        read.validate().unwrap();
        assert_eq!(read, config);
        assert_eq!(read.relay.id, "pid1test");
        assert_eq!(read.relay.ack_mode, AckMode::Spooled);
        assert_eq!(read.relay.shutdown_grace_ms, Config::default().relay.shutdown_grace_ms);
        assert_eq!(read.https.listen, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(read.quic.listen, Some("127.0.0.1:8443".parse().unwrap()));
        assert_eq!(read.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(read.nats.urls, ["nats://127.0.0.1:4222"]);
        assert_eq!((read.stream.name.as_str(), read.stream.replicas), ("EDGE", 1));
        assert_eq!(read.stream.subjects, ["edge.>"]);
        assert!(read.spool.enabled);
        let tokens = &read.auth.static_tokens;
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens[0].deny, ["edge.internal.>"]);
        assert_eq!(tokens[1].allow, ["edge.two.>", "edge.2.>"]);
        assert!(tokens[1].deny.is_empty());
    }

    #[test]
    fn a_static_token_needs_name_token_and_allow() {
        assert!(parse_static_token("name:token").is_err());
        assert!(parse_static_token("a:b:c:d:e").is_err());
        assert!(parse_ack_mode("eventually").is_err());
    }
}
