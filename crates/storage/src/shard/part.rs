//! Batch parts: the encoding of the updates a shard keeps in [`crate::blob`], and the pure functions over
//! runs of updates (consolidation, merging with time advancement, splitting into parts).
//!
//! **Format** (version 1). `SHP` and the version byte `1` (a part of another version is refused as
//! corrupt, naming the version), then the CRC-32 of everything after it, then the number of updates,
//! then per update the row's length, the row's encoding, the time and the diff (little-endian). Updates are
//! sorted by `(row, time)`, consolidated (one entry per `(row, time)`, no zero diffs). A part is checked
//! on every read against the [`PartRef`] in the shard state (size and CRC-32 of the whole part, computed
//! once per read) and against its own header, and every row is validated: a flipped bit anywhere, a
//! truncated or swapped part, or a missing one is a [`PartError`] naming the key, never skipped data.
//! [`decode_part`] answers the updates; [`decode_part_at`] (snapshots) makes the same checks and answers
//! each row's count at a time within the part, each row lent as its place in the part's bytes: a
//! snapshot copies a row once, into the chunk it hands out, and builds no row it leaves out.
//! [`check_part`] makes every check and builds nothing (the floor the snapshot benchmark measures).
//!
//! **Compaction.** [`merge_runs`] merges the runs of consecutive batches into one, advancing each time `t`
//! to `max(t, c)` with `c = min(since, upper) - 1` (the largest time below both the shard's since and the
//! merged batch's upper). Readers are unaffected: a snapshot at `as_of >= since` includes `t` iff it
//! includes the advanced time (`c < as_of`), and a listener that delivered everything before `p >= since`
//! filters `t < p` iff it filters the advanced time; times stay inside the batch's range.
//!
//! **Tests.** Unit tests below; the shard model test (`tests/it/shard_model.rs`) and the fault tests.

use std::cmp::Ordering;

use bytes::{BufMut, Bytes, BytesMut};
use frontiers::Antichain;
use protocol::{Diff, Row, RowRef};

use crate::shard::state::PartRef;

/// One update.
pub type Update = (Row, u64, Diff);

const MAGIC: &[u8; 4] = b"SHP1";
const HEADER_BYTES: usize = 4 + 4 + 8;

/// A run of updates: sorted by `(row, time)`, consolidated, with its count bound (the largest sum of
/// `|diff|` over one row's updates).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Run {
    /// The updates.
    pub updates: Vec<Update>,
    /// The count bound.
    pub count_bound: u64,
}

/// Why updates could not be made into a run: some row's multiplicities overflow `i64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overflow {
    /// The row, printed.
    pub row: String,
}

/// Sorts and consolidates `updates` into a run; refuses if a `(row, time)`'s diffs, or the sum of a row's
/// `|diff|`s, overflow `i64`.
pub fn consolidate_run(mut updates: Vec<Update>) -> Result<Run, Overflow> {
    updates.sort_unstable_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut out: Vec<Update> = Vec::with_capacity(updates.len());
    for (row, time, diff) in updates {
        match out.last_mut() {
            Some(last) if last.0 == row && last.1 == time => {
                last.2 = last.2.checked_add(diff).ok_or_else(|| Overflow { row: row.to_string() })?;
            }
            _ => out.push((row, time, diff)),
        }
    }
    out.retain(|u| u.2 != 0);
    let count_bound = count_bound(&out).ok_or_else(|| Overflow { row: largest_row(&out) })?;
    Ok(Run { updates: out, count_bound })
}

/// The largest sum of `|diff|` over one row's updates of a sorted run; `None` if it exceeds `i64::MAX`.
fn count_bound(sorted: &[Update]) -> Option<u64> {
    let mut bound: u128 = 0;
    let mut i = 0;
    while i < sorted.len() {
        let mut sum: u128 = 0;
        let mut j = i;
        while j < sorted.len() && sorted[j].0 == sorted[i].0 {
            sum += u128::from(sorted[j].2.unsigned_abs());
            j += 1;
        }
        bound = bound.max(sum);
        i = j;
    }
    (bound <= i64::MAX as u128).then_some(bound as u64)
}

fn largest_row(sorted: &[Update]) -> String {
    sorted.iter().max_by_key(|u| u.2.unsigned_abs()).map(|u| u.0.to_string()).unwrap_or_default()
}

