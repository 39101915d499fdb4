//! The plan IR: the operators a dataflow is built from ([`Plan`]), with typing ([`Plan::typ`]), the
//! aggregates' evaluation ([`AggregateFunc::eval`]) and orderings ([`ColumnOrder`]). The replica uses
//! these functions; the reference interpreter (`crate::reference`) implements the same semantics on its
//! own, from these docs.
//!
//! Every relation is a multiset of rows (a collection of `(row, time, diff)` updates). Operators:
//!
//! | operator | output |
//! |---|---|
//! | `Get { id }` | an import, or an object built earlier in the same dataflow |
//! | `Constant { rows, typ }` | the given rows with multiplicities, at the dataflow's as-of |
//! | `Map { exprs }` | each input row extended with the values of `exprs` (each may use earlier ones) |
//! | `Filter { predicates }` | rows for which every predicate is `true` |
//! | `Project { outputs }` | the listed columns (repeats allowed) |
//! | `Join { inputs, equivalences }` | rows of the cross product (columns concatenated) in which all columns of each equivalence class are equal and non-null |
//! | `Reduce { group_key, aggregates }` | one row per group: the key columns, then one column per aggregate |
//! | `Distinct` | each row with positive multiplicity, once |
//! | `Union { inputs }` | the sum of the inputs' multiplicities |
//! | `Negate` | multiplicities negated |
//! | `Threshold` | rows with positive multiplicity, keeping it |
//! | `TopK { group_key, order_key, limit, offset }` | per group, the rows ranked `offset..offset + limit` by `order_key` |
//! | `ArrangeBy { key }` | the input unchanged, arranged by `key` (a hint to the renderer) |
//!
//! A negative accumulated multiplicity reaching `Reduce`, `Distinct` or `TopK` is a data error, reported
//! through the dataflow's error collection. Aggregates follow SQL: `count(c)` counts non-null values,
//! `count(*)` rows, `sum`/`avg`/`min`/`max` ignore nulls and are `NULL` over no non-null values.
//!
//! **Orderings.** `TopK` and a peek's finishing rank rows by their [`ColumnOrder`]s, then break ties by
//! the whole row (column by column, ascending, `NULL` first), so a ranking is total and deterministic.
//! Floats order numerically with `-0.0 == 0.0` and one NaN, equal to itself and above every number.
//!
//! # Multiplicities
//!
//! A multiplicity is exact inside a plan: unions add, `Negate` negates and joins multiply without
//! overflowing, so an intermediate result may hold a row more than `i64::MAX` times. It must be an `i64`
//! where it is *observed*: the number of rows of a `Reduce` or `TopK` group, and every row of what a
//! dataflow exports (an index's contents, a sink's output). Beyond that, the answer is an error
//! ([`EvalError::MultiplicityOutOfRange`], through the dataflow's error collection or the peek that reads
//! the row), never a wrapped count. Implementations compute exactly in 128 bits; beyond that (products of
//! several join inputs' multiplicities near `2^63`) is an error too.
//!
//! ```
//! use std::collections::BTreeMap;
//! use protocol::{Datum, EvalError, GlobalId, Plan, Row};
//! use protocol::reference::{consolidate, evaluate};
//! let inputs = BTreeMap::from([(GlobalId::User(1), consolidate([(Row::pack([Datum::Int64(1)]), i64::MAX)]))]);
//! let get = || Plan::get(GlobalId::User(1));
//! let twice = Plan::Union { inputs: vec![get(), get()] };
//! assert_eq!(evaluate(&twice, &inputs), Err(EvalError::MultiplicityOutOfRange));
//! let back = Plan::Union { inputs: vec![twice.clone(), Plan::Negate { input: Box::new(get()) }] };
//! assert_eq!(evaluate(&back, &inputs).unwrap(), inputs[&GlobalId::User(1)]);
//! ```
//!
//! # Where the IR departs from SQL
//!
//! Each of these is asserted below, in `expr.rs`'s tests and in `compute/tests/it/operators.rs` (on the
//! replica), and encoded in the SQLite differential test (`protocol::arbitrary::sql`'s `sql_semantics`).
//!
//! - **A global `Reduce` over nothing has no row.** A `Reduce` has one row per group of its input, also
//!   with an empty `group_key`: over an empty input it is empty, where SQL's `SELECT count(*), sum(x)
//!   FROM empty` has one row `(0, NULL)`.
//! - **Key lookups match by identity.** A peek's `literal_constraints` (and an index's key) find the rows
//!   whose key columns *are* the given values, so a `NULL` in a key finds the rows with `NULL` there,
//!   where SQL's `=` finds none. `Join` is SQL's: its equivalence columns must be non-null.
//! - **Float division by zero is not an error.** `x / 0.0` is `+inf` or `-inf`, and `0.0 / 0.0` is NaN
//!   (IEEE 754), where SQL engines err or give `NULL`. Integer division by zero is an error.
//! - **Integer overflow is an error**, in arithmetic and in sums (SQLite silently switches to floats in
//!   arithmetic); `i64::MIN % -1` is `0`, as it is mathematically.
//! - **Multiplicities** have no SQL counterpart: see above.
//! - **Decimals** are SQL's `NUMERIC` with the scale in the type (`ScalarType::Decimal`) and a precision of
//!   28 digits (96 bits): `+`/`-` take the larger scale, `*` the sum; a result that is not a decimal is an
//!   error, as is an exact intermediate beyond 128 bits. Division (and `avg`) rounds half away from zero
//!   to the *values'* larger scale plus 6 (SQL leaves it to the implementation; PostgreSQL also derives it
//!   from the values). Values are canonical (`1.50` is `1.5`): the type's scale is not the value's.
//! - **No implicit casts**, except that decimals of different scales meet (comparisons, `IF`, `COALESCE`).
//!   `Cast` converts between numbers and between dates and timestamps; there are no casts to or from text.
//! - **Intervals** keep months, days and milliseconds apart and order field by field (SQL compares them
//!   as if a month were 30 days). Date arithmetic outside the years 1 to 9999 is an error.
//! - **`LIKE`** has no escape character (PostgreSQL's default is `\`); patterns are literals.
//! - **Outer, semi and anti joins** are lowerings (`crate::joins`); an anti-join is `NOT EXISTS`, which is
//!   SQL's `NOT IN` only where the compared columns are non-null.
//!
//! ```
//! use std::collections::BTreeMap;
//! use protocol::{AggregateExpr, AggregateFunc, BinaryFunc, Datum, GlobalId, Plan, ScalarExpr};
//! use protocol::reference::{Multiset, evaluate};
//! // A global count and sum over an empty input: no row.
//! let inputs = BTreeMap::from([(GlobalId::User(1), Multiset::new())]);
//! let global = Plan::Reduce {
//!     input: Box::new(Plan::get(GlobalId::User(1))),
//!     group_key: vec![],
//!     aggregates: vec![
//!         AggregateExpr { func: AggregateFunc::Count, column: 0 },
//!         AggregateExpr { func: AggregateFunc::Sum, column: 0 },
//!     ],
//! };
//! assert!(evaluate(&global, &inputs).unwrap().is_empty());
//! // Float division by zero.
//! let divide = |x: f64| ScalarExpr::literal(Datum::float64(x)).call_binary(BinaryFunc::Div, ScalarExpr::literal(Datum::float64(0.0)));
//! assert_eq!(divide(1.0).eval(&[]).unwrap(), Datum::float64(f64::INFINITY));
//! assert_eq!(divide(-1.0).eval(&[]).unwrap(), Datum::float64(f64::NEG_INFINITY));
//! assert!(matches!(divide(0.0).eval(&[]).unwrap(), Datum::Float64(x) if x.get().is_nan()));
//! ```

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::Diff;
use crate::expr::{EvalError, ExprTypeError, ScalarExpr};
use crate::id::GlobalId;
use crate::row::{ColumnType, Datum, RelationType, Row, RowTypeError, ScalarType};

