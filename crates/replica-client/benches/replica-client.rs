//! Benchmarks of the replica client (issue 6): history compaction under churn, and replay.
//!
//! - `replica_client.history_len_100k_cycles` and `replica_client.history_bytes_100k_cycles`: a
//!   [`CommandHistory`] holding a few long-lived dataflows goes through 100,000 cycles of create, schedule,
//!   two compactions, a configuration update, a peek that is answered, and a drop. Its replay length and
//!   the live heap bytes of the process (a counting global allocator) are compared with the baseline after
//!   0 cycles (a live state of a few dataflows, a configuration and a pending peek). The bar (DESIGN
//!   §5.7, issue 6) is a ratio of about 1: the history is O(live state). `..._100k_vs_1k_cycles` compares
//!   with the bytes after 1,000 cycles, once every structure has reached its working size: no growth.
//! - `replica_client.core_bytes_100k_cycles`: the same cycles through a live [`ReplicaCore`] (history,
//!   hydration gate with a limit of 2, response merging), with the replica's answers (frontiers, peek rows,
//!   the dropped collection's empty frontier) fed back in.
//! - `replica_client.replay_10k`: the time to replay a history of 10,000 live dataflows through a fresh
//!   connection of a [`ReplicaCore`] (handshake, replay, hydration gate), best of 5; and
//!   `replica_client.replay_per_dataflow_10k`, its cost per dataflow against the same at 1,000 dataflows
//!   (ratio about 1: replay is linear in the live state; smaller histories fit in cache and look cheaper).
//!
//! **What it is not.** Not a criterion bench (`harness = false`), and not simulated code: it reads the
//! wall clock. Run it with `cargo xtask bench replica-client` (or `cargo bench -p replica-client --bench
//! replica-client`), which collects the `bench ...` lines.

// A benchmark reports on stdout; `cargo xtask bench` reads it from there.
#![allow(clippy::print_stdout)]
// A benchmark measures wall-clock time; clippy.toml's clock rule is for simulated code.
#![allow(clippy::disallowed_methods)]
// The counting global allocator implements `GlobalAlloc`, an unsafe trait; it only forwards to `System`.
#![allow(unsafe_code)]

use std::hint::black_box;
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use frontiers::Antichain;
use protocol::{
    BuildDesc, ColumnType, ComputeCommand, ComputeParameters, ComputeResponse, DataflowDescription, Datum,
    FrontiersResponse, GlobalId, IndexExport, InstanceConfig, InstanceId, MapFilterProject, PROTOCOL_VERSION,
    Peek, PeekId, PeekResponse, PeekTarget, Plan, RelationDesc, ReplicaId, Row, RowSetFinishing, ScalarType,
    SourceImport,
};
use replica_client::{Backoff, CommandHistory, ReplicaCore, ReplicaCoreConfig, ReplicaOutput};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::live_bytes;

const CYCLES: u64 = 100_000;
/// Dataflows that live through the whole churn benchmark.
const LONG_LIVED: u64 = 3;
/// The source every dataflow reads.
const SOURCE: GlobalId = GlobalId::System(1);

fn f(t: u64) -> Antichain<u64> {
    Antichain::from_elem(t)
}

/// An index `User(id)` over the source, as of 0.
fn dataflow(id: u64) -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new(format!("index {id}"));
    df.source_imports.insert(
        SOURCE,
        SourceImport { desc: RelationDesc::new([("x", ColumnType::new(ScalarType::Int64, false))]) },
    );
    df.objects_to_build.push(BuildDesc { id: GlobalId::Transient(id), plan: Plan::get(SOURCE) });
    df.index_exports.insert(GlobalId::User(id), IndexExport { on_id: GlobalId::Transient(id), key: vec![0] });
    df.as_of = Some(f(0));
    df
}

fn peek(uuid: u64, id: u64) -> Peek<u64> {
    Peek {
        uuid: PeekId(uuid),
        target: PeekTarget::Index { id: GlobalId::User(id) },
        timestamp: 10,
        literal_constraints: None,
        map_filter_project: MapFilterProject::new(1),
        finishing: RowSetFinishing::unordered(),
    }
}

fn create_instance() -> ComputeCommand<u64> {
    ComputeCommand::CreateInstance(InstanceConfig { instance_id: InstanceId(1), replica_id: ReplicaId(1) })
}

