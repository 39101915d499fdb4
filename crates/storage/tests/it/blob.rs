//! The `Blob` conformance suite, run against every backend: in-memory, local files and S3 (`moto_server`).
//! It checks the contract of `storage::blob`: missing keys read as `None`, values round-trip exactly
//! (empty, binary, several MiB), listing is by directory (not by string prefix), deletes are idempotent,
//! and concurrent writers of distinct keys all land.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use storage::blob::Blob;

use crate::backends::on_every_backend;

async fn the_blob_contract_holds(blob: Arc<dyn Blob>) {
    assert_eq!(blob.get("a/missing").await.unwrap(), None);

    blob.set("a/one", Bytes::from_static(b"1")).await.unwrap();
    assert_eq!(blob.get("a/one").await.unwrap(), Some(Bytes::from_static(b"1")));
    blob.set("a/empty", Bytes::new()).await.unwrap();
    assert_eq!(blob.get("a/empty").await.unwrap(), Some(Bytes::new()));
    let large: Bytes = (0..3 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    blob.set("a/b/large", large.clone()).await.unwrap();
    assert_eq!(blob.get("a/b/large").await.unwrap(), Some(large));
    blob.set("ab/x", Bytes::from_static(&[0, 255, 0])).await.unwrap();

    let keys =
        |metas: Vec<storage::blob::BlobMeta>| metas.into_iter().map(|m| m.key).collect::<BTreeSet<_>>();
    let listed = keys(blob.list("a").await.unwrap());
    assert_eq!(
        listed,
        ["a/b/large", "a/empty", "a/one"].map(String::from).into(),
        "a directory, not a prefix"
    );
    let sizes: Vec<u64> = blob.list("a/b").await.unwrap().into_iter().map(|m| m.size_bytes).collect();
    assert_eq!(sizes, [3 << 20]);
    assert!(blob.list("nothing").await.unwrap().is_empty());

    blob.delete("a/one").await.unwrap();
    blob.delete("a/one").await.unwrap();
    blob.delete("a/never").await.unwrap();
    assert_eq!(blob.get("a/one").await.unwrap(), None);
    assert_eq!(keys(blob.list("a").await.unwrap()).len(), 2);

    let mut writers = Vec::new();
    for w in 0..16 {
        let blob = Arc::clone(&blob);
        writers.push(tokio::spawn(async move {
            for i in 0..8 {
                blob.set(&format!("c/{w}-{i}"), Bytes::from(format!("{w}:{i}"))).await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(blob.list("c").await.unwrap().len(), 128);
    assert_eq!(blob.get("c/7-3").await.unwrap(), Some(Bytes::from("7:3")));
    let everything = keys(blob.list("").await.unwrap());
    assert!(everything.contains("ab/x") && everything.contains("c/0-0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_blob_backend_meets_the_blob_contract() {
    on_every_backend(async |stores| the_blob_contract_holds(stores.blob().await).await).await;
}
