//! [`Machine`]: the compare-and-set retry loop around the pure shard state ([`super::state`]), and the
//! blob calls of the shard engine with their retries (through the process's part cache, [`super::cache`]).
//!
//! **What this is.** [`Machine::update_many`] reads the heads of some shards (from its cache first),
//! asks a pure function for their next versions, and compare-and-sets them all at once. On a mismatch it
//! reads the heads again and asks again; on an engine failure it backs off and retries within the retry
//! budget, telling the function whether an earlier attempt may have been applied (an indeterminate
//! failure), which is how appends stay exactly-once. It keeps the latest state of every shard it saw
//! (shared with the process's listeners through [`Machine::subscribe`]) and refuses a head that goes
//! back: versions only grow, so an older head means a newer version was deleted.
//!
//! **What this is not.** No decisions about shard contents: those are the pure transitions'.
//!
//! **Tests.** Through [`super::ShardCollections`] in `tests/it/` (every backend, faults included).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use protocol::GlobalId;
use tokio::sync::watch;

use crate::blob::Blob;
use crate::consensus::{CasOp, CasOutcome, Consensus, VersionedData};
use crate::external::{ExternalError, Retry, random_id};
use crate::metrics::{PartReader, StorageMetrics};
use crate::shard::cache::{CachedBlob, PartCacheStats};
use crate::shard::metered::{MeteredBlob, MeteredConsensus};
use crate::shard::part::{PartError, Update, decode_part};
use crate::shard::state::{PartRef, Refusal, ShardState};
use crate::shard::{blob_dir, consensus_key, decode_state, encode_state};

/// Why a machine operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MachineError {
    /// The pure transition refused.
    Refused(Refusal),
    /// The shard has no state (it was never created).
    Missing,
    /// The engines failed for longer than the retry budget; `indeterminate` if an attempt may have taken
    /// effect.
    Unavailable {
        /// The last failure.
        message: String,
        /// Whether an attempt may have been applied.
        indeterminate: bool,
    },
    /// Stored data is damaged; the message names the key and version or part.
    Corrupt(String),
}

impl From<Refusal> for MachineError {
    fn from(refusal: Refusal) -> Self {
        MachineError::Refused(refusal)
    }
}

/// What a transition function decided.
#[derive(Debug)]
pub enum Change<T> {
    /// Nothing to write; the answer.
    Keep(T),
    /// Write these next versions (one per shard, in the order the shards were named); the answer.
    Write(Vec<ShardState>, T),
}

/// Counters of one process's shard engine.
#[derive(Debug, Default)]
pub struct Counters {
    /// Committed compare-and-sets.
    pub commits: AtomicU64,
    /// Compare-and-sets that found another version (a race lost).
    pub conflicts: AtomicU64,
    /// Engine failures retried.
    pub retries: AtomicU64,
    /// Parts written to the blob store.
    pub parts_written: AtomicU64,
    /// Parts carried inline in a state instead (not counted in `parts_written` or `bytes_written`).
    pub inline_parts: AtomicU64,
    /// Bytes of parts written.
    pub bytes_written: AtomicU64,
    /// Parts deleted (garbage collection, failed appends and merges, leaked parts).
    pub parts_deleted: AtomicU64,
    /// Batches merged by compaction.
    pub merges: AtomicU64,
    /// Consensus versions truncated.
    pub versions_truncated: AtomicU64,
    /// Holds lost because this process's leased reader expired.
    pub holds_lost: AtomicU64,
}

/// The shard engine's connection to its two stores; see the module documentation.
#[derive(Debug)]
pub struct Machine {
    /// The blob store: the part cache over the metered store, or the metered store if the cache is off.
    pub(crate) blob: Arc<dyn Blob>,
    part_cache: Option<Arc<CachedBlob>>,
    pub(crate) consensus: Arc<dyn Consensus>,
    retry_budget: Duration,
    latest: Mutex<BTreeMap<GlobalId, watch::Sender<Option<Arc<ShardState>>>>>,
    pub(crate) counters: Counters,
    /// The process's storage metrics (appends, compaction, garbage collection, lease expiries; the
    /// stores' operations are timed by the metered wrappers).
    pub(crate) metrics: StorageMetrics,
}

