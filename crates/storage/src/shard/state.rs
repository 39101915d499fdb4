//! [`ShardState`]: the pure state machine of one shard. Every change is a function from one version to
//! the next (seqno + 1); the shell ([`super::machine`]) stores the result with compare-and-set.
//!
//! **What this is.** A shard's `since` and `upper`, its read policy and the hold it keeps
//! (`policy_since`), its batches (time ranges with their blob parts), its registered readers (critical:
//! never expire; leased: expire without heartbeats, and hold a seqno for garbage collection), its writers
//! (the idempotency token of each one's last append), and the parts that compaction or a drop took out of
//! the state but that older versions may still reference (`retired`). **What this is not:** no I/O, no
//! clock (`now_ms` is an argument), no randomness: the simulator can drive it directly.
//!
//! **Invariants** (asserted by [`ShardState::check`] after every transition in debug builds, and by the
//! transitions themselves): `since` is the meet of `policy_since` and every reader's since, never
//! regresses, and is at most `upper`; `upper` never regresses; batches are non-empty, ordered and
//! disjoint, `lower < upper`, all at or before the shard's upper; a part key appears at most once among the
//! batches and the retired parts; a dropped shard has no batches, readers or writers.
//!
//! **Counts.** Each batch records `count_bound`, the largest sum of `|diff|` over one row's updates in it.
//! The sum over batches bounds every row's count at every time, in every consolidation: an append that
//! would push it past `i64::MAX` is refused ([`Refusal::DiffOverflow`]), so nothing a reader or compaction
//! adds up can overflow. The bound is conservative: two rows with huge counts in different batches add up
//! although they never meet.
//!
//! **Tests.** Unit tests below; a property test against a naive model in `tests/it/shard_model.rs`.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use frontiers::{Antichain, PartialOrder, ReadPolicy};
use protocol::{GlobalId, RelationDesc};
use serde::{Deserialize, Serialize};

use crate::consensus::SeqNo;

/// A registered reader: `leased-<hex>` (one per process) or `critical-<name>` (chosen by its owner).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReaderId(pub String);

/// A registered writer: `writer-<hex>`, one per process.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WriterId(pub String);

/// Tags one logical append (the same across its retries, and across the shards of an atomic append).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IdempotencyToken(pub u128);

/// One part of a batch: a sorted, consolidated run of updates (see [`super::part`]), in the blob store or,
/// for a small append, inline in the state itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRef {
    /// Its blob key (never reused). An inline part's key names it in errors; no blob holds it.
    pub key: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// How many `(row, time, diff)` updates it holds.
    pub updates: u64,
    /// The CRC-32 of its bytes.
    pub checksum: u32,
    /// The encoded part itself when it lives in the state (an *inline* part: an append small enough
    /// that writing it to the blob store would cost more than carrying it in the state; see
    /// `ShardConfig::inline_part_bytes`). Its checksum is checked on every read like a blob part's.
    /// Inline parts are never retired: nothing needs deleting when a merge or a drop removes them.
    pub inline: Option<Bytes>,
}

impl PartRef {
    /// Whether the part lives in the state rather than the blob store.
    pub fn is_inline(&self) -> bool {
        self.inline.is_some()
    }
}

/// The data of the shard's updates at times in `[lower, upper)`: one sorted, consolidated run split over
/// `parts` in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The first time it covers.
    pub lower: Antichain<u64>,
    /// The first time it does not cover.
    pub upper: Antichain<u64>,
    /// The parts, in run order; never empty.
    pub parts: Vec<PartRef>,
    /// The largest sum of `|diff|` over one row's updates in the batch (see the module documentation).
    pub count_bound: u64,
}

impl Batch {
    /// The number of updates in all its parts.
    pub fn updates(&self) -> u64 {
        self.parts.iter().map(|p| p.updates).sum()
    }

    /// The bytes of all its parts.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes).sum()
    }
}

/// How a reader's registration lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReaderKind {
    /// Lives until released: the controller's holds, which survive its restarts.
    Critical,
    /// Expires `lease_ms` after its last heartbeat: a process's holds, which a crash must not keep.
    Leased {
        /// When it last heartbeat.
        heartbeat_ms: u64,
        /// How long it lives without one.
        lease_ms: u64,
        /// The oldest state version the process may still be reading parts of: garbage collection keeps
        /// every part that versions from this one on reference.
        seqno: SeqNo,
    },
}

