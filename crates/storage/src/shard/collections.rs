//! [`ShardCollections`]: the [`StorageCollections`] contract on shards, for one process.
//!
//! **What this is.** The process's view of the shard engine (see the parent module for the design): its
//! writer id and readers, the bookkeeping of its read holds per shard (a count of local hold frontiers and
//! the registered reader's since), the state versions its reads are using, and its background tasks
//! (hold sync, heartbeats, maintenance, the push channel). Every operation goes to the shared stores; the
//! only shared memory between processes is the stores themselves.
//!
//! **Invariants.** A local hold is only handed out once the registered reader holds at or before it in
//! the stored state; the registered reader's since only moves forward to the meet of the local holds
//! (back only through a compare-and-set that checks the shard's since). A read registers the version it
//! reads before fetching it, with a floor at or below it (the leased reader's seqno), and the heartbeat
//! never moves the leased reader's seqno past a version still being read. Appends to one shard from one
//! process are serialized (what makes the idempotency check exact).
//!
//! **Tests.** `tests/it/shards.rs` and `tests/it/faults.rs` (every backend).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use frontiers::{Antichain, ChangeBatch, MutableAntichain, PartialOrder, ReadHold, ReadPolicy};
use protocol::{Diff, GlobalId, RelationDesc, Row};
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;

use crate::api::{
    AppendRequest, BoxFuture, CollectionFrontiers, SnapshotChunks, StorageCollections, StorageReadHold,
};
use crate::blob::{Blob, BlobConfig, BlobOpenError};
use crate::consensus::{Consensus, ConsensusConfig, ConsensusOpenError, SeqNo};
use crate::error::{AppendError, CreateError, DropError, HoldError, ReadError};
use crate::external::{now_ms, random_id};
use crate::listen::{FrontierWatch, Listen};
use crate::metrics::{AppendOutcome, StorageMetrics};
use crate::shard::listen::{ShardListen, ShardWatch};
use crate::shard::machine::{Change, Machine, MachineError};
use crate::shard::part::{Run, consolidate_run, encode_part, encoded_len, inline_part_ref, split_run};
use crate::shard::read::{RangeStream, SnapshotStream};
use crate::shard::state::{
    AppendInput, IdempotencyToken, PartRef, ReaderId, ReaderKind, Refusal, ShardState, WriterId,
};
use crate::shard::{ShardConfig, blob_dir, id_of_key, maintenance};

/// Why [`ShardCollections::open`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardOpenError {
    /// The blob store could not be opened.
    #[error(transparent)]
    Blob(#[from] BlobOpenError),
    /// The consensus store could not be opened.
    #[error(transparent)]
    Consensus(#[from] ConsensusOpenError),
    /// The configuration has a setting the engine cannot honour ([`ShardConfig::validate`]).
    #[error("invalid shard configuration: {0}")]
    Config(String),
}

/// A snapshot of a process's shard engine counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardStats {
    /// Committed compare-and-sets.
    pub commits: u64,
    /// Compare-and-sets that lost a race.
    pub conflicts: u64,
    /// Engine failures retried.
    pub retries: u64,
    /// Parts written to the blob store.
    pub parts_written: u64,
    /// Parts of appends carried inline in a state instead ([`ShardConfig::inline_part_bytes`]).
    pub inline_parts: u64,
    /// Bytes of parts written.
    pub bytes_written: u64,
    /// Parts deleted.
    pub parts_deleted: u64,
    /// Merges committed.
    pub merges: u64,
    /// Consensus versions truncated.
    pub versions_truncated: u64,
    /// Holds lost to an expired lease.
    pub holds_lost: u64,
    /// The part cache's counters (`None`: it is off).
    pub part_cache: Option<crate::shard::PartCacheStats>,
}

/// The process's bookkeeping for one shard.
#[derive(Default)]
pub(crate) struct Entry {
    /// The local read holds' frontiers, counted.
    holds: MutableAntichain<u64>,
    /// The hold reader's since in the stored state, as this process last set it; `None`: not registered.
    registered: Option<Antichain<u64>>,
    /// Where a move of the hold reader in flight (`sync_holds`) takes it, until it lands or fails.
    moving_to: Option<Antichain<u64>>,
    holds_dirty: bool,
    /// The hold reader is not moved again before this (a move writes a state version; see
    /// [`ShardConfig::hold_sync_interval`]); `None`: at once.
    hold_sync_after: Option<tokio::time::Instant>,
    /// The leased reader's seqno in the stored state; `None`: not registered.
    leased_seqno: Option<SeqNo>,
    /// Reads in progress: read id → the version it reads (or a floor below it while it starts).
    reads: BTreeMap<u64, SeqNo>,
    next_read: u64,
    /// Serializes changes of this process's readers of the shard.
    registration: Arc<tokio::sync::Mutex<()>>,
    /// Serializes this process's appends to the shard.
    appending: Arc<tokio::sync::Mutex<()>>,
    /// Wakes the shard's poller before its interval.
    pub(crate) poke: Arc<Notify>,
    /// Listens and snapshots waiting for the shard to change.
    waiters: usize,
    /// The versions below this were truncated by this process's maintenance.
    truncated_below: SeqNo,
    poller_running: bool,
}

impl Entry {
    /// Whether a local hold at `frontier` is covered by the stored hold reader: registered at or before
    /// it, and still so once a move of the reader in flight lands. Such a hold needs no store operation,
    /// so it does not wait for a move (or a store outage that holds one up).
    fn covers(&self, frontier: &Antichain<u64>) -> bool {
        let at_or_before = |since: &Antichain<u64>| {
            !since.is_empty() && !frontier.is_empty() && PartialOrder::less_equal(since, frontier)
        };
        self.registered.as_ref().is_some_and(at_or_before) && self.moving_to.as_ref().is_none_or(at_or_before)
    }
}

pub(crate) struct Inner {
    pub(crate) machine: Arc<Machine>,
    pub(crate) config: ShardConfig,
    pub(crate) writer: WriterId,
    pub(crate) leased: ReaderId,
    /// The reader that holds this process's holds: the leased one, or a critical one.
    pub(crate) hold_reader: ReaderId,
    pub(crate) critical: bool,
    shards: Mutex<BTreeMap<GlobalId, Entry>>,
    holds_changed: Arc<Notify>,
    /// Bumped by every commit this process sees and every pushed change: wakes frontier watches.
    pub(crate) changed: watch::Sender<u64>,
    tasks: Mutex<Vec<AbortHandle>>,
    closed: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            task.abort();
        }
    }
}

