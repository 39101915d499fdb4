//! `compute-replica`: one process of a compute replica, as a standalone program.
//!
//! ```text
//! compute-replica --listen ADDR [--workers N]
//!                 --blob URL --consensus URL [--shard-poll-interval-ms MS] [--shard-part-cache-bytes BYTES]
//!                 [--shard-inline-part-bytes BYTES]
//!                 [--process I --addresses A0,A1,...] [--metrics-addr ADDR] [--keepalive-interval-ms MS]
//!                 (--tls-cert FILE --tls-key FILE [--tls-client-ca FILE] | --insecure)
//!                 [--secret-file FILE]
//! ```
//!
//! **Security** (`transport::SecurityFlags`): TLS on the controller port with `--tls-cert`/`--tls-key`;
//! `--insecure` for plain TCP, which must be asked for. The shared secret comes from `--secret-file` or the
//! environment variable `CCR_SHARED_SECRET`, never from a flag's value (`ps` shows those). Controllers
//! prove the secret, or present a certificate chaining to `--tls-client-ca` (then the secret is
//! optional for them); the processes of a multi-process replica always use the secret. The shards (`--blob`/`--consensus`) are reached with the stores' own credentials.
//!
//! A thin wrapper. It reaches storage by opening the shards itself (`--blob` and `--consensus`, or the
//! environment variables `COMPUTE_BLOB_URL` and `COMPUTE_CONSENSUS_URL`: a `storage::ShardCollections`
//! with a leased reader, the URL syntax of DESIGN §9, `storage::blob` and `storage::consensus`). Then it calls
//! `compute::ReplicaServer::start_with_registry` with the process's Prometheus registry and runs until
//! interrupted (Ctrl-C / SIGINT: exit status 0, after releasing its shard readers) or until the process
//! fails (a worker panicked, timely failed, the I/O thread panicked: see `compute::ReplicaHandle::failed`),
//! when it exits with status 1 at once, without waiting for the other processes of its replica (their
//! cluster connections close with it, so they fail too), for its orchestrator to restart the replica. Bad
//! flags exit with status 2 and clap's message (`--help` explains every flag). It prints the address it
//! listens on as `listening on ADDR` (useful with port 0). With `--metrics-addr` it serves the registry at
//! `http://ADDR/metrics` (`telemetry::MetricsServer`) and prints `metrics on http://ADDR/metrics`. It is not
//! where any replica logic lives; see the `compute` library. Tested by the `sim` crate's `tests/it/`, which
//! runs it under the process orchestrator (a worker panic and an injected I/O-thread panic,
//! `compute::FAULT_ENV`, each exit with status 1; the flags' validation; a replica on shards) and scrapes
//! its metrics and checks them with `promtool`.

// The binary talks to a person on its terminal (usage errors, the address it listens on).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use compute::{ReplicaConfig, ReplicaServer};
use storage::blob::BlobConfig;
use storage::consensus::ConsensusConfig;
use storage::{ShardCollections, ShardConfig, StorageCollections};
use transport::SecurityFlags;

/// One process of a compute replica: it listens for the controller, runs the dataflows on timely
/// workers, and reads and writes storage by opening the shards itself (`--blob` and `--consensus`).
#[derive(Debug, Parser)]
#[command(name = "compute-replica", version)]
#[command(after_help = "Exit status: 0 after Ctrl-C, 1 when the replica fails (a worker panicked; its \
orchestrator restarts it) or cannot start, 2 for bad flags. RUST_LOG sets the log filter (default info).")]
struct Args {
    /// The address the controller connects to (port 0 picks a free one; printed as `listening on ADDR`).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,

    /// Timely worker threads in this process.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = at_least_one)]
    workers: usize,

    /// The blob store of the shards: `file:///DIR`, `s3://BUCKET/PREFIX?endpoint=URL&region=R&...` or
    /// `mem://NAME` (within this process only). Every process of the system must name the same store.
    #[arg(long, value_name = "URL", env = "COMPUTE_BLOB_URL")]
    blob: BlobConfig,

