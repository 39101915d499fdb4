//! Test harness: in-process replicas (1 or 2 workers, or 2 processes), an embedded storage, and a
//! blocking test controller that speaks the protocol over real sockets.
//!
//! The [`TestController`] holds one connection per replica process, sends every command to every process
//! (as the real replica client does), and merges the processes' answers the way the replica client does:
//! peek parts with `PeekResponse::union`, frontiers as the meet over processes, subscribe batches once
//! every process has passed their upper.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

use compute::{ReplicaConfig, ReplicaHandle, ReplicaLimits, ReplicaServer, StartError};
use frontiers::{Antichain, PartialOrder, ReadPolicy};
use protocol::frame::{DEFAULT_MAX_FRAME_BYTES, read_frame, write_frame};
use protocol::{
    ComputeCommand, ComputeResponse, DataflowDescription, Diff, GlobalId, InstanceConfig, InstanceId,
    MapFilterProject, PROTOCOL_VERSION, Peek, PeekId, PeekResponse, PeekTarget, RelationDesc, ReplicaId, Row,
    RowSetFinishing, SubscribeBatch, SubscribeResponse,
};
use storage::{AppendRequest, InProcess, StorageCollections, StoreConfig};

/// How long a test waits for any one expected response before failing.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Proptest cases for an expensive property: `max(4, PROPTEST_CASES / divisor)` (PROPTEST_CASES
/// defaults to 256, as in proptest itself), so `PROPTEST_CASES` still scales every property.
pub fn proptest_cases(divisor: u32) -> u32 {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse::<u32>().ok()).unwrap_or(256);
    (cases / divisor).max(4)
}

/// A proptest config with `cases` cases and everything else from the environment.
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    }
}

/// An embedded in-memory storage whose collections never compact on their own.
pub fn new_storage() -> Arc<InProcess> {
    let config = StoreConfig { default_read_policy: ReadPolicy::NoPolicy, ..StoreConfig::default() };
    Arc::new(InProcess::in_memory(config))
}

/// A runtime to drive storage futures from blocking test code.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("test runtime");
    }
    RUNTIME.with(|runtime| runtime.block_on(future))
}

/// Creates a storage collection.
pub fn create_collection(storage: &InProcess, id: GlobalId, desc: RelationDesc) {
    block_on(storage.create_collection(id, desc)).expect("create collection");
}

/// Appends `updates` at their times and advances the upper to `upper`.
pub fn append(storage: &InProcess, id: GlobalId, updates: Vec<(Row, u64, Diff)>, upper: u64) {
    let current = block_on(storage.frontiers(id)).expect("frontiers").upper;
    let request =
        AppendRequest { id, updates, expected_upper: current, new_upper: Antichain::from_elem(upper) };
    block_on(storage.append(vec![request])).expect("append");
}

/// The shape of a replica under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One process, one worker.
    OneWorker,
    /// One process, two workers.
    TwoWorkers,
    /// Two processes of one worker each, as a timely cluster.
    TwoProcesses,
}

/// `n` distinct free loopback addresses (bound together, then released: another socket may take one
/// before it is bound again, which the caller must handle).
pub fn free_addresses(n: usize) -> Vec<String> {
    let listeners: Vec<std::net::TcpListener> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    listeners.iter().map(|l| l.local_addr().expect("addr").to_string()).collect()
}

/// A replica: one handle per process.
pub struct Replica {
    /// The processes.
    pub processes: Vec<ReplicaHandle>,
}

