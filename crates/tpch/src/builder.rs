//! A small relational builder over the plan IR, so that a query reads like its SQL: relations with named,
//! typed columns ([`Rel`]), expressions by column name, joins by pairs of names, and a [`QueryBuilder`]
//! that collects a dataflow's imports and its built objects (a relation used twice is built once and
//! read with a `Get`, [`QueryBuilder::bind`]).
//!
//! Everything here only *builds* IR: the plans are validated by `DataflowDescription::validate` and run by
//! the replica like any other. A mistake in a query (an unknown column name) is a bug in this crate, so it
//! panics with the name.

use std::collections::BTreeMap;

use frontiers::Antichain;
use protocol::{
    AggregateExpr, AggregateFunc, BinaryFunc, BuildDesc, ColumnOrder, ColumnType, DataflowDescription, Datum,
    GlobalId, IndexExport, Interval, Plan, RelationType, RowSetFinishing, ScalarExpr, ScalarType,
    SourceImport, UnaryFunc, days_from_civil, joins,
};

use crate::schema::{Catalog, Table};

/// A relation under construction: its plan and its columns' names and types.
#[derive(Debug, Clone)]
pub struct Rel {
    /// The plan.
    pub plan: Plan,
    names: Vec<String>,
    typ: RelationType,
}

impl Rel {
    /// The index of column `name`.
    ///
    /// # Panics
    /// If there is no such column (a bug in the query).
    pub fn idx(&self, name: &str) -> usize {
        let found = self.names.iter().position(|n| n == name);
        assert!(found.is_some(), "no column {name} among {:?}", self.names);
        found.expect("asserted")
    }

    /// A reference to column `name`.
    pub fn c(&self, name: &str) -> ScalarExpr {
        ScalarExpr::column(self.idx(name))
    }

    /// The column names.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The column types.
    pub fn typ(&self) -> &RelationType {
        &self.typ
    }

    /// Rows for which every predicate is true.
    pub fn filter(self, predicates: impl FnOnce(&Rel) -> Vec<ScalarExpr>) -> Rel {
        let predicates = predicates(&self);
        Rel { plan: Plan::Filter { input: Box::new(self.plan), predicates }, ..self }
    }

