//! The 22 TPC-H queries, one function each, as dataflows over the plan IR with an index export, each with
//! its SQL beside it: the specification's query text with its validation parameters (clause 2.4), in
//! SQLite's spelling where SQLite needs one (date arithmetic with `date()`, `extract(year ...)` with
//! `strftime`, `substring` with `substr`, query 15's view as a `WITH`), which is what the SQLite oracle
//! (`crate::sqlite`) runs. Query 11's `FRACTION` is the scale-factor-1 value, `0.0001`, at every scale.
//!
//! Each function builds what an optimizer of a SQL front end would (joins in an order where each input
//! shares a key with what comes before, filters on the scans, correlated subqueries decorrelated,
//! `EXISTS`/`IN`/`NOT EXISTS` as `protocol::joins` semi- and anti-joins, `LIMIT` as a `TopK`); the result's
//! columns are the `SELECT` list's, in order, and the peek's finishing is the `ORDER BY` and `LIMIT`.
//!
//! Where the IR's semantics differ from SQL's (decimals are exact and SQLite's are doubles; a global
//! aggregate over nothing has no row), the comparison handles it in one place: `crate::sqlite::semantics`.

use protocol::AggregateFunc::{Avg, CountRows, Max, Min, Sum};
use protocol::{
    DataflowDescription, GlobalId, RelationType, RowSetFinishing, ScalarExpr, UnaryFunc, VariadicFunc,
};

use crate::builder::{Ops, QueryBuilder, Rel, date, days, dec, decimal_of, int, months, text, years};
use crate::schema::{Catalog, Table};

/// One query: its dataflow (exporting its result as an index) and what a reader needs around it.
#[derive(Debug, Clone)]
pub struct Query {
    /// Its number, 1 to 22.
    pub number: usize,
    /// Its SQL, as SQLite runs it.
    pub sql: &'static str,
    /// The dataflow.
    pub dataflow: DataflowDescription<u64>,
    /// The index the dataflow exports.
    pub index: GlobalId,
    /// The `ORDER BY` and `LIMIT` a peek applies.
    pub finishing: RowSetFinishing,
    /// The result's column types.
    pub typ: RelationType,
    /// The result's column names.
    pub names: Vec<String>,
}

/// Every query, as of `as_of`.
pub fn all(catalog: Catalog, as_of: u64) -> Vec<Query> {
    let builders: [fn(Catalog, u64) -> Query; 22] =
        [q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13, q14, q15, q16, q17, q18, q19, q20, q21, q22];
    builders.iter().map(|build| build(catalog, as_of)).collect()
}

/// The query `b` builds, with `result` as its answer: ordered by `order` (column name, descending) and
/// cut at `limit`.
fn query(
    b: QueryBuilder,
    sql: &'static str,
    result: Rel,
    order: &[(&str, bool)],
    limit: Option<usize>,
    as_of: u64,
) -> Query {
    let (number, index) = (b.number(), b.index());
    let (dataflow, finishing, typ, names) = b.finish(result, order, limit, as_of);
    Query { number, sql, dataflow, index, finishing, typ, names }
}

/// `l_extendedprice * (1 - l_discount)`.
fn disc_price(r: &Rel) -> ScalarExpr {
    r.c("l_extendedprice").times(dec("1").minus(r.c("l_discount")))
}

/// `extract(year from column)`.
fn year(r: &Rel, column: &str) -> ScalarExpr {
    r.c(column).call_unary(UnaryFunc::ExtractYear)
}

/// `column IN (items)` of text items.
fn in_texts(r: &Rel, column: &str, items: &[&str]) -> ScalarExpr {
    r.c(column).in_list(items.iter().map(|s| text(s)).collect())
}

/// Pricing summary report.
pub const Q1: &str = "
select l_returnflag, l_linestatus, sum(l_quantity) as sum_qty, sum(l_extendedprice) as sum_base_price,
       sum(l_extendedprice * (1 - l_discount)) as sum_disc_price,
       sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) as sum_charge,
       avg(l_quantity) as avg_qty, avg(l_extendedprice) as avg_price, avg(l_discount) as avg_disc,
       count(*) as count_order
from lineitem
where l_shipdate <= date('1998-12-01', '-90 days')
group by l_returnflag, l_linestatus
order by l_returnflag, l_linestatus";

/// Query 1 ([`Q1`]).
pub fn q1(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 1);
    let result = b
        .table(Table::LineItem)
        .filter(|l| vec![l.c("l_shipdate").at_most(date("1998-12-01").minus(days(90)))])
        .map(|l| vec![("disc_price", disc_price(l))])
        .map(|l| vec![("charge", l.c("disc_price").times(dec("1").plus(l.c("l_tax"))))])
        .reduce(
            &["l_returnflag", "l_linestatus"],
            &[
                ("sum_qty", Sum, "l_quantity"),
                ("sum_base_price", Sum, "l_extendedprice"),
                ("sum_disc_price", Sum, "disc_price"),
                ("sum_charge", Sum, "charge"),
                ("avg_qty", Avg, "l_quantity"),
                ("avg_price", Avg, "l_extendedprice"),
                ("avg_disc", Avg, "l_discount"),
                ("count_order", CountRows, ""),
            ],
        );
    query(b, Q1, result, &[("l_returnflag", false), ("l_linestatus", false)], None, as_of)
}

/// Minimum cost supplier.
pub const Q2: &str = "
select s_acctbal, s_name, n_name, p_partkey, p_mfgr, s_address, s_phone, s_comment
from part, supplier, partsupp, nation, region
where p_partkey = ps_partkey and s_suppkey = ps_suppkey and p_size = 15 and p_type like '%BRASS'
  and s_nationkey = n_nationkey and n_regionkey = r_regionkey and r_name = 'EUROPE'
  and ps_supplycost = (
    select min(ps_supplycost) from partsupp, supplier, nation, region
    where p_partkey = ps_partkey and s_suppkey = ps_suppkey and s_nationkey = n_nationkey
      and n_regionkey = r_regionkey and r_name = 'EUROPE')
order by s_acctbal desc, n_name, s_name, p_partkey
limit 100";

