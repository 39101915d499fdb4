//! [`InstanceCore`]: the synchronous state machine of one compute instance.
//!
//! **What this is.** The instance's partial map `GlobalId → collection` and everything hanging off it:
//! read holds and the compaction chain, read policies, per-replica frontiers and input holds, peeks and
//! their holds, subscribe deduplication, copy-to results, the command history new replicas start from,
//! and introspection. Inputs are API calls, replica events ([`ReplicaEvent`]) and the time (`tick`);
//! outputs ([`InstanceOutput`]) are commands per replica, responses for the user, and peek results.
//!
//! **What this is not.** No I/O, no tokio, no clock: the controller's instance task (and the simulator)
//! wrap it. Storage is reached only through the [`ReadHold`]s the caller acquires and hands in.
//!
//! # The compaction chain
//!
//! Every compute collection (a dataflow export) has, in the instance's [`ReadHolds`] accounting:
//! - an *implied hold*, the controller's own, governed by the read policy (indexes) or by the sink's
//!   progress (materialized views and subscribes: one step behind what is written, see below, or
//!   forwarded, so a rehydrated sink never re-emits what was already delivered);
//! - the holds of callers ([`acquire_read_hold`](crate::ComputeController::acquire_read_hold)), of pending
//!   peeks, and of dataflows that import it.
//!
//! Its `since` is the meet of all of these. Whenever a since advances, the instance sends
//! `AllowCompaction` to every replica and downgrades that collection's *import holds* (on storage
//! collections and on other indexes) to the new since, which may advance those imports' sinces in turn.
//! So storage at the bottom of a chain of indexes is held back exactly as far as the slowest reader at the
//! top needs. Per replica, extra holds on the storage imports at that replica's own write frontier keep a
//! lagging replica able to catch up (index imports are the replica's own arrangements, compacted only as
//! the controller allows).
//!
//! # Invariants (checked by [`InstanceCore::check_invariants`], which the simulator calls after every step)
//!
//! 1. A collection's since is the meet of its holds and never regresses (asserted by `ReadHolds`); its
//!    upper never regresses.
//! 2. Every import hold of a collection is at or before the collection's since.
//! 3. A pending peek holds its collection at its time until every replica it was sent to has answered,
//!    been cancelled and answered, or been dropped, and no longer than its deadline (its timeout after it
//!    started): there an unanswered peek fails with `TimedOut` and is cancelled at its replicas, and no
//!    peek waits any longer for a replica (a late answer is ignored; a replica checks the since when it
//!    answers, so it errs rather than read compacted data).
//! 4. A collection's state (and every hold it owns) goes away once it is dropped, fully compacted, and
//!    no connected replica can still report on it: each reported it closed (`[]`, before or after the
//!    drop), or connected after it was compacted away. Nothing outlives it.
//!
//! # Peeks
//!
//! Every peek ends with a [`PeekResult`]: its rows, or a [`PeekFailure`] (the replica's error or
//! oversized result, a dropped replica, a timeout, a cancellation). A peek's `Peek` command, like a
//! dataflow's `CreateDataflow`, is measured against the instance's `max_command_bytes` before anything is
//! recorded, held or sent: a larger one is refused with `CommandTooLarge`. A `CommandRejected` from a
//! replica reaches the user as [`ComputeControllerResponse::CommandRejected`], and a replica's report
//! that an export can make no more progress (`StatusResponse::Failed`) as
//! [`ComputeControllerResponse::ExportFailed`]; the replica stays. A replica that another controller
//! holds (`ReplicaStatus::Fenced`, final) reaches the user as
//! [`ComputeControllerResponse::ReplicaFenced`] and as the `fenced` status row; the replica stays added,
//! unserved, until the user drops it.
//!
//! # Materialized views
//!
//! A replica reports a view's write frontier *before* its compare-and-append to the target storage
//! collection is durable, so the replicas' reports overstate what readers of the target can see. The shell
//! therefore watches storage and feeds every storage upper in through
//! [`storage_upper`](InstanceCore::storage_upper) (uppers only advance; a regression is ignored). A view's
//! upper (in the shared state, [`collection_frontiers`](InstanceCore::collection_frontiers) and the
//! `FrontierUpper` responses), and with it the since one step behind (never below the as-of), is then:
//! - if its target's storage upper was fed before the view was created: the latest storage upper of the
//!   target (which may be below the view's as-of while nothing is written there);
//! - if it was first fed later: the join of the upper the view had reached by then and the latest storage
//!   upper (so an upper never regresses);
//! - if it was never fed (a core driven by a test harness or the simulator): the join of the replicas'
//!   reports, as for every other collection.
//!
//! Per-replica frontiers, hydration and per-replica input holds follow the replicas' reports in every case.
//! A dropped view's upper no longer moves.
//!
//! # Finished sinks
//!
//! A materialized view whose upper is closed (`[]`: its target is sealed, or its replicas finished) and a
//! subscribe whose stream ended (closed, cut at its `until`, or failed) need nothing more from their
//! inputs: their implied hold is released at once, so unless a caller holds them they compact away, their
//! import holds go, and replicas are told to drop them (`AllowCompaction` to `[]`). Their state waits for
//! the user's drop. A dataflow's storage import holds start at its as-of, whatever the caller's holds were
//! (they may be earlier), so a dataflow never holds storage below what it reads.
//!
//! # Subscribes
//!
//! Each time range is forwarded once, whichever replica reports it first; a batch overlapping what was
//! already forwarded is cut to the new part; a batch that starts beyond it (a gap: updates skipped) gets
//! its replica disconnected, like a regressed frontier, and is not forwarded. A dataflow's `until` ends
//! its subscribe: the replica may compute past it (the protocol lets it ignore `until`), but the
//! controller delivers nothing at or beyond it, and the batch that reaches it is delivered with upper
//! `[]`, which closes the stream.
//!
//! **Tests:** `tests/it/` (compaction chain and removal, peek holds and deadlines, replica drop, faulty
//! replicas, sinks and finished sinks, errors and peek failures), and the simulator.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use smallvec::SmallVec;
use tracing::{debug, warn};

use frontiers::antichain::step_back;
use frontiers::{
    Antichain, AntichainRef, PartialOrder, ReadHold, ReadHolds, ReadPolicy, SinceChange, Timestamp,
};
use protocol::frame::DEFAULT_MAX_FRAME_BYTES;
use protocol::{
    ComputeCommand, ComputeResponse, CopyToResponse, DataflowDescription, Datum, Diff, FrontiersResponse,
    GlobalId, InstanceId, MapFilterProject, Peek, PeekId, PeekResponse, PeekTarget, RelationType, ReplicaId,
    Row, RowSetFinishing, SinkConnection, StatusResponse, SubscribeBatch, SubscribeResponse,
};
use replica_client::{CommandHistory, ReplicaEvent, ReplicaStatus};

use crate::error::{
    CancelPeekError, CollectionDropError, CollectionMissing, DataflowCreationError, PeekError, PeekFailure,
    ReadPolicyError, ReplicaCreationError, ReplicaDropError,
};
use crate::introspection::{IntrospectionKind, IntrospectionState, ReplicaHealth, peek_duration_bucket_ms};
use crate::metrics::{CollectionCounts, InstanceGauges, InstanceMetrics, LagSeries};
use crate::response::{ComputeControllerResponse, PeekNotification, PeekOutcome, PeekResult};
use crate::status::{LagMinute as LagMinuteMax, ReplicaHydration, ReplicaLag};

/// A compute collection's frontiers as seen by readers of the shared state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionFrontiers<T> {
    /// The read frontier: the meet of every hold.
    pub since: Antichain<T>,
    /// The write frontier: the join of every replica's; for a materialized view whose target's storage
    /// upper the instance has been told, what storage has durably instead (see the module documentation).
    /// It never goes back, also when the replica that was furthest ahead disconnects.
    pub upper: Antichain<T>,
    /// The join of the write frontiers the replicas reported on their current connections: some replica
    /// connected now has the collection complete before it, so an index peek at a time below it is
    /// answered without waiting for a dataflow to catch up. At most `upper` for an index; the minimum
    /// (nothing readable) while no connected replica has reported. A peek between it and `upper` waits for
    /// a replica to get there, which during a storage outage may mean until the store returns.
    pub connected_upper: Antichain<T>,
}

/// An instance's collections: the hold accounting of every compute collection, each entry carrying the
/// collection's whole state as its attachment. The instance task changes it; the controller's handle
/// reads frontiers and acquires holds here without waiting for the instance task.
///
/// One entry per collection serves both: a frontier report updates the collection's upper, per-replica
/// state and implied hold, and then its hold counts, all in one entry of one map (a hash index over a
/// dense vector of entries, with a fixed hasher). At 10,000 collections every cache line an update
/// touches is a miss, and a second map would add its own (`controller.frontier_update_10k` in
/// `cargo xtask bench controller`). Iteration is in insertion order: deterministic, not sorted.
///
/// **Invariant:** a collection is accounted exactly as long as it has state: created together, removed
/// together (once dropped, fully compacted and reported dropped by every connected replica).
#[derive(Debug)]
pub struct SharedState<T: Timestamp> {
    holds: ReadHolds<GlobalId, T, Collection<T>>,
    /// The largest encoded command the instance sends ([`InstanceCoreConfig::max_command_bytes`], at most
    /// the replica connection's maximum frame).
    max_command_bytes: usize,
    /// Every peek id issued through this state is below this one (see [`SharedState::issue_peek_id`]).
    next_peek_id: PeekId,
}

impl<T: Timestamp> SharedState<T> {
    /// A live collection's frontiers: the since of its holds and its upper (the replicas' reports, or for a
    /// materialized view its target's storage upper; see the module documentation).
    pub fn frontiers(&self, id: GlobalId) -> Option<CollectionFrontiers<T>> {
        let (since, collection) = self.holds.since_and_attachment(&id).filter(|(_, c)| !c.dropped)?;
        Some(collection.frontiers(since))
    }

    /// Whether `id` names a live collection.
    pub fn is_live(&self, id: GlobalId) -> bool {
        self.holds.attachment(&id).is_some_and(|c| !c.dropped)
    }

    /// The since of a collection with state (live, or dropped and still held).
    pub fn since(&self, id: GlobalId) -> Option<Antichain<T>> {
        self.holds.since(&id).map(|since| since.to_owned())
    }

    /// A new hold on a live collection at its since.
    pub fn acquire_at_since(&mut self, id: GlobalId) -> Result<ReadHold<GlobalId, T>, CollectionMissing> {
        if !self.is_live(id) {
            return Err(CollectionMissing(id));
        }
        self.holds.acquire_at_since(&id).map_err(|_| CollectionMissing(id))
    }

    /// Checks a peek against its index (live, an index, readable at the peek's time, the map/filter/project
    /// fits its type, the target replica exists) and takes the peek's hold. The controller's handle calls
    /// this itself, so a peek's errors come back without waiting for the instance task, and the task then
    /// starts it ([`InstanceCore::install_peek`]) with nothing left to check.
    pub fn prepare_peek(&mut self, request: PeekRequest<T>) -> Result<PreparedPeek<T>, PeekError<T>> {
        let PeekRequest { uuid, id, timestamp, options } = request;
        let PeekOptions { literal_constraints, map_filter_project, finishing, target_replica, timeout_ms } =
            options;
        let collection = match self.holds.attachment(&id) {
            Some(c) if !c.dropped => c,
            _ => return Err(PeekError::CollectionMissing(CollectionMissing(id))),
        };
        if collection.kind != CollectionKind::Index {
            return Err(PeekError::NotAnIndex(id));
        }
        // Every live collection has an entry for every replica of the instance.
        if let Some(replica) = target_replica
            && collection.per_replica.get(&replica).is_none()
        {
            return Err(PeekError::ReplicaMissing(replica));
        }
        let map_filter_project =
            map_filter_project.unwrap_or_else(|| MapFilterProject::new(collection.typ.arity()));
        map_filter_project
            .typ(&collection.typ)
            .map_err(|e| PeekError::InvalidMapFilterProject { id, reason: e.to_string() })?;
        // Replicas get the partial finishing; the controller applies the full one to the union.
        let command = ComputeCommand::Peek(Peek {
            uuid,
            target: PeekTarget::Index { id },
            timestamp,
            literal_constraints,
            map_filter_project,
            finishing: finishing.partial(),
        });
        check_command_size(&command, self.max_command_bytes)
            .map_err(|(size_bytes, max_bytes)| PeekError::CommandTooLarge { size_bytes, max_bytes })?;
        let ComputeCommand::Peek(peek) = command else { unreachable!("built as a peek above") };
        let hold = self.holds.acquire(&id, Antichain::from_elem(timestamp)).map_err(|e| match e {
            frontiers::AcquireError::CollectionMissing(id) => {
                PeekError::CollectionMissing(CollectionMissing(id))
            }
            frontiers::AcquireError::BeforeSince { id, since, .. } => {
                PeekError::SinceViolation { id, since, timestamp }
            }
        })?;
        self.next_peek_id = self.next_peek_id.max(PeekId(uuid.0 + 1));
        Ok(PreparedPeek { peek, finishing, target_replica, timeout_ms, hold })
    }

