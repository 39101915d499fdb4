//! Introspection: what the controller knows about each replica and collection, kept as relations that are
//! written to storage collections, so they can be peeked and subscribed like any other data.
//!
//! | relation | columns |
//! |---|---|
//! | `compute_frontiers` | instance, replica, collection, write_frontier (NULL = closed) |
//! | `compute_hydration` | instance, replica, collection, hydrated, hydration_time_ms (NULL until hydrated) |
//! | `compute_peek_durations` | instance, replica, bucket_upper_ms (powers of two), count |
//! | `compute_replica_status` | instance, replica, status, reason |
//! | `compute_wallclock_lag` | instance, replica, collection, lag_ms (now minus upper, whole seconds) |
//! | `compute_wallclock_lag_history` | instance, replica, collection, occurred_at (the minute), max_lag_ms |
//!
//! What the values mean:
//!
//! - **`compute_replica_status.status`** is one of
//!   - `connecting`: the replica has no connection (a first attempt under way, or the next one after a
//!     failure);
//!   - `failed`: the last attempt failed or the connection was lost; `reason` says why, and the next
//!     attempt follows (back to `connecting`);
//!   - `hydrating`: connected for the first time, and some live collection is not hydrated on it yet;
//!   - `rehydrating`: connected again after an earlier connection was lost, and some live collection is
//!     not hydrated on this connection yet;
//!   - `connected`: connected, and every live collection is hydrated on this connection. A collection
//!     created later turns it back to `hydrating` (or `rehydrating`) until that one hydrates too.
//!
//!   `reason` is NULL except for `failed`.
//! - **`compute_hydration`** has a row for every replica and live collection of the instance, from the
//!   moment both exist: `hydrated = false` with `hydration_time_ms` NULL until the replica's write
//!   frontier for the collection passes the collection's as-of on its current connection; then `true`
//!   with the time it took, from the later of the collection's creation and the connection's start.
//!   A lost connection turns the replica's rows back to `false` (it rehydrates on the next one).
//! - **`compute_frontiers`** and **`compute_wallclock_lag`** have a row for every replica and live
//!   collection the replica has reported a write frontier for. `lag_ms` is the core's clock minus the
//!   upper (both in milliseconds), rounded down to whole seconds; 0 for a closed upper (nothing is
//!   left to write).
//! - **`compute_wallclock_lag_history`** keeps, per replica and live collection, the largest `lag_ms` of
//!   each minute (`occurred_at`, the minute's start, in milliseconds since the epoch) in which the
//!   collection had a lag row: a row appears once its minute is over, and goes once it is older than the
//!   instance's `wallclock_lag_history_minutes` (or with its collection or replica). The reference
//!   system's `mz_wallclock_lag_history`, bucketed the same way.
//! - **`compute_peek_durations`** counts the peeks each replica answered first, by duration bucket:
//!   `bucket_upper_ms` is the smallest power of two greater than the duration in milliseconds
//!   ([`peek_duration_bucket_ms`]; 0 ms is in bucket 1, 1 ms in 2, 2–3 ms in 4, 4–7 ms in 8).
//!
//! Rows of a collection go away when it is dropped; rows of a replica when it is dropped.
//!
//! The instance core keeps the current row for every key ([`IntrospectionState`]) and emits differences:
//! a changed row becomes a retraction of the old and an insertion of the new. The shell appends these at
//! the current time. Frontier and wall-clock lag rows are refreshed once per introspection interval (the
//! latest value of each key), not on every frontier report; the others change as their events happen.
//!
//! **Ownership.** The controller owns the introspection collections in storage: when it starts (and
//! whenever an append finds that someone else wrote), its writer reads each collection's contents and
//! writes the difference to the rows it wants, so rows an earlier controller left behind are retracted.
//!
//! **Invariant:** the accumulated updates of each relation equal the rows `IntrospectionState` holds
//! (no row is retracted that was not inserted).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use protocol::{ColumnType, Datum, Diff, GlobalId, InstanceId, RelationDesc, ReplicaId, Row, ScalarType};

