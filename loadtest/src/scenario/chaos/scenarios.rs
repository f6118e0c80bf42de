//! One function per scenario: build the topology, start the load, inject the faults on the
//! load's clock, read the stream back. Short versions take 10-20 s of load each; `--long`
//! scales them (see [`Cx::scaled`]).

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::stream::{Config as StreamSpec, DiscardPolicy, StorageType};
use edgerelay_testkit::local;

use super::ledger::{Answer, Ledger, Load};
use super::verify::{read_streams, MarkKind, Stored, Timeline};
use super::{lab, Cx, Outcome};
use crate::model::{self, Percentiles};
use crate::wan::{self, Limits, Model, Route};

/// Longest the verifier may take to read a stream back.
const READ_BACK: Duration = Duration::from_secs(60);

/// Slack on top of the relay's publish deadline for an answer to count as "within" it: the
/// batch's linger, queueing, and a busy 2-core machine.
const DEADLINE_SLACK: Duration = Duration::from_millis(1000);

/// What stream `stream` on `url` holds of run `nonce`.
pub(super) async fn read_back(url: &str, stream: &str, nonce: u64) -> anyhow::Result<Stored> {
    read_streams(&[(url.to_owned(), stream)], nonce, READ_BACK).await
}

/// Kills nats-server (`kill -9`) and marks that on `t` as the fault `what`: when, on the
/// load's clock.
pub(super) fn kill_nats(
    nats: &mut lab::NatsServer,
    load: &Load,
    t: &mut Timeline,
    what: &str,
) -> Duration {
    nats.stop();
    let killed = load.now();
    t.mark(killed, MarkKind::Fault, what);
    killed
}

pub(super) fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// kill -9 nats-server under load and restart it. Short: two kills 5 s apart, 1 s down each.
/// Long: a kill every 10-30 s (seeded), down 1-3 s.
pub async fn nats_kill(cx: &Cx) -> anyhow::Result<Outcome> {
    let lab = cx.lab()?;
    let mut nats = lab.nats("nats").await?;
    let relay = lab.relay("relay", &lab.relay_config("relay", vec![nats.url()])).await?;
    let rss = relay.sample_memory();
    let duration = cx.scaled(secs(12.0));
    let plan = kill_plan(cx.long(), cx.seed(), duration);
    let load = cx.load(&relay.target(&lab), cx.load_spec(cx.rate(), duration)).await?;
    let mut t = Timeline::default();
    load.wait_acked(1, secs(10.0)).await;
    for (at, down) in &plan {
        load.until(*at).await;
        if cx.stopped() {
            break;
        }
        let killed = kill_nats(&mut nats, &load, &mut t, "kill -9 nats-server");
        load.until(*at + *down).await;
        let restarting = load.now();
        nats.respawn().await?;
        t.all_down(killed, restarting);
        t.mark(load.now(), MarkKind::Recovery, "nats-server restarted (same port and store)");
    }
    let ledger = load.finish().await?;
    let stored = read_back(&nats.url(), "CHAOS", ledger.nonce).await?;
    let mut o = cx.outcome(ledger, stored, t, cx.rate());
    o.memory = Some(rss.max());
    o.note(format!("{} kills of nats-server", plan.len()));
    Ok(o)
}

/// When to kill and for how long: short, two kills 5 s apart; long, every 10-30 s.
fn kill_plan(long: bool, seed: u64, duration: Duration) -> Vec<(Duration, Duration)> {
    if !long {
        return vec![(secs(3.0), secs(1.0)), (secs(8.0), secs(1.0))];
    }
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        // xorshift64*: enough to spread the kills.
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut plan = Vec::new();
    let mut at = secs(5.0);
    while at + secs(8.0) < duration {
        let down = secs(1.0 + 2.0 * next());
        plan.push((at, down));
        at += down + secs(10.0 + 20.0 * next());
    }
    plan
}