/// An aggregate function of [`Plan::Reduce`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AggregateFunc {
    /// The number of non-null values (with multiplicity).
    Count,
    /// The sum of non-null integer, float or decimal values (with multiplicity). A decimal sum is exact,
    /// of the column's type (its scale).
    Sum,
    /// The least non-null value.
    Min,
    /// The greatest non-null value.
    Max,
    /// `count(*)`: the number of rows (with multiplicity), `NULL`s included. Its [`AggregateExpr`]'s
    /// `column` is not read (nor checked by validation).
    CountRows,
    /// `avg(x)`: the sum of the non-null values divided by their number, `NULL` over none. Of a float
    /// column, a float (the sum divided by the count as floats); of a decimal column, the exact sum
    /// divided by the count with the IR's decimal division (`BinaryFunc::Div`: rounded half away from
    /// zero to the sum's scale plus 6), so of type scale `s + 6` (at most 28); of an integer column, the
    /// same as of a decimal of scale 0.
    Avg,
}

/// One aggregate: a function of one input column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AggregateExpr {
    /// The function.
    pub func: AggregateFunc,
    /// The input column it aggregates.
    pub column: usize,
}

impl AggregateFunc {
    /// The result type over an input column of type `input`, or `None` if the function does not apply.
    ///
    /// # Examples
    /// ```
    /// use protocol::{AggregateFunc, ColumnType, ScalarType};
    /// let text = ColumnType::new(ScalarType::Text, true);
    /// assert_eq!(AggregateFunc::Count.output_type(text), Some(ColumnType::new(ScalarType::Int64, false)));
    /// assert_eq!(AggregateFunc::Max.output_type(text), Some(text));
    /// assert_eq!(AggregateFunc::Sum.output_type(text), None);
    /// let cents = ColumnType::new(ScalarType::Decimal { scale: 2 }, false);
    /// assert_eq!(AggregateFunc::Avg.output_type(cents), Some(ColumnType::new(ScalarType::Decimal { scale: 8 }, false)));
    /// ```
    pub fn output_type(self, input: ColumnType) -> Option<ColumnType> {
        match self {
            AggregateFunc::Count | AggregateFunc::CountRows => {
                Some(ColumnType::new(ScalarType::Int64, false))
            }
            AggregateFunc::Sum => matches!(
                input.scalar_type,
                ScalarType::Int64 | ScalarType::Float64 | ScalarType::Decimal { .. }
            )
            .then_some(input),
            AggregateFunc::Avg => match input.scalar_type {
                ScalarType::Float64 => Some(input),
                ScalarType::Int64 => {
                    Some(ColumnType::new(ScalarType::Decimal { scale: avg_scale(0) }, input.nullable))
                }
                ScalarType::Decimal { scale } => {
                    Some(ColumnType::new(ScalarType::Decimal { scale: avg_scale(scale) }, input.nullable))
                }
                _ => None,
            },
            AggregateFunc::Min | AggregateFunc::Max => Some(input),
        }
    }

