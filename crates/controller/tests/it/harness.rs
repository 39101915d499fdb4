//! A harness around `InstanceCore`: a fake storage hold issuer, dataflow builders, and helpers that play a
//! replica's part (report frontiers, answer peeks). At the end, what the end-to-end tests share: a
//! controller configuration with short timers, in-process replicas, bounded polling.

use std::collections::BTreeMap;
use std::sync::Arc;

use controller::{
    ComputeControllerResponse, InstanceCore, InstanceCoreConfig, InstanceOutput, IntrospectionKind,
    PeekOptions, PeekRequest, PeekResult, lock,
};
use frontiers::{Antichain, ReadHold, ReadHolds, ReadPolicy};
use protocol::{
    BuildDesc, ColumnType, ComputeCommand, ComputeResponse, DataflowDescription, Diff, FrontiersResponse,
    GlobalId, IndexExport, IndexImport, InstanceId, PeekId, PeekResponse, Plan, RelationDesc, ReplicaId, Row,
    RowSetFinishing, ScalarType, SinkConnection, SinkExport, SourceImport,
};
use replica_client::{ReplicaEvent, ReplicaStatus};

pub fn desc() -> RelationDesc {
    RelationDesc::new([
        ("k", ColumnType::new(ScalarType::Int64, false)),
        ("v", ColumnType::new(ScalarType::Int64, false)),
    ])
}

pub fn f(t: u64) -> Antichain<u64> {
    Antichain::from_elem(t)
}

pub fn s(n: u64) -> GlobalId {
    GlobalId::System(n)
}

pub fn u(n: u64) -> GlobalId {
    GlobalId::User(n)
}

/// An index `export` over storage collection `source`.
pub fn index_on_storage(source: GlobalId, export: GlobalId, as_of: u64) -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new(format!("index {export}"));
    df.source_imports.insert(source, SourceImport { desc: desc() });
    df.objects_to_build
        .push(BuildDesc { id: GlobalId::Transient(export_n(export)), plan: Plan::get(source) });
    df.index_exports
        .insert(export, IndexExport { on_id: GlobalId::Transient(export_n(export)), key: vec![0] });
    df.as_of = Some(f(as_of));
    df
}

/// An index `export` over index `upstream` of the same instance.
pub fn index_on_index(upstream: GlobalId, export: GlobalId, as_of: u64) -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new(format!("index {export}"));
    df.index_imports.insert(upstream, IndexImport { desc: desc(), key: vec![0] });
    df.objects_to_build
        .push(BuildDesc { id: GlobalId::Transient(export_n(export)), plan: Plan::get(upstream) });
    df.index_exports
        .insert(export, IndexExport { on_id: GlobalId::Transient(export_n(export)), key: vec![0] });
    df.as_of = Some(f(as_of));
    df
}

/// A dataflow over storage `source` with one sink export.
pub fn sink_on_storage(
    source: GlobalId,
    export: GlobalId,
    connection: SinkConnection,
    as_of: u64,
) -> DataflowDescription<u64> {
    let mut df = DataflowDescription::new(format!("sink {export}"));
    df.source_imports.insert(source, SourceImport { desc: desc() });
    df.objects_to_build
        .push(BuildDesc { id: GlobalId::Transient(export_n(export)), plan: Plan::get(source) });
    df.sink_exports
        .insert(export, SinkExport { from: GlobalId::Transient(export_n(export)), desc: desc(), connection });
    df.as_of = Some(f(as_of));
    df
}

fn export_n(id: GlobalId) -> u64 {
    match id {
        GlobalId::User(n) | GlobalId::System(n) | GlobalId::Transient(n) => 1_000 + n,
    }
}

pub fn peek_request(uuid: u64, id: GlobalId, timestamp: u64) -> PeekRequest<u64> {
    PeekRequest {
        uuid: PeekId(uuid),
        id,
        timestamp,
        options: PeekOptions { finishing: RowSetFinishing::unordered(), ..Default::default() },
    }
}

/// The core plus a fake storage layer and everything the core emitted.
pub struct Harness {
    pub core: InstanceCore<u64>,
    /// The storage layer's hold accounting.
    pub storage: ReadHolds<GlobalId, u64>,
    /// Storage's own holds (its read policy), released by `release_storage_policy`.
    pub storage_policy: BTreeMap<GlobalId, ReadHold<GlobalId, u64>>,
    pub commands: BTreeMap<ReplicaId, Vec<ComputeCommand<u64>>>,
    pub responses: Vec<ComputeControllerResponse<u64>>,
    pub peek_results: BTreeMap<PeekId, PeekResult>,
    pub disconnects: Vec<(ReplicaId, String)>,
}

