//! [`StorageMetrics`]: the Prometheus metrics of the storage engine in one process (DESIGN §10): appends,
//! their rows and bytes, compare-and-set conflicts, the latency of every Blob and Consensus operation,
//! compaction and garbage collection, and lease expiries.
//!
//! - `storage_appends_total` (counter; outcome): appends by outcome: `committed`, `upper_mismatch` (another
//!   writer was first), `failed`
//! - `storage_appends_in_flight` (gauge): appends started and not yet ended (waiting on the engines,
//!   retrying through an outage; a dropped append future ends it too)
//! - `storage_append_rows_total` (counter): updates in committed appends
//! - `storage_append_bytes_total` (counter): encoded bytes of committed appends (their parts, in the blob
//!   store or inline)
//! - `storage_append_inline_parts_total` (counter): parts of committed appends carried inline in the
//!   shard's state instead of the blob store (`ShardConfig::inline_part_bytes`)
//! - `storage_append_inline_bytes_total` (counter): their encoded bytes (also in
//!   `storage_append_bytes_total`)
//! - `storage_cas_conflicts_total` (counter): consensus compare-and-sets that found another version than
//!   expected
//! - `storage_blob_operation_seconds` (histogram; op, outcome): `get`, `set`, `delete`, `list`; `ok` or
//!   `error`
//! - `storage_consensus_operation_seconds` (histogram; op, outcome): `head`, `compare_and_set`, `scan`,
//!   `truncate`, `list_keys`; `ok` or `error`
//! - `storage_compactions_total` (counter): compactions committed
//! - `storage_compaction_batches_merged_total` (counter): batches those compactions merged
//! - `storage_compaction_bytes_written_total` (counter): bytes of the parts they wrote
//! - `storage_gc_parts_deleted_total` (counter): blob parts garbage collection deleted
//! - `storage_gc_versions_truncated_total` (counter): consensus versions it truncated
//! - `storage_lease_expiries_total` (counter; kind): leases of `reader`s and `writer`s that expired
//! - `storage_part_reads_total` (counter; reader): parts the engine read (through the part cache, if
//!   on), by who read them: `snapshot` (snapshots, storage peeks, the first read of a listen), `listen` (a
//!   listen's updates after its snapshot), `compaction` (merge inputs)
//! - `storage_part_cache_reads_total` (counter; outcome): part reads through the process's part cache
//!   (`shard::cache`): `hit` (answered from memory), `join` (waited for another reader's fetch of the same
//!   part), `miss` (fetched from the blob store)
//! - `storage_part_cache_evictions_total` (counter): parts the cache evicted to stay within its bound
//! - `storage_part_cache_bytes` (gauge): bytes of the parts the cache keeps
//! - `storage_part_cache_parts` (gauge): parts the cache keeps
//!
//! **What this is not.** It measures nothing by itself: the shard engine calls its methods where the
//! events happen (an append's outcome, each Blob and Consensus operation through `shard::metered`, a
//! compaction, garbage collection, an expired lease), given them by `ShardConfig::metrics`. The in-memory
//! `InProcess` store records none. Every series is made when the
//! families are registered, so a call formats no label and takes no lock: it is one or two atomic
//! operations.
//!
//! **Tests:** `mod tests` below (each method reaches its series); `tests/it/shard_metrics.rs` (the
//! engine's events reach them).

use std::fmt;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// The outcome of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Committed.
    Committed,
    /// Another writer moved some upper first (compare-and-append lost).
    UpperMismatch,
    /// It failed otherwise (the engines' errors).
    Failed,
}

/// A Blob operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobOp {
    /// Read a key.
    Get,
    /// Write a key.
    Set,
    /// Delete a key.
    Delete,
    /// List a prefix.
    List,
}

/// A Consensus operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsensusOp {
    /// Read a key's latest version.
    Head,
    /// Compare-and-set one or several keys.
    CompareAndSet,
    /// Read versions of a key.
    Scan,
    /// Delete old versions of a key.
    Truncate,
    /// List the keys.
    ListKeys,
}

