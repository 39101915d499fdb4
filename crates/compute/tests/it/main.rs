//! The compute replica's integration tests: real replicas (1 worker, 2 workers, 2 timely processes) on an
//! embedded storage, driven over real sockets by a small blocking test controller (`harness`).
//!
//! Modules: `operators` (every plan operator against `protocol::reference`, proptest, multiplicities beyond
//! `i64` included), `sqlite` (random plans against SQLite after every batch of updates), `exports` (multiple
//! exports, import chains, materialized views with two replicas, subscribes, copy-to), `reconnect`
//! (reconciliation without rehydration, and many reconnects rebuilding dataflows), `bad_input` (wrong
//! stages, garbage, unknown ids, peeks before the since), `limits` (responses over the frame limit, a
//! controller that does not read), `cluster` (multi-process start-up and failure: strangers on a cluster
//! port, a taken port, a missing peer, a loop of start-ups, an I/O thread that panics), `metrics` (the replica's Prometheus metrics). Proptest case counts come from `PROPTEST_CASES` (see `harness::proptest_cases`).

// Tests wait for answers with wall-clock timeouts; they are not simulated code.
#![allow(clippy::disallowed_methods)]

mod bad_input;
mod cluster;
mod exports;
mod harness;
mod limits;
mod metrics;
mod operators;
mod reconnect;
mod sqlite;
