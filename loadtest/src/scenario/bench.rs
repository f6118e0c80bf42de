//! `loadtest bench`: the repository's benchmarks, one subcommand each, on 127.0.0.1. Each
//! starts nats-server and the relays it measures, runs `loadtest` modes as child processes
//! (variants alternating, round after round), reads the processes' CPU time from `/proc`, and
//! prints or writes the markdown that goes into `BENCHMARKS.md`. The `scripts/bench*` wrappers
//! build the binaries and call these; every knob is a flag that also reads the environment
//! variable the scripts documented (`DURATION=10s scripts/bench-quic`).
//!
//! - `compare` (`scripts/bench`): every mode in one `loadtest compare --find-max`, then
//!   `loadtest global`; writes `.bench/issue5.md` and, with `--write`, the `bench:issue5`
//!   block of `BENCHMARKS.md` and the plots in `docs/bench/`.
//! - `https` (`scripts/bench-https`): relays with different batching (or an earlier relay
//!   binary, `BEFORE_BIN`) under the same open-loop HTTPS load; a table of medians.
//! - `quic` (`scripts/bench-quic`): the native QUIC protocol (and h2, h3, JWT variants)
//!   against direct JetStream publishing: maximum, latency at half of it and at a fixed rate.
//! - `idle-rss` (`scripts/quic-idle-rss`): the relay's memory per idle QUIC connection.
//!
//! Below them: `stack` (nats-server, relays from a typed `Config`, the dev IdP), `rounds`
//! (the alternating order, one measured child run, medians) and `markdown` (number formats and
//! the block between markers).

mod compare;
mod https;
mod idle;
mod markdown;
mod quic;
mod rounds;
mod stack;

use std::path::PathBuf;

use tokio::sync::watch;

use crate::schedule::parse_duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, clap::Subcommand)]
enum Bench {
    /// Every mode and baseline in one `loadtest compare --find-max` run, then `loadtest
    /// global` (what `scripts/bench` runs): `.bench/issue5.md`, and with `--write` the
    /// `bench:issue5` block of BENCHMARKS.md and the plots in docs/bench/.
    Compare(Box<compare::Args>),
    /// Relays with batching on, off or fixed-linger, or an earlier relay binary (`before`),
    /// under the same open-loop HTTPS load in alternating rounds (`scripts/bench-https`).
    Https(Box<https::Args>),
    /// The native QUIC protocol against one JetStream publish per event: maximum, latency at
    /// half of it and at a fixed rate, in alternating rounds (`scripts/bench-quic`).
    Quic(Box<quic::Args>),
    /// The relay's RSS per idle QUIC connection (`scripts/quic-idle-rss`).
    IdleRss(Box<idle::Args>),
}

/// The binaries every benchmark starts.
#[derive(Clone, Debug, clap::Args)]
pub struct Binaries {
    /// The nats-server binary (scripts/setup-tools installs the pinned one).
    #[arg(long, env = "NATS_SERVER_BIN", default_value = ".tools/bin/nats-server")]
    pub nats_server_bin: PathBuf,
    /// The edgerelay binary [default: edgerelay beside this loadtest].
    #[arg(long)]
    pub relay_bin: Option<PathBuf>,
}

pub async fn run(args: Args, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    match args.bench {
        Bench::Compare(args) => compare::run(*args, stop).await,
        Bench::Https(args) => https::run(*args, stop).await,
        Bench::Quic(args) => quic::run(*args, stop).await,
        Bench::IdleRss(args) => idle::run(*args, stop).await,
    }
}

/// A duration flag kept as written (it is passed on to `loadtest` and shown in the tables),
/// once `loadtest` would accept it.
fn duration_text(s: &str) -> Result<String, String> {
    parse_duration(s).map(|_| s.to_owned())
}
