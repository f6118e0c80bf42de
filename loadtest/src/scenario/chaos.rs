//! `loadtest chaos`: the fault-injection suite. Each scenario starts its own nats-server(s)
//! and relay process(es) on loopback, runs the [`ledger`] client against the relay while it
//! breaks something (kills NATS, its stream leader, the relay; slows or fills NATS; overloads
//! the relay), then reads the stream(s) back and [`verify`]s the ledger against them: no
//! acknowledged event missing, duplicates counted, no 2xx while nothing could acknowledge.
//! Every scenario is bounded in time and kills its children however it ends.
//!
//! # Adding a scenario
//!
//! 1. Add a variant to [`Scenario`] (its kebab-case name is the CLI name), to
//!    [`Scenario::ALL`], and a line to [`Scenario::about`].
//! 2. Write `async fn name(cx: &Cx) -> anyhow::Result<Outcome>` in `chaos/scenarios.rs` (or
//!    its own `chaos/<name>.rs`) and call it from [`Scenario::run`]'s match. It builds its
//!    topology with the [`lab::Lab`] from [`Cx::lab`] (`lab.nats(..)`, `lab.cluster(..)`,
//!    `lab.relay(name, &config)` with the typed relay config of [`lab::Lab::relay_config`],
//!    changed where the scenario needs clusters, a spool and so on; `wan::spawn` for a proxy
//!    whose `set_blackhole` / `set_extra_delay` make a path dark or slow), starts the load
//!    with [`Cx::load`], records what it does on a [`verify::Timeline`] (faults, recovery
//!    marks, relay restarts, all-down intervals), and returns [`Cx::outcome`] with its own
//!    [`Check`]s and notes. The common checks and the result row come from here.
//!
//! # Layout
//!
//! - `ledger`: the client that sends, retries and records every event.
//! - `verify`: reading the streams back; the checks against the ledger and the timeline.
//! - `lab`: nats-servers, a 3-node cluster, relay processes, the memory sampler.
//! - `scenarios`: one function per scenario of NATS' and the relay's faults.
//! - `resilience`: the scenarios of the relay's failover and disk spool.

pub mod lab;
mod ledger;
mod resilience;
mod scenarios;
mod verify;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::timeout;

use crate::procs::{self, Memory};
use crate::report;
use ledger::{Ledger, Load, LoadSpec, RetryPolicy, Target};
use verify::{Counts, Stored, Timeline, Verdict};

/// The scenarios, in the order a full run takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// kill -9 nats-server under load, restart it on the same port and store.
    NatsKill,
    /// A 3-node cluster with an R3 stream: kill the stream leader, later a follower.
    ClusterLeader,
    /// SIGTERM the relay under load: in-flight requests answered, nothing acknowledged lost.
    Drain,
    /// NATS behind a proxy that turns slower than the publish deadline, later goes dark.
    SlowNats,
    /// A stream with small limits and discard-new fills up under load.
    StreamFull,
    /// Three times the sustainable rate.
    Overload,
    /// Two clusters: the nearest goes dark, the relay fails over, and back after the hold.
    Failover,
    /// Ack mode spooled: the only cluster is killed; events spool, then replay.
    SpoolOutage,
    /// Ack mode spooled: kill -9 the relay with a full spool; the next start replays it.
    RelayKill,
    /// A truncated and a bit-flipped spool segment: detected, reported, the rest replayed.
    SpoolCorrupt,
}

