//! Bad input: commands in the wrong stage, another protocol version, garbage and oversize frames, dataflows
//! that fail validation or import unknown indexes, peeks of unknown ids or before the since, oversize
//! results. Each gets a specific error or a closed connection, and the replica keeps serving.

use frontiers::Antichain;
use protocol::{
    ComputeCommand, ComputeParameters, ComputeResponse, DataflowDescription, GlobalId, IndexImport,
    InstanceConfig, InstanceId, PROTOCOL_VERSION, PeekResponse, PeekTarget, Plan, ReplicaId,
};

use crate::harness::{
    RawConnection, Replica, Shape, TestController, append, block_on, create_collection, index_dataflow,
    int_row, kv_desc, new_storage, rows_of,
};

fn create_instance() -> ComputeCommand {
    ComputeCommand::CreateInstance(InstanceConfig { instance_id: InstanceId(1), replica_id: ReplicaId(1) })
}

/// The replica still answers a fresh controller.
fn assert_still_serving(replica: &Replica) {
    let mut controller = TestController::connect(&replica.addrs());
    let response = controller.peek(PeekTarget::Index { id: GlobalId::User(999) }, 0, None, 1);
    assert!(matches!(response, PeekResponse::Error(_)), "{response:?}");
    controller.close();
}

#[test]
fn a_command_before_hello_is_rejected_and_the_connection_closed() {
    let replica = Replica::start(Shape::OneWorker, new_storage());
    let mut raw = RawConnection::connect(replica.addrs()[0]);
    raw.send(&create_instance());
    let response = raw.recv();
    assert!(
        matches!(&response, Some(ComputeResponse::CommandRejected { command, .. }) if command == "CreateInstance"),
        "{response:?}"
    );
    assert_eq!(raw.recv(), None, "closed after the rejection");
    assert_still_serving(&replica);
}

#[test]
fn a_hello_of_another_version_is_refused_and_the_connection_closed() {
    let replica = Replica::start(Shape::OneWorker, new_storage());
    let mut raw = RawConnection::connect(replica.addrs()[0]);
    raw.send(&ComputeCommand::Hello { version: PROTOCOL_VERSION + 1, nonce: 3 });
    let response = raw.recv();
    assert!(
        matches!(&response, Some(ComputeResponse::HelloRefused { version, .. }) if *version == PROTOCOL_VERSION),
        "{response:?}"
    );
    assert_eq!(raw.recv(), None);
    assert_still_serving(&replica);
}

#[test]
fn commands_in_the_wrong_stage_are_rejected_and_the_connection_closed() {
    let replica = Replica::start(Shape::OneWorker, new_storage());
    for wrong in [
        ComputeCommand::InitializationComplete,
        ComputeCommand::Hello { version: PROTOCOL_VERSION, nonce: 1 },
    ] {
        let mut raw = RawConnection::connect(replica.addrs()[0]);
        raw.send(&ComputeCommand::Hello { version: PROTOCOL_VERSION, nonce: 1 });
        assert!(matches!(raw.recv(), Some(ComputeResponse::Hello { nonce: 1, .. })));
        raw.send(&wrong);
        let response = raw.recv_until(|r| matches!(r, ComputeResponse::CommandRejected { .. }));
        assert!(response.is_some(), "{wrong:?} rejected");
        assert_eq!(raw.recv(), None);
    }
    // A second CreateInstance after initialization.
    let mut raw = RawConnection::connect(replica.addrs()[0]);
    raw.send(&ComputeCommand::Hello { version: PROTOCOL_VERSION, nonce: 1 });
    raw.send(&create_instance());
    raw.send(&ComputeCommand::InitializationComplete);
    raw.send(&create_instance());
    let response = raw.recv_until(|r| matches!(r, ComputeResponse::CommandRejected { .. }));
    assert!(
        matches!(response, Some(ComputeResponse::CommandRejected { command, .. }) if command == "CreateInstance")
    );
    assert_eq!(raw.recv(), None);
    assert_still_serving(&replica);
}

#[test]
fn garbage_and_oversize_frames_close_the_connection_and_the_replica_keeps_serving() {
    let replica = Replica::start(Shape::TwoWorkers, new_storage());
    let cases: Vec<Vec<u8>> = vec![
        // A frame of 6 bytes that decodes to no command.
        vec![6, 0, 0, 0, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa],
        // A header announcing 4 GiB.
        vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
    ];
    for bytes in cases {
        // Before the Hello ...
        let mut raw = RawConnection::connect(replica.addrs()[0]);
        raw.send_bytes(&bytes);
        let response = raw.recv();
        assert!(
            matches!(&response, Some(ComputeResponse::CommandRejected { command, .. }) if command == "<undecodable>"),
            "{response:?}"
        );
        assert_eq!(raw.recv(), None);
        // ... and after it.
        let mut raw = RawConnection::connect(replica.addrs()[0]);
        raw.send(&ComputeCommand::Hello { version: PROTOCOL_VERSION, nonce: 2 });
        raw.send(&create_instance());
        raw.send(&ComputeCommand::InitializationComplete);
        raw.send_bytes(&bytes);
        let response = raw.recv_until(|r| matches!(r, ComputeResponse::CommandRejected { .. }));
        assert!(
            matches!(&response, Some(ComputeResponse::CommandRejected { command, .. }) if command == "<undecodable>"),
            "{response:?}"
        );
        assert_eq!(raw.recv(), None);
    }
    assert_still_serving(&replica);
}