/// The time compaction advances `time` to in a merged batch ending at `upper`, for the shard's `since`.
pub fn advance(time: u64, since: &Antichain<u64>, upper: &Antichain<u64>) -> u64 {
    let bound = match (since.as_option(), upper.as_option()) {
        (Some(s), Some(u)) => (*s).min(*u),
        (Some(s), None) => *s,
        (None, Some(u)) => *u,
        (None, None) => u64::MAX,
    };
    time.max(bound.saturating_sub(1))
}

/// Merges the runs of consecutive batches into one run ending at `upper`, advancing times for `since`
/// (see the module documentation). The shard's count bound guarantees no overflow, which is asserted.
pub fn merge_runs(runs: Vec<Vec<Update>>, since: &Antichain<u64>, upper: &Antichain<u64>) -> Run {
    let total = runs.iter().map(Vec::len).sum();
    let mut all = Vec::with_capacity(total);
    for run in runs {
        all.extend(run.into_iter().map(|(row, time, diff)| (row, advance(time, since, upper), diff)));
    }
    consolidate_run(all).unwrap_or_else(|overflow| {
        panic!("the shard's count bound rules out overflow in a merge, but row {} overflowed", overflow.row)
    })
}

/// The encoded size of one update.
pub fn encoded_len(update: &Update) -> usize {
    4 + update.0.byte_len() + 16
}

/// Splits a run into chunks of about `target_bytes` encoded bytes each (at least one update each).
pub fn split_run(updates: Vec<Update>, target_bytes: usize) -> Vec<Vec<Update>> {
    let mut chunks = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for update in updates {
        bytes += encoded_len(&update);
        chunk.push(update);
        if bytes >= target_bytes {
            chunks.push(std::mem::take(&mut chunk));
            bytes = 0;
        }
    }
    if !chunk.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

/// Encodes a sorted, consolidated chunk of a run.
pub fn encode_part(updates: &[Update]) -> Bytes {
    let body: usize = updates.iter().map(encoded_len).sum();
    let mut out = BytesMut::with_capacity(HEADER_BYTES + body);
    out.put_slice(MAGIC);
    out.put_u32_le(0);
    out.put_u64_le(updates.len() as u64);
    for (row, time, diff) in updates {
        let len = u32::try_from(row.byte_len()).expect("a row is far smaller than 4 GiB");
        out.put_u32_le(len);
        out.put_slice(row.as_bytes());
        out.put_u64_le(*time);
        out.put_i64_le(*diff);
    }
    let crc = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out.freeze()
}

/// The [`PartRef`] of an encoded part stored at `key`.
pub fn part_ref(key: String, bytes: &Bytes, updates: u64) -> PartRef {
    PartRef { key, bytes: bytes.len() as u64, updates, checksum: crc32fast::hash(bytes), inline: None }
}

/// The [`PartRef`] of an encoded part carried inline in the state under the name `key`.
pub fn inline_part_ref(key: String, bytes: &Bytes, updates: u64) -> PartRef {
    PartRef { inline: Some(bytes.clone()), ..part_ref(key, bytes, updates) }
}

/// Why a part could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartError {
    /// The blob has no such key.
    #[error("part {key} is missing from the blob store")]
    Missing {
        /// The key.
        key: String,
    },
    /// The bytes are not what the state recorded, or do not decode.
    #[error("part {key} is corrupt: {detail}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        detail: String,
    },
}

/// Compares two rows' encodings as byte strings (the order of a part's updates and of a snapshot's rows)
/// by their [`abbreviated_key`]s first: rows that differ early, as most do, compare without a call to
/// `memcmp`. Answers what `a.cmp(b)` answers.
#[inline]
pub(crate) fn cmp_encodings(a: &[u8], b: &[u8]) -> Ordering {
    match (a.first_chunk::<8>(), b.first_chunk::<8>()) {
        (Some(x), Some(y)) => match u64::from_be_bytes(*x).cmp(&u64::from_be_bytes(*y)) {
            Ordering::Equal => a[8..].cmp(&b[8..]),
            unequal => unequal,
        },
        _ => a.cmp(b),
    }
}

