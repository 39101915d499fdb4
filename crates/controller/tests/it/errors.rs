//! Every error variant of the instance core, each produced by a test, and every way an index peek can
//! end without rows ([`PeekFailure`]) as its caller sees it.

use std::collections::BTreeMap;

use controller::{
    CancelPeekError, CollectionDropError, ComputeControllerResponse, DataflowCreationError,
    InstanceCoreConfig, PeekError, PeekFailure, ReadPolicyError, ReplicaCreationError, ReplicaDropError,
};
use frontiers::ReadPolicy;
use protocol::{
    BuildDesc, ComputeResponse, DataflowValidationError, Datum, GlobalId, IndexExport, MapFilterProject,
    PeekId, PeekResponse, Plan, ReplicaId, Row, ScalarExpr, SinkConnection,
};

use crate::harness::{
    Harness, desc, f, index_on_index, index_on_storage, peek_request, s, sink_on_storage, u,
};

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
    assert_eq!(h.core.cancel_peek(PeekId(1)), Err(CancelPeekError::PeekUnknown(PeekId(1))));
    assert_eq!(h.core.pending_peek_count(), 0);
    h.drain();
}

#[test]
fn cancelling_an_unknown_peek_and_one_that_ended_are_told_apart_and_change_nothing() {
    let mut h = setup();
    assert_eq!(h.core.cancel_peek(PeekId(7)), Err(CancelPeekError::PeekUnknown(PeekId(7))));
    h.core.peek(peek_request(7, u(1), 10)).unwrap();
    h.drain();
    h.answer(ReplicaId(1), 7, PeekResponse::Rows(vec![]));
    assert_eq!(h.core.cancel_peek(PeekId(7)), Err(CancelPeekError::PeekFinished(PeekId(7))));
    assert_eq!(
        h.core.cancel_peek(PeekId(6)),
        Err(CancelPeekError::PeekFinished(PeekId(6))),
        "issued below 7"
    );
    assert_eq!(h.core.cancel_peek(PeekId(8)), Err(CancelPeekError::PeekUnknown(PeekId(8))));
    // Answered by one replica while another still owes an answer: ended for its caller all the same.
    h.add_replica(ReplicaId(2));
    h.report(ReplicaId(2), u(1), f(10));
    h.core.peek(peek_request(8, u(1), 10)).unwrap();
    h.drain();
    h.answer(ReplicaId(2), 8, PeekResponse::Rows(vec![]));
    assert_eq!(h.core.pending_peek_count(), 1);
    assert_eq!(h.core.cancel_peek(PeekId(8)), Err(CancelPeekError::PeekFinished(PeekId(8))));
    h.drain();
    assert_eq!(h.peek_results[&PeekId(8)], Ok(vec![]), "the answer stands");
}

/// A harness like `setup`'s whose commands may be at most `max_command_bytes` long.
fn limited(max_command_bytes: usize) -> Harness {
    let mut h = Harness::with_config(InstanceCoreConfig {
        default_index_policy: ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 },
        max_command_bytes,
        ..Default::default()
    });
    h.create_storage(s(1));
    h.add_replica(ReplicaId(1));
    h.create(index_on_storage(s(1), u(1), 5)).unwrap();
    h.report(ReplicaId(1), u(1), f(10));
    h
}

/// An index over a constant of `rows` rows: a dataflow whose description grows with `rows`.
fn constant_index(export: GlobalId, rows: i64) -> protocol::DataflowDescription<u64> {
    let rows = (0..rows).map(|i| (Row::pack([Datum::Int64(i), Datum::Int64(i)]), 1)).collect();
    let mut df = protocol::DataflowDescription::new("constant");
    let typ = desc().typ().clone();
    df.objects_to_build.push(BuildDesc { id: GlobalId::Transient(1), plan: Plan::Constant { rows, typ } });
    df.index_exports.insert(export, IndexExport { on_id: GlobalId::Transient(1), key: vec![0] });
    df.as_of = Some(f(5));
    df
}

