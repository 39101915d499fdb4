//! [`CachedBlob`]: the process's cache of batch parts, a [`Blob`] that keeps the values it read or wrote
//! (up to a bound in bytes) and lets concurrent readers of one key share one fetch.
//!
//! **Why.** Every process reads every part of every shard it listens to, and several readers inside one
//! process read the same part: each listen and snapshot on the shard (one per dataflow that imports it),
//! and the process's own compaction, which merges the batches it just listened to. Without the cache each
//! of them issues its own `get`. Blob keys are never overwritten (see [`crate::blob`]: every key the engine
//! writes is fresh), so a value read once can be served again to anyone.
//!
//! **What it does.** `get` of a kept key answers from memory (a *hit*). `get` of a key another reader is
//! fetching waits for that fetch and gets its answer, value or error (a *join*: single flight). Otherwise
//! it fetches (a *miss*) and keeps the value if it fits. Values are evicted least recently used first so
//! that the kept bytes never exceed `capacity_bytes`; a value larger than the whole bound is not kept.
//! `set` writes through (the value is kept once the store took it: the process's own appends and
//! compaction outputs are read back by its listens and its next merges), `delete` forgets the key, `list`
//! passes through. A `set` or `delete` also disowns a fetch of the key in flight, so that the fetch's
//! answer, possibly older, is not kept. A reader whose fetch is dropped unfinished (an aborted prefetch)
//! hands the fetch to the next waiter.
//!
//! A *scanning* read ([`CachedBlob::get_scanning`]) is served by kept values and joins fetches in
//! flight like `get`, but keeps nothing it fetches itself: a snapshot larger than a quarter of the bound
//! reads this way ([`super::read::SCAN_CACHE_FRACTION`]), so that one large read neither evicts the parts
//! the process's listens and compaction use nor holds memory for parts it reads once.
//!
//! **What it is not.** It checks nothing: the engine checks every part it reads against the state's
//! record (size and CRC-32, [`super::part::decode_part`]) on every read, hit or miss, and forgets a key
//! whose kept value failed that check ([`CachedBlob::forget`]), so a damaged value is reported as before
//! and fetched again by the next read. It does not retry: the engine does, above it. It sits above
//! [`super::metered::MeteredBlob`], so the blob metrics count the store's operations, not the reads.
//!
//! **Invariants.** The kept bytes never exceed `capacity_bytes` (asserted after every change); a key is
//! kept or being fetched, never both; at most one fetch per key is in flight.
//!
//! **Tests.** Unit tests below (bound, recency, single flight, a dropped fetch, write-through and
//! disowning, scanning reads); `tests/it/part_cache.rs` (through the engine: one `get` per part for
//! concurrent readers, the bound under a workload, damage still reported by name, large snapshots read
//! through the cache).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::watch;

use crate::api::BoxFuture;
use crate::blob::{Blob, BlobMeta};
use crate::external::ExternalError;
use crate::metrics::{PartCacheRead, StorageMetrics};

/// What a fetch answered, shared with the readers that joined it.
type Answer = Result<Option<Bytes>, ExternalError>;

/// A key's place in the cache.
#[derive(Debug)]
enum Slot {
    /// Kept, last used at `tick`.
    Kept { value: Bytes, tick: u64 },
    /// Being fetched by flight `flight`; its answer arrives on `answer`.
    Fetching { flight: u64, answer: watch::Receiver<Option<Answer>> },
}

#[derive(Debug, Default)]
struct State {
    slots: BTreeMap<String, Slot>,
    /// The kept keys by last use (ticks are unique).
    recency: BTreeMap<u64, String>,
    next_tick: u64,
    next_flight: u64,
    /// The bytes of the kept values.
    bytes: usize,
    stats: PartCacheStats,
}

