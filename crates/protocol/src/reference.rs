//! The reference interpreter of the plan IR: a naive, obviously-correct evaluation of a [`Plan`] over
//! multisets of rows at one point in time.
//!
//! This is the specification every renderer is tested against (the replica's differential operators, the
//! simulator's model replica, the simulator's oracle). It is deliberately simple: it materialises every
//! intermediate result, and joins by nested loops. It is not for production use.
//!
//! Errors: evaluation fails with the first [`EvalError`] any row produces anywhere in the plan, in the
//! plan's own evaluation order (predicates left to right, short-circuiting at the first one that is not
//! `true`). A replica's answer for a collection is an error exactly when this function errs on the same
//! inputs.
//!
//! **Invariant:** results are consolidated: no row with a zero multiplicity.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use crate::Diff;
use crate::dataflow::DataflowDescription;
use crate::expr::EvalError;
use crate::id::GlobalId;
use crate::plan::{Plan, compare_datums};
use crate::row::{Datum, Row, RowPacker};

/// A consolidated multiset of rows: each row with its non-zero multiplicity.
pub type Multiset = BTreeMap<Row, Diff>;

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
pub fn consolidate(updates: impl IntoIterator<Item = (Row, Diff)>) -> Multiset {
    let mut out = Multiset::new();
    for (row, diff) in updates {
        add(&mut out, row, diff);
    }
    out
}

