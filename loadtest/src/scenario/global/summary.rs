//! What `loadtest global` says: per region its delivery against the budget and the relay's
//! own share against its target (`summary.json`), the markdown table, the budget arithmetic
//! printed before the run and the percentile plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::share::RelayShare;
use super::{Args, Region};
use crate::model::{E2e, Measured, Percentiles, Summary};
use crate::plot::{self, Series};

/// One region in `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub(super) struct RegionSummary {
    pub(super) name: String,
    pub(super) edge_rtt_ms: u64,
    pub(super) nats_rtt_ms: u64,
    /// The network's share of send→consumer: (edge + NATS + consumer RTT) / 2.
    pub(super) floor_send_to_consumer_ms: f64,
    /// The network's share of send→ack: edge RTT + NATS RTT.
    pub(super) floor_send_to_ack_ms: f64,
    /// Budget minus the delivery floor: what the relay, JetStream and the consumer may spend.
    pub(super) headroom_ms: f64,
    pub(super) achieved_rate: f64,
    /// Events accepted in the measured phase.
    pub(super) ok: u64,
    pub(super) errors: BTreeMap<String, u64>,
    pub(super) error_total: u64,
    pub(super) send_to_ack_ms: Percentiles,
    pub(super) send_to_consumer_ms: Percentiles,
    /// Acknowledged events of the measured phase, those the consumer saw, and the rest.
    pub(super) expected: u64,
    pub(super) seen: u64,
    pub(super) missing: u64,
    pub(super) duplicates: u64,
    /// The relay's own share, when its admin listener answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) relay: Option<RelayShare>,
    /// Why there is no `relay`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) relay_error: Option<String>,
    /// send→consumer p99 under the budget, with no errors and nothing missing.
    pub(super) delivery_pass: bool,
    /// The relay's own share under its target.
    pub(super) relay_pass: bool,
    pub(super) pass: bool,
}

/// `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub(super) struct GlobalSummary {
    /// The command line, for the record.
    pub(super) command: String,
    pub(super) mode: &'static str,
    /// Offered events/s per region.
    pub(super) rate_per_region: f64,
    pub(super) warmup_s: f64,
    pub(super) duration_s: f64,
    pub(super) consumer_rtt_ms: u64,
    pub(super) budget_ms: f64,
    pub(super) relay_share_target_ms: f64,
    /// The run was cut short (Ctrl-C or SIGTERM): the numbers cover less than asked.
    pub(super) interrupted: bool,
    /// Every region passed both.
    pub(super) pass: bool,
    pub(super) regions: Vec<RegionSummary>,
}

/// One region's line of the summary, judged against the budget and the relay-share target.
pub(super) fn region_summary(
    args: &Args,
    region: &Region,
    run: Summary,
    e2e: &E2e,
    share: anyhow::Result<RelayShare>,
) -> RegionSummary {
    let send_to_consumer_ms = Percentiles::of(&e2e.latency);
    let delivery_pass = run.error_total == 0
        && e2e.counts.missing == 0
        && e2e.counts.seen > 0
        && send_to_consumer_ms.p99 < args.budget_ms;
    let (relay, relay_error) = match share {
        Ok(share) => (Some(share), None),
        Err(error) => (None, Some(format!("{error:#}"))),
    };
    let relay_pass = relay.as_ref().is_some_and(|r| r.own_share_p99_ms < args.relay_share_ms);
    let floor = region.delivery_floor_ms(args.consumer_rtt_ms);
    RegionSummary {
        name: region.name.clone(),
        edge_rtt_ms: region.edge_rtt_ms,
        nats_rtt_ms: region.nats_rtt_ms,
        floor_send_to_consumer_ms: floor,
        floor_send_to_ack_ms: region.ack_floor_ms(),
        headroom_ms: args.budget_ms - floor,
        achieved_rate: run.achieved_rate,
        ok: run.ok,
        errors: run.errors,
        error_total: run.error_total,
        send_to_ack_ms: run.latency_ms,
        send_to_consumer_ms,
        expected: e2e.counts.expected,
        seen: e2e.counts.seen,
        missing: e2e.counts.missing,
        duplicates: e2e.counts.duplicates,
        relay,
        relay_error,
        delivery_pass,
        relay_pass,
        pass: delivery_pass && relay_pass,
    }
}

/// The topology and budget arithmetic, printed before the run.
pub(super) fn arithmetic(args: &Args, regions: &[Region]) -> String {
    let mut out = String::new();
    let c = args.consumer_rtt_ms;
    let _ = writeln!(
        out,
        "global: delivery budget {} ms at p99; the network's one-way share per region is \
         edge RTT/2 + NATS RTT/2 + consumer RTT/2 ({c}/2):",
        args.budget_ms
    );
    for r in regions {
        let floor = r.delivery_floor_ms(c);
        let _ = writeln!(
            out,
            "global:   {:<8} {}/2 + {}/2 + {c}/2 = {floor:.1} ms -> {:.1} ms left for relay, \
             JetStream and consumer{}; send->ack pays {} + {} = {:.0} ms of round trips",
            r.name,
            r.edge_rtt_ms,
            r.nats_rtt_ms,
            args.budget_ms - floor,
            if floor >= args.budget_ms { " (cannot fit)" } else { "" },
            r.edge_rtt_ms,
            r.nats_rtt_ms,
            r.ack_floor_ms(),
        );
    }
    out
}

