//! Subscribes (each time range forwarded once, `DroppedAt` on drop, the stream closed at `until`), copy-to (first answer wins, then
//! it goes away), materialized views (compaction one step behind what is written), and `AllowWrites`
//! (sent once, replayed to later replicas).

use controller::ComputeControllerResponse;
use frontiers::Antichain;
use protocol::{
    ComputeResponse, CopyToResponse, Datum, ReplicaId, Row, SinkConnection, SubscribeBatch, SubscribeResponse,
};

use crate::harness::{Harness, f, s, sink_on_storage, u};

fn row(i: i64) -> Row {
    Row::pack([Datum::Int64(i), Datum::Int64(0)])
}

fn batch(lower: u64, upper: u64, updates: Vec<(u64, Row, i64)>) -> ComputeResponse<u64> {
    ComputeResponse::SubscribeResponse {
        id: u(1),
        response: SubscribeResponse::Batch(SubscribeBatch {
            lower: f(lower),
            upper: f(upper),
            updates: Ok(updates),
        }),
    }
}

/// A forwarded batch: lower, upper, updates.
type Forwarded = (Antichain<u64>, Antichain<u64>, Vec<(u64, Row, i64)>);

fn forwarded(h: &Harness) -> Vec<Forwarded> {
    h.responses
        .iter()
        .filter_map(|r| match r {
            ComputeControllerResponse::SubscribeResponse {
                response: SubscribeResponse::Batch(b), ..
            } => Some((b.lower.clone(), b.upper.clone(), b.updates.clone().unwrap())),
            _ => None,
        })
        .collect()
}

fn subscribe() -> Harness {
    let mut h = Harness::new();
    h.create_storage(s(1));
    h.add_replica(ReplicaId(1));
    h.add_replica(ReplicaId(2));
    h.create(sink_on_storage(s(1), u(1), SinkConnection::Subscribe { with_snapshot: true }, 0)).unwrap();
    h
}

#[test]
fn subscribe_time_ranges_are_forwarded_once_whatever_the_replica_count() {
    let mut h = subscribe();
    h.respond(ReplicaId(1), batch(0, 3, vec![(0, row(1), 1), (2, row(2), 1)]));
    h.respond(ReplicaId(2), batch(0, 2, vec![(0, row(1), 1)]));
    h.respond(ReplicaId(2), batch(2, 5, vec![(2, row(2), 1), (4, row(4), 1)]));
    h.respond(ReplicaId(1), batch(3, 5, vec![(4, row(4), 1)]));
    assert_eq!(
        forwarded(&h),
        vec![(f(0), f(3), vec![(0, row(1), 1), (2, row(2), 1)]), (f(3), f(5), vec![(4, row(4), 1)]),]
    );
    // The subscribe's since trails what was forwarded by one step, so a rehydrated replica restarts
    // below it and the controller drops what it re-emits.
    assert_eq!(h.since(u(1)), f(4));
}

#[test]
fn a_subscribe_batch_that_leaves_a_gap_gets_its_replica_disconnected_and_the_stream_continues_without_it() {
    let mut h = subscribe();
    h.respond(ReplicaId(1), batch(0, 3, vec![(0, row(1), 1)]));
    // Replica 2 skips [3, 5): forwarding this would lose the updates in between.
    h.respond(ReplicaId(2), batch(5, 7, vec![(6, row(6), 1)]));
    assert_eq!(h.disconnects.len(), 1);
    assert_eq!(h.disconnects[0].0, ReplicaId(2));
    assert!(h.disconnects[0].1.contains("beyond"), "{}", h.disconnects[0].1);
    // Nothing of the gapped batch was forwarded; replica 1 continues the stream where it stood.
    h.respond(ReplicaId(1), batch(3, 7, vec![(4, row(4), 1), (6, row(6), 1)]));
    assert_eq!(
        forwarded(&h),
        vec![(f(0), f(3), vec![(0, row(1), 1)]), (f(3), f(7), vec![(4, row(4), 1), (6, row(6), 1)])]
    );
}

