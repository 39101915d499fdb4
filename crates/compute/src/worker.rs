//! The timely worker loop: builds, schedules and drops dataflows, feeds storage data into them, answers
//! peeks from index traces, and reports frontiers and sink output to the process core.
//!
//! **What this is.** [`run_worker`] is the body of every timely worker thread. It executes [`ToWorker`]
//! messages in order (the core broadcasts the same dataflow commands to every worker, so all workers of
//! all processes build the same dataflows in the same order), then answers the peeks it can, reports what
//! changed, and only then steps (or parks in) timely. Peeks are answered *before* parking, so a peek never
//! waits for the park timeout (the notes measured 10 ms per peek otherwise).
//!
//! **What this is not.** It makes no protocol decisions: validation, reconciliation, routing of peeks and
//! storage I/O are the core's (`core/`). A worker trusts its messages and asserts what it relies on.
//!
//! **Invariants.**
//! - An index export's trace is compacted (logically and physically) to its allowed since *clamped to the
//!   upper it has reached*, so `batches_through(upper)` never panics (notes footgun 2).
//! - A peek is answered only if `since <= t` (checked here, since differential does not enforce it on
//!   reads: notes footgun 3) and `t < upper` of both the rows and the errors trace.
//! - A dataflow is dropped only on `DropDataflow`, which the core sends after every dataflow importing
//!   from it is gone (an exporter dropped first seals its importers at `[]`: notes footgun 4).
//!
//! **Tests.** Through the socket, in `tests/it`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU64;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Duration;

use differential_dataflow::Hashable;
use differential_dataflow::difference::{IsZero, Semigroup};
use differential_dataflow::input::InputSession;
use differential_dataflow::operators::arrange::agent::ShutdownButton;
use differential_dataflow::trace::cursor::cursor_list;
use differential_dataflow::trace::{Cursor, ExertionLogic, TraceReader};
use timely::dataflow::ProbeHandle;
use timely::dataflow::operators::CapabilitySet;
use timely::progress::Antichain;
use timely::worker::Worker;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, warn};

use protocol::{DataflowDescription, GlobalId, PeekResponse, Row, RowPacker, SinkConnection};

use crate::messages::{DataflowKey, FeedCredit, FromWorker, ToWorker, WorkerPeek};
use crate::metrics::{WorkerMetrics, WorkerTelemetry};
use crate::operators::{Gate, SinkBuffer, SinkKind, gate, sink};
use crate::render::{
    CheckedDiff, Coll, Diff, ErrTrace, OkTrace, RenderContext, RowInput, Time, arrange_errors, arrange_index,
    checked_updates, error_message, render_objects, types,
};

/// The name of a dataflow whose building panics its worker in debug builds (see `build`).
const PANIC_FOR_TESTS: &str = "compute test: a worker panics building this dataflow";

/// How long an idle worker parks (it is woken earlier by any message or timely event).
const IDLE_PARK: Duration = Duration::from_millis(10);
/// How long a worker with pending peeks parks (woken earlier by the events that can complete them).
const PEEK_PARK: Duration = Duration::from_millis(1);

/// A dataflow on this worker.
struct WorkerDataflow {
    /// Timely's index of the dataflow.
    timely_index: usize,
    /// The dataflow's as-of (a single time: timestamps are totally ordered).
    as_of: Time,
    /// Inputs of storage imports, fed from the process's listens.
    sources: BTreeMap<GlobalId, RowInput>,
    /// Inputs of constants, filled when scheduled.
    constants: Vec<(Vec<(Row, Diff)>, RowInput)>,
    /// Opens the gates on index imports when scheduled.
    gate: Rc<Gate>,
    /// Shutdown buttons of index imports, pressed when the dataflow is dropped.
    import_buttons: Vec<ShutdownButton<CapabilitySet<Time>>>,
    /// The frontier of the dataflow's inputs.
    input_probe: ProbeHandle<Time>,
    /// Export ids (indexes and sinks) not yet dropped.
    exports: BTreeSet<GlobalId>,
}

