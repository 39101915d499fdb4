//! Every error variant of the instance core, each produced by a test.

use std::collections::BTreeMap;

use controller::{
    CancelPeekError, CollectionDropError, DataflowCreationError, PeekError, ReadPolicyError,
    ReplicaCreationError, ReplicaDropError,
};
use frontiers::ReadPolicy;
use protocol::{DataflowValidationError, MapFilterProject, PeekId, ReplicaId, ScalarExpr, SinkConnection};

use crate::harness::{Harness, f, index_on_index, index_on_storage, peek_request, s, sink_on_storage, u};

fn setup() -> Harness {
    let mut h = Harness::new();
    h.create_storage(s(1));
    h.add_replica(ReplicaId(1));
    h.create(index_on_storage(s(1), u(1), 5)).unwrap();
    h.create(sink_on_storage(s(1), u(2), SinkConnection::Subscribe { with_snapshot: false }, 5)).unwrap();
    h.report(ReplicaId(1), u(1), f(10));
    h
}

#[test]
fn dataflow_creation_errors_name_their_cause_and_change_nothing() {
    let mut h = setup();
    let before = h.core.collection_count();

    let mut no_as_of = index_on_storage(s(1), u(3), 5);
    no_as_of.as_of = None;
    assert!(matches!(
        h.core.create_dataflow(no_as_of, BTreeMap::new()),
        Err(DataflowCreationError::Invalid(DataflowValidationError::MissingAsOf(_)))
    ));
    assert_eq!(h.create(index_on_storage(s(1), u(1), 5)), Err(DataflowCreationError::CollectionExists(u(1))));
    assert_eq!(
        h.core.create_dataflow(index_on_storage(s(1), u(3), 5), BTreeMap::new()),
        Err(DataflowCreationError::CollectionMissing(s(1))),
        "a storage import without a hold"
    );
    assert_eq!(h.create(index_on_index(u(9), u(3), 5)), Err(DataflowCreationError::CollectionMissing(u(9))));
    assert_eq!(
        h.create(index_on_index(u(2), u(3), 5)),
        Err(DataflowCreationError::CollectionMissing(u(2))),
        "a sink is not importable"
    );
    // u1's since is 10 now (lag 0): an as-of of 5 is too early.
    assert!(matches!(
        h.create(index_on_index(u(1), u(3), 5)),
        Err(DataflowCreationError::SinceViolation { .. })
    ));
    // A storage hold that does not cover the as-of.
    let late_hold = h.storage.acquire(&s(1), f(8)).unwrap();
    assert!(matches!(
        h.core.create_dataflow(index_on_storage(s(1), u(3), 5), BTreeMap::from([(s(1), late_hold)])),
        Err(DataflowCreationError::SinceViolation { .. })
    ));
    h.drain();
    assert_eq!(h.core.collection_count(), before);
}

#[test]
fn drop_and_policy_errors_change_nothing() {
    let mut h = setup();
    assert_eq!(
        h.core.drop_collections(&[u(1), u(9)]),
        Err(CollectionDropError::CollectionMissing(controller::CollectionMissing(u(9))))
    );
    assert!(h.core.contains_collection(u(1)), "nothing was dropped");
    h.core.drop_collections(&[u(1)]).unwrap();
    assert!(
        matches!(h.core.drop_collections(&[u(1)]), Err(CollectionDropError::CollectionMissing(_))),
        "dropping twice"
    );
    assert_eq!(
        h.core.set_read_policy(vec![(u(9), ReadPolicy::NoPolicy)]),
        Err(ReadPolicyError::CollectionMissing(controller::CollectionMissing(u(9))))
    );
    assert_eq!(
        h.core.set_read_policy(vec![(u(2), ReadPolicy::NoPolicy)]),
        Err(ReadPolicyError::WriteOnlyCollection(u(2)))
    );
}

#[test]
fn peek_errors_are_typed_and_take_no_hold() {
    let mut h = setup();
    assert!(matches!(h.core.peek(peek_request(1, u(9), 10)), Err(PeekError::CollectionMissing(_))));
    assert_eq!(h.core.peek(peek_request(2, u(2), 10)).unwrap_err(), PeekError::NotAnIndex(u(2)));
    let mut targeted = peek_request(3, u(1), 10);
    targeted.options.target_replica = Some(ReplicaId(7));
    assert_eq!(h.core.peek(targeted).unwrap_err(), PeekError::ReplicaMissing(ReplicaId(7)));
    assert!(matches!(
        h.core.peek(peek_request(4, u(1), 9)),
        Err(PeekError::SinceViolation { timestamp: 9, .. })
    ));
    let mut bad_mfp = peek_request(5, u(1), 10);
    bad_mfp.options.map_filter_project = Some(MapFilterProject::new(2).filter([ScalarExpr::column(7)]));
    assert!(matches!(h.core.peek(bad_mfp), Err(PeekError::InvalidMapFilterProject { .. })));
    assert_eq!(h.core.cancel_peek(PeekId(1)), Err(CancelPeekError::PeekMissing(PeekId(1))));
    assert_eq!(h.core.pending_peek_count(), 0);
    h.drain();
}

#[test]
fn replica_errors_are_typed() {
    let mut h = setup();
    assert_eq!(
        h.core.add_replica(ReplicaId(1)).unwrap_err(),
        ReplicaCreationError::ReplicaExists(ReplicaId(1))
    );
    assert_eq!(h.core.drop_replica(ReplicaId(9)), Err(ReplicaDropError::ReplicaMissing(ReplicaId(9))));
}