    /// The relation with named computed columns appended (each may use the ones before it by name).
    pub fn map(self, columns: impl FnOnce(&Rel) -> Vec<(&'static str, ScalarExpr)>) -> Rel {
        let columns = columns(&self);
        let (mut names, mut typ) = (self.names, self.typ);
        let mut exprs = Vec::new();
        for (name, expr) in columns {
            let column = expr.typ(&typ);
            assert!(column.is_ok(), "{name}: {column:?}");
            typ.column_types.push(column.expect("asserted"));
            names.push(name.to_string());
            exprs.push(expr);
        }
        Rel { plan: Plan::Map { input: Box::new(self.plan), exprs }, names, typ }
    }

    /// The named columns, in that order.
    pub fn project(self, names: &[&str]) -> Rel {
        let outputs: Vec<usize> = names.iter().map(|n| self.idx(n)).collect();
        let typ = RelationType::new(outputs.iter().map(|c| self.typ.column_types[*c]).collect());
        let names = names.iter().map(|n| n.to_string()).collect();
        Rel { plan: Plan::Project { input: Box::new(self.plan), outputs }, names, typ }
    }

    /// The relation with every column renamed `prefix` + its name (for self-joins).
    pub fn prefixed(self, prefix: &str) -> Rel {
        let names = self.names.iter().map(|n| format!("{prefix}{n}")).collect();
        Rel { names, ..self }
    }

    /// The inner join of `self` and `other` on equal columns (pairs of a name of each).
    pub fn join(self, other: Rel, on: &[(&str, &str)]) -> Rel {
        let arity = self.typ.arity();
        let equivalences = on.iter().map(|(l, r)| vec![self.idx(l), arity + other.idx(r)]).collect();
        let plan = Plan::Join { inputs: vec![self.plan, other.plan], equivalences };
        let names = self.names.into_iter().chain(other.names).collect();
        let mut typ = self.typ;
        typ.column_types.extend(other.typ.column_types);
        Rel { plan, names, typ }
    }

    /// The cross product of `self` and `other` (one of them a single row, in these queries).
    pub fn cross(self, other: Rel) -> Rel {
        self.join(other, &[])
    }

    fn lowered(
        &self,
        other: &Rel,
        on: &[(&str, &str)],
        residual: impl FnOnce(&Rel) -> Vec<ScalarExpr>,
    ) -> (Vec<(usize, usize)>, Vec<ScalarExpr>) {
        let on = on.iter().map(|(l, r)| (self.idx(l), other.idx(r))).collect();
        // The residual names columns of the concatenation.
        let both = Rel {
            plan: Plan::Union { inputs: vec![] },
            names: self.names.iter().chain(&other.names).cloned().collect(),
            typ: RelationType::new(
                self.typ.column_types.iter().chain(&other.typ.column_types).copied().collect(),
            ),
        };
        (on, residual(&both))
    }

    /// `self WHERE EXISTS (other WHERE on AND residual)` (`protocol::joins::semi_join`). Pass `Get`s of
    /// bound relations: the lowering reads its inputs more than once.
    pub fn semi_join(
        self,
        other: &Rel,
        on: &[(&str, &str)],
        residual: impl FnOnce(&Rel) -> Vec<ScalarExpr>,
    ) -> Rel {
        let (on, residual) = self.lowered(other, on, residual);
        let plan = joins::semi_join(&self.plan, &self.typ, &other.plan, &other.typ, &on, &residual);
        Rel { plan, ..self }
    }

    /// `self WHERE NOT EXISTS (other WHERE on AND residual)` (`protocol::joins::anti_join`).
    pub fn anti_join(
        self,
        other: &Rel,
        on: &[(&str, &str)],
        residual: impl FnOnce(&Rel) -> Vec<ScalarExpr>,
    ) -> Rel {
        let (on, residual) = self.lowered(other, on, residual);
        let plan = joins::anti_join(&self.plan, &self.typ, &other.plan, &other.typ, &on, &residual);
        Rel { plan, ..self }
    }

    /// `self LEFT JOIN other ON on` (`protocol::joins::left_join`): `other`'s columns become nullable.
    pub fn left_join(self, other: &Rel, on: &[(&str, &str)]) -> Rel {
        let (on, residual) = self.lowered(other, on, |_| vec![]);
        let plan = joins::left_join(&self.plan, &self.typ, &other.plan, &other.typ, &on, &residual);
        let names = self.names.iter().chain(&other.names).cloned().collect();
        let right = other.typ.column_types.iter().map(|c| c.nullable(true));
        let typ = RelationType::new(self.typ.column_types.iter().copied().chain(right).collect());
        Rel { plan, names, typ }
    }

    /// `SELECT keys, aggregates GROUP BY keys`: the key columns, then one named column per aggregate
    /// `(name, function, column)` (`count(*)`'s column is ignored).
    pub fn reduce(self, keys: &[&str], aggregates: &[(&'static str, AggregateFunc, &str)]) -> Rel {
        let group_key: Vec<usize> = keys.iter().map(|k| self.idx(k)).collect();
        let mut names: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let mut types: Vec<ColumnType> = group_key.iter().map(|c| self.typ.column_types[*c]).collect();
        let mut exprs = Vec::new();
        for (name, func, column) in aggregates {
            let column = if *func == AggregateFunc::CountRows { 0 } else { self.idx(column) };
            let input = self
                .typ
                .column_types
                .get(column)
                .copied()
                .unwrap_or(ColumnType::new(ScalarType::Int64, false));
            let output = func.output_type(input);
            assert!(output.is_some(), "{func:?} of {name}");
            types.push(output.expect("asserted"));
            names.push(name.to_string());
            exprs.push(AggregateExpr { func: *func, column });
        }
        let plan = Plan::Reduce { input: Box::new(self.plan), group_key, aggregates: exprs };
        Rel { plan, names, typ: RelationType::new(types) }
    }

    /// Each distinct row once.
    pub fn distinct(self) -> Rel {
        Rel { plan: Plan::Distinct { input: Box::new(self.plan) }, ..self }
    }

    /// The first `limit` rows by `order` (the IR's `TopK` over one group).
    pub fn top_k(self, order: &[ColumnOrder], limit: usize) -> Rel {
        let plan = Plan::TopK {
            input: Box::new(self.plan),
            group_key: vec![],
            order_key: order.to_vec(),
            limit: Some(limit),
            offset: 0,
        };
        Rel { plan, ..self }
    }

    /// `column ASC` or `column DESC` (SQL's placement of `NULL`s).
    pub fn order(&self, name: &str, desc: bool) -> ColumnOrder {
        if desc { ColumnOrder::desc(self.idx(name)) } else { ColumnOrder::asc(self.idx(name)) }
    }
}

/// Infix spelling of the IR's binary functions (named apart from `PartialEq`'s and `PartialOrd`'s).
pub trait Ops: Sized {
    /// `self = other`.
    fn is(self, other: ScalarExpr) -> ScalarExpr;
    /// `self <> other`.
    fn isnt(self, other: ScalarExpr) -> ScalarExpr;
    /// `self < other`.
    fn below(self, other: ScalarExpr) -> ScalarExpr;
    /// `self <= other`.
    fn at_most(self, other: ScalarExpr) -> ScalarExpr;
    /// `self > other`.
    fn above(self, other: ScalarExpr) -> ScalarExpr;
    /// `self >= other`.
    fn at_least(self, other: ScalarExpr) -> ScalarExpr;
    /// `self AND other`.
    fn and(self, other: ScalarExpr) -> ScalarExpr;
    /// `self OR other`.
    fn or(self, other: ScalarExpr) -> ScalarExpr;
    /// `self + other`.
    fn plus(self, other: ScalarExpr) -> ScalarExpr;
    /// `self - other`.
    fn minus(self, other: ScalarExpr) -> ScalarExpr;
    /// `self * other`.
    fn times(self, other: ScalarExpr) -> ScalarExpr;
    /// `self / other`.
    fn over(self, other: ScalarExpr) -> ScalarExpr;
    /// `NOT self`.
    fn not(self) -> ScalarExpr;
}

impl Ops for ScalarExpr {
    fn is(self, other: ScalarExpr) -> ScalarExpr {
        self.call_binary(BinaryFunc::Eq, other)
    }
    fn isnt(self, other: ScalarExpr) -> ScalarExpr {
        self.call_binary(BinaryFunc::NotEq, other)
    }
    fn below(self, other: ScalarExpr) -> ScalarExpr {
        self.call_binary(BinaryFunc::Lt, other)
    }
    fn at_most(self, other: ScalarExpr) -> ScalarExpr {
        self.call_binary(BinaryFunc::Lte, other)
    }
    fn above(self, other: ScalarExpr) -> ScalarExpr {
        self.call_binary(BinaryFunc::Gt, other)
    }
    fn at_least(self, other: ScalarExpr) -> ScalarExpr {
        self.call_binary(BinaryFunc::Gte, other)
    }
    fn and(self, other: ScalarExpr) -> ScalarExpr {
        self.call_binary(BinaryFunc::And, other)
    }
    fn or(self, other: ScalarExpr) -> ScalarExpr {
        self.call_binary(BinaryFunc::Or, other)
    }
    fn plus(self, other: ScalarExpr) -> ScalarExpr {
        self.call_binary(BinaryFunc::Add, other)
    }
    fn minus(self, other: ScalarExpr) -> ScalarExpr {
        self.call_binary(BinaryFunc::Sub, other)
    }
    fn times(self, other: ScalarExpr) -> ScalarExpr {
        self.call_binary(BinaryFunc::Mul, other)
    }
    fn over(self, other: ScalarExpr) -> ScalarExpr {
        self.call_binary(BinaryFunc::Div, other)
    }
    fn not(self) -> ScalarExpr {
        self.call_unary(UnaryFunc::Not)
    }
}

/// An integer literal.
pub fn int(i: i64) -> ScalarExpr {
    ScalarExpr::literal(Datum::Int64(i))
}

/// A text literal.
pub fn text(s: &str) -> ScalarExpr {
    ScalarExpr::literal(Datum::Text(s))
}

/// A decimal literal, of the scale its text has (SQL's `0.06` is a decimal of scale 2).
pub fn dec(text: &str) -> ScalarExpr {
    let scale = text.split_once('.').map_or(0, |(_, fraction)| fraction.len());
    ScalarExpr::decimal(text, u8::try_from(scale).expect("a short literal"))
}

/// A date literal `YYYY-MM-DD`.
pub fn date(text: &str) -> ScalarExpr {
    let parts: Vec<u32> = text.split('-').map(|p| p.parse().expect("a date literal")).collect();
    ScalarExpr::literal(Datum::Date(days_from_civil(parts[0] as i32, parts[1], parts[2])))
}

/// `interval 'n' day`.
pub fn days(n: i32) -> ScalarExpr {
    ScalarExpr::literal(Datum::Interval(Interval::days(n)))
}

/// `interval 'n' month`.
pub fn months(n: i32) -> ScalarExpr {
    ScalarExpr::literal(Datum::Interval(Interval::months(n)))
}

/// `interval 'n' year`.
pub fn years(n: i32) -> ScalarExpr {
    months(12 * n)
}

/// `CAST(e AS DECIMAL)` of an integer (scale 0).
pub fn decimal_of(e: ScalarExpr) -> ScalarExpr {
    e.cast(ScalarType::Decimal { scale: 0 })
}

/// One query's dataflow under construction.
#[derive(Debug)]
pub struct QueryBuilder {
    catalog: Catalog,
    number: usize,
    df: DataflowDescription<u64>,
}

impl QueryBuilder {
    /// The builder of query `number`.
    pub fn new(catalog: Catalog, number: usize) -> Self {
        QueryBuilder { catalog, number, df: DataflowDescription::new(format!("tpch-q{number}")) }
    }

    /// The query's number.
    pub fn number(&self) -> usize {
        self.number
    }

    /// The id of the query's index.
    pub fn index(&self) -> GlobalId {
        self.catalog.index(self.number)
    }

    /// A table, imported from storage.
    pub fn table(&mut self, table: Table) -> Rel {
        let id = self.catalog.table(table);
        let desc = table.desc();
        let names = desc.names().to_vec();
        let typ = desc.typ().clone();
        self.df.source_imports.insert(id, SourceImport { desc });
        Rel { plan: Plan::get(id), names, typ }
    }

    /// The named columns of a table (a planner's projection pushdown: joins and reduces then arrange only
    /// what the query reads).
    pub fn scan(&mut self, table: Table, columns: &[&str]) -> Rel {
        self.table(table).project(columns)
    }

    /// Builds `rel` as an object of the dataflow and returns a `Get` of it, so that it is computed once
    /// however many times it is read.
    pub fn bind(&mut self, rel: Rel) -> Rel {
        let id = self.catalog.object(self.number, self.df.objects_to_build.len());
        self.df.objects_to_build.push(BuildDesc { id, plan: rel.plan });
        Rel { plan: Plan::get(id), ..rel }
    }

    /// The finished dataflow: `result` built and exported as the query's index (keyed by its first
    /// column), as of `as_of`; and the finishing a peek applies (the query's `ORDER BY` and `LIMIT`).
    pub fn finish(
        mut self,
        result: Rel,
        order: &[(&str, bool)],
        limit: Option<usize>,
        as_of: u64,
    ) -> (DataflowDescription<u64>, RowSetFinishing, RelationType, Vec<String>) {
        let order_by: Vec<ColumnOrder> = order.iter().map(|(name, desc)| result.order(name, *desc)).collect();
        let result = match limit {
            Some(limit) => result.clone().top_k(&order_by, limit),
            None => result,
        };
        let (typ, names) = (result.typ.clone(), result.names.clone());
        let bound = self.bind(result);
        let Plan::Get { id: object } = bound.plan else { unreachable!("bind returns a Get") };
        let key = if typ.arity() > 0 { vec![0] } else { vec![] };
        self.df.index_exports.insert(self.catalog.index(self.number), IndexExport { on_id: object, key });
        self.df.as_of = Some(Antichain::from_elem(as_of));
        let finishing = RowSetFinishing { order_by, limit, offset: 0 };
        (self.df, finishing, typ, names)
    }
}

/// The ids a query's objects may `Get` (for tests that type-check plans on their own).
pub fn table_types(catalog: Catalog) -> BTreeMap<GlobalId, RelationType> {
    crate::schema::TABLES.iter().map(|t| (catalog.table(*t), t.desc().typ().clone())).collect()
}
