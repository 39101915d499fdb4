//! A differential oracle nobody here wrote: SQLite (feature `sqlite`, with the `rusqlite` crate's bundled
//! library). [`SqlCase::generate`] makes, from a seed, random tables, several timestamps of inserts and
//! deletes, a random plan and the SQL text that computes the same relation, and a peek's finishing;
//! [`Sqlite`] keeps the tables in an in-memory SQLite database and answers the query after each batch.
//! The tests compare those answers with the plan's: `tests/it/sqlite.rs` (the reference interpreter) and
//! `compute/tests/it/sqlite.rs` (the replica, incrementally, through a real socket).
//!
//! **What the plans cover.** Filters over arithmetic, comparisons, `AND`/`OR`/`NOT`, `IS NULL` and `IF`;
//! decimals (`+ - * /`, negation, `abs`, `round`, casts from integers and to integers, `sum`, `avg`,
//! `min`, `max`, comparisons), dates (plus and minus days and months, `extract`, comparisons,
//! `BETWEEN`), `CASE` with several branches, `COALESCE`, `NULLIF`, `IN (list)`, `BETWEEN`, `LIKE` and
//! `NOT LIKE`, `substring`, casts of integers to floats; maps and projections; joins of two and three
//! inputs (equi-joins and cross joins); left, right, full, semi (`EXISTS`) and anti (`NOT EXISTS`)
//! joins through `protocol::joins`, with an equality and a residual; reduces with `count`, `count(*)`,
//! `sum`, `avg`, `min` and `max`, grouped and global; distinct; union; negate and threshold (as `EXCEPT
//! ALL`); top-k with ordering, limit and offset; `ArrangeBy`; a peek's order, limit and offset and key
//! lookups; `NULL`s in every nullable column; integers at the edges of `i64`; float division by zero.
//! [`CONSTRUCTS`] names them; the tests assert each was generated.
//!
//! **What it does not cover.** Negative multiplicities other than through `EXCEPT ALL` (SQL has none),
//! multiplicities beyond `i64` (SQL has none: `compute/tests/it/operators.rs` checks them against the
//! reference), float arithmetic on infinities and NaN (SQLite has no NaN), timestamps, intervals as
//! columns and byte strings; decimals with many digits or of large magnitude, and decimal division
//! below the top of a plan (SQLite computes decimals in doubles: `sql_semantics::decimal_value`); `avg`
//! of integers; `IN` lists and `BETWEEN` bounds that are not columns or literals (SQLite may skip
//! evaluating them).
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
    AggregateExpr, AggregateFunc, BinaryFunc, BuildDesc, ColumnOrder, ColumnType, DataflowDescription, Datum,
    Diff, GlobalId, IndexExport, Plan, RelationDesc, RelationType, Row, RowSetFinishing, ScalarExpr,
    ScalarType, SourceImport, UnaryFunc, VariadicFunc,
};

/// Names of the IR's constructs the generator covers, as they appear in a plan's `Debug` text (tests
/// assert that their cases generate each).
pub const CONSTRUCTS: &[&str] = &[
    "Decimal",
    "Date(",
    "Interval",
    "Cast(",
    "Abs",
    "Round(",
    "ExtractYear",
    "ExtractMonth",
    "ExtractDay",
    "Like",
    "Coalesce",
    "NullIf",
    "In,",
    "Substring",
    "CountRows",
    "Avg",
    "Negate",
    "Threshold",
    "TopK",
    "Join",
    "Reduce",
    "Distinct",
];

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

/// The tables every case has: `t0`, `t1`, `t2`, each `(k int not null, a int, s text, f real,
/// d decimal(_, 2), t date)`.
pub const TABLES: usize = 3;

/// The columns of every table.
const COLUMNS: [&str; 6] = ["k", "a", "s", "f", "d", "t"];

/// The scale of the tables' decimal column `d`.
const DECIMAL_SCALE: u8 = 2;

