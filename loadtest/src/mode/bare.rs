//! `loadtest bare-server`: the HTTP stack's own ceiling. hyper on rustls, HTTP/1.1 and HTTP/2
//! chosen by ALPN, the relay's HTTP/2 windows; every request's body is read and answered
//! `202` with the size of a relay answer, and nothing else happens. `loadtest https` against it
//! measures what TLS + HTTP + the generator cost on this machine; the relay's HTTPS rate as a
//! ratio of it is what the relay adds.
//!
//! The `bare` mode is `https` against it: the same flags and workers, under its own name, and
//! with nothing to consume (it stores nothing).
//!
//! It serves the relay's certificate (`--cert`/`--key`) or a throw-away one made at start-up,
//! whose CA it writes to `--ca-out` (or keeps in memory for `loadtest compare`, which starts it
//! in-process).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{ensure, Context as _};
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::{https, Connected, Mode, Stored};
use crate::events::Events;
use crate::schedule::RunArgs;

/// The relay's defaults for its HTTP/2 windows (`https.h2_*_window_bytes`), so the two
/// stacks differ only in what happens behind them.
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONNECTION_WINDOW: u32 = 8 << 20;

/// Largest request body read; larger ones are answered 413 like the relay would.
const MAX_BODY_BYTES: usize = 1 << 20;

/// What the relay answers an accepted event with, in size and shape.
const ANSWER: &str = r#"{"stream":"BARE","seq":1,"batch":"bare.0.0","index":0,"duplicate":false}"#;

/// Flags of `loadtest bare-server`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// TCP address to listen on (port 0: any free port, printed at start-up).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9443")]
    listen: SocketAddr,

    /// PEM certificate chain to serve (e.g. the relay's); with --key. Default: a throw-away
    /// certificate for localhost and 127.0.0.1.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,

    /// PEM private key of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,

    /// Write the CA of the throw-away certificate here (for `loadtest https --ca`).
    #[arg(long, value_name = "FILE", conflicts_with = "cert")]
    ca_out: Option<PathBuf>,
}

/// A running bare server.
#[derive(Debug)]
pub struct BareServer {
    addr: SocketAddr,
    /// PEM of the CA that signed the served certificate, when it was generated here.
    ca_pem: Option<String>,
    stop: watch::Sender<bool>,
}

/// The `bare` mode: `https` flags aimed at a bare server.
#[derive(Clone, Debug)]
pub struct Bare(pub https::Args);

/// Certificate chain and key to serve.
struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca_pem: Option<String>,
}

impl Identity {
    /// `cert` and `key` read from PEM files, or a throw-away certificate.
    fn load(files: Option<(&PathBuf, &PathBuf)>) -> anyhow::Result<Self> {
        match files {
            Some((cert, key)) => {
                let pem =
                    std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
                let key_pem =
                    std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
                Self::from_pem(&pem, &key_pem, None)
                    .with_context(|| format!("{} / {}", cert.display(), key.display()))
            }
            None => {
                let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
                let dev = edgerelay_ops::dev_certs::generate_dev_certs(&names)?;
                Self::from_pem(
                    dev.server_cert.as_bytes(),
                    dev.server_key.as_bytes(),
                    Some(dev.ca_cert),
                )
            }
        }
    }

    fn from_pem(cert: &[u8], key: &[u8], ca_pem: Option<String>) -> anyhow::Result<Self> {
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the certificate")?;
        ensure!(!chain.is_empty(), "no PEM certificate found");
        let key = PrivateKeyDer::from_pem_slice(key).context("parsing the private key")?;
        Ok(Self { chain, key, ca_pem })
    }

    fn server_config(self) -> anyhow::Result<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(edgerelay::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain, self.key)
            .context("certificate and key do not match")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl BareServer {
    /// Binds `listen` and serves until dropped or stopped; `cert_key` as for `--cert/--key`.
    pub async fn start(
        listen: SocketAddr,
        cert_key: Option<(&PathBuf, &PathBuf)>,
    ) -> anyhow::Result<Self> {
        let identity = Identity::load(cert_key)?;
        let ca_pem = identity.ca_pem.clone();
        let acceptor = TlsAcceptor::from(Arc::new(identity.server_config()?));
        let listener =
            TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(listener, acceptor, stopped));
        Ok(Self { addr, ca_pem, stop })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// PEM of the CA that signed its certificate, when the certificate was generated here.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Mode for Bare {
    type Worker = https::HttpsWorker;

    fn name(&self) -> &'static str {
        "bare"
    }

    fn stored(&self) -> Option<Stored> {
        None
    }

    fn connect(
        &self,
        run: &RunArgs,
        events: Events,
    ) -> impl std::future::Future<Output = anyhow::Result<Connected<Self::Worker>>> + Send {
        self.0.connect(run, events)
    }
}

/// Runs `loadtest bare-server` until Ctrl-C.
pub async fn run(args: Args, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let server = BareServer::start(args.listen, args.cert.as_ref().zip(args.key.as_ref())).await?;
    if let (Some(path), Some(pem)) = (&args.ca_out, server.ca_pem()) {
        std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "bare-server listening on https://{} (h2, http/1.1): every request gets 202",
        server.addr()
    );
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Accepts connections until `stop` turns true (or its sender is dropped).
async fn serve(listener: TcpListener, acceptor: TlsAcceptor, mut stop: watch::Receiver<bool>) {
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new()).keep_alive(true);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_pending_accept_reset_streams(64)
        .max_local_error_reset_streams(64);
    let (h1, h2) = (Arc::new(h1), Arc::new(h2));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => return,
        };
        let Ok((tcp, _peer)) = accepted else {
            // Out of descriptors and the like: try again shortly rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, h1, h2, mut stop) =
            (acceptor.clone(), Arc::clone(&h1), Arc::clone(&h2), stop.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let io = TokioIo::new(tls);
            let service = service_fn(answer);
            // Connections end with the client, or when the server stops.
            if is_h2 {
                tokio::select! { _ = h2.serve_connection(io, service) => {}, _ = stop.changed() => {} }
            } else {
                tokio::select! { _ = h1.serve_connection(io, service) => {}, _ = stop.changed() => {} }
            }
        });
    }
}

/// Reads the body, answers 202 (413 when it is too large).
async fn answer(req: http::Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let status = match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
        Ok(_) => StatusCode::ACCEPTED,
        Err(_) => StatusCode::PAYLOAD_TOO_LARGE,
    };
    let mut response = Response::new(Full::new(Bytes::from_static(ANSWER.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    Ok(response)
}