/// Flags of `loadtest chaos`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Scenarios to run, in order [default: all]
    #[arg(value_enum, value_name = "SCENARIO")]
    scenarios: Vec<Scenario>,

    /// The long version: 5× the durations and fault counts (nats-kill every 10-30 s).
    #[arg(long)]
    long: bool,

    /// Offered load, events per second (each a request), during the fault scenarios.
    #[arg(long, value_name = "EVENTS_PER_SEC", default_value_t = 200.0)]
    rate: f64,

    /// overload: the sustainable rate to triple [default: measured by a short saturation run]
    #[arg(long, value_name = "EVENTS_PER_SEC")]
    max_rate: Option<f64>,

    /// Requests in flight at most (the ledger client's concurrency).
    #[arg(long, value_name = "N", default_value_t = 64)]
    concurrency: usize,

    /// HTTP/2 connections to the relay.
    #[arg(long, value_name = "N", default_value_t = 2)]
    connections: usize,

    /// Event payload, bytes (at least 24).
    #[arg(long, value_name = "N", default_value_t = 128)]
    payload_bytes: usize,

    /// The relay's resident memory must stay under this, MiB.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    rss_limit_mib: u64,

    /// Seed of the long nats-kill intervals.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,

    /// Also write the rows (with every count, the timeline and the notes) as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Directory for the logs of every process (`<scenario>/`), created.
    #[arg(long, value_name = "DIR", default_value = ".chaos")]
    out: PathBuf,

    /// The nats-server binary [default: $NATS_SERVER_BIN, else nats-server on the PATH]
    #[arg(long, value_name = "FILE", env = "NATS_SERVER_BIN")]
    nats_server_bin: Option<PathBuf>,

    /// The relay binary [default: edgerelay next to this loadtest binary]
    #[arg(long, value_name = "FILE")]
    relay_bin: Option<PathBuf>,
}

/// What a scenario gets: the flags, its log directory, and the stop signal.
pub struct Cx {
    args: Args,
    scenario: Scenario,
    nats_bin: PathBuf,
    relay_bin: PathBuf,
    stop: watch::Receiver<bool>,
}

/// A scenario's own check, besides the common ones.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub ok: bool,
    pub what: String,
}

/// What a scenario hands back for judging.
pub struct Outcome {
    pub ledger: Ledger,
    pub stored: Stored,
    pub timeline: Timeline,
    /// The relay's peak memory, when sampled.
    pub memory: Option<Memory>,
    pub checks: Vec<Check>,
    pub notes: Vec<String>,
    pub rate: f64,
}

/// One scenario's line of the table (and of the JSON).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub scenario: Scenario,
    pub duration_s: f64,
    pub rate: f64,
    /// The verdict's, its recovery rounded to the microsecond.
    #[serde(flatten)]
    pub counts: Counts,
    pub max_rss_mib: Option<f64>,
    pub p99_ack_ms: f64,
    pub pass: bool,
    pub reasons: Vec<String>,
    pub notes: Vec<String>,
    pub checks: Vec<Check>,
    pub verdict: Option<Verdict>,
    pub timeline: Option<Timeline>,
}

impl Scenario {
    /// Every scenario, in run order.
    pub const ALL: [Scenario; 10] = [
        Scenario::NatsKill,
        Scenario::ClusterLeader,
        Scenario::Failover,
        Scenario::SpoolOutage,
        Scenario::RelayKill,
        Scenario::Drain,
        Scenario::SlowNats,
        Scenario::StreamFull,
        Scenario::SpoolCorrupt,
        Scenario::Overload,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::NatsKill => "nats-kill",
            Scenario::ClusterLeader => "cluster-leader",
            Scenario::Drain => "drain",
            Scenario::SlowNats => "slow-nats",
            Scenario::StreamFull => "stream-full",
            Scenario::Overload => "overload",
            Scenario::Failover => "failover",
            Scenario::SpoolOutage => "spool-outage",
            Scenario::RelayKill => "relay-kill",
            Scenario::SpoolCorrupt => "spool-corrupt",
        }
    }

    /// One line for the table's notes.
    pub fn about(self) -> &'static str {
        match self {
            Scenario::NatsKill => "kill -9 nats-server under load, restart it (same port, store)",
            Scenario::ClusterLeader => {
                "3-node cluster, R3 stream: kill -9 the stream leader, later a follower; restart each"
            }
            Scenario::Drain => "SIGTERM the relay under load, restart it",
            Scenario::SlowNats => {
                "NATS path delayed beyond the publish deadline, later black-holed; each restored"
            }
            Scenario::StreamFull => "stream with max_msgs/max_bytes and discard-new fills up",
            Scenario::Overload => "3x the sustainable rate",
            Scenario::Failover => {
                "two clusters 5 and 30 ms away: the near one's path black-holed, then restored"
            }
            Scenario::SpoolOutage => {
                "ack mode spooled: kill -9 the only nats-server, restart it; the spool replays"
            }
            Scenario::RelayKill => {
                "ack mode spooled: NATS down, kill -9 the relay with batches spooled; NATS and relay back"
            }
            Scenario::SpoolCorrupt => {
                "spooled with NATS down, relay stopped; a bit flipped in one segment, the last one cut short; restarted with NATS up"
            }
        }
    }

    async fn run(self, cx: &Cx) -> anyhow::Result<Outcome> {
        match self {
            Scenario::NatsKill => scenarios::nats_kill(cx).await,
            Scenario::ClusterLeader => scenarios::cluster_leader(cx).await,
            Scenario::Drain => scenarios::drain(cx).await,
            Scenario::SlowNats => scenarios::slow_nats(cx).await,
            Scenario::StreamFull => scenarios::stream_full(cx).await,
            Scenario::Overload => scenarios::overload(cx).await,
            Scenario::Failover => resilience::failover(cx).await,
            Scenario::SpoolOutage => resilience::spool_outage(cx).await,
            Scenario::RelayKill => resilience::relay_kill(cx).await,
            Scenario::SpoolCorrupt => resilience::spool_corrupt(cx).await,
        }
    }
}

