//! `loadtest demo`: the main job on one machine, as `scripts/demo` shows it. Development
//! certificates, nats-server with JetStream, a dev identity provider and the relay (JWT auth
//! with a tenant role); a minted token; a refused cross-tenant publish; an open-loop HTTPS load
//! with `--consume` (the send→202 and send→consumer histograms); the relay's own percentiles
//! (`/debug/latency`); a few events decoded by `edgerelay tail`; then a SIGTERM drain. Every
//! process it starts is stopped when it ends, however it ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use clap::Parser as _;
use edgerelay::auth::config::{JwtConfig, RoleConfig};
use edgerelay::config::Config;
use edgerelay_testkit::relay_config::write_toml;
use edgerelay_testkit::{dev_certs, free_port, local, NatsOptions, NatsServer, RelayConfigBuilder};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};
use tokio_rustls::TlsConnector;

use crate::harness::{self, ModeArgs};
use crate::mode::{https, tls};
use crate::procs::{self, admin_get, Children};
use crate::token::TokenArgs;

/// The claims of the demo's token: tenant `demo`, allowed to publish by the tenant role.
const CLAIMS: &str = r#"{"sub":"demo-edge-fn","tenant":"demo","scope":"edge:publish"}"#;

/// Lifetime of the demo's token, seconds.
const TOKEN_LIFETIME_SECS: u64 = 600;

/// The relay's `/debug/latency` stages shown, in pipeline order.
const STAGES: [&str; 3] = ["ingest_to_ack", "queue_wait", "flush"];

/// Longest the relay may take to drain and exit after SIGTERM (its shutdown grace is 10 s).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Flags of `loadtest demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Offered load, events/s.
    #[arg(long, env = "RATE", value_name = "EVENTS_PER_S", default_value = "2000")]
    rate: String,

    /// How long the load runs (after a 2 s warm-up).
    #[arg(long, env = "DURATION", value_name = "DURATION", default_value = "10s")]
    duration: String,

    /// HTTP version of the load: 1 or 2.
    #[arg(long = "http", env = "HTTP", value_name = "VERSION", default_value = "2")]
    http: String,

    /// Where the certificates, logs, NATS store and reports go (emptied first).
    #[arg(long, value_name = "DIR", default_value = ".demo")]
    dir: PathBuf,

    /// The relay binary [default: `edgerelay` next to this loadtest binary].
    #[arg(long, value_name = "FILE")]
    relay_bin: Option<PathBuf>,

    /// The nats-server binary [default: the one scripts/setup-tools installs in .tools/bin].
    #[arg(long, value_name = "FILE", env = "NATS_SERVER_BIN")]
    nats_server_bin: Option<PathBuf>,
}

/// The `loadtest https` command line of the load, parsed by the harness's own flags.
#[derive(Debug, clap::Parser)]
struct HttpsLoad {
    #[command(flatten)]
    args: ModeArgs<https::Args>,
}

