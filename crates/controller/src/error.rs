//! Errors of the compute controller: one type per public operation, each listing exactly the ways that
//! operation can fail.
//!
//! Every variant here is a *caller* error or an environment failure (storage, orchestrator). A broken
//! internal invariant is an `assert!`, never one of these.
//!
//! [`PeekFailure`] is not an operation's error but how a peek that was accepted ended without rows.
//!
//! **Tests.** Each variant is produced by some test. Those the instance core decides (`Invalid`,
//! `CollectionExists`, `SinceViolation`, `ReplicaExists`, `NotAnIndex`, `CommandTooLarge`,
//! `PeekUnknown`, `PeekFinished`, the index peek's [`PeekFailure`]s, ...) are in `tests/it/errors.rs`,
//! against the synchronous `InstanceCore`. Those only the async
//! [`ComputeController`](crate::ComputeController) produces (`InstanceExists`,
//! `CommandLimitAboveFrameLimit`, every `InstanceMissing`, `NoProcesses`, `Orchestrator`, `NoValidAsOf`,
//! `BadSinkTarget`, `SinkTargetSealed`, the storage peek's errors and failures, every `Storage`, and all
//! of [`CollectionLookupError`]) are in `tests/it/api_errors.rs`, each followed by a check that the
//! failed call changed nothing.

use frontiers::{Antichain, Timestamp};
use protocol::{DataflowValidationError, GlobalId, InstanceId, PeekId, ReplicaId};

/// An instance id that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("instance {0} does not exist")]
pub struct InstanceMissing(pub InstanceId);

/// A collection id that the instance does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("collection {0} does not exist")]
pub struct CollectionMissing(pub GlobalId);

/// Failure of [`create_instance`](crate::ComputeController::create_instance).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstanceCreationError {
    /// An instance with this id exists.
    #[error("instance {0} already exists")]
    InstanceExists(InstanceId),
    /// The configuration's `max_command_bytes` is above the maximum frame of a replica connection, so a
    /// command the instance accepted could still not be sent.
    #[error(
        "max_command_bytes {max_command_bytes} exceeds the replica connection's maximum frame of {max_frame_bytes} bytes"
    )]
    CommandLimitAboveFrameLimit {
        /// The configured limit.
        max_command_bytes: usize,
        /// The connection's maximum frame (`protocol::frame::DEFAULT_MAX_FRAME_BYTES`).
        max_frame_bytes: usize,
    },
}

/// Failure of [`drop_instance`](crate::ComputeController::drop_instance).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstanceDropError {
    /// No such instance.
    #[error(transparent)]
    InstanceMissing(#[from] InstanceMissing),
}

/// Failure of [`add_replica`](crate::ComputeController::add_replica).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaCreationError {
    /// No such instance.
    #[error(transparent)]
    InstanceMissing(#[from] InstanceMissing),
    /// The instance already has a replica with this id.
    #[error("replica {0} already exists")]
    ReplicaExists(ReplicaId),
    /// The location names no process.
    #[error("replica {0} has no processes")]
    NoProcesses(ReplicaId),
    /// The orchestrator could not start it.
    #[error("orchestrator failed to start replica {replica}: {reason}")]
    Orchestrator {
        /// The replica.
        replica: ReplicaId,
        /// The orchestrator's reason.
        reason: String,
    },
}

/// Failure of [`drop_replica`](crate::ComputeController::drop_replica).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaDropError {
    /// No such instance.
    #[error(transparent)]
    InstanceMissing(#[from] InstanceMissing),
    /// No such replica.
    #[error("replica {0} does not exist")]
    ReplicaMissing(ReplicaId),
}

