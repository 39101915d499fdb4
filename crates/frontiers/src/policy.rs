//! [`ReadPolicy`]: how far a controller's own read hold on a collection trails the collection's upper.
//!
//! A controller holds one read hold per collection it owns. After each write-frontier advance it asks the
//! collection's policy for a frontier and downgrades its hold there (never backwards: the hold only moves
//! if the policy's frontier is beyond it). The policy therefore decides how much history stays readable.
//!
//! **Invariant** (property-tested below): [`ReadPolicy::frontier`] is never ahead of the write frontier it
//! is given, and is monotone in it.

use serde::{Deserialize, Serialize};

use crate::antichain::{lag_and_round_down, meet};
use crate::{Antichain, AntichainRef, Timestamp};

/// A read policy. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "T: Timestamp")]
pub enum ReadPolicy<T> {
    /// Hold the collection at a fixed frontier (clamped to the write frontier until it gets there).
    ValidFrom(Antichain<T>),
    /// Hold `lag_ms` behind the write frontier, rounded down to a multiple of `granularity_ms` so that the
    /// hold moves at most once per granule rather than on every tick.
    LagWriteFrontier {
        /// How far behind the write frontier, in milliseconds.
        lag_ms: u64,
        /// The rounding granule, in milliseconds; `0` means no rounding.
        granularity_ms: u64,
    },
    /// Never advance: the hold stays wherever it is (the collection's since when the policy was set).
    NoPolicy,
    /// The meet of several policies: hold as far back as the most demanding one. An empty list follows the
    /// write frontier exactly.
    Multiple(Vec<ReadPolicy<T>>),
}

impl<T: Timestamp> ReadPolicy<T> {
    /// The frontier this policy would hold the collection at, given its write frontier. The caller
    /// downgrades its hold to this frontier if (and only if) it is beyond the hold.
    ///
    /// `NoPolicy` answers `[T::minimum()]`, which is beyond no hold, so a hold under it never moves.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, ReadPolicy};
    /// let upper = Antichain::from_elem(2_345u64);
    /// let lag = ReadPolicy::LagWriteFrontier { lag_ms: 100, granularity_ms: 1_000 };
    /// assert_eq!(lag.frontier(upper.borrow()), Antichain::from_elem(2_000));
    /// assert_eq!(ReadPolicy::ValidFrom(Antichain::from_elem(10)).frontier(upper.borrow()), Antichain::from_elem(10));
    /// // Never ahead of the write frontier.
    /// assert_eq!(ReadPolicy::ValidFrom(Antichain::from_elem(5_000)).frontier(upper.borrow()), upper);
    /// assert_eq!(ReadPolicy::<u64>::NoPolicy.frontier(upper.borrow()), Antichain::from_elem(0));
    /// let both = ReadPolicy::Multiple(vec![lag, ReadPolicy::ValidFrom(Antichain::from_elem(1_500))]);
    /// assert_eq!(both.frontier(upper.borrow()), Antichain::from_elem(1_500));
    /// // A closed collection may be compacted completely under a lag policy.
    /// let closed = Antichain::<u64>::new();
    /// assert_eq!(ReadPolicy::LagWriteFrontier { lag_ms: 1, granularity_ms: 1 }.frontier(closed.borrow()), closed);
    /// ```
    pub fn frontier(&self, write_frontier: AntichainRef<'_, T>) -> Antichain<T> {
        let raw = self.raw_frontier(write_frontier);
        meet(&raw.borrow(), &write_frontier)
    }

    fn raw_frontier(&self, write_frontier: AntichainRef<'_, T>) -> Antichain<T> {
        match self {
            ReadPolicy::ValidFrom(frontier) => frontier.clone(),
            ReadPolicy::LagWriteFrontier { lag_ms, granularity_ms } => {
                lag_and_round_down(&write_frontier, *lag_ms, *granularity_ms)
            }
            ReadPolicy::NoPolicy => Antichain::from_elem(T::minimum()),
            ReadPolicy::Multiple(policies) => {
                let mut result = Antichain::new();
                for policy in policies {
                    result.extend(policy.raw_frontier(write_frontier));
                }
                result
            }
        }
    }

    /// The policy a controller uses when none was set: lag the write frontier by `lag_ms` with one-second
    /// granularity.
    ///
    /// # Examples
    /// ```
    /// use frontiers::ReadPolicy;
    /// assert_eq!(ReadPolicy::<u64>::lag_writes_by(500), ReadPolicy::LagWriteFrontier { lag_ms: 500, granularity_ms: 1_000 });
    /// ```
    pub fn lag_writes_by(lag_ms: u64) -> Self {
        ReadPolicy::LagWriteFrontier { lag_ms, granularity_ms: 1_000 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PartialOrder, Product};
    use proptest::prelude::*;

    type P = Product<u64, u64>;

    fn policy() -> impl Strategy<Value = ReadPolicy<P>> {
        let leaf = prop_oneof![
            (0u64..50, 0u64..50)
                .prop_map(|(a, b)| ReadPolicy::ValidFrom(Antichain::from_elem(Product::new(a, b)))),
            (0u64..30, 0u64..10)
                .prop_map(|(lag_ms, granularity_ms)| ReadPolicy::LagWriteFrontier { lag_ms, granularity_ms }),
            Just(ReadPolicy::NoPolicy),
        ];
        leaf.prop_recursive(2, 8, 3, |inner| {
            prop::collection::vec(inner, 0..3).prop_map(ReadPolicy::Multiple)
        })
    }

    fn frontier() -> impl Strategy<Value = Antichain<P>> {
        prop::collection::vec((0u64..60, 0u64..60), 0..3)
            .prop_map(|v| v.into_iter().map(|(a, b)| Product::new(a, b)).collect())
    }

    proptest! {
        #[test]
        fn policy_is_never_ahead_of_the_write_frontier(p in policy(), w in frontier()) {
            let f = p.frontier(w.borrow());
            prop_assert!(PartialOrder::less_equal(&f, &w), "{f:?} is ahead of {w:?}");
        }

        #[test]
        fn policy_is_monotone_in_the_write_frontier(p in policy(), a in frontier(), b in frontier()) {
            // b' = meet(a, b) <= a, so f(b') <= f(a) must hold.
            let lower = meet(&a.borrow(), &b.borrow());
            let fa = p.frontier(a.borrow());
            let fl = p.frontier(lower.borrow());
            prop_assert!(PartialOrder::less_equal(&fl, &fa), "f({lower:?}) = {fl:?} is not <= f({a:?}) = {fa:?}");
        }
    }

    #[test]
    fn policy_frontiers_on_u64_table() {
        let cases: Vec<(ReadPolicy<u64>, Antichain<u64>, Antichain<u64>)> = vec![
            (ReadPolicy::NoPolicy, Antichain::new(), Antichain::from_elem(0)),
            (ReadPolicy::Multiple(vec![]), Antichain::from_elem(7), Antichain::from_elem(7)),
            (ReadPolicy::ValidFrom(Antichain::new()), Antichain::from_elem(7), Antichain::from_elem(7)),
            (ReadPolicy::ValidFrom(Antichain::from_elem(3)), Antichain::new(), Antichain::from_elem(3)),
            (
                ReadPolicy::LagWriteFrontier { lag_ms: 10, granularity_ms: 0 },
                Antichain::from_elem(5),
                Antichain::from_elem(0),
            ),
        ];
        for (policy, write_frontier, expected) in cases {
            assert_eq!(
                policy.frontier(write_frontier.borrow()),
                expected,
                "{policy:?} at {write_frontier:?}"
            );
        }
    }
}
