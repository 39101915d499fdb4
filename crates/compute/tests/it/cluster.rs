//! Starting multi-process replicas and failing loudly: strangers on a cluster port during start-up, a
//! cluster port that is taken, a peer that never comes, a loop of start-ups, and a process whose I/O
//! thread panics (alone, and in a two-process replica, whose other process must stop too).

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use compute::{ReplicaConfig, ReplicaLimits, ReplicaServer, StartError};
use protocol::{GlobalId, PeekTarget, Plan};
use storage::StorageCollections;

use crate::harness::{
    FaultyStorage, Replica, Shape, TestController, append, create_collection, free_addresses, index_dataflow,
    int_row, kv_desc, new_storage, rows_of, wait_failed,
};

fn listen() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

/// A replica on `source` (two rows) answers a peek of an index over it with both rows.
fn assert_answers(replica: &Replica, source: GlobalId) {
    let index = GlobalId::User(10);
    let mut controller = TestController::connect(&replica.addrs());
    controller.create_dataflow(index_dataflow("index", source, Plan::get(source), index, vec![0], 0));
    let rows = rows_of(controller.peek(PeekTarget::Index { id: index }, 0, None, 2));
    assert_eq!(rows, [(int_row(&[1, 10]), 1), (int_row(&[2, 20]), 1)].into_iter().collect());
    controller.close();
}

fn storage_with_two_rows() -> (Arc<storage::InProcess>, GlobalId) {
    let storage = new_storage();
    let source = GlobalId::User(1);
    create_collection(&storage, source, kv_desc());
    append(&storage, source, vec![(int_row(&[1, 10]), 0, 1), (int_row(&[2, 20]), 0, 1)], 1);
    (storage, source)
}

#[test]
fn strangers_on_a_cluster_port_during_start_up_are_refused_and_the_replica_still_serves() {
    let (storage, source) = storage_with_two_rows();
    let addresses = free_addresses(2);
    let config = |process| {
        ReplicaConfig::new(listen(), 1, Arc::clone(&storage) as Arc<dyn StorageCollections>)
            .in_cluster(process, addresses.clone())
    };
    let first = ReplicaServer::start(config(0)).expect("process 0 starts");
    let port = first.cluster_addr().expect("a cluster port");
    // What timely's own start-up took for process 1 (its index, eight bytes), then gone; garbage; and a
    // connection that says nothing and closes.
    let mut strangers = Vec::new();
    for bytes in [
        1u64.to_be_bytes().to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n and some more bytes".to_vec(),
        Vec::new(),
    ] {
        let mut stranger = TcpStream::connect(port).expect("the cluster port accepts");
        stranger.write_all(&bytes).expect("write");
        strangers.push(stranger);
    }
    drop(strangers);
    let second = ReplicaServer::start(config(1)).expect("process 1 starts");
    let replica = Replica { processes: vec![first, second] };
    assert_answers(&replica, source);
    assert!(replica.processes.iter().all(|p| p.failure().is_none()));
}

#[test]
fn a_process_whose_cluster_port_is_taken_does_not_start() {
    let storage = new_storage();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addresses = vec![taken.local_addr().expect("addr").to_string(), free_addresses(1).remove(0)];
    let config = ReplicaConfig::new(listen(), 1, storage).in_cluster(0, addresses);
    match ReplicaServer::start(config) {
        Err(StartError::ClusterBind { address, .. }) => {
            assert_eq!(address, taken.local_addr().unwrap().to_string())
        }
        Ok(_) => panic!("a process started on a cluster port that is taken"),
        Err(other) => panic!("expected ClusterBind, got {other}"),
    }
}

