//! The simulated world: one seed drives everything.
//!
//! The world runs the **unmodified** synchronous cores (the controller's [`InstanceCore`], one
//! [`ReplicaCore`] per replica, the shard engine's pure state machine in [`SimStorage`]) and replaces
//! everything asynchronous: replicas are
//! [`ModelProcess`]es, the network is a priority queue of messages with random delays (FIFO per link, so
//! messages to different replicas reorder freely), and time is a counter advanced one millisecond per step.
//! This is our own tiny executor rather than turmoil or madsim: the cores are synchronous state machines,
//! so there is nothing to schedule but messages and timers, and a plain loop keeps every run bit-for-bit
//! reproducible and thousands of seeds a minute fast.
//!
//! A run has a **fault phase** (workload plus faults: disconnects, crashes and restarts, slow replicas,
//! delay spikes, frontier regressions, replicas added and dropped, outages of the consensus or the blob
//! store; throughout, lost replies to storage compare-and-sets and storage latency) and a **liveness
//! phase** (faults stop; every replica must reconnect and catch up and every peek must complete). The
//! tables are shards ([`SimStorage`]): the table writer appends one batch at a time and retries through
//! outages and lost replies with its idempotency token; the controller holds through a critical reader,
//! each model process through a leased one that expires after a crash. After every step the world
//! checks DESIGN §5's invariants, its own checks first so that a violation is reported as its own kind:
//! the model replicas' checks (recorded as they happen), a peek's hold kept while a replica owes the
//! answer ([`World::check_peek_holds`]), no storage since beyond a hold a live client keeps, the command
//! history bounded, and then the controller's own [`InstanceCore::check_invariants`]. After every
//! acknowledged append, what storage holds (decoded from the blob parts the shard's head references) is
//! compared with the world's own ledger of acknowledged appends; at the end, no blob part may be left
//! that no shard references. Every peek result and subscribe batch is compared with the [`Oracle`];
//! after the faults stop, liveness and the installed state are checked. Each violation is a typed
//! [`Violation`]; the run stops at the first step with one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use frontiers::{Antichain, ReadHold, ReadPolicy};
use protocol::arbitrary::{Choices, plan_of};
use protocol::{
    BuildDesc, ColumnOrder, ColumnType, ComputeCommand, ComputeResponse, DataflowDescription, Datum,
    GlobalId, IndexExport, IndexImport, InstanceId, MapFilterProject, PeekId, RelationDesc, RelationType,
    ReplicaId, Row, RowSetFinishing, ScalarType, SinkConnection, SinkExport, SourceImport,
};
use replica_client::{Backoff, CommandHistory, ReplicaCore, ReplicaCoreConfig, ReplicaEvent, ReplicaOutput};
use storage::AppendRequest;

use controller::{
    ComputeControllerResponse, ImportFrontiers, InstanceCore, InstanceCoreConfig, InstanceOutput,
    PeekOptions, PeekRequest, PeekResult, select_as_of,
};

use super::checks::{PeekExpectation, SubscribeTracker};
use super::evaluation::Evaluations;
use super::model::{Context, ModelProcess};
use super::oracle::Oracle;
use super::rng::Rng;
use super::storage::{ClientId, SimStorage, StorageStats};
use super::violation::{Invariant, Violation};

/// How long each phase of a run lasts, in simulated milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct SimConfig {
    /// Workload and faults.
    pub fault_ms: u64,
    /// Faults stopped: everything must catch up.
    pub liveness_ms: u64,
    /// A test of the simulator itself: from this many simulated milliseconds into the run, every append
    /// writes one row more to storage than the oracle records (a storage layer that invents data). The
    /// model replicas compute from storage, so the oracle comparison must fail. `None` in every real run.
    pub unrecorded_rows_from_ms: Option<u64>,
    /// A test of the simulator itself: a table writer that, after a lost reply, appends again at the
    /// shard's current upper instead of asking its idempotency token (so an append applied before the
    /// reply was lost is applied twice). The contents check must catch it. `false` in every real run.
    pub rebase_after_lost_reply: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            fault_ms: 1_500,
            liveness_ms: 1_000,
            unrecorded_rows_from_ms: None,
            rebase_after_lost_reply: false,
        }
    }
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// Steps (simulated milliseconds) executed.
    pub steps: u64,
    /// A hash of every message delivered, for determinism checks.
    pub trace_hash: u64,
    /// Peek results compared with the oracle.
    pub peeks_checked: u64,
    /// Subscribe batches compared with the oracle.
    pub batches_checked: u64,
    /// Faults injected.
    pub faults: u64,
    /// Storage outages among the faults.
    pub storage_outages: u64,
    /// What the simulated storage did (lost replies, merges, parts collected, readers expired).
    pub storage: StorageStats,
    /// Dataflow evaluations the model replicas ran (each process computes its own results; processes
    /// computing the same dataflow on the same inputs share one evaluation).
    pub model_evaluations: u64,
    /// Evaluations a model process took from the memo another process filled.
    pub model_memo_hits: u64,
    /// The first violation, with the step it happened at.
    pub violation: Option<(u64, Violation)>,
}

const START_MS: u64 = 100_000;
/// The most rows a dataflow's export may have when it is created (see `create_dataflow`).
const MAX_EXPORT_ROWS: usize = 5_000;
/// The most rows a live export may grow to before the workload drops it (as the tables grow, so do the
/// outputs, a cross join's with the square of its inputs).
const MAX_LIVE_EXPORT_ROWS: usize = 10_000;
const INSTANCE: InstanceId = InstanceId(1);
/// Storage keeps only a little history of its own: the controller's holds must do the rest.
const STORAGE_POLICY: ReadPolicy<u64> = ReadPolicy::LagWriteFrontier { lag_ms: 5, granularity_ms: 0 };

