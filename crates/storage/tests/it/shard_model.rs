//! A property test of the shard state machine's synchronous core (`storage::shard::state` and
//! `storage::shard::part`) against a naive model: every update ever appended in a list, the policy's hold
//! and each reader's since in plain fields, the since computed as a brute-force minimum.
//!
//! The harness drives the pure transitions the way the shell does, with a `BTreeMap` standing in for the
//! blob store: appends (some with a stale upper, some retried after a "lost reply"), reader holds,
//! advances and releases, policy changes, compaction merges (read the inputs, `merge_runs`, write,
//! `apply_merge`) and garbage collection (delete what `collectable` names below the floor). After every
//! step it checks: the since is the meet of the holds and never regresses, the upper is the model's;
//! a snapshot at every readable time, summed naively from the stored parts, equals the model's; what a
//! listener at any readable position reads from the parts equals the model's updates from there on (per
//! time, consolidated); the count bound covers every row; the blob holds exactly the live and the retired
//! parts; and an append retried with its token is never applied twice.
//!
//! A second property test runs the real engine (`ShardCollections` on in-memory stores) with parts of one
//! to three updates, so a row's updates span parts and batches: the snapshot stream at every readable
//! time, in chunks of any size, before and after compaction, equals the naive sum of the appended updates.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use frontiers::{Antichain, PartialOrder, ReadPolicy};
use proptest::prelude::*;
use protocol::{Diff, GlobalId, Row};
use storage::shard::part::{consolidate_run, decode_part, encode_part, merge_runs, part_ref, split_run};
use storage::shard::state::{AppendInput, Batch, IdempotencyToken, ReaderId, Refusal, ShardState, WriterId};

use crate::*;

const READERS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Append { updates: Vec<(i64, u64, Diff)>, advance: u64, stale: bool, lost_reply: bool },
    Hold { reader: usize, offset: u64 },
    Advance { reader: usize, delta: u64 },
    Release { reader: usize },
    Policy(ReadPolicy<u64>),
    Compact { max_batches: usize },
    Collect { heartbeat: bool },
}

fn op() -> impl Strategy<Value = Op> {
    let policy = prop_oneof![
        (0u64..40).prop_map(|t| ReadPolicy::ValidFrom(at(t))),
        (0u64..6, 0u64..4)
            .prop_map(|(lag_ms, granularity_ms)| ReadPolicy::LagWriteFrontier { lag_ms, granularity_ms }),
        Just(ReadPolicy::NoPolicy),
    ];
    prop_oneof![
        5 => (prop::collection::vec((0i64..6, 0u64..3, -2i64..3), 0..8), 1u64..4, prop::bool::weighted(0.1), prop::bool::weighted(0.2))
            .prop_map(|(updates, advance, stale, lost_reply)| Op::Append { updates, advance, stale, lost_reply }),
        2 => (0..READERS, 0u64..4).prop_map(|(reader, offset)| Op::Hold { reader, offset }),
        2 => (0..READERS, 0u64..4).prop_map(|(reader, delta)| Op::Advance { reader, delta }),
        1 => (0..READERS).prop_map(|reader| Op::Release { reader }),
        1 => policy.prop_map(Op::Policy),
        2 => (1usize..4).prop_map(|max_batches| Op::Compact { max_batches }),
        1 => any::<bool>().prop_map(|heartbeat| Op::Collect { heartbeat }),
    ]
}

/// The naive model.
#[derive(Debug, Default)]
struct Model {
    updates: Vec<(Row, u64, Diff)>,
    upper: u64,
    /// `None` once the policy released its hold (never here: uppers stay open).
    policy_hold: u64,
    policy: Option<ReadPolicy<u64>>,
    readers: [Option<u64>; READERS],
}

impl Model {
    fn since(&self) -> u64 {
        self.readers.iter().flatten().fold(self.policy_hold, |a, b| a.min(*b))
    }

    fn follow_policy(&mut self) {
        let policy = self.policy.clone().expect("set at the start");
        if let Some(target) = policy.frontier(at(self.upper).borrow()).as_option() {
            self.policy_hold = self.policy_hold.max(*target);
        }
    }
}

fn reader_id(reader: usize) -> ReaderId {
    ReaderId(format!("leased-{reader}"))
}

/// The blob store and the pure state, driven as the shell drives them.
struct Harness {
    state: ShardState,
    blob: BTreeMap<String, Bytes>,
    next_key: u64,
    next_token: u128,
}

