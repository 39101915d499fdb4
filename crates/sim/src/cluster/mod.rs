//! The cluster scenario (`sim cluster`, the README's main command): the whole system as real local
//! processes on loopback, under a generated workload, with a replica crash and a dataflow recreation,
//! every result checked against an oracle.
//!
//! **What runs.** This process as the controller (`ComputeController` with a `ProcessOrchestrator`) and
//! the table writer, and `--replicas` replicas of one instance as `compute-replica` processes; every
//! second replica is a timely cluster of `--processes` processes. Storage ([`StorageMode`]) is shards
//! that every process opens itself from the same two URLs: the controller (a critical reader), the
//! table writer and every replica process (leased readers; the replicas get the URLs through their
//! environment, `controller::ReplicaStorage`) each open the stores: the embedded ones in
//! the data directory (`--storage embedded`, the default: `blob/` and `consensus.db`), any URLs
//! (`--blob`, `--consensus`), or a throwaway PostgreSQL and `moto_server` the run starts and stops
//! (`--services local`). Data and logs go to `target/cluster-data/` (`--data-dir`), emptied each run.
//! `cargo run -p sim` builds only `sim`, so the scenario first builds `compute-replica` with the same
//! profile (`processes.rs`).
//!
//! **Phases.** Setup (tables, an initial load, replicas, six dataflows), hydration (a progress bar until
//! every export is hydrated on every replica), the timed run (`--duration`: table changes at `--rate`
//! rows/s, peeks every few milliseconds, subscribe and materialized-view checks, and on a schedule: kill a
//! replica's processes with SIGKILL and measure its rehydration, add a fresh replica of the same shape as
//! the baseline for it (then drop it), drop and recreate a dataflow, and with `--services local` take a
//! store away for a few seconds (`outage.rs`: PostgreSQL stopped, `moto_server` paused) while a replica is
//! killed mid-way through a view append, and with `--netns` cut one replica's links for a few seconds
//! (`netns.rs`)), then the end (writes stop; every
//! collection must catch up; every index on every replica and the materialized view are compared in
//! full), and the report (`report.rs`). Logs go to `target/cluster-data/logs/` (`RUST_LOG` sends this
//! process's to stderr instead and sets the children's filter).
//!
//! **Workloads.** `--workload orders` (the default) is the generated orders tables above (`tasks.rs`,
//! `workload.rs`); `--workload tpch` loads TPC-H at `--scale-factor` and runs the same kills and
//! recreations on the 22 TPC-H views, every answer compared with SQLite after every refresh batch
//! (`tpch.rs`).
//!
//! **Checks** (each failure is a named violation; any violation makes the exit code non-zero): every
//! peek's rows equal the oracle's at the peek's time (`oracle.rs`); subscribe batches are contiguous, cover
//! each time range once, and accumulate to the oracle at each batch's upper; the materialized view's
//! storage collection equals the oracle; a killed replica comes back and answers at the time of its
//! crash; a dropped dataflow's state goes away; a dropped replica's processes are gone; every collection
//! catches up after the writes stop; after a storage outage the table writer's appends, the subscribe and
//! the view's appends resume (peeks answered during it are counted, and their latency reported apart).
//!
//! **Separate hosts.** `--netns` (with `--services local`) runs the services and each replica process in a
//! network namespace of its own, joined by a bridge to this process (`netns.rs`), so that every connection
//! crosses a link; `--link-cuts` cuts one replica's. Elsewhere every process shares this host's loopback.
//!
//! **Cleanup.** The orchestrator kills the replicas when dropped, and the local services stop when dropped (`storage::services`), then
//! `--netns`'s namespaces and bridge are deleted (and checked gone: a leftover is a violation); all are
//! owned by [`run`] outside the async runtime, so every way out
//! (the end, an error, a panic, Ctrl-C, SIGTERM, SIGHUP) drops them, after the runtime and with it the
//! controller. Then every child process the run started (recorded as it started) is checked gone in
//! `/proc`: one still running is a violation. (A SIGKILL of `sim` itself cannot be handled: its children
//! then outlive it.)
//!
//! **Not here:** the deterministic simulation (`crate::simulation`). This is real time on real processes:
//! it reads the wall clock (through `now`) and is not reproducible beyond its workload seed.
//! **Tests:** `oracle.rs` (the oracle against the reference interpreter), `report.rs` (arithmetic); the
//! flags' validation below; `tests/it/cluster.rs` runs the scenario for 6 s on the embedded shards and on
//! PostgreSQL + S3, for 8 s on `--services local` with a PostgreSQL outage, and for 8 s with `--netns` and a
//! link cut; the scenario itself runs for 20 s in the `cluster` step of `cargo xtask test-suite`, which fails it on any
//! violation and on fewer checks than its stated minimums (`xtask/src/cluster.rs`), and by hand with
//! `cargo run --release -p sim -- cluster`.

