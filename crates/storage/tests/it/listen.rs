//! Listens and frontier watches, in process: event order, fan-out to many listeners, a lagging
//! listener that catches up from the store (not from a queue) while holding the since back, listens that
//! wait for their `as_of`, and watches that report creates, frontier moves and drops; snapshot streams
//! (chunk sizes, the hold on `as_of` while a stream lives, errors), which `shards.rs` runs on shards too.

use std::sync::Arc;
use std::time::Duration;

use frontiers::ReadPolicy;
use protocol::{Diff, Row};
use storage::{CollectionFrontiers, Listen, ListenEvent, ReadError, StorageCollections};

use crate::*;

/// Reads events until `Progress(upper)`; checks the listen invariants on the way and returns the updates.
async fn read_until(
    listen: &mut Listen,
    upper: u64,
    last_progress: &mut Option<u64>,
) -> Vec<(Row, u64, Diff)> {
    let mut updates = Vec::new();
    loop {
        let event =
            tokio::time::timeout(Duration::from_secs(10), listen.next()).await.expect("listen stalled");
        match event.unwrap() {
            ListenEvent::Updates(batch) => {
                for (_, time, _) in &batch {
                    assert!(*time >= listen.as_of());
                    if let Some(progress) = last_progress {
                        assert!(*time >= *progress, "update at {time} behind progress {progress}");
                    }
                }
                updates.extend(batch);
            }
            ListenEvent::Progress(frontier) => {
                let frontier = *frontier.as_option().expect("open collection");
                if let Some(progress) = last_progress {
                    assert!(frontier > *progress, "progress must advance");
                }
                *last_progress = Some(frontier);
                if frontier >= upper {
                    return updates;
                }
            }
        }
    }
}

pub(crate) async fn listens_deliver_the_snapshot_then_every_append(storage: Arc<dyn StorageCollections>) {
    let id = user(1);
    storage.create_collection(id, int_desc()).await.unwrap();
    storage
        .append(vec![append(id, vec![(int_row(1), 0, 1), (int_row(2), 1, 1), (int_row(3), 2, 1)], 0, 3)])
        .await
        .unwrap();

    // A listen at 1 starts with the snapshot at 1 (times advanced to 1), then the update at 2.
    let mut listen = storage.listen(id, 1).await.unwrap();
    assert_eq!(
        listen.next().await.unwrap(),
        ListenEvent::Updates(vec![(int_row(1), 1, 1), (int_row(2), 1, 1)])
    );
    assert_eq!(listen.next().await.unwrap(), ListenEvent::Updates(vec![(int_row(3), 2, 1)]));
    assert_eq!(listen.next().await.unwrap(), ListenEvent::Progress(at(3)));

    // Eight more listeners; every one sees the same appends.
    let mut others = Vec::new();
    for _ in 0..8 {
        let mut other = storage.listen(id, 2).await.unwrap();
        let mut progress = None;
        let snapshot = read_until(&mut other, 3, &mut progress).await;
        assert_eq!(snapshot, vec![(int_row(1), 2, 1), (int_row(2), 2, 1), (int_row(3), 2, 1)]);
        others.push((other, progress));
    }
    for t in 3..20u64 {
        storage
            .append(vec![append(
                id,
                vec![(int_row(t as i64), t, 1), (int_row(1), t, -1), (int_row(1), t, 1)],
                t,
                t + 1,
            )])
            .await
            .unwrap();
    }
    // An empty append only moves the upper.
    storage.append(vec![append(id, vec![], 20, 25)]).await.unwrap();
    let expected: Vec<(Row, u64, Diff)> = (3..20u64).map(|t| (int_row(t as i64), t, 1)).collect();
    let mut progress = Some(3);
    assert_eq!(read_until(&mut listen, 25, &mut progress).await, expected);
    for (other, progress) in &mut others {
        assert_eq!(read_until(other, 25, progress).await, expected);
    }
}

#[tokio::test]
async fn an_embedded_listen_delivers_the_snapshot_then_every_append() {
    listens_deliver_the_snapshot_then_every_append(Arc::new(memory_store())).await;
}

