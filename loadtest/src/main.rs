//! `loadtest`: open-loop, coordinated-omission-correct load generator for edgerelay.
//!
//! # Layout
//!
//! - `schedule`: the constant-rate driver every mode shares. It decides when each request is
//!   due, runs the workers and measures latency from the intended send time.
//! - `report`: the end-of-run table, `--json` summary and `--hgrm` distribution.
//! - one module per mode that only knows how to send a request: `https` (HTTP/1.1 and HTTP/2
//!   over TLS).

#![forbid(unsafe_code)]

mod https;
mod report;
mod schedule;

use clap::{Parser, Subcommand};

/// Open-loop load generator for the edgerelay API: offers a constant event rate and reports
/// coordinated-omission-corrected latency (from each request's intended send time).
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let stop = schedule::stop_on_ctrl_c();
        match cli.mode {
            Mode::Https(args) => https::run(*args, stop).await,
        }
    })
}
