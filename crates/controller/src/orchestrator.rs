//! Starting and supervising replicas: the [`Orchestrator`] trait and two implementations.
//!
//! - [`InProcessOrchestrator`]: replicas as threads of this process, started by a launcher the embedding
//!   application supplies (the controller cannot depend on the compute crate; tests and the simulator
//!   pass `compute::ReplicaServer::start`). For tests and embedding. It does not supervise: a replica
//!   that stopped on its own (a worker panicked: `compute::ReplicaHandle::failed`) stays stopped, and the
//!   replica client keeps trying to reconnect, until [`InProcessOrchestrator::restart`] or a drop.
//! - [`ProcessOrchestrator`]: replicas as local `compute-replica` processes, single- or multi-process
//!   (a timely cluster over loopback). A supervisor restarts a crashed replica with backoff, all of its
//!   processes together (a timely cluster cannot take back one lost process), on the same controller
//!   and metrics ports so the replica client simply reconnects (ports from below the kernel's ephemeral
//!   range, which no other socket is handed), and reports every status change. The backoff doubles with each
//!   crash in a row and starts over once a replica has run stably (see [`ProcessOrchestratorConfig`]).
//!   Its processes open the shards themselves ([`ReplicaStorage`]). They run on this host's loopback, or each on a host of its own that a
//!   [`ProcessHosts`] provides (an address and a command prefix, e.g. `ip netns exec NAME`; `sim cluster
//!   --netns`), which a replica keeps across restarts and gives back when it is dropped.
//!
//! **Boundary:** an orchestrator only runs processes and says where they listen; connecting, replaying
//! and hydrating are the replica client's job.
//!
//! **Tests:** the backoff rule in `mod tests` below; the in-process orchestrator under a real controller
//! in `tests/it/orchestrators.rs`; the process orchestrator with real `compute-replica` processes in the
//! `sim` crate's `tests/it/process_orchestrator.rs` (only `sim` can build the binary).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};

use protocol::{InstanceId, ReplicaId};
use storage::BoxFuture;
use transport::{SECRET_ENV, SharedSecret};

/// What an orchestrator is asked to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSpec {
    /// The instance.
    pub instance: InstanceId,
    /// The replica.
    pub replica: ReplicaId,
    /// Timely workers per process.
    pub workers: usize,
    /// Processes (a timely cluster when more than one).
    pub processes: usize,
}

/// A status change of a managed replica's processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    /// All processes are running (first start or restart).
    Running {
        /// The instance.
        instance: InstanceId,
        /// The replica.
        replica: ReplicaId,
        /// Their operating-system process ids.
        pids: Vec<u32>,
    },
    /// A process exited unexpectedly; the replica will be restarted after `restart_in_ms`.
    Crashed {
        /// The instance.
        instance: InstanceId,
        /// The replica.
        replica: ReplicaId,
        /// The exit status, rendered.
        status: String,
        /// Backoff before the restart.
        restart_in_ms: u64,
    },
}

/// Runs replicas. Object-safe; methods return boxed futures.
pub trait Orchestrator: Send + Sync + fmt::Debug {
    /// Starts the replica (or finds it running) and returns one controller address per process.
    fn ensure_replica(&self, spec: ReplicaSpec) -> BoxFuture<'_, Result<Vec<String>, String>>;
    /// Stops the replica and every one of its processes.
    fn drop_replica(&self, instance: InstanceId, replica: ReplicaId) -> BoxFuture<'_, Result<(), String>>;
}

/// A replica running inside this process, as started by an [`InProcessOrchestrator`]'s launcher.
pub trait RunningReplica: Send {
    /// One controller address per process.
    fn addresses(&self) -> Vec<String>;
    /// Stops it (joins its threads).
    fn shutdown(self: Box<Self>);
}

/// Starts an in-process replica.
pub type Launcher = Arc<dyn Fn(&ReplicaSpec) -> Result<Box<dyn RunningReplica>, String> + Send + Sync>;

/// Replicas as threads of this process. See the module documentation.
pub struct InProcessOrchestrator {
    launcher: Launcher,
    running: Mutex<BTreeMap<(InstanceId, ReplicaId), Box<dyn RunningReplica>>>,
}

impl fmt::Debug for InProcessOrchestrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let running: Vec<(InstanceId, ReplicaId)> =
            self.running.lock().map(|r| r.keys().copied().collect()).unwrap_or_default();
        f.debug_struct("InProcessOrchestrator").field("running", &running).finish()
    }
}

impl InProcessOrchestrator {
    /// An orchestrator that starts replicas with `launcher`.
    pub fn new(launcher: Launcher) -> Self {
        InProcessOrchestrator { launcher, running: Mutex::new(BTreeMap::new()) }
    }