    /// The consensus store of the shards: `sqlite:///FILE`, `postgres://USER@HOST:PORT/DB` or
    /// `mem://NAME` (within this process only).
    #[arg(long, value_name = "URL", env = "COMPUTE_CONSENSUS_URL")]
    consensus: ConsensusConfig,

    /// How often, in milliseconds, this process polls the consensus store for changes of the shards it
    /// listens to when no push channel (PostgreSQL `NOTIFY`) told it first. Default:
    /// the shard engine's (`storage::ShardConfig`), 100 ms.
    #[arg(
        long,
        value_name = "MS",
        env = "COMPUTE_SHARD_POLL_INTERVAL_MS",
        value_parser = clap::value_parser!(u64).range(1..=60_000)
    )]
    shard_poll_interval_ms: Option<u64>,

    /// The most bytes of blob parts this process keeps in memory, shared by all its readers of a part
    /// (listens, snapshots, compaction); 0 turns the cache off. Only with `--blob`. Default: the shard
    /// engine's (`storage::ShardConfig`), 64 MiB.
    #[arg(
        long,
        value_name = "BYTES",
        env = "COMPUTE_SHARD_PART_CACHE_BYTES",
        value_parser = clap::value_parser!(u64).range(0..=(64u64 << 30))
    )]
    shard_part_cache_bytes: Option<u64>,

    /// An append's run of a shard that encodes to at most this many bytes is carried inline in the
    /// shard's state (one compare-and-set, no blob put); 0 turns that off. Default: the shard engine's
    /// (`storage::ShardConfig`), 4 KiB.
    #[arg(
        long,
        value_name = "BYTES",
        env = "COMPUTE_SHARD_INLINE_PART_BYTES",
        value_parser = clap::value_parser!(u64).range(0..=(storage::shard::MAX_INLINE_BYTES_LIMIT as u64))
    )]
    shard_inline_part_bytes: Option<u64>,

    /// How long, in milliseconds, this process stays silent on a controller connection before it writes a
    /// keepalive, so that its controller can tell it from a vanished one. Keep it well below the
    /// controller's idle timeout. Default: 10000.
    #[arg(
        long,
        value_name = "MS",
        env = "COMPUTE_KEEPALIVE_INTERVAL_MS",
        value_parser = clap::value_parser!(u64).range(1..=600_000)
    )]
    keepalive_interval_ms: Option<u64>,

    /// This process's index in a multi-process replica (0-based; needs `--addresses`).
    #[arg(long, value_name = "I", default_value_t = 0, requires = "addresses")]
    process: usize,

    /// The timely addresses of every process of the replica, in process order, comma-separated (a
    /// multi-process replica; this process listens on the one at `--process`).
    #[arg(long, value_name = "A0,A1,...", value_delimiter = ',')]
    addresses: Vec<String>,

    /// Serve this process's metrics at `http://ADDR/metrics` (Prometheus text format).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,

    /// This process's TLS certificate (PEM) on the controller port; with `--tls-key`.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,

    /// The private key (PEM) of `--tls-cert`.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,

    /// A CA (PEM): controllers presenting a certificate that chains to it need not prove the secret.
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,

    /// The file holding the shared secret (else the environment variable `CCR_SHARED_SECRET`; never a
    /// flag's value, which `ps` would show).
    #[arg(long, value_name = "FILE")]
    secret_file: Option<PathBuf>,

    /// Plain TCP on every connection instead of TLS (must be asked for; the secret is still proved).
    #[arg(long)]
    insecure: bool,
}

fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

impl Args {
    /// The security flags, for `transport` to turn into connection settings.
    fn security(&self) -> SecurityFlags {
        SecurityFlags {
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            // The process connects to nothing that presents a certificate: its peers prove the secret.
            tls_ca: None,
            tls_client_ca: self.tls_client_ca.clone(),
            secret_file: self.secret_file.clone(),
            insecure: self.insecure,
        }
    }

