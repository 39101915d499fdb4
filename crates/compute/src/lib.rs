//! The compute replica: executes the compute protocol (`protocol`) on timely and differential dataflow.
//!
//! **What this is.** A library to run one process of a compute replica ([`ReplicaServer::start`] with a
//! [`ReplicaConfig`], stopped with [`ReplicaHandle::shutdown`]) and the `compute-replica` binary around it.
//! A process accepts one controller connection at a time, receives the command stream every process of
//! the replica receives, builds the same dataflows as every other process, and answers for its own
//! workers' share: frontiers (meet over its workers), peek rows, subscribe batches, copy-to row counts.
//!
//! Architecture (details in each module):
//! - `server`: threads, listener and connection tasks (frames through `transport`, the Hello), and how the
//!   process fails loudly;
//! - `cluster`: the connections between the processes of a multi-process replica (bound at start, a
//!   handshake per pair, cut when the process fails), handed to timely;
//! - `core`: the per-process protocol state machine on the tokio thread: stages (`core/mod.rs`),
//!   responses and their stand-ins (`responses`), reconciliation on reconnect (`reconcile`), the catalog
//!   of dataflows and collections with their frontiers (`catalog`), peek routing (`peeks`), merging of
//!   sink output (`sinks`), copy-to files (`copy_to`), storage listens (`feeds`) and materialized-view
//!   appends (`appender`);
//! - `worker`: the timely worker loop (build, schedule, compact, drop; peeks; reports);
//! - `render`: the plan IR as differential operators over `Row`, with a per-dataflow error collection;
//! - `diff`: the multiplicity of an update inside a dataflow;
//! - `operators`: the schedule gate and the sink operator;
//! - `messages`: core ↔ worker messages;
//! - `metrics`: the replica's Prometheus families ([`ReplicaMetrics`]), in the registry
//!   [`ReplicaServer::start_with_registry`] is given ([`ReplicaHandle::registry`]).
//!
//! **What this is not.** It does not know the controller: it only speaks the protocol. It does not store
//! data durably: imports and materialized views go through a [`storage::StorageCollections`].
//!
//! **Invariants.**
//! - Every peek is answered exactly once per connection; a peek at a time before the index's since, or of
//!   an unknown index, is an error, never stale data.
//! - Reported frontiers never regress within a connection.
//! - A dataflow's answer is an error exactly when `protocol::reference` errs on the same inputs.
//! - Nothing the controller sends makes the process panic: bad input is answered with `CommandRejected` or
//!   `PeekResponse::Error`, or closes that connection only.
//! - No response is dropped: one over the frame limit has its stand-in (`ResultTooLarge`, an error batch
//!   that ends a subscribe, a cut message) or closes the connection; a connection whose controller does
//!   not read is dropped once [`QUEUED_FRAMES`] frames' worth wait. A dataflow whose storage import fails
//!   answers its peeks and sinks with the error.
//! - Reports of workers name the dataflow (and peek routing) they come from, so after a reconnect that
//!   rebuilds a dataflow under the same export ids nothing of the old one reaches the new one.
//! - The process does not linger half-alive: when a worker panics, timely does not start (the cluster's
//!   processes did not all connect), a worker thread ends unasked (a peer went away), or the I/O thread
//!   panics, it closes its connection, listener and cluster sockets ([`ReplicaHandle::failed`] says why;
//!   `compute-replica` exits non-zero, so its orchestrator restarts it and the controller replays).
//!
//! **Multiplicities** inside a dataflow are exact 128-bit integers (`diff::CheckedDiff`) with a sticky
//! overflow; where one is observed (a reduce-like operator, a peek, a sink) it must be the protocol's
//! `i64`, else the answer is an error, as `protocol`'s `plan.rs` specifies. An overflow never wraps and
//! never panics, in release builds as in debug ones.
//!
//! **Tests.** `tests/it/` (one integration binary): operators against `protocol::reference` with proptest
//! (1 and 2 workers, 2 processes; multiplicities beyond `i64` included), random plans against SQLite,
//! exports, imports, sinks, reconnect (also many reconnects rebuilding dataflows), bad input, limits
//! (responses over the frame limit, a controller that does not read, a failing import) and cluster
//! start-up and failure, all through the socket. Benchmarks in
//! `benches/compute.rs`.

mod cluster;
mod connection;
mod core;
mod diff;
mod fence;
mod messages;
mod metrics;
mod operators;
mod render;
mod server;
mod worker;

pub use metrics::ReplicaMetrics;
pub use server::{
    DEFAULT_CLUSTER_CONNECT_TIMEOUT_MS, DEFAULT_HANDSHAKE_TIMEOUT_MS, DEFAULT_IDLE_MERGE_EFFORT,
    DEFAULT_IDLE_TIMEOUT_MS, DEFAULT_KEEPALIVE_INTERVAL_MS, DEFAULT_MAX_PENDING_CONNECTIONS, FAULT_ENV,
    FAULT_IO_PANIC_ON_CONNECT, QUEUED_FRAMES, ReplicaConfig, ReplicaHandle, ReplicaLimits, ReplicaServer,
    StartError,
};
pub use transport::{ServerSecurity, SharedSecret};
