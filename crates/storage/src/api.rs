//! The public storage API: the [`StorageCollections`] trait and the plain data types it speaks.
//!
//! **What this is.** The contract every storage implementation meets: the shards
//! ([`crate::ShardCollections`]), the embedded store ([`crate::InProcess`]), and anything a service plugs in
//! instead. **What this is not:** an implementation; the semantics are stated here.
//!
//! **Semantics in brief** (DESIGN §2). A collection has a `since` and an `upper`; a time `t` is readable iff
//! `since <= t < upper`. `append` is compare-and-append over one or more collections, atomic across all of
//! them, and durable before it returns `Ok`. `since` is the meet of every outstanding read hold, including
//! the one the collection's own [`ReadPolicy`] keeps. Reads before `since` are errors, never stale data.
//!
//! **Tests.** `tests/it/` runs the same scenarios against `InProcess` and against the shards on every backend.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use futures::stream::{BoxStream, Stream, StreamExt};

use frontiers::{Antichain, ReadHold, ReadPolicy};
use protocol::{Diff, GlobalId, RelationDesc, Row};
use serde::{Deserialize, Serialize};

use crate::chunk::RowChunk;
use crate::error::{AppendError, CreateError, DropError, HoldError, ReadError};
use crate::listen::{FrontierWatch, Listen};

/// A read hold on a storage collection. Dropping it releases it.
pub type StorageReadHold = ReadHold<GlobalId, u64>;

/// A boxed, sendable future: what the object-safe [`StorageCollections`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The two frontiers of a collection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionFrontiers {
    /// The read frontier: history before it may be compacted. Empty when nothing is readable any more.
    pub since: Antichain<u64>,
    /// The write frontier: every update at a time before it is known. Empty once the collection is closed.
    pub upper: Antichain<u64>,
}

/// One collection's part of an atomic [`StorageCollections::append`].
///
/// Valid iff the collection exists, its upper equals `expected_upper`, `new_upper` is strictly beyond
/// `expected_upper`, every update's time lies in `[expected_upper, new_upper)`, and every row matches the
/// collection's `RelationDesc`. An append with no updates that only advances the upper is valid: it is how
/// time moves forward.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendRequest {
    /// The collection.
    pub id: GlobalId,
    /// The updates, at times in `[expected_upper, new_upper)`.
    pub updates: Vec<(Row, u64, Diff)>,
    /// The upper the caller believes the collection has (compare-and-append).
    pub expected_upper: Antichain<u64>,
    /// The upper after the append.
    pub new_upper: Antichain<u64>,
}

/// One event of a [`Listen`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListenEvent {
    /// Updates. The first event of a listen is the snapshot at `as_of` (every row at time `as_of`,
    /// consolidated, possibly empty); later ones carry updates at times beyond `as_of` in their own times.
    /// Large batches are split over several events; an empty `Updates` is sent only as the snapshot.
    Updates(Vec<(Row, u64, Diff)>),
    /// Every update at a time before this frontier has been delivered.
    Progress(Antichain<u64>),
}

/// The storage layer as the controller and compute replicas see it.
///
/// Every method is a boxed future so the trait is object-safe (`Arc<dyn StorageCollections>`).
pub trait StorageCollections: Send + Sync + std::fmt::Debug {
    /// Creates a collection with `since = upper = [0]` and the default read policy. Idempotent when a
    /// collection with this id and the same `desc` exists; [`CreateError::SchemaMismatch`] with a different
    /// one; [`CreateError::AlreadyDropped`] if the id was dropped before. Durable before `Ok`.
    fn create_collection(&self, id: GlobalId, desc: RelationDesc) -> BoxFuture<'_, Result<(), CreateError>>;

    /// Drops a collection: its data is reclaimed, its read policy's hold released, its listeners end with
    /// [`ReadError::CollectionDropped`]. Holds still outstanding on it keep working as values but hold
    /// nothing. Durable before `Ok`.
    fn drop_collection(&self, id: GlobalId) -> BoxFuture<'_, Result<(), DropError>>;

    /// Every collection with its desc, in id order.
    fn list_collections(&self) -> BoxFuture<'_, Result<Vec<(GlobalId, RelationDesc)>, ReadError>>;

    /// The collection's current `since` and `upper`.
    fn frontiers(&self, id: GlobalId) -> BoxFuture<'_, Result<CollectionFrontiers, ReadError>>;

    /// Compare-and-append to one or more collections, atomically: all requests take effect or none does.
    /// Requests naming the same collection apply in order (the second's `expected_upper` is the first's
    /// `new_upper`). `Ok` only once the append is durable.
    fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'_, Result<(), AppendError>>;

    /// A new read hold on `id` at `frontier`, which must be beyond the collection's since.
    fn acquire_read_hold(
        &self,
        id: GlobalId,
        frontier: Antichain<u64>,
    ) -> BoxFuture<'_, Result<StorageReadHold, HoldError>>;

