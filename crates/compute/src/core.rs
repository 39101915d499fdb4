//! The process core: the protocol state machine of one replica process, on the tokio thread.
//!
//! **What this is.** [`Core`] owns everything a process knows at the protocol level: the active controller
//! connection and its stage, the catalog of dataflows and exported collections, pending peeks, and the
//! merging of its workers' reports. It receives [`CoreEvent`]s (connection events and commands, storage
//! results) and [`FromWorker`] reports, and it sends [`ToWorker`] messages and [`ComputeResponse`]s.
//!
//! - **Stages.** Hello is checked by the connection task (`server.rs`); a connection becomes active here
//!   only after a valid Hello, replacing the previous one. Then `CreateInstance` (exactly once), the
//!   replayed history (buffered), `InitializationComplete` (reconciliation, see below), then normal
//!   commands. A command in the wrong stage is answered with `CommandRejected` and the connection is closed.
//! - **Reconciliation.** A running dataflow is kept (no rehydration) if the replay creates an identical one
//!   (only the as-of may be later), it was scheduled, all its index imports come from kept dataflows, it
//!   has no subscribe or copy-to export (those stream to the connection that asked, so they are rebuilt
//!   from the replayed as-of), its storage imports did not fail, and none of its exports was dropped
//!   unless the replay drops it too. A dataflow never scheduled holds nothing in storage yet and would
//!   start from its earlier as-of, which the controller no longer holds once it replayed a later one: it
//!   is rebuilt at the replayed as-of (the simulator's model replica follows the same rule). Everything
//!   else running is dropped (importers first), then the replay is executed, skipping kept dataflows'
//!   creations.
//! - **Reports.** Workers' reports name their dataflow (a [`DataflowKey`], never reused) and peeks their
//!   routing ([`PeekSeq`]): a report of a dataflow that was dropped and rebuilt under the same export ids,
//!   or an answer to an earlier peek under the same uuid, is ignored. Sinks of a connection that is gone
//!   (none is active, or a new one is replaying) stop: their output has no consumer, and reconciliation
//!   rebuilds them.
//! - **Responses.** The core encodes every response ([`Core::send`]); what does not fit a frame gets its
//!   stand-in or closes the connection, and a connection with too much queued is dropped.
//! - **Failed imports.** When a storage import's hold or listen fails, its dataflow stops: its pending and
//!   later peeks, subscribes and copy-tos are answered with the error.
//! - **Merging.** Frontiers are the meet over the process's workers and are sent only on change; peek
//!   answers are the union of the parts of the workers the peek was routed to; a subscribe batch
//!   `[lower, upper)` is sent once every local worker's sink frontier passed `upper`; copy-to row counts are
//!   summed over the workers' files; materialized-view batches (all funnelled to global worker 0) go to the
//!   appender task.
//! - **Storage.** On `Schedule`, one listen per storage import feeds each local worker the rows it owns
//!   (`row_owner`, so across processes every update is ingested once) and advances its input to the listen's
//!   progress, under a storage read hold at the as-of that follows the progress. Materialized views append
//!   with compare-and-append once `AllowWrites` arrived; on `UpperMismatch` they skip to the current upper;
//!   a transient storage failure is retried with a bounded backoff; one retrying cannot cure (the target
//!   dropped, an append storage refuses, a multiplicity beyond `i64`, an error in the view's data) stops
//!   the view and is reported as `StatusResponse::Failed`, as is an index or view whose storage import
//!   failed. A dataflow with a failed export is rebuilt on the next connection, not kept.
//!
//! **What this is not.** No timely code (the workers') and no socket code (the server's).
//!
//! **Invariants.** Reported frontiers never regress within a connection (asserted before sending). Each
//! peek is answered exactly once per connection. A dataflow is dropped only after every dataflow
//! importing from it was dropped.
//!
//! **Tests.** Through the socket, in `tests/it` (reconnect, bad input, peeks, sinks, limits); the
//! appender's failures (each reported) and retries, and the stand-ins of oversized responses in
//! `mod tests`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use frontiers::{Antichain, PartialOrder};
use protocol::frame::FrameError;
use protocol::{
    ComputeCommand, ComputeParameters, ComputeResponse, CopyToResponse, DataflowDescription, Datum,
    FrontiersResponse, GlobalId, InstanceConfig, Peek, PeekId, PeekResponse, PeekTarget, Row, SinkConnection,
    StatusResponse, SubscribeBatch, SubscribeResponse,
};
use storage::{AppendError, AppendRequest, ListenEvent, ReadError, StorageCollections};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, error, info, warn};
use transport::Frame;

use crate::messages::{DataflowKey, FeedBudget, FromWorker, PeekSeq, ToWorker, WorkerPeek, WorkerTx};
use crate::metrics::{ReplicaMetrics, StorageReadLag};
use crate::render::{Diff, Time, error_message};
use crate::worker::{finish_rows, key_owner, row_owner};

/// What the core sends a connection task.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A response, encoded (the core encodes, so that it decides what becomes of a response that does
    /// not fit a frame; see [`Core::send`]).
    Frame(Frame),
    /// Close the connection after writing what came before.
    Close,
}

/// The sending side of a connection's queue of [`Outgoing`] frames, with the count of bytes queued and not
/// yet written (the connection task subtracts what it wrote), and a switch that drops the connection at
/// once, without writing what is queued.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    tx: UnboundedSender<Outgoing>,
    queued_bytes: Arc<AtomicUsize>,
    abort: Arc<watch::Sender<bool>>,
}

impl Outbox {
    /// An outbox for `tx`, the connection task's byte counter and its abort switch.
    pub fn new(
        tx: UnboundedSender<Outgoing>,
        queued_bytes: Arc<AtomicUsize>,
        abort: watch::Sender<bool>,
    ) -> Self {
        Outbox { tx, queued_bytes, abort: Arc::new(abort) }
    }

    /// Closes the connection after what is queued is written.
    fn close(&self) {
        let _ = self.tx.send(Outgoing::Close);
    }

    /// Drops the connection now (a write waiting for the peer is abandoned).
    fn abort(&self) {
        self.abort.send_replace(true);
    }
}

/// Why [`Core::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CoreExit {
    /// Told to shut down.
    Shutdown,
    /// The process cannot serve any more (a worker or timely failed): it stops, and says why.
    Failed(String),
}

