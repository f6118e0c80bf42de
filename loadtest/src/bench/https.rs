//! `loadtest bench https` (`scripts/bench-https`): batching on vs off over HTTPS in one run.
//! One nats-server, one relay per variant (each its own stream), the same open-loop `loadtest
//! https` load against each, variants alternating for `ROUNDS` rounds; prints a markdown table
//! of medians (and ratios to the first variant) for BENCHMARKS.md; raw JSON and .hgrm go to
//! `.bench/`.
//!
//! Variants: `batched` (the default config), `unbatched` (`batch.max_events = 1`: one
//! JetStream message per event), `fixed-linger` (`batch.flush_when_idle = false`: every batch
//! waits `linger_ms` unless full), and `before` (the default config run by the edgerelay
//! binary in `BEFORE_BIN`, an earlier build: an A/B of a change to the relay, e.g.
//! `BEFORE_BIN=... VARIANTS="before batched"`).

use std::path::PathBuf;

use anyhow::{bail, ensure, Context as _};
use edgerelay::config::Config;
use tokio::sync::watch;

use super::rounds::{alternating, median, ms_per_k, Run};
use super::stack::{Relay, Stack};
use super::{duration_text, Binaries};

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
    /// Space-separated: batched, unbatched, fixed-linger, before; the first is the baseline of
    /// the ratios.
    #[arg(long, env = "VARIANTS", default_value = "batched unbatched")]
    variants: String,
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
fn config(stack: &Stack, variant: &str) -> anyhow::Result<Config> {
    let mut config = stack.relay_config(variant)?;
    match variant {
        "batched" | "before" => {}
        "unbatched" => config.batch.max_events = 1,
        "fixed-linger" => config.batch.flush_when_idle = false,
        _ => bail!("unknown variant {variant} (batched, unbatched, fixed-linger, before)"),
    }
    config.stream.name = format!("BENCH_{}", variant.to_uppercase().replace('-', "_"));
    config.stream.subjects = vec![format!("edge.{variant}.>")];
    Ok(config)
}

pub async fn run(args: Args, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let variants: Vec<&str> = args.variants.split_whitespace().collect();
    ensure!(!variants.is_empty(), "no VARIANTS");
    let before = match (&args.before_bin, variants.contains(&"before")) {
        (None, true) => bail!("variant before: set BEFORE_BIN to the earlier edgerelay binary"),
        (bin, _) => bin.as_deref(),
    };
    let mut stack = Stack::start(&args.bins, &args.out, &stop).await?;
    let mut relays: Vec<Relay> = Vec::with_capacity(variants.len());
    for variant in &variants {
        let config = config(&stack, variant)?;
        let bin = if *variant == "before" { before } else { None };
        relays.push(stack.start_relay(variant, &config, bin).await?);
    }

    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); variants.len()];
    let order: Vec<usize> = (0..variants.len()).collect();
    for (round, &i) in alternating(args.rounds, &order) {
        ensure!(!*stop.borrow(), "interrupted");
        let variant = variants[i];
        eprintln!("==> round {round}: {variant}");
        let loadtest = [
            "https".to_owned(),
            "--url".into(),
            format!("https://{}", relays[i].https),
            "--ca".into(),
            stack.ca().to_string_lossy().into_owned(),
            "--http".into(),
            args.http.clone(),
            "--connections".into(),
            args.connections.to_string(),
            "--rate".into(),
            args.rate.to_string(),
            "--duration".into(),
            args.duration.clone(),
            "--warmup".into(),
            "2s".into(),
            "--subjects".into(),
            "8".into(),
            "--subject-prefix".into(),
            format!("edge.{variant}.load"),
            "--payload-bytes".into(),
            args.payload.to_string(),
            "--pacer-spin".into(),
            "0".into(),
            "--label".into(),
            variant.to_owned(),
        ];
        let launch =
            stack.launch(&loadtest, args.out.join(format!("{variant}-{round}")), relays[i].pid);
        let run = launch
            .run()
            .await?
            .with_context(|| format!("loadtest https failed: see {}", launch.log().display()))?;
        let text = std::fs::read_to_string(launch.txt()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("{}", lines[lines.len().saturating_sub(9)..].join("\n"));
        runs[i].push(run);
    }
    stack.stop().await;

    println!(
        "offered {}/s, {} per run, HTTP/{}, {} connections, {} B payloads, median of {} \
         alternating rounds",
        args.rate, args.duration, args.http, args.connections, args.payload, args.rounds
    );
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
    Ok(())
}