/// Storage collections as shards on a blob store and a consensus database; see the module documentation.
/// Cloning is cheap and shares the process's state.
#[derive(Clone)]
pub struct ShardCollections {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for ShardCollections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardCollections")
            .field("blob", &self.inner.machine.blob)
            .field("consensus", &self.inner.machine.consensus)
            .field("hold_reader", &self.inner.hold_reader)
            .finish_non_exhaustive()
    }
}

/// A read in progress: keeps its version registered (and whatever else it holds) until dropped.
pub(crate) struct ReadGuard {
    inner: Weak<Inner>,
    id: GlobalId,
    read: u64,
    _keep: Option<StorageReadHold>,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade()
            && let Some(entry) = inner.lock().get_mut(&self.id)
        {
            entry.reads.remove(&self.read);
        }
    }
}

/// Interest in a shard's changes: keeps its poller running until dropped.
pub(crate) struct WaitGuard {
    inner: Weak<Inner>,
    id: GlobalId,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade()
            && let Some(entry) = inner.lock().get_mut(&self.id)
        {
            entry.waiters -= 1;
        }
    }
}

pub(crate) fn read_error_of(id: GlobalId, error: MachineError) -> ReadError {
    match error {
        MachineError::Missing | MachineError::Refused(Refusal::Dropped) => ReadError::CollectionMissing(id),
        MachineError::Refused(Refusal::BeforeSince { since }) => {
            ReadError::BeforeSince { id, since, as_of: 0 }
        }
        MachineError::Refused(other) => ReadError::Unavailable(format!("unexpected refusal {other:?}")),
        MachineError::Unavailable { message, .. } => ReadError::Unavailable(message),
        MachineError::Corrupt(what) => ReadError::Corrupt { id, what },
    }
}

fn hold_error_of(id: GlobalId, requested: &Antichain<u64>, error: MachineError) -> HoldError {
    match error {
        MachineError::Missing | MachineError::Refused(Refusal::Dropped) => HoldError::CollectionMissing(id),
        MachineError::Refused(Refusal::BeforeSince { since }) => {
            HoldError::BeforeSince { id, since, requested: requested.clone() }
        }
        MachineError::Refused(other) => HoldError::Unavailable(format!("unexpected refusal {other:?}")),
        MachineError::Unavailable { message, .. } => HoldError::Unavailable(message),
        MachineError::Corrupt(what) => HoldError::Corrupt { id, what },
    }
}

fn live(state: Option<&ShardState>) -> Result<&ShardState, MachineError> {
    match state {
        None => Err(MachineError::Missing),
        Some(state) if state.dropped => Err(MachineError::Refused(Refusal::Dropped)),
        Some(state) => Ok(state),
    }
}

impl ShardCollections {
    /// Opens the stores and starts the background tasks. Must be called within a tokio runtime. A
    /// consensus server that cannot be reached is tried again within `config.retry_budget` (a process
    /// started during an outage waits for the store, like every operation); one that refuses is not.
    pub async fn open(
        blob: &BlobConfig,
        consensus: &ConsensusConfig,
        config: ShardConfig,
    ) -> Result<ShardCollections, ShardOpenError> {
        config.validate().map_err(ShardOpenError::Config)?;
        let blob = blob.open()?;
        let mut retry = crate::external::Retry::new(
            Duration::from_millis(10),
            Duration::from_millis(500),
            config.retry_budget,
        );
        let consensus = loop {
            match consensus.open().await {
                Err(ConsensusOpenError::Unreachable(error)) if retry.wait().await => {
                    tracing::debug!(%error, "the consensus store is unreachable; opening it again");
                }
                opened => break opened?,
            }
        };
        Self::from_stores(blob, consensus, config)
    }

    /// A process's engine over stores already open. Must be called within a tokio runtime. Fails only
    /// for a configuration the engine cannot honour ([`ShardConfig::validate`]).
    pub fn from_stores(
        blob: Arc<dyn Blob>,
        consensus: Arc<dyn Consensus>,
        config: ShardConfig,
    ) -> Result<ShardCollections, ShardOpenError> {
        config.validate().map_err(ShardOpenError::Config)?;
        let metrics = match &config.metrics {
            Some(metrics) => metrics.clone(),
            None => StorageMetrics::unregistered().expect("the engine's metric families are well-formed"),
        };
        let machine =
            Arc::new(Machine::new(blob, consensus, config.retry_budget, config.part_cache_bytes, metrics));
        let leased = ReaderId(format!("leased-{:032x}", random_id()));
        let (hold_reader, critical) = match &config.critical_reader {
            Some(name) => (ReaderId(format!("critical-{name}")), true),
            None => (leased.clone(), false),
        };
        let inner = Arc::new(Inner {
            machine,
            writer: WriterId(format!("writer-{:032x}", random_id())),
            leased,
            hold_reader,
            critical,
            shards: Mutex::new(BTreeMap::new()),
            holds_changed: Arc::new(Notify::new()),
            changed: watch::channel(0).0,
            tasks: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            config,
        });
        let mut tasks = vec![
            tokio::spawn(sync_holds_task(Arc::downgrade(&inner))).abort_handle(),
            tokio::spawn(heartbeat_task(Arc::downgrade(&inner))).abort_handle(),
        ];
        if inner.config.background_maintenance {
            tasks.push(tokio::spawn(maintenance::background(Arc::downgrade(&inner))).abort_handle());
        }
        if let Some(changes) = inner.machine.consensus.changes() {
            tasks.push(tokio::spawn(forward_changes(Arc::downgrade(&inner), changes)).abort_handle());
        }
        inner.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(tasks);
        Ok(ShardCollections { inner })
    }

    /// The process's counters.
    pub fn stats(&self) -> ShardStats {
        let c = &self.inner.machine.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        ShardStats {
            commits: get(&c.commits),
            conflicts: get(&c.conflicts),
            retries: get(&c.retries),
            parts_written: get(&c.parts_written),
            inline_parts: get(&c.inline_parts),
            bytes_written: get(&c.bytes_written),
            parts_deleted: get(&c.parts_deleted),
            merges: get(&c.merges),
            versions_truncated: get(&c.versions_truncated),
            holds_lost: get(&c.holds_lost),
            part_cache: self.inner.machine.part_cache_stats(),
        }
    }

    /// The current state of `id` (for tests and tools).
    pub async fn state(&self, id: GlobalId) -> Result<Option<Arc<ShardState>>, ReadError> {
        self.inner.machine.fetch(id).await.map_err(|e| read_error_of(id, e))
    }

