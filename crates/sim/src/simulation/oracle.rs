//! The oracle: what every peek and subscribe *should* return, computed from the full, never-compacted
//! history of every storage collection (its own log of every append, kept for the whole run) and every
//! dataflow the workload created, with the reference interpreter (`protocol::reference`).
//!
//! **What it shares with the model replicas** (`model.rs`): the reference interpreter and what a peek
//! means (`peek.rs`); nothing else. The models compute from what the storage core holds (compacted as the
//! controller's holds allow) and from the dataflows the controller installed on them, each process on its
//! own; the oracle never reads storage and is never read by a model.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use protocol::reference::{Multiset, consolidate, evaluate_dataflow};
use protocol::{DataflowDescription, Diff, GlobalId, Row};

/// Why a collection could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvalFailure {
    /// A data error (division by zero, negative multiplicity...): the right answer is an error.
    Data(String),
    /// The data needed is not available (compacted storage, unknown import): a bug somewhere.
    Unavailable(String),
}

/// Cached evaluations: `(collection, time)` to contents. Contents at a complete time never change, so an
/// entry is only ever dropped to bound memory: once the cached rows pass [`CACHE_ROWS`], the cache starts
/// afresh (entries are recomputed from the log on demand, so this costs time, never correctness).
#[derive(Debug, Default)]
struct Cache {
    entries: BTreeMap<(GlobalId, u64), Result<Rc<Multiset>, String>>,
    rows: usize,
}

/// The most rows the oracle's cache holds (about 100 MiB of small rows).
const CACHE_ROWS: usize = 1 << 20;

impl Cache {
    fn insert(&mut self, key: (GlobalId, u64), value: Result<Rc<Multiset>, String>) {
        let rows = value.as_ref().map_or(1, |contents| contents.len().max(1));
        if self.rows + rows > CACHE_ROWS {
            self.entries.clear();
            self.rows = 0;
        }
        self.rows += rows;
        if let Some(old) = self.entries.insert(key, value) {
            self.rows -= old.as_ref().map_or(1, |contents| contents.len().max(1));
        }
    }
}

/// The full history of storage and every dataflow ever created.
#[derive(Debug, Default)]
pub struct Oracle {
    log: BTreeMap<GlobalId, Vec<(Row, u64, Diff)>>,
    uppers: BTreeMap<GlobalId, u64>,
    /// Every time at which some storage collection changed: contents are equal between consecutive ones.
    change_times: std::collections::BTreeSet<u64>,
    /// Export id → its dataflow (ids are never reused within a run).
    pub dataflows: BTreeMap<GlobalId, Arc<DataflowDescription<u64>>>,
    cache: RefCell<Cache>,
}

impl Oracle {
    /// Records appended updates and the collection's new upper.
    pub fn record_append(&mut self, id: GlobalId, updates: &[(Row, u64, Diff)], upper: u64) {
        self.log.entry(id).or_default().extend_from_slice(updates);
        self.change_times.extend(updates.iter().map(|(_, t, _)| *t));
        self.uppers.insert(id, upper);
    }

    /// Records a created dataflow.
    pub fn record_dataflow(&mut self, desc: &Arc<DataflowDescription<u64>>) {
        for id in desc.export_ids() {
            self.dataflows.insert(id, Arc::clone(desc));
        }
    }

    /// A storage collection's contents at `time`, which must be complete.
    pub fn storage_contents(&self, id: GlobalId, time: u64) -> Result<Rc<Multiset>, String> {
        if self.uppers.get(&id).is_none_or(|upper| time >= *upper) {
            return Err(format!("{id} is not complete at {time}"));
        }
        let time = self.canonical(time);
        if let Some(cached) = self.cache.borrow().entries.get(&(id, time)) {
            return cached.clone();
        }
        let updates = self.log.get(&id).map(|v| v.as_slice()).unwrap_or_default();
        let contents = Rc::new(consolidate(
            updates.iter().filter(|(_, t, _)| *t <= time).map(|(r, _, d)| (r.clone(), *d)),
        ));
        self.cache.borrow_mut().insert((id, time), Ok(Rc::clone(&contents)));
        Ok(contents)
    }

    /// An export's contents at `time`.
    pub fn export_contents(&self, id: GlobalId, time: u64) -> Result<Rc<Multiset>, EvalFailure> {
        // Nothing changes between change times: evaluate at the last one (for the cache's sake), after
        // checking that `time` itself is complete.
        for source in self.sources(id) {
            if self.uppers.get(&source).is_none_or(|upper| time >= *upper) {
                return Err(EvalFailure::Unavailable(format!("{source} is not complete at {time}")));
            }
        }
        let time = self.canonical(time);
        if let Some(cached) = self.cache.borrow().entries.get(&(id, time)) {
            return cached.clone().map_err(EvalFailure::Data);
        }
        let desc = self
            .dataflows
            .get(&id)
            .ok_or_else(|| EvalFailure::Unavailable(format!("no dataflow exports {id}")))?;
        let inputs = self.inputs(desc, time)?;
        let result = match evaluate_dataflow(desc, &inputs) {
            Ok(mut outputs) => {
                let contents = outputs
                    .remove(&id)
                    .ok_or_else(|| EvalFailure::Unavailable(format!("{id} is not an export")))?;
                Ok(Rc::new(contents))
            }
            Err(e) => Err(e.to_string()),
        };
        // Every export of the dataflow was computed; cache this one (the others are cheap to redo).
        self.cache.borrow_mut().insert((id, time), result.clone());
        result.map_err(EvalFailure::Data)
    }

    /// The number of rows of a dataflow's largest export at `time`, evaluated without recording the
    /// dataflow. The world keeps its workload below a size with it: a cross join over an index that is
    /// itself a cross join grows with the square of its inputs at every level of a chain, and the cache
    /// keeps a copy per change time.
    pub fn largest_export_rows(
        &self,
        desc: &DataflowDescription<u64>,
        time: u64,
    ) -> Result<usize, EvalFailure> {
        let inputs = self.inputs(desc, time)?;
        let outputs = evaluate_dataflow(desc, &inputs).map_err(|e| EvalFailure::Data(e.to_string()))?;
        Ok(outputs.values().map(BTreeMap::len).max().unwrap_or(0))
    }

    /// The contents of every import of `desc` at `time`, as the reference interpreter takes them.
    fn inputs(
        &self,
        desc: &DataflowDescription<u64>,
        time: u64,
    ) -> Result<BTreeMap<GlobalId, Multiset>, EvalFailure> {
        let mut inputs = BTreeMap::new();
        for import in desc.source_imports.keys() {
            let contents = self.storage_contents(*import, time).map_err(EvalFailure::Unavailable)?;
            inputs.insert(*import, (*contents).clone());
        }
        for import in desc.index_imports.keys() {
            inputs.insert(*import, (*self.export_contents(*import, time)?).clone());
        }
        Ok(inputs)
    }

    /// The last change time at or before `time` (0 if none): every collection has the same contents there.
    fn canonical(&self, time: u64) -> u64 {
        self.change_times.range(..=time).next_back().copied().unwrap_or(0)
    }

    /// The storage collections an export reads, through any chain of index imports.
    pub fn sources(&self, id: GlobalId) -> Vec<GlobalId> {
        let Some(desc) = self.dataflows.get(&id) else { return Vec::new() };
        let mut sources: Vec<GlobalId> = desc.source_imports.keys().copied().collect();
        for import in desc.index_imports.keys() {
            sources.extend(self.sources(*import));
        }
        sources.sort();
        sources.dedup();
        sources
    }
}
