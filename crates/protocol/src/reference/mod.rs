//! The reference interpreter of the plan IR: a naive, obviously-correct evaluation of a [`Plan`] over
//! multisets of rows at one point in time, and of a peek's map/filter/project and finishing.
//!
//! This is the specification every renderer is tested against (the replica's differential operators in
//! `compute/tests/it/`, the simulator's oracles). It is deliberately simple: every operator consolidates
//! its whole output before the next one runs, joins are nested loops, rankings are sorts. It is not for
//! production use.
//!
//! # Independence
//!
//! The reference shares **no evaluation code** with the replica. It uses [`Row`] and [`Datum`](crate::Datum) only as
//! containers (decoding a row into its own `Value`s (`value.rs`) and packing values back), and `Row`'s
//! `Eq`/`Ord` only as the key of the maps that consolidate multisets (identity of rows, never an
//! ordering of values). Everything that computes is its own, written from the IR's documentation:
//! scalar expressions (`scalar.rs`: not `ScalarExpr::eval`), the ordering of values and rows (`order.rs`:
//! not `compare_datums` or `Datum`'s `Ord`), aggregates (`aggregate.rs`: not `AggregateFunc::eval`),
//! ranking and slicing (`finish.rs`: not `slice_ranked` or `RowSetFinishing::finish`), and a peek's
//! map/filter/project ([`map_filter_project`]: not `MapFilterProject::apply`). It does call the IR's
//! *structure* (the enums it matches on, `Plan`'s fields) and nothing else.
//!
//! # Semantics checked
//!
//! Each operator as `plan.rs`'s module table describes it, over consolidated multisets. In addition:
//!
//! - **Errors.** Evaluation fails with the first [`EvalError`] any row produces anywhere in the plan
//!   (children before parents, rows in the order of their encodings, predicates left to right, stopping
//!   at the first one that is not `true`). A replica's answer for a collection is an error exactly when
//!   this evaluation errs on the same inputs.
//! - **Negative multiplicities.** A row with a negative accumulated multiplicity reaching `Reduce`,
//!   `Distinct` or `TopK` is an error.
//! - **Multiplicities are exact.** Inside a plan, multiplicities are integers computed exactly (sums,
//!   negations, join products); they must be `i64`s only where they are *observed*: a `Reduce` or `TopK`
//!   group's total multiplicity (its number of rows), and every row of the result ([`evaluate`]'s output,
//!   a dataflow's exports). Beyond those points an `i64` overflow of a multiplicity is not an error: a
//!   union of a row with itself is fine at `2^63` as long as a later `Negate` brings it back, or no
//!   export sees it. Anything else is [`EvalError::MultiplicityOutOfRange`].
//! - **Capacity.** Exact multiplicities are computed in 128 bits; one beyond that (a product of several
//!   join inputs' multiplicities near `2^63`) is [`EvalError::MultiplicityOutOfRange`] too. The replica
//!   has the same capacity but meets it in its own order (per update, not per accumulated row), so the
//!   two can differ only for plans whose intermediate multiplicities pass `2^126`.
//!
//! **Invariant:** results are consolidated: no row with a zero multiplicity.
//!
//! **Tests.** Unit tests per module (each documented rule, as a table); `tests/it/sqlite.rs` checks this
//! interpreter against SQLite on random plans, tables and updates; `compute/tests/it/` checks the replica
//! against it.

mod aggregate;
mod dates;
mod decimals;
mod finish;
mod order;
mod scalar;
mod value;

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::num::NonZeroU64;

use self::value::{Value, values};
use crate::Diff;
use crate::dataflow::DataflowDescription;
use crate::expr::{EvalError, MapFilterProject};
use crate::id::GlobalId;
use crate::peek::RowSetFinishing;
use crate::plan::{AggregateExpr, ColumnOrder, Plan};
use crate::row::Row;

/// A consolidated multiset of rows: each row with its non-zero multiplicity.
pub type Multiset = BTreeMap<Row, Diff>;

/// A consolidated multiset with exact multiplicities (what flows between operators).
type Bag = BTreeMap<Row, i128>;

