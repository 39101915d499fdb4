//! The `StorageCollections` behaviours on shards, on every backend (in-memory; local files + SQLite;
//! S3 + PostgreSQL): the same scenarios `errors.rs` and `listen.rs` run against the embedded store and
//! the TCP client, plus what only shards have: several processes on the same stores, critical holds that
//! survive a restart and leased ones that expire, hold readers moved at most once per hold sync interval,
//! appends retried after lost replies applied exactly
//! once (also atomically across collections), and bad input refused with nothing changed.

use std::sync::Arc;
use std::time::Duration;

use frontiers::{Antichain, PartialOrder, ReadPolicy};
use protocol::{Datum, Row};
use storage::{
    AppendError, CreateError, DropError, HoldError, ListenEvent, ReadError, ShardCollections, ShardConfig,
    StorageCollections,
};

use crate::backends::{Backend, Stores, on_every_backend, quick_config};
use crate::flaky::{Faults, FlakyBlob, FlakyConsensus};
use crate::*;

async fn open(stores: &Stores) -> Arc<dyn StorageCollections> {
    Arc::new(stores.open(quick_config()).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_report_every_validation_error_on_every_backend() {
    on_every_backend(async |stores| {
        crate::errors::every_validation_error_is_reported(open(&stores).await).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_listens_deliver_the_snapshot_then_every_append_on_every_backend() {
    on_every_backend(async |stores| {
        crate::listen::listens_deliver_the_snapshot_then_every_append(open(&stores).await).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_shard_listener_catches_up_from_storage_on_every_backend() {
    on_every_backend(async |stores| {
        crate::listen::a_lagging_listener_catches_up_from_the_store(open(&stores).await).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_watch_reports_every_collection_then_every_change_on_every_backend() {
    on_every_backend(async |stores| {
        crate::listen::a_watch_reports_every_collection_then_every_change(open(&stores).await).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_writer_writes_at_clock_timestamps_on_shards_on_every_backend() {
    on_every_backend(async |stores| {
        crate::table_writer::writes_land_at_clock_timestamps_on(open(&stores).await).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_writer_retries_when_another_process_moved_an_upper_on_every_backend() {
    on_every_backend(async |stores| crate::table_writer::a_writer_retries_on(open(&stores).await).await)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_wait_for_their_time_and_report_a_drop_on_every_backend() {
    on_every_backend(async |stores| {
        let config = ShardConfig { snapshot_timeout: Duration::from_secs(10), ..quick_config() };
        let storage = stores.open(config).await;
        let id = user(1);
        storage.create_collection(id, int_desc()).await.unwrap();
        let waiter = {
            let storage = storage.clone();
            tokio::spawn(async move { storage.snapshot(id, 3).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        storage.append(vec![append(id, vec![(int_row(1), 3, 1)], 0, 4)]).await.unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), vec![(int_row(1), 1)]);

        let waiter = {
            let storage = storage.clone();
            tokio::spawn(async move { storage.snapshot(id, 9).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        storage.drop_collection(id).await.unwrap();
        assert_eq!(waiter.await.unwrap(), Err(ReadError::CollectionDropped(id)));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_snapshot_streams_hand_out_the_snapshot_in_bounded_chunks_on_every_backend() {
    on_every_backend(async |stores| {
        crate::listen::snapshot_streams_hand_out_the_snapshot_in_bounded_chunks(open(&stores).await, true)
            .await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_shard_listen_releases_its_hold_on_every_backend() {
    on_every_backend(async |stores| {
        let storage = open(&stores).await;
        let id = user(1);
        storage.create_collection(id, int_desc()).await.unwrap();
        storage
            .set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 })
            .await
            .unwrap();
        let mut listen = storage.listen(id, 0).await.unwrap();
        storage.append(vec![append(id, vec![(int_row(1), 4, 1)], 0, 10)]).await.unwrap();
        assert_eq!(storage.frontiers(id).await.unwrap().since, at(0));
        assert_eq!(listen.next().await.unwrap(), ListenEvent::Updates(vec![]));
        drop(listen);
        crate::listen::wait_for_since(&*storage, id, 10).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_moves_its_hold_reader_at_most_once_per_hold_sync_interval_on_every_backend() {
    on_every_backend(async |stores| {
        let interval = Duration::from_millis(700);
        let config =
            ShardConfig { hold_sync_interval: interval, background_maintenance: false, ..quick_config() };
        let storage = stores.open(config).await;
        let id = user(1);
        storage.create_collection(id, int_desc()).await.unwrap();
        storage
            .set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 })
            .await
            .unwrap();
        let mut hold = storage.acquire_read_hold(id, at(0)).await.unwrap();
        storage.append(vec![append(id, vec![(int_row(1), 0, 1)], 0, 100)]).await.unwrap();
        let before = storage.stats().commits;
        let started = tokio::time::Instant::now();
        for t in 1..=40 {
            hold.try_downgrade(at(t)).unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let since = storage.frontiers(id).await.unwrap().since;
        // Every move is a commit of this process (no appends, no maintenance meanwhile).
        let moves = storage.stats().commits - before;
        let elapsed = started.elapsed();
        let periods = u64::try_from(elapsed.as_millis() / interval.as_millis()).unwrap();
        assert!(
            moves <= 1 + periods,
            "{moves} moves of the hold reader in {elapsed:?} (interval {interval:?})"
        );
        if elapsed < interval {
            assert_ne!(since, at(40), "the last move waits for the interval");
        }
        // The last move is not lost: it lands once the interval has passed.
        crate::listen::wait_for_since(&storage, id, 40).await;
        drop(hold);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_collections_holds_and_listens_on_every_backend() {
    on_every_backend(async |stores| {
        let a = stores.open(quick_config()).await;
        let b = stores.open(quick_config()).await;
        let id = user(1);
        a.create_collection(id, int_desc()).await.unwrap();
        assert_eq!(b.list_collections().await.unwrap(), vec![(id, int_desc())]);
        b.set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 }).await.unwrap();
        // B's hold keeps A's appends readable from 0.
        let hold = b.acquire_read_hold(id, at(0)).await.unwrap();
        let mut listen = b.listen(id, 0).await.unwrap();
        for t in 0..20u64 {
            a.append(vec![append(id, vec![(int_row(t as i64), t, 1)], t, t + 1)]).await.unwrap();
        }
        assert_eq!(
            a.frontiers(id).await.unwrap(),
            storage::CollectionFrontiers { since: at(0), upper: at(20) }
        );
        let mut seen = Vec::new();
        while seen.len() < 20 {
            match tokio::time::timeout(Duration::from_secs(10), listen.next()).await.unwrap().unwrap() {
                ListenEvent::Updates(updates) => seen.extend(updates),
                ListenEvent::Progress(_) => {}
            }
        }
        seen.sort_by_key(|u| u.1);
        assert_eq!(seen, (0..20u64).map(|t| (int_row(t as i64), t, 1)).collect::<Vec<_>>());
        assert_eq!(a.snapshot(id, 0).await.unwrap(), vec![(int_row(0), 1)]);
        // Racing compare-and-append: exactly one wins, the loser learns the upper.
        let (ra, rb) = tokio::join!(
            a.append(vec![append(id, vec![(int_row(100), 20, 1)], 20, 21)]),
            b.append(vec![append(id, vec![(int_row(200), 20, 1)], 20, 22)]),
        );
        match (ra, rb) {
            (Ok(()), Err(AppendError::UpperMismatch { current, .. })) => assert_eq!(current, at(21)),
            (Err(AppendError::UpperMismatch { current, .. }), Ok(())) => assert_eq!(current, at(22)),
            other => panic!("exactly one append wins: {other:?}"),
        }
        drop((hold, listen));
        crate::listen::wait_for_since(
            &a,
            id,
            a.frontiers(id).await.unwrap().upper.as_option().copied().unwrap(),
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_holds_survive_a_restart_and_leased_holds_expire_on_every_backend() {
    on_every_backend(async |stores| {
        let id = user(1);
        let critical = ShardConfig { critical_reader: Some("controller".into()), ..quick_config() };
        let leased = ShardConfig { reader_lease: Duration::from_millis(300), ..quick_config() };
        // Keeps in-memory stores alive across the "crashes" (they live while some process has them open).
        let _keeper = stores.open(ShardConfig { background_maintenance: false, ..quick_config() }).await;
        let controller = stores.open(critical.clone()).await;
        controller.create_collection(id, int_desc()).await.unwrap();
        controller
            .set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 })
            .await
            .unwrap();
        controller.append(vec![append(id, vec![], 0, 5)]).await.unwrap();
        let hold = controller.acquire_read_hold(id, at(5)).await.unwrap();
        // A crash: the process goes away without releasing anything.
        std::mem::forget(hold);
        drop(controller);

        let replica = stores.open(leased.clone()).await;
        let replica_hold = replica.acquire_read_hold(id, at(7)).await;
        assert!(replica_hold.is_ok(), "{replica_hold:?}");
        replica.append(vec![append(id, vec![], 5, 50)]).await.unwrap();
        assert_eq!(replica.frontiers(id).await.unwrap().since, at(5), "the critical hold survived the crash");
        // The restarted controller can hold at 5 again, then move on.
        let controller = stores.open(critical).await;
        let mut hold = controller.acquire_read_hold(id, at(5)).await.unwrap();
        hold.try_downgrade(at(8)).unwrap();
        crate::listen::wait_for_since(&controller, id, 7).await;
        // The replica crashes: its leased hold at 7 expires once nobody heartbeats it, and the since moves.
        std::mem::forget(replica_hold);
        drop(replica);
        tokio::time::sleep(Duration::from_millis(400)).await;
        controller.maintain(id, false).await.unwrap();
        assert_eq!(controller.frontiers(id).await.unwrap().since, at(8));
        drop(hold);
        crate::listen::wait_for_since(&controller, id, 50).await;
    })
    .await;
}

/// A process whose stores are wrapped in fault injection.
async fn flaky_process(stores: &Stores, config: ShardConfig) -> (ShardCollections, Arc<Faults>, Arc<Faults>) {
    let consensus_faults = Arc::new(Faults::default());
    let blob_faults = Arc::new(Faults::default());
    let consensus =
        Arc::new(FlakyConsensus { inner: stores.consensus().await, faults: Arc::clone(&consensus_faults) });
    let blob = Arc::new(FlakyBlob { inner: stores.blob().await, faults: Arc::clone(&blob_faults) });
    (ShardCollections::from_stores(blob, consensus, config).unwrap(), consensus_faults, blob_faults)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_retried_after_lost_replies_are_applied_exactly_once_on_every_backend() {
    on_every_backend(async |stores| {
        let (storage, consensus, blob) = flaky_process(&stores, quick_config()).await;
        let (a, b) = (user(1), user(2));
        for id in [a, b] {
            storage.create_collection(id, int_desc()).await.unwrap();
        }
        // The compare-and-set commits, its reply is lost: the retry finds the token and stops.
        consensus.lose_replies.store(1, std::sync::atomic::Ordering::SeqCst);
        storage.append(vec![append(a, vec![(int_row(1), 0, 1)], 0, 1)]).await.unwrap();
        // Atomic across collections, with a refused attempt and then a lost reply.
        consensus.fail_writes.store(1, std::sync::atomic::Ordering::SeqCst);
        consensus.lose_replies.store(1, std::sync::atomic::Ordering::SeqCst);
        storage
            .append(vec![
                append(a, vec![(int_row(2), 1, 1)], 1, 2),
                append(b, vec![(int_row(3), 0, 1)], 0, 2),
            ])
            .await
            .unwrap();
        // A blob write that fails, and one whose reply is lost (its part is garbage, not data).
        blob.fail_writes.store(1, std::sync::atomic::Ordering::SeqCst);
        blob.lose_replies.store(1, std::sync::atomic::Ordering::SeqCst);
        storage.append(vec![append(a, vec![(int_row(4), 2, 1)], 2, 3)]).await.unwrap();
        assert_eq!(storage.frontiers(a).await.unwrap().upper, at(3));
        assert_eq!(storage.frontiers(b).await.unwrap().upper, at(2));
        assert_eq!(
            storage.snapshot(a, 2).await.unwrap(),
            vec![(int_row(1), 1), (int_row(2), 1), (int_row(4), 1)]
        );
        assert_eq!(storage.snapshot(b, 1).await.unwrap(), vec![(int_row(3), 1)]);
        // Every batch was recorded once.
        let state = storage.state(a).await.unwrap().unwrap();
        assert_eq!(state.batches.iter().map(|b| b.updates()).sum::<u64>(), 3);
        let retries = storage.stats().retries;
        assert!(retries >= 4, "{retries} retries");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writers_first_append_retried_through_an_outage_is_applied_once_not_called_indeterminate() {
    use std::sync::atomic::Ordering;
    let stores = Stores::new(Backend::Embedded, &mut None).expect("the embedded backend needs no service");
    // Every call fails indeterminately while the store is down: the first attempt may have been applied.
    let (storage, consensus, _) = flaky_process(&stores, quick_config()).await;
    let id = user(1);
    storage.create_collection(id, int_desc()).await.unwrap();
    let outage = |faults: Arc<Faults>| async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        faults.down.store(false, Ordering::SeqCst);
    };
    consensus.down.store(true, Ordering::SeqCst);
    let (result, ()) = tokio::join!(
        storage.append(vec![append(id, vec![(int_row(1), 0, 1)], 0, 1)]),
        outage(Arc::clone(&consensus)),
    );
    // No entry of this writer after the outage, and its lease cannot have run out: nothing was applied,
    // so the append goes ahead, once.
    result.expect("applied after the outage");
    assert_eq!(storage.snapshot(id, 0).await.unwrap(), vec![(int_row(1), 1)]);
    assert_eq!(storage.frontiers(id).await.unwrap().upper, at(1));

    // With a lease that may have run out during the retries, a missing entry could be an applied
    // attempt's, expired: the outcome is unknown, and the error says so.
    let config = ShardConfig { writer_lease: Duration::from_millis(100), ..quick_config() };
    let (short, consensus, _) = flaky_process(&stores, config).await;
    let other = user(2);
    short.create_collection(other, int_desc()).await.unwrap();
    consensus.down.store(true, Ordering::SeqCst);
    let (result, ()) = tokio::join!(
        short.append(vec![append(other, vec![(int_row(2), 0, 1)], 0, 1)]),
        outage(Arc::clone(&consensus)),
    );
    assert!(matches!(result, Err(AppendError::Indeterminate(_))), "{result:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_retry_budget_fails_with_the_outcome_stated() {
    on_every_backend(async |stores| {
        let config = ShardConfig { retry_budget: Duration::from_millis(300), ..quick_config() };
        let (storage, consensus, blob) = flaky_process(&stores, config).await;
        let id = user(1);
        storage.create_collection(id, int_desc()).await.unwrap();
        // The blob store is down: nothing was appended, and it says so.
        blob.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let result = storage.append(vec![append(id, vec![(int_row(1), 0, 1)], 0, 1)]).await;
        assert!(matches!(&result, Err(AppendError::Io(m)) if m.contains("outage")), "{result:?}");
        blob.down.store(false, std::sync::atomic::Ordering::SeqCst);
        // Every compare-and-set loses its reply: the outcome is unknown, and the error says so.
        consensus.lose_replies.store(u32::MAX, std::sync::atomic::Ordering::SeqCst);
        let result = storage.append(vec![append(id, vec![(int_row(1), 0, 1)], 0, 1)]).await;
        assert!(matches!(result, Ok(()) | Err(AppendError::Indeterminate(_))), "{result:?}");
        consensus.lose_replies.store(0, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(storage.frontiers(id).await.unwrap().upper, at(1), "it was applied, once");
        assert_eq!(storage.snapshot(id, 0).await.unwrap(), vec![(int_row(1), 1)]);
        // Reads during an outage fail with `Unavailable` once the budget is spent; so does a hold that
        // needs the stored state (one covered by a hold this process registered before is local).
        let unheld = user(3);
        storage.create_collection(unheld, int_desc()).await.unwrap();
        consensus.down.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(storage.frontiers(id).await, Err(ReadError::Unavailable(_))));
        assert!(matches!(storage.acquire_read_hold(unheld, at(0)).await, Err(HoldError::Unavailable(_))));
        assert!(matches!(storage.create_collection(user(2), int_desc()).await, Err(CreateError::Io(_))));
        assert!(matches!(storage.drop_collection(id).await, Err(DropError::Io(_))));
        consensus.down.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(storage.frontiers(id).await.unwrap().upper, at(1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_typed_error_and_changes_nothing_on_every_backend() {
    on_every_backend(async |stores| {
        let storage = stores.open(quick_config()).await;
        let id = user(1);
        storage.create_collection(id, int_desc()).await.unwrap();
        storage.append(vec![append(id, vec![(int_row(1), 0, i64::MAX - 1)], 0, 1)]).await.unwrap();
        let before = storage.state(id).await.unwrap().unwrap();
        let parts_before = storage.blob().list("u1").await.unwrap().len();
        let cases = [
            // Within the batch.
            vec![(int_row(2), 1, i64::MAX), (int_row(2), 1, 1)],
            vec![(int_row(2), 1, i64::MIN), (int_row(2), 2, -1)],
            // Against the stored counts.
            vec![(int_row(1), 1, 2)],
        ];
        for updates in cases {
            let result = storage.append(vec![append(id, updates, 1, 3)]).await;
            assert!(
                matches!(result, Err(AppendError::DiffOverflow { id: got, .. }) if got == id),
                "{result:?}"
            );
        }
        let wide = Row::pack([Datum::Int64(1), Datum::Int64(2)]);
        assert!(matches!(
            storage.append(vec![append(id, vec![(wide, 1, 1)], 1, 2)]).await,
            Err(AppendError::RowType { .. })
        ));
        // An atomic append with one bad collection changes neither.
        let other = user(2);
        storage.create_collection(other, int_desc()).await.unwrap();
        let result = storage
            .append(vec![
                append(other, vec![(int_row(5), 0, 1)], 0, 1),
                append(id, vec![(int_row(1), 1, 5)], 1, 2),
            ])
            .await;
        assert!(matches!(result, Err(AppendError::DiffOverflow { .. })), "{result:?}");
        assert_eq!(storage.frontiers(other).await.unwrap().upper, at(0));
        let after = storage.state(id).await.unwrap().unwrap();
        assert_eq!(
            (after.upper.clone(), after.batches.clone()),
            (before.upper.clone(), before.batches.clone())
        );
        assert_eq!(storage.blob().list("u1").await.unwrap().len(), parts_before, "no part was written");
        assert!(storage.blob().list("u2").await.unwrap().is_empty(), "no part was left behind");
        // The bound is conservative: a retraction is refused too while it could overflow some sum (the
        // bound adds |diff|s), one that keeps the bound within i64 is not.
        let refused = storage.append(vec![append(id, vec![(int_row(1), 1, -(i64::MAX - 1))], 1, 2)]).await;
        assert!(matches!(refused, Err(AppendError::DiffOverflow { .. })), "{refused:?}");
        storage.append(vec![append(id, vec![(int_row(1), 1, -1)], 1, 2)]).await.unwrap();
        assert_eq!(storage.snapshot(id, 1).await.unwrap(), vec![(int_row(1), i64::MAX - 2)]);
        let _ = Antichain::<u64>::new();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_on_a_shut_down_process_reports_disconnected() {
    on_every_backend(async |stores| {
        let storage = stores.open(quick_config()).await;
        let id = user(1);
        storage.create_collection(id, int_desc()).await.unwrap();
        let mut listen = storage.listen(id, 0).await.unwrap();
        storage.shutdown().await;
        assert_eq!(storage.create_collection(user(2), int_desc()).await, Err(CreateError::Disconnected));
        assert_eq!(storage.drop_collection(id).await, Err(DropError::Disconnected));
        assert_eq!(storage.append(vec![append(id, vec![], 0, 1)]).await, Err(AppendError::Disconnected));
        assert_eq!(storage.snapshot(id, 0).await, Err(ReadError::Disconnected));
        assert_eq!(storage.frontiers(id).await, Err(ReadError::Disconnected));
        assert_eq!(storage.acquire_read_hold(id, at(0)).await.unwrap_err(), HoldError::Disconnected);
        assert_eq!(storage.set_read_policy(id, ReadPolicy::NoPolicy).await, Err(HoldError::Disconnected));
        assert_eq!(listen.next().await, Err(ReadError::Disconnected));
        assert!(matches!(storage.watch_frontiers().await, Err(ReadError::Disconnected)));
        // Another process on the same stores is unaffected.
        let other = stores.open(quick_config()).await;
        assert_eq!(other.frontiers(id).await.unwrap().upper, at(0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_the_registered_reader_covers_is_taken_while_a_move_of_the_reader_waits_for_an_unreachable_store()
 {
    use std::sync::atomic::Ordering;
    let stores = Stores::new(Backend::Embedded, &mut None).expect("the embedded backend needs no service");
    let config = ShardConfig { retry_budget: Duration::from_secs(30), ..quick_config() };
    let (storage, consensus, _) = flaky_process(&stores, config).await;
    let id = user(1);
    storage.create_collection(id, int_desc()).await.unwrap();
    storage.append(vec![append(id, vec![(int_row(1), 0, 1)], 0, 10)]).await.unwrap();
    let first = storage.acquire_read_hold(id, at(2)).await.unwrap();
    let _second = storage.acquire_read_hold(id, at(5)).await.unwrap();

    // The store goes away; the first hold goes: this process's reader starts to move from 2 to 5 and
    // waits for the store, holding its registration.
    consensus.down.store(true, Ordering::SeqCst);
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // At 7 a hold is covered whether the move lands or not: taken at once, without the store.
    let covered = tokio::time::timeout(Duration::from_secs(2), storage.acquire_read_hold(id, at(7))).await;
    assert!(matches!(covered, Ok(Ok(_))), "a covered hold waits for the store: {covered:?}");
    // At 3 it is not (the move in flight takes the reader past it): that one waits for the store.
    let uncovered =
        tokio::time::timeout(Duration::from_millis(500), storage.acquire_read_hold(id, at(3))).await;
    assert!(uncovered.is_err(), "a hold the move would leave behind was taken locally: {uncovered:?}");

    // Once the store is back, the hold at 3 moves the reader back, and the stored since says so.
    consensus.down.store(false, Ordering::SeqCst);
    let _third = storage.acquire_read_hold(id, at(3)).await.unwrap();
    let since = storage.frontiers(id).await.unwrap().since;
    assert!(PartialOrder::less_equal(&since, &at(3)), "the stored since {since:?} is past a hold at 3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_appends_ride_inline_in_the_state_within_its_bound_and_merges_move_them_to_blob_parts_on_every_backend()
 {
    on_every_backend(async |stores| {
        let config = ShardConfig {
            inline_part_bytes: 256,
            max_inline_bytes: 1_024,
            background_maintenance: false,
            max_batches: 1,
            ..crate::backends::inline_config()
        };
        let writer = stores.open(config.clone()).await;
        let reader = stores.open(config).await;
        let id = user(1);
        writer.create_collection(id, int_desc()).await.unwrap();
        writer.set_read_policy(id, ReadPolicy::ValidFrom(at(0))).await.unwrap();
        let mut listen = reader.listen(id, 0).await.unwrap();
        // One-row appends go inline until the state carries the bound; then they go to the blob store.
        let mut t = 0u64;
        while writer.stats().parts_written == 0 {
            assert!(t < 200, "the state's inline bytes never reached their bound");
            writer.append(vec![append(id, vec![(int_row(t as i64), t, 1)], t, t + 1)]).await.unwrap();
            let state = writer.state(id).await.unwrap().unwrap();
            assert!(state.inline_bytes() <= 1_024, "{} inline bytes", state.inline_bytes());
            t += 1;
        }
        let inline = writer.stats().inline_parts;
        assert!(inline >= 4, "{inline} inline parts before the bound");
        assert_eq!(writer.stats().parts_written, 1, "only the append past the bound went to the blob store");
        // A run over `inline_part_bytes` goes to the blob store whatever room the state has.
        let big: Vec<_> = (0..100).map(|x| (int_row(1_000 + x), t, 1)).collect();
        writer.append(vec![append(id, big, t, t + 1)]).await.unwrap();
        assert_eq!(writer.stats().parts_written, 2);
        t += 1;
        // Another process reads the inline parts from the state: its listen and its snapshot.
        let mut expected: Vec<(Row, i64)> = (0..t as i64 - 1).map(|x| (int_row(x), 1)).collect();
        expected.extend((0..100).map(|x| (int_row(1_000 + x), 1)));
        expected.sort();
        assert_eq!(reader.snapshot(id, t - 1).await.unwrap(), expected);
        let mut delivered = Vec::new();
        while delivered.len() < expected.len() {
            match tokio::time::timeout(Duration::from_secs(10), listen.next()).await.unwrap().unwrap() {
                ListenEvent::Updates(updates) => {
                    delivered.extend(updates.into_iter().map(|(r, _, d)| (r, d)))
                }
                ListenEvent::Progress(_) => {}
            }
        }
        delivered.sort();
        assert_eq!(delivered, expected);
        // Compaction merges the inline parts into blob parts; it retires no inline part (nothing to
        // delete) and the contents stay the same.
        let mut merges = 0;
        loop {
            let report = writer.maintain(id, false).await.unwrap();
            merges += report.merges;
            if report.merges == 0 {
                break;
            }
        }
        assert!(merges > 0, "nothing merged");
        let state = writer.state(id).await.unwrap().unwrap();
        assert_eq!(state.inline_bytes(), 0, "merged parts live in the blob store");
        assert!(state.retired.iter().all(|r| !r.part.is_inline()), "an inline part was retired");
        assert_eq!(reader.snapshot(id, t - 1).await.unwrap(), expected);
        writer.shutdown().await;
        reader.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_appends_commit_and_read_while_the_blob_store_is_down_on_every_backend() {
    on_every_backend(async |stores| {
        let (storage, _consensus, blob) = flaky_process(&stores, crate::backends::inline_config()).await;
        let id = user(1);
        storage.create_collection(id, int_desc()).await.unwrap();
        // The blob store is down (every call fails): inline appends and reads of them never call it.
        blob.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in 0..5u64 {
            storage.append(vec![append(id, vec![(int_row(t as i64), t, 1)], t, t + 1)]).await.unwrap();
        }
        assert_eq!(storage.stats().inline_parts, 5);
        assert_eq!(storage.stats().parts_written, 0);
        let expected: Vec<_> = (0..5).map(|x| (int_row(x), 1)).collect();
        assert_eq!(storage.snapshot(id, 4).await.unwrap(), expected);
        storage.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn inline_settings_the_engine_cannot_honour_are_refused() {
    let stores = crate::backends::Stores::new(Backend::Memory, &mut None).expect("memory stores");
    for (config, needle) in [
        (
            ShardConfig { inline_part_bytes: 8_192, max_inline_bytes: 4_096, ..ShardConfig::default() },
            "inline_part_bytes 8192",
        ),
        (ShardConfig { max_inline_bytes: 2 << 20, ..ShardConfig::default() }, "max_inline_bytes 2097152"),
    ] {
        let refused = ShardCollections::open(&stores.blob_config(), &stores.consensus_config(), config).await;
        assert!(
            matches!(&refused, Err(storage::ShardOpenError::Config(m)) if m.contains(needle)),
            "{:?}",
            refused.map(|_| ())
        );
    }
}
