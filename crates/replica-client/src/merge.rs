//! [`ResponseMerger`]: one replica's answer from the answers of its processes.
//!
//! A multi-process replica answers every command once per process, each process for its own workers'
//! share. The merger combines them into what a single-process replica would have said:
//!
//! - **frontiers**: the meet across processes, emitted once every process has reported and only when it
//!   moves; a process whose own frontier regresses is a protocol violation;
//! - **peeks**: the union of every process's rows once all have answered (an error from any part wins);
//! - **subscribes**: updates buffered per process; a batch `[lower, upper)` is emitted when every process
//!   has reached `upper` (the meet of their uppers), so each time range is complete when emitted;
//!   `DroppedAt` once every process has dropped it; an error batch from any process at once;
//! - **copy-to**: row counts summed once all processes answered (any error or drop wins);
//! - **hydration status**: hydrated once every process says so;
//! - **failure status** (`StatusResponse::Failed`): the first process's at once (an export that cannot
//!   progress on one process cannot progress on the replica), later ones for the same export dropped.
//!
//! State is per connection: [`ResponseMerger::reset`] forgets everything (frontiers are never carried
//! across connections).
//!
//! **Tests:** unit tests below; `tests/it/core.rs` drives two processes answering a peek in either order.

use std::collections::{BTreeMap, BTreeSet};

use frontiers::antichain::meet_all;
use frontiers::{Antichain, PartialOrder, Timestamp};
use protocol::{
    ComputeResponse, CopyToResponse, Diff, FrontiersResponse, GlobalId, PeekId, PeekResponse, Row,
    StatusResponse, SubscribeBatch, SubscribeResponse,
};

/// A process broke the protocol; the whole replica connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    /// A process reported a frontier behind one it reported before.
    #[error("process {process} regressed the {kind} frontier of {id} from {previous} to {new}")]
    FrontierRegression {
        /// The process.
        process: usize,
        /// The collection.
        id: GlobalId,
        /// Which frontier (write, input, output).
        kind: &'static str,
        /// The earlier frontier, rendered.
        previous: String,
        /// The new one, rendered.
        new: String,
    },
    /// A process answered a peek twice.
    #[error("process {process} answered peek {uuid} twice")]
    DuplicatePeekResponse {
        /// The process.
        process: usize,
        /// The peek.
        uuid: PeekId,
    },
    /// A subscribe batch that does not start where the process's previous batch ended.
    #[error("process {process}: subscribe {id} batch starts at {lower} but the previous ended at {expected}")]
    SubscribeGap {
        /// The process.
        process: usize,
        /// The subscribe.
        id: GlobalId,
        /// The batch's lower, rendered.
        lower: String,
        /// The previous upper, rendered.
        expected: String,
    },
    /// A response from a process index the replica does not have.
    #[error("response from process {process} of a {processes}-process replica")]
    UnknownProcess {
        /// The process index.
        process: usize,
        /// The replica's process count.
        processes: usize,
    },
}

const KINDS: [&str; 3] = ["write", "input", "output"];

#[derive(Debug)]
struct FrontierState<T> {
    /// Per process, per kind (write, input, output): the last reported frontier.
    reported: Vec<[Option<Antichain<T>>; 3]>,
    /// Per kind: the last merged frontier emitted.
    emitted: [Option<Antichain<T>>; 3],
}

#[derive(Debug)]
struct SubscribeState<T> {
    /// Per process: the upper of its last batch (None before its first).
    uppers: Vec<Option<Antichain<T>>>,
    /// Per process: whether it sent `DroppedAt` (and where).
    dropped: Vec<Option<Antichain<T>>>,
    /// The meet of every process's first lower: where the merged stream starts.
    start: Antichain<T>,
    /// Updates received but not yet emitted.
    buffer: Vec<(T, Row, Diff)>,
    /// The upper of the last emitted batch (the lower of the next).
    emitted: Option<Antichain<T>>,
    /// An error was emitted or the stream ended: ignore the rest.
    done: bool,
}

