//! A model replica process: the compute protocol's semantics with a naive evaluator, fast enough to run
//! thousands of seeds.
//!
//! Each process of a model replica keeps its installed dataflows (lost on a crash, kept across a
//! disconnect), speaks the protocol stages (Hello, replay, `InitializationComplete` with reconciliation),
//! advances each scheduled dataflow's upper to what its inputs allow (storage uppers, upstream indexes;
//! a *slow* replica lags behind the clock), answers peeks and emits subscribe batches for the rows it owns
//! (rows are partitioned across processes by a stable hash), and reports frontiers once per change.
//!
//! It reads its inputs from the real storage core, which compacts as the controller's holds allow. So when
//! the controller lets go of history a replica still needs, the model cannot read it: that is recorded as
//! a violation (and is how the planted peek-hold bug is caught). Answering a peek at a time before the
//! replica's own compaction frontier is a violation of DESIGN §5.3 and recorded too.
//!
//! **Not modelled:** materialized views and copy-to (the real replica's tests cover them).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use frontiers::Antichain;
use protocol::reference::{Multiset, consolidate};
use protocol::{
    ComputeCommand, ComputeResponse, DataflowDescription, FrontiersResponse, GlobalId, PROTOCOL_VERSION,
    Peek, PeekId, PeekResponse, PeekTarget, Row, SinkConnection, SubscribeBatch, SubscribeResponse,
};
use storage::core::Store;

use super::oracle::{EvalFailure, Oracle, owner, peek_rows};

/// What a model process needs from the world to do its work.
pub struct Context<'a> {
    /// The storage layer.
    pub store: &'a Store,
    /// The simulated clock, in milliseconds.
    pub now: u64,
    /// Where violations of the design's invariants are recorded.
    pub violations: &'a mut Vec<String>,
    /// The contents of every collection at every complete time (see the oracle's module doc).
    pub oracle: &'a Oracle,
}

impl Context<'_> {
    /// An export's contents at `time` as a replica reads them: every storage collection its dataflow
    /// imports must still be readable there (else the controller let go of history the replica needs).
    fn read(&mut self, id: GlobalId, time: u64) -> Result<std::rc::Rc<Multiset>, EvalFailure> {
        for source in self.oracle.direct_sources(id) {
            if let Err(e) = self.store.check_readable(source, time) {
                return Err(EvalFailure::Unavailable(format!("cannot read {source} at {time}: {e}")));
            }
        }
        self.oracle.export_contents(id, time)
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
    /// The full contents at `emitted - 1` (for computing changes).
    last: Multiset,
    /// An error ended the stream: nothing more is emitted.
    failed: bool,
}

