//! `loadtest bench https` (`scripts/bench-https`): batching on vs off over HTTPS in one run.
//! One nats-server, one relay per variant (each its own stream), the same open-loop `loadtest
//! https` load against each, variants alternating for `ROUNDS` rounds; prints a markdown table
//! of medians (and ratios to the first variant) for BENCHMARKS.md; raw JSON and .hgrm go to
//! `.bench/`.
//!
//! Variants: `batched` (the default config), `unbatched` (`batch.max_events = 1`: one
//! JetStream message per event), `fixed-linger` (`batch.flush_when_idle = false`: every batch
//! waits `linger_ms` unless full), `early-N` (`batch.early_flushes_per_sec = N`: batches
//! also go at once N times a second while acks are outstanding), and `before` (the default config run by the edgerelay
//! binary in `BEFORE_BIN`, an earlier build: an A/B of a change to the relay, e.g.
//! `BEFORE_BIN=... VARIANTS="before batched"`).
//!
//! `PROTOCOLS="https quic"` also loads every relay over its native QUIC listener
//! (`EVENTS_PER_REQUEST` events per request, one by default), alternating with the HTTPS runs: an A/B of two builds over both front-ends
//! in one invocation, a table per protocol.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context as _};
use edgerelay::config::Config;
use tokio::sync::watch;

use super::rounds::{alternating, command, median, ms_per_k, shared_flags, Run};
use super::stack::{Relay, Stack};
use super::{duration_text, Binaries};
use edgerelay_testkit::{free_shared_port, local};

/// Flags of `loadtest bench https`; each also reads the environment variable named.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    bins: Binaries,
    /// Offered events/s.
    #[arg(long, env = "RATE", default_value_t = 4000)]
    rate: u64,
    /// Measured duration of each run (after a 2 s warm-up).
    #[arg(long, env = "DURATION", default_value = "10s", value_parser = duration_text)]
    duration: String,
    #[arg(long, env = "ROUNDS", default_value_t = 3)]
    rounds: u32,
    /// HTTP version: 1 or 2.
    #[arg(long, env = "HTTP", default_value = "2")]
    http: String,
    #[arg(long, env = "CONNECTIONS", default_value_t = 8)]
    connections: u32,
    /// Payload bytes.
    #[arg(long, env = "PAYLOAD", default_value_t = 256)]
    payload: u32,
    /// Events per request of the `quic` protocol (HTTPS requests carry one).
    #[arg(long, env = "EVENTS_PER_REQUEST", default_value_t = 1)]
    events_per_request: u32,
    /// Space-separated: batched, unbatched, fixed-linger, early-N, before; the first is
    /// the baseline of the ratios.
    #[arg(long, env = "VARIANTS", default_value = "batched unbatched")]
    variants: String,
    /// Space-separated: how the load reaches each relay, `https` and/or `quic` (the native
    /// protocol, one event per request, CONNECTIONS connections): with both, an A/B of two
    /// builds over both paths in one run, each protocol its own table.
    #[arg(long, env = "PROTOCOLS", default_value = "https")]
    protocols: String,
    /// The earlier edgerelay binary the `before` variant runs.
    #[arg(long, env = "BEFORE_BIN")]
    before_bin: Option<PathBuf>,
    /// Where raw outputs go (emptied first).
    #[arg(long, default_value = ".bench")]
    out: PathBuf,
}

/// The medians of one variant's runs.
struct Row {
    rate: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    errors: f64,
    relay_cpu: f64,
    nats_cpu: f64,
}

impl Row {
    fn of(runs: &[Run]) -> Self {
        let med = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f));
        Row {
            rate: med(&|r| r.summary.achieved_rate),
            p50: med(&|r| r.summary.latency_ms.p50),
            p99: med(&|r| r.summary.latency_ms.p99),
            p999: med(&|r| r.summary.latency_ms.p999),
            max: med(&|r| r.summary.latency_ms.max),
            errors: med(&|r| r.summary.error_total as f64),
            relay_cpu: med(&|r| ms_per_k(r.relay_cpu.unwrap_or_default(), r.events())),
            nats_cpu: med(&|r| ms_per_k(r.nats_cpu, r.events())),
        }
    }
}

/// The relay config of `variant` (its own stream on `edge.VARIANT.>`).
fn config(stack: &Stack, variant: &str, quic: bool) -> anyhow::Result<Config> {
    let mut config = stack.relay_config(variant)?;
    if quic {
        config.quic.listen = Some(local(free_shared_port()));
    }
    match variant {
        "batched" | "before" => {}
        "unbatched" => config.batch.max_events = 1,
        "fixed-linger" => config.batch.flush_when_idle = false,
        _ => match variant.strip_prefix("early-").map(str::parse) {
            Some(Ok(n)) => config.batch.early_flushes_per_sec = n,
            _ => bail!(
                "unknown variant {variant} (batched, unbatched, fixed-linger, early-N, before)"
            ),
        },
    }
    config.stream.name = format!("BENCH_{}", variant.to_uppercase().replace('-', "_"));
    config.stream.subjects = vec![format!("edge.{variant}.>")];
    Ok(config)
}

