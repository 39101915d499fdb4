//! Benchmarks of the compute replica, each against a baseline measured in the same run (DESIGN §6).
//!
//! - `maintenance_count` / `maintenance_join`: 1M updates through a count dataflow and through a join
//!   dataflow, driven through the protocol over a real socket (storage → replica → index), timed from
//!   `CreateDataflow` until the index's reported write frontier passes the last update's time. Baseline: a
//!   hand-written differential program over the same `Row`s, fed the same updates in the same epochs, timed
//!   until its probe passes the same time. Bar: ratio (baseline time / replica time) ≥ 0.8.
//! - `point_peek`: point lookups on a 1M-key index through the replica's socket, p50 and p99. Baseline: a
//!   loopback TCP echo of the same request and response sizes, measured in the same run.
//!
//! Prints `bench <name>: <value> <unit> (baseline <value> <unit>, ratio <r>)`. Run with
//! `cargo bench -p compute --bench compute` (release). Not a test: it asserts nothing beyond correctness of
//! the results it waits for.

// Benchmarks measure wall-clock time and print their results.
#![allow(clippy::disallowed_methods, clippy::print_stdout)]

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use compute::{ReplicaConfig, ReplicaServer};
use differential_dataflow::input::InputSession;
use frontiers::{Antichain, ReadPolicy};
use protocol::frame::{DEFAULT_MAX_FRAME_BYTES, encode_frame, read_frame, write_frame};
use protocol::{
    AggregateExpr, AggregateFunc, BuildDesc, ColumnType, ComputeCommand, ComputeResponse,
    DataflowDescription, Datum, GlobalId, IndexExport, InstanceConfig, InstanceId, MapFilterProject,
    PROTOCOL_VERSION, Peek, PeekId, PeekResponse, PeekTarget, Plan, RelationDesc, ReplicaId, Row, RowPacker,
    RowSetFinishing, ScalarType, SourceImport,
};
use storage::{AppendRequest, InProcess, StorageCollections, StoreConfig};
use timely::dataflow::ProbeHandle;
use timely::dataflow::operators::Probe;

#[path = "support/loopback.rs"]
mod loopback;

use loopback::echo_latencies;

const UPDATES: usize = 1_000_000;
const EPOCHS: u64 = 10;

fn kv_desc(k: &str, v: &str) -> RelationDesc {
    RelationDesc::new([
        (k, ColumnType::new(ScalarType::Int64, false)),
        (v, ColumnType::new(ScalarType::Int64, false)),
    ])
}

fn int_row(values: &[i64]) -> Row {
    Row::pack(values.iter().map(|v| Datum::Int64(*v)))
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(future)
}

/// `count` updates `(k, v)` with `k = i % keys`, spread evenly over `EPOCHS` epochs at times `1..=EPOCHS`.
fn updates(count: usize, keys: usize, salt: i64) -> Vec<Vec<(Row, u64, i64)>> {
    let per_epoch = count / EPOCHS as usize;
    (0..EPOCHS)
        .map(|epoch| {
            (0..per_epoch)
                .map(|j| {
                    let i = epoch as usize * per_epoch + j;
                    (int_row(&[(i % keys) as i64, i as i64 * 7 + salt]), epoch + 1, 1)
                })
                .collect()
        })
        .collect()
}

fn load(storage: &InProcess, id: GlobalId, desc: RelationDesc, epochs: &[Vec<(Row, u64, i64)>]) {
    block_on(async {
        storage.create_collection(id, desc).await.expect("create");
        let mut upper = 0;
        for epoch in epochs {
            let time = epoch[0].1;
            let request = AppendRequest {
                id,
                updates: epoch.clone(),
                expected_upper: Antichain::from_elem(upper),
                new_upper: Antichain::from_elem(time + 1),
            };
            storage.append(vec![request]).await.expect("append");
            upper = time + 1;
        }
    });
}

/// A minimal blocking controller connection.
struct Controller {
    stream: TcpStream,
}

impl Controller {
    fn connect(addr: SocketAddr) -> Controller {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut controller = Controller { stream };
        controller.send(&ComputeCommand::Hello { version: PROTOCOL_VERSION, nonce: 1 });
        let hello = controller.recv();
        assert!(matches!(hello, ComputeResponse::Hello { .. }), "{hello:?}");
        controller.send(&ComputeCommand::CreateInstance(InstanceConfig {
            instance_id: InstanceId(1),
            replica_id: ReplicaId(1),
        }));
        controller.send(&ComputeCommand::InitializationComplete);
        controller
    }

