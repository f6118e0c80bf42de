//! Smoke run of the whole harness: a real nats-server, the real relay (the `edgerelay` binary
//! of this workspace) and `loadtest compare` over every mode with `--consume`, briefly and at a
//! low rate. Checks that each mode ran without errors, that every file is written and that the
//! consumer saw every acknowledged event; no timing is asserted.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgerelay_testkit::{relay_config, NatsServer, RelayConfigBuilder, TOKEN};

#[path = "support/bins.rs"]
mod bins;
use bins::relay_bin;

/// Child processes killed when the test ends, however it ends.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until `GET path` on `port` answers 200.
fn wait_ok(port: u16, path: &str, what: &str, relay: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = write!(tcp, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
            let mut answer = String::new();
            let _ = tcp.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") {
                return;
            }
        }
        if let Ok(Some(status)) = relay.try_wait() {
            panic!("{what} exited with {status}");
        }
        assert!(Instant::now() < deadline, "{what} not ready after 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A nats-server and a relay (HTTPS + QUIC, stream `SMOKE` on `edge.>`) in a temp dir.
struct Setup {
    /// First, so the processes are stopped before their directory is removed.
    _procs: Processes,
    nats: NatsServer,
    _dir: tempfile::TempDir,
    dir: PathBuf,
    https_port: u16,
    quic_port: u16,
    certs: PathBuf,
    relay_pid: u32,
}

fn start() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let relay = relay_bin();
    let mut procs = Processes(Vec::new());
    let nats = NatsServer::start();

    let certs = dir.join("certs");
    let status = Command::new(&relay)
        .args(["dev-certs", "--out"])
        .arg(&certs)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());

    let config = RelayConfigBuilder::new(&nats.url())
        .id("smoke")
        .certs_in(&certs)
        .quic()
        .stream("SMOKE", &["edge.>"])
        .free_ports()
        .build();
    relay_config::write_toml(&config, &dir.join("relay.toml")).unwrap();
    let mut child = Command::new(&relay)
        .args(["run", "--config"])
        .arg(dir.join("relay.toml"))
        .env("EDGERELAY_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("starting the relay");
    wait_ok(config.admin.listen.port(), "/readyz", "the relay", &mut child);
    let relay_pid = child.id();
    procs.0.push(child);
    Setup {
        _procs: procs,
        nats,
        _dir: tmp,
        dir,
        https_port: config.https.listen.port(),
        quic_port: config.quic.listen.expect("QUIC is on").port(),
        certs,
        relay_pid,
    }
}

/// `loadtest compare` against `setup` with `args`, output in `out`.
/// What every smoke run of `compare` shares: a second at a low rate, one connection.
const SHORT_RUN: &[&str] = &[
    "--rate",
    "200",
    "--warmup",
    "200ms",
    "--duration",
    "1s",
    "--pacer-spin",
    "0",
    "--connections",
    "1",
    "--concurrency",
    "16",
    "--consume-grace",
    "5s",
    "--direct-stream",
    "SMOKE_DIRECT",
    "--slo-p99-ms",
    "1000",
];

fn compare(setup: &Setup, out: &Path, args: &[&str]) -> (serde_json::Value, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .arg("compare")
        .args(SHORT_RUN)
        .args(args)
        .args(["--relay-https", &format!("https://127.0.0.1:{}", setup.https_port)])
        .args(["--relay-quic", &format!("127.0.0.1:{}", setup.quic_port)])
        .args(["--nats", &setup.nats.url()])
        .arg("--ca")
        .arg(setup.certs.join("ca.pem"))
        .arg("--out")
        .arg(out)
        .env("EDGERELAY_TOKEN", TOKEN)
        .output()
        .expect("running loadtest compare");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "loadtest compare failed\n{stdout}\n{stderr}");
    let summary =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    (summary, stdout)
}

