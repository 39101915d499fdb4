//! Rendering: turns the plan IR of a [`DataflowDescription`] into differential operators over [`Row`].
//!
//! **What this is.** [`render_plan`] renders one [`Plan`] into a pair of collections: the *oks* (the
//! rows of the plan) and, pushed into [`RenderContext::errs`], the *errors* its operators produced. Every
//! collection is a `VecCollection<'s, u64, Row, CheckedDiff>` (see `diff.rs`: exact 128-bit
//! multiplicities, so sums and join products never wrap). Arrangements appear only where an operator needs
//! one (join inputs, reduce-like operators) and at index exports (built by the worker, not here).
//!
//! **What this is not.** It does not own traces, inputs or sinks: the worker (`worker.rs`) creates the
//! inputs (storage sources, constants, index imports), hands their collections in through
//! [`RenderContext::collections`], and arranges the exported objects.
//!
//! **Semantics.** Each operator matches `protocol::reference::evaluate`, the reference interpreter:
//! - consecutive `Map`/`Filter`/`Project` nodes are fused into one pass ([`RowOp`]s applied in the plan's
//!   own order, so a filter below a map still stops the map from erring on the rows it removes);
//! - `Join` is a chain of binary `join_core`s on inputs arranged by the columns of the equivalence classes
//!   they share with the prefix; rows with a `NULL` in any equivalence-class column are removed first
//!   (they can never match), and classes within one input are applied as filters on that input;
//! - `Reduce`, `Distinct` and `TopK` see each group's consolidated rows (in `Row` order, as the reference
//!   does, so float sums add in the same order) and report a negative multiplicity as an error;
//! - a `Reduce` with no aggregate or a single `count` is abelian: it is differential's `count` over the
//!   group key (constant work per group and time), with the reference's "no row of a group is negative"
//!   condition checked per row by [`check_non_negative`] (a hash map of accumulated multiplicities). A
//!   `sum` is not: the same check would keep every distinct input row, which costs more memory than the
//!   general reduce's arrangement of them (48 bytes a row, up to four times that between consolidations,
//!   against 26 for a two-integer row in the reduce's slab; an abelian sum was tried with the check's
//!   earlier form, and `controller.hydration_peak_rss_sum` with concurrency 1 rose to 572 MiB from 477–489);
//! - `Threshold` keeps positive multiplicities; `Negate`, `Union` and `ArrangeBy` are what they say.
//!
//! **Multiplicities.** Exact inside the dataflow; checked against `i64` where the IR observes them: a
//! `Reduce` or `TopK` group with more rows than an `i64` counts is an error of that group ([`check_group`],
//! and in the count path the count itself), a row an index holds beyond `i64` is an error of the peek that
//! reads it (`worker.rs`), a sink's update beyond `i64` an error of the sink ([`checked_updates`]). A
//! multiplicity that left 128 bits is `CheckedDiff::OVERFLOW`, which every one of these places treats as an
//! error too (and `Distinct`/`Threshold` as well), so no answer is computed from it.
//!
//! **Errors.** A data error becomes an update of the error collection: a row
//! `[Text(message), Bytes(row that caused it)]` with the multiplicity of the row that caused it. The message
//! names the operator (a per-dataflow operator number), so errors of different rows or operators never
//! cancel each other. The dataflow's answer is an error exactly when its error collection is non-empty,
//! which is exactly when the reference errs (operators downstream of an error see only the ok rows, but
//! the error itself already makes the answer an error).
//!
//! **Tests.** `tests/it/operators.rs` checks every operator against the reference on random inputs and
//! update sequences with 1 and 2 workers and 2 processes, multiplicities beyond `i64` included;
//! `tests/it/sqlite.rs` checks random plans against SQLite.

use std::collections::BTreeMap;

use differential_dataflow::difference::{IsZero, Semigroup};
use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::implementations::{KeySpine, ValSpine};
use differential_dataflow::{AsCollection, VecCollection};
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;

pub(crate) use crate::diff::CheckedDiff;
use protocol::{
    AggregateExpr, AggregateFunc, DataflowDescription, Datum, EvalError, GlobalId, Plan, RelationType, Row,
    RowPacker, RowRef, ScalarExpr, ScalarType, compare_datums,
};

/// The time of every collection.
pub(crate) type Time = u64;
/// The multiplicity of an update where it enters or leaves a dataflow (storage, constants, peeks,
/// sinks): the protocol's.
pub(crate) type Diff = protocol::Diff;
/// A collection of rows.
pub(crate) type Coll<'s> = VecCollection<'s, Time, Row, CheckedDiff>;
/// The updates of a collection, as timely sends them.
pub(crate) type Updates = Vec<(Row, Time, CheckedDiff)>;
/// Updates as the protocol carries them (`i64` multiplicities): what enters and leaves a dataflow.
pub(crate) type ProtocolUpdates = Vec<(Row, Time, Diff)>;
/// An input of rows.
pub(crate) type RowInput = differential_dataflow::input::InputSession<Time, Row, CheckedDiff>;
/// The trace of an index export: `(key, full row)`.
pub(crate) type OkTrace = TraceAgent<ValSpine<Row, Row, Time, CheckedDiff>>;
/// The trace of a dataflow's errors (a full copy on every worker).
pub(crate) type ErrTrace = TraceAgent<KeySpine<Row, Time, CheckedDiff>>;
/// An arranged index.
pub(crate) type OkArranged<'s> = Arranged<'s, OkTrace>;

/// What rendering needs to know, and what it produces besides each object's rows.
pub(crate) struct RenderContext<'s> {
    /// The rows of every import and every object rendered so far.
    pub collections: BTreeMap<GlobalId, Coll<'s>>,
    /// Error collections produced by the operators rendered so far.
    pub errs: Vec<Coll<'s>>,
    /// Numbers operators, so that error messages (and so error rows) of different operators differ.
    next_operator: u64,
    /// The dataflow's `Constant` plans, rendered as inputs the worker fills when the dataflow is scheduled.
    pub constants: Vec<(Vec<(Row, Diff)>, Coll<'s>)>,
    /// Makes a new empty input collection for a constant (the worker owns the input handle).
    pub new_constant: Box<dyn FnMut() -> Coll<'s> + 's>,
    /// The arity of every import and object (from [`types`]).
    pub arities: BTreeMap<GlobalId, usize>,
    /// The type of every import and object (see [`types`]).
    pub types: BTreeMap<GlobalId, RelationType>,
}

impl<'s> RenderContext<'s> {
    /// A context over the given imported collections.
    pub fn new(
        collections: BTreeMap<GlobalId, Coll<'s>>,
        new_constant: Box<dyn FnMut() -> Coll<'s> + 's>,
        types: BTreeMap<GlobalId, RelationType>,
    ) -> Self {
        let arities = types.iter().map(|(id, typ)| (*id, typ.arity())).collect();
        RenderContext {
            collections,
            errs: Vec::new(),
            next_operator: 0,
            constants: Vec::new(),
            new_constant,
            arities,
            types,
        }
    }

    fn operator(&mut self) -> u64 {
        self.next_operator += 1;
        self.next_operator
    }
}

/// Renders every object of `desc` in order; each becomes available to later objects' `Get`s.
pub(crate) fn render_objects<'s>(desc: &DataflowDescription<Time>, ctx: &mut RenderContext<'s>) {
    for object in &desc.objects_to_build {
        let rows = render_plan(&object.plan, ctx);
        ctx.collections.insert(object.id, rows);
    }
}

