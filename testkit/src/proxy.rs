//! A TCP proxy that delays every chunk by a fixed time each way: a NATS cluster (or any
//! upstream) farther away than the one on loopback. `loadtest`'s WAN proxy (`wan.rs`) is the
//! full emulator (jitter, loss, UDP, bounds, fault switches); this is the smallest one a test
//! needs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// Largest read, and so the largest chunk one delay applies to.
const CHUNK: usize = 64 << 10;

/// Starts a proxy on a free loopback port to `upstream` that delays every chunk by `delay`
/// each way (so a round trip through it takes `2 × delay` more), and returns its address. It
/// runs until the runtime it was started on ends.
///
/// # Panics
/// If nothing can bind the loopback interface.
pub async fn delay_proxy(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding 127.0.0.1:0");
    let addr = listener.local_addr().expect("a bound listener has an address");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else { continue };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, delay));
            tokio::spawn(pump(sr, cw, delay));
        }
    });
    addr
}

/// Copies `from` to `to`, each chunk written `delay` after it was read, in order. A closed or
/// broken `from` ends the copy once what was read has been written (the write half's drop
/// passes the FIN on).
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; CHUNK];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free loopback port.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_round_trip_through_the_proxy_takes_twice_the_delay_and_keeps_the_bytes() {
        let delay = Duration::from_millis(40);
        let proxy = delay_proxy(echo().await, delay).await;
        let mut conn = TcpStream::connect(proxy).await.unwrap();
        let started = Instant::now();
        conn.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        assert!(started.elapsed() >= 2 * delay, "{:?}", started.elapsed());

        // The client's FIN reaches the server, whose FIN comes back: the copy ends.
        conn.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest));
        assert_eq!(read.await.unwrap().unwrap(), 0);
    }
}
