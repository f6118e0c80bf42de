//! `loadtest`: open-loop, coordinated-omission-correct load generator for edgerelay.
//!
//! # Layout
//!
//! Layered like quinn's `perf`: data at the bottom, modes in the middle, scenarios on top;
//! each layer uses only the ones below it.
//!
//! - `model`: the data: a run's timetable, what became of each request, what a run measured,
//!   its JSON summary. Plain types, no I/O.
//! - `events`: the subjects, payload and idempotency keys of the generated events; `token`:
//!   the bearer token; `backoff`: reconnect pacing.
//! - `schedule`: the constant-rate driver every mode shares. It decides when each request is
//!   due, runs the workers and measures latency from the intended send time; `--rate 0` turns
//!   it into a closed loop that measures the maximum rate.
//! - `consume`: the JetStream consumer of `--consume` (send→consumer per event).
//! - `report`: the end-of-run table, `--json` summary and `--hgrm` distribution; `plot`: the
//!   percentile spectrum as hand-written SVG.
//! - `probe`: what the generator reads from the relay it loads: CPU time from `/proc/PID/stat`
//!   (`--relay-pid`) and exact ingest→ack percentiles from its admin `/debug/latency`.
//! - `mode`: one module per way of sending, behind the one `Mode` trait: `https` (HTTP/1.1 and
//!   HTTP/2 over TLS), `h3` (the same over HTTP/3), `quic` (the native `edgerelay/1`
//!   protocol, pipelined, one or more events per request), `direct_js` (the baseline without
//!   the relay: one JetStream publish per event), `bare` (the bare hyper + rustls server that
//!   answers 202 doing nothing, and `https` against it); `quic_idle` holds idle connections
//!   open to measure the relay's memory.
//! - `harness`: one run of any mode through the `Mode` trait, with `--consume`, `--relay-pid`
//!   and `--find-max` (ramp + bisection); the subcommand of each mode.
//! - `wan`: the WAN emulator (`wan-proxy`), a TCP/UDP delay proxy also started in-process by
//!   scenarios through `wan::spawn`.
//! - `procs`: process control the scenarios share (children killed on drop, free ports,
//!   readiness, signals, the admin listener, memory from `/proc`).
//! - `scenario`: several runs and processes in one invocation: `compare` (modes side by side),
//!   `global` (regions behind WAN proxies), `chaos` (faults under load, checked against a
//!   ledger), `bench` (the repository's benchmarks, `scripts/bench*`: nats-server and relays
//!   started here, `loadtest` runs in alternating rounds, the markdown of BENCHMARKS.md),
//!   `demo` (what `scripts/demo` shows), `attack` (the attack suite: what attacks cost the relay
//!   beside legitimate traffic).
//! - `relay_config`: `relay-config`, a relay TOML from flags for scripts (the test kit's
//!   builder).

#![forbid(unsafe_code)]

/// The generator allocates per request and per event on every runtime thread, in every mode
/// alike (direct-js included); as in the relay, mimalloc keeps that off the measurement.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod backoff;
mod consume;
mod events;
mod harness;
mod mode;
mod model;
mod plot;
mod probe;
mod procs;
mod relay_config;
mod report;
mod scenario;
mod schedule;
#[cfg(test)]
mod testing;
mod token;
mod wan;

use clap::{Parser, Subcommand};

use harness::run_single;
use mode::{bare, direct_js, h3, https, quic, quic_idle};
use scenario::{attack, chaos, compare, demo, global};

