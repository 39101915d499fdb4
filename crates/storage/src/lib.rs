//! The storage layer: durable collections with `since` and `upper`, compare-and-append, read holds,
//! snapshots and listens, on shards that every process opens itself.
//!
//! **What this is.** The storage that compute dataflows read their sources from and write materialized views
//! back to, and whose compaction the controller holds back (DESIGN §2, §4). Everything speaks the object-safe
//! [`StorageCollections`] trait, implemented by
//!
//! - [`ShardCollections`]: collections as shards on a [`blob::Blob`] store and a [`consensus::Consensus`]
//!   database, read and written directly by every process that reaches both (DESIGN §9; see [`shard`]).
//!   Backends by URL: local files, S3 (feature `s3`) or memory; SQLite, PostgreSQL (feature `postgres`) or
//!   memory. `storage::services` (feature `services`) starts a throwaway PostgreSQL and S3 server;
//! - [`InProcess`]: an embedded store in one process's memory ([`InProcess::in_memory`]): what the other
//!   crates' tests and benchmarks run on where storage is not what they test. Its layers: [`core`]
//!   (synchronous, deterministic, I/O-free) under [`InProcess`] (the async shell).
//!
//! [`TableWriter`] is a service's `INSERT` at clock timestamps, on any engine. (The storage server that
//! served an `InProcess` over TCP, and the write-ahead log that made it durable, are retired: every process
//! opens the shards itself.)
//! [`StorageMetrics`] is the shard engine's Prometheus families ([`ShardConfig::metrics`]).
//!
//! **What this is not.** Nothing here knows compute or the controller.
//!
//! **Invariants.** For every collection `since` is the meet of its outstanding holds (including its read
//! policy's) and never regresses; `upper` never regresses, also across restarts; an append is visible only
//! once durable, and atomic across the collections it names; reads before `since` are errors.
//!
//! **Snapshot waiting.** [`StorageCollections::snapshot`] at a time that is not yet complete waits up to
//! [`StoreConfig::snapshot_timeout`] (30 s by default) for the upper to pass it, then fails with
//! [`ReadError::NotYetReadable`]. A listen waits without a timeout.
//!
//! **Tests.** Unit tests next to the code; integration tests in `tests/it/` (errors, a property test of the
//! core against a naive model, listens, the table writer; for shards: the engine traits' conformance suites, the
//! `StorageCollections` behaviours and the faults on every backend, a property test of the shard state
//! machine). Benchmarks in `benches/storage.rs` (`cargo xtask bench storage`).

mod api;
pub mod blob;
mod chunk;
pub mod consensus;
pub mod core;
mod error;
pub mod external;
mod inprocess;
mod listen;
mod metrics;
#[cfg(feature = "services")]
pub mod services;
pub mod shard;
mod table_writer;
mod url;

pub use api::{
    AppendRequest, BoxFuture, CollectionFrontiers, ListenEvent, SNAPSHOT_CHUNK_BYTES, SnapshotChunks,
    StorageCollections, StorageReadHold,
};
pub use chunk::RowChunk;
pub use error::{AppendError, CreateError, DropError, HoldError, ReadError};
pub use inprocess::{InProcess, StoreConfig};
pub use listen::{FrontierWatch, Listen};
pub use metrics::{AppendOutcome, BlobOp, ConsensusOp, LeaseKind, PartCacheRead, PartReader, StorageMetrics};
pub use shard::{PartCacheStats, ShardCollections, ShardConfig, ShardOpenError, ShardStats, embedded_urls};
pub use table_writer::{Clock, ManualClock, SystemClock, TableWriteError, TableWriter, TableWriterConfig};
pub use url::UrlError;