    /// Stops a running replica and starts it afresh (a crash and restart, for tests); the addresses may
    /// change, so it returns the new ones.
    pub fn restart(
        &self,
        instance: InstanceId,
        replica: ReplicaId,
        spec: &ReplicaSpec,
    ) -> Result<Vec<String>, String> {
        let old = self.running.lock().expect("orchestrator lock").remove(&(instance, replica));
        if let Some(old) = old {
            old.shutdown();
        }
        let started = (self.launcher)(spec)?;
        let addresses = started.addresses();
        self.running.lock().expect("orchestrator lock").insert((instance, replica), started);
        Ok(addresses)
    }
}

impl Orchestrator for InProcessOrchestrator {
    fn ensure_replica(&self, spec: ReplicaSpec) -> BoxFuture<'_, Result<Vec<String>, String>> {
        Box::pin(async move {
            let key = (spec.instance, spec.replica);
            if let Some(running) = self.running.lock().expect("orchestrator lock").get(&key) {
                return Ok(running.addresses());
            }
            let launcher = Arc::clone(&self.launcher);
            let spec_copy = spec.clone();
            let started = tokio::task::spawn_blocking(move || launcher(&spec_copy))
                .await
                .map_err(|e| format!("launcher panicked: {e}"))??;
            // Another call may have started the same replica meanwhile (the lock is not held across the
            // launch): the first one stays, the later one is stopped again.
            let addresses = match self.running.lock().expect("orchestrator lock").entry(key) {
                std::collections::btree_map::Entry::Occupied(first) => first.get().addresses(),
                std::collections::btree_map::Entry::Vacant(slot) => {
                    let addresses = started.addresses();
                    slot.insert(started);
                    return Ok(addresses);
                }
            };
            tokio::task::spawn_blocking(move || started.shutdown())
                .await
                .map_err(|e| format!("shutdown panicked: {e}"))?;
            Ok(addresses)
        })
    }

    fn drop_replica(&self, instance: InstanceId, replica: ReplicaId) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let removed = self.running.lock().expect("orchestrator lock").remove(&(instance, replica));
            match removed {
                Some(running) => tokio::task::spawn_blocking(move || running.shutdown())
                    .await
                    .map_err(|e| format!("shutdown panicked: {e}")),
                None => Err(format!("replica {replica} of instance {instance} is not running")),
            }
        })
    }
}

impl Drop for InProcessOrchestrator {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.lock() {
            for (_, replica) in std::mem::take(&mut *running) {
                replica.shutdown();
            }
        }
    }
}

/// How a [`ProcessOrchestrator`]'s replica processes secure their controller port, their storage
/// connection and (multi-process replicas) their cluster ports: `compute-replica`'s security flags.
#[derive(Debug, Clone)]
pub struct ReplicaProcessSecurity {
    /// TLS on the controller port and to storage; `None`: plain TCP (`--insecure`).
    pub tls: Option<ReplicaTlsFiles>,
    /// The shared secret, handed to the children in their environment (`transport::SECRET_ENV`), never
    /// on their command line. Required with plain TCP, for the storage connection, and by multi-process
    /// replicas; with TLS and client certificates (`ReplicaTlsFiles::client_ca`) controllers may do
    /// without.
    pub secret: Option<SharedSecret>,
}

/// A replica process's TLS files (PEM).
#[derive(Debug, Clone)]
pub struct ReplicaTlsFiles {
    /// Its certificate chain (`--tls-cert`), valid for the loopback address it listens on.
    pub cert: PathBuf,
    /// Its private key (`--tls-key`).
    pub key: PathBuf,
    /// If set, controllers must present a certificate chaining to this CA (`--tls-client-ca`).
    pub client_ca: Option<PathBuf>,
}

impl ReplicaProcessSecurity {
    /// Adds the flags and environment to a child's command.
    fn apply(&self, command: &mut Command) {
        match &self.tls {
            Some(tls) => {
                command.arg("--tls-cert").arg(&tls.cert).arg("--tls-key").arg(&tls.key);
                if let Some(client_ca) = &tls.client_ca {
                    command.arg("--tls-client-ca").arg(client_ca);
                }
            }
            None => {
                command.arg("--insecure");
            }
        }
        match &self.secret {
            Some(secret) => {
                #[cfg(unix)]
                command.env(
                    SECRET_ENV,
                    <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(secret.expose()),
                );
                #[cfg(not(unix))]
                command.env(SECRET_ENV, String::from_utf8_lossy(secret.expose()).into_owned());
            }
            None => {
                command.env_remove(SECRET_ENV);
            }
        }
    }
}