/// One introspection relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IntrospectionKind {
    /// Per replica and collection: the write frontier.
    Frontiers,
    /// Per replica and collection: hydrated, and how long it took.
    Hydration,
    /// Per replica: a histogram of peek durations.
    PeekDurations,
    /// Per replica: its connection status.
    ReplicaStatus,
    /// Per replica and collection: now minus the upper.
    WallclockLag,
    /// Per replica, collection and minute: the largest lag of the minute.
    WallclockLagHistory,
}

impl IntrospectionKind {
    /// Every relation, in a fixed order.
    pub const ALL: [IntrospectionKind; 6] = [
        IntrospectionKind::Frontiers,
        IntrospectionKind::Hydration,
        IntrospectionKind::PeekDurations,
        IntrospectionKind::ReplicaStatus,
        IntrospectionKind::WallclockLag,
        IntrospectionKind::WallclockLagHistory,
    ];

    /// The relation's name.
    pub fn name(self) -> &'static str {
        match self {
            IntrospectionKind::Frontiers => "compute_frontiers",
            IntrospectionKind::Hydration => "compute_hydration",
            IntrospectionKind::PeekDurations => "compute_peek_durations",
            IntrospectionKind::ReplicaStatus => "compute_replica_status",
            IntrospectionKind::WallclockLag => "compute_wallclock_lag",
            IntrospectionKind::WallclockLagHistory => "compute_wallclock_lag_history",
        }
    }

    /// Whether the relation has one row per collection and replica (keyed by instance, replica and
    /// collection).
    pub fn is_per_collection(self) -> bool {
        matches!(
            self,
            IntrospectionKind::Frontiers | IntrospectionKind::Hydration | IntrospectionKind::WallclockLag
        )
    }

    /// The storage collection id the controller uses for it.
    pub fn default_id(self) -> GlobalId {
        let index = IntrospectionKind::ALL.iter().position(|k| *k == self).expect("listed");
        GlobalId::System(1_000 + index as u64)
    }

    /// The relation's schema.
    ///
    /// # Examples
    /// ```
    /// use controller::IntrospectionKind;
    /// assert_eq!(IntrospectionKind::Frontiers.desc().arity(), 4);
    /// ```
    pub fn desc(self) -> RelationDesc {
        let text = ColumnType::new(ScalarType::Text, false);
        let int = ColumnType::new(ScalarType::Int64, false);
        let mut desc = RelationDesc::new([("instance", text), ("replica", text)]);
        match self {
            IntrospectionKind::Frontiers => {
                desc = desc
                    .with_column("collection", text)
                    .with_column("write_frontier", ColumnType::new(ScalarType::Timestamp, true));
            }
            IntrospectionKind::Hydration => {
                desc = desc
                    .with_column("collection", text)
                    .with_column("hydrated", ColumnType::new(ScalarType::Bool, false))
                    .with_column("hydration_time_ms", int.nullable(true));
            }
            IntrospectionKind::PeekDurations => {
                desc = desc.with_column("bucket_upper_ms", int).with_column("count", int);
            }
            IntrospectionKind::ReplicaStatus => {
                desc = desc.with_column("status", text).with_column("reason", text.nullable(true));
            }
            IntrospectionKind::WallclockLag => {
                desc = desc.with_column("collection", text).with_column("lag_ms", int);
            }
            IntrospectionKind::WallclockLagHistory => {
                desc = desc
                    .with_column("collection", text)
                    .with_column("occurred_at", ColumnType::new(ScalarType::Timestamp, false))
                    .with_column("max_lag_ms", int);
            }
        }
        desc
    }
}

