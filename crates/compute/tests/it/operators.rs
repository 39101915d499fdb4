//! Every operator against `protocol::reference`: random dataflows (the type-directed generator of
//! `protocol::arbitrary`, which covers Get, Constant, Map, Filter, Project, Join, Reduce, Distinct, Union,
//! Negate, Threshold, TopK and ArrangeBy) over random storage inputs and update sequences, checked through
//! peeks at every time, including key lookups, on 1 worker, 2 workers and a 2-process cluster. The inputs'
//! multiplicities include `±2^40`, so joins of them leave `i64` and the rule for multiplicities (exact
//! inside a plan, an error where observed beyond `i64`) is checked on random plans too; hand-written cases
//! overflow a join and a reduce and check that the replica answers with an error and keeps serving.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::TestRunner;

use frontiers::Antichain;
use protocol::arbitrary::{Choices, dataflow_from_choices, relation_desc, row_of};
use protocol::reference::{Multiset, consolidate, evaluate_dataflow};
use protocol::{
    AggregateExpr, AggregateFunc, BinaryFunc, BuildDesc, ColumnType, ComputeCommand, DataflowDescription,
    Datum, Diff, GlobalId, IndexExport, PeekResponse, PeekTarget, Plan, RelationDesc, Row, ScalarExpr,
    ScalarType, SourceImport,
};
use storage::InProcess;

use crate::harness::{
    Replica, Shape, TestController, append, create_collection, new_storage, proptest_cases, proptest_config,
    rows_of,
};

/// One generated case: the imports' schemas, the generator's choices, and per time the updates of each
/// import.
#[derive(Debug, Clone)]
struct Case {
    imports: Vec<RelationDesc>,
    choices: Vec<u32>,
    batches: Vec<Vec<Vec<(Row, Diff)>>>,
}

fn case() -> impl Strategy<Value = Case> {
    (prop::collection::vec(relation_desc(), 1..3), prop::collection::vec(any::<u32>(), 1..64)).prop_flat_map(
        |(imports, choices)| {
            let per_import: Vec<BoxedStrategy<Vec<(Row, Diff)>>> = imports
                .iter()
                .map(|desc| prop::collection::vec((row_of(desc.typ()), multiplicity()), 0..5).boxed())
                .collect();
            let batches = prop::collection::vec(per_import, 1..4);
            (Just(imports), Just(choices), batches).prop_map(|(imports, choices, batches)| Case {
                imports,
                choices,
                batches: within_storage_range(batches),
            })
        },
    )
}

/// A large multiplicity: joins of two rows with it leave `i64`, joins of three stay far inside the
/// replica's 128 bits.
const LARGE: i64 = 1 << 40;

/// An update's multiplicity: mostly small, sometimes `±LARGE`.
fn multiplicity() -> impl Strategy<Value = Diff> {
    prop_oneof![8 => Just(1i64), 2 => Just(-1), 2 => Just(2), 1 => Just(LARGE), 1 => Just(-LARGE)]
}

/// The batches with every update that would take its row's accumulated multiplicity in storage beyond
/// `±2^62` replaced by one of `1`: storage keeps `i64` accumulations (and sums them in `i64`), so inputs
/// stay inside them; multiplicities beyond `i64` arise in the plans.
fn within_storage_range(mut batches: Vec<Vec<Vec<(Row, Diff)>>>) -> Vec<Vec<Vec<(Row, Diff)>>> {
    let mut accumulated: BTreeMap<(usize, Row), i128> = BTreeMap::new();
    for batch in &mut batches {
        for (import, updates) in batch.iter_mut().enumerate() {
            for (row, diff) in updates.iter_mut() {
                let total = accumulated.entry((import, row.clone())).or_default();
                if (*total + i128::from(*diff)).abs() > 1 << 62 {
                    *diff = 1;
                }
                *total += i128::from(*diff);
            }
        }
    }
    batches
}

/// Rewrites every id of a generated dataflow so that each case uses fresh ids (storage never reuses ids).
fn remap(id: GlobalId, base: u64) -> GlobalId {
    match id {
        GlobalId::User(n) => GlobalId::User(base + n),
        GlobalId::Transient(n) => GlobalId::Transient(base + n),
        GlobalId::System(n) => GlobalId::System(base + n),
    }
}

fn remap_plan(plan: &mut Plan, base: u64) {
    plan.visit_mut(&mut |p| {
        if let Plan::Get { id } = p {
            *id = remap(*id, base);
        }
    });
}

