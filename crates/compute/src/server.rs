//! Starting and stopping a replica process: [`ReplicaServer::start`], [`ReplicaConfig`], [`ReplicaHandle`].
//!
//! **What this is.** The threads of one replica process and the socket shell around the core:
//! - one thread (`compute-io`) runs a current-thread tokio runtime with the listener, the connection tasks
//!   and the [`Core`](crate::core::Core) (protocol state, merging, storage I/O);
//! - one thread (`compute-timely`) connects a multi-process replica's processes to each other
//!   ([`crate::cluster`]), starts the timely workers (`workers` threads) and watches them.
//!
//! Controller connections are `connection`'s: each is secured ([`ReplicaConfig::security`]: TLS unless
//! insecure, then a shared secret's challenge-response or client certificates), bounded
//! ([`ReplicaLimits`]: unauthenticated connections, handshake and idle timeouts, frame limits) and handed
//! to the core after its Hello; the core admits it (fencing) and encodes every response.
//!
//! **Failing loudly.** The process stops serving, closes its connection and listener, and says why
//! ([`ReplicaHandle::failed`]; `compute-replica` then exits non-zero for its orchestrator to restart it)
//! when a worker panics, when timely does not start (the cluster's processes did not all connect in time),
//! when a timely worker thread ends without being told to (its communication threads died: a peer
//! process went away), when every worker is gone, or when the I/O thread itself panics. A failed process
//! of a cluster closes its cluster sockets, so its peers fail the same way rather than wait for it.
//!
//! **Fault injection.** In debug builds only, [`FAULT_ENV`] set to [`FAULT_IO_PANIC_ON_CONNECT`] makes
//! the I/O thread panic when a controller connects, so that tests can check that a `compute-replica`
//! process whose I/O thread panics exits non-zero. Release builds ignore it.
//!
//! **What this is not.** No protocol decisions after the Hello (the core's) and no dataflow code.
//!
//! **Invariants.** [`ReplicaHandle::shutdown`] (or dropping the handle) stops the listener, the core and
//! every worker, and joins all threads; no thread outlives the handle. A process's cluster port is bound
//! by `start`, so a port that is taken is a [`StartError`], never a process half-started.
//!
//! **Tests.** `tests/it/` starts replicas in-process with this API (1 and 2 workers, 2 processes);
//! `tests/it/cluster.rs` has the start-up and failure cases.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use prometheus::Registry;
use protocol::frame::DEFAULT_MAX_FRAME_BYTES;
use storage::StorageCollections;
use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
use timely::communication::allocator::{AllocatorBuilder, ProcessBuilder};
use timely::communication::{Hooks, WorkerGuards};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::{oneshot, watch};
use tracing::{Instrument, debug, error, info, info_span, warn};
use transport::{PRE_AUTH_MAX_FRAME_BYTES, ServerSecurity};

use crate::cluster::{Cluster, ClusterListener, Cut};
use crate::connection::{ConnectionConfig, accept_loop};
use crate::core::{Core, CoreEvent, CoreExit, CoreLimits, CoreShared, Topology};
use crate::messages::{FromWorker, ToWorker, WorkerTx};
use crate::metrics::ReplicaMetrics;
use crate::worker::{install_idle_merge, run_worker};

/// The merge effort differential spends on idle arrangements when a replica starts
/// (`UpdateConfiguration.idle_merge_effort` changes it while it runs; 0 turns idle merging off).
pub const DEFAULT_IDLE_MERGE_EFFORT: usize = 1_000;

/// How long, by default, the processes of a multi-process replica wait for each other when they start.
pub const DEFAULT_CLUSTER_CONNECT_TIMEOUT_MS: u64 = 60_000;

/// A connection may have this many maximum frames' worth of responses queued and not yet written; beyond
/// that the controller is not reading, and the connection is dropped (it reconnects and rehydrates).
pub const QUEUED_FRAMES: usize = 4;

