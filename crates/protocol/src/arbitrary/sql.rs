//! A differential oracle nobody here wrote: SQLite (feature `sqlite`, with the `rusqlite` crate's bundled
//! library). [`SqlCase::generate`] makes, from a seed, random tables, several timestamps of inserts and
//! deletes, a random plan and the SQL text that computes the same relation, and a peek's finishing;
//! [`Sqlite`] keeps the tables in an in-memory SQLite database and answers the query after each batch.
//! The tests compare those answers with the plan's: `tests/it/sqlite.rs` (the reference interpreter) and
//! `compute/tests/it/sqlite.rs` (the replica, incrementally, through a real socket).
//!
//! **What the plans cover.** Filters over arithmetic, comparisons, `AND`/`OR`/`NOT`, `IS NULL` and `IF`;
//! maps and projections; joins of two and three inputs (equi-joins and cross joins); reduces with
//! `count`/`sum`/`min`/`max`, grouped and global; distinct; union; negate and threshold (as `EXCEPT
//! ALL`); top-k with ordering, limit and offset; `ArrangeBy`; a peek's order, limit and offset and key
//! lookups; `NULL`s in every nullable column; integers at the edges of `i64`; float division by zero.
//!
//! **What it does not cover.** Negative multiplicities other than through `EXCEPT ALL` (SQL has none),
//! multiplicities beyond `i64` (SQL has none: `compute/tests/it/operators.rs` checks them against the
//! reference), float arithmetic on infinities and NaN (SQLite has no NaN), timestamps and byte strings.
//!
//! Where the IR's semantics legitimately differ from SQL's, the difference is encoded in one place,
//! [`sql_semantics`]: each rule is a function the SQL text is rendered through, with a comment saying
//! what differs and why the rewrite makes the two agree.
//!
//! **Reproducing.** Seeds come from [`seeds`]: `0..cases` (from `PROPTEST_CASES`), or the one seed in
//! `SQLITE_ORACLE_SEED`; a case is a pure function of its seed. A mismatch report ([`mismatch`]) names the seed, the time, the plan, the SQL and
//! both answers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::num::NonZeroU64;

use proptest::prelude::Rng;
use proptest::test_runner::{RngAlgorithm, TestRng};
use rusqlite::types::ValueRef;

use super::{OwnedDatum, pack_owned};
use crate::reference::Multiset;
use crate::{
    AggregateExpr, AggregateFunc, BinaryFunc, BuildDesc, ColumnOrder, ColumnType, DataflowDescription, Diff,
    GlobalId, IndexExport, Plan, RelationDesc, RelationType, Row, RowSetFinishing, ScalarExpr, ScalarType,
    SourceImport, UnaryFunc,
};

