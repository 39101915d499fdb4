//! Peeks of storage collections: answered from a storage snapshot at the peek's time, in the
//! controller's process, with the peek's map/filter/project and finishing applied.
//!
//! **Tests:** `tests/it/e2e.rs` and `tests/it/api_errors.rs`.

use std::collections::BTreeMap;
use std::num::NonZeroU64;

use protocol::{Diff, GlobalId, PeekResponse, Row};
use storage::StorageCollections;

use crate::clock::Timestamp;
use crate::instance::PeekOptions;

/// The answer of a peek of storage collection `id` at `timestamp`.
pub(crate) async fn storage_peek(
    storage: &dyn StorageCollections,
    id: GlobalId,
    timestamp: Timestamp,
    options: PeekOptions,
) -> PeekResponse {
    let rows = match storage.snapshot(id, timestamp).await {
        Ok(rows) => rows,
        Err(e) => return PeekResponse::Error(e.to_string()),
    };
    let mut out: BTreeMap<Row, Diff> = BTreeMap::new();
    for (row, diff) in rows {
        let row = match &options.map_filter_project {
            None => Some(row),
            Some(mfp) => match mfp.apply(&row) {
                Ok(row) => row,
                Err(e) => return PeekResponse::Error(e.to_string()),
            },
        };
        if let Some(row) = row {
            *out.entry(row).or_insert(0) += diff;
        }
    }
    let mut rows = Vec::with_capacity(out.len());
    for (row, diff) in out {
        match diff {
            0 => {}
            d if d < 0 => return PeekResponse::Error(format!("negative multiplicity {d} for {row}")),
            d => rows.push((row, NonZeroU64::new(d as u64).expect("positive"))),
        }
    }
    PeekResponse::Rows(options.finishing.finish(rows))
}
