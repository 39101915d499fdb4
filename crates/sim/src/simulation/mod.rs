//! Deterministic simulation: one seed drives a whole run of the real controller and replica-client cores
//! against model replicas, simulated network and time, with faults; every step is checked against
//! DESIGN §5's invariants and an oracle.
//!
//! Pieces: `world.rs` (the executor, the workload, the faults and the world's checks), `model.rs` and
//! `dataflow.rs` (model replica processes, computing from storage), `evaluation.rs` (their shared
//! evaluation memo), `oracle.rs` (the full history and its evaluation), `checks.rs` (peek and subscribe
//! results against the oracle), `peek.rs` (what a peek means, shared by model and oracle),
//! `storage.rs` (the tables as shards over simulated blob and consensus, with their faults),
//! `violation.rs` (typed violations), `real.rs` (`--real-compute`: the real stack, same oracle).
//!
//! Entry points: [`run_seed`] (one seed) and the `sim simulate` command (`cargo xtask sim`).
//! **Tests:** `tests/it/main.rs` (determinism by trace hash, a run checking peeks and subscribes, storage
//! that invents rows caught, storage outages and lost replies survived, a writer that duplicates appends caught,
//! the real stack); unit tests in `dataflow.rs`,
//! `evaluation.rs`, `violation.rs`; the seed ranges and the planted bug in `cargo xtask sim`.

mod checks;
mod dataflow;
mod evaluation;
mod model;
mod oracle;
mod peek;
mod real;
mod rng;
mod storage;
mod violation;
mod world;

pub use real::{RealConfig, run_real};
pub use rng::Rng;
pub use storage::StorageStats;
pub use violation::{Invariant, Violation};
pub use world::{Outcome, SimConfig, World};

/// Runs one seed with the default phases.
pub fn run_seed(seed: u64) -> Outcome {
    World::new(seed, SimConfig::default()).run()
}

/// Runs one seed with the given phases.
pub fn run_seed_with(seed: u64, config: SimConfig) -> Outcome {
    World::new(seed, config).run()
}