/// An index export on this worker.
struct WorkerIndex {
    dataflow: DataflowKey,
    ok: OkTrace,
    err: ErrTrace,
    /// The since the controller allowed (`AllowCompaction`), initially the as-of.
    allowed_since: Antichain<Time>,
    /// The compaction applied to the traces (the allowed since clamped to the uppers).
    applied: (Antichain<Time>, Antichain<Time>),
}

/// A sink export on this worker.
struct WorkerSink {
    dataflow: DataflowKey,
    buffer: Rc<RefCell<SinkBuffer>>,
}

/// Everything one worker keeps.
struct WorkerState {
    /// Index of the worker within its process.
    local_index: usize,
    responses: UnboundedSender<FromWorker>,
    dataflows: BTreeMap<DataflowKey, WorkerDataflow>,
    indexes: BTreeMap<GlobalId, WorkerIndex>,
    sinks: BTreeMap<GlobalId, WorkerSink>,
    peeks: Vec<WorkerPeek>,
    /// Frontiers last reported per export: (write, input).
    reported: BTreeMap<GlobalId, (Antichain<Time>, Antichain<Time>)>,
    /// Credits of the storage updates ingested since the last step; returned to their feeds after it.
    credits: Vec<FeedCredit>,
    /// The worker's metrics (`metrics.rs`).
    telemetry: WorkerTelemetry,
}

/// The body of a worker thread. Returns when told to shut down or when the core is gone.
pub(crate) fn run_worker(
    worker: &mut Worker,
    local_index: usize,
    commands: Receiver<ToWorker>,
    responses: UnboundedSender<FromWorker>,
    metrics: WorkerMetrics,
) {
    let telemetry = WorkerTelemetry::install(worker, metrics);
    let mut state = WorkerState {
        local_index,
        responses,
        dataflows: BTreeMap::new(),
        indexes: BTreeMap::new(),
        sinks: BTreeMap::new(),
        peeks: Vec::new(),
        reported: BTreeMap::new(),
        credits: Vec::new(),
        telemetry,
    };
    'outer: loop {
        let pass = state.telemetry.start_pass();
        loop {
            match commands.try_recv() {
                Ok(ToWorker::Shutdown) | Err(TryRecvError::Disconnected) => break 'outer,
                Ok(message) => state.handle(worker, message),
                Err(TryRecvError::Empty) => break,
            }
        }
        state.compact();
        state.answer_peeks();
        state.report();
        let park = if state.peeks.is_empty() { IDLE_PARK } else { PEEK_PARK };
        worker.step_or_park(Some(park));
        state.credits.clear();
        state.telemetry.end_pass(pass, state.peeks.len(), state.dataflows.len());
    }
    // Tear down: importers before exporters (reverse creation order), so no import is sealed by a drop.
    state.peeks.clear();
    state.indexes.clear();
    state.sinks.clear();
    let keys: Vec<DataflowKey> = state.dataflows.keys().rev().copied().collect();
    for key in keys {
        state.drop_dataflow(worker, key);
    }
    for index in worker.installed_dataflows() {
        worker.drop_dataflow(index);
    }
}

