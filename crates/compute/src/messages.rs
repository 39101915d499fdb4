//! Messages between a process's controller-facing core (`core/`, on the tokio thread) and its timely
//! workers (`worker.rs`).
//!
//! **What this is.** [`ToWorker`]: everything a worker is told, in one ordered channel per worker, so a
//! dataflow's `Build` always precedes the storage data fed into it and its `Drop`. [`FromWorker`]: what
//! workers report back (frontiers, peek answers, sink output), merged per process by the core.
//! [`WorkerTx`]: the sending side, which wakes the worker thread after each send. [`FeedBudget`]: how a
//! storage feed waits for the workers to ingest what it sent before it reads more (backpressure).
//!
//! **What this is not.** Not the wire protocol (that is `protocol::ComputeCommand`/`ComputeResponse`).
//!
//! **Invariants.** A feed has at most [`FeedBudget`]'s limit of updates (plus one listen event) sent but not
//! yet ingested: each `SourceUpdates` carries a [`FeedCredit`] that returns its updates to the budget when
//! the message is dropped, whether the worker ingested it or threw it away. Every local worker receives the
//! same sequence of `Build`/`Schedule`/`Drop*` messages, so all workers of all processes build the same
//! dataflows in the same order. Dataflow keys and peek sequence numbers are never reused within a process,
//! and every report of a worker names the dataflow (or peek routing) it comes from, so a report that was
//! in flight when its dataflow was dropped and rebuilt under the same export ids never reaches the new one.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{SendError, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;

use frontiers::Antichain;
use protocol::RowSetFinishing;
use protocol::{DataflowDescription, GlobalId, MapFilterProject, PeekId, PeekResponse, Row};

use crate::render::{Diff, Time};

/// Identifies a dataflow within one process (assigned in command order, never reused). A rebuilt
/// dataflow (reconciliation after a reconnect) gets a new key under the same export ids, so workers'
/// reports carry the key and the core ignores those of a dataflow it has dropped.
pub(crate) type DataflowKey = u64;

/// Numbers the peeks the core routes to workers (never reused within a process).
pub(crate) type PeekSeq = u64;

/// A message to one worker.
#[derive(Debug)]
pub(crate) enum ToWorker {
    /// Build a dataflow (it does no work until scheduled).
    Build {
        /// Its key.
        key: DataflowKey,
        /// What to build (validated, imports resolved by the core).
        desc: Arc<DataflowDescription<Time>>,
    },
    /// Let a dataflow run.
    Schedule {
        /// The dataflow.
        key: DataflowKey,
    },
    /// Allow an index export to compact to `frontier` (never empty: dropping is `DropExport`).
    AllowCompaction {
        /// The index.
        id: GlobalId,
        /// The compaction frontier.
        frontier: Antichain<Time>,
    },
    /// Forget an export: its traces or sink output are released.
    DropExport {
        /// The export.
        id: GlobalId,
    },
    /// Tear down a dataflow (all its exports were dropped and no dataflow imports from it any more).
    DropDataflow {
        /// The dataflow.
        key: DataflowKey,
    },
    /// Answer (this worker's part of) a peek.
    Peek(WorkerPeek),
    /// Forget a pending peek.
    CancelPeek {
        /// The peek.
        uuid: PeekId,
    },
    /// Updates of a storage import, read by the process's listen, for rows this worker owns.
    SourceUpdates {
        /// The dataflow.
        key: DataflowKey,
        /// The storage collection.
        import: GlobalId,
        /// The updates.
        updates: Vec<(Row, Time, Diff)>,
        /// Returns the updates to their feed's budget when the message is dropped.
        credit: FeedCredit,
    },
    /// The storage import's listen reached `frontier`.
    SourceProgress {
        /// The dataflow.
        key: DataflowKey,
        /// The storage collection.
        import: GlobalId,
        /// The new frontier (empty: closed).
        frontier: Antichain<Time>,
    },
    /// Stop: drop every dataflow and return.
    Shutdown,
}

/// A peek as a worker sees it.
#[derive(Debug, Clone)]
pub(crate) struct WorkerPeek {
    /// The peek.
    pub uuid: PeekId,
    /// Which routing of the peek this is: the core numbers each peek it routes, so an answer to a
    /// cancelled earlier peek with the same uuid (a controller's replay re-sends pending peeks) is never
    /// taken for the answer to the new one.
    pub seq: PeekSeq,
    /// The index read.
    pub id: GlobalId,
    /// The time read.
    pub timestamp: Time,
    /// Keys to look up (only those this worker owns), or `None` for a full scan.
    pub keys: Option<Vec<Row>>,
    /// Applied to each row.
    pub mfp: MapFilterProject,
    /// Applied (partially) to this worker's result.
    pub finishing: RowSetFinishing,
    /// The result size limit.
    pub max_result_size_bytes: Option<u64>,
}

