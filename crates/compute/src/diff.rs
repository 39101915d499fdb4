//! [`CheckedDiff`]: the multiplicity of an update inside a dataflow.
//!
//! **What this is.** A difference type for differential dataflow (`Semigroup`, `Monoid`, `Abelian`,
//! `Multiply`) that computes multiplicities *exactly* in 128 bits, so that sums (consolidation, in any
//! order), negations and join products never wrap and never panic, in release builds as in debug ones.
//! The protocol's multiplicities are `i64` ([`protocol::Diff`]); a `CheckedDiff` becomes one again only
//! where a multiplicity is observed, and there the conversion is checked ([`CheckedDiff::to_i64`]): a
//! multiplicity beyond `i64` is then an error of the dataflow, as the plan IR specifies (`protocol`'s
//! `plan.rs`, "Multiplicities"), never a wrapped value.
//!
//! **Capacity.** A result beyond 128 bits (possible only for products of several join inputs whose
//! multiplicities are near `2^63`) becomes [`CheckedDiff::OVERFLOW`], a sticky value: any sum, negation
//! or product with it is `OVERFLOW` again, it is never zero (so consolidation never drops it), and every
//! place that observes a multiplicity treats it as an error. So no answer is ever computed from a
//! multiplicity that overflowed; a dataflow that met one answers with an error for every time its
//! result still holds it.
//!
//! **What this is not.** Not a general big integer: the capacity above is the design's limit, stated in
//! `protocol::reference`'s documentation, where the reference meets it on accumulated multiplicities and
//! this type on the replica's individual updates.
//!
//! **Invariant:** the value `i128::MIN` is only ever [`CheckedDiff::OVERFLOW`]; every other value is
//! exact.
//!
//! **Tests.** The unit tests below (each rule as a table); `tests/it/operators.rs` (overflowing joins and
//! reduces against the reference, with extreme multiplicities in the random cases).

use differential_dataflow::difference::{Abelian, IsZero, Monoid, Multiply, Semigroup};
use serde::{Deserialize, Serialize};

/// A multiplicity inside a dataflow: exact in 128 bits, with a sticky overflow (see the module docs).
///
/// Stored as two 64-bit halves (16 bytes, 8-byte aligned, where an `i128` would be 16-byte aligned and
/// pad every `(row, time, diff)` update); the derived order on `(high, low)` is the numeric order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub(crate) struct CheckedDiff {
    high: i64,
    low: u64,
}

impl CheckedDiff {
    /// Zero.
    pub(crate) const ZERO: CheckedDiff = CheckedDiff::exact(0);
    /// One.
    pub(crate) const ONE: CheckedDiff = CheckedDiff::exact(1);
    /// A result that left 128 bits.
    pub(crate) const OVERFLOW: CheckedDiff = CheckedDiff { high: i64::MIN, low: 0 };

    const fn exact(value: i128) -> CheckedDiff {
        CheckedDiff { high: (value >> 64) as i64, low: value as u64 }
    }

    fn value(self) -> i128 {
        (i128::from(self.high) << 64) | i128::from(self.low)
    }

    /// The value of a checked result, `OVERFLOW` for none (or for `i128::MIN`, which stands for it).
    fn checked(result: Option<i128>) -> CheckedDiff {
        match result {
            Some(value) if value != i128::MIN => CheckedDiff::exact(value),
            _ => CheckedDiff::OVERFLOW,
        }
    }

    /// An exact value (`OVERFLOW` for `i128::MIN`, which stands for it): an accumulated sum's term.
    pub(crate) fn from_i128(value: i128) -> CheckedDiff {
        CheckedDiff::checked(Some(value))
    }

    /// The value, if it did not overflow.
    pub(crate) fn to_i128(self) -> Option<i128> {
        (!self.is_overflow()).then(|| self.value())
    }

    /// Whether this is the sticky overflow.
    pub(crate) fn is_overflow(self) -> bool {
        self == CheckedDiff::OVERFLOW
    }

    /// Whether the multiplicity is below zero (`OVERFLOW` is: it is not a count of anything).
    pub(crate) fn is_negative(self) -> bool {
        self.high < 0
    }

    /// Whether the multiplicity is above zero (never for `OVERFLOW`).
    pub(crate) fn is_positive(self) -> bool {
        !self.is_negative() && !self.is_zero()
    }

    /// The multiplicity as the protocol's `i64`, or `None` if it is not one (or is `OVERFLOW`).
    pub(crate) fn to_i64(self) -> Option<i64> {
        if self.is_overflow() { None } else { i64::try_from(self.value()).ok() }
    }

    /// The multiplicity as a count of rows: `None` if it is negative, not an `i64`, or `OVERFLOW`.
    pub(crate) fn to_count(self) -> Option<u64> {
        self.to_i64().and_then(|value| u64::try_from(value).ok())
    }

    /// The sum of some multiplicities.
    pub(crate) fn sum<'a>(diffs: impl IntoIterator<Item = &'a CheckedDiff>) -> CheckedDiff {
        let mut total = CheckedDiff::ZERO;
        for diff in diffs {
            total.plus_equals(diff);
        }
        total
    }
}