/// Renders one plan; errors go to `ctx.errs`.
pub(crate) fn render_plan<'s>(plan: &Plan, ctx: &mut RenderContext<'s>) -> Coll<'s> {
    match plan {
        Plan::Get { id } => {
            let coll = ctx.collections.get(id);
            assert!(coll.is_some(), "validated dataflow: Get of {id} resolves");
            coll.expect("asserted").clone()
        }
        Plan::Constant { rows, .. } => {
            let coll = (ctx.new_constant)();
            ctx.constants.push((rows.clone(), coll.clone()));
            coll
        }
        Plan::Map { .. } | Plan::Filter { .. } | Plan::Project { .. } => {
            let mut ops = Vec::new();
            let mut current = plan;
            loop {
                match current {
                    Plan::Map { input, exprs } => {
                        ops.push(RowOp::Map(exprs.clone()));
                        current = input;
                    }
                    Plan::Filter { input, predicates } => {
                        ops.push(RowOp::Filter(predicates.clone()));
                        current = input;
                    }
                    Plan::Project { input, outputs } => {
                        ops.push(RowOp::Project(outputs.clone()));
                        current = input;
                    }
                    _ => break,
                }
            }
            // Collected top-down; applied bottom-up.
            ops.reverse();
            let input = render_plan(current, ctx);
            let operator = ctx.operator();
            let (oks, errs) = map_rows(input, "MapFilterProject", move |row, packer| {
                apply_row_ops(&ops, row, packer).map_err(|(error, input)| {
                    error_row(&format!("{error} (operator {operator}: MapFilterProject)"), input.as_row_ref())
                })
            });
            ctx.errs.push(errs);
            oks
        }
        Plan::Join { inputs, equivalences } => render_join(inputs, equivalences, ctx),
        Plan::Reduce { input, group_key, aggregates }
            if aggregates.len() <= 1
                && aggregates
                    .iter()
                    .all(|a| matches!(a.func, AggregateFunc::Count | AggregateFunc::CountRows)) =>
        {
            // A count of a column that is never NULL counts rows: a plain count, like a hand-written one;
            // so does `count(*)`, which reads no column.
            let column = aggregates.first().map(|a| a.column);
            let count_rows = aggregates.first().is_some_and(|a| a.func == AggregateFunc::CountRows);
            let nullable = !count_rows
                && column.is_some_and(|column| {
                    let typ = input.typ(&|id| ctx.types.get(&id).cloned());
                    typ.map_or(true, |typ| typ.column_types.get(column).is_none_or(|c| c.nullable))
                });
            let input = render_plan(input, ctx);
            let operator = ctx.operator();
            render_count(input, group_key.clone(), column, nullable, operator, ctx)
        }
        Plan::Reduce { input: reduce_input, group_key, aggregates }
            if accumulable(reduce_input, aggregates, ctx).is_some() =>
        {
            let accumulated = accumulable(reduce_input, aggregates, ctx).expect("checked by the guard");
            let input = render_plan(reduce_input, ctx);
            let operator = ctx.operator();
            render_accumulable(input, group_key.clone(), accumulated, operator, ctx)
        }
        Plan::Reduce { input, group_key, aggregates } => {
            let input = render_plan(input, ctx);
            let operator = ctx.operator();
            let group_key = group_key.clone();
            let aggregates = aggregates.clone();
            let keyed = input.map(move |row| (project_row(&row, &group_key), row));
            reduce_rows(keyed, "Reduce", ctx, move |key, values, out| {
                reduce_group(operator, &aggregates, key, values, out)
            })
        }
        Plan::Distinct { input } => {
            let input = render_plan(input, ctx);
            let operator = ctx.operator();
            let keyed = input.map(|row| (row, Row::EMPTY));
            reduce_rows(keyed, "Distinct", ctx, move |row, values, out| {
                let diff = CheckedDiff::sum(values.iter().map(|(_, d)| d));
                if diff.is_overflow() {
                    out.push((Err(overflow_error(operator, "Distinct", row.as_row_ref())), CheckedDiff::ONE));
                } else if diff.is_negative() {
                    out.push((
                        Err(negative_error(operator, "Distinct", row.as_row_ref(), diff)),
                        CheckedDiff::ONE,
                    ));
                } else if diff.is_positive() {
                    out.push((Ok(row.clone()), CheckedDiff::ONE));
                }
            })
        }
        Plan::Threshold { input } => {
            let input = render_plan(input, ctx);
            let operator = ctx.operator();
            let keyed = input.map(|row| (row, Row::EMPTY));
            reduce_rows(keyed, "Threshold", ctx, move |row, values, out| {
                let diff = CheckedDiff::sum(values.iter().map(|(_, d)| d));
                if diff.is_overflow() {
                    out.push((
                        Err(overflow_error(operator, "Threshold", row.as_row_ref())),
                        CheckedDiff::ONE,
                    ));
                } else if diff.is_positive() {
                    out.push((Ok(row.clone()), diff));
                }
            })
        }
        Plan::Union { inputs } => {
            let mut rendered: Vec<Coll<'s>> = inputs.iter().map(|input| render_plan(input, ctx)).collect();
            let first = rendered.remove(0);
            if rendered.is_empty() { first } else { first.concatenate(rendered) }
        }
        Plan::Negate { input } => render_plan(input, ctx).negate(),
        Plan::TopK { input, group_key, order_key, limit, offset } => {
            let input = render_plan(input, ctx);
            let operator = ctx.operator();
            let group_key = group_key.clone();
            let order_key = order_key.clone();
            let (limit, offset) = (*limit, *offset);
            let keyed = input.map(move |row| (project_row(&row, &group_key), row));
            reduce_rows(keyed, "TopK", ctx, move |key, values, out| {
                if let Some(error) = check_group(operator, "TopK", key, values) {
                    out.push((Err(error), CheckedDiff::ONE));
                    return;
                }
                let mut ranked: Vec<(Vec<Datum<'_>>, RowRef<'_>, u64)> = values
                    .iter()
                    .map(|(row, diff)| (row.unpack(), *row, diff.to_count().expect("checked group")))
                    .collect();
                ranked.sort_by(|(a, _, _), (b, _, _)| compare_datums(&order_key, a, b));
                let ranked = ranked.into_iter().map(|(_, row, count)| (row, count));
                for (row, count) in protocol::slice_ranked(ranked, offset, limit) {
                    let count = i64::try_from(count).expect("at most a checked group's total");
                    out.push((Ok(row.to_row()), CheckedDiff::from(count)));
                }
            })
        }
        Plan::ArrangeBy { input, .. } => render_plan(input, ctx),
    }
}

