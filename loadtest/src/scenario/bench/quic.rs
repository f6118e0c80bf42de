//! `loadtest bench quic` (`scripts/bench-quic`): the relay's native QUIC protocol against
//! publishing every event straight to JetStream, in one run against one nats-server:
//!
//! 1. maximum events/s: each variant in a closed loop (`--rate 0`: every worker sends again
//!    as soon as it is answered) for DURATION, ROUNDS rounds, variants alternating;
//! 2. latency: each variant open loop at half its median maximum, ROUNDS rounds alternating,
//!    p50/p99/p99.9 coordinated-omission-corrected;
//! 3. latency at one fixed rate for every variant (FIXED_RATE events/s): the same offered load
//!    with and without the relay, well below what the box can carry.
//!
//! Variants: `direct-js` (`loadtest direct-js`: one JetStream publish per event, WINDOW acks in
//! flight over one NATS connection: no relay), `quic-eN` (`loadtest quic` to the relay, N
//! events per request), `h2` and `h3` (`loadtest https --http 2` / `loadtest h3` to the same
//! relay, one event per request); `*-nokey`: any of these with `--no-keys` (no idempotency
//! keys; direct-js: no Nats-Msg-Id); `*-jwt`: a relay variant authenticated with a JWT minted
//! by the dev IdP started here (`--token-from`) instead of the static token. The QUIC variants
//! run CONNECTIONS × STREAMS × IN_FLIGHT requests in flight (4 × 4 × 16 = 256 by default, as
//! many as direct-js's ack window).
//!
//! Prints a markdown table of medians and the exact command line; raw JSON, .hgrm and the
//! loadtest outputs go to `.bench-quic/`. Every run starts from empty streams (a JetStream
//! purge): otherwise gigabytes pile up and each round runs slower than the one before it
//! (measured: 299k, 220k, 240k events/s for the same variant).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use edgerelay::auth::config::{JwtConfig, RoleConfig};
use tokio::sync::watch;

use super::rounds::{alternating, command, median, ms_per_k, shared_flags, Launch, Run};
use super::stack::Stack;
use super::{duration_text, Binaries};
use crate::schedule::parse_duration;

/// The relay's stream and the direct-js stream, purged before every run.
const STREAMS: [&str; 2] = ["BENCH_QUIC", "BENCH_DIRECT"];

/// Flags of `loadtest bench quic`; each also reads the environment variable named.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    bins: Binaries,
    /// Measured duration of each run.
    #[arg(long, env = "DURATION", default_value = "10s", value_parser = duration_text)]
    duration: String,
    #[arg(long, env = "WARMUP", default_value = "2s", value_parser = duration_text)]
    warmup: String,
    #[arg(long, env = "ROUNDS", default_value_t = 3)]
    rounds: u32,
    /// Payload bytes.
    #[arg(long, env = "PAYLOAD", default_value_t = 256)]
    payload: u32,
    #[arg(long, env = "SUBJECTS", default_value_t = 8)]
    subjects: u32,
    /// direct-js's ack window; h2's and h3's requests in flight.
    #[arg(long, env = "WINDOW", default_value_t = 256)]
    window: u32,
    #[arg(long, env = "CONNECTIONS", default_value_t = 4)]
    connections: u32,
    /// QUIC streams per connection.
    #[arg(long, env = "STREAMS", default_value_t = 4)]
    streams: u32,
    /// QUIC requests in flight per stream.
    #[arg(long, env = "IN_FLIGHT", default_value_t = 16)]
    in_flight: u32,
    /// The rate every variant is offered in the third phase, events/s.
    #[arg(long, env = "FIXED_RATE", default_value_t = 20_000)]
    fixed_rate: u64,
    /// Space-separated; the first is the baseline of the ratios.
    #[arg(long, env = "VARIANTS", default_value = "direct-js quic-e16 quic-e1")]
    variants: String,
    /// Where raw outputs go (emptied first).
    #[arg(long, default_value = ".bench-quic")]
    out: PathBuf,
}

