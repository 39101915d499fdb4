//! `sim cluster`'s command line ([`ClusterFlags`], clap derive): every flag with its help, parsed into
//! values; [`ClusterArgs::from_flags`](crate::cluster::ClusterArgs::from_flags) then checks how they
//! combine (one storage choice, outages and link cuts only where they can be injected) and refuses the rest
//! with the reason.
//!
//! **Environment.** `--blob` and `--consensus` may come from `SIM_BLOB_URL` and `SIM_CONSENSUS_URL` instead
//! (URLs may carry credentials, which a command line shows to every user); set, they count as given (so
//! they conflict with `--storage` and `--services` like the flags).
//!
//! **Not here:** what the flags do (`cluster/mod.rs` and the modules it names).
//! **Tests:** the flags' validation in `cluster/mod.rs`'s tests; `tests/it/main.rs` checks `--help` and an
//! unknown flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The environment variable `--blob` is read from when not given.
pub const BLOB_URL_ENV: &str = "SIM_BLOB_URL";
/// The environment variable `--consensus` is read from when not given.
pub const CONSENSUS_URL_ENV: &str = "SIM_CONSENSUS_URL";

/// A length in seconds, `S` or `Ss` (fractions allowed), positive and finite.
pub(crate) fn seconds(value: &str) -> Result<Duration, String> {
    let secs: f64 = value
        .trim_end_matches('s')
        .parse()
        .map_err(|e| format!("expected seconds, e.g. 2.5 or 2.5s: {e}"))?;
    if !(secs > 0.0 && secs.is_finite()) {
        return Err("must be a positive number of seconds".to_string());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The flags of `sim cluster`: the end-to-end scenario on real processes (see the README).
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Exit status: 0 when every check passed, 1 on a violation or an error, 130 when \
interrupted (Ctrl-C, SIGTERM, SIGHUP), 2 for bad flags. RUST_LOG sends this process's log to stderr and sets \
the children's filter (else logs go to DATA_DIR/logs).")]
pub struct ClusterFlags {
    /// How long the timed run lasts, in seconds (`60` or `60s`).
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = seconds)]
    pub duration: Duration,

    /// Table updates written per second.
    #[arg(long, value_name = "ROWS_PER_SEC", default_value_t = 2_000)]
    pub rate: u64,

    /// Replicas of the instance (at least 1).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub replicas: usize,

    /// Processes of every second replica (a timely cluster; the others have one).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub processes: usize,

    /// Timely workers per replica process.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub workers: usize,

    /// Concurrent peek loops.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub peekers: usize,

    /// Pause between one loop's peeks, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2)]
    pub peek_interval_ms: u64,

    /// Replica crashes (SIGKILL) to inject (default: 2, or 1 in runs under 30 s or with one replica).
    #[arg(long, value_name = "N")]
    pub kills: Option<usize>,

    /// Drops and recreations of a dataflow.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub recreations: usize,

    /// The workload's seed (default: drawn from the clock, printed).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,

    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,

    /// Where the controller serves its metrics (`/metrics`); port 0 picks a free one. Default
    /// 127.0.0.1:0; with --netns a loopback address becomes the controller's own (its namespace's
    /// loopback is not this machine's).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Write a report page with charts, report.json and every process's metrics into DIR.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,

    /// What the replicas maintain: `orders` (generated tables, six dataflows, a subscribe and a
    /// materialized view) or `tpch` (the 22 TPC-H views, checked against SQLite).
    #[arg(long, value_name = "orders|tpch", default_value = "orders")]
    pub workload: String,

    /// The TPC-H scale factor (`--workload tpch`), in (0, 10].
    #[arg(long, value_name = "SF", default_value_t = 0.01)]
    pub scale_factor: f64,

    /// The scenario's files (emptied at the start; default target/cluster-data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Plain TCP instead of TLS on every connection (the shared secret is still proved).
    #[arg(long)]
    pub insecure: bool,

    /// Storage: `embedded` (the default: shards on DATA_DIR/blob and the SQLite file
    /// DATA_DIR/consensus.db, opened by every process).
    #[arg(long, value_name = "embedded", help_heading = "Storage (one of)")]
    pub storage: Option<String>,

    /// Shards at these URLs, opened by every process: file:///DIR or s3://BUCKET/PREFIX?endpoint=URL&...
    /// (with --consensus; the stores must not hold the scenario's collections from an earlier run).
    #[arg(long, value_name = "URL", env = BLOB_URL_ENV, hide_env_values = true, help_heading = "Storage (one of)")]
    pub blob: Option<String>,

    /// The consensus store of --blob: sqlite:///FILE or postgres://...
    #[arg(long, value_name = "URL", env = CONSENSUS_URL_ENV, hide_env_values = true, help_heading = "Storage (one of)")]
    pub consensus: Option<String>,

    /// `local`: shards on a throwaway PostgreSQL and moto_server (S3) started for the run and stopped on
    /// every way out.
    #[arg(long, value_name = "local", help_heading = "Storage (one of)")]
    pub services: Option<String>,

    /// The part cache of every replica process, in bytes (`compute-replica --shard-part-cache-bytes`; 0
    /// turns it off, to compare). Only with shards. Default: the engine's, 64 MiB.
    #[arg(long, value_name = "BYTES", help_heading = "Storage (one of)")]
    pub shard_part_cache_bytes: Option<u64>,

    /// Appends whose run of a shard encodes to at most this many bytes ride inline in the shard's state
    /// (one compare-and-set, no blob put), in every process (`compute-replica --shard-inline-part-bytes`,
    /// the controller and the table writer); 0 turns that off, to compare. Default: the engine's, 4 KiB.
    #[arg(
        long,
        value_name = "BYTES",
        help_heading = "Storage (one of)",
        value_parser = clap::value_parser!(u64).range(0..=(storage::shard::MAX_INLINE_BYTES_LIMIT as u64))
    )]
    pub shard_inline_part_bytes: Option<u64>,

    /// Stop PostgreSQL / pause moto_server N times, alternating, consensus first, a replica killed during
    /// each while its view append is stuck (only with --services local; default there: 1, or 2 in runs of
    /// 30 s or more).
    #[arg(long, value_name = "N", help_heading = "Storage outages")]
    pub outages: Option<usize>,

    /// Each outage's length, in seconds, at most 20.
    #[arg(long, value_name = "S", default_value = "3", value_parser = seconds, help_heading = "Storage outages")]
    pub outage_secs: Duration,

    /// The services and every replica process each in a network namespace of its own, on a bridge with
    /// this process (only with --services local; needs root and iproute2); all removed at the end.
    #[arg(long, help_heading = "Separate hosts")]
    pub netns: bool,

    /// Take every link of one replica down N times (default with --netns: 1): peeks go on on the other
    /// replicas, and the replica must catch up after its links are back.
    #[arg(long, value_name = "N", help_heading = "Separate hosts")]
    pub link_cuts: Option<usize>,

    /// Listens in every process poll the consensus head only: the PostgreSQL push channel
    /// (LISTEN/NOTIFY) off, to measure what it buys (only with a PostgreSQL consensus).
    #[arg(long)]
    pub no_push: bool,

    /// Each link cut's length, in seconds, at most 20.
    #[arg(long, value_name = "S", default_value = "4", value_parser = seconds, help_heading = "Separate hosts")]
    pub link_cut_secs: Duration,
}
