//! The storage crate's integration tests: one binary, one module per area.
//!
//! - `errors`: every error case of the API, asserted, against the embedded store;
//! - `model`: a property test of the synchronous core against a naive model (a list of every update);
//! - `listen`: listens and frontier watches, including lagging listeners and drops;
//! - `table_writer`: the table writer with a manual clock;
//! - `backends`: the backends the shard tests run on (in-memory; local files + SQLite; S3 + PostgreSQL,
//!   started by `storage::services`);
//! - `blob`, `consensus`: the conformance suites of the two engine traits, on every backend;
//! - `shards`: the `StorageCollections` behaviours on shards, on every backend (reusing `errors` and
//!   `listen` scenarios), with fault injection from `flaky`;
//! - `faults`: the shard engine's faults (SIGKILLed writers, a PostgreSQL outage, racing writer
//!   processes, damage by hand, a full disk, huge collections, space under churn);
//! - `part_cache`: the process's part cache through the engine (one fetch per part for concurrent readers,
//!   the bound, damage still reported);
//! - `shard_model`: a property test of the shard state machine's synchronous core against a naive model.
//!
//! Helpers shared by the modules live here.

mod backends;
mod blob;
mod consensus;
mod errors;
mod faults;
mod flaky;
mod listen;
mod model;
mod part_cache;
mod shard_metrics;
mod shard_model;
mod shards;
mod table_writer;

use frontiers::Antichain;
use protocol::{ColumnType, Datum, GlobalId, RelationDesc, Row, ScalarType};
use storage::{AppendRequest, InProcess, StoreConfig};

/// A one-column `(x: Int64)` schema.
pub fn int_desc() -> RelationDesc {
    RelationDesc::new([("x", ColumnType::new(ScalarType::Int64, false))])
}

/// A row of `int_desc`.
pub fn int_row(x: i64) -> Row {
    Row::pack([Datum::Int64(x)])
}

/// The collections the crash tests' writer processes append to (`faults.rs`): a
/// writer, its sequence number, a part of the append and padding.
pub fn crash_desc() -> RelationDesc {
    RelationDesc::new([
        ("writer", ColumnType::new(ScalarType::Int64, false)),
        ("seq", ColumnType::new(ScalarType::Int64, false)),
        ("part", ColumnType::new(ScalarType::Int64, false)),
        ("pad", ColumnType::new(ScalarType::Text, false)),
    ])
}

/// A row of [`crash_desc`].
pub fn crash_row(writer: u64, seq: u64, part: i64, pad: &'static str) -> Row {
    Row::pack([Datum::Int64(writer as i64), Datum::Int64(seq as i64), Datum::Int64(part), Datum::Text(pad)])
}

/// `u{n}`.
pub fn user(n: u64) -> GlobalId {
    GlobalId::User(n)
}

/// `[t]`.
pub fn at(t: u64) -> Antichain<u64> {
    Antichain::from_elem(t)
}

/// An append of `updates` to `id` moving its upper from `lower` to `upper`.
pub fn append(id: GlobalId, updates: Vec<(Row, u64, i64)>, lower: u64, upper: u64) -> AppendRequest {
    AppendRequest { id, updates, expected_upper: at(lower), new_upper: at(upper) }
}

/// A store in memory with the default configuration.
pub fn memory_store() -> InProcess {
    InProcess::in_memory(StoreConfig::default())
}

/// The proptest configuration: `PROPTEST_CASES` decides the number of cases (STYLE, "proptest pitfall"),
/// through the workspace's one definition (`test-support`).
pub fn proptest_config() -> proptest::test_runner::Config {
    test_support::proptest_config(test_support::proptest_cases(1))
}