/// Runs the demo.
pub async fn run(args: Args, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let dir = std::path::absolute(&args.dir).context("resolving --dir")?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("nats"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let relay_bin = procs::relay_bin(args.relay_bin.as_deref())?;
    let certs = dir.join("certs");
    dev_certs(&certs)?;
    let mut children = Children::default();

    let idp = local(free_port());
    println!("==> dev identity provider on http://{idp} (never for production)");
    let mut dev_idp = quiet(&relay_bin);
    dev_idp.args(["dev-idp", "--listen", &idp.to_string()]);
    children.spawn("edgerelay dev-idp", &mut dev_idp, &dir.join("idp.log"))?;
    procs::wait_ready(&mut children, &dir, &stop, "the dev IdP", || async {
        TcpStream::connect(idp).await.is_ok()
    })
    .await?;
    let token = TokenArgs {
        token: None,
        token_from: Some(format!("http://{idp}")),
        token_claims: CLAIMS.into(),
        token_lifetime_secs: TOKEN_LIFETIME_SECS,
    }
    .resolve()
    .await?;
    println!("minted a 10-minute token for {CLAIMS}");

    let mut nats = NatsServer::launch(NatsOptions {
        name: "nats".into(),
        log: Some(dir.join("nats.log")),
        dir: Some(dir.join("nats")),
        bin: args.nats_server_bin.clone(),
        ..NatsOptions::default()
    })?;
    println!("==> nats-server with JetStream on 127.0.0.1:{}", nats.port);
    nats.ready().await?;

    let config = relay_config(&nats.url(), &certs, &format!("http://{idp}"));
    let config_path = dir.join("edgerelay.toml");
    config.validate().context("the demo's relay configuration")?;
    write_toml(&config, &config_path)?;
    let (https_addr, admin) = (config.https.listen, config.admin.listen);
    println!("==> edgerelay on https://{https_addr} (admin {admin})");
    let mut relay_cmd = quiet(&relay_bin);
    relay_cmd.arg("run").arg("--config").arg(&config_path);
    let mut relay = procs::spawn_logged("edgerelay", &mut relay_cmd, &dir.join("edgerelay.log"))?;
    let readyz = relay_ready(&mut relay, admin, &dir, &stop).await?;
    println!("readyz: {}", String::from_utf8_lossy(&readyz).trim());

    println!("==> tenant 'demo' publishing on another tenant's subject is refused:");
    let (status, body) =
        publish(https_addr, &certs.join("ca.pem"), &token, "edge.other.click").await?;
    println!("{} (HTTP {status})", String::from_utf8_lossy(&body).trim());

    println!("==> load: {} events/s for {} over HTTP/{}", args.rate, args.duration, args.http);
    let load = load_args(&args, &https_addr.to_string(), &dir, &token, &nats.url())?;
    harness::run_single(load, stop.clone()).await?;

    println!("==> the relay's own view, the last 10 s (GET /debug/latency, microseconds):");
    print_latency(admin).await?;
    println!("   (live: {} top --admin http://{admin})", relay_bin.display());

    println!("==> a few events, read back from JetStream by 'edgerelay tail'");
    let mut tail = Command::new(&relay_bin);
    tail.env("EDGERELAY_LOG", "warn").args(["tail", "--nats-url", &nats.url()]);
    tail.args(["--stream", "EDGE", "--subject", "edge.>", "--count", "3"]);
    tail.args(["--idle-timeout-ms", "10000"]).stdin(Stdio::null());
    let status = tail.status().await.context("running edgerelay tail")?;
    ensure!(status.success(), "edgerelay tail failed ({status})");

    println!("==> stopping (SIGTERM drains the relay)");
    let pid = relay.id().context("the relay has already been reaped")?;
    procs::signal(pid, "TERM")?;
    let status = timeout(DRAIN_TIMEOUT, relay.wait())
        .await
        .with_context(|| format!("the relay did not exit within {DRAIN_TIMEOUT:?} of SIGTERM"))?
        .context("waiting for the relay")?;
    ensure!(status.success(), "edgerelay exited with {status}; see {}", dir.display());
    println!("edgerelay exited 0");
    children.stop().await;
    nats.stop();
    println!("logs and the .hgrm/.json reports are in {}/", dir.display());
    Ok(())
}

/// The relay's configuration: relay `demo` on free ports with the development certificates
/// in `certs`, the default stream, no static token, and JWTs from the dev IdP at `issuer`
/// granting `edge.{tenant}.>` to tokens with the `edge:publish` scope.
fn relay_config(nats_url: &str, certs: &Path, issuer: &str) -> Config {
    let grace = Config::default().relay.shutdown_grace_ms;
    RelayConfigBuilder::new(nats_url)
        .id("demo")
        .certs_in(certs)
        .free_ports()
        .no_tokens()
        .with(|c| {
            c.relay.shutdown_grace_ms = grace;
            c.auth.jwt = Some(JwtConfig {
                issuer: issuer.into(),
                audiences: vec!["edgerelay".into()],
                discovery: true,
                max_token_lifetime_secs: 900,
                ..JwtConfig::default()
            });
            c.auth.roles = vec![RoleConfig {
                name: "tenant-publishers".into(),
                require: [("scope".into(), "edge:publish".into())].into(),
                allow: vec!["edge.{claims.tenant}.>".into()],
                deny: Vec::new(),
            }];
        })
        .build()
}

/// A command for the relay binary with its log at `warn`.
fn quiet(relay_bin: &Path) -> Command {
    let mut command = Command::new(relay_bin);
    command.env("EDGERELAY_LOG", "warn");
    command
}

/// Waits until the relay's `/readyz` answers 200 and returns its body; fails if the relay
/// exits first, `stop` turns true or [`procs::READY_TIMEOUT`] passes.
async fn relay_ready(
    relay: &mut Child,
    admin: SocketAddr,
    logs: &Path,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Bytes> {
    let deadline = Instant::now() + procs::READY_TIMEOUT;
    loop {
        if let Ok((200, body)) = admin_get(admin, "/readyz").await {
            return Ok(body);
        }
        if let Some(status) = relay.try_wait().context("checking the relay")? {
            bail!("edgerelay exited ({status}); see {}", logs.display());
        }
        ensure!(!*stop.borrow(), "interrupted while waiting for the relay");
        ensure!(Instant::now() < deadline, "the relay is not ready; see {}", logs.display());
        sleep(procs::READY_POLL).await;
    }
}

/// One `POST /v1/publish/{subject}` of `{}` over HTTPS/1.1 with `token`: status and body.
async fn publish(
    addr: SocketAddr,
    ca: &Path,
    token: &str,
    subject: &str,
) -> anyhow::Result<(u16, Bytes)> {
    let config = tls::tls_config(Some(ca), false, b"http/1.1")?;
    let tcp = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .context("TLS handshake with the relay")?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::post(format!("/v1/publish/{subject}"))
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::from_static(b"{}")))?;
    let resp = send.send_request(req).await.context("POST /v1/publish")?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.context("reading the answer")?.to_bytes();
    Ok((status, body))
}