/// A `Reduce` whose aggregates are at most one `count`: the group key, then the count if asked for.
///
/// Counting is abelian, so groups are maintained as accumulated `(rows, non-null values)` differences
/// (differential's `count`, constant work per group and time) instead of by re-reading every row of a
/// group. The reference's other condition — no row of a group with a negative multiplicity — is checked
/// per row by [`check_non_negative`].
fn render_count<'s>(
    input: Coll<'s>,
    group_key: Vec<usize>,
    column: Option<usize>,
    nullable: bool,
    operator: u64,
    ctx: &mut RenderContext<'s>,
) -> Coll<'s> {
    ctx.errs.push(check_non_negative(input.clone(), operator, "Reduce"));
    let output = move |key: Row, rows: CheckedDiff, non_null: CheckedDiff| -> Option<Result<Row, Row>> {
        // A group whose rows do not add up to a positive count has a negative row: an error, above.
        // One whose count is not an i64 (or overflowed) is an error here.
        let (Some(rows), Some(non_null)) = (rows.to_i64(), non_null.to_i64()) else {
            return Some(Err(out_of_range_error(operator, "Reduce", key.as_row_ref())));
        };
        (rows > 0).then(|| {
            let mut packer = RowPacker::new();
            packer.extend_by_row(&key);
            if column.is_some() {
                packer.push(Datum::Int64(non_null));
            }
            Ok(packer.finish())
        })
    };
    // The counts become rows or errors in one pass.
    let (oks, errs) = match column {
        Some(column) if nullable => {
            let counts = input
                .explode(move |row| {
                    let non_null = i64::from(row.iter().nth(column).is_some_and(|d| !d.is_null()));
                    Some((project_row(&row, &group_key), (CheckedDiff::ONE, CheckedDiff::from(non_null))))
                })
                .count_core::<CheckedDiff>();
            split_results(counts, "Reduce", move |(key, (rows, non_null))| output(key, rows, non_null))
        }
        _ => {
            let counts = input.map(move |row| project_row(&row, &group_key)).count_core::<CheckedDiff>();
            split_results(counts, "Reduce", move |(key, rows)| output(key, rows, rows))
        }
    };
    ctx.errs.push(errs);
    oks
}

/// How one aggregate of an accumulable `Reduce` is kept (see [`render_accumulable`]).
#[derive(Debug, Clone, Copy)]
enum Accumulated {
    /// `count(column)`: the non-null values.
    Count { column: usize },
    /// `count(*)`: the rows.
    CountRows,
    /// `sum` of integers: the exact sum and the non-null values.
    SumInt { column: usize },
    /// `sum` of decimals of a type of scale `scale`: the exact sum of the mantissas at that scale, and the
    /// non-null values.
    SumDecimal { column: usize, scale: u8 },
    /// `avg` of integers or decimals (`scale` 0 for integers): as `SumDecimal`, divided at the end.
    Avg { column: usize, scale: u8 },
}

impl Accumulated {
    /// How many accumulators it takes.
    fn width(self) -> usize {
        match self {
            Accumulated::CountRows => 0,
            Accumulated::Count { .. } => 1,
            _ => 2,
        }
    }
}

/// The aggregates of a `Reduce` as [`Accumulated`]s, if every one accumulates exactly (counts, and sums
/// and averages of integers and decimals: not floats, whose sum depends on its order, nor `min`/`max`).
fn accumulable(
    input: &Plan,
    aggregates: &[AggregateExpr],
    ctx: &RenderContext<'_>,
) -> Option<Vec<Accumulated>> {
    if aggregates.is_empty() {
        return None;
    }
    let typ = input.typ(&|id| ctx.types.get(&id).cloned()).ok()?;
    aggregates
        .iter()
        .map(|aggregate| {
            let column = aggregate.column;
            let scalar = typ.column_types.get(column).map(|c| c.scalar_type);
            match (aggregate.func, scalar) {
                (AggregateFunc::CountRows, _) => Some(Accumulated::CountRows),
                (AggregateFunc::Count, Some(_)) => Some(Accumulated::Count { column }),
                (AggregateFunc::Sum, Some(ScalarType::Int64)) => Some(Accumulated::SumInt { column }),
                (AggregateFunc::Sum, Some(ScalarType::Decimal { scale })) => {
                    Some(Accumulated::SumDecimal { column, scale })
                }
                (AggregateFunc::Avg, Some(ScalarType::Int64)) => Some(Accumulated::Avg { column, scale: 0 }),
                (AggregateFunc::Avg, Some(ScalarType::Decimal { scale })) => {
                    Some(Accumulated::Avg { column, scale })
                }
                _ => None,
            }
        })
        .collect()
}

/// The accumulators of one input row: its count (one), then each aggregate's ([`Accumulated::width`]).
fn accumulators(row: &Row, accumulated: &[Accumulated]) -> Vec<CheckedDiff> {
    let datums: Vec<Datum<'_>> = row.iter().collect();
    let mut out = Vec::with_capacity(1 + 2 * accumulated.len());
    out.push(CheckedDiff::ONE);
    let present = |column: usize| datums.get(column).is_some_and(|d| !d.is_null());
    for aggregate in accumulated {
        match *aggregate {
            Accumulated::CountRows => {}
            Accumulated::Count { column } => out.push(CheckedDiff::from(i64::from(present(column)))),
            Accumulated::SumInt { column } => {
                let value = match datums.get(column) {
                    Some(Datum::Int64(i)) => i128::from(*i),
                    _ => 0,
                };
                out.push(CheckedDiff::from_i128(value));
                out.push(CheckedDiff::from(i64::from(present(column))));
            }
            Accumulated::SumDecimal { column, scale } | Accumulated::Avg { column, scale } => {
                let mantissa = match datums.get(column) {
                    // A value of the column has at most the type's scale: exact at that scale (beyond 128
                    // bits is an overflow, which makes the group's answer an error).
                    Some(Datum::Decimal(d)) => 10i128
                        .checked_pow(u32::from(scale.saturating_sub(d.scale())))
                        .and_then(|factor| d.mantissa().checked_mul(factor))
                        .map_or(CheckedDiff::OVERFLOW, CheckedDiff::from_i128),
                    Some(Datum::Int64(i)) => CheckedDiff::from_i128(i128::from(*i)),
                    _ => CheckedDiff::ZERO,
                };
                out.push(mantissa);
                out.push(CheckedDiff::from(i64::from(present(column))));
            }
        }
    }
    out
}

/// The datum of one accumulated aggregate from its accumulators (`rows` the group's row count), or the
/// IR's error for it.
fn accumulated_datum(
    aggregate: Accumulated,
    rows: i64,
    values: &[CheckedDiff],
) -> Result<Datum<'static>, EvalError> {
    let int = |d: CheckedDiff| d.to_i64().ok_or(EvalError::Int64OutOfRange);
    let decimal = |d: CheckedDiff, scale: u8| {
        d.to_i128().and_then(|m| protocol::Decimal::new(m, scale)).ok_or(EvalError::DecimalOutOfRange)
    };
    Ok(match aggregate {
        Accumulated::CountRows => Datum::Int64(rows),
        Accumulated::Count { .. } => Datum::Int64(int(values[0])?),
        _ if values[1].is_zero() => Datum::Null,
        Accumulated::SumInt { .. } => Datum::Int64(int(values[0])?),
        Accumulated::SumDecimal { scale, .. } => Datum::Decimal(decimal(values[0], scale)?),
        Accumulated::Avg { scale, .. } => {
            let count =
                protocol::Decimal::new(i128::from(int(values[1])?), 0).ok_or(EvalError::DecimalOutOfRange)?;
            Datum::Decimal(protocol::decimal_arithmetic(
                protocol::BinaryFunc::Div,
                decimal(values[0], scale)?,
                count,
            )?)
        }
    })
}

