//! Typed violations: which promise a failed check found broken, named after DESIGN §5's invariants.
//!
//! Every check of the simulator (the world's, the model replicas', the oracle comparisons) records a
//! [`Violation`] of one [`Invariant`] kind with a description. The kinds are what a caller can require: the
//! planted-bug run (`sim simulate --expect-violation KIND`) passes only if the seeds that fail break the
//! invariant the plant breaks, so a plant caught by accident (a crash, an unrelated check) does not count.
//!
//! **Not here:** the checks themselves (`world.rs`, `model.rs`, `checks.rs`).
//! **Tests:** below (names round-trip); the kinds each check records are exercised by `tests/it/`.

use std::fmt;

/// A kind of violation. §-numbers are DESIGN §5's invariants; the last three are not in §5's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Invariant {
    /// §5.1: a since or an upper regressed (a replica told to compact backwards), or a storage since
    /// passed a hold the controller keeps.
    Frontiers,
    /// §5.2: a replica could not read an import (a storage collection, or an index on the same replica)
    /// at a time it has to compute: history it needs was compacted away, or an imported index is not
    /// installed.
    ImportHolds,
    /// §5.3: a replica answered a peek at a time before its since, or the controller released (or moved)
    /// a peek's hold while a replica still owed the answer.
    PeekHolds,
    /// §5.5: after the faults stopped, a replica's installed dataflows differ from the live state.
    InstalledState,
    /// §5.6: a peek result or a subscribe stream differs from the oracle's answer.
    Results,
    /// §5.7: a replica's command history holds more than the live state needs.
    HistoryBound,
    /// The controller's own check of §5.2–5.4 (`InstanceCore::check_invariants`) failed; its message says
    /// which. (The simulator runs its own checks first, so this kind means only the controller saw it.)
    ControllerSelfCheck,
    /// Not in §5: after the faults stopped, a replica did not reconnect, a collection did not catch up
    /// with storage, or a peek never completed.
    Liveness,
    /// DESIGN §9: what storage holds (read from the shards' blob parts) differs from what the table
    /// writer had acknowledged: an append lost, applied twice, or half applied; or stored data damaged.
    StorageContents,
    /// Not in §5: a party broke the protocol or the API (a command in the wrong stage, an answer to an
    /// unknown peek, a valid request refused, storage failing a valid operation).
    Protocol,
}

impl Invariant {
    /// Every kind, in declaration order.
    pub const ALL: [Invariant; 10] = [
        Invariant::Frontiers,
        Invariant::ImportHolds,
        Invariant::PeekHolds,
        Invariant::InstalledState,
        Invariant::Results,
        Invariant::HistoryBound,
        Invariant::ControllerSelfCheck,
        Invariant::StorageContents,
        Invariant::Liveness,
        Invariant::Protocol,
    ];

    /// The kind's name on the command line and in summaries.
    pub fn name(self) -> &'static str {
        match self {
            Invariant::Frontiers => "frontiers",
            Invariant::ImportHolds => "import-holds",
            Invariant::PeekHolds => "peek-holds",
            Invariant::InstalledState => "installed-state",
            Invariant::Results => "results",
            Invariant::HistoryBound => "history-bound",
            Invariant::ControllerSelfCheck => "controller-self-check",
            Invariant::StorageContents => "storage-contents",
            Invariant::Liveness => "liveness",
            Invariant::Protocol => "protocol",
        }
    }

    /// The kind called `name`, if any.
    pub fn from_name(name: &str) -> Option<Invariant> {
        Invariant::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// Where DESIGN states the promise: `§5.N`, or `-` for the kinds outside §5's list.
    pub fn design_ref(self) -> &'static str {
        match self {
            Invariant::Frontiers => "§5.1",
            Invariant::ImportHolds => "§5.2",
            Invariant::PeekHolds => "§5.3",
            Invariant::InstalledState => "§5.5",
            Invariant::Results => "§5.6",
            Invariant::HistoryBound => "§5.7",
            Invariant::ControllerSelfCheck => "§5.2-4",
            Invariant::StorageContents => "§9",
            Invariant::Liveness | Invariant::Protocol => "-",
        }
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One broken promise: its kind and what exactly was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The kind.
    pub invariant: Invariant,
    /// What was seen (ids, times, frontiers).
    pub message: String,
}

impl Violation {
    /// A violation of `invariant`.
    pub fn new(invariant: Invariant, message: impl Into<String>) -> Self {
        Violation { invariant, message: message.into() }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.invariant, self.invariant.design_ref(), self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_distinct_name_that_round_trips() {
        for kind in Invariant::ALL {
            assert_eq!(Invariant::from_name(kind.name()), Some(kind));
        }
        let mut names: Vec<&str> = Invariant::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Invariant::ALL.len());
        assert_eq!(Invariant::from_name("peek_holds"), None);
    }

    #[test]
    fn a_violation_displays_its_kind_and_where_design_states_it() {
        let v = Violation::new(Invariant::PeekHolds, "peek 3 at 7");
        assert_eq!(v.to_string(), "peek-holds (§5.3): peek 3 at 7");
    }
}