/// Open-loop load generator for the edgerelay API: offers a constant event rate and reports
/// coordinated-omission-corrected latency (from each request's intended send time). `--rate 0`
/// runs a closed loop instead, to measure the maximum rate.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// POST /v1/publish/{subject} over HTTPS, HTTP/1.1 or HTTP/2.
    Https(Box<harness::ModeArgs<https::Args>>),
    /// POST /v1/publish/{subject} over HTTP/3 on the relay's QUIC port.
    H3(Box<harness::ModeArgs<h3::Args>>),
    /// The native QUIC protocol (edgerelay/1): requests of one or more events, pipelined on
    /// several streams per connection.
    Quic(Box<harness::ModeArgs<quic::Args>>),
    /// The baseline without the relay: one JetStream publish per event, straight to NATS.
    DirectJs(Box<harness::ModeArgs<direct_js::Args>>),
    /// Open many idle QUIC connections and hold them (the relay's memory per connection).
    QuicIdle(Box<quic_idle::Args>),
    /// A userspace WAN emulator: a TCP and UDP proxy that adds delay, jitter and loss in front
    /// of a relay or NATS (the kernel here has no netem).
    WanProxy(Box<wan::Args>),
    /// A hyper + rustls server that reads each request and answers 202 doing nothing: the
    /// HTTP stack's ceiling, the baseline of `https`.
    BareServer(Box<bare::Args>),
    /// Several modes one after the other at the same offered load against a running relay and
    /// NATS (the bare server in-process): one percentile table with ratios to the baselines,
    /// `.hgrm` files, a JSON summary and an SVG percentile plot.
    Compare(Box<compare::Args>),
    /// The WAN scenario: nats-server and one relay per region (default three: 20/60/120 ms
    /// from their edges, 10/20/30 ms from NATS) behind delay proxies, loaded at once, with a
    /// consumer 30 ms from NATS: send→consumer p99 per region against the 100 ms budget and
    /// the relay's own share of it.
    Global(Box<global::Args>),
    /// The fault-injection suite: scenarios that kill, slow, fill or overload NATS and the
    /// relay under load with a ledger client, then check the stream(s) against the ledger (no
    /// acknowledged event missing, duplicates counted). A markdown table; exits non-zero if a
    /// scenario fails.
    Chaos(Box<chaos::Args>),
    /// The attack suite: slow bodies, native-frame trickle, decode amplification, floods, the
    /// oversized error echo, each against its own relay beside legitimate traffic at a fixed
    /// rate: relay peak RSS, goodput and p99 against a baseline, audit bytes and log lines per
    /// second of attack, pass/fail against thresholds.
    Attack(Box<attack::Args>),
    /// The repository's benchmarks (what scripts/bench* run): nats-server and relays started
    /// here, variants in alternating rounds, markdown for BENCHMARKS.md.
    Bench(Box<scenario::bench::Args>),
    /// What scripts/demo shows: dev certificates, nats-server, a dev IdP and the relay with JWT
    /// auth and a tenant role, a refused cross-tenant publish, an HTTPS load with a consumer,
    /// the relay's own percentiles, three events by `edgerelay tail`, a SIGTERM drain.
    Demo(Box<demo::Args>),
    /// Prints a relay configuration (TOML) built from flags, for scripts that install one.
    RelayConfig(Box<relay_config::Args>),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let stop = schedule::stop_on_ctrl_c();
        match cli.command {
            Command::Https(args) => run_single(*args, stop).await,
            Command::H3(args) => run_single(*args, stop).await,
            Command::Quic(args) => run_single(*args, stop).await,
            Command::DirectJs(args) => run_single(*args, stop).await,
            Command::QuicIdle(args) => quic_idle::run(*args, stop).await,
            Command::WanProxy(args) => wan::run(*args, stop).await,
            Command::BareServer(args) => bare::run(*args, stop).await,
            Command::Compare(args) => compare::run(*args, stop).await,
            Command::Global(args) => global::run(*args, stop).await,
            Command::Chaos(args) => chaos::run(*args, stop).await,
            Command::Attack(args) => attack::run(*args, stop).await,
            Command::Bench(args) => scenario::bench::run(*args, stop).await,
            Command::Demo(args) => demo::run(*args, stop).await,
            Command::RelayConfig(args) => relay_config::run(&args),
        }
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