fn remap_dataflow(df: DataflowDescription<u64>, base: u64) -> DataflowDescription<u64> {
    let mut out = DataflowDescription::new(df.debug_name.clone());
    out.source_imports = df.source_imports.into_iter().map(|(id, i)| (remap(id, base), i)).collect();
    out.index_imports = df.index_imports.into_iter().map(|(id, i)| (remap(id, base), i)).collect();
    out.objects_to_build = df
        .objects_to_build
        .into_iter()
        .map(|mut o| {
            o.id = remap(o.id, base);
            remap_plan(&mut o.plan, base);
            o
        })
        .collect();
    out.index_exports = df
        .index_exports
        .into_iter()
        .map(|(id, mut e)| {
            e.on_id = remap(e.on_id, base);
            (remap(id, base), e)
        })
        .collect();
    out.as_of = Some(Antichain::from_elem(0));
    out
}

/// An upper bound on the sum of the absolute multiplicities of what a plan can produce (so on every
/// multiplicity), given bounds for the ids it reads: joins multiply their inputs' bounds.
fn mass_bound(plan: &Plan, bounds: &BTreeMap<GlobalId, u128>) -> u128 {
    fold_bound(plan, bounds, &|rows| rows.iter().map(|(_, d)| u128::from(d.unsigned_abs())).sum())
}

/// An upper bound on the number of distinct rows a plan can produce, given bounds for the ids it reads.
fn rows_bound(plan: &Plan, bounds: &BTreeMap<GlobalId, u128>) -> u128 {
    fold_bound(plan, bounds, &|rows| rows.len() as u128)
}

/// Bounds a constant's rows.
type ConstantBound = dyn Fn(&[(Row, Diff)]) -> u128;

/// A bound that joins multiply, unions add and every other operator keeps; `constant` bounds a constant.
fn fold_bound(plan: &Plan, bounds: &BTreeMap<GlobalId, u128>, constant: &ConstantBound) -> u128 {
    match plan {
        Plan::Get { id } => bounds.get(id).copied().unwrap_or(0),
        Plan::Constant { rows, .. } => constant(rows),
        Plan::Map { input, .. }
        | Plan::Filter { input, .. }
        | Plan::Project { input, .. }
        | Plan::Reduce { input, .. }
        | Plan::Distinct { input }
        | Plan::Negate { input }
        | Plan::Threshold { input }
        | Plan::TopK { input, .. }
        | Plan::ArrangeBy { input, .. } => fold_bound(input, bounds, constant),
        Plan::Join { inputs, .. } => {
            inputs.iter().fold(1u128, |acc, input| acc.saturating_mul(fold_bound(input, bounds, constant)))
        }
        Plan::Union { inputs } => {
            inputs.iter().map(|input| fold_bound(input, bounds, constant)).fold(0, u128::saturating_add)
        }
    }
}

/// Cases whose intermediate results may have more rows than this are skipped: nested cross joins of
/// generated plans can be astronomically large, for the reference's nested loops as for the replica.
const MAX_ROWS: u128 = 2_000;

/// Cases whose multiplicities may pass this are skipped: beyond `2^126` the replica and the reference
/// meet the 128-bit capacity in different orders (`protocol::reference`'s docs, "Capacity"). Everything
/// below is exact on both sides, with `i64` checked where observed.
const MAX_MASS: u128 = 1 << 110;

/// Compares a replica's answer with the reference's.
fn check_answer(
    expected: &Result<Multiset, protocol::EvalError>,
    actual: &PeekResponse,
    what: &str,
) -> Result<(), TestCaseError> {
    match (expected, actual) {
        (Err(_), PeekResponse::Error(_)) => Ok(()),
        (Ok(rows), PeekResponse::Error(_)) if rows.values().any(|d| *d < 0) => Ok(()),
        (Ok(rows), PeekResponse::Rows(actual)) if rows.values().all(|d| *d > 0) => {
            let actual: Multiset = actual.iter().map(|(r, n)| (r.clone(), n.get() as Diff)).collect();
            prop_assert_eq!(&actual, rows, "{}", what);
            Ok(())
        }
        (expected, actual) => {
            Err(TestCaseError::fail(format!("{what}: expected {expected:?}, got {actual:?}")))
        }
    }
}

