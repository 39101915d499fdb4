//! Checking what the controller delivers against the [`Oracle`]: peek results ([`PeekExpectation`]) and
//! subscribe streams ([`SubscribeTracker`]). Shared by the deterministic world and the real-compute mode.

use controller::{PeekFailure, PeekResult};
use protocol::reference::Multiset;
use protocol::{GlobalId, MapFilterProject, PeekId, ReplicaId, Row, RowSetFinishing, SubscribeResponse};

use super::oracle::{EvalFailure, Oracle};
use super::peek::peek_rows;
use super::violation::{Invariant, Violation};

/// What a peek asked, to compute the answer it should get.
#[derive(Debug)]
pub struct PeekExpectation {
    /// The index.
    pub id: GlobalId,
    /// The time.
    pub timestamp: u64,
    /// The index's key (for literal constraints).
    pub key: Vec<usize>,
    /// Key values looked up.
    pub constraints: Option<Vec<Row>>,
    /// Map/filter/project.
    pub mfp: MapFilterProject,
    /// Ordering, offset, limit.
    pub finishing: RowSetFinishing,
    /// The replica it targeted, if any.
    pub target: Option<ReplicaId>,
    /// Whether the workload cancelled it.
    pub cancelled: bool,
    /// When it was issued (simulated or real milliseconds).
    pub issued_ms: u64,
}

impl PeekExpectation {
    /// Compares a delivered answer with the oracle's (DESIGN §5.6).
    pub fn check(&self, uuid: PeekId, oracle: &Oracle, response: &PeekResult) -> Result<(), Violation> {
        match response {
            Err(PeekFailure::Canceled) if self.cancelled => return Ok(()),
            Err(PeekFailure::Canceled) => {
                return Err(Violation::new(
                    Invariant::Protocol,
                    format!("peek {uuid} was cancelled, but not by the workload"),
                ));
            }
            Err(PeekFailure::ReplicaDropped(replica)) if self.target == Some(*replica) => return Ok(()),
            _ => {}
        }
        let expected = match oracle.export_contents(self.id, self.timestamp) {
            Ok(contents) => {
                peek_rows(&contents, &self.key, self.constraints.as_deref(), &self.mfp, &self.finishing, None)
            }
            Err(EvalFailure::Data(e)) => Err(e),
            Err(EvalFailure::Unavailable(e)) => {
                return Err(Violation::new(
                    Invariant::Results,
                    format!("oracle cannot evaluate {}: {e}", self.id),
                ));
            }
        };
        let ok = match (response, &expected) {
            (Ok(rows), Ok(expected_rows)) => rows == expected_rows,
            (Err(PeekFailure::Evaluation(_)), Err(_)) => true,
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(Violation::new(
                Invariant::Results,
                format!(
                    "peek {uuid} of {} at {} returned {response:?}, the oracle says {expected:?}",
                    self.id, self.timestamp
                ),
            ))
        }
    }
}

/// What the client of a subscribe has received so far.
#[derive(Debug)]
pub struct SubscribeTracker {
    as_of: u64,
    with_snapshot: bool,
    forwarded: u64,
    /// Everything forwarded so far (plus, without a snapshot, the snapshot the client never saw).
    accumulated: Option<Multiset>,
    done: bool,
}

impl SubscribeTracker {
    /// A subscribe starting at `as_of`.
    pub fn new(as_of: u64, with_snapshot: bool) -> Self {
        SubscribeTracker { as_of, with_snapshot, forwarded: as_of, accumulated: None, done: false }
    }

    /// Takes one delivered response: batches must be contiguous, hold only times in their range, and
    /// accumulate to the oracle's contents at `upper - 1` (each time range once: nothing duplicated or
    /// missing). Returns whether a batch was checked.
    pub fn observe(
        &mut self,
        id: GlobalId,
        oracle: &Oracle,
        response: SubscribeResponse<u64>,
        now: u64,
    ) -> Result<bool, Violation> {
        self.observe_batch(id, oracle, response, now)
            .map_err(|message| Violation::new(Invariant::Results, message))
    }

    fn observe_batch(
        &mut self,
        id: GlobalId,
        oracle: &Oracle,
        response: SubscribeResponse<u64>,
        now: u64,
    ) -> Result<bool, String> {
        let batch = match response {
            SubscribeResponse::DroppedAt(_) => {
                self.done = true;
                return Ok(false);
            }
            SubscribeResponse::Batch(batch) => batch,
        };
        if self.done {
            return Err(format!("subscribe {id}: batch after the end"));
        }
        let lower = batch.lower.as_option().copied();
        if lower != Some(self.forwarded) {
            return Err(format!("subscribe {id}: batch starts at {lower:?}, expected {}", self.forwarded));
        }
        let updates = match batch.updates {
            Ok(updates) => updates,
            Err(error) => {
                self.done = true;
                // Only acceptable if the oracle agrees there is a data error.
                let any_error = (self.as_of..=now)
                    .any(|t| matches!(oracle.export_contents(id, t), Err(EvalFailure::Data(_))));
                return if any_error {
                    Ok(true)
                } else {
                    Err(format!("subscribe {id}: error {error} the oracle does not see"))
                };
            }
        };
        let Some(upper) = batch.upper.as_option().copied() else {
            self.done = true;
            return Ok(true);
        };
        if let Some((time, _, _)) = updates.iter().find(|(t, _, _)| *t < self.forwarded || *t >= upper) {
            return Err(format!("subscribe {id}: update at {time} outside [{}, {upper})", self.forwarded));
        }
        self.forwarded = upper;
        if self.accumulated.is_none() {
            let start = if self.with_snapshot {
                Ok(Multiset::new())
            } else {
                oracle.export_contents(id, self.as_of).map(|s| (*s).clone())
            };
            match start {
                Ok(start) => self.accumulated = Some(start),
                Err(_) => return Ok(true),
            }
        }
        let accumulated = self.accumulated.as_mut().expect("set above");
        for (_, row, diff) in updates {
            let entry = accumulated.entry(row.clone()).or_insert(0);
            *entry += diff;
            if *entry == 0 {
                accumulated.remove(&row);
            }
        }
        match oracle.export_contents(id, upper - 1) {
            Ok(expected) if *expected == *accumulated => Ok(true),
            Ok(expected) => Err(format!(
                "subscribe {id} up to {upper} accumulates to {accumulated:?}, the oracle says {expected:?}"
            )),
            Err(EvalFailure::Data(_)) => Ok(true),
            Err(EvalFailure::Unavailable(e)) => {
                Err(format!("subscribe {id}: the oracle cannot evaluate: {e}"))
            }
        }
    }
}
