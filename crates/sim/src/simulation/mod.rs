//! Deterministic simulation: one seed drives a whole run of the real controller and replica-client cores
//! against model replicas, simulated network and time, with faults; every step is checked against
//! DESIGN §5's invariants and an oracle.
//!
//! Entry points: [`run_seed`] (one seed) and the `sim simulate` command (`cargo xtask sim`).
//! **Tests:** `tests/it/main.rs` (determinism by trace hash, runs with faults); the seed ranges and the
//! planted bug in `cargo xtask sim` (`xtask/src/sim.rs`).

mod checks;
mod model;
mod oracle;
mod real;
mod rng;
mod world;

pub use real::{RealConfig, run_real};
pub use rng::Rng;
pub use world::{Outcome, SimConfig, World};

/// Runs one seed with the default phases.
pub fn run_seed(seed: u64) -> Outcome {
    World::new(seed, SimConfig::default()).run()
}

/// Runs one seed with the given phases.
pub fn run_seed_with(seed: u64, config: SimConfig) -> Outcome {
    World::new(seed, config).run()
}
