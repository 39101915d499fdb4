//! The public storage API: the [`StorageCollections`] trait and the plain data types it speaks.
//!
//! **What this is.** The contract every storage implementation meets: the embedded store
//! ([`crate::InProcess`]), the network client ([`crate::Client`]), and anything a service plugs in instead.
//! **What this is not:** an implementation; the semantics are stated here and implemented by the core
//! ([`crate::core::Store`]) and the shells around it.
//!
//! **Semantics in brief** (DESIGN §2). A collection has a `since` and an `upper`; a time `t` is readable iff
//! `since <= t < upper`. `append` is compare-and-append over one or more collections, atomic across all of
//! them, and durable before it returns `Ok`. `since` is the meet of every outstanding read hold, including
//! the one the collection's own [`ReadPolicy`] keeps. Reads before `since` are errors, never stale data.
//!
//! **Tests.** `tests/it/` runs the same scenarios against `InProcess` and against `Client` over TCP.

use std::future::Future;
use std::pin::Pin;

use frontiers::{Antichain, ReadHold, ReadPolicy};
use protocol::{Diff, GlobalId, RelationDesc, Row};
use serde::{Deserialize, Serialize};

use crate::error::{AppendError, CreateError, DropError, HoldError, ReadError};
use crate::listen::{FrontierWatch, Listen};

/// A read hold on a storage collection. Dropping it releases it (also across the network: the server
/// releases every hold of a connection that closes).
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

    /// A stream of the collection's changes from `as_of` on: first the snapshot at `as_of` (waiting, without
    /// a timeout, for `as_of` to become complete), then `Progress(upper)`, then for every append its updates
    /// followed by `Progress(new upper)`. The listen holds the collection at what it has delivered, so a
    /// slow listener never loses history (and holds compaction back meanwhile).
    fn listen(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Listen, ReadError>>;

    /// A stream of frontier changes: first the current frontiers of every collection, then every change
    /// (`None` once a collection is dropped). Changes to one collection may be coalesced.
    fn watch_frontiers(&self) -> BoxFuture<'_, Result<FrontierWatch, ReadError>>;
}
