//! Materialized views take their upper from what storage has durably, not from the replicas' reports:
//! the core fed storage uppers through `InstanceCore::storage_upper` (upper and since follow storage,
//! regressions ignored, a view never fed behaves as before), and end to end a real replica whose reports
//! run ahead of its appends while writes are not allowed, then a view whose upper, once past a time, is
//! readable there in storage.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use compute::{ReplicaConfig, ReplicaServer};
use controller::{ComputeController, ComputeControllerResponse, ReplicaLocation};
use frontiers::{Antichain, PartialOrder, ReadPolicy};
use protocol::{Diff, GlobalId, InstanceId, ReplicaId, Row, SinkConnection};
use storage::{AppendRequest, InProcess, StorageCollections, StoreConfig};

use crate::harness::{Harness, controller_config, desc, eventually, f, kv, s, sink_on_storage, u};

const R1: ReplicaId = ReplicaId(1);

/// A harness with storage collection `s(1)`, one replica, and materialized view `u(1)` over `s(1)` into
/// `s(9)` at as-of 0.
fn view_into_s9() -> Harness {
    let mut h = Harness::new();
    h.create_storage(s(1));
    h.add_replica(R1);
    h.create(sink_on_storage(s(1), u(1), SinkConnection::MaterializedView { target: s(9) }, 0)).unwrap();
    h
}

fn storage_upper(h: &mut Harness, id: GlobalId, upper: u64) {
    h.core.storage_upper(id, f(upper));
    h.drain();
}

fn upper(h: &Harness, id: GlobalId) -> Antichain<u64> {
    h.core.collection_frontiers(id).expect("collection state").upper
}