/// A 3-node cluster with an R3 stream: kill -9 the stream leader, restart it, then kill a
/// follower and restart it, all under load. Long: that round five times.
pub async fn cluster_leader(cx: &Cx) -> anyhow::Result<Outcome> {
    let lab = cx.lab()?;
    let mut cluster = lab.cluster("c").await?;
    let mut config = lab.relay_config("relay", cluster.urls());
    config.stream.replicas = 3;
    config.nats.publish_deadline_ms = 4_000;
    let relay = lab.relay("relay", &config).await?;
    let rss = relay.sample_memory();
    let rounds = cx.factor();
    let duration = secs(4.0) + secs(12.0) * rounds;
    let load = cx.load(&relay.target(&lab), cx.load_spec(cx.rate(), duration)).await?;
    let mut t = Timeline::default();
    load.wait_acked(1, secs(10.0)).await;
    let mut killed_names = Vec::new();
    for round in 0..rounds {
        let base = secs(3.0) + secs(12.0) * round;
        for (offset, leader) in [(0.0, true), (6.0, false)] {
            load.until(base + secs(offset)).await;
            if cx.stopped() {
                break;
            }
            let lead = lab::leader(&cluster, "CHAOS").await?;
            let victim = if leader { lead } else { (lead + 1) % cluster.nodes.len() };
            let role = if leader { "stream leader" } else { "follower" };
            let name = cluster.nodes[victim].name().to_owned();
            cluster.nodes[victim].stop();
            let killed = load.now();
            t.mark(killed, MarkKind::Recovery, format!("kill -9 {role} {name}"));
            killed_names.push(format!("{role} {name}"));
            // Down for 3 s from the kill (finding the leader can take a while mid-election).
            load.until(killed + secs(3.0)).await;
            cluster.nodes[victim].respawn().await?;
            t.mark(load.now(), MarkKind::Note, format!("{name} restarted"));
        }
    }
    let ledger = load.finish().await?;
    let url = cluster.any_url().context("no node is running")?;
    let stored = read_back(&url, "CHAOS", ledger.nonce).await?;
    let mut o = cx.outcome(ledger, stored, t, cx.rate());
    o.memory = Some(rss.max());
    o.note(format!("killed: {}", killed_names.join(", ")));
    o.note("recovery is measured from each kill (the cluster elects a new leader by itself)");
    Ok(o)
}

/// SIGTERM the relay under load: every request in flight gets an answer, the relay exits 0
/// within its grace, nothing acknowledged is lost; then it is started again (same port) and
/// the client's retries go there.
pub async fn drain(cx: &Cx) -> anyhow::Result<Outcome> {
    let lab = cx.lab()?;
    let nats = lab.nats("nats").await?;
    // 100 ms to NATS and back: at 200 events/s some 20 requests wait for their PubAck at any
    // moment, so SIGTERM always finds requests in flight.
    let proxy = nats_proxy(&nats, secs(0.1), cx.seed()).await?;
    let config = lab.relay_config("relay", vec![format!("nats://{}", proxy.local_addr())]);
    let grace = Duration::from_millis(config.relay.shutdown_grace_ms);
    let mut relay = lab.relay("relay", &config).await?;
    let rss = relay.sample_memory();
    let rounds = cx.factor();
    let duration = secs(4.0) + secs(8.0) * rounds;
    let load = cx.load(&relay.target(&lab), cx.load_spec(cx.rate(), duration)).await?;
    let mut t = Timeline::default();
    let mut terms = Vec::new();
    let mut exits = Vec::new();
    load.wait_acked(1, secs(10.0)).await;
    for round in 0..rounds {
        load.until(secs(4.0) + secs(8.0) * round).await;
        if cx.stopped() {
            break;
        }
        let at = load.now();
        relay.term()?;
        terms.push(at);
        t.mark(at, MarkKind::Fault, "SIGTERM the relay");
        let exit = relay.wait_exit(grace + secs(5.0)).await?;
        t.mark(load.now(), MarkKind::Note, format!("relay exited: {exit:?}"));
        exits.push(exit);
        // Marked when the process starts: it may answer before the readiness poll sees it.
        let starting = load.now();
        relay.start().await?;
        t.mark(starting, MarkKind::RelayRestart, "relay started again");
        t.mark(starting, MarkKind::Recovery, "relay restarting");
    }
    let ledger = load.finish().await?;
    let stored = read_back(&nats.url(), "CHAOS", ledger.nonce).await?;
    let in_flight = in_flight_at(&ledger, &terms);
    let mut o = cx.outcome(ledger, stored, t, cx.rate());
    o.memory = Some(rss.max());
    for exit in exits {
        match exit {
            Some((status, took)) => o.check(
                status.success(),
                format!(
                    "relay exited ({status}) {:.0} ms after SIGTERM (grace {} ms)",
                    took.as_secs_f64() * 1e3,
                    grace.as_millis()
                ),
            ),
            None => o.check(
                false,
                format!("relay exited within {} ms of SIGTERM", grace.as_millis() + 5000),
            ),
        }
    }
    let unanswered = in_flight.iter().filter(|a| a.status().is_none()).count();
    let labels = tally(in_flight.iter().map(Answer::label));
    o.check(
        unanswered == 0,
        format!(
            "every request in flight at SIGTERM got an HTTP answer: {} in flight, {unanswered} \
             without one ({labels})",
            in_flight.len()
        ),
    );
    Ok(o)
}