/// Builds a consolidated multiset from `(row, diff)` pairs.
///
/// # Examples
/// ```
/// use protocol::{Datum, Row};
/// use protocol::reference::consolidate;
/// let r = Row::pack([Datum::Int64(1)]);
/// let m = consolidate([(r.clone(), 2), (r.clone(), -2)]);
/// assert!(m.is_empty());
/// ```
///
/// # Panics
/// If a row's multiplicities add up beyond `i64` (the caller's data is then not a multiset of this
/// crate's [`Diff`]).
pub fn consolidate(updates: impl IntoIterator<Item = (Row, Diff)>) -> Multiset {
    let mut bag = Bag::new();
    for (row, diff) in updates {
        let added = add(&mut bag, row, i128::from(diff));
        assert!(added.is_ok(), "sums of i64 multiplicities stay far inside i128");
    }
    let result = to_multiset(bag);
    assert!(result.is_ok(), "consolidated multiplicities of updates fit in i64");
    result.expect("asserted")
}

/// Adds `multiplicity` copies of `row` to `bag`, exactly.
fn add(bag: &mut Bag, row: Row, multiplicity: i128) -> Result<(), EvalError> {
    if multiplicity == 0 {
        return Ok(());
    }
    match bag.entry(row) {
        Entry::Vacant(entry) => {
            entry.insert(multiplicity);
        }
        Entry::Occupied(mut entry) => {
            let sum = entry.get().checked_add(multiplicity).ok_or(EvalError::MultiplicityOutOfRange)?;
            if sum == 0 {
                entry.remove();
            } else {
                *entry.get_mut() = sum;
            }
        }
    }
    Ok(())
}

fn to_bag(multiset: &Multiset) -> Bag {
    multiset.iter().map(|(row, diff)| (row.clone(), i128::from(*diff))).collect()
}

/// The multiset of a bag: an error if a multiplicity is not an `i64`.
fn to_multiset(bag: Bag) -> Result<Multiset, EvalError> {
    bag.into_iter()
        .map(|(row, multiplicity)| {
            let diff = Diff::try_from(multiplicity).map_err(|_| EvalError::MultiplicityOutOfRange)?;
            Ok((row, diff))
        })
        .collect()
}

/// Evaluates `plan` where each `Get` reads `inputs` (imports and earlier objects).
///
/// # Examples
/// ```
/// use std::collections::BTreeMap;
/// use protocol::{BinaryFunc, Datum, GlobalId, Plan, Row, ScalarExpr};
/// use protocol::reference::{consolidate, evaluate};
/// let r = |i| Row::pack([Datum::Int64(i)]);
/// let inputs = BTreeMap::from([(GlobalId::User(1), consolidate([(r(1), 1), (r(5), 2)]))]);
/// let plan = Plan::Filter {
///     input: Box::new(Plan::get(GlobalId::User(1))),
///     predicates: vec![ScalarExpr::column(0).call_binary(BinaryFunc::Gt, ScalarExpr::literal(Datum::Int64(2)))],
/// };
/// assert_eq!(evaluate(&plan, &inputs).unwrap(), consolidate([(r(5), 2)]));
/// ```
pub fn evaluate(plan: &Plan, inputs: &BTreeMap<GlobalId, Multiset>) -> Result<Multiset, EvalError> {
    let scope: BTreeMap<GlobalId, Bag> = inputs.iter().map(|(id, m)| (*id, to_bag(m))).collect();
    to_multiset(eval_plan(plan, &scope)?)
}