#[derive(Debug)]
enum Message {
    ToReplica { replica: ReplicaId, process: usize, epoch: u64, command: ComputeCommand<u64> },
    ToController { replica: ReplicaId, process: usize, epoch: u64, response: ComputeResponse<u64> },
}

struct SimReplica {
    core: ReplicaCore<u64>,
    processes: Vec<ModelProcess>,
    /// The epoch whose connection is open.
    link: Option<u64>,
    /// Crashed until this time.
    down_until: Option<u64>,
    /// Largest network delay to and from this replica.
    delay_max: u64,
}

#[derive(Debug, Clone)]
enum ExportKind {
    Index { key: Vec<usize>, typ: RelationType },
    Subscribe,
}

/// A random row of `desc` from a small domain (so joins and groups find matches).
pub(super) fn random_row(rng: &mut Rng, desc: &RelationDesc) -> Row {
    let mut datums = Vec::new();
    let mut texts = Vec::new();
    for typ in &desc.typ().column_types {
        match typ.scalar_type {
            ScalarType::Int64 if typ.nullable && rng.chance(0.2) => datums.push(None),
            ScalarType::Int64 => datums.push(Some(rng.range(0, 6) as i64)),
            _ => {
                texts.push(["a", "b", "c"][rng.below(3) as usize]);
                datums.push(None);
            }
        }
    }
    let mut text = texts.into_iter();
    let mut packer = protocol::RowPacker::new();
    for (typ, datum) in desc.typ().column_types.iter().zip(datums) {
        match (typ.scalar_type, datum) {
            (ScalarType::Int64, Some(i)) => packer.push(Datum::Int64(i)),
            (ScalarType::Int64, None) => packer.push(Datum::Null),
            _ => packer.push(Datum::Text(text.next().expect("one per text column"))),
        }
    }
    packer.finish()
}

/// One simulated run. See the module documentation.
#[allow(missing_debug_implementations)] // Holds the cores by value; their state is inspected, not printed.
pub struct World {
    seed: u64,
    config: SimConfig,
    rng: Rng,
    now: u64,
    store: SimStorage,
    oracle: Oracle,
    /// What the table writer had acknowledged, per table: the world's own record, compared with what
    /// storage holds after every acknowledgement.
    ledger: BTreeMap<GlobalId, Vec<(Row, u64, i64)>>,
    /// The tables' upper as the writer last had it acknowledged.
    written_upper: u64,
    next_client: u64,
    instance: InstanceCore<u64>,
    replicas: BTreeMap<ReplicaId, SimReplica>,
    next_replica: u64,
    network: BTreeMap<(u64, u64), Message>,
    sequence: u64,
    link_last: BTreeMap<(ReplicaId, usize, bool), u64>,
    tables: Vec<(GlobalId, RelationDesc)>,
    next_id: u64,
    exports: BTreeMap<GlobalId, ExportKind>,
    peeks: BTreeMap<PeekId, PeekExpectation>,
    /// Every peek issued and not yet finished (some replica owes an answer, or the controller still has
    /// it): its collection and time, for [`World::check_peek_holds`].
    issued: BTreeMap<PeekId, (GlobalId, u64)>,
    next_peek: u64,
    subscribes: BTreeMap<GlobalId, SubscribeTracker>,
    user_holds: Vec<(u64, ReadHold<GlobalId, u64>)>,
    /// The controller's storage client (a critical reader: its holds outlive any outage).
    controller_client: ClientId,
    violations: Vec<Violation>,
    /// The model replicas' shared evaluation memo.
    evaluations: Evaluations,
    trace: u64,
    faults: u64,
    peeks_checked: u64,
    batches_checked: u64,
}

