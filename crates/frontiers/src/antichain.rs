//! Frontier arithmetic on top of timely's [`Antichain`].
//!
//! A frontier `F` stands for the upward-closed set of times `{ t : some f in F has f <= t }`; the empty
//! frontier `[]` stands for the empty set ("no more times: closed"). Ordering frontiers by
//! `PartialOrder::less_equal` (`F <= G` iff every element of `G` is beyond some element of `F`), the
//! empty frontier is the top and `[T::minimum()]` the bottom. [`meet`] and [`join`] are the greatest lower
//! and least upper bounds in that order.
//!
//! **Not here:** a second antichain type. Everything is timely's `Antichain`.
//!
//! **Tests:** doctests below; property tests against a brute-force model at the bottom of the file.

use crate::{Antichain, AntichainRef, PartialOrder, Timestamp};

/// The meet (greatest lower bound) of two frontiers: the minimal elements of their union.
///
/// A collection's `since` is the meet of its holds; a dataflow's upper is at most the meet of its inputs'.
///
/// # Examples
/// ```
/// use frontiers::{Antichain, Product};
/// use frontiers::antichain::meet;
/// assert_eq!(meet(&Antichain::from_elem(3u64).borrow(), &Antichain::from_elem(5).borrow()), Antichain::from_elem(3));
/// // The empty frontier is the identity of meet.
/// assert_eq!(meet(&Antichain::<u64>::new().borrow(), &Antichain::from_elem(5).borrow()), Antichain::from_elem(5));
/// // Incomparable elements both survive.
/// let a = Antichain::from_elem(Product::new(1u64, 2u64));
/// let b = Antichain::from_elem(Product::new(2u64, 1u64));
/// assert_eq!(meet(&a.borrow(), &b.borrow()).len(), 2);
/// ```
pub fn meet<T: Timestamp>(a: &AntichainRef<'_, T>, b: &AntichainRef<'_, T>) -> Antichain<T> {
    // Not sized up front: an antichain keeps one element inline, and one reserved for two would live
    // on the heap, where every later read of it (a hold's frontier, say) is one more cache miss.
    let mut result = Antichain::new();
    result.extend(a.iter().cloned());
    result.extend(b.iter().cloned());
    result
}

/// The meet of any number of frontiers; the empty frontier (top) when there are none.
///
/// # Examples
/// ```
/// use frontiers::Antichain;
/// use frontiers::antichain::meet_all;
/// let fs = [Antichain::from_elem(7u64), Antichain::from_elem(3), Antichain::new()];
/// assert_eq!(meet_all(fs.iter().map(|f| f.borrow())), Antichain::from_elem(3));
/// assert_eq!(meet_all::<u64, _>(std::iter::empty()), Antichain::new());
/// ```
pub fn meet_all<'a, T: Timestamp, I>(frontiers: I) -> Antichain<T>
where
    I: IntoIterator<Item = AntichainRef<'a, T>>,
{
    let mut result = Antichain::new();
    for frontier in frontiers {
        result.extend(frontier.iter().cloned());
    }
    result
}

/// The join (least upper bound) of two frontiers: the minimal elements of the pairwise joins. If either is
/// empty (closed), so is the join.
///
/// The least valid as-of of a dataflow is the join of its imports' sinces.
///
/// # Examples
/// ```
/// use frontiers::{Antichain, Product};
/// use frontiers::antichain::join;
/// assert_eq!(join(&Antichain::from_elem(3u64).borrow(), &Antichain::from_elem(5).borrow()), Antichain::from_elem(5));
/// assert_eq!(join(&Antichain::<u64>::new().borrow(), &Antichain::from_elem(5).borrow()), Antichain::new());
/// let a = Antichain::from_elem(Product::new(1u64, 2u64));
/// let b = Antichain::from_elem(Product::new(2u64, 1u64));
/// assert_eq!(join(&a.borrow(), &b.borrow()), Antichain::from_elem(Product::new(2, 2)));
/// ```
pub fn join<T: Timestamp>(a: &AntichainRef<'_, T>, b: &AntichainRef<'_, T>) -> Antichain<T> {
    let mut result = Antichain::new();
    for x in a.iter() {
        for y in b.iter() {
            result.insert(x.join(y));
        }
    }
    result
}

