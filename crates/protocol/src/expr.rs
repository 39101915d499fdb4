//! Scalar expressions ([`ScalarExpr`]) and row-at-a-time transforms ([`MapFilterProject`]).
//!
//! Semantics are SQL's three-valued logic: arithmetic and comparisons with a `NULL` operand are `NULL`;
//! `AND`/`OR` follow Kleene logic; a filter keeps a row only when every predicate is `true`; `IF` takes the
//! `else` branch when the condition is `NULL`. There are no implicit casts: both operands of an arithmetic
//! or comparison function have the same scalar type.
//!
//! Evaluation never panics. Data errors (integer division by zero, integer overflow) are [`EvalError`]s,
//! which the replica turns into error rows that peeks surface as errors. Float arithmetic is IEEE 754:
//! division by zero gives an infinity or NaN, not an error (where the IR departs from SQL: `plan.rs`).
//! Floats are canonical: `-0.0` is `0.0` and there is one NaN, equal to itself and greater than every
//! number. An expression that does not type-check
//! against its input is rejected by [`ScalarExpr::typ`] before it is ever sent; should one be evaluated
//! anyway, evaluation returns [`EvalError::Internal`] rather than panicking.

use serde::{Deserialize, Serialize};

use crate::row::{ColumnType, Datum, Decimal, RelationType, Row, RowPacker, RowRef, ScalarType};

/// A function of one argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum UnaryFunc {
    /// Boolean negation (`NULL` stays `NULL`).
    Not,
    /// Arithmetic negation of an integer, float or decimal.
    Neg,
    /// `IS NULL`: never `NULL` itself.
    IsNull,
    /// `abs` of an integer (`abs(i64::MIN)` is an error), float or decimal.
    Abs,
    /// `CAST(x AS t)`. Supported: integer to float or decimal; decimal to integer (rounded half away from
    /// zero), float or another scale (rounded half away from zero); float to decimal (rounded; NaN and
    /// infinities are errors); date to timestamp (midnight) and timestamp to date (the day it falls
    /// in); any type to itself. Anything else is a type error (there is no cast to or from text).
    Cast(ScalarType),
    /// `round(x, scale)` of a decimal: half away from zero, to at most `scale` digits.
    Round(u8),
    /// `extract(year from x)` of a date or timestamp.
    ExtractYear,
    /// `extract(month from x)` of a date or timestamp (1 to 12).
    ExtractMonth,
    /// `extract(day from x)` of a date or timestamp (1 to 31).
    ExtractDay,
}

/// A function of two arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum BinaryFunc {
    /// `+` on integers, floats or decimals (the larger scale); a date or timestamp plus an interval.
    Add,
    /// `-` on integers, floats or decimals (the larger scale); a date or timestamp minus an interval;
    /// a date minus a date (an integer: days).
    Sub,
    /// `*` on integers, floats or decimals (the sum of the scales, at most 28).
    Mul,
    /// `/` on integers (truncating toward zero), floats or decimals; integer and decimal division by
    /// zero is an error, float division by zero is `+inf`, `-inf` or NaN (IEEE 754, unlike SQL engines).
    /// A decimal quotient is rounded half away from zero to the larger of the two *values'* scales plus
    /// 6, at most 28 (SQL leaves the scale to the implementation; PostgreSQL too derives it from the
    /// values), so it fits the type's: the larger of the operand types' scales plus 6.
    Div,
    /// `%` on integers, with the sign of the dividend; by zero is an error; `i64::MIN % -1` is `0`.
    Mod,
    /// `=`.
    Eq,
    /// `<>`.
    NotEq,
    /// `<`.
    Lt,
    /// `<=`.
    Lte,
    /// `>`.
    Gt,
    /// `>=`.
    Gte,
    /// Kleene `AND` on booleans.
    And,
    /// Kleene `OR` on booleans.
    Or,
    /// `NULLIF(a, b)`: `NULL` if `a = b`, else `a` (both are evaluated).
    NullIf,
}

impl BinaryFunc {
    fn is_comparison(self) -> bool {
        matches!(
            self,
            BinaryFunc::Eq
                | BinaryFunc::NotEq
                | BinaryFunc::Lt
                | BinaryFunc::Lte
                | BinaryFunc::Gt
                | BinaryFunc::Gte
        )
    }
}

/// A function of any number of arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum VariadicFunc {
    /// `COALESCE(a, b, ...)`: the first non-null argument, evaluated left to right, stopping there (the
    /// arguments after it are not evaluated); `NULL` if all are. At least one argument, all of one type.
    Coalesce,
    /// `x IN (a, b, ...)`: the first argument is `x`, the others the list (at least one), all of one
    /// type, all evaluated. `true` if `x` equals an item; else `NULL` if `x` or an item is `NULL`; else
    /// `false`.
    In,
    /// `substring(s FROM start [FOR length])` on text, by characters, positions from 1: the characters at
    /// positions `start..start + length` that exist (`start` may be below 1); without a length, to
    /// the end. A negative length is an error.
    Substring,
}

/// A `LIKE` pattern: `%` matches any run of characters, `_` any one character, every other character
/// itself (case-sensitively; there is no escape character). Compiled once, on first use, to a regular
/// expression (the `regex` crate), so matching a column against a literal pattern costs one scan.
///
/// Compared, hashed and serialized as its pattern text.
///
/// # Examples
/// ```
/// use protocol::LikePattern;
/// let pattern = LikePattern::new("%special%requests%");
/// assert!(pattern.matches("a special set of requests"));
/// assert!(!pattern.matches("requests special"));
/// assert!(LikePattern::new("a_c").matches("abc") && !LikePattern::new("a_c").matches("ac"));
/// assert!(LikePattern::new("1.5%").matches("1.5 kg") && !LikePattern::new("1.5%").matches("105"));
/// ```
pub struct LikePattern {
    pattern: String,
    compiled: std::sync::OnceLock<Result<regex::Regex, String>>,
}

impl LikePattern {
    /// A pattern (not compiled yet).
    pub fn new(pattern: impl Into<String>) -> Self {
        LikePattern { pattern: pattern.into(), compiled: std::sync::OnceLock::new() }
    }

    /// The pattern text.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The regular expression of the pattern, or why it cannot be compiled (a pattern too large for the
    /// `regex` crate's limits).
    fn regex(&self) -> Result<&regex::Regex, &str> {
        let compiled = self.compiled.get_or_init(|| {
            let mut expression = String::from("(?s)^");
            let mut literal = String::new();
            for c in self.pattern.chars() {
                if c == '%' || c == '_' {
                    expression.push_str(&regex::escape(&literal));
                    literal.clear();
                    expression.push_str(if c == '%' { ".*" } else { "." });
                } else {
                    literal.push(c);
                }
            }
            expression.push_str(&regex::escape(&literal));
            expression.push('$');
            regex::Regex::new(&expression).map_err(|e| e.to_string())
        });
        compiled.as_ref().map_err(String::as_str)
    }

    /// Whether `text` matches the whole pattern. A pattern that cannot be compiled matches nothing (the
    /// plan's validation rejects it before it is ever evaluated).
    pub fn matches(&self, text: &str) -> bool {
        self.regex().is_ok_and(|regex| regex.is_match(text))
    }
}

impl Clone for LikePattern {
    fn clone(&self) -> Self {
        LikePattern { pattern: self.pattern.clone(), compiled: self.compiled.clone() }
    }
}

impl std::fmt::Debug for LikePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LikePattern({:?})", self.pattern)
    }
}

impl PartialEq for LikePattern {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern
    }
}
impl Eq for LikePattern {}
impl PartialOrd for LikePattern {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for LikePattern {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.pattern.cmp(&other.pattern)
    }
}
impl std::hash::Hash for LikePattern {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.pattern.hash(state)
    }
}
impl Serialize for LikePattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.pattern.serialize(serializer)
    }
}
impl<'de> Deserialize<'de> for LikePattern {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(LikePattern::new)
    }
}

