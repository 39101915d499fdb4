//! [`Listen`] (a collection's change stream) and [`FrontierWatch`] (every collection's frontier changes),
//! for the embedded store and the shards.
//!
//! **Backpressure by pulling.** A local listen keeps no queue that the store fills: each call to
//! [`Listen::next`] that finds its small buffer empty reads the updates in `[delivered upper, current
//! upper)` straight from the store, so a slow listener costs nothing while it is slow and then catches up in
//! one larger read. The listen holds a read hold at what it has delivered, so those updates are still there
//! at full resolution. A frontier watch keeps a set of dirty collection ids (bounded by the number of
//! collections, not the number of changes) and reads the current frontiers when it is polled.
//!
//! **Invariants.** A listen's events are, in order: the snapshot at `as_of` as `Updates` at time `as_of`
//! (always sent, possibly empty), then alternating non-empty `Updates` and `Progress` with strictly
//! advancing frontiers; every update's time is beyond the previous `Progress` and before the next one.
//!
//! A listen or watch on shards ([`crate::shard::ShardCollections`]) is the other kind, documented in
//! `shard/listen.rs`.
//!
//! **Tests.** `tests/it/listen.rs` (in-process, including a lagging listener; on shards in
//! `tests/it/shards.rs`).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use frontiers::Antichain;
use protocol::{Diff, GlobalId, Row};
use tokio::sync::watch;

use crate::api::{CollectionFrontiers, ListenEvent, StorageReadHold};
use crate::error::ReadError;
use crate::inprocess::{Shared, WatcherEntry};
use crate::shard::{ShardListen, ShardWatch};

/// A stream of a collection's changes; see [`crate::StorageCollections::listen`].
pub struct Listen {
    inner: ListenInner,
}

enum ListenInner {
    Local(LocalListen),
    Shard(Box<ShardListen>),
}

impl fmt::Debug for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, id, as_of) = match &self.inner {
            ListenInner::Local(l) => ("local", l.id, l.as_of),
            ListenInner::Shard(s) => ("shard", s.id(), s.as_of()),
        };
        f.debug_struct("Listen").field("kind", &kind).field("id", &id).field("as_of", &as_of).finish()
    }
}

impl Listen {
    pub(crate) fn local(listen: LocalListen) -> Self {
        Listen { inner: ListenInner::Local(listen) }
    }

    pub(crate) fn shard(listen: ShardListen) -> Self {
        Listen { inner: ListenInner::Shard(Box::new(listen)) }
    }

    /// The next event: waits until there is one. [`ReadError::CollectionDropped`] once the collection is
    /// dropped, [`ReadError::Disconnected`] once the store or server is gone; both are final.
    pub async fn next(&mut self) -> Result<ListenEvent, ReadError> {
        match &mut self.inner {
            ListenInner::Local(listen) => listen.next().await,
            ListenInner::Shard(listen) => listen.next().await,
        }
    }

    /// The next event if one is ready without waiting.
    pub fn try_next(&mut self) -> Option<Result<ListenEvent, ReadError>> {
        match &mut self.inner {
            ListenInner::Local(listen) => listen.poll_ready(),
            ListenInner::Shard(listen) => listen.try_next(),
        }
    }

    /// The collection.
    pub fn id(&self) -> GlobalId {
        match &self.inner {
            ListenInner::Local(listen) => listen.id,
            ListenInner::Shard(listen) => listen.id(),
        }
    }

    /// The time the listen started at.
    pub fn as_of(&self) -> u64 {
        match &self.inner {
            ListenInner::Local(listen) => listen.as_of,
            ListenInner::Shard(listen) => listen.as_of(),
        }
    }
}

/// A listen on the embedded store.
pub(crate) struct LocalListen {
    shared: Arc<Shared>,
    id: GlobalId,
    as_of: u64,
    /// Held at `as_of` until the snapshot is delivered, then at the delivered upper.
    hold: StorageReadHold,
    /// The last `Progress` delivered; `None` until the snapshot is.
    delivered: Option<Antichain<u64>>,
    pending: VecDeque<ListenEvent>,
    signal: watch::Receiver<()>,
    /// A final error, repeated on every later call.
    finished: Option<ReadError>,
}

