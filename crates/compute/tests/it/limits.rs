//! Limits on the wire: a peek result over the frame limit is answered `ResultTooLarge`, a subscribe batch
//! over it ends the subscribe with an error, a controller that does not read its responses is dropped once
//! more than the queue limit waits, a dataflow whose storage import fails answers with the error instead
//! of leaving its readers waiting (and reports its index and view failed), and `UpdateConfiguration.idle_merge_effort` is applied.

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

use compute::{QUEUED_FRAMES, ReplicaConfig, ReplicaLimits};
use protocol::frame::{DEFAULT_MAX_FRAME_BYTES, FrameError, read_frame, write_frame};
use protocol::{
    ComputeCommand, ComputeParameters, ComputeResponse, GlobalId, InstanceConfig, InstanceId,
    MapFilterProject, PROTOCOL_VERSION, Peek, PeekId, PeekResponse, PeekTarget, Plan, ReplicaId,
    RowSetFinishing, SinkConnection, StatusResponse, SubscribeResponse,
};
use storage::{InProcess, StorageCollections};

use crate::harness::{
    FaultyStorage, RawConnection, Replica, Shape, TestController, append, create_collection, index_dataflow,
    int_row, kv_desc, new_storage, rows_of, sink_dataflow,
};

/// A storage collection with `rows` rows `(i, 10 i)` at time 0, complete through time 0.
fn source_with_rows(rows: i64) -> (Arc<InProcess>, GlobalId) {
    let storage = new_storage();
    let source = GlobalId::User(1);
    create_collection(&storage, source, kv_desc());
    append(&storage, source, (0..rows).map(|i| (int_row(&[i, 10 * i]), 0, 1)).collect(), 1);
    (storage, source)
}

fn with_frame_limit(max_frame_bytes: usize) -> impl Fn(ReplicaConfig) -> (ReplicaConfig, ReplicaLimits) {
    move |config| (config, ReplicaLimits { max_frame_bytes, ..ReplicaLimits::default() })
}

#[test]
fn a_peek_result_over_the_frame_limit_is_result_too_large_and_the_replica_keeps_serving() {
    const MAX: usize = 16 << 10;
    for shape in [Shape::OneWorker, Shape::TwoProcesses] {
        let (storage, source) = source_with_rows(5_000);
        let replica = Replica::start_with(shape, storage, with_frame_limit(MAX));
        let mut controller = TestController::connect(&replica.addrs());
        let index = GlobalId::User(10);
        controller.create_dataflow(index_dataflow("index", source, Plan::get(source), index, vec![0], 0));
        match controller.peek(PeekTarget::Index { id: index }, 0, None, 2) {
            PeekResponse::ResultTooLarge { size_bytes, max_bytes } => {
                assert_eq!(max_bytes, MAX as u64, "{shape:?}");
                assert!(size_bytes > MAX as u64, "{shape:?}: {size_bytes} bytes");
            }
            other => panic!("{shape:?}: expected ResultTooLarge, got {other:?}"),
        }
        let point = controller.peek(PeekTarget::Index { id: index }, 0, Some(vec![int_row(&[7])]), 2);
        assert_eq!(rows_of(point), [(int_row(&[7, 70]), 1)].into_iter().collect(), "{shape:?}");
        controller.close();
    }
}

