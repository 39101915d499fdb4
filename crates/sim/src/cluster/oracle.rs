//! The cluster scenario's oracle: the expected contents of every view at any time, maintained
//! incrementally from the log of everything the scenario wrote.
//!
//! **What this is.** [`WriteLog`] is the append-only list of `(time, updates)` the table writer
//! acknowledged, in time order. [`Oracle`] is the state of the tables *and of every view* at one time (its
//! cursor); [`Oracle::seek`] moves the cursor to any time, forwards by applying updates and backwards by
//! applying them negated, so checks can come in any order (peeks at the latest time, a subscribe a little
//! behind, a rehydrated replica's peek at the time of its crash) and each costs only the updates between
//! two nearby times. Every view is maintained with delta rules (a join by the matching rows of the other
//! side; aggregates by their running counts and sums), one update at a time, which is exact for joins and
//! for count/sum.
//!
//! **What this is not.** Not a second implementation of the plan IR: it knows only the views of
//! `workload.rs`, by hand. The test at the bottom checks it against the reference interpreter
//! (`protocol::reference::evaluate_dataflow`) on the dataflow descriptions the scenario actually sends, so
//! the two cannot drift apart unnoticed.
//!
//! **Invariant.** After `seek(t)`, the oracle's tables equal the consolidated sum of every logged update
//! at a time `<= t`, and every view equals its plan evaluated over those tables.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroU64;

use protocol::reference::Multiset;
use protocol::{Datum, Diff, Row};

use crate::cluster::workload::{PeekKind, PeekSpec, Table, Update};

/// What the table writer acknowledged, in time order.
#[derive(Debug, Default)]
pub struct WriteLog {
    entries: Vec<(u64, Vec<Update>)>,
    /// Every update at a time before this is in the log.
    upper: u64,
}

impl WriteLog {
    /// Records updates the writer wrote at `time` (strictly after every earlier entry).
    pub fn push(&mut self, time: u64, updates: Vec<Update>) {
        assert!(time >= self.upper, "the table writer's times increase: {time} after upper {}", self.upper);
        self.entries.push((time, updates));
        self.upper = time + 1;
    }

    /// Records that the tables' upper advanced to `upper` (a tick).
    pub fn advance(&mut self, upper: u64) {
        self.upper = self.upper.max(upper);
    }

    /// Every update at a time before this is in the log.
    pub fn upper(&self) -> u64 {
        self.upper
    }
}

/// Running count and sum of one group of an aggregate.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Group {
    /// The group's multiplicity (its rows, counted).
    rows: i64,
    sum: i64,
}

impl Group {
    fn add(&mut self, diff: Diff, value: i64) {
        self.rows += diff;
        self.sum += diff * value;
    }
}

