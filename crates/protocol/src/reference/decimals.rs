//! The reference's own decimal arithmetic, written from the IR's documentation (`BinaryFunc`,
//! `UnaryFunc::Round`, `UnaryFunc::Cast`): a decimal is `mantissa * 10^-scale`, and every decimal the
//! reference makes is canonical (no trailing zeros after the point), because the IR's division rounds at
//! the *values'* scales plus 6.
//!
//! - `+` and `-` align both operands to the larger scale (each aligned mantissa, and the result, must fit
//!   128 bits), then add;
//! - `*` multiplies the mantissas (the product must fit 128 bits) and adds the scales;
//! - `/` computes the quotient at scale `q = min(28, max(s, t) + 6)` rounded half away from zero: with
//!   `e = q + t`, `m * 10^(e - s) / n` if `e >= s`, else `m / (n * 10^(s - e))` (the scaled operand must
//!   fit 128 bits); by zero it is [`EvalError::DivisionByZero`];
//! - every result must be a decimal of the data model (canonically, scale at most 28 and a mantissa
//!   below `2^96`), else [`EvalError::DecimalOutOfRange`].

use super::value::{Value, canonical_decimal, is_decimal};
use crate::expr::{BinaryFunc, EvalError};

/// The canonical decimal `mantissa * 10^-scale`, or out of range.
pub(crate) fn decimal(mantissa: i128, scale: u32) -> Result<Value<'static>, EvalError> {
    if !is_decimal(mantissa, scale) {
        return Err(EvalError::DecimalOutOfRange);
    }
    let (mantissa, scale) = canonical_decimal(mantissa, scale);
    Ok(Value::Decimal(mantissa, scale))
}

/// `mantissa * 10^exponent`, if it fits 128 bits.
fn scaled(mantissa: i128, exponent: u32) -> Result<i128, EvalError> {
    let mut value = mantissa;
    for _ in 0..exponent {
        value = value.checked_mul(10).ok_or(EvalError::DecimalOutOfRange)?;
    }
    Ok(value)
}

/// `dividend / divisor` rounded half away from zero.
fn rounded_quotient(dividend: i128, divisor: i128) -> i128 {
    let negative = (dividend < 0) != (divisor < 0);
    let (a, b) = (dividend.unsigned_abs(), divisor.unsigned_abs());
    let (quotient, remainder) = (a / b, a % b);
    // Half or more of the divisor left over: away from zero.
    let magnitude = if remainder >= b - remainder { quotient + 1 } else { quotient };
    let magnitude = i128::try_from(magnitude).expect("a quotient of 128-bit integers by at least 1");
    if negative { -magnitude } else { magnitude }
}

/// `m/10^s func n/10^t`.
pub(crate) fn arithmetic(
    func: BinaryFunc,
    m: i128,
    s: u32,
    n: i128,
    t: u32,
) -> Result<Value<'static>, EvalError> {
    match func {
        BinaryFunc::Add | BinaryFunc::Sub => {
            let scale = s.max(t);
            let (a, b) = (scaled(m, scale - s)?, scaled(n, scale - t)?);
            let result = if func == BinaryFunc::Add { a.checked_add(b) } else { a.checked_sub(b) };
            decimal(result.ok_or(EvalError::DecimalOutOfRange)?, scale)
        }
        BinaryFunc::Mul => decimal(m.checked_mul(n).ok_or(EvalError::DecimalOutOfRange)?, s + t),
        BinaryFunc::Div => {
            if n == 0 {
                return Err(EvalError::DivisionByZero);
            }
            let q = (s.max(t) + 6).min(28);
            let e = q + t;
            let quotient = if e >= s {
                rounded_quotient(scaled(m, e - s)?, n)
            } else {
                rounded_quotient(m, scaled(n, s - e)?)
            };
            decimal(quotient, q)
        }
        other => Err(EvalError::Internal(format!("reference: {other:?} of decimals"))),
    }
}

/// `m/10^s` rounded half away from zero to at most `target` digits after the point.
pub(crate) fn round(m: i128, s: u32, target: u32) -> Value<'static> {
    if s <= target {
        return Value::Decimal(m, s);
    }
    let divisor = scaled(1, s - target).expect("at most 10^28");
    let (mantissa, scale) = canonical_decimal(rounded_quotient(m, divisor), target);
    Value::Decimal(mantissa, scale)
}

/// The decimal's digits, with a point before the last `s` of them.
pub(crate) fn format(m: i128, s: u32) -> String {
    let digits = m.unsigned_abs().to_string();
    let s = s as usize;
    let padded =
        if digits.len() <= s { format!("{}{digits}", "0".repeat(s + 1 - digits.len())) } else { digits };
    let (integer, fraction) = padded.split_at(padded.len() - s);
    let sign = if m < 0 { "-" } else { "" };
    if fraction.is_empty() { format!("{sign}{integer}") } else { format!("{sign}{integer}.{fraction}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(v: Result<Value<'_>, EvalError>) -> Result<String, EvalError> {
        v.map(|v| match v {
            Value::Decimal(m, s) => format(m, s),
            other => format!("{other:?}"),
        })
    }

    #[test]
    fn decimal_arithmetic_follows_the_documented_rules() {
        use BinaryFunc::*;
        type Case = (BinaryFunc, (i128, u32), (i128, u32), Result<&'static str, EvalError>);
        let cases: Vec<Case> = vec![
            (Add, (150, 2), (5, 1), Ok("2")),
            (Sub, (1, 28), (1, 0), Ok("-0.9999999999999999999999999999")),
            (Mul, (15, 1), (15, 1), Ok("2.25")),
            (Div, (1, 0), (3, 0), Ok("0.333333")),
            (Div, (2, 0), (3, 0), Ok("0.666667")),
            (Div, (-2, 0), (3, 0), Ok("-0.666667")),
            (Div, (1, 0), (8, 0), Ok("0.125")),
            (Div, (1, 2), (3, 0), Ok("0.00333333")),
            (Div, (1, 0), (0, 0), Err(EvalError::DivisionByZero)),
            (Add, (7 * 10i128.pow(28), 0), (1, 28), Err(EvalError::DecimalOutOfRange)),
            (Mul, (10i128.pow(20), 0), (10i128.pow(20), 0), Err(EvalError::DecimalOutOfRange)),
        ];
        for (func, (m, s), (n, t), expected) in cases {
            let result = value(arithmetic(func, m, s, n, t));
            assert_eq!(result, expected.map(str::to_string), "{func:?} of {m}e-{s} and {n}e-{t}");
        }
        assert_eq!(value(Ok(round(125, 2, 1))), Ok("1.3".to_string()));
        assert_eq!(value(Ok(round(-125, 2, 1))), Ok("-1.3".to_string()));
        assert_eq!(value(Ok(round(124, 2, 0))), Ok("1".to_string()));
        assert_eq!(format(5, 3), "0.005");
    }
}
