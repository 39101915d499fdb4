//! The simulated storage: the shard engine's pure state machine over an in-memory blob store and
//! consensus that the world owns, with injected faults.
//!
//! **What this is.** Every table is a shard as in `storage::shard` (DESIGN §9): its state
//! ([`ShardState`]) is stored, encoded, as versions of a consensus key, changed only by compare-and-set
//! of the version the **unmodified** pure transitions compute (append with its idempotency token, reader
//! registration, heartbeats, lease expiry, compaction merges, garbage collection); its data lives in blob
//! parts written and checksummed by `storage::shard::part`, or, for a small append (per seed: never, up to
//! 512 bytes, or up to 4 KiB), inline in the state, as the engine carries them. What the shell around those transitions does
//! in the real engine (`storage::shard::machine`, async over tokio) is done here, synchronously, by the
//! world's steps: the table writer's retry loop, each client's one registered reader at the meet of its
//! holds, and the background maintenance. Reads decode the parts of the current head.
//!
//! **Faults** (all from the seed): outages of the consensus or of the blob store (every call fails until
//! the outage ends: appends and reads stall, holds covered by a registered reader are still granted, new
//! ones are not); *lost replies* (a compare-and-set reports an indeterminate failure, and was applied or
//! not with equal chance: the writer must find out from its idempotency token, never append twice); and
//! latency (each append attempt waits some milliseconds). Model processes that crash stop heartbeating:
//! their leased readers expire and stop holding back compaction.
//!
//! **The checks it enables.** The world keeps its own ledger of what the writer had acknowledged and
//! compares it, after every acknowledged append, with what storage holds ([`SimStorage::contents`], read
//! from the blob and inline parts the head references): an append applied twice or lost is a
//! [`storage-contents`](super::Invariant::StorageContents) violation. The ledger shares no code with the
//! engine. [`SimStorage::held`] and [`SimStorage::observe`] give the world what each client holds and
//! the shard's since, for the hold check.
//!
//! **What this is not.** Not the real engine's shell: the async retry loop, listen pollers and caches of
//! `ShardCollections` run only in the real stack (`real.rs`, `sim cluster`, the storage crate's tests).
//! There is one writer (the world's tables), so compare-and-set never loses a race here.
//!
//! **Tests.** Through the world (`tests/it/main.rs`: lost replies and outages survived with no
//! violation, a writer that re-appends after a lost reply caught by the contents check).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use frontiers::{Antichain, ChangeBatch, MutableAntichain, PartialOrder, ReadHold, ReadPolicy};
use protocol::{Diff, GlobalId, RelationDesc, Row};
use storage::shard::part::{
    Update, consolidate_run, decode_part, encode_part, inline_part_ref, merge_runs, part_ref, split_run,
};
use storage::shard::state::{
    AppendInput, Batch, IdempotencyToken, PartRef, ReaderId, Refusal, ShardState, WriterId,
};
use storage::shard::{blob_dir, consensus_key, decode_state, encode_state};
use storage::{AppendRequest, CollectionFrontiers, HoldError, ReadError, StorageReadHold};

use super::rng::Rng;

/// How long a leased reader or the writer lives without a heartbeat (simulated ms): longer than any
/// outage plus a heartbeat interval, so a live client is never expired.
const LEASE_MS: u64 = 1_000;
/// How often live clients heartbeat and sync their readers, and maintenance runs.
const MAINTENANCE_MS: u64 = 20;
/// Compaction merges once a shard has more batches than this.
const MAX_BATCHES: usize = 4;
/// The target size of a compacted part (small, so merges write several parts).
const PART_TARGET_BYTES: usize = 512;
/// The most inline bytes a shard's state carries (small, so appends also overflow it to the blob store).
const MAX_INLINE_BYTES: u64 = 8 << 10;

/// A storage client: the controller (a critical reader) or one incarnation of a model process (a
/// leased reader).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClientId(pub String);

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageFailure {
    /// An engine was down: try again later.
    Unavailable(&'static str),
    /// Stored data is damaged (always a violation here: nothing damages it on purpose).
    Corrupt(String),
    /// The read or hold was refused.
    Read(ReadError),
    /// The hold was refused.
    Hold(HoldError),
}

impl StorageFailure {
    /// Whether trying again later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StorageFailure::Unavailable(_))
    }
}

