//! The CI subset of the fault-injection suite: the short `nats-kill`, `failover`,
//! `spool-outage`, `drain`, `stream-full` and `spool-corrupt` scenarios of `loadtest chaos`
//! against the debug binaries and real nats-servers (about 90 s in all). Every scenario must
//! pass: no acknowledged event missing, no duplicate but across clusters, no fresh 2xx while
//! NATS was down, failover and fail-back, the spool replayed, the drain answered what was in
//! flight, the full stream refused clearly, the corrupted spool detected. Afterwards no relay
//! or nats-server of the run is left.

#[path = "support/bins.rs"]
mod bins;
use bins::{assert_nothing_left, run_suite};

const SCENARIOS: [&str; 7] =
    ["chaos", "nats-kill", "failover", "spool-outage", "drain", "stream-full", "spool-corrupt"];

#[test]
fn short_chaos_scenarios_lose_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (rows, stdout) = run_suite(&SCENARIOS, &out);
    for r in &rows {
        assert_eq!(r["pass"], true, "{r}\n{stdout}");
        assert_eq!(r["missing"], 0, "{r}");
        assert_eq!(r["duplicated"], r["verdict"]["duplicated_across_clusters"], "{r}");
        assert!(r["acknowledged"].as_u64().unwrap() > 0, "{r}");
        assert!(r["max_rss_mib"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["verdict"]["false_acks"], 0, "{r}");
    }
    // nats-kill really took NATS down twice and the relay recovered each time.
    let row = |name: &str| rows.iter().find(|r| r["scenario"] == name).unwrap();
    let kill = row("nats-kill");
    let faults = kill["timeline"]["all_down"].as_array().unwrap();
    assert_eq!(faults.len(), 2, "{kill}");
    assert!(kill["recovery_ms"].as_f64().is_some(), "{kill}");
    assert!(kill["verdict"]["answers"]["503 nats_unavailable"].as_u64().unwrap_or(0) > 0, "{kill}");
    // The full stream refused: the acknowledged ones are exactly what it holds.
    let full = row("stream-full");
    assert!(full["acknowledged"].as_u64().unwrap() < full["sent"].as_u64().unwrap(), "{full}");
    // Failover went there and back; the spool answered while NATS was down and replayed.
    let failover = row("failover");
    assert_eq!(
        failover["checks"].as_array().unwrap().iter().filter(|c| c["ok"] == true).count(),
        4,
        "{failover}"
    );
    assert!(row("spool-outage")["verdict"]["spooled"].as_u64().unwrap() > 0);
    assert!(row("spool-corrupt")["verdict"]["missing_written_off"].as_u64().unwrap() > 0);
    assert!(stdout.contains("| nats-kill |") && stdout.contains("PASS"), "{stdout}");
    for log in ["nats-kill/nats.log", "nats-kill/relay-relay.log", "drain/relay-relay.log"] {
        assert!(out.join(log).exists(), "{log}");
    }

    // Nothing of the run is left: every child's command line names a config under `out`.
    assert_nothing_left(&out);
}
