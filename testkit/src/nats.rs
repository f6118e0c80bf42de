//! A real nats-server with JetStream for tests: the pinned binary, free loopback ports, its
//! own store, waited for until it accepts connections, killed (and its store removed) when
//! dropped. Alone ([`NatsServer`]) or as a 3-node JetStream cluster ([`NatsCluster`]). Fault
//! tests stop, restart (same port and store) and freeze it.

use std::fs::OpenOptions;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};

use crate::ports::{free_port, local};

/// Longest a server may take to accept connections (or a cluster to elect a JetStream meta
/// leader).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often readiness is polled.
const READY_POLL: Duration = Duration::from_millis(20);

/// Longest one `/healthz` request may take.
const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(1);

/// Nodes in a [`NatsCluster`].
const CLUSTER_NODES: usize = 3;

/// How to start a nats-server; [`Default`] is a lone server with no output kept.
#[derive(Clone, Debug)]
pub struct NatsOptions {
    /// Its `server_name`, also the name of its store (`<dir>/<name>-store`) and config.
    pub name: String,
    /// More configuration (authorization, TLS, operator mode …) in nats-server's format; the
    /// command line adds JetStream, the listen address and the store.
    pub config: String,
    /// Where its output is appended; discarded when `None`.
    pub log: Option<PathBuf>,
    /// Where its store and config file go (kept); a temporary directory removed on drop when
    /// `None`.
    pub dir: Option<PathBuf>,
    /// The binary; [`nats_server_bin`] when `None`.
    pub bin: Option<PathBuf>,
}

/// One nats-server with JetStream on a free loopback port.
#[derive(Debug)]
pub struct NatsServer {
    /// Its client port on 127.0.0.1.
    pub port: u16,
    name: String,
    bin: PathBuf,
    /// The command line after the binary: the same at every start.
    args: Vec<String>,
    log: Option<PathBuf>,
    /// Its monitoring port (`/healthz`), for cluster nodes.
    monitor: Option<u16>,
    child: Option<Child>,
    /// Holds the store when the caller gave no directory; removed after the process is gone.
    _tmp: Option<tempfile::TempDir>,
}

/// Three nats-servers routed into one JetStream cluster.
#[derive(Debug)]
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

/// Where a cluster node finds the others.
struct Routes<'a> {
    cluster: &'a str,
    own: u16,
    all: &'a [u16],
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self { name: "nats".into(), config: String::new(), log: None, dir: None, bin: None }
    }
}

impl NatsServer {
    /// Starts one (blocking until it accepts connections).
    ///
    /// # Panics
    /// If it does not start.
    pub fn start() -> Self {
        Self::start_with(NatsOptions::default())
    }

    /// Starts one with `config` (authorization, TLS, …) besides JetStream, port and store.
    ///
    /// # Panics
    /// If it does not start.
    pub fn start_with_config(config: &str) -> Self {
        Self::start_with(NatsOptions { config: config.into(), ..NatsOptions::default() })
    }

    /// Starts one with `options` (blocking until it accepts connections).
    ///
    /// # Panics
    /// If it does not start.
    pub fn start_with(options: NatsOptions) -> Self {
        let mut server = Self::launch(options).expect("starting nats-server");
        server.wait_ready().expect("nats-server ready");
        server
    }

    /// Spawns one without waiting for it: follow with [`NatsServer::ready`] (async) or
    /// [`NatsServer::wait_ready`] (blocking).
    pub fn launch(options: NatsOptions) -> anyhow::Result<Self> {
        Self::launch_node(options, None)
    }

    fn launch_node(options: NatsOptions, routes: Option<Routes<'_>>) -> anyhow::Result<Self> {
        let (dir, tmp) = match options.dir {
            Some(dir) => (dir, None),
            None => {
                let tmp = tempfile::tempdir().context("creating nats-server's directory")?;
                (tmp.path().to_owned(), Some(tmp))
            }
        };
        let name = options.name;
        let port = free_port();
        let store = dir.join(format!("{name}-store"));
        let mut args = vec!["-n".into(), name.clone(), "-js".into(), "-a".into()];
        args.extend(["127.0.0.1".into(), "-p".into(), port.to_string(), "-sd".into()]);
        args.push(store.to_string_lossy().into_owned());
        if !options.config.is_empty() {
            let conf = dir.join(format!("{name}.conf"));
            std::fs::write(&conf, &options.config)
                .with_context(|| format!("writing {}", conf.display()))?;
            args.extend(["-c".into(), conf.to_string_lossy().into_owned()]);
        }
        let mut monitor = None;
        if let Some(routes) = routes {
            let http = free_port();
            monitor = Some(http);
            let others: Vec<String> = routes
                .all
                .iter()
                .filter(|&&r| r != routes.own)
                .map(|r| format!("nats-route://127.0.0.1:{r}"))
                .collect();
            args.extend(["-m".into(), http.to_string(), "--cluster_name".into()]);
            args.extend([routes.cluster.into(), "--cluster".into()]);
            args.push(format!("nats://127.0.0.1:{}", routes.own));
            args.extend(["--routes".into(), others.join(",")]);
        }
        let mut server = Self {
            port,
            name,
            bin: options.bin.unwrap_or_else(nats_server_bin),
            args,
            log: options.log,
            monitor,
            child: None,
            _tmp: tmp,
        };
        server.spawn()?;
        Ok(server)
    }