/// The environment variable that injects a fault, in debug builds only (tests of the failure paths of a
/// `compute-replica` process, which cannot reach its threads otherwise).
pub const FAULT_ENV: &str = "COMPUTE_REPLICA_FAULT";

/// [`FAULT_ENV`]'s value that makes the I/O thread panic when a controller connection becomes active.
pub const FAULT_IO_PANIC_ON_CONNECT: &str = "io-panic-on-connect";

/// The fault to inject: [`FAULT_ENV`]'s value in a debug build, nothing in a release build.
fn injected_fault() -> Option<String> {
    if cfg!(debug_assertions) { std::env::var(FAULT_ENV).ok() } else { None }
}

/// The configuration of one replica process.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Where to listen for the controller (port 0 picks a free port; see [`ReplicaHandle::local_addr`]).
    pub listen: SocketAddr,
    /// Timely worker threads in this process.
    pub workers: usize,
    /// This process's index in `timely_addresses` (0 for a single-process replica).
    pub process: usize,
    /// The timely addresses of every process of the replica; empty or one entry for a single process.
    pub timely_addresses: Vec<String>,
    /// The storage layer (embedded or a client).
    pub storage: Arc<dyn StorageCollections>,
    /// How controller connections are secured and authenticated (TLS, a shared secret, client
    /// certificates), and the secret that authenticates the cluster's processes to each other.
    pub security: ServerSecurity,
}

/// The limits and timeouts of a replica process ([`ReplicaServer::start_with`]); the defaults suit
/// production and most tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaLimits {
    /// The largest frame read from or written to a controller connection. It must not exceed the
    /// controller's own limit (`ReplicaClientConfig::max_frame_bytes`), or answers that fit here are
    /// refused there. Default [`DEFAULT_MAX_FRAME_BYTES`].
    pub max_frame_bytes: usize,
    /// How long the processes of a multi-process replica wait for each other at start-up before the
    /// process fails. Default [`DEFAULT_CLUSTER_CONNECT_TIMEOUT_MS`].
    pub cluster_connect_timeout_ms: u64,
    /// How long a new connection may take to set up TLS, authenticate and say Hello. Default
    /// [`DEFAULT_HANDSHAKE_TIMEOUT_MS`].
    pub handshake_timeout_ms: u64,
    /// A connection from which nothing arrived (not even a keepalive) for this long is closed. It must
    /// be well above the controller's keepalive interval (`ReplicaClientConfig::keepalive_interval_ms`).
    /// Default [`DEFAULT_IDLE_TIMEOUT_MS`].
    pub idle_timeout_ms: u64,
    /// The process writes a keepalive after this long without writing, so its controller can tell it
    /// from a vanished one. Default [`DEFAULT_KEEPALIVE_INTERVAL_MS`].
    pub keepalive_interval_ms: u64,
    /// How many connections may be unauthenticated at once; at the limit the oldest of them is closed to
    /// make room (the active controller connection is not among them). Default
    /// [`DEFAULT_MAX_PENDING_CONNECTIONS`].
    pub max_pending_connections: usize,
    /// How many bytes of a materialized view's updates its appender may hold that are not yet written
    /// to storage (while writes are not allowed yet, or storage is unreachable); beyond it the view fails
    /// (`StatusResponse::Failed`, saying so) instead of growing without bound. Default
    /// [`DEFAULT_MAX_VIEW_BACKLOG_BYTES`].
    pub max_view_backlog_bytes: u64,
}

/// How long, by default, a connection may take to set up TLS, authenticate and say Hello.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// How long, by default, a connection may stay silent before it is closed.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
/// How long, by default, a process stays silent on a connection before it writes a keepalive.
pub const DEFAULT_KEEPALIVE_INTERVAL_MS: u64 = 10_000;
/// How many unauthenticated connections a process keeps at most, by default.
pub const DEFAULT_MAX_PENDING_CONNECTIONS: usize = 64;
/// How many bytes of updates, by default, a materialized view's appender holds unwritten at most (1 GiB).
pub const DEFAULT_MAX_VIEW_BACKLOG_BYTES: u64 = 1 << 30;

