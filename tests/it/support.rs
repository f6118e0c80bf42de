//! Test support: a real nats-server per test (killed on drop), a relay started in-process on
//! `127.0.0.1:0` with freshly generated certificates, HTTP/1.1 and HTTP/2 clients that trust
//! them, and an independent reader of the stream.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgerelay::auth::config::StaticToken;
use edgerelay::config::Config;
use edgerelay::proto;
use edgerelay::Relay;
use edgerelay_ops::dev_certs::DevCerts;
use prost::Message;

/// May publish on `edge.>` except `edge.secret.>`.
pub const TOKEN: &str = "test-token-edge-0001";
/// May publish on `edge.other.>` only.
pub const OTHER_TOKEN: &str = "test-token-other-001";
pub const STREAM: &str = "EDGE";

/// A nats-server with JetStream on a free loopback port, with its own store directory.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: tempfile::TempDir,
    config: Option<PathBuf>,
}

impl NatsServer {
    pub fn start() -> Self {
        let mut s = Self {
            child: None,
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
            config: None,
        };
        s.spawn();
        s
    }

    /// Starts one with a configuration file (authorization, TLS, ...) besides the usual flags.
    pub fn start_with_config(conf: &str) -> Self {
        let store = tempfile::tempdir().unwrap();
        let config = store.path().join("nats.conf");
        std::fs::write(&config, conf).unwrap();
        let mut s = Self { child: None, port: free_port(), store, config: Some(config) };
        s.spawn();
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server: it keeps its sockets but answers
    /// nothing, like a server that lost its network for a while.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("server running").id();
        let sig = if frozen { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig} failed");
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(nats_server_bin());
        if let Some(config) = &self.config {
            cmd.arg("-c").arg(config);
        }
        let child = cmd
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        wait_for_port(self.port);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A frozen server ignores SIGKILL only until it is continued; be sure.
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
        }
        self.stop();
    }
}

pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/nats-server");
    assert!(p.exists(), "nats-server not found at {}: run scripts/setup-tools", p.display());
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Certificates and a config pointing at `nats_url`, listening on ephemeral loopback ports.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub certs: DevCerts,
    pub config: Config,
}

impl Setup {
    pub fn new(nats_url: &str) -> Self {
        edgerelay::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let certs =
            edgerelay_ops::dev_certs::generate_dev_certs(&["localhost".into(), "127.0.0.1".into()])
                .unwrap();
        certs.write(dir.path()).unwrap();
        let mut config = Config::default();
        config.relay.id = "test-relay".into();
        config.relay.shutdown_grace_ms = 5_000;
        config.https.listen = "127.0.0.1:0".parse().unwrap();
        config.https.tls_cert = dir.path().join("cert.pem");
        config.https.tls_key = dir.path().join("key.pem");
        config.https.max_event_bytes = 4096;
        config.https.max_body_bytes = 64 << 10;
        config.admin.listen = "127.0.0.1:0".parse().unwrap();
        config.quic.listen = Some("127.0.0.1:0".parse().unwrap());
        config.nats.urls = vec![nats_url.to_owned()];
        config.nats.connect_timeout_ms = 2_000;
        config.batch.shards = 2;
        config.batch.linger_ms = 5;
        config.auth.static_tokens = vec![
            StaticToken {
                name: "edge-test".into(),
                token: TOKEN.into(),
                allow: vec!["edge.>".into()],
                deny: vec!["edge.secret.>".into()],
            },
            StaticToken {
                name: "other".into(),
                token: OTHER_TOKEN.into(),
                allow: vec!["edge.other.>".into()],
                deny: vec![],
            },
        ];
        Self { dir, certs, config }
    }

    /// Where and how a QUIC or HTTP/3 client reaches `relay`, with `token`.
    pub fn client_config(&self, relay: &TestRelay, token: &str) -> edgerelay_client::ClientConfig {
        edgerelay_client::ClientConfig {
            server: relay.quic_addr(),
            server_name: "localhost".into(),
            ca_pem: Some(self.certs.ca_cert.clone()),
            token: token.into(),
            client_cert: None,
        }
    }

