//! Exports and imports: several exports of one dataflow, index imports three deep (and an exporter dropped
//! before its importer), materialized views written by two replicas, subscribes against the reference
//! change stream, copy-to files, scheduling and hydration status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use frontiers::Antichain;
use protocol::reference::{Multiset, consolidate};
use protocol::{
    AggregateExpr, AggregateFunc, BinaryFunc, BuildDesc, ComputeCommand, ComputeResponse, CopyToResponse,
    DataflowDescription, Datum, Diff, GlobalId, IndexExport, IndexImport, PeekResponse, PeekTarget, Plan,
    Row, ScalarExpr, SinkConnection, StatusResponse, SubscribeResponse,
};
use storage::StorageCollections;

use crate::harness::{
    Replica, Shape, TestController, append, block_on, create_collection, index_dataflow, int_row, kv_desc,
    new_storage, rows_of, sink_dataflow, wait_storage_upper_beyond,
};

fn get(id: GlobalId) -> Box<Plan> {
    Box::new(Plan::get(id))
}

fn count_by_key(source: GlobalId) -> Plan {
    Plan::Reduce {
        input: get(source),
        group_key: vec![0],
        aggregates: vec![AggregateExpr { func: AggregateFunc::Count, column: 1 }],
    }
}

/// The reference count per key of `updates` at times up to `time`.
fn reference_counts(updates: &[(Row, u64, Diff)], time: u64) -> Multiset {
    let input = consolidate(updates.iter().filter(|(_, t, _)| *t <= time).map(|(r, _, d)| (r.clone(), *d)));
    let mut counts: BTreeMap<i64, i64> = BTreeMap::new();
    for (row, diff) in input {
        let Some(Datum::Int64(k)) = row.get(0) else { panic!("int key") };
        *counts.entry(k).or_default() += diff;
    }
    counts.into_iter().map(|(k, c)| (int_row(&[k, c]), 1)).collect()
}

fn some_updates(times: u64) -> Vec<(Row, u64, Diff)> {
    let mut updates = Vec::new();
    for t in 0..times {
        for i in 0..5i64 {
            updates.push((int_row(&[i % 3, t as i64 * 10 + i]), t, 1));
        }
        if t > 0 {
            updates.push((int_row(&[0, ((t - 1) * 10) as i64]), t, -1));
        }
    }
    updates
}

/// Appends the updates at times in `times`, one append per time.
fn append_times(
    storage: &storage::InProcess,
    id: GlobalId,
    updates: &[(Row, u64, Diff)],
    times: std::ops::Range<u64>,
) {
    for t in times {
        let batch: Vec<_> = updates.iter().filter(|(_, time, _)| *time == t).cloned().collect();
        append(storage, id, batch, t + 1);
    }
}

#[test]
fn one_dataflow_serves_several_index_exports_with_their_own_keys() {
    for shape in [Shape::OneWorker, Shape::TwoProcesses] {
        let storage = new_storage();
        let replica = Replica::start(shape, storage.clone());
        let mut controller = TestController::connect(&replica.addrs());
        let source = GlobalId::User(1);
        create_collection(&storage, source, kv_desc());
        let mut df = index_dataflow("multi", source, Plan::get(source), GlobalId::User(10), vec![0], 0);
        df.index_exports
            .insert(GlobalId::User(11), IndexExport { on_id: GlobalId::Transient(10), key: vec![1] });
        df.objects_to_build.push(BuildDesc { id: GlobalId::Transient(20), plan: count_by_key(source) });
        df.index_exports
            .insert(GlobalId::User(12), IndexExport { on_id: GlobalId::Transient(20), key: vec![0] });
        controller.create_dataflow(df);
        let updates = some_updates(3);
        append_times(&storage, source, &updates, 0..3);
        let contents = consolidate(updates.iter().map(|(r, _, d)| (r.clone(), *d)));
        for index in [GlobalId::User(10), GlobalId::User(11)] {
            let rows = rows_of(controller.peek(PeekTarget::Index { id: index }, 2, None, 2));
            assert_eq!(rows, contents, "{index} ({shape:?})");
        }
        let counts = rows_of(controller.peek(PeekTarget::Index { id: GlobalId::User(12) }, 2, None, 2));
        assert_eq!(counts, reference_counts(&updates, 2), "{shape:?}");
        // Key lookups on the index keyed by the second column.
        let rows = rows_of(controller.peek(
            PeekTarget::Index { id: GlobalId::User(11) },
            2,
            Some(vec![int_row(&[21])]),
            2,
        ));
        assert_eq!(rows, consolidate([(int_row(&[1, 21]), 1)]), "{shape:?}");
        controller.close();
    }
}