/// Answers of the attempts sent at least 20 ms before one of `marks` and not answered by it.
fn in_flight_at(ledger: &Ledger, marks: &[Duration]) -> Vec<Answer> {
    let margin = Duration::from_millis(20);
    ledger
        .events
        .iter()
        .flat_map(|e| &e.attempts)
        .filter(|a| marks.iter().any(|m| a.sent + margin <= *m && a.answered > *m))
        .map(|a| a.answer.clone())
        .collect()
}

/// NATS behind a delay proxy that first turns slower than the publish deadline (3 s each way
/// against a 1.5 s deadline), then, after a pause, goes dark (a black hole: sockets open,
/// nothing forwarded): in both phases the relay answers 503/504 within its deadline, with
/// Retry-After, never a fresh 2xx, and its memory stays bounded.
pub async fn slow_nats(cx: &Cx) -> anyhow::Result<Outcome> {
    let lab = cx.lab()?;
    let nats = lab.nats("nats").await?;
    let proxy = nats_proxy(&nats, Duration::ZERO, cx.seed()).await?;
    let mut config = lab.relay_config("relay", vec![format!("nats://{}", proxy.local_addr())]);
    config.nats.publish_deadline_ms = 1_500;
    let deadline = Duration::from_millis(config.nats.publish_deadline_ms);
    let relay = lab.relay("relay", &config).await?;
    let rss = relay.sample_memory();
    let (slow_for, dark_for) = (cx.scaled(secs(5.0)), cx.scaled(secs(4.0)));
    // slow at 3 s, restored, dark 3 s later (after the slow path's queued bytes drained).
    let dark_at = secs(3.0) + slow_for + secs(3.0);
    let duration = dark_at + dark_for + secs(4.0);
    let load = cx.load(&relay.target(&lab), cx.load_spec(cx.rate(), duration)).await?;
    let mut t = Timeline::default();
    load.warm_up().await;
    proxy.set_extra_delay(secs(3.0));
    let slow = load.now();
    t.mark(slow, MarkKind::Fault, "NATS path +3 s each way (publish deadline 1.5 s)");
    load.until(secs(3.0) + slow_for).await;
    proxy.set_extra_delay(Duration::ZERO);
    let restored = load.now();
    t.all_down(slow, restored);
    t.mark(restored, MarkKind::Recovery, "NATS path delay removed");
    load.until(dark_at).await;
    proxy.set_blackhole(true);
    let dark = load.now();
    t.mark(dark, MarkKind::Fault, "NATS path black-holed (sockets kept open)");
    load.until(dark_at + dark_for).await;
    proxy.set_blackhole(false);
    let lit = load.now();
    t.all_down(dark, lit);
    t.mark(lit, MarkKind::Recovery, "NATS path restored");
    let ledger = load.finish().await?;
    let stored = read_back(&nats.url(), "CHAOS", ledger.nonce).await?;

    // Refusals of attempts sent while the path was slow or dark (after the first deadline's
    // worth, when nothing sent before the fault can still be waiting).
    let windows = [(slow + deadline, restored), (dark + deadline, lit)];
    let mut latency = model::histogram();
    let (mut refused, mut without_retry_after, mut other) = (0u64, 0u64, 0u64);
    for a in ledger.events.iter().flat_map(|e| &e.attempts) {
        if !windows.iter().any(|(from, to)| a.sent >= *from && a.sent <= *to) {
            continue;
        }
        match &a.answer {
            Answer::Status { status: 503 | 504, retry_after, .. } => {
                refused += 1;
                without_retry_after += u64::from(retry_after.is_none());
                latency.saturating_record((a.answered - a.sent).as_micros() as u64);
            }
            answer if answer.is_success() => {}
            _ => other += 1,
        }
    }
    let p = Percentiles::of(&latency);
    let budget = deadline + DEADLINE_SLACK;
    let mut o = cx.outcome(ledger, stored, t, cx.rate());
    o.memory = Some(rss.max());
    o.check(
        refused > 0,
        format!("the slow and dark paths were refused: {refused} 503/504 answers"),
    );
    o.check(
        p.max <= budget.as_secs_f64() * 1e3,
        format!(
            "503/504 answered within publish_deadline_ms {} + {} ms: p50 {:.0} / p99 {:.0} / \
             max {:.0} ms",
            deadline.as_millis(),
            DEADLINE_SLACK.as_millis(),
            p.p50,
            p.p99,
            p.max
        ),
    );
    o.check(without_retry_after == 0, format!("{without_retry_after} 503/504 without Retry-After"));
    o.check(
        other == 0,
        format!("{other} attempts failed otherwise (timeouts, resets) while slow or dark"),
    );
    Ok(o)
}

