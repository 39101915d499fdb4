//! The table writer with a manual clock: writes land at clock timestamps and advance every table together,
//! timestamps stay strictly increasing when the clock stalls or goes back, ticks advance idle tables, the
//! ticker runs on its own, and another writer's interference is retried.

use std::sync::Arc;
use std::time::Duration;

use storage::{
    Clock, ManualClock, StorageCollections, SystemClock, TableWriteError, TableWriter, TableWriterConfig,
};

use crate::*;

async fn setup(
    clock: &ManualClock,
    config: TableWriterConfig,
) -> (Arc<dyn StorageCollections>, Arc<TableWriter>) {
    setup_on(Arc::new(memory_store()), clock, config).await
}

async fn setup_on(
    storage: Arc<dyn StorageCollections>,
    clock: &ManualClock,
    config: TableWriterConfig,
) -> (Arc<dyn StorageCollections>, Arc<TableWriter>) {
    for n in 1..=3 {
        storage.create_collection(user(n), int_desc()).await.unwrap();
    }
    let writer = Arc::new(TableWriter::new(Arc::clone(&storage), Arc::new(clock.clone()), config));
    for n in 1..=3 {
        writer.register(user(n)).await.unwrap();
    }
    (storage, writer)
}

#[tokio::test]
async fn writes_land_at_clock_timestamps_and_advance_every_table_together() {
    writes_land_at_clock_timestamps_on(Arc::new(memory_store())).await;
}

/// The scenario of the test above on any storage (`shards.rs` runs it on shards).
pub(crate) async fn writes_land_at_clock_timestamps_on(storage: Arc<dyn StorageCollections>) {
    let clock = ManualClock::new(1_000);
    let (storage, writer) = setup_on(storage, &clock, TableWriterConfig::default()).await;
    assert_eq!(writer.insert(user(1), vec![int_row(1), int_row(2)]).await.unwrap(), 1_000);
    for n in 1..=3 {
        assert_eq!(storage.frontiers(user(n)).await.unwrap().upper, at(1_001), "table {n}");
    }
    assert_eq!(storage.snapshot(user(1), 1_000).await.unwrap(), vec![(int_row(1), 1), (int_row(2), 1)]);
    assert_eq!(storage.snapshot(user(2), 1_000).await.unwrap(), vec![]);

    // Same millisecond, a stalled clock, and a clock that goes back: timestamps still increase.
    assert_eq!(writer.insert(user(2), vec![int_row(3)]).await.unwrap(), 1_001);
    clock.set(500);
    assert_eq!(
        writer
            .write(vec![(user(3), vec![(int_row(4), 1)]), (user(1), vec![(int_row(1), -1)])])
            .await
            .unwrap(),
        1_002
    );
    clock.set(2_000);
    assert_eq!(writer.insert(user(3), vec![int_row(5)]).await.unwrap(), 2_000);
    assert_eq!(writer.upper().await, 2_001);
    assert_eq!(storage.snapshot(user(1), 2_000).await.unwrap(), vec![(int_row(2), 1)]);
    assert_eq!(storage.snapshot(user(3), 2_000).await.unwrap(), vec![(int_row(4), 1), (int_row(5), 1)]);

    // Ticks advance idle tables to the clock.
    clock.set(3_000);
    assert_eq!(writer.tick().await.unwrap(), 3_000);
    for n in 1..=3 {
        assert_eq!(storage.frontiers(user(n)).await.unwrap().upper, at(3_000));
    }
    assert_eq!(writer.tick().await.unwrap(), 3_000, "a tick without time passing changes nothing");

    assert_eq!(writer.insert(user(9), vec![int_row(1)]).await, Err(TableWriteError::NotRegistered(user(9))));
}

#[tokio::test]
async fn a_writer_retries_when_another_writer_moved_an_upper() {
    a_writer_retries_on(Arc::new(memory_store())).await;
}

/// The scenario of the test above on any storage (`shards.rs` runs it on shards).
pub(crate) async fn a_writer_retries_on(storage: Arc<dyn StorageCollections>) {
    let clock = ManualClock::new(10);
    let (storage, writer) = setup_on(storage, &clock, TableWriterConfig::default()).await;
    writer.insert(user(1), vec![int_row(1)]).await.unwrap();
    // Someone else advances table 2.
    storage.append(vec![append(user(2), vec![], 11, 15)]).await.unwrap();
    let ts = writer.insert(user(1), vec![int_row(2)]).await.unwrap();
    assert_eq!(ts, 15);
    for n in 1..=3 {
        assert_eq!(storage.frontiers(user(n)).await.unwrap().upper, at(16));
    }
}

#[tokio::test]
async fn the_ticker_advances_the_tables_on_its_own() {
    let clock = ManualClock::new(100);
    let config = TableWriterConfig { tick: Duration::from_millis(10), ..TableWriterConfig::default() };
    let (storage, writer) = setup(&clock, config).await;
    let ticker = writer.spawn_ticker();
    clock.set(5_000);
    let mut reached = false;
    for _ in 0..500 {
        if storage.frontiers(user(3)).await.unwrap().upper == at(5_000) {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(reached, "the ticker never advanced the tables");
    drop(writer);
    tokio::time::timeout(Duration::from_secs(5), ticker)
        .await
        .expect("the ticker ends with its writer")
        .unwrap();
}

#[test]
fn the_system_clock_reads_milliseconds_since_the_epoch() {
    // 2020-01-01 in milliseconds; any real clock is past it.
    assert!(SystemClock.now_ms() > 1_577_836_800_000);
}
