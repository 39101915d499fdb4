//! Rows and their schema: [`Datum`], [`Row`], [`RowPacker`], [`ScalarType`], [`ColumnType`],
//! [`RelationType`] and [`RelationDesc`].
//!
//! A [`Row`] is a compact byte encoding of a sequence of datums: one tag byte per datum, then a fixed
//! 8-byte payload for numbers and timestamps, or a varint length and the bytes for text and byte strings;
//! a date is 4 bytes (days since 1970-01-01), an interval 16 (months, days, milliseconds), a decimal a
//! scale byte and its mantissa as a zigzag varint (a price of `12345.67` takes 6 bytes in all).
//! Small rows (up to 24 bytes) live inline without a heap allocation. Equality, ordering and hashing are on
//! the bytes, which is consistent (equal datums encode to equal bytes: floats are canonicalised) but is not
//! the SQL order of the values; ordering by value is [`Datum`]'s `Ord`, used by `ORDER BY` and top-k.
//!
//! Decimals ([`Decimal`]) are canonical like floats: no trailing zeros in the mantissa (`1.50` is stored
//! as `1.5`), so equal values encode to equal bytes; the scale SQL gives a decimal column is its type's
//! ([`ScalarType::Decimal`]), not the value's.
//!
//! **Invariant:** every `Row` holds a valid encoding. Rows are built only by [`RowPacker`] / [`Row::pack`]
//! or decoded with validation ([`Row::from_bytes`], and serde deserialisation), so iterating a row never
//! fails.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// A totally ordered `f64`: NaNs are one value, greater than every other, and `-0.0 == 0.0`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct F64(f64);

impl F64 {
    /// Wraps a float, canonicalising NaN and negative zero.
    ///
    /// # Examples
    /// ```
    /// use protocol::F64;
    /// assert_eq!(F64::new(-0.0), F64::new(0.0));
    /// assert_eq!(F64::new(f64::NAN), F64::new(-f64::NAN));
    /// assert!(F64::new(1.0) < F64::new(f64::NAN));
    /// ```
    pub fn new(value: f64) -> Self {
        if value.is_nan() {
            F64(f64::NAN)
        } else if value == 0.0 {
            F64(0.0)
        } else {
            F64(value)
        }
    }

    /// The float.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl PartialEq for F64 {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for F64 {}
impl PartialOrd for F64 {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for F64 {
    fn cmp(&self, other: &Self) -> Ordering {
        F64::new(self.0).0.total_cmp(&F64::new(other.0).0)
    }
}
impl std::hash::Hash for F64 {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        F64::new(self.0).0.to_bits().hash(state)
    }
}

/// The largest scale (digits after the point) of a [`Decimal`], and of a [`ScalarType::Decimal`].
pub const MAX_DECIMAL_SCALE: u8 = 28;

/// An exact decimal number: a 96-bit integer mantissa and a scale of at most [`MAX_DECIMAL_SCALE`] (so
/// at most 28 significant digits), kept canonical (no trailing zeros: `1.50` is `1.5`), so that equal
/// numbers are equal values and encode to equal bytes. Ordered numerically.
///
/// The arithmetic of the plan IR on decimals (its scale rules and errors) is in `expr.rs`; this type only
/// holds values.
///
/// # Examples
/// ```
/// use protocol::Decimal;
/// let price = Decimal::new(123_450, 2).unwrap();
/// assert_eq!(price.to_string(), "1234.5");
/// assert_eq!((price.mantissa(), price.scale()), (12_345, 1));
/// assert_eq!(price, "1234.50".parse().unwrap());
/// assert!(Decimal::new(1, 29).is_none());
/// assert!(Decimal::new(1 << 100, 0).is_none());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Decimal(rust_decimal::Decimal);

impl Decimal {
    /// Zero.
    pub const ZERO: Decimal = Decimal(rust_decimal::Decimal::ZERO);

    /// `mantissa * 10^-scale`, or `None` if its canonical form (trailing zeros after the point removed)
    /// needs more than 96 bits of mantissa or a scale beyond [`MAX_DECIMAL_SCALE`].
    pub fn new(mantissa: i128, scale: u8) -> Option<Decimal> {
        let (mut mantissa, mut scale) = (mantissa, scale);
        while scale > 0 && mantissa % 10 == 0 {
            mantissa /= 10;
            scale -= 1;
        }
        if scale > MAX_DECIMAL_SCALE {
            return None;
        }
        rust_decimal::Decimal::try_from_i128_with_scale(mantissa, u32::from(scale))
            .ok()
            .map(Decimal::canonical)
    }

    /// The canonical form of a `rust_decimal` value (trailing zeros removed).
    pub fn canonical(value: rust_decimal::Decimal) -> Decimal {
        Decimal(value.normalize())
    }

    /// The value as a `rust_decimal` (canonical).
    pub fn get(self) -> rust_decimal::Decimal {
        self.0
    }

    /// The mantissa of the canonical form.
    pub fn mantissa(self) -> i128 {
        self.0.mantissa()
    }