/// Evaluates every object of a dataflow in order and returns the contents of each export: for an index,
/// the rows of the object it indexes; for a sink, the rows it emits. `inputs` holds the contents of every
/// import at the time of interest.
///
/// # Examples
/// ```
/// use std::collections::BTreeMap;
/// use frontiers::Antichain;
/// use protocol::{BuildDesc, ColumnType, DataflowDescription, Datum, GlobalId, IndexExport, Plan, RelationDesc, Row, ScalarType, SourceImport};
/// use protocol::reference::{consolidate, evaluate_dataflow};
/// let mut df = DataflowDescription::<u64>::new("negate");
/// df.source_imports.insert(GlobalId::User(1), SourceImport { desc: RelationDesc::new([("x", ColumnType::new(ScalarType::Int64, false))]) });
/// df.objects_to_build.push(BuildDesc { id: GlobalId::Transient(1), plan: Plan::Negate { input: Box::new(Plan::get(GlobalId::User(1))) } });
/// df.index_exports.insert(GlobalId::User(2), IndexExport { on_id: GlobalId::Transient(1), key: vec![0] });
/// df.as_of = Some(Antichain::from_elem(0));
/// let r = Row::pack([Datum::Int64(7)]);
/// let out = evaluate_dataflow(&df, &BTreeMap::from([(GlobalId::User(1), consolidate([(r.clone(), 1)]))])).unwrap();
/// assert_eq!(out[&GlobalId::User(2)], consolidate([(r, -1)]));
/// ```
pub fn evaluate_dataflow<T: frontiers::Timestamp>(
    df: &DataflowDescription<T>,
    inputs: &BTreeMap<GlobalId, Multiset>,
) -> Result<BTreeMap<GlobalId, Multiset>, EvalError> {
    let mut scope: BTreeMap<GlobalId, Bag> = inputs.iter().map(|(id, m)| (*id, to_bag(m))).collect();
    for object in &df.objects_to_build {
        let contents = eval_plan(&object.plan, &scope)?;
        scope.insert(object.id, contents);
    }
    let mut out = BTreeMap::new();
    // Every sink kind emits its object's contents; the connection only decides where they go.
    let exports = df
        .index_exports
        .iter()
        .map(|(id, export)| (*id, export.on_id))
        .chain(df.sink_exports.iter().map(|(id, sink)| (*id, sink.from)));
    for (id, object) in exports {
        let contents = scope.get(&object).cloned().unwrap_or_default();
        out.insert(id, to_multiset(contents)?);
    }
    Ok(out)
}

/// Applies a peek's map/filter/project to a collection's contents (the replica-side step of a peek, before
/// the finishing): per row, the expressions' values appended in order (each sees those before it), the
/// row kept if every predicate is `true` (left to right, stopping at the first that is not), then the
/// projected columns. A row whose arity is not the transform's input arity is an error.
///
/// # Examples
/// ```
/// use protocol::{Datum, MapFilterProject, Row};
/// use protocol::reference::{consolidate, map_filter_project};
/// let r = |i| Row::pack([Datum::Int64(i), Datum::Int64(i * 10)]);
/// let out = map_filter_project(&MapFilterProject::new(2).project([1]), &consolidate([(r(1), 1), (r(2), 3)])).unwrap();
/// assert_eq!(out.len(), 2);
/// ```
pub fn map_filter_project(mfp: &MapFilterProject, input: &Multiset) -> Result<Multiset, EvalError> {
    let mut out = Bag::new();
    for (row, diff) in input {
        let mut columns = values(row);
        if columns.len() != mfp.input_arity {
            return Err(EvalError::Internal(format!(
                "reference: a row of {} columns for a map/filter/project of {}",
                columns.len(),
                mfp.input_arity
            )));
        }
        for expr in &mfp.expressions {
            let value = scalar::eval(expr, &columns)?;
            columns.push(value);
        }
        if !passes(&mfp.predicates, &columns)? {
            continue;
        }
        let projected = project(&columns, &mfp.projection)?;
        add(&mut out, value::row(&projected), i128::from(*diff))?;
    }
    to_multiset(out)
}

