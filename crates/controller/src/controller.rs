//! [`ComputeController`]: the public, async face of the controller, and the tokio task of each instance.
//!
//! Each instance runs in its own task that owns an [`InstanceCore`] and the [`ReplicaClient`]s of the
//! instance's replicas. The handle talks to the task over a channel; cheap reads (frontiers), hold
//! acquisition and a peek's checks and hold go straight to the instance's [`SharedState`] behind a mutex
//! and never wait behind a busy task (a peek then goes to the task without waiting for a reply). Storage
//! is reached through the [`StorageCollections`] trait: the handle asks it for import frontiers (to
//! select an as-of) and holds (handed to the core), answers storage peeks from snapshots, and writes
//! introspection updates into storage collections. Each instance task also watches storage's
//! frontiers and feeds them to its core, whose materialized views take their upper from their targets'.
//! It hands its core's introspection updates to the writer task once per tick
//! ([`ControllerConfig::tick_interval_ms`]), not after every event, so a peek's path has no third task.
//!
//! **Boundary:** this file is I/O and plumbing. Every decision about holds, compaction, peeks and
//! subscribes is the core's (`instance.rs`), which the simulator drives without this shell.

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, error, info_span, warn};

use frontiers::{Antichain, PartialOrder, ReadHold, ReadPolicy};
use protocol::{
    DataflowDescription, Diff, GlobalId, InstanceId, PeekId, PeekResponse, PeekTarget, ReplicaId, Row,
    SinkConnection,
};
use replica_client::{Backoff, ReplicaClient, ReplicaClientConfig, ReplicaCoreConfig, ReplicaEvent};
use storage::{AppendError, AppendRequest, HoldError, StorageCollections, StorageReadHold};

use crate::as_of::{ImportFrontiers, select_as_of};
use crate::error::{
    CancelPeekError, CollectionDropError, CollectionLookupError, CollectionMissing, DataflowCreationError,
    InstanceCreationError, InstanceDropError, InstanceMissing, PeekError, ReadPolicyError,
    ReplicaCreationError, ReplicaDropError,
};
use crate::instance::{
    CollectionFrontiers, InstanceCore, InstanceCoreConfig, InstanceOutput, PeekOptions, PeekRequest,
    PreparedPeek, SharedHandle, lock,
};
use crate::introspection::IntrospectionKind;
use crate::orchestrator::{Orchestrator, ReplicaSpec};
use crate::response::{ComputeControllerResponse, PeekNotification, PeekOutcome};

/// The time type of the controller's shell: milliseconds since the Unix epoch.
pub type Timestamp = u64;

/// The controller's configuration. `instance`, `replica_backoff` and `hydration_concurrency` are the
/// defaults of [`ComputeController::default_instance_config`]; each instance runs with the
/// [`ComputeInstanceConfig`] given to [`create_instance`](ComputeController::create_instance).
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Default per-instance tunables (read policy, peek timeout, introspection interval).
    pub instance: InstanceCoreConfig<Timestamp>,
    /// Default reconnection backoff for replica clients.
    pub replica_backoff: Backoff,
    /// Default sequential hydration limit for new replicas (`None`: unlimited).
    pub hydration_concurrency: Option<usize>,
    /// How often each instance task ticks (timeouts, lag), in milliseconds.
    pub tick_interval_ms: u64,
    /// Whether to write introspection into storage collections (see `IntrospectionKind`).
    pub introspection: bool,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            instance: InstanceCoreConfig::default(),
            replica_backoff: Backoff::default(),
            hydration_concurrency: None,
            tick_interval_ms: 50,
            introspection: true,
        }
    }
}

/// How one compute instance runs ([`ComputeController::create_instance`]).
#[derive(Debug, Clone)]
pub struct ComputeInstanceConfig {
    /// The instance's default index read policy, peek timeout and introspection interval.
    pub core: InstanceCoreConfig<Timestamp>,
    /// How its replicas' clients back off between connection attempts.
    pub replica_backoff: Backoff,
    /// How many dataflows each of its replicas hydrates at once (`None`: all).
    pub hydration_concurrency: Option<usize>,
}