/// The cache's counters (for tests and tools; the same events go to the storage metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartCacheStats {
    /// Reads answered from memory.
    pub hits: u64,
    /// Reads that waited for another reader's fetch of the same key.
    pub joins: u64,
    /// Reads that fetched from the store.
    pub misses: u64,
    /// Values evicted to stay within the bound.
    pub evictions: u64,
    /// The bytes kept now.
    pub bytes: u64,
    /// The most bytes ever kept at once.
    pub peak_bytes: u64,
    /// The values kept now.
    pub parts: u64,
}

/// A [`Blob`] that keeps parts in memory; see the module documentation.
#[derive(Debug)]
pub struct CachedBlob {
    inner: Arc<dyn Blob>,
    capacity_bytes: usize,
    state: Mutex<State>,
    metrics: StorageMetrics,
}

/// What a `get` does after looking at the cache.
enum Step<'a> {
    Hit(Bytes),
    Join(watch::Receiver<Option<Answer>>),
    Fetch(Flight<'a>),
}

/// The fetch one reader runs for everyone. Dropped before it lands (its `get` was dropped), it removes
/// its slot and drops its sender, which wakes the joined readers: one of them fetches instead.
struct Flight<'a> {
    cache: &'a CachedBlob,
    key: String,
    flight: u64,
    answer: Option<watch::Sender<Option<Answer>>>,
    /// Whether the value fetched is kept (a [`CachedBlob::get_scanning`] keeps nothing).
    keep: bool,
}

impl CachedBlob {
    /// Wraps `inner`, keeping at most `capacity_bytes` (at least 1) of values.
    pub fn new(inner: Arc<dyn Blob>, capacity_bytes: usize, metrics: StorageMetrics) -> Self {
        assert!(capacity_bytes > 0, "a cache keeps something; no cache is no wrapper");
        CachedBlob { inner, capacity_bytes, state: Mutex::new(State::default()), metrics }
    }

    /// The bound.
    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The counters.
    pub fn stats(&self) -> PartCacheStats {
        let state = self.lock();
        PartCacheStats { bytes: state.bytes as u64, parts: state.recency.len() as u64, ..state.stats }
    }

    /// Forgets `key` (its kept value failed the engine's check), and disowns a fetch of it in flight.
    pub fn forget(&self, key: &str) {
        let mut state = self.lock();
        self.remove(&mut state, key);
        self.publish(&state);
    }

    /// Removes `key`'s slot: a kept value, or a fetch in flight, which is disowned (it lands without
    /// keeping its answer, which a `set` or `delete` may have made stale).
    fn remove(&self, state: &mut State, key: &str) {
        if let Some(Slot::Kept { value, tick }) = state.slots.remove(key) {
            state.recency.remove(&tick).expect("a kept key has a recency entry");
            state.bytes -= value.len();
        }
    }

    fn publish(&self, state: &State) {
        assert!(state.bytes <= self.capacity_bytes, "the part cache exceeded its bound");
        debug_assert_eq!(
            state.recency.len(),
            state.slots.values().filter(|s| matches!(s, Slot::Kept { .. })).count(),
            "every kept key has one recency entry"
        );
        self.metrics.part_cache_kept(state.bytes as u64, state.recency.len() as u64);
    }

    /// Keeps `value` at `key` (replacing what is there), evicting the least recently used values to make
    /// room; a value larger than the bound is not kept.
    fn keep(&self, state: &mut State, key: &str, value: Bytes) {
        self.remove(state, key);
        if value.len() > self.capacity_bytes {
            return;
        }
        while state.bytes + value.len() > self.capacity_bytes {
            let (_, oldest) = state.recency.pop_first().expect("bytes are kept, so some value is");
            match state.slots.remove(&oldest) {
                Some(Slot::Kept { value, .. }) => state.bytes -= value.len(),
                other => panic!("the recency order named {oldest}, which is not kept: {other:?}"),
            }
            state.stats.evictions += 1;
            self.metrics.part_cache_eviction();
        }
        let tick = state.next_tick;
        state.next_tick += 1;
        state.bytes += value.len();
        state.stats.peak_bytes = state.stats.peak_bytes.max(state.bytes as u64);
        state.recency.insert(tick, key.to_owned());
        state.slots.insert(key.to_owned(), Slot::Kept { value, tick });
    }