/// The live state every churn benchmark starts from (its baseline): the instance, a configuration, a few
/// long-lived dataflows, scheduled and compacted, and a pending peek.
fn baseline_commands() -> Vec<ComputeCommand<u64>> {
    let mut commands = vec![
        create_instance(),
        ComputeCommand::UpdateConfiguration(ComputeParameters {
            max_result_size_bytes: Some(1 << 20),
            ..Default::default()
        }),
    ];
    for id in 0..LONG_LIVED {
        let export = GlobalId::User(id);
        commands.push(ComputeCommand::CreateDataflow(dataflow(id)));
        commands.push(ComputeCommand::Schedule(export));
        commands.push(ComputeCommand::AllowCompaction { id: export, frontier: f(5) });
    }
    commands.push(ComputeCommand::Peek(peek(0, 0)));
    commands
}

/// The first id of a churned dataflow (and of its peek).
const FIRST_CHURNED: u64 = 1_000;

/// The commands of one churn cycle for dataflow `id`, with the peek `uuid`: everything but the peek's
/// answer, which the caller delivers between `before_answer` and `after_answer`.
fn cycle_commands(id: u64, uuid: u64) -> (Vec<ComputeCommand<u64>>, Vec<ComputeCommand<u64>>) {
    let export = GlobalId::User(id);
    let before_answer = vec![
        ComputeCommand::CreateDataflow(dataflow(id)),
        ComputeCommand::Schedule(export),
        ComputeCommand::AllowCompaction { id: export, frontier: f(5) },
        ComputeCommand::UpdateConfiguration(ComputeParameters {
            max_result_size_bytes: Some((1 << 20) + id % 2),
            ..Default::default()
        }),
        ComputeCommand::AllowCompaction { id: export, frontier: f(10) },
        ComputeCommand::Peek(peek(uuid, id)),
    ];
    let after_answer = vec![ComputeCommand::AllowCompaction { id: export, frontier: Antichain::new() }];
    (before_answer, after_answer)
}

fn report(name: &str, value: f64, unit: &str, baseline: f64) {
    let ratio = value / baseline;
    println!("bench {name}: {value:.3} {unit} (baseline {baseline:.3} {unit}, ratio {ratio:.3})");
}

/// A [`CommandHistory`] through the churn: (length, live bytes) at the baseline and after the cycles.
fn history_churn() {
    let start = live_bytes();
    let mut history = CommandHistory::<u64>::new();
    for command in baseline_commands() {
        history.push(&command).expect("record");
    }
    let (baseline_len, baseline_bytes) = (history.len(), live_bytes() - start);
    let mut bytes_after_1k = 0;
    for cycle in 0..CYCLES {
        if cycle == 1_000 {
            bytes_after_1k = live_bytes() - start;
        }
        let id = FIRST_CHURNED + cycle;
        let (before_answer, after_answer) = cycle_commands(id, id);
        for command in &before_answer {
            history.push(command).expect("record");
        }
        history.retire_peek(PeekId(id));
        for command in &after_answer {
            history.push(command).expect("record");
        }
    }
    let (len, bytes) = (history.len(), live_bytes() - start);
    assert_eq!(history.dataflow_count() as u64, LONG_LIVED);
    assert_eq!(history.peek_count(), 1);
    report("replica_client.history_len_100k_cycles", len as f64, "commands", baseline_len as f64);
    report("replica_client.history_bytes_100k_cycles", bytes as f64, "bytes", baseline_bytes as f64);
    report("replica_client.history_bytes_100k_vs_1k_cycles", bytes as f64, "bytes", bytes_after_1k as f64);
    println!("  ({} commands recorded over the history's lifetime)", history.recorded());
    drop(black_box(history));
}

/// A live [`ReplicaCore`] with one process: connects it and completes the handshake.
fn connected_core(history: CommandHistory<u64>, hydration_concurrency: Option<usize>) -> ReplicaCore<u64> {
    let config = ReplicaCoreConfig {
        replica_id: ReplicaId(1),
        processes: 1,
        backoff: Backoff::default(),
        hydration_concurrency,
    };
    let mut core = ReplicaCore::new(config, history);
    core.tick(0);
    let epoch = core.epoch();
    core.connected(epoch);
    let mut nonce = None;
    while let Some(output) = core.poll() {
        if let ReplicaOutput::Send { command: ComputeCommand::Hello { nonce: n, .. }, .. } = output {
            nonce = Some(n);
        }
    }
    let nonce = nonce.expect("a Hello");
    core.receive(epoch, 0, ComputeResponse::Hello { version: PROTOCOL_VERSION, nonce }, 0, 0.5);
    assert!(core.is_live());
    core
}

fn frontiers(id: GlobalId, upper: Antichain<u64>) -> ComputeResponse<u64> {
    ComputeResponse::Frontiers {
        id,
        frontiers: FrontiersResponse {
            write_frontier: Some(upper.clone()),
            input_frontier: Some(upper.clone()),
            output_frontier: Some(upper),
        },
    }
}