    /// The blob store.
    pub fn blob(&self) -> &Arc<dyn Blob> {
        &self.inner.machine.blob
    }

    /// The consensus store.
    pub fn consensus(&self) -> &Arc<dyn Consensus> {
        &self.inner.machine.consensus
    }

    /// Runs one thorough maintenance pass over `id` now (what the background does periodically, except
    /// that it collects every part it can right away): expire leases, compact, collect garbage, truncate
    /// versions, and, if `sweep`, delete leaked parts.
    pub async fn maintain(&self, id: GlobalId, sweep: bool) -> Result<maintenance::Report, ReadError> {
        maintenance::maintain(&self.inner, id, sweep, true).await
    }

    /// A streaming snapshot of `id` at `as_of` (see [`SnapshotStream`]); waits like
    /// [`StorageCollections::snapshot`].
    pub async fn snapshot_stream(&self, id: GlobalId, as_of: u64) -> Result<SnapshotStream, ReadError> {
        self.inner.snapshot_stream(id, as_of).await
    }

    /// Stops: releases this process's leased readers (best effort), stops the background tasks; every
    /// later call fails with `Disconnected`.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let ids: Vec<GlobalId> = self.inner.lock().keys().copied().collect();
        for id in ids {
            let leased = self.inner.leased.clone();
            let released = self.inner.machine.update(id, |state, _| {
                match state.and_then(|s| s.release_reader(&leased)) {
                    Some(next) => Ok(Change::Write(vec![next], ())),
                    None => Ok(Change::Keep(())),
                }
            });
            if let Err(error) = released.await {
                tracing::debug!(%id, ?error, "cannot release the leased reader; it will expire");
            }
        }
        for task in self.inner.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            task.abort();
        }
    }
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, BTreeMap<GlobalId, Entry>> {
        // Critical sections below never panic halfway through a change.
        self.shards.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The ids of the shards this process has touched.
    pub(crate) fn known_ids(&self) -> Vec<GlobalId> {
        self.lock().keys().copied().collect()
    }

    fn with_entry<T>(&self, id: GlobalId, f: impl FnOnce(&mut Entry) -> T) -> T {
        f(self.lock().entry(id).or_default())
    }

    pub(crate) fn note_changed(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A local hold at `frontier`, counted (the registered reader holds at or before it).
    fn local_hold(
        self: &Arc<Self>,
        entry: &mut Entry,
        id: GlobalId,
        frontier: Antichain<u64>,
    ) -> StorageReadHold {
        entry.holds.update_iter(frontier.iter().map(|t| (*t, 1)));
        let weak = Arc::downgrade(self);
        let tx = Arc::new(move |id: &GlobalId, mut changes: ChangeBatch<u64>| {
            if let Some(inner) = weak.upgrade() {
                let mut shards = inner.lock();
                if let Some(entry) = shards.get_mut(id) {
                    entry.holds.update_iter(changes.drain());
                    entry.holds_dirty = true;
                    drop(shards);
                    inner.holds_changed.notify_one();
                }
            }
        });
        ReadHold::new(id, frontier, tx)
    }

    /// A read hold on `id` at `frontier` (registering or moving back this process's hold reader if needed).
    pub(crate) async fn acquire_hold(
        self: &Arc<Self>,
        id: GlobalId,
        frontier: Antichain<u64>,
    ) -> Result<StorageReadHold, HoldError> {
        if self.is_closed() {
            return Err(HoldError::Disconnected);
        }
        // A hold the registered reader covers is local: it does not wait for the reader's registration
        // lock, which a move or heartbeat stalled by an unreachable store may hold for a long time.
        let covered = |this: &Self, frontier: Antichain<u64>| {
            let mut shards = this.lock();
            let entry = shards.entry(id).or_default();
            entry.covers(&frontier).then(|| self.local_hold(entry, id, frontier))
        };
        if let Some(hold) = covered(self, frontier.clone()) {
            return Ok(hold);
        }
        let registration = self.with_entry(id, |e| Arc::clone(&e.registration));
        let _registering = registration.lock().await;
        if let Some(hold) = covered(self, frontier.clone()) {
            return Ok(hold);
        }
        let (reader, critical) = (self.hold_reader.clone(), self.critical);
        let lease_ms = duration_ms(self.config.reader_lease);
        let now = now_ms();
        let (state, ()) = self
            .machine
            .update(id, |state, _| {
                let next = live(state)?.hold_reader(&reader, critical, &frontier, now, lease_ms)?;
                Ok(Change::Write(vec![next], ()))
            })
            .await
            .map_err(|e| hold_error_of(id, &frontier, e))?;
        let state = state.expect("written");
        let registered = state.readers.get(&reader).expect("just registered");
        let mut shards = self.lock();
        let entry = shards.entry(id).or_default();
        entry.registered = Some(registered.since.clone());
        // The stored reader is where the state just written says.
        entry.moving_to = None;
        if let ReaderKind::Leased { seqno, .. } = registered.kind {
            entry.leased_seqno.get_or_insert(seqno);
        }
        Ok(self.local_hold(entry, id, frontier))
    }

    /// Moves the hold reader of `id` to the meet of the local holds (releasing it when there are none).
    async fn sync_holds(&self, id: GlobalId) {
        let registration = self.with_entry(id, |e| Arc::clone(&e.registration));
        let _registering = registration.lock().await;
        let target = self.with_entry(id, |e| {
            e.holds_dirty = false;
            let target = e.holds.frontier().to_owned();
            let moving = e.registered.as_ref().is_some_and(|registered| *registered != target);
            moving.then(|| {
                // From here a local hold is taken only if the move leaves it covered (`Entry::covers`).
                e.moving_to = Some(target.clone());
                target
            })
        });
        let Some(target) = target else { return };
        let started = tokio::time::Instant::now();
        let reader = self.hold_reader.clone();
        let release = target.is_empty() && self.critical;
        let result = self
            .machine
            .update(id, |state, _| {
                let state = live(state)?;
                let next = if release {
                    state.release_reader(&reader)
                } else {
                    state.advance_reader(&reader, &target)?
                };
                Ok(match next {
                    Some(next) => Change::Write(vec![next], ()),
                    None => Change::Keep(()),
                })
            })
            .await;
        match result {
            Ok(_) => self.with_entry(id, |e| {
                e.moving_to = None;
                e.registered = (!target.is_empty()).then(|| target.clone());
                e.hold_sync_after = Some(started + self.config.hold_sync_interval);
            }),
            Err(MachineError::Refused(Refusal::ReaderMissing | Refusal::Dropped) | MachineError::Missing) => {
                self.with_entry(id, |e| {
                    e.moving_to = None;
                    e.registered = None;
                });
            }
            Err(error) => {
                // The move may have landed (an indeterminate failure): `moving_to` stays, so a local
                // hold is taken only where the reader is, either way, until the stored state is known.
                tracing::debug!(%id, ?error, "cannot move this process's reader; will retry");
                let retry_at = tokio::time::Instant::now() + self.config.poll_interval;
                self.with_entry(id, |e| {
                    e.holds_dirty = true;
                    e.hold_sync_after = Some(retry_at);
                });
            }
        }
    }

    /// Heartbeats this process's leased reader of `id` with the oldest version it is reading.
    pub(crate) async fn heartbeat(&self, id: GlobalId) {
        let registration = self.with_entry(id, |e| Arc::clone(&e.registration));
        let _registering = registration.lock().await;
        let (registered, reading) =
            self.with_entry(id, |e| (e.leased_seqno.is_some(), e.reads.values().min().copied()));
        if !registered {
            return;
        }
        let seqno = reading.or_else(|| self.machine.cached(id).map(|s| s.seqno)).unwrap_or(0);
        let reader = self.leased.clone();
        let now = now_ms();
        let result = self
            .machine
            .update(id, |state, _| Ok(Change::Write(vec![live(state)?.heartbeat(&reader, now, seqno)?], ())))
            .await;
        match result {
            Ok((state, ())) => {
                let held = state.and_then(|s| match s.readers.get(&reader)?.kind {
                    ReaderKind::Leased { seqno, .. } => Some(seqno),
                    ReaderKind::Critical => None,
                });
                self.with_entry(id, |e| e.leased_seqno = held);
            }
            Err(MachineError::Refused(Refusal::ReaderMissing)) => {
                tracing::warn!(%id, reader = %reader.0, "this process's leased reader expired; its holds are lost");
                self.machine.counters.holds_lost.fetch_add(1, Ordering::Relaxed);
                let critical = self.critical;
                self.with_entry(id, |e| {
                    e.leased_seqno = None;
                    if !critical {
                        e.registered = None;
                    }
                });
            }
            Err(MachineError::Refused(Refusal::Dropped) | MachineError::Missing) => {
                self.with_entry(id, |e| {
                    e.leased_seqno = None;
                    e.registered = None;
                });
            }
            Err(error) => tracing::debug!(%id, ?error, "heartbeat failed; will retry"),
        }
    }

    /// How many versions this process's leased reader of `id` holds back beyond the ones its reads use
    /// (`None` if it is not registered).
    pub(crate) fn reader_lag(&self, id: GlobalId, head: SeqNo) -> Option<u64> {
        self.with_entry(id, |e| {
            let held = e.leased_seqno?;
            let needed = e.reads.values().min().copied().unwrap_or(head);
            Some(needed.saturating_sub(held))
        })
    }

    /// Whether enough versions below `floor` piled up since this process last truncated `id` to truncate
    /// again (truncating is a write; doing it in bulk keeps it off the appends' way).
    pub(crate) fn truncation_due(&self, id: GlobalId, floor: SeqNo, backlog: u64) -> bool {
        self.with_entry(id, |e| floor.saturating_sub(e.truncated_below) >= backlog)
    }

    /// Records that `id`'s versions below `floor` are truncated.
    pub(crate) fn note_truncated(&self, id: GlobalId, floor: SeqNo) {
        self.with_entry(id, |e| e.truncated_below = e.truncated_below.max(floor));
    }

    /// Registers the version a read of `id` will use; returns the state and the guard that keeps it.
    pub(crate) async fn begin_read(
        self: &Arc<Self>,
        id: GlobalId,
        keep: Option<StorageReadHold>,
    ) -> Result<(Arc<ShardState>, ReadGuard), ReadError> {
        if self.is_closed() {
            return Err(ReadError::Disconnected);
        }
        let registration = self.with_entry(id, |e| Arc::clone(&e.registration));
        let read = {
            let _registering = registration.lock().await;
            if self.with_entry(id, |e| e.leased_seqno.is_none()) {
                let (reader, now, lease) =
                    (self.leased.clone(), now_ms(), duration_ms(self.config.reader_lease));
                let (state, ()) = self
                    .machine
                    .update(id, |state, _| match live(state)?.register_leased(&reader, now, lease)? {
                        Some(next) => Ok(Change::Write(vec![next], ())),
                        None => Ok(Change::Keep(())),
                    })
                    .await
                    .map_err(|e| read_error_of(id, e))?;
                let seqno = match state.as_ref().and_then(|s| s.readers.get(&reader)).map(|r| &r.kind) {
                    Some(ReaderKind::Leased { seqno, .. }) => *seqno,
                    _ => unreachable!("the leased reader was just registered"),
                };
                self.with_entry(id, |e| e.leased_seqno = Some(seqno));
            }
            self.with_entry(id, |e| {
                let read = e.next_read;
                e.next_read += 1;
                let floor = e.leased_seqno.expect("registered above");
                e.reads.insert(read, floor);
                read
            })
        };
        let guard = ReadGuard { inner: Arc::downgrade(self), id, read, _keep: keep };
        let state = self.machine.fetch(id).await.map_err(|e| read_error_of(id, e))?;
        let state = state.ok_or(ReadError::CollectionMissing(id))?;
        if state.dropped {
            return Err(ReadError::CollectionDropped(id));
        }
        self.with_entry(id, |e| {
            if let Some(seqno) = e.reads.get_mut(&read) {
                *seqno = state.seqno;
            }
        });
        Ok((state, guard))
    }

    /// Keeps `id`'s poller running while the guard lives.
    pub(crate) fn wait_guard(self: &Arc<Self>, id: GlobalId) -> WaitGuard {
        let start = self.with_entry(id, |e| {
            e.waiters += 1;
            let start = !e.poller_running;
            e.poller_running = true;
            start
        });
        if start {
            let task = tokio::spawn(poll_shard(Arc::downgrade(self), id));
            let mut tasks = self.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Pollers end when nobody waits; their handles go with them (the list stays bounded).
            tasks.retain(|task| !task.is_finished());
            tasks.push(task.abort_handle());
        }
        WaitGuard { inner: Arc::downgrade(self), id }
    }

    /// Waits until `id`'s state satisfies `ready` (with its poller running), up to `timeout`; returns the
    /// last state seen either way.
    pub(crate) async fn wait_for(
        self: &Arc<Self>,
        id: GlobalId,
        timeout: Option<Duration>,
        ready: impl Fn(&ShardState) -> bool,
    ) -> Result<Arc<ShardState>, ReadError> {
        let _waiting = self.wait_guard(id);
        let mut latest = self.machine.subscribe(id);
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            if self.is_closed() {
                return Err(ReadError::Disconnected);
            }
            let current = latest.borrow_and_update().clone();
            let state = match current {
                Some(state) => state,
                None => self
                    .machine
                    .fetch(id)
                    .await
                    .map_err(|e| read_error_of(id, e))?
                    .ok_or(ReadError::CollectionMissing(id))?,
            };
            if state.dropped {
                return Err(ReadError::CollectionDropped(id));
            }
            if ready(&state) {
                return Ok(state);
            }
            let changed = latest.changed();
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        return Ok(state);
                    }
                }
                None => {
                    let _ = changed.await;
                }
            }
        }
    }

    pub(crate) async fn snapshot_stream(
        self: &Arc<Self>,
        id: GlobalId,
        as_of: u64,
    ) -> Result<SnapshotStream, ReadError> {
        let hold = self
            .acquire_hold(id, Antichain::from_elem(as_of))
            .await
            .map_err(|e| ReadError::from_hold(e, as_of))?;
        let timeout = Some(self.config.snapshot_timeout);
        let state = self.wait_for(id, timeout, |s| !s.upper.less_equal(&as_of)).await?;
        if state.upper.less_equal(&as_of) {
            return Err(ReadError::NotYetReadable { id, upper: state.upper.clone(), as_of });
        }
        let (state, guard) = self.begin_read(id, Some(hold)).await?;
        Ok(SnapshotStream::new(id, Arc::clone(&self.machine), &state.batches, as_of, Box::new(guard)))
    }

    /// A range read of `id` at times in `[lower, upper)` from `state`.
    pub(crate) fn range_stream(
        self: &Arc<Self>,
        state: &ShardState,
        lower: u64,
        upper: Antichain<u64>,
        guard: ReadGuard,
    ) -> RangeStream {
        RangeStream::new(state.id, Arc::clone(&self.machine), &state.batches, lower, upper, Box::new(guard))
    }

    /// What a read that failed on damage should report: the drop, if the shard was dropped meanwhile.
    pub(crate) async fn explain(&self, id: GlobalId, error: ReadError) -> ReadError {
        if let ReadError::Corrupt { .. } = &error
            && let Ok(Some(state)) = self.machine.fetch(id).await
            && state.dropped
        {
            return ReadError::CollectionDropped(id);
        }
        error
    }

    async fn append(self: &Arc<Self>, requests: Vec<AppendRequest>) -> Result<(), AppendError> {
        let metrics = &self.machine.metrics;
        let _in_flight = metrics.append_started();
        match self.append_counted(requests).await {
            Ok(committed) => {
                metrics.append(AppendOutcome::Committed, committed.rows, committed.bytes);
                metrics.append_inline(committed.inline_parts, committed.inline_bytes);
                Ok(())
            }
            Err(error) => {
                let outcome = match error {
                    AppendError::UpperMismatch { .. } => AppendOutcome::UpperMismatch,
                    _ => AppendOutcome::Failed,
                };
                metrics.append(outcome, 0, 0);
                Err(error)
            }
        }
    }

    /// [`append`](Self::append), answering what it committed.
    async fn append_counted(
        self: &Arc<Self>,
        requests: Vec<AppendRequest>,
    ) -> Result<Committed, AppendError> {
        if self.is_closed() {
            return Err(AppendError::Disconnected);
        }
        let plans = plan_appends(requests)?;
        if plans.is_empty() {
            return Ok(Committed::default());
        }
        let ids: Vec<GlobalId> = plans.keys().copied().collect();
        let locks: Vec<_> = ids.iter().map(|id| self.with_entry(*id, |e| Arc::clone(&e.appending))).collect();
        let mut _appending = Vec::with_capacity(locks.len());
        for lock in &locks {
            _appending.push(lock.lock().await);
        }
        let mut prepared = BTreeMap::new();
        for (id, plan) in plans {
            let state = self.machine.current(id).await.map_err(|e| append_error_of(id, e))?;
            let state = match state {
                Some(state) if state.upper != plan.lower && !state.dropped => {
                    // The cache may be stale; an upper mismatch is decided on the head.
                    self.machine.fetch(id).await.map_err(|e| append_error_of(id, e))?
                }
                other => other,
            };
            let run = validate(id, state.as_deref(), &plan)?;
            let inline_room = state.as_deref().map_or(0, |s| {
                let carried = usize::try_from(s.inline_bytes()).unwrap_or(usize::MAX);
                self.config.max_inline_bytes.saturating_sub(carried)
            });
            prepared.insert(id, (plan, run, inline_room));
        }
        // Every shard's parts are written at once: each blob put waits for its fsyncs, and an append to
        // several collections would otherwise wait for them one after another.
        let token = IdempotencyToken(random_id());
        let writes = prepared.into_iter().map(|(id, (plan, run, inline_room))| async move {
            let parts = match self.inline_part(id, &run.updates, inline_room) {
                Some(part) => Ok(vec![part]),
                None => self.write_run(id, run.updates).await,
            };
            (id, plan, run.count_bound, parts)
        });
        let mut inputs = BTreeMap::new();
        let mut written = Vec::new();
        let mut failed = None;
        let mut committed = Committed::default();
        for (id, plan, count_bound, parts) in futures::future::join_all(writes).await {
            let parts = match parts {
                Ok(parts) => parts,
                Err(error) => {
                    failed.get_or_insert((id, error));
                    continue;
                }
            };
            written.extend(parts.iter().filter(|p| !p.is_inline()).map(|p| p.key.clone()));
            for part in &parts {
                committed.rows += part.updates;
                committed.bytes += part.bytes;
                if part.is_inline() {
                    committed.inline_parts += 1;
                    committed.inline_bytes += part.bytes;
                }
            }
            let input = AppendInput {
                writer: self.writer.clone(),
                token,
                lower: plan.lower,
                upper: plan.upper,
                parts,
                count_bound,
                now_ms: now_ms(),
                writer_lease_ms: duration_ms(self.config.writer_lease),
            };
            inputs.insert(id, input);
        }
        if let Some((id, error)) = failed {
            self.machine.delete_parts(written).await;
            return Err(append_error_of(id, error));
        }
        let result = self.commit_appends(&ids, &inputs).await;
        match &result {
            Ok(()) => self.after_commit(&ids),
            Err(AppendError::Indeterminate(_)) => {}
            Err(_) => self.machine.delete_parts(written).await,
        }
        result.map(|()| committed)
    }

    /// The run as one inline part if it encodes to at most [`ShardConfig::inline_part_bytes`] and fits
    /// in `room` (what the state may still carry); `None`: write it to the blob store.
    fn inline_part(
        &self,
        id: GlobalId,
        updates: &[crate::shard::part::Update],
        room: usize,
    ) -> Option<PartRef> {
        let limit = self.config.inline_part_bytes.min(room);
        if updates.is_empty() || updates.iter().map(encoded_len).sum::<usize>() > limit {
            return None;
        }
        let bytes = encode_part(updates);
        if bytes.len() > limit {
            return None;
        }
        self.machine.counters.inline_parts.fetch_add(1, Ordering::Relaxed);
        let key = format!("{}/inline-{:032x}", blob_dir(id), random_id());
        Some(inline_part_ref(key, &bytes, updates.len() as u64))
    }

    pub(crate) async fn write_run(
        &self,
        id: GlobalId,
        updates: Vec<crate::shard::part::Update>,
    ) -> Result<Vec<PartRef>, MachineError> {
        let mut parts = Vec::new();
        for chunk in split_run(updates, self.config.part_target_bytes) {
            let bytes = encode_part(&chunk);
            match self.machine.write_part(id, bytes, chunk.len() as u64).await {
                Ok(part) => parts.push(part),
                Err(error) => {
                    self.machine.delete_parts(parts.into_iter().map(|p| p.key).collect()).await;
                    return Err(error);
                }
            }
        }
        Ok(parts)
    }

    async fn commit_appends(
        &self,
        ids: &[GlobalId],
        inputs: &BTreeMap<GlobalId, AppendInput>,
    ) -> Result<(), AppendError> {
        let writer = &self.writer;
        let result = self
            .machine
            .update_many(ids, |states, maybe_applied| {
                let mut nexts = Vec::with_capacity(ids.len());
                for (id, state) in ids.iter().zip(states) {
                    let Ok(state) = live(*state) else {
                        return Ok(Change::Keep(Err(AppendError::CollectionMissing(*id))));
                    };
                    let input = &inputs[id];
                    if maybe_applied {
                        match state.applied(writer, input.token) {
                            Some(true) => return Ok(Change::Keep(Ok(()))),
                            Some(false) => {}
                            // An applied attempt left an entry with its token that only expiry removes:
                            // while the lease cannot have run out (with half of it to spare for another
                            // process's clock), no entry means no attempt was applied (a writer's first
                            // append to a shard, retried through an outage).
                            None if !lease_may_have_run_out(input) => {}
                            None => {
                                let message =
                                    "the writer's entry is gone; the append may have been applied".into();
                                return Ok(Change::Keep(Err(AppendError::Indeterminate(message))));
                            }
                        }
                    }
                    match state.append(input) {
                        Ok(next) => nexts.push(next),
                        Err(Refusal::UpperMismatch { current }) => {
                            return Ok(Change::Keep(Err(AppendError::UpperMismatch {
                                id: *id,
                                expected: input.lower.clone(),
                                current,
                            })));
                        }
                        Err(Refusal::DiffOverflow) => {
                            return Ok(Change::Keep(Err(AppendError::DiffOverflow {
                                id: *id,
                                row: "(stored counts)".into(),
                            })));
                        }
                        Err(refusal) => return Err(MachineError::Refused(refusal)),
                    }
                }
                Ok(Change::Write(nexts, Ok(())))
            })
            .await;
        match result {
            Ok((_, answer)) => answer,
            Err(MachineError::Missing) => {
                let id = *ids.first().expect("an append names a shard");
                Err(AppendError::CollectionMissing(id))
            }
            Err(error) => Err(append_error_of(ids[0], error)),
        }
    }

    fn after_commit(&self, ids: &[GlobalId]) {
        self.note_changed();
        let shards = self.lock();
        for id in ids {
            if let Some(entry) = shards.get(id) {
                entry.poke.notify_one();
            }
        }
    }
}