impl Default for ReplicaLimits {
    fn default() -> Self {
        ReplicaLimits {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            cluster_connect_timeout_ms: DEFAULT_CLUSTER_CONNECT_TIMEOUT_MS,
            handshake_timeout_ms: DEFAULT_HANDSHAKE_TIMEOUT_MS,
            idle_timeout_ms: DEFAULT_IDLE_TIMEOUT_MS,
            keepalive_interval_ms: DEFAULT_KEEPALIVE_INTERVAL_MS,
            max_pending_connections: DEFAULT_MAX_PENDING_CONNECTIONS,
            max_view_backlog_bytes: DEFAULT_MAX_VIEW_BACKLOG_BYTES,
        }
    }
}

impl ReplicaLimits {
    /// Refuses limits the process cannot work with.
    fn check(&self) -> Result<(), StartError> {
        let invalid = |reason: String| Err(StartError::InvalidConfig(reason));
        if self.max_frame_bytes < PRE_AUTH_MAX_FRAME_BYTES {
            return invalid(format!("a frame limit below {PRE_AUTH_MAX_FRAME_BYTES} bytes"));
        }
        let timeouts = [self.handshake_timeout_ms, self.idle_timeout_ms, self.keepalive_interval_ms];
        if timeouts.contains(&0) || self.max_pending_connections == 0 || self.max_view_backlog_bytes == 0 {
            return invalid(
                "a zero timeout, keepalive interval, pending-connection limit or view backlog limit"
                    .to_string(),
            );
        }
        Ok(())
    }
}

impl ReplicaConfig {
    /// A single-process replica with `workers` workers listening on `listen`, its connections secured
    /// with `security`.
    pub fn new(
        listen: SocketAddr,
        workers: usize,
        storage: Arc<dyn StorageCollections>,
        security: ServerSecurity,
    ) -> Self {
        ReplicaConfig { listen, workers, process: 0, timely_addresses: Vec::new(), storage, security }
    }

    /// The same, as process `process` of a replica whose processes' timely addresses are `addresses`.
    pub fn in_cluster(mut self, process: usize, addresses: Vec<String>) -> Self {
        self.process = process;
        self.timely_addresses = addresses;
        self
    }
}

/// Why a replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is inconsistent.
    #[error("invalid replica configuration: {0}")]
    InvalidConfig(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// This process's timely address (the cluster port) could not be bound.
    #[error("cannot bind the cluster address {address}: {source}")]
    ClusterBind {
        /// The address.
        address: String,
        /// The error.
        source: std::io::Error,
    },
    /// A thread or the async runtime could not be started.
    #[error("cannot start the replica's threads: {0}")]
    Threads(std::io::Error),
    /// The replica's metrics could not be registered (the registry has them already).
    #[error("cannot register the replica's metrics: {0}")]
    Metrics(prometheus::Error),
}

/// Starts replica processes.
#[derive(Debug)]
pub struct ReplicaServer;

/// Whether a process serves, stopped when told to, or failed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ProcessState {
    Running,
    Stopped,
    Failed(String),
}

/// A running replica process. Dropping it shuts it down.
#[derive(Debug)]
pub struct ReplicaHandle {
    local_addr: SocketAddr,
    cluster_addr: Option<SocketAddr>,
    events: UnboundedSender<CoreEvent>,
    io_thread: Option<JoinHandle<()>>,
    timely_thread: Option<JoinHandle<()>>,
    built: Arc<AtomicU64>,
    idle_merge_effort: Arc<AtomicUsize>,
    state: watch::Receiver<ProcessState>,
    /// The registry the replica's metrics are in, and those metrics (unregistered at shutdown).
    registry: Registry,
    metrics: ReplicaMetrics,
}

