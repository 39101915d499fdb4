//! The errors of the async `ComputeController` API that only its shell produces: a missing or existing
//! instance, replicas that cannot be started, dataflows without a valid as-of or with a bad or sealed
//! materialized view target, commands over the instance's limit, storage peeks' refused options and the
//! ways a peek ends without rows that only the shell decides (a storage peek's timeout, cancellation and
//! storage failure, an instance dropped under a pending peek), and a failing storage layer.
//! (`errors.rs` covers the variants the instance core produces.)
//!
//! Each test asserts the exact variant, then that the failed call changed nothing: the instance keeps its
//! replicas and collections with the same frontiers, and no storage read hold was left behind. Every table
//! here follows its upper (read policy lag 0), so only a hold keeps its since back: [`assert_unheld`]
//! advances a table and waits for its since to follow. Storage failures come from [`FlakyStorage`], which
//! fails chosen calls of an `InProcess` store on demand; orchestrator failures from
//! [`ScriptedOrchestrator`]. Waits poll with a bounded number of short sleeps.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use compute::ReplicaHandle;
use controller::{
    AsOfSelectionError, CancelPeekError, CollectionDropError, CollectionLookupError, CollectionMissing,
    CollectionStatusError, ComputeController, DataflowCreationError, InstanceCreationError,
    InstanceDropError, InstanceMissing, Orchestrator, PeekError, PeekFailure, PeekOptions, PeekResult,
    ReadPolicyError, ReplicaCreationError, ReplicaDropError, ReplicaLocation, ReplicaSpec,
};
use frontiers::{Antichain, ReadPolicy};
use protocol::{
    ColumnType, Diff, GlobalId, InstanceId, PeekId, PeekTarget, Plan, RelationDesc, ReplicaId, Row,
    ScalarType, SinkConnection, SourceImport,
};
use storage::{
    AppendError, AppendRequest, BoxFuture, CreateError, DropError, FrontierWatch, HoldError, InProcess,
    Listen, ReadError, StorageCollections, StorageReadHold, StoreConfig,
};

use crate::harness::{
    SteppedTable as Table, any_port, controller_config, desc, eventually, f, index_on_storage, kv, lag,
    no_as_of, sink_on_storage, start_replica, u,
};

const INSTANCE: InstanceId = InstanceId(1);
/// An instance that never existed.
const NEVER_CREATED: InstanceId = InstanceId(9);
const R1: ReplicaId = ReplicaId(1);

async fn wait_for_since(storage: &InProcess, id: GlobalId, since: Antichain<u64>) {
    eventually(&format!("the since of {id} reaches {since:?}"), async || {
        let current = storage.frontiers(id).await.map_err(|e| e.to_string())?.since;
        if current == since { Ok(()) } else { Err(format!("since {current:?}")) }
    })
    .await;
}

/// Advances `table` by one time and waits until its since follows the upper: only a read hold could keep
/// it back, so no earlier (failed) call left one on it.
async fn assert_unheld(storage: &InProcess, table: &mut Table) {
    table.advance_to(storage, table.upper + 1).await;
    wait_for_since(storage, table.id, f(table.upper)).await;
}

/// A controller on `storage` with the instance `INSTANCE`.
async fn controller_on(
    storage: Arc<dyn StorageCollections>,
    orchestrator: Option<Arc<dyn Orchestrator>>,
) -> ComputeController {
    let mut controller =
        ComputeController::new(storage, orchestrator, controller_config(false)).await.expect("controller");
    controller.create_instance(INSTANCE, controller.default_instance_config()).expect("instance");
    controller
}

/// Stops a replica without blocking the runtime's thread.
async fn stop(replica: ReplicaHandle) {
    tokio::task::spawn_blocking(move || replica.shutdown()).await.expect("replica shutdown");
}

fn at(replica: &ReplicaHandle) -> ReplicaLocation {
    ReplicaLocation::Unmanaged { addresses: vec![replica.local_addr().to_string()] }
}

async fn replica_ids(controller: &ComputeController) -> Vec<ReplicaId> {
    controller.inspect(INSTANCE, |core| core.replica_ids().collect()).await.expect("instance")
}

async fn collection_count(controller: &ComputeController) -> usize {
    controller.inspect(INSTANCE, |core| core.collection_count()).await.expect("instance")
}

fn rows_of(result: PeekResult) -> BTreeMap<Row, u64> {
    match result {
        Ok(rows) => rows.into_iter().map(|(row, count)| (row, count.get())).collect(),
        other => panic!("peek did not return rows: {other:?}"),
    }
}