/// A peek's finishing, the reference's own: if it orders, limits or skips anything, the rows sorted by
/// `order_by` (ties broken by the whole row, column by column ascending with `NULL` first), then the
/// ones ranked `offset..offset + limit` counting multiplicities; otherwise `rows` as given.
///
/// # Examples
/// ```
/// use std::num::NonZeroU64;
/// use protocol::{ColumnOrder, Datum, Row, RowSetFinishing};
/// use protocol::reference::finish;
/// let n = |x| NonZeroU64::new(x).unwrap();
/// let r = |i| Row::pack([Datum::Int64(i)]);
/// let rows = vec![(r(3), n(1)), (r(1), n(2)), (r(2), n(1))];
/// let f = RowSetFinishing { order_by: vec![ColumnOrder::desc(0)], limit: Some(2), offset: 1 };
/// assert_eq!(finish(&f, rows), vec![(r(2), n(1)), (r(1), n(1))]);
/// ```
pub fn finish(finishing: &RowSetFinishing, rows: Vec<(Row, NonZeroU64)>) -> Vec<(Row, NonZeroU64)> {
    finish::finish(finishing, rows)
}

/// Whether every predicate is `true` on `columns` (left to right, stopping at the first that is not).
fn passes(predicates: &[crate::ScalarExpr], columns: &[Value<'_>]) -> Result<bool, EvalError> {
    for predicate in predicates {
        if !matches!(scalar::eval(predicate, columns)?, Value::Bool(true)) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn project<'a>(columns: &[Value<'a>], outputs: &[usize]) -> Result<Vec<Value<'a>>, EvalError> {
    outputs
        .iter()
        .map(|c| {
            columns.get(*c).copied().ok_or_else(|| EvalError::Internal(format!("reference: project of {c}")))
        })
        .collect()
}

/// The rows of `bag` transformed one by one: `f` returns the output row, or `None` to drop it.
fn map_rows<F>(bag: &Bag, mut f: F) -> Result<Bag, EvalError>
where
    F: FnMut(&Row) -> Result<Option<Row>, EvalError>,
{
    let mut out = Bag::new();
    for (row, multiplicity) in bag {
        if let Some(output) = f(row)? {
            add(&mut out, output, *multiplicity)?;
        }
    }
    Ok(out)
}

fn eval_plan(plan: &Plan, scope: &BTreeMap<GlobalId, Bag>) -> Result<Bag, EvalError> {
    match plan {
        Plan::Get { id } => {
            scope.get(id).cloned().ok_or_else(|| EvalError::Internal(format!("reference: no input for {id}")))
        }
        Plan::Constant { rows, .. } => {
            let mut bag = Bag::new();
            for (row, diff) in rows {
                add(&mut bag, row.clone(), i128::from(*diff))?;
            }
            Ok(bag)
        }
        Plan::Map { input, exprs } => map_rows(&eval_plan(input, scope)?, |row| {
            let mut columns = values(row);
            for expr in exprs {
                let value = scalar::eval(expr, &columns)?;
                columns.push(value);
            }
            Ok(Some(value::row(&columns)))
        }),
        Plan::Filter { input, predicates } => map_rows(&eval_plan(input, scope)?, |row| {
            Ok(passes(predicates, &values(row))?.then(|| row.clone()))
        }),
        Plan::Project { input, outputs } => {
            map_rows(&eval_plan(input, scope)?, |row| Ok(Some(value::row(&project(&values(row), outputs)?))))
        }
        Plan::Join { inputs, equivalences } => {
            let evaluated: Vec<Bag> =
                inputs.iter().map(|input| eval_plan(input, scope)).collect::<Result<_, _>>()?;
            join(&evaluated, equivalences)
        }
        Plan::Reduce { input, group_key, aggregates } => {
            reduce(&eval_plan(input, scope)?, group_key, aggregates)
        }
        Plan::Distinct { input } => {
            let mut out = Bag::new();
            for (row, multiplicity) in eval_plan(input, scope)? {
                if multiplicity < 0 {
                    return Err(negative(&row, multiplicity, "Distinct"));
                }
                out.insert(row, 1);
            }
            Ok(out)
        }
        Plan::Union { inputs } => {
            let mut out = Bag::new();
            for input in inputs {
                for (row, multiplicity) in eval_plan(input, scope)? {
                    add(&mut out, row, multiplicity)?;
                }
            }
            Ok(out)
        }
        Plan::Negate { input } => eval_plan(input, scope)?
            .into_iter()
            .map(|(row, m)| Ok((row, m.checked_neg().ok_or(EvalError::MultiplicityOutOfRange)?)))
            .collect(),
        Plan::Threshold { input } => {
            Ok(eval_plan(input, scope)?.into_iter().filter(|(_, m)| *m > 0).collect())
        }
        Plan::TopK { input, group_key, order_key, limit, offset } => {
            top_k(&eval_plan(input, scope)?, group_key, order_key, *limit, *offset)
        }
        Plan::ArrangeBy { input, .. } => eval_plan(input, scope),
    }
}

