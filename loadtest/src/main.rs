//! `loadtest`: open-loop, coordinated-omission-correct load generator for edgerelay.
//!
//! # Layout
//!
//! - `schedule`: the constant-rate driver every mode shares. It decides when each request is
//!   due, runs the workers and measures latency from the intended send time; `--rate 0` turns
//!   it into a closed loop that measures the maximum rate.
//! - `report`: the end-of-run table, `--json` summary and `--hgrm` distribution.
//! - `events`: the subjects, payload and idempotency keys of the generated events.
//! - `backoff`: reconnect pacing.
//! - one module per mode that only knows how to send a request: `https` (HTTP/1.1 and HTTP/2
//!   over TLS), `h3` (the same over HTTP/3), `quic` (the native `edgerelay/1` protocol, pipelined, one or more events per
//!   request) and `direct_js` (the baseline without the relay: one JetStream publish per
//!   event); `quic_idle` holds idle connections open to measure the relay's memory.
//! - `wan`: the WAN emulator (`wan-proxy`), a TCP/UDP delay proxy also started in-process by
//!   scenarios through `wan::spawn`.
//! - `bare`: the bare hyper + rustls server that answers 202 doing nothing (the HTTP stack's
//!   ceiling), standalone (`bare-server`) or in-process for `compare`.
//! - `harness`: what sits above one run of any mode: `--consume` (with `consume`: a JetStream
//!   consumer that measures send→consumer per event) and `--find-max` (ramp + bisection).
//! - `compare`: several modes in one invocation, one table with ratios to the baselines, the
//!   `.hgrm` files, `summary.json` and the percentile plot drawn by `plot` (hand-written SVG).
//! - `probe`: what the generator reads from the relay it loads: CPU time from `/proc/PID/stat`
//!   (`--relay-pid`) and exact ingest→ack percentiles from its admin `/debug/latency`.
//! - `global`: the WAN scenario: nats-server and one relay per region behind `wan` proxies,
//!   loaded at once, with one consumer; send→consumer per region against the delivery budget.
//! - `procs`: process control both scenario modes share (children killed on drop, free ports,
//!   readiness, signals, the admin listener, memory from `/proc`).
//! - `chaos`: the fault-injection suite: a ledger client, process control for nats-server
//!   (alone or a 3-node cluster) and relays, faults under load, and a verifier that reads the
//!   stream back against the ledger.

#![forbid(unsafe_code)]

/// The generator allocates per request and per event on every runtime thread, in every mode
/// alike (direct-js included); as in the relay, mimalloc keeps that off the measurement.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod backoff;
mod bare;
mod chaos;
mod compare;
mod consume;
mod direct_js;
mod events;
mod global;
mod h3;
mod harness;
mod https;
mod plot;
mod probe;
mod procs;
mod quic;
mod quic_idle;
mod report;
mod schedule;
mod token;
mod wan;

use clap::{Parser, Subcommand};

/// Open-loop load generator for the edgerelay API: offers a constant event rate and reports
/// coordinated-omission-corrected latency (from each request's intended send time). `--rate 0`
/// runs a closed loop instead, to measure the maximum rate.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// POST /v1/publish/{subject} over HTTPS, HTTP/1.1 or HTTP/2.
    Https(Box<https::Args>),
    /// POST /v1/publish/{subject} over HTTP/3 on the relay's QUIC port.
    H3(Box<h3::Args>),
    /// The native QUIC protocol (edgerelay/1): requests of one or more events, pipelined on
    /// several streams per connection.
    Quic(Box<quic::Args>),
    /// The baseline without the relay: one JetStream publish per event, straight to NATS.
    DirectJs(Box<direct_js::Args>),
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let stop = schedule::stop_on_ctrl_c();
        match cli.mode {
            Mode::Https(args) => https::run(*args, stop).await,
            Mode::H3(args) => h3::run(*args, stop).await,
            Mode::Quic(args) => quic::run(*args, stop).await,
            Mode::DirectJs(args) => direct_js::run(*args, stop).await,
            Mode::QuicIdle(args) => quic_idle::run(*args, stop).await,
            Mode::WanProxy(args) => wan::run(*args, stop).await,
            Mode::BareServer(args) => bare::run(*args, stop).await,
            Mode::Compare(args) => compare::run(*args, stop).await,
            Mode::Global(args) => global::run(*args, stop).await,
            Mode::Chaos(args) => chaos::run(*args, stop).await,
        }
    })
}
