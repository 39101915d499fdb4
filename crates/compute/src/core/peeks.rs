//! Peeks: routing a peek to the workers that hold its answer, or to storage, and merging their parts
//! into the one answer the controller gets.
//!
//! **What this is.** An index peek goes to the local workers that may own its rows: all of them, or,
//! with literal constraints, the owners of the keys (`key_owner`; one worker still checks errors and
//! waits for the time if no key is owned here). Each routing has a [`PeekSeq`] the workers' answers
//! carry; the answer is the union of the parts of the workers it was routed to, finished (order, limit,
//! offset, projection, size limit) once all are in. A storage peek is read by process 0 alone (the whole
//! snapshot is the replica's answer; the others answer with no rows), in a task that reports back with
//! `CoreEvent::StoragePeek`. A peek of an index whose dataflow stopped, of an unknown id, of something
//! that is not an index, or before the index's since is answered with an error at once.
//!
//! **What this is not.** No timely code: the workers read their arrangements (`worker.rs`). The peek's
//! finishing is `worker::finish_rows`, shared with the workers.
//!
//! **Invariants.** Each peek is answered exactly once per connection: on a new connection pending peeks
//! are forgotten (cancelled in the workers; the controller re-sends what it wants), and an answer to an
//! earlier routing of the same uuid is recognised by its sequence number and ignored. A uuid pending is
//! refused, not routed twice.
//!
//! **Tests.** Through the socket, in `tests/it` (`bad_input.rs`: peeks of unknown ids, before the since,
//! over the size limit; `operators.rs` and `sqlite.rs`: answers against the references; `limits.rs`:
//! results over the frame limit, a failing import; `reconnect.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use protocol::{ComputeResponse, GlobalId, Peek, PeekId, PeekResponse, PeekTarget, Row};
use storage::StorageCollections;

use super::catalog::ExportKind;
use super::{Core, CoreEvent};
use crate::messages::{PeekSeq, ToWorker, WorkerPeek};
use crate::render::Diff;
use crate::worker::{finish_rows, key_owner};

/// An index peek routed to some of the local workers, waiting for their parts.
#[derive(Debug)]
pub(super) struct CorePeek {
    /// This routing's number; workers' answers carry it.
    seq: PeekSeq,
    /// The local workers whose part is missing.
    waiting: BTreeSet<usize>,
    /// The parts received.
    parts: Vec<PeekResponse>,
    /// The peek.
    pub peek: Peek,
    /// The result size limit when it was routed.
    max_result_size_bytes: Option<u64>,
}

impl Core {
    /// Routes a peek (see the module doc), or answers it at once with an error.
    pub(super) fn peek(&mut self, peek: Peek) {
        let uuid = peek.uuid;
        if self.peeks.contains_key(&uuid) || self.storage_peeks.contains_key(&uuid) {
            self.reject("Peek", format!("peek {uuid} is already pending"));
            return;
        }
        match peek.target {
            PeekTarget::Storage { id } => self.storage_peek(id, peek),
            PeekTarget::Index { id } => self.index_peek(id, peek),
        }
    }

    /// A peek of storage collection `id`: read by process 0, in a task.
    fn storage_peek(&mut self, id: GlobalId, peek: Peek) {
        let uuid = peek.uuid;
        // A key lookup needs an index's key: a storage collection has none. Every process says so.
        if peek.literal_constraints.is_some() {
            let reason = "literal constraints apply to index peeks only";
            let response = PeekResponse::Error(format!("storage peek of {id}: {reason}"));
            self.send(ComputeResponse::PeekResponse { uuid, response });
            return;
        }
        // The whole snapshot is this replica's answer: only process 0 reads it.
        if self.topology.process != 0 {
            self.send(ComputeResponse::PeekResponse { uuid, response: PeekResponse::Rows(Vec::new()) });
            return;
        }
        let storage = Arc::clone(&self.storage);
        let events = self.events.clone();
        let max = self.parameters.max_result_size_bytes;
        let task = tokio::spawn(async move {
            let response = read_storage_peek(&*storage, id, &peek, max).await;
            let _ = events.send(CoreEvent::StoragePeek { uuid, response });
        });
        self.storage_peeks.insert(uuid, task);
    }

    /// A peek of index `id`: checked, then routed to the local workers that may hold its rows.
    fn index_peek(&mut self, id: GlobalId, peek: Peek) {
        let uuid = peek.uuid;
        if let Err(response) = self.check_index_peek(id, &peek) {
            self.send(ComputeResponse::PeekResponse { uuid, response });
            return;
        }
        let routed = self.route(&peek);
        let max_result_size_bytes = self.parameters.max_result_size_bytes;
        let seq = self.next_peek_seq;
        self.next_peek_seq += 1;
        for (local, keys) in &routed {
            let message = ToWorker::Peek(WorkerPeek {
                uuid,
                seq,
                id,
                timestamp: peek.timestamp,
                keys: keys.clone(),
                mfp: peek.map_filter_project.clone(),
                finishing: peek.finishing.clone(),
                max_result_size_bytes,
            });
            let _ = self.workers[*local].send(message);
        }
        let waiting = routed.keys().copied().collect();
        let pending = CorePeek { seq, waiting, parts: Vec::new(), peek, max_result_size_bytes };
        self.peeks.insert(uuid, pending);
    }