/// A registered reader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reader {
    /// The shard's since is held at or before this; empty holds nothing.
    pub since: Antichain<u64>,
    /// Critical or leased.
    pub kind: ReaderKind,
}

/// A registered writer: what makes its appends idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Writer {
    /// The token of its last successful append.
    pub token: IdempotencyToken,
    /// The upper that append left.
    pub upper: Antichain<u64>,
    /// When it last appended.
    pub heartbeat_ms: u64,
    /// How long its entry lives without appends.
    pub lease_ms: u64,
}

/// A part no longer in the batches of this version (compacted or dropped) but perhaps in older ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retired {
    /// The first version that does not reference it.
    pub seqno: SeqNo,
    /// The part.
    pub part: PartRef,
}

/// The blob parts among `parts`, retired at `seqno` (inline parts have nothing to delete).
fn retire(seqno: SeqNo, parts: Vec<PartRef>) -> impl Iterator<Item = Retired> {
    parts.into_iter().filter(|part| !part.is_inline()).map(move |part| Retired { seqno, part })
}

/// A request to merge `inputs`, consecutive batches of the state, consolidating their times up to
/// `since` ([`super::part::merge_runs`] computes the result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeRequest {
    /// The batches, in order.
    pub inputs: Vec<Batch>,
    /// The shard's since when the request was made.
    pub since: Antichain<u64>,
}

impl MergeRequest {
    /// The merged batch's lower.
    pub fn lower(&self) -> &Antichain<u64> {
        &self.inputs.first().expect("a merge has inputs").lower
    }

    /// The merged batch's upper.
    pub fn upper(&self) -> &Antichain<u64> {
        &self.inputs.last().expect("a merge has inputs").upper
    }
}

/// Why a transition refused (the shell turns these into the API's typed errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The shard was dropped.
    Dropped,
    /// The append's expected upper is not the shard's upper.
    UpperMismatch {
        /// The shard's upper.
        current: Antichain<u64>,
    },
    /// The append's new upper is not beyond its expected upper.
    UpperNotBeyond,
    /// The counts could overflow `i64` (see the module documentation).
    DiffOverflow,
    /// A reader asked to hold before the since.
    BeforeSince {
        /// The shard's since.
        since: Antichain<u64>,
    },
    /// The reader is not registered (it expired, or was never registered).
    ReaderMissing,
    /// A merge's inputs are no longer batches of the state (another compaction or a drop won).
    MergeStale,
}

/// What an append adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendInput {
    /// The writer.
    pub writer: WriterId,
    /// The append's token.
    pub token: IdempotencyToken,
    /// The expected upper.
    pub lower: Antichain<u64>,
    /// The new upper.
    pub upper: Antichain<u64>,
    /// The data, if any: parts of one sorted consolidated run, with its count bound.
    pub parts: Vec<PartRef>,
    /// The run's count bound (0 without parts).
    pub count_bound: u64,
    /// The current time.
    pub now_ms: u64,
    /// How long the writer's entry lives without appends.
    pub writer_lease_ms: u64,
}

/// The state of one shard. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardState {
    /// The collection.
    pub id: GlobalId,
    /// The version this is (its consensus seqno).
    pub seqno: SeqNo,
    /// The schema of its rows.
    pub desc: RelationDesc,
    /// Whether it was dropped (a dropped shard's state stays as a tombstone: ids are never reused).
    pub dropped: bool,
    /// The write frontier.
    pub upper: Antichain<u64>,
    /// The read frontier: the meet of `policy_since` and the readers' sinces.
    pub since: Antichain<u64>,
    /// The read policy.
    pub policy: ReadPolicy<u64>,
    /// The hold the read policy keeps; only moves forward.
    pub policy_since: Antichain<u64>,
    /// The data, in time order.
    pub batches: Vec<Batch>,
    /// Registered readers.
    pub readers: BTreeMap<ReaderId, Reader>,
    /// Registered writers.
    pub writers: BTreeMap<WriterId, Writer>,
    /// Parts taken out of the batches, awaiting garbage collection.
    pub retired: Vec<Retired>,
}