/// How a [`ProcessOrchestrator`] runs `compute-replica`.
///
/// **Backoff.** A replica's `n`th crash in a row waits `initial_backoff_ms * 2^(n-1)`, at most
/// `max_backoff_ms`, before the restart. The run of crashes ends when a replica has run stably: if its
/// processes were up for at least `max_backoff_ms` since their last (re)start, the count starts over and
/// the crash waits `initial_backoff_ms` again. (A replica that outlives the longest backoff is no longer
/// crash-looping faster than the cap; without the reset, a few crashes spread over days would leave every
/// later restart at the maximum delay.)
#[derive(Debug, Clone)]
pub struct ProcessOrchestratorConfig {
    /// The `compute-replica` binary.
    pub binary: PathBuf,
    /// Where every replica reads from and writes to.
    pub storage: ReplicaStorage,
    /// How the replicas secure their connections.
    pub security: ReplicaProcessSecurity,
    /// The first restart's delay, in milliseconds (doubling with each crash in a row, up to
    /// `max_backoff_ms`).
    pub initial_backoff_ms: u64,
    /// The longest restart delay, in milliseconds; also how long a replica must run to count as stable,
    /// which resets the backoff to `initial_backoff_ms`.
    pub max_backoff_ms: u64,
    /// Extra environment for the children (e.g. `RUST_LOG`).
    pub env: Vec<(String, String)>,
    /// Where the children's stderr goes (inherited when `None`).
    pub log_dir: Option<PathBuf>,
    /// Whether every replica process serves its metrics (`compute-replica --metrics-addr`), each on a
    /// loopback port of its own that it keeps across restarts ([`ProcessOrchestrator::metrics_addresses`]).
    pub metrics: bool,
}

/// Where a [`ProcessOrchestrator`]'s replica processes find storage.
#[derive(Clone, PartialEq, Eq)]
pub enum ReplicaStorage {
    /// The shards, which every process opens itself from these URLs (DESIGN §9). They reach the child
    /// through its environment (`COMPUTE_BLOB_URL`, `COMPUTE_CONSENSUS_URL`, which `compute-replica` reads
    /// as `--blob` and `--consensus`), not its command line, which any user can list: the URLs may carry
    /// credentials. Build it with [`ReplicaStorage::shards`], which checks both URLs.
    Shards {
        /// The `--blob` URL.
        blob: String,
        /// The `--consensus` URL.
        consensus: String,
    },
}

impl ReplicaStorage {
    /// The shards at `blob` and `consensus`, refused here (not by every child, in a restart loop) when
    /// either URL does not parse.
    pub fn shards(blob: &str, consensus: &str) -> Result<ReplicaStorage, storage::UrlError> {
        blob.parse::<storage::blob::BlobConfig>()?;
        consensus.parse::<storage::consensus::ConsensusConfig>()?;
        Ok(ReplicaStorage::Shards { blob: blob.to_owned(), consensus: consensus.to_owned() })
    }

    /// Points `command` at this storage (and clears the shard variables it may have inherited; the
    /// config's `env` may set them again).
    fn apply(&self, command: &mut Command) {
        for key in [
            BLOB_URL_ENV,
            CONSENSUS_URL_ENV,
            SHARD_POLL_INTERVAL_ENV,
            SHARD_PART_CACHE_ENV,
            SHARD_INLINE_PART_ENV,
        ] {
            command.env_remove(key);
        }
        match self {
            ReplicaStorage::Shards { blob, consensus } => {
                command.env(BLOB_URL_ENV, blob).env(CONSENSUS_URL_ENV, consensus);
            }
        }
    }
}

/// The environment variable `compute-replica` reads its `--blob` URL from.
pub const BLOB_URL_ENV: &str = "COMPUTE_BLOB_URL";
/// The environment variable `compute-replica` reads its `--consensus` URL from.
pub const CONSENSUS_URL_ENV: &str = "COMPUTE_CONSENSUS_URL";
/// The environment variable `compute-replica` reads its `--keepalive-interval-ms` from.
pub const KEEPALIVE_INTERVAL_ENV: &str = "COMPUTE_KEEPALIVE_INTERVAL_MS";
/// The environment variable `compute-replica` reads its `--shard-poll-interval-ms` from.
pub const SHARD_POLL_INTERVAL_ENV: &str = "COMPUTE_SHARD_POLL_INTERVAL_MS";
/// The environment variable `compute-replica` reads its `--shard-part-cache-bytes` from.
pub const SHARD_PART_CACHE_ENV: &str = "COMPUTE_SHARD_PART_CACHE_BYTES";
/// The environment variable `compute-replica` reads its `--shard-inline-part-bytes` from.
pub const SHARD_INLINE_PART_ENV: &str = "COMPUTE_SHARD_INLINE_PART_BYTES";

impl fmt::Debug for ReplicaStorage {
    /// The shards' URLs are not shown: they may carry credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaStorage::Shards { .. } => f.debug_struct("Shards").finish_non_exhaustive(),
        }
    }
}