impl WorkerState {
    fn handle(&mut self, worker: &mut Worker, message: ToWorker) {
        match message {
            ToWorker::Build { key, desc } => {
                self.telemetry.parks().building(worker, |worker| self.build(worker, key, &desc))
            }
            ToWorker::Schedule { key } => {
                if let Some(dataflow) = self.dataflows.get_mut(&key)
                    && !dataflow.gate.is_open()
                {
                    dataflow.gate.open();
                    let first_worker = worker.index() == 0;
                    for (rows, mut input) in dataflow.constants.drain(..) {
                        if first_worker {
                            for (row, diff) in rows {
                                input.update_at(row, dataflow.as_of, CheckedDiff::from(diff));
                            }
                        }
                        input.close();
                    }
                }
            }
            ToWorker::AllowCompaction { id, frontier } => {
                assert!(!frontier.is_empty(), "dropping an export is DropExport");
                if let Some(index) = self.indexes.get_mut(&id) {
                    // Compaction frontiers only advance; the join keeps the later one.
                    if timely::PartialOrder::less_equal(&index.allowed_since, &frontier) {
                        index.allowed_since = frontier;
                    }
                }
            }
            ToWorker::DropExport { id } => {
                if let Some(index) = self.indexes.remove(&id)
                    && let Some(dataflow) = self.dataflows.get_mut(&index.dataflow)
                {
                    dataflow.exports.remove(&id);
                }
                if let Some(sink) = self.sinks.remove(&id) {
                    sink.buffer.borrow_mut().active = false;
                    if let Some(dataflow) = self.dataflows.get_mut(&sink.dataflow) {
                        dataflow.exports.remove(&id);
                    }
                }
                self.reported.remove(&id);
                let queued = self.peeks.len();
                self.peeks.retain(|peek| {
                    if peek.id == id {
                        let response = PeekResponse::Error(format!("index {id} was dropped"));
                        let _ = self.responses.send(FromWorker::Peek {
                            worker: self.local_index,
                            uuid: peek.uuid,
                            seq: peek.seq,
                            response,
                        });
                        false
                    } else {
                        true
                    }
                });
                self.telemetry.peeks_answered(queued - self.peeks.len());
            }
            ToWorker::DropDataflow { key } => self.drop_dataflow(worker, key),
            ToWorker::Peek(peek) => self.peeks.push(peek),
            ToWorker::CancelPeek { uuid } => self.peeks.retain(|peek| peek.uuid != uuid),
            ToWorker::SourceUpdates { key, import, updates, credit } => {
                if let Some(dataflow) = self.dataflows.get_mut(&key)
                    && let Some(input) = dataflow.sources.get_mut(&import)
                {
                    let floor = *input.time();
                    for (row, time, diff) in updates {
                        if time < floor && time > dataflow.as_of {
                            warn!(%import, time, floor, "storage update behind the listen's progress; advanced");
                        }
                        input.update_at(row, time.max(floor), CheckedDiff::from(diff));
                    }
                }
                // Returned to the feed once the next step has taken the updates into the dataflow.
                self.credits.push(credit);
            }
            ToWorker::SourceProgress { key, import, frontier } => {
                if let Some(dataflow) = self.dataflows.get_mut(&key) {
                    match frontier.as_option() {
                        Some(time) => {
                            if let Some(input) = dataflow.sources.get_mut(&import)
                                && *time > *input.time()
                            {
                                input.advance_to(*time);
                                input.flush();
                            }
                        }
                        None => {
                            if let Some(input) = dataflow.sources.remove(&import) {
                                input.close();
                            }
                        }
                    }
                }
            }
            ToWorker::Shutdown => unreachable!("handled by the loop"),
        }
    }