/// Whether the writer entry an applied attempt of `input` would have made may have expired since: more
/// than half its lease has passed on this process's clock (the other half covers the clock of the process
/// that expires it).
fn lease_may_have_run_out(input: &AppendInput) -> bool {
    now_ms().saturating_sub(input.now_ms) >= input.writer_lease_ms / 2
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn append_error_of(id: GlobalId, error: MachineError) -> AppendError {
    match error {
        MachineError::Missing | MachineError::Refused(Refusal::Dropped) => AppendError::CollectionMissing(id),
        MachineError::Refused(refusal) => AppendError::Io(format!("unexpected refusal {refusal:?}")),
        MachineError::Unavailable { message, indeterminate: true } => AppendError::Indeterminate(message),
        MachineError::Unavailable { message, indeterminate: false } => AppendError::Io(message),
        MachineError::Corrupt(what) => AppendError::Corrupt { id, what },
    }
}

/// What a committed append wrote (for the metrics): updates and part bytes, and of those the parts
/// carried inline in the states.
#[derive(Debug, Default)]
struct Committed {
    rows: u64,
    bytes: u64,
    inline_parts: u64,
    inline_bytes: u64,
}

/// One shard's part of an append, its requests chained.
struct Plan {
    lower: Antichain<u64>,
    upper: Antichain<u64>,
    updates: Vec<(Row, u64, Diff)>,
}

/// Chains the requests of each collection (the second's expected upper must be the first's new upper) and
/// checks each request's own bounds, in request order.
fn plan_appends(requests: Vec<AppendRequest>) -> Result<BTreeMap<GlobalId, Plan>, AppendError> {
    let mut plans: BTreeMap<GlobalId, Plan> = BTreeMap::new();
    for request in requests {
        let id = request.id;
        let (expected, new) = (&request.expected_upper, &request.new_upper);
        if !PartialOrder::less_equal(expected, new) || expected == new || expected.is_empty() {
            return Err(AppendError::UpperNotBeyond { id, expected: expected.clone(), new: new.clone() });
        }
        for (_, time, _) in &request.updates {
            if !expected.less_equal(time) || new.less_equal(time) {
                return Err(AppendError::TimeOutOfRange {
                    id,
                    time: *time,
                    lower: expected.clone(),
                    upper: new.clone(),
                });
            }
        }
        match plans.get_mut(&id) {
            Some(plan) if plan.upper != *expected => {
                return Err(AppendError::UpperMismatch {
                    id,
                    expected: expected.clone(),
                    current: plan.upper.clone(),
                });
            }
            Some(plan) => {
                plan.upper = request.new_upper;
                plan.updates.extend(request.updates);
            }
            None => {
                plans.insert(
                    id,
                    Plan {
                        lower: request.expected_upper,
                        upper: request.new_upper,
                        updates: request.updates,
                    },
                );
            }
        }
    }
    Ok(plans)
}

/// Checks a shard's plan against its state (existence, upper, rows, counts) and consolidates it.
fn validate(id: GlobalId, state: Option<&ShardState>, plan: &Plan) -> Result<Run, AppendError> {
    let state = match state {
        Some(state) if !state.dropped => state,
        _ => return Err(AppendError::CollectionMissing(id)),
    };
    if state.upper != plan.lower {
        return Err(AppendError::UpperMismatch {
            id,
            expected: plan.lower.clone(),
            current: state.upper.clone(),
        });
    }
    for (row, _, _) in &plan.updates {
        if let Err(error) = state.desc.check_row(row) {
            return Err(AppendError::RowType { id, row: row.to_string(), error });
        }
    }
    let run = consolidate_run(plan.updates.clone())
        .map_err(|overflow| AppendError::DiffOverflow { id, row: overflow.row })?;
    if state.count_bound() + u128::from(run.count_bound) > i64::MAX as u128 {
        let row = run
            .updates
            .iter()
            .max_by_key(|u| u.2.unsigned_abs())
            .map(|u| u.0.to_string())
            .unwrap_or_default();
        return Err(AppendError::DiffOverflow { id, row });
    }
    Ok(run)
}

/// Moves this process's hold readers to the meet of its local holds whenever they change, each shard's at
/// most once per [`ShardConfig::hold_sync_interval`] (a failed move is retried after the poll interval).
async fn sync_holds_task(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let changed = Arc::clone(&inner.holds_changed);
        let notified = changed.notified();
        let (due, _) = holds_due(&inner, tokio::time::Instant::now());
        for id in due {
            inner.sync_holds(id).await;
        }
        let (due, next) = holds_due(&inner, tokio::time::Instant::now());
        drop(inner);
        if due.is_empty() {
            match next {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at, notified).await;
                }
                None => notified.await,
            }
        }
    }
}

