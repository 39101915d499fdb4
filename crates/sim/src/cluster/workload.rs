//! The cluster scenario's workload: an orders schema (three tables), the dataflows maintained over it,
//! the peeks that read them, and the generator of table changes.
//!
//! **Tables** (storage collections written through a `TableWriter`):
//! - `customers (c_id, c_name, c_nation, c_segment)`: inserts, and segment changes (retract + insert);
//! - `orders (o_id, o_cust, o_status, o_amount)`: inserts, status changes (`open → shipped → delivered`),
//!   and cancellations (the order and its line items retracted);
//! - `lineitem (l_order, l_line, l_qty, l_price)`: inserted with their order.
//!
//! **Dataflows** (one instance; every id is fixed so logs and reports name them the same way each run):
//! - `customers_by_id`: an index of `customers` on `c_id`;
//! - `orders_enriched`: `orders ⋈ customers` (importing the `customers_by_id` index), exported twice: the
//!   join indexed on `c_id`, and `revenue_by_nation` (count and sum of the join per nation);
//! - `top_customers`: revenue per customer over the `orders_enriched` index, top 10 (a chain of three);
//! - `status_summary`: orders per status (count and sum); the scenario drops and recreates it under a new id;
//! - `status_revenue`: `lineitem ⋈ orders`, summed per order status, a materialized view written back to
//!   storage collection `status_revenue`;
//! - `nation_revenue_subscribe`: a subscribe to the `revenue_by_nation` index.
//!
//! Aggregates over large groups are computed hierarchically (per bucket of a key column first, then per
//! group: [`count_and_sum`]), and the top ten likewise; the results are those of a single `Reduce` or
//! `TopK`, which the oracle test checks with the reference interpreter.
//!
//! The generator only retracts rows that exist, so no collection ever holds a negative multiplicity.
//!
//! **Not here:** what the answers should be (`oracle.rs`), or any I/O.
//! **Tests:** `oracle.rs` evaluates these very descriptions with the reference interpreter.

use std::collections::BTreeMap;

use protocol::{
    AggregateExpr, AggregateFunc, BinaryFunc, BuildDesc, ColumnOrder, ColumnType, DataflowDescription, Datum,
    Diff, GlobalId, IndexExport, IndexImport, MapFilterProject, Plan, RelationDesc, Row, RowSetFinishing,
    ScalarExpr, ScalarType, SinkConnection, SinkExport, SourceImport,
};

use crate::simulation::Rng;

/// The `customers` table.
pub const CUSTOMERS: GlobalId = GlobalId::User(1);
/// The `orders` table.
pub const ORDERS: GlobalId = GlobalId::User(2);
/// The `lineitem` table.
pub const LINEITEM: GlobalId = GlobalId::User(3);
/// The storage collection the `status_revenue` materialized view writes.
pub const STATUS_REVENUE: GlobalId = GlobalId::User(10);

/// Index: customers by `c_id`.
pub const CUSTOMERS_BY_ID: GlobalId = GlobalId::User(101);
/// Index: `orders ⋈ customers` by `c_id`.
pub const ORDERS_BY_CUSTOMER: GlobalId = GlobalId::User(102);
/// Index: orders and revenue per nation.
pub const REVENUE_BY_NATION: GlobalId = GlobalId::User(103);
/// Index: the ten customers with the most revenue.
pub const TOP_CUSTOMERS: GlobalId = GlobalId::User(104);
/// Materialized view (sink) into [`STATUS_REVENUE`].
pub const STATUS_REVENUE_SINK: GlobalId = GlobalId::User(105);
/// Subscribe to [`REVENUE_BY_NATION`].
pub const NATION_SUBSCRIBE: GlobalId = GlobalId::User(106);

/// The `status_summary` index of generation `n` (it is dropped and recreated under a new id).
pub fn status_summary_id(generation: u64) -> GlobalId {
    GlobalId::User(200 + generation)
}

/// The nations customers live in.
pub const NATIONS: [&str; 25] = [
    "ALGERIA",
    "ARGENTINA",
    "BRAZIL",
    "CANADA",
    "EGYPT",
    "ETHIOPIA",
    "FRANCE",
    "GERMANY",
    "INDIA",
    "INDONESIA",
    "IRAN",
    "IRAQ",
    "JAPAN",
    "JORDAN",
    "KENYA",
    "MOROCCO",
    "MOZAMBIQUE",
    "PERU",
    "CHINA",
    "ROMANIA",
    "SAUDI ARABIA",
    "VIETNAM",
    "RUSSIA",
    "UNITED KINGDOM",
    "UNITED STATES",
];

