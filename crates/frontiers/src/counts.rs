//! [`HoldCounts`]: how many holds sit at each time of one collection, and their lower envelope (the
//! collection's `since`).
//!
//! It does what timely's `MutableAntichain` does for [`ReadHolds`](crate::ReadHolds), but keeps
//! everything inline for the common case (a handful of distinct hold times, a one-element frontier): a
//! collection's counts and since sit in its hash-map entry, not behind two more heap pointers, so
//! updating a hold at 10,000 collections touches one or two cache lines and no other page.
//!
//! **Invariants:** `counts` is sorted by time (`Ord`, a linear extension of the partial order) and has no
//! zero entries; `frontier` is the set of minimal times whose count is positive.
//!
//! **Costs:** an update is a binary search per changed time, plus a rebuild of the frontier (one pass
//! over the counts) only when a changed time is not strictly beyond the frontier.
//!
//! **Tests:** below, against a naive recomputation; and the property test of `ReadHolds` (in `hold.rs`),
//! which checks every since against a model of live holds.

use smallvec::SmallVec;

use crate::{Antichain, AntichainRef, Timestamp};

/// Counts of holds per time, and the minimal times with a positive count.
#[derive(Debug, Clone)]
pub(crate) struct HoldCounts<T> {
    counts: SmallVec<[(T, i64); 2]>,
    frontier: Antichain<T>,
}

impl<T: Timestamp> HoldCounts<T> {
    /// No holds; the frontier is empty.
    pub(crate) fn new() -> Self {
        HoldCounts { counts: SmallVec::new(), frontier: Antichain::new() }
    }

    /// The minimal times with a positive count.
    pub(crate) fn frontier(&self) -> AntichainRef<'_, T> {
        self.frontier.borrow()
    }

    /// The count at exactly `time` (negative if more holds left it than arrived: the caller's bug).
    pub(crate) fn count_for(&self, time: &T) -> i64 {
        match self.counts.binary_search_by(|(t, _)| t.cmp(time)) {
            Ok(at) => self.counts[at].1,
            Err(_) => 0,
        }
    }

    /// Applies `updates` and reports whether the frontier changed.
    pub(crate) fn update(&mut self, updates: impl IntoIterator<Item = (T, i64)>) -> bool {
        let mut rebuild = false;
        for (time, delta) in updates {
            if delta == 0 {
                continue;
            }
            // A time strictly beyond the frontier is dominated by a frontier element with a positive
            // count; changing its count cannot change the minimal elements. (If that frontier element
            // changes too, its own update asks for the rebuild.)
            rebuild |= !self.frontier.less_than(&time);
            match self.counts.binary_search_by(|(t, _)| t.cmp(&time)) {
                Ok(at) => {
                    self.counts[at].1 += delta;
                    if self.counts[at].1 == 0 {
                        self.counts.remove(at);
                    }
                }
                Err(at) => self.counts.insert(at, (time, delta)),
            }
        }
        if !rebuild {
            return false;
        }
        let mut frontier = Antichain::new();
        for (time, count) in &self.counts {
            if *count > 0 {
                frontier.insert(*time);
            }
        }
        if frontier == self.frontier {
            return false;
        }
        self.frontier = frontier;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PartialOrder, Product};
    use proptest::prelude::*;

    type P = Product<u64, u64>;

    /// The minimal elements among the times with a positive count, recomputed from scratch.
    fn naive_frontier(counts: &std::collections::BTreeMap<P, i64>) -> Antichain<P> {
        let positive: Vec<P> = counts.iter().filter(|(_, c)| **c > 0).map(|(t, _)| *t).collect();
        let minimal =
            positive.iter().filter(|t| !positive.iter().any(|u| u != *t && PartialOrder::less_equal(u, *t)));
        Antichain::from_iter(minimal.copied())
    }

    proptest! {
        #[test]
        fn the_frontier_is_the_set_of_minimal_times_with_a_positive_count(
            batches in prop::collection::vec(
                prop::collection::vec(((0u64..4, 0u64..4), -2i64..3), 1..4),
                1..30,
            )
        ) {
            let mut counts = HoldCounts::<P>::new();
            let mut model = std::collections::BTreeMap::<P, i64>::new();
            for batch in batches {
                let updates: Vec<(P, i64)> =
                    batch.into_iter().map(|((a, b), d)| (Product::new(a, b), d)).collect();
                let before = counts.frontier().to_owned();
                for (t, d) in &updates {
                    *model.entry(*t).or_default() += d;
                }
                model.retain(|_, c| *c != 0);
                let changed = counts.update(updates.iter().copied());
                let expected = naive_frontier(&model);
                prop_assert_eq!(counts.frontier().to_owned(), expected.clone());
                prop_assert_eq!(changed, before != expected);
                for (t, c) in &model {
                    prop_assert_eq!(counts.count_for(t), *c);
                }
            }
        }
    }

    #[test]
    fn a_hold_moving_forward_moves_the_frontier_of_a_total_order() {
        let mut counts = HoldCounts::<u64>::new();
        assert!(counts.update([(5, 1)]));
        assert!(!counts.update([(7, 1)]), "a second hold beyond the first moves nothing");
        assert!(counts.update([(5, -1), (6, 1)]));
        assert_eq!(counts.frontier().to_owned(), Antichain::from_elem(6));
        assert!(counts.update([(6, -1), (7, -1)]));
        assert!(counts.frontier().is_empty());
        assert_eq!(counts.count_for(&7), 0);
    }
}