// -------------------------------------------------------------------------------------------------
// Instances

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_an_instance_that_exists_fails_with_instance_exists_and_the_running_instance_carries_on() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let mut table = Table::create(&storage, u(1)).await;
    table.advance_to(&storage, 5).await;
    let replica = start_replica(&storage, any_port());
    let mut controller = controller_on(Arc::clone(&storage) as _, None).await;
    controller.add_replica(INSTANCE, R1, at(&replica)).await.expect("add replica");
    let index = u(11);
    controller
        .create_dataflow(INSTANCE, no_as_of(index_on_storage(table.id, index, 0)))
        .await
        .expect("index");

    assert_eq!(
        controller.create_instance(INSTANCE, controller.default_instance_config()),
        Err(InstanceCreationError::InstanceExists(INSTANCE))
    );

    // The instance was not replaced: same replica and collection, and it keeps following its input.
    assert_eq!(replica_ids(&controller).await, vec![R1]);
    assert_eq!(collection_count(&controller).await, 1);
    table.advance_to(&storage, 10).await;
    eventually("the index follows the table to 10", async || {
        let upper = controller.collection_frontiers(INSTANCE, index).map_err(|e| e.to_string())?.upper;
        if upper == f(10) { Ok(()) } else { Err(format!("upper {upper:?}")) }
    })
    .await;
    let peek = controller
        .peek(INSTANCE, PeekTarget::Index { id: index }, 9, PeekOptions::default())
        .await
        .expect("peek");
    assert_eq!(rows_of(peek.result().await), table.contents_at(9));

    drop(controller);
    stop(replica).await;
}

/// Every operation on `id`, which names no instance, and the exact error each returns. `index` is a live
/// collection of `INSTANCE` and `table` a storage collection: neither may be touched.
async fn assert_every_operation_fails_with_instance_missing(
    controller: &mut ComputeController,
    id: InstanceId,
    index: GlobalId,
    table: GlobalId,
) {
    let missing = InstanceMissing(id);
    assert_eq!(controller.drop_instance(id).await, Err(InstanceDropError::InstanceMissing(missing.clone())));
    for location in [
        ReplicaLocation::Unmanaged { addresses: vec!["127.0.0.1:1".to_string()] },
        ReplicaLocation::Managed { workers: 1, processes: 1 },
    ] {
        assert_eq!(
            controller.add_replica(id, R1, location).await,
            Err(ReplicaCreationError::InstanceMissing(missing.clone()))
        );
    }
    assert_eq!(
        controller.drop_replica(id, R1).await,
        Err(ReplicaDropError::InstanceMissing(missing.clone()))
    );
    let with_as_of = index_on_storage(table, u(20), 0);
    for df in [with_as_of.clone(), no_as_of(with_as_of)] {
        assert_eq!(
            controller.select_as_of(id, &df).await,
            Err(DataflowCreationError::InstanceMissing(missing.clone()))
        );
        assert_eq!(
            controller.create_dataflow(id, df).await,
            Err(DataflowCreationError::InstanceMissing(missing.clone()))
        );
    }
    assert_eq!(
        controller.drop_collections(id, vec![index]).await,
        Err(CollectionDropError::InstanceMissing(missing.clone()))
    );
    assert_eq!(
        controller.set_read_policy(id, vec![(index, lag(5))]).await,
        Err(ReadPolicyError::InstanceMissing(missing.clone()))
    );
    // A storage collection is not looked up in storage on behalf of a missing instance.
    for target in [index, table] {
        assert_eq!(
            controller.acquire_read_hold(id, target).await.err(),
            Some(CollectionLookupError::InstanceMissing(missing.clone()))
        );
    }
    assert_eq!(
        controller.collection_frontiers(id, index),
        Err(CollectionLookupError::InstanceMissing(missing.clone()))
    );
    for target in [PeekTarget::Index { id: index }, PeekTarget::Storage { id: table }] {
        assert_eq!(
            controller.peek(id, target, 0, PeekOptions::default()).await.err(),
            Some(PeekError::InstanceMissing(missing.clone()))
        );
    }
    assert_eq!(
        controller.cancel_peek(id, PeekId(1)).await,
        Err(CancelPeekError::InstanceMissing(missing.clone()))
    );
    assert_eq!(controller.allow_writes(id).await, Err(missing.clone()));
    assert_eq!(
        controller.hydration_status(id, index).await,
        Err(CollectionStatusError::InstanceMissing(missing.clone()))
    );
    assert_eq!(
        controller.wallclock_lag(id, index).await,
        Err(CollectionStatusError::InstanceMissing(missing.clone()))
    );
    assert_eq!(controller.replica_statuses(id).await, Err(missing.clone()));
    assert_eq!(controller.inspect(id, |core| core.collection_count()).await, Err(missing));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_on_a_missing_instance_fails_with_instance_missing_and_changes_nothing() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let mut indexed = Table::create(&storage, u(1)).await;
    indexed.advance_to(&storage, 5).await;
    // Only the failed calls (and the instance dropped below) ever name this one.
    let mut untouched = Table::create(&storage, u(2)).await;
    untouched.advance_to(&storage, 5).await;
    let orchestrator = Arc::new(ScriptedOrchestrator::new(Err("must not be asked".to_string())));
    let mut controller = controller_on(Arc::clone(&storage) as _, Some(Arc::clone(&orchestrator) as _)).await;
    let index = u(11);
    controller
        .create_dataflow(INSTANCE, no_as_of(index_on_storage(indexed.id, index, 0)))
        .await
        .expect("index");
    let frontiers = controller.collection_frontiers(INSTANCE, index).expect("live index");

    assert_every_operation_fails_with_instance_missing(&mut controller, NEVER_CREATED, index, untouched.id)
        .await;
    // An instance that existed, with a dataflow holding `untouched`, and was dropped.
    let dropped = InstanceId(2);
    controller.create_instance(dropped, controller.default_instance_config()).expect("second instance");
    controller
        .create_dataflow(dropped, no_as_of(index_on_storage(untouched.id, u(12), 0)))
        .await
        .expect("index on the second instance");
    controller.drop_instance(dropped).await.expect("drop the second instance");
    assert_every_operation_fails_with_instance_missing(&mut controller, dropped, index, untouched.id).await;

    // Nothing changed: the live instance has its index at the same frontiers, the orchestrator was never
    // asked to start or stop anything, and no hold is left on the table the failed calls named.
    assert_eq!(controller.collection_frontiers(INSTANCE, index), Ok(frontiers));
    assert_eq!(collection_count(&controller).await, 1);
    assert_eq!(orchestrator.calls(), (Vec::new(), Vec::new()));
    assert_unheld(&storage, &mut untouched).await;
}

