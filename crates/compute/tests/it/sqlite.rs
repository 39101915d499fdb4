//! The replica against SQLite, an oracle nobody here wrote: the random plans of `protocol::arbitrary::sql`
//! (with their SQL; the differences between the IR's semantics and SQL's are encoded in its
//! `sql_semantics`) run incrementally on one shared replica (two workers, real sockets), their tables in
//! storage, compared with SQLite after every batch of inserts and deletes: the full result, the result
//! ordered, offset and limited by a peek's finishing (the replica's partial finishing, then the
//! controller's), and key lookups including a key of NULLs. Cases `0..max(4, PROPTEST_CASES)`, or the one
//! in `SQLITE_ORACLE_SEED`.

use std::num::NonZeroU64;
use std::sync::Arc;

use protocol::arbitrary::sql::{self, SqlCase, Sqlite};
use protocol::reference::Multiset;
use protocol::{ComputeCommand, Datum, Diff, MapFilterProject, PeekResponse, PeekTarget, Row};
use storage::InProcess;

use crate::harness::{
    Replica, Shape, TestController, append, create_collection, new_storage, proptest_cases,
};

/// A peek's answer as SQLite's: the rows, or the error.
fn answer(response: PeekResponse) -> Result<Multiset, String> {
    match response {
        PeekResponse::Rows(rows) => Ok(rows.into_iter().map(|(row, n)| (row, n.get() as Diff)).collect()),
        other => Err(format!("{other:?}")),
    }
}

/// Counts of what the comparisons saw, so that a run that compared nothing fails.
#[derive(Default)]
struct Seen {
    rows: usize,
    errors: usize,
    finished: usize,
}

/// One case on the shared replica, its ids offset by `base`.
fn check_case(
    storage: &InProcess,
    controller: &mut TestController,
    case: &SqlCase,
    base: u64,
    seen: &mut Seen,
) -> Result<(), String> {
    for table in 0..sql::TABLES {
        create_collection(storage, sql::table_id(table, base), case.table_desc());
    }
    let index = sql::index_id(base);
    let target = PeekTarget::Index { id: index };
    let arity = case.typ.arity();
    controller.create_dataflow(case.dataflow(base));
    let mut sqlite = Sqlite::open()?;
    for (time, batch) in case.batches.iter().enumerate() {
        for table in 0..sql::TABLES {
            let updates: Vec<(Row, u64, Diff)> = batch
                .iter()
                .filter(|(t, _, _)| *t == table)
                .map(|(_, row, diff)| (row.clone(), time as u64, *diff))
                .collect();
            append(storage, sql::table_id(table, base), updates, time as u64 + 1);
        }
        sqlite.apply(batch)?;
        let time_u64 = time as u64;
        let expected = sqlite.contents(case);
        let actual = answer(controller.peek(target, time_u64, None, arity));
        if !sql::agree(&expected, &actual) {
            return Err(sql::mismatch(case, time, "the result", &expected, &actual));
        }
        let Ok(rows) = actual else {
            seen.errors += 1;
            continue;
        };
        seen.rows += rows.len();
        if case.finishing_ranks() {
            let response = controller.peek_with(
                target,
                time_u64,
                None,
                MapFilterProject::new(arity),
                case.finishing.clone(),
            );
            // The processes' parts, merged, get the full finishing from the controller.
            let finished: Result<Vec<(Row, NonZeroU64)>, String> = match response {
                PeekResponse::Rows(rows) => Ok(case.finishing.finish(rows)),
                other => Err(format!("{other:?}")),
            };
            let expected = sqlite.finished(case);
            if !sql::agree(&expected, &finished) {
                return Err(sql::mismatch(case, time, "the finished result", &expected, &finished));
            }
            seen.finished += 1;
        }
        let key_of = |row: &Row| Row::pack(case.key.iter().map(|c| row.unpack()[*c]));
        let mut keys: Vec<Row> = rows.keys().take(2).map(key_of).collect();
        keys.push(Row::pack(case.key.iter().map(|_| Datum::Null)));
        keys.sort();
        keys.dedup();
        let expected = sqlite.lookup(case, &keys);
        let actual = answer(controller.peek(target, time_u64, Some(keys.clone()), arity));
        if !sql::agree(&expected, &actual) {
            return Err(sql::mismatch(case, time, &format!("a lookup of {keys:?}"), &expected, &actual));
        }
    }
    controller.send(ComputeCommand::AllowCompaction { id: index, frontier: frontiers::Antichain::new() });
    Ok(())
}

#[test]
fn the_replica_agrees_with_sqlite_on_random_plans_tables_and_updates() {
    let storage = new_storage();
    let replica =
        Replica::start(Shape::TwoWorkers, Arc::clone(&storage) as Arc<dyn storage::StorageCollections>);
    let mut controller = TestController::connect(&replica.addrs());
    let seeds = sql::seeds(proptest_cases(1));
    let mut seen = Seen::default();
    for (index, seed) in seeds.iter().enumerate() {
        let case = SqlCase::generate(*seed);
        let base = 1_000 * (index as u64 + 1);
        if let Err(report) = check_case(&storage, &mut controller, &case, base, &mut seen) {
            panic!("{report}");
        }
    }
    controller.close();
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
}
