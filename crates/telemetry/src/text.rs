//! The text exposition of a registry.

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
