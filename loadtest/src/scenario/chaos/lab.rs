//! What a scenario runs and breaks: nats-servers (alone or as a 3-node JetStream cluster,
//! the shared test kit's) that can be `kill -9`ed and restarted on the same port and store,
//! and which node leads a stream; relay processes
//! (`edgerelay run --config`) that can be SIGKILLed, SIGTERMed and restarted, a sampler of the
//! relay's memory, and the [`Lab`] that owns the temporary directory, certificates, token and
//! logs they share. Every child is killed when its handle is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use async_nats::jetstream::stream::Config as StreamSpec;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};

use edgerelay::config::Config;
use edgerelay_testkit::relay_config::write_toml;
use edgerelay_testkit::{dev_certs, NatsOptions, RelayConfigBuilder};
pub use edgerelay_testkit::{NatsCluster, NatsServer};

use crate::procs::{
    admin_get, signal, spawn_logged, Memory, READY_POLL, READY_TIMEOUT, REAP_TIMEOUT,
};

/// How often the relay's memory is sampled.
const RSS_EVERY: Duration = Duration::from_millis(100);

/// The shared ground of one scenario.
pub struct Lab {
    /// Stores, configs and certificates (`<logs>/lab-*`); removed on drop.
    pub dir: tempfile::TempDir,
    /// Where every process logs (kept).
    pub logs: PathBuf,
    pub nats_bin: PathBuf,
    pub relay_bin: PathBuf,
    /// The static token every relay takes (may publish on `chaos.>`).
    pub token: String,
    /// The CA of the relays' certificate.
    pub ca: PathBuf,
    certs: PathBuf,
    /// The relays' `EDGERELAY_LOG` filter: `warn` (chaos reads only problems); the attack suite
    /// counts the lines a production relay writes, at `info`.
    pub relay_log_filter: &'static str,
}

/// A relay process, restartable with the same config (and so the same ports).
pub struct Relay {
    pub name: String,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    config: PathBuf,
    bin: PathBuf,
    log: PathBuf,
    log_filter: &'static str,
    child: Option<Child>,
    /// The running process's pid (0 when none), for the memory sampler.
    pid: Arc<AtomicU32>,
}

/// Samples a relay's memory until dropped or stopped; survives restarts (it follows the pid).
pub struct RssSampler {
    max_rss_kib: Arc<AtomicU64>,
    max_hwm_kib: Arc<AtomicU64>,
    done: watch::Sender<bool>,
}

impl Lab {
    /// A fresh directory, certificates for `localhost`/`127.0.0.1` and a token; logs under
    /// `logs`.
    pub fn new(nats_bin: &Path, relay_bin: &Path, logs: PathBuf) -> anyhow::Result<Self> {
        ensure!(
            relay_bin.exists(),
            "relay binary {} not found: build it (cargo build -p edgerelay) or pass --relay-bin",
            relay_bin.display()
        );
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        // Logs are appended to (a process restarted within the run keeps one log); an earlier
        // run's logs in the same directory go first.
        for entry in std::fs::read_dir(&logs)?.flatten() {
            if entry.path().extension().is_some_and(|x| x == "log") {
                std::fs::remove_file(entry.path())?;
            }
        }
        // Under the log directory, so every child's command line names the run's directory.
        let dir = tempfile::Builder::new().prefix("lab-").tempdir_in(&logs)?;
        let certs = dir.path().join("certs");
        dev_certs(&certs).context("generating the relay's certificates")?;
        Ok(Lab {
            ca: certs.join("ca.pem"),
            certs,
            dir,
            logs,
            nats_bin: nats_bin.to_owned(),
            relay_bin: relay_bin.to_owned(),
            token: format!("chaos-{:016x}", crate::events::nonce()),
            relay_log_filter: "warn",
        })
    }

    /// Starts one nats-server (JetStream, its own store, restartable on the same port and
    /// store) and waits for its port.
    pub async fn nats(&self, name: &str) -> anyhow::Result<NatsServer> {
        let log = Some(self.logs.join(format!("{name}.log")));
        let mut server =
            NatsServer::launch(NatsOptions { name: name.into(), log, ..self.nats_options() })?;
        server.ready().await?;
        Ok(server)
    }

    /// Starts a 3-node cluster (routes between all, JetStream on each) and waits until
    /// JetStream is healthy on every node (a meta leader is elected).
    pub async fn cluster(&self, name: &str) -> anyhow::Result<NatsCluster> {
        let options = NatsOptions { log: Some(self.logs.clone()), ..self.nats_options() };
        let mut cluster = NatsCluster::launch(name, options)?;
        cluster.ready().await?;
        Ok(cluster)
    }