// -------------------------------------------------------------------------------------------------
// Replicas

/// An orchestrator that answers every `ensure_replica` with `answer` (starting nothing) and records what
/// it was asked.
#[derive(Debug)]
struct ScriptedOrchestrator {
    answer: Result<Vec<String>, String>,
    ensured: Mutex<Vec<ReplicaSpec>>,
    dropped: Mutex<Vec<(InstanceId, ReplicaId)>>,
}

impl ScriptedOrchestrator {
    fn new(answer: Result<Vec<String>, String>) -> Self {
        ScriptedOrchestrator { answer, ensured: Mutex::default(), dropped: Mutex::default() }
    }

    /// The specs it was asked to ensure and the replicas it was asked to drop.
    fn calls(&self) -> (Vec<ReplicaSpec>, Vec<(InstanceId, ReplicaId)>) {
        (self.ensured.lock().expect("test lock").clone(), self.dropped.lock().expect("test lock").clone())
    }
}

impl Orchestrator for ScriptedOrchestrator {
    fn ensure_replica(&self, spec: ReplicaSpec) -> BoxFuture<'_, Result<Vec<String>, String>> {
        self.ensured.lock().expect("test lock").push(spec);
        Box::pin(std::future::ready(self.answer.clone()))
    }

    fn drop_replica(&self, instance: InstanceId, replica: ReplicaId) -> BoxFuture<'_, Result<(), String>> {
        self.dropped.lock().expect("test lock").push((instance, replica));
        Box::pin(std::future::ready(Err(format!("replica {replica} of instance {instance} is not running"))))
    }
}