#[test]
fn a_subscribe_with_an_until_closes_its_stream_there_and_delivers_nothing_at_or_beyond_it() {
    let mut h = Harness::new();
    h.create_storage(s(1));
    h.add_replica(ReplicaId(1));
    let mut desc = sink_on_storage(s(1), u(1), SinkConnection::Subscribe { with_snapshot: true }, 0);
    desc.until = f(4);
    h.create(desc).unwrap();
    h.respond(ReplicaId(1), batch(0, 2, vec![(1, row(1), 1)]));
    // The replica computes past the until: the controller cuts the batch there and closes the stream.
    h.respond(ReplicaId(1), batch(2, 6, vec![(3, row(3), 1), (4, row(4), 1), (5, row(5), 1)]));
    h.respond(ReplicaId(1), batch(6, 8, vec![(7, row(7), 1)]));
    assert_eq!(
        forwarded(&h),
        vec![(f(0), f(2), vec![(1, row(1), 1)]), (f(2), Antichain::new(), vec![(3, row(3), 1)])]
    );
    // Finished: dropping it announces no `DroppedAt`, and it goes away once the replica reports it gone.
    h.core.drop_collections(&[u(1)]).unwrap();
    h.drain();
    let dropped = h.responses.iter().any(|r| {
        matches!(
            r,
            ComputeControllerResponse::SubscribeResponse { response: SubscribeResponse::DroppedAt(_), .. }
        )
    });
    assert!(!dropped, "a finished subscribe announces no DroppedAt");
}

#[test]
fn dropping_a_subscribe_announces_dropped_at_once_and_ignores_the_replicas_own() {
    let mut h = subscribe();
    h.respond(ReplicaId(1), batch(0, 3, vec![]));
    h.core.drop_collections(&[u(1)]).unwrap();
    h.drain();
    h.respond(
        ReplicaId(1),
        ComputeResponse::SubscribeResponse { id: u(1), response: SubscribeResponse::DroppedAt(f(3)) },
    );
    h.respond(ReplicaId(2), batch(0, 9, vec![(5, row(5), 1)]));
    let dropped: Vec<_> = h
        .responses
        .iter()
        .filter(|r| {
            matches!(
                r,
                ComputeControllerResponse::SubscribeResponse {
                    response: SubscribeResponse::DroppedAt(_),
                    ..
                }
            )
        })
        .collect();
    assert_eq!(dropped.len(), 1);
    assert_eq!(forwarded(&h).len(), 1, "nothing is forwarded after the drop");
}

#[test]
fn the_first_copy_to_answer_wins_and_the_copy_to_goes_away() {
    let mut h = Harness::new();
    h.create_storage(s(1));
    h.add_replica(ReplicaId(1));
    h.add_replica(ReplicaId(2));
    h.create(sink_on_storage(s(1), u(1), SinkConnection::CopyTo { directory: "/tmp/x".into() }, 0)).unwrap();
    let copy = |n| ComputeResponse::CopyToResponse { id: u(1), response: CopyToResponse::RowCount(n) };
    h.respond(ReplicaId(2), copy(7));
    h.respond(ReplicaId(1), copy(7));
    let results: Vec<_> = h
        .responses
        .iter()
        .filter(|r| matches!(r, ComputeControllerResponse::CopyToResponse { .. }))
        .collect();
    assert_eq!(results.len(), 1);
    assert!(!h.core.contains_collection(u(1)));
}

#[test]
fn a_materialized_view_compacts_one_step_behind_its_progress() {
    let mut h = Harness::new();
    h.create_storage(s(1));
    h.add_replica(ReplicaId(1));
    h.create(sink_on_storage(s(1), u(1), SinkConnection::MaterializedView { target: s(9) }, 0)).unwrap();
    h.report(ReplicaId(1), u(1), f(10));
    assert_eq!(h.since(u(1)), f(9));
}

