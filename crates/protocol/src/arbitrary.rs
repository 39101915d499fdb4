//! Proptest strategies for protocol types, shared with other crates' tests (feature `proptest`).
//!
//! - [`owned_datum`], [`row_of`]: random datums and rows of a given type;
//! - [`command`], [`response`]: arbitrary messages for round-trip tests (not necessarily valid);
//! - [`valid_dataflow`]: a dataflow description that validates, built by a type-directed generator driven
//!   by a vector of choices (so proptest shrinks it by shrinking the choices);
//! - [`Breakage`] / [`broken_dataflow`]: a valid dataflow with one known defect, and the error
//!   `validate` must report for it;
//! - [`sql`] (feature `sqlite`): random plans with the SQL that computes the same relation, over random
//!   tables and updates, and SQLite to answer it: a differential oracle for the plan IR.
//!
//! **Invariant:** every dataflow from [`valid_dataflow`] passes `validate`; every one from
//! [`broken_dataflow`] fails it with exactly the paired error (both property-tested in `tests/it`).

#[cfg(feature = "sqlite")]
pub mod sql;

use std::collections::BTreeMap;
use std::num::NonZeroU64;

use proptest::prelude::*;

use frontiers::Antichain;

use crate::{
    AggregateExpr, AggregateFunc, BinaryFunc, BuildDesc, ColumnOrder, ColumnType, ComputeCommand,
    ComputeParameters, ComputeResponse, ControllerEpoch, CopyToResponse, DataflowDescription,
    DataflowValidationError, Datum, Diff, ExprTypeError, FrontiersResponse, GlobalId, IndexExport,
    InstanceConfig, InstanceId, MapFilterProject, Peek, PeekId, PeekResponse, PeekTarget, Plan, PlanError,
    RelationDesc, RelationType, ReplicaId, Row, RowSetFinishing, ScalarExpr, ScalarType, SinkConnection,
    SinkExport, SourceImport, StatusResponse, SubscribeBatch, SubscribeResponse, UnaryFunc,
};

/// An owned [`Datum`], for strategies and test models.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OwnedDatum {
    /// `NULL`.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int64(i64),
    /// A float (canonical).
    Float64(crate::F64),
    /// Text.
    Text(String),
    /// Bytes.
    Bytes(Vec<u8>),
    /// A timestamp.
    Timestamp(u64),
    /// A decimal.
    Decimal(crate::Decimal),
    /// A date.
    Date(i32),
    /// An interval.
    Interval(crate::Interval),
}

impl From<Datum<'_>> for OwnedDatum {
    fn from(datum: Datum<'_>) -> Self {
        match datum {
            Datum::Null => OwnedDatum::Null,
            Datum::Bool(b) => OwnedDatum::Bool(b),
            Datum::Int64(i) => OwnedDatum::Int64(i),
            Datum::Float64(x) => OwnedDatum::Float64(x),
            Datum::Text(s) => OwnedDatum::Text(s.to_string()),
            Datum::Bytes(b) => OwnedDatum::Bytes(b.to_vec()),
            Datum::Timestamp(t) => OwnedDatum::Timestamp(t),
            Datum::Decimal(d) => OwnedDatum::Decimal(d),
            Datum::Date(d) => OwnedDatum::Date(d),
            Datum::Interval(i) => OwnedDatum::Interval(i),
        }
    }
}

impl OwnedDatum {
    /// Borrows it as a [`Datum`].
    pub fn as_datum(&self) -> Datum<'_> {
        match self {
            OwnedDatum::Null => Datum::Null,
            OwnedDatum::Bool(b) => Datum::Bool(*b),
            OwnedDatum::Int64(i) => Datum::Int64(*i),
            OwnedDatum::Float64(x) => Datum::Float64(*x),
            OwnedDatum::Text(s) => Datum::Text(s),
            OwnedDatum::Bytes(b) => Datum::Bytes(b),
            OwnedDatum::Timestamp(t) => Datum::Timestamp(*t),
            OwnedDatum::Decimal(d) => Datum::Decimal(*d),
            OwnedDatum::Date(d) => Datum::Date(*d),
            OwnedDatum::Interval(i) => Datum::Interval(*i),
        }
    }
}

