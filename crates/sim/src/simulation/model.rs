//! A model replica process: the compute protocol's semantics over naive evaluation, fast enough to run
//! thousands of seeds, computing every result itself from what storage holds.
//!
//! Each process of a model replica keeps its installed dataflows (lost on a crash, kept across a
//! disconnect), speaks the protocol stages (Hello, replay, `InitializationComplete` with reconciliation),
//! advances each scheduled dataflow's upper to what its inputs allow (storage uppers, upstream indexes;
//! a *slow* replica lags behind the clock), answers peeks and emits subscribe batches for the rows it owns
//! (rows are partitioned across processes by a stable hash), and reports frontiers once per change.
//!
//! **How it computes.** From the same sources as a real replica. When a dataflow is scheduled the process
//! takes its own storage read holds on the dataflow's storage imports at the as-of (as a real replica's
//! storage feed does) and moves them with the dataflow's upper. It hydrates from a snapshot of each
//! storage import at the as-of, read from the simulated shards ([`SimStorage::snapshot`]), and then
//! follows its inputs: the storage updates in `[upper, target)` ([`SimStorage::updates_between`]) and
//! the change times of the upstream dataflows on the same process that its index imports come from, all
//! kept in the
//! dataflow's [`Computed`] history. A state is evaluated when something reads it (a peek at its time, a
//! subscribe emitting its change times, a downstream dataflow evaluated at the same time) with the
//! reference interpreter (`protocol::reference::evaluate_dataflow`) on the inputs recorded for that
//! time and the upstream states then, through the world's evaluation memo (`evaluation.rs`, keyed by the
//! content of what is evaluated). A dataflow's history compacts as far as `AllowCompaction` allows and no
//! dataflow or subscribe on the process still reads it (as a real arrangement is held by the dataflows
//! importing it). Nothing comes from the oracle: the model and the oracle share only the reference
//! interpreter and what a peek means (`peek.rs`).
//!
//! While storage is down (an outage of the consensus or the blob store) a process neither takes holds nor
//! reads: its dataflows stall and catch up when storage is back; peeks at times it computed are still
//! answered.
//!
//! **What it checks.** Storage compacts as the controller's holds allow, so when the controller
//! lets go of history a replica needs, the model cannot read or hold it: a hold or snapshot at the as-of
//! of a dataflow it was just given, or updates from its upper on, refused by storage, is recorded as an
//! [`Invariant::ImportHolds`] violation (as is an index import the process does not have, or has
//! compacted past a dataflow's as-of). Answering a peek at a time before the process's own compaction
//! frontier is an [`Invariant::PeekHolds`] violation; a compaction that moves backwards is
//! [`Invariant::Frontiers`]; a command in the wrong stage is [`Invariant::Protocol`].
//!
//! **Reconciliation** keeps a running dataflow across a reconnect when the replay creates the same one
//! with an as-of no earlier, its index imports are kept too, it has no subscribe, and it was scheduled
//! (holds its storage imports from its own progress): one not yet scheduled would start from its earlier
//! as-of, which the controller no longer holds once it replayed a later one.
//!
//! **Not modelled:** materialized views and copy-to (the real replica's tests cover them), `until`.
//! **Tests:** `dataflow.rs` (the input history); the whole through the simulator (`tests/it/`).

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
use storage::StorageReadHold;

use super::dataflow::{Computed, Outputs, difference};
use super::evaluation::{Contents, Evaluations, Fingerprint, Key, Output, describe};
use super::peek::{owner, peek_rows};
use super::storage::{ClientId, SimStorage};
use super::violation::{Invariant, Violation};

/// What a model process needs from the world to do its work.
pub struct Context<'a> {
    /// The storage layer (the shards the world simulates).
    pub store: &'a mut SimStorage,
    /// The simulated clock, in milliseconds.
    pub now: u64,
    /// Where violations of the design's invariants are recorded.
    pub violations: &'a mut Vec<Violation>,
    /// The evaluation memo every process shares.
    pub evaluations: &'a mut Evaluations,
}