    /// The scale of the canonical form (the digits after the point, without trailing zeros).
    pub fn scale(self) -> u8 {
        u8::try_from(self.0.scale()).expect("a scale is at most 28")
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::str::FromStr for Decimal {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        rust_decimal::Decimal::from_str_exact(s).map(Decimal::canonical).map_err(|e| e.to_string())
    }
}

/// A span of time for date arithmetic: months, days and milliseconds, kept apart as SQL keeps them (a
/// month has no fixed number of days). Ordered field by field (months, then days, then milliseconds),
/// which is not SQL's order of intervals (`plan.rs` lists the IR's departures from SQL).
///
/// # Examples
/// ```
/// use protocol::Interval;
/// let quarter = Interval::months(3);
/// assert_eq!(quarter.to_string(), "3 months");
/// assert_eq!(Interval::days(-90).to_string(), "-90 days");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Interval {
    /// Whole months.
    pub months: i32,
    /// Whole days.
    pub days: i32,
    /// Milliseconds.
    pub ms: i64,
}

impl Interval {
    /// An interval of `months` months.
    pub fn months(months: i32) -> Interval {
        Interval { months, days: 0, ms: 0 }
    }

    /// An interval of `days` days.
    pub fn days(days: i32) -> Interval {
        Interval { months: 0, days, ms: 0 }
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.months != 0 {
            parts.push(format!("{} months", self.months));
        }
        if self.days != 0 {
            parts.push(format!("{} days", self.days));
        }
        if self.ms != 0 || parts.is_empty() {
            parts.push(format!("{} ms", self.ms));
        }
        write!(f, "{}", parts.join(" "))
    }
}

/// Formats a date (days since 1970-01-01) as `YYYY-MM-DD` (the proleptic Gregorian calendar).
///
/// # Examples
/// ```
/// use protocol::format_date;
/// assert_eq!(format_date(0), "1970-01-01");
/// assert_eq!(format_date(10_561), "1998-12-01");
/// assert_eq!(format_date(-1), "1969-12-31");
/// ```
pub fn format_date(days: i32) -> String {
    let (year, month, day) = crate::expr::civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}")
}

/// One value of a row. Borrowed from the row (or expression) it came from.
///
/// The derived order (by variant, then by value) is the value order used for sorting; SQL's placement of
/// `NULL` is decided by [`crate::ColumnOrder::nulls_last`], not here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Datum<'a> {
    /// SQL `NULL`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A 64-bit signed integer.
    Int64(i64),
    /// A 64-bit float, totally ordered.
    Float64(F64),
    /// UTF-8 text.
    Text(&'a str),
    /// A byte string.
    Bytes(&'a [u8]),
    /// A timestamp in milliseconds since the Unix epoch.
    Timestamp(u64),
    /// An exact decimal (canonical: see [`Decimal`]).
    Decimal(Decimal),
    /// A date: days since 1970-01-01.
    Date(i32),
    /// A span of time for date arithmetic.
    Interval(Interval),
}

impl Datum<'_> {
    /// Whether this is `NULL`.
    ///
    /// # Examples
    /// ```
    /// use protocol::Datum;
    /// assert!(Datum::Null.is_null() && !Datum::Int64(0).is_null());
    /// ```
    pub fn is_null(&self) -> bool {
        matches!(self, Datum::Null)
    }

    /// The scalar type of a non-null datum (a decimal's is that of its canonical scale).
    ///
    /// # Examples
    /// ```
    /// use protocol::{Datum, ScalarType};
    /// assert_eq!(Datum::Text("x").scalar_type(), Some(ScalarType::Text));
    /// assert_eq!(Datum::Null.scalar_type(), None);
    /// ```
    pub fn scalar_type(&self) -> Option<ScalarType> {
        match self {
            Datum::Null => None,
            Datum::Bool(_) => Some(ScalarType::Bool),
            Datum::Int64(_) => Some(ScalarType::Int64),
            Datum::Float64(_) => Some(ScalarType::Float64),
            Datum::Text(_) => Some(ScalarType::Text),
            Datum::Bytes(_) => Some(ScalarType::Bytes),
            Datum::Timestamp(_) => Some(ScalarType::Timestamp),
            Datum::Decimal(d) => Some(ScalarType::Decimal { scale: d.scale() }),
            Datum::Date(_) => Some(ScalarType::Date),
            Datum::Interval(_) => Some(ScalarType::Interval),
        }
    }

    /// Whether the datum may appear in a column of type `typ`.
    ///
    /// # Examples
    /// ```
    /// use protocol::{ColumnType, Datum, ScalarType};
    /// assert!(Datum::Int64(1).is_instance_of(&ColumnType::new(ScalarType::Int64, false)));
    /// assert!(!Datum::Null.is_instance_of(&ColumnType::new(ScalarType::Int64, false)));
    /// assert!(Datum::Null.is_instance_of(&ColumnType::new(ScalarType::Int64, true)));
    /// let cents = ColumnType::new(ScalarType::Decimal { scale: 2 }, false);
    /// assert!(Datum::Decimal("1.5".parse().unwrap()).is_instance_of(&cents));
    /// assert!(!Datum::Decimal("1.505".parse().unwrap()).is_instance_of(&cents));
    /// ```
    pub fn is_instance_of(&self, typ: &ColumnType) -> bool {
        match (self, typ.scalar_type) {
            (Datum::Null, _) => typ.nullable,
            // A decimal fits a decimal column of at least its canonical scale.
            (Datum::Decimal(d), ScalarType::Decimal { scale }) => d.scale() <= scale,
            (datum, scalar) => datum.scalar_type() == Some(scalar),
        }
    }

    /// A float datum (canonicalised).
    ///
    /// # Examples
    /// ```
    /// use protocol::Datum;
    /// assert_eq!(Datum::float64(-0.0), Datum::float64(0.0));
    /// ```
    pub fn float64(value: f64) -> Self {
        Datum::Float64(F64::new(value))
    }
}

