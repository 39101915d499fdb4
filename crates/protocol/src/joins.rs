//! Outer, semi and anti joins, as lowerings to the IR's own operators (`Join`, `Filter`, `Distinct`,
//! `Union`, `Negate`, `Map`, `Project`), so that every renderer and the reference interpreter run them
//! without knowing them.
//!
//! Each function takes the two inputs with their types, the equalities `on` (pairs of a left column and
//! a right column) and a `residual`: predicates over the concatenation of a left and a right row (left
//! columns first), all of which must be `true` for the two rows to match, as in SQL's `ON` (or a
//! correlated `EXISTS`). SQL's semantics:
//!
//! | function | output (multisets) |
//! |---|---|
//! | [`inner_join`] | every matching pair of rows, columns concatenated |
//! | [`semi_join`] | every left row (with its multiplicity) with at least one match (`EXISTS`, `IN`) |
//! | [`anti_join`] | every left row with no match (`NOT EXISTS`; a `NOT IN` over non-null columns) |
//! | [`left_join`] | the inner join, and every left row with no match padded with `NULL`s |
//! | [`right_join`] | the inner join, and every right row with no match padded with `NULL`s before it |
//! | [`full_join`] | the inner join and both kinds of padded rows |
//!
//! **How.** A semi-join joins the *distinct* values of the left columns the condition reads (the
//! correlation columns) with the right input, keeps the combinations the residual accepts, and joins
//! their distinct correlation values back to the left input. That last join is null-safe (a `NULL` there
//! is the same as a `NULL`: each nullable correlation column is joined as an `IS NULL` flag and its value
//! coalesced with a fixed one), so a left row whose correlation values are `NULL` is kept exactly when the
//! condition accepted it, whatever the condition does with `NULL`s. An anti-join is the left input minus
//! its semi-join; the outer joins add anti-joins padded with typed `NULL` literals.
//!
//! **Cost.** The inputs appear more than once in a lowered plan (a left join reads its left input three
//! times): pass `Get`s of objects built once (a dataflow's earlier objects) rather than whole subplans.
//!
//! **Tests.** The unit tests below check each kind against a nested-loop definition on inputs with
//! `NULL`s and duplicates; `arbitrary::sql` generates them against SQLite's own joins.

use crate::expr::{BinaryFunc, ScalarExpr, UnaryFunc, VariadicFunc};
use crate::plan::Plan;
use crate::row::{ColumnType, Datum, Decimal, Interval, RelationType, ScalarType};

/// `left JOIN right ON on AND residual`.
///
/// # Examples
/// ```
/// use std::collections::BTreeMap;
/// use protocol::{ColumnType, Datum, GlobalId, Plan, RelationType, Row, ScalarType, joins};
/// use protocol::reference::{consolidate, evaluate};
/// let typ = RelationType::new(vec![ColumnType::new(ScalarType::Int64, true)]);
/// let r = |d: Datum<'_>| Row::pack([d]);
/// let inputs = BTreeMap::from([
///     (GlobalId::User(1), consolidate([(r(Datum::Int64(1)), 1), (r(Datum::Int64(2)), 1), (r(Datum::Null), 1)])),
///     (GlobalId::User(2), consolidate([(r(Datum::Int64(1)), 2)])),
/// ]);
/// let (a, b) = (Plan::get(GlobalId::User(1)), Plan::get(GlobalId::User(2)));
/// let left = joins::left_join(&a, &typ, &b, &typ, &[(0, 0)], &[]);
/// let pair = |x: Datum<'_>, y: Datum<'_>| Row::pack([x, y]);
/// assert_eq!(evaluate(&left, &inputs).unwrap(), consolidate([
///     (pair(Datum::Int64(1), Datum::Int64(1)), 2),
///     (pair(Datum::Int64(2), Datum::Null), 1),
///     (pair(Datum::Null, Datum::Null), 1),
/// ]));
/// let anti = joins::anti_join(&a, &typ, &b, &typ, &[(0, 0)], &[]);
/// assert_eq!(evaluate(&anti, &inputs).unwrap(), consolidate([(r(Datum::Int64(2)), 1), (r(Datum::Null), 1)]));
/// ```
pub fn inner_join(
    left: &Plan,
    left_type: &RelationType,
    right: &Plan,
    _right_type: &RelationType,
    on: &[(usize, usize)],
    residual: &[ScalarExpr],
) -> Plan {
    let arity = left_type.arity();
    let join = Plan::Join {
        inputs: vec![left.clone(), right.clone()],
        equivalences: on.iter().map(|(l, r)| vec![*l, arity + r]).collect(),
    };
    if residual.is_empty() {
        join
    } else {
        Plan::Filter { input: Box::new(join), predicates: residual.to_vec() }
    }
}