/// Where one replica process runs: the address it listens on (controller, timely and metrics ports)
/// and the command prefix that starts a program there (empty: this host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessHost {
    /// The process's address, which its listeners bind and its peers and the controller connect to.
    pub address: std::net::IpAddr,
    /// Prepended to the `compute-replica` command line (e.g. `["ip", "netns", "exec", "NAME"]`); the
    /// prefix must run the program in place (`exec`), so that the child's pid is the replica process's.
    pub prefix: Vec<std::ffi::OsString>,
}

impl ProcessHost {
    /// This host's loopback, `127.0.0.1`, with no prefix.
    pub fn loopback() -> ProcessHost {
        ProcessHost { address: std::net::IpAddr::from([127, 0, 0, 1]), prefix: Vec::new() }
    }
}

/// Provides the hosts of a [`ProcessOrchestrator`]'s replica processes (see
/// [`ProcessOrchestrator::with_hosts`]). A replica gets its hosts once, when it is first started, keeps
/// them across restarts, and gives them back when it is dropped (or the orchestrator is).
pub trait ProcessHosts: Send + Sync + fmt::Debug {
    /// The host of process `process` (0-based) of `replica`; an error refuses to start the replica.
    fn host(&self, instance: InstanceId, replica: ReplicaId, process: usize) -> Result<ProcessHost, String>;
    /// The replica is gone (its processes killed and reaped): its hosts may be taken down.
    fn release(&self, instance: InstanceId, replica: ReplicaId);
}

/// Every process on this host's loopback: [`ProcessOrchestrator::new`]'s hosts.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoopbackHosts;

impl ProcessHosts for LoopbackHosts {
    fn host(&self, _: InstanceId, _: ReplicaId, _: usize) -> Result<ProcessHost, String> {
        Ok(ProcessHost::loopback())
    }

    fn release(&self, _: InstanceId, _: ReplicaId) {}
}

struct ManagedReplica {
    spec: ReplicaSpec,
    /// One per process, kept across restarts.
    hosts: Vec<ProcessHost>,
    controller_ports: Vec<u16>,
    timely_ports: Vec<u16>,
    /// One per process when the orchestrator serves metrics, else empty.
    metrics_ports: Vec<u16>,
    children: Vec<Child>,
    /// Crashes (and failed restarts) in a row; see [`next_failures`].
    failures: u32,
    /// When `children` were spawned.
    started_at: std::time::Instant,
    restart_at: Option<std::time::Instant>,
}

impl ManagedReplica {
    /// Each process's `ports` entry on its host's address, in process order.
    fn addresses(&self, ports: &[u16]) -> Vec<std::net::SocketAddr> {
        self.hosts
            .iter()
            .zip(ports)
            .map(|(host, port)| std::net::SocketAddr::new(host.address, *port))
            .collect()
    }

    /// Where the controller reaches each process, in process order.
    fn controller_addresses(&self) -> Vec<String> {
        self.addresses(&self.controller_ports).iter().map(ToString::to_string).collect()
    }
}

/// Replicas as local processes. See the module documentation.
pub struct ProcessOrchestrator {
    config: ProcessOrchestratorConfig,
    hosts: Arc<dyn ProcessHosts>,
    replicas: Arc<Mutex<BTreeMap<(InstanceId, ReplicaId), ManagedReplica>>>,
    events: mpsc::UnboundedSender<ProcessEvent>,
    supervisor: Option<std::thread::JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl fmt::Debug for ProcessOrchestrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessOrchestrator").field("binary", &self.config.binary).finish_non_exhaustive()
    }
}

/// `n` distinct free loopback ports: probed together (so no two are the same), then released for the
/// children to bind. Another socket may take one in between; the child then fails to start (exits
/// non-zero) and is restarted, on fresh timely ports.
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    ports_of(&free_probes(n)?)
}

/// `n` listeners on distinct free loopback ports the kernel picks.
fn free_probes(n: usize) -> Result<Vec<std::net::TcpListener>, String> {
    (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}")))
        .collect()
}

/// The lowest port [`stable_ports`] picks from.
const STABLE_PORTS_FROM: u16 = 10_000;