/// A `Reduce` whose aggregates all accumulate exactly ([`accumulable`]): each group is kept as the sums
/// of its rows' accumulators (a count, exact sums, counts of non-null values), maintained with constant
/// work per update and time like a count (differential's `count` over a vector of [`CheckedDiff`]s), not
/// by re-reading every row of a group as the general reduce does. The reference's condition that no row
/// of a group be negative is checked per row by [`check_non_negative`], as for a count; a group whose
/// count, an integer sum or a count of values is not an `i64`, or whose decimal sum is not a decimal, is
/// an error, as `AggregateFunc::eval` says.
fn render_accumulable<'s>(
    input: Coll<'s>,
    group_key: Vec<usize>,
    accumulated: Vec<Accumulated>,
    operator: u64,
    ctx: &mut RenderContext<'s>,
) -> Coll<'s> {
    ctx.errs.push(check_non_negative(input.clone(), operator, "Reduce"));
    let explode = accumulated.clone();
    let sums = input
        .explode(move |row| Some((project_row(&row, &group_key), accumulators(&row, &explode))))
        .count_core::<CheckedDiff>();
    let (oks, errs) = split_results(sums, "Reduce", move |(key, values): (Row, Vec<CheckedDiff>)| {
        let rows = values.first().copied().unwrap_or(CheckedDiff::ZERO);
        let Some(count) = rows.to_i64() else {
            return Some(Err(out_of_range_error(operator, "Reduce", key.as_row_ref())));
        };
        if count <= 0 {
            // None: an empty group; negative: a negative row, an error of `check_non_negative`.
            return None;
        }
        let mut packer = RowPacker::new();
        packer.extend_by_row(&key);
        let mut offset = 1;
        for aggregate in &accumulated {
            let width = aggregate.width();
            let mut slots = [CheckedDiff::ZERO; 2];
            for (slot, value) in slots.iter_mut().zip(values.iter().skip(offset).take(width)) {
                *slot = *value;
            }
            offset += width;
            match accumulated_datum(*aggregate, count, &slots) {
                Ok(datum) => packer.push(datum),
                Err(error) => {
                    let message = format!("{error} (operator {operator}: Reduce {aggregate:?})");
                    return Some(Err(error_row(&message, key.as_row_ref())));
                }
            }
        }
        Some(Ok(packer.finish()))
    });
    ctx.errs.push(errs);
    oks
}

/// Below this many updates [`check_non_negative`] does not bother consolidating what it keeps.
const CONSOLIDATE_FLOOR: usize = 1 << 16;

/// Errors for every row whose accumulated multiplicity is negative, for as long as it is.
///
/// Rows are partitioned by hash. While a worker has seen no negative update, no row can be negative: it
/// only keeps its updates (consolidated now and then, a row's complete ones into one), which costs a copy
/// per update. At the first negative update it switches to the exact check for good: the accumulated
/// multiplicity of each row in a hash map (rows at zero are forgotten), updates applied in time order once
/// the input frontier has passed their time, an error row emitted at the times a row's multiplicity goes
/// below zero and retracted when it comes back. Constant work per update in both modes, unlike a reduce
/// over the rows.
pub(crate) fn check_non_negative<'s>(input: Coll<'s>, operator: u64, name: &'static str) -> Coll<'s> {
    use std::collections::hash_map::Entry;

    use differential_dataflow::Hashable;
    use timely::dataflow::channels::pact::Exchange;
    use timely::dataflow::operators::Operator;

    let route = |(row, _, _): &(Row, Time, CheckedDiff)| row.hashed();
    input
        .inner
        .unary_frontier::<timely::container::CapacityContainerBuilder<Updates>, _, _, _>(
            Exchange::new(route),
            "CheckNonNegative",
            move |_capability, _info| {
                let mut state = CheckState::Positive { updates: Vec::new(), consolidated: 0 };
                move |(input, frontier), output| {
                    input.for_each(|cap, data| {
                        if let CheckState::Positive { updates, .. } = &mut state
                            && data.iter().any(|(_, _, diff)| diff.is_negative())
                        {
                            // The first negative update: from now on, the exact check. What was kept is
                            // applied in time order like any update; it is all positive, so it changes
                            // no sign and needs no capability.
                            let mut pending: BTreeMap<Time, Vec<(Row, CheckedDiff)>> = BTreeMap::new();
                            for (row, time, diff) in updates.drain(..) {
                                pending.entry(time).or_default().push((row, diff));
                            }
                            state = CheckState::Exact { counts: RowCounts::default(), pending, held: None };
                        }
                        match &mut state {
                            CheckState::Positive { updates, .. } => updates.append(data),
                            CheckState::Exact { pending, held, .. } => {
                                if let Some(cap) = cap.retain_least(0)
                                    && held.as_ref().is_none_or(|h| cap.time() < h.time())
                                {
                                    *held = Some(cap);
                                }
                                for (row, time, diff) in data.drain(..) {
                                    pending.entry(time).or_default().push((row, diff));
                                }
                            }
                        }
                    });
                    match &mut state {
                        CheckState::Positive { updates, consolidated } => {
                            if updates.len() > 4 * *consolidated + CONSOLIDATE_FLOOR {
                                // Only the accumulated multiplicity of a row matters once its time is
                                // complete, so complete times all become the least time (the frontier is
                                // beyond it, so these updates stay complete) and a row's complete updates
                                // add up into one. Consolidating sorts, so only once the updates have
                                // grown fourfold since the last time: a third of a sort per update over a
                                // stream of distinct rows, and the state stays within about four times
                                // the distinct rows and pending times (a hydration's million updates of a
                                // hundred distinct rows keep a hundred, not a million, nor their capacity).
                                let least = <Time as timely::progress::Timestamp>::minimum();
                                for (_, time, _) in updates.iter_mut() {
                                    if !frontier.less_equal(time) {
                                        *time = least;
                                    }
                                }
                                differential_dataflow::consolidation::consolidate_updates(updates);
                                *consolidated = updates.len();
                                if updates.capacity() > 4 * updates.len() + CONSOLIDATE_FLOOR {
                                    updates.shrink_to_fit();
                                }
                            }
                        }
                        CheckState::Exact { counts, pending, held } => {
                            let error = |row: &Row| {
                                let message = format!(
                                    "{name}: negative multiplicity for row {row} (operator {operator})"
                                );
                                error_row(&message, row.as_row_ref())
                            };
                            while let Some(entry) = pending.first_entry() {
                                let time = *entry.key();
                                if frontier.less_equal(&time) {
                                    break;
                                }
                                let mut changes: Vec<(Row, Time, CheckedDiff)> = Vec::new();
                                for (row, diff) in entry.remove() {
                                    // One hash lookup per update; an error row only when the sign changes.
                                    match counts.entry(row) {
                                        Entry::Occupied(mut entry) => {
                                            let old = *entry.get();
                                            let mut new = old;
                                            new.plus_equals(&diff);
                                            if old.is_negative() != new.is_negative() {
                                                let sign: i8 = if new.is_negative() { 1 } else { -1 };
                                                changes.push((
                                                    error(entry.key()),
                                                    time,
                                                    CheckedDiff::from(sign),
                                                ));
                                            }
                                            if new.is_zero() {
                                                entry.remove();
                                            } else {
                                                *entry.get_mut() = new;
                                            }
                                        }
                                        Entry::Vacant(entry) => {
                                            if diff.is_negative() {
                                                changes.push((error(entry.key()), time, CheckedDiff::ONE));
                                            }
                                            if !diff.is_zero() {
                                                entry.insert(diff);
                                            }
                                        }
                                    }
                                }
                                if !changes.is_empty() {
                                    // Sign changes happen only at or after a negative update's time, which
                                    // is at or after the least capability held since the switch.
                                    let cap = held.as_ref();
                                    assert!(cap.is_some(), "a capability is held for every negative update");
                                    let delayed = cap.expect("asserted").delayed(&time);
                                    output.session(&delayed).give_container(&mut changes);
                                }
                            }
                            match pending.keys().next() {
                                Some(time) => {
                                    if let Some(held) = held.as_mut()
                                        && held.time() < time
                                    {
                                        held.downgrade(time);
                                    }
                                }
                                None => *held = None,
                            }
                        }
                    }
                }
            },
        )
        .as_collection()
}

