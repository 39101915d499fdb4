//! Commands: what a controller sends to each process of a replica ([`ComputeCommand`]).
//!
//! The stages and the obligations of each command are specified in the crate documentation; each variant
//! below repeats its own preconditions (what the sender guarantees) and obligations (what the replica
//! must do).

use serde::{Deserialize, Serialize};

use frontiers::{Antichain, Timestamp};

use crate::dataflow::DataflowDescription;
use crate::id::{ControllerEpoch, GlobalId, InstanceId, PeekId, ReplicaId};
use crate::peek::Peek;

/// The version of this protocol. A replica refuses a `Hello` with any other version.
///
/// Version 3: `InstanceConfig` lost its `logging` (a status interval no replica honoured); oversized
/// responses have their documented stand-ins (`ComputeResponse`'s documentation).
/// Version 4: `StatusResponse::Failed`, an export that can make no more progress and why.
///
/// Version 5: datums for exact decimals, dates and intervals, and the scalar functions, casts, `count(*)`
/// and `avg` of the TPC-H slice (issue 23).
///
/// Version 6: connections are authenticated before the `Hello` (`transport`'s handshake, optionally
/// inside TLS); `Hello` carries the controller's `epoch` and `session` (fencing), answered
/// `ComputeResponse::Fenced` when another controller may not be replaced; a zero-length frame is a
/// keepalive (`frame`).
pub const PROTOCOL_VERSION: u32 = 6;

/// The service a controller connection's authentication proofs name (`transport`'s challenge-response),
/// so that a proof made for another kind of port never passes here.
pub const AUTH_SERVICE: &str = "compute";

/// A command from the controller to a replica process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "T: Timestamp")]
pub enum ComputeCommand<T = u64> {
    /// Opens the connection.
    ///
    /// *Precondition:* first command on every connection, sent once the connection is authenticated.
    /// *Obligation:* if `version` differs from the replica's [`PROTOCOL_VERSION`], answer
    /// `ComputeResponse::HelloRefused` naming both versions and close the connection. Otherwise fence:
    /// the connection takes over from the active one (which is closed) if `epoch` is higher than every
    /// epoch the replica has served, or equal to the highest with the same `session` (the same controller
    /// reconnecting), or equal to the highest while no connection is active; then answer
    /// `ComputeResponse::Hello` with the same nonce. Otherwise (a lower epoch, or the highest epoch of
    /// another session while that session's connection is active) answer `ComputeResponse::Fenced` and
    /// close this connection only: the active one is untouched.
    Hello {
        /// The sender's [`PROTOCOL_VERSION`].
        version: u32,
        /// Echoed back, so the controller can match the answer to this connection attempt.
        nonce: u64,
        /// The controller's epoch (see [`ControllerEpoch`]).
        epoch: ControllerEpoch,
        /// Drawn by a controller once for its lifetime, the same on each of its connections to a replica:
        /// tells a reconnect of the controller holding an epoch from another controller claiming it.
        session: u64,
    },
    /// Configures the replica for an instance.
    ///
    /// *Precondition:* second command, exactly once per connection. *Obligation:* apply the config; if the
    /// replica already serves a different instance, refuse with `CommandRejected` and close.
    CreateInstance(InstanceConfig),
    /// Ends the replay of the command history that follows `CreateInstance`.
    ///
    /// *Obligation:* reconcile: keep every dataflow identical to one already running (no rehydration),
    /// drop the rest of what the previous connection installed, build what is new. A replayed as-of may
    /// be later than the running dataflow's; the controller holds the imports only from the replayed one,
    /// so a dataflow that has not yet started reading them (never scheduled) is rebuilt, not kept. Peeks pending from the
    /// previous connection are forgotten (their controller re-sends the ones it still wants).
    InitializationComplete,
    /// Changes tunables. Unset fields leave the current value.
    ///
    /// *Obligation:* apply from now on.
    UpdateConfiguration(ComputeParameters),
    /// Builds a dataflow.
    ///
    /// *Precondition:* the description validates; its imports exist (storage collections, or index exports
    /// of earlier dataflows not yet compacted to `[]`) and are readable at `as_of`; its export ids are new.
    /// *Obligation:* build it, but do no work until it is scheduled; report `Frontiers` for each export.
    /// A description that fails these checks is answered with `CommandRejected` and ignored.
    CreateDataflow(DataflowDescription<T>),
    /// Lets the dataflow that exports `id` run.
    ///
    /// *Precondition:* `id` is an export of a created dataflow. Any export of a dataflow schedules the
    /// whole dataflow; scheduling twice is a no-op. *Obligation:* start computing.
    Schedule(GlobalId),
    /// Allows the compute collection `id` to be compacted up to `frontier`.
    ///
    /// *Precondition:* `frontier` is beyond every earlier `AllowCompaction` for `id`. *Obligation:*
    /// compact logically and physically, but never past the upper the collection has reached; the empty
    /// frontier drops the collection: answer outstanding subscribes with `DroppedAt`, copy-tos with
    /// `Dropped`, free its memory, and report the empty write frontier once dropped.
    AllowCompaction {
        /// The collection.
        id: GlobalId,
        /// The new compaction frontier.
        frontier: Antichain<T>,
    },
    /// Reads a collection at a time.
    ///
    /// *Precondition:* the controller holds a read hold at `timestamp` on the target until every replica
    /// it sent the peek to has answered. *Obligation:* answer exactly once with `PeekResponse`: an error if
    /// `timestamp` is before the target's since or the target is unknown; otherwise wait until the upper
    /// passes `timestamp` and answer with the rows (this process's share).
    Peek(Peek<T>),
    /// Cancels a peek.
    ///
    /// *Obligation:* if the peek is still pending, answer it with `PeekResponse::Canceled`; otherwise
    /// ignore (it was already answered, exactly once).
    CancelPeek {
        /// The peek.
        uuid: PeekId,
    },
    /// Permits side effects: materialized views may append to storage and copy-tos may write files.
    ///
    /// *Obligation:* until this command arrives on some connection, the replica computes but writes
    /// nothing outside itself (a read-only replica, as during a controller upgrade).
    AllowWrites,
}

