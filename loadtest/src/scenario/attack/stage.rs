//! One attack scenario from start to row: the chaos lab's nats-server and relay (audit on, QUIC
//! on, logging at `info`), the legitimate HTTPS load measured without the attack, then the
//! attack started, given `--ramp` to take hold, the legitimate load measured again while it
//! runs, and the attack stopped. Around the attack phase: the relay's memory sampled, the audit
//! stream's bytes and the relay log's lines counted before and after. Then the row, judged
//! against the thresholds.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};

use super::super::chaos::lab::{Lab, Relay};
use super::{http, quic, Aim, Args, Scenario, Tally, Thresholds};
use crate::events::EventArgs;
use crate::harness::Target;
use crate::mode::https::{self, HttpVersion};
use crate::model::Summary;
use crate::probe::cpu_time;
use crate::procs::Memory;
use crate::schedule::RunArgs;
use crate::token::TokenArgs;
use edgerelay_testkit::free_shared_port;

/// Where the IPv4 attacks come from: one address of its own on loopback (Linux answers on all
/// of 127.0.0.0/8 without configuration), so the relay's per-source limits tell it apart from
/// the legitimate load on 127.0.0.1.
const ATTACKER_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 2);

/// Longest the set-up (nats-server, relay) and the tear-down of a scenario may take, besides
/// its phases.
const SET_UP_ALLOWANCE: Duration = Duration::from_secs(60);

/// How long the relay gets after the attack before it is stopped (connections close, answers
/// go out).
const SETTLE: Duration = Duration::from_secs(2);

/// The subject prefix of the legitimate load (the attacks use `edge.attack`).
const LEGIT_PREFIX: &str = "edge.legit";

/// The legitimate load's result in one phase.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Legit {
    /// Events accepted per second of the measurement window.
    pub goodput: f64,
    pub p99_ms: f64,
    pub p50_ms: f64,
    pub errors: u64,
    pub error_kinds: std::collections::BTreeMap<String, u64>,
    /// The relay's CPU use meanwhile, % of one core.
    pub relay_cpu_pct: f64,
}

/// One scenario's line of the table (and of the JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub scenario: Scenario,
    pub about: String,
    /// The scenario ran to the end (a failure to set up or a time-out is not a measurement).
    pub completed: bool,
    /// Not run: this box cannot (the reason says why).
    pub skipped: bool,
    pub attack_s: f64,
    pub rss_before_mib: f64,
    /// Largest `VmRSS` sampled (every 100 ms) during the attack.
    pub rss_peak_mib: f64,
    /// The kernel's own peak (`VmHWM`) at the end of the attack.
    pub hwm_mib: f64,
    pub baseline: Legit,
    pub attacked: Legit,
    pub goodput_ratio: f64,
    pub p99_ratio: f64,
    pub audit_bytes: u64,
    pub audit_bytes_per_sec: f64,
    pub log_lines: u64,
    pub log_lines_per_sec: f64,
    pub pass: bool,
    pub reasons: Vec<String>,
    pub notes: Vec<String>,
}

impl Row {
    /// A scenario that could not run to the end.
    pub fn broken(scenario: Scenario, about: String, why: String) -> Row {
        Row {
            scenario,
            about,
            completed: false,
            skipped: false,
            attack_s: 0.0,
            rss_before_mib: 0.0,
            rss_peak_mib: 0.0,
            hwm_mib: 0.0,
            baseline: Legit::default(),
            attacked: Legit::default(),
            goodput_ratio: 0.0,
            p99_ratio: 0.0,
            audit_bytes: 0,
            audit_bytes_per_sec: 0.0,
            log_lines: 0,
            log_lines_per_sec: 0.0,
            pass: false,
            reasons: vec![format!("did not complete: {why}")],
            notes: Vec::new(),
        }
    }

    /// A scenario this box cannot run, and why.
    pub fn skipped(scenario: Scenario, about: String, why: String) -> Row {
        let mut row = Row::broken(scenario, about, String::new());
        row.skipped = true;
        row.reasons = vec![format!("skipped: {why}")];
        row
    }

