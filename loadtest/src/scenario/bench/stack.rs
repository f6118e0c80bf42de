//! The processes a benchmark measures, all on 127.0.0.1: one nats-server with JetStream (the
//! test kit's, a fresh store under the output directory), relays whose config is a typed
//! [`edgerelay::config::Config`] written out as TOML, and the development IdP. Children are
//! killed and the JetStream store (every event sent: gigabytes after a long run) deleted
//! however the benchmark ends.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context as _};
use edgerelay::auth::config::StaticToken;
use edgerelay::config::Config;
use tokio::process::Command;
use tokio::sync::watch;

use super::rounds::Launch;
use super::Binaries;
use edgerelay_testkit::{free_port, local, NatsOptions, NatsServer};

use crate::procs::{admin_get, relay_bin, wait_ready, Children};

/// nats-server and whatever else a benchmark starts beside it.
pub struct Stack {
    /// The output directory: configs, logs, certificates, the JetStream store.
    out: PathBuf,
    children: Children,
    relay_bin: PathBuf,
    stop: watch::Receiver<bool>,
    /// The static token every relay takes (may publish on `edge.>`).
    pub token: String,
    nats: NatsServer,
    /// nats-server's process id, whose CPU time a run reads.
    pub nats_pid: u32,
}

/// nats-server's name, and so its store's (`out/nats-store`).
const NATS: &str = "nats";

/// A relay the stack started.
#[derive(Clone, Copy, Debug)]
pub struct Relay {
    pub pid: u32,
    pub https: SocketAddr,
    pub quic: Option<SocketAddr>,
    pub admin: SocketAddr,
}