/// The random dataflows of `protocol::arbitrary`, over random imports and updates.
fn run_operators_against_reference(shape: Shape, cases: u32) {
    run_against_reference(shape, cases, case(), |case| {
        dataflow_from_choices(&mut Choices::new(case.choices.clone()), &case.imports)
    });
}

/// Runs the dataflows `build` makes of the cases of `strategy` on a replica of `shape` and compares
/// every answer with the reference's.
fn run_against_reference(
    shape: Shape,
    cases: u32,
    strategy: impl Strategy<Value = Case>,
    build: impl Fn(&Case) -> DataflowDescription<u64>,
) {
    let storage = new_storage();
    let replica = Replica::start(shape, Arc::clone(&storage) as Arc<dyn storage::StorageCollections>);
    let controller = std::cell::RefCell::new(TestController::connect(&replica.addrs()));
    let mut runner = TestRunner::new(proptest_config(cases));
    let next_base = std::cell::Cell::new(1_000u64);
    // A panic inside a case (a timeout, a regressed frontier) leaves the shared replica in an unknown
    // state: every later case, shrinking included, would wait out its own timeout. The first one is
    // recorded with its case, later cases are skipped, and the test fails with it at the end.
    let broken: std::cell::RefCell<Option<String>> = std::cell::RefCell::new(None);
    let result = runner.run(&strategy, |case| {
        if broken.borrow().is_some() {
            return Ok(());
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_case(&storage, &mut controller.borrow_mut(), &next_base, &build, &case, MAX_MASS)
        }));
        match outcome {
            Ok(result) => result,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic without a message".to_string());
                *broken.borrow_mut() = Some(format!("{message}\nin case {case:#?}"));
                Err(TestCaseError::fail(message))
            }
        }
    });
    if let Some(failure) = broken.into_inner() {
        panic!("the replica failed (later cases and shrinking skipped): {failure}");
    }
    if let Err(error) = result {
        panic!("{error}");
    }
    controller.into_inner().close();
}

/// One case of [`run_against_reference`]: builds its dataflow on the shared replica, appends its
/// batches, and compares the answer of every peek with the reference's.
fn check_case(
    storage: &Arc<InProcess>,
    controller: &mut TestController,
    next_base: &std::cell::Cell<u64>,
    build: &impl Fn(&Case) -> DataflowDescription<u64>,
    case: &Case,
    max_mass: u128,
) -> Result<(), TestCaseError> {
    let base = next_base.get();
    next_base.set(base + 1_000);
    let mut df = build(case);
    df.sink_exports.clear();
    let df = remap_dataflow(df, base);
    let index = remap(GlobalId::User(200), base);
    let updates_of = |i: usize| case.batches.iter().flat_map(move |b| &b[i]);
    let mut masses: BTreeMap<GlobalId, u128> = BTreeMap::new();
    let mut rows: BTreeMap<GlobalId, u128> = BTreeMap::new();
    for (i, id) in df.source_imports.keys().enumerate() {
        masses.insert(*id, updates_of(i).map(|(_, d)| u128::from(d.unsigned_abs())).sum());
        rows.insert(*id, updates_of(i).count() as u128);
    }
    for object in &df.objects_to_build {
        let (mass, count) = (mass_bound(&object.plan, &masses), rows_bound(&object.plan, &rows));
        masses.insert(object.id, mass);
        rows.insert(object.id, count);
    }
    prop_assume!(rows.values().all(|b| *b <= MAX_ROWS), "intermediate results too large to check");
    prop_assume!(masses.values().all(|b| *b <= max_mass), "multiplicities near the 128-bit capacity");
    let import_ids: Vec<GlobalId> = df.source_imports.keys().copied().collect();
    for (id, desc) in import_ids.iter().zip(&case.imports) {
        create_collection(storage, *id, desc.clone());
    }
    let index_export = df.index_exports[&index].clone();
    let arity = df.object_type(index_export.on_id).expect("typed").arity();
    controller.create_dataflow(df.clone());
    let mut contents: Vec<Vec<(Row, Diff)>> = vec![Vec::new(); import_ids.len()];
    for (time, batch) in case.batches.iter().enumerate() {
        let time = time as u64;
        for (i, updates) in batch.iter().enumerate() {
            append(
                storage,
                import_ids[i],
                updates.iter().map(|(r, d)| (r.clone(), time, *d)).collect(),
                time + 1,
            );
            contents[i].extend(updates.iter().cloned());
        }
        let inputs: BTreeMap<GlobalId, Multiset> =
            import_ids.iter().zip(&contents).map(|(id, c)| (*id, consolidate(c.iter().cloned()))).collect();
        let expected = evaluate_dataflow(&df, &inputs).map(|mut out| out.remove(&index).unwrap_or_default());
        let actual = controller.peek(PeekTarget::Index { id: index }, time, None, arity);
        check_answer(&expected, &actual, &format!("full scan at {time}"))?;
        // Key lookups: the keys of some expected rows, plus one that may match nothing.
        if let Ok(rows) = &expected {
            let key_of = |row: &Row| {
                let datums = row.unpack();
                Row::pack(index_export.key.iter().map(|c| datums[*c]))
            };
            let mut keys: Vec<Row> = rows.keys().take(3).map(key_of).collect();
            keys.push(Row::pack(index_export.key.iter().map(|_| protocol::Datum::Int64(12_345))));
            let wanted: Multiset = rows
                .iter()
                .filter(|(row, _)| keys.contains(&key_of(row)))
                .map(|(r, d)| (r.clone(), *d))
                .collect();
            let actual = controller.peek(PeekTarget::Index { id: index }, time, Some(keys), arity);
            check_answer(&Ok(wanted), &actual, &format!("key lookup at {time}"))?;
        }
    }
    controller.send(ComputeCommand::AllowCompaction { id: index, frontier: Antichain::new() });
    Ok(())
}