/// The instance has no replica `R1`: it is not listed, dropping it fails, and (with `replica`) the id is
/// free for a replica that does start.
async fn assert_replica_not_added(controller: &mut ComputeController, replica: &ReplicaHandle) {
    assert_eq!(replica_ids(controller).await, Vec::new());
    assert_eq!(controller.drop_replica(INSTANCE, R1).await, Err(ReplicaDropError::ReplicaMissing(R1)));
    controller.add_replica(INSTANCE, R1, at(replica)).await.expect("the id is free");
    assert_eq!(replica_ids(controller).await, vec![R1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_location_with_no_processes_fails_with_no_processes_and_adds_no_replica() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let replica = start_replica(&storage, any_port());

    // Unmanaged, with no address.
    let mut controller = controller_on(Arc::clone(&storage) as _, None).await;
    let empty = ReplicaLocation::Unmanaged { addresses: Vec::new() };
    assert_eq!(controller.add_replica(INSTANCE, R1, empty).await, Err(ReplicaCreationError::NoProcesses(R1)));
    assert_replica_not_added(&mut controller, &replica).await;
    drop(controller);

    // Managed, asking for zero processes: refused before the orchestrator is asked.
    let orchestrator = Arc::new(ScriptedOrchestrator::new(Ok(Vec::new())));
    let mut controller = controller_on(Arc::clone(&storage) as _, Some(Arc::clone(&orchestrator) as _)).await;
    let none = ReplicaLocation::Managed { workers: 1, processes: 0 };
    assert_eq!(controller.add_replica(INSTANCE, R1, none).await, Err(ReplicaCreationError::NoProcesses(R1)));
    assert_eq!(orchestrator.calls(), (Vec::new(), Vec::new()));
    // Managed, with an orchestrator that starts the replica but reports no address: what it started is
    // stopped again.
    let one = ReplicaLocation::Managed { workers: 1, processes: 1 };
    assert_eq!(controller.add_replica(INSTANCE, R1, one).await, Err(ReplicaCreationError::NoProcesses(R1)));
    let spec = ReplicaSpec { instance: INSTANCE, replica: R1, workers: 1, processes: 1 };
    assert_eq!(orchestrator.calls(), (vec![spec], vec![(INSTANCE, R1)]));
    assert_replica_not_added(&mut controller, &replica).await;

    drop(controller);
    stop(replica).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_replica_the_orchestrator_cannot_start_fails_with_orchestrator_and_adds_no_replica() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let replica = start_replica(&storage, any_port());
    let managed = ReplicaLocation::Managed { workers: 1, processes: 1 };

    // A controller without an orchestrator cannot start anything.
    let mut controller = controller_on(Arc::clone(&storage) as _, None).await;
    assert_eq!(
        controller.add_replica(INSTANCE, R1, managed.clone()).await,
        Err(ReplicaCreationError::Orchestrator {
            replica: R1,
            reason: "the controller has no orchestrator".to_string()
        })
    );
    assert_replica_not_added(&mut controller, &replica).await;
    drop(controller);

    // An orchestrator that fails; asking again asks it again (the failed replica was not recorded).
    let orchestrator = Arc::new(ScriptedOrchestrator::new(Err("no capacity left".to_string())));
    let mut controller = controller_on(Arc::clone(&storage) as _, Some(Arc::clone(&orchestrator) as _)).await;
    let failed =
        Err(ReplicaCreationError::Orchestrator { replica: R1, reason: "no capacity left".to_string() });
    assert_eq!(controller.add_replica(INSTANCE, R1, managed.clone()).await, failed);
    assert_eq!(controller.add_replica(INSTANCE, R1, managed).await, failed);
    let spec = ReplicaSpec { instance: INSTANCE, replica: R1, workers: 1, processes: 1 };
    assert_eq!(orchestrator.calls(), (vec![spec.clone(), spec], Vec::new()));
    assert_replica_not_added(&mut controller, &replica).await;

    drop(controller);
    stop(replica).await;
}

// -------------------------------------------------------------------------------------------------
// Dataflows

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_materialized_view_into_a_missing_or_differently_shaped_target_fails_with_bad_sink_target() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let mut input = Table::create(&storage, u(1)).await;
    input.advance_to(&storage, 5).await;
    let (missing, misshapen, good) = (u(2), u(3), u(4));
    let one_column = RelationDesc::new([("k", ColumnType::new(ScalarType::Int64, false))]);
    storage.create_collection(misshapen, one_column.clone()).await.expect("misshapen target");
    let controller = controller_on(Arc::clone(&storage) as _, None).await;
    let (input_id, view) = (input.id, u(11));
    let into = |target| sink_on_storage(input_id, view, SinkConnection::MaterializedView { target }, 4);

    for (target, reason) in [(missing, "does not exist"), (misshapen, "has a different schema")] {
        let expected =
            Err(DataflowCreationError::BadSinkTarget { id: view, target, reason: reason.to_string() });
        assert_eq!(controller.create_dataflow(INSTANCE, into(target)).await, expected, "with an as-of");
        assert_eq!(controller.create_dataflow(INSTANCE, no_as_of(into(target))).await, expected);
    }

    // Nothing changed: no collection, the targets as they were, and no hold on the input.
    assert_eq!(
        controller.collection_frontiers(INSTANCE, view),
        Err(CollectionLookupError::CollectionMissing(CollectionMissing(view)))
    );
    assert_eq!(collection_count(&controller).await, 0);
    assert_eq!(storage.frontiers(missing).await, Err(ReadError::CollectionMissing(missing)));
    let collections = storage.list_collections().await.expect("collections");
    assert!(collections.contains(&(misshapen, one_column)), "{collections:?}");
    assert_eq!(storage.frontiers(misshapen).await.expect("misshapen target").upper, f(0));
    assert_unheld(&storage, &mut input).await;

    // A target of the right shape is accepted under the same id.
    storage.create_collection(good, desc()).await.expect("good target");
    controller.create_dataflow(INSTANCE, no_as_of(into(good))).await.expect("view into the good target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataflow_no_as_of_can_satisfy_fails_with_no_valid_as_of_naming_the_constraint_and_takes_no_hold() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let controller = controller_on(Arc::clone(&storage) as _, None).await;

    // An import that is closed and so, under its lagging policy, fully compacted.
    let mut closed = Table::create(&storage, u(1)).await;
    closed.advance_to(&storage, 3).await;
    let close = AppendRequest {
        id: closed.id,
        updates: Vec::new(),
        expected_upper: f(3),
        new_upper: Antichain::new(),
    };
    storage.append(vec![close]).await.expect("close the table");
    wait_for_since(&storage, closed.id, Antichain::new()).await;
    let on_closed = no_as_of(index_on_storage(closed.id, u(11), 0));
    let compacted = AsOfSelectionError::ImportCompacted(closed.id);

    // A materialized view whose target holds data up to 5 while its input is compacted to 10.
    let mut input = Table::create(&storage, u(2)).await;
    input.advance_to(&storage, 10).await;
    wait_for_since(&storage, input.id, f(10)).await;
    let mut target = Table::create(&storage, u(3)).await;
    target.advance_to(&storage, 5).await;
    let view = u(12);
    let connection = SinkConnection::MaterializedView { target: target.id };
    let ahead_of_input = no_as_of(sink_on_storage(input.id, view, connection, 0));
    let ahead = AsOfSelectionError::TargetAhead {
        target: target.id,
        upper: "[5]".to_string(),
        since: "[10]".to_string(),
    };

    // A dataflow that must stop at 5 over an input readable from 0 to 9: the freshest as-of is 9.
    let mut held = Table::create(&storage, u(4)).await;
    let hold = storage.acquire_read_hold(held.id, f(0)).await.expect("hold at 0");
    held.advance_to(&storage, 10).await;
    let mut until_5 = no_as_of(index_on_storage(held.id, u(13), 0));
    until_5.until = f(5);
    let beyond = AsOfSelectionError::BeyondUntil { as_of: "[9]".to_string(), until: "[5]".to_string() };

    for (df, cause) in [(on_closed, compacted), (ahead_of_input, ahead), (until_5.clone(), beyond)] {
        let expected = Err(DataflowCreationError::NoValidAsOf {
            name: df.debug_name.clone(),
            reason: cause.to_string(),
        });
        assert_eq!(controller.select_as_of(INSTANCE, &df).await, expected);
        assert_eq!(controller.create_dataflow(INSTANCE, df).await, expected);
    }

    // Nothing changed: no collection, the target as it was, no hold left on any input.
    for id in [u(11), view, u(13)] {
        assert_eq!(
            controller.collection_frontiers(INSTANCE, id),
            Err(CollectionLookupError::CollectionMissing(CollectionMissing(id)))
        );
    }
    assert_eq!(collection_count(&controller).await, 0);
    assert_eq!(storage.frontiers(target.id).await.expect("target").upper, f(5));
    drop(hold);
    for table in [&mut input, &mut target, &mut held] {
        assert_unheld(&storage, table).await;
    }

    // With room before its until, the same dataflow is created.
    until_5.until = f(100);
    let as_of = controller.create_dataflow(INSTANCE, until_5).await.expect("a valid as-of exists now");
    assert_eq!(as_of, f(held.upper));
}

// -------------------------------------------------------------------------------------------------
// Lookups and storage failures

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn looking_up_a_collection_neither_the_instance_nor_storage_has_fails_with_collection_missing() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let mut table = Table::create(&storage, u(1)).await;
    table.advance_to(&storage, 5).await;
    // Settled, so that the indexes' as-ofs (and holds) are at 5 too.
    wait_for_since(&storage, table.id, f(5)).await;
    let controller = controller_on(Arc::clone(&storage) as _, None).await;
    let (index, dropped, unknown) = (u(11), u(12), u(99));
    for id in [index, dropped] {
        controller
            .create_dataflow(INSTANCE, no_as_of(index_on_storage(table.id, id, 0)))
            .await
            .expect("index");
    }
    controller.drop_collections(INSTANCE, vec![dropped]).await.expect("drop");
    let frontiers = controller.collection_frontiers(INSTANCE, index).expect("live index");

    for id in [unknown, dropped] {
        let missing = CollectionLookupError::CollectionMissing(CollectionMissing(id));
        assert_eq!(controller.acquire_read_hold(INSTANCE, id).await.err(), Some(missing.clone()));
        assert_eq!(controller.collection_frontiers(INSTANCE, id), Err(missing));
    }
    // Hydration and lag are per replica: compute collections only, live ones.
    for id in [unknown, dropped, table.id] {
        let missing = CollectionStatusError::CollectionMissing(CollectionMissing(id));
        assert_eq!(controller.hydration_status(INSTANCE, id).await, Err(missing.clone()));
        assert_eq!(controller.wallclock_lag(INSTANCE, id).await, Err(missing));
    }
    assert_eq!(controller.hydration_status(INSTANCE, index).await, Ok(Vec::new()), "no replicas");
    // `collection_frontiers` knows compute collections only; `acquire_read_hold` falls back to storage.
    assert_eq!(
        controller.collection_frontiers(INSTANCE, table.id),
        Err(CollectionLookupError::CollectionMissing(CollectionMissing(table.id)))
    );
    let hold = controller.acquire_read_hold(INSTANCE, table.id).await.expect("storage hold");
    assert_eq!(hold.since(), &f(5));
    // The storage-peek path maps storage's errors too.
    assert_eq!(
        controller.peek(INSTANCE, PeekTarget::Storage { id: unknown }, 5, PeekOptions::default()).await.err(),
        Some(PeekError::CollectionMissing(CollectionMissing(unknown)))
    );
    assert_eq!(
        controller
            .peek(INSTANCE, PeekTarget::Storage { id: table.id }, 4, PeekOptions::default())
            .await
            .err(),
        Some(PeekError::SinceViolation { id: table.id, since: f(5), timestamp: 4 })
    );

    // Nothing changed: the live index is as it was.
    assert_eq!(controller.collection_frontiers(INSTANCE, index), Ok(frontiers));
    assert_eq!(collection_count(&controller).await, 1);
}

/// A storage call that [`FlakyStorage`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    ListCollections,
    Frontiers(GlobalId),
    AcquireReadHold(GlobalId),
    Snapshot(GlobalId),
}