fn unavailable(error: &ExternalError, indeterminate: bool) -> MachineError {
    MachineError::Unavailable { message: error.message().to_owned(), indeterminate }
}

impl Machine {
    /// A machine over `blob` and `consensus`, retrying failures for up to `retry_budget`, with every
    /// operation on them timed into `metrics` ([`MeteredBlob`], [`MeteredConsensus`]), and parts read
    /// through a cache of `part_cache_bytes` ([`CachedBlob`]; none if `0`).
    pub fn new(
        blob: Arc<dyn Blob>,
        consensus: Arc<dyn Consensus>,
        retry_budget: Duration,
        part_cache_bytes: usize,
        metrics: StorageMetrics,
    ) -> Self {
        let metered: Arc<dyn Blob> = Arc::new(MeteredBlob::new(blob, metrics.clone()));
        let part_cache = (part_cache_bytes > 0)
            .then(|| Arc::new(CachedBlob::new(Arc::clone(&metered), part_cache_bytes, metrics.clone())));
        Machine {
            blob: match &part_cache {
                Some(cache) => Arc::clone(cache) as Arc<dyn Blob>,
                None => metered,
            },
            part_cache,
            consensus: Arc::new(MeteredConsensus::new(consensus, metrics.clone())),
            retry_budget,
            latest: Mutex::new(BTreeMap::new()),
            counters: Counters::default(),
            metrics,
        }
    }

    /// The bound of the process's part cache in bytes (0: no cache).
    pub fn part_cache_bytes(&self) -> usize {
        self.part_cache.as_ref().map_or(0, |cache| cache.capacity_bytes())
    }

    /// The part cache's counters (`None`: it is off).
    pub fn part_cache_stats(&self) -> Option<PartCacheStats> {
        self.part_cache.as_ref().map(|cache| cache.stats())
    }

    fn retry(&self) -> Retry {
        Retry::new(Duration::from_millis(10), Duration::from_millis(500), self.retry_budget)
    }

    fn sender(&self, id: GlobalId) -> watch::Sender<Option<Arc<ShardState>>> {
        let mut latest = self.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        latest.entry(id).or_insert_with(|| watch::channel(None).0).clone()
    }

    /// The latest state of `id` this process saw, as it changes.
    pub fn subscribe(&self, id: GlobalId) -> watch::Receiver<Option<Arc<ShardState>>> {
        self.sender(id).subscribe()
    }

    /// The latest state of `id` this process saw, if any.
    pub fn cached(&self, id: GlobalId) -> Option<Arc<ShardState>> {
        self.sender(id).borrow().clone()
    }

    /// Records a state read or written (the newest one seen stays).
    fn record(&self, state: ShardState) -> Arc<ShardState> {
        let sender = self.sender(state.id);
        let state = Arc::new(state);
        sender.send_if_modified(|latest| match latest {
            Some(seen) if seen.seqno >= state.seqno => false,
            _ => {
                *latest = Some(Arc::clone(&state));
                true
            }
        });
        state
    }