// Each case builds a dataflow and checks it at every time through the socket; a case costs tens of
// milliseconds, so these run max(4, PROPTEST_CASES / 8) cases (two processes: / 16).

/// Updates of a `(key, value)` table whose values include `NULL` and both extremes of `Int64`, so that
/// group sums overflow, come back into range, and go `NULL`.
fn sum_case() -> impl Strategy<Value = Case> {
    let desc = RelationDesc::new([
        ("k", ColumnType::new(ScalarType::Int64, false)),
        ("v", ColumnType::new(ScalarType::Int64, true)),
    ]);
    let value = prop_oneof![
        Just(Datum::Null),
        Just(Datum::Int64(-3)),
        Just(Datum::Int64(5)),
        Just(Datum::Int64(i64::MAX)),
        Just(Datum::Int64(i64::MIN)),
    ];
    let row = (0i64..3, value).prop_map(|(k, v)| Row::pack([Datum::Int64(k), v]));
    let updates =
        prop::collection::vec((row, prop_oneof![4 => Just(1i64), 1 => Just(-1), 1 => Just(2)]), 0..6);
    prop::collection::vec(updates.prop_map(|u| vec![u]), 1..5).prop_map(move |batches| Case {
        imports: vec![desc.clone()],
        choices: Vec::new(),
        batches,
    })
}

/// `SELECT k, sum(v) ... GROUP BY k` over the one import of a [`sum_case`], indexed by `k`.
fn sum_dataflow(case: &Case) -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new("int-sum".to_string());
    let source = GlobalId::User(1);
    df.source_imports.insert(source, SourceImport { desc: case.imports[0].clone() });
    let sum = GlobalId::Transient(100);
    df.objects_to_build.push(BuildDesc {
        id: sum,
        plan: Plan::Reduce {
            input: Box::new(Plan::Get { id: source }),
            group_key: vec![0],
            aggregates: vec![AggregateExpr { func: AggregateFunc::Sum, column: 1 }],
        },
    });
    df.index_exports.insert(GlobalId::User(200), IndexExport { on_id: sum, key: vec![0] });
    df.as_of = Some(Antichain::from_elem(0));
    df
}

// Integer sums at the edges of `Int64`, which the random plans reach only now and then.
#[test]
fn an_integer_sum_matches_the_reference_through_nulls_retractions_and_overflow() {
    run_against_reference(Shape::TwoWorkers, proptest_cases(8), sum_case(), sum_dataflow);
}

#[test]
fn every_operator_matches_the_reference_with_one_worker() {
    run_operators_against_reference(Shape::OneWorker, proptest_cases(8));
}

#[test]
fn every_operator_matches_the_reference_with_two_workers() {
    run_operators_against_reference(Shape::TwoWorkers, proptest_cases(8));
}

#[test]
fn every_operator_matches_the_reference_on_a_two_process_cluster() {
    run_operators_against_reference(Shape::TwoProcesses, proptest_cases(16));
}