/// The join of any number of frontiers; `[T::minimum()]` (bottom) when there are none.
///
/// # Examples
/// ```
/// use frontiers::Antichain;
/// use frontiers::antichain::join_all;
/// let fs = [Antichain::from_elem(7u64), Antichain::from_elem(3)];
/// assert_eq!(join_all(fs.iter().map(|f| f.borrow())), Antichain::from_elem(7));
/// assert_eq!(join_all::<u64, _>(std::iter::empty()), Antichain::from_elem(0));
/// ```
pub fn join_all<'a, T: Timestamp, I>(frontiers: I) -> Antichain<T>
where
    I: IntoIterator<Item = AntichainRef<'a, T>>,
{
    let mut result = Antichain::from_elem(T::minimum());
    for frontier in frontiers {
        result = join(&result.borrow(), &frontier);
    }
    result
}

/// Whether `time` is readable in a collection with the given `since` and `upper`: `since <= time` (history
/// at `time` is still distinguishable) and `time < upper` (all updates at `time` are known).
///
/// # Examples
/// ```
/// use frontiers::Antichain;
/// use frontiers::antichain::is_readable;
/// let since = Antichain::from_elem(10u64);
/// let upper = Antichain::from_elem(20u64);
/// assert!(!is_readable(&since.borrow(), &upper.borrow(), &9));
/// assert!(is_readable(&since.borrow(), &upper.borrow(), &10));
/// assert!(is_readable(&since.borrow(), &upper.borrow(), &19));
/// assert!(!is_readable(&since.borrow(), &upper.borrow(), &20));
/// // A closed collection is readable at every time from its since on.
/// assert!(is_readable(&since.borrow(), &Antichain::new().borrow(), &u64::MAX));
/// // A fully compacted collection (since = []) is readable nowhere.
/// assert!(!is_readable(&Antichain::new().borrow(), &upper.borrow(), &15));
/// ```
pub fn is_readable<T: Timestamp>(since: &AntichainRef<'_, T>, upper: &AntichainRef<'_, T>, time: &T) -> bool {
    since.less_equal(time) && !upper.less_equal(time)
}

/// Steps every element of a frontier back by one ([`Timestamp::step_back`]); elements that cannot step back
/// (already minimal in some coordinate) are kept. For a totally ordered upper `[u]`, the result `[u - 1]` is
/// the most recent complete time. The empty frontier stays empty.
///
/// # Examples
/// ```
/// use frontiers::Antichain;
/// use frontiers::antichain::step_back;
/// assert_eq!(step_back(&Antichain::from_elem(10u64).borrow()), Antichain::from_elem(9));
/// assert_eq!(step_back(&Antichain::from_elem(0u64).borrow()), Antichain::from_elem(0));
/// assert_eq!(step_back(&Antichain::<u64>::new().borrow()), Antichain::new());
/// ```
pub fn step_back<T: Timestamp>(frontier: &AntichainRef<'_, T>) -> Antichain<T> {
    frontier.iter().map(|t| t.step_back().unwrap_or(*t)).collect()
}

/// Applies [`Timestamp::lag_and_round_down`] to every element: the frontier a `LagWriteFrontier` read
/// policy derives from a write frontier. Never ahead of its input; the empty frontier stays empty.
///
/// # Examples
/// ```
/// use frontiers::Antichain;
/// use frontiers::antichain::lag_and_round_down;
/// assert_eq!(lag_and_round_down(&Antichain::from_elem(2_500u64).borrow(), 1_000, 1_000), Antichain::from_elem(1_000));
/// assert_eq!(lag_and_round_down(&Antichain::<u64>::new().borrow(), 1_000, 1_000), Antichain::new());
/// ```
pub fn lag_and_round_down<T: Timestamp>(
    frontier: &AntichainRef<'_, T>,
    lag_ms: u64,
    granularity_ms: u64,
) -> Antichain<T> {
    frontier.iter().map(|t| t.lag_and_round_down(lag_ms, granularity_ms)).collect()
}