/// The left columns `on` and `residual` read, in increasing order.
fn correlation_columns(arity: usize, on: &[(usize, usize)], residual: &[ScalarExpr]) -> Vec<usize> {
    let mut columns: Vec<usize> = on.iter().map(|(l, _)| *l).collect();
    for predicate in residual {
        predicate.clone().visit_columns_mut(&mut |c| {
            if *c < arity {
                columns.push(*c);
            }
        });
    }
    columns.sort_unstable();
    columns.dedup();
    columns
}

/// A fixed non-null value of a type (what a null-safe key coalesces `NULL` with).
fn filler(scalar_type: ScalarType) -> ScalarExpr {
    let datum = match scalar_type {
        ScalarType::Bool => Datum::Bool(false),
        ScalarType::Int64 => Datum::Int64(0),
        ScalarType::Float64 => Datum::float64(0.0),
        ScalarType::Text => Datum::Text(""),
        ScalarType::Bytes => Datum::Bytes(&[]),
        ScalarType::Timestamp => Datum::Timestamp(0),
        ScalarType::Decimal { scale } => {
            return ScalarExpr::Literal(
                crate::row::Row::pack([Datum::Decimal(Decimal::ZERO)]),
                ColumnType::new(ScalarType::Decimal { scale }, false),
            );
        }
        ScalarType::Date => Datum::Date(0),
        ScalarType::Interval => Datum::Interval(Interval::default()),
    };
    ScalarExpr::literal(datum)
}

/// `plan` with null-safe key columns appended for `columns` of `typ`: for a non-nullable column the
/// column itself; for a nullable one, its `IS NULL` and its value coalesced with a [`filler`]. Returns the
/// plan and the appended key columns.
fn with_null_safe_keys(plan: Plan, typ: &RelationType, columns: &[usize]) -> (Plan, Vec<usize>) {
    let mut exprs = Vec::new();
    let mut keys = Vec::new();
    for column in columns {
        let column_type = typ.column_types[*column];
        if column_type.nullable {
            keys.push(typ.arity() + exprs.len());
            exprs.push(ScalarExpr::column(*column).call_unary(UnaryFunc::IsNull));
            keys.push(typ.arity() + exprs.len());
            exprs.push(ScalarExpr::call_variadic(
                VariadicFunc::Coalesce,
                vec![ScalarExpr::column(*column), filler(column_type.scalar_type)],
            ));
        } else {
            keys.push(*column);
        }
    }
    let plan = if exprs.is_empty() { plan } else { Plan::Map { input: Box::new(plan), exprs } };
    (plan, keys)
}

