//! What the controller tells its user: [`ComputeControllerResponse`], the peek summary
//! [`PeekNotification`], and a peek's result ([`PeekResult`]).
//!
//! **Tests:** `tests/it/peeks.rs` (notifications and results), `tests/it/errors.rs` (every
//! [`PeekFailure`], `CommandRejected` and `ExportFailed`), `tests/it/sinks.rs` (subscribe and copy-to responses).

use std::num::NonZeroU64;

use frontiers::{Antichain, Timestamp};
use protocol::{CopyToResponse, GlobalId, InstanceId, PeekId, ReplicaId, Row, SubscribeResponse};

use crate::error::PeekFailure;

/// What a peek delivers to its caller: its rows, finished (ordered, offset and limit applied), each with
/// its multiplicity; or why it has none.
pub type PeekResult = Result<Vec<(Row, NonZeroU64)>, PeekFailure>;

/// A response from the compute controller, delivered by `ComputeController::process`.
#[derive(Debug, Clone, PartialEq)]
pub enum ComputeControllerResponse<T: Timestamp = u64> {
    /// A peek finished (the rows themselves go to the peek's own receiver).
    PeekNotification(PeekNotification),
    /// A subscribe's next batch (each time range forwarded exactly once), or its end.
    SubscribeResponse {
        /// The subscribe.
        id: GlobalId,
        /// The batch or `DroppedAt`.
        response: SubscribeResponse<T>,
    },
    /// A copy-to finished (first replica to finish wins).
    CopyToResponse {
        /// The copy-to.
        id: GlobalId,
        /// Its result.
        response: CopyToResponse,
    },
    /// A compute collection's upper advanced.
    FrontierUpper {
        /// The instance.
        instance: InstanceId,
        /// The collection.
        id: GlobalId,
        /// The new upper.
        upper: Antichain<T>,
    },
    /// A replica refused a command the controller sent it (`ComputeResponse::CommandRejected`): its
    /// state now differs from what the controller asked for (a dataflow it did not build, a peek it
    /// will not answer, ...). The controller keeps the replica connected (it serves everything else, and
    /// a reconnect would replay the same command) and tells the user, who may drop the collection or
    /// the replica. A peek the replica does not answer ends at its timeout.
    CommandRejected {
        /// The instance.
        instance: InstanceId,
        /// The replica.
        replica: ReplicaId,
        /// The rejected command's name.
        command: String,
        /// The replica's reason.
        reason: String,
    },
    /// A replica reported that an export can make no more progress there
    /// (`StatusResponse::Failed`): a materialized view that cannot write its target (dropped, rows that
    /// do not match it, a multiplicity beyond `i64`, errors in its data), or an index or view whose
    /// storage import failed. Its upper stops where it is on that replica; retrying would not help, so
    /// the replica stays connected and the user hears why (and may drop the export). A reconnect
    /// rebuilds the export and reports again if the cause persists.
    ExportFailed {
        /// The instance.
        instance: InstanceId,
        /// The replica.
        replica: ReplicaId,
        /// The export.
        id: GlobalId,
        /// The replica's reason.
        error: String,
    },
}

/// How a peek ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeekOutcome {
    /// Rows were returned (this many, counting multiplicity).
    Rows(u64),
    /// The peek ended without rows.
    Failed(PeekFailure),
}

impl PeekOutcome {
    /// The outcome a peek's result amounts to.
    pub fn of(result: &PeekResult) -> PeekOutcome {
        match result {
            Ok(rows) => PeekOutcome::Rows(rows.iter().map(|(_, n)| n.get()).sum()),
            Err(failure) => PeekOutcome::Failed(failure.clone()),
        }
    }
}

/// A summary of one finished peek.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekNotification {
    /// The peek.
    pub uuid: PeekId,
    /// The instance it ran on.
    pub instance: InstanceId,
    /// The replica whose answer won (`None` for storage peeks, timeouts and cancellations).
    pub replica: Option<ReplicaId>,
    /// How it ended.
    pub outcome: PeekOutcome,
    /// From the peek call to the answer, in milliseconds of the controller's clock.
    pub duration_ms: u64,
}
