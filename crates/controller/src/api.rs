//! [`ComputeController`]: the public, async face of the controller.
//!
//! Each instance runs in its own task (`instance_task.rs`) that owns an [`InstanceCore`]; the
//! controller keeps a handle on it and talks to it over a channel. Cheap reads (frontiers), hold
//! acquisition and a peek's checks and hold go straight to the instance's
//! [`SharedState`](crate::SharedState) behind a mutex and never wait behind a busy task (a peek then
//! goes to the task without waiting for a reply). Storage
//! is reached through the [`StorageCollections`] trait: the API asks it for import frontiers (to select
//! an as-of) and holds (handed to the core), answers storage peeks from snapshots (`storage_peek.rs`),
//! and writes introspection into storage collections (`introspection_writer.rs`).
//!
//! **Boundary:** I/O and plumbing. Every decision about holds, compaction, peeks and subscribes is the
//! core's (`instance.rs`), which the simulator drives without this shell.
//!
//! **Tests:** end to end against real in-process replicas in `tests/it/e2e.rs`, `tests/it/faults.rs`,
//! `tests/it/orchestrators.rs` and `tests/it/materialized_views.rs`; every error only this API produces
//! in `tests/it/api_errors.rs`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::Registry;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info_span, warn};

use frontiers::{Antichain, ReadHold, ReadPolicy};
use protocol::frame::DEFAULT_MAX_FRAME_BYTES;
use protocol::{DataflowDescription, GlobalId, InstanceId, PeekId, PeekTarget, ReplicaId, SinkConnection};
use storage::{HoldError, StorageCollections};

use crate::as_of::{AsOfSelectionError, ImportFrontiers, select_as_of};
use crate::clock::{Timestamp, wallclock_ms};
use crate::config::{ComputeInstanceConfig, ControllerConfig, ReplicaLocation};
use crate::error::{
    CancelPeekError, CollectionDropError, CollectionLookupError, CollectionMissing, CollectionStatusError,
    DataflowCreationError, InstanceCreationError, InstanceDropError, InstanceMissing, PeekError, PeekFailure,
    ReadPolicyError, ReplicaCreationError, ReplicaDropError,
};
use crate::instance::{CollectionFrontiers, InstanceCore, PeekOptions, PeekRequest, lock};
use crate::instance_task::{
    InstanceCommand, InstanceHandle, IntrospectionUpdates, ReplicaConnections, request, run_instance,
};
use crate::introspection::{IntrospectionKind, ReplicaHealth};
use crate::introspection_writer::write_introspection;
use crate::metrics::ControllerMetrics;
use crate::orchestrator::{Orchestrator, ReplicaSpec};
use crate::response::{ComputeControllerResponse, PeekResult};
use crate::status::{ReplicaHydration, ReplicaLag};
use crate::storage_peek::{StoragePeek, run_storage_peek};

/// A pending peek: await [`PeekHandle::result`].
#[derive(Debug)]
pub struct PeekHandle {
    /// The peek's id (for `cancel_peek`), unique within its instance.
    pub uuid: PeekId,
    result: oneshot::Receiver<PeekResult>,
}

impl PeekHandle {
    /// The peek's result: its rows, or why it has none. Every peek ends, at the latest at its timeout.
    pub async fn result(self) -> PeekResult {
        self.result.await.unwrap_or(Err(PeekFailure::InstanceDropped))
    }
}

/// The compute controller. See the crate documentation.
pub struct ComputeController {
    storage: Arc<dyn StorageCollections>,
    orchestrator: Option<Arc<dyn Orchestrator>>,
    instances: BTreeMap<InstanceId, InstanceHandle>,
    responses_tx: mpsc::UnboundedSender<ComputeControllerResponse>,
    responses_rx: mpsc::UnboundedReceiver<ComputeControllerResponse>,
    introspection_tx: Option<mpsc::UnboundedSender<IntrospectionUpdates>>,
    introspection_task: Option<JoinHandle<()>>,
    metrics: Option<ControllerMetrics>,
    config: ControllerConfig,
    /// Drawn once: the same on every connection to a replica, so a reconnect is told from another
    /// controller of the same epoch (`protocol::ComputeCommand::Hello`).
    session: u64,
}

