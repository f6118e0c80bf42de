//! `conn-flood-v6` needs several source addresses of one IPv6 /64, which loopback does not
//! have (`::1` is a /128) and adding them needs privileges. Without root, the scenario re-runs
//! this program in a new user and network namespace (`unshare -rn`, as an unprivileged user
//! may), where it brings `lo` up and adds `fd00:15::1`, `fd00:15::2`, … to it; nats-server,
//! the relay (on `::1`) and every connection stay inside. The child writes its row as JSON;
//! the parent reads it back. Where `unshare` is not allowed the row says so and is skipped.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv6Addr};
use std::process::Stdio;

use anyhow::{ensure, Context as _};
use tokio::process::Command;

use super::{Args, Row, Scenario};

/// `fd00:15::1` … `fd00:15::n`, all in `fd00:15::/64`.
pub fn sources(n: u32) -> Vec<IpAddr> {
    (1..=n.clamp(1, 0xffff))
        .map(|i| Ipv6Addr::new(0xfd00, 0x15, 0, 0, 0, 0, 0, i as u16).into())
        .collect()
}

/// Runs `conn-flood-v6` in a namespace and returns its row (a skipped one if that fails).
pub async fn run(args: &Args) -> Row {
    let scenario = Scenario::ConnFloodV6;
    match in_namespace(args).await {
        Ok(row) => row,
        Err(e) => Row::skipped(
            scenario,
            scenario.about(&args.intensity),
            format!("needs an IPv6 /64 on lo, from a user+network namespace (unshare -rn): {e:#}"),
        ),
    }
}

async fn in_namespace(args: &Args) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("row.json");
    let adds: Vec<String> = sources(args.intensity.v6_sources)
        .iter()
        .map(|ip| format!("ip -6 addr add {ip}/128 dev lo nodad"))
        .collect();
    let script = format!("ip link set lo up && {} && exec \"$@\"", adds.join(" && "));
    let mut argv = vec![OsString::from("attack")];
    argv.extend(forwarded(std::env::args_os().skip(2)));
    argv.extend(["conn-flood-v6".into(), "--in-netns".into(), "--no-fail".into(), "--json".into()]);
    argv.push(json.clone().into());
    let status = Command::new("unshare")
        .args(["-rn", "sh", "-c", &script, "sh"])
        .arg(std::env::current_exe()?)
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .context("running unshare")?;
    ensure!(json.exists(), "the run in the namespace wrote no result ({status})");
    let rows: Vec<Row> = serde_json::from_slice(&std::fs::read(&json)?)?;
    rows.into_iter().next().context("the run in the namespace wrote no row")
}

/// This invocation's flags after `attack`, without the scenario names and `--json`.
fn forwarded(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let names: Vec<&str> =
        Scenario::ALL.iter().map(|s| s.name()).chain([Scenario::All.name()]).collect();
    let mut out = Vec::new();
    let mut skip_value = false;
    for arg in args {
        let text = arg.to_string_lossy();
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if text == "--json" {
            skip_value = true;
        } else if !(names.contains(&text.as_ref())
            || text.starts_with("--json=")
            || text == "--no-fail"
            || text == "--in-netns")
        {
            out.push(arg);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sources_share_one_64() {
        let ips = sources(3);
        assert_eq!(ips.len(), 3);
        assert_eq!(ips[0].to_string(), "fd00:15::1");
        assert_eq!(ips[2].to_string(), "fd00:15::3");
    }

    #[test]
    fn forwarded_flags_drop_the_scenarios_and_the_json() {
        let argv = [
            "all",
            "--rate",
            "100",
            "--json",
            "x.json",
            "slow-h1",
            "--json=y",
            "--no-fail",
            "--ramp=1s",
        ];
        let out = forwarded(argv.iter().map(OsString::from));
        assert_eq!(out, ["--rate", "100", "--ramp=1s"].map(OsString::from));
    }
}