impl ShardState {
    /// A new shard (version 0) with `since = upper = [0]`.
    pub fn create(id: GlobalId, desc: RelationDesc, policy: ReadPolicy<u64>) -> ShardState {
        let zero = Antichain::from_elem(0);
        let state = ShardState {
            id,
            seqno: 0,
            desc,
            dropped: false,
            upper: zero.clone(),
            since: zero.clone(),
            policy,
            policy_since: zero,
            batches: Vec::new(),
            readers: BTreeMap::new(),
            writers: BTreeMap::new(),
            retired: Vec::new(),
        };
        state.check();
        state
    }

    /// The next version: a copy with the seqno incremented (transitions modify it, then [`finish`]).
    fn next(&self) -> ShardState {
        let mut next = self.clone();
        next.seqno = self.seqno.checked_add(1).expect("seqnos do not run out");
        next
    }

    /// Recomputes the since, asserts it did not regress, and checks the invariants.
    fn finish(mut self, previous: &ShardState) -> ShardState {
        self.since = self.computed_since();
        assert!(
            PartialOrder::less_equal(&previous.since, &self.since) || self.dropped,
            "since of {} regressed from {:?} to {:?}",
            self.id,
            previous.since,
            self.since
        );
        assert!(
            PartialOrder::less_equal(&previous.upper, &self.upper),
            "upper of {} regressed from {:?} to {:?}",
            self.id,
            previous.upper,
            self.upper
        );
        if cfg!(debug_assertions) {
            self.check();
        }
        self
    }

    fn computed_since(&self) -> Antichain<u64> {
        // The empty frontier (a released hold) is the identity of the meet.
        let holds = std::iter::once(&self.policy_since).chain(self.readers.values().map(|r| &r.since));
        frontiers::antichain::meet_all(holds.map(|f| f.borrow()))
    }

    /// Asserts the invariants of the module documentation.
    pub fn check(&self) {
        assert_eq!(self.since, self.computed_since(), "since of {} is not the meet of its holds", self.id);
        assert!(
            self.since.is_empty()
                || PartialOrder::less_equal(&self.since, &self.upper)
                || self.upper.is_empty(),
            "since of {} is beyond its upper",
            self.id
        );
        let mut keys = BTreeSet::new();
        let mut previous_upper: Option<&Antichain<u64>> = None;
        for batch in &self.batches {
            assert!(!batch.parts.is_empty(), "an empty batch in {}", self.id);
            assert!(
                PartialOrder::less_than(&batch.lower, &batch.upper) || batch.upper.is_empty(),
                "batch [{:?}, {:?}) of {} is empty or inverted",
                batch.lower,
                batch.upper,
                self.id
            );
            assert!(
                PartialOrder::less_equal(&batch.upper, &self.upper),
                "a batch of {} is beyond its upper",
                self.id
            );
            if let Some(previous) = previous_upper {
                assert!(PartialOrder::less_equal(previous, &batch.lower), "batches of {} overlap", self.id);
            }
            previous_upper = Some(&batch.upper);
            for part in &batch.parts {
                assert!(keys.insert(&part.key), "part {} listed twice in {}", part.key, self.id);
            }
        }
        for retired in &self.retired {
            assert!(
                keys.insert(&retired.part.key),
                "retired part {} still listed in {}",
                retired.part.key,
                self.id
            );
        }
        if self.dropped {
            assert!(self.batches.is_empty() && self.readers.is_empty() && self.writers.is_empty());
        }
    }

    fn live(&self) -> Result<(), Refusal> {
        if self.dropped { Err(Refusal::Dropped) } else { Ok(()) }
    }

    /// Moves the policy's hold to the policy's frontier if that is beyond it (never backwards).
    fn follow_policy(&mut self) {
        if self.policy_since.is_empty() {
            return;
        }
        let target = self.policy.frontier(self.upper.borrow());
        if target.is_empty() || PartialOrder::less_equal(&self.policy_since, &target) {
            self.policy_since = target;
        }
    }

    /// The sum of the batches' count bounds.
    pub fn count_bound(&self) -> u128 {
        self.batches.iter().map(|b| u128::from(b.count_bound)).sum()
    }