pub mod flags;
pub mod html;
pub mod netns;
mod oracle;
pub mod outage;
pub mod processes;
mod report;
pub mod security;
mod tasks;
pub mod timeline;
mod tpch;
mod workload;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tracing::info;

use controller::{Orchestrator, ProcessOrchestrator, ProcessOrchestratorConfig};
use protocol::ReplicaId;

pub use crate::cluster::flags::ClusterFlags;
use crate::cluster::outage::LocalServices;
use crate::cluster::processes::Layout;
use crate::cluster::report::{Outcome, ReplicaReport, Report, Stats, Ui, lock};
use crate::cluster::security::ClusterSecurity;

/// The scenario's clock. It runs real processes in real time, so unlike the simulator it reads the wall
/// clock; every read goes through here.
#[allow(clippy::disallowed_methods)]
pub(crate) fn now() -> Instant {
    Instant::now()
}

/// The scenario's options.
#[derive(Debug, Clone)]
pub struct ClusterArgs {
    /// How long the timed run lasts.
    pub duration: Duration,
    /// Table updates per second.
    pub rate: u64,
    /// Replicas of the instance.
    pub replicas: usize,
    /// Processes of every second replica (the others have one).
    pub processes: usize,
    /// Timely workers per process.
    pub workers: usize,
    /// Concurrent peek loops.
    pub peekers: usize,
    /// Pause between one loop's peeks, milliseconds.
    pub peek_interval_ms: u64,
    /// Replica crashes to inject (`None`: two, or one when the run is short or has a single replica).
    pub kills: Option<usize>,
    /// Drops and recreations of a dataflow.
    pub recreations: usize,
    /// Storage outages to inject (`None`: the default of [`ClusterArgs::outage_count`]).
    pub outages: Option<usize>,
    /// How long each outage lasts.
    pub outage_duration: Duration,
    /// The workload's seed.
    pub seed: u64,
    /// Print the report as JSON.
    pub json: bool,
    /// What the replicas maintain.
    pub workload: Workload,
    /// The TPC-H scale factor (`--workload tpch`).
    pub scale_factor: f64,
    /// Where the controller serves its metrics (`/metrics`); port 0 picks a free one.
    pub metrics_addr: SocketAddr,
    /// Where to write the report page with charts and the metrics scraped at the end (`html.rs`).
    pub report: Option<PathBuf>,
    /// Plain TCP instead of TLS (still with a shared secret).
    pub insecure: bool,
    /// Where the collections live.
    pub storage: StorageMode,
    /// The data directory (emptied at the start); `None`: `target/cluster-data`.
    pub data_dir: Option<PathBuf>,
    /// The services and every replica process in network namespaces of their own (`netns.rs`).
    pub netns: bool,
    /// Link cuts to inject (`None`: the default of [`ClusterArgs::link_cut_count`]).
    pub link_cuts: Option<usize>,
    /// How long each link cut lasts.
    pub link_cut_duration: Duration,
    /// The consensus push channel off (`--no-push`; PostgreSQL only).
    pub no_push: bool,
    /// The replica processes' part cache in bytes (`None`: the engine's default; 0: off).
    pub shard_part_cache_bytes: Option<u64>,
    /// Every process's inline part bound in bytes (`None`: the engine's default; 0: off).
    pub shard_inline_part_bytes: Option<u64>,
}

/// The scenario's workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// The generated orders tables with six dataflows, subscribes and a materialized view (`tasks.rs`).
    Orders,
    /// The 22 TPC-H views, checked against SQLite after every refresh batch (`tpch.rs`).
    Tpch,
}

/// How often every process of the scenario polls the consensus head of a shard it listens to, when no
/// push channel told it first (the shard engine's default is 100 ms; the embedded stores have none, so
/// this bounds how soon a replica sees a write, and with it the frontier lag).
pub const SHARD_POLL_INTERVAL_MS: u64 = 20;

/// Where the scenario keeps its collections (`--storage`, `--blob`/`--consensus`, `--services`; default
/// [`DEFAULT_STORAGE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageMode {
    /// Shards on a blob directory and a SQLite consensus file in the data directory (`blob/`,
    /// `consensus.db`), which every process opens itself (`--storage embedded`).
    Embedded,
    /// Shards at these URLs, which every process opens itself (`--blob URL --consensus URL`). The stores
    /// must not hold the scenario's collections yet.
    Urls {
        /// The `--blob` URL.
        blob: String,
        /// The `--consensus` URL.
        consensus: String,
    },
    /// Shards on a throwaway PostgreSQL server and `moto_server` (S3) that the run starts on loopback and
    /// stops on every way out (`--services local`; `storage::services`).
    LocalServices,
}