/// Query 2 ([`Q2`]): the correlated minimum is a `Reduce` per part over the European offers, joined back.
pub fn q2(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 2);
    let region =
        b.scan(Table::Region, &["r_regionkey", "r_name"]).filter(|r| vec![r.c("r_name").is(text("EUROPE"))]);
    let european = region
        .join(
            b.scan(Table::Nation, &["n_nationkey", "n_name", "n_regionkey"]),
            &[("r_regionkey", "n_regionkey")],
        )
        .join(
            b.scan(
                Table::Supplier,
                &["s_suppkey", "s_name", "s_address", "s_nationkey", "s_phone", "s_acctbal", "s_comment"],
            ),
            &[("n_nationkey", "s_nationkey")],
        )
        .join(
            b.scan(Table::PartSupp, &["ps_partkey", "ps_suppkey", "ps_supplycost"]),
            &[("s_suppkey", "ps_suppkey")],
        );
    let european = b.bind(european);
    let cheapest = european.clone().reduce(&["ps_partkey"], &[("min_cost", Min, "ps_supplycost")]);
    let parts = b
        .scan(Table::Part, &["p_partkey", "p_mfgr", "p_size", "p_type"])
        .filter(|p| vec![p.c("p_size").is(int(15)), p.c("p_type").like("%BRASS")]);
    let result = parts
        .join(european, &[("p_partkey", "ps_partkey")])
        .join(
            cheapest.project(&["ps_partkey", "min_cost"]).prefixed("m_"),
            &[("p_partkey", "m_ps_partkey"), ("ps_supplycost", "m_min_cost")],
        )
        .project(&[
            "s_acctbal",
            "s_name",
            "n_name",
            "p_partkey",
            "p_mfgr",
            "s_address",
            "s_phone",
            "s_comment",
        ]);
    let order = [("s_acctbal", true), ("n_name", false), ("s_name", false), ("p_partkey", false)];
    query(b, Q2, result, &order, Some(100), as_of)
}

/// Shipping priority.
pub const Q3: &str = "
select l_orderkey, sum(l_extendedprice * (1 - l_discount)) as revenue, o_orderdate, o_shippriority
from customer, orders, lineitem
where c_mktsegment = 'BUILDING' and c_custkey = o_custkey and l_orderkey = o_orderkey
  and o_orderdate < '1995-03-15' and l_shipdate > '1995-03-15'
group by l_orderkey, o_orderdate, o_shippriority
order by revenue desc, o_orderdate
limit 10";

/// Query 3 ([`Q3`]).
pub fn q3(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 3);
    let customer = b
        .scan(Table::Customer, &["c_custkey", "c_mktsegment"])
        .filter(|c| vec![c.c("c_mktsegment").is(text("BUILDING"))]);
    let orders = b
        .scan(Table::Orders, &["o_orderkey", "o_custkey", "o_orderdate", "o_shippriority"])
        .filter(|o| vec![o.c("o_orderdate").below(date("1995-03-15"))]);
    let lineitem = b
        .scan(Table::LineItem, &["l_orderkey", "l_extendedprice", "l_discount", "l_shipdate"])
        .filter(|l| vec![l.c("l_shipdate").above(date("1995-03-15"))]);
    let result = customer
        .join(orders, &[("c_custkey", "o_custkey")])
        .join(lineitem, &[("o_orderkey", "l_orderkey")])
        .map(|r| vec![("volume", disc_price(r))])
        .reduce(&["l_orderkey", "o_orderdate", "o_shippriority"], &[("revenue", Sum, "volume")])
        .project(&["l_orderkey", "revenue", "o_orderdate", "o_shippriority"]);
    query(b, Q3, result, &[("revenue", true), ("o_orderdate", false)], Some(10), as_of)
}

/// Order priority checking.
pub const Q4: &str = "
select o_orderpriority, count(*) as order_count
from orders
where o_orderdate >= '1993-07-01' and o_orderdate < date('1993-07-01', '+3 months')
  and exists (select * from lineitem where l_orderkey = o_orderkey and l_commitdate < l_receiptdate)
group by o_orderpriority
order by o_orderpriority";

/// Query 4 ([`Q4`]): `EXISTS` as a semi-join.
pub fn q4(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 4);
    let orders = b.scan(Table::Orders, &["o_orderkey", "o_orderdate", "o_orderpriority"]).filter(|o| {
        vec![
            o.c("o_orderdate").at_least(date("1993-07-01")),
            o.c("o_orderdate").below(date("1993-07-01").plus(months(3))),
        ]
    });
    let orders = b.bind(orders);
    let late = b
        .scan(Table::LineItem, &["l_orderkey", "l_commitdate", "l_receiptdate"])
        .filter(|l| vec![l.c("l_commitdate").below(l.c("l_receiptdate"))]);
    let late = b.bind(late);
    let result = orders
        .semi_join(&late, &[("o_orderkey", "l_orderkey")], |_| vec![])
        .reduce(&["o_orderpriority"], &[("order_count", CountRows, "")]);
    query(b, Q4, result, &[("o_orderpriority", false)], None, as_of)
}

/// Local supplier volume.
pub const Q5: &str = "
select n_name, sum(l_extendedprice * (1 - l_discount)) as revenue
from customer, orders, lineitem, supplier, nation, region
where c_custkey = o_custkey and l_orderkey = o_orderkey and l_suppkey = s_suppkey
  and c_nationkey = s_nationkey and s_nationkey = n_nationkey and n_regionkey = r_regionkey
  and r_name = 'ASIA' and o_orderdate >= '1994-01-01' and o_orderdate < date('1994-01-01', '+1 years')
group by n_name
order by revenue desc";

