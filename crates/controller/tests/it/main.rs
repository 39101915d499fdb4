//! Integration tests of the controller: the instance core driven with synthetic replica events (the
//! compaction chain, peek holds, replica drops, faulty replicas, subscribes, copy-to, every error), and the
//! async controller end to end against real compute replicas.

mod chain;
mod e2e;
mod errors;
mod harness;
mod peeks;
mod replicas;
mod sinks;
