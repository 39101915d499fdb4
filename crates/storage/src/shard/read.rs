//! Streaming reads of a shard's batches: [`SnapshotStream`] (the consolidated contents at `as_of`),
//! [`RangeStream`] (the updates at times in `[lower, upper)`) and [`MergeStream`] (compaction's merged
//! run), all reading one part per batch at a time.
//!
//! **What this is.** A snapshot is a k-way merge of the batches' runs (each sorted by `(row, time)`),
//! summing per row the diffs at times `<= as_of`: memory is one decoded part per batch (and the buffer of
//! the last one, reused) plus the [`SNAPSHOT_PREFETCH_PARTS`] parts per batch being fetched and decoded
//! ahead, whatever the size of the collection. The fetch tasks also check each part and sum its rows at
//! `as_of` ([`decode_part_at`]), in parallel with the merge and with each other, the rows lent out of the
//! part's bytes; the merge copies each row once, into the [`RowChunk`] it hands out (no allocation per
//! row: [`SnapshotStream::next_chunk`] builds owned rows, on two threads, for readers that keep them
//! all). It takes whole runs of rows that are below every other batch's head without comparing each
//! (one batch, or batches of disjoint rows, cost a few comparisons per part), and two batches whose
//! rows interleave one comparison per row, of the rows' abbreviated keys ([`LentRow::key`]) unless they
//! are equal. A snapshot of more than a quarter of the part cache reads its parts through the cache
//! without keeping them ([`SCAN_CACHE_FRACTION`]). A range read visits
//! the batches overlapping the range in order, one part at a time. Both take the state version they read
//! from as given, with the caller holding that version for garbage collection and the collection's since
//! at or before the times read (see [`super::ShardCollections`]). [`SnapshotStream::peak_buffered_bytes`]
//! reports the most part bytes held at once (the bound the huge-collection test asserts).
//!
//! **Errors.** A missing or corrupt part ends the stream with [`ReadError::Corrupt`] naming the collection
//! and the key (or [`ReadError::CollectionDropped`] if the shard was dropped meanwhile, which the caller
//! decides); an unavailable blob store with [`ReadError::Unavailable`].
//!
//! **Tests.** `tests/it/shards.rs` (snapshots, listens), `tests/it/faults.rs` (damaged parts, huge
//! collections).

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use frontiers::Antichain;
use protocol::{Diff, GlobalId, Row, RowRef};
use tokio::task::JoinHandle;

use crate::chunk::RowChunk;
use crate::error::ReadError;
use crate::metrics::PartReader;
use crate::shard::machine::{CacheUse, Machine, ReadPartError};
use crate::shard::part::{LentRow, Update, cmp_encodings, decode_part_at, encoded_len};
use crate::shard::state::{Batch, PartRef};

/// Turns a part read failure into the read error callers see.
pub(crate) fn read_error(id: GlobalId, error: ReadPartError) -> ReadError {
    match error {
        ReadPartError::Damaged(damage) => ReadError::Corrupt { id, what: damage.to_string() },
        ReadPartError::Unavailable(message) => ReadError::Unavailable(message),
    }
}

/// A part being fetched and decoded: its items, and its bytes when the items are lent out of them
/// (snapshots; empty otherwise).
type Fetch<T> = JoinHandle<Result<(Bytes, Vec<T>), ReadPartError>>;

/// Starts fetching and decoding a part on its own task, into a used buffer (empty) if it has one.
type Spawn<T> = Box<dyn Fn(PartRef, Vec<T>) -> Fetch<T> + Send + Sync>;

fn spawn_fetch(machine: &Arc<Machine>, part: PartRef, reader: PartReader) -> Fetch<Update> {
    let machine = Arc::clone(machine);
    tokio::spawn(async move { machine.read_part(&part, reader).await.map(|updates| (Bytes::new(), updates)) })
}