/// Whether an update of `row` at `time` continues the row of the `last` update, or `None` if it is out
/// of order: a part's updates are in `(row, time)` order, each pair once.
#[inline]
fn continues(last: Option<(&[u8], u64)>, row: &[u8], time: u64) -> Option<bool> {
    let Some((last_row, last_time)) = last else { return Some(false) };
    match cmp_encodings(last_row, row) {
        Ordering::Less => Some(false),
        Ordering::Equal => (last_time < time).then_some(true),
        Ordering::Greater => None,
    }
}

/// An update as a part holds it: the row's encoding, the time and the diff.
type RawUpdate<'a> = (&'a [u8], u64, Diff);

/// A part whose size, checksum and header were checked, read update by update without copying.
struct RawPart<'a> {
    key: &'a str,
    /// The bytes after the updates read so far.
    rest: &'a [u8],
    left: u64,
}

impl<'a> RawPart<'a> {
    /// Checks `bytes` against `part` (size, CRC-32 of the whole part, header, number of updates).
    fn open(part: &'a PartRef, bytes: &'a [u8]) -> Result<Self, PartError> {
        let corrupt = |detail: String| PartError::Corrupt { key: part.key.clone(), detail };
        if bytes.len() as u64 != part.bytes {
            return Err(corrupt(format!("{} bytes, the state records {}", bytes.len(), part.bytes)));
        }
        let checksum = crc32fast::hash(bytes);
        if checksum != part.checksum {
            return Err(corrupt(format!("checksum {checksum:08x}, the state records {:08x}", part.checksum)));
        }
        if bytes.len() < HEADER_BYTES || bytes[..3] != MAGIC[..3] {
            return Err(corrupt("not a part (bad header)".into()));
        }
        if bytes[3] != MAGIC[3] {
            return Err(corrupt(format!("unknown part format version {:?}", char::from(bytes[3]))));
        }
        // The embedded checksum is not recomputed: the bytes equal the ones written (checksum of the whole
        // part above), and the writer computed it over them. It serves tools reading a part without its
        // state.
        let count = u64::from_le_bytes(bytes[8..16].try_into().expect("eight bytes"));
        if count != part.updates {
            return Err(corrupt(format!("{count} updates, the state records {}", part.updates)));
        }
        if count > (bytes.len() / 20) as u64 {
            return Err(corrupt(format!("{count} updates cannot fit in {} bytes", bytes.len())));
        }
        Ok(RawPart { key: &part.key, rest: &bytes[HEADER_BYTES..], left: count })
    }

    /// At most this many updates are left (allocation hint).
    fn len(&self) -> usize {
        usize::try_from(self.left).expect("bounded by the part's size")
    }

    #[cold]
    fn corrupt(&self, detail: &str) -> PartError {
        PartError::Corrupt { key: self.key.to_owned(), detail: detail.to_owned() }
    }

    /// The next update (row encoding, time, diff; the diff is never zero), or `None` after the last, when
    /// the part must also end.
    #[inline]
    fn next(&mut self) -> Result<Option<RawUpdate<'a>>, PartError> {
        if self.left == 0 {
            if !self.rest.is_empty() {
                return Err(self.corrupt("trailing bytes"));
            }
            return Ok(None);
        }
        self.left -= 1;
        let Some((row, time, diff, rest)) = split_update(self.rest) else {
            return Err(self.corrupt("truncated"));
        };
        self.rest = rest;
        if diff == 0 {
            return Err(self.corrupt("a zero diff"));
        }
        Ok(Some((row, time, diff)))
    }
}

/// A row from a part, validated like every row read from a part ([`RowRef::from_bytes`]), not copied.
#[inline]
fn lent_row<'a>(raw: &RawPart<'_>, bytes: &'a [u8]) -> Result<RowRef<'a>, PartError> {
    RowRef::from_bytes(bytes).map_err(|e| raw.corrupt(&format!("bad row: {e}")))
}

/// Checks a part against its [`PartRef`] and visits its updates in order, each row validated (see the
/// module documentation): `visit` is called with each update once every check before it passed, and
/// the part is refused at the first damage found (a visit may have happened for the updates before it).
fn walk_part<'a>(
    part: &'a PartRef,
    bytes: &'a [u8],
    mut visit: impl FnMut(RowRef<'a>, u64, Diff),
) -> Result<(), PartError> {
    let mut raw = RawPart::open(part, bytes)?;
    let mut last: Option<(&[u8], u64)> = None;
    while let Some((row, time, diff)) = raw.next()? {
        if continues(last, row, time).is_none() {
            return Err(raw.corrupt("updates out of order"));
        }
        last = Some((row, time));
        visit(lent_row(&raw, row)?, time, diff);
    }
    Ok(())
}

