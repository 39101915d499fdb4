//! [`CommandHistory`]: the commands a replica must be replayed to rebuild the live state, kept compact.
//!
//! Every command sent to a replica is recorded here. Instead of an append-only log that is compacted from
//! time to time, the history keeps the *compacted form* at all times:
//!
//! - the latest `CreateInstance`, the coalesced `UpdateConfiguration`, and whether `AllowWrites` was sent;
//! - per live dataflow, in creation order: its description, whether (and through which export) it was
//!   scheduled, and the latest `AllowCompaction` of each export;
//! - the peeks not yet answered or cancelled, in the order sent.
//!
//! A dataflow disappears, with its `Schedule` and compactions, once every export has been compacted to the
//! empty frontier. On [`replay`](CommandHistory::replay) a dataflow's `as_of` is advanced to the meet of its
//! exports' compaction frontiers (never below the original as-of), because the replica must be able to
//! read its imports there: the controller only holds them back that far.
//!
//! `AllowCompaction`, the command sent most often (on every since advance of every collection), costs one
//! hash lookup of its export, however many dataflows are live; only the first compaction of an export and
//! its drop touch the dataflow's entry.
//!
//! **Invariants:** the replay has O(live dataflows + pending peeks) commands (DESIGN §5.7: a dropped and
//! fully compacted dataflow is never in it); replaying it into an empty replica yields the same installed
//! state as the uncompacted command sequence (property-tested in `tests/it/history.rs`).

use std::collections::{BTreeMap, HashMap};

use frontiers::{Antichain, IdBuildHasher, PartialOrder, Timestamp};
use protocol::{
    ComputeCommand, ComputeParameters, DataflowDescription, GlobalId, InstanceConfig, Peek, PeekId,
};

/// Why a command could not be recorded. Each is a bug in the sender (the controller), reported rather than
/// recorded so the history stays consistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// A connection-level command (`Hello`, `InitializationComplete`) is not part of any history.
    #[error("{0} is a connection command and cannot be recorded")]
    ConnectionCommand(&'static str),
    /// A dataflow exports an id that a live dataflow already exports.
    #[error("collection {0} is already exported by a live dataflow")]
    DuplicateExport(GlobalId),
    /// A command names a collection no live dataflow exports.
    #[error("collection {0} is not exported by any live dataflow")]
    UnknownCollection(GlobalId),
    /// An `AllowCompaction` that would move a collection's compaction frontier backwards.
    #[error("compaction of {id} cannot move back from {current:?} to {requested:?}")]
    CompactionRegressed {
        /// The collection.
        id: GlobalId,
        /// Its current compaction frontier, rendered.
        current: String,
        /// The requested one, rendered.
        requested: String,
    },
    /// A peek id that is already pending.
    #[error("peek {0} is already pending")]
    DuplicatePeek(PeekId),
}

#[derive(Debug, Clone)]
struct DataflowEntry<T: Timestamp> {
    desc: DataflowDescription<T>,
    /// The export named by the first `Schedule`, if scheduled.
    scheduled_by: Option<GlobalId>,
    /// How many exports the dataflow has, how many have an `AllowCompaction`, and how many of those are at
    /// the empty frontier (the dataflow goes when that reaches `exports`).
    exports: usize,
    compacted: usize,
    emptied: usize,
}

/// What the history knows of one export of a live dataflow.
#[derive(Debug, Clone)]
struct ExportEntry<T> {
    /// The creation sequence number of its dataflow.
    sequence: u64,
    /// Its latest `AllowCompaction` frontier, if any.
    compaction: Option<Antichain<T>>,
}

impl<T: Timestamp> DataflowEntry<T> {
    /// The as-of a replay uses: the original as-of joined with the meet of the exports' compaction
    /// frontiers (an export without compaction counts as the original as-of).
    fn replay_as_of(
        &self,
        exports: &HashMap<GlobalId, ExportEntry<T>, IdBuildHasher>,
    ) -> Option<Antichain<T>> {
        let original = self.desc.as_of.clone()?;
        let mut since = Antichain::new();
        for id in self.desc.export_ids() {
            let frontier = exports[&id].compaction.as_ref().unwrap_or(&original);
            since.extend(frontier.iter().copied());
        }
        if since.is_empty() {
            return Some(original);
        }
        Some(frontiers::antichain::join(&original.borrow(), &since.borrow()))
    }
}