    /// Builds a dataflow. The core has validated it and checked that its index imports exist here.
    fn build(&mut self, worker: &mut Worker, key: DataflowKey, desc: &DataflowDescription<Time>) {
        // Fault injection, debug builds only: nothing a controller sends panics a worker, yet the tests
        // of what a worker's panic does to its process (`tests/it/bad_input.rs`) need one.
        if cfg!(debug_assertions) && desc.debug_name == PANIC_FOR_TESTS {
            panic!("{PANIC_FOR_TESTS}");
        }
        let as_of_frontier = desc.as_of.clone().expect("validated dataflow has an as_of");
        let as_of = *as_of_frontier.as_option().expect("validated dataflow has a non-empty as_of");
        let timely_index = worker.next_dataflow_index();
        let gate_state = Rc::new(Gate::default());
        let input_probe = ProbeHandle::new();
        let peers = worker.peers();
        let worker_index = worker.index();
        let mut sources = BTreeMap::new();
        let mut import_buttons = Vec::new();
        let mut new_indexes = Vec::new();
        let mut new_sinks = Vec::new();
        let constants: Rc<RefCell<Vec<RowInput>>> = Rc::new(RefCell::new(Vec::new()));
        let indexes = &mut self.indexes;
        let constant_rows = worker.dataflow_named::<Time, _, _>(&desc.debug_name, |scope| {
            let mut collections: BTreeMap<GlobalId, Coll<'_>> = BTreeMap::new();
            let mut import_errs: Vec<Coll<'_>> = Vec::new();
            for id in desc.source_imports.keys() {
                let mut input = InputSession::new();
                input.advance_to(as_of);
                let coll = input.to_collection(scope).probe_with(&input_probe);
                sources.insert(*id, input);
                collections.insert(*id, coll);
            }
            for id in desc.index_imports.keys() {
                let index = indexes.get_mut(id);
                assert!(index.is_some(), "core checked that index import {id} exists");
                let index = index.expect("asserted");
                let (ok, ok_button) = index.ok.import_frontier_core(
                    scope,
                    &format!("Import {id}"),
                    as_of_frontier.clone(),
                    Antichain::new(),
                );
                let (err, err_button) = index.err.import_frontier_core(
                    scope,
                    &format!("ImportErrors {id}"),
                    as_of_frontier.clone(),
                    Antichain::new(),
                );
                import_buttons.push(ok_button);
                import_buttons.push(err_button);
                let ok = ok.as_collection(|_key, row: &Row| row.clone());
                let ok = gate(ok, Rc::clone(&gate_state), as_of).probe_with(&input_probe);
                // The errors trace holds every error on every worker: keep only this worker's share so
                // the importer's own (distributed) error collection holds each error once.
                let err = err
                    .as_collection(|error: &Row, _: &()| error.clone())
                    .filter(move |error| (error.hashed() % peers as u64) as usize == worker_index);
                let err = gate(err, Rc::clone(&gate_state), as_of);
                collections.insert(*id, ok);
                import_errs.push(err);
            }
            let new_constant = constant_maker(scope, Rc::clone(&constants), as_of);
            let mut ctx = RenderContext::new(collections, new_constant, types(desc));
            render_objects(desc, &mut ctx);
            ctx.errs.extend(import_errs);
            let errs: Coll<'_> = match ctx.errs.len() {
                0 => {
                    let mut empty = InputSession::new();
                    let coll = empty.to_collection(scope);
                    empty.close();
                    coll
                }
                _ => {
                    let first = ctx.errs.remove(0);
                    first.concatenate(std::mem::take(&mut ctx.errs))
                }
            };
            let err_trace =
                if desc.index_exports.is_empty() { None } else { Some(arrange_errors(errs.clone()).trace) };
            for (id, export) in &desc.index_exports {
                let oks = ctx.collections[&export.on_id].clone();
                let ok = arrange_index(oks, export.key.clone());
                new_indexes.push((*id, ok.trace, err_trace.clone().expect("an index export exists")));
            }
            for (id, export) in &desc.sink_exports {
                let oks = ctx.collections[&export.from].clone();
                let kind = match &export.connection {
                    SinkConnection::Subscribe { with_snapshot } => {
                        SinkKind::Subscribe { with_snapshot: *with_snapshot }
                    }
                    SinkConnection::MaterializedView { .. } => SinkKind::MaterializedView,
                    SinkConnection::CopyTo { .. } => SinkKind::CopyTo,
                };
                new_sinks.push((*id, sink(oks, errs.clone(), kind, as_of)));
            }
            ctx.constants.iter().map(|(rows, _)| rows.clone()).collect::<Vec<_>>()
        });
        let constants: Vec<_> = constant_rows.into_iter().zip(constants.borrow_mut().drain(..)).collect();
        let mut exports = BTreeSet::new();
        for (id, mut ok, mut err) in new_indexes {
            ok.set_logical_compaction(as_of_frontier.borrow());
            err.set_logical_compaction(as_of_frontier.borrow());
            exports.insert(id);
            self.indexes.insert(
                id,
                WorkerIndex {
                    dataflow: key,
                    ok,
                    err,
                    allowed_since: as_of_frontier.clone(),
                    applied: (Antichain::from_elem(0), Antichain::from_elem(0)),
                },
            );
        }
        for (id, buffer) in new_sinks {
            exports.insert(id);
            self.sinks.insert(id, WorkerSink { dataflow: key, buffer });
        }
        debug!(key, timely_index, name = %desc.debug_name, "built dataflow");
        self.dataflows.insert(
            key,
            WorkerDataflow {
                timely_index,
                as_of,
                sources,
                constants,
                gate: gate_state,
                import_buttons,
                input_probe,
                exports,
            },
        );
    }

    fn drop_dataflow(&mut self, worker: &mut Worker, key: DataflowKey) {
        let Some(mut dataflow) = self.dataflows.remove(&key) else {
            return;
        };
        for id in std::mem::take(&mut dataflow.exports) {
            self.indexes.remove(&id);
            if let Some(sink) = self.sinks.remove(&id) {
                sink.buffer.borrow_mut().active = false;
            }
            self.reported.remove(&id);
        }
        for button in dataflow.import_buttons.iter_mut() {
            button.press();
        }
        drop(dataflow.sources);
        drop(dataflow.constants);
        if worker.installed_dataflows().contains(&dataflow.timely_index) {
            worker.drop_dataflow(dataflow.timely_index);
        }
        debug!(key, "dropped dataflow");
    }

    /// Applies allowed compaction to every index, clamped to the upper each trace has reached.
    fn compact(&mut self) {
        for index in self.indexes.values_mut() {
            let since = index.allowed_since.as_option().copied();
            let Some(since) = since else { continue };
            let clamp = |upper: &Antichain<Time>| match upper.as_option() {
                Some(upper) => Antichain::from_elem(since.min(*upper)),
                None => Antichain::from_elem(since),
            };
            let ok_target = clamp(&read_upper(&mut index.ok));
            if ok_target != index.applied.0 {
                index.ok.set_logical_compaction(ok_target.borrow());
                index.ok.set_physical_compaction(ok_target.borrow());
                index.applied.0 = ok_target;
            }
            let err_target = clamp(&read_upper(&mut index.err));
            if err_target != index.applied.1 {
                index.err.set_logical_compaction(err_target.borrow());
                index.err.set_physical_compaction(err_target.borrow());
                index.applied.1 = err_target;
            }
        }
    }

    fn answer_peeks(&mut self) {
        if self.peeks.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.peeks);
        let queued = pending.len();
        pending.retain(|peek| match self.try_answer(peek) {
            Some(response) => {
                let _ = self.responses.send(FromWorker::Peek {
                    worker: self.local_index,
                    uuid: peek.uuid,
                    seq: peek.seq,
                    response,
                });
                false
            }
            None => true,
        });
        self.telemetry.peeks_answered(queued - pending.len());
        self.peeks = pending;
    }

    /// The answer to `peek`, or `None` if the index has not reached its time yet.
    fn try_answer(&mut self, peek: &WorkerPeek) -> Option<PeekResponse> {
        let Some(index) = self.indexes.get_mut(&peek.id) else {
            return Some(PeekResponse::Error(format!("unknown index {}", peek.id)));
        };
        let time = peek.timestamp;
        if !index.allowed_since.less_equal(&time) {
            return Some(PeekResponse::Error(format!(
                "peek of {} at {time} is before its since {:?}",
                peek.id,
                index.allowed_since.elements()
            )));
        }
        let ok_upper = read_upper(&mut index.ok);
        let err_upper = read_upper(&mut index.err);
        if ok_upper.less_equal(&time) || err_upper.less_equal(&time) {
            return None;
        }
        if let Some(message) = first_error(&mut index.err, &err_upper, time) {
            return Some(PeekResponse::Error(message));
        }
        Some(read_rows(&mut index.ok, &ok_upper, peek))
    }

    /// Sends frontier changes and sink output, each naming the dataflow it comes from.
    fn report(&mut self) {
        let mut messages = Vec::new();
        for (id, index) in self.indexes.iter_mut() {
            let ok = read_upper(&mut index.ok);
            let err = read_upper(&mut index.err);
            let write = frontiers::antichain::meet(&ok.borrow(), &err.borrow());
            let input = self
                .dataflows
                .get(&index.dataflow)
                .map(|d| d.input_probe.with_frontier(|f| f.to_owned()))
                .unwrap_or_default();
            messages.push((*id, index.dataflow, write, input));
        }
        for (id, sink) in self.sinks.iter() {
            let mut buffer = sink.buffer.borrow_mut();
            let input = self
                .dataflows
                .get(&sink.dataflow)
                .map(|d| d.input_probe.with_frontier(|f| f.to_owned()))
                .unwrap_or_default();
            if buffer.frontier_changed || !buffer.updates.is_empty() || !buffer.errors.is_empty() {
                buffer.frontier_changed = false;
                let (updates, errors) =
                    checked_updates(std::mem::take(&mut buffer.updates), std::mem::take(&mut buffer.errors));
                let _ = self.responses.send(FromWorker::Sink {
                    worker: self.local_index,
                    dataflow: sink.dataflow,
                    id: *id,
                    updates,
                    errors,
                    frontier: buffer.frontier.clone(),
                });
            }
            messages.push((*id, sink.dataflow, buffer.frontier.clone(), input));
        }
        for (id, dataflow, write, input) in messages {
            let changed = match self.reported.get(&id) {
                Some((w, i)) => *w != write || *i != input,
                None => true,
            };
            if changed {
                self.reported.insert(id, (write.clone(), input.clone()));
                let _ = self.responses.send(FromWorker::Frontiers {
                    worker: self.local_index,
                    dataflow,
                    id,
                    write,
                    input,
                });
            }
        }
    }
}

