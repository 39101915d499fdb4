//! The text exposition of a registry, and a reader of it for tests and tools.

use std::collections::BTreeMap;

use prometheus::{Encoder, Registry, TextEncoder};

/// Every metric family of `registry` in Prometheus' text exposition format (version 0.0.4), as
/// `promtool check metrics` reads it. Families without any series are left out.
///
/// # Examples
/// ```
/// let registry = prometheus::Registry::new();
/// let counter = prometheus::IntCounter::new("answers_total", "Answers given.").unwrap();
/// registry.register(Box::new(counter.clone())).unwrap();
/// counter.inc_by(42);
/// let text = telemetry::encode_text(&registry);
/// assert!(text.contains("# TYPE answers_total counter\nanswers_total 42\n"));
/// ```
pub fn encode_text(registry: &Registry) -> String {
    let mut buffer = Vec::new();
    // Encoding into memory fails only on an invalid family, which registration already refused.
    TextEncoder::new()
        .encode(&registry.gather(), &mut buffer)
        .expect("registered metric families always encode");
    String::from_utf8(buffer).expect("the text exposition is UTF-8")
}

/// One sample of a text exposition: a series' name (with its `_bucket`, `_sum` or `_count` suffix for a
/// histogram), its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The name.
    pub name: String,
    /// The labels, by name.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// Whether the sample is named `name` and has every label of `labels`.
    pub fn is(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.name == name && labels.iter().all(|(k, v)| self.labels.get(*k).map(String::as_str) == Some(*v))
    }
}

/// The samples of a text exposition as [`encode_text`] writes it (comments skipped), for tests and tools
/// that read an endpoint: a reader of what this crate writes, not of every exposition (no escaped quotes,
/// commas or braces in label values, no timestamps).
///
/// # Examples
/// ```
/// let text = "# TYPE t counter\nt{a=\"x\",b=\"y\"} 3\nu 1.5\n";
/// let samples = telemetry::parse_text(text).unwrap();
/// assert!(samples[0].is("t", &[("b", "y")]));
/// assert_eq!(samples[1].value, 1.5);
/// ```
pub fn parse_text(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| format!("no value: {line}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => {
                (name, labels.strip_suffix('}').ok_or_else(|| format!("unclosed labels: {line}"))?)
            }
            None => (series, ""),
        };
        let mut parsed = BTreeMap::new();
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| format!("bad label {pair}: {line}"))?;
            let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
            parsed
                .insert(key.to_string(), value.ok_or_else(|| format!("unquoted label: {line}"))?.to_string());
        }
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other.parse().map_err(|_| format!("bad value: {line}"))?,
        };
        samples.push(Sample { name: name.to_string(), labels: parsed, value });
    }
    Ok(samples)
}

/// The value of the one sample named `name` with `labels` among `samples`; `None` if there is none.
///
/// # Panics
/// If several samples match: the caller meant one series and named too few labels.
pub fn sample_value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut matching = samples.iter().filter(|s| s.is(name, labels));
    let first = matching.next()?;
    assert!(matching.next().is_none(), "{name} {labels:?} matches several samples");
    Some(first.value)
}
