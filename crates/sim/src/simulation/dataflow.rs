//! [`Computed`]: what a model replica process keeps of one hydrated dataflow: the history of its storage
//! inputs as it read them, and the states it evaluated.
//!
//! **What this is.** A real replica keeps arrangements; the model keeps less and recomputes: the rows of
//! every storage import at a base time (the snapshot it hydrated from, later the compaction frontier), and
//! at every later time an input changed (a storage update, or a change of an upstream index on the same
//! process) a [`Step`]: the storage updates at that time and the fingerprints of the storage inputs after
//! them. The state of the dataflow at any time from the base on is a function of those inputs and of the
//! upstream states at the same time; the model process evaluates it when someone asks (a peek, a subscribe
//! emitting that time, a downstream dataflow evaluated at that time), through the evaluation memo, and
//! keeps the result ([`Computed::cache`]) until compaction. So nothing is evaluated that nobody reads, and
//! nothing read is computed from anything but what this process read from storage.
//!
//! **Invariants** (asserted): steps come in increasing time order, after the base time (so a state
//! evaluated at a time stays true); the base time only moves forward, and a step at or after it is never
//! folded into the base; reading before the base is refused (`None`). The owner compacts no further than
//! the last time it recorded.
//!
//! **Tests:** below; the whole through the simulator (`tests/it/`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::rc::Rc;

use protocol::reference::Multiset;
use protocol::{Diff, GlobalId, Row};

use super::evaluation::{Fingerprint, Output};

/// Every export's state at one time, as an evaluation produced it (shared with the memo).
pub type Outputs = Rc<BTreeMap<GlobalId, Output>>;

/// The rows of every storage import with their fingerprints.
#[derive(Debug, Clone, Default)]
struct Inputs {
    rows: BTreeMap<GlobalId, Multiset>,
    fingerprints: BTreeMap<GlobalId, Fingerprint>,
}

impl Inputs {
    fn apply(&mut self, id: GlobalId, row: &Row, diff: Diff) {
        add(self.rows.entry(id).or_default(), row, diff);
        self.fingerprints.entry(id).or_default().add(row, diff);
    }
}

/// What changed at one time.
#[derive(Debug, Clone)]
struct Step {
    /// The storage updates at this time (none if only an upstream index changed).
    updates: Vec<(GlobalId, Row, Diff)>,
    /// The fingerprints of the storage inputs after them.
    fingerprints: BTreeMap<GlobalId, Fingerprint>,
}

/// A hydrated dataflow on a model process. See the module documentation.
#[derive(Debug)]
pub struct Computed {
    /// Reads at or after this time are possible; before it, history is compacted.
    base_time: u64,
    /// The storage inputs at `base_time` (every update before the first step).
    base: Inputs,
    /// Every later time an input changed, in order.
    log: BTreeMap<u64, Step>,
    /// The storage inputs after the last step (the base, if there is none).
    current: Inputs,
    /// The states evaluated so far, at the times they are in force from (the base time or a step's time).
    states: BTreeMap<u64, Outputs>,
}

impl Computed {
    /// A dataflow hydrated at `as_of` from these storage snapshots.
    pub fn hydrate(as_of: u64, storage: BTreeMap<GlobalId, Multiset>) -> Computed {
        let fingerprints = storage.iter().map(|(id, rows)| (*id, Fingerprint::of(rows))).collect();
        let base = Inputs { rows: storage, fingerprints };
        Computed {
            base_time: as_of,
            current: base.clone(),
            base,
            log: BTreeMap::new(),
            states: BTreeMap::new(),
        }
    }

    /// Reads before this time are refused.
    pub fn base_time(&self) -> u64 {
        self.base_time
    }

    /// Records that inputs changed at `time` (after every time recorded), with these storage updates.
    pub fn record(&mut self, time: u64, updates: Vec<(GlobalId, Row, Diff)>) {
        let last = self.log.last_key_value().map_or(self.base_time, |(t, _)| *t);
        // Strictly after the base too: a state evaluated at the base time must stay true.
        assert!(time > last, "a step at {time} after {last}");
        for (id, row, diff) in &updates {
            self.current.apply(*id, row, *diff);
        }
        self.log.insert(time, Step { updates, fingerprints: self.current.fingerprints.clone() });
    }