    /// Whether the append tagged `token` is `writer`'s last applied one (what a retry after an
    /// indeterminate failure checks; a writer appends to a shard one append at a time). `None` if the
    /// writer has no entry (never appended, or its entry expired).
    pub fn applied(&self, writer: &WriterId, token: IdempotencyToken) -> Option<bool> {
        self.writers.get(writer).map(|w| w.token == token)
    }

    /// Compare-and-append.
    pub fn append(&self, input: &AppendInput) -> Result<ShardState, Refusal> {
        self.live()?;
        if input.lower != self.upper {
            return Err(Refusal::UpperMismatch { current: self.upper.clone() });
        }
        if !PartialOrder::less_than(&input.lower, &input.upper) && !input.upper.is_empty() {
            return Err(Refusal::UpperNotBeyond);
        }
        if input.lower.is_empty() {
            return Err(Refusal::UpperNotBeyond);
        }
        if self.count_bound() + u128::from(input.count_bound) > i64::MAX as u128 {
            return Err(Refusal::DiffOverflow);
        }
        let mut next = self.next();
        if !input.parts.is_empty() {
            next.batches.push(Batch {
                lower: input.lower.clone(),
                upper: input.upper.clone(),
                parts: input.parts.clone(),
                count_bound: input.count_bound,
            });
        }
        next.upper = input.upper.clone();
        next.follow_policy();
        next.writers.insert(
            input.writer.clone(),
            Writer {
                token: input.token,
                upper: input.upper.clone(),
                heartbeat_ms: input.now_ms,
                lease_ms: input.writer_lease_ms,
            },
        );
        Ok(next.finish(self))
    }