impl Harness {
    pub fn new() -> Self {
        Self::with_policy(ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 })
    }

    pub fn with_policy(policy: ReadPolicy<u64>) -> Self {
        Self::with_config(InstanceCoreConfig { default_index_policy: policy, ..Default::default() })
    }

    pub fn with_config(config: InstanceCoreConfig<u64>) -> Self {
        Harness {
            core: InstanceCore::new(InstanceId(1), config, Arc::new(|| {}), 0),
            storage: ReadHolds::new(),
            storage_policy: BTreeMap::new(),
            commands: BTreeMap::new(),
            responses: Vec::new(),
            peek_results: BTreeMap::new(),
            disconnects: Vec::new(),
        }
    }

    /// A harness whose core keeps metrics ([`InstanceCore::with_metrics`]) in a registry of its own;
    /// indexes lag their upper by 1, so the time before the upper is readable.
    pub fn with_metrics() -> (Self, prometheus::Registry) {
        let registry = prometheus::Registry::new();
        let metrics = controller::ControllerMetrics::register(&registry).expect("a fresh registry");
        let mut h = Self::with_policy(lag(1));
        let config = InstanceCoreConfig { default_index_policy: lag(1), ..Default::default() };
        let core = InstanceCore::new(InstanceId(1), config, Arc::new(|| {}), 0);
        h.core = core.with_metrics(metrics.instance(InstanceId(1)));
        (h, registry)
    }

    pub fn create_storage(&mut self, id: GlobalId) {
        let hold = self.storage.create(id, f(0)).unwrap();
        self.storage_policy.insert(id, hold);
    }

    /// Releases storage's own hold, so only the controller's holds keep the since back.
    pub fn release_storage_policy(&mut self, id: GlobalId) {
        self.storage_policy.remove(&id);
    }

    pub fn storage_since(&mut self, id: GlobalId) -> Antichain<u64> {
        self.storage.process();
        self.storage.since(&id).unwrap().to_owned()
    }

    pub fn add_replica(&mut self, replica: ReplicaId) {
        self.core.add_replica(replica).unwrap();
        self.status(replica, ReplicaStatus::Ready);
    }

    pub fn status(&mut self, replica: ReplicaId, status: ReplicaStatus) {
        self.core.handle_replica_event(replica, ReplicaEvent::Status(status));
        self.drain();
    }

    pub fn create(
        &mut self,
        df: DataflowDescription<u64>,
    ) -> Result<(), controller::DataflowCreationError<u64>> {
        let as_of = df.as_of.clone().unwrap();
        let mut holds = BTreeMap::new();
        for id in df.source_imports.keys() {
            holds.insert(*id, self.storage.acquire(id, as_of.clone()).unwrap());
        }
        let result = self.core.create_dataflow(df, holds);
        self.drain();
        result
    }

    pub fn respond(&mut self, replica: ReplicaId, response: ComputeResponse<u64>) {
        self.core.handle_replica_event(replica, ReplicaEvent::Response(response));
        self.drain();
    }

    pub fn report(&mut self, replica: ReplicaId, id: GlobalId, upper: Antichain<u64>) {
        let frontiers = FrontiersResponse { write_frontier: Some(upper), ..Default::default() };
        self.respond(replica, ComputeResponse::Frontiers { id, frontiers });
    }

    pub fn answer(&mut self, replica: ReplicaId, uuid: u64, response: PeekResponse) {
        self.respond(replica, ComputeResponse::PeekResponse { uuid: PeekId(uuid), response });
    }

    pub fn drain(&mut self) {
        while let Some(output) = self.core.poll() {
            match output {
                InstanceOutput::Command { replica, command } => {
                    self.commands.entry(replica).or_default().push(command)
                }
                InstanceOutput::DisconnectReplica { replica, reason } => {
                    self.disconnects.push((replica, reason))
                }
                InstanceOutput::Response(r) => self.responses.push(r),
                InstanceOutput::PeekResult { uuid, result } => {
                    assert!(self.peek_results.insert(uuid, result).is_none(), "peek {uuid} answered twice");
                }
            }
        }
        self.core.check_invariants().expect("instance invariants hold after every step");
    }

    pub fn since(&self, id: GlobalId) -> Antichain<u64> {
        lock(&self.core.shared()).since(id).unwrap()
    }

    /// The core's current introspection rows of `kind`, sorted.
    pub fn introspection_rows(&self, kind: IntrospectionKind) -> Vec<Row> {
        self.core.introspection().rows(kind)
    }

    /// The introspection differences of `kind` the core emitted since the last drain, in order. Drains
    /// every kind (the others' differences are dropped).
    pub fn introspection_diffs(&mut self, kind: IntrospectionKind) -> Vec<(Row, Diff)> {
        self.core
            .drain_introspection()
            .into_iter()
            .filter(|(k, _, _)| *k == kind)
            .map(|(_, row, diff)| (row, diff))
            .collect()
    }

    /// The last `AllowCompaction` sent to `replica` for `id`.
    pub fn compaction(&self, replica: ReplicaId, id: GlobalId) -> Option<Antichain<u64>> {
        self.commands.get(&replica)?.iter().rev().find_map(|c| match c {
            ComputeCommand::AllowCompaction { id: i, frontier } if *i == id => Some(frontier.clone()),
            _ => None,
        })
    }
}