/// Decodes and checks a part against its [`PartRef`] (see the module documentation).
pub fn decode_part(part: &PartRef, bytes: &[u8]) -> Result<Vec<Update>, PartError> {
    let mut updates: Vec<Update> = Vec::new();
    walk_part(part, bytes, |row, time, diff| {
        if updates.capacity() == 0 {
            // The first update: the part's header passed its checks, so its number of updates fits in
            // its bytes.
            updates.reserve_exact(usize::try_from(part.updates).expect("bounded by the part's size"));
        }
        updates.push((row.to_row(), time, diff));
    })?;
    Ok(updates)
}

/// Makes every check [`decode_part`] makes (size and checksum against the state's record, header,
/// order, framing, every row validated) and builds nothing: answers the part's number of updates, or
/// the same error `decode_part` answers. It is the least any reader of a part must do before it trusts a
/// row of it, which is what the snapshot benchmark measures as the floor of the checks.
///
/// # Examples
/// ```
/// use protocol::{Datum, Row};
/// use storage::shard::part::{check_part, encode_part, part_ref};
/// let bytes = encode_part(&[(Row::pack([Datum::Int64(1)]), 0, 1), (Row::pack([Datum::Int64(2)]), 0, -1)]);
/// let part = part_ref("u1/p".into(), &bytes, 2);
/// assert_eq!(check_part(&part, &bytes), Ok(2));
/// let mut flipped = bytes.to_vec();
/// flipped[20] ^= 1;
/// assert!(check_part(&part, &flipped).is_err());
/// ```
pub fn check_part(part: &PartRef, bytes: &[u8]) -> Result<u64, PartError> {
    let mut updates = 0u64;
    walk_part(part, bytes, |_, _, _| updates += 1)?;
    Ok(updates)
}

/// A row of a part decoded at a time, lent out of the part's bytes: where its encoding is, its count,
/// and its abbreviated key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LentRow {
    /// Where the row's encoding starts in the part's bytes.
    pub start: usize,
    /// Where it ends.
    pub end: usize,
    /// The row's count.
    pub count: Diff,
    /// The row's first eight bytes as one big-endian integer, zeros after a shorter row's end
    /// ([`abbreviated_key`]).
    pub key: u64,
}

/// A row's abbreviated key: its encoding's first eight bytes as one big-endian integer, zeros after a
/// shorter encoding's end. Rows whose keys differ compare as their keys do, so that a merge compares
/// most rows without reading their bytes (a sort's abbreviated keys, as in PostgreSQL); rows whose keys
/// are equal compare by their encodings' bytes. (A key differs first at some byte: where
/// both rows have bytes, that is where the rows differ; where one has ended, the zero of the shorter is
/// below the longer's byte there, and the shorter, a prefix of the longer, is below it too.)
#[inline]
pub fn abbreviated_key(encoding: &[u8]) -> u64 {
    match encoding.first_chunk::<8>() {
        Some(first) => u64::from_be_bytes(*first),
        None => {
            let mut first = [0; 8];
            first[..encoding.len()].copy_from_slice(encoding);
            u64::from_be_bytes(first)
        }
    }
}