/// Merges the responses of one replica's processes. See the module documentation.
#[derive(Debug)]
pub struct ResponseMerger<T: Timestamp> {
    processes: usize,
    frontiers: BTreeMap<GlobalId, FrontierState<T>>,
    peeks: BTreeMap<PeekId, Vec<Option<PeekResponse>>>,
    subscribes: BTreeMap<GlobalId, SubscribeState<T>>,
    copy_tos: BTreeMap<GlobalId, Vec<Option<CopyToResponse>>>,
    hydration: BTreeMap<GlobalId, (Vec<Option<bool>>, Option<bool>)>,
    /// Exports whose failure was emitted.
    failed: BTreeSet<GlobalId>,
}

impl<T: Timestamp> ResponseMerger<T> {
    /// A merger for a replica of `processes` processes (at least one).
    pub fn new(processes: usize) -> Self {
        assert!(processes > 0, "a replica has at least one process");
        ResponseMerger {
            processes,
            frontiers: BTreeMap::new(),
            peeks: BTreeMap::new(),
            subscribes: BTreeMap::new(),
            copy_tos: BTreeMap::new(),
            hydration: BTreeMap::new(),
            failed: BTreeSet::new(),
        }
    }

    /// Forgets all per-connection state.
    pub fn reset(&mut self) {
        *self = ResponseMerger::new(self.processes);
    }

    /// The number of peeks waiting for some process's answer.
    pub fn pending_peeks(&self) -> usize {
        self.peeks.len()
    }

    /// Forgets a collection's merge state (after it was dropped and reported so).
    pub fn forget_collection(&mut self, id: GlobalId) {
        self.frontiers.remove(&id);
        self.subscribes.remove(&id);
        self.copy_tos.remove(&id);
        self.hydration.remove(&id);
        self.failed.remove(&id);
    }