/// The shards whose hold reader is due to move at `now`, and when the next one not yet due will be.
fn holds_due(inner: &Inner, now: tokio::time::Instant) -> (Vec<GlobalId>, Option<tokio::time::Instant>) {
    let mut due = Vec::new();
    let mut next: Option<tokio::time::Instant> = None;
    for (id, entry) in inner.lock().iter().filter(|(_, e)| e.holds_dirty) {
        match entry.hold_sync_after.filter(|after| *after > now) {
            Some(after) => next = Some(next.map_or(after, |n| n.min(after))),
            None => due.push(*id),
        }
    }
    (due, next)
}

/// Heartbeats this process's leased readers every quarter of their lease.
async fn heartbeat_task(weak: Weak<Inner>) {
    loop {
        let Some(interval) = weak.upgrade().map(|inner| inner.config.reader_lease / 4) else { return };
        tokio::time::sleep(interval).await;
        let Some(inner) = weak.upgrade() else { return };
        for id in inner.known_ids() {
            inner.heartbeat(id).await;
        }
    }
}

/// Polls the head of `id` while someone waits on it, woken early by pokes (pushed changes, commits).
async fn poll_shard(weak: Weak<Inner>, id: GlobalId) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let (waiting, poke) = {
            let mut shards = inner.lock();
            let entry = shards.entry(id).or_default();
            if entry.waiters == 0 {
                entry.poller_running = false;
                return;
            }
            (entry.waiters, Arc::clone(&entry.poke))
        };
        debug_assert!(waiting > 0);
        let poked = poke.notified();
        if let Err(error) = inner.machine.fetch(id).await {
            tracing::debug!(%id, ?error, "poll of the shard's head failed");
        }
        let interval = inner.config.poll_interval;
        drop(inner);
        let _ = tokio::time::timeout(interval, poked).await;
    }
}