pub(crate) async fn a_lagging_listener_catches_up_from_the_store(storage: Arc<dyn StorageCollections>) {
    let id = user(1);
    storage.create_collection(id, int_desc()).await.unwrap();
    // The policy alone would compact up to the upper.
    storage.set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 }).await.unwrap();
    let mut listen = storage.listen(id, 0).await.unwrap();
    let mut progress = None;
    storage.append(vec![append(id, vec![], 0, 1)]).await.unwrap();
    read_until(&mut listen, 1, &mut progress).await;

    // 500 appends while the listener does not read.
    for t in 1..501u64 {
        storage.append(vec![append(id, vec![(int_row(t as i64), t, 1)], t, t + 1)]).await.unwrap();
    }
    // The listener holds the since where it stopped, so the history it needs is still there.
    assert_eq!(storage.frontiers(id).await.unwrap(), CollectionFrontiers { since: at(1), upper: at(501) });
    // It catches up in a few large events, not 1,000 small ones.
    let mut events = 0;
    let mut updates = Vec::new();
    loop {
        events += 1;
        match listen.next().await.unwrap() {
            ListenEvent::Updates(batch) => updates.extend(batch),
            ListenEvent::Progress(frontier) => {
                assert_eq!(frontier, at(501));
                break;
            }
        }
    }
    assert!(events <= 3, "{events} events");
    assert_eq!(updates, (1..501u64).map(|t| (int_row(t as i64), t, 1)).collect::<Vec<_>>());
    // Having delivered up to 501, it lets the since follow.
    let frontiers = wait_for_since(&*storage, id, 501).await;
    assert_eq!(frontiers.since, at(501));
    drop(listen);
}

