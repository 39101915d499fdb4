//! The reference's own aggregates, written from [`AggregateFunc`]'s documentation (not by calling
//! [`AggregateFunc::eval`]): over a group's rows with their (positive) multiplicities,
//!
//! - `count` is the sum of the multiplicities of the non-null values;
//! - an integer `sum` is the exact sum of value × multiplicity over the non-null values, an error if
//!   that is not an `i64` (whatever order its terms come in);
//! - a float `sum` adds value × multiplicity (the multiplicity as a float) in the order of the rows'
//!   encodings, starting from `0.0` (float addition is not associative, so the order is part of the
//!   definition: it is the order in which an arrangement of the rows holds them);
//! - `min`/`max` are the least/greatest non-null value (by [`super::order::compare_values`]);
//! - a decimal `sum` is exact, an error if it is not a decimal (nor an intermediate within 128 bits);
//! - `count(*)` (`CountRows`) is the sum of every row's multiplicity, `NULL`s included;
//! - `avg` of floats is their `sum` over their count; of integers or decimals, their exact sum divided
//!   by their count with the IR's decimal division (`super::decimals`);
//! - `sum`, `avg`, `min` and `max` over no non-null value are `NULL`; `count` is then `0`.

use std::cmp::Ordering;

use super::decimals;
use super::order::compare_values;
use super::value::{Value, float};
use crate::expr::BinaryFunc;
use crate::expr::EvalError;
use crate::plan::AggregateFunc;

/// The aggregate of `values`: a group's values in the order of its rows' encodings, each with its
/// multiplicity (positive, and at most `i64::MAX`: the caller checked both).
pub(crate) fn aggregate<'a>(
    func: AggregateFunc,
    values: &[(Value<'a>, i128)],
) -> Result<Value<'a>, EvalError> {
    let non_null: Vec<(Value<'a>, i128)> = values.iter().filter(|(v, _)| !v.is_null()).copied().collect();
    match func {
        AggregateFunc::Count => {
            let count: i128 = non_null.iter().map(|(_, m)| m).sum();
            i64::try_from(count).map(Value::Int).map_err(|_| EvalError::Int64OutOfRange)
        }
        AggregateFunc::CountRows => {
            let rows: i128 = values.iter().map(|(_, m)| m).sum();
            i64::try_from(rows).map(Value::Int).map_err(|_| EvalError::Int64OutOfRange)
        }
        AggregateFunc::Sum => sum(&non_null),
        AggregateFunc::Avg => average(&non_null),
        AggregateFunc::Min => Ok(extreme(&non_null, Ordering::Less)),
        AggregateFunc::Max => Ok(extreme(&non_null, Ordering::Greater)),
    }
}

/// `avg`: `NULL` over nothing; of floats, their sum over their count as floats; of integers and
/// decimals, their exact sum (as a decimal) divided by their count with the IR's decimal division.
fn average<'a>(non_null: &[(Value<'a>, i128)]) -> Result<Value<'a>, EvalError> {
    if non_null.is_empty() {
        return Ok(Value::Null);
    }
    let count: i128 = non_null.iter().map(|(_, m)| m).sum();
    if non_null.iter().all(|(v, _)| matches!(v, Value::Float(_))) {
        let Value::Float(total) = sum(non_null)? else { unreachable!("a float sum") };
        return Ok(Value::Float(float(total / count as f64)));
    }
    let (mantissa, scale) = exact_sum(non_null)?;
    // The sum must be a decimal itself before it is divided.
    let Value::Decimal(mantissa, scale) = decimals::decimal(mantissa, scale)? else {
        unreachable!("a decimal")
    };
    decimals::arithmetic(BinaryFunc::Div, mantissa, scale, count, 0)
}

