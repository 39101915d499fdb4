//! Compaction and garbage collection of shards, run in the background by every process over the shards
//! it uses (and on demand through [`super::ShardCollections::maintain`]).
//!
//! **What a pass does**, per shard: expires leased readers and writers whose leases ran out; merges
//! batches while the state asks for it ([`ShardState::compaction_request`]): reads the inputs' parts,
//! consolidates them with times advanced to the since ([`super::part::merge_runs`]), writes the result and
//! commits it iff the inputs are still there (else deletes what it wrote); deletes the retired parts that
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
use crate::shard::blob_dir;
use crate::shard::collections::{Inner, read_error_of};
use crate::shard::consensus_key;
use crate::shard::machine::{Change, MachineError};
use crate::shard::part::merge_runs;
use crate::shard::read::read_error;
use crate::shard::state::{Batch, MergeRequest, Refusal, ShardState};

/// The most merges one pass commits per shard (the next pass continues).
const MERGES_PER_PASS: usize = 8;

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
            if let Err(error) = maintain(&inner, id, sweep).await {
                tracing::debug!(%id, %error, "maintenance pass failed");
            }
        }
    }
}

/// One maintenance pass over `id`; see the module documentation.
pub(crate) async fn maintain(inner: &Arc<Inner>, id: GlobalId, sweep: bool) -> Result<Report, ReadError> {
    let mut report = Report::default();
    let now = now_ms();
    let result = inner
        .machine
        .update(id, |state, _| match state.and_then(|s| s.expire(now)) {
            Some(next) => Ok(Change::Write(vec![next], true)),
            None => Ok(Change::Keep(false)),
        })
        .await;
    let (state, expired) = result.map_err(|e| read_error_of(id, e))?;
    report.expired = expired;
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
    collect_garbage(inner, &state, &mut report).await?;
    if sweep {
        report.leaked_deleted = sweep_leaked(inner, id).await?;
    }
    Ok(report)
}

/// Runs one merge; `false` if its inputs were gone when it tried to commit.
async fn merge(inner: &Arc<Inner>, id: GlobalId, request: &MergeRequest) -> Result<bool, ReadError> {
    let (_, guard) = inner.begin_read(id, None).await?;
    let mut runs = Vec::with_capacity(request.inputs.len());
    for batch in &request.inputs {
        let mut run = Vec::new();
        for part in &batch.parts {
            let updates = inner.machine.read_part(part).await.map_err(|e| read_error(id, e))?;
            run.extend(updates);
        }
        runs.push(run);
    }
    let run = merge_runs(runs, &request.since, request.upper());
    let count_bound = run.count_bound;
    let parts = inner.write_run(id, run.updates).await.map_err(|e| read_error_of(id, e))?;
    let output = (!parts.is_empty()).then(|| Batch {
        lower: request.lower().clone(),
        upper: request.upper().clone(),
        parts: parts.clone(),
        count_bound,
    });
    let result = inner
        .machine
        .update(id, |state, _| {
            let state = state.ok_or(MachineError::Missing)?;
            Ok(Change::Write(vec![state.apply_merge(request, output.clone())?], ()))
        })
        .await;
    drop(guard);
    match result {
        Ok(_) => {
            inner.machine.counters.merges.fetch_add(1, Ordering::Relaxed);
            Ok(true)
        }
        Err(MachineError::Refused(Refusal::MergeStale)) => {
            inner.machine.delete_parts(parts.into_iter().map(|p| p.key).collect()).await;
            Ok(false)
        }
        // Whether it committed is unknown: the sweep deletes the parts if it did not.
        Err(MachineError::Unavailable { indeterminate: true, message }) => {
            Err(ReadError::Unavailable(message))
        }
        Err(error) => {
            inner.machine.delete_parts(parts.into_iter().map(|p| p.key).collect()).await;
            Err(read_error_of(id, error))
        }
    }
}

/// Deletes the retired parts below the GC floor, forgets them, and truncates the versions below it.
async fn collect_garbage(
    inner: &Arc<Inner>,
    state: &ShardState,
    report: &mut Report,
) -> Result<(), ReadError> {
    let id = state.id;
    let floor = state.gc_floor();
    let collectable = state.collectable(floor);
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
    if floor > 0 {
        match inner.machine.consensus.truncate(&consensus_key(id), floor).await {
            Ok(deleted) => {
                inner.machine.counters.versions_truncated.fetch_add(deleted, Ordering::Relaxed);
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
