//! `loadtest wan-proxy`: a userspace WAN emulator. The kernel here has no `sch_netem`, so a
//! proxy in front of a relay (or of NATS) delays what passes through it: each direction gets
//! `rtt/2` one-way delay plus uniform jitter within `±jitter` (never below zero), and UDP
//! datagrams are lost with probability `loss`.
//!
//! - **TCP**: the proxy accepts, connects upstream and pumps each direction through a
//!   time-ordered queue. A chunk read at `t` is written at `t + delay`, but never before the
//!   chunk ahead of it: jitter does not reorder a byte stream. Loss does not apply (on a real
//!   path it would show up as retransmission delay; that is not emulated). A FIN is passed on
//!   after the same delay as data, so half-closed connections keep working; a reset or write
//!   error tears the whole connection down. The kernel completes the TCP handshake itself, so
//!   `connect` through the proxy costs no round trip; everything after it does.
//! - **UDP**: one upstream socket per client address (a session, expired after
//!   [`Limits::udp_idle`] without traffic); each datagram is delayed on its own, so jitter may
//!   reorder them as a real network does.
//! - **Bounded**: at most [`Limits::max_queued_bytes`] wait per TCP direction (beyond that the
//!   proxy stops reading: backpressure, like a full TCP window) and per UDP session direction
//!   (beyond that datagrams are dropped and counted), and at most [`Limits::max_udp_sessions`]
//!   sessions per route. The TCP bound also caps a connection's throughput at roughly
//!   `max_queued_bytes / one-way delay`.
//! - **Deterministic**: delays and losses come from a SplitMix64 generator seeded per route,
//!   connection/session and direction from `--seed`, so a run's sequence of delays is
//!   reproducible (arrival times still depend on the machine).
//!
//! [`spawn`] starts one route in-process and returns a [`Proxy`] handle with the bound address,
//! for scenarios that put relays and NATS behind proxies without a subprocess. The handle also
//! changes the path while it runs, for fault injection: [`Proxy::set_extra_delay`] adds to
//! every one-way delay from then on (a path that turns slow), and [`Proxy::set_blackhole`]
//! stops forwarding in both directions while keeping every socket open (a path that goes dark
//! without a reset: TCP bytes wait in the proxy, or behind a full queue in the kernel, and flow
//! again when the hole closes; UDP datagrams are dropped and counted as lost).
//!
//! The TCP side is `wan/tcp.rs`, the UDP side `wan/udp.rs`, the path model `wan/model.rs` and
//! the `wan-proxy` command line `wan/cli.rs`; this file holds the route and its handle, and the
//! end-to-end tests of the proxy.

mod cli;
mod model;
mod tcp;
mod udp;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use cli::{run, Args};
use model::Rng;
pub use model::{Limits, Model};

/// Largest read from a TCP socket, and so the largest chunk one delay applies to.
const TCP_CHUNK: usize = 64 * 1024;

/// Largest UDP datagram.
const MAX_DATAGRAM: usize = 65_535;

/// Datagrams waiting to enter one direction's delay queue; beyond that they are dropped.
const UDP_CHANNEL: usize = 4096;

/// Tries to find a port free for both TCP and UDP when the route listens on port 0.
const SHARED_PORT_ATTEMPTS: usize = 16;

/// One proxy: where it listens, where it forwards to, and which protocols.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Address to listen on; port 0 picks one (the same port for TCP and UDP).
    pub listen: SocketAddr,
    /// Address to forward to.
    pub upstream: SocketAddr,
    /// Proxy TCP connections.
    pub tcp: bool,
    /// Proxy UDP datagrams.
    pub udp: bool,
}

/// A running route. Dropping it stops the proxy and closes every connection and session.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    stats: Arc<Stats>,
    control: Arc<Control>,
    _tasks: JoinSet<()>,
}

/// What a running route's handle can change: shared by every connection and session.
#[derive(Debug)]
struct Control {
    /// True while the path is a black hole.
    blackhole: watch::Sender<bool>,
    /// Added to every one-way delay drawn from now on, microseconds.
    extra_delay_us: AtomicU64,
}

/// What a proxy has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// TCP connections accepted.
    pub connections: u64,
    /// Accepted TCP connections whose upstream connect failed.
    pub connect_failures: u64,
    /// TCP bytes written, both directions.
    pub tcp_bytes: u64,
    /// UDP sessions opened.
    pub udp_sessions: u64,
    /// UDP datagrams delivered, both directions.
    pub datagrams_forwarded: u64,
    /// UDP datagrams dropped by the loss model.
    pub datagrams_lost: u64,
    /// UDP datagrams dropped because a queue or the session table was full.
    pub datagrams_overflow: u64,
}

