//! A harness around `InstanceCore`: a fake storage hold issuer, dataflow builders, and helpers that play a
//! replica's part (report frontiers, answer peeks).

use std::collections::BTreeMap;
use std::sync::Arc;

use controller::{
    ComputeControllerResponse, InstanceCore, InstanceCoreConfig, InstanceOutput, IntrospectionKind,
    PeekOptions, PeekRequest, lock,
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
    pub peek_results: BTreeMap<PeekId, PeekResponse>,
    pub disconnects: Vec<(ReplicaId, String)>,
}

impl Harness {
    pub fn new() -> Self {
        Self::with_policy(ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 })
    }

    pub fn with_policy(policy: ReadPolicy<u64>) -> Self {
        let config = InstanceCoreConfig { default_index_policy: policy, ..Default::default() };
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
                InstanceOutput::PeekResult { uuid, response } => {
                    assert!(self.peek_results.insert(uuid, response).is_none(), "peek {uuid} answered twice");
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
