//! The relay binary the loadtest tests run (nats-server comes from the test kit).

use std::ffi::OsString;
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

/// The flags that name both binaries to a scenario that starts its own processes:
/// `--nats-server-bin` (the test kit's) and `--relay-bin`.
#[allow(dead_code)] // Not every test that includes this module runs such a scenario.
pub fn bin_flags() -> [OsString; 4] {
    [
        "--nats-server-bin".into(),
        edgerelay_testkit::nats_server_bin().into(),
        "--relay-bin".into(),
        relay_bin().into(),
    ]
}