/// Failure of [`create_dataflow`](crate::ComputeController::create_dataflow).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataflowCreationError<T: Timestamp = u64> {
    /// No such instance.
    #[error(transparent)]
    InstanceMissing(#[from] InstanceMissing),
    /// The description does not validate.
    #[error("invalid dataflow: {0}")]
    Invalid(DataflowValidationError),
    /// An import does not exist (a storage collection, or an index on this instance).
    #[error("dataflow import {0} does not exist")]
    CollectionMissing(GlobalId),
    /// An export id is already in use on the instance.
    #[error("collection {0} already exists")]
    CollectionExists(GlobalId),
    /// An import is not readable at the requested as-of.
    #[error("as_of {as_of:?} is before the since {since:?} of import {id}")]
    SinceViolation {
        /// The import.
        id: GlobalId,
        /// Its since.
        since: Antichain<T>,
        /// The as-of asked for.
        as_of: Antichain<T>,
    },
    /// No as-of satisfies every import and export constraint (an import is fully compacted, or a
    /// materialized view's target has data its inputs can no longer reproduce).
    #[error("no valid as_of for dataflow {name:?}: {reason}")]
    NoValidAsOf {
        /// The dataflow's name.
        name: String,
        /// Which constraint failed.
        reason: String,
    },
    /// A materialized view's target storage collection does not exist or has another schema.
    #[error("materialized view {id}: target {target} {reason}")]
    BadSinkTarget {
        /// The export.
        id: GlobalId,
        /// The storage collection.
        target: GlobalId,
        /// What is wrong.
        reason: String,
    },
    /// A materialized view's target storage collection is sealed (its upper is the empty frontier):
    /// nothing can be written there any more, at any as-of. Both `select_as_of` and `create_dataflow`
    /// (with or without an as-of) refuse such a view with this error.
    #[error("materialized view {id}: target {target} is sealed; nothing more can be written to it")]
    SinkTargetSealed {
        /// The export.
        id: GlobalId,
        /// The storage collection.
        target: GlobalId,
    },
    /// The dataflow's `CreateDataflow` command would not fit in one frame of the instance's replica
    /// connections (`max_command_bytes`). Nothing was recorded or sent.
    #[error("the dataflow's command is {size_bytes} bytes, over the limit of {max_bytes} bytes")]
    CommandTooLarge {
        /// The encoded command's size.
        size_bytes: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// The storage layer failed.
    #[error("storage error: {0}")]
    Storage(String),
}

/// Failure of [`drop_collections`](crate::ComputeController::drop_collections).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollectionDropError {
    /// No such instance.
    #[error(transparent)]
    InstanceMissing(#[from] InstanceMissing),
    /// No such collection, or it was already dropped. Nothing was dropped.
    #[error(transparent)]
    CollectionMissing(#[from] CollectionMissing),
}

/// Failure of [`set_read_policy`](crate::ComputeController::set_read_policy).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadPolicyError {
    /// No such instance.
    #[error(transparent)]
    InstanceMissing(#[from] InstanceMissing),
    /// No such collection (nothing was changed).
    #[error(transparent)]
    CollectionMissing(#[from] CollectionMissing),
    /// Read policies govern indexes; a sink's compaction follows its progress.
    #[error("collection {0} is a sink; only indexes have read policies")]
    WriteOnlyCollection(GlobalId),
}

/// Failure of [`acquire_read_hold`](crate::ComputeController::acquire_read_hold) and of
/// [`collection_frontiers`](crate::ComputeController::collection_frontiers).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollectionLookupError {
    /// No such instance.
    #[error(transparent)]
    InstanceMissing(#[from] InstanceMissing),
    /// No such collection (or it is fully compacted).
    #[error(transparent)]
    CollectionMissing(#[from] CollectionMissing),
    /// The storage layer failed (for storage collections).
    #[error("storage error: {0}")]
    Storage(String),
}

/// Failure of [`hydration_status`](crate::ComputeController::hydration_status) and
/// [`wallclock_lag`](crate::ComputeController::wallclock_lag).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollectionStatusError {
    /// No such instance.
    #[error(transparent)]
    InstanceMissing(#[from] InstanceMissing),
    /// No such live compute collection in the instance (storage collections have no replicas).
    #[error(transparent)]
    CollectionMissing(#[from] CollectionMissing),
}

/// Failure of [`peek`](crate::ComputeController::peek).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeekError<T: Timestamp = u64> {
    /// No such instance.
    #[error(transparent)]
    InstanceMissing(#[from] InstanceMissing),
    /// No such collection.
    #[error(transparent)]
    CollectionMissing(#[from] CollectionMissing),
    /// The target is a sink, which cannot be peeked.
    #[error("collection {0} is not an index")]
    NotAnIndex(GlobalId),
    /// The peek targets a replica the instance does not have.
    #[error("replica {0} does not exist")]
    ReplicaMissing(ReplicaId),
    /// The time is before the collection's since: that history may be gone.
    #[error("peek of {id} at {timestamp:?} is before its since {since:?}")]
    SinceViolation {
        /// The collection.
        id: GlobalId,
        /// Its since.
        since: Antichain<T>,
        /// The time asked for.
        timestamp: T,
    },
    /// The map/filter/project does not fit the collection.
    #[error("peek of {id}: {reason}")]
    InvalidMapFilterProject {
        /// The collection.
        id: GlobalId,
        /// The type error.
        reason: String,
    },
    /// The peek's `Peek` command would not fit in one frame of the instance's replica connections
    /// (`max_command_bytes`: huge literal constraints or map/filter/project). Nothing was held or sent.
    #[error("the peek's command is {size_bytes} bytes, over the limit of {max_bytes} bytes")]
    CommandTooLarge {
        /// The encoded command's size.
        size_bytes: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// A storage peek with literal constraints: they look up an index's key, and a storage collection
    /// has none.
    #[error("peek of storage collection {0}: literal constraints apply to index peeks only")]
    LiteralConstraintsOnStorage(GlobalId),
    /// A storage peek with a target replica: storage peeks are answered by the controller from
    /// storage, never by a replica.
    #[error("peek of storage collection {0}: a target replica applies to index peeks only")]
    TargetReplicaOnStorage(GlobalId),
    /// The storage layer failed (storage peeks).
    #[error("storage error: {0}")]
    Storage(String),
}

/// Failure of [`cancel_peek`](crate::ComputeController::cancel_peek).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelPeekError {
    /// No such instance.
    #[error(transparent)]
    InstanceMissing(#[from] InstanceMissing),
    /// The instance never issued this peek id.
    #[error("peek {0} is unknown")]
    PeekUnknown(PeekId),
    /// The peek was issued but has already ended (answered with rows or a failure, timed out, or
    /// cancelled before): its caller has its result, and nothing changed.
    #[error("peek {0} has already ended")]
    PeekFinished(PeekId),
}

/// Why a peek ended without rows: the error half of a [`PeekResult`](crate::PeekResult), delivered to
/// the peek's caller ([`PeekHandle::result`](crate::PeekHandle::result)) and in its
/// [`PeekNotification`](crate::PeekNotification). Every peek ends, with rows or with one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeekFailure {
    /// The peek's target replica, or the last replica that owed it an answer, was dropped first.
    #[error("replica {0} was dropped before it answered")]
    ReplicaDropped(ReplicaId),
    /// No answer within the peek's timeout (its own `timeout_ms`, else the instance's
    /// `default_peek_timeout_ms`). Its hold is released and its replicas are told to cancel it.
    #[error("no answer within {after_ms} ms")]
    TimedOut {
        /// The timeout that passed.
        after_ms: u64,
    },
    /// The caller cancelled it ([`cancel_peek`](crate::ComputeController::cancel_peek)).
    #[error("canceled")]
    Canceled,
    /// A replica answered that it cancelled the peek although nobody asked it to.
    #[error("replica {0} canceled the peek")]
    ReplicaCanceled(ReplicaId),
    /// The instance was dropped while the peek was pending.
    #[error("the instance was dropped")]
    InstanceDropped,
    /// The result exists but is too large to send (the replica's `max_result_size_bytes` or its
    /// connection's maximum frame).
    #[error("the result of {size_bytes} bytes exceeds the maximum of {max_bytes} bytes")]
    ResultTooLarge {
        /// The result's size.
        size_bytes: u64,
        /// The limit it exceeds.
        max_bytes: u64,
    },
    /// The answer could not be computed: the replica's error (a data error in the collection, such as a
    /// division by zero), or for a storage peek the map/filter/project's error or a negative
    /// multiplicity in storage.
    #[error("{0}")]
    Evaluation(String),
    /// A storage peek's snapshot failed.
    #[error("storage error: {0}")]
    Storage(String),
}