#[test]
fn index_imports_chain_three_deep_and_survive_their_exporter_being_dropped_first() {
    let storage = new_storage();
    let replica = Replica::start(Shape::TwoWorkers, storage.clone());
    let mut controller = TestController::connect(&replica.addrs());
    let source = GlobalId::User(1);
    create_collection(&storage, source, kv_desc());
    let plus = |input: Box<Plan>, n: i64| Plan::Project {
        input: Box::new(Plan::Map {
            input,
            exprs: vec![
                ScalarExpr::column(1).call_binary(BinaryFunc::Add, ScalarExpr::literal(Datum::Int64(n))),
            ],
        }),
        outputs: vec![0, 2],
    };
    controller.create_dataflow(index_dataflow(
        "a",
        source,
        Plan::get(source),
        GlobalId::User(10),
        vec![0],
        0,
    ));
    let mut previous = GlobalId::User(10);
    for (i, index) in [GlobalId::User(11), GlobalId::User(12)].into_iter().enumerate() {
        let mut df = DataflowDescription::new(format!("chain-{i}"));
        df.index_imports.insert(previous, IndexImport { desc: kv_desc(), key: vec![0] });
        let object = GlobalId::Transient(100 + i as u64);
        df.objects_to_build.push(BuildDesc { id: object, plan: plus(get(previous), 100) });
        df.index_exports.insert(index, IndexExport { on_id: object, key: vec![1] });
        df.as_of = Some(Antichain::from_elem(0));
        controller.create_dataflow(df);
        previous = index;
    }
    let updates = some_updates(3);
    append_times(&storage, source, &updates, 0..2);
    let expected = |time: u64| -> Multiset {
        consolidate(updates.iter().filter(|(_, t, _)| *t <= time).map(|(row, _, d)| {
            let datums = row.unpack();
            let (Datum::Int64(k), Datum::Int64(v)) = (datums[0], datums[1]) else { panic!("ints") };
            (int_row(&[k, v + 200]), *d)
        }))
    };
    let rows = rows_of(controller.peek(PeekTarget::Index { id: GlobalId::User(12) }, 1, None, 2));
    assert_eq!(rows, expected(1));
    // Drop the bottom index while the chain imports it: it is gone for peeks, the chain keeps working.
    controller.send(ComputeCommand::AllowCompaction { id: GlobalId::User(10), frontier: Antichain::new() });
    let gone = controller.peek(PeekTarget::Index { id: GlobalId::User(10) }, 1, None, 2);
    assert!(matches!(gone, PeekResponse::Error(_)), "{gone:?}");
    append_times(&storage, source, &updates, 2..3);
    controller.wait_frontier_beyond(GlobalId::User(12), 2);
    let frontier = controller.frontiers[0][&GlobalId::User(12)].clone();
    assert!(!frontier.is_empty(), "an importer of a dropped exporter must not look complete");
    let rows = rows_of(controller.peek(PeekTarget::Index { id: GlobalId::User(12) }, 2, None, 2));
    assert_eq!(rows, expected(2));
    // Dropping the rest, top first, answers with empty frontiers.
    for id in [GlobalId::User(12), GlobalId::User(11)] {
        controller.send(ComputeCommand::AllowCompaction { id, frontier: Antichain::new() });
        controller.wait_until("dropped frontier", |c| c.frontiers[0].get(&id).is_some_and(|f| f.is_empty()));
    }
    controller.close();
}