/// `left WHERE EXISTS (SELECT FROM right WHERE on AND residual)`: each left row, with its multiplicity,
/// that has at least one match (see the module documentation for how).
pub fn semi_join(
    left: &Plan,
    left_type: &RelationType,
    right: &Plan,
    right_type: &RelationType,
    on: &[(usize, usize)],
    residual: &[ScalarExpr],
) -> Plan {
    let arity = left_type.arity();
    let correlated = correlation_columns(arity, on, residual);
    let position =
        |column: usize| correlated.iter().position(|c| *c == column).expect("a correlation column");
    // The distinct correlation values, and those of them that match a right row.
    let distinct = Plan::Distinct {
        input: Box::new(Plan::Project { input: Box::new(left.clone()), outputs: correlated.clone() }),
    };
    let width = correlated.len();
    let remapped: Vec<ScalarExpr> = residual
        .iter()
        .map(|predicate| {
            let mut predicate = predicate.clone();
            predicate
                .visit_columns_mut(&mut |c| *c = if *c < arity { position(*c) } else { *c - arity + width });
            predicate
        })
        .collect();
    let matched_pairs = inner_join(
        &distinct,
        &RelationType::default(),
        right,
        right_type,
        &on.iter().map(|(l, r)| (position(*l), *r)).collect::<Vec<_>>(),
        &[],
    );
    let matched_pairs = match matched_pairs {
        Plan::Join { inputs, equivalences } => Plan::Join {
            inputs,
            // `inner_join` offset the right columns by the (empty) left type's arity: by `width` instead.
            equivalences: equivalences.into_iter().map(|class| vec![class[0], class[1] + width]).collect(),
        },
        other => other,
    };
    let filtered = if remapped.is_empty() {
        matched_pairs
    } else {
        Plan::Filter { input: Box::new(matched_pairs), predicates: remapped }
    };
    let matched = Plan::Distinct {
        input: Box::new(Plan::Project { input: Box::new(filtered), outputs: (0..width).collect() }),
    };
    // Back to the left rows, null-safely.
    let matched_type =
        RelationType::new(correlated.iter().map(|c| left_type.column_types[*c]).collect::<Vec<_>>());
    let (left_keyed, left_keys) = with_null_safe_keys(left.clone(), left_type, &correlated);
    let (matched_keyed, matched_keys) =
        with_null_safe_keys(matched, &matched_type, &(0..width).collect::<Vec<_>>());
    let left_width = left_keys.iter().copied().max().map_or(arity, |m| (m + 1).max(arity));
    let join = Plan::Join {
        inputs: vec![left_keyed, matched_keyed],
        equivalences: left_keys.iter().zip(&matched_keys).map(|(l, m)| vec![*l, left_width + m]).collect(),
    };
    Plan::Project { input: Box::new(join), outputs: (0..arity).collect() }
}

/// `left WHERE NOT EXISTS (SELECT FROM right WHERE on AND residual)`: each left row with no match (the
/// left input minus its [`semi_join`]).
pub fn anti_join(
    left: &Plan,
    left_type: &RelationType,
    right: &Plan,
    right_type: &RelationType,
    on: &[(usize, usize)],
    residual: &[ScalarExpr],
) -> Plan {
    let semi = semi_join(left, left_type, right, right_type, on, residual);
    Plan::Union { inputs: vec![left.clone(), Plan::Negate { input: Box::new(semi) }] }
}

/// `NULL`s of the types of `typ`'s columns.
fn nulls(typ: &RelationType) -> Vec<ScalarExpr> {
    typ.column_types.iter().map(|c| ScalarExpr::null(c.scalar_type)).collect()
}

/// `left LEFT JOIN right ON on AND residual`.
pub fn left_join(
    left: &Plan,
    left_type: &RelationType,
    right: &Plan,
    right_type: &RelationType,
    on: &[(usize, usize)],
    residual: &[ScalarExpr],
) -> Plan {
    let inner = inner_join(left, left_type, right, right_type, on, residual);
    let unmatched = anti_join(left, left_type, right, right_type, on, residual);
    let padded = Plan::Map { input: Box::new(unmatched), exprs: nulls(right_type) };
    Plan::Union { inputs: vec![inner, padded] }
}