/// The medians of one variant's runs.
struct Row {
    max: f64,
    max_errors: f64,
    half_rate: f64,
    half: [f64; 3],
    half_errors: f64,
    fixed: [f64; 3],
    fixed_errors: f64,
    /// CPU ms per 1k events at max: relay, nats-server, loadtest.
    cpu: [f64; 3],
}

impl Args {
    /// The environment assignments that reproduce the run.
    fn invocation(&self) -> String {
        format!(
            "DURATION={} WARMUP={} ROUNDS={} PAYLOAD={} SUBJECTS={} WINDOW={} CONNECTIONS={} \
             STREAMS={} IN_FLIGHT={} FIXED_RATE={} VARIANTS=\"{}\" scripts/bench-quic",
            self.duration,
            self.warmup,
            self.rounds,
            self.payload,
            self.subjects,
            self.window,
            self.connections,
            self.streams,
            self.in_flight,
            self.fixed_rate,
            self.variants.split_whitespace().collect::<Vec<_>>().join(" "),
        )
    }

    /// The loadtest arguments of `variant` (without `--rate` and the output files).
    fn loadtest(
        &self,
        variant: &str,
        stack: &Stack,
        relay: &Target,
    ) -> anyhow::Result<Vec<String>> {
        let (base, nokey) = strip(variant, "-nokey");
        let (base, jwt) = strip(base, "-jwt");
        let ca = stack.ca().to_string_lossy().into_owned();
        let connections = self.connections.to_string();
        let window = self.window.to_string();
        let (mode, mut flags): (&str, Vec<(&str, String)>) = match base {
            "direct-js" => (
                "direct-js",
                vec![
                    ("--nats-url", stack.nats_url()),
                    ("--stream", STREAMS[1].into()),
                    ("--max-inflight", window),
                ],
            ),
            "h2" => (
                "https",
                vec![("--url", relay.https.clone()), ("--ca", ca), ("--http", "2".into())],
            ),
            "h3" => ("h3", vec![("--addr", relay.quic.clone()), ("--ca", ca)]),
            _ => match base.strip_prefix("quic-e").filter(|n| n.parse::<u32>().is_ok()) {
                Some(events) => (
                    "quic",
                    vec![
                        ("--addr", relay.quic.clone()),
                        ("--ca", ca),
                        ("--connections", connections.clone()),
                        ("--streams", self.streams.to_string()),
                        ("--in-flight", self.in_flight.to_string()),
                        ("--events-per-request", events.to_owned()),
                    ],
                ),
                None => bail!("unknown variant {variant}"),
            },
        };
        if matches!(base, "h2" | "h3") {
            flags.extend([
                ("--connections", connections),
                ("--concurrency", self.window.to_string()),
            ]);
        }
        let shared =
            shared_flags(&self.duration, &self.warmup, self.subjects, self.payload, variant);
        let mut args = command(mode, flags.into_iter().chain(shared));
        if nokey {
            args.push("--no-keys".into());
        }
        if jwt {
            args.extend(["--token-from".to_owned(), relay.idp.clone()]);
        }
        Ok(args)
    }
}

/// What every run of every phase shares.
struct Phases<'a> {
    args: &'a Args,
    variants: &'a [&'a str],
    /// Each variant's loadtest arguments.
    loadtest: &'a [Vec<String>],
    stack: &'a Stack,
    relay_pid: u32,
    /// SIGINT to a run after this long.
    limit: Duration,
    js: async_nats::jetstream::Context,
    stop: watch::Receiver<bool>,
}

/// Where the variants send: the relay's listeners and the dev IdP.
struct Target {
    https: String,
    quic: String,
    idp: String,
}

/// `name` without `suffix`, and whether it had it.
fn strip<'a>(name: &'a str, suffix: &str) -> (&'a str, bool) {
    name.strip_suffix(suffix).map_or((name, false), |base| (base, true))
}

