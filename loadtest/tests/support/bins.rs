//! The binaries the loadtest smoke tests run: nats-server and this workspace's relay.

use std::path::{Path, PathBuf};

/// `$NATS_SERVER_BIN`, or the one `scripts/setup-tools` installs.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/nats-server");
    assert!(p.exists(), "nats-server not found at {}: run scripts/setup-tools", p.display());
    p
}

/// The relay binary, built by cargo next to `loadtest`.
pub fn relay_bin() -> PathBuf {
    let relay = Path::new(env!("CARGO_BIN_EXE_loadtest")).with_file_name("edgerelay");
    assert!(
        relay.exists(),
        "{} not found: build it first (cargo build -p edgerelay --bin edgerelay)",
        relay.display()
    );
    relay
}
