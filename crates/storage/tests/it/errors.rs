//! Every error case of the storage API, asserted: against the embedded store (and, through the same
//! function, against the shards in `shards.rs`). The shards' I/O faults (a full disk, outages) are in
//! `faults.rs` and `shards.rs`.

use std::sync::Arc;
use std::time::Duration;

use frontiers::{DowngradeError, ReadPolicy};
use protocol::{ColumnType, Datum, Row, ScalarType};
use storage::{
    AppendError, CreateError, DropError, HoldError, InProcess, ListenEvent, ReadError, StorageCollections,
    StoreConfig,
};

use crate::*;

fn short_timeout() -> StoreConfig {
    StoreConfig { snapshot_timeout: Duration::from_millis(200), ..StoreConfig::default() }
}

/// The error cases that need no fault injection, against any implementation.
pub(crate) async fn every_validation_error_is_reported(storage: Arc<dyn StorageCollections>) {
    let id = user(1);
    let other = user(2);
    storage.create_collection(id, int_desc()).await.unwrap();

    // Create: same desc is idempotent, another desc is a mismatch, a dropped id stays dropped.
    storage.create_collection(id, int_desc()).await.unwrap();
    let text_desc = protocol::RelationDesc::new([("s", ColumnType::new(ScalarType::Text, false))]);
    assert_eq!(
        storage.create_collection(id, text_desc.clone()).await,
        Err(CreateError::SchemaMismatch { id })
    );
    storage.create_collection(other, int_desc()).await.unwrap();
    storage.drop_collection(other).await.unwrap();
    assert_eq!(storage.create_collection(other, int_desc()).await, Err(CreateError::AlreadyDropped(other)));

    // Drop of an unknown collection.
    assert_eq!(storage.drop_collection(user(99)).await, Err(DropError::CollectionMissing(user(99))));

    // Append errors, each changing nothing.
    assert_eq!(
        storage.append(vec![append(user(99), vec![], 0, 1)]).await,
        Err(AppendError::CollectionMissing(user(99)))
    );
    storage.append(vec![append(id, vec![(int_row(1), 0, 1)], 0, 5)]).await.unwrap();
    assert_eq!(
        storage.append(vec![append(id, vec![(int_row(2), 3, 1)], 3, 6)]).await,
        Err(AppendError::UpperMismatch { id, expected: at(3), current: at(5) })
    );
    assert_eq!(
        storage.append(vec![append(id, vec![(int_row(2), 9, 1)], 5, 8)]).await,
        Err(AppendError::TimeOutOfRange { id, time: 9, lower: at(5), upper: at(8) })
    );
    assert_eq!(
        storage.append(vec![append(id, vec![(int_row(2), 4, 1)], 5, 8)]).await,
        Err(AppendError::TimeOutOfRange { id, time: 4, lower: at(5), upper: at(8) })
    );
    assert_eq!(
        storage.append(vec![append(id, vec![], 5, 5)]).await,
        Err(AppendError::UpperNotBeyond { id, expected: at(5), new: at(5) })
    );
    assert_eq!(
        storage.append(vec![append(id, vec![], 5, 4)]).await,
        Err(AppendError::UpperNotBeyond { id, expected: at(5), new: at(4) })
    );
    let text_row = Row::pack([Datum::Text("not a number")]);
    match storage.append(vec![append(id, vec![(text_row, 5, 1)], 5, 6)]).await {
        Err(AppendError::RowType {
            id: got,
            row,
            error: protocol::RowTypeError::Column { column: 0, .. },
        }) => {
            assert_eq!(got, id);
            assert!(row.contains("not a number"), "{row}");
        }
        other => panic!("expected a row type error, got {other:?}"),
    }
    let wide_row = Row::pack([Datum::Int64(1), Datum::Int64(2)]);
    assert!(matches!(
        storage.append(vec![append(id, vec![(wide_row, 5, 1)], 5, 6)]).await,
        Err(AppendError::RowType { error: protocol::RowTypeError::Arity { expected: 1, found: 2 }, .. })
    ));
    // An atomic append with one bad part changes nothing anywhere.
    let third = user(3);
    storage.create_collection(third, int_desc()).await.unwrap();
    assert!(matches!(
        storage.append(vec![append(third, vec![(int_row(7), 0, 1)], 0, 1), append(id, vec![], 4, 6)]).await,
        Err(AppendError::UpperMismatch { .. })
    ));
    assert_eq!(storage.frontiers(third).await.unwrap().upper, at(0));
    assert_eq!(storage.frontiers(id).await.unwrap().upper, at(5));
    assert_eq!(storage.snapshot(id, 4).await.unwrap(), vec![(int_row(1), 1)]);

    // Reads.
    assert_eq!(storage.snapshot(user(99), 0).await, Err(ReadError::CollectionMissing(user(99))));
    assert_eq!(storage.frontiers(user(99)).await, Err(ReadError::CollectionMissing(user(99))));
    assert!(matches!(storage.listen(user(99), 0).await, Err(ReadError::CollectionMissing(_))));
    storage.set_read_policy(id, ReadPolicy::ValidFrom(at(3))).await.unwrap();
    assert_eq!(storage.frontiers(id).await.unwrap().since, at(3));
    assert_eq!(storage.snapshot(id, 2).await, Err(ReadError::BeforeSince { id, since: at(3), as_of: 2 }));
    assert!(matches!(storage.listen(id, 2).await, Err(ReadError::BeforeSince { as_of: 2, .. })));
    // The store under test waits 200 ms for an incomplete time, then gives up.
    assert_eq!(storage.snapshot(id, 5).await, Err(ReadError::NotYetReadable { id, upper: at(5), as_of: 5 }));

    // Holds.
    assert!(matches!(storage.acquire_read_hold(user(99), at(0)).await, Err(HoldError::CollectionMissing(_))));
    assert_eq!(
        storage.acquire_read_hold(id, at(2)).await.unwrap_err(),
        HoldError::BeforeSince { id, since: at(3), requested: at(2) }
    );
    assert_eq!(
        storage.set_read_policy(user(99), ReadPolicy::NoPolicy).await,
        Err(HoldError::CollectionMissing(user(99)))
    );
    let mut hold = storage.acquire_read_hold(id, at(4)).await.unwrap();
    assert_eq!(
        hold.try_downgrade(at(3)),
        Err(DowngradeError::NotBeyond { current: at(4), requested: at(3) })
    );
    hold.try_downgrade(at(5)).unwrap();
    drop(hold);

    // A listen on a collection that is dropped ends with `CollectionDropped`.
    let mut listen = storage.listen(id, 4).await.unwrap();
    assert_eq!(listen.next().await.unwrap(), ListenEvent::Updates(vec![(int_row(1), 4, 1)]));
    assert_eq!(listen.next().await.unwrap(), ListenEvent::Progress(at(5)));
    storage.drop_collection(id).await.unwrap();
    assert_eq!(listen.next().await, Err(ReadError::CollectionDropped(id)));
    assert_eq!(listen.next().await, Err(ReadError::CollectionDropped(id)));
}

