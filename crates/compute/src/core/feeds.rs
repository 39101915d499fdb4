//! Storage feeds: one task per storage import of a scheduled dataflow, reading the import from the
//! dataflow's as-of on and feeding the process's workers.
//!
//! **What this is.** [`spawn_feed`] starts [`feed_source`] for one import when its dataflow is scheduled:
//! it takes a storage read hold at the as-of, listens from there, and sends each local worker the rows it
//! owns (`row_owner`, so across the replica's processes every update is ingested exactly once) and every
//! worker the listen's progress. The hold follows the progress, so storage may compact what the dataflow
//! has taken in. A hold or listen that fails is reported to the core (`CoreEvent::ImportFailed`), which
//! stops the dataflow.
//!
//! **What this is not.** No timely code: the workers turn the updates and progress into their inputs.
//! It does not decide when a feed starts or stops: the core's catalog spawns it on `Schedule` and aborts
//! it with its dataflow.
//!
//! **Invariants.** A feed has at most [`FEED_UPDATES_IN_FLIGHT`] updates (plus one listen event's) sent
//! to its workers and not yet ingested (`messages::FeedBudget`), so a large snapshot waits in storage,
//! not in the channels; its read hold moves only to progress it has already sent its workers.
//!
//! **Tests.** Through the socket in `tests/it`: every dataflow with a storage import (1 and 2 processes),
//! a failing import in `limits.rs`, a dataflow rebuilt after storage compacted in `reconnect.rs`; the
//! budget itself in `messages.rs`.

use std::sync::Arc;

use frontiers::{Antichain, PartialOrder};
use protocol::{GlobalId, Row};
use storage::{ListenEvent, StorageCollections};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug};

use super::{CoreEvent, Topology};
use crate::messages::{DataflowKey, FeedBudget, ToWorker, WorkerTx};
use crate::metrics::StorageReadLag;
use crate::render::{Diff, Time};
use crate::worker::row_owner;

/// How many updates one storage feed may have sent to its workers and not yet seen ingested before it
/// reads on (about 4 MiB of small rows; a listen event adds at most about 1 MiB more).
const FEED_UPDATES_IN_FLIGHT: usize = 1 << 16;

/// Where a storage feed sends what it reads: the dataflow's local workers, and the core if it fails.
pub(super) struct FeedTarget {
    /// The core's events.
    pub events: UnboundedSender<CoreEvent>,
    /// The dataflow fed.
    pub key: DataflowKey,
    /// The process's workers.
    pub workers: Vec<WorkerTx>,
    /// The process's place in the replica.
    pub topology: Topology,
}

/// Starts the feed of storage import `id` of a dataflow with the given as-of (see the module doc);
/// returns its task, which the dataflow aborts when it goes.
pub(super) fn spawn_feed(
    storage: Arc<dyn StorageCollections>,
    id: GlobalId,
    as_of: Time,
    target: FeedTarget,
    read_lag: StorageReadLag,
) -> JoinHandle<()> {
    let span = tracing::info_span!("feed", collection = %id, dataflow = target.key);
    tokio::spawn(feed_source(storage, id, as_of, target, read_lag).instrument(span))
}

/// Reads a storage import from `as_of` on and feeds each local worker the rows it owns, no faster than
/// the workers ingest them.
async fn feed_source(
    storage: Arc<dyn StorageCollections>,
    id: GlobalId,
    as_of: Time,
    target: FeedTarget,
    read_lag: StorageReadLag,
) {
    let FeedTarget { events, key, workers, topology } = target;
    let failed = |error: String| {
        let _ = events.send(CoreEvent::ImportFailed { key, import: id, error });
    };
    let mut hold = match storage.acquire_read_hold(id, Antichain::from_elem(as_of)).await {
        Ok(hold) => hold,
        Err(e) => return failed(format!("cannot hold storage import {id} at {as_of}: {e}")),
    };
    let mut listen = match storage.listen(id, as_of).await {
        Ok(listen) => listen,
        Err(e) => return failed(format!("cannot listen to storage import {id} from {as_of}: {e}")),
    };
    let budget = Arc::new(FeedBudget::default());
    loop {
        // Read on only once the workers have ingested most of what was sent (see `FeedBudget`).
        budget.wait_until_at_most(FEED_UPDATES_IN_FLIGHT).await;
        match listen.next().await {
            Ok(ListenEvent::Updates(updates)) => {
                for (local, updates) in split_by_owner(updates, topology).into_iter().enumerate() {
                    if !updates.is_empty() {
                        let credit = budget.take(updates.len());
                        let _ =
                            workers[local].send(ToWorker::SourceUpdates { key, import: id, updates, credit });
                    }
                }
            }
            Ok(ListenEvent::Progress(frontier)) => {
                read_lag.progress(&frontier);
                for worker in &workers {
                    let _ =
                        worker.send(ToWorker::SourceProgress { key, import: id, frontier: frontier.clone() });
                }
                if frontier.is_empty() {
                    return;
                }
                if PartialOrder::less_than(hold.since(), &frontier) && hold.try_downgrade(frontier).is_err() {
                    debug!(%id, "storage hold could not move forward");
                }
            }
            Err(e) => return failed(format!("the listen to storage import {id} failed: {e}")),
        }
    }
}

/// `updates` split by the local worker that owns each row (`row_owner`); rows owned by other processes'
/// workers are left out (those processes feed them).
fn split_by_owner(updates: Vec<(Row, Time, Diff)>, topology: Topology) -> Vec<Vec<(Row, Time, Diff)>> {
    let mut parts: Vec<Vec<(Row, Time, Diff)>> = vec![Vec::new(); topology.workers];
    if topology.peers == 1 {
        parts[0] = updates;
    } else {
        for update in updates {
            if let Some(local) = topology.local(row_owner(&update.0, topology.peers)) {
                parts[local].push(update);
            }
        }
    }
    parts
}