/// Error messages in responses that would not fit a frame are cut to this many bytes.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// An event for the core.
#[derive(Debug)]
pub(crate) enum CoreEvent {
    /// A connection passed its Hello and becomes the active one.
    Connected {
        /// The connection.
        conn: u64,
        /// Where its responses go.
        out: Outbox,
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

#[derive(Debug)]
struct CoreDataflow {
    desc: Arc<DataflowDescription<Time>>,
    as_of: Time,
    /// Exports not yet dropped.
    exports: BTreeSet<GlobalId>,
    /// Dataflows this one imports indexes from.
    imports_from: BTreeSet<DataflowKey>,
    /// How many live dataflows import from this one.
    importers: usize,
    scheduled: bool,
    /// Storage listens and appenders.
    tasks: Vec<JoinHandle<()>>,
    /// Why the dataflow cannot make progress any more (a storage import failed): its peeks and sinks end
    /// with this error.
    failed: Option<String>,
}

#[derive(Debug)]
enum ExportKind {
    Index,
    Subscribe,
    MaterializedView { appender: Option<UnboundedSender<MvBatch>> },
    CopyTo { directory: String },
}

#[derive(Debug)]
struct CoreCollection {
    dataflow: DataflowKey,
    kind: ExportKind,
    as_of: Time,
    /// The allowed compaction frontier (initially the as-of).
    since: Antichain<Time>,
    /// Per local worker: (write, input) frontiers last reported.
    worker_frontiers: Vec<Option<(Antichain<Time>, Antichain<Time>)>>,
    /// Frontiers sent on the active connection: (write, input).
    reported: Option<(Antichain<Time>, Antichain<Time>)>,
    hydrated: bool,
    hydration_reported: bool,
    /// It can make no more progress (reported as `StatusResponse::Failed`); the next reconnect rebuilds
    /// its dataflow.
    failed: bool,
    sink: SinkMerge,
}

/// Per-sink merging of the local workers' output.
#[derive(Debug, Default)]
struct SinkMerge {
    worker_frontiers: Vec<Antichain<Time>>,
    updates: Vec<(Row, Time, Diff)>,
    errors: Vec<(Row, Time, Diff)>,
    /// Copy-to: rows per local worker.
    per_worker: Vec<Vec<(Row, Time, Diff)>>,
    lower: Antichain<Time>,
    done: bool,
    /// Copy-to: the rows are complete and wait for `AllowWrites`.
    ready: bool,
}

/// A batch of a materialized view for the appender.
#[derive(Debug)]
struct MvBatch {
    lower: Antichain<Time>,
    upper: Antichain<Time>,
    updates: Vec<(Row, Time, Diff)>,
    /// The first error of the view's data in the batch's range, if it has any.
    error: Option<String>,
}

#[derive(Debug)]
struct CorePeek {
    /// This routing's number; workers' answers carry it.
    seq: PeekSeq,
    waiting: BTreeSet<usize>,
    parts: Vec<PeekResponse>,
    peek: Peek,
    max_result_size_bytes: Option<u64>,
}

/// The process core. See the module documentation.
pub(crate) struct Core {
    topology: Topology,
    workers: Vec<WorkerTx>,
    storage: Arc<dyn StorageCollections>,
    events: UnboundedSender<CoreEvent>,
    active: Option<Connection>,
    instance: Option<InstanceConfig>,
    parameters: ComputeParameters,
    allow_writes: watch::Sender<bool>,
    next_key: DataflowKey,
    dataflows: BTreeMap<DataflowKey, CoreDataflow>,
    collections: BTreeMap<GlobalId, CoreCollection>,
    peeks: HashMap<PeekId, CorePeek>,
    storage_peeks: HashMap<PeekId, JoinHandle<()>>,
    built: Arc<AtomicU64>,
    limits: CoreLimits,
    /// The process's idle merge effort, read by every arrangement's merge rule
    /// (`worker::install_idle_merge`).
    idle_merge_effort: Arc<AtomicUsize>,
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
            instance: None,
            parameters: ComputeParameters::default(),
            allow_writes,
            next_key: 0,
            dataflows: BTreeMap::new(),
            collections: BTreeMap::new(),
            peeks: HashMap::new(),
            storage_peeks: HashMap::new(),
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

    /// Encodes `response` and queues it on the active connection (if any).
    ///
    /// **A response that does not fit a frame** is never skipped:
    /// - a peek's rows become `PeekResponse::ResultTooLarge` (with the encoded size and the frame limit);
    /// - a subscribe batch ends the subscribe: an error batch from the batch's lower with the empty upper,
    ///   the way a subscribe whose dataflow errs ends, so its consumer sees the error at the first time
    ///   range it misses (nothing after it is sent);
    /// - an error message (of a peek, a copy-to or a rejected command) is cut to [`MAX_MESSAGE_BYTES`];
    /// - anything else is an internal error: logged, and the connection is closed, so the controller
    ///   reconnects and rehydrates.
    ///
    /// A connection with more than `max_queued_bytes` not yet written is closed the same way.
    fn send(&mut self, response: ComputeResponse) {
        if self.active.is_none() {
            return;
        }
        let frame = match Frame::encode(&response, self.limits.max_frame_bytes) {
            Ok(frame) => frame,
            Err(FrameError::TooLarge { len, max }) => {
                let name = response.name();
                let Some(substitute) = fit_response(response, len, max) else {
                    let reason = format!("a {name} response of {len} bytes is over the frame limit of {max}");
                    return self.close_unsendable(name, &reason);
                };
                if let ComputeResponse::SubscribeResponse { id, .. } = &substitute {
                    // The error batch ends the subscribe: nothing more is sent for it.
                    let collection = self.collections.get_mut(id);
                    assert!(collection.is_some(), "subscribe {id} sends a batch while it exists");
                    if let Some(collection) = collection {
                        collection.sink.done = true;
                    }
                    warn!(%id, size_bytes = len, max_bytes = max, "a subscribe batch is over the frame limit; the subscribe ends");
                }
                match Frame::encode(&substitute, self.limits.max_frame_bytes) {
                    Ok(frame) => frame,
                    Err(error) => return self.close_unsendable(substitute.name(), &error.to_string()),
                }
            }
            Err(error) => return self.close_unsendable(response.name(), &error.to_string()),
        };
        let conn = self.active.as_ref().expect("checked above");
        let queued = conn.out.queued_bytes.fetch_add(frame.len(), Ordering::AcqRel) + frame.len();
        if queued > self.limits.max_queued_bytes {
            warn!(
                conn = conn.id,
                queued,
                max = self.limits.max_queued_bytes,
                "the controller does not read its responses; dropping the connection"
            );
            conn.out.abort();
            self.active = None;
            return;
        }
        let _ = conn.out.tx.send(Outgoing::Frame(frame));
    }

    /// Closes the active connection because a response cannot be sent: an internal error (the controller
    /// reconnects and rehydrates).
    fn close_unsendable(&mut self, response: &str, reason: &str) {
        error!(response, %reason, "a response cannot be sent; dropping the connection");
        if let Some(conn) = self.active.take() {
            conn.out.abort();
        }
    }

    fn close_active(&mut self) {
        if let Some(conn) = self.active.take() {
            conn.out.close();
        }
    }

    fn reject_and_close(&mut self, command: &str, reason: String) {
        warn!(command, %reason, "rejecting command and closing the connection");
        self.send(ComputeResponse::CommandRejected { command: command.to_string(), reason });
        self.close_active();
    }

    fn reject(&mut self, command: &str, reason: String) {
        warn!(command, %reason, "rejecting command");
        self.send(ComputeResponse::CommandRejected { command: command.to_string(), reason });
    }

    async fn handle_event(&mut self, event: CoreEvent) {
        match event {
            CoreEvent::Connected { conn, out } => {
                assert!(!self.panic_on_connect, "injected fault: the I/O thread panics on connect");
                if let Some(old) = self.active.take() {
                    info!(old = old.id, new = conn, "controller connection replaced");
                    old.out.close();
                }
                // Peeks of the previous connection are forgotten (the controller re-sends what it wants).
                for (uuid, _) in self.peeks.drain() {
                    for worker in &self.workers {
                        let _ = worker.send(ToWorker::CancelPeek { uuid });
                    }
                }
                for (_, task) in self.storage_peeks.drain() {
                    task.abort();
                }
                for collection in self.collections.values_mut() {
                    collection.reported = None;
                    collection.hydration_reported = false;
                }
                self.active =
                    Some(Connection { id: conn, out, stage: Stage::AwaitCreateInstance, replay: Vec::new() });
            }
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
            CoreEvent::StoragePeek { uuid, response } => {
                if self.storage_peeks.remove(&uuid).is_some() {
                    self.send(ComputeResponse::PeekResponse { uuid, response });
                }
            }
            CoreEvent::Shutdown => unreachable!("handled by run"),
        }
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

    /// Applies the replayed history: keeps identical dataflows, drops the rest, builds what is new.
    async fn reconcile(&mut self, replay: Vec<ComputeCommand>) {
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
        let mut kept_exports: BTreeSet<GlobalId> = BTreeSet::new();
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
                kept_exports.extend(dataflow.desc.export_ids());
            }
        }
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
            ComputeCommand::AllowCompaction { id, frontier } => {
                if !self.collections.contains_key(&id) {
                    debug!(%id, "AllowCompaction of an unknown or dropped collection ignored");
                    return;
                }
                if frontier.is_empty() {
                    self.drop_export(id, true);
                    let key = self
                        .dataflows
                        .iter()
                        .find(|(_, d)| d.desc.export_ids().any(|e| e == id))
                        .map(|(k, _)| *k);
                    if let Some(key) = key {
                        self.maybe_drop_dataflow(key);
                    }
                } else {
                    let collection = self.collections.get_mut(&id).expect("checked above");
                    if PartialOrder::less_equal(&collection.since, &frontier) {
                        collection.since = frontier.clone();
                    }
                    if matches!(collection.kind, ExportKind::Index) {
                        self.broadcast(|| ToWorker::AllowCompaction { id, frontier: frontier.clone() });
                    }
                }
            }
            ComputeCommand::Peek(peek) => self.peek(peek),
            ComputeCommand::CancelPeek { uuid } => {
                if self.peeks.remove(&uuid).is_some() {
                    self.broadcast(|| ToWorker::CancelPeek { uuid });
                    self.send(ComputeResponse::PeekResponse { uuid, response: PeekResponse::Canceled });
                } else if let Some(task) = self.storage_peeks.remove(&uuid) {
                    task.abort();
                    self.send(ComputeResponse::PeekResponse { uuid, response: PeekResponse::Canceled });
                }
            }
            ComputeCommand::AllowWrites => {
                // `send_replace`, not `send`: with no materialized view listening yet (a replay sends
                // AllowWrites before every CreateDataflow), `send` would drop the value.
                self.allow_writes.send_replace(true);
                let ready: Vec<GlobalId> = self
                    .collections
                    .iter()
                    .filter(|(_, c)| c.sink.ready && !c.sink.done)
                    .map(|(id, _)| *id)
                    .collect();
                for id in ready {
                    self.write_copy_to(id);
                }
            }
        }
    }

