//! The committer: the one thread that changes what is logged (creates, drops, appends, read policies, since
//! changes), pipelined with a *syncer* thread that writes and fsyncs the log.
//!
//! **Pipeline.** The committer takes the operations queued since it last looked as one batch, validates
//! them against the core *plus the uppers that batches still in flight will leave behind*, encodes their
//! records and hands the bytes to the syncer. While the syncer writes and fsyncs, the committer already
//! validates the next batch. The syncer coalesces every batch waiting for it into one write and one fsync
//! (group commit). When a batch is durable the committer applies it to the core and answers its callers,
//! strictly in batch order; error answers also wait for their batch, so no caller learns of an upper that a
//! failed commit could take back. In memory (no data directory) a batch resolves at once.
//!
//! **Failures.** If a commit fails, the syncer rolls the log back (see [`DataDir::commit`]) and fails every
//! later batch of the same *epoch* without writing it (they were validated assuming the failed one); the
//! committer starts a new epoch, so batches validated after it learned of the failure are written normally.
//!
//! **Barriers.** Creates, drops, policy changes, checkpoints and shutdown wait until nothing is in flight
//! and hold back everything queued after them until they resolve: they change what later validation
//! depends on, and a checkpoint must see exactly what the log holds.
//!
//! **What this is not.** No async: callers wait on oneshot channels ([`crate::InProcess`]).
//!
//! **Tests.** Through `InProcess`: `tests/it/errors.rs` (injected faults), `tests/it/durability.rs`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use frontiers::{Antichain, ReadPolicy};
use protocol::{GlobalId, RelationDesc};
use tokio::sync::{oneshot, watch};

use crate::api::AppendRequest;
use crate::core::StoreCheckpoint;
use crate::durable::wal::{self, LogRecordRef};
use crate::durable::{DataDir, DurabilityStats};
use crate::error::{AppendError, CreateError, DropError, HoldError};
use crate::inprocess::{CheckpointError, Shared};

/// A request to the committer.
pub(crate) enum Op {
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
    /// `reply` is `None` for a checkpoint the committer starts on its own.
    Checkpoint {
        reply: Option<oneshot::Sender<Result<(), CheckpointError>>>,
    },
    /// Hold changes are waiting to be processed.
    Wake,
    Shutdown {
        reply: Option<oneshot::Sender<()>>,
    },
    /// From the syncer: batch `batch` is durable (or failed).
    Synced {
        batch: u64,
        result: Result<(), String>,
        log_bytes_since_checkpoint: u64,
    },
}

impl Op {
    fn is_barrier(&self) -> bool {
        !matches!(self, Op::Append { .. } | Op::Wake | Op::Synced { .. })
    }
}

/// An operation validated in a batch, waiting for its records to be durable.
enum Staged {
    Create { id: GlobalId, desc: RelationDesc, reply: oneshot::Sender<Result<(), CreateError>> },
    Drop { id: GlobalId, reply: oneshot::Sender<Result<(), DropError>> },
    Append { requests: Vec<AppendRequest>, reply: oneshot::Sender<Result<(), AppendError>> },
    Policy { id: GlobalId, policy: ReadPolicy<u64>, reply: oneshot::Sender<Result<(), HoldError>> },
}

/// An answer sent when its batch resolves.
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

    fn record(&self) -> LogRecordRef<'_> {
        match self {
            Staged::Create { id, desc, .. } => LogRecordRef::Create { id: *id, desc },
            Staged::Drop { id, .. } => LogRecordRef::Drop { id: *id },
            Staged::Append { requests, .. } => LogRecordRef::Append(requests),
            Staged::Policy { id, policy, .. } => LogRecordRef::Policy { id: *id, policy },
        }
    }
}