/// Makes empty inputs for a dataflow's constants; the worker fills them when the dataflow is scheduled.
fn constant_maker<'s>(
    scope: timely::dataflow::Scope<'s, Time>,
    constants: Rc<RefCell<Vec<RowInput>>>,
    as_of: Time,
) -> Box<dyn FnMut() -> Coll<'s> + 's> {
    Box::new(move || {
        let mut input = InputSession::new();
        input.advance_to(as_of);
        let coll = input.to_collection(scope);
        constants.borrow_mut().push(input);
        coll
    })
}

/// The upper of a trace.
fn read_upper<Tr: TraceReader<Time = Time>>(trace: &mut Tr) -> Antichain<Time> {
    let mut upper = Antichain::new();
    trace.read_upper(&mut upper);
    upper
}

/// The message of some error present at `time`, if any.
fn first_error(trace: &mut ErrTrace, upper: &Antichain<Time>, time: Time) -> Option<String> {
    let batches = trace.batches_through(upper.borrow())?;
    let (mut cursor, storage) = cursor_list(batches);
    while let Some(error) = cursor.get_key(&storage) {
        let mut sum = CheckedDiff::ZERO;
        while cursor.val_valid(&storage) {
            cursor.map_times(&storage, |t, d| {
                if *t <= time {
                    sum.plus_equals(d);
                }
            });
            cursor.step_val(&storage);
        }
        if !sum.is_zero() {
            return Some(error_message(error));
        }
        cursor.step_key(&storage);
    }
    None
}

