//! `cargo xtask test-suite` (alias `ci`): every check CI runs, in order, timed, stopping at the first failure.
//!
//! | step     | runs |
//! |----------|------|
//! | `fmt`    | `cargo fmt --all -- --check` |
//! | `clippy` | `cargo clippy --workspace --all-targets --locked -- -D warnings`, then storage's default build (`-p storage --lib`) |
//! | `tidy`   | [`crate::tidy::check`], in process (`cargo test -p xtask` runs it too) |
//! | `test`   | `cargo build --locked --bin compute-replica` (which the scenario tests run: built before, not by a test while others run), then `cargo nextest run --workspace --locked --no-fail-fast`, or without nextest `cargo test --workspace --lib --bins --tests --locked`, with `PROPTEST_CASES` |
//! | `doc`    | `cargo test --workspace --doc --locked` (nextest and `--all-targets` skip doctests) |
//! | `sim`    | the simulator on seeds `0..N` ([`crate::sim`], dev profile), its summary checked (every seed ran, peeks and subscribe batches compared); then the planted peek-hold bug, which seeds `0..32` must catch as a `peek-holds` violation |
//! | `cluster`| a 20 s `sim cluster` run ([`crate::cluster`], dev profile), failed on any violation and on fewer checks than its stated minimums |
//!
//! Modes: full (CI) is `PROPTEST_CASES=1024` and seeds `0..1000`; `--quick` is 64 cases and seeds `0..32`.
//! The cluster step is the same in both (its length is what makes it meaningful).
//! No step is ever reported as skipped: a step that cannot do its work fails.
//! "If `cargo xtask test-suite` passes locally, CI is green": `.ci/run` runs exactly this.
//!
//! Not here: what each check checks (that is clippy's, tidy's, the tests' business).

use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::flags::TestSuiteFlags;
use crate::sim::{self, Seeds};
use crate::{cluster, cmd, project_root, tidy};

/// One step of the suite. The order of the variants is the order the steps run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Formatting.
    Fmt,
    /// Lints, all targets, warnings denied.
    Clippy,
    /// The repository's own rules ([`crate::tidy`]).
    Tidy,
    /// Unit, integration and property tests.
    Test,
    /// Doctests.
    Doc,
    /// The deterministic simulator on a fixed seed range, and the planted bug.
    Sim,
    /// A short run of the cluster scenario on real processes.
    Cluster,
}

impl Step {
    /// Every step, in the order the suite runs them.
    pub const ALL: [Step; 7] =
        [Step::Fmt, Step::Clippy, Step::Tidy, Step::Test, Step::Doc, Step::Sim, Step::Cluster];

    /// The step's name on the command line and in the output.
    pub fn name(self) -> &'static str {
        match self {
            Step::Fmt => "fmt",
            Step::Clippy => "clippy",
            Step::Tidy => "tidy",
            Step::Test => "test",
            Step::Doc => "doc",
            Step::Sim => "sim",
            Step::Cluster => "cluster",
        }
    }

    /// The step called `name`, if any.
    pub fn from_name(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|step| step.name() == name)
    }
}

/// The parameters that differ between the full and the quick suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mode {
    /// `PROPTEST_CASES` for the `test` and `doc` steps.
    pub proptest_cases: u32,
    /// The seeds of the `sim` step.
    pub sim_seeds: Range<u64>,
}

impl Mode {
    /// The mode `flags` ask for.
    pub fn from_flags(flags: &TestSuiteFlags) -> Mode {
        let (cases, seeds) = if flags.quick { (64, 0..32) } else { (1024, 0..1000) };
        Mode { proptest_cases: flags.proptest_cases.unwrap_or(cases), sim_seeds: seeds }
    }
}

