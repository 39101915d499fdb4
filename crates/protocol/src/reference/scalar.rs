//! The reference's own evaluation of [`ScalarExpr`], written from the IR's documentation (`expr.rs`'s
//! module and variant docs), not by calling [`ScalarExpr::eval`]:
//!
//! - a column is the row's value; a literal its row's one value;
//! - `IS NULL` is never `NULL`; every other function of a `NULL` argument is `NULL`;
//! - `AND`/`OR` are Kleene's: the left operand first; `false AND x` is `false` and `true OR x` is `true`
//!   without evaluating `x` (so `x`'s errors do not happen); otherwise both are evaluated;
//! - other binary functions evaluate the left operand, then the right, then (neither `NULL`) compute;
//! - integer `+ - * /` and negation err with [`EvalError::Int64OutOfRange`] when the exact result is not
//!   an `i64`; `/` truncates toward zero; `/` and `%` by zero err with [`EvalError::DivisionByZero`];
//!   `%` takes the sign of the dividend and is exact (`i64::MIN % -1` is `0`);
//! - float arithmetic is IEEE 754 (division by zero gives an infinity or NaN, never an error), with the
//!   result canonicalised (no `-0.0`, one NaN);
//! - comparisons compare two values of one type by [`super::order::compare_values`];
//! - `IF` evaluates the condition, then only the branch it takes (`NULL` takes `else`);
//! - anything ill-typed is [`EvalError::Internal`].

use std::cmp::Ordering;

use super::order::compare_values;
use super::value::{Value, float, values};
use super::{dates, decimals};
use crate::expr::{BinaryFunc, EvalError, ScalarExpr, UnaryFunc, VariadicFunc};
use crate::row::ScalarType;