/// Packs owned datums into a row.
pub fn pack_owned(datums: &[OwnedDatum]) -> Row {
    Row::pack(datums.iter().map(OwnedDatum::as_datum))
}

/// Any datum.
pub fn owned_datum() -> impl Strategy<Value = OwnedDatum> {
    prop_oneof![
        Just(OwnedDatum::Null),
        any::<bool>().prop_map(OwnedDatum::Bool),
        any::<i64>().prop_map(OwnedDatum::Int64),
        any::<f64>().prop_map(|x| OwnedDatum::Float64(crate::F64::new(x))),
        ".{0,12}".prop_map(OwnedDatum::Text),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(OwnedDatum::Bytes),
        any::<u64>().prop_map(OwnedDatum::Timestamp),
        decimal(),
        any::<i32>().prop_map(OwnedDatum::Date),
        (any::<i32>(), any::<i32>(), any::<i64>())
            .prop_map(|(months, days, ms)| OwnedDatum::Interval(crate::Interval { months, days, ms })),
    ]
}

/// Any decimal: a mantissa of up to 96 bits and a scale up to 28.
fn decimal() -> impl Strategy<Value = OwnedDatum> {
    (any::<i128>(), 0u8..=28).prop_map(|(mantissa, scale)| {
        let mantissa = mantissa % (1i128 << 96);
        OwnedDatum::Decimal(crate::Decimal::new(mantissa, scale).expect("below 2^96"))
    })
}

/// A non-null datum of `scalar_type`, from a small domain (so joins and groups find matches).
pub fn datum_of(scalar_type: ScalarType) -> BoxedStrategy<OwnedDatum> {
    match scalar_type {
        ScalarType::Bool => any::<bool>().prop_map(OwnedDatum::Bool).boxed(),
        ScalarType::Int64 => (-5i64..20).prop_map(OwnedDatum::Int64).boxed(),
        ScalarType::Float64 => {
            (-4i32..8).prop_map(|x| OwnedDatum::Float64(crate::F64::new(f64::from(x) / 2.0))).boxed()
        }
        ScalarType::Text => "[a-d]{0,3}".prop_map(OwnedDatum::Text).boxed(),
        ScalarType::Bytes => prop::collection::vec(0u8..4, 0..3).prop_map(OwnedDatum::Bytes).boxed(),
        ScalarType::Timestamp => (0u64..10).prop_map(OwnedDatum::Timestamp).boxed(),
        ScalarType::Decimal { scale } => (-40i128..40)
            .prop_map(move |m| OwnedDatum::Decimal(crate::Decimal::new(m * 5, scale.min(2)).expect("small")))
            .boxed(),
        ScalarType::Date => (10_000i32..10_010).prop_map(OwnedDatum::Date).boxed(),
        ScalarType::Interval => {
            (-2i32..3).prop_map(|d| OwnedDatum::Interval(crate::Interval::days(d))).boxed()
        }
    }
}

/// A row of type `typ` (nullable columns are `NULL` a fifth of the time).
pub fn row_of(typ: &RelationType) -> BoxedStrategy<Row> {
    let columns: Vec<BoxedStrategy<OwnedDatum>> = typ
        .column_types
        .iter()
        .map(|c| {
            if c.nullable {
                prop_oneof![1 => Just(OwnedDatum::Null), 4 => datum_of(c.scalar_type)].boxed()
            } else {
                datum_of(c.scalar_type)
            }
        })
        .collect();
    columns.prop_map(|datums| pack_owned(&datums)).boxed()
}

/// Any scalar type.
pub fn scalar_type() -> impl Strategy<Value = ScalarType> {
    prop_oneof![
        Just(ScalarType::Bool),
        Just(ScalarType::Int64),
        Just(ScalarType::Float64),
        Just(ScalarType::Text),
        Just(ScalarType::Bytes),
        Just(ScalarType::Timestamp),
        (0u8..4).prop_map(|scale| ScalarType::Decimal { scale }),
        Just(ScalarType::Date),
        Just(ScalarType::Interval),
    ]
}