/// The upper bound of the power-of-two histogram bucket a duration falls into: the smallest power of two
/// greater than `duration_ms` (the bucket holds the durations from its lower neighbour up to, not
/// including, this).
///
/// # Examples
/// ```
/// use controller::peek_duration_bucket_ms;
/// assert_eq!(peek_duration_bucket_ms(0), 1);
/// assert_eq!(peek_duration_bucket_ms(3), 4);
/// assert_eq!(peek_duration_bucket_ms(4), 8);
/// ```
pub fn peek_duration_bucket_ms(duration_ms: u64) -> u64 {
    (duration_ms + 1).next_power_of_two()
}

/// A replica's status as the instance judges it: the `status` (and `reason`) of its
/// `compute_replica_status` row, and of `compute_controller_replica_status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaHealth {
    /// No connection: a first attempt under way, or the next one after a failure.
    Connecting,
    /// The last attempt failed or the connection was lost; the next attempt follows.
    Failed {
        /// Why.
        reason: String,
    },
    /// Connected for the first time, and some live collection is not hydrated on it yet.
    Hydrating,
    /// Connected again after a lost connection, and some live collection is not hydrated on it yet.
    Rehydrating,
    /// Connected, and every live collection is hydrated on this connection.
    Connected,
}

impl ReplicaHealth {
    /// The status's name, as introspection and the metrics spell it.
    ///
    /// # Examples
    /// ```
    /// use controller::ReplicaHealth;
    /// assert_eq!(ReplicaHealth::Rehydrating.name(), "rehydrating");
    /// assert_eq!(ReplicaHealth::Failed { reason: "gone".into() }.name(), "failed");
    /// ```
    pub fn name(&self) -> &'static str {
        match self {
            ReplicaHealth::Connecting => "connecting",
            ReplicaHealth::Failed { .. } => "failed",
            ReplicaHealth::Hydrating => "hydrating",
            ReplicaHealth::Rehydrating => "rehydrating",
            ReplicaHealth::Connected => "connected",
        }
    }
}

/// The current introspection rows, by relation and key, and the differences not yet written.
#[derive(Debug, Default)]
pub struct IntrospectionState {
    rows: BTreeMap<(IntrospectionKind, Row), Row>,
    /// The rows of the relations with one row per collection and replica (frontiers, hydration,
    /// wall-clock lag), keyed by the ids rather than by the packed key columns: refreshing 10,000
    /// collections' rows every interval then compares small inline keys, not heap-allocated rows.
    collection_rows: BTreeMap<(IntrospectionKind, GlobalId, ReplicaId), Row>,
    /// The rows of `compute_wallclock_lag_history`, by collection, replica and minute (its start in
    /// milliseconds), so that a collection's or an expired minute's rows are found without a scan of
    /// everything.
    history_rows: BTreeMap<(GlobalId, ReplicaId, u64), Row>,
    pending: Vec<(IntrospectionKind, Row, Diff)>,
}

/// Replaces the row at `key` in `rows` with `new` (`None`: removes it) and records the difference.
fn replace<K: Ord>(
    rows: &mut BTreeMap<K, Row>,
    pending: &mut Vec<(IntrospectionKind, Row, Diff)>,
    kind: IntrospectionKind,
    key: K,
    new: Option<Row>,
) {
    let Some(new) = new else {
        if let Some(old) = rows.remove(&key) {
            pending.push((kind, old, -1));
        }
        return;
    };
    match rows.entry(key) {
        Entry::Occupied(current) if *current.get() == new => {}
        Entry::Occupied(mut current) => {
            let old = current.insert(new.clone());
            pending.push((kind, old, -1));
            pending.push((kind, new, 1));
        }
        Entry::Vacant(slot) => {
            slot.insert(new.clone());
            pending.push((kind, new, 1));
        }
    }
}

