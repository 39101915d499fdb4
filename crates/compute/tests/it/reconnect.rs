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
