//! The `sim` binary: `sim simulate --seed S | --seeds A..B` (deterministic simulation; what
//! `cargo xtask sim` runs) and `sim cluster` (the end-to-end scenario on real processes).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::ops::Range;
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sim::simulation::{Outcome, RealConfig, SimConfig, run_real, run_seed_with};

fn parse_range(value: &str) -> anyhow::Result<Range<u64>> {
    let (a, b) = value.split_once("..").ok_or_else(|| anyhow!("expected A..B, got {value:?}"))?;
    let (a, b): (u64, u64) = (a.parse().context("range start")?, b.parse().context("range end")?);
    if a >= b {
        bail!("empty seed range {value}");
    }
    Ok(a..b)
}

fn simulate(args: &[String]) -> anyhow::Result<ExitCode> {
    let mut seeds: Option<Range<u64>> = None;
    let mut config = SimConfig::default();
    let mut verbose = false;
    let mut real: Option<RealConfig> = None;
    let mut jobs: Option<usize> = None;
    let mut expect_failure = false;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value = || iter.next().ok_or_else(|| anyhow!("{arg} needs a value"));
        match arg.as_str() {
            "--seed" => {
                let seed: u64 = value()?.parse().context("--seed")?;
                seeds = Some(seed..seed + 1);
            }
            "--seeds" => seeds = Some(parse_range(value()?)?),
            "--fault-ms" => config.fault_ms = value()?.parse().context("--fault-ms")?,
            "--liveness-ms" => config.liveness_ms = value()?.parse().context("--liveness-ms")?,
            "--verbose" | "-v" => verbose = true,
            "--real-compute" => real = Some(RealConfig::default()),
            "--real-ms" => real = Some(RealConfig { duration_ms: value()?.parse().context("--real-ms")? }),
            "--jobs" => jobs = Some(value()?.parse().context("--jobs")?),
            "--expect-failure" => expect_failure = true,
            other => bail!(
                "unknown argument {other:?}; usage: sim simulate (--seed S | --seeds A..B) [--fault-ms N] [--liveness-ms N] [--jobs N] [--expect-failure] [--real-compute | --real-ms N] [-v]"
            ),
        }
    }
    let seeds = seeds.ok_or_else(|| anyhow!("simulate needs --seed S or --seeds A..B"))?;
    let single = seeds.end - seeds.start == 1;
    if single {
        println!("seed {}", seeds.start);
    } else {
        println!("seeds {}..{}", seeds.start, seeds.end);
    }
    // Seeds are independent: run them on every core, and report the lowest failing one.
    // A real-compute seed runs replicas, storage and the controller on their own threads: one at a time.
    let jobs = if single || real.is_some() {
        1
    } else {
        jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    };
    let next = AtomicU64::new(seeds.start);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<(u64, Option<Outcome>)>> = Mutex::new(Vec::new());
    // Wall-clock time of the whole sweep, for the report only; nothing simulated reads it.
    #[allow(clippy::disallowed_methods)]
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                while !failed.load(Ordering::SeqCst) {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= seeds.end {
                        return;
                    }
                    let outcome = match real {
                        // The real stack runs its own threads; a failure to run at all is a failed seed.
                        Some(real) => run_real(seed, real).map_err(|e| println!("seed {seed}: {e:#}")).ok(),
                        None => std::panic::catch_unwind(|| run_seed_with(seed, config)).ok(),
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
    let (mut peeks, mut batches, mut faults, mut storage_restarts) = (0u64, 0u64, 0u64, 0u64);
    for (seed, outcome) in &results {
        let Some(outcome) = outcome else {
            println!("seed {seed} panicked (an internal assertion failed; see above)");
            if expect_failure {
                return Ok(ExitCode::SUCCESS);
            }
            println!("reproduce: cargo xtask sim --seed {seed}");
            return Ok(ExitCode::FAILURE);
        };
        peeks += outcome.peeks_checked;
        batches += outcome.batches_checked;
        faults += outcome.faults;
        storage_restarts += outcome.storage_restarts;
        if verbose || single {
            println!(
                "seed {seed}: {} steps, {} peeks and {} subscribe batches checked, {} faults ({} storage restarts), trace {:016x}",
                outcome.steps,
                outcome.peeks_checked,
                outcome.batches_checked,
                outcome.faults,
                outcome.storage_restarts,
                outcome.trace_hash
            );
        }
        if let Some((step, violation)) = &outcome.violation {
            println!("seed {seed} failed at step {step}: {violation}");
            if expect_failure {
                println!("the simulator found the planted bug (seed {seed}), as it must");
                return Ok(ExitCode::SUCCESS);
            }
            println!("reproduce: cargo xtask sim --seed {seed}");
            return Ok(ExitCode::FAILURE);
        }
    }
    if expect_failure {
        println!(
            "expected some seed to fail (a planted bug), but every seed passed: the simulator is blind to it"
        );
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "{} seeds ok: {peeks} peeks and {batches} subscribe batches checked against the oracle, {faults} faults injected ({storage_restarts} of them storage restarts) ({:.1} s)",
        seeds.end - seeds.start,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn main() -> anyhow::Result<ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("simulate") => simulate(&args[1..]),
        Some("cluster") => sim::cluster::run(sim::cluster::ClusterArgs::parse(&args[1..])?),
        _ => {
            println!(
                "usage: sim simulate (--seed S | --seeds A..B) | sim cluster [options; see sim cluster --help]"
            );
            Ok(ExitCode::FAILURE)
        }
    }
}