#[test]
fn compare_runs_every_mode_end_to_end() {
    let setup = start();
    let out = setup.dir.join("out");
    let (summary, stdout) =
        compare(&setup, &out, &["--modes", "https,h3,quic,direct-js,bare", "--consume"]);
    let modes = summary["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(names, ["https", "h3", "quic", "direct-js", "bare"], "{stdout}");
    for m in modes {
        let name = m["mode"].as_str().unwrap();
        let s = &m["summary"];
        assert_eq!(s["error_total"], 0, "{name} had errors\n{stdout}");
        let ok = s["ok"].as_u64().unwrap();
        assert!(ok > 0, "{name} accepted nothing\n{stdout}");
        assert!(out.join(format!("{name}.hgrm")).exists(), "{name}.hgrm");
        if name == "bare" {
            // The bare server stores nothing, so there is nothing to consume.
            assert!(s.get("e2e").is_none(), "{s}");
        } else {
            let e2e = &s["e2e"];
            assert_eq!(e2e["expected"].as_u64(), Some(ok), "{name}: {e2e}");
            assert_eq!(e2e["seen"].as_u64(), Some(ok), "{name}: {e2e}\n{stdout}");
            assert_eq!(e2e["missing"], 0, "{name}: {e2e}");
            assert_eq!(e2e["latency_ms"]["count"].as_u64(), Some(ok), "{name}: {e2e}");
            assert!(out.join(format!("{name}-e2e.hgrm")).exists(), "{name}-e2e.hgrm");
        }
        if name != "bare" && name != "direct-js" {
            assert!(m["ratios"]["bare"]["rate"].is_number(), "{m}");
            assert!(m["ratios"]["direct-js"]["p99"].is_number(), "{m}");
        }
    }
    let svg = std::fs::read_to_string(out.join("percentiles.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
    // One send->answer line per mode, one send->consumer line per mode that stores events.
    assert_eq!(svg.matches(r#"<path class="series""#).count(), 5 + 4, "{svg}");
    assert!(svg.contains(r#"class="slo""#));
    assert!(stdout.contains("->consumer"), "{stdout}");
}

/// `--relay-pid` and `--at-fraction`: the relay's CPU per event in every run through it, and
/// each mode again at half its max with the consumer on. No timing is asserted.
#[test]
fn compare_reports_relay_cpu_and_the_run_at_a_fraction_of_max() {
    let setup = start();
    let out = setup.dir.join("out");
    let pid = setup.relay_pid.to_string();
    let (summary, stdout) = compare(
        &setup,
        &out,
        &[
            "--modes",
            "https,quic-e1,direct-js",
            "--find-max",
            "--find-max-steps",
            "1",
            "--at-fraction",
            "0.5",
            "--at-fraction-duration",
            "1s",
            "--relay-pid",
            &pid,
        ],
    );
    assert_eq!(summary["at_fraction"], 0.5);
    for m in summary["modes"].as_array().unwrap() {
        let name = m["mode"].as_str().unwrap();
        let at = &m["at_fraction"];
        assert_eq!(at["rate"], 100.0, "{name}: {at}");
        let s = &at["summary"];
        assert_eq!(s["error_total"], 0, "{name}: {s}\n{stdout}");
        let ok = s["ok"].as_u64().unwrap();
        assert!(ok > 0, "{name}: {s}");
        assert_eq!(s["e2e"]["seen"].as_u64(), Some(ok), "{name}: {s}");
        assert!(out.join(format!("{name}-at-fraction.hgrm")).exists(), "{name}");
        assert!(out.join(format!("{name}-at-fraction-e2e.hgrm")).exists(), "{name}");
        let cpu = &m["summary"]["relay_cpu_us_per_event"];
        if name == "direct-js" {
            assert!(cpu.is_null(), "direct-js does not load the relay: {m}");
        } else {
            assert!(cpu.as_f64().is_some_and(|c| c >= 0.0), "{name}: {m}");
            assert!(s["relay_cpu_us_per_event"].is_number(), "{name}: {s}");
        }
    }
    assert!(stdout.contains("CPU µs/ev"), "{stdout}");
    assert!(stdout.contains("at 0.5 of each mode's max rate"), "{stdout}");
    // Without --relay-admin the relay's ingest->ack is not measured; the summary holds
    // measurements only, no verdicts.
    for m in summary["modes"].as_array().unwrap() {
        assert!(m["at_fraction"].get("relay_ingest_to_ack_ms").is_none(), "{m}");
    }
    assert!(summary.get("targets").is_none(), "{summary}");
    let svg = std::fs::read_to_string(out.join("percentiles-at-fraction.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
}