/// The default: the embedded shards (DESIGN §9): blob files and a SQLite consensus in the data directory
/// (listens in other processes poll the consensus head every [`SHARD_POLL_INTERVAL_MS`]).
pub const DEFAULT_STORAGE: StorageMode = StorageMode::Embedded;

impl ClusterArgs {
    /// Parses the arguments after `cluster` (as `sim` does, through [`ClusterFlags`]); `--help` and
    /// clap's own refusals come back as errors with clap's message.
    pub fn parse(args: &[String]) -> anyhow::Result<ClusterArgs> {
        #[derive(clap::Parser)]
        #[command(name = "sim cluster")]
        struct Command {
            #[command(flatten)]
            flags: ClusterFlags,
        }
        let command = <Command as clap::Parser>::try_parse_from(
            std::iter::once("cluster").chain(args.iter().map(String::as_str)),
        )?;
        ClusterArgs::from_flags(command.flags)
    }

    /// Checks how the flags combine and makes the scenario's options; refuses, with the reason, a
    /// combination the scenario cannot honour.
    pub fn from_flags(flags: ClusterFlags) -> anyhow::Result<ClusterArgs> {
        let workload = match flags.workload.as_str() {
            "orders" => Workload::Orders,
            "tpch" => Workload::Tpch,
            other => bail!("unknown workload {other:?} (orders or tpch)"),
        };
        if !(flags.scale_factor > 0.0 && flags.scale_factor <= 10.0) {
            bail!("--scale-factor must be in (0, 10]");
        }
        for (flag, length) in [("--outage-secs", flags.outage_secs), ("--link-cut-secs", flags.link_cut_secs)]
        {
            if length.as_secs_f64() > MAX_OUTAGE_SECS {
                bail!(
                    "{flag} must be in (0, {MAX_OUTAGE_SECS}]: the storage engine retries for 30 s before an \
                     operation fails, and the scenario's faults are the kind it rides out"
                );
            }
        }
        let parsed = ClusterArgs {
            duration: flags.duration,
            rate: flags.rate,
            replicas: flags.replicas,
            processes: flags.processes,
            workers: flags.workers,
            peekers: flags.peekers,
            peek_interval_ms: flags.peek_interval_ms,
            kills: flags.kills,
            recreations: flags.recreations,
            outages: flags.outages,
            outage_duration: flags.outage_secs,
            seed: flags.seed.unwrap_or_else(wallclock_seed),
            json: flags.json,
            workload,
            scale_factor: flags.scale_factor,
            metrics_addr: flags.metrics_addr.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
            report: flags.report,
            insecure: flags.insecure,
            storage: storage_mode(flags.storage, flags.blob, flags.consensus, flags.services)?,
            data_dir: flags.data_dir,
            netns: flags.netns,
            link_cuts: flags.link_cuts,
            link_cut_duration: flags.link_cut_secs,
            no_push: flags.no_push,
            shard_part_cache_bytes: flags.shard_part_cache_bytes,
            shard_inline_part_bytes: flags.shard_inline_part_bytes,
        };
        if parsed.replicas == 0 || parsed.processes == 0 || parsed.workers == 0 {
            bail!("--replicas, --processes and --workers must be at least 1");
        }
        if parsed.workload == Workload::Tpch && (flags.metrics_addr.is_some() || parsed.report.is_some()) {
            bail!(
                "--metrics-addr and --report are not built for --workload tpch (its scenario serves no metrics)"
            );
        }
        parsed.check_faults()?;
        Ok(parsed)
    }

    /// Refuses outages and link cuts where they cannot be injected, and `--netns` where it cannot run.
    fn check_faults(&self) -> anyhow::Result<()> {
        if let Some(n @ 1..) = self.outages {
            if let Some(why) = outage::unsupported(&self.storage) {
                bail!("--outages {n}: {why}");
            }
            if self.workload == Workload::Tpch {
                bail!("--outages is not built for --workload tpch (only the orders workload injects them)");
            }
        }
        if self.netns {
            if self.storage != StorageMode::LocalServices {
                bail!(
                    "--netns needs --services local: the scenario starts PostgreSQL and moto_server in a namespace \
                     of their own, so that storage crosses the network too (embedded stores are files, and \
                     --blob/--consensus name servers it does not place)"
                );
            }
            if self.workload == Workload::Tpch {
                bail!("--netns is not built for --workload tpch (only the orders workload runs on it)");
            }
        }
        let postgres = match &self.storage {
            StorageMode::LocalServices => true,
            StorageMode::Urls { consensus, .. } => consensus.starts_with("postgres"),
            StorageMode::Embedded => false,
        };
        if self.no_push && !postgres {
            bail!(
                "--no-push needs a PostgreSQL consensus (--services local or --consensus postgres://...): only \
                 there do listens have a push channel to turn off (SQLite's is within one process only)"
            );
        }
        if let Some(n @ 1..) = self.link_cuts
            && !self.netns
        {
            bail!("--link-cuts {n} needs --netns: on loopback there is no link to cut");
        }
        Ok(())
    }

