//! How the controller, its instances and its replicas are configured: [`ControllerConfig`] (the
//! controller's own settings and the defaults of new instances), [`ComputeInstanceConfig`] (one
//! instance's) and [`ReplicaLocation`] (where a replica runs).
//!
//! **Tests:** the settings are exercised by the end-to-end tests (`tests/it/e2e.rs`,
//! `tests/it/orchestrators.rs`), which build their configuration in `tests/it/harness.rs`.

use prometheus::Registry;
use protocol::ControllerEpoch;
use replica_client::{Backoff, ClientSecurity};

use crate::clock::Timestamp;
use crate::instance::InstanceCoreConfig;

/// The controller's configuration. `instance`, `replica_backoff` and `hydration_concurrency` are the
/// defaults of [`default_instance_config`](crate::ComputeController::default_instance_config); each
/// instance runs with the [`ComputeInstanceConfig`] given to
/// [`create_instance`](crate::ComputeController::create_instance).
///
/// **Epoch.** Replicas serve one controller at a time and let another take over only with a higher
/// `epoch` (fencing: `protocol::ComputeCommand::Hello`). The controller does not choose its epoch: the
/// service that embeds it does, from its own durable state, raising it whenever a controller takes over
/// from another (e.g. a counter in its catalog, incremented and persisted before the new controller
/// starts; `sim cluster` passes 1). A controller restarted with the same epoch gets its replicas back
/// once its predecessor's connections are gone; one with a lower epoch never does (its replicas report
/// `ReplicaStatus::Fenced`).
///
/// **Security.** `replica_security` secures every connection to a replica (`transport`: TLS with the
/// replicas' CA, or explicitly insecure; the shared secret or a client certificate). There is no
/// default: [`ControllerConfig::new`] takes it.
///
/// **Silent replicas.** A connection to a replica writes a keepalive every
/// `replica_keepalive_interval_ms` while it has nothing to send, and is given up (then made again) when
/// nothing arrived on it for `replica_idle_timeout_ms`: that is how a replica cut off the network is
/// noticed. The idle timeout must stay well above the replicas' own keepalive interval
/// (`compute-replica --keepalive-interval-ms`, 10 s by default), or quiet replicas are reconnected for
/// nothing.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The controller's epoch (see above).
    pub epoch: ControllerEpoch,
    /// How connections to replicas are secured.
    pub replica_security: ClientSecurity,
    /// Default per-instance tunables (read policy, peek timeout, introspection interval).
    pub instance: InstanceCoreConfig<Timestamp>,
    /// Default reconnection backoff for replica clients.
    pub replica_backoff: Backoff,
    /// Default sequential hydration limit for new replicas (`None`: unlimited).
    pub hydration_concurrency: Option<usize>,
    /// How often each instance task ticks (timeouts, lag), in milliseconds.
    pub tick_interval_ms: u64,
    /// A replica connection with nothing to send writes a keepalive this often, in milliseconds.
    pub replica_keepalive_interval_ms: u64,
    /// A replica connection on which nothing arrived for this long is given up, in milliseconds.
    pub replica_idle_timeout_ms: u64,
    /// Whether to write introspection into storage collections (see `IntrospectionKind`).
    pub introspection: bool,
    /// Where the controller registers its Prometheus metrics (see `ControllerMetrics`): the embedding
    /// service's registry, or by default one of the controller's own, which
    /// [`ComputeController::metrics_registry`](crate::ComputeController::metrics_registry) hands out for the
    /// service to serve. `None`: no metrics.
    pub metrics: Option<Registry>,
}

impl ControllerConfig {
    /// The default configuration of a controller of `epoch` whose replica connections are secured with
    /// `replica_security`.
    pub fn new(epoch: ControllerEpoch, replica_security: ClientSecurity) -> Self {
        ControllerConfig {
            epoch,
            replica_security,
            instance: InstanceCoreConfig::default(),
            replica_backoff: Backoff::default(),
            hydration_concurrency: None,
            tick_interval_ms: 50,
            replica_keepalive_interval_ms: replica_client::DEFAULT_KEEPALIVE_INTERVAL_MS,
            replica_idle_timeout_ms: replica_client::DEFAULT_IDLE_TIMEOUT_MS,
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
