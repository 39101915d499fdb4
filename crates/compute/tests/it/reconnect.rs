//! Reconnects: a second controller connection replays its history and the replica reconciles — identical
//! dataflows are kept without rehydration, dataflows missing from the replay are dropped, changed ones are
//! rebuilt.

use frontiers::Antichain;
use protocol::{BinaryFunc, ComputeCommand, Datum, GlobalId, PeekResponse, PeekTarget, Plan, ScalarExpr};

use crate::harness::{
    Replica, Shape, TestController, append, create_collection, index_dataflow, int_row, kv_desc, new_storage,
    rows_of,
};

#[test]
fn a_reconnect_replaying_the_same_dataflows_keeps_them_without_rehydration_and_drops_the_rest() {
    for shape in [Shape::TwoWorkers, Shape::TwoProcesses] {
        let storage = new_storage();
        let replica = Replica::start(shape, storage.clone());
        let source = GlobalId::User(1);
        create_collection(&storage, source, kv_desc());
        append(&storage, source, vec![(int_row(&[1, 10]), 0, 1), (int_row(&[2, 20]), 0, 1)], 1);
        let kept = index_dataflow("kept", source, Plan::get(source), GlobalId::User(10), vec![0], 0);
        let dropped = index_dataflow("dropped", source, Plan::get(source), GlobalId::User(11), vec![1], 0);
        let mut first = TestController::connect(&replica.addrs());
        first.create_dataflow(kept.clone());
        first.create_dataflow(dropped);
        assert_eq!(rows_of(first.peek(PeekTarget::Index { id: GlobalId::User(10) }, 0, None, 2)).len(), 2);
        let built = replica.dataflows_built();
        assert_eq!(built, 2 * replica.processes.len() as u64);
        first.close();

        // The new controller's history: `kept` with a later as-of, scheduled; `dropped` is gone.
        let mut replayed = kept.clone();
        replayed.as_of = Some(Antichain::from_elem(1));
        let replay =
            vec![ComputeCommand::CreateDataflow(replayed), ComputeCommand::Schedule(GlobalId::User(10))];
        let mut second = TestController::connect_with_replay(&replica.addrs(), replay);
        append(&storage, source, vec![(int_row(&[3, 30]), 1, 1)], 2);
        assert_eq!(rows_of(second.peek(PeekTarget::Index { id: GlobalId::User(10) }, 1, None, 2)).len(), 3);
        assert_eq!(replica.dataflows_built(), built, "the kept dataflow was not rebuilt ({shape:?})");
        let gone = second.peek(PeekTarget::Index { id: GlobalId::User(11) }, 1, None, 2);
        assert!(
            matches!(gone, PeekResponse::Error(_)),
            "the dataflow missing from the replay is gone: {gone:?}"
        );
        // Frontiers are reported afresh on the new connection.
        second.wait_frontier_beyond(GlobalId::User(10), 1);
        second.close();

        // A replay that changes the dataflow under the same id rebuilds it.
        let mut changed = kept.clone();
        changed.objects_to_build[0].plan = Plan::Filter {
            input: Box::new(Plan::get(source)),
            predicates: vec![
                ScalarExpr::column(0).call_binary(BinaryFunc::Gt, ScalarExpr::literal(Datum::Int64(1))),
            ],
        };
        let replay =
            vec![ComputeCommand::CreateDataflow(changed), ComputeCommand::Schedule(GlobalId::User(10))];
        let mut third = TestController::connect_with_replay(&replica.addrs(), replay);
        assert_eq!(rows_of(third.peek(PeekTarget::Index { id: GlobalId::User(10) }, 1, None, 2)).len(), 2);
        assert_eq!(
            replica.dataflows_built(),
            built + replica.processes.len() as u64,
            "changed dataflow rebuilt"
        );
        third.close();
    }
}

