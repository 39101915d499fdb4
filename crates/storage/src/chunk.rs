//! [`RowChunk`]: rows with their counts, their encodings back to back in one buffer.
//!
//! **What this is.** The unit a snapshot is handed out in ([`crate::SnapshotChunks::next_rows`]): a
//! reader iterates the rows as [`RowRef`]s lent out of the chunk and copies into an owned [`Row`] only
//! what it keeps (a storage peek keeps the rows its filter passes). Filling a chunk copies each row's
//! bytes into one growing buffer: no allocation per row, which is what an owned `Row` per row costs (a
//! row longer than `Row`'s inline bytes is one heap allocation, and on a machine where fresh memory is
//! expensive that allocation is most of a snapshot's time). [`into_rows`](RowChunk::into_rows) makes
//! owned rows of a chunk for readers that keep everything, on two threads when the chunk is large.
//!
//! **What this is not.** A sorted or consolidated collection by itself: a chunk holds what was pushed,
//! in that order (a snapshot pushes its rows sorted, each once, with a non-zero count).
//!
//! **Invariant.** Only a [`RowRef`]'s bytes are pushed, so every row handed out is a valid row encoding:
//! bytes from outside the process become a `RowRef` only through the validating [`RowRef::from_bytes`].
//!
//! **Tests.** The doctests and unit tests below; `tests/it/listen.rs` and `tests/it/shards.rs`
//! (snapshots read by chunks on every backend).

use std::sync::Arc;

use protocol::{Diff, Row, RowRef};

use crate::error::ReadError;

/// A chunk of at least this many rows is made into owned rows on two threads
/// ([`RowChunk::into_rows`]).
const PARALLEL_OWNED_ROWS: usize = 16_384;

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

    /// Appends a copy of the row at `range` of `source`, with its count: [`push`](Self::push) for a row
    /// lent out of a larger buffer (a part's bytes). A short row is copied as a fixed number of bytes
    /// (those after it in `source` too, cut off again), which compiles to a few vector moves instead of
    /// a call to `memcpy`: most rows are short, and a snapshot copies every row once.
    ///
    /// The caller must have validated the row's encoding (the module's invariant), as
    /// [`RowRef::from_bytes`] does; this is why the method is not public.
    #[inline]
    pub(crate) fn push_from(&mut self, source: &[u8], range: std::ops::Range<usize>, diff: Diff) {
        const SHORT: usize = 32;
        let len = range.len();
        let old = self.bytes.len();
        match source.get(range.start..range.start + SHORT) {
            Some(padded) if len <= SHORT => {
                self.bytes.extend_from_slice(padded);
                self.bytes.truncate(old + len);
            }
            _ => self.bytes.extend_from_slice(&source[range]),
        }
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
        let mut start = 0;
        self.rows.iter().map(move |&(end, diff)| {
            // Only rows' encodings are pushed, each delimited by its end (the module's invariant).
            let row = RowRef::from_encoding(&self.bytes[start..end]);
            start = end;
            (row, diff)
        })
    }

    /// Owned copies of the rows and their counts.
    pub fn to_rows(&self) -> Vec<(Row, Diff)> {
        self.to_rows_in(0..self.len())
    }

    /// The rows and their counts as owned rows, in order: built on two threads (half on a blocking
    /// thread) when the chunk is large, since building a `Row` is an allocation per row, the larger part
    /// of an owned snapshot's cost.
    pub async fn into_rows(self) -> Result<Vec<(Row, Diff)>, ReadError> {
        self.into_rows_parallel_from(PARALLEL_OWNED_ROWS).await
    }

    /// [`into_rows`](Self::into_rows), on two threads from `parallel_from` rows on.
    async fn into_rows_parallel_from(self, parallel_from: usize) -> Result<Vec<(Row, Diff)>, ReadError> {
        if self.len() < parallel_from.max(2) {
            return Ok(self.to_rows());
        }
        let chunk = Arc::new(self);
        let (half, other) = (chunk.len() / 2, Arc::clone(&chunk));
        let second = tokio::task::spawn_blocking(move || other.to_rows_in(half..other.len()));
        let mut rows = chunk.to_rows_in(0..half);
        match second.await {
            Ok(second) => rows.extend(second),
            Err(error) => {
                return Err(ReadError::Unavailable(format!("building a snapshot's rows failed: {error}")));
            }
        }
        Ok(rows)
    }

    /// Owned copies of the rows at `indexes` and their counts (a range past the end panics).
    pub fn to_rows_in(&self, indexes: std::ops::Range<usize>) -> Vec<(Row, Diff)> {
        indexes
            .map(|index| self.get(index).expect("an index below the length"))
            .map(|(row, diff)| (row.to_row(), diff))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use protocol::Datum;

    use super::*;

    #[test]
    fn a_row_pushed_from_a_larger_buffer_is_copied_exactly_wherever_it_lies() {
        let rows: Vec<Row> = [0usize, 1, 5, 30, 31, 32, 33, 100]
            .iter()
            .map(|len| Row::pack([Datum::Text(&"x".repeat(*len))]))
            .collect();
        for row in &rows {
            let encoding = row.as_bytes();
            // The row at the start, in the middle and at the very end of a buffer with bytes around it.
            for (before, after) in [(0, 0), (0, 40), (7, 0), (7, 3), (7, 40)] {
                let mut source = vec![0xAB; before];
                source.extend_from_slice(encoding);
                source.extend(std::iter::repeat_n(0xCD, after));
                let mut chunk = RowChunk::default();
                chunk.push(rows[1].as_row_ref(), 1);
                chunk.push_from(&source, before..before + encoding.len(), -3);
                chunk.push(rows[2].as_row_ref(), 2);
                let expected =
                    RowChunk::from_rows(&[(rows[1].clone(), 1), (row.clone(), -3), (rows[2].clone(), 2)]);
                assert_eq!(
                    chunk,
                    expected,
                    "a row of {} bytes at {before} with {after} after",
                    encoding.len()
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_made_into_owned_rows_on_two_threads_keeps_every_row_in_order() {
        let rows: Vec<(Row, Diff)> = (0..1001i64)
            .map(|i| (Row::pack([Datum::Int64(i), Datum::Text("a text longer than inline")]), i - 500))
            .collect();
        let chunk = RowChunk::from_rows(&rows);
        for parallel_from in [0, 1, 2, 1000, 1001, 1002] {
            assert_eq!(
                chunk.clone().into_rows_parallel_from(parallel_from).await.unwrap(),
                rows,
                "from {parallel_from}"
            );
        }
        assert_eq!(RowChunk::default().into_rows_parallel_from(0).await.unwrap(), vec![]);
        assert_eq!(RowChunk::from_rows(&rows).into_rows().await.unwrap(), rows);
    }
}
