//! Smoke run of `loadtest global`: the real nats-server and three real relays behind the
//! in-process delay proxies, small RTTs, a low rate and a short run. Checks that every region
//! delivered every acknowledged event, that each region's send→consumer p50 is at least its
//! network floor (the one-way delays of the edge, NATS and consumer proxies: it cannot be
//! lower, so the proxies are in the path), that the files are written and that the relays are
//! gone afterwards. No upper bound on latency is asserted.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;

#[path = "support/bins.rs"]
mod bins;
use bins::bin_flags;

#[test]
fn global_runs_three_regions_through_their_proxies() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // (name, edge RTT, NATS RTT) in ms; the consumer is 4 ms from NATS.
    let regions = [("near", 5, 2), ("mid", 10, 4), ("far", 20, 6)];
    let consumer_rtt = 4;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadtest"));
    cmd.arg("global");
    for (name, edge, nats) in regions {
        cmd.args(["--region", &format!("{name}:{edge}:{nats}")]);
    }
    let output = cmd
        .args(["--consumer-rtt-ms", &consumer_rtt.to_string()])
        .args(["--rate", "50", "--warmup", "300ms", "--duration", "1s", "--consume-grace", "5s"])
        .args(["--connections", "1", "--concurrency", "16"])
        .args(bin_flags())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running loadtest global");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "loadtest global failed\n{stdout}\n{stderr}");

    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    let got = summary["regions"].as_array().unwrap();
    assert_eq!(got.len(), 3, "{summary}");
    for ((name, edge, nats), r) in regions.iter().zip(got) {
        assert_eq!(r["name"], *name, "{r}");
        assert_eq!(r["error_total"], 0, "{name}: {r}\n{stderr}");
        let ok = r["ok"].as_u64().unwrap();
        assert!(ok > 0, "{name} accepted nothing: {r}");
        assert_eq!(r["expected"].as_u64(), Some(ok), "{name}: {r}");
        assert_eq!(r["missing"], 0, "{name}: {r}");
        // Each event crossed the edge, NATS and consumer proxies one way each.
        let floor = f64::from(edge + nats + consumer_rtt) / 2.0;
        assert_eq!(r["floor_send_to_consumer_ms"].as_f64(), Some(floor), "{r}");
        let p50 = r["send_to_consumer_ms"]["p50"].as_f64().unwrap();
        assert!(p50 >= floor, "{name}: send->consumer p50 {p50} ms < floor {floor} ms: {r}");
        assert!(p50 >= f64::from(*edge) / 2.0, "{name}: {r}");
        // The relay's admin listener answered and the share is computed.
        assert!(r["relay"]["own_share_p99_ms"].is_number(), "{name}: {r}");
        assert!(r["relay"]["ingest_to_ack_p99_ms"].as_f64().unwrap() > 0.0, "{name}: {r}");
        for file in [format!("{name}.hgrm"), format!("{name}-e2e.hgrm")] {
            assert!(out.join(&file).exists(), "{file}");
        }
    }
    for file in ["table.md", "percentiles.svg", "logs/nats-server.log", "logs/relay-far.log"] {
        assert!(out.join(file).exists(), "{file}");
    }
    assert!(stdout.contains("| far | 20 | 6 |"), "{stdout}");
    assert!(stdout.contains("PASS") || stdout.contains("FAIL"), "{stdout}");

    // The relays were stopped: their admin listeners (named on stderr) no longer answer.
    let admins: Vec<SocketAddr> = stderr
        .split("(admin ")
        .skip(1)
        .filter_map(|rest| rest.split(')').next()?.parse().ok())
        .collect();
    assert_eq!(admins.len(), 3, "{stderr}");
    for admin in admins {
        assert!(TcpStream::connect(admin).is_err(), "a relay still listens on {admin}");
    }
}
