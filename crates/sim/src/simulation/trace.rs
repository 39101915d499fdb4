//! [`Trace`]: a model replica's arrangement of one export, the state of a collection at every time from a
//! compaction frontier up to what its dataflow has computed.
//!
//! **What this is.** The model's counterpart of a differential arrangement, kept as plainly as possible:
//! the state (rows with their fingerprint, or the data error evaluating it produced) at every time it
//! changed, each shared (`Rc`) with the evaluation memo, with downstream dataflows that read it and with
//! the same export on other processes. Reading a time finds the last change at or before it; a subscribe
//! turns consecutive states into updates with [`difference`].
//!
//! **Invariants** (asserted): states are pushed in increasing time order, never before the compaction
//! frontier; the state at the frontier is always kept; reading before the frontier is refused (`None`),
//! never answered with compacted data. A state equal to the one before it (same error, or rows with the
//! same fingerprint) is not recorded: the collection did not change.
//!
//! **Tests:** below.

use std::collections::BTreeMap;

use protocol::reference::Multiset;
use protocol::{Diff, Row};

use super::evaluation::Output;

/// One export's arrangement. See the module documentation.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Times before this are compacted: every state at or after it can be read.
    compacted: u64,
    /// The state at every time it changed at or after `compacted`, and the one in force at `compacted`
    /// (the first entry, at or before it).
    states: BTreeMap<u64, Output>,
}

impl Trace {
    /// A trace whose first state, at `time`, is `state`.
    pub fn new(time: u64, state: Output) -> Trace {
        Trace { compacted: time, states: BTreeMap::from([(time, state)]) }
    }

    /// Times before this cannot be read.
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    fn latest(&self) -> &Output {
        self.states.last_key_value().expect("a trace always has a state").1
    }

    /// The number of rows of the latest state.
    pub fn latest_rows(&self) -> usize {
        self.latest().as_ref().map_or(0, |contents| contents.rows.len())
    }

    /// Records the state at `time`, after every time recorded so far.
    pub fn push(&mut self, time: u64, state: Output) {
        let last = *self.states.last_key_value().expect("a trace always has a state").0;
        assert!(time > last, "trace states must come in time order: {time} after {last}");
        let unchanged = match (self.latest(), &state) {
            (Ok(old), Ok(new)) => old.fingerprint == new.fingerprint,
            (Err(old), Err(new)) => old == new,
            _ => false,
        };
        if !unchanged {
            self.states.insert(time, state);
        }
    }

    /// The state at `time`, or `None` if `time` is before the compaction frontier. A time after the last
    /// recorded one reads the latest state (the caller knows whether the dataflow computed that far).
    pub fn read(&self, time: u64) -> Option<&Output> {
        if time < self.compacted {
            return None;
        }
        Some(self.states.range(..=time).next_back().expect("the state at the frontier is kept").1)
    }

    /// The states recorded at times in `[lower, upper)` (each a change from the one before), where
    /// `lower` is not compacted.
    pub fn changes(&self, lower: u64, upper: u64) -> impl Iterator<Item = (u64, &Output)> {
        assert!(lower >= self.compacted, "reading changes from {lower}, compacted to {}", self.compacted);
        self.states.range(lower..upper.max(lower)).map(|(t, s)| (*t, s))
    }

    /// Compacts to `frontier`: the states before it are no longer distinguishable (nor readable).
    /// A frontier at or before the current one changes nothing.
    pub fn compact(&mut self, frontier: u64) {
        if frontier <= self.compacted {
            return;
        }
        self.compacted = frontier;
        // Keep the state in force at the frontier: the last one at or before it.
        let keep_from = *self.states.range(..=frontier).next_back().expect("a state at or before").0;
        self.states = self.states.split_off(&keep_from);
    }
}

