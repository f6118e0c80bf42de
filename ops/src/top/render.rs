//! Draws one frame of `edgerelay top` from a [`View`]: a pure function of the state, so a
//! frame can be checked on ratatui's `TestBackend` without a terminal.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Bar, BarChart, BarGroup, Block, Cell, Padding, Paragraph, Row, Table};
use ratatui::Frame;

use super::latency::{Summary, DISTRIBUTION_STAGE, STAGES};
use super::state::{Counters, LatencyState, Link, Snapshot, View};

/// The delivery SLO every percentile is held against: p99 under 100 ms.
pub const SLO_US: f64 = 100_000.0;

/// What is shown for a value the relay does not report.
pub const ABSENT: &str = "–";

const LABEL_WIDTH: usize = 14;
/// Fewest buckets the distribution shows, so one busy bucket still has context.
const MIN_BARS: usize = 8;

/// Draws the whole screen.
pub fn render(frame: &mut Frame, view: &View) {
    let [header, stats, latency, chart, footer] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Min(6),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    render_header(frame, header, view);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(stats);
    render_throughput(frame, left, view);
    render_pipeline(frame, right, view);
    render_latency(frame, latency, view);
    render_distribution(frame, chart, view);
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(" q", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(" / "),
            Span::styled("Ctrl-C", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(" quit"),
        ])),
        footer,
    );
}