impl LocalListen {
    pub(crate) fn new(shared: Arc<Shared>, id: GlobalId, as_of: u64) -> Result<Self, ReadError> {
        let (hold, signal) = {
            let mut state = shared.lock();
            if state.shut_down {
                return Err(ReadError::Disconnected);
            }
            let hold = state
                .store
                .acquire_read_hold(id, Antichain::from_elem(as_of))
                .map_err(|e| ReadError::from_hold(e, as_of))?;
            let signal = state.signals.get(&id).map(watch::Sender::subscribe);
            let signal = signal.unwrap_or_else(|| panic!("collection {id} exists but has no signal"));
            (hold, signal)
        };
        Ok(LocalListen {
            shared,
            id,
            as_of,
            hold,
            delivered: None,
            pending: VecDeque::new(),
            signal,
            finished: None,
        })
    }

    async fn next(&mut self) -> Result<ListenEvent, ReadError> {
        loop {
            if let Some(result) = self.poll_ready() {
                return result;
            }
            // `poll_ready` marked the signal seen under the lock, so no change since is missed. An error
            // means the collection was dropped or the store stopped; the next poll says which.
            if self.signal.changed().await.is_err() {
                if let Some(result) = self.poll_ready() {
                    return result;
                }
                return Err(self.finish(ReadError::Disconnected));
            }
        }
    }

    fn finish(&mut self, error: ReadError) -> ReadError {
        self.hold.release();
        self.pending.clear();
        self.finished = Some(error.clone());
        error
    }

    /// The next event if there is one now (reading the store if the buffer is empty).
    pub(crate) fn poll_ready(&mut self) -> Option<Result<ListenEvent, ReadError>> {
        if let Some(error) = &self.finished {
            return Some(Err(error.clone()));
        }
        if let Some(event) = self.pending.pop_front() {
            return Some(Ok(event));
        }
        let shared = Arc::clone(&self.shared);
        let state = shared.lock();
        if state.shut_down {
            return Some(Err(self.finish(ReadError::Disconnected)));
        }
        let Some(frontiers) = state.store.frontiers(self.id) else {
            return Some(Err(self.finish(ReadError::CollectionDropped(self.id))));
        };
        let upper = frontiers.upper;
        let chunk_bytes = shared.config.listen_chunk_bytes;
        match &self.delivered {
            None if !upper.less_equal(&self.as_of) => {
                let snapshot = match state.store.snapshot(self.id, self.as_of) {
                    Ok(snapshot) => snapshot,
                    Err(error) => panic!("a listen's hold keeps {} readable at its as_of: {error}", self.id),
                };
                let as_of = self.as_of;
                let rows: Vec<(Row, u64, Diff)> = snapshot.into_iter().map(|(r, d)| (r, as_of, d)).collect();
                let first = chunk_into(rows, chunk_bytes, &mut self.pending);
                if first == 0 {
                    self.pending.push_back(ListenEvent::Updates(Vec::new()));
                }
                if let Some(next) = as_of.checked_add(1) {
                    self.read_range(&state.store, next, &upper, chunk_bytes);
                }
            }
            Some(delivered) if *delivered != upper => {
                let lower =
                    *delivered.as_option().expect("an empty delivered upper equals every later upper");
                self.read_range(&state.store, lower, &upper, chunk_bytes);
            }
            _ => {
                self.signal.borrow_and_update();
                return None;
            }
        }
        drop(state);
        self.pending.push_back(ListenEvent::Progress(upper.clone()));
        if upper.is_empty() {
            self.hold.release();
        } else if let Err(error) = self.hold.try_downgrade(upper.clone()) {
            panic!("a listen's upper only advances: {error}");
        }
        self.delivered = Some(upper);
        self.pending.pop_front().map(Ok)
    }

    fn read_range(
        &mut self,
        store: &crate::core::Store,
        lower: u64,
        upper: &Antichain<u64>,
        chunk_bytes: usize,
    ) {
        match store.updates_between(self.id, lower, upper) {
            Ok(updates) => {
                chunk_into(updates, chunk_bytes, &mut self.pending);
            }
            Err(error) => panic!("a listen's hold keeps {} readable from {lower}: {error}", self.id),
        }
    }
}

