//! As-of arithmetic for new dataflows.
//!
//! A dataflow's `as_of` is the first time it computes. It is *valid* when every import is readable from it
//! on: `as_of` is beyond every import's `since`. The least valid as-of is therefore the join of the imports'
//! sinces. The *freshest* as-of is the most recent time at which every import is already complete (just
//! below the meet of their uppers), so the dataflow hydrates straight to the present instead of replaying
//! history it would compact away at once.
//!
//! The controller's `select_as_of` combines these with the constraints of the dataflow's exports; this
//! module only does the arithmetic. **Invariant:** every as-of returned here is beyond every import since
//! it was given (property-tested below).

use crate::antichain::{join_all, meet_all, step_back};
use crate::{Antichain, AntichainRef, PartialOrder, Timestamp};

/// The least as-of at which every import is readable: the join of the imports' sinces, `[T::minimum()]`
/// when there are none. Empty if some import is fully compacted (then no as-of is valid).
///
/// # Examples
/// ```
/// use frontiers::Antichain;
/// use frontiers::as_of::least_valid_as_of;
/// let sinces = [Antichain::from_elem(10u64), Antichain::from_elem(4)];
/// assert_eq!(least_valid_as_of(sinces.iter().map(|s| s.borrow())), Antichain::from_elem(10));
/// assert_eq!(least_valid_as_of::<u64, _>(std::iter::empty()), Antichain::from_elem(0));
/// let gone = [Antichain::from_elem(10u64), Antichain::new()];
/// assert!(least_valid_as_of(gone.iter().map(|s| s.borrow())).is_empty());
/// ```
pub fn least_valid_as_of<'a, T: Timestamp, I>(sinces: I) -> Antichain<T>
where
    I: IntoIterator<Item = AntichainRef<'a, T>>,
{
    join_all(sinces)
}

/// The most recent time at which every import is complete: the meet of the uppers, stepped back by one.
/// `None` if there is no such time (some upper is still at the minimum) or no import constrains it (every
/// upper is empty, i.e. every import is closed).
///
/// # Examples
/// ```
/// use frontiers::Antichain;
/// use frontiers::as_of::most_recent_complete;
/// let uppers = [Antichain::from_elem(20u64), Antichain::from_elem(15)];
/// assert_eq!(most_recent_complete(uppers.iter().map(|u| u.borrow())), Some(Antichain::from_elem(14)));
/// let empty = [Antichain::from_elem(0u64)];
/// assert_eq!(most_recent_complete(empty.iter().map(|u| u.borrow())), None);
/// let closed = [Antichain::<u64>::new()];
/// assert_eq!(most_recent_complete(closed.iter().map(|u| u.borrow())), None);
/// ```
pub fn most_recent_complete<'a, T: Timestamp, I>(uppers: I) -> Option<Antichain<T>>
where
    I: IntoIterator<Item = AntichainRef<'a, T>>,
{
    let upper = meet_all(uppers);
    if upper.is_empty() || upper.iter().any(|t| t.step_back().is_none()) {
        return None;
    }
    Some(step_back(&upper.borrow()))
}

/// The freshest valid as-of: the most recent complete time of the imports if it is valid, otherwise the
/// least valid as-of (the dataflow then waits for its imports' uppers to pass it). Empty if some import is
/// fully compacted.
///
/// # Examples
/// ```
/// use frontiers::Antichain;
/// use frontiers::as_of::freshest_valid_as_of;
/// let s = |t: u64| Antichain::from_elem(t);
/// // Imports readable in [10, 20) and [5, 15): the freshest common complete time is 14.
/// let (sinces, uppers) = ([s(10), s(5)], [s(20), s(15)]);
/// let as_of = freshest_valid_as_of(sinces.iter().map(|f| f.borrow()), uppers.iter().map(|f| f.borrow()));
/// assert_eq!(as_of, s(14));
/// // No common readable time: fall back to the join of the sinces.
/// let (sinces, uppers) = ([s(10), s(5)], [s(20), s(8)]);
/// let as_of = freshest_valid_as_of(sinces.iter().map(|f| f.borrow()), uppers.iter().map(|f| f.borrow()));
/// assert_eq!(as_of, s(10));
/// ```
pub fn freshest_valid_as_of<'a, 'b, T, S, U>(sinces: S, uppers: U) -> Antichain<T>
where
    T: Timestamp + 'a + 'b,
    S: IntoIterator<Item = AntichainRef<'a, T>>,
    U: IntoIterator<Item = AntichainRef<'b, T>>,
{
    let least = least_valid_as_of(sinces);
    if least.is_empty() {
        return least;
    }
    match most_recent_complete(uppers) {
        Some(recent) if PartialOrder::less_equal(&least, &recent) => recent,
        Some(recent) => crate::antichain::join(&least.borrow(), &recent.borrow()),
        None => least,
    }
}

/// Whether `as_of` is valid for imports with the given sinces: beyond every since (and not empty).
///
/// # Examples
/// ```
/// use frontiers::Antichain;
/// use frontiers::as_of::is_valid_as_of;
/// let sinces = [Antichain::from_elem(10u64), Antichain::from_elem(4)];
/// assert!(is_valid_as_of(&Antichain::from_elem(10).borrow(), sinces.iter().map(|s| s.borrow())));
/// assert!(!is_valid_as_of(&Antichain::from_elem(9).borrow(), sinces.iter().map(|s| s.borrow())));
/// assert!(!is_valid_as_of(&Antichain::new().borrow(), sinces.iter().map(|s| s.borrow())));
/// ```
pub fn is_valid_as_of<'a, T: Timestamp, I>(as_of: &AntichainRef<'_, T>, sinces: I) -> bool
where
    I: IntoIterator<Item = AntichainRef<'a, T>>,
{
    !as_of.is_empty() && sinces.into_iter().all(|since| PartialOrder::less_equal(&since, as_of))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Product;
    use proptest::prelude::*;

    type P = Product<u64, u64>;

    fn frontier() -> impl Strategy<Value = Antichain<P>> {
        prop::collection::vec((0u64..20, 0u64..20), 1..3)
            .prop_map(|v| v.into_iter().map(|(a, b)| Product::new(a, b)).collect())
    }

    proptest! {
        #[test]
        fn freshest_as_of_is_valid_for_every_import(
            imports in prop::collection::vec((frontier(), frontier()), 0..4),
        ) {
            let sinces: Vec<_> = imports.iter().map(|(s, _)| s.clone()).collect();
            let uppers: Vec<_> = imports.iter().map(|(_, u)| u.clone()).collect();
            let as_of = freshest_valid_as_of(sinces.iter().map(|f| f.borrow()), uppers.iter().map(|f| f.borrow()));
            prop_assert!(is_valid_as_of(&as_of.borrow(), sinces.iter().map(|f| f.borrow())));
            let least = least_valid_as_of(sinces.iter().map(|f| f.borrow()));
            prop_assert!(PartialOrder::less_equal(&least, &as_of));
        }
    }
}