    /// The aggregate of `values` (a group's values with their accumulated multiplicities), as the replica
    /// computes it. The reference interpreter has its own implementation of the same rules.
    ///
    /// Errors on a negative multiplicity, and on integer overflow of a count or of the exact sum (an
    /// integer sum errs when its result is out of range, whatever the order of its terms: the replica
    /// adds its terms in no particular order).
    ///
    /// # Examples
    /// ```
    /// use protocol::{AggregateFunc, Datum, EvalError};
    /// let values = [(Datum::Int64(3), 2), (Datum::Null, 5), (Datum::Int64(-1), 1)];
    /// assert_eq!(AggregateFunc::Count.eval(values).unwrap(), Datum::Int64(3));
    /// assert_eq!(AggregateFunc::Sum.eval(values).unwrap(), Datum::Int64(5));
    /// assert_eq!(AggregateFunc::Min.eval(values).unwrap(), Datum::Int64(-1));
    /// assert_eq!(AggregateFunc::Max.eval([(Datum::Null, 1)]).unwrap(), Datum::Null);
    /// assert!(AggregateFunc::Count.eval([(Datum::Int64(1), -1)]).is_err());
    /// ```
    pub fn eval<'a, I>(self, values: I) -> Result<Datum<'a>, EvalError>
    where
        I: IntoIterator<Item = (Datum<'a>, Diff)>,
    {
        let mut rows: i64 = 0;
        let mut count: i64 = 0;
        // Exact: a term is at most 2^126 in magnitude, so only a sum of astronomically many extreme terms
        // can leave i128 (and then errs like an out-of-range result).
        let mut int_sum: i128 = 0;
        let mut float_sum: f64 = 0.0;
        let mut any_float = false;
        // A decimal sum: the exact sum of mantissas at the largest scale seen.
        let mut decimal_sum: Option<(i128, u8)> = None;
        let mut best: Option<Datum<'a>> = None;
        for (datum, diff) in values {
            if diff < 0 {
                return Err(EvalError::Internal(format!(
                    "negative multiplicity {diff} for {datum} in {self:?}"
                )));
            }
            rows = rows.checked_add(diff).ok_or(EvalError::Int64OutOfRange)?;
            if diff == 0 || datum.is_null() {
                continue;
            }
            count = count.checked_add(diff).ok_or(EvalError::Int64OutOfRange)?;
            match (self, datum) {
                (AggregateFunc::Sum | AggregateFunc::Avg, Datum::Int64(i)) => {
                    let term = i128::from(i) * i128::from(diff);
                    int_sum = int_sum.checked_add(term).ok_or(EvalError::Int64OutOfRange)?;
                }
                (AggregateFunc::Sum | AggregateFunc::Avg, Datum::Float64(x)) => {
                    any_float = true;
                    float_sum += x.get() * diff as f64;
                }
                (AggregateFunc::Sum | AggregateFunc::Avg, Datum::Decimal(d)) => {
                    decimal_sum = Some(add_decimal_term(decimal_sum, d, diff)?);
                }
                (AggregateFunc::Sum | AggregateFunc::Avg, other) => {
                    return Err(EvalError::Internal(format!("{self:?} of {other:?}")));
                }
                (AggregateFunc::Min, datum) => best = Some(best.map_or(datum, |b| b.min(datum))),
                (AggregateFunc::Max, datum) => best = Some(best.map_or(datum, |b| b.max(datum))),
                (AggregateFunc::Count | AggregateFunc::CountRows, _) => {}
            }
        }
        let decimal = |(mantissa, scale): (i128, u8)| {
            crate::row::Decimal::new(mantissa, scale).ok_or(EvalError::DecimalOutOfRange)
        };
        Ok(match self {
            AggregateFunc::Count => Datum::Int64(count),
            AggregateFunc::CountRows => Datum::Int64(rows),
            AggregateFunc::Sum | AggregateFunc::Avg if count == 0 => Datum::Null,
            AggregateFunc::Sum if any_float => Datum::float64(float_sum),
            AggregateFunc::Sum => match decimal_sum {
                Some(sum) => Datum::Decimal(decimal(sum)?),
                None => Datum::Int64(i64::try_from(int_sum).map_err(|_| EvalError::Int64OutOfRange)?),
            },
            AggregateFunc::Avg if any_float => Datum::float64(float_sum / count as f64),
            AggregateFunc::Avg => {
                let (mantissa, scale) = decimal_sum.unwrap_or((int_sum, 0));
                let sum = decimal((mantissa, scale))?;
                let divisor = crate::row::Decimal::new(i128::from(count), 0).expect("an i64 is a decimal");
                Datum::Decimal(crate::expr::decimal_arithmetic(crate::expr::BinaryFunc::Div, sum, divisor)?)
            }
            AggregateFunc::Min | AggregateFunc::Max => best.unwrap_or(Datum::Null),
        })
    }
}

/// The scale of `avg` of a decimal of scale `scale` (see [`AggregateFunc::Avg`]).
fn avg_scale(scale: u8) -> u8 {
    (scale + 6).min(crate::row::MAX_DECIMAL_SCALE)
}

/// Adds `d * diff` to an exact decimal sum `(mantissa, scale)`.
fn add_decimal_term(
    sum: Option<(i128, u8)>,
    d: crate::row::Decimal,
    diff: Diff,
) -> Result<(i128, u8), EvalError> {
    let (mut mantissa, mut scale) = sum.unwrap_or((0, 0));
    let out_of_range = || EvalError::DecimalOutOfRange;
    let mut term = d.mantissa().checked_mul(i128::from(diff)).ok_or_else(out_of_range)?;
    if d.scale() > scale {
        let factor = 10i128.checked_pow(u32::from(d.scale() - scale)).ok_or_else(out_of_range)?;
        mantissa = mantissa.checked_mul(factor).ok_or_else(out_of_range)?;
        scale = d.scale();
    } else {
        let factor = 10i128.checked_pow(u32::from(scale - d.scale())).ok_or_else(out_of_range)?;
        term = term.checked_mul(factor).ok_or_else(out_of_range)?;
    }
    Ok((mantissa.checked_add(term).ok_or_else(out_of_range)?, scale))
}

/// One key of an ordering: a column, its direction, and where `NULL`s go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ColumnOrder {
    /// The column.
    pub column: usize,
    /// Descending instead of ascending.
    pub desc: bool,
    /// `NULL`s after every value instead of before.
    pub nulls_last: bool,
}

