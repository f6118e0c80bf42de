//! What only the daemon's integration tests need, on top of the shared test kit
//! (`edgerelay-testkit`: nats-server, free ports, the delay proxy, the relay-config builder):
//! a relay started in-process on `127.0.0.1:0` with freshly generated certificates, the relay
//! binary run with a config file, HTTP/1.1, HTTP/2, QUIC and HTTP/3 clients that trust them,
//! an identity provider, and independent readers of the stream, the audit trail and metrics.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgerelay::config::Config;
use edgerelay::proto;
use edgerelay::Relay;
use edgerelay_ops::dev_certs::DevCerts;
pub use edgerelay_testkit::{delay_proxy, free_port, NatsServer, TOKEN};
use edgerelay_testkit::{relay_config, RelayConfigBuilder};
use prost::Message;

/// May publish on `edge.other.>` only. ([`TOKEN`] may publish on `edge.>` except
/// `edge.secret.>`.)
pub const OTHER_TOKEN: &str = "test-token-other-001";
pub const STREAM: &str = "EDGE";

/// Certificates and a config pointing at `nats_url`, listening on ephemeral loopback ports.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub certs: DevCerts,
    pub config: Config,
}

impl Setup {
    /// The kit's defaults plus QUIC, small event and body limits, two shards, a 5 ms linger,
    /// unauthenticated refusals audited every 200 ms, `edge.secret.>` denied to [`TOKEN`] and
    /// a second token, [`OTHER_TOKEN`].
    pub fn new(nats_url: &str) -> Self {
        edgerelay::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let certs = relay_config::dev_certs(dir.path()).unwrap();
        let config = RelayConfigBuilder::new(nats_url)
            .certs_in(dir.path())
            .quic()
            .token("other", OTHER_TOKEN, &["edge.other.>"], &[])
            .with(|c| {
                c.auth.static_tokens[0].deny = vec!["edge.secret.>".into()];
                c.https.max_event_bytes = 4096;
                c.https.max_body_bytes = 64 << 10;
                c.batch.shards = 2;
                c.batch.linger_ms = 5;
                c.audit.refusals_interval_ms = 200;
            })
            .build();
        Self { dir, certs, config }
    }

