//! [`InProcess`]: the embedded store behind an `Arc`-shared handle, implementing [`StorageCollections`].
//!
//! **What this is.** The async shell around the synchronous core ([`Store`]) and, when durable, a
//! [`DataDir`]. Every mutation that is logged (create, drop, append, read policy, since changes) goes
//! through the committer ([`crate::commit`]): it validates each group of queued operations against the
//! core, has the group's records written and fsynced once (group commit, pipelined with the next group's
//! validation), and only then applies them and answers their callers. So an append is acknowledged only once
//! it is durable, concurrent appends share one fsync, and readers never see data that a crash could take
//! back. Reads (snapshot, listen, frontiers) and hold acquisition lock the core directly. Hold changes (a
//! dropped `ReadHold`, a downgrade) wake the committer, which applies them, compacts, and logs the new
//! sinces with its next commit.
//!
//! **What this is not.** No sockets and no decisions
//! about data: validation and compaction are the core's.
//!
//! **Invariants.** The state lock is never held across an `.await` or an fsync. Every change to a
//! collection's frontiers or contents bumps its signal and marks it dirty for every frontier watcher, under
//! the same lock, so waiters never miss a change.
//!
//! **Tests.** `tests/it/` (errors, listen, holds, durability) through the public API.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use frontiers::{Antichain, ReadPolicy};
use protocol::{Diff, GlobalId, RelationDesc, Row};
use tokio::sync::{oneshot, watch};

use crate::api::{AppendRequest, BoxFuture, CollectionFrontiers, StorageCollections, StorageReadHold};
use crate::commit::Op;
use crate::core::Store;
use crate::durable::{DataDir, DurabilityStats, IoFaults, OpenError, RecoveryReport};
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
    /// Durable stores start a checkpoint once this many bytes were logged since the last one. Default
    /// 64 MiB.
    pub checkpoint_after_log_bytes: u64,
    /// The most operations one group commit takes. Default 4,096.
    pub max_group_ops: usize,
    /// A listen splits its updates into events of at most about this many row bytes. Default 1 MiB.
    pub listen_chunk_bytes: usize,
    /// After a durable store reopens, how long it keeps every collection at its recovered since so that
    /// the users it had before can take their read holds again (see [`Store::hold_for_recovery`]).
    /// Default 30 s.
    pub recovery_grace: Duration,
    /// Injected I/O failures (tests only).
    pub faults: IoFaults,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            snapshot_timeout: Duration::from_secs(30),
            default_read_policy: crate::core::default_read_policy(),
            checkpoint_after_log_bytes: 64 << 20,
            max_group_ops: 4_096,
            listen_chunk_bytes: 1 << 20,
            recovery_grace: Duration::from_secs(30),
            faults: IoFaults::default(),
        }
    }
}

/// Why [`InProcess::checkpoint`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The store keeps no data directory.
    #[error("an in-memory store has nothing to checkpoint")]
    InMemory,
    /// Writing the checkpoint failed; the previous checkpoint and the log are intact.
    #[error("i/o error: {0}")]
    Io(String),
    /// The store was shut down.
    #[error("the store was shut down")]
    Disconnected,
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

    pub(crate) fn process_holds(&mut self) -> Vec<(GlobalId, Antichain<u64>)> {
        let changes = self.store.process_holds();
        let mut sinces = Vec::with_capacity(changes.len());
        for change in changes {
            self.note_changed(change.id);
            sinces.push((change.id, change.new));
        }
        sinces
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

struct Handle {
    shared: Arc<Shared>,
    ops: mpsc::Sender<Op>,
    stats: Arc<Mutex<Option<DurabilityStats>>>,
    recovery: Option<RecoveryReport>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The committer flushes and exits; nobody waits for it.
        let _ = self.ops.send(Op::Shutdown { reply: None });
    }
}

/// The embedded store. Cloning is cheap and shares the store. See the module documentation.
#[derive(Clone)]
pub struct InProcess {
    handle: Arc<Handle>,
}

impl fmt::Debug for InProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcess").field("durable", &self.handle.recovery.is_some()).finish_non_exhaustive()
    }
}

impl InProcess {
    /// A store that keeps everything in memory (nothing survives the process). Appends are acknowledged
    /// as soon as they are applied.
    pub fn in_memory(config: StoreConfig) -> InProcess {
        let (ops, rx) = mpsc::channel();
        let wake = Arc::new(AtomicBool::new(false));
        let mut store = Store::with_notify(wake_callback(&ops, &wake));
        store.set_default_read_policy(config.default_read_policy.clone());
        Self::start(store, None, None, config, ops, rx, wake)
    }

