//! The reference's own ordering of values and rows, written from the IR's documentation:
//!
//! - values of one type compare by value: `false < true`; integers, dates, timestamps and decimals
//!   numerically (decimals of different scales too); intervals by months, then days, then milliseconds;
//!   floats
//!   numerically with `0.0 == -0.0`, NaN equal to itself and greater than every other float; text by its
//!   UTF-8 bytes; byte strings lexicographically;
//! - `NULL` is less than every value in the *tie-break* order ([`compare_rows`]); in an ordering key its
//!   place is the key's `nulls_last`, and `desc` reverses the values only;
//! - an ordering by [`ColumnOrder`]s breaks ties by the whole row, column by column ascending, so it is
//!   total: rows that compare equal are identical.
//!
//! Values of different types never meet in a well-typed plan; they are ordered by a fixed rank of their
//! types so that the order stays total anyway.

use std::cmp::Ordering;

use super::value::Value;
use crate::plan::ColumnOrder;

/// Compares two floats: numerically, `0.0 == -0.0`, NaN equal to itself and greater than every number.
pub(crate) fn compare_floats(a: f64, b: f64) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => {
            if a < b {
                Ordering::Less
            } else if a > b {
                Ordering::Greater
            } else {
                // Equal numbers, including 0.0 and -0.0.
                Ordering::Equal
            }
        }
    }
}

/// The rank of a value's type in the total order (`NULL` first).
fn rank(value: &Value<'_>) -> u8 {
    match value {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Int(_) => 2,
        Value::Float(_) => 3,
        Value::Text(_) => 4,
        Value::Bytes(_) => 5,
        Value::Timestamp(_) => 6,
        Value::Decimal(..) => 7,
        Value::Date(_) => 8,
        Value::Interval(..) => 9,
    }
}

/// Compares two values: `NULL` first, then by type, then by value (see the module documentation).
pub(crate) fn compare_values(a: &Value<'_>, b: &Value<'_>) -> Ordering {
    match (a, b) {
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Int(x), Value::Int(y)) => x.cmp(y),
        (Value::Float(x), Value::Float(y)) => compare_floats(*x, *y),
        (Value::Text(x), Value::Text(y)) => compare_bytes(x.as_bytes(), y.as_bytes()),
        (Value::Bytes(x), Value::Bytes(y)) => compare_bytes(x, y),
        (Value::Timestamp(x), Value::Timestamp(y)) => x.cmp(y),
        (Value::Decimal(m, s), Value::Decimal(n, t)) => compare_decimals(*m, *s, *n, *t),
        (Value::Date(x), Value::Date(y)) => x.cmp(y),
        (Value::Interval(a, b, c), Value::Interval(x, y, z)) => (a, b, c).cmp(&(x, y, z)),
        (a, b) => rank(a).cmp(&rank(b)),
    }
}

/// Compares two decimals by value: each split into its integer part and its fraction in units of
/// `10^-28` (both with the number's sign, so the pairs order as the numbers do).
pub(crate) fn compare_decimals(m: i128, s: u32, n: i128, t: u32) -> Ordering {
    let split = |mantissa: i128, scale: u32| {
        let unit = 10i128.pow(scale);
        (mantissa / unit, (mantissa % unit) * 10i128.pow(28 - scale.min(28)))
    };
    split(m, s).cmp(&split(n, t))
}

/// Lexicographic comparison of byte strings, written out: the first differing byte decides, else the
/// shorter string is less.
fn compare_bytes(a: &[u8], b: &[u8]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        if x != y {
            return x.cmp(y);
        }
    }
    a.len().cmp(&b.len())
}

/// Whether two values are the same (equal in [`compare_values`]); `NULL` is the same as `NULL` here,
/// which is identity, not SQL's `=`.
pub(crate) fn same(a: &Value<'_>, b: &Value<'_>) -> bool {
    compare_values(a, b) == Ordering::Equal
}

/// Compares two rows by an ordering, then by the whole row (see the module documentation).
pub(crate) fn compare_rows(order: &[ColumnOrder], a: &[Value<'_>], b: &[Value<'_>]) -> Ordering {
    for key in order {
        let (x, y) = (a.get(key.column), b.get(key.column));
        let ordering = match (x, y) {
            (Some(x), Some(y)) => match (x.is_null(), y.is_null()) {
                (true, true) => Ordering::Equal,
                (true, false) => {
                    if key.nulls_last {
                        Ordering::Greater
                    } else {
                        Ordering::Less
                    }
                }
                (false, true) => {
                    if key.nulls_last {
                        Ordering::Less
                    } else {
                        Ordering::Greater
                    }
                }
                (false, false) => {
                    let ordering = compare_values(x, y);
                    if key.desc { ordering.reverse() } else { ordering }
                }
            },
            // A key beyond a row's arity (not in a validated plan): the shorter row first.
            (x, y) => x.is_some().cmp(&y.is_some()),
        };
        if ordering != Ordering::Equal {
            return ordering;
        }
    }
    for (x, y) in a.iter().zip(b) {
        let ordering = compare_values(x, y);
        if ordering != Ordering::Equal {
            return ordering;
        }
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_order_numerically_with_one_nan_above_everything() {
        let cases = [
            (1.0, 2.0, Ordering::Less),
            (-0.0, 0.0, Ordering::Equal),
            (f64::NAN, f64::INFINITY, Ordering::Greater),
            (f64::NAN, f64::NAN, Ordering::Equal),
            (f64::NEG_INFINITY, -1e300, Ordering::Less),
        ];
        for (a, b, expected) in cases {
            assert_eq!(compare_floats(a, b), expected, "{a} vs {b}");
            assert_eq!(compare_floats(b, a), expected.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn rows_order_by_keys_with_null_placement_then_by_the_whole_row() {
        let a = [Value::Int(1), Value::Null];
        let b = [Value::Int(2), Value::Int(0)];
        let cases = [
            (vec![ColumnOrder::asc(0)], Ordering::Less),
            (vec![ColumnOrder::desc(0)], Ordering::Greater),
            (vec![ColumnOrder::asc(1)], Ordering::Greater),
            (vec![ColumnOrder { column: 1, desc: false, nulls_last: false }], Ordering::Less),
            (vec![ColumnOrder { column: 1, desc: true, nulls_last: true }], Ordering::Greater),
            (vec![], Ordering::Less),
        ];
        for (order, expected) in cases {
            assert_eq!(compare_rows(&order, &a, &b), expected, "{order:?}");
        }
        // The tie-break puts NULL before values, whatever the key said.
        let c = [Value::Int(1), Value::Int(5)];
        assert_eq!(compare_rows(&[ColumnOrder::asc(0)], &a, &c), Ordering::Less);
        assert_eq!(compare_rows(&[], &[Value::Text("ab")], &[Value::Text("b")]), Ordering::Less);
        assert_eq!(compare_rows(&[], &[Value::Text("a")], &[Value::Text("ab")]), Ordering::Less);
    }
}