/// A `Map` that fails on every row, after a `Project` onto no columns, indexed: the one import gets a row
/// and loses another at the same time.
fn failing_map_after_projection(case: &Case) -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new("map-after-project".to_string());
    let source = GlobalId::User(1);
    df.source_imports.insert(source, SourceImport { desc: case.imports[0].clone() });
    let mapped = GlobalId::Transient(100);
    let one_over_zero = ScalarExpr::literal(Datum::Int64(1))
        .call_binary(BinaryFunc::Div, ScalarExpr::literal(Datum::Int64(0)));
    df.objects_to_build.push(BuildDesc {
        id: mapped,
        plan: Plan::Map {
            input: Box::new(Plan::Project { input: Box::new(Plan::Get { id: source }), outputs: vec![] }),
            exprs: vec![one_over_zero],
        },
    });
    df.index_exports.insert(GlobalId::User(200), IndexExport { on_id: mapped, key: vec![] });
    df.as_of = Some(Antichain::from_elem(0));
    df
}

// The reference evaluates each step on its consolidated input: two rows that project onto the same row
// with opposite multiplicities leave nothing for the `Map` to fail on. A fused Map/Filter/Project pass
// sees them one by one, so its error rows must carry the row the `Map` saw (the same for both, so they
// cancel), not the row before the projection.
#[test]
fn a_map_error_after_a_projection_cancels_when_the_projected_rows_cancel() {
    let desc = RelationDesc::new([("a", ColumnType::new(ScalarType::Int64, false))]);
    let row = |v: i64| Row::pack([Datum::Int64(v)]);
    let case = Case {
        imports: vec![desc],
        choices: Vec::new(),
        batches: vec![vec![vec![(row(1), 1), (row(2), -1)]], vec![vec![(row(3), 1)]]],
    };
    run_against_reference(Shape::TwoWorkers, 1, Just(case), failing_map_after_projection);
}

/// A `(k, v)` row.
fn kv(k: i64, v: i64) -> Row {
    Row::pack([Datum::Int64(k), Datum::Int64(v)])
}

fn get() -> Plan {
    Plan::Get { id: GlobalId::User(1) }
}

/// The one import twice.
fn twice() -> Plan {
    Plan::Union { inputs: vec![get(), get()] }
}

/// The one import joined with itself on `k`: multiplicities multiply.
fn squared() -> Plan {
    Plan::Join { inputs: vec![get(), get()], equivalences: vec![vec![0, 2]] }
}

/// `count(v)` per `k`.
fn counted(input: Plan) -> Plan {
    let aggregates = vec![AggregateExpr { func: AggregateFunc::Count, column: 1 }];
    Plan::Reduce { input: Box::new(input), group_key: vec![0], aggregates }
}

/// The distinct `k`s (a reduce without aggregates: the replica counts the group's rows).
fn grouped(input: Plan) -> Plan {
    Plan::Reduce { input: Box::new(input), group_key: vec![0], aggregates: vec![] }
}

/// `sum(v)` per `k`.
fn summed(input: Plan) -> Plan {
    let aggregates = vec![AggregateExpr { func: AggregateFunc::Sum, column: 1 }];
    Plan::Reduce { input: Box::new(input), group_key: vec![0], aggregates }
}

/// The least row.
fn top_1(input: Plan) -> Plan {
    Plan::TopK { input: Box::new(input), group_key: vec![], order_key: vec![], limit: Some(1), offset: 0 }
}

/// `input` minus `input`: nothing, whatever `input` held.
fn cancelled(input: Plan) -> Plan {
    Plan::Union { inputs: vec![input.clone(), Plan::Negate { input: Box::new(input) }] }
}

/// A dataflow over one `(k, v)` import (`u1`) exporting `plan` as index `u200` on `k`.
fn kv_dataflow(plan: &Plan) -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new("overflow".to_string());
    df.source_imports.insert(GlobalId::User(1), SourceImport { desc: kv_schema() });
    df.objects_to_build.push(BuildDesc { id: GlobalId::Transient(100), plan: plan.clone() });
    df.index_exports
        .insert(GlobalId::User(200), IndexExport { on_id: GlobalId::Transient(100), key: vec![0] });
    df.as_of = Some(Antichain::from_elem(0));
    df
}