fn table_desc() -> RelationDesc {
    RelationDesc::new([
        ("k", ColumnType::new(ScalarType::Int64, false)),
        ("a", ColumnType::new(ScalarType::Int64, true)),
        ("s", ColumnType::new(ScalarType::Text, true)),
        ("f", ColumnType::new(ScalarType::Float64, true)),
        ("d", ColumnType::new(ScalarType::Decimal { scale: DECIMAL_SCALE }, true)),
        ("t", ColumnType::new(ScalarType::Date, true)),
    ])
}

/// The type of a plan over the tables (every generated plan is well-typed).
fn typ_of(plan: &Plan) -> RelationType {
    let tables = |id: GlobalId| matches!(id, GlobalId::User(1..=3)).then(|| table_desc().typ().clone());
    plan.typ(&tables).expect("generated plans are well-typed")
}

/// The decimals of the tables and literals: multiples of a quarter, which doubles hold exactly, so
/// SQLite's floating-point arithmetic on them is exact too (see [`sql_semantics::decimal_value`]).
const DECIMALS: [&str; 6] = ["-1.25", "0", "0.5", "2.75", "10.25", "3"];

/// The dates of the tables and literals (month ends and a leap day, for month arithmetic).
const DATES: [(i32, u32, u32); 6] =
    [(1994, 1, 31), (1995, 8, 31), (1995, 3, 15), (1996, 2, 29), (1997, 5, 31), (1998, 12, 1)];

fn decimal_datum(text: &str) -> OwnedDatum {
    OwnedDatum::Decimal(text.parse().expect("a decimal"))
}