impl std::fmt::Display for StorageFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StorageFailure::Unavailable(what) => write!(f, "the {what} is unavailable"),
            StorageFailure::Corrupt(what) => write!(f, "damaged: {what}"),
            StorageFailure::Read(e) => e.fmt(f),
            StorageFailure::Hold(e) => e.fmt(f),
        }
    }
}

/// What a compare-and-set reported.
enum Commit {
    Done,
    /// The consensus was down: nothing was applied.
    Unavailable,
    /// The reply was lost: the caller cannot tell whether it was `applied` (only the counters look).
    Lost {
        applied: bool,
    },
}

/// An append the table writer has not had acknowledged yet.
#[derive(Debug)]
struct Pending {
    requests: Vec<AppendRequest>,
    token: IdempotencyToken,
    /// Per collection its parts and their count bound, once written.
    parts: Option<BTreeMap<GlobalId, (Vec<PartRef>, u64)>>,
    /// An earlier attempt may have been applied (its reply was lost).
    maybe_applied: bool,
    next_attempt_ms: u64,
}

/// A change one of a client's holds sent: which client, which collection, what changed.
type HoldChange = (ClientId, GlobalId, ChangeBatch<u64>);

/// One client's holds.
struct Client {
    reader: ReaderId,
    critical: bool,
    /// Crashed: its holds are gone with it, and it neither heartbeats nor releases its reader.
    alive: bool,
    /// Per collection, the frontiers of its outstanding holds, with counts.
    counts: BTreeMap<GlobalId, MutableAntichain<u64>>,
    /// Per collection, its reader's since as last read or written (absent: unknown or not registered).
    registered: BTreeMap<GlobalId, Antichain<u64>>,
}

/// Counts of what the simulated storage did, for the run's outcome.
#[derive(Debug, Default, Clone, Copy)]
pub struct StorageStats {
    /// Outages injected.
    pub outages: u64,
    /// Compare-and-sets whose reply was lost.
    pub lost_replies: u64,
    /// Appends applied whose reply was lost.
    pub appends_applied_unacknowledged: u64,
    /// Appends acknowledged after a lost reply, found applied by their token.
    pub found_applied: u64,
    /// Compaction merges committed.
    pub merges: u64,
    /// Blob parts deleted by garbage collection.
    pub parts_collected: u64,
    /// Leased readers expired.
    pub readers_expired: u64,
    /// Append parts carried inline in the state (no blob put).
    pub inline_parts: u64,
}

/// The simulated storage. See the module documentation.
pub struct SimStorage {
    /// Per key, its versions in seqno order (the head last).
    consensus: BTreeMap<String, Vec<(u64, Bytes)>>,
    /// Each shard's head, decoded from the bytes stored by its last commit (the clients' reads).
    heads: BTreeMap<GlobalId, ShardState>,
    blob: BTreeMap<String, Bytes>,
    tables: Vec<GlobalId>,
    policy: ReadPolicy<u64>,
    rng: Rng,
    now: u64,
    lost_reply_chance: f64,
    latency_ms: u64,
    /// An append's part at most this big goes inline in the state (0: never), the engine's
    /// `ShardConfig::inline_part_bytes`; the state carries at most [`MAX_INLINE_BYTES`] of them.
    inline_part_bytes: usize,
    consensus_down_until: u64,
    blob_down_until: u64,
    writer: WriterId,
    next_token: u128,
    next_part: u64,
    pending: Option<Pending>,
    clients: BTreeMap<ClientId, Client>,
    /// Hold changes sent by the clients' [`ReadHold`]s, applied by [`SimStorage::process_holds`].
    changes: Arc<Mutex<Vec<HoldChange>>>,
    last_maintenance: u64,
    /// A test of the contents check: after a lost reply, append again at the shard's current upper
    /// instead of asking the token (a writer that duplicates appends).
    rebase_after_lost_reply: bool,
    stats: StorageStats,
}

impl std::fmt::Debug for SimStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimStorage").field("tables", &self.tables).finish_non_exhaustive()
    }
}