/// The equalities and residual of a join with its inputs swapped (`right` first).
fn swapped(
    left_type: &RelationType,
    right_type: &RelationType,
    on: &[(usize, usize)],
    residual: &[ScalarExpr],
) -> (Vec<(usize, usize)>, Vec<ScalarExpr>) {
    let (l, r) = (left_type.arity(), right_type.arity());
    let on = on.iter().map(|(a, b)| (*b, *a)).collect();
    let residual = residual
        .iter()
        .map(|predicate| {
            let mut predicate = predicate.clone();
            predicate.visit_columns_mut(&mut |c| *c = if *c < l { *c + r } else { *c - l });
            predicate
        })
        .collect();
    (on, residual)
}

/// `left RIGHT JOIN right ON on AND residual` (columns: left's, then right's).
pub fn right_join(
    left: &Plan,
    left_type: &RelationType,
    right: &Plan,
    right_type: &RelationType,
    on: &[(usize, usize)],
    residual: &[ScalarExpr],
) -> Plan {
    let inner = inner_join(left, left_type, right, right_type, on, residual);
    let (swapped_on, swapped_residual) = swapped(left_type, right_type, on, residual);
    let unmatched = anti_join(right, right_type, left, left_type, &swapped_on, &swapped_residual);
    let padded = Plan::Map { input: Box::new(unmatched), exprs: nulls(left_type) };
    // The padded rows have the right's columns first: put the left's (`NULL`s) first.
    let (l, r) = (left_type.arity(), right_type.arity());
    let reordered = Plan::Project { input: Box::new(padded), outputs: (r..r + l).chain(0..r).collect() };
    Plan::Union { inputs: vec![inner, reordered] }
}

/// `left FULL JOIN right ON on AND residual`.
pub fn full_join(
    left: &Plan,
    left_type: &RelationType,
    right: &Plan,
    right_type: &RelationType,
    on: &[(usize, usize)],
    residual: &[ScalarExpr],
) -> Plan {
    let left_outer = left_join(left, left_type, right, right_type, on, residual);
    let (swapped_on, swapped_residual) = swapped(left_type, right_type, on, residual);
    let unmatched = anti_join(right, right_type, left, left_type, &swapped_on, &swapped_residual);
    let padded = Plan::Map { input: Box::new(unmatched), exprs: nulls(left_type) };
    let (l, r) = (left_type.arity(), right_type.arity());
    let reordered = Plan::Project { input: Box::new(padded), outputs: (r..r + l).chain(0..r).collect() };
    Plan::Union { inputs: vec![left_outer, reordered] }
}