    /// Looks `key` up: a kept value (moved to most recently used), a fetch to join, or a fetch to run
    /// (whose value is kept if `keep`).
    fn step(&self, key: &str, keep: bool) -> Step<'_> {
        let mut state = self.lock();
        let state = &mut *state;
        let tick = state.next_tick;
        match state.slots.get_mut(key) {
            Some(Slot::Kept { value, tick: used }) => {
                let value = value.clone();
                let old = std::mem::replace(used, tick);
                state.next_tick += 1;
                let key = state.recency.remove(&old).expect("a kept key has a recency entry");
                state.recency.insert(tick, key);
                state.stats.hits += 1;
                self.metrics.part_cache_read(PartCacheRead::Hit);
                Step::Hit(value)
            }
            Some(Slot::Fetching { answer, .. }) => Step::Join(answer.clone()),
            None => {
                let flight = state.next_flight;
                state.next_flight += 1;
                let (sender, receiver) = watch::channel(None);
                state.slots.insert(key.to_owned(), Slot::Fetching { flight, answer: receiver });
                state.stats.misses += 1;
                self.metrics.part_cache_read(PartCacheRead::Miss);
                Step::Fetch(Flight { cache: self, key: key.to_owned(), flight, answer: Some(sender), keep })
            }
        }
    }

    /// Ends `flight` with `answer`: keeps the value if the flight still owns its key, and tells the
    /// readers that joined it.
    fn land(&self, mut flight: Flight<'_>, answer: &Answer) {
        {
            let mut state = self.lock();
            if flight.owns_slot(&state) {
                state.slots.remove(&flight.key);
                if let Ok(Some(value)) = answer
                    && flight.keep
                {
                    self.keep(&mut state, &flight.key, value.clone());
                }
                self.publish(&state);
            }
        }
        let sender = flight.answer.take().expect("a flight lands once");
        sender.send_replace(Some(answer.clone()));
    }

    /// Reads `key` as [`Blob::get`] does (a kept value is a hit, a fetch in flight is joined), except
    /// that a value it fetches itself is not kept: a scan of more data than the cache should give to
    /// one reader (a large snapshot) neither evicts what the process's other readers use nor holds
    /// memory for parts it reads once.
    pub async fn get_scanning(&self, key: &str) -> Answer {
        self.get_cached(key, false).await
    }

    async fn get_cached(&self, key: &str, keep: bool) -> Answer {
        let mut joined = false;
        loop {
            match self.step(key, keep) {
                Step::Hit(value) => return Ok(Some(value)),
                Step::Join(mut receiver) => {
                    if !joined {
                        joined = true;
                        self.lock().stats.joins += 1;
                        self.metrics.part_cache_read(PartCacheRead::Join);
                    }
                    // An error: the fetching reader was dropped unfinished; look again (take it over).
                    if let Ok(answer) = receiver.wait_for(Option::is_some).await {
                        return answer.clone().expect("waited for an answer");
                    }
                }
                Step::Fetch(flight) => {
                    let answer = self.inner.get(key).await;
                    self.land(flight, &answer);
                    return answer;
                }
            }
        }
    }
}

impl Flight<'_> {
    /// Whether the key's slot is still this flight's (no `set` or `delete` disowned it).
    fn owns_slot(&self, state: &State) -> bool {
        matches!(state.slots.get(&self.key), Some(Slot::Fetching { flight, .. }) if *flight == self.flight)
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if self.answer.is_some() {
            let mut state = self.cache.lock();
            if self.owns_slot(&state) {
                state.slots.remove(&self.key);
            }
        }
    }
}

impl Blob for CachedBlob {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, ExternalError>> {
        Box::pin(self.get_cached(key, true))
    }