impl Harness {
    fn write(
        &mut self,
        updates: Vec<(Row, u64, Diff)>,
        target_bytes: usize,
    ) -> Vec<storage::shard::state::PartRef> {
        let mut parts = Vec::new();
        for chunk in split_run(updates, target_bytes) {
            let key = format!("u1/{}", self.next_key);
            self.next_key += 1;
            let bytes = encode_part(&chunk);
            parts.push(part_ref(key.clone(), &bytes, chunk.len() as u64));
            self.blob.insert(key, bytes);
        }
        parts
    }

    fn read(&self, batch: &Batch) -> Vec<(Row, u64, Diff)> {
        let mut out = Vec::new();
        for part in &batch.parts {
            out.extend(decode_part(part, &self.blob[&part.key]).expect("parts are intact"));
        }
        out
    }
}

fn consolidated(updates: impl Iterator<Item = (Row, Diff)>) -> Vec<(Row, Diff)> {
    let mut counts: BTreeMap<Row, Diff> = BTreeMap::new();
    for (row, diff) in updates {
        *counts.entry(row).or_default() += diff;
    }
    counts.into_iter().filter(|(_, d)| *d != 0).collect()
}

fn per_time(updates: impl Iterator<Item = (Row, u64, Diff)>) -> BTreeMap<(u64, Row), Diff> {
    let mut counts: BTreeMap<(u64, Row), Diff> = BTreeMap::new();
    for (row, time, diff) in updates {
        *counts.entry((time, row)).or_default() += diff;
    }
    counts.retain(|_, d| *d != 0);
    counts
}

fn apply(h: &mut Harness, m: &mut Model, op: Op) -> Result<(), TestCaseError> {
    match op {
        Op::Append { updates, advance, stale, lost_reply } => {
            let lower = m.upper;
            let expected = if stale && lower > 0 { lower - 1 } else { lower };
            let updates: Vec<_> = updates
                .into_iter()
                .filter(|(_, dt, _)| *dt < advance)
                .map(|(x, dt, diff)| (int_row(x), lower + dt, diff))
                .collect();
            let run = consolidate_run(updates.clone()).expect("small diffs");
            let parts = if run.updates.is_empty() { Vec::new() } else { h.write(run.updates.clone(), 40) };
            h.next_token += 1;
            let input = AppendInput {
                writer: WriterId("w".into()),
                token: IdempotencyToken(h.next_token),
                lower: at(expected),
                upper: at(lower + advance),
                parts,
                count_bound: run.count_bound,
                now_ms: 0,
                writer_lease_ms: u64::MAX,
            };
            match h.state.append(&input) {
                Err(Refusal::UpperMismatch { current }) => {
                    prop_assert!(expected != lower);
                    prop_assert_eq!(current, at(lower));
                    for part in &input.parts {
                        h.blob.remove(&part.key);
                    }
                }
                Ok(next) => {
                    prop_assert_eq!(expected, lower);
                    h.state = next;
                    m.updates.extend(updates);
                    m.upper = lower + advance;
                    m.follow_policy();
                    if lost_reply {
                        // The retry finds its token and does not append again.
                        prop_assert_eq!(h.state.applied(&input.writer, input.token), Some(true));
                        let again = matches!(h.state.append(&input), Err(Refusal::UpperMismatch { .. }));
                        prop_assert!(again, "a retry without the token check is refused");
                    }
                }
                Err(other) => prop_assert!(false, "unexpected refusal {other:?}"),
            }
        }
        Op::Hold { reader, offset } => {
            let frontier = at(m.since() + offset);
            let next = h
                .state
                .hold_reader(&reader_id(reader), false, &frontier, 0, u64::MAX)
                .expect("beyond the since");
            h.state = next;
            let held =
                m.readers[reader].map_or(m.since() + offset, |current| current.min(m.since() + offset));
            m.readers[reader] = Some(held);
        }
        Op::Advance { reader, delta } => {
            if let Some(current) = m.readers[reader] {
                if let Some(next) = h.state.advance_reader(&reader_id(reader), &at(current + delta)).unwrap()
                {
                    h.state = next;
                }
                m.readers[reader] = Some(current + delta);
                prop_assert_eq!(h.state.advance_reader(&reader_id(reader), &at(current)).unwrap(), None);
            }
        }
        Op::Release { reader } => {
            if let Some(next) = h.state.release_reader(&reader_id(reader)) {
                h.state = next;
            }
            m.readers[reader] = None;
        }
        Op::Policy(policy) => {
            h.state = h.state.set_policy(policy.clone()).unwrap();
            m.policy = Some(policy);
            m.follow_policy();
        }
        Op::Compact { max_batches } => {
            while let Some(request) = h.state.compaction_request(max_batches) {
                let runs = request.inputs.iter().map(|b| h.read(b)).collect();
                let run = merge_runs(runs, &request.since, request.upper());
                let output = (!run.updates.is_empty()).then(|| Batch {
                    lower: request.lower().clone(),
                    upper: request.upper().clone(),
                    parts: h.write(run.updates, 60),
                    count_bound: run.count_bound,
                });
                h.state = h.state.apply_merge(&request, output).unwrap();
            }
        }
        Op::Collect { heartbeat } => {
            if heartbeat {
                for reader in 0..READERS {
                    if h.state.readers.contains_key(&reader_id(reader)) {
                        let seqno = h.state.seqno;
                        h.state = h.state.heartbeat(&reader_id(reader), 0, seqno).unwrap();
                    }
                }
            }
            let floor = h.state.gc_floor();
            let parts = h.state.collectable(floor);
            let keys: BTreeSet<String> = parts.iter().map(|p| p.key.clone()).collect();
            for key in &keys {
                h.blob.remove(key);
            }
            if let Some(next) = h.state.forget_retired(&keys) {
                h.state = next;
            }
        }
    }
    Ok(())
}

