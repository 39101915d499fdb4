//! The `cluster` step of `cargo xtask test-suite`: a short run of the cluster scenario (`sim cluster`:
//! compute replicas as real processes, the controller in `sim`, all on the embedded shards (the default
//! storage: blob files and a SQLite consensus that every process opens), a live workload checked against an
//! oracle), failed on any violation and on too few checks. The short runs on PostgreSQL + S3 are in `sim`'s
//! `tests/it/cluster.rs`, part of the `test` step.
//!
//! **What it runs.** `cargo run -p sim -- cluster` in the dev profile (the `test` step already compiled
//! `sim` and `compute-replica` there; `sim cluster` builds the latter with its own profile, which finds
//! it up to date) with a fixed seed and shape ([`ARGS`]), and reads its `--json`
//! report from stdout. Its event lines go to stderr as they happen.
//!
//! **What it also checks.** The run writes its report page and the metrics it scraped from every process at
//! its end into [`REPORT_DIR`] (`--report`); then `sim check-report` validates every scrape with
//! `promtool check metrics` and renders the page in headless Chromium, checking the screenshot
//! (`sim::tools`; the tools are installed from Debian's packages where missing, and the step fails if
//! they cannot be). The page and its screenshot stay there for people to look at.
//!
//! **What it requires** ([`check_report`]): outcome `passed` with no violation (which covers the
//! scenario's own checks: every peek against the oracle, subscribe batches contiguous and equal to the
//! oracle, the materialized view, the replica kill and rehydration, the dataflow recreations, catching up
//! after the last write, and every child process gone after the cleanup), and at least [`MIN_PEEKS`]
//! peeks, [`MIN_SUBSCRIBE_BATCHES`] subscribe batches and [`MIN_VIEW_CHECKS`] materialized-view checks
//! compared with the oracle, and all [`FINAL_CHECKS`] full-contents comparisons after the last write. A run
//! that checked less than that proved little, whatever its exit code.
//!
//! **Cleanup.** `sim cluster` kills and reaps every process it started on every way out (its end, an
//! error, a panic, SIGINT, SIGTERM, SIGHUP) and verifies it; an interrupted suite interrupts it too (same
//! process group).
//!
//! Not here: the scenario (`crates/sim/src/cluster/`). **Tests:** the report checks, below.

use anyhow::{Context, bail};
use serde_json::Value;

use crate::cmd;

/// The scenario's arguments: about 20 s of workload, the default shape (two replicas, the second of two
/// processes, so a multi-process replica is exercised; one kill and three recreations at this length), a
/// fixed seed so a failure can be rerun, and the JSON report.
pub const ARGS: &[&str] = &[
    "cluster",
    "--duration",
    "20",
    "--seed",
    "1",
    "--replicas",
    "2",
    "--processes",
    "2",
    "--json",
    "--report",
    REPORT_DIR,
];

/// Where the run writes its report page and scraped metrics, relative to the project root.
pub const REPORT_DIR: &str = "target/cluster-report";

/// Peeks checked against the oracle, at least. Two peek loops issue one every few milliseconds: a 20 s
/// run on a loaded 2-core machine checked about 8,000; 500 still allows a machine several times slower,
/// while a peek path that stalls for most of the run fails.
pub const MIN_PEEKS: u64 = 500;

/// Subscribe batches checked against the oracle, at least. The writer appends every 20 ms; on the
/// embedded shards, whose listens poll every 20 ms, the subscribe delivered about 430 in 20 s; 100 means it kept flowing for a
/// good part of the run, through the replica kill.
pub const MIN_SUBSCRIBE_BATCHES: u64 = 100;

/// Materialized-view contents read from storage and checked, at least. The checker reads about five
/// times a second (about 100 in 20 s measured); 20 means the view kept being written and read back.
pub const MIN_VIEW_CHECKS: u64 = 20;

/// Full-contents comparisons after the last write, exactly: five indexes on each of the two replicas,
/// and the materialized view.
pub const FINAL_CHECKS: u64 = 5 * 2 + 1;