    fn set<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), ExternalError>> {
        Box::pin(async move {
            let result = self.inner.set(key, value.clone()).await;
            let mut state = self.lock();
            match &result {
                Ok(()) => self.keep(&mut state, key, value),
                // Whether the store took it is unknown: keep nothing.
                Err(_) => self.remove(&mut state, key),
            }
            self.publish(&state);
            result
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ExternalError>> {
        Box::pin(async move {
            let result = self.inner.delete(key).await;
            let mut state = self.lock();
            self.remove(&mut state, key);
            self.publish(&state);
            result
        })
    }

    fn list<'a>(&'a self, dir: &'a str) -> BoxFuture<'a, Result<Vec<BlobMeta>, ExternalError>> {
        self.inner.list(dir)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::sync::Semaphore;

    use super::*;

    /// A store in memory that counts gets and holds each get (with the value it read when it started)
    /// until the test lets it through.
    #[derive(Debug)]
    struct Gated {
        values: Mutex<BTreeMap<String, Bytes>>,
        gets: AtomicU64,
        gate: Semaphore,
    }

    impl Gated {
        fn new(values: &[(&str, usize)], open: bool) -> Arc<Gated> {
            let values = values.iter().map(|(k, n)| (k.to_string(), Bytes::from(vec![7; *n]))).collect();
            let permits = if open { Semaphore::MAX_PERMITS } else { 0 };
            Arc::new(Gated {
                values: Mutex::new(values),
                gets: AtomicU64::new(0),
                gate: Semaphore::new(permits),
            })
        }

        fn gets(&self) -> u64 {
            self.gets.load(Ordering::SeqCst)
        }
    }

    impl Blob for Gated {
        fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, ExternalError>> {
            Box::pin(async move {
                self.gets.fetch_add(1, Ordering::SeqCst);
                let value = self.values.lock().unwrap().get(key).cloned();
                self.gate.acquire().await.expect("never closed").forget();
                Ok(value)
            })
        }

        fn set<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), ExternalError>> {
            self.values.lock().unwrap().insert(key.to_owned(), value);
            Box::pin(async { Ok(()) })
        }

        fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ExternalError>> {
            self.values.lock().unwrap().remove(key);
            Box::pin(async { Ok(()) })
        }

        fn list<'a>(&'a self, _dir: &'a str) -> BoxFuture<'a, Result<Vec<BlobMeta>, ExternalError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }

    fn cache(store: &Arc<Gated>, capacity_bytes: usize) -> Arc<CachedBlob> {
        let metrics = StorageMetrics::unregistered().unwrap();
        Arc::new(CachedBlob::new(Arc::clone(store) as Arc<dyn Blob>, capacity_bytes, metrics))
    }

    #[tokio::test]
    async fn the_least_recently_used_parts_go_first_and_the_bound_always_holds() {
        let store = Gated::new(&[("a", 40), ("b", 40), ("c", 40), ("huge", 101)], true);
        let cache = cache(&store, 100);
        cache.get("a").await.unwrap();
        cache.get("b").await.unwrap();
        cache.get("a").await.unwrap();
        assert_eq!(store.gets(), 2, "a was kept");
        cache.get("c").await.unwrap();
        let stats = cache.stats();
        assert_eq!((stats.bytes, stats.parts, stats.evictions), (80, 2, 1), "b (least recent) went");
        cache.get("a").await.unwrap();
        assert_eq!(store.gets(), 3);
        cache.get("b").await.unwrap();
        assert_eq!(store.gets(), 4, "b was evicted");
        assert_eq!(cache.get("huge").await.unwrap().unwrap().len(), 101);
        cache.get("huge").await.unwrap();
        assert_eq!(store.gets(), 6, "a value larger than the bound is never kept");
        let stats = cache.stats();
        assert!(stats.peak_bytes <= 100 && stats.bytes <= 100, "{stats:?}");
        assert_eq!((stats.hits, stats.misses, stats.joins), (2, 6, 0));
        assert_eq!(cache.get("missing").await.unwrap(), None);
        assert_eq!(cache.get("missing").await.unwrap(), None, "absence is not kept");
        assert_eq!(store.gets(), 8);
    }

    #[tokio::test]
    async fn a_scanning_read_is_served_by_kept_values_and_keeps_nothing_it_fetches() {
        let store = Gated::new(&[("a", 40), ("b", 40)], true);
        let cache = cache(&store, 100);
        cache.get("a").await.unwrap();
        assert_eq!(cache.get_scanning("a").await.unwrap().unwrap().len(), 40);
        assert_eq!(store.gets(), 1, "a kept value serves a scan");
        assert_eq!(cache.get_scanning("b").await.unwrap().unwrap().len(), 40);
        assert_eq!(cache.get_scanning("b").await.unwrap().unwrap().len(), 40);
        assert_eq!(store.gets(), 3, "a scan keeps nothing it fetched");
        let stats = cache.stats();
        assert_eq!((stats.parts, stats.bytes, stats.evictions), (1, 40, 0));
        cache.get("b").await.unwrap();
        cache.get("b").await.unwrap();
        assert_eq!(store.gets(), 4, "a plain read keeps what it fetched");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readers_of_one_key_share_one_fetch() {
        let store = Gated::new(&[("a", 10)], false);
        let cache = cache(&store, 100);
        let readers: Vec<_> = (0..8)
            .map(|_| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move { cache.get("a").await })
            })
            .collect();
        while cache.stats().joins < 7 {
            tokio::task::yield_now().await;
        }
        store.gate.add_permits(1);
        for reader in readers {
            assert_eq!(reader.await.unwrap().unwrap().unwrap().len(), 10);
        }
        assert_eq!(store.gets(), 1);
        let stats = cache.stats();
        assert_eq!((stats.misses, stats.joins, stats.hits), (1, 7, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_fetch_hands_over_to_a_waiting_reader() {
        let store = Gated::new(&[("a", 10)], false);
        let cache = cache(&store, 100);
        let first = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.get("a").await })
        };
        while store.gets() < 1 {
            tokio::task::yield_now().await;
        }
        let second = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.get("a").await })
        };
        while cache.stats().joins < 1 {
            tokio::task::yield_now().await;
        }
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        while store.gets() < 2 {
            tokio::task::yield_now().await;
        }
        store.gate.add_permits(1);
        assert_eq!(second.await.unwrap().unwrap().unwrap().len(), 10);
        assert_eq!(cache.stats().parts, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_go_through_and_disown_a_fetch_in_flight() {
        let store = Gated::new(&[("a", 10)], false);
        let cache = cache(&store, 100);
        cache.set("b", Bytes::from_static(b"written")).await.unwrap();
        store.gate.add_permits(1);
        assert_eq!(cache.get("b").await.unwrap().unwrap(), "written");
        assert_eq!(store.gets(), 0, "a written value is kept");
        cache.delete("b").await.unwrap();
        assert_eq!(cache.get("b").await.unwrap(), None, "a deleted key is forgotten");
        // A get of `a` in flight while `a` is overwritten: its (older) answer is not kept.
        let reading = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.get("a").await })
        };
        while store.gets() < 2 {
            tokio::task::yield_now().await;
        }
        cache.set("a", Bytes::from_static(b"new")).await.unwrap();
        store.gate.add_permits(1);
        assert_eq!(reading.await.unwrap().unwrap().unwrap().len(), 10, "the older value, as fetched");
        assert_eq!(
            cache.get("a").await.unwrap().unwrap(),
            "new",
            "the written value stays, not the stale one"
        );
        assert_eq!(store.gets(), 2);
        cache.forget("a");
        store.gate.add_permits(1);
        assert_eq!(cache.get("a").await.unwrap().unwrap(), "new", "forgotten: fetched again");
        assert_eq!(store.gets(), 3);
    }
}