/// Who read a part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartReader {
    /// A snapshot (also a storage peek's, and a listen's first read).
    Snapshot,
    /// A listen, after its snapshot.
    Listen,
    /// Compaction (a merge's inputs).
    Compaction,
}

/// How the part cache answered a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartCacheRead {
    /// From memory.
    Hit,
    /// By waiting for another reader's fetch of the same part.
    Join,
    /// By fetching from the blob store.
    Miss,
}

/// Whose lease expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    /// A leased reader (a process that stopped heartbeating its holds).
    Reader,
    /// A writer's idempotency entry.
    Writer,
}

const APPEND_OUTCOMES: [&str; 3] = ["committed", "upper_mismatch", "failed"];
const BLOB_OPS: [&str; 4] = ["get", "set", "delete", "list"];
const CONSENSUS_OPS: [&str; 5] = ["head", "compare_and_set", "scan", "truncate", "list_keys"];
const OUTCOMES: [&str; 2] = ["ok", "error"];
const LEASE_KINDS: [&str; 2] = ["reader", "writer"];
const PART_CACHE_READS: [&str; 3] = ["hit", "join", "miss"];
const PART_READERS: [&str; 3] = ["snapshot", "listen", "compaction"];

/// Engine operation latencies: 100 µs to 30 s.
const OPERATION_BUCKETS_S: [f64; 16] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
    30.0,
];

/// The storage engine's metrics in one registry (see the module documentation). Cloning shares them.
#[derive(Clone)]
pub struct StorageMetrics {
    appends: [IntCounter; 3],
    appends_in_flight: IntGauge,
    append_rows: IntCounter,
    append_bytes: IntCounter,
    append_inline_parts: IntCounter,
    append_inline_bytes: IntCounter,
    cas_conflicts: IntCounter,
    /// By operation, then `ok` / `error`.
    blob: Vec<[Histogram; 2]>,
    consensus: Vec<[Histogram; 2]>,
    compactions: IntCounter,
    compaction_batches: IntCounter,
    compaction_bytes: IntCounter,
    gc_parts: IntCounter,
    gc_versions: IntCounter,
    lease_expiries: [IntCounter; 2],
    part_reads: [IntCounter; 3],
    part_cache_reads: [IntCounter; 3],
    part_cache_evictions: IntCounter,
    part_cache_bytes: IntGauge,
    part_cache_parts: IntGauge,
    families: Families,
}

/// The labelled families, kept to register and unregister them.
#[derive(Clone)]
struct Families {
    appends: IntCounterVec,
    blob: HistogramVec,
    consensus: HistogramVec,
    leases: IntCounterVec,
    part_reads: IntCounterVec,
    part_cache_reads: IntCounterVec,
}

impl fmt::Debug for StorageMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageMetrics").finish_non_exhaustive()
    }
}

fn counter(name: &str, help: &str) -> prometheus::Result<IntCounter> {
    IntCounter::new(name, help)
}

impl StorageMetrics {
    /// The families, registered in `registry` (the process's); fails if they are there already (one
    /// storage engine per registry).
    pub fn register(registry: &Registry) -> prometheus::Result<StorageMetrics> {
        let metrics = Self::unregistered()?;
        for collector in metrics.collectors() {
            registry.register(collector)?;
        }
        Ok(metrics)
    }

