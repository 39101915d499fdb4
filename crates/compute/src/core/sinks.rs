//! Sink merging: the process's workers' output of a subscribe, materialized view or copy-to, merged into
//! one stream of completed time ranges per export.
//!
//! **What this is.** [`SinkMerge`] holds, per export, what the local workers reported and not yet
//! emitted, and each worker's sink frontier. [`Core::merge_sink`] takes in one worker's report; once the
//! meet of the workers' frontiers passes the merge's `lower`, the range `[lower, meet)` is complete and
//! goes out, consolidated: a subscribe batch to the connection (an error in the range ends the
//! subscribe with an error batch), a materialized view's batch to its appender (`appender.rs`; every
//! update is funnelled to global worker 0, so only its process has one), a copy-to's readiness
//! (`copy_to.rs`). Sinks of a connection that is gone (none is active, or a new one is replaying) stop:
//! their output has no consumer, and reconciliation rebuilds them.
//!
//! **What this is not.** No timely code (the workers' sink operator produces the reports), no storage
//! writes (the appender's) and no files (the copy-to's).
//!
//! **Invariants.** A completed range is emitted once and ranges follow each other (`lower` moves only
//! forward, to the meet); nothing is emitted for a merge that is `done`, and a subscribe sends nothing
//! after the batch with the empty upper or an error.
//!
//! **Tests.** Through the socket, in `tests/it` (`exports.rs`: subscribes against the reference, views
//! written by two replicas; `reconnect.rs`: sinks rebuilt on reconnect).

use frontiers::{Antichain, PartialOrder};
use protocol::{ComputeResponse, GlobalId, Row, SubscribeBatch, SubscribeResponse};
use tracing::debug;

use super::appender::MvBatch;
use super::catalog::ExportKind;
use super::{Core, Stage};
use crate::render::{Diff, Time, error_message};

/// Per-sink merging of the local workers' output.
#[derive(Debug, Default)]
pub(super) struct SinkMerge {
    /// Per local worker: its sink frontier.
    worker_frontiers: Vec<Antichain<Time>>,
    /// Updates not yet emitted (all but copy-tos).
    updates: Vec<(Row, Time, Diff)>,
    /// Errors not yet emitted.
    errors: Vec<(Row, Time, Diff)>,
    /// Copy-to: rows per local worker.
    pub per_worker: Vec<Vec<(Row, Time, Diff)>>,
    /// Where the next range starts.
    pub lower: Antichain<Time>,
    /// Nothing more is emitted (it ended, failed, or its connection went).
    pub done: bool,
    /// Copy-to: the rows are complete and wait for `AllowWrites`.
    pub ready: bool,
    /// Copy-to: its files are being written off the core's thread (`done` is set too); the answer
    /// comes with `CoreEvent::CopyToWritten`, or as `Dropped` if the copy-to is dropped first.
    pub writing: bool,
}

/// A range `[lower, upper)` every local worker's sink has passed, with its updates and errors,
/// consolidated.
struct CompletedRange {
    lower: Antichain<Time>,
    upper: Antichain<Time>,
    updates: Vec<(Row, Time, Diff)>,
    errors: Vec<(Row, Time, Diff)>,
}

impl SinkMerge {
    /// A merge for a sink of a dataflow with the given as-of, over `workers` local workers.
    pub fn new(as_of: Time, workers: usize) -> Self {
        SinkMerge {
            worker_frontiers: vec![Antichain::from_elem(0); workers],
            per_worker: vec![Vec::new(); workers],
            lower: Antichain::from_elem(as_of),
            ..SinkMerge::default()
        }
    }

