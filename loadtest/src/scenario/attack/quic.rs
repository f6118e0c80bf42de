//! The attacks over QUIC, against the relay's UDP port: slow HTTP/3 bodies, the native-frame
//! trickle, decode amplification, and the QUIC half of the connection flood. Like the TCP ones
//! they run until aborted and count on the [`Tally`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::{Buf as _, Bytes, BytesMut};
use edgerelay_client::proto::{self, ALPN_EDGERELAY, ALPN_H3};
use edgerelay_client::{quic_endpoint, ClientConfig};
use prost::Message as _;
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout};

use super::{Aim, Tally};

/// decode-amp: streams per connection at most (each holds one decoded frame at a time).
pub const AMP_MAX_STREAMS: u32 = 4;

/// `PublishRequest.events` (field 1, length-delimited) holding an empty `Event`.
const EMPTY_EVENT: [u8; 2] = [0x0a, 0x00];

/// Bytes written at once into an HTTP/3 body.
const CHUNK: usize = 16 * 1024;

/// How often a trickling stream writes.
const TRICKLE_EVERY: Duration = Duration::from_millis(100);

/// Longest answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// A QUIC client endpoint offering `alpn`, from source `n` of the aim's (if any).
fn endpoint(aim: &Aim, alpn: &[u8], n: usize) -> anyhow::Result<quinn::Endpoint> {
    let config = client_config(aim)?;
    let endpoint = quic_endpoint(&config, alpn)?;
    if let Some(ip) = source(aim, n) {
        let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding {ip}"))?;
        endpoint.rebind(socket)?;
    }
    Ok(endpoint)
}

fn source(aim: &Aim, n: usize) -> Option<IpAddr> {
    (!aim.sources.is_empty()).then(|| aim.sources[n % aim.sources.len()])
}

fn client_config(aim: &Aim) -> anyhow::Result<ClientConfig> {
    let ca_pem = std::fs::read_to_string(&aim.ca)
        .with_context(|| format!("reading {}", aim.ca.display()))?;
    Ok(ClientConfig {
        server: aim.quic,
        server_name: aim.server_name.clone(),
        ca_pem: Some(ca_pem),
        token: String::new(),
        client_cert: None,
    })
}

async fn connect(endpoint: &quinn::Endpoint, aim: &Aim) -> anyhow::Result<quinn::Connection> {
    let connecting = endpoint.connect(aim.quic, &aim.server_name)?;
    Ok(timeout(edgerelay_client::CONNECT_TIMEOUT, connecting)
        .await
        .context("handshake timed out")??)
}

/// slow-h3: connections × streams of HTTP/3, each a POST declaring `body_bytes`, all but the
/// last byte sent, no token; held.
pub async fn slow_h3(aim: Arc<Aim>, tally: Arc<Tally>) -> anyhow::Result<()> {
    let mut tasks = JoinSet::new();
    let mut keep = Vec::new();
    for c in 0..aim.intensity.connections as usize {
        let endpoint = endpoint(&aim, ALPN_H3, c)?;
        let conn = connect(&endpoint, &aim).await?;
        let (mut driver, send) =
            h3::client::new(h3_quinn::Connection::new(conn)).await.context("HTTP/3 handshake")?;
        tasks.spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        for _ in 0..aim.intensity.streams {
            let (mut send, tally, aim) = (send.clone(), Arc::clone(&tally), Arc::clone(&aim));
            tasks.spawn(async move {
                tally.start();
                let body = aim.intensity.body_bytes;
                let req = http::Request::post(format!("https://{}/v1/publish", aim.server_name))
                    .header(http::header::CONTENT_LENGTH, body)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(());
                let Ok(req) = req else { return tally.close() };
                let Ok(stream) = send.send_request(req).await else { return tally.close() };
                let (mut tx, mut rx) = stream.split();
                let fill = async {
                    let chunk = Bytes::from(vec![b'a'; CHUNK]);
                    let mut left = body - 1;
                    while left > 0 {
                        let n = left.min(CHUNK as u64) as usize;
                        if tx.send_data(chunk.slice(..n)).await.is_err() {
                            return;
                        }
                        tally.sent(n);
                        left -= n as u64;
                    }
                    std::future::pending::<()>().await
                };
                tokio::select! {
                    () = fill => tally.close(),
                    answer = rx.recv_response() => match answer {
                        Ok(resp) => tally.answer(resp.status().as_str().to_owned()),
                        Err(_) => tally.close(),
                    },
                }
                // Hold the stream (and the body sender) until aborted.
                std::future::pending::<()>().await;
                drop(tx);
            });
        }
        keep.push((endpoint, send));
    }
    while tasks.join_next().await.is_some() {}
    std::future::pending().await
}