/// Splits `updates` into `Updates` events of about `chunk_bytes` row bytes each; returns how many.
fn chunk_into(updates: Vec<(Row, u64, Diff)>, chunk_bytes: usize, out: &mut VecDeque<ListenEvent>) -> usize {
    let mut events = 0;
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for update in updates {
        bytes += update.0.byte_len() + 16;
        chunk.push(update);
        if bytes >= chunk_bytes {
            out.push_back(ListenEvent::Updates(std::mem::take(&mut chunk)));
            events += 1;
            bytes = 0;
        }
    }
    if !chunk.is_empty() {
        out.push_back(ListenEvent::Updates(chunk));
        events += 1;
    }
    events
}

/// A stream of frontier changes; see [`crate::StorageCollections::watch_frontiers`].
pub struct FrontierWatch {
    inner: WatchInner,
}

enum WatchInner {
    Local(LocalWatch),
    Shard(Box<ShardWatch>),
}

impl fmt::Debug for FrontierWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.inner {
            WatchInner::Local(_) => "local",
            WatchInner::Shard(_) => "shard",
        };
        f.debug_struct("FrontierWatch").field("kind", &kind).finish_non_exhaustive()
    }
}

impl FrontierWatch {
    pub(crate) fn local(watch: LocalWatch) -> Self {
        FrontierWatch { inner: WatchInner::Local(watch) }
    }

    pub(crate) fn shard(watch: ShardWatch) -> Self {
        FrontierWatch { inner: WatchInner::Shard(Box::new(watch)) }
    }

    /// The next change: a collection's current frontiers, or `None` once it is dropped. Waits until there
    /// is one. [`ReadError::Disconnected`] once the store or server is gone.
    pub async fn next(&mut self) -> Result<(GlobalId, Option<CollectionFrontiers>), ReadError> {
        match &mut self.inner {
            WatchInner::Local(watch) => watch.next().await,
            WatchInner::Shard(watch) => watch.next().await,
        }
    }

    /// The next change if one is ready without waiting.
    pub fn try_next(&mut self) -> Option<Result<(GlobalId, Option<CollectionFrontiers>), ReadError>> {
        match &mut self.inner {
            WatchInner::Local(watch) => watch.poll_ready(),
            WatchInner::Shard(watch) => watch.try_next(),
        }
    }
}

/// A frontier watch on the embedded store.
pub(crate) struct LocalWatch {
    shared: Arc<Shared>,
    watcher: u64,
    /// What this watch has reported, per collection.
    last: BTreeMap<GlobalId, CollectionFrontiers>,
    signal: watch::Receiver<()>,
}

impl LocalWatch {
    pub(crate) fn new(shared: Arc<Shared>) -> Result<Self, ReadError> {
        let (watcher, signal) = {
            let mut state = shared.lock();
            if state.shut_down {
                return Err(ReadError::Disconnected);
            }
            let watcher = state.next_watcher;
            state.next_watcher += 1;
            let dirty = state.store.ids().into_iter().collect();
            let (signal, rx) = watch::channel(());
            state.watchers.insert(watcher, WatcherEntry { dirty, signal });
            (watcher, rx)
        };
        Ok(LocalWatch { shared, watcher, last: BTreeMap::new(), signal })
    }

    async fn next(&mut self) -> Result<(GlobalId, Option<CollectionFrontiers>), ReadError> {
        loop {
            if let Some(result) = self.poll_ready() {
                return result;
            }
            if self.signal.changed().await.is_err() {
                return Err(ReadError::Disconnected);
            }
        }
    }

    pub(crate) fn poll_ready(
        &mut self,
    ) -> Option<Result<(GlobalId, Option<CollectionFrontiers>), ReadError>> {
        let shared = Arc::clone(&self.shared);
        let mut state = shared.lock();
        if state.shut_down {
            return Some(Err(ReadError::Disconnected));
        }
        loop {
            let entry = state.watchers.get_mut(&self.watcher).expect("a live watch is registered");
            let Some(id) = entry.dirty.pop_first() else {
                self.signal.borrow_and_update();
                return None;
            };
            let current = state.store.frontiers(id);
            if current.as_ref() == self.last.get(&id) {
                continue;
            }
            match &current {
                Some(frontiers) => self.last.insert(id, frontiers.clone()),
                None => self.last.remove(&id),
            };
            return Some(Ok((id, current)));
        }
    }
}

impl Drop for LocalWatch {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state_lock_for_drop() {
            state.watchers.remove(&self.watcher);
        }
    }
}