/// What the timely thread needs to start the workers.
struct TimelyStart {
    process: usize,
    workers: usize,
    worker_config: timely::WorkerConfig,
    cluster: Option<Cluster>,
    connect_timeout: Duration,
    receivers: Vec<Option<Receiver<ToWorker>>>,
    threads: Vec<Arc<OnceLock<Thread>>>,
    reports: UnboundedSender<FromWorker>,
    metrics: ReplicaMetrics,
}

impl ReplicaServer {
    /// Starts one replica process with the default [`ReplicaLimits`]: binds the listener (and the cluster
    /// port of a multi-process replica), starts the tokio thread and the timely thread. Returns once the
    /// ports are bound (a cluster's processes connect to each other in the background).
    pub fn start(config: ReplicaConfig) -> Result<ReplicaHandle, StartError> {
        Self::start_with(config, ReplicaLimits::default())
    }

    /// [`Self::start`] with other limits. Its metrics go to a registry of its own
    /// ([`ReplicaHandle::registry`]).
    pub fn start_with(config: ReplicaConfig, limits: ReplicaLimits) -> Result<ReplicaHandle, StartError> {
        Self::start_with_limits_and_registry(config, limits, Registry::new())
    }

    /// [`start`](Self::start), with the replica's metrics (see the `metrics` module) in `registry`: the
    /// process's, which `compute-replica --metrics-addr` serves. One replica per registry; its families
    /// leave the registry when it shuts down.
    pub fn start_with_registry(
        config: ReplicaConfig,
        registry: Registry,
    ) -> Result<ReplicaHandle, StartError> {
        Self::start_with_limits_and_registry(config, ReplicaLimits::default(), registry)
    }

    /// [`start_with`](Self::start_with) and [`start_with_registry`](Self::start_with_registry) at once.
    pub fn start_with_limits_and_registry(
        config: ReplicaConfig,
        limits: ReplicaLimits,
        registry: Registry,
    ) -> Result<ReplicaHandle, StartError> {
        let metrics = ReplicaMetrics::register(&registry).map_err(StartError::Metrics)?;
        let started = Self::start_threads(config, limits, registry.clone(), metrics.clone());
        if started.is_err() {
            metrics.unregister(&registry);
        }
        started
    }

