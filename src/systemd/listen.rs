//! Socket activation: the sockets systemd passes as fds 3.. (`LISTEN_FDS`, for this process
//! per `LISTEN_PID`), matched by the names `edgerelay.socket` gives them
//! (`FileDescriptorName=https`, `quic`, `admin`, in `LISTEN_FDNAMES`). Each is checked to be
//! the kind of socket its name says; a socket with another name is closed with a warning.

use std::os::fd::{AsFd, OwnedFd};

/// The listeners systemd passed; the relay binds the ones that are `None` itself.
#[derive(Debug, Default)]
pub struct Inherited {
    /// `https`: a TCP listening socket.
    pub https: Option<std::net::TcpListener>,
    /// `quic`: a UDP socket.
    pub quic: Option<std::net::UdpSocket>,
    /// `admin`: a TCP listening socket.
    pub admin: Option<std::net::TcpListener>,
}

/// Why the sockets systemd passed cannot be used. The operator's side (the socket unit).
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// `LISTEN_PID` or `LISTEN_FDS` is not a number.
    #[error("socket activation: malformed LISTEN_PID/LISTEN_FDS")]
    Env,
    /// Two sockets carry the same name.
    #[error("socket activation: two sockets are named {0:?}")]
    Duplicate(&'static str),
    /// A socket is not what its name says (e.g. `ListenDatagram=` named `https`).
    #[error("socket activation: the socket named {name:?} is not {want}")]
    WrongKind { name: &'static str, want: &'static str },
    /// The socket could not be inspected or set up.
    #[error("socket activation: socket {name:?}: {source}")]
    Io { name: &'static str, source: std::io::Error },
}

impl Inherited {
    /// Takes the sockets systemd passed to this process and removes `LISTEN_PID`,
    /// `LISTEN_FDS` and `LISTEN_FDNAMES` from the environment (so nothing it starts takes
    /// them too). Nothing passed: all `None`.
    pub fn from_env() -> Result<Self, ListenError> {
        let fds = sd_listen_fds::get().map_err(|_| ListenError::Env);
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
        let fds = fds?.into_iter().map(|(name, fd)| (name, fd.into_std()));
        Self::from_fds(fds)
    }

    /// Sorts named sockets into the three listeners.
    pub fn from_fds(
        fds: impl IntoIterator<Item = (Option<String>, OwnedFd)>,
    ) -> Result<Self, ListenError> {
        let mut me = Self::default();
        for (name, fd) in fds {
            match name.as_deref() {
                Some("https") => {
                    let l = tcp_listener("https", fd)?;
                    put(&mut me.https, "https", l)?;
                }
                Some("admin") => {
                    let l = tcp_listener("admin", fd)?;
                    put(&mut me.admin, "admin", l)?;
                }
                Some("quic") => {
                    let s = udp_socket(fd)?;
                    put(&mut me.quic, "quic", s)?;
                }
                other => tracing::warn!(
                    name = other.unwrap_or(""),
                    "socket activation: a socket with a name other than https, quic or admin; closing it"
                ),
            }
        }
        for (name, addr) in [
            ("https", me.https.as_ref().and_then(|l| l.local_addr().ok())),
            ("quic", me.quic.as_ref().and_then(|s| s.local_addr().ok())),
            ("admin", me.admin.as_ref().and_then(|l| l.local_addr().ok())),
        ] {
            if let Some(addr) = addr {
                tracing::info!(name, %addr, "socket activation: listener inherited from systemd");
            }
        }
        Ok(me)
    }

    /// Nothing was passed.
    pub fn is_empty(&self) -> bool {
        self.https.is_none() && self.quic.is_none() && self.admin.is_none()
    }
}

fn put<T>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), ListenError> {
    match slot.replace(value) {
        None => Ok(()),
        Some(_) => Err(ListenError::Duplicate(name)),
    }
}

/// Checks `fd` is a socket of `kind` and makes it non-blocking and close-on-exec.
fn prepare(
    name: &'static str,
    fd: OwnedFd,
    kind: socket2::Type,
    want: &'static str,
) -> Result<socket2::Socket, ListenError> {
    let io = |source| ListenError::Io { name, source };
    let socket = socket2::Socket::from(fd);
    let inet = socket.local_addr().map_err(io)?.as_socket().is_some();
    if !inet || socket.r#type().map_err(io)? != kind {
        return Err(ListenError::WrongKind { name, want });
    }
    socket.set_nonblocking(true).map_err(io)?;
    rustix::io::fcntl_setfd(socket.as_fd(), rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| io(e.into()))?;
    Ok(socket)
}

fn tcp_listener(name: &'static str, fd: OwnedFd) -> Result<std::net::TcpListener, ListenError> {
    Ok(prepare(name, fd, socket2::Type::STREAM, "a TCP listening socket (ListenStream=)")?.into())
}

fn udp_socket(fd: OwnedFd) -> Result<std::net::UdpSocket, ListenError> {
    Ok(prepare("quic", fd, socket2::Type::DGRAM, "a UDP socket (ListenDatagram=)")?.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_sorted_by_name_and_checked() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let got = Inherited::from_fds([
            (Some("https".to_owned()), OwnedFd::from(tcp)),
            (Some("quic".to_owned()), OwnedFd::from(udp)),
            (
                Some("other".to_owned()),
                OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap()),
            ),
        ])
        .unwrap();
        assert_eq!(got.https.unwrap().local_addr().unwrap(), addr);
        assert!(got.quic.is_some() && got.admin.is_none());

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err =
            Inherited::from_fds([(Some("https".to_owned()), OwnedFd::from(udp))]).unwrap_err();
        assert!(matches!(err, ListenError::WrongKind { name: "https", .. }), "{err}");
        let two = [0, 1].map(|_| {
            (
                Some("admin".to_owned()),
                OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap()),
            )
        });
        assert!(matches!(Inherited::from_fds(two), Err(ListenError::Duplicate("admin"))));
        assert!(Inherited::from_fds([]).unwrap().is_empty());
    }
}