fn fnv(hash: &mut u64, bytes: &[u8]) {
    for byte in bytes {
        *hash ^= u64::from(*byte);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

/// A table schema: an integer key and `columns - 1` more columns (nullable integers and text).
pub(super) fn table_desc(columns: usize) -> RelationDesc {
    let mut desc = RelationDesc::new([("k", ColumnType::new(ScalarType::Int64, false))]);
    for c in 1..columns {
        let typ = if c % 2 == 1 {
            ColumnType::new(ScalarType::Int64, true)
        } else {
            ColumnType::new(ScalarType::Text, false)
        };
        desc = desc.with_column(format!("c{c}"), typ);
    }
    desc
}

impl World {
    /// A world for `seed`.
    pub fn new(seed: u64, config: SimConfig) -> Self {
        let mut rng = Rng::new(seed);
        let policy =
            ReadPolicy::LagWriteFrontier { lag_ms: rng.range(0, 50), granularity_ms: rng.range(0, 10) };
        let instance_config = InstanceCoreConfig {
            default_index_policy: policy,
            introspection_interval_ms: 100,
            // The default peek timeout (30 s) is longer than any run: no peek times out here.
            ..InstanceCoreConfig::default()
        };
        let mut store = SimStorage::new(rng.fork(), STORAGE_POLICY, START_MS, config.rebase_after_lost_reply);
        let controller_client = store.new_client("controller", true);
        let mut world = World {
            seed,
            config,
            instance: InstanceCore::new(INSTANCE, instance_config, Arc::new(|| {}), START_MS),
            store,
            oracle: Oracle::default(),
            ledger: BTreeMap::new(),
            written_upper: 0,
            next_client: 1,
            replicas: BTreeMap::new(),
            next_replica: 1,
            network: BTreeMap::new(),
            sequence: 0,
            link_last: BTreeMap::new(),
            tables: Vec::new(),
            next_id: 1,
            exports: BTreeMap::new(),
            peeks: BTreeMap::new(),
            issued: BTreeMap::new(),
            next_peek: 1,
            subscribes: BTreeMap::new(),
            user_holds: Vec::new(),
            controller_client,
            violations: Vec::new(),
            evaluations: Evaluations::default(),
            trace: 0xcbf2_9ce4_8422_2325,
            faults: 0,
            peeks_checked: 0,
            batches_checked: 0,
            now: START_MS,
            rng,
        };
        for t in 0..world.rng.range(1, 3) {
            let id = GlobalId::System(t + 1);
            let desc = table_desc(world.rng.range(1, 3) as usize);
            world.store.create_collection(id, desc.clone());
            world.tables.push((id, desc));
        }
        world.append_to_tables();
        for _ in 0..world.rng.range(1, 3) {
            world.add_replica();
        }
        world
    }

    /// Runs the whole simulation.
    pub fn run(mut self) -> Outcome {
        let end_faults = START_MS + self.config.fault_ms;
        let end = end_faults + self.config.liveness_ms;
        let mut liveness_marks: Option<BTreeMap<GlobalId, u64>> = None;
        while self.now < end && self.violations.is_empty() {
            let faults_on = self.now < end_faults;
            if !faults_on && liveness_marks.is_none() {
                self.end_faults();
                liveness_marks =
                    Some(self.tables.iter().map(|(id, _)| (*id, self.storage_upper(*id))).collect());
            }
            self.step(faults_on);
        }
        if self.violations.is_empty() {
            self.check_liveness(liveness_marks.unwrap_or_default());
        }
        if self.violations.is_empty() {
            match self.store.unreferenced_parts() {
                Ok(leaked) if leaked.is_empty() => {}
                Ok(leaked) => self.violation(
                    Invariant::StorageContents,
                    format!(
                        "{} blob parts no shard references: {:?}",
                        leaked.len(),
                        &leaked[..leaked.len().min(3)]
                    ),
                ),
                Err(e) => self.violation(Invariant::StorageContents, e),
            }
        }
        Outcome {
            seed: self.seed,
            steps: self.now - START_MS,
            trace_hash: self.trace,
            peeks_checked: self.peeks_checked,
            batches_checked: self.batches_checked,
            faults: self.faults,
            storage_outages: self.store.stats().outages,
            storage: self.store.stats(),
            model_evaluations: self.evaluations.evaluated,
            model_memo_hits: self.evaluations.hits,
            violation: self.violations.first().map(|v| {
                let mut v = v.clone();
                if std::env::var_os("SIM_DEBUG").is_some() {
                    for id in self.exports.keys() {
                        v.message.push_str(&format!("\n  {}", self.instance.describe_collection(*id)));
                    }
                }
                (self.now - START_MS, v)
            }),
        }
    }

    fn step(&mut self, faults_on: bool) {
        self.now += 1;
        self.store.set_now(self.now);
        self.deliver();
        self.drive_storage();
        if self.now.is_multiple_of(10) {
            self.append_to_tables();
        }
        self.workload(faults_on);
        if faults_on {
            self.faults();
        }
        self.restart_crashed();
        self.step_models();
        for replica in self.replicas.values_mut() {
            replica.core.tick(self.now);
        }
        if self.now.is_multiple_of(5) {
            self.instance.tick(self.now);
        } else {
            self.instance.advance_clock(self.now);
        }
        self.pump();
        self.user_holds.retain(|(until, _)| *until > self.now);
        self.instance.process_holds();
        self.store.process_holds();
        for problem in self.store.maintain() {
            self.violation(Invariant::StorageContents, problem);
        }
        self.pump();
        // The world's own checks first: a violation they see is reported as its own kind, not as the
        // controller's self-check that may notice the same fault.
        self.check_peek_holds();
        self.check_storage_holds();
        self.check_history_bound();
        if let Err(violation) = self.instance.check_invariants() {
            self.violation(Invariant::ControllerSelfCheck, violation);
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Plumbing

    fn send(&mut self, replica: ReplicaId, process: usize, to_replica: bool, message: Message) {
        let delay_max = self.replicas.get(&replica).map_or(3, |r| r.delay_max);
        let mut at = self.now + self.rng.range(1, delay_max);
        let last = self.link_last.entry((replica, process, to_replica)).or_insert(0);
        at = at.max(*last);
        *last = at;
        self.sequence += 1;
        self.network.insert((at, self.sequence), message);
    }

    fn deliver(&mut self) {
        while let Some(entry) = self.network.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let message = entry.remove();
            let mut bytes = Vec::new();
            match message {
                Message::ToReplica { replica, process, epoch, command } => {
                    let _ = protocol::frame::encode_frame(&command, usize::MAX >> 1, &mut bytes);
                    fnv(&mut self.trace, &bytes);
                    let Some(sim) = self.replicas.get_mut(&replica) else { continue };
                    if sim.link != Some(epoch) || !sim.processes[process].is_alive() {
                        continue;
                    }
                    let mut ctx = Context {
                        store: &mut self.store,
                        now: self.now,
                        violations: &mut self.violations,
                        evaluations: &mut self.evaluations,
                    };
                    let responses = sim.processes[process].receive(epoch, command, &mut ctx);
                    for response in responses {
                        self.send(
                            replica,
                            process,
                            false,
                            Message::ToController { replica, process, epoch, response },
                        );
                    }
                }
                Message::ToController { replica, process, epoch, response } => {
                    let _ = protocol::frame::encode_frame(&response, usize::MAX >> 1, &mut bytes);
                    fnv(&mut self.trace, &bytes);
                    let jitter = self.rng.unit();
                    if let Some(sim) = self.replicas.get_mut(&replica)
                        && sim.link == Some(epoch)
                    {
                        sim.core.receive(epoch, process, response, self.now, jitter);
                    }
                }
            }
            self.pump();
        }
    }

    fn step_models(&mut self) {
        let ids: Vec<ReplicaId> = self.replicas.keys().copied().collect();
        for replica in ids {
            let sim = self.replicas.get_mut(&replica).expect("listed");
            let epoch = sim.link;
            let mut outgoing = Vec::new();
            for (process, model) in sim.processes.iter_mut().enumerate() {
                let mut ctx = Context {
                    store: &mut self.store,
                    now: self.now,
                    violations: &mut self.violations,
                    evaluations: &mut self.evaluations,
                };
                for response in model.step(&mut ctx) {
                    outgoing.push((process, response));
                }
            }
            if let Some(epoch) = epoch {
                for (process, response) in outgoing {
                    self.send(
                        replica,
                        process,
                        false,
                        Message::ToController { replica, process, epoch, response },
                    );
                }
            }
        }
    }

    /// Moves outputs between the instance, the replica cores and the network until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(output) = self.instance.poll() {
                progressed = true;
                match output {
                    InstanceOutput::Command { replica, command } => {
                        if let Some(sim) = self.replicas.get_mut(&replica)
                            && let Err(e) = sim.core.send(command)
                        {
                            self.violations.push(Violation::new(
                                Invariant::Protocol,
                                format!("replica history rejected a controller command: {e}"),
                            ));
                        }
                    }
                    InstanceOutput::DisconnectReplica { replica, reason } => {
                        let jitter = self.rng.unit();
                        if let Some(sim) = self.replicas.get_mut(&replica) {
                            sim.core.disconnect(self.now, &reason, jitter);
                        }
                    }
                    InstanceOutput::Response(response) => self.observe_response(response),
                    InstanceOutput::PeekResult { uuid, result } => self.check_peek(uuid, result),
                }
            }
            let ids: Vec<ReplicaId> = self.replicas.keys().copied().collect();
            for replica in ids {
                while let Some(output) = self.replicas.get_mut(&replica).and_then(|r| r.core.poll()) {
                    progressed = true;
                    match output {
                        ReplicaOutput::Connect { epoch } => {
                            let jitter = self.rng.unit();
                            let sim = self.replicas.get_mut(&replica).expect("present");
                            if sim.processes.iter().all(ModelProcess::is_alive) {
                                sim.link = Some(epoch);
                                for process in &mut sim.processes {
                                    process.connect(epoch);
                                }
                                sim.core.connected(epoch);
                            } else {
                                sim.core.connect_failed(epoch, self.now, "connection refused", jitter);
                            }
                        }
                        ReplicaOutput::Send { epoch, command } => {
                            let processes = self.replicas[&replica].processes.len();
                            if self.replicas[&replica].link == Some(epoch) {
                                for process in 0..processes {
                                    let message = Message::ToReplica {
                                        replica,
                                        process,
                                        epoch,
                                        command: command.clone(),
                                    };
                                    self.send(replica, process, true, message);
                                }
                            }
                        }
                        ReplicaOutput::Disconnect { epoch, .. } => {
                            let sim = self.replicas.get_mut(&replica).expect("present");
                            if sim.link == Some(epoch) {
                                sim.link = None;
                                for process in &mut sim.processes {
                                    process.disconnect();
                                }
                            }
                        }
                        ReplicaOutput::Response(response) => {
                            self.instance.handle_replica_event(replica, ReplicaEvent::Response(response));
                        }
                        ReplicaOutput::Status(status) => {
                            self.instance.handle_replica_event(replica, ReplicaEvent::Status(status));
                        }
                    }
                }
            }
            if !progressed {
                return;
            }
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Replicas and faults

    fn add_replica(&mut self) {
        let replica = ReplicaId(self.next_replica);
        self.next_replica += 1;
        let processes = self.rng.range(1, 2) as usize;
        let history: CommandHistory<u64> = self.instance.add_replica(replica).expect("fresh replica id");
        let config = ReplicaCoreConfig {
            replica_id: replica,
            processes,
            backoff: Backoff { initial_ms: 5, max_ms: 80 },
            hydration_concurrency: if self.rng.chance(0.5) {
                Some(self.rng.range(1, 3) as usize)
            } else {
                None
            },
            // One controller: the model replica does not fence (the real one does, tested in `compute`).
            epoch: protocol::ControllerEpoch(1),
            session: 1,
        };
        let mut core = ReplicaCore::new(config, history);
        core.tick(self.now);
        let processes = (0..processes)
            .map(|p| {
                let client = self.new_process_client(replica, p);
                ModelProcess::new(replica, p, processes, client)
            })
            .collect();
        let sim = SimReplica { core, processes, link: None, down_until: None, delay_max: 3 };
        self.replicas.insert(replica, sim);
        self.pump();
    }

    fn faults(&mut self) {
        if !self.store.in_outage() && self.rng.chance(0.001) {
            self.faults += 1;
            let consensus = self.rng.chance(0.5);
            let until = self.now + self.rng.range(20, 300);
            self.store.start_outage(consensus, until);
        }
        if self.replicas.is_empty() || !self.rng.chance(0.004) {
            return;
        }
        self.faults += 1;
        let ids: Vec<ReplicaId> = self.replicas.keys().copied().collect();
        let replica = *self.rng.pick(&ids).expect("non-empty");
        let jitter = self.rng.unit();
        match self.rng.below(7) {
            0 => {
                // Disconnect: the replica keeps its state and reconciles on reconnect.
                let sim = self.replicas.get_mut(&replica).expect("present");
                if let Some(epoch) = sim.link.take() {
                    for process in &mut sim.processes {
                        process.disconnect();
                    }
                    sim.core.connection_lost(epoch, self.now, "simulated disconnect", jitter);
                }
            }
            1 => {
                // Crash: the state is gone; the replica is down for a while.
                let down = self.rng.range(20, 300);
                self.crash_processes(replica);
                let sim = self.replicas.get_mut(&replica).expect("present");
                sim.down_until = Some(self.now + down);
                if let Some(epoch) = sim.link.take() {
                    sim.core.connection_lost(epoch, self.now, "simulated crash", jitter);
                }
            }
            2 => {
                let lag = self.rng.range(20, 300);
                let sim = self.replicas.get_mut(&replica).expect("present");
                let process = self.rng.below(sim.processes.len() as u64) as usize;
                sim.processes[process].lag_ms = lag;
            }
            3 => {
                let sim = self.replicas.get_mut(&replica).expect("present");
                sim.delay_max = if sim.delay_max > 3 { 3 } else { self.rng.range(10, 40) };
            }
            4 => {
                let sim = self.replicas.get_mut(&replica).expect("present");
                let process = self.rng.below(sim.processes.len() as u64) as usize;
                sim.processes[process].regress_once = true;
            }
            5 if self.replicas.len() > 1 => {
                self.instance.drop_replica(replica).expect("present");
                // Its processes are gone as a crash takes them: their leased readers expire.
                self.crash_processes(replica);
                self.replicas.remove(&replica);
                self.pump();
            }
            _ if self.replicas.len() < 3 => self.add_replica(),
            _ => {}
        }
    }

    /// A fresh storage client (a leased reader) for process `process` of `replica`.
    fn new_process_client(&mut self, replica: ReplicaId, process: usize) -> ClientId {
        let name = format!("{replica}-p{process}-{}", self.next_client);
        self.next_client += 1;
        self.store.new_client(&name, false)
    }

    /// Crashes every process of `replica`: state and holds gone; storage is not told (their leased
    /// readers expire).
    fn crash_processes(&mut self, replica: ReplicaId) {
        let count = self.replicas[&replica].processes.len();
        for process in 0..count {
            let client = self.new_process_client(replica, process);
            let model = &mut self.replicas.get_mut(&replica).expect("present").processes[process];
            self.store.crash_client(model.client());
            model.crash(client);
        }
    }

    /// Moves the table writer's pending append along; on its acknowledgement, records it in the ledger
    /// and compares what storage holds with the ledger.
    fn drive_storage(&mut self) {
        match self.store.drive_append() {
            None => {}
            Some(Err(e)) => self.violation(Invariant::StorageContents, format!("an append failed: {e}")),
            Some(Ok(requests)) => {
                for request in requests {
                    let upper = request.new_upper.as_option().copied().expect("tables are not closed");
                    self.written_upper = upper;
                    self.ledger.entry(request.id).or_default().extend(request.updates);
                    self.check_contents(request.id, upper - 1);
                }
            }
        }
    }

    /// DESIGN §9: storage holds, at `time`, exactly what the writer had acknowledged up to it: each
    /// append once, none lost. Storage's side is read from the blob parts its head references; the
    /// ledger's side is summed here.
    fn check_contents(&mut self, id: GlobalId, time: u64) {
        let mut expected: BTreeMap<Row, i64> = BTreeMap::new();
        for (row, t, diff) in self.ledger.get(&id).into_iter().flatten() {
            if *t <= time {
                *expected.entry(row.clone()).or_default() += diff;
            }
        }
        expected.retain(|_, diff| *diff != 0);
        match self.store.contents(id, time) {
            Ok(held) if held == expected => {}
            Ok(held) => {
                let differ: Vec<String> = expected
                    .keys()
                    .chain(held.keys())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .filter(|row| expected.get(*row) != held.get(*row))
                    .take(3)
                    .map(|row| {
                        format!("{row}: acknowledged {:?}, stored {:?}", expected.get(row), held.get(row))
                    })
                    .collect();
                self.violation(
                    Invariant::StorageContents,
                    format!("{id} at {time} differs from what was acknowledged: {}", differ.join("; ")),
                );
            }
            Err(e) => self.violation(Invariant::StorageContents, format!("{id} cannot be read: {e}")),
        }
    }

    /// DESIGN §5.1 for storage: no collection's since is beyond a hold a live client keeps (the
    /// controller's, or a replica process's own), through outages and lost replies too.
    fn check_storage_holds(&mut self) {
        for client in self.store.live_clients() {
            for (id, _) in &self.tables {
                let held = self.store.held(&client, *id);
                let Some(since) = self.store.since(*id) else {
                    self.violations
                        .push(Violation::new(Invariant::StorageContents, format!("{id} has no shard")));
                    return;
                };
                if !held.is_empty() && !frontiers::PartialOrder::less_equal(since, &held) {
                    self.violations.push(Violation::new(
                        Invariant::Frontiers,
                        format!("storage since of {id} is {since:?}, beyond {client:?}'s hold at {held:?}"),
                    ));
                }
            }
        }
    }

    fn restart_crashed(&mut self) {
        for sim in self.replicas.values_mut() {
            if sim.down_until.is_some_and(|at| at <= self.now) {
                sim.down_until = None;
                for process in &mut sim.processes {
                    process.restart();
                }
            }
        }
    }

    fn end_faults(&mut self) {
        for sim in self.replicas.values_mut() {
            sim.delay_max = 3;
            for process in &mut sim.processes {
                process.lag_ms = 0;
                process.regress_once = false;
            }
        }
        if self.replicas.is_empty() {
            self.add_replica();
        }
        self.store.end_outages();
    }

    // ---------------------------------------------------------------------------------------------
    // Workload

    /// The upper of table `id` as the world sees it (ignoring outages).
    fn storage_upper(&self, id: GlobalId) -> u64 {
        self.store.observe(id).ok().and_then(|s| s.upper.as_option().copied()).unwrap_or(0)
    }

    /// The table writer: one append at a time, at the upper its last acknowledgement left.
    fn append_to_tables(&mut self) {
        if self.store.append_pending() {
            return;
        }
        let upper = self.written_upper;
        if upper > self.now {
            return;
        }
        let mut requests = Vec::new();
        for (id, desc) in self.tables.clone() {
            let mut updates = Vec::new();
            for _ in 0..self.rng.below(4) {
                let row = random_row(&mut self.rng, &desc);
                let diff = if self.rng.chance(0.8) { 1 } else { -1 };
                updates.push((row, self.now, diff));
            }
            self.oracle.record_append(id, &updates, self.now + 1);
            if self.config.unrecorded_rows_from_ms.is_some_and(|from| self.now >= START_MS + from) {
                updates.push((random_row(&mut self.rng, &desc), self.now, 1));
            }
            requests.push(AppendRequest {
                id,
                updates,
                expected_upper: Antichain::from_elem(upper),
                new_upper: Antichain::from_elem(self.now + 1),
            });
        }
        self.store.start_append(requests);
    }

    fn fresh_id(&mut self) -> GlobalId {
        let id = GlobalId::User(self.next_id);
        self.next_id += 1;
        id
    }

    fn live_indexes(&self) -> Vec<GlobalId> {
        self.exports
            .iter()
            .filter(|(_, k)| matches!(k, ExportKind::Index { .. }))
            .map(|(id, _)| *id)
            .collect()
    }

    fn workload(&mut self, faults_on: bool) {
        if faults_on {
            if self.rng.chance(0.01) {
                self.create_dataflow();
            }
            if self.rng.chance(0.003) {
                self.drop_export();
            }
            self.drop_oversized_exports();
            if self.rng.chance(0.003) {
                self.set_policy();
            }
            if self.rng.chance(0.003) {
                self.hold_something();
            }
            if self.rng.chance(0.003) {
                self.cancel_peek();
            }
        }
        if self.rng.chance(0.03) {
            self.peek(faults_on);
        }
    }

    fn create_dataflow(&mut self) {
        let (table, table_desc) = self.rng.pick(&self.tables).cloned().expect("tables exist");
        let upstream = if self.rng.chance(0.4) { self.rng.pick(&self.live_indexes()).copied() } else { None };
        let mut df = DataflowDescription::new(format!("df{}", self.next_id));
        let mut context = Vec::new();
        match upstream {
            Some(index) => {
                let Some(ExportKind::Index { key, typ }) = self.exports.get(&index).cloned() else { return };
                let desc = RelationDesc::new(
                    typ.column_types.iter().enumerate().map(|(i, t)| (format!("c{i}"), *t)),
                );
                df.index_imports.insert(index, IndexImport { desc, key });
                context.push((index, typ));
            }
            None => {
                df.source_imports.insert(table, SourceImport { desc: table_desc.clone() });
                context.push((table, table_desc.typ().clone()));
            }
        }
        let values: Vec<u32> = (0..32).map(|_| self.rng.next_u64() as u32).collect();
        let mut choices = Choices::new(values);
        let (plan, typ) = plan_of(&mut choices, &context, 1);
        let object = GlobalId::Transient(self.next_id);
        df.objects_to_build.push(BuildDesc { id: object, plan });
        let subscribe = self.rng.chance(0.25);
        let export = self.fresh_id();
        if subscribe {
            let desc =
                RelationDesc::new(typ.column_types.iter().enumerate().map(|(i, t)| (format!("c{i}"), *t)));
            let with_snapshot = self.rng.chance(0.7);
            df.sink_exports.insert(
                export,
                SinkExport { from: object, desc, connection: SinkConnection::Subscribe { with_snapshot } },
            );
        } else {
            let key: Vec<usize> =
                if typ.arity() == 0 { vec![] } else { vec![self.rng.below(typ.arity() as u64) as usize] };
            df.index_exports.insert(export, IndexExport { on_id: object, key });
            if self.rng.chance(0.3) && typ.arity() > 0 {
                // A second export: another index of the same object on another key.
                let second = self.fresh_id();
                df.index_exports.insert(second, IndexExport { on_id: object, key: vec![] });
            }
        }
        // Select the as-of as the controller shell would, from current frontiers.
        let mut frontiers = BTreeMap::new();
        for id in df.source_imports.keys() {
            // Storage down: the shell would wait (or fail the request); the workload moves on.
            let Ok(f) = self.store.frontiers(*id) else { return };
            frontiers.insert(*id, ImportFrontiers { since: f.since, upper: f.upper });
        }
        for id in df.index_imports.keys() {
            let Some(f) = self.instance.collection_frontiers(*id) else { return };
            frontiers.insert(*id, ImportFrontiers { since: f.since, upper: f.upper });
        }
        let Ok(as_of) = select_as_of(&df, &frontiers) else { return };
        df.as_of = Some(as_of.clone());
        // Keep the workload small enough for thousands of seeds a minute: a dataflow whose output is
        // already large (a chain of cross joins) is not created. A data error is welcome (peeks must
        // surface it); a failure to evaluate is left to the checks that follow.
        let time = as_of.as_option().copied().expect("total order");
        if self.oracle.largest_export_rows(&df, time).is_ok_and(|rows| rows > MAX_EXPORT_ROWS) {
            return;
        }
        let mut holds = BTreeMap::new();
        for id in df.source_imports.keys() {
            match self.store.acquire_read_hold(&self.controller_client, *id, as_of.clone()) {
                Ok(hold) => {
                    holds.insert(*id, hold);
                }
                Err(e) if e.is_unavailable() => return,
                Err(e) => {
                    self.violation(
                        Invariant::Protocol,
                        format!("storage refused a hold at the selected as-of {as_of:?}: {e}"),
                    );
                    return;
                }
            }
        }
        let desc = Arc::new(df.clone());
        match self.instance.create_dataflow(df, holds) {
            Ok(()) => {
                self.oracle.record_dataflow(&desc);
                for (id, export) in &desc.index_exports {
                    let typ = desc.object_type(export.on_id).expect("valid");
                    self.exports.insert(*id, ExportKind::Index { key: export.key.clone(), typ });
                }
                for (id, sink) in &desc.sink_exports {
                    if let SinkConnection::Subscribe { with_snapshot } = sink.connection {
                        self.exports.insert(*id, ExportKind::Subscribe);
                        let as_of = as_of.as_option().copied().expect("total order");
                        self.subscribes.insert(*id, SubscribeTracker::new(as_of, with_snapshot));
                    }
                }
            }
            Err(e) => self
                .violation(Invariant::Protocol, format!("a dataflow with a selected as-of was refused: {e}")),
        }
        self.pump();
    }

    fn drop_export(&mut self) {
        let ids: Vec<GlobalId> = self.exports.keys().copied().collect();
        let Some(id) = self.rng.pick(&ids).copied() else { return };
        self.drop_export_id(id);
    }

    /// Drops exports that have grown past [`MAX_LIVE_EXPORT_ROWS`] on some model process: they would
    /// cost every later change an evaluation of that size on every process, and a seed would run for
    /// minutes.
    fn drop_oversized_exports(&mut self) {
        let mut largest: BTreeMap<GlobalId, usize> = BTreeMap::new();
        for sim in self.replicas.values() {
            for process in &sim.processes {
                for (id, rows) in process.export_rows() {
                    let entry = largest.entry(id).or_default();
                    *entry = (*entry).max(rows);
                }
            }
        }
        let oversized: Vec<GlobalId> = self
            .exports
            .keys()
            .filter(|id| largest.get(id).is_some_and(|rows| *rows > MAX_LIVE_EXPORT_ROWS))
            .copied()
            .collect();
        for id in oversized {
            self.drop_export_id(id);
        }
    }

    fn drop_export_id(&mut self, id: GlobalId) {
        match self.instance.drop_collections(&[id]) {
            Ok(()) => {
                self.exports.remove(&id);
            }
            Err(e) => self.violation(Invariant::Protocol, format!("dropping live {id} failed: {e}")),
        }
        self.pump();
    }

    fn set_policy(&mut self) {
        let Some(id) = self.rng.pick(&self.live_indexes()).copied() else { return };
        let policy = match self.rng.below(3) {
            0 => ReadPolicy::LagWriteFrontier {
                lag_ms: self.rng.range(0, 200),
                granularity_ms: self.rng.range(0, 20),
            },
            1 => ReadPolicy::Multiple(vec![
                ReadPolicy::LagWriteFrontier { lag_ms: self.rng.range(0, 50), granularity_ms: 0 },
                ReadPolicy::LagWriteFrontier { lag_ms: self.rng.range(0, 100), granularity_ms: 10 },
            ]),
            _ => ReadPolicy::LagWriteFrontier { lag_ms: 1, granularity_ms: 0 },
        };
        if let Err(e) = self.instance.set_read_policy(vec![(id, policy)]) {
            self.violation(Invariant::Protocol, format!("set_read_policy on live {id} failed: {e}"));
        }
    }

    fn hold_something(&mut self) {
        let Some(id) = self.rng.pick(&self.live_indexes()).copied() else { return };
        let hold = controller::lock(&self.instance.shared()).acquire_at_since(id);
        if let Ok(hold) = hold {
            let until = self.now + self.rng.range(50, 500);
            self.user_holds.push((until, hold));
        }
    }

    fn cancel_peek(&mut self) {
        let pending: Vec<PeekId> =
            self.peeks.iter().filter(|(_, p)| !p.cancelled).map(|(id, _)| *id).collect();
        let Some(uuid) = self.rng.pick(&pending).copied() else { return };
        if self.instance.cancel_peek(uuid).is_ok() {
            self.peeks.get_mut(&uuid).expect("listed").cancelled = true;
        }
        self.pump();
    }

    fn peek(&mut self, faults_on: bool) {
        let Some(id) = self.rng.pick(&self.live_indexes()).copied() else { return };
        let Some(ExportKind::Index { key, typ }) = self.exports.get(&id).cloned() else { return };
        let Some(frontiers) = self.instance.collection_frontiers(id) else { return };
        let (Some(since), Some(upper)) =
            (frontiers.since.as_option().copied(), frontiers.upper.as_option().copied())
        else {
            return;
        };
        let timestamp = match self.rng.below(4) {
            0 if upper > since => self.rng.range(since, upper - 1),
            1 => upper + self.rng.below(20),
            _ => upper.saturating_sub(1).max(since),
        };
        let constraints = if self.rng.chance(0.2) && !key.is_empty() {
            Some(vec![Row::pack([Datum::Int64(self.rng.range(0, 6) as i64)])])
        } else {
            None
        };
        let constraints = constraints
            .filter(|_| key.len() == 1 && typ.column_types[key[0]].scalar_type == ScalarType::Int64);
        let finishing = if self.rng.chance(0.3) && typ.arity() > 0 {
            RowSetFinishing {
                order_by: vec![if self.rng.chance(0.5) { ColumnOrder::asc(0) } else { ColumnOrder::desc(0) }],
                limit: Some(self.rng.range(1, 4) as usize),
                offset: self.rng.below(2) as usize,
            }
        } else {
            RowSetFinishing::unordered()
        };
        let target = if faults_on && self.rng.chance(0.15) {
            let ids: Vec<ReplicaId> = self.replicas.keys().copied().collect();
            self.rng.pick(&ids).copied()
        } else {
            None
        };
        let uuid = PeekId(self.next_peek);
        self.next_peek += 1;
        let mfp = MapFilterProject::new(typ.arity());
        let request = PeekRequest {
            uuid,
            id,
            timestamp,
            options: PeekOptions {
                literal_constraints: constraints.clone(),
                map_filter_project: Some(mfp.clone()),
                finishing: finishing.clone(),
                target_replica: target,
                timeout_ms: None,
            },
        };
        match self.instance.peek(request) {
            Ok(()) => {
                self.issued.insert(uuid, (id, timestamp));
                self.peeks.insert(
                    uuid,
                    PeekExpectation {
                        id,
                        timestamp,
                        key,
                        constraints,
                        mfp,
                        finishing,
                        target,
                        cancelled: false,
                        issued_ms: self.now,
                    },
                );
            }
            Err(e) => {
                self.violation(Invariant::Protocol, format!("a peek at a readable time was refused: {e}"))
            }
        }
        self.pump();
    }

    // ---------------------------------------------------------------------------------------------
    // Checks

    fn violation(&mut self, invariant: Invariant, message: String) {
        self.violations.push(Violation::new(invariant, message));
    }

    /// DESIGN §5.3 from the replicas' side: while a replica still owes the answer to a peek at `t` (its
    /// model process has the peek and has not answered, the command or the answer is on the wire, or its
    /// command history will replay the peek), the controller keeps the peek's hold at or before `t`, and
    /// the collection's since with it. Who owes an answer is the world's own knowledge, not the
    /// controller's bookkeeping; the controller is asked where its hold is ([`InstanceCore::peek_holds`])
    /// and what the collection's since is.
    fn check_peek_holds(&mut self) {
        if self.issued.is_empty() {
            return;
        }
        let holds: BTreeMap<PeekId, Option<Antichain<u64>>> =
            self.instance.peek_holds().into_iter().map(|(uuid, _, hold, _)| (uuid, hold)).collect();
        let mut owed: BTreeMap<PeekId, ReplicaId> = BTreeMap::new();
        for (replica, sim) in &self.replicas {
            for uuid in self.issued.keys() {
                if sim.core.history().contains_peek(*uuid) {
                    owed.insert(*uuid, *replica);
                }
            }
            if let Some(epoch) = sim.link {
                for process in &sim.processes {
                    for (uuid, _) in process.pending_peeks(epoch) {
                        owed.insert(uuid, *replica);
                    }
                }
            }
        }
        for message in self.network.values() {
            let (replica, epoch, uuid) = match message {
                Message::ToReplica { replica, epoch, command: ComputeCommand::Peek(peek), .. } => {
                    (*replica, *epoch, peek.uuid)
                }
                Message::ToController {
                    replica,
                    epoch,
                    response: ComputeResponse::PeekResponse { uuid, .. },
                    ..
                } => (*replica, *epoch, *uuid),
                _ => continue,
            };
            if self.replicas.get(&replica).is_some_and(|sim| sim.link == Some(epoch)) {
                owed.insert(uuid, replica);
            }
        }
        for (uuid, replica) in &owed {
            let Some((id, time)) = self.issued.get(uuid).copied() else { continue };
            let since = self.instance.collection_frontiers(id).map(|f| f.since);
            let held = match (holds.get(uuid), since) {
                (_, Some(since)) if !since.less_equal(&time) => format!("the since of {id} is {since:?}"),
                (Some(Some(hold)), _) if hold.less_equal(&time) => continue,
                (Some(Some(hold)), _) => format!("its hold is at {hold:?}"),
                (Some(None), _) => "it released its hold".to_string(),
                (None, _) => "it forgot the peek".to_string(),
            };
            self.violation(
                Invariant::PeekHolds,
                format!("{replica} still owes the answer to peek {uuid} of {id} at {time}, but {held}"),
            );
            return;
        }
        // A peek nobody owes an answer any more and the controller forgot is finished.
        self.issued.retain(|uuid, _| owed.contains_key(uuid) || holds.contains_key(uuid));
    }

    fn check_peek(&mut self, uuid: PeekId, response: PeekResult) {
        let Some(expectation) = self.peeks.remove(&uuid) else {
            self.violation(Invariant::Protocol, format!("result for unknown peek {uuid}"));
            return;
        };
        self.peeks_checked += 1;
        if let Err(violation) = expectation.check(uuid, &self.oracle, &response) {
            self.violations.push(violation);
        }
    }

    fn observe_response(&mut self, response: ComputeControllerResponse<u64>) {
        let ComputeControllerResponse::SubscribeResponse { id, response } = response else { return };
        let Some(tracker) = self.subscribes.get_mut(&id) else { return };
        match tracker.observe(id, &self.oracle, response, self.now) {
            Ok(checked) => self.batches_checked += u64::from(checked),
            Err(violation) => self.violations.push(violation),
        }
    }

    fn check_history_bound(&mut self) {
        // DESIGN §5.7: the history holds live state only.
        let live = self.instance.collection_count();
        let bound = 3 + live * 4 + self.instance.pending_peek_count();
        for (replica, sim) in &self.replicas {
            let len = sim.core.history().len();
            if len > bound {
                self.violations.push(Violation::new(
                    Invariant::HistoryBound,
                    format!("{replica}'s history has {len} commands for {live} collections"),
                ));
            }
        }
    }

    fn check_liveness(&mut self, marks: BTreeMap<GlobalId, u64>) {
        for (replica, sim) in &self.replicas {
            if !sim.core.is_live() {
                self.violations.push(Violation::new(
                    Invariant::Liveness,
                    format!("{replica} is not connected after the faults stopped"),
                ));
            }
        }
        let stuck: Vec<PeekId> =
            self.peeks.iter().filter(|(_, p)| p.issued_ms + 1_000 < self.now).map(|(id, _)| *id).collect();
        if !stuck.is_empty() {
            self.violation(Invariant::Liveness, format!("peeks {stuck:?} never completed"));
        }
        let target = marks.values().copied().min().unwrap_or(0);
        let live: BTreeSet<GlobalId> = self.exports.keys().copied().collect();
        // Dropped collections an importer still holds stay installed until it goes too.
        let installed_expected = self.instance.uncompacted_collections();
        for id in &live {
            if let Some(f) = self.instance.collection_frontiers(*id)
                && f.upper.as_option().is_some_and(|u| *u < target)
            {
                self.violations.push(Violation::new(
                    Invariant::Liveness,
                    format!("{id} is at {:?}, storage was at {target}", f.upper),
                ));
            }
        }
        // Invariant 5: every connected replica has installed exactly the live dataflows.
        for (replica, sim) in &self.replicas {
            for (process, model) in sim.processes.iter().enumerate() {
                let installed = model.installed_exports();
                if installed != installed_expected {
                    self.violations.push(Violation::new(
                        Invariant::InstalledState,
                        format!(
                            "{replica} process {process} has {installed:?} installed, the live state is {installed_expected:?}"
                        ),
                    ));
                }
            }
        }
    }
}
