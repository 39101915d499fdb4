//! Property test: a compacted history replayed into a model replica installs the same state as the
//! uncompacted command stream, and its length stays bounded by the live objects.

use std::collections::BTreeSet;

use frontiers::Antichain;
use proptest::prelude::*;
use protocol::{
    ComputeCommand, ComputeParameters, GlobalId, InstanceConfig, InstanceId, MapFilterProject, Peek, PeekId,
    PeekTarget, ReplicaId, RowSetFinishing,
};
use replica_client::CommandHistory;

use crate::model::{ModelReplica, dataflow};

#[derive(Debug, Clone)]
enum Op {
    Create { exports: u64, as_of: u64 },
    Schedule { pick: usize },
    Compact { pick: usize, advance: u64, drop: bool },
    Peek,
    Cancel { pick: usize },
    Answer { pick: usize },
    Configure { limit: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u64..4, 0u64..20).prop_map(|(exports, as_of)| Op::Create { exports, as_of }),
        2 => any::<usize>().prop_map(|pick| Op::Schedule { pick }),
        4 => (any::<usize>(), 0u64..10, prop::bool::weighted(0.3)).prop_map(|(pick, advance, drop)| Op::Compact { pick, advance, drop }),
        2 => Just(Op::Peek),
        1 => any::<usize>().prop_map(|pick| Op::Cancel { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Answer { pick }),
        1 => (1usize..5).prop_map(|limit| Op::Configure { limit }),
    ]
}

fn peek(uuid: u64) -> Peek<u64> {
    Peek {
        uuid: PeekId(uuid),
        target: PeekTarget::Index { id: GlobalId::User(0) },
        timestamp: 0,
        literal_constraints: None,
        map_filter_project: MapFilterProject::new(1),
        finishing: RowSetFinishing::unordered(),
    }
}

fn pick<T: Copy>(items: &BTreeSet<T>, index: usize) -> Option<T> {
    if items.is_empty() { None } else { items.iter().nth(index % items.len()).copied() }
}

proptest! {
    #[test]
    fn replaying_the_compacted_history_installs_the_same_state_as_the_full_stream(ops in prop::collection::vec(op(), 1..120)) {
        let mut history = CommandHistory::<u64>::new();
        let mut full = ModelReplica::default();
        let record = |history: &mut CommandHistory<u64>, full: &mut ModelReplica, command: ComputeCommand<u64>| {
            history.push(&command).expect("the generated stream is well-formed");
            full.apply(&command);
        };
        record(&mut history, &mut full, ComputeCommand::CreateInstance(InstanceConfig {
            instance_id: InstanceId(1), replica_id: ReplicaId(1),
        }));
        let mut next_id = 0u64;
        let mut next_peek = 0u64;
        let mut live_exports: BTreeSet<u64> = BTreeSet::new();
        let mut frontiers: std::collections::BTreeMap<u64, u64> = Default::default();
        let mut peeks: BTreeSet<u64> = BTreeSet::new();
        for op in ops {
            match op {
                Op::Create { exports, as_of } => {
                    let df = dataflow(&format!("df{next_id}"), next_id, exports, as_of);
                    for id in next_id..next_id + exports {
                        live_exports.insert(id);
                        frontiers.insert(id, as_of);
                    }
                    next_id += exports;
                    record(&mut history, &mut full, ComputeCommand::CreateDataflow(df));
                }
                Op::Schedule { pick: p } => {
                    if let Some(id) = pick(&live_exports, p) {
                        record(&mut history, &mut full, ComputeCommand::Schedule(GlobalId::User(id)));
                    }
                }
                Op::Compact { pick: p, advance, drop } => {
                    if let Some(id) = pick(&live_exports, p) {
                        let frontier = if drop {
                            live_exports.remove(&id);
                            Antichain::new()
                        } else {
                            let t = frontiers[&id] + advance;
                            frontiers.insert(id, t);
                            Antichain::from_elem(t)
                        };
                        record(&mut history, &mut full, ComputeCommand::AllowCompaction { id: GlobalId::User(id), frontier });
                    }
                }
                Op::Peek => {
                    peeks.insert(next_peek);
                    record(&mut history, &mut full, ComputeCommand::Peek(peek(next_peek)));
                    next_peek += 1;
                }
                Op::Cancel { pick: p } => {
                    if let Some(uuid) = pick(&peeks, p) {
                        peeks.remove(&uuid);
                        record(&mut history, &mut full, ComputeCommand::CancelPeek { uuid: PeekId(uuid) });
                    }
                }
                Op::Answer { pick: p } => {
                    if let Some(uuid) = pick(&peeks, p) {
                        // The replica answered: the history forgets it, and so does the model.
                        peeks.remove(&uuid);
                        history.retire_peek(PeekId(uuid));
                        full.peeks.remove(&PeekId(uuid));
                    }
                }
                Op::Configure { limit } => {
                    record(&mut history, &mut full, ComputeCommand::UpdateConfiguration(ComputeParameters {
                        hydration_concurrency: Some(limit), ..Default::default()
                    }));
                }
            }
            // Replay into a fresh model after every step.
            let mut replayed = ModelReplica::default();
            for command in history.replay() {
                replayed.apply(&command);
            }
            prop_assert_eq!(&replayed, &full);
            // Bounded: per live dataflow at most 1 + exports + 1 commands; plus peeks and 3 singletons.
            let bound: usize = full.dataflows.values().map(|df| 2 + df.exports.len()).sum::<usize>() + full.peeks.len() + 3;
            prop_assert!(history.len() <= bound, "history of {} commands exceeds {}", history.len(), bound);
            prop_assert_eq!(history.len(), history.replay().len());
        }
    }
}