    /// The times in `[lower, upper)` at which an input changed.
    pub fn change_times(&self, lower: u64, upper: u64) -> impl Iterator<Item = u64> + '_ {
        self.log.range(lower..upper.max(lower)).map(|(t, _)| *t)
    }

    /// The time whose state is in force at `time` (the last change at or before it, or the base time),
    /// or `None` if `time` is before the base.
    pub fn time_of(&self, time: u64) -> Option<u64> {
        if time < self.base_time {
            return None;
        }
        Some(self.log.range(..=time).next_back().map_or(self.base_time, |(t, _)| *t))
    }

    /// The state evaluated at `time` (a time from [`time_of`](Self::time_of)), if it was.
    pub fn cached(&self, time: u64) -> Option<Outputs> {
        self.states.get(&time).cloned()
    }

    /// Keeps the state evaluated at `time` (a time from [`time_of`](Self::time_of)).
    pub fn cache(&mut self, time: u64, outputs: Outputs) {
        self.states.insert(time, outputs);
    }

    /// The storage inputs' fingerprints at `time` (a time from [`time_of`](Self::time_of)).
    pub fn fingerprints_at(&self, time: u64) -> &BTreeMap<GlobalId, Fingerprint> {
        match self.log.get(&time) {
            Some(step) => &step.fingerprints,
            None => {
                assert_eq!(time, self.base_time, "fingerprints asked at {time}, not a change time");
                &self.base.fingerprints
            }
        }
    }

    /// The storage inputs' rows at `time` (a time from [`time_of`](Self::time_of)): borrowed at the
    /// newest time, rebuilt from the base otherwise.
    pub fn rows_at(&self, time: u64) -> Cow<'_, BTreeMap<GlobalId, Multiset>> {
        let newest = self.log.last_key_value().map_or(self.base_time, |(t, _)| *t);
        if time == newest {
            return Cow::Borrowed(&self.current.rows);
        }
        let mut inputs = self.base.clone();
        for (_, step) in self.log.range(..=time) {
            for (id, row, diff) in &step.updates {
                inputs.apply(*id, row, *diff);
            }
        }
        Cow::Owned(inputs.rows)
    }

    /// The number of rows of `export` in the newest state evaluated (0 if none was).
    pub fn latest_rows(&self, export: GlobalId) -> usize {
        self.states
            .values()
            .next_back()
            .and_then(|outputs| outputs.get(&export))
            .and_then(|output| output.as_ref().ok())
            .map_or(0, |contents| contents.rows.len())
    }

    /// Compacts to `frontier`: steps before it fold into the base, and reads before it are refused from
    /// now on. A frontier at or before the base time changes nothing.
    pub fn compact(&mut self, frontier: u64) {
        if frontier <= self.base_time {
            return;
        }
        // The state in force at the frontier, if it was evaluated at an earlier change, stays readable
        // there.
        let in_force =
            self.time_of(frontier).filter(|time| *time < frontier).and_then(|time| self.cached(time));
        let kept = self.log.split_off(&frontier);
        let folded = std::mem::replace(&mut self.log, kept);
        for (_, step) in folded {
            for (id, row, diff) in &step.updates {
                self.base.apply(*id, row, *diff);
            }
        }
        self.states = self.states.split_off(&frontier);
        if let Some(state) = in_force {
            self.states.insert(frontier, state);
        }
        self.base_time = frontier;
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
    use super::*;
    use protocol::Datum;
    use protocol::reference::consolidate;

    const S: GlobalId = GlobalId::System(1);

    fn row(value: i64) -> Row {
        Row::pack([Datum::Int64(value)])
    }

    fn rows(values: &[i64]) -> BTreeMap<GlobalId, Multiset> {
        BTreeMap::from([(S, consolidate(values.iter().map(|v| (row(*v), 1))))])
    }

    /// A dataflow hydrated at 10 with {1}, +2 at 12, +3 at 15, an upstream-only change at 17.
    fn example() -> Computed {
        let mut computed = Computed::hydrate(10, rows(&[1]));
        computed.record(12, vec![(S, row(2), 1)]);
        computed.record(15, vec![(S, row(3), 1)]);
        computed.record(17, vec![]);
        computed
    }

    #[test]
    fn reads_find_the_inputs_in_force_at_each_time() {
        let computed = example();
        let cases = [
            (9, None),
            (10, Some((10, vec![1]))),
            (11, Some((10, vec![1]))),
            (14, Some((12, vec![1, 2]))),
            (16, Some((15, vec![1, 2, 3]))),
            (40, Some((17, vec![1, 2, 3]))),
        ];
        for (time, expected) in cases {
            let actual = computed.time_of(time).map(|t| (t, computed.rows_at(t).into_owned()));
            assert_eq!(actual, expected.map(|(t, v)| (t, rows(&v))), "at {time}");
            if let Some(t) = computed.time_of(time) {
                assert_eq!(computed.fingerprints_at(t)[&S], Fingerprint::of(&computed.rows_at(t)[&S]));
            }
        }
        assert_eq!(computed.change_times(11, 17).collect::<Vec<_>>(), vec![12, 15]);
    }

    #[test]
    fn compaction_folds_earlier_steps_and_keeps_later_reads() {
        let mut computed = example();
        let before: Vec<_> =
            (10..20).map(|t| computed.time_of(t).map(|c| computed.rows_at(c).into_owned())).collect();
        computed.compact(15);
        computed.compact(13); // Backwards: nothing happens.
        assert_eq!(computed.base_time(), 15);
        for time in 10..20 {
            let actual = computed.time_of(time).map(|c| computed.rows_at(c).into_owned());
            let expected = if time < 15 { None } else { before[(time - 10) as usize].clone() };
            assert_eq!(actual, expected, "at {time}");
        }
        // The step at the frontier itself survives: a reader from 15 on still sees that 15 changed.
        assert_eq!(computed.change_times(15, 20).collect::<Vec<_>>(), vec![15, 17]);
    }

    #[test]
    fn differences_are_consolidated_and_ordered() {
        let old = consolidate([(row(1), 1), (row(2), 2), (row(4), 1)]);
        let new = consolidate([(row(2), 3), (row(3), 1), (row(4), 1)]);
        assert_eq!(difference(&new, &old), vec![(row(1), -1), (row(2), 1), (row(3), 1)]);
        assert_eq!(difference(&old, &old), vec![]);
    }
}