impl ColumnOrder {
    /// Ascending, `NULL`s last (SQL's default for `ASC`).
    pub fn asc(column: usize) -> Self {
        ColumnOrder { column, desc: false, nulls_last: true }
    }

    /// Descending, `NULL`s first (SQL's default for `DESC`).
    pub fn desc(column: usize) -> Self {
        ColumnOrder { column, desc: true, nulls_last: false }
    }
}

/// Compares two rows' datums by an ordering; ties are broken by the remaining columns in order, so the
/// result is a total order and sorting is deterministic.
///
/// # Examples
/// ```
/// use std::cmp::Ordering;
/// use protocol::{ColumnOrder, Datum, compare_datums};
/// let a = [Datum::Int64(1), Datum::Null];
/// let b = [Datum::Int64(2), Datum::Int64(0)];
/// assert_eq!(compare_datums(&[ColumnOrder::asc(0)], &a, &b), Ordering::Less);
/// assert_eq!(compare_datums(&[ColumnOrder::desc(0)], &a, &b), Ordering::Greater);
/// assert_eq!(compare_datums(&[ColumnOrder::asc(1)], &a, &b), Ordering::Greater); // NULLS LAST
/// ```
pub fn compare_datums(order: &[ColumnOrder], a: &[Datum<'_>], b: &[Datum<'_>]) -> Ordering {
    for key in order {
        let (x, y) = (a.get(key.column), b.get(key.column));
        let ordering = match (x, y) {
            (Some(Datum::Null), Some(Datum::Null)) => Ordering::Equal,
            (Some(Datum::Null), Some(_)) => {
                if key.nulls_last {
                    Ordering::Greater
                } else {
                    Ordering::Less
                }
            }
            (Some(_), Some(Datum::Null)) => {
                if key.nulls_last {
                    Ordering::Less
                } else {
                    Ordering::Greater
                }
            }
            (x, y) => {
                let ordering = x.cmp(&y);
                if key.desc { ordering.reverse() } else { ordering }
            }
        };
        if ordering != Ordering::Equal {
            return ordering;
        }
    }
    a.cmp(b)
}