/// The load of `scripts/demo`, as `loadtest https` flags: 4 connections, 8 subjects under
/// `edge.demo`, 256-byte payloads, a 2 s warm-up, reports in `dir`, and a consumer.
fn load_args(
    args: &Args,
    https_addr: &str,
    dir: &Path,
    token: &str,
    nats_url: &str,
) -> anyhow::Result<ModeArgs<https::Args>> {
    let path = |name: &str| dir.join(name).display().to_string();
    let flags = [
        ("--url", format!("https://{https_addr}")),
        ("--ca", path("certs/ca.pem")),
        ("--token", token.to_owned()),
        ("--subject-prefix", "edge.demo".into()),
        ("--http", args.http.clone()),
        ("--connections", "4".into()),
        ("--rate", args.rate.clone()),
        ("--duration", args.duration.clone()),
        ("--warmup", "2s".into()),
        ("--subjects", "8".into()),
        ("--payload-bytes", "256".into()),
        ("--pacer-spin", "0".into()),
        ("--hgrm", path("https.hgrm")),
        ("--json", path("https.json")),
        ("--consume-nats", nats_url.to_owned()),
    ];
    let mut argv = vec!["https".to_owned(), "--consume".to_owned()];
    for (flag, value) in flags {
        argv.push(format!("{flag}={value}"));
    }
    Ok(HttpsLoad::try_parse_from(argv).context("the demo's load flags")?.args)
}

/// Prints the window of each of [`STAGES`] from the relay's `/debug/latency`.
async fn print_latency(admin: SocketAddr) -> anyhow::Result<()> {
    let (status, body) = admin_get(admin, "/debug/latency").await?;
    ensure!(status == 200, "GET /debug/latency answered {status}");
    let json: serde_json::Value =
        serde_json::from_slice(&body).context("/debug/latency is not JSON")?;
    for stage in STAGES {
        let window = &json["stages"][stage]["window"];
        let field = |key: &str| window[key].as_u64().unwrap_or_default();
        println!(
            "  {stage:14} count {:>7}  p50 {:>6}  p99 {:>6}  p99.9 {:>6}  max {:>6}",
            field("count"),
            field("p50"),
            field("p99"),
            field("p999"),
            field("max")
        );
    }
    Ok(())
}