/// Reads the rows of an index at `peek.timestamp` (keys or a full scan), applies the peek's
/// map/filter/project and partial finishing, and enforces the size limit.
fn read_rows(trace: &mut OkTrace, upper: &Antichain<Time>, peek: &WorkerPeek) -> PeekResponse {
    let time = peek.timestamp;
    let Some(batches) = trace.batches_through(upper.borrow()) else {
        return PeekResponse::Error(format!("index {} is compacted beyond its upper", peek.id));
    };
    let (mut cursor, storage) = cursor_list(batches);
    let mut rows: Vec<(Row, Diff)> = Vec::new();
    let mut datums = Vec::new();
    let mut packer = RowPacker::new();
    let mut error: Option<String> = None;
    let keys: Option<Vec<Row>> = peek.keys.as_ref().map(|keys| {
        let mut keys = keys.clone();
        keys.sort();
        keys.dedup();
        keys
    });
    let mut next_key = 0;
    loop {
        match &keys {
            Some(keys) => {
                let Some(key) = keys.get(next_key) else { break };
                next_key += 1;
                cursor.seek_key(&storage, key);
                if cursor.get_key(&storage) != Some(key) {
                    continue;
                }
            }
            None => {
                if !cursor.key_valid(&storage) {
                    break;
                }
            }
        }
        while let Some(row) = cursor.get_val(&storage) {
            let mut sum = CheckedDiff::ZERO;
            cursor.map_times(&storage, |t: &Time, d: &CheckedDiff| {
                if *t <= time {
                    sum.plus_equals(d);
                }
            });
            // The protocol's multiplicities are i64s: one beyond (or an overflow) is an error.
            let sum = match sum.to_i64() {
                Some(sum) => sum,
                None => {
                    if error.is_none() {
                        error = Some(format!(
                            "index {} holds row {row} with multiplicity {sum}, not an i64",
                            peek.id
                        ));
                    }
                    0
                }
            };
            if sum < 0 && error.is_none() {
                error = Some(format!("index {} holds row {row} with negative multiplicity {sum}", peek.id));
            }
            if sum > 0 {
                match peek.mfp.apply_with(row.as_row_ref(), &mut datums, &mut packer) {
                    Ok(Some(out)) => rows.push((out, sum)),
                    Ok(None) => {}
                    Err(e) => {
                        if error.is_none() {
                            error = Some(format!("peek map/filter/project: {e}"));
                        }
                    }
                }
            }
            cursor.step_val(&storage);
        }
        if keys.is_none() {
            cursor.step_key(&storage);
        }
    }
    if let Some(error) = error {
        return PeekResponse::Error(error);
    }
    finish_rows(rows, &peek.finishing, peek.max_result_size_bytes)
}