/// The seeds a test runs: the one in `SQLITE_ORACLE_SEED` if set, else `0..cases` (a test takes `cases`
/// from `PROPTEST_CASES` the way its crate's other property tests do).
pub fn seeds(cases: u32) -> Vec<u64> {
    if let Some(seed) = std::env::var("SQLITE_ORACLE_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    (0..u64::from(cases)).collect()
}

/// The random choices of one case, from its seed.
struct Pick(TestRng);

impl Pick {
    fn new(seed: u64) -> Pick {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        Pick(TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
    }

    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "a pick from nothing");
        (self.0.next_u64() % n as u64) as usize
    }

    /// True one time in `n`.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    fn of<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// The tables every case has: `t0`, `t1`, `t2`, each `(k int not null, a int, s text, f real)`.
pub const TABLES: usize = 3;

fn table_desc() -> RelationDesc {
    RelationDesc::new([
        ("k", ColumnType::new(ScalarType::Int64, false)),
        ("a", ColumnType::new(ScalarType::Int64, true)),
        ("s", ColumnType::new(ScalarType::Text, true)),
        ("f", ColumnType::new(ScalarType::Float64, true)),
    ])
}

/// One generated case.
#[derive(Debug, Clone)]
pub struct SqlCase {
    /// The seed it was generated from.
    pub seed: u64,
    /// Per time `0, 1, ...`: updates `(table, row, diff)`; a delete only removes a row present.
    pub batches: Vec<Vec<(usize, Row, Diff)>>,
    /// The plan, over `Get`s of `GlobalId::User(1 + table)`.
    pub plan: Plan,
    /// Its type.
    pub typ: RelationType,
    /// The index's key (columns of the plan's output).
    pub key: Vec<usize>,
    /// A peek's finishing.
    pub finishing: RowSetFinishing,
    /// The SQL: common table expressions in dependency order; the last is the result.
    pub ctes: Vec<Cte>,
}

/// One common table expression of a case's SQL: `name AS MATERIALIZED (select)`, whose columns are
/// `c0, c1, ..., c<arity - 1>`.
#[derive(Debug, Clone)]
pub struct Cte {
    /// Its name.
    pub name: String,
    /// Its `SELECT`.
    pub select: String,
    /// The number of its columns.
    pub arity: usize,
}

/// The id of `table` in a case's dataflow whose ids start at `base`.
pub fn table_id(table: usize, base: u64) -> GlobalId {
    GlobalId::User(base + 1 + table as u64)
}

/// The id of the index a case's dataflow exports.
pub fn index_id(base: u64) -> GlobalId {
    GlobalId::User(base + 200)
}

impl SqlCase {
    /// The case of `seed`.
    pub fn generate(seed: u64) -> SqlCase {
        let mut pick = Pick::new(seed);
        let batches = generate_batches(&mut pick);
        let mut builder = Builder { pick, ctes: Vec::new() };
        let relation = builder.relation(3);
        let relation = builder.top(relation);
        let arity = relation.typ.arity();
        let key = (0..builder.pick.below(3)).map(|_| builder.pick.below(arity)).collect();
        let finishing = builder.finishing(arity);
        SqlCase { seed, batches, plan: relation.plan, typ: relation.typ, key, finishing, ctes: builder.ctes }
    }

    /// The case's dataflow with every id offset by `base`: the tables as storage imports, the plan as
    /// one object, indexed by [`Self::key`] as [`index_id`], as of 0.
    pub fn dataflow(&self, base: u64) -> DataflowDescription<u64> {
        let mut df = DataflowDescription::new(format!("sqlite-oracle-{}", self.seed));
        for table in 0..TABLES {
            df.source_imports.insert(table_id(table, base), SourceImport { desc: table_desc() });
        }
        let mut plan = self.plan.clone();
        plan.visit_mut(&mut |p| {
            if let Plan::Get { id: GlobalId::User(n) } = p {
                *n += base;
            }
        });
        let object = GlobalId::Transient(base + 100);
        df.objects_to_build.push(BuildDesc { id: object, plan });
        df.index_exports.insert(index_id(base), IndexExport { on_id: object, key: self.key.clone() });
        df.as_of = Some(frontiers::Antichain::from_elem(0));
        df
    }

    /// The schema of the tables.
    pub fn table_desc(&self) -> RelationDesc {
        table_desc()
    }

    /// The whole query: every common table expression, then the result.
    pub fn sql(&self) -> String {
        format!("{} SELECT * FROM {}", self.with_clause(self.ctes.len()), self.result())
    }

    /// Whether the finishing orders, limits or skips anything (else it keeps the rows as they are).
    pub fn finishing_ranks(&self) -> bool {
        let finishing = &self.finishing;
        !finishing.order_by.is_empty() || finishing.limit.is_some() || finishing.offset > 0
    }

    /// The name of the result's common table expression.
    fn result(&self) -> &str {
        &self.ctes.last().expect("a case has a result").name
    }

    /// `WITH` and the first `count` common table expressions.
    fn with_clause(&self, count: usize) -> String {
        let ctes: Vec<String> = self.ctes[..count]
            .iter()
            .map(|cte| format!("{} AS MATERIALIZED ({})", cte.name, cte.select))
            .collect();
        format!("WITH {}", ctes.join(",\n  "))
    }
}

/// A generated relation: its plan, type and the common table expression that computes it.
struct Relation {
    plan: Plan,
    typ: RelationType,
    cte: String,
    /// Whether it is a plain table scan (so another table's scan is union-compatible with it).
    is_table: bool,
}

/// Builds plans and their SQL together.
struct Builder {
    pick: Pick,
    ctes: Vec<Cte>,
}

/// The values of `a`: mostly small, sometimes at the edges of `i64`.
fn int_value(pick: &mut Pick) -> OwnedDatum {
    if pick.one_in(12) {
        OwnedDatum::Int64(pick.of(&[i64::MAX, i64::MIN, 3 << 61, -(3 << 61)]))
    } else {
        OwnedDatum::Int64(pick.below(10) as i64 - 3)
    }
}

fn table_row(pick: &mut Pick) -> Row {
    let nullable = |pick: &mut Pick, value: OwnedDatum| if pick.one_in(6) { OwnedDatum::Null } else { value };
    let k = OwnedDatum::Int64(pick.below(4) as i64);
    let a = int_value(pick);
    let a = nullable(pick, a);
    let s = OwnedDatum::Text(pick.of(&["a", "b", "c", ""]).to_string());
    let s = nullable(pick, s);
    let f = OwnedDatum::Float64(crate::F64::new(pick.of(&[-1.5, 0.5, 2.0, 0.0])));
    let f = nullable(pick, f);
    pack_owned(&[k, a, s, f])
}

/// Three to five batches: the first inserts rows into every table, later ones insert and delete.
fn generate_batches(pick: &mut Pick) -> Vec<Vec<(usize, Row, Diff)>> {
    let mut contents: Vec<Multiset> = vec![Multiset::new(); TABLES];
    let mut batches = Vec::new();
    for time in 0..3 + pick.below(3) {
        let mut batch = Vec::new();
        for (table, present) in contents.iter_mut().enumerate() {
            let updates = if time == 0 { 3 + pick.below(6) } else { pick.below(4) };
            for _ in 0..updates {
                if time > 0 && !present.is_empty() && pick.one_in(2) {
                    let row = present.keys().nth(pick.below(present.len())).expect("in range").clone();
                    batch.push((table, row.clone(), -1));
                    let count = present.get_mut(&row).expect("present");
                    *count -= 1;
                    if *count == 0 {
                        present.remove(&row);
                    }
                } else {
                    let row = table_row(pick);
                    let diff = if pick.one_in(4) { 2 } else { 1 };
                    batch.push((table, row.clone(), diff));
                    *present.entry(row).or_default() += diff;
                }
            }
        }
        batches.push(batch);
    }
    batches
}

/// An expression and its SQL.
type Expr = (ScalarExpr, String);

impl Builder {
    fn add_cte(&mut self, select: String, arity: usize) -> String {
        let name = format!("r{}", self.ctes.len());
        self.ctes.push(Cte { name: name.clone(), select, arity });
        name
    }

    /// A random relation of at most `depth` operators above the table scans.
    fn relation(&mut self, depth: usize) -> Relation {
        if depth == 0 || self.pick.one_in(4) {
            let table = self.pick.below(TABLES);
            return self.scan(table);
        }
        match self.pick.below(9) {
            0 | 1 => {
                let input = self.relation(depth - 1);
                self.filter(input)
            }
            2 => {
                let input = self.relation(depth - 1);
                self.map_project(input)
            }
            3 => self.join(depth - 1),
            4 => {
                let input = self.relation(depth - 1);
                self.reduce(input)
            }
            5 => {
                let input = self.relation(depth - 1);
                self.distinct(input)
            }
            6 => {
                let input = self.relation(depth - 1);
                self.union(input, false)
            }
            7 => {
                let input = self.relation(depth - 1);
                self.union(input, true)
            }
            _ => {
                let input = self.relation(depth - 1);
                if self.pick.one_in(3) { self.arrange(input) } else { self.top_k(input) }
            }
        }
    }

    fn scan(&mut self, table: usize) -> Relation {
        let cte = self.add_cte(format!("SELECT k AS c0, a AS c1, s AS c2, f AS c3 FROM t{table}"), 4);
        let plan = Plan::Get { id: table_id(table, 0) };
        Relation { plan, typ: table_desc().typ().clone(), cte, is_table: true }
    }

    fn filter(&mut self, input: Relation) -> Relation {
        let (predicate, sql) = self.expr(&input.typ, ScalarType::Bool, 2);
        let cte = self.add_cte(format!("SELECT * FROM {} WHERE {sql}", input.cte), input.typ.arity());
        let plan = Plan::Filter { input: Box::new(input.plan), predicates: vec![predicate] };
        Relation { plan, typ: input.typ, cte, is_table: false }
    }

    /// A map of one or two expressions, then a projection onto some of the columns (each its own level:
    /// the IR evaluates every mapped expression, projected or not).
    fn map_project(&mut self, input: Relation) -> Relation {
        let arity = input.typ.arity();
        let mut typ = input.typ.clone();
        let mut exprs = Vec::new();
        let mut columns: Vec<String> = (0..arity).map(|c| format!("c{c}")).collect();
        for _ in 0..1 + self.pick.below(2) {
            let want =
                self.pick.of(&[ScalarType::Int64, ScalarType::Int64, ScalarType::Bool, ScalarType::Text]);
            // Each expression reads the input's columns only: SQL cannot read a sibling's alias.
            let (expr, sql) = self.expr(&input.typ, want, 2);
            let column = expr.typ(&input.typ).expect("generated expressions are well-typed");
            columns.push(format!("{sql} AS c{}", typ.arity()));
            typ.column_types.push(column);
            exprs.push(expr);
        }
        let mapped = self.add_cte(format!("SELECT {} FROM {}", columns.join(", "), input.cte), typ.arity());
        let outputs: Vec<usize> = (0..1 + self.pick.below(3)).map(|_| self.pick.below(typ.arity())).collect();
        let select: Vec<String> = outputs.iter().enumerate().map(|(i, c)| format!("c{c} AS c{i}")).collect();
        let cte = self.add_cte(format!("SELECT {} FROM {mapped}", select.join(", ")), outputs.len());
        let out = RelationType::new(outputs.iter().map(|c| typ.column_types[*c]).collect());
        let plan =
            Plan::Project { input: Box::new(Plan::Map { input: Box::new(input.plan), exprs }), outputs };
        Relation { plan, typ: out, cte, is_table: false }
    }

    /// Two or three inputs, each pair of neighbours equated on a column of one type where there is one
    /// (a class across all three sometimes), else crossed.
    fn join(&mut self, depth: usize) -> Relation {
        let count = if self.pick.one_in(3) { 3 } else { 2 };
        let inputs: Vec<Relation> = (0..count).map(|_| self.relation(depth.min(1))).collect();
        let mut offsets = Vec::new();
        let mut typ = RelationType::default();
        for input in &inputs {
            offsets.push(typ.arity());
            typ.column_types.extend(input.typ.column_types.iter().copied());
        }
        let mut equivalences: Vec<Vec<usize>> = Vec::new();
        for pair in 0..count - 1 {
            let (left, right) = (&inputs[pair], &inputs[pair + 1]);
            let column = self.pick.below(left.typ.arity());
            let wanted = left.typ.column_types[column].scalar_type;
            let matching: Vec<usize> =
                (0..right.typ.arity()).filter(|c| right.typ.column_types[*c].scalar_type == wanted).collect();
            if matching.is_empty() || self.pick.one_in(5) {
                continue;
            }
            let other = matching[self.pick.below(matching.len())];
            let (a, b) = (offsets[pair] + column, offsets[pair + 1] + other);
            // Extend the class that already holds `a` (a class across three inputs), or start one.
            match equivalences.iter_mut().find(|class| class.contains(&a)) {
                Some(class) => class.push(b),
                None => equivalences.push(vec![a, b]),
            }
        }
        let mut select = Vec::new();
        for (index, input) in inputs.iter().enumerate() {
            for c in 0..input.typ.arity() {
                select.push(format!("x{index}.c{c} AS c{}", offsets[index] + c));
            }
        }
        let from: Vec<String> =
            inputs.iter().enumerate().map(|(i, input)| format!("{} AS x{i}", input.cte)).collect();
        let column = |c: usize| {
            let index = offsets.iter().rposition(|offset| *offset <= c).expect("offsets start at 0");
            format!("x{index}.c{}", c - offsets[index])
        };
        let mut conditions = Vec::new();
        for class in &equivalences {
            for pair in class.windows(2) {
                conditions.push(format!("{} = {}", column(pair[0]), column(pair[1])));
            }
        }
        let condition = if conditions.is_empty() { "1".to_string() } else { conditions.join(" AND ") };
        let select = format!("SELECT {} FROM {} WHERE {condition}", select.join(", "), from.join(", "));
        let cte = self.add_cte(select, typ.arity());
        let plan = Plan::Join { inputs: inputs.into_iter().map(|input| input.plan).collect(), equivalences };
        Relation { plan, typ, cte, is_table: false }
    }

    fn reduce(&mut self, input: Relation) -> Relation {
        let arity = input.typ.arity();
        let mut group_key: Vec<usize> = (0..self.pick.below(3)).map(|_| self.pick.below(arity)).collect();
        group_key.dedup();
        let mut aggregates = Vec::new();
        for _ in 0..self.pick.below(3) {
            let column = self.pick.below(arity);
            let func = self.pick.of(&[
                AggregateFunc::Count,
                AggregateFunc::Sum,
                AggregateFunc::Min,
                AggregateFunc::Max,
            ]);
            let func = if func.output_type(input.typ.column_types[column]).is_some() {
                func
            } else {
                AggregateFunc::Count
            };
            aggregates.push(AggregateExpr { func, column });
        }
        if group_key.is_empty() && aggregates.is_empty() {
            aggregates.push(AggregateExpr { func: AggregateFunc::Count, column: 0 });
        }
        let mut select: Vec<String> =
            group_key.iter().enumerate().map(|(i, c)| format!("c{c} AS c{i}")).collect();
        let mut typ: Vec<ColumnType> = group_key.iter().map(|c| input.typ.column_types[*c]).collect();
        for aggregate in &aggregates {
            let column_type = input.typ.column_types[aggregate.column];
            let sql = sql_semantics::aggregate(
                aggregate.func,
                &format!("c{}", aggregate.column),
                column_type.scalar_type,
            );
            select.push(format!("{sql} AS c{}", typ.len()));
            typ.push(aggregate.func.output_type(column_type).expect("checked above"));
        }
        let grouping = if group_key.is_empty() {
            sql_semantics::global_aggregate()
        } else {
            let columns: Vec<String> = group_key.iter().map(|c| format!("c{c}")).collect();
            format!("GROUP BY {}", columns.join(", "))
        };
        let cte =
            self.add_cte(format!("SELECT {} FROM {} {grouping}", select.join(", "), input.cte), typ.len());
        let plan = Plan::Reduce { input: Box::new(input.plan), group_key, aggregates };
        Relation { plan, typ: RelationType::new(typ), cte, is_table: false }
    }

    fn distinct(&mut self, input: Relation) -> Relation {
        let cte = self.add_cte(format!("SELECT DISTINCT * FROM {}", input.cte), input.typ.arity());
        Relation {
            plan: Plan::Distinct { input: Box::new(input.plan) },
            typ: input.typ,
            cte,
            is_table: false,
        }
    }

    /// A relation of `input`'s type: another table if `input` is one, else `input` filtered or distinct.
    fn compatible(&mut self, input: &Relation) -> Relation {
        let copy = Relation {
            plan: input.plan.clone(),
            typ: input.typ.clone(),
            cte: input.cte.clone(),
            is_table: input.is_table,
        };
        match self.pick.below(3) {
            0 if input.is_table => {
                let table = self.pick.below(TABLES);
                self.scan(table)
            }
            1 => self.distinct(copy),
            _ => self.filter(copy),
        }
    }

    /// `input UNION ALL other`, or with `except`, `input EXCEPT ALL other` (the IR's
    /// `Threshold(Union(input, Negate(other)))`).
    fn union(&mut self, input: Relation, except: bool) -> Relation {
        let other = self.compatible(&input);
        let mut typ = input.typ.clone();
        for (column, other) in typ.column_types.iter_mut().zip(&other.typ.column_types) {
            column.nullable |= other.nullable;
        }
        if except {
            let cte =
                self.add_cte(sql_semantics::except_all(&input.cte, &other.cte, typ.arity()), typ.arity());
            let negated = Plan::Negate { input: Box::new(other.plan) };
            let plan = Plan::Threshold { input: Box::new(Plan::Union { inputs: vec![input.plan, negated] }) };
            return Relation { plan, typ, cte, is_table: false };
        }
        let select = format!("SELECT * FROM {} UNION ALL SELECT * FROM {}", input.cte, other.cte);
        let cte = self.add_cte(select, typ.arity());
        let plan = Plan::Union { inputs: vec![input.plan, other.plan] };
        Relation { plan, typ, cte, is_table: false }
    }

    fn arrange(&mut self, input: Relation) -> Relation {
        let key = (0..self.pick.below(3)).map(|_| self.pick.below(input.typ.arity())).collect();
        let plan = Plan::ArrangeBy { input: Box::new(input.plan), key };
        Relation { plan, ..input }
    }

    fn orders(&mut self, arity: usize, max: usize) -> Vec<ColumnOrder> {
        (0..self.pick.below(max + 1))
            .map(|_| ColumnOrder {
                column: self.pick.below(arity),
                desc: self.pick.one_in(2),
                nulls_last: self.pick.one_in(2),
            })
            .collect()
    }

    fn top_k(&mut self, input: Relation) -> Relation {
        let arity = input.typ.arity();
        let group_key: Vec<usize> = (0..self.pick.below(2)).map(|_| self.pick.below(arity)).collect();
        let order_key = self.orders(arity, 2);
        let limit = if self.pick.one_in(4) { None } else { Some(self.pick.below(4)) };
        let offset = self.pick.below(3);
        let cte = self
            .add_cte(sql_semantics::top_k(&input.cte, arity, &group_key, &order_key, limit, offset), arity);
        let plan = Plan::TopK { input: Box::new(input.plan), group_key, order_key, limit, offset };
        Relation { plan, typ: input.typ, cte, is_table: false }
    }

    /// The result: the relation, sometimes with a float division of two of its float columns appended
    /// (at the top only: its infinities and NaN must not meet SQLite's arithmetic, see
    /// [`sql_semantics::float_division`]).
    fn top(&mut self, input: Relation) -> Relation {
        let floats: Vec<usize> = (0..input.typ.arity())
            .filter(|c| input.typ.column_types[*c].scalar_type == ScalarType::Float64)
            .collect();
        if floats.is_empty() || !self.pick.one_in(2) {
            return input;
        }
        let (x, y) = (self.pick.of(&floats), self.pick.of(&floats));
        let expr = ScalarExpr::column(x).call_binary(BinaryFunc::Div, ScalarExpr::column(y));
        let sql = sql_semantics::float_division(&format!("c{x}"), &format!("c{y}"));
        let mut typ = input.typ.clone();
        let column = expr.typ(&input.typ).expect("floats divide");
        typ.column_types.push(column);
        let select = format!("SELECT *, {sql} AS c{} FROM {}", input.typ.arity(), input.cte);
        let cte = self.add_cte(select, typ.arity());
        Relation {
            plan: Plan::Map { input: Box::new(input.plan), exprs: vec![expr] },
            typ,
            cte,
            is_table: false,
        }
    }

    fn finishing(&mut self, arity: usize) -> RowSetFinishing {
        RowSetFinishing {
            order_by: self.orders(arity, 2),
            limit: if self.pick.one_in(2) { None } else { Some(self.pick.below(6)) },
            offset: if self.pick.one_in(2) { 0 } else { self.pick.below(4) },
        }
    }

    /// A literal of `scalar_type` (sometimes a typed `NULL`) and its SQL.
    fn literal(&mut self, scalar_type: ScalarType) -> Expr {
        if self.pick.one_in(8) {
            return (ScalarExpr::null(scalar_type), "NULL".to_string());
        }
        let datum = match scalar_type {
            ScalarType::Int64 => {
                if self.pick.one_in(10) {
                    OwnedDatum::Int64(self.pick.of(&[i64::MAX, i64::MIN]))
                } else {
                    OwnedDatum::Int64(self.pick.below(7) as i64 - 2)
                }
            }
            ScalarType::Float64 => OwnedDatum::Float64(crate::F64::new(self.pick.of(&[0.5, -1.5, 2.0, 0.0]))),
            ScalarType::Text => OwnedDatum::Text(self.pick.of(&["a", "b", ""]).to_string()),
            _ => OwnedDatum::Bool(self.pick.one_in(2)),
        };
        let sql = sql_semantics::literal(&datum);
        (ScalarExpr::literal(datum.as_datum()), sql)
    }

    /// A well-typed expression over `input` of type `want`, and its SQL.
    fn expr(&mut self, input: &RelationType, want: ScalarType, depth: usize) -> Expr {
        let columns: Vec<usize> =
            (0..input.arity()).filter(|c| input.column_types[*c].scalar_type == want).collect();
        if depth == 0 || self.pick.one_in(3) {
            if !columns.is_empty() && !self.pick.one_in(4) {
                let column = self.pick.of(&columns);
                return (ScalarExpr::column(column), format!("c{column}"));
            }
            return self.literal(want);
        }
        if self.pick.one_in(6) {
            let (cond, cond_sql) = self.expr(input, ScalarType::Bool, depth - 1);
            let (then, then_sql) = self.expr(input, want, depth - 1);
            let (els, els_sql) = self.expr(input, want, depth - 1);
            let sql = format!("(CASE WHEN {cond_sql} THEN {then_sql} ELSE {els_sql} END)");
            return (cond.if_then_else(then, els), sql);
        }
        match want {
            ScalarType::Int64 => {
                let (a, a_sql) = self.expr(input, want, depth - 1);
                if self.pick.one_in(6) {
                    return (a.call_unary(UnaryFunc::Neg), sql_semantics::integer_negation(&a_sql));
                }
                let func = self.pick.of(&[
                    BinaryFunc::Add,
                    BinaryFunc::Sub,
                    BinaryFunc::Mul,
                    BinaryFunc::Div,
                    BinaryFunc::Mod,
                ]);
                let (b, b_sql) = self.expr(input, want, depth - 1);
                (a.call_binary(func, b), sql_semantics::integer_arithmetic(func, &a_sql, &b_sql))
            }
            ScalarType::Float64 => {
                let (a, a_sql) = self.expr(input, want, depth - 1);
                let func = self.pick.of(&[BinaryFunc::Add, BinaryFunc::Sub, BinaryFunc::Mul]);
                let (b, b_sql) = self.expr(input, want, depth - 1);
                let operator = match func {
                    BinaryFunc::Add => "+",
                    BinaryFunc::Sub => "-",
                    _ => "*",
                };
                (a.call_binary(func, b), format!("({a_sql} {operator} {b_sql})"))
            }
            ScalarType::Bool => self.predicate(input, depth),
            _ => self.literal(want),
        }
    }

    fn predicate(&mut self, input: &RelationType, depth: usize) -> Expr {
        match self.pick.below(5) {
            0 | 1 => {
                let operand = self.pick.of(&[
                    ScalarType::Int64,
                    ScalarType::Int64,
                    ScalarType::Text,
                    ScalarType::Float64,
                    ScalarType::Bool,
                ]);
                let (a, a_sql) = self.expr(input, operand, depth - 1);
                let (b, b_sql) = self.expr(input, operand, depth - 1);
                let (func, operator) = self.pick.of(&[
                    (BinaryFunc::Eq, "="),
                    (BinaryFunc::NotEq, "<>"),
                    (BinaryFunc::Lt, "<"),
                    (BinaryFunc::Lte, "<="),
                    (BinaryFunc::Gt, ">"),
                    (BinaryFunc::Gte, ">="),
                ]);
                (a.call_binary(func, b), format!("({a_sql} {operator} {b_sql})"))
            }
            2 => {
                let func = self.pick.of(&[BinaryFunc::And, BinaryFunc::Or]);
                let (a, a_sql) = self.expr(input, ScalarType::Bool, depth - 1);
                let (b, b_sql) = self.expr(input, ScalarType::Bool, depth - 1);
                (a.call_binary(func, b), sql_semantics::kleene(func, &a_sql, &b_sql))
            }
            3 => {
                let (a, a_sql) = self.expr(input, ScalarType::Bool, depth - 1);
                (a.call_unary(UnaryFunc::Not), format!("(NOT {a_sql})"))
            }
            _ => {
                let operand = self.pick.of(&[ScalarType::Int64, ScalarType::Text, ScalarType::Float64]);
                let (a, a_sql) = self.expr(input, operand, depth - 1);
                (a.call_unary(UnaryFunc::IsNull), format!("({a_sql} IS NULL)"))
            }
        }
    }
}

/// Every place where the IR's semantics differ from SQL's (SQLite's in particular), as the rewrites the
/// generator renders its SQL through, and the one conversion of SQLite's values back into datums. Each
/// rule says what differs and why its rewrite makes the two agree.
pub mod sql_semantics {
    use super::*;

    /// SQLite has no boolean type (`true` is `1`, `false` is `0`) and writes `i64::MIN` as an expression;
    /// text is quoted.
    pub fn literal(datum: &OwnedDatum) -> String {
        match datum {
            OwnedDatum::Null => "NULL".to_string(),
            OwnedDatum::Bool(b) => if *b { "1" } else { "0" }.to_string(),
            OwnedDatum::Int64(i64::MIN) => "(-9223372036854775807 - 1)".to_string(),
            // Parenthesised: `-` after `-` would start a comment.
            OwnedDatum::Int64(i) => format!("({i})"),
            // `{:?}` keeps a decimal point, so SQLite reads a real.
            OwnedDatum::Float64(x) => format!("({:?})", x.get()),
            OwnedDatum::Text(s) => format!("'{}'", s.replace('\'', "''")),
            other => unreachable!("the generator makes no {other:?}"),
        }
    }

    /// Integer arithmetic: where the IR errs, SQLite does not.
    /// - Overflow of `+ - * /` is an error in the IR; SQLite silently gives a float instead. `ir_int` (a
    ///   function [`Sqlite`] registers) fails on a float and passes integers and `NULL`.
    /// - Division and remainder by zero are errors in the IR; SQLite gives `NULL`. `ir_fail` fails.
    /// - The IR evaluates both operands before it looks at either (so an error in either counts, also
    ///   when the other is `NULL`); the `+` of the two `IS NULL` tests makes SQLite evaluate both too,
    ///   where `OR` could stop at the first.
    /// - `i64::MIN % -1` is `0` in both.
    pub fn integer_arithmetic(func: BinaryFunc, a: &str, b: &str) -> String {
        match func {
            BinaryFunc::Add => format!("ir_int({a} + {b})"),
            BinaryFunc::Sub => format!("ir_int({a} - {b})"),
            BinaryFunc::Mul => format!("ir_int({a} * {b})"),
            BinaryFunc::Div | BinaryFunc::Mod => {
                let operator = if func == BinaryFunc::Div { "/" } else { "%" };
                format!(
                    "(CASE WHEN ({a} IS NULL) + ({b} IS NULL) > 0 THEN NULL WHEN {b} = 0 \
                     THEN ir_fail('division by zero') ELSE ir_int({a} {operator} {b}) END)"
                )
            }
            other => unreachable!("{other:?} is not integer arithmetic"),
        }
    }

    /// Integer negation: `-i64::MIN` overflows (an error in the IR, a float in SQLite).
    pub fn integer_negation(a: &str) -> String {
        format!("ir_int(-({a}))")
    }

    /// Float division by zero is `±inf`, or NaN for `0/0`, in the IR; SQLite gives `NULL`. SQLite has
    /// infinities (`9e999`) but no NaN (it turns one into `NULL`), so NaN is the text `'NaN'`, which
    /// SQLite orders after every number and equal to itself, as the IR orders NaN; [`datum`] reads it
    /// back. Neither may meet arithmetic (SQLite would read `'NaN'` as 0 and `inf - inf` as `NULL`), so
    /// the generator divides only at the top of a plan.
    pub fn float_division(a: &str, b: &str) -> String {
        format!(
            "(CASE WHEN ({a} IS NULL) + ({b} IS NULL) > 0 THEN NULL WHEN {b} = 0.0 THEN \
             (CASE WHEN {a} > 0.0 THEN 9e999 WHEN {a} < 0.0 THEN -9e999 ELSE 'NaN' END) ELSE {a} / {b} END)"
        )
    }

    /// `AND` and `OR`: the IR evaluates the left operand first and skips the right one when the left
    /// decides (`false AND x`, `true OR x`), so an error in `x` does not happen; SQL does not promise an
    /// order. A `CASE` (evaluated lazily by SQLite) makes the skip explicit; otherwise both are evaluated
    /// in both, and the value is Kleene's in both.
    pub fn kleene(func: BinaryFunc, a: &str, b: &str) -> String {
        match func {
            BinaryFunc::And => format!("(CASE WHEN {a} = 0 THEN 0 ELSE ({a} AND {b}) END)"),
            BinaryFunc::Or => format!("(CASE WHEN {a} = 1 THEN 1 ELSE ({a} OR {b}) END)"),
            other => unreachable!("{other:?} is not AND or OR"),
        }
    }

    /// Aggregates. `count`, `min` and `max` agree. An integer `sum` errs in the IR exactly when its
    /// result is not an `i64`; SQLite's `sum()` errs as soon as a partial sum overflows, in its own
    /// order. So the SQL sums the high and low 32 bits of the values separately (neither partial sum can
    /// overflow) and combines them with `ir_int`, which errs exactly when the result does not fit.
    pub fn aggregate(func: AggregateFunc, column: &str, scalar_type: ScalarType) -> String {
        match (func, scalar_type) {
            (AggregateFunc::Count, _) => format!("count({column})"),
            (AggregateFunc::CountRows, _) => "count(*)".to_string(),
            (AggregateFunc::Avg, _) => format!("avg({column})"),
            (AggregateFunc::Sum, ScalarType::Int64) => {
                format!("ir_int(sum({column} >> 32) * 4294967296 + sum({column} & 4294967295))")
            }
            (AggregateFunc::Sum, _) => format!("sum({column})"),
            (AggregateFunc::Min, _) => format!("min({column})"),
            (AggregateFunc::Max, _) => format!("max({column})"),
        }
    }

    /// A `Reduce` with an empty group key has one row per group of its input, so none over an empty
    /// input; SQL's global aggregate always has one row (`count` 0, the others `NULL`). Keeping only
    /// non-empty groups makes them agree.
    pub fn global_aggregate() -> String {
        "HAVING count(*) > 0".to_string()
    }

    /// `Threshold(Union(a, Negate(b)))`: each row `max(0, m_a - m_b)` times, SQL's `EXCEPT ALL`, which
    /// SQLite lacks. Written with row numbers: the `n`-th copy of a row of `a` is kept when `b` has no
    /// `n`-th copy of it (`IS`: `NULL`s match, as rows do in the IR).
    pub fn except_all(a: &str, b: &str, arity: usize) -> String {
        let columns: Vec<String> = (0..arity).map(|c| format!("c{c}")).collect();
        let partition = columns.join(", ");
        let same: Vec<String> = (0..arity).map(|c| format!("x.c{c} IS y.c{c}")).collect();
        let selected: Vec<String> = (0..arity).map(|c| format!("x.c{c}")).collect();
        format!(
            "SELECT {} FROM (SELECT *, row_number() OVER (PARTITION BY {partition}) AS n FROM {a}) AS x \
             WHERE NOT EXISTS (SELECT 1 FROM (SELECT *, row_number() OVER (PARTITION BY {partition}) AS n \
             FROM {b}) AS y WHERE {} AND x.n = y.n)",
            selected.join(", "),
            same.join(" AND ")
        )
    }

    /// An ordering: the IR's `ColumnOrder`s, then the whole row ascending with `NULL`s first (the IR's
    /// tie-break, which makes a ranking total; SQL leaves ties in any order).
    pub fn order_by(order: &[ColumnOrder], arity: usize) -> String {
        let mut keys: Vec<String> = order
            .iter()
            .map(|o| {
                let direction = if o.desc { "DESC" } else { "ASC" };
                let nulls = if o.nulls_last { "NULLS LAST" } else { "NULLS FIRST" };
                format!("c{} {direction} {nulls}", o.column)
            })
            .collect();
        keys.extend((0..arity).map(|c| format!("c{c} ASC NULLS FIRST")));
        keys.join(", ")
    }

    /// `TopK`: per group, the rows ranked `offset..offset + limit`, a row counting as many ranks as its
    /// multiplicity. In SQL a row's copies are separate rows, each with its own `row_number()`.
    pub fn top_k(
        input: &str,
        arity: usize,
        group_key: &[usize],
        order: &[ColumnOrder],
        limit: Option<usize>,
        offset: usize,
    ) -> String {
        let columns: Vec<String> = (0..arity).map(|c| format!("c{c}")).collect();
        let partition = if group_key.is_empty() {
            String::new()
        } else {
            let keys: Vec<String> = group_key.iter().map(|c| format!("c{c}")).collect();
            format!("PARTITION BY {} ", keys.join(", "))
        };
        let upper = limit.map(|limit| format!(" AND rn <= {}", offset + limit)).unwrap_or_default();
        format!(
            "SELECT {} FROM (SELECT *, row_number() OVER ({partition}ORDER BY {}) AS rn FROM {input}) \
             WHERE rn > {offset}{upper}",
            columns.join(", "),
            order_by(order, arity)
        )
    }

    /// A peek's key lookup matches by identity, so a `NULL` in a key finds the rows whose key is `NULL`;
    /// SQL's `=` finds none. `IS` is SQLite's identity.
    pub fn key_matches(key: &[usize], values: &[String]) -> String {
        let terms: Vec<String> = key.iter().zip(values).map(|(c, v)| format!("c{c} IS {v}")).collect();
        if terms.is_empty() { "1".to_string() } else { terms.join(" AND ") }
    }

    /// A datum as a value bound to a statement: booleans as `0`/`1`, NaN as the text `'NaN'` (SQLite
    /// binds a NaN float as `NULL`; see [`float_division`]).
    pub fn parameter(datum: &OwnedDatum) -> rusqlite::types::Value {
        use rusqlite::types::Value;
        match datum {
            OwnedDatum::Null => Value::Null,
            OwnedDatum::Bool(b) => Value::Integer(i64::from(*b)),
            OwnedDatum::Int64(i) => Value::Integer(*i),
            OwnedDatum::Float64(x) if x.get().is_nan() => Value::Text("NaN".to_string()),
            OwnedDatum::Float64(x) => Value::Real(x.get()),
            OwnedDatum::Text(s) => Value::Text(s.clone()),
            other => unreachable!("the generator makes no {other:?}"),
        }
    }

    /// A value SQLite returned, as the datum of a column of type `typ`: booleans come back as `0`/`1`,
    /// NaN as the text `'NaN'` ([`float_division`]), floats sometimes as integers. A value of another
    /// kind is an error (for example a float in an integer column: an overflow `ir_int` did not catch).
    pub fn datum(value: ValueRef<'_>, typ: ColumnType) -> Result<OwnedDatum, String> {
        Ok(match (value, typ.scalar_type) {
            (ValueRef::Null, _) => OwnedDatum::Null,
            (ValueRef::Integer(i), ScalarType::Int64) => OwnedDatum::Int64(i),
            (ValueRef::Integer(i), ScalarType::Bool) if i == 0 || i == 1 => OwnedDatum::Bool(i == 1),
            (ValueRef::Integer(i), ScalarType::Float64) => OwnedDatum::Float64(crate::F64::new(i as f64)),
            (ValueRef::Real(x), ScalarType::Float64) => OwnedDatum::Float64(crate::F64::new(x)),
            (ValueRef::Text(b"NaN"), ScalarType::Float64) => OwnedDatum::Float64(crate::F64::new(f64::NAN)),
            (ValueRef::Text(text), ScalarType::Text) => {
                OwnedDatum::Text(String::from_utf8(text.to_vec()).map_err(|e| e.to_string())?)
            }
            (value, scalar_type) => {
                return Err(format!("SQLite returned {value:?} for a {scalar_type:?} column"));
            }
        })
    }
}

/// A case's tables in an in-memory SQLite database.
#[derive(Debug)]
pub struct Sqlite {
    connection: rusqlite::Connection,
}

fn sql_error(error: rusqlite::Error) -> String {
    error.to_string()
}

impl Sqlite {
    /// An in-memory database with the case's (empty) tables and the functions the rewrites of
    /// [`sql_semantics`] use: `ir_int(x)` fails if `x` is a float, `ir_fail(message)` always fails.
    pub fn open() -> Result<Sqlite, String> {
        use rusqlite::functions::FunctionFlags;
        let connection = rusqlite::Connection::open_in_memory().map_err(sql_error)?;
        for table in 0..TABLES {
            let create = format!("CREATE TABLE t{table} (k INTEGER NOT NULL, a INTEGER, s TEXT, f REAL)");
            connection.execute(&create, []).map_err(sql_error)?;
        }
        // Not `SQLITE_DETERMINISTIC`: SQLite evaluates a deterministic function of constants once, up
        // front, even inside a `CASE` branch no row takes, and these must fail only where the IR does.
        let flags = FunctionFlags::SQLITE_UTF8;
        connection
            .create_scalar_function("ir_int", 1, flags, |context| match context.get_raw(0) {
                ValueRef::Real(_) => Err(rusqlite::Error::UserFunctionError("integer out of range".into())),
                ValueRef::Integer(i) => Ok(Some(i)),
                _ => Ok(None),
            })
            .map_err(sql_error)?;
        connection
            .create_scalar_function("ir_fail", 1, flags, |context| {
                let message: String = context.get(0)?;
                Err::<i64, _>(rusqlite::Error::UserFunctionError(message.into()))
            })
            .map_err(sql_error)?;
        Ok(Sqlite { connection })
    }

    /// Applies one batch: a row's copies are separate table rows; a delete removes that many copies.
    pub fn apply(&mut self, batch: &[(usize, Row, Diff)]) -> Result<(), String> {
        for (table, row, diff) in batch {
            let values: Vec<rusqlite::types::Value> =
                row.iter().map(|d| sql_semantics::parameter(&OwnedDatum::from(d))).collect();
            if *diff > 0 {
                let insert = format!("INSERT INTO t{table} VALUES (?1, ?2, ?3, ?4)");
                for _ in 0..*diff {
                    self.connection
                        .execute(&insert, rusqlite::params_from_iter(values.iter()))
                        .map_err(sql_error)?;
                }
            } else {
                let delete = format!(
                    "DELETE FROM t{table} WHERE rowid IN (SELECT rowid FROM t{table} WHERE k IS ?1 AND a IS ?2 \
                     AND s IS ?3 AND f IS ?4 LIMIT {})",
                    diff.unsigned_abs()
                );
                let deleted = self
                    .connection
                    .execute(&delete, rusqlite::params_from_iter(values.iter()))
                    .map_err(sql_error)?;
                if deleted as u64 != diff.unsigned_abs() {
                    return Err(format!("deleted {deleted} copies of {row} from t{table}, not {}", -diff));
                }
            }
        }
        Ok(())
    }

    /// The rows of `select` (under the case's `WITH`), typed as the case's result.
    fn rows(
        &self,
        case: &SqlCase,
        select: &str,
        parameters: &[rusqlite::types::Value],
    ) -> Result<Vec<Row>, String> {
        let text = format!("{} {select}", case.with_clause(case.ctes.len()));
        let mut statement = self.connection.prepare(&text).map_err(sql_error)?;
        let mut rows = statement.query(rusqlite::params_from_iter(parameters.iter())).map_err(sql_error)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql_error)? {
            let mut datums = Vec::with_capacity(case.typ.arity());
            for (index, typ) in case.typ.column_types.iter().enumerate() {
                let value = row.get_ref(index).map_err(sql_error)?;
                datums.push(sql_semantics::datum(value, *typ)?);
            }
            out.push(pack_owned(&datums));
        }
        Ok(out)
    }

    /// Runs every common table expression to the end, reading every column: the IR evaluates every
    /// operator on every row (an error anywhere is the answer's), where SQLite evaluates lazily (a join
    /// with an empty side never reads the other). An error is the first SQLite reports.
    fn evaluate_everything(&self, case: &SqlCase) -> Result<(), String> {
        for (index, cte) in case.ctes.iter().enumerate() {
            let counts: Vec<String> = (0..cte.arity).map(|c| format!("count(c{c})")).collect();
            let text =
                format!("{} SELECT {} FROM {}", case.with_clause(index + 1), counts.join(" + "), cte.name);
            let mut statement = self.connection.prepare(&text).map_err(sql_error)?;
            statement.query_row([], |_| Ok(())).map_err(sql_error)?;
        }
        Ok(())
    }

    /// The result's rows now, or SQLite's error.
    pub fn contents(&self, case: &SqlCase) -> Result<Multiset, String> {
        self.evaluate_everything(case)?;
        let result = case.result();
        Ok(count(self.rows(case, &format!("SELECT * FROM {result}"), &[])?))
    }

    /// The result ordered, offset and limited as the case's finishing says.
    pub fn finished(&self, case: &SqlCase) -> Result<Vec<(Row, NonZeroU64)>, String> {
        self.evaluate_everything(case)?;
        let result = case.result();
        let finishing = &case.finishing;
        let mut select = format!("SELECT * FROM {result}");
        if case.finishing_ranks() {
            write!(select, " ORDER BY {}", sql_semantics::order_by(&finishing.order_by, case.typ.arity()))
                .expect("a string");
            write!(select, " LIMIT {} OFFSET {}", finishing.limit.map_or(-1, |l| l as i64), finishing.offset)
                .expect("a string");
        }
        let rows = self.rows(case, &select, &[])?;
        // Copies of a row are adjacent in a total order: runs become counts.
        let mut out: Vec<(Row, NonZeroU64)> = Vec::new();
        for row in rows {
            match out.last_mut() {
                Some((last, count)) if *last == row => *count = count.saturating_add(1),
                _ => out.push((row, NonZeroU64::MIN)),
            }
        }
        Ok(out)
    }

    /// The rows whose [`SqlCase::key`] columns are one of `keys` (by identity).
    pub fn lookup(&self, case: &SqlCase, keys: &[Row]) -> Result<Multiset, String> {
        self.evaluate_everything(case)?;
        let result = case.result();
        let mut found = Vec::new();
        for key in keys {
            let parameters: Vec<rusqlite::types::Value> =
                key.iter().map(|d| sql_semantics::parameter(&OwnedDatum::from(d))).collect();
            let placeholders: Vec<String> = (1..=parameters.len()).map(|i| format!("?{i}")).collect();
            let condition = sql_semantics::key_matches(&case.key, &placeholders);
            found.extend(self.rows(
                case,
                &format!("SELECT * FROM {result} WHERE {condition}"),
                &parameters,
            )?);
        }
        Ok(count(found))
    }
}