/// A stream the scenario creates with small limits and discard-new (the relay only checks it,
/// `stream.create = false`) fills up under load: clear refusals with Retry-After, and nothing
/// acknowledged that is not stored.
pub async fn stream_full(cx: &Cx) -> anyhow::Result<Outcome> {
    const MAX_MSGS: i64 = 100;
    let lab = cx.lab()?;
    let nats = lab.nats("nats").await?;
    let stream = "CHAOS_FULL";
    lab::create_stream(
        &nats.url(),
        StreamSpec {
            name: stream.into(),
            subjects: vec!["chaos.stream_full.>".into()],
            max_messages: MAX_MSGS,
            max_bytes: 256 << 10,
            discard: DiscardPolicy::New,
            duplicate_window: Duration::from_secs(120),
            storage: StorageType::File,
            num_replicas: 1,
            ..Default::default()
        },
    )
    .await?;
    let mut config = lab.relay_config("relay", vec![nats.url()]);
    config.stream.name = stream.into();
    config.stream.subjects = vec!["chaos.stream_full.>".into()];
    config.stream.create = false;
    // Every refusal here waits out the deadline (see the notes): keep it short and the
    // concurrency high, so the run stays short too.
    config.nats.publish_deadline_ms = 1_000;
    config.nats.ack_timeout_ms = 300;
    let deadline = Duration::from_millis(config.nats.publish_deadline_ms);
    let relay = lab.relay("relay", &config).await?;
    let rss = relay.sample_memory();
    let mut load_spec = cx.load_spec(cx.rate(), cx.scaled(secs(8.0)));
    load_spec.retry.max_attempts = 2;
    load_spec.concurrency *= 4;
    let load = cx.load(&relay.target(&lab), load_spec).await?;
    let ledger = load.finish().await?;
    let stored = read_back(&nats.url(), stream, ledger.nonce).await?;

    let mut codes = Vec::new();
    let (mut refused, mut unclear) = (0u64, 0u64);
    let mut latency = model::histogram();
    for a in ledger.events.iter().flat_map(|e| &e.attempts) {
        if a.answer.is_success() {
            continue;
        }
        refused += 1;
        codes.push(a.answer.label());
        latency.saturating_record((a.answered - a.sent).as_micros() as u64);
        let clear = matches!(
            &a.answer,
            Answer::Status { status: 503 | 504, code: Some(_), retry_after: Some(_) }
        );
        unclear += u64::from(!clear);
    }
    let p = Percentiles::of(&latency);
    let messages = stored.messages;
    let mut o = cx.outcome(ledger, stored, Timeline::default(), cx.rate());
    o.memory = Some(rss.max());
    o.check(refused > 0, format!("the stream filled: {refused} refused attempts"));
    o.check(
        unclear == 0,
        format!(
            "every refusal is a 503/504 with a JSON code and Retry-After ({unclear} not): {}",
            tally(codes.into_iter())
        ),
    );
    o.check(
        messages <= MAX_MSGS as u64,
        format!("the stream holds {messages} <= {MAX_MSGS} messages"),
    );
    o.note(format!(
        "refusals answered after p50 {:.0} / p99 {:.0} / max {:.0} ms (publish deadline {} ms)",
        p.p50,
        p.p99,
        p.max,
        deadline.as_millis()
    ));
    Ok(o)
}

