//! The [`Timestamp`] trait: what the controller needs of a time type beyond timely's.
//!
//! Timely's `Timestamp` gives a partial order and a minimum. The controller also needs lattice operations
//! (to meet and join frontiers), a maximum, stepping by one, and the arithmetic of read policies (lag and
//! rounding, in milliseconds) and introspection (conversion to wall-clock milliseconds).
//!
//! Implemented for `u64` (milliseconds since the Unix epoch, totally ordered: the instantiation every
//! binary uses) and for `Product<u64, u64>` (partially ordered, component-wise; used by the tests to keep
//! the frontier logic honest about partial orders).
//!
//! **Invariants** (checked by the property tests at the bottom of this file): `join` and `meet` are the
//! least upper and greatest lower bounds of the partial order; `lag_and_round_down` never moves a time
//! forward and is monotone; `step_back` is the greatest time strictly below (total orders) or `None`.

use serde::Serialize;
use serde::de::DeserializeOwned;
use timely::order::Product;

/// A time type the compute controller can work with.
///
/// The seed calls this `ComputeControllerTimestamp`. Every method must agree with the partial order
/// (`timely::PartialOrder`) of the type.
pub trait Timestamp:
    timely::progress::Timestamp + Copy + Serialize + DeserializeOwned + Send + Sync + Unpin + 'static
{
    /// The least upper bound of `self` and `other`.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Product, Timestamp};
    /// assert_eq!(3u64.join(&5), 5);
    /// assert_eq!(Product::new(1u64, 4u64).join(&Product::new(2, 3)), Product::new(2, 4));
    /// ```
    fn join(&self, other: &Self) -> Self;

    /// The greatest lower bound of `self` and `other`.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Product, Timestamp};
    /// assert_eq!(3u64.meet(&5), 3);
    /// assert_eq!(Product::new(1u64, 4u64).meet(&Product::new(2, 3)), Product::new(1, 3));
    /// ```
    fn meet(&self, other: &Self) -> Self;

    /// The greatest time. Every time is `less_equal` to it.
    ///
    /// # Examples
    /// ```
    /// use frontiers::Timestamp;
    /// assert_eq!(<u64 as Timestamp>::maximum(), u64::MAX);
    /// ```
    fn maximum() -> Self;

    /// The greatest time strictly less than `self` in every coordinate, or `None` if there is none (the
    /// time is zero in some coordinate).
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Product, Timestamp};
    /// assert_eq!(5u64.step_back(), Some(4));
    /// assert_eq!(0u64.step_back(), None);
    /// assert_eq!(Product::new(1u64, 1u64).step_back(), Some(Product::new(0, 0)));
    /// assert_eq!(Product::new(1u64, 0u64).step_back(), None);
    /// ```
    fn step_back(&self) -> Option<Self>;

    /// The least time strictly greater than `self` in every coordinate, or `None` at the maximum.
    ///
    /// # Examples
    /// ```
    /// use frontiers::Timestamp;
    /// assert_eq!(5u64.step_forward(), Some(6));
    /// assert_eq!(u64::MAX.step_forward(), None);
    /// ```
    fn step_forward(&self) -> Option<Self>;

    /// Moves `self` back by `lag_ms` (saturating at zero) and rounds the result down to a multiple of
    /// `granularity_ms` (no rounding when it is zero). The result is `less_equal` to `self`, and the
    /// function is monotone: `a <= b` implies `f(a) <= f(b)`. Rounding keeps read policies from
    /// producing a new frontier on every tick.
    ///
    /// # Examples
    /// ```
    /// use frontiers::Timestamp;
    /// assert_eq!(1_234u64.lag_and_round_down(100, 1_000), 1_000);
    /// assert_eq!(1_234u64.lag_and_round_down(300, 1_000), 0);
    /// assert_eq!(50u64.lag_and_round_down(100, 0), 0);
    /// assert_eq!(1_234u64.lag_and_round_down(0, 0), 1_234);
    /// ```
    fn lag_and_round_down(&self, lag_ms: u64, granularity_ms: u64) -> Self;

    /// The time that corresponds to a wall-clock instant, in milliseconds since the Unix epoch.
    ///
    /// # Examples
    /// ```
    /// use frontiers::Timestamp;
    /// assert_eq!(<u64 as Timestamp>::from_wallclock_ms(1_700_000_000_000), 1_700_000_000_000);
    /// ```
    fn from_wallclock_ms(wallclock_ms: u64) -> Self;

    /// The wall-clock instant this time stands for, in milliseconds since the Unix epoch (for wall-clock
    /// lag introspection). For product times, the outer coordinate.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Product, Timestamp};
    /// assert_eq!(42u64.to_wallclock_ms(), 42);
    /// assert_eq!(Product::new(42u64, 7u64).to_wallclock_ms(), 42);
    /// ```
    fn to_wallclock_ms(&self) -> u64;
}

