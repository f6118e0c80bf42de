//! What the load generator reads from the relay process it loads, to put the relay's own cost
//! and latency next to the client-side numbers: CPU time from `/proc/PID/stat` (`--relay-pid`)
//! and the exact ingest→ack percentiles from the admin listener's `/debug/latency`
//! (`compare --relay-admin`).
//!
//! CPU time is user + system time of the whole process (all threads), in the kernel's
//! `USER_HZ` clock ticks. `USER_HZ` is 100 on every Linux architecture the relay ships for
//! (x86-64, arm64: `getconf CLK_TCK`); reading it with `sysconf` would need `unsafe` (libc),
//! so [`TICKS_PER_SEC`] states it instead. One tick is 10 ms, so a run should burn well over
//! a second of relay CPU (any real load run does) for the per-event figure to be meaningful.

use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

/// Clock ticks per second of `/proc/PID/stat`'s `utime` and `stime` (`USER_HZ`).
pub const TICKS_PER_SEC: u64 = 100;

/// Longest a `/debug/latency` scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// The relay's exact ingest→ack percentiles over `/debug/latency`'s sliding window, in ms.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RelayLatency {
    /// Requests (not events) in the window.
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// Length of the window the relay reported, seconds.
    pub window_s: u64,
}

/// User + system CPU time the process `pid` has used so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path} (is process {pid} running?)"))?;
    let ticks = stat_cpu_ticks(&text).with_context(|| format!("parsing {path}"))?;
    Ok(ticks_to_duration(ticks))
}

/// User + system CPU time of this process's children that have exited and been waited for
/// (`cutime + cstime`): before and after a child `loadtest` run, what that run cost.
pub fn children_cpu_time() -> anyhow::Result<Duration> {
    let path = "/proc/self/stat";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let ticks =
        stat_ticks(&text, 13, ["cutime", "cstime"]).with_context(|| format!("parsing {path}"))?;
    Ok(ticks_to_duration(ticks))
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line, in clock ticks.
pub fn stat_cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    stat_ticks(stat, 11, ["utime", "stime"])
}

/// The sum of two adjacent tick fields of a `/proc/PID/stat` line, `first` counted from the
/// field after the command name. That second field, the command name, is in parentheses and
/// may itself hold spaces and parentheses, so fields are counted from the last `)`.
fn stat_ticks(stat: &str, first: usize, names: [&str; 2]) -> anyhow::Result<u64> {
    let Some(close) = stat.rfind(')') else { bail!("no `(comm)` field") };
    // After `comm`: field 3 (state) is the first, so utime (14) is the 12th, stime (15) the
    // 13th, cutime (16) and cstime (17) the 14th and 15th.
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    ensure!(fields.len() > first + 1, "only {} fields after the command name", fields.len());
    let field = |i: usize, name: &str| -> anyhow::Result<u64> {
        fields[i].parse().with_context(|| format!("{name} `{}` is not a number", fields[i]))
    };
    let a = field(first, names[0])?;
    let b = field(first + 1, names[1])?;
    a.checked_add(b).with_context(|| format!("{} + {} overflows", names[0], names[1]))
}

/// Clock ticks to a duration.
fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_micros(ticks.saturating_mul(1_000_000 / TICKS_PER_SEC))
}

/// Scrapes `GET {admin}/debug/latency` (plain HTTP, e.g. `http://127.0.0.1:9090`) and returns
/// the `ingest_to_ack` stage over its sliding window (the last `window_secs`, 10 s).
pub async fn ingest_to_ack(admin: &str) -> anyhow::Result<RelayLatency> {
    let authority = admin
        .strip_prefix("http://")
        .with_context(|| format!("the relay's admin URL `{admin}` must be http://HOST:PORT"))?
        .trim_end_matches('/');
    let body = tokio::time::timeout(SCRAPE_TIMEOUT, get(authority, "/debug/latency"))
        .await
        .with_context(|| format!("GET {admin}/debug/latency took over {SCRAPE_TIMEOUT:?}"))??;
    let json: serde_json::Value =
        serde_json::from_slice(&body).context("/debug/latency is not JSON")?;
    parse_ingest_to_ack(&json)
}