#[derive(Debug, Clone)]
struct Installed {
    desc: Arc<DataflowDescription<u64>>,
    as_of: u64,
    scheduled: bool,
    /// Everything before this time is computed.
    upper: u64,
    exports: BTreeMap<GlobalId, ExportState>,
    subscribes: BTreeMap<GlobalId, SubscribeState>,
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
                        last: Multiset::new(),
                        failed: false,
                    },
                )),
                _ => None,
            })
            .collect();
        Installed { desc, as_of, scheduled: false, upper: as_of, exports, subscribes }
    }

    /// Whether a running `self` can stand in for a freshly replayed `other` (DESIGN: reconciliation).
    fn compatible_with(&self, other: &DataflowDescription<u64>) -> bool {
        let mut mine = (*self.desc).clone();
        mine.as_of = other.as_of.clone();
        let later = other.as_of.as_ref().and_then(|a| a.as_option().copied()).unwrap_or(0) >= self.as_of;
        // Subscribes are never kept: a kept subscribe could not re-emit what the old connection lost.
        mine == *other && later && self.subscribes.is_empty()
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
    process: usize,
    processes: usize,
    alive: bool,
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
    /// Process `process` of a replica of `processes`.
    pub fn new(process: usize, processes: usize) -> Self {
        ModelProcess {
            process,
            processes,
            alive: true,
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

    /// Crashes: all state is lost; connections fail until [`restart`](Self::restart).
    pub fn crash(&mut self) {
        self.alive = false;
        self.installed.clear();
        self.connection = None;
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
                for (key, fresh) in staged {
                    let kept = self.installed.remove(&key).filter(|old| old.compatible_with(&fresh.desc));
                    let dataflow = match kept {
                        Some(mut old) => {
                            old.exports = fresh.exports;
                            old.scheduled |= fresh.scheduled;
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
                            ctx.violations
                                .push(format!("AllowCompaction for {id}, which the replica does not have"));
                            return out;
                        };
                        let export = df.exports.get_mut(&id).expect("found");
                        if !frontiers::PartialOrder::less_equal(&export.since, &frontier) {
                            ctx.violations.push(format!("compaction of {id} regressed to {frontier:?}"));
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
                    other => ctx.violations.push(format!(
                        "replica got {} in stage {:?}",
                        other.name(),
                        connection.stage
                    )),
                }
            }
            (stage, other) => ctx.violations.push(format!("replica got {} in stage {stage:?}", other.name())),
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
            ctx.violations.push(format!(
                "invariant 3: replica process {} answers peek {} on {id} at {} after compacting to {since:?}",
                self.process, peek.uuid, peek.timestamp
            ));
            return PeekResponse::Error(format!("peek at {} is before the since {since:?}", peek.timestamp));
        }
        match ctx.read(id, peek.timestamp) {
            Ok(contents) => {
                let key = dataflow.desc.index_exports.get(&id).map(|e| e.key.clone()).unwrap_or_default();
                match peek_rows(
                    &contents,
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
            Err(EvalFailure::Data(e)) => PeekResponse::Error(e),
            Err(EvalFailure::Unavailable(e)) => {
                ctx.violations
                    .push(format!("replica cannot answer peek {} at {}: {e}", peek.uuid, peek.timestamp));
                PeekResponse::Error(e)
            }
        }
    }

    /// Advances every scheduled dataflow as far as its inputs allow, emitting subscribe batches on the way.
    fn advance(&mut self, ctx: &mut Context<'_>, out: &mut Vec<ComputeResponse<u64>>) {
        let live = self.connection.as_ref().is_some_and(|c| c.stage == Stage::Live);
        let cap = ctx.now.saturating_sub(self.lag_ms);
        // Dataflows in creation order (keys are the first export id; upstreams come first by construction
        // because they are created first and ids grow).
        let keys: Vec<GlobalId> = self.installed.keys().copied().collect();
        for key in keys {
            let dataflow = &self.installed[&key];
            if !dataflow.scheduled {
                continue;
            }
            let mut target = cap;
            for id in dataflow.desc.source_imports.keys() {
                let upper = ctx.store.frontiers(*id).and_then(|f| f.upper.as_option().copied()).unwrap_or(0);
                target = target.min(upper);
            }
            for id in dataflow.desc.index_imports.keys() {
                let upstream = self.installed.values().find(|d| d.exports.contains_key(id)).map(|d| d.upper);
                target = target.min(upstream.unwrap_or(0));
            }
            if target <= dataflow.upper {
                continue;
            }
            let from = dataflow.upper;
            if live && !dataflow.subscribes.is_empty() {
                self.emit_subscribes(key, from, target, ctx, out);
            }
            self.installed.get_mut(&key).expect("present").upper = target;
        }
    }

    fn emit_subscribes(
        &mut self,
        key: GlobalId,
        lower: u64,
        upper: u64,
        ctx: &mut Context<'_>,
        out: &mut Vec<ComputeResponse<u64>>,
    ) {
        let mut times: BTreeSet<u64> = BTreeSet::new();
        for id in self.installed[&key].subscribes.keys() {
            times.extend(ctx.oracle.change_times(*id, lower, upper));
        }
        let (process, processes) = (self.process, self.processes);
        let dataflow = self.installed.get_mut(&key).expect("present");
        let as_of = dataflow.as_of;
        let export_sinces: BTreeMap<GlobalId, Antichain<u64>> =
            dataflow.exports.iter().map(|(id, e)| (*id, e.since.clone())).collect();
        for (id, sub) in dataflow.subscribes.iter_mut() {
            if sub.failed {
                continue;
            }
            let mut updates: Vec<(u64, Row, i64)> = Vec::new();
            let mut error = None;
            let mut evaluation_times: Vec<u64> =
                times.iter().copied().filter(|t| *t >= lower && *t < upper).collect();
            if !sub.started {
                evaluation_times.retain(|t| *t > as_of);
                evaluation_times.insert(0, as_of);
            }
            for time in evaluation_times {
                match ctx.read(*id, time) {
                    Ok(contents) => {
                        let contents = (*contents).clone();
                        let first = !sub.started;
                        sub.started = true;
                        if first && !sub.with_snapshot {
                            sub.last = contents;
                            continue;
                        }
                        let mut changes: Vec<(Row, i64)> =
                            contents.iter().map(|(r, d)| (r.clone(), *d)).collect();
                        changes.extend(sub.last.iter().map(|(r, d)| (r.clone(), -*d)));
                        for (row, diff) in consolidate(changes) {
                            if owner(&row, processes) == process {
                                updates.push((time, row, diff));
                            }
                        }
                        sub.last = contents;
                    }
                    Err(EvalFailure::Data(e)) => {
                        error = Some(e);
                        break;
                    }
                    Err(EvalFailure::Unavailable(e)) => {
                        ctx.violations.push(format!(
                            "subscribe {id} on process {process} (as_of {as_of}, emitted {}, started {}, since {:?}) cannot evaluate at {time}: {e}",
                            sub.emitted, sub.started, export_sinces.get(id)
                        ));
                        error = Some(e);
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
}