/// The markdown table (and its notes) for stdout, `table.md` and BENCHMARKS.md.
pub(super) fn markdown(s: &GlobalSummary) -> String {
    let mut out = String::new();
    let verdict = |ok: bool| if ok { "PASS" } else { "FAIL" };
    let _ = writeln!(
        out,
        "#### `loadtest global`: {} regions over {}, {}/s per region, {} s measured after {} s \
         warm-up\n",
        s.regions.len(),
        s.mode,
        s.rate_per_region,
        s.duration_s,
        s.warmup_s
    );
    let _ = writeln!(out, "`{}`\n", s.command);
    if s.interrupted {
        let _ = writeln!(out, "**Interrupted**: the measured phase was cut short.\n");
    }
    let _ = writeln!(
        out,
        "| region | edge RTT ms | relay↔NATS RTT ms | network floor ms | events/s | errors | \
         missing | send→ack p50 / p99 ms | send→consumer p50 / p99 / p99.9 ms | p99 < {} ms | \
         relay queue wait p99 ms | relay ingest→ack p99 ms | relay NATS RTT ms | relay own share \
         p99 ms | < {} ms |",
        s.budget_ms, s.relay_share_target_ms
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|:---:|"
    );
    for r in &s.regions {
        let (a, e) = (&r.send_to_ack_ms, &r.send_to_consumer_ms);
        let relay = match &r.relay {
            Some(x) => format!(
                "{:.2} | {:.2} | {:.2}{} | {:.2}",
                x.queue_wait_p99_ms,
                x.ingest_to_ack_p99_ms,
                x.nats_rtt_ms,
                if x.nats_rtt_source == "measured" { "" } else { " (configured)" },
                x.own_share_p99_ms
            ),
            None => "n/a | n/a | n/a | n/a".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | \
             {} | {relay} | {} |",
            r.name,
            r.edge_rtt_ms,
            r.nats_rtt_ms,
            r.floor_send_to_consumer_ms,
            r.achieved_rate,
            r.error_total,
            r.missing,
            a.p50,
            a.p99,
            e.p50,
            e.p99,
            e.p999,
            verdict(r.delivery_pass),
            verdict(r.relay_pass),
        );
    }
    let source = match s.regions.iter().find_map(|r| r.relay.as_ref()) {
        Some(r) if r.source == "window" => {
            format!("its last {} s, measured phase only", r.window_secs)
        }
        Some(r) => format!(
            "since the relay started, warm-up included: the measured phase is shorter than \
             its {} s window",
            r.window_secs
        ),
        None => "not available".to_owned(),
    };
    let _ = writeln!(
        out,
        "\nThe consumer is {c} ms (round trip) from NATS. Network floor = edge RTT/2 + relay↔NATS \
         RTT/2 + consumer RTT/2 ({c}/2): delivery pays each leg one way, so the rest of the {b} ms \
         budget is what the relay, JetStream and the consumer may spend. The edge's answer \
         waits for the PubAck and pays both round trips in full (edge RTT + NATS RTT), so \
         send→ack is shown but not held to the budget. Latencies run from each request's \
         intended send time (open loop, coordinated-omission-corrected). Relay own share = \
         the relay's ingest→ack p99 from its `/debug/latency` ({source}) minus its measured \
         round trip to NATS (the lowest `edgerelay_nats_rtt_seconds` read during the run): \
         queue wait, batching, encoding and \
         JetStream's own storage work, with the emulated network taken out.",
        c = s.consumer_rtt_ms,
        b = s.budget_ms,
    );
    let failed: Vec<String> = s
        .regions
        .iter()
        .filter(|r| !r.pass)
        .map(|r| {
            let mut why = Vec::new();
            if r.error_total > 0 {
                why.push(format!("{} errors", r.error_total));
            }
            if r.missing > 0 {
                why.push(format!("{} events missing", r.missing));
            }
            if r.send_to_consumer_ms.p99 >= s.budget_ms {
                why.push(format!(
                    "send→consumer p99 {:.2} ms is {:.2} ms over the budget",
                    r.send_to_consumer_ms.p99,
                    r.send_to_consumer_ms.p99 - s.budget_ms
                ));
            }
            match &r.relay {
                Some(x) if !r.relay_pass => why.push(format!(
                    "relay own share {:.2} ms is {:.2} ms over its target",
                    x.own_share_p99_ms,
                    x.own_share_p99_ms - s.relay_share_target_ms
                )),
                Some(_) => {}
                None => why.push(format!(
                    "no relay share ({})",
                    r.relay_error.as_deref().unwrap_or("unknown")
                )),
            }
            if why.is_empty() {
                why.push("nothing delivered".to_owned());
            }
            format!("{}: {}", r.name, why.join(", "))
        })
        .collect();
    if failed.is_empty() {
        let _ = writeln!(
            out,
            "\n**PASS**: every region's send→consumer p99 is under {} ms and every relay's own \
             share under {} ms.",
            s.budget_ms, s.relay_share_target_ms
        );
    } else {
        let _ = writeln!(out, "\n**FAIL**: {}.", failed.join("; "));
    }
    out
}

/// Every region's send→consumer (solid) and send→ack (dashed) percentile spectrum.
pub(super) fn svg(args: &Args, regions: &[Region], measured: &[Measured], e2e: &[E2e]) -> String {
    let mut series = Vec::new();
    for ((region, m), e) in regions.iter().zip(measured).zip(e2e) {
        series.push(Series::of(format!("{} send->consumer", region.name), &e.latency, false));
        series.push(Series::of(
            format!("{} send->ack", region.name),
            &m.measurements.latency,
            true,
        ));
    }
    let title = format!(
        "loadtest global: {} over {}, {}/s per region",
        regions.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", "),
        args.mode.name(),
        args.rate
    );
    plot::spectrum(&title, &series, Some(args.budget_ms))
}
