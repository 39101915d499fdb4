//! [`ShardListen`] (a shard's change stream) and [`ShardWatch`] (every shard's frontier changes).
//!
//! **Listen.** Holds the collection at `as_of`, waits (on the shard's poller, see
//! [`super::ShardCollections`]) until the upper passes it, streams the snapshot at `as_of` part by part
//! ([`super::read::SnapshotStream`]), then the updates up to the upper it saw, then `Progress`; after that,
//! for every newer upper, the updates in `[delivered, upper)` and `Progress(upper)`. Its hold follows what
//! it delivered, so the history it still needs is never compacted away. Events are produced one at a time
//! as the consumer asks: the buffer holds at most one read chunk (about `listen_chunk_bytes` of rows), so
//! a slow listener costs nothing while it is slow, and a huge collection never needs one giant message.
//!
//! **Watch.** Lists every shard's head seqno (one consensus query), reads the heads that changed and
//! reports the frontiers that differ from what it reported (`None` once dropped); polls on the poll
//! interval, woken early by this process's commits and the consensus push channel.
//!
//! **Invariants.** As [`crate::Listen`]'s: the snapshot first (possibly empty), then alternating
//! non-empty `Updates` and strictly advancing `Progress`, every update between the previous and the next
//! `Progress`.
//!
//! **Tests.** `tests/it/shards.rs` (the listen behaviours on every backend), `tests/it/faults.rs`
//! (consensus outage: no gap, no duplicate; huge collections).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use frontiers::Antichain;
use protocol::GlobalId;
use tokio::sync::watch;

use crate::api::{CollectionFrontiers, ListenEvent, StorageReadHold};
use crate::error::ReadError;
use crate::shard::collections::{Inner, WaitGuard, list_keys, read_error_of};
use crate::shard::read::{RangeStream, SnapshotStream};
use crate::shard::state::ShardState;

enum Phase {
    /// Waiting for the upper to pass `as_of` (no snapshot yet) or to move past what was delivered.
    Idle,
    /// Streaming the snapshot; then the range up to `upper`.
    Snapshot { stream: SnapshotStream, upper: Antichain<u64>, sent: bool },
    /// Streaming `[delivered, upper)`.
    Range { stream: RangeStream, upper: Antichain<u64> },
}

/// A listen on a shard; see the module documentation.
pub struct ShardListen {
    inner: Arc<Inner>,
    id: GlobalId,
    as_of: u64,
    hold: StorageReadHold,
    delivered: Option<Antichain<u64>>,
    phase: Phase,
    pending: VecDeque<ListenEvent>,
    finished: Option<ReadError>,
    latest: watch::Receiver<Option<Arc<ShardState>>>,
    _waiting: WaitGuard,
}

impl std::fmt::Debug for ShardListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardListen")
            .field("id", &self.id)
            .field("as_of", &self.as_of)
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

impl ShardListen {
    pub(crate) async fn start(inner: Arc<Inner>, id: GlobalId, as_of: u64) -> Result<ShardListen, ReadError> {
        let hold = inner
            .acquire_hold(id, Antichain::from_elem(as_of))
            .await
            .map_err(|e| ReadError::from_hold(e, as_of))?;
        let waiting = inner.wait_guard(id);
        let latest = inner.machine.subscribe(id);
        Ok(ShardListen {
            inner,
            id,
            as_of,
            hold,
            delivered: None,
            phase: Phase::Idle,
            pending: VecDeque::new(),
            finished: None,
            latest,
            _waiting: waiting,
        })
    }

    /// The collection.
    pub fn id(&self) -> GlobalId {
        self.id
    }

    /// The time the listen started at.
    pub fn as_of(&self) -> u64 {
        self.as_of
    }

    /// An event already produced, without waiting or reading.
    pub fn try_next(&mut self) -> Option<Result<ListenEvent, ReadError>> {
        if let Some(error) = &self.finished {
            return Some(Err(error.clone()));
        }
        self.pending.pop_front().map(Ok)
    }

    /// The next event; waits until there is one.
    pub async fn next(&mut self) -> Result<ListenEvent, ReadError> {
        loop {
            if let Some(event) = self.try_next() {
                return event;
            }
            if let Err(error) = self.step().await {
                let error = self.inner.explain(self.id, error).await;
                self.hold.release();
                self.phase = Phase::Idle;
                self.finished = Some(error);
            }
        }
    }