#[test]
fn a_command_over_the_frame_limit_is_refused_before_it_is_recorded_or_sent_and_takes_no_hold() {
    let mut h = limited(4 << 10);
    let sent_before = h.commands[&ReplicaId(1)].len();
    let history_before = h.core.history_len();
    let error = h.create(constant_index(u(5), 1_000)).unwrap_err();
    assert!(
        matches!(
            error,
            DataflowCreationError::CommandTooLarge { size_bytes, max_bytes: 4096 } if size_bytes > 4096
        ),
        "got {error:?}"
    );
    assert!(!h.core.contains_collection(u(5)));
    h.create(constant_index(u(5), 10)).unwrap();
    let history_after_small = h.core.history_len();
    assert!(history_after_small > history_before, "a small one goes through");

    let mut huge = peek_request(1, u(1), 10);
    huge.options.literal_constraints = Some((0..1_000).map(|i| Row::pack([Datum::Int64(i)])).collect());
    let error = h.core.peek(huge).unwrap_err();
    assert!(
        matches!(error, PeekError::CommandTooLarge { size_bytes, max_bytes: 4096 } if size_bytes > 4096),
        "got {error:?}"
    );
    h.drain();
    assert_eq!(h.core.pending_peek_count(), 0);
    assert_eq!(h.core.history_len(), history_after_small, "nothing recorded");
    let peeks_sent = h.commands[&ReplicaId(1)][sent_before..]
        .iter()
        .filter(|c| matches!(c, protocol::ComputeCommand::Peek(_)))
        .count();
    assert_eq!(peeks_sent, 0, "nothing sent");
    assert_eq!(h.since(u(1)), f(10), "no hold taken");
    assert_eq!(h.core.cancel_peek(PeekId(1)), Err(CancelPeekError::PeekUnknown(PeekId(1))), "no id used");
}

#[test]
fn a_replicas_failed_answer_reaches_the_caller_typed() {
    let answers = [
        (
            PeekResponse::Error("division by zero".to_string()),
            PeekFailure::Evaluation("division by zero".to_string()),
        ),
        (
            PeekResponse::ResultTooLarge { size_bytes: 900, max_bytes: 100 },
            PeekFailure::ResultTooLarge { size_bytes: 900, max_bytes: 100 },
        ),
        (PeekResponse::Canceled, PeekFailure::ReplicaCanceled(ReplicaId(1))),
    ];
    for (uuid, (answer, failure)) in (1..).zip(answers) {
        let mut h = setup();
        h.core.peek(peek_request(uuid, u(1), 10)).unwrap();
        h.drain();
        h.answer(ReplicaId(1), uuid, answer);
        assert_eq!(h.peek_results[&PeekId(uuid)], Err(failure.clone()));
        let notified = h.responses.iter().any(|r| {
            matches!(r, ComputeControllerResponse::PeekNotification(n)
                if n.uuid == PeekId(uuid) && n.outcome == controller::PeekOutcome::Failed(failure.clone()))
        });
        assert!(notified, "the notification says {failure:?}");
    }
    // The others: `ReplicaDropped`, `TimedOut` and `Canceled` in `peeks.rs`; `InstanceDropped` and
    // `Storage` only the async API produces (`api_errors.rs`).
}

#[test]
fn a_command_a_replica_rejects_reaches_the_user_and_the_replica_stays() {
    let mut h = setup();
    h.respond(
        ReplicaId(1),
        ComputeResponse::CommandRejected {
            command: "CreateDataflow".to_string(),
            reason: "bad plan".to_string(),
        },
    );
    assert!(h.responses.contains(&ComputeControllerResponse::CommandRejected {
        instance: h.core.id(),
        replica: ReplicaId(1),
        command: "CreateDataflow".to_string(),
        reason: "bad plan".to_string(),
    }));
    assert!(h.disconnects.is_empty(), "the replica keeps serving everything else");
}

#[test]
fn an_export_a_replica_reports_failed_reaches_the_user_and_the_replica_stays() {
    let mut h = setup();
    let failed = |id: GlobalId| {
        ComputeResponse::Status(protocol::StatusResponse::Failed { id, error: "target dropped".to_string() })
    };
    h.respond(ReplicaId(1), failed(u(2)));
    assert!(h.responses.contains(&ComputeControllerResponse::ExportFailed {
        instance: h.core.id(),
        replica: ReplicaId(1),
        id: u(2),
        error: "target dropped".to_string(),
    }));
    assert!(h.disconnects.is_empty(), "a reconnect would not help: the replica stays");

    // Late news of a dropped export is not the user's any more.
    h.core.drop_collections(&[u(1)]).unwrap();
    h.drain();
    h.respond(ReplicaId(1), failed(u(1)));
    assert!(
        !h.responses
            .iter()
            .any(|r| matches!(r, ComputeControllerResponse::ExportFailed { id, .. } if *id == u(1))),
        "{:?}",
        h.responses
    );
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