/// A message from a worker to its process's core.
#[derive(Debug)]
pub(crate) enum FromWorker {
    /// The worker's frontiers of an export changed.
    Frontiers {
        /// The worker (index within the process).
        worker: usize,
        /// The dataflow the export belongs to on this worker.
        dataflow: DataflowKey,
        /// The export.
        id: GlobalId,
        /// Its write frontier on this worker.
        write: Antichain<Time>,
        /// The dataflow's input frontier on this worker.
        input: Antichain<Time>,
    },
    /// The worker's answer to a peek.
    Peek {
        /// The worker (index within the process).
        worker: usize,
        /// The peek.
        uuid: PeekId,
        /// The routing it answers ([`WorkerPeek::seq`]).
        seq: PeekSeq,
        /// Its part of the answer.
        response: PeekResponse,
    },
    /// Output of a sink on this worker: updates (and errors) at times not beyond `frontier`, all of them
    /// up to `frontier` (exclusive) having been sent.
    Sink {
        /// The worker (index within the process).
        worker: usize,
        /// The dataflow the sink belongs to on this worker.
        dataflow: DataflowKey,
        /// The sink export.
        id: GlobalId,
        /// Consolidated row updates.
        updates: Vec<(Row, Time, Diff)>,
        /// Error updates.
        errors: Vec<(Row, Time, Diff)>,
        /// The sink's input frontier on this worker.
        frontier: Antichain<Time>,
    },
    /// The worker panicked and is gone: the process can no longer make progress and stops.
    Failed {
        /// The worker (index within the process).
        worker: usize,
        /// The panic's message.
        message: String,
    },
    /// Timely itself failed: it did not start (the cluster's processes did not all connect), or a worker
    /// thread ended without being told to, or its communication threads died. The process stops.
    TimelyFailed {
        /// What happened.
        message: String,
    },
}

/// The sending side of one worker's channel; wakes the worker after each message.
#[derive(Debug, Clone)]
pub(crate) struct WorkerTx {
    tx: Sender<ToWorker>,
    thread: Arc<OnceLock<Thread>>,
}

impl WorkerTx {
    /// A sender whose worker registers its thread in `thread` when it starts.
    pub fn new(tx: Sender<ToWorker>, thread: Arc<OnceLock<Thread>>) -> Self {
        WorkerTx { tx, thread }
    }

    /// Sends and wakes the worker. Fails only when the worker has exited.
    pub fn send(&self, message: ToWorker) -> Result<(), SendError<ToWorker>> {
        self.tx.send(message)?;
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
        Ok(())
    }
}

/// The updates one storage feed has sent to workers that they have not ingested yet.
///
/// Without it a feed reads its listen as fast as storage answers, and a worker busy arranging a snapshot
/// lets a whole snapshot pile up in its channel (at hydration, most of a dataflow's transient memory
/// after its arrangements). With it a feed waits while its updates in flight exceed a limit, so what is
/// in flight is bounded per feed, and the listen's own pull-based backpressure reaches storage.
#[derive(Debug, Default)]
pub(crate) struct FeedBudget {
    outstanding: AtomicUsize,
    ingested: tokio::sync::Notify,
}

impl FeedBudget {
    /// Counts `updates` as in flight until the returned credit is dropped.
    pub fn take(self: &Arc<Self>, updates: usize) -> FeedCredit {
        self.outstanding.fetch_add(updates, Ordering::AcqRel);
        FeedCredit { budget: Arc::clone(self), updates }
    }

    /// The updates in flight.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Returns once at most `limit` updates are in flight.
    pub async fn wait_until_at_most(&self, limit: usize) {
        // A credit dropped between the check and the wait leaves a permit in the `Notify`, so the wait
        // cannot miss it.
        while self.outstanding() > limit {
            self.ingested.notified().await;
        }
    }
}

/// Updates counted in flight in a [`FeedBudget`]; dropping it returns them.
pub(crate) struct FeedCredit {
    budget: Arc<FeedBudget>,
    updates: usize,
}

impl fmt::Debug for FeedCredit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeedCredit").field("updates", &self.updates).finish()
    }
}

impl Drop for FeedCredit {
    fn drop(&mut self) {
        let before = self.budget.outstanding.fetch_sub(self.updates, Ordering::AcqRel);
        assert!(before >= self.updates, "a feed's credits return no more than they took");
        self.budget.ingested.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_feed_waits_until_the_workers_drop_enough_credits() {
        let budget = Arc::new(FeedBudget::default());
        let first = budget.take(10);
        let second = budget.take(10);
        assert_eq!(budget.outstanding(), 20);
        let waiting = tokio::spawn({
            let budget = Arc::clone(&budget);
            async move { budget.wait_until_at_most(10).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "20 updates in flight is over the limit of 10");
        // Dropped on another thread, as a worker does.
        std::thread::spawn(move || drop(first)).join().expect("dropping thread");
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the wait ends once 10 are in flight")
            .expect("the waiting task");
        drop(second);
        assert_eq!(budget.outstanding(), 0);
        budget.wait_until_at_most(0).await;
    }
}