/// Runs the scenario and checks its report.
pub fn run() -> anyhow::Result<()> {
    let mut command = cmd::cargo();
    command.args(["run", "--package", "sim", "--locked", "--"]).args(ARGS);
    let (status, output) = cmd::run_capturing(&mut command)?;
    let report: Value = serde_json::from_str(&output)
        .with_context(|| format!("`sim cluster --json` ({status}) did not print a JSON report on stdout"))?;
    check_report(&report)?;
    if !status.success() {
        bail!("`sim cluster` exited with {status} although its report passes");
    }
    let mut check = cmd::cargo();
    check.args(["run", "--package", "sim", "--locked", "--", "check-report", REPORT_DIR]);
    cmd::run(&mut check).context("the report's metrics or page did not pass promtool and chromium")
}

fn number(report: &Value, pointer: &str) -> anyhow::Result<u64> {
    report
        .pointer(pointer)
        .and_then(Value::as_u64)
        .with_context(|| format!("the report has no number {pointer}"))
}

/// Checks a `sim cluster --json` report; see the module documentation.
pub fn check_report(report: &Value) -> anyhow::Result<()> {
    let outcome = report.get("outcome").and_then(Value::as_str).unwrap_or("missing");
    let violations = number(report, "/violation_count")?;
    if outcome != "passed" || violations > 0 {
        let described: Vec<&str> = report
            .get("violations")
            .and_then(Value::as_array)
            .map(|v| v.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let error = report.get("error").and_then(Value::as_str).unwrap_or("");
        bail!(
            "the cluster run ended `{outcome}` with {violations} violation(s): {} {error}",
            described.join("; ")
        );
    }
    let counts = [
        ("peeks", number(report, "/peeks/checked")?, MIN_PEEKS),
        ("subscribe batches", number(report, "/subscribe_batches")?, MIN_SUBSCRIBE_BATCHES),
        ("materialized-view checks", number(report, "/peeks/materialized_view_checked")?, MIN_VIEW_CHECKS),
        ("full-contents checks after the last write", number(report, "/final_checks")?, FINAL_CHECKS),
    ];
    for (what, count, minimum) in counts {
        if count < minimum {
            bail!("the cluster run checked {count} {what}; at least {minimum} are required");
        }
    }
    if number(report, "/child_processes")? == 0 {
        bail!("the cluster run recorded no child process, so none was checked gone after its cleanup");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcome: &str, violations: u64, peeks: u64, batches: u64, views: u64, finals: u64) -> Value {
        serde_json::json!({
            "outcome": outcome,
            "violation_count": violations,
            "violations": if violations > 0 { vec!["peek of u1 differs"] } else { vec![] },
            "error": null,
            "peeks": { "checked": peeks, "materialized_view_checked": views },
            "subscribe_batches": batches,
            "final_checks": finals,
            "child_processes": 4,
        })
    }

    #[test]
    fn a_report_passes_only_without_violations_and_with_enough_checks() {
        let enough = (MIN_PEEKS, MIN_SUBSCRIBE_BATCHES, MIN_VIEW_CHECKS, FINAL_CHECKS);
        let cases: [(Value, Option<&str>); 7] = [
            (report("passed", 0, enough.0, enough.1, enough.2, enough.3), None),
            (report("failed", 1, enough.0, enough.1, enough.2, enough.3), Some("peek of u1 differs")),
            (report("error", 0, enough.0, enough.1, enough.2, enough.3), Some("`error`")),
            (report("passed", 0, MIN_PEEKS - 1, enough.1, enough.2, enough.3), Some("peeks")),
            (report("passed", 0, enough.0, 0, enough.2, enough.3), Some("0 subscribe batches")),
            (report("passed", 0, enough.0, enough.1, 3, enough.3), Some("3 materialized-view checks")),
            (report("passed", 0, enough.0, enough.1, enough.2, FINAL_CHECKS - 1), Some("full-contents")),
        ];
        for (report, error) in cases {
            let result = check_report(&report);
            match error {
                None => assert!(result.is_ok(), "{report}: {result:?}"),
                Some(needle) => {
                    let message = format!("{:#}", result.expect_err("must fail"));
                    assert!(message.contains(needle), "`{message}` lacks `{needle}`");
                }
            }
        }
        let mut no_children = report("passed", 0, enough.0, enough.1, enough.2, enough.3);
        no_children["child_processes"] = 0.into();
        assert!(check_report(&no_children).is_err());
    }
}
