//! The synchronous, deterministic, I/O-free core of the storage layer: [`Store`].
//!
//! **What this is.** Every collection's desc, `since`, `upper`, read policy and contents, with
//! compare-and-append ([`Store::append`], atomic over several collections), read-hold accounting (a
//! [`ReadHolds`] plus one hold per collection kept by its [`ReadPolicy`]), physical compaction, snapshots
//! ([`Store::snapshot`], which never waits) and a pull-style read of the updates in `[lower, upper)` for
//! listeners ([`Store::updates_between`]). The async shell ([`crate::InProcess`]) serves it.
//!
//! **What this is not.** No tokio, no clock, no randomness, no files. The only outward call is the
//! hold-change notification the owner may install ([`Store::with_notify`]), which must not block.
//!
//! **Contents.** A collection keeps `base`, the updates at times before its since, advanced to the since and
//! consolidated (one count per row, zeros removed), and `history`, the updates at times at or beyond its
//! since, consolidated per time. When the since advances ([`Store::process_holds`]) the history before it
//! moves into `base`: space is the live data plus the retained history, whatever the length of the past.
//!
//! **Invariants** (asserted): `since` is the meet of the outstanding holds (frontiers' accounting asserts
//! it) and never regresses; `upper` never regresses; `since <= upper` for every collection (the policy's
//! hold is never ahead of the upper); every `history` time is at or beyond the since and before the upper;
//! `base` has no zero counts.
//!
//! **Tests.** Unit tests at the bottom; a property test against a naive model (a list of every update) in
//! `tests/it/model.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use frontiers::{Antichain, PartialOrder, ReadHolds, ReadPolicy, SinceChange};
use protocol::{Diff, GlobalId, RelationDesc, Row};

use crate::api::{AppendRequest, CollectionFrontiers, StorageReadHold};
use crate::error::{AppendError, CreateError, DropError, HoldError, ReadError};

/// The read policy a collection gets when none is set: hold one second behind the upper, rounded down to
/// whole seconds. It keeps at least the latest complete time (`upper - 1`) readable, and at least the last
/// second of history; the hold moves once per second.
pub fn default_read_policy() -> ReadPolicy<u64> {
    ReadPolicy::LagWriteFrontier { lag_ms: 1_000, granularity_ms: 1_000 }
}

/// What [`Store::create_collection`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The collection is new.
    New,
    /// It existed already with the same desc; nothing changed.
    Existing,
}

/// One storage collection.
struct Collection {
    desc: RelationDesc,
    upper: Antichain<u64>,
    policy: ReadPolicy<u64>,
    /// The hold the read policy keeps. Only moves forward.
    policy_hold: StorageReadHold,
    /// Updates at times before `compacted_to`, advanced to it and consolidated; no zero counts.
    base: BTreeMap<Row, Diff>,
    /// Updates at times at or beyond `compacted_to`, consolidated per time (sorted by row, no zeros).
    history: BTreeMap<u64, Vec<(Row, Diff)>>,
    /// The number of entries in `history`.
    history_len: usize,
    /// The since the contents are compacted to: always the collection's since as of the last
    /// [`Store::process_holds`].
    compacted_to: Antichain<u64>,
}

/// The core store. See the module documentation.
pub struct Store {
    collections: BTreeMap<GlobalId, Collection>,
    dropped: BTreeSet<GlobalId>,
    holds: ReadHolds<GlobalId, u64>,
    default_policy: ReadPolicy<u64>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("collections", &self.collections.len())
            .field("dropped", &self.dropped.len())
            .finish_non_exhaustive()
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    /// An empty store with the [`default_read_policy`]. Hold changes are applied when the owner calls
    /// [`Store::process_holds`].
    pub fn new() -> Self {
        Self::with_notify(Arc::new(|| {}))
    }

    /// An empty store that calls `notify` after every change a read hold sends (from whatever thread drops
    /// or downgrades the hold), so an owner can wake up and [`process_holds`](Self::process_holds).
    /// `notify` must not block and must not call back into the store.
    pub fn with_notify(notify: Arc<dyn Fn() + Send + Sync>) -> Self {
        Store {
            collections: BTreeMap::new(),
            dropped: BTreeSet::new(),
            holds: ReadHolds::with_notify(notify),
            default_policy: default_read_policy(),
        }
    }