/// Skips the first `offset` of `ranked` items and keeps at most `limit` after them, counting
/// multiplicities; items whose remaining count is zero are dropped. This is the one definition of `offset`
/// and `limit` shared by `TopK` (per group) and a peek's finishing.
///
/// # Examples
/// ```
/// use protocol::slice_ranked;
/// let ranked = [("a", 2), ("b", 3), ("c", 1)];
/// assert_eq!(slice_ranked(ranked, 1, Some(3)), vec![("a", 1), ("b", 2)]);
/// assert_eq!(slice_ranked(ranked, 0, None), ranked.to_vec());
/// assert_eq!(slice_ranked(ranked, 6, None), vec![]);
/// ```
pub fn slice_ranked<T, I>(ranked: I, offset: usize, limit: Option<usize>) -> Vec<(T, u64)>
where
    I: IntoIterator<Item = (T, u64)>,
{
    let mut to_skip = offset as u64;
    let mut remaining = limit.map(|l| l as u64);
    let mut out = Vec::new();
    for (item, count) in ranked {
        if remaining == Some(0) {
            break;
        }
        let skipped = count.min(to_skip);
        to_skip -= skipped;
        let mut count = count - skipped;
        if let Some(remaining) = remaining.as_mut() {
            count = count.min(*remaining);
            *remaining -= count;
        }
        if count > 0 {
            out.push((item, count));
        }
    }
    out
}

/// An operator of the plan IR. See the module documentation for the semantics of each.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Plan {
    /// An import or an earlier object of the same dataflow.
    Get {
        /// Its id.
        id: GlobalId,
    },
    /// Constant rows (with multiplicities) at the dataflow's as-of.
    Constant {
        /// The rows.
        rows: Vec<(Row, Diff)>,
        /// Their type.
        typ: RelationType,
    },
    /// Appends computed columns.
    Map {
        /// The input.
        input: Box<Plan>,
        /// One expression per new column; each may reference the columns before it.
        exprs: Vec<ScalarExpr>,
    },
    /// Keeps rows satisfying every predicate.
    Filter {
        /// The input.
        input: Box<Plan>,
        /// Boolean predicates.
        predicates: Vec<ScalarExpr>,
    },
    /// Reorders, drops or repeats columns.
    Project {
        /// The input.
        input: Box<Plan>,
        /// The input columns to output, in order.
        outputs: Vec<usize>,
    },
    /// An n-ary equi-join.
    Join {
        /// The inputs; the output has their columns concatenated.
        inputs: Vec<Plan>,
        /// Classes of columns (indexes into the concatenation) that must be equal and non-null.
        equivalences: Vec<Vec<usize>>,
    },
    /// Grouped aggregation: one row per group of the input (none over an empty input, also with an
    /// empty `group_key`: unlike SQL's global aggregates, see the module docs).
    Reduce {
        /// The input.
        input: Box<Plan>,
        /// The grouping columns.
        group_key: Vec<usize>,
        /// The aggregates.
        aggregates: Vec<AggregateExpr>,
    },
    /// Set semantics: each row with positive multiplicity once.
    Distinct {
        /// The input.
        input: Box<Plan>,
    },
    /// The sum of the inputs.
    Union {
        /// The inputs, all of one type.
        inputs: Vec<Plan>,
    },
    /// Negated multiplicities.
    Negate {
        /// The input.
        input: Box<Plan>,
    },
    /// Only rows with positive multiplicity.
    Threshold {
        /// The input.
        input: Box<Plan>,
    },
    /// Per-group top-k.
    TopK {
        /// The input.
        input: Box<Plan>,
        /// The grouping columns.
        group_key: Vec<usize>,
        /// The ranking within a group.
        order_key: Vec<ColumnOrder>,
        /// How many rows per group (all if `None`).
        limit: Option<usize>,
        /// How many leading rows per group to skip.
        offset: usize,
    },
    /// The input, arranged by `key`.
    ArrangeBy {
        /// The input.
        input: Box<Plan>,
        /// The key columns.
        key: Vec<usize>,
    },
}