#[test]
fn allow_writes_is_sent_once_and_replayed_to_replicas_added_later() {
    let mut h = Harness::new();
    h.add_replica(ReplicaId(1));
    h.core.allow_writes();
    h.core.allow_writes();
    h.drain();
    let sent = |h: &Harness, r| {
        h.commands
            .get(&ReplicaId(r))
            .map_or(0, |c| c.iter().filter(|c| matches!(c, protocol::ComputeCommand::AllowWrites)).count())
    };
    assert_eq!(sent(&h, 1), 1);
    assert!(h.core.writes_allowed());
    let history = h.core.add_replica(ReplicaId(2)).unwrap();
    assert!(history.replay().iter().any(|c| matches!(c, protocol::ComputeCommand::AllowWrites)));
}

/// Whether `replica` was sent `AllowCompaction` to `[]` for `u(1)` (the end of the collection).
fn compacted_away(h: &Harness, replica: ReplicaId) -> bool {
    h.compaction(replica, u(1)) == Some(Antichain::new())
}

#[test]
fn a_finished_subscribe_lets_go_of_its_inputs_before_it_is_dropped_and_goes_away_once_dropped() {
    let mut h = subscribe();
    h.release_storage_policy(s(1));
    h.respond(ReplicaId(1), batch(0, 3, vec![(1, row(1), 1)]));
    assert_eq!(h.storage_since(s(1)), f(0), "a running subscribe holds its input");
    // The stream ends (an until, a sealed input): nothing more will be delivered.
    h.respond(
        ReplicaId(1),
        ComputeResponse::SubscribeResponse {
            id: u(1),
            response: SubscribeResponse::Batch(SubscribeBatch {
                lower: f(3),
                upper: Antichain::new(),
                updates: Ok(vec![]),
            }),
        },
    );
    for r in [ReplicaId(1), ReplicaId(2)] {
        assert!(compacted_away(&h, r), "{r} may drop the dataflow");
        h.report(r, u(1), Antichain::new());
    }
    assert!(h.storage_since(s(1)).is_empty(), "nothing holds the input any more");
    assert!(h.core.contains_collection(u(1)), "the subscribe lives until the user drops it");
    assert_eq!(h.core.collection_frontiers(u(1)).unwrap().upper, Antichain::new(), "it writes nothing more");
    h.core.drop_collections(&[u(1)]).unwrap();
    h.drain();
    assert_eq!(h.core.collection_count(), 0, "{}", h.core.describe_collection(u(1)));
}

#[test]
fn a_finished_subscribe_is_removed_on_its_drop_even_if_a_replica_reconnected_or_joined_in_between() {
    let mut h = subscribe();
    h.respond(ReplicaId(1), batch(0, 3, vec![]));
    let error = SubscribeBatch { lower: f(3), upper: f(4), updates: Err("division by zero".to_string()) };
    h.respond(
        ReplicaId(1),
        ComputeResponse::SubscribeResponse { id: u(1), response: SubscribeResponse::Batch(error) },
    );
    assert!(compacted_away(&h, ReplicaId(1)), "an errored stream is finished too");
    h.report(ReplicaId(2), u(1), f(2));
    assert_eq!(
        h.core.collection_frontiers(u(1)).unwrap().upper,
        Antichain::new(),
        "an errored stream writes nothing more, whatever a replica reports after it"
    );
    // Replica 2 reconnects (its replay leaves the compacted subscribe out) and replica 3 joins: neither
    // will ever report on it.
    h.status(ReplicaId(2), replica_client::ReplicaStatus::Failed { reason: "gone".into(), retry_in_ms: 10 });
    h.status(ReplicaId(2), replica_client::ReplicaStatus::Ready);
    h.add_replica(ReplicaId(3));
    h.report(ReplicaId(1), u(1), Antichain::new());
    h.core.drop_collections(&[u(1)]).unwrap();
    h.drain();
    assert_eq!(h.core.collection_count(), 0, "{}", h.core.describe_collection(u(1)));
}
