//! Running under systemd, all of it inert when systemd's variables are not set:
//!
//! - `Type=notify` ([`notify`]): `READY=1` once `/readyz` would answer 200 (every listener
//!   bound, and a JetStream cluster answered or the spool can take events), `STATUS=` lines
//!   with a short health summary every few seconds, `STOPPING=1` when the drain starts.
//! - The watchdog ([`notify`]): with `WATCHDOG_USEC` set, `WATCHDOG=1` every half interval,
//!   but only while every batch driver keeps recording heartbeats
//!   ([`crate::batch::driver::Heartbeats`]). A driver that went longer than the watchdog
//!   interval without one is taken as stuck and the pings stop, so systemd restarts the relay.
//!   A healthy driver blocks at most `nats.publish_deadline_ms` (waiting for room in the ack
//!   window), so `WatchdogSec=` must be larger than that (30 s against the default 5 s).
//! - Socket activation ([`listen`]): the HTTPS, QUIC and admin sockets taken from
//!   `LISTEN_FDS`, matched by their `FileDescriptorName=` (`https`, `quic`, `admin`); the relay
//!   binds whatever was not passed itself.
//!
//! [`Systemd::from_env`] reads it all once, in `main`, before the runtime starts a thread
//! (it removes the socket-activation variables from the environment).

pub mod listen;
pub mod notify;

use std::time::Duration;

pub use listen::{Inherited, ListenError};
pub use notify::Notifier;

/// What systemd handed this process.
#[derive(Debug, Default)]
pub struct Systemd {
    /// `NOTIFY_SOCKET`.
    pub notifier: Option<Notifier>,
    /// `WATCHDOG_USEC` (when `WATCHDOG_PID` is unset or this process).
    pub watchdog: Option<Duration>,
    /// `LISTEN_FDS` sockets.
    pub sockets: Inherited,
}

impl Systemd {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC`/`WATCHDOG_PID` and takes the `LISTEN_FDS`
    /// sockets (removing `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` from the
    /// environment). Call it before any thread is started.
    pub fn from_env() -> Result<Self, ListenError> {
        let sockets = Inherited::from_env()?;
        Ok(Self { notifier: Notifier::from_env(), watchdog: notify::watchdog_from_env(), sockets })
    }
}