/// `a <> b`, for residuals.
pub fn not_equal(a: usize, b: usize) -> ScalarExpr {
    ScalarExpr::column(a).call_binary(BinaryFunc::NotEq, ScalarExpr::column(b))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::id::GlobalId;
    use crate::reference::{Multiset, consolidate, evaluate};
    use crate::row::Row;

    fn typ() -> RelationType {
        RelationType::new(vec![
            ColumnType::new(ScalarType::Int64, true),
            ColumnType::new(ScalarType::Int64, true),
        ])
    }

    fn row(values: &[Option<i64>]) -> Row {
        Row::pack(values.iter().map(|v| v.map_or(Datum::Null, Datum::Int64)))
    }

    /// Whether two rows match: `left.0 = right.0` (SQL: neither `NULL`) and `left.1 <> right.1`.
    fn matches(left: &[Option<i64>], right: &[Option<i64>]) -> bool {
        let equal = matches!((left[0], right[0]), (Some(a), Some(b)) if a == b);
        let different = matches!((left[1], right[1]), (Some(a), Some(b)) if a != b);
        equal && different
    }

    #[test]
    fn every_join_kind_agrees_with_its_nested_loop_definition() {
        let left: Vec<(Vec<Option<i64>>, i64)> = vec![
            (vec![Some(1), Some(1)], 2),
            (vec![Some(1), None], 1),
            (vec![None, Some(3)], 1),
            (vec![Some(2), Some(2)], 1),
            (vec![Some(4), Some(1)], 1),
        ];
        let right: Vec<(Vec<Option<i64>>, i64)> = vec![
            (vec![Some(1), Some(2)], 1),
            (vec![Some(1), Some(1)], 3),
            (vec![Some(2), Some(2)], 1),
            (vec![None, Some(5)], 1),
            (vec![Some(5), Some(0)], 2),
        ];
        let inputs = BTreeMap::from([
            (GlobalId::User(1), consolidate(left.iter().map(|(r, m)| (row(r), *m)))),
            (GlobalId::User(2), consolidate(right.iter().map(|(r, m)| (row(r), *m)))),
        ]);
        let (a, b) = (Plan::get(GlobalId::User(1)), Plan::get(GlobalId::User(2)));
        let (on, residual) = (vec![(0, 0)], vec![not_equal(1, 3)]);
        let (t, n) = (typ(), None);
        let joined = |l: &[Option<i64>], r: &[Option<i64>]| row(&[l[0], l[1], r[0], r[1]]);
        let mut expected: BTreeMap<&str, Vec<(Row, i64)>> = BTreeMap::new();
        for (l, lm) in &left {
            let mut any = false;
            for (r, rm) in &right {
                if matches(l, r) {
                    any = true;
                    for kind in ["inner", "left", "right", "full"] {
                        expected.entry(kind).or_default().push((joined(l, r), lm * rm));
                    }
                }
            }
            let kind = if any { "semi" } else { "anti" };
            expected.entry(kind).or_default().push((row(l), *lm));
            if !any {
                for kind in ["left", "full"] {
                    expected.entry(kind).or_default().push((joined(l, &[n, n]), *lm));
                }
            }
        }
        for (r, rm) in &right {
            if !left.iter().any(|(l, _)| matches(l, r)) {
                for kind in ["right", "full"] {
                    expected.entry(kind).or_default().push((joined(&[n, n], r), *rm));
                }
            }
        }
        let plans = [
            ("inner", inner_join(&a, &t, &b, &t, &on, &residual)),
            ("semi", semi_join(&a, &t, &b, &t, &on, &residual)),
            ("anti", anti_join(&a, &t, &b, &t, &on, &residual)),
            ("left", left_join(&a, &t, &b, &t, &on, &residual)),
            ("right", right_join(&a, &t, &b, &t, &on, &residual)),
            ("full", full_join(&a, &t, &b, &t, &on, &residual)),
        ];
        let context = |id: GlobalId| matches!(id, GlobalId::User(1 | 2)).then(typ);
        for (kind, plan) in plans {
            assert!(plan.typ(&context).is_ok(), "{kind} join type-checks: {:?}", plan.typ(&context));
            let want: Multiset = consolidate(expected.remove(kind).unwrap_or_default());
            assert_eq!(evaluate(&plan, &inputs).unwrap(), want, "{kind} join");
        }
    }

    #[test]
    fn a_semi_join_keeps_a_left_row_with_null_correlation_values_when_the_condition_accepts_it() {
        // EXISTS (SELECT FROM right WHERE left.0 IS NULL): a NULL correlation value that matches.
        let inputs = BTreeMap::from([
            (GlobalId::User(1), consolidate([(row(&[None, Some(1)]), 2), (row(&[Some(1), Some(1)]), 1)])),
            (GlobalId::User(2), consolidate([(row(&[Some(9), Some(9)]), 1)])),
        ]);
        let (a, b) = (Plan::get(GlobalId::User(1)), Plan::get(GlobalId::User(2)));
        let residual = vec![ScalarExpr::column(0).call_unary(UnaryFunc::IsNull)];
        let semi = semi_join(&a, &typ(), &b, &typ(), &[], &residual);
        assert_eq!(evaluate(&semi, &inputs).unwrap(), consolidate([(row(&[None, Some(1)]), 2)]));
    }
}