/// Any column type.
pub fn column_type() -> impl Strategy<Value = ColumnType> {
    (scalar_type(), any::<bool>()).prop_map(|(s, n)| ColumnType::new(s, n))
}

/// A schema of 1 to 4 columns named `c0, c1, ...`.
pub fn relation_desc() -> impl Strategy<Value = RelationDesc> {
    prop::collection::vec(column_type(), 1..5)
        .prop_map(|types| RelationDesc::new(types.into_iter().enumerate().map(|(i, t)| (format!("c{i}"), t))))
}

/// Any id.
pub fn global_id() -> impl Strategy<Value = GlobalId> {
    prop_oneof![
        (0u64..50).prop_map(GlobalId::User),
        (0u64..5).prop_map(GlobalId::System),
        (0u64..5).prop_map(GlobalId::Transient)
    ]
}

fn frontier() -> impl Strategy<Value = Antichain<u64>> {
    prop_oneof![1 => Just(Antichain::new()), 4 => any::<u64>().prop_map(Antichain::from_elem)]
}

fn mfp() -> impl Strategy<Value = MapFilterProject> {
    (0usize..4, prop::collection::vec(0usize..6, 0..4)).prop_map(|(arity, projection)| MapFilterProject {
        input_arity: arity,
        expressions: vec![
            ScalarExpr::column(0).call_binary(BinaryFunc::Add, ScalarExpr::literal(Datum::Int64(1))),
        ],
        predicates: vec![ScalarExpr::column(0).call_unary(UnaryFunc::IsNull)],
        projection,
    })
}

fn finishing() -> impl Strategy<Value = RowSetFinishing> {
    (
        prop::collection::vec((0usize..4, any::<bool>(), any::<bool>()), 0..3),
        prop::option::of(0usize..100),
        0usize..10,
    )
        .prop_map(|(order, limit, offset)| RowSetFinishing {
            order_by: order
                .into_iter()
                .map(|(column, desc, nulls_last)| ColumnOrder { column, desc, nulls_last })
                .collect(),
            limit,
            offset,
        })
}

fn rows() -> impl Strategy<Value = Vec<Row>> {
    prop::collection::vec(prop::collection::vec(owned_datum(), 0..4).prop_map(|d| pack_owned(&d)), 0..4)
}

/// An arbitrary command (a valid dataflow inside `CreateDataflow`; other fields arbitrary).
pub fn command() -> impl Strategy<Value = ComputeCommand<u64>> {
    prop_oneof![
        (any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(version, nonce, epoch, session)| {
                ComputeCommand::Hello { version, nonce, epoch: ControllerEpoch(epoch), session }
            }
        ),
        (any::<u64>(), any::<u64>()).prop_map(|(i, r)| {
            ComputeCommand::CreateInstance(InstanceConfig {
                instance_id: InstanceId(i),
                replica_id: ReplicaId(r),
            })
        }),
        Just(ComputeCommand::InitializationComplete),
        (prop::option::of(0usize..16), prop::option::of(any::<u64>()), prop::option::of(any::<u64>()))
            .prop_map(|(hydration_concurrency, max_result_size_bytes, idle_merge_effort)| {
                ComputeCommand::UpdateConfiguration(ComputeParameters {
                    hydration_concurrency,
                    max_result_size_bytes,
                    idle_merge_effort,
                })
            }),
        valid_dataflow().prop_map(ComputeCommand::CreateDataflow),
        global_id().prop_map(ComputeCommand::Schedule),
        (global_id(), frontier()).prop_map(|(id, frontier)| ComputeCommand::AllowCompaction { id, frontier }),
        (
            any::<u64>(),
            global_id(),
            any::<bool>(),
            any::<u64>(),
            prop::option::of(rows()),
            mfp(),
            finishing()
        )
            .prop_map(
                |(uuid, id, index, timestamp, literal_constraints, map_filter_project, finishing)| {
                    ComputeCommand::Peek(Peek {
                        uuid: PeekId(uuid),
                        target: if index { PeekTarget::Index { id } } else { PeekTarget::Storage { id } },
                        timestamp,
                        literal_constraints,
                        map_filter_project,
                        finishing,
                    })
                }
            ),
        any::<u64>().prop_map(|uuid| ComputeCommand::CancelPeek { uuid: PeekId(uuid) }),
        Just(ComputeCommand::AllowWrites),
    ]
}

