//! Metrics of a process: one Prometheus registry per process (DESIGN §10), the series that go away with
//! what they describe, and the HTTP endpoint that serves the registry.
//!
//! **What this is.**
//! - [`Series`]: one labelled series of a metric family, removed from its family when dropped. Whoever owns
//!   an instance, a replica or a collection owns its series, so when the object goes away its series go
//!   too: nothing stale is left in the exposition. A `Series` is also the handle hot paths update: labels
//!   are formatted once, when it is made, and an update is one atomic operation, never a registry lock.
//! - [`encode_text`]: a registry in Prometheus' text exposition format (version 0.0.4); [`parse_text`]
//!   reads it back into [`Sample`]s, for tests and tools.
//! - [`MetricsServer`] (feature `http`): `GET /metrics` over HTTP/1 on tokio, the one endpoint every
//!   binary of the workspace serves (`compute-replica --metrics-addr`, `sim cluster`), with a bound on
//!   connections, a deadline on each, and a limit on request headers. [`scrape`] is its blocking client for
//!   tests and tools.
//!
//! **What this is not.** It defines no metric itself: the controller (`controller::ControllerMetrics`),
//! the replica (`compute`'s `metrics` module) and storage (`storage::StorageMetrics`) define theirs where
//! their code is. No push gateway, no protobuf exposition.
//!
//! **Invariants.** A [`Series`] removes exactly the label values it was made with, once. The server holds at
//! most [`MetricsServerConfig::max_connections`] connections; one more is closed at once, unanswered.
//!
//! **Tests.** `tests/it/` (one binary): series removal, the exposition, and the server over real sockets
//! (its answers, its connection limit, its deadlines).

mod series;
mod text;

#[cfg(feature = "http")]
mod http;

pub use series::{Family, Series};
pub use text::{Sample, encode_text, parse_text, sample_value};

#[cfg(feature = "http")]
pub use http::{MetricsServer, MetricsServerConfig, Scraped, scrape};
