//! Evaluating a dataflow on its inputs for the model replicas, memoized by content: [`Evaluations`].
//!
//! **What this is.** Every process of every model replica evaluates its dataflows at the times something
//! reads them, with the reference interpreter. Processes that run the same dataflow over the same inputs
//! compute the same outputs, so the world keeps one memo for all of them, keyed by *what is evaluated*: a
//! fingerprint of the dataflow description (without its as-of, which does not change what it computes) and
//! of every input's contents (and of any input's error). A hit returns the outputs computed for exactly that
//! content; nothing is keyed by time, collection or process, so nothing needs invalidating (entries go only
//! to bound memory, oldest first). Outputs are shared (`Rc`) with the dataflows that keep them.
//!
//! **Fingerprints** ([`Fingerprint`]) are order-independent sums of a 128-bit hash of each row times its
//! multiplicity, so a process keeps its inputs' fingerprints up to date change by change. Two different
//! multisets share a fingerprint with probability about 2^-128 per comparison.
//!
//! **What this is not.** A cache of the oracle's: the oracle never sees it and it never sees the oracle.
//! **Tests:** below.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use protocol::reference::Multiset;
use protocol::{DataflowDescription, Diff, GlobalId, Row};

/// A collection's rows with their fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    /// The rows.
    pub rows: Multiset,
    /// [`Fingerprint::of`] the rows.
    pub fingerprint: Fingerprint,
}

impl Contents {
    /// `rows` with their fingerprint.
    pub fn new(rows: Multiset) -> Contents {
        Contents { fingerprint: Fingerprint::of(&rows), rows }
    }
}

/// A collection's state as an evaluation produces it: the contents (shared), or the error.
pub type Output = Result<Rc<Contents>, String>;

/// An order-independent fingerprint of a multiset (or of bytes): two 64-bit lanes, each the wrapping sum
/// of a row hash times the row's multiplicity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fingerprint(u64, u64);

impl Fingerprint {
    /// The fingerprint of `rows`.
    pub fn of(rows: &Multiset) -> Fingerprint {
        let mut fingerprint = Fingerprint::default();
        for (row, diff) in rows {
            fingerprint.add(row, *diff);
        }
        fingerprint
    }

    /// The fingerprint of `bytes` (not additive: a plain hash).
    pub fn of_bytes(bytes: &[u8]) -> Fingerprint {
        let (a, b) = hashes(bytes);
        Fingerprint(a, b)
    }

    /// Accounts for `diff` more copies of `row`.
    pub fn add(&mut self, row: &Row, diff: Diff) {
        let (a, b) = hashes(row.as_bytes());
        self.0 = self.0.wrapping_add(a.wrapping_mul(diff as u64));
        self.1 = self.1.wrapping_add(b.wrapping_mul(diff as u64));
    }
}

/// Two hashes of `bytes`: FNV-1a, finished by two different SplitMix64 mixes.
fn hashes(bytes: &[u8]) -> (u64, u64) {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (mix(hash ^ 0x9E37_79B9_7F4A_7C15), mix(hash.rotate_left(32) ^ 0x2545_F491_4F6C_DD1D))
}

/// The fingerprint of a dataflow description, without its as-of.
pub fn describe(desc: &DataflowDescription<u64>) -> Fingerprint {
    let mut desc = desc.clone();
    desc.as_of = None;
    // The derived `Debug` text names every field and value (JSON cannot: its map keys are strings).
    Fingerprint::of_bytes(format!("{desc:?}").as_bytes())
}

/// What an evaluation depends on: the dataflow, and each input's contents or error.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// [`describe`] of the dataflow.
    pub dataflow: Fingerprint,
    /// Each import's fingerprint, in id order.
    pub inputs: Vec<(GlobalId, Fingerprint)>,
    /// Each import whose state is an error, with it, in id order.
    pub errors: Vec<(GlobalId, String)>,
}

/// The most output rows the memo keeps (shared with the dataflows' evaluated states, so mostly not extra
/// memory).
const MEMO_ROWS: usize = 1 << 19;

/// The memo. See the module documentation.
#[derive(Debug, Default)]
pub struct Evaluations {
    entries: BTreeMap<Key, Rc<BTreeMap<GlobalId, Output>>>,
    /// Keys in insertion order, with their row counts, for eviction.
    order: VecDeque<(Key, usize)>,
    rows: usize,
    /// Evaluations done and memo hits, for tests and tuning.
    pub evaluated: u64,
    /// Lookups answered from the memo.
    pub hits: u64,
}

impl Evaluations {
    /// The outputs of `desc` on the inputs `key` describes, from the memo or from `evaluate()` (which
    /// runs the reference interpreter on exactly those inputs). If an import is in error (`key.errors`),
    /// every export is that error and nothing is evaluated.
    pub fn evaluate(
        &mut self,
        key: Key,
        desc: &DataflowDescription<u64>,
        evaluate: impl FnOnce() -> Result<BTreeMap<GlobalId, Multiset>, String>,
    ) -> Rc<BTreeMap<GlobalId, Output>> {
        if let Some(outputs) = self.entries.get(&key) {
            self.hits += 1;
            return Rc::clone(outputs);
        }
        self.evaluated += 1;
        let outputs = match key.errors.first() {
            // An import in error makes everything computed from it an error.
            Some((_, error)) => Err(error.clone()),
            None => evaluate(),
        };
        let outputs: BTreeMap<GlobalId, Output> = desc
            .export_ids()
            .map(|id| {
                let output = match &outputs {
                    Ok(outputs) => Ok(Rc::new(Contents::new(outputs.get(&id).cloned().unwrap_or_default()))),
                    Err(error) => Err(error.clone()),
                };
                (id, output)
            })
            .collect();
        let rows = outputs.values().map(|o| o.as_ref().map_or(1, |c| c.rows.len().max(1))).sum::<usize>();
        let outputs = Rc::new(outputs);
        while self.rows + rows > MEMO_ROWS
            && let Some((oldest, oldest_rows)) = self.order.pop_front()
        {
            self.entries.remove(&oldest);
            self.rows -= oldest_rows;
        }
        self.rows += rows;
        self.order.push_back((key.clone(), rows));
        self.entries.insert(key, Rc::clone(&outputs));
        outputs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Datum;
    use protocol::reference::consolidate;

    fn rows(values: &[(i64, Diff)]) -> Multiset {
        consolidate(values.iter().map(|(v, d)| (Row::pack([Datum::Int64(*v)]), *d)))
    }

    #[test]
    fn fingerprints_follow_contents_whatever_the_order_of_changes() {
        let mut incremental = Fingerprint::default();
        for (value, diff) in [(3, 1), (1, 2), (3, -1), (2, 1)] {
            incremental.add(&Row::pack([Datum::Int64(value)]), diff);
        }
        assert_eq!(incremental, Fingerprint::of(&rows(&[(1, 2), (2, 1)])));
        let distinct = [
            rows(&[]),
            rows(&[(1, 1)]),
            rows(&[(1, 2)]),
            rows(&[(2, 1)]),
            rows(&[(1, 1), (2, 1)]),
            rows(&[(1, -1)]),
        ];
        for (i, a) in distinct.iter().enumerate() {
            for b in &distinct[i + 1..] {
                assert_ne!(Fingerprint::of(a), Fingerprint::of(b), "{a:?} and {b:?}");
            }
        }
    }
}
