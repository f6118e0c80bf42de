//! The `edgerelay` binary: parses the command line, loads the config, starts logging and
//! hands over to the library (the relay) or to `edgerelay-ops` (the operator tools).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use edgerelay::config::Config;

/// The relay allocates a few small objects per event (answer channel, idempotency key,
/// strings) from two runtime threads; mimalloc's thread-local free lists beat glibc's arenas
/// there (measured in BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// sysexits: bad usage and bad configuration.
const EX_USAGE: u8 = 64;
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(name = "edgerelay", version, about = "Relay edge events over HTTPS into NATS JetStream")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Run {
        #[arg(long, short, default_value = "/etc/edgerelay/edgerelay.toml")]
        config: PathBuf,
    },
    /// Validate a config file and report every problem; exit 78 if there is one.
    CheckConfig {
        #[arg(long, short, default_value = "/etc/edgerelay/edgerelay.toml")]
        config: PathBuf,
    },
    /// Print the events the relay published, one JSON line each.
    Tail {
        /// NATS server URL.
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// Subject filter (NATS wildcards allowed).
        #[arg(long, default_value = ">")]
        subject: String,
        /// Read this JetStream stream (from --from-seq) instead of live traffic.
        #[arg(long)]
        stream: Option<String>,
        /// First stream sequence to read with --stream.
        #[arg(long, default_value_t = 1)]
        from_seq: u64,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Exit when no message arrived for this many milliseconds.
        #[arg(long)]
        idle_timeout_ms: Option<u64>,
    },
    /// A live full-screen view of one relay, read from its admin listener: rates, queue,
    /// NATS cluster and RTT, per-stage latency against the 100 ms SLO. `q` or Ctrl-C quits.
    Top {
        /// The relay's admin listener (`[admin] listen` in its config).
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// Refresh interval, milliseconds.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
        interval_ms: u64,
    },
    /// The disk spool: batches waiting on disk while no NATS cluster takes them.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// Write a development CA and server certificate (ca.pem, cert.pem, key.pem).
    DevCerts {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// DNS names and IP addresses of the server certificate.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
    /// Serve a development identity provider (OIDC discovery, JWKS, token minting) on a
    /// loopback address until SIGTERM/SIGINT. Never for production.
    DevIdp {
        /// Loopback address to listen on.
        #[arg(long, default_value = "127.0.0.1:9400")]
        listen: std::net::SocketAddr,
        /// Signing algorithms (one key each): ES256, RS256, PS256, EdDSA.
        #[arg(long = "alg", default_values_t = ["ES256".to_string(), "RS256".to_string()])]
        algs: Vec<String>,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Show what the spool holds, per segment and per subject. Reads only (never truncates or
    /// takes the relay's lock): safe beside a running relay. Exit 78 if the directory cannot
    /// be read.
    Inspect {
        /// Take the directory from this config file's `spool.dir`.
        #[arg(
            long,
            short,
            conflicts_with = "dir",
            default_value = "/etc/edgerelay/edgerelay.toml"
        )]
        config: PathBuf,
        /// The spool directory itself.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EX_USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGERELAY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    edgerelay::tls::install_default_provider();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                warn_config(&c, &config);
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::Run { config: path } => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => return config_error(&e),
            };
            warn_config(&config, &path);
            // Before the runtime starts threads: this takes the socket-activation variables
            // out of the environment.
            let systemd = match edgerelay::systemd::Systemd::from_env() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("edgerelay: {e}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            runtime().block_on(async {
                let (reload, reloads) = tokio::sync::mpsc::channel(1);
                let shutdown = shutdown_signal(move || reload_config(&path, &reload));
                match edgerelay::run(config, systemd, shutdown, reloads).await {
                    Ok(d) if d.complete => ExitCode::SUCCESS,
                    Ok(_) => {
                        eprintln!(
                            "edgerelay: grace period ended before every event was acknowledged"
                        );
                        ExitCode::FAILURE
                    }
                    Err(e) => {
                        eprintln!("edgerelay: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Tail { nats_url, subject, stream, from_seq, count, idle_timeout_ms } => {
            let opts = edgerelay_ops::tail::TailOptions {
                nats_url,
                subject,
                stream,
                from_seq,
                count,
                idle_timeout: idle_timeout_ms.map(Duration::from_millis),
            };
            let mut out = std::io::stdout();
            let wanted = opts.count;
            match runtime().block_on(edgerelay_ops::tail::run(opts, &mut out)) {
                Ok(n) => {
                    if wanted.is_some_and(|c| n < c) {
                        eprintln!("edgerelay tail: stopped after {n} events: nothing more arrived");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("edgerelay tail: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Top { admin, interval_ms } => {
            let opts = edgerelay_ops::top::TopOptions {
                admin,
                interval: Duration::from_millis(interval_ms),
            };
            match runtime().block_on(edgerelay_ops::top::run(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ edgerelay_ops::top::TopError::BadAdmin { .. }) => {
                    eprintln!("edgerelay top: {e}");
                    ExitCode::from(EX_USAGE)
                }
                Err(e) => {
                    eprintln!("edgerelay top: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::DevIdp { listen, algs } => {
            let algs: Vec<&str> = algs.iter().map(String::as_str).collect();
            let ignore = || tracing::info!("SIGHUP: the development IdP has nothing to reload");
            let serve =
                async { edgerelay_ops::dev_idp::run(listen, &algs, shutdown_signal(ignore)).await };
            match runtime().block_on(serve) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edgerelay dev-idp: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Spool { command: SpoolCommand::Inspect { config, dir, json } } => {
            let dir = match dir {
                Some(d) => d,
                None => match Config::read(&config) {
                    Ok(c) => c.spool.dir,
                    Err(e) => return config_error(&e),
                },
            };
            match edgerelay::spool::inspect(&dir) {
                Ok(i) if json => {
                    println!("{}", serde_json::to_string_pretty(&i).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(i) => {
                    print!("{i}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("edgerelay spool inspect: {e}");
                    ExitCode::from(EX_CONFIG)
                }
            }
        }
        Command::DevCerts { out, names } => {
            match edgerelay_ops::dev_certs::generate_dev_certs(&names).and_then(|c| c.write(&out)) {
                Ok(()) => {
                    println!("wrote {}/{{ca,cert,key}}.pem", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("edgerelay dev-certs: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn config_error(e: &edgerelay::config::ConfigError) -> ExitCode {
    eprintln!("edgerelay: invalid configuration:\n{e}");
    ExitCode::from(EX_CONFIG)
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edgerelay: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

/// One warning for each file of `config` (read from `path`) holding secrets that other users
/// can read (the config itself, TLS and NATS keys, NATS credentials) and for each setting
/// that is probably not meant ([`Config::doubts`]).
fn warn_config(config: &Config, path: &std::path::Path) {
    for exposed in config.exposed_files(path) {
        tracing::warn!(file = %exposed.path.display(), mode = format_args!("{:04o}", exposed.mode),
            "{exposed}");
    }
    for doubt in config.doubts() {
        tracing::warn!(config = %path.display(), "{doubt}");
    }
}

/// SIGHUP (`systemctl reload`): reads the config file again and, if it is valid, hands it to
/// the relay; an invalid one is logged and the relay keeps its config.
fn reload_config(path: &std::path::Path, reload: &tokio::sync::mpsc::Sender<Config>) {
    match Config::load(path) {
        Ok(config) => {
            tracing::info!(config = %path.display(), "SIGHUP: reloading");
            warn_config(&config, path);
            if reload.try_send(config).is_err() {
                tracing::warn!("SIGHUP: a reload is already under way; send SIGHUP again");
            }
        }
        Err(e) => tracing::error!(config = %path.display(),
            "SIGHUP: invalid configuration, reload refused: still running on the previous config:\n{e}"),
    }
}

/// Resolves on SIGTERM or SIGINT; calls `on_hup` on each SIGHUP (whose default action would
/// kill the process). The handlers are installed when this is called (inside the runtime),
/// not when the future is first polled, so a signal during start-up is not lost.
fn shutdown_signal(mut on_hup: impl FnMut()) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let hup = signal(SignalKind::hangup());
    async move {
        let (mut term, mut int) = match (term, int) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
                return std::future::pending().await;
            }
        };
        let mut hup = hup.map_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP")).ok();
        loop {
            tokio::select! {
                _ = term.recv() => return tracing::info!("SIGTERM: draining"),
                _ = int.recv() => return tracing::info!("SIGINT: draining"),
                Some(()) = async { hup.as_mut()?.recv().await } => on_hup(),
            }
        }
    }
}