/// Market segments.
pub const SEGMENTS: [&str; 5] = ["AUTOMOBILE", "BUILDING", "FURNITURE", "HOUSEHOLD", "MACHINERY"];

/// Order statuses, in the order an order moves through them.
pub const STATUSES: [&str; 3] = ["open", "shipped", "delivered"];

fn int() -> ColumnType {
    ColumnType::new(ScalarType::Int64, false)
}

fn text() -> ColumnType {
    ColumnType::new(ScalarType::Text, false)
}

/// `customers`' schema.
pub fn customers_desc() -> RelationDesc {
    RelationDesc::new([("c_id", int()), ("c_name", text()), ("c_nation", text()), ("c_segment", text())])
}

/// `orders`' schema.
pub fn orders_desc() -> RelationDesc {
    RelationDesc::new([("o_id", int()), ("o_cust", int()), ("o_status", text()), ("o_amount", int())])
}

/// `lineitem`'s schema.
pub fn lineitem_desc() -> RelationDesc {
    RelationDesc::new([("l_order", int()), ("l_line", int()), ("l_qty", int()), ("l_price", int())])
}

/// The schema of `orders_enriched` (the join, projected).
pub fn enriched_desc() -> RelationDesc {
    RelationDesc::new([
        ("c_id", int()),
        ("c_name", text()),
        ("c_nation", text()),
        ("o_id", int()),
        ("o_status", text()),
        ("o_amount", int()),
    ])
}

/// The schema of `revenue_by_nation`.
pub fn nation_revenue_desc() -> RelationDesc {
    RelationDesc::new([("c_nation", text()), ("orders", int()), ("revenue", int())])
}

/// The schema of the `status_revenue` materialized view (and its storage collection).
pub fn status_revenue_desc() -> RelationDesc {
    RelationDesc::new([("o_status", text()), ("lines", int()), ("revenue", int())])
}

fn object(n: u64) -> GlobalId {
    GlobalId::Transient(n)
}

fn reduce(input: Plan, group_key: Vec<usize>, aggregates: &[(AggregateFunc, usize)]) -> Plan {
    Plan::Reduce {
        input: Box::new(input),
        group_key,
        aggregates: aggregates
            .iter()
            .map(|(func, column)| AggregateExpr { func: *func, column: *column })
            .collect(),
    }
}

/// Buckets of a hierarchical aggregation (see [`count_and_sum`]).
const BUCKETS: i64 = 128;

/// `input` extended with `bucket = column % BUCKETS` as its last column.
fn with_bucket(input: Plan, column: usize) -> Plan {
    let bucket =
        ScalarExpr::column(column).call_binary(BinaryFunc::Mod, ScalarExpr::literal(Datum::Int64(BUCKETS)));
    Plan::Map { input: Box::new(input), exprs: vec![bucket] }
}

/// Per group of `key`: `count(count_column)` and `sum(sum_column)` of `input` (of `arity` columns), as
/// `(key.., count, sum)`.
///
/// Computed hierarchically: first per `(key, bucket)`, the bucket taken from the integer column
/// `bucket_column`, then the buckets' partial counts and sums are summed per key. Same result as one
/// `Reduce`, but a change re-reads only its bucket's rows and the key's buckets instead of every row of a
/// large group (a `Reduce` with `Sum` re-evaluates a changed group in full).
fn count_and_sum(
    input: Plan,
    arity: usize,
    key: &[usize],
    bucket_column: usize,
    count_column: usize,
    sum_column: usize,
) -> Plan {
    let mut partial_key = key.to_vec();
    partial_key.push(arity);
    let partial = reduce(
        with_bucket(input, bucket_column),
        partial_key,
        &[(AggregateFunc::Count, count_column), (AggregateFunc::Sum, sum_column)],
    );
    // (key.., bucket, count, sum)
    let k = key.len();
    reduce(partial, (0..k).collect(), &[(AggregateFunc::Sum, k + 1), (AggregateFunc::Sum, k + 2)])
}

