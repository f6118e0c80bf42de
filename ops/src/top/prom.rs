//! A small, tolerant reader of the Prometheus text exposition format, for `edgerelay top`.
//! Sans-IO: text in, samples out. Comments, blank lines and lines it cannot read are skipped
//! (and counted), never an error: a relay newer or older than this binary still shows what
//! both know.

use std::collections::BTreeMap;

/// One sample line: `name{label="value",…} value [timestamp]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Every sample of one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Samples {
    samples: Vec<Sample>,
    /// Lines that were neither a comment, blank, nor a readable sample.
    pub skipped: usize,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

impl Samples {
    /// Every sample of metric `name` (the full sample name, e.g. `…_total`).
    pub fn iter<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The sum over every label set of `name`; `None` when the relay exports no such sample.
    pub fn sum(&self, name: &str) -> Option<f64> {
        self.iter(name).map(|s| s.value).fold(None, |acc, v| Some(acc.unwrap_or(0.0) + v))
    }

    /// Sums of `name` grouped by the value of `label` (samples without it are left out).
    pub fn sum_by(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.iter(name) {
            if let Some(v) = s.label(label) {
                *out.entry(v.to_owned()).or_insert(0.0) += s.value;
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Reads a whole exposition.
pub fn parse(text: &str) -> Samples {
    let mut out = Samples::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Some(s) => out.samples.push(s),
            None => out.skipped += 1,
        }
    }
    out
}

/// One sample line, or `None` if it is not one.
fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))?;
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    // Value, then an optional timestamp.
    let mut fields = rest.split_ascii_whitespace();
    let value = parse_value(fields.next()?)?;
    Some(Sample { name: name.to_owned(), labels, value })
}

/// Reads `k="v",…}` and returns the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim();
        if key.is_empty() {
            return None;
        }
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        s = s[end + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        }
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        s => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP edgerelay_refusals Events and requests refused
# TYPE edgerelay_refusals counter
edgerelay_refusals_total{protocol="quic",code="unauthorized",reason="token_expired"} 3
edgerelay_refusals_total{protocol="https",code="unauthorized",reason="bad_signature"} 2
edgerelay_refusals_total{protocol="https",code="rate_limited",reason="per_identity"} 1
edgerelay_accepted_events_total{protocol="https"} 10
edgerelay_accepted_events_total{protocol="quic"} 5.5e1
edgerelay_queue_depth_events 7
edgerelay_ingest_to_ack_seconds_bucket{le="+Inf",protocol="https"} 10
edgerelay_weird{msg="a \"quoted\" \\ back,slash}",x="y"} 1 1700000000000
this is not a sample
edgerelay_broken{unterminated="x 1
# EOF
"#;

    #[test]
    fn sums_over_label_sets() {
        let s = parse(TEXT);
        assert_eq!(s.sum("edgerelay_accepted_events_total"), Some(65.0));
        assert_eq!(s.sum("edgerelay_refusals_total"), Some(6.0));
        assert_eq!(s.sum("edgerelay_queue_depth_events"), Some(7.0));
        assert_eq!(s.sum("edgerelay_nats_rtt_seconds"), None, "absent is not zero");
    }

    #[test]
    fn groups_by_a_label() {
        let s = parse(TEXT);
        let by_code = s.sum_by("edgerelay_refusals_total", "code");
        assert_eq!(by_code.get("unauthorized"), Some(&5.0));
        assert_eq!(by_code.get("rate_limited"), Some(&1.0));
        assert_eq!(by_code.len(), 2);
    }

    #[test]
    fn reads_escapes_inf_and_timestamps() {
        let s = parse(TEXT);
        let weird: Vec<_> = s.iter("edgerelay_weird").collect();
        assert_eq!(weird.len(), 1);
        assert_eq!(weird[0].label("msg"), Some(r#"a "quoted" \ back,slash}"#));
        assert_eq!(weird[0].label("x"), Some("y"));
        assert_eq!(weird[0].value, 1.0);
        let inf: Vec<_> = s.iter("edgerelay_ingest_to_ack_seconds_bucket").collect();
        assert_eq!(inf[0].label("le"), Some("+Inf"));
    }

    #[test]
    fn skips_what_it_cannot_read() {
        let s = parse(TEXT);
        assert_eq!(s.skipped, 2);
        assert_eq!(s.len(), 8);
        for junk in ["", "{}", "1 2", "name", "name{a=\"b\"}", "name{=\"b\"} 1", "name nope"] {
            assert!(parse(junk).is_empty(), "{junk:?}");
        }
    }

    #[test]
    fn reads_what_the_relay_serves() {
        let m = edgerelay::metrics::Metrics::new();
        let _ = m.accepted.get_or_create(&edgerelay::metrics::ProtocolLabels {
            protocol: edgerelay::metrics::Protocol::H3,
        });
        m.queue_depth.set(3);
        let s = parse(&m.render());
        assert_eq!(s.skipped, 0);
        assert_eq!(s.sum("edgerelay_queue_depth_events"), Some(3.0));
        assert_eq!(s.sum_by("edgerelay_accepted_events_total", "protocol").get("h3"), Some(&0.0));
    }
}