    fn send(&mut self, command: &ComputeCommand) {
        write_frame(&mut self.stream, command, DEFAULT_MAX_FRAME_BYTES).expect("send");
    }

    fn recv(&mut self) -> ComputeResponse {
        read_frame(&mut self.stream, DEFAULT_MAX_FRAME_BYTES).expect("recv")
    }

    /// Waits until `id`'s write frontier passes `time`.
    fn wait_frontier_beyond(&mut self, id: GlobalId, time: u64) {
        loop {
            if let ComputeResponse::Frontiers { id: got, frontiers } = self.recv()
                && got == id
                && let Some(write) = frontiers.write_frontier
                && !write.less_equal(&time)
            {
                return;
            }
        }
    }
}

fn start_replica(storage: Arc<InProcess>, workers: usize) -> compute::ReplicaHandle {
    ReplicaServer::start(ReplicaConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        workers,
        process: 0,
        timely_addresses: Vec::new(),
        storage,
    })
    .expect("start replica")
}

fn new_storage() -> Arc<InProcess> {
    Arc::new(InProcess::in_memory(StoreConfig {
        default_read_policy: ReadPolicy::NoPolicy,
        ..StoreConfig::default()
    }))
}

/// Runs a dataflow through the replica and returns the time from `CreateDataflow` to the index passing
/// the last epoch.
fn run_replica(storage: Arc<InProcess>, df: DataflowDescription<u64>, index: GlobalId) -> Duration {
    let replica = start_replica(storage, 1);
    let mut controller = Controller::connect(replica.local_addr());
    let start = Instant::now();
    controller.send(&ComputeCommand::CreateDataflow(df));
    controller.send(&ComputeCommand::Schedule(index));
    controller.wait_frontier_beyond(index, EPOCHS);
    let elapsed = start.elapsed();
    replica.shutdown();
    elapsed
}

/// How many times each throughput measurement runs (alternating replica and baseline); the median counts.
const RUNS: usize = 5;

/// The medians of `runs` measurements of (replica, baseline).
fn median_of(runs: usize, mut measure: impl FnMut() -> (Duration, Duration)) -> (Duration, Duration) {
    let (mut replica, mut baseline): (Vec<Duration>, Vec<Duration>) = (0..runs).map(|_| measure()).unzip();
    replica.sort();
    baseline.sort();
    (replica[runs / 2], baseline[runs / 2])
}

fn report(name: &str, value: f64, unit: &str, baseline: f64, ratio: f64) {
    println!("bench {name}: {value:.3} {unit} (baseline {baseline:.3} {unit}, ratio {ratio:.2})");
}

/// The baseline's projection: one pass over the row's encoding, no allocation (as the replica's).
fn project(row: &Row, columns: &[usize]) -> Row {
    let mut packer = RowPacker::new();
    let mut wanted = columns.iter().peekable();
    for (index, datum) in row.iter().enumerate() {
        match wanted.peek() {
            Some(column) if **column == index => {
                packer.push(datum);
                wanted.next();
            }
            Some(_) => {}
            None => break,
        }
    }
    packer.finish()
}

/// The hand-written count: `SELECT k, count(v) GROUP BY k`, indexed by `k`.
fn baseline_count(epochs: Vec<Vec<(Row, u64, i64)>>) -> Duration {
    let (tx, rx) = channel();
    timely::execute(timely::Config::thread(), move |worker| {
        let mut input: InputSession<u64, Row, i64> = InputSession::new();
        let probe = ProbeHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            let counts = input
                .to_collection(scope)
                .map(|row| project(&row, &[0]))
                .count()
                .map(|(key, count): (Row, i64)| {
                    let mut packer = RowPacker::new();
                    packer.extend_by_row(&key);
                    packer.push(Datum::Int64(count));
                    (key, packer.finish())
                })
                .arrange_by_key();
            counts.stream.probe_with(&probe);
        });
        // All epochs are available at once, as they are to the replica (storage already holds them).
        let start = Instant::now();
        for epoch in &epochs {
            for (row, time, diff) in epoch {
                input.update_at(row.clone(), *time, *diff);
            }
        }
        input.advance_to(EPOCHS + 1);
        input.flush();
        while probe.less_equal(&EPOCHS) {
            worker.step();
        }
        tx.send(start.elapsed()).expect("send");
    })
    .expect("timely");
    rx.recv().expect("elapsed")
}

