//! A model replica process: the compute protocol's semantics over naive evaluation, fast enough to run
//! thousands of seeds, computing every result itself from what storage holds.
//!
//! Each process of a model replica keeps its installed dataflows (lost on a crash, kept across a
//! disconnect), speaks the protocol stages (Hello, replay, `InitializationComplete` with reconciliation),
//! advances each scheduled dataflow's upper to what its inputs allow (storage uppers, upstream indexes;
//! a *slow* replica lags behind the clock), answers peeks and emits subscribe batches for the rows it owns
//! (rows are partitioned across processes by a stable hash), and reports frontiers once per change.
//!
//! **How it computes.** Like a real replica, and from the same sources. A dataflow hydrates by reading a
//! snapshot of each storage import at its as-of from the storage core ([`Store::snapshot`]) and the state of
//! each index import from the arrangement of the upstream dataflow installed on the same process; it then
//! follows its inputs: the storage updates in `[upper, target)` ([`Store::updates_between`]) and the
//! upstream's changes. At every time some input changed it evaluates its plan with the reference
//! interpreter (`protocol::reference::evaluate_dataflow`) and records each export's state in that export's
//! [`Trace`] (its arrangement). Peeks read the trace at their time, subscribes emit its changes, and
//! downstream dataflows follow it. A trace compacts as far as `AllowCompaction` allows and no dataflow or
//! subscribe of the process still reads (as a real arrangement is held by the dataflows importing it).
//! Nothing comes from the oracle: the model and the oracle share only the reference interpreter and what
//! a peek means (`peek.rs`).
//!
//! **What it checks.** The storage core compacts as the controller's holds allow, so when the controller
//! lets go of history a replica still needs, the model cannot read it: a snapshot before the since, or
//! updates from a time before it, is recorded as an [`Invariant::ImportHolds`] violation (as is an index
//! import the process does not have, or has compacted past a dataflow's as-of). Answering a peek at a time
//! before the process's own compaction frontier is an [`Invariant::PeekHolds`] violation; a compaction
//! that moves backwards is [`Invariant::Frontiers`]; a command in the wrong stage is
//! [`Invariant::Protocol`].
//!
//! **Not modelled:** materialized views and copy-to (the real replica's tests cover them), `until`.
//! **Tests:** `trace.rs` (the arrangement); the whole through the simulator (`tests/it/`).

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;

use frontiers::Antichain;
use protocol::reference::{Multiset, consolidate, evaluate_dataflow};
use protocol::{
    ComputeCommand, ComputeResponse, DataflowDescription, Diff, FrontiersResponse, GlobalId,
    PROTOCOL_VERSION, Peek, PeekId, PeekResponse, PeekTarget, ReplicaId, Row, SinkConnection, SubscribeBatch,
    SubscribeResponse,
};
use storage::core::Store;
use storage::{HoldSession, StorageReadHold};

use super::evaluation::{Contents, Evaluations, Fingerprint, Key, Output, describe};
use super::peek::{owner, peek_rows};
use super::trace::{Trace, add, difference};
use super::violation::{Invariant, Violation};

/// What a model process needs from the world to do its work.
pub struct Context<'a> {
    /// The storage layer (the synchronous core the world drives).
    pub store: &'a mut Store,
    /// The simulated clock, in milliseconds.
    pub now: u64,
    /// Storage restarted and its clients are not back yet: no holds can be taken (reads go on: the
    /// restarted store holds the sinces of the crash for a grace period).
    pub storage_down: bool,
    /// Where violations of the design's invariants are recorded.
    pub violations: &'a mut Vec<Violation>,
    /// The evaluation memo every process shares.
    pub evaluations: &'a mut Evaluations,
}

impl Context<'_> {
    fn violation(&mut self, invariant: Invariant, message: String) {
        self.violations.push(Violation::new(invariant, message));
    }
}

#[derive(Debug, Clone)]
struct ExportState {
    since: Antichain<u64>,
    dropped: bool,
}

#[derive(Debug, Clone)]
struct SubscribeState {
    with_snapshot: bool,
    started: bool,
    /// The upper of the last emitted batch.
    emitted: u64,
    /// The contents at `emitted - 1` (what the updates emitted so far add up to, with the snapshot).
    last: Option<Rc<Contents>>,
    /// An error ended the stream: nothing more is emitted.
    failed: bool,
}

