//! The replica's Prometheus metrics on a running two-worker replica: dataflows, arrangement records and
//! batches per worker, step times, peeks queued and answered, and the storage read lag, with the values
//! its work implies; a dropped dataflow's read lag series goes and its arrangements empty; a stopped
//! replica takes its families out of the registry.

use std::time::Duration;

use frontiers::Antichain;
use protocol::{ComputeCommand, GlobalId, PeekResponse, PeekTarget, Plan};
use telemetry::{Sample, parse_text, sample_value};

use crate::harness::{
    Replica, Shape, TestController, append, create_collection, index_dataflow, int_row, kv_desc, new_storage,
};

fn samples(replica: &Replica) -> Vec<Sample> {
    parse_text(&telemetry::encode_text(replica.processes[0].registry())).expect("the exposition parses")
}

/// The sum of `name` over the workers.
fn over_workers(samples: &[Sample], name: &str) -> f64 {
    samples.iter().filter(|s| s.name == name).map(|s| s.value).sum()
}

/// Waits (up to 10 s) until `check` holds on the replica's samples.
fn eventually(replica: &Replica, what: &str, check: impl Fn(&[Sample]) -> bool) {
    for _ in 0..1_000 {
        if check(&samples(replica)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{what}: not reached; exposition:\n{}", telemetry::encode_text(replica.processes[0].registry()));
}

#[test]
fn a_running_replica_counts_its_dataflows_arrangements_steps_peeks_and_read_lag() {
    let storage = new_storage();
    let source = GlobalId::User(1);
    create_collection(&storage, source, kv_desc());
    append(&storage, source, (0..100).map(|k| (int_row(&[k, k]), 0, 1)).collect(), 1);
    let replica = Replica::start(Shape::TwoWorkers, storage.clone());
    let mut controller = TestController::connect(&replica.addrs());
    let index = GlobalId::User(10);
    controller.create_dataflow(index_dataflow("index", source, Plan::get(source), index, vec![0], 0));
    controller.wait_frontier_beyond(index, 0);
    match controller.peek(PeekTarget::Index { id: index }, 0, None, 2) {
        PeekResponse::Rows(rows) => assert_eq!(rows.len(), 100),
        other => panic!("{other:?}"),
    }

    eventually(&replica, "the dataflow, its arrangement and the peek are counted", |samples| {
        sample_value(samples, "compute_replica_dataflows", &[]) == Some(1.0)
            && over_workers(samples, "compute_replica_arrangement_records") >= 100.0
            && over_workers(samples, "compute_replica_arrangement_batches") >= 1.0
            // Both workers answer their share of a full scan.
            && over_workers(samples, "compute_replica_peeks_answered_total") == 2.0
            && over_workers(samples, "compute_replica_peeks_queued") == 0.0
    });
    let samples = samples(&replica);
    for worker in ["0", "1"] {
        let steps =
            sample_value(&samples, "compute_replica_worker_step_seconds_count", &[("worker", worker)]);
        assert!(steps.is_some_and(|n| n > 0.0), "worker {worker} stepped: {steps:?}");
    }
    // The storage times here are small numbers: the lag is about the clock's whole value.
    let lag = sample_value(&samples, "compute_replica_storage_read_lag_seconds", &[("collection", "u1")]);
    assert!(lag.is_some_and(|lag| lag > 1e9), "{lag:?}");

    // Dropping the index drops the dataflow: its feed's read lag series goes, its arrangements empty.
    controller.send(ComputeCommand::AllowCompaction { id: index, frontier: Antichain::new() });
    eventually(&replica, "the dropped dataflow's series and arrangements are gone", |samples| {
        sample_value(samples, "compute_replica_dataflows", &[]) == Some(0.0)
            && over_workers(samples, "compute_replica_arrangement_records") == 0.0
            && over_workers(samples, "compute_replica_arrangement_batches") == 0.0
            && !samples.iter().any(|s| s.name == "compute_replica_storage_read_lag_seconds")
    });

    controller.close();
    let registry = replica.processes[0].registry().clone();
    drop(replica);
    assert!(registry.gather().is_empty(), "a stopped replica leaves no family behind");
}

#[test]
fn a_registry_serves_one_replica_at_a_time() {
    let storage = new_storage();
    let registry = prometheus::Registry::new();
    let config = |storage: &std::sync::Arc<storage::InProcess>| compute::ReplicaConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        workers: 1,
        process: 0,
        timely_addresses: Vec::new(),
        storage: storage.clone(),
    };
    let first =
        compute::ReplicaServer::start_with_registry(config(&storage), registry.clone()).expect("first");
    match compute::ReplicaServer::start_with_registry(config(&storage), registry.clone()) {
        Err(compute::StartError::Metrics(_)) => {}
        other => panic!("a second replica on the same registry: {other:?}"),
    }
    first.shutdown();
    let again = compute::ReplicaServer::start_with_registry(config(&storage), registry)
        .expect("after the first stopped");
    again.shutdown();
}
