//! The `[admin]` section: where the admin listener listens. Nothing in it can be wrong on its
//! own; that it must not share an address with a front-end is checked by the top-level config.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The admin listener: health, readiness and Prometheus metrics.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener (`/healthz`, `/readyz`, `/metrics`, `/debug/latency`).
    /// Plain HTTP: keep it on a management network or loopback.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 9090)) }
    }
}