/// Listeners on `n` distinct free loopback ports below the kernel's ephemeral range, for the ports a
/// replica keeps across restarts (the controller's and the metrics endpoint's), probed from a random
/// start; the caller drops them when it has picked its other ports.
/// A port from the ephemeral range (what a `bind` to port 0 or an outgoing connection gets) may be taken
/// by any socket between the probe and the child's bind, and then stays taken for as long as that
/// socket lives: the child would fail at every restart (seen in a loaded test run: 149 restarts). A port
/// below the range is only taken by a process that names it. Where the range cannot be read, or leaves
/// too little room below it, this is [`free_probes`].
fn stable_probes(n: usize) -> Result<Vec<std::net::TcpListener>, String> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&low| low >= STABLE_PORTS_FROM.saturating_add(1_024));
    let Some(low) = low else { return free_probes(n) };
    let span = u64::from(low - STABLE_PORTS_FROM);
    let start = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), std::process::id()) % span;
    let mut probes = Vec::with_capacity(n);
    for offset in 0..span {
        if probes.len() == n {
            break;
        }
        // `span` fits a `u16`, so the sum below `low` does.
        let port = STABLE_PORTS_FROM + ((start + offset) % span) as u16;
        if let Ok(probe) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            probes.push(probe);
        }
    }
    if probes.len() < n {
        return free_probes(n);
    }
    Ok(probes)
}

/// The ports `probes` are bound to.
fn ports_of(probes: &[std::net::TcpListener]) -> Result<Vec<u16>, String> {
    probes.iter().map(|l| l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())).collect()
}

/// The command line of process `process` of `replica`, on its host.
fn process_command(config: &ProcessOrchestratorConfig, replica: &ManagedReplica, process: usize) -> Command {
    let host = &replica.hosts[process];
    let at = |port: u16| std::net::SocketAddr::new(host.address, port).to_string();
    let mut command = match host.prefix.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(&config.binary);
            command
        }
        None => Command::new(&config.binary),
    };
    command
        .arg("--listen")
        .arg(at(replica.controller_ports[process]))
        .arg("--workers")
        .arg(replica.spec.workers.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    config.storage.apply(&mut command);
    if replica.spec.processes > 1 {
        let timely: Vec<String> =
            replica.addresses(&replica.timely_ports).iter().map(ToString::to_string).collect();
        command.arg("--process").arg(process.to_string()).arg("--addresses").arg(timely.join(","));
    }
    if let Some(port) = replica.metrics_ports.get(process) {
        command.arg("--metrics-addr").arg(at(*port));
    }
    for (key, value) in &config.env {
        command.env(key, value);
    }
    config.security.apply(&mut command);
    command
}

fn spawn_processes(
    config: &ProcessOrchestratorConfig,
    replica: &ManagedReplica,
) -> Result<Vec<Child>, String> {
    let mut children = Vec::new();
    for process in 0..replica.controller_ports.len() {
        let mut command = process_command(config, replica, process);
        match &config.log_dir {
            Some(dir) => {
                let name = format!("{}-{}-p{process}.log", replica.spec.instance, replica.spec.replica);
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(name))
                    .map_err(|e| format!("cannot open replica log: {e}"))?;
                command.stderr(file);
            }
            None => {
                command.stderr(Stdio::inherit());
            }
        }
        match command.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                for mut child in children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(format!("cannot start {}: {e}", config.binary.display()));
            }
        }
    }
    Ok(children)
}

fn kill_all(children: &mut Vec<Child>) {
    for child in children.iter_mut() {
        let _ = child.kill();
    }
    for child in children.iter_mut() {
        let _ = child.wait();
    }
    children.clear();
}

impl ProcessOrchestrator {
    /// An orchestrator whose replica processes run on this host's loopback ([`LoopbackHosts`]), and the
    /// stream of its process events.
    pub fn new(config: ProcessOrchestratorConfig) -> (Self, mpsc::UnboundedReceiver<ProcessEvent>) {
        Self::with_hosts(config, Arc::new(LoopbackHosts))
    }

