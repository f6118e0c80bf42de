//! UDP through a route: one upstream socket per client address (a session, expired when idle),
//! each datagram delayed on its own (jitter may reorder them) or lost, queues bounded in bytes.

use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

use super::{Control, Model, Rng, Stats, MAX_DATAGRAM, UDP_CHANNEL};

/// Datagrams of one UDP direction waiting for their release time, bounded in bytes.
#[derive(Debug)]
struct DatagramQueue {
    heap: BinaryHeap<Due>,
    bytes: usize,
    max_bytes: usize,
    seq: u64,
}

/// A queued datagram, ordered earliest release (then arrival) first.
#[derive(Debug)]
struct Due {
    at: Instant,
    seq: u64,
    data: Bytes,
}

/// Where a UDP direction delivers: the upstream (connected socket) or a client.
#[derive(Clone, Debug)]
enum Dest {
    Upstream(Arc<UdpSocket>),
    Client(Arc<UdpSocket>, SocketAddr),
}

/// One client's UDP session; dropping it stops its tasks and closes its upstream socket.
#[derive(Debug)]
struct Session {
    to_upstream: mpsc::Sender<(Instant, Bytes)>,
    last_active: Arc<AtomicU64>,
    _tasks: JoinSet<()>,
}

impl DatagramQueue {
    fn new(max_bytes: usize) -> Self {
        DatagramQueue { heap: BinaryHeap::new(), bytes: 0, max_bytes, seq: 0 }
    }

    /// Queues `data` for release at `at`; false (and nothing queued) if it would exceed the
    /// byte bound.
    fn push(&mut self, at: Instant, data: Bytes) -> bool {
        if self.bytes + data.len() > self.max_bytes {
            return false;
        }
        self.bytes += data.len();
        self.seq += 1;
        self.heap.push(Due { at, seq: self.seq, data });
        true
    }

    /// The earliest release time queued.
    fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|d| d.at)
    }

    /// The next datagram due at `now`, if any.
    fn pop_due(&mut self, now: Instant) -> Option<Bytes> {
        if self.heap.peek()?.at > now {
            return None;
        }
        let due = self.heap.pop()?;
        self.bytes -= due.data.len();
        Some(due.data)
    }
}

impl Dest {
    async fn send(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Dest::Upstream(socket) => socket.send(data).await,
            Dest::Client(socket, to) => socket.send_to(data, to).await,
        }
    }
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest release must come out first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Receives client datagrams, keeps one session per client address, and expires idle ones.
pub(super) async fn serve_udp(
    socket: Arc<UdpSocket>,
    upstream: SocketAddr,
    model: Model,
    stats: Arc<Stats>,
    control: Arc<Control>,
) {
    let epoch = Instant::now();
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let mut next_id: u64 = 0;
    let mut sweep =
        tokio::time::interval((model.limits.udp_idle / 2).max(Duration::from_millis(10)));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                // e.g. ICMP errors surfacing on the listening socket: nothing to forward.
                Err(_) => continue,
            },
            _ = sweep.tick() => {
                let now = millis_since(epoch);
                let idle = model.limits.udp_idle.as_millis() as u64;
                sessions.retain(|_, s| now.saturating_sub(s.last_active.load(Ordering::Relaxed)) < idle);
                continue;
            }
        };
        let now = Instant::now();
        if !sessions.contains_key(&from) {
            if sessions.len() >= model.limits.max_udp_sessions {
                Stats::add(&stats.datagrams_overflow, 1);
                continue;
            }
            next_id += 1;
            let opened =
                open_session(&socket, from, upstream, &model, next_id, epoch, &stats, &control);
            match opened.await {
                Ok(session) => {
                    Stats::add(&stats.udp_sessions, 1);
                    sessions.insert(from, session);
                }
                Err(e) => {
                    eprintln!("wan-proxy: opening a UDP session to {upstream}: {e}");
                    Stats::add(&stats.datagrams_overflow, 1);
                    continue;
                }
            }
        }
        let Some(session) = sessions.get(&from) else { continue };
        session.last_active.store(millis_since(epoch), Ordering::Relaxed);
        if session.to_upstream.try_send((now, Bytes::copy_from_slice(&buf[..n]))).is_err() {
            Stats::add(&stats.datagrams_overflow, 1);
        }
    }
}