    /// Reads the head of `id` (retrying failures within the budget). A head older than a version this
    /// process saw before the read started is damage: versions only grow, so a newer one was deleted.
    pub async fn fetch(&self, id: GlobalId) -> Result<Option<Arc<ShardState>>, MachineError> {
        let key = consensus_key(id);
        let mut retry = self.retry();
        loop {
            let seen = self.cached(id).map(|s| s.seqno);
            match self.consensus.head(&key).await {
                Ok(None) => {
                    return match seen {
                        Some(seen) => Err(MachineError::Corrupt(format!(
                            "consensus key {key} is gone, but this process saw its version {seen}"
                        ))),
                        None => Ok(None),
                    };
                }
                Ok(Some(VersionedData { seqno, data })) => {
                    if let Some(seen) = seen.filter(|seen| *seen > seqno) {
                        return Err(MachineError::Corrupt(format!(
                            "consensus key {key} went back from version {seen} to {seqno}: version {seen} was deleted"
                        )));
                    }
                    let state = decode_state(id, seqno, &data).map_err(MachineError::Corrupt)?;
                    self.record(state);
                    return Ok(self.cached(id));
                }
                Err(ExternalError::Corrupt(message)) => return Err(MachineError::Corrupt(message)),
                Err(error) => {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%id, %error, "consensus head failed; retrying");
                    if !retry.wait().await {
                        return Err(unavailable(&error, false));
                    }
                }
            }
        }
    }

    /// The cached state of `id`, or its head.
    pub async fn current(&self, id: GlobalId) -> Result<Option<Arc<ShardState>>, MachineError> {
        match self.cached(id) {
            Some(state) => Ok(Some(state)),
            None => self.fetch(id).await,
        }
    }

    /// Changes one shard; see [`update_many`](Self::update_many).
    pub async fn update<T>(
        &self,
        id: GlobalId,
        mut f: impl FnMut(Option<&ShardState>, bool) -> Result<Change<T>, MachineError>,
    ) -> Result<(Option<Arc<ShardState>>, T), MachineError> {
        let (mut states, answer) = self.update_many(&[id], |states, maybe| f(states[0], maybe)).await?;
        Ok((states.pop().expect("one shard"), answer))
    }

    /// Reads the shards `ids` (distinct), asks `f` for their next versions (given whether an earlier
    /// attempt may have been applied), and compare-and-sets them all at once; repeats after mismatches and
    /// failures (within the retry budget). Returns the states after the change and `f`'s answer.
    pub async fn update_many<T>(
        &self,
        ids: &[GlobalId],
        mut f: impl FnMut(&[Option<&ShardState>], bool) -> Result<Change<T>, MachineError>,
    ) -> Result<(Vec<Option<Arc<ShardState>>>, T), MachineError> {
        let mut retry = self.retry();
        let mut maybe_applied = false;
        let mut fresh = false;
        loop {
            let mut states = Vec::with_capacity(ids.len());
            for id in ids {
                states.push(if fresh { self.fetch(*id).await? } else { self.current(*id).await? });
            }
            let views: Vec<Option<&ShardState>> = states.iter().map(|s| s.as_deref()).collect();
            let (nexts, answer) = match f(&views, maybe_applied)? {
                Change::Keep(answer) => return Ok((states, answer)),
                Change::Write(nexts, answer) => (nexts, answer),
            };
            assert_eq!(nexts.len(), ids.len(), "one next version per shard");
            let ops = nexts
                .iter()
                .zip(&states)
                .map(|(next, current)| {
                    let expected = current.as_ref().map(|s| s.seqno);
                    assert_eq!(
                        next.seqno,
                        expected.map_or(0, |s| s + 1),
                        "a transition makes the next version"
                    );
                    CasOp {
                        key: consensus_key(next.id),
                        expected,
                        new: VersionedData { seqno: next.seqno, data: encode_state(next) },
                    }
                })
                .collect();
            match self.consensus.compare_and_set_multi(ops).await {
                Ok(CasOutcome::Committed) => {
                    self.counters.commits.fetch_add(1, Ordering::Relaxed);
                    let mut after = Vec::with_capacity(nexts.len());
                    for next in nexts {
                        after.push(Some(self.record(next)));
                    }
                    return Ok((after, answer));
                }
                Ok(CasOutcome::Mismatch) => {
                    self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                    fresh = true;
                }
                Err(ExternalError::Corrupt(message)) => return Err(MachineError::Corrupt(message)),
                Err(error) => {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    maybe_applied |= error.is_indeterminate();
                    tracing::debug!(?ids, %error, "consensus compare-and-set failed; retrying");
                    fresh = true;
                    if !retry.wait().await {
                        return Err(unavailable(&error, maybe_applied));
                    }
                }
            }
        }
    }

    /// Writes an encoded part of `id` under a fresh key (a new key per attempt; attempts that may have
    /// left an object behind are deleted on a best-effort basis).
    pub async fn write_part(
        &self,
        id: GlobalId,
        bytes: Bytes,
        updates: u64,
    ) -> Result<PartRef, MachineError> {
        let mut retry = self.retry();
        let mut abandoned = Vec::new();
        loop {
            let key = format!("{}/{:032x}", blob_dir(id), random_id());
            match self.blob.set(&key, bytes.clone()).await {
                Ok(()) => {
                    self.counters.parts_written.fetch_add(1, Ordering::Relaxed);
                    self.counters.bytes_written.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    self.delete_parts(abandoned).await;
                    return Ok(crate::shard::part::part_ref(key, &bytes, updates));
                }
                Err(error) => {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%id, %error, "blob set failed; retrying");
                    abandoned.push(key);
                    if !retry.wait().await {
                        self.delete_parts(abandoned).await;
                        return Err(unavailable(&error, false));
                    }
                }
            }
        }
    }

    /// Deletes parts, best effort (what is left is found by the leaked-part sweep).
    pub async fn delete_parts(&self, keys: Vec<String>) {
        for key in keys {
            match self.blob.delete(&key).await {
                Ok(()) => {
                    self.counters.parts_deleted.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => tracing::debug!(%key, %error, "cannot delete a part; the sweep will"),
            }
        }
    }

    /// Reads and checks a part (retrying failed reads within the budget), through the part cache: every
    /// read checks the bytes against `part`, and a kept value that fails the check is forgotten.
    /// `reader` says who reads, for the metrics.
    pub async fn read_part(&self, part: &PartRef, reader: PartReader) -> Result<Vec<Update>, ReadPartError> {
        self.read_part_with(part, reader, CacheUse::Keep, |part, bytes| decode_part(part, bytes)).await
    }

    /// Reads a part like [`read_part`](Self::read_part), decoding (and checking) it with `decode` (which
    /// may keep the bytes: they are shared, not copied).
    /// With [`CacheUse::Scan`], a part fetched from the store is not kept in the part cache.
    pub async fn read_part_with<T>(
        &self,
        part: &PartRef,
        reader: PartReader,
        cache_use: CacheUse,
        decode: impl FnOnce(&PartRef, &Bytes) -> Result<T, PartError>,
    ) -> Result<T, ReadPartError> {
        self.metrics.part_read(reader);
        if let Some(bytes) = &part.inline {
            return decode(part, bytes).map_err(ReadPartError::Damaged);
        }
        let mut retry = self.retry();
        loop {
            let got = match (&self.part_cache, cache_use) {
                (Some(cache), CacheUse::Scan) => cache.get_scanning(&part.key).await,
                _ => self.blob.get(&part.key).await,
            };
            match got {
                Ok(Some(bytes)) => {
                    return decode(part, &bytes).map_err(|damage| {
                        if let Some(cache) = &self.part_cache {
                            cache.forget(&part.key);
                        }
                        ReadPartError::Damaged(damage)
                    });
                }
                Ok(None) => return Err(ReadPartError::Damaged(PartError::Missing { key: part.key.clone() })),
                Err(error) => {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    if !retry.wait().await {
                        return Err(ReadPartError::Unavailable(error.message().to_owned()));
                    }
                }
            }
        }
    }
}

/// Whether a part read keeps the part it fetches in the process's part cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheUse {
    /// Keep it (most reads: listens, compaction, small snapshots).
    Keep,
    /// Do not keep it: a scan larger than the cache should give one reader
    /// ([`super::read::SCAN_CACHE_FRACTION`]). Kept parts and fetches in flight still serve it.
    Scan,
}

/// Why a part could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadPartError {
    /// It is missing or corrupt.
    Damaged(PartError),
    /// The blob store failed for longer than the retry budget.
    Unavailable(String),
}
