//! [`HydrationGate`]: sequential hydration, i.e. at most `hydration_concurrency` dataflows hydrating at once
//! on a replica.
//!
//! Hydration (computing a dataflow's state as of its as-of) is where a replica's memory and CPU peak. The
//! gate sits on the command stream to one replica and holds back `Schedule` commands: a dataflow is
//! *hydrating* from the moment its `Schedule` is released until every live export reports a write frontier
//! beyond the as-of (or the dataflow is dropped); then the next queued `Schedule` (in the order the
//! controller sent them) is released.
//!
//! Unlike the reference system, the gate handles dataflows with several exports (hydrated when all are),
//! dataflows dropped while queued or while hydrating, a limit changed at runtime by `UpdateConfiguration`
//! (raised: release more now; lowered: release nothing until below it), and reconnects ([`reset`] forgets
//! progress; the replay passes through the gate again, re-applying the limit).
//!
//! **Invariant** (asserted): a `Schedule` is released only while fewer than `limit` dataflows hydrate.
//! **Tests:** the unit tests below and `tests/it/hydration.rs` (a randomized check after every event).
//!
//! [`reset`]: HydrationGate::reset

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use frontiers::{Antichain, Timestamp};
use protocol::{ComputeCommand, GlobalId};

/// The hydration state of one dataflow on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HydrationState {
    /// Created; the controller has not scheduled it.
    Unscheduled,
    /// Scheduled by the controller; the `Schedule` is held back.
    Queued,
    /// `Schedule` released; not all exports have passed the as-of.
    Hydrating,
    /// Every live export has passed the as-of.
    Hydrated,
}

#[derive(Debug, Clone)]
struct GateDataflow<T> {
    as_of: Antichain<T>,
    /// Live exports and whether each has passed the as-of.
    exports: BTreeMap<GlobalId, bool>,
    state: HydrationState,
    /// The id the controller's `Schedule` named (to release it verbatim).
    schedule_id: Option<GlobalId>,
}

impl<T: Timestamp> GateDataflow<T> {
    fn all_exports_hydrated(&self) -> bool {
        self.exports.values().all(|hydrated| *hydrated)
    }

    /// The export a released `Schedule` names: the one the controller named if it is still live, else
    /// any live export (the replica may already have dropped the named one).
    fn schedule_target(&self) -> GlobalId {
        let named = self.schedule_id.expect("only scheduled dataflows are released");
        if self.exports.contains_key(&named) {
            named
        } else {
            *self.exports.keys().next().expect("a tracked dataflow has a live export")
        }
    }
}

/// Sequential hydration for one replica. See the module documentation.
#[derive(Debug, Clone)]
pub struct HydrationGate<T: Timestamp> {
    limit: Option<usize>,
    /// Dataflows keyed by their smallest export id.
    dataflows: BTreeMap<GlobalId, GateDataflow<T>>,
    /// Export id → dataflow key.
    exports: BTreeMap<GlobalId, GlobalId>,
    queue: VecDeque<GlobalId>,
    hydrating: BTreeSet<GlobalId>,
    /// Queued dataflows found hydrated before their turn; their `Schedule`s go out with the next release.
    released_out_of_turn: Vec<GlobalId>,
}