#[test]
fn a_materialized_view_written_by_two_replicas_equals_the_reference_without_duplicated_ranges() {
    let storage = new_storage();
    let source = GlobalId::User(1);
    let target = GlobalId::User(2);
    create_collection(&storage, source, kv_desc());
    create_collection(&storage, target, kv_desc());
    let df = sink_dataflow(
        "mv",
        source,
        count_by_key(source),
        GlobalId::User(3),
        SinkConnection::MaterializedView { target },
        0,
    );
    // A two-worker replica and a two-process replica (whose process 0 appends for both processes).
    let replicas = [
        Replica::start(Shape::TwoWorkers, storage.clone()),
        Replica::start(Shape::TwoProcesses, storage.clone()),
    ];
    let mut controllers: Vec<TestController> =
        replicas.iter().map(|r| TestController::connect(&r.addrs())).collect();
    for controller in &mut controllers {
        controller.create_dataflow(df.clone());
        controller.send(ComputeCommand::AllowWrites);
    }
    let times = 6;
    let updates = some_updates(times);
    append_times(&storage, source, &updates, 0..times);
    // Wait for the view to catch up, then compare every time with the reference.
    wait_storage_upper_beyond(&storage, target, times - 1);
    for time in 0..times {
        let snapshot = block_on(storage.snapshot(target, time)).expect("snapshot");
        let snapshot: Multiset = snapshot.into_iter().collect();
        assert_eq!(snapshot, reference_counts(&updates, time), "view at {time}");
    }
    for controller in controllers {
        controller.close();
    }
}

#[test]
fn subscribe_batches_equal_the_reference_change_stream() {
    for (shape, with_snapshot) in
        [(Shape::OneWorker, true), (Shape::TwoWorkers, false), (Shape::TwoProcesses, true)]
    {
        let storage = new_storage();
        let replica = Replica::start(shape, storage.clone());
        let mut controller = TestController::connect(&replica.addrs());
        let source = GlobalId::User(1);
        create_collection(&storage, source, kv_desc());
        let updates = some_updates(5);
        // Two times before the subscribe's as-of (1), the rest after it.
        append_times(&storage, source, &updates, 0..2);
        let subscribe = GlobalId::User(5);
        let df = sink_dataflow(
            "subscribe",
            source,
            count_by_key(source),
            subscribe,
            SinkConnection::Subscribe { with_snapshot },
            1,
        );
        controller.create_dataflow(df);
        append_times(&storage, source, &updates, 2..5);
        let processes = controller.processes();
        controller.wait_until("subscribe reaches time 5", |c| {
            (0..processes).all(|p| {
                c.subscribe_responses(p, subscribe).iter().any(|r| match r {
                    SubscribeResponse::Batch(b) => !b.upper.less_equal(&4),
                    SubscribeResponse::DroppedAt(_) => false,
                })
            })
        });
        // Batches are contiguous per process.
        for process in 0..processes {
            let mut lower = Antichain::from_elem(1);
            for response in controller.subscribe_responses(process, subscribe) {
                let SubscribeResponse::Batch(batch) = response else { panic!("no drop yet") };
                assert_eq!(batch.lower, lower, "contiguous batches ({shape:?})");
                lower = batch.upper.clone();
            }
        }
        let merged = controller.subscribe_batches(subscribe);
        let mut stream: Vec<(u64, Row, Diff)> = Vec::new();
        for batch in merged {
            stream.extend(batch.updates.expect("no errors"));
        }
        // The change stream accumulated to each time equals the reference at that time.
        for time in 1..5 {
            let accumulated =
                consolidate(stream.iter().filter(|(t, _, _)| *t <= time).map(|(_, r, d)| (r.clone(), *d)));
            let mut expected = reference_counts(&updates, time);
            if !with_snapshot {
                // Without the snapshot the stream holds only the changes after the as-of.
                let at_as_of = reference_counts(&updates, 1);
                for (row, diff) in at_as_of {
                    *expected.entry(row).or_default() -= diff;
                }
                expected.retain(|_, d| *d != 0);
            }
            assert_eq!(accumulated, expected, "subscribe at {time} ({shape:?})");
            assert!(stream.iter().all(|(t, _, _)| with_snapshot || *t > 1), "no snapshot updates");
        }
        // Dropping the subscribe ends its stream with DroppedAt.
        controller.send(ComputeCommand::AllowCompaction { id: subscribe, frontier: Antichain::new() });
        controller.wait_until("DroppedAt", |c| {
            (0..processes).all(|p| {
                c.subscribe_responses(p, subscribe)
                    .iter()
                    .any(|r| matches!(r, SubscribeResponse::DroppedAt(_)))
            })
        });
        controller.close();
    }
}

