//! `cargo xtask sim`: runs the deterministic simulator of `crates/sim` on one seed or a range of seeds.
//!
//! **The contract with `crates/sim`** (which its author implements): the `sim` binary has a subcommand
//! `simulate --seed S` / `simulate --seeds A..B` (B excluded) that prints each seed first, exits non-zero on
//! the first failing seed and prints `reproduce: cargo xtask sim --seed S` itself. Until that subcommand
//! exists, [`available`] says so and `test-suite` reports its `sim` step as skipped, never as passed.
//!
//! **Profiles.** An explicit `cargo xtask sim` (long sweeps, reproductions) builds in release, with debug
//! assertions and overflow checks switched back on so that a seed that failed an assertion in the suite
//! fails the same way here. Inside `test-suite` the step uses the dev profile instead: the `test` step has
//! already compiled every dependency of `sim` in that profile (test and dev share artefacts here, and
//! `[profile.dev.package."*"]` optimises dependencies), so the step only links the `sim` binary, whereas a
//! release build would compile timely, differential and tokio a second time. On 2 cores that is several
//! minutes of the ~30 minute budget for a clean clone plus the whole suite.
//!
//! Not here: the simulator itself, and any knowledge of what a seed means.

use std::ops::Range;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

use crate::cmd;

/// The source file that must mention [`MARKER`] for the simulator to be considered available.
pub const MAIN: &str = "crates/sim/src/main.rs";

/// The string whose presence in [`MAIN`] says the `simulate` subcommand exists: the literal (with its
/// quotes) that the sim binary's argument matching contains. The placeholder `main.rs` does not have it.
pub const MARKER: &str = "\"simulate\"";

/// Which seeds to simulate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seeds {
    /// `--seed S`.
    One(u64),
    /// `--seeds A..B`, B excluded; never empty.
    Range(Range<u64>),
}

impl Seeds {
    /// Parses `A..B` (B excluded), which must be non-empty.
    pub fn parse_range(text: &str) -> anyhow::Result<Seeds> {
        let Some((start, end)) = text.split_once("..") else {
            bail!("--seeds `{text}`: expected A..B");
        };
        let start: u64 = start.parse().with_context(|| format!("--seeds `{text}`: start"))?;
        let end: u64 = end.parse().with_context(|| format!("--seeds `{text}`: end"))?;
        if start >= end {
            bail!("--seeds `{text}` is empty (the end is excluded)");
        }
        Ok(Seeds::Range(start..end))
    }

    /// The arguments of the `simulate` subcommand.
    fn args(&self) -> Vec<String> {
        match self {
            Seeds::One(seed) => vec!["--seed".into(), seed.to_string()],
            Seeds::Range(range) => vec!["--seeds".into(), format!("{}..{}", range.start, range.end)],
        }
    }
}

/// The cargo profile to build the simulator in; see the module doc for which one is used where and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Release, with debug assertions and overflow checks on: explicit `cargo xtask sim` runs.
    Release,
    /// The dev profile: the `sim` step of `test-suite`, reusing the `test` step's artefacts.
    Dev,
}

/// Whether `crates/sim` has the `simulate` subcommand yet (see [`MARKER`]).
pub fn available(root: &Path) -> bool {
    std::fs::read_to_string(root.join(MAIN)).is_ok_and(|text| text.contains(MARKER))
}

/// Runs the simulator on `seeds` (a random seed, printed first, when `None`).
pub fn run(root: &Path, seeds: &Option<Seeds>, profile: Profile) -> anyhow::Result<()> {
    if !available(root) {
        bail!("crates/sim has no simulator yet ({MAIN} does not contain {MARKER})");
    }
    let seeds = match seeds {
        Some(seeds) => seeds.clone(),
        None => {
            let seed = random_seed();
            println!("sim: no seed given, picked --seed {seed}");
            Seeds::One(seed)
        }
    };
    let mut command = cmd::cargo();
    command.arg("run");
    if profile == Profile::Release {
        command
            .arg("--release")
            .env("CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS", "true")
            .env("CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS", "true");
    }
    command.args(["--package", "sim", "--locked", "--", "simulate"]).args(seeds.args());
    cmd::run(&mut command)
}

/// Proves the simulator can fail: builds the controller with the reference lineage's peek-hold bug planted
/// (`--features planted-bug`) and requires some seed of `seeds` to find it.
pub fn run_planted(seeds: std::ops::Range<u64>) -> anyhow::Result<()> {
    let mut command = cmd::cargo();
    command
        .args([
            "run",
            "--package",
            "sim",
            "--locked",
            "--features",
            "planted-bug",
            "--",
            "simulate",
            "--expect-failure",
        ])
        .arg("--seeds")
        .arg(format!("{}..{}", seeds.start, seeds.end));
    cmd::run(&mut command)
}

/// A seed from the clock, for an exploratory run (VOPR style); it is printed, so the run can be repeated.
fn random_seed() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    // Fold the 128-bit nanosecond count and mix it, so consecutive runs get unrelated seeds.
    let mut x = (nanos as u64) ^ ((nanos >> 64) as u64) ^ u64::from(std::process::id());
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}