/// `customers_by_id`: an index of `customers` on `c_id`.
pub fn customers_by_id() -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new("customers_by_id");
    df.source_imports.insert(CUSTOMERS, SourceImport { desc: customers_desc() });
    df.objects_to_build.push(BuildDesc { id: object(1), plan: Plan::get(CUSTOMERS) });
    df.index_exports.insert(CUSTOMERS_BY_ID, IndexExport { on_id: object(1), key: vec![0] });
    df
}

/// `orders_enriched`: `orders ⋈ customers_by_id` on `o_cust = c_id`, projected to
/// `(c_id, c_name, c_nation, o_id, o_status, o_amount)` and indexed on `c_id`; and per nation the number
/// of orders and their total, indexed on the nation.
pub fn orders_enriched() -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new("orders_enriched");
    df.source_imports.insert(ORDERS, SourceImport { desc: orders_desc() });
    df.index_imports.insert(CUSTOMERS_BY_ID, IndexImport { desc: customers_desc(), key: vec![0] });
    // orders: 0..4, customers: 4..8.
    let join = Plan::Join {
        inputs: vec![Plan::get(ORDERS), Plan::get(CUSTOMERS_BY_ID)],
        equivalences: vec![vec![1, 4]],
    };
    df.objects_to_build.push(BuildDesc {
        id: object(2),
        plan: Plan::Project { input: Box::new(join), outputs: vec![4, 5, 6, 0, 2, 3] },
    });
    df.objects_to_build
        .push(BuildDesc { id: object(3), plan: count_and_sum(Plan::get(object(2)), 6, &[2], 3, 3, 5) });
    df.index_exports.insert(ORDERS_BY_CUSTOMER, IndexExport { on_id: object(2), key: vec![0] });
    df.index_exports.insert(REVENUE_BY_NATION, IndexExport { on_id: object(3), key: vec![0] });
    df
}

/// `top_customers`: revenue per customer over the `orders_enriched` index, the top ten by revenue.
pub fn top_customers() -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new("top_customers");
    df.index_imports.insert(ORDERS_BY_CUSTOMER, IndexImport { desc: enriched_desc(), key: vec![0] });
    df.objects_to_build.push(BuildDesc {
        id: object(4),
        plan: reduce(Plan::get(ORDERS_BY_CUSTOMER), vec![0, 1], &[(AggregateFunc::Sum, 5)]),
    });
    // Hierarchically too: the top ten of each bucket of customers, then the top ten of those.
    let top = |input: Plan, group_key: Vec<usize>| Plan::TopK {
        input: Box::new(input),
        group_key,
        order_key: vec![ColumnOrder::desc(2)],
        limit: Some(10),
        offset: 0,
    };
    let per_bucket = top(with_bucket(Plan::get(object(4)), 0), vec![3]);
    let per_bucket = Plan::Project { input: Box::new(per_bucket), outputs: vec![0, 1, 2] };
    df.objects_to_build.push(BuildDesc { id: object(5), plan: top(per_bucket, vec![]) });
    df.index_exports.insert(TOP_CUSTOMERS, IndexExport { on_id: object(5), key: vec![0] });
    df
}

/// `status_summary` under `id`: orders per status, `(o_status, orders, amount)`.
pub fn status_summary(id: GlobalId) -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new(format!("status_summary ({id})"));
    df.source_imports.insert(ORDERS, SourceImport { desc: orders_desc() });
    df.objects_to_build
        .push(BuildDesc { id: object(6), plan: count_and_sum(Plan::get(ORDERS), 4, &[2], 0, 0, 3) });
    df.index_exports.insert(id, IndexExport { on_id: object(6), key: vec![0] });
    df
}

/// `status_revenue`: `lineitem ⋈ orders` on `l_order = o_id`, per order status the number of lines and
/// `sum(l_qty * l_price)`; a materialized view into [`STATUS_REVENUE`].
pub fn status_revenue() -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new("status_revenue");
    df.source_imports.insert(LINEITEM, SourceImport { desc: lineitem_desc() });
    df.source_imports.insert(ORDERS, SourceImport { desc: orders_desc() });
    // lineitem: 0..4, orders: 4..8, then l_qty * l_price as 8.
    let join =
        Plan::Join { inputs: vec![Plan::get(LINEITEM), Plan::get(ORDERS)], equivalences: vec![vec![0, 4]] };
    let revenue = ScalarExpr::column(2).call_binary(BinaryFunc::Mul, ScalarExpr::column(3));
    let mapped = Plan::Map { input: Box::new(join), exprs: vec![revenue] };
    df.objects_to_build.push(BuildDesc { id: object(7), plan: count_and_sum(mapped, 9, &[6], 0, 1, 8) });
    df.sink_exports.insert(
        STATUS_REVENUE_SINK,
        SinkExport {
            from: object(7),
            desc: status_revenue_desc(),
            connection: SinkConnection::MaterializedView { target: STATUS_REVENUE },
        },
    );
    df
}