    /// The families, in no registry: what an engine nobody asked metrics of updates.
    pub fn unregistered() -> prometheus::Result<StorageMetrics> {
        let appends =
            IntCounterVec::new(Opts::new("storage_appends_total", "Appends by outcome."), &["outcome"])?;
        let blob = HistogramVec::new(
            HistogramOpts::new("storage_blob_operation_seconds", "Blob operations by kind and outcome.")
                .buckets(OPERATION_BUCKETS_S.to_vec()),
            &["op", "outcome"],
        )?;
        let consensus = HistogramVec::new(
            HistogramOpts::new(
                "storage_consensus_operation_seconds",
                "Consensus operations by kind and outcome.",
            )
            .buckets(OPERATION_BUCKETS_S.to_vec()),
            &["op", "outcome"],
        )?;
        let leases = IntCounterVec::new(
            Opts::new("storage_lease_expiries_total", "Expired leases by kind."),
            &["kind"],
        )?;
        let part_reads = IntCounterVec::new(
            Opts::new("storage_part_reads_total", "Parts the engine read, by reader."),
            &["reader"],
        )?;
        let part_cache_reads = IntCounterVec::new(
            Opts::new("storage_part_cache_reads_total", "Part reads through the part cache by outcome."),
            &["outcome"],
        )?;
        let by_outcome = |family: &HistogramVec, op: &str| {
            OUTCOMES.map(|outcome| family.with_label_values(&[op, outcome]))
        };
        let metrics = StorageMetrics {
            appends: APPEND_OUTCOMES.map(|outcome| appends.with_label_values(&[outcome])),
            appends_in_flight: IntGauge::new(
                "storage_appends_in_flight",
                "Appends started and not yet ended.",
            )?,
            append_rows: counter("storage_append_rows_total", "Updates in committed appends.")?,
            append_bytes: counter("storage_append_bytes_total", "Encoded bytes of committed appends.")?,
            append_inline_parts: counter(
                "storage_append_inline_parts_total",
                "Parts of committed appends carried inline in the shard state instead of the blob store.",
            )?,
            append_inline_bytes: counter(
                "storage_append_inline_bytes_total",
                "Encoded bytes of the parts of committed appends carried inline in the shard state.",
            )?,
            cas_conflicts: counter(
                "storage_cas_conflicts_total",
                "Consensus compare-and-sets that found another version than expected.",
            )?,
            blob: BLOB_OPS.iter().map(|op| by_outcome(&blob, op)).collect(),
            consensus: CONSENSUS_OPS.iter().map(|op| by_outcome(&consensus, op)).collect(),
            compactions: counter("storage_compactions_total", "Compactions committed.")?,
            compaction_batches: counter(
                "storage_compaction_batches_merged_total",
                "Batches compactions merged.",
            )?,
            compaction_bytes: counter(
                "storage_compaction_bytes_written_total",
                "Bytes of parts compactions wrote.",
            )?,
            gc_parts: counter("storage_gc_parts_deleted_total", "Blob parts garbage collection deleted.")?,
            gc_versions: counter(
                "storage_gc_versions_truncated_total",
                "Consensus versions garbage collection truncated.",
            )?,
            lease_expiries: LEASE_KINDS.map(|kind| leases.with_label_values(&[kind])),
            part_reads: PART_READERS.map(|reader| part_reads.with_label_values(&[reader])),
            part_cache_reads: PART_CACHE_READS.map(|outcome| part_cache_reads.with_label_values(&[outcome])),
            part_cache_evictions: counter(
                "storage_part_cache_evictions_total",
                "Parts the part cache evicted to stay within its bound.",
            )?,
            part_cache_bytes: IntGauge::new(
                "storage_part_cache_bytes",
                "Bytes of the parts the part cache keeps.",
            )?,
            part_cache_parts: IntGauge::new("storage_part_cache_parts", "Parts the part cache keeps.")?,
            families: Families { appends, blob, consensus, leases, part_reads, part_cache_reads },
        };
        Ok(metrics)
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        let Families { appends, blob, consensus, leases, part_reads, part_cache_reads } = &self.families;
        let mut collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(appends.clone()),
            Box::new(blob.clone()),
            Box::new(consensus.clone()),
            Box::new(leases.clone()),
            Box::new(part_reads.clone()),
            Box::new(part_cache_reads.clone()),
            Box::new(self.appends_in_flight.clone()),
            Box::new(self.part_cache_bytes.clone()),
            Box::new(self.part_cache_parts.clone()),
        ];
        for counter in [
            &self.append_rows,
            &self.append_bytes,
            &self.append_inline_parts,
            &self.append_inline_bytes,
            &self.cas_conflicts,
            &self.compactions,
            &self.compaction_batches,
            &self.compaction_bytes,
            &self.gc_parts,
            &self.gc_versions,
            &self.part_cache_evictions,
        ] {
            collectors.push(Box::new(counter.clone()));
        }
        collectors
    }

    /// Takes the families out of `registry` (the engine stopped).
    pub fn unregister(&self, registry: &Registry) {
        for collector in self.collectors() {
            // Missing only if someone else took it out.
            let _ = registry.unregister(collector);
        }
    }

    /// An append started; it counts as in flight until the guard is dropped (when it ends, or when its
    /// future is dropped unfinished).
    pub fn append_started(&self) -> AppendInFlight {
        self.appends_in_flight.inc();
        AppendInFlight(self.appends_in_flight.clone())
    }

    /// An append ended with `outcome`; a committed one wrote `rows` updates in `bytes` bytes.
    pub fn append(&self, outcome: AppendOutcome, rows: u64, bytes: u64) {
        self.appends[outcome as usize].inc();
        if outcome == AppendOutcome::Committed {
            self.append_rows.inc_by(rows);
            self.append_bytes.inc_by(bytes);
        }
    }

    /// A committed append carried `parts` parts of `bytes` bytes inline in shard states (they are in
    /// [`append`](Self::append)'s bytes too).
    pub fn append_inline(&self, parts: u64, bytes: u64) {
        self.append_inline_parts.inc_by(parts);
        self.append_inline_bytes.inc_by(bytes);
    }

    /// A compare-and-set found another version than it expected.
    pub fn cas_conflict(&self) {
        self.cas_conflicts.inc();
    }

    /// A Blob operation took `duration` and succeeded or not.
    pub fn blob(&self, op: BlobOp, duration: Duration, ok: bool) {
        self.blob[op as usize][usize::from(!ok)].observe(duration.as_secs_f64());
    }

    /// A Consensus operation took `duration` and succeeded or not.
    pub fn consensus(&self, op: ConsensusOp, duration: Duration, ok: bool) {
        self.consensus[op as usize][usize::from(!ok)].observe(duration.as_secs_f64());
    }

    /// A compaction committed, having merged `batches` batches into parts of `bytes` bytes.
    pub fn compaction(&self, batches: u64, bytes: u64) {
        self.compactions.inc();
        self.compaction_batches.inc_by(batches);
        self.compaction_bytes.inc_by(bytes);
    }

    /// Garbage collection deleted `parts` blob parts and truncated `versions` consensus versions.
    pub fn garbage_collected(&self, parts: u64, versions: u64) {
        self.gc_parts.inc_by(parts);
        self.gc_versions.inc_by(versions);
    }

    /// A lease expired.
    pub fn lease_expired(&self, kind: LeaseKind) {
        self.lease_expiries[kind as usize].inc();
    }

    /// The engine read a part for `reader`.
    pub fn part_read(&self, reader: PartReader) {
        self.part_reads[reader as usize].inc();
    }

    /// The part cache answered a read.
    pub fn part_cache_read(&self, read: PartCacheRead) {
        self.part_cache_reads[read as usize].inc();
    }

    /// The part cache evicted a part.
    pub fn part_cache_eviction(&self) {
        self.part_cache_evictions.inc();
    }

    /// The part cache now keeps `parts` parts of `bytes` bytes.
    pub fn part_cache_kept(&self, bytes: u64, parts: u64) {
        self.part_cache_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.part_cache_parts.set(i64::try_from(parts).unwrap_or(i64::MAX));
    }
}