/// Query 5 ([`Q5`]).
pub fn q5(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 5);
    let orders = b.scan(Table::Orders, &["o_orderkey", "o_custkey", "o_orderdate"]).filter(|o| {
        vec![
            o.c("o_orderdate").at_least(date("1994-01-01")),
            o.c("o_orderdate").below(date("1994-01-01").plus(years(1))),
        ]
    });
    let result = b
        .table(Table::Region)
        .filter(|r| vec![r.c("r_name").is(text("ASIA"))])
        .join(
            b.scan(Table::Nation, &["n_nationkey", "n_name", "n_regionkey"]),
            &[("r_regionkey", "n_regionkey")],
        )
        .join(b.scan(Table::Supplier, &["s_suppkey", "s_nationkey"]), &[("n_nationkey", "s_nationkey")])
        .join(
            b.scan(Table::LineItem, &["l_orderkey", "l_suppkey", "l_extendedprice", "l_discount"]),
            &[("s_suppkey", "l_suppkey")],
        )
        .join(orders, &[("l_orderkey", "o_orderkey")])
        .join(
            b.scan(Table::Customer, &["c_custkey", "c_nationkey"]),
            &[("o_custkey", "c_custkey"), ("s_nationkey", "c_nationkey")],
        )
        .map(|r| vec![("volume", disc_price(r))])
        .reduce(&["n_name"], &[("revenue", Sum, "volume")]);
    query(b, Q5, result, &[("revenue", true)], None, as_of)
}

/// Forecasting revenue change.
pub const Q6: &str = "
select sum(l_extendedprice * l_discount) as revenue
from lineitem
where l_shipdate >= '1994-01-01' and l_shipdate < date('1994-01-01', '+1 years')
  and l_discount between round(0.06 - 0.01, 2) and round(0.06 + 0.01, 2) and l_quantity < 24";

/// Query 6 ([`Q6`]). The SQL rounds its bounds' arithmetic to the literals' scale: in SQLite's doubles
/// `0.06 + 0.01` is `0.06999999999999999` (see `crate::sqlite::semantics`).
pub fn q6(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 6);
    let result = b
        .table(Table::LineItem)
        .filter(|l| {
            vec![
                l.c("l_shipdate").at_least(date("1994-01-01")),
                l.c("l_shipdate").below(date("1994-01-01").plus(years(1))),
                l.c("l_discount").between(dec("0.06").minus(dec("0.01")), dec("0.06").plus(dec("0.01"))),
                l.c("l_quantity").below(dec("24")),
            ]
        })
        .map(|l| vec![("gain", l.c("l_extendedprice").times(l.c("l_discount")))])
        .reduce(&[], &[("revenue", Sum, "gain")]);
    query(b, Q6, result, &[], None, as_of)
}

/// Volume shipping.
pub const Q7: &str = "
select supp_nation, cust_nation, l_year, sum(volume) as revenue
from (
  select n1.n_name as supp_nation, n2.n_name as cust_nation,
         cast(strftime('%Y', l_shipdate) as integer) as l_year,
         l_extendedprice * (1 - l_discount) as volume
  from supplier, lineitem, orders, customer, nation n1, nation n2
  where s_suppkey = l_suppkey and o_orderkey = l_orderkey and c_custkey = o_custkey
    and s_nationkey = n1.n_nationkey and c_nationkey = n2.n_nationkey
    and ((n1.n_name = 'FRANCE' and n2.n_name = 'GERMANY') or (n1.n_name = 'GERMANY' and n2.n_name = 'FRANCE'))
    and l_shipdate between '1995-01-01' and '1996-12-31'
) as shipping
group by supp_nation, cust_nation, l_year
order by supp_nation, cust_nation, l_year";

/// Query 7 ([`Q7`]).
pub fn q7(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 7);
    let two = |b: &mut QueryBuilder, prefix: &str| {
        b.scan(Table::Nation, &["n_nationkey", "n_name"])
            .filter(|n| vec![in_texts(n, "n_name", &["FRANCE", "GERMANY"])])
            .prefixed(prefix)
    };
    let (n1, n2) = (two(&mut b, "n1_"), two(&mut b, "n2_"));
    let lineitem = b
        .table(Table::LineItem)
        .filter(|l| vec![l.c("l_shipdate").between(date("1995-01-01"), date("1996-12-31"))]);
    let result = n1
        .join(b.scan(Table::Supplier, &["s_suppkey", "s_nationkey"]), &[("n1_n_nationkey", "s_nationkey")])
        .join(lineitem, &[("s_suppkey", "l_suppkey")])
        .join(b.scan(Table::Orders, &["o_orderkey", "o_custkey"]), &[("l_orderkey", "o_orderkey")])
        .join(b.scan(Table::Customer, &["c_custkey", "c_nationkey"]), &[("o_custkey", "c_custkey")])
        .join(n2, &[("c_nationkey", "n2_n_nationkey")])
        .filter(|r| {
            let pair = |a: &str, c: &str| r.c("n1_n_name").is(text(a)).and(r.c("n2_n_name").is(text(c)));
            vec![pair("FRANCE", "GERMANY").or(pair("GERMANY", "FRANCE"))]
        })
        .map(|r| vec![("l_year", year(r, "l_shipdate")), ("volume", disc_price(r))])
        .reduce(&["n1_n_name", "n2_n_name", "l_year"], &[("revenue", Sum, "volume")]);
    let order = [("n1_n_name", false), ("n2_n_name", false), ("l_year", false)];
    query(b, Q7, result, &order, None, as_of)
}

/// National market share.
pub const Q8: &str = "
select o_year, sum(case when nation = 'BRAZIL' then volume else 0 end) / sum(volume) as mkt_share
from (
  select cast(strftime('%Y', o_orderdate) as integer) as o_year,
         l_extendedprice * (1 - l_discount) as volume, n2.n_name as nation
  from part, supplier, lineitem, orders, customer, nation n1, nation n2, region
  where p_partkey = l_partkey and s_suppkey = l_suppkey and l_orderkey = o_orderkey and o_custkey = c_custkey
    and c_nationkey = n1.n_nationkey and n1.n_regionkey = r_regionkey and r_name = 'AMERICA'
    and s_nationkey = n2.n_nationkey and o_orderdate between '1995-01-01' and '1996-12-31'
    and p_type = 'ECONOMY ANODIZED STEEL'
) as all_nations
group by o_year
order by o_year";

