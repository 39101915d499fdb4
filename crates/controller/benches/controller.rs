//! Benchmarks of the compute controller (DESIGN §6, issue 7), each against a baseline measured in the
//! same run.
//!
//! - `controller.peek_p50` / `controller.peek_p99`: point lookups on a 1M-key index, through the
//!   controller's API (`peek` + awaiting the result) to one in-process replica over loopback TCP, one at a
//!   time, from a task on the controller's runtime (two workers), as a service's session task makes them.
//!   `..._blocking_caller`: the same from the thread that blocks on the runtime (`block_on`, outside its
//!   workers), which costs two more thread wake-ups per peek. Baseline: a loopback TCP round trip of the
//!   same request and response frame sizes. The three are measured in blocks of 100 taken in turns, so
//!   they see the same load on the host (this VM's loopback round trip alone moves between about 20 and
//!   45 us from one minute to the next). Bars, on the task's figures: p50 under 150 us, p99 under 1 ms
//!   (printed as warnings when missed).
//! - `controller.peek_throughput`: the same peeks with up to 256 in flight. Baseline: the same bytes
//!   echoed over loopback with the same window. Bar: above 20,000 peeks/s.
//! - `controller.frontier_update_10k`: the cost of one replica frontier update through an `InstanceCore`
//!   (read policy, `AllowCompaction`, import-hold downgrades, the history) with 10,000 indexes, against
//!   the same with 100, updates to pseudo-random collections (`..._sweep`: to each collection in turn,
//!   as a replica reporting every collection each tick does). Every 10 updates per collection an
//!   introspection interval passes (`tick`: frontier and wall-clock lag rows refreshed, the history
//!   caught up), inside the timing (each round of the large size holds exactly one). Each round is timed
//!   by the driving thread's CPU time (`test_support::cpu`), not the wall clock: time the thread waits
//!   for a core another process holds is not its cost. Best of 15 rounds of
//!   100,000 updates each, the two sizes alternating: this VM's memory latency swings for seconds at a
//!   time with its neighbours' load, so more, shorter rounds give the minimum a better chance.
//!   The fake storage layer applies the import-hold changes on its own thread every millisecond, as a
//!   storage layer does in a deployment (its work is neither timed nor run on the timed thread's
//!   caches). Bar: ratio at most 2. The work per update is constant (a handful of hash lookups); what
//!   grows is memory latency once the collections' state no longer fits in the caches (here from about
//!   1,000 collections on). At 10,000 an update reads about eight cache lines of one map entry (the
//!   collection's state and hold counts), which miss the L2; the controller issues them together, so
//!   what an update waits for is about three misses one after another (the map's index, the entry's
//!   key, then the rest at once).
//! - `controller.churn_*_100k`: an `InstanceCore` with a replica and a few long-lived indexes goes through
//!   100,000 cycles of create, hydrate, peek, answer, drop and the replica's dropped report, with the
//!   shell's ticks (a millisecond of clock per cycle, one more introspection interval at the end); history
//!   length, collections with state, hold-accounting entries and live heap bytes (a counting global
//!   allocator) against the baseline after 0 cycles. Bar: ratio 1. `..._vs_10k` compares the bytes with
//!   those after 10,000 cycles, once every structure has reached its working size: no growth.
//! - `controller.hydration_peak_rss_<workload>`: the peak RSS (`VmHWM`) of a `compute-replica` process,
//!   started by the `ProcessOrchestrator` on the embedded shards (blob files and a SQLite consensus in a
//!   temporary directory, which each replica process opens itself, DESIGN §9), hydrating 8 heavy dataflows
//!   over a 1M-row table with `hydration_concurrency` 1, against the same with 8 (a fresh process each; the
//!   median of 3 runs of each, alternating, as the peak depends on how the listens' reads interleave).
//!   Bar: ratio at most 0.5. Three workloads, because the ratio depends on how a dataflow's hydration peak
//!   compares with the state it keeps afterwards: `count` (`k % m` counted into about 100 groups),
//!   `sum` (the same through the general reduce) and `filter` (a scan into a 100-row index).
//!   `controller.hydration_time_<workload>` is the time until all 8 hydrated, 1 against 8. The bench builds `compute-replica` in release first (`$CARGO build --release`), a no-op
//!   when it is fresh.
//!
//! - `controller.metrics_frontier_updates_10k`: what the Prometheus metrics (`metrics.rs`) cost a frontier
//!   update: updates per second through an `InstanceCore` with 10,000 indexes and metrics
//!   (`InstanceCore::with_metrics`), against the same core without; random updates, an introspection
//!   interval (the metrics' flush, gauges and lag histograms included) every 10 updates per collection,
//!   as in `frontier_update_10k` (timed by CPU time, as there). 61 rounds, the order of the cores turning each round; the ratio is the
//!   median of the rounds' ratios (the figures beside it are the best rounds). A third core without
//!   metrics is measured the same way against the second: its ratio, printed as the control, shows what
//!   noise and memory layout alone do to the figure. Bar: ratio at least 0.95.
//! - `controller.metrics_peek_throughput`: pipelined point peeks per second (up to 256 in flight) through a
//!   controller with metrics (a peek's outcome, duration and command and response counts) against one
//!   without, each with its own in-process replica and a 100,000-key index; 61 rounds of 5,000 peeks
//!   each, which goes first alternating, the median of the rounds' ratios. Bar: ratio at least 0.95.
//! - `controller.peek_tls_p50` / `_p99` / `_throughput`: point peeks on a 100k-key index through a
//!   controller whose replica connection is TLS (with the shared secret), against the same through a
//!   controller connected over plain TCP (with the secret, `--insecure`), the baseline, measured in turns
//!   in the same run (`bench_tls`). The other peek figures above are over plain TCP with the secret.
//!   The hydration figures run the replica processes with TLS, as the orchestrator does by default.
//!
//! Prints `bench <name>: <value> <unit> (baseline <value> <unit>, ratio <r>)`. Run with
//! `cargo xtask bench controller` or `cargo bench -p controller --bench controller`;
//! `CONTROLLER_BENCH=frontiers|churn|peek|tls|hydration|metrics` runs one part. Not a test: it asserts only the
//! correctness of the results it waits for.

