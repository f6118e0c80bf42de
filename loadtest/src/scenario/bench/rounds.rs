//! Variants measured in alternating rounds (every variant once per round, round after round,
//! so a drift of the machine spreads over all of them), one `loadtest` run as a child process
//! with the CPU time it and the measured processes used, and the medians the tables print.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;
use tokio::process::Command;
use tokio::time::timeout;

use crate::probe::{children_cpu_time, cpu_time};
use crate::procs::signal;

/// How long a run may go on after SIGINT before it is killed.
const KILL_AFTER: Duration = Duration::from_secs(5);

/// The part of a `loadtest --json` summary the benchmarks read.
#[derive(Clone, Debug, Deserialize)]
pub struct RunSummary {
    pub achieved_rate: f64,
    /// `null` in a closed loop.
    pub offered_rate: Option<f64>,
    pub ok: u64,
    pub warmup_ok: u64,
    pub error_total: u64,
    pub latency_ms: Latency,
}

/// Percentiles of a run, ms.
#[derive(Clone, Debug, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// One finished run: its summary and the CPU time each process used over it.
#[derive(Clone, Debug)]
pub struct Run {
    pub summary: RunSummary,
    /// The relay's, when the run went through one.
    pub relay_cpu: Option<Duration>,
    pub nats_cpu: Duration,
    /// The `loadtest` child's own.
    pub loadtest_cpu: Duration,
}

/// A `loadtest` run to start: its arguments (without `--json`/`--hgrm`), where its files go
/// (`<stem>.json`, `.hgrm`, `.txt` for stdout, `.log` for stderr) and whose CPU to read.
#[derive(Clone, Debug)]
pub struct Launch<'a> {
    pub args: &'a [String],
    pub stem: PathBuf,
    pub token: &'a str,
    pub relay_pid: Option<u32>,
    pub nats_pid: u32,
    /// SIGINT after this long, SIGKILL [`KILL_AFTER`] later.
    pub limit: Option<Duration>,
}

/// `loadtest MODE` and its flags (pairs of a flag and its value).
pub fn command<'a>(mode: &str, flags: impl IntoIterator<Item = (&'a str, String)>) -> Vec<String> {
    let mut args = vec![mode.to_owned()];
    for (flag, value) in flags {
        args.extend([flag.to_owned(), value]);
    }
    args
}