/// `nation_revenue_subscribe`: every change of the `revenue_by_nation` index, with its snapshot first.
pub fn nation_subscribe() -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new("nation_revenue_subscribe");
    df.index_imports.insert(REVENUE_BY_NATION, IndexImport { desc: nation_revenue_desc(), key: vec![0] });
    df.objects_to_build.push(BuildDesc { id: object(8), plan: Plan::get(REVENUE_BY_NATION) });
    df.sink_exports.insert(
        NATION_SUBSCRIBE,
        SinkExport {
            from: object(8),
            desc: nation_revenue_desc(),
            connection: SinkConnection::Subscribe { with_snapshot: true },
        },
    );
    df
}

/// Every dataflow the scenario starts with, in creation order (importers after what they import).
pub fn initial_dataflows() -> Vec<DataflowDescription<u64>> {
    vec![
        customers_by_id(),
        orders_enriched(),
        top_customers(),
        status_summary(status_summary_id(0)),
        status_revenue(),
        nation_subscribe(),
    ]
}

/// The kinds of peeks the scenario issues, each against the oracle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeekKind {
    /// `customers_by_id` at one `c_id` (a key lookup).
    CustomerLookup,
    /// `orders_enriched` at one `c_id` (a key lookup).
    CustomerOrders,
    /// `orders_enriched` at one `c_id`, open orders only, `(o_id, o_amount)`, the three largest: a key
    /// lookup with a map/filter/project and a finishing.
    LargestOpenOrders,
    /// All of `revenue_by_nation`.
    NationRevenue,
    /// All of `top_customers`.
    TopCustomers,
    /// All of the current `status_summary`.
    StatusSummary,
}

impl PeekKind {
    /// Every kind with its weight in the mix.
    pub const MIX: [(PeekKind, u64); 6] = [
        (PeekKind::CustomerLookup, 30),
        (PeekKind::CustomerOrders, 25),
        (PeekKind::LargestOpenOrders, 10),
        (PeekKind::NationRevenue, 15),
        (PeekKind::TopCustomers, 10),
        (PeekKind::StatusSummary, 10),
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            PeekKind::CustomerLookup => "customer lookup",
            PeekKind::CustomerOrders => "customer's orders",
            PeekKind::LargestOpenOrders => "largest open orders",
            PeekKind::NationRevenue => "revenue by nation",
            PeekKind::TopCustomers => "top customers",
            PeekKind::StatusSummary => "status summary",
        }
    }

    /// The index it reads (`status_summary` is whichever generation is current).
    pub fn index(self, status_summary: GlobalId) -> GlobalId {
        match self {
            PeekKind::CustomerLookup => CUSTOMERS_BY_ID,
            PeekKind::CustomerOrders | PeekKind::LargestOpenOrders => ORDERS_BY_CUSTOMER,
            PeekKind::NationRevenue => REVENUE_BY_NATION,
            PeekKind::TopCustomers => TOP_CUSTOMERS,
            PeekKind::StatusSummary => status_summary,
        }
    }

    /// Picks a kind by weight.
    pub fn pick(rng: &mut Rng) -> PeekKind {
        let total: u64 = Self::MIX.iter().map(|(_, w)| w).sum();
        let mut draw = rng.below(total);
        for (kind, weight) in Self::MIX {
            if draw < weight {
                return kind;
            }
            draw -= weight;
        }
        unreachable!("the draw is below the total weight")
    }
}

/// One peek: what to read and how, as passed to the controller and the oracle alike.
#[derive(Debug, Clone)]
pub struct PeekSpec {
    /// The kind.
    pub kind: PeekKind,
    /// The customer looked up, for key lookups.
    pub customer: Option<i64>,
    /// Key rows (`literal_constraints`).
    pub literal_constraints: Option<Vec<Row>>,
    /// Applied to each row.
    pub map_filter_project: Option<MapFilterProject>,
    /// Ordering and limit.
    pub finishing: RowSetFinishing,
}