    /// A native-protocol client of `relay` with `token`.
    pub async fn quic_client(&self, relay: &TestRelay, token: &str) -> edgerelay_client::Client {
        edgerelay_client::Client::connect(self.client_config(relay, token))
            .await
            .expect("QUIC connect")
    }

    /// Starts the relay in-process.
    pub async fn start(&self) -> TestRelay {
        self.config.validate().expect("test config is valid");
        let relay = Relay::start(self.config.clone()).await.expect("relay starts");
        TestRelay::new(relay, &self.certs)
    }
}

/// A relay running in this process, with clients for it.
pub struct TestRelay {
    relay: Option<Relay>,
    pub h1: reqwest::Client,
    pub h2: reqwest::Client,
}

impl TestRelay {
    pub fn new(relay: Relay, certs: &DevCerts) -> Self {
        Self { relay: Some(relay), h1: client(certs, false), h2: client(certs, true) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.relay.as_ref().unwrap().https_addr()
    }

    pub fn quic_addr(&self) -> SocketAddr {
        self.relay.as_ref().unwrap().quic_addr().expect("quic.listen is set")
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.addr().port())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.relay.as_ref().unwrap().admin_addr())
    }

    /// `POST /v1/publish/{subject}` with the test token.
    pub fn publish(
        &self,
        client: &reqwest::Client,
        subject: &str,
        body: &'static str,
    ) -> reqwest::RequestBuilder {
        client.post(self.url(&format!("/v1/publish/{subject}"))).bearer_auth(TOKEN).body(body)
    }

    /// Applies `config` as a SIGHUP would.
    pub async fn reload(
        &self,
        config: Config,
    ) -> Result<edgerelay::reload::Reloaded, edgerelay::reload::ReloadError> {
        config.validate().expect("reloaded test config is valid");
        self.relay.as_ref().unwrap().reload(config).await
    }

    pub async fn shutdown(mut self) -> edgerelay::Drained {
        self.relay.take().unwrap().shutdown().await
    }
}

/// A TLS client config trusting the dev CA and offering `alpn`.
pub fn tls_client_config(certs: &DevCerts, alpn: &[u8]) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::CertificateDer::from_pem_slice(certs.ca_cert.as_bytes()).unwrap();
    roots.add(ca).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(edgerelay::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls
}

/// A reqwest client trusting the dev CA, speaking HTTP/2 (ALPN h2) or HTTP/1.1.
pub fn client(certs: &DevCerts, h2: bool) -> reqwest::Client {
    let tls = tls_client_config(certs, if h2 { b"h2" } else { b"http/1.1" });
    let builder =
        reqwest::Client::builder().use_preconfigured_tls(tls).timeout(Duration::from_secs(20));
    let builder = if h2 { builder.http2_prior_knowledge() } else { builder.http1_only() };
    builder.build().unwrap()
}

/// One stored NATS message: its stream sequence, headers and decoded batch.
#[derive(Debug)]
pub struct StoredMsg {
    pub seq: u64,
    pub subject: String,
    pub msg_id: String,
    pub content_type: String,
    pub events_header: String,
    pub batch: proto::Batch,
}

/// Points `config` at several NATS clusters (name, URL) instead of one, with failover
/// timings short enough for a test.
pub fn use_clusters(config: &mut Config, clusters: &[(&str, String)]) {
    config.nats.urls.clear();
    config.nats.clusters = clusters
        .iter()
        .map(|(name, url)| edgerelay::sink::config::ClusterConfig {
            name: (*name).into(),
            region: format!("region-{name}"),
            urls: vec![url.clone()],
            ..Default::default()
        })
        .collect();
    let f = &mut config.nats.failover;
    f.probe_interval_ms = 200;
    f.probe_timeout_ms = 300;
    f.unhealthy_after_failures = 2;
    f.failback_after_ms = 2_000;
    config.nats.ack_timeout_ms = 500;
    config.nats.publish_deadline_ms = 10_000;
}

/// The name of the relay's active NATS cluster (`/debug/clusters`), if any.
pub async fn active_cluster(relay: &TestRelay) -> Option<String> {
    let url = relay.admin_url("/debug/clusters");
    let clusters: Vec<serde_json::Value> =
        relay.h1.get(url).send().await.ok()?.json().await.ok()?;
    clusters
        .iter()
        .find(|c| c["active"] == true)
        .and_then(|c| c["name"].as_str().map(str::to_owned))
}

