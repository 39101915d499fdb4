//! The oracle: SQLite (the `rusqlite` crate's bundled library) holding the same tables, running each
//! query's SQL ([`crate::Query::sql`]) after the initial load and after every refresh batch. Its answers
//! are compared with the replica's by [`semantics::compare`], the one place where the differences
//! between the IR's semantics and SQLite's are handled.
//!
//! SQLite gets the primary-key and foreign-key indexes the specification allows (clause 1.4.2.2), so that
//! its correlated subqueries are index lookups: it recomputes each query from scratch as a reasonable
//! non-incremental engine would.

use protocol::{ColumnType, Datum, Row, ScalarType};
use rusqlite::types::ValueRef;

use crate::data::{Data, Refresh};
use crate::schema::{TABLES, Table};

/// A value of a SQLite answer, kept as SQLite gave it (decimals stay doubles: see [`semantics`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `NULL`.
    Null,
    /// An integer.
    Integer(i64),
    /// A double.
    Real(f64),
    /// Text.
    Text(String),
}

/// An in-memory SQLite database with the TPC-H tables.
#[derive(Debug)]
pub struct Oracle {
    connection: rusqlite::Connection,
}

/// What went wrong talking to SQLite.
#[derive(Debug, thiserror::Error)]
#[error("SQLite: {0}")]
pub struct OracleError(#[from] rusqlite::Error);

const INDEXES: &[&str] = &[
    "CREATE UNIQUE INDEX orders_pk ON orders (o_orderkey)",
    "CREATE UNIQUE INDEX lineitem_pk ON lineitem (l_orderkey, l_linenumber)",
    "CREATE INDEX lineitem_part ON lineitem (l_partkey, l_suppkey)",
    "CREATE INDEX lineitem_supplier ON lineitem (l_suppkey)",
    "CREATE INDEX orders_customer ON orders (o_custkey)",
    "CREATE UNIQUE INDEX partsupp_pk ON partsupp (ps_partkey, ps_suppkey)",
    "CREATE UNIQUE INDEX part_pk ON part (p_partkey)",
    "CREATE UNIQUE INDEX supplier_pk ON supplier (s_suppkey)",
    "CREATE UNIQUE INDEX customer_pk ON customer (c_custkey)",
];

impl Oracle {
    /// A database with `data`'s initial tables.
    pub fn load(data: &Data) -> Result<Oracle, OracleError> {
        let mut connection = rusqlite::Connection::open_in_memory()?;
        for table in TABLES {
            connection.execute(&table.create_sql(), [])?;
        }
        let transaction = connection.transaction()?;
        for (table, rows) in &data.tables {
            insert(&transaction, *table, rows.iter())?;
        }
        transaction.commit()?;
        for index in INDEXES {
            connection.execute(index, [])?;
        }
        connection.execute("ANALYZE", [])?;
        Ok(Oracle { connection })
    }

    /// Applies a refresh batch: its inserts, then its deletes (by primary key).
    pub fn apply(&mut self, refresh: &Refresh) -> Result<(), OracleError> {
        let transaction = self.connection.transaction()?;
        for table in [Table::Orders, Table::LineItem] {
            insert(&transaction, table, refresh.inserts.iter().filter(|(t, _)| *t == table).map(|(_, r)| r))?;
        }
        {
            let mut orders = transaction.prepare("DELETE FROM orders WHERE o_orderkey = ?1")?;
            let mut lineitems =
                transaction.prepare("DELETE FROM lineitem WHERE l_orderkey = ?1 AND l_linenumber = ?2")?;
            for (table, row) in &refresh.deletes {
                let datums = row.unpack();
                let key = |i: usize| match datums[i] {
                    Datum::Int64(k) => k,
                    other => panic!("a key column holds {other:?}"),
                };
                let deleted = match table {
                    Table::Orders => orders.execute([key(0)])?,
                    Table::LineItem => lineitems.execute([key(0), key(3)])?,
                    other => panic!("refreshes change orders and line items only, not {other:?}"),
                };
                assert_eq!(deleted, 1, "a refresh deletes a row that is there: {row}");
            }
        }
        transaction.commit()?;
        Ok(())
    }

    /// The rows of `sql`, in SQLite's order.
    pub fn query(&self, sql: &str) -> Result<Vec<Vec<Value>>, OracleError> {
        let mut statement = self.connection.prepare(sql)?;
        let columns = statement.column_count();
        let mut rows = statement.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut values = Vec::with_capacity(columns);
            for column in 0..columns {
                values.push(match row.get_ref(column)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(i) => Value::Integer(i),
                    ValueRef::Real(x) => Value::Real(x),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::Text(format!("{b:?}")),
                });
            }
            out.push(values);
        }
        Ok(out)
    }
}

