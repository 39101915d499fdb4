//! [`Series`]: one labelled series, removed from its family when dropped.

use std::fmt;
use std::ops::Deref;

use prometheus::core::{MetricVec, MetricVecBuilder};

/// A labelled metric family: what a [`Series`] belongs to. Implemented for every `MetricVec`
/// (`IntCounterVec`, `IntGaugeVec`, `GaugeVec`, `HistogramVec`, ...), so that a series' type can be named
/// after its family: `Series<IntCounterVec>`.
pub trait Family: Clone {
    /// The metric of one series.
    type Metric;

    /// The series with `labels`, created if it does not exist yet.
    fn series(&self, labels: &[&str]) -> prometheus::Result<Self::Metric>;

    /// Removes the series with `labels`.
    fn remove(&self, labels: &[&str]) -> prometheus::Result<()>;
}

impl<B: MetricVecBuilder> Family for MetricVec<B> {
    type Metric = B::M;

    fn series(&self, labels: &[&str]) -> prometheus::Result<B::M> {
        self.get_metric_with_label_values(labels)
    }

    fn remove(&self, labels: &[&str]) -> prometheus::Result<()> {
        self.remove_label_values(labels)
    }
}

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
pub struct Series<F: Family> {
    family: F,
    labels: Box<[String]>,
    metric: F::Metric,
}

impl<F: Family> Series<F> {
    /// The series of `family` with `labels` (in the order the family declared its label names), created
    /// if it does not exist yet.
    ///
    /// # Panics
    /// If the number of values differs from the family's label names: a bug at the call site, where both
    /// are written down.
    pub fn new(family: &F, labels: &[&str]) -> Self {
        let metric = family
            .series(labels)
            .unwrap_or_else(|e| panic!("labels {labels:?} do not fit their metric family: {e}"));
        Series { family: family.clone(), labels: labels.iter().map(|l| (*l).to_owned()).collect(), metric }
    }

    /// The label values, in the family's order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }
}

impl<F: Family> Deref for Series<F> {
    type Target = F::Metric;

    fn deref(&self) -> &F::Metric {
        &self.metric
    }
}

impl<F: Family> Drop for Series<F> {
    fn drop(&mut self) {
        let labels: Vec<&str> = self.labels.iter().map(String::as_str).collect();
        // Already gone only if someone else removed it, which an owner of the series never does.
        let _ = self.family.remove(&labels);
    }
}

impl<F: Family> fmt::Debug for Series<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Series").field("labels", &self.labels).finish_non_exhaustive()
    }
}