/// Under many reconnects whose replays rebuild dataflows (an index whose plan changes each time under the
/// same export id, and a subscribe, which is always rebuilt) while storage advances, a worker's
/// report from the dropped dataflow can still be in flight when its replacement exists. Keyed by export id
/// only, such a report reached the new dataflow: its frontier ran ahead and then "regressed" (an assert
/// that took the replica down), and a subscribe's first batch lost its snapshot or doubled rows. The same
/// holds for the answer to a peek the previous connection left pending under the id the replay re-sends.
/// Here every connection sees frontiers that never regress, a subscribe whose changes up to its upper
/// equal storage's contents, and the peek's answer at its own time.
#[test]
fn many_reconnects_that_rebuild_dataflows_never_mix_reports_of_the_old_dataflow_into_the_new() {
    use protocol::reference::consolidate;
    use protocol::{SinkConnection, SubscribeResponse};
    use storage::StorageCollections;

    use crate::harness::{block_on, sink_dataflow};

    for shape in [Shape::OneWorker, Shape::TwoProcesses] {
        let storage = new_storage();
        let replica = Replica::start(shape, storage.clone());
        let source = GlobalId::User(1);
        create_collection(&storage, source, kv_desc());
        append(&storage, source, vec![(int_row(&[0, 0]), 0, 1)], 1);
        let mut time = 1;
        let index = GlobalId::User(10);
        let subscribe = GlobalId::User(20);
        let filtered = |bound: i64| Plan::Filter {
            input: Box::new(Plan::get(source)),
            predicates: vec![
                ScalarExpr::column(0).call_binary(BinaryFunc::Gt, ScalarExpr::literal(Datum::Int64(bound))),
            ],
        };
        let peeks: Vec<protocol::PeekId> = (1_000..1_008).map(protocol::PeekId).collect();
        for round in 0..100i64 {
            // A burst of appends right before the reconnect: the workers' reports of the frontiers they
            // move are in flight while the new connection's replay drops and rebuilds the dataflows.
            for _ in 0..3 {
                append(&storage, source, vec![(int_row(&[time as i64, 1]), time, 1)], time + 1);
                time += 1;
            }
            let readable =
                *block_on(storage.frontiers(source)).expect("frontiers").upper.as_option().expect("open") - 1;
            let peek_at = |uuid, timestamp| {
                ComputeCommand::Peek(protocol::Peek {
                    uuid,
                    target: PeekTarget::Index { id: index },
                    timestamp,
                    literal_constraints: None,
                    map_filter_project: protocol::MapFilterProject::new(2),
                    finishing: protocol::RowSetFinishing::unordered(),
                })
            };
            let replay = vec![
                ComputeCommand::CreateDataflow(index_dataflow(
                    "index",
                    source,
                    filtered(-round),
                    index,
                    vec![0],
                    0,
                )),
                ComputeCommand::Schedule(index),
                ComputeCommand::CreateDataflow(sink_dataflow(
                    "subscribe",
                    source,
                    Plan::get(source),
                    subscribe,
                    SinkConnection::Subscribe { with_snapshot: true },
                    0,
                )),
                ComputeCommand::Schedule(subscribe),
            ];
            // The same peek ids as those the previous connection left pending (maybe answered by the
            // dataflow this replay rebuilds, at another time).
            let replay: Vec<ComputeCommand> =
                replay.into_iter().chain(peeks.iter().map(|uuid| peek_at(*uuid, readable))).collect();
            // And a burst during it, which also completes the time of the peek the previous connection
            // left pending: its answer is in flight while the replay re-sends the peek's id.
            let burst = {
                let storage = storage.clone();
                let first = time;
                std::thread::spawn(move || {
                    for time in first..first + 3 {
                        append(&storage, source, vec![(int_row(&[time as i64, 1]), time, 1)], time + 1);
                        std::thread::yield_now();
                    }
                })
            };
            time += 3;
            let mut controller = TestController::connect_with_replay(&replica.addrs(), replay);
            burst.join().expect("burst");
            let expected = consolidate(
                block_on(storage.snapshot(source, readable))
                    .expect("snapshot")
                    .into_iter()
                    .filter(|(row, _)| matches!(row.get(0), Some(Datum::Int64(k)) if k > -round)),
            );
            for uuid in &peeks {
                let answer = rows_of(controller.wait_peek(*uuid));
                assert!(
                    answer == expected,
                    "round {round} ({shape:?}): {uuid}'s answer has {} rows, not the {} at its own time {readable}",
                    answer.len(),
                    expected.len()
                );
            }
            // Frontiers are checked for regressions as they arrive (`TestController::absorb`).
            controller.wait_frontier_beyond(index, readable);
            controller.wait_until(
                &format!("the subscribe beyond {readable} (round {round}, {shape:?})"),
                |c| {
                    let batches = c.subscribe_batches(subscribe);
                    batches.last().is_some_and(|b| !b.upper.less_equal(&readable))
                },
            );
            for process in 0..controller.processes() {
                let responses = controller.subscribe_responses(process, subscribe);
                let first = match responses.first() {
                    Some(SubscribeResponse::Batch(batch)) => batch.lower.clone(),
                    other => panic!("round {round}: the subscribe starts with {other:?}"),
                };
                assert_eq!(
                    first,
                    Antichain::from_elem(0),
                    "round {round}: the first batch starts at the as-of"
                );
            }
            let batches = controller.subscribe_batches(subscribe);
            let upper = *batches.last().expect("a batch").upper.as_option().expect("open");
            let updates = batches.into_iter().flat_map(|b| b.updates.expect("no error"));
            let got = consolidate(updates.map(|(_, row, diff)| (row, diff)));
            let expected = consolidate(block_on(storage.snapshot(source, upper - 1)).expect("snapshot"));
            assert!(
                got == expected,
                "round {round} ({shape:?}): the subscribe up to {upper} has {} rows, storage {}",
                got.len(),
                expected.len()
            );
            // Left pending as the connection goes: its time becomes readable with the next round's appends,
            // while the next connection replays the same peek id at another time.
            for uuid in &peeks {
                controller.send(peek_at(*uuid, readable + 4));
            }
            controller.close();
        }
        assert!(replica.processes.iter().all(|p| p.failure().is_none()), "{shape:?}: no process failed");
    }
}