// -------------------------------------------------------------------------------------------------
// Shared by the end-to-end tests (the async controller against in-process replicas)

/// A read policy trailing the upper by `lag_ms`.
pub fn lag(lag_ms: u64) -> ReadPolicy<u64> {
    ReadPolicy::LagWriteFrontier { lag_ms, granularity_ms: 0 }
}

/// The row `(k, v)` of [`desc`].
pub fn kv(k: u64, v: u64) -> Row {
    Row::pack([protocol::Datum::Int64(k as i64), protocol::Datum::Int64(v as i64)])
}

/// `df` without its as-of: the controller chooses one.
pub fn no_as_of(df: DataflowDescription<u64>) -> DataflowDescription<u64> {
    DataflowDescription { as_of: None, ..df }
}

/// A free loopback port.
pub fn any_port() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

/// The tests' throwaway CA, the replicas' certificate (for `127.0.0.1`) and the shared secret, made once
/// per test binary in a directory that lives as long as it.
fn pki() -> &'static (tempfile::TempDir, transport::certs::PkiFiles, transport::SharedSecret) {
    static PKI: std::sync::OnceLock<(
        tempfile::TempDir,
        transport::certs::PkiFiles,
        transport::SharedSecret,
    )> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let files = transport::certs::write_throwaway_pki(dir.path(), &["127.0.0.1", "localhost"])
            .expect("throwaway certificates");
        let secret = transport::SharedSecret::generate().expect("a shared secret");
        (dir, files, secret)
    })
}

/// How the replicas under test secure their port: TLS and the shared secret.
pub fn replica_security() -> transport::ServerSecurity {
    let (_, files, secret) = pki();
    let tls = transport::TlsServerConfig::from_pem_files(&files.server_cert, &files.server_key, None)
        .expect("the server certificate loads");
    transport::ServerSecurity::tls(tls, Some(secret.clone())).expect("authenticated")
}

/// How the controllers (and storage clients) under test connect: the replicas' CA and the shared secret.
pub fn controller_security() -> transport::ClientSecurity {
    let (_, files, secret) = pki();
    let tls = transport::TlsClientConfig::from_pem_files(&files.ca, None).expect("the CA loads");
    transport::ClientSecurity::tls(tls, Some(secret.clone())).expect("authenticated")
}

/// The PEM files of [`replica_security`] and [`controller_security`], and their secret.
pub fn pki_files() -> (&'static transport::certs::PkiFiles, &'static transport::SharedSecret) {
    let (_, files, secret) = pki();
    (files, secret)
}

/// A controller configuration with short timers: indexes lag their upper by 1, replicas reconnect after
/// 10 to 100 ms, the instance ticks every 10 ms and refreshes introspection every 20 ms; metrics in a
/// registry of the controller's own.
pub fn controller_config(introspection: bool) -> controller::ControllerConfig {
    controller::ControllerConfig {
        epoch: controller::ControllerEpoch(1),
        replica_security: controller_security(),
        instance: InstanceCoreConfig {
            default_index_policy: lag(1),
            default_peek_timeout_ms: 30_000,
            introspection_interval_ms: 20,
            wallclock_lag_history_minutes: 60,
            max_command_bytes: protocol::frame::DEFAULT_MAX_FRAME_BYTES,
        },
        replica_backoff: replica_client::Backoff { initial_ms: 10, max_ms: 100 },
        hydration_concurrency: None,
        tick_interval_ms: 10,
        replica_keepalive_interval_ms: replica_client::DEFAULT_KEEPALIVE_INTERVAL_MS,
        replica_idle_timeout_ms: replica_client::DEFAULT_IDLE_TIMEOUT_MS,
        introspection,
        metrics: Some(prometheus::Registry::new()),
    }
}

