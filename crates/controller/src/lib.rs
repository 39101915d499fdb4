//! The compute controller: what a service embeds to have views maintained on compute replicas and read
//! at consistent times.
//!
//! **What it is.** [`ComputeController`] (async, tokio) manages compute instances, each with one or more
//! replicas running the same dataflows. It installs dataflows (indexes, materialized views, subscribes,
//! copy-tos) with an as-of it selects ([`select_as_of`]), answers peeks (first replica wins) and
//! forwards subscribe batches once each, and holds back compaction of every input exactly as far as some
//! reader or dataflow still needs it (the compaction chain). Every decision is made by [`InstanceCore`],
//! one synchronous state machine per instance, which the controller runs in one tokio task per instance
//! and the `sim` crate drives directly under seeded faults. Replicas are started by an [`Orchestrator`]
//! (in-process, or local processes) or run elsewhere; storage is reached through
//! `storage::StorageCollections`.
//!
//! **What it is not.** It runs no dataflow itself (that is the `compute` crate's replica, which this crate
//! never depends on outside its tests), keeps no connection state of its own (the `replica-client`
//! crate's `ReplicaClient` reconnects, replays and hydrates), and stores nothing itself (the `storage`
//! crate does, introspection included).
//!
//! **Invariants** (DESIGN §5 1–4 and 7, checked by [`InstanceCore::check_invariants`] after every
//! simulator step): a collection's since is the meet of its holds and never regresses; an import hold
//! is never ahead of its collection's since; a peek's hold lives until every replica it was sent to has
//! answered or been dropped, and at most until the peek's deadline; a collection's state goes away only
//! once it is dropped, fully compacted and no connected replica can report on it; the history a new
//! replica is replayed holds no dropped and fully compacted dataflow. Every peek ends, with rows or a typed
//! [`PeekFailure`]. Nothing a caller or replica sends panics the controller: bad input is a typed error
//! (see [Errors](#errors)) that changes nothing, a command too large for a replica connection's frame is
//! refused before it is recorded, and a faulty replica is disconnected.
//!
//! **Modules.** `api` ([`ComputeController`], [`PeekHandle`]), `config` ([`ControllerConfig`],
//! [`ComputeInstanceConfig`], [`ReplicaLocation`]), `clock` ([`Timestamp`], [`wallclock_ms`]),
//! `instance` ([`InstanceCore`] and the state it shares with the API, [`SharedState`]), `instance_task`
//! (the tokio task around a core), `storage_watch` (storage frontiers for materialized views),
//! `storage_peek` (peeks answered from storage), `introspection` and `introspection_writer`
//! ([`IntrospectionKind`] relations and their writer), `metrics` ([`ControllerMetrics`], the Prometheus
//! families, and each instance's [`InstanceMetrics`]), `status` (the answers of
//! [`ComputeController::hydration_status`] and [`ComputeController::wallclock_lag`]), `as_of`,
//! `orchestrator`, `response` ([`ComputeControllerResponse`]) and `error`.
//!
//! # Errors
//!
//! One `thiserror` type per operation, each variant produced by a test: the core's in
//! `tests/it/errors.rs`, the async API's in `tests/it/api_errors.rs`.
//!
//! **Tests.** `tests/it/` (one binary): the core driven by synthetic replica events (`chain`, `peeks`,
//! `replicas`, `sinks`, `materialized_views`, `introspection`, `metrics`, `errors`) and the async controller
//! against
//! real in-process replicas (`e2e`, `faults`, `orchestrators`, `api_errors`); unit tests beside
//! `as_of` and `orchestrator`; benchmarks in `benches/controller.rs` (`cargo xtask bench controller`).

mod api;
mod as_of;
mod clock;
mod config;
mod error;
mod instance;
mod instance_task;
mod introspection;
mod introspection_writer;
mod metrics;
mod orchestrator;
mod response;
mod status;
mod storage_peek;
mod storage_watch;

pub use api::{ComputeController, PeekHandle};
pub use as_of::{AsOfSelectionError, ImportFrontiers, select_as_of};
pub use clock::{Timestamp, wallclock_ms};
pub use config::{ComputeInstanceConfig, ControllerConfig, ReplicaLocation};
pub use error::{
    CancelPeekError, CollectionDropError, CollectionLookupError, CollectionMissing, CollectionStatusError,
    DataflowCreationError, InstanceCreationError, InstanceDropError, InstanceMissing, PeekError, PeekFailure,
    ReadPolicyError, ReplicaCreationError, ReplicaDropError,
};
pub use instance::{
    CollectionFrontiers, CollectionKind, InstanceCore, InstanceCoreConfig, InstanceOutput, PeekOptions,
    PeekRequest, PreparedPeek, SharedHandle, SharedState, lock,
};
pub use introspection::{IntrospectionKind, IntrospectionState, ReplicaHealth, peek_duration_bucket_ms};
pub use metrics::{ControllerMetrics, InstanceMetrics, PeekRecorder};
pub use orchestrator::{
    BLOB_URL_ENV, CONSENSUS_URL_ENV, InProcessOrchestrator, KEEPALIVE_INTERVAL_ENV, Launcher, LoopbackHosts,
    Orchestrator, ProcessEvent, ProcessHost, ProcessHosts, ProcessOrchestrator, ProcessOrchestratorConfig,
    ReplicaProcessSecurity, ReplicaSpec, ReplicaStorage, ReplicaTlsFiles, RunningReplica,
    SHARD_INLINE_PART_ENV, SHARD_PART_CACHE_ENV, SHARD_POLL_INTERVAL_ENV,
};
pub use protocol::ControllerEpoch;
pub use response::{ComputeControllerResponse, PeekNotification, PeekOutcome, PeekResult};
pub use status::{LagMinute, ReplicaHydration, ReplicaLag};
pub use transport::{ClientSecurity, ServerSecurity, SharedSecret, TlsClientConfig, TlsServerConfig};