    /// Sets the read policy that collections created from now on start with.
    pub fn set_default_read_policy(&mut self, policy: ReadPolicy<u64>) {
        self.default_policy = policy;
    }

    /// Creates a collection with `since = upper = [0]` and the default read policy.
    pub fn create_collection(&mut self, id: GlobalId, desc: RelationDesc) -> Result<Created, CreateError> {
        self.check_create(id, &desc)?;
        if self.collections.contains_key(&id) {
            return Ok(Created::Existing);
        }
        let policy_hold = self.holds.create(id, Antichain::from_elem(0)).unwrap_or_else(|error| {
            panic!("hold accounting for a new collection {id} must be fresh (dropped ids are never reused): {error}")
        });
        let collection = Collection {
            desc,
            upper: Antichain::from_elem(0),
            policy: self.default_policy.clone(),
            policy_hold,
            base: BTreeMap::new(),
            history: BTreeMap::new(),
            history_len: 0,
            compacted_to: Antichain::from_elem(0),
        };
        self.collections.insert(id, collection);
        Ok(Created::New)
    }

    /// Whether [`create_collection`](Self::create_collection) would succeed, without changing anything:
    /// `Ok(true)` if it would create, `Ok(false)` if the collection exists with this desc.
    fn check_create(&self, id: GlobalId, desc: &RelationDesc) -> Result<bool, CreateError> {
        if self.dropped.contains(&id) {
            return Err(CreateError::AlreadyDropped(id));
        }
        match self.collections.get(&id) {
            Some(existing) if existing.desc == *desc => Ok(false),
            Some(_) => Err(CreateError::SchemaMismatch { id }),
            None => Ok(true),
        }
    }

    /// Drops a collection and its data. Holds outstanding on it keep working as values; their changes
    /// are ignored.
    pub fn drop_collection(&mut self, id: GlobalId) -> Result<(), DropError> {
        if self.collections.remove(&id).is_none() {
            return Err(DropError::CollectionMissing(id));
        }
        self.holds.remove(&id);
        self.dropped.insert(id);
        Ok(())
    }

    /// Whether `id` exists.
    pub fn contains(&self, id: GlobalId) -> bool {
        self.collections.contains_key(&id)
    }

    /// Whether `id` was dropped.
    pub fn is_dropped(&self, id: GlobalId) -> bool {
        self.dropped.contains(&id)
    }

    /// Every collection with its desc, in id order.
    pub fn collections(&self) -> Vec<(GlobalId, RelationDesc)> {
        self.collections.iter().map(|(id, c)| (*id, c.desc.clone())).collect()
    }

    /// The ids of every collection, in order.
    pub fn ids(&self) -> Vec<GlobalId> {
        self.collections.keys().copied().collect()
    }

    /// The collection's desc.
    pub fn desc(&self, id: GlobalId) -> Option<&RelationDesc> {
        self.collections.get(&id).map(|c| &c.desc)
    }

    /// The collection's read policy.
    pub fn read_policy(&self, id: GlobalId) -> Option<&ReadPolicy<u64>> {
        self.collections.get(&id).map(|c| &c.policy)
    }

    /// The collection's frontiers (its since as of the last [`process_holds`](Self::process_holds)).
    pub fn frontiers(&self, id: GlobalId) -> Option<CollectionFrontiers> {
        let collection = self.collections.get(&id)?;
        Some(CollectionFrontiers { since: self.since_of(id), upper: collection.upper.clone() })
    }

    fn since_of(&self, id: GlobalId) -> Antichain<u64> {
        self.holds.since(&id).map(|s| s.to_owned()).unwrap_or_default()
    }