/// Query 8 ([`Q8`]).
pub fn q8(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 8);
    let part = b
        .scan(Table::Part, &["p_partkey", "p_type"])
        .filter(|p| vec![p.c("p_type").is(text("ECONOMY ANODIZED STEEL"))]);
    let orders = b
        .table(Table::Orders)
        .filter(|o| vec![o.c("o_orderdate").between(date("1995-01-01"), date("1996-12-31"))]);
    let america = b.table(Table::Region).filter(|r| vec![r.c("r_name").is(text("AMERICA"))]).join(
        b.scan(Table::Nation, &["n_nationkey", "n_name", "n_regionkey"]).prefixed("n1_"),
        &[("r_regionkey", "n1_n_regionkey")],
    );
    let result = part
        .join(
            b.scan(
                Table::LineItem,
                &["l_orderkey", "l_partkey", "l_suppkey", "l_extendedprice", "l_discount"],
            ),
            &[("p_partkey", "l_partkey")],
        )
        .join(orders, &[("l_orderkey", "o_orderkey")])
        .join(b.scan(Table::Customer, &["c_custkey", "c_nationkey"]), &[("o_custkey", "c_custkey")])
        .join(america, &[("c_nationkey", "n1_n_nationkey")])
        .join(b.scan(Table::Supplier, &["s_suppkey", "s_nationkey"]), &[("l_suppkey", "s_suppkey")])
        .join(
            b.scan(Table::Nation, &["n_nationkey", "n_name", "n_regionkey"]).prefixed("n2_"),
            &[("s_nationkey", "n2_n_nationkey")],
        )
        .map(|r| vec![("o_year", year(r, "o_orderdate")), ("volume", disc_price(r))])
        .map(|r| {
            let brazil = r.c("n2_n_name").is(text("BRAZIL"));
            vec![("brazil_volume", ScalarExpr::case(vec![(brazil, r.c("volume"))], dec("0")))]
        })
        .reduce(&["o_year"], &[("brazil", Sum, "brazil_volume"), ("total", Sum, "volume")])
        .map(|r| vec![("mkt_share", r.c("brazil").over(r.c("total")))])
        .project(&["o_year", "mkt_share"]);
    query(b, Q8, result, &[("o_year", false)], None, as_of)
}

/// Product type profit measure.
pub const Q9: &str = "
select nation, o_year, sum(amount) as sum_profit
from (
  select n_name as nation, cast(strftime('%Y', o_orderdate) as integer) as o_year,
         l_extendedprice * (1 - l_discount) - ps_supplycost * l_quantity as amount
  from part, supplier, lineitem, partsupp, orders, nation
  where s_suppkey = l_suppkey and ps_suppkey = l_suppkey and ps_partkey = l_partkey
    and p_partkey = l_partkey and o_orderkey = l_orderkey and s_nationkey = n_nationkey
    and p_name like '%green%'
) as profit
group by nation, o_year
order by nation, o_year desc";

/// Query 9 ([`Q9`]).
pub fn q9(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 9);
    let part = b.scan(Table::Part, &["p_partkey", "p_name"]).filter(|p| vec![p.c("p_name").like("%green%")]);
    let result = part
        .join(
            b.scan(
                Table::LineItem,
                &["l_orderkey", "l_partkey", "l_suppkey", "l_quantity", "l_extendedprice", "l_discount"],
            ),
            &[("p_partkey", "l_partkey")],
        )
        .join(
            b.scan(Table::PartSupp, &["ps_partkey", "ps_suppkey", "ps_supplycost"]),
            &[("l_partkey", "ps_partkey"), ("l_suppkey", "ps_suppkey")],
        )
        .join(b.scan(Table::Supplier, &["s_suppkey", "s_nationkey"]), &[("l_suppkey", "s_suppkey")])
        .join(b.scan(Table::Nation, &["n_nationkey", "n_name"]), &[("s_nationkey", "n_nationkey")])
        .join(b.scan(Table::Orders, &["o_orderkey", "o_orderdate"]), &[("l_orderkey", "o_orderkey")])
        .map(|r| {
            let cost = r.c("ps_supplycost").times(r.c("l_quantity"));
            vec![("o_year", year(r, "o_orderdate")), ("amount", disc_price(r).minus(cost))]
        })
        .reduce(&["n_name", "o_year"], &[("sum_profit", Sum, "amount")]);
    query(b, Q9, result, &[("n_name", false), ("o_year", true)], None, as_of)
}

/// Returned item reporting.
pub const Q10: &str = "
select c_custkey, c_name, sum(l_extendedprice * (1 - l_discount)) as revenue, c_acctbal, n_name,
       c_address, c_phone, c_comment
from customer, orders, lineitem, nation
where c_custkey = o_custkey and l_orderkey = o_orderkey and o_orderdate >= '1993-10-01'
  and o_orderdate < date('1993-10-01', '+3 months') and l_returnflag = 'R' and c_nationkey = n_nationkey
group by c_custkey, c_name, c_acctbal, c_phone, n_name, c_address, c_comment
order by revenue desc
limit 20";

/// Query 10 ([`Q10`]).
pub fn q10(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 10);
    let orders = b.scan(Table::Orders, &["o_orderkey", "o_custkey", "o_orderdate"]).filter(|o| {
        vec![
            o.c("o_orderdate").at_least(date("1993-10-01")),
            o.c("o_orderdate").below(date("1993-10-01").plus(months(3))),
        ]
    });
    let lineitem = b
        .scan(Table::LineItem, &["l_orderkey", "l_returnflag", "l_extendedprice", "l_discount"])
        .filter(|l| vec![l.c("l_returnflag").is(text("R"))]);
    let result = orders
        .join(lineitem, &[("o_orderkey", "l_orderkey")])
        .join(
            b.scan(
                Table::Customer,
                &["c_custkey", "c_name", "c_address", "c_nationkey", "c_phone", "c_acctbal", "c_comment"],
            ),
            &[("o_custkey", "c_custkey")],
        )
        .join(b.scan(Table::Nation, &["n_nationkey", "n_name"]), &[("c_nationkey", "n_nationkey")])
        .map(|r| vec![("volume", disc_price(r))])
        .reduce(
            &["c_custkey", "c_name", "c_acctbal", "c_phone", "n_name", "c_address", "c_comment"],
            &[("revenue", Sum, "volume")],
        )
        .project(&[
            "c_custkey",
            "c_name",
            "revenue",
            "c_acctbal",
            "n_name",
            "c_address",
            "c_phone",
            "c_comment",
        ]);
    query(b, Q10, result, &[("revenue", true)], Some(20), as_of)
}

