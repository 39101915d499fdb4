//! Sequential hydration under random events: never more than the limit released to hydrate (checked at
//! every release), every scheduled dataflow eventually released, multi-export dataflows, drops in every
//! state, and the limit changed up and down.

use std::collections::{BTreeMap, BTreeSet};

use frontiers::Antichain;
use proptest::prelude::*;
use protocol::{ComputeCommand, ComputeParameters, GlobalId};
use replica_client::{HydrationGate, HydrationState};

use crate::model::dataflow;

#[derive(Debug, Clone)]
enum Event {
    Create { exports: u64 },
    Schedule { pick: usize },
    Hydrate { pick: usize, all_exports: bool },
    Drop { pick: usize },
    Limit { limit: usize },
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => (1u64..4).prop_map(|exports| Event::Create { exports }),
        3 => any::<usize>().prop_map(|pick| Event::Schedule { pick }),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(pick, all_exports)| Event::Hydrate { pick, all_exports }),
        1 => any::<usize>().prop_map(|pick| Event::Drop { pick }),
        1 => (1usize..4).prop_map(|limit| Event::Limit { limit }),
    ]
}

/// The replica side: which dataflows received their Schedule, and which exports have hydrated.
#[derive(Default)]
struct Replica {
    /// Dataflow key → its live exports.
    exports: BTreeMap<u64, BTreeSet<u64>>,
    scheduled: BTreeSet<u64>,
    hydrated_exports: BTreeSet<u64>,
}

impl Replica {
    fn key_of(&self, export: u64) -> Option<u64> {
        self.exports.iter().find(|(_, e)| e.contains(&export)).map(|(k, _)| *k)
    }
    fn hydrating(&self) -> usize {
        self.scheduled
            .iter()
            .filter(|k| self.exports[*k].iter().any(|e| !self.hydrated_exports.contains(e)))
            .count()
    }
}

fn pick<T: Copy>(items: impl IntoIterator<Item = T>, index: usize) -> Option<T> {
    let items: Vec<T> = items.into_iter().collect();
    if items.is_empty() { None } else { Some(items[index % items.len()]) }
}