    /// `nats://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its `server_name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether its process is running (started and not stopped).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process again on the same port and store (after [`NatsServer::stop`]);
    /// follow with [`NatsServer::ready`] or [`NatsServer::wait_ready`].
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        ensure!(self.child.is_none(), "{} is already running", self.name);
        let (stdout, stderr) = match &self.log {
            Some(log) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .with_context(|| format!("opening {}", log.display()))?;
                (Stdio::from(file.try_clone()?), Stdio::from(file))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new(&self.bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits (blocking) until it accepts connections; fails if it exits first or takes longer
    /// than [`READY_TIMEOUT`].
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let listening = TcpStream::connect(local(self.port)).is_ok();
            if self.readiness(listening, deadline)? {
                return Ok(());
            }
            std::thread::sleep(READY_POLL);
        }
    }

    /// Waits (without blocking the runtime) until it accepts connections; fails if it exits
    /// first or takes longer than [`READY_TIMEOUT`].
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let listening = tokio::net::TcpStream::connect(local(self.port)).await.is_ok();
            if self.readiness(listening, deadline)? {
                return Ok(());
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// The readiness rule both waits share: ready once `listening`; an error if the process
    /// has exited or `deadline` passed.
    fn readiness(&mut self, listening: bool, deadline: Instant) -> anyhow::Result<bool> {
        let Some(child) = &mut self.child else { bail!("{} is not running", self.name) };
        if let Some(status) = child.try_wait().context("checking nats-server")? {
            self.child = None;
            bail!("{} exited ({status}){}", self.name, self.see_log());
        }
        if listening {
            return Ok(true);
        }
        ensure!(Instant::now() < deadline, "{} not listening{}", self.name, self.see_log());
        Ok(false)
    }

    fn see_log(&self) -> String {
        self.log.as_ref().map(|l| format!("; see {}", l.display())).unwrap_or_default()
    }

    /// Kills it (SIGKILL, as a crash would) and reaps it. Nothing if it is not running.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A frozen process dies of SIGKILL too, but only once it is continued: be sure.
            let _ = signal(child.id(), "CONT");
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it and starts it again on the same port and store, blocking until it accepts
    /// connections.
    ///
    /// # Panics
    /// If it does not start again.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn().expect("restarting nats-server");
        self.wait_ready().expect("nats-server ready again");
    }

    /// Starts it again on the same port and store (after [`NatsServer::stop`]) and waits
    /// without blocking the runtime: [`NatsServer::restart`] for async callers.
    pub async fn respawn(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.ready().await
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) it: it keeps its sockets but answers nothing, like
    /// a server that lost its network for a while.
    ///
    /// # Panics
    /// If it is not running or the signal cannot be sent.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.pid().expect("nats-server running");
        signal(pid, if frozen { "STOP" } else { "CONT" }).expect("signalling nats-server");
    }

    /// Whether its monitoring endpoint says it is healthy (for a cluster node: JetStream has a
    /// meta leader). False for a server without one.
    fn healthy(&self) -> bool {
        self.monitor.is_some_and(healthz)
    }
}

impl NatsCluster {
    /// Starts a 3-node JetStream cluster named `name` (blocking until every node is healthy).
    ///
    /// # Panics
    /// If it does not start.
    pub fn start(name: &str) -> Self {
        let mut cluster = Self::launch(name, NatsOptions::default()).expect("starting a cluster");
        for node in &mut cluster.nodes {
            node.wait_ready().expect("cluster node ready");
        }
        cluster.wait_healthy_blocking().expect("cluster healthy");
        cluster
    }

    /// Spawns the nodes `<name>-1` … `<name>-3` without waiting: follow with
    /// [`NatsCluster::ready`]. `options` apply to every node, except that its `name` is
    /// ignored and its `log` is a directory: each node appends to `<log>/<node>.log`.
    pub fn launch(name: &str, options: NatsOptions) -> anyhow::Result<Self> {
        let routes: Vec<u16> = (0..CLUSTER_NODES).map(|_| free_port()).collect();
        let mut nodes = Vec::with_capacity(CLUSTER_NODES);
        for (i, &own) in routes.iter().enumerate() {
            let node = format!("{name}-{}", i + 1);
            let log = options.log.as_ref().map(|dir| dir.join(format!("{node}.log")));
            let options = NatsOptions { name: node, log, ..options.clone() };
            let routes = Routes { cluster: name, own, all: &routes };
            nodes.push(NatsServer::launch_node(options, Some(routes))?);
        }
        Ok(Self { nodes })
    }