/// An arbitrary response (well-formed: it passes `ComputeResponse::check`).
pub fn response() -> impl Strategy<Value = ComputeResponse<u64>> {
    let peek_response = prop_oneof![
        prop::collection::vec((prop::collection::vec(owned_datum(), 0..4), 1u64..5), 0..5).prop_map(|rows| {
            PeekResponse::Rows(
                rows.into_iter().map(|(d, n)| (pack_owned(&d), NonZeroU64::new(n).unwrap())).collect(),
            )
        }),
        ".{0,20}".prop_map(PeekResponse::Error),
        Just(PeekResponse::Canceled),
        (any::<u64>(), any::<u64>())
            .prop_map(|(size_bytes, max_bytes)| PeekResponse::ResultTooLarge { size_bytes, max_bytes }),
    ];
    let subscribe = prop_oneof![
        (
            0u64..100,
            0u64..10,
            prop::collection::vec((0u64..10, prop::collection::vec(owned_datum(), 0..3), -3i64..4), 0..5)
        )
            .prop_map(|(lower, width, updates)| SubscribeResponse::Batch(SubscribeBatch {
                lower: Antichain::from_elem(lower),
                upper: Antichain::from_elem(lower + width + 1),
                updates: Ok(updates
                    .into_iter()
                    .map(|(t, d, diff)| (lower + t.min(width), pack_owned(&d), diff as Diff))
                    .collect()),
            })),
        ".{0,20}".prop_map(|e| SubscribeResponse::Batch(SubscribeBatch {
            lower: Antichain::from_elem(0),
            upper: Antichain::new(),
            updates: Err(e)
        })),
        frontier().prop_map(SubscribeResponse::DroppedAt),
    ];
    prop_oneof![
        (any::<u32>(), any::<u64>()).prop_map(|(version, nonce)| ComputeResponse::Hello { version, nonce }),
        (any::<u32>(), ".{0,20}")
            .prop_map(|(version, reason)| ComputeResponse::HelloRefused { version, reason }),
        any::<u64>().prop_map(|epoch| ComputeResponse::Fenced { current: ControllerEpoch(epoch) }),
        (
            global_id(),
            prop::option::of(frontier()),
            prop::option::of(frontier()),
            prop::option::of(frontier())
        )
            .prop_map(|(id, write_frontier, input_frontier, output_frontier)| {
                ComputeResponse::Frontiers {
                    id,
                    frontiers: FrontiersResponse { write_frontier, input_frontier, output_frontier },
                }
            }),
        (any::<u64>(), peek_response)
            .prop_map(|(uuid, response)| ComputeResponse::PeekResponse { uuid: PeekId(uuid), response }),
        (global_id(), subscribe)
            .prop_map(|(id, response)| ComputeResponse::SubscribeResponse { id, response }),
        (
            global_id(),
            prop_oneof![
                any::<u64>().prop_map(CopyToResponse::RowCount),
                ".{0,10}".prop_map(CopyToResponse::Error),
                Just(CopyToResponse::Dropped)
            ]
        )
            .prop_map(|(id, response)| ComputeResponse::CopyToResponse { id, response }),
        (global_id(), any::<bool>())
            .prop_map(|(id, hydrated)| ComputeResponse::Status(StatusResponse::Hydration { id, hydrated })),
        (global_id(), ".{0,20}")
            .prop_map(|(id, error)| ComputeResponse::Status(StatusResponse::Failed { id, error })),
        (".{0,10}", ".{0,20}")
            .prop_map(|(command, reason)| ComputeResponse::CommandRejected { command, reason }),
    ]
}