pub async fn run(args: Args, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let variants: Vec<&str> = args.variants.split_whitespace().collect();
    ensure!(!variants.is_empty(), "no VARIANTS");
    let run_s = parse_duration(&args.duration).map_err(anyhow::Error::msg)?.as_secs_f64();
    let warmup_s = parse_duration(&args.warmup).map_err(anyhow::Error::msg)?.as_secs_f64();
    let runs = 3 * args.rounds as usize * variants.len();
    // Per run: warm-up + measurement + about 1 s of connecting and draining.
    let expected = (runs as f64 * (run_s + warmup_s + 1.0) + 5.0).round();
    // No single loadtest may take much longer than planned.
    let limit = Duration::from_secs_f64(run_s + warmup_s + 30.0);
    eprintln!("bench-quic: {runs} runs of {} + {}: about {expected}s", args.warmup, args.duration);

    let mut stack = Stack::start(&args.bins, &args.out, &stop).await?;
    let idp = stack.start_idp().await?;
    let mut config = stack.relay_config("quic")?;
    config.quic.listen = Some(edgerelay_testkit::local(edgerelay_testkit::free_shared_port()));
    config.stream.name = STREAMS[0].into();
    config.stream.subjects = vec!["edge.>".into()];
    config.auth.jwt = Some(JwtConfig {
        issuer: idp.clone(),
        audiences: vec!["edgerelay".into()],
        jwks_url: Some(format!("{idp}/jwks.json")),
        ..JwtConfig::default()
    });
    config.auth.roles = vec![RoleConfig {
        name: "bench".into(),
        require: BTreeMap::from([("scope".to_owned(), "edge:publish".to_owned())]),
        allow: vec!["edge.>".into()],
        ..RoleConfig::default()
    }];
    let relay = stack.start_relay("relay", &config, None).await?;
    let target = Target {
        https: format!("https://{}", relay.https),
        quic: relay.quic.map(|a| a.to_string()).unwrap_or_default(),
        idp,
    };
    let loadtest: Vec<Vec<String>> =
        variants.iter().map(|v| args.loadtest(v, &stack, &target)).collect::<Result<_, _>>()?;
    let nats = async_nats::connect(stack.nats_url()).await.context("connecting to nats-server")?;
    let js = async_nats::jetstream::new(nats);

    let phases = Phases {
        args: &args,
        variants: &variants,
        loadtest: &loadtest,
        stack: &stack,
        relay_pid: relay.pid,
        limit,
        js,
        stop,
    };
    let max = phases.run("max", &|_| Some(0)).await?;
    // Half of each variant's median maximum.
    let half_rates: Vec<u64> = max
        .iter()
        .map(|runs| median(runs.iter().map(|r| r.summary.achieved_rate)))
        .map(|m| if m.is_nan() { 0 } else { (m / 2.0) as u64 })
        .collect();
    let half = phases.run("half", &|i| Some(half_rates[i]).filter(|r| *r > 0)).await?;
    let fixed = phases.run("fixed", &|_| Some(args.fixed_rate)).await?;
    drop(phases);
    stack.stop().await;

    let rows: Vec<Row> = (0..variants.len()).map(|i| row(&max[i], &half[i], &fixed[i])).collect();
    println!();
    print_tables(&args, &variants, &rows, &loadtest);
    Ok(())
}

impl Phases<'_> {
    /// One phase: every variant at `rate(variant)` (0: closed loop; `None`: skipped), ROUNDS
    /// rounds alternating; each variant's successful runs.
    async fn run(
        &self,
        name: &str,
        rate: &dyn Fn(usize) -> Option<u64>,
    ) -> anyhow::Result<Vec<Vec<Run>>> {
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); self.variants.len()];
        let order: Vec<usize> = (0..self.variants.len()).collect();
        for (round, &i) in alternating(self.args.rounds, &order) {
            let Some(rate) = rate(i) else { continue };
            ensure!(!*self.stop.borrow(), "interrupted");
            purge(&self.js).await?;
            let variant = self.variants[i];
            if rate == 0 {
                eprintln!("==> {name} round {round}: {variant}, closed loop");
            } else {
                eprintln!("==> {name} round {round}: {variant} at {rate} events/s");
            }
            let mut run_args = self.loadtest[i].clone();
            run_args.extend(["--rate".to_owned(), rate.to_string()]);
            let stem = self.args.out.join(format!("{name}-{variant}-{round}"));
            let launch = Launch {
                limit: Some(self.limit),
                ..self.stack.launch(&run_args, stem, self.relay_pid)
            };
            match launch.run().await? {
                Some(run) => runs[i].push(run),
                None => eprintln!("    (loadtest failed: see {})", launch.log().display()),
            }
            let text = std::fs::read_to_string(launch.txt()).unwrap_or_default();
            if let Some(line) = text.lines().nth(1) {
                eprintln!("{line}");
            }
        }
        Ok(runs)
    }
}