/// A one-worker replica process on an embedded storage, listening on `listen`.
pub fn start_replica(
    storage: &Arc<storage::InProcess>,
    listen: std::net::SocketAddr,
) -> compute::ReplicaHandle {
    start_replica_on(Arc::clone(storage) as _, listen)
}

/// A one-worker replica process on any storage layer, listening on `listen`.
pub fn start_replica_on(
    storage: Arc<dyn storage::StorageCollections>,
    listen: std::net::SocketAddr,
) -> compute::ReplicaHandle {
    compute::ReplicaServer::start(compute::ReplicaConfig {
        listen,
        workers: 1,
        process: 0,
        timely_addresses: Vec::new(),
        storage,
        security: crate::harness::replica_security(),
    })
    .expect("start replica")
}

/// Polls `check` every 10 ms until it returns `Ok`; fails the test with its last `Err` after about 30 s.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> Result<(), String>) {
    let mut last = String::new();
    for _ in 0..3_000 {
        match check().await {
            Ok(()) => return,
            Err(e) => last = e,
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{what}: not reached after about 30 s; last seen: {last}");
}

/// A storage table of [`desc`] whose time `t` inserts `kv(t, t)`, with a read policy that follows its
/// upper, so only holds keep its since back.
pub struct SteppedTable {
    pub id: GlobalId,
    /// Everything before it is written.
    pub upper: u64,
}

impl SteppedTable {
    pub async fn create(storage: &storage::InProcess, id: GlobalId) -> SteppedTable {
        use storage::StorageCollections;
        storage.create_collection(id, desc()).await.expect("create table");
        storage.set_read_policy(id, lag(0)).await.expect("table read policy");
        SteppedTable { id, upper: 0 }
    }

    /// Writes every time up to `upper` (exclusive) in one append.
    pub async fn advance_to(&mut self, storage: &storage::InProcess, upper: u64) {
        use storage::StorageCollections;
        let updates = (self.upper..upper).map(|t| (kv(t, t), t, 1)).collect();
        let request = storage::AppendRequest {
            id: self.id,
            updates,
            expected_upper: f(self.upper),
            new_upper: f(upper),
        };
        storage.append(vec![request]).await.expect("append");
        self.upper = upper;
    }

    /// Writes the next `times` times.
    pub async fn advance(&mut self, storage: &storage::InProcess, times: u64) {
        self.advance_to(storage, self.upper + times).await;
    }

    /// The table's contents at `time` (each row once).
    pub fn contents_at(&self, time: u64) -> BTreeMap<Row, u64> {
        (0..=time.min(self.upper.saturating_sub(1))).map(|t| (kv(t, t), 1)).collect()
    }
}

/// How [`FrontiersHooked`] answers `frontiers`: given the wrapped storage and the collection.
pub type FrontiersHook = Box<
    dyn Fn(
            Arc<storage::InProcess>,
            GlobalId,
        ) -> storage::BoxFuture<'static, Result<storage::CollectionFrontiers, storage::ReadError>>
        + Send
        + Sync,
>;

/// A storage layer that passes every call to `inner`, except `frontiers`, which `hook` answers: for tests
/// of what the controller makes of a frontier read that fails or races with another reader.
pub struct FrontiersHooked {
    pub inner: Arc<storage::InProcess>,
    pub hook: FrontiersHook,
}

impl std::fmt::Debug for FrontiersHooked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontiersHooked").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl storage::StorageCollections for FrontiersHooked {
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
        (self.hook)(Arc::clone(&self.inner), id)
    }
    fn append(
        &self,
        requests: Vec<storage::AppendRequest>,
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
        self.inner.listen(id, as_of)
    }
    fn watch_frontiers(&self) -> storage::BoxFuture<'_, Result<storage::FrontierWatch, storage::ReadError>> {
        self.inner.watch_frontiers()
    }
}