    async fn create_dataflow(&mut self, desc: DataflowDescription<Time>) -> Result<(), String> {
        desc.validate().map_err(|e| e.to_string())?;
        let as_of = *desc.as_of.as_ref().and_then(|a| a.as_option()).expect("validated: non-empty as_of");
        for id in desc.export_ids() {
            if self.collections.contains_key(&id) {
                return Err(format!("export {id} already exists"));
            }
        }
        let mut imports_from = BTreeSet::new();
        for id in desc.index_imports.keys() {
            let Some(collection) = self.collections.get(id) else {
                return Err(format!("index import {id} is unknown"));
            };
            if !matches!(collection.kind, ExportKind::Index) {
                return Err(format!("import {id} is not an index"));
            }
            if !collection.since.less_equal(&as_of) {
                return Err(format!(
                    "index import {id} is compacted to {:?}, beyond the as-of {as_of}",
                    collection.since.elements()
                ));
            }
            imports_from.insert(collection.dataflow);
        }
        // Storage imports and materialized-view targets must exist, and imports be readable at the as-of.
        for id in desc.source_imports.keys() {
            let frontiers = self
                .storage
                .frontiers(*id)
                .await
                .map_err(|e| format!("storage import {id} is unavailable: {e}"))?;
            if !frontiers.since.less_equal(&as_of) {
                return Err(format!(
                    "storage import {id} is compacted to {:?}, beyond the as-of {as_of}",
                    frontiers.since.elements()
                ));
            }
        }
        for sink in desc.sink_exports.values() {
            if let SinkConnection::MaterializedView { target } = &sink.connection {
                self.storage
                    .frontiers(*target)
                    .await
                    .map_err(|e| format!("materialized view target {target} is unavailable: {e}"))?;
            }
        }
        let key = self.next_key;
        self.next_key += 1;
        let desc = Arc::new(desc);
        for exporter in &imports_from {
            self.dataflows.get_mut(exporter).expect("exporter of a live index exists").importers += 1;
        }
        let local_workers = self.topology.workers;
        let mut tasks = Vec::new();
        for (id, index) in &desc.index_exports {
            let _ = index;
            self.collections.insert(*id, CoreCollection::new(key, ExportKind::Index, as_of, local_workers));
        }
        for (id, sink) in &desc.sink_exports {
            let kind = match &sink.connection {
                SinkConnection::Subscribe { .. } => ExportKind::Subscribe,
                SinkConnection::CopyTo { directory } => ExportKind::CopyTo { directory: directory.clone() },
                SinkConnection::MaterializedView { target } => {
                    // Every update is funnelled to global worker 0, so its process appends for the replica.
                    let appender = if self.topology.local(0).is_some() {
                        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                        let report = FailureReport { events: self.events.clone(), key, id: *id };
                        let appending = append_materialized_view(
                            Arc::clone(&self.storage),
                            *target,
                            as_of,
                            rx,
                            self.allow_writes.subscribe(),
                            report,
                        );
                        let span = tracing::info_span!("appender", collection = %id, target = %target);
                        tasks.push(tokio::spawn(appending.instrument(span)));
                        Some(tx)
                    } else {
                        None
                    };
                    ExportKind::MaterializedView { appender }
                }
            };
            self.collections.insert(*id, CoreCollection::new(key, kind, as_of, local_workers));
        }
        self.dataflows.insert(
            key,
            CoreDataflow {
                desc: Arc::clone(&desc),
                as_of,
                exports: desc.export_ids().collect(),
                imports_from,
                importers: 0,
                scheduled: false,
                tasks,
                failed: None,
            },
        );
        self.built.fetch_add(1, Ordering::Relaxed);
        let exports: Vec<String> = desc.export_ids().map(|id| id.to_string()).collect();
        info!(key, name = %desc.debug_name, as_of, ?exports, "creating dataflow");
        self.broadcast(|| ToWorker::Build { key, desc: Arc::clone(&desc) });
        Ok(())
    }

    /// A storage import of dataflow `key` failed: the dataflow can make no more progress, so whoever waits
    /// on it gets the error instead of waiting forever: its indexes' pending and later peeks, its
    /// subscribes (an error batch that ends them) and copy-tos; its indexes and materialized views (which
    /// stop appending) are reported failed (`StatusResponse::Failed`). While a new connection replays,
    /// nothing is sent: reconciliation rebuilds the dataflow.
    fn import_failed(&mut self, key: DataflowKey, import: GlobalId, error: String) {
        let Some(dataflow) = self.dataflows.get_mut(&key) else { return };
        if dataflow.failed.is_some() {
            return;
        }
        warn!(key, %import, %error, name = %dataflow.desc.debug_name, "a storage import failed; the dataflow stops");
        let message = format!("dataflow {} stopped: {error}", dataflow.desc.debug_name);
        dataflow.failed = Some(message.clone());
        for task in dataflow.tasks.drain(..) {
            task.abort();
        }
        let exports: Vec<GlobalId> = dataflow.exports.iter().copied().collect();
        let pending: Vec<PeekId> = self
            .peeks
            .iter()
            .filter(|(_, p)| matches!(p.peek.target, PeekTarget::Index { id } if exports.contains(&id)))
            .map(|(uuid, _)| *uuid)
            .collect();
        for uuid in pending {
            self.peeks.remove(&uuid);
            self.broadcast(|| ToWorker::CancelPeek { uuid });
            self.send(ComputeResponse::PeekResponse { uuid, response: PeekResponse::Error(message.clone()) });
        }
        let normal = self.active.as_ref().is_some_and(|c| c.stage == Stage::Normal);
        for id in exports {
            let Some(collection) = self.collections.get_mut(&id) else { continue };
            if collection.sink.done || collection.failed {
                continue;
            }
            let response = match &collection.kind {
                ExportKind::Subscribe => {
                    let lower = collection.sink.lower.clone();
                    let batch =
                        SubscribeBatch { lower, upper: Antichain::new(), updates: Err(message.clone()) };
                    ComputeResponse::SubscribeResponse { id, response: SubscribeResponse::Batch(batch) }
                }
                ExportKind::CopyTo { .. } => {
                    ComputeResponse::CopyToResponse { id, response: CopyToResponse::Error(message.clone()) }
                }
                ExportKind::Index | ExportKind::MaterializedView { .. } => {
                    ComputeResponse::Status(StatusResponse::Failed { id, error: message.clone() })
                }
            };
            collection.sink.done = true;
            collection.failed = true;
            if normal {
                self.send(response);
            }
        }
    }

    /// Export `id` of dataflow `key` can make no more progress (its materialized view's appender stopped
    /// for good): the controller hears why, once (`StatusResponse::Failed`), and the next reconnect
    /// rebuilds the dataflow. A report of a dataflow since dropped (and maybe rebuilt under the same
    /// id) is ignored; while a new connection replays, the failure is only recorded (reconciliation
    /// rebuilds the dataflow).
    fn export_failed(&mut self, key: DataflowKey, id: GlobalId, error: String) {
        let normal = self.active.as_ref().is_some_and(|c| c.stage == Stage::Normal);
        let Some(collection) = self.collections.get_mut(&id) else { return };
        if collection.dataflow != key || collection.failed {
            return;
        }
        collection.failed = true;
        warn!(%id, key, %error, "an export can make no more progress");
        if normal {
            self.send(ComputeResponse::Status(StatusResponse::Failed { id, error }));
        }
    }

    fn schedule(&mut self, key: DataflowKey) {
        let Some(dataflow) = self.dataflows.get_mut(&key) else { return };
        if dataflow.scheduled {
            return;
        }
        dataflow.scheduled = true;
        for import in dataflow.desc.source_imports.keys() {
            let task = tokio::spawn(
                feed_source(
                    Arc::clone(&self.storage),
                    *import,
                    dataflow.as_of,
                    FeedTarget {
                        events: self.events.clone(),
                        key,
                        workers: self.workers.clone(),
                        topology: self.topology,
                    },
                    self.metrics.storage_read_lag(*import),
                )
                .instrument(tracing::info_span!("feed", collection = %import, dataflow = key)),
            );
            dataflow.tasks.push(task);
        }
        self.broadcast(|| ToWorker::Schedule { key });
    }