    pub fn verdict(&self) -> &'static str {
        if self.skipped {
            return "SKIPPED";
        }
        match (self.completed, self.pass) {
            (false, _) => "BROKEN",
            (true, true) => "PASS",
            (true, false) => "FAIL",
        }
    }

    /// Sets `pass` and the reasons from the thresholds.
    fn judge(&mut self, t: &Thresholds) {
        let limit = (t.rss_budget_mib + t.rss_constant_mib) as f64;
        let peak = self.rss_peak_mib.max(self.hwm_mib);
        let mut fail = |bad: bool, why: String| {
            if bad {
                self.reasons.push(why);
            }
        };
        fail(peak > limit, format!("relay RSS {peak:.0} MiB > {limit:.0} MiB"));
        fail(
            self.goodput_ratio < t.min_goodput_ratio,
            format!(
                "goodput {:.1} % of the baseline < {:.0} %",
                self.goodput_ratio * 100.0,
                t.min_goodput_ratio * 100.0
            ),
        );
        fail(
            self.p99_ratio > t.max_p99_ratio,
            format!("p99 {:.1}× the baseline > {}×", self.p99_ratio, t.max_p99_ratio),
        );
        fail(
            self.audit_bytes_per_sec > t.max_audit_bytes_per_sec as f64,
            format!(
                "audit stream {:.0} bytes/s > {}",
                self.audit_bytes_per_sec, t.max_audit_bytes_per_sec
            ),
        );
        fail(
            self.log_lines_per_sec > t.max_log_lines_per_sec,
            format!("log {:.1} lines/s > {}", self.log_lines_per_sec, t.max_log_lines_per_sec),
        );
        self.pass = self.reasons.is_empty();
    }
}

impl Legit {
    fn of(summary: &Summary, relay_cpu_pct: f64) -> Self {
        Legit {
            goodput: round2(summary.achieved_rate),
            p99_ms: round2(summary.latency_ms.p99),
            p50_ms: round2(summary.latency_ms.p50),
            errors: summary.error_total,
            error_kinds: summary.errors.clone(),
            relay_cpu_pct,
        }
    }
}

/// Runs `scenario` within its time limit; a scenario that fails to run is a broken row.
pub async fn run(
    args: &Args,
    scenario: Scenario,
    nats_bin: &Path,
    relay_bin: &Path,
    stop: watch::Receiver<bool>,
) -> Row {
    let about = scenario.about(&args.intensity);
    let limit = SET_UP_ALLOWANCE + args.ramp + (args.warmup + args.duration) * 2 + SETTLE;
    match timeout(limit, phases(args, scenario, nats_bin, relay_bin, stop)).await {
        Ok(Ok(mut row)) => {
            row.about = about;
            row.judge(&args.thresholds);
            row
        }
        Ok(Err(e)) => Row::broken(scenario, about, format!("{e:#}")),
        Err(_) => Row::broken(scenario, about, format!("time limit of {limit:?} reached")),
    }
}

