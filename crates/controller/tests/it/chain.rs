//! The compaction chain: storage → index A → index B → index C.

use controller::lock;
use frontiers::ReadPolicy;
use protocol::ReplicaId;

use crate::harness::{Harness, f, index_on_index, index_on_storage, s, u};

fn chain() -> Harness {
    let mut h = Harness::new();
    h.create_storage(s(1));
    h.add_replica(ReplicaId(1));
    h.create(index_on_storage(s(1), u(1), 0)).unwrap();
    h.create(index_on_index(u(1), u(2), 0)).unwrap();
    h.create(index_on_index(u(2), u(3), 0)).unwrap();
    // From here on only the controller holds the storage collection back.
    h.release_storage_policy(s(1));
    h
}

#[test]
fn a_read_hold_on_the_top_of_a_chain_keeps_storage_compaction_back_until_released() {
    let mut h = chain();
    let hold = lock(&h.core.shared()).acquire_at_since(u(3)).unwrap();
    for id in [u(1), u(2), u(3)] {
        h.report(ReplicaId(1), id, f(10));
    }
    // Every index's own policy (lag 0) would allow 10, but the hold on C keeps the whole chain at 0.
    for id in [u(1), u(2), u(3)] {
        assert_eq!(h.since(id), f(0), "{id}");
    }
    assert_eq!(h.storage_since(s(1)), f(0));

    drop(hold);
    h.core.process_holds();
    h.drain();
    for id in [u(1), u(2), u(3)] {
        assert_eq!(h.since(id), f(10), "{id}");
        assert_eq!(h.compaction(ReplicaId(1), id), Some(f(10)), "AllowCompaction for {id}");
    }
    assert_eq!(h.storage_since(s(1)), f(10));
}

#[test]
fn read_policy_lags_are_honoured_at_each_level_of_the_chain() {
    let mut h = chain();
    h.core
        .set_read_policy(vec![(u(1), ReadPolicy::LagWriteFrontier { lag_ms: 5, granularity_ms: 0 })])
        .unwrap();
    h.core
        .set_read_policy(vec![(u(3), ReadPolicy::LagWriteFrontier { lag_ms: 3, granularity_ms: 0 })])
        .unwrap();
    for id in [u(1), u(2), u(3)] {
        h.report(ReplicaId(1), id, f(20));
    }
    assert_eq!(h.since(u(3)), f(17));
    assert_eq!(h.since(u(2)), f(17), "held by C's import hold");
    assert_eq!(h.since(u(1)), f(15), "its own lag");
    assert_eq!(h.storage_since(s(1)), f(15));
    // NoPolicy freezes a collection where it is.
    h.core.set_read_policy(vec![(u(3), ReadPolicy::NoPolicy)]).unwrap();
    for id in [u(1), u(2), u(3)] {
        h.report(ReplicaId(1), id, f(30));
    }
    assert_eq!(h.since(u(3)), f(17));
    assert_eq!(h.since(u(2)), f(17));
    assert_eq!(h.since(u(1)), f(17), "now B's hold, at C's since, is the slowest");
}

#[test]
fn a_lagging_replica_holds_storage_at_its_own_progress() {
    let mut h = chain();
    h.add_replica(ReplicaId(2));
    for id in [u(1), u(2), u(3)] {
        h.report(ReplicaId(1), id, f(20));
    }
    h.report(ReplicaId(2), u(1), f(5));
    // The collections compact with the fastest replica; storage waits for the slow one.
    assert_eq!(h.since(u(1)), f(20));
    assert_eq!(h.storage_since(s(1)), f(5));
    h.report(ReplicaId(2), u(1), f(20));
    assert_eq!(h.storage_since(s(1)), f(20));
}