    /// Opens (or creates) a durable store in `dir`, recovering its state. Blocking: it reads the whole
    /// checkpoint and log tail. One process per directory.
    pub fn open(dir: impl AsRef<Path>, config: StoreConfig) -> Result<InProcess, OpenError> {
        let (ops, rx) = mpsc::channel();
        let wake = Arc::new(AtomicBool::new(false));
        let (data_dir, mut store, report) =
            DataDir::open(dir.as_ref(), config.faults.clone(), wake_callback(&ops, &wake))?;
        store.set_default_read_policy(config.default_read_policy.clone());
        let grace = config.recovery_grace;
        let opened = Self::start(store, Some(data_dir), Some(report), config, ops, rx, wake);
        let shared = Arc::downgrade(opened.shared());
        let spawned = std::thread::Builder::new().name("storage-recovery".into()).spawn(move || {
            std::thread::sleep(grace);
            if let Some(shared) = shared.upgrade() {
                let released = shared.lock().store.end_recovery();
                tracing::info!(
                    released,
                    "storage recovery grace over: compaction follows the read holds again"
                );
            }
        });
        if let Err(error) = spawned {
            // Without the timer the recovery holds stay until `end_recovery`: history is kept, nothing lost.
            tracing::warn!(%error, "cannot spawn the recovery grace timer");
        }
        Ok(opened)
    }

    /// Ends the recovery grace now (see [`StoreConfig::recovery_grace`]): the holds kept for clients that
    /// have not come back are released. Returns how many.
    pub fn end_recovery(&self) -> usize {
        self.shared().lock().store.end_recovery()
    }

    fn start(
        store: Store,
        data_dir: Option<DataDir>,
        recovery: Option<RecoveryReport>,
        config: StoreConfig,
        ops: mpsc::Sender<Op>,
        rx: mpsc::Receiver<Op>,
        wake: Arc<AtomicBool>,
    ) -> InProcess {
        let signals = store.ids().into_iter().map(|id| (id, watch::Sender::new(()))).collect();
        let state = State { store, signals, watchers: BTreeMap::new(), next_watcher: 0, shut_down: false };
        let shared = Arc::new(Shared { state: Mutex::new(state), config });
        let stats = Arc::new(Mutex::new(data_dir.as_ref().map(DataDir::stats)));
        crate::commit::spawn(Arc::clone(&shared), data_dir, rx, ops.clone(), wake, Arc::clone(&stats));
        InProcess { handle: Arc::new(Handle { shared, ops, stats, recovery }) }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// What recovery found, for a durable store.
    pub fn recovery_report(&self) -> Option<&RecoveryReport> {
        self.handle.recovery.as_ref()
    }

    /// The log's counters as of the last commit, for a durable store.
    pub fn durability_stats(&self) -> Option<DurabilityStats> {
        *self.handle.stats.lock().expect("stats lock")
    }

    /// Runs `f` on the core, under the state lock (for inspection: tests, the simulator, benchmarks).
    pub fn with_core<R>(&self, f: impl FnOnce(&Store) -> R) -> R {
        f(&self.handle.shared.lock().store)
    }

    /// Writes a checkpoint now and waits for it (normally they happen on their own, see
    /// [`StoreConfig::checkpoint_after_log_bytes`]).
    pub async fn checkpoint(&self) -> Result<(), CheckpointError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Checkpoint { reply: Some(reply) });
        rx.await.unwrap_or(Err(CheckpointError::Disconnected))
    }

    /// Flushes and closes the log and stops the store: later calls fail with `Disconnected`, listens and
    /// frontier watches end with `Disconnected`. Returns once the log is closed.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Shutdown { reply: Some(reply) });
        let _ = rx.await;
    }

    fn send(&self, op: Op) {
        // A closed channel drops `op`, and with it the reply sender: the caller sees `Disconnected`.
        let _ = self.handle.ops.send(op);
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

fn wake_callback(ops: &mpsc::Sender<Op>, wake: &Arc<AtomicBool>) -> Arc<dyn Fn() + Send + Sync> {
    let ops = ops.clone();
    let wake = Arc::clone(wake);
    Arc::new(move || {
        if !wake.swap(true, Ordering::SeqCst) {
            let _ = ops.send(Op::Wake);
        }
    })
}

impl StorageCollections for InProcess {
    fn create_collection(&self, id: GlobalId, desc: RelationDesc) -> BoxFuture<'_, Result<(), CreateError>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            self.send(Op::Create { id, desc, reply });
            rx.await.unwrap_or(Err(CreateError::Disconnected))
        })
    }

    fn drop_collection(&self, id: GlobalId) -> BoxFuture<'_, Result<(), DropError>> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            self.send(Op::Drop { id, reply });
            rx.await.unwrap_or(Err(DropError::Disconnected))
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
            let (reply, rx) = oneshot::channel();
            self.send(Op::Append { requests, reply });
            rx.await.unwrap_or(Err(AppendError::Disconnected))
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
            let (reply, rx) = oneshot::channel();
            self.send(Op::Policy { id, policy, reply });
            rx.await.unwrap_or(Err(HoldError::Disconnected))
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
