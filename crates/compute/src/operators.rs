//! Custom timely operators of the replica: the schedule [`gate`] and the export [`sink`].
//!
//! **What this is.** [`gate`] holds a dataflow's imported data (and its frontier, at the as-of) until the
//! dataflow is scheduled, so a created-but-unscheduled dataflow does no work downstream of its imports.
//! [`sink`] collects the output of a subscribe, materialized view or copy-to export into a
//! [`SinkBuffer`] the worker loop drains and forwards to the process core.
//!
//! **What this is not.** Not the merging of sink output across workers (that is the core's) nor the
//! storage appends or file writes.
//!
//! **Invariants.** A gate never releases data before it is opened; once open, it forwards everything it
//! held with the original capabilities. A sink buffer's `frontier` only advances, and every update at a
//! time not beyond it has been pushed to `updates`/`errors` before the frontier moved past it.
//!
//! **Tests.** Exercised by every integration test in `tests/it` (schedule, subscribe, MV, copy-to).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use differential_dataflow::AsCollection;
use differential_dataflow::Hashable;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::{Capability, Operator};
use timely::progress::Antichain;
use timely::scheduling::Activator;

use protocol::Row;

use crate::render::{CheckedDiff, Coll, Time, Updates};

/// Shared between a dataflow's gates and the worker: whether the dataflow is scheduled.
#[derive(Default)]
pub(crate) struct Gate {
    open: Cell<bool>,
    activators: RefCell<Vec<Activator>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("open", &self.open.get()).finish()
    }
}

impl Gate {
    /// Opens every gate of the dataflow and wakes them.
    pub fn open(&self) {
        self.open.set(true);
        for activator in self.activators.borrow().iter() {
            activator.activate();
        }
    }

    /// Whether the dataflow is scheduled.
    pub fn is_open(&self) -> bool {
        self.open.get()
    }
}

/// Holds `input` (data and frontier, at `as_of`) until `gate` opens.
pub(crate) fn gate<'s>(input: Coll<'s>, gate: Rc<Gate>, as_of: Time) -> Coll<'s> {
    let scope = input.scope();
    input
        .inner
        .unary_frontier::<timely::container::CapacityContainerBuilder<Updates>, _, _, _>(
            Pipeline,
            "ScheduleGate",
            move |mut capability: Capability<Time>, info| {
                gate.activators.borrow_mut().push(scope.activator_for(info.address));
                capability.downgrade(&as_of);
                let mut held: Option<Capability<Time>> = Some(capability);
                let mut stash: Vec<(Capability<Time>, Updates)> = Vec::new();
                move |(input, _frontier), output| {
                    if !gate.is_open() {
                        input.for_each(|cap, data| {
                            if let Some(cap) = cap.retain_least(0) {
                                stash.push((cap, std::mem::take(data)));
                            }
                        });
                        return;
                    }
                    // Open: release the frontier held at the as-of.
                    held.take();
                    for (cap, mut data) in stash.drain(..) {
                        output.session(&cap).give_container(&mut data);
                    }
                    input.for_each(|cap, data| {
                        output.session(&cap).give_container(data);
                    });
                }
            },
        )
        .as_collection()
}

/// The kind of a sink, which decides how its output is partitioned and filtered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SinkKind {
    /// Everything, partitioned by row; without the snapshot, updates at the as-of are dropped.
    Subscribe {
        /// Whether the snapshot at the as-of is emitted.
        with_snapshot: bool,
    },
    /// Everything, funnelled to worker 0 (which appends for the replica).
    MaterializedView,
    /// Only the snapshot at the as-of, partitioned by row.
    CopyTo,
}

/// What a sink operator produced since the worker last drained it.
#[derive(Debug, Default)]
pub(crate) struct SinkBuffer {
    /// Row updates (the worker checks their multiplicities when it forwards them).
    pub updates: Updates,
    /// Error updates.
    pub errors: Updates,
    /// The sink's input frontier.
    pub frontier: Antichain<Time>,
    /// Whether `frontier` moved since the last drain.
    pub frontier_changed: bool,
    /// Cleared when the export is dropped; the operator then discards its input.
    pub active: bool,
}

/// Attaches a sink of `kind` to a dataflow's rows and errors.
pub(crate) fn sink<'s>(
    oks: Coll<'s>,
    errs: Coll<'s>,
    kind: SinkKind,
    as_of: Time,
) -> Rc<RefCell<SinkBuffer>> {
    let buffer = Rc::new(RefCell::new(SinkBuffer {
        frontier: Antichain::from_elem(0),
        active: true,
        ..SinkBuffer::default()
    }));
    let combined = oks.map(Ok::<Row, Row>).concat(errs.map(Err::<Row, Row>));
    let route = move |(result, _, _): &(Result<Row, Row>, Time, CheckedDiff)| -> u64 {
        match kind {
            SinkKind::MaterializedView => 0,
            _ => match result {
                Ok(row) | Err(row) => row.hashed(),
            },
        }
    };
    let shared = Rc::clone(&buffer);
    combined.inner.sink(Exchange::new(route), "Sink", move |(input, frontier)| {
        let mut buffer = shared.borrow_mut();
        input.for_each(|_cap, data| {
            if !buffer.active {
                return;
            }
            for (result, time, diff) in data.drain(..) {
                let keep = match kind {
                    SinkKind::Subscribe { with_snapshot: false } => time > as_of,
                    SinkKind::CopyTo => time <= as_of,
                    _ => true,
                };
                if !keep {
                    continue;
                }
                match result {
                    Ok(row) => buffer.updates.push((row, time, diff)),
                    Err(error) => buffer.errors.push((error, time, diff)),
                }
            }
        });
        let current = frontier.frontier();
        if buffer.frontier.borrow() != current {
            buffer.frontier = current.to_owned();
            buffer.frontier_changed = true;
        }
    });
    buffer
}
