//! The in-process orchestrator under a real controller: managed replicas started by a launcher that runs
//! `compute::ReplicaServer` in this process, on an embedded in-memory storage.
//!
//! The launcher counts its launches and shutdowns and remembers each replica's address, so a restarted
//! replica listens where its replica client reconnects. The tests check that a managed replica answers
//! peeks, that dropping it shuts it down, that a restart rehydrates it, and that ensuring a running replica
//! launches nothing. (The process orchestrator needs the `compute-replica` binary, which only the `sim`
//! crate can build: its tests are in `crates/sim/tests/it/process_orchestrator.rs`.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use compute::{ReplicaConfig, ReplicaHandle, ReplicaServer};
use controller::{
    ComputeController, InProcessOrchestrator, Launcher, Orchestrator, PeekOptions, ReplicaLocation,
    ReplicaSpec, RunningReplica,
};
use protocol::{GlobalId, InstanceId, PeekTarget, ReplicaId, Row};
use storage::{InProcess, StorageCollections, StoreConfig};

use crate::harness::{
    SteppedTable as Table, controller_config, eventually, f, index_on_storage, no_as_of, u,
};

const INSTANCE: InstanceId = InstanceId(1);
const R1: ReplicaId = ReplicaId(1);

/// What the launcher did, shared with the test.
#[derive(Debug, Default)]
struct LaunchLog {
    launched: AtomicUsize,
    shut_down: AtomicUsize,
    /// Each replica's address, kept across restarts.
    addresses: Mutex<BTreeMap<(InstanceId, ReplicaId), SocketAddr>>,
}

impl LaunchLog {
    fn launched(&self) -> usize {
        self.launched.load(Ordering::SeqCst)
    }