/// A deterministic source of choices for the type-directed generators: each call picks from `0..n`.
#[derive(Debug, Clone)]
pub struct Choices {
    values: Vec<u32>,
    position: usize,
}

impl Choices {
    /// Choices from a vector (cycled; all zeros once empty).
    pub fn new(values: Vec<u32>) -> Self {
        Choices { values, position: 0 }
    }

    /// A choice in `0..n` (`n > 0`).
    pub fn pick(&mut self, n: usize) -> usize {
        assert!(n > 0, "pick from an empty range");
        if self.values.is_empty() {
            return 0;
        }
        let value = self.values[self.position % self.values.len()];
        self.position += 1;
        value as usize % n
    }

    /// A coin flip.
    pub fn flip(&mut self) -> bool {
        self.pick(2) == 1
    }
}

fn literal_of(choices: &mut Choices, scalar_type: ScalarType) -> ScalarExpr {
    let datum = match scalar_type {
        ScalarType::Bool => OwnedDatum::Bool(choices.flip()),
        ScalarType::Int64 => OwnedDatum::Int64(choices.pick(7) as i64 - 2),
        ScalarType::Float64 => OwnedDatum::Float64(crate::F64::new(choices.pick(5) as f64 / 2.0)),
        ScalarType::Text => OwnedDatum::Text(["a", "b", ""][choices.pick(3)].to_string()),
        ScalarType::Bytes => OwnedDatum::Bytes(vec![choices.pick(3) as u8]),
        ScalarType::Timestamp => OwnedDatum::Timestamp(choices.pick(5) as u64),
        ScalarType::Decimal { scale } => OwnedDatum::Decimal(
            crate::Decimal::new(choices.pick(9) as i128 - 4, scale.min(1)).expect("small"),
        ),
        ScalarType::Date => OwnedDatum::Date(10_000 + choices.pick(5) as i32),
        ScalarType::Interval => OwnedDatum::Interval(crate::Interval::months(choices.pick(3) as i32)),
    };
    ScalarExpr::literal(datum.as_datum())
}

/// A well-typed expression over `input` of scalar type `want` (a literal if no column fits).
pub fn expr_of(choices: &mut Choices, input: &RelationType, want: ScalarType, depth: usize) -> ScalarExpr {
    let columns: Vec<usize> =
        (0..input.arity()).filter(|c| input.column_types[*c].scalar_type == want).collect();
    let leaf = |choices: &mut Choices| {
        if !columns.is_empty() && choices.pick(3) > 0 {
            ScalarExpr::column(columns[choices.pick(columns.len())])
        } else {
            literal_of(choices, want)
        }
    };
    if depth == 0 {
        return leaf(choices);
    }
    match (want, choices.pick(5)) {
        (ScalarType::Int64, 0) => expr_of(choices, input, want, depth - 1).call_binary(
            [BinaryFunc::Add, BinaryFunc::Sub, BinaryFunc::Mul, BinaryFunc::Div, BinaryFunc::Mod]
                [choices.pick(5)],
            expr_of(choices, input, want, depth - 1),
        ),
        (ScalarType::Float64, 0) => expr_of(choices, input, want, depth - 1).call_binary(
            [BinaryFunc::Add, BinaryFunc::Mul][choices.pick(2)],
            expr_of(choices, input, want, depth - 1),
        ),
        (ScalarType::Bool, 0) => {
            let operand = [ScalarType::Int64, ScalarType::Text, ScalarType::Bool][choices.pick(3)];
            expr_of(choices, input, operand, depth - 1).call_binary(
                [BinaryFunc::Eq, BinaryFunc::Lt, BinaryFunc::Gte, BinaryFunc::NotEq][choices.pick(4)],
                expr_of(choices, input, operand, depth - 1),
            )
        }
        (ScalarType::Bool, 1) => expr_of(choices, input, want, depth - 1).call_binary(
            [BinaryFunc::And, BinaryFunc::Or][choices.pick(2)],
            expr_of(choices, input, want, depth - 1),
        ),
        (ScalarType::Bool, 2) => {
            let operand = [ScalarType::Int64, ScalarType::Text][choices.pick(2)];
            expr_of(choices, input, operand, depth - 1).call_unary(UnaryFunc::IsNull)
        }
        (_, 3) => expr_of(choices, input, ScalarType::Bool, depth - 1)
            .if_then_else(expr_of(choices, input, want, depth - 1), expr_of(choices, input, want, depth - 1)),
        _ => leaf(choices),
    }
}

