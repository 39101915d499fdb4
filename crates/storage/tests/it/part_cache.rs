//! The process's part cache (`storage::shard::cache`) through the shard engine, on the embedded backend
//! (local files + SQLite), with the store's `get`s counted below the engine:
//!
//! - concurrent snapshots and listens in a fresh process fetch each part once (single flight, then hits),
//!   where the same reads with the cache off fetch it once per reader;
//! - the kept bytes stay within the bound under snapshots, listens and compaction of many small parts,
//!   and every read is still right;
//! - a part damaged in the store is still reported by name through the cache, and the damaged value is
//!   not kept (repaired behind the cache's back, it reads again);
//! - a bound that could keep no part is refused when the engine opens;
//! - a snapshot larger than a quarter of the bound reads through the cache: its parts are not kept and
//!   evict nothing, while a small snapshot's are kept (and, in a cache four times as large, the same
//!   snapshot's).
//!
//! What this does not check: latency (benchmarks measure speed), the other backends (the cache sits above
//! every store alike).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use frontiers::ReadPolicy;
use prometheus::Registry;
use storage::blob::{Blob, BlobMeta};
use storage::external::ExternalError;
use storage::{
    BoxFuture, ListenEvent, ReadError, ShardCollections, ShardConfig, ShardOpenError, StorageCollections,
    StorageMetrics,
};
use telemetry::{encode_text, parse_text, sample_value};

use crate::backends::{Backend, Stores, quick_config};
use crate::*;

/// A blob store that counts the `get`s that reach it, each taking `delay` (so that readers overlap).
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn Blob>,
    gets: AtomicU64,
    delay: Duration,
}

impl Counting {
    fn gets(&self) -> u64 {
        self.gets.load(Ordering::SeqCst)
    }
}

impl Blob for Counting {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, ExternalError>> {
        Box::pin(async move {
            self.gets.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.inner.get(key).await
        })
    }

    fn set<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), ExternalError>> {
        self.inner.set(key, value)
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ExternalError>> {
        self.inner.delete(key)
    }

    fn list<'a>(&'a self, dir: &'a str) -> BoxFuture<'a, Result<Vec<BlobMeta>, ExternalError>> {
        self.inner.list(dir)
    }
}

/// Another process's engine on `stores`, its `get`s counted.
async fn counted_process(stores: &Stores, config: ShardConfig) -> (ShardCollections, Arc<Counting>) {
    let blob = Arc::new(Counting {
        inner: stores.blob().await,
        gets: AtomicU64::new(0),
        delay: Duration::from_millis(30),
    });
    let storage =
        ShardCollections::from_stores(Arc::clone(&blob) as Arc<dyn Blob>, stores.consensus().await, config)
            .unwrap();
    (storage, blob)
}

fn quiet() -> ShardConfig {
    ShardConfig { background_maintenance: false, ..quick_config() }
}

/// Writes `batches` batches of `rows` rows each (times 0, 1, ...) to a new collection; its state's parts.
async fn fill(storage: &ShardCollections, id: protocol::GlobalId, batches: u64, rows: i64) -> usize {
    storage.create_collection(id, int_desc()).await.unwrap();
    storage.set_read_policy(id, ReadPolicy::ValidFrom(at(0))).await.unwrap();
    for t in 0..batches {
        let updates = (0..rows).map(|x| (int_row(x * 100 + t as i64), t, 1)).collect();
        storage.append(vec![append(id, updates, t, t + 1)]).await.unwrap();
    }
    let state = storage.state(id).await.unwrap().unwrap();
    state.batches.iter().map(|b| b.parts.len()).sum()
}

