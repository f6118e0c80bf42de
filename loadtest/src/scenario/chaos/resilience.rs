//! The scenarios of the relay's own resilience features: failover between NATS clusters, and
//! the disk spool (all clusters down, the relay killed with a spool, a corrupted spool).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use edgerelay::config::Config;
use edgerelay::ingest::config::AckMode;
use edgerelay::proto;
use edgerelay::sink::config::{ClusterConfig, FailoverConfig};
use edgerelay::spool::segment::{Decoder, Item, HEADER_BYTES};
use prost::Message as _;

use super::lab::{Lab, Relay};
use super::scenarios::{kill_nats, nats_proxy, read_back, secs};
use super::verify::{read_streams, MarkKind, Timeline};
use super::{Cx, Outcome};
use crate::events::Stamp;
use crate::procs::admin_get;

/// The value of an unlabelled sample in the relay's `/metrics`.
async fn metric(relay: &Relay, name: &str) -> anyhow::Result<f64> {
    let (_, body) = admin_get(relay.admin, "/metrics").await?;
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("{name} not in /metrics"))
}

/// The relay's active NATS cluster (`/debug/clusters`).
async fn active_cluster(relay: &Relay) -> Option<String> {
    let (_, body) = admin_get(relay.admin, "/debug/clusters").await.ok()?;
    let clusters: Vec<serde_json::Value> = serde_json::from_slice(&body).ok()?;
    clusters.iter().find(|c| c["active"] == true)?["name"].as_str().map(str::to_owned)
}