fn kv_schema() -> RelationDesc {
    RelationDesc::new([
        ("k", ColumnType::new(ScalarType::Int64, false)),
        ("v", ColumnType::new(ScalarType::Int64, false)),
    ])
}

// Multiplicities are exact inside a plan and must be `i64`s where observed (`protocol`'s `plan.rs`). Row
// `(1, 10)` has multiplicity `2^62` at time 0, then 1, then 4: each plan's answer at time 0 is an error
// exactly when the reference says so (asserted, so the case is not vacuous), the same dataflows answer
// with rows again once the multiplicities are back in range, and the replica serves every later case.
#[test]
fn joins_and_reduces_whose_multiplicities_overflow_i64_answer_with_errors_and_the_replica_keeps_serving() {
    let large = 1i64 << 62;
    let case = Case {
        imports: vec![kv_schema()],
        choices: Vec::new(),
        batches: vec![
            vec![vec![(kv(1, 10), large), (kv(2, 20), 1)]],
            vec![vec![(kv(1, 10), 1 - large)]],
            vec![vec![(kv(1, 10), 3)]],
        ],
    };
    let cases: Vec<(&str, Plan, bool)> = vec![
        ("a join's product beyond i64 in the result", squared(), true),
        ("a reduce's count beyond i64", counted(twice()), true),
        ("a reduce's group beyond i64 rows", grouped(twice()), true),
        ("a reduce's sum beyond i64", summed(get()), true),
        ("a top-k group beyond i64 rows", top_1(twice()), true),
        ("a threshold's row beyond i64 in the result", Plan::Threshold { input: Box::new(twice()) }, true),
        (
            "a join's product beyond i64 seen through a distinct",
            Plan::Distinct { input: Box::new(squared()) },
            false,
        ),
        (
            "a union beyond i64 brought back by a negation",
            Plan::Union { inputs: vec![twice(), Plan::Negate { input: Box::new(get()) }] },
            false,
        ),
    ];
    let storage = new_storage();
    let replica =
        Replica::start(Shape::TwoWorkers, Arc::clone(&storage) as Arc<dyn storage::StorageCollections>);
    let mut controller = TestController::connect(&replica.addrs());
    let next_base = std::cell::Cell::new(1_000u64);
    for (name, plan, errs_at_zero) in cases {
        let inputs = BTreeMap::from([(GlobalId::User(1), consolidate(case.batches[0][0].iter().cloned()))]);
        let at_zero = evaluate_dataflow(&kv_dataflow(&plan), &inputs);
        assert_eq!(at_zero.is_err(), errs_at_zero, "{name}: the reference at time 0 gives {at_zero:?}");
        let build = |_: &Case| kv_dataflow(&plan);
        if let Err(error) = check_case(&storage, &mut controller, &next_base, &build, &case, u128::MAX) {
            panic!("{name}: {error}");
        }
    }
    controller.close();
}

/// The plans of [`overflow_case`]s: each observes a self-join's multiplicities (products of the
/// import's) in its own way.
fn overflow_plans() -> Vec<Plan> {
    vec![
        squared(),
        counted(squared()),
        grouped(squared()),
        summed(squared()),
        top_1(squared()),
        Plan::Threshold { input: Box::new(squared()) },
        Plan::Distinct { input: Box::new(squared()) },
        cancelled(squared()),
    ]
}

/// Updates of a `(k, v)` table with multiplicities often `±LARGE`, so that a self-join's products leave
/// `i64`, come back into range and leave it again; `choices[0]` picks one of [`overflow_plans`].
fn overflow_case() -> impl Strategy<Value = Case> {
    let multiplicity = prop_oneof![3 => Just(1i64), 1 => Just(-1), 2 => Just(LARGE), 1 => Just(-LARGE)];
    let row = (0i64..2, -2i64..3).prop_map(|(k, v)| kv(k, v));
    let updates = prop::collection::vec((row, multiplicity), 0..5);
    let batches = prop::collection::vec(updates.prop_map(|u| vec![u]), 1..5);
    (0..overflow_plans().len() as u32, batches).prop_map(|(plan, batches)| Case {
        imports: vec![kv_schema()],
        choices: vec![plan],
        batches: within_storage_range(batches),
    })
}

// Random updates through joins whose products leave `i64`: every answer (rows or an error) equals the
// reference's, at every time.
#[test]
fn self_joins_whose_multiplicities_leave_i64_match_the_reference_at_every_time() {
    run_against_reference(Shape::TwoWorkers, proptest_cases(4), overflow_case(), |case| {
        kv_dataflow(&overflow_plans()[case.choices[0] as usize])
    });
}