pub(crate) async fn wait_for_since(
    storage: &dyn StorageCollections,
    id: protocol::GlobalId,
    since: u64,
) -> CollectionFrontiers {
    for _ in 0..500 {
        let frontiers = storage.frontiers(id).await.unwrap();
        if frontiers.since == at(since) {
            return frontiers;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("since of {id} never reached {since}: {:?}", storage.frontiers(id).await);
}

#[tokio::test]
async fn an_embedded_lagging_listener_catches_up_from_the_store() {
    a_lagging_listener_catches_up_from_the_store(Arc::new(memory_store())).await;
}

#[tokio::test]
async fn a_listen_at_a_future_time_waits_for_the_upper_to_pass_it() {
    let store = memory_store();
    let id = user(1);
    store.create_collection(id, int_desc()).await.unwrap();
    let mut listen = store.listen(id, 5).await.unwrap();
    assert!(listen.try_next().is_none());
    store.append(vec![append(id, vec![(int_row(1), 2, 1)], 0, 5)]).await.unwrap();
    assert!(listen.try_next().is_none(), "5 is not complete yet");
    let reader = tokio::spawn(async move {
        let first = listen.next().await.unwrap();
        let second = listen.next().await.unwrap();
        (first, second)
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.append(vec![append(id, vec![(int_row(2), 6, 1)], 5, 7)]).await.unwrap();
    let (first, second) = reader.await.unwrap();
    assert_eq!(first, ListenEvent::Updates(vec![(int_row(1), 5, 1)]));
    assert_eq!(second, ListenEvent::Updates(vec![(int_row(2), 6, 1)]));
}

#[tokio::test]
async fn a_dropped_listen_releases_its_hold() {
    let store = memory_store();
    let id = user(1);
    store.create_collection(id, int_desc()).await.unwrap();
    store.set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 }).await.unwrap();
    let listen = store.listen(id, 0).await.unwrap();
    store.append(vec![append(id, vec![], 0, 10)]).await.unwrap();
    assert_eq!(store.frontiers(id).await.unwrap().since, at(0));
    drop(listen);
    wait_for_since(&store, id, 10).await;
}

async fn next(watch: &mut storage::FrontierWatch) -> (protocol::GlobalId, Option<CollectionFrontiers>) {
    tokio::time::timeout(Duration::from_secs(10), watch.next()).await.expect("watch stalled").unwrap()
}

pub(crate) async fn a_watch_reports_every_collection_then_every_change(storage: Arc<dyn StorageCollections>) {
    let (a, b) = (user(1), user(2));
    storage.create_collection(a, int_desc()).await.unwrap();
    let mut watch = storage.watch_frontiers().await.unwrap();
    let zero = CollectionFrontiers { since: at(0), upper: at(0) };
    assert_eq!(next(&mut watch).await, (a, Some(zero.clone())));
    storage.create_collection(b, int_desc()).await.unwrap();
    assert_eq!(next(&mut watch).await, (b, Some(zero)));
    storage.append(vec![append(a, vec![], 0, 3)]).await.unwrap();
    assert_eq!(next(&mut watch).await, (a, Some(CollectionFrontiers { since: at(0), upper: at(3) })));
    storage.set_read_policy(a, ReadPolicy::ValidFrom(at(2))).await.unwrap();
    assert_eq!(next(&mut watch).await, (a, Some(CollectionFrontiers { since: at(2), upper: at(3) })));
    storage.drop_collection(b).await.unwrap();
    assert_eq!(next(&mut watch).await, (b, None));
    // Many changes to one collection may be coalesced, but the last one is always reported.
    for t in 3..50u64 {
        storage.append(vec![append(a, vec![], t, t + 1)]).await.unwrap();
    }
    loop {
        let (id, frontiers) = next(&mut watch).await;
        assert_eq!(id, a);
        if frontiers.unwrap().upper == at(50) {
            break;
        }
    }
    assert!(watch.try_next().is_none());
}

#[tokio::test]
async fn an_embedded_watch_reports_every_collection_then_every_change() {
    a_watch_reports_every_collection_then_every_change(Arc::new(memory_store())).await;
}

/// A snapshot stream hands out exactly the snapshot, in chunks that end with the row reaching the size
/// asked for (as owned rows and as rows lent out of chunks), also when the since moves past its `as_of`
/// meanwhile (`holds_as_of`: the since stays at `as_of` while the stream lives), and reports a time
/// before the since as the snapshot does.
pub(crate) async fn snapshot_streams_hand_out_the_snapshot_in_bounded_chunks(
    storage: Arc<dyn StorageCollections>,
    holds_as_of: bool,
) {
    let id = user(1);
    storage.create_collection(id, int_desc()).await.unwrap();
    storage.set_read_policy(id, ReadPolicy::ValidFrom(at(1))).await.unwrap();
    storage.append(vec![append(id, (0..500).map(|x| (int_row(x), 0, 1)).collect(), 0, 1)]).await.unwrap();
    storage.append(vec![append(id, (0..100).map(|x| (int_row(x), 1, -1)).collect(), 1, 2)]).await.unwrap();
    let expected: Vec<(Row, Diff)> = (100..500).map(|x| (int_row(x), 1)).collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(storage.snapshot(id, 1).await.unwrap(), expected_sorted);
    let chunk_bytes = 100;
    let mut stream = storage.snapshot_stream(id, 1, chunk_bytes).await.unwrap();
    // A second stream, read as rows lent out of chunks.
    let mut lent = storage.snapshot_stream(id, 1, chunk_bytes).await.unwrap();
    // The policy moves on while the stream lives.
    storage.set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 }).await.unwrap();
    storage.append(vec![append(id, vec![(int_row(7), 2, 1)], 2, 5)]).await.unwrap();
    let mut rows = Vec::new();
    while let Some(chunk) = stream.next_chunk().await.unwrap() {
        assert!(!chunk.is_empty());
        let sizes: Vec<usize> = chunk.iter().map(|(row, _)| row.byte_len() + 16).collect();
        assert!(sizes[..sizes.len() - 1].iter().sum::<usize>() < chunk_bytes, "chunk of {sizes:?}");
        rows.extend(chunk);
        if holds_as_of {
            assert_eq!(storage.frontiers(id).await.unwrap().since, at(1), "the stream holds its as_of");
        }
    }
    assert_eq!(stream.next_chunk().await.unwrap(), None, "the end stays the end");
    rows.sort();
    assert_eq!(rows, expected_sorted);
    let mut lent_rows = Vec::new();
    while let Some(chunk) = lent.next_rows().await.unwrap() {
        assert!(!chunk.is_empty());
        // The sizes from the rows themselves, not from the chunk's own count.
        let sizes: Vec<usize> = chunk.iter().map(|(row, _)| row.as_bytes().len() + 16).collect();
        assert!(sizes[..sizes.len() - 1].iter().sum::<usize>() < chunk_bytes, "chunk of {sizes:?}");
        lent_rows.extend(chunk.iter().map(|(row, diff)| (row.to_row(), diff)));
    }
    assert_eq!(lent.next_rows().await.unwrap(), None, "the end stays the end");
    lent_rows.sort();
    assert_eq!(lent_rows, expected_sorted, "the lent rows are the snapshot");
    drop((stream, lent));
    wait_for_since(&*storage, id, 5).await;
    match storage.snapshot_stream(id, 1, chunk_bytes).await {
        Err(ReadError::BeforeSince { id: error_id, .. }) => assert_eq!(error_id, id),
        other => panic!("a stream before the since: {other:?}"),
    }
}

#[tokio::test]
async fn an_embedded_snapshot_stream_hands_out_the_snapshot_in_bounded_chunks() {
    snapshot_streams_hand_out_the_snapshot_in_bounded_chunks(Arc::new(memory_store()), false).await;
}
