//! Every error case of the storage API, asserted, against the embedded store and over TCP.

use std::sync::Arc;

use storage::{Client, StorageCollections};

use crate::*;

async fn basic_round_trip(storage: Arc<dyn StorageCollections>) {
    let id = user(1);
    storage.create_collection(id, int_desc()).await.unwrap();
    storage.create_collection(id, int_desc()).await.unwrap();
    storage.append(vec![append(id, vec![(int_row(1), 0, 1), (int_row(2), 1, 1)], 0, 2)]).await.unwrap();
    assert_eq!(storage.snapshot(id, 1).await.unwrap(), vec![(int_row(1), 1), (int_row(2), 1)]);
    assert_eq!(storage.frontiers(id).await.unwrap().upper, at(2));
    let hold = storage.acquire_read_hold(id, at(1)).await.unwrap();
    drop(hold);
    let mut listen = storage.listen(id, 0).await.unwrap();
    assert_eq!(listen.next().await.unwrap(), storage::ListenEvent::Updates(vec![(int_row(1), 0, 1)]));
    assert_eq!(listen.next().await.unwrap(), storage::ListenEvent::Updates(vec![(int_row(2), 1, 1)]));
    assert_eq!(listen.next().await.unwrap(), storage::ListenEvent::Progress(at(2)));
}

#[tokio::test]
async fn the_embedded_store_answers_a_basic_round_trip() {
    basic_round_trip(Arc::new(memory_store())).await;
}

#[tokio::test]
async fn a_client_answers_a_basic_round_trip_over_tcp() {
    let addr = serve(memory_store()).await;
    basic_round_trip(Arc::new(Client::connect(addr).await.unwrap())).await;
}