    /// An orchestrator whose replica processes run on the hosts `hosts` provides, and the stream of its
    /// process events.
    // The supervisor measures real time between restarts: processes are not simulated.
    #[allow(clippy::disallowed_methods)]
    pub fn with_hosts(
        config: ProcessOrchestratorConfig,
        hosts: Arc<dyn ProcessHosts>,
    ) -> (Self, mpsc::UnboundedReceiver<ProcessEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let replicas: Arc<Mutex<BTreeMap<(InstanceId, ReplicaId), ManagedReplica>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let supervisor = {
            let (replicas, events, stop, config) =
                (Arc::clone(&replicas), events.clone(), Arc::clone(&stop), config.clone());
            std::thread::Builder::new()
                .name("replica-supervisor".into())
                .spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                        let mut replicas = replicas.lock().expect("orchestrator lock");
                        for ((instance, replica), managed) in replicas.iter_mut() {
                            if let Some(at) = managed.restart_at {
                                if std::time::Instant::now() < at {
                                    continue;
                                }
                                managed.restart_at = None;
                                // The timely ports are the replica's own business (only the controller
                                // ports must stay): fresh ones, in case another socket took one.
                                if let Ok(ports) = free_ports(managed.spec.processes) {
                                    managed.timely_ports = ports;
                                }
                                match spawn_processes(&config, managed) {
                                    Ok(children) => {
                                        let pids = children.iter().map(Child::id).collect();
                                        managed.children = children;
                                        managed.started_at = std::time::Instant::now();
                                        info!(%instance, %replica, "replica restarted");
                                        let _ = events.send(ProcessEvent::Running {
                                            instance: *instance,
                                            replica: *replica,
                                            pids,
                                        });
                                    }
                                    Err(e) => {
                                        warn!(%instance, %replica, error = %e, "replica restart failed");
                                        // It did not run at all: the run of failures goes on.
                                        managed.failures = next_failures(&config, managed.failures, 0);
                                        let delay = backoff(&config, managed.failures);
                                        managed.restart_at =
                                            Some(std::time::Instant::now() + Duration::from_millis(delay));
                                    }
                                }
                                continue;
                            }
                            let mut crashed = None;
                            for child in managed.children.iter_mut() {
                                if let Ok(Some(status)) = child.try_wait() {
                                    crashed = Some(status.to_string());
                                    break;
                                }
                            }
                            if let Some(status) = crashed {
                                kill_all(&mut managed.children);
                                let ran_for_ms = managed.started_at.elapsed().as_millis();
                                let ran_for_ms = u64::try_from(ran_for_ms).unwrap_or(u64::MAX);
                                managed.failures = next_failures(&config, managed.failures, ran_for_ms);
                                let restart_in_ms = backoff(&config, managed.failures);
                                managed.restart_at =
                                    Some(std::time::Instant::now() + Duration::from_millis(restart_in_ms));
                                warn!(%instance, %replica, %status, restart_in_ms, "replica process exited");
                                let _ = events.send(ProcessEvent::Crashed {
                                    instance: *instance,
                                    replica: *replica,
                                    status,
                                    restart_in_ms,
                                });
                            }
                        }
                    }
                })
                .expect("spawn supervisor thread")
        };
        (ProcessOrchestrator { config, hosts, replicas, events, supervisor: Some(supervisor), stop }, rx)
    }

    /// The operating-system process ids of a running replica (empty while it restarts).
    pub fn pids(&self, instance: InstanceId, replica: ReplicaId) -> Vec<u32> {
        self.replicas
            .lock()
            .expect("orchestrator lock")
            .get(&(instance, replica))
            .map(|m| m.children.iter().map(Child::id).collect())
            .unwrap_or_default()
    }

    /// Where each process of a replica serves its metrics (`http://ADDR/metrics`), in process order; empty
    /// if the orchestrator serves none ([`ProcessOrchestratorConfig::metrics`]) or does not run the replica.
    pub fn metrics_addresses(&self, instance: InstanceId, replica: ReplicaId) -> Vec<std::net::SocketAddr> {
        self.replicas
            .lock()
            .expect("orchestrator lock")
            .get(&(instance, replica))
            .map(|m| m.addresses(&m.metrics_ports))
            .unwrap_or_default()
    }
}

/// The count of failures in a row once a replica whose processes ran for `ran_for_ms` since their last
/// (re)start fails: one more, unless it ran stably (at least `max_backoff_ms`), which starts a new run.
fn next_failures(config: &ProcessOrchestratorConfig, failures: u32, ran_for_ms: u64) -> u32 {
    if ran_for_ms >= config.max_backoff_ms { 1 } else { failures.saturating_add(1) }
}

/// The delay before restarting a replica after its `failures`th failure in a row (at least 1):
/// `initial_backoff_ms` doubled for each earlier failure in the run, capped at `max_backoff_ms`.
fn backoff(config: &ProcessOrchestratorConfig, failures: u32) -> u64 {
    let exponent = failures.saturating_sub(1).min(20);
    config.initial_backoff_ms.saturating_mul(1 << exponent).min(config.max_backoff_ms)
}

