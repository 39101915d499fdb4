//! The compute protocol: what a controller and a compute replica say to each other, and the data they say
//! it about.
//!
//! **What this is.** Message types ([`ComputeCommand`], [`ComputeResponse`]), dataflow descriptions
//! ([`DataflowDescription`]) and their plan IR ([`Plan`], [`ScalarExpr`]), rows ([`Row`], [`Datum`],
//! [`RelationDesc`]), peeks ([`Peek`], [`RowSetFinishing`]), ids ([`GlobalId`], ...), and the wire format
//! ([`frame`]). **What this is not:** a transport. No tokio, no sockets: the codec works on byte buffers
//! and blocking `std::io` streams, so a simulator can carry frames however it likes.
//!
//! # Specification
//!
//! A controller holds one connection to each *process* of each replica. Every process of a replica
//! receives the same command stream in the same order; each answers for its own workers' share.
//!
//! ## Stages (per connection)
//!
//! 0. **Authentication** (below this crate: `transport`'s handshake, inside TLS unless both sides were
//!    told `--insecure`). Nothing of this protocol flows before it, and a replica says nothing about
//!    itself to a peer that has not proved itself.
//! 1. **Hello.** The controller sends `Hello { version, nonce, epoch, session }`. The replica answers
//!    `HelloRefused` (naming both versions) and closes if `version != PROTOCOL_VERSION`; `Fenced` and
//!    closes if another controller holds the replica (a higher epoch, or the same epoch from another
//!    session while connected: `ComputeCommand::Hello` states the rule), leaving that controller's
//!    connection untouched; otherwise `ComputeResponse::Hello` with the same nonce, and the connection
//!    replaces the active one. Nothing else is valid before `Hello`; a replica receiving anything else
//!    first answers `CommandRejected` and closes.
//! 2. **CreateInstance.** Exactly once, next.
//! 3. **Replay.** The controller replays its *compacted command history*: the commands that rebuild the
//!    live state (dataflows not yet dropped, their latest `AllowCompaction`, their `Schedule`, pending
//!    peeks, the coalesced configuration).
//! 4. **InitializationComplete.** The replica reconciles what the replay asked for with what it already
//!    runs (from a previous connection): identical dataflows are kept without rehydration; the rest are
//!    dropped or built.
//! 5. **Normal operation.** Any command except `Hello`, `CreateInstance` and `InitializationComplete`.
//!
//! ## Ordering guarantees
//!
//! - Commands are applied in the order sent. A dataflow's `CreateDataflow` precedes its `Schedule`,
//!   `AllowCompaction` and any `Peek` of its exports.
//! - Per collection, reported frontiers only advance within a connection. A regression is a protocol
//!   violation; the controller disconnects the replica and rehydrates it. Frontiers are *not* carried
//!   across connections: after a reconnect the controller starts each collection's view afresh.
//! - Every `Peek` is answered exactly once per process (`Rows`, `Error` or `Canceled`), also when it is
//!   cancelled and when its target is dropped.
//! - A subscribe's batches are contiguous (`lower` of one is `upper` of the previous) and end with
//!   `DroppedAt` when the subscribe is dropped, unless its upper reached the empty frontier first.
//!
//! ## Obligations per command
//!
//! Each [`ComputeCommand`] variant documents its precondition (what the controller guarantees) and the
//! replica's obligation; each [`ComputeResponse`] variant documents what the receiver must do with it.
//! Bad input from either side (undecodable frames, oversize frames, wrong stage, malformed frontiers) is an
//! error for that connection only: it is closed, and the other side reconnects.
//!
//! ## Wire format
//!
//! Length-prefixed `bincode` frames with a maximum size; an empty frame is a keepalive; see [`frame`].
//! Nothing that does not fit a frame is dropped silently:
//! - a command that does not fit is refused by its sender before it is recorded or sent (the replica
//!   client's `send` returns an error; the controller refuses such commands at its API);
//! - a response that does not fit has a stand-in: a peek's rows become `PeekResponse::ResultTooLarge`
//!   (with the encoded size and the limit); a subscribe batch becomes an error batch from its `lower` with
//!   the empty `upper`, which ends the subscribe where its consumer would have missed changes; an error
//!   message (of a peek, a copy-to, a rejected command) is cut; anything else closes the connection, and
//!   the controller reconnects and replays.
//!
//! # Invariants
//!
//! - A [`Row`] always holds a valid encoding (validated when decoded).
//! - A [`DataflowDescription`] that passes [`DataflowDescription::validate`] type-checks end to end.
//! - Decoding never panics and never allocates more than the maximum frame size.
//!
//! # Tests
//!
//! Doctests state each function's contract. Property tests (`tests/it/`): every message round-trips; any
//! byte string decodes without panicking; `validate` accepts every generated valid dataflow and rejects
//! generated broken ones with the expected error; the reference interpreter ([`mod@reference`]) agrees with
//! SQLite on random plans, tables and updates. Strategies for other crates' tests live in [`arbitrary`]
//! (feature `proptest`; its SQLite oracle, `arbitrary::sql`, with feature `sqlite`).

#![forbid(missing_docs)]

mod command;
mod dataflow;
mod expr;
pub mod frame;
mod id;
pub mod joins;
mod peek;
mod plan;
pub mod reference;
mod response;
mod row;

#[cfg(any(test, feature = "proptest"))]
pub mod arbitrary;

pub use command::{AUTH_SERVICE, ComputeCommand, ComputeParameters, InstanceConfig, PROTOCOL_VERSION};
pub use dataflow::{
    BuildDesc, DataflowDescription, DataflowValidationError, IndexExport, IndexImport, SinkConnection,
    SinkExport, SourceImport,
};
pub use expr::{
    BinaryFunc, EvalError, ExprTypeError, LikePattern, MapFilterProject, ScalarExpr, UnaryFunc, VariadicFunc,
    days_from_civil, decimal_arithmetic,
};
pub use id::{ControllerEpoch, GlobalId, InstanceId, ParseIdError, PeekId, ReplicaId};
pub use peek::{Peek, PeekResponse, PeekTarget, RowSetFinishing};
pub use plan::{AggregateExpr, AggregateFunc, ColumnOrder, Plan, PlanError, compare_datums, slice_ranked};
pub use response::{
    ComputeResponse, CopyToResponse, FrontiersResponse, MalformedResponse, StatusResponse, SubscribeBatch,
    SubscribeResponse,
};
pub use row::{
    ColumnType, Datum, DatumIter, Decimal, F64, Interval, MAX_DECIMAL_SCALE, ROW_INLINE_BYTES, RelationDesc,
    RelationType, Row, RowDecodeError, RowPacker, RowRef, RowTypeError, ScalarType, format_date,
};

/// The multiplicity change of an update: `+1` inserts a row once, `-1` retracts it.
pub type Diff = i64;