impl fmt::Display for Datum<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Datum::Null => write!(f, "NULL"),
            Datum::Bool(b) => write!(f, "{b}"),
            Datum::Int64(i) => write!(f, "{i}"),
            Datum::Float64(x) => write!(f, "{}", x.get()),
            Datum::Text(s) => write!(f, "{s}"),
            Datum::Bytes(b) => {
                write!(f, "\\x")?;
                b.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
            }
            Datum::Timestamp(t) => write!(f, "{t}"),
            Datum::Decimal(d) => write!(f, "{d}"),
            Datum::Date(d) => write!(f, "{}", format_date(*d)),
            Datum::Interval(i) => write!(f, "{i}"),
        }
    }
}

const TAG_NULL: u8 = 0;
const TAG_FALSE: u8 = 1;
const TAG_TRUE: u8 = 2;
const TAG_INT64: u8 = 3;
const TAG_FLOAT64: u8 = 4;
const TAG_TEXT: u8 = 5;
const TAG_BYTES: u8 = 6;
const TAG_TIMESTAMP: u8 = 7;
const TAG_DECIMAL: u8 = 8;
const TAG_DATE: u8 = 9;
const TAG_INTERVAL: u8 = 10;

/// The inline capacity of a row: rows up to this many bytes need no heap allocation.
pub const ROW_INLINE_BYTES: usize = 24;

/// A packed sequence of datums. See the module documentation for the encoding and its invariant.
///
/// # Examples
/// ```
/// use protocol::{Datum, Row};
/// let row = Row::pack([Datum::Int64(7), Datum::Text("seven"), Datum::Null]);
/// assert_eq!(row.unpack(), vec![Datum::Int64(7), Datum::Text("seven"), Datum::Null]);
/// assert_eq!(row.arity(), 3);
/// assert_eq!(row.get(1), Some(Datum::Text("seven")));
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Row {
    data: SmallVec<[u8; ROW_INLINE_BYTES]>,
}

impl Row {
    /// The row with no columns.
    pub const EMPTY: Row = Row { data: SmallVec::new_const() };

    /// Packs datums into a row.
    ///
    /// # Examples
    /// ```
    /// use protocol::{Datum, Row};
    /// assert_eq!(Row::pack([Datum::Bool(true)]).unpack(), vec![Datum::Bool(true)]);
    /// ```
    pub fn pack<'a, I: IntoIterator<Item = Datum<'a>>>(datums: I) -> Row {
        let mut packer = RowPacker::new();
        packer.extend(datums);
        packer.finish()
    }

    /// Decodes a row from its encoding, validating it.
    ///
    /// # Examples
    /// ```
    /// use protocol::{Datum, Row};
    /// let row = Row::pack([Datum::Text("x")]);
    /// assert_eq!(Row::from_bytes(row.as_bytes()).unwrap(), row);
    /// assert!(Row::from_bytes(&[5, 10, b'x']).is_err()); // text of length 10 with 1 byte
    /// assert!(Row::from_bytes(&[99]).is_err());           // unknown tag
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Result<Row, RowDecodeError> {
        RowRef::from_bytes(bytes).map(RowRef::to_row)
    }

    /// The encoding.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    /// The number of bytes of the encoding.
    ///
    /// # Examples
    /// ```
    /// use protocol::{Datum, Row};
    /// assert_eq!(Row::pack([Datum::Int64(1)]).byte_len(), 9);
    /// ```
    pub fn byte_len(&self) -> usize {
        self.data.len()
    }

    /// Iterates over the datums.
    ///
    /// # Examples
    /// ```
    /// use protocol::{Datum, Row};
    /// let row = Row::pack([Datum::Int64(1), Datum::Int64(2)]);
    /// assert_eq!(row.iter().count(), 2);
    /// ```
    pub fn iter(&self) -> DatumIter<'_> {
        self.as_row_ref().iter()
    }

    /// The datums as a vector.
    pub fn unpack(&self) -> Vec<Datum<'_>> {
        self.as_row_ref().unpack()
    }

    /// Appends the datums of this row to `out` (reusing its allocation).
    ///
    /// # Examples
    /// ```
    /// use protocol::{Datum, Row};
    /// let row = Row::pack([Datum::Int64(1)]);
    /// let mut out = vec![Datum::Null];
    /// row.unpack_into(&mut out);
    /// assert_eq!(out, vec![Datum::Null, Datum::Int64(1)]);
    /// ```
    pub fn unpack_into<'a>(&'a self, out: &mut Vec<Datum<'a>>) {
        out.extend(self.iter());
    }

    /// The datum at `index`, if the row has that many columns. Linear in `index`.
    pub fn get(&self, index: usize) -> Option<Datum<'_>> {
        self.iter().nth(index)
    }

    /// The number of datums. Linear in the row's size.
    pub fn arity(&self) -> usize {
        self.iter().count()
    }

    /// Whether the row has no datums.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl fmt::Debug for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_row_ref().fmt(f)
    }
}

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.as_row_ref(), f)
    }
}

impl Row {
    /// The row borrowed as a [`RowRef`].
    pub fn as_row_ref(&self) -> RowRef<'_> {
        RowRef { data: &self.data }
    }
}