fn count(rows: Vec<Row>) -> Multiset {
    let mut out = Multiset::new();
    for row in rows {
        *out.entry(row).or_default() += 1;
    }
    out
}

/// A report of a disagreement: what was compared, the seed (and how to rerun it), the time, the plan,
/// the SQL and both answers.
pub fn mismatch(
    case: &SqlCase,
    time: usize,
    what: &str,
    sqlite: &dyn std::fmt::Debug,
    ir: &dyn std::fmt::Debug,
) -> String {
    format!(
        "SQLite and the plan disagree on {what} at time {time} of seed {seed} \
         (reproduce: SQLITE_ORACLE_SEED={seed})\nplan: {plan:#?}\nkey: {key:?}, finishing: {finishing:?}\n\
         updates: {batches:?}\nSQL:\n{sql}\nSQLite: {sqlite:?}\nplan's answer: {ir:?}",
        seed = case.seed,
        plan = case.plan,
        key = case.key,
        finishing = case.finishing,
        batches = case.batches,
        sql = case.sql(),
    )
}

/// Compares SQLite's answer with the plan's: equal rows, or both errors (the messages may differ).
pub fn agree<T: PartialEq + std::fmt::Debug, E1: std::fmt::Debug, E2: std::fmt::Debug>(
    sqlite: &Result<T, E1>,
    ir: &Result<T, E2>,
) -> bool {
    match (sqlite, ir) {
        (Ok(a), Ok(b)) => a == b,
        (Err(_), Err(_)) => true,
        _ => false,
    }
}

/// The multiset of `Multiset` keyed by the case's tables' ids, after the first `times` batches.
pub fn table_contents(case: &SqlCase, times: usize, base: u64) -> BTreeMap<GlobalId, Multiset> {
    let mut updates: Vec<Vec<(Row, Diff)>> = vec![Vec::new(); TABLES];
    for batch in &case.batches[..times] {
        for (table, row, diff) in batch {
            updates[*table].push((row.clone(), *diff));
        }
    }
    updates
        .into_iter()
        .enumerate()
        .map(|(table, updates)| (table_id(table, base), crate::reference::consolidate(updates)))
        .collect()
}
