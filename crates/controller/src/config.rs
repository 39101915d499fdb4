//! How the controller, its instances and its replicas are configured: [`ControllerConfig`] (the
//! controller's own settings and the defaults of new instances), [`ComputeInstanceConfig`] (one
//! instance's) and [`ReplicaLocation`] (where a replica runs).
//!
//! **Tests:** the settings are exercised by the end-to-end tests (`tests/it/e2e.rs`,
//! `tests/it/orchestrators.rs`), which build their configuration in `tests/it/harness.rs`.

use prometheus::Registry;
use replica_client::Backoff;

use crate::clock::Timestamp;
use crate::instance::InstanceCoreConfig;

/// The controller's configuration. `instance`, `replica_backoff` and `hydration_concurrency` are the
/// defaults of [`default_instance_config`](crate::ComputeController::default_instance_config); each
/// instance runs with the [`ComputeInstanceConfig`] given to
/// [`create_instance`](crate::ComputeController::create_instance).
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Default per-instance tunables (read policy, peek timeout, introspection interval).
    pub instance: InstanceCoreConfig<Timestamp>,
    /// Default reconnection backoff for replica clients.
    pub replica_backoff: Backoff,
    /// Default sequential hydration limit for new replicas (`None`: unlimited).
    pub hydration_concurrency: Option<usize>,
    /// How often each instance task ticks (timeouts, lag), in milliseconds.
    pub tick_interval_ms: u64,
    /// Whether to write introspection into storage collections (see `IntrospectionKind`).
    pub introspection: bool,
    /// Where the controller registers its Prometheus metrics (see `ControllerMetrics`): the embedding
    /// service's registry, or by default one of the controller's own, which
    /// [`ComputeController::metrics_registry`](crate::ComputeController::metrics_registry) hands out for the
    /// service to serve. `None`: no metrics.
    pub metrics: Option<Registry>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            instance: InstanceCoreConfig::default(),
            replica_backoff: Backoff::default(),
            hydration_concurrency: None,
            tick_interval_ms: 50,
            introspection: true,
            metrics: Some(Registry::new()),
        }
    }
}

/// How one compute instance runs ([`create_instance`](crate::ComputeController::create_instance)).
#[derive(Debug, Clone)]
pub struct ComputeInstanceConfig {
    /// The instance's default index read policy, peek timeout and introspection interval.
    pub core: InstanceCoreConfig<Timestamp>,
    /// How its replicas' clients back off between connection attempts.
    pub replica_backoff: Backoff,
    /// How many dataflows each of its replicas hydrates at once (`None`: all).
    pub hydration_concurrency: Option<usize>,
}

/// Where a replica runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaLocation {
    /// Already running somewhere: one controller address per process.
    Unmanaged {
        /// The addresses.
        addresses: Vec<String>,
    },
    /// Started by the controller's orchestrator.
    Managed {
        /// Timely workers per process.
        workers: usize,
        /// Processes.
        processes: usize,
    },
}
