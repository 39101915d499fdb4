//! The shard engine's Prometheus metrics (`StorageMetrics`, wired through `ShardConfig::metrics`), read
//! back from the text exposition of the process's registry after real work on the embedded backend
//! (local files + SQLite): appends by outcome with their rows and bytes (and the parts carried inline in
//! the state apart), every Blob and Consensus
//! operation timed, compaction, garbage collection and an expired writer lease; and a compare-and-set conflict
//! counted by the metered consensus on its own; an append waiting through a consensus outage counted in
//! flight until it ends (or is dropped).
//!
//! What this checks: that each event reaches its series with the right amount. What it does not: the
//! latencies' values (only that operations were observed).

use std::time::Duration;

use frontiers::ReadPolicy;
use prometheus::Registry;
use storage::consensus::{CasOutcome, Consensus, ConsensusConfig, VersionedData};
use storage::shard::metered::MeteredConsensus;
use storage::{AppendError, ShardConfig, StorageCollections, StorageMetrics};
use telemetry::{encode_text, parse_text, sample_value};

use crate::backends::{Backend, Stores, inline_config, quick_config};
use crate::*;

fn value(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    let samples = parse_text(&encode_text(registry)).expect("the exposition parses");
    sample_value(&samples, name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_counts_appends_store_operations_compaction_garbage_collection_and_expired_leases() {
    let stores = Stores::new(Backend::Embedded, &mut None).expect("the embedded backend needs no service");
    let registry = Registry::new();
    let metrics = StorageMetrics::register(&registry).unwrap();
    let config = ShardConfig {
        metrics: Some(metrics),
        background_maintenance: false,
        max_batches: 2,
        writer_lease: Duration::from_millis(200),
        ..quick_config()
    };
    let storage = stores.open(config).await;
    let id = user(1);
    storage.create_collection(id, int_desc()).await.unwrap();
    storage.set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 }).await.unwrap();
    let mut rows = 0;
    for t in 0..6u64 {
        let updates: Vec<_> = (0..10).map(|i| (int_row(i), t, 1)).collect();
        rows += updates.len();
        storage.append(vec![append(id, updates, t, t + 1)]).await.unwrap();
    }
    let stale = storage.append(vec![append(id, vec![(int_row(1), 0, 1)], 0, 1)]).await;
    assert!(matches!(stale, Err(AppendError::UpperMismatch { .. })), "{stale:?}");

    assert_eq!(value(&registry, "storage_appends_total", &[("outcome", "committed")]), 6.0);
    assert_eq!(value(&registry, "storage_appends_total", &[("outcome", "upper_mismatch")]), 1.0);
    assert_eq!(value(&registry, "storage_appends_total", &[("outcome", "failed")]), 0.0);
    assert_eq!(value(&registry, "storage_append_rows_total", &[]), rows as f64);
    let state = storage.state(id).await.unwrap().unwrap();
    let part_bytes: u64 = state.batches.iter().flat_map(|b| &b.parts).map(|p| p.bytes).sum();
    assert_eq!(value(&registry, "storage_append_bytes_total", &[]), part_bytes as f64, "no merge yet");
    assert_eq!(value(&registry, "storage_append_inline_parts_total", &[]), 0.0, "inline parts are off");
    let timed = |family: &str, op: &str| {
        value(&registry, &format!("{family}_count"), &[("op", op), ("outcome", "ok")])
    };
    assert!(timed("storage_blob_operation_seconds", "set") >= 6.0, "every part written was timed");
    assert!(timed("storage_consensus_operation_seconds", "compare_and_set") >= 7.0);
    assert!(timed("storage_consensus_operation_seconds", "head") >= 1.0);

    // This process's writer entry expires once it has not appended for its lease.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = storage.maintain(id, true).await.unwrap();
    assert!(report.expired, "{report:?}");
    assert_eq!(value(&registry, "storage_lease_expiries_total", &[("kind", "writer")]), 1.0);
    assert_eq!(value(&registry, "storage_lease_expiries_total", &[("kind", "reader")]), 0.0);
    assert!(report.merges >= 1, "six batches over a limit of two: {report:?}");
    assert_eq!(value(&registry, "storage_compactions_total", &[]), report.merges as f64);
    assert!(value(&registry, "storage_compaction_batches_merged_total", &[]) >= 2.0 * report.merges as f64);
    assert!(value(&registry, "storage_compaction_bytes_written_total", &[]) > 0.0);
    // The merged batches' parts are garbage once no reader needs them: a second pass collects them.
    let report = storage.maintain(id, true).await.unwrap();
    let collected = value(&registry, "storage_gc_parts_deleted_total", &[]);
    assert!(collected >= 2.0 || report.parts_deleted >= 2, "{report:?}, {collected}");
    assert!(timed("storage_blob_operation_seconds", "delete") >= collected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_carried_inline_are_counted_apart_from_the_blob_store_and_within_the_append_bytes() {
    let stores = Stores::new(Backend::Embedded, &mut None).expect("the embedded backend needs no service");
    let registry = Registry::new();
    let config = ShardConfig {
        metrics: Some(StorageMetrics::register(&registry).unwrap()),
        background_maintenance: false,
        ..inline_config()
    };
    let inline_limit = config.inline_part_bytes;
    let storage = stores.open(config).await;
    let id = user(1);
    storage.create_collection(id, int_desc()).await.unwrap();
    // Three small appends (inline), then one too large to be inline (a blob part).
    for t in 0..3u64 {
        storage.append(vec![append(id, vec![(int_row(t as i64), t, 1)], t, t + 1)]).await.unwrap();
    }
    let large: Vec<_> = (0..(inline_limit as i64)).map(|i| (int_row(i), 3, 1)).collect();
    storage.append(vec![append(id, large, 3, 4)]).await.unwrap();

    let state = storage.state(id).await.unwrap().unwrap();
    let parts: Vec<_> = state.batches.iter().flat_map(|b| &b.parts).collect();
    let inline = parts.iter().filter(|p| p.is_inline()).count();
    assert_eq!(inline, 3, "{parts:?}");
    assert!(parts.len() > inline, "the large append went to the blob store");
    let inline_bytes: u64 = parts.iter().filter(|p| p.is_inline()).map(|p| p.bytes).sum();
    let all_bytes: u64 = parts.iter().map(|p| p.bytes).sum();
    assert_eq!(value(&registry, "storage_append_inline_parts_total", &[]), 3.0);
    assert_eq!(value(&registry, "storage_append_inline_bytes_total", &[]), inline_bytes as f64);
    assert_eq!(
        value(&registry, "storage_append_bytes_total", &[]),
        all_bytes as f64,
        "inline and blob parts"
    );
    assert_eq!(value(&registry, "storage_appends_total", &[("outcome", "committed")]), 4.0);
}

#[tokio::test]
async fn the_metered_consensus_counts_a_compare_and_set_that_found_another_version() {
    let registry = Registry::new();
    let metrics = StorageMetrics::register(&registry).unwrap();
    let name = format!("mem://{:x}", storage::external::random_id());
    let inner = name.parse::<ConsensusConfig>().unwrap().open().await.unwrap();
    let consensus = MeteredConsensus::new(inner, metrics);
    let first = VersionedData { seqno: 0, data: bytes::Bytes::from_static(b"a") };
    assert_eq!(consensus.compare_and_set("k", None, first.clone()).await.unwrap(), CasOutcome::Committed);
    assert_eq!(value(&registry, "storage_cas_conflicts_total", &[]), 0.0);
    assert_eq!(consensus.compare_and_set("k", None, first).await.unwrap(), CasOutcome::Mismatch);
    assert_eq!(value(&registry, "storage_cas_conflicts_total", &[]), 1.0);
    let cas = |outcome| {
        value(
            &registry,
            "storage_consensus_operation_seconds_count",
            &[("op", "compare_and_set"), ("outcome", outcome)],
        )
    };
    assert_eq!((cas("ok"), cas("error")), (2.0, 0.0), "a mismatch is an answer, not an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_waiting_through_a_consensus_outage_counts_as_in_flight_until_it_ends() {
    use std::sync::atomic::Ordering;
    let stores = Stores::new(Backend::Embedded, &mut None).expect("the embedded backend needs no service");
    let registry = Registry::new();
    let config =
        ShardConfig { metrics: Some(StorageMetrics::register(&registry).unwrap()), ..quick_config() };
    let faults = std::sync::Arc::new(crate::flaky::Faults::default());
    let consensus = std::sync::Arc::new(crate::flaky::FlakyConsensus {
        inner: stores.consensus().await,
        faults: std::sync::Arc::clone(&faults),
    });
    let storage = storage::ShardCollections::from_stores(stores.blob().await, consensus, config).unwrap();
    let id = user(1);
    storage.create_collection(id, int_desc()).await.unwrap();
    assert_eq!(value(&registry, "storage_appends_in_flight", &[]), 0.0);
    faults.down.store(true, Ordering::SeqCst);
    let appending = tokio::spawn({
        let storage = storage.clone();
        async move { storage.append(vec![append(id, vec![(int_row(1), 0, 1)], 0, 1)]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(value(&registry, "storage_appends_in_flight", &[]), 1.0, "retrying through the outage");
    faults.down.store(false, Ordering::SeqCst);
    appending.await.unwrap().unwrap();
    assert_eq!(value(&registry, "storage_appends_in_flight", &[]), 0.0);
    // An append whose future is dropped unfinished ends too.
    faults.down.store(true, Ordering::SeqCst);
    let abandoned = tokio::spawn({
        let storage = storage.clone();
        async move { storage.append(vec![append(id, vec![(int_row(2), 1, 1)], 1, 2)]).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(value(&registry, "storage_appends_in_flight", &[]), 1.0);
    abandoned.abort();
    let _ = abandoned.await;
    assert_eq!(value(&registry, "storage_appends_in_flight", &[]), 0.0);
    faults.down.store(false, Ordering::SeqCst);
}
