//! Deterministic simulation: one seed drives a whole run of the real controller and replica-client cores
//! against model replicas, simulated network and time, with faults; every step is checked against
//! DESIGN §5's invariants and an oracle.
//!
//! Entry points: [`run_seed`] (one seed) and the `sim simulate` command (`cargo xtask sim`).
//! **Tests:** `tests/it/simulation.rs` (a fixed range, determinism by trace hash, the planted bug).

mod checks;
mod evaluation;
mod model;
mod oracle;
mod peek;
mod real;
mod rng;
mod trace;
mod violation;
mod world;

pub use real::{RealConfig, run_real};
pub use rng::Rng;
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