/// Accumulated multiplicities of rows.
type RowCounts = std::collections::HashMap<Row, CheckedDiff, std::hash::BuildHasherDefault<RowHasher>>;

/// The state of [`check_non_negative`] on one worker.
enum CheckState {
    /// No negative update seen yet.
    Positive {
        /// Every update, consolidated now and then, complete times moved to the least time.
        updates: Updates,
        /// `updates`' length after its last consolidation.
        consolidated: usize,
    },
    /// The exact check.
    Exact {
        counts: RowCounts,
        pending: BTreeMap<Time, Vec<(Row, CheckedDiff)>>,
        held: Option<timely::dataflow::operators::Capability<Time>>,
    },
}

/// A fast, deterministic hasher for the check's map of rows (rows are short byte strings; the map is
/// private to one operator, so no hash-flooding concern applies).
#[derive(Default)]
pub(crate) struct RowHasher(u64);

impl std::hash::Hasher for RowHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
        }
        for byte in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*byte)).wrapping_mul(K);
        }
    }
}

/// One step of a fused Map/Filter/Project pass.
#[derive(Debug, Clone)]
pub(crate) enum RowOp {
    /// Append the values of the expressions (each sees the columns before it).
    Map(Vec<ScalarExpr>),
    /// Keep the row only if every predicate is `true` (left to right, stopping at the first that is not).
    Filter(Vec<ScalarExpr>),
    /// Keep the listed columns.
    Project(Vec<usize>),
}

/// Applies `ops` in order to `row`: `Ok(None)` if a filter removed it.
///
/// An error comes with the row the failing step was given (`Project`s before it applied), not `row`: the
/// reference evaluates each step on its consolidated input, so updates that cancel after a projection
/// raise no error there, and here their error rows must be equal to cancel too.
pub(crate) fn apply_row_ops(
    ops: &[RowOp],
    row: &Row,
    packer: &mut RowPacker,
) -> Result<Option<Row>, (EvalError, Row)> {
    let mut datums: Vec<Datum<'_>> = row.iter().collect();
    // The step's input: the first `columns` datums (a `Map` appends to them as it goes).
    let failed = |datums: &[Datum<'_>], columns: usize, error: EvalError| {
        (error, Row::pack(datums[..columns].iter().copied()))
    };
    for op in ops {
        let columns = datums.len();
        match op {
            RowOp::Map(exprs) => {
                for expr in exprs {
                    let datum = expr.eval(&datums).map_err(|e| failed(&datums, columns, e))?;
                    datums.push(datum);
                }
            }
            RowOp::Filter(predicates) => {
                for predicate in predicates {
                    if predicate.eval(&datums).map_err(|e| failed(&datums, columns, e))? != Datum::Bool(true)
                    {
                        return Ok(None);
                    }
                }
            }
            RowOp::Project(outputs) => {
                let mut projected = Vec::with_capacity(outputs.len());
                for column in outputs {
                    let datum = datums.get(*column).copied().ok_or_else(|| {
                        failed(&datums, columns, EvalError::Internal(format!("project of column {column}")))
                    })?;
                    projected.push(datum);
                }
                datums = projected;
            }
        }
    }
    packer.clear();
    packer.extend(datums);
    Ok(Some(packer.finish_and_reuse()))
}

/// Consolidates a sink's updates and checks their multiplicities against the protocol's `i64`: an update
/// whose multiplicity is not one (or overflowed) becomes an error update (at its time, once) in `errors`
/// instead, which the sink reports as the dataflow's error. Errors are consolidated and converted the
/// same way (an error multiplicity beyond `i64` is still an error: it counts once).
pub(crate) fn checked_updates(
    mut updates: Updates,
    mut errors: Updates,
) -> (ProtocolUpdates, ProtocolUpdates) {
    differential_dataflow::consolidation::consolidate_updates(&mut updates);
    let mut rows = Vec::with_capacity(updates.len());
    for (row, time, diff) in updates {
        match diff.to_i64() {
            Some(diff) => rows.push((row, time, diff)),
            None => {
                let message = format!("sink: the multiplicity {diff} of row {row} is not an i64");
                errors.push((error_row(&message, row.as_row_ref()), time, CheckedDiff::ONE));
            }
        }
    }
    differential_dataflow::consolidation::consolidate_updates(&mut errors);
    let errors =
        errors.into_iter().map(|(error, time, diff)| (error, time, diff.to_i64().unwrap_or(1))).collect();
    (rows, errors)
}

/// The error row for `message` caused by `row`.
pub(crate) fn error_row(message: &str, row: RowRef<'_>) -> Row {
    Row::pack([Datum::Text(message), Datum::Bytes(row.as_bytes())])
}

/// The message of an error row.
pub(crate) fn error_message(error: &Row) -> String {
    match error.iter().next() {
        Some(Datum::Text(message)) => message.to_string(),
        _ => format!("malformed error row {error}"),
    }
}

fn negative_error(operator: u64, name: &str, row: RowRef<'_>, diff: CheckedDiff) -> Row {
    error_row(&format!("{name}: negative multiplicity {diff} for row {row} (operator {operator})"), row)
}

/// The error of a group (`key`) whose number of rows is not an `i64`.
fn out_of_range_error(operator: u64, name: &str, key: RowRef<'_>) -> Row {
    let message = format!("{name}: group {key} has more rows than an i64 counts (operator {operator})");
    error_row(&message, key)
}

/// The error of a row whose multiplicity overflowed the replica's 128 bits.
fn overflow_error(operator: u64, name: &str, row: RowRef<'_>) -> Row {
    let message = format!("{name}: the multiplicity of row {row} overflowed 128 bits (operator {operator})");
    error_row(&message, row)
}