/// Logs to stderr when `COMPUTE_TEST_LOG` is set (an `EnvFilter` directive such as `debug`).
pub fn init_logging() {
    if let Ok(filter) = std::env::var("COMPUTE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

impl Replica {
    /// Starts a replica of the given shape on `storage`.
    pub fn start(shape: Shape, storage: Arc<dyn StorageCollections>) -> Replica {
        Self::start_with(shape, storage, |config| (config, ReplicaLimits::default()))
    }

    /// Starts a replica of the given shape on `storage`, each process's configuration changed (and its
    /// limits chosen) by `configure`.
    ///
    /// The timely ports of a two-process replica are probed free and then bound by the processes: if
    /// another socket took one meanwhile, the start fails with `StartError::ClusterBind` (never a
    /// half-started replica), and this tries again with other ports.
    pub fn start_with(
        shape: Shape,
        storage: Arc<dyn StorageCollections>,
        configure: impl Fn(ReplicaConfig) -> (ReplicaConfig, ReplicaLimits),
    ) -> Replica {
        init_logging();
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let processes = match shape {
            Shape::OneWorker | Shape::TwoWorkers => {
                let workers = if shape == Shape::OneWorker { 1 } else { 2 };
                let (config, limits) = configure(ReplicaConfig::new(listen, workers, storage));
                vec![ReplicaServer::start_with(config, limits).expect("start replica")]
            }
            Shape::TwoProcesses => {
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    let addresses = free_addresses(2);
                    let started: Result<Vec<ReplicaHandle>, StartError> = (0..2)
                        .map(|process| {
                            let config = ReplicaConfig::new(listen, 1, Arc::clone(&storage))
                                .in_cluster(process, addresses.clone());
                            let (config, limits) = configure(config);
                            ReplicaServer::start_with(config, limits)
                        })
                        .collect();
                    match started {
                        Ok(processes) => break processes,
                        Err(StartError::ClusterBind { .. }) if attempts < 5 => continue,
                        Err(e) => panic!("start replica process: {e}"),
                    }
                }
            }
        };
        Replica { processes }
    }

    /// The controller addresses of the processes.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.processes.iter().map(|p| p.local_addr()).collect()
    }

    /// Dataflows built, summed over processes.
    pub fn dataflows_built(&self) -> u64 {
        self.processes.iter().map(|p| p.dataflows_built()).sum()
    }
}

impl Drop for Replica {
    /// Shuts the processes down concurrently: a cluster process's network threads wait for their peers.
    fn drop(&mut self) {
        let stopping: Vec<_> =
            self.processes.drain(..).map(|process| std::thread::spawn(move || process.shutdown())).collect();
        for thread in stopping {
            let _ = thread.join();
        }
    }
}

/// One raw protocol connection (for bad-input tests).
pub struct RawConnection {
    /// The socket.
    pub stream: TcpStream,
}

impl RawConnection {
    /// Connects.
    pub fn connect(addr: SocketAddr) -> RawConnection {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        RawConnection { stream }
    }

    /// Sends a command.
    pub fn send(&mut self, command: &ComputeCommand) {
        write_frame(&mut self.stream, command, DEFAULT_MAX_FRAME_BYTES).expect("write");
    }

    /// Sends raw bytes.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Reads the next response; `None` once the replica closed the connection.
    pub fn recv(&mut self) -> Option<ComputeResponse> {
        read_frame(&mut self.stream, DEFAULT_MAX_FRAME_BYTES).ok()
    }

    /// Reads responses until one matches, skipping others (frontiers, status).
    pub fn recv_until(&mut self, mut f: impl FnMut(&ComputeResponse) -> bool) -> Option<ComputeResponse> {
        loop {
            let response = self.recv()?;
            if f(&response) {
                return Some(response);
            }
        }
    }
}

/// A blocking controller for tests: one connection per process, responses merged.
pub struct TestController {
    streams: Vec<TcpStream>,
    responses: Receiver<(usize, ComputeResponse)>,
    /// Per process, per collection: the latest write frontier.
    pub frontiers: Vec<BTreeMap<GlobalId, Antichain<u64>>>,
    /// Peek parts received so far.
    peek_parts: BTreeMap<PeekId, Vec<PeekResponse>>,
    /// Subscribe output per process, per subscribe.
    subscribe_parts: Vec<BTreeMap<GlobalId, Vec<SubscribeResponse>>>,
    /// Every other response, in arrival order (process, response).
    pub other: Vec<(usize, ComputeResponse)>,
    next_peek: u64,
}