/// Important stock identification.
pub const Q11: &str = "
select ps_partkey, sum(ps_supplycost * ps_availqty) as value
from partsupp, supplier, nation
where ps_suppkey = s_suppkey and s_nationkey = n_nationkey and n_name = 'GERMANY'
group by ps_partkey
having sum(ps_supplycost * ps_availqty) > (
  select sum(ps_supplycost * ps_availqty) * 0.0001
  from partsupp, supplier, nation
  where ps_suppkey = s_suppkey and s_nationkey = n_nationkey and n_name = 'GERMANY')
order by value desc";

/// Query 11 ([`Q11`]): the uncorrelated subquery is a global `Reduce`, crossed with the groups.
pub fn q11(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 11);
    let german = b
        .table(Table::Nation)
        .filter(|n| vec![n.c("n_name").is(text("GERMANY"))])
        .join(b.scan(Table::Supplier, &["s_suppkey", "s_nationkey"]), &[("n_nationkey", "s_nationkey")])
        .join(
            b.scan(Table::PartSupp, &["ps_partkey", "ps_suppkey", "ps_availqty", "ps_supplycost"]),
            &[("s_suppkey", "ps_suppkey")],
        )
        .map(|r| vec![("value", r.c("ps_supplycost").times(decimal_of(r.c("ps_availqty"))))]);
    let german = b.bind(german);
    let threshold = german
        .clone()
        .reduce(&[], &[("total", Sum, "value")])
        .map(|r| vec![("threshold", r.c("total").times(dec("0.0001")))])
        .project(&["threshold"]);
    let result = german
        .reduce(&["ps_partkey"], &[("value", Sum, "value")])
        .cross(threshold)
        .filter(|r| vec![r.c("value").above(r.c("threshold"))])
        .project(&["ps_partkey", "value"]);
    query(b, Q11, result, &[("value", true)], None, as_of)
}

/// Shipping modes and order priority.
pub const Q12: &str = "
select l_shipmode,
       sum(case when o_orderpriority = '1-URGENT' or o_orderpriority = '2-HIGH' then 1 else 0 end) as high_line_count,
       sum(case when o_orderpriority <> '1-URGENT' and o_orderpriority <> '2-HIGH' then 1 else 0 end) as low_line_count
from orders, lineitem
where o_orderkey = l_orderkey and l_shipmode in ('MAIL', 'SHIP') and l_commitdate < l_receiptdate
  and l_shipdate < l_commitdate and l_receiptdate >= '1994-01-01'
  and l_receiptdate < date('1994-01-01', '+1 years')
group by l_shipmode
order by l_shipmode";

/// Query 12 ([`Q12`]).
pub fn q12(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 12);
    let lineitem = b
        .scan(Table::LineItem, &["l_orderkey", "l_shipmode", "l_commitdate", "l_receiptdate", "l_shipdate"])
        .filter(|l| {
            vec![
                in_texts(l, "l_shipmode", &["MAIL", "SHIP"]),
                l.c("l_commitdate").below(l.c("l_receiptdate")),
                l.c("l_shipdate").below(l.c("l_commitdate")),
                l.c("l_receiptdate").at_least(date("1994-01-01")),
                l.c("l_receiptdate").below(date("1994-01-01").plus(years(1))),
            ]
        });
    let result = lineitem
        .join(b.scan(Table::Orders, &["o_orderkey", "o_orderpriority"]), &[("l_orderkey", "o_orderkey")])
        .map(|r| {
            let urgent =
                r.c("o_orderpriority").is(text("1-URGENT")).or(r.c("o_orderpriority").is(text("2-HIGH")));
            let other = r
                .c("o_orderpriority")
                .isnt(text("1-URGENT"))
                .and(r.c("o_orderpriority").isnt(text("2-HIGH")));
            vec![
                ("high", ScalarExpr::case(vec![(urgent, int(1))], int(0))),
                ("low", ScalarExpr::case(vec![(other, int(1))], int(0))),
            ]
        })
        .reduce(&["l_shipmode"], &[("high_line_count", Sum, "high"), ("low_line_count", Sum, "low")]);
    query(b, Q12, result, &[("l_shipmode", false)], None, as_of)
}

/// Customer distribution.
pub const Q13: &str = "
select c_count, count(*) as custdist
from (
  select c_custkey, count(o_orderkey) as c_count
  from customer left outer join orders on c_custkey = o_custkey and o_comment not like '%special%requests%'
  group by c_custkey
) as c_orders
group by c_count
order by custdist desc, c_count desc";

/// Query 13 ([`Q13`]): a left join (`protocol::joins::left_join`), counted twice.
pub fn q13(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 13);
    let customer = b.scan(Table::Customer, &["c_custkey"]);
    let customer = b.bind(customer);
    let orders = b
        .table(Table::Orders)
        .filter(|o| vec![o.c("o_comment").not_like("%special%requests%")])
        .project(&["o_orderkey", "o_custkey"]);
    let orders = b.bind(orders);
    let result = customer
        .left_join(&orders, &[("c_custkey", "o_custkey")])
        .reduce(&["c_custkey"], &[("c_count", protocol::AggregateFunc::Count, "o_orderkey")])
        .reduce(&["c_count"], &[("custdist", CountRows, "")]);
    query(b, Q13, result, &[("custdist", true), ("c_count", true)], None, as_of)
}

/// Promotion effect.
pub const Q14: &str = "
select 100.00 * sum(case when p_type like 'PROMO%' then l_extendedprice * (1 - l_discount) else 0 end)
       / sum(l_extendedprice * (1 - l_discount)) as promo_revenue
from lineitem, part
where l_partkey = p_partkey and l_shipdate >= '1995-09-01' and l_shipdate < date('1995-09-01', '+1 months')";

