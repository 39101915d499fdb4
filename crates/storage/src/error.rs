//! The error types of the storage API: one `thiserror` enum per operation family, each with exactly its
//! failure cases.
//!
//! **What this is.** [`CreateError`], [`DropError`], [`AppendError`], [`ReadError`] and [`HoldError`], shared
//! by the synchronous core ([`crate::core::Store`]), the in-process handle ([`crate::InProcess`]) and the
//! shards ([`crate::ShardCollections`]). **What this is not:** a place for broken invariants; those are
//! `assert!`s where they are checked.
//!
//! **Tests.** Every variant is produced by a test in `tests/it/errors.rs`.

use frontiers::Antichain;
use protocol::{GlobalId, RowTypeError};

/// Why `create_collection` failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    /// A collection with this id exists with a different `RelationDesc`. (Creating it again with the same
    /// desc is a successful no-op.)
    #[error("collection {id} already exists with a different schema")]
    SchemaMismatch {
        /// The collection.
        id: GlobalId,
    },
    /// The id belonged to a collection that was dropped; ids are never reused, because read holds on the
    /// dropped collection may still be outstanding.
    #[error("collection {0} was dropped; its id cannot be reused")]
    AlreadyDropped(GlobalId),
    /// The durable log (or the shard engine's storage) could not be written; nothing was created.
    #[error("i/o error: {0}")]
    Io(String),
    /// The store was shut down (or a remote store is unreachable for good).
    #[error("disconnected from storage")]
    Disconnected,
}

/// Why `drop_collection` failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DropError {
    /// No collection with this id exists.
    #[error("collection {0} is missing")]
    CollectionMissing(GlobalId),
    /// The durable log (or the shard engine's storage) could not be written; nothing was dropped.
    #[error("i/o error: {0}")]
    Io(String),
    /// The store was shut down (or a remote store is unreachable for good).
    #[error("disconnected from storage")]
    Disconnected,
}

/// Why `append` failed. An append that fails changes nothing, in any of the collections it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// No collection with this id exists.
    #[error("collection {0} is missing")]
    CollectionMissing(GlobalId),
    /// Compare-and-append failed: the collection's upper is not the expected one. `current` is the upper
    /// the caller should retry from.
    #[error("append to {id}: expected upper {expected:?}, but the upper is {current:?}")]
    UpperMismatch {
        /// The collection.
        id: GlobalId,
        /// The upper the request expected.
        expected: Antichain<u64>,
        /// The collection's actual upper.
        current: Antichain<u64>,
    },
    /// An update's time is outside `[lower, upper)` = `[expected_upper, new_upper)`.
    #[error("append to {id}: update at time {time} is outside [{lower:?}, {upper:?})")]
    TimeOutOfRange {
        /// The collection.
        id: GlobalId,
        /// The update's time.
        time: u64,
        /// The request's `expected_upper`.
        lower: Antichain<u64>,
        /// The request's `new_upper`.
        upper: Antichain<u64>,
    },
    /// `new_upper` is not strictly beyond `expected_upper`.
    #[error("append to {id}: new upper {new:?} is not beyond the expected upper {expected:?}")]
    UpperNotBeyond {
        /// The collection.
        id: GlobalId,
        /// The request's `expected_upper`.
        expected: Antichain<u64>,
        /// The request's `new_upper`.
        new: Antichain<u64>,
    },
    /// A row does not match the collection's `RelationDesc`.
    #[error("append to {id}: row {row} does not match the schema: {error}")]
    RowType {
        /// The collection.
        id: GlobalId,
        /// The offending row, printed.
        row: String,
        /// What is wrong with it.
        error: RowTypeError,
    },
    /// The durable log could not be written (disk full, say). Nothing was appended, and the store stays
    /// consistent: later appends succeed once the disk recovers, or fail with this error again.
    #[error("i/o error: {0}")]
    Io(String),
    /// The store was shut down (or a remote store is unreachable for good). Whether the append took
    /// effect is unknown; read the upper to find out.
    #[error("disconnected from storage")]
    Disconnected,
    /// The updates' multiplicities overflow `i64`, within the append or against the counts the collection
    /// already holds (the shard engine keeps a bound on every row's count, see `storage::shard`). Nothing
    /// was appended.
    #[error("append to {id}: the multiplicity of row {row} overflows")]
    DiffOverflow {
        /// The collection.
        id: GlobalId,
        /// A row whose count would overflow, printed.
        row: String,
    },
    /// The storage engines failed for longer than the retry budget, and the append may have taken effect
    /// (its last attempt's outcome is unknown). Read the upper to find out.
    #[error("append outcome unknown: {0}")]
    Indeterminate(String),
    /// The collection's stored state is damaged; nothing was appended.
    #[error("append to {id}: stored state is damaged: {what}")]
    Corrupt {
        /// The collection.
        id: GlobalId,
        /// What is damaged (the consensus key and version, or the blob key).
        what: String,
    },
}