/// A batch handed to the syncer, not yet resolved.
struct InFlight {
    epoch: u64,
    staged: Vec<Staged>,
    /// Answers already decided (validation errors), sent when the batch resolves.
    answers: Vec<Answer>,
    /// The uppers this batch leaves behind.
    uppers: BTreeMap<GlobalId, Antichain<u64>>,
    barrier: bool,
    /// An earlier batch of the same epoch failed: this one fails too.
    doomed: bool,
}

/// Work for the syncer thread.
enum SyncJob {
    Batch {
        batch: u64,
        epoch: u64,
        bytes: Vec<u8>,
    },
    /// Since records: written now, durable with the next commit.
    Unsynced {
        bytes: Vec<u8>,
    },
    Checkpoint {
        state: StoreCheckpoint,
        reply: Option<oneshot::Sender<Result<(), CheckpointError>>>,
    },
    Close {
        done: mpsc::Sender<()>,
    },
}

/// Starts the committer (and, for a durable store, the syncer).
pub(crate) fn spawn(
    shared: Arc<Shared>,
    data_dir: Option<DataDir>,
    rx: mpsc::Receiver<Op>,
    ops: mpsc::Sender<Op>,
    wake: Arc<AtomicBool>,
    stats: Arc<Mutex<Option<DurabilityStats>>>,
) {
    let outstanding = Arc::new(AtomicUsize::new(0));
    let data_dir = data_dir.map(|data_dir| Arc::new(Mutex::new(data_dir)));
    let stats_for_committer = Arc::clone(&stats);
    let syncer = data_dir.clone().map(|data_dir| {
        let (jobs, job_rx) = mpsc::channel();
        let syncer = Syncer {
            outstanding: Arc::clone(&outstanding),
            data_dir,
            jobs: job_rx,
            results: ops,
            stats,
            checkpoint_thread: None,
            poisoned_epoch: None,
        };
        std::thread::Builder::new()
            .name("storage-syncer".into())
            .spawn(move || syncer.run())
            .expect("cannot spawn the storage syncer thread");
        jobs
    });
    let committer = Committer {
        data_dir,
        outstanding,
        stats: stats_for_committer,
        checkpoint_after: shared.config.checkpoint_after_log_bytes,
        shared,
        syncer,
        rx,
        wake,
        queue: VecDeque::new(),
        in_flight: BTreeMap::new(),
        next_batch: 0,
        epoch: 0,
        deferred_sinces: BTreeMap::new(),
        log_bytes_since_checkpoint: 0,
        checkpoint_queued: false,
        shutdown: None,
    };
    std::thread::Builder::new()
        .name("storage-committer".into())
        .spawn(move || committer.run())
        .expect("cannot spawn the storage committer thread");
}

struct Committer {
    shared: Arc<Shared>,
    syncer: Option<mpsc::Sender<SyncJob>>,
    /// The log, shared with the syncer: the committer commits a lone operation itself when the syncer
    /// has nothing to do (one thread hop less for a single writer).
    data_dir: Option<Arc<Mutex<DataDir>>>,
    /// Jobs sent to the syncer and not yet finished.
    outstanding: Arc<AtomicUsize>,
    stats: Arc<Mutex<Option<DurabilityStats>>>,
    rx: mpsc::Receiver<Op>,
    wake: Arc<AtomicBool>,
    /// Client operations not yet started, in arrival order.
    queue: VecDeque<Op>,
    in_flight: BTreeMap<u64, InFlight>,
    next_batch: u64,
    epoch: u64,
    /// Since changes applied in memory but not yet logged.
    deferred_sinces: BTreeMap<GlobalId, Antichain<u64>>,
    log_bytes_since_checkpoint: u64,
    checkpoint_after: u64,
    checkpoint_queued: bool,
    /// Set once a shutdown was processed: `Some(reply)`.
    shutdown: Option<Option<oneshot::Sender<()>>>,
}

