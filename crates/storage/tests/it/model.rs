//! A property test of the synchronous core (`storage::core::Store`) against a naive model: every update
//! ever appended kept in a list, every hold's frontier kept in a vector, the since computed as the
//! brute-force meet. After every step: the since equals the meet of the holds; snapshots at every readable
//! time equal the model's consolidation; the updates a listener would read from the since on equal the
//! model's; and the store holds exactly the consolidated live data plus the history at or beyond the since
//! (space bounded, compaction happens).

use std::collections::BTreeMap;

use frontiers::{Antichain, PartialOrder, ReadPolicy};
use proptest::prelude::*;
use protocol::{Diff, GlobalId, Row};
use storage::core::Store;
use storage::{AppendError, AppendRequest, StorageReadHold};

use crate::*;

const COLLECTIONS: usize = 2;

#[derive(Debug, Clone)]
enum Op {
    /// Appends `updates` (row, time offset, diff) moving the upper forward by `advance`; to both
    /// collections atomically if `both`; with a wrong expected upper if `stale`.
    Append {
        collection: usize,
        updates: Vec<(i64, u64, Diff)>,
        advance: u64,
        both: bool,
        stale: bool,
    },
    Acquire {
        collection: usize,
        offset: u64,
    },
    Downgrade {
        slot: usize,
        delta: u64,
    },
    Release {
        slot: usize,
    },
    Policy {
        collection: usize,
        policy: ReadPolicy<u64>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let policy = prop_oneof![
        (0u64..40).prop_map(|t| ReadPolicy::ValidFrom(at(t))),
        (0u64..6, 0u64..4)
            .prop_map(|(lag_ms, granularity_ms)| ReadPolicy::LagWriteFrontier { lag_ms, granularity_ms }),
        Just(ReadPolicy::NoPolicy),
    ];
    prop_oneof![
        4 => (
            0..COLLECTIONS,
            prop::collection::vec((0i64..5, 0u64..3, -2i64..3), 0..6),
            1u64..4,
            any::<bool>(),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(collection, updates, advance, both, stale)| Op::Append { collection, updates, advance, both, stale }),
        2 => (0..COLLECTIONS, 0u64..6).prop_map(|(collection, offset)| Op::Acquire { collection, offset }),
        2 => (0usize..8, 0u64..4).prop_map(|(slot, delta)| Op::Downgrade { slot, delta }),
        1 => (0usize..8).prop_map(|slot| Op::Release { slot }),
        1 => (0..COLLECTIONS, policy).prop_map(|(collection, policy)| Op::Policy { collection, policy }),
    ]
}

/// The model of one collection.
#[derive(Debug, Default)]
struct Model {
    updates: Vec<(Row, u64, Diff)>,
    upper: u64,
    /// The policy's hold; `None` once released.
    policy_hold: Option<u64>,
}

fn id_of(collection: usize) -> GlobalId {
    user(collection as u64)
}

fn consolidated(updates: impl Iterator<Item = (Row, Diff)>) -> Vec<(Row, Diff)> {
    let mut counts: BTreeMap<Row, Diff> = BTreeMap::new();
    for (row, diff) in updates {
        *counts.entry(row).or_default() += diff;
    }
    counts.into_iter().filter(|(_, d)| *d != 0).collect()
}

fn follow_policy(model: &mut Model, policy: &ReadPolicy<u64>) {
    let target = policy.frontier(at(model.upper).borrow());
    if let (Some(hold), Some(target)) = (model.policy_hold, target.as_option()) {
        model.policy_hold = Some(hold.max(*target));
    }
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn the_core_agrees_with_a_naive_model_after_every_step(ops in prop::collection::vec(op(), 1..60)) {
        let mut store = Store::new();
        let mut models: Vec<Model> = Vec::new();
        let mut policies: Vec<ReadPolicy<u64>> = Vec::new();
        for c in 0..COLLECTIONS {
            store.create_collection(id_of(c), int_desc()).unwrap();
            models.push(Model { policy_hold: Some(0), ..Model::default() });
            policies.push(storage::core::default_read_policy());
        }
        let mut holds: Vec<Option<(usize, StorageReadHold)>> = Vec::new();

        for op in ops {
            match op {
                Op::Append { collection, updates, advance, both, stale } => {
                    let targets: Vec<usize> = if both { (0..COLLECTIONS).collect() } else { vec![collection] };
                    // A stale append names the upper before the current one (so only the upper is wrong).
                    let stale = stale && targets.iter().all(|c| models[*c].upper > 0);
                    let mut requests = Vec::new();
                    for &c in &targets {
                        let lower = models[c].upper;
                        let expected = if stale { lower - 1 } else { lower };
                        let updates: Vec<(Row, u64, Diff)> = updates
                            .iter()
                            .filter(|(_, dt, _)| *dt < advance)
                            .map(|(x, dt, diff)| (int_row(*x), lower + dt, *diff))
                            .collect();
                        requests.push(AppendRequest {
                            id: id_of(c),
                            updates,
                            expected_upper: at(expected),
                            new_upper: at(lower + advance),
                        });
                    }
                    let result = store.append(requests.clone());
                    if stale {
                        let is_mismatch = matches!(result, Err(AppendError::UpperMismatch { .. }));
                        prop_assert!(is_mismatch, "{result:?}");
                    } else {
                        prop_assert!(result.is_ok(), "{result:?}");
                        for (request, &c) in requests.into_iter().zip(&targets) {
                            models[c].updates.extend(request.updates);
                            models[c].upper = *request.new_upper.as_option().unwrap();
                            follow_policy(&mut models[c], &policies[c]);
                        }
                    }
                }
                Op::Acquire { collection, offset } => {
                    let since = store.frontiers(id_of(collection)).unwrap().since;
                    let frontier = at(since.as_option().unwrap() + offset);
                    let hold = store.acquire_read_hold(id_of(collection), frontier).unwrap();
                    holds.push(Some((collection, hold)));
                }
                Op::Downgrade { slot, delta } => {
                    if let Some(Some((_, hold))) = holds.get_mut(slot) {
                        let current = *hold.since().as_option().unwrap();
                        hold.try_downgrade(at(current + delta)).unwrap();
                        if delta > 0 {
                            prop_assert!(hold.try_downgrade(at(current)).is_err(), "a hold never moves back");
                        }
                    }
                }
                Op::Release { slot } => {
                    if let Some(entry) = holds.get_mut(slot) {
                        entry.take();
                    }
                }
                Op::Policy { collection, policy } => {
                    store.set_read_policy(id_of(collection), policy.clone()).unwrap();
                    policies[collection] = policy;
                    follow_policy(&mut models[collection], &policies[collection]);
                }
            }
            store.process_holds();

            for (c, model) in models.iter().enumerate() {
                let id = id_of(c);
                // The since is the meet of the holds (the policy's and the clients').
                let mut since = Antichain::new();
                if let Some(hold) = model.policy_hold {
                    since.insert(hold);
                }
                for (_, hold) in holds.iter().flatten().filter(|(hc, _)| *hc == c) {
                    since.extend(hold.since().iter().copied());
                }
                let frontiers = store.frontiers(id).unwrap();
                prop_assert_eq!(&frontiers.since, &since, "since of {}", id);
                prop_assert_eq!(&frontiers.upper, &at(model.upper));
                prop_assert!(PartialOrder::less_equal(&frontiers.since, &frontiers.upper));
                let since = *since.as_option().unwrap();

                // Snapshots at every readable time, and errors just outside.
                for t in since..model.upper {
                    let expected = consolidated(model.updates.iter().filter(|u| u.1 <= t).map(|u| (u.0.clone(), u.2)));
                    prop_assert_eq!(store.snapshot(id, t).unwrap(), expected, "snapshot of {} at {}", id, t);
                }
                if since > 0 {
                    prop_assert!(store.snapshot(id, since - 1).is_err());
                }
                prop_assert!(store.snapshot(id, model.upper).is_err());

                // What a listener reads from the since on: the updates at their own times.
                let mut expected_history: BTreeMap<u64, Vec<(Row, Diff)>> = BTreeMap::new();
                for (row, time, diff) in model.updates.iter().filter(|u| u.1 >= since) {
                    expected_history.entry(*time).or_default().push((row.clone(), *diff));
                }
                let expected_history: Vec<(Row, u64, Diff)> = expected_history
                    .into_iter()
                    .flat_map(|(time, batch)| consolidated(batch.into_iter()).into_iter().map(move |(r, d)| (r, time, d)))
                    .collect();
                prop_assert_eq!(store.updates_between(id, since, &Antichain::new()).unwrap(), expected_history.clone());

                // Space: the consolidated data before the since plus the consolidated history from it.
                let base = consolidated(model.updates.iter().filter(|u| u.1 < since).map(|u| (u.0.clone(), u.2)));
                prop_assert_eq!(store.stored_updates(id).unwrap(), base.len() + expected_history.len());
            }
        }
        drop(holds);
        store.process_holds();
    }
}