    /// Produces at least one event, or waits for the shard to change.
    async fn step(&mut self) -> Result<(), ReadError> {
        let chunk_bytes = self.inner.config.listen_chunk_bytes;
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Snapshot { mut stream, upper, sent } => match stream.next_chunk(chunk_bytes).await? {
                Some(rows) => {
                    let as_of = self.as_of;
                    let updates = rows.into_iter().map(|(row, diff)| (row, as_of, diff)).collect();
                    self.pending.push_back(ListenEvent::Updates(updates));
                    self.phase = Phase::Snapshot { stream, upper, sent: true };
                }
                None => {
                    if !sent {
                        self.pending.push_back(ListenEvent::Updates(Vec::new()));
                    }
                    match self.as_of.checked_add(1) {
                        Some(next) => self.start_range(next, upper).await?,
                        None => self.deliver(upper),
                    }
                }
            },
            Phase::Range { mut stream, upper } => match stream.next_chunk(chunk_bytes).await? {
                Some(updates) => {
                    self.pending.push_back(ListenEvent::Updates(updates));
                    self.phase = Phase::Range { stream, upper };
                }
                None => self.deliver(upper),
            },
            Phase::Idle => self.poll().await?,
        }
        Ok(())
    }

    /// Delivers `Progress(upper)` and moves the hold there.
    fn deliver(&mut self, upper: Antichain<u64>) {
        self.pending.push_back(ListenEvent::Progress(upper.clone()));
        if upper.is_empty() {
            self.hold.release();
        } else if let Err(error) = self.hold.try_downgrade(upper.clone()) {
            panic!("a listen's delivered upper only advances: {error}");
        }
        self.delivered = Some(upper);
    }

    async fn start_range(&mut self, lower: u64, upper: Antichain<u64>) -> Result<(), ReadError> {
        let (state, guard) = self.inner.begin_read(self.id, None).await?;
        let stream = self.inner.range_stream(&state, lower, upper.clone(), guard);
        self.phase = Phase::Range { stream, upper };
        Ok(())
    }

    /// Looks at the latest state; starts a read if there is something new, else waits for a change.
    async fn poll(&mut self) -> Result<(), ReadError> {
        let current = self.latest.borrow_and_update().clone();
        let state = match current {
            Some(state) => state,
            None => self
                .inner
                .machine
                .fetch(self.id)
                .await
                .map_err(|e| read_error_of(self.id, e))?
                .ok_or(ReadError::CollectionMissing(self.id))?,
        };
        if self.inner.is_closed() {
            return Err(ReadError::Disconnected);
        }
        if state.dropped {
            return Err(ReadError::CollectionDropped(self.id));
        }
        match &self.delivered {
            None if !state.upper.less_equal(&self.as_of) => {
                let (state, guard) = self.inner.begin_read(self.id, None).await?;
                let stream = SnapshotStream::new(
                    self.id,
                    Arc::clone(&self.inner.machine),
                    &state.batches,
                    self.as_of,
                    Box::new(guard),
                );
                self.phase = Phase::Snapshot { stream, upper: state.upper.clone(), sent: false };
                return Ok(());
            }
            Some(delivered) if *delivered != state.upper => {
                let lower = *delivered.as_option().expect("a closed listen never polls again");
                return self.start_range(lower, state.upper.clone()).await;
            }
            _ => {}
        }
        if self.delivered.as_ref().is_some_and(|d| d.is_empty()) {
            // Closed: nothing will ever come.
            std::future::pending::<()>().await;
        }
        let _ = self.latest.changed().await;
        Ok(())
    }
}

/// The frontier watch on shards; see the module documentation.
pub struct ShardWatch {
    inner: Arc<Inner>,
    /// The head seqno of each shard when last looked at.
    seen: BTreeMap<GlobalId, u64>,
    /// What was reported per live collection.
    reported: BTreeMap<GlobalId, CollectionFrontiers>,
    pending: VecDeque<(GlobalId, Option<CollectionFrontiers>)>,
    changed: watch::Receiver<u64>,
}

impl std::fmt::Debug for ShardWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardWatch").field("reported", &self.reported.len()).finish_non_exhaustive()
    }
}

impl ShardWatch {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        let changed = inner.changed.subscribe();
        ShardWatch {
            inner,
            seen: BTreeMap::new(),
            reported: BTreeMap::new(),
            pending: VecDeque::new(),
            changed,
        }
    }

    /// A change already found, without waiting.
    pub fn try_next(&mut self) -> Option<Result<(GlobalId, Option<CollectionFrontiers>), ReadError>> {
        if self.inner.is_closed() {
            return Some(Err(ReadError::Disconnected));
        }
        self.pending.pop_front().map(Ok)
    }

    /// The next change; waits until there is one.
    pub async fn next(&mut self) -> Result<(GlobalId, Option<CollectionFrontiers>), ReadError> {
        loop {
            if let Some(change) = self.try_next() {
                return change;
            }
            self.changed.borrow_and_update();
            self.refresh().await?;
            if self.pending.is_empty() {
                let interval = self.inner.config.poll_interval;
                let _ = tokio::time::timeout(interval, self.changed.changed()).await;
            }
        }
    }

    async fn refresh(&mut self) -> Result<(), ReadError> {
        let keys = list_keys(&self.inner).await?;
        for (id, seqno) in keys {
            if self.seen.get(&id) == Some(&seqno) {
                continue;
            }
            let state = self.inner.machine.fetch(id).await.map_err(|e| read_error_of(id, e))?;
            let Some(state) = state else { continue };
            self.seen.insert(id, state.seqno);
            let frontiers = (!state.dropped)
                .then(|| CollectionFrontiers { since: state.since.clone(), upper: state.upper.clone() });
            match frontiers {
                Some(frontiers) if self.reported.get(&id) != Some(&frontiers) => {
                    self.reported.insert(id, frontiers.clone());
                    self.pending.push_back((id, Some(frontiers)));
                }
                None if self.reported.remove(&id).is_some() => self.pending.push_back((id, None)),
                _ => {}
            }
        }
        Ok(())
    }
}
