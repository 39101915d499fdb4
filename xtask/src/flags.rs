//! Hand-parsed command-line arguments of `cargo xtask`.
//!
//! Not clap or xflags: the grammar is four subcommands with a handful of flags, and xtask avoids
//! dependencies. Flags take their value as the next argument or after `=` (`--only fmt` or `--only=fmt`).
//! Unknown subcommands, flags and values are errors that print the usage.

use anyhow::{Context, anyhow, bail};

use crate::bench;
use crate::sim::Seeds;
use crate::test_suite::Step;

/// What `cargo xtask help` prints.
pub const USAGE: &str = "\
usage: cargo xtask <task> [flags]

tasks:
  test-suite (alias: ci) [--quick] [--only STEP[,STEP...]]... [--proptest-cases N]
      Runs the steps fmt, clippy, tidy, test, doc, sim, cluster in this order and stops at the first
      failure. Full mode: PROPTEST_CASES=1024 and sim seeds 0..1000; --quick: 64 cases and seeds 0..32.
      The cluster step is a 20 s `sim cluster` run in both modes.
  tidy
      Checks //! docs, the crate dependency table of DESIGN §4, and banned constructs.
  bench [GROUP...]
      Runs the benchmark groups (default: all of frontiers, storage, compute, replica-client,
      controller) in release and writes target/bench.md.
  sim [--seed S | --seeds A..B]
      Runs the deterministic simulator in release (with debug assertions) on one seed, on the seeds
      A..B (B excluded), or on a random seed it prints first.
  help
      Prints this text.
";

/// A parsed `cargo xtask` invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    /// `cargo xtask test-suite` / `cargo xtask ci`.
    TestSuite(TestSuiteFlags),
    /// `cargo xtask tidy`.
    Tidy,
    /// `cargo xtask bench [GROUP...]`; `groups` is never empty (no group named means all of them).
    Bench {
        /// The groups to run, in the order given.
        groups: Vec<String>,
    },
    /// `cargo xtask sim`; `seeds` is `None` when the caller wants a random seed.
    Sim {
        /// The seeds to simulate.
        seeds: Option<Seeds>,
    },
    /// `cargo xtask help`, `--help` or `-h`.
    Help,
}

/// The flags of `test-suite`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestSuiteFlags {
    /// `--quick`: fewer proptest cases and sim seeds.
    pub quick: bool,
    /// `--only`: the steps to run (they still run in the suite's order); empty means all.
    pub only: Vec<Step>,
    /// `--proptest-cases N`: overrides the mode's `PROPTEST_CASES`.
    pub proptest_cases: Option<u32>,
}

/// Parses the arguments after `cargo xtask`.
pub fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Task> {
    let mut args = Args { rest: args.into_iter().collect::<Vec<_>>().into_iter() };
    let Some(task) = args.next() else {
        bail!("no task given\n\n{USAGE}");
    };
    let task = match task.as_str() {
        "test-suite" | "ci" => Task::TestSuite(parse_test_suite(&mut args)?),
        "tidy" => Task::Tidy,
        "bench" => parse_bench(&mut args)?,
        "sim" => parse_sim(&mut args)?,
        "help" | "--help" | "-h" => Task::Help,
        other => bail!("unknown task `{other}`\n\n{USAGE}"),
    };
    if let Some(extra) = args.next() {
        bail!("unexpected argument `{extra}`\n\n{USAGE}");
    }
    Ok(task)
}

fn parse_test_suite(args: &mut Args) -> anyhow::Result<TestSuiteFlags> {
    let mut flags = TestSuiteFlags::default();
    while let Some(arg) = args.next() {
        let (name, inline) = split_flag(&arg);
        match name {
            "--quick" => flags.quick = true,
            "--only" => {
                for step in args.value(name, inline)?.split(',').filter(|s| !s.is_empty()) {
                    let step = Step::from_name(step).ok_or_else(|| {
                        anyhow!("unknown step `{step}` (steps: {})", Step::ALL.map(Step::name).join(", "))
                    })?;
                    if !flags.only.contains(&step) {
                        flags.only.push(step);
                    }
                }
            }
            "--proptest-cases" => {
                let value = args.value(name, inline)?;
                let cases = value.parse().with_context(|| format!("--proptest-cases `{value}`"))?;
                flags.proptest_cases = Some(cases);
            }
            _ => bail!("unknown flag `{arg}` for test-suite\n\n{USAGE}"),
        }
    }
    Ok(flags)
}

fn parse_bench(args: &mut Args) -> anyhow::Result<Task> {
    let mut groups = Vec::new();
    for group in args.by_ref() {
        if !bench::GROUPS.iter().any(|g| g.name == group) {
            let known: Vec<&str> = bench::GROUPS.iter().map(|g| g.name).collect();
            bail!("unknown bench group `{group}` (groups: {})", known.join(", "));
        }
        if !groups.contains(&group) {
            groups.push(group);
        }
    }
    if groups.is_empty() {
        groups = bench::GROUPS.iter().map(|g| g.name.to_owned()).collect();
    }
    Ok(Task::Bench { groups })
}