// A benchmark reports on stdout; `cargo xtask bench` reads it from there.
#![allow(clippy::print_stdout)]
// A benchmark measures wall-clock time; clippy.toml's clock rule is for simulated code.
#![allow(clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use compute::{ReplicaConfig, ReplicaHandle, ReplicaServer};
use controller::{
    ClientSecurity, ComputeController, ControllerConfig, ControllerEpoch, ControllerMetrics, InstanceCore,
    InstanceCoreConfig, PeekOptions, PeekRequest, ProcessOrchestrator, ProcessOrchestratorConfig,
    ReplicaLocation, ReplicaProcessSecurity, ReplicaTlsFiles, ServerSecurity, SharedSecret, TlsClientConfig,
    TlsServerConfig, lock,
};
use frontiers::{Antichain, ReadHold, ReadHolds, ReadPolicy};
use protocol::frame::{DEFAULT_MAX_FRAME_BYTES, encode_frame};
use protocol::{
    AggregateExpr, AggregateFunc, BinaryFunc, BuildDesc, ColumnType, ComputeCommand, ComputeResponse,
    DataflowDescription, Datum, FrontiersResponse, GlobalId, IndexExport, InstanceId, MapFilterProject, Peek,
    PeekId, PeekResponse, PeekTarget, Plan, RelationDesc, ReplicaId, Row, RowSetFinishing, ScalarExpr,
    ScalarType, SourceImport,
};
use replica_client::{ReplicaEvent, ReplicaStatus};
use storage::{AppendRequest, InProcess, StorageCollections, StoreConfig};

use test_support::counting_alloc::{CountingAlloc, live_bytes};
use test_support::cpu::thread_cpu_time;
use test_support::loopback::{Echo, echo_server};
use test_support::{XorShift, median};

/// Counts live bytes for the memory figures (`test_support::counting_alloc`).
#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const INSTANCE: InstanceId = InstanceId(1);
const REPLICA: ReplicaId = ReplicaId(1);

/// The benchmark's throwaway CA, server certificate (for `127.0.0.1`) and shared secret.
struct BenchPki {
    _dir: tempfile::TempDir,
    files: transport::certs::PkiFiles,
    secret: SharedSecret,
}

impl BenchPki {
    fn new() -> BenchPki {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let files = transport::certs::write_throwaway_pki(dir.path(), &["127.0.0.1"]).expect("certificates");
        BenchPki { _dir: dir, files, secret: SharedSecret::generate().expect("a shared secret") }
    }

    /// A server's security: TLS and the secret, or (`tls` false) plain TCP and the secret.
    fn server(&self, tls: bool) -> ServerSecurity {
        if !tls {
            return ServerSecurity::insecure(self.secret.clone());
        }
        let config = TlsServerConfig::from_pem_files(&self.files.server_cert, &self.files.server_key, None)
            .expect("the server certificate loads");
        ServerSecurity::tls(config, Some(self.secret.clone())).expect("authenticated")
    }

    /// A client's security, matching [`Self::server`].
    fn client(&self, tls: bool) -> ClientSecurity {
        if !tls {
            return ClientSecurity::insecure(self.secret.clone());
        }
        let config = TlsClientConfig::from_pem_files(&self.files.ca, None).expect("the CA loads");
        ClientSecurity::tls(config, Some(self.secret.clone())).expect("authenticated")
    }

    /// How orchestrated replica processes run: TLS and the secret.
    fn replica_processes(&self) -> ReplicaProcessSecurity {
        ReplicaProcessSecurity {
            tls: Some(ReplicaTlsFiles {
                cert: self.files.server_cert.clone(),
                key: self.files.server_key.clone(),
                client_ca: None,
            }),
            secret: Some(self.secret.clone()),
        }
    }
}

fn f(t: u64) -> Antichain<u64> {
    Antichain::from_elem(t)
}

fn kv_desc() -> RelationDesc {
    RelationDesc::new([
        ("k", ColumnType::new(ScalarType::Int64, false)),
        ("v", ColumnType::new(ScalarType::Int64, false)),
    ])
}

fn int_row(values: &[i64]) -> Row {
    Row::pack(values.iter().map(|v| Datum::Int64(*v)))
}

/// An index `export` on key `k` over storage collection `source`.
fn index_on(source: GlobalId, export: GlobalId, as_of: Option<u64>) -> DataflowDescription<u64> {
    let object = GlobalId::Transient(match export {
        GlobalId::User(n) | GlobalId::System(n) | GlobalId::Transient(n) => n,
    });
    let mut df = DataflowDescription::new(format!("index {export}"));
    df.source_imports.insert(source, SourceImport { desc: kv_desc() });
    df.objects_to_build.push(BuildDesc { id: object, plan: Plan::get(source) });
    df.index_exports.insert(export, IndexExport { on_id: object, key: vec![0] });
    df.as_of = as_of.map(f);
    df
}

fn report(name: &str, value: f64, unit: &str, baseline: f64, baseline_unit: &str, ratio: f64) {
    println!("bench {name}: {value:.3} {unit} (baseline {baseline:.3} {baseline_unit}, ratio {ratio:.3})");
}

// -------------------------------------------------------------------------------------------------
// Instance cores driven directly: frontier processing and churn

/// An instance core with one connected replica and a fake storage layer's hold accounting.
struct Core {
    core: InstanceCore<u64>,
    /// Shared with the storage thread of a frontier run ([`StorageThread`]).
    storage: Arc<Mutex<ReadHolds<GlobalId, u64>>>,
    /// Storage's own holds (its read policies), never released here.
    storage_policies: Vec<ReadHold<GlobalId, u64>>,
}

impl Core {
    fn new() -> Core {
        let config = InstanceCoreConfig {
            default_index_policy: ReadPolicy::LagWriteFrontier { lag_ms: 1, granularity_ms: 0 },
            ..Default::default()
        };
        let mut core = InstanceCore::new(INSTANCE, config, Arc::new(|| {}), 0);
        core.add_replica(REPLICA).expect("new replica");
        core.handle_replica_event(REPLICA, ReplicaEvent::Status(ReplicaStatus::Ready));
        let storage = Arc::new(Mutex::new(ReadHolds::new()));
        let mut this = Core { core, storage, storage_policies: Vec::new() };
        this.drain();
        this
    }

    /// The same core keeping Prometheus metrics, in a registry of its own.
    fn with_metrics(self) -> Core {
        let metrics = ControllerMetrics::register(&prometheus::Registry::new()).expect("a fresh registry");
        let Core { core, storage, storage_policies } = self;
        Core { core: core.with_metrics(metrics.instance(INSTANCE)), storage, storage_policies }
    }

    fn create_storage(&mut self, id: GlobalId) {
        let policy = lock_storage(&self.storage).create(id, f(0)).expect("new storage collection");
        self.storage_policies.push(policy);
    }

