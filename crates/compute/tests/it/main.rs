//! The compute replica's integration tests: real replicas (1 worker, 2 workers, 2 timely processes) on an
//! embedded storage, driven over real sockets by a small blocking test controller (`harness`).
//!
//! Modules: `operators` (every plan operator against `protocol::reference`, proptest, multiplicities beyond
//! `i64` included), `sqlite` (random plans against SQLite after every batch of updates), `exports` (multiple
//! exports, import chains, materialized views with two replicas, subscribes, copy-to), `reconnect`
//! (reconciliation without rehydration), `bad_input` (wrong stages, garbage, unknown ids, peeks before the
//! since), `metrics` (the replica's Prometheus metrics). Proptest case counts come from `PROPTEST_CASES`
//! (see `harness::proptest_cases`).

// Tests wait for answers with wall-clock timeouts; they are not simulated code.
#![allow(clippy::disallowed_methods)]

mod bad_input;
mod exports;
mod harness;
mod metrics;
mod operators;
mod reconnect;
mod sqlite;