    /// Replaces the collection's read policy. The policy's hold only moves forward: a more conservative
    /// policy cannot bring back history that is already compacted.
    fn set_read_policy(&self, id: GlobalId, policy: ReadPolicy<u64>) -> BoxFuture<'_, Result<(), HoldError>>;

    /// The consolidated contents at `as_of`, sorted by row. Errors with [`ReadError::BeforeSince`] if
    /// `as_of` is before the since. If `as_of` is not yet complete, waits for the upper to pass it, up to
    /// the snapshot timeout (30 s by default), then errors with [`ReadError::NotYetReadable`].
    fn snapshot(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Vec<(Row, Diff)>, ReadError>>;

    /// The same contents as [`snapshot`](Self::snapshot), with the same errors and the same wait, handed
    /// out in chunks of about `chunk_bytes` (see [`SnapshotChunks`]): every row once, with its non-zero
    /// count. The contents are those at `as_of` however the since moves while the stream lives (the shard
    /// engine holds `as_of` until the stream is dropped), and a reader that stops early holds no more than
    /// the chunks it took and what the implementation reads ahead.
    ///
    /// The provided implementation reads the snapshot part of a [`listen`](Self::listen) (which the
    /// embedded store streams from memory) once the upper is past `as_of`; before that it waits in `snapshot` and hands out that
    /// answer in chunks. The shard engine overrides it with its own part-by-part stream.
    fn snapshot_stream(
        &self,
        id: GlobalId,
        as_of: u64,
        chunk_bytes: usize,
    ) -> BoxFuture<'_, Result<SnapshotChunks, ReadError>> {
        Box::pin(async move {
            let frontiers = self.frontiers(id).await?;
            if frontiers.upper.less_equal(&as_of) {
                let rows = self.snapshot(id, as_of).await?;
                return Ok(SnapshotChunks::from_rows(rows, chunk_bytes));
            }
            let listen = self.listen(id, as_of).await?;
            Ok(SnapshotChunks::from_listen(listen, as_of, chunk_bytes))
        })
    }

