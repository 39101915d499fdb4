//! [`InProcess`]: the embedded store behind an `Arc`-shared handle, implementing [`StorageCollections`].
//!
//! **What this is.** The async shell around the synchronous core ([`Store`]) and, when durable, a
//! [`DataDir`]. One *committer* thread owns every mutation that is logged (create, drop, append, read
//! policy, since changes): it takes all operations queued since its last round as one group, validates them
//! against the core (each append against the uppers the earlier ones in the group leave behind), writes
//! their records and fsyncs once, and only then applies them to the core and answers their callers. So an
//! append is acknowledged only once it is durable, concurrent appends share one fsync, and readers never
//! see data that a crash could take back. Reads (snapshot, listen, frontiers) and hold acquisition lock the
//! core directly. Hold changes (a dropped `ReadHold`, a downgrade) wake the committer, which applies them,
//! compacts, and logs the new sinces with its next commit.
//!
//! **What this is not.** No sockets ([`crate::server`] serves an `InProcess` over TCP) and no decisions
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
use crate::core::Store;
use crate::durable::wal::{self, LogRecordRef};
use crate::durable::{CheckpointJob, DataDir, DurabilityStats, IoFaults, OpenError, RecoveryReport};
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

    fn note_dropped(&mut self, id: GlobalId) {
        self.note_changed(id);
        self.signals.remove(&id);
    }

    fn process_holds(&mut self) -> Vec<(GlobalId, Antichain<u64>)> {
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

enum Op {
    Create {
        id: GlobalId,
        desc: RelationDesc,
        reply: oneshot::Sender<Result<(), CreateError>>,
    },
    Drop {
        id: GlobalId,
        reply: oneshot::Sender<Result<(), DropError>>,
    },
    Append {
        requests: Vec<AppendRequest>,
        reply: oneshot::Sender<Result<(), AppendError>>,
    },
    Policy {
        id: GlobalId,
        policy: ReadPolicy<u64>,
        reply: oneshot::Sender<Result<(), HoldError>>,
    },
    Checkpoint {
        reply: oneshot::Sender<Result<(), CheckpointError>>,
    },
    /// Hold changes are waiting to be processed.
    Wake,
    Shutdown {
        reply: Option<oneshot::Sender<()>>,
    },
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
        Ok(Self::start(store, Some(data_dir), Some(report), config, ops, rx, wake))
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
        let committer = Committer {
            shared: Arc::clone(&shared),
            data_dir,
            rx,
            wake,
            deferred_sinces: BTreeMap::new(),
            stats: Arc::clone(&stats),
            checkpoint_thread: None,
            buffer: Vec::new(),
            peeked: None,
        };
        std::thread::Builder::new()
            .name("storage-committer".into())
            .spawn(move || committer.run())
            .expect("cannot spawn the storage committer thread");
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
        self.send(Op::Checkpoint { reply });
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

/// An operation validated in this round, waiting for its records to be durable.
enum Staged {
    Create { id: GlobalId, desc: RelationDesc, reply: oneshot::Sender<Result<(), CreateError>> },
    Drop { id: GlobalId, reply: oneshot::Sender<Result<(), DropError>> },
    Append { requests: Vec<AppendRequest>, reply: oneshot::Sender<Result<(), AppendError>> },
    Policy { id: GlobalId, policy: ReadPolicy<u64>, reply: oneshot::Sender<Result<(), HoldError>> },
}

/// An answer that is sent after the round's commit.
enum Answer {
    Create(oneshot::Sender<Result<(), CreateError>>, Result<(), CreateError>),
    Drop(oneshot::Sender<Result<(), DropError>>, Result<(), DropError>),
    Append(oneshot::Sender<Result<(), AppendError>>, Result<(), AppendError>),
    Policy(oneshot::Sender<Result<(), HoldError>>, Result<(), HoldError>),
}

impl Answer {
    fn send(self) {
        // A caller that stopped waiting does not care.
        match self {
            Answer::Create(tx, r) => drop(tx.send(r)),
            Answer::Drop(tx, r) => drop(tx.send(r)),
            Answer::Append(tx, r) => drop(tx.send(r)),
            Answer::Policy(tx, r) => drop(tx.send(r)),
        }
    }
}

impl Staged {
    fn fail(self, error: &str) -> Answer {
        let io = error.to_string();
        match self {
            Staged::Create { reply, .. } => Answer::Create(reply, Err(CreateError::Io(io))),
            Staged::Drop { reply, .. } => Answer::Drop(reply, Err(DropError::Io(io))),
            Staged::Append { reply, .. } => Answer::Append(reply, Err(AppendError::Io(io))),
            // A read policy is not data: it applies even if its record could not be logged.
            Staged::Policy { reply, .. } => Answer::Policy(reply, Ok(())),
        }
    }
}

/// The committer thread's state. See the module documentation.
struct Committer {
    shared: Arc<Shared>,
    data_dir: Option<DataDir>,
    rx: mpsc::Receiver<Op>,
    wake: Arc<AtomicBool>,
    /// Since changes applied in memory but not yet logged.
    deferred_sinces: BTreeMap<GlobalId, Antichain<u64>>,
    stats: Arc<Mutex<Option<DurabilityStats>>>,
    checkpoint_thread: Option<std::thread::JoinHandle<()>>,
    buffer: Vec<u8>,
    /// An operation taken off the queue to see whether it was empty.
    peeked: Option<Op>,
}

impl Committer {
    fn run(mut self) {
        let mut shutdown_reply = None;
        'outer: loop {
            let first = match self.peeked.take() {
                Some(op) => op,
                None => match self.rx.recv() {
                    Ok(op) => op,
                    Err(_) => break,
                },
            };
            let mut ops = vec![first];
            while ops.len() < self.shared.config.max_group_ops {
                match self.rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let mut group = Vec::new();
            for op in ops {
                match op {
                    Op::Shutdown { reply } => {
                        self.round(std::mem::take(&mut group));
                        shutdown_reply = reply;
                        break 'outer;
                    }
                    Op::Checkpoint { reply } => {
                        self.round(std::mem::take(&mut group));
                        let result = self.checkpoint(true);
                        let _ = reply.send(result);
                    }
                    op => group.push(op),
                }
            }
            self.round(group);
            if self.deferred_sinces.is_empty() {
                self.maybe_checkpoint();
            }
        }
        self.shut_down();
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(());
        }
    }

    /// Group commits of `group`, in order: usually one, more when an operation depends on a create or drop
    /// earlier in the group.
    fn round(&mut self, group: Vec<Op>) {
        let mut rest = group;
        loop {
            rest = self.sub_round(rest);
            if rest.is_empty() {
                break;
            }
        }
        if self.data_dir.is_none() {
            self.deferred_sinces.clear();
        } else if !self.deferred_sinces.is_empty() && self.queue_is_empty() {
            // Nothing else is coming to carry the since records: write them now; the next commit (or
            // shutdown) makes them durable.
            if let Err(error) = self.log_sinces_unsynced() {
                tracing::warn!(%error, "cannot log since changes; retrying with the next commit");
            }
        }
    }

    /// One group commit: validate, log and fsync, apply, answer. Returns the operations it left for the
    /// next one (those after an append or policy change to a collection created or dropped in this one).
    fn sub_round(&mut self, group: Vec<Op>) -> Vec<Op> {
        let mut staged = Vec::new();
        let mut answers = Vec::new();
        let mut rest = Vec::new();
        {
            let mut state = self.shared.lock();
            self.wake.store(false, Ordering::SeqCst);
            for (id, since) in state.process_holds() {
                self.deferred_sinces.insert(id, since);
            }
            // Uppers, creates and drops that the staged operations leave behind.
            let mut uppers = BTreeMap::new();
            let mut created: BTreeMap<GlobalId, RelationDesc> = BTreeMap::new();
            let mut dropped: BTreeSet<GlobalId> = BTreeSet::new();
            let mut ops = group.into_iter();
            while let Some(op) = ops.next() {
                let pending = |id: &GlobalId| created.contains_key(id) || dropped.contains(id);
                let barrier = match &op {
                    Op::Append { requests, .. } => requests.iter().any(|r| pending(&r.id)),
                    Op::Policy { id, .. } => pending(id),
                    _ => false,
                };
                if barrier {
                    rest.push(op);
                    rest.extend(ops);
                    break;
                }
                match op {
                    Op::Wake => {}
                    Op::Create { id, desc, reply } => {
                        let check = if dropped.contains(&id) {
                            Err(CreateError::AlreadyDropped(id))
                        } else if let Some(pending) = created.get(&id) {
                            if *pending == desc { Ok(false) } else { Err(CreateError::SchemaMismatch { id }) }
                        } else {
                            state.store.check_create(id, &desc)
                        };
                        match check {
                            Ok(true) => {
                                created.insert(id, desc.clone());
                                staged.push(Staged::Create { id, desc, reply });
                            }
                            Ok(false) => answers.push(Answer::Create(reply, Ok(()))),
                            Err(error) => answers.push(Answer::Create(reply, Err(error))),
                        }
                    }
                    Op::Drop { id, reply } => {
                        let exists =
                            !dropped.contains(&id) && (created.contains_key(&id) || state.store.contains(id));
                        if exists {
                            dropped.insert(id);
                            staged.push(Staged::Drop { id, reply });
                        } else {
                            answers.push(Answer::Drop(reply, Err(DropError::CollectionMissing(id))));
                        }
                    }
                    Op::Append { requests, reply } => {
                        match state.store.validate_append(&requests, &mut uppers) {
                            Ok(()) => staged.push(Staged::Append { requests, reply }),
                            Err(error) => answers.push(Answer::Append(reply, Err(error))),
                        }
                    }
                    Op::Policy { id, policy, reply } => {
                        if state.store.contains(id) {
                            staged.push(Staged::Policy { id, policy, reply });
                        } else {
                            answers.push(Answer::Policy(reply, Err(HoldError::CollectionMissing(id))));
                        }
                    }
                    Op::Checkpoint { .. } | Op::Shutdown { .. } => {
                        unreachable!("the run loop handles checkpoints and shutdown between groups")
                    }
                }
            }
        }

        let committed = if staged.is_empty() { Ok(()) } else { self.log(&staged) };
        let mut state = self.shared.lock();
        match committed {
            Ok(()) => {
                for op in staged {
                    match op {
                        Staged::Create { id, desc, reply } => {
                            let result = state.store.create_collection(id, desc).map(|_| ());
                            assert!(result.is_ok(), "a validated create of {id} failed: {result:?}");
                            state.signals.insert(id, watch::Sender::new(()));
                            state.note_changed(id);
                            answers.push(Answer::Create(reply, Ok(())));
                        }
                        Staged::Drop { id, reply } => {
                            let result = state.store.drop_collection(id);
                            assert!(result.is_ok(), "a validated drop of {id} failed: {result:?}");
                            self.deferred_sinces.remove(&id);
                            state.note_dropped(id);
                            answers.push(Answer::Drop(reply, Ok(())));
                        }
                        Staged::Append { requests, reply } => {
                            for id in state.store.apply_validated_append(requests) {
                                state.note_changed(id);
                            }
                            answers.push(Answer::Append(reply, Ok(())));
                        }
                        Staged::Policy { id, policy, reply } => {
                            let result = state.store.set_read_policy(id, policy);
                            answers.push(Answer::Policy(reply, result));
                        }
                    }
                }
            }
            Err(error) => {
                let error = error.to_string();
                for op in staged {
                    if let Staged::Policy { id, policy, .. } = &op {
                        let _ = state.store.set_read_policy(*id, policy.clone());
                    }
                    answers.push(op.fail(&error));
                }
            }
        }
        for (id, since) in state.process_holds() {
            self.deferred_sinces.insert(id, since);
        }
        drop(state);
        for answer in answers {
            answer.send();
        }
        rest
    }

    /// Whether no operation is waiting (peeking one if there is).
    fn queue_is_empty(&mut self) -> bool {
        if self.peeked.is_some() {
            return false;
        }
        match self.rx.try_recv() {
            Ok(op) => {
                self.peeked = Some(op);
                false
            }
            Err(_) => true,
        }
    }

    /// Writes the deferred since records and the staged operations' records, and fsyncs. In memory:
    /// nothing.
    fn log(&mut self, staged: &[Staged]) -> std::io::Result<()> {
        let Some(data_dir) = self.data_dir.as_mut() else {
            return Ok(());
        };
        self.buffer.clear();
        for (id, since) in &self.deferred_sinces {
            wal::encode_record(&LogRecordRef::Since { id: *id, since }, &mut self.buffer)?;
        }
        for op in staged {
            let record = match op {
                Staged::Create { id, desc, .. } => LogRecordRef::Create { id: *id, desc },
                Staged::Drop { id, .. } => LogRecordRef::Drop { id: *id },
                Staged::Append { requests, .. } => LogRecordRef::Append(requests),
                Staged::Policy { id, policy, .. } => LogRecordRef::Policy { id: *id, policy },
            };
            wal::encode_record(&record, &mut self.buffer)?;
        }
        data_dir.commit(&self.buffer)?;
        self.deferred_sinces.clear();
        *self.stats.lock().expect("stats lock") = Some(data_dir.stats());
        if self.buffer.capacity() > 64 << 20 {
            self.buffer = Vec::new();
        }
        Ok(())
    }

    fn log_sinces_unsynced(&mut self) -> std::io::Result<()> {
        let Some(data_dir) = self.data_dir.as_mut() else {
            return Ok(());
        };
        self.buffer.clear();
        for (id, since) in &self.deferred_sinces {
            wal::encode_record(&LogRecordRef::Since { id: *id, since }, &mut self.buffer)?;
        }
        data_dir.write_unsynced(&self.buffer)?;
        self.deferred_sinces.clear();
        Ok(())
    }

    fn maybe_checkpoint(&mut self) {
        let Some(data_dir) = self.data_dir.as_ref() else {
            return;
        };
        if data_dir.log_bytes_since_checkpoint() < self.shared.config.checkpoint_after_log_bytes {
            return;
        }
        if self.checkpoint_thread.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        if let Err(error) = self.checkpoint(false) {
            tracing::warn!(%error, "checkpoint failed; the log keeps everything meanwhile");
        }
    }

    /// Begins a checkpoint and writes it, on this thread if `wait`, else on a background thread.
    fn checkpoint(&mut self, wait: bool) -> Result<(), CheckpointError> {
        if self.data_dir.is_none() {
            return Err(CheckpointError::InMemory);
        }
        if let Some(thread) = self.checkpoint_thread.take() {
            let _ = thread.join();
        }
        // Log pending since records first so the new segment starts clean.
        self.log(&[]).map_err(|e| CheckpointError::Io(e.to_string()))?;
        let data_dir = self.data_dir.as_mut().expect("checked above");
        let job: CheckpointJob =
            data_dir.begin_checkpoint().map_err(|e| CheckpointError::Io(e.to_string()))?;
        let state = {
            let mut state = self.shared.lock();
            for (id, since) in state.process_holds() {
                self.deferred_sinces.insert(id, since);
            }
            state.store.to_checkpoint()
        };
        *self.stats.lock().expect("stats lock") = Some(data_dir.stats());
        if wait {
            return job.write(&state).map_err(|e| CheckpointError::Io(e.to_string()));
        }
        let thread = std::thread::Builder::new()
            .name("storage-checkpoint".into())
            .spawn(move || {
                if let Err(error) = job.write(&state) {
                    tracing::warn!(%error, "checkpoint failed; the log keeps everything meanwhile");
                }
            })
            .map_err(|e| CheckpointError::Io(e.to_string()))?;
        self.checkpoint_thread = Some(thread);
        Ok(())
    }

    fn shut_down(&mut self) {
        if let Err(error) = self.log(&[]) {
            tracing::warn!(%error, "cannot log the last since changes at shutdown");
        }
        if let Some(thread) = self.checkpoint_thread.take() {
            let _ = thread.join();
        }
        if let Some(data_dir) = self.data_dir.take()
            && let Err(error) = data_dir.close()
        {
            tracing::warn!(%error, "cannot fsync the log at shutdown");
        }
        let mut state = self.shared.lock();
        state.shut_down = true;
        state.signals.clear();
        for watcher in state.watchers.values_mut() {
            watcher.signal.send_replace(());
        }
        drop(state);
        // Answer whatever is still queued.
        while let Ok(op) = self.rx.try_recv() {
            drop(op);
        }
        tracing::info!("storage shut down");
    }
}