fn add(multiset: &mut Multiset, row: Row, diff: Diff) {
    if diff == 0 {
        return;
    }
    match multiset.entry(row) {
        Entry::Vacant(entry) => {
            entry.insert(diff);
        }
        Entry::Occupied(mut entry) => {
            *entry.get_mut() += diff;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }
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
    match plan {
        Plan::Get { id } => inputs
            .get(id)
            .cloned()
            .ok_or_else(|| EvalError::Internal(format!("reference: no input for {id}"))),
        Plan::Constant { rows, .. } => Ok(consolidate(rows.iter().cloned())),
        Plan::Map { input, exprs } => map_rows(evaluate(input, inputs)?, |datums, packer| {
            let mut all = datums.to_vec();
            for expr in exprs {
                let datum = expr.eval(&all)?;
                all.push(datum);
            }
            packer.extend(all);
            Ok(true)
        }),
        Plan::Filter { input, predicates } => map_rows(evaluate(input, inputs)?, |datums, packer| {
            for predicate in predicates {
                if predicate.eval(datums)? != Datum::Bool(true) {
                    return Ok(false);
                }
            }
            packer.extend(datums.iter().copied());
            Ok(true)
        }),
        Plan::Project { input, outputs } => map_rows(evaluate(input, inputs)?, |datums, packer| {
            for column in outputs {
                let datum =
                    datums.get(*column).ok_or_else(|| EvalError::Internal(format!("project {column}")))?;
                packer.push(*datum);
            }
            Ok(true)
        }),
        Plan::Join { inputs: join_inputs, equivalences } => {
            let evaluated: Vec<Multiset> =
                join_inputs.iter().map(|input| evaluate(input, inputs)).collect::<Result<_, _>>()?;
            let mut product: Vec<(Vec<Datum<'_>>, Diff)> = vec![(Vec::new(), 1)];
            for multiset in &evaluated {
                let mut next = Vec::new();
                for (prefix, prefix_diff) in &product {
                    for (row, diff) in multiset {
                        let mut datums = prefix.clone();
                        datums.extend(row.iter());
                        next.push((datums, prefix_diff * diff));
                    }
                }
                product = next;
            }
            let mut out = Multiset::new();
            let mut packer = RowPacker::new();
            for (datums, diff) in product {
                let matches = equivalences.iter().all(|class| {
                    let first = datums.get(class[0]).copied().unwrap_or(Datum::Null);
                    !first.is_null() && class.iter().all(|c| datums.get(*c).copied() == Some(first))
                });
                if matches {
                    packer.extend(datums);
                    add(&mut out, packer.finish(), diff);
                }
            }
            Ok(out)
        }
        Plan::Reduce { input, group_key, aggregates } => {
            let input = evaluate(input, inputs)?;
            let mut groups: BTreeMap<Row, Vec<(&Row, Diff)>> = BTreeMap::new();
            for (row, diff) in &input {
                let datums = row.unpack();
                let key = Row::pack(group_key.iter().map(|c| datums.get(*c).copied().unwrap_or(Datum::Null)));
                groups.entry(key).or_default().push((row, *diff));
            }
            let mut out = Multiset::new();
            for (key, rows) in groups {
                let mut packer = RowPacker::new();
                packer.extend_by_row(&key);
                for aggregate in aggregates {
                    let values = rows
                        .iter()
                        .map(|(row, diff)| (row.get(aggregate.column).unwrap_or(Datum::Null), *diff));
                    // A group's rows must all have positive multiplicity, whatever the function.
                    if let Some((row, diff)) = rows.iter().find(|(_, d)| *d < 0) {
                        return Err(negative(row, *diff, "Reduce"));
                    }
                    packer.push(aggregate.func.eval(values)?);
                }
                if aggregates.is_empty()
                    && let Some((row, diff)) = rows.iter().find(|(_, d)| *d < 0)
                {
                    return Err(negative(row, *diff, "Reduce"));
                }
                add(&mut out, packer.finish(), 1);
            }
            Ok(out)
        }
        Plan::Distinct { input } => {
            let input = evaluate(input, inputs)?;
            let mut out = Multiset::new();
            for (row, diff) in input {
                if diff < 0 {
                    return Err(negative(&row, diff, "Distinct"));
                }
                out.insert(row, 1);
            }
            Ok(out)
        }
        Plan::Union { inputs: union_inputs } => {
            let mut out = Multiset::new();
            for input in union_inputs {
                for (row, diff) in evaluate(input, inputs)? {
                    add(&mut out, row, diff);
                }
            }
            Ok(out)
        }
        Plan::Negate { input } => {
            Ok(evaluate(input, inputs)?.into_iter().map(|(row, diff)| (row, -diff)).collect())
        }
        Plan::Threshold { input } => {
            Ok(evaluate(input, inputs)?.into_iter().filter(|(_, diff)| *diff > 0).collect())
        }
        Plan::TopK { input, group_key, order_key, limit, offset } => {
            let input = evaluate(input, inputs)?;
            type Ranked<'a> = Vec<(Vec<Datum<'a>>, &'a Row, Diff)>;
            let mut groups: BTreeMap<Row, Ranked<'_>> = BTreeMap::new();
            for (row, diff) in &input {
                if *diff < 0 {
                    return Err(negative(row, *diff, "TopK"));
                }
                let datums = row.unpack();
                let key = Row::pack(group_key.iter().map(|c| datums.get(*c).copied().unwrap_or(Datum::Null)));
                groups.entry(key).or_default().push((datums, row, *diff));
            }
            let mut out = Multiset::new();
            for (_, mut rows) in groups {
                rows.sort_by(|(a, _, _), (b, _, _)| compare_datums(order_key, a, b));
                // Negative multiplicities were rejected above.
                let ranked = rows.into_iter().map(|(_, row, diff)| (row, diff as u64));
                for (row, count) in crate::plan::slice_ranked(ranked, *offset, *limit) {
                    add(&mut out, row.clone(), count as Diff);
                }
            }
            Ok(out)
        }
        Plan::ArrangeBy { input, .. } => evaluate(input, inputs),
    }
}

fn negative(row: &Row, diff: Diff, operator: &str) -> EvalError {
    EvalError::Internal(format!("{operator}: negative multiplicity {diff} for row {row}"))
}

/// Applies a row-at-a-time function: it pushes the output datums into the packer and says whether to keep
/// the row.
fn map_rows(
    input: Multiset,
    mut f: impl FnMut(&[Datum<'_>], &mut RowPacker) -> Result<bool, EvalError>,
) -> Result<Multiset, EvalError> {
    let mut out = Multiset::new();
    let mut packer = RowPacker::new();
    for (row, diff) in &input {
        let datums = row.unpack();
        packer.clear();
        if f(&datums, &mut packer)? {
            add(&mut out, packer.finish(), *diff);
        }
    }
    Ok(out)
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
    let mut scope = inputs.clone();
    for object in &df.objects_to_build {
        let contents = evaluate(&object.plan, &scope)?;
        scope.insert(object.id, contents);
    }
    let mut out = BTreeMap::new();
    for (id, export) in &df.index_exports {
        out.insert(*id, scope.get(&export.on_id).cloned().unwrap_or_default());
    }
    for (id, sink) in &df.sink_exports {
        // Every sink kind emits its object's contents; the connection only decides where they go.
        out.insert(*id, scope.get(&sink.from).cloned().unwrap_or_default());
    }
    Ok(out)
}

/// Applies a peek's map/filter/project to a collection's contents (the replica-side step of a peek, before
/// the finishing).
///
/// # Examples
/// ```
/// use protocol::{Datum, MapFilterProject, Row};
/// use protocol::reference::{consolidate, map_filter_project};
/// let r = |i| Row::pack([Datum::Int64(i), Datum::Int64(i * 10)]);
/// let out = map_filter_project(&MapFilterProject::new(2).project([1]), &consolidate([(r(1), 1), (r(2), 3)])).unwrap();
/// assert_eq!(out.len(), 2);
/// ```
pub fn map_filter_project(mfp: &crate::MapFilterProject, input: &Multiset) -> Result<Multiset, EvalError> {
    let mut out = Multiset::new();
    for (row, diff) in input {
        if let Some(row) = mfp.apply(row)? {
            add(&mut out, row, *diff);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{AggregateExpr, AggregateFunc, ColumnOrder};

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
        ]);
        let cases: Vec<(&str, Plan, Result<Multiset, ()>)> = vec![
            (
                "join matches equal keys and multiplies multiplicities",
                Plan::Join { inputs: vec![*get(1), *get(2)], equivalences: vec![vec![0, 2]] },
                Ok(consolidate([(r(&[1, 10, 1, 7]), 1), (r(&[1, 20, 1, 7]), 2)])),
            ),
            (
                "reduce counts and sums with multiplicity",
                Plan::Reduce {
                    input: get(1),
                    group_key: vec![0],
                    aggregates: vec![
                        AggregateExpr { func: AggregateFunc::Count, column: 1 },
                        AggregateExpr { func: AggregateFunc::Sum, column: 1 },
                    ],
                },
                Ok(consolidate([(r(&[1, 3, 50]), 1), (r(&[2, 1, 30]), 1)])),
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
            ("distinct of a negative multiplicity is an error", Plan::Distinct { input: get(3) }, Err(())),
            (
                "threshold drops negative multiplicities",
                Plan::Threshold { input: get(3) },
                Ok(Multiset::new()),
            ),
            (
                "reduce of a negative multiplicity is an error",
                Plan::Reduce { input: get(3), group_key: vec![0], aggregates: vec![] },
                Err(()),
            ),
            (
                "union with its negation is empty",
                Plan::Union { inputs: vec![*get(1), Plan::Negate { input: get(1) }] },
                Ok(Multiset::new()),
            ),
        ];
        for (name, plan, expected) in cases {
            let result = evaluate(&plan, &inputs).map_err(|_| ());
            assert_eq!(result, expected, "{name}");
        }
    }
}
