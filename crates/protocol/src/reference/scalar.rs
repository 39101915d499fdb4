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
use crate::expr::{BinaryFunc, EvalError, ScalarExpr, UnaryFunc};

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
    }
}

fn ill_typed(func: &str, arguments: &[Value<'_>]) -> EvalError {
    let kinds: Vec<&str> = arguments.iter().map(Value::kind).collect();
    EvalError::Internal(format!("reference: {func} of {kinds:?}"))
}

fn unary(func: UnaryFunc, argument: Value<'_>) -> Result<Value<'_>, EvalError> {
    match (func, argument) {
        (UnaryFunc::IsNull, argument) => Ok(Value::Bool(argument.is_null())),
        (_, Value::Null) => Ok(Value::Null),
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
            _ => Err(ill_typed(&format!("{func:?}"), &[left, right])),
        },
        And | Or => Err(EvalError::Internal("reference: And/Or are evaluated lazily above".to_string())),
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