    /// Drops one export: workers release it, outstanding sink output ends.
    fn drop_export(&mut self, id: GlobalId, report: bool) {
        let Some(collection) = self.collections.remove(&id) else { return };
        if let Some(dataflow) = self.dataflows.get_mut(&collection.dataflow) {
            dataflow.exports.remove(&id);
        }
        self.broadcast(|| ToWorker::DropExport { id });
        if !report {
            return;
        }
        match &collection.kind {
            ExportKind::Subscribe if !collection.sink.done => {
                self.send(ComputeResponse::SubscribeResponse {
                    id,
                    response: SubscribeResponse::DroppedAt(collection.sink.lower.clone()),
                });
            }
            ExportKind::CopyTo { .. } if !collection.sink.done => {
                self.send(ComputeResponse::CopyToResponse { id, response: CopyToResponse::Dropped });
            }
            _ => {}
        }
        let already_closed = collection.reported.as_ref().is_some_and(|(w, _)| w.is_empty());
        if !already_closed {
            self.send(ComputeResponse::Frontiers {
                id,
                frontiers: FrontiersResponse {
                    write_frontier: Some(Antichain::new()),
                    input_frontier: Some(Antichain::new()),
                    output_frontier: Some(Antichain::new()),
                },
            });
        }
        // Peeks pending on a dropped index are answered by the workers with an error.
    }

    /// Drops a dataflow whose exports are all gone and that nothing imports from, then its exporters if
    /// they became droppable.
    fn maybe_drop_dataflow(&mut self, key: DataflowKey) {
        let Some(dataflow) = self.dataflows.get(&key) else { return };
        if !dataflow.exports.is_empty() || dataflow.importers > 0 {
            return;
        }
        let dataflow = self.dataflows.remove(&key).expect("checked above");
        for task in &dataflow.tasks {
            task.abort();
        }
        let exports: Vec<String> = dataflow.desc.export_ids().map(|id| id.to_string()).collect();
        info!(key, name = %dataflow.desc.debug_name, ?exports, "dropping dataflow");
        self.broadcast(|| ToWorker::DropDataflow { key });
        for exporter in dataflow.imports_from {
            if let Some(exporter_dataflow) = self.dataflows.get_mut(&exporter) {
                assert!(exporter_dataflow.importers > 0, "importer counts match imports");
                exporter_dataflow.importers -= 1;
            }
            self.maybe_drop_dataflow(exporter);
        }
    }

    fn peek(&mut self, peek: Peek) {
        let uuid = peek.uuid;
        if self.peeks.contains_key(&uuid) || self.storage_peeks.contains_key(&uuid) {
            self.reject("Peek", format!("peek {uuid} is already pending"));
            return;
        }
        match peek.target {
            PeekTarget::Storage { id } => {
                // A key lookup needs an index's key: a storage collection has none. Every process says so.
                if peek.literal_constraints.is_some() {
                    let reason = "literal constraints apply to index peeks only";
                    let response = PeekResponse::Error(format!("storage peek of {id}: {reason}"));
                    self.send(ComputeResponse::PeekResponse { uuid, response });
                    return;
                }
                // The whole snapshot is this replica's answer: only process 0 reads it.
                if self.topology.process != 0 {
                    self.send(ComputeResponse::PeekResponse {
                        uuid,
                        response: PeekResponse::Rows(Vec::new()),
                    });
                    return;
                }
                let storage = Arc::clone(&self.storage);
                let events = self.events.clone();
                let max = self.parameters.max_result_size_bytes;
                let task = tokio::spawn(async move {
                    let response = match storage.snapshot(id, peek.timestamp).await {
                        Ok(rows) => {
                            let mut out = Vec::new();
                            let mut error = None;
                            for (row, diff) in rows {
                                match peek.map_filter_project.apply(&row) {
                                    Ok(Some(row)) => out.push((row, diff)),
                                    Ok(None) => {}
                                    Err(e) => {
                                        error = Some(format!("peek map/filter/project: {e}"));
                                        break;
                                    }
                                }
                            }
                            match error {
                                Some(error) => PeekResponse::Error(error),
                                None => finish_rows(out, &peek.finishing, max),
                            }
                        }
                        Err(e) => PeekResponse::Error(format!("storage peek of {id}: {e}")),
                    };
                    let _ = events.send(CoreEvent::StoragePeek { uuid, response });
                });
                self.storage_peeks.insert(uuid, task);
            }
            PeekTarget::Index { id } => {
                let Some(collection) = self.collections.get(&id) else {
                    let response = PeekResponse::Error(format!("unknown index {id}"));
                    self.send(ComputeResponse::PeekResponse { uuid, response });
                    return;
                };
                if !matches!(collection.kind, ExportKind::Index) {
                    let response = PeekResponse::Error(format!("{id} is not an index"));
                    self.send(ComputeResponse::PeekResponse { uuid, response });
                    return;
                }
                if let Some(failed) = self.dataflows.get(&collection.dataflow).and_then(|d| d.failed.clone())
                {
                    self.send(ComputeResponse::PeekResponse { uuid, response: PeekResponse::Error(failed) });
                    return;
                }
                if !collection.since.less_equal(&peek.timestamp) {
                    let response = PeekResponse::Error(format!(
                        "peek of {id} at {} is before its since {:?}",
                        peek.timestamp,
                        collection.since.elements()
                    ));
                    self.send(ComputeResponse::PeekResponse { uuid, response });
                    return;
                }
                let mut routed: BTreeMap<usize, Option<Vec<Row>>> = BTreeMap::new();
                match &peek.literal_constraints {
                    None => {
                        for local in 0..self.topology.workers {
                            routed.insert(local, None);
                        }
                    }
                    Some(keys) => {
                        for key in keys {
                            let owner = key_owner(key, self.topology.peers);
                            if let Some(local) = self.topology.local(owner) {
                                routed
                                    .entry(local)
                                    .or_insert_with(|| Some(Vec::new()))
                                    .get_or_insert_default()
                                    .push(key.clone());
                            }
                        }
                        if routed.is_empty() {
                            // No local owner: one worker still checks errors and waits for the time.
                            routed.insert(0, Some(Vec::new()));
                        }
                    }
                }
                let max_result_size_bytes = self.parameters.max_result_size_bytes;
                let seq = self.next_peek_seq;
                self.next_peek_seq += 1;
                for (local, keys) in &routed {
                    let message = ToWorker::Peek(WorkerPeek {
                        uuid,
                        seq,
                        id,
                        timestamp: peek.timestamp,
                        keys: keys.clone(),
                        mfp: peek.map_filter_project.clone(),
                        finishing: peek.finishing.clone(),
                        max_result_size_bytes,
                    });
                    let _ = self.workers[*local].send(message);
                }
                self.peeks.insert(
                    uuid,
                    CorePeek {
                        seq,
                        waiting: routed.keys().copied().collect(),
                        parts: Vec::new(),
                        peek,
                        max_result_size_bytes,
                    },
                );
            }
        }
    }