fn date_datum((year, month, day): (i32, u32, u32)) -> OwnedDatum {
    OwnedDatum::Date(crate::days_from_civil(year, month, day))
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
    let d = decimal_datum(pick.of(&DECIMALS));
    let d = nullable(pick, d);
    let t = date_datum(pick.of(&DATES));
    let t = nullable(pick, t);
    pack_owned(&[k, a, s, f, d, t])
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
        match self.pick.below(10) {
            0 | 1 => {
                let input = self.relation(depth - 1);
                self.filter(input)
            }
            9 => self.outer_join(depth - 1),
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
        let columns: Vec<String> = COLUMNS.iter().enumerate().map(|(i, c)| format!("{c} AS c{i}")).collect();
        let cte = self.add_cte(format!("SELECT {} FROM t{table}", columns.join(", ")), COLUMNS.len());
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
            let want = self.pick.of(&[
                ScalarType::Int64,
                ScalarType::Int64,
                ScalarType::Bool,
                ScalarType::Text,
                ScalarType::Decimal { scale: DECIMAL_SCALE },
                ScalarType::Date,
            ]);
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

    /// A left, right, full, semi or anti join of two inputs (`protocol::joins`' lowerings against SQL's
    /// own joins), on an equality of two columns of one type where there are such, and sometimes a
    /// residual `<>` of two other columns.
    fn outer_join(&mut self, depth: usize) -> Relation {
        let (left, right) = (self.relation(depth.min(1)), self.relation(depth.min(1)));
        let (l, r) = (left.typ.arity(), right.typ.arity());
        let pair = |pick: &mut Pick| {
            let column = pick.below(l);
            let wanted = left.typ.column_types[column].scalar_type;
            let matching: Vec<usize> =
                (0..r).filter(|c| right.typ.column_types[*c].scalar_type == wanted).collect();
            (!matching.is_empty()).then(|| (column, matching[pick.below(matching.len())]))
        };
        let on: Vec<(usize, usize)> = pair(&mut self.pick).into_iter().collect();
        let residual_pair = if self.pick.one_in(2) { pair(&mut self.pick) } else { None };
        let residual: Vec<ScalarExpr> =
            residual_pair.iter().map(|(a, b)| crate::joins::not_equal(*a, l + *b)).collect();
        let mut conditions: Vec<String> = on.iter().map(|(a, b)| format!("x.c{a} = y.c{b}")).collect();
        conditions.extend(residual_pair.iter().map(|(a, b)| format!("x.c{a} <> y.c{b}")));
        let condition = if conditions.is_empty() { "1".to_string() } else { conditions.join(" AND ") };
        let (lt, rt) = (&left.typ, &right.typ);
        let (kind, plan) = match self.pick.below(5) {
            0 => ("LEFT", crate::joins::left_join(&left.plan, lt, &right.plan, rt, &on, &residual)),
            1 => ("RIGHT", crate::joins::right_join(&left.plan, lt, &right.plan, rt, &on, &residual)),
            2 => ("FULL", crate::joins::full_join(&left.plan, lt, &right.plan, rt, &on, &residual)),
            3 => ("EXISTS", crate::joins::semi_join(&left.plan, lt, &right.plan, rt, &on, &residual)),
            _ => ("NOT EXISTS", crate::joins::anti_join(&left.plan, lt, &right.plan, rt, &on, &residual)),
        };
        let left_columns: Vec<String> = (0..l).map(|c| format!("x.c{c} AS c{c}")).collect();
        let select = if kind.ends_with("EXISTS") {
            format!(
                "SELECT {} FROM {} AS x WHERE {kind} (SELECT 1 FROM {} AS y WHERE {condition})",
                left_columns.join(", "),
                left.cte,
                right.cte
            )
        } else {
            let right_columns = (0..r).map(|c| format!("y.c{c} AS c{}", l + c));
            let columns: Vec<String> = left_columns.into_iter().chain(right_columns).collect();
            format!(
                "SELECT {} FROM {} AS x {kind} JOIN {} AS y ON {condition}",
                columns.join(", "),
                left.cte,
                right.cte
            )
        };
        let typ = typ_of(&plan);
        let cte = self.add_cte(select, typ.arity());
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
                AggregateFunc::CountRows,
                AggregateFunc::Avg,
            ]);
            let column_type = input.typ.column_types[column].scalar_type;
            // `avg` of integers is not compared (SQLite averages them as doubles, inexact at the edges
            // of `i64`), nor of decimals with more digits than `sql_semantics::decimal_average` reads.
            let avg_covered = match column_type {
                ScalarType::Float64 => true,
                ScalarType::Decimal { scale } => scale <= 4,
                _ => false,
            };
            let func = if func.output_type(input.typ.column_types[column]).is_some()
                && (func != AggregateFunc::Avg || avg_covered)
            {
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

    /// The relation with one more column: an expression of a type the scans' columns do not exercise
    /// much otherwise (dates, decimals, text functions).
    fn mapped(&mut self, input: Relation) -> Relation {
        let want = self.pick.of(&[
            ScalarType::Date,
            ScalarType::Decimal { scale: DECIMAL_SCALE },
            ScalarType::Text,
            ScalarType::Int64,
        ]);
        let (expr, sql) = self.expr(&input.typ, want, 2);
        let mut typ = input.typ.clone();
        typ.column_types.push(expr.typ(&input.typ).expect("generated expressions are well-typed"));
        let select = format!("SELECT *, {sql} AS c{} FROM {}", input.typ.arity(), input.cte);
        let cte = self.add_cte(select, typ.arity());
        let plan = Plan::Map { input: Box::new(input.plan), exprs: vec![expr] };
        Relation { plan, typ, cte, is_table: false }
    }

    /// The result: the relation, sometimes with a float division of two of its float columns appended
    /// (at the top only: its infinities and NaN must not meet SQLite's arithmetic, see
    /// [`sql_semantics::float_division`]).
    fn top(&mut self, input: Relation) -> Relation {
        let input = if self.pick.one_in(2) { self.mapped(input) } else { input };
        let floats: Vec<usize> = (0..input.typ.arity())
            .filter(|c| input.typ.column_types[*c].scalar_type == ScalarType::Float64)
            .collect();
        let decimals: Vec<usize> = (0..input.typ.arity())
            .filter(|c| matches!(input.typ.column_types[*c].scalar_type, ScalarType::Decimal { scale } if scale <= 4))
            .collect();
        if !decimals.is_empty() && self.pick.one_in(3) {
            let (x, y) = (self.pick.of(&decimals), self.pick.of(&decimals));
            let expr = ScalarExpr::column(x).call_binary(BinaryFunc::Div, ScalarExpr::column(y));
            let sql = sql_semantics::decimal_division(&format!("c{x}"), &format!("c{y}"));
            let mut typ = input.typ.clone();
            typ.column_types.push(expr.typ(&input.typ).expect("decimals divide"));
            let select = format!("SELECT *, {sql} AS c{} FROM {}", input.typ.arity(), input.cte);
            let cte = self.add_cte(select, typ.arity());
            let plan = Plan::Map { input: Box::new(input.plan), exprs: vec![expr] };
            return Relation { plan, typ, cte, is_table: false };
        }
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
            ScalarType::Decimal { .. } => {
                let datum = decimal_datum(self.pick.of(&DECIMALS));
                let sql = sql_semantics::literal(&datum);
                let OwnedDatum::Decimal(d) = datum else { unreachable!("a decimal") };
                return (ScalarExpr::decimal(&d.to_string(), DECIMAL_SCALE), sql);
            }
            ScalarType::Date => date_datum(self.pick.of(&DATES)),
            _ => OwnedDatum::Bool(self.pick.one_in(2)),
        };
        let sql = sql_semantics::literal(&datum);
        (ScalarExpr::literal(datum.as_datum()), sql)
    }

    /// A column of `input` whose type is `want` (any decimal for a decimal), or a literal.
    fn leaf(&mut self, input: &RelationType, want: ScalarType) -> Expr {
        let fits = |c: &ColumnType| match (c.scalar_type, want) {
            (ScalarType::Decimal { .. }, ScalarType::Decimal { .. }) => true,
            (have, want) => have == want,
        };
        let columns: Vec<usize> = (0..input.arity()).filter(|c| fits(&input.column_types[*c])).collect();
        if !columns.is_empty() && !self.pick.one_in(4) {
            let column = self.pick.of(&columns);
            return (ScalarExpr::column(column), format!("c{column}"));
        }
        self.literal(want)
    }

    /// A well-typed expression over `input` of type `want` (any scale for a decimal), and its SQL.
    fn expr(&mut self, input: &RelationType, want: ScalarType, depth: usize) -> Expr {
        if depth == 0 || self.pick.one_in(3) {
            return self.leaf(input, want);
        }
        if self.pick.one_in(6) {
            return self.conditional(input, want, depth);
        }
        match want {
            ScalarType::Int64 => self.integer(input, depth),
            ScalarType::Float64 => {
                if self.pick.one_in(4) {
                    let (a, a_sql) = self.expr(input, ScalarType::Int64, depth - 1);
                    return (a.cast(ScalarType::Float64), format!("CAST({a_sql} AS REAL)"));
                }
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
            ScalarType::Decimal { .. } => self.decimal(input, depth),
            ScalarType::Date => self.date(input, depth),
            ScalarType::Text => {
                let (a, a_sql) = self.expr(input, want, depth - 1);
                if self.pick.one_in(2) {
                    let (b, b_sql) = self.leaf(input, want);
                    let exprs = vec![a, b];
                    return (
                        ScalarExpr::call_variadic(VariadicFunc::Coalesce, exprs),
                        format!("coalesce({a_sql}, {b_sql})"),
                    );
                }
                let (start, length) = (self.pick.below(4) as i64 - 1, self.pick.below(4) as i64);
                let exprs = vec![
                    a,
                    ScalarExpr::literal(Datum::Int64(start)),
                    ScalarExpr::literal(Datum::Int64(length)),
                ];
                (
                    ScalarExpr::call_variadic(VariadicFunc::Substring, exprs),
                    sql_semantics::substring(&a_sql, start, length),
                )
            }
            ScalarType::Bool => self.predicate(input, depth),
            _ => self.leaf(input, want),
        }
    }

    /// `IF`, a `CASE` of two branches (the IR's lowering to `If`s), `COALESCE` or `NULLIF`, of type
    /// `want`.
    fn conditional(&mut self, input: &RelationType, want: ScalarType, depth: usize) -> Expr {
        match self.pick.below(4) {
            0 => {
                let (cond, cond_sql) = self.expr(input, ScalarType::Bool, depth - 1);
                let (then, then_sql) = self.expr(input, want, depth - 1);
                let (els, els_sql) = self.expr(input, want, depth - 1);
                let sql = format!("(CASE WHEN {cond_sql} THEN {then_sql} ELSE {els_sql} END)");
                (cond.if_then_else(then, els), sql)
            }
            1 => {
                let (c1, c1_sql) = self.expr(input, ScalarType::Bool, depth - 1);
                let (v1, v1_sql) = self.expr(input, want, depth - 1);
                let (c2, c2_sql) = self.expr(input, ScalarType::Bool, depth - 1);
                let (v2, v2_sql) = self.expr(input, want, depth - 1);
                let (els, els_sql) = self.leaf(input, want);
                let sql = format!(
                    "(CASE WHEN {c1_sql} THEN {v1_sql} WHEN {c2_sql} THEN {v2_sql} ELSE {els_sql} END)"
                );
                (ScalarExpr::case(vec![(c1, v1), (c2, v2)], els), sql)
            }
            2 => {
                let (a, a_sql) = self.expr(input, want, depth - 1);
                let (b, b_sql) = self.expr(input, want, depth - 1);
                let (c, c_sql) = self.leaf(input, want);
                let exprs = vec![a, b, c];
                (
                    ScalarExpr::call_variadic(VariadicFunc::Coalesce, exprs),
                    format!("coalesce({a_sql}, {b_sql}, {c_sql})"),
                )
            }
            _ => {
                let (a, a_sql) = self.expr(input, want, depth - 1);
                let (b, b_sql) = self.expr(input, want, depth - 1);
                (a.call_binary(BinaryFunc::NullIf, b), format!("nullif({a_sql}, {b_sql})"))
            }
        }
    }

    fn integer(&mut self, input: &RelationType, depth: usize) -> Expr {
        let want = ScalarType::Int64;
        match self.pick.below(8) {
            0 => {
                let (a, a_sql) = self.expr(input, want, depth - 1);
                (a.call_unary(UnaryFunc::Neg), sql_semantics::integer_negation(&a_sql))
            }
            1 => {
                let (a, a_sql) = self.expr(input, want, depth - 1);
                (a.call_unary(UnaryFunc::Abs), format!("abs({a_sql})"))
            }
            2 => {
                let func =
                    self.pick.of(&[UnaryFunc::ExtractYear, UnaryFunc::ExtractMonth, UnaryFunc::ExtractDay]);
                let (a, a_sql) = self.expr(input, ScalarType::Date, depth - 1);
                (a.call_unary(func), sql_semantics::extract(func, &a_sql))
            }
            3 => {
                let (a, a_sql) = self.expr(input, ScalarType::Decimal { scale: DECIMAL_SCALE }, depth - 1);
                (a.cast(ScalarType::Int64), sql_semantics::decimal_to_integer(&a_sql))
            }
            _ => {
                let (a, a_sql) = self.expr(input, want, depth - 1);
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
        }
    }

    /// A decimal expression: sums and differences, products of leaves (so values keep few digits, see
    /// [`sql_semantics::decimal_value`]), negation, `abs`, `round`, casts of small integers.
    fn decimal(&mut self, input: &RelationType, depth: usize) -> Expr {
        let want = ScalarType::Decimal { scale: DECIMAL_SCALE };
        match self.pick.below(6) {
            0 | 1 => {
                let (a, a_sql) = self.expr(input, want, depth - 1);
                let (b, b_sql) = self.expr(input, want, depth - 1);
                let (func, operator) = self.pick.of(&[(BinaryFunc::Add, "+"), (BinaryFunc::Sub, "-")]);
                (a.call_binary(func, b), format!("({a_sql} {operator} {b_sql})"))
            }
            2 => {
                let (a, a_sql) = self.leaf(input, want);
                let (b, b_sql) = self.leaf(input, want);
                (a.call_binary(BinaryFunc::Mul, b), format!("({a_sql} * {b_sql})"))
            }
            3 => {
                let (a, a_sql) = self.expr(input, want, depth - 1);
                if self.pick.one_in(2) {
                    (a.call_unary(UnaryFunc::Neg), format!("(-{a_sql})"))
                } else {
                    (a.call_unary(UnaryFunc::Abs), format!("abs({a_sql})"))
                }
            }
            4 => {
                let (a, a_sql) = self.leaf(input, want);
                let scale = self.pick.below(2) as u8;
                (a.call_unary(UnaryFunc::Round(scale)), format!("round({a_sql}, {scale})"))
            }
            _ => {
                // A small integer (integers reach the edges of i64, beyond what doubles hold exactly).
                let (a, a_sql) = self.leaf(input, ScalarType::Int64);
                let small = a.call_binary(BinaryFunc::Mod, ScalarExpr::literal(Datum::Int64(7)));
                let small_sql = sql_semantics::integer_arithmetic(BinaryFunc::Mod, &a_sql, "7");
                (
                    small.cast(ScalarType::Decimal { scale: DECIMAL_SCALE }),
                    format!("CAST({small_sql} AS REAL)"),
                )
            }
        }
    }

    /// A date expression: a date plus or minus days or months.
    fn date(&mut self, input: &RelationType, depth: usize) -> Expr {
        let (a, a_sql) = self.expr(input, ScalarType::Date, depth - 1);
        let amount = self.pick.below(50) as i32 - 20;
        let (interval, sql) = if self.pick.one_in(2) {
            (crate::Interval::months(amount / 4), sql_semantics::add_months(&a_sql, amount / 4))
        } else {
            (crate::Interval::days(amount * 7), sql_semantics::add_days(&a_sql, amount * 7))
        };
        let func = if self.pick.one_in(2) { BinaryFunc::Add } else { BinaryFunc::Sub };
        let interval = if func == BinaryFunc::Sub {
            crate::Interval { months: -interval.months, days: -interval.days, ms: 0 }
        } else {
            interval
        };
        // `a - (-x)` in the IR is `a + x` in SQL: the SQL was written for `a + interval`, so the IR
        // subtracts the negated interval.
        (a.call_binary(func, ScalarExpr::literal(Datum::Interval(interval))), sql)
    }

    fn predicate(&mut self, input: &RelationType, depth: usize) -> Expr {
        match self.pick.below(8) {
            0 | 1 => {
                let operand = self.pick.of(&[
                    ScalarType::Int64,
                    ScalarType::Int64,
                    ScalarType::Text,
                    ScalarType::Float64,
                    ScalarType::Bool,
                    ScalarType::Decimal { scale: DECIMAL_SCALE },
                    ScalarType::Date,
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
            4 => {
                let (a, a_sql) = self.expr(input, ScalarType::Text, depth - 1);
                let pattern = self.pick.of(&["%a%", "a_", "_", "%", "b%", "", "%c"]);
                let negated = self.pick.one_in(3);
                let like = if negated { a.not_like(pattern) } else { a.like(pattern) };
                (like, sql_semantics::like(&a_sql, pattern, negated))
            }
            5 => {
                // Leaves only: SQLite may stop evaluating a list early, the IR evaluates every item.
                let operand =
                    self.pick.of(&[ScalarType::Int64, ScalarType::Text, ScalarType::Decimal { scale: 2 }]);
                let (a, a_sql) = self.leaf(input, operand);
                let items: Vec<Expr> =
                    (0..1 + self.pick.below(3)).map(|_| self.leaf(input, operand)).collect();
                let sql = items.iter().map(|(_, sql)| sql.clone()).collect::<Vec<_>>().join(", ");
                (a.in_list(items.into_iter().map(|(e, _)| e).collect()), format!("({a_sql} IN ({sql}))"))
            }
            6 => {
                // SQL's own BETWEEN against the IR's lowering (leaves: neither evaluates a bound it
                // does not need, and leaves have no errors to skip).
                let operand =
                    self.pick.of(&[ScalarType::Int64, ScalarType::Date, ScalarType::Decimal { scale: 2 }]);
                let (x, x_sql) = self.leaf(input, operand);
                let (low, low_sql) = self.leaf(input, operand);
                let (high, high_sql) = self.leaf(input, operand);
                (x.between(low, high), format!("({x_sql} BETWEEN {low_sql} AND {high_sql})"))
            }
            _ => {
                let operand = self.pick.of(&[
                    ScalarType::Int64,
                    ScalarType::Text,
                    ScalarType::Float64,
                    ScalarType::Decimal { scale: DECIMAL_SCALE },
                ]);
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
            OwnedDatum::Decimal(d) => format!("({:?})", decimal_value(*d)),
            OwnedDatum::Date(days) => format!("'{}'", crate::format_date(*days)),
            other => unreachable!("the generator makes no {other:?}"),
        }
    }

    /// SQLite has no exact decimal type: decimals are doubles there. The generator keeps decimals to
    /// multiples of a quarter (and their products, sums and differences) of small magnitude, which
    /// doubles hold exactly, so SQLite's `+ - *`, `sum` and comparisons are exact on them; what comes
    /// back is read at its column's scale ([`datum`]). Division rounds, differently: see
    /// [`decimal_division`].
    pub fn decimal_value(d: crate::Decimal) -> f64 {
        d.to_string().parse().expect("a decimal's text is a float's")
    }

    /// The canonical scale (digits after the point, without trailing zeros) of a decimal held as a
    /// double with at most 8 of them.
    fn decimal_scale(x: &str) -> String {
        let mut cases = String::from("CASE");
        for digits in (1..=8).rev() {
            // The last `9 - digits` of the value's 8 fractional digits are all zero: at most `digits - 1`.
            let modulus = 10i64.pow(9 - digits);
            write!(
                cases,
                " WHEN CAST(round(abs({x}) * 100000000) AS INTEGER) % {modulus} != 0 THEN {digits}"
            )
            .expect("a string");
        }
        cases.push_str(" ELSE 0 END");
        cases
    }

    /// Decimal division rounds the exact quotient half away from zero to the larger of the two values'
    /// canonical scales plus 6; SQLite divides doubles. `round()` of SQLite's quotient to that scale
    /// gives the same decimal wherever the exact quotient is not within a double's error of a rounding
    /// boundary, which for the generator's small operands (a quarter's multiples over small integers)
    /// it never is. Division by zero is an error in the IR, `NULL` in SQLite: `ir_fail`.
    pub fn decimal_division(a: &str, b: &str) -> String {
        format!(
            "(CASE WHEN ({a} IS NULL) + ({b} IS NULL) > 0 THEN NULL WHEN {b} = 0 THEN ir_fail('division by zero') \
             ELSE round(CAST({a} AS REAL) / {b}, max({}, {}) + 6) END)",
            decimal_scale(a),
            decimal_scale(b)
        )
    }

    /// `avg` of decimals is their exact sum divided by their count with the IR's decimal division; SQLite
    /// averages doubles (exact sums here, see [`decimal_value`]): rounded as [`decimal_division`] does.
    pub fn decimal_average(column: &str) -> String {
        format!("round(avg({column}), {} + 6)", decimal_scale(&format!("sum({column})")))
    }

    /// A date plus `months` months: the IR (and SQL) clamps the day to the last of the resulting month;
    /// SQLite's `date(x, '+1 months')` overflows into the next month instead (January 31 plus a month is
    /// March 3), so the result is the earlier of that and the last day of the resulting month. Dates are
    /// ISO text in SQLite, which orders as the dates do.
    pub fn add_months(date: &str, months: i32) -> String {
        format!(
            "min(date({date}, '{months:+} months'), date({date}, 'start of month', '{:+} months', '-1 days'))",
            months + 1
        )
    }

    /// A date plus `days` days.
    pub fn add_days(date: &str, days: i32) -> String {
        format!("date({date}, '{days:+} days')")
    }

    /// `extract(field FROM date)`: SQLite's `strftime`, as an integer.
    pub fn extract(func: crate::UnaryFunc, date: &str) -> String {
        let format = match func {
            crate::UnaryFunc::ExtractYear => "%Y",
            crate::UnaryFunc::ExtractMonth => "%m",
            _ => "%d",
        };
        format!("CAST(strftime('{format}', {date}) AS INTEGER)")
    }

    /// SQL's `substring(x FROM start FOR length)` counts positions below 1 as characters that are not
    /// there; SQLite's `substr` counts a negative start from the end. With `start` and `length`
    /// literals, the SQLite arguments that take the same characters are computed here.
    pub fn substring(text: &str, start: i64, length: i64) -> String {
        let first = start.max(1);
        let count = (start + length - first).max(0);
        format!("substr({text}, {first}, {count})")
    }

    /// A cast of a decimal to an integer rounds half away from zero in the IR; SQLite's `CAST` truncates
    /// (its `round` rounds half away from zero).
    pub fn decimal_to_integer(x: &str) -> String {
        format!("CAST(round({x}) AS INTEGER)")
    }

    /// `LIKE` is case-sensitive in the IR (and SQL); SQLite's is not for ASCII letters unless
    /// `PRAGMA case_sensitive_like` is on, which [`Sqlite::open`] sets.
    pub fn like(x: &str, pattern: &str, negated: bool) -> String {
        let not = if negated { "NOT " } else { "" };
        format!("({x} {not}LIKE '{}')", pattern.replace('\'', "''"))
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
            (AggregateFunc::Avg, ScalarType::Decimal { .. }) => decimal_average(column),
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
            OwnedDatum::Decimal(d) => Value::Real(decimal_value(*d)),
            OwnedDatum::Date(days) => Value::Text(crate::format_date(*days)),
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
            // A decimal comes back as a double (or an integer): read at the column's scale.
            (ValueRef::Real(x), ScalarType::Decimal { scale }) => {
                let text = format!("{x:.*}", usize::from(scale));
                OwnedDatum::Decimal(text.parse().map_err(|e| format!("{text}: {e}"))?)
            }
            (ValueRef::Integer(i), ScalarType::Decimal { .. }) => {
                OwnedDatum::Decimal(crate::Decimal::new(i128::from(i), 0).ok_or("a decimal")?)
            }
            (ValueRef::Text(text), ScalarType::Date) => {
                let text = std::str::from_utf8(text).map_err(|e| e.to_string())?;
                let parts: Vec<&str> = text.split('-').collect();
                let number = |i: usize| parts.get(i).and_then(|p| p.parse::<i64>().ok());
                match (parts.len(), number(0), number(1), number(2)) {
                    (3, Some(y), Some(m), Some(d)) => {
                        OwnedDatum::Date(crate::days_from_civil(y as i32, m as u32, d as u32))
                    }
                    _ => return Err(format!("SQLite returned {text:?} for a date")),
                }
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
            // Decimals as doubles and dates as ISO text: see `sql_semantics::decimal_value` and
            // `sql_semantics::add_months`.
            let create = format!(
                "CREATE TABLE t{table} (k INTEGER NOT NULL, a INTEGER, s TEXT, f REAL, d REAL, t TEXT)"
            );
            connection.execute(&create, []).map_err(sql_error)?;
        }
        // Not `SQLITE_DETERMINISTIC`: SQLite evaluates a deterministic function of constants once, up
        // front, even inside a `CASE` branch no row takes, and these must fail only where the IR does.
        let flags = FunctionFlags::SQLITE_UTF8;
        // See `sql_semantics::like`.
        connection.execute_batch("PRAGMA case_sensitive_like = ON").map_err(sql_error)?;
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
                let insert = format!("INSERT INTO t{table} VALUES (?1, ?2, ?3, ?4, ?5, ?6)");
                for _ in 0..*diff {
                    self.connection
                        .execute(&insert, rusqlite::params_from_iter(values.iter()))
                        .map_err(sql_error)?;
                }
            } else {
                let delete = format!(
                    "DELETE FROM t{table} WHERE rowid IN (SELECT rowid FROM t{table} WHERE k IS ?1 AND a IS ?2 \
                     AND s IS ?3 AND f IS ?4 AND d IS ?5 AND t IS ?6 LIMIT {})",
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