fn deliver(
    replica: &mut Replica,
    limit: usize,
    commands: Vec<ComputeCommand<u64>>,
) -> Result<(), TestCaseError> {
    for command in commands {
        if let ComputeCommand::Schedule(GlobalId::User(id)) = command {
            let key = replica.key_of(id).expect("schedules name live exports");
            if replica.scheduled.contains(&key) {
                continue;
            }
            let all_hydrated = replica.exports[&key].iter().all(|e| replica.hydrated_exports.contains(e));
            if !all_hydrated {
                prop_assert!(
                    replica.hydrating() < limit,
                    "released a Schedule with {} hydrating, limit {limit}",
                    replica.hydrating()
                );
            }
            replica.scheduled.insert(key);
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn no_more_than_the_limit_hydrate_and_every_scheduled_dataflow_is_released(
        initial in 1usize..4,
        events in prop::collection::vec(event(), 1..150),
    ) {
        let mut gate = HydrationGate::<u64>::new(Some(initial));
        let mut limit = initial;
        let mut replica = Replica::default();
        let mut next = 0u64;
        let mut controller_scheduled: BTreeSet<u64> = BTreeSet::new();
        for event in events {
            match event {
                Event::Create { exports } => {
                    let out = gate.on_command(ComputeCommand::CreateDataflow(dataflow("d", next, exports, 10)));
                    replica.exports.insert(next, (next..next + exports).collect());
                    next += exports;
                    deliver(&mut replica, limit, out)?;
                }
                Event::Schedule { pick: p } => {
                    if let Some(key) = pick(replica.exports.keys().copied(), p) {
                        let export = *replica.exports[&key].iter().next().expect("live exports");
                        controller_scheduled.insert(key);
                        let out = gate.on_command(ComputeCommand::Schedule(GlobalId::User(export)));
                        deliver(&mut replica, limit, out)?;
                    }
                }
                Event::Hydrate { pick: p, all_exports } => {
                    // Only a scheduled dataflow makes progress on a replica.
                    if let Some(key) = pick(replica.scheduled.iter().copied(), p) {
                        let exports: Vec<u64> = replica.exports.get(&key).map(|e| e.iter().copied().collect()).unwrap_or_default();
                        let take = if all_exports { exports.len() } else { 1.min(exports.len()) };
                        for export in exports.into_iter().take(take) {
                            replica.hydrated_exports.insert(export);
                            let out = gate.on_write_frontier(GlobalId::User(export), &Antichain::from_elem(11));
                            deliver(&mut replica, limit, out)?;
                        }
                    }
                }
                Event::Drop { pick: p } => {
                    if let Some(export) = pick(replica.exports.values().flatten().copied(), p) {
                        let key = replica.key_of(export).expect("live");
                        replica.exports.get_mut(&key).expect("live").remove(&export);
                        if replica.exports[&key].is_empty() {
                            replica.exports.remove(&key);
                            replica.scheduled.remove(&key);
                            controller_scheduled.remove(&key);
                        }
                        let out = gate.on_command(ComputeCommand::AllowCompaction { id: GlobalId::User(export), frontier: Antichain::new() });
                        deliver(&mut replica, limit, out)?;
                    }
                }
                Event::Limit { limit: new } => {
                    limit = new;
                    let out = gate.on_command(ComputeCommand::UpdateConfiguration(ComputeParameters {
                        hydration_concurrency: Some(new), ..Default::default()
                    }));
                    deliver(&mut replica, limit, out)?;
                }
            }
        }
        // Liveness: hydrate whatever is released until nothing new is; then every dataflow the controller
        // scheduled has been released.
        loop {
            let pending: Vec<u64> = replica.scheduled.iter().flat_map(|k| replica.exports[k].iter().copied()).filter(|e| !replica.hydrated_exports.contains(e)).collect();
            if pending.is_empty() { break; }
            for export in pending {
                replica.hydrated_exports.insert(export);
                let out = gate.on_write_frontier(GlobalId::User(export), &Antichain::from_elem(11));
                deliver(&mut replica, limit, out)?;
            }
        }
        for key in &controller_scheduled {
            prop_assert!(replica.scheduled.contains(key), "dataflow {key} was scheduled but never released");
            let live_export = *replica.exports[key].iter().next().expect("live dataflows have live exports");
            prop_assert_eq!(gate.state(GlobalId::User(live_export)), Some(HydrationState::Hydrated));
        }
        prop_assert!(gate.all_hydrated());
    }
}

#[test]
fn a_multi_export_dataflow_hydrates_only_when_every_export_has() {
    let mut gate = HydrationGate::<u64>::new(Some(1));
    gate.on_command(ComputeCommand::CreateDataflow(dataflow("two", 1, 2, 10)));
    gate.on_command(ComputeCommand::CreateDataflow(dataflow("next", 5, 1, 10)));
    assert_eq!(
        gate.on_command(ComputeCommand::Schedule(GlobalId::User(1))),
        vec![ComputeCommand::Schedule(GlobalId::User(1))]
    );
    assert!(
        gate.on_command(ComputeCommand::Schedule(GlobalId::User(5))).is_empty(),
        "held back behind the first"
    );
    assert!(
        gate.on_write_frontier(GlobalId::User(1), &Antichain::from_elem(11)).is_empty(),
        "one export is not enough"
    );
    assert_eq!(gate.state(GlobalId::User(2)), Some(HydrationState::Hydrating));
    // A frontier at the as-of is not past it.
    assert!(gate.on_write_frontier(GlobalId::User(2), &Antichain::from_elem(10)).is_empty());
    assert_eq!(
        gate.on_write_frontier(GlobalId::User(2), &Antichain::from_elem(11)),
        vec![ComputeCommand::Schedule(GlobalId::User(5))]
    );
}

#[test]
fn dropping_a_hydrating_dataflow_frees_its_slot_and_dropping_a_queued_one_never_schedules_it() {
    let mut gate = HydrationGate::<u64>::new(Some(1));
    for first in [1, 2, 3] {
        gate.on_command(ComputeCommand::CreateDataflow(dataflow("d", first, 1, 0)));
    }
    gate.on_command(ComputeCommand::Schedule(GlobalId::User(1)));
    gate.on_command(ComputeCommand::Schedule(GlobalId::User(2)));
    gate.on_command(ComputeCommand::Schedule(GlobalId::User(3)));
    let drop = |id| ComputeCommand::AllowCompaction { id: GlobalId::User(id), frontier: Antichain::new() };
    // Drop the queued one first: nothing is released, and it never will be.
    assert_eq!(gate.on_command(drop(2)), vec![drop(2)]);
    // Drop the hydrating one: the next queued (3) goes out.
    assert_eq!(gate.on_command(drop(1)), vec![drop(1), ComputeCommand::Schedule(GlobalId::User(3))]);
    assert_eq!(gate.queued(), 0);
}

#[test]
fn reset_forgets_progress_but_keeps_the_limit() {
    let mut gate = HydrationGate::<u64>::new(Some(2));
    gate.on_command(ComputeCommand::UpdateConfiguration(ComputeParameters {
        hydration_concurrency: Some(3),
        ..Default::default()
    }));
    gate.on_command(ComputeCommand::CreateDataflow(dataflow("d", 1, 1, 0)));
    gate.on_command(ComputeCommand::Schedule(GlobalId::User(1)));
    assert_eq!(gate.hydrating(), 1);
    gate.reset();
    assert_eq!(gate.hydrating(), 0);
    assert_eq!(gate.state(GlobalId::User(1)), None);
    assert_eq!(gate.limit(), Some(3));
}