/// A scalar expression over the columns of one input row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ScalarExpr {
    /// The value of an input column.
    Column(usize),
    /// A constant: `row` holds exactly one datum, an instance of `typ`.
    Literal(Row, ColumnType),
    /// A unary function call.
    CallUnary {
        /// The function.
        func: UnaryFunc,
        /// Its argument.
        expr: Box<ScalarExpr>,
    },
    /// A binary function call.
    CallBinary {
        /// The function.
        func: BinaryFunc,
        /// The left argument.
        expr1: Box<ScalarExpr>,
        /// The right argument.
        expr2: Box<ScalarExpr>,
    },
    /// A call of a function of any number of arguments.
    CallVariadic {
        /// The function.
        func: VariadicFunc,
        /// Its arguments.
        exprs: Vec<ScalarExpr>,
    },
    /// `IF cond THEN then ELSE els`.
    If {
        /// A boolean condition.
        cond: Box<ScalarExpr>,
        /// The value when `cond` is true.
        then: Box<ScalarExpr>,
        /// The value otherwise (false or `NULL`).
        els: Box<ScalarExpr>,
    },
    /// `expr LIKE pattern` on text (`NULL` stays `NULL`); `NOT LIKE` is its `Not`. The pattern is a
    /// literal.
    Like {
        /// The text matched.
        expr: Box<ScalarExpr>,
        /// The pattern.
        pattern: LikePattern,
    },
}

/// An error evaluating a [`ScalarExpr`] on a row: a property of the data, not a bug.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum EvalError {
    /// Integer or decimal division or modulo by zero.
    #[error("division by zero")]
    DivisionByZero,
    /// Integer arithmetic overflowed 64 bits.
    #[error("integer out of range")]
    Int64OutOfRange,
    /// A decimal result is not a decimal: more than 96 bits of mantissa at its scale (or an exact
    /// intermediate beyond 128 bits, see `expr.rs`).
    #[error("decimal out of range")]
    DecimalOutOfRange,
    /// A date or timestamp result outside the years 1 to 9999 (a timestamp also before 1970).
    #[error("date out of range")]
    DateOutOfRange,
    /// A cast of a value that has no counterpart in the target type (a NaN or an infinity to a decimal
    /// or an integer).
    #[error("cannot cast {0}")]
    InvalidCast(String),
    /// `substring` with a negative length.
    #[error("negative substring length not allowed")]
    NegativeSubstringLength,
    /// A multiplicity that must be an `i64` is not: a row of a result, or the number of rows of a
    /// `Reduce` or `TopK` group (inside a plan multiplicities are exact; see `plan.rs`).
    #[error("multiplicity out of range")]
    MultiplicityOutOfRange,
    /// The expression did not fit its input (it should have been rejected by type checking).
    #[error("internal error evaluating expression: {0}")]
    Internal(String),
}

/// Why an expression does not type-check against its input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExprTypeError {
    /// A column reference beyond the input's arity.
    #[error("column {column} does not exist (input has {arity} columns)")]
    ColumnOutOfRange {
        /// The referenced column.
        column: usize,
        /// The input's arity.
        arity: usize,
    },
    /// A literal whose row is not exactly one datum of its declared type.
    #[error("literal {literal} is not a single {typ:?}")]
    BadLiteral {
        /// The literal, printed.
        literal: String,
        /// Its declared type.
        typ: ColumnType,
    },
    /// A function applied to arguments of the wrong type (or number).
    #[error("{func} cannot be applied to {argument_types:?}")]
    BadArguments {
        /// The function, printed.
        func: String,
        /// The argument types.
        argument_types: Vec<ScalarType>,
    },
    /// A `LIKE` pattern the regular expression engine refuses (too large).
    #[error("LIKE pattern {pattern:?} cannot be compiled: {reason}")]
    BadLikePattern {
        /// The pattern.
        pattern: String,
        /// Why.
        reason: String,
    },
}

/// The type both of two scalar types fit in: the same type, or for two decimals the larger scale.
fn unify(a: ScalarType, b: ScalarType) -> Option<ScalarType> {
    match (a, b) {
        (ScalarType::Decimal { scale: x }, ScalarType::Decimal { scale: y }) => {
            Some(ScalarType::Decimal { scale: x.max(y) })
        }
        (a, b) if a == b => Some(a),
        _ => None,
    }
}

/// The result scale of a decimal division (see [`BinaryFunc::Div`]).
fn division_scale(a: u8, b: u8) -> u8 {
    (a.max(b) + 6).min(crate::row::MAX_DECIMAL_SCALE)
}

/// The scalar type of `func(a, b)`, or `None` if it does not apply.
fn binary_type(func: BinaryFunc, a: ScalarType, b: ScalarType) -> Option<ScalarType> {
    use ScalarType::*;
    match (func, a, b) {
        (BinaryFunc::Add | BinaryFunc::Sub, Date, Interval) => Some(Date),
        (BinaryFunc::Add | BinaryFunc::Sub, Timestamp, Interval) => Some(Timestamp),
        (BinaryFunc::Sub, Date, Date) => Some(Int64),
        (BinaryFunc::Mod, Int64, Int64) => Some(Int64),
        (BinaryFunc::Add | BinaryFunc::Sub | BinaryFunc::Mul | BinaryFunc::Div, Int64, Int64) => Some(Int64),
        (BinaryFunc::Add | BinaryFunc::Sub | BinaryFunc::Mul | BinaryFunc::Div, Float64, Float64) => {
            Some(Float64)
        }
        (BinaryFunc::Add | BinaryFunc::Sub, Decimal { scale: x }, Decimal { scale: y }) => {
            Some(Decimal { scale: x.max(y) })
        }
        (BinaryFunc::Mul, Decimal { scale: x }, Decimal { scale: y }) => {
            let scale = x.checked_add(y)?;
            (scale <= crate::row::MAX_DECIMAL_SCALE).then_some(Decimal { scale })
        }
        (BinaryFunc::Div, Decimal { scale: x }, Decimal { scale: y }) => {
            Some(Decimal { scale: division_scale(x, y) })
        }
        (func, a, b) if func.is_comparison() => unify(a, b).map(|_| Bool),
        (BinaryFunc::And | BinaryFunc::Or, Bool, Bool) => Some(Bool),
        (BinaryFunc::NullIf, a, b) => unify(a, b).map(|_| a),
        _ => None,
    }
}

/// The scalar type of `func(a)`, or `None` if it does not apply.
fn unary_type(func: UnaryFunc, a: ScalarType) -> Option<ScalarType> {
    use ScalarType::*;
    match (func, a) {
        (UnaryFunc::Not, Bool) => Some(Bool),
        (UnaryFunc::Neg | UnaryFunc::Abs, Int64 | Float64 | Decimal { .. }) => Some(a),
        (UnaryFunc::IsNull, _) => Some(Bool),
        (UnaryFunc::Round(scale), Decimal { scale: input }) => Some(Decimal { scale: scale.min(input) }),
        (UnaryFunc::ExtractYear | UnaryFunc::ExtractMonth | UnaryFunc::ExtractDay, Date | Timestamp) => {
            Some(Int64)
        }
        (UnaryFunc::Cast(target), source) => cast_applies(source, target).then_some(target),
        _ => None,
    }
}

/// Whether [`UnaryFunc::Cast`] from `source` to `target` is supported.
fn cast_applies(source: ScalarType, target: ScalarType) -> bool {
    use ScalarType::*;
    if let Decimal { scale } = target
        && scale > crate::row::MAX_DECIMAL_SCALE
    {
        return false;
    }
    source == target
        || matches!(
            (source, target),
            (Int64, Float64 | Decimal { .. })
                | (Decimal { .. }, Int64 | Float64 | Decimal { .. })
                | (Float64, Decimal { .. })
                | (Date, Timestamp)
                | (Timestamp, Date)
        )
}

impl ScalarExpr {
    /// A column reference.
    pub fn column(column: usize) -> Self {
        ScalarExpr::Column(column)
    }

    /// A non-null literal (a decimal's type has the value's own scale).
    ///
    /// # Examples
    /// ```
    /// use protocol::{Datum, ScalarExpr, ScalarType};
    /// let five = ScalarExpr::literal(Datum::Int64(5));
    /// assert_eq!(five.eval(&[]).unwrap(), Datum::Int64(5));
    /// # let _ = ScalarType::Int64;
    /// ```
    pub fn literal(datum: Datum<'_>) -> Self {
        let scalar_type = datum.scalar_type().unwrap_or(ScalarType::Bool);
        ScalarExpr::Literal(Row::pack([datum]), ColumnType::new(scalar_type, datum.is_null()))
    }

