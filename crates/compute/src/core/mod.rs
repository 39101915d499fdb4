//! The process core: the protocol state machine of one replica process, on the tokio thread.
//!
//! **What this is.** [`Core`] owns everything a process knows at the protocol level: the active controller
//! connection and its stage, the catalog of dataflows and exported collections, pending peeks, and the
//! merging of its workers' reports. It receives [`CoreEvent`]s (connection events and commands, storage
//! results) and [`FromWorker`] reports, and it sends [`ToWorker`] messages and [`ComputeResponse`]s. This
//! module holds the state and the stage machine; each other concept has its module:
//! - `responses`: encoding responses onto the connection's [`Outbox`], and their stand-ins when too large;
//! - `reconcile`: what a reconnect keeps of the running dataflows;
//! - `catalog`: dataflows and their exported collections (create, schedule, compact, drop, fail) and
//!   their frontiers and hydration;
//! - `peeks`: routing peeks to workers or storage and merging the answers;
//! - `sinks`: merging the workers' subscribe, materialized-view and copy-to output into ranges;
//! - `copy_to`: writing a finished copy-to's CSV files;
//! - `feeds`: the storage listens feeding a scheduled dataflow's workers;
//! - `appender`: a materialized view's appends to storage.
//!
//! - **Stages.** Authentication and the Hello's version are checked by the connection task
//!   (`server.rs`); a connection becomes active here if its controller may take over ([`Fence`]), which
//!   answers its Hello and replaces the previous connection, or is answered `Fenced` and closed (the
//!   active one untouched). Then `CreateInstance` (exactly once), the replayed history (buffered),
//!   `InitializationComplete` (reconciliation, `reconcile.rs`), then normal commands. A command in the
//!   wrong stage is answered with `CommandRejected` and the connection is closed.
//! - **Reports.** Workers' reports name their dataflow (a [`DataflowKey`], never reused) and peeks their
//!   routing ([`PeekSeq`]): a report of a dataflow that was dropped and rebuilt under the same export ids,
//!   or an answer to an earlier peek under the same uuid, is ignored.
//! - **Failure.** A worker that panics or timely failing stops the process ([`CoreExit::Failed`]): nothing
//!   it would answer afterwards could be trusted.
//!
//! **What this is not.** No timely code (the workers') and no socket code (the server's).
//!
//! **Invariants.** Reported frontiers never regress within a connection (asserted before sending, in
//! `catalog.rs`). Each peek is answered exactly once per connection (`peeks.rs`). A dataflow is dropped
//! only after every dataflow importing from it was dropped. Commands other than the stage commands reach
//! [`Core::execute`] only in the replay's execution or the normal stage.
//!
//! **Tests.** Through the socket, in `tests/it` (reconnect, bad input, peeks, sinks, limits); each
//! submodule names its own unit tests.

mod appender;
mod catalog;
mod copy_to;
mod feeds;
mod peeks;
mod reconcile;
mod responses;
mod sinks;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use protocol::{
    ComputeCommand, ComputeParameters, ComputeResponse, ControllerEpoch, CopyToResponse, GlobalId,
    InstanceConfig, PROTOCOL_VERSION, PeekId, PeekResponse,
};
use storage::StorageCollections;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use self::catalog::{CoreCollection, CoreDataflow};
use self::peeks::CorePeek;
pub(crate) use self::responses::{Outbox, Outgoing};
use crate::fence::Fence;
use crate::messages::{DataflowKey, FromWorker, PeekSeq, ToWorker, WorkerTx};
use crate::metrics::ReplicaMetrics;

/// What a controller's Hello says, for the core to answer it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ControllerHello {
    /// Echoed in the answer.
    pub nonce: u64,
    /// The controller's epoch.
    pub epoch: ControllerEpoch,
    /// The controller's session.
    pub session: u64,
}

