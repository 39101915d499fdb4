//! The reference's own ranking: sorting rows by an ordering (a stable sort with
//! [`super::order::compare_rows`]) and keeping the rows ranked `offset..offset + limit`, counting each row
//! as many times as its multiplicity. Used by `TopK` (per group) and by a peek's finishing.

use std::num::NonZeroU64;

use super::order::compare_rows;
use super::value::{Value, values};
use crate::peek::RowSetFinishing;
use crate::plan::ColumnOrder;
use crate::row::Row;

/// `rows` sorted (stably) by `order`, then by the whole row.
pub(crate) fn sorted<T>(order: &[ColumnOrder], rows: Vec<(Row, T)>) -> Vec<(Row, T)> {
    let permutation: Vec<usize> = {
        let mut keyed: Vec<(Vec<Value<'_>>, usize)> =
            rows.iter().enumerate().map(|(index, (row, _))| (values(row), index)).collect();
        keyed.sort_by(|(a, _), (b, _)| compare_rows(order, a, b));
        keyed.into_iter().map(|(_, index)| index).collect()
    };
    let mut slots: Vec<Option<(Row, T)>> = rows.into_iter().map(Some).collect();
    permutation.into_iter().map(|index| slots[index].take().expect("a permutation")).collect()
}

/// The items ranked `offset..offset + limit` of `ranked` (in rank order), each item counting `count`
/// times: written as a walk over the ranks, one item at a time.
pub(crate) fn slice<T>(ranked: Vec<(T, u64)>, offset: usize, limit: Option<usize>) -> Vec<(T, u64)> {
    let first = offset as u128;
    let end = limit.map(|limit| first + limit as u128);
    let mut out = Vec::new();
    // The ranks item `i` occupies are `start..start + count`.
    let mut start: u128 = 0;
    for (item, count) in ranked {
        let (item_start, item_end) = (start, start + u128::from(count));
        start = item_end;
        let keep_from = item_start.max(first);
        let keep_to = match end {
            Some(end) => item_end.min(end),
            None => item_end,
        };
        if keep_to > keep_from {
            let kept = u64::try_from(keep_to - keep_from).expect("at most the item's own count");
            out.push((item, kept));
        }
    }
    out
}

/// A peek's finishing: if it orders, limits or skips anything, the rows sorted by its order (then by
/// the whole row), then the ones ranked `offset..offset + limit` counting multiplicities; otherwise the
/// rows as given.
pub(crate) fn finish(finishing: &RowSetFinishing, rows: Vec<(Row, NonZeroU64)>) -> Vec<(Row, NonZeroU64)> {
    if finishing.order_by.is_empty() && finishing.limit.is_none() && finishing.offset == 0 {
        return rows;
    }
    let ranked =
        sorted(&finishing.order_by, rows).into_iter().map(|(row, count)| (row, count.get())).collect();
    slice(ranked, finishing.offset, finishing.limit)
        .into_iter()
        .map(|(row, count)| (row, NonZeroU64::new(count).expect("slice keeps only non-empty items")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slicing_counts_multiplicities() {
        let ranked = vec![("a", 2), ("b", 3), ("c", 1)];
        let cases = [
            (1, Some(3), vec![("a", 1), ("b", 2)]),
            (0, None, ranked.clone()),
            (6, None, vec![]),
            (5, Some(10), vec![("c", 1)]),
            (0, Some(0), vec![]),
            (2, Some(3), vec![("b", 3)]),
        ];
        for (offset, limit, expected) in cases {
            assert_eq!(slice(ranked.clone(), offset, limit), expected, "offset {offset} limit {limit:?}");
        }
    }
}