    /// A decimal literal of the given type scale (SQL's `1.50` is a decimal of scale 2).
    ///
    /// # Examples
    /// ```
    /// use protocol::{ColumnType, RelationType, ScalarExpr, ScalarType};
    /// let rate = ScalarExpr::decimal("0.10", 2);
    /// assert_eq!(rate.typ(&RelationType::default()).unwrap(), ColumnType::new(ScalarType::Decimal { scale: 2 }, false));
    /// ```
    ///
    /// # Panics
    /// If `text` is not a decimal of at most `scale` digits after the point (a literal in code).
    pub fn decimal(text: &str, scale: u8) -> Self {
        let value: crate::row::Decimal = text.parse().expect("a decimal literal");
        assert!(value.scale() <= scale, "{text} has more than {scale} digits after the point");
        ScalarExpr::Literal(
            Row::pack([Datum::Decimal(value)]),
            ColumnType::new(ScalarType::Decimal { scale }, false),
        )
    }

    /// A typed `NULL` literal.
    pub fn null(scalar_type: ScalarType) -> Self {
        ScalarExpr::Literal(Row::pack([Datum::Null]), ColumnType::new(scalar_type, true))
    }

    /// `func(self)`.
    pub fn call_unary(self, func: UnaryFunc) -> Self {
        ScalarExpr::CallUnary { func, expr: Box::new(self) }
    }

    /// `func(self, other)`.
    pub fn call_binary(self, func: BinaryFunc, other: ScalarExpr) -> Self {
        ScalarExpr::CallBinary { func, expr1: Box::new(self), expr2: Box::new(other) }
    }

    /// `func(exprs...)`.
    pub fn call_variadic(func: VariadicFunc, exprs: Vec<ScalarExpr>) -> Self {
        ScalarExpr::CallVariadic { func, exprs }
    }

    /// `IF self THEN then ELSE els`.
    pub fn if_then_else(self, then: ScalarExpr, els: ScalarExpr) -> Self {
        ScalarExpr::If { cond: Box::new(self), then: Box::new(then), els: Box::new(els) }
    }

    /// `CAST(self AS target)`.
    pub fn cast(self, target: ScalarType) -> Self {
        self.call_unary(UnaryFunc::Cast(target))
    }

    /// `self LIKE pattern`.
    pub fn like(self, pattern: &str) -> Self {
        ScalarExpr::Like { expr: Box::new(self), pattern: LikePattern::new(pattern) }
    }

    /// `self NOT LIKE pattern`: the negation of [`like`](Self::like) (`NULL` stays `NULL`).
    pub fn not_like(self, pattern: &str) -> Self {
        self.like(pattern).call_unary(UnaryFunc::Not)
    }

    /// `self IN (list)`.
    pub fn in_list(self, list: Vec<ScalarExpr>) -> Self {
        let mut exprs = vec![self];
        exprs.extend(list);
        ScalarExpr::CallVariadic { func: VariadicFunc::In, exprs }
    }

    /// `self BETWEEN low AND high`, lowered to `self >= low AND self <= high` (SQL's definition; `self`
    /// is evaluated twice, which only matters for its errors, and those happen the same either way).
    ///
    /// # Examples
    /// ```
    /// use protocol::{Datum, ScalarExpr};
    /// let x = |i| ScalarExpr::literal(Datum::Int64(i));
    /// let between = x(5).between(x(1), x(5));
    /// assert_eq!(between.eval(&[]).unwrap(), Datum::Bool(true));
    /// assert_eq!(x(6).between(x(1), x(5)).eval(&[]).unwrap(), Datum::Bool(false));
    /// ```
    pub fn between(self, low: ScalarExpr, high: ScalarExpr) -> Self {
        self.clone()
            .call_binary(BinaryFunc::Gte, low)
            .call_binary(BinaryFunc::And, self.call_binary(BinaryFunc::Lte, high))
    }

    /// `CASE WHEN c1 THEN v1 WHEN c2 THEN v2 ... ELSE els END`, lowered to nested `If`s (SQL's
    /// definition: the first condition that is `true` picks its value; `NULL` conditions do not).
    ///
    /// # Examples
    /// ```
    /// use protocol::{BinaryFunc, Datum, ScalarExpr, ScalarType};
    /// let x = ScalarExpr::column(0);
    /// let lit = |i| ScalarExpr::literal(Datum::Int64(i));
    /// let sign = ScalarExpr::case(
    ///     vec![(x.clone().call_binary(BinaryFunc::Lt, lit(0)), lit(-1)), (x.clone().call_binary(BinaryFunc::Gt, lit(0)), lit(1))],
    ///     lit(0),
    /// );
    /// assert_eq!(sign.eval(&[Datum::Int64(-7)]).unwrap(), Datum::Int64(-1));
    /// assert_eq!(sign.eval(&[Datum::Null]).unwrap(), Datum::Int64(0));
    /// # let _ = ScalarType::Int64;
    /// ```
    pub fn case(whens: Vec<(ScalarExpr, ScalarExpr)>, els: ScalarExpr) -> Self {
        whens.into_iter().rev().fold(els, |els, (cond, then)| cond.if_then_else(then, els))
    }

    /// The type of the expression's result over an input of type `input`.
    ///
    /// # Examples
    /// ```
    /// use protocol::{BinaryFunc, ColumnType, Datum, ExprTypeError, RelationType, ScalarExpr, ScalarType};
    /// let input = RelationType::new(vec![ColumnType::new(ScalarType::Int64, true)]);
    /// let plus_one = ScalarExpr::column(0).call_binary(BinaryFunc::Add, ScalarExpr::literal(Datum::Int64(1)));
    /// assert_eq!(plus_one.typ(&input).unwrap(), ColumnType::new(ScalarType::Int64, true));
    /// let bad = ScalarExpr::column(0).call_binary(BinaryFunc::Add, ScalarExpr::literal(Datum::Text("x")));
    /// assert!(matches!(bad.typ(&input), Err(ExprTypeError::BadArguments { .. })));
    /// assert!(matches!(ScalarExpr::column(3).typ(&input), Err(ExprTypeError::ColumnOutOfRange { column: 3, arity: 1 })));
    /// let price = ScalarExpr::decimal("10.25", 2);
    /// let discounted = price.clone().call_binary(BinaryFunc::Mul, ScalarExpr::decimal("0.9", 2));
    /// assert_eq!(discounted.typ(&input).unwrap(), ColumnType::new(ScalarType::Decimal { scale: 4 }, false));
    /// ```
    pub fn typ(&self, input: &RelationType) -> Result<ColumnType, ExprTypeError> {
        match self {
            ScalarExpr::Column(column) => input
                .column_types
                .get(*column)
                .copied()
                .ok_or(ExprTypeError::ColumnOutOfRange { column: *column, arity: input.arity() }),
            ScalarExpr::Literal(row, typ) => {
                let mut datums = row.iter();
                match (datums.next(), datums.next()) {
                    (Some(datum), None) if datum.is_instance_of(typ) => Ok(*typ),
                    _ => Err(ExprTypeError::BadLiteral { literal: row.to_string(), typ: *typ }),
                }
            }
            ScalarExpr::CallUnary { func, expr } => {
                let arg = expr.typ(input)?;
                let scalar =
                    unary_type(*func, arg.scalar_type).ok_or_else(|| ExprTypeError::BadArguments {
                        func: format!("{func:?}"),
                        argument_types: vec![arg.scalar_type],
                    })?;
                let nullable = *func != UnaryFunc::IsNull && arg.nullable;
                Ok(ColumnType::new(scalar, nullable))
            }
            ScalarExpr::CallBinary { func, expr1, expr2 } => {
                let (a, b) = (expr1.typ(input)?, expr2.typ(input)?);
                let scalar = binary_type(*func, a.scalar_type, b.scalar_type).ok_or_else(|| {
                    ExprTypeError::BadArguments {
                        func: format!("{func:?}"),
                        argument_types: vec![a.scalar_type, b.scalar_type],
                    }
                })?;
                let nullable = match func {
                    // NULLIF is NULL when the arguments are equal, whatever their types say.
                    BinaryFunc::NullIf => true,
                    _ => a.nullable || b.nullable,
                };
                Ok(ColumnType::new(scalar, nullable))
            }
            ScalarExpr::CallVariadic { func, exprs } => {
                let types = exprs.iter().map(|e| e.typ(input)).collect::<Result<Vec<_>, _>>()?;
                variadic_type(*func, &types)
            }
            ScalarExpr::If { cond, then, els } => {
                let c = cond.typ(input)?;
                let (t, e) = (then.typ(input)?, els.typ(input)?);
                match unify(t.scalar_type, e.scalar_type) {
                    Some(scalar) if c.scalar_type == ScalarType::Bool => {
                        Ok(ColumnType::new(scalar, t.nullable || e.nullable))
                    }
                    _ => Err(ExprTypeError::BadArguments {
                        func: "If".to_string(),
                        argument_types: vec![c.scalar_type, t.scalar_type, e.scalar_type],
                    }),
                }
            }
            ScalarExpr::Like { expr, pattern } => {
                let arg = expr.typ(input)?;
                if arg.scalar_type != ScalarType::Text {
                    return Err(ExprTypeError::BadArguments {
                        func: "Like".to_string(),
                        argument_types: vec![arg.scalar_type],
                    });
                }
                pattern.regex().map_err(|reason| ExprTypeError::BadLikePattern {
                    pattern: pattern.pattern().to_string(),
                    reason: reason.to_string(),
                })?;
                Ok(ColumnType::new(ScalarType::Bool, arg.nullable))
            }
        }
    }

