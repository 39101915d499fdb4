//! Copy-to: writing a finished copy-to's rows as CSV files and answering with the row count.
//!
//! **What this is.** A copy-to's rows are merged per local worker (`sinks.rs`); once the sink frontier
//! passed the dataflow's as-of, the snapshot is complete ([`Core::copy_to_progressed`]) and, once
//! `AllowWrites` arrived ([`Core::write_ready_copy_tos`]), each process writes one file per local worker,
//! `part-{process}-{worker}.csv`, into the copy-to's directory, and answers with its row count (the
//! controller sums the processes'). An error in the snapshot, a negative multiplicity or a failed write
//! is answered as `CopyToResponse::Error`.
//!
//! **What this is not.** Not a storage write: the files are local to the process, outside `storage`.
//!
//! **Invariants.** A copy-to is answered at most once (its merge is then `done`), and never before
//! `AllowWrites`; a row is written as many times as its multiplicity.
//!
//! **Tests.** [`csv_line`] in `mod tests`; the files and answers through the socket in
//! `tests/it/exports.rs` (written only after `AllowWrites`, a dropped copy-to answers `Dropped`).

use std::fmt::Write as _;

use frontiers::Antichain;
use protocol::{ComputeResponse, CopyToResponse, Datum, GlobalId, Row};

use super::Core;
use super::catalog::ExportKind;
use crate::render::{Diff, Time, error_message};

impl Core {
    /// The sink frontier of copy-to `id` passed `upper`: once it passed the as-of its rows are complete,
    /// and are written now if writes are allowed (else on `AllowWrites`); an error among them is the
    /// answer instead.
    pub(super) fn copy_to_progressed(
        &mut self,
        id: GlobalId,
        upper: &Antichain<Time>,
        errors: &[(Row, Time, Diff)],
    ) {
        let Some(collection) = self.collections.get_mut(&id) else { return };
        if upper.less_equal(&collection.as_of) {
            return;
        }
        let sink = &mut collection.sink;
        sink.ready = true;
        if let Some((error, _, _)) = errors.first() {
            sink.done = true;
            let message = error_message(error);
            self.send(ComputeResponse::CopyToResponse { id, response: CopyToResponse::Error(message) });
        } else if *self.allow_writes.borrow() {
            self.write_copy_to(id);
        }
    }

    /// `AllowWrites` arrived: writes every copy-to whose rows are complete and not yet answered.
    pub(super) fn write_ready_copy_tos(&mut self) {
        let ready: Vec<GlobalId> = self
            .collections
            .iter()
            .filter(|(_, c)| c.sink.ready && !c.sink.done)
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            self.write_copy_to(id);
        }
    }

    /// Writes a finished copy-to's files (one per local worker) and answers with the row count.
    fn write_copy_to(&mut self, id: GlobalId) {
        let process = self.topology.process;
        let Some(collection) = self.collections.get_mut(&id) else { return };
        let ExportKind::CopyTo { directory } = &collection.kind else { return };
        let sink = &mut collection.sink;
        sink.done = true;
        let response = match write_csv_files(directory, process, &mut sink.per_worker) {
            Ok(count) => CopyToResponse::RowCount(count),
            Err(e) => CopyToResponse::Error(e),
        };
        self.send(ComputeResponse::CopyToResponse { id, response });
    }
}

/// Writes one CSV file per local worker; returns the number of rows written (with multiplicity).
fn write_csv_files(
    directory: &str,
    process: usize,
    per_worker: &mut [Vec<(Row, Time, Diff)>],
) -> Result<u64, String> {
    std::fs::create_dir_all(directory).map_err(|e| format!("creating {directory}: {e}"))?;
    let mut total = 0u64;
    for (worker, rows) in per_worker.iter_mut().enumerate() {
        let mut updates: Vec<(Row, Diff)> =
            std::mem::take(rows).into_iter().map(|(r, _, d)| (r, d)).collect();
        differential_dataflow::consolidation::consolidate(&mut updates);
        let mut text = String::new();
        for (row, diff) in &updates {
            if *diff < 0 {
                return Err(format!("row {row} has negative multiplicity {diff}"));
            }
            let line = csv_line(row);
            for _ in 0..*diff {
                text.push_str(&line);
                total += 1;
            }
        }
        let path = std::path::Path::new(directory).join(format!("part-{process}-{worker}.csv"));
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(total)
}

/// One CSV line (with newline) for a row: `NULL` is an empty field; fields with commas, quotes or line
/// breaks are quoted.
fn csv_line(row: &Row) -> String {
    let mut line = String::new();
    for (i, datum) in row.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        if datum == Datum::Null {
            continue;
        }
        let mut field = String::new();
        let _ = write!(field, "{datum}");
        if field.contains([',', '"', '\n', '\r']) || field.is_empty() {
            line.push('"');
            line.push_str(&field.replace('"', "\"\""));
            line.push('"');
        } else {
            line.push_str(&field);
        }
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use protocol::{Datum, Row};

    use super::csv_line;

    #[test]
    fn a_csv_line_leaves_null_empty_and_quotes_only_fields_that_need_it() {
        let cases: [(Vec<Datum<'_>>, &str); 5] = [
            (vec![Datum::Int64(1), Datum::Text("a")], "1,a\n"),
            (vec![Datum::Null, Datum::Int64(2), Datum::Null], ",2,\n"),
            (vec![Datum::Text("a,b"), Datum::Text("say \"hi\"")], "\"a,b\",\"say \"\"hi\"\"\"\n"),
            (vec![Datum::Text("two\nlines"), Datum::Text("cr\r")], "\"two\nlines\",\"cr\r\"\n"),
            (vec![Datum::Text(""), Datum::Null], "\"\",\n"),
        ];
        for (datums, expected) in cases {
            assert_eq!(csv_line(&Row::pack(datums.clone())), expected, "{datums:?}");
        }
    }
}
