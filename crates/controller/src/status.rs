//! What the controller answers about a collection's progress on each replica: its hydration
//! ([`ReplicaHydration`], from
//! [`ComputeController::hydration_status`](crate::ComputeController::hydration_status)) and its wall-clock
//! lag now and per minute ([`ReplicaLag`], from
//! [`ComputeController::wallclock_lag`](crate::ComputeController::wallclock_lag)). The same facts are in the
//! introspection relations `compute_hydration`, `compute_wallclock_lag` and
//! `compute_wallclock_lag_history` (see `introspection.rs`), and in the Prometheus metrics
//! (`metrics.rs`); these types are for a service that asks its controller directly.
//!
//! **Tests:** `tests/it/introspection.rs` (the core's answers), `tests/it/e2e.rs` (through the API).

use protocol::ReplicaId;

/// One replica's hydration of one live collection, on the replica's current connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaHydration {
    /// The replica.
    pub replica: ReplicaId,
    /// Whether the replica's write frontier for the collection passed the collection's as-of (the as-of
    /// it was replayed at, after a reconnect) on its current connection.
    pub hydrated: bool,
    /// When hydration on the current connection began, in milliseconds since the epoch: the later of the
    /// collection's creation and the connection's start. `None` while the replica is not connected.
    pub hydrating_since_ms: Option<u64>,
    /// When it was hydrated on the current connection; `None` until it is.
    pub hydrated_at_ms: Option<u64>,
    /// How long that took (`hydrated_at_ms - hydrating_since_ms`); `None` until it is hydrated.
    pub hydration_time_ms: Option<u64>,
}

/// The largest wall-clock lag of one collection on one replica within one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagMinute {
    /// The minute's start, in milliseconds since the epoch (a multiple of 60,000).
    pub minute_ms: u64,
    /// The largest lag seen in it (sampled once per introspection interval), in milliseconds.
    pub max_lag_ms: u64,
}

/// One replica's wall-clock lag for one live collection: now minus its upper, and its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaLag {
    /// The replica.
    pub replica: ReplicaId,
    /// The controller's clock minus the upper the replica reported for the collection on its current
    /// connection, in milliseconds; 0 once the upper is closed; `None` before it reported one.
    pub lag_ms: Option<u64>,
    /// The finished minutes the instance keeps (`wallclock_lag_history_minutes`), oldest first: what
    /// `compute_wallclock_lag_history` holds for this collection and replica.
    pub history: Vec<LagMinute>,
    /// The minute under way, if a lag was sampled in it yet.
    pub current_minute: Option<LagMinute>,
}