/// Opens a client's session: an upstream socket and the tasks of both directions.
#[allow(clippy::too_many_arguments)] // the route's shared state, passed down unbundled
async fn open_session(
    listen: &Arc<UdpSocket>,
    client: SocketAddr,
    upstream: SocketAddr,
    model: &Model,
    id: u64,
    epoch: Instant,
    stats: &Arc<Stats>,
    control: &Arc<Control>,
) -> io::Result<Session> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let up_socket = Arc::new(UdpSocket::bind(local).await?);
    up_socket.connect(upstream).await?;
    let last_active = Arc::new(AtomicU64::new(millis_since(epoch)));
    let (to_upstream, up_rx) = mpsc::channel(UDP_CHANNEL);
    let (to_client, down_rx) = mpsc::channel(UDP_CHANNEL);
    let mut tasks = JoinSet::new();
    tasks.spawn(delay_datagrams(
        up_rx,
        Dest::Upstream(up_socket.clone()),
        *model,
        model.rng(id << 1),
        stats.clone(),
        control.clone(),
    ));
    tasks.spawn(delay_datagrams(
        down_rx,
        Dest::Client(listen.clone(), client),
        *model,
        model.rng(id << 1 | 1),
        stats.clone(),
        control.clone(),
    ));
    let active = last_active.clone();
    let stats = stats.clone();
    tasks.spawn(async move {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            match up_socket.recv(&mut buf).await {
                Ok(n) => {
                    let now = Instant::now();
                    active.store(millis_since(epoch), Ordering::Relaxed);
                    if to_client.try_send((now, Bytes::copy_from_slice(&buf[..n]))).is_err() {
                        Stats::add(&stats.datagrams_overflow, 1);
                    }
                }
                // A connected UDP socket reports an earlier datagram's ICMP error here
                // (upstream not listening); keep the session, as a real path would.
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    });
    Ok(Session { to_upstream, last_active, _tasks: tasks })
}

/// One UDP direction: applies loss, queues each datagram until its own release time, sends.
async fn delay_datagrams(
    mut rx: mpsc::Receiver<(Instant, Bytes)>,
    dest: Dest,
    model: Model,
    mut rng: Rng,
    stats: Arc<Stats>,
    control: Arc<Control>,
) {
    let mut queue = DatagramQueue::new(model.limits.max_queued_bytes);
    let mut open = true;
    while open || queue.next_deadline().is_some() {
        let deadline = queue.next_deadline();
        tokio::select! {
            received = rx.recv(), if open => match received {
                Some((arrived, data)) => {
                    if model.lost(&mut rng) {
                        Stats::add(&stats.datagrams_lost, 1);
                    } else if !queue.push(arrived + model.one_way(&mut rng) + control.extra_delay(), data) {
                        Stats::add(&stats.datagrams_overflow, 1);
                    }
                }
                None => open = false,
            },
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                let now = Instant::now();
                while let Some(data) = queue.pop_due(now) {
                    if *control.blackhole.borrow() {
                        Stats::add(&stats.datagrams_lost, 1);
                        continue;
                    }
                    // Like a router's output queue: a send error (buffer full, ICMP) loses it.
                    if dest.send(&data).await.is_ok() {
                        Stats::add(&stats.datagrams_forwarded, 1);
                    }
                }
            }
        }
    }
}

fn millis_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagram_queue_releases_by_time_and_bounds_bytes() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q = DatagramQueue::new(10);
        assert!(q.push(t0 + ms(30), Bytes::from_static(b"late")));
        assert!(q.push(t0 + ms(10), Bytes::from_static(b"soon")));
        // 8 bytes queued: two more fit, three do not.
        assert!(!q.push(t0 + ms(5), Bytes::from_static(b"abc")));
        assert!(q.push(t0 + ms(10), Bytes::from_static(b"ab")));
        assert_eq!(q.next_deadline(), Some(t0 + ms(10)));
        assert_eq!(q.pop_due(t0), None);
        // Released by time (reordered against arrival), ties in arrival order.
        assert_eq!(q.pop_due(t0 + ms(10)).as_deref(), Some(&b"soon"[..]));
        assert_eq!(q.pop_due(t0 + ms(10)).as_deref(), Some(&b"ab"[..]));
        assert_eq!(q.pop_due(t0 + ms(10)), None);
        assert_eq!(q.pop_due(t0 + ms(30)).as_deref(), Some(&b"late"[..]));
        assert_eq!(q.next_deadline(), None);
        assert!(q.push(t0, Bytes::from_static(b"0123456789")));
    }
}