    /// The processes of replica `index` (1-based): every second replica is a multi-process cluster.
    pub fn processes_of(&self, index: usize) -> usize {
        if index.is_multiple_of(2) { self.processes } else { 1 }
    }

    /// The replicas, with their processes.
    pub fn replica_specs(&self) -> Vec<(ReplicaId, usize)> {
        (1..=self.replicas).map(|i| (ReplicaId(i as u64), self.processes_of(i))).collect()
    }

    /// How many replica crashes to inject.
    pub fn kill_count(&self) -> usize {
        self.kills.unwrap_or(if self.replicas >= 2 && self.duration >= Duration::from_secs(30) {
            2
        } else {
            1
        })
    }

    /// How many link cuts to inject: as asked, else one with `--netns`, else none.
    pub fn link_cut_count(&self) -> usize {
        self.link_cuts.unwrap_or(usize::from(self.netns))
    }

    /// How many storage outages to inject: as asked, else one on `--services local` with the orders
    /// workload (two, one of each kind, in runs of 30 s or more), else none (see `outage::unsupported`).
    pub fn outage_count(&self) -> usize {
        self.outages.unwrap_or(
            if self.storage == StorageMode::LocalServices && self.workload == Workload::Orders {
                if self.duration >= Duration::from_secs(30) { 2 } else { 1 }
            } else {
                0
            },
        )
    }
}

/// The longest outage `--outage-secs` accepts (the shard engine's retry budget is 30 s).
pub const MAX_OUTAGE_SECS: f64 = 20.0;

/// The storage mode the flags name; at most one way is allowed, and URLs are checked here.
fn storage_mode(
    mode: Option<String>,
    blob: Option<String>,
    consensus: Option<String>,
    services: Option<String>,
) -> anyhow::Result<StorageMode> {
    let ways = usize::from(mode.is_some())
        + usize::from(blob.is_some() || consensus.is_some())
        + usize::from(services.is_some());
    if ways > 1 {
        bail!("--storage, --blob/--consensus and --services each choose the storage: give one of them");
    }
    if let Some(services) = services {
        return match services.as_str() {
            "local" => Ok(StorageMode::LocalServices),
            other => bail!("--services {other:?}: the only value is `local`"),
        };
    }
    if let Some(mode) = mode {
        return match mode.as_str() {
            "embedded" => Ok(StorageMode::Embedded),
            "server" => bail!(
                "--storage server: the storage server is retired; every process opens the shards itself \
                 (--storage embedded, --blob/--consensus or --services local)"
            ),
            other => bail!("--storage {other:?}: expected `embedded`"),
        };
    }
    match (blob, consensus) {
        (None, None) => Ok(DEFAULT_STORAGE),
        (Some(blob), Some(consensus)) => {
            // Refused here, with the reason, rather than by every process later.
            controller::ReplicaStorage::shards(&blob, &consensus).map_err(|e| anyhow!("{e}"))?;
            Ok(StorageMode::Urls { blob, consensus })
        }
        (Some(_), None) => bail!("--blob needs --consensus"),
        (None, Some(_)) => bail!("--consensus needs --blob"),
    }
}