/// Fetches the parts of a snapshot at `as_of`, each decoded into its rows' counts at `as_of`, the rows
/// lent out of the part's bytes ([`decode_part_at`]): the checks, filtering and summing run on the fetch
/// tasks, in parallel with the merge.
fn spawn_snapshot_fetch(machine: Arc<Machine>, as_of: u64, cache_use: CacheUse) -> Spawn<LentRow> {
    Box::new(move |part, buffer| {
        let machine = Arc::clone(&machine);
        tokio::spawn(async move {
            let decode = |part: &PartRef, bytes: &Bytes| {
                decode_part_at(part, bytes, as_of, buffer).map(|rows| (bytes.clone(), rows))
            };
            machine.read_part_with(&part, PartReader::Snapshot, cache_use, decode).await
        })
    })
}

async fn join<T>(id: GlobalId, fetch: Fetch<T>) -> Result<(Bytes, Vec<T>), ReadError> {
    match fetch.await {
        Ok(result) => result.map_err(|e| read_error(id, e)),
        Err(error) => Err(ReadError::Unavailable(format!("a part read did not finish: {error}"))),
    }
}

/// A snapshot whose parts hold more than this fraction of the part cache's bound (`1 / 4`) reads them
/// without keeping them ([`CacheUse::Scan`]): one large read does not evict the parts the process's
/// listens and compaction use (as a database's sequential scans read through a small ring of buffers),
/// and its memory is the parts in flight, reused part after part. Kept parts still serve it.
pub const SCAN_CACHE_FRACTION: usize = 4;

/// How many parts a snapshot's cursor keeps fetching (and decoding, each on its own task) ahead of the
/// part it is merging: with two, decoding runs in parallel with the merge and with itself.
pub const SNAPSHOT_PREFETCH_PARTS: usize = 2;

/// One batch's run, read part by part with up to `depth` next parts fetched and decoded ahead: as
/// updates (compaction) or as rows' counts at a snapshot's `as_of` (each part's rows unique and sorted).
struct Cursor<T> {
    parts: VecDeque<PartRef>,
    /// The parts being fetched, in order, each with its size and number of updates.
    prefetch: VecDeque<(u64, u64, Fetch<T>)>,
    depth: usize,
    spawn: Spawn<T>,
    /// What is left of the loaded part.
    current: VecDeque<T>,
    /// The loaded part's bytes, when its items are lent out of them (empty otherwise).
    part: Bytes,
    current_bytes: u64,
    /// The buffer of the last part used up, for the next part to decode into (memory already mapped).
    spare: Vec<T>,
}

