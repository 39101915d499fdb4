//! Peeks: routing a peek to the workers that hold its answer, or to storage, and merging their parts
//! into the one answer the controller gets.
//!
//! **What this is.** An index peek goes to the local workers that may own its rows: all of them, or,
//! with literal constraints, the owners of the keys (`key_owner`; one worker still checks errors and
//! waits for the time if no key is owned here). Each routing has a [`PeekSeq`] the workers' answers
//! carry; the answer is the union of the parts of the workers it was routed to, finished (order, limit,
//! offset, projection, size limit) once all are in. A storage peek is read by process 0 alone (the whole
//! snapshot is the replica's answer; the others answer with no rows), in a task that reports back with
//! `CoreEvent::StoragePeek`; it reads the snapshot as a stream of chunks (`snapshot_stream`) and keeps
//! only what the answer can still need (`StoragePeekRows`: with a limit, the first `offset + limit`
//! rows in the finishing's order; without one, it stops reading once the answer exceeds the size
//! limit). A peek of an index whose dataflow stopped, of an unknown id, of something that is not an
//! index, or before the index's since is answered with an error at once.
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
//! results over the frame limit, a failing import; `reconnect.rs`); the storage peek's streaming in the
//! unit tests below.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use protocol::{
    ComputeResponse, GlobalId, Peek, PeekId, PeekResponse, PeekTarget, Row, RowPacker, RowSetFinishing,
};
use storage::{SnapshotChunks, StorageCollections};

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

/// A storage peek with a limit trims what it keeps once it holds this many rows (or twice what the last
/// trim kept, whichever is more).
const STORAGE_PEEK_TRIM_ROWS: usize = 4096;

/// Process 0's answer to a storage peek: the snapshot of `id` at the peek's time through its
/// map/filter/project, finished; read chunk by chunk (see [`answer_storage_peek`]).
async fn read_storage_peek(
    storage: &dyn StorageCollections,
    id: GlobalId,
    peek: &Peek,
    max_result_size_bytes: Option<u64>,
) -> PeekResponse {
    match storage.snapshot_stream(id, peek.timestamp, storage::SNAPSHOT_CHUNK_BYTES).await {
        Ok(chunks) => answer_storage_peek(chunks, id, peek, max_result_size_bytes).await,
        Err(e) => PeekResponse::Error(format!("storage peek of {id}: {e}")),
    }
}

/// Reads a storage peek's snapshot chunk by chunk through its map/filter/project into a
/// [`StoragePeekRows`], which keeps only what the answer can still need; stops at the first error, and
/// once the answer is known to exceed `max_result_size_bytes`.
async fn answer_storage_peek(
    mut chunks: SnapshotChunks,
    id: GlobalId,
    peek: &Peek,
    max_result_size_bytes: Option<u64>,
) -> PeekResponse {
    let mut rows = StoragePeekRows::new(&peek.finishing, max_result_size_bytes);
    let mut packer = RowPacker::new();
    loop {
        // The rows are lent out of the chunk: only what the map/filter/project answers is copied.
        let chunk = match chunks.next_rows().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return rows.finish(),
            Err(e) => return PeekResponse::Error(format!("storage peek of {id}: {e}")),
        };
        let mut datums = Vec::new();
        for (row, diff) in chunk.iter() {
            match peek.map_filter_project.apply_with(row, &mut datums, &mut packer) {
                Ok(Some(row)) => rows.push(row, diff),
                Ok(None) => {}
                Err(e) => return PeekResponse::Error(format!("peek map/filter/project: {e}")),
            }
        }
        if let Some(answer) = rows.known_answer() {
            return answer;
        }
    }
}

/// What a storage peek keeps of the rows read so far.
///
/// While every count read is positive, counts only add up: a row ranked past the finishing's
/// `offset + limit` among the rows kept stays past it whatever comes later, so with a limit the rows are
/// trimmed to that prefix (consolidated, in the finishing's order) whenever they pile up; and without a
/// limit or offset the answer's size only grows, so once it exceeds the size limit the answer is
/// [`PeekResponse::ResultTooLarge`] (with the size read so far) without reading on. Once a negative count
/// is read neither shortcut holds, and everything is kept (as before streaming).
#[derive(Debug)]
struct StoragePeekRows<'a> {
    finishing: &'a RowSetFinishing,
    max_result_size_bytes: Option<u64>,
    rows: Vec<(Row, Diff)>,
    /// Trim when `rows` reaches this many.
    trim_at: usize,
    /// Whether a negative count was read.
    negative: bool,
    /// Encoded bytes times count of every row read (the answer's size while no count was negative).
    size_bytes: u64,
    /// The most rows held at once (tests).
    peak_rows: usize,
}

impl<'a> StoragePeekRows<'a> {
    fn new(finishing: &'a RowSetFinishing, max_result_size_bytes: Option<u64>) -> Self {
        StoragePeekRows {
            finishing,
            max_result_size_bytes,
            rows: Vec::new(),
            trim_at: STORAGE_PEEK_TRIM_ROWS,
            negative: false,
            size_bytes: 0,
            peak_rows: 0,
        }
    }

    fn push(&mut self, row: Row, diff: Diff) {
        match u64::try_from(diff) {
            Ok(count) => {
                let bytes = (row.byte_len() as u64).saturating_mul(count);
                self.size_bytes = self.size_bytes.saturating_add(bytes);
            }
            Err(_) => self.negative = true,
        }
        self.rows.push((row, diff));
        self.peak_rows = self.peak_rows.max(self.rows.len());
    }