impl TestController {
    /// Connects to every process and completes the handshake with an empty replay.
    pub fn connect(addrs: &[SocketAddr]) -> TestController {
        Self::connect_with_replay(addrs, Vec::new())
    }

    /// Connects, replays `replay` before `InitializationComplete`.
    pub fn connect_with_replay(addrs: &[SocketAddr], replay: Vec<ComputeCommand>) -> TestController {
        let (tx, rx) = channel();
        let mut streams = Vec::new();
        for (process, addr) in addrs.iter().enumerate() {
            let mut stream = TcpStream::connect(addr).expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            write_frame(
                &mut stream,
                &ComputeCommand::<u64>::Hello { version: PROTOCOL_VERSION, nonce: 7 },
                DEFAULT_MAX_FRAME_BYTES,
            )
            .expect("hello");
            let answer: ComputeResponse =
                read_frame(&mut stream, DEFAULT_MAX_FRAME_BYTES).expect("hello answer");
            assert_eq!(answer, ComputeResponse::Hello { version: PROTOCOL_VERSION, nonce: 7 });
            let mut reader = stream.try_clone().expect("clone");
            let tx = tx.clone();
            std::thread::spawn(move || {
                while let Ok(response) =
                    read_frame::<_, ComputeResponse>(&mut reader, DEFAULT_MAX_FRAME_BYTES)
                {
                    if tx.send((process, response)).is_err() {
                        break;
                    }
                }
            });
            streams.push(stream);
        }
        let processes = addrs.len();
        let mut controller = TestController {
            streams,
            responses: rx,
            frontiers: vec![BTreeMap::new(); processes],
            peek_parts: BTreeMap::new(),
            subscribe_parts: vec![BTreeMap::new(); processes],
            other: Vec::new(),
            next_peek: 1,
        };
        controller.send(ComputeCommand::CreateInstance(InstanceConfig {
            instance_id: InstanceId(1),
            replica_id: ReplicaId(1),
        }));
        for command in replay {
            controller.send(command);
        }
        controller.send(ComputeCommand::InitializationComplete);
        controller
    }

    /// Sends a command to every process.
    pub fn send(&mut self, command: ComputeCommand) {
        for stream in &mut self.streams {
            write_frame(stream, &command, DEFAULT_MAX_FRAME_BYTES).expect("send command");
        }
    }