fn add(multiset: &mut Multiset, row: Row, diff: Diff) {
    match multiset.entry(row) {
        Entry::Vacant(entry) => {
            if diff != 0 {
                entry.insert(diff);
            }
        }
        Entry::Occupied(mut entry) => {
            *entry.get_mut() += diff;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }
}

fn add_keyed(map: &mut HashMap<i64, Multiset>, key: i64, row: Row, diff: Diff) {
    let multiset = map.entry(key).or_default();
    add(multiset, row, diff);
    if multiset.is_empty() {
        map.remove(&key);
    }
}

fn int(row: &Row, column: usize) -> i64 {
    match row.get(column) {
        Some(Datum::Int64(i)) => i,
        other => panic!("column {column} of {row} is {other:?}, not an integer"),
    }
}

fn text(row: &Row, column: usize) -> String {
    match row.get(column) {
        Some(Datum::Text(s)) => s.to_string(),
        other => panic!("column {column} of {row} is {other:?}, not text"),
    }
}

/// The state of every table and view at the cursor's time (the default: the beginning of time). See
/// the module documentation.
#[derive(Debug, Default)]
pub struct Oracle {
    /// How many log entries are applied.
    cursor: usize,
    customers: HashMap<i64, Multiset>,
    orders_by_customer: HashMap<i64, Multiset>,
    orders_by_id: HashMap<i64, Multiset>,
    lineitems_by_order: HashMap<i64, Multiset>,
    /// `orders_enriched`, by `c_id`.
    enriched: HashMap<i64, Multiset>,
    revenue_by_nation: BTreeMap<String, Group>,
    /// Revenue per `(c_id, c_name)`.
    customer_revenue: HashMap<(i64, String), Group>,
    /// The same, ranked as `top_customers` ranks: revenue descending, then the row ascending.
    ranking: BTreeSet<(std::cmp::Reverse<i64>, i64, String)>,
    status_summary: BTreeMap<String, Group>,
    /// `status_revenue`: lines (count) and revenue (sum) per status.
    status_revenue: BTreeMap<String, Group>,
}

impl Oracle {
    /// Moves the cursor to `time`: applies every logged update at a time `<= time`, and no other.
    /// `time` must be below the log's upper (else the log may still grow below it).
    pub fn seek(&mut self, log: &WriteLog, time: u64) {
        assert!(time < log.upper, "seeking to {time}, which the log does not cover (upper {})", log.upper);
        while self.cursor < log.entries.len() && log.entries[self.cursor].0 <= time {
            for update in &log.entries[self.cursor].1 {
                self.apply(update.table, &update.row, update.diff);
            }
            self.cursor += 1;
        }
        while self.cursor > 0 && log.entries[self.cursor - 1].0 > time {
            self.cursor -= 1;
            for update in log.entries[self.cursor].1.iter().rev() {
                self.apply(update.table, &update.row, -update.diff);
            }
        }
    }

    fn apply(&mut self, table: Table, row: &Row, diff: Diff) {
        match table {
            Table::Customers => {
                let id = int(row, 0);
                if let Some(orders) = self.orders_by_customer.get(&id) {
                    let deltas: Vec<(Row, Diff)> =
                        orders.iter().map(|(order, m)| (enriched_row(row, order), diff * m)).collect();
                    for (joined, d) in deltas {
                        self.apply_enriched(joined, d);
                    }
                }
                add_keyed(&mut self.customers, id, row.clone(), diff);
            }
            Table::Orders => {
                let (id, customer, status, amount) = (int(row, 0), int(row, 1), text(row, 2), int(row, 3));
                if let Some(customers) = self.customers.get(&customer) {
                    let deltas: Vec<(Row, Diff)> =
                        customers.iter().map(|(c, m)| (enriched_row(c, row), diff * m)).collect();
                    for (joined, d) in deltas {
                        self.apply_enriched(joined, d);
                    }
                }
                self.status_summary.entry(status.clone()).or_default().add(diff, amount);
                if let Some(lines) = self.lineitems_by_order.get(&id) {
                    let group = self.status_revenue.entry(status).or_default();
                    for (line, m) in lines {
                        group.add(diff * m, int(line, 2) * int(line, 3));
                    }
                }
                add_keyed(&mut self.orders_by_customer, customer, row.clone(), diff);
                add_keyed(&mut self.orders_by_id, id, row.clone(), diff);
            }
            Table::Lineitem => {
                let order = int(row, 0);
                if let Some(orders) = self.orders_by_id.get(&order) {
                    for (o, m) in orders {
                        let group = self.status_revenue.entry(text(o, 2)).or_default();
                        group.add(diff * m, int(row, 2) * int(row, 3));
                    }
                }
                add_keyed(&mut self.lineitems_by_order, order, row.clone(), diff);
            }
        }
    }

    fn apply_enriched(&mut self, joined: Row, diff: Diff) {
        let (customer, name, nation, amount) =
            (int(&joined, 0), text(&joined, 1), text(&joined, 2), int(&joined, 5));
        self.revenue_by_nation.entry(nation).or_default().add(diff, amount);
        let key = (customer, name);
        let group = self.customer_revenue.entry(key.clone()).or_default();
        if group.rows > 0 {
            self.ranking.remove(&(std::cmp::Reverse(group.sum), key.0, key.1.clone()));
        }
        group.add(diff, amount);
        if group.rows > 0 {
            self.ranking.insert((std::cmp::Reverse(group.sum), key.0, key.1.clone()));
        } else {
            self.customer_revenue.remove(&key);
        }
        add_keyed(&mut self.enriched, customer, joined, diff);
    }

    /// The rows of a `(key, rows, sum)` aggregate: one per group with rows.
    fn groups(groups: &BTreeMap<String, Group>) -> Multiset {
        groups
            .iter()
            .filter(|(_, g)| g.rows != 0)
            .map(|(key, g)| (Row::pack([Datum::Text(key), Datum::Int64(g.rows), Datum::Int64(g.sum)]), 1))
            .collect()
    }

    /// `customers` at the cursor.
    pub fn customers(&self) -> Multiset {
        self.customers.values().flatten().map(|(r, d)| (r.clone(), *d)).collect()
    }

    /// `orders_enriched` at the cursor.
    pub fn orders_enriched(&self) -> Multiset {
        self.enriched.values().flatten().map(|(r, d)| (r.clone(), *d)).collect()
    }

    /// `revenue_by_nation` at the cursor.
    pub fn revenue_by_nation(&self) -> Multiset {
        Self::groups(&self.revenue_by_nation)
    }

    /// `top_customers` at the cursor.
    pub fn top_customers(&self) -> Multiset {
        self.ranking
            .iter()
            .take(10)
            .map(|(revenue, id, name)| {
                (Row::pack([Datum::Int64(*id), Datum::Text(name), Datum::Int64(revenue.0)]), 1)
            })
            .collect()
    }

    /// `status_summary` at the cursor.
    pub fn status_summary(&self) -> Multiset {
        Self::groups(&self.status_summary)
    }

    /// `status_revenue` at the cursor.
    pub fn status_revenue(&self) -> Multiset {
        Self::groups(&self.status_revenue)
    }

    /// What `spec` must return at the cursor, finished and in a canonical order.
    pub fn expected(&self, spec: &PeekSpec) -> Result<Vec<(Row, NonZeroU64)>, String> {
        let empty = Multiset::new();
        let contents: Multiset = match spec.kind {
            PeekKind::CustomerLookup => {
                spec.customer.and_then(|c| self.customers.get(&c)).cloned().unwrap_or(empty)
            }
            PeekKind::CustomerOrders | PeekKind::LargestOpenOrders => {
                spec.customer.and_then(|c| self.enriched.get(&c)).cloned().unwrap_or(empty)
            }
            PeekKind::NationRevenue => self.revenue_by_nation(),
            PeekKind::TopCustomers => self.top_customers(),
            PeekKind::StatusSummary => self.status_summary(),
        };
        finish(&contents, spec)
    }
}

/// The `orders_enriched` row of a customer and an order.
fn enriched_row(customer: &Row, order: &Row) -> Row {
    let c = customer.unpack();
    let o = order.unpack();
    Row::pack([c[0], c[1], c[2], o[0], o[2], o[3]])
}

/// Applies a peek's map/filter/project and finishing to a collection's contents, then puts the rows in a
/// canonical order (the finishing's order when it has one, else by row), ready to compare.
pub fn finish(contents: &Multiset, spec: &PeekSpec) -> Result<Vec<(Row, NonZeroU64)>, String> {
    let mapped = match &spec.map_filter_project {
        Some(mfp) => protocol::reference::map_filter_project(mfp, contents).map_err(|e| e.to_string())?,
        None => contents.clone(),
    };
    let mut rows = Vec::with_capacity(mapped.len());
    for (row, diff) in mapped {
        let count = u64::try_from(diff).ok().and_then(NonZeroU64::new);
        let count = count.ok_or_else(|| format!("the oracle holds {row} with multiplicity {diff}"))?;
        rows.push((row, count));
    }
    Ok(canonical(protocol::reference::finish(&spec.finishing, rows), spec))
}

/// Rows in a canonical order for comparison: unordered answers sorted by row.
pub fn canonical(mut rows: Vec<(Row, NonZeroU64)>, spec: &PeekSpec) -> Vec<(Row, NonZeroU64)> {
    if spec.finishing.order_by.is_empty() {
        rows.sort();
    }
    rows
}

/// A short description of how `actual` differs from `expected` (both canonical).
pub fn describe_difference(expected: &[(Row, NonZeroU64)], actual: &[(Row, NonZeroU64)]) -> String {
    let expected_set: BTreeMap<&Row, u64> = expected.iter().map(|(r, n)| (r, n.get())).collect();
    let actual_set: BTreeMap<&Row, u64> = actual.iter().map(|(r, n)| (r, n.get())).collect();
    let missing: Vec<String> = expected_set
        .iter()
        .filter(|(r, n)| actual_set.get(*r) != Some(n))
        .take(3)
        .map(|(r, n)| format!("({r}) x{n}"))
        .collect();
    let extra: Vec<String> = actual_set
        .iter()
        .filter(|(r, n)| expected_set.get(*r) != Some(n))
        .take(3)
        .map(|(r, n)| format!("({r}) x{n}"))
        .collect();
    if missing.is_empty() && extra.is_empty() {
        return format!("same rows in a different order: expected {expected:?}, got {actual:?}");
    }
    format!(
        "{} rows expected, {} returned; expected but missing: [{}]; returned but not expected: [{}]",
        expected.len(),
        actual.len(),
        missing.join(", "),
        extra.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use frontiers::Antichain;
    use protocol::GlobalId;
    use protocol::reference::{consolidate, evaluate_dataflow};

    use super::*;
    use crate::cluster::workload::{self, Generator};
    use crate::simulation::Rng;

    /// Every view of the oracle at `time`, evaluated instead by the reference interpreter over the tables
    /// the oracle holds, from the very descriptions the scenario sends.
    fn reference_views(oracle: &Oracle) -> BTreeMap<GlobalId, Multiset> {
        let mut inputs = BTreeMap::from([
            (workload::CUSTOMERS, oracle.customers()),
            (
                workload::ORDERS,
                oracle.orders_by_id.values().flatten().map(|(r, d)| (r.clone(), *d)).collect::<Multiset>(),
            ),
            (
                workload::LINEITEM,
                oracle.lineitems_by_order.values().flatten().map(|(r, d)| (r.clone(), *d)).collect(),
            ),
        ]);
        let mut out = BTreeMap::new();
        for mut df in workload::initial_dataflows() {
            df.as_of = Some(Antichain::from_elem(0));
            // Index imports read the importing index's contents.
            for id in df.index_imports.keys() {
                inputs.entry(*id).or_insert_with(|| out.get(id).cloned().expect("imports come first"));
            }
            for (id, contents) in evaluate_dataflow(&df, &inputs).expect("the workload has no data errors") {
                out.insert(id, contents);
            }
        }
        out
    }

    #[test]
    fn the_oracle_agrees_with_the_reference_interpreter_forwards_and_backwards() {
        let mut generator = Generator::new(Rng::new(5));
        let mut log = WriteLog::default();
        log.push(10, generator.initial(30, 60));
        for time in 11..40 {
            log.push(time, generator.changes(12));
        }
        let mut oracle = Oracle::default();
        for time in [10, 25, 39, 12, 30, 10, 39] {
            oracle.seek(&log, time);
            let reference = reference_views(&oracle);
            let checks: [(&str, GlobalId, Multiset); 6] = [
                ("customers_by_id", workload::CUSTOMERS_BY_ID, oracle.customers()),
                ("orders_enriched", workload::ORDERS_BY_CUSTOMER, oracle.orders_enriched()),
                ("revenue_by_nation", workload::REVENUE_BY_NATION, oracle.revenue_by_nation()),
                ("top_customers", workload::TOP_CUSTOMERS, oracle.top_customers()),
                ("status_summary", workload::status_summary_id(0), oracle.status_summary()),
                ("status_revenue", workload::STATUS_REVENUE_SINK, oracle.status_revenue()),
            ];
            for (name, id, contents) in checks {
                assert_eq!(contents, reference[&id], "{name} at {time}");
            }
            assert_eq!(reference[&workload::NATION_SUBSCRIBE], oracle.revenue_by_nation());
        }
        // Seeking back to the start undoes everything.
        let mut fresh = Oracle::default();
        fresh.seek(&log, 10);
        oracle.seek(&log, 10);
        assert_eq!(oracle.orders_enriched(), fresh.orders_enriched());
        assert_eq!(oracle.customer_revenue.len(), fresh.customer_revenue.len());
    }

    #[test]
    fn peeks_apply_the_map_filter_project_and_the_finishing() {
        let mut generator = Generator::new(Rng::new(9));
        let mut log = WriteLog::default();
        log.push(1, generator.initial(3, 40));
        let mut oracle = Oracle::default();
        oracle.seek(&log, 1);
        for customer in 1..=3 {
            let all = oracle.expected(&PeekSpec::new(PeekKind::CustomerOrders, customer)).unwrap();
            let largest = oracle.expected(&PeekSpec::new(PeekKind::LargestOpenOrders, customer)).unwrap();
            let mut open: Vec<(i64, i64)> = all
                .iter()
                .map(|(r, _)| r.unpack())
                .filter(|d| d[4] == Datum::Text("open"))
                .map(|d| match (d[3], d[5]) {
                    (Datum::Int64(id), Datum::Int64(amount)) => (amount, id),
                    _ => unreachable!("typed columns"),
                })
                .collect();
            // The finishing's order: amount descending, ties by the whole row `(o_id, o_amount)` ascending.
            open.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            let want: Vec<(i64, i64)> = open.into_iter().take(3).collect();
            let got: Vec<(i64, i64)> = largest.iter().map(|(r, _)| (int(r, 1), int(r, 0))).collect();
            assert_eq!(got, want, "customer {customer}");
        }
        assert_eq!(
            consolidate(
                oracle
                    .expected(&PeekSpec::new(PeekKind::CustomerLookup, 99))
                    .unwrap()
                    .into_iter()
                    .map(|(r, n)| (r, n.get() as i64))
            ),
            Multiset::new()
        );
    }
}