    /// The id the next peek should get: above every peek id issued so far.
    pub fn next_peek_id(&self) -> PeekId {
        self.next_peek_id
    }

    /// Issues a peek id that never reaches [`prepare_peek`](Self::prepare_peek) (the controller's storage
    /// peeks), so that [`InstanceCore::cancel_peek`] knows it was issued.
    pub fn issue_peek_id(&mut self) -> PeekId {
        let uuid = self.next_peek_id;
        self.next_peek_id = PeekId(uuid.0 + 1);
        uuid
    }

    /// Whether `uuid` was issued: by [`issue_peek_id`](Self::issue_peek_id), or given to a successful
    /// [`prepare_peek`](Self::prepare_peek).
    pub fn was_issued(&self, uuid: PeekId) -> bool {
        uuid < self.next_peek_id
    }

    /// The number of collections with state (live, or dropped and waiting to be removed).
    pub fn len(&self) -> usize {
        self.holds.len()
    }

    /// Whether the instance has no collection with state.
    pub fn is_empty(&self) -> bool {
        self.holds.is_empty()
    }
}

/// The handle to [`SharedState`].
pub type SharedHandle<T> = Arc<Mutex<SharedState<T>>>;

/// Locks the shared state. A poisoned lock means a thread panicked while holding it: an invariant broke.
pub fn lock<T: Timestamp>(shared: &SharedHandle<T>) -> MutexGuard<'_, SharedState<T>> {
    shared.lock().expect("instance shared state poisoned")
}

/// What kind of export a compute collection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CollectionKind {
    /// An index: arranged, peekable, importable.
    Index,
    /// A materialized view writing into storage collection `target`.
    MaterializedView {
        /// The storage collection.
        target: GlobalId,
    },
    /// A subscribe.
    Subscribe,
    /// A copy-to.
    CopyTo,
}

/// The instance's tunables.
#[derive(Debug, Clone)]
pub struct InstanceCoreConfig<T> {
    /// The read policy of an index until `set_read_policy` says otherwise.
    pub default_index_policy: ReadPolicy<T>,
    /// How long a peek waits for an answer when it does not set its own `timeout_ms` (30 s by
    /// default). Every peek ends: at its timeout an unanswered peek fails with
    /// [`PeekFailure::TimedOut`], and any peek stops waiting for replicas that still owe an answer.
    pub default_peek_timeout_ms: u64,
    /// How often the frontier and wall-clock lag introspection rows are refreshed, in milliseconds.
    pub introspection_interval_ms: u64,
    /// How many minutes of wall-clock lag history (`compute_wallclock_lag_history`, and
    /// [`InstanceCore::wallclock_lag`]) the instance keeps per replica and collection (60 by default).
    pub wallclock_lag_history_minutes: u64,
    /// The largest encoded command (`CreateDataflow`, `Peek`) the instance accepts, in bytes: one
    /// whose frame would be larger is refused with a `CommandTooLarge` error before it is recorded or
    /// sent. At most the replica connection's maximum frame ([`DEFAULT_MAX_FRAME_BYTES`], the default);
    /// the core never lets a larger command through, and `create_instance` refuses a larger setting.
    pub max_command_bytes: usize,
}

