//! [`InProcess`]: the embedded in-memory store behind an `Arc`-shared handle, implementing
//! [`StorageCollections`].
//!
//! **What this is.** The async shell around the synchronous core ([`Store`]): every call locks the core,
//! applies its change and answers. Nothing survives the process; it is what the other crates' tests and
//! benchmarks run on, where storage is not what they test. Hold changes (a dropped `ReadHold`, a downgrade)
//! arrive from whatever thread drops the hold; they wake a small thread (`storage-holds`) that applies them
//! and compacts, and every mutating call applies them too before it answers.
//!
//! **What this is not.** Not durable (the write-ahead log that once made it so is retired: every process
//! keeps its data in shards, [`crate::ShardCollections`]), no sockets, and no decisions about data:
//! validation and compaction are the core's.
//!
//! **Invariants.** The state lock is never held across an `.await`. Every change to a collection's frontiers
//! or contents bumps its signal and marks it dirty for every frontier watcher, under the same lock, so
//! waiters never miss a change. After [`InProcess::shutdown`] every call fails with `Disconnected`.
//!
//! **Tests.** `tests/it/` (errors, listen, the core's model) through the public API.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use frontiers::{Antichain, ReadPolicy};
use protocol::{Diff, GlobalId, RelationDesc, Row};
use tokio::sync::watch;

use crate::api::{AppendRequest, BoxFuture, CollectionFrontiers, StorageCollections, StorageReadHold};
use crate::core::{Created, Store};
use crate::error::{AppendError, CreateError, DropError, HoldError, ReadError};
use crate::listen::{FrontierWatch, Listen, LocalListen, LocalWatch};

/// Configuration of an [`InProcess`] store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// How long [`StorageCollections::snapshot`] waits for an incomplete `as_of` to become complete before
    /// it fails with [`ReadError::NotYetReadable`]. Default 30 s.
    pub snapshot_timeout: Duration,
    /// The read policy of new collections. Default [`crate::core::default_read_policy`].
    pub default_read_policy: ReadPolicy<u64>,
    /// A listen splits its updates into events of at most about this many row bytes. Default 1 MiB.
    pub listen_chunk_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            snapshot_timeout: Duration::from_secs(30),
            default_read_policy: crate::core::default_read_policy(),
            listen_chunk_bytes: 1 << 20,
        }
    }
}

/// A frontier watcher's pending work.
pub(crate) struct WatcherEntry {
    /// Collections whose frontiers may have changed since the watcher last looked.
    pub(crate) dirty: BTreeSet<GlobalId>,
    pub(crate) signal: watch::Sender<()>,
}

/// Everything behind the state lock.
pub(crate) struct State {
    pub(crate) store: Store,
    /// Per collection, bumped on every change; removed when the collection is dropped (which wakes every
    /// receiver with an error).
    pub(crate) signals: HashMap<GlobalId, watch::Sender<()>>,
    pub(crate) watchers: BTreeMap<u64, WatcherEntry>,
    pub(crate) next_watcher: u64,
    pub(crate) shut_down: bool,
}

impl State {
    /// Records that `id`'s frontiers or contents changed.
    pub(crate) fn note_changed(&mut self, id: GlobalId) {
        if let Some(signal) = self.signals.get(&id) {
            signal.send_replace(());
        }
        for watcher in self.watchers.values_mut() {
            watcher.dirty.insert(id);
            watcher.signal.send_replace(());
        }
    }

    pub(crate) fn note_dropped(&mut self, id: GlobalId) {
        self.note_changed(id);
        self.signals.remove(&id);
    }

    /// Applies the hold changes that are waiting (compacting), and signals the collections whose since moved.
    pub(crate) fn process_holds(&mut self) {
        for change in self.store.process_holds() {
            self.note_changed(change.id);
        }
    }
}

/// What listens and watches share with the store.
pub(crate) struct Shared {
    state: Mutex<State>,
    pub(crate) config: StoreConfig,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("the storage state lock is poisoned: a panic broke an invariant")
    }

    /// The lock for `Drop` implementations, which must not panic while unwinding.
    pub(crate) fn state_lock_for_drop(&self) -> Result<MutexGuard<'_, State>, ()> {
        self.state.lock().map_err(|_| ())
    }
}