    /// Evaluates the expression on the datums of one row.
    ///
    /// # Examples
    /// ```
    /// use protocol::{BinaryFunc, Datum, EvalError, ScalarExpr};
    /// let div = ScalarExpr::column(0).call_binary(BinaryFunc::Div, ScalarExpr::column(1));
    /// assert_eq!(div.eval(&[Datum::Int64(7), Datum::Int64(2)]).unwrap(), Datum::Int64(3));
    /// assert_eq!(div.eval(&[Datum::Int64(7), Datum::Int64(0)]), Err(EvalError::DivisionByZero));
    /// assert_eq!(div.eval(&[Datum::Null, Datum::Int64(0)]).unwrap(), Datum::Null);
    /// let add = ScalarExpr::column(0).call_binary(BinaryFunc::Add, ScalarExpr::column(0));
    /// assert_eq!(add.eval(&[Datum::Int64(i64::MAX)]), Err(EvalError::Int64OutOfRange));
    /// ```
    pub fn eval<'a>(&'a self, datums: &[Datum<'a>]) -> Result<Datum<'a>, EvalError> {
        match self {
            ScalarExpr::Column(column) => datums
                .get(*column)
                .copied()
                .ok_or_else(|| EvalError::Internal(format!("column {column} of a row of {}", datums.len()))),
            ScalarExpr::Literal(row, _) => {
                row.iter().next().ok_or_else(|| EvalError::Internal("empty literal".to_string()))
            }
            ScalarExpr::CallUnary { func, expr } => {
                let arg = expr.eval(datums)?;
                match (func, arg) {
                    (UnaryFunc::IsNull, arg) => Ok(Datum::Bool(arg.is_null())),
                    (_, Datum::Null) => Ok(Datum::Null),
                    (func, arg) => eval_unary(*func, arg),
                }
            }
            ScalarExpr::CallBinary { func: BinaryFunc::And, expr1, expr2 } => {
                // Kleene AND: false wins over NULL, and short-circuits errors on the right.
                match expr1.eval(datums)? {
                    Datum::Bool(false) => Ok(Datum::Bool(false)),
                    left => match (left, expr2.eval(datums)?) {
                        (_, Datum::Bool(false)) => Ok(Datum::Bool(false)),
                        (Datum::Bool(true), right @ (Datum::Bool(_) | Datum::Null)) => Ok(right),
                        (Datum::Null, Datum::Bool(true) | Datum::Null) => Ok(Datum::Null),
                        (l, r) => Err(EvalError::Internal(format!("And of {l:?} and {r:?}"))),
                    },
                }
            }
            ScalarExpr::CallBinary { func: BinaryFunc::Or, expr1, expr2 } => match expr1.eval(datums)? {
                Datum::Bool(true) => Ok(Datum::Bool(true)),
                left => match (left, expr2.eval(datums)?) {
                    (_, Datum::Bool(true)) => Ok(Datum::Bool(true)),
                    (Datum::Bool(false), right @ (Datum::Bool(_) | Datum::Null)) => Ok(right),
                    (Datum::Null, Datum::Bool(false) | Datum::Null) => Ok(Datum::Null),
                    (l, r) => Err(EvalError::Internal(format!("Or of {l:?} and {r:?}"))),
                },
            },
            ScalarExpr::CallBinary { func: BinaryFunc::NullIf, expr1, expr2 } => {
                let (a, b) = (expr1.eval(datums)?, expr2.eval(datums)?);
                if a.is_null() || b.is_null() {
                    return Ok(a);
                }
                match eval_binary(BinaryFunc::Eq, a, b)? {
                    Datum::Bool(true) => Ok(Datum::Null),
                    _ => Ok(a),
                }
            }
            ScalarExpr::CallBinary { func, expr1, expr2 } => {
                let (a, b) = (expr1.eval(datums)?, expr2.eval(datums)?);
                if a.is_null() || b.is_null() {
                    return Ok(Datum::Null);
                }
                eval_binary(*func, a, b)
            }
            ScalarExpr::CallVariadic { func, exprs } => eval_variadic(*func, exprs, datums),
            ScalarExpr::If { cond, then, els } => match cond.eval(datums)? {
                Datum::Bool(true) => then.eval(datums),
                Datum::Bool(false) | Datum::Null => els.eval(datums),
                other => Err(EvalError::Internal(format!("If on {other:?}"))),
            },
            ScalarExpr::Like { expr, pattern } => match expr.eval(datums)? {
                Datum::Null => Ok(Datum::Null),
                Datum::Text(text) => Ok(Datum::Bool(pattern.matches(text))),
                other => Err(EvalError::Internal(format!("Like of {other:?}"))),
            },
        }
    }

    /// Calls `f` on every column reference of the expression, which it may rewrite.
    ///
    /// # Examples
    /// ```
    /// use protocol::{BinaryFunc, ScalarExpr};
    /// let mut expr = ScalarExpr::column(0).call_binary(BinaryFunc::Add, ScalarExpr::column(2));
    /// expr.visit_columns_mut(&mut |c| *c += 10);
    /// assert_eq!(expr, ScalarExpr::column(10).call_binary(BinaryFunc::Add, ScalarExpr::column(12)));
    /// ```
    pub fn visit_columns_mut(&mut self, f: &mut dyn FnMut(&mut usize)) {
        match self {
            ScalarExpr::Column(column) => f(column),
            ScalarExpr::Literal(..) => {}
            ScalarExpr::CallUnary { expr, .. } | ScalarExpr::Like { expr, .. } => expr.visit_columns_mut(f),
            ScalarExpr::CallBinary { expr1, expr2, .. } => {
                expr1.visit_columns_mut(f);
                expr2.visit_columns_mut(f);
            }
            ScalarExpr::CallVariadic { exprs, .. } => exprs.iter_mut().for_each(|e| e.visit_columns_mut(f)),
            ScalarExpr::If { cond, then, els } => {
                cond.visit_columns_mut(f);
                then.visit_columns_mut(f);
                els.visit_columns_mut(f);
            }
        }
    }

    /// Whether the expression references no column (so it has the same value for every row).
    pub fn is_literal(&self) -> bool {
        matches!(self, ScalarExpr::Literal(..))
    }
}

/// The type of `func(args)`.
fn variadic_type(func: VariadicFunc, args: &[ColumnType]) -> Result<ColumnType, ExprTypeError> {
    let bad = || ExprTypeError::BadArguments {
        func: format!("{func:?}"),
        argument_types: args.iter().map(|a| a.scalar_type).collect(),
    };
    let unified = || {
        let mut scalars = args.iter().map(|a| a.scalar_type);
        let first = scalars.next()?;
        scalars.try_fold(first, unify)
    };
    match func {
        VariadicFunc::Coalesce => {
            let scalar = unified().ok_or_else(bad)?;
            // NULL only if every argument may be.
            Ok(ColumnType::new(scalar, args.iter().all(|a| a.nullable)))
        }
        VariadicFunc::In if args.len() >= 2 => {
            unified().ok_or_else(bad)?;
            Ok(ColumnType::new(ScalarType::Bool, args.iter().any(|a| a.nullable)))
        }
        VariadicFunc::Substring
            if (2..=3).contains(&args.len())
                && args[0].scalar_type == ScalarType::Text
                && args[1..].iter().all(|a| a.scalar_type == ScalarType::Int64) =>
        {
            Ok(ColumnType::new(ScalarType::Text, args.iter().any(|a| a.nullable)))
        }
        _ => Err(bad()),
    }
}

fn eval_variadic<'a>(
    func: VariadicFunc,
    exprs: &'a [ScalarExpr],
    datums: &[Datum<'a>],
) -> Result<Datum<'a>, EvalError> {
    match func {
        VariadicFunc::Coalesce => {
            for expr in exprs {
                let datum = expr.eval(datums)?;
                if !datum.is_null() {
                    return Ok(datum);
                }
            }
            Ok(Datum::Null)
        }
        VariadicFunc::In => {
            let (needle, list) =
                exprs.split_first().ok_or_else(|| EvalError::Internal("IN without arguments".into()))?;
            let needle = needle.eval(datums)?;
            let mut found = false;
            let mut saw_null = needle.is_null();
            for item in list {
                let item = item.eval(datums)?;
                if item.is_null() {
                    saw_null = true;
                } else if !needle.is_null() && eval_binary(BinaryFunc::Eq, needle, item)? == Datum::Bool(true)
                {
                    found = true;
                }
            }
            Ok(if found {
                Datum::Bool(true)
            } else if saw_null {
                Datum::Null
            } else {
                Datum::Bool(false)
            })
        }
        VariadicFunc::Substring => {
            let mut args = Vec::with_capacity(exprs.len());
            for expr in exprs {
                args.push(expr.eval(datums)?);
            }
            if args.iter().any(Datum::is_null) {
                return Ok(Datum::Null);
            }
            match args.as_slice() {
                [Datum::Text(s), Datum::Int64(start)] => Ok(Datum::Text(substring(s, *start, None)?)),
                [Datum::Text(s), Datum::Int64(start), Datum::Int64(length)] => {
                    Ok(Datum::Text(substring(s, *start, Some(*length))?))
                }
                other => Err(EvalError::Internal(format!("Substring of {other:?}"))),
            }
        }
    }
}

