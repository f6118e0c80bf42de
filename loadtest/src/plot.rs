//! The percentile-spectrum plot of `compare`, hand-written SVG (no crate: a few lines and
//! labels). x is the percentile on HdrHistogram's usual scale, log10 of 1/(1−p), labelled 0%,
//! 90%, 99%, 99.9%, ...; y is latency in ms, linear, or logarithmic when the modes differ by
//! more than [`LOG_SPREAD`]×. One line per series with a legend, and an optional dashed SLO line.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use crate::model;

/// Plot size in SVG user units (pixels).
const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 520.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 290.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;

/// Largest ratio of highest to lowest plotted latency still drawn on a linear axis.
const LOG_SPREAD: f64 = 100.0;

/// Line colours, one per series in order (Tableau 10).
const COLOURS: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// One line of the plot.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    /// (percentile in [0, 1], latency ms), percentiles ascending.
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed, in the colour of the series before it (send→consumer under send→answer).
    pub dashed: bool,
}

impl Series {
    /// The percentile spectrum of a microsecond histogram, as in its `.hgrm`.
    pub fn of(name: impl Into<String>, hist: &Histogram<u64>, dashed: bool) -> Self {
        let points = if hist.is_empty() {
            Vec::new()
        } else {
            hist.iter_quantiles(5)
                .map(|step| (step.quantile_iterated_to(), model::millis(step.value_iterated_to())))
                .collect()
        };
        Self { name: name.into(), points, dashed }
    }
}

/// x of percentile `q`: log10(1/(1−q)), at most `x_max` (the 100th percentile sits there).
fn x_of(q: f64, x_max: f64) -> f64 {
    if q >= 1.0 {
        x_max
    } else {
        (1.0 / (1.0 - q)).log10().min(x_max)
    }
}

/// `0%`, `90%`, `99%`, `99.9%`, ... for decade `k`.
fn percent_label(k: u32) -> String {
    if k == 0 {
        return "0%".to_owned();
    }
    let nines = "9".repeat(k as usize);
    match k {
        1 => "90%".to_owned(),
        _ => format!("{}.{}%", &nines[..2], &nines[2..]),
    }
    .replace(".%", "%")
}

/// Escapes text for SVG content and attributes.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A round step for about `n` ticks over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|s| *s >= raw);
    step.unwrap_or(10.0 * magnitude)
}

/// The SVG document: `series` on one percentile-spectrum plot, with `slo_ms` as a dashed line.
pub fn spectrum(title: &str, series: &[Series], slo_ms: Option<f64>) -> String {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    // Decades on x: enough for the largest histogram (1/(1-p) up to its count), 2 to 6.
    let most = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(q, _)| *q < 1.0)
        .map(|(q, _)| (1.0 / (1.0 - q)).log10())
        .fold(0.0f64, f64::max);
    let x_max = most.ceil().clamp(2.0, 6.0);
    let values = series.iter().flat_map(|s| s.points.iter().map(|(_, ms)| *ms));
    let y_top = values.clone().chain(slo_ms).fold(0.0f64, f64::max).max(0.001);
    let y_low = values.filter(|ms| *ms > 0.0).fold(f64::INFINITY, f64::min);
    let log_y = y_low.is_finite() && y_top / y_low > LOG_SPREAD;

    // y axis: (value -> pixel, ticks).
    let (y_min, y_max) = if log_y {
        (10f64.powf(y_low.log10().floor()), 10f64.powf(y_top.log10().ceil()))
    } else {
        let step = nice_step(y_top, 5.0);
        (0.0, (y_top / step).ceil() * step)
    };
    let y_px = |ms: f64| -> f64 {
        let f = if log_y {
            (ms.max(y_min).log10() - y_min.log10()) / (y_max.log10() - y_min.log10())
        } else {
            ms / y_max
        };
        TOP + plot_h * (1.0 - f.clamp(0.0, 1.0))
    };
    let x_px = |x: f64| LEFT + plot_w * x / x_max;

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        LEFT + plot_w / 2.0,
        escape(title)
    );

    // Grid and x ticks.
    for k in 0..=x_max as u32 {
        let x = x_px(f64::from(k));
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            TOP + plot_h
        );
        let _ = writeln!(
            out,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + plot_h + 18.0,
            percent_label(k)
        );
    }
    // y ticks.
    let ticks: Vec<f64> = if log_y {
        let (lo, hi) = (y_min.log10().round() as i32, y_max.log10().round() as i32);
        (lo..=hi).map(|e| 10f64.powi(e)).collect()
    } else {
        let step = nice_step(y_max, 5.0);
        (0..=((y_max / step).round() as u32)).map(|i| f64::from(i) * step).collect()
    };
    for ms in ticks {
        let y = y_px(ms);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            format_ms(ms)
        );
    }
    let _ = writeln!(
        out,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 18.0
    );
    let _ = writeln!(
        out,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">latency ms{}</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        if log_y { " (log)" } else { "" }
    );

    // SLO line.
    if let Some(slo) = slo_ms {
        let y = y_px(slo);
        let _ = writeln!(
            out,
            r##"<line class="slo" x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#d62728" stroke-dasharray="8 4" stroke-width="1.5"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#d62728">SLO {}</text>"##,
            LEFT + plot_w - 6.0,
            y - 5.0,
            format_ms(slo)
        );
    }

    // Series and legend.
    // A dashed series shares the colour of the solid one before it (the same mode's other
    // measurement); every solid series takes the next colour.
    let mut colour = 0;
    for (i, s) in series.iter().enumerate() {
        if !s.dashed && i > 0 {
            colour += 1;
        }
        let stroke = COLOURS[colour % COLOURS.len()];
        let dash = if s.dashed { r#" stroke-dasharray="5 3""# } else { "" };
        let mut d = String::new();
        for (q, ms) in &s.points {
            let cmd = if d.is_empty() { 'M' } else { 'L' };
            let _ = write!(d, "{cmd}{:.1},{:.1} ", x_px(x_of(*q, x_max)), y_px(*ms));
        }
        let _ = writeln!(
            out,
            r#"<path class="series" data-name="{}" d="{}" fill="none" stroke="{stroke}" stroke-width="2"{dash}/>"#,
            escape(&s.name),
            d.trim_end()
        );
        let ly = TOP + 10.0 + 20.0 * i as f64;
        let lx = LEFT + plot_w + 12.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{stroke}" stroke-width="2"{dash}/>"#,
            lx + 24.0
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 30.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// A latency for an axis label: `0.5 ms`, `20 ms`, `1 s`.
fn format_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{} s", trim(ms / 1000.0))
    } else {
        format!("{} ms", trim(ms))
    }
}

