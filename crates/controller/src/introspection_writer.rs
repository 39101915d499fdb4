//! The introspection writer: one task per controller that appends the introspection updates of every
//! instance ([`IntrospectionKind`]) to their storage collections, at the wall-clock time, once per
//! introspection interval.
//!
//! **Ownership.** The controller owns these collections: the writer reconciles each with the rows it
//! wants before its first append and after an append finds that someone else wrote (see
//! [`write_introspection`]).
//!
//! **Tests:** `tests/it/e2e.rs` (introspection as it reaches storage, and a restarted controller
//! replacing its predecessor's rows).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::warn;

use frontiers::{Antichain, PartialOrder};
use protocol::{Diff, GlobalId, Row};
use storage::{AppendError, AppendRequest, StorageCollections};

use crate::clock::wallclock_ms;
use crate::instance_task::IntrospectionUpdates;
use crate::introspection::IntrospectionKind;

/// One introspection collection as its writer sees it.
#[derive(Debug, Default)]
struct IntrospectionTarget {
    /// The collection's upper as last written or read; `None`: unknown (at start, or after someone else
    /// wrote), so the collection is reconciled before the next append.
    upper: Option<Antichain<u64>>,
    /// The rows the controller wants there: every update received so far, consolidated.
    desired: BTreeMap<Row, Diff>,
    /// What the next append writes.
    pending: Vec<(Row, Diff)>,
}

impl IntrospectionTarget {
    fn receive(&mut self, row: Row, diff: Diff) {
        let count = self.desired.entry(row.clone()).or_insert(0);
        *count += diff;
        if *count == 0 {
            self.desired.remove(&row);
        }
        self.pending.push((row, diff));
    }

    /// Learns the upper of collection `id` and sets the pending updates to what turns its current contents
    /// into the desired rows: rows another writer (an earlier controller) left there are retracted.
    async fn reconcile(&mut self, storage: &dyn StorageCollections, id: GlobalId) -> Result<(), String> {
        let upper = storage.frontiers(id).await.map_err(|e| e.to_string())?.upper;
        let mut correction = self.desired.clone();
        if let Some(time) = upper.as_option().and_then(|t| t.checked_sub(1)) {
            for (row, diff) in storage.snapshot(id, time).await.map_err(|e| e.to_string())? {
                *correction.entry(row).or_insert(0) -= diff;
            }
        }
        self.pending = correction.into_iter().filter(|(_, diff)| *diff != 0).collect();
        self.upper = Some(upper);
        Ok(())
    }
}

/// Appends introspection updates to their storage collections every `interval`, at the wall-clock time,
/// advancing every introspection collection's upper even when nothing changed.
///
/// The controller owns these collections: before its first append to one (and again after an append
/// finds that someone else wrote to it), the writer reads the collection's contents and writes the
/// difference to the rows it wants, so rows an earlier controller left behind are retracted. A collection
/// whose upper or contents cannot be read is skipped for that round and keeps its pending updates.
pub(crate) async fn write_introspection(
    storage: Arc<dyn StorageCollections>,
    mut rx: mpsc::UnboundedReceiver<IntrospectionUpdates>,
    interval: Duration,
) {
    let mut targets: BTreeMap<IntrospectionKind, IntrospectionTarget> =
        IntrospectionKind::ALL.iter().map(|kind| (*kind, IntrospectionTarget::default())).collect();
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(batch) => {
                    for (kind, row, diff) in batch {
                        targets.get_mut(&kind).expect("every kind has a target").receive(row, diff);
                    }
                }
                None => return,
            },
            _ = ticker.tick() => {
                for (kind, target) in &mut targets {
                    let id = kind.default_id();
                    if target.upper.is_none()
                        && let Err(error) = target.reconcile(&*storage, id).await
                    {
                        warn!(collection = %id, %error, "introspection collection unavailable");
                    }
                }
                let now = wallclock_ms();
                let time = targets
                    .values()
                    .filter_map(|t| t.upper.as_ref()?.as_option().copied())
                    .max()
                    .unwrap_or(0)
                    .max(now);
                // Only collections with a known, open upper are written; the others keep their updates.
                let written: Vec<IntrospectionKind> = targets
                    .iter()
                    .filter(|(_, t)| {
                        let at = Antichain::from_elem(time);
                        t.upper.as_ref().is_some_and(|u| PartialOrder::less_equal(u, &at))
                    })
                    .map(|(kind, _)| *kind)
                    .collect();
                if written.is_empty() {
                    continue;
                }
                let requests: Vec<AppendRequest> = written
                    .iter()
                    .map(|kind| {
                        let target = &targets[kind];
                        AppendRequest {
                            id: kind.default_id(),
                            updates: target
                                .pending
                                .iter()
                                .map(|(row, diff)| (row.clone(), time, *diff))
                                .collect(),
                            expected_upper: target.upper.clone().expect("filtered"),
                            new_upper: Antichain::from_elem(time + 1),
                        }
                    })
                    .collect();
                match storage.append(requests).await {
                    Ok(()) => {
                        for kind in written {
                            let target = targets.get_mut(&kind).expect("listed");
                            target.pending.clear();
                            target.upper = Some(Antichain::from_elem(time + 1));
                        }
                    }
                    Err(AppendError::UpperMismatch { id, .. }) => {
                        // Someone else wrote: reconcile that collection with what is there now.
                        let why = "introspection collection written by someone else; reconciling";
                        warn!(collection = %id, "{why}");
                        for (kind, target) in &mut targets {
                            if kind.default_id() == id {
                                target.upper = None;
                            }
                        }
                    }
                    Err(e) => warn!(error = %e, "introspection append failed; retrying"),
                }
            }
        }
    }
}