impl PeekSpec {
    /// The peek of `kind` (at `customer`, for the key lookups).
    pub fn new(kind: PeekKind, customer: i64) -> PeekSpec {
        let key = || Some(vec![Row::pack([Datum::Int64(customer)])]);
        let plain = |literal_constraints| PeekSpec {
            kind,
            customer: None,
            literal_constraints,
            map_filter_project: None,
            finishing: RowSetFinishing::unordered(),
        };
        match kind {
            PeekKind::CustomerLookup | PeekKind::CustomerOrders => {
                PeekSpec { customer: Some(customer), ..plain(key()) }
            }
            PeekKind::LargestOpenOrders => {
                let open = ScalarExpr::column(4)
                    .call_binary(BinaryFunc::Eq, ScalarExpr::literal(Datum::Text("open")));
                PeekSpec {
                    customer: Some(customer),
                    map_filter_project: Some(MapFilterProject::new(6).filter([open]).project([3, 5])),
                    finishing: RowSetFinishing {
                        order_by: vec![ColumnOrder::desc(1)],
                        limit: Some(3),
                        offset: 0,
                    },
                    ..plain(key())
                }
            }
            PeekKind::NationRevenue | PeekKind::TopCustomers | PeekKind::StatusSummary => plain(None),
        }
    }
}

/// A table of the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// `customers`.
    Customers,
    /// `orders`.
    Orders,
    /// `lineitem`.
    Lineitem,
}

impl Table {
    /// Every table.
    pub const ALL: [Table; 3] = [Table::Customers, Table::Orders, Table::Lineitem];

    /// Its storage collection.
    pub fn id(self) -> GlobalId {
        match self {
            Table::Customers => CUSTOMERS,
            Table::Orders => ORDERS,
            Table::Lineitem => LINEITEM,
        }
    }

    /// Its schema.
    pub fn desc(self) -> RelationDesc {
        match self {
            Table::Customers => customers_desc(),
            Table::Orders => orders_desc(),
            Table::Lineitem => lineitem_desc(),
        }
    }
}

/// One change to one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The table.
    pub table: Table,
    /// The row.
    pub row: Row,
    /// `+1` or `-1`.
    pub diff: Diff,
}

/// A customer row.
pub fn customer_row(id: i64, nation: &str, segment: &str) -> Row {
    let name = format!("Customer#{id:06}");
    Row::pack([Datum::Int64(id), Datum::Text(&name), Datum::Text(nation), Datum::Text(segment)])
}

/// An order row.
pub fn order_row(id: i64, customer: i64, status: &str, amount: i64) -> Row {
    Row::pack([Datum::Int64(id), Datum::Int64(customer), Datum::Text(status), Datum::Int64(amount)])
}

/// A line item row.
pub fn lineitem_row(order: i64, line: i64, qty: i64, price: i64) -> Row {
    Row::pack([Datum::Int64(order), Datum::Int64(line), Datum::Int64(qty), Datum::Int64(price)])
}

#[derive(Debug, Clone)]
struct Customer {
    nation: &'static str,
    segment: &'static str,
}

#[derive(Debug, Clone)]
struct Order {
    customer: i64,
    status: usize,
    /// `(qty, price)` per line.
    lines: Vec<(i64, i64)>,
}

impl Order {
    fn amount(&self) -> i64 {
        self.lines.iter().map(|(qty, price)| qty * price).sum()
    }

    fn row(&self, id: i64) -> Row {
        order_row(id, self.customer, STATUSES[self.status], self.amount())
    }
}

/// Generates table changes that are valid against what it generated before (it keeps the current
/// contents of every table it needs to retract from).
#[derive(Debug)]
pub struct Generator {
    rng: Rng,
    customers: Vec<Customer>,
    orders: BTreeMap<i64, Order>,
    /// Orders not yet delivered: the ones that can move on or be cancelled.
    in_flight: Vec<i64>,
    next_order: i64,
}

impl Generator {
    /// An empty generator.
    pub fn new(rng: Rng) -> Generator {
        Generator {
            rng,
            customers: Vec::new(),
            orders: BTreeMap::new(),
            in_flight: Vec::new(),
            next_order: 1,
        }
    }

    /// The number of customers (ids are `1..=count`).
    pub fn customer_count(&self) -> i64 {
        self.customers.len() as i64
    }

    /// The number of live orders.
    pub fn order_count(&self) -> usize {
        self.orders.len()
    }