impl Cx {
    /// 5 with `--long`, else 1: durations and fault counts scale by it.
    pub fn factor(&self) -> u32 {
        if self.args.long {
            5
        } else {
            1
        }
    }

    /// `short` scaled by [`Cx::factor`].
    pub fn scaled(&self, short: Duration) -> Duration {
        short * self.factor()
    }

    pub fn long(&self) -> bool {
        self.args.long
    }

    pub fn seed(&self) -> u64 {
        self.args.seed
    }

    pub fn rate(&self) -> f64 {
        self.args.rate
    }

    pub fn max_rate(&self) -> Option<f64> {
        self.args.max_rate
    }

    pub fn rss_limit_kib(&self) -> u64 {
        self.args.rss_limit_mib * 1024
    }

    /// True once Ctrl-C or SIGTERM asked the run to stop.
    pub fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// A fresh lab for this scenario, logging to `<out>/<scenario>/`.
    pub fn lab(&self) -> anyhow::Result<lab::Lab> {
        let logs = self.args.out.join(self.scenario.name());
        lab::Lab::new(&self.nats_bin, &self.relay_bin, logs)
    }

    /// The load shape with the flags' defaults: `rate` for `duration`, an EdgeWorker's retry
    /// policy (6 attempts within 20 s, Retry-After honoured up to 2 s).
    pub fn load_spec(&self, rate: f64, duration: Duration) -> LoadSpec {
        LoadSpec {
            rate,
            duration,
            connections: self.args.connections,
            concurrency: self.args.concurrency,
            subject_prefix: format!("chaos.{}", self.scenario.name().replace('-', "_")),
            subjects: 4,
            payload_bytes: self.args.payload_bytes,
            retry: RetryPolicy {
                max_attempts: 6,
                max_time: Duration::from_secs(20),
                request_timeout: Duration::from_secs(10),
                max_retry_after: Duration::from_secs(2),
                backoff: Duration::from_millis(200),
            },
        }
    }

    /// Starts `spec` against `target`.
    pub async fn load(&self, target: &Target, spec: LoadSpec) -> anyhow::Result<Load> {
        eprintln!(
            "chaos: {}: {} events/s for {} s",
            self.scenario.name(),
            spec.rate,
            spec.duration.as_secs_f64()
        );
        Load::start(target, spec).await
    }

    /// Bundles what the scenario measured.
    pub fn outcome(
        &self,
        ledger: Ledger,
        stored: Stored,
        timeline: Timeline,
        rate: f64,
    ) -> Outcome {
        Outcome {
            ledger,
            stored,
            timeline,
            memory: None,
            checks: Vec::new(),
            notes: Vec::new(),
            rate,
        }
    }
}