/// The error of a `Reduce` or `TopK` group (`key`, its rows `values`), if it has one: a row whose
/// multiplicity overflowed, a negative row, or more rows than an `i64` counts.
fn check_group(operator: u64, name: &str, key: &Row, values: &[(RowRef<'_>, CheckedDiff)]) -> Option<Row> {
    if let Some((row, _)) = values.iter().find(|(_, d)| d.is_overflow()) {
        return Some(overflow_error(operator, name, *row));
    }
    if let Some((row, diff)) = values.iter().find(|(_, d)| d.is_negative()) {
        return Some(negative_error(operator, name, *row, *diff));
    }
    let total = CheckedDiff::sum(values.iter().map(|(_, d)| d));
    total.to_i64().is_none().then(|| out_of_range_error(operator, name, key.as_row_ref()))
}

/// The row of the given columns of `row` (missing columns are `NULL`, as in the reference).
pub(crate) fn project_row(row: &Row, columns: &[usize]) -> Row {
    if columns.is_empty() {
        return Row::EMPTY;
    }
    let mut packer = RowPacker::new();
    if columns.windows(2).all(|w| w[0] < w[1]) {
        // Increasing columns (the common case): one pass over the encoding, no allocation.
        let mut wanted = columns.iter().peekable();
        for (index, datum) in row.iter().enumerate() {
            match wanted.peek() {
                Some(column) if **column == index => {
                    packer.push(datum);
                    wanted.next();
                }
                Some(_) => {}
                None => break,
            }
        }
        for _ in wanted {
            packer.push(Datum::Null);
        }
    } else {
        let datums: Vec<Datum<'_>> = row.iter().collect();
        packer.extend(columns.iter().map(|c| datums.get(*c).copied().unwrap_or(Datum::Null)));
    }
    packer.finish()
}

/// A row-at-a-time pass with two outputs: rows for which `logic` returns `Ok(Some(row))` go to the first
/// collection, `Err(error)` to the second, `Ok(None)` nowhere. Multiplicities and times are kept.
pub(crate) fn map_rows<'s, L>(input: Coll<'s>, name: &str, mut logic: L) -> (Coll<'s>, Coll<'s>)
where
    L: FnMut(&Row, &mut RowPacker) -> Result<Option<Row>, Row> + 'static,
{
    let stream: Stream<'s, Time, Vec<(Row, Time, CheckedDiff)>> = input.inner;
    let mut builder = OperatorBuilder::new(name.to_owned(), stream.scope());
    let mut input = builder.new_input(stream, Pipeline);
    builder.set_notify_for(0, timely::progress::operate::FrontierInterest::Never);
    let (ok_output, ok_stream) = builder.new_output::<Vec<(Row, Time, CheckedDiff)>>();
    let (err_output, err_stream) = builder.new_output::<Vec<(Row, Time, CheckedDiff)>>();
    let mut ok_output = OutputBuilder::from(ok_output);
    let mut err_output = OutputBuilder::from(err_output);
    builder.build(move |_| {
        let mut packer = RowPacker::new();
        move |_frontiers| {
            let mut oks = ok_output.activate();
            let mut errs = err_output.activate();
            input.for_each(|cap, data| {
                let mut ok_session = oks.session(&cap);
                let mut err_session = errs.session(&cap);
                for (row, time, diff) in data.drain(..) {
                    match logic(&row, &mut packer) {
                        Ok(Some(out)) => ok_session.give((out, time, diff)),
                        Ok(None) => {}
                        Err(error) => err_session.give((error, time, diff)),
                    }
                }
            });
        }
    });
    (ok_stream.as_collection(), err_stream.as_collection())
}

/// A reduce whose logic emits `Ok(output row)` or `Err(error row)` per group; errors are pushed to
/// `ctx.errs`, output rows returned.
///
/// The input is arranged with its values in a [`slab::RowSlab`] (the rows' bytes back to back), not one `Row`
/// each: a reduce keeps every distinct input row for as long as it lives, so this is most of what a
/// hydrated `Reduce`, `Distinct` or `TopK` holds (`controller.hydration_peak_rss_sum`).
fn reduce_rows<'s, L>(
    keyed: VecCollection<'s, Time, (Row, Row), CheckedDiff>,
    name: &str,
    ctx: &mut RenderContext<'s>,
    logic: L,
) -> Coll<'s>
where
    L: FnMut(&Row, &[(RowRef<'_>, CheckedDiff)], &mut Vec<(Result<Row, Row>, CheckedDiff)>) + 'static,
{
    use differential_dataflow::trace::implementations::{ValBuilder, ValSpine};
    type Results = Result<Row, Row>;

    let reduced = keyed
        .arrange_named::<SlabBatcher, SlabSpine>(&format!("Arrange: {name}"), SlabBatcher::new)
        .reduce_abelian::<_, ValBuilder<Row, Results, Time, CheckedDiff>, ValSpine<Row, Results, Time, CheckedDiff>, Vec<Row>, _>(
            name,
            logic,
            |buffer, key, updates| {
                buffer.clear();
                buffer.extend(updates.drain(..).map(|(value, time, diff)| ((key.clone(), value), time, diff)));
            },
        )
        .as_collection(|_key, result| result.clone());
    let (oks, errs) = map_results(reduced, name);
    ctx.errs.push(errs);
    oks
}

/// The container of a reduce's input values (see [`reduce_rows`]), in its own module so that
/// `BatchContainer`'s methods (`get`, `index`) do not shadow those of vectors elsewhere in this file.
mod slab {
    use differential_dataflow::trace::implementations::BatchContainer;
    use protocol::{Row, RowRef};

    use super::{CheckedDiff, Time};

    /// The layout of a reduce's input arrangement: keys as `Row`s (one per group), values in a [`RowSlab`].
    pub(crate) type SlabLayout = (
        Vec<Row>,
        RowSlab,
        Vec<Time>,
        Vec<CheckedDiff>,
        differential_dataflow::trace::implementations::OffsetList,
    );
    pub(crate) type SlabUpdates = Vec<((Row, Row), Time, CheckedDiff)>;
    pub(crate) type SlabBuilder =
        differential_dataflow::trace::implementations::ord_neu::OrdValBuilder<SlabLayout, SlabUpdates>;
    pub(crate) type SlabBatcher = differential_dataflow::batcher::merge::MergeBatcher<
        differential_dataflow::batcher::merge::chunker::ContainerChunker<SlabUpdates>,
        differential_dataflow::batcher::merge::vec::VecMerger<(Row, Row), Time, CheckedDiff>,
        SlabBuilder,
    >;
    pub(crate) type SlabSpine = differential_dataflow::trace::implementations::spine_fueled::Spine<
        std::rc::Rc<differential_dataflow::trace::implementations::ord_neu::OrdValBatch<SlabLayout>>,
    >;

    /// Rows stored as their encodings back to back, with the end of each: a row costs its bytes and four
    /// more (eight past 4 GiB), where a `Vec<Row>` costs 32 bytes a row however short (a two-column integer
    /// row is 18 bytes).
    pub(crate) struct RowSlab {
        bytes: Vec<u8>,
        ends: differential_dataflow::trace::implementations::OffsetList,
    }

    impl Default for RowSlab {
        fn default() -> Self {
            <Self as BatchContainer>::with_capacity(0)
        }
    }

    impl timely::container::PushInto<Row> for RowSlab {
        fn push_into(&mut self, item: Row) {
            self.push_own(&item);
        }
    }

    impl BatchContainer for RowSlab {
        type Owned = Row;
        type ReadItem<'a> = RowRef<'a>;

        fn into_owned<'a>(item: RowRef<'a>) -> Row {
            item.to_row()
        }

        fn push_ref(&mut self, item: RowRef<'_>) {
            self.bytes.extend_from_slice(item.as_bytes());
            self.ends.push_ref(self.bytes.len());
        }

        fn push_own(&mut self, item: &Row) {
            self.push_ref(item.as_row_ref());
        }

        fn clear(&mut self) {
            self.bytes.clear();
            self.ends.clear();
        }

        fn with_capacity(size: usize) -> Self {
            // The rows' lengths are not known yet: room for short ones, growing as needed.
            RowSlab { bytes: Vec::with_capacity(size * 8), ends: BatchContainer::with_capacity(size) }
        }

        fn merge_capacity(cont1: &Self, cont2: &Self) -> Self {
            RowSlab {
                bytes: Vec::with_capacity(cont1.bytes.len() + cont2.bytes.len()),
                ends: BatchContainer::with_capacity(cont1.ends.len() + cont2.ends.len()),
            }
        }

        fn reborrow<'b, 'a: 'b>(item: RowRef<'a>) -> RowRef<'b> {
            item
        }

        fn index(&self, index: usize) -> RowRef<'_> {
            let start = if index == 0 { 0 } else { self.ends.index(index - 1) };
            let end = self.ends.index(index);
            // Only rows' encodings are pushed, each delimited by its end.
            RowRef::from_encoding(&self.bytes[start..end])
        }

        fn len(&self) -> usize {
            self.ends.len()
        }
    }
}

