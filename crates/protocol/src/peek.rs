//! Peeks: a snapshot of one collection at one time, shaped by a [`MapFilterProject`] and a
//! [`RowSetFinishing`], and the [`PeekResponse`] that answers it.
//!
//! Division of labour: the replica answers with the rows of its share of the collection (one process of a
//! multi-process replica answers for its workers only), after the map/filter/project and a *partial*
//! finishing ([`RowSetFinishing::partial`]: sorted, and cut to `offset + limit` rows, which keeps every row
//! the final answer could need). The replica client takes the union of the processes' parts; the controller
//! applies the full finishing once ([`RowSetFinishing::finish`]).

use std::cmp::Ordering;
use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};

use frontiers::Timestamp;

use crate::expr::MapFilterProject;
use crate::id::{GlobalId, PeekId};
use crate::plan::{ColumnOrder, compare_datums};
use crate::row::Row;

/// What a peek reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PeekTarget {
    /// An index exported by a dataflow on the instance (answered by replicas from their arrangements).
    Index {
        /// The index.
        id: GlobalId,
    },
    /// A storage collection (answered from a storage snapshot).
    Storage {
        /// The collection.
        id: GlobalId,
    },
}

impl PeekTarget {
    /// The collection read.
    pub fn id(&self) -> GlobalId {
        match self {
            PeekTarget::Index { id } | PeekTarget::Storage { id } => *id,
        }
    }
}

/// A peek request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "T: Timestamp")]
pub struct Peek<T = u64> {
    /// The peek's id, unique for the controller's lifetime.
    pub uuid: PeekId,
    /// What to read.
    pub target: PeekTarget,
    /// When to read it: the answer is the collection's contents at exactly this time.
    pub timestamp: T,
    /// Key values to look up (rows of the index key's arity); `None` scans everything. Index peeks only.
    pub literal_constraints: Option<Vec<Row>>,
    /// Applied to each row of the collection (its `input_arity` is the collection's arity).
    pub map_filter_project: MapFilterProject,
    /// Ordering, offset and limit of the result.
    pub finishing: RowSetFinishing,
}

/// Ordering, offset and limit applied to a peek's result rows.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct RowSetFinishing {
    /// The order of the result (columns of the map/filter/project output); ties broken by the whole row.
    pub order_by: Vec<ColumnOrder>,
    /// At most this many rows (counting multiplicity), if set.
    pub limit: Option<usize>,
    /// Skip this many leading rows (counting multiplicity).
    pub offset: usize,
}

impl RowSetFinishing {
    /// No ordering, offset or limit.
    pub fn unordered() -> Self {
        RowSetFinishing::default()
    }

    /// The finishing a part of the answer gets before the parts are combined: the same order, no offset, and
    /// a limit of `offset + limit`, so the union of the parts still holds every row of the final answer.
    ///
    /// # Examples
    /// ```
    /// use protocol::{ColumnOrder, RowSetFinishing};
    /// let f = RowSetFinishing { order_by: vec![ColumnOrder::asc(0)], limit: Some(10), offset: 5 };
    /// let p = f.partial();
    /// assert_eq!((p.limit, p.offset), (Some(15), 0));
    /// ```
    pub fn partial(&self) -> RowSetFinishing {
        RowSetFinishing {
            order_by: self.order_by.clone(),
            limit: self.limit.map(|limit| limit.saturating_add(self.offset)),
            offset: 0,
        }
    }