fn check(h: &Harness, m: &Model, previous_since: &Antichain<u64>) -> Result<(), TestCaseError> {
    let state = &h.state;
    state.check();
    prop_assert_eq!(&state.since, &at(m.since()));
    prop_assert_eq!(&state.upper, &at(m.upper));
    prop_assert!(PartialOrder::less_equal(previous_since, &state.since), "the since regressed");
    let since = m.since();
    let stored: Vec<Vec<(Row, u64, Diff)>> = state.batches.iter().map(|b| h.read(b)).collect();
    for t in since..m.upper {
        let expected = consolidated(m.updates.iter().filter(|u| u.1 <= t).map(|u| (u.0.clone(), u.2)));
        let actual = consolidated(stored.iter().flatten().filter(|u| u.1 <= t).map(|u| (u.0.clone(), u.2)));
        prop_assert_eq!(actual, expected, "snapshot at {}", t);
    }
    for p in since..=m.upper {
        let expected = per_time(m.updates.iter().filter(|u| u.1 >= p).cloned());
        let actual = per_time(stored.iter().flatten().filter(|u| u.1 >= p).cloned());
        prop_assert_eq!(actual, expected, "a listener at {}", p);
    }
    let mut row_sums: BTreeMap<&Row, u128> = BTreeMap::new();
    for (row, _, diff) in stored.iter().flatten() {
        *row_sums.entry(row).or_default() += u128::from(diff.unsigned_abs());
    }
    prop_assert!(
        row_sums.values().all(|sum| *sum <= state.count_bound()),
        "the count bound covers every row"
    );
    let known: BTreeSet<&str> = state.known_keys();
    let stored_keys: BTreeSet<&str> = h.blob.keys().map(String::as_str).collect();
    prop_assert_eq!(known, stored_keys, "the blob holds exactly the live and retired parts");
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn the_shard_state_machine_agrees_with_a_naive_model_after_every_step(ops in prop::collection::vec(op(), 1..50)) {
        let id = GlobalId::User(1);
        let policy = ReadPolicy::LagWriteFrontier { lag_ms: 2, granularity_ms: 0 };
        let mut h = Harness { state: ShardState::create(id, int_desc(), policy.clone()), blob: BTreeMap::new(), next_key: 0, next_token: 0 };
        let mut m = Model { policy: Some(policy), ..Model::default() };
        for op in ops {
            let previous_since = h.state.since.clone();
            let previous_seqno = h.state.seqno;
            apply(&mut h, &mut m, op)?;
            prop_assert!(h.state.seqno >= previous_seqno);
            check(&h, &m, &previous_since)?;
        }
    }
}

/// A collection's appends for the snapshot stream test: per append, updates `(x, time offset, diff)`.
type Appends = Vec<(Vec<(i64, u64, Diff)>, u64)>;

fn appends() -> impl Strategy<Value = Appends> {
    let append = (prop::collection::vec((0i64..12, 0u64..3, -2i64..3), 0..12), 1u64..4);
    prop::collection::vec(append, 1..10)
}

