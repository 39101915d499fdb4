//! Storage benchmarks, printed as `bench <name>: <value> <unit> (baseline <value> <unit>, ratio <r>)` lines
//! for `cargo xtask bench storage` (which runs `cargo bench -p storage --bench storage`).
//!
//! **What it measures.**
//! - `storage.append_rows_w{1,8,64}`: durable append throughput (rows of 100 bytes, 10 per append, one
//!   collection per writer) with 1, 8 and 64 concurrent writers, against a baseline measured in the same run
//!   in the same directory: plain sequential `write` + `fsync` of the same number of bytes with the same
//!   number of fsyncs (the physical limit of that cadence). The goal is a ratio of at least 0.5.
//! - `storage.restart_1m_rows_*`: the time to reopen a store whose log holds 1M updates of 100-byte rows
//!   (churn over about 10k live rows), first replaying the log, then after a checkpoint (ratio: after /
//!   before).
//!
//! - `storage.shard_*`: the shard engine on local files + SQLite and on S3 + PostgreSQL (appends against
//!   the engines' floor, listen latency with and without the push channel, a 1M-row snapshot against a raw
//!   blob read, space after compaction); see `benches/shards/mod.rs`.
//!
//! **What it is not.** Not a criterion bench (`harness = false`) and not simulated code, so it reads the
//! wall clock. Run it in release (`cargo bench` does). Data lives in a temporary directory on the same
//! filesystem as `std::env::temp_dir()`.

// A benchmark reports on stdout; `cargo xtask bench` reads it from there.
#![allow(clippy::print_stdout)]
// A benchmark measures wall-clock time; clippy.toml's clock rule is for simulated code.
#![allow(clippy::disallowed_methods)]

use std::io::Write;
use std::time::{Duration, Instant};

use frontiers::{Antichain, ReadPolicy};
use protocol::{ColumnType, Datum, GlobalId, RelationDesc, Row, ScalarType};
use storage::{AppendRequest, InProcess, StorageCollections, StoreConfig};

mod shards;

/// How long each throughput measurement runs.
const RUN: Duration = Duration::from_secs(3);
/// Rows per append in the throughput benchmark.
const ROWS_PER_APPEND: u64 = 10;
/// DESIGN/issue goal for the append throughput ratio.
const APPEND_RATIO_GOAL: f64 = 0.5;

fn desc() -> RelationDesc {
    RelationDesc::new([
        ("writer", ColumnType::new(ScalarType::Int64, false)),
        ("seq", ColumnType::new(ScalarType::Int64, false)),
        ("pad", ColumnType::new(ScalarType::Text, false)),
    ])
}

/// A row of exactly 100 encoded bytes.
fn row(writer: u64, seq: u64) -> Row {
    const PAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
    let row = Row::pack([Datum::Int64(writer as i64), Datum::Int64(seq as i64), Datum::Text(PAD)]);
    debug_assert_eq!(row.byte_len(), 100);
    row
}

fn append(id: GlobalId, updates: Vec<(Row, u64, i64)>, lower: u64, upper: u64) -> AppendRequest {
    AppendRequest {
        id,
        updates,
        expected_upper: Antichain::from_elem(lower),
        new_upper: Antichain::from_elem(upper),
    }
}

fn print_line(name: &str, value: f64, unit: &str, baseline: Option<(f64, &str)>) {
    match baseline {
        Some((base, base_unit)) => {
            let ratio = if base > 0.0 { value / base } else { 0.0 };
            println!("bench {name}: {value:.0} {unit} (baseline {base:.0} {base_unit}, ratio {ratio:.2})");
        }
        None => println!("bench {name}: {value:.0} {unit}"),
    }
    let _ = std::io::stdout().flush();
}