#[test]
fn dataflows_that_fail_validation_or_import_unknown_indexes_are_rejected_and_the_replica_keeps_serving() {
    let storage = new_storage();
    let replica = Replica::start(Shape::OneWorker, storage.clone());
    let mut controller = TestController::connect(&replica.addrs());
    let source = GlobalId::User(1);
    create_collection(&storage, source, kv_desc());
    // An index import nobody exports.
    let mut unknown = DataflowDescription::new("unknown-import");
    unknown.index_imports.insert(GlobalId::User(77), IndexImport { desc: kv_desc(), key: vec![0] });
    unknown
        .objects_to_build
        .push(protocol::BuildDesc { id: GlobalId::Transient(1), plan: Plan::get(GlobalId::User(77)) });
    unknown
        .index_exports
        .insert(GlobalId::User(78), protocol::IndexExport { on_id: GlobalId::Transient(1), key: vec![0] });
    unknown.as_of = Some(Antichain::from_elem(0));
    controller.send(ComputeCommand::CreateDataflow(unknown));
    // A dataflow without an as-of.
    let mut invalid = index_dataflow("invalid", source, Plan::get(source), GlobalId::User(79), vec![0], 0);
    invalid.as_of = None;
    controller.send(ComputeCommand::CreateDataflow(invalid));
    // Scheduling an unknown id.
    controller.send(ComputeCommand::Schedule(GlobalId::User(80)));
    // A storage import that does not exist.
    let missing = GlobalId::User(90);
    controller.send(ComputeCommand::CreateDataflow(index_dataflow(
        "missing-storage",
        missing,
        Plan::get(missing),
        GlobalId::User(91),
        vec![0],
        0,
    )));
    controller.wait_until("four rejections", |c| {
        c.other.iter().filter(|(_, r)| matches!(r, ComputeResponse::CommandRejected { .. })).count() >= 4
    });
    let reasons: Vec<String> = controller
        .other
        .iter()
        .filter_map(|(_, r)| match r {
            ComputeResponse::CommandRejected { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert!(reasons[0].contains("u77"), "{reasons:?}");
    assert!(reasons[1].contains("as_of"), "{reasons:?}");
    assert!(reasons[2].contains("u80"), "{reasons:?}");
    assert!(reasons[3].contains("u90"), "{reasons:?}");
    // The same connection keeps working.
    append(&storage, source, vec![(int_row(&[1, 1]), 0, 1)], 1);
    controller.create_dataflow(index_dataflow(
        "fine",
        source,
        Plan::get(source),
        GlobalId::User(81),
        vec![0],
        0,
    ));
    assert_eq!(rows_of(controller.peek(PeekTarget::Index { id: GlobalId::User(81) }, 0, None, 2)).len(), 1);
    controller.close();
}

#[test]
fn peeks_of_unknown_ids_before_the_since_or_over_the_size_limit_are_errors() {
    let storage = new_storage();
    let replica = Replica::start(Shape::TwoWorkers, storage.clone());
    let mut controller = TestController::connect(&replica.addrs());
    let source = GlobalId::User(1);
    create_collection(&storage, source, kv_desc());
    let index = GlobalId::User(10);
    controller.create_dataflow(index_dataflow("since", source, Plan::get(source), index, vec![0], 0));
    for t in 0..6 {
        append(&storage, source, vec![(int_row(&[t, t]), t as u64, 1)], t as u64 + 1);
    }
    controller.wait_frontier_beyond(index, 5);
    let unknown = controller.peek(PeekTarget::Index { id: GlobalId::User(55) }, 0, None, 2);
    assert!(matches!(&unknown, PeekResponse::Error(e) if e.contains("u55")), "{unknown:?}");
    controller.send(ComputeCommand::AllowCompaction { id: index, frontier: Antichain::from_elem(4) });
    let before = controller.peek(PeekTarget::Index { id: index }, 3, None, 2);
    assert!(matches!(&before, PeekResponse::Error(e) if e.contains("since")), "{before:?}");
    assert_eq!(rows_of(controller.peek(PeekTarget::Index { id: index }, 4, None, 2)).len(), 5);
    assert_eq!(
        rows_of(controller.peek(PeekTarget::Index { id: index }, 5, Some(vec![int_row(&[5])]), 2)).len(),
        1
    );
    controller.send(ComputeCommand::UpdateConfiguration(ComputeParameters {
        max_result_size_bytes: Some(20),
        ..ComputeParameters::default()
    }));
    let big = controller.peek(PeekTarget::Index { id: index }, 5, None, 2);
    assert!(
        matches!(&big, PeekResponse::ResultTooLarge { max_bytes: 20, size_bytes } if *size_bytes > 20),
        "{big:?}"
    );
    controller.close();
}

// Dataflow code that panics takes a worker with it, and a replica missing a worker answers nothing: it
// must not sit on its connection (a controller would wait forever), but close it and its listener and say
// why, so that its orchestrator restarts it. Nothing a controller sends panics a worker (multiplicities
// that overflow are errors, `operators.rs`), so the replica's fault injection stands in for a bug: in
// debug builds (the test profile) a dataflow of this name panics its worker when built.
#[test]
fn a_replica_whose_worker_panics_closes_its_connection_stops_listening_and_says_why() {
    const PANIC_FOR_TESTS: &str = "compute test: a worker panics building this dataflow";
    let storage = new_storage();
    let source = GlobalId::User(1);
    create_collection(&storage, source, kv_desc());
    let replica = Replica::start(Shape::TwoWorkers, storage);
    let index = GlobalId::User(10);
    let mut controller = TestController::connect(&replica.addrs());
    controller.create_dataflow(index_dataflow(PANIC_FOR_TESTS, source, Plan::get(source), index, vec![0], 0));
    controller.wait_closed();
    let process = &replica.processes[0];
    let failure = block_on(process.failed());
    assert!(failure.contains(PANIC_FOR_TESTS), "{failure}");
    assert_eq!(process.failure(), Some(failure));
    assert!(std::net::TcpStream::connect(process.local_addr()).is_err(), "the listener is closed");
}