/// What wakes the `storage-holds` thread.
enum HoldsWake {
    /// A read hold changed.
    Changed,
    /// The store shut down.
    Stop,
}

struct Handle {
    shared: Arc<Shared>,
    holds: mpsc::Sender<HoldsWake>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The thread exits; nobody waits for it.
        let _ = self.holds.send(HoldsWake::Stop);
    }
}

/// The embedded store. Cloning is cheap and shares the store. See the module documentation.
#[derive(Clone)]
pub struct InProcess {
    handle: Arc<Handle>,
}

impl fmt::Debug for InProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcess").finish_non_exhaustive()
    }
}

impl InProcess {
    /// A store that keeps everything in memory (nothing survives the process). Appends are acknowledged
    /// as soon as they are applied.
    pub fn in_memory(config: StoreConfig) -> InProcess {
        let (holds, wakes) = mpsc::channel();
        let notify = holds.clone();
        let mut store = Store::with_notify(Arc::new(move || {
            // Only fails once the thread is gone, after a shutdown: nothing is left to compact then.
            let _ = notify.send(HoldsWake::Changed);
        }));
        store.set_default_read_policy(config.default_read_policy.clone());
        let state = State {
            store,
            signals: HashMap::new(),
            watchers: BTreeMap::new(),
            next_watcher: 0,
            shut_down: false,
        };
        let shared = Arc::new(Shared { state: Mutex::new(state), config });
        let weak = Arc::downgrade(&shared);
        let spawned = std::thread::Builder::new()
            .name("storage-holds".into())
            .spawn(move || process_holds(&weak, &wakes));
        if let Err(error) = spawned {
            // Hold changes are still applied by the next mutating call; only idle compaction waits.
            tracing::warn!(%error, "cannot spawn the storage-holds thread");
        }
        InProcess { handle: Arc::new(Handle { shared, holds }) }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Runs `f` on the core, under the state lock (for inspection: tests and benchmarks).
    pub fn with_core<R>(&self, f: impl FnOnce(&Store) -> R) -> R {
        f(&self.handle.shared.lock().store)
    }

    /// Stops the store: later calls fail with `Disconnected`, listens and frontier watches end with
    /// `Disconnected`.
    pub async fn shutdown(&self) {
        let mut state = self.shared().lock();
        state.shut_down = true;
        state.signals.clear();
        for watcher in state.watchers.values_mut() {
            watcher.signal.send_replace(());
        }
        drop(state);
        let _ = self.handle.holds.send(HoldsWake::Stop);
        tracing::info!("storage shut down");
    }

    /// Runs `change` on the state unless the store shut down (then `disconnected`), and applies the hold
    /// changes that are waiting, so the sinces it leaves behind are current.
    fn mutate<T, E>(&self, disconnected: E, change: impl FnOnce(&mut State) -> Result<T, E>) -> Result<T, E> {
        let mut state = self.shared().lock();
        if state.shut_down {
            return Err(disconnected);
        }
        let result = change(&mut state);
        state.process_holds();
        result
    }

    async fn snapshot_inner(&self, id: GlobalId, as_of: u64) -> Result<Vec<(Row, Diff)>, ReadError> {
        let shared = self.shared();
        let wait = async {
            loop {
                let mut signal = {
                    let state = shared.lock();
                    if state.shut_down {
                        return Err(ReadError::Disconnected);
                    }
                    match state.store.snapshot(id, as_of) {
                        Err(ReadError::NotYetReadable { .. }) => {}
                        Err(ReadError::CollectionMissing(id)) if state.store.is_dropped(id) => {
                            return Err(ReadError::CollectionDropped(id));
                        }
                        other => return other,
                    }
                    let Some(signal) = state.signals.get(&id) else {
                        return Err(ReadError::CollectionDropped(id));
                    };
                    signal.subscribe()
                };
                // An error means the collection was dropped or the store stopped; the next round says which.
                let _ = signal.changed().await;
            }
        };
        match tokio::time::timeout(shared.config.snapshot_timeout, wait).await {
            Ok(result) => result,
            Err(_elapsed) => {
                let state = shared.lock();
                match state.store.frontiers(id) {
                    Some(frontiers) => Err(ReadError::NotYetReadable { id, upper: frontiers.upper, as_of }),
                    None => Err(ReadError::CollectionDropped(id)),
                }
            }
        }
    }
}

/// The `storage-holds` thread: applies hold changes (and so compacts) as they arrive, until the store stops
/// or is gone.
fn process_holds(shared: &Weak<Shared>, wakes: &mpsc::Receiver<HoldsWake>) {
    while let Ok(HoldsWake::Changed) = wakes.recv() {
        // Coalesce a burst of changes into one pass.
        while let Ok(wake) = wakes.try_recv() {
            if let HoldsWake::Stop = wake {
                return;
            }
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Ok(mut state) = shared.state_lock_for_drop() else {
            // Poisoned by a panic elsewhere: that panic reports the broken invariant.
            return;
        };
        if state.shut_down {
            return;
        }
        state.process_holds();
    }
}

impl StorageCollections for InProcess {
    fn create_collection(&self, id: GlobalId, desc: RelationDesc) -> BoxFuture<'_, Result<(), CreateError>> {
        Box::pin(async move {
            self.mutate(CreateError::Disconnected, |state| {
                if let Created::New = state.store.create_collection(id, desc)? {
                    state.signals.insert(id, watch::Sender::new(()));
                    state.note_changed(id);
                }
                Ok(())
            })
        })
    }

    fn drop_collection(&self, id: GlobalId) -> BoxFuture<'_, Result<(), DropError>> {
        Box::pin(async move {
            self.mutate(DropError::Disconnected, |state| {
                state.store.drop_collection(id)?;
                state.note_dropped(id);
                Ok(())
            })
        })
    }