    /// Takes in a report of local worker `worker` (a copy-to's rows are kept per worker); returns the
    /// range it completed, if the meet of the workers' frontiers passed `lower`.
    fn take_in(
        &mut self,
        worker: usize,
        updates: Vec<(Row, Time, Diff)>,
        errors: Vec<(Row, Time, Diff)>,
        frontier: Antichain<Time>,
        per_worker: bool,
    ) -> Option<CompletedRange> {
        if per_worker {
            self.per_worker[worker].extend(updates);
        } else {
            self.updates.extend(updates);
        }
        self.errors.extend(errors);
        self.worker_frontiers[worker] = frontier;
        let meet = frontiers::antichain::meet_all(self.worker_frontiers.iter().map(|f| f.borrow()));
        if !PartialOrder::less_than(&self.lower, &meet) {
            return None;
        }
        let lower = std::mem::replace(&mut self.lower, meet.clone());
        let upper = meet;
        let (mut updates, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.updates).into_iter().partition(|(_, t, _)| !upper.less_equal(t));
        self.updates = rest;
        let (mut errors, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.errors).into_iter().partition(|(_, t, _)| !upper.less_equal(t));
        self.errors = rest;
        differential_dataflow::consolidation::consolidate_updates(&mut updates);
        differential_dataflow::consolidation::consolidate_updates(&mut errors);
        Some(CompletedRange { lower, upper, updates, errors })
    }
}

/// The subscribe batch of a completed range: the updates sorted by time, or, if the range has an error,
/// the error batch that ends the subscribe. Marks the merge done when the batch is the last.
fn subscribe_batch(sink: &mut SinkMerge, range: CompletedRange) -> SubscribeBatch {
    let CompletedRange { lower, upper, updates, errors } = range;
    if let Some((error, _, _)) = errors.first() {
        sink.done = true;
        return SubscribeBatch { lower, upper: Antichain::new(), updates: Err(error_message(error)) };
    }
    if upper.is_empty() {
        sink.done = true;
    }
    let mut updates: Vec<(Time, Row, Diff)> = updates.into_iter().map(|(r, t, d)| (t, r, d)).collect();
    updates.sort();
    SubscribeBatch { lower, upper, updates: Ok(updates) }
}

impl Core {
    /// Takes in local worker `worker`'s sink output for export `id` and emits the range it completed.
    pub(super) fn merge_sink(
        &mut self,
        worker: usize,
        id: GlobalId,
        updates: Vec<(Row, Time, Diff)>,
        errors: Vec<(Row, Time, Diff)>,
        frontier: Antichain<Time>,
    ) {
        let process = self.topology.process;
        let normal = self.active.as_ref().is_some_and(|c| c.stage == Stage::Normal);
        let Some(collection) = self.collections.get_mut(&id) else { return };
        let sink = &mut collection.sink;
        if sink.done {
            return;
        }
        let copy_to = matches!(collection.kind, ExportKind::CopyTo { .. });
        if !normal && (copy_to || matches!(collection.kind, ExportKind::Subscribe)) {
            // Its connection is gone (none is active, or a new one is replaying its history): its
            // output has no consumer any more, and reconciliation rebuilds it from the replay.
            debug!(%id, "the connection of a subscribe or copy-to is gone; it stops");
            sink.done = true;
            return;
        }
        let Some(range) = sink.take_in(worker, updates, errors, frontier, copy_to) else { return };
        match &collection.kind {
            ExportKind::Index => {}
            ExportKind::Subscribe => {
                let batch = subscribe_batch(sink, range);
                self.send(ComputeResponse::SubscribeResponse {
                    id,
                    response: SubscribeResponse::Batch(batch),
                });
            }
            ExportKind::MaterializedView { appender } => {
                if let Some(appender) = appender {
                    // Fails only once the appender stopped, and it reported why (`export_failed`).
                    let _ = appender.send(MvBatch {
                        lower: range.lower,
                        upper: range.upper,
                        updates: range.updates,
                        error: range.errors.first().map(|(error, _, _)| error_message(error)),
                    });
                } else {
                    debug_assert!(
                        process != 0 || range.updates.is_empty(),
                        "materialized views are appended by process 0"
                    );
                }
            }
            ExportKind::CopyTo { .. } => self.copy_to_progressed(id, &range.upper, &range.errors),
        }
    }
}