impl<T: Timestamp> Default for InstanceCoreConfig<T> {
    fn default() -> Self {
        InstanceCoreConfig {
            default_index_policy: ReadPolicy::LagWriteFrontier { lag_ms: 1_000, granularity_ms: 1_000 },
            default_peek_timeout_ms: 30_000,
            introspection_interval_ms: 1_000,
            wallclock_lag_history_minutes: 60,
            max_command_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// A peek request (the index flavour; storage peeks never reach the core).
#[derive(Debug, Clone)]
pub struct PeekRequest<T> {
    /// The peek's id.
    pub uuid: PeekId,
    /// The index.
    pub id: GlobalId,
    /// The time.
    pub timestamp: T,
    /// What to read and how.
    pub options: PeekOptions,
}

/// Options of a peek (of an index or a storage collection).
#[derive(Debug, Clone, Default)]
pub struct PeekOptions {
    /// Key values to look up (index peeks).
    pub literal_constraints: Option<Vec<Row>>,
    /// Applied to each row; the identity when `None`.
    pub map_filter_project: Option<MapFilterProject>,
    /// Ordering, offset and limit.
    pub finishing: RowSetFinishing,
    /// Only this replica answers, if set (index peeks).
    pub target_replica: Option<ReplicaId>,
    /// How long to wait for an answer, if set (else the instance's `default_peek_timeout_ms`).
    pub timeout_ms: Option<u64>,
}

/// A peek that passed [`SharedState::prepare_peek`]: checked against its index and holding it at its
/// time. Only `prepare_peek` makes one, so a peek reaches [`InstanceCore::install_peek`] checked and held.
#[derive(Debug)]
pub struct PreparedPeek<T: Timestamp> {
    /// The command the replicas get (with the partial finishing), measured against the command limit.
    peek: Peek<T>,
    /// The full finishing, applied to the answer.
    finishing: RowSetFinishing,
    target_replica: Option<ReplicaId>,
    timeout_ms: Option<u64>,
    hold: ReadHold<GlobalId, T>,
}

impl<T: Timestamp> PreparedPeek<T> {
    /// The peek's id.
    pub fn uuid(&self) -> PeekId {
        self.peek.uuid
    }
}

/// Checks that `command` fits in `max_bytes` by the rule the replica client applies to every command it
/// sends ([`replica_client::check_command_size`]: the encoded size, measured without encoding, plus a
/// little headroom); on failure returns its size and the limit.
fn check_command_size<T: Timestamp>(command: &ComputeCommand<T>, max_bytes: usize) -> Result<(), (u64, u64)> {
    replica_client::check_command_size(command, max_bytes)
        .map_err(|too_large| (too_large.len, too_large.max as u64))
}

/// What the core asks its shell to do or deliver.
#[derive(Debug)]
pub enum InstanceOutput<T: Timestamp> {
    /// Send a command to a replica.
    Command {
        /// The replica.
        replica: ReplicaId,
        /// The command.
        command: ComputeCommand<T>,
    },
    /// The replica broke the protocol: disconnect it (it will reconnect and rehydrate).
    DisconnectReplica {
        /// The replica.
        replica: ReplicaId,
        /// Why.
        reason: String,
    },
    /// A response for the user.
    Response(ComputeControllerResponse<T>),
    /// A peek's result, for its caller.
    PeekResult {
        /// The peek.
        uuid: PeekId,
        /// The rows (finished), or why there are none.
        result: PeekResult,
    },
}

/// One export of a dataflow being created, as [`InstanceCore::create_export`] needs it.
struct Export<'a, T> {
    id: GlobalId,
    kind: CollectionKind,
    typ: RelationType,
    as_of: &'a Antichain<T>,
    until: &'a Antichain<T>,
}

/// One replica's view of one collection. `repr(C)`, in the order a frontier report reads the fields.
#[derive(Debug)]
#[repr(C)]
struct ReplicaCollection<T: Timestamp> {
    /// Reported on the current connection (reset when the replica reconnects).
    write_frontier: Option<Antichain<T>>,
    /// The write frontier changed since its introspection row was last written (the pair is then listed
    /// in `InstanceCore::stale_frontier_rows`).
    frontier_row_stale: bool,
    /// This replica will say nothing more that matters about the collection, which is dropped or fully
    /// compacted: it reported it closed (`[]`) on this connection (before or after the drop: a replica
    /// reports a closed collection's drop with nothing more), or it is not connected, or the collection
    /// was fully compacted before this connection began (a replay leaves it out or closes it at once).
    dropped: bool,
    /// When the write frontier first passed the as-of on this connection.
    hydrated_at_ms: Option<u64>,
    /// Holds on the collection's storage imports at this replica's write frontier. (Index imports live on
    /// the same replica, which compacts them only as told: they need no per-replica hold.) Inline for
    /// one: most dataflows read one storage collection.
    input_holds: SmallVec<[ReadHold<GlobalId, T>; 1]>,
}

/// Per-replica state of one collection: a vector sorted by replica id, inline for up to two replicas. An
/// instance has a handful of replicas, so a scan of one short vector inside the collection's own entry
/// beats a tree's nodes or a separate allocation (this sits on the path of every frontier report).
#[derive(Debug)]
struct ReplicaMap<V>(SmallVec<[(ReplicaId, V); 2]>);

impl<V> Default for ReplicaMap<V> {
    fn default() -> Self {
        ReplicaMap(SmallVec::new())
    }
}

impl<V> ReplicaMap<V> {
    fn insert(&mut self, replica: ReplicaId, value: V) {
        match self.0.binary_search_by_key(&replica, |(r, _)| *r) {
            Ok(at) => self.0[at].1 = value,
            Err(at) => self.0.insert(at, (replica, value)),
        }
    }

    fn remove(&mut self, replica: &ReplicaId) -> Option<V> {
        let at = self.0.iter().position(|(r, _)| r == replica)?;
        Some(self.0.remove(at).1)
    }

    fn get(&self, replica: &ReplicaId) -> Option<&V> {
        self.0.iter().find(|(r, _)| r == replica).map(|(_, v)| v)
    }

    fn get_mut(&mut self, replica: &ReplicaId) -> Option<&mut V> {
        self.0.iter_mut().find(|(r, _)| r == replica).map(|(_, v)| v)
    }

    fn iter(&self) -> impl Iterator<Item = (&ReplicaId, &V)> {
        self.0.iter().map(|(r, v)| (r, v))
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (&ReplicaId, &mut V)> {
        self.0.iter_mut().map(|(r, v)| (&*r, v))
    }

    fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }
}

/// One compute collection's state: the attachment of its entry in the hold accounting ([`SharedState`]),
/// whose counts give its since. `repr(C)` keeps the fields in the order written: those a frontier report
/// reads or writes come first, right after the counts, so that at 10,000 collections an update touches a
/// few adjacent cache lines of the entry rather than lines spread over all of it
/// (`controller.frontier_update_10k`).
#[derive(Debug)]
#[repr(C)]
struct Collection<T: Timestamp> {
    // Read or written on every frontier report.
    write_frontier: Antichain<T>,
    /// Dropped by the user; waits for its holds and replicas before it goes away.
    dropped: bool,
    /// The history's compaction of this collection is behind its since (the collection is then listed
    /// in `InstanceCore::history_behind`).
    history_behind: bool,
    /// A materialized view whose upper follows its target's storage upper (fed through
    /// [`InstanceCore::storage_upper`]) rather than the replicas' reports. Set once, never cleared.
    upper_from_storage: bool,
    kind: CollectionKind,
    read_policy: ReadPolicy<T>,
    /// The controller's own hold; released on drop.
    implied_hold: ReadHold<GlobalId, T>,
    // Read or written when the since moves.
    /// Holds on every import, at or before this collection's since: first the storage imports (the first
    /// `storage_imports` entries), then the index imports. Inline for up to two.
    import_holds: SmallVec<[ReadHold<GlobalId, T>; 2]>,
    storage_imports: usize,
    per_replica: ReplicaMap<ReplicaCollection<T>>,
    // The rest.
    typ: RelationType,
    as_of: Antichain<T>,
    created_ms: u64,
    /// Subscribes: everything before this has been forwarded.
    forwarded: Antichain<T>,
    /// The dataflow's `until`: a subscribe ends there (empty: never).
    until: Antichain<T>,
    /// Subscribes and copy-tos: the stream ended or the result was delivered.
    finished: bool,
    /// The since reached the empty frontier: the history no longer rebuilds this collection, so a
    /// connection that begins later never reports on it. Live collections get here only as finished
    /// sinks (see [`InstanceCore::apply_policy`]).
    fully_compacted: bool,
    /// With metrics: the live collection's wall-clock lag histogram, from its first observation until
    /// it is dropped (see `metrics::LagSeries`).
    lag_series: Option<LagSeries>,
}

impl<T: Timestamp> Collection<T> {
    /// The collection's frontiers, its read frontier being `since`.
    fn frontiers(&self, since: AntichainRef<'_, T>) -> CollectionFrontiers<T> {
        let mut connected_upper = Antichain::from_elem(T::minimum());
        for state in self.per_replica.values() {
            if let Some(frontier) = &state.write_frontier {
                connected_upper = frontiers::antichain::join(&connected_upper.borrow(), &frontier.borrow());
            }
        }
        CollectionFrontiers { since: since.to_owned(), upper: self.write_frontier.clone(), connected_upper }
    }
}

#[derive(Debug)]
struct PendingPeek<T: Timestamp> {
    collection: GlobalId,
    /// Released when `outstanding` empties (not before: DESIGN §5.3), at the latest at `deadline_ms`.
    hold: Option<ReadHold<GlobalId, T>>,
    /// Replicas that were sent the peek and have neither answered nor been dropped (nor outlived the
    /// deadline).
    outstanding: BTreeSet<ReplicaId>,
    answered: bool,
    finishing: RowSetFinishing,
    target_replica: Option<ReplicaId>,
    started_ms: u64,
    /// The peek's timeout.
    timeout_ms: u64,
    /// `started_ms + timeout_ms`: an unanswered peek fails with `TimedOut` here, and no peek waits for
    /// its replicas beyond it.
    deadline_ms: u64,
}

#[derive(Debug)]
struct Replica {
    /// Initialized on the current connection (status `Hydrating` or `Ready`).
    connected: bool,
    /// How many connections came up so far (the current one included): a replica connected before
    /// *re*hydrates.
    connections: u32,
    /// When the current (or last) connection came up: hydration times on it count from here.
    connected_ms: u64,
    /// The live collections not hydrated on the current connection (kept as a count, so that a hydration
    /// does not scan every collection to tell whether the replica is done).
    unhydrated: usize,
    /// Its status, as its `compute_replica_status` row says.
    health: ReplicaHealth,
}

/// One compute instance's state machine. See the module documentation.
#[derive(Debug)]
pub struct InstanceCore<T: Timestamp> {
    id: InstanceId,
    config: InstanceCoreConfig<T>,
    /// The collections, with their hold accounting. Locked only within a method's own statements,
    /// never across a call of another method that locks it (the borrow of `self.shared` a guard keeps
    /// makes the compiler refuse such a call).
    shared: SharedHandle<T>,
    replicas: BTreeMap<ReplicaId, Replica>,
    /// What a new replica is replayed (no `CreateInstance`: that is per replica).
    history: CommandHistory<T>,
    peeks: BTreeMap<PeekId, PendingPeek<T>>,
    /// The largest peek id seen (a response for a larger one was never asked for).
    max_peek_id: Option<PeekId>,
    outputs: VecDeque<InstanceOutput<T>>,
    introspection: IntrospectionState,
    peek_histogram: BTreeMap<(ReplicaId, u64), i64>,
    /// (collection, replica) pairs whose frontier introspection row is due at the next refresh.
    stale_frontier_rows: Vec<(GlobalId, ReplicaId)>,
    /// Collections whose since moved beyond the compaction the history records. Replicas are sent
    /// every `AllowCompaction` as it happens, but the history, read only when a replica starts, is
    /// brought up to date in batches (each introspection interval, and before it is read): one entry
    /// per collection per interval rather than one per since change.
    history_behind: Vec<GlobalId>,
    now_ms: u64,
    last_lag_refresh_ms: u64,
    /// `AllowWrites` was broadcast (and is in the history, so every later replica gets it too).
    writes_allowed: bool,
    /// The latest upper [`storage_upper`](Self::storage_upper) was told of, per storage collection (only
    /// advances). Kept for every collection fed, so that a materialized view created later starts from it.
    storage_uppers: BTreeMap<GlobalId, Antichain<T>>,
    /// The live materialized views writing into each storage collection.
    materialized_views: BTreeMap<GlobalId, SmallVec<[GlobalId; 1]>>,
    /// Where a reconnected replica was replayed a collection at a later as-of than the original (its
    /// compaction had moved on): hydration on that connection is judged against this as-of, not the
    /// original. Removed once hydrated, and with the collection or the replica.
    replayed_as_ofs: BTreeMap<(GlobalId, ReplicaId), Antichain<T>>,
    /// The wall-clock lag of the current minute, for `compute_wallclock_lag_history`.
    lag_minute: LagMinute,
    /// Prometheus metrics, when the shell asked for them ([`with_metrics`](Self::with_metrics)).
    metrics: Option<InstanceMetrics>,
}

/// The largest wall-clock lag of each (collection, replica) in the minute under way; written to
/// `compute_wallclock_lag_history` once the minute is over.
#[derive(Debug, Default)]
struct LagMinute {
    /// The minute's start, in milliseconds since the epoch.
    start_ms: u64,
    max_lag_ms: BTreeMap<(GlobalId, ReplicaId), u64>,
}

/// A minute, in milliseconds.
const MINUTE_MS: u64 = 60_000;

/// The collections' lag series live in the shared state, which the controller's handle on the instance
/// may keep after the core is gone: they go with the core, so a dropped instance leaves no series.
impl<T: Timestamp> Drop for InstanceCore<T> {
    fn drop(&mut self) {
        if self.metrics.is_none() {
            return;
        }
        // Not `lock`: a drop while unwinding from a poisoning panic must not panic again.
        if let Ok(mut shared) = self.shared.lock() {
            for (_, collection) in shared.holds.attachments_mut() {
                collection.lag_series = None;
            }
        }
    }
}

impl<T: Timestamp> InstanceCore<T> {
    /// An empty instance. `notify` is called whenever a hold changes from outside (a caller dropped or
    /// downgraded a [`ReadHold`]), so the owner can wake up and [`process_holds`](Self::process_holds).
    pub fn new(
        id: InstanceId,
        config: InstanceCoreConfig<T>,
        notify: Arc<dyn Fn() + Send + Sync>,
        now_ms: u64,
    ) -> Self {
        let max_command_bytes = config.max_command_bytes.min(DEFAULT_MAX_FRAME_BYTES);
        let shared = SharedState {
            holds: ReadHolds::with_attachments(notify),
            max_command_bytes,
            next_peek_id: PeekId(1),
        };
        InstanceCore {
            id,
            config,
            shared: Arc::new(Mutex::new(shared)),
            replicas: BTreeMap::new(),
            history: CommandHistory::new(),
            peeks: BTreeMap::new(),
            max_peek_id: None,
            outputs: VecDeque::new(),
            introspection: IntrospectionState::default(),
            peek_histogram: BTreeMap::new(),
            stale_frontier_rows: Vec::new(),
            history_behind: Vec::new(),
            now_ms,
            last_lag_refresh_ms: now_ms,
            writes_allowed: false,
            storage_uppers: BTreeMap::new(),
            materialized_views: BTreeMap::new(),
            replayed_as_ofs: BTreeMap::new(),
            lag_minute: LagMinute { start_ms: now_ms - now_ms % MINUTE_MS, max_lag_ms: BTreeMap::new() },
            metrics: None,
        }
    }

    /// The core with Prometheus metrics
    /// ([`ControllerMetrics::instance`](crate::ControllerMetrics::instance)):
    /// series for its replicas and live collections, updated as it goes (see the `metrics` module). Without
    /// this the core keeps none (the simulator, and benchmarks' baselines).
    pub fn with_metrics(mut self, mut metrics: InstanceMetrics) -> Self {
        for replica in self.replicas.keys() {
            metrics.replica_added(*replica);
        }
        self.metrics = Some(metrics);
        self
    }

    /// The core's metrics, if it keeps any.
    pub fn metrics(&self) -> Option<&InstanceMetrics> {
        self.metrics.as_ref()
    }

    /// The instance's id.
    pub fn id(&self) -> InstanceId {
        self.id
    }

    /// The shared state (hold accounting and frontiers).
    pub fn shared(&self) -> SharedHandle<T> {
        Arc::clone(&self.shared)
    }

    /// The next output.
    pub fn poll(&mut self) -> Option<InstanceOutput<T>> {
        let output = self.outputs.pop_front();
        // Every command and response leaves through here: counted once each.
        if let (Some(metrics), Some(output)) = (&mut self.metrics, &output) {
            match output {
                InstanceOutput::Command { replica, command } => metrics.command(*replica, command),
                InstanceOutput::Response(ComputeControllerResponse::SubscribeResponse {
                    response: SubscribeResponse::Batch(SubscribeBatch { updates: Ok(updates), .. }),
                    ..
                }) => metrics.subscribe_updates(updates.len()),
                _ => {}
            }
        }
        output
    }

    /// Introspection updates accumulated since the last call.
    pub fn drain_introspection(&mut self) -> Vec<(IntrospectionKind, Row, Diff)> {
        self.introspection.drain()
    }

    /// The current introspection rows (what the drained updates add up to).
    pub fn introspection(&self) -> &IntrospectionState {
        &self.introspection
    }

    // ---------------------------------------------------------------------------------------------
    // Replicas

    /// Adds a replica; returns the history to start its client with (everything live, including pending
    /// peeks that target no particular replica, which it will be asked to answer too).
    pub fn add_replica(&mut self, replica: ReplicaId) -> Result<CommandHistory<T>, ReplicaCreationError> {
        if self.replicas.contains_key(&replica) {
            return Err(ReplicaCreationError::ReplicaExists(replica));
        }
        self.replicas.insert(
            replica,
            Replica {
                connected: false,
                connections: 0,
                connected_ms: self.now_ms,
                unhydrated: 0,
                health: ReplicaHealth::Connecting,
            },
        );
        if let Some(metrics) = &mut self.metrics {
            metrics.replica_added(replica);
        }
        for (_, collection) in lock(&self.shared).holds.attachments_mut() {
            let input_holds = collection.import_holds[..collection.storage_imports]
                .iter()
                .map(ReadHold::clone_hold)
                .collect();
            collection.per_replica.insert(
                replica,
                ReplicaCollection {
                    write_frontier: None,
                    input_holds,
                    hydrated_at_ms: None,
                    // Its first connection is replayed without what is dropped or fully compacted.
                    dropped: collection.dropped || collection.fully_compacted,
                    frontier_row_stale: false,
                },
            );
        }
        for peek in self.peeks.values_mut() {
            if peek.target_replica.is_none() && !peek.answered {
                peek.outstanding.insert(replica);
            }
        }
        self.catch_up_history();
        let mut history = self.history.clone();
        history
            .push(&ComputeCommand::CreateInstance(protocol::InstanceConfig {
                instance_id: self.id,
                replica_id: replica,
            }))
            .expect("CreateInstance is always recordable");
        self.set_replica_status_row(replica, ReplicaHealth::Connecting);
        self.reset_hydration_rows(replica);
        Ok(history)
    }

    /// Drops a replica: its input holds are released, and peeks stop waiting for it.
    pub fn drop_replica(&mut self, replica: ReplicaId) -> Result<(), ReplicaDropError> {
        if self.replicas.remove(&replica).is_none() {
            return Err(ReplicaDropError::ReplicaMissing(replica));
        }
        self.replayed_as_ofs.retain(|(_, r), _| *r != replica);
        for (_, collection) in lock(&self.shared).holds.attachments_mut() {
            collection.per_replica.remove(&replica);
        }
        let uuids: Vec<PeekId> = self.peeks.keys().copied().collect();
        for uuid in uuids {
            let peek = self.peeks.get_mut(&uuid).expect("listed");
            peek.outstanding.remove(&replica);
            if !peek.answered && (peek.target_replica == Some(replica) || peek.outstanding.is_empty()) {
                self.answer_peek(uuid, Err(PeekFailure::ReplicaDropped(replica)), None);
            }
            self.maybe_finish_peek(uuid);
        }
        self.introspection.remove_replica_collections(replica);
        self.introspection.remove_prefix(
            IntrospectionKind::ReplicaStatus,
            &[Datum::Text(&self.id.to_string()), Datum::Text(&replica.to_string())],
        );
        self.introspection.remove_prefix(
            IntrospectionKind::PeekDurations,
            &[Datum::Text(&self.id.to_string()), Datum::Text(&replica.to_string())],
        );
        self.peek_histogram.retain(|(r, _), _| *r != replica);
        self.lag_minute.max_lag_ms.retain(|(_, r), _| *r != replica);
        if let Some(metrics) = &mut self.metrics {
            metrics.replica_dropped(replica);
        }
        for id in self.collection_ids() {
            self.maybe_remove(id);
        }
        self.process_holds();
        Ok(())
    }

    /// The replicas.
    pub fn replica_ids(&self) -> impl Iterator<Item = ReplicaId> + '_ {
        self.replicas.keys().copied()
    }

    /// Lets the replicas write: materialized views append to storage and copy-tos write their files only
    /// once this was sent (until then a replica computes but stays read-only). Sent to every replica and
    /// recorded in the history, so replicas added or reconnected later get it too. Idempotent.
    pub fn allow_writes(&mut self) {
        if !self.writes_allowed {
            self.writes_allowed = true;
            self.broadcast(ComputeCommand::AllowWrites);
        }
    }

    /// Whether [`allow_writes`](Self::allow_writes) was called.
    pub fn writes_allowed(&self) -> bool {
        self.writes_allowed
    }

    // ---------------------------------------------------------------------------------------------
    // Dataflows and collections

    /// Installs a dataflow whose as-of is already chosen. `storage_holds` holds every storage import at
    /// (or before) the as-of; the core takes them over. Index imports are held from this instance's own
    /// accounting. On error nothing changes (the storage holds are dropped, i.e. released).
    pub fn create_dataflow(
        &mut self,
        desc: DataflowDescription<T>,
        storage_holds: BTreeMap<GlobalId, ReadHold<GlobalId, T>>,
    ) -> Result<(), DataflowCreationError<T>> {
        desc.validate().map_err(DataflowCreationError::Invalid)?;
        let as_of = desc.as_of.clone().expect("validated");
        if let Some(id) = desc.export_ids().find(|id| lock(&self.shared).holds.contains(id)) {
            return Err(DataflowCreationError::CollectionExists(id));
        }
        let command = ComputeCommand::CreateDataflow(desc);
        check_command_size(&command, self.config.max_command_bytes).map_err(|(size_bytes, max_bytes)| {
            DataflowCreationError::CommandTooLarge { size_bytes, max_bytes }
        })?;
        let ComputeCommand::CreateDataflow(desc) = command else { unreachable!("built as a dataflow above") };
        let import_holds = self.take_import_holds(&desc, storage_holds, &as_of)?;
        let storage_imports = desc.source_imports.len();
        // Exports: one collection each, with its own copies of the import holds.
        let exports: Vec<(GlobalId, CollectionKind, GlobalId)> = desc
            .index_exports
            .iter()
            .map(|(id, e)| (*id, CollectionKind::Index, e.on_id))
            .chain(desc.sink_exports.iter().map(|(id, s)| {
                let kind = match &s.connection {
                    SinkConnection::MaterializedView { target } => {
                        CollectionKind::MaterializedView { target: *target }
                    }
                    SinkConnection::Subscribe { .. } => CollectionKind::Subscribe,
                    SinkConnection::CopyTo { .. } => CollectionKind::CopyTo,
                };
                (*id, kind, s.from)
            }))
            .collect();
        for (id, kind, object) in exports {
            let typ = desc.object_type(object).expect("validated dataflows type-check");
            let export = Export { id, kind, typ, as_of: &as_of, until: &desc.until };
            self.create_export(export, &import_holds, storage_imports);
        }
        drop(import_holds);
        let schedule = desc.export_ids().next().expect("validated dataflows export something");
        let exports: Vec<GlobalId> = desc.export_ids().collect();
        self.broadcast(ComputeCommand::CreateDataflow(desc));
        self.broadcast(ComputeCommand::Schedule(schedule));
        self.introspect_new_collections(&exports);
        self.process_holds();
        Ok(())
    }

    /// The holds a new dataflow keeps on its imports, storage imports first: the caller's storage holds,
    /// which must cover the as-of, each moved up to the as-of (the dataflow reads nothing before it, and
    /// its since may never move, under a fixed read policy); then new holds at the as-of on its index
    /// imports, live indexes of this instance. On error every hold taken is released.
    fn take_import_holds(
        &self,
        desc: &DataflowDescription<T>,
        mut storage_holds: BTreeMap<GlobalId, ReadHold<GlobalId, T>>,
        as_of: &Antichain<T>,
    ) -> Result<Vec<ReadHold<GlobalId, T>>, DataflowCreationError<T>> {
        let mut import_holds = Vec::new();
        for id in desc.source_imports.keys() {
            let mut hold = storage_holds.remove(id).ok_or(DataflowCreationError::CollectionMissing(*id))?;
            if !PartialOrder::less_equal(hold.since(), as_of) {
                return Err(DataflowCreationError::SinceViolation {
                    id: *id,
                    since: hold.since().clone(),
                    as_of: as_of.clone(),
                });
            }
            hold.try_downgrade(as_of.clone()).expect("checked: the as-of is beyond the hold");
            import_holds.push(hold);
        }
        // Index imports: live collections of this instance, held at the as-of.
        {
            let mut shared = lock(&self.shared);
            for id in desc.index_imports.keys() {
                match shared.holds.attachment(id) {
                    Some(c) if !c.dropped && c.kind == CollectionKind::Index => {}
                    _ => return Err(DataflowCreationError::CollectionMissing(*id)),
                }
                let hold = shared.holds.acquire(id, as_of.clone()).map_err(|e| match e {
                    frontiers::AcquireError::CollectionMissing(id) => {
                        DataflowCreationError::CollectionMissing(id)
                    }
                    frontiers::AcquireError::BeforeSince { id, since, requested } => {
                        DataflowCreationError::SinceViolation { id, since, as_of: requested }
                    }
                })?;
                import_holds.push(hold);
            }
        }
        Ok(import_holds)
    }

    /// Creates the collection of one export of a new dataflow, with its own copies of the dataflow's
    /// import holds (the first `storage_imports` are on storage).
    fn create_export(
        &mut self,
        export: Export<'_, T>,
        import_holds: &[ReadHold<GlobalId, T>],
        storage_imports: usize,
    ) {
        let Export { id, kind, typ, as_of, until } = export;
        let mut per_replica = ReplicaMap::default();
        for (replica, _) in self.replicas.iter() {
            per_replica.insert(
                *replica,
                ReplicaCollection {
                    write_frontier: None,
                    input_holds: import_holds[..storage_imports].iter().map(ReadHold::clone_hold).collect(),
                    hydrated_at_ms: None,
                    dropped: false,
                    frontier_row_stale: false,
                },
            );
        }
        let read_policy = self.config.default_index_policy.clone();
        let created_ms = self.now_ms;
        // A materialized view into a storage collection whose upper is known follows that upper from
        // the start, also while it is below the as-of (an empty target: nothing is readable there yet).
        let storage_upper = match &kind {
            CollectionKind::MaterializedView { target } => {
                self.materialized_views.entry(*target).or_default().push(id);
                self.storage_uppers.get(target)
            }
            _ => None,
        };
        let upper_from_storage = storage_upper.is_some();
        let write_frontier = storage_upper.cloned().unwrap_or_else(|| as_of.clone());
        let mut shared = lock(&self.shared);
        shared
            .holds
            .create_with(id, as_of.clone(), |implied_hold| Collection {
                kind,
                typ,
                as_of: as_of.clone(),
                write_frontier,
                read_policy,
                implied_hold,
                import_holds: import_holds.iter().map(ReadHold::clone_hold).collect(),
                storage_imports,
                dropped: false,
                history_behind: false,
                upper_from_storage,
                created_ms,
                per_replica,
                forwarded: as_of.clone(),
                until: until.clone(),
                finished: false,
                fully_compacted: false,
                lag_series: None,
            })
            .expect("export ids are new");
        if upper_from_storage {
            Self::apply_policy(shared.holds.attachment_mut(&id).expect("just created"));
        }
        drop(shared);
    }

    /// Drops collections. All ids must name live collections, else nothing is dropped.
    pub fn drop_collections(&mut self, ids: &[GlobalId]) -> Result<(), CollectionDropError> {
        if let Some(id) = ids.iter().find(|id| !lock(&self.shared).is_live(**id)) {
            return Err(CollectionDropError::CollectionMissing(CollectionMissing(*id)));
        }
        for id in ids {
            self.drop_collection(*id);
        }
        self.process_holds();
        // A collection compacted away before (a finished sink) has no since change left to trigger this.
        for id in ids {
            self.maybe_remove(*id);
        }
        Ok(())
    }

    fn drop_collection(&mut self, id: GlobalId) {
        let connected: BTreeSet<ReplicaId> =
            self.replicas.iter().filter(|(_, r)| r.connected).map(|(id, _)| *id).collect();
        let mut shared = lock(&self.shared);
        let collection = shared.holds.attachment_mut(&id).expect("checked by the caller");
        collection.dropped = true;
        collection.implied_hold.release();
        for (replica, state) in collection.per_replica.iter_mut() {
            // A replica that is not connected replays without this dataflow: it will never report on it.
            // One that reported the collection closed on this connection reports its drop with nothing.
            let closed = state.write_frontier.as_ref().is_some_and(|f| f.is_empty());
            if !connected.contains(replica) || closed {
                state.dropped = true;
            }
        }
        let notify = match collection.kind {
            CollectionKind::Subscribe if !collection.finished => {
                collection.finished = true;
                Some(ComputeControllerResponse::SubscribeResponse {
                    id,
                    response: SubscribeResponse::DroppedAt(collection.forwarded.clone()),
                })
            }
            CollectionKind::CopyTo if !collection.finished => {
                collection.finished = true;
                Some(ComputeControllerResponse::CopyToResponse { id, response: CopyToResponse::Dropped })
            }
            CollectionKind::MaterializedView { target } => {
                // A dropped view's upper no longer moves: storage uppers of its target pass it by.
                if let Some(views) = self.materialized_views.get_mut(&target) {
                    views.retain(|view| *view != id);
                    if views.is_empty() {
                        self.materialized_views.remove(&target);
                    }
                }
                None
            }
            _ => None,
        };
        drop(shared);
        if let Some(response) = notify {
            self.outputs.push_back(InstanceOutput::Response(response));
        }
        self.introspect_dropped_collection(id);
    }

    /// Sets read policies. All ids must name live indexes, else nothing changes.
    pub fn set_read_policy(
        &mut self,
        policies: Vec<(GlobalId, ReadPolicy<T>)>,
    ) -> Result<(), ReadPolicyError> {
        let mut shared = lock(&self.shared);
        for (id, _) in &policies {
            match shared.holds.attachment(id) {
                Some(c) if !c.dropped && c.kind == CollectionKind::Index => {}
                Some(c) if !c.dropped => return Err(ReadPolicyError::WriteOnlyCollection(*id)),
                _ => return Err(ReadPolicyError::CollectionMissing(CollectionMissing(*id))),
            }
        }
        for (id, policy) in policies {
            let collection = shared.holds.attachment_mut(&id).expect("checked");
            collection.read_policy = policy;
            Self::apply_policy(collection);
        }
        drop(shared);
        self.process_holds();
        Ok(())
    }

    /// Moves the implied hold to where the collection's policy (or sink progress) allows, if that is
    /// forward.
    ///
    /// A sink that is done (a materialized view whose upper is closed, a subscribe whose stream ended)
    /// needs nothing more from its inputs: its implied hold is released, so with no caller holding it
    /// the sink compacts away and releases its import holds, without waiting for the user's drop.
    fn apply_policy(collection: &mut Collection<T>) {
        if collection.dropped {
            return;
        }
        let target = match collection.kind {
            CollectionKind::Index => collection.read_policy.frontier(collection.write_frontier.borrow()),
            CollectionKind::MaterializedView { .. } => step_back(&collection.write_frontier.borrow()),
            CollectionKind::Subscribe if collection.finished => Antichain::new(),
            CollectionKind::Subscribe => step_back(&collection.forwarded.borrow()),
            CollectionKind::CopyTo => return,
        };
        if target.is_empty() {
            if collection.kind != CollectionKind::Index {
                collection.implied_hold.release();
            }
            // A closed index under a lag policy may be compacted completely; the controller keeps its own
            // hold at the last readable time instead, so the index stays peekable.
            return;
        }
        if PartialOrder::less_equal(collection.implied_hold.since(), &target) {
            collection.implied_hold.try_downgrade(target).expect("moving forward");
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Peeks

    /// Starts an index peek ([`SharedState::prepare_peek`], then [`Self::install_peek`]); its result
    /// arrives as [`InstanceOutput::PeekResult`].
    pub fn peek(&mut self, request: PeekRequest<T>) -> Result<(), PeekError<T>> {
        let prepared = lock(&self.shared).prepare_peek(request)?;
        self.install_peek(prepared);
        Ok(())
    }

    /// Starts a prepared peek: sends it to its replicas (all, or its target) and waits for their answers.
    /// If its target replica was dropped after the peek was prepared (a `drop_replica` that was sent but
    /// not awaited), the peek fails at once as it would have had it come first.
    pub fn install_peek(&mut self, prepared: PreparedPeek<T>) {
        let PreparedPeek { peek, finishing, target_replica, timeout_ms, hold } = prepared;
        let (uuid, id) = (peek.uuid, peek.target.id());
        let target_gone = target_replica.filter(|replica| !self.replicas.contains_key(replica));
        let targets: BTreeSet<ReplicaId> = match target_replica {
            _ if target_gone.is_some() => BTreeSet::new(),
            Some(replica) => BTreeSet::from([replica]),
            None => self.replicas.keys().copied().collect(),
        };
        let command = ComputeCommand::Peek(peek);
        if target_replica.is_none() {
            self.history.push(&command).expect("peek ids are unique");
        }
        for replica in &targets {
            self.outputs.push_back(InstanceOutput::Command { replica: *replica, command: command.clone() });
        }
        let timeout_ms = timeout_ms.unwrap_or(self.config.default_peek_timeout_ms);
        self.max_peek_id = self.max_peek_id.max(Some(uuid));
        self.peeks.insert(
            uuid,
            PendingPeek {
                collection: id,
                hold: Some(hold),
                outstanding: targets,
                answered: false,
                finishing,
                target_replica,
                started_ms: self.now_ms,
                timeout_ms,
                deadline_ms: self.now_ms.saturating_add(timeout_ms),
            },
        );
        if let Some(replica) = target_gone {
            self.answer_peek(uuid, Err(PeekFailure::ReplicaDropped(replica)), None);
            self.maybe_finish_peek(uuid);
            self.process_holds();
        }
    }

    /// Cancels a pending peek: its caller gets [`PeekFailure::Canceled`] now; its hold stays until every
    /// replica answered (at the latest until the peek's deadline).
    ///
    /// An id never issued through the shared state ([`SharedState::was_issued`]) is
    /// [`PeekUnknown`](CancelPeekError::PeekUnknown); one that was issued and is no longer waiting for its
    /// answer (answered, failed, timed out or cancelled) is [`PeekFinished`](CancelPeekError::PeekFinished).
    pub fn cancel_peek(&mut self, uuid: PeekId) -> Result<(), CancelPeekError> {
        match self.peeks.get(&uuid) {
            Some(peek) if !peek.answered => {}
            Some(_) => return Err(CancelPeekError::PeekFinished(uuid)),
            None if lock(&self.shared).was_issued(uuid) => return Err(CancelPeekError::PeekFinished(uuid)),
            None => return Err(CancelPeekError::PeekUnknown(uuid)),
        }
        self.answer_peek(uuid, Err(PeekFailure::Canceled), None);
        self.maybe_finish_peek(uuid);
        Ok(())
    }

    /// What a replica's answer means for the peek's caller (rows still to be finished).
    fn peek_result(response: PeekResponse, replica: ReplicaId) -> PeekResult {
        match response {
            PeekResponse::Rows(rows) => Ok(rows),
            PeekResponse::Error(error) => Err(PeekFailure::Evaluation(error)),
            PeekResponse::Canceled => Err(PeekFailure::ReplicaCanceled(replica)),
            PeekResponse::ResultTooLarge { size_bytes, max_bytes } => {
                Err(PeekFailure::ResultTooLarge { size_bytes, max_bytes })
            }
        }
    }

    /// Delivers a peek's result (once) and cancels it on the replicas still working on it.
    fn answer_peek(&mut self, uuid: PeekId, result: PeekResult, replica: Option<ReplicaId>) {
        let peek = self.peeks.get_mut(&uuid).expect("answering a pending peek");
        assert!(!peek.answered, "peek {uuid} answered twice");
        peek.answered = true;
        let result = result.map(|rows| peek.finishing.finish(rows));
        let duration_ms = self.now_ms.saturating_sub(peek.started_ms);
        let outcome = PeekOutcome::of(&result);
        if peek.target_replica.is_none() {
            self.history.retire_peek(uuid);
        }
        let cancel: Vec<ReplicaId> =
            peek.outstanding.iter().copied().filter(|r| Some(*r) != replica).collect();
        for r in cancel {
            self.outputs.push_back(InstanceOutput::Command {
                replica: r,
                command: ComputeCommand::CancelPeek { uuid },
            });
        }
        self.outputs.push_back(InstanceOutput::PeekResult { uuid, result });
        self.outputs.push_back(InstanceOutput::Response(ComputeControllerResponse::PeekNotification(
            PeekNotification { uuid, instance: self.id, replica, outcome, duration_ms },
        )));
        if let Some(replica) = replica {
            let bucket = peek_duration_bucket_ms(duration_ms);
            let count = self.peek_histogram.entry((replica, bucket)).or_insert(0);
            *count += 1;
            let count = *count;
            self.introspection.set(
                IntrospectionKind::PeekDurations,
                &[
                    Datum::Text(&self.id.to_string()),
                    Datum::Text(&replica.to_string()),
                    Datum::Int64(bucket as i64),
                ],
                Some(&[Datum::Int64(count)]),
            );
        }
        #[cfg(feature = "planted-bug-early-peek-release")]
        {
            // The reference lineage's historical bug, planted on purpose for the simulator to find:
            // the hold goes with the first answer, while other replicas may still be reading.
            if let Some(peek) = self.peeks.get_mut(&uuid) {
                peek.hold = None;
            }
        }
    }

    /// Forgets a peek (releasing its hold) once it is answered and no replica owes an answer.
    fn maybe_finish_peek(&mut self, uuid: PeekId) {
        if let Some(peek) = self.peeks.get(&uuid)
            && peek.answered
            && peek.outstanding.is_empty()
        {
            self.peeks.remove(&uuid);
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Replica events

    /// Handles an event from a replica's client.
    pub fn handle_replica_event(&mut self, replica: ReplicaId, event: ReplicaEvent<T>) {
        if !self.replicas.contains_key(&replica) {
            debug!(%replica, "event from a dropped replica");
            return;
        }
        match event {
            ReplicaEvent::Status(status) => self.handle_status(replica, status),
            ReplicaEvent::Response(response) => {
                if let Some(metrics) = &mut self.metrics {
                    metrics.response(replica, &response);
                }
                self.handle_response(replica, response)
            }
        }
        self.process_holds();
    }

    fn handle_status(&mut self, replica: ReplicaId, status: ReplicaStatus) {
        let connected = matches!(status, ReplicaStatus::Hydrating | ReplicaStatus::Ready);
        let was_connected =
            std::mem::replace(&mut self.replicas.get_mut(&replica).expect("checked").connected, connected);
        if was_connected && !connected {
            // A new connection starts from scratch: frontiers reset, and dropped dataflows will not be
            // replayed, so there is nothing more to hear about them.
            // The next connection rebuilds from the replayed as-ofs, which are at least the current sinces:
            // re-anchor this replica's input holds there, so its inputs stay readable until it reports
            // progress again (its old holds may sit beyond where it will restart).
            for (_, collection) in lock(&self.shared).holds.attachments_mut() {
                let fresh: SmallVec<[ReadHold<GlobalId, T>; 1]> = collection.import_holds
                    [..collection.storage_imports]
                    .iter()
                    .map(ReadHold::clone_hold)
                    .collect();
                if let Some(state) = collection.per_replica.get_mut(&replica) {
                    state.write_frontier = None;
                    state.hydrated_at_ms = None;
                    state.input_holds = fresh;
                    if collection.dropped || collection.fully_compacted {
                        state.dropped = true;
                    }
                }
            }
            for id in self.collection_ids() {
                self.maybe_remove(id);
            }
            // It rehydrates everything on its next connection.
            self.reset_hydration_rows(replica);
            if let Some(metrics) = &mut self.metrics {
                metrics.replica_disconnected(replica);
            }
        }
        if connected && !was_connected {
            let state = self.replicas.get_mut(&replica).expect("checked");
            state.connections = state.connections.saturating_add(1);
            state.connected_ms = self.now_ms;
            if state.connections > 1
                && let Some(metrics) = &mut self.metrics
            {
                metrics.replica_reconnected(replica);
            }
            // The connection was replayed the client's history, which has every compaction sent: each
            // dataflow at its compacted as-of. The template catches up to it first.
            self.catch_up_history();
            self.replayed_as_ofs.retain(|(_, r), _| *r != replica);
            let replayed: Vec<(GlobalId, Antichain<T>)> = lock(&self.shared)
                .holds
                .attachments()
                .filter(|(_, c)| !c.dropped)
                .filter_map(|(id, c)| {
                    let as_of = self.history.replay_as_of(*id)?;
                    (as_of != c.as_of).then_some((*id, as_of))
                })
                .collect();
            for (id, as_of) in replayed {
                self.replayed_as_ofs.insert((id, replica), as_of);
            }
        }
        match &status {
            ReplicaStatus::Connecting { .. } => {
                self.set_replica_status_row(replica, ReplicaHealth::Connecting)
            }
            ReplicaStatus::Failed { reason, .. } => {
                self.set_replica_status_row(replica, ReplicaHealth::Failed { reason: reason.clone() })
            }
            ReplicaStatus::Fenced { epoch, current } => {
                let reason = format!("another controller holds the replica (epoch {current})");
                self.set_replica_status_row(replica, ReplicaHealth::Fenced { reason });
                warn!(%replica, %epoch, %current, "fenced by another controller: the replica is not served");
                self.outputs.push_back(InstanceOutput::Response(ComputeControllerResponse::ReplicaFenced {
                    instance: self.id,
                    replica,
                    epoch: *epoch,
                    current: *current,
                }));
            }
            // Whether it is hydrated is the core's own judgement (the hydration rows), not the client's.
            ReplicaStatus::Hydrating | ReplicaStatus::Ready => self.refresh_replica_status(replica),
        }
    }

    /// Writes the status row of a connected replica: `connected` once every live collection is hydrated
    /// on this connection, else `hydrating` (its first connection) or `rehydrating` (a later one). Does
    /// nothing for a replica that is not connected (its row says `connecting` or `failed`).
    fn refresh_replica_status(&mut self, replica: ReplicaId) {
        let Some(state) = self.replicas.get(&replica) else { return };
        if !state.connected {
            return;
        }
        let first_connection = state.connections <= 1;
        let all_hydrated = state.unhydrated == 0;
        let status = match (all_hydrated, first_connection) {
            (true, _) => ReplicaHealth::Connected,
            (false, true) => ReplicaHealth::Hydrating,
            (false, false) => ReplicaHealth::Rehydrating,
        };
        self.set_replica_status_row(replica, status);
    }

    /// Sets the hydration rows of `replica` to not hydrated, for every live collection (a new replica, or
    /// a lost connection: the replica's per-collection state was reset too).
    fn reset_hydration_rows(&mut self, replica: ReplicaId) {
        let live: Vec<GlobalId> =
            lock(&self.shared).holds.attachments().filter(|(_, c)| !c.dropped).map(|(id, _)| *id).collect();
        self.replicas.get_mut(&replica).expect("a replica of the instance").unhydrated = live.len();
        for id in live {
            self.introspection.set_for_collection(
                IntrospectionKind::Hydration,
                self.id,
                replica,
                id,
                Some(&[Datum::Bool(false), Datum::Null]),
            );
        }
    }

    /// Writes the introspection rows of newly created collections: not hydrated on any replica yet (and
    /// connected replicas are hydrating again until they are).
    fn introspect_new_collections(&mut self, ids: &[GlobalId]) {
        let replicas: Vec<ReplicaId> = self.replicas.keys().copied().collect();
        for replica in replicas {
            self.replicas.get_mut(&replica).expect("listed").unhydrated += ids.len();
            for id in ids {
                self.introspection.set_for_collection(
                    IntrospectionKind::Hydration,
                    self.id,
                    replica,
                    *id,
                    Some(&[Datum::Bool(false), Datum::Null]),
                );
            }
            self.refresh_replica_status(replica);
        }
    }

    /// Removes every per-collection introspection row of collection `id` (dropped by the user: it is gone
    /// for readers, even while its state waits for holds and replicas); replicas that waited only for it
    /// are now hydrated.
    fn introspect_dropped_collection(&mut self, id: GlobalId) {
        let unhydrated: Vec<ReplicaId> = lock(&self.shared)
            .holds
            .attachment(&id)
            .map(|c| {
                c.per_replica.iter().filter(|(_, s)| s.hydrated_at_ms.is_none()).map(|(r, _)| *r).collect()
            })
            .unwrap_or_default();
        for replica in unhydrated {
            if let Some(state) = self.replicas.get_mut(&replica) {
                state.unhydrated -= 1;
            }
        }
        let replicas: Vec<ReplicaId> = self.replicas.keys().copied().collect();
        for replica in replicas {
            for kind in
                [IntrospectionKind::Frontiers, IntrospectionKind::Hydration, IntrospectionKind::WallclockLag]
            {
                self.introspection.set_for_collection(kind, self.id, replica, id, None);
            }
            self.refresh_replica_status(replica);
        }
        self.introspection.remove_lag_history(id);
        self.lag_minute.max_lag_ms.retain(|(c, _), _| *c != id);
        if let Some(metrics) = &mut self.metrics {
            metrics.collection_dropped(id);
            if let Some(collection) = lock(&self.shared).holds.attachment_mut(&id) {
                collection.lag_series = None;
            }
        }
    }

    fn set_replica_status_row(&mut self, replica: ReplicaId, health: ReplicaHealth) {
        let reason = match &health {
            ReplicaHealth::Failed { reason } | ReplicaHealth::Fenced { reason } => Datum::Text(reason),
            _ => Datum::Null,
        };
        self.introspection.set(
            IntrospectionKind::ReplicaStatus,
            &[Datum::Text(&self.id.to_string()), Datum::Text(&replica.to_string())],
            Some(&[Datum::Text(health.name()), reason]),
        );
        if let Some(metrics) = &mut self.metrics {
            metrics.replica_status(replica, &health);
        }
        if let Some(state) = self.replicas.get_mut(&replica) {
            state.health = health;
        }
    }

    fn handle_response(&mut self, replica: ReplicaId, response: ComputeResponse<T>) {
        match response {
            ComputeResponse::Frontiers { id, frontiers } => self.handle_frontiers(replica, id, frontiers),
            ComputeResponse::PeekResponse { uuid, response } => {
                self.handle_peek_response(replica, uuid, response)
            }
            ComputeResponse::SubscribeResponse { id, response } => {
                self.handle_subscribe(replica, id, response)
            }
            ComputeResponse::CopyToResponse { id, response } => self.handle_copy_to(id, response),
            ComputeResponse::Status(StatusResponse::Failed { id, error }) => {
                self.handle_export_failed(replica, id, error)
            }
            ComputeResponse::Status(status @ StatusResponse::Hydration { .. }) => {
                debug!(%replica, ?status, "replica status")
            }
            ComputeResponse::CommandRejected { command, reason } => {
                // The replica keeps serving everything else, and a reconnect would replay the same
                // command: it stays connected, and the user hears of it.
                warn!(%replica, %command, %reason, "replica rejected a command the controller sent");
                self.outputs.push_back(InstanceOutput::Response(
                    ComputeControllerResponse::CommandRejected {
                        instance: self.id,
                        replica,
                        command,
                        reason,
                    },
                ));
            }
            ComputeResponse::Hello { .. }
            | ComputeResponse::HelloRefused { .. }
            | ComputeResponse::Fenced { .. } => {
                self.disconnect(replica, "handshake response outside the handshake".to_string());
            }
        }
    }

    /// A replica says export `id` can make no more progress there, for a reason a reconnect would not
    /// cure: the replica stays, and the user hears of it (unless the export was dropped meanwhile).
    fn handle_export_failed(&mut self, replica: ReplicaId, id: GlobalId, error: String) {
        let live = lock(&self.shared).holds.attachment(&id).is_some_and(|c| !c.dropped);
        if !live {
            debug!(%replica, %id, %error, "failure of a dropped export");
            return;
        }
        warn!(%replica, %id, %error, "an export can make no more progress on a replica");
        self.outputs.push_back(InstanceOutput::Response(ComputeControllerResponse::ExportFailed {
            instance: self.id,
            replica,
            id,
            error,
        }));
    }

    fn disconnect(&mut self, replica: ReplicaId, reason: String) {
        warn!(%replica, %reason, "faulty replica: disconnecting it");
        self.outputs.push_back(InstanceOutput::DisconnectReplica { replica, reason });
    }

    fn handle_frontiers(&mut self, replica: ReplicaId, id: GlobalId, frontiers: FrontiersResponse<T>) {
        let mut shared = lock(&self.shared);
        let Some((since, collection)) = shared.holds.since_and_attachment_mut(&id) else {
            // A collection removed after every connected replica reported it dropped; late news.
            debug!(%replica, collection = %id, "frontiers of a removed collection");
            return;
        };
        // Every cache line of the entry that this update reads is a miss at 10,000 collections. One
        // word of each is read now, before the next atomic operation (a hold's downgrade takes its
        // issuer's lock, and a locked instruction waits for every load before it): the misses overlap
        // instead of following one another across the locks below.
        std::hint::black_box((
            since.len(),
            std::mem::discriminant(&collection.read_policy),
            collection.implied_hold.since().len(),
            collection.import_holds.first().map(|h| h.since().len()),
            collection.per_replica.get(&replica).map(|s| s.input_holds.first().map(|h| h.since().len())),
        ));
        let Some(new) = frontiers.write_frontier else { return };
        let Some(state) = collection.per_replica.get_mut(&replica) else { return };
        if let Some(old) = &state.write_frontier
            && !PartialOrder::less_equal(old, &new)
        {
            let reason = format!("write frontier of {id} regressed from {old:?} to {new:?}");
            // The replica reconnects and reports afresh.
            state.write_frontier = None;
            drop(shared);
            self.disconnect(replica, reason);
            return;
        }
        state.write_frontier = Some(new.clone());
        if !state.frontier_row_stale {
            state.frontier_row_stale = true;
            self.stale_frontier_rows.push((id, replica));
        }
        for hold in &mut state.input_holds {
            // Only forward; a reconnected replica restarting lower keeps its hold where it was.
            let _ = hold.try_downgrade(new.clone());
        }
        if new.is_empty() && collection.dropped {
            state.dropped = true;
        }
        // Hydrated once past the as-of this connection was given (later than the original after a replay
        // of a compacted collection).
        let hydrated_now = state.hydrated_at_ms.is_none()
            && self
                .replayed_as_ofs
                .get(&(id, replica))
                .unwrap_or(&collection.as_of)
                .iter()
                .all(|t| !new.less_equal(t));
        if hydrated_now {
            state.hydrated_at_ms = Some(self.now_ms);
            self.replayed_as_ofs.remove(&(id, replica));
        }
        // Hydration on this connection counts from when both the collection and the connection existed.
        let hydration_ms = hydrated_now.then(|| {
            let connected_ms = self.replicas.get(&replica).map_or(0, |r| r.connected_ms);
            self.now_ms.saturating_sub(collection.created_ms.max(connected_ms))
        });
        // A materialized view that follows its target's storage upper takes no progress from replicas (a
        // flag in the entry, read with `dropped`: no extra work for other collections).
        if !collection.upper_from_storage && !collection.dropped {
            Self::advance_upper(&mut self.outputs, self.id, id, collection, &new);
        }
        let dropped = collection.dropped;
        drop(shared);
        if hydrated_now && !dropped {
            if let Some(state) = self.replicas.get_mut(&replica) {
                state.unhydrated -= 1;
            }
            if let (Some(metrics), Some(ms)) = (&mut self.metrics, hydration_ms) {
                metrics.hydrated(id, replica, ms);
            }
            self.introspection.set_for_collection(
                IntrospectionKind::Hydration,
                self.id,
                replica,
                id,
                Some(&[
                    Datum::Bool(true),
                    hydration_ms.map(|ms| Datum::Int64(ms as i64)).unwrap_or(Datum::Null),
                ]),
            );
            self.refresh_replica_status(replica);
        }
        if dropped {
            self.maybe_remove(id);
        }
    }

    fn handle_peek_response(&mut self, replica: ReplicaId, uuid: PeekId, response: PeekResponse) {
        let Some(peek) = self.peeks.get_mut(&uuid) else {
            if self.max_peek_id.is_none_or(|max| uuid > max) {
                self.disconnect(replica, format!("answer to peek {uuid}, which was never sent"));
            } else {
                debug!(%replica, %uuid, "answer to a finished peek");
            }
            return;
        };
        if !peek.outstanding.remove(&replica) {
            debug!(%replica, %uuid, "answer from a replica that owes none");
            return;
        }
        if !peek.answered {
            self.answer_peek(uuid, Self::peek_result(response, replica), Some(replica));
        }
        self.maybe_finish_peek(uuid);
    }

    fn handle_subscribe(&mut self, replica: ReplicaId, id: GlobalId, response: SubscribeResponse<T>) {
        let mut shared = lock(&self.shared);
        let Some(collection) = shared.holds.attachment_mut(&id) else { return };
        if collection.kind != CollectionKind::Subscribe || collection.finished {
            return;
        }
        let SubscribeResponse::Batch(batch) = response else {
            // The controller announces DroppedAt itself, once, when the user drops the subscribe.
            return;
        };
        if PartialOrder::less_equal(&batch.upper, &collection.forwarded) {
            return; // Nothing new.
        }
        if !PartialOrder::less_equal(&batch.lower, &collection.forwarded) {
            // A replica starts a subscribe at most at its replayed as-of, which the subscribe's hold keeps
            // at or before what was forwarded: a batch beyond it skipped updates. The replica is faulty;
            // it reconnects and starts again, and the other replicas keep the stream going meanwhile.
            let reason = format!(
                "subscribe batch of {id} starts at {:?}, beyond {:?} forwarded",
                batch.lower, collection.forwarded
            );
            drop(shared);
            self.disconnect(replica, reason);
            return;
        }
        // A subscribe with an `until` ends there: nothing at or beyond it is delivered, and the batch
        // that reaches it closes the stream (upper `[]`), whatever the replica computes past it.
        let until = &collection.until;
        let upper = if !until.is_empty() && PartialOrder::less_equal(until, &batch.upper) {
            Antichain::new()
        } else {
            batch.upper
        };
        let lower = std::mem::replace(&mut collection.forwarded, upper.clone());
        let updates = match batch.updates {
            Ok(updates) => Ok(updates
                .into_iter()
                .filter(|(t, _, _)| lower.less_equal(t) && !until.less_equal(t))
                .collect()),
            Err(error) => {
                collection.finished = true;
                Err(error)
            }
        };
        if collection.forwarded.is_empty() {
            collection.finished = true;
        }
        self.outputs.push_back(InstanceOutput::Response(ComputeControllerResponse::SubscribeResponse {
            id,
            response: SubscribeResponse::Batch(SubscribeBatch { lower, upper, updates }),
        }));
        if collection.finished {
            // The stream is closed (its end, an `until`, an error): the subscribe will write nothing
            // more, so its upper is the empty frontier, whatever the replicas report from now on.
            Self::advance_upper(&mut self.outputs, self.id, id, collection, &Antichain::new());
        }
        Self::apply_policy(collection);
    }

    fn handle_copy_to(&mut self, id: GlobalId, response: CopyToResponse) {
        let mut shared = lock(&self.shared);
        let Some(collection) = shared.holds.attachment_mut(&id) else { return };
        if collection.kind != CollectionKind::CopyTo || collection.finished || collection.dropped {
            return;
        }
        collection.finished = true;
        drop(shared);
        self.outputs
            .push_back(InstanceOutput::Response(ComputeControllerResponse::CopyToResponse { id, response }));
        // A copy-to is one-shot: once answered it goes away.
        self.drop_collection(id);
    }

    // ---------------------------------------------------------------------------------------------
    // Storage uppers

    /// Storage collection `id` has durably written everything before `upper`. Every live materialized
    /// view writing into `id` takes it as its upper from now on (see the module documentation), its since
    /// following one step behind. Storage uppers only advance: an upper that is not beyond the last one
    /// fed for `id` is ignored. For a collection no view writes into this costs two map lookups and
    /// remembers the upper, for views created later.
    pub fn storage_upper(&mut self, id: GlobalId, upper: Antichain<T>) {
        if let Some(known) = self.storage_uppers.get(&id) {
            if !PartialOrder::less_equal(known, &upper) {
                debug!(collection = %id, ?known, ?upper, "storage upper regressed; ignored");
                return;
            }
            if *known == upper {
                return;
            }
        }
        self.storage_uppers.insert(id, upper.clone());
        let Some(views) = self.materialized_views.get(&id) else { return };
        let mut shared = lock(&self.shared);
        for view in views {
            let Some(collection) = shared.holds.attachment_mut(view) else { continue };
            debug_assert!(!collection.dropped, "dropped views are not listed");
            collection.upper_from_storage = true;
            Self::advance_upper(&mut self.outputs, self.id, *view, collection, &upper);
        }
        drop(shared);
        self.process_holds();
    }

    /// Joins `new` into live collection `id`'s upper, moves its implied hold by its read policy and
    /// announces the new upper; nothing happens unless `new` is beyond the upper. (An associated function
    /// of the fields it needs, so that it runs while the shared state is locked.)
    fn advance_upper(
        outputs: &mut VecDeque<InstanceOutput<T>>,
        instance: InstanceId,
        id: GlobalId,
        collection: &mut Collection<T>,
        new: &Antichain<T>,
    ) {
        if PartialOrder::less_equal(new, &collection.write_frontier) {
            return;
        }
        collection.write_frontier =
            frontiers::antichain::join(&collection.write_frontier.borrow(), &new.borrow());
        Self::apply_policy(collection);
        let upper = collection.write_frontier.clone();
        outputs.push_back(InstanceOutput::Response(ComputeControllerResponse::FrontierUpper {
            instance,
            id,
            upper,
        }));
    }

    /// Storage collection `id` was dropped: forgets its upper. Views writing into it keep theirs.
    pub fn storage_collection_dropped(&mut self, id: GlobalId) {
        self.storage_uppers.remove(&id);
    }

    // ---------------------------------------------------------------------------------------------
    // Time and holds

    /// Moves the core's clock forward without running timers: cheap, for before each input.
    pub fn advance_clock(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// Advances the core's clock: peek timeouts and wall-clock lag introspection.
    pub fn tick(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.expire_peeks();
        if self.now_ms.saturating_sub(self.last_lag_refresh_ms) >= self.config.introspection_interval_ms {
            self.last_lag_refresh_ms = self.now_ms;
            self.refresh_frontier_rows();
            self.refresh_wallclock_lag();
            self.catch_up_history();
        }
        self.process_holds();
        self.refresh_metrics();
    }

    /// Sets the metrics' instance and replica gauges and flushes their tallies (every tick: cheap, a
    /// handful of values per replica).
    fn refresh_metrics(&mut self) {
        let Some(metrics) = &mut self.metrics else { return };
        for (replica, state) in &self.replicas {
            metrics.unhydrated(*replica, state.unhydrated);
        }
        let collections = lock(&self.shared).len();
        metrics.refresh(InstanceGauges {
            pending_peeks: self.peeks.len(),
            history_commands: self.history.len(),
            collections,
        });
    }

    /// Ends every peek whose deadline passed: an unanswered one fails with `TimedOut` (its replicas are
    /// told to cancel it), and no peek waits any longer for replicas that still owe an answer, so its
    /// hold goes now. A late answer is then ignored like any answer to a finished peek.
    fn expire_peeks(&mut self) {
        let expired: Vec<PeekId> =
            self.peeks.iter().filter(|(_, p)| p.deadline_ms <= self.now_ms).map(|(uuid, _)| *uuid).collect();
        for uuid in expired {
            let peek = self.peeks.get_mut(&uuid).expect("listed");
            if !peek.answered {
                let after_ms = peek.timeout_ms;
                self.answer_peek(uuid, Err(PeekFailure::TimedOut { after_ms }), None);
            }
            let peek = self.peeks.get_mut(&uuid).expect("still pending");
            if !peek.outstanding.is_empty() {
                let outstanding = &peek.outstanding;
                debug!(%uuid, ?outstanding, "peek deadline passed; no longer waiting for replicas");
                peek.outstanding.clear();
            }
            self.maybe_finish_peek(uuid);
        }
    }

    /// Writes the frontier introspection row of every (collection, replica) whose write frontier changed
    /// since the last refresh. Once per introspection interval rather than on every report: a frontier
    /// report then costs no introspection work (and storage gets one row change per interval, not one per
    /// report), whatever the number of collections.
    fn refresh_frontier_rows(&mut self) {
        // The rows are packed after the lock is let go: readers of the shared state wait only for the
        // frontiers to be read out.
        let mut rows = Vec::with_capacity(self.stale_frontier_rows.len());
        let mut shared = lock(&self.shared);
        for (id, replica) in std::mem::take(&mut self.stale_frontier_rows) {
            let Some(collection) = shared.holds.attachment_mut(&id) else { continue };
            let dropped = collection.dropped;
            let Some(state) = collection.per_replica.get_mut(&replica) else { continue };
            state.frontier_row_stale = false;
            // A dropped collection's rows are gone (see `introspect_dropped_collection`).
            let Some(frontier) = state.write_frontier.as_ref().filter(|_| !dropped) else { continue };
            rows.push((id, replica, frontier.elements().first().map(|t| t.to_wallclock_ms())));
        }
        drop(shared);
        for (id, replica, frontier_ms) in rows {
            let frontier = frontier_ms.map(Datum::Timestamp).unwrap_or(Datum::Null);
            self.introspection.set_for_collection(
                IntrospectionKind::Frontiers,
                self.id,
                replica,
                id,
                Some(&[frontier]),
            );
        }
    }

    /// Writes the wall-clock lag row of every (live collection, replica) with a write frontier on the
    /// current connection: the clock minus the upper, rounded down to whole seconds (0 once closed). Keeps
    /// the largest lag of the minute for `compute_wallclock_lag_history` and writes the last minute's once
    /// a new one began. With metrics, observes each live collection's lag (of its upper, the join over
    /// replicas) and counts its subscribes and holds, in the same walk.
    fn refresh_wallclock_lag(&mut self) {
        // Read out under the lock, packed into rows after it (see `refresh_frontier_rows`).
        let mut lags = Vec::new();
        let mut counts = CollectionCounts::default();
        let now_ms = self.now_ms;
        let lag_of = |frontier: &Antichain<T>| match frontier.elements().first() {
            Some(upper) => now_ms.saturating_sub(upper.to_wallclock_ms()),
            None => 0,
        };
        let metrics = self.metrics.as_ref();
        for (id, collection) in lock(&self.shared).holds.attachments_mut() {
            counts.import_holds += collection.import_holds.len();
            if collection.dropped {
                continue;
            }
            if collection.kind == CollectionKind::Subscribe && !collection.finished {
                counts.subscribes += 1;
            }
            if let Some(metrics) = metrics
                && !collection.write_frontier.is_empty()
            {
                let series = collection.lag_series.get_or_insert_with(|| metrics.lag_series(*id));
                series.observe(lag_of(&collection.write_frontier));
            }
            for (replica, state) in collection.per_replica.iter() {
                counts.replica_input_holds += state.input_holds.len();
                let Some(frontier) = &state.write_frontier else { continue };
                lags.push((*id, *replica, lag_of(frontier)));
            }
        }
        counts.peek_holds = self.peeks.values().filter(|p| p.hold.is_some()).count();
        let minute_ms = self.now_ms - self.now_ms % MINUTE_MS;
        if minute_ms > self.lag_minute.start_ms {
            self.close_lag_minute(minute_ms);
        }
        for (id, replica, lag_ms) in lags {
            let max = self.lag_minute.max_lag_ms.entry((id, replica)).or_insert(0);
            *max = (*max).max(lag_ms);
            self.introspection.set_for_collection(
                IntrospectionKind::WallclockLag,
                self.id,
                replica,
                id,
                Some(&[Datum::Int64((lag_ms / 1_000 * 1_000) as i64)]),
            );
        }
        if let Some(metrics) = &mut self.metrics {
            metrics.collection_counts(counts);
        }
    }

    /// Writes the lag history rows of the minute that ended, starts the minute beginning at `minute_ms`,
    /// and retracts the rows older than the instance keeps.
    fn close_lag_minute(&mut self, minute_ms: u64) {
        assert!(minute_ms > self.lag_minute.start_ms, "minutes only move forward");
        let ended = std::mem::replace(
            &mut self.lag_minute,
            LagMinute { start_ms: minute_ms, max_lag_ms: BTreeMap::new() },
        );
        for ((id, replica), max_lag_ms) in ended.max_lag_ms {
            self.introspection.set_lag_history(self.id, replica, id, ended.start_ms, max_lag_ms);
        }
        let kept_ms = self.config.wallclock_lag_history_minutes.saturating_mul(MINUTE_MS);
        self.introspection.expire_lag_history(minute_ms.saturating_sub(kept_ms));
    }

    /// Applies hold changes (from inside and outside the core) until nothing moves: sends
    /// `AllowCompaction` for every since that advanced and walks the compaction chain down the imports.
    pub fn process_holds(&mut self) {
        loop {
            let mut shared = lock(&self.shared);
            let changes = shared.holds.process();
            if changes.is_empty() {
                return;
            }
            // Collections compacted to the empty frontier, which may now go away.
            let mut closed = Vec::new();
            for SinceChange { id, new, .. } in changes {
                let Some(collection) = shared.holds.attachment_mut(&id) else { continue };
                for hold in &mut collection.import_holds {
                    hold.try_downgrade(new.clone()).expect("import holds never run ahead of the since");
                }
                let last = new.is_empty();
                collection.fully_compacted = last;
                let newly_behind = !last && !collection.history_behind;
                // The last compaction may remove the dataflow from the history: that is recorded now.
                collection.history_behind = !last;
                let command = ComputeCommand::AllowCompaction { id, frontier: new };
                if last {
                    self.history.push(&command).expect("the controller's commands are recordable");
                    closed.push(id);
                } else if newly_behind {
                    self.history_behind.push(id);
                }
                send_to_replicas(&self.replicas, &mut self.outputs, command);
            }
            drop(shared);
            for id in closed {
                self.maybe_remove(id);
            }
        }
    }

    /// Records in the history the since of every collection it is behind on.
    fn catch_up_history(&mut self) {
        let mut shared = lock(&self.shared);
        for id in std::mem::take(&mut self.history_behind) {
            let Some((since, collection)) = shared.holds.since_and_attachment_mut(&id) else { continue };
            if !collection.history_behind {
                continue;
            }
            collection.history_behind = false;
            let command = ComputeCommand::AllowCompaction { id, frontier: since.to_owned() };
            self.history.push(&command).expect("the controller's compactions are recordable");
        }
    }

    /// Removes a dropped collection once nothing holds it and no connected replica can still report on it.
    fn maybe_remove(&mut self, id: GlobalId) {
        let mut shared = lock(&self.shared);
        let Some((since, collection)) = shared.holds.since_and_attachment(&id) else { return };
        if !collection.dropped || !since.is_empty() || !collection.per_replica.values().all(|s| s.dropped) {
            return;
        }
        // Nothing holds it any more; its own holds on its imports go with its state.
        shared.holds.remove(&id);
        drop(shared);
        self.replayed_as_ofs.retain(|(collection, _), _| *collection != id);
        // Its introspection rows went when it was dropped (`introspect_dropped_collection`), and none is
        // written for a dropped collection since.
    }

    fn broadcast(&mut self, command: ComputeCommand<T>) {
        self.history.push(&command).expect("the controller's commands are recordable");
        send_to_replicas(&self.replicas, &mut self.outputs, command);
    }

    // ---------------------------------------------------------------------------------------------
    // Read-only views (for the shell, tests and the simulator)

    /// Whether `id` names a live (not dropped) collection.
    pub fn contains_collection(&self, id: GlobalId) -> bool {
        lock(&self.shared).is_live(id)
    }

    /// The kind of a live collection.
    pub fn collection_kind(&self, id: GlobalId) -> Option<CollectionKind> {
        lock(&self.shared).holds.attachment(&id).filter(|c| !c.dropped).map(|c| c.kind.clone())
    }

    /// The type of a live collection's rows.
    pub fn collection_type(&self, id: GlobalId) -> Option<RelationType> {
        lock(&self.shared).holds.attachment(&id).filter(|c| !c.dropped).map(|c| c.typ.clone())
    }

    /// The since and upper of a collection (live or dropped but not yet removed).
    pub fn collection_frontiers(&self, id: GlobalId) -> Option<CollectionFrontiers<T>> {
        let shared = lock(&self.shared);
        let (since, collection) = shared.holds.since_and_attachment(&id)?;
        Some(collection.frontiers(since))
    }

    /// A replica's status, as its `compute_replica_status` row says; `None` for a replica the instance
    /// does not have.
    pub fn replica_health(&self, replica: ReplicaId) -> Option<&ReplicaHealth> {
        self.replicas.get(&replica).map(|r| &r.health)
    }

    /// Every replica's status, by replica.
    pub fn replica_healths(&self) -> Vec<(ReplicaId, ReplicaHealth)> {
        self.replicas.iter().map(|(id, r)| (*id, r.health.clone())).collect()
    }

    /// The hydration of live collection `id` on every replica, by replica ([`ReplicaHydration`]); `None`
    /// if `id` is not a live collection.
    pub fn hydration_status(&self, id: GlobalId) -> Option<Vec<ReplicaHydration>> {
        let shared = lock(&self.shared);
        let collection = shared.holds.attachment(&id).filter(|c| !c.dropped)?;
        let statuses = collection
            .per_replica
            .iter()
            .map(|(replica, state)| {
                let connection = self.replicas.get(replica).filter(|r| r.connected);
                let since_ms = connection.map(|r| r.connected_ms.max(collection.created_ms));
                ReplicaHydration {
                    replica: *replica,
                    hydrated: state.hydrated_at_ms.is_some(),
                    hydrating_since_ms: since_ms,
                    hydrated_at_ms: state.hydrated_at_ms,
                    hydration_time_ms: state
                        .hydrated_at_ms
                        .zip(since_ms)
                        .map(|(at, since)| at.saturating_sub(since)),
                }
            })
            .collect();
        Some(statuses)
    }

    /// The wall-clock lag of live collection `id` on every replica, now and per minute, by replica
    /// ([`ReplicaLag`]); `None` if `id` is not a live collection. "Now" is the core's clock.
    pub fn wallclock_lag(&self, id: GlobalId) -> Option<Vec<ReplicaLag>> {
        let shared = lock(&self.shared);
        let collection = shared.holds.attachment(&id).filter(|c| !c.dropped)?;
        let mut lags: Vec<ReplicaLag> = collection
            .per_replica
            .iter()
            .map(|(replica, state)| ReplicaLag {
                replica: *replica,
                lag_ms: state.write_frontier.as_ref().map(|f| match f.elements().first() {
                    Some(upper) => self.now_ms.saturating_sub(upper.to_wallclock_ms()),
                    None => 0,
                }),
                history: Vec::new(),
                current_minute: self
                    .lag_minute
                    .max_lag_ms
                    .get(&(id, *replica))
                    .map(|max| LagMinuteMax { minute_ms: self.lag_minute.start_ms, max_lag_ms: *max }),
            })
            .collect();
        drop(shared);
        for (replica, minute_ms, max_lag_ms) in self.introspection.lag_history(id) {
            if let Some(lag) = lags.iter_mut().find(|l| l.replica == replica) {
                lag.history.push(LagMinuteMax { minute_ms, max_lag_ms });
            }
        }
        Some(lags)
    }

    /// A replica's write frontier for a collection, as reported on its current connection.
    pub fn replica_write_frontier(&self, replica: ReplicaId, id: GlobalId) -> Option<Antichain<T>> {
        lock(&self.shared).holds.attachment(&id)?.per_replica.get(&replica)?.write_frontier.clone()
    }

    /// The collections replicas should have installed: those not yet compacted to the empty frontier
    /// (live ones, and dropped ones that something still holds).
    pub fn uncompacted_collections(&self) -> BTreeSet<GlobalId> {
        let shared = lock(&self.shared);
        shared
            .holds
            .ids()
            .filter(|id| shared.holds.since(id).is_some_and(|s| !s.is_empty()))
            .copied()
            .collect()
    }

    /// The ids of every collection with state, in insertion order.
    fn collection_ids(&self) -> Vec<GlobalId> {
        lock(&self.shared).holds.attachments().map(|(id, _)| *id).collect()
    }

    /// A one-line description of a collection's holds and per-replica state, for diagnostics.
    pub fn describe_collection(&self, id: GlobalId) -> String {
        let shared = lock(&self.shared);
        let Some((since, c)) = shared.holds.since_and_attachment(&id) else {
            return format!("{id}: no state");
        };
        let imports: Vec<String> =
            c.import_holds.iter().map(|h| format!("{}@{:?}", h.id(), h.since().elements())).collect();
        let replicas: Vec<String> = c
            .per_replica
            .iter()
            .map(|(r, s)| {
                let holds: Vec<String> =
                    s.input_holds.iter().map(|h| format!("{}@{:?}", h.id(), h.since().elements())).collect();
                format!(
                    "{r}: frontier {:?} holds {holds:?}",
                    s.write_frontier.as_ref().map(|f| f.elements().to_vec())
                )
            })
            .collect();
        format!(
            "{id}: since {:?} upper {:?} dropped {} imports {imports:?} replicas {replicas:?}",
            since.iter().collect::<Vec<_>>(),
            c.write_frontier.elements(),
            c.dropped
        )
    }

    /// The number of collections with state (live or waiting to be removed).
    pub fn collection_count(&self) -> usize {
        lock(&self.shared).len()
    }

    /// The number of pending peeks (answered or not, while some replica owes an answer).
    pub fn pending_peek_count(&self) -> usize {
        self.peeks.len()
    }

    /// The length of the history a new replica would be replayed (brought up to date first).
    pub fn history_len(&mut self) -> usize {
        self.catch_up_history();
        self.history.len()
    }

    /// The time of each pending peek's hold, if it still has one.
    pub fn peek_holds(&self) -> Vec<(PeekId, GlobalId, Option<Antichain<T>>, usize)> {
        self.peeks
            .iter()
            .map(|(uuid, p)| {
                (*uuid, p.collection, p.hold.as_ref().map(|h| h.since().clone()), p.outstanding.len())
            })
            .collect()
    }

    /// Checks DESIGN §5's invariants 2–4 on the current state (invariant 1 is asserted on every change by
    /// the hold accounting). Returns a description of the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let shared = lock(&self.shared);
        for (id, collection) in shared.holds.attachments() {
            let since = shared.holds.since(id).expect("every entry has a since").to_owned();
            for hold in &collection.import_holds {
                if !PartialOrder::less_equal(hold.since(), &since) {
                    return Err(format!(
                        "{id}: import hold on {} at {:?} is ahead of the since {since:?}",
                        hold.id(),
                        hold.since(),
                    ));
                }
                if let Some(import_since) = shared.holds.since(hold.id())
                    && !hold.is_released()
                    && !PartialOrder::less_equal(&import_since.to_owned(), hold.since())
                {
                    return Err(format!(
                        "{id}: import {} has since {import_since:?} beyond its hold",
                        hold.id()
                    ));
                }
            }
        }
        for (uuid, peek) in &self.peeks {
            if peek.outstanding.is_empty() && peek.answered {
                return Err(format!("peek {uuid} finished but still pending"));
            }
            if !peek.outstanding.is_empty() && peek.hold.is_none() {
                return Err(format!(
                    "peek {uuid} released its hold while {} replicas owe an answer",
                    peek.outstanding.len()
                ));
            }
            if let Some(hold) = &peek.hold
                && let Some(since) = shared.holds.since(&peek.collection)
                && !PartialOrder::less_equal(&since.to_owned(), hold.since())
            {
                return Err(format!(
                    "peek {uuid}: since {since:?} of {} passed the peek's hold",
                    peek.collection
                ));
            }
        }
        for (replica, state) in &self.replicas {
            let unhydrated = shared
                .holds
                .attachments()
                .filter(|(_, c)| !c.dropped)
                .filter(|(_, c)| c.per_replica.get(replica).is_some_and(|s| s.hydrated_at_ms.is_none()))
                .count();
            if unhydrated != state.unhydrated {
                return Err(format!(
                    "replica {replica}: {unhydrated} live collections are not hydrated, counted {}",
                    state.unhydrated
                ));
            }
        }
        Ok(())
    }
}

/// Sends a command to every replica without recording it (the caller records it, or has it caught up
/// later). A function of the two fields rather than a method, so that it can run while the shared state
/// is locked.
fn send_to_replicas<T: Timestamp>(
    replicas: &BTreeMap<ReplicaId, Replica>,
    outputs: &mut VecDeque<InstanceOutput<T>>,
    command: ComputeCommand<T>,
) {
    for replica in replicas.keys() {
        outputs.push_back(InstanceOutput::Command { replica: *replica, command: command.clone() });
    }
}
