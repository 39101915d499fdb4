//! What a peek means, shared by the model replicas and the oracle: the rows of a collection's contents
//! that a peek selects (key lookup, map/filter/project with `protocol::reference::map_filter_project`,
//! finishing), and which process of a multi-process replica owns a row.
//!
//! **Shared, on purpose.** The model and the oracle differ in where contents come from (the model:
//! storage as it compacts and its own installed dataflows; the oracle: its own full log), not in what a
//! peek means. The map/filter/project and the finishing are the reference interpreter's own
//! (`protocol::reference`), which shares no evaluation with the replica or with the controller's
//! `RowSetFinishing::finish`; the model and the oracle share them with each other, so a bug in them is
//! invisible to `sim simulate` alone: `--real-compute` compares the real replica with this code, and
//! `protocol`'s SQLite test is the independent check of the reference itself.
//!
//! **Tests:** through the simulator (`tests/it/`).

use std::num::NonZeroU64;

use protocol::reference::{Multiset, finish, map_filter_project};
use protocol::{Datum, MapFilterProject, Row, RowSetFinishing};

/// Which process of a multi-process replica owns a row (a stable hash, the same in every run).
pub fn owner(row: &Row, processes: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in row.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % processes as u64) as usize
}

/// A peek's rows from a collection's contents: key lookup, map/filter/project, finishing. With `part =
/// Some((process, processes))` only the rows that process owns, with the finishing a part gets
/// (`RowSetFinishing::partial`: no offset, a limit of offset + limit), as a replica process answers.
pub fn peek_rows(
    contents: &Multiset,
    key: &[usize],
    constraints: Option<&[Row]>,
    mfp: &MapFilterProject,
    finishing: &RowSetFinishing,
    part: Option<(usize, usize)>,
) -> Result<Vec<(Row, NonZeroU64)>, String> {
    let mut selected = Multiset::new();
    for (row, diff) in contents {
        if let Some((process, processes)) = part
            && owner(row, processes) != process
        {
            continue;
        }
        if let Some(constraints) = constraints {
            let datums = row.unpack();
            let row_key = Row::pack(key.iter().map(|c| datums.get(*c).copied().unwrap_or(Datum::Null)));
            if !constraints.contains(&row_key) {
                continue;
            }
        }
        selected.insert(row.clone(), *diff);
    }
    let mapped = map_filter_project(mfp, &selected).map_err(|e| e.to_string())?;
    let mut rows = Vec::with_capacity(mapped.len());
    for (row, diff) in mapped {
        if diff < 0 {
            return Err(format!("negative multiplicity {diff} for {row}"));
        }
        rows.push((row, NonZeroU64::new(diff as u64).expect("consolidated")));
    }
    Ok(match part {
        Some(_) => finish(&finishing.partial(), rows),
        None => finish(finishing, rows),
    })
}
