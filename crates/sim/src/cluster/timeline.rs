//! The cluster scenario's timeline: what it sampled once a second over the timed run (peek latency, rows
//! written, each collection's wall-clock lag, each replica's status) and when it injected each fault.
//! `--report DIR` draws it (`html.rs`); `report.json` in that directory carries it too.
//!
//! **Not here:** sampling itself (the scenario's `sample` task asks the controller, see `tasks.rs`) and
//! any check: the timeline only records.
//! **Tests:** `html.rs`'s tests and `sim`'s `tests/it/observability.rs` draw timelines.

use std::collections::BTreeMap;

use serde::Serialize;

/// A fault the scenario injected, marked on the time axis of every chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Every process of a replica killed with SIGKILL (the orchestrator restarts it).
    Kill,
    /// A dataflow dropped and created again under a new id.
    Recreation,
    /// A fresh replica added (and later dropped): the rehydration baseline.
    FreshReplica,
    /// The consensus store (PostgreSQL) stopped, until the mark's `until_s` (`outage.rs`).
    ConsensusOutage,
    /// The blob store (`moto_server`) paused, until the mark's `until_s`.
    BlobOutage,
    /// A replica's links taken down (`--netns`, `netns.rs`), until the mark's `until_s`.
    LinkCut,
}

impl FaultKind {
    /// A short name for a chart's label.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Recreation => "recreate",
            FaultKind::FreshReplica => "fresh replica",
            FaultKind::ConsensusOutage => "consensus outage",
            FaultKind::BlobOutage => "blob outage",
            FaultKind::LinkCut => "link cut",
        }
    }
}

/// One injected fault.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultMark {
    /// Seconds into the timed run.
    pub at_s: f64,
    /// What kind.
    pub kind: FaultKind,
    /// What it hit (a replica, a dataflow, a store).
    pub target: String,
    /// When a fault that lasts (an outage) ended, seconds into the timed run; `None` for an instant one
    /// (or one still going on).
    pub until_s: Option<f64>,
}

/// What was sampled at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineSample {
    /// Seconds into the timed run.
    pub at_s: f64,
    /// Median latency of the peeks of the last second, milliseconds (`None`: none finished).
    pub peek_p50_ms: Option<f64>,
    /// Their 99th percentile.
    pub peek_p99_ms: Option<f64>,
    /// Table rows written per second since the previous sample.
    pub rows_per_s: f64,
    /// Per live collection, the largest wall-clock lag over the replicas that reported its upper on their
    /// current connection, seconds (the controller's `wallclock_lag`).
    pub lag_s: BTreeMap<String, f64>,
    /// Per replica, its status as the controller judges it (`connecting`, `failed`, `hydrating`,
    /// `rehydrating`, `connected`).
    pub status: BTreeMap<String, String>,
}

/// The samples and the faults of a run, in time order.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timeline {
    /// Samples, about one a second.
    pub samples: Vec<TimelineSample>,
    /// Faults, as they were injected.
    pub faults: Vec<FaultMark>,
}

impl Timeline {
    /// Records a sample; samples arrive in time order.
    pub fn sample(&mut self, sample: TimelineSample) {
        debug_assert!(self.samples.last().is_none_or(|last| last.at_s <= sample.at_s), "samples in order");
        self.samples.push(sample);
    }

    /// Marks a fault injected at `at_s`; returns its index (for [`end_fault`](Self::end_fault)).
    pub fn fault(&mut self, at_s: f64, kind: FaultKind, target: impl Into<String>) -> usize {
        self.faults.push(FaultMark { at_s, kind, target: target.into(), until_s: None });
        self.faults.len() - 1
    }

    /// Marks the fault at `index` (one that lasts) as ended at `until_s`.
    pub fn end_fault(&mut self, index: usize, until_s: f64) {
        let mark = &mut self.faults[index];
        assert!(mark.until_s.is_none() && until_s >= mark.at_s, "a fault ends once, after it began");
        mark.until_s = Some(until_s);
    }

    /// The last time anything happened, in seconds (at least 1, so an axis is never empty).
    pub fn end_s(&self) -> f64 {
        let sampled = self.samples.last().map_or(0.0, |s| s.at_s);
        let faulted = self.faults.iter().map(|f| f.until_s.unwrap_or(f.at_s)).fold(0.0, f64::max);
        sampled.max(faulted).max(1.0)
    }
}