/// A borrowed row: the encoding of a [`Row`] kept elsewhere, for containers that store many rows' bytes
/// back to back instead of one `Row` (and its inline buffer) each.
///
/// **Invariant.** The bytes are a row's encoding, as [`Row::as_bytes`] gave them. A `RowRef` orders,
/// compares, hashes and prints exactly as the `Row` it was taken from.
///
/// # Examples
/// ```
/// use protocol::{Datum, Row, RowRef};
/// let row = Row::pack([Datum::Int64(1), Datum::Text("one")]);
/// let borrowed = RowRef::from_encoding(row.as_bytes());
/// assert_eq!(borrowed, &row);
/// assert_eq!(borrowed.iter().nth(1), Some(Datum::Text("one")));
/// assert_eq!(borrowed.to_row(), row);
/// assert_eq!(borrowed.to_string(), row.to_string());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowRef<'a> {
    data: &'a [u8],
}

impl<'a> RowRef<'a> {
    /// The row whose encoding is `data`, which must come from [`Row::as_bytes`] (or a copy of it): a
    /// `RowRef` over other bytes breaks the invariant, and reading a datum from it panics.
    pub fn from_encoding(data: &'a [u8]) -> Self {
        RowRef { data }
    }

    /// The row whose encoding is `bytes`, validated as [`Row::from_bytes`] validates it (and without
    /// copying them): bytes from outside the process (a stored part, a frame) become rows only through
    /// here or [`Row::from_bytes`].
    ///
    /// # Examples
    /// ```
    /// use protocol::{Datum, Row, RowRef};
    /// let row = Row::pack([Datum::Int64(1), Datum::Text("one")]);
    /// assert_eq!(RowRef::from_bytes(row.as_bytes()).unwrap(), &row);
    /// assert!(RowRef::from_bytes(&[5, 10, b'x']).is_err()); // text of length 10 with 1 byte
    /// assert!(RowRef::from_bytes(&[99]).is_err());           // unknown tag
    /// ```
    #[inline(always)]
    pub fn from_bytes(bytes: &'a [u8]) -> Result<Self, RowDecodeError> {
        let mut offset = 0;
        while offset < bytes.len() {
            offset = match valid_common_datum(bytes, offset) {
                Some(next) => next,
                None => decode_datum(bytes, offset)?.1,
            };
        }
        Ok(RowRef { data: bytes })
    }

    /// The encoding.
    pub fn as_bytes(self) -> &'a [u8] {
        self.data
    }

    /// Iterates over the datums.
    pub fn iter(self) -> DatumIter<'a> {
        DatumIter { data: self.data, offset: 0 }
    }

    /// The datums as a vector.
    pub fn unpack(self) -> Vec<Datum<'a>> {
        self.iter().collect()
    }

    /// An owned copy.
    pub fn to_row(self) -> Row {
        Row { data: SmallVec::from_slice(self.data) }
    }
}

impl PartialEq<&Row> for RowRef<'_> {
    fn eq(&self, other: &&Row) -> bool {
        self.data == other.as_bytes()
    }
}

impl fmt::Debug for RowRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl fmt::Display for RowRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(")?;
        for (i, datum) in self.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{datum}")?;
        }
        write!(f, ")")
    }
}

impl Serialize for Row {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.data)
    }
}

impl<'de> Deserialize<'de> for Row {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RowVisitor;
        impl<'de> serde::de::Visitor<'de> for RowVisitor {
            type Value = Row;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an encoded row")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Row, E> {
                Row::from_bytes(bytes).map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Row, A::Error> {
                let mut bytes: Vec<u8> = Vec::new();
                while let Some(byte) = seq.next_element()? {
                    bytes.push(byte);
                }
                Row::from_bytes(&bytes).map_err(serde::de::Error::custom)
            }
        }
        deserializer.deserialize_bytes(RowVisitor)
    }
}

/// Why a row encoding was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowDecodeError {
    /// A tag byte that names no datum kind.
    #[error("unknown datum tag {tag} at byte {offset}")]
    UnknownTag {
        /// The tag.
        tag: u8,
        /// Where it was.
        offset: usize,
    },
    /// The encoding ends inside a datum.
    #[error("row encoding truncated at byte {offset}")]
    Truncated {
        /// Where the datum started.
        offset: usize,
    },
    /// A text datum that is not UTF-8.
    #[error("text datum at byte {offset} is not UTF-8")]
    InvalidUtf8 {
        /// Where the datum started.
        offset: usize,
    },
    /// A float that is not in canonical form (so equal floats would not be equal rows).
    #[error("float datum at byte {offset} is not canonical")]
    NonCanonicalFloat {
        /// Where the datum started.
        offset: usize,
    },
    /// A decimal beyond 96 bits or scale 28, or not in canonical form (trailing zeros).
    #[error("decimal datum at byte {offset} is out of range or not canonical")]
    InvalidDecimal {
        /// Where the datum started.
        offset: usize,
    },
}

fn read_fixed(bytes: &[u8], offset: usize) -> Result<[u8; 8], RowDecodeError> {
    bytes
        .get(offset + 1..offset + 9)
        .and_then(|s| s.try_into().ok())
        .ok_or(RowDecodeError::Truncated { offset })
}

