//! What the workspace's tests and benchmarks share, written once: a seeded [`XorShift`] generator,
//! loopback TCP round trips as a network baseline ([`loopback`]), a global allocator that counts live
//! bytes ([`counting_alloc`]), a process's resident memory from `/proc` ([`memory`]), a thread's CPU time ([`cpu`]), [`median`], and the proptest
//! settings every property test takes from `PROPTEST_CASES` ([`proptest_cases`], [`proptest_config`]),
//! a benchmark's build of a workspace binary ([`cargo`]) and a `cargo` command
//! without the variables cargo set for the caller ([`cargo_env`]).
//!
//! **What this is not.** Nothing here is used by a library or a binary of the system: it is a
//! dev-dependency only, and it knows no other workspace crate (so any crate, `frontiers` included, can
//! use it without a cycle). It holds no oracle: an expected answer never comes from here.
//!
//! **Tests:** the unit tests below and in each module; its users' tests and benchmarks.

pub mod cargo;
pub mod cargo_env;
pub mod counting_alloc;
pub mod cpu;
pub mod loopback;
pub mod memory;

/// Marsaglia's xorshift64: deterministic, seeded, no `rand` dependency; for workloads, kill delays and
/// damage positions in tests and benchmarks (never for anything that decides in the system).
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (zero, which xorshift cannot leave, is replaced by a fixed odd constant).
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed })
    }

    /// The next value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..n` (`n > 0`; modulo bias is irrelevant at test sizes).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0) has no value");
        self.next() % n
    }
}

/// `PROPTEST_CASES` (default 256) divided by `divisor`, at least 4: for property tests whose cases cost
/// more than others (the suite sets `PROPTEST_CASES` to 64 or 1024).
pub fn proptest_cases(divisor: u32) -> u32 {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse::<u32>().ok()).unwrap_or(256);
    (cases / divisor.max(1)).max(4)
}

/// A proptest configuration with `cases` cases (from [`proptest_cases`]) and no failure persistence
/// (a failure prints its seed; no files are written into the source tree).
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    }
}

/// The median of `values` (sorted in place): the middle one, the upper middle for an even count. For
/// benchmarks' repeated runs and paired ratios. Panics on an empty slice or on values without an order
/// (a NaN).
pub fn median<T: Copy + PartialOrd>(values: &mut [T]) -> T {
    assert!(!values.is_empty(), "the median of nothing");
    values.sort_by(|a, b| a.partial_cmp(b).expect("values with an order (no NaN)"));
    values[values.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_value_whatever_the_order() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4, 1, 3, 2]), 3);
        assert_eq!(median(&mut [std::time::Duration::from_millis(7)]), std::time::Duration::from_millis(7));
    }

    #[test]
    fn xorshift_is_a_function_of_its_seed_and_never_sticks_at_zero() {
        let (mut a, mut b) = (XorShift::new(7), XorShift::new(7));
        let first: Vec<u64> = (0..5).map(|_| a.next()).collect();
        assert_eq!(first, (0..5).map(|_| b.next()).collect::<Vec<_>>());
        let mut zero = XorShift::new(0);
        assert!((0..100).all(|_| zero.next() != 0));
        assert!((0..100).all(|_| zero.below(3) < 3));
    }

    #[test]
    fn proptest_cases_divides_the_environment_and_keeps_a_floor() {
        let cases = proptest_cases(1_000_000);
        assert_eq!(cases, 4);
        assert_eq!(proptest_config(9).cases, 9);
    }
}