    fn handle_report(&mut self, report: FromWorker) {
        match report {
            FromWorker::Peek { worker, uuid, seq, response } => {
                let Some(pending) = self.peeks.get_mut(&uuid) else { return };
                // An answer to an earlier routing of the same uuid (cancelled by a reconnect) is stale.
                if pending.seq != seq || !pending.waiting.remove(&worker) {
                    return;
                }
                pending.parts.push(response);
                if pending.waiting.is_empty() {
                    let pending = self.peeks.remove(&uuid).expect("present");
                    let response = match PeekResponse::union(pending.parts) {
                        PeekResponse::Rows(rows) => {
                            let rows =
                                rows.into_iter().map(|(row, count)| (row, count.get() as Diff)).collect();
                            finish_rows(rows, &pending.peek.finishing, pending.max_result_size_bytes)
                        }
                        other => other,
                    };
                    self.send(ComputeResponse::PeekResponse { uuid, response });
                }
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

    /// Reports every collection's frontiers afresh (after a reconnect).
    fn report_all(&mut self) {
        let ids: Vec<GlobalId> = self.collections.keys().copied().collect();
        for id in ids {
            self.report_frontiers(id);
        }
    }

    fn report_frontiers(&mut self, id: GlobalId) {
        let Some(collection) = self.collections.get_mut(&id) else { return };
        let Some(normal) = self.active.as_ref().map(|c| c.stage == Stage::Normal) else { return };
        if !normal || collection.worker_frontiers.iter().any(Option::is_none) {
            return;
        }
        let write = frontiers::antichain::meet_all(
            collection.worker_frontiers.iter().map(|f| f.as_ref().expect("checked").0.borrow()),
        );
        let input = frontiers::antichain::meet_all(
            collection.worker_frontiers.iter().map(|f| f.as_ref().expect("checked").1.borrow()),
        );
        let mut response = FrontiersResponse::default();
        match &collection.reported {
            Some((old_write, old_input)) => {
                if *old_write != write {
                    assert!(PartialOrder::less_equal(old_write, &write), "write frontier of {id} regressed");
                    response.write_frontier = Some(write.clone());
                    response.output_frontier = Some(write.clone());
                }
                if *old_input != input && PartialOrder::less_equal(old_input, &input) {
                    response.input_frontier = Some(input.clone());
                }
            }
            None => {
                response.write_frontier = Some(write.clone());
                response.output_frontier = Some(write.clone());
                response.input_frontier = Some(input.clone());
            }
        }
        let hydrated_now = !write.less_equal(&collection.as_of);
        let mut status = None;
        if hydrated_now {
            collection.hydrated = true;
        }
        if collection.hydrated && !collection.hydration_reported {
            collection.hydration_reported = true;
            status = Some(ComputeResponse::Status(StatusResponse::Hydration { id, hydrated: true }));
        }
        if !response.is_empty() {
            let input = response
                .input_frontier
                .clone()
                .unwrap_or_else(|| collection.reported.as_ref().map(|(_, i)| i.clone()).unwrap_or_default());
            collection.reported = Some((write, input));
            self.send(ComputeResponse::Frontiers { id, frontiers: response });
        }
        if let Some(status) = status {
            self.send(status);
        }
    }

    fn merge_sink(
        &mut self,
        worker: usize,
        id: GlobalId,
        updates: Vec<(Row, Time, Diff)>,
        errors: Vec<(Row, Time, Diff)>,
        frontier: Antichain<Time>,
    ) {
        let process = self.topology.process;
        let normal = self.active.as_ref().is_some_and(|c| c.stage == Stage::Normal);
        let Some(collection) = self.collections.get_mut(&id) else { return };
        let sink = &mut collection.sink;
        if sink.done {
            return;
        }
        if !normal && matches!(collection.kind, ExportKind::Subscribe | ExportKind::CopyTo { .. }) {
            // Its connection is gone (none is active, or a new one is replaying its history): its
            // output has no consumer any more, and reconciliation rebuilds it from the replay.
            debug!(%id, "the connection of a subscribe or copy-to is gone; it stops");
            sink.done = true;
            return;
        }
        if matches!(collection.kind, ExportKind::CopyTo { .. }) {
            sink.per_worker[worker].extend(updates);
        } else {
            sink.updates.extend(updates);
        }
        sink.errors.extend(errors);
        sink.worker_frontiers[worker] = frontier;
        let meet = frontiers::antichain::meet_all(sink.worker_frontiers.iter().map(|f| f.borrow()));
        if !PartialOrder::less_than(&sink.lower, &meet) {
            return;
        }
        let lower = std::mem::replace(&mut sink.lower, meet.clone());
        let upper = meet;
        let (mut batch, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut sink.updates).into_iter().partition(|(_, t, _)| !upper.less_equal(t));
        sink.updates = rest;
        let (mut batch_errors, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut sink.errors).into_iter().partition(|(_, t, _)| !upper.less_equal(t));
        sink.errors = rest;
        differential_dataflow::consolidation::consolidate_updates(&mut batch);
        differential_dataflow::consolidation::consolidate_updates(&mut batch_errors);
        match &collection.kind {
            ExportKind::Index => {}
            ExportKind::Subscribe => {
                let response = if let Some((error, _, _)) = batch_errors.first() {
                    sink.done = true;
                    SubscribeBatch { lower, upper: Antichain::new(), updates: Err(error_message(error)) }
                } else {
                    if upper.is_empty() {
                        sink.done = true;
                    }
                    let mut updates: Vec<(Time, Row, Diff)> =
                        batch.into_iter().map(|(r, t, d)| (t, r, d)).collect();
                    updates.sort();
                    SubscribeBatch { lower, upper, updates: Ok(updates) }
                };
                self.send(ComputeResponse::SubscribeResponse {
                    id,
                    response: SubscribeResponse::Batch(response),
                });
            }
            ExportKind::MaterializedView { appender } => {
                if let Some(appender) = appender {
                    // Fails only once the appender stopped, and it reported why (`export_failed`).
                    let _ = appender.send(MvBatch {
                        lower,
                        upper,
                        updates: batch,
                        error: batch_errors.first().map(|(error, _, _)| error_message(error)),
                    });
                } else {
                    debug_assert!(
                        process != 0 || batch.is_empty(),
                        "materialized views are appended by process 0"
                    );
                }
            }
            ExportKind::CopyTo { .. } => {
                if !upper.less_equal(&collection.as_of) {
                    sink.ready = true;
                    if !batch_errors.is_empty() {
                        sink.done = true;
                        let message = error_message(&batch_errors[0].0);
                        self.send(ComputeResponse::CopyToResponse {
                            id,
                            response: CopyToResponse::Error(message),
                        });
                    } else if *self.allow_writes.borrow() {
                        self.write_copy_to(id);
                    }
                }
            }
        }
    }

    /// Writes a finished copy-to's files (one per local worker) and answers with the row count.
    fn write_copy_to(&mut self, id: GlobalId) {
        let process = self.topology.process;
        let Some(collection) = self.collections.get_mut(&id) else { return };
        let ExportKind::CopyTo { directory } = &collection.kind else { return };
        let sink = &mut collection.sink;
        sink.done = true;
        let response = match write_csv_files(directory, process, &mut sink.per_worker) {
            Ok(count) => CopyToResponse::RowCount(count),
            Err(e) => CopyToResponse::Error(e),
        };
        self.send(ComputeResponse::CopyToResponse { id, response });
    }
}

/// The stand-in for a response of `len` bytes over the frame limit `max`, if it has one (see
/// [`Core::send`]): a peek's rows become `ResultTooLarge`; a subscribe batch becomes the error batch that
/// ends the subscribe (the caller marks the subscribe done); error messages are cut to
/// [`MAX_MESSAGE_BYTES`] (or half the frame, if less). Anything else has none.
fn fit_response(response: ComputeResponse, len: usize, max: usize) -> Option<ComputeResponse> {
    let limit = MAX_MESSAGE_BYTES.min(max / 2);
    let cut = |message: String| {
        if message.len() <= limit {
            return message;
        }
        let note = format!(" [cut from {} bytes]", message.len());
        let mut end = limit.saturating_sub(note.len());
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let mut cut = message;
        cut.truncate(end);
        cut + &note
    };
    let substitute = match response {
        ComputeResponse::PeekResponse { uuid, response: PeekResponse::Error(message) } => {
            ComputeResponse::PeekResponse { uuid, response: PeekResponse::Error(cut(message)) }
        }
        ComputeResponse::PeekResponse { uuid, response: PeekResponse::Rows(_) } => {
            let response = PeekResponse::ResultTooLarge { size_bytes: len as u64, max_bytes: max as u64 };
            ComputeResponse::PeekResponse { uuid, response }
        }
        ComputeResponse::SubscribeResponse { id, response: SubscribeResponse::Batch(batch) } => {
            let updates = Err(format!(
                "the subscribe's changes in [{:?}, {:?}) are {len} bytes, over the frame limit of {max} bytes: \
                 the subscribe ends here",
                batch.lower.elements(),
                batch.upper.elements()
            ));
            let batch = SubscribeBatch { lower: batch.lower, upper: Antichain::new(), updates };
            ComputeResponse::SubscribeResponse { id, response: SubscribeResponse::Batch(batch) }
        }
        ComputeResponse::CopyToResponse { id, response: CopyToResponse::Error(message) } => {
            ComputeResponse::CopyToResponse { id, response: CopyToResponse::Error(cut(message)) }
        }
        ComputeResponse::CommandRejected { command, reason } => {
            ComputeResponse::CommandRejected { command: cut(command), reason: cut(reason) }
        }
        _ => return None,
    };
    Some(substitute)
}

impl CoreCollection {
    fn new(dataflow: DataflowKey, kind: ExportKind, as_of: Time, workers: usize) -> Self {
        CoreCollection {
            dataflow,
            kind,
            as_of,
            since: Antichain::from_elem(as_of),
            worker_frontiers: vec![None; workers],
            reported: None,
            hydrated: false,
            hydration_reported: false,
            failed: false,
            sink: SinkMerge {
                worker_frontiers: vec![Antichain::from_elem(0); workers],
                per_worker: vec![Vec::new(); workers],
                lower: Antichain::from_elem(as_of),
                ..SinkMerge::default()
            },
        }
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

/// Writes one CSV file per local worker; returns the number of rows written (with multiplicity).
fn write_csv_files(
    directory: &str,
    process: usize,
    per_worker: &mut [Vec<(Row, Time, Diff)>],
) -> Result<u64, String> {
    std::fs::create_dir_all(directory).map_err(|e| format!("creating {directory}: {e}"))?;
    let mut total = 0u64;
    for (worker, rows) in per_worker.iter_mut().enumerate() {
        let mut updates: Vec<(Row, Diff)> =
            std::mem::take(rows).into_iter().map(|(r, _, d)| (r, d)).collect();
        differential_dataflow::consolidation::consolidate(&mut updates);
        let mut text = String::new();
        for (row, diff) in &updates {
            if *diff < 0 {
                return Err(format!("row {row} has negative multiplicity {diff}"));
            }
            let line = csv_line(row);
            for _ in 0..*diff {
                text.push_str(&line);
                total += 1;
            }
        }
        let path = std::path::Path::new(directory).join(format!("part-{process}-{worker}.csv"));
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(total)
}

/// One CSV line (with newline) for a row: `NULL` is an empty field; fields with commas, quotes or line
/// breaks are quoted.
pub(crate) fn csv_line(row: &Row) -> String {
    let mut line = String::new();
    for (i, datum) in row.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        if datum == Datum::Null {
            continue;
        }
        let mut field = String::new();
        let _ = write!(field, "{datum}");
        if field.contains([',', '"', '\n', '\r']) || field.is_empty() {
            line.push('"');
            line.push_str(&field.replace('"', "\"\""));
            line.push('"');
        } else {
            line.push_str(&field);
        }
    }
    line.push('\n');
    line
}

/// How many updates one storage feed may have sent to its workers and not yet seen ingested before it
/// reads on (about 4 MiB of small rows; a listen event adds at most about 1 MiB more).
const FEED_UPDATES_IN_FLIGHT: usize = 1 << 16;

/// Where a storage feed sends what it reads: the dataflow's local workers, and the core if it fails.
struct FeedTarget {
    events: UnboundedSender<CoreEvent>,
    key: DataflowKey,
    workers: Vec<WorkerTx>,
    topology: Topology,
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
                for (local, updates) in parts.into_iter().enumerate() {
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

/// The first delay before a materialized view's appender retries a transient storage failure; it
/// doubles with each failure in a row, up to [`APPEND_RETRY_MAX_MS`].
const APPEND_RETRY_INITIAL_MS: u64 = 50;
/// The longest delay between two attempts of a materialized view's appender.
const APPEND_RETRY_MAX_MS: u64 = 5_000;

/// Where a task tells the core that an export can make no more progress.
#[derive(Debug)]
struct FailureReport {
    events: UnboundedSender<CoreEvent>,
    key: DataflowKey,
    id: GlobalId,
}

/// Appends a materialized view's batches to storage with compare-and-append, once writes are allowed,
/// until its dataflow goes.
///
/// A failure that retrying cannot cure stops it and is reported to the core (`CoreEvent::ExportFailed`,
/// which the controller hears as `StatusResponse::Failed`): the target was dropped, storage refused the
/// append (a row that does not match the target, a request over its frame limit), a multiplicity left
/// `i64`, the view's data has an error, the target cannot be read. A transient one (storage unreachable,
/// its log not writable) is retried with a bounded backoff ([`RetryBackoff`]), logged.
async fn append_materialized_view(
    storage: Arc<dyn StorageCollections>,
    target: GlobalId,
    as_of: Time,
    batches: UnboundedReceiver<MvBatch>,
    allow_writes: watch::Receiver<bool>,
    report: FailureReport,
) {
    let appender = ViewAppender {
        storage,
        target,
        as_of,
        upper: Antichain::from_elem(0),
        pending: Vec::new(),
        pending_upper: Antichain::from_elem(as_of),
        reconciled: false,
        retry: RetryBackoff::default(),
    };
    if let Err(error) = appender.run(batches, allow_writes).await {
        warn!(%target, id = %report.id, %error, "the materialized view stops appending");
        // Fails only once the core is gone, and with it whoever would hear of it.
        let _ = report.events.send(CoreEvent::ExportFailed { key: report.key, id: report.id, error });
    }
}

/// The state of one materialized view's appender (see [`append_materialized_view`]).
struct ViewAppender {
    storage: Arc<dyn StorageCollections>,
    target: GlobalId,
    as_of: Time,
    /// The target's upper as last seen: where the next append starts.
    upper: Antichain<Time>,
    /// Updates received and not yet written, and the upper they complete.
    pending: Vec<(Row, Time, Diff)>,
    pending_upper: Antichain<Time>,
    /// Whether what the target held before the view's as-of has been taken into account.
    reconciled: bool,
    retry: RetryBackoff,
}

impl ViewAppender {
    /// Appends until the batches end (`Ok`) or a failure retrying cannot cure (`Err`, why).
    async fn run(
        mut self,
        mut batches: UnboundedReceiver<MvBatch>,
        mut allow_writes: watch::Receiver<bool>,
    ) -> Result<(), String> {
        if allow_writes.wait_for(|allowed| *allowed).await.is_err() {
            return Ok(()); // The core is gone.
        }
        self.upper = self.read_upper().await?;
        while let Some(batch) = batches.recv().await {
            let mut batch = Some(batch);
            while let Some(next) = batch.take().or_else(|| batches.try_recv().ok()) {
                if let Some(error) = next.error {
                    return Err(format!("the view's data has an error: {error}"));
                }
                debug_assert!(PartialOrder::less_equal(&next.lower, &self.pending_upper) || !self.reconciled);
                self.pending.extend(next.updates);
                self.pending_upper = next.upper;
            }
            self.write_pending().await?;
        }
        Ok(())
    }

    /// The target's upper, retrying while storage is unreachable.
    async fn read_upper(&mut self) -> Result<Antichain<Time>, String> {
        loop {
            match self.storage.frontiers(self.target).await {
                Ok(frontiers) => {
                    self.retry.reset();
                    return Ok(frontiers.upper);
                }
                Err(error @ ReadError::Disconnected) => {
                    self.retry.wait(self.target, "reading the target's upper", &error).await
                }
                Err(ReadError::CollectionMissing(_) | ReadError::CollectionDropped(_)) => {
                    return Err(format!("its target {} was dropped", self.target));
                }
                Err(error) => {
                    return Err(format!("cannot read the upper of its target {}: {error}", self.target));
                }
            }
        }
    }

    /// Writes what is pending up to `pending_upper`, or finds it written by another replica.
    async fn write_pending(&mut self) -> Result<(), String> {
        loop {
            if !PartialOrder::less_than(&self.upper, &self.pending_upper) {
                // Someone (another replica) already wrote this range: everything pending is there.
                self.pending.clear();
                return Ok(());
            }
            if !self.reconciled {
                self.take_in_existing().await?;
            }
            let lower = self.upper.as_option().copied().unwrap_or(Time::MAX);
            let updates = consolidate_checked(self.pending.iter().filter(|(_, t, _)| *t >= lower).cloned())?;
            let request = AppendRequest {
                id: self.target,
                updates,
                expected_upper: self.upper.clone(),
                new_upper: self.pending_upper.clone(),
            };
            match self.storage.append(vec![request]).await {
                Ok(()) => {
                    self.retry.reset();
                    self.upper = self.pending_upper.clone();
                    self.pending.clear();
                    return Ok(());
                }
                Err(AppendError::UpperMismatch { current, .. }) => {
                    debug!(target = %self.target, ?current, "another writer appended first; skipping ahead");
                    self.upper = current;
                }
                Err(error @ (AppendError::Disconnected | AppendError::Io(_))) => {
                    self.retry.wait(self.target, "appending", &error).await
                }
                Err(AppendError::CollectionMissing(_)) => {
                    // Storage never reuses an id: a dropped target stays dropped.
                    return Err(format!("its target {} was dropped", self.target));
                }
                Err(error) => return Err(format!("storage refused its append: {error}")),
            }
        }
    }

    /// Before the first append: what the target holds below the view's as-of (written before the view
    /// existed) is retracted at the as-of, so from there the target holds exactly the view.
    async fn take_in_existing(&mut self) -> Result<(), String> {
        let Some(current) = self.upper.as_option().copied().filter(|c| *c < self.as_of && *c > 0) else {
            self.reconciled = true;
            return Ok(());
        };
        let existing = loop {
            match self.storage.snapshot(self.target, current - 1).await {
                Ok(existing) => break existing,
                Err(error @ ReadError::Disconnected) => {
                    self.retry.wait(self.target, "reading the target's contents", &error).await
                }
                Err(error) => {
                    return Err(format!("cannot read what its target {} holds: {error}", self.target));
                }
            }
        };
        self.retry.reset();
        for (row, diff) in existing {
            let Some(retraction) = diff.checked_neg() else {
                return Err(format!("its target holds row {row} {diff} times: the retraction leaves i64"));
            };
            self.pending.push((row, self.as_of, retraction));
        }
        self.reconciled = true;
        Ok(())
    }
}

/// `updates` consolidated (one update per row and time, none zero), summed exactly: a multiplicity that
/// leaves `i64` (storage's multiplicities) is an error, never a wrap or a panic.
fn consolidate_checked(
    updates: impl Iterator<Item = (Row, Time, Diff)>,
) -> Result<Vec<(Row, Time, Diff)>, String> {
    let mut updates: Vec<(Row, Time, Diff)> = updates.collect();
    updates.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut sums: Vec<(Row, Time, i128)> = Vec::with_capacity(updates.len());
    for (row, time, diff) in updates {
        match sums.last_mut() {
            // At most 2^64 summands of at most 2^63 each: an `i128` sum is exact.
            Some((last, at, sum)) if *last == row && *at == time => *sum += i128::from(diff),
            _ => sums.push((row, time, i128::from(diff))),
        }
    }
    let mut consolidated = Vec::with_capacity(sums.len());
    for (row, time, sum) in sums {
        match Diff::try_from(sum) {
            Ok(0) => {}
            Ok(diff) => consolidated.push((row, time, diff)),
            Err(_) => return Err(format!("the multiplicity {sum} of row {row} at {time} leaves i64")),
        }
    }
    Ok(consolidated)
}

/// A bounded exponential backoff for transient storage failures: [`APPEND_RETRY_INITIAL_MS`] after the
/// first failure in a row, doubling with each further one, never more than [`APPEND_RETRY_MAX_MS`].
#[derive(Debug, Default)]
struct RetryBackoff {
    /// Failures in a row.
    failures: u32,
}

impl RetryBackoff {
    /// The delay after `failures` failures in a row (at least one).
    fn delay_ms(failures: u32) -> u64 {
        let doublings = failures.saturating_sub(1).min(32);
        APPEND_RETRY_INITIAL_MS.saturating_mul(1 << doublings).min(APPEND_RETRY_MAX_MS)
    }

    /// Logs a transient failure of `operation` and waits before the next attempt.
    async fn wait(
        &mut self,
        target: GlobalId,
        operation: &'static str,
        error: &(dyn std::fmt::Display + Sync),
    ) {
        self.failures = self.failures.saturating_add(1);
        let delay_ms = Self::delay_ms(self.failures);
        warn!(%target, operation, %error, attempt = self.failures, delay_ms, "storage unavailable to a materialized view; retrying");
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
    }

    /// Forgets the failures: the last attempt succeeded.
    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use std::sync::atomic::{AtomicUsize, Ordering};

    use frontiers::{Antichain, ReadPolicy};
    use protocol::{ColumnType, Datum, GlobalId, RelationDesc, Row, ScalarType};
    use storage::{
        AppendError, AppendRequest, BoxFuture, CollectionFrontiers, CreateError, DropError, FrontierWatch,
        HoldError, InProcess, Listen, ReadError, StorageCollections, StorageReadHold, StoreConfig,
    };
    use tokio::sync::{mpsc, watch};

    use super::{
        CoreEvent, FailureReport, MAX_MESSAGE_BYTES, MvBatch, RetryBackoff, append_materialized_view,
        fit_response,
    };

    #[test]
    fn a_response_over_the_frame_limit_gets_its_stand_in_or_none() {
        use std::num::NonZeroU64;

        use protocol::{
            ComputeResponse, CopyToResponse, FrontiersResponse, PeekId, PeekResponse, StatusResponse,
            SubscribeBatch, SubscribeResponse,
        };

        let (len, max) = (1 << 20, 1 << 16);
        let uuid = PeekId(7);
        let id = GlobalId::User(3);
        let long = "é".repeat(200_000);
        let row = Row::pack([Datum::Int64(1)]);
        let rows = PeekResponse::Rows(vec![(row.clone(), NonZeroU64::new(1).expect("one"))]);
        let batch = SubscribeBatch {
            lower: Antichain::from_elem(5),
            upper: Antichain::from_elem(9),
            updates: Ok(vec![(5, row, 1)]),
        };
        let fitted = |response| fit_response(response, len, max);

        let peek = fitted(ComputeResponse::PeekResponse { uuid, response: rows });
        let too_large = PeekResponse::ResultTooLarge { size_bytes: len as u64, max_bytes: max as u64 };
        assert_eq!(peek, Some(ComputeResponse::PeekResponse { uuid, response: too_large }));

        match fitted(ComputeResponse::SubscribeResponse { id, response: SubscribeResponse::Batch(batch) }) {
            Some(ComputeResponse::SubscribeResponse { id: got, response: SubscribeResponse::Batch(b) }) => {
                assert_eq!(got, id);
                assert_eq!(b.lower, Antichain::from_elem(5), "the error starts where the batch started");
                assert!(b.upper.is_empty(), "the error batch ends the subscribe");
                assert!(b.updates.expect_err("an error").contains("over the frame limit"));
            }
            other => panic!("expected an error batch, got {other:?}"),
        }

        let cut_ok = |message: &str| {
            message.len() <= MAX_MESSAGE_BYTES.min(max / 2)
                && message.ends_with(&format!("[cut from {} bytes]", long.len()))
        };
        match fitted(ComputeResponse::PeekResponse { uuid, response: PeekResponse::Error(long.clone()) }) {
            Some(ComputeResponse::PeekResponse { response: PeekResponse::Error(message), .. }) => {
                assert!(cut_ok(&message), "{} bytes", message.len())
            }
            other => panic!("expected a cut error, got {other:?}"),
        }
        match fitted(ComputeResponse::CopyToResponse { id, response: CopyToResponse::Error(long.clone()) }) {
            Some(ComputeResponse::CopyToResponse { response: CopyToResponse::Error(message), .. }) => {
                assert!(cut_ok(&message))
            }
            other => panic!("expected a cut error, got {other:?}"),
        }
        match fitted(ComputeResponse::CommandRejected { command: "Peek".into(), reason: long.clone() }) {
            Some(ComputeResponse::CommandRejected { command, reason }) => {
                assert_eq!(command, "Peek", "a short field is kept whole");
                assert!(cut_ok(&reason));
            }
            other => panic!("expected a cut rejection, got {other:?}"),
        }

        // No stand-in: the connection closes.
        for response in [
            ComputeResponse::Frontiers { id, frontiers: FrontiersResponse::default() },
            ComputeResponse::Status(StatusResponse::Hydration { id, hydrated: true }),
            ComputeResponse::SubscribeResponse {
                id,
                response: SubscribeResponse::DroppedAt(Antichain::new()),
            },
            ComputeResponse::Hello { version: 1, nonce: 1 },
        ] {
            assert_eq!(fitted(response), None);
        }
    }

    /// In-memory storage whose first `unreachable_appends` appends fail with `Disconnected`; it counts
    /// every append.
    #[derive(Debug)]
    struct FlakyStorage {
        inner: InProcess,
        unreachable_appends: AtomicUsize,
        appends: AtomicUsize,
    }

    impl FlakyStorage {
        fn new(unreachable_appends: usize) -> Arc<FlakyStorage> {
            Arc::new(FlakyStorage {
                inner: InProcess::in_memory(StoreConfig::default()),
                unreachable_appends: AtomicUsize::new(unreachable_appends),
                appends: AtomicUsize::new(0),
            })
        }
    }

    impl StorageCollections for FlakyStorage {
        fn create_collection(
            &self,
            id: GlobalId,
            desc: RelationDesc,
        ) -> BoxFuture<'_, Result<(), CreateError>> {
            self.inner.create_collection(id, desc)
        }
        fn drop_collection(&self, id: GlobalId) -> BoxFuture<'_, Result<(), DropError>> {
            self.inner.drop_collection(id)
        }
        fn list_collections(&self) -> BoxFuture<'_, Result<Vec<(GlobalId, RelationDesc)>, ReadError>> {
            self.inner.list_collections()
        }
        fn frontiers(&self, id: GlobalId) -> BoxFuture<'_, Result<CollectionFrontiers, ReadError>> {
            self.inner.frontiers(id)
        }
        fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'_, Result<(), AppendError>> {
            self.appends.fetch_add(1, Ordering::SeqCst);
            let unreachable =
                self.unreachable_appends
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if unreachable.is_ok() {
                return Box::pin(async { Err(AppendError::Disconnected) });
            }
            self.inner.append(requests)
        }
        fn acquire_read_hold(
            &self,
            id: GlobalId,
            frontier: Antichain<u64>,
        ) -> BoxFuture<'_, Result<StorageReadHold, HoldError>> {
            self.inner.acquire_read_hold(id, frontier)
        }
        fn set_read_policy(
            &self,
            id: GlobalId,
            policy: ReadPolicy<u64>,
        ) -> BoxFuture<'_, Result<(), HoldError>> {
            self.inner.set_read_policy(id, policy)
        }
        fn snapshot(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Vec<(Row, i64)>, ReadError>> {
            self.inner.snapshot(id, as_of)
        }
        fn listen(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Listen, ReadError>> {
            self.inner.listen(id, as_of)
        }
        fn watch_frontiers(&self) -> BoxFuture<'_, Result<FrontierWatch, ReadError>> {
            self.inner.watch_frontiers()
        }
    }

    /// A view's appender at as-of 0 into `target` (created with one `int64` column), writes allowed.
    struct Appender {
        batches: mpsc::UnboundedSender<MvBatch>,
        events: mpsc::UnboundedReceiver<CoreEvent>,
        task: tokio::task::JoinHandle<()>,
        target: GlobalId,
        _allow_writes: watch::Sender<bool>,
    }

    const VIEW: GlobalId = GlobalId::User(100);
    const KEY: u64 = 7;

    async fn start_appender(storage: Arc<dyn StorageCollections>, target: GlobalId) -> Appender {
        let desc = RelationDesc::new([("a", ColumnType::new(ScalarType::Int64, false))]);
        storage.create_collection(target, desc).await.expect("create the target");
        let (batches, batches_rx) = mpsc::unbounded_channel();
        let (allow_writes, allow_writes_rx) = watch::channel(true);
        let (events_tx, events) = mpsc::unbounded_channel();
        let report = FailureReport { events: events_tx, key: KEY, id: VIEW };
        let task =
            tokio::spawn(append_materialized_view(storage, target, 0, batches_rx, allow_writes_rx, report));
        Appender { batches, events, task, target, _allow_writes: allow_writes }
    }

    fn batch(lower: u64, upper: u64, updates: &[(Row, u64, i64)]) -> MvBatch {
        MvBatch {
            lower: Antichain::from_elem(lower),
            upper: Antichain::from_elem(upper),
            updates: updates.to_vec(),
            error: None,
        }
    }

    fn int(value: i64) -> Row {
        Row::pack([Datum::Int64(value)])
    }

    /// Waits (up to 10 s) until the target's upper is `upper`.
    async fn wait_upper(storage: &dyn StorageCollections, target: GlobalId, upper: u64) {
        for _ in 0..1_000 {
            if storage.frontiers(target).await.expect("frontiers").upper == Antichain::from_elem(upper) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the upper of {target} never reached {upper}");
    }

    impl Appender {
        /// The failure the appender reported (within 10 s); it has stopped.
        async fn failure(mut self) -> String {
            let event = tokio::time::timeout(std::time::Duration::from_secs(10), self.events.recv())
                .await
                .expect("the appender reports its failure");
            let error = match event {
                Some(CoreEvent::ExportFailed { key, id, error }) => {
                    assert_eq!((key, id), (KEY, VIEW), "the report names the view's dataflow and export");
                    error
                }
                other => panic!("expected ExportFailed, got {other:?}"),
            };
            tokio::time::timeout(std::time::Duration::from_secs(5), self.task)
                .await
                .expect("the appender stops")
                .expect("the appender does not panic");
            error
        }
    }

    #[tokio::test]
    async fn a_materialized_view_whose_target_was_dropped_stops_appending_and_says_so() {
        let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
        let appender =
            start_appender(Arc::clone(&storage) as Arc<dyn StorageCollections>, GlobalId::User(1)).await;
        appender.batches.send(batch(0, 1, &[(int(0), 0, 1)])).expect("the appender runs");
        wait_upper(&*storage, appender.target, 1).await;

        storage.drop_collection(appender.target).await.expect("drop the target");
        let _ = appender.batches.send(batch(1, 2, &[(int(1), 1, 1)]));
        let error = appender.failure().await;
        assert!(error.contains("target u1 was dropped"), "{error}");
    }

    #[tokio::test]
    async fn a_materialized_view_whose_rows_do_not_match_its_target_stops_and_says_why() {
        let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
        let appender =
            start_appender(Arc::clone(&storage) as Arc<dyn StorageCollections>, GlobalId::User(1)).await;
        let text = Row::pack([Datum::Text("not an int64")]);
        appender.batches.send(batch(0, 1, &[(text, 0, 1)])).expect("the appender runs");
        let error = appender.failure().await;
        assert!(error.contains("storage refused its append") && error.contains("schema"), "{error}");
        let upper = storage.frontiers(GlobalId::User(1)).await.expect("frontiers").upper;
        assert_eq!(upper, Antichain::from_elem(0), "nothing was written");
    }

    #[tokio::test]
    async fn a_materialized_view_whose_multiplicity_leaves_i64_stops_and_says_so_but_one_that_returns_writes()
    {
        let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
        let shared = Arc::clone(&storage) as Arc<dyn StorageCollections>;
        // Summed in the order given, MAX + 1 wraps (or panics); the exact sum is MAX.
        let returns = start_appender(Arc::clone(&shared), GlobalId::User(1)).await;
        let updates = [(int(1), 0, i64::MAX), (int(1), 0, 1), (int(1), 0, -1)];
        returns.batches.send(batch(0, 1, &updates)).expect("the appender runs");
        wait_upper(&*storage, returns.target, 1).await;
        let written = storage.snapshot(returns.target, 0).await.expect("snapshot");
        assert_eq!(written, vec![(int(1), i64::MAX)]);

        let leaves = start_appender(shared, GlobalId::User(2)).await;
        leaves
            .batches
            .send(batch(0, 1, &[(int(1), 0, i64::MAX), (int(1), 0, 1)]))
            .expect("the appender runs");
        let error = leaves.failure().await;
        assert!(error.contains("leaves i64"), "{error}");
    }

    #[tokio::test]
    async fn a_materialized_view_with_an_error_in_its_data_stops_and_says_which() {
        let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
        let appender = start_appender(storage as Arc<dyn StorageCollections>, GlobalId::User(1)).await;
        let mut failing = batch(0, 1, &[]);
        failing.error = Some("division by zero".to_string());
        appender.batches.send(failing).expect("the appender runs");
        let error = appender.failure().await;
        assert!(error.contains("division by zero"), "{error}");
    }

    #[tokio::test]
    async fn a_materialized_view_retries_while_storage_is_unreachable_and_then_writes() {
        let storage = FlakyStorage::new(3);
        let mut appender =
            start_appender(Arc::clone(&storage) as Arc<dyn StorageCollections>, GlobalId::User(1)).await;
        appender.batches.send(batch(0, 1, &[(int(1), 0, 1)])).expect("the appender runs");
        wait_upper(&*storage, appender.target, 1).await;
        assert_eq!(storage.appends.load(Ordering::SeqCst), 4, "three refused attempts, then the append");
        assert!(appender.events.try_recv().is_err(), "nothing is reported for a transient failure");
        assert!(!appender.task.is_finished(), "the appender goes on");
    }

    #[test]
    fn the_appenders_retry_delay_doubles_from_50_ms_up_to_5_s() {
        for (failures, delay_ms) in [(1, 50), (2, 100), (3, 200), (7, 3_200), (8, 5_000), (1_000, 5_000)] {
            assert_eq!(RetryBackoff::delay_ms(failures), delay_ms, "after {failures} failures");
        }
    }
}