/// Three times the sustainable rate. The client shares the machine's two cores with the
/// relay and costs about as much per request (TLS, HTTP/2), so it cannot outrun a relay that
/// publishes batches straight to NATS; the relay's NATS path is made the bottleneck instead:
/// batching off (`batch.max_events = 1`), 4 batches in flight, 10 ms to NATS and back — about
/// 400 events/s — with the queues sized to well under a second of that (`queue_capacity = 128`
/// per shard, 2 shards), as an operator sizes them to the sink's rate. The sustainable rate is
/// measured by a 3 s saturation run without retries (unless `--max-rate`), then 3× it is
/// offered for 8 s (60 s with `--long`): the relay's memory stays bounded, accepted requests
/// keep a bounded p99, every 429/503 carries Retry-After.
pub async fn overload(cx: &Cx) -> anyhow::Result<Outcome> {
    let lab = cx.lab()?;
    let nats = lab.nats("nats").await?;
    let proxy = nats_proxy(&nats, secs(0.01), cx.seed()).await?;
    let mut config = lab.relay_config("relay", vec![format!("nats://{}", proxy.local_addr())]);
    config.nats.max_inflight_batches = 4;
    config.batch.max_events = 1;
    config.batch.shards = 2;
    config.batch.queue_capacity = 128;
    let deadline = Duration::from_millis(config.nats.publish_deadline_ms);
    let relay = lab.relay("relay", &config).await?;
    let rss = relay.sample_memory();
    let target = relay.target(&lab);
    let max = match cx.max_rate() {
        Some(rate) => rate,
        None => {
            // Offer far more than the relay can take, no retries: what it acknowledges per
            // second is its sustainable rate here.
            // Acknowledgements answered while the events were offered, per second.
            let window = secs(3.0);
            let mut probe = cx.load_spec(4_000.0, window);
            probe.retry.max_attempts = 1;
            probe.concurrency *= 8;
            probe.connections *= 4;
            let ledger = cx.load(&target, probe).await?.finish().await?;
            let acked = ledger
                .events
                .iter()
                .filter_map(|e| e.acked_attempt())
                .filter(|a| a.answered <= window)
                .count();
            (acked as f64 / window.as_secs_f64()).max(10.0)
        }
    };
    let offered = (3.0 * max).round();
    let duration = if cx.long() { secs(60.0) } else { secs(8.0) };
    let mut spec = cx.load_spec(offered, duration);
    spec.retry.max_attempts = 2;
    spec.concurrency *= 8;
    spec.connections *= 4;
    let ledger = cx.load(&target, spec).await?.finish().await?;
    let stored = read_back(&nats.url(), "CHAOS", ledger.nonce).await?;
    let (mut refusals, mut without) = (0u64, 0u64);
    let mut ok_latency = model::histogram();
    for a in ledger.events.iter().flat_map(|e| &e.attempts) {
        match &a.answer {
            Answer::Status { status: 429 | 503, retry_after, .. } => {
                refusals += 1;
                without += u64::from(retry_after.is_none());
            }
            answer if answer.is_success() => {
                ok_latency.saturating_record((a.answered - a.sent).as_micros() as u64)
            }
            _ => {}
        }
    }
    let p99 = Percentiles::of(&ok_latency).p99;
    let acked = ledger.events.iter().filter(|e| e.ack.is_some()).count();
    let achieved = ledger.events.len() as f64 / ledger.offered_in.as_secs_f64().max(1e-3);
    let mut o = cx.outcome(ledger, stored, Timeline::default(), offered);
    o.memory = Some(rss.max());
    let bound = deadline + DEADLINE_SLACK;
    o.check(
        achieved >= 0.9 * offered,
        format!("the client offered {achieved:.0}/s of the {offered:.0}/s asked"),
    );
    o.check(refusals > 0, format!("the relay refused the excess: {refusals} 429/503 answers"));
    o.check(
        p99 <= bound.as_secs_f64() * 1e3,
        format!("accepted requests' p99 {p99:.0} ms <= {} ms", bound.as_millis()),
    );
    o.check(without == 0, format!("every 429/503 carries Retry-After ({without} without)"));
    o.note(format!(
        "sustainable rate {max:.0} events/s ({}), offered 3x = {offered:.0}/s for {} s; {} \
         acknowledged ({:.0}/s)",
        if cx.max_rate().is_some() { "--max-rate" } else { "measured: 3 s saturation run" },
        duration.as_secs(),
        acked,
        acked as f64 / duration.as_secs_f64(),
    ));
    Ok(o)
}