    /// A relay process's config for this setup: the kit's defaults (not this setup's
    /// in-process extras) with its NATS and certificates, changed by `change`, every listener
    /// on a free port.
    pub fn binary_config(
        &self,
        change: impl FnOnce(RelayConfigBuilder) -> RelayConfigBuilder,
    ) -> Config {
        let base = RelayConfigBuilder::new(&self.config.nats.urls[0]).certs_in(self.dir.path());
        change(base).free_ports().build()
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

/// A nats-server of its own and a relay on it started in-process, with [`Setup::new`]'s config
/// changed by `change` first.
pub async fn start_relay(change: impl FnOnce(&mut Config)) -> (NatsServer, Setup, TestRelay) {
    start_setup(|setup| change(&mut setup.config)).await
}

/// [`start_relay`] accepting `idp`'s tokens ([`Setup::with_jwt`]), its config changed by
/// `change` after.
pub async fn start_jwt_relay(
    idp: &TestIdp,
    change: impl FnOnce(&mut Config),
) -> (NatsServer, Setup, TestRelay) {
    start_setup(|setup| {
        setup.with_jwt(idp);
        change(&mut setup.config);
    })
    .await
}

/// A nats-server of its own and a relay on it started in-process, with the [`Setup`] changed
/// by `change` first.
pub async fn start_setup(change: impl FnOnce(&mut Setup)) -> (NatsServer, Setup, TestRelay) {
    let nats = NatsServer::start();
    let mut setup = Setup::new(&nats.url());
    change(&mut setup);
    let relay = setup.start().await;
    (nats, setup, relay)
}

/// [`start_relay`] and a native-protocol client of it with [`TOKEN`], connected.
pub async fn start_quic_relay(
    change: impl FnOnce(&mut Config),
) -> (NatsServer, Setup, TestRelay, edgerelay_client::Client, quinn::Connection) {
    let (nats, setup, relay) = start_relay(change).await;
    let client = setup.quic_client(&relay, TOKEN).await;
    let conn = client.connection().await.unwrap();
    (nats, setup, relay, client, conn)
}

/// A config change for [`start_relay`]: how long the relay waits for a NATS ack, and for a
/// publish as a whole, in milliseconds.
pub fn nats_deadlines(ack_timeout_ms: u64, publish_deadline_ms: u64) -> impl FnOnce(&mut Config) {
    move |c| {
        c.nats.ack_timeout_ms = ack_timeout_ms;
        c.nats.publish_deadline_ms = publish_deadline_ms;
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
        body: impl Into<reqwest::Body>,
    ) -> reqwest::RequestBuilder {
        self.publish_as(client, TOKEN, subject, body)
    }

    /// `POST /v1/publish/{subject}` with `token`.
    pub fn publish_as(
        &self,
        client: &reqwest::Client,
        token: &str,
        subject: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::RequestBuilder {
        client.post(self.url(&format!("/v1/publish/{subject}"))).bearer_auth(token).body(body)
    }

    /// Publishes `body` on `subject` over HTTP/2 with `Idempotency-Key: key`; it must be
    /// accepted (202).
    pub async fn publish_accepted_with_key(
        &self,
        subject: &str,
        body: impl Into<reqwest::Body>,
        key: &str,
    ) -> reqwest::Response {
        let resp = self.publish(&self.h2, subject, body).header("Idempotency-Key", key).send();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), 202);
        resp
    }

    /// `POST /v1/publish` (a multi-event request) with the test token; the body is the
    /// caller's.
    pub fn publish_events(&self, client: &reqwest::Client) -> reqwest::RequestBuilder {
        client.post(self.url("/v1/publish")).bearer_auth(TOKEN)
    }

    /// `POST /v1/publish` over HTTP/2 with the test token, `body` of `content_type`: the answer.
    pub async fn post_events(
        &self,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let req = self.publish_events(&self.h2).header("content-type", content_type).body(body);
        req.send().await.unwrap()
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

/// The error reason of a refusal body (empty for an answer that is no refusal).
pub async fn error_reason(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    (status, v["error"]["reason"].as_str().unwrap_or("").to_owned())
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

/// The `refusals` audit records (unauthenticated refusals, counted), once their counts add up
/// to `total` or after 10 s.
pub async fn counted_refusals(nats_url: &str, total: u64) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records = audit_records(nats_url, 0).await;
        let counted: Vec<_> = records.into_iter().filter(|r| r["kind"] == "refusals").collect();
        let sum: u64 = counted.iter().filter_map(|r| r["count"].as_u64()).sum();
        if sum >= total || Instant::now() > deadline {
            return counted;
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

/// The `edgerelay` binary with a config file ([`Setup::binary_config`]) in the setup's
/// directory.
pub struct BinaryRelay {
    pub port: u16,
    pub admin: u16,
    /// The config it was started with.
    pub config: Config,
    path: PathBuf,
}

impl BinaryRelay {
    pub fn new(setup: &Setup, config: Config) -> Self {
        let path = setup.dir.path().join("relay.toml");
        relay_config::write_toml(&config, &path).unwrap();
        let (port, admin) = (config.https.listen.port(), config.admin.listen.port());
        Self { port, admin, config, path }
    }

    /// Starts `edgerelay run` with its log on `stderr`.
    pub fn spawn(&self, stderr: Stdio) -> Child {
        self.command().stderr(stderr).spawn().unwrap()
    }

    /// `edgerelay run --config …`, stdout to /dev/null: add environment, fds, stderr.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgerelay"));
        cmd.args(["run", "--config"]).arg(&self.path).stdout(Stdio::null());
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

    /// Replaces the config file (the relay reads it again on SIGHUP).
    pub fn write_config(&self, config: &Config) {
        relay_config::write_toml(config, &self.path).unwrap();
    }

    /// Sends SIGHUP to the relay `child`, as `systemctl reload` does.
    pub fn hup(child: &Child) {
        let pid = child.id().to_string();
        assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    }
}
