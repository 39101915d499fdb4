//! The eight TPC-H tables: their columns and types (the specification's, clause 1.4: identifiers and
//! integers as `Int64`, `DECIMAL(15,2)` as decimals of scale 2, dates as dates, the rest as text; every
//! column non-null), and the ids a [`Catalog`] gives them.

use protocol::{ColumnType, GlobalId, RelationDesc, ScalarType};

/// A TPC-H table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// `PART`.
    Part,
    /// `SUPPLIER`.
    Supplier,
    /// `PARTSUPP`.
    PartSupp,
    /// `CUSTOMER`.
    Customer,
    /// `ORDERS`.
    Orders,
    /// `LINEITEM`.
    LineItem,
    /// `NATION`.
    Nation,
    /// `REGION`.
    Region,
}

/// Every table, in a fixed order.
pub const TABLES: [Table; 8] = [
    Table::Part,
    Table::Supplier,
    Table::PartSupp,
    Table::Customer,
    Table::Orders,
    Table::LineItem,
    Table::Nation,
    Table::Region,
];

/// A column type of the schema.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Int,
    Money,
    Date,
    Text,
}

impl Kind {
    fn column_type(self) -> ColumnType {
        let scalar = match self {
            Kind::Int => ScalarType::Int64,
            Kind::Money => ScalarType::Decimal { scale: 2 },
            Kind::Date => ScalarType::Date,
            Kind::Text => ScalarType::Text,
        };
        ColumnType::new(scalar, false)
    }

    fn sql(self) -> &'static str {
        match self {
            Kind::Int => "INTEGER",
            // SQLite has no exact decimal: see `crate::sqlite::semantics`.
            Kind::Money => "REAL",
            Kind::Date | Kind::Text => "TEXT",
        }
    }
}

impl Table {
    /// The table's name, as the queries' SQL spells it.
    pub fn name(self) -> &'static str {
        match self {
            Table::Part => "part",
            Table::Supplier => "supplier",
            Table::PartSupp => "partsupp",
            Table::Customer => "customer",
            Table::Orders => "orders",
            Table::LineItem => "lineitem",
            Table::Nation => "nation",
            Table::Region => "region",
        }
    }

    fn columns(self) -> &'static [(&'static str, Kind)] {
        use Kind::*;
        match self {
            Table::Part => &[
                ("p_partkey", Int),
                ("p_name", Text),
                ("p_mfgr", Text),
                ("p_brand", Text),
                ("p_type", Text),
                ("p_size", Int),
                ("p_container", Text),
                ("p_retailprice", Money),
                ("p_comment", Text),
            ],
            Table::Supplier => &[
                ("s_suppkey", Int),
                ("s_name", Text),
                ("s_address", Text),
                ("s_nationkey", Int),
                ("s_phone", Text),
                ("s_acctbal", Money),
                ("s_comment", Text),
            ],
            Table::PartSupp => &[
                ("ps_partkey", Int),
                ("ps_suppkey", Int),
                ("ps_availqty", Int),
                ("ps_supplycost", Money),
                ("ps_comment", Text),
            ],
            Table::Customer => &[
                ("c_custkey", Int),
                ("c_name", Text),
                ("c_address", Text),
                ("c_nationkey", Int),
                ("c_phone", Text),
                ("c_acctbal", Money),
                ("c_mktsegment", Text),
                ("c_comment", Text),
            ],
            Table::Orders => &[
                ("o_orderkey", Int),
                ("o_custkey", Int),
                ("o_orderstatus", Text),
                ("o_totalprice", Money),
                ("o_orderdate", Date),
                ("o_orderpriority", Text),
                ("o_clerk", Text),
                ("o_shippriority", Int),
                ("o_comment", Text),
            ],
            Table::LineItem => &[
                ("l_orderkey", Int),
                ("l_partkey", Int),
                ("l_suppkey", Int),
                ("l_linenumber", Int),
                ("l_quantity", Money),
                ("l_extendedprice", Money),
                ("l_discount", Money),
                ("l_tax", Money),
                ("l_returnflag", Text),
                ("l_linestatus", Text),
                ("l_shipdate", Date),
                ("l_commitdate", Date),
                ("l_receiptdate", Date),
                ("l_shipinstruct", Text),
                ("l_shipmode", Text),
                ("l_comment", Text),
            ],
            Table::Nation => {
                &[("n_nationkey", Int), ("n_name", Text), ("n_regionkey", Int), ("n_comment", Text)]
            }
            Table::Region => &[("r_regionkey", Int), ("r_name", Text), ("r_comment", Text)],
        }
    }

    /// The table's schema.
    ///
    /// # Examples
    /// ```
    /// use tpch::Table;
    /// let desc = Table::LineItem.desc();
    /// assert_eq!(desc.arity(), 16);
    /// assert_eq!(desc.column_index("l_discount"), Some(6));
    /// ```
    pub fn desc(self) -> RelationDesc {
        RelationDesc::new(self.columns().iter().map(|(name, kind)| (*name, kind.column_type())))
    }

    /// `CREATE TABLE` for SQLite.
    pub fn create_sql(self) -> String {
        let columns: Vec<String> =
            self.columns().iter().map(|(name, kind)| format!("{name} {} NOT NULL", kind.sql())).collect();
        format!("CREATE TABLE {} ({})", self.name(), columns.join(", "))
    }
}

/// The ids of the tables and the queries' objects: tables are `User(tables + 1..=8)`, query `n`'s index
/// `User(views + 100 + n)` and its objects `Transient(views + 1000 * n + i)`. A second set of views over
/// the same tables (a recreated dataflow) takes another `views` base.
#[derive(Debug, Clone, Copy)]
pub struct Catalog {
    /// The base of the tables' ids.
    pub tables: u64,
    /// The base of the views' ids.
    pub views: u64,
}

impl Catalog {
    /// Tables and views from one base.
    pub fn new(base: u64) -> Catalog {
        Catalog { tables: base, views: base }
    }

    /// The id of a table.
    pub fn table(self, table: Table) -> GlobalId {
        let index = TABLES.iter().position(|t| *t == table).expect("every table is listed");
        GlobalId::User(self.tables + 1 + index as u64)
    }

    /// The id of query `number`'s index.
    pub fn index(self, number: usize) -> GlobalId {
        GlobalId::User(self.views + 100 + number as u64)
    }

    /// The id of query `number`'s `object`-th built object.
    pub fn object(self, number: usize, object: usize) -> GlobalId {
        GlobalId::Transient(self.views + 1_000 * number as u64 + object as u64)
    }
}