/// An `InProcess` store whose chosen calls fail with `Disconnected` while their fault is set.
#[derive(Debug)]
struct FlakyStorage {
    inner: Arc<InProcess>,
    faults: Mutex<BTreeSet<Fault>>,
}

impl FlakyStorage {
    fn set(&self, faults: &[Fault]) {
        *self.faults.lock().expect("test lock") = faults.iter().copied().collect();
    }

    fn fails(&self, fault: Fault) -> bool {
        self.faults.lock().expect("test lock").contains(&fault)
    }
}

impl StorageCollections for FlakyStorage {
    fn create_collection(&self, id: GlobalId, desc: RelationDesc) -> BoxFuture<'_, Result<(), CreateError>> {
        self.inner.create_collection(id, desc)
    }
    fn drop_collection(&self, id: GlobalId) -> BoxFuture<'_, Result<(), DropError>> {
        self.inner.drop_collection(id)
    }
    fn list_collections(&self) -> BoxFuture<'_, Result<Vec<(GlobalId, RelationDesc)>, ReadError>> {
        if self.fails(Fault::ListCollections) {
            return Box::pin(std::future::ready(Err(ReadError::Disconnected)));
        }
        self.inner.list_collections()
    }
    fn frontiers(&self, id: GlobalId) -> BoxFuture<'_, Result<storage::CollectionFrontiers, ReadError>> {
        if self.fails(Fault::Frontiers(id)) {
            return Box::pin(std::future::ready(Err(ReadError::Disconnected)));
        }
        self.inner.frontiers(id)
    }
    fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'_, Result<(), AppendError>> {
        self.inner.append(requests)
    }
    fn acquire_read_hold(
        &self,
        id: GlobalId,
        frontier: Antichain<u64>,
    ) -> BoxFuture<'_, Result<StorageReadHold, HoldError>> {
        if self.fails(Fault::AcquireReadHold(id)) {
            return Box::pin(std::future::ready(Err(HoldError::Disconnected)));
        }
        self.inner.acquire_read_hold(id, frontier)
    }
    fn set_read_policy(&self, id: GlobalId, policy: ReadPolicy<u64>) -> BoxFuture<'_, Result<(), HoldError>> {
        self.inner.set_read_policy(id, policy)
    }
    fn snapshot(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Vec<(Row, Diff)>, ReadError>> {
        if self.fails(Fault::Snapshot(id)) {
            return Box::pin(std::future::ready(Err(ReadError::Disconnected)));
        }
        self.inner.snapshot(id, as_of)
    }
    fn listen(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Listen, ReadError>> {
        self.inner.listen(id, as_of)
    }
    fn watch_frontiers(&self) -> BoxFuture<'_, Result<FrontierWatch, ReadError>> {
        self.inner.watch_frontiers()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_failures_surface_as_storage_errors_and_leave_no_hold_behind() {
    let inner = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let (mut first, mut second) = (Table::create(&inner, u(1)).await, Table::create(&inner, u(2)).await);
    for table in [&mut first, &mut second] {
        table.advance_to(&inner, 5).await;
    }
    let target = u(3);
    inner.create_collection(target, desc()).await.expect("view target");
    let storage = Arc::new(FlakyStorage { inner: Arc::clone(&inner), faults: Mutex::default() });
    let controller = controller_on(Arc::clone(&storage) as _, None).await;

    // A dataflow over both tables: the hold on the first is taken before the one on the second fails.
    let (both, view) = (u(11), u(12));
    let mut over_both = index_on_storage(first.id, both, 5);
    over_both.source_imports.insert(second.id, SourceImport { desc: desc() });
    let view_df = no_as_of(sink_on_storage(first.id, view, SinkConnection::MaterializedView { target }, 0));
    let read = DataflowCreationError::Storage(ReadError::Disconnected.to_string());
    let hold = DataflowCreationError::Storage(HoldError::Disconnected.to_string());
    storage.set(&[Fault::AcquireReadHold(second.id)]);
    assert_eq!(controller.create_dataflow(INSTANCE, over_both.clone()).await, Err(hold));
    storage.set(&[Fault::Frontiers(second.id)]);
    assert_eq!(controller.select_as_of(INSTANCE, &no_as_of(over_both.clone())).await, Err(read.clone()));
    assert_eq!(controller.create_dataflow(INSTANCE, no_as_of(over_both.clone())).await, Err(read.clone()));
    storage.set(&[Fault::ListCollections]);
    assert_eq!(controller.create_dataflow(INSTANCE, view_df.clone()).await, Err(read));

    // Holds and storage peeks.
    storage.set(&[Fault::Frontiers(first.id)]);
    assert_eq!(
        controller.acquire_read_hold(INSTANCE, first.id).await.err(),
        Some(CollectionLookupError::Storage(ReadError::Disconnected.to_string()))
    );
    storage.set(&[Fault::AcquireReadHold(first.id)]);
    assert_eq!(
        controller.acquire_read_hold(INSTANCE, first.id).await.err(),
        Some(CollectionLookupError::Storage(HoldError::Disconnected.to_string()))
    );
    assert_eq!(
        controller
            .peek(INSTANCE, PeekTarget::Storage { id: first.id }, 4, PeekOptions::default())
            .await
            .err(),
        Some(PeekError::Storage(HoldError::Disconnected.to_string()))
    );
    // A storage peek whose snapshot fails ends with a storage failure and lets go of its hold.
    storage.set(&[Fault::Snapshot(first.id)]);
    let peek = controller
        .peek(INSTANCE, PeekTarget::Storage { id: first.id }, first.upper, PeekOptions::default())
        .await
        .expect("the hold is taken");
    assert_eq!(peek.result().await, Err(PeekFailure::Storage(ReadError::Disconnected.to_string())));

    // Nothing changed: no collection, and no hold left on either table (the first's was released).
    storage.set(&[]);
    assert_eq!(collection_count(&controller).await, 0);
    for table in [&mut first, &mut second] {
        assert_unheld(&inner, table).await;
    }

    // With storage healthy again, the same calls succeed.
    let hold = controller.acquire_read_hold(INSTANCE, first.id).await.expect("hold");
    assert_eq!(hold.since(), &f(first.upper));
    drop(hold);
    let time = first.upper;
    let peek = controller
        .peek(INSTANCE, PeekTarget::Storage { id: first.id }, time, PeekOptions::default())
        .await
        .expect("storage peek");
    // The peek's snapshot waits for its time to complete.
    first.advance_to(&inner, time + 1).await;
    assert_eq!(rows_of(peek.result().await), first.contents_at(time));
    for df in [no_as_of(over_both), view_df] {
        controller.create_dataflow(INSTANCE, df).await.expect("create dataflow");
    }
    assert_eq!(collection_count(&controller).await, 2);
}

// -------------------------------------------------------------------------------------------------
// Sealed targets, command limits and peeks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_materialized_view_into_a_sealed_target_fails_with_sink_target_sealed_with_or_without_an_as_of() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let mut input = Table::create(&storage, u(1)).await;
    input.advance_to(&storage, 5).await;
    let mut target = Table::create(&storage, u(2)).await;
    target.advance_to(&storage, 3).await;
    let seal = AppendRequest {
        id: target.id,
        updates: Vec::new(),
        expected_upper: f(3),
        new_upper: Antichain::new(),
    };
    storage.append(vec![seal]).await.expect("seal the target");
    let controller = controller_on(Arc::clone(&storage) as _, None).await;
    let view = u(11);
    let df = sink_on_storage(input.id, view, SinkConnection::MaterializedView { target: target.id }, 4);
    let sealed = Err(DataflowCreationError::SinkTargetSealed { id: view, target: target.id });

    assert_eq!(controller.select_as_of(INSTANCE, &no_as_of(df.clone())).await, sealed, "select_as_of");
    assert_eq!(controller.create_dataflow(INSTANCE, no_as_of(df.clone())).await, sealed, "as-of chosen");
    assert_eq!(controller.create_dataflow(INSTANCE, df).await, sealed, "as-of given");

    // Nothing changed: no collection and no hold on the input.
    assert_eq!(collection_count(&controller).await, 0);
    assert_unheld(&storage, &mut input).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_command_limit_exceeds_a_frame_fails_with_command_limit_above_frame_limit() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let mut controller = controller_on(Arc::clone(&storage) as _, None).await;
    let mut config = controller.default_instance_config();
    config.core.max_command_bytes = protocol::frame::DEFAULT_MAX_FRAME_BYTES + 1;
    assert_eq!(
        controller.create_instance(InstanceId(2), config.clone()),
        Err(InstanceCreationError::CommandLimitAboveFrameLimit {
            max_command_bytes: protocol::frame::DEFAULT_MAX_FRAME_BYTES + 1,
            max_frame_bytes: protocol::frame::DEFAULT_MAX_FRAME_BYTES,
        })
    );
    assert_eq!(
        controller.drop_instance(InstanceId(2)).await,
        Err(InstanceDropError::InstanceMissing(InstanceMissing(InstanceId(2)))),
        "not created"
    );
    config.core.max_command_bytes = protocol::frame::DEFAULT_MAX_FRAME_BYTES;
    controller.create_instance(InstanceId(2), config).expect("the frame limit itself is fine");
}

/// An index over `table` whose plan carries `rows` constant rows besides it (a dataflow description that
/// grows with `rows`).
fn index_with_constant(table: GlobalId, index: GlobalId, rows: i64) -> protocol::DataflowDescription<u64> {
    let mut df = no_as_of(index_on_storage(table, index, 0));
    let constant = Plan::Constant {
        rows: (0..rows).map(|i| (kv(i as u64, i as u64), 1)).collect(),
        typ: desc().typ().clone(),
    };
    let build = &mut df.objects_to_build[0];
    build.plan = Plan::Union { inputs: vec![build.plan.clone(), constant] };
    df
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_over_the_instances_limit_fail_with_command_too_large_and_change_nothing() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let mut table = Table::create(&storage, u(1)).await;
    table.advance_to(&storage, 5).await;
    let mut controller = ComputeController::new(Arc::clone(&storage) as _, None, controller_config(false))
        .await
        .expect("controller");
    let mut config = controller.default_instance_config();
    config.core.max_command_bytes = 4 << 10;
    controller.create_instance(INSTANCE, config).expect("instance");
    let index = u(11);
    controller
        .create_dataflow(INSTANCE, index_with_constant(table.id, index, 10))
        .await
        .expect("a small one");
    let since = controller.collection_frontiers(INSTANCE, index).expect("index").since;

    let error = controller.create_dataflow(INSTANCE, index_with_constant(table.id, u(12), 1_000)).await;
    assert!(
        matches!(
            error,
            Err(DataflowCreationError::CommandTooLarge { size_bytes, max_bytes: 4096 }) if size_bytes > 4096
        ),
        "got {error:?}"
    );
    let huge_lookup = PeekOptions {
        literal_constraints: Some((0..1_000).map(|i| Row::pack([protocol::Datum::Int64(i)])).collect()),
        ..Default::default()
    };
    let error = controller
        .peek(
            INSTANCE,
            PeekTarget::Index { id: index },
            since.as_option().copied().expect("open"),
            huge_lookup,
        )
        .await;
    assert!(
        matches!(error, Err(PeekError::CommandTooLarge { size_bytes, max_bytes: 4096 }) if size_bytes > 4096),
        "got {error:?}"
    );

    // Nothing changed: one collection, no peek pending, and no hold on the table beyond the index's.
    assert_eq!(collection_count(&controller).await, 1);
    assert_eq!(controller.inspect(INSTANCE, |core| core.pending_peek_count()).await, Ok(0));
    assert_eq!(
        controller.cancel_peek(INSTANCE, PeekId(1)).await,
        Err(CancelPeekError::PeekUnknown(PeekId(1))),
        "no id used"
    );
    controller.drop_collections(INSTANCE, vec![index]).await.expect("drop the index");
    assert_unheld(&storage, &mut table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_peek_with_literal_constraints_or_a_target_replica_fails_and_takes_no_hold() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let mut table = Table::create(&storage, u(1)).await;
    table.advance_to(&storage, 5).await;
    let controller = controller_on(Arc::clone(&storage) as _, None).await;
    let target = PeekTarget::Storage { id: table.id };
    let lookup = PeekOptions {
        literal_constraints: Some(vec![Row::pack([protocol::Datum::Int64(1)])]),
        ..Default::default()
    };
    assert_eq!(
        controller.peek(INSTANCE, target, 4, lookup).await.err(),
        Some(PeekError::LiteralConstraintsOnStorage(table.id))
    );
    let targeted = PeekOptions { target_replica: Some(R1), ..Default::default() };
    assert_eq!(
        controller.peek(INSTANCE, target, 4, targeted).await.err(),
        Some(PeekError::TargetReplicaOnStorage(table.id))
    );
    assert_unheld(&storage, &mut table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_peek_ends_at_its_timeout_on_cancel_or_with_its_instance_and_lets_go_of_its_hold() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let mut table = Table::create(&storage, u(1)).await;
    table.advance_to(&storage, 5).await;
    let mut controller = controller_on(Arc::clone(&storage) as _, None).await;
    let target = PeekTarget::Storage { id: table.id };
    // Every peek reads a time storage has not reached: its snapshot waits.
    let later = 1_000;

    let timed = PeekOptions { timeout_ms: Some(100), ..Default::default() };
    let peek = controller.peek(INSTANCE, target, later, timed).await.expect("accepted");
    assert_eq!(peek.result().await, Err(PeekFailure::TimedOut { after_ms: 100 }));
    let next = peek_uuid_after(&controller).await;
    assert_eq!(
        controller.cancel_peek(INSTANCE, next).await,
        Err(CancelPeekError::PeekUnknown(next)),
        "an id not issued yet"
    );

    let peek = controller.peek(INSTANCE, target, later, PeekOptions::default()).await.expect("accepted");
    let uuid = peek.uuid;
    assert_eq!(controller.cancel_peek(INSTANCE, uuid).await, Ok(()));
    assert_eq!(peek.result().await, Err(PeekFailure::Canceled));
    assert_eq!(controller.cancel_peek(INSTANCE, uuid).await, Err(CancelPeekError::PeekFinished(uuid)));
    assert_unheld(&storage, &mut table).await;

    let peek = controller.peek(INSTANCE, target, later, PeekOptions::default()).await.expect("accepted");
    controller.drop_instance(INSTANCE).await.expect("drop the instance");
    assert_eq!(peek.result().await, Err(PeekFailure::InstanceDropped));
    assert_unheld(&storage, &mut table).await;
}

/// The id the instance would give its next peek (the ids of one instance count up from 1).
async fn peek_uuid_after(controller: &ComputeController) -> PeekId {
    controller
        .inspect(INSTANCE, |core| controller::lock(&core.shared()).next_peek_id())
        .await
        .expect("instance")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_peek_no_replica_answers_ends_at_its_timeout_or_with_its_instance() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let mut table = Table::create(&storage, u(1)).await;
    table.advance_to(&storage, 5).await;
    // No replica: nobody will ever answer.
    let mut controller = controller_on(Arc::clone(&storage) as _, None).await;
    let index = u(11);
    let as_of = controller
        .create_dataflow(INSTANCE, no_as_of(index_on_storage(table.id, index, 0)))
        .await
        .expect("index");
    let time = as_of.as_option().copied().expect("open");
    let target = PeekTarget::Index { id: index };

    let timed = PeekOptions { timeout_ms: Some(100), ..Default::default() };
    let peek = controller.peek(INSTANCE, target, time, timed).await.expect("accepted");
    let uuid = peek.uuid;
    assert_eq!(peek.result().await, Err(PeekFailure::TimedOut { after_ms: 100 }));
    assert_eq!(
        controller.inspect(INSTANCE, |core| core.pending_peek_count()).await,
        Ok(0),
        "its hold is gone"
    );
    assert_eq!(controller.cancel_peek(INSTANCE, uuid).await, Err(CancelPeekError::PeekFinished(uuid)));

    let peek = controller.peek(INSTANCE, target, time, PeekOptions::default()).await.expect("accepted");
    controller.drop_instance(INSTANCE).await.expect("drop the instance");
    assert_eq!(peek.result().await, Err(PeekFailure::InstanceDropped));
    assert_unheld(&storage, &mut table).await;
}
