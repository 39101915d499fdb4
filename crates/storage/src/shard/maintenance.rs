//! Compaction and garbage collection of shards, run in the background by every process over the shards
//! it uses (and on demand through [`super::ShardCollections::maintain`]).
//!
//! **What a pass does**, per shard: expires leased readers and writers whose leases ran out; merges
//! batches while the state asks for it ([`ShardState::compaction_request`]): streams the inputs' parts
//! through a k-way merge that consolidates them with times advanced to the since
//! ([`super::read::MergeStream`], the same advancement as [`super::part::merge_runs`]), writes the result
//! part by part and commits it iff the inputs are still there (else deletes what it wrote); deletes the retired parts that
//! no version from the oldest held one ([`ShardState::gc_floor`]) references, forgets them in the state and
//! truncates the consensus versions below that floor; and, when a sweep is due, deletes parts in the
//! shard's blob directory that no state knows and that are older than the grace period (left by failed or
//! crashed appends and merges).
//!
//! **Safety.** A part is deleted only when no version a reader may use references it (readers hold their
//! version through their leased reader's seqno) or when no version references it at all. Blob deletes
//! happen before the state forgets the parts and before the versions are truncated, so a crash midway only
//! repeats work. Any process may run any of this concurrently: merges race by compare-and-set, deletes are
//! idempotent.
//!
//! **Tests.** `tests/it/faults.rs` (space after compaction, leaked parts after a full disk, damage found
//! by compaction), `tests/it/shards.rs`.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use protocol::GlobalId;

use crate::error::ReadError;
use crate::external::now_ms;
use crate::metrics::LeaseKind;
use crate::shard::blob_dir;
use crate::shard::collections::{Inner, read_error_of};
use crate::shard::consensus_key;
use crate::shard::machine::{Change, MachineError};
use crate::shard::part::{Update, encode_part, encoded_len};
use crate::shard::read::MergeStream;
use crate::shard::state::{Batch, MergeRequest, PartRef, Refusal, ShardState};

/// The most merges one pass commits per shard (the next pass continues).
const MERGES_PER_PASS: usize = 8;

/// A pass heartbeats this process's leased reader early when its version hold lags this far behind.
const VERSION_LAG_BEFORE_HEARTBEAT: u64 = 16;

/// A pass truncates a shard's consensus versions once this many below the floor piled up.
const TRUNCATION_BACKLOG: u64 = 32;

/// What one maintenance pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Leases expired.
    pub expired: bool,
    /// Merges committed.
    pub merges: usize,
    /// Merges whose inputs were gone by the time they committed.
    pub stale_merges: usize,
    /// Retired parts deleted.
    pub parts_deleted: usize,
    /// Consensus versions truncated.
    pub versions_truncated: u64,
    /// Leaked parts deleted by the sweep.
    pub leaked_deleted: usize,
}

/// Runs maintenance passes over the shards this process uses, every `maintenance_interval`.
pub(crate) async fn background(weak: Weak<Inner>) {
    let mut last_sweep_ms = now_ms();
    loop {
        let Some(interval) = weak.upgrade().map(|inner| inner.config.maintenance_interval) else { return };
        tokio::time::sleep(interval).await;
        let Some(inner) = weak.upgrade() else { return };
        if inner.is_closed() {
            return;
        }
        let now = now_ms();
        let sweep = now.saturating_sub(last_sweep_ms) >= inner.config.sweep_interval.as_millis() as u64;
        if sweep {
            last_sweep_ms = now;
        }
        for id in inner.known_ids() {
            if let Err(error) = maintain(&inner, id, sweep, false).await {
                tracing::debug!(%id, %error, "maintenance pass failed");
            }
        }
    }
}