/// A seed from the clock, for runs that do not name one.
#[allow(clippy::disallowed_methods)]
fn wallclock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Everything the scenario started, killed in order when dropped: the replicas (through the
/// orchestrator's own `Drop`), then the local services.
struct Children {
    orchestrator: Option<Arc<ProcessOrchestrator>>,
    replicas: Vec<ReplicaId>,
    services: Option<Arc<LocalServices>>,
    /// Torn down last, once nothing runs in its namespaces.
    network: Option<Arc<netns::Network>>,
}

impl Drop for Children {
    fn drop(&mut self) {
        if let Some(orchestrator) = self.orchestrator.take() {
            match Arc::try_unwrap(orchestrator) {
                // The last reference: its `Drop` stops the supervisor and kills every replica process.
                Ok(orchestrator) => drop(orchestrator),
                Err(shared) => {
                    // Something still holds the orchestrator (a task that was not shut down): drop every
                    // replica through it (it stops supervising them, kills and reaps their processes).
                    // `drop_replica` never awaits anything; a throwaway runtime drives it (this runs
                    // outside the scenario's runtime).
                    if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().build() {
                        for replica in &self.replicas {
                            let _ = runtime.block_on(shared.drop_replica(tasks::INSTANCE, *replica));
                        }
                    }
                }
            }
        }
        self.services.take();
        if let Some(network) = self.network.take() {
            network.teardown();
        }
    }
}

/// Starts what `args.storage` needs (into `children`, so every way out stops it) and says where the
/// scenario's processes find storage, and how to describe it in the report.
fn start_storage(
    args: &ClusterArgs,
    layout: &Layout,
    security: &ClusterSecurity,
    children: &mut Children,
    ui: &Ui,
) -> anyhow::Result<(tasks::ScenarioStorage, controller::ReplicaStorage, String)> {
    let (blob, consensus) = match &args.storage {
        StorageMode::Embedded => storage::embedded_urls(&layout.data_dir),
        StorageMode::Urls { blob, consensus } => (blob.clone(), consensus.clone()),
        StorageMode::LocalServices => {
            let host = children.network.as_ref().map(|n| n.services_host());
            let services = LocalServices::start(host, &|message| ui.say(message))?;
            let urls = (services.blob.clone(), services.consensus.clone());
            children.services = Some(Arc::new(services));
            urls
        }
    };
    let consensus = if args.no_push {
        let separator = if consensus.contains('?') { '&' } else { '?' };
        format!("{consensus}{separator}listen=false")
    } else {
        consensus
    };
    let replicas = controller::ReplicaStorage::shards(&blob, &consensus).map_err(|e| anyhow!("{e}"))?;
    let blob: storage::blob::BlobConfig = blob.parse().map_err(|e| anyhow!("{e}"))?;
    let consensus: storage::consensus::ConsensusConfig = consensus.parse().map_err(|e| anyhow!("{e}"))?;
    let described = format!("shards (blob {}, consensus {})", blob_kind(&blob), consensus_kind(&consensus));
    ui.say(&format!(
        "every process opens the {described}; controller connections secured with {}; logs in {}",
        security.describe(),
        layout.log_dir().display()
    ));
    let inline_part_bytes = args.shard_inline_part_bytes.map(|bytes| bytes as usize);
    Ok((tasks::ScenarioStorage::Shards { blob, consensus, inline_part_bytes }, replicas, described))
}

/// The blob store's kind, without its credentials.
fn blob_kind(blob: &storage::blob::BlobConfig) -> String {
    match &blob.kind {
        storage::blob::BlobKind::File { root } => format!("file {}", root.display()),
        storage::blob::BlobKind::Memory { .. } => "mem".to_string(),
        storage::blob::BlobKind::S3(s3) => format!("s3 bucket {}", s3.bucket),
    }
}

/// The consensus store's kind, without its credentials.
fn consensus_kind(consensus: &storage::consensus::ConsensusConfig) -> String {
    match &consensus.kind {
        storage::consensus::ConsensusKind::Sqlite { path } => format!("sqlite {}", path.display()),
        storage::consensus::ConsensusKind::Postgres { root_cert: Some(_), client_cert: Some(_), .. } => {
            "postgres over TLS with a client certificate".to_string()
        }
        storage::consensus::ConsensusKind::Postgres { root_cert: Some(_), client_cert: None, .. } => {
            "postgres over TLS".to_string()
        }
        storage::consensus::ConsensusKind::Postgres { root_cert: None, .. } => "postgres".to_string(),
        storage::consensus::ConsensusKind::Memory { .. } => "mem".to_string(),
    }
}

fn init_tracing(layout: &Layout) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    match std::env::var("RUST_LOG") {
        // Asked for: logs on stderr, interleaved with the display.
        Ok(filter) if !filter.is_empty() => {
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .init();
        }
        // By default the terminal stays quiet and the log goes to a file.
        _ => {
            let file =
                std::fs::File::create(layout.log_dir().join("sim.log")).context("cannot create sim.log")?;
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::new("info"))
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
    }
    Ok(())
}

/// Resolves when the scenario is asked to stop: Ctrl-C (SIGINT), SIGTERM (`kill`, `timeout`, a CI runner
/// cancelling) or SIGHUP (the terminal went away). Returns the signal's name.
async fn interrupted() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut hangup)) = (signal(SignalKind::terminate()), signal(SignalKind::hangup()))
        else {
            // Without those handlers Ctrl-C still works.
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
            _ = hangup.recv() => "SIGHUP",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

/// Runs the scenario; the exit code is non-zero on any violation, error or interruption.
/// The scenario's async runtime (two workers). With `--netns` every thread it starts enters the
/// controller's network namespace first; a thread that cannot is recorded as a violation (and the
/// scenario's own check refuses to run off its host).
fn scenario_runtime(
    network: Option<&Arc<netns::Network>>,
    stats: &Arc<Stats>,
) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    if let Some(network) = network {
        // Fail early, with the reason, where the namespace cannot be entered.
        let probe = Arc::clone(network);
        std::thread::spawn(move || probe.enter_controller_host())
            .join()
            .map_err(|_| anyhow!("the namespace probe thread panicked"))??;
        let (network, stats) = (Arc::clone(network), Arc::clone(stats));
        builder.on_thread_start(move || {
            if let Err(error) = network.enter_controller_host() {
                stats.violation(format!("a runtime thread stayed outside the controller's host: {error:#}"));
            }
        });
    }
    builder.build().context("cannot start the async runtime")
}