/// Runs the steps `flags` select, in suite order, and fails at the first failing step.
pub fn run(flags: &TestSuiteFlags) -> anyhow::Result<()> {
    let root = project_root();
    let mode = Mode::from_flags(flags);
    let steps: Vec<Step> =
        Step::ALL.into_iter().filter(|step| flags.only.is_empty() || flags.only.contains(step)).collect();
    println!(
        "test-suite: {} mode, PROPTEST_CASES={}, sim seeds {}..{}{}; steps: {}",
        if flags.quick { "quick" } else { "full" },
        mode.proptest_cases,
        mode.sim_seeds.start,
        mode.sim_seeds.end,
        if cmd::on_ci() { ", CI (CARGO_INCREMENTAL=0)" } else { "" },
        steps.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
    );

    let suite_start = Instant::now();
    let mut rows: Vec<(Step, String, Option<Duration>)> = Vec::new();
    let mut failure = None;
    for &step in &steps {
        if failure.is_some() {
            rows.push((step, "not run".into(), None));
            continue;
        }
        println!("\nstep {}: started", step.name());
        let start = Instant::now();
        let result = run_step(step, &root, &mode);
        let elapsed = start.elapsed();
        let outcome = match result {
            Ok(()) => "ok".to_owned(),
            Err(error) => {
                failure = Some((step, error));
                "FAILED".to_owned()
            }
        };
        println!("step {} ... {outcome} ({})", step.name(), seconds(elapsed));
        rows.push((step, outcome, Some(elapsed)));
    }

    println!("\ntest-suite summary:");
    for (step, outcome, elapsed) in &rows {
        let time = elapsed.map(seconds).unwrap_or_default();
        println!("  {:<8} {:>9}  {outcome}", step.name(), time);
    }
    println!("  {:<8} {:>9}", "total", seconds(suite_start.elapsed()));

    match failure {
        Some((step, error)) => bail!("step {} failed: {error:#}", step.name()),
        None => Ok(()),
    }
}

fn seconds(elapsed: Duration) -> String {
    format!("{:.1} s", elapsed.as_secs_f64())
}

fn run_step(step: Step, root: &Path, mode: &Mode) -> anyhow::Result<()> {
    match step {
        Step::Fmt => cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"])),
        Step::Clippy => cmd::run(cmd::cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]))
        // The tests build storage with every backend (its dev-dependencies); this lints its default build.
        .and_then(|()| {
            cmd::run(
                cmd::cargo().args(["clippy", "-p", "storage", "--lib", "--locked", "--", "-D", "warnings"]),
            )
        }),
        Step::Tidy => tidy::check(root),
        Step::Test => {
            // The scenario tests start `compute-replica` (dev profile, the workspace's features), which
            // nextest does not build: the first of them would build it, about two minutes of both cores
            // beside the timing-sensitive tests running then. Built here, their build finds it done.
            cmd::run(cmd::cargo().args(["build", "--locked", "--bin", "compute-replica"]))?;
            let mut command = cmd::cargo();
            if cmd::succeeds(cmd::cargo().args(["nextest", "--version"])) {
                command.args(["nextest", "run", "--workspace", "--locked", "--no-fail-fast"]);
            } else {
                println!("cargo-nextest not found: falling back to cargo test");
                command.args(["test", "--workspace", "--lib", "--bins", "--tests", "--locked"]);
            }
            cmd::run(command.env("PROPTEST_CASES", mode.proptest_cases.to_string()))
        }
        Step::Doc => cmd::run(
            cmd::cargo()
                .args(["test", "--workspace", "--doc", "--locked"])
                .env("PROPTEST_CASES", mode.proptest_cases.to_string()),
        ),
        Step::Sim => {
            let seeds = Some(Seeds::Range(mode.sim_seeds.clone()));
            sim::run(&seeds, sim::Profile::Dev, sim::Minimums::SWEEP)?;
            // The quick range must catch the planted peek-hold bug, whatever the mode.
            sim::run_planted(0..32)
        }
        Step::Cluster => cluster::run(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_round_trip_and_follow_the_suite_order() {
        for step in Step::ALL {
            assert_eq!(Step::from_name(step.name()), Some(step));
        }
        assert!(Step::ALL.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(Step::from_name("lint"), None);
        // The cluster run comes last: it needs the binaries the test step built.
        assert_eq!(Step::ALL.last(), Some(&Step::Cluster));
        assert_eq!(Step::from_name("cluster"), Some(Step::Cluster));
    }

    #[test]
    fn the_module_doc_table_lists_every_step_in_order() {
        let doc = include_str!("test_suite.rs");
        let rows: Vec<&str> = doc
            .lines()
            .filter_map(|line| line.strip_prefix("//! | `"))
            .filter_map(|rest| rest.split_once('`').map(|(name, _)| name))
            .collect();
        let names: Vec<&str> = Step::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(rows, names);
    }

    #[test]
    fn modes_pick_cases_and_seeds_and_the_flag_overrides_cases() {
        let cases = [
            (false, None, 1024, 0..1000),
            (true, None, 64, 0..32),
            (true, Some(5), 5, 0..32),
            (false, Some(5), 5, 0..1000),
        ];
        for (quick, proptest_cases, expected_cases, expected_seeds) in cases {
            let flags = TestSuiteFlags { quick, only: vec![], proptest_cases };
            let mode = Mode::from_flags(&flags);
            assert_eq!(mode, Mode { proptest_cases: expected_cases, sim_seeds: expected_seeds });
        }
    }
}