/// The flags every benchmark's run shares, after the mode's own: the timing, the events, no
/// pacer spinning, and the variant as the label.
pub fn shared_flags(
    duration: &str,
    warmup: &str,
    subjects: u32,
    payload: u32,
    label: &str,
) -> [(&'static str, String); 6] {
    [
        ("--duration", duration.to_owned()),
        ("--warmup", warmup.to_owned()),
        ("--subjects", subjects.to_string()),
        ("--payload-bytes", payload.to_string()),
        ("--pacer-spin", "0".to_owned()),
        ("--label", label.to_owned()),
    ]
}

/// Every variant once per round, in the given order, for `rounds` rounds: `(round, variant)`
/// with rounds counted from 1.
pub fn alternating<T>(rounds: u32, variants: &[T]) -> impl Iterator<Item = (u32, &T)> {
    (1..=rounds).flat_map(move |round| variants.iter().map(move |v| (round, v)))
}

/// The median (the mean of the middle two of an even count); NaN without values.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// CPU milliseconds per 1,000 events; NaN without events.
pub fn ms_per_k(cpu: Duration, events: u64) -> f64 {
    if events == 0 {
        return f64::NAN;
    }
    cpu.as_secs_f64() * 1e6 / events as f64
}

impl Run {
    /// Events answered over the whole run, warm-up included (the CPU time covers it too).
    pub fn events(&self) -> u64 {
        self.summary.ok + self.summary.warmup_ok
    }
}

impl Launch<'_> {
    /// Runs `loadtest` (this binary) as a child and measures it. `Ok(None)` when the run
    /// failed or wrote no summary (its `.log` says why); `Err` only when it could not start.
    pub async fn run(&self) -> anyhow::Result<Option<Run>> {
        let exe = std::env::current_exe().context("locating the loadtest binary")?;
        let json = with_ext(&self.stem, "json");
        let file = |ext: &str| -> anyhow::Result<std::fs::File> {
            let path = with_ext(&self.stem, ext);
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))
        };
        let relay0 = self.relay_pid.map(cpu_time).transpose()?;
        let nats0 = cpu_time(self.nats_pid)?;
        let own0 = children_cpu_time()?;
        let mut child = Command::new(exe)
            .args(self.args)
            .arg("--json")
            .arg(&json)
            .arg("--hgrm")
            .arg(with_ext(&self.stem, "hgrm"))
            .env("EDGERELAY_TOKEN", self.token)
            .stdin(Stdio::null())
            .stdout(file("txt")?)
            .stderr(file("log")?)
            .kill_on_drop(true)
            .spawn()
            .context("starting loadtest")?;
        let status = match self.limit {
            None => child.wait().await?,
            Some(limit) => match timeout(limit, child.wait()).await {
                Ok(status) => status?,
                Err(_) => {
                    if let Some(pid) = child.id() {
                        let _ = signal(pid, "INT");
                    }
                    match timeout(KILL_AFTER, child.wait()).await {
                        Ok(status) => status?,
                        Err(_) => {
                            child.kill().await?;
                            child.wait().await?
                        }
                    }
                }
            },
        };
        let relay_cpu = match (self.relay_pid, relay0) {
            (Some(pid), Some(before)) => Some(cpu_time(pid)?.saturating_sub(before)),
            _ => None,
        };
        let nats_cpu = cpu_time(self.nats_pid)?.saturating_sub(nats0);
        let loadtest_cpu = children_cpu_time()?.saturating_sub(own0);
        if !status.success() {
            return Ok(None);
        }
        let Ok(text) = std::fs::read(&json) else { return Ok(None) };
        let summary = serde_json::from_slice(&text)
            .with_context(|| format!("reading the summary {}", json.display()))?;
        Ok(Some(Run { summary, relay_cpu, nats_cpu, loadtest_cpu }))
    }

    /// The file the run's stdout went to.
    pub fn txt(&self) -> PathBuf {
        with_ext(&self.stem, "txt")
    }

    /// The file the run's stderr went to.
    pub fn log(&self) -> PathBuf {
        with_ext(&self.stem, "log")
    }
}

/// `stem.ext` (the stem may hold dots: `max-quic-e16-1`).
fn with_ext(stem: &Path, ext: &str) -> PathBuf {
    let mut path = stem.as_os_str().to_owned();
    path.push(".");
    path.push(ext);
    path.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_runs_once_per_round_in_turn() {
        let order: Vec<(u32, &&str)> = alternating(3, &["before", "batched"]).collect();
        let order: Vec<(u32, &str)> = order.into_iter().map(|(r, v)| (r, *v)).collect();
        assert_eq!(
            order,
            [
                (1, "before"),
                (1, "batched"),
                (2, "before"),
                (2, "batched"),
                (3, "before"),
                (3, "batched")
            ]
        );
        assert_eq!(alternating(0, &["a"]).count(), 0);
        assert_eq!(alternating::<&str>(2, &[]).count(), 0);
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median([]).is_nan());
    }

    #[test]
    fn cpu_per_thousand_events() {
        assert_eq!(ms_per_k(Duration::from_millis(850), 10_000), 85.0);
        assert!(ms_per_k(Duration::from_secs(1), 0).is_nan());
    }

    #[test]
    fn file_names_keep_the_dots_of_the_stem() {
        let stem = Path::new("/o/max-quic-e16-1");
        assert_eq!(with_ext(stem, "json"), Path::new("/o/max-quic-e16-1.json"));
        assert_eq!(with_ext(Path::new("a/v1.5-2"), "txt"), Path::new("a/v1.5-2.txt"));
    }
}