/// Forwards the consensus push channel: pokes the pollers of changed shards and wakes frontier watches.
async fn forward_changes(weak: Weak<Inner>, mut changes: tokio::sync::broadcast::Receiver<String>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let received = changes.recv().await;
        let Some(inner) = weak.upgrade() else { return };
        match received {
            Ok(key) => {
                if let Some(id) = id_of_key(&key)
                    && let Some(entry) = inner.lock().get(&id)
                {
                    entry.poke.notify_one();
                }
            }
            Err(RecvError::Lagged(_)) => {
                for entry in inner.lock().values() {
                    entry.poke.notify_one();
                }
            }
            Err(RecvError::Closed) => return,
        }
        inner.note_changed();
    }
}

impl StorageCollections for ShardCollections {
    fn create_collection(&self, id: GlobalId, desc: RelationDesc) -> BoxFuture<'_, Result<(), CreateError>> {
        Box::pin(async move {
            if self.inner.is_closed() {
                return Err(CreateError::Disconnected);
            }
            let policy = self.inner.config.default_read_policy.clone();
            let result = self
                .inner
                .machine
                .update(id, |state, _| match state {
                    None => {
                        Ok(Change::Write(vec![ShardState::create(id, desc.clone(), policy.clone())], Ok(())))
                    }
                    Some(state) if state.dropped => Ok(Change::Keep(Err(CreateError::AlreadyDropped(id)))),
                    Some(state) if state.desc != desc => {
                        Ok(Change::Keep(Err(CreateError::SchemaMismatch { id })))
                    }
                    Some(_) => Ok(Change::Keep(Ok(()))),
                })
                .await;
            self.inner.with_entry(id, |_| ());
            self.inner.note_changed();
            match result {
                Ok((_, answer)) => answer,
                Err(MachineError::Unavailable { indeterminate: true, .. }) => Err(CreateError::Disconnected),
                Err(MachineError::Unavailable { message, .. }) => Err(CreateError::Io(message)),
                Err(MachineError::Corrupt(what)) => Err(CreateError::Io(what)),
                Err(other) => Err(CreateError::Io(format!("{other:?}"))),
            }
        })
    }

    fn drop_collection(&self, id: GlobalId) -> BoxFuture<'_, Result<(), DropError>> {
        Box::pin(async move {
            if self.inner.is_closed() {
                return Err(DropError::Disconnected);
            }
            let result = self
                .inner
                .machine
                .update(id, |state, maybe_applied| match state {
                    None => Ok(Change::Keep(Err(DropError::CollectionMissing(id)))),
                    // A drop that may have been applied by an earlier attempt, and is.
                    Some(state) if state.dropped && maybe_applied => Ok(Change::Keep(Ok(()))),
                    Some(state) if state.dropped => Ok(Change::Keep(Err(DropError::CollectionMissing(id)))),
                    Some(state) => Ok(Change::Write(vec![state.drop_shard()?], Ok(()))),
                })
                .await;
            self.inner.note_changed();
            if let Some(entry) = self.inner.lock().get(&id) {
                entry.poke.notify_one();
            }
            match result {
                Ok((_, answer)) => answer,
                Err(MachineError::Unavailable { indeterminate: true, .. }) => Err(DropError::Disconnected),
                Err(MachineError::Unavailable { message, .. }) => Err(DropError::Io(message)),
                Err(MachineError::Corrupt(what)) => Err(DropError::Io(what)),
                Err(other) => Err(DropError::Io(format!("{other:?}"))),
            }
        })
    }

    fn list_collections(&self) -> BoxFuture<'_, Result<Vec<(GlobalId, RelationDesc)>, ReadError>> {
        Box::pin(async move {
            if self.inner.is_closed() {
                return Err(ReadError::Disconnected);
            }
            let keys = list_keys(&self.inner).await?;
            let mut collections = Vec::new();
            for id in keys.into_keys() {
                let state = self.inner.machine.fetch(id).await.map_err(|e| read_error_of(id, e))?;
                if let Some(state) = state.filter(|s| !s.dropped) {
                    collections.push((id, state.desc.clone()));
                }
            }
            Ok(collections)
        })
    }

    fn frontiers(&self, id: GlobalId) -> BoxFuture<'_, Result<CollectionFrontiers, ReadError>> {
        Box::pin(async move {
            if self.inner.is_closed() {
                return Err(ReadError::Disconnected);
            }
            let state = self.inner.machine.fetch(id).await.map_err(|e| read_error_of(id, e))?;
            match state {
                Some(state) if !state.dropped => {
                    Ok(CollectionFrontiers { since: state.since.clone(), upper: state.upper.clone() })
                }
                _ => Err(ReadError::CollectionMissing(id)),
            }
        })
    }

    fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'_, Result<(), AppendError>> {
        Box::pin(self.inner.append(requests))
    }

    fn acquire_read_hold(
        &self,
        id: GlobalId,
        frontier: Antichain<u64>,
    ) -> BoxFuture<'_, Result<StorageReadHold, HoldError>> {
        Box::pin(self.inner.acquire_hold(id, frontier))
    }

    fn set_read_policy(&self, id: GlobalId, policy: ReadPolicy<u64>) -> BoxFuture<'_, Result<(), HoldError>> {
        Box::pin(async move {
            if self.inner.is_closed() {
                return Err(HoldError::Disconnected);
            }
            let result = self
                .inner
                .machine
                .update(id, |state, _| Ok(Change::Write(vec![live(state)?.set_policy(policy.clone())?], ())))
                .await;
            self.inner.note_changed();
            result.map(|_| ()).map_err(|e| hold_error_of(id, &Antichain::new(), e))
        })
    }

    fn snapshot(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Vec<(Row, Diff)>, ReadError>> {
        Box::pin(async move {
            // Read the one way `snapshot_stream` reads, in chunks of moderate size (their buffers are
            // used again, where one giant chunk would be fresh memory), into room for every row.
            let mut stream = self.inner.snapshot_stream(id, as_of).await?;
            let mut rows = Vec::with_capacity(stream.rows_bound());
            loop {
                match stream.next_chunk(crate::SNAPSHOT_CHUNK_BYTES).await {
                    Ok(Some(chunk)) => rows.extend(chunk),
                    Ok(None) => return Ok(rows),
                    Err(error) => return Err(self.inner.explain(id, error).await),
                }
            }
        })
    }

    fn snapshot_stream(
        &self,
        id: GlobalId,
        as_of: u64,
        chunk_bytes: usize,
    ) -> BoxFuture<'_, Result<SnapshotChunks, ReadError>> {
        Box::pin(async move {
            let stream = self.inner.snapshot_stream(id, as_of).await?;
            let inner = Arc::clone(&self.inner);
            let chunks = futures::stream::unfold(Some(stream), move |stream| {
                let inner = Arc::clone(&inner);
                async move {
                    let mut stream = stream?;
                    match stream.next_rows(chunk_bytes).await {
                        Ok(Some(chunk)) => Some((Ok(chunk), Some(stream))),
                        Ok(None) => None,
                        Err(error) => Some((Err(inner.explain(id, error).await), None)),
                    }
                }
            });
            Ok(SnapshotChunks::from_row_chunks(chunks, chunk_bytes))
        })
    }

    fn listen(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Listen, ReadError>> {
        Box::pin(
            async move { ShardListen::start(Arc::clone(&self.inner), id, as_of).await.map(Listen::shard) },
        )
    }

    fn watch_frontiers(&self) -> BoxFuture<'_, Result<FrontierWatch, ReadError>> {
        Box::pin(async move {
            if self.inner.is_closed() {
                return Err(ReadError::Disconnected);
            }
            Ok(FrontierWatch::shard(ShardWatch::new(Arc::clone(&self.inner))))
        })
    }
}

/// Every shard's id with its head seqno.
pub(crate) async fn list_keys(inner: &Inner) -> Result<BTreeMap<GlobalId, SeqNo>, ReadError> {
    let mut retry = crate::external::Retry::new(
        Duration::from_millis(10),
        Duration::from_millis(500),
        inner.config.retry_budget,
    );
    loop {
        match inner.machine.consensus.list_keys().await {
            Ok(keys) => {
                return Ok(keys
                    .into_iter()
                    .filter_map(|(key, seqno)| Some((id_of_key(&key)?, seqno)))
                    .collect());
            }
            Err(error) => {
                if !retry.wait().await {
                    return Err(ReadError::Unavailable(error.message().to_owned()));
                }
            }
        }
    }
}