    fn create(&mut self, df: DataflowDescription<u64>) {
        let as_of = df.as_of.clone().expect("an as-of");
        let mut storage = lock_storage(&self.storage);
        let holds = df
            .source_imports
            .keys()
            .map(|id| (*id, storage.acquire(id, as_of.clone()).expect("storage hold")))
            .collect();
        drop(storage);
        self.core.create_dataflow(df, holds).expect("create dataflow");
    }

    fn respond(&mut self, response: ComputeResponse<u64>) {
        self.core.handle_replica_event(REPLICA, ReplicaEvent::Response(response));
    }

    fn report(&mut self, id: GlobalId, upper: Antichain<u64>) {
        let frontiers = FrontiersResponse { write_frontier: Some(upper), ..Default::default() };
        self.respond(ComputeResponse::Frontiers { id, frontiers });
    }

    /// What the shell does after each input: takes the outputs and the introspection updates.
    fn drain_controller(&mut self) {
        while let Some(output) = self.core.poll() {
            black_box(output);
        }
        black_box(self.core.drain_introspection());
    }

    /// The shell's part, then the storage layer's: it applies the storage hold changes.
    fn drain(&mut self) {
        self.drain_controller();
        black_box(lock_storage(&self.storage).process());
    }
}

fn lock_storage(storage: &Mutex<ReadHolds<GlobalId, u64>>) -> MutexGuard<'_, ReadHolds<GlobalId, u64>> {
    storage.lock().expect("storage holds poisoned")
}

/// The fake storage layer's own thread: it applies the hold changes the controller sends every
/// millisecond, as a storage layer does on its own thread (or process) in a deployment, so that its
/// work neither counts in nor evicts the controller's state from the caches of the timed thread.
struct StorageThread {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StorageThread {
    fn spawn(storage: Arc<Mutex<ReadHolds<GlobalId, u64>>>) -> StorageThread {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                black_box(lock_storage(&storage).process());
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        StorageThread { stop, thread: Some(thread) }
    }
}

impl Drop for StorageThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("storage thread");
        }
    }
}

const FRONTIER_UPDATES: u64 = 100_000;
/// Frontier updates per collection per introspection interval (e.g. a replica reporting progress every
/// 100 ms, introspection refreshed every second): the rate at which the timed loop calls `tick`.
const UPDATES_PER_INTERVAL: u64 = 10;

/// Which collection each frontier update is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UpdateOrder {
    /// A pseudo-random one: no locality at all (the worst case).
    Random,
    /// Each in turn, in id order, as a replica reporting every collection's progress each tick does.
    Sweep,
}

/// One instance with `collections` indexes, each on its own storage collection, and the state of the
/// replica reporting their frontiers.
struct FrontierRun {
    core: Core,
    collections: u64,
    order: UpdateOrder,
    uppers: Vec<u64>,
    rng: XorShift,
    turn: u64,
    updates: u64,
    now_ms: u64,
}

impl FrontierRun {
    fn new(collections: u64, order: UpdateOrder) -> FrontierRun {
        Self::with_core(Core::new(), collections, order)
    }

    fn with_core(mut core: Core, collections: u64, order: UpdateOrder) -> FrontierRun {
        for n in 0..collections {
            core.create_storage(GlobalId::System(n));
            core.create(index_on(GlobalId::System(n), GlobalId::User(n), Some(0)));
        }
        core.drain();
        FrontierRun {
            core,
            collections,
            order,
            uppers: vec![1u64; collections as usize],
            rng: XorShift::new(0x9E37_79B9_7F4A_7C15),
            turn: 0,
            updates: 0,
            now_ms: 0,
        }
    }

    /// The controller's time per frontier update over one round of `FRONTIER_UPDATES`: the CPU time of
    /// the thread that drives the core (see `test_support::cpu`; wall-clock time where Linux's
    /// `/proc/thread-self/schedstat` is missing), so the time this thread waits for a core that
    /// another process holds is not counted. The storage layer's processing of the import-hold changes is
    /// its own work, on its own thread.
    fn round(&mut self) -> Duration {
        let interval_ms = InstanceCoreConfig::<u64>::default().introspection_interval_ms;
        let _storage = StorageThread::spawn(Arc::clone(&self.core.storage));
        let start = Instant::now();
        let start_cpu = thread_cpu_time();
        for _ in 0..FRONTIER_UPDATES {
            let n = match self.order {
                UpdateOrder::Random => self.rng.next() % self.collections,
                UpdateOrder::Sweep => {
                    self.turn += 1;
                    self.turn % self.collections
                }
            };
            self.uppers[n as usize] += 1;
            self.core.report(GlobalId::User(n), f(self.uppers[n as usize]));
            self.core.drain_controller();
            self.updates += 1;
            if self.updates.is_multiple_of(UPDATES_PER_INTERVAL * self.collections) {
                // An introspection interval passed: frontier and lag rows are refreshed.
                self.now_ms += interval_ms;
                self.core.core.tick(self.now_ms);
                self.core.drain_controller();
            }
        }
        let elapsed = match (start_cpu, thread_cpu_time()) {
            (Some(start_cpu), Some(end_cpu)) => end_cpu - start_cpu,
            _ => start.elapsed(),
        };
        assert_eq!(self.core.core.collection_count() as u64, self.collections);
        elapsed / FRONTIER_UPDATES as u32
    }
}

/// Rounds per size; the best of each counts. The two sizes alternate, so that a noisy stretch of the
/// machine's time falls on both alike.
const FRONTIER_ROUNDS: usize = 15;

fn bench_frontiers() {
    let ns = |d: Duration| d.as_secs_f64() * 1e9;
    for (order, name) in
        [(UpdateOrder::Random, "frontier_update_10k"), (UpdateOrder::Sweep, "frontier_update_10k_sweep")]
    {
        let mut small = FrontierRun::new(100, order);
        let mut large = FrontierRun::new(10_000, order);
        let (mut small_best, mut large_best) = (Duration::MAX, Duration::MAX);
        for _ in 0..FRONTIER_ROUNDS {
            small_best = small_best.min(small.round());
            large_best = large_best.min(large.round());
        }
        let ratio = ns(large_best) / ns(small_best);
        report(&format!("controller.{name}"), ns(large_best), "ns", ns(small_best), "ns", ratio);
        if ratio > 2.0 {
            println!(
                "  WARNING: {order:?} updates at 10k collections cost {ratio:.2}x those at 100 (bar: 2x)"
            );
        }
    }
}

const CHURN_CYCLES: u64 = 100_000;

/// The state the churn benchmark counts.
#[derive(Debug, Clone, Copy)]
struct ChurnState {
    history: usize,
    collections: usize,
    holds: usize,
    peeks: usize,
    bytes: isize,
}