/// Every `FrontierUpper` announced for `id`, in order.
fn announced(h: &Harness, id: GlobalId) -> Vec<Antichain<u64>> {
    h.responses
        .iter()
        .filter_map(|r| match r {
            ComputeControllerResponse::FrontierUpper { id: i, upper, .. } if *i == id => Some(upper.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_materialized_view_reported_ahead_of_its_targets_storage_upper_has_the_storage_upper_and_since() {
    let mut h = Harness::new();
    h.create_storage(s(1));
    h.add_replica(R1);
    storage_upper(&mut h, s(9), 0);
    h.create(sink_on_storage(s(1), u(1), SinkConnection::MaterializedView { target: s(9) }, 2)).unwrap();
    h.report(R1, u(1), f(10));
    assert_eq!(upper(&h, u(1)), f(0), "nothing is durable yet, not even the as-of");
    assert_eq!(h.since(u(1)), f(2), "the since stays at the as-of");
    assert!(announced(&h, u(1)).is_empty());

    storage_upper(&mut h, s(9), 4);
    assert_eq!(upper(&h, u(1)), f(4));
    assert_eq!(h.since(u(1)), f(3), "the since follows storage one step behind");
    assert_eq!(h.compaction(R1, u(1)), Some(f(3)));
    // The replica's own frontier, which drives hydration and its input holds, is still its report.
    assert_eq!(h.core.replica_write_frontier(R1, u(1)), Some(f(10)));

    storage_upper(&mut h, s(9), 10);
    assert_eq!(upper(&h, u(1)), f(10));
    assert_eq!(h.since(u(1)), f(9));
    assert_eq!(announced(&h, u(1)), vec![f(4), f(10)]);
}

#[test]
fn a_storage_upper_that_regresses_is_ignored() {
    let mut h = view_into_s9();
    storage_upper(&mut h, s(9), 7);
    h.report(R1, u(1), f(12));
    storage_upper(&mut h, s(9), 5);
    assert_eq!(upper(&h, u(1)), f(7));
    assert_eq!(h.since(u(1)), f(6));
    // Later reports still count only from beyond the last upper fed.
    storage_upper(&mut h, s(9), 6);
    assert_eq!(upper(&h, u(1)), f(7));
    storage_upper(&mut h, s(9), 8);
    assert_eq!(upper(&h, u(1)), f(8));
    assert_eq!(announced(&h, u(1)), vec![f(7), f(8)]);
}

#[test]
fn a_materialized_view_whose_target_never_got_a_storage_upper_follows_its_replicas() {
    let mut h = view_into_s9();
    // Uppers of other storage collections do not concern it.
    storage_upper(&mut h, s(1), 20);
    storage_upper(&mut h, s(8), 20);
    h.report(R1, u(1), f(10));
    assert_eq!(upper(&h, u(1)), f(10));
    assert_eq!(h.since(u(1)), f(9));
    assert_eq!(announced(&h, u(1)), vec![f(10)]);
}

#[test]
fn a_storage_upper_first_fed_after_the_replicas_reported_never_moves_the_upper_back() {
    let mut h = view_into_s9();
    h.report(R1, u(1), f(10));
    storage_upper(&mut h, s(9), 4);
    assert_eq!(upper(&h, u(1)), f(10));
    assert_eq!(h.since(u(1)), f(9));
    // From now on storage decides: replica reports no longer move it.
    h.report(R1, u(1), f(15));
    assert_eq!(upper(&h, u(1)), f(10));
    storage_upper(&mut h, s(9), 12);
    assert_eq!(upper(&h, u(1)), f(12));
    assert_eq!(h.since(u(1)), f(11));
    assert_eq!(announced(&h, u(1)), vec![f(10), f(12)]);
}

#[test]
fn every_live_view_into_a_target_follows_its_storage_upper_and_a_dropped_one_stops() {
    let mut h = view_into_s9();
    h.create(sink_on_storage(s(1), u(2), SinkConnection::MaterializedView { target: s(9) }, 0)).unwrap();
    storage_upper(&mut h, s(9), 3);
    assert_eq!((upper(&h, u(1)), upper(&h, u(2))), (f(3), f(3)));
    h.core.drop_collections(&[u(2)]).unwrap();
    h.drain();
    storage_upper(&mut h, s(9), 6);
    assert_eq!(upper(&h, u(1)), f(6));
    assert_eq!(announced(&h, u(2)), vec![f(3)]);
}

#[test]
fn a_view_created_after_its_target_was_written_starts_at_the_targets_storage_upper() {
    let mut h = Harness::new();
    h.create_storage(s(1));
    h.add_replica(R1);
    storage_upper(&mut h, s(9), 6);
    h.create(sink_on_storage(s(1), u(1), SinkConnection::MaterializedView { target: s(9) }, 2)).unwrap();
    assert_eq!(upper(&h, u(1)), f(6));
    assert_eq!(h.since(u(1)), f(5));
    // The replica still starts from its as-of: its hold on the input stays there until it reports.
    assert_eq!(h.storage_since(s(1)), f(0), "storage's own policy holds s(1) at 0");
    h.release_storage_policy(s(1));
    assert_eq!(h.storage_since(s(1)), f(2));
}

// -------------------------------------------------------------------------------------------------
// End to end

const INSTANCE: InstanceId = InstanceId(1);

/// Appends `kv(t, 1)` at each time in `from..to` to `table`, one append per time; returns the updates.
async fn insert(storage: &InProcess, table: GlobalId, from: u64, to: u64) -> Vec<(Row, u64, Diff)> {
    let mut written = Vec::new();
    for t in from..to {
        let updates = vec![(kv(t, 1), t, 1)];
        let request =
            AppendRequest { id: table, updates: updates.clone(), expected_upper: f(t), new_upper: f(t + 1) };
        storage.append(vec![request]).await.expect("append");
        written.extend(updates);
    }
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_materialized_views_upper_is_what_its_target_holds_durably_and_is_readable_there() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let (table, target, view) = (u(1), u(2), u(3));
    storage.create_collection(table, desc()).await.expect("create table");
    storage
        .set_read_policy(table, ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 })
        .await
        .unwrap();
    storage.create_collection(target, desc()).await.expect("create target");
    let mut written = insert(&storage, table, 0, 3).await;

    let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let replica = ReplicaServer::start(ReplicaConfig {
        listen,
        workers: 1,
        process: 0,
        timely_addresses: Vec::new(),
        storage: Arc::clone(&storage) as _,
        security: crate::harness::replica_security(),
    })
    .expect("start replica");
    let config = controller_config(false);
    let mut controller =
        ComputeController::new(Arc::clone(&storage) as _, None, config).await.expect("controller");
    controller.create_instance(INSTANCE, controller.default_instance_config()).expect("instance");
    let addresses = vec![replica.local_addr().to_string()];
    controller.add_replica(INSTANCE, R1, ReplicaLocation::Unmanaged { addresses }).await.expect("replica");
    let mut df = sink_on_storage(table, view, SinkConnection::MaterializedView { target }, 0);
    df.as_of = None;
    let as_of = controller.create_dataflow(INSTANCE, df).await.expect("create view");
    written.extend(insert(&storage, table, 3, 6).await);

    // Read-only: the replica computes up to the table's upper and says so, but writes nothing. The view's
    // upper stays where storage is: the empty target's, below the as-of.
    eventually("the replica reports the view at the table's upper", async || {
        let reported = controller.inspect(INSTANCE, move |core| core.replica_write_frontier(R1, view)).await;
        match reported.expect("instance") {
            Some(frontier) if frontier == f(6) => Ok(()),
            other => Err(format!("replica frontier {other:?}")),
        }
    })
    .await;
    let frontiers = controller.collection_frontiers(INSTANCE, view).expect("view");
    assert_eq!(frontiers.upper, f(0), "a read-only replica's progress is not durable");
    assert_eq!(frontiers.since, as_of);
    assert_eq!(storage.frontiers(target).await.expect("target").upper, f(0));

    controller.allow_writes(INSTANCE).await.expect("instance");
    written.extend(insert(&storage, table, 6, 9).await);
    let t = 9;
    eventually(&format!("the view's upper passes {t}"), async || {
        let upper = controller.collection_frontiers(INSTANCE, view).expect("view").upper;
        // Storage only advances: read after the view's upper, it must be at least as far.
        let durable = storage.frontiers(target).await.expect("target").upper;
        assert!(
            PartialOrder::less_equal(&upper, &durable),
            "view upper {upper:?} beyond storage {durable:?}"
        );
        if PartialOrder::less_equal(&f(t), &upper) { Ok(()) } else { Err(format!("upper {upper:?}")) }
    })
    .await;
    let mut expected: BTreeMap<Row, Diff> = BTreeMap::new();
    for (row, time, diff) in written {
        if time < t {
            *expected.entry(row).or_default() += diff;
        }
    }
    let contents: BTreeMap<Row, Diff> =
        storage.snapshot(target, t - 1).await.expect("target readable at t - 1").into_iter().collect();
    assert_eq!(contents, expected);

    drop(controller);
    tokio::task::spawn_blocking(move || replica.shutdown()).await.expect("replica shutdown");
}

#[test]
fn a_materialized_view_whose_upper_closed_lets_go_of_its_inputs_before_it_is_dropped() {
    let mut h = view_into_s9();
    h.release_storage_policy(s(1));
    storage_upper(&mut h, s(9), 5);
    assert_eq!(h.storage_since(s(1)), f(0), "a running view holds its input");
    // Its target is sealed: the view has written everything it ever will.
    h.core.storage_upper(s(9), Antichain::new());
    h.drain();
    assert_eq!(h.compaction(R1, u(1)), Some(Antichain::new()), "the replica may drop the dataflow");
    h.report(R1, u(1), Antichain::new());
    assert!(h.storage_since(s(1)).is_empty(), "nothing holds the input any more");
    assert!(h.core.contains_collection(u(1)), "the view lives until the user drops it");
    h.core.drop_collections(&[u(1)]).unwrap();
    h.drain();
    assert_eq!(h.core.collection_count(), 0);
}
