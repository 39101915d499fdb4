//! Responses: what a replica process sends back ([`ComputeResponse`]), and the checks a receiver applies
//! before trusting one ([`ComputeResponse::check`]).

use serde::{Deserialize, Serialize};

use frontiers::antichain::is_antichain;
use frontiers::{Antichain, Timestamp};

use crate::Diff;
use crate::id::{GlobalId, PeekId};
use crate::peek::PeekResponse;
use crate::row::Row;

/// A response from a replica process to the controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "T: Timestamp")]
pub enum ComputeResponse<T = u64> {
    /// Accepts a `Hello`: same version, same nonce.
    Hello {
        /// The replica's protocol version.
        version: u32,
        /// The nonce of the `Hello` this answers.
        nonce: u64,
    },
    /// Refuses a `Hello` (version mismatch); the replica closes the connection after sending it.
    HelloRefused {
        /// The replica's protocol version.
        version: u32,
        /// A human-readable reason.
        reason: String,
    },
    /// The frontiers of a compute collection moved. Each frontier only moves forward within one connection;
    /// `None` means unchanged. The empty write frontier after `AllowCompaction([])` means "dropped", and it
    /// is the last response naming `id` on the connection.
    ///
    /// *Receiver:* a regression is a protocol violation by the replica (disconnect and rehydrate it), and
    /// so is any response naming a collection the connection never created or whose drop it reported.
    Frontiers {
        /// The collection.
        id: GlobalId,
        /// The new frontiers.
        frontiers: FrontiersResponse<T>,
    },
    /// The answer to a `Peek`, sent exactly once per peek per process.
    PeekResponse {
        /// The peek.
        uuid: PeekId,
        /// The answer (this process's share of rows).
        response: PeekResponse,
    },
    /// Output of a subscribe export.
    SubscribeResponse {
        /// The subscribe's export id.
        id: GlobalId,
        /// A batch or the end of the stream.
        response: SubscribeResponse<T>,
    },
    /// Result of a copy-to export.
    CopyToResponse {
        /// The copy-to's export id.
        id: GlobalId,
        /// The result (this process's share of the row count).
        response: CopyToResponse,
    },
    /// The status of an export: its hydration, or its failure (see [`StatusResponse`]). No
    /// operator-level status: timely's operator logging is not collected.
    Status(StatusResponse),
    /// A command the replica could not accept (a dataflow that fails validation, a command in the wrong
    /// stage, an unknown id). The replica keeps serving everything else.
    CommandRejected {
        /// The rejected command's name.
        command: String,
        /// Why.
        reason: String,
    },
}

impl<T> ComputeResponse<T> {
    /// The variant's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            ComputeResponse::Hello { .. } => "Hello",
            ComputeResponse::HelloRefused { .. } => "HelloRefused",
            ComputeResponse::Frontiers { .. } => "Frontiers",
            ComputeResponse::PeekResponse { .. } => "PeekResponse",
            ComputeResponse::SubscribeResponse { .. } => "SubscribeResponse",
            ComputeResponse::CopyToResponse { .. } => "CopyToResponse",
            ComputeResponse::Status(_) => "Status",
            ComputeResponse::CommandRejected { .. } => "CommandRejected",
        }
    }
}

impl<T: Timestamp> ComputeResponse<T> {
    /// Checks what deserialisation cannot: every frontier is an antichain, and every subscribe batch has
    /// `lower <= upper` with its updates' times in `[lower, upper)`.
    ///
    /// # Examples
    /// ```
    /// use frontiers::Antichain;
    /// use protocol::{ComputeResponse, Datum, GlobalId, Row, SubscribeBatch, SubscribeResponse};
    /// let batch = |time: u64| ComputeResponse::SubscribeResponse {
    ///     id: GlobalId::User(1),
    ///     response: SubscribeResponse::Batch(SubscribeBatch {
    ///         lower: Antichain::from_elem(3),
    ///         upper: Antichain::from_elem(5),
    ///         updates: Ok(vec![(time, Row::pack([Datum::Int64(1)]), 1)]),
    ///     }),
    /// };
    /// assert!(batch(4).check().is_ok());
    /// assert!(batch(5).check().is_err());
    /// ```
    pub fn check(&self) -> Result<(), MalformedResponse> {
        let frontier_ok = |f: &Option<Antichain<T>>| f.as_ref().is_none_or(|f| is_antichain(f.elements()));
        match self {
            ComputeResponse::Frontiers { id, frontiers } => {
                let FrontiersResponse { write_frontier, input_frontier, output_frontier } = frontiers;
                if ![write_frontier, input_frontier, output_frontier].into_iter().all(frontier_ok) {
                    return Err(MalformedResponse(format!("frontier of {id} is not an antichain")));
                }
            }
            ComputeResponse::SubscribeResponse { id, response: SubscribeResponse::Batch(batch) } => {
                if !is_antichain(batch.lower.elements()) || !is_antichain(batch.upper.elements()) {
                    return Err(MalformedResponse(format!("subscribe {id}: bounds are not antichains")));
                }
                if !frontiers::PartialOrder::less_equal(&batch.lower, &batch.upper) {
                    return Err(MalformedResponse(format!("subscribe {id}: lower is beyond upper")));
                }
                if let Ok(updates) = &batch.updates
                    && let Some((time, _, _)) = updates
                        .iter()
                        .find(|(t, _, _)| !batch.lower.less_equal(t) || batch.upper.less_equal(t))
                {
                    return Err(MalformedResponse(format!(
                        "subscribe {id}: update at {time:?} outside [{:?}, {:?})",
                        batch.lower, batch.upper
                    )));
                }
            }
            ComputeResponse::SubscribeResponse { id, response: SubscribeResponse::DroppedAt(frontier) }
                if !is_antichain(frontier.elements()) =>
            {
                return Err(MalformedResponse(format!("subscribe {id}: DroppedAt is not an antichain")));
            }
            _ => {}
        }
        Ok(())
    }
}

