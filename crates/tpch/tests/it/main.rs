//! The `tpch` crate's integration tests: the queries' dataflows validate, and their answers on a real
//! replica agree with SQLite after hydration and after every refresh batch.

mod queries;