impl IntrospectionState {
    /// Sets the row for `key` (the key columns are the row's leading datums; `values` follow them), or
    /// removes it with `None`. For the relations keyed by instance, replica and collection, use
    /// [`set_for_collection`](Self::set_for_collection).
    pub fn set(&mut self, kind: IntrospectionKind, key: &[Datum<'_>], values: Option<&[Datum<'_>]>) {
        debug_assert!(!kind.is_per_collection(), "{kind:?} rows are set per collection");
        let new = values.map(|values| Row::pack(key.iter().chain(values).copied()));
        replace(&mut self.rows, &mut self.pending, kind, (kind, Row::pack(key.iter().copied())), new);
    }

    /// Sets the row of collection `id` on `replica` of `instance` (its key columns), followed by
    /// `values`, or removes it with `None`.
    pub fn set_for_collection(
        &mut self,
        kind: IntrospectionKind,
        instance: InstanceId,
        replica: ReplicaId,
        id: GlobalId,
        values: Option<&[Datum<'_>]>,
    ) {
        debug_assert!(kind.is_per_collection(), "{kind:?} rows are not per collection");
        let new = values.map(|values| {
            let (instance, replica, collection) = (instance.to_string(), replica.to_string(), id.to_string());
            let key = [Datum::Text(&instance), Datum::Text(&replica), Datum::Text(&collection)];
            Row::pack(key.iter().chain(values).copied())
        });
        replace(&mut self.collection_rows, &mut self.pending, kind, (kind, id, replica), new);
    }

    /// Removes every per-collection row of `replica` (a dropped replica), its lag history included.
    pub fn remove_replica_collections(&mut self, replica: ReplicaId) {
        let doomed: Vec<(IntrospectionKind, GlobalId, ReplicaId)> =
            self.collection_rows.keys().filter(|(_, _, r)| *r == replica).copied().collect();
        for key in doomed {
            if let Some(old) = self.collection_rows.remove(&key) {
                self.pending.push((key.0, old, -1));
            }
        }
        self.remove_history_where(|(_, r, _)| *r == replica);
    }

    /// Writes the `compute_wallclock_lag_history` row of collection `id` on `replica` for the minute
    /// starting at `minute_ms`: its largest lag, `max_lag_ms`.
    pub fn set_lag_history(
        &mut self,
        instance: InstanceId,
        replica: ReplicaId,
        id: GlobalId,
        minute_ms: u64,
        max_lag_ms: u64,
    ) {
        let (instance, replica_name, collection) =
            (instance.to_string(), replica.to_string(), id.to_string());
        let row = Row::pack([
            Datum::Text(&instance),
            Datum::Text(&replica_name),
            Datum::Text(&collection),
            Datum::Timestamp(minute_ms),
            Datum::Int64(max_lag_ms as i64),
        ]);
        let kind = IntrospectionKind::WallclockLagHistory;
        replace(&mut self.history_rows, &mut self.pending, kind, (id, replica, minute_ms), Some(row));
    }

    /// Removes the lag history of collection `id` (dropped).
    pub fn remove_lag_history(&mut self, id: GlobalId) {
        let doomed: Vec<(GlobalId, ReplicaId, u64)> = self
            .history_rows
            .range((id, ReplicaId(0), 0)..)
            .take_while(|((c, _, _), _)| *c == id)
            .map(|(k, _)| *k)
            .collect();
        for key in doomed {
            if let Some(old) = self.history_rows.remove(&key) {
                self.pending.push((IntrospectionKind::WallclockLagHistory, old, -1));
            }
        }
    }

    /// Removes the lag history of every minute that started before `before_ms`.
    pub fn expire_lag_history(&mut self, before_ms: u64) {
        self.remove_history_where(|(_, _, minute_ms)| *minute_ms < before_ms);
    }

    fn remove_history_where(&mut self, doomed: impl Fn(&(GlobalId, ReplicaId, u64)) -> bool) {
        let pending = &mut self.pending;
        self.history_rows.retain(|key, row| {
            if doomed(key) {
                pending.push((IntrospectionKind::WallclockLagHistory, row.clone(), -1));
                false
            } else {
                true
            }
        });
    }

    /// The lag history of collection `id`: `(replica, minute_ms, max_lag_ms)`, by replica and minute.
    pub fn lag_history(&self, id: GlobalId) -> Vec<(ReplicaId, u64, u64)> {
        self.history_rows
            .range((id, ReplicaId(0), 0)..)
            .take_while(|((c, _, _), _)| *c == id)
            .map(|((_, replica, minute_ms), row)| {
                let max_lag_ms = match row.iter().nth(4) {
                    Some(Datum::Int64(lag)) => lag as u64,
                    other => unreachable!("a lag history row ends with its lag, not {other:?}"),
                };
                (*replica, *minute_ms, max_lag_ms)
            })
            .collect()
    }

    /// Removes every row whose key starts with `prefix` (a dropped replica or collection).
    pub fn remove_prefix(&mut self, kind: IntrospectionKind, prefix: &[Datum<'_>]) {
        let doomed: Vec<(IntrospectionKind, Row)> = self
            .rows
            .keys()
            .filter(|(k, key)| *k == kind && key.iter().take(prefix.len()).eq(prefix.iter().copied()))
            .cloned()
            .collect();
        for key in doomed {
            if let Some(old) = self.rows.remove(&key) {
                self.pending.push((kind, old, -1));
            }
        }
    }

    /// The current row of a key (of a relation that is not per collection).
    pub fn get(&self, kind: IntrospectionKind, key: &[Datum<'_>]) -> Option<&Row> {
        self.rows.get(&(kind, Row::pack(key.iter().copied())))
    }

    /// The current row of collection `id` on `replica` (of a relation that is per collection).
    pub fn get_for_collection(
        &self,
        kind: IntrospectionKind,
        replica: ReplicaId,
        id: GlobalId,
    ) -> Option<&Row> {
        self.collection_rows.get(&(kind, id, replica))
    }

    /// Every current row of a relation, sorted: what its storage collection holds once the
    /// differences drained so far are written.
    pub fn rows(&self, kind: IntrospectionKind) -> Vec<Row> {
        let mut rows: Vec<Row> = if kind == IntrospectionKind::WallclockLagHistory {
            self.history_rows.values().cloned().collect()
        } else if kind.is_per_collection() {
            self.collection_rows
                .iter()
                .filter(|((k, _, _), _)| *k == kind)
                .map(|(_, row)| row.clone())
                .collect()
        } else {
            self.rows.iter().filter(|((k, _), _)| *k == kind).map(|(_, row)| row.clone()).collect()
        };
        rows.sort();
        rows
    }

    /// Takes the differences accumulated since the last call.
    pub fn drain(&mut self) -> Vec<(IntrospectionKind, Row, Diff)> {
        std::mem::take(&mut self.pending)
    }

    /// The number of current rows.
    pub fn len(&self) -> usize {
        self.rows.len() + self.collection_rows.len() + self.history_rows.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.collection_rows.is_empty() && self.history_rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changing_a_row_retracts_the_old_one() {
        let mut state = IntrospectionState::default();
        let key = [Datum::Text("i1"), Datum::Text("r1")];
        state.set(IntrospectionKind::ReplicaStatus, &key, Some(&[Datum::Text("connected"), Datum::Null]));
        state.set(IntrospectionKind::ReplicaStatus, &key, Some(&[Datum::Text("connected"), Datum::Null]));
        state.set(
            IntrospectionKind::ReplicaStatus,
            &key,
            Some(&[Datum::Text("failed"), Datum::Text("boom")]),
        );
        state.remove_prefix(IntrospectionKind::ReplicaStatus, &key[..1]);
        let diffs: Vec<Diff> = state.drain().into_iter().map(|(_, _, d)| d).collect();
        assert_eq!(diffs, vec![1, -1, 1, -1]);
        assert!(state.is_empty());
    }
}