/// A response that decoded but breaks the protocol's rules (see [`ComputeResponse::check`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed response: {0}")]
pub struct MalformedResponse(pub String);

/// New frontiers of a compute collection; `None` means unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "T: Timestamp")]
pub struct FrontiersResponse<T = u64> {
    /// The upper of the collection: all its updates at times not beyond it are final.
    pub write_frontier: Option<Antichain<T>>,
    /// The meet of the dataflow's inputs' frontiers as seen by the dataflow.
    pub input_frontier: Option<Antichain<T>>,
    /// The frontier of the dataflow's output operators (before any buffering into the arrangement).
    pub output_frontier: Option<Antichain<T>>,
}

impl<T> Default for FrontiersResponse<T> {
    fn default() -> Self {
        FrontiersResponse { write_frontier: None, input_frontier: None, output_frontier: None }
    }
}

impl<T> FrontiersResponse<T> {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.write_frontier.is_none() && self.input_frontier.is_none() && self.output_frontier.is_none()
    }
}

/// Output of a subscribe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "T: Timestamp")]
pub enum SubscribeResponse<T = u64> {
    /// The changes in `[lower, upper)`.
    Batch(SubscribeBatch<T>),
    /// The subscribe was dropped; no changes from this frontier on will be delivered.
    DroppedAt(Antichain<T>),
}

/// The consolidated changes of a subscribe for the times in `[lower, upper)`.
///
/// Batches of one subscribe are contiguous: each batch's `lower` is the previous batch's `upper`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "T: Timestamp")]
pub struct SubscribeBatch<T = u64> {
    /// The first time covered.
    pub lower: Antichain<T>,
    /// The first time not covered.
    pub upper: Antichain<T>,
    /// The changes `(time, row, diff)`, sorted by time then row, or the error that stopped the
    /// subscribe.
    pub updates: Result<Vec<(T, Row, Diff)>, String>,
}

/// Result of a copy-to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CopyToResponse {
    /// The number of rows written.
    RowCount(u64),
    /// The copy failed.
    Error(String),
    /// The copy-to was dropped before it finished.
    Dropped,
}

/// Status of an export: its hydration, or why it can make no more progress (no operator status is
/// collected or sent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusResponse {
    /// An export finished hydrating (its upper passed the dataflow's as-of), or started over.
    Hydration {
        /// The export.
        id: GlobalId,
        /// Whether it is hydrated.
        hydrated: bool,
    },
    /// The export can make no more progress on this replica, for a reason retrying will not cure: a
    /// materialized view that cannot write to its target (the target was dropped, a row does not match
    /// its description, storage refused the append, a multiplicity left `i64`, the view's data has
    /// errors), or an index or materialized view whose storage import can no longer be read. Its
    /// upper stays where it is (its peeks, if an index, are answered with the error).
    ///
    /// *Sender:* at most once per export per connection, from each process that saw it, only after
    /// `InitializationComplete`; a transient failure (storage unreachable) is retried with a bounded
    /// backoff instead. On the next connection the replica rebuilds the export's dataflow rather than
    /// keep it (reconciliation), so the failure is reported again if it persists. Subscribes and
    /// copy-tos report their failures in their own responses instead. *Receiver:* the replica stays
    /// connected (a reconnect would not help); tell the user, who may drop the export.
    Failed {
        /// The export.
        id: GlobalId,
        /// Why, for people.
        error: String,
    },
}