/// Where a replica runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaLocation {
    /// Already running somewhere: one controller address per process.
    Unmanaged {
        /// The addresses.
        addresses: Vec<String>,
    },
    /// Started by the controller's orchestrator.
    Managed {
        /// Timely workers per process.
        workers: usize,
        /// Processes.
        processes: usize,
    },
}

/// A pending peek: await [`PeekHandle::result`].
#[derive(Debug)]
pub struct PeekHandle {
    /// The peek's id (for `cancel_peek`).
    pub uuid: PeekId,
    result: oneshot::Receiver<PeekResponse>,
}

impl PeekHandle {
    /// The peek's answer.
    pub async fn result(self) -> PeekResponse {
        self.result.await.unwrap_or_else(|_| PeekResponse::Error("the instance was dropped".to_string()))
    }
}

type Reply<T> = oneshot::Sender<T>;

/// Introspection differences on their way to storage.
type IntrospectionUpdates = Vec<(IntrospectionKind, Row, Diff)>;

enum InstanceCommand {
    AddReplica {
        replica: ReplicaId,
        addresses: Vec<String>,
        reply: Reply<Result<(), ReplicaCreationError>>,
    },
    DropReplica {
        replica: ReplicaId,
        reply: Reply<Result<(), ReplicaDropError>>,
    },
    CreateDataflow {
        desc: DataflowDescription<Timestamp>,
        holds: BTreeMap<GlobalId, StorageReadHold>,
        /// The storage uppers of its materialized views' targets, read just before: fed to the core first,
        /// so the views follow storage from their creation even if the frontier watch is behind.
        target_uppers: Vec<(GlobalId, Antichain<Timestamp>)>,
        reply: Reply<Result<(), DataflowCreationError>>,
    },
    DropCollections {
        ids: Vec<GlobalId>,
        reply: Reply<Result<(), CollectionDropError>>,
    },
    SetReadPolicy {
        policies: Vec<(GlobalId, ReadPolicy<Timestamp>)>,
        reply: Reply<Result<(), ReadPolicyError>>,
    },
    Peek {
        prepared: PreparedPeek<Timestamp>,
        result: Reply<PeekResponse>,
    },
    CancelPeek {
        uuid: PeekId,
        reply: Reply<Result<(), CancelPeekError>>,
    },
    AllowWrites {
        reply: Reply<()>,
    },
    Inspect(Inspector),
}

/// A closure run on an instance's core inside its task.
type Inspector = Box<dyn FnOnce(&InstanceCore<Timestamp>) + Send>;

struct InstanceHandle {
    id: InstanceId,
    commands: mpsc::UnboundedSender<InstanceCommand>,
    shared: SharedHandle<Timestamp>,
    task: JoinHandle<()>,
    managed: BTreeMap<ReplicaId, ReplicaSpec>,
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
    next_peek: AtomicU64,
    config: ControllerConfig,
}