    /// Validates `requests` as one atomic append (a later request on the same collection continues from
    /// the upper an earlier one leaves behind); the error is the first request's problem.
    fn validate_append(&self, requests: &[AppendRequest]) -> Result<(), AppendError> {
        let mut local: BTreeMap<GlobalId, Antichain<u64>> = BTreeMap::new();
        for request in requests {
            let id = request.id;
            let Some(collection) = self.collections.get(&id) else {
                return Err(AppendError::CollectionMissing(id));
            };
            let expected = &request.expected_upper;
            let new = &request.new_upper;
            if !PartialOrder::less_equal(expected, new) || expected == new {
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
            let current = local.get(&id).unwrap_or(&collection.upper);
            if current != expected {
                return Err(AppendError::UpperMismatch {
                    id,
                    expected: expected.clone(),
                    current: current.clone(),
                });
            }
            for (row, _, _) in &request.updates {
                if let Err(error) = collection.desc.check_row(row) {
                    return Err(AppendError::RowType { id, row: row.to_string(), error });
                }
            }
            local.insert(id, new.clone());
        }
        Ok(())
    }

    /// Compare-and-append: validates `requests` as one atomic append and applies it, or changes nothing.
    /// Returns the ids whose upper moved, in order. Since changes that follow (the policy holds move with the
    /// upper) are applied by the next [`process_holds`](Self::process_holds).
    pub fn append(&mut self, requests: Vec<AppendRequest>) -> Result<Vec<GlobalId>, AppendError> {
        self.validate_append(&requests)?;
        Ok(self.apply_validated_append(requests))
    }

    /// Applies an append that [`validate_append`](Self::validate_append) accepted against the current
    /// state (and nothing changed in between). Asserts the uppers still match.
    fn apply_validated_append(&mut self, requests: Vec<AppendRequest>) -> Vec<GlobalId> {
        let mut changed = BTreeSet::new();
        for request in requests {
            let id = request.id;
            let collection = self
                .collections
                .get_mut(&id)
                .unwrap_or_else(|| panic!("validated append to {id}, which is missing"));
            assert_eq!(collection.upper, request.expected_upper, "validated append to {id} at a stale upper");
            debug_assert!(request.updates.iter().all(|(row, _, _)| collection.desc.check_row(row).is_ok()));
            collection.insert_updates(request.updates);
            collection.upper = request.new_upper;
            collection.follow_policy();
            changed.insert(id);
        }
        changed.into_iter().collect()
    }

    /// A new read hold on `id` at `frontier` (which must be beyond the since and not empty).
    pub fn acquire_read_hold(
        &mut self,
        id: GlobalId,
        frontier: Antichain<u64>,
    ) -> Result<StorageReadHold, HoldError> {
        if !self.collections.contains_key(&id) {
            return Err(HoldError::CollectionMissing(id));
        }
        if frontier.is_empty() {
            return Err(HoldError::BeforeSince { id, since: self.since_of(id), requested: frontier });
        }
        self.holds.acquire(&id, frontier).map_err(|error| match error {
            frontiers::AcquireError::CollectionMissing(id) => HoldError::CollectionMissing(id),
            frontiers::AcquireError::BeforeSince { id, since, requested } => {
                HoldError::BeforeSince { id, since, requested }
            }
        })
    }

    /// Replaces the collection's read policy and moves its hold to the policy's frontier if that is beyond
    /// the hold (never backwards).
    pub fn set_read_policy(&mut self, id: GlobalId, policy: ReadPolicy<u64>) -> Result<(), HoldError> {
        let Some(collection) = self.collections.get_mut(&id) else {
            return Err(HoldError::CollectionMissing(id));
        };
        collection.policy = policy;
        collection.follow_policy();
        Ok(())
    }

    /// Applies every hold change sent since the last call, compacts the collections whose since moved, and
    /// returns those changes in id order.
    pub fn process_holds(&mut self) -> Vec<SinceChange<GlobalId, u64>> {
        let changes = self.holds.process();
        for change in &changes {
            if let Some(collection) = self.collections.get_mut(&change.id) {
                assert!(
                    PartialOrder::less_equal(&collection.compacted_to, &change.new),
                    "since of {} regressed from {:?} to {:?}",
                    change.id,
                    collection.compacted_to,
                    change.new
                );
                assert!(
                    PartialOrder::less_equal(&change.new, &collection.upper) || change.new.is_empty(),
                    "since of {} passed its upper: {:?} > {:?} (the policy hold is never ahead of the upper)",
                    change.id,
                    change.new,
                    collection.upper
                );
                collection.compact_to(change.new.clone());
            }
        }
        changes
    }

    /// The consolidated contents of `id` at `as_of`, sorted by row. Never waits: a time that is not yet
    /// complete is [`ReadError::NotYetReadable`].
    pub fn snapshot(&self, id: GlobalId, as_of: u64) -> Result<Vec<(Row, Diff)>, ReadError> {
        let collection = self.collections.get(&id).ok_or(ReadError::CollectionMissing(id))?;
        self.check_readable(id, as_of)?;
        let mut contents = collection.base.clone();
        for (_, batch) in collection.history.range(..=as_of) {
            for (row, diff) in batch {
                add_count(&mut contents, row, *diff);
            }
        }
        Ok(contents.into_iter().collect())
    }

    /// Whether `as_of` is readable in `id`: `Ok` if so, otherwise the error a snapshot would return.
    pub fn check_readable(&self, id: GlobalId, as_of: u64) -> Result<(), ReadError> {
        let collection = self.collections.get(&id).ok_or(ReadError::CollectionMissing(id))?;
        let since = self.since_of(id);
        if !since.less_equal(&as_of) {
            return Err(ReadError::BeforeSince { id, since, as_of });
        }
        if collection.upper.less_equal(&as_of) {
            return Err(ReadError::NotYetReadable { id, upper: collection.upper.clone(), as_of });
        }
        Ok(())
    }

    /// The updates of `id` at times in `[lower, upper)`, in time order (consolidated per time). `lower` must
    /// be at or beyond the since (a listener holds the collection there), else [`ReadError::BeforeSince`];
    /// `upper` is clamped to the collection's upper.
    pub fn updates_between(
        &self,
        id: GlobalId,
        lower: u64,
        upper: &Antichain<u64>,
    ) -> Result<Vec<(Row, u64, Diff)>, ReadError> {
        let collection = self.collections.get(&id).ok_or(ReadError::CollectionMissing(id))?;
        if !collection.compacted_to.less_equal(&lower) {
            return Err(ReadError::BeforeSince { id, since: collection.compacted_to.clone(), as_of: lower });
        }
        let end = frontiers::antichain::meet(&upper.borrow(), &collection.upper.borrow());
        let mut out = Vec::new();
        let range = match end.as_option() {
            Some(end) if *end <= lower => return Ok(out),
            Some(end) => collection.history.range(lower..*end),
            None => collection.history.range(lower..),
        };
        for (time, batch) in range {
            out.extend(batch.iter().map(|(row, diff)| (row.clone(), *time, *diff)));
        }
        Ok(out)
    }

    /// The number of `(row, time, diff)` entries stored for `id` (base plus history): what compaction
    /// bounds.
    pub fn stored_updates(&self, id: GlobalId) -> Option<usize> {
        self.collections.get(&id).map(|c| c.base.len() + c.history_len)
    }

    /// The number of hold changes received for collections no longer accounted (dropped).
    pub fn stray_hold_changes(&self) -> u64 {
        self.holds.stray_changes()
    }
}

impl Collection {
    /// Moves the policy's hold to the policy's frontier if that is beyond it.
    fn follow_policy(&mut self) {
        let target = self.policy.frontier(self.upper.borrow());
        if target.is_empty() {
            // A closed collection under a lagging policy: compact completely.
            self.policy_hold.release();
            return;
        }
        if PartialOrder::less_equal(self.policy_hold.since(), &target) && target != *self.policy_hold.since()
        {
            self.policy_hold
                .try_downgrade(target)
                .unwrap_or_else(|e| panic!("moving a policy hold forward cannot fail: {e}"));
        }
    }