/// A dataflow created and never scheduled (the controller's hydration gate held its `Schedule` back)
/// holds nothing in storage. When a new connection replays it at a later as-of, after storage compacted
/// past its first one, the replica rebuilds it at the replayed as-of instead of keeping it with its
/// earlier one, whose storage hold would fail once it is scheduled: it hydrates and answers. (Kept, it
/// answered every peek with "cannot hold storage import ... its since is ...".)
#[test]
fn a_dataflow_never_scheduled_is_rebuilt_at_the_replayed_as_of_once_storage_compacted_past_its_first() {
    use frontiers::ReadPolicy;
    use storage::StorageCollections;

    use crate::harness::block_on;

    for shape in [Shape::OneWorker, Shape::TwoProcesses] {
        let storage = new_storage();
        let replica = Replica::start(shape, storage.clone());
        let source = GlobalId::User(1);
        let index = GlobalId::User(10);
        create_collection(&storage, source, kv_desc());
        for time in 0..5 {
            append(&storage, source, vec![(int_row(&[time as i64, 1]), time, 1)], time + 1);
        }
        let unscheduled = index_dataflow("unscheduled", source, Plan::get(source), index, vec![0], 0);
        let mut first = TestController::connect(&replica.addrs());
        first.send(ComputeCommand::CreateDataflow(unscheduled.clone()));
        // Created on every process (each reports the export's frontiers) before the connection goes.
        let processes = first.processes();
        first.wait_until("the unscheduled dataflow's frontiers", |c| {
            (0..processes).all(|p| c.frontiers[p].contains_key(&index))
        });
        first.close();
        let built = replica.dataflows_built();

        // The controller let go of the earlier as-of: storage compacts past it.
        block_on(storage.set_read_policy(source, ReadPolicy::ValidFrom(Antichain::from_elem(3))))
            .expect("read policy");
        let since = block_on(storage.frontiers(source)).expect("frontiers").since;
        assert_eq!(since, Antichain::from_elem(3), "storage compacted past the first as-of");

        let mut replayed = unscheduled.clone();
        replayed.as_of = Some(Antichain::from_elem(3));
        let replay = vec![ComputeCommand::CreateDataflow(replayed), ComputeCommand::Schedule(index)];
        let mut second = TestController::connect_with_replay(&replica.addrs(), replay);
        let answer = second.peek(PeekTarget::Index { id: index }, 3, None, 2);
        assert!(
            matches!(&answer, PeekResponse::Rows(_)),
            "{shape:?}: the replayed dataflow answers at its as-of: {answer:?}"
        );
        assert_eq!(rows_of(answer).len(), 4, "{shape:?}: the rows at times 0..=3");
        second.wait_frontier_beyond(index, 3);
        assert_eq!(
            replica.dataflows_built(),
            built + processes as u64,
            "{shape:?}: the unscheduled dataflow was rebuilt, not kept"
        );
        second.close();
    }
}
