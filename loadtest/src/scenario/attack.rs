//! `loadtest attack`: the attack suite. Each scenario starts its own nats-server and relay on
//! loopback (the chaos suite's [`lab`](super::chaos::lab), with the audit stream on, QUIC on
//! and the relay logging at `info` like a production relay), measures legitimate HTTPS traffic
//! at a fixed rate without an attack (the baseline), then again while the attack runs, and
//! reports what the attack cost: the relay's peak memory, legitimate goodput and p99 against
//! the baseline, audit-stream bytes and relay log lines written per second of attack. Each
//! row passes or fails against thresholds given as flags. It measures, it assumes nothing:
//! it runs against whatever relay binary it is given, with or without the defences of
//! issue 15.
//!
//! Every scenario is bounded in time (`--warmup`, `--ramp`, `--duration`, and a set-up limit)
//! and in count (each attack's intensity flags), and stays on loopback: the attack from
//! 127.0.0.2 (or its own IPv6 /64), the legitimate load from 127.0.0.1 (`::1`).
//!
//! # Layout
//!
//! - `stage`: the relay under test, the legitimate load, one scenario's phases and its row.
//! - `http`: the attacks over TCP: slow bodies on HTTP/1.1 and HTTP/2, the HTTP/2 stream
//!   flood, the unauthenticated request flood, the oversized error echo, the connection flood.
//! - `quic`: the attacks over QUIC: slow HTTP/3 bodies, the native-frame trickle, decode
//!   amplification, the QUIC half of the connection flood.
//! - `netns`: `conn-flood-v6` re-run in a user and network namespace with an IPv6 /64 on lo.

mod http;
mod netns;
mod quic;
mod stage;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::procs;
use crate::report;
use crate::schedule::parse_duration;
pub use stage::Row;

/// The scenarios, in the order `all` runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Every scenario below, in this order.
    All,
    /// HTTP/1.1: connections each declaring a large body, sending all but its last byte, no token.
    SlowH1,
    /// HTTP/2: connections × streams each declaring a large body, all but the last byte, no token.
    SlowH2,
    /// HTTP/3: connections × streams each declaring a large body, all but the last byte, no token.
    SlowH3,
    /// Native QUIC: connections × streams announcing a large frame and trickling it, no token.
    NativeTrickle,
    /// Native QUIC: frames of ~0.5 M empty events (2 bytes each) with no or an invalid token.
    DecodeAmp,
    /// HTTP/2: streams opened and reset at once (rapid reset), HEADERS without end.
    H2Flood,
    /// Many TLS and QUIC connections from one IPv4 address, held open.
    ConnFloodV4,
    /// Many QUIC and TLS connections from several addresses of one IPv6 /64 (a namespace).
    ConnFloodV6,
    /// Valid small requests with bad tokens at a fixed rate.
    UnauthFlood,
    /// Authenticated requests whose error would echo a 1 MiB JSON field.
    ErrorEcho,
}

/// Flags of `loadtest attack`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Scenarios to run, in order (`all`: every one).
    #[arg(value_enum, value_name = "SCENARIO", required = true)]
    scenarios: Vec<Scenario>,

    /// Legitimate load: events per second offered over HTTPS (HTTP/2, a static token), in the
    /// baseline and under attack.
    #[arg(long, value_name = "EVENTS_PER_SEC", default_value_t = 200.0)]
    rate: f64,

    /// How long each legitimate measurement lasts (baseline and under attack).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    duration: Duration,

    /// Warm-up of each legitimate measurement (sent, not recorded).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,

    /// How long the attack runs before the legitimate measurement under attack starts.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration)]
    ramp: Duration,

    /// Legitimate HTTP/2 connections.
    #[arg(long, value_name = "N", default_value_t = 2)]
    legit_connections: u32,

    /// Nice value of the attacker's threads (its own runtime). At a PoP the attacker is another
    /// machine: at 19 its own CPU goes to the relay and the legitimate load first; 0 weighs it
    /// as a neighbour on the relay's cores.
    #[arg(long, value_name = "NICE", default_value_t = 19, value_parser = clap::value_parser!(i32).range(0..=19))]
    attacker_nice: i32,

    #[command(flatten)]
    intensity: Intensity,

    #[command(flatten)]
    thresholds: Thresholds,

    /// Also write the rows as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Directory for the logs of every process (`<scenario>/`), created.
    #[arg(long, value_name = "DIR", default_value = ".attack")]
    out: PathBuf,

    /// The nats-server binary [default: $NATS_SERVER_BIN, else nats-server on the PATH]
    #[arg(long, value_name = "FILE", env = "NATS_SERVER_BIN")]
    nats_server_bin: Option<PathBuf>,

    /// The relay binary [default: edgerelay next to this loadtest binary]
    #[arg(long, value_name = "FILE")]
    relay_bin: Option<PathBuf>,

    /// Exit 0 even when a scenario fails its thresholds (still non-zero if one cannot run):
    /// for a baseline table of a relay without the defences.
    #[arg(long)]
    no_fail: bool,

    /// Internal: this process already runs inside the namespace of `conn-flood-v6`.
    #[arg(long, hide = true)]
    in_netns: bool,
}