fn churn_state(core: &mut Core, start: isize) -> ChurnState {
    ChurnState {
        history: core.core.history_len(),
        collections: core.core.collection_count(),
        holds: lock(&core.core.shared()).len(),
        peeks: core.core.pending_peek_count(),
        bytes: live_bytes() - start,
    }
}

fn bench_churn() {
    let start = live_bytes();
    let mut core = Core::new();
    let source = GlobalId::System(1);
    core.create_storage(source);
    // The baseline: a few long-lived indexes, hydrated, and an introspection interval passed.
    for n in 0..3 {
        core.create(index_on(source, GlobalId::User(n), Some(0)));
        core.report(GlobalId::User(n), f(11));
    }
    let interval_ms = InstanceCoreConfig::<u64>::default().introspection_interval_ms;
    let mut now_ms = interval_ms;
    core.core.tick(now_ms);
    core.drain();
    let baseline = churn_state(&mut core, start);
    let mut after_10k = baseline;
    let row = int_row(&[1, 2]);
    for cycle in 0..CHURN_CYCLES {
        if cycle == 10_000 {
            after_10k = churn_state(&mut core, start);
        }
        let id = GlobalId::User(1_000 + cycle);
        core.create(index_on(source, id, Some(5)));
        core.drain();
        core.report(id, f(11));
        core.drain();
        let uuid = PeekId(cycle + 1);
        core.core
            .peek(PeekRequest {
                uuid,
                id,
                timestamp: 10,
                options: PeekOptions { finishing: RowSetFinishing::unordered(), ..Default::default() },
            })
            .expect("peek");
        core.drain();
        let response = PeekResponse::Rows(vec![(row.clone(), NonZeroU64::MIN)]);
        core.respond(ComputeResponse::PeekResponse { uuid, response });
        core.drain();
        core.core.drop_collections(&[id]).expect("drop");
        core.drain();
        core.report(id, Antichain::new());
        core.drain();
        // The shell's clock: a millisecond per cycle (the shell ticks every 50 ms).
        now_ms += 1;
        core.core.tick(now_ms);
        core.drain();
    }
    // A last introspection interval, as the shell's ticks bring within a second.
    core.core.tick(now_ms + interval_ms);
    core.drain();
    let after = churn_state(&mut core, start);
    assert_eq!(after.collections, baseline.collections, "{after:?} vs {baseline:?}");
    assert_eq!(after.peeks, 0);
    let figures = [
        ("controller.churn_history_len_100k", after.history, baseline.history, "commands"),
        ("controller.churn_collections_100k", after.collections, baseline.collections, "collections"),
        ("controller.churn_holds_100k", after.holds, baseline.holds, "collections"),
    ];
    for (name, value, base, unit) in figures {
        report(name, value as f64, unit, base as f64, unit, value as f64 / base as f64);
    }
    let (bytes, base) = (after.bytes as f64, baseline.bytes as f64);
    report("controller.churn_bytes_100k", bytes, "bytes", base, "bytes", bytes / base);
    let base = after_10k.bytes as f64;
    report("controller.churn_bytes_100k_vs_10k", bytes, "bytes", base, "bytes", bytes / base);
    drop(black_box(core));
}

// -------------------------------------------------------------------------------------------------
// Peeks through the controller to a real replica

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Polls `done` every 10 ms until it holds (at most `limit`).
async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not done after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

const KEYS: u64 = 1_000_000;

fn point_options(key: u64) -> PeekOptions {
    PeekOptions { literal_constraints: Some(vec![int_row(&[key as i64])]), ..PeekOptions::default() }
}

/// The frame sizes of one point peek and its answer, as the controller and the replica send them.
fn peek_frame_sizes(index: GlobalId, response: PeekResponse) -> (usize, usize) {
    let peek = ComputeCommand::<u64>::Peek(Peek {
        uuid: PeekId(1),
        target: PeekTarget::Index { id: index },
        timestamp: 0,
        literal_constraints: Some(vec![int_row(&[123_456])]),
        map_filter_project: MapFilterProject::new(2),
        finishing: RowSetFinishing::unordered(),
    });
    let mut buffer = Vec::new();
    encode_frame(&peek, DEFAULT_MAX_FRAME_BYTES, &mut buffer).expect("encode");
    let request = buffer.len();
    buffer.clear();
    let answer = ComputeResponse::<u64>::PeekResponse { uuid: PeekId(1), response };
    encode_frame(&answer, DEFAULT_MAX_FRAME_BYTES, &mut buffer).expect("encode");
    (request, buffer.len())
}