#[test]
fn a_subscribe_batch_over_the_frame_limit_ends_the_subscribe_with_an_error_its_consumer_sees() {
    let (storage, source) = source_with_rows(5_000);
    let replica = Replica::start_with(Shape::OneWorker, storage.clone(), with_frame_limit(16 << 10));
    let mut controller = TestController::connect(&replica.addrs());
    let subscribe = GlobalId::User(20);
    let connection = SinkConnection::Subscribe { with_snapshot: true };
    controller.create_dataflow(sink_dataflow(
        "subscribe",
        source,
        Plan::get(source),
        subscribe,
        connection,
        0,
    ));
    controller
        .wait_until("the subscribe's first response", |c| !c.subscribe_responses(0, subscribe).is_empty());
    match &controller.subscribe_responses(0, subscribe)[..] {
        [SubscribeResponse::Batch(batch)] => {
            assert_eq!(
                batch.lower,
                frontiers::Antichain::from_elem(0),
                "the error covers the snapshot's time"
            );
            assert!(batch.upper.is_empty(), "the error ends the subscribe");
            let error = batch.updates.as_ref().expect_err("an error, not rows");
            assert!(error.contains("over the frame limit"), "{error}");
        }
        other => panic!("expected one error batch, got {other:?}"),
    }
    // Later changes are not sent for it, and dropping it says nothing more; the replica serves on.
    append(&storage, source, vec![(int_row(&[-1, 0]), 1, 1)], 2);
    let index = GlobalId::User(10);
    controller.create_dataflow(index_dataflow("index", source, Plan::get(source), index, vec![0], 0));
    controller.wait_frontier_beyond(index, 1);
    controller.send(ComputeCommand::AllowCompaction { id: subscribe, frontier: frontiers::Antichain::new() });
    let point = controller.peek(PeekTarget::Index { id: index }, 1, Some(vec![int_row(&[-1])]), 2);
    assert_eq!(rows_of(point), [(int_row(&[-1, 0]), 1)].into_iter().collect());
    assert_eq!(controller.subscribe_responses(0, subscribe).len(), 1, "nothing after the error");
    controller.close();
}