impl<T: Send + 'static> Cursor<T> {
    fn new(batch: &Batch, depth: usize, spawn: Spawn<T>) -> Self {
        assert!(depth >= 1, "a cursor fetches at least the next part");
        Cursor {
            parts: batch.parts.iter().cloned().collect(),
            prefetch: VecDeque::new(),
            depth,
            spawn,
            current: VecDeque::new(),
            part: Bytes::new(),
            current_bytes: 0,
            spare: Vec::new(),
        }
    }

    fn start_prefetch(&mut self) {
        while self.prefetch.len() < self.depth
            && let Some(part) = self.parts.pop_front()
        {
            let buffer = std::mem::take(&mut self.spare);
            self.prefetch.push_back((part.bytes, part.updates, (self.spawn)(part, buffer)));
        }
    }

    /// The next item without loading anything (`None` when the current part is used up).
    fn head(&self) -> Option<&T> {
        self.current.front()
    }

    /// Moves the next item out (it must exist).
    fn take(&mut self) -> T {
        self.current.pop_front().expect("the cursor has a loaded item")
    }

    /// Loads the next part when the current one is used up; `false` at the end of the run.
    async fn load(&mut self, id: GlobalId) -> Result<bool, ReadError> {
        while self.current.is_empty() {
            if self.spare.capacity() == 0 {
                self.spare = Vec::from(std::mem::take(&mut self.current));
            }
            self.start_prefetch();
            let Some((bytes, _, fetch)) = self.prefetch.pop_front() else {
                self.current_bytes = 0;
                self.part = Bytes::new();
                return Ok(false);
            };
            let (part, items) = join(id, fetch).await?;
            self.current = VecDeque::from(items);
            self.part = part;
            self.current_bytes = bytes;
            self.start_prefetch();
        }
        Ok(true)
    }

    /// The next item, loading the next part when the current one is used up; `None` at the end.
    async fn peek(&mut self, id: GlobalId) -> Result<Option<&T>, ReadError> {
        self.load(id).await?;
        Ok(self.head())
    }

    fn buffered_bytes(&self) -> u64 {
        self.current_bytes + self.prefetch.iter().map(|(bytes, _, _)| *bytes).sum::<u64>()
    }

    /// The bytes of the parts not yet used up (an upper bound on the bytes of the rows still to come).
    fn remaining_bytes(&self) -> u64 {
        let parts: u64 = self.parts.iter().map(|p| p.bytes).sum();
        parts + self.buffered_bytes()
    }

    /// The items not yet taken (an upper bound on the rows still to come from this run).
    fn remaining_updates(&self) -> u64 {
        let parts: u64 = self.parts.iter().map(|p| p.updates).sum();
        let fetching: u64 = self.prefetch.iter().map(|(_, updates, _)| *updates).sum();
        parts + fetching + self.current.len() as u64
    }
}

impl<T> Drop for Cursor<T> {
    fn drop(&mut self) {
        for (_, _, fetch) in self.prefetch.drain(..) {
            fetch.abort();
        }
    }
}

impl Cursor<LentRow> {
    /// The encoding of a lent row of the loaded part.
    fn row(&self, lent: &LentRow) -> &[u8] {
        &self.part[lent.start..lent.end]
    }

    /// The encoding of the next row (the cursor must be loaded).
    fn head_row(&self) -> &[u8] {
        self.row(self.head().expect("loaded"))
    }
}

/// The consolidated contents of a shard at `as_of`, in row order, in chunks; see the module documentation.
///
/// The merge runs in two layers: an asynchronous one that loads the next part of every cursor whose part
/// is used up (parts are fetched, checked, filtered to `as_of` and summed per row ahead, on their own
/// tasks, the rows lent out of the parts' bytes), and a synchronous one
/// (`merge_loaded`) that merges the loaded parts without awaiting until one of them
/// is used up, copying each row once, into the [`RowChunk`] it hands out. A row whose updates continue
/// into a cursor's next part stays `pending` across the two. With one batch left to read there is nothing
/// to merge: a loaded part's rows are unique, so all but its last move to the chunk as they are.
pub struct SnapshotStream {
    id: GlobalId,
    /// The runs not yet finished (a finished one is dropped).
    cursors: Vec<Cursor<LentRow>>,
    /// The row being summed (its encoding, shared with the part it came from), with its count at `as_of`
    /// so far.
    pending: Option<(Bytes, Diff)>,
    peak_buffered_bytes: u64,
    /// Whatever keeps the read valid (the caller's hold and version hold); dropped with the stream.
    _guard: Box<dyn Send + Sync>,
    as_of: u64,
}

impl std::fmt::Debug for SnapshotStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStream")
            .field("id", &self.id)
            .field("as_of", &self.as_of)
            .finish_non_exhaustive()
    }
}

/// Why [`SnapshotStream::merge_loaded`] stopped.
enum Stop {
    /// The chunk reached its size.
    Full,
    /// A cursor's part is used up: load the next one.
    Load,
}

