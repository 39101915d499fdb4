//! [`MeteredBlob`] and [`MeteredConsensus`]: a [`Blob`] and a [`Consensus`] that time every operation
//! into the process's [`StorageMetrics`] (by operation and outcome) and count the compare-and-sets that
//! found another version than expected, then answer exactly what the store they wrap answered.
//!
//! **What this is not.** It retries nothing, changes no argument and no answer: the shard machine above it
//! sees the wrapped store as it is. The push channel ([`Consensus::changes`]) is passed through untimed.
//!
//! **Tests:** `tests/it/shards.rs` (the engine's metrics after real appends, compactions and garbage
//! collection on a file Blob and a SQLite Consensus).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::api::BoxFuture;
use crate::blob::{Blob, BlobMeta};
use crate::consensus::{CasOp, CasOutcome, Consensus, SeqNo, VersionedData};
use crate::external::ExternalError;
use crate::metrics::{BlobOp, ConsensusOp, StorageMetrics};

/// A [`Blob`] whose operations are timed into [`StorageMetrics`].
#[derive(Debug)]
pub struct MeteredBlob {
    inner: Arc<dyn Blob>,
    metrics: StorageMetrics,
}

impl MeteredBlob {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Blob>, metrics: StorageMetrics) -> Self {
        MeteredBlob { inner, metrics }
    }
}

/// Runs `operation`, recording its duration and whether it succeeded.
// The shard engine runs in real processes only (the simulator drives the storage core, not shards), and a
// latency is measured, never acted on: the monotonic clock is read for the metric alone.
#[allow(clippy::disallowed_methods)]
async fn timed<T>(
    operation: BoxFuture<'_, Result<T, ExternalError>>,
    record: impl FnOnce(std::time::Duration, bool),
) -> Result<T, ExternalError> {
    let start = Instant::now();
    let result = operation.await;
    record(start.elapsed(), result.is_ok());
    result
}

impl Blob for MeteredBlob {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, ExternalError>> {
        Box::pin(timed(self.inner.get(key), |d, ok| self.metrics.blob(BlobOp::Get, d, ok)))
    }

    fn set<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), ExternalError>> {
        Box::pin(timed(self.inner.set(key, value), |d, ok| self.metrics.blob(BlobOp::Set, d, ok)))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ExternalError>> {
        Box::pin(timed(self.inner.delete(key), |d, ok| self.metrics.blob(BlobOp::Delete, d, ok)))
    }

    fn list<'a>(&'a self, dir: &'a str) -> BoxFuture<'a, Result<Vec<BlobMeta>, ExternalError>> {
        Box::pin(timed(self.inner.list(dir), |d, ok| self.metrics.blob(BlobOp::List, d, ok)))
    }
}

/// A [`Consensus`] whose operations are timed into [`StorageMetrics`], and whose compare-and-sets that
/// found another version are counted as conflicts.
#[derive(Debug)]
pub struct MeteredConsensus {
    inner: Arc<dyn Consensus>,
    metrics: StorageMetrics,
}

impl MeteredConsensus {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Consensus>, metrics: StorageMetrics) -> Self {
        MeteredConsensus { inner, metrics }
    }
}

impl Consensus for MeteredConsensus {
    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<VersionedData>, ExternalError>> {
        Box::pin(timed(self.inner.head(key), |d, ok| self.metrics.consensus(ConsensusOp::Head, d, ok)))
    }

    fn compare_and_set_multi(&self, ops: Vec<CasOp>) -> BoxFuture<'_, Result<CasOutcome, ExternalError>> {
        Box::pin(async move {
            let record = |d, ok| self.metrics.consensus(ConsensusOp::CompareAndSet, d, ok);
            let outcome = timed(self.inner.compare_and_set_multi(ops), record).await;
            if matches!(outcome, Ok(CasOutcome::Mismatch)) {
                self.metrics.cas_conflict();
            }
            outcome
        })
    }

    fn scan<'a>(
        &'a self,
        key: &'a str,
        from: SeqNo,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<VersionedData>, ExternalError>> {
        Box::pin(timed(self.inner.scan(key, from, limit), |d, ok| {
            self.metrics.consensus(ConsensusOp::Scan, d, ok)
        }))
    }

    fn truncate<'a>(&'a self, key: &'a str, below: SeqNo) -> BoxFuture<'a, Result<u64, ExternalError>> {
        Box::pin(timed(self.inner.truncate(key, below), |d, ok| {
            self.metrics.consensus(ConsensusOp::Truncate, d, ok)
        }))
    }

    fn list_keys(&self) -> BoxFuture<'_, Result<Vec<(String, SeqNo)>, ExternalError>> {
        Box::pin(timed(self.inner.list_keys(), |d, ok| self.metrics.consensus(ConsensusOp::ListKeys, d, ok)))
    }

    fn changes(&self) -> Option<broadcast::Receiver<String>> {
        self.inner.changes()
    }
}