/// Query 14 ([`Q14`]).
pub fn q14(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 14);
    let lineitem =
        b.scan(Table::LineItem, &["l_partkey", "l_shipdate", "l_extendedprice", "l_discount"]).filter(|l| {
            vec![
                l.c("l_shipdate").at_least(date("1995-09-01")),
                l.c("l_shipdate").below(date("1995-09-01").plus(months(1))),
            ]
        });
    let result = lineitem
        .join(b.scan(Table::Part, &["p_partkey", "p_type"]), &[("l_partkey", "p_partkey")])
        .map(|r| vec![("volume", disc_price(r))])
        .map(|r| {
            vec![("promo", ScalarExpr::case(vec![(r.c("p_type").like("PROMO%"), r.c("volume"))], dec("0")))]
        })
        .reduce(&[], &[("promo", Sum, "promo"), ("total", Sum, "volume")])
        .map(|r| vec![("promo_revenue", dec("100.00").times(r.c("promo")).over(r.c("total")))])
        .project(&["promo_revenue"]);
    query(b, Q14, result, &[], None, as_of)
}

/// Top supplier.
pub const Q15: &str = "
with revenue0 as (
  select l_suppkey as supplier_no, sum(l_extendedprice * (1 - l_discount)) as total_revenue
  from lineitem
  where l_shipdate >= '1996-01-01' and l_shipdate < date('1996-01-01', '+3 months')
  group by l_suppkey)
select s_suppkey, s_name, s_address, s_phone, total_revenue
from supplier, revenue0
where s_suppkey = supplier_no and total_revenue = (select max(total_revenue) from revenue0)
order by s_suppkey";

/// Query 15 ([`Q15`]): the view is a bound object, read twice.
pub fn q15(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 15);
    let revenue = b
        .table(Table::LineItem)
        .filter(|l| {
            vec![
                l.c("l_shipdate").at_least(date("1996-01-01")),
                l.c("l_shipdate").below(date("1996-01-01").plus(months(3))),
            ]
        })
        .map(|l| vec![("volume", disc_price(l))])
        .reduce(&["l_suppkey"], &[("total_revenue", Sum, "volume")]);
    let revenue = b.bind(revenue);
    let best = revenue.clone().reduce(&[], &[("max_revenue", Max, "total_revenue")]);
    let result = b
        .table(Table::Supplier)
        .join(revenue, &[("s_suppkey", "l_suppkey")])
        .join(best, &[("total_revenue", "max_revenue")])
        .project(&["s_suppkey", "s_name", "s_address", "s_phone", "total_revenue"]);
    query(b, Q15, result, &[("s_suppkey", false)], None, as_of)
}

/// Parts/supplier relationship.
pub const Q16: &str = "
select p_brand, p_type, p_size, count(distinct ps_suppkey) as supplier_cnt
from partsupp, part
where p_partkey = ps_partkey and p_brand <> 'Brand#45' and p_type not like 'MEDIUM POLISHED%'
  and p_size in (49, 14, 23, 45, 19, 3, 36, 9)
  and ps_suppkey not in (select s_suppkey from supplier where s_comment like '%Customer%Complaints%')
group by p_brand, p_type, p_size
order by supplier_cnt desc, p_brand, p_type, p_size";

/// Query 16 ([`Q16`]): `NOT IN` (over non-null keys) as an anti-join; `count(distinct)` as a
/// `Distinct` then a count.
pub fn q16(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 16);
    let part = b.scan(Table::Part, &["p_partkey", "p_brand", "p_type", "p_size"]).filter(|p| {
        let sizes = [49, 14, 23, 45, 19, 3, 36, 9].iter().map(|s| int(*s)).collect();
        vec![
            p.c("p_brand").isnt(text("Brand#45")),
            p.c("p_type").not_like("MEDIUM POLISHED%"),
            p.c("p_size").in_list(sizes),
        ]
    });
    let offers =
        part.join(b.scan(Table::PartSupp, &["ps_partkey", "ps_suppkey"]), &[("p_partkey", "ps_partkey")]);
    let offers = b.bind(offers);
    let complaints = b
        .table(Table::Supplier)
        .filter(|s| vec![s.c("s_comment").like("%Customer%Complaints%")])
        .project(&["s_suppkey"]);
    let complaints = b.bind(complaints);
    let result = offers
        .anti_join(&complaints, &[("ps_suppkey", "s_suppkey")], |_| vec![])
        .project(&["p_brand", "p_type", "p_size", "ps_suppkey"])
        .distinct()
        .reduce(&["p_brand", "p_type", "p_size"], &[("supplier_cnt", CountRows, "")]);
    let order = [("supplier_cnt", true), ("p_brand", false), ("p_type", false), ("p_size", false)];
    query(b, Q16, result, &order, None, as_of)
}

/// Small-quantity-order revenue.
pub const Q17: &str = "
select sum(l_extendedprice) / 7.0 as avg_yearly
from lineitem, part
where p_partkey = l_partkey and p_brand = 'Brand#23' and p_container = 'MED BOX'
  and l_quantity < (select 0.2 * avg(l_quantity) from lineitem where l_partkey = p_partkey)";

/// Query 17 ([`Q17`]): the correlated average is a `Reduce` per part of the chosen parts' line items.
pub fn q17(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 17);
    let part = b
        .table(Table::Part)
        .filter(|p| vec![p.c("p_brand").is(text("Brand#23")), p.c("p_container").is(text("MED BOX"))]);
    let items = part.join(
        b.scan(Table::LineItem, &["l_partkey", "l_quantity", "l_extendedprice"]),
        &[("p_partkey", "l_partkey")],
    );
    let items = b.bind(items);
    let average = items
        .clone()
        .reduce(&["l_partkey"], &[("avg_quantity", Avg, "l_quantity")])
        .map(|r| vec![("limit", dec("0.2").times(r.c("avg_quantity")))])
        .project(&["l_partkey", "limit"])
        .prefixed("a_");
    let result = items
        .join(average, &[("l_partkey", "a_l_partkey")])
        .filter(|r| vec![r.c("l_quantity").below(r.c("a_limit"))])
        .reduce(&[], &[("sum_price", Sum, "l_extendedprice")])
        .map(|r| vec![("avg_yearly", r.c("sum_price").over(dec("7.0")))])
        .project(&["avg_yearly"]);
    query(b, Q17, result, &[], None, as_of)
}

