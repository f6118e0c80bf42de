//! `loadtest wan-proxy`'s command line: its flags, the `--route` syntax, and running the
//! routes until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::sync::watch;

use super::{spawn, Limits, Model, Route};

/// Flags of `loadtest wan-proxy`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to listen on (with `--upstream`); port 0 picks a free one.
    #[arg(long, value_name = "ADDR", requires = "upstream")]
    listen: Option<SocketAddr>,
    /// Address to forward to (with `--listen`); a host name is resolved once at start.
    #[arg(long, value_name = "HOST:PORT", requires = "listen")]
    upstream: Option<String>,
    /// More proxies in this process: `LISTEN=UPSTREAM`, optionally followed by per-route
    /// overrides `,rtt-ms=N`, `,jitter-ms=N`, `,loss=P`, `,tcp`, `,udp`. Repeatable.
    #[arg(long, value_name = "LISTEN=UPSTREAM[,OPT]", value_parser = parse_route)]
    route: Vec<RouteSpec>,
    /// Proxy TCP (with `--udp`: both; with neither: both).
    #[arg(long)]
    tcp: bool,
    /// Proxy UDP (with `--tcp`: both; with neither: both).
    #[arg(long)]
    udp: bool,
    /// Round-trip time to add, in milliseconds; each direction gets half.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    rtt_ms: u64,
    /// One-way delays vary uniformly within ±this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    jitter_ms: u64,
    /// Probability that a UDP datagram is dropped, per direction (TCP is never dropped).
    #[arg(long, value_name = "P", default_value_t = 0.0, value_parser = parse_probability)]
    loss: f64,
    /// Seed of the delay and loss generator.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Bytes queued at most per direction of a TCP connection (then backpressure) or a UDP
    /// session (then drops).
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    max_queued_bytes: u64,
    /// UDP sessions (client addresses) per route at most.
    #[arg(long, value_name = "N", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..))]
    max_udp_sessions: u64,
    /// A UDP session idle this long in both directions is closed.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = crate::schedule::parse_duration)]
    udp_idle: Duration,
}

/// A `--route` as given: the upstream is resolved and the overrides applied in [`run`].
#[derive(Clone, Debug, PartialEq)]
struct RouteSpec {
    listen: SocketAddr,
    upstream: String,
    tcp: bool,
    udp: bool,
    rtt_ms: Option<u64>,
    jitter_ms: Option<u64>,
    loss: Option<f64>,
}

impl RouteSpec {
    /// The route with the process-wide flags filled in where it has no override of its own.
    async fn resolve(
        &self,
        defaults: &Model,
        any_proto: (bool, bool),
    ) -> anyhow::Result<(Route, Model)> {
        let upstream = resolve(&self.upstream).await?;
        let (tcp, udp) = if self.tcp || self.udp { (self.tcp, self.udp) } else { any_proto };
        let mut model = *defaults;
        if let Some(ms) = self.rtt_ms {
            model.rtt = Duration::from_millis(ms);
        }
        if let Some(ms) = self.jitter_ms {
            model.jitter = Duration::from_millis(ms);
        }
        if let Some(p) = self.loss {
            model.loss = p;
        }
        Ok((Route { listen: self.listen, upstream, tcp, udp }, model))
    }
}

/// `loadtest wan-proxy`: runs the routes until Ctrl-C or SIGTERM, then prints their counters.
pub async fn run(args: Args, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let defaults = Model {
        rtt: Duration::from_millis(args.rtt_ms),
        jitter: Duration::from_millis(args.jitter_ms),
        loss: args.loss,
        seed: args.seed,
        limits: Limits {
            max_queued_bytes: usize::try_from(args.max_queued_bytes)
                .context("--max-queued-bytes is too large")?,
            max_udp_sessions: usize::try_from(args.max_udp_sessions)
                .context("--max-udp-sessions is too large")?,
            udp_idle: args.udp_idle,
        },
    };
    let any_proto = if args.tcp || args.udp { (args.tcp, args.udp) } else { (true, true) };
    let mut specs = args.route;
    if let (Some(listen), Some(upstream)) = (args.listen, args.upstream) {
        specs.insert(
            0,
            RouteSpec {
                listen,
                upstream,
                tcp: false,
                udp: false,
                rtt_ms: None,
                jitter_ms: None,
                loss: None,
            },
        );
    }
    if specs.is_empty() {
        bail!("nothing to proxy: give --listen and --upstream, or --route");
    }
    let mut proxies = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let (route, mut model) = spec.resolve(&defaults, any_proto).await?;
        // Each route draws its own delays, so adding a route does not shift the others'.
        model.seed = defaults.seed.wrapping_add(i as u64);
        let proxy =
            spawn(&route, &model).await.with_context(|| format!("starting route {route}"))?;
        let shown = Route { listen: proxy.local_addr(), ..route };
        eprintln!("wan-proxy: {shown}: {model}");
        proxies.push((shown, proxy));
    }
    wait_for_stop(&mut stop).await?;
    for (route, proxy) in &proxies {
        eprintln!("wan-proxy: {route}: {}", proxy.counters());
    }
    Ok(())
}