/// `new - old` as consolidated updates, in row order.
pub fn difference(new: &Multiset, old: &Multiset) -> Vec<(Row, Diff)> {
    let mut out = Vec::new();
    let (mut a, mut b) = (new.iter().peekable(), old.iter().peekable());
    loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => return out,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((ra, _)), Some((rb, _))) => ra.cmp(rb),
        };
        match order {
            std::cmp::Ordering::Less => {
                let (row, diff) = a.next().expect("peeked");
                out.push((row.clone(), *diff));
            }
            std::cmp::Ordering::Greater => {
                let (row, diff) = b.next().expect("peeked");
                out.push((row.clone(), -*diff));
            }
            std::cmp::Ordering::Equal => {
                let ((row, da), (_, db)) = (a.next().expect("peeked"), b.next().expect("peeked"));
                if da != db {
                    out.push((row.clone(), da - db));
                }
            }
        }
    }
}

/// Adds `diff` to `row`'s count, removing it at zero.
pub fn add(rows: &mut Multiset, row: &Row, diff: Diff) {
    if diff == 0 {
        return;
    }
    match rows.get_mut(row) {
        Some(count) => {
            *count += diff;
            if *count == 0 {
                rows.remove(row);
            }
        }
        None => {
            rows.insert(row.clone(), diff);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;
    use crate::simulation::evaluation::Contents;
    use protocol::Datum;
    use protocol::reference::consolidate;

    fn row(value: i64) -> Row {
        Row::pack([Datum::Int64(value)])
    }

    fn state(values: &[(i64, Diff)]) -> Output {
        Ok(Rc::new(Contents::new(consolidate(values.iter().map(|(v, d)| (row(*v), *d))))))
    }

    fn rows_at(trace: &Trace, time: u64) -> Option<Result<Multiset, String>> {
        trace.read(time).map(|s| s.as_ref().map(|c| c.rows.clone()).map_err(Clone::clone))
    }

    fn rows(values: &[(i64, Diff)]) -> Option<Result<Multiset, String>> {
        Some(Ok(consolidate(values.iter().map(|(v, d)| (row(*v), *d)))))
    }

    #[test]
    fn reads_give_the_state_at_the_last_change_at_or_before_the_time() {
        let mut trace = Trace::new(10, state(&[(1, 1)]));
        trace.push(12, state(&[(1, 1), (2, 1)]));
        trace.push(13, state(&[(1, 1), (2, 1)])); // No change: not recorded.
        trace.push(15, Err("division by zero".into()));
        trace.push(17, state(&[(2, 3)]));
        let error = Some(Err("division by zero".to_string()));
        let cases = [
            (9, None),
            (10, rows(&[(1, 1)])),
            (11, rows(&[(1, 1)])),
            (14, rows(&[(1, 1), (2, 1)])),
            (15, error.clone()),
            (16, error),
            (40, rows(&[(2, 3)])),
        ];
        for (time, expected) in cases {
            assert_eq!(rows_at(&trace, time), expected, "at {time}");
        }
        let times: Vec<u64> = trace.changes(10, 100).map(|(t, _)| t).collect();
        assert_eq!(times, vec![10, 12, 15, 17]);
        assert_eq!(trace.changes(16, 17).count(), 0);
    }

    #[test]
    fn compaction_refuses_earlier_reads_and_keeps_later_states() {
        let mut trace = Trace::new(10, state(&[(1, 1)]));
        trace.push(12, state(&[(1, 2)]));
        trace.push(15, Err("boom".into()));
        trace.push(17, state(&[(3, 1)]));
        let before: Vec<_> = (10..20).map(|t| rows_at(&trace, t)).collect();
        trace.compact(16);
        trace.compact(14); // Backwards: nothing happens.
        assert_eq!(trace.compacted(), 16);
        for time in 10..20 {
            let expected = if time < 16 { None } else { before[(time - 10) as usize].clone() };
            assert_eq!(rows_at(&trace, time), expected, "at {time}");
        }
        trace.compact(30);
        assert_eq!(rows_at(&trace, 30), rows(&[(3, 1)]));
        assert_eq!(trace.changes(30, 40).count(), 0);
    }

    #[test]
    fn differences_are_consolidated_and_ordered() {
        let old = consolidate([(row(1), 1), (row(2), 2), (row(4), 1)]);
        let new = consolidate([(row(2), 3), (row(3), 1), (row(4), 1)]);
        assert_eq!(difference(&new, &old), vec![(row(1), -1), (row(2), 1), (row(3), 1)]);
        assert_eq!(difference(&old, &old), vec![]);
    }
}
