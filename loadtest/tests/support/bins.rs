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

/// Runs `loadtest SUITE SCENARIO… FLAGS…` (`argv`) with both binaries, `--out OUT` and
/// `--json`; asserts it succeeded and wrote one row per scenario, in order (the scenarios are
/// `argv[1..]` up to the first flag). Returns the rows and the printed table.
#[allow(dead_code)] // Not every test that includes this module runs a suite.
pub fn run_suite(argv: &[&str], out: &Path) -> (Vec<serde_json::Value>, String) {
    let json = out.with_extension("json");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(argv)
        .args(bin_flags())
        .arg("--out")
        .arg(out)
        .arg("--json")
        .arg(&json)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running loadtest");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "loadtest {} failed\n{stdout}\n{stderr}", argv[0]);
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = rows.as_array().unwrap().clone();
    let names: Vec<&str> = rows.iter().map(|r| r["scenario"].as_str().unwrap()).collect();
    let asked: Vec<&str> = argv[1..].iter().take_while(|a| !a.starts_with('-')).copied().collect();
    assert_eq!(names, asked, "{stdout}");
    (rows, stdout)
}