fn render_header(frame: &mut Frame, area: Rect, view: &View) {
    let every = format!("every {:.1} s", view.interval.as_secs_f64());
    let mut first = vec![
        Span::styled("relay ", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(view.admin.as_str()),
        Span::raw("  ·  "),
        Span::raw(every.clone()),
    ];
    if let LatencyState::Ok(l) = &view.latency {
        first.push(Span::raw(format!("  ·  up {}", fmt_uptime(l.uptime_secs))));
    }
    let status = match &view.link {
        Link::Connecting => Line::from(Span::styled("connecting…", Style::new().fg(Color::Yellow))),
        Link::Up => {
            let mut spans = vec![Span::styled("● connected", Style::new().fg(Color::Green))];
            if view.skipped_lines > 0 {
                spans.push(Span::styled(
                    format!("  ({} unreadable /metrics lines skipped)", view.skipped_lines),
                    Style::new().fg(Color::Yellow),
                ));
            }
            Line::from(spans)
        }
        Link::Down { error, failures } => Line::from(Span::styled(
            format!(
                "✖ relay unreachable: {error} ({failures} failed poll{}, retrying {every})",
                if *failures == 1 { "" } else { "s" }
            ),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        )),
    };
    frame.render_widget(
        Paragraph::new(vec![Line::from(first), status]).block(block(" edgerelay top ")),
        area,
    );
}

fn render_throughput(frame: &mut Frame, area: Rect, view: &View) {
    let r = view.rates.as_ref();
    let s = view.snapshot.as_ref();
    let rate = |f: fn(&Counters) -> Option<f64>| r.and_then(f).map_or(ABSENT.to_owned(), fmt_rate);
    let total = |f: fn(&Counters) -> Option<f64>| {
        s.and_then(|s| f(&s.totals)).map(|v| format!("total {}", fmt_count(v)))
    };
    let by_code = r
        .map(|r| {
            r.refused_by_code
                .iter()
                .filter(|(_, v)| **v > 0.0)
                .map(|(code, v)| format!("{code} {}", fmt_rate(*v)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let lines = vec![
        stat("accepted", rate(|r| r.accepted), total(|s| s.accepted)),
        stat(
            "refused",
            rate(|r| r.refused),
            if by_code.is_empty() { total(|s| s.refused) } else { Some(by_code) },
        ),
        stat("duplicates", rate(|r| r.duplicates), total(|s| s.duplicates)),
        stat(
            "batches",
            rate(|r| r.batches),
            r.and_then(|r| r.retries).map(|v| format!("retries {}", fmt_rate(v))),
        ),
        stat(
            "bytes in",
            r.and_then(|r| r.received_bytes).map_or(ABSENT.into(), fmt_bytes_rate),
            None,
        ),
        stat(
            "bytes out",
            r.and_then(|r| r.published_bytes).map_or(ABSENT.into(), fmt_bytes_rate),
            None,
        ),
    ];
    frame.render_widget(Paragraph::new(lines).block(block(" Throughput ")), area);
}

fn render_pipeline(frame: &mut Frame, area: Rect, view: &View) {
    let s = view.snapshot.as_ref();
    let gauge = |f: fn(&Snapshot) -> Option<f64>, unit: &str| {
        s.and_then(f).map_or(ABSENT.to_owned(), |v| format!("{} {unit}", fmt_count(v)))
    };
    let connections = s
        .filter(|s| !s.connections.is_empty())
        .map(|s| {
            s.connections
                .iter()
                .map(|(p, v)| format!("{p} {}", fmt_count(*v)))
                .collect::<Vec<_>>()
                .join(" · ")
        })
        .unwrap_or_else(|| ABSENT.to_owned());
    let rtt = s.and_then(Snapshot::active_rtt_secs);
    let rtt_style = match rtt {
        Some(v) if v * 1e6 > SLO_US => Style::new().fg(Color::Red),
        _ => Style::new(),
    };
    let uptime = match &view.latency {
        LatencyState::Ok(l) => fmt_uptime(l.uptime_secs),
        _ => ABSENT.to_owned(),
    };
    let lines = vec![
        field("queue depth", Span::raw(gauge(|s| s.queue_depth, "events"))),
        field("in flight", Span::raw(gauge(|s| s.inflight_batches, "batches"))),
        field("connections", Span::raw(connections)),
        field(
            "NATS cluster",
            Span::raw(
                s.and_then(|s| s.active_cluster.clone()).unwrap_or_else(|| ABSENT.to_owned()),
            ),
        ),
        field("NATS RTT", Span::styled(rtt.map_or(ABSENT.into(), |v| fmt_us(v * 1e6)), rtt_style)),
        field("uptime", Span::raw(uptime)),
    ];
    frame.render_widget(Paragraph::new(lines).block(block(" Pipeline ")), area);
}

fn render_latency(frame: &mut Frame, area: Rect, view: &View) {
    let (window, note) = match &view.latency {
        LatencyState::Ok(l) => (format!("last {} s", l.window_secs), String::new()),
        LatencyState::NotServed => {
            ("window".to_owned(), " (this relay serves no /debug/latency)".to_owned())
        }
        LatencyState::Failed(e) => ("window".to_owned(), format!(" ({e})")),
        LatencyState::Unknown => ("window".to_owned(), String::new()),
    };
    let title = Line::from(vec![
        Span::raw(format!(" Latency, {window} · SLO ")),
        Span::styled("p99 < 100 ms", Style::new().add_modifier(Modifier::BOLD)),
        Span::styled(format!("{note} "), Style::new().fg(Color::Yellow)),
    ]);
    let header = Row::new(["stage", "count", "p50", "p99", "p99.9", "max"])
        .style(Style::new().add_modifier(Modifier::BOLD));
    let rows = STAGES.iter().map(|stage| {
        let w = match &view.latency {
            LatencyState::Ok(l) => l.window(stage),
            _ => None,
        };
        let cell = |v: Option<f64>, slo: bool| match v {
            None => Cell::from(ABSENT),
            Some(us) => Cell::from(fmt_us(us)).style(latency_style(us, slo)),
        };
        // Percentiles of an empty window are meaningless: show them as absent.
        let w = w.filter(|w| w.count > 0);
        let count = match (&view.latency, w) {
            (LatencyState::Ok(l), None) if l.window(stage).is_some() => "0".to_owned(),
            (_, Some(w)) => fmt_count(w.count as f64),
            _ => ABSENT.to_owned(),
        };
        Row::new(vec![
            Cell::from(*stage),
            Cell::from(count),
            cell(w.map(|w| w.p50), false),
            cell(w.map(|w| w.p99), true),
            cell(w.map(|w| w.p999), false),
            cell(w.map(|w| w.max), false),
        ])
    });
    let widths = [
        Constraint::Length(15),
        Constraint::Length(9),
        Constraint::Length(11),
        Constraint::Length(11),
        Constraint::Length(11),
        Constraint::Length(11),
    ];
    frame.render_widget(Table::new(rows, widths).header(header).block(block(title)), area);
}

/// p99 is the SLO's own percentile: green under 100 ms, red above. The others only turn
/// yellow above it.
fn latency_style(us: f64, is_slo_percentile: bool) -> Style {
    match (us > SLO_US, is_slo_percentile) {
        (true, true) => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        (false, true) => Style::new().fg(Color::Green),
        (true, false) => Style::new().fg(Color::Yellow),
        (false, false) => Style::new(),
    }
}

fn render_distribution(frame: &mut Frame, area: Rect, view: &View) {
    let summary = match &view.latency {
        LatencyState::Ok(l) => l.window(DISTRIBUTION_STAGE),
        _ => None,
    };
    let window = match &view.latency {
        LatencyState::Ok(l) => format!("last {} s", l.window_secs),
        _ => "window".to_owned(),
    };
    let section = block(format!(
        " {DISTRIBUTION_STAGE} distribution, {window} (bucket upper bounds; red = above the SLO) "
    ));
    let Some(buckets) = summary.and_then(shown_buckets) else {
        let text = match summary {
            Some(_) => "no events in this window",
            None => ABSENT,
        };
        frame.render_widget(Paragraph::new(text).block(section), area);
        return;
    };
    let inner = area.width.saturating_sub(4) as usize;
    let per_bar = inner / buckets.len().max(1);
    let width = per_bar.saturating_sub(1).clamp(1, 6) as u16;
    let bars: Vec<Bar> = buckets
        .iter()
        .map(|&(lower, upper, count)| {
            let color = if lower >= SLO_US {
                Color::Red
            } else if upper > SLO_US {
                Color::Yellow
            } else {
                Color::Green
            };
            Bar::default()
                .value(count)
                .text_value(fmt_count(count as f64))
                .label(Line::from(fmt_bound(upper)))
                .style(Style::new().fg(color))
                .value_style(Style::new().fg(Color::Black).bg(color))
        })
        .collect();
    frame.render_widget(
        BarChart::default()
            .block(section)
            .data(BarGroup::default().bars(&bars))
            .bar_width(width)
            .bar_gap(1),
        area,
    );
}

/// The buckets worth drawing as `(lower, upper, count)`: from the first to the last non-empty
/// one, widened to [`MIN_BARS`]; `None` when every bucket is empty.
fn shown_buckets(s: &Summary) -> Option<Vec<(f64, f64, u64)>> {
    let d = &s.distribution;
    let first = d.iter().position(|&(_, c)| c > 0)?;
    let last = d.iter().rposition(|&(_, c)| c > 0)?;
    let mut hi = (first + MIN_BARS - 1).max(last).min(d.len() - 1);
    let lo = hi.saturating_sub(MIN_BARS - 1).min(first);
    hi = hi.max(lo);
    Some(
        (lo..=hi)
            .map(|i| {
                let lower = if i == 0 { 0.0 } else { d[i - 1].0 };
                (lower, d[i].0, d[i].1)
            })
            .collect(),
    )
}

/// A label and a left-aligned value.
/// A bordered section with a column of room inside each border.
fn block<'a>(title: impl Into<Line<'a>>) -> Block<'a> {
    Block::bordered().title(title).padding(Padding::horizontal(1))
}

fn field(label: &str, value: Span<'static>) -> Line<'static> {
    Line::from(vec![Span::raw(format!("{label:<LABEL_WIDTH$}")), value])
}

/// A label, a right-aligned number, and what goes with it.
fn stat(label: &str, value: String, extra: Option<String>) -> Line<'static> {
    let mut spans = vec![
        Span::raw(format!("{label:<LABEL_WIDTH$}")),
        Span::styled(format!("{value:>10}"), Style::new().add_modifier(Modifier::BOLD)),
    ];
    if let Some(extra) = extra {
        spans.push(Span::styled(format!("   {extra}"), Style::new().fg(Color::DarkGray)));
    }
    Line::from(spans)
}

/// A latency given in microseconds, in the unit that reads best.
pub fn fmt_us(us: f64) -> String {
    if !us.is_finite() {
        ABSENT.to_owned()
    } else if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 10_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else if us < 1_000_000.0 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// A bucket bound, at most five columns wide: `100µ`, `1.6m`, `410m`, `1.6s`.
fn fmt_bound(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0}µ")
    } else if us < 10_000.0 {
        format!("{:.1}m", us / 1e3)
    } else if us < 1_000_000.0 {
        format!("{:.0}m", us / 1e3)
    } else {
        format!("{:.1}s", us / 1e6)
    }
}

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M/s", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k/s", v / 1e3)
    } else {
        format!("{v:.1}/s")
    }
}