/// Evaluates `expr` over the values of one row.
pub(crate) fn eval<'a>(expr: &'a ScalarExpr, row: &[Value<'a>]) -> Result<Value<'a>, EvalError> {
    match expr {
        ScalarExpr::Column(column) => row
            .get(*column)
            .copied()
            .ok_or_else(|| EvalError::Internal(format!("column {column} of a row of {}", row.len()))),
        ScalarExpr::Literal(literal, _) => values(literal)
            .first()
            .copied()
            .ok_or_else(|| EvalError::Internal("a literal without a value".to_string())),
        ScalarExpr::CallUnary { func, expr } => unary(*func, eval(expr, row)?),
        ScalarExpr::CallBinary { func: BinaryFunc::And, expr1, expr2 } => {
            let left = eval(expr1, row)?;
            if let Value::Bool(false) = left {
                return Ok(Value::Bool(false));
            }
            let right = eval(expr2, row)?;
            match (left, right) {
                (_, Value::Bool(false)) => Ok(Value::Bool(false)),
                (Value::Bool(true), Value::Bool(r)) => Ok(Value::Bool(r)),
                (Value::Bool(true) | Value::Null, Value::Null) | (Value::Null, Value::Bool(true)) => {
                    Ok(Value::Null)
                }
                (l, r) => Err(ill_typed("And", &[l, r])),
            }
        }
        ScalarExpr::CallBinary { func: BinaryFunc::Or, expr1, expr2 } => {
            let left = eval(expr1, row)?;
            if let Value::Bool(true) = left {
                return Ok(Value::Bool(true));
            }
            let right = eval(expr2, row)?;
            match (left, right) {
                (_, Value::Bool(true)) => Ok(Value::Bool(true)),
                (Value::Bool(false), Value::Bool(r)) => Ok(Value::Bool(r)),
                (Value::Bool(false) | Value::Null, Value::Null) | (Value::Null, Value::Bool(false)) => {
                    Ok(Value::Null)
                }
                (l, r) => Err(ill_typed("Or", &[l, r])),
            }
        }
        ScalarExpr::CallBinary { func: BinaryFunc::NullIf, expr1, expr2 } => {
            let left = eval(expr1, row)?;
            let right = eval(expr2, row)?;
            if left.is_null() || right.is_null() {
                return Ok(left);
            }
            match binary(BinaryFunc::Eq, left, right)? {
                Value::Bool(true) => Ok(Value::Null),
                _ => Ok(left),
            }
        }
        ScalarExpr::CallBinary { func, expr1, expr2 } => {
            let left = eval(expr1, row)?;
            let right = eval(expr2, row)?;
            if left.is_null() || right.is_null() {
                return Ok(Value::Null);
            }
            binary(*func, left, right)
        }
        ScalarExpr::If { cond, then, els } => match eval(cond, row)? {
            Value::Bool(true) => eval(then, row),
            Value::Bool(false) | Value::Null => eval(els, row),
            other => Err(ill_typed("If", &[other])),
        },
        ScalarExpr::Like { expr, pattern } => match eval(expr, row)? {
            Value::Null => Ok(Value::Null),
            Value::Text(text) => Ok(Value::Bool(like(text, pattern.pattern()))),
            other => Err(ill_typed("Like", &[other])),
        },
        ScalarExpr::CallVariadic { func: VariadicFunc::Coalesce, exprs } => {
            for expr in exprs {
                let value = eval(expr, row)?;
                if !value.is_null() {
                    return Ok(value);
                }
            }
            Ok(Value::Null)
        }
        ScalarExpr::CallVariadic { func: VariadicFunc::In, exprs } => {
            let arguments = exprs.iter().map(|e| eval(e, row)).collect::<Result<Vec<_>, _>>()?;
            let Some((needle, list)) = arguments.split_first() else {
                return Err(ill_typed("In", &[]));
            };
            if needle.is_null() {
                return Ok(Value::Null);
            }
            let mut any_null = false;
            for item in list {
                if item.is_null() {
                    any_null = true;
                } else if matches!(binary(BinaryFunc::Eq, *needle, *item)?, Value::Bool(true)) {
                    return Ok(Value::Bool(true));
                }
            }
            Ok(if any_null { Value::Null } else { Value::Bool(false) })
        }
        ScalarExpr::CallVariadic { func: VariadicFunc::Substring, exprs } => {
            let arguments = exprs.iter().map(|e| eval(e, row)).collect::<Result<Vec<_>, _>>()?;
            if arguments.iter().any(Value::is_null) {
                return Ok(Value::Null);
            }
            match arguments.as_slice() {
                [Value::Text(text), Value::Int(start)] => Ok(Value::Text(substring(text, *start, None)?)),
                [Value::Text(text), Value::Int(start), Value::Int(length)] => {
                    Ok(Value::Text(substring(text, *start, Some(*length))?))
                }
                other => Err(ill_typed("Substring", other)),
            }
        }
    }
}

/// `LIKE`, by dynamic programming over prefixes: `matched[j]` says whether the text's first `i`
/// characters match the pattern's first `j`. `%` matches any run, `_` one character, anything else
/// itself.
fn like(text: &str, pattern: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    let pattern: Vec<char> = pattern.chars().collect();
    // Row 0: the empty text matches a pattern prefix of only `%`s.
    let mut matched: Vec<bool> = vec![false; pattern.len() + 1];
    matched[0] = true;
    for j in 1..=pattern.len() {
        matched[j] = matched[j - 1] && pattern[j - 1] == '%';
    }
    for c in &text {
        let mut next = vec![false; pattern.len() + 1];
        for j in 1..=pattern.len() {
            next[j] = match pattern[j - 1] {
                // `%` takes nothing (next[j - 1]) or this character too (matched[j]).
                '%' => next[j - 1] || matched[j],
                '_' => matched[j - 1],
                p => matched[j - 1] && p == *c,
            };
        }
        matched = next;
    }
    matched[pattern.len()]
}

/// `substring(text FROM start FOR length)`: the characters at positions (from 1) `start` to
/// `start + length - 1` that exist; without a length, to the end.
fn substring(text: &str, start: i64, length: Option<i64>) -> Result<&str, EvalError> {
    if length.is_some_and(|l| l < 0) {
        return Err(EvalError::NegativeSubstringLength);
    }
    let mut first_byte = None;
    let mut end_byte = text.len();
    for (index, (byte, _)) in text.char_indices().enumerate() {
        let position = index as i128 + 1;
        let wanted = position >= i128::from(start)
            && length.is_none_or(|l| position < i128::from(start) + i128::from(l));
        if wanted && first_byte.is_none() {
            first_byte = Some(byte);
        }
        if !wanted && first_byte.is_some() {
            end_byte = byte;
            break;
        }
    }
    Ok(first_byte.map_or("", |first| &text[first..end_byte]))
}

fn ill_typed(func: &str, arguments: &[Value<'_>]) -> EvalError {
    let kinds: Vec<&str> = arguments.iter().map(Value::kind).collect();
    EvalError::Internal(format!("reference: {func} of {kinds:?}"))
}

fn unary(func: UnaryFunc, argument: Value<'_>) -> Result<Value<'_>, EvalError> {
    match (func, argument) {
        (UnaryFunc::IsNull, argument) => Ok(Value::Bool(argument.is_null())),
        (_, Value::Null) => Ok(Value::Null),
        (UnaryFunc::Neg, Value::Decimal(m, s)) => Ok(Value::Decimal(-m, s)),
        (UnaryFunc::Abs, Value::Int(i)) => {
            if i == i64::MIN {
                Err(EvalError::Int64OutOfRange)
            } else {
                Ok(Value::Int(if i < 0 { -i } else { i }))
            }
        }
        (UnaryFunc::Abs, Value::Float(x)) => Ok(Value::Float(float(if x < 0.0 { -x } else { x }))),
        (UnaryFunc::Abs, Value::Decimal(m, s)) => Ok(Value::Decimal(if m < 0 { -m } else { m }, s)),
        (UnaryFunc::Round(scale), Value::Decimal(m, s)) => Ok(decimals::round(m, s, u32::from(scale))),
        (UnaryFunc::ExtractYear | UnaryFunc::ExtractMonth | UnaryFunc::ExtractDay, value) => {
            let day = match value {
                Value::Date(day) => i64::from(day),
                Value::Timestamp(ms) => (ms / dates::DAY_MS) as i64,
                other => return Err(ill_typed(&format!("{func:?}"), &[other])),
            };
            let (year, month, day) = dates::civil(day);
            Ok(Value::Int(match func {
                UnaryFunc::ExtractYear => year,
                UnaryFunc::ExtractMonth => month,
                _ => day,
            }))
        }
        (UnaryFunc::Cast(target), value) => cast(value, target),
        (UnaryFunc::Not, Value::Bool(b)) => Ok(Value::Bool(!b)),
        (UnaryFunc::Neg, Value::Int(i)) => {
            if i == i64::MIN {
                Err(EvalError::Int64OutOfRange)
            } else {
                Ok(Value::Int(-i))
            }
        }
        (UnaryFunc::Neg, Value::Float(x)) => Ok(Value::Float(float(-x))),
        (func, argument) => Err(ill_typed(&format!("{func:?}"), &[argument])),
    }
}

/// A binary function of two non-null values, other than `AND` and `OR`.
fn binary<'a>(func: BinaryFunc, left: Value<'a>, right: Value<'a>) -> Result<Value<'a>, EvalError> {
    use BinaryFunc::*;
    let comparison = |accept: fn(Ordering) -> bool| {
        // Values of one kind compare (decimals of any scales among them).
        if std::mem::discriminant(&left) != std::mem::discriminant(&right) {
            return Err(ill_typed(&format!("{func:?}"), &[left, right]));
        }
        Ok(Value::Bool(accept(compare_values(&left, &right))))
    };
    match func {
        Eq => comparison(|o| o == Ordering::Equal),
        NotEq => comparison(|o| o != Ordering::Equal),
        Lt => comparison(|o| o == Ordering::Less),
        Lte => comparison(|o| o != Ordering::Greater),
        Gt => comparison(|o| o == Ordering::Greater),
        Gte => comparison(|o| o != Ordering::Less),
        Add | Sub | Mul | Div | Mod => match (left, right) {
            (Value::Int(x), Value::Int(y)) => integer_arithmetic(func, x, y).map(Value::Int),
            (Value::Float(x), Value::Float(y)) => {
                let result = match func {
                    Add => x + y,
                    Sub => x - y,
                    Mul => x * y,
                    Div => x / y,
                    _ => return Err(ill_typed(&format!("{func:?}"), &[left, right])),
                };
                Ok(Value::Float(float(result)))
            }
            (Value::Decimal(m, s), Value::Decimal(n, t)) => decimals::arithmetic(func, m, s, n, t),
            (Value::Date(day), Value::Interval(months, days, ms)) if matches!(func, Add | Sub) => {
                let sign = if func == Sub { -1 } else { 1 };
                let shifted = dates::add(i64::from(day) * dates::DAY_MS as i64, sign, months, days, ms)?;
                // The date of the result's midnight.
                Ok(Value::Date(
                    i32::try_from(shifted.div_euclid(dates::DAY_MS as i64))
                        .map_err(|_| EvalError::DateOutOfRange)?,
                ))
            }
            (Value::Timestamp(t), Value::Interval(months, days, ms)) if matches!(func, Add | Sub) => {
                let sign = if func == Sub { -1 } else { 1 };
                let start = i64::try_from(t).map_err(|_| EvalError::DateOutOfRange)?;
                let shifted = dates::add(start, sign, months, days, ms)?;
                u64::try_from(shifted).map(Value::Timestamp).map_err(|_| EvalError::DateOutOfRange)
            }
            (Value::Date(x), Value::Date(y)) if func == Sub => Ok(Value::Int(i64::from(x) - i64::from(y))),
            _ => Err(ill_typed(&format!("{func:?}"), &[left, right])),
        },
        And | Or | NullIf => {
            Err(EvalError::Internal("reference: And, Or and NullIf are evaluated above".to_string()))
        }
    }
}

/// `CAST(value AS target)` of a non-null value, as `UnaryFunc::Cast` documents it.
fn cast(value: Value<'_>, target: ScalarType) -> Result<Value<'_>, EvalError> {
    match (value, target) {
        (Value::Int(i), ScalarType::Float64) => Ok(Value::Float(float(i as f64))),
        (Value::Int(i), ScalarType::Decimal { .. }) => Ok(Value::Decimal(i128::from(i), 0)),
        (Value::Decimal(m, s), ScalarType::Decimal { scale }) => Ok(decimals::round(m, s, u32::from(scale))),
        (Value::Decimal(m, s), ScalarType::Int64) => match decimals::round(m, s, 0) {
            Value::Decimal(integer, _) => {
                i64::try_from(integer).map(Value::Int).map_err(|_| EvalError::Int64OutOfRange)
            }
            other => Err(ill_typed("Cast", &[other])),
        },
        (Value::Decimal(m, s), ScalarType::Float64) => {
            // The nearest float to the decimal's exact value: the standard library's parsing of its
            // digits rounds correctly.
            let text = decimals::format(m, s);
            text.parse::<f64>().map(|x| Value::Float(float(x))).map_err(|_| EvalError::InvalidCast(text))
        }
        (Value::Date(day), ScalarType::Timestamp) => u64::try_from(i64::from(day) * dates::DAY_MS as i64)
            .map(Value::Timestamp)
            .map_err(|_| EvalError::DateOutOfRange),
        (Value::Timestamp(ms), ScalarType::Date) => {
            i32::try_from(ms / dates::DAY_MS).map(Value::Date).map_err(|_| EvalError::DateOutOfRange)
        }
        (value, target) => {
            let same = matches!(
                (value, target),
                (Value::Bool(_), ScalarType::Bool)
                    | (Value::Int(_), ScalarType::Int64)
                    | (Value::Float(_), ScalarType::Float64)
                    | (Value::Text(_), ScalarType::Text)
                    | (Value::Bytes(_), ScalarType::Bytes)
                    | (Value::Timestamp(_), ScalarType::Timestamp)
                    | (Value::Date(_), ScalarType::Date)
                    | (Value::Interval(..), ScalarType::Interval)
            );
            if same { Ok(value) } else { Err(ill_typed(&format!("Cast to {target:?}"), &[value])) }
        }
    }
}

/// Integer arithmetic, computed exactly in 128 bits and then checked against the range of `i64`.
fn integer_arithmetic(func: BinaryFunc, x: i64, y: i64) -> Result<i64, EvalError> {
    let (x, y) = (i128::from(x), i128::from(y));
    let exact = match func {
        BinaryFunc::Add => x + y,
        BinaryFunc::Sub => x - y,
        BinaryFunc::Mul => x * y,
        BinaryFunc::Div | BinaryFunc::Mod if y == 0 => return Err(EvalError::DivisionByZero),
        // i128's `/` truncates toward zero and its `%` takes the dividend's sign, as the IR's do; with
        // 64-bit operands neither can overflow 128 bits.
        BinaryFunc::Div => x / y,
        BinaryFunc::Mod => x % y,
        other => return Err(EvalError::Internal(format!("reference: {other:?} is not arithmetic"))),
    };
    i64::try_from(exact).map_err(|_| EvalError::Int64OutOfRange)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::{Datum, ScalarType};

    fn lit(datum: Datum<'_>) -> ScalarExpr {
        ScalarExpr::literal(datum)
    }

    #[test]
    fn the_reference_evaluates_the_documented_semantics() {
        use BinaryFunc::*;
        let int = |i| lit(Datum::Int64(i));
        let null_int = ScalarExpr::null(ScalarType::Int64);
        let t = lit(Datum::Bool(true));
        let f = lit(Datum::Bool(false));
        let null_bool = ScalarExpr::null(ScalarType::Bool);
        let fails = int(1).call_binary(Div, int(0)).call_binary(Eq, int(1));
        let cases: Vec<(ScalarExpr, Result<Datum<'static>, EvalError>)> = vec![
            (int(7).call_binary(Div, int(-2)), Ok(Datum::Int64(-3))),
            (int(-7).call_binary(Mod, int(2)), Ok(Datum::Int64(-1))),
            (int(i64::MIN).call_binary(Mod, int(-1)), Ok(Datum::Int64(0))),
            (int(i64::MIN).call_binary(Div, int(-1)), Err(EvalError::Int64OutOfRange)),
            (int(i64::MAX).call_binary(Add, int(1)), Err(EvalError::Int64OutOfRange)),
            (int(i64::MIN).call_unary(UnaryFunc::Neg), Err(EvalError::Int64OutOfRange)),
            (int(1).call_binary(Mod, int(0)), Err(EvalError::DivisionByZero)),
            (null_int.clone().call_binary(Div, int(0)), Ok(Datum::Null)),
            (
                null_int.clone().call_binary(Add, int(1).call_binary(Div, int(0))),
                Err(EvalError::DivisionByZero),
            ),
            (f.clone().call_binary(And, fails.clone()), Ok(Datum::Bool(false))),
            (t.clone().call_binary(Or, fails.clone()), Ok(Datum::Bool(true))),
            (null_bool.clone().call_binary(And, fails.clone()), Err(EvalError::DivisionByZero)),
            (null_bool.clone().call_binary(And, f.clone()), Ok(Datum::Bool(false))),
            (null_bool.clone().call_binary(Or, t.clone()), Ok(Datum::Bool(true))),
            (t.clone().call_binary(And, null_bool.clone()), Ok(Datum::Null)),
            (null_bool.clone().if_then_else(int(1), int(2)), Ok(Datum::Int64(2))),
            (t.clone().if_then_else(int(1), fails.clone()), Ok(Datum::Int64(1))),
            (null_int.clone().call_unary(UnaryFunc::IsNull), Ok(Datum::Bool(true))),
            (null_int.call_binary(Lt, int(1)), Ok(Datum::Null)),
            (
                lit(Datum::float64(-1.0)).call_binary(Div, lit(Datum::float64(0.0))),
                Ok(Datum::float64(f64::NEG_INFINITY)),
            ),
            (
                lit(Datum::float64(0.0)).call_binary(Div, lit(Datum::float64(0.0))),
                Ok(Datum::float64(f64::NAN)),
            ),
            (
                lit(Datum::float64(f64::NAN)).call_binary(Eq, lit(Datum::float64(f64::NAN))),
                Ok(Datum::Bool(true)),
            ),
            (lit(Datum::Text("ab")).call_binary(Lt, lit(Datum::Text("b"))), Ok(Datum::Bool(true))),
            (int(1).call_binary(Add, lit(Datum::Text("x"))), Err(EvalError::Internal(String::new()))),
        ];
        for (expr, expected) in cases {
            let result = eval(&expr, &[]).map(|v| super::super::value::row([&v]));
            match (&result, &expected) {
                (Err(EvalError::Internal(_)), Err(EvalError::Internal(_))) => {}
                (Ok(row), Ok(datum)) => assert_eq!(row.unpack(), vec![*datum], "{expr:?}"),
                _ => assert_eq!(result.map(|_| ()), expected.map(|_| ()), "{expr:?}"),
            }
        }
    }
}