impl Timestamp for u64 {
    fn join(&self, other: &Self) -> Self {
        std::cmp::max(*self, *other)
    }
    fn meet(&self, other: &Self) -> Self {
        std::cmp::min(*self, *other)
    }
    fn maximum() -> Self {
        u64::MAX
    }
    fn step_back(&self) -> Option<Self> {
        self.checked_sub(1)
    }
    fn step_forward(&self) -> Option<Self> {
        self.checked_add(1)
    }
    fn lag_and_round_down(&self, lag_ms: u64, granularity_ms: u64) -> Self {
        let lagged = self.saturating_sub(lag_ms);
        if granularity_ms == 0 { lagged } else { lagged - lagged % granularity_ms }
    }
    fn from_wallclock_ms(wallclock_ms: u64) -> Self {
        wallclock_ms
    }
    fn to_wallclock_ms(&self) -> u64 {
        *self
    }
}

impl Timestamp for Product<u64, u64> {
    fn join(&self, other: &Self) -> Self {
        Product::new(self.outer.join(&other.outer), self.inner.join(&other.inner))
    }
    fn meet(&self, other: &Self) -> Self {
        Product::new(self.outer.meet(&other.outer), self.inner.meet(&other.inner))
    }
    fn maximum() -> Self {
        Product::new(u64::MAX, u64::MAX)
    }
    fn step_back(&self) -> Option<Self> {
        Some(Product::new(self.outer.step_back()?, self.inner.step_back()?))
    }
    fn step_forward(&self) -> Option<Self> {
        Some(Product::new(self.outer.step_forward()?, self.inner.step_forward()?))
    }
    fn lag_and_round_down(&self, lag_ms: u64, granularity_ms: u64) -> Self {
        Product::new(
            self.outer.lag_and_round_down(lag_ms, granularity_ms),
            self.inner.lag_and_round_down(lag_ms, granularity_ms),
        )
    }
    fn from_wallclock_ms(wallclock_ms: u64) -> Self {
        Product::new(wallclock_ms, 0)
    }
    fn to_wallclock_ms(&self) -> u64 {
        self.outer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use timely::PartialOrder;

    fn product() -> impl Strategy<Value = Product<u64, u64>> {
        (0u64..20, 0u64..20).prop_map(|(a, b)| Product::new(a, b))
    }

    #[test]
    fn u64_lag_and_round_down_table() {
        // (time, lag, granularity, expected)
        let cases = [
            (0, 0, 0, 0),
            (0, 5, 10, 0),
            (999, 0, 1_000, 0),
            (1_000, 0, 1_000, 1_000),
            (1_999, 1, 1_000, 1_000),
            (u64::MAX, 0, 0, u64::MAX),
            (u64::MAX, u64::MAX, 7, 0),
        ];
        for (time, lag, granularity, expected) in cases {
            assert_eq!(time.lag_and_round_down(lag, granularity), expected, "{time} {lag} {granularity}");
        }
    }

    proptest! {
        #[test]
        fn product_join_is_the_least_upper_bound(a in product(), b in product(), c in product()) {
            let j = a.join(&b);
            prop_assert!(a.less_equal(&j) && b.less_equal(&j));
            if a.less_equal(&c) && b.less_equal(&c) {
                prop_assert!(j.less_equal(&c));
            }
        }

        #[test]
        fn product_meet_is_the_greatest_lower_bound(a in product(), b in product(), c in product()) {
            let m = a.meet(&b);
            prop_assert!(m.less_equal(&a) && m.less_equal(&b));
            if c.less_equal(&a) && c.less_equal(&b) {
                prop_assert!(c.less_equal(&m));
            }
        }

        #[test]
        fn lag_and_round_down_never_moves_forward_and_is_monotone(
            a in any::<u64>(), b in any::<u64>(), lag in 0u64..10_000, granularity in 0u64..5_000,
        ) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(lo.lag_and_round_down(lag, granularity) <= lo);
            prop_assert!(lo.lag_and_round_down(lag, granularity) <= hi.lag_and_round_down(lag, granularity));
        }

        #[test]
        fn step_back_is_strictly_below_and_maximal(a in 0u64..1_000) {
            match a.step_back() {
                None => prop_assert_eq!(a, 0),
                Some(b) => {
                    prop_assert!(b < a);
                    prop_assert_eq!(b.step_forward(), Some(a));
                }
            }
        }
    }
}