/// Inserts rows of `table`.
fn insert<'a>(
    transaction: &rusqlite::Transaction<'_>,
    table: Table,
    rows: impl Iterator<Item = &'a Row>,
) -> Result<(), OracleError> {
    let arity = table.desc().arity();
    let placeholders: Vec<String> = (1..=arity).map(|i| format!("?{i}")).collect();
    let mut statement =
        transaction.prepare(&format!("INSERT INTO {} VALUES ({})", table.name(), placeholders.join(", ")))?;
    for row in rows {
        let values: Vec<rusqlite::types::Value> = row.iter().map(semantics::parameter).collect();
        statement.execute(rusqlite::params_from_iter(values))?;
    }
    Ok(())
}

/// Every difference between the IR's semantics and SQLite's that the TPC-H queries meet, handled here
/// and nowhere else:
///
/// - **Decimals.** SQLite has no exact decimal: money is a double there (summed, multiplied and divided
///   in doubles), an exact decimal in the IR. A decimal column compares equal when the two are within
///   `10^-6` plus a relative `10^-9` (a double's sum of a few million amounts is off by far less; a
///   wrong answer by far more). Averages and quotients are rounded in the IR (`BinaryFunc::Div`); the
///   tolerance covers that rounding too.
///   Arithmetic on literals in a query's SQL is rounded back to the literals' scale (query 6's
///   `round(0.06 + 0.01, 2)`): SQLite's `0.06 + 0.01` is `0.06999999999999999`, which would drop the
///   rows at the bound that the IR's exact `0.07` keeps.
/// - **Dates** are ISO text in SQLite (which orders as the dates do), dates in the IR.
/// - **A global aggregate over nothing** (a query without `GROUP BY` whose input is empty, as query 17's
///   can be at small scale factors) has no row in the IR and one row of `NULL`s in SQL.
///
/// Everything else compares exactly: integers, text, the order of the rows (the IR's order is the
/// query's `ORDER BY` with ties broken by the whole row; the queries' orders are total or their ties
/// unlikely, and a tie SQLite breaks differently shows up as a mismatch, never hidden).
pub mod semantics {
    use super::*;

    /// A datum as SQLite stores it.
    pub fn parameter(datum: Datum<'_>) -> rusqlite::types::Value {
        use rusqlite::types::Value as V;
        match datum {
            Datum::Null => V::Null,
            Datum::Int64(i) => V::Integer(i),
            Datum::Decimal(d) => V::Real(d.to_string().parse().expect("a decimal's text is a float's")),
            Datum::Date(days) => V::Text(protocol::format_date(days)),
            Datum::Text(s) => V::Text(s.to_string()),
            other => panic!("TPC-H has no {other:?}"),
        }
    }

    /// Whether a decimal of the IR and SQLite's double are the same amount (see the module docs).
    pub fn same_amount(ir: f64, sqlite: f64) -> bool {
        (ir - sqlite).abs() <= 1e-6 + 1e-9 * ir.abs()
    }

    fn same(datum: Datum<'_>, value: &Value, typ: ColumnType) -> bool {
        match (datum, value, typ.scalar_type) {
            (Datum::Null, Value::Null, _) => true,
            (Datum::Int64(i), Value::Integer(j), ScalarType::Int64) => i == *j,
            (Datum::Decimal(d), Value::Real(x), ScalarType::Decimal { .. }) => {
                same_amount(d.to_string().parse().expect("a decimal's text is a float's"), *x)
            }
            (Datum::Decimal(d), Value::Integer(j), ScalarType::Decimal { .. }) => {
                same_amount(d.to_string().parse().expect("a decimal's text is a float's"), *j as f64)
            }
            (Datum::Date(days), Value::Text(t), ScalarType::Date) => protocol::format_date(days) == *t,
            (Datum::Text(s), Value::Text(t), ScalarType::Text) => s == t,
            _ => false,
        }
    }

    /// Compares the replica's finished answer (`rows`, each once per its multiplicity) with SQLite's:
    /// `Ok` if they agree, else a report of the first difference.
    pub fn compare(
        rows: &[Row],
        sqlite: &[Vec<Value>],
        types: &[ColumnType],
        global: bool,
    ) -> Result<(), String> {
        let all_null = |values: &Vec<Value>| values.iter().all(|v| *v == Value::Null);
        if global && rows.is_empty() && sqlite.len() == 1 && all_null(&sqlite[0]) {
            return Ok(());
        }
        if rows.len() != sqlite.len() {
            return Err(format!(
                "{} rows, SQLite {}: first rows {:?} vs {:?}",
                rows.len(),
                sqlite.len(),
                rows.first(),
                sqlite.first()
            ));
        }
        for (index, (row, values)) in rows.iter().zip(sqlite).enumerate() {
            let datums = row.unpack();
            let agree = datums.len() == values.len()
                && datums.iter().zip(values).zip(types).all(|((d, v), t)| same(*d, v, *t));
            if !agree {
                return Err(format!("row {index}: {row} vs SQLite's {values:?}"));
            }
        }
        Ok(())
    }
}