/// Why a plan does not type-check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A `Get` of an id that is neither imported nor built earlier in the dataflow.
    #[error("Get of unknown id {0}")]
    UnknownId(GlobalId),
    /// An expression of an operator does not type-check.
    #[error("{operator}: {error}")]
    Expr {
        /// The operator.
        operator: &'static str,
        /// The expression's error.
        error: ExprTypeError,
    },
    /// A column index beyond the operator's input.
    #[error("{operator}: column {column} does not exist (input has {arity} columns)")]
    ColumnOutOfRange {
        /// The operator.
        operator: &'static str,
        /// The referenced column.
        column: usize,
        /// The input's arity.
        arity: usize,
    },
    /// A constant row that does not have the constant's type.
    #[error("Constant: row {row}: {error}")]
    ConstantRow {
        /// The row, printed.
        row: String,
        /// How it does not fit.
        error: RowTypeError,
    },
    /// Union inputs of different types (arity or column types).
    #[error("Union: input {index} has type {found:?}, expected {expected:?}")]
    UnionTypeMismatch {
        /// The offending input.
        index: usize,
        /// The first input's type.
        expected: RelationType,
        /// This input's type.
        found: RelationType,
    },
    /// An operator that needs at least one input got none.
    #[error("{operator} needs at least one input")]
    NoInputs {
        /// The operator.
        operator: &'static str,
    },
    /// A join equivalence class that equates columns of different scalar types, or has fewer than two.
    #[error("Join: equivalence class {class:?} is invalid: {reason}")]
    BadEquivalence {
        /// The class.
        class: Vec<usize>,
        /// What is wrong with it.
        reason: String,
    },
    /// An aggregate applied to a column type it does not support.
    #[error("Reduce: {func:?} cannot aggregate a {typ:?}")]
    BadAggregate {
        /// The function.
        func: AggregateFunc,
        /// The column's type.
        typ: ColumnType,
    },
}

impl Plan {
    /// `Get { id }`.
    pub fn get(id: GlobalId) -> Self {
        Plan::Get { id }
    }

    /// The type of the plan's output, checking every operator. `context` gives the type of each id a
    /// `Get` may reference (imports and earlier objects).
    ///
    /// # Examples
    /// ```
    /// use protocol::{ColumnType, GlobalId, Plan, PlanError, RelationType, ScalarType};
    /// let int = ColumnType::new(ScalarType::Int64, false);
    /// let t = RelationType::new(vec![int, int]);
    /// let context = |id: GlobalId| (id == GlobalId::User(1)).then(|| t.clone());
    /// let plan = Plan::Project { input: Box::new(Plan::get(GlobalId::User(1))), outputs: vec![1] };
    /// assert_eq!(plan.typ(&context).unwrap(), RelationType::new(vec![int]));
    /// assert_eq!(Plan::get(GlobalId::User(2)).typ(&context), Err(PlanError::UnknownId(GlobalId::User(2))));
    /// ```
    pub fn typ(&self, context: &dyn Fn(GlobalId) -> Option<RelationType>) -> Result<RelationType, PlanError> {
        fn check_columns(operator: &'static str, columns: &[usize], arity: usize) -> Result<(), PlanError> {
            match columns.iter().find(|c| **c >= arity) {
                Some(column) => Err(PlanError::ColumnOutOfRange { operator, column: *column, arity }),
                None => Ok(()),
            }
        }
        match self {
            Plan::Get { id } => context(*id).ok_or(PlanError::UnknownId(*id)),
            Plan::Constant { rows, typ } => {
                for (row, _) in rows {
                    typ.check_row(row)
                        .map_err(|error| PlanError::ConstantRow { row: row.to_string(), error })?;
                }
                Ok(typ.clone())
            }
            Plan::Map { input, exprs } => {
                let mut typ = input.typ(context)?;
                for expr in exprs {
                    let column =
                        expr.typ(&typ).map_err(|error| PlanError::Expr { operator: "Map", error })?;
                    typ.column_types.push(column);
                }
                Ok(typ)
            }
            Plan::Filter { input, predicates } => {
                let typ = input.typ(context)?;
                for predicate in predicates {
                    let column =
                        predicate.typ(&typ).map_err(|error| PlanError::Expr { operator: "Filter", error })?;
                    if column.scalar_type != ScalarType::Bool {
                        return Err(PlanError::Expr {
                            operator: "Filter",
                            error: ExprTypeError::BadArguments {
                                func: "Filter".to_string(),
                                argument_types: vec![column.scalar_type],
                            },
                        });
                    }
                }
                Ok(typ)
            }
            Plan::Project { input, outputs } => {
                let typ = input.typ(context)?;
                check_columns("Project", outputs, typ.arity())?;
                Ok(RelationType::new(outputs.iter().map(|c| typ.column_types[*c]).collect()))
            }
            Plan::Join { inputs, equivalences } => {
                if inputs.is_empty() {
                    return Err(PlanError::NoInputs { operator: "Join" });
                }
                let mut typ = RelationType::default();
                for input in inputs {
                    typ.column_types.extend(input.typ(context)?.column_types);
                }
                for class in equivalences {
                    check_columns("Join", class, typ.arity())?;
                    if class.len() < 2 {
                        return Err(PlanError::BadEquivalence {
                            class: class.clone(),
                            reason: "fewer than two columns".to_string(),
                        });
                    }
                    let first = typ.column_types[class[0]].scalar_type;
                    if class.iter().any(|c| typ.column_types[*c].scalar_type != first) {
                        return Err(PlanError::BadEquivalence {
                            class: class.clone(),
                            reason: "columns of different types".to_string(),
                        });
                    }
                }
                Ok(typ)
            }
            Plan::Reduce { input, group_key, aggregates } => {
                let typ = input.typ(context)?;
                check_columns("Reduce", group_key, typ.arity())?;
                let mut output: Vec<ColumnType> = group_key.iter().map(|c| typ.column_types[*c]).collect();
                for aggregate in aggregates {
                    if aggregate.func == AggregateFunc::CountRows {
                        // `count(*)` reads no column.
                        output.push(ColumnType::new(ScalarType::Int64, false));
                        continue;
                    }
                    check_columns("Reduce", &[aggregate.column], typ.arity())?;
                    let input_type = typ.column_types[aggregate.column];
                    let column = aggregate
                        .func
                        .output_type(input_type)
                        .ok_or(PlanError::BadAggregate { func: aggregate.func, typ: input_type })?;
                    output.push(column);
                }
                Ok(RelationType::new(output))
            }
            Plan::Distinct { input } | Plan::Negate { input } | Plan::Threshold { input } => {
                input.typ(context)
            }
            Plan::Union { inputs } => {
                let Some(first) = inputs.first() else {
                    return Err(PlanError::NoInputs { operator: "Union" });
                };
                let mut typ = first.typ(context)?;
                for (index, input) in inputs.iter().enumerate().skip(1) {
                    let other = input.typ(context)?;
                    let same_shape = other.arity() == typ.arity()
                        && other
                            .column_types
                            .iter()
                            .zip(&typ.column_types)
                            .all(|(a, b)| a.scalar_type == b.scalar_type);
                    if !same_shape {
                        return Err(PlanError::UnionTypeMismatch { index, expected: typ, found: other });
                    }
                    for (column, other) in typ.column_types.iter_mut().zip(other.column_types) {
                        column.nullable |= other.nullable;
                    }
                }
                Ok(typ)
            }
            Plan::TopK { input, group_key, order_key, .. } => {
                let typ = input.typ(context)?;
                check_columns("TopK", group_key, typ.arity())?;
                let order_columns: Vec<usize> = order_key.iter().map(|o| o.column).collect();
                check_columns("TopK", &order_columns, typ.arity())?;
                Ok(typ)
            }
            Plan::ArrangeBy { input, key } => {
                let typ = input.typ(context)?;
                check_columns("ArrangeBy", key, typ.arity())?;
                Ok(typ)
            }
        }
    }

