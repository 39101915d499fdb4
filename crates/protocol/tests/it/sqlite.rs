//! The reference interpreter against SQLite, an oracle nobody here wrote: random plans with their SQL
//! over random tables, after every batch of inserts and deletes (`protocol::arbitrary::sql`; the
//! differences between the IR's semantics and SQL's are encoded in its `sql_semantics`). Seeds
//! `0..PROPTEST_CASES`, or `SQLITE_ORACLE_SEED` alone.

use std::num::NonZeroU64;

use protocol::arbitrary::sql::{self, SqlCase, Sqlite};
use protocol::reference::{self, Multiset};
use protocol::{EvalError, Row};

/// What the reference answers for a case after its first `times` batches: the result, or its error.
fn reference_answer(case: &SqlCase, times: usize) -> Result<Multiset, EvalError> {
    let inputs = sql::table_contents(case, times, 0);
    let mut exports = reference::evaluate_dataflow(&case.dataflow(0), &inputs)?;
    Ok(exports.remove(&sql::index_id(0)).unwrap_or_default())
}

/// The rows of a result as a peek's answer would carry them (an error if one is not positive).
fn counted(rows: &Multiset) -> Result<Vec<(Row, NonZeroU64)>, String> {
    rows.iter()
        .map(|(row, diff)| {
            let count = u64::try_from(*diff).ok().and_then(NonZeroU64::new);
            count.map(|count| (row.clone(), count)).ok_or_else(|| format!("{row} has multiplicity {diff}"))
        })
        .collect()
}

/// The rows of `rows` whose key columns are one of `keys`, by identity.
fn looked_up(case: &SqlCase, rows: &Multiset, keys: &[Row]) -> Multiset {
    let key_of = |row: &Row| Row::pack(case.key.iter().map(|c| row.unpack()[*c]));
    rows.iter().filter(|(row, _)| keys.contains(&key_of(row))).map(|(r, d)| (r.clone(), *d)).collect()
}

/// Counts of what the comparisons saw, so that a run that compared nothing fails.
#[derive(Default)]
struct Seen {
    rows: usize,
    errors: usize,
    finished: usize,
}

fn check_case(case: &SqlCase, seen: &mut Seen) -> Result<(), String> {
    let mut sqlite = Sqlite::open()?;
    for (time, batch) in case.batches.iter().enumerate() {
        sqlite.apply(batch)?;
        let expected = sqlite.contents(case);
        let answer = reference_answer(case, time + 1);
        if !sql::agree(&expected, &answer) {
            return Err(sql::mismatch(case, time, "the result", &expected, &answer));
        }
        let Ok(rows) = answer else {
            seen.errors += 1;
            continue;
        };
        seen.rows += rows.len();
        if case.finishing_ranks() {
            let finished = counted(&rows).map(|rows| reference::finish(&case.finishing, rows));
            let expected = sqlite.finished(case);
            if !sql::agree(&expected, &finished) {
                return Err(sql::mismatch(case, time, "the finished result", &expected, &finished));
            }
            seen.finished += 1;
        }
        // The keys of some rows, and a key of NULLs (which finds the rows whose key is NULL).
        let key_of = |row: &Row| Row::pack(case.key.iter().map(|c| row.unpack()[*c]));
        let mut keys: Vec<Row> = rows.keys().take(2).map(key_of).collect();
        keys.push(Row::pack(case.key.iter().map(|_| protocol::Datum::Null)));
        keys.sort();
        keys.dedup();
        let expected = sqlite.lookup(case, &keys);
        let found: Result<Multiset, String> = Ok(looked_up(case, &rows, &keys));
        if !sql::agree(&expected, &found) {
            return Err(sql::mismatch(case, time, &format!("a lookup of {keys:?}"), &expected, &found));
        }
    }
    Ok(())
}

#[test]
fn the_reference_interpreter_agrees_with_sqlite_on_random_plans_tables_and_updates() {
    // As many cases as the crate's other property tests run (`PROPTEST_CASES`, else proptest's default).
    let seeds = sql::seeds(proptest::test_runner::Config::default().cases);
    let mut seen = Seen::default();
    let mut constructs: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for seed in &seeds {
        let case = SqlCase::generate(*seed);
        let plan = format!("{:?}", case.plan);
        for construct in sql::CONSTRUCTS {
            if plan.contains(construct) {
                *constructs.entry(construct).or_default() += 1;
            }
        }
        if let Err(report) = check_case(&case, &mut seen) {
            panic!("{report}");
        }
    }
    if seeds.len() >= 32 {
        // Not vacuous: the cases compared rows, errors and finished (ordered, limited) results.
        assert!(
            seen.rows > 0 && seen.errors > 0 && seen.finished > 0,
            "{} rows, {} errors, {} finished",
            seen.rows,
            seen.errors,
            seen.finished
        );
    }
    if seeds.len() >= 256 {
        // Every construct of the IR the generator covers was generated (and so compared).
        let missing: Vec<&&str> = sql::CONSTRUCTS.iter().filter(|c| !constructs.contains_key(*c)).collect();
        assert!(missing.is_empty(), "never generated: {missing:?}; generated: {constructs:?}");
    }
}