#[test]
fn copy_to_writes_the_snapshot_at_its_as_of_as_csv_files_only_after_allow_writes() {
    let storage = new_storage();
    let replica = Replica::start(Shape::TwoWorkers, storage.clone());
    let mut controller = TestController::connect(&replica.addrs());
    let source = GlobalId::User(1);
    create_collection(&storage, source, kv_desc());
    let updates = some_updates(4);
    append_times(&storage, source, &updates, 0..4);
    let directory = tempfile::tempdir().expect("tempdir");
    let out = directory.path().join("out");
    let copy = GlobalId::User(7);
    let df = sink_dataflow(
        "copy",
        source,
        Plan::get(source),
        copy,
        SinkConnection::CopyTo { directory: out.display().to_string() },
        2,
    );
    controller.create_dataflow(df);
    // Nothing is written before AllowWrites.
    let index = GlobalId::User(8);
    controller.create_dataflow(index_dataflow("probe", source, Plan::get(source), index, vec![0], 0));
    controller.wait_frontier_beyond(index, 2);
    std::thread::sleep(Duration::from_millis(100));
    assert!(!out.exists(), "copy-to wrote before AllowWrites");
    assert!(!controller.other.iter().any(|(_, r)| matches!(r, ComputeResponse::CopyToResponse { .. })));
    controller.send(ComputeCommand::AllowWrites);
    controller.wait_until("copy-to answer", |c| {
        c.other.iter().any(|(_, r)| matches!(r, ComputeResponse::CopyToResponse { .. }))
    });
    let count = controller.other.iter().find_map(|(_, r)| match r {
        ComputeResponse::CopyToResponse { id, response: CopyToResponse::RowCount(n) } if *id == copy => {
            Some(*n)
        }
        _ => None,
    });
    let expected = consolidate(updates.iter().filter(|(_, t, _)| *t <= 2).map(|(r, _, d)| (r.clone(), *d)));
    assert_eq!(count, Some(expected.values().sum::<i64>() as u64));
    let mut lines: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(&out).expect("directory") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("file");
        lines.extend(text.lines().map(str::to_string));
    }
    lines.sort();
    let mut wanted: Vec<String> = expected
        .iter()
        .flat_map(|(row, n)| {
            let datums = row.unpack();
            std::iter::repeat_n(format!("{},{}", datums[0], datums[1]), *n as usize)
        })
        .collect();
    wanted.sort();
    assert_eq!(lines, wanted);
    controller.close();
}

