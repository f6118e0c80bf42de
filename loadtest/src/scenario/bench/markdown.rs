//! The markdown the benchmarks write: numbers as their tables show them, today's date, and the
//! block of `BENCHMARKS.md` between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->`
//! replaced while every byte outside the markers stays as it was.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

/// `v` with `digits` decimals and thousands separated by commas (`12,345.67`); `-` for none.
pub fn grouped(v: Option<f64>, digits: usize) -> String {
    let Some(v) = v.filter(|v| v.is_finite()) else {
        return v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    };
    let text = format!("{:.digits$}", v.abs());
    let (int, frac) = text.split_once('.').map_or((text.as_str(), None), |(i, f)| (i, Some(f)));
    let mut out = String::with_capacity(text.len() + int.len() / 3 + 1);
    if v.is_sign_negative() && text.bytes().any(|b| (b'1'..=b'9').contains(&b)) {
        out.push('-');
    }
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if let Some(frac) = frac {
        out.push('.');
        out.push_str(frac);
    }
    out
}

/// `v` as the tables have always shown a bare number: shortest form, one decimal at least
/// (`25.0`, `0.5`).
pub fn float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 {
        format!("{v:.1}")
    } else {
        v.to_string()
    }
}

/// `text` with the block between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->`
/// replaced by `block` (which ends with a newline); `None` when either marker is missing.
pub fn replace_block(text: &str, name: &str, block: &str) -> Option<String> {
    let start = format!("<!-- bench:{name}:start -->");
    let end = format!("<!-- bench:{name}:end -->");
    let (head, rest) = text.split_once(&start)?;
    let (_, tail) = rest.split_once(&end)?;
    Some(format!("{head}{start}\n{block}{end}{tail}"))
}

/// Replaces the `name` block of the markdown file at `path`.
pub fn write_block(path: &Path, name: &str, block: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let replaced = replace_block(&text, name, block).with_context(|| {
        format!(
            "{} has no <!-- bench:{name}:start --> ... <!-- bench:{name}:end --> block",
            path.display()
        )
    })?;
    std::fs::write(path, replaced).with_context(|| format!("writing {}", path.display()))
}

/// Today's date (UTC), `YYYY-MM-DD`.
pub fn today() -> String {
    let days = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_between_the_markers_is_replaced_and_the_rest_kept() {
        let text = "# Benchmarks\n\nhand-written\n<!-- bench:issue5:start -->\nold\ntable\n\
                    <!-- bench:issue5:end -->\n\n## later, by hand\n<!-- bench:other:start -->\nx\n\
                    <!-- bench:other:end -->\n";
        let replaced = replace_block(text, "issue5", "new\n").unwrap();
        assert_eq!(
            replaced,
            "# Benchmarks\n\nhand-written\n<!-- bench:issue5:start -->\nnew\n\
             <!-- bench:issue5:end -->\n\n## later, by hand\n<!-- bench:other:start -->\nx\n\
             <!-- bench:other:end -->\n"
        );
        // Written twice, the same: nothing accumulates.
        assert_eq!(replace_block(&replaced, "issue5", "new\n").unwrap(), replaced);
        assert_eq!(replace_block(text, "missing", "new\n"), None);
        assert_eq!(replace_block("<!-- bench:issue5:start -->\nno end\n", "issue5", "x\n"), None);
    }

    #[test]
    fn write_block_changes_only_the_block_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("BENCHMARKS.md");
        std::fs::write(&path, "a\n<!-- bench:q:start -->\nb\n<!-- bench:q:end -->\nc\n").unwrap();
        write_block(&path, "q", "B\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "a\n<!-- bench:q:start -->\nB\n<!-- bench:q:end -->\nc\n"
        );
        let err = write_block(&path, "nope", "B\n").unwrap_err();
        assert!(format!("{err:#}").contains("bench:nope:start"), "{err:#}");
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(grouped(Some(1_234_567.891), 2), "1,234,567.89");
        assert_eq!(grouped(Some(999.0), 0), "999");
        assert_eq!(grouped(Some(1000.0), 0), "1,000");
        assert_eq!(grouped(Some(-12_345.5), 1), "-12,345.5");
        assert_eq!(grouped(Some(0.004), 2), "0.00");
        assert_eq!(grouped(None, 2), "-");
        assert_eq!(float(25.0), "25.0");
        assert_eq!(float(0.5), "0.5");
    }

    #[test]
    fn days_since_the_epoch_are_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_790), (2026, 12, 3));
    }
}