/// The hand-written join: `a JOIN b ON a.k = b.k`, indexed by `k`.
fn baseline_join(a: Vec<Vec<(Row, u64, i64)>>, b: Vec<Vec<(Row, u64, i64)>>) -> Duration {
    let (tx, rx) = channel();
    timely::execute(timely::Config::thread(), move |worker| {
        let mut input_a: InputSession<u64, Row, i64> = InputSession::new();
        let mut input_b: InputSession<u64, Row, i64> = InputSession::new();
        let probe = ProbeHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            let left = input_a.to_collection(scope).map(|row| (project(&row, &[0]), row)).arrange_by_key();
            let right = input_b.to_collection(scope).map(|row| (project(&row, &[0]), row)).arrange_by_key();
            let joined = left
                .join_core(right, |_key, a: &Row, b: &Row| {
                    let mut packer = RowPacker::new();
                    packer.extend_by_row(a);
                    packer.extend_by_row(b);
                    Some(packer.finish())
                })
                .map(|row| (project(&row, &[0]), row))
                .arrange_by_key();
            joined.stream.probe_with(&probe);
        });
        // All epochs are available at once, as they are to the replica (storage already holds them).
        let start = Instant::now();
        for (ea, eb) in a.iter().zip(&b) {
            for (row, time, diff) in ea {
                input_a.update_at(row.clone(), *time, *diff);
            }
            for (row, time, diff) in eb {
                input_b.update_at(row.clone(), *time, *diff);
            }
        }
        input_a.advance_to(EPOCHS + 1);
        input_b.advance_to(EPOCHS + 1);
        input_a.flush();
        input_b.flush();
        while probe.less_equal(&EPOCHS) {
            worker.step();
        }
        tx.send(start.elapsed()).expect("send");
    })
    .expect("timely");
    rx.recv().expect("elapsed")
}

fn bench_count() {
    let keys = 100_000;
    let epochs = updates(UPDATES, keys, 0);
    let storage = new_storage();
    let source = GlobalId::User(1);
    load(&storage, source, kv_desc("k", "v"), &epochs);
    let mut df = DataflowDescription::new("count");
    df.source_imports.insert(source, SourceImport { desc: kv_desc("k", "v") });
    df.objects_to_build.push(BuildDesc {
        id: GlobalId::Transient(1),
        plan: Plan::Reduce {
            input: Box::new(Plan::get(source)),
            group_key: vec![0],
            aggregates: vec![AggregateExpr { func: AggregateFunc::Count, column: 1 }],
        },
    });
    let index = GlobalId::User(2);
    df.index_exports.insert(index, IndexExport { on_id: GlobalId::Transient(1), key: vec![0] });
    df.as_of = Some(Antichain::from_elem(0));
    let (replica, baseline) = median_of(RUNS, || {
        (run_replica(Arc::clone(&storage), df.clone(), index), baseline_count(epochs.clone()))
    });
    let rate = UPDATES as f64 / replica.as_secs_f64();
    let baseline_rate = UPDATES as f64 / baseline.as_secs_f64();
    report("maintenance_count", rate / 1e6, "M updates/s", baseline_rate / 1e6, rate / baseline_rate);
}