pub fn run(mut args: ClusterArgs) -> anyhow::Result<ExitCode> {
    let ui = Arc::new(Ui::new());
    let mut layout = Layout::of_current_exe()?;
    if let Some(dir) = &args.data_dir {
        layout.data_dir =
            std::path::absolute(dir).with_context(|| format!("--data-dir {}", dir.display()))?;
    }
    layout.fresh_data_dir()?;
    init_tracing(&layout)?;
    ui.say(&format!(
        "sim cluster: seed {}, {:.0} s at {} rows/s, {} replicas; files in {}",
        args.seed,
        args.duration.as_secs_f64(),
        args.rate,
        args.replicas,
        layout.data_dir.display()
    ));
    let binaries = processes::binaries(&layout, &|message| ui.say(message))?;
    let child_log =
        std::env::var("RUST_LOG").ok().filter(|f| !f.is_empty()).unwrap_or_else(|| "info".to_string());
    // The children log to files: no colour codes.
    let mut env = vec![("RUST_LOG".to_string(), child_log), ("NO_COLOR".to_string(), "1".to_string())];

    let mut children = Children { orchestrator: None, replicas: Vec::new(), services: None, network: None };
    if args.netns {
        let network = netns::Network::create()?;
        ui.say(&network.describe());
        if args.metrics_addr.ip().is_loopback() {
            // The controller's loopback is its namespace's: serve where the root namespace reaches it.
            args.metrics_addr.set_ip(network.controller_address().into());
        }
        children.network = Some(network);
    }
    let hosts: Vec<std::net::IpAddr> =
        children.network.iter().flat_map(|n| n.addresses()).map(Into::into).collect();
    let security = ClusterSecurity::generate_for(&layout.data_dir.join("security"), args.insecure, &hosts)?;
    let client_security = security.client()?;
    let stats = Arc::new(Stats::default());
    let (scenario_storage, replica_storage, storage_described) =
        start_storage(&args, &layout, &security, &mut children, &ui)?;
    // `compute-replica --shard-poll-interval-ms`, through the environment like the URLs.
    env.push((controller::SHARD_POLL_INTERVAL_ENV.to_string(), SHARD_POLL_INTERVAL_MS.to_string()));
    if let Some(bytes) = args.shard_part_cache_bytes {
        env.push((controller::SHARD_PART_CACHE_ENV.to_string(), bytes.to_string()));
    }
    if let Some(bytes) = args.shard_inline_part_bytes {
        env.push((controller::SHARD_INLINE_PART_ENV.to_string(), bytes.to_string()));
    }
    if args.netns {
        // `compute-replica --keepalive-interval-ms`: well below the controller's idle timeout.
        env.push((controller::KEEPALIVE_INTERVAL_ENV.to_string(), netns::KEEPALIVE_INTERVAL_MS.to_string()));
    }
    let services = children.services.clone();
    let network = children.network.clone();
    let hosts: Arc<dyn controller::ProcessHosts> = match &network {
        Some(network) => Arc::new(netns::NetnsHosts(Arc::clone(network))),
        None => Arc::new(controller::LoopbackHosts),
    };
    let orchestrator_config = ProcessOrchestratorConfig {
        binary: binaries.compute_replica.clone(),
        storage: replica_storage,
        security: security.replicas(),
        initial_backoff_ms: 100,
        max_backoff_ms: 2_000,
        env,
        log_dir: Some(layout.log_dir()),
        metrics: true,
    };
    let (orchestrator, process_events) = ProcessOrchestrator::with_hosts(orchestrator_config, hosts);
    let orchestrator = Arc::new(orchestrator);
    children.orchestrator = Some(Arc::clone(&orchestrator));
    children.replicas = args.replica_specs().into_iter().map(|(r, _)| r).collect();

    let runtime = scenario_runtime(children.network.as_ref(), &stats)?;
    let controller_host = children.network.clone();
    let drive = {
        let (args, stats, ui, orchestrator) =
            (args.clone(), Arc::clone(&stats), Arc::clone(&ui), Arc::clone(&orchestrator));
        let runtime = &runtime;
        let controller_host = controller_host.clone();
        move || {
            runtime.block_on(async move {
                let scenario = async move {
                    if let Some(network) = &controller_host
                        && !network.in_controller_host()
                    {
                        bail!("the scenario is not in the controller's network namespace");
                    }
                    match args.workload {
                        Workload::Orders => {
                            tasks::scenario(
                                args,
                                scenario_storage,
                                services,
                                network,
                                client_security,
                                orchestrator,
                                process_events,
                                stats,
                                ui,
                            )
                            .await
                        }
                        Workload::Tpch => {
                            tpch::scenario(
                                args,
                                scenario_storage,
                                client_security,
                                orchestrator,
                                process_events,
                                stats,
                                ui,
                            )
                            .await
                        }
                    }
                };
                tokio::select! {
                    result = scenario => result.map(|()| false),
                    signal = interrupted() => {
                        info!(signal, "interrupted");
                        Ok(true)
                    }
                }
            })
        }
    };
    let result = match &controller_host {
        // `block_on` polls the scenario on the thread that calls it: with `--netns`, one that entered the
        // controller's namespace, as the runtime's own threads do; this one stays in the root namespace.
        Some(network) => std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    network.enter_controller_host()?;
                    drive()
                })
                .join()
                .unwrap_or_else(|_| Err(anyhow!("the scenario's thread panicked")))
        }),
        None => drive(),
    };
    ui.clear();
    // Stop every task (and with them the controller and its replica clients) before the processes go.
    runtime.shutdown_timeout(Duration::from_secs(5));
    for replica in &children.replicas {
        lock(&stats.child_pids).extend(orchestrator.pids(tasks::INSTANCE, *replica));
    }
    drop(orchestrator);
    let network = children.network.clone();
    drop(children);
    // Every child must be gone now, whatever the way out was, and every namespace and link.
    let started: Vec<u32> = lock(&stats.child_pids).iter().copied().collect();
    for pid in processes::running_children(&started) {
        stats.violation(format!("child process {pid} still runs after the scenario's cleanup"));
    }
    let network_described = network.as_ref().map_or("loopback".to_string(), |n| n.describe());
    if let Some(network) = network {
        for left in network.leftovers() {
            stats.violation(format!("{left} is still there after the scenario's cleanup"));
        }
    }

    let replicas = args
        .replica_specs()
        .into_iter()
        .map(|(r, processes)| ReplicaReport { replica: r.to_string(), processes, workers: args.workers })
        .collect();
    let (outcome, error) = match result {
        Ok(false) => (Outcome::Passed, None),
        Ok(true) => {
            ui.say("interrupted: every child process was stopped");
            (Outcome::Interrupted, None)
        }
        Err(e) => (Outcome::Error, Some(format!("{e:#}"))),
    };
    let outage_injection = if args.outage_count() > 0 {
        format!(
            "{} of {:.1} s each, alternating, consensus first: {}; {}",
            args.outage_count(),
            args.outage_duration.as_secs_f64(),
            outage::OutageKind::Consensus.action(),
            outage::OutageKind::Blob.action()
        )
    } else {
        outage::not_injected(&args.storage)
    };
    let link_cut_injection = if args.link_cut_count() > 0 {
        format!(
            "{} of {:.1} s each: every link of one replica taken down (ip link set down) and brought back",
            args.link_cut_count(),
            args.link_cut_duration.as_secs_f64()
        )
    } else if args.netns {
        "none asked for (--link-cuts 0)".to_string()
    } else {
        "not injected: the processes share this host's loopback (use --netns)".to_string()
    };
    let report = Report::new(&stats, outcome, error, args.seed, args.rate, replicas)
        .with_storage(storage_described)
        .with_outage_injection(outage_injection)
        .with_network(network_described, link_cut_injection);
    if let Some(dir) = &args.report {
        let page = html::write_report(dir, &lock(&stats.timeline), &report)?;
        ui.say(&format!("report page: {}", page.display()));
    }
    if args.json {
        let json = serde_json::to_string_pretty(&report).context("cannot render the report")?;
        #[allow(clippy::print_stdout)] // The report is the command's output.
        {
            println!("{json}");
        }
    } else {
        report.print();
    }
    Ok(match report.outcome {
        Outcome::Passed => ExitCode::SUCCESS,
        Outcome::Interrupted => ExitCode::from(130),
        Outcome::Failed | Outcome::Error => ExitCode::FAILURE,
    })
}