/// The compacted command history of one replica (or the template an instance seeds new replicas with).
#[derive(Debug, Clone)]
pub struct CommandHistory<T: Timestamp = u64> {
    instance: Option<InstanceConfig>,
    parameters: Option<ComputeParameters>,
    allow_writes: bool,
    /// Live dataflows by creation sequence number.
    dataflows: BTreeMap<u64, DataflowEntry<T>>,
    /// Every export of a live dataflow: its dataflow and its compaction. A hash map because every
    /// `AllowCompaction` looks its export up: that lookup must not slow down as dataflows accumulate.
    /// The hasher is fixed (unseeded), so the history behaves alike in every run; it never iterates the map.
    exports: HashMap<GlobalId, ExportEntry<T>, IdBuildHasher>,
    /// Pending peeks by sequence number, and the sequence number of each peek id.
    peeks: BTreeMap<u64, Peek<T>>,
    peek_sequence: BTreeMap<PeekId, u64>,
    next_sequence: u64,
    /// Commands recorded over the history's lifetime (for statistics and the compaction benchmark).
    recorded: u64,
}

impl<T: Timestamp> Default for CommandHistory<T> {
    fn default() -> Self {
        CommandHistory {
            instance: None,
            parameters: None,
            allow_writes: false,
            dataflows: BTreeMap::new(),
            exports: HashMap::default(),
            peeks: BTreeMap::new(),
            peek_sequence: BTreeMap::new(),
            next_sequence: 0,
            recorded: 0,
        }
    }
}

impl<T: Timestamp> CommandHistory<T> {
    /// An empty history.
    pub fn new() -> Self {
        CommandHistory::default()
    }

    /// Records a command. On error nothing changes.
    pub fn push(&mut self, command: &ComputeCommand<T>) -> Result<(), HistoryError> {
        match command {
            ComputeCommand::Hello { .. } | ComputeCommand::InitializationComplete => {
                return Err(HistoryError::ConnectionCommand(command.name()));
            }
            ComputeCommand::CreateInstance(config) => self.instance = Some(config.clone()),
            ComputeCommand::UpdateConfiguration(update) => {
                self.parameters.get_or_insert_with(ComputeParameters::default).update(update.clone());
            }
            ComputeCommand::AllowWrites => self.allow_writes = true,
            ComputeCommand::CreateDataflow(desc) => {
                if let Some(id) = desc.export_ids().find(|id| self.exports.contains_key(id)) {
                    return Err(HistoryError::DuplicateExport(id));
                }
                let sequence = self.next_sequence();
                for id in desc.export_ids() {
                    self.exports.insert(id, ExportEntry { sequence, compaction: None });
                }
                let exports = desc.export_ids().count();
                self.dataflows.insert(
                    sequence,
                    DataflowEntry {
                        desc: desc.clone(),
                        scheduled_by: None,
                        exports,
                        compacted: 0,
                        emptied: 0,
                    },
                );
            }
            ComputeCommand::Schedule(id) => {
                let entry = self.entry_mut(*id)?;
                entry.scheduled_by.get_or_insert(*id);
            }
            ComputeCommand::AllowCompaction { id, frontier } => {
                let export = self.exports.get_mut(id).ok_or(HistoryError::UnknownCollection(*id))?;
                let (first, emptied) = match &export.compaction {
                    Some(current) if !PartialOrder::less_equal(current, frontier) => {
                        return Err(HistoryError::CompactionRegressed {
                            id: *id,
                            current: format!("{current:?}"),
                            requested: format!("{frontier:?}"),
                        });
                    }
                    Some(current) => (false, frontier.is_empty() && !current.is_empty()),
                    None => (true, frontier.is_empty()),
                };
                export.compaction = Some(frontier.clone());
                // The common case, a later compaction of a live export, ends here: one hash lookup.
                if first || emptied {
                    let sequence = export.sequence;
                    let entry =
                        self.dataflows.get_mut(&sequence).expect("export index points at a live dataflow");
                    entry.compacted += usize::from(first);
                    entry.emptied += usize::from(emptied);
                    if entry.emptied == entry.exports {
                        let entry = self.dataflows.remove(&sequence).expect("present");
                        for export in entry.desc.export_ids() {
                            self.exports.remove(&export);
                        }
                    }
                }
            }
            ComputeCommand::Peek(peek) => {
                if self.peek_sequence.contains_key(&peek.uuid) {
                    return Err(HistoryError::DuplicatePeek(peek.uuid));
                }
                let sequence = self.next_sequence();
                self.peek_sequence.insert(peek.uuid, sequence);
                self.peeks.insert(sequence, peek.clone());
            }
            ComputeCommand::CancelPeek { uuid } => self.retire_peek(*uuid),
        }
        self.recorded += 1;
        Ok(())
    }