/// Shared counters behind [`Counters`].
#[derive(Debug, Default)]
struct Stats {
    connections: AtomicU64,
    connect_failures: AtomicU64,
    tcp_bytes: AtomicU64,
    udp_sessions: AtomicU64,
    datagrams_forwarded: AtomicU64,
    datagrams_lost: AtomicU64,
    datagrams_overflow: AtomicU64,
}

impl Proxy {
    /// The address the proxy listens on (TCP and UDP share it).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the proxy has done so far.
    pub fn counters(&self) -> Counters {
        self.stats.snapshot()
    }

    /// Black-holes the path (`true`) or restores it (`false`). While black-holed nothing is
    /// forwarded in either direction, yet no socket is closed or reset: TCP data waits (in the
    /// proxy's bounded queue, then in the kernel) and is delivered in order once restored; UDP
    /// datagrams due meanwhile are dropped and counted in [`Counters::datagrams_lost`]. New
    /// TCP connections are still accepted (the kernel completes the handshake anyway).
    pub fn set_blackhole(&self, on: bool) {
        self.control.blackhole.send_replace(on);
    }

    /// Adds `extra` to every one-way delay drawn from now on (on top of the model's `rtt / 2`
    /// and jitter); `Duration::ZERO` returns to the model. Chunks already queued keep their
    /// release times, and a TCP direction never reorders.
    pub fn set_extra_delay(&self, extra: Duration) {
        let us = u64::try_from(extra.as_micros()).unwrap_or(u64::MAX);
        self.control.extra_delay_us.store(us, Ordering::Relaxed);
    }
}

impl Control {
    fn new() -> Self {
        Control { blackhole: watch::Sender::new(false), extra_delay_us: AtomicU64::new(0) }
    }

    fn extra_delay(&self) -> Duration {
        Duration::from_micros(self.extra_delay_us.load(Ordering::Relaxed))
    }

    /// Waits until the path is not black-holed.
    async fn open(&self) {
        let mut rx = self.blackhole.subscribe();
        let _ = rx.wait_for(|on| !*on).await;
    }
}

impl Stats {
    fn snapshot(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            connections: get(&self.connections),
            connect_failures: get(&self.connect_failures),
            tcp_bytes: get(&self.tcp_bytes),
            udp_sessions: get(&self.udp_sessions),
            datagrams_forwarded: get(&self.datagrams_forwarded),
            datagrams_lost: get(&self.datagrams_lost),
            datagrams_overflow: get(&self.datagrams_overflow),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match (self.tcp, self.udp) {
            (true, true) => "tcp+udp",
            (true, false) => "tcp",
            (false, true) => "udp",
            (false, false) => "nothing",
        };
        write!(f, "{proto} {} -> {}", self.listen, self.upstream)
    }
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connections {} (upstream connect failed {}) tcp bytes {} udp sessions {} \
             datagrams forwarded {} lost {} dropped on overflow {}",
            self.connections,
            self.connect_failures,
            self.tcp_bytes,
            self.udp_sessions,
            self.datagrams_forwarded,
            self.datagrams_lost,
            self.datagrams_overflow
        )
    }
}

/// Starts one route. With both TCP and UDP on port 0, both listen on the same free port.
pub async fn spawn(route: &Route, model: &Model) -> anyhow::Result<Proxy> {
    model.validate()?;
    ensure!(route.tcp || route.udp, "route {route} proxies neither TCP nor UDP");
    let (tcp, udp, addr) = bind(route).await?;
    let stats = Arc::new(Stats::default());
    let control = Arc::new(Control::new());
    let mut tasks = JoinSet::new();
    if let Some(listener) = tcp {
        tasks.spawn(tcp::accept_tcp(
            listener,
            route.upstream,
            *model,
            stats.clone(),
            control.clone(),
        ));
    }
    if let Some(socket) = udp {
        let socket = Arc::new(socket);
        tasks.spawn(udp::serve_udp(socket, route.upstream, *model, stats.clone(), control.clone()));
    }
    Ok(Proxy { addr, stats, control, _tasks: tasks })
}

