//! TPC-H data from the `tpchgen` crate (a port of the official `dbgen`; no home-made generator), as
//! [`Row`]s of the [`crate::Table`] schemas, and refresh batches.
//!
//! **Refresh streams.** `tpchgen` generates the tables but not `dbgen`'s update sets, so the refresh
//! batches are made of `tpchgen`'s own rows: the orders are generated in [`SLICES`] slices of the order
//! key space (its "parts", each about `scale_factor * 1500` orders, the size of one TPC-H refresh), the
//! last `refreshes` slices are held back from the initial load, and refresh batch `i` inserts slice
//! `SLICES - refreshes + i` (its orders and their line items: the new sales of RF1) and then deletes
//! slice `i` (the oldest orders and their line items: RF2). Each batch is one append of inserts and
//! retractions.

use std::collections::BTreeMap;

use protocol::{Datum, Decimal, Row};
use tpchgen::decimal::TPCHDecimal;
use tpchgen::generators::{
    CustomerGenerator, LineItem, LineItemGenerator, NationGenerator, Order, OrderGenerator, PartGenerator,
    PartSuppGenerator, RegionGenerator, SupplierGenerator,
};

use crate::schema::Table;

/// The number of slices the orders are generated in (each a refresh's worth).
pub const SLICES: i32 = 1_000;

/// One refresh batch: the rows it inserts and the rows it deletes.
#[derive(Debug, Clone, Default)]
pub struct Refresh {
    /// New orders and their line items.
    pub inserts: Vec<(Table, Row)>,
    /// Old orders and their line items.
    pub deletes: Vec<(Table, Row)>,
}

impl Refresh {
    /// The batch as `(table, row, diff)` updates.
    pub fn updates(&self) -> impl Iterator<Item = (Table, &Row, i64)> {
        let inserts = self.inserts.iter().map(|(t, r)| (*t, r, 1));
        inserts.chain(self.deletes.iter().map(|(t, r)| (*t, r, -1)))
    }
}

/// A generated database: the initial tables and the refresh batches.
#[derive(Debug, Clone)]
pub struct Data {
    /// The scale factor.
    pub scale_factor: f64,
    /// The initial contents of every table.
    pub tables: BTreeMap<Table, Vec<Row>>,
    /// The refresh batches, in order.
    pub refreshes: Vec<Refresh>,
}

impl Data {
    /// The data of `scale_factor` with `refreshes` refresh batches (at most [`SLICES`] / 2).
    ///
    /// # Examples
    /// ```
    /// use tpch::{Data, Table};
    /// let data = Data::generate(0.001, 2);
    /// assert_eq!(data.tables[&Table::Nation].len(), 25);
    /// assert_eq!(data.refreshes.len(), 2);
    /// assert!(data.refreshes[0].inserts.iter().any(|(t, _)| *t == Table::LineItem));
    /// ```
    ///
    /// # Panics
    /// If `refreshes` is more than half the slices.
    pub fn generate(scale_factor: f64, refreshes: usize) -> Data {
        assert!(refreshes <= SLICES as usize / 2, "at most {} refresh batches", SLICES / 2);
        let sf = scale_factor;
        let mut tables: BTreeMap<Table, Vec<Row>> = BTreeMap::new();
        tables.insert(
            Table::Nation,
            NationGenerator::new(sf, 1, 1)
                .iter()
                .map(|n| {
                    Row::pack([
                        int(n.n_nationkey),
                        Datum::Text(n.n_name),
                        int(n.n_regionkey),
                        Datum::Text(n.n_comment),
                    ])
                })
                .collect(),
        );
        tables.insert(
            Table::Region,
            RegionGenerator::new(sf, 1, 1)
                .iter()
                .map(|r| Row::pack([int(r.r_regionkey), Datum::Text(r.r_name), Datum::Text(r.r_comment)]))
                .collect(),
        );
        tables.insert(
            Table::Part,
            PartGenerator::new(sf, 1, 1)
                .iter()
                .map(|p| {
                    let (name, mfgr, brand) =
                        (p.p_name.to_string(), p.p_mfgr.to_string(), p.p_brand.to_string());
                    Row::pack([
                        int(p.p_partkey),
                        Datum::Text(&name),
                        Datum::Text(&mfgr),
                        Datum::Text(&brand),
                        Datum::Text(p.p_type),
                        int(i64::from(p.p_size)),
                        Datum::Text(p.p_container),
                        money(p.p_retailprice),
                        Datum::Text(p.p_comment),
                    ])
                })
                .collect(),
        );
        tables.insert(
            Table::Supplier,
            SupplierGenerator::new(sf, 1, 1)
                .iter()
                .map(|s| {
                    let (name, address, phone) =
                        (s.s_name.to_string(), s.s_address.to_string(), s.s_phone.to_string());
                    Row::pack([
                        int(s.s_suppkey),
                        Datum::Text(&name),
                        Datum::Text(&address),
                        int(s.s_nationkey),
                        Datum::Text(&phone),
                        money(s.s_acctbal),
                        Datum::Text(&s.s_comment),
                    ])
                })
                .collect(),
        );
        tables.insert(
            Table::PartSupp,
            PartSuppGenerator::new(sf, 1, 1)
                .iter()
                .map(|ps| {
                    Row::pack([
                        int(ps.ps_partkey),
                        int(ps.ps_suppkey),
                        int(i64::from(ps.ps_availqty)),
                        money(ps.ps_supplycost),
                        Datum::Text(ps.ps_comment),
                    ])
                })
                .collect(),
        );
        tables.insert(
            Table::Customer,
            CustomerGenerator::new(sf, 1, 1)
                .iter()
                .map(|c| {
                    let (name, address, phone) =
                        (c.c_name.to_string(), c.c_address.to_string(), c.c_phone.to_string());
                    Row::pack([
                        int(c.c_custkey),
                        Datum::Text(&name),
                        Datum::Text(&address),
                        int(c.c_nationkey),
                        Datum::Text(&phone),
                        money(c.c_acctbal),
                        Datum::Text(c.c_mktsegment),
                        Datum::Text(c.c_comment),
                    ])
                })
                .collect(),
        );
        let loaded = SLICES - refreshes as i32;
        let (mut orders, mut lineitems) = (Vec::new(), Vec::new());
        for slice in 1..=loaded {
            let (o, l) = slice_rows(sf, slice);
            orders.extend(o);
            lineitems.extend(l);
        }
        tables.insert(Table::Orders, orders);
        tables.insert(Table::LineItem, lineitems);
        let refreshes = (0..refreshes as i32)
            .map(|i| {
                let (new_orders, new_lineitems) = slice_rows(sf, loaded + 1 + i);
                let (old_orders, old_lineitems) = slice_rows(sf, 1 + i);
                let tagged = |orders: Vec<Row>, lineitems: Vec<Row>| {
                    let orders = orders.into_iter().map(|r| (Table::Orders, r));
                    orders.chain(lineitems.into_iter().map(|r| (Table::LineItem, r))).collect()
                };
                Refresh {
                    inserts: tagged(new_orders, new_lineitems),
                    deletes: tagged(old_orders, old_lineitems),
                }
            })
            .collect();
        Data { scale_factor, tables, refreshes }
    }

