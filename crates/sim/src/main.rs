//! The `sim` binary: `sim simulate --seed S | --seeds A..B` (deterministic simulation; what
//! `cargo xtask sim` runs), `sim cluster` (the end-to-end scenario on real processes) and
//! `sim check-report DIR` (promtool and Chromium on what `sim cluster --report DIR` wrote; `sim::tools`).
//!
//! The command line is clap's (`sim --help`, `sim SUBCOMMAND --help` explain every flag; bad flags exit
//! with status 2 and clap's message); `sim cluster`'s flags are `cluster::ClusterFlags`.
//!
//! `simulate` prints the seed (or range) first, a line per failing seed with its violation's kind, and
//! last a machine-readable line `summary {json}` (see [`summary`]) that `cargo xtask` checks: how many
//! seeds ran, how many peeks and subscribe batches were compared with the oracle, and which seeds failed
//! with which kind of violation. `--expect-violation KIND[,KIND]` inverts the verdict for a planted bug:
//! every seed runs, and the sweep passes only if some seed fails and every failing seed failed with one
//! of those kinds (a panic or another kind is not the plant being caught).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::ops::Range;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use clap::{ArgGroup, Parser};

use sim::simulation::{Invariant, Outcome, RealConfig, SimConfig, run_real, run_seed_with};

/// A range of seeds, `A..B` (non-empty).
fn seed_range(value: &str) -> Result<Range<u64>, String> {
    let (a, b) = value.split_once("..").ok_or_else(|| format!("expected A..B, got {value:?}"))?;
    let a: u64 = a.parse().map_err(|e| format!("range start {a:?}: {e}"))?;
    let b: u64 = b.parse().map_err(|e| format!("range end {b:?}: {e}"))?;
    if a >= b {
        return Err(format!("empty seed range {value}"));
    }
    Ok(a..b)
}

/// A violation kind's name (`--expect-violation`).
fn violation_kind(name: &str) -> Result<Invariant, String> {
    Invariant::from_name(name).ok_or_else(|| {
        let known: Vec<&str> = Invariant::ALL.iter().map(|k| k.name()).collect();
        format!("unknown violation kind {name:?} (kinds: {})", known.join(", "))
    })
}

/// The simulator of the compute controller: deterministic simulation, the end-to-end cluster scenario, and
/// the check of its report.
#[derive(Debug, Parser)]
#[command(name = "sim")]
enum Command {
    /// Deterministic simulation of seeds (what `cargo xtask sim` runs); prints a `summary {json}` line last.
    Simulate(SimulateFlags),
    /// The end-to-end scenario on real processes: controller, replicas, storage, a live workload checked
    /// against an oracle, injected faults, and a report.
    Cluster(sim::cluster::ClusterFlags),
    /// Checks what `sim cluster --report DIR` wrote: the metrics with promtool, the page in headless
    /// Chromium (installing Debian's packages where missing).
    CheckReport {
        /// The report directory.
        dir: std::path::PathBuf,
    },
}

/// The flags of `sim simulate`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(ArgGroup::new("seeds-to-run").required(true).args(["seed", "seeds"])))]
struct SimulateFlags {
    /// Simulate this one seed.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Simulate the seeds A..B (B excluded), on every core.
    #[arg(long, value_name = "A..B", value_parser = seed_range)]
    seeds: Option<Range<u64>>,
    /// How long the workload-and-faults phase lasts, in simulated milliseconds.
    #[arg(long, value_name = "N")]
    fault_ms: Option<u64>,
    /// How long the phase after the faults lasts, in simulated milliseconds: everything must catch up in it.
    #[arg(long, value_name = "N")]
    liveness_ms: Option<u64>,
    /// Threads to run seeds on (default: every core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    jobs: Option<u64>,
    /// The sweep passes only if some seed fails and every failing seed failed with one of these kinds (a
    /// planted bug must be caught as itself).
    #[arg(long, value_name = "KIND[,KIND...]", value_delimiter = ',', value_parser = violation_kind)]
    expect_violation: Option<Vec<Invariant>>,
    /// Run each seed on the real stack (replica threads, storage, the controller) for 6 s.
    #[arg(long, conflicts_with = "real_ms")]
    real_compute: bool,
    /// Run each seed on the real stack for N milliseconds (workload and faults).
    #[arg(long, value_name = "N")]
    real_ms: Option<u64>,
    /// Print every seed's counts, not only a single seed's.
    #[arg(long, short)]
    verbose: bool,
}

/// The options of `sim simulate`.
struct Options {
    seeds: Range<u64>,
    config: SimConfig,
    verbose: bool,
    real: Option<RealConfig>,
    jobs: Option<usize>,
    /// `--expect-violation`: the kinds a planted bug must cause.
    expected: Option<Vec<Invariant>>,
}