#[tokio::test]
async fn the_embedded_store_reports_every_validation_error() {
    every_validation_error_is_reported(Arc::new(InProcess::in_memory(short_timeout()))).await;
}

#[tokio::test]
async fn a_snapshot_waiting_for_its_time_returns_once_the_upper_passes_it() {
    let store = memory_store();
    let id = user(1);
    store.create_collection(id, int_desc()).await.unwrap();
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.snapshot(id, 3).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.append(vec![append(id, vec![(int_row(1), 3, 1)], 0, 4)]).await.unwrap();
    assert_eq!(waiter.await.unwrap().unwrap(), vec![(int_row(1), 1)]);
}

#[tokio::test]
async fn a_snapshot_waiting_on_a_collection_that_is_dropped_reports_the_drop() {
    let store = memory_store();
    let id = user(1);
    store.create_collection(id, int_desc()).await.unwrap();
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.snapshot(id, 3).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.drop_collection(id).await.unwrap();
    assert_eq!(waiter.await.unwrap(), Err(ReadError::CollectionDropped(id)));
}

#[tokio::test]
async fn every_call_on_a_shut_down_store_reports_disconnected() {
    let store = memory_store();
    let id = user(1);
    store.create_collection(id, int_desc()).await.unwrap();
    let mut listen = store.listen(id, 0).await.unwrap();
    let mut watch = store.watch_frontiers().await.unwrap();
    store.shutdown().await;
    assert_eq!(store.create_collection(user(2), int_desc()).await, Err(CreateError::Disconnected));
    assert_eq!(store.drop_collection(id).await, Err(DropError::Disconnected));
    assert_eq!(store.append(vec![append(id, vec![], 0, 1)]).await, Err(AppendError::Disconnected));
    assert_eq!(store.snapshot(id, 0).await, Err(ReadError::Disconnected));
    assert_eq!(store.frontiers(id).await, Err(ReadError::Disconnected));
    assert_eq!(store.list_collections().await, Err(ReadError::Disconnected));
    assert_eq!(store.acquire_read_hold(id, at(0)).await.unwrap_err(), HoldError::Disconnected);
    assert_eq!(store.set_read_policy(id, ReadPolicy::NoPolicy).await, Err(HoldError::Disconnected));
    assert_eq!(listen.next().await, Err(ReadError::Disconnected));
    assert_eq!(watch.next().await, Err(ReadError::Disconnected));
}