/// What a hydrated dataflow holds: its inputs as of `upper - 1`, and each export's arrangement.
#[derive(Debug, Default)]
struct Computed {
    /// Each storage import's rows, kept up to date update by update: the reference interpreter's input
    /// map (index imports join it only for the length of an evaluation).
    inputs: BTreeMap<GlobalId, Multiset>,
    /// The fingerprint of each storage import's rows, kept with them.
    fingerprints: BTreeMap<GlobalId, Fingerprint>,
    /// Each index import's state: the upstream trace's, shared.
    indexes: BTreeMap<GlobalId, Output>,
    /// Every export's arrangement.
    traces: BTreeMap<GlobalId, Trace>,
}

impl Computed {
    /// Takes a storage import's whole contents.
    fn set_storage(&mut self, id: GlobalId, rows: Multiset) {
        self.fingerprints.insert(id, Fingerprint::of(&rows));
        self.inputs.insert(id, rows);
    }

    /// Adds `diff` copies of `row` to a storage import.
    fn update_storage(&mut self, id: GlobalId, row: &Row, diff: Diff) {
        add(self.inputs.entry(id).or_default(), row, diff);
        self.fingerprints.entry(id).or_default().add(row, diff);
    }

    /// Evaluates the dataflow on the current inputs: every export's state (memoized by content).
    fn evaluate(
        &mut self,
        dataflow: &Installed,
        evaluations: &mut Evaluations,
    ) -> Rc<BTreeMap<GlobalId, Output>> {
        let mut inputs: Vec<(GlobalId, Fingerprint)> =
            self.fingerprints.iter().map(|(id, f)| (*id, *f)).collect();
        let mut errors = Vec::new();
        for (id, state) in &self.indexes {
            match state {
                Ok(contents) => inputs.push((*id, contents.fingerprint)),
                Err(error) => errors.push((*id, error.clone())),
            }
        }
        inputs.sort();
        let key = Key { dataflow: dataflow.fingerprint, inputs, errors };
        let (rows, indexes) = (&mut self.inputs, &self.indexes);
        evaluations.evaluate(key, &dataflow.desc, || {
            for (id, state) in indexes {
                if let Ok(contents) = state {
                    rows.insert(*id, contents.rows.clone());
                }
            }
            let outputs = evaluate_dataflow(&dataflow.desc, rows).map_err(|e| e.to_string());
            for id in indexes.keys() {
                rows.remove(id);
            }
            outputs
        })
    }
}

/// A change to one input of a dataflow at one time.
enum InputChange {
    /// A storage update.
    Storage(GlobalId, Row, Diff),
    /// An upstream index's new state.
    Index(GlobalId, Output),
}

#[derive(Debug)]
struct Installed {
    desc: Arc<DataflowDescription<u64>>,
    /// What the description computes, for the evaluation memo.
    fingerprint: Fingerprint,
    as_of: u64,
    scheduled: bool,
    /// Everything before this time is computed.
    upper: u64,
    exports: BTreeMap<GlobalId, ExportState>,
    subscribes: BTreeMap<GlobalId, SubscribeState>,
    /// The process's own holds on the storage imports, at `upper` (acquired at the as-of when scheduled,
    /// as a real replica's storage feed does); `None` until scheduled.
    storage_holds: Option<BTreeMap<GlobalId, StorageReadHold>>,
    /// `None` until the dataflow hydrates (its first advance).
    computed: Option<Computed>,
}

impl Installed {
    fn new(desc: Arc<DataflowDescription<u64>>) -> Self {
        let as_of = desc.as_of.as_ref().and_then(|a| a.as_option().copied()).unwrap_or(0);
        let exports = desc
            .export_ids()
            .map(|id| (id, ExportState { since: Antichain::from_elem(as_of), dropped: false }))
            .collect();
        let subscribes = desc
            .sink_exports
            .iter()
            .filter_map(|(id, sink)| match sink.connection {
                SinkConnection::Subscribe { with_snapshot } => Some((
                    *id,
                    SubscribeState {
                        with_snapshot,
                        started: false,
                        emitted: as_of,
                        last: None,
                        failed: false,
                    },
                )),
                _ => None,
            })
            .collect();
        Installed {
            fingerprint: describe(&desc),
            desc,
            as_of,
            scheduled: false,
            upper: as_of,
            exports,
            subscribes,
            storage_holds: None,
            computed: None,
        }
    }