/// Binds the route's sockets; returns them and the address they share.
async fn bind(
    route: &Route,
) -> anyhow::Result<(Option<TcpListener>, Option<UdpSocket>, SocketAddr)> {
    let listen = route.listen;
    let bind_err = |proto: &str| format!("binding {proto} {listen}");
    match (route.tcp, route.udp) {
        (true, false) => {
            let tcp = TcpListener::bind(listen).await.with_context(|| bind_err("TCP"))?;
            let addr = tcp.local_addr()?;
            Ok((Some(tcp), None, addr))
        }
        (false, true) => {
            let udp = UdpSocket::bind(listen).await.with_context(|| bind_err("UDP"))?;
            let addr = udp.local_addr()?;
            Ok((None, Some(udp), addr))
        }
        _ if listen.port() != 0 => {
            let tcp = TcpListener::bind(listen).await.with_context(|| bind_err("TCP"))?;
            let udp = UdpSocket::bind(listen).await.with_context(|| bind_err("UDP"))?;
            Ok((Some(tcp), Some(udp), listen))
        }
        _ => {
            // Port 0 for both: take a free TCP port and try UDP on it; retry if UDP's is taken.
            for _ in 0..SHARED_PORT_ATTEMPTS {
                let tcp = TcpListener::bind(listen).await.with_context(|| bind_err("TCP"))?;
                let addr = tcp.local_addr()?;
                if let Ok(udp) = UdpSocket::bind(addr).await {
                    return Ok((Some(tcp), Some(udp), addr));
                }
            }
            bail!("found no port free for both TCP and UDP on {listen}")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::atomic::AtomicU64;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::Instant;

    use super::*;

    const LOOPBACK: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

    pub(super) fn model(rtt_ms: u64, jitter_ms: u64, loss: f64) -> Model {
        Model {
            rtt: Duration::from_millis(rtt_ms),
            jitter: Duration::from_millis(jitter_ms),
            loss,
            seed: 7,
            limits: Limits::default(),
        }
    }

    fn route(upstream: SocketAddr, tcp: bool, udp: bool) -> Route {
        Route { listen: LOOPBACK, upstream, tcp, udp }
    }

    /// A TCP echo server and a UDP echo server on the same loopback port.
    async fn echo_servers() -> SocketAddr {
        let (tcp, udp, addr) = bind(&route(LOOPBACK, true, true)).await.unwrap();
        let (tcp, udp) = (tcp.unwrap(), udp.unwrap());
        tokio::spawn(async move {
            while let Ok((conn, _)) = tcp.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let _ = udp.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    fn median(mut samples: Vec<Duration>) -> Duration {
        samples.sort();
        samples[samples.len() / 2]
    }

    async fn tcp_round_trips(to: SocketAddr, n: usize) -> Duration {
        let mut conn = TcpStream::connect(to).await.unwrap();
        conn.set_nodelay(true).unwrap();
        let mut samples = Vec::with_capacity(n);
        let mut buf = [0u8; 8];
        for i in 0..n as u64 {
            let start = Instant::now();
            conn.write_all(&i.to_be_bytes()).await.unwrap();
            conn.read_exact(&mut buf).await.unwrap();
            samples.push(start.elapsed());
            assert_eq!(u64::from_be_bytes(buf), i);
        }
        median(samples)
    }

    async fn udp_round_trips(to: SocketAddr, n: usize) -> Duration {
        let socket = UdpSocket::bind(LOOPBACK).await.unwrap();
        socket.connect(to).await.unwrap();
        let mut samples = Vec::with_capacity(n);
        let mut buf = [0u8; 64];
        for i in 0..n as u64 {
            let start = Instant::now();
            socket.send(&i.to_be_bytes()).await.unwrap();
            let got = socket.recv(&mut buf).await.unwrap();
            samples.push(start.elapsed());
            assert_eq!(&buf[..got], &i.to_be_bytes());
        }
        median(samples)
    }

    /// The requirement: the proxy adds the configured delay, measured. TCP and UDP go
    /// through one proxy on one port (as a relay serves HTTPS and QUIC on one port). The median
    /// of 20 round trips must be at least the RTT (the proxy never releases early) and under
    /// RTT + 30 ms: loopback adds well under a millisecond, the rest of the margin is for a
    /// busy 2-core machine's scheduling and the timer's 1 ms granularity.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn adds_the_configured_round_trip_time() {
        let upstream = echo_servers().await;
        let direct_tcp = tcp_round_trips(upstream, 20).await;
        let direct_udp = udp_round_trips(upstream, 20).await;
        let proxy = spawn(&route(upstream, true, true), &model(40, 0, 0.0)).await.unwrap();
        let (tcp, udp) = tokio::join!(
            tcp_round_trips(proxy.local_addr(), 20),
            udp_round_trips(proxy.local_addr(), 20)
        );
        let rtt = Duration::from_millis(40);
        let margin = Duration::from_millis(30);
        eprintln!("median rtt: direct tcp {direct_tcp:?} udp {direct_udp:?}, proxied tcp {tcp:?} udp {udp:?}");
        assert!(tcp >= rtt && tcp < rtt + margin, "tcp median {tcp:?}");
        assert!(udp >= rtt && udp < rtt + margin, "udp median {udp:?}");
        assert!(direct_tcp < rtt / 2 && direct_udp < rtt / 2);
        // The proxy counts a write once it returned, which may be after the echo came back.
        let deadline = Instant::now() + Duration::from_secs(5);
        while proxy.counters().tcp_bytes < 2 * 20 * 8 || proxy.counters().datagrams_forwarded < 40 {
            assert!(Instant::now() < deadline, "{}", proxy.counters());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let c = proxy.counters();
        assert_eq!((c.connections, c.udp_sessions), (1, 1));
        assert_eq!((c.tcp_bytes, c.datagrams_forwarded), (2 * 20 * 8, 40));
    }

    /// Jitter wider than the one-way delay, and a stream of numbered records written in many
    /// small writes: they come back complete and in order.
    #[tokio::test]
    async fn jitter_does_not_reorder_tcp() {
        let upstream = echo_servers().await;
        let proxy = spawn(&route(upstream, true, false), &model(10, 8, 0.5)).await.unwrap();
        let conn = TcpStream::connect(proxy.local_addr()).await.unwrap();
        conn.set_nodelay(true).unwrap();
        let (mut r, mut w) = conn.into_split();
        const RECORDS: u32 = 2000;
        let writer = tokio::spawn(async move {
            for i in 0..RECORDS {
                w.write_all(&i.to_be_bytes()).await.unwrap();
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        let numbers: Vec<u32> =
            back.chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect();
        assert_eq!(numbers, (0..RECORDS).collect::<Vec<_>>());
    }

    /// A half-close crosses the proxy: the server reads to EOF, then answers and closes.
    #[tokio::test]
    async fn half_close_is_passed_on() {
        let server = TcpListener::bind(LOOPBACK).await.unwrap();
        let upstream = server.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = server.accept().await.unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).await.unwrap();
            got.reverse();
            conn.write_all(&got).await.unwrap();
        });
        let proxy = spawn(&route(upstream, true, false), &model(4, 0, 0.0)).await.unwrap();
        let mut conn = TcpStream::connect(proxy.local_addr()).await.unwrap();
        conn.write_all(b"hello").await.unwrap();
        conn.shutdown().await.unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"olleh");
    }

    /// With loss 0.5, the delivered share of 400 datagrams is binomial(400, 0.5): mean 200,
    /// standard deviation 10; the bounds are six deviations wide (and the seed makes the
    /// count reproducible anyway).
    #[tokio::test]
    async fn drops_the_configured_share_of_datagrams() {
        let sink = UdpSocket::bind(LOOPBACK).await.unwrap();
        let upstream = sink.local_addr().unwrap();
        let received = Arc::new(AtomicU64::new(0));
        let counted = received.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while sink.recv(&mut buf).await.is_ok() {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
        let proxy = spawn(&route(upstream, false, true), &model(2, 0, 0.5)).await.unwrap();
        let client = UdpSocket::bind(LOOPBACK).await.unwrap();
        for i in 0..400u32 {
            client.send_to(&i.to_be_bytes(), proxy.local_addr()).await.unwrap();
            // Paced, so neither socket's receive buffer overflows.
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let done = |c: Counters| c.datagrams_forwarded + c.datagrams_lost + c.datagrams_overflow;
        while done(proxy.counters()) < 400
            || received.load(Ordering::Relaxed) < proxy.counters().datagrams_forwarded
        {
            assert!(Instant::now() < deadline, "{}", proxy.counters());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let c = proxy.counters();
        assert_eq!(c.datagrams_overflow, 0);
        assert_eq!(c.datagrams_forwarded + c.datagrams_lost, 400);
        assert!((140..=260).contains(&c.datagrams_forwarded), "{c}");
        assert_eq!(received.load(Ordering::Relaxed), c.datagrams_forwarded);
    }

    /// A byte budget far below the data in flight slows the stream down (backpressure) but
    /// neither loses nor stalls it.
    #[tokio::test]
    async fn a_small_tcp_byte_budget_is_backpressure_not_loss() {
        let upstream = echo_servers().await;
        let mut m = model(2, 0, 0.0);
        m.limits.max_queued_bytes = 4096;
        let proxy = spawn(&route(upstream, true, false), &m).await.unwrap();
        let conn = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let (mut r, mut w) = conn.into_split();
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let data = sent.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        assert!(back == sent, "{} of {} bytes came back", back.len(), sent.len());
    }

    /// A UDP session queues at most its byte budget per direction; the rest is dropped and
    /// counted. The delay (400 ms) is far longer than sending the burst takes.
    #[tokio::test]
    async fn udp_beyond_the_byte_budget_is_dropped_and_counted() {
        let sink = UdpSocket::bind(LOOPBACK).await.unwrap();
        let upstream = sink.local_addr().unwrap();
        let mut m = model(800, 0, 0.0);
        m.limits.max_queued_bytes = 100;
        let proxy = spawn(&route(upstream, false, true), &m).await.unwrap();
        let client = UdpSocket::bind(LOOPBACK).await.unwrap();
        for i in 0..50u8 {
            client.send_to(&[i; 10], proxy.local_addr()).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while proxy.counters().datagrams_forwarded + proxy.counters().datagrams_overflow < 50 {
            assert!(Instant::now() < deadline, "{}", proxy.counters());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let c = proxy.counters();
        assert_eq!((c.datagrams_forwarded, c.datagrams_overflow), (10, 40), "{c}");
        let mut buf = [0u8; 16];
        assert_eq!(sink.recv(&mut buf).await.unwrap(), 10);
        assert_eq!(buf[0], 0);
    }

    /// A black hole stops both directions without closing the connection; restored, the
    /// held bytes arrive in order. UDP datagrams due meanwhile are dropped and counted.
    #[tokio::test]
    async fn a_black_hole_holds_tcp_and_drops_udp_until_restored() {
        let upstream = echo_servers().await;
        let proxy = spawn(&route(upstream, true, true), &model(2, 0, 0.0)).await.unwrap();
        let mut conn = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let mut buf = [0u8; 1];
        conn.write_all(b"a").await.unwrap();
        conn.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"a");

        proxy.set_blackhole(true);
        conn.write_all(b"bc").await.unwrap();
        let held = tokio::time::timeout(Duration::from_millis(300), conn.read(&mut buf)).await;
        assert!(held.is_err(), "bytes crossed a black hole: {held:?}");
        let udp = UdpSocket::bind(LOOPBACK).await.unwrap();
        udp.connect(proxy.local_addr()).await.unwrap();
        udp.send(b"lost").await.unwrap();
        let mut dgram = [0u8; 16];
        let got = tokio::time::timeout(Duration::from_millis(200), udp.recv(&mut dgram)).await;
        assert!(got.is_err(), "a datagram crossed a black hole");
        // A new connection is accepted meanwhile, and stays open.
        let mut late = TcpStream::connect(proxy.local_addr()).await.unwrap();
        late.write_all(b"z").await.unwrap();

        proxy.set_blackhole(false);
        let mut two = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut two))
            .await
            .expect("held bytes delivered after restore")
            .unwrap();
        assert_eq!(&two, b"bc");
        tokio::time::timeout(Duration::from_secs(5), late.read_exact(&mut buf))
            .await
            .expect("the late connection works after restore")
            .unwrap();
        assert_eq!(&buf, b"z");
        udp.send(b"back").await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), udp.recv(&mut dgram))
            .await
            .expect("datagrams pass again")
            .unwrap();
        assert_eq!(&dgram[..n], b"back");
        assert!(proxy.counters().datagrams_lost >= 1, "{}", proxy.counters());
    }

    /// An extra delay set while running applies to what is sent from then on, and can be
    /// taken back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_extra_delay_slows_the_path_until_cleared() {
        let upstream = echo_servers().await;
        let proxy = spawn(&route(upstream, true, false), &model(0, 0, 0.0)).await.unwrap();
        let fast = tcp_round_trips(proxy.local_addr(), 5).await;
        proxy.set_extra_delay(Duration::from_millis(100));
        let slow = tcp_round_trips(proxy.local_addr(), 5).await;
        proxy.set_extra_delay(Duration::ZERO);
        let again = tcp_round_trips(proxy.local_addr(), 5).await;
        assert!(slow >= Duration::from_millis(200), "{slow:?}");
        assert!(fast < Duration::from_millis(100) && again < Duration::from_millis(100));
    }
}
