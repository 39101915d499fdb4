//! `cargo xtask sim`: runs the deterministic simulator of `crates/sim` on one seed or a range of seeds, and
//! checks that it did what it says.
//!
//! **The contract with `crates/sim`.** `sim simulate --seed S` / `--seeds A..B` (B excluded) prints each
//! seed first, a line per failing seed with `reproduce: cargo xtask sim --seed S`, and last a line
//! `summary {json}` (see `crates/sim/src/main.rs`). An exit code of 0 is not enough here: the summary
//! must be there, say `ok`, and say that every seed ran ([`Summary::check`]); in the suite it must also
//! have compared a non-zero number of peeks and subscribe batches with the oracle, so a simulator that
//! silently checks nothing fails the step.
//!
//! **The planted bug** ([`run_planted`]): the controller built with `--features planted-bug` releases a
//! peek's read hold with the first answer (the reference lineage's historical bug), and the simulator must
//! find it as the violation that bug causes ([`PLANTED_BUG_VIOLATIONS`]), not as any failure: every seed
//! runs, some must fail, and every one that fails must fail with that kind.
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
//! **Tests:** the summary checks, below.

use std::ops::Range;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::cmd;

/// The violation kinds (`sim`'s `Invariant` names) the planted peek-hold bug causes: a peek's hold is
/// released while a replica still owes the answer (DESIGN §5.3), which the simulator sees from the
/// replicas' side in the step the hold goes.
pub const PLANTED_BUG_VIOLATIONS: &[&str] = &["peek-holds"];

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

    /// How many seeds.
    fn count(&self) -> u64 {
        match self {
            Seeds::One(_) => 1,
            Seeds::Range(range) => range.end - range.start,
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

/// What a run must show beyond "ok, every seed ran".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Minimums {
    /// Peeks compared with the oracle, over all seeds.
    pub peeks: u64,
    /// Subscribe batches compared with the oracle, over all seeds.
    pub batches: u64,
}

impl Minimums {
    /// Nothing beyond "ok": a single seed may have no subscribe at all.
    pub const NONE: Minimums = Minimums { peeks: 0, batches: 0 };
    /// The suite's range: a sweep that compared no peek or no subscribe batch checked nothing of what it
    /// is for, whatever its exit code.
    pub const SWEEP: Minimums = Minimums { peeks: 1, batches: 1 };
}

/// The simulator's `summary` line, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary(Value);

impl Summary {
    /// The JSON after the last `summary ` line of `output`.
    pub fn parse(output: &str) -> anyhow::Result<Summary> {
        let Some(json) = output.lines().rev().find_map(|line| line.strip_prefix("summary ")) else {
            bail!("the simulator printed no `summary` line");
        };
        let value: Value = serde_json::from_str(json).context("the simulator's summary line is not JSON")?;
        Ok(Summary(value))
    }

    fn number(&self, field: &str) -> anyhow::Result<u64> {
        self.0
            .get(field)
            .and_then(Value::as_u64)
            .with_context(|| format!("the summary has no number `{field}`"))
    }

    fn list(&self, field: &str) -> anyhow::Result<&Vec<Value>> {
        self.0
            .get(field)
            .and_then(Value::as_array)
            .with_context(|| format!("the summary has no list `{field}`"))
    }

    /// The kinds of the failing seeds' violations, in seed order.
    fn failed_kinds(&self) -> anyhow::Result<Vec<(u64, String)>> {
        self.list("failed")?
            .iter()
            .map(|failure| {
                let seed = failure.get("seed").and_then(Value::as_u64);
                let kind = failure.get("kind").and_then(Value::as_str);
                match (seed, kind) {
                    (Some(seed), Some(kind)) => Ok((seed, kind.to_owned())),
                    _ => bail!("a failed seed in the summary has no seed or kind: {failure}"),
                }
            })
            .collect()
    }

    /// Checks a normal run: `ok`, all `seeds` ran, nothing failed or panicked, and at least `minimums`.
    pub fn check(&self, seeds: u64, minimums: Minimums) -> anyhow::Result<()> {
        let (requested, ran) = (self.number("seeds")?, self.number("ran")?);
        if requested != seeds {
            bail!("the simulator was asked for {seeds} seeds but reports {requested}");
        }
        if let Some((seed, kind)) = self.failed_kinds()?.first() {
            bail!("seed {seed} failed ({kind}); reproduce: cargo xtask sim --seed {seed}");
        }
        if let Some(seed) = self.list("panicked")?.first() {
            bail!("seed {seed} panicked; reproduce: cargo xtask sim --seed {seed}");
        }
        if ran != seeds {
            bail!("only {ran} of {seeds} seeds ran");
        }
        if self.0.get("ok") != Some(&Value::Bool(true)) {
            bail!("the simulator's summary does not say ok");
        }
        let (peeks, batches) = (self.number("peeks_checked")?, self.number("batches_checked")?);
        if peeks < minimums.peeks || batches < minimums.batches {
            bail!(
                "{seeds} seeds compared {peeks} peeks and {batches} subscribe batches with the oracle; at least {} and {} were required",
                minimums.peeks,
                minimums.batches
            );
        }
        Ok(())
    }

    /// Checks a planted-bug run: every one of `seeds` ran (none panicked), some failed, and every failure
    /// is of one of the `expected` kinds.
    pub fn check_planted(&self, seeds: u64, expected: &[&str]) -> anyhow::Result<()> {
        let ran = self.number("ran")?;
        if let Some(seed) = self.list("panicked")?.first() {
            bail!("with the planted bug, seed {seed} panicked instead of reporting a violation");
        }
        if ran != seeds {
            bail!("with the planted bug, only {ran} of {seeds} seeds ran");
        }
        let failed = self.failed_kinds()?;
        if failed.is_empty() {
            bail!("no seed found the planted bug: the simulator is blind to it");
        }
        if let Some((seed, kind)) = failed.iter().find(|(_, kind)| !expected.contains(&kind.as_str())) {
            bail!(
                "with the planted bug, seed {seed} failed with a violation of `{kind}`, not of {}: the plant was not what it caught",
                expected.join(" or ")
            );
        }
        if self.0.get("ok") != Some(&Value::Bool(true)) {
            bail!("the simulator's summary does not say ok");
        }
        Ok(())
    }
}

/// Runs the simulator on `seeds` (a random seed, printed first, when `None`) and checks its summary
/// against `minimums`.
pub fn run(seeds: &Option<Seeds>, profile: Profile, minimums: Minimums) -> anyhow::Result<()> {
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
    let (status, output) = cmd::run_capturing(&mut command)?;
    let summary = Summary::parse(&output);
    match summary {
        Ok(summary) => summary.check(seeds.count(), minimums)?,
        Err(error) if status.success() => return Err(error),
        Err(_) => bail!("the simulator failed ({status}) before its summary"),
    }
    if !status.success() {
        bail!("the simulator exited with {status} although its summary says ok");
    }
    Ok(())
}

/// Proves the simulator can fail for the right reason: builds the controller with the reference lineage's
/// peek-hold bug planted (`--features planted-bug`) and requires the seeds to find it as
/// [`PLANTED_BUG_VIOLATIONS`].
pub fn run_planted(seeds: Range<u64>) -> anyhow::Result<()> {
    let mut command = cmd::cargo();
    command
        .args(["run", "--package", "sim", "--locked", "--features", "planted-bug", "--", "simulate"])
        .arg("--seeds")
        .arg(format!("{}..{}", seeds.start, seeds.end))
        .arg("--expect-violation")
        .arg(PLANTED_BUG_VIOLATIONS.join(","));
    let (status, output) = cmd::run_capturing(&mut command)?;
    Summary::parse(&output)?.check_planted(seeds.end - seeds.start, PLANTED_BUG_VIOLATIONS)?;
    if !status.success() {
        bail!("the simulator exited with {status} although its summary says it found the planted bug");
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(json: &str) -> Summary {
        Summary::parse(&format!("seeds 0..4\nsome line\nsummary {json}\n")).expect("parses")
    }

    const GOOD: &str = r#"{"seeds":4,"ran":4,"panicked":[],"failed":[],"violations":{},"peeks_checked":9,"batches_checked":3,"ok":true}"#;

    #[test]
    fn a_normal_run_passes_only_if_every_seed_ran_and_something_was_checked() {
        let cases: [(&str, Minimums, Option<&str>); 7] = [
            (GOOD, Minimums::SWEEP, None),
            (
                r#"{"seeds":4,"ran":2,"panicked":[],"failed":[{"seed":1,"step":5,"kind":"results"}],"peeks_checked":9,"batches_checked":3,"ok":false}"#,
                Minimums::SWEEP,
                Some("seed 1 failed (results)"),
            ),
            (
                r#"{"seeds":4,"ran":3,"panicked":[2],"failed":[],"peeks_checked":9,"batches_checked":3,"ok":false}"#,
                Minimums::SWEEP,
                Some("seed 2 panicked"),
            ),
            (
                r#"{"seeds":4,"ran":3,"panicked":[],"failed":[],"peeks_checked":9,"batches_checked":3,"ok":true}"#,
                Minimums::SWEEP,
                Some("only 3 of 4 seeds ran"),
            ),
            (
                r#"{"seeds":4,"ran":4,"panicked":[],"failed":[],"peeks_checked":9,"batches_checked":0,"ok":true}"#,
                Minimums::SWEEP,
                Some("0 subscribe batches"),
            ),
            (
                r#"{"seeds":4,"ran":4,"panicked":[],"failed":[],"peeks_checked":0,"batches_checked":0,"ok":true}"#,
                Minimums::NONE,
                None,
            ),
            (
                r#"{"seeds":4,"ran":4,"panicked":[],"failed":[],"peeks_checked":9,"batches_checked":3,"ok":false}"#,
                Minimums::SWEEP,
                Some("does not say ok"),
            ),
        ];
        for (json, minimums, error) in cases {
            let result = summary(json).check(4, minimums);
            match error {
                None => assert!(result.is_ok(), "{json}: {result:?}"),
                Some(needle) => {
                    let message = format!("{:#}", result.expect_err(json));
                    assert!(message.contains(needle), "{json}: `{message}` lacks `{needle}`");
                }
            }
        }
        assert!(summary(GOOD).check(5, Minimums::SWEEP).is_err(), "a different number of seeds");
    }

    #[test]
    fn a_planted_run_passes_only_if_the_failures_are_the_plants() {
        let planted = |failed: &str, panicked: &str, ran: u64| {
            format!(
                r#"{{"seeds":4,"ran":{ran},"panicked":[{panicked}],"failed":[{failed}],"peeks_checked":9,"batches_checked":3,"ok":true}}"#
            )
        };
        let hold = r#"{"seed":1,"step":9,"kind":"peek-holds"}"#;
        let other = r#"{"seed":2,"step":9,"kind":"controller-self-check"}"#;
        let cases: [(String, Option<&str>); 5] = [
            (planted(hold, "", 4), None),
            (planted("", "", 4), Some("blind")),
            (planted(&format!("{hold},{other}"), "", 4), Some("`controller-self-check`")),
            (planted(hold, "3", 3), Some("seed 3 panicked")),
            (planted(hold, "", 2), Some("only 2 of 4")),
        ];
        for (json, error) in cases {
            let result = summary(&json).check_planted(4, PLANTED_BUG_VIOLATIONS);
            match error {
                None => assert!(result.is_ok(), "{json}: {result:?}"),
                Some(needle) => {
                    let message = format!("{:#}", result.expect_err(&json));
                    assert!(message.contains(needle), "{json}: `{message}` lacks `{needle}`");
                }
            }
        }
    }

    #[test]
    fn output_without_a_summary_line_is_an_error() {
        assert!(Summary::parse("seeds 0..4\n4 seeds ok\n").is_err());
        assert!(Summary::parse("summary {not json\n").is_err());
    }
}