    fn insert_updates(&mut self, updates: Vec<(Row, u64, Diff)>) {
        let mut by_time: BTreeMap<u64, Vec<(Row, Diff)>> = BTreeMap::new();
        for (row, time, diff) in updates {
            if self.compacted_to.less_equal(&time) {
                by_time.entry(time).or_default().push((row, diff));
            } else {
                add_count(&mut self.base, &row, diff);
            }
        }
        for (time, mut batch) in by_time {
            consolidate(&mut batch);
            if batch.is_empty() {
                continue;
            }
            self.history_len += batch.len();
            let previous = self.history.insert(time, batch);
            assert!(previous.is_none(), "appends cover disjoint times, but time {time} was written twice");
        }
    }

    fn compact_to(&mut self, since: Antichain<u64>) {
        match since.as_option() {
            None => {
                self.base.clear();
                self.history.clear();
                self.history_len = 0;
            }
            Some(since) => {
                let keep = self.history.split_off(since);
                let old = std::mem::replace(&mut self.history, keep);
                for (_, batch) in old {
                    self.history_len -= batch.len();
                    for (row, diff) in batch {
                        add_count(&mut self.base, &row, diff);
                    }
                }
            }
        }
        self.compacted_to = since;
    }
}

fn add_count(map: &mut BTreeMap<Row, Diff>, row: &Row, diff: Diff) {
    if diff == 0 {
        return;
    }
    match map.get_mut(row) {
        Some(count) => {
            *count += diff;
            if *count == 0 {
                map.remove(row);
            }
        }
        None => {
            map.insert(row.clone(), diff);
        }
    }
}

/// Sorts `updates` by row, sums the diffs of equal rows and removes zeros.
pub fn consolidate(updates: &mut Vec<(Row, Diff)>) {
    updates.sort_by(|a, b| a.0.cmp(&b.0));
    let mut write = 0;
    for read in 0..updates.len() {
        if write > 0 && updates[write - 1].0 == updates[read].0 {
            updates[write - 1].1 += updates[read].1;
        } else {
            updates.swap(write, read);
            write += 1;
        }
    }
    updates.truncate(write);
    updates.retain(|(_, diff)| *diff != 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{ColumnType, Datum, ScalarType};

    fn desc() -> RelationDesc {
        RelationDesc::new([("x", ColumnType::new(ScalarType::Int64, false))])
    }

    fn row(x: i64) -> Row {
        Row::pack([Datum::Int64(x)])
    }

    fn append(id: GlobalId, updates: Vec<(Row, u64, Diff)>, lower: u64, upper: u64) -> AppendRequest {
        AppendRequest {
            id,
            updates,
            expected_upper: Antichain::from_elem(lower),
            new_upper: Antichain::from_elem(upper),
        }
    }

    #[test]
    fn consolidation_sums_equal_rows_and_drops_zeros() {
        type Case = (Vec<(Row, Diff)>, Vec<(Row, Diff)>);
        let cases: Vec<Case> = vec![
            (vec![], vec![]),
            (vec![(row(2), 1), (row(1), 1), (row(2), 1)], vec![(row(1), 1), (row(2), 2)]),
            (vec![(row(1), 1), (row(1), -1)], vec![]),
            (vec![(row(3), -2), (row(1), 0)], vec![(row(3), -2)]),
        ];
        for (mut input, expected) in cases {
            consolidate(&mut input);
            assert_eq!(input, expected);
        }
    }

    #[test]
    fn compaction_folds_history_before_the_since_into_the_base() {
        let mut store = Store::new();
        let id = GlobalId::User(1);
        store.create_collection(id, desc()).unwrap();
        store.set_read_policy(id, ReadPolicy::ValidFrom(Antichain::from_elem(0))).unwrap();
        for t in 0..10u64 {
            let updates = vec![(row(1), t, 1), (row(1), t, 1), (row(2), t, 1)];
            let updates = if t > 0 { [updates, vec![(row(2), t, -1)]].concat() } else { updates };
            store.append(vec![append(id, updates, t, t + 1)]).unwrap();
        }
        store.process_holds();
        assert_eq!(store.stored_updates(id), Some(11));
        store.set_read_policy(id, ReadPolicy::ValidFrom(Antichain::from_elem(9))).unwrap();
        let changes = store.process_holds();
        assert_eq!(changes.len(), 1);
        assert_eq!(store.frontiers(id).unwrap().since, Antichain::from_elem(9));
        // Base: row 1 x 18, row 2 x 1; history at 9: row 1 x 2.
        assert_eq!(store.stored_updates(id), Some(3));
        assert_eq!(store.snapshot(id, 9).unwrap(), vec![(row(1), 20), (row(2), 1)]);
        assert!(matches!(store.snapshot(id, 8), Err(ReadError::BeforeSince { .. })));
        assert!(matches!(store.snapshot(id, 10), Err(ReadError::NotYetReadable { .. })));
    }
}
