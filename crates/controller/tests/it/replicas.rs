//! Replicas: faulty ones are disconnected (the others keep serving), new ones get the live state, and
//! per-connection state is reset on reconnect.

use frontiers::Antichain;
use protocol::{ComputeCommand, ComputeResponse, PeekId, PeekResponse, ReplicaId};
use replica_client::ReplicaStatus;

use crate::harness::{Harness, f, index_on_storage, peek_request, s, u};

fn setup() -> Harness {
    let mut h =
        Harness::with_policy(frontiers::ReadPolicy::LagWriteFrontier { lag_ms: 1, granularity_ms: 0 });
    h.create_storage(s(1));
    h.add_replica(ReplicaId(1));
    h.add_replica(ReplicaId(2));
    h.create(index_on_storage(s(1), u(1), 0)).unwrap();
    h
}

#[test]
fn a_replica_regressing_a_frontier_is_disconnected_and_the_others_keep_serving() {
    let mut h = setup();
    h.report(ReplicaId(1), u(1), f(10));
    h.report(ReplicaId(2), u(1), f(10));
    h.report(ReplicaId(1), u(1), f(7));
    assert_eq!(h.disconnects.len(), 1);
    assert_eq!(h.disconnects[0].0, ReplicaId(1));
    assert!(h.disconnects[0].1.contains("regressed"));
    // The collection's upper did not move back, and replica 2 keeps advancing it.
    assert_eq!(h.core.collection_frontiers(u(1)).unwrap().upper, f(10));
    h.report(ReplicaId(2), u(1), f(12));
    assert_eq!(h.core.collection_frontiers(u(1)).unwrap().upper, f(12));
    h.core.peek(peek_request(1, u(1), 11)).unwrap();
    h.drain();
    h.answer(ReplicaId(2), 1, PeekResponse::Rows(vec![]));
    assert_eq!(h.peek_results[&PeekId(1)], Ok(vec![]));
}

#[test]
fn an_answer_to_a_peek_never_sent_gets_the_replica_disconnected() {
    let mut h = setup();
    h.answer(ReplicaId(2), 99, PeekResponse::Rows(vec![]));
    assert_eq!(h.disconnects.len(), 1);
    assert_eq!(h.disconnects[0].0, ReplicaId(2));
}

#[test]
fn a_handshake_message_outside_the_handshake_gets_the_replica_disconnected() {
    let mut h = setup();
    h.respond(ReplicaId(1), ComputeResponse::Hello { version: 1, nonce: 0 });
    assert_eq!(h.disconnects.len(), 1);
}

#[test]
fn after_a_reconnect_a_replica_may_report_lower_frontiers_than_before() {
    let mut h = setup();
    h.report(ReplicaId(1), u(1), f(10));
    h.status(ReplicaId(1), ReplicaStatus::Failed { reason: "restart".into(), retry_in_ms: 10 });
    h.status(ReplicaId(1), ReplicaStatus::Hydrating);
    h.report(ReplicaId(1), u(1), f(3));
    assert!(h.disconnects.is_empty(), "a fresh connection starts afresh");
    assert_eq!(h.core.replica_write_frontier(ReplicaId(1), u(1)), Some(f(3)));
    assert_eq!(
        h.core.collection_frontiers(u(1)).unwrap().upper,
        f(10),
        "the collection's upper never regresses"
    );
}

#[test]
fn the_connected_upper_follows_the_replicas_connected_now_while_the_upper_never_goes_back() {
    let mut h = setup();
    let frontiers = |h: &Harness| {
        let f = h.core.collection_frontiers(u(1)).unwrap();
        (f.upper, f.connected_upper)
    };
    assert_eq!(frontiers(&h).1, f(0), "no replica has reported: nothing is readable yet");
    h.report(ReplicaId(1), u(1), f(10));
    h.report(ReplicaId(2), u(1), f(7));
    assert_eq!(frontiers(&h), (f(10), f(10)));
    // Replica 1, ahead, goes: what is readable now is what replica 2 has.
    h.status(ReplicaId(1), ReplicaStatus::Failed { reason: "killed".into(), retry_in_ms: 10 });
    assert_eq!(frontiers(&h), (f(10), f(7)));
    // Back, it reports from its as-of; the connected upper is the join of the current reports.
    h.status(ReplicaId(1), ReplicaStatus::Hydrating);
    h.report(ReplicaId(1), u(1), f(3));
    assert_eq!(frontiers(&h), (f(10), f(7)));
    h.report(ReplicaId(1), u(1), f(12));
    assert_eq!(frontiers(&h), (f(12), f(12)));
    // With no replica connected, nothing is readable without waiting.
    h.status(ReplicaId(1), ReplicaStatus::Failed { reason: "killed".into(), retry_in_ms: 10 });
    h.status(ReplicaId(2), ReplicaStatus::Failed { reason: "killed".into(), retry_in_ms: 10 });
    assert_eq!(frontiers(&h), (f(12), f(0)));
}

#[test]
fn a_new_replica_is_given_every_live_dataflow_at_its_current_since() {
    let mut h = setup();
    h.create(index_on_storage(s(1), u(2), 0)).unwrap();
    h.report(ReplicaId(1), u(1), f(10));
    h.core.drop_collections(&[u(2)]).unwrap();
    h.drain();
    let history = h.core.add_replica(ReplicaId(3)).unwrap();
    let replay = history.replay();
    let created: Vec<_> = replay
        .iter()
        .filter_map(|c| match c {
            ComputeCommand::CreateDataflow(d) => {
                Some((d.export_ids().collect::<Vec<_>>(), d.as_of.clone().unwrap()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(created, vec![(vec![u(1)], f(9))], "u2 is dropped; u1 starts at its since");
    assert!(matches!(&replay[0], ComputeCommand::CreateInstance(c) if c.replica_id == ReplicaId(3)));
}

#[test]
fn dropping_a_replica_releases_its_input_holds() {
    let mut h = setup();
    h.release_storage_policy(s(1));
    h.report(ReplicaId(1), u(1), f(10));
    h.report(ReplicaId(2), u(1), f(2));
    assert_eq!(h.storage_since(s(1)), f(2));
    h.core.drop_replica(ReplicaId(2)).unwrap();
    h.drain();
    assert_eq!(h.storage_since(s(1)), f(9), "the index's own lag of 1 remains");
    assert!(h.core.drop_replica(ReplicaId(2)).is_err(), "dropping twice is an error");
    assert_eq!(h.since(u(1)), f(9));
    let _ = Antichain::<u64>::new();
}