/// The as-of of every live export, by id (an export is hydrated on a replica once that replica's write
/// frontier passed it).
type AsOfs = BTreeMap<protocol::GlobalId, u64>;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> anyhow::Result<ClusterArgs> {
        ClusterArgs::parse(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn each_storage_flag_chooses_its_mode() {
        assert_eq!(parse(&[]).unwrap().storage, StorageMode::Embedded);
        assert_eq!(parse(&["--storage", "embedded"]).unwrap().storage, StorageMode::Embedded);
        assert_eq!(parse(&["--services", "local"]).unwrap().storage, StorageMode::LocalServices);
        let urls = parse(&["--blob", "file:///d/blob", "--consensus", "sqlite:///d/c.db"]).unwrap();
        let expected =
            StorageMode::Urls { blob: "file:///d/blob".into(), consensus: "sqlite:///d/c.db".into() };
        assert_eq!(urls.storage, expected);
    }

    #[test]
    fn outages_default_on_for_local_services_only_and_are_refused_with_the_reason_elsewhere() {
        assert_eq!(parse(&["--services", "local", "--duration", "10"]).unwrap().outage_count(), 1);
        assert_eq!(parse(&["--services", "local", "--duration", "60"]).unwrap().outage_count(), 2);
        assert_eq!(parse(&["--services", "local", "--outages", "0"]).unwrap().outage_count(), 0);
        assert_eq!(parse(&[]).unwrap().outage_count(), 0, "the embedded default has no server to stop");
        assert_eq!(parse(&["--outages", "0"]).unwrap().outage_count(), 0);
        let cases: [(&[&str], &str); 4] = [
            (&["--outages", "1"], "there is no server to stop"),
            (
                &["--blob", "file:///b", "--consensus", "sqlite:///c", "--outages", "1"],
                "were not started by the scenario",
            ),
            (
                &["--services", "local", "--workload", "tpch", "--outages", "1"],
                "not built for --workload tpch",
            ),
            (&["--services", "local", "--outage-secs", "25"], "retries for 30 s"),
        ];
        for (args, expected) in cases {
            let error = format!("{:#}", parse(args).unwrap_err());
            assert!(error.contains(expected), "{args:?}: {error}");
        }
    }

    #[test]
    fn netns_needs_local_services_and_link_cuts_need_netns_and_each_refusal_says_why() {
        let netns = parse(&["--services", "local", "--netns"]).unwrap();
        assert!(netns.netns);
        assert_eq!(netns.link_cut_count(), 1, "one cut by default with --netns");
        assert_eq!(netns.link_cut_duration, Duration::from_secs(4));
        let flags = ["--services", "local", "--netns", "--link-cuts", "3", "--link-cut-secs", "2.5"];
        let cuts = parse(&flags).unwrap();
        assert_eq!((cuts.link_cut_count(), cuts.link_cut_duration), (3, Duration::from_millis(2_500)));
        assert_eq!(
            parse(&["--services", "local", "--netns", "--link-cuts", "0"]).unwrap().link_cut_count(),
            0
        );
        assert_eq!(parse(&[]).unwrap().link_cut_count(), 0, "no links to cut on loopback");
        let cases: [(&[&str], &str); 6] = [
            (&["--netns"], "--netns needs --services local"),
            (&["--storage", "embedded", "--netns"], "--netns needs --services local"),
            (
                &["--blob", "file:///b", "--consensus", "sqlite:///c", "--netns"],
                "--netns needs --services local",
            ),
            (
                &["--services", "local", "--netns", "--workload", "tpch", "--outages", "0"],
                "not built for --workload tpch",
            ),
            (&["--services", "local", "--link-cuts", "1"], "--link-cuts 1 needs --netns"),
            (
                &["--services", "local", "--netns", "--link-cut-secs", "30"],
                "--link-cut-secs must be in (0, 20]",
            ),
        ];
        for (args, expected) in cases {
            let error = format!("{:#}", parse(args).unwrap_err());
            assert!(error.contains(expected), "{args:?}: {error}");
        }
    }

    #[test]
    fn no_push_is_taken_with_a_postgres_consensus_only_and_refused_elsewhere_with_the_reason() {
        assert!(parse(&["--services", "local", "--no-push"]).unwrap().no_push);
        let urls = ["--blob", "file:///b", "--consensus", "postgres://u@h/db", "--no-push"];
        assert!(parse(&urls).unwrap().no_push);
        assert!(!parse(&["--services", "local"]).unwrap().no_push);
        let cases: [&[&str]; 3] = [
            &["--no-push"],
            &["--storage", "embedded", "--no-push"],
            &["--blob", "file:///b", "--consensus", "sqlite:///c", "--no-push"],
        ];
        for args in cases {
            let error = format!("{:#}", parse(args).unwrap_err());
            assert!(error.contains("--no-push needs a PostgreSQL consensus"), "{args:?}: {error}");
        }
    }

    #[test]
    fn conflicting_incomplete_or_malformed_storage_flags_are_refused_with_the_reason() {
        let cases: [(&[&str], &str); 8] = [
            (&["--storage", "embedded", "--services", "local"], "give one of them"),
            (&["--storage", "server"], "the storage server is retired"),
            (
                &["--storage", "embedded", "--blob", "file:///b", "--consensus", "sqlite:///c"],
                "give one of them",
            ),
            (&["--blob", "file:///b"], "--blob needs --consensus"),
            (&["--consensus", "sqlite:///c"], "--consensus needs --blob"),
            (&["--storage", "wal"], "expected `embedded`"),
            (&["--services", "remote"], "the only value is `local`"),
            (&["--blob", "ftp://b", "--consensus", "sqlite:///c"], "unknown blob scheme"),
        ];
        for (args, expected) in cases {
            let error = format!("{:#}", parse(args).unwrap_err());
            assert!(error.contains(expected), "{args:?}: {error}");
        }
    }
}