/// Decodes and checks a part like [`decode_part`] (every check of it, every update read, every row
/// validated), answering instead (in `rows`, a buffer to reuse, cleared first) each row's count at
/// `as_of` within this part: the sum of its diffs at times `<= as_of`, in row order, rows whose count
/// is zero left out. The rows are lent, not copied: each is its place in `bytes` ([`LentRow`]). A row's
/// updates may continue in the next part of the run; the reader sums across the boundary.
pub fn decode_part_at(
    part: &PartRef,
    bytes: &[u8],
    as_of: u64,
    mut rows: Vec<LentRow>,
) -> Result<Vec<LentRow>, PartError> {
    let raw = RawPart::open(part, bytes)?;
    rows.clear();
    rows.reserve(raw.len());
    let base = bytes.as_ptr() as usize;
    let mut rest = raw.rest;
    // Each row is pushed at its first update and later ones add to its count; a row whose count may
    // end at zero (diffs that cancel at `as_of`, or all after it) sets `zeros`, and such rows are
    // removed at the end. The loop keeps the last row's key and time in registers: a row whose key is
    // above the last one's, the common case, is new without reading the last row.
    let mut zeros = false;
    let (mut last_key, mut last_time) = (0u64, 0u64);
    for _ in 0..raw.left {
        let Some((row, time, diff, after)) = split_update(rest) else {
            return Err(raw.corrupt("truncated"));
        };
        rest = after;
        if diff == 0 {
            return Err(raw.corrupt("a zero diff"));
        }
        let count = if time <= as_of { diff } else { 0 };
        let key = abbreviated_key(row);
        if key <= last_key
            && let Some(last) = rows.last_mut()
        {
            let last_row = &bytes[last.start..last.end];
            match key.cmp(&last_key).then_with(|| row.cmp(last_row)) {
                Ordering::Greater => {}
                Ordering::Equal if last_time < time => {
                    last.count =
                        last.count.checked_add(count).ok_or_else(|| raw.corrupt("a count overflows"))?;
                    zeros |= last.count == 0;
                    last_time = time;
                    continue;
                }
                _ => return Err(raw.corrupt("updates out of order")),
            }
        }
        lent_row(&raw, row)?;
        zeros |= count == 0;
        let start = row.as_ptr() as usize - base;
        rows.push(LentRow { start, end: start + row.len(), count, key });
        (last_key, last_time) = (key, time);
    }
    if !rest.is_empty() {
        return Err(raw.corrupt("trailing bytes"));
    }
    if zeros {
        rows.retain(|row| row.count != 0);
    }
    Ok(rows)
}