impl Outcome {
    pub fn check(&mut self, ok: bool, what: impl Into<String>) {
        self.checks.push(Check { ok, what: what.into() });
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The result row: the common checks plus the scenario's own.
    fn row(self, scenario: Scenario, rss_limit_kib: u64) -> Row {
        let gap = verify::gap_threshold(self.rate);
        let verdict = verify::judge(&self.ledger, &self.stored, &self.timeline, gap);
        let mut reasons = verdict.failures.clone();
        let mut checks = self.checks;
        if let Some(m) = self.memory {
            let peak = m.rss_kib.max(m.hwm_kib);
            checks.push(Check {
                ok: peak <= rss_limit_kib,
                what: format!(
                    "relay peak RSS {:.0} MiB <= {} MiB",
                    peak as f64 / 1024.0,
                    rss_limit_kib / 1024
                ),
            });
        }
        reasons.extend(checks.iter().filter(|c| !c.ok).map(|c| format!("failed: {}", c.what)));
        let mut notes = self.notes;
        notes.push(format!("answers: {}", answers_line(&verdict)));
        if verdict.duplicated_across_clusters > 0 {
            notes.push(format!(
                "{} duplicates across clusters (a batch stored by the old cluster after it was \
                 published again on the new one; allowed, the duplicate window is per stream)",
                verdict.duplicated_across_clusters
            ));
        }
        if verdict.missing_written_off > 0 {
            notes.push(format!(
                "{} acknowledged events written off: their spool records were destroyed on \
                 purpose",
                verdict.missing_written_off
            ));
        }
        if verdict.duplicated_excused > 0 {
            notes.push(format!(
                "{} duplicates excused: their retries spanned a relay restart",
                verdict.duplicated_excused
            ));
        }
        Row {
            scenario,
            duration_s: round3(self.ledger.elapsed.as_secs_f64()),
            rate: self.rate,
            counts: Counts {
                recovery_ms: verdict.counts.recovery_ms.map(round3),
                ..verdict.counts.clone()
            },
            max_rss_mib: self.memory.map(|m| round3(m.rss_kib.max(m.hwm_kib) as f64 / 1024.0)),
            p99_ack_ms: verdict.ack_latency_ms.p99,
            pass: reasons.is_empty(),
            reasons,
            notes,
            checks,
            verdict: Some(verdict),
            timeline: Some(self.timeline),
        }
    }
}

impl Row {
    /// A scenario that could not run to the end (set-up failed, time limit): a failure.
    fn broken(scenario: Scenario, error: &anyhow::Error, elapsed: Duration) -> Row {
        Row {
            scenario,
            duration_s: round3(elapsed.as_secs_f64()),
            rate: 0.0,
            counts: Counts::default(),
            max_rss_mib: None,
            p99_ack_ms: 0.0,
            pass: false,
            reasons: vec![format!("did not complete: {error:#}")],
            notes: Vec::new(),
            checks: Vec::new(),
            verdict: None,
            timeline: None,
        }
    }
}

/// Runs `loadtest chaos`.
pub async fn run(args: Args, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    anyhow::ensure!(args.rate > 0.0 && args.rate.is_finite(), "--rate must be positive");
    anyhow::ensure!(
        args.payload_bytes >= crate::events::STAMP_LEN,
        "--payload-bytes must be >= 24"
    );
    let nats_bin = procs::nats_server_bin(args.nats_server_bin.as_deref());
    let relay_bin = procs::relay_bin(args.relay_bin.as_deref())?;
    let scenarios =
        if args.scenarios.is_empty() { Scenario::ALL.to_vec() } else { args.scenarios.clone() };
    let mut rows = Vec::new();
    for scenario in scenarios {
        if *stop.borrow() {
            break;
        }
        let cx = Cx {
            args: args.clone(),
            scenario,
            nats_bin: nats_bin.clone(),
            relay_bin: relay_bin.clone(),
            stop: stop.clone(),
        };
        let limit = Duration::from_secs(240) * cx.factor();
        eprintln!(
            "chaos: {} ({}), at most {} s",
            scenario.name(),
            scenario.about(),
            limit.as_secs()
        );
        let started = std::time::Instant::now();
        let row = match timeout(limit, scenario.run(&cx)).await {
            Ok(Ok(outcome)) => outcome.row(scenario, cx.rss_limit_kib()),
            Ok(Err(e)) => Row::broken(scenario, &e, started.elapsed()),
            Err(_) => Row::broken(
                scenario,
                &anyhow::anyhow!("time limit of {} s reached", limit.as_secs()),
                started.elapsed(),
            ),
        };
        eprintln!("chaos: {}: {}", scenario.name(), if row.pass { "PASS" } else { "FAIL" });
        rows.push(row);
    }
    let table = markdown(&rows, args.long);
    print!("{table}");
    if let Some(path) = &args.json {
        report::write_json(path, &rows)?;
    }
    let failed: Vec<&str> = rows.iter().filter(|r| !r.pass).map(|r| r.scenario.name()).collect();
    anyhow::ensure!(failed.is_empty(), "scenarios failed: {}", failed.join(", "));
    Ok(())
}

/// The result table with its notes.
pub fn markdown(rows: &[Row], long: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "#### `loadtest chaos`{}\n\n| scenario | duration s | events/s | sent | acknowledged | \
         missing | duplicated | stored, unacknowledged | recovery ms | max relay RSS MiB | \
         p99 acknowledged ms | result |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
        if long { " --long" } else { "" }
    );
    let opt = |x: Option<f64>| x.map_or_else(|| "–".to_owned(), |v| format!("{v:.0}"));
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {} |",
            r.scenario.name(),
            r.duration_s,
            r.rate,
            r.counts.sent,
            r.counts.acknowledged,
            r.counts.missing,
            r.counts.duplicated,
            r.counts.stored_unacknowledged,
            opt(r.counts.recovery_ms),
            opt(r.max_rss_mib),
            r.p99_ack_ms,
            if r.pass { "PASS" } else { "FAIL" }
        );
    }
    out.push('\n');
    for r in rows {
        let _ = writeln!(out, "- **{}** ({}):", r.scenario.name(), r.scenario.about());
        for reason in &r.reasons {
            let _ = writeln!(out, "  - FAIL: {reason}");
        }
        for c in r.checks.iter().filter(|c| c.ok) {
            let _ = writeln!(out, "  - ok: {}", c.what);
        }
        for n in &r.notes {
            let _ = writeln!(out, "  - {n}");
        }
    }
    out
}