#[test]
fn a_controller_that_does_not_read_is_dropped_once_its_queued_responses_pass_the_limit() {
    const MAX: usize = 8 << 10;
    const PEEKS: u64 = 5_000;
    // Each full peek answers about 4 KiB, so the answers (about 20 MiB) exceed what the sockets buffer
    // (a few MiB) plus the queue limit (4 frames, 32 KiB) by far.
    let (storage, source) = source_with_rows(200);
    let replica = Replica::start_with(Shape::OneWorker, storage, with_frame_limit(MAX));
    let mut connection = RawConnection::connect(replica.addrs()[0]);
    connection.stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    connection.send(&ComputeCommand::Hello { version: PROTOCOL_VERSION, nonce: 1 });
    assert!(matches!(connection.recv(), Some(ComputeResponse::Hello { .. })));
    let index = GlobalId::User(10);
    let setup = [
        ComputeCommand::CreateInstance(InstanceConfig {
            instance_id: InstanceId(1),
            replica_id: ReplicaId(1),
        }),
        ComputeCommand::InitializationComplete,
        ComputeCommand::CreateDataflow(index_dataflow("index", source, Plan::get(source), index, vec![0], 0)),
        ComputeCommand::Schedule(index),
    ];
    for command in &setup {
        connection.send(command);
    }
    let mut writer = connection.stream.try_clone().expect("clone");
    let sending = std::thread::spawn(move || {
        for uuid in 0..PEEKS {
            let peek = ComputeCommand::Peek(Peek {
                uuid: PeekId(uuid),
                target: PeekTarget::Index { id: index },
                timestamp: 0,
                literal_constraints: None,
                map_filter_project: MapFilterProject::new(2),
                finishing: RowSetFinishing::unordered(),
            });
            // Once the replica drops the connection, writes fail.
            if write_frame(&mut writer, &peek, DEFAULT_MAX_FRAME_BYTES).is_err() {
                break;
            }
        }
    });
    // Not reading meanwhile: the answers pile up on the replica's side.
    std::thread::sleep(Duration::from_secs(2));
    let mut answers = 0u64;
    let end = loop {
        match read_frame::<_, ComputeResponse>(&mut connection.stream, DEFAULT_MAX_FRAME_BYTES) {
            Ok(ComputeResponse::PeekResponse { .. }) => answers += 1,
            Ok(_) => {}
            Err(end) => break end,
        }
    };
    sending.join().expect("sending thread");
    match end {
        FrameError::Closed | FrameError::Truncated { .. } => {}
        FrameError::Io(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected the replica to drop the connection, got {other} after {answers} answers"),
    }
    assert!(answers < PEEKS, "all {answers} answers were queued: the queue has no limit");
    const { assert!(QUEUED_FRAMES * MAX < 1 << 20, "the limit under test is small") };
    // The replica serves the next controller.
    let mut controller = TestController::connect(&replica.addrs());
    controller.create_dataflow(index_dataflow("index", source, Plan::get(source), index, vec![0], 0));
    let point = controller.peek(PeekTarget::Index { id: index }, 0, Some(vec![int_row(&[3])]), 2);
    assert_eq!(rows_of(point), [(int_row(&[3, 30]), 1)].into_iter().collect());
}

#[test]
fn update_configuration_sets_the_idle_merge_effort_every_arrangement_reads() {
    let storage = new_storage();
    let replica = Replica::start(Shape::TwoWorkers, storage as Arc<dyn StorageCollections>);
    let process = &replica.processes[0];
    assert_eq!(process.idle_merge_effort(), compute::DEFAULT_IDLE_MERGE_EFFORT);
    let mut controller = TestController::connect(&replica.addrs());
    for effort in [0, 77] {
        let parameters =
            ComputeParameters { idle_merge_effort: Some(effort), ..ComputeParameters::default() };
        controller.send(ComputeCommand::UpdateConfiguration(parameters));
        controller.send(ComputeCommand::UpdateConfiguration(ComputeParameters::default()));
        // A peek of an unknown index is answered at once, after the commands before it.
        let _ = controller.peek(PeekTarget::Index { id: GlobalId::User(99) }, 0, None, 2);
        assert_eq!(process.idle_merge_effort(), effort as usize, "an unset field leaves the value");
    }
    controller.close();
}

#[test]
fn a_dataflow_whose_storage_import_fails_answers_its_peeks_and_subscribes_with_the_error_and_reports_its_index_and_view_failed()
 {
    let (inner, source) = source_with_rows(10);
    let failing = GlobalId::User(2);
    create_collection(&inner, failing, kv_desc());
    let (view, target) = (GlobalId::User(40), GlobalId::User(41));
    create_collection(&inner, target, kv_desc());
    let storage = Arc::new(FaultyStorage { inner, panics: None, listen_fails: Some(failing) });
    let replica = Replica::start(Shape::TwoWorkers, storage);
    let mut controller = TestController::connect(&replica.addrs());
    let (index, subscribe, healthy) = (GlobalId::User(10), GlobalId::User(20), GlobalId::User(30));
    let connection = SinkConnection::Subscribe { with_snapshot: true };
    controller.create_dataflow(index_dataflow("index", failing, Plan::get(failing), index, vec![0], 0));
    controller.create_dataflow(sink_dataflow(
        "subscribe",
        failing,
        Plan::get(failing),
        subscribe,
        connection,
        0,
    ));
    let connection = SinkConnection::MaterializedView { target };
    controller.create_dataflow(sink_dataflow("view", failing, Plan::get(failing), view, connection, 0));
    controller.create_dataflow(index_dataflow("healthy", source, Plan::get(source), healthy, vec![0], 0));
    match controller.peek(PeekTarget::Index { id: index }, 0, None, 2) {
        PeekResponse::Error(error) => assert!(error.contains("stopped") && error.contains("u2"), "{error}"),
        other => panic!("expected the import's error, got {other:?}"),
    }
    controller.wait_until("the subscribe's error", |c| !c.subscribe_responses(0, subscribe).is_empty());
    match &controller.subscribe_responses(0, subscribe)[..] {
        [SubscribeResponse::Batch(batch)] => {
            assert!(batch.upper.is_empty());
            assert!(batch.updates.as_ref().expect_err("an error").contains("u2"));
        }
        other => panic!("expected one error batch, got {other:?}"),
    }
    // The index and the view, whose uppers stop, are reported failed with the import's error.
    for export in [index, view] {
        controller.wait_until(&format!("{export} reported failed"), |c| {
            c.other.iter().any(|(_, r)| {
                matches!(r, ComputeResponse::Status(StatusResponse::Failed { id, error })
                    if *id == export && error.contains("u2"))
            })
        });
    }
    // Other dataflows are not affected.
    assert_eq!(rows_of(controller.peek(PeekTarget::Index { id: healthy }, 0, None, 2)).len(), 10);
    controller.close();
}