/// Consolidates `(row, count)` pairs, applies the partial finishing and the size limit.
pub(crate) fn finish_rows(
    rows: Vec<(Row, Diff)>,
    finishing: &protocol::RowSetFinishing,
    max_result_size_bytes: Option<u64>,
) -> PeekResponse {
    // Rows the map/filter/project made equal add up exactly; their sum must be an i64 again.
    let mut checked: Vec<(Row, CheckedDiff)> =
        rows.into_iter().map(|(row, count)| (row, CheckedDiff::from(count))).collect();
    differential_dataflow::consolidation::consolidate(&mut checked);
    let mut counted = Vec::with_capacity(checked.len());
    for (row, count) in checked {
        let Some(count) = count.to_i64() else {
            return PeekResponse::Error(format!("row {row} has multiplicity {count}, not an i64"));
        };
        match u64::try_from(count).ok().and_then(NonZeroU64::new) {
            Some(count) => counted.push((row, count)),
            None if count == 0 => {}
            None => return PeekResponse::Error(format!("row {row} has negative multiplicity {count}")),
        }
    }
    let counted = finishing.partial().finish(counted);
    if let Some(max) = max_result_size_bytes {
        let mut size: u64 = 0;
        for (row, count) in &counted {
            size = size.saturating_add((row.byte_len() as u64).saturating_mul(count.get()));
        }
        if size > max {
            return PeekResponse::ResultTooLarge { size_bytes: size, max_bytes: max };
        }
    }
    PeekResponse::Rows(counted)
}

/// Which worker (global index) owns `key` in an arrangement by key, exactly as differential's exchange
/// routes it: `hashed() & (peers - 1)` for a power of two, otherwise `% peers`.
pub(crate) fn key_owner(key: &Row, peers: usize) -> usize {
    let hash = key.hashed();
    let peers = peers as u64;
    if peers.is_power_of_two() { (hash & (peers - 1)) as usize } else { (hash % peers) as usize }
}

/// Which worker (global index) ingests a storage update: by the hash of the row.
pub(crate) fn row_owner(row: &Row, peers: usize) -> usize {
    key_owner(row, peers)
}