impl SimStorage {
    /// Empty storage whose faults come from `rng`; shards start with `policy`.
    pub fn new(mut rng: Rng, policy: ReadPolicy<u64>, now: u64, rebase_after_lost_reply: bool) -> Self {
        let lost_reply_chance = rng.below(4) as f64 * 0.04;
        let latency_ms = rng.range(1, 5);
        let inline_part_bytes = [0, 512, 4096][rng.below(3) as usize];
        SimStorage {
            consensus: BTreeMap::new(),
            heads: BTreeMap::new(),
            blob: BTreeMap::new(),
            tables: Vec::new(),
            policy,
            rng,
            now,
            lost_reply_chance,
            latency_ms,
            inline_part_bytes,
            consensus_down_until: 0,
            blob_down_until: 0,
            writer: WriterId("writer-tables".to_string()),
            next_token: 1,
            next_part: 1,
            pending: None,
            clients: BTreeMap::new(),
            changes: Arc::new(Mutex::new(Vec::new())),
            last_maintenance: now,
            rebase_after_lost_reply,
            stats: StorageStats::default(),
        }
    }

    /// What it did so far.
    pub fn stats(&self) -> StorageStats {
        self.stats
    }

    /// Moves the clock.
    pub fn set_now(&mut self, now: u64) {
        self.now = now;
    }

    fn consensus_up(&self) -> bool {
        self.now >= self.consensus_down_until
    }

    fn blob_up(&self) -> bool {
        self.now >= self.blob_down_until
    }

    /// Starts an outage of the consensus (`consensus`) or of the blob store until `until_ms`.
    pub fn start_outage(&mut self, consensus: bool, until_ms: u64) {
        self.stats.outages += 1;
        if consensus {
            self.consensus_down_until = until_ms;
        } else {
            self.blob_down_until = until_ms;
        }
    }

    /// Ends every outage now.
    pub fn end_outages(&mut self) {
        self.consensus_down_until = 0;
        self.blob_down_until = 0;
    }

    /// Whether an outage is going on.
    pub fn in_outage(&self) -> bool {
        !self.consensus_up() || !self.blob_up()
    }

    // ---------------------------------------------------------------------------------------------
    // Consensus

    /// Creates a table's shard (before the run: no faults).
    pub fn create_collection(&mut self, id: GlobalId, desc: RelationDesc) {
        let state = ShardState::create(id, desc, self.policy.clone());
        let previous = self.consensus.insert(consensus_key(id), vec![(0, encode_state(&state))]);
        assert!(previous.is_none(), "{id} created twice");
        self.heads.insert(id, state);
        self.tables.push(id);
    }

    /// The head state of `id`, decoded from the stored bytes, ignoring outages (the world's view).
    pub fn observe(&self, id: GlobalId) -> Result<ShardState, String> {
        let versions = self.consensus.get(&consensus_key(id)).ok_or_else(|| format!("{id} has no shard"))?;
        let (seqno, bytes) = versions.last().ok_or_else(|| format!("{id} has no versions"))?;
        decode_state(id, *seqno, bytes)
    }

    /// The head state of `id` as its last commit stored it (decoded from the stored bytes then),
    /// ignoring outages: what maintenance starts from.
    fn current(&self, id: GlobalId) -> Result<ShardState, String> {
        self.heads.get(&id).cloned().ok_or_else(|| format!("{id} has no shard"))
    }

    /// The since of `id`'s head, ignoring outages (the world's hold check); `None` for no such shard.
    pub fn since(&self, id: GlobalId) -> Option<&Antichain<u64>> {
        self.heads.get(&id).map(|state| &state.since)
    }

    /// The head state of `id` as a client reads it.
    fn head(&self, id: GlobalId) -> Result<&ShardState, StorageFailure> {
        if !self.consensus_up() {
            return Err(StorageFailure::Unavailable("consensus"));
        }
        self.heads.get(&id).ok_or_else(|| StorageFailure::Corrupt(format!("{id} has no shard")))
    }

    /// Compare-and-sets the next versions of some shards at once (each must follow its head).
    fn commit(&mut self, next: Vec<ShardState>) -> Commit {
        if !self.consensus_up() {
            return Commit::Unavailable;
        }
        let lost = self.rng.chance(self.lost_reply_chance);
        if lost {
            self.stats.lost_replies += 1;
            if self.rng.chance(0.5) {
                return Commit::Lost { applied: false };
            }
        }
        for state in next {
            let versions = self.consensus.get_mut(&consensus_key(state.id)).expect("shards exist");
            let head = versions.last().map(|(seqno, _)| *seqno);
            // One writer and one world: nothing races, so a mismatch is a bug of this shell.
            assert_eq!(head.map(|s| s + 1), Some(state.seqno), "{} is not the next version", state.id);
            let bytes = encode_state(&state);
            let stored = decode_state(state.id, state.seqno, &bytes).expect("a state just encoded decodes");
            assert_eq!(stored, state, "a state survives its encoding");
            versions.push((state.seqno, bytes));
            self.heads.insert(state.id, stored);
        }
        if lost { Commit::Lost { applied: true } } else { Commit::Done }
    }