    /// A stream of the collection's changes from `as_of` on: first the snapshot at `as_of` (waiting, without
    /// a timeout, for `as_of` to become complete), then `Progress(upper)`, then for every append its updates
    /// followed by `Progress(new upper)`. The listen holds the collection at what it has delivered, so a
    /// slow listener never loses history (and holds compaction back meanwhile).
    fn listen(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Listen, ReadError>>;

    /// A stream of frontier changes: first the current frontiers of every collection, then every change
    /// (`None` once a collection is dropped). Changes to one collection may be coalesced.
    fn watch_frontiers(&self) -> BoxFuture<'_, Result<FrontierWatch, ReadError>>;
}

/// The chunk size the system's own readers of a snapshot stream ask for (the storage peeks of compute
/// and of the controller, a whole snapshot read as owned rows): large enough that a chunk's fixed costs
/// vanish among its rows, small enough that its buffers are used again chunk after chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// A snapshot handed out chunk by chunk ([`StorageCollections::snapshot_stream`]), as owned rows
/// ([`next_chunk`](Self::next_chunk)) or as rows lent out of a [`RowChunk`]
/// ([`next_rows`](Self::next_rows): a reader that keeps only some rows copies only those). The shard
/// engine's snapshots are made as `RowChunk`s, so `next_rows` hands them out as they are and
/// `next_chunk` builds a `Row` per row; the other sources (a listen, a snapshot read whole) are made of
/// owned rows, and it is the other way around.
///
/// **Invariants.** No chunk is empty, and a chunk ends with the row that brings it to the stream's
/// `chunk_bytes` (rows' encoded bytes plus 16 per row), so it exceeds that by one row at most; after an
/// error or the end, [`next_chunk`](Self::next_chunk) and [`next_rows`](Self::next_rows) keep answering
/// `Ok(None)`. Dropping the stream releases what keeps `as_of` readable.
pub struct SnapshotChunks {
    inner: Pieces,
    chunk_bytes: usize,
    /// Rows received in a larger piece than `chunk_bytes`, handed out in later chunks.
    pending: VecDeque<(Row, Diff)>,
    done: bool,
}

/// Where a [`SnapshotChunks`]' rows come from.
enum Pieces {
    /// Owned rows in pieces of any size.
    Rows(BoxStream<'static, Result<Vec<(Row, Diff)>, ReadError>>),
    /// Chunks already cut to the stream's size by their maker.
    Chunks(BoxStream<'static, Result<RowChunk, ReadError>>),
}

impl std::fmt::Debug for SnapshotChunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotChunks")
            .field("chunk_bytes", &self.chunk_bytes)
            .field("pending", &self.pending.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// The size a row counts for in a chunk.
fn chunk_size(row: &Row) -> usize {
    row.byte_len() + 16
}

impl SnapshotChunks {
    /// Chunks out of `stream` (pieces of any size, re-cut to `chunk_bytes`; empty pieces are skipped).
    pub fn new(
        stream: impl Stream<Item = Result<Vec<(Row, Diff)>, ReadError>> + Send + 'static,
        chunk_bytes: usize,
    ) -> Self {
        SnapshotChunks {
            inner: Pieces::Rows(stream.boxed()),
            chunk_bytes,
            pending: VecDeque::new(),
            done: false,
        }
    }

    /// Chunks made by `stream`, which must make them as this type's invariants say for `chunk_bytes`
    /// (the shard engine's snapshot does); they are handed out as they come, empty ones skipped.
    pub fn from_row_chunks(
        stream: impl Stream<Item = Result<RowChunk, ReadError>> + Send + 'static,
        chunk_bytes: usize,
    ) -> Self {
        SnapshotChunks {
            inner: Pieces::Chunks(stream.boxed()),
            chunk_bytes,
            pending: VecDeque::new(),
            done: false,
        }
    }

    /// Chunks of a snapshot already read whole.
    pub fn from_rows(rows: Vec<(Row, Diff)>, chunk_bytes: usize) -> Self {
        SnapshotChunks::new(futures::stream::iter([Ok(rows)]), chunk_bytes)
    }

    /// The snapshot part of a listen at `as_of`, in chunks: its updates at `as_of`, up to the first
    /// progress or the first update beyond `as_of` (a listen that started late may go on without a progress
    /// in between).
    pub fn from_listen(listen: crate::listen::Listen, as_of: u64, chunk_bytes: usize) -> Self {
        let stream = futures::stream::unfold(Some(listen), move |listen| async move {
            let mut listen = listen?;
            match listen.next().await {
                Ok(ListenEvent::Updates(updates)) => {
                    let beyond = updates.iter().any(|(_, time, _)| *time > as_of);
                    let rows = updates
                        .into_iter()
                        .filter(|(_, time, _)| *time <= as_of)
                        .map(|(row, _, diff)| (row, diff));
                    Some((Ok(rows.collect()), (!beyond).then_some(listen)))
                }
                Ok(ListenEvent::Progress(_)) => None,
                Err(error) => Some((Err(error), None)),
            }
        });
        SnapshotChunks::new(stream, chunk_bytes)
    }

    /// The next chunk as owned rows, or `None` at the end.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<(Row, Diff)>>, ReadError> {
        let chunks = match &mut self.inner {
            Pieces::Rows(rows) => {
                return Self::next_owned(rows, &mut self.pending, &mut self.done, self.chunk_bytes).await;
            }
            Pieces::Chunks(chunks) => chunks,
        };
        match Self::next_made(chunks, &mut self.done).await? {
            Some(chunk) => chunk.into_rows().await.map(Some),
            None => Ok(None),
        }
    }

    /// The next chunk as rows lent out of a [`RowChunk`], or `None` at the end.
    pub async fn next_rows(&mut self) -> Result<Option<RowChunk>, ReadError> {
        let rows = match &mut self.inner {
            Pieces::Rows(rows) => rows,
            Pieces::Chunks(chunks) => return Self::next_made(chunks, &mut self.done).await,
        };
        let owned = Self::next_owned(rows, &mut self.pending, &mut self.done, self.chunk_bytes).await?;
        Ok(owned.map(|rows| RowChunk::from_rows(&rows)))
    }

    /// The next chunk already made, skipping empty ones.
    async fn next_made(
        chunks: &mut BoxStream<'static, Result<RowChunk, ReadError>>,
        done: &mut bool,
    ) -> Result<Option<RowChunk>, ReadError> {
        while !*done {
            match chunks.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => {}
                Some(Ok(chunk)) => return Ok(Some(chunk)),
                Some(Err(error)) => {
                    *done = true;
                    return Err(error);
                }
                None => *done = true,
            }
        }
        Ok(None)
    }

    /// The next chunk cut out of owned pieces.
    async fn next_owned(
        rows: &mut BoxStream<'static, Result<Vec<(Row, Diff)>, ReadError>>,
        pending: &mut VecDeque<(Row, Diff)>,
        done: &mut bool,
        chunk_bytes: usize,
    ) -> Result<Option<Vec<(Row, Diff)>>, ReadError> {
        while pending.is_empty() && !*done {
            match rows.next().await {
                Some(Ok(piece)) if piece.is_empty() => {}
                Some(Ok(piece)) => {
                    // A piece that is already a chunk passes through; a larger one is cut.
                    let before_last: usize =
                        piece[..piece.len() - 1].iter().map(|(row, _)| chunk_size(row)).sum();
                    if before_last < chunk_bytes {
                        return Ok(Some(piece));
                    }
                    pending.extend(piece);
                }
                Some(Err(error)) => {
                    *done = true;
                    return Err(error);
                }
                None => *done = true,
            }
        }
        let mut chunk = Vec::new();
        let mut bytes = 0;
        while let Some((row, diff)) = pending.pop_front() {
            bytes += chunk_size(&row);
            chunk.push((row, diff));
            if bytes >= chunk_bytes {
                break;
            }
        }
        Ok((!chunk.is_empty()).then_some(chunk))
    }
}