impl Options {
    fn from_flags(flags: SimulateFlags) -> Options {
        let seeds = match (flags.seed, flags.seeds) {
            (Some(seed), None) => seed..seed + 1,
            (None, Some(range)) => range,
            // clap's group makes exactly one of them required.
            other => unreachable!("clap accepted seeds {other:?}"),
        };
        let mut config = SimConfig::default();
        if let Some(ms) = flags.fault_ms {
            config.fault_ms = ms;
        }
        if let Some(ms) = flags.liveness_ms {
            config.liveness_ms = ms;
        }
        let real = match (flags.real_compute, flags.real_ms) {
            (_, Some(duration_ms)) => Some(RealConfig { duration_ms }),
            (true, None) => Some(RealConfig::default()),
            (false, None) => None,
        };
        Options {
            seeds,
            config,
            verbose: flags.verbose,
            real,
            jobs: flags.jobs.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            expected: flags.expect_violation,
        }
    }
}

/// Runs every seed of `options` on `jobs` threads; unless `run_all`, stops handing out seeds after the
/// first failure. Returns each seed that ran with its outcome (`None`: it panicked), in seed order.
fn sweep(options: &Options, jobs: usize, run_all: bool) -> Vec<(u64, Option<Outcome>)> {
    let next = AtomicU64::new(options.seeds.start);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<(u64, Option<Outcome>)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                while run_all || !failed.load(Ordering::SeqCst) {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= options.seeds.end {
                        return;
                    }
                    let outcome = match options.real {
                        // The real stack runs its own threads; a failure to run at all is a failed seed.
                        Some(real) => run_real(seed, real).map_err(|e| println!("seed {seed}: {e:#}")).ok(),
                        None => std::panic::catch_unwind(|| run_seed_with(seed, options.config)).ok(),
                    };
                    if outcome.as_ref().is_none_or(|o| o.violation.is_some()) {
                        failed.store(true, Ordering::SeqCst);
                    }
                    results.lock().expect("results").push((seed, outcome));
                }
            });
        }
    });
    let mut results = results.into_inner().expect("results");
    results.sort_by_key(|(seed, _)| *seed);
    results
}

/// The `summary` line's JSON: what ran and what was checked, for `cargo xtask` to verify.
///
/// Fields: `seeds` (requested), `ran` (seeds that finished, with or without a violation), `panicked`
/// (seeds), `failed` (seeds with a violation: `seed`, `step`, `kind`), `violations` (count per kind),
/// `peeks_checked`, `batches_checked`, `faults`, `storage_outages`, `lost_replies` (storage compare-and-sets whose reply was lost), `model_evaluations` (summed over the
/// seeds that finished), `expected` (the `--expect-violation` kinds, or null), and `ok` (the verdict the
/// exit code gives).
fn summary(options: &Options, results: &[(u64, Option<Outcome>)], ok: bool) -> serde_json::Value {
    let finished: Vec<&Outcome> = results.iter().filter_map(|(_, o)| o.as_ref()).collect();
    let sum = |f: fn(&Outcome) -> u64| finished.iter().map(|o| f(o)).sum::<u64>();
    let mut violations: BTreeMap<&str, u64> = BTreeMap::new();
    let mut failed = Vec::new();
    for outcome in &finished {
        if let Some((step, violation)) = &outcome.violation {
            *violations.entry(violation.invariant.name()).or_default() += 1;
            failed.push(serde_json::json!({
                "seed": outcome.seed, "step": step, "kind": violation.invariant.name(),
            }));
        }
    }
    let panicked: Vec<u64> = results.iter().filter(|(_, o)| o.is_none()).map(|(seed, _)| *seed).collect();
    serde_json::json!({
        "seeds": options.seeds.end - options.seeds.start,
        "ran": finished.len(),
        "panicked": panicked,
        "failed": failed,
        "violations": violations,
        "peeks_checked": sum(|o| o.peeks_checked),
        "batches_checked": sum(|o| o.batches_checked),
        "faults": sum(|o| o.faults),
        "storage_outages": sum(|o| o.storage_outages),
        "lost_replies": sum(|o| o.storage.lost_replies),
        "model_evaluations": sum(|o| o.model_evaluations),
        "expected": options.expected.as_ref().map(|kinds| kinds.iter().map(|k| k.name()).collect::<Vec<_>>()),
        "ok": ok,
    })
}