#[test]
fn an_unscheduled_dataflow_does_no_work_and_a_pending_peek_can_be_cancelled() {
    let storage = new_storage();
    let replica = Replica::start(Shape::OneWorker, storage.clone());
    let mut controller = TestController::connect(&replica.addrs());
    let source = GlobalId::User(1);
    create_collection(&storage, source, kv_desc());
    append(&storage, source, vec![(int_row(&[1, 1]), 0, 1)], 1);
    let index = GlobalId::User(10);
    controller.send(ComputeCommand::CreateDataflow(index_dataflow(
        "lazy",
        source,
        Plan::get(source),
        index,
        vec![0],
        0,
    )));
    let uuid = controller.send_peek(
        PeekTarget::Index { id: index },
        0,
        None,
        protocol::MapFilterProject::new(2),
        protocol::RowSetFinishing::default(),
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        controller.frontiers[0].get(&index).is_none_or(|f| f.less_equal(&0)),
        "no progress before Schedule"
    );
    controller.send(ComputeCommand::CancelPeek { uuid });
    assert_eq!(controller.wait_peek(uuid), PeekResponse::Canceled);
    controller.send(ComputeCommand::Schedule(index));
    let rows = rows_of(controller.peek(PeekTarget::Index { id: index }, 0, None, 2));
    assert_eq!(rows, consolidate([(int_row(&[1, 1]), 1)]));
    controller.wait_until("hydration status", |c| {
        c.other.iter().any(|(_, r)| matches!(r, ComputeResponse::Status(StatusResponse::Hydration { id, hydrated: true }) if *id == index))
    });
    controller.close();
}

#[test]
fn storage_peeks_read_a_snapshot_apply_the_finishing_and_refuse_a_key_lookup() {
    let storage = new_storage();
    let replica = Replica::start(Shape::TwoProcesses, storage.clone());
    let mut controller = TestController::connect(&replica.addrs());
    let source = GlobalId::User(1);
    create_collection(&storage, source, kv_desc());
    let updates = some_updates(3);
    append_times(&storage, source, &updates, 0..3);
    let finishing = protocol::RowSetFinishing {
        order_by: vec![protocol::ColumnOrder::desc(1)],
        limit: Some(2),
        offset: 0,
    };
    let response = controller.peek_with(
        PeekTarget::Storage { id: source },
        2,
        None,
        protocol::MapFilterProject::new(2),
        finishing.clone(),
    );
    let rows = match response {
        PeekResponse::Rows(rows) => finishing.finish(rows),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        rows.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>(),
        vec![int_row(&[1, 24]), int_row(&[0, 23])]
    );
    // A storage collection has no key to look up: the lookup is refused, not answered with every row.
    let lookup = controller.peek_with(
        PeekTarget::Storage { id: source },
        2,
        Some(vec![int_row(&[1])]),
        protocol::MapFilterProject::new(2),
        finishing,
    );
    assert!(matches!(&lookup, PeekResponse::Error(e) if e.contains("literal constraints")), "{lookup:?}");
    controller.close();
    let _ = Arc::clone(&storage);
}

#[test]
fn a_data_error_makes_peeks_fail_until_the_row_that_caused_it_is_retracted() {
    let storage = new_storage();
    let replica = Replica::start(Shape::TwoWorkers, storage.clone());
    let mut controller = TestController::connect(&replica.addrs());
    let source = GlobalId::User(1);
    create_collection(&storage, source, kv_desc());
    // v / k: division by zero for k = 0.
    let plan = Plan::Map {
        input: get(source),
        exprs: vec![ScalarExpr::column(1).call_binary(BinaryFunc::Div, ScalarExpr::column(0))],
    };
    let index = GlobalId::User(10);
    controller.create_dataflow(index_dataflow("errors", source, plan, index, vec![0], 0));
    append(&storage, source, vec![(int_row(&[0, 5]), 0, 1), (int_row(&[1, 5]), 0, 1)], 1);
    append(&storage, source, vec![(int_row(&[0, 5]), 1, -1)], 2);
    let at_0 = controller.peek(PeekTarget::Index { id: index }, 0, None, 3);
    assert!(matches!(&at_0, PeekResponse::Error(e) if e.contains("division by zero")), "{at_0:?}");
    // A key lookup of an unaffected key still sees the error: the dataflow's answer is an error.
    let lookup = controller.peek(PeekTarget::Index { id: index }, 0, Some(vec![int_row(&[1])]), 3);
    assert!(matches!(&lookup, PeekResponse::Error(_)), "{lookup:?}");
    let at_1 = rows_of(controller.peek(PeekTarget::Index { id: index }, 1, None, 3));
    assert_eq!(at_1, consolidate([(int_row(&[1, 5, 5]), 1)]));
    controller.close();
}