    /// The ids this plan `Get`s, in order of appearance (with repeats).
    ///
    /// # Examples
    /// ```
    /// use protocol::{GlobalId, Plan};
    /// let plan = Plan::Union { inputs: vec![Plan::get(GlobalId::User(1)), Plan::get(GlobalId::User(2))] };
    /// assert_eq!(plan.depends_on(), vec![GlobalId::User(1), GlobalId::User(2)]);
    /// ```
    pub fn depends_on(&self) -> Vec<GlobalId> {
        let mut out = Vec::new();
        self.visit(&mut |plan| {
            if let Plan::Get { id } = plan {
                out.push(*id);
            }
        });
        out
    }

    /// Calls `f` on this plan and every plan below it, parents first.
    pub fn visit(&self, f: &mut dyn FnMut(&Plan)) {
        f(self);
        match self {
            Plan::Get { .. } | Plan::Constant { .. } => {}
            Plan::Map { input, .. }
            | Plan::Filter { input, .. }
            | Plan::Project { input, .. }
            | Plan::Reduce { input, .. }
            | Plan::Distinct { input }
            | Plan::Negate { input }
            | Plan::Threshold { input }
            | Plan::TopK { input, .. }
            | Plan::ArrangeBy { input, .. } => input.visit(f),
            Plan::Join { inputs, .. } | Plan::Union { inputs } => {
                inputs.iter().for_each(|input| input.visit(f))
            }
        }
    }

