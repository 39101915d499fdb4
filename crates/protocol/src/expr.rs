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

use crate::row::{ColumnType, Datum, RelationType, Row, RowPacker, ScalarType};

/// A function of one argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum UnaryFunc {
    /// Boolean negation (`NULL` stays `NULL`).
    Not,
    /// Arithmetic negation of an integer or float.
    Neg,
    /// `IS NULL`: never `NULL` itself.
    IsNull,
}

/// A function of two arguments of the same scalar type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum BinaryFunc {
    /// `+` on integers or floats.
    Add,
    /// `-` on integers or floats.
    Sub,
    /// `*` on integers or floats.
    Mul,
    /// `/` on integers (truncating toward zero) or floats; integer division by zero is an error,
    /// float division by zero is `+inf`, `-inf` or NaN (IEEE 754, unlike SQL engines).
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
}

impl BinaryFunc {
    fn is_arithmetic(self) -> bool {
        matches!(
            self,
            BinaryFunc::Add | BinaryFunc::Sub | BinaryFunc::Mul | BinaryFunc::Div | BinaryFunc::Mod
        )
    }
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
    /// `IF cond THEN then ELSE els`.
    If {
        /// A boolean condition.
        cond: Box<ScalarExpr>,
        /// The value when `cond` is true.
        then: Box<ScalarExpr>,
        /// The value otherwise (false or `NULL`).
        els: Box<ScalarExpr>,
    },
}

/// An error evaluating a [`ScalarExpr`] on a row: a property of the data, not a bug.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum EvalError {
    /// Integer division or modulo by zero.
    #[error("division by zero")]
    DivisionByZero,
    /// Integer arithmetic overflowed 64 bits.
    #[error("integer out of range")]
    Int64OutOfRange,
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
    /// A function applied to arguments of the wrong type.
    #[error("{func} cannot be applied to {argument_types:?}")]
    BadArguments {
        /// The function, printed.
        func: String,
        /// The argument types.
        argument_types: Vec<ScalarType>,
    },
}

impl ScalarExpr {
    /// A column reference.
    pub fn column(column: usize) -> Self {
        ScalarExpr::Column(column)
    }

    /// A non-null literal.
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

    /// `IF self THEN then ELSE els`.
    pub fn if_then_else(self, then: ScalarExpr, els: ScalarExpr) -> Self {
        ScalarExpr::If { cond: Box::new(self), then: Box::new(then), els: Box::new(els) }
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
                let bad = || ExprTypeError::BadArguments {
                    func: format!("{func:?}"),
                    argument_types: vec![arg.scalar_type],
                };
                match func {
                    UnaryFunc::Not if arg.scalar_type == ScalarType::Bool => Ok(arg),
                    UnaryFunc::Neg if matches!(arg.scalar_type, ScalarType::Int64 | ScalarType::Float64) => {
                        Ok(arg)
                    }
                    UnaryFunc::IsNull => Ok(ColumnType::new(ScalarType::Bool, false)),
                    _ => Err(bad()),
                }
            }
            ScalarExpr::CallBinary { func, expr1, expr2 } => {
                let (a, b) = (expr1.typ(input)?, expr2.typ(input)?);
                let nullable = a.nullable || b.nullable;
                let bad = || ExprTypeError::BadArguments {
                    func: format!("{func:?}"),
                    argument_types: vec![a.scalar_type, b.scalar_type],
                };
                if a.scalar_type != b.scalar_type {
                    return Err(bad());
                }
                let scalar = a.scalar_type;
                if func.is_arithmetic() {
                    let numeric = match func {
                        BinaryFunc::Mod => scalar == ScalarType::Int64,
                        _ => matches!(scalar, ScalarType::Int64 | ScalarType::Float64),
                    };
                    if !numeric {
                        return Err(bad());
                    }
                    Ok(ColumnType::new(scalar, nullable))
                } else if func.is_comparison() || scalar == ScalarType::Bool {
                    // Comparisons of any type, and the logical functions on booleans.
                    Ok(ColumnType::new(ScalarType::Bool, nullable))
                } else {
                    Err(bad())
                }
            }
            ScalarExpr::If { cond, then, els } => {
                let c = cond.typ(input)?;
                let (t, e) = (then.typ(input)?, els.typ(input)?);
                if c.scalar_type != ScalarType::Bool || t.scalar_type != e.scalar_type {
                    return Err(ExprTypeError::BadArguments {
                        func: "If".to_string(),
                        argument_types: vec![c.scalar_type, t.scalar_type, e.scalar_type],
                    });
                }
                Ok(ColumnType::new(t.scalar_type, t.nullable || e.nullable))
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
                    (UnaryFunc::Not, Datum::Bool(b)) => Ok(Datum::Bool(!b)),
                    (UnaryFunc::Neg, Datum::Int64(i)) => {
                        i.checked_neg().map(Datum::Int64).ok_or(EvalError::Int64OutOfRange)
                    }
                    (UnaryFunc::Neg, Datum::Float64(x)) => Ok(Datum::float64(-x.get())),
                    (func, arg) => Err(EvalError::Internal(format!("{func:?} of {arg:?}"))),
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
            ScalarExpr::CallBinary { func, expr1, expr2 } => {
                let (a, b) = (expr1.eval(datums)?, expr2.eval(datums)?);
                if a.is_null() || b.is_null() {
                    return Ok(Datum::Null);
                }
                eval_binary(*func, a, b)
            }
            ScalarExpr::If { cond, then, els } => match cond.eval(datums)? {
                Datum::Bool(true) => then.eval(datums),
                Datum::Bool(false) | Datum::Null => els.eval(datums),
                other => Err(EvalError::Internal(format!("If on {other:?}"))),
            },
        }
    }

    /// Whether the expression references no column (so it has the same value for every row).
    pub fn is_literal(&self) -> bool {
        matches!(self, ScalarExpr::Literal(..))
    }
}

fn eval_binary<'a>(func: BinaryFunc, a: Datum<'a>, b: Datum<'a>) -> Result<Datum<'a>, EvalError> {
    use BinaryFunc::*;
    if func.is_comparison() {
        if a.scalar_type() != b.scalar_type() {
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
        (a, b) => Err(EvalError::Internal(format!("{func:?} of {a:?} and {b:?}"))),
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
        self.apply_with(row, &mut datums, &mut packer)
    }

    /// [`apply`](Self::apply) reusing the caller's buffers (the hot path of rendering and peeks).
    pub fn apply_with<'a>(
        &'a self,
        row: &'a Row,
        datums: &mut Vec<Datum<'a>>,
        packer: &mut RowPacker,
    ) -> Result<Option<Row>, EvalError> {
        datums.clear();
        row.unpack_into(datums);
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
    fn the_remainder_of_the_least_integer_by_minus_one_is_zero() {
        let expr = lit(Datum::Int64(i64::MIN)).call_binary(Mod, lit(Datum::Int64(-1)));
        assert_eq!(expr.eval(&[]).unwrap(), Datum::Int64(0));
    }
}