#[test]
fn a_process_whose_peers_never_come_fails_after_the_timeout_and_closes_its_listener() {
    let storage = new_storage();
    for process in [0, 1] {
        let addresses = free_addresses(2);
        let config = ReplicaConfig::new(listen(), 1, Arc::clone(&storage) as Arc<dyn StorageCollections>)
            .in_cluster(process, addresses);
        let limits = ReplicaLimits { cluster_connect_timeout_ms: 300, ..ReplicaLimits::default() };
        let alone = ReplicaServer::start_with(config, limits).expect("starts");
        let failure = wait_failed(&alone);
        let expected =
            if process == 0 { "waited in vain for processes [1]" } else { "could not connect to process 0" };
        assert!(failure.contains(expected), "process {process}: {failure}");
        assert!(TcpStream::connect(alone.local_addr()).is_err(), "process {process}'s listener is closed");
        alone.shutdown();
    }
}

/// The start-up race this guards against struck once in thousands of rounds (a cluster port taken between
/// the probe and the bind, or a stranger on it): each round here must start and answer, or fail to start
/// with `ClusterBind`, which the harness retries with other ports.
#[test]
fn a_loop_of_two_process_start_ups_answers_every_time() {
    let (storage, source) = storage_with_two_rows();
    for _ in 0..25 {
        let replica =
            Replica::start(Shape::TwoProcesses, Arc::clone(&storage) as Arc<dyn StorageCollections>);
        assert_answers(&replica, source);
    }
}

#[test]
fn a_replica_whose_io_thread_panics_says_why_and_closes_its_listener() {
    let (inner, source) = storage_with_two_rows();
    let poisoned = GlobalId::User(2);
    create_collection(&inner, poisoned, kv_desc());
    let storage = Arc::new(FaultyStorage { inner, panics: Some(poisoned), listen_fails: None });
    let replica = Replica::start(Shape::TwoWorkers, storage);
    let mut controller = TestController::connect(&replica.addrs());
    let index = GlobalId::User(10);
    controller.create_dataflow(index_dataflow("poisoned", poisoned, Plan::get(poisoned), index, vec![0], 0));
    controller.wait_closed();
    let process = &replica.processes[0];
    let failure = wait_failed(process);
    assert!(
        failure.contains("the I/O thread panicked") && failure.contains("panics on the frontiers"),
        "{failure}"
    );
    assert_eq!(process.failure(), Some(failure));
    assert!(TcpStream::connect(process.local_addr()).is_err(), "the listener is closed");
    let _ = source;
}

#[test]
fn when_one_process_of_a_replica_fails_the_other_fails_too() {
    let (inner, _source) = storage_with_two_rows();
    let poisoned = GlobalId::User(2);
    create_collection(&inner, poisoned, kv_desc());
    let panicking: Arc<dyn StorageCollections> =
        Arc::new(FaultyStorage { inner: Arc::clone(&inner), panics: Some(poisoned), listen_fails: None });
    let replica = Replica::start_with(Shape::TwoProcesses, inner, |mut config| {
        if config.process == 0 {
            config.storage = Arc::clone(&panicking);
        }
        (config, ReplicaLimits::default())
    });
    let mut controller = TestController::connect(&replica.addrs());
    let index = GlobalId::User(10);
    controller.create_dataflow(index_dataflow("poisoned", poisoned, Plan::get(poisoned), index, vec![0], 0));
    let first = wait_failed(&replica.processes[0]);
    tracing::info!(%first, "process 0 failed");
    assert!(first.contains("the I/O thread panicked"), "{first}");
    // Process 1 cannot compute without process 0: its cluster connection closes and it stops too.
    let second = wait_failed(&replica.processes[1]);
    assert!(!second.is_empty());
    controller.wait_closed();
    for process in &replica.processes {
        assert!(TcpStream::connect(process.local_addr()).is_err(), "a listener is still open");
    }
    // Both stopped: shutting the replica down does not wait for anything.
    let stopping = std::thread::spawn(move || drop(replica));
    for _ in 0..1_000 {
        if stopping.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(stopping.is_finished(), "the failed replica's shutdown hangs");
}