/// Why [`Core::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CoreExit {
    /// Told to shut down.
    Shutdown,
    /// The process cannot serve any more (a worker or timely failed): it stops, and says why.
    Failed(String),
}

/// An event for the core.
#[derive(Debug)]
pub(crate) enum CoreEvent {
    /// A connection authenticated and said a Hello of our version: it becomes the active one if its
    /// controller may take over.
    Connected {
        /// The connection.
        conn: u64,
        /// Where its responses go.
        out: Outbox,
        /// What its Hello said.
        hello: ControllerHello,
    },
    /// A command on a connection.
    Command {
        /// The connection.
        conn: u64,
        /// The command.
        command: ComputeCommand,
    },
    /// A connection closed.
    Disconnected {
        /// The connection.
        conn: u64,
    },
    /// A storage import of a dataflow can no longer be read (its hold or listen failed).
    ImportFailed {
        /// The dataflow.
        key: DataflowKey,
        /// The storage collection.
        import: GlobalId,
        /// Why.
        error: String,
    },
    /// An export can make no more progress, for a reason retrying will not cure (a materialized view's
    /// appender stopped).
    ExportFailed {
        /// The dataflow.
        key: DataflowKey,
        /// The export.
        id: GlobalId,
        /// Why.
        error: String,
    },
    /// A copy-to's files were written (or failed to be), off the core's thread (`copy_to.rs`).
    CopyToWritten {
        /// The copy-to's dataflow (a copy-to rebuilt on a new connection is another one).
        key: DataflowKey,
        /// The copy-to.
        id: GlobalId,
        /// Its answer: the rows written, or why not.
        response: CopyToResponse,
    },
    /// A storage peek finished.
    StoragePeek {
        /// The peek.
        uuid: PeekId,
        /// Its answer.
        response: PeekResponse,
    },
    /// Stop the process.
    Shutdown,
}

/// The process's place in the replica.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Topology {
    /// This process's index.
    pub process: usize,
    /// Workers per process.
    pub workers: usize,
    /// Workers in the whole replica.
    pub peers: usize,
}

impl Topology {
    /// The local index of global worker `global`, if it is in this process.
    fn local(&self, global: usize) -> Option<usize> {
        let first = self.process * self.workers;
        (first..first + self.workers).contains(&global).then(|| global - first)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    AwaitCreateInstance,
    Replay,
    Normal,
}

#[derive(Debug)]
struct Connection {
    id: u64,
    out: Outbox,
    stage: Stage,
    replay: Vec<ComputeCommand>,
}

/// The process core. See the module documentation.
pub(crate) struct Core {
    topology: Topology,
    workers: Vec<WorkerTx>,
    storage: Arc<dyn StorageCollections>,
    events: UnboundedSender<CoreEvent>,
    active: Option<Connection>,
    /// Which controllers may take over.
    fence: Fence,
    /// The instance this process serves (set by the first `CreateInstance`).
    instance: Option<InstanceConfig>,
    parameters: ComputeParameters,
    /// Whether `AllowWrites` arrived (read by the views' appenders and by copy-tos).
    allow_writes: watch::Sender<bool>,
    /// The key of the next dataflow (`catalog.rs`); never reused.
    next_key: DataflowKey,
    /// The dataflows running (`catalog.rs`).
    dataflows: BTreeMap<DataflowKey, CoreDataflow>,
    /// Their exports (`catalog.rs`).
    collections: BTreeMap<GlobalId, CoreCollection>,
    /// Index peeks routed to workers and waiting for their parts (`peeks.rs`).
    peeks: BTreeMap<PeekId, CorePeek>,
    /// Storage peeks being read (`peeks.rs`).
    storage_peeks: BTreeMap<PeekId, JoinHandle<()>>,
    built: Arc<AtomicU64>,
    limits: CoreLimits,
    /// The process's idle merge effort, read by every arrangement's merge rule
    /// (`worker::install_idle_merge`).
    idle_merge_effort: Arc<AtomicUsize>,
    /// The number of the next peek routing (`peeks.rs`).
    next_peek_seq: PeekSeq,
    /// Fault injection for tests of the process's failure path (see `server.rs`).
    panic_on_connect: bool,
    metrics: ReplicaMetrics,
}

/// What the core shares with the rest of its process.
pub(crate) struct CoreShared {
    /// Dataflows built since the process started (read by `ReplicaHandle::dataflows_built`).
    pub built: Arc<AtomicU64>,
    /// The idle merge effort every arrangement's merge rule reads (`worker::install_idle_merge`).
    pub idle_merge_effort: Arc<AtomicUsize>,
    /// The replica's metrics.
    pub metrics: ReplicaMetrics,
}

/// The bounds a core applies to its connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CoreLimits {
    /// The largest frame written (and read) on a controller connection.
    pub max_frame_bytes: usize,
    /// Bytes of responses queued for a connection and not yet written beyond which the connection is
    /// dropped (the controller does not read its responses).
    pub max_queued_bytes: usize,
    /// Bytes of a materialized view's updates its appender may hold unwritten (`appender.rs`).
    pub max_view_backlog_bytes: u64,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("topology", &self.topology).finish_non_exhaustive()
    }
}