fn fmt_bytes_rate(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.2} GB/s", v / 1e9),
        v if v >= 1e6 => format!("{:.2} MB/s", v / 1e6),
        v if v >= 1e3 => format!("{:.1} kB/s", v / 1e3),
        v => format!("{v:.0} B/s"),
    }
}

fn fmt_count(v: f64) -> String {
    if v >= 1e7 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e5 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_uptime(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    use super::*;
    use crate::top::state::Scrape;

    const METRICS: &str = "edgerelay_accepted_events_total{protocol=\"https\"} 1200\n\
        edgerelay_refusals_total{protocol=\"https\",code=\"unauthorized\",reason=\"x\"} 0\n\
        edgerelay_batches_total{outcome=\"stored\"} 40\n\
        edgerelay_queue_depth_events 12\n\
        edgerelay_inflight_batches 3\n\
        edgerelay_connections{protocol=\"https\"} 10\n\
        edgerelay_connections{protocol=\"quic\"} 4\n\
        edgerelay_nats_active_cluster{cluster=\"eu-west\"} 1\n\
        edgerelay_nats_rtt_seconds{cluster=\"eu-west\"} 0.0015\n";

    fn latency(p99_us: u64) -> Vec<u8> {
        format!(
            r#"{{"uptime_secs": 3723, "window_secs": 10, "unit": "us", "stages": {{
              "ingest_to_ack": {{"window": {{"count": 1000, "p50": 850, "p99": {p99_us},
                "p999": 180000, "max": 250000,
                "distribution": [[100, 0], [200, 10], [400, 300], [800, 600], [1600, 80],
                  [3200, 5], [6400, 0], [12800, 0], [25600, 0], [51200, 0], [102400, 4],
                  [204800, 1], [409600, 0]]}}}},
              "flush": {{"window": {{"count": 40, "p50": 400, "p99": 900, "p999": 900, "max": 950}}}}
            }}}}"#
        )
        .into_bytes()
    }

    fn screen(view: &View) -> String {
        let mut terminal = Terminal::new(TestBackend::new(110, 32)).unwrap();
        terminal.draw(|f| render(f, view)).unwrap();
        let buf = terminal.backend().buffer();
        let mut out = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                out.push_str(buf[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    fn style_of(view: &View, text: &str) -> Style {
        let mut terminal = Terminal::new(TestBackend::new(110, 32)).unwrap();
        terminal.draw(|f| render(f, view)).unwrap();
        let buf = terminal.backend().buffer();
        let rendered = screen(view);
        let (row, line) = rendered.lines().enumerate().find(|(_, l)| l.contains(text)).unwrap();
        let col = line[..line.find(text).unwrap()].chars().count();
        buf[(col as u16, row as u16)].style()
    }

    fn live_view(p99_us: u64) -> View {
        let mut v = View::new("http://127.0.0.1:9090", Duration::from_secs(1));
        let t0 = Instant::now();
        let first = METRICS.replace("} 1200", "} 1000").replace("} 40", "} 30");
        v.observe(Scrape { at: t0, metrics: Ok(first), latency: Ok(Some(latency(p99_us))) });
        v.observe(Scrape {
            at: t0 + Duration::from_secs(2),
            metrics: Ok(METRICS.to_owned()),
            latency: Ok(Some(latency(p99_us))),
        });
        v
    }

    #[test]
    fn a_live_frame_shows_every_section_a_p99_and_bars() {
        let text = screen(&live_view(3100));
        for needle in [
            "edgerelay top",
            "http://127.0.0.1:9090",
            "● connected",
            "up 1h02m03s",
            "Throughput",
            "Pipeline",
            "Latency, last 10 s",
            "p99 < 100 ms",
            "ingest_to_ack distribution",
            "100.0/s", // (1200 - 1000) / 2 s
            "total 1200",
            "5.0/s", // batches
            "12 events",
            "3 batches",
            "https 10 · quic 4",
            "eu-west",
            "1.50 ms",
            "3.10 ms", // the p99
            "850 µs",
            "180.0 ms",
            "400µ",
            "102m",
            "█",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let ingest = text.lines().find(|l| l.contains("ingest_to_ack ")).unwrap();
        assert!(ingest.contains("1000") && ingest.contains("250.0 ms"), "{ingest}");
        let edge = text.lines().find(|l| l.contains("edge_to_ack")).unwrap();
        assert!(edge.contains(ABSENT), "a stage the relay does not report: {edge}");
        assert!(text.contains(&format!("bytes in      {:>10}", ABSENT)), "{text}");
    }

    #[test]
    fn a_p99_above_the_slo_is_red() {
        assert_eq!(style_of(&live_view(3100), "3.10 ms").fg, Some(Color::Green));
        assert_eq!(style_of(&live_view(150_000), "150.0 ms").fg, Some(Color::Red));
    }

    #[test]
    fn an_unreachable_relay_is_shown_without_numbers() {
        let mut v = View::new("http://127.0.0.1:1", Duration::from_millis(500));
        v.observe(Scrape {
            at: Instant::now(),
            metrics: Err("connection refused".into()),
            latency: Err("connection refused".into()),
        });
        let text = screen(&v);
        assert!(
            text.contains(
                "relay unreachable: connection refused (1 failed poll, retrying every 0.5 s)"
            ),
            "{text}"
        );
        assert!(text.contains("Throughput") && text.contains("Latency"), "{text}");
        assert!(!text.contains("█"), "{text}");
    }

    #[test]
    fn a_relay_without_debug_latency_shows_dashes() {
        let mut v = View::new("http://x", Duration::from_secs(1));
        v.observe(Scrape {
            at: Instant::now(),
            metrics: Ok(METRICS.to_owned()),
            latency: Ok(None),
        });
        let text = screen(&v);
        assert!(text.contains("serves no /debug/latency"), "{text}");
        let ingest = text.lines().find(|l| l.contains("ingest_to_ack ")).unwrap();
        assert_eq!(ingest.matches(ABSENT).count(), 5, "{ingest}");
    }

    #[test]
    fn a_tiny_terminal_does_not_panic() {
        let v = live_view(3100);
        for (w, h) in [(1, 1), (10, 5), (40, 12), (300, 80)] {
            let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
            terminal.draw(|f| render(f, &v)).unwrap();
        }
    }

    #[test]
    fn buckets_are_trimmed_and_widened() {
        let mut s = Summary {
            distribution: (0..20).map(|i| (100.0 * 2f64.powi(i), 0)).collect(),
            ..Summary::default()
        };
        assert!(shown_buckets(&s).is_none());
        s.distribution[5].1 = 7;
        let b = shown_buckets(&s).unwrap();
        assert_eq!(b.len(), MIN_BARS);
        assert_eq!(b[0], (1600.0, 3200.0, 7));
        s.distribution[19].1 = 1;
        let b = shown_buckets(&s).unwrap();
        assert_eq!((b.len(), b[0].2, b[14].2), (15, 7, 1));
        s.distribution = vec![(100.0, 3)];
        assert_eq!(shown_buckets(&s).unwrap(), vec![(0.0, 100.0, 3)]);
    }

    #[test]
    fn units_read_well() {
        for (shown, want) in [
            (fmt_us(850.0), "850 µs"),
            (fmt_us(3100.0), "3.10 ms"),
            (fmt_us(150_000.0), "150.0 ms"),
            (fmt_us(2_500_000.0), "2.50 s"),
            (fmt_bound(102_400.0), "102m"),
            (fmt_bound(1_638_400.0), "1.6s"),
            (fmt_bytes_rate(1_234_567.0), "1.23 MB/s"),
            (fmt_uptime(59.9), "59s"),
        ] {
            assert_eq!(shown, want);
        }
    }
}