impl Stack {
    /// Empties `out`, writes the development certificates to `out/certs` and starts
    /// nats-server (its store in `out/nats-store`, logging to `out/nats.log`).
    pub async fn start(
        bins: &Binaries,
        out: &Path,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        let relay_bin = relay_bin(bins.relay_bin.as_deref())?;
        ensure!(
            relay_bin.exists(),
            "no relay binary at {}: build it or pass --relay-bin",
            relay_bin.display()
        );
        if out.exists() {
            std::fs::remove_dir_all(out).with_context(|| format!("emptying {}", out.display()))?;
        }
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        edgerelay_ops::dev_certs::generate_dev_certs(&[
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .and_then(|c| c.write(&out.join("certs")))
        .context("writing the development certificates")?;

        let mut nats = NatsServer::launch(NatsOptions {
            name: NATS.into(),
            log: Some(out.join("nats.log")),
            dir: Some(out.to_owned()),
            bin: Some(bins.nats_server_bin.clone()),
            ..NatsOptions::default()
        })?;
        let nats_pid = nats.pid().context("nats-server has no pid")?;
        nats.ready().await?;
        Ok(Self {
            out: out.to_owned(),
            children: Children::default(),
            relay_bin,
            stop: stop.clone(),
            token: token()?,
            nats,
            nats_pid,
        })
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn nats_url(&self) -> String {
        self.nats.url()
    }

    /// The CA that signed the relays' certificate.
    pub fn ca(&self) -> PathBuf {
        self.out.join("certs/ca.pem")
    }

    /// The config every benchmark's relay starts from: id `bench-NAME`, HTTPS and the admin
    /// listener on free ports, this nats-server, the static token; the rest the defaults.
    pub fn relay_config(&self, name: &str) -> anyhow::Result<Config> {
        let mut config = Config::default();
        config.relay.id = format!("bench-{name}");
        config.https.listen = local(free_port());
        config.https.tls_cert = self.out.join("certs/cert.pem");
        config.https.tls_key = self.out.join("certs/key.pem");
        config.admin.listen = local(free_port());
        config.nats.urls = vec![self.nats_url()];
        config.auth.static_tokens = vec![StaticToken {
            name: "bench".into(),
            token: self.token.clone(),
            allow: vec!["edge.>".into()],
            ..StaticToken::default()
        }];
        Ok(config)
    }

    /// Writes `config` to `out/NAME.toml`, starts a relay on it (`bin`, or the stack's relay
    /// binary) logging to `out/NAME.log`, and waits for its `/readyz`.
    pub async fn start_relay(
        &mut self,
        name: &str,
        config: &Config,
        bin: Option<&Path>,
    ) -> anyhow::Result<Relay> {
        let path = self.out.join(format!("{name}.toml"));
        let text = relay_toml(config)?;
        edgerelay_ops::private_file::write(&path, text)
            .with_context(|| format!("writing {}", path.display()))?;
        let what = format!("the {name} relay");
        self.children.spawn(
            &what,
            Command::new(bin.unwrap_or(&self.relay_bin))
                .args(["run", "--config"])
                .arg(&path)
                .env("EDGERELAY_LOG", "warn"),
            &self.out.join(format!("{name}.log")),
        )?;
        let pid = self.children.pid(&what).with_context(|| format!("{what} has no pid"))?;
        let admin = config.admin.listen;
        self.wait(
            &what,
            || async move { matches!(admin_get(admin, "/readyz").await, Ok((200, _))) },
        )
        .await?;
        Ok(Relay { pid, https: config.https.listen, quic: config.quic.listen, admin })
    }

    /// Starts `edgerelay dev-idp` on a free port and returns its URL once it serves its keys.
    pub async fn start_idp(&mut self) -> anyhow::Result<String> {
        let addr = local(free_port());
        self.children.spawn(
            "the dev IdP",
            Command::new(&self.relay_bin).arg("dev-idp").arg("--listen").arg(addr.to_string()),
            &self.out.join("idp.log"),
        )?;
        self.wait("the dev IdP", || async move {
            matches!(admin_get(addr, "/jwks.json").await, Ok((200, _)))
        })
        .await?;
        Ok(format!("http://{addr}"))
    }

    /// A `loadtest` run against this stack (its token; nats-server's and the relay's CPU).
    pub fn launch<'a>(&'a self, args: &'a [String], stem: PathBuf, relay_pid: u32) -> Launch<'a> {
        Launch {
            args,
            stem,
            token: &self.token,
            relay_pid: Some(relay_pid),
            nats_pid: self.nats_pid,
            limit: None,
        }
    }

    /// Stops every process and deletes the JetStream store.
    pub async fn stop(mut self) {
        self.children.stop().await;
        self.nats.stop();
    }

    async fn wait<F, Fut>(&mut self, what: &str, ready: F) -> anyhow::Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        wait_ready(&mut self.children, &self.out, &self.stop, what, ready).await
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Killed (SIGKILL) as they drop; then their store is of no further use.
        drop(std::mem::take(&mut self.children));
        self.nats.stop();
        let _ = std::fs::remove_dir_all(self.out.join(format!("{NATS}-store")));
    }
}

/// `config` as TOML, without the settings that equal their default: the file shows what the
/// benchmark chose, and an earlier relay binary (`BEFORE_BIN`) reads it with its own defaults
/// even if this build has settings it does not know.
fn relay_toml(config: &Config) -> anyhow::Result<String> {
    let value = |c: &Config| toml::Value::try_from(c).context("writing the relay config as TOML");
    let chosen = without_defaults(value(config)?, &value(&Config::default())?);
    toml::to_string(&chosen.unwrap_or_else(|| toml::Table::new().into()))
        .context("writing the relay config as TOML")
}

/// `value` without what equals `default`, table by table; `None` if nothing differs.
fn without_defaults(value: toml::Value, default: &toml::Value) -> Option<toml::Value> {
    match (value, default) {
        (toml::Value::Table(table), toml::Value::Table(defaults)) => {
            let kept: toml::Table = table
                .into_iter()
                .filter_map(|(key, v)| match defaults.get(&key) {
                    Some(d) => without_defaults(v, d).map(|v| (key, v)),
                    None => Some((key, v)),
                })
                .collect();
            (!kept.is_empty()).then(|| kept.into())
        }
        (value, default) => (value != *default).then_some(value),
    }
}

/// `bench-token-` and 16 random hex digits.
fn token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().fold("bench-token-".to_owned(), |s, b| s + &format!("{b:02x}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_toml_holds_only_what_differs_from_the_defaults() {
        let mut config = Config::default();
        config.relay.id = "bench-x".into();
        config.batch.max_events = 1;
        config.quic.listen = Some(local(4433));
        let text = relay_toml(&config).unwrap();
        let parsed: toml::Table = text.parse().unwrap();
        let tables: Vec<&str> = parsed.keys().map(String::as_str).collect();
        assert_eq!(tables, ["batch", "quic", "relay"], "{text}");
        assert_eq!(parsed["batch"].as_table().unwrap().len(), 1, "{text}");
        // And the relay reads back exactly the config the benchmark built.
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), config);
        assert_eq!(relay_toml(&Config::default()).unwrap(), "");
    }
}