/// Large volume customer.
pub const Q18: &str = "
select c_name, c_custkey, o_orderkey, o_orderdate, o_totalprice, sum(l_quantity) as sum_quantity
from customer, orders, lineitem
where o_orderkey in (select l_orderkey from lineitem group by l_orderkey having sum(l_quantity) > 300)
  and c_custkey = o_custkey and o_orderkey = l_orderkey
group by c_name, c_custkey, o_orderkey, o_orderdate, o_totalprice
order by o_totalprice desc, o_orderdate
limit 100";

/// Query 18 ([`Q18`]): `IN` over a grouped subquery as a semi-join.
pub fn q18(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 18);
    let lineitem = b.scan(Table::LineItem, &["l_orderkey", "l_quantity"]);
    let lineitem = b.bind(lineitem);
    let large = lineitem
        .clone()
        .reduce(&["l_orderkey"], &[("total", Sum, "l_quantity")])
        .filter(|r| vec![r.c("total").above(dec("300"))])
        .project(&["l_orderkey"])
        .prefixed("big_");
    let large = b.bind(large);
    let orders = b.scan(Table::Orders, &["o_orderkey", "o_custkey", "o_orderdate", "o_totalprice"]);
    let orders = b.bind(orders);
    let result = orders
        .semi_join(&large, &[("o_orderkey", "big_l_orderkey")], |_| vec![])
        .join(b.scan(Table::Customer, &["c_custkey", "c_name"]), &[("o_custkey", "c_custkey")])
        .join(lineitem, &[("o_orderkey", "l_orderkey")])
        .reduce(
            &["c_name", "c_custkey", "o_orderkey", "o_orderdate", "o_totalprice"],
            &[("sum_quantity", Sum, "l_quantity")],
        );
    query(b, Q18, result, &[("o_totalprice", true), ("o_orderdate", false)], Some(100), as_of)
}

/// Discounted revenue.
pub const Q19: &str = "
select sum(l_extendedprice * (1 - l_discount)) as revenue
from lineitem, part
where (p_partkey = l_partkey and p_brand = 'Brand#12' and p_container in ('SM CASE', 'SM BOX', 'SM PACK', 'SM PKG')
       and l_quantity >= 1 and l_quantity <= 1 + 10 and p_size between 1 and 5
       and l_shipmode in ('AIR', 'AIR REG') and l_shipinstruct = 'DELIVER IN PERSON')
   or (p_partkey = l_partkey and p_brand = 'Brand#23' and p_container in ('MED BAG', 'MED BOX', 'MED PKG', 'MED PACK')
       and l_quantity >= 10 and l_quantity <= 10 + 10 and p_size between 1 and 10
       and l_shipmode in ('AIR', 'AIR REG') and l_shipinstruct = 'DELIVER IN PERSON')
   or (p_partkey = l_partkey and p_brand = 'Brand#34' and p_container in ('LG CASE', 'LG BOX', 'LG PACK', 'LG PKG')
       and l_quantity >= 20 and l_quantity <= 20 + 10 and p_size between 1 and 15
       and l_shipmode in ('AIR', 'AIR REG') and l_shipinstruct = 'DELIVER IN PERSON')";

/// Query 19 ([`Q19`]): the join key common to the three disjuncts is the join's; the rest a filter.
pub fn q19(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 19);
    let lineitem = b
        .scan(
            Table::LineItem,
            &["l_partkey", "l_quantity", "l_extendedprice", "l_discount", "l_shipmode", "l_shipinstruct"],
        )
        .filter(|l| {
            vec![
                in_texts(l, "l_shipmode", &["AIR", "AIR REG"]),
                l.c("l_shipinstruct").is(text("DELIVER IN PERSON")),
            ]
        });
    let result = lineitem
        .join(
            b.scan(Table::Part, &["p_partkey", "p_brand", "p_size", "p_container"]),
            &[("l_partkey", "p_partkey")],
        )
        .filter(|r| {
            let case = |brand: &str, containers: &[&str], low: &str, high: &str, size: i64| {
                r.c("p_brand")
                    .is(text(brand))
                    .and(in_texts(r, "p_container", containers))
                    .and(r.c("l_quantity").at_least(dec(low)))
                    .and(r.c("l_quantity").at_most(dec(low).plus(dec(high))))
                    .and(r.c("p_size").between(int(1), int(size)))
            };
            vec![
                case("Brand#12", &["SM CASE", "SM BOX", "SM PACK", "SM PKG"], "1", "10", 5)
                    .or(case("Brand#23", &["MED BAG", "MED BOX", "MED PKG", "MED PACK"], "10", "10", 10))
                    .or(case("Brand#34", &["LG CASE", "LG BOX", "LG PACK", "LG PKG"], "20", "10", 15)),
            ]
        })
        .map(|r| vec![("volume", disc_price(r))])
        .reduce(&[], &[("revenue", Sum, "volume")]);
    query(b, Q19, result, &[], None, as_of)
}

/// Potential part promotion.
pub const Q20: &str = "
select s_name, s_address
from supplier, nation
where s_suppkey in (
    select ps_suppkey from partsupp
    where ps_partkey in (select p_partkey from part where p_name like 'forest%')
      and ps_availqty > (
        select 0.5 * sum(l_quantity) from lineitem
        where l_partkey = ps_partkey and l_suppkey = ps_suppkey
          and l_shipdate >= '1994-01-01' and l_shipdate < date('1994-01-01', '+1 years')))
  and s_nationkey = n_nationkey and n_name = 'CANADA'
order by s_name";