impl std::fmt::Debug for ComputeController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeController")
            .field("instances", &self.instances.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch: the controller shell's clock (the core never reads it).
#[allow(clippy::disallowed_methods)]
pub fn wallclock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ComputeController {
    /// A controller over `storage`, starting managed replicas with `orchestrator` (if any). With
    /// introspection enabled, creates the introspection collections in storage.
    pub async fn new(
        storage: Arc<dyn StorageCollections>,
        orchestrator: Option<Arc<dyn Orchestrator>>,
        config: ControllerConfig,
    ) -> Result<Self, String> {
        let (responses_tx, responses_rx) = mpsc::unbounded_channel();
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
            next_peek: AtomicU64::new(1),
            config,
        })
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
        let wake = Arc::new(Notify::new());
        let notify = Arc::clone(&wake);
        let core =
            InstanceCore::new(id, config.core.clone(), Arc::new(move || notify.notify_one()), wallclock_ms());
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
            )
            .instrument(info_span!("instance", instance = %id)),
        );
        self.instances.insert(id, InstanceHandle { id, commands, shared, task, managed: BTreeMap::new() });
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
        select_as_of(desc, &frontiers).map_err(|e| DataflowCreationError::NoValidAsOf {
            name: desc.debug_name.clone(),
            reason: e.to_string(),
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
                    debug!(%id, ?since, ?as_of, attempt, "a since moved past the chosen as-of; choosing again");
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
                    Err(e) => debug!(%target, error = %e, "materialized view target's upper unknown"),
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

    /// The since and upper of a live compute collection (without waiting for the instance task).
    pub fn collection_frontiers(
        &self,
        instance: InstanceId,
        id: GlobalId,
    ) -> Result<CollectionFrontiers<Timestamp>, CollectionLookupError> {
        let handle = self.instance(instance)?;
        lock(&handle.shared).frontiers(id).ok_or_else(|| CollectionMissing(id).into())
    }

    /// Reads a collection at `timestamp`: an index of `instance` (answered by its replicas, the first
    /// answer wins) or a storage collection (answered from a storage snapshot).
    pub async fn peek(
        &self,
        instance: InstanceId,
        target: PeekTarget,
        timestamp: Timestamp,
        options: PeekOptions,
    ) -> Result<PeekHandle, PeekError> {
        let handle = self.instance(instance)?;
        let uuid = PeekId(self.next_peek.fetch_add(1, Ordering::Relaxed));
        let (result_tx, result_rx) = oneshot::channel();
        match target {
            PeekTarget::Index { id } => {
                // Checked and held here, not in the instance task: a peek does not wait for a reply.
                let prepared =
                    lock(&handle.shared).prepare_peek(PeekRequest { uuid, id, timestamp, options })?;
                handle
                    .commands
                    .send(InstanceCommand::Peek { prepared, result: result_tx })
                    .map_err(|_| InstanceMissing(handle.id))?;
            }
            PeekTarget::Storage { id } => {
                let hold =
                    self.storage.acquire_read_hold(id, Antichain::from_elem(timestamp)).await.map_err(
                        |e| match e {
                            HoldError::CollectionMissing(id) => {
                                PeekError::CollectionMissing(CollectionMissing(id))
                            }
                            HoldError::BeforeSince { id, since, .. } => {
                                PeekError::SinceViolation { id, since, timestamp }
                            }
                            other => PeekError::Storage(other.to_string()),
                        },
                    )?;
                let storage = Arc::clone(&self.storage);
                let responses = self.responses_tx.clone();
                let started = wallclock_ms();
                tokio::spawn(async move {
                    let response = storage_peek(&*storage, id, timestamp, options).await;
                    drop(hold);
                    let outcome = PeekOutcome::of(&response);
                    let _ = responses.send(ComputeControllerResponse::PeekNotification(PeekNotification {
                        uuid,
                        instance,
                        replica: None,
                        outcome,
                        duration_ms: wallclock_ms().saturating_sub(started),
                    }));
                    let _ = result_tx.send(response);
                });
            }
        }
        Ok(PeekHandle { uuid, result: result_rx })
    }

    /// Cancels a pending index peek: its caller gets `Canceled`.
    pub async fn cancel_peek(&self, instance: InstanceId, uuid: PeekId) -> Result<(), CancelPeekError> {
        let handle = self.instance(instance)?;
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

/// Sends a command to an instance task and waits for its reply.
async fn request<R>(
    handle: &InstanceHandle,
    make: impl FnOnce(Reply<R>) -> InstanceCommand,
) -> Result<R, InstanceMissing> {
    let (tx, rx) = oneshot::channel();
    handle.commands.send(make(tx)).map_err(|_| InstanceMissing(handle.id))?;
    rx.await.map_err(|_| InstanceMissing(handle.id))
}

async fn storage_peek(
    storage: &dyn StorageCollections,
    id: GlobalId,
    timestamp: Timestamp,
    options: PeekOptions,
) -> PeekResponse {
    let rows = match storage.snapshot(id, timestamp).await {
        Ok(rows) => rows,
        Err(e) => return PeekResponse::Error(e.to_string()),
    };
    let mut out: BTreeMap<Row, Diff> = BTreeMap::new();
    for (row, diff) in rows {
        let row = match &options.map_filter_project {
            None => Some(row),
            Some(mfp) => match mfp.apply(&row) {
                Ok(row) => row,
                Err(e) => return PeekResponse::Error(e.to_string()),
            },
        };
        if let Some(row) = row {
            *out.entry(row).or_insert(0) += diff;
        }
    }
    let mut rows = Vec::with_capacity(out.len());
    for (row, diff) in out {
        match diff {
            0 => {}
            d if d < 0 => return PeekResponse::Error(format!("negative multiplicity {d} for {row}")),
            d => rows.push((row, NonZeroU64::new(d as u64).expect("positive"))),
        }
    }
    PeekResponse::Rows(options.finishing.finish(rows))
}

#[allow(clippy::too_many_arguments)]
async fn run_instance(
    mut core: InstanceCore<Timestamp>,
    mut commands: mpsc::UnboundedReceiver<InstanceCommand>,
    wake: Arc<Notify>,
    storage: Arc<dyn StorageCollections>,
    responses: mpsc::UnboundedSender<ComputeControllerResponse>,
    introspection: Option<mpsc::UnboundedSender<IntrospectionUpdates>>,
    config: ComputeInstanceConfig,
    tick_interval_ms: u64,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel::<(ReplicaId, ReplicaEvent<Timestamp>)>();
    // Storage frontier changes, for the core's materialized views (see `InstanceCore::storage_upper`).
    let (frontiers_tx, mut storage_frontiers) = mpsc::unbounded_channel();
    let _watch = AbortOnDrop(tokio::spawn(
        watch_storage_frontiers(storage, frontiers_tx).instrument(tracing::Span::current()),
    ));
    let mut clients: BTreeMap<ReplicaId, ReplicaClient<Timestamp>> = BTreeMap::new();
    let mut peek_results: BTreeMap<PeekId, Reply<PeekResponse>> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(tick_interval_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut ticked = false;
        tokio::select! {
            biased;
            command = commands.recv() => {
                let Some(command) = command else { break };
                core.advance_clock(wallclock_ms());
                match command {
                    InstanceCommand::AddReplica { replica, addresses, reply } => {
                        let result = core.add_replica(replica).map(|history| {
                            let mut client_config = ReplicaClientConfig::new(replica, addresses);
                            client_config.core = ReplicaCoreConfig {
                                replica_id: replica,
                                processes: client_config.core.processes,
                                backoff: config.replica_backoff,
                                hydration_concurrency: config.hydration_concurrency,
                            };
                            clients.insert(replica, ReplicaClient::spawn(client_config, history, events_tx.clone()));
                        });
                        let _ = reply.send(result);
                    }
                    InstanceCommand::DropReplica { replica, reply } => {
                        let result = core.drop_replica(replica);
                        if let Some(client) = clients.remove(&replica) {
                            client.shutdown().await;
                        }
                        let _ = reply.send(result);
                    }
                    InstanceCommand::CreateDataflow { desc, holds, target_uppers, reply } => {
                        for (target, upper) in target_uppers {
                            core.storage_upper(target, upper);
                        }
                        let _ = reply.send(core.create_dataflow(desc, holds));
                    }
                    InstanceCommand::DropCollections { ids, reply } => {
                        let _ = reply.send(core.drop_collections(&ids));
                    }
                    InstanceCommand::SetReadPolicy { policies, reply } => {
                        let _ = reply.send(core.set_read_policy(policies));
                    }
                    InstanceCommand::Peek { prepared, result } => {
                        peek_results.insert(prepared.uuid(), result);
                        core.install_peek(prepared);
                    }
                    InstanceCommand::CancelPeek { uuid, reply } => {
                        let _ = reply.send(core.cancel_peek(uuid));
                    }
                    InstanceCommand::AllowWrites { reply } => {
                        core.allow_writes();
                        let _ = reply.send(());
                    }
                    InstanceCommand::Inspect(f) => f(&core),
                }
            }
            Some((replica, event)) = events.recv() => {
                core.advance_clock(wallclock_ms());
                core.handle_replica_event(replica, event);
            }
            Some((id, frontiers)) = storage_frontiers.recv() => match frontiers {
                Some(frontiers) => core.storage_upper(id, frontiers.upper),
                None => core.storage_collection_dropped(id),
            },
            _ = wake.notified() => core.process_holds(),
            _ = tick.tick() => {
                core.tick(wallclock_ms());
                ticked = true;
            }
        }
        while let Some(output) = core.poll() {
            match output {
                InstanceOutput::Command { replica, command } => {
                    if let Some(client) = clients.get(&replica)
                        && client.send(command).is_err()
                    {
                        error!(%replica, "replica client task ended");
                    }
                }
                InstanceOutput::DisconnectReplica { replica, reason } => {
                    if let Some(client) = clients.get(&replica) {
                        let _ = client.disconnect(reason);
                    }
                }
                InstanceOutput::Response(response) => {
                    let _ = responses.send(response);
                }
                InstanceOutput::PeekResult { uuid, response } => {
                    if let Some(tx) = peek_results.remove(&uuid) {
                        let _ = tx.send(response);
                    } else {
                        debug!(%uuid, "peek result without a waiting caller");
                    }
                }
            }
        }
        // Once per tick, not per event: waking the writer task for every peek's histogram update would
        // put a third task on every peek's path (measured: 7–10 µs of its p50).
        if ticked {
            flush_introspection(&mut core, introspection.as_ref());
        }
    }
    flush_introspection(&mut core, introspection.as_ref());
}

/// Hands the introspection updates the core accumulated to the writer task (or drops them when
/// introspection is off).
fn flush_introspection(
    core: &mut InstanceCore<Timestamp>,
    introspection: Option<&mpsc::UnboundedSender<IntrospectionUpdates>>,
) {
    let updates = core.drain_introspection();
    if let Some(tx) = introspection
        && !updates.is_empty()
    {
        let _ = tx.send(updates);
    }
}

/// One introspection collection as its writer sees it.
#[derive(Debug, Default)]
struct IntrospectionTarget {
    /// The collection's upper as last written or read; `None`: unknown (at start, or after someone else
    /// wrote), so the collection is reconciled before the next append.
    upper: Option<Antichain<u64>>,
    /// The rows the controller wants there: every update received so far, consolidated.
    desired: BTreeMap<Row, Diff>,
    /// What the next append writes.
    pending: Vec<(Row, Diff)>,
}

impl IntrospectionTarget {
    fn receive(&mut self, row: Row, diff: Diff) {
        let count = self.desired.entry(row.clone()).or_insert(0);
        *count += diff;
        if *count == 0 {
            self.desired.remove(&row);
        }
        self.pending.push((row, diff));
    }

    /// Learns the upper of collection `id` and sets the pending updates to what turns its current contents
    /// into the desired rows: rows another writer (an earlier controller) left there are retracted.
    async fn reconcile(&mut self, storage: &dyn StorageCollections, id: GlobalId) -> Result<(), String> {
        let upper = storage.frontiers(id).await.map_err(|e| e.to_string())?.upper;
        let mut correction = self.desired.clone();
        if let Some(time) = upper.as_option().and_then(|t| t.checked_sub(1)) {
            for (row, diff) in storage.snapshot(id, time).await.map_err(|e| e.to_string())? {
                *correction.entry(row).or_insert(0) -= diff;
            }
        }
        self.pending = correction.into_iter().filter(|(_, diff)| *diff != 0).collect();
        self.upper = Some(upper);
        Ok(())
    }
}

/// Aborts a task when dropped: the instance task's helpers end with it (also when it is aborted).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends every storage frontier change to `tx` (first the current frontiers of every collection), for as
/// long as `tx`'s receiver lives. A watch that fails or ends (a storage server restart, say) is
/// re-established after a backoff, which doubles up to two seconds and resets once a watch delivers; the
/// new watch starts again from every collection's current frontiers, which the core dedups.
async fn watch_storage_frontiers(
    storage: Arc<dyn StorageCollections>,
    tx: mpsc::UnboundedSender<(GlobalId, Option<storage::CollectionFrontiers>)>,
) {
    const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
    const MAX_BACKOFF: Duration = Duration::from_secs(2);
    let mut backoff = INITIAL_BACKOFF;
    loop {
        match storage.watch_frontiers().await {
            Ok(mut watch) => loop {
                match watch.next().await {
                    Ok(change) => {
                        backoff = INITIAL_BACKOFF;
                        if tx.send(change).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, ?backoff, "storage frontier watch ended; re-establishing it");
                        break;
                    }
                }
            },
            Err(e) => warn!(error = %e, ?backoff, "cannot watch storage frontiers; retrying"),
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Appends introspection updates to their storage collections every `interval`, at the wall-clock time,
/// advancing every introspection collection's upper even when nothing changed.
///
/// The controller owns these collections: before its first append to one (and again after an append
/// finds that someone else wrote to it), the writer reads the collection's contents and writes the
/// difference to the rows it wants, so rows an earlier controller left behind are retracted. A collection
/// whose upper or contents cannot be read is skipped for that round and keeps its pending updates.
async fn write_introspection(
    storage: Arc<dyn StorageCollections>,
    mut rx: mpsc::UnboundedReceiver<IntrospectionUpdates>,
    interval: Duration,
) {
    let mut targets: BTreeMap<IntrospectionKind, IntrospectionTarget> =
        IntrospectionKind::ALL.iter().map(|kind| (*kind, IntrospectionTarget::default())).collect();
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            batch = rx.recv() => match batch {
                Some(batch) => {
                    for (kind, row, diff) in batch {
                        targets.get_mut(&kind).expect("every kind has a target").receive(row, diff);
                    }
                }
                None => return,
            },
            _ = ticker.tick() => {
                for (kind, target) in &mut targets {
                    let id = kind.default_id();
                    if target.upper.is_none()
                        && let Err(error) = target.reconcile(&*storage, id).await
                    {
                        warn!(%id, %error, "introspection collection unavailable");
                    }
                }
                let now = wallclock_ms();
                let time = targets
                    .values()
                    .filter_map(|t| t.upper.as_ref()?.as_option().copied())
                    .max()
                    .unwrap_or(0)
                    .max(now);
                // Only collections with a known, open upper are written; the others keep their updates.
                let written: Vec<IntrospectionKind> = targets
                    .iter()
                    .filter(|(_, t)| {
                        let at = Antichain::from_elem(time);
                        t.upper.as_ref().is_some_and(|u| PartialOrder::less_equal(u, &at))
                    })
                    .map(|(kind, _)| *kind)
                    .collect();
                if written.is_empty() {
                    continue;
                }
                let requests: Vec<AppendRequest> = written
                    .iter()
                    .map(|kind| {
                        let target = &targets[kind];
                        AppendRequest {
                            id: kind.default_id(),
                            updates: target
                                .pending
                                .iter()
                                .map(|(row, diff)| (row.clone(), time, *diff))
                                .collect(),
                            expected_upper: target.upper.clone().expect("filtered"),
                            new_upper: Antichain::from_elem(time + 1),
                        }
                    })
                    .collect();
                match storage.append(requests).await {
                    Ok(()) => {
                        for kind in written {
                            let target = targets.get_mut(&kind).expect("listed");
                            target.pending.clear();
                            target.upper = Some(Antichain::from_elem(time + 1));
                        }
                    }
                    Err(AppendError::UpperMismatch { id, .. }) => {
                        // Someone else wrote: reconcile that collection with what is there now.
                        warn!(%id, "introspection collection written by someone else; reconciling");
                        for (kind, target) in &mut targets {
                            if kind.default_id() == id {
                                target.upper = None;
                            }
                        }
                    }
                    Err(e) => warn!(error = %e, "introspection append failed; retrying"),
                }
            }
        }
    }
}