/// SQL's `substring(s FROM start FOR length)` by characters (see [`VariadicFunc::Substring`]).
fn substring(s: &str, start: i64, length: Option<i64>) -> Result<&str, EvalError> {
    let end = match length {
        Some(length) if length < 0 => return Err(EvalError::NegativeSubstringLength),
        Some(length) => start.saturating_add(length),
        None => i64::MAX,
    };
    // Characters at positions `max(start, 1)..end` (1-based, end exclusive).
    let first = start.max(1);
    if end <= first {
        return Ok("");
    }
    let byte_at = |position: i64| -> usize {
        let index = usize::try_from(position - 1).unwrap_or(usize::MAX);
        s.char_indices().nth(index).map_or(s.len(), |(byte, _)| byte)
    };
    let (from, to) = (byte_at(first), if end == i64::MAX { s.len() } else { byte_at(end) });
    Ok(&s[from..to.max(from)])
}

fn eval_unary(func: UnaryFunc, arg: Datum<'_>) -> Result<Datum<'_>, EvalError> {
    match (func, arg) {
        (UnaryFunc::Not, Datum::Bool(b)) => Ok(Datum::Bool(!b)),
        (UnaryFunc::Neg, Datum::Int64(i)) => {
            i.checked_neg().map(Datum::Int64).ok_or(EvalError::Int64OutOfRange)
        }
        (UnaryFunc::Neg, Datum::Float64(x)) => Ok(Datum::float64(-x.get())),
        (UnaryFunc::Neg, Datum::Decimal(d)) => Ok(Datum::Decimal(Decimal::canonical(-d.get()))),
        (UnaryFunc::Abs, Datum::Int64(i)) => {
            i.checked_abs().map(Datum::Int64).ok_or(EvalError::Int64OutOfRange)
        }
        (UnaryFunc::Abs, Datum::Float64(x)) => Ok(Datum::float64(x.get().abs())),
        (UnaryFunc::Abs, Datum::Decimal(d)) => Ok(Datum::Decimal(Decimal::canonical(d.get().abs()))),
        (UnaryFunc::Round(scale), Datum::Decimal(d)) => Ok(Datum::Decimal(decimal::round(d, scale))),
        (UnaryFunc::ExtractYear | UnaryFunc::ExtractMonth | UnaryFunc::ExtractDay, datum) => {
            let days = match datum {
                Datum::Date(days) => days,
                Datum::Timestamp(ms) => dates::timestamp_day(ms),
                other => return Err(EvalError::Internal(format!("{func:?} of {other:?}"))),
            };
            let (year, month, day) = civil_from_days(days);
            Ok(Datum::Int64(match func {
                UnaryFunc::ExtractYear => i64::from(year),
                UnaryFunc::ExtractMonth => i64::from(month),
                _ => i64::from(day),
            }))
        }
        (UnaryFunc::Cast(target), datum) => cast(datum, target),
        (func, arg) => Err(EvalError::Internal(format!("{func:?} of {arg:?}"))),
    }
}

/// `CAST(datum AS target)` of a non-null datum (see [`UnaryFunc::Cast`]).
fn cast(datum: Datum<'_>, target: ScalarType) -> Result<Datum<'_>, EvalError> {
    match (datum, target) {
        (Datum::Int64(i), ScalarType::Float64) => Ok(Datum::float64(i as f64)),
        (Datum::Int64(i), ScalarType::Decimal { .. }) => {
            Decimal::new(i128::from(i), 0).map(Datum::Decimal).ok_or(EvalError::DecimalOutOfRange)
        }
        (Datum::Decimal(d), ScalarType::Decimal { scale }) => Ok(Datum::Decimal(decimal::round(d, scale))),
        (Datum::Decimal(d), ScalarType::Int64) => {
            let rounded = decimal::round(d, 0);
            i64::try_from(rounded.mantissa()).map(Datum::Int64).map_err(|_| EvalError::Int64OutOfRange)
        }
        (Datum::Decimal(d), ScalarType::Float64) => {
            // The nearest float: parsing the exact decimal text rounds correctly.
            let value: f64 = d.to_string().parse().map_err(|_| EvalError::InvalidCast(d.to_string()))?;
            Ok(Datum::float64(value))
        }
        (Datum::Float64(x), ScalarType::Decimal { scale }) => {
            let value = rust_decimal::Decimal::from_f64_retain(x.get())
                .ok_or_else(|| EvalError::InvalidCast(format!("{} to a decimal", x.get())))?;
            Ok(Datum::Decimal(decimal::round(Decimal::canonical(value), scale)))
        }
        (Datum::Date(days), ScalarType::Timestamp) => {
            dates::date_timestamp(days).map(Datum::Timestamp).ok_or(EvalError::DateOutOfRange)
        }
        (Datum::Timestamp(ms), ScalarType::Date) => Ok(Datum::Date(dates::timestamp_day(ms))),
        (datum, target) if datum.scalar_type() == Some(target) => Ok(datum),
        (datum, target) => Err(EvalError::Internal(format!("cast of {datum:?} to {target:?}"))),
    }
}

fn eval_binary<'a>(func: BinaryFunc, a: Datum<'a>, b: Datum<'a>) -> Result<Datum<'a>, EvalError> {
    use BinaryFunc::*;
    if func.is_comparison() {
        let same_type = match (a, b) {
            (Datum::Decimal(_), Datum::Decimal(_)) => true,
            (a, b) => a.scalar_type() == b.scalar_type(),
        };
        if !same_type {
            return Err(EvalError::Internal(format!("{func:?} of {a:?} and {b:?}")));
        }
        let ordering = a.cmp(&b);
        let result = match func {
            Eq => ordering.is_eq(),
            NotEq => ordering.is_ne(),
            Lt => ordering.is_lt(),
            Lte => ordering.is_le(),
            Gt => ordering.is_gt(),
            Gte => ordering.is_ge(),
            _ => unreachable!("is_comparison"),
        };
        return Ok(Datum::Bool(result));
    }
    match (a, b) {
        (Datum::Int64(x), Datum::Int64(y)) => {
            let result = match func {
                Add => x.checked_add(y),
                Sub => x.checked_sub(y),
                Mul => x.checked_mul(y),
                Div if y == 0 => return Err(EvalError::DivisionByZero),
                Div => x.checked_div(y),
                Mod if y == 0 => return Err(EvalError::DivisionByZero),
                // Exact: only `i64::MIN % -1` wraps, and its exact value is 0.
                Mod => Some(x.wrapping_rem(y)),
                _ => return Err(EvalError::Internal(format!("{func:?} of integers"))),
            };
            result.map(Datum::Int64).ok_or(EvalError::Int64OutOfRange)
        }
        (Datum::Float64(x), Datum::Float64(y)) => {
            let (x, y) = (x.get(), y.get());
            let result = match func {
                Add => x + y,
                Sub => x - y,
                Mul => x * y,
                Div => x / y,
                _ => return Err(EvalError::Internal(format!("{func:?} of floats"))),
            };
            Ok(Datum::float64(result))
        }
        (Datum::Decimal(x), Datum::Decimal(y)) => decimal_arithmetic(func, x, y).map(Datum::Decimal),
        (Datum::Date(days), Datum::Interval(interval)) if matches!(func, Add | Sub) => {
            let interval = if func == Sub { dates::negate(interval)? } else { interval };
            dates::add_to_date(days, interval).map(Datum::Date)
        }
        (Datum::Timestamp(ms), Datum::Interval(interval)) if matches!(func, Add | Sub) => {
            let interval = if func == Sub { dates::negate(interval)? } else { interval };
            dates::add_to_timestamp(ms, interval).map(Datum::Timestamp)
        }
        (Datum::Date(x), Datum::Date(y)) if func == Sub => Ok(Datum::Int64(i64::from(x) - i64::from(y))),
        (a, b) => Err(EvalError::Internal(format!("{func:?} of {a:?} and {b:?}"))),
    }
}

/// `x func y` for two decimals (`+ - * /`, see [`BinaryFunc`]): the IR's own decimal arithmetic, which
/// [`ScalarExpr::eval`] and [`crate::AggregateFunc::eval`]'s `avg` use (and a replica that accumulates an
/// `avg` itself must use too).
///
/// # Examples
/// ```
/// use protocol::{BinaryFunc, Decimal, decimal_arithmetic};
/// let (two, three) = (Decimal::new(2, 0).unwrap(), Decimal::new(3, 0).unwrap());
/// assert_eq!(decimal_arithmetic(BinaryFunc::Div, two, three).unwrap().to_string(), "0.666667");
/// ```
pub fn decimal_arithmetic(func: BinaryFunc, x: Decimal, y: Decimal) -> Result<Decimal, EvalError> {
    decimal::arithmetic(func, x, y)
}

/// Decimal arithmetic: exact `+ - *` in 128 bits, `/` rounded (see [`BinaryFunc`]).
mod decimal {
    use super::{BinaryFunc, EvalError};
    use crate::row::{Decimal, MAX_DECIMAL_SCALE};

    /// `10^exponent` in 128 bits, if it fits.
    fn power_of_ten(exponent: u32) -> Option<i128> {
        10i128.checked_pow(exponent)
    }

    /// `mantissa * 10^-scale` as a canonical decimal, or out of range.
    fn make(mantissa: i128, scale: u32) -> Result<Decimal, EvalError> {
        let scale = u8::try_from(scale).map_err(|_| EvalError::DecimalOutOfRange)?;
        // `Decimal::new` strips trailing zeros first: an exact result with more than 28 digits after the
        // point, or more than 96 bits, may still be a decimal once they are gone.
        let _ = MAX_DECIMAL_SCALE;
        Decimal::new(mantissa, scale).ok_or(EvalError::DecimalOutOfRange)
    }

    /// `x / y` rounded half away from zero to an integer (`y` non-zero).
    fn divide_rounded(x: i128, y: i128) -> i128 {
        let (quotient, remainder) = (x / y, x % y);
        // |remainder| * 2 >= |y| rounds away from zero; computed without overflow.
        let (r, d) = (remainder.unsigned_abs(), y.unsigned_abs());
        if r >= d - r { if (x < 0) == (y < 0) { quotient + 1 } else { quotient - 1 } } else { quotient }
    }

    /// `x op y` for two decimals.
    pub(super) fn arithmetic(func: BinaryFunc, x: Decimal, y: Decimal) -> Result<Decimal, EvalError> {
        let (mx, sx) = (x.mantissa(), u32::from(x.scale()));
        let (my, sy) = (y.mantissa(), u32::from(y.scale()));
        let out_of_range = || EvalError::DecimalOutOfRange;
        let aligned = |m: i128, from: u32, to: u32| -> Result<i128, EvalError> {
            m.checked_mul(power_of_ten(to - from).ok_or_else(out_of_range)?).ok_or_else(out_of_range)
        };
        match func {
            BinaryFunc::Add | BinaryFunc::Sub => {
                let scale = sx.max(sy);
                let (a, b) = (aligned(mx, sx, scale)?, aligned(my, sy, scale)?);
                let sum = if func == BinaryFunc::Add { a.checked_add(b) } else { a.checked_sub(b) };
                make(sum.ok_or_else(out_of_range)?, scale)
            }
            BinaryFunc::Mul => make(mx.checked_mul(my).ok_or_else(out_of_range)?, sx + sy),
            BinaryFunc::Div => {
                if my == 0 {
                    return Err(EvalError::DivisionByZero);
                }
                let scale = (sx.max(sy) + 6).min(u32::from(MAX_DECIMAL_SCALE));
                // (mx / 10^sx) / (my / 10^sy) = mx * 10^(scale + sy - sx) / my, in units of 10^-scale.
                let exponent = scale + sy;
                let quotient = if exponent >= sx {
                    divide_rounded(aligned(mx, 0, exponent - sx)?, my)
                } else {
                    divide_rounded(mx, aligned(my, 0, sx - exponent)?)
                };
                make(quotient, scale)
            }
            other => Err(EvalError::Internal(format!("{other:?} of decimals"))),
        }
    }

    /// `d` rounded half away from zero to at most `scale` digits after the point.
    pub(super) fn round(d: Decimal, scale: u8) -> Decimal {
        if d.scale() <= scale {
            return d;
        }
        let drop = u32::from(d.scale() - scale);
        let divisor = power_of_ten(drop).expect("at most 10^28");
        let rounded = divide_rounded(d.mantissa(), divisor);
        Decimal::new(rounded, scale).expect("rounding makes a decimal no larger than one more digit")
    }
}

/// The day of the proleptic Gregorian calendar `(year, month, day)` of `days` since 1970-01-01
/// (Howard Hinnant's `civil_from_days`; the reference interpreter counts days its own, slower way).
///
/// # Examples
/// ```
/// use protocol::days_from_civil;
/// assert_eq!(days_from_civil(1970, 1, 1), 0);
/// assert_eq!(days_from_civil(1998, 12, 1), 10_561);
/// assert_eq!(days_from_civil(2000, 3, 1), 11_017);
/// ```
pub fn days_from_civil(year: i32, month: u32, day: u32) -> i32 {
    let year = i64::from(year) - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    i32::try_from(era * 146_097 + day_of_era - 719_468).unwrap_or(i32::MAX)
}

/// The `(year, month, day)` of `days` since 1970-01-01 (the inverse of [`days_from_civil`]).
pub(crate) fn civil_from_days(days: i32) -> (i32, u32, u32) {
    let z = i64::from(days) + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (i32::try_from(year).unwrap_or(i32::MAX), month, day)
}

/// Date and timestamp arithmetic with intervals: months first (the day clamped to the end of the
/// resulting month, as SQL does), then days, then milliseconds. Results outside the years 1 to 9999 (and
/// timestamps before 1970) are errors.
mod dates {
    use super::{EvalError, civil_from_days, days_from_civil};
    use crate::row::Interval;

    const DAY_MS: i64 = 86_400_000;

    fn is_leap(year: i32) -> bool {
        (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
    }

    fn days_in_month(year: i32, month: u32) -> u32 {
        match month {
            2 if is_leap(year) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    fn in_range(days: i64) -> Result<i32, EvalError> {
        let (first, last) = (days_from_civil(1, 1, 1), days_from_civil(9999, 12, 31));
        if days < i64::from(first) || days > i64::from(last) {
            return Err(EvalError::DateOutOfRange);
        }
        Ok(days as i32)
    }

    pub(super) fn negate(interval: Interval) -> Result<Interval, EvalError> {
        Ok(Interval {
            months: interval.months.checked_neg().ok_or(EvalError::DateOutOfRange)?,
            days: interval.days.checked_neg().ok_or(EvalError::DateOutOfRange)?,
            ms: interval.ms.checked_neg().ok_or(EvalError::DateOutOfRange)?,
        })
    }

    /// `days` plus `months` months, the day clamped to the month's last.
    fn add_months(days: i32, months: i32) -> Result<i64, EvalError> {
        let (year, month, day) = civil_from_days(days);
        let index = i64::from(year) * 12 + i64::from(month) - 1 + i64::from(months);
        let year = i32::try_from(index.div_euclid(12)).map_err(|_| EvalError::DateOutOfRange)?;
        if !(1..=9999).contains(&year) {
            return Err(EvalError::DateOutOfRange);
        }
        let month = index.rem_euclid(12) as u32 + 1;
        Ok(i64::from(days_from_civil(year, month, day.min(days_in_month(year, month)))))
    }

    /// A date plus an interval: the date of its midnight plus the interval.
    pub(super) fn add_to_date(days: i32, interval: Interval) -> Result<i32, EvalError> {
        let shifted = add_months(in_range(i64::from(days))?, interval.months)?;
        let whole_days = i64::from(interval.days) + interval.ms.div_euclid(DAY_MS);
        in_range(shifted + whole_days)
    }

    /// A timestamp plus an interval.
    pub(super) fn add_to_timestamp(ms: u64, interval: Interval) -> Result<u64, EvalError> {
        let ms = i64::try_from(ms).map_err(|_| EvalError::DateOutOfRange)?;
        let (day, time) = (ms.div_euclid(DAY_MS), ms.rem_euclid(DAY_MS));
        let day = i32::try_from(day).map_err(|_| EvalError::DateOutOfRange)?;
        let shifted = add_months(in_range(i64::from(day))?, interval.months)? + i64::from(interval.days);
        let total = i128::from(shifted) * i128::from(DAY_MS) + i128::from(time) + i128::from(interval.ms);
        let last = (i128::from(days_from_civil(9999, 12, 31)) + 1) * i128::from(DAY_MS);
        if total < 0 || total >= last {
            return Err(EvalError::DateOutOfRange);
        }
        Ok(total as u64)
    }

    /// The day a timestamp falls in.
    pub(super) fn timestamp_day(ms: u64) -> i32 {
        i32::try_from(ms / DAY_MS as u64).unwrap_or(i32::MAX)
    }

    /// The midnight of a date, if it is not before 1970.
    pub(super) fn date_timestamp(days: i32) -> Option<u64> {
        u64::try_from(i64::from(days) * DAY_MS).ok()
    }
}

/// A row-at-a-time transform: append the values of `expressions` (each may reference the input columns and
/// the expressions before it), keep the row only if every predicate is `true`, then output the columns in
/// `projection`. Peeks use it to shape their results; the plan IR's Map/Filter/Project render to it.
///
/// # Examples
/// ```
/// use protocol::{BinaryFunc, Datum, MapFilterProject, Row, ScalarExpr};
/// // Input (a, b): output (a * 2) where b > 10.
/// let mfp = MapFilterProject::new(2)
///     .map([ScalarExpr::column(0).call_binary(BinaryFunc::Mul, ScalarExpr::literal(Datum::Int64(2)))])
///     .filter([ScalarExpr::column(1).call_binary(BinaryFunc::Gt, ScalarExpr::literal(Datum::Int64(10)))])
///     .project([2]);
/// let kept = mfp.apply(&Row::pack([Datum::Int64(4), Datum::Int64(11)])).unwrap();
/// assert_eq!(kept, Some(Row::pack([Datum::Int64(8)])));
/// assert_eq!(mfp.apply(&Row::pack([Datum::Int64(4), Datum::Int64(9)])).unwrap(), None);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MapFilterProject {
    /// The arity of the input rows.
    pub input_arity: usize,
    /// Expressions whose values are appended, in order, as columns `input_arity..`.
    pub expressions: Vec<ScalarExpr>,
    /// Predicates over the input and appended columns; a row is kept iff all are `true`.
    pub predicates: Vec<ScalarExpr>,
    /// The output columns, as indexes into input and appended columns.
    pub projection: Vec<usize>,
}

impl MapFilterProject {
    /// The identity on rows of `input_arity` columns.
    pub fn new(input_arity: usize) -> Self {
        MapFilterProject {
            input_arity,
            expressions: Vec::new(),
            predicates: Vec::new(),
            projection: (0..input_arity).collect(),
        }
    }

    /// Appends expressions; the projection is extended to keep them.
    pub fn map(mut self, expressions: impl IntoIterator<Item = ScalarExpr>) -> Self {
        for expr in expressions {
            let column = self.input_arity + self.expressions.len();
            self.expressions.push(expr);
            self.projection.push(column);
        }
        self
    }

    /// Adds predicates.
    pub fn filter(mut self, predicates: impl IntoIterator<Item = ScalarExpr>) -> Self {
        self.predicates.extend(predicates);
        self
    }

    /// Replaces the projection with `columns` of the current output.
    pub fn project(mut self, columns: impl IntoIterator<Item = usize>) -> Self {
        let current = std::mem::take(&mut self.projection);
        // Out-of-range columns are kept as-is so that `typ` reports them instead of hiding them.
        self.projection =
            columns.into_iter().map(|c| current.get(c).copied().unwrap_or(usize::MAX)).collect();
        self
    }

    /// Whether this is the identity.
    pub fn is_identity(&self) -> bool {
        self.expressions.is_empty()
            && self.predicates.is_empty()
            && self.projection.iter().copied().eq(0..self.input_arity)
    }

    /// The output type for input of type `input`, checking every expression.
    ///
    /// # Examples
    /// ```
    /// use protocol::{ColumnType, ExprTypeError, MapFilterProject, RelationType, ScalarType};
    /// let input = RelationType::new(vec![ColumnType::new(ScalarType::Int64, false)]);
    /// assert_eq!(MapFilterProject::new(1).typ(&input).unwrap(), input);
    /// let bad = MapFilterProject::new(1).project([0, 1]);
    /// assert!(matches!(bad.typ(&input), Err(ExprTypeError::ColumnOutOfRange { .. })));
    /// ```
    pub fn typ(&self, input: &RelationType) -> Result<RelationType, ExprTypeError> {
        if input.arity() != self.input_arity {
            return Err(ExprTypeError::ColumnOutOfRange { column: self.input_arity, arity: input.arity() });
        }
        let mut typ = input.clone();
        for expr in &self.expressions {
            let column = expr.typ(&typ)?;
            typ.column_types.push(column);
        }
        for predicate in &self.predicates {
            let column = predicate.typ(&typ)?;
            if column.scalar_type != ScalarType::Bool {
                return Err(ExprTypeError::BadArguments {
                    func: "Filter".to_string(),
                    argument_types: vec![column.scalar_type],
                });
            }
        }
        let column_types = self
            .projection
            .iter()
            .map(|c| {
                typ.column_types
                    .get(*c)
                    .copied()
                    .ok_or(ExprTypeError::ColumnOutOfRange { column: *c, arity: typ.arity() })
            })
            .collect::<Result<_, _>>()?;
        Ok(RelationType::new(column_types))
    }

    /// Applies the transform to one row: `Ok(None)` if a predicate rejects it.
    pub fn apply(&self, row: &Row) -> Result<Option<Row>, EvalError> {
        let mut datums = Vec::with_capacity(self.input_arity + self.expressions.len());
        let mut packer = RowPacker::new();
        self.apply_with(row.as_row_ref(), &mut datums, &mut packer)
    }

    /// [`apply`](Self::apply) to a borrowed row (rows lent out of a container, or a [`Row`]'s
    /// [`as_row_ref`](Row::as_row_ref)), reusing the caller's buffers (the hot path of rendering and
    /// peeks).
    pub fn apply_with<'a>(
        &'a self,
        row: RowRef<'a>,
        datums: &mut Vec<Datum<'a>>,
        packer: &mut RowPacker,
    ) -> Result<Option<Row>, EvalError> {
        datums.clear();
        datums.extend(row.iter());
        if datums.len() != self.input_arity {
            return Err(EvalError::Internal(format!(
                "row of {} columns, expected {}",
                datums.len(),
                self.input_arity
            )));
        }
        for expr in &self.expressions {
            let datum = expr.eval(datums)?;
            datums.push(datum);
        }
        for predicate in &self.predicates {
            if predicate.eval(datums)? != Datum::Bool(true) {
                return Ok(None);
            }
        }
        packer.clear();
        for column in &self.projection {
            let datum = datums
                .get(*column)
                .ok_or_else(|| EvalError::Internal(format!("projection of column {column}")))?;
            packer.push(*datum);
        }
        Ok(Some(packer.finish_and_reuse()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BinaryFunc::*;

    fn lit(d: Datum<'_>) -> ScalarExpr {
        ScalarExpr::literal(d)
    }

    #[test]
    fn three_valued_logic_table() {
        let t = lit(Datum::Bool(true));
        let f = lit(Datum::Bool(false));
        let n = ScalarExpr::null(ScalarType::Bool);
        let cases = [
            (t.clone().call_binary(And, n.clone()), Datum::Null),
            (f.clone().call_binary(And, n.clone()), Datum::Bool(false)),
            (n.clone().call_binary(And, f.clone()), Datum::Bool(false)),
            (t.clone().call_binary(Or, n.clone()), Datum::Bool(true)),
            (n.clone().call_binary(Or, t.clone()), Datum::Bool(true)),
            (f.clone().call_binary(Or, n.clone()), Datum::Null),
            (n.clone().call_unary(UnaryFunc::Not), Datum::Null),
            (n.clone().call_unary(UnaryFunc::IsNull), Datum::Bool(true)),
            (n.clone().if_then_else(lit(Datum::Int64(1)), lit(Datum::Int64(2))), Datum::Int64(2)),
            (lit(Datum::Int64(1)).call_binary(Lt, ScalarExpr::null(ScalarType::Int64)), Datum::Null),
        ];
        for (expr, expected) in cases {
            assert_eq!(expr.eval(&[]).unwrap(), expected, "{expr:?}");
        }
    }

    #[test]
    fn arithmetic_errors_table() {
        let cases = [
            (lit(Datum::Int64(1)).call_binary(Mod, lit(Datum::Int64(0))), EvalError::DivisionByZero),
            (lit(Datum::Int64(i64::MIN)).call_binary(Div, lit(Datum::Int64(-1))), EvalError::Int64OutOfRange),
            (lit(Datum::Int64(i64::MIN)).call_unary(UnaryFunc::Neg), EvalError::Int64OutOfRange),
            (lit(Datum::Int64(i64::MAX)).call_binary(Mul, lit(Datum::Int64(2))), EvalError::Int64OutOfRange),
        ];
        for (expr, expected) in cases {
            assert_eq!(expr.eval(&[]), Err(expected), "{expr:?}");
        }
    }

    #[test]
    fn ill_typed_expressions_fail_to_evaluate_without_panicking() {
        let cases = [
            lit(Datum::Int64(1)).call_binary(Add, lit(Datum::Text("x"))),
            lit(Datum::Text("x")).call_unary(UnaryFunc::Neg),
            lit(Datum::Int64(1)).if_then_else(lit(Datum::Int64(1)), lit(Datum::Int64(2))),
            ScalarExpr::column(5),
            lit(Datum::Int64(1)).call_binary(And, lit(Datum::Bool(true))),
        ];
        for expr in cases {
            assert!(matches!(expr.eval(&[]), Err(EvalError::Internal(_))), "{expr:?}");
            assert!(expr.typ(&RelationType::default()).is_err(), "{expr:?}");
        }
    }

    #[test]
    fn float_division_by_zero_is_an_infinity_or_nan_not_an_error() {
        let divide = |x: f64| lit(Datum::float64(x)).call_binary(Div, lit(Datum::float64(0.0)));
        assert_eq!(divide(1.0).eval(&[]).unwrap(), Datum::float64(f64::INFINITY));
        assert_eq!(divide(-2.5).eval(&[]).unwrap(), Datum::float64(f64::NEG_INFINITY));
        let zero_by_zero = divide(0.0);
        let nan = zero_by_zero.eval(&[]).unwrap();
        assert!(matches!(nan, Datum::Float64(x) if x.get().is_nan()), "{nan:?}");
        assert_eq!(nan, Datum::float64(f64::NAN), "one NaN, equal to itself");
    }

    #[test]
    fn the_sql_functions_follow_their_documentation() {
        let dec = |text: &str| Datum::Decimal(text.parse().unwrap());
        let date = |y, m, d| Datum::Date(days_from_civil(y, m, d));
        let text = |s| lit(Datum::Text(s));
        let int = |i| lit(Datum::Int64(i));
        let null_int = ScalarExpr::null(ScalarType::Int64);
        let cases: Vec<(ScalarExpr, Result<Datum<'static>, EvalError>)> = vec![
            (lit(dec("1.5")).call_binary(Add, lit(dec("0.25"))), Ok(dec("1.75"))),
            (lit(dec("1.5")).call_binary(Mul, lit(dec("0.2"))), Ok(dec("0.3"))),
            (lit(dec("2")).call_binary(Div, lit(dec("3"))), Ok(dec("0.666667"))),
            (lit(dec("-2")).call_binary(Div, lit(dec("3"))), Ok(dec("-0.666667"))),
            (lit(dec("1")).call_binary(Div, lit(dec("0"))), Err(EvalError::DivisionByZero)),
            (lit(dec("1.25")).call_unary(UnaryFunc::Round(1)), Ok(dec("1.3"))),
            (int(7).cast(ScalarType::Decimal { scale: 2 }), Ok(dec("7"))),
            (lit(dec("2.5")).cast(ScalarType::Int64), Ok(Datum::Int64(3))),
            (lit(dec("-2.5")).cast(ScalarType::Int64), Ok(Datum::Int64(-3))),
            (lit(dec("0.1")).cast(ScalarType::Float64), Ok(Datum::float64(0.1))),
            (int(-3).call_unary(UnaryFunc::Abs), Ok(Datum::Int64(3))),
            (
                lit(date(1998, 12, 1)).call_binary(Sub, lit(Datum::Interval(crate::Interval::days(90)))),
                Ok(date(1998, 9, 2)),
            ),
            (
                lit(date(2001, 1, 31)).call_binary(Add, lit(Datum::Interval(crate::Interval::months(1)))),
                Ok(date(2001, 2, 28)),
            ),
            (lit(date(1995, 6, 17)).call_unary(UnaryFunc::ExtractYear), Ok(Datum::Int64(1995))),
            (lit(date(1970, 1, 2)).cast(ScalarType::Timestamp), Ok(Datum::Timestamp(86_400_000))),
            (
                ScalarExpr::call_variadic(
                    VariadicFunc::Coalesce,
                    vec![null_int.clone(), int(2), int(1).call_binary(Div, int(0))],
                ),
                Ok(Datum::Int64(2)),
            ),
            (int(2).in_list(vec![int(1), null_int.clone()]), Ok(Datum::Null)),
            (int(2).in_list(vec![int(1), null_int.clone(), int(2)]), Ok(Datum::Bool(true))),
            (int(2).in_list(vec![int(1), int(3)]), Ok(Datum::Bool(false))),
            (int(2).call_binary(NullIf, int(2)), Ok(Datum::Null)),
            (int(2).call_binary(NullIf, null_int.clone()), Ok(Datum::Int64(2))),
            (
                ScalarExpr::call_variadic(VariadicFunc::Substring, vec![text("13-abc"), int(1), int(2)]),
                Ok(Datum::Text("13")),
            ),
            (
                ScalarExpr::call_variadic(VariadicFunc::Substring, vec![text("héllo"), int(0), int(3)]),
                Ok(Datum::Text("hé")),
            ),
            (
                ScalarExpr::call_variadic(VariadicFunc::Substring, vec![text("héllo"), int(3)]),
                Ok(Datum::Text("llo")),
            ),
            (
                ScalarExpr::call_variadic(VariadicFunc::Substring, vec![text("x"), int(1), int(-1)]),
                Err(EvalError::NegativeSubstringLength),
            ),
            (text("a special request").like("%special%request%"), Ok(Datum::Bool(true))),
            (text("a special request").not_like("%special%request%"), Ok(Datum::Bool(false))),
            (ScalarExpr::null(ScalarType::Text).like("%"), Ok(Datum::Null)),
        ];
        for (expr, expected) in cases {
            assert!(expr.typ(&RelationType::default()).is_ok(), "{expr:?} type-checks");
            assert_eq!(expr.eval(&[]), expected, "{expr:?}");
        }
    }

    #[test]
    fn ill_typed_sql_functions_are_rejected() {
        let dec = |text: &str| lit(Datum::Decimal(text.parse().unwrap()));
        let cases = [
            dec("1").call_binary(Add, lit(Datum::Int64(1))),
            lit(Datum::Text("x")).cast(ScalarType::Int64),
            lit(Datum::Int64(1)).cast(ScalarType::Decimal { scale: 29 }),
            lit(Datum::Int64(1)).like("%"),
            ScalarExpr::call_variadic(VariadicFunc::Coalesce, vec![]),
            ScalarExpr::call_variadic(VariadicFunc::In, vec![lit(Datum::Int64(1))]),
            lit(Datum::Int64(1)).call_unary(UnaryFunc::ExtractYear),
            ScalarExpr::decimal("0.00000000000001", 14)
                .call_binary(Mul, ScalarExpr::decimal("0.000000000000001", 15)),
        ];
        for expr in cases {
            assert!(expr.typ(&RelationType::default()).is_err(), "{expr:?}");
        }
    }

    #[test]
    fn the_remainder_of_the_least_integer_by_minus_one_is_zero() {
        let expr = lit(Datum::Int64(i64::MIN)).call_binary(Mod, lit(Datum::Int64(-1)));
        assert_eq!(expr.eval(&[]).unwrap(), Datum::Int64(0));
    }
}