/// Runs `readers` snapshots of `id` at `as_of` at once; each must equal `expected`.
async fn concurrent_snapshots(
    storage: &ShardCollections,
    id: protocol::GlobalId,
    as_of: u64,
    readers: usize,
) -> Vec<Vec<(protocol::Row, i64)>> {
    let reads: Vec<_> = (0..readers)
        .map(|_| {
            let storage = storage.clone();
            tokio::spawn(async move { storage.snapshot(id, as_of).await.unwrap() })
        })
        .collect();
    let mut out = Vec::new();
    for read in reads {
        out.push(read.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_in_a_fresh_process_fetch_each_part_once() {
    let stores = Stores::new(Backend::Embedded, &mut None).expect("the embedded backend needs no service");
    let writer = stores.open(quiet()).await;
    let id = user(1);
    let parts = fill(&writer, id, 4, 20).await as u64;
    assert_eq!(parts, 4, "one part per batch");

    let (reader, blob) = counted_process(&stores, quiet()).await;
    let snapshots = concurrent_snapshots(&reader, id, 3, 8).await;
    assert!(snapshots.iter().all(|s| s.len() == 80 && *s == snapshots[0]));
    assert_eq!(blob.gets(), parts, "8 concurrent snapshots: one get per part");
    let cache = reader.stats().part_cache.expect("on by default");
    assert_eq!(cache.misses, parts);
    assert!(cache.joins > 0, "the readers overlapped: {cache:?}");
    concurrent_snapshots(&reader, id, 3, 4).await;
    assert_eq!(blob.gets(), parts, "kept parts are not fetched again");

    // Four listens in the process, then a new batch: fetched once for all of them.
    let mut listens = Vec::new();
    for _ in 0..4 {
        let mut listen = reader.listen(id, 3).await.unwrap();
        while !matches!(listen.next().await.unwrap(), ListenEvent::Progress(_)) {}
        listens.push(listen);
    }
    let gets = blob.gets();
    writer.append(vec![append(id, vec![(int_row(-1), 4, 1)], 4, 5)]).await.unwrap();
    let waits: Vec<_> = listens
        .into_iter()
        .map(|mut listen| {
            tokio::spawn(async move {
                match listen.next().await.unwrap() {
                    ListenEvent::Updates(updates) => updates,
                    other => panic!("expected the new batch, got {other:?}"),
                }
            })
        })
        .collect();
    for wait in waits {
        assert_eq!(wait.await.unwrap(), vec![(int_row(-1), 4, 1)]);
    }
    assert_eq!(blob.gets(), gets + 1, "four listens, one get of the new part");

    // The same snapshots with the cache off: every reader fetches every part (the test's contrast).
    let (uncached, blob) = counted_process(&stores, ShardConfig { part_cache_bytes: 0, ..quiet() }).await;
    assert_eq!(uncached.stats().part_cache, None);
    concurrent_snapshots(&uncached, id, 3, 8).await;
    assert_eq!(blob.gets(), 8 * parts, "without the cache, one get per part per reader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_larger_than_a_quarter_of_the_cache_reads_through_it_and_evicts_nothing() {
    let stores = Stores::new(Backend::Embedded, &mut None).expect("the embedded backend needs no service");
    const BOUND: usize = 16 << 10;
    let config = ShardConfig { part_target_bytes: 4 << 10, part_cache_bytes: BOUND, ..quiet() };
    let writer = stores.open(config.clone()).await;
    let (small, large) = (user(1), user(2));
    let small_parts = fill(&writer, small, 1, 10).await as u64;
    let large_parts = fill(&writer, large, 4, 60).await as u64;
    let state = writer.state(large).await.unwrap().unwrap();
    let large_bytes: u64 = state.batches.iter().flat_map(|b| &b.parts).map(|p| p.bytes).sum();
    assert!(
        large_bytes > (BOUND / 4) as u64 && large_bytes < BOUND as u64,
        "more than a quarter of the cache, and it would fit: {large_bytes}"
    );
    // What `fill` appended, every row once: the snapshots must hold exactly that.
    let appended = |batches: u64, rows: i64| -> Vec<(protocol::Row, i64)> {
        let mut all: Vec<_> =
            (0..rows).flat_map(|x| (0..batches).map(move |t| (int_row(x * 100 + t as i64), 1))).collect();
        all.sort();
        all
    };
    let (expected_small, expected_large) = (appended(1, 10), appended(4, 60));
    assert_eq!(writer.snapshot(large, 3).await.unwrap(), expected_large);

    let (reader, blob) = counted_process(&stores, config.clone()).await;
    assert_eq!(reader.snapshot(small, 0).await.unwrap(), expected_small);
    let kept = reader.stats().part_cache.expect("on");
    assert_eq!((kept.parts, blob.gets()), (small_parts, small_parts), "a small snapshot's parts are kept");
    for round in 1..=2 {
        assert_eq!(reader.snapshot(large, 3).await.unwrap(), expected_large);
        assert_eq!(blob.gets(), small_parts + round * large_parts, "the large snapshot's parts are not kept");
        let cache = reader.stats().part_cache.expect("on");
        assert_eq!(
            (cache.parts, cache.bytes, cache.evictions),
            (kept.parts, kept.bytes, 0),
            "nothing evicted"
        );
    }
    assert_eq!(reader.snapshot(small, 0).await.unwrap(), expected_small);
    assert_eq!(blob.gets(), small_parts + 2 * large_parts, "the small snapshot's parts are still kept");

    // The contrast: in a cache four times as large the same snapshot is small, and kept.
    let (roomy, blob) = counted_process(&stores, ShardConfig { part_cache_bytes: 4 * BOUND, ..config }).await;
    for _ in 0..2 {
        assert_eq!(roomy.snapshot(large, 3).await.unwrap(), expected_large);
    }
    assert_eq!(blob.gets(), large_parts);
}

fn value(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    let samples = parse_text(&encode_text(registry)).expect("the exposition parses");
    sample_value(&samples, name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_part_cache_stays_within_its_bound_under_reads_and_compaction() {
    let stores = Stores::new(Backend::Embedded, &mut None).expect("the embedded backend needs no service");
    const TARGET: usize = 300;
    const BOUND: usize = 4 * TARGET;
    let small = ShardConfig { part_target_bytes: TARGET, ..quiet() };
    let writer = stores.open(small.clone()).await;
    let id = user(1);
    let parts = fill(&writer, id, 6, 60).await;
    assert!(parts >= 18, "many parts per batch: {parts}");
    let registry = Registry::new();
    let config = ShardConfig {
        part_cache_bytes: BOUND,
        max_batches: 2,
        metrics: Some(StorageMetrics::register(&registry).unwrap()),
        ..small
    };
    let (reader, blob) = counted_process(&stores, config).await;
    let expected = writer.snapshot(id, 5).await.unwrap();
    assert_eq!(expected.len(), 360);
    for snapshot in concurrent_snapshots(&reader, id, 5, 3).await {
        assert_eq!(snapshot, expected);
    }
    let mut listen = reader.listen(id, 2).await.unwrap();
    let mut rows = 0;
    while !matches!(listen.next().await.unwrap(), ListenEvent::Progress(p) if p == at(6)) {
        rows += 1;
    }
    assert!(rows > 0);
    reader.maintain(id, false).await.unwrap();
    assert!(reader.stats().merges > 0, "compaction read through the cache too");
    assert_eq!(reader.snapshot(id, 5).await.unwrap(), expected, "right after evictions and merges");

    let cache = reader.stats().part_cache.expect("on");
    assert!(cache.peak_bytes <= BOUND as u64 && cache.bytes <= BOUND as u64, "{cache:?}");
    assert!(cache.peak_bytes > (BOUND - 2 * TARGET) as u64, "the cache was used up to its bound: {cache:?}");
    assert!(cache.evictions > 0, "{cache:?}");
    assert!(blob.gets() > parts as u64, "evicted parts were fetched again");
    assert_eq!(value(&registry, "storage_part_cache_bytes", &[]), cache.bytes as f64);
    assert_eq!(value(&registry, "storage_part_cache_parts", &[]), cache.parts as f64);
    assert_eq!(value(&registry, "storage_part_cache_evictions_total", &[]), cache.evictions as f64);
    let reads = |outcome| value(&registry, "storage_part_cache_reads_total", &[("outcome", outcome)]);
    assert_eq!(
        (reads("hit"), reads("join"), reads("miss")),
        (cache.hits as f64, cache.joins as f64, cache.misses as f64)
    );
    let by = |reader| value(&registry, "storage_part_reads_total", &[("reader", reader)]);
    assert!(by("snapshot") > 0.0 && by("listen") > 0.0 && by("compaction") > 0.0);
    assert_eq!(
        by("snapshot") + by("listen") + by("compaction"),
        (cache.hits + cache.joins + cache.misses) as f64,
        "every part read goes through the cache"
    );
    assert_eq!(
        value(&registry, "storage_blob_operation_seconds_count", &[("op", "get"), ("outcome", "ok")]),
        cache.misses as f64,
        "every miss, and only a miss, reached the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_damaged_in_the_store_is_reported_by_name_through_the_cache_and_not_kept() {
    let stores = Stores::new(Backend::Embedded, &mut None).expect("the embedded backend needs no service");
    let writer = stores.open(quiet()).await;
    let id = user(1);
    fill(&writer, id, 3, 20).await;
    let good = writer.snapshot(id, 2).await.unwrap();
    let part = writer.state(id).await.unwrap().unwrap().batches[1].parts[0].clone();
    // Damaged behind every engine's back, in the store itself.
    let raw = stores.blob().await;
    let original = raw.get(&part.key).await.unwrap().unwrap();
    let mut damaged = original.to_vec();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x08;
    raw.set(&part.key, Bytes::from(damaged)).await.unwrap();

    let (reader, blob) = counted_process(&stores, quiet()).await;
    let corrupt = |error: &ReadError| matches!(error, ReadError::Corrupt { id: got, what } if *got == id && what.contains(&part.key));
    let error = reader.snapshot(id, 2).await.unwrap_err();
    assert!(corrupt(&error), "{error:?}");
    let mut listen = reader.listen(id, 2).await.unwrap();
    let error = listen.next().await.unwrap_err();
    assert!(corrupt(&error), "{error:?}");
    let gets = blob.gets();
    let error = reader.snapshot(id, 2).await.unwrap_err();
    assert!(corrupt(&error), "{error:?}");
    assert!(blob.gets() > gets, "the damaged value was not kept: read from the store again");
    // Repaired, again behind the reader's back: the next read is right.
    raw.set(&part.key, original).await.unwrap();
    assert_eq!(reader.snapshot(id, 2).await.unwrap(), good);
}

#[tokio::test]
async fn a_part_cache_that_could_keep_no_part_is_refused_and_zero_turns_it_off() {
    let stores = Stores::new(Backend::Embedded, &mut None).expect("the embedded backend needs no service");
    let config = ShardConfig { part_cache_bytes: 1_000, part_target_bytes: 4_096, ..quiet() };
    let refused = ShardCollections::open(&stores.blob_config(), &stores.consensus_config(), config.clone())
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(&refused, ShardOpenError::Config(m) if m.contains("part_cache_bytes 1000")),
        "{refused}"
    );
    let refused =
        ShardCollections::from_stores(stores.blob().await, stores.consensus().await, config).map(|_| ());
    assert!(matches!(refused, Err(ShardOpenError::Config(_))), "{refused:?}");
    let off = stores.open(ShardConfig { part_cache_bytes: 0, ..quiet() }).await;
    assert_eq!(off.stats().part_cache, None);
    let on = stores.open(ShardConfig { part_cache_bytes: 4_096, part_target_bytes: 4_096, ..quiet() }).await;
    assert_eq!(on.stats().part_cache.map(|c| c.bytes), Some(0));
}