impl SnapshotStream {
    /// A snapshot of `batches` (a state's) at `as_of`.
    pub(crate) fn new(
        id: GlobalId,
        machine: Arc<Machine>,
        batches: &[Batch],
        as_of: u64,
        guard: Box<dyn Send + Sync>,
    ) -> Self {
        // A batch starting after `as_of` holds only times after it.
        let read: Vec<&Batch> = batches.iter().filter(|b| b.lower.less_equal(&as_of)).collect();
        let bytes: u64 = read.iter().flat_map(|b| &b.parts).map(|p| p.bytes).sum();
        let scan = bytes > (machine.part_cache_bytes() / SCAN_CACHE_FRACTION) as u64;
        let cache_use = if scan { CacheUse::Scan } else { CacheUse::Keep };
        let cursors = read
            .into_iter()
            .map(|b| {
                let spawn = spawn_snapshot_fetch(Arc::clone(&machine), as_of, cache_use);
                Cursor::new(b, SNAPSHOT_PREFETCH_PARTS, spawn)
            })
            .collect();
        SnapshotStream { id, as_of, cursors, pending: None, peak_buffered_bytes: 0, _guard: guard }
    }

    /// The next rows (about `chunk_bytes` of them, counting each row's bytes plus 16:
    /// [`RowChunk::size_bytes`]), or `None` at the end. Every row appears once, with its total count at
    /// `as_of` (never zero).
    pub async fn next_rows(&mut self, chunk_bytes: usize) -> Result<Option<RowChunk>, ReadError> {
        // Room for what is left, up to the chunk's size: the parts' bytes bound the rows' encodings.
        let remaining: u64 = self.cursors.iter().map(Cursor::remaining_updates).sum();
        let remaining_bytes: u64 = self.cursors.iter().map(Cursor::remaining_bytes).sum();
        let limit = |n: u64, max: usize| usize::try_from(n).unwrap_or(usize::MAX).min(max);
        let mut chunk = RowChunk::with_capacity(
            limit(remaining, chunk_bytes / 16 + 1) + 1,
            limit(remaining_bytes, chunk_bytes.saturating_add(ROW_BYTES_SLACK)),
        );
        loop {
            for cursor in &mut self.cursors {
                cursor.load(self.id).await?;
            }
            let buffered = self.cursors.iter().map(Cursor::buffered_bytes).sum();
            self.peak_buffered_bytes = self.peak_buffered_bytes.max(buffered);
            self.cursors.retain(|c| c.head().is_some());
            if self.cursors.is_empty() {
                if let Some((row, count)) = self.pending.take()
                    && count != 0
                {
                    chunk.push(RowRef::from_encoding(&row), count);
                }
                break;
            }
            if let Stop::Full = self.merge_loaded(&mut chunk, chunk_bytes) {
                break;
            }
        }
        Ok((!chunk.is_empty()).then_some(chunk))
    }

    /// [`next_rows`](Self::next_rows) as owned rows (one [`Row`] each), for readers that keep them all.
    /// The rows of a large chunk are built on two threads: building a `Row` is an allocation per row,
    /// the larger part of an owned snapshot's cost.
    pub async fn next_chunk(&mut self, chunk_bytes: usize) -> Result<Option<Vec<(Row, Diff)>>, ReadError> {
        match self.next_rows(chunk_bytes).await? {
            Some(chunk) => chunk.into_rows().await.map(Some),
            None => Ok(None),
        }
    }

