//! Integration tests of the controller: the instance core driven with synthetic replica events (the
//! compaction chain and when a dropped collection goes away, peek holds and deadlines, replica drops, faulty
//! replicas, subscribes and finished sinks, copy-to, every error of the core and every way an index peek
//! fails), and the async controller end to end against real compute replicas, including managed replicas
//! started by the in-process orchestrator (`orchestrators`), and every error that only the async API
//! produces, each shown to change nothing (`api_errors`), and a replica the controller finds faulty being
//! disconnected, reconnected and serving again (`faults`). Introspection as the core writes it, with exact
//! values (`introspection`), and as it reaches storage (`e2e`). Materialized views whose upper is their
//! target's durable storage upper, in the core and end to end (`materialized_views`).

mod api_errors;
mod chain;
mod e2e;
mod errors;
mod faults;
mod harness;
mod introspection;
mod materialized_views;
mod metrics;
mod orchestrators;
mod peeks;
mod replicas;
mod sinks;
