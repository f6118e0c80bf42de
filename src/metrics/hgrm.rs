//! The classic HdrHistogram percentile-distribution text (`.hgrm`), as Java's
//! `Histogram.outputPercentileDistribution(out, 5, scalingRatio)` writes it and the HdrHistogram
//! plotter (hdrhistogram.github.io/HdrHistogram/plotFiles.html) and `HistogramLogProcessor`
//! read it. The `hdrhistogram` crate serializes histograms (V2 binary, interval logs) but not
//! this text, so it is written here; the relay's `/debug/latency/{stage}.hgrm` and the
//! loadtest's `--hgrm` share it.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

/// Percentile steps per halving of the distance to 100%, as the Java default.
const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// The percentile distribution of `hist`, every value divided by `scale` (e.g. 1000 for a
/// microsecond histogram printed in milliseconds): a header, one row per percentile step, and
/// the `#[Mean …]`, `#[Max …]`, `#[Buckets …]` footer. Values are printed with as many
/// decimals as the histogram has significant digits.
pub fn percentile_distribution(hist: &Histogram<u64>, scale: f64) -> String {
    let digits = usize::from(hist.sigfig());
    let scaled = |v: u64| v as f64 / scale;
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for step in hist.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
        total += step.count_since_last_iteration();
        let value = scaled(step.value_iterated_to());
        let q = step.quantile_iterated_to();
        if q < 1.0 {
            let _ =
                writeln!(out, "{value:12.digits$} {q:2.12} {total:10} {:14.2}", 1.0 / (1.0 - q));
        } else {
            let _ = writeln!(out, "{value:12.digits$} {q:2.12} {total:10}");
        }
    }
    let (mean, stdev, max) = if hist.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (hist.mean() / scale, hist.stdev() / scale, scaled(hist.max()))
    };
    let _ = writeln!(out, "#[Mean    = {mean:12.digits$}, StdDeviation   = {stdev:12.digits$}]");
    let _ = writeln!(out, "#[Max     = {max:12.digits$}, Total count    = {:12}]", hist.len());
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        hist.buckets(),
        sub_bucket_count(hist.sigfig())
    );
    out
}

/// HdrHistogram's sub-bucket count for `sigfig` digits (not exposed by the crate): the
/// smallest power of two covering `2 × 10^sigfig`.
fn sub_bucket_count(sigfig: u8) -> u64 {
    (2 * 10u64.pow(u32::from(sigfig))).next_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram() -> Histogram<u64> {
        crate::metrics::latency::histogram()
    }

    fn sample() -> Histogram<u64> {
        let mut h = histogram();
        for us in 1..=1000u64 {
            h.record(us * 10).unwrap(); // 10 µs .. 10 ms
        }
        h
    }

    #[test]
    fn has_the_classic_shape() {
        let text = percentile_distribution(&sample(), 1000.0);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "       Value     Percentile TotalCount 1/(1-Percentile)");
        assert_eq!(lines[1], "");

        let rows: Vec<Vec<&str>> = lines[2..]
            .iter()
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert!(rows.len() > 10);
        // Every row but the last has four columns; the last (percentile 1.0) has three.
        let (last, body) = rows.split_last().unwrap();
        assert!(body.iter().all(|r| r.len() == 4));
        assert_eq!(last.len(), 3);
        assert_eq!(last[1], "1.000000000000");
        assert_eq!(last[2], "1000");
        // Values in ms with 3 decimals; percentiles and counts never decrease.
        assert_eq!(rows[0][0], "0.010");
        let mut previous = (0.0, 0.0, 0u64);
        for r in &rows {
            let row: (f64, f64, u64) =
                (r[0].parse().unwrap(), r[1].parse().unwrap(), r[2].parse().unwrap());
            assert!(row.0 >= previous.0 && row.1 >= previous.1 && row.2 >= previous.2);
            previous = row;
        }
        assert!(last[0].starts_with("10.0"));

        let footer: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("#[")).collect();
        assert_eq!(footer.len(), 3);
        assert!(footer[0].starts_with("#[Mean    =        5.00"));
        assert!(footer[0].contains(", StdDeviation   = "));
        assert!(footer[1].starts_with("#[Max     =       10.0"));
        assert!(footer[1].ends_with(", Total count    =         1000]"));
        assert!(footer[2].ends_with(", SubBuckets     =         2048]"));
        assert_eq!(lines.last(), footer.last());
    }

    #[test]
    fn an_empty_histogram_is_only_header_and_footer() {
        let text = percentile_distribution(&histogram(), 1000.0);
        assert_eq!(text.lines().count(), 5);
        assert!(text.contains("Total count    =            0]"));
    }

    #[test]
    fn the_scale_divides_every_value() {
        let text = percentile_distribution(&sample(), 1.0);
        // 10,000 µs sits in a bucket 8 µs wide; HdrHistogram reports its highest value.
        assert!(text.contains("#[Max     =    10007.000,"), "{text}");
    }
}