    /// The initial contents: `customers` customers and `orders` orders.
    pub fn initial(&mut self, customers: usize, orders: usize) -> Vec<Update> {
        let mut out = Vec::new();
        for _ in 0..customers {
            self.new_customer(&mut out);
        }
        for _ in 0..orders {
            self.new_order(&mut out);
            // Spread the statuses, so every group of every aggregate is populated from the start.
            if self.rng.chance(0.6) {
                self.advance_order(&mut out);
            }
        }
        out
    }

    /// Changes amounting to at least `rows` updates.
    pub fn changes(&mut self, rows: usize) -> Vec<Update> {
        let mut out = Vec::new();
        while out.len() < rows {
            let draw = self.rng.below(100);
            match draw {
                0..40 => self.new_order(&mut out),
                40..80 => self.advance_order(&mut out),
                80..88 => self.cancel_order(&mut out),
                88..94 => self.new_customer(&mut out),
                _ => self.change_segment(&mut out),
            }
        }
        out
    }

    fn new_customer(&mut self, out: &mut Vec<Update>) {
        let id = self.customers.len() as i64 + 1;
        let customer = Customer {
            nation: self.rng.pick(&NATIONS).expect("nations"),
            segment: self.rng.pick(&SEGMENTS).expect("segments"),
        };
        out.push(Update {
            table: Table::Customers,
            row: customer_row(id, customer.nation, customer.segment),
            diff: 1,
        });
        self.customers.push(customer);
    }

    fn change_segment(&mut self, out: &mut Vec<Update>) {
        if self.customers.is_empty() {
            return self.new_customer(out);
        }
        let index = self.rng.below(self.customers.len() as u64) as usize;
        let id = index as i64 + 1;
        let customer = &mut self.customers[index];
        let segment = *self.rng.pick(&SEGMENTS).expect("segments");
        out.push(Update {
            table: Table::Customers,
            row: customer_row(id, customer.nation, customer.segment),
            diff: -1,
        });
        customer.segment = segment;
        out.push(Update {
            table: Table::Customers,
            row: customer_row(id, customer.nation, customer.segment),
            diff: 1,
        });
    }

    fn new_order(&mut self, out: &mut Vec<Update>) {
        if self.customers.is_empty() {
            return self.new_customer(out);
        }
        let id = self.next_order;
        self.next_order += 1;
        // Skewed towards low customer ids, so some customers have many orders.
        let span = self.customers.len() as u64;
        let customer = (self.rng.below(span).min(self.rng.below(span)) + 1) as i64;
        let lines: Vec<(i64, i64)> = (0..self.rng.range(1, 4))
            .map(|_| (self.rng.range(1, 10) as i64, self.rng.range(100, 10_000) as i64))
            .collect();
        for (line, (qty, price)) in lines.iter().enumerate() {
            out.push(Update {
                table: Table::Lineitem,
                row: lineitem_row(id, line as i64 + 1, *qty, *price),
                diff: 1,
            });
        }
        let order = Order { customer, status: 0, lines };
        out.push(Update { table: Table::Orders, row: order.row(id), diff: 1 });
        self.orders.insert(id, order);
        self.in_flight.push(id);
    }

    fn advance_order(&mut self, out: &mut Vec<Update>) {
        if self.in_flight.is_empty() {
            return self.new_order(out);
        }
        let index = self.rng.below(self.in_flight.len() as u64) as usize;
        let id = self.in_flight[index];
        let order = self.orders.get_mut(&id).expect("in-flight orders exist");
        out.push(Update { table: Table::Orders, row: order.row(id), diff: -1 });
        order.status += 1;
        out.push(Update { table: Table::Orders, row: order.row(id), diff: 1 });
        if order.status + 1 == STATUSES.len() {
            self.in_flight.swap_remove(index);
        }
    }

    fn cancel_order(&mut self, out: &mut Vec<Update>) {
        if self.in_flight.is_empty() {
            return self.new_order(out);
        }
        let index = self.rng.below(self.in_flight.len() as u64) as usize;
        let id = self.in_flight.swap_remove(index);
        let order = self.orders.remove(&id).expect("in-flight orders exist");
        out.push(Update { table: Table::Orders, row: order.row(id), diff: -1 });
        for (line, (qty, price)) in order.lines.iter().enumerate() {
            out.push(Update {
                table: Table::Lineitem,
                row: lineitem_row(id, line as i64 + 1, *qty, *price),
                diff: -1,
            });
        }
    }
}