    // ---------------------------------------------------------------------------------------------
    // The table writer

    /// Whether an append is waiting to be acknowledged (the writer appends one at a time).
    pub fn append_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Starts an append (compare-and-append across the requests' shards, one token).
    pub fn start_append(&mut self, requests: Vec<AppendRequest>) {
        assert!(self.pending.is_none(), "the writer appends one at a time");
        let token = IdempotencyToken(self.next_token);
        self.next_token += 1;
        let next_attempt_ms = self.now + self.latency_ms;
        self.pending = Some(Pending { requests, token, parts: None, maybe_applied: false, next_attempt_ms });
    }

    /// Moves the pending append along: `Some(Ok(requests))` once acknowledged, `Some(Err)` if refused
    /// for good, `None` while it waits (latency, an outage, a lost reply to resolve).
    pub fn drive_append(&mut self) -> Option<Result<Vec<AppendRequest>, String>> {
        let pending = self.pending.as_mut()?;
        if pending.next_attempt_ms > self.now {
            return None;
        }
        pending.next_attempt_ms = self.now + self.latency_ms;
        if pending.parts.is_none() {
            if !self.blob_up() {
                return None;
            }
            match self.write_append_parts() {
                Ok(parts) => self.pending.as_mut().expect("pending").parts = Some(parts),
                Err(e) => {
                    self.pending = None;
                    return Some(Err(e));
                }
            }
        }
        let pending = self.pending.as_ref().expect("pending");
        let mut heads = Vec::new();
        for request in &pending.requests {
            match self.head(request.id) {
                Ok(state) => heads.push(state.clone()),
                Err(StorageFailure::Unavailable(_)) => return None,
                Err(e) => return Some(Err(e.to_string())),
            }
        }
        if pending.maybe_applied && !self.rebase_after_lost_reply {
            let applied: BTreeSet<Option<bool>> =
                heads.iter().map(|h| h.applied(&self.writer, pending.token)).collect();
            if applied.len() > 1 {
                return Some(Err(format!(
                    "an atomic append is applied to some of its shards only: {applied:?}"
                )));
            }
            if applied.contains(&Some(true)) {
                self.stats.found_applied += 1;
                return Some(Ok(self.pending.take().expect("pending").requests));
            }
        }
        let parts = pending.parts.as_ref().expect("written");
        let mut next = Vec::new();
        let mut refused = None;
        for (request, head) in pending.requests.iter().zip(&heads) {
            let (parts, count_bound) = parts[&request.id].clone();
            let (lower, upper) = match head.upper.as_option() {
                // The planted bug: "the upper moved, so append again at the current one".
                Some(current) if pending.maybe_applied && self.rebase_after_lost_reply => {
                    let new = request.new_upper.as_option().copied().unwrap_or(u64::MAX);
                    (head.upper.clone(), Antichain::from_elem(new.max(current + 1)))
                }
                _ => (request.expected_upper.clone(), request.new_upper.clone()),
            };
            let input = AppendInput {
                writer: self.writer.clone(),
                token: pending.token,
                lower,
                upper,
                parts,
                count_bound,
                now_ms: self.now,
                writer_lease_ms: LEASE_MS,
            };
            match head.append(&input) {
                Ok(state) => next.push(state),
                Err(refusal) => {
                    refused = Some(format!("append to {} refused: {refusal:?}", request.id));
                    break;
                }
            }
        }
        if let Some(refused) = refused {
            let pending = self.pending.take().expect("pending");
            let written: Vec<PartRef> =
                pending.parts.into_iter().flat_map(|p| p.into_values()).flat_map(|(p, _)| p).collect();
            self.delete_parts(written.iter());
            return Some(Err(refused));
        }
        match self.commit(next) {
            Commit::Done => Some(Ok(self.pending.take().expect("pending").requests)),
            Commit::Unavailable => None,
            Commit::Lost { applied } => {
                self.stats.appends_applied_unacknowledged += u64::from(applied);
                let pending = self.pending.as_mut().expect("pending");
                pending.maybe_applied = true;
                if self.rebase_after_lost_reply {
                    // The planted writer starts over with fresh parts (dropping those nothing references).
                    let written: Vec<PartRef> = pending
                        .parts
                        .take()
                        .into_iter()
                        .flat_map(|p| p.into_values())
                        .flat_map(|(p, _)| p)
                        .collect();
                    let known: BTreeSet<String> = pending
                        .requests
                        .iter()
                        .filter_map(|r| self.heads.get(&r.id))
                        .flat_map(|state| state.known_keys().into_iter().map(str::to_string))
                        .collect();
                    let orphans: Vec<PartRef> =
                        written.into_iter().filter(|p| !known.contains(&p.key)).collect();
                    self.delete_parts(orphans.iter());
                }
                None
            }
        }
    }

    /// Writes one part per non-empty request of the pending append.
    fn write_append_parts(&mut self) -> Result<BTreeMap<GlobalId, (Vec<PartRef>, u64)>, String> {
        let requests = self.pending.as_ref().expect("pending").requests.clone();
        let mut parts = BTreeMap::new();
        for request in requests {
            if request.updates.is_empty() {
                parts.insert(request.id, (Vec::new(), 0));
                continue;
            }
            let run = consolidate_run(request.updates).map_err(|o| format!("overflow in {}", o.row))?;
            let part = self.append_part(request.id, &run.updates);
            parts.insert(request.id, (vec![part], run.count_bound));
        }
        Ok(parts)
    }

    /// An append's part: inline in the state when it is small enough and the head has room for it (the
    /// engine's rule, `ShardCollections::append`), else in the blob store.
    fn append_part(&mut self, id: GlobalId, updates: &[Update]) -> PartRef {
        let bytes = encode_part(updates);
        let carried = self.heads.get(&id).map_or(0, ShardState::inline_bytes);
        if bytes.len() <= self.inline_part_bytes && carried + bytes.len() as u64 <= MAX_INLINE_BYTES {
            let key = format!("{}/inline-{}", blob_dir(id), self.next_part);
            self.next_part += 1;
            self.stats.inline_parts += 1;
            return inline_part_ref(key, &bytes, updates.len() as u64);
        }
        self.put_encoded(id, bytes, updates.len() as u64)
    }

    fn put_part(&mut self, id: GlobalId, updates: &[Update]) -> PartRef {
        self.put_encoded(id, encode_part(updates), updates.len() as u64)
    }

    /// Stores an encoded part of `updates` updates in the blob store under a fresh key.
    fn put_encoded(&mut self, id: GlobalId, bytes: Bytes, updates: u64) -> PartRef {
        let key = format!("{}/p{}", blob_dir(id), self.next_part);
        self.next_part += 1;
        let part = part_ref(key.clone(), &bytes, updates);
        self.blob.insert(key, bytes);
        part
    }

    fn delete_parts<'a>(&mut self, parts: impl Iterator<Item = &'a PartRef>) {
        let keys: Vec<String> = parts.map(|p| p.key.clone()).collect();
        for key in keys {
            self.blob.remove(&key);
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Reads

    /// The since and upper of `id` as a client reads them.
    pub fn frontiers(&self, id: GlobalId) -> Result<CollectionFrontiers, StorageFailure> {
        let state = self.head(id)?;
        Ok(CollectionFrontiers { since: state.since.clone(), upper: state.upper.clone() })
    }

    /// Every update of `state`'s batches, decoded from blob (`check_up`: fail while the blob store is down).
    fn updates(&self, state: &ShardState, check_up: bool) -> Result<Vec<Update>, StorageFailure> {
        if check_up && !self.blob_up() {
            return Err(StorageFailure::Unavailable("blob store"));
        }
        let mut out = Vec::new();
        for part in state.batches.iter().flat_map(|b| &b.parts) {
            let bytes = match &part.inline {
                Some(inline) => &inline[..],
                None => self.blob.get(&part.key).ok_or_else(|| {
                    StorageFailure::Corrupt(format!("part {} of {} is missing", part.key, state.id))
                })?,
            };
            out.extend(decode_part(part, bytes).map_err(|e| StorageFailure::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// The contents of `id` at `as_of` as a model process reads them.
    pub fn snapshot(&self, id: GlobalId, as_of: u64) -> Result<Vec<(Row, Diff)>, StorageFailure> {
        let state = self.head(id)?;
        if !state.since.less_equal(&as_of) {
            let since = state.since.clone();
            return Err(StorageFailure::Read(ReadError::BeforeSince { id, since, as_of }));
        }
        if state.upper.less_equal(&as_of) {
            let upper = state.upper.clone();
            return Err(StorageFailure::Read(ReadError::NotYetReadable { id, upper, as_of }));
        }
        Ok(sum_at(self.updates(state, true)?, as_of))
    }

    /// The updates of `id` at times in `[lower, upper)` (clamped to the shard's upper), in time order.
    /// `lower` must be at or beyond the since: compaction moves older times to at most `since - 1`.
    pub fn updates_between(
        &self,
        id: GlobalId,
        lower: u64,
        upper: &Antichain<u64>,
    ) -> Result<Vec<(Row, u64, Diff)>, StorageFailure> {
        let state = self.head(id)?;
        if !state.since.less_equal(&lower) {
            let since = state.since.clone();
            return Err(StorageFailure::Read(ReadError::BeforeSince { id, since, as_of: lower }));
        }
        let end = frontiers::antichain::meet(&upper.borrow(), &state.upper.borrow());
        let mut by_time: BTreeMap<(u64, Row), Diff> = BTreeMap::new();
        for (row, time, diff) in self.updates(state, true)? {
            if time >= lower && !end.less_equal(&time) {
                *by_time.entry((time, row)).or_default() += diff;
            }
        }
        Ok(by_time.into_iter().filter(|(_, d)| *d != 0).map(|((t, row), d)| (row, t, d)).collect())
    }

    /// What storage holds for `id` at `time` (at or after `since - 1`), read from the head's parts,
    /// ignoring outages: the world's contents check.
    pub fn contents(&self, id: GlobalId, time: u64) -> Result<BTreeMap<Row, Diff>, String> {
        let state = self.observe(id)?;
        let updates = self.updates(&state, false).map_err(|e| e.to_string())?;
        Ok(sum_at(updates, time).into_iter().collect())
    }

    // ---------------------------------------------------------------------------------------------
    // Holds

    /// Registers a client: `critical` for the controller, leased for a model process.
    pub fn new_client(&mut self, name: &str, critical: bool) -> ClientId {
        let id = ClientId(name.to_string());
        let reader = ReaderId(if critical { format!("critical-{name}") } else { format!("leased-{name}") });
        let client =
            Client { reader, critical, alive: true, counts: BTreeMap::new(), registered: BTreeMap::new() };
        assert!(self.clients.insert(id.clone(), client).is_none(), "client {name} registered twice");
        id
    }

    /// The client crashed: its holds are gone; its leased readers stay until they expire.
    pub fn crash_client(&mut self, client: &ClientId) {
        if let Some(c) = self.clients.get_mut(client) {
            c.alive = false;
            c.counts.clear();
        }
    }

    /// A new hold for `client` on `id` at `frontier`. Granted locally if the client's registered reader
    /// already holds at or before it; otherwise the reader is registered or moved back first, which
    /// needs the consensus.
    pub fn acquire_read_hold(
        &mut self,
        client: &ClientId,
        id: GlobalId,
        frontier: Antichain<u64>,
    ) -> Result<StorageReadHold, StorageFailure> {
        let c = self.clients.get(client).expect("registered client");
        assert!(c.alive, "a crashed client takes no holds");
        let covered = c
            .registered
            .get(&id)
            .is_some_and(|r| !r.is_empty() && !frontier.is_empty() && PartialOrder::less_equal(r, &frontier));
        if !covered {
            let (reader, critical) = (c.reader.clone(), c.critical);
            let head = self.head(id)?.clone();
            let next = head.hold_reader(&reader, critical, &frontier, self.now, LEASE_MS).map_err(|r| {
                StorageFailure::Hold(match r {
                    Refusal::BeforeSince { since } => {
                        HoldError::BeforeSince { id, since, requested: frontier.clone() }
                    }
                    _ => HoldError::CollectionMissing(id),
                })
            })?;
            let since = next.readers[&reader].since.clone();
            match self.commit(vec![next]) {
                Commit::Done => {
                    self.clients.get_mut(client).expect("registered").registered.insert(id, since);
                }
                Commit::Unavailable => return Err(StorageFailure::Unavailable("consensus")),
                Commit::Lost { .. } => {
                    // Registered or not: unknown until the next sync reads it.
                    self.clients.get_mut(client).expect("registered").registered.remove(&id);
                    return Err(StorageFailure::Unavailable("consensus (lost reply)"));
                }
            }
        }
        let c = self.clients.get_mut(client).expect("registered");
        c.counts.entry(id).or_default().update_iter(frontier.iter().map(|t| (*t, 1)));
        let changes = Arc::clone(&self.changes);
        let owner = client.clone();
        let tx = Arc::new(move |id: &GlobalId, batch: ChangeBatch<u64>| {
            if let Ok(mut changes) = changes.lock() {
                changes.push((owner.clone(), *id, batch));
            }
        });
        Ok(ReadHold::new(id, frontier, tx))
    }

    /// Applies the hold changes the clients' holds sent.
    pub fn process_holds(&mut self) {
        let changes = std::mem::take(&mut *self.changes.lock().expect("not poisoned"));
        for (client, id, mut batch) in changes {
            if let Some(c) = self.clients.get_mut(&client).filter(|c| c.alive) {
                c.counts.entry(id).or_default().update_iter(batch.drain());
            }
        }
    }

    /// The meet of `client`'s outstanding holds on `id` (empty: none, or no such client).
    pub fn held(&self, client: &ClientId, id: GlobalId) -> Antichain<u64> {
        let counts = self.clients.get(client).and_then(|c| c.counts.get(&id));
        counts.map(|m| m.frontier().to_owned()).unwrap_or_default()
    }

    /// The live clients.
    pub fn live_clients(&self) -> Vec<ClientId> {
        self.clients.iter().filter(|(_, c)| c.alive).map(|(id, _)| id.clone()).collect()
    }

    // ---------------------------------------------------------------------------------------------
    // Background work

    /// Every [`MAINTENANCE_MS`]: live clients move their readers to their holds' meet and heartbeat;
    /// then expiry, compaction and garbage collection. Returns what went wrong that is a violation
    /// (damaged state or parts, a live client's reader gone).
    pub fn maintain(&mut self) -> Vec<String> {
        if self.now < self.last_maintenance + MAINTENANCE_MS || !self.consensus_up() {
            return Vec::new();
        }
        self.last_maintenance = self.now;
        let mut problems = Vec::new();
        for id in self.tables.clone() {
            if let Err(e) = self.maintain_shard(id) {
                problems.push(e);
            }
        }
        problems
    }

    fn maintain_shard(&mut self, id: GlobalId) -> Result<(), String> {
        let clients: Vec<ClientId> = self.live_clients();
        for client in clients {
            self.sync_reader(&client, id)?;
        }
        let state = self.current(id)?;
        if let Some(next) = state.expire(self.now) {
            let expired = state.readers.len() - next.readers.len();
            if matches!(self.commit(vec![next]), Commit::Done) {
                self.stats.readers_expired += expired as u64;
            }
        }
        if self.blob_up() {
            self.compact(id)?;
            self.collect_garbage(id)?;
        }
        Ok(())
    }

    /// Moves `client`'s reader on `id` to the meet of its holds (or releases it), and heartbeats it.
    fn sync_reader(&mut self, client: &ClientId, id: GlobalId) -> Result<(), String> {
        let c = &self.clients[client];
        let meet = c.counts.get(&id).map(|m| m.frontier().to_owned()).unwrap_or_default();
        let reader = c.reader.clone();
        let critical = c.critical;
        let state = self.current(id)?;
        let Some(registered) = state.readers.get(&reader).map(|r| r.since.clone()) else {
            self.clients.get_mut(client).expect("live").registered.remove(&id);
            if !meet.is_empty() {
                return Err(format!("{client:?} holds {id} at {meet:?} but its reader is not registered"));
            }
            return Ok(());
        };
        if !meet.is_empty() && !PartialOrder::less_equal(&registered, &meet) {
            return Err(format!(
                "{client:?} holds {id} at {meet:?}, before its reader's since {registered:?}"
            ));
        }
        let next = if meet.is_empty() {
            state.release_reader(&reader)
        } else {
            state.advance_reader(&reader, &meet).map_err(|r| format!("{r:?}"))?
        };
        let mut state = state;
        if let Some(next) = next {
            let since = next.readers.get(&reader).map(|r| r.since.clone());
            match self.commit(vec![next.clone()]) {
                Commit::Done => {
                    let registered = &mut self.clients.get_mut(client).expect("live").registered;
                    match since {
                        Some(since) => registered.insert(id, since),
                        None => registered.remove(&id),
                    };
                    state = next;
                }
                Commit::Unavailable | Commit::Lost { .. } => {
                    self.clients.get_mut(client).expect("live").registered.remove(&id);
                    return Ok(());
                }
            }
        } else {
            self.clients.get_mut(client).expect("live").registered.insert(id, registered);
        }
        if !critical && state.readers.contains_key(&reader) {
            let next = state.heartbeat(&reader, self.now, state.seqno).map_err(|r| format!("{r:?}"))?;
            let _ = self.commit(vec![next]);
        }
        Ok(())
    }

    /// One compaction merge of `id`, if its state asks for one.
    fn compact(&mut self, id: GlobalId) -> Result<(), String> {
        let state = self.current(id)?;
        let Some(request) = state.compaction_request(MAX_BATCHES) else { return Ok(()) };
        let mut runs = Vec::new();
        for batch in &request.inputs {
            let single = ShardState { batches: vec![batch.clone()], ..state.clone() };
            runs.push(self.updates(&single, false).map_err(|e| e.to_string())?);
        }
        let run = merge_runs(runs, &request.since, request.upper());
        let output = if run.updates.is_empty() {
            None
        } else {
            let parts: Vec<PartRef> = split_run(run.updates, PART_TARGET_BYTES)
                .iter()
                .map(|chunk| self.put_part(id, chunk))
                .collect();
            Some(Batch {
                lower: request.lower().clone(),
                upper: request.upper().clone(),
                parts,
                count_bound: run.count_bound,
            })
        };
        let next = state.apply_merge(&request, output.clone()).map_err(|r| format!("{r:?}"))?;
        let written: Vec<PartRef> = output.map(|b| b.parts).unwrap_or_default();
        match self.commit(vec![next]) {
            Commit::Done => self.stats.merges += 1,
            Commit::Unavailable => self.delete_parts(written.iter()),
            Commit::Lost { .. } => {
                // Applied or not: the head says. Parts it does not reference are garbage now.
                let head = self.current(id)?;
                let known = head.known_keys();
                let orphans: Vec<PartRef> =
                    written.iter().filter(|p| !known.contains(p.key.as_str())).cloned().collect();
                self.delete_parts(orphans.iter());
            }
        }
        Ok(())
    }

    /// Deletes the retired parts no reader can reach and the versions before the oldest one read.
    fn collect_garbage(&mut self, id: GlobalId) -> Result<(), String> {
        let state = self.current(id)?;
        let floor = state.gc_floor();
        let collectable = state.collectable(floor);
        if !collectable.is_empty() {
            let keys: BTreeSet<String> = collectable.iter().map(|p| p.key.clone()).collect();
            let next = state.forget_retired(&keys).expect("collectable parts are retired");
            // Whatever the reply said, the head tells whether they are forgotten: delete those that are.
            let _ = self.commit(vec![next]);
            let head = self.current(id)?;
            let known = head.known_keys();
            let forgotten: Vec<PartRef> =
                collectable.into_iter().filter(|p| !known.contains(p.key.as_str())).collect();
            self.stats.parts_collected += forgotten.len() as u64;
            self.delete_parts(forgotten.iter());
        }
        let versions = self.consensus.get_mut(&consensus_key(id)).expect("shards exist");
        versions.retain(|(seqno, _)| *seqno >= floor);
        assert!(!versions.is_empty(), "the head is never truncated");
        Ok(())
    }

    /// Blob keys that no shard's head references or has retired, and no pending append will (a leak),
    /// for the end-of-run check.
    pub fn unreferenced_parts(&self) -> Result<Vec<String>, String> {
        let mut known: BTreeSet<String> = self
            .pending
            .iter()
            .flat_map(|p| p.parts.iter().flat_map(|parts| parts.values()))
            .flat_map(|(parts, _)| parts.iter().map(|p| p.key.clone()))
            .collect();
        for id in &self.tables {
            let state = self.observe(*id)?;
            known.extend(state.known_keys().into_iter().map(str::to_string));
        }
        Ok(self.blob.keys().filter(|k| !known.contains(*k)).cloned().collect())
    }
}

/// The consolidated contents at `as_of` of a list of updates.
fn sum_at(updates: Vec<Update>, as_of: u64) -> Vec<(Row, Diff)> {
    let mut contents: BTreeMap<Row, Diff> = BTreeMap::new();
    for (row, time, diff) in updates {
        if time <= as_of {
            *contents.entry(row).or_default() += diff;
        }
    }
    contents.into_iter().filter(|(_, d)| *d != 0).collect()
}