/// Query 20 ([`Q20`]): the correlated sum is a `Reduce` per (part, supplier), joined (a pair with no line
/// items has a `NULL` sum, which no quantity exceeds, as the join drops it).
pub fn q20(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 20);
    let forest = b
        .scan(Table::Part, &["p_partkey", "p_name"])
        .filter(|p| vec![p.c("p_name").like("forest%")])
        .project(&["p_partkey"]);
    let forest = b.bind(forest);
    let partsupp = b.scan(Table::PartSupp, &["ps_partkey", "ps_suppkey", "ps_availqty"]);
    let partsupp = b.bind(partsupp);
    let shipped = b
        .table(Table::LineItem)
        .filter(|l| {
            vec![
                l.c("l_shipdate").at_least(date("1994-01-01")),
                l.c("l_shipdate").below(date("1994-01-01").plus(years(1))),
            ]
        })
        .reduce(&["l_partkey", "l_suppkey"], &[("shipped", Sum, "l_quantity")]);
    let candidates = partsupp
        .semi_join(&forest, &[("ps_partkey", "p_partkey")], |_| vec![])
        .join(shipped, &[("ps_partkey", "l_partkey"), ("ps_suppkey", "l_suppkey")])
        .filter(|r| vec![decimal_of(r.c("ps_availqty")).above(dec("0.5").times(r.c("shipped")))])
        .project(&["ps_suppkey"]);
    let candidates = b.bind(candidates);
    let canadian = b.table(Table::Nation).filter(|n| vec![n.c("n_name").is(text("CANADA"))]).join(
        b.scan(Table::Supplier, &["s_suppkey", "s_name", "s_address", "s_nationkey"]),
        &[("n_nationkey", "s_nationkey")],
    );
    let canadian = b.bind(canadian);
    let result = canadian
        .semi_join(&candidates, &[("s_suppkey", "ps_suppkey")], |_| vec![])
        .project(&["s_name", "s_address"]);
    query(b, Q20, result, &[("s_name", false)], None, as_of)
}

/// Suppliers who kept orders waiting.
pub const Q21: &str = "
select s_name, count(*) as numwait
from supplier, lineitem l1, orders, nation
where s_suppkey = l1.l_suppkey and o_orderkey = l1.l_orderkey and o_orderstatus = 'F'
  and l1.l_receiptdate > l1.l_commitdate
  and exists (select * from lineitem l2 where l2.l_orderkey = l1.l_orderkey and l2.l_suppkey <> l1.l_suppkey)
  and not exists (
    select * from lineitem l3
    where l3.l_orderkey = l1.l_orderkey and l3.l_suppkey <> l1.l_suppkey and l3.l_receiptdate > l3.l_commitdate)
  and s_nationkey = n_nationkey and n_name = 'SAUDI ARABIA'
group by s_name
order by numwait desc, s_name
limit 100";

/// Query 21 ([`Q21`]): `EXISTS` and `NOT EXISTS` with a residual `<>`, as a semi- and an anti-join.
pub fn q21(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 21);
    let lineitem = b.scan(Table::LineItem, &["l_orderkey", "l_suppkey", "l_receiptdate", "l_commitdate"]);
    let lineitem = b.bind(lineitem);
    let late = lineitem.clone().filter(|l| vec![l.c("l_receiptdate").above(l.c("l_commitdate"))]);
    let late = b.bind(late);
    let waiting = b
        .table(Table::Nation)
        .filter(|n| vec![n.c("n_name").is(text("SAUDI ARABIA"))])
        .join(
            b.scan(Table::Supplier, &["s_suppkey", "s_name", "s_nationkey"]),
            &[("n_nationkey", "s_nationkey")],
        )
        .join(late.clone(), &[("s_suppkey", "l_suppkey")])
        .join(
            b.scan(Table::Orders, &["o_orderkey", "o_orderstatus"])
                .filter(|o| vec![o.c("o_orderstatus").is(text("F"))]),
            &[("l_orderkey", "o_orderkey")],
        )
        .project(&["s_name", "l_orderkey", "l_suppkey"]);
    let waiting = b.bind(waiting);
    let others = |r: &Rel| vec![r.c("l_suppkey").isnt(r.c("o_l_suppkey"))];
    let result = waiting
        .semi_join(&lineitem.clone().prefixed("o_"), &[("l_orderkey", "o_l_orderkey")], others)
        .anti_join(&late.prefixed("o_"), &[("l_orderkey", "o_l_orderkey")], others)
        .reduce(&["s_name"], &[("numwait", CountRows, "")]);
    query(b, Q21, result, &[("numwait", true), ("s_name", false)], Some(100), as_of)
}

/// Global sales opportunity.
pub const Q22: &str = "
select cntrycode, count(*) as numcust, sum(c_acctbal) as totacctbal
from (
  select substr(c_phone, 1, 2) as cntrycode, c_acctbal
  from customer
  where substr(c_phone, 1, 2) in ('13', '31', '23', '29', '30', '18', '17')
    and c_acctbal > (
      select avg(c_acctbal) from customer
      where c_acctbal > 0.00 and substr(c_phone, 1, 2) in ('13', '31', '23', '29', '30', '18', '17'))
    and not exists (select * from orders where o_custkey = c_custkey)
) as custsale
group by cntrycode
order by cntrycode";

/// Query 22 ([`Q22`]).
pub fn q22(catalog: Catalog, as_of: u64) -> Query {
    let mut b = QueryBuilder::new(catalog, 22);
    let codes = ["13", "31", "23", "29", "30", "18", "17"];
    let customer = b
        .table(Table::Customer)
        .map(|c| {
            let code =
                ScalarExpr::call_variadic(VariadicFunc::Substring, vec![c.c("c_phone"), int(1), int(2)]);
            vec![("cntrycode", code)]
        })
        .filter(|c| vec![in_texts(c, "cntrycode", &codes)])
        .project(&["c_custkey", "cntrycode", "c_acctbal"]);
    let customer = b.bind(customer);
    let average = customer
        .clone()
        .filter(|c| vec![c.c("c_acctbal").above(dec("0.00"))])
        .reduce(&[], &[("avg_balance", Avg, "c_acctbal")]);
    let orders = b.scan(Table::Orders, &["o_custkey"]);
    let orders = b.bind(orders);
    let rich = customer.cross(average).filter(|r| vec![r.c("c_acctbal").above(r.c("avg_balance"))]);
    let rich = b.bind(rich);
    let result = rich
        .anti_join(&orders, &[("c_custkey", "o_custkey")], |_| vec![])
        .reduce(&["cntrycode"], &[("numcust", CountRows, ""), ("totacctbal", Sum, "c_acctbal")]);
    query(b, Q22, result, &[("cntrycode", false)], None, as_of)
}
