//! Streaming reads of a shard's batches: [`SnapshotStream`] (the consolidated contents at `as_of`),
//! [`RangeStream`] (the updates at times in `[lower, upper)`) and [`MergeStream`] (compaction's merged
//! run), all reading one part per batch at a time.
//!
//! **What this is.** A snapshot is a k-way merge of the batches' runs (each sorted by `(row, time)`),
//! summing per row the diffs at times `<= as_of`: memory is one decoded part per batch plus the part being
//! prefetched, whatever the size of the collection. A range read visits the batches overlapping the range
//! in order, one part at a time. Both take the state version they read from as given, with the caller
//! holding that version for garbage collection and the collection's since at or before the times read
//! (see [`super::ShardCollections`]). [`SnapshotStream::peak_buffered_bytes`] reports the most part bytes
//! held at once (the bound the huge-collection test asserts).
//!
//! **Errors.** A missing or corrupt part ends the stream with [`ReadError::Corrupt`] naming the collection
//! and the key (or [`ReadError::CollectionDropped`] if the shard was dropped meanwhile, which the caller
//! decides); an unavailable blob store with [`ReadError::Unavailable`].
//!
//! **Tests.** `tests/it/shards.rs` (snapshots, listens), `tests/it/faults.rs` (damaged parts, huge
//! collections).

use std::collections::VecDeque;
use std::sync::Arc;

use frontiers::Antichain;
use protocol::{Diff, GlobalId, Row};
use tokio::task::JoinHandle;

use crate::error::ReadError;
use crate::shard::machine::{Machine, ReadPartError};
use crate::shard::part::{Update, encoded_len};
use crate::shard::state::{Batch, PartRef};

/// Turns a part read failure into the read error callers see.
pub(crate) fn read_error(id: GlobalId, error: ReadPartError) -> ReadError {
    match error {
        ReadPartError::Damaged(damage) => ReadError::Corrupt { id, what: damage.to_string() },
        ReadPartError::Unavailable(message) => ReadError::Unavailable(message),
    }
}

type Fetch = JoinHandle<Result<Vec<Update>, ReadPartError>>;

fn spawn_fetch(machine: &Arc<Machine>, part: PartRef) -> Fetch {
    let machine = Arc::clone(machine);
    tokio::spawn(async move { machine.read_part(&part).await })
}

async fn join(id: GlobalId, fetch: Fetch) -> Result<Vec<Update>, ReadError> {
    match fetch.await {
        Ok(result) => result.map_err(|e| read_error(id, e)),
        Err(error) => Err(ReadError::Unavailable(format!("a part read did not finish: {error}"))),
    }
}

/// One batch's run, read part by part with the next part prefetched.
struct Cursor {
    parts: VecDeque<PartRef>,
    prefetch: Option<(u64, Fetch)>,
    current: Vec<Update>,
    current_bytes: u64,
    position: usize,
}

impl Cursor {
    fn new(batch: &Batch) -> Self {
        Cursor {
            parts: batch.parts.iter().cloned().collect(),
            prefetch: None,
            current: Vec::new(),
            current_bytes: 0,
            position: 0,
        }
    }

    fn start_prefetch(&mut self, machine: &Arc<Machine>) {
        if self.prefetch.is_none()
            && let Some(part) = self.parts.pop_front()
        {
            self.prefetch = Some((part.bytes, spawn_fetch(machine, part)));
        }
    }

    /// The next update without loading anything (call [`peek`](Self::peek) first).
    fn head(&self) -> Option<&Update> {
        self.current.get(self.position)
    }

    /// Moves the next update out (it must exist).
    fn take(&mut self) -> Update {
        let update = std::mem::take(&mut self.current[self.position]);
        self.position += 1;
        update
    }

    /// The next update, loading the next part when the current one is used up; `None` at the end.
    async fn peek(&mut self, id: GlobalId, machine: &Arc<Machine>) -> Result<Option<&Update>, ReadError> {
        while self.position == self.current.len() {
            self.start_prefetch(machine);
            let Some((bytes, fetch)) = self.prefetch.take() else {
                self.current = Vec::new();
                self.current_bytes = 0;
                self.position = 0;
                return Ok(None);
            };
            self.current = join(id, fetch).await?;
            self.current_bytes = bytes;
            self.position = 0;
            self.start_prefetch(machine);
        }
        Ok(self.current.get(self.position))
    }

    fn buffered_bytes(&self) -> u64 {
        self.current_bytes + self.prefetch.as_ref().map_or(0, |(bytes, _)| *bytes)
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        if let Some((_, fetch)) = self.prefetch.take() {
            fetch.abort();
        }
    }
}

