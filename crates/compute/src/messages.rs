//! Messages between a process's controller-facing core (`core.rs`, on the tokio thread) and its timely
//! workers (`worker.rs`).
//!
//! **What this is.** [`ToWorker`]: everything a worker is told, in one ordered channel per worker, so a
//! dataflow's `Build` always precedes the storage data fed into it and its `Drop`. [`FromWorker`]: what
//! workers report back (frontiers, peek answers, sink output), merged per process by the core.
//! [`WorkerTx`]: the sending side, which wakes the worker thread after each send.
//!
//! **What this is not.** Not the wire protocol (that is `protocol::ComputeCommand`/`ComputeResponse`).
//!
//! **Invariants.** Every local worker receives the same sequence of `Build`/`Schedule`/`Drop*` messages,
//! so all workers of all processes build the same dataflows in the same order. Dataflow keys are never
//! reused within a process.

use std::sync::mpsc::{SendError, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;

use frontiers::Antichain;
use protocol::RowSetFinishing;
use protocol::{
    ComputeParameters, DataflowDescription, GlobalId, MapFilterProject, PeekId, PeekResponse, Row,
};

use crate::render::{Diff, Time};

/// Identifies a dataflow within one process (assigned in command order, never reused).
pub(crate) type DataflowKey = u64;

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
    /// New tunables.
    Configure(ComputeParameters),
    /// Stop: drop every dataflow and return.
    Shutdown,
}

/// A peek as a worker sees it.
#[derive(Debug, Clone)]
pub(crate) struct WorkerPeek {
    /// The peek.
    pub uuid: PeekId,
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
        /// Its part of the answer.
        response: PeekResponse,
    },
    /// Output of a sink on this worker: updates (and errors) at times not beyond `frontier`, all of them
    /// up to `frontier` (exclusive) having been sent.
    Sink {
        /// The worker (index within the process).
        worker: usize,
        /// The sink export.
        id: GlobalId,
        /// Consolidated row updates.
        updates: Vec<(Row, Time, Diff)>,
        /// Error updates.
        errors: Vec<(Row, Time, Diff)>,
        /// The sink's input frontier on this worker.
        frontier: Antichain<Time>,
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