/// native-trickle: connections × streams, each announcing a `body_bytes` frame and writing it
/// at `trickle_bytes_per_sec`, all but the last byte, no token; held.
pub async fn native_trickle(aim: Arc<Aim>, tally: Arc<Tally>) -> anyhow::Result<()> {
    let mut tasks = JoinSet::new();
    let mut keep = Vec::new();
    let body = aim.intensity.body_bytes;
    let per_write =
        (aim.intensity.trickle_bytes_per_sec as f64 * TRICKLE_EVERY.as_secs_f64()).max(1.0) as u64;
    for c in 0..aim.intensity.connections as usize {
        let endpoint = endpoint(&aim, ALPN_EDGERELAY, c)?;
        let conn = connect(&endpoint, &aim).await?;
        for _ in 0..aim.intensity.streams {
            let (conn, tally) = (conn.clone(), Arc::clone(&tally));
            tasks.spawn(async move {
                tally.start();
                let Ok((mut send, mut recv)) = conn.open_bi().await else { return tally.close() };
                let mut prefix = Vec::new();
                prost::encoding::encode_varint(body, &mut prefix);
                let trickle = async {
                    send.write_all(&prefix).await?;
                    let chunk = vec![0u8; per_write as usize];
                    let mut left = body - 1;
                    while left > 0 {
                        let n = left.min(per_write) as usize;
                        send.write_all(&chunk[..n]).await?;
                        tally.sent(n);
                        left -= n as u64;
                        sleep(TRICKLE_EVERY).await;
                    }
                    std::future::pending::<anyhow::Result<()>>().await
                };
                tokio::select! {
                    _ = trickle => tally.close(),
                    answer = read_answer(&mut recv) => match answer {
                        Some(code) => tally.answer(code),
                        None => tally.close(),
                    },
                }
                std::future::pending::<()>().await;
            });
        }
        keep.push((endpoint, conn));
    }
    while tasks.join_next().await.is_some() {}
    std::future::pending().await
}

/// decode-amp: connections × (streams, at most [`AMP_MAX_STREAMS`]) streams, each sending
/// frames of `amp_events` empty events back to back (waiting for each answer), with no token
/// on even streams and an invalid one on odd streams. A stream the relay ends is replaced.
pub async fn decode_amp(aim: Arc<Aim>, tally: Arc<Tally>) -> anyhow::Result<()> {
    let frame = |token: &str| {
        // Written by hand: prost would first build (and keep) the half million events.
        let mut body = Vec::with_capacity(2 * aim.intensity.amp_events as usize + token.len() + 8);
        for _ in 0..aim.intensity.amp_events {
            body.extend_from_slice(&EMPTY_EVENT);
        }
        if !token.is_empty() {
            prost::encoding::string::encode(2, &token.to_owned(), &mut body);
        }
        let mut frame = Vec::with_capacity(body.len() + 10);
        prost::encoding::encode_varint(body.len() as u64, &mut frame);
        frame.extend_from_slice(&body);
        Bytes::from(frame)
    };
    let frames = [frame(""), frame("attack-invalid-token")];
    let mut tasks = JoinSet::new();
    let mut keep = Vec::new();
    for c in 0..aim.intensity.connections as usize {
        let endpoint = endpoint(&aim, ALPN_EDGERELAY, c)?;
        let conn = connect(&endpoint, &aim).await?;
        for s in 0..aim.intensity.streams.min(AMP_MAX_STREAMS) as usize {
            let (conn, tally, frame) = (conn.clone(), Arc::clone(&tally), frames[s % 2].clone());
            tasks.spawn(async move {
                loop {
                    let Ok((mut send, mut recv)) = conn.open_bi().await else {
                        tally.close();
                        return;
                    };
                    loop {
                        tally.start();
                        // Written piece by piece so that what got out before the relay stopped
                        // the stream is counted.
                        let mut at = 0;
                        while at < frame.len() {
                            match send.write(&frame[at..]).await {
                                Ok(n) => {
                                    tally.sent(n);
                                    at += n;
                                }
                                Err(_) => break,
                            }
                        }
                        if at < frame.len() {
                            tally.close();
                            break;
                        }
                        match read_answer(&mut recv).await {
                            Some(code) => tally.answer(code),
                            None => {
                                tally.close();
                                break;
                            }
                        }
                    }
                    sleep(Duration::from_millis(10)).await;
                }
            });
        }
        keep.push((endpoint, conn));
    }
    while tasks.join_next().await.is_some() {}
    std::future::pending().await
}

/// The QUIC half of conn-flood: up to `flood_connections` native connections (handshake done,
/// no stream), opened at half of `connect_rate`, held; one endpoint per source address.
pub async fn conn_flood(aim: Arc<Aim>, tally: Arc<Tally>) -> anyhow::Result<()> {
    let endpoints: Vec<quinn::Endpoint> = (0..aim.sources.len().max(1))
        .map(|n| endpoint(&aim, ALPN_EDGERELAY, n))
        .collect::<anyhow::Result<_>>()?;
    let every = Duration::from_secs_f64(2.0 / f64::from(aim.intensity.connect_rate.max(1)));
    let mut held = JoinSet::new();
    for n in 0..aim.intensity.flood_connections as usize {
        let (endpoint, tally, aim) =
            (endpoints[n % endpoints.len()].clone(), Arc::clone(&tally), Arc::clone(&aim));
        held.spawn(async move {
            tally.start();
            match connect(&endpoint, &aim).await {
                Ok(conn) => {
                    tally.answer("QUIC connected");
                    conn.closed().await;
                    tally.answer("QUIC closed by the relay");
                }
                Err(_) => {
                    tally.answer("QUIC refused");
                    tally.close();
                }
            }
        });
        sleep(every).await;
    }
    while held.join_next().await.is_some() {}
    drop(endpoints);
    std::future::pending().await
}

/// Reads one answer frame; its error code (or `accepted`), or `None` if the stream ended or
/// was reset first.
async fn read_answer(recv: &mut quinn::RecvStream) -> Option<String> {
    let mut buf = BytesMut::new();
    loop {
        let mut view = &buf[..];
        if let Ok(len) = prost::decode_length_delimiter(&mut view) {
            let head = buf.len() - view.len();
            if view.len() >= len {
                buf.advance(head);
                let answer = proto::PublishResponse::decode(&buf[..len]).ok()?;
                return Some(match answer.error {
                    Some(e) => e.code,
                    None => "answered".to_owned(),
                });
            }
        }
        match recv.read_chunk(MAX_ANSWER, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            _ => return None,
        }
    }
}