impl Committer {
    fn run(mut self) {
        loop {
            let Ok(first) = self.rx.recv() else {
                break;
            };
            self.accept(first);
            while let Ok(op) = self.rx.try_recv() {
                self.accept(op);
                if self.queue.len() >= self.shared.config.max_group_ops {
                    break;
                }
            }
            self.pump();
            if self.shutdown.is_some() {
                break;
            }
        }
        self.finish();
    }

    fn accept(&mut self, op: Op) {
        match op {
            Op::Synced { batch, result, log_bytes_since_checkpoint } => {
                self.log_bytes_since_checkpoint = log_bytes_since_checkpoint;
                self.resolve(batch, result);
                self.checkpoint_if_due();
            }
            op => self.queue.push_back(op),
        }
    }

    fn barrier_in_flight(&self) -> bool {
        self.in_flight.values().any(|f| f.barrier)
    }

    /// Starts whatever the queue allows.
    fn pump(&mut self) {
        loop {
            if self.barrier_in_flight() {
                return;
            }
            let Some(front) = self.queue.front() else {
                break;
            };
            if front.is_barrier() {
                if !self.in_flight.is_empty() {
                    return;
                }
                let op = self.queue.pop_front().expect("front exists");
                match op {
                    Op::Checkpoint { reply } => self.checkpoint(reply),
                    Op::Shutdown { reply } => {
                        self.shutdown = Some(reply);
                        return;
                    }
                    op => self.start_batch(vec![op], true),
                }
            } else {
                let mut ops = Vec::new();
                while self.queue.front().is_some_and(|op| !op.is_barrier()) {
                    ops.push(self.queue.pop_front().expect("front exists"));
                }
                self.start_batch(ops, false);
            }
        }
        if self.in_flight.is_empty() && self.queue.is_empty() {
            self.idle();
        }
    }

    /// Queues an automatic checkpoint once the log has grown past the threshold since the last one. This
    /// happens as soon as a commit reports the size, not only when the store is idle: a store under a
    /// steady stream of appends is never idle, and its log (and the replay after a restart) would grow
    /// without bound. The checkpoint is a barrier, so it waits for the batches in flight; its write runs on
    /// its own thread.
    fn checkpoint_if_due(&mut self) {
        if self.syncer.is_some()
            && !self.checkpoint_queued
            && self.log_bytes_since_checkpoint >= self.checkpoint_after
        {
            self.checkpoint_queued = true;
            self.queue.push_back(Op::Checkpoint { reply: None });
        }
    }

    /// Nothing to do: log since changes without waiting for an fsync.
    fn idle(&mut self) {
        if !self.deferred_sinces.is_empty() {
            match self.syncer.as_ref() {
                Some(syncer) => {
                    let bytes = Self::encode_sinces(&mut self.deferred_sinces);
                    self.outstanding.fetch_add(1, Ordering::SeqCst);
                    let _ = syncer.send(SyncJob::Unsynced { bytes });
                }
                None => self.deferred_sinces.clear(),
            }
        }
    }