fn read_varint(bytes: &[u8], start: usize, offset: usize) -> Result<(usize, usize), RowDecodeError> {
    let mut value: u64 = 0;
    let mut position = start;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(position).ok_or(RowDecodeError::Truncated { offset })?;
        value |= u64::from(byte & 0x7f) << shift;
        position += 1;
        if byte & 0x80 == 0 {
            let len = usize::try_from(value).map_err(|_| RowDecodeError::Truncated { offset })?;
            return Ok((len, position));
        }
    }
    Err(RowDecodeError::Truncated { offset })
}

/// Reads a varint of up to 128 bits (a decimal's zigzag mantissa).
fn read_varint128(bytes: &[u8], start: usize, offset: usize) -> Result<(u128, usize), RowDecodeError> {
    let mut value: u128 = 0;
    let mut position = start;
    for shift in (0..128).step_by(7) {
        let byte = *bytes.get(position).ok_or(RowDecodeError::Truncated { offset })?;
        value |= u128::from(byte & 0x7f) << shift;
        position += 1;
        if byte & 0x80 == 0 {
            return Ok((value, position));
        }
    }
    Err(RowDecodeError::InvalidDecimal { offset })
}

fn write_varint128(out: &mut SmallVec<[u8; ROW_INLINE_BYTES]>, mut value: u128) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Decodes a decimal's payload (scale byte, zigzag varint mantissa) at `offset + 1`, checking that it is
/// in range and canonical.
fn decode_decimal(bytes: &[u8], offset: usize) -> Result<(Datum<'_>, usize), RowDecodeError> {
    let invalid = RowDecodeError::InvalidDecimal { offset };
    let scale = *bytes.get(offset + 1).ok_or(RowDecodeError::Truncated { offset })?;
    let (zigzag, end) = read_varint128(bytes, offset + 2, offset)?;
    let mantissa = ((zigzag >> 1) as i128) ^ -((zigzag & 1) as i128);
    // No trailing zero after the point (an integer keeps its zeros; zero has scale 0).
    let canonical = scale == 0 || mantissa % 10 != 0;
    let decimal = Decimal::new(mantissa, scale).ok_or(invalid.clone())?;
    if !canonical || decimal.mantissa() != mantissa {
        return Err(invalid);
    }
    Ok((Datum::Decimal(decimal), end))
}

fn write_varint(out: &mut SmallVec<[u8; ROW_INLINE_BYTES]>, mut value: usize) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The offset of the next datum if the datum at `offset` is an integer or timestamp, or a short ASCII
/// text, that is whole: the common datums, checked without decoding them ([`RowRef::from_bytes`]
/// validates a stored part's every row). `None` says nothing about validity: [`decode_datum`] decides.
/// Everything this accepts, `decode_datum` accepts too (the property test
/// `validation_takes_the_fast_path_only_for_encodings_the_decoder_accepts` checks it on arbitrary bytes).
#[inline]
fn valid_common_datum(bytes: &[u8], offset: usize) -> Option<usize> {
    match bytes[offset] {
        TAG_INT64 | TAG_TIMESTAMP => (offset + 9 <= bytes.len()).then_some(offset + 9),
        TAG_TEXT => {
            // A length below 128 is one varint byte.
            let len = *bytes.get(offset + 1)?;
            let end = offset + 2 + usize::from(len);
            (len < 0x80 && bytes.get(offset + 2..end)?.is_ascii()).then_some(end)
        }
        _ => None,
    }
}

/// Decodes the datum starting at `offset`; returns it and the offset of the next one.
fn decode_datum(bytes: &[u8], offset: usize) -> Result<(Datum<'_>, usize), RowDecodeError> {
    let tag = bytes[offset];
    match tag {
        TAG_NULL => Ok((Datum::Null, offset + 1)),
        TAG_FALSE => Ok((Datum::Bool(false), offset + 1)),
        TAG_TRUE => Ok((Datum::Bool(true), offset + 1)),
        TAG_INT64 => Ok((Datum::Int64(i64::from_le_bytes(read_fixed(bytes, offset)?)), offset + 9)),
        TAG_FLOAT64 => {
            let value = f64::from_le_bytes(read_fixed(bytes, offset)?);
            if F64::new(value).0.to_bits() != value.to_bits() {
                return Err(RowDecodeError::NonCanonicalFloat { offset });
            }
            Ok((Datum::Float64(F64(value)), offset + 9))
        }
        TAG_TIMESTAMP => Ok((Datum::Timestamp(u64::from_le_bytes(read_fixed(bytes, offset)?)), offset + 9)),
        TAG_DECIMAL => decode_decimal(bytes, offset),
        TAG_DATE => {
            let payload = bytes.get(offset + 1..offset + 5).ok_or(RowDecodeError::Truncated { offset })?;
            let days = i32::from_le_bytes(payload.try_into().expect("four bytes"));
            Ok((Datum::Date(days), offset + 5))
        }
        TAG_INTERVAL => {
            let payload = bytes.get(offset + 1..offset + 17).ok_or(RowDecodeError::Truncated { offset })?;
            let months = i32::from_le_bytes(payload[0..4].try_into().expect("four bytes"));
            let days = i32::from_le_bytes(payload[4..8].try_into().expect("four bytes"));
            let ms = i64::from_le_bytes(payload[8..16].try_into().expect("eight bytes"));
            Ok((Datum::Interval(Interval { months, days, ms }), offset + 17))
        }
        TAG_TEXT | TAG_BYTES => {
            let (len, start) = read_varint(bytes, offset + 1, offset)?;
            let end = start.checked_add(len).ok_or(RowDecodeError::Truncated { offset })?;
            let payload = bytes.get(start..end).ok_or(RowDecodeError::Truncated { offset })?;
            let datum = if tag == TAG_TEXT {
                Datum::Text(std::str::from_utf8(payload).map_err(|_| RowDecodeError::InvalidUtf8 { offset })?)
            } else {
                Datum::Bytes(payload)
            };
            Ok((datum, end))
        }
        tag => Err(RowDecodeError::UnknownTag { tag, offset }),
    }
}