fn subset(choices: &mut Choices, arity: usize, max: usize) -> Vec<usize> {
    if arity == 0 {
        return Vec::new();
    }
    (0..choices.pick(max + 1)).map(|_| choices.pick(arity)).collect()
}

/// A well-typed plan over the relations in `context`, and its type.
pub fn plan_of(
    choices: &mut Choices,
    context: &[(GlobalId, RelationType)],
    depth: usize,
) -> (Plan, RelationType) {
    if depth == 0 || choices.pick(4) == 0 {
        if context.is_empty() || choices.pick(6) == 0 {
            let typ = RelationType::new(vec![
                ColumnType::new(ScalarType::Int64, false),
                ColumnType::new(ScalarType::Text, true),
            ]);
            let rows = (0..choices.pick(4))
                .map(|i| (Row::pack([Datum::Int64(i as i64), Datum::Text("k")]), 1 + choices.pick(2) as Diff))
                .collect();
            return (Plan::Constant { rows, typ: typ.clone() }, typ);
        }
        let (id, typ) = &context[choices.pick(context.len())];
        return (Plan::get(*id), typ.clone());
    }
    let (input, typ) = plan_of(choices, context, depth - 1);
    let boxed = Box::new(input.clone());
    match choices.pick(11) {
        0 => {
            let want = [ScalarType::Int64, ScalarType::Bool, ScalarType::Text][choices.pick(3)];
            let expr = expr_of(choices, &typ, want, 2);
            let column = expr.typ(&typ).expect("generated expressions are well-typed");
            let mut out = typ.clone();
            out.column_types.push(column);
            (Plan::Map { input: boxed, exprs: vec![expr] }, out)
        }
        1 => (
            Plan::Filter { input: boxed, predicates: vec![expr_of(choices, &typ, ScalarType::Bool, 2)] },
            typ,
        ),
        2 => {
            let outputs = subset(choices, typ.arity(), 3);
            let out = RelationType::new(outputs.iter().map(|c| typ.column_types[*c]).collect());
            (Plan::Project { input: boxed, outputs }, out)
        }
        3 => {
            let (other, other_typ) = plan_of(choices, context, depth - 1);
            let mut out = typ.clone();
            out.column_types.extend(other_typ.column_types.iter().copied());
            let mut equivalences = Vec::new();
            let left = choices.pick(typ.arity().max(1));
            if let Some(left_type) = typ.column_types.get(left)
                && let Some(right) =
                    other_typ.column_types.iter().position(|c| c.scalar_type == left_type.scalar_type)
            {
                equivalences.push(vec![left, typ.arity() + right]);
            }
            (Plan::Join { inputs: vec![input, other], equivalences }, out)
        }
        4 => {
            let group_key = subset(choices, typ.arity(), 2);
            let mut out: Vec<ColumnType> = group_key.iter().map(|c| typ.column_types[*c]).collect();
            let mut aggregates = Vec::new();
            if typ.arity() > 0 {
                for _ in 0..choices.pick(3) {
                    let column = choices.pick(typ.arity());
                    let func = [
                        AggregateFunc::Count,
                        AggregateFunc::Sum,
                        AggregateFunc::Min,
                        AggregateFunc::Max,
                        AggregateFunc::CountRows,
                        AggregateFunc::Avg,
                    ][choices.pick(6)];
                    let func = if func.output_type(typ.column_types[column]).is_some() {
                        func
                    } else {
                        AggregateFunc::Count
                    };
                    out.push(
                        func.output_type(typ.column_types[column]).expect("count applies to every type"),
                    );
                    aggregates.push(AggregateExpr { func, column });
                }
            }
            (Plan::Reduce { input: boxed, group_key, aggregates }, RelationType::new(out))
        }
        5 => (Plan::Distinct { input: boxed }, typ),
        6 => (Plan::Union { inputs: vec![input.clone(), Plan::Negate { input: Box::new(input) }] }, typ),
        7 => (Plan::Threshold { input: boxed }, typ),
        8 => {
            let group_key = subset(choices, typ.arity(), 1);
            let order_key = subset(choices, typ.arity(), 2)
                .into_iter()
                .map(|column| ColumnOrder { column, desc: choices.flip(), nulls_last: choices.flip() })
                .collect();
            let limit = if choices.flip() { Some(choices.pick(4)) } else { None };
            (Plan::TopK { input: boxed, group_key, order_key, limit, offset: choices.pick(2) }, typ)
        }
        9 => (Plan::ArrangeBy { input: boxed, key: subset(choices, typ.arity(), 2) }, typ),
        _ => (Plan::Negate { input: boxed }, typ),
    }
}

