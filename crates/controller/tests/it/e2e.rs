//! End to end: the async `ComputeController` against real compute replicas (the `compute` crate, started
//! in-process with one worker each) over loopback TCP, on an embedded in-memory storage.
//!
//! Each test writes a table through storage, keeps the updates it wrote as the oracle ([`Table`]), and
//! checks what the controller and the replicas make of them: the compaction chain, a replica restart with
//! rehydration and an exactly-once subscribe, a controller restart that running replicas
//! reconcile, the peek hold with two replicas (one slowed by a pausable TCP proxy, [`Proxy`]), a peek
//! while its instance task is busy, and introspection in storage. Waits poll with a bounded number of
//! short sleeps and fail with what they last saw.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use compute::ReplicaHandle;
use controller::{
    ComputeController, ComputeControllerResponse, ComputeInstanceConfig, InstanceCoreConfig,
    IntrospectionKind, PeekOptions, PeekResult, ReplicaLocation,
};
use frontiers::{Antichain, PartialOrder};
use protocol::{
    Datum, Diff, GlobalId, InstanceId, PeekId, PeekTarget, ReplicaId, Row, SinkConnection, SubscribeBatch,
    SubscribeResponse,
};
use storage::{AppendRequest, InProcess, StorageCollections, StoreConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::harness::{
    FrontiersHooked, any_port, controller_config, desc, eventually, f, index_on_index, index_on_storage, kv,
    lag, no_as_of, sink_on_storage, start_replica, u,
};

const INSTANCE: InstanceId = InstanceId(1);
const R1: ReplicaId = ReplicaId(1);
const R2: ReplicaId = ReplicaId(2);

fn new_storage() -> Arc<InProcess> {
    Arc::new(InProcess::in_memory(StoreConfig::default()))
}

/// Stops a replica without blocking the runtime's thread.
async fn stop(replica: ReplicaHandle) {
    tokio::task::spawn_blocking(move || replica.shutdown()).await.expect("replica shutdown");
}

fn at(addr: SocketAddr) -> ReplicaLocation {
    ReplicaLocation::Unmanaged { addresses: vec![addr.to_string()] }
}

async fn new_controller(storage: &Arc<InProcess>, introspection: bool) -> ComputeController {
    new_controller_on(Arc::clone(storage) as _, introspection).await
}

async fn new_controller_on(storage: Arc<dyn StorageCollections>, introspection: bool) -> ComputeController {
    let config = controller_config(introspection);
    let mut controller = ComputeController::new(storage, None, config).await.expect("controller");
    controller.create_instance(INSTANCE, controller.default_instance_config()).expect("instance");
    controller
}

struct Table {
    id: GlobalId,
    upper: u64,
    updates: Vec<(Row, u64, Diff)>,
}

impl Table {
    /// Creates the collection with a read policy that follows its upper, so only holds keep it back.
    async fn create(storage: &InProcess, id: GlobalId) -> Table {
        storage.create_collection(id, desc()).await.expect("create table");
        storage.set_read_policy(id, lag(0)).await.expect("table read policy");
        Table { id, upper: 0, updates: Vec::new() }
    }

    /// Writes `rounds` times, one time each: two inserts, and from the fourth time on, a retraction of a
    /// row inserted three times earlier.
    async fn advance(&mut self, storage: &InProcess, rounds: u64) {
        for _ in 0..rounds {
            let t = self.upper;
            let mut updates = vec![(kv(t, 1), t, 1), (kv(t % 5, t), t, 1)];
            if t >= 3 {
                updates.push((kv(t - 3, 1), t, -1));
            }
            let request = AppendRequest {
                id: self.id,
                updates: updates.clone(),
                expected_upper: f(t),
                new_upper: f(t + 1),
            };
            storage.append(vec![request]).await.expect("append");
            self.updates.extend(updates);
            self.upper = t + 1;
        }
    }

    /// The table's contents at `time`.
    fn contents_at(&self, time: u64) -> BTreeMap<Row, u64> {
        let mut contents: BTreeMap<Row, Diff> = BTreeMap::new();
        for (row, t, diff) in &self.updates {
            if *t <= time {
                *contents.entry(row.clone()).or_default() += diff;
            }
        }
        contents.into_iter().filter(|(_, d)| *d != 0).map(|(row, d)| (row, d as u64)).collect()
    }
}

fn rows_of(result: PeekResult) -> Result<BTreeMap<Row, u64>, String> {
    match result {
        Ok(rows) => {
            let mut out = BTreeMap::new();
            for (row, count) in rows {
                *out.entry(row).or_default() += count.get();
            }
            Ok(out)
        }
        other => Err(format!("peek did not return rows: {other:?}")),
    }
}

async fn peek_index(controller: &ComputeController, id: GlobalId, time: u64) -> BTreeMap<Row, u64> {
    let handle = controller
        .peek(INSTANCE, PeekTarget::Index { id }, time, PeekOptions::default())
        .await
        .expect("peek accepted");
    rows_of(handle.result().await).expect("peek answered")
}

async fn storage_since(storage: &InProcess, id: GlobalId) -> Antichain<u64> {
    storage.frontiers(id).await.expect("storage frontiers").since
}

/// The controller's (since, upper) of a compute collection.
fn frontiers_of(controller: &ComputeController, id: GlobalId) -> (Antichain<u64>, Antichain<u64>) {
    let frontiers = controller.collection_frontiers(INSTANCE, id).expect("live collection");
    (frontiers.since, frontiers.upper)
}

async fn wait_for_uppers(controller: &ComputeController, ids: &[GlobalId], upper: u64) {
    eventually(&format!("uppers of {ids:?} reach {upper}"), async || {
        for id in ids {
            let (_, got) = frontiers_of(controller, *id);
            if got != f(upper) {
                return Err(format!("{id} has upper {got:?}"));
            }
        }
        Ok(())
    })
    .await;
}

// -------------------------------------------------------------------------------------------------
// Instances

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_instance_runs_with_the_configuration_it_was_created_with() {
    let storage = new_storage();
    let mut table = Table::create(&storage, u(1)).await;
    table.advance(&storage, 3).await;
    let (first, second) = (start_replica(&storage, any_port()), start_replica(&storage, any_port()));
    // `INSTANCE` has the controller's defaults (indexes lag their upper by 1); `other` lags by 5.
    let mut controller = new_controller(&storage, false).await;
    let other = InstanceId(2);
    let config = controller.default_instance_config();
    let lagging = ComputeInstanceConfig {
        core: InstanceCoreConfig { default_index_policy: lag(5), ..config.core.clone() },
        ..config
    };
    controller.create_instance(other, lagging).expect("second instance");
    controller.add_replica(INSTANCE, R1, at(first.local_addr())).await.expect("add first replica");
    controller.add_replica(other, R1, at(second.local_addr())).await.expect("add second replica");
    let (near, far) = (u(11), u(12));
    controller.create_dataflow(INSTANCE, no_as_of(index_on_storage(table.id, near, 0))).await.expect("near");
    controller.create_dataflow(other, no_as_of(index_on_storage(table.id, far, 0))).await.expect("far");
    table.advance(&storage, 10).await;
    eventually("each index follows its instance's policy", async || {
        let near = controller.collection_frontiers(INSTANCE, near).map_err(|e| e.to_string())?;
        let far = controller.collection_frontiers(other, far).map_err(|e| e.to_string())?;
        let got = (near.since, near.upper, far.since, far.upper);
        if got == (f(12), f(13), f(8), f(13)) { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await;
    drop(controller);
    stop(first).await;
    stop(second).await;
}

// -------------------------------------------------------------------------------------------------
// The compaction chain

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_hold_on_the_top_of_a_chain_of_real_indexes_keeps_storage_back_and_lags_hold_at_each_level() {
    let storage = new_storage();
    let mut table = Table::create(&storage, u(1)).await;
    table.advance(&storage, 5).await;
    let replica = start_replica(&storage, any_port());
    let mut controller = new_controller(&storage, false).await;
    controller.add_replica(INSTANCE, R1, at(replica.local_addr())).await.expect("add replica");
    let (a, b, c) = (u(11), u(12), u(13));
    for df in [index_on_storage(table.id, a, 0), index_on_index(a, b, 0), index_on_index(b, c, 0)] {
        let df = no_as_of(df);
        controller.create_dataflow(INSTANCE, df).await.expect("create dataflow");
    }

    // A hold on C, at its since, from before any of the new data arrives.
    let hold = controller.acquire_read_hold(INSTANCE, c).await.expect("hold on C");
    let held = hold.since().clone();
    table.advance(&storage, 10).await;
    wait_for_uppers(&controller, &[a, b, c], 15).await;
    // Every index's policy (lag 1) would allow 14 by now, and the table's own policy 15.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for id in [a, b, c] {
        let (since, _) = frontiers_of(&controller, id);
        assert!(PartialOrder::less_equal(&since, &held), "{id}: since {since:?} passed the hold at {held:?}");
    }
    let since = storage_since(&storage, table.id).await;
    assert!(PartialOrder::less_equal(&since, &held), "storage since {since:?} passed the hold at {held:?}");

    drop(hold);
    eventually("everything compacts once the hold is released", async || {
        for id in [a, b, c] {
            let (since, upper) = frontiers_of(&controller, id);
            if since != f(14) {
                return Err(format!("{id}: since {since:?}, upper {upper:?}"));
            }
        }
        match storage_since(&storage, table.id).await {
            since if since == f(14) => Ok(()),
            since => Err(format!("storage since {since:?}")),
        }
    })
    .await;

    // Lags: A 3 behind, C 2 behind, B (lag 1) held by C's import hold.
    controller.set_read_policy(INSTANCE, vec![(a, lag(3)), (c, lag(2))]).await.expect("set read policies");
    table.advance(&storage, 10).await;
    wait_for_uppers(&controller, &[a, b, c], 25).await;
    eventually("sinces trail the uppers by the policies' lags", async || {
        let expected = [(a, 22), (b, 23), (c, 23)];
        for (id, since) in expected {
            let (got, upper) = frontiers_of(&controller, id);
            if got != f(since) {
                return Err(format!("{id}: since {got:?} (want {since}), upper {upper:?}"));
            }
        }
        match storage_since(&storage, table.id).await {
            since if since == f(22) => Ok(()),
            since => Err(format!("storage since {since:?} (want 22: A's import hold)")),
        }
    })
    .await;

    drop(controller);
    stop(replica).await;
}

// -------------------------------------------------------------------------------------------------
// Replica restart

/// A subscribe's batches as forwarded by the controller, checked to cover each time range exactly once.
/// Creates, as-ofs selected by the controller, an index on `table` and a subscribe (with its snapshot)
/// on it; returns the subscribe's as-of.
async fn index_and_subscribe(
    controller: &ComputeController,
    table: &Table,
    index: GlobalId,
    subscribe: GlobalId,
) -> Antichain<u64> {
    controller
        .create_dataflow(INSTANCE, no_as_of(index_on_storage(table.id, index, 0)))
        .await
        .expect("index");
    let connection = SinkConnection::Subscribe { with_snapshot: true };
    controller
        .create_dataflow(INSTANCE, no_as_of(sink_on_storage(table.id, subscribe, connection, 0)))
        .await
        .expect("subscribe")
}

struct SubscribeLog {
    id: GlobalId,
    as_of: u64,
    forwarded: Antichain<u64>,
    updates: BTreeMap<(u64, Row), Diff>,
}

impl SubscribeLog {
    fn new(id: GlobalId, as_of: &Antichain<u64>) -> Self {
        SubscribeLog {
            id,
            as_of: as_of.as_option().copied().expect("an as-of"),
            forwarded: as_of.clone(),
            updates: BTreeMap::new(),
        }
    }

    /// Takes every response the controller has ready, absorbing this subscribe's batches.
    fn drain(&mut self, controller: &mut ComputeController) {
        while let Some(response) = controller.try_process() {
            if let ComputeControllerResponse::SubscribeResponse { id, response } = response
                && id == self.id
            {
                match response {
                    SubscribeResponse::Batch(batch) => self.absorb(batch),
                    SubscribeResponse::DroppedAt(at) => panic!("subscribe dropped at {at:?}"),
                }
            }
        }
    }

    /// Drains the controller until this subscribe has been forwarded up to `upper`.
    async fn wait_until_forwarded(&mut self, controller: &mut ComputeController, upper: u64) {
        eventually(&format!("the subscribe reaches {upper}"), async || {
            self.drain(controller);
            if self.forwarded == f(upper) { Ok(()) } else { Err(format!("forwarded {:?}", self.forwarded)) }
        })
        .await;
    }

    fn absorb(&mut self, batch: SubscribeBatch<u64>) {
        assert_eq!(
            batch.lower, self.forwarded,
            "each batch starts where the last one ended (no gap, no overlap)"
        );
        assert!(
            PartialOrder::less_equal(&batch.lower, &batch.upper),
            "batch [{:?}, {:?})",
            batch.lower,
            batch.upper
        );
        for (time, row, diff) in batch.updates.expect("subscribe updates") {
            assert!(
                batch.lower.less_equal(&time) && !batch.upper.less_equal(&time),
                "update at {time} outside its batch"
            );
            *self.updates.entry((time, row)).or_default() += diff;
        }
        self.forwarded = batch.upper;
    }

    /// The updates the subscribe must have forwarded, given the table, up to `self.forwarded`: the
    /// snapshot at the as-of, then every later update at its own time.
    fn expected(&self, table: &Table) -> BTreeMap<(u64, Row), Diff> {
        let mut expected: BTreeMap<(u64, Row), Diff> = BTreeMap::new();
        for (row, time, diff) in &table.updates {
            if self.forwarded.less_equal(time) {
                continue;
            }
            *expected.entry(((*time).max(self.as_of), row.clone())).or_default() += diff;
        }
        expected.retain(|_, d| *d != 0);
        expected
    }

    fn consolidated(&self) -> BTreeMap<(u64, Row), Diff> {
        self.updates.iter().filter(|(_, d)| **d != 0).map(|(k, d)| (k.clone(), *d)).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_rehydrates_the_live_dataflows_answers_peeks_and_the_subscribe_forwards_every_update_once()
 {
    let storage = new_storage();
    let mut table = Table::create(&storage, u(1)).await;
    table.advance(&storage, 5).await;
    let replica = start_replica(&storage, any_port());
    let addr = replica.local_addr();
    let mut controller = new_controller(&storage, false).await;
    controller.add_replica(INSTANCE, R1, at(addr)).await.expect("add replica");
    let (index, subscribe, dropped) = (u(11), u(12), u(13));
    let as_of = index_and_subscribe(&controller, &table, index, subscribe).await;
    // A dataflow the replica built and that was then dropped: the compacted history must not replay it.
    controller
        .create_dataflow(INSTANCE, no_as_of(index_on_storage(table.id, dropped, 0)))
        .await
        .expect("index");
    eventually("the replica reports the doomed index", async || {
        let reported =
            controller.inspect(INSTANCE, move |core| core.replica_write_frontier(R1, dropped)).await;
        if reported.expect("instance").is_some() { Ok(()) } else { Err("not yet".to_string()) }
    })
    .await;
    controller.drop_collections(INSTANCE, vec![dropped]).await.expect("drop");
    let mut log = SubscribeLog::new(subscribe, &as_of);

    table.advance(&storage, 5).await;
    wait_for_uppers(&controller, &[index], 10).await;
    log.wait_until_forwarded(&mut controller, 10).await;
    assert_eq!(log.consolidated(), log.expected(&table), "subscribe before the restart");
    assert_eq!(replica.dataflows_built(), 3);

    // Kill the replica; the table moves on while it is down; a new one starts on the same address.
    stop(replica).await;
    table.advance(&storage, 5).await;
    let replica = start_replica(&storage, addr);
    table.advance(&storage, 5).await;
    wait_for_uppers(&controller, &[index], 20).await;
    log.wait_until_forwarded(&mut controller, 20).await;
    assert_eq!(replica.dataflows_built(), 2, "the replacement builds the live dataflows only");
    assert_eq!(log.consolidated(), log.expected(&table), "no duplicated or missing subscribe rows");
    assert_eq!(peek_index(&controller, index, 19).await, table.contents_at(19), "peek at the latest time");

    drop(controller);
    stop(replica).await;
}

// -------------------------------------------------------------------------------------------------
// As-of selection racing a since

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_that_moves_past_the_chosen_as_of_before_the_holds_are_taken_makes_the_controller_choose_again()
 {
    let inner = new_storage();
    let mut table = Table::create(&inner, u(1)).await;
    let other_reader = inner.acquire_read_hold(table.id, f(0)).await.expect("hold at 0");
    table.advance(&inner, 5).await;
    // Storage that drops the other reader's hold right after it next answers `frontiers`: the since then
    // moves past what the controller just read, as when another reader releases its hold at that moment.
    let release_after_frontiers = Arc::new(std::sync::Mutex::new(Some(other_reader)));
    let release = Arc::clone(&release_after_frontiers);
    let storage = Arc::new(FrontiersHooked {
        inner: Arc::clone(&inner),
        hook: Box::new(move |inner, id| {
            let release = Arc::clone(&release);
            Box::pin(async move {
                let frontiers = inner.frontiers(id).await;
                let hold = release.lock().expect("test lock").take();
                if let (Some(hold), Ok(read)) = (hold, &frontiers) {
                    drop(hold);
                    // Storage applies the release on its own time: wait until the since has moved, then
                    // answer with what was read before.
                    for _ in 0..3_000 {
                        match inner.frontiers(id).await {
                            Ok(now) if now.since == read.since => {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            _ => break,
                        }
                    }
                }
                frontiers
            })
        }),
    });
    let controller = new_controller_on(Arc::clone(&storage) as _, false).await;
    let df = no_as_of(index_on_storage(table.id, u(11), 0));
    // The first choice, from since 0 and upper 5, is 4; the since is 5 by the time the hold is taken.
    let as_of = controller.create_dataflow(INSTANCE, df).await.expect("the controller chooses again");
    let since = storage_since(&inner, table.id).await;
    assert_eq!(since, f(5), "the other reader's release let the table compact to its upper");
    assert!(PartialOrder::less_equal(&since, &as_of), "as-of {as_of:?} before the since {since:?}");
    assert!(
        release_after_frontiers.lock().expect("test lock").is_none(),
        "the race happened: the hold was released after the first frontiers read"
    );
    drop(controller);
}

// -------------------------------------------------------------------------------------------------
// Controller restart

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_controller_recreating_the_same_dataflows_is_reconciled_by_the_running_replica_without_rebuilding()
 {
    let storage = new_storage();
    let mut table = Table::create(&storage, u(1)).await;
    table.advance(&storage, 5).await;
    let replica = start_replica(&storage, any_port());
    let (a, b) = (u(11), u(12));
    let dataflows = [index_on_storage(table.id, a, 0), index_on_index(a, b, 0)].map(no_as_of);

    let mut first = new_controller(&storage, false).await;
    first.add_replica(INSTANCE, R1, at(replica.local_addr())).await.expect("add replica");
    for df in &dataflows {
        first.create_dataflow(INSTANCE, df.clone()).await.expect("create dataflow");
    }
    table.advance(&storage, 5).await;
    wait_for_uppers(&first, &[a, b], 10).await;
    let built = replica.dataflows_built();
    assert_eq!(built, 2);
    drop(first);

    table.advance(&storage, 5).await;
    // The new controller re-creates the dataflows before it adds the replica: a replica reconciles the
    // history it is replayed on connecting with what it runs, and drops whatever that history lacks.
    let mut second = new_controller(&storage, false).await;
    let as_of_a = second.create_dataflow(INSTANCE, dataflows[0].clone()).await.expect("re-create A");
    let since = storage_since(&storage, table.id).await;
    assert!(
        PartialOrder::less_equal(&since, &as_of_a),
        "A's as-of {as_of_a:?} is before the table's since {since:?}"
    );
    let as_of_b = second.create_dataflow(INSTANCE, dataflows[1].clone()).await.expect("re-create B");
    let (since, _) = frontiers_of(&second, a);
    assert!(
        PartialOrder::less_equal(&since, &as_of_b),
        "B's as-of {as_of_b:?} is before A's since {since:?}"
    );

    second.add_replica(INSTANCE, R1, at(replica.local_addr())).await.expect("add replica again");
    table.advance(&storage, 5).await;
    wait_for_uppers(&second, &[a, b], 20).await;
    assert_eq!(replica.dataflows_built(), built, "the replica kept its dataflows instead of rebuilding them");
    for id in [a, b] {
        assert_eq!(peek_index(&second, id, 19).await, table.contents_at(19), "peek {id}");
    }

    drop(second);
    stop(replica).await;
}

// -------------------------------------------------------------------------------------------------
// Peek holds with two replicas

/// A TCP proxy in front of a replica that can hold back everything the replica sends (a slow replica).
struct Proxy {
    addr: SocketAddr,
    paused: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind(any_port()).await.expect("proxy listen");
        let addr = listener.local_addr().expect("proxy address");
        let (paused, _) = watch::channel(false);
        let pause = paused.clone();
        let task = tokio::spawn(async move {
            let mut pumps = JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else { continue };
                for stream in [&inbound, &outbound] {
                    stream.set_nodelay(true).expect("nodelay");
                }
                let (from_controller, to_controller) = inbound.into_split();
                let (from_replica, to_replica) = outbound.into_split();
                pumps.spawn(pump(from_controller, to_replica, None));
                pumps.spawn(pump(from_replica, to_controller, Some(pause.subscribe())));
            }
        });
        Proxy { addr, paused, task }
    }

    fn pause(&self, paused: bool) {
        self.paused.send_replace(paused);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut pause: Option<watch::Receiver<bool>>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(pause) = &mut pause
            && pause.wait_for(|paused| !*paused).await.is_err()
        {
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// The pending peeks' (id, hold, replicas owing an answer).
async fn peek_holds(controller: &ComputeController) -> Vec<(PeekId, Option<Antichain<u64>>, usize)> {
    let holds = controller.inspect(INSTANCE, |core| core.peek_holds()).await.expect("instance");
    holds.into_iter().map(|(uuid, _, hold, outstanding)| (uuid, hold, outstanding)).collect()
}

/// Takes responses until the notification of `uuid`, and returns the replica whose answer won.
async fn winner(controller: &mut ComputeController, uuid: PeekId) -> Option<ReplicaId> {
    loop {
        let response = tokio::time::timeout(Duration::from_secs(30), controller.process())
            .await
            .expect("a peek notification")
            .expect("the controller is live");
        if let ComputeControllerResponse::PeekNotification(n) = response
            && n.uuid == uuid
        {
            return n.replica;
        }
    }
}

/// Peeks `index` at `time` while the slow replica (R2) is paused: the answer is the table's contents
/// there and comes from the fast replica (R1). Returns the peek's id.
async fn peek_won_by_the_fast_replica(
    controller: &mut ComputeController,
    table: &Table,
    index: GlobalId,
    time: u64,
) -> PeekId {
    let handle = controller
        .peek(INSTANCE, PeekTarget::Index { id: index }, time, PeekOptions::default())
        .await
        .expect("peek");
    let uuid = handle.uuid;
    assert_eq!(rows_of(handle.result().await), Ok(table.contents_at(time)));
    assert_eq!(winner(controller, uuid).await, Some(R1));
    uuid
}

/// Waits until no peek holds anything and `index`'s since has moved on to `since`.
async fn peek_hold_released(controller: &ComputeController, what: &str, index: GlobalId, since: u64) {
    eventually(what, async || {
        let (holds, (current, _)) = (peek_holds(controller).await, frontiers_of(controller, index));
        if holds.is_empty() && current == f(since) {
            Ok(())
        } else {
            Err(format!("holds {holds:?}, since {current:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peek_answered_by_the_fast_replica_holds_the_index_until_the_slow_one_answers_or_is_dropped() {
    let storage = new_storage();
    let mut table = Table::create(&storage, u(1)).await;
    table.advance(&storage, 5).await;
    let (fast, slow) = (start_replica(&storage, any_port()), start_replica(&storage, any_port()));
    let proxy = Proxy::start(slow.local_addr()).await;
    let mut controller = new_controller(&storage, false).await;
    controller.add_replica(INSTANCE, R1, at(fast.local_addr())).await.expect("add fast replica");
    controller.add_replica(INSTANCE, R2, at(proxy.addr)).await.expect("add slow replica");
    let index = u(11);
    let df = no_as_of(index_on_storage(table.id, index, 0));
    controller.create_dataflow(INSTANCE, df).await.expect("create index");
    table.advance(&storage, 5).await;
    eventually("both replicas report the index at 10", async || {
        let reported = controller
            .inspect(INSTANCE, move |core| [R1, R2].map(|r| core.replica_write_frontier(r, index)))
            .await
            .expect("instance");
        if reported.iter().all(|r| r.as_ref() == Some(&f(10))) {
            Ok(())
        } else {
            Err(format!("{reported:?}"))
        }
    })
    .await;

    // The slow replica answers nothing until resumed: the fast one wins, the hold stays.
    proxy.pause(true);
    let uuid = peek_won_by_the_fast_replica(&mut controller, &table, index, 9).await;
    assert_eq!(peek_holds(&controller).await, vec![(uuid, Some(f(9)), 1)], "held for the slow replica");
    table.advance(&storage, 5).await;
    wait_for_uppers(&controller, &[index], 15).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(frontiers_of(&controller, index).0, f(9), "the peek hold keeps the index at the peek time");
    proxy.pause(false);
    peek_hold_released(&controller, "the hold goes once the slow replica answered", index, 14).await;

    // Again, but the slow replica is dropped instead of answering.
    proxy.pause(true);
    let uuid = peek_won_by_the_fast_replica(&mut controller, &table, index, 14).await;
    table.advance(&storage, 5).await;
    wait_for_uppers(&controller, &[index], 20).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(peek_holds(&controller).await, vec![(uuid, Some(f(14)), 1)]);
    assert_eq!(frontiers_of(&controller, index).0, f(14));
    controller.drop_replica(INSTANCE, R2).await.expect("drop slow replica");
    peek_hold_released(&controller, "the hold goes with the dropped replica", index, 19).await;

    drop(controller);
    drop(proxy);
    stop(fast).await;
    stop(slow).await;
}

// -------------------------------------------------------------------------------------------------
// A peek while its instance task is busy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peek_is_accepted_or_refused_at_once_while_its_instance_task_is_busy_and_answered_after() {
    let storage = new_storage();
    let mut table = Table::create(&storage, u(1)).await;
    table.advance(&storage, 5).await;
    let replica = start_replica(&storage, any_port());
    let controller = {
        let mut controller = new_controller(&storage, false).await;
        controller.add_replica(INSTANCE, R1, at(replica.local_addr())).await.expect("add replica");
        let index = index_on_storage(table.id, u(11), 0);
        controller.create_dataflow(INSTANCE, no_as_of(index)).await.expect("create index");
        controller
    };
    wait_for_uppers(&controller, &[u(11)], 5).await;
    let (since, _) = frontiers_of(&controller, u(11));
    let time = *since.as_option().expect("a live index");

    let busy_ms = 1_000;
    let (busy_done, (accepted, refused)) = tokio::join!(
        // The instance task runs this on its own thread and can do nothing else meanwhile.
        controller.inspect(INSTANCE, move |_| std::thread::sleep(Duration::from_millis(busy_ms))),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let limit = Duration::from_millis(busy_ms / 4);
            let options = PeekOptions::default();
            let accepted = tokio::time::timeout(
                limit,
                controller.peek(INSTANCE, PeekTarget::Index { id: u(11) }, time, options.clone()),
            )
            .await;
            let refused = tokio::time::timeout(
                limit,
                controller.peek(INSTANCE, PeekTarget::Index { id: u(99) }, 0, options),
            )
            .await;
            (accepted, refused)
        }
    );
    busy_done.expect("instance");
    let handle = accepted.expect("the peek returns without waiting for the busy task").expect("accepted");
    let refused = refused.expect("a refusal does not wait for the busy task either");
    assert!(matches!(refused, Err(controller::PeekError::CollectionMissing(_))), "got {refused:?}");
    // The index follows its upper (lag 0), so the peek's time becomes complete with the next write.
    table.advance(&storage, 1).await;
    assert_eq!(rows_of(handle.result().await).expect("rows"), table.contents_at(time));

    drop(controller);
    stop(replica).await;
}

// -------------------------------------------------------------------------------------------------
// Introspection

/// The rows of an introspection collection at its latest complete time, read with a storage peek.
async fn introspection_rows(
    controller: &ComputeController,
    kind: IntrospectionKind,
) -> Result<Vec<Row>, String> {
    let id = kind.default_id();
    let upper = controller.storage().frontiers(id).await.map_err(|e| e.to_string())?.upper;
    let Some(time) = upper.as_option().and_then(|t| t.checked_sub(1)) else {
        return Err(format!("{} has upper {upper:?}", kind.name()));
    };
    let handle = controller
        .peek(INSTANCE, PeekTarget::Storage { id }, time, PeekOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows_of(handle.result().await)?.into_keys().collect())
}

/// Whether some row starts with `prefix`.
fn has_row(rows: &[Row], prefix: &[Datum<'_>]) -> bool {
    rows.iter().any(|row| row.unpack().starts_with(prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_collections_in_storage_describe_the_replica_and_its_collections_and_can_be_peeked() {
    let storage = new_storage();
    let mut table = Table::create(&storage, u(1)).await;
    table.advance(&storage, 5).await;
    let replica = start_replica(&storage, any_port());
    let mut controller = new_controller(&storage, true).await;
    controller.add_replica(INSTANCE, R1, at(replica.local_addr())).await.expect("add replica");
    let index = u(11);
    let df = no_as_of(index_on_storage(table.id, index, 0));
    controller.create_dataflow(INSTANCE, df).await.expect("create index");
    table.advance(&storage, 5).await;
    wait_for_uppers(&controller, &[index], 10).await;
    assert_eq!(peek_index(&controller, index, 9).await, table.contents_at(9));

    let (instance, replica_name, collection) = (INSTANCE.to_string(), R1.to_string(), index.to_string());
    let (instance, replica_name, collection) =
        (instance.as_str(), replica_name.as_str(), collection.as_str());
    let expectations: [(IntrospectionKind, Vec<Datum<'_>>); 4] = [
        (
            IntrospectionKind::Frontiers,
            vec![
                Datum::Text(instance),
                Datum::Text(replica_name),
                Datum::Text(collection),
                Datum::Timestamp(10),
            ],
        ),
        (
            IntrospectionKind::Hydration,
            vec![
                Datum::Text(instance),
                Datum::Text(replica_name),
                Datum::Text(collection),
                Datum::Bool(true),
            ],
        ),
        (
            IntrospectionKind::ReplicaStatus,
            vec![Datum::Text(instance), Datum::Text(replica_name), Datum::Text("connected")],
        ),
        (IntrospectionKind::PeekDurations, vec![Datum::Text(instance), Datum::Text(replica_name)]),
    ];
    for (kind, prefix) in &expectations {
        eventually(&format!("{} has a row starting {prefix:?}", kind.name()), async || {
            let rows = introspection_rows(&controller, *kind).await?;
            if has_row(&rows, prefix) { Ok(()) } else { Err(format!("rows {rows:?}")) }
        })
        .await;
    }

    // The same facts through the API, and in the metrics.
    let hydration = controller.hydration_status(INSTANCE, index).await.expect("a live index");
    assert_eq!(hydration.len(), 1);
    assert_eq!((hydration[0].replica, hydration[0].hydrated), (R1, true));
    let since = hydration[0].hydrating_since_ms.expect("connected");
    assert_eq!(hydration[0].hydration_time_ms, hydration[0].hydrated_at_ms.map(|at| at - since));
    let lags = controller.wallclock_lag(INSTANCE, index).await.expect("a live index");
    // The table's times are small numbers, so the lag is about the clock's whole value.
    assert!(lags[0].lag_ms.is_some_and(|lag| lag > 1_000_000), "{lags:?}");
    assert_eq!(
        controller.replica_statuses(INSTANCE).await.expect("instance"),
        vec![(R1, controller::ReplicaHealth::Connected)]
    );
    let registry = controller.metrics_registry().expect("metrics on").clone();
    eventually("the index's lag is observed", async || {
        let text = telemetry::encode_text(&registry);
        let line = format!(
            "compute_controller_wallclock_lag_seconds_count{{collection=\"{index}\",instance=\"{INSTANCE}\"}}"
        );
        if text.contains(&line) { Ok(()) } else { Err(text) }
    })
    .await;

    drop(controller);
    stop(replica).await;
}

/// The rows of an introspection collection at its latest complete time, with their multiplicities.
async fn introspection_contents(
    controller: &ComputeController,
    kind: IntrospectionKind,
) -> Result<BTreeMap<Row, u64>, String> {
    let id = kind.default_id();
    let upper = controller.storage().frontiers(id).await.map_err(|e| e.to_string())?.upper;
    let Some(time) = upper.as_option().and_then(|t| t.checked_sub(1)) else {
        return Err(format!("{} has upper {upper:?}", kind.name()));
    };
    let handle = controller
        .peek(INSTANCE, PeekTarget::Storage { id }, time, PeekOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    rows_of(handle.result().await)
}

/// The instance core's current rows of an introspection relation, each once: what storage should hold.
async fn core_introspection(controller: &ComputeController, kind: IntrospectionKind) -> BTreeMap<Row, u64> {
    let rows =
        controller.inspect(INSTANCE, move |core| core.introspection().rows(kind)).await.expect("instance");
    rows.into_iter().map(|row| (row, 1)).collect()
}

fn status_row(replica: ReplicaId, status: &str) -> Row {
    let (instance, replica) = (INSTANCE.to_string(), replica.to_string());
    Row::pack([Datum::Text(&instance), Datum::Text(&replica), Datum::Text(status), Datum::Null])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_listen_on_the_replica_status_collection_sees_the_replica_connect() {
    let storage = new_storage();
    let mut table = Table::create(&storage, u(1)).await;
    table.advance(&storage, 5).await;
    let mut controller = new_controller(&storage, true).await;
    let id = IntrospectionKind::ReplicaStatus.default_id();
    // Subscribe from the latest complete time (or the start), before the replica exists.
    let upper = storage.frontiers(id).await.expect("status collection").upper;
    let as_of = upper.as_option().map_or(0, |t| t.saturating_sub(1));
    let mut listen = storage.listen(id, as_of).await.expect("listen");

    let replica = start_replica(&storage, any_port());
    controller.add_replica(INSTANCE, R1, at(replica.local_addr())).await.expect("add replica");
    controller
        .create_dataflow(INSTANCE, no_as_of(index_on_storage(table.id, u(11), 0)))
        .await
        .expect("index");
    table.advance(&storage, 1).await;

    // The first event is the snapshot at the as-of, from before the replica existed; the row arrives later.
    let snapshot = match listen.next().await.expect("snapshot") {
        storage::ListenEvent::Updates(updates) => updates,
        other => panic!("a listen starts with its snapshot, not {other:?}"),
    };
    assert_eq!(snapshot, vec![], "no replica yet");
    let expected = BTreeMap::from([(status_row(R1, "connected"), 1)]);
    let mut contents: BTreeMap<Row, Diff> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let event = tokio::time::timeout_at(deadline, listen.next())
            .await
            .unwrap_or_else(|_| panic!("no `connected` row after 30 s; contents {contents:?}"))
            .expect("listen event");
        match event {
            storage::ListenEvent::Updates(updates) => {
                for (row, _, diff) in updates {
                    *contents.entry(row).or_default() += diff;
                }
                contents.retain(|_, d| *d != 0);
            }
            storage::ListenEvent::Progress(_) if contents == expected => break,
            storage::ListenEvent::Progress(_) => {}
        }
    }

    drop(controller);
    stop(replica).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_replaces_the_introspection_rows_its_predecessor_left_in_storage() {
    let storage = new_storage();
    let mut table = Table::create(&storage, u(1)).await;
    table.advance(&storage, 5).await;
    let replica = start_replica(&storage, any_port());

    let mut first = new_controller(&storage, true).await;
    first.add_replica(INSTANCE, R1, at(replica.local_addr())).await.expect("add replica");
    first.create_dataflow(INSTANCE, no_as_of(index_on_storage(table.id, u(11), 0))).await.expect("index");
    table.advance(&storage, 1).await;
    eventually("the first controller's rows are in storage", async || {
        let status = introspection_contents(&first, IntrospectionKind::ReplicaStatus).await?;
        let frontiers = introspection_contents(&first, IntrospectionKind::Frontiers).await?;
        if status == BTreeMap::from([(status_row(R1, "connected"), 1)]) && frontiers.len() == 1 {
            Ok(())
        } else {
            Err(format!("status {status:?}, frontiers {frontiers:?}"))
        }
    })
    .await;
    drop(first);

    // The second controller has another index, on the same replica.
    let mut second = new_controller(&storage, true).await;
    second.create_dataflow(INSTANCE, no_as_of(index_on_storage(table.id, u(12), 0))).await.expect("index");
    second.add_replica(INSTANCE, R1, at(replica.local_addr())).await.expect("add replica again");
    table.advance(&storage, 1).await;
    let old = u(11).to_string();
    eventually("storage holds exactly the second controller's rows", async || {
        for kind in
            [IntrospectionKind::ReplicaStatus, IntrospectionKind::Hydration, IntrospectionKind::Frontiers]
        {
            let (stored, wanted) =
                (introspection_contents(&second, kind).await?, core_introspection(&second, kind).await);
            if stored != wanted || wanted.is_empty() {
                return Err(format!("{}: stored {stored:?}, the controller's {wanted:?}", kind.name()));
            }
        }
        let lag = introspection_contents(&second, IntrospectionKind::WallclockLag).await?;
        if lag.keys().any(|row| row.unpack().contains(&Datum::Text(&old))) {
            return Err(format!("stale wall-clock lag rows: {lag:?}"));
        }
        Ok(())
    })
    .await;
    let status = introspection_contents(&second, IntrospectionKind::ReplicaStatus).await.expect("status");
    assert_eq!(status, BTreeMap::from([(status_row(R1, "connected"), 1)]), "one row, not a duplicate");

    drop(second);
    stop(replica).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_introspection_collection_whose_upper_is_unknown_keeps_its_updates_until_it_can_be_written() {
    use std::sync::atomic::Ordering::SeqCst;
    let inner = new_storage();
    let withheld = IntrospectionKind::ReplicaStatus.default_id();
    // Storage whose `frontiers` of the status collection fails until it is let through.
    let let_through = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let storage = Arc::new(FrontiersHooked {
        inner: Arc::clone(&inner),
        hook: {
            let (let_through, refused) = (Arc::clone(&let_through), Arc::clone(&refused));
            Box::new(move |inner, id| {
                if id == withheld && !let_through.load(SeqCst) {
                    refused.fetch_add(1, SeqCst);
                    return Box::pin(std::future::ready(Err(storage::ReadError::Disconnected)));
                }
                Box::pin(async move { inner.frontiers(id).await })
            })
        },
    });
    let replica = start_replica(&inner, any_port());
    let mut controller = new_controller_on(Arc::clone(&storage) as _, true).await;
    controller.add_replica(INSTANCE, R1, at(replica.local_addr())).await.expect("add replica");
    eventually("the core has the replica connected", async || {
        let rows = core_introspection(&controller, IntrospectionKind::ReplicaStatus).await;
        if rows == BTreeMap::from([(status_row(R1, "connected"), 1)]) {
            Ok(())
        } else {
            Err(format!("{rows:?}"))
        }
    })
    .await;
    // Let the writer run a few rounds that skip the status collection while writing the others.
    let refused_before = refused.load(SeqCst);
    let written =
        inner.frontiers(IntrospectionKind::PeekDurations.default_id()).await.expect("frontiers").upper;
    eventually("more rounds skip the status collection and write the others", async || {
        let now = inner
            .frontiers(IntrospectionKind::PeekDurations.default_id())
            .await
            .map_err(|e| e.to_string())?;
        let rounds = refused.load(SeqCst) - refused_before;
        if rounds >= 3 && now.upper != written { Ok(()) } else { Err(format!("{rounds} rounds")) }
    })
    .await;

    let_through.store(true, SeqCst);
    eventually("the status collection gets the rows withheld", async || {
        let rows = introspection_contents(&controller, IntrospectionKind::ReplicaStatus).await?;
        if rows == BTreeMap::from([(status_row(R1, "connected"), 1)]) {
            Ok(())
        } else {
            Err(format!("{rows:?}"))
        }
    })
    .await;

    drop(controller);
    stop(replica).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_on_a_sealed_table_is_removed_once_dropped_after_its_replica_reported_it_closed() {
    let storage = new_storage();
    let mut table = Table::create(&storage, u(1)).await;
    table.advance(&storage, 3).await;
    let replica = start_replica(&storage, any_port());
    let mut controller = new_controller(&storage, false).await;
    controller.add_replica(INSTANCE, R1, at(replica.local_addr())).await.expect("add replica");
    let index = u(11);
    controller
        .create_dataflow(INSTANCE, no_as_of(index_on_storage(table.id, index, 0)))
        .await
        .expect("index");
    let seal = AppendRequest {
        id: table.id,
        updates: Vec::new(),
        expected_upper: f(3),
        new_upper: Antichain::new(),
    };
    storage.append(vec![seal]).await.expect("seal the table");
    eventually("the replica reports the index closed", async || {
        let reported = controller.inspect(INSTANCE, move |core| core.replica_write_frontier(R1, index)).await;
        match reported.map_err(|e| e.to_string())? {
            Some(upper) if upper.is_empty() => Ok(()),
            other => Err(format!("reported {other:?}")),
        }
    })
    .await;
    // The replica says nothing more about a closed index when it is dropped.
    controller.drop_collections(INSTANCE, vec![index]).await.expect("drop the index");
    eventually("the dropped index's state goes away", async || {
        let count =
            controller.inspect(INSTANCE, |core| core.collection_count()).await.map_err(|e| e.to_string())?;
        if count == 0 { Ok(()) } else { Err(format!("{count} collections")) }
    })
    .await;
    drop(controller);
    stop(replica).await;
}