/// One maintenance pass over `id`; see the module documentation. A `thorough` pass (an explicit call)
/// also moves this process's version hold up however little it lags, so that everything collectable now is
/// collected; a background pass does that only once it lags by more than a few versions (each move is a
/// write that appends would otherwise queue behind).
pub(crate) async fn maintain(
    inner: &Arc<Inner>,
    id: GlobalId,
    sweep: bool,
    thorough: bool,
) -> Result<Report, ReadError> {
    let mut report = Report::default();
    let now = now_ms();
    let result = inner
        .machine
        .update(id, |state, _| match state.and_then(|s| s.expire(now).map(|next| (s, next))) {
            Some((state, next)) => {
                let readers = state.readers.len() - next.readers.len();
                let writers = state.writers.len() - next.writers.len();
                Ok(Change::Write(vec![next], (readers, writers)))
            }
            None => Ok(Change::Keep((0, 0))),
        })
        .await;
    let (state, (readers, writers)) = result.map_err(|e| read_error_of(id, e))?;
    for _ in 0..readers {
        inner.machine.metrics.lease_expired(LeaseKind::Reader);
    }
    for _ in 0..writers {
        inner.machine.metrics.lease_expired(LeaseKind::Writer);
    }
    report.expired = readers + writers > 0;
    let Some(mut state) = state else { return Err(ReadError::CollectionMissing(id)) };
    for _ in 0..MERGES_PER_PASS {
        let Some(request) = state.compaction_request(inner.config.max_batches) else { break };
        match merge(inner, id, &request).await? {
            true => report.merges += 1,
            false => report.stale_merges += 1,
        }
        state = inner
            .machine
            .fetch(id)
            .await
            .map_err(|e| read_error_of(id, e))?
            .ok_or(ReadError::CollectionMissing(id))?;
    }
    // This process's own version hold lags between heartbeats; move it up now if that holds back garbage
    // collection (of the parts the merges above, or another process's, retired) by more than a few
    // versions, or by any in a thorough pass.
    let lag_allowed = if thorough { 0 } else { VERSION_LAG_BEFORE_HEARTBEAT };
    if inner.reader_lag(id, state.seqno).is_some_and(|lag| lag > lag_allowed) || report.merges > 0 {
        inner.heartbeat(id).await;
        state = inner
            .machine
            .fetch(id)
            .await
            .map_err(|e| read_error_of(id, e))?
            .ok_or(ReadError::CollectionMissing(id))?;
    }
    collect_garbage(inner, &state, thorough, &mut report).await?;
    if sweep {
        report.leaked_deleted = sweep_leaked(inner, id).await?;
    }
    Ok(report)
}

/// Runs one merge, streaming (one part per input and one output part in memory); `false` if its inputs
/// were gone when it tried to commit.
async fn merge(inner: &Arc<Inner>, id: GlobalId, request: &MergeRequest) -> Result<bool, ReadError> {
    let (_, guard) = inner.begin_read(id, None).await?;
    let machine = Arc::clone(&inner.machine);
    let (since, upper) = (request.since.clone(), request.upper().clone());
    let mut stream = MergeStream::new(id, Arc::clone(&machine), &request.inputs, since, upper);
    let mut parts = Vec::new();
    let written = write_merged(inner, id, &mut stream, &mut parts).await;
    let count_bound = match written {
        Ok(count_bound) => count_bound,
        Err(error) => {
            machine.delete_parts(parts.into_iter().map(|p| p.key).collect()).await;
            return Err(error);
        }
    };
    let output = (!parts.is_empty()).then(|| Batch {
        lower: request.lower().clone(),
        upper: request.upper().clone(),
        parts: parts.clone(),
        count_bound,
    });
    let result = machine
        .update(id, |state, _| {
            let state = state.ok_or(MachineError::Missing)?;
            Ok(Change::Write(vec![state.apply_merge(request, output.clone())?], ()))
        })
        .await;
    drop(guard);
    match result {
        Ok(_) => {
            machine.counters.merges.fetch_add(1, Ordering::Relaxed);
            let written = output.as_ref().map_or(0, |batch| batch.parts.iter().map(|p| p.bytes).sum());
            machine.metrics.compaction(request.inputs.len() as u64, written);
            Ok(true)
        }
        Err(MachineError::Refused(Refusal::MergeStale)) => {
            machine.delete_parts(parts.into_iter().map(|p| p.key).collect()).await;
            Ok(false)
        }
        // Whether it committed is unknown: the sweep deletes the parts if it did not.
        Err(MachineError::Unavailable { indeterminate: true, message }) => {
            Err(ReadError::Unavailable(message))
        }
        Err(error) => {
            machine.delete_parts(parts.into_iter().map(|p| p.key).collect()).await;
            Err(read_error_of(id, error))
        }
    }
}