    /// The bytes of the initial tables' row encodings (the data's size, for memory figures).
    pub fn encoded_bytes(&self) -> usize {
        self.tables.values().flatten().map(Row::byte_len).sum()
    }

    /// The number of rows of the initial tables.
    pub fn rows(&self) -> usize {
        self.tables.values().map(Vec::len).sum()
    }
}

/// The orders and line items of one slice of the order key space.
fn slice_rows(sf: f64, slice: i32) -> (Vec<Row>, Vec<Row>) {
    let orders = OrderGenerator::new(sf, slice, SLICES).iter().map(|o| order_row(&o)).collect();
    let lineitems = LineItemGenerator::new(sf, slice, SLICES).iter().map(|l| lineitem_row(&l)).collect();
    (orders, lineitems)
}

fn int(i: i64) -> Datum<'static> {
    Datum::Int64(i)
}

/// A `DECIMAL(15,2)` of `tpchgen` (hundredths).
fn money(d: TPCHDecimal) -> Datum<'static> {
    Datum::Decimal(Decimal::new(i128::from(d.into_inner()), 2).expect("a TPC-H amount is a decimal"))
}

fn date(d: tpchgen::dates::TPCHDate) -> Datum<'static> {
    Datum::Date(d.to_unix_epoch())
}

fn order_row(o: &Order<'_>) -> Row {
    let (status, clerk) = (o.o_orderstatus.to_string(), o.o_clerk.to_string());
    Row::pack([
        int(o.o_orderkey),
        int(o.o_custkey),
        Datum::Text(&status),
        money(o.o_totalprice),
        date(o.o_orderdate),
        Datum::Text(o.o_orderpriority),
        Datum::Text(&clerk),
        int(i64::from(o.o_shippriority)),
        Datum::Text(o.o_comment),
    ])
}

fn lineitem_row(l: &LineItem<'_>) -> Row {
    // `tpchgen` generates the quantity as an integer; the specification's type is DECIMAL(15,2).
    let quantity = Decimal::new(i128::from(l.l_quantity), 0).expect("a quantity is a decimal");
    Row::pack([
        int(l.l_orderkey),
        int(l.l_partkey),
        int(l.l_suppkey),
        int(i64::from(l.l_linenumber)),
        Datum::Decimal(quantity),
        money(l.l_extendedprice),
        money(l.l_discount),
        money(l.l_tax),
        Datum::Text(l.l_returnflag),
        Datum::Text(l.l_linestatus),
        date(l.l_shipdate),
        date(l.l_commitdate),
        date(l.l_receiptdate),
        Datum::Text(l.l_shipinstruct),
        Datum::Text(l.l_shipmode),
        Datum::Text(l.l_comment),
    ])
}
