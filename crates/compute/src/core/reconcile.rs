//! Reconciliation: what a process keeps of its running dataflows when a controller connects and replays
//! its history.
//!
//! **What this is.** On `InitializationComplete`, [`Core::reconcile`] compares the running dataflows with
//! the replayed commands. A running dataflow is kept (no rehydration) if the replay creates an identical
//! one ([`same_dataflow`]: only the as-of may be later), it was scheduled, all its index imports come
//! from kept dataflows, it has no subscribe or copy-to export (those stream to the connection that asked,
//! so they are rebuilt from the replayed as-of), its storage imports and exports did not fail, and none
//! of its exports was dropped unless the replay drops it too. A dataflow never scheduled holds nothing in
//! storage yet and would start from its earlier as-of, which the controller no longer holds once it
//! replayed a later one: it is rebuilt at the replayed as-of (the simulator's model replica follows the
//! same rule). Everything else running is dropped (importers first), then the replay is executed,
//! skipping kept dataflows' creations.
//!
//! **What this is not.** Not the stage machine (`mod.rs` buffers the replay and calls this once) and not
//! the catalog's operations, which it uses.
//!
//! **Invariants.** A kept dataflow's imports are all kept (checked in key order, so exporters first); a
//! dataflow is dropped only after its importers (reverse key order).
//!
//! **Tests.** Through the socket, in `tests/it/reconnect.rs` (identical dataflows kept, changed and
//! never-scheduled ones rebuilt, many reconnects) and the simulator's seeds.

use std::collections::BTreeSet;

use frontiers::PartialOrder;
use protocol::{ComputeCommand, DataflowDescription, GlobalId, SinkConnection};
use tracing::info;

use super::Core;
use crate::messages::DataflowKey;
use crate::render::Time;

impl Core {
    /// Applies the replayed history: keeps identical dataflows, drops the rest, builds what is new.
    pub(super) async fn reconcile(&mut self, replay: Vec<ComputeCommand>) {
        let kept = self.kept_dataflows(&replay);
        let kept_exports: BTreeSet<GlobalId> =
            kept.iter().flat_map(|key| self.dataflows[key].desc.export_ids()).collect();
        info!(kept = kept.len(), running = self.dataflows.len(), "reconciling after reconnect");
        let to_drop: Vec<DataflowKey> =
            self.dataflows.keys().rev().filter(|k| !kept.contains(k)).copied().collect();
        for key in to_drop {
            let exports: Vec<GlobalId> = self.dataflows[&key].exports.iter().copied().collect();
            for id in exports {
                self.drop_export(id, false);
            }
            // Its importers are dropped first (reverse order), so it goes now.
            self.maybe_drop_dataflow(key);
        }
        for command in replay {
            match &command {
                ComputeCommand::CreateDataflow(desc)
                    if desc.export_ids().next().is_some_and(|id| kept_exports.contains(&id)) =>
                {
                    // Kept: the running dataflow serves it (its as-of may be earlier: it was scheduled, so its
                    // storage feeds hold their imports from where they got to, not from the as-of).
                    continue;
                }
                _ => self.execute(command).await,
            }
        }
    }

    /// The running dataflows the replay keeps (see the module doc).
    fn kept_dataflows(&self, replay: &[ComputeCommand]) -> BTreeSet<DataflowKey> {
        let replayed: Vec<&DataflowDescription<Time>> = replay
            .iter()
            .filter_map(|c| match c {
                ComputeCommand::CreateDataflow(desc) => Some(desc),
                _ => None,
            })
            .collect();
        let dropped_in_replay: BTreeSet<GlobalId> = replay
            .iter()
            .filter_map(|c| match c {
                ComputeCommand::AllowCompaction { id, frontier } if frontier.is_empty() => Some(*id),
                _ => None,
            })
            .collect();
        let mut kept: BTreeSet<DataflowKey> = BTreeSet::new();
        for (key, dataflow) in &self.dataflows {
            let streams = dataflow.desc.sink_exports.values().any(|s| {
                matches!(s.connection, SinkConnection::Subscribe { .. } | SinkConnection::CopyTo { .. })
            });
            let imports_kept = dataflow.imports_from.iter().all(|k| kept.contains(k));
            let exports_intact = dataflow
                .desc
                .export_ids()
                .all(|id| dataflow.exports.contains(&id) || dropped_in_replay.contains(&id));
            let matching = replayed.iter().any(|desc| same_dataflow(&dataflow.desc, desc));
            // A dataflow whose storage import failed, or one of whose exports cannot make progress, is
            // built again: storage may be back, and a failure that persists is reported afresh.
            let healthy = dataflow.failed.is_none()
                && dataflow.exports.iter().all(|id| self.collections.get(id).is_none_or(|c| !c.failed));
            // One never scheduled holds nothing in storage: kept, it would start from its earlier as-of,
            // which the controller stopped holding when it replayed a later one.
            let started = dataflow.scheduled;
            if !streams && imports_kept && exports_intact && matching && healthy && started {
                kept.insert(*key);
            }
        }
        kept
    }
}

/// Whether `replayed` describes the same dataflow as `running`, allowing a later as-of.
fn same_dataflow(running: &DataflowDescription<Time>, replayed: &DataflowDescription<Time>) -> bool {
    let later_as_of = match (&running.as_of, &replayed.as_of) {
        (Some(a), Some(b)) => PartialOrder::less_equal(a, b),
        _ => false,
    };
    later_as_of
        && running.source_imports == replayed.source_imports
        && running.index_imports == replayed.index_imports
        && running.objects_to_build == replayed.objects_to_build
        && running.index_exports == replayed.index_exports
        && running.sink_exports == replayed.sink_exports
        && running.until == replayed.until
}