/// Builds a valid dataflow from choices: 1 to 2 storage imports, 1 to 3 objects, an index on the last
/// object, and sometimes a sink.
pub fn dataflow_from_choices(choices: &mut Choices, imports: &[RelationDesc]) -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new(format!("generated-{}", choices.pick(1000)));
    let mut context: Vec<(GlobalId, RelationType)> = Vec::new();
    for (i, desc) in imports.iter().enumerate() {
        let id = GlobalId::User(i as u64 + 1);
        df.source_imports.insert(id, SourceImport { desc: desc.clone() });
        context.push((id, desc.typ().clone()));
    }
    let objects = 1 + choices.pick(3);
    let mut last_type = RelationType::default();
    for i in 0..objects {
        let id = GlobalId::Transient(100 + i as u64);
        let (plan, typ) = plan_of(choices, &context, 3);
        df.objects_to_build.push(BuildDesc { id, plan });
        context.push((id, typ.clone()));
        last_type = typ;
    }
    let last = df.objects_to_build.last().expect("at least one object").id;
    df.index_exports
        .insert(GlobalId::User(200), IndexExport { on_id: last, key: subset(choices, last_type.arity(), 2) });
    if choices.flip() {
        let desc =
            RelationDesc::new(last_type.column_types.iter().enumerate().map(|(i, t)| (format!("c{i}"), *t)));
        let connection = match choices.pick(3) {
            0 => SinkConnection::Subscribe { with_snapshot: choices.flip() },
            1 => SinkConnection::MaterializedView { target: GlobalId::User(300) },
            _ => SinkConnection::CopyTo { directory: "/tmp/copy".to_string() },
        };
        df.sink_exports.insert(GlobalId::User(201), SinkExport { from: last, desc, connection });
    }
    df.as_of = Some(Antichain::from_elem(choices.pick(10) as u64));
    df
}

/// A dataflow description that validates.
pub fn valid_dataflow() -> impl Strategy<Value = DataflowDescription<u64>> {
    (prop::collection::vec(relation_desc(), 1..3), prop::collection::vec(any::<u32>(), 1..64))
        .prop_map(|(imports, values)| dataflow_from_choices(&mut Choices::new(values), &imports))
}

/// A defect planted in a valid dataflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breakage {
    /// No as-of.
    MissingAsOf,
    /// An empty as-of.
    EmptyAsOf,
    /// A `Get` of an id nobody defines.
    UnknownGet,
    /// A projection of a column beyond the arity.
    ProjectOutOfRange,
    /// A non-boolean filter predicate.
    NonBooleanFilter,
    /// An index export on an id that is not built.
    ExportOfUnknownObject,
    /// An object id defined twice.
    DuplicateObject,
    /// An index key beyond the arity.
    IndexKeyOutOfRange,
    /// No exports at all.
    NoExports,
}