/// Waits until the active cluster is `name`; returns how long that took.
pub async fn until_active(relay: &TestRelay, name: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if active_cluster(relay).await.as_deref() == Some(name) {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "cluster {name} never became active within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads every message of the stream back through JetStream's own API (not the relay).
pub async fn read_stream(nats_url: &str) -> Vec<StoredMsg> {
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(STREAM).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(m) = stream.get_raw_message(seq).await else { continue };
        let header =
            |name: &str| m.headers.get(name).map(|v| v.as_str().to_owned()).unwrap_or_default();
        out.push(StoredMsg {
            seq,
            subject: m.subject.to_string(),
            msg_id: header("Nats-Msg-Id"),
            content_type: header("Content-Type"),
            events_header: header("Edgerelay-Events"),
            batch: proto::Batch::decode(m.payload.clone()).expect("stored message is a Batch"),
        });
    }
    out
}

/// Number of messages in the stream (0 if it does not exist).
pub async fn stream_messages(nats_url: &str) -> u64 {
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    match js.get_stream(STREAM).await {
        Ok(mut s) => s.info().await.unwrap().state.messages,
        Err(_) => 0,
    }
}

/// Parses a 202 body.
#[derive(Debug, serde::Deserialize)]
pub struct Accepted {
    pub stream: String,
    /// The NATS cluster that stored it.
    pub cluster: String,
    pub seq: u64,
    pub batch: String,
    pub index: u32,
    pub duplicate: bool,
}

/// The error code of a refusal body.
pub async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    (status, v["error"]["code"].as_str().unwrap_or("").to_owned())
}

/// Keeps the shared test token list in one place for tests that write config files.
pub fn token_toml() -> String {
    format!(
        "[[auth.static_tokens]]\nname = \"edge-test\"\ntoken = \"{TOKEN}\"\nallow = [\"edge.>\"]\n"
    )
}

/// A dev identity provider served in-process on a loopback port.
pub struct TestIdp {
    pub idp: std::sync::Arc<edgerelay_ops::dev_idp::DevIdp>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestIdp {
    /// Starts one with ES256 and RS256 keys.
    pub async fn start() -> Self {
        let listener = edgerelay_ops::dev_idp::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let idp = std::sync::Arc::new(
            edgerelay_ops::dev_idp::DevIdp::new(&issuer, &["ES256", "RS256"]).unwrap(),
        );
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(edgerelay_ops::dev_idp::serve(idp.clone(), listener, stop_rx));
        Self { idp, stop: Some(stop), task: Some(task) }
    }

    pub fn issuer(&self) -> &str {
        self.idp.issuer()
    }

    /// A token with these claims (over the defaults: iss, aud `edgerelay`, sub, iat, exp).
    pub fn token(&self, claims: serde_json::Value) -> String {
        self.idp
            .mint(&edgerelay_ops::dev_idp::MintRequest {
                claims: claims.as_object().cloned().unwrap_or_default(),
                ..Default::default()
            })
            .unwrap()
    }

    /// Stops serving (the IdP is "down"); its keys stay usable for minting.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Setup {
    /// Accept JWTs from `idp` (found through OIDC discovery) with the tenant roles: scope
    /// `edge:publish` may publish on `edge.{tenant}.>` except `edge.{tenant}.admin.>`.
    pub fn with_jwt(&mut self, idp: &TestIdp) -> &mut edgerelay::auth::config::JwtConfig {
        self.config.auth.roles = vec![edgerelay::auth::config::RoleConfig {
            name: "tenant".into(),
            require: [("scope".to_string(), "edge:publish".to_string())].into(),
            allow: vec!["edge.{claims.tenant}.>".into()],
            deny: vec!["edge.{claims.tenant}.admin.>".into()],
        }];
        self.config.auth.jwt = Some(edgerelay::auth::config::JwtConfig {
            issuer: idp.issuer().into(),
            audiences: vec!["edgerelay".into()],
            discovery: true,
            max_token_lifetime_secs: 900,
            fetch_cooldown_secs: 1,
            ..Default::default()
        });
        self.config.auth.jwt.as_mut().unwrap()
    }
}

/// The audit records in the audit stream (JSON), once at least `min` are there (or 10 s passed).
pub async fn audit_records(nats_url: &str, min: usize) -> Vec<serde_json::Value> {
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut out = Vec::new();
        if let Ok(mut stream) = js.get_stream("EDGERELAY_AUDIT").await {
            let state = stream.info().await.unwrap().state.clone();
            if state.messages > 0 {
                for seq in state.first_sequence..=state.last_sequence {
                    if let Ok(m) = stream.get_raw_message(seq).await {
                        out.push(
                            serde_json::from_slice(&m.payload).expect("audit records are JSON"),
                        );
                    }
                }
            }
        }
        if out.len() >= min || Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of one Prometheus sample line (`name{labels}`) on the relay's `/metrics`, 0 if absent.
pub async fn metric(relay: &TestRelay, sample: &str) -> u64 {
    let text =
        relay.h1.get(relay.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// An HTTP/3 client of `relay` sending `token`.
pub async fn h3_client(
    setup: &Setup,
    relay: &TestRelay,
    token: &str,
) -> edgerelay_client::H3Client {
    edgerelay_client::H3Client::connect(setup.client_config(relay, token))
        .await
        .expect("HTTP/3 connect")
}

/// A TCP proxy on a free loopback port that delays every chunk by `delay` each way: a NATS
/// cluster farther away than the one on loopback. Runs until the test's runtime ends.
pub async fn delay_proxy(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener as Listener, TcpStream as Stream};

    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        delay: Duration,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        tokio::spawn(async move {
            while let Some((due, chunk)) = rx.recv().await {
                tokio::time::sleep_until(due.into()).await;
                if to.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    }

    let listener = Listener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = Stream::connect(upstream).await else { continue };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, delay));
            tokio::spawn(pump(sr, cw, delay));
        }
    });
    addr
}

