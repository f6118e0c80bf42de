//! Free loopback ports, and waiting for a port to accept connections.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

/// Attempts at finding a port free for both TCP and UDP.
const SHARED_PORT_ATTEMPTS: usize = 64;

/// How often [`wait_for_port`] tries to connect.
const PORT_POLL: Duration = Duration::from_millis(20);

/// `127.0.0.1:port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A TCP port free on 127.0.0.1 when asked (the OS may hand it out again later).
///
/// # Panics
/// If nothing can bind the loopback interface.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind(local(0)).expect("binding 127.0.0.1:0");
    listener.local_addr().expect("a bound listener has an address").port()
}

/// A port free for both TCP and UDP on 127.0.0.1: for a relay whose HTTPS and QUIC listeners
/// share one port, or a QUIC listener that must not collide with a TCP one.
///
/// # Panics
/// If nothing can bind the loopback interface, or no port was free for both in 64 attempts.
pub fn free_shared_port() -> u16 {
    for _ in 0..SHARED_PORT_ATTEMPTS {
        let tcp = TcpListener::bind(local(0)).expect("binding 127.0.0.1:0");
        let port = tcp.local_addr().expect("a bound listener has an address").port();
        if UdpSocket::bind(local(port)).is_ok() {
            return port;
        }
    }
    panic!("no port was free for both TCP and UDP in {SHARED_PORT_ATTEMPTS} attempts")
}

/// Waits (blocking, up to `within`) until 127.0.0.1:`port` accepts a TCP connection.
///
/// # Panics
/// If it does not within `within`.
pub fn wait_for_port(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while TcpStream::connect(local(port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened within {within:?}");
        std::thread::sleep(PORT_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_can_be_bound() {
        let port = free_port();
        assert_ne!(port, 0);
        TcpListener::bind(local(port)).unwrap();
    }

    #[test]
    fn a_shared_port_is_free_for_tcp_and_udp() {
        let port = free_shared_port();
        let _tcp = TcpListener::bind(local(port)).unwrap();
        let _udp = UdpSocket::bind(local(port)).unwrap();
    }

    #[test]
    fn waiting_for_a_listening_port_returns_at_once() {
        let listener = TcpListener::bind(local(0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let started = Instant::now();
        wait_for_port(port, Duration::from_secs(5));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    #[should_panic(expected = "never opened")]
    fn waiting_for_a_closed_port_gives_up() {
        wait_for_port(free_port(), Duration::from_millis(100));
    }
}