use slab::{SlabBatcher, SlabSpine};

/// Splits a collection of results into oks and errors.
fn map_results<'s>(
    input: VecCollection<'s, Time, Result<Row, Row>, CheckedDiff>,
    name: &str,
) -> (Coll<'s>, Coll<'s>) {
    split_results(input, name, Some)
}

/// Turns each record of `input` into an ok row, an error row or nothing, in one pass.
fn split_results<'s, D, L>(
    input: VecCollection<'s, Time, D, CheckedDiff>,
    name: &str,
    mut logic: L,
) -> (Coll<'s>, Coll<'s>)
where
    D: Clone + 'static,
    L: FnMut(D) -> Option<Result<Row, Row>> + 'static,
{
    let stream = input.inner;
    let mut builder = OperatorBuilder::new(format!("{name}: split"), stream.scope());
    let mut input = builder.new_input(stream, Pipeline);
    builder.set_notify_for(0, timely::progress::operate::FrontierInterest::Never);
    let (ok_output, ok_stream) = builder.new_output::<Vec<(Row, Time, CheckedDiff)>>();
    let (err_output, err_stream) = builder.new_output::<Vec<(Row, Time, CheckedDiff)>>();
    let mut ok_output = OutputBuilder::from(ok_output);
    let mut err_output = OutputBuilder::from(err_output);
    builder.build(move |_| {
        move |_frontiers| {
            let mut oks = ok_output.activate();
            let mut errs = err_output.activate();
            input.for_each(|cap, data| {
                let mut ok_session = oks.session(&cap);
                let mut err_session = errs.session(&cap);
                for (record, time, diff) in data.drain(..) {
                    match logic(record) {
                        Some(Ok(row)) => ok_session.give((row, time, diff)),
                        Some(Err(error)) => err_session.give((error, time, diff)),
                        None => {}
                    }
                }
            });
        }
    });
    (ok_stream.as_collection(), err_stream.as_collection())
}

/// One group of a `Reduce`: the group key, then one datum per aggregate; an error on a negative
/// multiplicity or an aggregate's evaluation error.
fn reduce_group(
    operator: u64,
    aggregates: &[AggregateExpr],
    key: &Row,
    values: &[(RowRef<'_>, CheckedDiff)],
    out: &mut Vec<(Result<Row, Row>, CheckedDiff)>,
) {
    if let Some(error) = check_group(operator, "Reduce", key, values) {
        out.push((Err(error), CheckedDiff::ONE));
        return;
    }
    let mut packer = RowPacker::new();
    packer.extend_by_row(key);
    for aggregate in aggregates {
        let column = aggregate.column;
        // `nth` walks the row's encoding without allocating. A checked group's multiplicities are i64s.
        let datums = values.iter().map(|(row, diff)| {
            (row.iter().nth(column).unwrap_or(Datum::Null), diff.to_i64().expect("checked group"))
        });
        match aggregate.func.eval(datums) {
            Ok(datum) => packer.push(datum),
            Err(error) => {
                let message = format!("{error} (operator {operator}: Reduce {:?})", aggregate.func);
                out.push((Err(error_row(&message, key.as_row_ref())), CheckedDiff::ONE));
                return;
            }
        }
    }
    out.push((Ok(packer.finish()), CheckedDiff::ONE));
}

/// Renders an n-ary equi-join as a chain of binary joins.
fn render_join<'s>(inputs: &[Plan], equivalences: &[Vec<usize>], ctx: &mut RenderContext<'s>) -> Coll<'s> {
    let arities: Vec<usize> = inputs.iter().map(|input| plan_arity(input, &ctx.arities)).collect();
    let mut offsets = Vec::with_capacity(inputs.len());
    let mut total = 0;
    for arity in &arities {
        offsets.push(total);
        total += arity;
    }
    let input_of =
        |column: usize| offsets.iter().rposition(|offset| *offset <= column).expect("offsets start at 0");

    let mut rendered: Vec<Coll<'s>> = Vec::with_capacity(inputs.len());
    for (index, input) in inputs.iter().enumerate() {
        let coll = render_plan(input, ctx);
        // Columns of this input that appear in any class must be non-null, and columns of one class within
        // this input must be equal.
        let offset = offsets[index];
        let arity = arities[index];
        let mut local_classes: Vec<Vec<usize>> = Vec::new();
        for class in equivalences {
            let local: Vec<usize> =
                class.iter().filter(|c| **c >= offset && **c < offset + arity).map(|c| c - offset).collect();
            if !local.is_empty() {
                local_classes.push(local);
            }
        }
        let coll = if local_classes.is_empty() {
            coll
        } else {
            coll.filter(move |row| {
                let datums: Vec<Datum<'_>> = row.iter().collect();
                local_classes.iter().all(|class| {
                    let first = datums.get(class[0]).copied().unwrap_or(Datum::Null);
                    !first.is_null() && class.iter().all(|c| datums.get(*c).copied() == Some(first))
                })
            })
        };
        rendered.push(coll);
    }

    let mut rendered = rendered.into_iter();
    let mut prefix = rendered.next().expect("validated join has an input");
    let mut prefix_arity = arities[0];
    for (index, next) in rendered.enumerate() {
        let index = index + 1;
        // Key columns: for each class with columns in both the prefix and this input, one of each.
        let mut prefix_key = Vec::new();
        let mut next_key = Vec::new();
        for class in equivalences {
            let in_prefix = class.iter().find(|c| **c < prefix_arity);
            let in_next = class.iter().find(|c| input_of(**c) == index);
            if let (Some(p), Some(n)) = (in_prefix, in_next) {
                prefix_key.push(*p);
                next_key.push(*n - offsets[index]);
            }
        }
        let left =
            prefix.map(move |row| (project_row(&row, &prefix_key), row)).arrange_by_key_named("JoinArrange");
        let right =
            next.map(move |row| (project_row(&row, &next_key), row)).arrange_by_key_named("JoinArrange");
        prefix = left.join_core(right, |_key, a: &Row, b: &Row| {
            let mut packer = RowPacker::new();
            packer.extend_by_row(a);
            packer.extend_by_row(b);
            Some(packer.finish())
        });
        prefix_arity += arities[index];
    }
    prefix
}