    /// Registers `reader` at `since`, or moves its since back to `since` if it is behind (never before the
    /// shard's since). A leased reader's heartbeat is refreshed; a new one holds the next version.
    pub fn hold_reader(
        &self,
        reader: &ReaderId,
        critical: bool,
        since: &Antichain<u64>,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<ShardState, Refusal> {
        self.live()?;
        if since.is_empty() || !PartialOrder::less_equal(&self.since, since) || self.since.is_empty() {
            return Err(Refusal::BeforeSince { since: self.since.clone() });
        }
        let mut next = self.next();
        let seqno = next.seqno;
        let entry = next.readers.entry(reader.clone()).or_insert_with(|| Reader {
            since: since.clone(),
            kind: if critical {
                ReaderKind::Critical
            } else {
                ReaderKind::Leased { heartbeat_ms: now_ms, lease_ms, seqno }
            },
        });
        if entry.since.is_empty() || !PartialOrder::less_equal(&entry.since, since) {
            entry.since = since.clone();
        }
        if let ReaderKind::Leased { heartbeat_ms, .. } = &mut entry.kind {
            *heartbeat_ms = now_ms;
        }
        Ok(next.finish(self))
    }

    /// Registers leased `reader` holding no since (only its seqno, for the reads of its process); `None` if
    /// it is registered already.
    pub fn register_leased(
        &self,
        reader: &ReaderId,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Option<ShardState>, Refusal> {
        self.live()?;
        if self.readers.contains_key(reader) {
            return Ok(None);
        }
        let mut next = self.next();
        let seqno = next.seqno;
        next.readers.insert(
            reader.clone(),
            Reader {
                since: Antichain::new(),
                kind: ReaderKind::Leased { heartbeat_ms: now_ms, lease_ms, seqno },
            },
        );
        Ok(Some(next.finish(self)))
    }

    /// Moves a registered reader's since forward to `since` (empty: it holds nothing). `None` when there is
    /// nothing to change.
    pub fn advance_reader(
        &self,
        reader: &ReaderId,
        since: &Antichain<u64>,
    ) -> Result<Option<ShardState>, Refusal> {
        self.live()?;
        let current = self.readers.get(reader).ok_or(Refusal::ReaderMissing)?;
        if current.since == *since || (!since.is_empty() && !PartialOrder::less_equal(&current.since, since))
        {
            return Ok(None);
        }
        let mut next = self.next();
        next.readers.get_mut(reader).expect("checked above").since = since.clone();
        Ok(Some(next.finish(self)))
    }

    /// A leased reader's heartbeat: it is alive at `now_ms` and reads versions from `seqno` on.
    pub fn heartbeat(&self, reader: &ReaderId, now_ms: u64, seqno: SeqNo) -> Result<ShardState, Refusal> {
        self.live()?;
        let current = self.readers.get(reader).ok_or(Refusal::ReaderMissing)?;
        assert!(matches!(current.kind, ReaderKind::Leased { .. }), "only leased readers heartbeat");
        let mut next = self.next();
        if let ReaderKind::Leased { heartbeat_ms, seqno: held, .. } =
            &mut next.readers.get_mut(reader).expect("checked above").kind
        {
            *heartbeat_ms = (*heartbeat_ms).max(now_ms);
            *held = (*held).max(seqno.min(self.seqno));
        }
        Ok(next.finish(self))
    }

    /// Unregisters `reader`; `None` if it is not registered.
    pub fn release_reader(&self, reader: &ReaderId) -> Option<ShardState> {
        if !self.readers.contains_key(reader) {
            return None;
        }
        let mut next = self.next();
        next.readers.remove(reader);
        Some(next.finish(self))
    }

    /// Removes the leased readers and writers whose leases ran out by `now_ms`; `None` if none did.
    pub fn expire(&self, now_ms: u64) -> Option<ShardState> {
        let expired_reader = |r: &Reader| match r.kind {
            ReaderKind::Leased { heartbeat_ms, lease_ms, .. } => {
                heartbeat_ms.saturating_add(lease_ms) < now_ms
            }
            ReaderKind::Critical => false,
        };
        let expired_writer = |w: &Writer| w.heartbeat_ms.saturating_add(w.lease_ms) < now_ms;
        if !self.readers.values().any(expired_reader) && !self.writers.values().any(expired_writer) {
            return None;
        }
        let mut next = self.next();
        next.readers.retain(|_, r| !expired_reader(r));
        next.writers.retain(|_, w| !expired_writer(w));
        Some(next.finish(self))
    }

    /// Replaces the read policy and moves its hold forward to the policy's frontier (never backwards).
    pub fn set_policy(&self, policy: ReadPolicy<u64>) -> Result<ShardState, Refusal> {
        self.live()?;
        let mut next = self.next();
        next.policy = policy;
        next.follow_policy();
        Ok(next.finish(self))
    }

    /// Drops the shard: its batches are retired (for garbage collection), its readers and writers
    /// removed; the state stays as a tombstone.
    pub fn drop_shard(&self) -> Result<ShardState, Refusal> {
        self.live()?;
        let mut next = self.next();
        let seqno = next.seqno;
        for batch in std::mem::take(&mut next.batches) {
            next.retired.extend(retire(seqno, batch.parts));
        }
        next.readers.clear();
        next.writers.clear();
        next.dropped = true;
        next.policy_since = Antichain::new();
        Ok(next.finish(self))
    }

    /// What compaction should merge next, if anything. First, the batches entirely below the since (they
    /// consolidate completely): all of them into one, once the newer ones hold at least half as many
    /// updates as the oldest. Then, with more than `max_batches` batches, the longest run of newest
    /// batches whose oldest holds at most twice the updates of the rest of the run (else the last two).
    /// Either way a batch is rewritten only once the data merged into it is a good fraction of its size,
    /// so every update is rewritten a bounded number of times on average, and one merge absorbs any
    /// number of small batches.
    pub fn compaction_request(&self, max_batches: usize) -> Option<MergeRequest> {
        if self.dropped || self.batches.len() < 2 {
            return None;
        }
        let sizes: Vec<u64> = self.batches.iter().map(Batch::updates).collect();
        let below_since =
            self.batches.iter().take_while(|b| PartialOrder::less_equal(&b.upper, &self.since)).count();
        if below_since >= 2 && sizes[1..below_since].iter().sum::<u64>() * 2 >= sizes[0] {
            return Some(MergeRequest {
                inputs: self.batches[..below_since].to_vec(),
                since: self.since.clone(),
            });
        }
        if self.batches.len() <= max_batches.max(1) {
            return None;
        }
        let n = sizes.len();
        let start = (0..n - 1)
            .find(|&i| sizes[i + 1..].iter().sum::<u64>().saturating_mul(2) >= sizes[i])
            .unwrap_or(n - 2);
        Some(MergeRequest { inputs: self.batches[start..].to_vec(), since: self.since.clone() })
    }

    /// Replaces a merge's inputs with its output (`None`: they consolidated to nothing). Refused if the
    /// inputs are no longer consecutive batches of the state.
    pub fn apply_merge(&self, request: &MergeRequest, output: Option<Batch>) -> Result<ShardState, Refusal> {
        self.live().map_err(|_| Refusal::MergeStale)?;
        let n = request.inputs.len();
        let start = self
            .batches
            .windows(n)
            .position(|window| window == request.inputs.as_slice())
            .ok_or(Refusal::MergeStale)?;
        if let Some(output) = &output {
            assert_eq!(&output.lower, request.lower(), "a merge keeps its inputs' range");
            assert_eq!(&output.upper, request.upper(), "a merge keeps its inputs' range");
            let bound: u128 = request.inputs.iter().map(|b| u128::from(b.count_bound)).sum();
            assert!(u128::from(output.count_bound) <= bound, "a merge never raises the count bound");
        }
        let mut next = self.next();
        let seqno = next.seqno;
        let removed: Vec<Batch> = next.batches.splice(start..start + n, output).collect();
        for batch in removed {
            next.retired.extend(retire(seqno, batch.parts));
        }
        Ok(next.finish(self))
    }

    /// The oldest version a reader may still read parts of: no version before it is needed.
    pub fn gc_floor(&self) -> SeqNo {
        let held = self.readers.values().filter_map(|r| match r.kind {
            ReaderKind::Leased { seqno, .. } => Some(seqno),
            ReaderKind::Critical => None,
        });
        held.fold(self.seqno, SeqNo::min)
    }

    /// The retired parts that no version from `floor` on references.
    pub fn collectable(&self, floor: SeqNo) -> Vec<PartRef> {
        self.retired.iter().filter(|r| r.seqno <= floor).map(|r| r.part.clone()).collect()
    }

    /// Forgets retired parts whose blobs were deleted; `None` if none of `keys` is retired here.
    pub fn forget_retired(&self, keys: &BTreeSet<String>) -> Option<ShardState> {
        if !self.retired.iter().any(|r| keys.contains(&r.part.key)) {
            return None;
        }
        let mut next = self.next();
        next.retired.retain(|r| !keys.contains(&r.part.key));
        Some(next.finish(self))
    }

    /// Every blob key this version references or has retired (inline parts have none).
    pub fn known_keys(&self) -> BTreeSet<&str> {
        let live = self.batches.iter().flat_map(|b| b.parts.iter()).filter(|p| !p.is_inline());
        live.chain(self.retired.iter().map(|r| &r.part)).map(|p| p.key.as_str()).collect()
    }

    /// The bytes of the live batches' inline parts (what the state carries besides metadata).
    pub fn inline_bytes(&self) -> u64 {
        self.batches.iter().flat_map(|b| &b.parts).filter(|p| p.is_inline()).map(|p| p.bytes).sum()
    }

    /// The bytes of the live batches' parts.
    pub fn live_bytes(&self) -> u64 {
        self.batches.iter().map(Batch::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{ColumnType, ScalarType};

    fn at(t: u64) -> Antichain<u64> {
        Antichain::from_elem(t)
    }

    fn shard() -> ShardState {
        let desc = RelationDesc::new([("x", ColumnType::new(ScalarType::Int64, false))]);
        ShardState::create(GlobalId::User(1), desc, ReadPolicy::ValidFrom(at(0)))
    }

    fn part(key: &str, updates: u64) -> PartRef {
        PartRef { key: key.into(), bytes: updates * 10, updates, checksum: 0, inline: None }
    }

    fn input(lower: u64, upper: u64, parts: Vec<PartRef>, token: u128) -> AppendInput {
        AppendInput {
            writer: WriterId("w".into()),
            token: IdempotencyToken(token),
            lower: at(lower),
            upper: at(upper),
            count_bound: parts.iter().map(|p| p.updates).sum(),
            parts,
            now_ms: 0,
            writer_lease_ms: 1_000,
        }
    }

    #[test]
    fn appends_compare_the_upper_and_record_the_token() {
        let s0 = shard();
        let s1 = s0.append(&input(0, 5, vec![part("a", 3)], 1)).unwrap();
        assert_eq!((s1.seqno, s1.upper.clone(), s1.batches.len()), (1, at(5), 1));
        assert_eq!(s1.applied(&WriterId("w".into()), IdempotencyToken(1)), Some(true));
        assert_eq!(s1.applied(&WriterId("w".into()), IdempotencyToken(2)), Some(false));
        assert_eq!(s1.applied(&WriterId("other".into()), IdempotencyToken(1)), None);
        assert_eq!(s1.append(&input(0, 6, vec![], 2)), Err(Refusal::UpperMismatch { current: at(5) }));
        assert_eq!(s1.append(&input(5, 5, vec![], 2)), Err(Refusal::UpperNotBeyond));
        // An empty append moves the upper without a batch.
        let s2 = s1.append(&input(5, 9, vec![], 3)).unwrap();
        assert_eq!((s2.upper.clone(), s2.batches.len()), (at(9), 1));
        // Closing the shard.
        let closed = s2.append(&input(9, 0, vec![], 4).with_upper(Antichain::new())).unwrap();
        assert!(closed.upper.is_empty());
        assert_eq!(
            closed.append(&input(9, 10, vec![], 5)),
            Err(Refusal::UpperMismatch { current: Antichain::new() })
        );
    }

    impl AppendInput {
        fn with_upper(mut self, upper: Antichain<u64>) -> Self {
            self.upper = upper;
            self
        }
    }

    #[test]
    fn the_count_bound_refuses_appends_that_could_overflow() {
        let s0 = shard();
        let mut big = input(0, 1, vec![part("a", 1)], 1);
        big.count_bound = i64::MAX as u64 - 5;
        let s1 = s0.append(&big).unwrap();
        let mut more = input(1, 2, vec![part("b", 1)], 2);
        more.count_bound = 5;
        let s2 = s1.append(&more).unwrap();
        let mut one_more = input(2, 3, vec![part("c", 1)], 3);
        one_more.count_bound = 1;
        assert_eq!(s2.append(&one_more), Err(Refusal::DiffOverflow));
    }

    #[test]
    fn the_since_is_the_meet_of_the_policy_and_the_readers_and_never_regresses() {
        let s = shard().set_policy(ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 }).unwrap();
        let s = s.append(&input(0, 10, vec![], 1)).unwrap();
        assert_eq!(s.since, at(10));
        let reader = ReaderId("leased-1".into());
        assert_eq!(
            s.hold_reader(&reader, false, &at(3), 0, 100),
            Err(Refusal::BeforeSince { since: at(10) })
        );
        let s = s.hold_reader(&reader, false, &at(12), 0, 100).unwrap();
        assert_eq!(s.since, at(10), "the policy holds at 10");
        let s = s.append(&input(10, 20, vec![], 2)).unwrap();
        assert_eq!(s.since, at(12), "the reader is behind the policy's hold at 20");
        // Moving back is allowed down to the since, never below.
        let s = s.hold_reader(&reader, false, &at(12), 0, 100).unwrap();
        assert_eq!(
            s.hold_reader(&reader, false, &at(11), 0, 100),
            Err(Refusal::BeforeSince { since: at(12) })
        );
        let s = s.advance_reader(&reader, &at(15)).unwrap().unwrap();
        assert_eq!(s.since, at(15));
        assert_eq!(s.advance_reader(&reader, &at(14)).unwrap(), None, "advancing never moves back");
        // Released: the since follows the policy again.
        let s = s.advance_reader(&reader, &Antichain::new()).unwrap().unwrap();
        assert_eq!(s.since, at(20));
        // Expired: removed.
        let s = s.expire(1_000).unwrap();
        assert!(s.readers.is_empty());
        assert_eq!(s.expire(2_000).map(|s| s.readers.len()), Some(0), "the writer expires too");
    }

    #[test]
    fn critical_readers_never_expire_and_leased_ones_do() {
        let s = shard();
        let critical = ReaderId("critical-controller".into());
        let leased = ReaderId("leased-7".into());
        let s = s.hold_reader(&critical, true, &at(0), 0, 10).unwrap();
        let s = s.hold_reader(&leased, false, &at(0), 0, 10).unwrap();
        let s = s.heartbeat(&leased, 5, 1).unwrap();
        assert!(s.expire(15).is_none(), "heartbeat at 5 + lease 10 covers 15");
        let s = s.expire(16).unwrap();
        assert!(s.readers.contains_key(&critical));
        assert!(!s.readers.contains_key(&leased));
        assert_eq!(s.heartbeat(&leased, 20, 3), Err(Refusal::ReaderMissing));
    }

    #[test]
    fn merges_replace_their_inputs_and_retire_their_parts() {
        let mut s = shard();
        for (i, size) in [8u64, 4, 2, 1, 1].into_iter().enumerate() {
            let i = i as u64;
            s = s.append(&input(i, i + 1, vec![part(&format!("p{i}"), size)], u128::from(i))).unwrap();
        }
        // A reader reading version 6 (the one it registered in).
        let reader = ReaderId("leased-1".into());
        let s = s.hold_reader(&reader, false, &at(0), 0, 100).unwrap();
        assert_eq!(s.gc_floor(), 6);
        assert_eq!(s.compaction_request(8), None);
        // Once the since passes the first three (8, 4, 2 updates), they are merged as one.
        let below_since =
            s.set_policy(ReadPolicy::ValidFrom(at(3))).unwrap().release_reader(&reader).unwrap();
        let below = below_since.compaction_request(100).unwrap();
        assert_eq!((below.inputs.len(), below.lower(), below.upper()), (3, &at(0), &at(3)));
        // Too many batches: sizes 8 4 2 1 1, and everything after the 8 holds as many updates as it, so the
        // whole run is merged; with 64 16 2 1 1 only the newest three are.
        let request = s.compaction_request(2).unwrap();
        assert_eq!((request.inputs.len(), request.lower()), (5, &at(0)));
        let mut skewed = s.clone();
        skewed.batches[0].parts[0].updates = 64;
        skewed.batches[1].parts[0].updates = 16;
        let newest = skewed.compaction_request(2).unwrap();
        assert_eq!((newest.inputs.len(), newest.lower()), (3, &at(2)));
        let merged = Batch { lower: at(0), upper: at(5), parts: vec![part("m", 16)], count_bound: 16 };
        let s2 = s.apply_merge(&request, Some(merged)).unwrap();
        assert_eq!(s2.batches.len(), 1);
        let retired: Vec<_> = s2.retired.iter().map(|r| (r.seqno, r.part.key.as_str())).collect();
        assert_eq!(retired, [(7, "p0"), (7, "p1"), (7, "p2"), (7, "p3"), (7, "p4")]);
        assert_eq!(s2.apply_merge(&request, None), Err(Refusal::MergeStale), "the inputs are gone");
        // Version 6 still references the retired parts, and the reader may read it.
        assert!(s2.collectable(s2.gc_floor()).is_empty());
        let s3 = s2.heartbeat(&reader, 0, 7).unwrap();
        assert_eq!(s3.gc_floor(), 7);
        assert_eq!(s3.collectable(s3.gc_floor()).len(), 5);
        let s4 = s3.heartbeat(&reader, 0, 2).unwrap();
        assert_eq!(s4.gc_floor(), 7, "a reader's version hold never moves back");
        let keys: BTreeSet<String> = (0..5).map(|i| format!("p{i}")).collect();
        let s5 = s4.forget_retired(&keys).unwrap();
        assert!(s5.retired.is_empty());
        assert!(s5.forget_retired(&keys).is_none());
    }

    #[test]
    fn a_dropped_shard_is_a_tombstone_that_refuses_everything() {
        let s = shard().append(&input(0, 1, vec![part("a", 1)], 1)).unwrap();
        let dropped = s.drop_shard().unwrap();
        assert!(dropped.dropped && dropped.batches.is_empty());
        assert_eq!(dropped.retired.len(), 1);
        assert_eq!(dropped.drop_shard(), Err(Refusal::Dropped));
        assert_eq!(dropped.append(&input(1, 2, vec![], 2)), Err(Refusal::Dropped));
        assert_eq!(dropped.set_policy(ReadPolicy::NoPolicy), Err(Refusal::Dropped));
        assert_eq!(dropped.hold_reader(&ReaderId("r".into()), false, &at(1), 0, 1), Err(Refusal::Dropped));
    }
}
