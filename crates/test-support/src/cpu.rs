//! The CPU time the calling thread has used, as Linux reports it in `/proc/thread-self/schedstat` (its
//! first field: nanoseconds on a CPU). A benchmark on a machine it shares with other work times a
//! single-threaded loop with it: time the thread spent waiting for a core is not counted, so another
//! process's build moves the figure less than it moves wall-clock time. Cache and memory-bus contention
//! still count, as they should.
//!
//! **What this is not.** Not portable: without `/proc` it answers `None` (the caller falls back to wall-clock
//! time and says so). Not a profiler: one number for the whole thread.
//!
//! **Tests:** below (a busy loop's CPU time grows, a sleep's does not).

use std::time::Duration;

/// The calling thread's CPU time so far.
pub fn thread_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_gains_cpu_time_and_a_sleeping_one_gains_almost_none() {
        let start = thread_cpu_time().expect("Linux has /proc/thread-self/schedstat");
        // About 100 ms of work on this machine (a volatile-ish add per step).
        let mut x = 0u64;
        for _ in 0..100_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let busy = thread_cpu_time().unwrap() - start;
        assert!(busy >= Duration::from_millis(5), "10^8 steps of spinning used only {busy:?} of CPU");
        let before_sleep = thread_cpu_time().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let asleep = thread_cpu_time().unwrap() - before_sleep;
        assert!(asleep < Duration::from_millis(50), "a 100 ms sleep used {asleep:?} of CPU");
    }
}
