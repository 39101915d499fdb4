//! What the shard engine needs from the outside world, shared by [`crate::blob`] and [`crate::consensus`]:
//! the determinate/indeterminate error split, a bounded retry loop, unique ids and the wall clock.
//!
//! **What this is.** [`ExternalError`]: every failure of an external engine is either *determinate* (it
//! certainly did not happen: a refused statement, a rolled-back transaction, a read that failed) or
//! *indeterminate* (it may have happened: a lost connection or a timeout during a write). Everything the
//! shard engine builds on them is safe to retry after either kind; an indeterminate failure of a
//! compare-and-set is resolved by reading the state again (see [`crate::shard`]). A third kind,
//! *corrupt*, reports stored data that is damaged. [`Retry`] is the
//! backoff every retry loop uses, bounded by a deadline. [`random_id`] makes the fresh ids that keep blob
//! keys unique (never overwritten) and tag appends for idempotency.
//!
//! **What this is not.** No decisions: whether to retry is the caller's.
//!
//! **Tests.** The backends' conformance suites (`tests/it/blob.rs`, `tests/it/consensus.rs`) check which
//! kind each failure is; unit tests below.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A failure of an external engine (blob store or consensus database).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExternalError {
    /// The operation certainly did not take effect.
    #[error("determinate failure: {0}")]
    Determinate(String),
    /// The operation may or may not have taken effect (a lost reply, a timeout during a write).
    #[error("indeterminate failure: {0}")]
    Indeterminate(String),
    /// The stored data is damaged (a version the store says exists is missing, say). Determinate, and
    /// retrying does not help.
    #[error("damaged store: {0}")]
    Corrupt(String),
}

impl ExternalError {
    /// Whether the operation may have taken effect.
    pub fn is_indeterminate(&self) -> bool {
        matches!(self, ExternalError::Indeterminate(_))
    }

    /// The message without the kind.
    pub fn message(&self) -> &str {
        match self {
            ExternalError::Determinate(message)
            | ExternalError::Indeterminate(message)
            | ExternalError::Corrupt(message) => message,
        }
    }
}

/// Exponential backoff from `initial` to `max`, for at most `budget` in total (measured by the sleeps,
/// not the clock, so that it is deterministic under a paused tokio clock).
#[derive(Debug, Clone)]
pub struct Retry {
    next: Duration,
    max: Duration,
    remaining: Duration,
    attempts: u32,
}

impl Retry {
    /// A retry loop that sleeps `initial`, then doubles up to `max`, until `budget` is spent.
    pub fn new(initial: Duration, max: Duration, budget: Duration) -> Self {
        Retry { next: initial, max, remaining: budget, attempts: 0 }
    }

    /// Sleeps before the next attempt; `false` (without sleeping) once the budget is spent.
    pub async fn wait(&mut self) -> bool {
        if self.remaining.is_zero() {
            return false;
        }
        let sleep = self.next.min(self.remaining);
        tokio::time::sleep(sleep).await;
        self.remaining -= sleep;
        self.next = (self.next * 2).min(self.max);
        self.attempts += 1;
        true
    }

    /// How many times [`wait`](Self::wait) slept.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// A fresh 128-bit id, unique with overwhelming probability across processes and machines: the
/// process's random hash keys (seeded by the OS) over the process id, a counter and the clock. Used for
/// blob keys (never overwritten) and idempotency tokens, never for decisions.
pub fn random_id() -> u128 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut halves = [0u64; 2];
    for (i, half) in halves.iter_mut().enumerate() {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(count);
        hasher.write_u32(std::process::id());
        hasher.write_u64(now_ms());
        hasher.write_usize(i);
        *half = hasher.finish();
    }
    (u128::from(halves[0]) << 64) | u128::from(halves[1])
}

/// Milliseconds since the Unix epoch: the time that leases and blob ages are measured in.
// Leases expire in wall-clock time by definition; the pure state machine takes `now_ms` as an argument,
// so the simulator drives it with its own clock.
#[allow(clippy::disallowed_methods)]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_do_not_repeat() {
        let ids: std::collections::BTreeSet<u128> = (0..10_000).map(|_| random_id()).collect();
        assert_eq!(ids.len(), 10_000);
    }

    #[tokio::test]
    async fn a_retry_loop_backs_off_and_stops_at_its_budget() {
        let mut retry =
            Retry::new(Duration::from_millis(1), Duration::from_millis(4), Duration::from_millis(10));
        let mut sleeps = 0;
        while retry.wait().await {
            sleeps += 1;
        }
        // 1 + 2 + 4 + 3 (the rest of the budget).
        assert_eq!(sleeps, 4);
        assert_eq!(retry.attempts(), 4);
        assert!(!retry.wait().await);
    }
}