    /// Sorts `rows` by `order_by` (then by the whole row, so the result is deterministic), then applies
    /// offset and limit counting multiplicities.
    ///
    /// # Examples
    /// ```
    /// use std::num::NonZeroU64;
    /// use protocol::{ColumnOrder, Datum, Row, RowSetFinishing};
    /// let n = |x| NonZeroU64::new(x).unwrap();
    /// let r = |i| Row::pack([Datum::Int64(i)]);
    /// let rows = vec![(r(3), n(1)), (r(1), n(2)), (r(2), n(1))];
    /// let f = RowSetFinishing { order_by: vec![ColumnOrder::desc(0)], limit: Some(2), offset: 1 };
    /// assert_eq!(f.finish(rows), vec![(r(2), n(1)), (r(1), n(1))]);
    /// ```
    pub fn finish(&self, mut rows: Vec<(Row, NonZeroU64)>) -> Vec<(Row, NonZeroU64)> {
        if !self.order_by.is_empty() || self.limit.is_some() || self.offset > 0 {
            let mut keyed: Vec<(Vec<crate::Datum<'_>>, usize)> =
                rows.iter().enumerate().map(|(i, (row, _))| (row.unpack(), i)).collect();
            keyed.sort_by(|(a, ai), (b, bi)| match compare_datums(&self.order_by, a, b) {
                Ordering::Equal => ai.cmp(bi),
                other => other,
            });
            let order: Vec<usize> = keyed.into_iter().map(|(_, i)| i).collect();
            let mut slots: Vec<Option<(Row, NonZeroU64)>> = rows.drain(..).map(Some).collect();
            rows = order.into_iter().filter_map(|i| slots[i].take()).collect();
        }
        crate::plan::slice_ranked(
            rows.into_iter().map(|(row, count)| (row, count.get())),
            self.offset,
            self.limit,
        )
        .into_iter()
        .map(|(row, count)| (row, NonZeroU64::new(count).expect("slice_ranked drops zero counts")))
        .collect()
    }
}

/// The answer to a peek.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeekResponse {
    /// The rows, with multiplicities.
    Rows(Vec<(Row, NonZeroU64)>),
    /// The peek failed (a data error such as division by zero in the collection, a time before the
    /// collection's since, an unknown collection).
    Error(String),
    /// The peek was cancelled before it was answered.
    Canceled,
    /// The result exists but is too large to send: its size exceeds the `max_result_size_bytes` parameter
    /// or the connection's maximum frame. Large results do not have a path of their own yet; the caller
    /// gets this instead of a connection that cannot carry the answer.
    ResultTooLarge {
        /// The result's size in bytes (rows' encoded bytes times multiplicity, or the encoded frame).
        size_bytes: u64,
        /// The limit it exceeds.
        max_bytes: u64,
    },
}

impl PeekResponse {
    /// Combines the answers of the processes of one replica: the union of rows (equal rows from different
    /// parts are consolidated into one entry); an error from any part wins (the first in order, a
    /// too-large part counting as an error); `Canceled` if any part was cancelled and none failed.
    ///
    /// # Examples
    /// ```
    /// use std::num::NonZeroU64;
    /// use protocol::{Datum, PeekResponse, Row};
    /// let one = NonZeroU64::new(1).unwrap();
    /// let a = PeekResponse::Rows(vec![(Row::pack([Datum::Int64(1)]), one)]);
    /// let b = PeekResponse::Rows(vec![(Row::pack([Datum::Int64(2)]), one)]);
    /// assert!(matches!(PeekResponse::union([a.clone(), b]), PeekResponse::Rows(rows) if rows.len() == 2));
    /// assert_eq!(PeekResponse::union([a, PeekResponse::Error("boom".into())]), PeekResponse::Error("boom".into()));
    /// ```
    pub fn union(parts: impl IntoIterator<Item = PeekResponse>) -> PeekResponse {
        let mut rows = Vec::new();
        let mut canceled = false;
        for part in parts {
            match part {
                PeekResponse::Rows(part) => rows.extend(part),
                PeekResponse::Error(error) => return PeekResponse::Error(error),
                too_large @ PeekResponse::ResultTooLarge { .. } => return too_large,
                PeekResponse::Canceled => canceled = true,
            }
        }
        if canceled {
            return PeekResponse::Canceled;
        }
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut consolidated: Vec<(Row, NonZeroU64)> = Vec::with_capacity(rows.len());
        for (row, count) in rows {
            match consolidated.last_mut() {
                Some((last, total)) if *last == row => *total = total.saturating_add(count.get()),
                _ => consolidated.push((row, count)),
            }
        }
        PeekResponse::Rows(consolidated)
    }
}
