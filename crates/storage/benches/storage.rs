//! Storage benchmarks, printed as `bench <name>: <value> <unit> (baseline <value> <unit>, ratio <r>)` lines
//! for `cargo xtask bench storage` (which runs `cargo bench -p storage --bench storage`).
//!
//! **What it measures.**
//! - `storage.shard_*`: the shard engine on local files + SQLite and on S3 + PostgreSQL (appends against
//!   the engines' floor, listen latency with and without the push channel, a 1M-row snapshot against a raw
//!   blob read, space after compaction); see `benches/shards/mod.rs`.
//!
//! **What it is not.** Not a criterion bench (`harness = false`) and not simulated code, so it reads the
//! wall clock. Run it in release (`cargo bench` does). Data lives in a temporary directory on the same
//! filesystem as `std::env::temp_dir()`.

// A benchmark reports on stdout; `cargo xtask bench` reads it from there.
#![allow(clippy::print_stdout)]
// A benchmark measures wall-clock time; clippy.toml's clock rule is for simulated code.
#![allow(clippy::disallowed_methods)]

use std::io::Write;

use frontiers::Antichain;
use protocol::{ColumnType, Datum, GlobalId, RelationDesc, Row, ScalarType};
use storage::AppendRequest;

mod shards;

fn desc() -> RelationDesc {
    RelationDesc::new([
        ("writer", ColumnType::new(ScalarType::Int64, false)),
        ("seq", ColumnType::new(ScalarType::Int64, false)),
        ("pad", ColumnType::new(ScalarType::Text, false)),
    ])
}

/// A row of exactly 100 encoded bytes.
fn row(writer: u64, seq: u64) -> Row {
    const PAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
    let row = Row::pack([Datum::Int64(writer as i64), Datum::Int64(seq as i64), Datum::Text(PAD)]);
    debug_assert_eq!(row.byte_len(), 100);
    row
}

fn append(id: GlobalId, updates: Vec<(Row, u64, i64)>, lower: u64, upper: u64) -> AppendRequest {
    AppendRequest {
        id,
        updates,
        expected_upper: Antichain::from_elem(lower),
        new_upper: Antichain::from_elem(upper),
    }
}

fn print_line(name: &str, value: f64, unit: &str, baseline: Option<(f64, &str)>) {
    match baseline {
        Some((base, base_unit)) => {
            let ratio = if base > 0.0 { value / base } else { 0.0 };
            println!("bench {name}: {value:.0} {unit} (baseline {base:.0} {base_unit}, ratio {ratio:.2})");
        }
        None => println!("bench {name}: {value:.0} {unit}"),
    }
    let _ = std::io::stdout().flush();
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter on the group names below.
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wants = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        shards::run(&wants).await;
    });
}