impl From<i64> for CheckedDiff {
    fn from(value: i64) -> Self {
        CheckedDiff::exact(i128::from(value))
    }
}

impl std::fmt::Display for CheckedDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_overflow() { write!(f, "overflow") } else { write!(f, "{}", self.value()) }
    }
}

impl From<i8> for CheckedDiff {
    fn from(value: i8) -> Self {
        CheckedDiff::exact(i128::from(value))
    }
}

impl IsZero for CheckedDiff {
    #[inline]
    fn is_zero(&self) -> bool {
        self.high == 0 && self.low == 0
    }
}

impl Semigroup for CheckedDiff {
    #[inline]
    fn plus_equals(&mut self, rhs: &Self) {
        *self = if self.is_overflow() || rhs.is_overflow() {
            CheckedDiff::OVERFLOW
        } else {
            CheckedDiff::checked(self.value().checked_add(rhs.value()))
        };
    }
}

impl Monoid for CheckedDiff {
    #[inline]
    fn zero() -> Self {
        CheckedDiff::ZERO
    }
}

impl Abelian for CheckedDiff {
    #[inline]
    fn negate(&mut self) {
        // `OVERFLOW` is `i128::MIN`, whose negation overflows: it stays `OVERFLOW`.
        *self = CheckedDiff::checked(self.value().checked_neg());
    }
}

impl Multiply<CheckedDiff> for CheckedDiff {
    type Output = CheckedDiff;

    #[inline]
    fn multiply(self, rhs: &CheckedDiff) -> CheckedDiff {
        if self.is_overflow() || rhs.is_overflow() {
            CheckedDiff::OVERFLOW
        } else {
            CheckedDiff::checked(self.value().checked_mul(rhs.value()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(value: i128) -> CheckedDiff {
        CheckedDiff::checked(Some(value))
    }

    #[test]
    fn arithmetic_is_exact_in_128_bits_and_overflow_is_sticky() {
        let max = i128::from(i64::MAX);
        let plus = |mut a: CheckedDiff, b: CheckedDiff| {
            a.plus_equals(&b);
            a
        };
        let negated = |mut a: CheckedDiff| {
            a.negate();
            a
        };
        let cases: Vec<(&str, CheckedDiff, CheckedDiff)> = vec![
            ("i64::MAX + i64::MAX is exact", plus(d(max), d(max)), d(2 * max)),
            ("and comes back", plus(plus(d(max), d(max)), d(-max)), d(max)),
            ("a product of two i64s is exact", d(max).multiply(&d(max)), d(max * max)),
            ("a product beyond 128 bits overflows", d(max * max).multiply(&d(4)), CheckedDiff::OVERFLOW),
            ("a sum beyond 128 bits overflows", plus(d(i128::MAX), d(1)), CheckedDiff::OVERFLOW),
            ("i128::MIN itself is no value", plus(d(i128::MIN + 1), d(-1)), CheckedDiff::OVERFLOW),
            ("overflow plus anything is overflow", plus(CheckedDiff::OVERFLOW, d(1)), CheckedDiff::OVERFLOW),
            ("anything plus overflow is overflow", plus(d(1), CheckedDiff::OVERFLOW), CheckedDiff::OVERFLOW),
            (
                "overflow never cancels",
                plus(CheckedDiff::OVERFLOW, negated(CheckedDiff::OVERFLOW)),
                CheckedDiff::OVERFLOW,
            ),
            ("overflow times zero is overflow", CheckedDiff::OVERFLOW.multiply(&d(0)), CheckedDiff::OVERFLOW),
            ("negation is exact", negated(d(-max - 1)), d(max + 1)),
        ];
        for (name, actual, expected) in cases {
            assert_eq!(actual, expected, "{name}");
        }
    }

    #[test]
    fn conversions_check_the_range_of_i64() {
        let max = i128::from(i64::MAX);
        // (diff, to_i64, to_count, is_negative, is_positive)
        type Case = (CheckedDiff, Option<i64>, Option<u64>, bool, bool);
        let cases: Vec<Case> = vec![
            (d(0), Some(0), Some(0), false, false),
            (d(5), Some(5), Some(5), false, true),
            (d(-5), Some(-5), None, true, false),
            (d(max), Some(i64::MAX), Some(i64::MAX as u64), false, true),
            (d(max + 1), None, None, false, true),
            (d(-max - 1), Some(i64::MIN), None, true, false),
            (d(-max - 2), None, None, true, false),
            (CheckedDiff::OVERFLOW, None, None, true, false),
        ];
        for (diff, to_i64, to_count, negative, positive) in cases {
            assert_eq!(diff.to_i64(), to_i64, "{diff:?}");
            assert_eq!(diff.to_count(), to_count, "{diff:?}");
            assert_eq!(diff.is_negative(), negative, "{diff:?}");
            assert_eq!(diff.is_positive(), positive, "{diff:?}");
        }
        assert!(!CheckedDiff::OVERFLOW.is_zero());
        assert!(d(max + 1) > d(max) && d(-1) < d(0) && d(-max * 5) < d(-1), "the order is numeric");
        assert_eq!(std::mem::size_of::<(protocol::Row, u64, CheckedDiff)>(), 56);
    }
}