fn bench_peeks(pki: &BenchPki) {
    let runtime = runtime();
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let source = GlobalId::User(1);
    runtime.block_on(async {
        storage.create_collection(source, kv_desc()).await.expect("create");
        let updates = (0..KEYS as i64).map(|k| (int_row(&[k, 3 * k]), 0, 1)).collect();
        let request = AppendRequest { id: source, updates, expected_upper: f(0), new_upper: f(1) };
        storage.append(vec![request]).await.expect("append");
    });
    let replica = ReplicaServer::start(ReplicaConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        workers: 1,
        process: 0,
        timely_addresses: Vec::new(),
        storage: Arc::clone(&storage) as Arc<dyn StorageCollections>,
        security: pki.server(false),
    })
    .expect("start replica");
    let index = GlobalId::User(2);
    let (latencies, frame_bytes, throughput) = runtime.block_on(async {
        let config = ControllerConfig::new(ControllerEpoch(1), pki.client(false));
        let (mut controller, hydration) =
            controller_with_index(Arc::clone(&storage) as _, config, &replica, source, index).await;
        println!("  (1M-key index hydrated in {:.2} s)", hydration.as_secs_f64());

        // Warm-up, from a task; its last answer gives the frame sizes of the loopback baseline.
        let (c, _, response) =
            tokio::spawn(point_peeks(controller, index, 0..500, KEYS)).await.expect("task");
        controller = c;
        let (request_bytes, response_bytes) = peek_frame_sizes(index, response);
        let mut echo = Echo::start(request_bytes, response_bytes);
        echo.round_trips(500);
        // Blocks of 100 from a task, from the runtime's own thread (`block_on`) and of the baseline,
        // interleaved, so all three see the same load on the host.
        let mut latencies = PeekLatencies::default();
        for round in 0..50u64 {
            let keys = 500 + round * 200..500 + round * 200 + 100;
            let (c, in_task, _) =
                tokio::spawn(point_peeks(controller, index, keys.clone(), KEYS)).await.expect("task");
            let (c, blocking, _) = point_peeks(c, index, keys.end..keys.end + 100, KEYS).await;
            controller = c;
            latencies.in_task.extend(in_task);
            latencies.blocking.extend(blocking);
            latencies.echo.extend(echo.round_trips(100));
        }
        drop(echo);

        let (window, warmup, measured) = (256usize, 2_000u64, 30_000u64);
        let mut in_flight = VecDeque::with_capacity(window);
        let mut start = Instant::now();
        for i in 0..warmup + measured {
            if i == warmup {
                for handle in in_flight.drain(..) {
                    check_point_answer(handle).await;
                }
                start = Instant::now();
            }
            if in_flight.len() == window {
                check_point_answer(in_flight.pop_front().expect("full")).await;
            }
            let key = (i * 104_729) % KEYS;
            let handle = controller
                .peek(INSTANCE, PeekTarget::Index { id: index }, 0, point_options(key))
                .await
                .expect("peek");
            in_flight.push_back(handle);
            if i % 64 == 0 {
                while controller.try_process().is_some() {}
            }
        }
        for handle in in_flight.drain(..) {
            check_point_answer(handle).await;
        }
        let throughput = measured as f64 / start.elapsed().as_secs_f64();
        drop(controller);
        (latencies, (request_bytes, response_bytes), throughput)
    });
    replica.shutdown();

    let mut latencies = latencies;
    for sorted in [&mut latencies.in_task, &mut latencies.blocking, &mut latencies.echo] {
        sorted.sort();
    }
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (e50, e99) = (percentile(&latencies.echo, 0.5), percentile(&latencies.echo, 0.99));
    let (p50, p99) = (percentile(&latencies.in_task, 0.5), percentile(&latencies.in_task, 0.99));
    report("controller.peek_p50", us(p50), "us", us(e50), "us", us(p50) / us(e50));
    report("controller.peek_p99", us(p99), "us", us(e99), "us", us(p99) / us(e99));
    let (b50, b99) = (percentile(&latencies.blocking, 0.5), percentile(&latencies.blocking, 0.99));
    report("controller.peek_p50_blocking_caller", us(b50), "us", us(e50), "us", us(b50) / us(e50));
    report("controller.peek_p99_blocking_caller", us(b99), "us", us(e99), "us", us(b99) / us(e99));
    if us(p50) >= 150.0 {
        println!("  WARNING: peek p50 {:.1} us misses the 150 us bar", us(p50));
    }
    if us(p99) >= 1_000.0 {
        println!("  WARNING: peek p99 {:.1} us misses the 1 ms bar", us(p99));
    }
    let (request_bytes, response_bytes) = frame_bytes;
    let echo_rate = echo_throughput(request_bytes, response_bytes, 256, 30_000);
    report("controller.peek_throughput", throughput, "peeks/s", echo_rate, "peeks/s", throughput / echo_rate);
    if throughput <= 20_000.0 {
        println!("  WARNING: {throughput:.0} peeks/s misses the 20,000/s bar");
    }
}

/// Keys of the index [`bench_tls`] peeks.
const TLS_KEYS: u64 = 100_000;

/// `controller.peek_tls_*`: the same point peeks (one at a time, and up to 256 in flight) through two
/// controllers to two in-process replicas on one storage, one connected with TLS and the shared secret,
/// the other over plain TCP with the secret (`--insecure`), the baseline. Latency blocks of 100 and
/// throughput runs of 10,000 alternate between the two, so both see the same load on the host.
fn bench_tls(pki: &BenchPki) {
    let runtime = runtime();
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let source = GlobalId::User(1);
    runtime.block_on(async {
        storage.create_collection(source, kv_desc()).await.expect("create");
        let updates = (0..TLS_KEYS as i64).map(|k| (int_row(&[k, 3 * k]), 0, 1)).collect();
        let request = AppendRequest { id: source, updates, expected_upper: f(0), new_upper: f(1) };
        storage.append(vec![request]).await.expect("append");
    });
    // [plain, TLS]
    let replicas: Vec<compute::ReplicaHandle> = [false, true]
        .into_iter()
        .map(|tls| {
            ReplicaServer::start(ReplicaConfig::new(
                "127.0.0.1:0".parse().expect("address"),
                1,
                Arc::clone(&storage) as Arc<dyn StorageCollections>,
                pki.server(tls),
            ))
            .expect("start replica")
        })
        .collect();
    let index = GlobalId::User(2);
    let (latencies, throughputs) = runtime.block_on(async {
        let mut controllers = Vec::new();
        for (tls, replica) in [false, true].into_iter().zip(&replicas) {
            let config = ControllerConfig::new(ControllerEpoch(1), pki.client(tls));
            let (controller, _) =
                controller_with_index(Arc::clone(&storage) as _, config, replica, source, index).await;
            let (c, _, _) =
                tokio::spawn(point_peeks(controller, index, 0..500, TLS_KEYS)).await.expect("task");
            controllers.push(Some(c));
        }
        let mut latencies = [Vec::new(), Vec::new()];
        for round in 0..40u64 {
            for (slot, latencies) in controllers.iter_mut().zip(&mut latencies) {
                let controller = slot.take().expect("a controller");
                let keys = 500 + round * 100..600 + round * 100;
                let (c, block, _) =
                    tokio::spawn(point_peeks(controller, index, keys, TLS_KEYS)).await.expect("task");
                latencies.extend(block);
                *slot = Some(c);
            }
        }
        let mut throughputs = [0f64, 0f64];
        for _ in 0..3 {
            for (slot, best) in controllers.iter_mut().zip(&mut throughputs) {
                let controller = slot.as_mut().expect("a controller");
                *best = best.max(pipelined_peeks(controller, index, TLS_KEYS, 10_000, 256).await);
            }
        }
        (latencies, throughputs)
    });
    for replica in replicas {
        replica.shutdown();
    }
    let [mut plain, mut tls] = latencies;
    plain.sort();
    tls.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let (t, b) = (us(percentile(&tls, p)), us(percentile(&plain, p)));
        report(&format!("controller.peek_tls_{name}"), t, "us", b, "us (plain TCP)", t / b);
    }
    let [plain_rate, tls_rate] = throughputs;
    report(
        "controller.peek_tls_throughput",
        tls_rate,
        "peeks/s",
        plain_rate,
        "peeks/s (plain TCP)",
        tls_rate / plain_rate,
    );
}

/// Point-peek latencies, in blocks taken in turns.
#[derive(Default)]
struct PeekLatencies {
    /// Peeks from a task on the runtime (as a service's session task makes them).
    in_task: Vec<Duration>,
    /// Peeks from the thread that blocks on the runtime (`block_on`, outside its workers).
    blocking: Vec<Duration>,
    /// Loopback round trips of the same frame sizes.
    echo: Vec<Duration>,
}