    /// Whether a running `self` can stand in for a freshly replayed `other` (DESIGN: reconciliation).
    /// Only a dataflow that started (scheduled, so holding its storage imports from its own progress)
    /// is kept: one not yet scheduled would start from its earlier as-of, which the controller, having
    /// replayed a later one, no longer holds.
    fn compatible_with(&self, other: &DataflowDescription<u64>) -> bool {
        let mut mine = (*self.desc).clone();
        mine.as_of = other.as_of.clone();
        let later = other.as_of.as_ref().and_then(|a| a.as_option().copied()).unwrap_or(0) >= self.as_of;
        // Subscribes are never kept: a kept subscribe could not re-emit what the old connection lost.
        mine == *other && later && self.subscribes.is_empty() && self.storage_holds.is_some()
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Stage {
    AwaitHello,
    AwaitInstance,
    Replay,
    Live,
}

#[derive(Debug)]
struct Connection {
    epoch: u64,
    stage: Stage,
    staged: BTreeMap<GlobalId, Installed>,
    peeks: BTreeMap<PeekId, Peek<u64>>,
    reported: BTreeMap<GlobalId, Antichain<u64>>,
}

/// One process of a model replica.
#[derive(Debug)]
pub struct ModelProcess {
    replica: ReplicaId,
    process: usize,
    processes: usize,
    alive: bool,
    /// The process's storage client's holds (re-registered by the world after a storage restart).
    session: HoldSession,
    installed: BTreeMap<GlobalId, Installed>,
    connection: Option<Connection>,
    /// A slow replica computes only up to `now - lag_ms`.
    pub lag_ms: u64,
    /// Fault injection: report one frontier lower than before.
    pub regress_once: bool,
    /// Dataflows built (not kept by reconciliation), for tests of reconciliation.
    pub built: u64,
}

impl ModelProcess {
    /// Process `process` of `replica`, which has `processes`.
    pub fn new(replica: ReplicaId, process: usize, processes: usize) -> Self {
        ModelProcess {
            replica,
            process,
            processes,
            alive: true,
            session: HoldSession::new(),
            installed: BTreeMap::new(),
            connection: None,
            lag_ms: 0,
            regress_once: false,
            built: 0,
        }
    }

    /// Whether the process runs (accepts connections).
    pub fn is_alive(&self) -> bool {
        self.alive
    }

    /// Crashes: all state is lost (its storage holds are released); connections fail until
    /// [`restart`](Self::restart).
    pub fn crash(&mut self) {
        self.alive = false;
        self.installed.clear();
        self.connection = None;
        self.session = HoldSession::new();
    }

    /// The process's storage holds, as its storage client keeps them.
    pub fn session(&self) -> &HoldSession {
        &self.session
    }

    /// `replica process N`, for messages.
    fn name(&self) -> String {
        format!("{} process {}", self.replica, self.process)
    }

    /// Comes back with no state.
    pub fn restart(&mut self) {
        self.alive = true;
    }

    /// A new connection replaces the old one.
    pub fn connect(&mut self, epoch: u64) {
        self.connection = Some(Connection {
            epoch,
            stage: Stage::AwaitHello,
            staged: BTreeMap::new(),
            peeks: BTreeMap::new(),
            reported: BTreeMap::new(),
        });
    }

    /// The connection is gone; installed dataflows keep running.
    pub fn disconnect(&mut self) {
        self.connection = None;
    }

    /// The ids of every export this process has installed and not dropped.
    pub fn installed_exports(&self) -> BTreeSet<GlobalId> {
        self.installed
            .values()
            .flat_map(|i| i.exports.iter().filter(|(_, e)| !e.dropped).map(|(id, _)| *id))
            .collect()
    }

    /// The peeks this process has received on connection `epoch` and not answered yet: `(uuid, time)`.
    pub fn pending_peeks(&self, epoch: u64) -> Vec<(PeekId, u64)> {
        self.connection
            .iter()
            .filter(|c| c.epoch == epoch)
            .flat_map(|c| c.peeks.values().map(|p| (p.uuid, p.timestamp)))
            .collect()
    }

    /// The number of rows of each computed export's latest state (for keeping the workload small).
    pub fn export_rows(&self) -> impl Iterator<Item = (GlobalId, usize)> + '_ {
        self.installed
            .values()
            .filter_map(|d| d.computed.as_ref())
            .flat_map(|c| c.traces.iter().map(|(id, trace)| (*id, trace.latest_rows())))
    }

    /// Handles a command of connection `epoch`; returns the responses it causes at once.
    pub fn receive(
        &mut self,
        epoch: u64,
        command: ComputeCommand<u64>,
        ctx: &mut Context<'_>,
    ) -> Vec<ComputeResponse<u64>> {
        let mut out = Vec::new();
        // Exports whose drop was just reported: their last report on this connection.
        let mut closed = Vec::new();
        let Some(connection) = self.connection.as_mut().filter(|c| c.epoch == epoch) else { return out };
        match (connection.stage, command) {
            (Stage::AwaitHello, ComputeCommand::Hello { version, nonce }) => {
                out.push(ComputeResponse::Hello { version: PROTOCOL_VERSION.min(version), nonce });
                connection.stage = Stage::AwaitInstance;
            }
            (Stage::AwaitInstance, ComputeCommand::CreateInstance(_)) => connection.stage = Stage::Replay,
            (Stage::Replay, ComputeCommand::InitializationComplete) => {
                connection.stage = Stage::Live;
                let staged = std::mem::take(&mut connection.staged);
                let mut installed = BTreeMap::new();
                let mut kept_exports: BTreeSet<GlobalId> = BTreeSet::new();
                // In key order, so upstreams are decided before their importers.
                for (key, fresh) in staged {
                    let kept = self.installed.remove(&key).filter(|old| {
                        old.compatible_with(&fresh.desc)
                            && old.desc.index_imports.keys().all(|id| kept_exports.contains(id))
                    });
                    let dataflow = match kept {
                        Some(mut old) => {
                            old.exports = fresh.exports;
                            old.scheduled |= fresh.scheduled;
                            kept_exports.extend(old.desc.export_ids());
                            old
                        }
                        None => {
                            self.built += 1;
                            fresh
                        }
                    };
                    installed.insert(key, dataflow);
                }
                self.installed = installed;
            }
            (Stage::Replay | Stage::Live, command) => {
                let replay = connection.stage == Stage::Replay;
                let target = if replay { &mut connection.staged } else { &mut self.installed };
                match command {
                    ComputeCommand::CreateDataflow(desc) => {
                        let desc = Arc::new(desc);
                        let key = desc.export_ids().next().expect("dataflows export something");
                        if !replay {
                            self.built += 1;
                        }
                        target.insert(key, Installed::new(desc));
                    }
                    ComputeCommand::Schedule(id) => {
                        if let Some(df) = target.values_mut().find(|d| d.exports.contains_key(&id)) {
                            df.scheduled = true;
                        }
                    }
                    ComputeCommand::AllowCompaction { id, frontier } => {
                        let Some(df) = target.values_mut().find(|d| d.exports.contains_key(&id)) else {
                            ctx.violation(
                                Invariant::Protocol,
                                format!("AllowCompaction for {id}, which the replica does not have"),
                            );
                            return out;
                        };
                        let export = df.exports.get_mut(&id).expect("found");
                        if !frontiers::PartialOrder::less_equal(&export.since, &frontier) {
                            ctx.violation(
                                Invariant::Frontiers,
                                format!("compaction of {id} regressed to {frontier:?}"),
                            );
                        }
                        export.since = frontier.clone();
                        if frontier.is_empty() && !export.dropped {
                            export.dropped = true;
                            if !replay {
                                if let Some(sub) = df.subscribes.remove(&id) {
                                    out.push(ComputeResponse::SubscribeResponse {
                                        id,
                                        response: SubscribeResponse::DroppedAt(Antichain::from_elem(
                                            sub.emitted,
                                        )),
                                    });
                                }
                                out.push(ComputeResponse::Frontiers {
                                    id,
                                    frontiers: FrontiersResponse {
                                        write_frontier: Some(Antichain::new()),
                                        ..Default::default()
                                    },
                                });
                                closed.push(id);
                            }
                            df.subscribes.remove(&id);
                        }
                        target.retain(|_, d| d.exports.values().any(|e| !e.dropped));
                    }
                    ComputeCommand::Peek(peek) => {
                        connection.peeks.insert(peek.uuid, peek);
                    }
                    ComputeCommand::CancelPeek { uuid } => {
                        if connection.peeks.remove(&uuid).is_some() {
                            out.push(ComputeResponse::PeekResponse {
                                uuid,
                                response: PeekResponse::Canceled,
                            });
                        }
                    }
                    ComputeCommand::UpdateConfiguration(_) | ComputeCommand::AllowWrites => {}
                    other => ctx.violation(
                        Invariant::Protocol,
                        format!("replica got {} in stage {:?}", other.name(), connection.stage),
                    ),
                }
            }
            (stage, other) => {
                ctx.violation(Invariant::Protocol, format!("replica got {} in stage {stage:?}", other.name()))
            }
        }
        if let Some(connection) = self.connection.as_mut() {
            for id in closed {
                connection.reported.insert(id, Antichain::new());
            }
        }
        out
    }

    /// Computes: advances uppers, answers peeks, emits subscribe batches and changed frontiers.
    pub fn step(&mut self, ctx: &mut Context<'_>) -> Vec<ComputeResponse<u64>> {
        let mut out = Vec::new();
        if !self.alive {
            return out;
        }
        self.advance(ctx, &mut out);
        let Some(connection) = self.connection.as_mut().filter(|c| c.stage == Stage::Live) else {
            return out;
        };
        // Frontiers, once per change per connection.
        for dataflow in self.installed.values() {
            for (id, export) in &dataflow.exports {
                let frontier =
                    if export.dropped { Antichain::new() } else { Antichain::from_elem(dataflow.upper) };
                if connection.reported.get(id) == Some(&frontier) {
                    continue;
                }
                let mut reported = frontier.clone();
                if self.regress_once
                    && let Some(previous) = connection.reported.get(id).and_then(|f| f.as_option().copied())
                    && previous > 0
                {
                    self.regress_once = false;
                    reported = Antichain::from_elem(previous - 1);
                }
                connection.reported.insert(*id, reported.clone());
                out.push(ComputeResponse::Frontiers {
                    id: *id,
                    frontiers: FrontiersResponse { write_frontier: Some(reported), ..Default::default() },
                });
            }
        }
        // Peeks whose time is complete.
        let installed = &self.installed;
        let ready: Vec<PeekId> = connection
            .peeks
            .iter()
            .filter(|(_, peek)| {
                let id = peek.target.id();
                match installed.values().find(|d| d.exports.get(&id).is_some_and(|e| !e.dropped)) {
                    Some(df) => peek.timestamp < df.upper,
                    None => true,
                }
            })
            .map(|(uuid, _)| *uuid)
            .collect();
        let ready: Vec<Peek<u64>> =
            ready.into_iter().filter_map(|uuid| connection.peeks.remove(&uuid)).collect();
        for peek in ready {
            let response = self.answer(&peek, ctx);
            out.push(ComputeResponse::PeekResponse { uuid: peek.uuid, response });
        }
        out
    }

    fn answer(&self, peek: &Peek<u64>, ctx: &mut Context<'_>) -> PeekResponse {
        let PeekTarget::Index { id } = peek.target else {
            return PeekResponse::Error("the model answers index peeks only".to_string());
        };
        let Some(dataflow) = self.installed.values().find(|d| d.exports.get(&id).is_some_and(|e| !e.dropped))
        else {
            return PeekResponse::Error(format!("collection {id} is not installed"));
        };
        let since = &dataflow.exports[&id].since;
        if !since.less_equal(&peek.timestamp) {
            ctx.violation(
                Invariant::PeekHolds,
                format!(
                    "{} answers peek {} on {id} at {} after compacting to {since:?}",
                    self.name(),
                    peek.uuid,
                    peek.timestamp
                ),
            );
            return PeekResponse::Error(format!("peek at {} is before the since {since:?}", peek.timestamp));
        }
        // Ready means `timestamp < upper`, and the since is at or after the as-of: the dataflow hydrated,
        // and its trace is compacted no further than the since.
        let computed = dataflow.computed.as_ref().expect("a peek below the upper of a hydrated dataflow");
        let state =
            computed.traces[&id].read(peek.timestamp).expect("traces compact no further than the since");
        match state {
            Ok(contents) => {
                let contents = &contents.rows;
                let key = dataflow.desc.index_exports.get(&id).map(|e| e.key.clone()).unwrap_or_default();
                match peek_rows(
                    contents,
                    &key,
                    peek.literal_constraints.as_deref(),
                    &peek.map_filter_project,
                    &peek.finishing,
                    Some((self.process, self.processes)),
                ) {
                    Ok(rows) => PeekResponse::Rows(rows),
                    Err(e) => PeekResponse::Error(e),
                }
            }
            Err(e) => PeekResponse::Error(e.clone()),
        }
    }

    /// Advances every scheduled dataflow as far as its inputs allow, emitting subscribe batches on the way,
    /// then compacts the arrangements.
    fn advance(&mut self, ctx: &mut Context<'_>, out: &mut Vec<ComputeResponse<u64>>) {
        let live = self.connection.as_ref().is_some_and(|c| c.stage == Stage::Live);
        let cap = ctx.now.saturating_sub(self.lag_ms);
        // Dataflows in creation order (keys are the first export id; upstreams come first by construction
        // because they are created first and ids grow).
        let keys: Vec<GlobalId> = self.installed.keys().copied().collect();
        for key in keys {
            if !self.installed[&key].scheduled {
                continue;
            }
            if self.installed[&key].storage_holds.is_none() {
                if ctx.storage_down {
                    continue; // The storage client waits for the server.
                }
                if !self.hold_storage(key, ctx) {
                    return;
                }
            }
            let dataflow = &self.installed[&key];
            let mut target = cap;
            for id in dataflow.desc.source_imports.keys() {
                let upper = ctx.store.frontiers(*id).and_then(|f| f.upper.as_option().copied()).unwrap_or(0);
                target = target.min(upper);
            }
            for id in dataflow.desc.index_imports.keys() {
                match self.installed.values().find(|d| d.exports.contains_key(id)) {
                    Some(upstream) => target = target.min(upstream.upper),
                    None => {
                        ctx.violation(
                            Invariant::ImportHolds,
                            format!(
                                "{}: dataflow {key} imports index {id}, which the process does not have",
                                self.name()
                            ),
                        );
                        return;
                    }
                }
            }
            if target <= dataflow.upper {
                continue;
            }
            let from = dataflow.upper;
            if !self.compute(key, target, ctx) {
                return;
            }
            if live && !self.installed[&key].subscribes.is_empty() {
                self.emit_subscribes(key, target, out);
            }
            let dataflow = self.installed.get_mut(&key).expect("present");
            assert!(dataflow.upper == from, "computed from {from}");
            dataflow.upper = target;
            // Storage is read from the upper on: the process's own holds follow it.
            for hold in dataflow.storage_holds.iter_mut().flat_map(|holds| holds.values_mut()) {
                hold.try_downgrade(Antichain::from_elem(target)).expect("the upper only advances");
            }
        }
        self.compact();
    }

    /// Takes the process's own holds on the storage imports of a dataflow just scheduled, at its as-of.
    /// Returns false (with a violation recorded) if storage no longer holds the as-of: the controller let
    /// go of history a dataflow it installed needs.
    fn hold_storage(&mut self, key: GlobalId, ctx: &mut Context<'_>) -> bool {
        let name = self.name();
        let dataflow = self.installed.get_mut(&key).expect("present");
        let mut holds = BTreeMap::new();
        for id in dataflow.desc.source_imports.keys() {
            let hold = ctx
                .store
                .acquire_read_hold(*id, Antichain::from_elem(dataflow.upper))
                .and_then(|hold| self.session.wrap(hold, self.session.generation(), None));
            match hold {
                Ok(hold) => {
                    holds.insert(*id, hold);
                }
                Err(e) => {
                    ctx.violation(
                        Invariant::ImportHolds,
                        format!(
                            "{name} cannot hold storage import {id} of dataflow {key} at {}: {e}",
                            dataflow.upper
                        ),
                    );
                    return false;
                }
            }
        }
        dataflow.storage_holds = Some(holds);
        true
    }

    /// Computes dataflow `key` from its upper to `target`: hydrates it first if it has not yet, then
    /// evaluates it at every time in between at which an input changed. Returns false (with a violation
    /// recorded) if an input could not be read.
    fn compute(&mut self, key: GlobalId, target: u64, ctx: &mut Context<'_>) -> bool {
        // Taken out while it changes (no dataflow imports itself, so its upstreams stay readable).
        let taken = self.installed.get_mut(&key).expect("present").computed.take();
        let dataflow = &self.installed[&key];
        let (mut computed, lower) = match taken {
            Some(computed) => (computed, dataflow.upper),
            None => match self.hydrate(dataflow, ctx) {
                Some(computed) => (computed, dataflow.as_of + 1),
                None => return false,
            },
        };
        let Some(changes) = self.input_changes(dataflow, lower, target, ctx) else {
            // Put back what was computed before; a hydration that cannot go on is not kept.
            if lower == dataflow.upper {
                self.installed.get_mut(&key).expect("present").computed = Some(computed);
            }
            return false;
        };
        for (time, changes) in changes {
            for change in changes {
                match change {
                    InputChange::Storage(id, row, diff) => computed.update_storage(id, &row, diff),
                    InputChange::Index(id, state) => {
                        computed.indexes.insert(id, state);
                    }
                }
            }
            let outputs = computed.evaluate(dataflow, ctx.evaluations);
            for (id, output) in outputs.iter() {
                computed.traces.get_mut(id).expect("a trace per export").push(time, output.clone());
            }
        }
        self.installed.get_mut(&key).expect("present").computed = Some(computed);
        true
    }

    /// The first computation of a dataflow, at its as-of: storage snapshots and upstream states there.
    fn hydrate(&self, dataflow: &Installed, ctx: &mut Context<'_>) -> Option<Computed> {
        let as_of = dataflow.as_of;
        let mut computed = Computed::default();
        for id in dataflow.desc.source_imports.keys() {
            match ctx.store.snapshot(*id, as_of) {
                Ok(rows) => computed.set_storage(*id, consolidate(rows)),
                Err(e) => {
                    ctx.violation(
                        Invariant::ImportHolds,
                        format!("{} cannot hydrate a dataflow at its as-of {as_of}: {e}", self.name()),
                    );
                    return None;
                }
            }
        }
        for id in dataflow.desc.index_imports.keys() {
            let trace = self.upstream_trace(*id);
            match trace.and_then(|t| t.read(as_of)) {
                Some(state) => {
                    computed.indexes.insert(*id, state.clone());
                }
                None => {
                    ctx.violation(
                        Invariant::ImportHolds,
                        format!(
                            "{} cannot hydrate a dataflow at its as-of {as_of}: index {id} is {}",
                            self.name(),
                            match trace {
                                Some(t) => format!("compacted to {}", t.compacted()),
                                None => "not hydrated".to_string(),
                            }
                        ),
                    );
                    return None;
                }
            }
        }
        let outputs = computed.evaluate(dataflow, ctx.evaluations);
        for (id, output) in outputs.iter() {
            computed.traces.insert(*id, Trace::new(as_of, output.clone()));
        }
        Some(computed)
    }

    /// The arrangement of index `id` on this process, if a hydrated dataflow exports it.
    fn upstream_trace(&self, id: GlobalId) -> Option<&Trace> {
        self.installed.values().find_map(|d| d.computed.as_ref().and_then(|c| c.traces.get(&id)))
    }

    /// Every change to the dataflow's inputs at times in `[lower, upper)`, by time: storage updates read
    /// from the store, upstream changes from their traces. `None` (with a violation) if storage no longer
    /// holds that history.
    fn input_changes(
        &self,
        dataflow: &Installed,
        lower: u64,
        upper: u64,
        ctx: &mut Context<'_>,
    ) -> Option<BTreeMap<u64, Vec<InputChange>>> {
        let mut changes: BTreeMap<u64, Vec<InputChange>> = BTreeMap::new();
        if lower >= upper {
            return Some(changes);
        }
        for id in dataflow.desc.source_imports.keys() {
            match ctx.store.updates_between(*id, lower, &Antichain::from_elem(upper)) {
                Ok(updates) => {
                    for (row, time, diff) in updates {
                        changes.entry(time).or_default().push(InputChange::Storage(*id, row, diff));
                    }
                }
                Err(e) => {
                    ctx.violation(
                        Invariant::ImportHolds,
                        format!(
                            "{} cannot read storage from {lower} to compute up to {upper}: {e}",
                            self.name()
                        ),
                    );
                    return None;
                }
            }
        }
        for id in dataflow.desc.index_imports.keys() {
            // The upstream advanced first (it was created first); its trace is held at this dataflow's upper.
            let Some(trace) = self.upstream_trace(*id) else {
                ctx.violation(
                    Invariant::ImportHolds,
                    format!("{} reads index {id} from {lower}, before it hydrated", self.name()),
                );
                return None;
            };
            for (time, state) in trace.changes(lower, upper) {
                changes.entry(time).or_default().push(InputChange::Index(*id, state.clone()));
            }
        }
        Some(changes)
    }

    /// Emits one batch per subscribe of dataflow `key`, from what it emitted so far to `upper`.
    fn emit_subscribes(&mut self, key: GlobalId, upper: u64, out: &mut Vec<ComputeResponse<u64>>) {
        let (process, processes) = (self.process, self.processes);
        let dataflow = self.installed.get_mut(&key).expect("present");
        let as_of = dataflow.as_of;
        let computed = dataflow.computed.as_ref().expect("computed before emitting");
        for (id, sub) in dataflow.subscribes.iter_mut() {
            if sub.failed {
                continue;
            }
            let trace = &computed.traces[id];
            let mut updates: Vec<(u64, Row, Diff)> = Vec::new();
            let mut error = None;
            let mut emit = |time: u64, state: &Output, last: &mut Option<Rc<Contents>>| match state {
                Ok(contents) => {
                    let empty = Multiset::new();
                    let before = last.as_ref().map_or(&empty, |c| &c.rows);
                    for (row, diff) in difference(&contents.rows, before) {
                        if owner(&row, processes) == process {
                            updates.push((time, row, diff));
                        }
                    }
                    *last = Some(Rc::clone(contents));
                    true
                }
                Err(e) => {
                    error = Some(e.clone());
                    false
                }
            };
            let mut start = sub.emitted;
            let mut going = true;
            if !sub.started {
                sub.started = true;
                start = as_of + 1;
                let state = trace.read(as_of).expect("a subscribe's trace is held at what it emitted");
                going = match state {
                    // Without a snapshot the stream starts from the contents at the as-of, unsent.
                    Ok(contents) if !sub.with_snapshot => {
                        sub.last = Some(Rc::clone(contents));
                        true
                    }
                    state => emit(as_of, state, &mut sub.last),
                };
            }
            if going {
                for (time, state) in trace.changes(start, upper) {
                    if !emit(time, state, &mut sub.last) {
                        break;
                    }
                }
            }
            sub.failed = error.is_some();
            let batch = SubscribeBatch {
                lower: Antichain::from_elem(sub.emitted),
                upper: if error.is_some() { Antichain::new() } else { Antichain::from_elem(upper) },
                updates: match error {
                    Some(e) => Err(e),
                    None => Ok(updates),
                },
            };
            sub.emitted = upper;
            out.push(ComputeResponse::SubscribeResponse {
                id: *id,
                response: SubscribeResponse::Batch(batch),
            });
        }
    }

    /// Compacts every arrangement as far as `AllowCompaction` allows and no reader on this process needs:
    /// a dataflow importing it reads from its own upper, a subscribe emits from what it emitted, and nothing
    /// is compacted past the last time its own dataflow computed.
    fn compact(&mut self) {
        let mut readers: BTreeMap<GlobalId, u64> = BTreeMap::new();
        for dataflow in self.installed.values() {
            for id in dataflow.desc.index_imports.keys() {
                let reader = readers.entry(*id).or_insert(u64::MAX);
                *reader = (*reader).min(dataflow.upper);
            }
        }
        for dataflow in self.installed.values_mut() {
            let Some(computed) = dataflow.computed.as_mut() else { continue };
            for (id, trace) in computed.traces.iter_mut() {
                let allowed = dataflow.exports[id].since.as_option().copied().unwrap_or(u64::MAX);
                // The state at `upper - 1` is the last one computed: compacting further would merge it
                // with states not yet computed.
                let mut frontier = allowed.min(dataflow.upper - 1);
                if let Some(reader) = readers.get(id) {
                    frontier = frontier.min(*reader);
                }
                if let Some(sub) = dataflow.subscribes.get(id) {
                    frontier = frontier.min(sub.emitted);
                }
                trace.compact(frontier);
            }
        }
    }
}
