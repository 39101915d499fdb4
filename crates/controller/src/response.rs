//! What the controller tells its user: [`ComputeControllerResponse`] and the peek summary
//! [`PeekNotification`].

use frontiers::{Antichain, Timestamp};
use protocol::{CopyToResponse, GlobalId, InstanceId, PeekId, PeekResponse, ReplicaId, SubscribeResponse};

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
}

/// How a peek ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeekOutcome {
    /// Rows were returned (this many, counting multiplicity).
    Rows(u64),
    /// The peek failed.
    Error(String),
    /// The peek was cancelled (by the caller, a timeout, or because no replica could answer).
    Canceled,
}

impl PeekOutcome {
    /// The outcome a peek's answer amounts to.
    pub fn of(response: &PeekResponse) -> PeekOutcome {
        match response {
            PeekResponse::Rows(rows) => PeekOutcome::Rows(rows.iter().map(|(_, n)| n.get()).sum()),
            PeekResponse::Error(e) => PeekOutcome::Error(e.clone()),
            PeekResponse::Canceled => PeekOutcome::Canceled,
            PeekResponse::ResultTooLarge { size_bytes, max_bytes } => PeekOutcome::Error(format!(
                "result of {size_bytes} bytes exceeds the maximum of {max_bytes} bytes"
            )),
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