/// Point peeks of the keys `keys` scatters over the index, one at a time, each checked; returns the
/// controller (so blocks can run in a task and outside one in turns), each peek's latency and the last
/// answer.
async fn point_peeks(
    mut controller: ComputeController,
    index: GlobalId,
    keys: std::ops::Range<u64>,
    key_space: u64,
) -> (ComputeController, Vec<Duration>, PeekResponse) {
    let mut latencies = Vec::with_capacity(keys.clone().count());
    let mut last = None;
    for i in keys {
        let key = (i * 7_919) % key_space;
        let start = Instant::now();
        let handle = controller
            .peek(INSTANCE, PeekTarget::Index { id: index }, 0, point_options(key))
            .await
            .expect("peek");
        let response = handle.result().await;
        latencies.push(start.elapsed());
        let Ok(rows) = &response else { panic!("peek failed: {response:?}") };
        assert_eq!(rows.len(), 1, "one row per key");
        assert_eq!(rows[0].0, int_row(&[key as i64, 3 * key as i64]), "the row of key {key}");
        while controller.try_process().is_some() {}
        last = Some(PeekResponse::Rows(response.expect("checked above")));
    }
    (controller, latencies, last.expect("at least one key"))
}

async fn check_point_answer(handle: controller::PeekHandle) {
    match handle.result().await {
        Ok(rows) if rows.len() == 1 => {}
        other => panic!("point peek answered {other:?}"),
    }
}

/// Round trips per second with up to `window` in flight (a writer thread and a reader).
fn echo_throughput(request: usize, response: usize, window: usize, count: usize) -> f64 {
    let (addr, server) = echo_server(request, response);
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut writer = stream.try_clone().expect("clone");
    let (permits, returned) = std::sync::mpsc::sync_channel::<()>(window);
    let start = Instant::now();
    let writing = std::thread::spawn(move || {
        let outbound = vec![1u8; request];
        for _ in 0..count {
            permits.send(()).expect("permit");
            writer.write_all(&outbound).expect("write");
        }
    });
    let mut reader = stream;
    let mut inbound = vec![0u8; response];
    for _ in 0..count {
        reader.read_exact(&mut inbound).expect("read");
        returned.recv().expect("permit back");
    }
    let rate = count as f64 / start.elapsed().as_secs_f64();
    writing.join().expect("writer");
    drop(reader);
    let _ = server.join();
    rate
}

// -------------------------------------------------------------------------------------------------
// Hydration memory of a replica process

const HYDRATION_ROWS: u64 = 1_000_000;
const HEAVY_DATAFLOWS: u64 = 8;

/// The `compute-replica` binary of this build, built in release first (a no-op when it is fresh).
fn replica_binary() -> PathBuf {
    let (binary, note) =
        test_support::cargo::release_binary("compute", "compute-replica").unwrap_or_else(|e| panic!("{e}"));
    if let Some(note) = note {
        println!("  ({note})");
    }
    binary
}

/// What the heavy dataflows compute. Each reads the whole 1M-row table to hydrate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heavy {
    /// `SELECT k % m, count(*) GROUP BY 1`: about 100 groups.
    Count,
    /// `SELECT k % m, sum(v) GROUP BY 1`: about 100 groups, through the general reduce (which arranges
    /// its input).
    Sum,
    /// `SELECT * WHERE k < 100`: a full scan into a 100-row index.
    Filter,
}

/// Heavy dataflow `n` of kind `heavy` over `source`, exporting index `User(100 + n)`.
fn heavy_dataflow(heavy: Heavy, source: GlobalId, n: u64) -> DataflowDescription<u64> {
    let group =
        ScalarExpr::column(0).call_binary(BinaryFunc::Mod, ScalarExpr::literal(Datum::Int64(97 + n as i64)));
    let grouped = |outputs: Vec<usize>| Plan::Project {
        input: Box::new(Plan::Map { input: Box::new(Plan::get(source)), exprs: vec![group.clone()] }),
        outputs,
    };
    let plan = match heavy {
        Heavy::Count => Plan::Reduce {
            input: Box::new(grouped(vec![2])),
            group_key: vec![0],
            aggregates: vec![AggregateExpr { func: AggregateFunc::Count, column: 0 }],
        },
        Heavy::Sum => Plan::Reduce {
            input: Box::new(grouped(vec![2, 1])),
            group_key: vec![0],
            aggregates: vec![AggregateExpr { func: AggregateFunc::Sum, column: 1 }],
        },
        Heavy::Filter => Plan::Filter {
            input: Box::new(Plan::get(source)),
            predicates: vec![
                ScalarExpr::column(0).call_binary(BinaryFunc::Lt, ScalarExpr::literal(Datum::Int64(100))),
            ],
        },
    };
    let object = GlobalId::Transient(100 + n);
    let mut df = DataflowDescription::new(format!("heavy {heavy:?} {n}"));
    df.source_imports.insert(source, SourceImport { desc: kv_desc() });
    df.objects_to_build.push(BuildDesc { id: object, plan });
    df.index_exports.insert(GlobalId::User(100 + n), IndexExport { on_id: object, key: vec![0] });
    df
}

/// Runs per hydration setting; the median counts.
const HYDRATION_RUNS: usize = 3;

/// The run with the median peak RSS (and its time).
fn median_run(mut runs: Vec<(u64, Duration)>) -> (u64, Duration) {
    runs.sort_by_key(|(peak, _)| *peak);
    runs[runs.len() / 2]
}

/// A process's peak resident set (`VmHWM`), in bytes.
fn peak_rss_bytes(pid: u32) -> u64 {
    test_support::memory::peak_rss_bytes(pid).expect("/proc/<pid>/status has VmHWM")
}

