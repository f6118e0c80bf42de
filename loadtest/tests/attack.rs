//! The CI subset of the attack suite: `slow-h2`, `decode-amp` and `unauth-flood` of
//! `loadtest attack` for a few seconds each, at a low intensity, against the debug relay and a
//! real nats-server. Only that the suite runs and reports: each scenario completes with a
//! baseline and an attacked measurement, the relay's memory, the audit and log counts and what
//! the attack did; no timing or memory threshold is asserted (`--no-fail`). Afterwards no
//! relay or nats-server of the run is left.

#[path = "support/bins.rs"]
mod bins;
use bins::{assert_nothing_left, run_suite};

const SCENARIOS: [&str; 4] = ["attack", "slow-h2", "decode-amp", "unauth-flood"];

#[test]
fn short_attack_scenarios_run_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let flags = [
        "--rate",
        "50",
        "--duration",
        "2s",
        "--warmup",
        "1s",
        "--ramp",
        "1s",
        "--connections",
        "2",
        "--streams",
        "4",
        "--amp-events",
        "50000",
        "--flood-rate",
        "200",
        "--no-fail",
    ];
    let (rows, stdout) = run_suite(&[&SCENARIOS[..], &flags[..]].concat(), &out);
    for r in &rows {
        assert_eq!(r["completed"], true, "{r}\n{stdout}");
        assert!(r["baseline"]["goodput"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["attacked"]["goodput"].as_f64().is_some(), "{r}");
        assert!(r["rss_peak_mib"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["hwm_mib"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["attack_s"].as_f64().unwrap() > 1.0, "{r}");
        assert!(r["audit_bytes"].as_u64().is_some() && r["log_lines"].as_u64().is_some(), "{r}");
        let notes = r["notes"].as_array().unwrap();
        assert!(notes[0].as_str().unwrap().starts_with("attack: "), "{r}");
        assert!(matches!(r["pass"], serde_json::Value::Bool(_)), "{r}");
    }
    // Each attack reached the relay.
    let started = |name: &str| {
        let row = rows.iter().find(|r| r["scenario"] == name).unwrap();
        let line = row["notes"][0].as_str().unwrap().to_owned();
        assert!(!line.starts_with("attack: 0 started"), "{line}");
    };
    SCENARIOS[1..].iter().for_each(|s| started(s));
    assert!(stdout.contains("| slow-h2 |") && stdout.contains("Thresholds:"), "{stdout}");
    assert!(out.join("slow-h2/relay-relay.log").exists());

    // Nothing of the run is left: every child's command line names a config under `out`.
    assert_nothing_left(&out);
}