    /// Calls `f` on this plan and every plan below it, parents first, mutably.
    ///
    /// # Examples
    /// ```
    /// use protocol::{GlobalId, Plan};
    /// let mut plan = Plan::Negate { input: Box::new(Plan::get(GlobalId::User(1))) };
    /// plan.visit_mut(&mut |p| if let Plan::Get { id } = p { *id = GlobalId::User(2) });
    /// assert_eq!(plan.depends_on(), vec![GlobalId::User(2)]);
    /// ```
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&mut Plan)) {
        f(self);
        match self {
            Plan::Get { .. } | Plan::Constant { .. } => {}
            Plan::Map { input, .. }
            | Plan::Filter { input, .. }
            | Plan::Project { input, .. }
            | Plan::Reduce { input, .. }
            | Plan::Distinct { input }
            | Plan::Negate { input }
            | Plan::Threshold { input }
            | Plan::TopK { input, .. }
            | Plan::ArrangeBy { input, .. } => input.visit_mut(f),
            Plan::Join { inputs, .. } | Plan::Union { inputs } => {
                inputs.iter_mut().for_each(|input| input.visit_mut(f))
            }
        }
    }

    /// The operator's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Plan::Get { .. } => "Get",
            Plan::Constant { .. } => "Constant",
            Plan::Map { .. } => "Map",
            Plan::Filter { .. } => "Filter",
            Plan::Project { .. } => "Project",
            Plan::Join { .. } => "Join",
            Plan::Reduce { .. } => "Reduce",
            Plan::Distinct { .. } => "Distinct",
            Plan::Union { .. } => "Union",
            Plan::Negate { .. } => "Negate",
            Plan::Threshold { .. } => "Threshold",
            Plan::TopK { .. } => "TopK",
            Plan::ArrangeBy { .. } => "ArrangeBy",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int() -> ColumnType {
        ColumnType::new(ScalarType::Int64, false)
    }

    fn context(id: GlobalId) -> Option<RelationType> {
        match id {
            GlobalId::User(1) => {
                Some(RelationType::new(vec![int(), ColumnType::new(ScalarType::Text, true)]))
            }
            _ => None,
        }
    }

    fn get() -> Box<Plan> {
        Box::new(Plan::get(GlobalId::User(1)))
    }

    #[test]
    fn typing_errors_name_the_problem() {
        let cases: Vec<(Plan, PlanError)> = vec![
            (Plan::get(GlobalId::User(9)), PlanError::UnknownId(GlobalId::User(9))),
            (
                Plan::Project { input: get(), outputs: vec![2] },
                PlanError::ColumnOutOfRange { operator: "Project", column: 2, arity: 2 },
            ),
            (Plan::Union { inputs: vec![] }, PlanError::NoInputs { operator: "Union" }),
            (
                Plan::Reduce {
                    input: get(),
                    group_key: vec![],
                    aggregates: vec![AggregateExpr { func: AggregateFunc::Sum, column: 1 }],
                },
                PlanError::BadAggregate {
                    func: AggregateFunc::Sum,
                    typ: ColumnType::new(ScalarType::Text, true),
                },
            ),
            (
                Plan::Join { inputs: vec![*get(), *get()], equivalences: vec![vec![0, 1]] },
                PlanError::BadEquivalence {
                    class: vec![0, 1],
                    reason: "columns of different types".to_string(),
                },
            ),
            (
                Plan::Join { inputs: vec![*get()], equivalences: vec![vec![0]] },
                PlanError::BadEquivalence { class: vec![0], reason: "fewer than two columns".to_string() },
            ),
            (
                Plan::TopK {
                    input: get(),
                    group_key: vec![],
                    order_key: vec![ColumnOrder::asc(5)],
                    limit: None,
                    offset: 0,
                },
                PlanError::ColumnOutOfRange { operator: "TopK", column: 5, arity: 2 },
            ),
        ];
        for (plan, expected) in cases {
            assert_eq!(plan.typ(&context), Err(expected), "{plan:?}");
        }
        let bad_union =
            Plan::Union { inputs: vec![*get(), Plan::Project { input: get(), outputs: vec![0] }] };
        assert!(matches!(bad_union.typ(&context), Err(PlanError::UnionTypeMismatch { index: 1, .. })));
        let bad_constant = Plan::Constant {
            rows: vec![(Row::pack([Datum::Text("x")]), 1)],
            typ: RelationType::new(vec![int()]),
        };
        assert!(matches!(bad_constant.typ(&context), Err(PlanError::ConstantRow { .. })));
    }

    #[test]
    fn aggregates_overflow_and_float_sums() {
        assert_eq!(
            AggregateFunc::Sum.eval([(Datum::Int64(i64::MAX), 1), (Datum::Int64(1), 1)]),
            Err(EvalError::Int64OutOfRange)
        );
        let extremes = [(Datum::Int64(i64::MIN), 2), (Datum::Int64(i64::MAX), 2)];
        assert_eq!(AggregateFunc::Sum.eval(extremes).unwrap(), Datum::Int64(-2), "only the result must fit");
        assert_eq!(AggregateFunc::Sum.eval([(Datum::float64(1.5), 2)]).unwrap(), Datum::float64(3.0));
        assert_eq!(AggregateFunc::Sum.eval([(Datum::Null, 2)]).unwrap(), Datum::Null);
        assert_eq!(AggregateFunc::Count.eval(std::iter::empty()).unwrap(), Datum::Int64(0));
    }
}