    fn encode_sinces(deferred: &mut BTreeMap<GlobalId, Antichain<u64>>) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (id, since) in std::mem::take(deferred) {
            wal::encode_record(&LogRecordRef::Since { id, since: &since }, &mut bytes)
                .unwrap_or_else(|e| panic!("a since record always encodes: {e}"));
        }
        bytes
    }

    /// The uppers that the batches in flight leave behind (failed epochs excluded).
    fn pending_uppers(&self) -> BTreeMap<GlobalId, Antichain<u64>> {
        let mut uppers = BTreeMap::new();
        for flight in self.in_flight.values().filter(|f| !f.doomed) {
            uppers.extend(flight.uppers.iter().map(|(id, upper)| (*id, upper.clone())));
        }
        uppers
    }

    /// Validates `ops`, encodes their records and hands them to the syncer (or resolves them at once in
    /// memory). A barrier batch holds exactly one operation.
    fn start_batch(&mut self, ops: Vec<Op>, barrier: bool) {
        let lone = ops.len() == 1;
        let mut staged = Vec::new();
        let mut answers = Vec::new();
        let pending = self.pending_uppers();
        let mut uppers = pending.clone();
        {
            let mut state = self.shared.lock();
            self.wake.store(false, Ordering::SeqCst);
            for (id, since) in state.process_holds() {
                self.deferred_sinces.insert(id, since);
            }
            for op in ops {
                match op {
                    Op::Wake => {}
                    Op::Create { id, desc, reply } => match state.store.check_create(id, &desc) {
                        Ok(true) => staged.push(Staged::Create { id, desc, reply }),
                        Ok(false) => answers.push(Answer::Create(reply, Ok(()))),
                        Err(error) => answers.push(Answer::Create(reply, Err(error))),
                    },
                    Op::Drop { id, reply } => {
                        if state.store.contains(id) {
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
                    Op::Checkpoint { .. } | Op::Shutdown { .. } | Op::Synced { .. } => {
                        unreachable!("checkpoints, shutdowns and sync results never enter a batch")
                    }
                }
            }
        }
        // Only what this batch changed.
        uppers.retain(|id, upper| pending.get(id) != Some(upper));
        let batch = self.next_batch;
        self.next_batch += 1;
        let flight = InFlight { epoch: self.epoch, staged, answers, uppers, barrier, doomed: false };
        match self.syncer.as_ref() {
            None => {
                self.in_flight.insert(batch, flight);
                self.deferred_sinces.clear();
                self.resolve(batch, Ok(()));
            }
            Some(syncer) => {
                let mut bytes = if flight.staged.is_empty() {
                    Vec::new()
                } else {
                    Self::encode_sinces(&mut self.deferred_sinces)
                };
                let mut encoded = Ok(());
                for op in &flight.staged {
                    if let Err(error) = wal::encode_record(&op.record(), &mut bytes) {
                        encoded = Err(error.to_string());
                        break;
                    }
                }
                let epoch = flight.epoch;
                self.in_flight.insert(batch, flight);
                let inline =
                    lone && self.in_flight.len() == 1 && self.outstanding.load(Ordering::SeqCst) == 0;
                match encoded {
                    Ok(()) if inline => {
                        // The syncer is idle and this is a lone operation: commit it here and now.
                        let data_dir = self.data_dir.as_ref().expect("a syncer implies a data directory");
                        let mut data_dir = data_dir.lock().expect("data dir lock");
                        let result = data_dir.commit(&bytes).map_err(|e| e.to_string());
                        *self.stats.lock().expect("stats lock") = Some(data_dir.stats());
                        self.log_bytes_since_checkpoint = data_dir.log_bytes_since_checkpoint();
                        drop(data_dir);
                        self.resolve(batch, result);
                    }
                    Ok(()) => {
                        self.outstanding.fetch_add(1, Ordering::SeqCst);
                        if syncer.send(SyncJob::Batch { batch, epoch, bytes }).is_err() {
                            self.resolve(batch, Err("the log writer is gone".into()));
                        }
                    }
                    // Too large to log: fail the batch (it was not written).
                    Err(error) => self.resolve(batch, Err(error)),
                }
            }
        }
    }

    /// Batch `batch` is durable (or failed): apply it and answer, in order.
    fn resolve(&mut self, batch: u64, result: Result<(), String>) {
        let Some((first, _)) = self.in_flight.first_key_value() else {
            panic!("batch {batch} resolved with nothing in flight");
        };
        assert_eq!(*first, batch, "batches resolve in order");
        let flight = self.in_flight.remove(&batch).expect("checked above");
        let result = if flight.doomed {
            Err(format!("an earlier commit failed: {}", result.err().unwrap_or_default()))
        } else {
            result
        };
        let mut answers = flight.answers;
        let mut state = self.shared.lock();
        match result {
            Ok(()) => {
                for op in flight.staged {
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
                if flight.epoch == self.epoch {
                    // Later batches of this epoch were validated assuming this one: the syncer fails them.
                    self.epoch += 1;
                    for later in self.in_flight.values_mut() {
                        later.doomed = true;
                    }
                }
                for op in flight.staged {
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
    }

    fn checkpoint(&mut self, reply: Option<oneshot::Sender<Result<(), CheckpointError>>>) {
        let automatic = reply.is_none();
        if automatic {
            self.checkpoint_queued = false;
        }
        let Some(syncer) = self.syncer.as_ref() else {
            if let Some(reply) = reply {
                let _ = reply.send(Err(CheckpointError::InMemory));
            }
            return;
        };
        let state = {
            let mut state = self.shared.lock();
            for (id, since) in state.process_holds() {
                self.deferred_sinces.insert(id, since);
            }
            state.store.to_checkpoint()
        };
        // The checkpoint records the sinces itself.
        self.deferred_sinces.clear();
        self.log_bytes_since_checkpoint = 0;
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        let _ = syncer.send(SyncJob::Checkpoint { state, reply });
    }

    fn finish(&mut self) {
        // Whatever is still in flight resolves first (its callers are waiting).
        while !self.in_flight.is_empty() {
            match self.rx.recv() {
                Ok(Op::Synced { batch, result, .. }) => self.resolve(batch, result),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if let Some(syncer) = self.syncer.take() {
            if !self.deferred_sinces.is_empty() {
                let bytes = Self::encode_sinces(&mut self.deferred_sinces);
                self.outstanding.fetch_add(1, Ordering::SeqCst);
                let _ = syncer.send(SyncJob::Unsynced { bytes });
            }
            let (done, wait) = mpsc::channel();
            if syncer.send(SyncJob::Close { done }).is_ok() {
                let _ = wait.recv();
            }
        }
        let mut state = self.shared.lock();
        state.shut_down = true;
        state.signals.clear();
        for watcher in state.watchers.values_mut() {
            watcher.signal.send_replace(());
        }
        drop(state);
        // Operations still queued are dropped with their reply senders: their callers see `Disconnected`.
        self.queue.clear();
        tracing::info!("storage shut down");
        if let Some(Some(reply)) = self.shutdown.take() {
            let _ = reply.send(());
        }
    }
}

/// The syncer thread: owns the data directory. See the module documentation.
struct Syncer {
    data_dir: Arc<Mutex<DataDir>>,
    outstanding: Arc<AtomicUsize>,
    jobs: mpsc::Receiver<SyncJob>,
    results: mpsc::Sender<Op>,
    stats: Arc<Mutex<Option<DurabilityStats>>>,
    checkpoint_thread: Option<std::thread::JoinHandle<()>>,
    /// Batches of this epoch or earlier fail without being written.
    poisoned_epoch: Option<u64>,
}

impl Syncer {
    fn run(mut self) {
        let mut next = None;
        loop {
            let job = match next.take() {
                Some(job) => job,
                None => match self.jobs.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            match job {
                SyncJob::Batch { batch, epoch, bytes } => {
                    // Group commit: every batch already waiting goes into the same write and fsync.
                    let mut batches = vec![(batch, epoch, bytes)];
                    loop {
                        match self.jobs.try_recv() {
                            Ok(SyncJob::Batch { batch, epoch, bytes }) => batches.push((batch, epoch, bytes)),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.commit(batches);
                }
                SyncJob::Unsynced { bytes } => {
                    if let Err(error) = self.data_dir.lock().expect("data dir lock").write_unsynced(&bytes) {
                        tracing::warn!(%error, "cannot log since changes; they are recorded by the next checkpoint");
                    }
                    self.outstanding.fetch_sub(1, Ordering::SeqCst);
                }
                SyncJob::Checkpoint { state, reply } => {
                    self.checkpoint(state, reply);
                    self.outstanding.fetch_sub(1, Ordering::SeqCst);
                }
                SyncJob::Close { done } => {
                    if let Some(thread) = self.checkpoint_thread.take() {
                        let _ = thread.join();
                    }
                    let data_dir = self.data_dir.lock().expect("data dir lock");
                    if let Err(error) = data_dir.sync() {
                        tracing::warn!(%error, "cannot fsync the log at shutdown");
                    }
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    /// Commits the batches whose epoch did not fail, in one write and fsync, and reports every batch.
    fn commit(&mut self, batches: Vec<(u64, u64, Vec<u8>)>) {
        let poisoned = self.poisoned_epoch;
        let is_live = |epoch: u64| poisoned.is_none_or(|p| epoch > p);
        let mut bytes = Vec::new();
        let mut max_live_epoch = None;
        for (_, epoch, batch_bytes) in &batches {
            if is_live(*epoch) {
                bytes.extend_from_slice(batch_bytes);
                max_live_epoch = Some(max_live_epoch.map_or(*epoch, |m: u64| m.max(*epoch)));
            }
        }
        let mut data_dir = self.data_dir.lock().expect("data dir lock");
        let result = data_dir.commit(&bytes).map_err(|e| e.to_string());
        if result.is_err() {
            let failed = max_live_epoch.expect("an empty commit cannot fail unless the log is poisoned");
            self.poisoned_epoch = Some(poisoned.map_or(failed, |p| p.max(failed)));
        }
        *self.stats.lock().expect("stats lock") = Some(data_dir.stats());
        let log_bytes_since_checkpoint = data_dir.log_bytes_since_checkpoint();
        drop(data_dir);
        let count = batches.len();
        for (batch, epoch, _) in batches {
            let result =
                if is_live(epoch) { result.clone() } else { Err("an earlier commit failed".to_string()) };
            let _ = self.results.send(Op::Synced { batch, result, log_bytes_since_checkpoint });
        }
        self.outstanding.fetch_sub(count, Ordering::SeqCst);
    }

    fn checkpoint(
        &mut self,
        state: StoreCheckpoint,
        reply: Option<oneshot::Sender<Result<(), CheckpointError>>>,
    ) {
        if let Some(thread) = self.checkpoint_thread.take() {
            let _ = thread.join();
        }
        let mut data_dir = self.data_dir.lock().expect("data dir lock");
        let job = match data_dir.begin_checkpoint() {
            Ok(job) => job,
            Err(error) => {
                tracing::warn!(%error, "cannot start a checkpoint; the log keeps everything meanwhile");
                if let Some(reply) = reply {
                    let _ = reply.send(Err(CheckpointError::Io(error.to_string())));
                }
                return;
            }
        };
        *self.stats.lock().expect("stats lock") = Some(data_dir.stats());
        drop(data_dir);
        match reply {
            Some(reply) => {
                let result = job.write(&state).map_err(|e| CheckpointError::Io(e.to_string()));
                let _ = reply.send(result);
            }
            None => {
                let spawned =
                    std::thread::Builder::new().name("storage-checkpoint".into()).spawn(move || {
                        if let Err(error) = job.write(&state) {
                            tracing::warn!(%error, "checkpoint failed; the log keeps everything meanwhile");
                        }
                    });
                match spawned {
                    Ok(thread) => self.checkpoint_thread = Some(thread),
                    Err(error) => tracing::warn!(%error, "cannot spawn a checkpoint thread"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_appends_and_wakes_share_a_batch() {
        let (tx, _rx) = oneshot::channel();
        let cases = vec![
            (Op::Wake, false),
            (Op::Append { requests: vec![], reply: tx }, false),
            (Op::Synced { batch: 0, result: Ok(()), log_bytes_since_checkpoint: 0 }, false),
            (Op::Checkpoint { reply: None }, true),
            (Op::Shutdown { reply: None }, true),
        ];
        for (op, barrier) in cases {
            assert_eq!(op.is_barrier(), barrier);
        }
    }
}
