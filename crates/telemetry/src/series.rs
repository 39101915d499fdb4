//! [`Series`]: one labelled series, removed from its family when dropped.

use std::fmt;
use std::ops::Deref;

use prometheus::core::{MetricVec, MetricVecBuilder};

/// One series of a labelled metric family (an `IntCounterVec`, `HistogramVec`, ...): a handle to update it,
/// and the label values to remove it with when dropped.
///
/// Make one when the object it describes appears (a replica is added, a collection created) and keep it
/// with the object; updates go through the handle ([`Deref`] to the metric), which costs what the metric's
/// own update costs (an atomic operation): no label formatting, no registry lock.
///
/// **Invariant:** dropping it removes its label values from the family, once. Two `Series` of the same label
/// values would remove each other's: an owner makes at most one per label values at a time.
///
/// # Examples
/// ```
/// use prometheus::{IntGaugeVec, Opts, Registry};
/// let registry = Registry::new();
/// let family = IntGaugeVec::new(Opts::new("things", "Things per owner."), &["owner"]).unwrap();
/// registry.register(Box::new(family.clone())).unwrap();
/// let series = telemetry::Series::new(&family, &["a"]);
/// series.set(3);
/// assert!(telemetry::encode_text(&registry).contains("things{owner=\"a\"} 3"));
/// drop(series);
/// assert!(!telemetry::encode_text(&registry).contains("owner=\"a\""));
/// ```
pub struct Series<B: MetricVecBuilder> {
    family: MetricVec<B>,
    labels: Box<[String]>,
    metric: B::M,
}

impl<B: MetricVecBuilder> Series<B> {
    /// The series of `family` with `labels` (in the order the family declared its label names), created
    /// if it does not exist yet.
    ///
    /// # Panics
    /// If the number of values differs from the family's label names: a bug at the call site, where both
    /// are written down.
    pub fn new(family: &MetricVec<B>, labels: &[&str]) -> Self {
        let metric = family
            .get_metric_with_label_values(labels)
            .unwrap_or_else(|e| panic!("labels {labels:?} do not fit their metric family: {e}"));
        Series { family: family.clone(), labels: labels.iter().map(|l| (*l).to_owned()).collect(), metric }
    }

    /// The label values, in the family's order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }
}

impl<B: MetricVecBuilder> Deref for Series<B> {
    type Target = B::M;

    fn deref(&self) -> &B::M {
        &self.metric
    }
}

impl<B: MetricVecBuilder> Drop for Series<B> {
    fn drop(&mut self) {
        let labels: Vec<&str> = self.labels.iter().map(String::as_str).collect();
        // Already gone only if someone else removed it, which an owner of the series never does.
        let _ = self.family.remove_label_values(&labels);
    }
}

impl<B: MetricVecBuilder> fmt::Debug for Series<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Series").field("labels", &self.labels).finish_non_exhaustive()
    }
}