    /// The lab's binary and directory for a nats-server.
    fn nats_options(&self) -> NatsOptions {
        NatsOptions {
            dir: Some(self.dir.path().to_owned()),
            bin: Some(self.nats_bin.clone()),
            ..NatsOptions::default()
        }
    }

    /// A relay config with the lab's defaults: id `chaos-NAME` (also its NATS client name),
    /// HTTPS and admin on free ports with the lab's certificate, NATS at `nats_urls` with short
    /// timeouts (connect and ack 500 ms, publish deadline 2 s), stream `CHAOS` on `chaos.>`
    /// (R1, created), 200 000 idempotency keys, no audit, and the lab's token on `chaos.>`.
    /// A scenario changes what it needs on the returned config.
    pub fn relay_config(&self, name: &str, nats_urls: Vec<String>) -> Config {
        let id = format!("chaos-{name}");
        RelayConfigBuilder::for_nats(nats_urls)
            .id(&id)
            .certs_in(&self.certs)
            .free_ports()
            .stream("CHAOS", &["chaos.>"])
            .no_tokens()
            .token("chaos", &self.token, &["chaos.>"], &[])
            .with(|c| {
                c.relay.shutdown_grace_ms = 10_000;
                c.nats.client_name = id;
                c.nats.connect_timeout_ms = 500;
                c.nats.ack_timeout_ms = 500;
                c.nats.publish_deadline_ms = 2_000;
                c.idempotency.max_keys = 200_000;
                c.audit.enabled = false;
            })
            .build()
    }

    /// Writes `config` (from [`Lab::relay_config`]) as `relay-NAME.toml`, starts the relay
    /// on it (logging to `relay-NAME.log`) and waits for `/readyz`.
    pub async fn relay(&self, name: &str, config: &Config) -> anyhow::Result<Relay> {
        let path = self.dir.path().join(format!("relay-{name}.toml"));
        write_toml(config, &path)?;
        let mut relay = Relay {
            name: name.to_owned(),
            https: config.https.listen,
            admin: config.admin.listen,
            config: path,
            bin: self.relay_bin.clone(),
            log: self.logs.join(format!("relay-{name}.log")),
            log_filter: self.relay_log_filter,
            child: None,
            pid: Arc::new(AtomicU32::new(0)),
        };
        relay.start().await?;
        Ok(relay)
    }
}

impl Relay {
    /// Where the load goes.
    pub fn target(&self, lab: &Lab) -> super::ledger::Target {
        super::ledger::Target { addr: self.https, ca: lab.ca.clone(), token: lab.token.clone() }
    }

    /// The file the relay's output (its log) is appended to.
    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::Relaxed) {
            0 => None,
            pid => Some(pid),
        }
    }

    /// Starts the process with its config and waits for `/readyz` (bounded).
    pub async fn start(&mut self) -> anyhow::Result<()> {
        ensure!(self.child.is_none(), "relay {} is already running", self.name);
        let mut command = Command::new(&self.bin);
        command.args(["run", "--config"]).arg(&self.config).env("EDGERELAY_LOG", self.log_filter);
        let child = spawn_logged(&format!("relay {}", self.name), &mut command, &self.log)?;
        self.pid.store(child.id().unwrap_or(0), Ordering::Relaxed);
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if matches!(admin_get(self.admin, "/readyz").await, Ok((200, _))) {
                return Ok(());
            }
            if let Some(status) = self.try_exit()? {
                bail!("relay {} exited ({status}); see {}", self.name, self.log.display());
            }
            ensure!(
                Instant::now() < deadline,
                "relay {} not ready after {READY_TIMEOUT:?}; see {}",
                self.name,
                self.log.display()
            );
            sleep(READY_POLL).await;
        }
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            self.pid.store(0, Ordering::Relaxed);
            child.start_kill().context("SIGKILL")?;
            timeout(REAP_TIMEOUT, child.wait()).await.context("reaping the relay")??;
        }
        Ok(())
    }

    /// SIGTERM: the relay drains and exits on its own; see [`Relay::wait_exit`].
    pub fn term(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("the relay is not running")?;
        signal(pid, "TERM")
    }

    /// Waits up to `within` for the process to exit; SIGKILLs it if it does not. Returns its
    /// status and how long it took, or `None` if it had to be killed.
    pub async fn wait_exit(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<Option<(ExitStatus, Duration)>> {
        let Some(child) = self.child.as_mut() else { return Ok(None) };
        let started = Instant::now();
        match timeout(within, child.wait()).await {
            Ok(status) => {
                self.child = None;
                self.pid.store(0, Ordering::Relaxed);
                Ok(Some((status?, started.elapsed())))
            }
            Err(_) => {
                self.kill9().await?;
                Ok(None)
            }
        }
    }

    fn try_exit(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        let Some(child) = &mut self.child else { return Ok(None) };
        let status = child.try_wait()?;
        if status.is_some() {
            self.child = None;
            self.pid.store(0, Ordering::Relaxed);
        }
        Ok(status)
    }

    /// Samples this relay's memory (across restarts) until the sampler is stopped.
    pub fn sample_memory(&self) -> RssSampler {
        let (done, mut stop) = watch::channel(false);
        let (rss, hwm) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (max_rss, max_hwm, pid) = (rss.clone(), hwm.clone(), self.pid.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RSS_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|d| *d) => return,
                }
                let pid = pid.load(Ordering::Relaxed);
                if let Some(m) = (pid != 0).then(|| Memory::of(pid)).flatten() {
                    max_rss.fetch_max(m.rss_kib, Ordering::Relaxed);
                    max_hwm.fetch_max(m.hwm_kib, Ordering::Relaxed);
                }
            }
        });
        RssSampler { max_rss_kib: rss, max_hwm_kib: hwm, done }
    }
}