impl Orchestrator for ProcessOrchestrator {
    // The start time feeds the backoff reset, in real time: processes are not simulated.
    #[allow(clippy::disallowed_methods)]
    fn ensure_replica(&self, spec: ReplicaSpec) -> BoxFuture<'_, Result<Vec<String>, String>> {
        Box::pin(async move {
            let key = (spec.instance, spec.replica);
            let mut replicas = self.replicas.lock().expect("orchestrator lock");
            if let Some(managed) = replicas.get(&key) {
                return Ok(managed.controller_addresses());
            }
            if spec.processes == 0 || spec.workers == 0 {
                return Err("a replica needs at least one process and one worker".to_string());
            }
            // The ports kept across restarts come from below the ephemeral range (see `stable_probes`);
            // the timely ports, fresh at every restart, from the kernel, probed while the others are
            // held, so all are distinct.
            let with_metrics = usize::from(self.config.metrics);
            let stable = stable_probes((1 + with_metrics) * spec.processes)?;
            let timely_ports = free_ports(spec.processes)?;
            let mut controller_ports = ports_of(&stable)?;
            drop(stable);
            let metrics_ports = controller_ports.split_off(spec.processes);
            let hosts = (0..spec.processes)
                .map(|process| self.hosts.host(spec.instance, spec.replica, process))
                .collect::<Result<Vec<_>, _>>();
            let hosts = match hosts {
                Ok(hosts) => hosts,
                Err(e) => {
                    self.hosts.release(spec.instance, spec.replica);
                    return Err(format!("no host for replica {}: {e}", spec.replica));
                }
            };
            let mut managed = ManagedReplica {
                spec: spec.clone(),
                hosts,
                controller_ports,
                timely_ports,
                metrics_ports,
                children: Vec::new(),
                failures: 0,
                started_at: std::time::Instant::now(),
                restart_at: None,
            };
            managed.children = match spawn_processes(&self.config, &managed) {
                Ok(children) => children,
                Err(e) => {
                    self.hosts.release(spec.instance, spec.replica);
                    return Err(e);
                }
            };
            managed.started_at = std::time::Instant::now();
            let pids = managed.children.iter().map(Child::id).collect();
            let addresses = managed.controller_addresses();
            replicas.insert(key, managed);
            let _ = self.events.send(ProcessEvent::Running {
                instance: spec.instance,
                replica: spec.replica,
                pids,
            });
            Ok(addresses)
        })
    }

    fn drop_replica(&self, instance: InstanceId, replica: ReplicaId) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let removed = self.replicas.lock().expect("orchestrator lock").remove(&(instance, replica));
            match removed {
                Some(mut managed) => {
                    kill_all(&mut managed.children);
                    self.hosts.release(instance, replica);
                    Ok(())
                }
                None => Err(format!("replica {replica} of instance {instance} is not running")),
            }
        })
    }
}