/// The set-up, the baseline, the attack phase and the counts around it.
async fn phases(
    args: &Args,
    scenario: Scenario,
    nats_bin: &Path,
    relay_bin: &Path,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Row> {
    let v6 = scenario == Scenario::ConnFloodV6;
    let mut lab = Lab::new(nats_bin, relay_bin, args.out.join(scenario.name()))?;
    lab.relay_log_filter = "info";
    let nats = lab.nats("nats").await?;
    let mut config = lab.relay_config("relay", vec![nats.url()]);
    config.stream.name = "ATTACK".into();
    config.stream.subjects = vec!["edge.>".into()];
    config.auth.static_tokens[0].allow = vec!["edge.>".into()];
    config.audit.enabled = true;
    config.relay.shutdown_grace_ms = 2_000;
    // The budget the RSS is judged against is the relay's own.
    config.peers.memory_budget_bytes = (args.thresholds.rss_budget_mib << 20) as usize;
    let quic_port = free_shared_port();
    config.quic.listen = Some(if v6 {
        std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, quic_port))
    } else {
        std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, quic_port))
    });
    if v6 {
        config.https.listen.set_ip(std::net::Ipv6Addr::LOCALHOST.into());
    }
    let mut relay = lab.relay("relay", &config).await?;
    let pid = relay.pid().context("the relay has no pid")?;
    let aim = Arc::new(Aim {
        https: config.https.listen,
        quic: config.quic.listen.context("QUIC is off")?,
        ca: lab.ca.clone(),
        server_name: "localhost".into(),
        token: lab.token.clone(),
        intensity: args.intensity.clone(),
        // The attacker and the legitimate clients are different sources, as at a real PoP:
        // the attack comes from 127.0.0.2 (or a /64 of its own), the load from 127.0.0.1 (::1).
        sources: if v6 {
            super::netns::sources(args.intensity.v6_sources)
        } else {
            vec![ATTACKER_V4.into()]
        },
    });
    let legit = legit_target(args, &aim, &lab.token)?;
    let run = RunArgs {
        rate: args.rate,
        duration: args.duration,
        warmup: args.warmup,
        timeout: Duration::from_secs(5),
        pacer_spin: Duration::ZERO,
    };

    let cpu = Cpu::start(pid);
    let baseline = measure(&legit, &run, stop.clone()).await.context("the baseline")?;
    let relay_cpu_base_pct = cpu.percent();
    let memory_before = Memory::of(pid).unwrap_or_default();
    let audit_before = audit_bytes(&nats.url(), &config.audit.stream).await?;
    let lines_before = log_lines(relay.log());
    let sampler = relay.sample_memory();
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let attacker = attacker_runtime(args.attacker_nice).context("the attacker's runtime")?;
    let attack = attacker.spawn(launch(scenario, Arc::clone(&aim), Arc::clone(&tally)));
    sleep(args.ramp).await;
    let cpu = Cpu::start(pid);
    let attacked = measure(&legit, &run, stop.clone()).await;
    let relay_cpu_attack_pct = cpu.percent();
    let attack_end = attack_outcome(attack, &relay).await;
    attacker.shutdown_background();
    let attack_s = started.elapsed().as_secs_f64();
    let peak = sampler.max();
    drop(sampler);
    let hwm = Memory::of(pid).map(|m| m.hwm_kib).unwrap_or(peak.hwm_kib);
    // The relay aggregates refusals and suppresses repeated log lines per interval: a SIGTERM
    // makes it write what it holds, so the counts include everything the attack caused.
    sleep(SETTLE).await;
    if relay.term().is_ok() {
        relay.wait_exit(Duration::from_secs(15)).await?;
    }
    let audit_after = audit_bytes(&nats.url(), &config.audit.stream).await?;
    let lines_after = log_lines(relay.log());
    let attacked = attacked.context("the load under attack")?;

    let mib = |kib: u64| round2(kib as f64 / 1024.0);
    let baseline = Legit::of(&baseline, relay_cpu_base_pct);
    let attacked = Legit::of(&attacked, relay_cpu_attack_pct);
    let audit = audit_after.saturating_sub(audit_before);
    let lines = lines_after.saturating_sub(lines_before);
    let mut notes = vec![tally.line()];
    if let Some(end) = attack_end {
        notes.push(end);
    }
    notes.push(format!(
        "legitimate: {} ev/s offered over HTTPS/2; p50 {} → {} ms; errors {} → {} {:?}",
        args.rate,
        baseline.p50_ms,
        attacked.p50_ms,
        baseline.errors,
        attacked.errors,
        attacked.error_kinds
    ));
    notes.push(format!(
        "audit stream +{audit} bytes, relay log +{lines} lines over {attack_s:.1} s of attack \
         (counted after the relay stopped: aggregates it flushes on exit included)"
    ));
    Ok(Row {
        scenario,
        about: String::new(),
        completed: true,
        skipped: false,
        attack_s: round2(attack_s),
        rss_before_mib: mib(memory_before.rss_kib),
        rss_peak_mib: mib(peak.rss_kib),
        hwm_mib: mib(hwm),
        goodput_ratio: ratio(attacked.goodput, baseline.goodput),
        p99_ratio: ratio(attacked.p99_ms, baseline.p99_ms),
        baseline,
        attacked,
        audit_bytes: audit,
        audit_bytes_per_sec: round2(audit as f64 / attack_s),
        log_lines: lines,
        log_lines_per_sec: round2(lines as f64 / attack_s),
        pass: false,
        reasons: Vec::new(),
        notes,
    })
}