/// Why a read (`snapshot`, `listen`, `frontiers`, `list_collections`, `watch_frontiers`) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// No collection with this id exists.
    #[error("collection {0} is missing")]
    CollectionMissing(GlobalId),
    /// `as_of` is not beyond the collection's since: that history may have been compacted away.
    #[error("cannot read {id} at {as_of}: its since is {since:?}")]
    BeforeSince {
        /// The collection.
        id: GlobalId,
        /// Its since.
        since: Antichain<u64>,
        /// The time asked for.
        as_of: u64,
    },
    /// `as_of` was not yet complete (`upper <= as_of`) and did not become complete within the snapshot
    /// timeout (`StoreConfig::snapshot_timeout`, 30 s by default).
    #[error("cannot read {id} at {as_of}: its upper is still {upper:?}")]
    NotYetReadable {
        /// The collection.
        id: GlobalId,
        /// Its upper when the wait gave up.
        upper: Antichain<u64>,
        /// The time asked for.
        as_of: u64,
    },
    /// The collection was dropped while it was being read (a listen, or a snapshot that was waiting).
    #[error("collection {0} was dropped")]
    CollectionDropped(GlobalId),
    /// The store was shut down (or a remote store is unreachable for good).
    #[error("disconnected from storage")]
    Disconnected,
    /// Stored data is damaged: a batch part is missing or fails its checksum, or a state version is
    /// missing or corrupt. Nothing is skipped silently: the read fails.
    #[error("cannot read {id}: stored data is damaged: {what}")]
    Corrupt {
        /// The collection.
        id: GlobalId,
        /// What is damaged (the blob key or the consensus key and version) and how.
        what: String,
    },
    /// The storage engines (blob store, consensus database) failed for longer than the retry budget.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

impl ReadError {
    /// The read error a failure to hold `as_of` for a read (a snapshot's or a listen's own hold) amounts to.
    pub fn from_hold(error: HoldError, as_of: u64) -> ReadError {
        match error {
            HoldError::CollectionMissing(id) => ReadError::CollectionMissing(id),
            HoldError::BeforeSince { id, since, .. } => ReadError::BeforeSince { id, since, as_of },
            HoldError::Disconnected => ReadError::Disconnected,
            HoldError::Unavailable(message) => ReadError::Unavailable(message),
            HoldError::Corrupt { id, what } => ReadError::Corrupt { id, what },
        }
    }
}

/// Why `acquire_read_hold` or `set_read_policy` failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    /// No collection with this id exists.
    #[error("collection {0} is missing")]
    CollectionMissing(GlobalId),
    /// The requested frontier is not beyond the collection's since (or is empty).
    #[error("cannot hold {id} at {requested:?}: its since is {since:?}")]
    BeforeSince {
        /// The collection.
        id: GlobalId,
        /// Its since.
        since: Antichain<u64>,
        /// The frontier asked for.
        requested: Antichain<u64>,
    },
    /// The store was shut down (or a remote store is unreachable for good).
    #[error("disconnected from storage")]
    Disconnected,
    /// The storage engines failed for longer than the retry budget; no hold was taken.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The collection's stored state is damaged; no hold was taken.
    #[error("cannot hold {id}: stored state is damaged: {what}")]
    Corrupt {
        /// The collection.
        id: GlobalId,
        /// What is damaged.
        what: String,
    },
}