/// The `ingest_to_ack` window of a `/debug/latency` document (values in µs, see
/// `edgerelay::metrics::latency::Report`), in milliseconds.
pub fn parse_ingest_to_ack(json: &serde_json::Value) -> anyhow::Result<RelayLatency> {
    let unit = json["unit"].as_str().unwrap_or("?");
    ensure!(unit == "us", "/debug/latency has unit `{unit}`, expected `us`");
    let window = &json["stages"]["ingest_to_ack"]["window"];
    ensure!(window.is_object(), "/debug/latency has no stages.ingest_to_ack.window");
    let micros = |key: &str| -> anyhow::Result<u64> {
        window[key].as_u64().with_context(|| format!("ingest_to_ack.window.{key} is missing"))
    };
    let ms = |key: &str| -> anyhow::Result<f64> { Ok(micros(key)? as f64 / 1000.0) };
    Ok(RelayLatency {
        count: micros("count")?,
        p50: ms("p50")?,
        p90: ms("p90")?,
        p99: ms("p99")?,
        p999: ms("p999")?,
        max: ms("max")?,
        window_s: json["window_secs"].as_u64().context("/debug/latency has no window_secs")?,
    })
}

/// The body of `GET path` on `authority` over plain HTTP/1.1, if the answer is 200.
async fn get(authority: &str, path: &str) -> anyhow::Result<Bytes> {
    let tcp = TcpStream::connect(authority)
        .await
        .with_context(|| format!("connecting to the relay's admin listener at {authority}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req =
        Request::get(path).header(hyper::header::HOST, authority).body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await.with_context(|| format!("GET {path}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    ensure!(status.is_success(), "GET {path} answered {status}");
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_after_the_command_name() {
        // A real line (kernel 6.x), comm with a space and a parenthesis in it.
        let stat = "4242 (edge relay) x) S 1 4242 4242 0 -1 4194560 12345 0 3 0 \
                    1500 250 0 0 20 0 9 0 123456 987654321 4321 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 17987 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(stat_cpu_ticks(stat).unwrap(), 1750);
        assert_eq!(ticks_to_duration(1750), Duration::from_millis(17_500));
    }

    #[test]
    fn a_broken_stat_line_is_an_error_not_a_panic() {
        assert!(stat_cpu_ticks("").is_err());
        assert!(stat_cpu_ticks("1 (x) S 1 2").is_err());
        let err = stat_cpu_ticks("1 (x) S 1 1 1 0 -1 0 0 0 0 0 ab 2 0").unwrap_err();
        assert!(format!("{err:#}").contains("utime"), "{err:#}");
        assert!(stat_cpu_ticks("1 (x) S 1 1 1 0 -1 0 0 0 0 0 18446744073709551615 1 0").is_err());
    }

    #[test]
    fn our_own_cpu_time_is_readable() {
        let pid = std::process::id();
        assert!(cpu_time(pid).is_ok());
        assert!(children_cpu_time().is_ok());
        assert!(cpu_time(u32::MAX).is_err());
    }

    #[test]
    fn reads_the_ingest_to_ack_window_in_ms() {
        let doc = serde_json::json!({
            "uptime_secs": 12.5, "window_secs": 10, "unit": "us",
            "stages": {"ingest_to_ack": {
                "window": {"count": 900, "min": 80, "mean": 700.5, "p50": 650, "p90": 1200,
                           "p99": 2500, "p999": 4100, "max": 9000, "distribution": []},
                "since_start": {"count": 0}
            }}
        });
        let l = parse_ingest_to_ack(&doc).unwrap();
        assert_eq!(
            l,
            RelayLatency {
                count: 900,
                p50: 0.65,
                p90: 1.2,
                p99: 2.5,
                p999: 4.1,
                max: 9.0,
                window_s: 10
            }
        );
        assert!(parse_ingest_to_ack(&serde_json::json!({"unit": "ms"})).is_err());
        assert!(parse_ingest_to_ack(&serde_json::json!({"unit": "us", "stages": {}})).is_err());
    }
}