    /// Merges the loaded parts into `chunk` until it holds `chunk_bytes` or a cursor's part is used up.
    /// Every cursor has a loaded row on entry. Each row is copied once, into the chunk.
    fn merge_loaded(&mut self, chunk: &mut RowChunk, chunk_bytes: usize) -> Stop {
        debug_assert!(self.cursors.iter().all(|c| c.head().is_some()), "every cursor is loaded");
        loop {
            if let Some((row, mut count)) = self.pending.take() {
                for cursor in &mut self.cursors {
                    while let Some(item) = cursor.head() {
                        if cursor.row(item) != &row[..] {
                            break;
                        }
                        count = count
                            .checked_add(item.count)
                            .expect("the shard's count bound rules out overflow");
                        cursor.take();
                    }
                    if cursor.head().is_none() {
                        // The row may continue in this cursor's next part.
                        self.pending = Some((row, count));
                        return Stop::Load;
                    }
                }
                if count != 0 {
                    // The part's rows were validated when it was decoded.
                    chunk.push(RowRef::from_encoding(&row), count);
                    if chunk.size_bytes() >= chunk_bytes {
                        return Stop::Full;
                    }
                }
            }
            if let [a, b] = &mut self.cursors[..]
                && let Stop::Full = Self::merge_two(a, b, chunk, chunk_bytes)
            {
                return Stop::Full;
            }
            // The smallest head, and the smallest of the other cursors' heads (none if it is alone).
            let head = |i: usize| self.cursors[i].head_row();
            let (mut smallest, mut next) = (0, None::<usize>);
            for i in 1..self.cursors.len() {
                if head(i) < head(smallest) {
                    next = Some(smallest);
                    smallest = i;
                } else if next.is_none_or(|n| head(i) < head(n)) {
                    next = Some(i);
                }
            }
            self.cursors[smallest].current.make_contiguous();
            let movable = movable_rows(&self.cursors[smallest], next.map(|n| self.cursors[n].head_row()));
            let cursor = &mut self.cursors[smallest];
            let moved = Self::move_rows(cursor, movable, chunk, chunk_bytes);
            if chunk.size_bytes() >= chunk_bytes {
                return Stop::Full;
            }
            if moved == 0 {
                // The smallest head is not below another cursor's head, or is its part's last row.
                let LentRow { start, end, count, .. } = cursor.take();
                self.pending = Some((cursor.part.slice(start..end), count));
            }
        }
    }

