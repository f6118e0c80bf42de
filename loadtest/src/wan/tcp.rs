//! TCP through a route: accept, connect upstream, and pump each direction through a
//! time-ordered queue (a chunk read at `t` is written at `t + delay`, never before the chunk
//! ahead of it), bounded in bytes.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use super::{Control, Model, Rng, Stats, TCP_CHUNK};

/// Release times of one TCP direction: each chunk's delay, clamped so the stream stays in order.
#[derive(Debug)]
struct InOrder {
    model: Model,
    rng: Rng,
    last: Option<Instant>,
}

/// What one TCP direction passes on, after its delay.
#[derive(Debug)]
enum Segment {
    /// Bytes, holding their share of the direction's byte budget until written.
    Data(Bytes, OwnedSemaphorePermit),
    /// The sender half-closed: shut down the write side.
    Fin,
    /// Reading failed (e.g. a reset): close the whole connection.
    Reset(io::Error),
}

impl InOrder {
    fn new(model: Model, rng: Rng) -> Self {
        InOrder { model, rng, last: None }
    }

    /// When a chunk read at `now` may be written: after its delay, and not before the last one.
    fn release(&mut self, now: Instant) -> Instant {
        let mut at = now + self.model.one_way(&mut self.rng);
        if let Some(last) = self.last {
            at = at.max(last);
        }
        self.last = Some(at);
        at
    }
}

/// Accepts TCP connections and proxies each until the route is dropped.
pub(super) async fn accept_tcp(
    listener: TcpListener,
    upstream: SocketAddr,
    model: Model,
    stats: Arc<Stats>,
    control: Arc<Control>,
) {
    let mut conns = JoinSet::new();
    let mut next_id: u64 = 0;
    let listen = listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    next_id += 1;
                    Stats::add(&stats.connections, 1);
                    let (stats, control) = (stats.clone(), control.clone());
                    conns.spawn(proxy_tcp(client, upstream, model, next_id, stats, control));
                }
                // Out of file descriptors and the like: wait instead of spinning.
                Err(e) => {
                    eprintln!("wan-proxy: accept on {listen}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next() => {}
        }
    }
}

/// One proxied TCP connection: both directions, until both are closed or one fails.
async fn proxy_tcp(
    client: TcpStream,
    upstream: SocketAddr,
    model: Model,
    id: u64,
    stats: Arc<Stats>,
    control: Arc<Control>,
) {
    let server = match TcpStream::connect(upstream).await {
        Ok(server) => server,
        Err(_) => {
            // Dropping the client closes it, as an unreachable upstream would.
            Stats::add(&stats.connect_failures, 1);
            return;
        }
    };
    // The proxy adds its delay on purpose; Nagle must not add more.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(
        client_read,
        server_write,
        InOrder::new(model, model.rng(id << 1)),
        &model,
        &stats,
        &control,
    );
    let down = pump(
        server_read,
        client_write,
        InOrder::new(model, model.rng(id << 1 | 1)),
        &model,
        &stats,
        &control,
    );
    // An error in either direction drops all four halves: both sockets close.
    let _ = tokio::try_join!(up, down);
}

/// One TCP direction: reads chunks, and writes each at its release time, in order.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut order: InOrder,
    model: &Model,
    stats: &Stats,
    control: &Control,
) -> io::Result<()> {
    let budget = model.limits.max_queued_bytes;
    let chunk = TCP_CHUNK.min(budget);
    let queued = Arc::new(Semaphore::new(budget));
    // Unbounded in count, but every Data segment holds at least one permit of the byte budget
    // and at most one Fin or Reset follows them.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Segment)>();
    let read = async move {
        let mut buf = BytesMut::with_capacity(chunk);
        loop {
            buf.reserve(chunk);
            let segment = match (&mut from).take(chunk as u64).read_buf(&mut buf).await {
                Ok(0) => Segment::Fin,
                Ok(n) => {
                    let now = Instant::now();
                    let data = buf.split().freeze();
                    // n <= chunk <= budget, so this waits for room rather than forever.
                    let permit = queued
                        .clone()
                        .acquire_many_owned(n as u32)
                        .await
                        .map_err(|_| io::Error::other("byte budget closed"))?;
                    let at = order.release(now) + control.extra_delay();
                    if tx.send((at, Segment::Data(data, permit))).is_err() {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => Segment::Reset(e),
            };
            let _ = tx.send((order.release(Instant::now()) + control.extra_delay(), segment));
            return Ok::<(), io::Error>(());
        }
    };
    let write = async move {
        while let Some((at, segment)) = rx.recv().await {
            if at > Instant::now() {
                sleep_until(at).await;
            }
            // A black hole holds everything (a FIN or reset too) until it closes.
            control.open().await;
            match segment {
                Segment::Data(data, permit) => {
                    to.write_all(&data).await?;
                    Stats::add(&stats.tcp_bytes, data.len() as u64);
                    drop(permit);
                }
                Segment::Fin => {
                    to.shutdown().await?;
                    return Ok(());
                }
                Segment::Reset(e) => return Err(e),
            }
        }
        Ok(())
    };
    tokio::try_join!(read, write).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wan::tests::model;

    #[test]
    fn tcp_release_times_never_go_backwards() {
        let m = model(20, 15, 0.0);
        let mut order = InOrder::new(m, m.rng(1));
        let start = Instant::now();
        let mut last = start;
        for i in 0..10_000u64 {
            let at = order.release(start + Duration::from_micros(i * 100));
            assert!(at >= last);
            last = at;
        }
    }
}
