//! The `sim` binary: `sim simulate --seed S | --seeds A..B` (deterministic simulation; what
//! `cargo xtask sim` runs), `sim cluster` (the end-to-end scenario on real processes) and
//! `sim check-report DIR` (promtool and Chromium on what `sim cluster --report DIR` wrote; `sim::tools`).
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

use anyhow::{Context, anyhow, bail};

use sim::simulation::{Invariant, Outcome, RealConfig, SimConfig, run_real, run_seed_with};

const USAGE: &str = "usage: sim simulate (--seed S | --seeds A..B) [--fault-ms N] [--liveness-ms N] [--jobs N] \
[--expect-violation KIND[,KIND...]] [--real-compute | --real-ms N] [-v]";

fn parse_range(value: &str) -> anyhow::Result<Range<u64>> {
    let (a, b) = value.split_once("..").ok_or_else(|| anyhow!("expected A..B, got {value:?}"))?;
    let (a, b): (u64, u64) = (a.parse().context("range start")?, b.parse().context("range end")?);
    if a >= b {
        bail!("empty seed range {value}");
    }
    Ok(a..b)
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

fn parse_options(args: &[String]) -> anyhow::Result<Options> {
    let mut seeds: Option<Range<u64>> = None;
    let mut options = Options {
        seeds: 0..1,
        config: SimConfig::default(),
        verbose: false,
        real: None,
        jobs: None,
        expected: None,
    };
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value = || iter.next().ok_or_else(|| anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--seed" => {
                let seed: u64 = value()?.parse().context("--seed")?;
                seeds = Some(seed..seed + 1);
            }
            "--seeds" => seeds = Some(parse_range(value()?)?),
            "--fault-ms" => options.config.fault_ms = value()?.parse().context("--fault-ms")?,
            "--liveness-ms" => options.config.liveness_ms = value()?.parse().context("--liveness-ms")?,
            "--verbose" | "-v" => options.verbose = true,
            "--real-compute" => options.real = Some(RealConfig::default()),
            "--real-ms" => {
                options.real = Some(RealConfig { duration_ms: value()?.parse().context("--real-ms")? })
            }
            "--jobs" => options.jobs = Some(value()?.parse().context("--jobs")?),
            "--expect-violation" => {
                let kinds = value()?
                    .split(',')
                    .map(|name| {
                        Invariant::from_name(name).ok_or_else(|| {
                            let known: Vec<&str> = Invariant::ALL.iter().map(|k| k.name()).collect();
                            anyhow!("unknown violation kind {name:?} (kinds: {})", known.join(", "))
                        })
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                options.expected = Some(kinds);
            }
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    options.seeds = seeds.ok_or_else(|| anyhow!("simulate needs --seed S or --seeds A..B; {USAGE}"))?;
    Ok(options)
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
/// `peeks_checked`, `batches_checked`, `faults`, `storage_restarts`, `model_evaluations` (summed over the
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
        "storage_restarts": sum(|o| o.storage_restarts),
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
                "seed {seed}: {} steps, {} peeks and {} subscribe batches checked, {} faults ({} storage restarts), {} model evaluations ({} memo hits), trace {:016x}",
                outcome.steps,
                outcome.peeks_checked,
                outcome.batches_checked,
                outcome.faults,
                outcome.storage_restarts,
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

fn simulate(args: &[String]) -> anyhow::Result<ExitCode> {
    let options = parse_options(args)?;
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
            "{} seeds ok: {} peeks and {} subscribe batches checked against the oracle, {} faults injected ({} of them storage restarts) ({:.1} s)",
            results.len(),
            finished.iter().map(|o| o.peeks_checked).sum::<u64>(),
            finished.iter().map(|o| o.batches_checked).sum::<u64>(),
            finished.iter().map(|o| o.faults).sum::<u64>(),
            finished.iter().map(|o| o.storage_restarts).sum::<u64>(),
            started.elapsed().as_secs_f64()
        );
    }
    println!("summary {}", summary(&options, &results, ok));
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn main() -> anyhow::Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("simulate") => simulate(&args[1..]),
        Some("cluster") if args[1..].iter().any(|a| a == "--help" || a == "-h") => {
            println!("{}", sim::cluster::USAGE);
            Ok(ExitCode::SUCCESS)
        }
        Some("cluster") => sim::cluster::run(sim::cluster::ClusterArgs::parse(&args[1..])?),
        Some("check-report") => {
            let [dir] = &args[1..] else { bail!("usage: sim check-report DIR") };
            for line in sim::tools::check_report(std::path::Path::new(dir))? {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            println!(
                "usage: sim simulate (--seed S | --seeds A..B) | sim cluster [options; see sim cluster --help] \
                 | sim check-report DIR"
            );
            Ok(ExitCode::FAILURE)
        }
    }
}