/// A TCP delay proxy in front of `nats` with `rtt` (its queue large enough for seconds of
/// load), for slowing or black-holing the relay's path to it.
pub(super) async fn nats_proxy(
    nats: &lab::NatsServer,
    rtt: Duration,
    seed: u64,
) -> anyhow::Result<wan::Proxy> {
    wan::spawn(
        &Route { listen: local(0), upstream: local(nats.port), tcp: true, udp: false },
        &Model {
            rtt,
            jitter: Duration::ZERO,
            loss: 0.0,
            seed,
            limits: Limits { max_queued_bytes: 64 << 20, ..Limits::default() },
        },
    )
    .await
}

/// `label ×count, …` in first-seen order of frequency.
fn tally(labels: impl Iterator<Item = String>) -> String {
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    for l in labels {
        *counts.entry(l).or_default() += 1;
    }
    if counts.is_empty() {
        return "none".into();
    }
    counts.iter().map(|(l, n)| format!("{l} ×{n}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_plans_are_bounded_and_spaced() {
        assert_eq!(kill_plan(false, 1, secs(12.0)).len(), 2);
        let plan = kill_plan(true, 7, secs(120.0));
        assert!(!plan.is_empty());
        for pair in plan.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(gap >= secs(11.0) && gap <= secs(33.0), "{gap:?}");
        }
        assert!(plan.iter().all(|(at, down)| *at + *down + secs(5.0) < secs(120.0)));
        assert_eq!(kill_plan(true, 7, secs(120.0)), plan);
    }

    #[test]
    fn tally_counts_labels() {
        let t = tally(["a", "b", "a"].into_iter().map(String::from));
        assert_eq!(t, "a ×2, b ×1");
        assert_eq!(tally(std::iter::empty()), "none");
    }
}
