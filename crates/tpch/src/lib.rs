//! TPC-H on the plan IR: what a SQL front end would hand this controller, checked against SQLite.
//!
//! **What this is.** The eight tables ([`Table`], [`schema`]), their data and refresh batches from the
//! `tpchgen` crate ([`Data`]), the 22 queries as dataflows with an index export each, one function per
//! query with its SQL beside it ([`queries`], built with a small relational [`builder`]), SQLite holding
//! the same data and running the same SQL ([`sqlite::Oracle`], with every semantic difference in
//! [`sqlite::semantics`]), and a [`Runner`] that loads the tables into storage, installs the dataflows
//! on a replica through the controller, applies refresh batches and peeks the answers.
//!
//! **What this is not.** A SQL front end: the queries are written by hand against the IR, as a front end
//! would plan them. Not a benchmark harness either: `benches/tpch.rs` (`cargo xtask bench tpch`) uses
//! this crate to measure.
//!
//! **Invariants.** Every query's dataflow passes `DataflowDescription::validate`; after the initial load
//! and after every refresh batch, every query's answer equals SQLite's up to [`sqlite::semantics`].
//!
//! **Tests.** `tests/it/` (one binary): every dataflow validates; the 22 queries against SQLite after
//! hydration and after each refresh batch at scale factor 0.01 (`TPCH_SCALE_FACTOR` and
//! `TPCH_REFRESHES` run others).

pub mod builder;
pub mod data;
pub mod queries;
pub mod runner;
pub mod schema;
pub mod sqlite;

pub use data::{Data, Refresh};
pub use queries::{Query, all};
pub use runner::{ReplicaKind, RunError, Runner};
pub use schema::{Catalog, TABLES, Table};