    /// Whether `peek` of `id` can be routed: `id` is a live index whose dataflow did not stop, and the
    /// peek's time is at or beyond its since. `Err` is the answer otherwise.
    fn check_index_peek(&self, id: GlobalId, peek: &Peek) -> Result<(), PeekResponse> {
        let Some(collection) = self.collections.get(&id) else {
            return Err(PeekResponse::Error(format!("unknown index {id}")));
        };
        if !matches!(collection.kind, ExportKind::Index) {
            return Err(PeekResponse::Error(format!("{id} is not an index")));
        }
        if let Some(failed) = self.dataflows.get(&collection.dataflow).and_then(|d| d.failed.clone()) {
            return Err(PeekResponse::Error(failed));
        }
        if !collection.since.less_equal(&peek.timestamp) {
            return Err(PeekResponse::Error(format!(
                "peek of {id} at {} is before its since {:?}",
                peek.timestamp,
                collection.since.elements()
            )));
        }
        Ok(())
    }

    /// The local workers an index peek goes to, each with the keys it looks up (`None`: all rows).
    fn route(&self, peek: &Peek) -> BTreeMap<usize, Option<Vec<Row>>> {
        let mut routed: BTreeMap<usize, Option<Vec<Row>>> = BTreeMap::new();
        match &peek.literal_constraints {
            None => {
                for local in 0..self.topology.workers {
                    routed.insert(local, None);
                }
            }
            Some(keys) => {
                for key in keys {
                    let owner = key_owner(key, self.topology.peers);
                    if let Some(local) = self.topology.local(owner) {
                        routed
                            .entry(local)
                            .or_insert_with(|| Some(Vec::new()))
                            .get_or_insert_default()
                            .push(key.clone());
                    }
                }
                if routed.is_empty() {
                    // No local owner: one worker still checks errors and waits for the time.
                    routed.insert(0, Some(Vec::new()));
                }
            }
        }
        routed
    }

    /// Local worker `worker`'s part of the answer to peek `uuid` (routing `seq`); the answer goes out
    /// once every part is in.
    pub(super) fn peek_answered(
        &mut self,
        worker: usize,
        uuid: PeekId,
        seq: PeekSeq,
        response: PeekResponse,
    ) {
        let Some(pending) = self.peeks.get_mut(&uuid) else { return };
        // An answer to an earlier routing of the same uuid (cancelled by a reconnect) is stale.
        if pending.seq != seq || !pending.waiting.remove(&worker) {
            return;
        }
        pending.parts.push(response);
        if !pending.waiting.is_empty() {
            return;
        }
        let pending = self.peeks.remove(&uuid).expect("present");
        let response = match PeekResponse::union(pending.parts) {
            PeekResponse::Rows(rows) => {
                let rows = rows.into_iter().map(|(row, count)| (row, count.get() as Diff)).collect();
                finish_rows(rows, &pending.peek.finishing, pending.max_result_size_bytes)
            }
            other => other,
        };
        self.send(ComputeResponse::PeekResponse { uuid, response });
    }

    /// A storage peek's task answered (ignored if the peek was cancelled or forgotten since).
    pub(super) fn storage_peek_answered(&mut self, uuid: PeekId, response: PeekResponse) {
        if self.storage_peeks.remove(&uuid).is_some() {
            self.send(ComputeResponse::PeekResponse { uuid, response });
        }
    }

    /// `CancelPeek`: a pending peek is answered `Canceled`; one not pending (answered already) is
    /// ignored.
    pub(super) fn cancel_peek(&mut self, uuid: PeekId) {
        if self.peeks.remove(&uuid).is_some() {
            self.broadcast(|| ToWorker::CancelPeek { uuid });
            self.send(ComputeResponse::PeekResponse { uuid, response: PeekResponse::Canceled });
        } else if let Some(task) = self.storage_peeks.remove(&uuid) {
            task.abort();
            self.send(ComputeResponse::PeekResponse { uuid, response: PeekResponse::Canceled });
        }
    }

    /// A new connection: the previous one's peeks are forgotten (the controller re-sends what it wants).
    pub(super) fn forget_peeks(&mut self) {
        for (uuid, _) in std::mem::take(&mut self.peeks) {
            for worker in &self.workers {
                let _ = worker.send(ToWorker::CancelPeek { uuid });
            }
        }
        for (_, task) in std::mem::take(&mut self.storage_peeks) {
            task.abort();
        }
    }

    /// The dataflow exporting `exports` stopped with `message`: its indexes' pending peeks get it.
    pub(super) fn fail_index_peeks(&mut self, exports: &[GlobalId], message: &str) {
        let pending: Vec<PeekId> = self
            .peeks
            .iter()
            .filter(|(_, p)| matches!(p.peek.target, PeekTarget::Index { id } if exports.contains(&id)))
            .map(|(uuid, _)| *uuid)
            .collect();
        for uuid in pending {
            self.peeks.remove(&uuid);
            self.broadcast(|| ToWorker::CancelPeek { uuid });
            let response = PeekResponse::Error(message.to_string());
            self.send(ComputeResponse::PeekResponse { uuid, response });
        }
    }
}

/// Process 0's answer to a storage peek: the snapshot of `id` at the peek's time through its
/// map/filter/project, finished.
async fn read_storage_peek(
    storage: &dyn StorageCollections,
    id: GlobalId,
    peek: &Peek,
    max_result_size_bytes: Option<u64>,
) -> PeekResponse {
    let rows = match storage.snapshot(id, peek.timestamp).await {
        Ok(rows) => rows,
        Err(e) => return PeekResponse::Error(format!("storage peek of {id}: {e}")),
    };
    let mut out = Vec::new();
    for (row, diff) in rows {
        match peek.map_filter_project.apply(&row) {
            Ok(Some(row)) => out.push((row, diff)),
            Ok(None) => {}
            Err(e) => return PeekResponse::Error(format!("peek map/filter/project: {e}")),
        }
    }
    finish_rows(out, &peek.finishing, max_result_size_bytes)
}