/// Writes the merged run as parts of about the target size (into `parts`, also on failure); returns its
/// count bound.
async fn write_merged(
    inner: &Arc<Inner>,
    id: GlobalId,
    stream: &mut MergeStream,
    parts: &mut Vec<PartRef>,
) -> Result<u64, ReadError> {
    let target = inner.config.part_target_bytes;
    let mut chunk: Vec<Update> = Vec::new();
    let mut bytes = 0;
    let (mut bound, mut row_sum): (u128, u128) = (0, 0);
    let mut last_row = None;
    loop {
        let next = stream.next().await?;
        if (next.is_none() || bytes >= target) && !chunk.is_empty() {
            let encoded = encode_part(&chunk);
            let written = inner.machine.write_part(id, encoded, chunk.len() as u64).await;
            parts.push(written.map_err(|e| read_error_of(id, e))?);
            chunk.clear();
            bytes = 0;
        }
        let Some(update) = next else { break };
        if last_row.as_ref() != Some(&update.0) {
            bound = bound.max(row_sum);
            row_sum = 0;
            last_row = Some(update.0.clone());
        }
        row_sum += u128::from(update.2.unsigned_abs());
        bytes += encoded_len(&update);
        chunk.push(update);
    }
    bound = bound.max(row_sum);
    assert!(bound <= i64::MAX as u128, "a merge never raises the count bound past i64");
    Ok(bound as u64)
}

/// Deletes the retired parts below the GC floor, forgets them, and truncates the versions below it.
async fn collect_garbage(
    inner: &Arc<Inner>,
    state: &ShardState,
    thorough: bool,
    report: &mut Report,
) -> Result<(), ReadError> {
    let id = state.id;
    let floor = state.gc_floor();
    let collectable = state.collectable(floor);
    tracing::debug!(%id, floor, seqno = state.seqno, retired = state.retired.len(), collectable = collectable.len(), "garbage collection");
    if !collectable.is_empty() {
        let keys: BTreeSet<String> = collectable.iter().map(|p| p.key.clone()).collect();
        for key in &keys {
            inner
                .machine
                .blob
                .delete(key)
                .await
                .map_err(|e| ReadError::Unavailable(e.message().to_owned()))?;
        }
        inner.machine.counters.parts_deleted.fetch_add(keys.len() as u64, Ordering::Relaxed);
        inner.machine.metrics.garbage_collected(keys.len() as u64, 0);
        report.parts_deleted += keys.len();
        inner
            .machine
            .update(id, |state, _| match state.and_then(|s| s.forget_retired(&keys)) {
                Some(next) => Ok(Change::Write(vec![next], ())),
                None => Ok(Change::Keep(())),
            })
            .await
            .map_err(|e| read_error_of(id, e))?;
    }
    let backlog = if thorough { 1 } else { TRUNCATION_BACKLOG };
    if floor > 0 && inner.truncation_due(id, floor, backlog) {
        match inner.machine.consensus.truncate(&consensus_key(id), floor).await {
            Ok(deleted) => {
                inner.note_truncated(id, floor);
                inner.machine.counters.versions_truncated.fetch_add(deleted, Ordering::Relaxed);
                inner.machine.metrics.garbage_collected(0, deleted);
                report.versions_truncated += deleted;
            }
            Err(error) => {
                tracing::debug!(%id, %error, "truncating old versions failed; the next pass retries")
            }
        }
    }
    Ok(())
}

/// Deletes the parts in `id`'s blob directory that the current state does not know, once older than the
/// grace period.
async fn sweep_leaked(inner: &Arc<Inner>, id: GlobalId) -> Result<usize, ReadError> {
    let listed = inner
        .machine
        .blob
        .list(&blob_dir(id))
        .await
        .map_err(|e| ReadError::Unavailable(e.message().to_owned()))?;
    let state = inner
        .machine
        .fetch(id)
        .await
        .map_err(|e| read_error_of(id, e))?
        .ok_or(ReadError::CollectionMissing(id))?;
    let known = state.known_keys();
    let cutoff = now_ms().saturating_sub(inner.config.leaked_part_grace.as_millis() as u64);
    let leaked: Vec<String> = listed
        .into_iter()
        .filter(|meta| !known.contains(meta.key.as_str()) && meta.last_modified_ms <= cutoff)
        .map(|meta| meta.key)
        .collect();
    let count = leaked.len();
    if count > 0 {
        tracing::info!(%id, parts = count, "deleting parts no state references");
    }
    inner.machine.delete_parts(leaked).await;
    Ok(count)
}