    fn start_threads(
        config: ReplicaConfig,
        limits: ReplicaLimits,
        registry: Registry,
        metrics: ReplicaMetrics,
    ) -> Result<ReplicaHandle, StartError> {
        let ReplicaConfig { listen, workers, process, timely_addresses, storage, security } = config;
        limits.check()?;
        let max_frame_bytes = limits.max_frame_bytes;
        if workers == 0 {
            return Err(StartError::InvalidConfig("at least one worker is needed".to_string()));
        }
        let processes = timely_addresses.len().max(1);
        if process >= processes {
            return Err(StartError::InvalidConfig(format!(
                "process {process} is not among the {processes} timely addresses"
            )));
        }
        let cut = Arc::new(Cut::default());
        let cluster = if processes > 1 {
            let address = timely_addresses[process].clone();
            let Some(secret) = security.secret().cloned() else {
                return Err(StartError::InvalidConfig(
                    "a multi-process replica needs a shared secret: its processes authenticate each other with it"
                        .to_string(),
                ));
            };
            let listener = ClusterListener::bind(timely_addresses, process, secret)
                .map_err(|source| StartError::ClusterBind { address, source })?;
            Some(Cluster { listener, cut: Arc::clone(&cut) })
        } else {
            None
        };
        let cluster_addr = cluster.as_ref().and_then(|c| c.listener.local_addr().ok());
        let listener = std::net::TcpListener::bind(listen)
            .map_err(|source| StartError::Bind { addr: listen, source })?;
        listener.set_nonblocking(true).map_err(|source| StartError::Bind { addr: listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind { addr: listen, source })?;
        let topology = Topology { process, workers, peers: workers * processes };

        let (events_tx, events_rx) = unbounded_channel::<CoreEvent>();
        // Unbounded: what workers report is bounded by what they were sent (peeks, dataflows) and by the
        // core, which reads it on the same thread that feeds them.
        let (reports_tx, reports_rx) = unbounded_channel::<FromWorker>();
        let mut senders = Vec::with_capacity(workers);
        let mut receivers = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = std::sync::mpsc::channel::<ToWorker>();
            let thread = Arc::new(OnceLock::new());
            senders.push(WorkerTx::new(tx, Arc::clone(&thread)));
            receivers.push(Some(rx));
            threads.push(thread);
        }
        let built = Arc::new(AtomicU64::new(0));
        let idle_merge_effort = Arc::new(AtomicUsize::new(DEFAULT_IDLE_MERGE_EFFORT));
        let mut worker_config = timely::WorkerConfig::default();
        install_idle_merge(&mut worker_config, Arc::clone(&idle_merge_effort));
        let start = TimelyStart {
            process,
            workers,
            worker_config,
            cluster,
            connect_timeout: Duration::from_millis(limits.cluster_connect_timeout_ms),
            receivers,
            threads,
            reports: reports_tx,
            metrics: metrics.clone(),
        };
        let timely_thread = std::thread::Builder::new()
            .name(format!("compute-timely-{process}"))
            .spawn(move || run_timely(start))
            .map_err(StartError::Threads)?;

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Threads)?;
        let core_limits = CoreLimits {
            max_frame_bytes,
            max_queued_bytes: max_frame_bytes.saturating_mul(QUEUED_FRAMES),
            max_view_backlog_bytes: limits.max_view_backlog_bytes,
        };
        // Kept by the I/O thread beyond the core (which a panic drops), so that the workers stop only
        // after a failed process has cut its cluster sockets (see `Core::run`).
        let workers_after_core = senders.clone();
        let mut core = Core::new(
            topology,
            senders,
            storage,
            events_tx.clone(),
            core_limits,
            CoreShared {
                built: Arc::clone(&built),
                idle_merge_effort: Arc::clone(&idle_merge_effort),
                metrics: metrics.clone(),
            },
        );
        if injected_fault().as_deref() == Some(FAULT_IO_PANIC_ON_CONNECT) {
            warn!("fault injected: the I/O thread will panic when a controller connects");
            core.inject_panic_on_connect();
        }
        let accept_events = events_tx.clone();
        let connections = ConnectionConfig {
            security,
            max_frame_bytes,
            handshake_timeout: Duration::from_millis(limits.handshake_timeout_ms),
            idle_timeout: Duration::from_millis(limits.idle_timeout_ms),
            keepalive_interval: Duration::from_millis(limits.keepalive_interval_ms),
            max_pending: limits.max_pending_connections,
        };
        let (state_tx, state) = watch::channel(ProcessState::Running);
        // Every log line of the process's core carries its instance and replica (recorded when the
        // controller says them, in `CreateInstance`) and its process.
        let span =
            info_span!("replica", instance = tracing::field::Empty, replica = tracing::field::Empty, process);
        let io_thread = std::thread::Builder::new()
            .name(format!("compute-io-{process}"))
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    runtime.block_on(
                        serve(listener, core, events_rx, reports_rx, accept_events, connections)
                            .instrument(span),
                    )
                }));
                // Closes the listener and every connection, also those a panic left open.
                drop(runtime);
                let state = match outcome {
                    Ok(CoreExit::Shutdown) => ProcessState::Stopped,
                    Ok(CoreExit::Failed(message)) => ProcessState::Failed(message),
                    Err(panic) => ProcessState::Failed(format!(
                        "the I/O thread panicked: {}",
                        panic_message(panic.as_ref())
                    )),
                };
                if let ProcessState::Failed(message) = &state {
                    error!(%message, "the replica process failed and stopped serving");
                    cut.cut();
                }
                for worker in &workers_after_core {
                    let _ = worker.send(ToWorker::Shutdown);
                }
                drop(workers_after_core);
                state_tx.send_replace(state);
            })
            .map_err(StartError::Threads)?;
        info!(%local_addr, workers, process, processes, "replica started");
        Ok(ReplicaHandle {
            local_addr,
            cluster_addr,
            events: events_tx,
            io_thread: Some(io_thread),
            timely_thread: Some(timely_thread),
            built,
            idle_merge_effort,
            state,
            registry,
            metrics,
        })
    }
}