    /// Closes the connections.
    pub fn close(self) {
        for stream in &self.streams {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn absorb(&mut self, process: usize, response: ComputeResponse) {
        match response {
            ComputeResponse::Frontiers { id, frontiers } => {
                if let Some(write) = frontiers.write_frontier {
                    let old = self.frontiers[process].insert(id, write.clone());
                    if let Some(old) = old {
                        assert!(PartialOrder::less_equal(&old, &write), "frontier of {id} regressed");
                    }
                }
            }
            ComputeResponse::PeekResponse { uuid, response } => {
                self.peek_parts.entry(uuid).or_default().push(response);
            }
            ComputeResponse::SubscribeResponse { id, response } => {
                self.subscribe_parts[process].entry(id).or_default().push(response);
            }
            other => self.other.push((process, other)),
        }
    }

    /// Absorbs the next response, or returns `false` once every process closed its connection; panics
    /// (naming `what`) if nothing comes before `deadline`.
    #[allow(clippy::disallowed_methods)] // a wall-clock timeout, in tests only
    fn absorb_next(&mut self, deadline: std::time::Instant, what: &str) -> bool {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match self.responses.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok((process, response)) => {
                self.absorb(process, response);
                true
            }
            Err(RecvTimeoutError::Timeout) => panic!("timed out waiting for {what}"),
            Err(RecvTimeoutError::Disconnected) => false,
        }
    }

    /// Processes responses until `done` holds, or panics after [`TIMEOUT`].
    #[allow(clippy::disallowed_methods)] // a wall-clock timeout, in tests only
    pub fn wait_until(&mut self, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !done(self) {
            assert!(self.absorb_next(deadline, what), "replica closed while waiting for {what}");
        }
    }

    /// Waits until every process closed its connection, absorbing what comes before; panics after
    /// [`TIMEOUT`].
    #[allow(clippy::disallowed_methods)] // a wall-clock timeout, in tests only
    pub fn wait_closed(&mut self) {
        let deadline = std::time::Instant::now() + TIMEOUT;
        while self.absorb_next(deadline, "the replica to close") {}
    }

    /// Waits until every process reported a write frontier for `id` beyond `time`.
    pub fn wait_frontier_beyond(&mut self, id: GlobalId, time: u64) {
        let processes = self.streams.len();
        self.wait_until(&format!("frontier of {id} beyond {time}"), |c| {
            (0..processes).all(|p| c.frontiers[p].get(&id).is_some_and(|f| !f.less_equal(&time)))
        });
    }

    /// Sends a peek and returns the merged answer.
    pub fn peek(
        &mut self,
        target: PeekTarget,
        timestamp: u64,
        keys: Option<Vec<Row>>,
        arity: usize,
    ) -> PeekResponse {
        self.peek_with(target, timestamp, keys, MapFilterProject::new(arity), RowSetFinishing::unordered())
    }

    /// Sends a peek and returns its id (answers are collected by [`Self::wait_peek`]).
    pub fn send_peek(
        &mut self,
        target: PeekTarget,
        timestamp: u64,
        keys: Option<Vec<Row>>,
        map_filter_project: MapFilterProject,
        finishing: RowSetFinishing,
    ) -> PeekId {
        let uuid = PeekId(self.next_peek);
        self.next_peek += 1;
        self.send(ComputeCommand::Peek(Peek {
            uuid,
            target,
            timestamp,
            literal_constraints: keys,
            map_filter_project,
            finishing,
        }));
        uuid
    }

    /// Waits for every process's answer to a peek and merges them.
    pub fn wait_peek(&mut self, uuid: PeekId) -> PeekResponse {
        let processes = self.streams.len();
        self.wait_until(&format!("answer to {uuid}"), |c| {
            c.peek_parts.get(&uuid).is_some_and(|p| p.len() >= processes)
        });
        let parts = self.peek_parts.remove(&uuid).expect("parts");
        assert_eq!(parts.len(), processes, "each process answers a peek exactly once");
        PeekResponse::union(parts)
    }

    /// Sends a peek and waits for the merged answer.
    pub fn peek_with(
        &mut self,
        target: PeekTarget,
        timestamp: u64,
        keys: Option<Vec<Row>>,
        map_filter_project: MapFilterProject,
        finishing: RowSetFinishing,
    ) -> PeekResponse {
        let uuid = self.send_peek(target, timestamp, keys, map_filter_project, finishing);
        self.wait_peek(uuid)
    }

    /// Creates and schedules a dataflow.
    pub fn create_dataflow(&mut self, desc: DataflowDescription<u64>) {
        let id = desc.export_ids().next().expect("an export");
        self.send(ComputeCommand::CreateDataflow(desc));
        self.send(ComputeCommand::Schedule(id));
    }

    /// Subscribe batches merged over processes: a batch per range every process has passed, with the
    /// union of the processes' updates (or the first error).
    pub fn subscribe_batches(&mut self, id: GlobalId) -> Vec<SubscribeBatch<u64>> {
        let processes = self.streams.len();
        let per_process: Vec<Vec<SubscribeBatch<u64>>> = (0..processes)
            .map(|p| {
                self.subscribe_parts[p]
                    .get(&id)
                    .map(|responses| {
                        responses
                            .iter()
                            .filter_map(|r| match r {
                                SubscribeResponse::Batch(b) => Some(b.clone()),
                                SubscribeResponse::DroppedAt(_) => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect();
        if processes == 1 {
            return per_process.into_iter().next().expect("one process");
        }
        // Merge: every process's updates with their times; the common upper is the meet.
        let mut updates = Vec::new();
        let mut error = None;
        let mut uppers = Vec::new();
        for batches in &per_process {
            let mut upper = Antichain::from_elem(0);
            for batch in batches {
                match &batch.updates {
                    Ok(u) => updates.extend(u.iter().cloned()),
                    Err(e) => error = Some(e.clone()),
                }
                upper = batch.upper.clone();
            }
            uppers.push(upper);
        }
        let upper = frontiers::antichain::meet_all(uppers.iter().map(|u| u.borrow()));
        updates.retain(|(t, _, _)| !upper.less_equal(t));
        let lower = per_process[0].first().map(|b| b.lower.clone()).unwrap_or_default();
        vec![SubscribeBatch {
            lower,
            upper,
            updates: match error {
                Some(e) => Err(e),
                None => Ok(updates),
            },
        }]
    }

    /// The raw subscribe responses of process `process`.
    pub fn subscribe_responses(&self, process: usize, id: GlobalId) -> Vec<SubscribeResponse> {
        self.subscribe_parts[process].get(&id).cloned().unwrap_or_default()
    }

    /// The number of processes.
    pub fn processes(&self) -> usize {
        self.streams.len()
    }
}

/// The schema `(k int, v int)` used by the hand-written tests.
pub fn kv_desc() -> RelationDesc {
    use protocol::{ColumnType, ScalarType};
    RelationDesc::new([
        ("k", ColumnType::new(ScalarType::Int64, false)),
        ("v", ColumnType::new(ScalarType::Int64, false)),
    ])
}

/// A row of integers.
pub fn int_row(values: &[i64]) -> Row {
    Row::pack(values.iter().map(|v| protocol::Datum::Int64(*v)))
}

/// A dataflow reading storage collection `source` (schema [`kv_desc`]) through `plan` (which may `Get`
/// `source`), exported as index `index` keyed by `key`, with as-of `as_of`.
pub fn index_dataflow(
    name: &str,
    source: GlobalId,
    plan: protocol::Plan,
    index: GlobalId,
    key: Vec<usize>,
    as_of: u64,
) -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new(name);
    df.source_imports.insert(source, protocol::SourceImport { desc: kv_desc() });
    let object = GlobalId::Transient(index_number(index));
    df.objects_to_build.push(protocol::BuildDesc { id: object, plan });
    df.index_exports.insert(index, protocol::IndexExport { on_id: object, key });
    df.as_of = Some(Antichain::from_elem(as_of));
    df
}

/// A dataflow reading storage collection `source` (schema [`kv_desc`]) through `plan`, exported as sink
/// `sink` (schema [`kv_desc`]) of kind `connection`, with as-of `as_of`.
pub fn sink_dataflow(
    name: &str,
    source: GlobalId,
    plan: protocol::Plan,
    sink: GlobalId,
    connection: protocol::SinkConnection,
    as_of: u64,
) -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new(name);
    df.source_imports.insert(source, protocol::SourceImport { desc: kv_desc() });
    let object = GlobalId::Transient(index_number(sink));
    df.objects_to_build.push(protocol::BuildDesc { id: object, plan });
    df.sink_exports.insert(sink, protocol::SinkExport { from: object, desc: kv_desc(), connection });
    df.as_of = Some(Antichain::from_elem(as_of));
    df
}

/// Waits (up to 6 s) until storage collection `id`'s upper is beyond `time`; the caller's checks say
/// what it means if it never gets there.
pub fn wait_storage_upper_beyond(storage: &InProcess, id: GlobalId, time: u64) {
    for _ in 0..600 {
        if !block_on(storage.frontiers(id)).expect("frontiers").upper.less_equal(&time) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The number of a user id (for deriving object ids in tests).
pub fn index_number(id: GlobalId) -> u64 {
    match id {
        GlobalId::User(n) | GlobalId::System(n) | GlobalId::Transient(n) => n,
    }
}

/// The rows of a peek answer as a multiset (panics on anything but rows).
pub fn rows_of(response: PeekResponse) -> protocol::reference::Multiset {
    match response {
        PeekResponse::Rows(rows) => rows.into_iter().map(|(r, n)| (r, n.get() as Diff)).collect(),
        other => panic!("expected rows, got {other:?}"),
    }
}

/// A storage with faults, `inner` otherwise: it panics when asked for the frontiers of `panics` (a bug in a
/// dependency that runs on the replica's I/O thread: a dataflow importing it asks for them), and a listen
/// to `listen_fails` fails.
#[derive(Debug)]
pub struct FaultyStorage {
    /// Where everything else goes.
    pub inner: Arc<InProcess>,
    /// The collection whose frontiers panic.
    pub panics: Option<GlobalId>,
    /// The collection whose listens fail.
    pub listen_fails: Option<GlobalId>,
}

impl StorageCollections for FaultyStorage {
    fn create_collection(
        &self,
        id: GlobalId,
        desc: RelationDesc,
    ) -> storage::BoxFuture<'_, Result<(), storage::CreateError>> {
        self.inner.create_collection(id, desc)
    }

    fn drop_collection(&self, id: GlobalId) -> storage::BoxFuture<'_, Result<(), storage::DropError>> {
        self.inner.drop_collection(id)
    }

    fn list_collections(
        &self,
    ) -> storage::BoxFuture<'_, Result<Vec<(GlobalId, RelationDesc)>, storage::ReadError>> {
        self.inner.list_collections()
    }

    fn frontiers(
        &self,
        id: GlobalId,
    ) -> storage::BoxFuture<'_, Result<storage::CollectionFrontiers, storage::ReadError>> {
        assert_ne!(Some(id), self.panics, "the test storage panics on the frontiers of {id}");
        self.inner.frontiers(id)
    }

    fn append(
        &self,
        requests: Vec<AppendRequest>,
    ) -> storage::BoxFuture<'_, Result<(), storage::AppendError>> {
        self.inner.append(requests)
    }

    fn acquire_read_hold(
        &self,
        id: GlobalId,
        frontier: Antichain<u64>,
    ) -> storage::BoxFuture<'_, Result<storage::StorageReadHold, storage::HoldError>> {
        self.inner.acquire_read_hold(id, frontier)
    }

    fn set_read_policy(
        &self,
        id: GlobalId,
        policy: ReadPolicy<u64>,
    ) -> storage::BoxFuture<'_, Result<(), storage::HoldError>> {
        self.inner.set_read_policy(id, policy)
    }

    fn snapshot(
        &self,
        id: GlobalId,
        as_of: u64,
    ) -> storage::BoxFuture<'_, Result<Vec<(Row, Diff)>, storage::ReadError>> {
        self.inner.snapshot(id, as_of)
    }

    fn listen(
        &self,
        id: GlobalId,
        as_of: u64,
    ) -> storage::BoxFuture<'_, Result<storage::Listen, storage::ReadError>> {
        if Some(id) == self.listen_fails {
            return Box::pin(async move { Err(storage::ReadError::CollectionDropped(id)) });
        }
        self.inner.listen(id, as_of)
    }

    fn watch_frontiers(&self) -> storage::BoxFuture<'_, Result<storage::FrontierWatch, storage::ReadError>> {
        self.inner.watch_frontiers()
    }
}

/// Waits (up to [`TIMEOUT`]) for a process to fail and returns why; panics if it does not.
pub fn wait_failed(process: &ReplicaHandle) -> String {
    block_on(async {
        tokio::time::timeout(TIMEOUT, process.failed()).await.expect("the process fails within the timeout")
    })
}