/// The `edgerelay` binary with a config file written for `setup`: HTTPS and admin on free
/// loopback ports, NATS at `nats_url` (plus `nats_lines` in `[nats]`), the test tokens, and
/// `sections`: whole TOML tables of its own (`[relay]`, `[spool]`, …).
pub struct BinaryRelay {
    pub port: u16,
    pub admin: u16,
    config: PathBuf,
}

impl BinaryRelay {
    pub fn new(setup: &Setup, nats_url: &str, nats_lines: &str, sections: &str) -> Self {
        let (port, admin) = (free_port(), free_port());
        let cfg = format!(
            "{sections}\n[https]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"{}\"\n\
             tls_key = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [nats]\nurls = [\"{nats_url}\"]\n{nats_lines}\n{}",
            setup.config.https.tls_cert.display(),
            setup.config.https.tls_key.display(),
            token_toml(),
        );
        let config = setup.dir.path().join("relay.toml");
        std::fs::write(&config, cfg).unwrap();
        Self { port, admin, config }
    }

    /// Starts `edgerelay run` with its log on `stderr`.
    pub fn spawn(&self, stderr: Stdio) -> Child {
        self.command().stderr(stderr).spawn().unwrap()
    }

    /// `edgerelay run --config …`, stdout to /dev/null: add environment, fds, stderr.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgerelay"));
        cmd.args(["run", "--config"]).arg(&self.config).stdout(Stdio::null());
        cmd
    }

    /// Waits (up to 15 s) until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let ready = format!("http://127.0.0.1:{}/readyz", self.admin);
        let deadline = Instant::now() + Duration::from_secs(15);
        while !matches!(reqwest::get(&ready).await, Ok(r) if r.status() == 200) {
            assert!(Instant::now() < deadline, "relay never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `https://127.0.0.1:{port}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// The config file as it is now.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).unwrap()
    }

    /// Replaces the config file (the relay reads it again on SIGHUP).
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    /// Sends SIGHUP to the relay `child`, as `systemctl reload` does.
    pub fn hup(child: &Child) {
        let pid = child.id().to_string();
        assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    }
}