/// How hard each attack pushes. The defaults are what a 2-core box drives beside the relay.
#[derive(Clone, Debug, clap::Args)]
pub struct Intensity {
    /// slow-*, native-trickle, decode-amp, h2-flood, unauth-flood: attacking connections
    /// (slow-h1: connections × --streams TCP connections, one request each).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub connections: u32,

    /// slow-h2, slow-h3, native-trickle: streams per connection; decode-amp: streams per
    /// connection each sending frames back to back (capped at 8).
    #[arg(long, value_name = "M", default_value_t = 64)]
    pub streams: u32,

    /// slow-*: the declared body, bytes (all but the last one are sent); native-trickle: the
    /// announced frame.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    pub body_bytes: u64,

    /// native-trickle: bytes per stream per second after the announcement.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
    pub trickle_bytes_per_sec: u64,

    /// decode-amp: empty events per frame (2 bytes each on the wire).
    #[arg(long, value_name = "N", default_value_t = 520_000)]
    pub amp_events: u32,

    /// h2-flood, unauth-flood: requests per second.
    #[arg(long, value_name = "N", default_value_t = 2_000)]
    pub flood_rate: u32,

    /// error-echo: requests per second, each with a --echo-bytes JSON string field.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub echo_rate: u32,

    /// error-echo: the echoed field, bytes (the request stays under the relay's 1 MiB body
    /// limit).
    #[arg(long, value_name = "BYTES", default_value_t = 1_000_000)]
    pub echo_bytes: usize,

    /// conn-flood-*: connections of each kind (TLS, QUIC) held open at most.
    #[arg(long, value_name = "N", default_value_t = 500)]
    pub flood_connections: u32,

    /// conn-flood-*: new connections per second (of both kinds together).
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub connect_rate: u32,

    /// conn-flood-v6: source addresses of the /64 the connections come from.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub v6_sources: u32,
}

/// What a scenario must meet (the "Done when" of issue 15).
#[derive(Clone, Debug, clap::Args)]
pub struct Thresholds {
    /// The relay's memory budget for bytes buffered from peers (`peers.memory_budget_bytes`),
    /// MiB: the relay is configured with it.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub rss_budget_mib: u64,

    /// What the relay may hold besides the budget (code, runtime, NATS client, caches), MiB.
    #[arg(long, value_name = "MIB", default_value_t = 160)]
    pub rss_constant_mib: u64,

    /// Legitimate goodput under attack, at least this fraction of the baseline's.
    #[arg(long, value_name = "RATIO", default_value_t = 0.95)]
    pub min_goodput_ratio: f64,

    /// Legitimate p99 under attack, at most this multiple of the baseline's.
    #[arg(long, value_name = "RATIO", default_value_t = 3.0)]
    pub max_p99_ratio: f64,

    /// Audit-stream bytes written per second of attack, at most.
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024)]
    pub max_audit_bytes_per_sec: u64,

    /// Relay log lines written per second of attack, at most.
    #[arg(long, value_name = "N", default_value_t = 10.0)]
    pub max_log_lines_per_sec: f64,
}

/// Where the attacks go and what they may use.
pub struct Aim {
    pub https: std::net::SocketAddr,
    pub quic: std::net::SocketAddr,
    pub ca: std::path::PathBuf,
    /// The name the relay's certificate carries.
    pub server_name: String,
    /// The valid static token (for the error echo, which needs an authenticated request).
    pub token: String,
    pub intensity: Intensity,
    /// Local addresses to connect from (conn-flood-v6); empty: the system's choice.
    pub sources: Vec<std::net::IpAddr>,
}