/// One append in flight (see [`StorageMetrics::append_started`]); dropping it ends it.
#[derive(Debug)]
pub struct AppendInFlight(IntGauge);

impl Drop for AppendInFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let samples = telemetry::parse_text(&telemetry::encode_text(registry)).expect("parses");
        telemetry::sample_value(&samples, name, labels)
    }

    #[test]
    fn every_event_reaches_its_series_and_unregistering_takes_every_family_out() {
        let registry = Registry::new();
        let metrics = StorageMetrics::register(&registry).expect("a fresh registry");
        assert!(StorageMetrics::register(&registry).is_err(), "one engine per registry");
        let (first, second) = (metrics.append_started(), metrics.append_started());
        assert_eq!(value(&registry, "storage_appends_in_flight", &[]), Some(2.0));
        drop(first);
        assert_eq!(value(&registry, "storage_appends_in_flight", &[]), Some(1.0));
        drop(second);
        metrics.append(AppendOutcome::Committed, 10, 300);
        metrics.append(AppendOutcome::UpperMismatch, 5, 100);
        metrics.append_inline(2, 120);
        metrics.cas_conflict();
        metrics.blob(BlobOp::Set, Duration::from_millis(3), true);
        metrics.blob(BlobOp::Get, Duration::from_millis(1), false);
        metrics.consensus(ConsensusOp::CompareAndSet, Duration::from_micros(700), true);
        metrics.compaction(4, 2_000);
        metrics.garbage_collected(3, 7);
        metrics.lease_expired(LeaseKind::Writer);
        metrics.part_read(PartReader::Listen);
        metrics.part_cache_read(PartCacheRead::Hit);
        metrics.part_cache_read(PartCacheRead::Hit);
        metrics.part_cache_read(PartCacheRead::Miss);
        metrics.part_cache_eviction();
        metrics.part_cache_kept(4_096, 3);
        let v = |name, labels: &[(&str, &str)]| value(&registry, name, labels);
        assert_eq!(v("storage_appends_total", &[("outcome", "committed")]), Some(1.0));
        assert_eq!(v("storage_appends_total", &[("outcome", "upper_mismatch")]), Some(1.0));
        assert_eq!(v("storage_appends_total", &[("outcome", "failed")]), Some(0.0));
        assert_eq!(v("storage_appends_in_flight", &[]), Some(0.0), "every guard dropped");
        assert_eq!(v("storage_append_rows_total", &[]), Some(10.0), "only committed appends' rows");
        assert_eq!(v("storage_append_bytes_total", &[]), Some(300.0));
        assert_eq!(v("storage_append_inline_parts_total", &[]), Some(2.0));
        assert_eq!(v("storage_append_inline_bytes_total", &[]), Some(120.0));
        assert_eq!(v("storage_cas_conflicts_total", &[]), Some(1.0));
        let blob =
            |op, outcome| v("storage_blob_operation_seconds_count", &[("op", op), ("outcome", outcome)]);
        assert_eq!(
            (blob("set", "ok"), blob("get", "error"), blob("get", "ok")),
            (Some(1.0), Some(1.0), Some(0.0))
        );
        assert_eq!(
            v(
                "storage_consensus_operation_seconds_bucket",
                &[("op", "compare_and_set"), ("outcome", "ok"), ("le", "0.001")]
            ),
            Some(1.0)
        );
        assert_eq!(v("storage_compactions_total", &[]), Some(1.0));
        assert_eq!(v("storage_compaction_batches_merged_total", &[]), Some(4.0));
        assert_eq!(v("storage_compaction_bytes_written_total", &[]), Some(2_000.0));
        assert_eq!(v("storage_gc_parts_deleted_total", &[]), Some(3.0));
        assert_eq!(v("storage_gc_versions_truncated_total", &[]), Some(7.0));
        assert_eq!(v("storage_lease_expiries_total", &[("kind", "writer")]), Some(1.0));
        assert_eq!(v("storage_lease_expiries_total", &[("kind", "reader")]), Some(0.0));
        let by = |reader| v("storage_part_reads_total", &[("reader", reader)]);
        assert_eq!((by("snapshot"), by("listen"), by("compaction")), (Some(0.0), Some(1.0), Some(0.0)));
        let reads = |outcome| v("storage_part_cache_reads_total", &[("outcome", outcome)]);
        assert_eq!((reads("hit"), reads("join"), reads("miss")), (Some(2.0), Some(0.0), Some(1.0)));
        assert_eq!(v("storage_part_cache_evictions_total", &[]), Some(1.0));
        assert_eq!(v("storage_part_cache_bytes", &[]), Some(4_096.0));
        assert_eq!(v("storage_part_cache_parts", &[]), Some(3.0));
        metrics.unregister(&registry);
        assert!(registry.gather().is_empty());
        StorageMetrics::register(&registry).expect("registrable again");
    }
}
