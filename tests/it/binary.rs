//! The `edgerelay` binary: config checking with exit codes, and SIGTERM drain under load.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgerelay::config::Config;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_edgerelay");

#[test]
fn check_config_reports_every_problem_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[relay]\nid = \"a.b\"\n[batch]\nmax_events = 0\n[stream]\nreplicas = 2\n",
    )
    .unwrap();
    for sub in ["check-config", "run"] {
        let out = Command::new(BIN).args([sub, "--config"]).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(78), "{sub}");
        let err = String::from_utf8_lossy(&out.stderr);
        for needle in ["relay.id", "batch.max_events", "stream.replicas", "https.tls_cert"] {
            assert!(err.contains(needle), "{sub}: missing {needle} in {err}");
        }
    }
    std::fs::write(&path, "[batch]\nmax_evnts = 3\n").unwrap();
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));
    let out = Command::new(BIN).args(["run", "--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn check_config_warns_about_secret_files_other_users_can_read() {
    use edgerelay_testkit::{relay_config, RelayConfigBuilder};
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    relay_config::dev_certs(dir.path()).unwrap();
    let config = RelayConfigBuilder::new("nats://127.0.0.1:4222").certs_in(dir.path()).build();
    let path = dir.path().join("relay.toml");
    relay_config::write_toml(&config, &path).unwrap();
    let key = dir.path().join("key.pem");
    let check = || {
        let out = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "a warning is not a problem");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(!check().contains("WARN"), "dev-certs and the test kit write both owner-only");

    let chmod = |path: &std::path::Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    chmod(&path, 0o644);
    chmod(&key, 0o604);
    let err = check();
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 2, "{err}");
    for (field, file, mode) in [("config", &path, "0644"), ("https.tls_key", &key, "0604")] {
        let file = file.display().to_string();
        assert!(
            warnings.iter().any(|w| w.contains(&format!("{field}: {file}"))
                && w.contains(&format!("mode {mode}"))
                && w.contains(&format!("chmod 600 {file}"))),
            "{field} in {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_every_accepted_event_and_exits_0() {
    let nats = NatsServer::start();
    let setup = Setup::new(&nats.url());
    let config = setup.binary_config(|c| {
        c.id("sigterm").with(|c| {
            c.relay.shutdown_grace_ms = 8_000;
            c.batch.linger_ms = 20;
        })
    });
    let relay = BinaryRelay::new(&setup, config);
    let mut child = relay.spawn(Stdio::inherit());
    relay.wait_ready().await;

    // 8 clients publishing in a loop; SIGTERM after 600 ms.
    let url = relay.url("/v1/publish/edge.drain");
    let load = (0..8).map(|c| {
        let client = client(&setup.certs, c % 2 == 0);
        let url = url.clone();
        async move {
            let mut acked = Vec::new();
            let mut refused = 0;
            for i in 0.. {
                let body = format!("c{c}-{i}");
                match client.post(&url).bearer_auth(TOKEN).body(body.clone()).send().await {
                    Ok(r) if r.status() == 202 => {
                        acked.push((body, r.json::<Accepted>().await.unwrap()))
                    }
                    Ok(r) => {
                        assert!(matches!(r.status().as_u16(), 503), "{}", r.status());
                        refused += 1;
                        break;
                    }
                    Err(_) => break, // connection closed by the drain
                }
            }
            (acked, refused)
        }
    });
    let pid = child.id();
    let term = async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    };
    let (results, ()) = tokio::join!(futures::future::join_all(load), term);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(12),
            "relay did not exit within its grace period"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));

    let stored = read_stream(&nats.url()).await;
    let acked: Vec<_> = results.into_iter().flat_map(|(a, _)| a).collect();
    assert!(acked.len() > 10, "load too small to mean anything: {}", acked.len());
    for (body, a) in &acked {
        let msg = stored
            .iter()
            .find(|m| m.seq == a.seq)
            .unwrap_or_else(|| panic!("{body}: seq {} missing", a.seq));
        assert_eq!(msg.batch.events[a.index as usize].payload, body.as_bytes(), "{body}");
    }
}

/// Runs the binary with its config changed by `change` until it is ready, stops it, and
/// returns its log.
async fn log_of_a_start(setup: &Setup, change: impl FnOnce(&mut Config)) -> String {
    let relay = BinaryRelay::new(setup, setup.binary_config(|c| c.with(change)));
    let log = setup.dir.path().join("relay.log");
    let mut child = relay.spawn(std::fs::File::create(&log).unwrap().into());
    relay.wait_ready().await;
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(&log).unwrap()
}

#[tokio::test]
async fn an_r1_stream_on_lazily_syncing_servers_is_warned_about_at_start() {
    let nats = NatsServer::start();
    let setup = Setup::new(&nats.url());
    let log = log_of_a_start(&setup, |_| {}).await;
    assert!(log.contains("the stream has 1 replica"), "{log}");
    assert!(log.contains("sync_interval"), "{log}");
    let log = log_of_a_start(&setup, |c| c.stream.server_sync_always = true).await;
    assert!(!log.contains("the stream has 1 replica"), "{log}");
}
