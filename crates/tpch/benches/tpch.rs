//! `cargo xtask bench tpch`: TPC-H on a replica process against SQLite recomputing the same queries.
//!
//! Figures (each `bench <name>: <value> <unit> (baseline <value> <unit>, ratio <r>)`):
//! - `tpch.hydration_all`: hydrating the 22 views together, against SQLite computing the 22 queries
//!   once on the same data;
//! - `tpch.maintenance_all`: maintaining the 22 views through one refresh batch (the median of a few:
//!   from the append to every index complete at its time), against SQLite recomputing the 22 queries
//!   after that batch (the work a non-incremental engine does); the goal is a ratio of at most 0.1;
//! - `tpch.qNN_maintenance`: the same per query, each view alone on the replica;
//! - `tpch.replica_peak_rss_sfX`: the replica process's peak RSS holding all 22 views at scale factor
//!   `X`, against the size of the data (the initial tables' row encodings).
//!
//! Every answer the benchmark reads is checked against SQLite's (`tpch::sqlite::semantics`), so a fast
//! wrong answer fails it. `TPCH_BENCH_SCALE_FACTOR` (default 0.1) sets the scale of the time figures,
//! `TPCH_BENCH_RSS_SCALE_FACTORS` (default `0.01,0.1`) those of the memory ones, `TPCH_BENCH_REFRESHES`
//! (default 3) the batches measured per figure.

// A benchmark reports on its terminal and measures wall-clock time.
#![allow(clippy::print_stdout, clippy::disallowed_methods)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tpch::sqlite::{Oracle, semantics};
use tpch::{Catalog, Data, Query, ReplicaKind, Runner};

const LIMIT: Duration = Duration::from_secs(1800);

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The `compute-replica` binary of this build, built in release first (a no-op when it is fresh).
fn replica_binary() -> PathBuf {
    let (binary, note) =
        test_support::cargo::release_binary("compute", "compute-replica").unwrap_or_else(|e| panic!("{e}"));
    if let Some(note) = note {
        println!("  ({note})");
    }
    binary
}

fn report(name: &str, value: f64, unit: &str, baseline: f64, baseline_unit: &str) {
    let ratio = value / baseline;
    println!("bench {name}: {value:.3} {unit} (baseline {baseline:.3} {baseline_unit}, ratio {ratio:.4})");
}

/// Checks every query's answer at `time` against SQLite's and returns SQLite's time to compute them.
async fn check(runner: &Runner, oracle: &Oracle, queries: &[Query], time: u64) -> Duration {
    let mut sqlite = Duration::ZERO;
    for query in queries {
        let answer = runner.peek(query, time).await.expect("peek");
        let start = Instant::now();
        let expected = oracle.query(query.sql).expect("SQLite runs the query");
        sqlite += start.elapsed();
        let global = query.finishing.order_by.is_empty() && query.typ.arity() == 1;
        if let Err(report) = semantics::compare(&answer, &expected, &query.typ.column_types, global) {
            panic!("Q{} at {time} disagrees with SQLite: {report}", query.number);
        }
    }
    sqlite
}

/// Applies `count` refresh batches from `batches`, measuring for each the maintenance of `queries` and
/// SQLite's recomputation of them; returns the medians.
async fn maintain(
    runner: &mut Runner,
    oracle: &mut Oracle,
    queries: &[Query],
    batches: &mut impl Iterator<Item = tpch::Refresh>,
    count: usize,
) -> (Duration, Duration) {
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..count {
        let batch = batches.next().expect("enough refresh batches");
        let start = Instant::now();
        let time = runner.refresh(&batch).await.expect("refresh");
        runner.wait_until_complete(queries, time, LIMIT).await.expect("maintained");
        ours.push(start.elapsed());
        oracle.apply(&batch).expect("SQLite applies the batch");
        theirs.push(check(runner, oracle, queries, time).await);
    }
    (test_support::median(&mut ours), test_support::median(&mut theirs))
}

