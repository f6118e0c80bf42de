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

/// Fails if a process of the run is left: every child's command line names a path under `out`.
#[allow(dead_code)] // Not every test that includes this module starts processes.
pub fn assert_nothing_left(out: &Path) {
    let ps = std::process::Command::new("ps").args(["-eo", "pid,args"]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    let out = out.to_string_lossy();
    let left: Vec<&str> = ps.lines().filter(|l| l.contains(out.as_ref())).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
}