    /// Waits (without blocking the runtime) until every node accepts connections and JetStream
    /// has a meta leader.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            node.ready().await?;
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let nodes: Vec<u16> = self.nodes.iter().filter_map(|n| n.monitor).collect();
            let healthy = tokio::task::spawn_blocking(move || nodes.into_iter().all(healthz))
                .await
                .context("asking the nodes' /healthz")?;
            if healthy {
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "JetStream never became healthy on every node");
            tokio::time::sleep(READY_POLL * 10).await;
        }
    }

    fn wait_healthy_blocking(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.nodes.iter().all(NatsServer::healthy) {
            ensure!(Instant::now() < deadline, "JetStream never became healthy on every node");
            std::thread::sleep(READY_POLL * 10);
        }
        Ok(())
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// A running node's URL.
    pub fn any_url(&self) -> Option<String> {
        self.nodes.iter().find(|n| n.running()).map(NatsServer::url)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `$NATS_SERVER_BIN`, else the one `scripts/setup-tools` installs into the workspace's
/// `.tools/bin/`.
///
/// # Panics
/// If neither is set or there.
pub fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return bin.into();
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit/ has a parent");
    let bin = workspace.join(".tools/bin/nats-server");
    assert!(bin.exists(), "nats-server not found at {}: run scripts/setup-tools", bin.display());
    bin
}

/// Whether `GET /healthz` on monitoring port `port` answers 200.
fn healthz(port: u16) -> bool {
    let ask = || -> std::io::Result<bool> {
        let mut tcp = TcpStream::connect_timeout(&local(port), HEALTHZ_TIMEOUT)?;
        tcp.set_read_timeout(Some(HEALTHZ_TIMEOUT))?;
        tcp.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut answer = String::new();
        tcp.read_to_string(&mut answer)?;
        Ok(answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"))
    };
    ask().unwrap_or(false)
}

/// Sends `signal` (`STOP`, `CONT`, …) to `pid` with kill(1) (no unsafe code, no libc).
fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    ensure!(status.success(), "kill -{signal} {pid} failed ({status})");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_starts_restarts_on_its_port_and_is_gone_after_drop() {
        let mut nats = NatsServer::start();
        let port = nats.port;
        let pid = nats.pid().unwrap();
        nats.stop();
        assert!(!nats.running());
        assert!(TcpStream::connect(local(port)).is_err(), "still listening after stop");
        nats.restart();
        assert_eq!(nats.port, port);
        assert_ne!(nats.pid(), Some(pid));
        TcpStream::connect(local(port)).unwrap();
        let pid = nats.pid().unwrap();
        drop(nats);
        assert!(signal(pid, "0").is_err(), "process {pid} outlived its handle");
    }

    #[test]
    fn a_frozen_server_keeps_its_port_and_is_killed_on_drop() {
        let nats = NatsServer::start();
        nats.freeze(true);
        TcpStream::connect(local(nats.port)).unwrap();
        let pid = nats.pid().unwrap();
        drop(nats);
        assert!(signal(pid, "0").is_err(), "frozen process {pid} outlived its handle");
    }

    #[test]
    fn a_bad_config_is_an_error_naming_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let options = NatsOptions {
            config: "no_such_option: {".into(),
            log: Some(dir.path().join("nats.log")),
            dir: Some(dir.path().to_owned()),
            ..NatsOptions::default()
        };
        let err = NatsServer::launch(options).and_then(|mut s| s.wait_ready()).unwrap_err();
        assert!(
            err.to_string().contains("exited") && err.to_string().contains("nats.log"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_async_caller_starts_and_restarts_without_blocking() {
        let mut nats = NatsServer::launch(NatsOptions::default()).unwrap();
        nats.ready().await.unwrap();
        nats.stop();
        nats.respawn().await.unwrap();
        tokio::net::TcpStream::connect(local(nats.port)).await.unwrap();
    }

    #[test]
    fn a_cluster_has_three_jetstream_nodes_and_survives_one_down() {
        let mut cluster = NatsCluster::start("tk");
        assert_eq!(cluster.urls().len(), 3);
        let names: Vec<&str> = cluster.nodes.iter().map(NatsServer::name).collect();
        assert_eq!(names, ["tk-1", "tk-2", "tk-3"]);
        cluster.nodes[0].stop();
        assert_eq!(cluster.any_url(), Some(cluster.nodes[1].url()));
        cluster.nodes[0].restart();
        cluster.wait_healthy_blocking().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ready_cluster_stores_a_three_replica_stream() {
        let logs = tempfile::tempdir().unwrap();
        let options = NatsOptions { log: Some(logs.path().to_owned()), ..NatsOptions::default() };
        let mut cluster = NatsCluster::launch("r3", options).unwrap();
        cluster.ready().await.unwrap();
        for node in ["r3-1", "r3-2", "r3-3"] {
            assert!(logs.path().join(format!("{node}.log")).exists(), "{node}.log");
        }
        let client = async_nats::connect(cluster.nodes[0].url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let spec = async_nats::jetstream::stream::Config {
            name: "R3".into(),
            subjects: vec!["r3.>".into()],
            num_replicas: 3,
            ..Default::default()
        };
        js.create_stream(spec).await.unwrap();
        let other = async_nats::connect(cluster.nodes[2].url()).await.unwrap();
        let other = async_nats::jetstream::new(other);
        let ack = other.publish("r3.x", "stored".into()).await.unwrap();
        assert_eq!(ack.await.unwrap().sequence, 1);
    }
}