/// Durable append throughput with `writers` concurrent writers; returns (rows/s, commits, bytes, rows).
async fn append_throughput(writers: u64) -> (f64, u64, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = InProcess::open(dir.path(), StoreConfig::default()).unwrap();
    for w in 0..writers {
        store.create_collection(GlobalId::User(w), desc()).await.unwrap();
    }
    let before = store.durability_stats().unwrap_or_default();
    let start = Instant::now();
    let deadline = start + RUN;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = GlobalId::User(w);
            let mut t = 0u64;
            while Instant::now() < deadline {
                let rows = (0..ROWS_PER_APPEND).map(|i| (row(w, t * ROWS_PER_APPEND + i), t, 1)).collect();
                store.append(vec![append(id, rows, t, t + 1)]).await.unwrap();
                t += 1;
            }
            t * ROWS_PER_APPEND
        }));
    }
    let mut rows = 0;
    for task in tasks {
        rows += task.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = store.durability_stats().unwrap_or_default();
    store.shutdown().await;
    (rows as f64 / elapsed, after.commits - before.commits, after.bytes - before.bytes, rows)
}

/// The physical limit: `commits` sequential writes of `bytes / commits` bytes, each followed by an fsync.
fn baseline_seconds(commits: u64, bytes: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let mut file =
        std::fs::OpenOptions::new().create(true).append(true).open(dir.path().join("baseline")).unwrap();
    let chunk = vec![0x5au8; usize::try_from(bytes / commits.max(1)).unwrap()];
    let start = Instant::now();
    for _ in 0..commits {
        file.write_all(&chunk).unwrap();
        file.sync_data().unwrap();
    }
    start.elapsed().as_secs_f64()
}

async fn bench_appends() {
    for writers in [1u64, 8, 64] {
        let (rate, commits, bytes, rows) = append_throughput(writers).await;
        let baseline = rows as f64 / baseline_seconds(commits, bytes);
        print_line(&format!("storage.append_rows_w{writers}"), rate, "rows/s", Some((baseline, "rows/s")));
        if rate / baseline < APPEND_RATIO_GOAL {
            println!("warning: storage.append_rows_w{writers} is below the goal ratio {APPEND_RATIO_GOAL}");
        }
        println!(
            "note: w{writers}: {rows} rows in {commits} fsyncs ({:.1} appends per fsync)",
            rows as f64 / ROWS_PER_APPEND as f64 / commits.max(1) as f64
        );
    }
}

async fn bench_restart() {
    const UPDATES: u64 = 1_000_000;
    const PER_APPEND: u64 = 1_000;
    const LIVE_APPENDS: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { checkpoint_after_log_bytes: u64::MAX, ..StoreConfig::default() };
    let id = GlobalId::User(1);
    {
        let store = InProcess::open(dir.path(), config.clone()).unwrap();
        store.create_collection(id, desc()).await.unwrap();
        store
            .set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 1, granularity_ms: 0 })
            .await
            .unwrap();
        // Each append inserts 500 rows and retracts the 500 it inserted LIVE_APPENDS appends earlier.
        let half = PER_APPEND / 2;
        for t in 0..UPDATES / PER_APPEND {
            let mut updates: Vec<(Row, u64, i64)> = (0..half).map(|i| (row(1, t * half + i), t, 1)).collect();
            if t >= LIVE_APPENDS {
                let old = t - LIVE_APPENDS;
                updates.extend((0..half).map(|i| (row(1, old * half + i), t, -1)));
            }
            store.append(vec![append(id, updates, t, t + 1)]).await.unwrap();
        }
        store.shutdown().await;
    }
    let reopen = |dir: std::path::PathBuf, config: StoreConfig| {
        let start = Instant::now();
        let store = InProcess::open(dir, config).unwrap();
        (start.elapsed().as_secs_f64() * 1e3, store)
    };
    let (replay_ms, store) = reopen(dir.path().to_path_buf(), config.clone());
    let live = store.with_core(|core| core.stored_updates(id).unwrap());
    store.checkpoint().await.unwrap();
    store.shutdown().await;
    let (checkpoint_ms, store) = reopen(dir.path().to_path_buf(), config);
    assert_eq!(store.with_core(|core| core.stored_updates(id).unwrap()), live);
    store.shutdown().await;
    print_line("storage.restart_1m_rows_log_replay", replay_ms, "ms", None);
    print_line("storage.restart_1m_rows_after_checkpoint", checkpoint_ms, "ms", Some((replay_ms, "ms")));
    println!("note: {live} updates stored after compaction of 1M");
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter on the group names below.
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wants = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        if wants("append") {
            bench_appends().await;
        }
        if wants("restart") {
            bench_restart().await;
        }
        shards::run(&wants).await;
    });
}