// The three places `protocol`'s `plan.rs` says the IR departs from SQL, on the replica: a global reduce
// over an empty input has no row; a key lookup of NULL finds the rows whose key is NULL; float division by
// zero gives infinities and NaN, not an error. Each answer also equals the reference's.
#[test]
fn the_replica_departs_from_sql_where_the_ir_says() {
    let desc = RelationDesc::new([
        ("k", ColumnType::new(ScalarType::Int64, true)),
        ("x", ColumnType::new(ScalarType::Float64, true)),
    ]);
    let (empty, table) = (GlobalId::User(1), GlobalId::User(2));
    let storage = new_storage();
    create_collection(&storage, empty, desc.clone());
    create_collection(&storage, table, desc.clone());
    let row = |k: Option<i64>, x: f64| Row::pack([k.map_or(Datum::Null, Datum::Int64), Datum::float64(x)]);
    let rows = [(row(None, 1.0), 1), (row(Some(1), -1.0), 1), (row(Some(2), 0.0), 2)];
    append(&storage, empty, vec![], 1);
    append(&storage, table, rows.iter().map(|(r, d)| (r.clone(), 0, *d)).collect(), 1);
    let replica =
        Replica::start(Shape::TwoWorkers, Arc::clone(&storage) as Arc<dyn storage::StorageCollections>);
    let mut controller = TestController::connect(&replica.addrs());

    let dataflow = |name: &str, import: GlobalId, plan: Plan, index: u64| {
        let mut df = DataflowDescription::new(name.to_string());
        df.source_imports.insert(import, SourceImport { desc: desc.clone() });
        df.objects_to_build.push(BuildDesc { id: GlobalId::Transient(index), plan });
        df.index_exports
            .insert(GlobalId::User(index), IndexExport { on_id: GlobalId::Transient(index), key: vec![0] });
        df.as_of = Some(Antichain::from_elem(0));
        df
    };
    let inputs = BTreeMap::from([(empty, Multiset::new()), (table, consolidate(rows.iter().cloned()))]);
    let expected = |df: &DataflowDescription<u64>, index: u64| {
        evaluate_dataflow(df, &inputs).expect("no error").remove(&GlobalId::User(index)).unwrap_or_default()
    };

    let aggregates = vec![
        AggregateExpr { func: AggregateFunc::Count, column: 1 },
        AggregateExpr { func: AggregateFunc::Sum, column: 1 },
    ];
    let global = Plan::Reduce { input: Box::new(Plan::Get { id: empty }), group_key: vec![], aggregates };
    let global = dataflow("global", empty, global, 10);
    controller.create_dataflow(global.clone());
    let answer = rows_of(controller.peek(PeekTarget::Index { id: GlobalId::User(10) }, 0, None, 2));
    assert!(answer.is_empty(), "a global reduce over nothing: {answer:?}");
    assert_eq!(answer, expected(&global, 10));

    let by_zero =
        ScalarExpr::column(1).call_binary(BinaryFunc::Div, ScalarExpr::literal(Datum::float64(0.0)));
    let divided = Plan::Map { input: Box::new(Plan::Get { id: table }), exprs: vec![by_zero] };
    let divided = dataflow("divided", table, divided, 11);
    controller.create_dataflow(divided.clone());
    let index = PeekTarget::Index { id: GlobalId::User(11) };
    let all = rows_of(controller.peek(index, 0, None, 3));
    assert_eq!(all, expected(&divided, 11));
    let quotients: Vec<Datum<'_>> = all.keys().map(|r| r.unpack()[2]).collect();
    assert!(quotients.contains(&Datum::float64(f64::INFINITY)), "{quotients:?}");
    assert!(quotients.contains(&Datum::float64(f64::NEG_INFINITY)), "{quotients:?}");
    assert!(quotients.contains(&Datum::float64(f64::NAN)), "{quotients:?}");
    let null_key = rows_of(controller.peek(index, 0, Some(vec![Row::pack([Datum::Null])]), 3));
    let with_null: Vec<&Row> = null_key.keys().collect();
    assert_eq!(
        with_null,
        vec![&Row::pack([Datum::Null, Datum::float64(1.0), Datum::float64(f64::INFINITY)])]
    );
    controller.close();
}
