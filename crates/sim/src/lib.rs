//! The simulator and the end-to-end cluster scenario.
//!
//! **What this is.** Two ways of proving the whole system:
//! - [`simulation`]: deterministic simulation. The unmodified controller and replica-client cores run
//!   against model replicas, a simulated network and a simulated clock; one `u64` seed drives the workload,
//!   the faults and the timing; every step is checked against DESIGN §5's invariants and an oracle.
//! - [`cluster`]: the cluster scenario (`sim cluster`, the README's main command): compute replicas
//!   as real processes on loopback, on shards every process opens, the controller in this process, a generated
//!   workload, a replica crash and a dataflow recreation, every result checked against an oracle.
//! - [`tools`]: Prometheus' `promtool` and headless Chromium, checking the metrics every process serves
//!   and the report page `sim cluster --report` writes (`sim check-report DIR`).
//!
//! **What this is not.** A library anyone depends on (the tidy check keeps it at the top of the graph).
//! `anyhow` is allowed here.
//!
//! **Tests:** `tests/it/`.

pub mod cluster;
pub mod simulation;
pub mod tools;