    /// Merges two cursors' loaded parts into `chunk` row by row (one comparison per row: runs that
    /// interleave) while neither head is its part's last row (it may continue in the run's next part) and
    /// the chunk has room; an equal row in both is summed. Stops with `Full` when the chunk is full, and
    /// with `Load` when a head is its part's last row (for the general merge to go on).
    fn merge_two(
        a: &mut Cursor<LentRow>,
        b: &mut Cursor<LentRow>,
        chunk: &mut RowChunk,
        chunk_bytes: usize,
    ) -> Stop {
        a.current.make_contiguous();
        b.current.make_contiguous();
        let (xs, ys) = (a.current.as_slices().0, b.current.as_slices().0);
        // Neither part's last row: it may continue in the run's next part.
        let (x_end, y_end) = (xs.len().saturating_sub(1), ys.len().saturating_sub(1));
        let (mut i, mut j) = (0, 0);
        let mut stop = Stop::Load;
        while i < x_end && j < y_end {
            if chunk.size_bytes() >= chunk_bytes {
                stop = Stop::Full;
                break;
            }
            let (x, y) = (&xs[i], &ys[j]);
            // Most rows differ in their abbreviated keys, which compare without reading the rows.
            let order = x.key.cmp(&y.key).then_with(|| a.row(x).cmp(b.row(y)));
            // The parts' rows were validated when they were decoded.
            match order {
                std::cmp::Ordering::Less => {
                    chunk.push_from(&a.part, x.start..x.end, x.count);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    chunk.push_from(&b.part, y.start..y.end, y.count);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    let count =
                        x.count.checked_add(y.count).expect("the shard's count bound rules out overflow");
                    if count != 0 {
                        chunk.push_from(&a.part, x.start..x.end, count);
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        a.current.drain(..i);
        b.current.drain(..j);
        stop
    }

    /// Copies the first `movable` rows of `cursor`'s loaded part to `chunk` (fewer if the chunk fills
    /// first; [`movable_rows`] says which rows are final as they are). Answers how many moved.
    fn move_rows(
        cursor: &mut Cursor<LentRow>,
        movable: usize,
        chunk: &mut RowChunk,
        chunk_bytes: usize,
    ) -> usize {
        let mut n = 0;
        for item in cursor.current.iter().take(movable) {
            if chunk.size_bytes() >= chunk_bytes {
                break;
            }
            // The part's rows were validated when it was decoded.
            chunk.push_from(&cursor.part, item.start..item.end, item.count);
            n += 1;
        }
        cursor.current.drain(..n);
        n
    }

    /// An upper bound on the rows still to come (the updates of the parts not yet used up).
    pub fn rows_bound(&self) -> usize {
        let remaining: u64 = self.cursors.iter().map(Cursor::remaining_updates).sum();
        usize::try_from(remaining).unwrap_or(usize::MAX) + usize::from(self.pending.is_some())
    }

    /// The most part bytes this stream held at once so far (loaded parts and parts being fetched).
    pub fn peak_buffered_bytes(&self) -> u64 {
        self.peak_buffered_bytes
    }
}

/// A chunk's room for rows' bytes beyond its size: a chunk stops at the first row that reaches the size.
const ROW_BYTES_SLACK: usize = 4096;

/// How many rows at the start of `cursor`'s loaded part (unique, sorted, not zero, as [`decode_part_at`]
/// answers them) are below `below` (every other cursor's smallest head; `None`: no other cursor), never
/// counting the part's last row (it may continue in the run's next part). The pending row was summed
/// and emitted before, so such rows are final as they are: with runs that do not interleave (one batch,
/// or batches of disjoint rows) nearly every row moves without a comparison. The first rows are compared
/// one by one (runs that interleave row by row cost one comparison per row), then by galloping (a long
/// stretch costs a few comparisons). The cursor's loaded part must be contiguous.
fn movable_rows(cursor: &Cursor<LentRow>, below: Option<&[u8]>) -> usize {
    const LINEAR: usize = 4;
    let rows = cursor.current.as_slices().0;
    debug_assert_eq!(rows.len(), cursor.current.len(), "the loaded part is contiguous");
    let last = rows.len() - 1;
    let Some(bound) = below else { return last };
    let is_below = |i: usize| cmp_encodings(cursor.row(&rows[i]), bound).is_lt();
    let mut low = 0;
    while low < last.min(LINEAR) {
        if !is_below(low) {
            return low;
        }
        low += 1;
    }
    // Gallop: find a step past the rows below `bound`, then search the last step.
    let mut step = 1;
    while low + step <= last && is_below(low + step - 1) {
        low += step;
        step *= 2;
    }
    let high = (low + step).min(last);
    low + rows[low..high].partition_point(|item| cmp_encodings(cursor.row(item), bound).is_lt())
}

/// The merged, consolidated run of consecutive batches with times advanced for a compaction frontier
/// ([`crate::shard::part::advance`]), in `(row, time)` order, reading one part per batch at a time.
/// Advancing is monotone in time, so each input run stays sorted and a k-way merge suffices.
pub struct MergeStream {
    id: GlobalId,
    cursors: Vec<Cursor<Update>>,
    since: Antichain<u64>,
    upper: Antichain<u64>,
}

impl std::fmt::Debug for MergeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergeStream")
            .field("id", &self.id)
            .field("inputs", &self.cursors.len())
            .finish_non_exhaustive()
    }
}

impl MergeStream {
    /// The merge of `batches` (consecutive) advanced for `since`, ending at `upper`.
    pub(crate) fn new(
        id: GlobalId,
        machine: Arc<Machine>,
        batches: &[Batch],
        since: Antichain<u64>,
        upper: Antichain<u64>,
    ) -> Self {
        let cursors = batches
            .iter()
            .map(|b| {
                let machine = Arc::clone(&machine);
                let spawn: Spawn<Update> =
                    Box::new(move |part, _| spawn_fetch(&machine, part, PartReader::Compaction));
                Cursor::new(b, 1, spawn)
            })
            .collect();
        MergeStream { id, cursors, since, upper }
    }

    /// The next consolidated update, or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Update>, ReadError> {
        let advance = |t: u64| crate::shard::part::advance(t, &self.since, &self.upper);
        loop {
            let mut smallest: Option<(Row, u64)> = None;
            for cursor in &mut self.cursors {
                if let Some((row, time, _)) = cursor.peek(self.id).await? {
                    let time = advance(*time);
                    if smallest.as_ref().is_none_or(|(r, t)| (row, time) < (r, *t)) {
                        smallest = Some((row.clone(), time));
                    }
                }
            }
            let Some((row, time)) = smallest else { return Ok(None) };
            let mut sum: Diff = 0;
            for cursor in &mut self.cursors {
                while let Some((r, t, diff)) = cursor.peek(self.id).await? {
                    if *r != row || advance(*t) != time {
                        break;
                    }
                    sum = sum.checked_add(*diff).expect("the shard's count bound rules out overflow");
                    cursor.take();
                }
            }
            if sum != 0 {
                return Ok(Some((row, time, sum)));
            }
        }
    }
}

/// The updates of a shard at times in `[lower, upper)`, part by part; see the module documentation.
pub struct RangeStream {
    id: GlobalId,
    machine: Arc<Machine>,
    lower: u64,
    upper: Antichain<u64>,
    parts: VecDeque<PartRef>,
    prefetch: Option<Fetch<Update>>,
    _guard: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for RangeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeStream")
            .field("id", &self.id)
            .field("lower", &self.lower)
            .field("upper", &self.upper)
            .finish_non_exhaustive()
    }
}