/// Appends `appends` to a shard with parts of about `part_target_bytes` (40: one to three updates each,
/// so a row's updates span parts and batches), optionally compacts, and checks the snapshot stream at
/// every readable time, in chunks of `chunk_bytes`, against the naive sum of the appended updates.
async fn snapshot_stream_matches_the_naive_sum(
    appends: Appends,
    compact: bool,
    chunk_bytes: usize,
    part_target_bytes: usize,
) {
    use storage::{ShardCollections, ShardConfig, StorageCollections};
    let config = ShardConfig { part_target_bytes, background_maintenance: false, ..ShardConfig::default() };
    let blob = "mem://".parse().unwrap();
    let consensus = "mem://".parse().unwrap();
    let storage = ShardCollections::open(&blob, &consensus, config).await.unwrap();
    let id = GlobalId::User(1);
    storage.create_collection(id, int_desc()).await.unwrap();
    storage.set_read_policy(id, ReadPolicy::ValidFrom(at(0))).await.unwrap();
    let mut all = Vec::new();
    let mut upper = 0;
    for (updates, advance) in appends {
        let updates: Vec<(Row, u64, Diff)> = updates
            .into_iter()
            .filter(|u| u.2 != 0)
            .map(|(x, dt, d)| (int_row(x), upper + dt.min(advance - 1), d))
            .collect();
        all.extend(updates.iter().cloned());
        storage.append(vec![append(id, updates, upper, upper + advance)]).await.unwrap();
        upper += advance;
    }
    if compact {
        storage.set_read_policy(id, ReadPolicy::ValidFrom(at(upper / 2))).await.unwrap();
        while storage.maintain(id, false).await.unwrap().merges > 0 {}
    }
    let since = storage.frontiers(id).await.unwrap().since.as_option().copied().unwrap();
    for t in since..upper {
        let expected = consolidated(all.iter().filter(|u| u.1 <= t).map(|u| (u.0.clone(), u.2)));
        let mut stream = storage.snapshot_stream(id, t).await.unwrap();
        let mut actual = Vec::new();
        while let Some(chunk) = stream.next_chunk(chunk_bytes).await.unwrap() {
            assert!(!chunk.is_empty(), "no empty chunks");
            actual.extend(chunk);
        }
        assert!(actual.windows(2).all(|w| w[0].0 < w[1].0), "rows in order, each once: {actual:?}");
        assert_eq!(actual, expected, "snapshot at {t}");
        assert_eq!(storage.snapshot(id, t).await.unwrap(), expected, "snapshot at {t}");
    }
    storage.shutdown().await;
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn a_snapshot_stream_over_many_batches_of_tiny_parts_equals_the_naive_sum(
        appends in appends(),
        compact in any::<bool>(),
        chunk_bytes in prop_oneof![Just(1usize), 1usize..200, Just(usize::MAX)],
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(snapshot_stream_matches_the_naive_sum(appends, compact, chunk_bytes, 40));
    }

    /// Two batches whose rows interleave (and repeat, with counts that may cancel) in parts of several
    /// rows: the two-way merge compares row by row, sums a row found in both and leaves a part's last
    /// row for the next part.
    #[test]
    fn a_snapshot_of_two_batches_whose_rows_interleave_equals_the_naive_sum(
        first in prop::collection::vec((0i64..40, 0u64..3, -2i64..3), 0..40),
        second in prop::collection::vec((0i64..40, 0u64..3, -2i64..3), 0..40),
        chunk_bytes in prop_oneof![Just(1usize), 1usize..200, Just(usize::MAX)],
        part_target_bytes in prop_oneof![Just(40usize), 100usize..400],
    ) {
        let appends = vec![(first, 3), (second, 3)];
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(snapshot_stream_matches_the_naive_sum(appends, false, chunk_bytes, part_target_bytes));
    }

    /// Batches whose rows do not interleave (each append its own range of rows) and parts of many rows:
    /// the merge moves whole runs of rows below the other batches' heads, and after compaction a
    /// single batch's parts move as they are.
    #[test]
    fn a_snapshot_of_batches_of_disjoint_rows_equals_the_naive_sum(
        appends in appends(),
        compact in any::<bool>(),
        chunk_bytes in prop_oneof![Just(1usize), 1usize..200, Just(usize::MAX)],
        part_target_bytes in prop_oneof![Just(40usize), 100usize..400],
    ) {
        let disjoint = appends
            .into_iter()
            .enumerate()
            .map(|(i, (updates, advance))| {
                let offset = 100 * i as i64;
                (updates.into_iter().map(|(x, dt, d)| (x + offset, dt, d)).collect(), advance)
            })
            .collect();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(snapshot_stream_matches_the_naive_sum(disjoint, compact, chunk_bytes, part_target_bytes));
    }
}