/// Waits for the first Ctrl-C (through `stop`) or SIGTERM.
async fn wait_for_stop(stop: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = stop.wait_for(|stopped| *stopped) => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// Resolves `host:port` to its first address.
async fn resolve(host_port: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(host_port)
        .await
        .with_context(|| format!("resolving {host_port}"))?
        .next()
        .with_context(|| format!("{host_port} resolves to no address"))
}

/// Parses `--loss`.
fn parse_probability(s: &str) -> Result<f64, String> {
    let p: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("`{s}` is not a probability within [0, 1]"))
    }
}

/// Parses `--route LISTEN=UPSTREAM[,rtt-ms=N][,jitter-ms=N][,loss=P][,tcp][,udp]`.
fn parse_route(s: &str) -> Result<RouteSpec, String> {
    let mut parts = s.split(',');
    let head = parts.next().unwrap_or_default();
    let (listen, upstream) =
        head.split_once('=').ok_or_else(|| format!("`{head}` is not LISTEN=UPSTREAM"))?;
    let listen: SocketAddr =
        listen.parse().map_err(|_| format!("`{listen}` is not an address like 127.0.0.1:9443"))?;
    if upstream.is_empty() {
        return Err(format!("`{head}` has no upstream"));
    }
    let mut spec = RouteSpec {
        listen,
        upstream: upstream.to_owned(),
        tcp: false,
        udp: false,
        rtt_ms: None,
        jitter_ms: None,
        loss: None,
    };
    for opt in parts {
        let ms = |v: &str| {
            v.parse::<u64>().map_err(|_| format!("`{opt}`: `{v}` is not whole milliseconds"))
        };
        match opt.split_once('=') {
            None if opt == "tcp" => spec.tcp = true,
            None if opt == "udp" => spec.udp = true,
            Some(("rtt-ms", v)) => spec.rtt_ms = Some(ms(v)?),
            Some(("jitter-ms", v)) => spec.jitter_ms = Some(ms(v)?),
            Some(("loss", v)) => spec.loss = Some(parse_probability(v)?),
            _ => {
                return Err(format!(
                    "unknown route option `{opt}` (use rtt-ms=N, jitter-ms=N, loss=P, tcp, udp)"
                ))
            }
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wan::tests::model;

    #[test]
    fn parses_routes() {
        let r =
            parse_route("127.0.0.1:9443=relay.example:8443,rtt-ms=60,jitter-ms=5,loss=0.01,udp")
                .unwrap();
        assert_eq!(r.listen, "127.0.0.1:9443".parse().unwrap());
        assert_eq!(r.upstream, "relay.example:8443");
        assert_eq!((r.tcp, r.udp), (false, true));
        assert_eq!((r.rtt_ms, r.jitter_ms, r.loss), (Some(60), Some(5), Some(0.01)));
        assert!(parse_route("127.0.0.1:1").is_err());
        assert!(parse_route("nonsense=127.0.0.1:1").is_err());
        assert!(parse_route("127.0.0.1:1=").is_err());
        assert!(parse_route("127.0.0.1:1=127.0.0.1:2,loss=2").is_err());
        assert!(parse_route("127.0.0.1:1=127.0.0.1:2,rtt-ms=-1").is_err());
        assert!(parse_route("127.0.0.1:1=127.0.0.1:2,mtu=9000").is_err());
        assert!(parse_probability("1.5").is_err());
        assert!(model(0, 0, -0.1).validate().is_err());
    }
}