/// The first update of `rest` (row encoding, time, diff) and the bytes after it; `None` if truncated.
#[inline(always)]
fn split_update(rest: &[u8]) -> Option<(&[u8], u64, Diff, &[u8])> {
    let (len, after) = rest.split_first_chunk::<4>()?;
    let (row, after) = after.split_at_checked(u32::from_le_bytes(*len) as usize)?;
    let (fixed, after) = after.split_first_chunk::<16>()?;
    let time = u64::from_le_bytes(fixed[..8].try_into().expect("eight bytes"));
    let diff = i64::from_le_bytes(fixed[8..].try_into().expect("eight bytes"));
    Some((row, time, diff, after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Datum;

    fn row(x: i64) -> Row {
        Row::pack([Datum::Int64(x)])
    }

    #[test]
    fn consolidation_sorts_sums_drops_zeros_and_bounds_counts() {
        let run = consolidate_run(vec![
            (row(2), 1, 1),
            (row(1), 5, 3),
            (row(2), 1, 1),
            (row(1), 4, -1),
            (row(3), 0, 1),
            (row(3), 0, -1),
        ])
        .unwrap();
        assert_eq!(run.updates, vec![(row(1), 4, -1), (row(1), 5, 3), (row(2), 1, 2)]);
        assert_eq!(run.count_bound, 4);
    }

    #[test]
    fn overflowing_multiplicities_are_refused() {
        let cases = [
            vec![(row(1), 0, i64::MAX), (row(1), 0, 1)],
            vec![(row(1), 0, i64::MAX), (row(1), 1, 1)],
            vec![(row(1), 0, i64::MIN), (row(1), 1, -1)],
        ];
        for case in cases {
            assert_eq!(consolidate_run(case), Err(Overflow { row: row(1).to_string() }));
        }
        assert!(consolidate_run(vec![(row(1), 0, i64::MAX), (row(2), 0, i64::MAX)]).is_ok());
    }

    #[test]
    fn merging_advances_times_below_the_since_and_keeps_them_inside_the_batch() {
        let since = Antichain::from_elem(10);
        assert_eq!(advance(3, &since, &Antichain::from_elem(20)), 9);
        assert_eq!(advance(15, &since, &Antichain::from_elem(20)), 15);
        assert_eq!(advance(3, &since, &Antichain::from_elem(6)), 5, "capped below the batch's upper");
        assert_eq!(advance(3, &Antichain::from_elem(0), &Antichain::from_elem(6)), 3);
        let run = merge_runs(
            vec![vec![(row(1), 1, 1), (row(2), 2, 1)], vec![(row(1), 7, 1), (row(2), 12, -1)]],
            &since,
            &Antichain::from_elem(20),
        );
        assert_eq!(run.updates, vec![(row(1), 9, 2), (row(2), 9, 1), (row(2), 12, -1)]);
    }

    #[test]
    fn parts_round_trip_and_every_flipped_bit_is_detected() {
        let updates = vec![(row(1), 3, 2), (row(5), 1, -1), (row(5), 4, 7)];
        let bytes = encode_part(&updates);
        let part = part_ref("u1/p".into(), &bytes, 3);
        assert_eq!(decode_part(&part, &bytes).unwrap(), updates);
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.to_vec();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(decode_part(&part, &flipped), Err(PartError::Corrupt { .. })), "bit {bit}");
            assert_eq!(check_part(&part, &flipped), decode_part(&part, &flipped).map(|_| 3), "bit {bit}");
        }
        assert_eq!(check_part(&part, &bytes), Ok(3));
        assert!(decode_part(&part, &bytes[..bytes.len() - 1]).is_err());
        let mut bad_header = part.clone();
        bad_header.updates = 2;
        assert!(decode_part(&bad_header, &bytes).is_err());
    }

    /// The naive count of each row at `as_of` from decoded updates (shares nothing with the decoder
    /// but the full decode).
    fn naive_at(updates: &[Update], as_of: u64) -> Vec<(Row, Diff)> {
        let mut counts: std::collections::BTreeMap<Row, Diff> = std::collections::BTreeMap::new();
        for (row, time, diff) in updates {
            if *time <= as_of {
                *counts.entry(row.clone()).or_default() += diff;
            }
        }
        counts.into_iter().filter(|(_, count)| *count != 0).collect()
    }

    #[test]
    fn a_part_decoded_at_a_time_holds_each_rows_count_at_that_time() {
        let updates = vec![
            (row(1), 3, 2),
            (row(1), 5, -2),
            (row(2), 0, 1),
            (row(5), 1, -1),
            (row(5), 4, 7),
            (row(9), 6, 1),
        ];
        let bytes = encode_part(&updates);
        let part = part_ref("u1/p".into(), &bytes, updates.len() as u64);
        // The lent rows as owned rows: each place in the part's bytes must hold the row's encoding.
        let owned = |lent: &[LentRow]| -> Vec<(Row, Diff)> {
            lent.iter()
                .map(|lent| {
                    let encoding = &bytes[lent.start..lent.end];
                    assert_eq!(lent.key, abbreviated_key(encoding));
                    (Row::from_bytes(encoding).unwrap(), lent.count)
                })
                .collect()
        };
        let mut buffer = vec![LentRow { start: 1, end: 2, count: 1, key: 0 }];
        for as_of in 0..8 {
            buffer = decode_part_at(&part, &bytes, as_of, buffer).unwrap();
            assert_eq!(owned(&buffer), naive_at(&updates, as_of), "at {as_of}");
        }
        let at_5 = decode_part_at(&part, &bytes, 5, Vec::new()).unwrap();
        assert_eq!(owned(&at_5), vec![(row(2), 1), (row(5), 6)]);
    }

    #[test]
    fn a_damaged_part_decoded_at_a_time_is_a_typed_error_never_a_panic() {
        let updates = vec![(row(1), 3, 2), (row(5), 1, -1), (row(5), 4, 7)];
        let bytes = encode_part(&updates);
        let part = part_ref("u1/p".into(), &bytes, 3);
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.to_vec();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let result = decode_part_at(&part, &flipped, 9, Vec::new());
            assert!(matches!(result, Err(PartError::Corrupt { ref key, .. }) if key == "u1/p"), "bit {bit}");
        }
        for len in 0..bytes.len() {
            let truncated = &bytes[..len];
            let part = part_ref("u1/p".into(), &Bytes::copy_from_slice(truncated), 3);
            assert!(matches!(
                decode_part_at(&part, truncated, 9, Vec::new()),
                Err(PartError::Corrupt { .. })
            ));
            assert!(matches!(decode_part(&part, truncated), Err(PartError::Corrupt { .. })));
        }
    }

    /// Damage the checksum cannot see (the state's record describes the damaged bytes, as if written so):
    /// the structural checks still refuse it by name.
    #[test]
    fn a_consistently_recorded_malformed_part_is_refused_by_its_structure() {
        let updates = vec![(row(1), 3, 2), (row(5), 1, -1)];
        let good = encode_part(&updates).to_vec();
        let refused = |bytes: Vec<u8>, detail: &str| {
            let bytes = Bytes::from(bytes);
            let part = part_ref("u1/p".into(), &bytes, u64::from_le_bytes(bytes[8..16].try_into().unwrap()));
            for result in [
                decode_part(&part, &bytes).map(|_| ()),
                check_part(&part, &bytes).map(|_| ()),
                decode_part_at(&part, &bytes, 9, Vec::new()).map(|_| ()),
            ] {
                match result {
                    Err(PartError::Corrupt { detail: got, .. }) => assert!(got.contains(detail), "{got}"),
                    other => panic!("expected corrupt ({detail}), got {other:?}"),
                }
            }
        };
        let mut version = good.clone();
        version[3] = b'9';
        refused(version, "unknown part format version");
        let swapped = encode_part(&[(row(5), 1, -1), (row(1), 3, 2)]).to_vec();
        refused(swapped, "out of order");
        let mut zero = good.clone();
        let diff_at = 16 + 4 + row(1).byte_len() + 8;
        zero[diff_at..diff_at + 8].copy_from_slice(&0i64.to_le_bytes());
        refused(zero, "zero diff");
        let mut count = good.clone();
        count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        refused(count, "cannot fit");
        let mut long = good;
        long[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        refused(long, "truncated");
        let mut bad_row = encode_part(&[(row(1), 3, 2)]).to_vec();
        bad_row[20] = 99;
        refused(bad_row, "bad row");
    }

    /// A row of the proptest below: small integers, and texts that share their first eight bytes (so
    /// that rows compare past their abbreviated keys).
    fn any_row() -> impl proptest::strategy::Strategy<Value = Row> {
        use proptest::prelude::*;
        prop_oneof![
            (0i64..6).prop_map(row),
            (0u8..4).prop_map(|x| Row::pack([Datum::Text(&format!("a shared prefix {x}"))])),
        ]
    }

    proptest::proptest! {
        #[test]
        fn any_part_decoded_at_any_time_holds_the_naive_counts(
            updates in proptest::collection::vec((any_row(), 0u64..6, -2i64..3), 0..40),
            as_of in 0u64..7,
        ) {
            let run = consolidate_run(updates).unwrap().updates;
            let bytes = encode_part(&run);
            let part = part_ref("u1/p".into(), &bytes, run.len() as u64);
            let lent = decode_part_at(&part, &bytes, as_of, Vec::new()).unwrap();
            let decoded: Vec<(Row, Diff)> = lent
                .iter()
                .map(|lent| (Row::from_bytes(&bytes[lent.start..lent.end]).unwrap(), lent.count))
                .collect();
            proptest::prop_assert_eq!(decoded, naive_at(&run, as_of));
        }

        #[test]
        fn encodings_compare_as_their_bytes_do(
            a in proptest::collection::vec(0u8..4, 0..20),
            b in proptest::collection::vec(0u8..4, 0..20),
        ) {
            proptest::prop_assert_eq!(cmp_encodings(&a, &b), a.cmp(&b));
        }

        #[test]
        fn rows_whose_abbreviated_keys_differ_compare_as_their_keys(
            a in proptest::collection::vec(0u8..3, 0..12),
            b in proptest::collection::vec(0u8..3, 0..12),
        ) {
            let (key_a, key_b) = (abbreviated_key(&a), abbreviated_key(&b));
            if key_a != key_b {
                proptest::prop_assert_eq!(key_a.cmp(&key_b), a.cmp(&b));
            }
            if a.cmp(&b).is_eq() {
                proptest::prop_assert_eq!(key_a, key_b);
            }
        }
    }

    #[test]
    fn a_run_splits_into_parts_of_about_the_target_size() {
        let updates: Vec<Update> = (0..100).map(|x| (row(x), 0, 1)).collect();
        let one = encoded_len(&updates[0]);
        let chunks = split_run(updates.clone(), one * 10);
        assert_eq!(chunks.len(), 10);
        assert_eq!(chunks.concat(), updates);
        assert_eq!(split_run(updates, usize::MAX).len(), 1);
        assert!(split_run(Vec::new(), 10).is_empty());
    }
}