impl ReplicaHandle {
    /// The address the replica listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The registry the replica's metrics are in (see the `metrics` module): what a process serves at
    /// its `/metrics` endpoint.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The bound cluster (timely) address of a process of a multi-process replica.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.cluster_addr
    }

    /// How many dataflows this process has built since it started (for tests of reconciliation: a kept
    /// dataflow is not built again).
    pub fn dataflows_built(&self) -> u64 {
        self.built.load(Ordering::Relaxed)
    }

    /// The idle merge effort in force (the last `UpdateConfiguration.idle_merge_effort`, or
    /// [`DEFAULT_IDLE_MERGE_EFFORT`]).
    pub fn idle_merge_effort(&self) -> usize {
        self.idle_merge_effort.load(Ordering::Relaxed)
    }

    /// Why the process stopped serving on its own, if it has (see the module documentation for when).
    /// It then closed its connection and its listener; only [`Self::shutdown`] is left to do.
    pub fn failure(&self) -> Option<String> {
        match &*self.state.borrow() {
            ProcessState::Failed(message) => Some(message.clone()),
            ProcessState::Running | ProcessState::Stopped => None,
        }
    }

    /// Waits until the process stops serving on its own (see [`Self::failure`]) and returns why. Pending
    /// forever while it runs normally, and after it was shut down.
    pub async fn failed(&self) -> String {
        let mut state = self.state.clone();
        match state.wait_for(|s| *s != ProcessState::Running).await {
            Ok(state) => match &*state {
                ProcessState::Failed(message) => message.clone(),
                ProcessState::Stopped => std::future::pending().await,
                ProcessState::Running => unreachable!("waited for a change"),
            },
            // The I/O thread records how it ended before it ends, even when it panics; only an abort
            // gets here, and then the process is gone anyway.
            Err(_) => "the I/O thread ended without saying why".to_string(),
        }
    }

    /// Stops the process and joins its threads.
    ///
    /// For a multi-process replica, shut all processes down concurrently (one thread each): a timely
    /// cluster process finishes only once its peers' connections close.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.events.send(CoreEvent::Shutdown);
        if let Some(thread) = self.io_thread.take() {
            let _ = thread.join();
        }
        if let Some(thread) = self.timely_thread.take() {
            let _ = thread.join();
        }
        self.metrics.unregister(&self.registry);
    }
}

impl Drop for ReplicaHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<String>(), panic.downcast_ref::<&str>()) {
        (Some(message), _) => message.clone(),
        (None, Some(message)) => (*message).to_string(),
        (None, None) => "a panic without a message".to_string(),
    }
}

/// The I/O thread's work: accepts connections and runs the core until it exits, then lets the connections
/// write what is queued (within [`CLOSE_GRACE`]).
async fn serve(
    listener: std::net::TcpListener,
    core: Core,
    events: UnboundedReceiver<CoreEvent>,
    reports: UnboundedReceiver<FromWorker>,
    accept_events: UnboundedSender<CoreEvent>,
    connections: ConnectionConfig,
) -> CoreExit {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => return CoreExit::Failed(format!("cannot register the listener: {e}")),
    };
    let (stop, stopped) = oneshot::channel();
    let accept = tokio::spawn(accept_loop(listener, accept_events, Arc::new(connections), stopped));
    let exit = core.run(events, reports).await;
    let _ = stop.send(());
    let _ = accept.await;
    exit
}