fn parse_sim(args: &mut Args) -> anyhow::Result<Task> {
    let mut seeds = None;
    while let Some(arg) = args.next() {
        let (name, inline) = split_flag(&arg);
        let parsed = match name {
            "--seed" => {
                let value = args.value(name, inline)?;
                Seeds::One(value.parse().with_context(|| format!("--seed `{value}`"))?)
            }
            "--seeds" => Seeds::parse_range(&args.value(name, inline)?)?,
            _ => bail!("unknown flag `{arg}` for sim\n\n{USAGE}"),
        };
        if seeds.replace(parsed).is_some() {
            bail!("give one of --seed S or --seeds A..B, once");
        }
    }
    Ok(Task::Sim { seeds })
}

/// Splits `--flag=value` into `("--flag", Some("value"))`; anything else is `(arg, None)`.
fn split_flag(arg: &str) -> (&str, Option<String>) {
    match arg.split_once('=') {
        Some((name, value)) if name.starts_with("--") => (name, Some(value.to_owned())),
        _ => (arg, None),
    }
}

struct Args {
    rest: std::vec::IntoIter<String>,
}

impl Args {
    /// The value of flag `name`: the inline `=value`, or else the next argument.
    fn value(&mut self, name: &str, inline: Option<String>) -> anyhow::Result<String> {
        match inline {
            Some(value) => Ok(value),
            None => self.rest.next().ok_or_else(|| anyhow!("{name} needs a value")),
        }
    }
}

impl Iterator for Args {
    type Item = String;
    fn next(&mut self) -> Option<String> {
        self.rest.next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(line: &str) -> anyhow::Result<Task> {
        parse(line.split_whitespace().map(str::to_owned))
    }

    fn suite(quick: bool, only: &[Step], proptest_cases: Option<u32>) -> Task {
        Task::TestSuite(TestSuiteFlags { quick, only: only.to_vec(), proptest_cases })
    }

    #[test]
    fn valid_invocations_parse_to_their_task() {
        let all_groups: Vec<String> = bench::GROUPS.iter().map(|g| g.name.to_owned()).collect();
        let cases: Vec<(&str, Task)> = vec![
            ("test-suite", suite(false, &[], None)),
            ("ci --quick", suite(true, &[], None)),
            ("ci --only fmt --only=tidy,test", suite(false, &[Step::Fmt, Step::Tidy, Step::Test], None)),
            ("ci --only fmt,fmt", suite(false, &[Step::Fmt], None)),
            ("ci --only cluster", suite(false, &[Step::Cluster], None)),
            ("ci --quick --only sim,cluster", suite(true, &[Step::Sim, Step::Cluster], None)),
            ("ci --proptest-cases 7 --quick", suite(true, &[], Some(7))),
            ("ci --proptest-cases=9", suite(false, &[], Some(9))),
            ("tidy", Task::Tidy),
            ("bench", Task::Bench { groups: all_groups }),
            (
                "bench controller frontiers",
                Task::Bench { groups: vec!["controller".into(), "frontiers".into()] },
            ),
            ("sim", Task::Sim { seeds: None }),
            ("sim --seed 42", Task::Sim { seeds: Some(Seeds::One(42)) }),
            ("sim --seeds 3..10", Task::Sim { seeds: Some(Seeds::Range(3..10)) }),
            ("sim --seeds=0..1000", Task::Sim { seeds: Some(Seeds::Range(0..1000)) }),
            ("help", Task::Help),
            ("--help", Task::Help),
        ];
        for (line, expected) in cases {
            assert_eq!(parse_str(line).unwrap(), expected, "parsing `{line}`");
        }
    }

    #[test]
    fn invalid_invocations_are_errors_naming_the_problem() {
        let cases = [
            ("", "no task"),
            ("build", "unknown task `build`"),
            ("ci --only lint", "unknown step `lint`"),
            ("ci --only", "--only needs a value"),
            ("ci --proptest-cases many", "--proptest-cases `many`"),
            ("ci --release", "unknown flag `--release`"),
            ("bench sim", "unknown bench group `sim`"),
            ("sim --seed 1 --seed 2", "once"),
            ("sim --seeds 5..3", "empty"),
            ("sim --seeds 5", "A..B"),
            ("tidy now", "unexpected argument `now`"),
        ];
        for (line, needle) in cases {
            let error = format!("{:#}", parse_str(line).unwrap_err());
            assert!(error.contains(needle), "`{line}` gave `{error}`, expected it to mention `{needle}`");
        }
    }
}