/// Installs the idle-merge rule in a worker configuration: differential asks every arrangement built
/// with this configuration, each time the arrangement's operator runs, how much merge work to do beyond
/// what new updates pay for. The answer reads `effort` each time (the process's
/// `UpdateConfiguration.idle_merge_effort`), so a new value reaches every arrangement, old or new, the
/// next time its operator runs (an update or a frontier change on its input; an arrangement that still
/// has merging to do keeps itself scheduled). 0 turns idle merging off.
///
/// The rule is differential's own (`differential_dataflow::configure`, which fixes the effort when the
/// workers start): spend `effort` while some level of the spine holds two batches being merged, or more
/// than one level holds data, so idle arrangements end as one batch and peeks read few batches.
pub(crate) fn install_idle_merge(config: &mut timely::WorkerConfig, effort: Arc<AtomicUsize>) {
    let logic: ExertionLogic = Arc::new(move |levels: &[(usize, usize, usize)]| {
        let effort = effort.load(Ordering::Relaxed);
        if effort == 0 {
            return None;
        }
        let mut non_empty = 0;
        for (_level, batches, length) in levels {
            if *batches > 1 {
                return Some(effort);
            }
            if *length > 0 {
                non_empty += 1;
            }
            if non_empty > 1 {
                return Some(effort);
            }
        }
        None
    });
    config.set::<ExertionLogic>("differential/default_exert_logic".to_string(), logic);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use differential_dataflow::input::InputSession;
    use differential_dataflow::trace::TraceReader;
    use timely::dataflow::ProbeHandle;
    use timely::dataflow::operators::Probe;

    use super::install_idle_merge;

    /// Runs one worker with the idle-merge rule at `effort`: inserts 64 updates at 64 times, then steps
    /// idly; after half the steps sets the effort to `later` and sends one more update. Returns the
    /// arrangement's batch counts after each half.
    fn batch_counts(effort: usize, later: usize) -> (usize, usize) {
        let mut config = timely::WorkerConfig::default();
        let shared = Arc::new(AtomicUsize::new(effort));
        install_idle_merge(&mut config, Arc::clone(&shared));
        let timely_config =
            timely::Config { communication: timely::CommunicationConfig::Thread, worker: config };
        let guards = timely::execute(timely_config, move |worker| {
            let mut input: InputSession<u64, (u64, u64), isize> = InputSession::new();
            let probe = ProbeHandle::new();
            let mut trace = worker.dataflow::<u64, _, _>(|scope| {
                let arranged = input.to_collection(scope).arrange_by_key();
                arranged.stream.clone().probe_with(&probe);
                arranged.trace
            });
            // Batches holding updates (a spine also keeps empty spans).
            let count = |trace: &mut differential_dataflow::operators::arrange::TraceAgent<_>| {
                let mut batches = 0;
                trace.map_spans(|span| batches += usize::from(span.has_updates()));
                batches
            };
            for time in 0..64u64 {
                input.update_at((time, time), time, 1);
                input.advance_to(time + 1);
                input.flush();
                while probe.less_than(input.time()) {
                    worker.step();
                }
                // As the replica's workers do (`WorkerState::compact`): batches below the physical
                // compaction frontier are merged.
                let frontier = [time + 1];
                trace.set_logical_compaction(timely::progress::frontier::AntichainRef::new(&frontier));
                trace.set_physical_compaction(timely::progress::frontier::AntichainRef::new(&frontier));
            }
            for _ in 0..500 {
                worker.step();
            }
            let first = count(&mut trace);
            shared.store(later, Ordering::Relaxed);
            input.update_at((1000, 0), 64, 1);
            input.advance_to(65);
            input.flush();
            for _ in 0..500 {
                worker.step();
            }
            let frontier = [65];
            trace.set_logical_compaction(timely::progress::frontier::AntichainRef::new(&frontier));
            trace.set_physical_compaction(timely::progress::frontier::AntichainRef::new(&frontier));
            for _ in 0..500 {
                worker.step();
            }
            (first, count(&mut trace))
        })
        .expect("timely starts");
        guards.join().pop().expect("one worker").expect("the worker does not panic")
    }

    #[test]
    fn idle_merging_follows_the_effort_set_at_runtime() {
        let (off, on) = batch_counts(0, 1_000);
        assert!(off > 2, "without idle merging the spine keeps several batches: {off}");
        assert!(on <= 2, "with idle merging switched on at runtime it merges down: {on}");
        let (on_from_start, _) = batch_counts(1_000, 1_000);
        assert!(on_from_start <= 2, "idle merging from the start merges down: {on_from_start}");
    }
}