/// The timely thread: starts the workers and reports to the core if timely fails in any way (see the module
/// documentation). Nothing is reported after a shutdown: the core is gone then.
fn run_timely(start: TimelyStart) {
    let reports = start.reports.clone();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| supervise_timely(start)));
    let message = match outcome {
        Ok(Ok(())) => return,
        Ok(Err(message)) => message,
        Err(panic) => format!("timely's threads failed: {}", panic_message(panic.as_ref())),
    };
    warn!(%message, "timely failed");
    let _ = reports.send(FromWorker::TimelyFailed { message });
}

/// Starts the workers and waits for them; the first worker thread to end is reported (to a core that is
/// gone already after a shutdown), since workers end only when the core tells them to or is gone.
fn supervise_timely(start: TimelyStart) -> Result<(), String> {
    let reports = start.reports.clone();
    let process = start.process;
    let guards = start_workers(start)?;
    while !guards.guards().iter().any(|g| g.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let worker = guards.guards().iter().position(|g| g.is_finished()).expect("one has finished");
    let message = format!("timely worker thread {worker} of process {process} ended");
    let _ = reports.send(FromWorker::TimelyFailed { message });
    for (worker, result) in guards.join().into_iter().enumerate() {
        if let Err(e) = result {
            warn!(worker, error = %e, "timely worker failed");
        }
    }
    Ok(())
}

/// Connects the cluster (if any) and starts the worker threads.
fn start_workers(start: TimelyStart) -> Result<WorkerGuards<()>, String> {
    let TimelyStart {
        process,
        workers,
        worker_config,
        cluster,
        connect_timeout,
        receivers,
        threads,
        reports,
        metrics,
    } = start;
    let first = process * workers;
    let receivers = Arc::new(Mutex::new(receivers));
    let threads = Arc::new(threads);
    let body = move |worker: &mut timely::worker::Worker| {
        let local = worker.index() - first;
        let rx = receivers.lock().expect("receiver lock is never poisoned")[local]
            .take()
            .expect("each worker takes its receiver once");
        let _ = threads[local].set(std::thread::current());
        let worker_reports = reports.clone();
        let metrics = metrics.worker(worker.index(), local == 0);
        let _span = info_span!("worker", process, worker = worker.index()).entered();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_worker(worker, local, rx, worker_reports, metrics)
        }));
        if let Err(panic) = outcome {
            // The core stops the process: a replica missing a worker answers nothing. The panic goes on,
            // so that timely does not step this worker's broken dataflows (it would park forever waiting
            // for them to finish).
            let message = panic_message(panic.as_ref());
            let _ = reports.send(FromWorker::Failed { worker: local, message });
            std::panic::resume_unwind(panic);
        }
    };
    match cluster {
        None => {
            let config = timely::Config {
                communication: timely::CommunicationConfig::Process(workers),
                worker: worker_config,
            };
            timely::execute(config, body).map_err(|e| format!("timely did not start: {e}"))
        }
        Some(cluster) => {
            let sockets = cluster.listener.connect(connect_timeout, &cluster.cut)?;
            debug!(process, "every process of the cluster is connected");
            let hooks = Hooks::default();
            let allocators =
                ProcessBuilder::new_typed_vector(workers, hooks.refill.clone(), hooks.spill.clone());
            let (builders, communication) =
                initialize_networking_from_sockets(allocators, sockets, process, workers, hooks)
                    .map_err(|e| format!("cannot start timely's communication threads: {e}"))?;
            let builders = builders.into_iter().map(AllocatorBuilder::Tcp).collect();
            timely::execute::execute_from(builders, Box::new(communication), worker_config, body)
                .map_err(|e| format!("timely did not start: {e}"))
        }
    }
}