/// An iterator over the datums of a [`Row`].
#[derive(Debug, Clone)]
pub struct DatumIter<'a> {
    data: &'a [u8],
    offset: usize,
}

impl<'a> Iterator for DatumIter<'a> {
    type Item = Datum<'a>;

    fn next(&mut self) -> Option<Datum<'a>> {
        if self.offset >= self.data.len() {
            return None;
        }
        let (datum, next) = decode_datum(self.data, self.offset)
            .expect("a Row always holds a valid encoding (module invariant)");
        self.offset = next;
        Some(datum)
    }
}

/// Builds rows datum by datum, reusing its buffer across rows.
///
/// # Examples
/// ```
/// use protocol::{Datum, RowPacker};
/// let mut packer = RowPacker::new();
/// packer.push(Datum::Int64(1));
/// packer.push(Datum::Text("one"));
/// let row = packer.finish_and_reuse();
/// packer.push(Datum::Int64(2));
/// assert_eq!(row.unpack(), vec![Datum::Int64(1), Datum::Text("one")]);
/// assert_eq!(packer.finish().unpack(), vec![Datum::Int64(2)]);
/// ```
#[derive(Debug, Default, Clone)]
pub struct RowPacker {
    data: SmallVec<[u8; ROW_INLINE_BYTES]>,
}

impl RowPacker {
    /// An empty packer.
    pub fn new() -> Self {
        RowPacker::default()
    }

    /// Appends one datum.
    pub fn push(&mut self, datum: Datum<'_>) {
        match datum {
            Datum::Null => self.data.push(TAG_NULL),
            Datum::Bool(false) => self.data.push(TAG_FALSE),
            Datum::Bool(true) => self.data.push(TAG_TRUE),
            Datum::Int64(i) => {
                self.data.push(TAG_INT64);
                self.data.extend_from_slice(&i.to_le_bytes());
            }
            Datum::Float64(x) => {
                self.data.push(TAG_FLOAT64);
                self.data.extend_from_slice(&F64::new(x.0).0.to_le_bytes());
            }
            Datum::Timestamp(t) => {
                self.data.push(TAG_TIMESTAMP);
                self.data.extend_from_slice(&t.to_le_bytes());
            }
            Datum::Decimal(d) => {
                self.data.push(TAG_DECIMAL);
                // Canonical by construction: a `Decimal` has no trailing zeros.
                self.data.push(d.scale());
                let mantissa = d.mantissa();
                write_varint128(&mut self.data, ((mantissa << 1) ^ (mantissa >> 127)) as u128);
            }
            Datum::Date(days) => {
                self.data.push(TAG_DATE);
                self.data.extend_from_slice(&days.to_le_bytes());
            }
            Datum::Interval(i) => {
                self.data.push(TAG_INTERVAL);
                self.data.extend_from_slice(&i.months.to_le_bytes());
                self.data.extend_from_slice(&i.days.to_le_bytes());
                self.data.extend_from_slice(&i.ms.to_le_bytes());
            }
            Datum::Text(s) => {
                self.data.push(TAG_TEXT);
                write_varint(&mut self.data, s.len());
                self.data.extend_from_slice(s.as_bytes());
            }
            Datum::Bytes(b) => {
                self.data.push(TAG_BYTES);
                write_varint(&mut self.data, b.len());
                self.data.extend_from_slice(b);
            }
        }
    }

    /// Appends several datums.
    pub fn extend<'a, I: IntoIterator<Item = Datum<'a>>>(&mut self, datums: I) {
        for datum in datums {
            self.push(datum);
        }
    }

    /// Appends every datum of `row` (a byte copy: no decoding).
    ///
    /// # Examples
    /// ```
    /// use protocol::{Datum, Row, RowPacker};
    /// let mut packer = RowPacker::new();
    /// packer.extend_by_row(&Row::pack([Datum::Int64(1)]));
    /// packer.push(Datum::Null);
    /// assert_eq!(packer.finish().unpack(), vec![Datum::Int64(1), Datum::Null]);
    /// ```
    pub fn extend_by_row(&mut self, row: &Row) {
        self.data.extend_from_slice(&row.data);
    }

    /// The row built so far; the packer is left empty.
    pub fn finish(&mut self) -> Row {
        Row { data: std::mem::take(&mut self.data) }
    }

    /// The row built so far (copied out); the packer is cleared but keeps its buffer.
    pub fn finish_and_reuse(&mut self) -> Row {
        let row = Row { data: SmallVec::from_slice(&self.data) };
        self.data.clear();
        row
    }

    /// Discards what was pushed.
    pub fn clear(&mut self) {
        self.data.clear();
    }
}

