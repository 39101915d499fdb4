//! `cargo xtask bench tpch`: TPC-H hydration and refresh maintenance against SQLite recomputation.

fn main() {}