    /// Takes one process's response; returns the merged responses it completes.
    pub fn receive(
        &mut self,
        process: usize,
        response: ComputeResponse<T>,
    ) -> Result<Vec<ComputeResponse<T>>, MergeError> {
        if process >= self.processes {
            return Err(MergeError::UnknownProcess { process, processes: self.processes });
        }
        let processes = self.processes;
        let mut out = Vec::new();
        match response {
            ComputeResponse::Frontiers { id, frontiers } => {
                let state = self.frontiers.entry(id).or_insert_with(|| FrontierState {
                    reported: (0..processes).map(|_| [None, None, None]).collect(),
                    emitted: [None, None, None],
                });
                let FrontiersResponse { write_frontier, input_frontier, output_frontier } = frontiers;
                let mut merged: [Option<Antichain<T>>; 3] = [None, None, None];
                for (kind, new) in [write_frontier, input_frontier, output_frontier].into_iter().enumerate() {
                    let Some(new) = new else { continue };
                    if let Some(previous) = &state.reported[process][kind]
                        && !PartialOrder::less_equal(previous, &new)
                    {
                        return Err(MergeError::FrontierRegression {
                            process,
                            id,
                            kind: KINDS[kind],
                            previous: format!("{previous:?}"),
                            new: format!("{new:?}"),
                        });
                    }
                    state.reported[process][kind] = Some(new);
                    if state.reported.iter().all(|p| p[kind].is_some()) {
                        let meet =
                            meet_all(state.reported.iter().map(|p| p[kind].as_ref().expect("all").borrow()));
                        if state.emitted[kind].as_ref() != Some(&meet) {
                            state.emitted[kind] = Some(meet.clone());
                            merged[kind] = Some(meet);
                        }
                    }
                }
                let [write_frontier, input_frontier, output_frontier] = merged;
                let merged = FrontiersResponse { write_frontier, input_frontier, output_frontier };
                if !merged.is_empty() {
                    out.push(ComputeResponse::Frontiers { id, frontiers: merged });
                }
            }
            ComputeResponse::PeekResponse { uuid, response } => {
                let parts = self.peeks.entry(uuid).or_insert_with(|| vec![None; processes]);
                if parts[process].is_some() {
                    return Err(MergeError::DuplicatePeekResponse { process, uuid });
                }
                parts[process] = Some(response);
                if parts.iter().all(Option::is_some) {
                    let parts = self.peeks.remove(&uuid).expect("present");
                    let response = PeekResponse::union(parts.into_iter().map(|p| p.expect("all answered")));
                    out.push(ComputeResponse::PeekResponse { uuid, response });
                }
            }
            ComputeResponse::SubscribeResponse { id, response } => {
                let state = self.subscribes.entry(id).or_insert_with(|| SubscribeState {
                    uppers: vec![None; processes],
                    dropped: vec![None; processes],
                    start: Antichain::new(),
                    buffer: Vec::new(),
                    emitted: None,
                    done: false,
                });
                if state.done {
                    return Ok(out);
                }
                match response {
                    SubscribeResponse::Batch(batch) => {
                        if let Some(expected) = &state.uppers[process]
                            && *expected != batch.lower
                        {
                            return Err(MergeError::SubscribeGap {
                                process,
                                id,
                                lower: format!("{:?}", batch.lower),
                                expected: format!("{expected:?}"),
                            });
                        }
                        if state.uppers[process].replace(batch.upper.clone()).is_none() {
                            state.start =
                                frontiers::antichain::meet(&state.start.borrow(), &batch.lower.borrow());
                        }
                        match batch.updates {
                            Err(error) => {
                                state.done = true;
                                out.push(ComputeResponse::SubscribeResponse {
                                    id,
                                    response: SubscribeResponse::Batch(SubscribeBatch {
                                        lower: state.emitted.clone().unwrap_or_else(|| state.start.clone()),
                                        upper: Antichain::new(),
                                        updates: Err(error),
                                    }),
                                });
                            }
                            Ok(updates) => {
                                state.buffer.extend(updates);
                                if state.emitted.is_none() && state.uppers.iter().all(Option::is_some) {
                                    // The first emitted batch starts where the earliest process started.
                                    state.emitted = Some(state.start.clone());
                                }
                                Self::emit_subscribe(id, state, &mut out);
                            }
                        }
                    }
                    SubscribeResponse::DroppedAt(frontier) => {
                        state.dropped[process] = Some(frontier);
                        if state.dropped.iter().all(Option::is_some) {
                            let at =
                                meet_all(state.dropped.iter().map(|f| f.as_ref().expect("all").borrow()));
                            state.done = true;
                            out.push(ComputeResponse::SubscribeResponse {
                                id,
                                response: SubscribeResponse::DroppedAt(at),
                            });
                        }
                    }
                }
            }
            ComputeResponse::CopyToResponse { id, response } => {
                let parts = self.copy_tos.entry(id).or_insert_with(|| vec![None; processes]);
                parts[process] = Some(response);
                if parts.iter().all(Option::is_some) {
                    let parts = self.copy_tos.remove(&id).expect("present");
                    let mut total = 0u64;
                    let mut merged = None;
                    for part in parts.into_iter().flatten() {
                        match part {
                            CopyToResponse::RowCount(n) => total += n,
                            CopyToResponse::Error(e) => merged = Some(CopyToResponse::Error(e)),
                            CopyToResponse::Dropped => {
                                if merged.is_none() {
                                    merged = Some(CopyToResponse::Dropped);
                                }
                            }
                        }
                    }
                    let response = merged.unwrap_or(CopyToResponse::RowCount(total));
                    out.push(ComputeResponse::CopyToResponse { id, response });
                }
            }
            ComputeResponse::Status(StatusResponse::Hydration { id, hydrated }) => {
                let (parts, emitted) =
                    self.hydration.entry(id).or_insert_with(|| (vec![None; processes], None));
                parts[process] = Some(hydrated);
                if parts.iter().all(Option::is_some) {
                    let merged = parts.iter().all(|p| *p == Some(true));
                    if *emitted != Some(merged) {
                        *emitted = Some(merged);
                        out.push(ComputeResponse::Status(StatusResponse::Hydration { id, hydrated: merged }));
                    }
                }
            }
            ComputeResponse::Status(StatusResponse::Failed { id, error }) => {
                if self.failed.insert(id) {
                    out.push(ComputeResponse::Status(StatusResponse::Failed { id, error }));
                }
            }
            other @ (ComputeResponse::CommandRejected { .. }
            | ComputeResponse::Hello { .. }
            | ComputeResponse::HelloRefused { .. }) => out.push(other),
        }
        Ok(out)
    }