impl<T> ComputeCommand<T> {
    /// The variant's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            ComputeCommand::Hello { .. } => "Hello",
            ComputeCommand::CreateInstance(_) => "CreateInstance",
            ComputeCommand::InitializationComplete => "InitializationComplete",
            ComputeCommand::UpdateConfiguration(_) => "UpdateConfiguration",
            ComputeCommand::CreateDataflow(_) => "CreateDataflow",
            ComputeCommand::Schedule(_) => "Schedule",
            ComputeCommand::AllowCompaction { .. } => "AllowCompaction",
            ComputeCommand::Peek(_) => "Peek",
            ComputeCommand::CancelPeek { .. } => "CancelPeek",
            ComputeCommand::AllowWrites => "AllowWrites",
        }
    }
}

/// The configuration of a replica for one instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceConfig {
    /// The instance the replica belongs to.
    pub instance_id: InstanceId,
    /// The replica's id within the instance.
    pub replica_id: ReplicaId,
}

/// Tunables, sent with `UpdateConfiguration`. `None` leaves a value unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ComputeParameters {
    /// How many dataflows may hydrate at once on a replica (enforced by the replica client, which holds
    /// back `Schedule` commands).
    pub hydration_concurrency: Option<usize>,
    /// The largest peek result a replica returns, in bytes of encoded rows; larger results are answered
    /// `PeekResponse::ResultTooLarge`.
    pub max_result_size_bytes: Option<u64>,
    /// How much merge work differential spends on idle arrangements, per scheduling of an arrangement's
    /// operator, until its batches are merged (0: none; the replica starts with 1,000). Applies to every
    /// arrangement, existing ones included, from the next time its operator runs.
    pub idle_merge_effort: Option<u64>,
}

impl ComputeParameters {
    /// Overlays `update`: each field it sets replaces ours.
    ///
    /// # Examples
    /// ```
    /// use protocol::ComputeParameters;
    /// let mut p = ComputeParameters { hydration_concurrency: Some(1), max_result_size_bytes: Some(10), idle_merge_effort: None };
    /// p.update(ComputeParameters { hydration_concurrency: Some(4), ..Default::default() });
    /// assert_eq!(p.hydration_concurrency, Some(4));
    /// assert_eq!(p.max_result_size_bytes, Some(10));
    /// ```
    pub fn update(&mut self, update: ComputeParameters) {
        let ComputeParameters { hydration_concurrency, max_result_size_bytes, idle_merge_effort } = update;
        if hydration_concurrency.is_some() {
            self.hydration_concurrency = hydration_concurrency;
        }
        if max_result_size_bytes.is_some() {
            self.max_result_size_bytes = max_result_size_bytes;
        }
        if idle_merge_effort.is_some() {
            self.idle_merge_effort = idle_merge_effort;
        }
    }
}