/// Prints what each seed did and decides the verdict.
fn report(options: &Options, results: &[(u64, Option<Outcome>)]) -> bool {
    let single = options.seeds.end - options.seeds.start == 1;
    let mut failures = 0;
    let mut unexpected = 0;
    for (seed, outcome) in results {
        let Some(outcome) = outcome else {
            println!("seed {seed} panicked (an internal assertion failed; see above)");
            failures += 1;
            unexpected += 1;
            if options.expected.is_none() {
                println!("reproduce: cargo xtask sim --seed {seed}");
            }
            continue;
        };
        if options.verbose || single {
            println!(
                "seed {seed}: {} steps, {} peeks and {} subscribe batches checked, {} faults ({} storage outages), {} lost storage replies, {} model evaluations ({} memo hits), trace {:016x}",
                outcome.steps,
                outcome.peeks_checked,
                outcome.batches_checked,
                outcome.faults,
                outcome.storage_outages,
                outcome.storage.lost_replies,
                outcome.model_evaluations,
                outcome.model_memo_hits,
                outcome.trace_hash
            );
        }
        if let Some((step, violation)) = &outcome.violation {
            failures += 1;
            println!("seed {seed} failed at step {step}: {violation}");
            match &options.expected {
                Some(kinds) if kinds.contains(&violation.invariant) => {}
                Some(_) => {
                    unexpected += 1;
                    println!("seed {seed}: a violation of another kind than the planted bug causes");
                }
                None => println!("reproduce: cargo xtask sim --seed {seed}"),
            }
        }
    }
    match &options.expected {
        None => failures == 0,
        Some(kinds) => {
            let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
            if failures == 0 {
                println!(
                    "expected a violation of {} (a planted bug), but every seed passed: the simulator is blind to it",
                    names.join(" or ")
                );
            } else if unexpected == 0 {
                println!(
                    "the simulator found the planted bug in {failures} of {} seeds, each as {}, as it must",
                    results.len(),
                    names.join(" or ")
                );
            }
            failures > 0 && unexpected == 0
        }
    }
}

fn simulate(options: Options) -> anyhow::Result<ExitCode> {
    let single = options.seeds.end - options.seeds.start == 1;
    if single {
        println!("seed {}", options.seeds.start);
    } else {
        println!("seeds {}..{}", options.seeds.start, options.seeds.end);
    }
    // Seeds are independent: run them on every core, and report the lowest failing one.
    // A real-compute seed runs replicas, storage and the controller on their own threads: one at a time.
    let jobs = if single || options.real.is_some() {
        1
    } else {
        options.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    };
    // Wall-clock time of the whole sweep, for the report only; nothing simulated reads it.
    #[allow(clippy::disallowed_methods)]
    let started = std::time::Instant::now();
    // A planted bug must be caught by every seed that fails: run them all.
    let results = sweep(&options, jobs, options.expected.is_some());
    let ok = report(&options, &results);
    if ok && options.expected.is_none() {
        let finished: Vec<&Outcome> = results.iter().filter_map(|(_, o)| o.as_ref()).collect();
        println!(
            "{} seeds ok: {} peeks and {} subscribe batches checked against the oracle, {} faults injected ({} of them storage outages), {} lost storage replies ({:.1} s)",
            results.len(),
            finished.iter().map(|o| o.peeks_checked).sum::<u64>(),
            finished.iter().map(|o| o.batches_checked).sum::<u64>(),
            finished.iter().map(|o| o.faults).sum::<u64>(),
            finished.iter().map(|o| o.storage_outages).sum::<u64>(),
            finished.iter().map(|o| o.storage.lost_replies).sum::<u64>(),
            started.elapsed().as_secs_f64()
        );
    }
    println!("summary {}", summary(&options, &results, ok));
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn main() -> anyhow::Result<ExitCode> {
    match Command::parse() {
        Command::Simulate(flags) => simulate(Options::from_flags(flags)),
        Command::Cluster(flags) => sim::cluster::run(sim::cluster::ClusterArgs::from_flags(flags)?),
        Command::CheckReport { dir } => {
            for line in sim::tools::check_report(&dir)? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Command::try_parse_from(std::iter::once("sim").chain(args.iter().copied()))
    }

    #[test]
    fn simulate_takes_one_seed_or_a_range_and_the_kinds_a_planted_bug_must_cause() {
        Command::command().debug_assert();
        let Ok(Command::Simulate(flags)) =
            parse(&["simulate", "--seeds", "3..10", "--expect-violation", "peek-holds"])
        else {
            panic!("simulate parses");
        };
        let options = Options::from_flags(flags);
        assert_eq!(options.seeds, 3..10);
        assert_eq!(options.expected, Some(vec![Invariant::from_name("peek-holds").expect("a kind")]));
        let Ok(Command::Simulate(flags)) = parse(&["simulate", "--seed=42", "--real-ms", "100", "-v"]) else {
            panic!("simulate parses");
        };
        let options = Options::from_flags(flags);
        assert_eq!(
            (options.seeds, options.real.map(|r| r.duration_ms), options.verbose),
            (42..43, Some(100), true)
        );
        let cases: [(&[&str], &str); 5] = [
            (&["simulate"], "--seed"),
            (&["simulate", "--seed", "1", "--seeds", "1..2"], "cannot be used with"),
            (&["simulate", "--seeds", "5..3"], "empty seed range"),
            (&["simulate", "--seeds", "5"], "expected A..B"),
            (&["simulate", "--seed", "1", "--expect-violation", "nonsense"], "unknown violation kind"),
        ];
        for (args, expected) in cases {
            let error = parse(args).expect_err("refused").to_string();
            assert!(error.contains(expected), "{args:?}: {error}");
        }
    }
}