impl<T: Timestamp> HydrationGate<T> {
    /// A gate with the given limit (`None`: unlimited; `Some(0)` is taken as 1, since 0 would never
    /// hydrate anything).
    pub fn new(limit: Option<usize>) -> Self {
        HydrationGate {
            limit: limit.map(|l| l.max(1)),
            dataflows: BTreeMap::new(),
            exports: BTreeMap::new(),
            queue: VecDeque::new(),
            hydrating: BTreeSet::new(),
            released_out_of_turn: Vec::new(),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> Option<usize> {
        self.limit
    }

    /// The number of dataflows hydrating now.
    pub fn hydrating(&self) -> usize {
        self.hydrating.len()
    }

    /// The number of `Schedule`s held back.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The state of the dataflow exporting `id`.
    pub fn state(&self, id: GlobalId) -> Option<HydrationState> {
        let key = self.exports.get(&id)?;
        Some(self.dataflows[key].state)
    }

    /// Whether every known dataflow that was scheduled has hydrated (and none is queued).
    pub fn all_hydrated(&self) -> bool {
        self.queue.is_empty() && self.hydrating.is_empty()
    }

    /// Passes a command towards the replica; returns what to send now (the command itself, unless it is a
    /// held-back `Schedule`, plus any `Schedule`s it releases).
    pub fn on_command(&mut self, command: ComputeCommand<T>) -> Vec<ComputeCommand<T>> {
        let mut out = Vec::new();
        match &command {
            ComputeCommand::CreateDataflow(desc) => {
                let exports: BTreeMap<GlobalId, bool> = desc.export_ids().map(|id| (id, false)).collect();
                if let Some(key) = exports.keys().next().copied() {
                    for id in exports.keys() {
                        self.exports.insert(*id, key);
                    }
                    let as_of = desc.as_of.clone().unwrap_or_else(|| Antichain::from_elem(T::minimum()));
                    self.dataflows.insert(
                        key,
                        GateDataflow {
                            as_of,
                            exports,
                            state: HydrationState::Unscheduled,
                            schedule_id: None,
                        },
                    );
                }
                out.push(command);
            }
            ComputeCommand::Schedule(id) => {
                let Some(key) = self.exports.get(id).copied() else {
                    // Unknown to the gate: not ours to hold back.
                    out.push(command);
                    return out;
                };
                let dataflow = self.dataflows.get_mut(&key).expect("export index points at a dataflow");
                match dataflow.state {
                    HydrationState::Unscheduled => {
                        dataflow.schedule_id = Some(*id);
                        dataflow.state = HydrationState::Queued;
                        self.queue.push_back(key);
                        self.release(&mut out);
                    }
                    HydrationState::Hydrated => {
                        // Already hydrated (a reconnect to a replica that kept it): nothing to wait for.
                        dataflow.schedule_id = Some(*id);
                        out.push(command);
                    }
                    // A repeated Schedule: the first one is already queued or released.
                    HydrationState::Queued | HydrationState::Hydrating => {}
                }
            }
            ComputeCommand::AllowCompaction { id, frontier } if frontier.is_empty() => {
                if let Some(key) = self.exports.remove(id) {
                    let dataflow = self.dataflows.get_mut(&key).expect("export index points at a dataflow");
                    dataflow.exports.remove(id);
                    if dataflow.exports.is_empty() {
                        self.dataflows.remove(&key);
                        self.queue.retain(|k| *k != key);
                        self.hydrating.remove(&key);
                    } else {
                        self.check_hydrated(key);
                    }
                }
                out.push(command);
                self.release(&mut out);
            }
            ComputeCommand::UpdateConfiguration(parameters) => {
                if let Some(limit) = parameters.hydration_concurrency {
                    self.limit = Some(limit.max(1));
                }
                out.push(command);
                self.release(&mut out);
            }
            _ => out.push(command),
        }
        out
    }

    /// Observes an export's write frontier; returns the `Schedule`s this releases.
    pub fn on_write_frontier(&mut self, id: GlobalId, upper: &Antichain<T>) -> Vec<ComputeCommand<T>> {
        let mut out = Vec::new();
        let Some(key) = self.exports.get(&id).copied() else {
            return out;
        };
        let dataflow = self.dataflows.get_mut(&key).expect("export index points at a dataflow");
        let passed = dataflow.as_of.iter().all(|t| !upper.less_equal(t));
        if passed && let Some(hydrated) = dataflow.exports.get_mut(&id) {
            *hydrated = true;
        }
        self.check_hydrated(key);
        self.release(&mut out);
        out
    }

    /// Forgets all progress (a new connection): every dataflow returns to `Unscheduled`, and the replay's
    /// `Schedule`s will queue again. The limit is kept.
    pub fn reset(&mut self) {
        self.dataflows.clear();
        self.exports.clear();
        self.queue.clear();
        self.hydrating.clear();
        self.released_out_of_turn.clear();
    }

    fn check_hydrated(&mut self, key: GlobalId) {
        let Some(dataflow) = self.dataflows.get_mut(&key) else { return };
        if !dataflow.all_exports_hydrated() {
            return;
        }
        match dataflow.state {
            HydrationState::Hydrating => {
                dataflow.state = HydrationState::Hydrated;
                self.hydrating.remove(&key);
            }
            HydrationState::Unscheduled => dataflow.state = HydrationState::Hydrated,
            HydrationState::Queued => {
                // Hydrated without running here (kept by the replica across a reconnect): release its
                // Schedule out of turn; it takes no slot.
                dataflow.state = HydrationState::Hydrated;
                self.queue.retain(|k| *k != key);
                self.released_out_of_turn.push(key);
            }
            HydrationState::Hydrated => {}
        }
    }

    fn release(&mut self, out: &mut Vec<ComputeCommand<T>>) {
        for key in std::mem::take(&mut self.released_out_of_turn) {
            if let Some(dataflow) = self.dataflows.get(&key) {
                out.push(ComputeCommand::Schedule(dataflow.schedule_target()));
            }
        }
        while !self.queue.is_empty() && self.limit.is_none_or(|limit| self.hydrating.len() < limit) {
            let key = self.queue.pop_front().expect("non-empty");
            let dataflow = self.dataflows.get_mut(&key).expect("queued dataflows exist");
            assert!(self.limit.is_none_or(|limit| self.hydrating.len() < limit), "hydration limit exceeded");
            dataflow.state = HydrationState::Hydrating;
            self.hydrating.insert(key);
            out.push(ComputeCommand::Schedule(dataflow.schedule_target()));
        }
    }
}