#[test]
fn dropping_the_chain_releases_every_hold_and_forgets_every_collection() {
    let mut h = chain();
    h.add_replica(ReplicaId(2));
    for id in [u(1), u(2), u(3)] {
        h.report(ReplicaId(1), id, f(10));
        h.report(ReplicaId(2), id, f(10));
    }
    // Dropping the bottom first: it stays alive (held by B) until the top goes.
    h.core.drop_collections(&[u(1)]).unwrap();
    h.drain();
    assert!(!h.core.contains_collection(u(1)));
    assert_eq!(h.core.collection_count(), 3, "u1 lingers while u2 imports it");
    h.core.drop_collections(&[u(3), u(2)]).unwrap();
    h.drain();
    for id in [u(1), u(2), u(3)] {
        assert_eq!(h.compaction(ReplicaId(1), id), Some(frontiers::Antichain::new()), "{id} compacted to []");
    }
    assert_eq!(h.core.collection_count(), 3, "replicas have not reported the drop yet");
    for replica in [ReplicaId(1), ReplicaId(2)] {
        for id in [u(1), u(2), u(3)] {
            h.report(replica, id, frontiers::Antichain::new());
        }
    }
    assert_eq!(h.core.collection_count(), 0);
    assert!(h.storage_since(s(1)).is_empty(), "storage is no longer held by anyone");
    assert_eq!(lock(&h.core.shared()).len(), 0);
    assert_eq!(h.core.history_len(), 0, "the history forgets dropped dataflows");
}

#[test]
fn a_disconnected_replica_does_not_keep_a_dropped_collection_alive() {
    let mut h = chain();
    h.add_replica(ReplicaId(2));
    h.status(ReplicaId(2), replica_client::ReplicaStatus::Failed { reason: "gone".into(), retry_in_ms: 100 });
    h.core.drop_collections(&[u(3)]).unwrap();
    h.drain();
    h.report(ReplicaId(1), u(3), frontiers::Antichain::new());
    assert_eq!(h.core.collection_count(), 2, "r2 will replay without u3: nothing more to wait for");
}

#[test]
fn a_dataflows_hold_on_a_storage_input_starts_at_its_as_of_even_under_a_fixed_read_policy() {
    // The caller took its storage hold at 0, below the as-of 5; the index's since never moves.
    let mut h = Harness::with_policy(ReadPolicy::ValidFrom(f(5)));
    h.create_storage(s(1));
    h.add_replica(ReplicaId(1));
    let hold = h.storage.acquire(&s(1), f(0)).unwrap();
    h.core
        .create_dataflow(index_on_storage(s(1), u(1), 5), std::collections::BTreeMap::from([(s(1), hold)]))
        .unwrap();
    h.drain();
    h.release_storage_policy(s(1));
    h.report(ReplicaId(1), u(1), f(10));
    assert_eq!(h.since(u(1)), f(5), "the policy keeps the index at its as-of");
    assert_eq!(h.storage_since(s(1)), f(5), "storage is held at the as-of, not where the hold was taken");
}

/// One index on storage `s(1)`, reported closed (`[]`) by both replicas, as a replica reports an index on
/// a sealed table.
fn closed_index() -> Harness {
    let mut h = Harness::new();
    h.create_storage(s(1));
    h.add_replica(ReplicaId(1));
    h.add_replica(ReplicaId(2));
    h.create(index_on_storage(s(1), u(1), 0)).unwrap();
    h.release_storage_policy(s(1));
    h
}

#[test]
fn a_collection_reported_closed_is_removed_after_its_drop_whichever_came_first() {
    // The report first: the replicas say nothing more when the drop comes.
    let mut h = closed_index();
    for r in [ReplicaId(1), ReplicaId(2)] {
        h.report(r, u(1), frontiers::Antichain::new());
    }
    h.core.drop_collections(&[u(1)]).unwrap();
    h.drain();
    assert_eq!(h.core.collection_count(), 0, "{}", h.core.describe_collection(u(1)));
    assert!(h.storage_since(s(1)).is_empty(), "its holds went with it");

    // The drop first, then the reports.
    let mut h = closed_index();
    h.core.drop_collections(&[u(1)]).unwrap();
    h.drain();
    assert_eq!(h.core.collection_count(), 1, "the replicas may still report on it");
    for r in [ReplicaId(1), ReplicaId(2)] {
        h.report(r, u(1), frontiers::Antichain::new());
    }
    assert_eq!(h.core.collection_count(), 0);

    // Each replica in its own order.
    let mut h = closed_index();
    h.report(ReplicaId(1), u(1), frontiers::Antichain::new());
    h.core.drop_collections(&[u(1)]).unwrap();
    h.drain();
    assert_eq!(h.core.collection_count(), 1, "replica 2 may still report on it");
    h.report(ReplicaId(2), u(1), frontiers::Antichain::new());
    assert_eq!(h.core.collection_count(), 0);
}