/// The attacker's runtime: threads of its own at a low CPU priority (`--attacker-nice`). At a PoP the
/// attacker is another machine; here its own work (building and encrypting hundreds of MiB/s)
/// would otherwise share the legitimate client's runtime and take the box's two cores from the
/// relay. What the relay spends on the attack still counts: the relay's CPU is measured, and
/// what the attacker achieved at that priority is in the row's notes (requests, MiB sent).
fn attacker_runtime(nice: i32) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("attacker")
        .on_thread_start(move || {
            // Linux keeps the nice value per thread: `None` (0) is the calling thread. Best
            // effort: at the usual priority the attack only gets stronger.
            let _ = rustix::process::setpriority_process(None, nice);
        })
        .enable_all()
        .build()
}

/// The relay's CPU time from a start.
struct Cpu {
    pid: u32,
    at: Instant,
    used: Duration,
}

impl Cpu {
    fn start(pid: u32) -> Self {
        Self { pid, at: Instant::now(), used: cpu_time(pid).unwrap_or_default() }
    }

    /// CPU used since the start, in % of one core (0 when the relay is gone).
    fn percent(&self) -> f64 {
        let used = cpu_time(self.pid).unwrap_or_default().saturating_sub(self.used);
        round2(100.0 * used.as_secs_f64() / self.at.elapsed().as_secs_f64().max(1e-3))
    }
}

/// Starts `scenario`'s attack; it runs until aborted (or fails to start).
async fn launch(scenario: Scenario, aim: Arc<Aim>, tally: Arc<Tally>) -> anyhow::Result<()> {
    match scenario {
        Scenario::All => Ok(()),
        Scenario::SlowH1 => http::slow_h1(aim, tally).await,
        Scenario::SlowH2 => http::slow_h2(aim, tally).await,
        Scenario::H2Flood => http::h2_flood(aim, tally).await,
        Scenario::UnauthFlood => http::unauth_flood(aim, tally).await,
        Scenario::ErrorEcho => http::error_echo(aim, tally).await,
        Scenario::SlowH3 => quic::slow_h3(aim, tally).await,
        Scenario::NativeTrickle => quic::native_trickle(aim, tally).await,
        Scenario::DecodeAmp => quic::decode_amp(aim, tally).await,
        Scenario::ConnFloodV4 | Scenario::ConnFloodV6 => {
            tokio::try_join!(
                http::conn_flood(Arc::clone(&aim), Arc::clone(&tally)),
                quic::conn_flood(aim, tally)
            )?;
            Ok(())
        }
    }
}

/// Stops the attack (if it still runs) and says how it ended when that is news: it failed, or
/// the relay died under it.
async fn attack_outcome(
    attack: tokio::task::JoinHandle<anyhow::Result<()>>,
    relay: &Relay,
) -> Option<String> {
    let alive = relay.pid().and_then(Memory::of).is_some();
    let ended = if attack.is_finished() {
        match attack.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("the attack stopped early: {e:#}")),
            Err(e) => Some(format!("the attack task failed: {e}")),
        }
    } else {
        attack.abort();
        let _ = attack.await;
        None
    };
    match (alive, ended) {
        (false, e) => Some(format!("the relay died under the attack; {}", e.unwrap_or_default())),
        (true, e) => e,
    }
}