    fn shut_down(&self) -> usize {
        self.shut_down.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct InProcessReplica {
    handle: ReplicaHandle,
    log: Arc<LaunchLog>,
}

impl RunningReplica for InProcessReplica {
    fn addresses(&self) -> Vec<String> {
        vec![self.handle.local_addr().to_string()]
    }

    fn shutdown(self: Box<Self>) {
        self.handle.shutdown();
        self.log.shut_down.fetch_add(1, Ordering::SeqCst);
    }
}

/// A launcher starting single-process replicas on `storage`, each on the address it had before (a free
/// port the first time).
fn launcher(storage: &Arc<InProcess>, log: &Arc<LaunchLog>) -> Launcher {
    let (storage, log) = (Arc::clone(storage), Arc::clone(log));
    Arc::new(move |spec: &ReplicaSpec| {
        if spec.processes != 1 {
            return Err(format!("this launcher starts one process, not {}", spec.processes));
        }
        let key = (spec.instance, spec.replica);
        let listen = log
            .addresses
            .lock()
            .expect("launch log")
            .get(&key)
            .copied()
            .unwrap_or_else(|| "127.0.0.1:0".parse().expect("address"));
        let handle = ReplicaServer::start(ReplicaConfig {
            listen,
            workers: spec.workers,
            process: 0,
            timely_addresses: Vec::new(),
            storage: Arc::clone(&storage) as Arc<dyn StorageCollections>,
            security: crate::harness::replica_security(),
        })
        .map_err(|e| e.to_string())?;
        log.addresses.lock().expect("launch log").insert(key, handle.local_addr());
        log.launched.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(InProcessReplica { handle, log: Arc::clone(&log) }) as Box<dyn RunningReplica>)
    })
}

struct Setup {
    storage: Arc<InProcess>,
    log: Arc<LaunchLog>,
    orchestrator: Arc<InProcessOrchestrator>,
    controller: ComputeController,
}

async fn setup() -> Setup {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let log = Arc::new(LaunchLog::default());
    let orchestrator = Arc::new(InProcessOrchestrator::new(launcher(&storage, &log)));
    let config = controller_config(false);
    let as_orchestrator: Arc<dyn Orchestrator> = Arc::clone(&orchestrator) as _;
    let mut controller = ComputeController::new(Arc::clone(&storage) as _, Some(as_orchestrator), config)
        .await
        .expect("controller");
    controller.create_instance(INSTANCE, controller.default_instance_config()).expect("instance");
    Setup { storage, log, orchestrator, controller }
}

/// Waits for the index to reach the table's upper, then peeks it at the last complete time and checks
/// the answer against the table.
async fn assert_the_index_answers(controller: &ComputeController, table: &Table, index: GlobalId) {
    let upper = table.upper;
    eventually(&format!("the index reaches upper {upper}"), async || {
        let got = controller.collection_frontiers(INSTANCE, index).expect("live index").upper;
        if got == f(upper) { Ok(()) } else { Err(format!("upper {got:?}")) }
    })
    .await;
    let time = upper - 1;
    let handle = controller
        .peek(INSTANCE, PeekTarget::Index { id: index }, time, PeekOptions::default())
        .await
        .expect("peek accepted");
    let response =
        tokio::time::timeout(Duration::from_secs(10), handle.result()).await.expect("peek answered");
    let Ok(rows) = response else { panic!("peek did not return rows: {response:?}") };
    let got: BTreeMap<Row, u64> = rows.into_iter().map(|(row, count)| (row, count.get())).collect();
    assert_eq!(got, table.contents_at(time), "the peek at {time}");
}

/// A table with data, managed replica `R1`, and index `u11` on the table, checked to answer peeks.
async fn index_on_a_managed_replica(
    controller: &mut ComputeController,
    storage: &InProcess,
) -> (Table, GlobalId) {
    let mut table = Table::create(storage, u(1)).await;
    table.advance(storage, 3).await;
    controller.add_replica(INSTANCE, R1, managed()).await.expect("add managed replica");
    let index = u(11);
    controller
        .create_dataflow(INSTANCE, no_as_of(index_on_storage(table.id, index, 0)))
        .await
        .expect("index");
    // The as-of is the table's since, which is its upper: readable once the table moves on.
    table.advance(storage, 3).await;
    assert_the_index_answers(controller, &table, index).await;
    (table, index)
}

fn managed() -> ReplicaLocation {
    ReplicaLocation::Managed { workers: 1, processes: 1 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_in_process_replica_answers_peeks_and_dropping_it_shuts_it_down() {
    let Setup { storage, log, orchestrator, mut controller } = setup().await;
    index_on_a_managed_replica(&mut controller, &storage).await;
    assert_eq!(log.launched(), 1, "adding a managed replica launches it");
    let address = log.addresses.lock().expect("launch log")[&(INSTANCE, R1)];

    controller.drop_replica(INSTANCE, R1).await.expect("drop replica");
    assert_eq!(log.shut_down(), 1, "dropping a managed replica shuts it down");
    assert!(
        std::net::TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_err(),
        "the dropped replica still accepts connections on {address}"
    );
    let again = orchestrator.drop_replica(INSTANCE, R1).await;
    assert!(again.is_err(), "the orchestrator still knew the dropped replica");
    assert_eq!(log.shut_down(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_in_process_replica_rehydrates_and_answers_peeks() {
    let Setup { storage, log, orchestrator, mut controller } = setup().await;
    let (mut table, index) = index_on_a_managed_replica(&mut controller, &storage).await;
    let address = log.addresses.lock().expect("launch log")[&(INSTANCE, R1)];

    let spec = ReplicaSpec { instance: INSTANCE, replica: R1, workers: 1, processes: 1 };
    let restarted = {
        let orchestrator = Arc::clone(&orchestrator);
        tokio::task::spawn_blocking(move || orchestrator.restart(INSTANCE, R1, &spec))
            .await
            .expect("restart task")
            .expect("restart")
    };
    assert_eq!(restarted, vec![address.to_string()], "the launcher reuses the replica's address");
    assert_eq!((log.launched(), log.shut_down()), (2, 1), "the old replica stopped and a new one started");

    // The new replica has only the replayed history: answering at a time written after the restart means
    // it rebuilt the index from storage.
    table.advance(&storage, 3).await;
    assert_the_index_answers(&controller, &table, index).await;

    drop(controller);
    drop(orchestrator);
    assert_eq!(log.shut_down(), 2, "dropping the orchestrator stops the replicas it runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensuring_a_running_in_process_replica_returns_its_addresses_without_launching_again() {
    let Setup { log, orchestrator, .. } = setup().await;
    let spec = ReplicaSpec { instance: INSTANCE, replica: ReplicaId(7), workers: 1, processes: 1 };
    let first = orchestrator.ensure_replica(spec.clone()).await.expect("ensure");
    let second = orchestrator.ensure_replica(spec.clone()).await.expect("ensure again");
    assert_eq!(first, second);
    assert_eq!(log.launched(), 1, "the second ensure launched another replica");

    let refused =
        orchestrator.ensure_replica(ReplicaSpec { replica: ReplicaId(8), processes: 2, ..spec }).await;
    assert!(refused.is_err(), "a launcher's error is the orchestrator's");
    assert_eq!(log.launched(), 1);

    orchestrator.drop_replica(INSTANCE, ReplicaId(7)).await.expect("drop");
    assert_eq!(log.shut_down(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_ensures_of_one_replica_keep_the_first_and_stop_the_other() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let log = Arc::new(LaunchLog::default());
    // Both launches are under way before either finishes.
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let both_start: Launcher = {
        let (storage, log) = (Arc::clone(&storage), Arc::clone(&log));
        Arc::new(move |spec: &ReplicaSpec| {
            barrier.wait();
            let handle = ReplicaServer::start(ReplicaConfig {
                listen: "127.0.0.1:0".parse().expect("address"),
                workers: spec.workers,
                process: 0,
                timely_addresses: Vec::new(),
                storage: Arc::clone(&storage) as Arc<dyn StorageCollections>,
                security: crate::harness::replica_security(),
            })
            .map_err(|e| e.to_string())?;
            log.launched.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(InProcessReplica { handle, log: Arc::clone(&log) }) as Box<dyn RunningReplica>)
        })
    };
    let orchestrator = InProcessOrchestrator::new(both_start);
    let spec = ReplicaSpec { instance: INSTANCE, replica: R1, workers: 1, processes: 1 };
    let (first, second) =
        tokio::join!(orchestrator.ensure_replica(spec.clone()), orchestrator.ensure_replica(spec.clone()));
    let (first, second) = (first.expect("first ensure"), second.expect("second ensure"));
    assert_eq!(first, second, "both callers get the replica that stays");
    assert_eq!((log.launched(), log.shut_down()), (2, 1), "the later launch was stopped again");
    orchestrator.drop_replica(INSTANCE, R1).await.expect("drop the replica that stayed");
    assert_eq!(log.shut_down(), 2);
    let address: SocketAddr = first[0].parse().expect("an address");
    assert!(std::net::TcpStream::connect(address).is_err(), "nothing listens at {address} any more");
}