/// The exact sum of integer or decimal values (with multiplicities) as `(mantissa, scale)` at the
/// largest scale among them.
fn exact_sum(non_null: &[(Value<'_>, i128)]) -> Result<(i128, u32), EvalError> {
    let scale =
        non_null.iter().map(|(v, _)| if let Value::Decimal(_, s) = v { *s } else { 0 }).max().unwrap_or(0);
    let mut total: i128 = 0;
    for (value, multiplicity) in non_null {
        let (mantissa, own) = match value {
            Value::Int(i) => (i128::from(*i), 0),
            Value::Decimal(m, s) => (*m, *s),
            other => return Err(EvalError::Internal(format!("reference: exact sum of {}", other.kind()))),
        };
        let aligned = mantissa.checked_mul(10i128.pow(scale - own)).ok_or(EvalError::DecimalOutOfRange)?;
        let term = aligned.checked_mul(*multiplicity).ok_or(EvalError::DecimalOutOfRange)?;
        total = total.checked_add(term).ok_or(EvalError::DecimalOutOfRange)?;
    }
    Ok((total, scale))
}

fn sum<'a>(non_null: &[(Value<'a>, i128)]) -> Result<Value<'a>, EvalError> {
    if non_null.is_empty() {
        return Ok(Value::Null);
    }
    if non_null.iter().all(|(v, _)| matches!(v, Value::Int(_))) {
        let mut exact: i128 = 0;
        for (value, multiplicity) in non_null {
            let Value::Int(i) = value else { unreachable!("all integers") };
            // |i| <= 2^63 and multiplicity <= 2^63 - 1: the product fits in 127 bits; only a sum of
            // astronomically many extreme terms leaves i128, and its result would not fit i64 either.
            let term = i128::from(*i) * multiplicity;
            exact = exact.checked_add(term).ok_or(EvalError::Int64OutOfRange)?;
        }
        return i64::try_from(exact).map(Value::Int).map_err(|_| EvalError::Int64OutOfRange);
    }
    if non_null.iter().all(|(v, _)| matches!(v, Value::Decimal(..))) {
        let (mantissa, scale) = exact_sum(non_null)?;
        return decimals::decimal(mantissa, scale);
    }
    if non_null.iter().all(|(v, _)| matches!(v, Value::Float(_))) {
        let mut total = 0.0f64;
        for (value, multiplicity) in non_null {
            let Value::Float(x) = value else { unreachable!("all floats") };
            total += x * (*multiplicity as f64);
        }
        return Ok(Value::Float(float(total)));
    }
    let kinds: Vec<&str> = non_null.iter().map(|(v, _)| v.kind()).collect();
    Err(EvalError::Internal(format!("reference: sum of {kinds:?}")))
}

/// The value every other value is not `wanted` of: the least for `Less`, the greatest for `Greater`.
fn extreme<'a>(non_null: &[(Value<'a>, i128)], wanted: Ordering) -> Value<'a> {
    let mut best: Option<Value<'a>> = None;
    for (value, _) in non_null {
        best = match best {
            Some(current) if compare_values(value, &current) != wanted => Some(current),
            _ => Some(*value),
        };
    }
    best.unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_follow_their_documentation() {
        let values = [(Value::Int(3), 2), (Value::Null, 5), (Value::Int(-1), 1)];
        let int = |v: Result<Value<'_>, EvalError>| match v {
            Ok(Value::Int(i)) => Some(i),
            _ => None,
        };
        assert_eq!(int(aggregate(AggregateFunc::Count, &values)), Some(3));
        assert_eq!(int(aggregate(AggregateFunc::Sum, &values)), Some(5));
        assert_eq!(int(aggregate(AggregateFunc::Min, &values)), Some(-1));
        assert_eq!(int(aggregate(AggregateFunc::Max, &values)), Some(3));
        assert!(aggregate(AggregateFunc::Max, &[(Value::Null, 1)]).unwrap().is_null());
        assert!(aggregate(AggregateFunc::Sum, &[]).unwrap().is_null());
        assert_eq!(int(aggregate(AggregateFunc::Count, &[])), Some(0));
        let extremes = [(Value::Int(i64::MIN), 2), (Value::Int(i64::MAX), 2)];
        assert_eq!(int(aggregate(AggregateFunc::Sum, &extremes)), Some(-2), "only the result must fit");
        let over = [(Value::Int(i64::MAX), 1), (Value::Int(1), 1)];
        assert_eq!(aggregate(AggregateFunc::Sum, &over).map(|_| ()), Err(EvalError::Int64OutOfRange));
        let floats = [(Value::Float(1.5), 2), (Value::Float(f64::NAN), 1)];
        assert!(matches!(aggregate(AggregateFunc::Max, &floats), Ok(Value::Float(x)) if x.is_nan()));
        assert!(matches!(aggregate(AggregateFunc::Sum, &floats[..1]), Ok(Value::Float(x)) if x == 3.0));
    }
}
