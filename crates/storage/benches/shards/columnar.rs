//! A what-if part format for the snapshot benchmark's rows (`Int64`, `Text`), measured only: the updates
//! a column at a time (the keys, the texts' ends, the texts, the times, the diffs) instead of row after
//! row, so that its checks run over whole columns (one UTF-8 check of all the texts, no per-row framing).
//!
//! **What this is.** The answer to "would another part format lift the floor of the checks?": the bench
//! writes a columnar copy of every part of the snapshot and reads it back with the checks a reader of
//! such a part must make before it trusts a row (checksum, sizes, every text's bounds and UTF-8, no zero
//! diff, rows in order), two parts at a time, as the row format's floor is measured.
//!
//! **What this is not.** A format the engine reads or writes: it knows two column types and no nulls, so
//! it is the most favourable case for a columnar format, not a design for one.

use bytes::Bytes;
use protocol::{Datum, Diff, Row};

const MAGIC: &[u8; 4] = b"COL1";

/// The columnar encoding of a part's updates (rows of an `Int64` and a `Text`, in the part's order).
pub fn encode(updates: &[(Row, u64, Diff)]) -> Bytes {
    let n = updates.len();
    let mut keys = Vec::with_capacity(8 * n);
    let mut ends = Vec::with_capacity(4 * n);
    let mut texts = Vec::new();
    for (row, _, _) in updates {
        let mut datums = row.iter();
        let (Some(Datum::Int64(key)), Some(Datum::Text(text)), None) =
            (datums.next(), datums.next(), datums.next())
        else {
            panic!("the snapshot benchmark's rows are an Int64 and a Text");
        };
        // A text's length is then one byte of the row's encoding, so that rows sort by it as a number.
        assert!(text.len() < 0x80, "the snapshot benchmark's texts are short");
        keys.extend_from_slice(&key.to_le_bytes());
        texts.extend_from_slice(text.as_bytes());
        ends.extend_from_slice(&u32::try_from(texts.len()).expect("a part is far below 4 GiB").to_le_bytes());
    }
    let mut out = Vec::with_capacity(12 + keys.len() + ends.len() + texts.len() + 16 * n);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(n as u64).to_le_bytes());
    out.extend_from_slice(&keys);
    out.extend_from_slice(&ends);
    out.extend_from_slice(&texts);
    for (_, time, _) in updates {
        out.extend_from_slice(&time.to_le_bytes());
    }
    for (_, _, diff) in updates {
        out.extend_from_slice(&diff.to_le_bytes());
    }
    Bytes::from(out)
}

/// Splits `n` bytes off the front of `rest`.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    let (head, tail) = rest.split_at_checked(n).ok_or("truncated")?;
    *rest = tail;
    Ok(head)
}

/// Checks a columnar part against its recorded checksum and number of updates, and every row as the
/// row format's checks do (bounds, UTF-8, no zero diff, order: the row encoding's, which for these rows
/// is the key's little-endian bytes, then the text's length, then the text); answers the number of
/// updates.
pub fn check(bytes: &[u8], checksum: u32, updates: u64) -> Result<u64, String> {
    if crc32fast::hash(bytes) != checksum {
        return Err("checksum".into());
    }
    let mut rest = bytes;
    if take(&mut rest, 4)? != MAGIC {
        return Err("header".into());
    }
    let n = u64::from_le_bytes(take(&mut rest, 8)?.try_into().expect("eight bytes"));
    if n != updates || n > (bytes.len() / 28) as u64 {
        return Err(format!("{n} updates"));
    }
    let n = n as usize;
    let keys = take(&mut rest, 8 * n)?;
    let ends = take(&mut rest, 4 * n)?;
    let end = |i: usize| u32::from_le_bytes(ends[4 * i..4 * i + 4].try_into().expect("four bytes")) as usize;
    let texts = take(&mut rest, if n == 0 { 0 } else { end(n - 1) })?;
    let _times = take(&mut rest, 8 * n)?;
    let diffs = take(&mut rest, 8 * n)?;
    if !rest.is_empty() {
        return Err("trailing bytes".into());
    }
    let texts = std::str::from_utf8(texts).map_err(|e| e.to_string())?;
    // Every byte of an ASCII text is a character's boundary: one check of the column instead of one per row.
    let ascii = texts.is_ascii();
    if diffs.chunks_exact(8).any(|d| d == [0; 8]) {
        return Err("a zero diff".into());
    }
    // The key's little-endian bytes compare as the big-endian integer they spell: most rows' order is one
    // integer comparison, the texts compared only between equal keys.
    let keys = keys.chunks_exact(8).map(|k| u64::from_be_bytes(k.try_into().expect("eight bytes")));
    let ends = ends.chunks_exact(4).map(|e| u32::from_le_bytes(e.try_into().expect("four bytes")) as usize);
    let (mut start, mut last) = (0, None::<(u64, usize, usize)>);
    for (i, (key, stop)) in keys.zip(ends).enumerate() {
        if stop < start || (!ascii && !texts.is_char_boundary(stop)) {
            return Err(format!("text {i} out of bounds"));
        }
        if let Some((last_key, last_start, last_stop)) = last {
            let text = |from: usize, to: usize| &texts.as_bytes()[from..to];
            let (last_text, text) = (text(last_start, last_stop), text(start, stop));
            if (last_key, last_text.len(), last_text) > (key, text.len(), text) {
                return Err("out of order".into());
            }
        }
        last = Some((key, start, stop));
        start = stop;
    }
    Ok(n as u64)
}

/// Asserts that [`check`] refuses damage of every kind it checks for, on copies of `updates` (a part's, at
/// least two rows): so that the floor it measures is the floor of checks that work.
pub fn assert_refuses_damage(updates: &[(Row, u64, Diff)]) {
    let refused = |bytes: &[u8], what: &str| {
        let result = check(bytes, crc32fast::hash(bytes), updates.len() as u64);
        assert!(result.as_ref().is_err_and(|e| e.contains(what)), "{what}: {result:?}");
    };
    let good = encode(updates);
    assert_eq!(check(&good, crc32fast::hash(&good), updates.len() as u64), Ok(updates.len() as u64));
    assert_eq!(check(&good, crc32fast::hash(&good) ^ 1, updates.len() as u64), Err("checksum".into()));
    let mut swapped = updates.to_vec();
    swapped.swap(0, 1);
    refused(&encode(&swapped), "out of order");
    let mut zero = updates.to_vec();
    zero[1].2 = 0;
    refused(&encode(&zero), "zero diff");
    let mut not_utf8 = good.to_vec();
    let texts_at = 12 + 12 * updates.len();
    not_utf8[texts_at] = 0xFF;
    refused(&not_utf8, "utf-8");
    refused(&good[..good.len() - 1], "truncated");
}