    fn list_collections(&self) -> BoxFuture<'_, Result<Vec<(GlobalId, RelationDesc)>, ReadError>> {
        Box::pin(async move {
            let state = self.shared().lock();
            if state.shut_down {
                return Err(ReadError::Disconnected);
            }
            Ok(state.store.collections())
        })
    }

    fn frontiers(&self, id: GlobalId) -> BoxFuture<'_, Result<CollectionFrontiers, ReadError>> {
        Box::pin(async move {
            let state = self.shared().lock();
            if state.shut_down {
                return Err(ReadError::Disconnected);
            }
            state.store.frontiers(id).ok_or(ReadError::CollectionMissing(id))
        })
    }

    fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'_, Result<(), AppendError>> {
        Box::pin(async move {
            self.mutate(AppendError::Disconnected, |state| {
                for id in state.store.append(requests)? {
                    state.note_changed(id);
                }
                Ok(())
            })
        })
    }

    fn acquire_read_hold(
        &self,
        id: GlobalId,
        frontier: Antichain<u64>,
    ) -> BoxFuture<'_, Result<StorageReadHold, HoldError>> {
        Box::pin(async move {
            let mut state = self.shared().lock();
            if state.shut_down {
                return Err(HoldError::Disconnected);
            }
            state.store.acquire_read_hold(id, frontier)
        })
    }

    fn set_read_policy(&self, id: GlobalId, policy: ReadPolicy<u64>) -> BoxFuture<'_, Result<(), HoldError>> {
        Box::pin(async move {
            self.mutate(HoldError::Disconnected, |state| state.store.set_read_policy(id, policy))
        })
    }

    fn snapshot(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Vec<(Row, Diff)>, ReadError>> {
        Box::pin(self.snapshot_inner(id, as_of))
    }

    fn listen(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Listen, ReadError>> {
        Box::pin(async move { LocalListen::new(Arc::clone(self.shared()), id, as_of).map(Listen::local) })
    }

    fn watch_frontiers(&self) -> BoxFuture<'_, Result<FrontierWatch, ReadError>> {
        Box::pin(async move { LocalWatch::new(Arc::clone(self.shared())).map(FrontierWatch::local) })
    }
}