/// Drains the core's outputs; returns how many were commands to send.
fn drain(core: &mut ReplicaCore<u64>) -> usize {
    let mut sent = 0;
    while let Some(output) = core.poll() {
        if let ReplicaOutput::Send { .. } = output {
            sent += 1;
        }
        black_box(output);
    }
    sent
}

/// The churn through a live [`ReplicaCore`], with the replica's answers fed back in.
fn core_churn() {
    let start = live_bytes();
    let mut core = connected_core(CommandHistory::new(), Some(2));
    for command in baseline_commands() {
        core.send(command).expect("send");
    }
    for id in 0..LONG_LIVED {
        core.receive(core.epoch(), 0, frontiers(GlobalId::User(id), f(11)), 0, 0.5);
    }
    drain(&mut core);
    let (baseline_len, baseline_bytes) = (core.history().len(), live_bytes() - start);
    let row = Row::pack([Datum::Int64(7)]);
    let mut bytes_after_1k = 0;
    for cycle in 0..CYCLES {
        if cycle == 1_000 {
            bytes_after_1k = live_bytes() - start;
        }
        let id = FIRST_CHURNED + cycle;
        let export = GlobalId::User(id);
        let (before_answer, after_answer) = cycle_commands(id, id);
        for command in before_answer {
            core.send(command).expect("send");
        }
        let epoch = core.epoch();
        core.receive(epoch, 0, frontiers(export, f(11)), 0, 0.5);
        let rows = PeekResponse::Rows(vec![(row.clone(), NonZeroU64::MIN)]);
        core.receive(epoch, 0, ComputeResponse::PeekResponse { uuid: PeekId(id), response: rows }, 0, 0.5);
        for command in after_answer {
            core.send(command).expect("send");
        }
        core.receive(epoch, 0, frontiers(export, Antichain::new()), 0, 0.5);
        drain(&mut core);
    }
    let (len, bytes) = (core.history().len(), live_bytes() - start);
    assert!(core.is_live());
    report("replica_client.core_history_len_100k_cycles", len as f64, "commands", baseline_len as f64);
    report("replica_client.core_bytes_100k_cycles", bytes as f64, "bytes", baseline_bytes as f64);
    report("replica_client.core_bytes_100k_vs_1k_cycles", bytes as f64, "bytes", bytes_after_1k as f64);
    drop(black_box(core));
}

/// A history of `dataflows` live, scheduled and compacted dataflows.
fn live_history(dataflows: u64) -> CommandHistory<u64> {
    let mut history = CommandHistory::<u64>::new();
    history.push(&create_instance()).expect("record");
    for id in 0..dataflows {
        let export = GlobalId::User(id);
        history.push(&ComputeCommand::CreateDataflow(dataflow(id))).expect("record");
        history.push(&ComputeCommand::Schedule(export)).expect("record");
        history.push(&ComputeCommand::AllowCompaction { id: export, frontier: f(5) }).expect("record");
    }
    history
}

/// The time to replay `history` on a fresh connection of a core (handshake included), best of 5.
fn replay_time(history: &CommandHistory<u64>) -> Duration {
    let expected = history.len() + 1; // and InitializationComplete
    (0..5)
        .map(|_| {
            let copy = history.clone();
            let start = Instant::now();
            let mut core = connected_core(copy, None);
            let sent = drain(&mut core);
            let elapsed = start.elapsed();
            assert_eq!(sent, expected, "the whole history is replayed");
            drop(black_box(core));
            elapsed
        })
        .min()
        .expect("runs")
}

fn replay() {
    let (small, large) = (1_000u64, 10_000u64);
    let small_time = replay_time(&live_history(small));
    let large_time = replay_time(&live_history(large));
    let per = |d: Duration, n: u64| d.as_secs_f64() * 1e6 / n as f64;
    println!("bench replica_client.replay_10k: {:.3} ms", large_time.as_secs_f64() * 1e3);
    report("replica_client.replay_per_dataflow_10k", per(large_time, large), "us", per(small_time, small));
}

fn main() {
    // `REPLICA_CLIENT_BENCH=history|core|replay` runs one benchmark (for profiling); by default all run.
    let only = std::env::var("REPLICA_CLIENT_BENCH").ok();
    let run = |name: &str| only.as_deref().is_none_or(|only| only == name);
    if run("history") {
        history_churn();
    }
    if run("core") {
        core_churn();
    }
    if run("replay") {
        replay();
    }
}
