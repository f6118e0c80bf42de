//! The relay binary the loadtest tests run (nats-server comes from the test kit).

use std::path::{Path, PathBuf};

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