fn bench_join() {
    let keys = UPDATES / 2;
    let a = updates(UPDATES / 2, keys, 0);
    let b = updates(UPDATES / 2, keys, 1);
    let storage = new_storage();
    let (ia, ib) = (GlobalId::User(1), GlobalId::User(2));
    load(&storage, ia, kv_desc("k", "v"), &a);
    load(&storage, ib, kv_desc("k", "w"), &b);
    let mut df = DataflowDescription::new("join");
    df.source_imports.insert(ia, SourceImport { desc: kv_desc("k", "v") });
    df.source_imports.insert(ib, SourceImport { desc: kv_desc("k", "w") });
    df.objects_to_build.push(BuildDesc {
        id: GlobalId::Transient(1),
        plan: Plan::Join { inputs: vec![Plan::get(ia), Plan::get(ib)], equivalences: vec![vec![0, 2]] },
    });
    let index = GlobalId::User(3);
    df.index_exports.insert(index, IndexExport { on_id: GlobalId::Transient(1), key: vec![0] });
    df.as_of = Some(Antichain::from_elem(0));
    let (replica, baseline) = median_of(RUNS, || {
        (run_replica(Arc::clone(&storage), df.clone(), index), baseline_join(a.clone(), b.clone()))
    });
    let rate = UPDATES as f64 / replica.as_secs_f64();
    let baseline_rate = UPDATES as f64 / baseline.as_secs_f64();
    report("maintenance_join", rate / 1e6, "M updates/s", baseline_rate / 1e6, rate / baseline_rate);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn bench_point_peek() {
    let keys = 1_000_000usize;
    let storage = new_storage();
    let source = GlobalId::User(1);
    let rows: Vec<(Row, u64, i64)> = (0..keys).map(|i| (int_row(&[i as i64, i as i64 * 3]), 0, 1)).collect();
    block_on(async {
        storage.create_collection(source, kv_desc("k", "v")).await.expect("create");
        let request = AppendRequest {
            id: source,
            updates: rows,
            expected_upper: Antichain::from_elem(0),
            new_upper: Antichain::from_elem(1),
        };
        storage.append(vec![request]).await.expect("append");
    });
    let replica = start_replica(storage, 1);
    let mut controller = Controller::connect(replica.local_addr());
    let mut df = DataflowDescription::new("peek-index");
    df.source_imports.insert(source, SourceImport { desc: kv_desc("k", "v") });
    df.objects_to_build.push(BuildDesc { id: GlobalId::Transient(1), plan: Plan::get(source) });
    let index = GlobalId::User(2);
    df.index_exports.insert(index, IndexExport { on_id: GlobalId::Transient(1), key: vec![0] });
    df.as_of = Some(Antichain::from_elem(0));
    controller.send(&ComputeCommand::CreateDataflow(df));
    controller.send(&ComputeCommand::Schedule(index));
    controller.wait_frontier_beyond(index, 0);

    let (warmup, measured) = (200usize, 2_000usize);
    let mut latencies = Vec::with_capacity(measured);
    let mut request_bytes = 0;
    let mut response_bytes = 0;
    for i in 0..warmup + measured {
        let key = (i * 7919) % keys;
        let peek = ComputeCommand::Peek(Peek {
            uuid: PeekId(i as u64),
            target: PeekTarget::Index { id: index },
            timestamp: 0,
            literal_constraints: Some(vec![int_row(&[key as i64])]),
            map_filter_project: MapFilterProject::new(2),
            finishing: RowSetFinishing::unordered(),
        });
        let start = Instant::now();
        controller.send(&peek);
        let response = loop {
            if let ComputeResponse::PeekResponse { uuid, response } = controller.recv()
                && uuid == PeekId(i as u64)
            {
                break response;
            }
        };
        let elapsed = start.elapsed();
        let PeekResponse::Rows(rows) = &response else { panic!("peek failed: {response:?}") };
        assert_eq!(rows.len(), 1, "one row per key");
        if i == 0 {
            let mut buffer = Vec::new();
            encode_frame(&peek, DEFAULT_MAX_FRAME_BYTES, &mut buffer).expect("encode");
            request_bytes = buffer.len();
            buffer.clear();
            let answer: ComputeResponse = ComputeResponse::PeekResponse { uuid: PeekId(0), response };
            encode_frame(&answer, DEFAULT_MAX_FRAME_BYTES, &mut buffer).expect("encode");
            response_bytes = buffer.len();
        }
        if i >= warmup {
            latencies.push(elapsed);
        }
    }
    replica.shutdown();
    latencies.sort();
    let echo = echo_latencies(request_bytes, response_bytes, warmup, measured);
    let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
    let (e50, e99) = (percentile(&echo, 0.5), percentile(&echo, 0.99));
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    report("point_peek_p50", us(p50), "us", us(e50), us(p50) / us(e50));
    report("point_peek_p99", us(p99), "us", us(e99), us(p99) / us(e99));
}

fn main() {
    // `COMPUTE_BENCH=count|join|peek` runs one benchmark (for profiling); by default all run.
    let only = std::env::var("COMPUTE_BENCH").ok();
    let run = |name: &str| only.as_deref().is_none_or(|only| only == name);
    if run("count") {
        bench_count();
    }
    if run("join") {
        bench_join();
    }
    if run("peek") {
        bench_point_peek();
    }
}