/// The legitimate load: HTTPS over HTTP/2, the lab's token, `--rate`, subjects `edge.legit.*`.
fn legit_target(args: &Args, aim: &Aim, token: &str) -> anyhow::Result<Target<https::Args>> {
    // The address itself (`localhost` may resolve to the other family), the certificate's name.
    let url = if aim.https.is_ipv6() {
        format!("https://[::1]:{}", aim.https.port())
    } else {
        format!("https://127.0.0.1:{}", aim.https.port())
    };
    let mode = https::Args {
        url: url.parse()?,
        server_name: Some(aim.server_name.clone()),
        ca: Some(aim.ca.clone()),
        insecure: false,
        token: TokenArgs {
            token: Some(token.to_owned()),
            token_from: None,
            token_claims: String::new(),
            token_lifetime_secs: 0,
        },
        http: HttpVersion::Http2,
        connections: args.legit_connections.max(1),
        concurrency: 64,
    };
    let events = EventArgs {
        subjects: 4,
        subject_prefix: Some(LEGIT_PREFIX.into()),
        payload_bytes: 256,
        no_keys: false,
    };
    Ok(Target { mode, events, relay_pid: None })
}

/// One measured run of the legitimate load.
async fn measure(
    target: &Target<https::Args>,
    run: &RunArgs,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Summary> {
    let measured = target.measure(run, None, stop).await?;
    Ok(Summary::new("legit".into(), &measured.info, &measured.schedule, &measured.measurements))
}

/// The bytes the audit stream holds (0 before the relay created it).
async fn audit_bytes(nats_url: &str, stream: &str) -> anyhow::Result<u64> {
    let client = async_nats::connect(nats_url).await.context("connecting to NATS")?;
    let js = async_nats::jetstream::new(client);
    let Ok(mut stream) = js.get_stream(stream).await else { return Ok(0) };
    Ok(stream.info().await.context("audit stream info")?.state.bytes)
}

/// Lines in the relay's log file so far.
fn log_lines(path: &Path) -> u64 {
    std::fs::read(path).map_or(0, |text| text.iter().filter(|&&b| b == b'\n').count() as u64)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        round2(a / b)
    } else {
        0.0
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> Thresholds {
        crate::testing::parse::<Args>(&["attack", "all"]).unwrap().thresholds
    }

    fn row() -> Row {
        let mut row = Row::broken(Scenario::SlowH2, String::new(), String::new());
        row.reasons.clear();
        row.completed = true;
        row.rss_peak_mib = 200.0;
        row.hwm_mib = 210.0;
        row.goodput_ratio = 1.0;
        row.p99_ratio = 1.2;
        row.audit_bytes_per_sec = 100.0;
        row.log_lines_per_sec = 1.0;
        row
    }

    #[test]
    fn a_row_within_every_threshold_passes() {
        let mut r = row();
        r.judge(&thresholds());
        assert!(r.pass, "{:?}", r.reasons);
        assert_eq!(r.verdict(), "PASS");
    }

    #[test]
    fn each_threshold_fails_on_its_own() {
        type Change = fn(&mut Row);
        let cases: [(Change, &str); 5] = [
            (|r| r.hwm_mib = 500.0, "relay RSS 500 MiB > 416 MiB"),
            (|r| r.goodput_ratio = 0.5, "goodput 50.0 %"),
            (|r| r.p99_ratio = 3.5, "p99 3.5×"),
            (|r| r.audit_bytes_per_sec = 1e6, "audit stream"),
            (|r| r.log_lines_per_sec = 50.0, "log 50.0 lines/s"),
        ];
        for (change, expected) in cases {
            let mut r = row();
            change(&mut r);
            r.judge(&thresholds());
            assert!(!r.pass);
            assert_eq!(r.reasons.len(), 1, "{:?}", r.reasons);
            assert!(r.reasons[0].starts_with(expected), "{:?}", r.reasons);
        }
    }

    #[test]
    fn log_lines_are_counted_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.log");
        assert_eq!(log_lines(&path), 0);
        std::fs::write(&path, "a\nb\nc\n").unwrap();
        assert_eq!(log_lines(&path), 3);
    }
}