#[test]
fn a_replayed_dataflow_starts_at_the_meet_of_its_exports_compaction() {
    let mut history = CommandHistory::<u64>::new();
    history.push(&ComputeCommand::CreateDataflow(dataflow("two", 1, 2, 5))).unwrap();
    history
        .push(&ComputeCommand::AllowCompaction { id: GlobalId::User(1), frontier: Antichain::from_elem(20) })
        .unwrap();
    let as_of = |history: &CommandHistory<u64>| match &history.replay()[0] {
        ComputeCommand::CreateDataflow(desc) => desc.as_of.clone().unwrap(),
        other => panic!("unexpected {other:?}"),
    };
    // Export 2 has not compacted: the as-of stays at 5.
    assert_eq!(as_of(&history), Antichain::from_elem(5));
    history
        .push(&ComputeCommand::AllowCompaction { id: GlobalId::User(2), frontier: Antichain::from_elem(12) })
        .unwrap();
    assert_eq!(as_of(&history), Antichain::from_elem(12));
    // Dropping one export leaves the other in charge.
    history
        .push(&ComputeCommand::AllowCompaction { id: GlobalId::User(2), frontier: Antichain::new() })
        .unwrap();
    assert_eq!(as_of(&history), Antichain::from_elem(20));
}

#[test]
fn misuse_of_the_history_is_a_typed_error_and_changes_nothing() {
    use replica_client::HistoryError;
    let mut history = CommandHistory::<u64>::new();
    history.push(&ComputeCommand::CreateDataflow(dataflow("a", 1, 1, 5))).unwrap();
    let before = history.replay();
    let cases: Vec<(ComputeCommand<u64>, HistoryError)> = vec![
        (ComputeCommand::Hello { version: 1, nonce: 1 }, HistoryError::ConnectionCommand("Hello")),
        (ComputeCommand::InitializationComplete, HistoryError::ConnectionCommand("InitializationComplete")),
        (
            ComputeCommand::CreateDataflow(dataflow("b", 1, 1, 5)),
            HistoryError::DuplicateExport(GlobalId::User(1)),
        ),
        (ComputeCommand::Schedule(GlobalId::User(9)), HistoryError::UnknownCollection(GlobalId::User(9))),
    ];
    for (command, expected) in cases {
        assert_eq!(history.push(&command), Err(expected));
    }
    history
        .push(&ComputeCommand::AllowCompaction { id: GlobalId::User(1), frontier: Antichain::from_elem(9) })
        .unwrap();
    let regress = history
        .push(&ComputeCommand::AllowCompaction { id: GlobalId::User(1), frontier: Antichain::from_elem(8) });
    assert!(matches!(regress, Err(HistoryError::CompactionRegressed { .. })));
    history.push(&ComputeCommand::Peek(peek(1))).unwrap();
    assert_eq!(history.push(&ComputeCommand::Peek(peek(1))), Err(HistoryError::DuplicatePeek(PeekId(1))));
    assert_eq!(history.replay().len(), before.len() + 2);
}
