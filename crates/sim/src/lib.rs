//! The simulator and the end-to-end cluster scenario.
//!
//! **What this is.** Two ways of proving the whole system:
//! - [`simulation`]: deterministic simulation. The unmodified controller and replica-client cores run
//!   against model replicas, a simulated network and a simulated clock; one `u64` seed drives the workload,
//!   the faults and the timing; every step is checked against DESIGN §5's invariants and an oracle.
//! - the cluster scenario (`sim cluster`, README's main command): real processes on loopback.
//!
//! **What this is not.** A library anyone depends on (the tidy check keeps it at the top of the graph).
//! `anyhow` is allowed here.
//!
//! **Tests:** `tests/it/`.

pub mod simulation;
