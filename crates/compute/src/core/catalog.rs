//! The core's catalog: the dataflows a process runs and the collections they export, from creation to
//! drop, and what the controller hears of them (frontiers, hydration, failure).
//!
//! **What this is.** [`CoreDataflow`] (one per `CreateDataflow`, under a [`DataflowKey`] never reused) and
//! [`CoreCollection`] (one per export: index, subscribe, materialized view or copy-to) and the core's
//! operations on them: create (validate, check imports, register exports, start the views' appenders),
//! schedule (start the storage feeds), allow compaction, drop an export and then its dataflow, and stop
//! a dataflow whose storage import failed or an export that can make no more progress. A collection's
//! frontiers are the meet over the process's workers' reports and are sent only on change, with its
//! hydration once.
//!
//! - **Failed imports.** When a storage import's hold or listen fails, its dataflow stops: its pending and
//!   later peeks, subscribes and copy-tos are answered with the error; its indexes and materialized views
//!   (whose appenders stop) are reported as `StatusResponse::Failed`. A dataflow with a failed import or
//!   export is rebuilt on the next connection, not kept (`reconcile.rs`).
//!
//! **What this is not.** It does not route peeks (`peeks.rs`), merge sink output (`sinks.rs`), read or
//! write storage (`feeds.rs`, `appender.rs`) or decide which dataflows a reconnect keeps
//! (`reconcile.rs`).
//!
//! **Invariants.** Reported frontiers never regress within a connection (asserted before sending). A
//! dataflow is dropped only after every dataflow importing from it was dropped (its `importers` count,
//! asserted to match the imports). An index import is created only at or beyond the index's since.
//!
//! **Tests.** Through the socket, in `tests/it` (`exports.rs` for import chains and drops, `bad_input.rs`
//! for rejected dataflows, `limits.rs` for a failing import, `reconnect.rs` for frontiers after a
//! reconnect).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use frontiers::{Antichain, PartialOrder};
use protocol::{
    ComputeResponse, CopyToResponse, DataflowDescription, FrontiersResponse, GlobalId, SinkConnection,
    StatusResponse, SubscribeBatch, SubscribeResponse,
};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::appender::{FailureReport, MvBatch, spawn_appender};
use super::feeds::{FeedTarget, spawn_feed};
use super::sinks::SinkMerge;
use super::{Core, Stage};
use crate::messages::{DataflowKey, ToWorker};
use crate::render::Time;

/// A dataflow the process runs.
#[derive(Debug)]
pub(super) struct CoreDataflow {
    /// What the controller asked for.
    pub desc: Arc<DataflowDescription<Time>>,
    /// Where it started.
    pub as_of: Time,
    /// Exports not yet dropped.
    pub exports: BTreeSet<GlobalId>,
    /// Dataflows this one imports indexes from.
    pub imports_from: BTreeSet<DataflowKey>,
    /// How many live dataflows import from this one.
    pub importers: usize,
    /// Whether `Schedule` arrived (and its storage feeds started).
    pub scheduled: bool,
    /// Storage listens and appenders.
    pub tasks: Vec<JoinHandle<()>>,
    /// Why the dataflow cannot make progress any more (a storage import failed): its peeks and sinks end
    /// with this error.
    pub failed: Option<String>,
}

/// What an export is.
#[derive(Debug)]
pub(super) enum ExportKind {
    /// An index, peeked and imported by other dataflows.
    Index,
    /// A subscribe, streaming batches to the connection that asked.
    Subscribe,
    /// A materialized view; the process holding global worker 0 has its appender.
    MaterializedView {
        /// Where the view's batches go (`None` in the other processes).
        appender: Option<UnboundedSender<MvBatch>>,
    },
    /// A copy-to, writing CSV files into `directory` once complete and writes are allowed.
    CopyTo {
        /// Where the files go.
        directory: String,
    },
}