/// What an attack did, counted as it goes.
#[derive(Debug, Default)]
pub struct Tally {
    /// Connections, streams or requests the attack started.
    pub started: AtomicU64,
    /// Bytes it wrote (bodies, frames).
    pub bytes_sent: AtomicU64,
    /// Connections or streams the relay closed, reset or refused (and errors of ours).
    pub closed: AtomicU64,
    /// Answers, by status (HTTP) or error code (native).
    answers: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    pub fn start(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sent(&self, bytes: usize) {
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn close(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn answer(&self, what: impl Into<String>) {
        let mut answers = self.answers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *answers.entry(what.into()).or_default() += 1;
    }

    /// `started`, `closed` and the answers as one line for the notes.
    pub fn line(&self) -> String {
        let answers = self.answers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let answers: Vec<String> = answers.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        format!(
            "attack: {} started, {} MiB sent, {} closed/reset by the relay or failed; answers: {}",
            self.started.load(Ordering::Relaxed),
            self.bytes_sent.load(Ordering::Relaxed) >> 20,
            self.closed.load(Ordering::Relaxed),
            if answers.is_empty() { "none".to_owned() } else { answers.join(", ") }
        )
    }
}

impl Scenario {
    /// Every scenario, in the order `all` runs them.
    pub const ALL: [Scenario; 10] = [
        Scenario::SlowH1,
        Scenario::SlowH2,
        Scenario::SlowH3,
        Scenario::NativeTrickle,
        Scenario::DecodeAmp,
        Scenario::H2Flood,
        Scenario::ConnFloodV4,
        Scenario::ConnFloodV6,
        Scenario::UnauthFlood,
        Scenario::ErrorEcho,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::All => "all",
            Scenario::SlowH1 => "slow-h1",
            Scenario::SlowH2 => "slow-h2",
            Scenario::SlowH3 => "slow-h3",
            Scenario::NativeTrickle => "native-trickle",
            Scenario::DecodeAmp => "decode-amp",
            Scenario::H2Flood => "h2-flood",
            Scenario::ConnFloodV4 => "conn-flood-v4",
            Scenario::ConnFloodV6 => "conn-flood-v6",
            Scenario::UnauthFlood => "unauth-flood",
            Scenario::ErrorEcho => "error-echo",
        }
    }

    /// What the attack does at the given intensity, for the table's notes.
    pub fn about(self, i: &Intensity) -> String {
        let body = i.body_bytes >> 10;
        match self {
            Scenario::All => "every scenario".to_owned(),
            Scenario::SlowH1 => format!(
                "{} HTTP/1.1 connections, each POST declaring {body} KiB, all but 1 byte sent, no token",
                i.connections * i.streams
            ),
            Scenario::SlowH2 | Scenario::SlowH3 => format!(
                "{} HTTP/{} connections × {} streams, each POST declaring {body} KiB, all but 1 byte, no token",
                i.connections,
                if self == Scenario::SlowH2 { 2 } else { 3 },
                i.streams
            ),
            Scenario::NativeTrickle => format!(
                "{} QUIC connections × {} streams announcing a {body} KiB frame, trickled at {} KiB/s, all but 1 byte, no token",
                i.connections,
                i.streams,
                i.trickle_bytes_per_sec >> 10
            ),
            Scenario::DecodeAmp => format!(
                "{} QUIC connections × {} streams sending frames of {} empty events back to back, no/invalid token",
                i.connections,
                i.streams.min(quic::AMP_MAX_STREAMS),
                i.amp_events
            ),
            Scenario::H2Flood => format!(
                "{} HTTP/2 connections, {} streams/s opened (HEADERS, no end of stream) and reset after 1 ms",
                i.connections, i.flood_rate
            ),
            Scenario::ConnFloodV4 => format!(
                "up to {} TLS + {} QUIC connections from 127.0.0.2 at {}/s, held idle",
                i.flood_connections, i.flood_connections, i.connect_rate
            ),
            Scenario::ConnFloodV6 => format!(
                "up to {} TLS + {} QUIC connections from {} addresses of fd00:15::/64 at {}/s, held idle",
                i.flood_connections, i.flood_connections, i.v6_sources, i.connect_rate
            ),
            Scenario::UnauthFlood => format!(
                "{} HTTP/2 connections, {} small POSTs/s with bad tokens",
                i.connections, i.flood_rate
            ),
            Scenario::ErrorEcho => format!(
                "{} authenticated POSTs/s whose JSON has a {} KiB string where a number belongs",
                i.echo_rate,
                i.echo_bytes >> 10
            ),
        }
    }
}

/// Runs `loadtest attack`.
pub async fn run(args: Args, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    anyhow::ensure!(args.rate > 0.0 && args.rate.is_finite(), "--rate must be positive");
    anyhow::ensure!(args.intensity.body_bytes >= 2, "--body-bytes must be at least 2");
    let nats_bin = procs::nats_server_bin(args.nats_server_bin.as_deref());
    let relay_bin = procs::relay_bin(args.relay_bin.as_deref())?;
    let mut scenarios = Vec::new();
    for s in &args.scenarios {
        match s {
            Scenario::All => scenarios.extend(Scenario::ALL),
            s => scenarios.push(*s),
        }
    }
    let mut rows = Vec::new();
    for scenario in scenarios {
        if *stop.borrow() {
            break;
        }
        eprintln!("attack: {} ({})", scenario.name(), scenario.about(&args.intensity));
        let row = if scenario == Scenario::ConnFloodV6 && !args.in_netns {
            netns::run(&args).await
        } else {
            stage::run(&args, scenario, &nats_bin, &relay_bin, stop.clone()).await
        };
        eprintln!("attack: {}: {}", scenario.name(), row.verdict());
        rows.push(row);
    }
    print!("{}", markdown(&rows, &args.thresholds));
    if let Some(path) = &args.json {
        report::write_json(path, &rows)?;
    }
    let broken: Vec<&str> =
        rows.iter().filter(|r| !r.completed && !r.skipped).map(|r| r.scenario.name()).collect();
    anyhow::ensure!(broken.is_empty(), "scenarios did not complete: {}", broken.join(", "));
    let failed: Vec<&str> =
        rows.iter().filter(|r| r.completed && !r.pass).map(|r| r.scenario.name()).collect();
    anyhow::ensure!(
        args.no_fail || failed.is_empty(),
        "scenarios failed their thresholds: {}",
        failed.join(", ")
    );
    Ok(())
}

/// The result table with the thresholds and the notes.
pub fn markdown(rows: &[Row], t: &Thresholds) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "#### `loadtest attack`\n\n| scenario | attack s | relay RSS before → peak MiB (VmHWM) | \
         goodput ev/s base → attack (ratio) | p99 ms base → attack (ratio) | relay CPU % base → \
         attack | audit bytes/s | log lines/s | result |\n|---|---:|---:|---:|---:|---:|---:|---:|:---:|"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.0} → {:.0} ({:.0}) | {:.0} → {:.0} ({:.2}) | {:.1} → {:.1} ({:.1}×) | {:.0} → {:.0} | {:.0} | {:.1} | {} |",
            r.scenario.name(),
            r.attack_s,
            r.rss_before_mib,
            r.rss_peak_mib,
            r.hwm_mib,
            r.baseline.goodput,
            r.attacked.goodput,
            r.goodput_ratio,
            r.baseline.p99_ms,
            r.attacked.p99_ms,
            r.p99_ratio,
            r.baseline.relay_cpu_pct,
            r.attacked.relay_cpu_pct,
            r.audit_bytes_per_sec,
            r.log_lines_per_sec,
            r.verdict()
        );
    }
    let _ = writeln!(
        out,
        "\nThresholds: RSS ≤ {} + {} MiB; goodput ≥ {:.0} % of the baseline; p99 ≤ {}× the \
         baseline; audit ≤ {} bytes/s and log ≤ {} lines/s of attack.\n",
        t.rss_budget_mib,
        t.rss_constant_mib,
        t.min_goodput_ratio * 100.0,
        t.max_p99_ratio,
        t.max_audit_bytes_per_sec,
        t.max_log_lines_per_sec
    );
    for r in rows {
        let _ = writeln!(out, "- **{}** ({}):", r.scenario.name(), r.about);
        for reason in &r.reasons {
            let what = if r.skipped { "SKIPPED" } else { "FAIL" };
            let _ = writeln!(out, "  - {what}: {reason}");
        }
        for n in &r.notes {
            let _ = writeln!(out, "  - {n}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        testing::parse(argv)
    }

    #[test]
    fn scenarios_parse_by_name_and_all_is_one_of_them() {
        let args = parse(&["attack", "slow-h2", "decode-amp", "--streams", "8"]).unwrap();
        assert_eq!(args.scenarios, [Scenario::SlowH2, Scenario::DecodeAmp]);
        assert_eq!(args.intensity.streams, 8);
        assert_eq!(parse(&["attack", "all"]).unwrap().scenarios, [Scenario::All]);
        assert!(parse(&["attack"]).is_err());
        assert!(parse(&["attack", "nope"]).is_err());
        testing::assert_names_parse_back(&Scenario::ALL, Scenario::name);
    }

    #[test]
    fn the_table_has_a_row_per_scenario_and_the_reasons() {
        let t = parse(&["attack", "all"]).unwrap().thresholds;
        let broken = Row::broken(Scenario::SlowH1, "about".into(), "relay never ready".into());
        let text = markdown(&[broken], &t);
        assert!(text.contains("| slow-h1 |"), "{text}");
        assert!(text.contains("did not complete: relay never ready"), "{text}");
        assert!(text.contains("RSS ≤ 256 + 160 MiB"), "{text}");
    }

    #[test]
    fn the_tally_counts_answers_by_kind() {
        let tally = Tally::default();
        tally.start();
        tally.answer("401");
        tally.answer("401");
        tally.close();
        let line = tally.line();
        assert!(line.contains("1 started") && line.contains("401 ×2"), "{line}");
    }
}