impl std::fmt::Debug for ComputeController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeController")
            .field("instances", &self.instances.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ComputeController {
    /// A controller over `storage`, starting managed replicas with `orchestrator` (if any). With
    /// introspection enabled, creates the introspection collections in storage. With metrics
    /// ([`ControllerConfig::metrics`]), registers its families in that registry, which must not have
    /// them yet (one controller per registry).
    pub async fn new(
        storage: Arc<dyn StorageCollections>,
        orchestrator: Option<Arc<dyn Orchestrator>>,
        config: ControllerConfig,
    ) -> Result<Self, String> {
        let (responses_tx, responses_rx) = mpsc::unbounded_channel();
        let metrics = match &config.metrics {
            Some(registry) => Some(
                ControllerMetrics::register(registry)
                    .map_err(|e| format!("cannot register the controller's metrics: {e}"))?,
            ),
            None => None,
        };
        let (mut introspection_tx, mut introspection_task) = (None, None);
        if config.introspection {
            for kind in IntrospectionKind::ALL {
                storage
                    .create_collection(kind.default_id(), kind.desc())
                    .await
                    .map_err(|e| format!("cannot create introspection collection {}: {e}", kind.name()))?;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let interval = Duration::from_millis(config.instance.introspection_interval_ms.max(1));
            introspection_task = Some(tokio::spawn(write_introspection(Arc::clone(&storage), rx, interval)));
            introspection_tx = Some(tx);
        }
        Ok(ComputeController {
            storage,
            orchestrator,
            instances: BTreeMap::new(),
            responses_tx,
            responses_rx,
            introspection_tx,
            introspection_task,
            metrics,
            config,
            session: replica_client::new_session(),
        })
    }

    /// The registry the controller's metrics are in (`None` if it keeps none): what the embedding
    /// service serves at its `/metrics` endpoint (for example with `telemetry::MetricsServer`). The
    /// families and what they count are in the crate's `metrics` module documentation.
    pub fn metrics_registry(&self) -> Option<&Registry> {
        self.config.metrics.as_ref()
    }

    /// The storage layer the controller uses.
    pub fn storage(&self) -> &Arc<dyn StorageCollections> {
        &self.storage
    }

    fn instance(&self, id: InstanceId) -> Result<&InstanceHandle, InstanceMissing> {
        self.instances.get(&id).ok_or(InstanceMissing(id))
    }

    /// The configuration of an instance made of the controller's defaults.
    pub fn default_instance_config(&self) -> ComputeInstanceConfig {
        ComputeInstanceConfig {
            core: self.config.instance.clone(),
            replica_backoff: self.config.replica_backoff,
            hydration_concurrency: self.config.hydration_concurrency,
        }
    }

    /// Creates an instance (with no replicas yet) that runs with `config`.
    pub fn create_instance(
        &mut self,
        id: InstanceId,
        config: ComputeInstanceConfig,
    ) -> Result<(), InstanceCreationError> {
        if self.instances.contains_key(&id) {
            return Err(InstanceCreationError::InstanceExists(id));
        }
        if config.core.max_command_bytes > DEFAULT_MAX_FRAME_BYTES {
            return Err(InstanceCreationError::CommandLimitAboveFrameLimit {
                max_command_bytes: config.core.max_command_bytes,
                max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            });
        }
        let peek_timeout_ms = config.core.default_peek_timeout_ms;
        let wake = Arc::new(Notify::new());
        let notify = Arc::clone(&wake);
        let mut core =
            InstanceCore::new(id, config.core.clone(), Arc::new(move || notify.notify_one()), wallclock_ms());
        let mut peek_recorder = None;
        if let Some(metrics) = &self.metrics {
            let instance_metrics = metrics.instance(id);
            peek_recorder = Some(instance_metrics.peek_recorder());
            core = core.with_metrics(instance_metrics);
        }
        let shared = core.shared();
        let (commands, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(
            run_instance(
                core,
                rx,
                wake,
                Arc::clone(&self.storage),
                self.responses_tx.clone(),
                self.introspection_tx.clone(),
                config,
                self.config.tick_interval_ms,
                ReplicaConnections {
                    epoch: self.config.epoch,
                    session: self.session,
                    security: self.config.replica_security.clone(),
                    keepalive_interval_ms: self.config.replica_keepalive_interval_ms,
                    idle_timeout_ms: self.config.replica_idle_timeout_ms,
                },
                peek_recorder.clone(),
            )
            .instrument(info_span!("instance", instance = %id)),
        );
        self.instances.insert(
            id,
            InstanceHandle {
                id,
                commands,
                shared,
                task,
                managed: BTreeMap::new(),
                peek_timeout_ms,
                storage_peeks: Arc::new(Mutex::new(BTreeMap::new())),
                peek_recorder,
            },
        );
        Ok(())
    }

    /// Drops an instance: its replicas (managed ones are stopped), collections and holds go away.
    pub async fn drop_instance(&mut self, id: InstanceId) -> Result<(), InstanceDropError> {
        let handle = self.instances.remove(&id).ok_or(InstanceMissing(id))?;
        handle.task.abort();
        let _ = handle.task.await;
        if let Some(orchestrator) = &self.orchestrator {
            for replica in handle.managed.keys() {
                if let Err(e) = orchestrator.drop_replica(id, *replica).await {
                    warn!(instance = %id, %replica, error = %e, "could not stop replica");
                }
            }
        }
        Ok(())
    }

    /// Adds a replica to an instance, starting it first if it is managed.
    ///
    /// The replica is replayed the instance's history as it is when the connection comes up, and a
    /// replica that is already running reconciles with that replay: it keeps the dataflows the replay
    /// creates identically and drops the rest. So a new controller taking over running replicas (after a
    /// restart) must re-create their dataflows *before* adding them, or they rebuild what they dropped.
    pub async fn add_replica(
        &mut self,
        instance: InstanceId,
        replica: ReplicaId,
        location: ReplicaLocation,
    ) -> Result<(), ReplicaCreationError> {
        let handle = self.instance(instance)?;
        let (addresses, spec) = match location {
            ReplicaLocation::Unmanaged { addresses } => (addresses, None),
            ReplicaLocation::Managed { workers, processes } => {
                let Some(orchestrator) = &self.orchestrator else {
                    return Err(ReplicaCreationError::Orchestrator {
                        replica,
                        reason: "the controller has no orchestrator".to_string(),
                    });
                };
                if handle.managed.contains_key(&replica) {
                    return Err(ReplicaCreationError::ReplicaExists(replica));
                }
                if processes == 0 {
                    return Err(ReplicaCreationError::NoProcesses(replica));
                }
                let spec = ReplicaSpec { instance, replica, workers, processes };
                let addresses = orchestrator
                    .ensure_replica(spec.clone())
                    .await
                    .map_err(|reason| ReplicaCreationError::Orchestrator { replica, reason })?;
                (addresses, Some(spec))
            }
        };
        let result = if addresses.is_empty() {
            Err(ReplicaCreationError::NoProcesses(replica))
        } else {
            request(handle, |reply| InstanceCommand::AddReplica { replica, addresses, reply })
                .await
                .map_err(ReplicaCreationError::from)
                .and_then(|added| added)
        };
        if let Err(e) = result {
            // A replica the orchestrator started for nothing is stopped again.
            if let (Some(orchestrator), Some(_)) = (&self.orchestrator, &spec)
                && let Err(reason) = orchestrator.drop_replica(instance, replica).await
            {
                warn!(%instance, %replica, %reason, "could not stop a replica that was not added");
            }
            return Err(e);
        }
        if let Some(spec) = spec {
            self.instances.get_mut(&instance).expect("checked").managed.insert(replica, spec);
        }
        Ok(())
    }

    /// Drops a replica (and stops it, if managed). Peeks stop waiting for it; its holds are released.
    pub async fn drop_replica(
        &mut self,
        instance: InstanceId,
        replica: ReplicaId,
    ) -> Result<(), ReplicaDropError> {
        let handle = self.instance(instance)?;
        request(handle, |reply| InstanceCommand::DropReplica { replica, reply }).await??;
        let spec = self.instances.get_mut(&instance).expect("checked").managed.remove(&replica);
        if let (Some(orchestrator), Some(_)) = (&self.orchestrator, spec)
            && let Err(e) = orchestrator.drop_replica(instance, replica).await
        {
            warn!(%instance, %replica, error = %e, "could not stop replica");
        }
        Ok(())
    }

    /// The freshest valid as-of for `desc` on `instance`, from its imports' current frontiers and its
    /// exports' constraints.
    pub async fn select_as_of(
        &self,
        instance: InstanceId,
        desc: &DataflowDescription<Timestamp>,
    ) -> Result<Antichain<Timestamp>, DataflowCreationError> {
        let handle = self.instance(instance)?;
        let mut frontiers = BTreeMap::new();
        for id in desc.source_imports.keys() {
            frontiers.insert(*id, self.storage_frontiers(*id).await?);
        }
        for sink in desc.sink_exports.values() {
            if let SinkConnection::MaterializedView { target } = &sink.connection {
                frontiers.insert(*target, self.storage_frontiers(*target).await?);
            }
        }
        {
            let shared = lock(&handle.shared);
            for id in desc.index_imports.keys() {
                let f = shared.frontiers(*id).ok_or(DataflowCreationError::CollectionMissing(*id))?;
                frontiers.insert(*id, ImportFrontiers { since: f.since, upper: f.upper });
            }
        }
        select_as_of(desc, &frontiers).map_err(|e| match e {
            AsOfSelectionError::TargetSealed(target) => sealed_target(desc, target),
            other => DataflowCreationError::NoValidAsOf {
                name: desc.debug_name.clone(),
                reason: other.to_string(),
            },
        })
    }

    async fn storage_frontiers(
        &self,
        id: GlobalId,
    ) -> Result<ImportFrontiers<Timestamp>, DataflowCreationError> {
        match self.storage.frontiers(id).await {
            Ok(f) => Ok(ImportFrontiers { since: f.since, upper: f.upper }),
            Err(storage::ReadError::CollectionMissing(_)) => {
                Err(DataflowCreationError::CollectionMissing(id))
            }
            Err(e) => Err(DataflowCreationError::Storage(e.to_string())),
        }
    }

    /// Installs a dataflow on every replica of `instance`. Leave `desc.as_of` unset to have the freshest
    /// valid as-of selected (chosen again if an import's since overtakes it before its hold is taken);
    /// returns the as-of used.
    pub async fn create_dataflow(
        &self,
        instance: InstanceId,
        mut desc: DataflowDescription<Timestamp>,
    ) -> Result<Antichain<Timestamp>, DataflowCreationError> {
        /// How often an as-of the controller chose is chosen again after a since overtook it.
        const AS_OF_ATTEMPTS: u32 = 5;
        let handle = self.instance(instance)?;
        for (id, sink) in &desc.sink_exports {
            if let SinkConnection::MaterializedView { target } = &sink.connection {
                match self.storage.list_collections().await {
                    Ok(collections) => match collections.iter().find(|(c, _)| c == target) {
                        Some((_, existing)) if existing.typ() != sink.desc.typ() => {
                            return Err(DataflowCreationError::BadSinkTarget {
                                id: *id,
                                target: *target,
                                reason: "has a different schema".to_string(),
                            });
                        }
                        Some(_) => {}
                        None => {
                            return Err(DataflowCreationError::BadSinkTarget {
                                id: *id,
                                target: *target,
                                reason: "does not exist".to_string(),
                            });
                        }
                    },
                    Err(e) => return Err(DataflowCreationError::Storage(e.to_string())),
                }
                // With or without an as-of: the same error `select_as_of` gives.
                if self.storage_frontiers(*target).await?.upper.is_empty() {
                    return Err(sealed_target(&desc, *target));
                }
            }
        }
        if desc.as_of.is_some() {
            return self.install_dataflow(handle, desc).await;
        }
        // Validate the shape first so that a broken plan is reported as such, not as an as-of problem.
        let mut probe = desc.clone();
        probe.as_of = Some(Antichain::from_elem(0));
        probe.validate().map_err(DataflowCreationError::Invalid)?;
        // The as-of is chosen from frontiers read before the holds are taken, so a since can move past
        // it in between (a reader elsewhere releasing its hold): then choose again from fresher
        // frontiers. Sinces only move forward, so this ends; the attempts are bounded all the same.
        let mut attempt = 1;
        loop {
            desc.as_of = Some(self.select_as_of(instance, &desc).await?);
            match self.install_dataflow(handle, desc.clone()).await {
                Err(DataflowCreationError::SinceViolation { id, since, as_of })
                    if attempt < AS_OF_ATTEMPTS =>
                {
                    let why = "a since moved past the chosen as-of; choosing again";
                    debug!(collection = %id, ?since, ?as_of, attempt, "{why}");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Takes the storage holds of a dataflow with an as-of and hands it to its instance.
    async fn install_dataflow(
        &self,
        handle: &InstanceHandle,
        desc: DataflowDescription<Timestamp>,
    ) -> Result<Antichain<Timestamp>, DataflowCreationError> {
        desc.validate().map_err(DataflowCreationError::Invalid)?;
        let as_of = desc.as_of.clone().expect("validated");
        let mut holds = BTreeMap::new();
        for id in desc.source_imports.keys() {
            let hold = self.storage.acquire_read_hold(*id, as_of.clone()).await.map_err(|e| match e {
                HoldError::CollectionMissing(id) => DataflowCreationError::CollectionMissing(id),
                HoldError::BeforeSince { id, since, requested } => {
                    DataflowCreationError::SinceViolation { id, since, as_of: requested }
                }
                other => DataflowCreationError::Storage(other.to_string()),
            })?;
            holds.insert(*id, hold);
        }
        let mut target_uppers = Vec::new();
        for sink in desc.sink_exports.values() {
            if let SinkConnection::MaterializedView { target } = &sink.connection {
                // Best effort: the instance's frontier watch feeds the upper anyway.
                match self.storage.frontiers(*target).await {
                    Ok(f) => target_uppers.push((*target, f.upper)),
                    Err(e) => {
                        debug!(collection = %target, error = %e, "materialized view target's upper unknown")
                    }
                }
            }
        }
        request(handle, |reply| InstanceCommand::CreateDataflow { desc, holds, target_uppers, reply })
            .await??;
        Ok(as_of)
    }

    /// Drops compute collections. Nothing is dropped if any id is unknown or already dropped.
    pub async fn drop_collections(
        &self,
        instance: InstanceId,
        ids: Vec<GlobalId>,
    ) -> Result<(), CollectionDropError> {
        let handle = self.instance(instance)?;
        request(handle, |reply| InstanceCommand::DropCollections { ids, reply }).await?
    }

    /// Lets the replicas of `instance` write to storage: materialized views append and copy-tos write
    /// their files only after this (until then the replicas compute but stay read-only, as a controller
    /// that is not yet the leader must). Idempotent; replicas added later are told too.
    pub async fn allow_writes(&self, instance: InstanceId) -> Result<(), InstanceMissing> {
        let handle = self.instance(instance)?;
        request(handle, |reply| InstanceCommand::AllowWrites { reply }).await
    }

    /// Sets the read policies of indexes.
    pub async fn set_read_policy(
        &self,
        instance: InstanceId,
        policies: Vec<(GlobalId, ReadPolicy<Timestamp>)>,
    ) -> Result<(), ReadPolicyError> {
        let handle = self.instance(instance)?;
        request(handle, |reply| InstanceCommand::SetReadPolicy { policies, reply }).await?
    }

    /// A read hold on a collection at its current since: a compute collection of `instance`, or else a
    /// storage collection. Dropping the hold releases it.
    pub async fn acquire_read_hold(
        &self,
        instance: InstanceId,
        id: GlobalId,
    ) -> Result<ReadHold<GlobalId, Timestamp>, CollectionLookupError> {
        let handle = self.instance(instance)?;
        if let Ok(hold) = lock(&handle.shared).acquire_at_since(id) {
            return Ok(hold);
        }
        // Not a live compute collection of this instance: a storage collection, then.
        let frontiers = self.storage.frontiers(id).await.map_err(|e| match e {
            storage::ReadError::CollectionMissing(_) => {
                CollectionLookupError::CollectionMissing(CollectionMissing(id))
            }
            other => CollectionLookupError::Storage(other.to_string()),
        })?;
        self.storage.acquire_read_hold(id, frontiers.since).await.map_err(|e| match e {
            HoldError::CollectionMissing(_) => {
                CollectionLookupError::CollectionMissing(CollectionMissing(id))
            }
            other => CollectionLookupError::Storage(other.to_string()),
        })
    }

    /// The since and upper of a live compute collection, and the upper of the replicas connected now
    /// ([`CollectionFrontiers::connected_upper`]: a peek below it needs no dataflow to catch up), without
    /// waiting for the instance task.
    pub fn collection_frontiers(
        &self,
        instance: InstanceId,
        id: GlobalId,
    ) -> Result<CollectionFrontiers<Timestamp>, CollectionLookupError> {
        let handle = self.instance(instance)?;
        lock(&handle.shared).frontiers(id).ok_or_else(|| CollectionMissing(id).into())
    }

    /// Reads a collection at `timestamp`: an index of `instance` (answered by its replicas, the first
    /// answer wins) or a storage collection (answered from a storage snapshot by the controller).
    ///
    /// Every peek ends ([`PeekHandle::result`]): with its rows, or a [`PeekFailure`], at the latest after
    /// its timeout (`options.timeout_ms`, else the instance's `default_peek_timeout_ms`). A storage peek
    /// honours the timeout and the map/filter/project and finishing; literal constraints and a target
    /// replica apply to index peeks only and are refused for storage.
    pub async fn peek(
        &self,
        instance: InstanceId,
        target: PeekTarget,
        timestamp: Timestamp,
        options: PeekOptions,
    ) -> Result<PeekHandle, PeekError> {
        let handle = self.instance(instance)?;
        let (result_tx, result_rx) = oneshot::channel();
        // The shell's clock, for the peek duration metric (only when it is kept).
        #[allow(clippy::disallowed_methods)]
        let started = handle.peek_recorder.as_ref().map(|_| Instant::now());
        let uuid = match target {
            PeekTarget::Index { id } => {
                // Checked and held here, not in the instance task: a peek does not wait for a reply.
                let prepared = {
                    let mut shared = lock(&handle.shared);
                    let uuid = shared.next_peek_id();
                    shared.prepare_peek(PeekRequest { uuid, id, timestamp, options })?
                };
                let uuid = prepared.uuid();
                handle
                    .commands
                    .send(InstanceCommand::Peek { prepared, result: result_tx, started })
                    .map_err(|_| InstanceMissing(handle.id))?;
                uuid
            }
            PeekTarget::Storage { id } => {
                self.peek_storage(handle, id, timestamp, options, result_tx, started).await?
            }
        };
        Ok(PeekHandle { uuid, result: result_rx })
    }

    /// Starts a peek of storage collection `id`: checks its options, takes its hold and spawns the task
    /// that answers it ([`run_storage_peek`]), which `cancel_peek` can reach until it ends.
    async fn peek_storage(
        &self,
        handle: &InstanceHandle,
        id: GlobalId,
        timestamp: Timestamp,
        options: PeekOptions,
        result: oneshot::Sender<PeekResult>,
        started: Option<Instant>,
    ) -> Result<PeekId, PeekError> {
        if options.literal_constraints.is_some() {
            return Err(PeekError::LiteralConstraintsOnStorage(id));
        }
        if options.target_replica.is_some() {
            return Err(PeekError::TargetReplicaOnStorage(id));
        }
        let hold = self.storage.acquire_read_hold(id, Antichain::from_elem(timestamp)).await.map_err(
            |e| match e {
                HoldError::CollectionMissing(id) => PeekError::CollectionMissing(CollectionMissing(id)),
                HoldError::BeforeSince { id, since, .. } => {
                    PeekError::SinceViolation { id, since, timestamp }
                }
                other => PeekError::Storage(other.to_string()),
            },
        )?;
        let uuid = lock(&handle.shared).issue_peek_id();
        let (cancel_tx, cancel) = oneshot::channel();
        handle.storage_peeks.lock().expect("storage peeks poisoned").insert(uuid, cancel_tx);
        let peek = StoragePeek {
            uuid,
            instance: handle.id,
            id,
            timestamp,
            timeout_ms: options.timeout_ms.unwrap_or(handle.peek_timeout_ms),
            options,
            hold,
            started_ms: wallclock_ms(),
            recorder: handle.peek_recorder.clone().zip(started),
        };
        let span = info_span!("storage_peek", instance = %handle.id, collection = %id, peek = %uuid);
        let answering = run_storage_peek(
            Arc::clone(&self.storage),
            peek,
            cancel,
            Arc::downgrade(&handle.storage_peeks),
            self.responses_tx.clone(),
            result,
        );
        tokio::spawn(answering.instrument(span));
        Ok(uuid)
    }

    /// Cancels a pending peek: its caller gets [`PeekFailure::Canceled`]. An index peek's hold stays
    /// until its replicas answered the cancellation (at the latest until its deadline); a storage peek's
    /// goes at once. A peek that already ended is [`CancelPeekError::PeekFinished`], an id the instance
    /// never issued [`CancelPeekError::PeekUnknown`].
    pub async fn cancel_peek(&self, instance: InstanceId, uuid: PeekId) -> Result<(), CancelPeekError> {
        let handle = self.instance(instance)?;
        // A storage peek in flight: taking its entry decides the race with its answer (see
        // `run_storage_peek`), and the signal wakes it.
        if let Some(cancel) = handle.storage_peeks.lock().expect("storage peeks poisoned").remove(&uuid) {
            let _ = cancel.send(());
            return Ok(());
        }
        request(handle, |reply| InstanceCommand::CancelPeek { uuid, reply }).await?
    }

    /// The next response (peek notifications, subscribe batches, copy-to results, frontier advances).
    pub async fn process(&mut self) -> Option<ComputeControllerResponse> {
        self.responses_rx.recv().await
    }

    /// The next response if one is ready.
    pub fn try_process(&mut self) -> Option<ComputeControllerResponse> {
        self.responses_rx.try_recv().ok()
    }

    /// Whether each replica of live collection `id` hydrated it on its current connection, since when and
    /// how long it took ([`ReplicaHydration`], by replica). What the `compute_hydration` relation says, at
    /// millisecond precision and with the start of each hydration.
    pub async fn hydration_status(
        &self,
        instance: InstanceId,
        id: GlobalId,
    ) -> Result<Vec<ReplicaHydration>, CollectionStatusError> {
        self.inspect(instance, move |core| core.hydration_status(id))
            .await?
            .ok_or(CollectionStatusError::CollectionMissing(CollectionMissing(id)))
    }

    /// The wall-clock lag of live collection `id` on each replica (now minus the upper it reported, in
    /// milliseconds of the controller's clock), and its largest lag per minute over the instance's
    /// `wallclock_lag_history_minutes` ([`ReplicaLag`], by replica). What the `compute_wallclock_lag` and
    /// `compute_wallclock_lag_history` relations say, at millisecond precision.
    pub async fn wallclock_lag(
        &self,
        instance: InstanceId,
        id: GlobalId,
    ) -> Result<Vec<ReplicaLag>, CollectionStatusError> {
        self.inspect(instance, move |core| core.wallclock_lag(id))
            .await?
            .ok_or(CollectionStatusError::CollectionMissing(CollectionMissing(id)))
    }

    /// Every replica of `instance` with its status ([`ReplicaHealth`]), by replica: what the
    /// `compute_replica_status` relation says.
    pub async fn replica_statuses(
        &self,
        instance: InstanceId,
    ) -> Result<Vec<(ReplicaId, ReplicaHealth)>, InstanceMissing> {
        self.inspect(instance, |core| core.replica_healths()).await
    }

    /// Runs `f` on the instance's core, in its task (for tests and diagnostics).
    pub async fn inspect<R: Send + 'static>(
        &self,
        instance: InstanceId,
        f: impl FnOnce(&InstanceCore<Timestamp>) -> R + Send + 'static,
    ) -> Result<R, InstanceMissing> {
        let handle = self.instance(instance)?;
        let (tx, rx) = oneshot::channel();
        handle
            .commands
            .send(InstanceCommand::Inspect(Box::new(move |core| {
                let _ = tx.send(f(core));
            })))
            .map_err(|_| InstanceMissing(instance))?;
        rx.await.map_err(|_| InstanceMissing(instance))
    }
}

impl Drop for ComputeController {
    fn drop(&mut self) {
        for handle in self.instances.values() {
            handle.task.abort();
        }
        if let Some(task) = &self.introspection_task {
            task.abort();
        }
    }
}

/// The error for a materialized view of `desc` writing into sealed storage collection `target`.
fn sealed_target(desc: &DataflowDescription<Timestamp>, target: GlobalId) -> DataflowCreationError {
    let id = desc
        .sink_exports
        .iter()
        .find(|(_, sink)| sink.connection == SinkConnection::MaterializedView { target })
        .map(|(id, _)| *id)
        .expect("only a materialized view's target can be sealed");
    DataflowCreationError::SinkTargetSealed { id, target }
}
