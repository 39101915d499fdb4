//! The reference interpreter's values: its own view of one datum, decoded from a [`Row`] and encoded back
//! into one. `Row` and `Datum` serve only as containers here: no method of theirs that orders, compares
//! or computes is used.
//!
//! The data model, as the reference reads it from the IR's documentation: a float is never `-0.0` (it
//! is `0.0`) and there is one NaN; the reference canonicalises every float it computes ([`float`]). A
//! decimal is a mantissa and a scale, canonical (no trailing zeros after the point) once packed into a
//! row, with at most 28 digits after the point and a mantissa below `2^96` ([`is_decimal`]).

use crate::row::{Datum, Decimal, Interval, Row, RowPacker};

/// One value of a row, borrowed from the row or expression it came from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Value<'a> {
    /// SQL `NULL`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A 64-bit integer.
    Int(i64),
    /// A canonical float (see the module documentation).
    Float(f64),
    /// UTF-8 text.
    Text(&'a str),
    /// A byte string.
    Bytes(&'a [u8]),
    /// A timestamp in milliseconds.
    Timestamp(u64),
    /// A decimal: `mantissa * 10^-scale` (not necessarily canonical: [`row`] makes it so).
    Decimal(i128, u32),
    /// A date: days since 1970-01-01.
    Date(i32),
    /// An interval: months, days, milliseconds.
    Interval(i32, i32, i64),
}

impl<'a> Value<'a> {
    /// Whether this is `NULL`.
    pub(crate) fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// A short name of the value's kind, for error messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int64",
            Value::Float(_) => "float64",
            Value::Text(_) => "text",
            Value::Bytes(_) => "bytes",
            Value::Timestamp(_) => "timestamp",
            Value::Decimal(..) => "decimal",
            Value::Date(_) => "date",
            Value::Interval(..) => "interval",
        }
    }

    fn from_datum(datum: Datum<'a>) -> Self {
        match datum {
            Datum::Null => Value::Null,
            Datum::Bool(b) => Value::Bool(b),
            Datum::Int64(i) => Value::Int(i),
            Datum::Float64(x) => Value::Float(float(x.get())),
            Datum::Text(s) => Value::Text(s),
            Datum::Bytes(b) => Value::Bytes(b),
            Datum::Timestamp(t) => Value::Timestamp(t),
            Datum::Decimal(d) => Value::Decimal(d.mantissa(), u32::from(d.scale())),
            Datum::Date(d) => Value::Date(d),
            Datum::Interval(i) => Value::Interval(i.months, i.days, i.ms),
        }
    }

    fn to_datum(self) -> Datum<'a> {
        match self {
            Value::Null => Datum::Null,
            Value::Bool(b) => Datum::Bool(b),
            Value::Int(i) => Datum::Int64(i),
            Value::Float(x) => Datum::float64(x),
            Value::Text(s) => Datum::Text(s),
            Value::Bytes(b) => Datum::Bytes(b),
            Value::Timestamp(t) => Datum::Timestamp(t),
            Value::Decimal(mantissa, scale) => {
                let (mantissa, scale) = canonical_decimal(mantissa, scale);
                let scale =
                    u8::try_from(scale).expect("the reference checks decimals' range where it makes them");
                Datum::Decimal(
                    Decimal::new(mantissa, scale)
                        .expect("the reference checks decimals' range where it makes them"),
                )
            }
            Value::Date(d) => Datum::Date(d),
            Value::Interval(months, days, ms) => Datum::Interval(Interval { months, days, ms }),
        }
    }
}

/// A decimal without trailing zeros after the point.
pub(crate) fn canonical_decimal(mut mantissa: i128, mut scale: u32) -> (i128, u32) {
    while scale > 0 && mantissa % 10 == 0 {
        mantissa /= 10;
        scale -= 1;
    }
    (mantissa, scale)
}

/// Whether `mantissa * 10^-scale` is a decimal of the data model: canonically, at most 28 digits after
/// the point and a mantissa below `2^96` in magnitude.
pub(crate) fn is_decimal(mantissa: i128, scale: u32) -> bool {
    let (mantissa, scale) = canonical_decimal(mantissa, scale);
    scale <= 28 && mantissa.unsigned_abs() < (1u128 << 96)
}

/// The canonical form of a float: `0.0` for both zeros, one NaN.
pub(crate) fn float(x: f64) -> f64 {
    if x.is_nan() {
        f64::NAN
    } else if x == 0.0 {
        0.0
    } else {
        x
    }
}

/// The values of a row.
pub(crate) fn values(row: &Row) -> Vec<Value<'_>> {
    row.iter().map(Value::from_datum).collect()
}

/// The row of some values.
pub(crate) fn row<'a>(values: impl IntoIterator<Item = &'a Value<'a>>) -> Row {
    let mut packer = RowPacker::new();
    for value in values {
        packer.push(value.to_datum());
    }
    packer.finish()
}