impl Args {
    /// The loadtest arguments of one run of `variant` over `protocol` against `relay`.
    fn loadtest(&self, protocol: &str, variant: &str, relay: &Relay, ca: &Path) -> Vec<String> {
        let ca = ca.to_string_lossy().into_owned();
        let mut flags: Vec<(&str, String)> = match (protocol, relay.quic) {
            ("quic", Some(quic)) => vec![
                ("--addr", quic.to_string()),
                ("--ca", ca),
                ("--events-per-request", self.events_per_request.to_string()),
            ],
            _ => vec![
                ("--url", format!("https://{}", relay.https)),
                ("--ca", ca),
                ("--http", self.http.clone()),
            ],
        };
        flags.extend([
            ("--connections", self.connections.to_string()),
            ("--rate", self.rate.to_string()),
            ("--subject-prefix", format!("edge.{variant}.load")),
        ]);
        let shared = shared_flags(&self.duration, "2s", 8, self.payload, variant);
        command(protocol, flags.into_iter().chain(shared))
    }

    /// The first line above a protocol's table.
    fn heading(&self, protocol: &str) -> String {
        let path = match protocol {
            "quic" => match self.events_per_request {
                1 => "QUIC (edgerelay/1, one event per request)".to_owned(),
                n => format!("QUIC (edgerelay/1, {n} events per request)"),
            },
            _ => format!("HTTP/{}", self.http),
        };
        format!(
            "offered {}/s, {} per run, {path}, {} connections, {} B payloads, median of {} \
             alternating rounds",
            self.rate, self.duration, self.connections, self.payload, self.rounds
        )
    }
}

pub async fn run(args: Args, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let variants: Vec<&str> = args.variants.split_whitespace().collect();
    ensure!(!variants.is_empty(), "no VARIANTS");
    let before = match (&args.before_bin, variants.contains(&"before")) {
        (None, true) => bail!("variant before: set BEFORE_BIN to the earlier edgerelay binary"),
        (bin, _) => bin.as_deref(),
    };
    let protocols: Vec<&str> = args.protocols.split_whitespace().collect();
    ensure!(
        !protocols.is_empty() && protocols.iter().all(|p| matches!(*p, "https" | "quic")),
        "PROTOCOLS must name https and/or quic, not `{}`",
        args.protocols
    );
    let mut stack = Stack::start(&args.bins, &args.out, &stop).await?;
    let mut relays: Vec<Relay> = Vec::with_capacity(variants.len());
    for variant in &variants {
        let config = config(&stack, variant, protocols.contains(&"quic"))?;
        let bin = if *variant == "before" { before } else { None };
        relays.push(stack.start_relay(variant, &config, bin).await?);
    }

    // Every (protocol, variant) once per round, protocol by protocol.
    let combos: Vec<(usize, usize)> =
        (0..protocols.len()).flat_map(|p| (0..variants.len()).map(move |v| (p, v))).collect();
    let mut runs: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); variants.len()]; protocols.len()];
    for (round, &(p, i)) in alternating(args.rounds, &combos) {
        ensure!(!*stop.borrow(), "interrupted");
        let (protocol, variant) = (protocols[p], variants[i]);
        let name = match protocol {
            "https" => format!("{variant}-{round}"),
            _ => format!("{variant}-{protocol}-{round}"),
        };
        if protocols.len() > 1 {
            eprintln!("==> round {round}: {variant} over {protocol}");
        } else {
            eprintln!("==> round {round}: {variant}");
        }
        let loadtest = args.loadtest(protocol, variant, &relays[i], &stack.ca());
        let launch = stack.launch(&loadtest, args.out.join(name), relays[i].pid);
        let run = launch.run().await?.with_context(|| {
            format!("loadtest {protocol} failed: see {}", launch.log().display())
        })?;
        let text = std::fs::read_to_string(launch.txt()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("{}", lines[lines.len().saturating_sub(9)..].join("\n"));
        runs[p][i].push(run);
    }
    stack.stop().await;

    for (p, protocol) in protocols.iter().enumerate() {
        if p > 0 {
            println!();
        }
        print_table(&args.heading(protocol), &variants, &runs[p]);
    }
    Ok(())
}

/// One protocol's table of medians, and each variant against the first.
fn print_table(heading: &str, variants: &[&str], runs: &[Vec<Run>]) {
    println!("{heading}");
    println!();
    println!(
        "| relay | achieved/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | relay CPU ms / 1k \
         events | nats-server CPU ms / 1k events |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let rows: Vec<Row> = runs.iter().map(|r| Row::of(r)).collect();
    for (variant, r) in variants.iter().zip(&rows) {
        println!(
            "| {variant} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.1} | {:.1} |",
            r.rate, r.p50, r.p99, r.p999, r.max, r.errors, r.relay_cpu, r.nats_cpu
        );
    }
    println!();
    let b = &rows[0];
    for (variant, u) in variants.iter().zip(&rows).skip(1) {
        println!(
            "{variant} / {}: p50 x{:.2}, p99 x{:.2}, p99.9 x{:.2}, relay CPU x{:.2}, nats-server \
             CPU x{:.2}",
            variants[0],
            u.p50 / b.p50,
            u.p99 / b.p99,
            u.p999 / b.p999,
            u.relay_cpu / b.relay_cpu,
            u.nats_cpu / b.nats_cpu
        );
    }
}