/// The type of a non-null value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ScalarType {
    /// [`Datum::Bool`].
    Bool,
    /// [`Datum::Int64`].
    Int64,
    /// [`Datum::Float64`].
    Float64,
    /// [`Datum::Text`].
    Text,
    /// [`Datum::Bytes`].
    Bytes,
    /// [`Datum::Timestamp`].
    Timestamp,
    /// [`Datum::Decimal`] with at most `scale` digits after the point. The scale is part of the type: the
    /// arithmetic of `expr.rs` derives the result's from the operands' (SQL's `NUMERIC(p, s)`; the
    /// precision is the implementation's, 28 digits).
    Decimal {
        /// Digits after the point, at most [`MAX_DECIMAL_SCALE`].
        scale: u8,
    },
    /// [`Datum::Date`].
    Date,
    /// [`Datum::Interval`].
    Interval,
}

/// The type of a column: a scalar type and whether `NULL` may appear.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ColumnType {
    /// The type of the non-null values.
    pub scalar_type: ScalarType,
    /// Whether `NULL` may appear.
    pub nullable: bool,
}

impl ColumnType {
    /// A column type.
    ///
    /// # Examples
    /// ```
    /// use protocol::{ColumnType, ScalarType};
    /// assert!(ColumnType::new(ScalarType::Text, true).nullable);
    /// ```
    pub fn new(scalar_type: ScalarType, nullable: bool) -> Self {
        ColumnType { scalar_type, nullable }
    }

    /// The same type, made nullable or not.
    pub fn nullable(self, nullable: bool) -> Self {
        ColumnType { nullable, ..self }
    }
}

/// The types of a relation's columns.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct RelationType {
    /// One type per column.
    pub column_types: Vec<ColumnType>,
}

impl RelationType {
    /// A relation type from column types.
    ///
    /// # Examples
    /// ```
    /// use protocol::{ColumnType, RelationType, ScalarType};
    /// let t = RelationType::new(vec![ColumnType::new(ScalarType::Int64, false)]);
    /// assert_eq!(t.arity(), 1);
    /// ```
    pub fn new(column_types: Vec<ColumnType>) -> Self {
        RelationType { column_types }
    }

    /// The number of columns.
    pub fn arity(&self) -> usize {
        self.column_types.len()
    }

    /// Checks that `row` has this type: the right arity, and every datum an instance of its column type.
    ///
    /// # Examples
    /// ```
    /// use protocol::{ColumnType, Datum, RelationType, Row, RowTypeError, ScalarType};
    /// let t = RelationType::new(vec![ColumnType::new(ScalarType::Int64, false)]);
    /// assert!(t.check_row(&Row::pack([Datum::Int64(1)])).is_ok());
    /// assert_eq!(t.check_row(&Row::pack([])), Err(RowTypeError::Arity { expected: 1, found: 0 }));
    /// assert!(matches!(t.check_row(&Row::pack([Datum::Null])), Err(RowTypeError::Column { column: 0, .. })));
    /// ```
    pub fn check_row(&self, row: &Row) -> Result<(), RowTypeError> {
        let mut found = 0;
        for (column, datum) in row.iter().enumerate() {
            found += 1;
            if let Some(typ) = self.column_types.get(column)
                && !datum.is_instance_of(typ)
            {
                return Err(RowTypeError::Column { column, expected: *typ, found: datum.to_string() });
            }
        }
        if found != self.arity() {
            return Err(RowTypeError::Arity { expected: self.arity(), found });
        }
        Ok(())
    }
}

/// Why a row does not fit a relation type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowTypeError {
    /// The row has the wrong number of columns.
    #[error("row has {found} columns, expected {expected}")]
    Arity {
        /// The relation's arity.
        expected: usize,
        /// The row's.
        found: usize,
    },
    /// A datum is not an instance of its column's type.
    #[error("column {column}: {found} is not a {expected:?}")]
    Column {
        /// The column.
        column: usize,
        /// Its type.
        expected: ColumnType,
        /// The offending datum, printed.
        found: String,
    },
}

/// A relation's schema: column names and types.
///
/// # Examples
/// ```
/// use protocol::{ColumnType, RelationDesc, ScalarType};
/// let desc = RelationDesc::empty()
///     .with_column("id", ColumnType::new(ScalarType::Int64, false))
///     .with_column("name", ColumnType::new(ScalarType::Text, true));
/// assert_eq!(desc.arity(), 2);
/// assert_eq!(desc.column_index("name"), Some(1));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct RelationDesc {
    names: Vec<String>,
    typ: RelationType,
}

impl RelationDesc {
    /// The schema with no columns.
    pub fn empty() -> Self {
        RelationDesc::default()
    }

    /// A schema from `(name, type)` pairs.
    pub fn new<S: Into<String>>(columns: impl IntoIterator<Item = (S, ColumnType)>) -> Self {
        let mut desc = RelationDesc::empty();
        for (name, typ) in columns {
            desc = desc.with_column(name, typ);
        }
        desc
    }

    /// The schema with one more column.
    pub fn with_column(mut self, name: impl Into<String>, typ: ColumnType) -> Self {
        self.names.push(name.into());
        self.typ.column_types.push(typ);
        self
    }

    /// The number of columns.
    pub fn arity(&self) -> usize {
        self.names.len()
    }

    /// The column types.
    pub fn typ(&self) -> &RelationType {
        &self.typ
    }