    /// The checks clap's attributes cannot express.
    fn validate(&self) -> Result<(), String> {
        if let Some(bytes) = self.shard_part_cache_bytes {
            let config = ShardConfig {
                part_cache_bytes: usize::try_from(bytes).unwrap_or(usize::MAX),
                ..ShardConfig::default()
            };
            config.validate().map_err(|e| format!("--shard-part-cache-bytes {bytes}: {e}"))?;
        }
        if let Some(bytes) = self.shard_inline_part_bytes {
            let config = ShardConfig { inline_part_bytes: bytes as usize, ..ShardConfig::default() };
            config.validate().map_err(|e| format!("--shard-inline-part-bytes {bytes}: {e}"))?;
        }
        if !self.addresses.is_empty() && self.process >= self.addresses.len() {
            return Err(format!(
                "--process {} is out of range: --addresses names {} process(es)",
                self.process,
                self.addresses.len()
            ));
        }
        Ok(())
    }
}

/// Opens the shards, whose engine records its metrics (`storage::StorageMetrics`) in the process's
/// `registry`. Runs on `runtime`, which the engine's background tasks then live on.
fn open_storage(
    runtime: &tokio::runtime::Runtime,
    args: &Args,
    registry: &prometheus::Registry,
) -> Result<ShardCollections, String> {
    let mut config = ShardConfig::default();
    if let Some(ms) = args.shard_poll_interval_ms {
        config.poll_interval = std::time::Duration::from_millis(ms);
    }
    if let Some(bytes) = args.shard_part_cache_bytes {
        config.part_cache_bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
    }
    if let Some(bytes) = args.shard_inline_part_bytes {
        // At most `MAX_INLINE_BYTES_LIMIT` (clap's range): it fits.
        config.inline_part_bytes = bytes as usize;
    }
    let metrics = storage::StorageMetrics::register(registry)
        .map_err(|e| format!("cannot register the storage engine's metrics: {e}"))?;
    let config = ShardConfig { metrics: Some(metrics), ..config };
    let (blob, consensus) = (&args.blob, &args.consensus);
    let shards = runtime
        .block_on(ShardCollections::open(blob, consensus, config))
        .map_err(|e| format!("cannot open the shards: {e}"))?;
    tracing::info!(?blob, ?consensus, "opened the shards");
    Ok(shards)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(message) = args.validate() {
        eprintln!("error: {message}");
        return ExitCode::from(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The process's registry: the replica's metrics and, on shards, the storage engine's, served at
    // `--metrics-addr`.
    let registry = prometheus::Registry::new();
    let security = args.security();
    let server_security = match security.server() {
        Ok(server) => server,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    let shards = match open_storage(&runtime, &args, &registry) {
        Ok(shards) => shards,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::FAILURE;
        }
    };
    let storage: Arc<dyn StorageCollections> = Arc::new(shards.clone());
    let config = ReplicaConfig::new(args.listen, args.workers, storage, server_security)
        .in_cluster(args.process, args.addresses);
    let mut limits = compute::ReplicaLimits::default();
    if let Some(ms) = args.keepalive_interval_ms {
        limits.keepalive_interval_ms = ms;
    }
    let handle = match ReplicaServer::start_with_limits_and_registry(config, limits, registry.clone()) {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("cannot start the replica: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening on {}", handle.local_addr());
    let _metrics_server = match args.metrics_addr {
        None => None,
        Some(addr) => match runtime.block_on(telemetry::MetricsServer::bind(addr, registry)) {
            Ok(server) => {
                println!("metrics on {}", server.url());
                Some(server)
            }
            Err(e) => {
                eprintln!("cannot serve metrics on {addr}: {e}");
                handle.shutdown();
                return ExitCode::FAILURE;
            }
        },
    };
    let failure = runtime.block_on(async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => None,
            failure = handle.failed() => Some(failure),
        }
    });
    match failure {
        None => {
            handle.shutdown();
            // Release the leased readers now rather than leaving them to expire.
            runtime.block_on(shards.shutdown());
            ExitCode::SUCCESS
        }
        Some(failure) => {
            // The orchestrator restarts the process; the controller replays its commands to it. No
            // shutdown: joining timely's threads would wait for the other processes of the replica.
            eprintln!("replica failed: {failure}");
            std::process::exit(1)
        }
    }
}