impl Core {
    /// A core for a process with the given workers.
    pub fn new(
        topology: Topology,
        workers: Vec<WorkerTx>,
        storage: Arc<dyn StorageCollections>,
        events: UnboundedSender<CoreEvent>,
        limits: CoreLimits,
        shared: CoreShared,
    ) -> Self {
        let CoreShared { built, idle_merge_effort, metrics } = shared;
        let (allow_writes, _) = watch::channel(false);
        Core {
            topology,
            workers,
            storage,
            events,
            active: None,
            fence: Fence::default(),
            instance: None,
            parameters: ComputeParameters::default(),
            allow_writes,
            next_key: 0,
            dataflows: BTreeMap::new(),
            collections: BTreeMap::new(),
            peeks: BTreeMap::new(),
            storage_peeks: BTreeMap::new(),
            built,
            limits,
            idle_merge_effort,
            next_peek_seq: 0,
            panic_on_connect: false,
            metrics,
        }
    }

    /// Makes the core panic when a controller connection becomes active: a fault injected by tests of
    /// what the process does when its I/O thread panics.
    pub fn inject_panic_on_connect(&mut self) {
        self.panic_on_connect = true;
    }

    /// Runs until shut down, or until the process cannot serve any more.
    pub async fn run(
        mut self,
        mut events: UnboundedReceiver<CoreEvent>,
        mut reports: UnboundedReceiver<FromWorker>,
    ) -> CoreExit {
        let exit = loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(CoreEvent::Shutdown) | None => break CoreExit::Shutdown,
                    Some(event) => self.handle_event(event).await,
                },
                report = reports.recv() => match report {
                    Some(FromWorker::Failed { worker, message }) => {
                        // Dataflow code panicked (e.g. a multiplicity overflowed with overflow checks on).
                        // The other workers cannot make progress without it, so nothing this process
                        // would answer from now on could be trusted: close the connection and stop, and
                        // let the orchestrator restart the process (the controller replays to it).
                        error!(worker, %message, "a timely worker panicked; the replica stops");
                        break CoreExit::Failed(format!("worker {worker} panicked: {message}"));
                    }
                    Some(FromWorker::TimelyFailed { message }) => {
                        error!(%message, "timely failed; the replica stops");
                        break CoreExit::Failed(message);
                    }
                    Some(report) => self.handle_report(report),
                    // Every worker and the timely thread are gone without having said why.
                    None => break CoreExit::Failed("the timely workers are gone".to_string()),
                },
            }
        };
        if let Some(conn) = self.active.take() {
            conn.out.close();
        }
        for dataflow in self.dataflows.values() {
            for task in &dataflow.tasks {
                task.abort();
            }
        }
        for task in self.storage_peeks.values() {
            task.abort();
        }
        // After a failure the workers are stopped by the server, once it has cut the cluster's sockets:
        // stopped cleanly first, they would tell the other processes' timely a clean goodbye, and those
        // would wait forever for the rest of a computation this process no longer does.
        if exit == CoreExit::Shutdown {
            self.broadcast(|| ToWorker::Shutdown);
        }
        exit
    }

    fn broadcast(&self, message: impl Fn() -> ToWorker) {
        for worker in &self.workers {
            if worker.send(message()).is_err() {
                debug!("worker gone");
            }
        }
    }

    async fn handle_event(&mut self, event: CoreEvent) {
        match event {
            CoreEvent::Connected { conn, out, hello } => self.connect(conn, out, hello),
            CoreEvent::Disconnected { conn } => {
                if self.active.as_ref().is_some_and(|c| c.id == conn) {
                    info!(conn, "controller disconnected");
                    self.active = None;
                }
            }
            CoreEvent::Command { conn, command } => {
                if self.active.as_ref().is_some_and(|c| c.id == conn) {
                    self.handle_command(command).await;
                }
            }
            CoreEvent::ImportFailed { key, import, error } => self.import_failed(key, import, error),
            CoreEvent::ExportFailed { key, id, error } => self.export_failed(key, id, error),
            CoreEvent::CopyToWritten { key, id, response } => self.copy_to_written(key, id, response),
            CoreEvent::StoragePeek { uuid, response } => self.storage_peek_answered(uuid, response),
            CoreEvent::Shutdown => unreachable!("handled by run"),
        }
    }

    /// A connection said its Hello: it replaces the active one if its controller may take over (the
    /// previous connection's peeks are forgotten and every frontier is reported afresh), else it is
    /// answered `Fenced` and closed.
    fn connect(&mut self, conn: u64, out: Outbox, hello: ControllerHello) {
        if let Err(current) = self.fence.admit(hello.epoch, hello.session, self.active.is_some()) {
            warn!(conn, epoch = %hello.epoch, %current, "refusing a controller that may not take over");
            responses::refuse_fenced(&out, current, self.limits.max_frame_bytes);
            return;
        }
        assert!(!self.panic_on_connect, "injected fault: the I/O thread panics on connect");
        if let Some(old) = self.active.take() {
            info!(old = old.id, new = conn, "controller connection replaced");
            old.out.close();
        }
        // Peeks of the previous connection are forgotten (the controller re-sends what it wants).
        self.forget_peeks();
        for collection in self.collections.values_mut() {
            collection.reported = None;
            collection.hydration_reported = false;
        }
        self.active =
            Some(Connection { id: conn, out, stage: Stage::AwaitCreateInstance, replay: Vec::new() });
        info!(conn, epoch = %hello.epoch, "controller connected");
        self.send(ComputeResponse::Hello { version: PROTOCOL_VERSION, nonce: hello.nonce });
    }

    async fn handle_command(&mut self, command: ComputeCommand) {
        let stage = self.active.as_ref().map(|c| c.stage).expect("commands arrive on the active connection");
        let name = command.name();
        match (stage, command) {
            (_, ComputeCommand::Hello { .. }) => {
                self.reject_and_close(name, "Hello was already received on this connection".to_string())
            }
            (Stage::AwaitCreateInstance, ComputeCommand::CreateInstance(config)) => {
                if let Some(current) = &self.instance
                    && current.instance_id != config.instance_id
                {
                    let reason = format!(
                        "replica serves instance {}, not {}",
                        current.instance_id, config.instance_id
                    );
                    self.reject_and_close(name, reason);
                    return;
                }
                tracing::Span::current()
                    .record("instance", tracing::field::display(config.instance_id))
                    .record("replica", tracing::field::display(config.replica_id));
                info!(instance = %config.instance_id, replica = %config.replica_id, "instance configured");
                self.instance = Some(config);
                if let Some(conn) = self.active.as_mut() {
                    conn.stage = Stage::Replay;
                }
            }
            (Stage::AwaitCreateInstance, _) => {
                self.reject_and_close(name, "expected CreateInstance after Hello".to_string())
            }
            (Stage::Replay, ComputeCommand::InitializationComplete) => {
                let replay = self.active.as_mut().map(|c| std::mem::take(&mut c.replay)).unwrap_or_default();
                self.reconcile(replay).await;
                if let Some(conn) = self.active.as_mut() {
                    conn.stage = Stage::Normal;
                }
                self.report_all();
            }
            (_, ComputeCommand::CreateInstance(_))
            | (Stage::Normal, ComputeCommand::InitializationComplete) => {
                self.reject_and_close(name, format!("{name} is only valid once, during initialization"))
            }
            (Stage::Replay, command) => {
                if let Some(conn) = self.active.as_mut() {
                    conn.replay.push(command);
                }
            }
            (Stage::Normal, command) => self.execute(command).await,
        }
    }

    /// Executes a command of the replay (after reconciliation) or of the normal stage.
    async fn execute(&mut self, command: ComputeCommand) {
        match command {
            ComputeCommand::Hello { .. }
            | ComputeCommand::CreateInstance(_)
            | ComputeCommand::InitializationComplete => {
                unreachable!("stage commands are handled by the stage machine")
            }
            ComputeCommand::UpdateConfiguration(parameters) => {
                if let Some(effort) = parameters.idle_merge_effort {
                    let effort = usize::try_from(effort).unwrap_or(usize::MAX);
                    self.idle_merge_effort.store(effort, Ordering::Relaxed);
                }
                self.parameters.update(parameters);
            }
            ComputeCommand::CreateDataflow(desc) => {
                if let Err(reason) = self.create_dataflow(desc).await {
                    self.reject("CreateDataflow", reason);
                }
            }
            ComputeCommand::Schedule(id) => {
                let Some(key) = self.collections.get(&id).map(|c| c.dataflow) else {
                    self.reject("Schedule", format!("unknown collection {id}"));
                    return;
                };
                self.schedule(key);
            }
            ComputeCommand::AllowCompaction { id, frontier } => self.allow_compaction(id, frontier),
            ComputeCommand::Peek(peek) => self.peek(peek),
            ComputeCommand::CancelPeek { uuid } => self.cancel_peek(uuid),
            ComputeCommand::AllowWrites => {
                // `send_replace`, not `send`: with no materialized view listening yet (a replay sends
                // AllowWrites before every CreateDataflow), `send` would drop the value.
                self.allow_writes.send_replace(true);
                self.write_ready_copy_tos();
            }
        }
    }

    fn handle_report(&mut self, report: FromWorker) {
        match report {
            FromWorker::Peek { worker, uuid, seq, response } => {
                self.peek_answered(worker, uuid, seq, response)
            }
            FromWorker::Frontiers { worker, dataflow, id, write, input } => {
                let Some(collection) = self.collections.get_mut(&id) else { return };
                if collection.dataflow != dataflow {
                    // From a dataflow that was dropped and rebuilt under the same export id: its
                    // frontiers say nothing about the new one's.
                    debug!(%id, dataflow, current = collection.dataflow, "stale frontier report ignored");
                    return;
                }
                collection.worker_frontiers[worker] = Some((write, input));
                self.report_frontiers(id);
            }
            FromWorker::Sink { worker, dataflow, id, updates, errors, frontier } => {
                if self.collections.get(&id).is_some_and(|c| c.dataflow == dataflow) {
                    self.merge_sink(worker, id, updates, errors, frontier);
                }
            }
            FromWorker::Failed { .. } | FromWorker::TimelyFailed { .. } => unreachable!("handled by run"),
        }
    }
}