    /// The column names.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The index of the first column called `name`.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Checks a row against the schema (see [`RelationType::check_row`]).
    pub fn check_row(&self, row: &Row) -> Result<(), RowTypeError> {
        self.typ.check_row(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn row_decoding_rejects_malformed_encodings() {
        let cases: Vec<(Vec<u8>, RowDecodeError)> = vec![
            (vec![TAG_INT64, 1, 2], RowDecodeError::Truncated { offset: 0 }),
            (vec![TAG_NULL, 42], RowDecodeError::UnknownTag { tag: 42, offset: 1 }),
            (vec![TAG_TEXT, 2, 0xff, 0xfe], RowDecodeError::InvalidUtf8 { offset: 0 }),
            (vec![TAG_BYTES, 0x80], RowDecodeError::Truncated { offset: 0 }),
            (
                vec![TAG_BYTES, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
                RowDecodeError::Truncated { offset: 0 },
            ),
            (
                {
                    let mut v = vec![TAG_FLOAT64];
                    v.extend_from_slice(&(-0.0f64).to_le_bytes());
                    v
                },
                RowDecodeError::NonCanonicalFloat { offset: 0 },
            ),
            // 1.0: a trailing zero after the point.
            (vec![TAG_DECIMAL, 1, 20], RowDecodeError::InvalidDecimal { offset: 0 }),
            // 0.00: zero with a scale.
            (vec![TAG_DECIMAL, 2, 0], RowDecodeError::InvalidDecimal { offset: 0 }),
            // A scale beyond 28.
            (vec![TAG_DECIMAL, 29, 2], RowDecodeError::InvalidDecimal { offset: 0 }),
            // A mantissa of 2^100 (zigzag 2^101): beyond 96 bits.
            (
                {
                    let mut v = vec![TAG_DECIMAL, 0];
                    let mut value: u128 = 1 << 101;
                    while value >= 0x80 {
                        v.push((value as u8) | 0x80);
                        value >>= 7;
                    }
                    v.push(value as u8);
                    v
                },
                RowDecodeError::InvalidDecimal { offset: 0 },
            ),
            (vec![TAG_DECIMAL, 1], RowDecodeError::Truncated { offset: 0 }),
            (vec![TAG_DATE, 1, 2], RowDecodeError::Truncated { offset: 0 }),
            (vec![TAG_INTERVAL, 1, 2, 3, 4, 5, 6, 7, 8], RowDecodeError::Truncated { offset: 0 }),
        ];
        for (bytes, expected) in cases {
            assert_eq!(Row::from_bytes(&bytes), Err(expected), "{bytes:?}");
        }
    }

    #[test]
    fn decimals_encode_compactly_and_canonically() {
        let price: Decimal = "12345.60".parse().unwrap();
        let row = Row::pack([Datum::Decimal(price)]);
        assert_eq!(row.byte_len(), 5, "tag, scale and a 3-byte mantissa");
        assert_eq!(Row::pack([Datum::Decimal("12345.67".parse().unwrap())]).byte_len(), 6);
        assert_eq!(row, Row::pack([Datum::Decimal("12345.6".parse().unwrap())]));
        assert_eq!(row.unpack(), vec![Datum::Decimal(price)]);
        let date = Row::pack([Datum::Date(10_561)]);
        assert_eq!(date.to_string(), "(1998-12-01)");
    }

    #[test]
    fn small_rows_stay_inline() {
        let row = Row::pack([Datum::Int64(1), Datum::Int64(2)]);
        assert!(!row.data.spilled());
    }

    proptest! {
        #[test]
        fn row_encoding_round_trips(datums in prop::collection::vec(crate::arbitrary::owned_datum(), 0..8)) {
            let row = crate::arbitrary::pack_owned(&datums);
            prop_assert_eq!(Row::from_bytes(row.as_bytes()).unwrap(), row.clone());
            let back: Vec<crate::arbitrary::OwnedDatum> = row.iter().map(crate::arbitrary::OwnedDatum::from).collect();
            prop_assert_eq!(back, datums);
            let encoded = bincode::serialize(&row).unwrap();
            prop_assert_eq!(bincode::deserialize::<Row>(&encoded).unwrap(), row);
        }

        #[test]
        fn row_equality_agrees_with_datum_equality(
            a in prop::collection::vec(crate::arbitrary::owned_datum(), 0..4),
            b in prop::collection::vec(crate::arbitrary::owned_datum(), 0..4),
        ) {
            let (ra, rb) = (crate::arbitrary::pack_owned(&a), crate::arbitrary::pack_owned(&b));
            prop_assert_eq!(ra == rb, ra.unpack() == rb.unpack());
        }

        #[test]
        fn validation_takes_the_fast_path_only_for_encodings_the_decoder_accepts(
            tag in prop::sample::select(vec![TAG_INT64, TAG_TIMESTAMP, TAG_TEXT, TAG_BYTES]),
            tail in prop::collection::vec(prop_oneof![0u8..24, 0u8..128, any::<u8>()], 0..32),
        ) {
            let bytes: Vec<u8> = std::iter::once(tag).chain(tail).collect();
            if let Some(next) = valid_common_datum(&bytes, 0) {
                prop_assert_eq!(decode_datum(&bytes, 0).map(|(_, next)| next), Ok(next));
            }
            // Row validation answers what decoding datum by datum answers.
            let mut offset = 0;
            let slow = loop {
                if offset >= bytes.len() {
                    break true;
                }
                match decode_datum(&bytes, offset) {
                    Ok((_, next)) => offset = next,
                    Err(_) => break false,
                }
            };
            prop_assert_eq!(RowRef::from_bytes(&bytes).is_ok(), slow);
        }

        #[test]
        fn row_decoding_of_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = Row::from_bytes(&bytes);
        }
    }
}