fn negative(row: &Row, multiplicity: i128, operator: &str) -> EvalError {
    EvalError::Internal(format!("{operator}: negative multiplicity {multiplicity} for row {row}"))
}

/// Nested loops over the inputs: every combination of one row from each, kept when each equivalence
/// class's columns (of the concatenated row) are all non-null and the same; its multiplicity is the
/// product of the rows'. A class is checked as soon as all of its columns are bound, so combinations
/// that cannot match are not extended (or multiplied).
fn join(inputs: &[Bag], equivalences: &[Vec<usize>]) -> Result<Bag, EvalError> {
    let mut partial: Vec<(Vec<Value<'_>>, i128)> = vec![(Vec::new(), 1)];
    for input in inputs {
        let mut next = Vec::new();
        for (prefix, prefix_multiplicity) in &partial {
            for (row, multiplicity) in input {
                let mut columns = prefix.clone();
                columns.extend(values(row));
                let bound = columns.len();
                let ready = equivalences.iter().filter(|class| class.iter().all(|c| *c < bound));
                if !ready.clone().all(|class| class_matches(class, &columns)) {
                    continue;
                }
                let product = prefix_multiplicity
                    .checked_mul(*multiplicity)
                    .ok_or(EvalError::MultiplicityOutOfRange)?;
                next.push((columns, product));
            }
        }
        partial = next;
    }
    let mut out = Bag::new();
    for (columns, multiplicity) in partial {
        // Classes naming columns beyond the concatenation (not in a validated plan) match nothing.
        if equivalences.iter().all(|class| class_matches(class, &columns)) {
            add(&mut out, value::row(&columns), multiplicity)?;
        }
    }
    Ok(out)
}

/// Whether the columns of `class` are all present, non-null and the same.
fn class_matches(class: &[usize], columns: &[Value<'_>]) -> bool {
    let Some(first) = class.first().and_then(|c| columns.get(*c)) else {
        return false;
    };
    !first.is_null() && class.iter().all(|c| columns.get(*c).is_some_and(|v| order::same(v, first)))
}

/// A row of a group: the row, its values and its multiplicity.
type GroupRow<'a> = (&'a Row, Vec<Value<'a>>, i128);

/// The rows of `bag` grouped by the values of `key` (missing columns read as `NULL`), each group's rows
/// in the order of their encodings, with their values.
fn groups<'a>(bag: &'a Bag, key: &[usize]) -> BTreeMap<Row, Vec<GroupRow<'a>>> {
    let mut groups: BTreeMap<Row, Vec<GroupRow<'_>>> = BTreeMap::new();
    for (row, multiplicity) in bag {
        let columns = values(row);
        let key_values: Vec<Value<'_>> =
            key.iter().map(|c| columns.get(*c).copied().unwrap_or(Value::Null)).collect();
        groups.entry(value::row(&key_values)).or_default().push((row, columns, *multiplicity));
    }
    groups
}

