//! [`RowChunk`]: rows with their counts, their encodings back to back in one buffer.
//!
//! **What this is.** The unit a snapshot is handed out in ([`crate::SnapshotChunks::next_rows`]): a
//! reader iterates the rows as [`RowRef`]s lent out of the chunk and copies into an owned [`Row`] only
//! what it keeps (a storage peek keeps the rows its filter passes). Filling a chunk copies each row's
//! bytes into one growing buffer: no allocation per row, which is what an owned `Row` per row costs (a
//! row longer than `Row`'s inline bytes is one heap allocation, and on a machine where fresh memory is
//! expensive that allocation is most of a snapshot's time). [`to_rows`](RowChunk::to_rows) makes owned
//! rows of a chunk for readers that keep everything.
//!
//! **What this is not.** A sorted or consolidated collection by itself: a chunk holds what was pushed,
//! in that order (a snapshot pushes its rows sorted, each once, with a non-zero count).
//!
//! **Invariant.** Only a [`RowRef`]'s bytes are pushed, so every row handed out is a valid row encoding:
//! bytes from outside the process become a `RowRef` only through the validating [`RowRef::from_bytes`].
//!
//! **Tests.** The doctests below; `tests/it/listen.rs` and `tests/it/shards.rs` (snapshots read by
//! chunks on every backend).

use protocol::{Diff, Row, RowRef};

/// Rows and their counts, the rows' encodings back to back in one buffer; see the module documentation.
///
/// # Examples
/// ```
/// use protocol::{Datum, Row};
/// use storage::RowChunk;
/// let (one, two) = (Row::pack([Datum::Int64(1)]), Row::pack([Datum::Text("two")]));
/// let mut chunk = RowChunk::default();
/// chunk.push(one.as_row_ref(), 3);
/// chunk.push(two.as_row_ref(), -1);
/// assert_eq!(chunk.len(), 2);
/// assert_eq!(chunk.get(1), Some((two.as_row_ref(), -1)));
/// assert_eq!(chunk.iter().map(|(row, diff)| (row.to_row(), diff)).collect::<Vec<_>>(), chunk.to_rows());
/// // Each row counts for its bytes plus 16 (its time and count), as chunk sizes are counted everywhere.
/// assert_eq!(chunk.size_bytes(), one.byte_len() + two.byte_len() + 32);
/// assert_eq!(RowChunk::from_rows(&chunk.to_rows()), chunk);
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RowChunk {
    /// The rows' encodings, back to back.
    bytes: Vec<u8>,
    /// Each row's end in `bytes`, and its count.
    rows: Vec<(usize, Diff)>,
}

impl std::fmt::Debug for RowChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl RowChunk {
    /// An empty chunk with room for `rows` rows of `bytes` encoded bytes in all.
    pub fn with_capacity(rows: usize, bytes: usize) -> Self {
        RowChunk { bytes: Vec::with_capacity(bytes), rows: Vec::with_capacity(rows) }
    }

    /// A chunk holding copies of `rows`.
    pub fn from_rows(rows: &[(Row, Diff)]) -> Self {
        let bytes = rows.iter().map(|(row, _)| row.byte_len()).sum();
        let mut chunk = RowChunk::with_capacity(rows.len(), bytes);
        for (row, diff) in rows {
            chunk.push(row.as_row_ref(), *diff);
        }
        chunk
    }

    /// Appends a copy of `row` with its count.
    pub fn push(&mut self, row: RowRef<'_>, diff: Diff) {
        self.bytes.extend_from_slice(row.as_bytes());
        self.rows.push((self.bytes.len(), diff));
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the chunk holds no row.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The size the chunk counts for: each row's bytes plus 16 (the chunk sizes of
    /// [`crate::StorageCollections::snapshot_stream`]).
    pub fn size_bytes(&self) -> usize {
        self.bytes.len() + 16 * self.rows.len()
    }

    /// The `index`th row and its count.
    pub fn get(&self, index: usize) -> Option<(RowRef<'_>, Diff)> {
        let (end, diff) = *self.rows.get(index)?;
        let start = if index == 0 { 0 } else { self.rows[index - 1].0 };
        // Only rows' encodings are pushed, each delimited by its end (the module's invariant).
        Some((RowRef::from_encoding(&self.bytes[start..end]), diff))
    }

    /// The rows and their counts, in the order they were pushed.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (RowRef<'_>, Diff)> + '_ {
        (0..self.rows.len()).map(|index| self.get(index).expect("an index below the length"))
    }

    /// Owned copies of the rows and their counts.
    pub fn to_rows(&self) -> Vec<(Row, Diff)> {
        self.to_rows_in(0..self.len())
    }

    /// Owned copies of the rows at `indexes` and their counts (a range past the end panics).
    pub fn to_rows_in(&self, indexes: std::ops::Range<usize>) -> Vec<(Row, Diff)> {
        indexes
            .map(|index| self.get(index).expect("an index below the length"))
            .map(|(row, diff)| (row.to_row(), diff))
            .collect()
    }
}
