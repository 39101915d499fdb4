//! Copy-to: writing a finished copy-to's rows as CSV files and answering with the row count.
//!
//! **What this is.** A copy-to's rows are merged per local worker (`sinks.rs`); once the sink frontier
//! passed the dataflow's as-of, the snapshot is complete ([`Core::copy_to_progressed`]) and, once
//! `AllowWrites` arrived ([`Core::write_ready_copy_tos`]), each process writes one file per local worker,
//! `part-{process}-{worker}.csv`, into the copy-to's directory, and answers with its row count (the
//! controller sums the processes'). An error in the snapshot, a negative multiplicity or a failed write
//! is answered as `CopyToResponse::Error`. The files are written on a blocking-pool thread, streamed
//! line by line (never the whole file in memory), so the core goes on serving its connection and
//! workers meanwhile; the answer comes back as `CoreEvent::CopyToWritten`. A copy-to dropped while
//! its files are written is answered `Dropped` at once; what was written stays (the write is not
//! undone).
//!
//! **What this is not.** Not a storage write: the files are local to the process, outside `storage`.
//!
//! **Invariants.** A copy-to is answered exactly once (`done`, and `writing` until its files are written
//! or it is dropped), and never before `AllowWrites`; a row is written as many times as its multiplicity.
//!
//! **Tests.** [`csv_line`] in `mod tests`; the files and answers through the socket in
//! `tests/it/exports.rs` (written only after `AllowWrites`, a dropped copy-to answers `Dropped`).

use std::fmt::Write as _;
use std::io::Write as _;

use frontiers::Antichain;
use protocol::{ComputeResponse, CopyToResponse, Datum, GlobalId, Row};

use tracing::debug;

use super::catalog::ExportKind;
use super::{Core, CoreEvent};
use crate::messages::DataflowKey;
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

    /// Starts writing a finished copy-to's files (one per local worker) off the core's thread; the row
    /// count (or the error) comes back as `CoreEvent::CopyToWritten`.
    fn write_copy_to(&mut self, id: GlobalId) {
        let process = self.topology.process;
        let Some(collection) = self.collections.get_mut(&id) else { return };
        let ExportKind::CopyTo { directory } = &collection.kind else { return };
        let directory = directory.clone();
        let sink = &mut collection.sink;
        assert!(!sink.done && !sink.writing, "copy-to {id} is written once");
        sink.done = true;
        sink.writing = true;
        let per_worker = std::mem::take(&mut sink.per_worker);
        let key = collection.dataflow;
        let events = self.events.clone();
        tokio::spawn(async move {
            let written =
                tokio::task::spawn_blocking(move || write_csv_files(&directory, process, per_worker)).await;
            let response = match written {
                Ok(Ok(count)) => CopyToResponse::RowCount(count),
                Ok(Err(e)) => CopyToResponse::Error(e),
                Err(e) => CopyToResponse::Error(format!("writing the files failed: {e}")),
            };
            // Fails only once the core is gone, and with it whoever would hear of it.
            let _ = events.send(CoreEvent::CopyToWritten { key, id, response });
        });
    }

    /// Copy-to `id` of dataflow `key` has its files written (or not): its answer, unless it was dropped
    /// meanwhile (and answered `Dropped` then).
    pub(super) fn copy_to_written(&mut self, key: DataflowKey, id: GlobalId, response: CopyToResponse) {
        match self.collections.get_mut(&id) {
            Some(collection) if collection.dataflow == key && collection.sink.writing => {
                collection.sink.writing = false;
                self.send(ComputeResponse::CopyToResponse { id, response });
            }
            _ => debug!(%id, ?response, "a copy-to's files were written after it was dropped"),
        }
    }
}

/// Writes one CSV file per local worker, line by line; returns the number of rows written (with
/// multiplicity).
fn write_csv_files(
    directory: &str,
    process: usize,
    per_worker: Vec<Vec<(Row, Time, Diff)>>,
) -> Result<u64, String> {
    std::fs::create_dir_all(directory).map_err(|e| format!("creating {directory}: {e}"))?;
    let mut total = 0u64;
    for (worker, rows) in per_worker.into_iter().enumerate() {
        let mut updates: Vec<(Row, Diff)> = rows.into_iter().map(|(r, _, d)| (r, d)).collect();
        differential_dataflow::consolidation::consolidate(&mut updates);
        if let Some((row, diff)) = updates.iter().find(|(_, diff)| *diff < 0) {
            return Err(format!("row {row} has negative multiplicity {diff}"));
        }
        let path = std::path::Path::new(directory).join(format!("part-{process}-{worker}.csv"));
        let failed = |e: std::io::Error| format!("writing {}: {e}", path.display());
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).map_err(failed)?);
        for (row, diff) in &updates {
            let line = csv_line(row);
            for _ in 0..*diff {
                file.write_all(line.as_bytes()).map_err(failed)?;
                total += 1;
            }
        }
        file.flush().map_err(failed)?;
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