    /// The answer, if it is known before the rest is read (over the size limit, or an error trimming
    /// found); trims the rows kept with a limit.
    fn known_answer(&mut self) -> Option<PeekResponse> {
        if self.negative {
            return None;
        }
        if let Some(max) = self.max_result_size_bytes
            && self.finishing.limit.is_none()
            && self.finishing.offset == 0
            && self.size_bytes > max
        {
            return Some(PeekResponse::ResultTooLarge { size_bytes: self.size_bytes, max_bytes: max });
        }
        if self.finishing.limit.is_some() && self.rows.len() >= self.trim_at {
            let rows = std::mem::take(&mut self.rows);
            match finish_rows(rows, &self.finishing.partial(), None) {
                PeekResponse::Rows(kept) => {
                    let count =
                        |c: std::num::NonZeroU64| Diff::try_from(c.get()).expect("a consolidated i64 count");
                    self.rows = kept.into_iter().map(|(row, c)| (row, count(c))).collect();
                    self.trim_at = STORAGE_PEEK_TRIM_ROWS.max(2 * self.rows.len());
                }
                // Counts only add up from here: an overflow stays an overflow.
                other => return Some(other),
            }
        }
        None
    }

    fn finish(self) -> PeekResponse {
        finish_rows(self.rows, self.finishing, self.max_result_size_bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;
    use std::time::Duration;

    use protocol::{ColumnOrder, Datum, MapFilterProject, PeekId};

    use super::*;

    fn row(k: i64) -> Row {
        Row::pack([Datum::Int64(k), Datum::Int64(k % 7)])
    }

    fn one(k: i64) -> Row {
        Row::pack([Datum::Int64(k)])
    }

    fn peek(map_filter_project: MapFilterProject, finishing: RowSetFinishing) -> Peek {
        Peek {
            uuid: PeekId(1),
            target: PeekTarget::Storage { id: GlobalId::User(1) },
            timestamp: 0,
            literal_constraints: None,
            map_filter_project,
            finishing,
        }
    }

    /// Rows `0..n` (see [`row`]) in pieces of 1000.
    fn chunks(n: i64) -> SnapshotChunks {
        let pieces: Vec<_> =
            (0..n).step_by(1000).map(|k| Ok((k..(k + 1000).min(n)).map(|k| (row(k), 1)).collect())).collect();
        SnapshotChunks::new(futures::stream::iter(pieces), 1 << 20)
    }

    fn count(n: u64) -> NonZeroU64 {
        NonZeroU64::new(n).unwrap()
    }

    #[tokio::test]
    async fn a_storage_peek_without_a_limit_stops_reading_an_endless_snapshot_at_the_size_limit() {
        let endless = futures::stream::iter((0i64..).map(|k| Ok(vec![(row(k), 1)])));
        let chunks = SnapshotChunks::new(endless, 1 << 20);
        let peek = peek(MapFilterProject::new(2), RowSetFinishing::unordered());
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            answer_storage_peek(chunks, GlobalId::User(1), &peek, Some(10_000)),
        )
        .await
        .expect("the peek stops reading once the answer is over the limit");
        match answer {
            PeekResponse::ResultTooLarge { size_bytes, max_bytes } => {
                assert_eq!(max_bytes, 10_000);
                assert!(size_bytes > 10_000 && size_bytes < 10_100, "{size_bytes}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_storage_peek_with_a_limit_over_a_bigger_collection_answers_its_first_rows() {
        let descending = RowSetFinishing { order_by: vec![ColumnOrder::desc(0)], limit: Some(3), offset: 2 };
        let answer = answer_storage_peek(
            chunks(100_000),
            GlobalId::User(1),
            &peek(MapFilterProject::new(2), descending),
            None,
        )
        .await;
        // A replica answers the first `offset + limit` rows; the controller skips the offset.
        let expected: Vec<_> = (99_995..100_000).rev().map(|k| (row(k), count(1))).collect();
        assert_eq!(answer, PeekResponse::Rows(expected));
        // Rows the projection makes equal add up before the limit: 14_285 rows have `k % 7 == 6`.
        let values = MapFilterProject::new(2).project([1]);
        let finishing =
            RowSetFinishing { order_by: vec![ColumnOrder::desc(0)], limit: Some(14_290), offset: 1 };
        let answer =
            answer_storage_peek(chunks(100_000), GlobalId::User(1), &peek(values, finishing), None).await;
        assert_eq!(answer, PeekResponse::Rows(vec![(one(6), count(14_285)), (one(5), count(6))]));
    }

    #[test]
    fn a_storage_peek_with_a_limit_holds_a_bounded_number_of_rows_and_keeps_all_after_a_negative_count() {
        let finishing = RowSetFinishing { order_by: vec![ColumnOrder::asc(0)], limit: Some(10), offset: 0 };
        let mut rows = StoragePeekRows::new(&finishing, None);
        for k in (0..200_000).rev() {
            rows.push(row(k), 1);
            if k % 1000 == 0 {
                assert!(rows.known_answer().is_none());
            }
        }
        assert!(rows.peak_rows <= STORAGE_PEEK_TRIM_ROWS + 1000, "peak {}", rows.peak_rows);
        let expected: Vec<_> = (0..10).map(|k| (row(k), count(1))).collect();
        assert_eq!(rows.finish(), PeekResponse::Rows(expected));

        let mut rows = StoragePeekRows::new(&finishing, Some(1));
        rows.push(row(1), -1);
        for k in 0..10_000 {
            rows.push(row(k), 1);
        }
        assert!(rows.known_answer().is_none(), "no shortcut after a negative count");
        assert_eq!(rows.rows.len(), 10_001, "everything is kept");
        assert!(matches!(rows.finish(), PeekResponse::ResultTooLarge { .. }));
    }
}