/// The arity of a plan's output, given the arities of the ids it may `Get` (those of a validated dataflow).
fn plan_arity(plan: &Plan, arities: &BTreeMap<GlobalId, usize>) -> usize {
    match plan {
        Plan::Get { id } => {
            let arity = arities.get(id).copied();
            assert!(arity.is_some(), "arity of {id} is known before rendering");
            arity.expect("asserted")
        }
        Plan::Constant { typ, .. } => typ.arity(),
        Plan::Map { input, exprs } => plan_arity(input, arities) + exprs.len(),
        Plan::Filter { input, .. }
        | Plan::Distinct { input }
        | Plan::Negate { input }
        | Plan::Threshold { input }
        | Plan::TopK { input, .. }
        | Plan::ArrangeBy { input, .. } => plan_arity(input, arities),
        Plan::Project { outputs, .. } => outputs.len(),
        Plan::Join { inputs, .. } => inputs.iter().map(|input| plan_arity(input, arities)).sum(),
        Plan::Reduce { group_key, aggregates, .. } => group_key.len() + aggregates.len(),
        Plan::Union { inputs } => plan_arity(&inputs[0], arities),
    }
}

/// The type of every import and object of `desc` (a validated description: every plan type-checks).
pub(crate) fn types(desc: &DataflowDescription<Time>) -> BTreeMap<GlobalId, RelationType> {
    let mut types = BTreeMap::new();
    for (id, import) in &desc.source_imports {
        types.insert(*id, import.desc.typ().clone());
    }
    for (id, import) in &desc.index_imports {
        types.insert(*id, import.desc.typ().clone());
    }
    for object in &desc.objects_to_build {
        let typ = object.plan.typ(&|id| types.get(&id).cloned());
        assert!(typ.is_ok(), "validated dataflow: {} type-checks", object.id);
        types.insert(object.id, typ.expect("asserted"));
    }
    types
}

/// Arranges errors for peeks: every worker gets a full copy (errors are rare), so whichever worker answers
/// a peek can tell whether the dataflow has an error at the peek's time.
pub(crate) fn arrange_errors<'s>(errs: Coll<'s>) -> Arranged<'s, ErrTrace> {
    use differential_dataflow::trace::implementations::KeyBatcher;
    use timely::dataflow::operators::vec::Broadcast;
    let broadcast = errs.inner.broadcast().as_collection().map(|error| (error, ()));
    differential_dataflow::operators::arrange::arrangement::arrange_core::<
        _,
        _,
        KeyBatcher<Row, Time, CheckedDiff>,
        KeySpine<Row, Time, CheckedDiff>,
    >(broadcast.inner, Pipeline, "Errors", KeyBatcher::new)
}

/// Arranges an object's rows by `key` for an index export: `(key, full row)`.
pub(crate) fn arrange_index<'s>(oks: Coll<'s>, key: Vec<usize>) -> OkArranged<'s> {
    oks.map(move |row| (project_row(&row, &key), row)).arrange_by_key_named("Index")
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use differential_dataflow::input::InputSession;
    use timely::dataflow::ProbeHandle;

    use super::*;

    /// Runs [`check_non_negative`] on one worker over `steps` (each: updates, then the input's new
    /// frontier, stepping until the check has caught up); returns its error rows' updates, consolidated.
    fn errors_of(steps: Vec<(ProtocolUpdates, Time)>) -> ProtocolUpdates {
        let seen: Arc<Mutex<Updates>> = Arc::default();
        let sink = Arc::clone(&seen);
        timely::execute_directly(move |worker| {
            let probe = ProbeHandle::new();
            let mut input: RowInput = InputSession::new();
            worker.dataflow::<Time, _, _>(|scope| {
                let rows = input.to_collection(scope);
                check_non_negative(rows, 1, "Test")
                    .inspect(move |update| sink.lock().expect("one worker").push(update.clone()))
                    .probe_with(&probe);
            });
            for (updates, frontier) in steps {
                for (row, time, diff) in updates {
                    input.update_at(row, time, CheckedDiff::from(diff));
                }
                input.advance_to(frontier);
                input.flush();
                while probe.less_than(input.time()) {
                    worker.step();
                }
            }
        });
        let mut errors = std::mem::take(&mut *seen.lock().expect("one worker"));
        differential_dataflow::consolidation::consolidate_updates(&mut errors);
        errors.into_iter().map(|(row, time, diff)| (row, time, diff.to_i64().expect("small"))).collect()
    }

    fn row(k: i64) -> Row {
        Row::pack([Datum::Int64(k)])
    }

    /// `count` copies of each of the rows `0..10` at `time`.
    fn copies(count: i64, time: Time) -> ProtocolUpdates {
        (0..count).map(|i| (row(i % 10), time, 1)).collect()
    }

    #[test]
    fn a_row_slab_gives_back_each_row_it_was_given_in_row_order() {
        use differential_dataflow::trace::implementations::BatchContainer;

        let long = Row::pack([Datum::Text("longer than a row's inline buffer of twenty-four bytes")]);
        let mut rows =
            vec![Row::EMPTY, row(-1), row(0), row(7), long, Row::pack([Datum::Null, Datum::Int64(2)])];
        rows.sort();
        let mut slab = slab::RowSlab::default();
        for row in &rows {
            slab.push_own(row);
        }
        let mut merged = slab::RowSlab::merge_capacity(&slab, &slab);
        for index in 0..slab.len() {
            merged.push_ref(slab.index(index));
        }
        assert_eq!(merged.len(), rows.len());
        for (index, row) in rows.iter().enumerate() {
            assert_eq!(merged.index(index), row, "row {index}");
            assert_eq!(slab::RowSlab::into_owned(merged.index(index)), *row);
        }
        // Borrowed rows order as the rows do, which the arrangement's searches rely on.
        for pair in 0..rows.len() - 1 {
            assert!(merged.index(pair) < merged.index(pair + 1), "{:?} < {:?}", rows[pair], rows[pair + 1]);
        }
        merged.clear();
        assert_eq!(merged.len(), 0);
    }

    #[test]
    fn a_row_taken_negative_after_consolidations_is_an_error_exactly_while_it_is_negative() {
        // 140,000 updates: consolidated (past 65,536) while the first batch is complete and the second
        // is not, and again later. Row 3 has 14,000 at time 2; the retraction at 4 takes it to -1, the
        // insert at 5 back to 0. Row 4 goes to exactly zero at 4: no error.
        let late = vec![(row(3), 5, 1), (row(3), 4, -14_001), (row(4), 4, -14_000)];
        let errors = errors_of(vec![(copies(70_000, 1), 2), (copies(70_000, 2), 3), (late, 6)]);
        let error = error_row("Test: negative multiplicity for row (3) (operator 1)", row(3).as_row_ref());
        assert_eq!(errors, vec![(error.clone(), 4, 1), (error, 5, -1)]);
    }

    #[test]
    fn a_positive_update_at_a_later_time_does_not_count_before_that_time() {
        // The insert at 5 is kept (not complete: the frontier is 3) when the updates are consolidated;
        // the retraction at 4 that arrives after it must not see it. A check that merged incomplete
        // times into complete ones would miss the error at 4.
        let mut early = copies(70_000, 1);
        early.push((row(7), 5, 1));
        let late = vec![(row(7), 4, -7_001)];
        let errors = errors_of(vec![(early, 3), (late, 6)]);
        let error = error_row("Test: negative multiplicity for row (7) (operator 1)", row(7).as_row_ref());
        assert_eq!(errors, vec![(error.clone(), 4, 1), (error, 5, -1)]);
    }
}