/// Whether a process could take its storage holds for a dataflow.
enum Held {
    Yes,
    /// Storage is down: try again at a later step.
    Later,
    /// Refused (a violation is recorded).
    Refused,
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

impl SubscribeState {
    /// The batch from what was emitted so far to `upper`, from the dataflow's states at its change times
    /// (`states`; the one at the as-of too if the stream has not started), with the updates of the rows
    /// `part = (process, processes)` owns: the differences between consecutive states (the whole state at
    /// the as-of first, with a snapshot). An error state ends the stream.
    fn next_batch(
        &mut self,
        id: GlobalId,
        as_of: u64,
        upper: u64,
        states: &BTreeMap<u64, Outputs>,
        (process, processes): (usize, usize),
    ) -> SubscribeBatch<u64> {
        let mut updates: Vec<(u64, Row, Diff)> = Vec::new();
        let mut error = None;
        let start = if self.started { self.emitted } else { as_of };
        for (time, outputs) in states.range(start..upper) {
            match &outputs[&id] {
                // Without a snapshot the stream starts from the contents at the as-of, unsent.
                Ok(_) if *time == as_of && !self.started && !self.with_snapshot => {}
                Ok(contents) => {
                    let empty = Multiset::new();
                    let before = self.last.as_ref().map_or(&empty, |c| &c.rows);
                    for (row, diff) in difference(&contents.rows, before) {
                        if owner(&row, processes) == process {
                            updates.push((*time, row, diff));
                        }
                    }
                }
                Err(e) => {
                    error = Some(e.clone());
                    break;
                }
            }
            if let Ok(contents) = &outputs[&id] {
                self.last = Some(Rc::clone(contents));
            }
        }
        self.started = true;
        self.failed = error.is_some();
        let batch = SubscribeBatch {
            lower: Antichain::from_elem(self.emitted),
            upper: if error.is_some() { Antichain::new() } else { Antichain::from_elem(upper) },
            updates: match error {
                Some(e) => Err(e),
                None => Ok(updates),
            },
        };
        self.emitted = upper;
        batch
    }
}

/// The storage updates at every time an input of a dataflow changed (none where only an upstream did).
type InputChanges = BTreeMap<u64, Vec<(GlobalId, Row, Diff)>>;

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
    /// The process's storage client (a leased reader; a new one after each crash).
    client: ClientId,
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
    pub fn new(replica: ReplicaId, process: usize, processes: usize, client: ClientId) -> Self {
        ModelProcess {
            replica,
            process,
            processes,
            alive: true,
            client,
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

    /// Crashes: all state is lost (its storage holds with it); connections fail until
    /// [`restart`](Self::restart). It comes back as storage client `client` (the world tells storage
    /// that the old one crashed).
    pub fn crash(&mut self, client: ClientId) {
        self.alive = false;
        self.installed.clear();
        self.connection = None;
        self.client = client;
    }

    /// The process's storage client.
    pub fn client(&self) -> &ClientId {
        &self.client
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

    /// The number of rows of each export in the newest state this process evaluated (for keeping the
    /// workload small).
    pub fn export_rows(&self) -> impl Iterator<Item = (GlobalId, usize)> + '_ {
        self.installed.values().flat_map(|d| {
            d.exports.keys().map(move |id| (*id, d.computed.as_ref().map_or(0, |c| c.latest_rows(*id))))
        })
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
            (Stage::AwaitHello, ComputeCommand::Hello { version, nonce, .. }) => {
                out.push(ComputeResponse::Hello { version: PROTOCOL_VERSION.min(version), nonce });
                connection.stage = Stage::AwaitInstance;
            }
            (Stage::AwaitInstance, ComputeCommand::CreateInstance(_)) => connection.stage = Stage::Replay,
            (Stage::Replay, ComputeCommand::InitializationComplete) => {
                connection.stage = Stage::Live;
                let staged = std::mem::take(&mut connection.staged);
                self.reconcile(staged);
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

    /// Replaces the installed dataflows with the replayed ones, keeping each running one that can stand
    /// in for its replayed twin (see the module documentation).
    fn reconcile(&mut self, staged: BTreeMap<GlobalId, Installed>) {
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

    fn answer(&mut self, peek: &Peek<u64>, ctx: &mut Context<'_>) -> PeekResponse {
        let PeekTarget::Index { id } = peek.target else {
            return PeekResponse::Error("the model answers index peeks only".to_string());
        };
        let Some((key, dataflow)) =
            self.installed.iter().find(|(_, d)| d.exports.get(&id).is_some_and(|e| !e.dropped))
        else {
            return PeekResponse::Error(format!("collection {id} is not installed"));
        };
        let key = *key;
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
        let key_columns = dataflow.desc.index_exports.get(&id).map(|e| e.key.clone()).unwrap_or_default();
        // Ready means `timestamp < upper`: the dataflow hydrated, and it keeps its inputs from no later
        // than the since.
        let outputs = match self.state_at(key, peek.timestamp, ctx) {
            Ok(outputs) => outputs,
            Err(e) => {
                ctx.violation(
                    Invariant::PeekHolds,
                    format!(
                        "{} cannot answer peek {} on {id} at {}: {e}",
                        self.name(),
                        peek.uuid,
                        peek.timestamp
                    ),
                );
                return PeekResponse::Error(e);
            }
        };
        match &outputs[&id] {
            Ok(contents) => match peek_rows(
                &contents.rows,
                &key_columns,
                peek.literal_constraints.as_deref(),
                &peek.map_filter_project,
                &peek.finishing,
                Some((self.process, self.processes)),
            ) {
                Ok(rows) => PeekResponse::Rows(rows),
                Err(e) => PeekResponse::Error(e),
            },
            Err(e) => PeekResponse::Error(e.clone()),
        }
    }

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
                match self.hold_storage(key, ctx) {
                    Held::Yes => {}
                    Held::Later => continue, // Storage is down: the process tries again.
                    Held::Refused => return,
                }
            }
            let dataflow = &self.installed[&key];
            let mut target = cap;
            for id in dataflow.desc.source_imports.keys() {
                // Storage down: no progress from this input until it is back.
                let upper =
                    ctx.store.frontiers(*id).ok().and_then(|f| f.upper.as_option().copied()).unwrap_or(0);
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
                self.emit_subscribes(key, target, ctx, out);
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
    /// [`Held::Refused`] (with a violation recorded) if storage no longer holds the as-of: the controller
    /// let go of history a dataflow it installed needs; [`Held::Later`] while storage is down.
    fn hold_storage(&mut self, key: GlobalId, ctx: &mut Context<'_>) -> Held {
        let name = self.name();
        let dataflow = self.installed.get_mut(&key).expect("present");
        let mut holds = BTreeMap::new();
        for id in dataflow.desc.source_imports.keys() {
            let hold = ctx.store.acquire_read_hold(&self.client, *id, Antichain::from_elem(dataflow.upper));
            match hold {
                Ok(hold) => {
                    holds.insert(*id, hold);
                }
                Err(e) if e.is_unavailable() => return Held::Later,
                Err(e) => {
                    ctx.violation(
                        Invariant::ImportHolds,
                        format!(
                            "{name} cannot hold storage import {id} of dataflow {key} at {}: {e}",
                            dataflow.upper
                        ),
                    );
                    return Held::Refused;
                }
            }
        }
        dataflow.storage_holds = Some(holds);
        Held::Yes
    }

    /// Advances dataflow `key` from its upper to `target`: hydrates it first if it has not yet (storage
    /// snapshots at the as-of), then records every time in between at which an input changed (the storage
    /// updates, read from the store; the upstream indexes' change times). Nothing is evaluated here: states
    /// are evaluated when read ([`Self::state_at`]). Returns false (with a violation recorded) if an input
    /// could not be read.
    fn compute(&mut self, key: GlobalId, target: u64, ctx: &mut Context<'_>) -> bool {
        let dataflow = &self.installed[&key];
        let lower = match &dataflow.computed {
            Some(_) => dataflow.upper,
            None => dataflow.as_of + 1,
        };
        let hydrated = match &dataflow.computed {
            Some(_) => None,
            None => match self.hydrate(dataflow, ctx) {
                Some(computed) => Some(computed),
                None => return false,
            },
        };
        let Some(changes) = self.input_changes(dataflow, lower, target, ctx) else { return false };
        let dataflow = self.installed.get_mut(&key).expect("present");
        if let Some(computed) = hydrated {
            dataflow.computed = Some(computed);
        }
        let computed = dataflow.computed.as_mut().expect("hydrated");
        for (time, updates) in changes {
            computed.record(time, updates);
        }
        true
    }

    /// The first computation of a dataflow, at its as-of: storage snapshots there. Its index imports must
    /// be hydrated on this process and readable at the as-of.
    fn hydrate(&self, dataflow: &Installed, ctx: &mut Context<'_>) -> Option<Computed> {
        let as_of = dataflow.as_of;
        let mut storage = BTreeMap::new();
        for id in dataflow.desc.source_imports.keys() {
            match ctx.store.snapshot(*id, as_of) {
                Ok(rows) => {
                    storage.insert(*id, consolidate(rows));
                }
                Err(e) if e.is_unavailable() => return None, // Storage is down: hydrate later.
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
            let base_time =
                self.upstream(*id).and_then(|(_, d)| d.computed.as_ref()).map(Computed::base_time);
            if base_time.is_none_or(|base_time| base_time > as_of) {
                ctx.violation(
                    Invariant::ImportHolds,
                    format!(
                        "{} cannot hydrate a dataflow at its as-of {as_of}: index {id} is {}",
                        self.name(),
                        match base_time {
                            Some(base_time) => format!("compacted to {base_time}"),
                            None => "not hydrated".to_string(),
                        }
                    ),
                );
                return None;
            }
        }
        Some(Computed::hydrate(as_of, storage))
    }

    /// The installed dataflow exporting index `id`, with its key.
    fn upstream(&self, id: GlobalId) -> Option<(GlobalId, &Installed)> {
        self.installed.iter().find(|(_, d)| d.exports.contains_key(&id)).map(|(key, d)| (*key, d))
    }

    /// Every time in `[lower, upper)` at which an input of the dataflow changed, with the storage updates
    /// at that time (read from the store) and an entry for each time an upstream index changed. `None`
    /// (with a violation) if storage no longer holds that history.
    fn input_changes(
        &self,
        dataflow: &Installed,
        lower: u64,
        upper: u64,
        ctx: &mut Context<'_>,
    ) -> Option<InputChanges> {
        let mut changes = InputChanges::new();
        if lower >= upper {
            return Some(changes);
        }
        for id in dataflow.desc.source_imports.keys() {
            match ctx.store.updates_between(*id, lower, &Antichain::from_elem(upper)) {
                Ok(updates) => {
                    for (row, time, diff) in updates {
                        changes.entry(time).or_default().push((*id, row, diff));
                    }
                }
                Err(e) if e.is_unavailable() => return None, // Storage is down: read later.
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
            // The upstream advanced first (it was created first) and keeps its history from this
            // dataflow's base on.
            let Some(upstream) = self.upstream(*id).and_then(|(_, d)| d.computed.as_ref()) else {
                ctx.violation(
                    Invariant::ImportHolds,
                    format!("{} reads index {id} from {lower}, before it hydrated", self.name()),
                );
                return None;
            };
            assert!(upstream.base_time() <= lower, "an upstream compacted past its importer's upper");
            for time in upstream.change_times(lower, upper) {
                changes.entry(time).or_default();
            }
        }
        Some(changes)
    }

    /// Every export's state of dataflow `key` at `time`: evaluated (through the memo) from the storage
    /// inputs this process recorded and the upstream indexes' states at the same time, or taken from what
    /// was evaluated before. An error names what is not available (history compacted, an index missing).
    fn state_at(&mut self, key: GlobalId, time: u64, ctx: &mut Context<'_>) -> Result<Outputs, String> {
        let dataflow = &self.installed[&key];
        let computed =
            dataflow.computed.as_ref().ok_or_else(|| format!("dataflow {key} has not hydrated"))?;
        let at = computed
            .time_of(time)
            .ok_or_else(|| format!("dataflow {key} keeps its inputs from {} on", computed.base_time()))?;
        if let Some(outputs) = computed.cached(at) {
            return Ok(outputs);
        }
        let imports: Vec<GlobalId> = dataflow.desc.index_imports.keys().copied().collect();
        let mut indexes: BTreeMap<GlobalId, Output> = BTreeMap::new();
        for id in imports {
            let (upstream, _) = self.upstream(id).ok_or_else(|| format!("index {id} is not installed"))?;
            let outputs = self.state_at(upstream, at, ctx).map_err(|e| format!("index {id}: {e}"))?;
            indexes.insert(id, outputs[&id].clone());
        }
        let dataflow = &self.installed[&key];
        let computed = dataflow.computed.as_ref().expect("checked above");
        let mut inputs: Vec<(GlobalId, Fingerprint)> =
            computed.fingerprints_at(at).iter().map(|(id, f)| (*id, *f)).collect();
        let mut errors = Vec::new();
        for (id, state) in &indexes {
            match state {
                Ok(contents) => inputs.push((*id, contents.fingerprint)),
                Err(error) => errors.push((*id, error.clone())),
            }
        }
        inputs.sort();
        let memo_key = Key { dataflow: dataflow.fingerprint, inputs, errors };
        let outputs = ctx.evaluations.evaluate(memo_key, &dataflow.desc, || {
            let mut rows = computed.rows_at(at).into_owned();
            for (id, state) in &indexes {
                if let Ok(contents) = state {
                    rows.insert(*id, contents.rows.clone());
                }
            }
            evaluate_dataflow(&dataflow.desc, &rows).map_err(|e| e.to_string())
        });
        self.installed
            .get_mut(&key)
            .expect("present")
            .computed
            .as_mut()
            .expect("hydrated")
            .cache(at, Rc::clone(&outputs));
        Ok(outputs)
    }

    /// Emits one batch per subscribe of dataflow `key`, from what it emitted so far to `upper`: the
    /// difference between the states at consecutive change times (the whole state at the as-of first,
    /// with a snapshot).
    fn emit_subscribes(
        &mut self,
        key: GlobalId,
        upper: u64,
        ctx: &mut Context<'_>,
        out: &mut Vec<ComputeResponse<u64>>,
    ) {
        let dataflow = &self.installed[&key];
        let as_of = dataflow.as_of;
        let computed = dataflow.computed.as_ref().expect("computed before emitting");
        let mut times: BTreeSet<u64> = BTreeSet::new();
        for sub in dataflow.subscribes.values().filter(|s| !s.failed) {
            if !sub.started {
                times.insert(as_of);
            }
            times.extend(computed.change_times(if sub.started { sub.emitted } else { as_of + 1 }, upper));
        }
        let mut states: BTreeMap<u64, Outputs> = BTreeMap::new();
        for time in times {
            match self.state_at(key, time, ctx) {
                Ok(outputs) => {
                    states.insert(time, outputs);
                }
                Err(e) => {
                    let name = self.name();
                    ctx.violation(
                        Invariant::ImportHolds,
                        format!("{name} cannot emit a subscribe at {time}: {e}"),
                    );
                    return;
                }
            }
        }
        let part = (self.process, self.processes);
        let dataflow = self.installed.get_mut(&key).expect("present");
        for (id, sub) in dataflow.subscribes.iter_mut().filter(|(_, s)| !s.failed) {
            let batch = sub.next_batch(*id, as_of, upper, &states, part);
            out.push(ComputeResponse::SubscribeResponse {
                id: *id,
                response: SubscribeResponse::Batch(batch),
            });
        }
    }

    /// Compacts every dataflow's input history as far as `AllowCompaction` allows for all its exports and
    /// no reader on this process needs: a dataflow importing one of its indexes reads from its own base
    /// (or, not hydrated yet, from its as-of), a subscribe emits from what it emitted, and nothing is
    /// compacted past the last time the dataflow recorded.
    fn compact(&mut self) {
        let mut readers: BTreeMap<GlobalId, u64> = BTreeMap::new();
        for dataflow in self.installed.values() {
            let from = dataflow.computed.as_ref().map_or(dataflow.upper, Computed::base_time);
            for id in dataflow.desc.index_imports.keys() {
                let reader = readers.entry(*id).or_insert(u64::MAX);
                *reader = (*reader).min(from);
            }
        }
        for dataflow in self.installed.values_mut() {
            // Inputs at `upper - 1` are the last recorded: compacting further would merge them with
            // changes not recorded yet.
            let mut frontier = dataflow.upper.saturating_sub(1);
            for (id, export) in &dataflow.exports {
                frontier = frontier.min(export.since.as_option().copied().unwrap_or(u64::MAX));
                if let Some(reader) = readers.get(id) {
                    frontier = frontier.min(*reader);
                }
            }
            for sub in dataflow.subscribes.values().filter(|s| !s.failed) {
                frontier = frontier.min(if sub.started { sub.emitted } else { dataflow.as_of });
            }
            if let Some(computed) = dataflow.computed.as_mut() {
                computed.compact(frontier);
            }
        }
    }
}
