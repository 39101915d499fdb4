//! Benchmark of read-hold accounting at scale: the cost of one acquire + downgrade + release cycle on a
//! `frontiers::ReadHolds` holding 100 and 10,000 collections.
//!
//! **What it measures.** Each collection starts with 8 holds at staggered times (kept alive in a `Vec`).
//! One cycle acquires a new hold on a pseudo-randomly chosen collection, downgrades it once and drops it;
//! every 64 cycles `ReadHolds::process` applies the queued changes, so the accounting work is in the figure.
//! The figure is the time per cycle, best of 5 runs of 1M cycles. DESIGN §6 ("controller scale") asks that
//! the cost of a hold change not depend on the number of collections: the 10k figure is printed with the
//! 100-collection figure as its baseline, and a warning if the ratio exceeds 2.
//!
//! **What it is not.** Not a criterion bench (no dependency, `harness = false`) and not simulated code, so
//! it reads the wall clock. The choice of collections comes from a fixed-seed xorshift, so every run does
//! the same work. Run it with `cargo xtask bench frontiers`, which collects the `bench ...` lines.

// A benchmark reports on stdout; `cargo xtask bench` reads it from there.
#![allow(clippy::print_stdout)]
// A benchmark measures wall-clock time; clippy.toml's clock rule is for simulated code.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use frontiers::{Antichain, ReadHold, ReadHolds};
use test_support::XorShift;

/// Outstanding holds per collection, besides the one a cycle takes.
const HOLDS_PER_COLLECTION: u64 = 8;
/// Cycles per run.
const CYCLES: u64 = 1_000_000;
/// Runs per configuration; the best one counts.
const RUNS: usize = 5;
/// Cycles between two calls of `process`.
const PROCESS_EVERY: u64 = 64;
/// DESIGN §6: the 10k-collection cost is at most this multiple of the 100-collection cost.
const RATIO_BAR: f64 = 2.0;

/// `collections` collections, collection `c` with holds at `c % 8 + 10 j` for `j` in `0..8`; its since is
/// `c % 8`, and the cycles' holds (at 1,000 and later) never move it.
fn setup(collections: u64) -> (ReadHolds<u64, u64>, Vec<ReadHold<u64, u64>>) {
    let mut holds = ReadHolds::new();
    let mut held = Vec::with_capacity(usize::try_from(collections * HOLDS_PER_COLLECTION).unwrap());
    for c in 0..collections {
        let since = c % HOLDS_PER_COLLECTION;
        held.push(holds.create(c, Antichain::from_elem(since)).unwrap());
        for j in 1..HOLDS_PER_COLLECTION {
            held.push(holds.acquire(&c, Antichain::from_elem(since + 10 * j)).unwrap());
        }
    }
    assert!(holds.process().is_empty());
    (holds, held)
}

/// One run: the time of `CYCLES` cycles (setup excluded).
fn run(collections: u64) -> Duration {
    let (mut holds, held) = setup(collections);
    let mut rng = XorShift::new(0x9E37_79B9_7F4A_7C15);
    let start = Instant::now();
    for cycle in 0..CYCLES {
        let r = rng.next();
        let collection = r % collections;
        let time = 1_000 + (r >> 40) % 64;
        let mut hold = holds.acquire(&collection, Antichain::from_elem(time)).unwrap();
        hold.try_downgrade(Antichain::from_elem(time + 1)).unwrap();
        drop(hold);
        if cycle % PROCESS_EVERY == PROCESS_EVERY - 1 {
            black_box(holds.process());
        }
    }
    black_box(holds.process());
    let elapsed = start.elapsed();
    // The cycles' holds are all gone and never held anything back: every since is where setup left it.
    for c in 0..collections {
        assert_eq!(holds.since(&c).unwrap().to_owned(), Antichain::from_elem(c % HOLDS_PER_COLLECTION));
    }
    drop(held);
    elapsed
}

/// Nanoseconds per cycle, best of `RUNS` runs.
fn ns_per_cycle(collections: u64) -> f64 {
    let runs: Vec<f64> = (0..RUNS).map(|_| run(collections).as_secs_f64() * 1e9 / CYCLES as f64).collect();
    let best = runs.iter().copied().fold(f64::INFINITY, f64::min);
    let all: Vec<String> = runs.iter().map(|ns| format!("{ns:.1}")).collect();
    println!("{collections} collections: ns per cycle in {RUNS} runs of {CYCLES} cycles: {}", all.join(", "));
    best
}

fn main() {
    let small = ns_per_cycle(100);
    let large = ns_per_cycle(10_000);
    let ratio = large / small;
    println!("bench frontiers.hold_cycle_100: {small:.1} ns");
    println!("bench frontiers.hold_cycle_10k: {large:.1} ns (baseline {small:.1} ns, ratio {ratio:.2})");
    if ratio > RATIO_BAR {
        println!(
            "warning: frontiers.hold_cycle_10k is {ratio:.2}x the 100-collection cost; DESIGN §6 allows at most {RATIO_BAR}x"
        );
    }
}