impl Drop for ProcessOrchestrator {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(supervisor) = self.supervisor.take() {
            let _ = supervisor.join();
        }
        if let Ok(mut replicas) = self.replicas.lock() {
            for ((instance, replica), mut managed) in std::mem::take(&mut *replicas) {
                kill_all(&mut managed.children);
                self.hosts.release(instance, replica);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_kept_across_restarts_are_distinct_free_and_below_the_ephemeral_range() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").expect("Linux");
        let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        let probes = stable_probes(6).unwrap();
        let ports = ports_of(&probes).unwrap();
        assert_eq!(ports.iter().collect::<std::collections::BTreeSet<_>>().len(), 6, "{ports:?}");
        assert!(ports.iter().all(|&p| (STABLE_PORTS_FROM..low).contains(&p)), "{ports:?} vs {low}");
        // Held, they are not handed out again; released, each can be bound.
        let timely = free_ports(6).unwrap();
        assert!(timely.iter().all(|p| !ports.contains(p) && *p >= low), "{timely:?}");
        drop(probes);
        for port in ports {
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }

    fn config(initial_backoff_ms: u64, max_backoff_ms: u64) -> ProcessOrchestratorConfig {
        ProcessOrchestratorConfig {
            binary: PathBuf::from("compute-replica"),
            storage: ReplicaStorage::shards("file:///b", "sqlite:///c").expect("valid URLs"),
            security: ReplicaProcessSecurity { tls: None, secret: None },
            initial_backoff_ms,
            max_backoff_ms,
            env: Vec::new(),
            log_dir: None,
            metrics: false,
        }
    }

    #[test]
    fn the_backoff_doubles_with_each_failure_in_a_row_up_to_the_maximum() {
        let config = config(100, 2_000);
        // (failures in a row, expected delay in ms)
        let table =
            [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1_600), (6, 2_000), (7, 2_000), (u32::MAX, 2_000)];
        for (failures, expected) in table {
            assert_eq!(backoff(&config, failures), expected, "after {failures} failures");
        }
    }

    #[test]
    fn a_replica_that_ran_at_least_the_maximum_backoff_starts_a_new_run_of_failures() {
        let config = config(100, 2_000);
        // (failures so far, ran for ms, failures after this crash)
        let table = [
            (0, 0, 1),
            (0, 5_000, 1),
            (1, 10, 2),
            (3, 1_999, 4),
            (3, 2_000, 1),
            (9, 60_000, 1),
            (u32::MAX, 0, u32::MAX),
        ];
        for (failures, ran_for_ms, expected) in table {
            assert_eq!(
                next_failures(&config, failures, ran_for_ms),
                expected,
                "{failures} failures, then a crash after running {ran_for_ms} ms"
            );
        }
    }

    #[test]
    fn crashes_spread_over_a_long_time_restart_after_the_initial_backoff_every_time() {
        // The bug this guards against: the count never reset, so the fourth crash of a replica that ran for
        // an hour between crashes still waited the maximum.
        let config = config(100, 2_000);
        let mut failures = 0;
        for crash in 0..10 {
            failures = next_failures(&config, failures, 3_600_000);
            assert_eq!(backoff(&config, failures), 100, "crash {crash}");
        }
        // A crash loop right after that climbs from the start again.
        let delays: Vec<u64> = (0..3)
            .map(|_| {
                failures = next_failures(&config, failures, 50);
                backoff(&config, failures)
            })
            .collect();
        assert_eq!(delays, [200, 400, 800]);
    }

    fn env_of(command: &Command, key: &str) -> Option<Option<String>> {
        command.get_envs().find(|(k, _)| *k == key).map(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
    }

    #[test]
    fn replica_processes_get_the_shard_urls_through_their_environment_and_nothing_inherited() {
        let shards = ReplicaStorage::shards("file:///secret/blob", "sqlite:///secret/consensus.db").unwrap();
        let mut command = Command::new("compute-replica");
        // A poll interval, part cache size or inline bound inherited from the orchestrator's own environment is cleared.
        command
            .env(SHARD_POLL_INTERVAL_ENV, "5")
            .env(SHARD_PART_CACHE_ENV, "0")
            .env(SHARD_INLINE_PART_ENV, "0");
        shards.apply(&mut command);
        assert_eq!(env_of(&command, SHARD_POLL_INTERVAL_ENV), Some(None));
        assert_eq!(env_of(&command, SHARD_PART_CACHE_ENV), Some(None));
        assert_eq!(env_of(&command, SHARD_INLINE_PART_ENV), Some(None));
        assert_eq!(command.get_args().count(), 0, "the URLs stay off the command line");
        assert_eq!(env_of(&command, BLOB_URL_ENV), Some(Some("file:///secret/blob".to_string())));
        assert_eq!(
            env_of(&command, CONSENSUS_URL_ENV),
            Some(Some("sqlite:///secret/consensus.db".to_string()))
        );
        assert!(!format!("{shards:?}").contains("secret"), "{shards:?}");
    }

    fn args_of(command: &Command) -> Vec<String> {
        command.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    // The replica's start time is a field like any other here; nothing reads it.
    #[allow(clippy::disallowed_methods)]
    fn each_process_listens_runs_and_meets_its_peers_on_the_host_it_was_given() {
        let host = |last: u8| ProcessHost {
            address: std::net::IpAddr::from([198, 18, 0, last]),
            prefix: vec!["ip".into(), "netns".into(), "exec".into(), format!("ns{last}").into()],
        };
        let replica = ManagedReplica {
            spec: ReplicaSpec { instance: InstanceId(1), replica: ReplicaId(2), workers: 1, processes: 2 },
            hosts: vec![host(10), host(11)],
            controller_ports: vec![7000, 7001],
            timely_ports: vec![7100, 7101],
            metrics_ports: vec![7200, 7201],
            children: Vec::new(),
            failures: 0,
            started_at: std::time::Instant::now(),
            restart_at: None,
        };
        let command = process_command(&config(100, 2_000), &replica, 1);
        assert_eq!(command.get_program(), "ip");
        let args = args_of(&command);
        assert_eq!(args[..4], ["netns", "exec", "ns11", "compute-replica"]);
        let flag = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
        assert_eq!(flag("--listen").as_deref(), Some("198.18.0.11:7001"));
        assert_eq!(flag("--metrics-addr").as_deref(), Some("198.18.0.11:7201"));
        assert_eq!(flag("--addresses").as_deref(), Some("198.18.0.10:7100,198.18.0.11:7101"));
        assert_eq!(flag("--process").as_deref(), Some("1"));
        assert_eq!(replica.controller_addresses(), ["198.18.0.10:7000", "198.18.0.11:7001"]);

        // On loopback: the binary itself, on 127.0.0.1.
        let local = ManagedReplica { hosts: vec![ProcessHost::loopback(); 2], ..replica };
        let command = process_command(&config(100, 2_000), &local, 0);
        assert_eq!(command.get_program(), "compute-replica");
        assert_eq!(args_of(&command)[..2], ["--listen", "127.0.0.1:7000"]);
    }

    #[test]
    fn shard_urls_that_do_not_parse_are_refused_before_any_process_starts() {
        let cases = [
            ("/no/scheme", "sqlite:///c.db", "not a URL"),
            ("file:///b", "ftp://host/c", "unknown consensus scheme"),
            ("file:///b?bogus=1", "sqlite:///c.db", "unknown parameter"),
        ];
        for (blob, consensus, expected) in cases {
            let error = ReplicaStorage::shards(blob, consensus).unwrap_err().to_string();
            assert!(error.contains(expected), "{blob} {consensus}: {error}");
        }
    }
}