/// Hydrates the heavy dataflows on a fresh replica process with `concurrency`; returns its peak RSS and
/// the time until every dataflow had hydrated.
async fn hydrate(
    storage: &Arc<dyn StorageCollections>,
    orchestrator: &Arc<ProcessOrchestrator>,
    source: GlobalId,
    instance: InstanceId,
    heavy: Heavy,
    concurrency: usize,
    security: &ClientSecurity,
) -> (u64, Duration) {
    let config = ControllerConfig {
        hydration_concurrency: Some(concurrency),
        introspection: false,
        ..ControllerConfig::new(ControllerEpoch(1), security.clone())
    };
    let storage = Arc::clone(storage);
    let orchestrator_dyn: Arc<dyn controller::Orchestrator> = Arc::clone(orchestrator) as _;
    let mut controller =
        ComputeController::new(storage, Some(orchestrator_dyn), config).await.expect("controller");
    controller.create_instance(instance, controller.default_instance_config()).expect("instance");
    let location = ReplicaLocation::Managed { workers: 1, processes: 1 };
    controller.add_replica(instance, REPLICA, location).await.expect("managed replica");
    let pid = *orchestrator.pids(instance, REPLICA).first().expect("a replica process");
    let start = Instant::now();
    for n in 0..HEAVY_DATAFLOWS {
        controller.create_dataflow(instance, heavy_dataflow(heavy, source, n)).await.expect("heavy dataflow");
    }
    wait_until("every heavy dataflow hydrates", Duration::from_secs(600), || {
        (0..HEAVY_DATAFLOWS).all(|n| {
            controller
                .collection_frontiers(instance, GlobalId::User(100 + n))
                .is_ok_and(|f| !f.upper.less_equal(&0))
        })
    })
    .await;
    let elapsed = start.elapsed();
    let peak = peak_rss_bytes(pid);
    controller.drop_replica(instance, REPLICA).await.expect("drop replica");
    drop(controller);
    (peak, elapsed)
}

/// A replica-process orchestrator for the hydration runs, its replicas reading `storage`.
fn hydration_orchestrator(
    binary: &std::path::Path,
    storage: controller::ReplicaStorage,
    pki: &BenchPki,
) -> Arc<ProcessOrchestrator> {
    let (orchestrator, _events) = ProcessOrchestrator::new(ProcessOrchestratorConfig {
        binary: binary.to_path_buf(),
        storage,
        security: pki.replica_processes(),
        initial_backoff_ms: 100,
        max_backoff_ms: 1_000,
        env: vec![("RUST_LOG".to_string(), "warn".to_string())],
        log_dir: None,
        metrics: false,
    });
    Arc::new(orchestrator)
}

/// The hydration source's 1M rows, appended to `source` in `storage` (created here).
async fn load_hydration_source(storage: &dyn StorageCollections, source: GlobalId) {
    storage.create_collection(source, kv_desc()).await.expect("create");
    let updates = (0..HYDRATION_ROWS as i64).map(|k| (int_row(&[k, k.wrapping_mul(31)]), 0, 1)).collect();
    let request = AppendRequest { id: source, updates, expected_upper: f(0), new_upper: f(1) };
    storage.append(vec![request]).await.expect("append");
}

/// The median (by peak RSS) of `HYDRATION_RUNS` runs per setting, per workload.
type HydrationFigures = Vec<(Heavy, (u64, Duration), (u64, Duration))>;

fn bench_hydration(pki: &BenchPki) {
    let binary = replica_binary();
    let runtime = runtime();
    let source = GlobalId::User(1);
    let client = pki.client(true);
    let mut instance = 0;
    // The same runs for every workload: 1 dataflow hydrating at a time, then all 8 at once.
    let mut runs = async |storage: &Arc<dyn StorageCollections>, orchestrator: &Arc<ProcessOrchestrator>| {
        let mut figures = HydrationFigures::new();
        for heavy in [Heavy::Count, Heavy::Sum, Heavy::Filter] {
            // Peak RSS depends on how the listens' reads interleave: the median of a few runs each,
            // the two settings alternating.
            let (mut ones, mut alls) = (Vec::new(), Vec::new());
            for _ in 0..HYDRATION_RUNS {
                for (concurrency, runs) in [(1, &mut ones), (HEAVY_DATAFLOWS as usize, &mut alls)] {
                    instance += 1;
                    let instance = InstanceId(instance);
                    runs.push(
                        hydrate(storage, orchestrator, source, instance, heavy, concurrency, &client).await,
                    );
                }
            }
            figures.push((heavy, median_run(ones), median_run(alls)));
        }
        figures
    };
    let figures = runtime.block_on(async {
        // The embedded shards every process opens itself: blob files and a SQLite consensus.
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (blob, consensus) = storage::embedded_urls(dir.path());
        let shards = storage::ShardCollections::open(
            &blob.parse().expect("blob url"),
            &consensus.parse().expect("consensus url"),
            storage::ShardConfig { critical_reader: Some("controller".to_string()), ..Default::default() },
        )
        .await
        .expect("open the shards");
        let storage: Arc<dyn StorageCollections> = Arc::new(shards.clone());
        load_hydration_source(&*storage, source).await;
        let replicas = controller::ReplicaStorage::shards(&blob, &consensus).expect("shard urls");
        let orchestrator = hydration_orchestrator(&binary, replicas, pki);
        let figures = runs(&storage, &orchestrator).await;
        drop(shards);
        figures
    });
    report_hydration(&figures);
}

fn report_hydration(figures: &HydrationFigures) {
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let secs = |d: Duration| d.as_secs_f64();
    for (heavy, (peak_1, time_1), (peak_8, time_8)) in figures {
        let name = format!("{heavy:?}").to_lowercase();
        let ratio = *peak_1 as f64 / *peak_8 as f64;
        report(
            &format!("controller.hydration_peak_rss_{name}"),
            mib(*peak_1),
            "MiB",
            mib(*peak_8),
            "MiB",
            ratio,
        );
        let time_ratio = secs(*time_1) / secs(*time_8);
        report(
            &format!("controller.hydration_time_{name}"),
            secs(*time_1),
            "s",
            secs(*time_8),
            "s",
            time_ratio,
        );
        if ratio > 0.5 {
            println!(
                "  WARNING: {name}: peak RSS with hydration concurrency 1 is {ratio:.2}x that with 8 (bar: 0.5x)"
            );
        }
    }
}

// -------------------------------------------------------------------------------------------------
// What metrics cost