/// An export of a dataflow.
#[derive(Debug)]
pub(super) struct CoreCollection {
    /// The dataflow exporting it.
    pub dataflow: DataflowKey,
    /// What it is.
    pub kind: ExportKind,
    /// Its dataflow's as-of.
    pub as_of: Time,
    /// The allowed compaction frontier (initially the as-of).
    pub since: Antichain<Time>,
    /// Per local worker: (write, input) frontiers last reported.
    pub worker_frontiers: Vec<Option<(Antichain<Time>, Antichain<Time>)>>,
    /// Frontiers sent on the active connection: (write, input).
    pub reported: Option<(Antichain<Time>, Antichain<Time>)>,
    /// Its write frontier passed the as-of.
    pub hydrated: bool,
    /// Its hydration was sent on the active connection.
    pub hydration_reported: bool,
    /// It can make no more progress (reported as `StatusResponse::Failed`); the next reconnect rebuilds
    /// its dataflow.
    pub failed: bool,
    /// The merging of its workers' sink output (subscribes, views, copy-tos).
    pub sink: SinkMerge,
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
            sink: SinkMerge::new(as_of, workers),
        }
    }
}

impl Core {
    /// Creates a dataflow and its exports, and tells the workers to build it; `Err` says why the
    /// command is rejected (nothing was created then).
    pub(super) async fn create_dataflow(&mut self, desc: DataflowDescription<Time>) -> Result<(), String> {
        desc.validate().map_err(|e| e.to_string())?;
        let as_of = *desc.as_of.as_ref().and_then(|a| a.as_option()).expect("validated: non-empty as_of");
        let imports_from = self.check_imports(&desc, as_of).await?;
        let key = self.next_key;
        self.next_key += 1;
        let desc = Arc::new(desc);
        for exporter in &imports_from {
            self.dataflows.get_mut(exporter).expect("exporter of a live index exists").importers += 1;
        }
        let tasks = self.register_exports(key, &desc, as_of);
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

    /// Checks that `desc`'s exports are new, its index imports are live indexes readable at `as_of`, its
    /// storage imports exist and are readable at `as_of`, and its materialized views' targets exist.
    /// Returns the dataflows it imports indexes from.
    async fn check_imports(
        &self,
        desc: &DataflowDescription<Time>,
        as_of: Time,
    ) -> Result<BTreeSet<DataflowKey>, String> {
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
        Ok(imports_from)
    }

    /// Registers `desc`'s exports as collections of dataflow `key`, starting the appenders of its
    /// materialized views; returns the appenders' tasks.
    fn register_exports(
        &mut self,
        key: DataflowKey,
        desc: &DataflowDescription<Time>,
        as_of: Time,
    ) -> Vec<JoinHandle<()>> {
        let local_workers = self.topology.workers;
        let mut tasks = Vec::new();
        for id in desc.index_exports.keys() {
            self.collections.insert(*id, CoreCollection::new(key, ExportKind::Index, as_of, local_workers));
        }
        for (id, sink) in &desc.sink_exports {
            let kind = match &sink.connection {
                SinkConnection::Subscribe { .. } => ExportKind::Subscribe,
                SinkConnection::CopyTo { directory } => ExportKind::CopyTo { directory: directory.clone() },
                SinkConnection::MaterializedView { target } => {
                    // Every update is funnelled to global worker 0, so its process appends for the replica.
                    let appender = if self.topology.local(0).is_some() {
                        let report = FailureReport { events: self.events.clone(), key, id: *id };
                        let (tx, task) = spawn_appender(
                            Arc::clone(&self.storage),
                            *target,
                            as_of,
                            self.allow_writes.subscribe(),
                            report,
                            self.limits.max_view_backlog_bytes,
                        );
                        tasks.push(task);
                        Some(tx)
                    } else {
                        None
                    };
                    ExportKind::MaterializedView { appender }
                }
            };
            self.collections.insert(*id, CoreCollection::new(key, kind, as_of, local_workers));
        }
        tasks
    }

    /// Schedules dataflow `key` (once): its storage feeds start, and the workers let it run.
    pub(super) fn schedule(&mut self, key: DataflowKey) {
        let Some(dataflow) = self.dataflows.get_mut(&key) else { return };
        if dataflow.scheduled {
            return;
        }
        dataflow.scheduled = true;
        for import in dataflow.desc.source_imports.keys() {
            let target = FeedTarget {
                events: self.events.clone(),
                key,
                workers: self.workers.clone(),
                topology: self.topology,
            };
            let read_lag = self.metrics.storage_read_lag(*import);
            let task = spawn_feed(Arc::clone(&self.storage), *import, dataflow.as_of, target, read_lag);
            dataflow.tasks.push(task);
        }
        self.broadcast(|| ToWorker::Schedule { key });
    }

    /// `AllowCompaction`: the empty frontier drops the export (and then its dataflow, if nothing else
    /// keeps it); any other moves its since forward (an index's arrangements compact with it).
    pub(super) fn allow_compaction(&mut self, id: GlobalId, frontier: Antichain<Time>) {
        if !self.collections.contains_key(&id) {
            debug!(%id, "AllowCompaction of an unknown or dropped collection ignored");
            return;
        }
        if frontier.is_empty() {
            self.drop_export(id, true);
            let key =
                self.dataflows.iter().find(|(_, d)| d.desc.export_ids().any(|e| e == id)).map(|(k, _)| *k);
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

    /// A storage import of dataflow `key` failed: the dataflow can make no more progress, so whoever waits
    /// on it gets the error instead of waiting forever: its indexes' pending and later peeks, its
    /// subscribes (an error batch that ends them) and copy-tos; its indexes and materialized views (which
    /// stop appending) are reported failed (`StatusResponse::Failed`). While a new connection replays,
    /// nothing is sent: reconciliation rebuilds the dataflow.
    pub(super) fn import_failed(&mut self, key: DataflowKey, import: GlobalId, error: String) {
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
        self.fail_index_peeks(&exports, &message);
        self.end_failed_exports(exports, &message);
    }

    /// Ends each of `exports` (of a dataflow that stopped with `message`) that has not ended yet: a
    /// subscribe with an error batch, a copy-to with an error, an index or view as
    /// `StatusResponse::Failed`. Only sent in the normal stage.
    fn end_failed_exports(&mut self, exports: Vec<GlobalId>, message: &str) {
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
                        SubscribeBatch { lower, upper: Antichain::new(), updates: Err(message.to_string()) };
                    ComputeResponse::SubscribeResponse { id, response: SubscribeResponse::Batch(batch) }
                }
                ExportKind::CopyTo { .. } => ComputeResponse::CopyToResponse {
                    id,
                    response: CopyToResponse::Error(message.to_string()),
                },
                ExportKind::Index | ExportKind::MaterializedView { .. } => {
                    ComputeResponse::Status(StatusResponse::Failed { id, error: message.to_string() })
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
    pub(super) fn export_failed(&mut self, key: DataflowKey, id: GlobalId, error: String) {
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

    /// Drops one export: workers release it, outstanding sink output ends.
    pub(super) fn drop_export(&mut self, id: GlobalId, report: bool) {
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
            ExportKind::CopyTo { .. } if !collection.sink.done || collection.sink.writing => {
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
    pub(super) fn maybe_drop_dataflow(&mut self, key: DataflowKey) {
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
    /// Reports every collection's frontiers afresh (after a reconnect).
    pub(super) fn report_all(&mut self) {
        let ids: Vec<GlobalId> = self.collections.keys().copied().collect();
        for id in ids {
            self.report_frontiers(id);
        }
    }

    /// Sends collection `id`'s frontiers (the meet over the local workers' reports) where they changed,
    /// and its hydration once, on a connection in the normal stage.
    pub(super) fn report_frontiers(&mut self, id: GlobalId) {
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
}