/// The consolidated contents of a shard at `as_of`, in row order, in chunks; see the module documentation.
pub struct SnapshotStream {
    id: GlobalId,
    machine: Arc<Machine>,
    as_of: u64,
    cursors: Vec<Cursor>,
    peak_buffered_bytes: u64,
    /// Whatever keeps the read valid (the caller's hold and version hold); dropped with the stream.
    _guard: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for SnapshotStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStream")
            .field("id", &self.id)
            .field("as_of", &self.as_of)
            .finish_non_exhaustive()
    }
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
        let cursors = batches.iter().filter(|b| b.lower.less_equal(&as_of)).map(Cursor::new).collect();
        SnapshotStream { id, machine, as_of, cursors, peak_buffered_bytes: 0, _guard: guard }
    }

    /// The next rows (about `chunk_bytes` of them), or `None` at the end. Every row appears once, with its
    /// total count at `as_of` (never zero).
    pub async fn next_chunk(&mut self, chunk_bytes: usize) -> Result<Option<Vec<(Row, Diff)>>, ReadError> {
        let mut chunk = Vec::new();
        let mut bytes = 0;
        while bytes < chunk_bytes {
            let Some(row) = self.next_row().await? else { break };
            bytes += row.0.byte_len() + 16;
            chunk.push(row);
        }
        Ok((!chunk.is_empty()).then_some(chunk))
    }

    /// The next row with a non-zero count. Rows are moved out of the decoded parts, never copied.
    async fn next_row(&mut self) -> Result<Option<(Row, Diff)>, ReadError> {
        loop {
            let mut smallest: Option<usize> = None;
            for i in 0..self.cursors.len() {
                if self.cursors[i].peek(self.id, &self.machine).await?.is_none() {
                    continue;
                }
                let row = &self.cursors[i].head().expect("peeked").0;
                if smallest.is_none_or(|s| *row < self.cursors[s].head().expect("peeked").0) {
                    smallest = Some(i);
                }
            }
            let buffered = self.cursors.iter().map(Cursor::buffered_bytes).sum();
            self.peak_buffered_bytes = self.peak_buffered_bytes.max(buffered);
            let Some(first) = smallest else { return Ok(None) };
            let (row, time, diff) = self.cursors[first].take();
            let mut count: Diff = if time <= self.as_of { diff } else { 0 };
            for cursor in &mut self.cursors {
                while let Some((r, time, diff)) = cursor.peek(self.id, &self.machine).await? {
                    if *r != row {
                        break;
                    }
                    if *time <= self.as_of {
                        count = count.checked_add(*diff).expect("the shard's count bound rules out overflow");
                    }
                    cursor.position += 1;
                }
            }
            if count != 0 {
                return Ok(Some((row, count)));
            }
        }
    }

    /// The most part bytes this stream held at once so far.
    pub fn peak_buffered_bytes(&self) -> u64 {
        self.peak_buffered_bytes
    }
}

/// The merged, consolidated run of consecutive batches with times advanced for a compaction frontier
/// ([`crate::shard::part::advance`]), in `(row, time)` order, reading one part per batch at a time.
/// Advancing is monotone in time, so each input run stays sorted and a k-way merge suffices.
pub struct MergeStream {
    id: GlobalId,
    machine: Arc<Machine>,
    cursors: Vec<Cursor>,
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
        MergeStream { id, machine, cursors: batches.iter().map(Cursor::new).collect(), since, upper }
    }

    /// The next consolidated update, or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Update>, ReadError> {
        let advance = |t: u64| crate::shard::part::advance(t, &self.since, &self.upper);
        loop {
            let mut smallest: Option<(Row, u64)> = None;
            for cursor in &mut self.cursors {
                if let Some((row, time, _)) = cursor.peek(self.id, &self.machine).await? {
                    let time = advance(*time);
                    if smallest.as_ref().is_none_or(|(r, t)| (row, time) < (r, *t)) {
                        smallest = Some((row.clone(), time));
                    }
                }
            }
            let Some((row, time)) = smallest else { return Ok(None) };
            let mut sum: Diff = 0;
            for cursor in &mut self.cursors {
                while let Some((r, t, diff)) = cursor.peek(self.id, &self.machine).await? {
                    if *r != row || advance(*t) != time {
                        break;
                    }
                    sum = sum.checked_add(*diff).expect("the shard's count bound rules out overflow");
                    cursor.position += 1;
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
    prefetch: Option<Fetch>,
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
                    Some(part) => spawn_fetch(&self.machine, part),
                    None => break,
                },
            };
            if let Some(next) = self.parts.pop_front() {
                self.prefetch = Some(spawn_fetch(&self.machine, next));
            }
            let mut updates = join(self.id, fetch).await?;
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