impl Drop for RangeStream {
    fn drop(&mut self) {
        if let Some(fetch) = self.prefetch.take() {
            fetch.abort();
        }
    }
}

impl RangeStream {
    /// The updates of `batches` (a state's) at times in `[lower, upper)`.
    pub(crate) fn new(
        id: GlobalId,
        machine: Arc<Machine>,
        batches: &[Batch],
        lower: u64,
        upper: Antichain<u64>,
        guard: Box<dyn Send + Sync>,
    ) -> Self {
        let overlapping = batches.iter().filter(|b| {
            let after_lower = b.upper.as_option().is_none_or(|u| *u > lower);
            let before_upper = upper.as_option().is_none_or(|u| b.lower.less_than(u));
            after_lower && before_upper
        });
        let parts = overlapping.flat_map(|b| b.parts.iter().cloned()).collect();
        RangeStream { id, machine, lower, upper, parts, prefetch: None, _guard: guard }
    }

    /// The next updates in the range, about `chunk_bytes` of them (whole parts: small parts are
    /// gathered into one chunk, each part's updates sorted by time, then row), or `None` at the end.
    pub async fn next_chunk(&mut self, chunk_bytes: usize) -> Result<Option<Vec<Update>>, ReadError> {
        let mut chunk: Vec<Update> = Vec::new();
        while updates_bytes(&chunk) < chunk_bytes {
            let fetch = match self.prefetch.take() {
                Some(fetch) => fetch,
                None => match self.parts.pop_front() {
                    Some(part) => spawn_fetch(&self.machine, part, PartReader::Listen),
                    None => break,
                },
            };
            if let Some(next) = self.parts.pop_front() {
                self.prefetch = Some(spawn_fetch(&self.machine, next, PartReader::Listen));
            }
            let (_, mut updates) = join(self.id, fetch).await?;
            updates.retain(|(_, time, _)| *time >= self.lower && !self.upper.less_equal(time));
            updates.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
            chunk.extend(updates);
        }
        Ok((!chunk.is_empty()).then_some(chunk))
    }
}

/// The encoded size of updates (for chunking).
pub(crate) fn updates_bytes(updates: &[Update]) -> usize {
    updates.iter().map(encoded_len).sum()
}