/// Empties both streams, so every run starts from the same empty store (a missing stream is
/// fine: direct-js creates its own on its first run).
async fn purge(js: &async_nats::jetstream::Context) -> anyhow::Result<()> {
    for name in STREAMS {
        if let Ok(stream) = js.get_stream(name).await {
            stream.purge().await.with_context(|| format!("purging stream {name}"))?;
        }
    }
    Ok(())
}

fn row(max: &[Run], half: &[Run], fixed: &[Run]) -> Row {
    let med = |runs: &[Run], f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f));
    let latency = |runs: &[Run]| {
        [
            med(runs, &|r| r.summary.latency_ms.p50),
            med(runs, &|r| r.summary.latency_ms.p99),
            med(runs, &|r| r.summary.latency_ms.p999),
        ]
    };
    // CPU over the whole max run (warm-up included) per 1000 events answered in it.
    Row {
        max: med(max, &|r| r.summary.achieved_rate),
        max_errors: med(max, &|r| r.summary.error_total as f64),
        half_rate: med(half, &|r| r.summary.offered_rate.unwrap_or(f64::NAN)),
        half: latency(half),
        half_errors: med(half, &|r| r.summary.error_total as f64),
        fixed: latency(fixed),
        fixed_errors: med(fixed, &|r| r.summary.error_total as f64),
        cpu: [
            med(max, &|r| ms_per_k(r.relay_cpu.unwrap_or_default(), r.events())),
            med(max, &|r| ms_per_k(r.nats_cpu, r.events())),
            med(max, &|r| ms_per_k(r.loadtest_cpu, r.events())),
        ],
    }
}

fn print_tables(args: &Args, variants: &[&str], rows: &[Row], loadtest: &[Vec<String>]) {
    let base = rows[0].max;
    println!("`{}`  ", args.invocation());
    println!(
        "Medians of the rounds. max: closed loop, accepted events/s. Latency: open loop at half \
         the variant's max, per request, from its intended send time (CO-corrected)."
    );
    println!();
    println!(
        "| variant | max events/s | × {} | errors at max | half-max rate | p50 ms | p99 ms | \
         p99.9 ms | errors at half | CPU ms / 1k events at max: relay, nats-server, loadtest |",
        variants[0]
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (v, r) in variants.iter().zip(rows) {
        let ratio = if base != 0.0 { r.max / base } else { f64::NAN };
        let relay = if *v == "direct-js" { "-".to_owned() } else { format!("{:.1}", r.cpu[0]) };
        println!(
            "| {v} | {:.0} | {ratio:.2} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | \
             {relay}, {:.1}, {:.1} |",
            r.max,
            r.max_errors,
            r.half_rate,
            r.half[0],
            r.half[1],
            r.half[2],
            r.half_errors,
            r.cpu[1],
            r.cpu[2]
        );
    }
    println!();
    println!(
        "Latency at {} events/s offered to every variant (open loop, CO-corrected):",
        super::markdown::grouped(Some(args.fixed_rate as f64), 0)
    );
    println!();
    println!("| variant | p50 ms | p99 ms | p99.9 ms | errors |");
    println!("|---|---|---|---|---|");
    for (v, r) in variants.iter().zip(rows) {
        println!(
            "| {v} | {:.2} | {:.2} | {:.2} | {:.0} |",
            r.fixed[0], r.fixed[1], r.fixed[2], r.fixed_errors
        );
    }
    println!();
    println!(
        "loadtest runs (token from EDGERELAY_TOKEN; --rate 0 for max, half the median max and \
         FIXED_RATE for latency):"
    );
    for args in loadtest {
        println!("    loadtest {}", args.join(" "));
    }
}