    fn emit_subscribe(id: GlobalId, state: &mut SubscribeState<T>, out: &mut Vec<ComputeResponse<T>>) {
        if !state.uppers.iter().all(Option::is_some) {
            return;
        }
        let Some(lower) = state.emitted.clone() else { return };
        let upper = meet_all(state.uppers.iter().map(|u| u.as_ref().expect("all").borrow()));
        if upper == lower || !PartialOrder::less_equal(&lower, &upper) {
            return;
        }
        let (mut ready, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut state.buffer).into_iter().partition(|(t, _, _)| !upper.less_equal(t));
        state.buffer = rest;
        ready.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let consolidated = consolidate_updates(ready);
        state.emitted = Some(upper.clone());
        if upper.is_empty() {
            state.done = true;
        }
        out.push(ComputeResponse::SubscribeResponse {
            id,
            response: SubscribeResponse::Batch(SubscribeBatch { lower, upper, updates: Ok(consolidated) }),
        });
    }
}

/// Sums the diffs of equal `(time, row)` pairs in sorted updates and drops zeros.
fn consolidate_updates<T: Timestamp>(sorted: Vec<(T, Row, Diff)>) -> Vec<(T, Row, Diff)> {
    let mut out: Vec<(T, Row, Diff)> = Vec::with_capacity(sorted.len());
    for (time, row, diff) in sorted {
        match out.last_mut() {
            Some((t, r, d)) if *t == time && *r == row => *d += diff,
            _ => out.push((time, row, diff)),
        }
    }
    out.retain(|(_, _, d)| *d != 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Datum;
    use std::num::NonZeroU64;

    fn frontier(t: u64) -> Antichain<u64> {
        Antichain::from_elem(t)
    }

    fn write(id: u64, t: u64) -> ComputeResponse<u64> {
        ComputeResponse::Frontiers {
            id: GlobalId::User(id),
            frontiers: FrontiersResponse { write_frontier: Some(frontier(t)), ..Default::default() },
        }
    }

    #[test]
    fn frontiers_are_the_meet_once_every_process_reported() {
        let mut merger = ResponseMerger::<u64>::new(2);
        assert!(merger.receive(0, write(1, 5)).unwrap().is_empty());
        assert_eq!(merger.receive(1, write(1, 3)).unwrap(), vec![write(1, 3)]);
        assert!(merger.receive(0, write(1, 7)).unwrap().is_empty(), "meet unchanged");
        assert_eq!(merger.receive(1, write(1, 9)).unwrap(), vec![write(1, 7)]);
    }

    #[test]
    fn an_exports_failure_is_forwarded_from_the_first_process_once_per_connection() {
        let failed = |id: u64, error: &str| {
            ComputeResponse::<u64>::Status(StatusResponse::Failed {
                id: GlobalId::User(id),
                error: error.to_string(),
            })
        };
        let mut merger = ResponseMerger::<u64>::new(2);
        assert_eq!(
            merger.receive(1, failed(1, "target dropped")).unwrap(),
            vec![failed(1, "target dropped")]
        );
        assert!(merger.receive(0, failed(1, "target dropped")).unwrap().is_empty(), "once");
        assert_eq!(merger.receive(0, failed(2, "import failed")).unwrap(), vec![failed(2, "import failed")]);
        merger.reset();
        assert_eq!(
            merger.receive(0, failed(1, "again")).unwrap(),
            vec![failed(1, "again")],
            "per connection"
        );
        merger.forget_collection(GlobalId::User(1));
        assert_eq!(merger.receive(1, failed(1, "rebuilt")).unwrap(), vec![failed(1, "rebuilt")]);
    }

    #[test]
    fn a_process_regressing_its_frontier_is_an_error() {
        let mut merger = ResponseMerger::<u64>::new(2);
        merger.receive(0, write(1, 5)).unwrap();
        assert!(matches!(
            merger.receive(0, write(1, 4)),
            Err(MergeError::FrontierRegression { process: 0, .. })
        ));
    }

    #[test]
    fn peek_rows_are_the_union_of_all_parts_and_errors_win() {
        let one = NonZeroU64::new(1).unwrap();
        let rows = |i: i64| PeekResponse::Rows(vec![(Row::pack([Datum::Int64(i)]), one)]);
        let mut merger = ResponseMerger::<u64>::new(2);
        let peek = |r| ComputeResponse::PeekResponse { uuid: PeekId(1), response: r };
        assert!(merger.receive(1, peek(rows(2))).unwrap().is_empty());
        let merged = merger.receive(0, peek(rows(1))).unwrap();
        assert_eq!(merged.len(), 1);
        assert!(
            matches!(&merged[0], ComputeResponse::PeekResponse { response: PeekResponse::Rows(r), .. } if r.len() == 2)
        );
        assert!(matches!(merger.receive(0, peek(rows(1))).unwrap().as_slice(), []));
        assert!(matches!(
            merger.receive(0, peek(rows(1))),
            Err(MergeError::DuplicatePeekResponse { process: 0, .. })
        ));
        let mut merger = ResponseMerger::<u64>::new(2);
        merger.receive(0, peek(PeekResponse::Error("boom".into()))).unwrap();
        let merged = merger.receive(1, peek(rows(1))).unwrap();
        assert!(
            matches!(&merged[0], ComputeResponse::PeekResponse { response: PeekResponse::Error(e), .. } if e == "boom")
        );
    }

    #[test]
    fn subscribe_batches_are_emitted_when_every_process_reached_the_upper() {
        let id = GlobalId::User(9);
        let row = |i: i64| Row::pack([Datum::Int64(i)]);
        let batch =
            |lower: u64, upper: u64, updates: Vec<(u64, Row, Diff)>| ComputeResponse::SubscribeResponse {
                id,
                response: SubscribeResponse::Batch(SubscribeBatch {
                    lower: frontier(lower),
                    upper: frontier(upper),
                    updates: Ok(updates),
                }),
            };
        let mut merger = ResponseMerger::<u64>::new(2);
        assert!(merger.receive(0, batch(0, 5, vec![(1, row(1), 1), (4, row(4), 1)])).unwrap().is_empty());
        let out = merger.receive(1, batch(0, 3, vec![(2, row(2), 1)])).unwrap();
        assert_eq!(out, vec![batch(0, 3, vec![(1, row(1), 1), (2, row(2), 1)])]);
        let out = merger.receive(1, batch(3, 8, vec![(4, row(4), -1), (6, row(6), 1)])).unwrap();
        // Time 4 consolidates to nothing across processes; time 6 waits for process 0.
        assert_eq!(out, vec![batch(3, 5, vec![])]);
        assert!(matches!(
            merger.receive(1, batch(9, 10, vec![])),
            Err(MergeError::SubscribeGap { process: 1, .. })
        ));
    }

    #[test]
    fn copy_to_row_counts_are_summed() {
        let id = GlobalId::User(3);
        let mut merger = ResponseMerger::<u64>::new(2);
        let copy = |r| ComputeResponse::CopyToResponse { id, response: r };
        assert!(merger.receive(0, copy(CopyToResponse::RowCount(3))).unwrap().is_empty());
        assert_eq!(
            merger.receive(1, copy(CopyToResponse::RowCount(4))).unwrap(),
            vec![copy(CopyToResponse::RowCount(7))]
        );
    }
}