fn bench_metrics(pki: &BenchPki) {
    // Frontier updates: the same core with and without metrics, and a second core without them, whose
    // ratio to the first (ideally 1) shows how far this machine's noise and the cores' memory layout alone
    // move the figure. Rounds alternate in turn, each pair's ratio is taken, and the median of the pairs
    // counts: a burst of load on the machine falls on one pair, not on one side.
    let mut with = FrontierRun::with_core(Core::new().with_metrics(), 10_000, UpdateOrder::Random);
    let mut without = FrontierRun::new(10_000, UpdateOrder::Random);
    let mut control = FrontierRun::new(10_000, UpdateOrder::Random);
    assert!(with.core.core.metrics().is_some() && without.core.core.metrics().is_none());
    let (mut with_best, mut without_best) = (Duration::MAX, Duration::MAX);
    let (mut ratios, mut control_ratios) = (Vec::new(), Vec::new());
    for round in 0..METRICS_ROUNDS {
        let mut runs = [&mut with, &mut without, &mut control];
        runs.rotate_left(round % 3);
        let mut times = runs.map(FrontierRun::round);
        times.rotate_right(round % 3);
        let [on, off, off_again] = times;
        with_best = with_best.min(on);
        without_best = without_best.min(off);
        // Updates per second: the ratio of throughputs is the inverse ratio of times.
        ratios.push(off.as_secs_f64() / on.as_secs_f64());
        control_ratios.push(off.as_secs_f64() / off_again.as_secs_f64());
    }
    let per_second = |d: Duration| 1.0 / d.as_secs_f64();
    let (on, off) = (per_second(with_best), per_second(without_best));
    let ratio = median(&mut ratios);
    report("controller.metrics_frontier_updates_10k", on, "updates/s", off, "updates/s", ratio);
    println!(
        "  median of {METRICS_ROUNDS} paired rounds; a second core without metrics against the first: {:.3}",
        median(&mut control_ratios)
    );
    if ratio < 0.95 {
        println!("  WARNING: frontier updates with metrics run at {ratio:.3}x those without (bar: 0.95x)");
    }
    drop((with, without));

    // Peeks: two controllers, one with metrics, each with its own replica and index.
    let runtime = runtime();
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let source = GlobalId::User(1);
    let keys = 100_000u64;
    runtime.block_on(async {
        storage.create_collection(source, kv_desc()).await.expect("create");
        let updates = (0..keys as i64).map(|k| (int_row(&[k, 3 * k]), 0, 1)).collect();
        let request = AppendRequest { id: source, updates, expected_upper: f(0), new_upper: f(1) };
        storage.append(vec![request]).await.expect("append");
    });
    let start_replica = || {
        ReplicaServer::start(ReplicaConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            workers: 1,
            process: 0,
            timely_addresses: Vec::new(),
            storage: Arc::clone(&storage) as Arc<dyn StorageCollections>,
            security: pki.server(false),
        })
        .expect("start replica")
    };
    let replicas = [start_replica(), start_replica()];
    let index = GlobalId::User(2);
    let (on, off, ratio) = runtime.block_on(async {
        let mut controllers = Vec::new();
        for (replica, metrics) in replicas.iter().zip([true, false]) {
            let config = ControllerConfig {
                metrics: metrics.then(prometheus::Registry::new),
                ..ControllerConfig::new(ControllerEpoch(1), pki.client(false))
            };
            let (mut controller, _) =
                controller_with_index(Arc::clone(&storage) as _, config, replica, source, index).await;
            pipelined_peeks(&mut controller, index, keys, 2_000, 256).await;
            controllers.push(controller);
        }
        let (mut on, mut off, mut ratios) = (0.0f64, 0.0f64, Vec::new());
        for round in 0..METRICS_ROUNDS {
            // Which controller goes first alternates; each pair's ratio is taken (see the frontiers above).
            let (round_on, round_off) = if round % 2 == 0 {
                let on = pipelined_peeks(&mut controllers[0], index, keys, 5_000, 256).await;
                (on, pipelined_peeks(&mut controllers[1], index, keys, 5_000, 256).await)
            } else {
                let off = pipelined_peeks(&mut controllers[1], index, keys, 5_000, 256).await;
                (pipelined_peeks(&mut controllers[0], index, keys, 5_000, 256).await, off)
            };
            on = on.max(round_on);
            off = off.max(round_off);
            ratios.push(round_on / round_off);
        }
        assert!(controllers[0].metrics_registry().is_some() && controllers[1].metrics_registry().is_none());
        (on, off, median(&mut ratios))
    });
    for replica in replicas {
        replica.shutdown();
    }
    report("controller.metrics_peek_throughput", on, "peeks/s", off, "peeks/s", ratio);
    println!("  median of {METRICS_ROUNDS} paired rounds of 5,000 peeks");
    if ratio < 0.95 {
        println!("  WARNING: peeks with metrics run at {ratio:.3}x those without (bar: 0.95x)");
    }
}

/// Rounds of the metrics benchmark; odd, so the median is one of them.
const METRICS_ROUNDS: usize = 61;

/// A controller with instance `INSTANCE`, `replica` as its unmanaged replica `REPLICA`, and an index
/// `index` on storage collection `source` that has hydrated; with the time from creating the index until
/// it did.
async fn controller_with_index(
    storage: Arc<dyn StorageCollections>,
    config: ControllerConfig,
    replica: &ReplicaHandle,
    source: GlobalId,
    index: GlobalId,
) -> (ComputeController, Duration) {
    let mut controller = ComputeController::new(storage, None, config).await.expect("controller");
    controller.create_instance(INSTANCE, controller.default_instance_config()).expect("instance");
    let addresses = vec![replica.local_addr().to_string()];
    controller.add_replica(INSTANCE, REPLICA, ReplicaLocation::Unmanaged { addresses }).await.expect("add");
    let hydration = Instant::now();
    controller.create_dataflow(INSTANCE, index_on(source, index, None)).await.expect("create index");
    wait_until("the index hydrates", Duration::from_secs(300), || {
        controller.collection_frontiers(INSTANCE, index).is_ok_and(|f| !f.upper.less_equal(&0))
    })
    .await;
    (controller, hydration.elapsed())
}

/// `count` point peeks of `keys` keys with up to `window` in flight, each answer checked; peeks per second.
async fn pipelined_peeks(
    controller: &mut ComputeController,
    index: GlobalId,
    keys: u64,
    count: u64,
    window: usize,
) -> f64 {
    let mut in_flight = VecDeque::with_capacity(window);
    let start = Instant::now();
    for i in 0..count {
        if in_flight.len() == window {
            check_point_answer(in_flight.pop_front().expect("full")).await;
        }
        let key = (i * 104_729) % keys;
        let handle = controller
            .peek(INSTANCE, PeekTarget::Index { id: index }, 0, point_options(key))
            .await
            .expect("peek");
        in_flight.push_back(handle);
        if i % 64 == 0 {
            while controller.try_process().is_some() {}
        }
    }
    for handle in in_flight.drain(..) {
        check_point_answer(handle).await;
    }
    while controller.try_process().is_some() {}
    count as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let only = std::env::var("CONTROLLER_BENCH").ok();
    let run = |name: &str| only.as_deref().is_none_or(|only| only == name);
    if run("frontiers") {
        bench_frontiers();
    }
    if run("churn") {
        bench_churn();
    }
    let pki = BenchPki::new();
    if run("peek") {
        bench_peeks(&pki);
    }
    if run("tls") {
        bench_tls(&pki);
    }
    if run("hydration") {
        bench_hydration(&pki);
    }
    if run("metrics") {
        bench_metrics(&pki);
    }
}