    /// Forgets a peek that was answered (or cancelled). Unknown ids are ignored: a peek is answered once.
    pub fn retire_peek(&mut self, uuid: PeekId) {
        if let Some(sequence) = self.peek_sequence.remove(&uuid) {
            self.peeks.remove(&sequence);
        }
    }

    /// The commands that rebuild the live state on a fresh connection, after `Hello`: `CreateInstance`,
    /// the configuration, `AllowWrites`, every live dataflow in creation order with its compactions and
    /// `Schedule`, and the pending peeks. `InitializationComplete` is the caller's to send.
    pub fn replay(&self) -> Vec<ComputeCommand<T>> {
        let mut commands = Vec::with_capacity(self.len());
        if let Some(config) = &self.instance {
            commands.push(ComputeCommand::CreateInstance(config.clone()));
        }
        if let Some(parameters) = &self.parameters {
            commands.push(ComputeCommand::UpdateConfiguration(parameters.clone()));
        }
        if self.allow_writes {
            commands.push(ComputeCommand::AllowWrites);
        }
        let mut export_ids = Vec::new();
        for entry in self.dataflows.values() {
            let mut desc = entry.desc.clone();
            desc.as_of = entry.replay_as_of(&self.exports);
            commands.push(ComputeCommand::CreateDataflow(desc));
            export_ids.clear();
            export_ids.extend(entry.desc.export_ids());
            export_ids.sort();
            for id in &export_ids {
                if let Some(frontier) = &self.exports[id].compaction {
                    commands.push(ComputeCommand::AllowCompaction { id: *id, frontier: frontier.clone() });
                }
            }
            if let Some(named) = entry.scheduled_by {
                // Schedule through a live export: the named one may have been dropped since.
                let live = |id: &GlobalId| self.exports[id].compaction.as_ref().is_none_or(|f| !f.is_empty());
                let id = if live(&named) { Some(named) } else { entry.desc.export_ids().find(|id| live(id)) };
                commands.extend(id.map(ComputeCommand::Schedule));
            }
        }
        for peek in self.peeks.values() {
            commands.push(ComputeCommand::Peek(peek.clone()));
        }
        commands
    }

    /// A copy without pending peeks: the template a new replica of an instance starts from (peeks already
    /// sent to other replicas are not its to answer).
    pub fn without_peeks(&self) -> Self {
        let mut copy = self.clone();
        copy.peeks.clear();
        copy.peek_sequence.clear();
        copy
    }

    /// The number of commands [`replay`](Self::replay) returns.
    pub fn len(&self) -> usize {
        let dataflow_commands: usize = self
            .dataflows
            .values()
            .map(|entry| 1 + entry.compacted + usize::from(entry.scheduled_by.is_some()))
            .sum();
        usize::from(self.instance.is_some())
            + usize::from(self.parameters.is_some())
            + usize::from(self.allow_writes)
            + dataflow_commands
            + self.peeks.len()
    }

    /// Whether the replay is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of live dataflows.
    pub fn dataflow_count(&self) -> usize {
        self.dataflows.len()
    }

    /// The number of pending peeks.
    pub fn peek_count(&self) -> usize {
        self.peeks.len()
    }

    /// The number of commands recorded over the history's lifetime.
    pub fn recorded(&self) -> u64 {
        self.recorded
    }

    /// The coalesced configuration, if any was sent.
    pub fn parameters(&self) -> Option<&ComputeParameters> {
        self.parameters.as_ref()
    }

    /// Whether the peek is pending (sent and neither answered nor cancelled).
    pub fn contains_peek(&self, uuid: PeekId) -> bool {
        self.peek_sequence.contains_key(&uuid)
    }

    /// The as-of a replay gives the live dataflow exporting `id` (its original as-of, advanced to the
    /// compaction its exports have reached), or `None` if no live dataflow exports `id`.
    pub fn replay_as_of(&self, id: GlobalId) -> Option<Antichain<T>> {
        let sequence = self.exports.get(&id)?.sequence;
        self.dataflows[&sequence].replay_as_of(&self.exports)
    }

    /// Whether `id` is exported by a live dataflow.
    pub fn contains_collection(&self, id: GlobalId) -> bool {
        self.exports.contains_key(&id)
    }

    fn entry_mut(&mut self, id: GlobalId) -> Result<&mut DataflowEntry<T>, HistoryError> {
        let sequence = self.exports.get(&id).ok_or(HistoryError::UnknownCollection(id))?.sequence;
        Ok(self.dataflows.get_mut(&sequence).expect("export index points at a live dataflow"))
    }

    fn next_sequence(&mut self) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        sequence
    }
}