#[test]
fn a_count_over_a_hundred_thousand_updates_to_ten_rows_still_reports_a_row_that_goes_negative() {
    // The negativity check consolidates the updates it keeps once they pass 65,536 (tens of thousands of
    // copies of ten rows become ten per time, complete times merged into one); a later retraction that
    // takes one of them below zero must still be an error, and one that takes a row to zero must not.
    let storage = new_storage();
    let replica = Replica::start(Shape::OneWorker, storage.clone());
    let mut controller = TestController::connect(&replica.addrs());
    let source = GlobalId::User(1);
    create_collection(&storage, source, kv_desc());
    let index = GlobalId::User(10);
    controller.create_dataflow(index_dataflow("counts", source, count_by_key(source), index, vec![0], 0));
    let inserts = |time: u64| (0..70_000).map(move |i| (int_row(&[i % 10, i % 10]), time, 1)).collect();
    append(&storage, source, inserts(0), 1);
    // The second batch arrives while the first is complete and it is not: both kinds are consolidated.
    append(&storage, source, inserts(1), 2);
    append(&storage, source, vec![(int_row(&[4, 4]), 2, -14_000)], 3);
    append(&storage, source, vec![(int_row(&[3, 3]), 3, -14_001)], 4);
    let at_1 = rows_of(controller.peek(PeekTarget::Index { id: index }, 1, None, 2));
    assert_eq!(at_1, consolidate((0..10).map(|k| (int_row(&[k, 14_000]), 1))));
    let at_2 = rows_of(controller.peek(PeekTarget::Index { id: index }, 2, None, 2));
    assert_eq!(at_2, consolidate((0..10).filter(|k| *k != 4).map(|k| (int_row(&[k, 14_000]), 1))));
    let at_3 = controller.peek(PeekTarget::Index { id: index }, 3, None, 2);
    assert!(matches!(&at_3, PeekResponse::Error(e) if e.contains("negative multiplicity")), "{at_3:?}");
    controller.close();
}

#[test]
fn a_materialized_view_writes_nothing_before_allow_writes_and_a_dropped_copy_to_answers_dropped() {
    let storage = new_storage();
    let source = GlobalId::User(1);
    let target = GlobalId::User(2);
    create_collection(&storage, source, kv_desc());
    create_collection(&storage, target, kv_desc());
    let replica = Replica::start(Shape::OneWorker, storage.clone());
    let mut controller = TestController::connect(&replica.addrs());
    let view = GlobalId::User(3);
    let df =
        sink_dataflow("mv", source, Plan::get(source), view, SinkConnection::MaterializedView { target }, 0);
    controller.create_dataflow(df);
    append(&storage, source, vec![(int_row(&[1, 1]), 0, 1)], 3);
    controller.wait_frontier_beyond(view, 2);
    std::thread::sleep(Duration::from_millis(100));
    let upper = block_on(storage.frontiers(target)).expect("frontiers").upper;
    assert_eq!(upper, Antichain::from_elem(0), "nothing is written before AllowWrites");
    controller.send(ComputeCommand::AllowWrites);
    wait_storage_upper_beyond(&storage, target, 2);
    let snapshot: Multiset = block_on(storage.snapshot(target, 2)).expect("snapshot").into_iter().collect();
    assert_eq!(snapshot, consolidate([(int_row(&[1, 1]), 1)]));

    // A copy-to whose as-of is never reached, dropped: answered with Dropped.
    let copy = GlobalId::User(4);
    let df = sink_dataflow(
        "copy",
        source,
        Plan::get(source),
        copy,
        SinkConnection::CopyTo { directory: std::env::temp_dir().join("never").display().to_string() },
        100,
    );
    controller.create_dataflow(df);
    controller.send(ComputeCommand::AllowCompaction { id: copy, frontier: Antichain::new() });
    controller.wait_until("Dropped", |c| {
        c.other.iter().any(|(_, r)| {
            matches!(r, ComputeResponse::CopyToResponse { id, response: CopyToResponse::Dropped } if *id == copy)
        })
    });
    controller.close();
}