/// Whether `elements` form an antichain: no element is `less_equal` to another. Decoders use this to reject
/// a frontier received from the network that timely's `Antichain` deserialisation would accept unchecked.
///
/// # Examples
/// ```
/// use frontiers::antichain::is_antichain;
/// assert!(is_antichain::<u64>(&[]));
/// assert!(is_antichain(&[3u64]));
/// assert!(!is_antichain(&[3u64, 5]));
/// assert!(!is_antichain(&[3u64, 3]));
/// ```
pub fn is_antichain<T: PartialOrder>(elements: &[T]) -> bool {
    elements
        .iter()
        .enumerate()
        .all(|(i, a)| elements.iter().enumerate().all(|(j, b)| i == j || !a.less_equal(b)))
}

/// Whether frontier `a` is `less_equal` to frontier `b` in the frontier order (every time beyond `b` is
/// beyond `a`): the test for "did not regress" when `b` is the newer frontier.
///
/// # Examples
/// ```
/// use frontiers::Antichain;
/// use frontiers::antichain::frontier_le;
/// assert!(frontier_le(&Antichain::from_elem(3u64).borrow(), &Antichain::from_elem(3).borrow()));
/// assert!(frontier_le(&Antichain::from_elem(3u64).borrow(), &Antichain::new().borrow()));
/// assert!(!frontier_le(&Antichain::<u64>::new().borrow(), &Antichain::from_elem(3).borrow()));
/// ```
pub fn frontier_le<T: Timestamp>(a: &AntichainRef<'_, T>, b: &AntichainRef<'_, T>) -> bool {
    PartialOrder::less_equal(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Product;
    use proptest::prelude::*;

    type P = Product<u64, u64>;

    fn frontier() -> impl Strategy<Value = Antichain<P>> {
        prop::collection::vec((0u64..6, 0u64..6), 0..4)
            .prop_map(|v| v.into_iter().map(|(a, b)| Product::new(a, b)).collect())
    }

    /// Brute force: the set of times in a small grid that are beyond the frontier.
    fn upward_set(f: &Antichain<P>) -> Vec<P> {
        let mut out = Vec::new();
        for a in 0..8 {
            for b in 0..8 {
                let t = Product::new(a, b);
                if f.less_equal(&t) {
                    out.push(t);
                }
            }
        }
        out
    }

    proptest! {
        #[test]
        fn meet_is_the_union_of_upward_sets(a in frontier(), b in frontier()) {
            let m = meet(&a.borrow(), &b.borrow());
            let mut expected: Vec<P> = upward_set(&a);
            expected.extend(upward_set(&b));
            expected.sort();
            expected.dedup();
            prop_assert_eq!(upward_set(&m), expected);
        }

        #[test]
        fn join_is_the_intersection_of_upward_sets(a in frontier(), b in frontier()) {
            let j = join(&a.borrow(), &b.borrow());
            let sb = upward_set(&b);
            let expected: Vec<P> = upward_set(&a).into_iter().filter(|t| sb.contains(t)).collect();
            prop_assert_eq!(upward_set(&j), expected);
        }

        #[test]
        fn meet_and_join_bound_their_arguments(a in frontier(), b in frontier()) {
            let m = meet(&a.borrow(), &b.borrow());
            let j = join(&a.borrow(), &b.borrow());
            prop_assert!(frontier_le(&m.borrow(), &a.borrow()) && frontier_le(&m.borrow(), &b.borrow()));
            prop_assert!(frontier_le(&a.borrow(), &j.borrow()) && frontier_le(&b.borrow(), &j.borrow()));
        }

        #[test]
        fn results_are_antichains(a in frontier(), b in frontier()) {
            prop_assert!(is_antichain(meet(&a.borrow(), &b.borrow()).elements()));
            prop_assert!(is_antichain(join(&a.borrow(), &b.borrow()).elements()));
            prop_assert!(is_antichain(step_back(&a.borrow()).elements()));
        }
    }
}