impl RssSampler {
    /// The highest values sampled so far: the largest `VmRSS` seen, and the largest `VmHWM`
    /// (the kernel's own peak, which catches spikes between samples).
    pub fn max(&self) -> Memory {
        Memory {
            rss_kib: self.max_rss_kib.load(Ordering::Relaxed),
            hwm_kib: self.max_hwm_kib.load(Ordering::Relaxed),
        }
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        let _ = self.done.send(true);
    }
}

/// The index of the node that leads `stream` now (`$JS.API.STREAM.INFO.<stream>` →
/// `cluster.leader`), asked through a running node; retried while a leader is elected.
pub async fn leader(cluster: &NatsCluster, stream: &str) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let asked = async {
            let client =
                async_nats::connect(cluster.any_url().context("no node is running")?.as_str())
                    .await?;
            let reply = client.request(format!("$JS.API.STREAM.INFO.{stream}"), "".into()).await?;
            let info: serde_json::Value = serde_json::from_slice(&reply.payload)?;
            let leader = info["cluster"]["leader"].as_str().unwrap_or_default().to_owned();
            anyhow::Ok(leader)
        };
        if let Ok(Ok(leader)) = timeout(Duration::from_secs(3), asked).await {
            if let Some(i) = cluster.nodes.iter().position(|n| n.name() == leader) {
                return Ok(i);
            }
        }
        ensure!(Instant::now() < deadline, "stream {stream} has no leader");
        sleep(Duration::from_millis(200)).await;
    }
}

/// Creates `spec` as a stream through `nats_url` (for scenarios that need a stream the relay
/// would not create itself, e.g. one with `max_msgs` and discard-new).
pub async fn create_stream(nats_url: &str, spec: StreamSpec) -> anyhow::Result<()> {
    let client = async_nats::connect(nats_url).await.context("connecting to create a stream")?;
    let js = async_nats::jetstream::new(client);
    let name = spec.name.clone();
    js.create_stream(spec).await.with_context(|| format!("creating stream {name}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use edgerelay_testkit::relay_config::to_toml;

    use super::*;

    #[test]
    fn the_relay_config_is_valid_and_reads_back_as_built() {
        let logs = tempfile::tempdir().unwrap();
        let any_file = std::env::current_exe().unwrap();
        let lab = Lab::new(Path::new("nats-server"), &any_file, logs.path().to_owned()).unwrap();
        let mut config = lab.relay_config("r1", vec!["nats://127.0.0.1:4222".into()]);
        config.relay.max_subject_bytes = 128;
        config.stream.replicas = 3;
        config.stream.create = false;
        config.nats.max_inflight_batches = 4;
        config.batch.max_events = 1;
        config.validate().unwrap();
        let read = Config::parse(&to_toml(&config)).unwrap();
        assert_eq!(read, config);
        assert_eq!(
            (read.relay.id.as_str(), read.nats.client_name.as_str()),
            ("chaos-r1", "chaos-r1")
        );
        assert_eq!(read.relay.max_subject_bytes, 128);
        assert_eq!((read.stream.replicas, read.stream.create), (3, false));
        assert_eq!(read.nats.publish_deadline_ms, 2_000);
        assert_eq!((read.nats.max_inflight_batches, read.batch.max_events), (4, 1));
        assert_eq!(read.auth.static_tokens.len(), 1);
        assert_eq!(read.auth.static_tokens[0].token, lab.token);
        assert_eq!(read.https.tls_cert, lab.certs.join("cert.pem"));
        assert_ne!(read.https.listen.port(), 0);
        assert!(!read.audit.enabled);
    }
}