async fn bench_time(binary: PathBuf) {
    let sf: f64 = env("TPCH_BENCH_SCALE_FACTOR", 0.1);
    let refreshes: usize = env("TPCH_BENCH_REFRESHES", 3);
    let catalog = Catalog::new(0);
    let queries = tpch::all(catalog, 0);
    let data = Data::generate(sf, refreshes * (queries.len() + 1));
    println!(
        "scale factor {sf}: {} rows, {} refresh batches of about {} updates",
        data.rows(),
        data.refreshes.len(),
        data.refreshes[0].inserts.len() + data.refreshes[0].deletes.len()
    );
    let mut oracle = Oracle::load(&data).expect("SQLite");
    let mut runner =
        Runner::start(catalog, ReplicaKind::Process { binary, workers: 1 }).await.expect("runner");
    runner.load(&data).await.expect("load");
    let mut batches = data.refreshes.iter().cloned();

    let start = Instant::now();
    runner.install(&queries).await.expect("install");
    runner.wait_until_complete(&queries, runner.latest_time(), LIMIT).await.expect("hydrated");
    let hydration = start.elapsed();
    let sqlite_once = check(&runner, &oracle, &queries, runner.latest_time()).await;
    report(
        &format!("tpch.hydration_all_sf{sf}"),
        hydration.as_secs_f64(),
        "s",
        sqlite_once.as_secs_f64(),
        "s",
    );

    let (ours, theirs) = maintain(&mut runner, &mut oracle, &queries, &mut batches, refreshes).await;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    report(&format!("tpch.maintenance_all_sf{sf}"), ms(ours), "ms", ms(theirs), "ms");
    if ours.as_secs_f64() > 0.1 * theirs.as_secs_f64() {
        println!(
            "  WARNING: maintaining a refresh batch is {:.2}x SQLite's recomputation (goal: 0.1x)",
            ours.as_secs_f64() / theirs.as_secs_f64()
        );
    }
    runner.uninstall(&queries).await.expect("uninstall");

    for index in 0..queries.len() {
        // Each view alone, under ids of its own (dropped ids are not reused).
        let views = Catalog { tables: catalog.tables, views: 1_000_000 * (index as u64 + 1) };
        let query = tpch::all(views, 0).swap_remove(index);
        let one = std::slice::from_ref(&query);
        runner.install(one).await.expect("install");
        runner.wait_until_complete(one, runner.latest_time(), LIMIT).await.expect("hydrated");
        let (ours, theirs) = maintain(&mut runner, &mut oracle, one, &mut batches, refreshes).await;
        report(&format!("tpch.q{:02}_maintenance_sf{sf}", query.number), ms(ours), "ms", ms(theirs), "ms");
        runner.uninstall(one).await.expect("uninstall");
    }
    runner.shutdown().await;
}

async fn bench_memory(binary: PathBuf) {
    let scale_factors: String = env("TPCH_BENCH_RSS_SCALE_FACTORS", "0.01,0.1".to_string());
    for sf in scale_factors.split(',').filter_map(|s| s.trim().parse::<f64>().ok()) {
        let catalog = Catalog::new(0);
        let queries = tpch::all(catalog, 0);
        let data = Data::generate(sf, 0);
        let mut runner = Runner::start(catalog, ReplicaKind::Process { binary: binary.clone(), workers: 1 })
            .await
            .expect("runner");
        runner.load(&data).await.expect("load");
        runner.install(&queries).await.expect("install");
        runner.wait_until_complete(&queries, runner.latest_time(), LIMIT).await.expect("hydrated");
        let pid = runner.replica_pid().expect("a replica process");
        let peak = test_support::memory::peak_rss_bytes(pid).expect("/proc/<pid>/status has VmHWM");
        let resident = test_support::memory::rss_bytes(pid).expect("/proc/<pid>/status has VmRSS");
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        let data_bytes = data.encoded_bytes() as u64;
        report(&format!("tpch.replica_peak_rss_sf{sf}"), mib(peak), "MiB", mib(data_bytes), "MiB");
        report(&format!("tpch.replica_rss_hydrated_sf{sf}"), mib(resident), "MiB", mib(data_bytes), "MiB");
        runner.shutdown().await;
    }
}

fn main() {
    let binary = replica_binary();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let only = std::env::var("TPCH_BENCH").ok();
    let run = |name: &str| only.as_deref().is_none_or(|only| only == name);
    if run("time") {
        runtime.block_on(bench_time(binary.clone()));
    }
    if run("memory") {
        runtime.block_on(bench_memory(binary));
    }
}