#[test]
fn a_materialized_view_created_after_allow_writes_writes() {
    // A replayed history sends AllowWrites before any CreateDataflow.
    let storage = new_storage();
    let (source, target, view) = (GlobalId::User(1), GlobalId::User(2), GlobalId::User(3));
    create_collection(&storage, source, kv_desc());
    create_collection(&storage, target, kv_desc());
    let replica = Replica::start(Shape::OneWorker, storage.clone());
    let mut controller = TestController::connect(&replica.addrs());
    controller.send(ComputeCommand::AllowWrites);
    let df =
        sink_dataflow("mv", source, Plan::get(source), view, SinkConnection::MaterializedView { target }, 0);
    controller.create_dataflow(df);
    append(&storage, source, vec![(int_row(&[1, 1]), 0, 1)], 3);
    wait_storage_upper_beyond(&storage, target, 2);
    let snapshot: Multiset = block_on(storage.snapshot(target, 2)).expect("snapshot").into_iter().collect();
    assert_eq!(snapshot, consolidate([(int_row(&[1, 1]), 1)]));
    controller.close();
}

/// A materialized view whose target is dropped can never write again: the replica says so
/// (`StatusResponse::Failed`, naming the view and why) instead of only stopping its upper, and a new
/// connection's replay rebuilds the view rather than keep the failed one, which then refuses the
/// missing target.
#[test]
fn a_materialized_view_whose_target_is_dropped_reports_itself_failed_and_is_rebuilt_on_reconnect() {
    let storage = new_storage();
    let (source, target, view) = (GlobalId::User(1), GlobalId::User(2), GlobalId::User(3));
    create_collection(&storage, source, kv_desc());
    create_collection(&storage, target, kv_desc());
    let replica = Replica::start(Shape::OneWorker, storage.clone());
    let mut controller = TestController::connect(&replica.addrs());
    controller.send(ComputeCommand::AllowWrites);
    let df =
        sink_dataflow("mv", source, Plan::get(source), view, SinkConnection::MaterializedView { target }, 0);
    controller.create_dataflow(df.clone());
    append(&storage, source, vec![(int_row(&[1, 1]), 0, 1)], 3);
    wait_storage_upper_beyond(&storage, target, 2);
    assert!(!block_on(storage.frontiers(target)).expect("frontiers").upper.less_equal(&2), "the view writes");

    block_on(storage.drop_collection(target)).expect("drop the target");
    append(&storage, source, vec![(int_row(&[2, 2]), 3, 1)], 5);
    controller.wait_until("the view's failure", |c| {
        c.other.iter().any(
            |(_, r)| matches!(r, ComputeResponse::Status(StatusResponse::Failed { id, .. }) if *id == view),
        )
    });
    let failures: Vec<&String> = controller
        .other
        .iter()
        .filter_map(|(_, r)| match r {
            ComputeResponse::Status(StatusResponse::Failed { id, error }) if *id == view => Some(error),
            _ => None,
        })
        .collect();
    assert_eq!(failures.len(), 1, "reported once: {failures:?}");
    assert!(failures[0].contains("target u2 was dropped"), "{}", failures[0]);
    controller.close();

    // Not kept: rebuilt from the replay, whose creation is refused (the target is gone).
    let replay =
        vec![ComputeCommand::AllowWrites, ComputeCommand::CreateDataflow(df), ComputeCommand::Schedule(view)];
    let mut second = TestController::connect_with_replay(&replica.addrs(), replay);
    second.wait_until("the replayed view's refusal", |c| {
        c.other.iter().any(|(_, r)| matches!(r, ComputeResponse::CommandRejected { command, reason } if command == "CreateDataflow" && reason.contains("u2")))
    });
    second.close();
}