/// Plants `breakage` in `df` (a valid dataflow) and returns the error `validate` must then report.
pub fn break_dataflow(df: &mut DataflowDescription<u64>, breakage: Breakage) -> DataflowValidationError {
    let first = df.objects_to_build[0].id;
    let first_type = df.object_type(first).expect("valid dataflow");
    let unknown = GlobalId::User(999_999);
    match breakage {
        Breakage::MissingAsOf => {
            df.as_of = None;
            DataflowValidationError::MissingAsOf(df.debug_name.clone())
        }
        Breakage::EmptyAsOf => {
            df.as_of = Some(Antichain::new());
            DataflowValidationError::EmptyAsOf(df.debug_name.clone())
        }
        Breakage::UnknownGet => {
            df.objects_to_build[0].plan = Plan::get(unknown);
            DataflowValidationError::Plan { id: first, error: PlanError::UnknownId(unknown) }
        }
        Breakage::ProjectOutOfRange => {
            let plan = std::mem::replace(&mut df.objects_to_build[0].plan, Plan::get(unknown));
            let arity = first_type.arity();
            df.objects_to_build[0].plan = Plan::Project { input: Box::new(plan), outputs: vec![arity] };
            DataflowValidationError::Plan {
                id: first,
                error: PlanError::ColumnOutOfRange { operator: "Project", column: arity, arity },
            }
        }
        Breakage::NonBooleanFilter => {
            let plan = std::mem::replace(&mut df.objects_to_build[0].plan, Plan::get(unknown));
            df.objects_to_build[0].plan = Plan::Filter {
                input: Box::new(plan),
                predicates: vec![ScalarExpr::literal(Datum::Int64(1))],
            };
            DataflowValidationError::Plan {
                id: first,
                error: PlanError::Expr {
                    operator: "Filter",
                    error: ExprTypeError::BadArguments {
                        func: "Filter".to_string(),
                        argument_types: vec![ScalarType::Int64],
                    },
                },
            }
        }
        Breakage::ExportOfUnknownObject => {
            let export = GlobalId::User(777);
            df.index_exports.insert(export, IndexExport { on_id: unknown, key: vec![] });
            DataflowValidationError::UnknownObject { export, object: unknown }
        }
        Breakage::DuplicateObject => {
            let copy = df.objects_to_build[0].clone();
            df.objects_to_build.push(copy);
            DataflowValidationError::DuplicateId(first)
        }
        Breakage::IndexKeyOutOfRange => {
            let export = GlobalId::User(778);
            let arity = first_type.arity();
            df.index_exports.insert(export, IndexExport { on_id: first, key: vec![arity] });
            DataflowValidationError::KeyOutOfRange { id: export, column: arity, arity }
        }
        Breakage::NoExports => {
            df.index_exports.clear();
            df.sink_exports.clear();
            DataflowValidationError::NoExports(df.debug_name.clone())
        }
    }
}

/// A valid dataflow with one planted defect, and the error `validate` must report.
pub fn broken_dataflow() -> impl Strategy<Value = (DataflowDescription<u64>, DataflowValidationError)> {
    let breakage = prop_oneof![
        Just(Breakage::MissingAsOf),
        Just(Breakage::EmptyAsOf),
        Just(Breakage::UnknownGet),
        Just(Breakage::ProjectOutOfRange),
        Just(Breakage::NonBooleanFilter),
        Just(Breakage::ExportOfUnknownObject),
        Just(Breakage::DuplicateObject),
        Just(Breakage::IndexKeyOutOfRange),
        Just(Breakage::NoExports),
    ];
    (valid_dataflow(), breakage).prop_map(|(mut df, breakage)| {
        let error = break_dataflow(&mut df, breakage);
        (df, error)
    })
}

/// A map of the storage imports' schemas of a generated dataflow (for building matching inputs).
pub fn import_types(df: &DataflowDescription<u64>) -> BTreeMap<GlobalId, RelationType> {
    df.source_imports.iter().map(|(id, import)| (*id, import.desc.typ().clone())).collect()
}