/// Checks the multiplicities of a group: none negative, and their total an `i64`.
fn check_group(rows: &[GroupRow<'_>], operator: &str) -> Result<(), EvalError> {
    if let Some((row, _, multiplicity)) = rows.iter().find(|(_, _, m)| *m < 0) {
        return Err(negative(row, *multiplicity, operator));
    }
    let mut total: i128 = 0;
    for (_, _, multiplicity) in rows {
        total = total.checked_add(*multiplicity).ok_or(EvalError::MultiplicityOutOfRange)?;
    }
    if Diff::try_from(total).is_err() {
        return Err(EvalError::MultiplicityOutOfRange);
    }
    Ok(())
}

/// One row per group: the key's values, then each aggregate of the group's rows.
fn reduce(bag: &Bag, group_key: &[usize], aggregates: &[AggregateExpr]) -> Result<Bag, EvalError> {
    let mut out = Bag::new();
    for (key, rows) in groups(bag, group_key) {
        check_group(&rows, "Reduce")?;
        let mut output = values(&key);
        for aggregate in aggregates {
            let inputs: Vec<(Value<'_>, i128)> = rows
                .iter()
                .map(|(_, columns, m)| (columns.get(aggregate.column).copied().unwrap_or(Value::Null), *m))
                .collect();
            output.push(aggregate::aggregate(aggregate.func, &inputs)?);
        }
        add(&mut out, value::row(&output), 1)?;
    }
    Ok(out)
}

/// Per group, the rows ranked `offset..offset + limit` by `order_key` (then by the whole row).
fn top_k(
    bag: &Bag,
    group_key: &[usize],
    order_key: &[ColumnOrder],
    limit: Option<usize>,
    offset: usize,
) -> Result<Bag, EvalError> {
    let mut out = Bag::new();
    for (_, rows) in groups(bag, group_key) {
        check_group(&rows, "TopK")?;
        let ranked: Vec<(Row, u64)> = rows
            .iter()
            .map(|(row, _, m)| (Row::clone(row), u64::try_from(*m).expect("checked: positive and an i64")))
            .collect();
        let ranked = finish::sorted(order_key, ranked);
        for (row, count) in finish::slice(ranked, offset, limit) {
            add(&mut out, row, i128::from(count))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{AggregateExpr, AggregateFunc, ColumnOrder};
    use crate::row::Datum;

    fn datums(row: &Row) -> Vec<Datum<'_>> {
        row.iter().collect()
    }

    fn r(values: &[i64]) -> Row {
        Row::pack(values.iter().map(|v| Datum::Int64(*v)))
    }

    fn get(n: u64) -> Box<Plan> {
        Box::new(Plan::get(GlobalId::User(n)))
    }

    #[test]
    fn reference_semantics_table() {
        let inputs = BTreeMap::from([
            (GlobalId::User(1), consolidate([(r(&[1, 10]), 1), (r(&[1, 20]), 2), (r(&[2, 30]), 1)])),
            (GlobalId::User(2), consolidate([(r(&[1, 7]), 1), (r(&[3, 9]), 1)])),
            (GlobalId::User(3), consolidate([(r(&[5, 5]), -1)])),
            (GlobalId::User(4), consolidate([(r(&[1]), i64::MAX)])),
        ]);
        let count_sum = vec![
            AggregateExpr { func: AggregateFunc::Count, column: 1 },
            AggregateExpr { func: AggregateFunc::Sum, column: 1 },
        ];
        let twice = |n| Plan::Union { inputs: vec![*get(n), *get(n)] };
        let cases: Vec<(&str, Plan, Result<Multiset, EvalError>)> = vec![
            (
                "join matches equal keys and multiplies multiplicities",
                Plan::Join { inputs: vec![*get(1), *get(2)], equivalences: vec![vec![0, 2]] },
                Ok(consolidate([(r(&[1, 10, 1, 7]), 1), (r(&[1, 20, 1, 7]), 2)])),
            ),
            (
                "reduce counts and sums with multiplicity",
                Plan::Reduce { input: get(1), group_key: vec![0], aggregates: count_sum.clone() },
                Ok(consolidate([(r(&[1, 3, 50]), 1), (r(&[2, 1, 30]), 1)])),
            ),
            (
                "a global reduce over nothing has no row",
                Plan::Reduce {
                    input: Box::new(Plan::Threshold { input: get(3) }),
                    group_key: vec![],
                    aggregates: count_sum.clone(),
                },
                Ok(Multiset::new()),
            ),
            (
                "top-1 per group by descending value",
                Plan::TopK {
                    input: get(1),
                    group_key: vec![0],
                    order_key: vec![ColumnOrder::desc(1)],
                    limit: Some(1),
                    offset: 0,
                },
                Ok(consolidate([(r(&[1, 20]), 1), (r(&[2, 30]), 1)])),
            ),
            (
                "top-k counts multiplicities into its limit and offset",
                Plan::TopK {
                    input: get(1),
                    group_key: vec![],
                    order_key: vec![ColumnOrder::asc(1)],
                    limit: Some(2),
                    offset: 1,
                },
                Ok(consolidate([(r(&[1, 20]), 2)])),
            ),
            (
                "distinct of a negative multiplicity is an error",
                Plan::Distinct { input: get(3) },
                Err(EvalError::Internal(String::new())),
            ),
            (
                "threshold drops negative multiplicities",
                Plan::Threshold { input: get(3) },
                Ok(Multiset::new()),
            ),
            (
                "reduce of a negative multiplicity is an error",
                Plan::Reduce { input: get(3), group_key: vec![0], aggregates: vec![] },
                Err(EvalError::Internal(String::new())),
            ),
            (
                "union with its negation is empty",
                Plan::Union { inputs: vec![*get(1), Plan::Negate { input: get(1) }] },
                Ok(Multiset::new()),
            ),
            (
                "a result multiplicity beyond i64 is an error",
                twice(4),
                Err(EvalError::MultiplicityOutOfRange),
            ),
            (
                "an intermediate multiplicity beyond i64 is not",
                Plan::Union { inputs: vec![twice(4), Plan::Negate { input: get(4) }] },
                Ok(consolidate([(r(&[1]), i64::MAX)])),
            ),
            (
                "a join product beyond i64 is exact until observed",
                Plan::Distinct {
                    input: Box::new(Plan::Join { inputs: vec![*get(4), *get(4)], equivalences: vec![] }),
                },
                Ok(consolidate([(r(&[1, 1]), 1)])),
            ),
            (
                "a join product beyond i64 is an error in the result",
                Plan::Join { inputs: vec![*get(4), *get(4)], equivalences: vec![vec![0, 1]] },
                Err(EvalError::MultiplicityOutOfRange),
            ),
            (
                "a reduce group of more than i64::MAX rows is an error",
                Plan::Reduce { input: Box::new(twice(4)), group_key: vec![], aggregates: vec![] },
                Err(EvalError::MultiplicityOutOfRange),
            ),
            (
                "a top-k group of more than i64::MAX rows is an error",
                Plan::TopK {
                    input: Box::new(twice(4)),
                    group_key: vec![],
                    order_key: vec![],
                    limit: Some(1),
                    offset: 0,
                },
                Err(EvalError::MultiplicityOutOfRange),
            ),
            (
                "a product beyond 128 bits is an error",
                Plan::Distinct {
                    input: Box::new(Plan::Join {
                        inputs: vec![*get(4), *get(4), *get(4)],
                        equivalences: vec![],
                    }),
                },
                Err(EvalError::MultiplicityOutOfRange),
            ),
        ];
        for (name, plan, expected) in cases {
            let result = evaluate(&plan, &inputs);
            match (&result, &expected) {
                (Err(EvalError::Internal(_)), Err(EvalError::Internal(_))) => {}
                _ => assert_eq!(result, expected, "{name}"),
            }
        }
    }

    #[test]
    fn joins_skip_null_keys_and_match_by_identity() {
        let nan = Row::pack([Datum::float64(f64::NAN)]);
        let null = Row::pack([Datum::Null]);
        let inputs =
            BTreeMap::from([(GlobalId::User(1), consolidate([(nan.clone(), 1), (null.clone(), 1)]))]);
        let plan = Plan::Join { inputs: vec![*get(1), *get(1)], equivalences: vec![vec![0, 1]] };
        let out = evaluate(&plan, &inputs).unwrap();
        assert_eq!(out.keys().map(datums).collect::<Vec<_>>(), vec![vec![Datum::float64(f64::NAN); 2]]);
    }
}
