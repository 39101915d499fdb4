//! Peeks of storage collections: answered by the controller from a storage snapshot at the peek's time,
//! never by a replica.
//!
//! A storage peek applies its map/filter/project and finishing, ends at its timeout
//! ([`PeekFailure::TimedOut`]) and can be cancelled; its hold on the collection goes when it ends. Literal
//! constraints (an index key lookup) and a target replica do not apply to a storage collection: the API
//! refuses them before a storage peek starts (`PeekError::LiteralConstraintsOnStorage`,
//! `PeekError::TargetReplicaOnStorage`).
//!
//! **Tests:** `tests/it/e2e.rs` (rows) and `tests/it/api_errors.rs` (refused options, timeout,
//! cancellation, instance drop, storage failure).

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use protocol::{Diff, GlobalId, InstanceId, PeekId, Row, RowPacker};
use storage::{StorageCollections, StorageReadHold};

use crate::clock::{Timestamp, wallclock_ms};
use crate::error::PeekFailure;
use crate::instance::PeekOptions;
use crate::instance_task::{StoragePeeks, StoragePeeksMap};
use crate::metrics::PeekRecorder;
use crate::response::{ComputeControllerResponse, PeekNotification, PeekOutcome, PeekResult};

/// A storage peek that passed the API's checks and holds its collection at its time.
#[derive(Debug)]
pub(crate) struct StoragePeek {
    pub(crate) uuid: PeekId,
    pub(crate) instance: InstanceId,
    pub(crate) id: GlobalId,
    pub(crate) timestamp: Timestamp,
    /// The peek's own timeout, or the instance's default.
    pub(crate) timeout_ms: u64,
    pub(crate) options: PeekOptions,
    pub(crate) hold: StorageReadHold,
    pub(crate) started_ms: u64,
    /// The instance's peek metrics and when the caller asked, if durations are measured.
    pub(crate) recorder: Option<(PeekRecorder, Instant)>,
}

/// Answers a storage peek: the snapshot, unless `cancel` fires or the timeout passes first. Then
/// releases its hold, announces it and hands the result to its caller.
///
/// Its entry in `peeks` (the instance's storage peeks in flight) decides a race with `cancel_peek`:
/// whoever removes it first wins, so a `cancel_peek` that succeeded always means `Canceled`. A map that
/// is gone (the instance was dropped) ends the peek with `InstanceDropped`.
pub(crate) async fn run_storage_peek(
    storage: Arc<dyn StorageCollections>,
    peek: StoragePeek,
    mut cancel: oneshot::Receiver<()>,
    peeks: Weak<StoragePeeksMap>,
    responses: mpsc::UnboundedSender<ComputeControllerResponse>,
    result_tx: oneshot::Sender<PeekResult>,
) {
    let StoragePeek { uuid, instance, id, timestamp, timeout_ms, options, hold, started_ms, recorder } = peek;
    let outcome = tokio::select! {
        biased;
        signal = &mut cancel => match signal {
            Ok(()) => Err(PeekFailure::Canceled),
            Err(_) => Err(PeekFailure::InstanceDropped),
        },
        () = tokio::time::sleep(Duration::from_millis(timeout_ms)) => {
            Err(PeekFailure::TimedOut { after_ms: timeout_ms })
        }
        result = storage_peek(&*storage, id, timestamp, options) => result,
    };
    drop(cancel);
    let result = match peeks.upgrade() {
        None => Err(PeekFailure::InstanceDropped),
        Some(peeks) => match lock_peeks(&peeks).remove(&uuid) {
            Some(_) => outcome,
            None => Err(PeekFailure::Canceled),
        },
    };
    drop(hold);
    if let Some((recorder, started)) = recorder {
        recorder.record(&result, started.elapsed());
    }
    let _ = responses.send(ComputeControllerResponse::PeekNotification(PeekNotification {
        uuid,
        instance,
        replica: None,
        outcome: PeekOutcome::of(&result),
        duration_ms: wallclock_ms().saturating_sub(started_ms),
    }));
    let _ = result_tx.send(result);
}

fn lock_peeks(peeks: &StoragePeeks) -> std::sync::MutexGuard<'_, BTreeMap<PeekId, oneshot::Sender<()>>> {
    peeks.lock().expect("storage peeks poisoned")
}

/// The result of a peek of storage collection `id` at `timestamp`: the snapshot (read in chunks) with
/// the peek's map/filter/project and finishing applied.
async fn storage_peek(
    storage: &dyn StorageCollections,
    id: GlobalId,
    timestamp: Timestamp,
    options: PeekOptions,
) -> PeekResult {
    let storage_error = |e: storage::ReadError| PeekFailure::Storage(e.to_string());
    let mut chunks =
        storage.snapshot_stream(id, timestamp, storage::SNAPSHOT_CHUNK_BYTES).await.map_err(storage_error)?;
    let mut out: BTreeMap<Row, Diff> = BTreeMap::new();
    let mut packer = RowPacker::new();
    // The rows are lent out of each chunk: only what the map/filter/project keeps is copied.
    while let Some(chunk) = chunks.next_rows().await.map_err(storage_error)? {
        let mut datums = Vec::new();
        for (row, diff) in chunk.iter() {
            let row = match &options.map_filter_project {
                None => Some(row.to_row()),
                Some(mfp) => mfp
                    .apply_with(row, &mut datums, &mut packer)
                    .map_err(|e| PeekFailure::Evaluation(e.to_string()))?,
            };
            if let Some(row) = row {
                *out.entry(row).or_insert(0) += diff;
            }
        }
    }
    let mut rows = Vec::with_capacity(out.len());
    for (row, diff) in out {
        match diff {
            0 => {}
            d if d < 0 => {
                return Err(PeekFailure::Evaluation(format!(
                    "negative multiplicity {d} for {row} in storage"
                )));
            }
            d => rows.push((row, NonZeroU64::new(d as u64).expect("positive"))),
        }
    }
    Ok(options.finishing.finish(rows))
}