/// Polls until `cond` holds or `within` passes; returns how long it took.
async fn wait_for<F, Fut>(within: Duration, mut cond: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < within {
        if cond().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Two clusters, the near one 5 ms away and the far one 30 ms away, each behind a proxy. The
/// near path goes dark (black hole: sockets open, nothing forwarded): the relay fails over to
/// the far cluster; the path comes back: after the hold time the relay fails back. Every
/// acknowledged event must be in one of the two streams.
pub async fn failover(cx: &Cx) -> anyhow::Result<Outcome> {
    let lab = cx.lab()?;
    let near = lab.nats("near").await?;
    let far = lab.nats("far").await?;
    let near_path = nats_proxy(&near, secs(0.005), cx.seed()).await?;
    let far_path = nats_proxy(&far, secs(0.030), cx.seed()).await?;
    let failback_after = cx.scaled(secs(4.0));
    // No `nats.urls`: the clusters name theirs.
    let mut config = lab.relay_config("relay", Vec::new());
    config.nats.publish_deadline_ms = 4_000;
    config.nats.clusters = vec![
        cluster("near", "here", near_path.local_addr()),
        cluster("far", "next", far_path.local_addr()),
    ];
    config.nats.failover = FailoverConfig {
        probe_interval_ms: 250,
        probe_timeout_ms: 500,
        unhealthy_after_failures: 2,
        failback_after_ms: u64::try_from(failback_after.as_millis())?,
        failback_margin_ms: 5,
    };
    let relay = lab.relay("relay", &config).await?;
    let rss = relay.sample_memory();
    let dark_for = cx.scaled(secs(5.0));
    let duration = secs(3.0) + dark_for + failback_after + secs(4.0);
    wait_for(secs(5.0), || async { active_cluster(&relay).await.as_deref() == Some("near") })
        .await
        .context("the relay never chose the near cluster")?;
    let load = cx.load(&relay.target(&lab), cx.load_spec(cx.rate(), duration)).await?;
    let mut t = Timeline::default();
    load.warm_up().await;
    near_path.set_blackhole(true);
    t.mark(load.now(), MarkKind::Fault, "near cluster's path black-holed");
    t.mark(load.now(), MarkKind::Recovery, "failover expected");
    let failover =
        wait_for(secs(10.0), || async { active_cluster(&relay).await.as_deref() == Some("far") })
            .await;
    t.mark(load.now(), MarkKind::Note, "relay publishes to the far cluster");
    load.until(secs(3.0) + dark_for).await;
    near_path.set_blackhole(false);
    t.mark(load.now(), MarkKind::Note, "near cluster's path restored");
    let failback = wait_for(failback_after + secs(10.0), || async {
        active_cluster(&relay).await.as_deref() == Some("near")
    })
    .await;
    t.mark(load.now(), MarkKind::Note, "relay back on the near cluster");
    let ledger = load.finish().await?;
    let stored = read_streams(
        &[(near.url(), "CHAOS"), (far.url(), "CHAOS")],
        ledger.nonce,
        Duration::from_secs(60),
    )
    .await?;
    let per_cluster = ledger.events.iter().filter_map(|e| e.ack.as_ref()).fold(
        std::collections::BTreeMap::<String, u64>::new(),
        |mut m, a| {
            *m.entry(a.cluster.clone()).or_default() += 1;
            m
        },
    );
    let mut o = cx.outcome(ledger, stored, t, cx.rate());
    o.memory = Some(rss.max());
    o.check(
        failover.is_some(),
        format!("failed over to the far cluster {:.0} ms after the black hole", ms(failover)),
    );
    o.check(
        failback.is_some_and(|d| d + secs(0.5) >= failback_after),
        format!(
            "failed back {:.0} ms after the path returned (hold time {} ms)",
            ms(failback),
            failback_after.as_millis()
        ),
    );
    o.check(per_cluster.len() == 2, format!("acknowledged per cluster: {per_cluster:?}"));
    Ok(o)
}

/// One of `[[nats.clusters]]`: `name` in `region`, at `addr`.
fn cluster(name: &str, region: &str, addr: SocketAddr) -> ClusterConfig {
    ClusterConfig {
        name: name.into(),
        region: region.into(),
        urls: vec![format!("nats://{addr}")],
        ..ClusterConfig::default()
    }
}

fn ms(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

/// A relay in ack mode `spooled` with its spool under the lab's directory.
fn spooled_config(lab: &Lab, nats_url: String, segment_bytes: u64) -> (Config, PathBuf) {
    let dir = lab.dir.path().join("spool");
    let mut config = lab.relay_config("relay", vec![nats_url]);
    config.relay.ack_mode = AckMode::Spooled;
    config.batch.max_bytes = 67_584;
    config.spool.enabled = true;
    config.spool.dir.clone_from(&dir);
    config.spool.segment_bytes = segment_bytes;
    config.spool.max_bytes = 256 << 20;
    (config, dir)
}

/// Waits until the relay's spool is empty (everything replayed); how long that took.
async fn spool_drained(relay: &Relay, within: Duration) -> Option<Duration> {
    wait_for(within, || async {
        metric(relay, "edgerelay_spool_records").await.is_ok_and(|n| n == 0.0)
    })
    .await
}

/// Ack mode `spooled`: NATS is killed under load, events are answered `spooled` from the
/// disk, NATS comes back and the spool is replayed: none lost, none stored twice.
pub async fn spool_outage(cx: &Cx) -> anyhow::Result<Outcome> {
    let lab = cx.lab()?;
    let mut nats = lab.nats("nats").await?;
    let (config, _) = spooled_config(&lab, nats.url(), 1 << 20);
    let relay = lab.relay("relay", &config).await?;
    let rss = relay.sample_memory();
    let down_for = cx.scaled(secs(4.0));
    let duration = secs(3.0) + down_for + secs(5.0);
    let load = cx.load(&relay.target(&lab), cx.load_spec(cx.rate(), duration)).await?;
    let mut t = Timeline::default();
    load.warm_up().await;
    let killed = kill_nats(&mut nats, &load, &mut t, "kill -9 nats-server (the only cluster)");
    load.until(secs(3.0) + down_for).await;
    let spooled_peak = metric(&relay, "edgerelay_spool_records").await.unwrap_or(0.0);
    nats.respawn().await?;
    let back = load.now();
    t.all_down(killed, back);
    t.mark(back, MarkKind::Recovery, "nats-server restarted");
    let replayed_in = spool_drained(&relay, secs(30.0)).await;
    t.mark(load.now(), MarkKind::Note, "spool replayed");
    let ledger = load.finish().await?;
    // Whatever was spooled after the last check has to be replayed too.
    let drained = spool_drained(&relay, secs(30.0)).await;
    let stored = read_back(&nats.url(), "CHAOS", ledger.nonce).await?;
    let spooled = ledger
        .events
        .iter()
        .filter(|e| e.ack.as_ref().is_some_and(|a| a.spooled == Some(true)))
        .count();
    let mut o = cx.outcome(ledger, stored, t, cx.rate());
    o.memory = Some(rss.max());
    o.check(spooled > 0, format!("{spooled} events answered `spooled` while NATS was down"));
    o.check(
        replayed_in.is_some() && drained.is_some(),
        format!(
            "spool ({spooled_peak:.0} batches at its peak) replayed {:.0} ms after NATS was back",
            ms(replayed_in)
        ),
    );
    Ok(o)
}

/// Ack mode `spooled`: NATS goes down, the spool fills, the relay is killed with `kill -9`;
/// NATS comes back and the relay is started again: its recovery replays the spool, and the
/// client retries what was never answered.
pub async fn relay_kill(cx: &Cx) -> anyhow::Result<Outcome> {
    let lab = cx.lab()?;
    let mut nats = lab.nats("nats").await?;
    let (config, _) = spooled_config(&lab, nats.url(), 1 << 20);
    let mut relay = lab.relay("relay", &config).await?;
    let rss = relay.sample_memory();
    let duration = secs(12.0);
    let load = cx.load(&relay.target(&lab), cx.load_spec(cx.rate(), duration)).await?;
    let mut t = Timeline::default();
    load.warm_up().await;
    let killed = kill_nats(&mut nats, &load, &mut t, "kill -9 nats-server");
    load.until(secs(5.0)).await;
    let spooled_before = metric(&relay, "edgerelay_spool_records").await.unwrap_or(0.0);
    relay.kill9().await?;
    t.mark(load.now(), MarkKind::Fault, "kill -9 the relay (its spool holds batches)");
    load.until(secs(6.0)).await;
    nats.respawn().await?;
    t.all_down(killed, load.now());
    t.mark(load.now(), MarkKind::Note, "nats-server restarted");
    load.until(secs(7.0)).await;
    // Marked when the process starts: it may answer before the readiness poll sees it.
    let starting = load.now();
    relay.start().await?;
    t.mark(starting, MarkKind::RelayRestart, "relay started again (same spool)");
    t.mark(starting, MarkKind::Recovery, "relay restarting");
    let replayed_in = spool_drained(&relay, secs(30.0)).await;
    let log = std::fs::read_to_string(lab.logs.join("relay-relay.log")).unwrap_or_default();
    // The log is appended to across runs with the same --out: the last start is this one's.
    let recovered = log.lines().rev().find(|l| l.contains("spool recovered")).map(str::to_owned);
    let ledger = load.finish().await?;
    let stored = read_back(&nats.url(), "CHAOS", ledger.nonce).await?;
    let mut o = cx.outcome(ledger, stored, t, cx.rate());
    o.memory = Some(rss.max());
    o.check(spooled_before > 0.0, format!("{spooled_before:.0} batches spooled at the kill"));
    o.check(
        replayed_in.is_some(),
        format!("spool replayed {:.0} ms after the restart", ms(replayed_in)),
    );
    o.check(recovered.is_some(), "the restarted relay logged what its spool recovered");
    if let Some(line) = recovered {
        o.note(format!("relay log: {}", line.trim()));
    }
    Ok(o)
}

/// Ack mode `spooled` with NATS down from the start: events are spooled, the relay stops
/// (SIGTERM). Then one record in the middle of the first segment gets a flipped bit and the
/// last segment is cut in the middle of its last record. `edgerelay spool inspect` must
/// report both; the restarted relay, with NATS up, replays every intact record. The events
/// of the two damaged records are written off; every other acknowledged event is stored.
pub async fn spool_corrupt(cx: &Cx) -> anyhow::Result<Outcome> {
    let lab = cx.lab()?;
    let mut nats = lab.nats("nats").await?;
    nats.stop();
    // Segments just above the smallest allowed (batch.max_bytes + 4 KiB): several of them.
    let (mut config, dir) = spooled_config(&lab, nats.url(), 72 << 10);
    config.nats.connect_timeout_ms = 200;
    let mut relay = lab.relay("relay", &config).await?;
    let rss = relay.sample_memory();
    let duration = cx.scaled(secs(4.0));
    let load = cx.load(&relay.target(&lab), cx.load_spec(cx.rate(), duration)).await?;
    let mut t = Timeline::default();
    t.all_down(Duration::ZERO, duration + secs(60.0));
    load.until(duration).await;
    let ledger = load.finish().await?;
    relay.term()?;
    relay.wait_exit(secs(15.0)).await?;
    t.mark(ledger.elapsed, MarkKind::Note, "relay stopped with a full spool");

    let damaged = corrupt(&dir, ledger.nonce)?;
    t.mark(ledger.elapsed, MarkKind::Fault, "bit flipped in segment 1, last segment cut short");
    let inspect = tokio::process::Command::new(&lab.relay_bin)
        .args(["spool", "inspect", "--dir"])
        .arg(&dir)
        .output()
        .await
        .context("running edgerelay spool inspect")?;
    let report = String::from_utf8_lossy(&inspect.stdout).into_owned();
    std::fs::write(lab.logs.join("spool-inspect.txt"), &report)?;

    nats.respawn().await?;
    relay.start().await?;
    let replayed_in = spool_drained(&relay, secs(30.0)).await;
    let log = std::fs::read_to_string(lab.logs.join("relay-relay.log")).unwrap_or_default();
    let mut stored = read_back(&nats.url(), "CHAOS", ledger.nonce).await?;
    let destroyed = damaged.events.len();
    let lost_anyway = damaged.events.iter().filter(|n| stored.counts.contains_key(n)).count();
    stored.written_off = damaged.events;
    let mut o = cx.outcome(ledger, stored, t, cx.rate());
    o.memory = Some(rss.max());
    let summary = report.lines().find(|l| l.contains("segments,")).unwrap_or("").trim().to_owned();
    o.check(
        report.contains("corrupt") && report.contains("torn") && inspect.status.success(),
        format!(
            "`edgerelay spool inspect` reports the corrupt record and the torn tail: {summary}"
        ),
    );
    o.check(
        log.contains("spool recovered with damage"),
        "the relay logged the damage it found at start-up",
    );
    o.check(replayed_in.is_some(), format!("intact records replayed ({:.0} ms)", ms(replayed_in)));
    o.check(
        lost_anyway == 0,
        format!("{destroyed} events in the 2 damaged records written off, {lost_anyway} of them stored anyway"),
    );
    Ok(o)
}

/// What [`corrupt`] destroyed.
struct Damage {
    /// Event numbers (of run `nonce`) in the damaged records.
    events: HashSet<u64>,
}

/// Flips a bit in the payload of the second record of the first segment and truncates the
/// last segment in the middle of its last record.
fn corrupt(dir: &Path, nonce: u64) -> anyhow::Result<Damage> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    anyhow::ensure!(
        segments.len() >= 2,
        "need at least 2 spool segments, found {}",
        segments.len()
    );
    let records = |path: &Path| -> anyhow::Result<Vec<(u64, u32, proto::SpoolRecord)>> {
        let bytes = std::fs::read(path)?;
        Ok(Decoder::new(&bytes, 0)
            .filter_map(|item| match item {
                Item::Record { offset, len, record } => Some((offset, len, record)),
                _ => None,
            })
            .collect())
    };
    let mut events = HashSet::new();
    let mut write_off = |record: &proto::SpoolRecord| -> anyhow::Result<()> {
        let batch = proto::Batch::decode(record.batch.as_ref())?;
        events.extend(
            batch
                .events
                .iter()
                .filter_map(|e| Stamp::read(&e.payload))
                .filter(|s| s.nonce == nonce)
                .map(|s| s.event),
        );
        Ok(())
    };

    let first = &segments[0];
    let in_first = records(first)?;
    anyhow::ensure!(in_first.len() >= 3, "segment 1 holds only {} records", in_first.len());
    let (offset, len, record) = &in_first[1];
    let at = offset + HEADER_BYTES as u64 + u64::from(*len / 2);
    let mut bytes = std::fs::read(first)?;
    bytes[at as usize] ^= 0x10;
    std::fs::write(first, &bytes)?;
    write_off(record)?;

    let last = &segments[segments.len() - 1];
    let in_last = records(last)?;
    let (offset, len, record) = in_last.last().context("the last segment is empty")?;
    let cut = offset + HEADER_BYTES as u64 + u64::from(*len / 2);
    std::fs::OpenOptions::new().write(true).open(last)?.set_len(cut)?;
    write_off(record)?;
    Ok(Damage { events })
}