fn answers_line(v: &Verdict) -> String {
    v.answers.iter().map(|(k, n)| format!("{k} ×{n}")).collect::<Vec<_>>().join(", ")
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        testing::parse(argv)
    }

    #[test]
    fn scenarios_parse_by_name_and_default_to_all() {
        let args = parse(&["chaos", "nats-kill", "drain", "--long"]).unwrap();
        assert_eq!(args.scenarios, [Scenario::NatsKill, Scenario::Drain]);
        assert!(args.long);
        assert!(parse(&["chaos"]).unwrap().scenarios.is_empty());
        assert!(parse(&["chaos", "nope"]).is_err());
        testing::assert_names_parse_back(&Scenario::ALL, Scenario::name);
    }

    #[test]
    fn the_table_has_a_row_per_scenario_and_the_reasons() {
        let broken = Row::broken(
            Scenario::Drain,
            &anyhow::anyhow!("relay never ready"),
            Duration::from_secs(3),
        );
        let text = markdown(&[broken], false);
        assert!(text.contains("| drain | 3.0 |"), "{text}");
        assert!(text.contains("FAIL: did not complete: relay never ready"), "{text}");
    }

    #[test]
    fn a_rows_counts_are_its_own_keys_in_the_json_in_table_order() {
        let broken = Row::broken(Scenario::Drain, &anyhow::anyhow!("x"), Duration::from_secs(3));
        let json = serde_json::to_string(&broken).unwrap();
        let keys = r#""rate":0.0,"sent":0,"acknowledged":0,"missing":0,"duplicated":0,"stored_unacknowledged":0,"recovery_ms":null,"max_rss_mib":null,"#;
        assert!(json.contains(keys), "{json}");
    }
}