/// A number without trailing zeros: 2, 0.5, 0.01.
fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values_us: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = model::histogram();
        for v in values_us {
            h.record(v).unwrap();
        }
        h
    }

    /// Elements open and close in order (`<a>..</a>`, `<b/>`), nothing is left open, and
    /// attribute values carry no raw `<` or `&`.
    fn well_formed(svg: &str) -> bool {
        let mut open: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let Some(end) = rest[start..].find('>') else { return false };
            let tag = &rest[start + 1..start + end];
            if tag.contains('<') {
                return false;
            }
            if let Some(name) = tag.strip_prefix('/') {
                if open.pop() != Some(name.trim()) {
                    return false;
                }
            } else if !tag.ends_with('/') {
                open.push(tag.split_whitespace().next().unwrap_or(""));
            }
            rest = &rest[start + end + 1..];
        }
        open.is_empty() && !svg.contains("&&")
    }

    #[test]
    fn one_path_per_mode_and_a_well_formed_document() {
        let series = vec![
            Series::of("https", &hist((1..=1000).map(|i| i * 10)), false),
            Series::of("https send->consumer", &hist((1..=1000).map(|i| i * 12)), true),
            Series::of("quic <&>", &hist((1..=1000).map(|i| i * 5)), false),
            Series::of("bare", &hist((1..=1000).map(|i| i * 2)), false),
        ];
        let svg = spectrum("loadtest compare: 1000/s", &series, Some(100.0));
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""), "{svg}");
        assert!(svg.ends_with("</svg>\n"));
        assert!(well_formed(&svg), "{svg}");
        assert_eq!(svg.matches(r#"<path class="series""#).count(), 4);
        assert!(svg.contains(r#"data-name="quic &lt;&amp;&gt;""#));
        assert_eq!(svg.matches(r#"class="slo""#).count(), 1);
        for label in ["0%", "90%", "99%", "99.9%"] {
            assert!(svg.contains(&format!(">{label}</text>")), "{label}");
        }
        // The dashed line shares the colour of the line before it.
        assert!(svg.contains("stroke-dasharray=\"5 3\""));
    }

    #[test]
    fn every_mode_its_own_colour_and_its_dashed_line_the_same() {
        let h = hist([100, 200, 300]);
        let mut series = Vec::new();
        for mode in ["a", "b", "c", "d", "e", "f", "g"] {
            series.push(Series::of(mode, &h, false));
            series.push(Series::of(format!("{mode} e2e"), &h, true));
        }
        let svg = spectrum("seven modes", &series, None);
        let strokes: Vec<&str> = svg
            .lines()
            .filter(|l| l.starts_with(r#"<path class="series""#))
            .filter_map(|l| l.split("stroke=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(strokes.len(), 14);
        for pair in strokes.chunks(2) {
            assert_eq!(pair[0], pair[1], "{strokes:?}");
        }
        let distinct: std::collections::BTreeSet<_> = strokes.iter().collect();
        assert_eq!(distinct.len(), 7, "{strokes:?}");
    }

    #[test]
    fn a_wide_spread_goes_log_and_empty_series_still_draw() {
        let series = vec![
            Series::of("fast", &hist([50, 60, 70]), false),
            Series::of("slow", &hist([500_000, 900_000]), false),
            Series::of("none", &model::histogram(), false),
        ];
        let svg = spectrum("t", &series, None);
        assert!(well_formed(&svg), "{svg}");
        assert!(svg.contains("latency ms (log)"));
        assert_eq!(svg.matches(r#"<path class="series""#).count(), 3);
        assert!(!svg.contains("class=\"slo\""));
    }

    #[test]
    fn labels_and_ticks() {
        assert_eq!(percent_label(0), "0%");
        assert_eq!(percent_label(1), "90%");
        assert_eq!(percent_label(2), "99%");
        assert_eq!(percent_label(3), "99.9%");
        assert_eq!(percent_label(4), "99.99%");
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nice_step(0.7, 5.0), 0.2);
        assert_eq!(format_ms(0.5), "0.5 ms");
        assert_eq!(format_ms(2000.0), "2 s");
        assert!((x_of(0.99, 4.0) - 2.0).abs() < 1e-9);
        assert_eq!(x_of(1.0, 4.0), 4.0);
    }
}
