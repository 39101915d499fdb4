//! The slower simulation mode: the same kind of seeded workload and the same oracle, but against the real
//! stack in one process: the async [`ComputeController`], real `compute` replicas (timely and differential
//! workers behind loopback TCP) and the embedded storage layer.
//!
//! **What this is.** A check that the real replica and the real controller shell agree with the oracle under
//! a seeded workload with faults (replicas killed and restarted on the same address, so they rehydrate;
//! dataflows dropped). **What this is not.** Deterministic: threads, sockets and the wall clock decide the
//! interleaving, so the seed fixes the workload and the fault plan, not the trace (its hash is 0).
//! Use `sim simulate --real-compute --seed S`; the deterministic mode is the one that sweeps thousands of
//! seeds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use frontiers::Antichain;
use protocol::arbitrary::{Choices, plan_of};
use protocol::{
    BuildDesc, DataflowDescription, GlobalId, IndexExport, InstanceId, MapFilterProject, PeekTarget,
    RelationDesc, RelationType, ReplicaId, RowSetFinishing, SinkConnection, SinkExport, SourceImport,
};
use storage::{AppendRequest, InProcess, StorageCollections, StoreConfig};

use controller::{
    ClientSecurity, ComputeController, ComputeControllerResponse, ControllerConfig, ControllerEpoch,
    PeekOptions, ReplicaLocation, ServerSecurity, SharedSecret,
};

use super::checks::{PeekExpectation, SubscribeTracker};
use super::oracle::Oracle;
use super::rng::Rng;
use super::violation::{Invariant, Violation};
use super::world::{Outcome, random_row, table_desc};

/// How long a real-compute run lasts, in wall-clock milliseconds of workload.
#[derive(Debug, Clone, Copy)]
pub struct RealConfig {
    /// Workload and faults.
    pub duration_ms: u64,
}

impl Default for RealConfig {
    fn default() -> Self {
        RealConfig { duration_ms: 6_000 }
    }
}

const INSTANCE: InstanceId = InstanceId(1);

struct Replica {
    address: SocketAddr,
    handle: Option<compute::ReplicaHandle>,
}

fn start_replica(
    address: SocketAddr,
    storage: &Arc<InProcess>,
    secret: &SharedSecret,
) -> anyhow::Result<compute::ReplicaHandle> {
    let config = compute::ReplicaConfig {
        listen: address,
        workers: 1,
        process: 0,
        timely_addresses: Vec::new(),
        storage: Arc::clone(storage) as Arc<dyn StorageCollections>,
        // Plain TCP on loopback with a secret drawn for the run: this mode checks the controller's
        // logic against real replicas; `sim cluster` runs with TLS.
        security: ServerSecurity::insecure(secret.clone()),
    };
    compute::ReplicaServer::start(config).map_err(|e| anyhow!("cannot start a replica on {address}: {e}"))
}

/// Runs one seed against the real stack.
pub fn run_real(seed: u64, config: RealConfig) -> anyhow::Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(run(seed, config))
}

// Real time paces the workload here: this mode runs real threads and sockets, not simulated ones.
#[allow(clippy::disallowed_methods)]
async fn run(seed: u64, config: RealConfig) -> anyhow::Result<Outcome> {
    let mut rng = Rng::new(seed);
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let dyn_storage: Arc<dyn StorageCollections> = Arc::clone(&storage) as Arc<dyn StorageCollections>;
    let mut oracle = Oracle::default();
    let mut tables: Vec<(GlobalId, RelationDesc)> = Vec::new();
    for t in 0..rng.range(1, 2) {
        let id = GlobalId::System(t + 1);
        let desc = table_desc(rng.range(1, 3) as usize);
        dyn_storage.create_collection(id, desc.clone()).await?;
        tables.push((id, desc));
    }
    let secret = SharedSecret::generate().map_err(|e| anyhow!("cannot draw a shared secret: {e}"))?;
    let controller_config = ControllerConfig {
        introspection: false,
        tick_interval_ms: 20,
        ..ControllerConfig::new(ControllerEpoch(1), ClientSecurity::insecure(secret.clone()))
    };
    let mut controller = ComputeController::new(Arc::clone(&dyn_storage), None, controller_config)
        .await
        .map_err(|e| anyhow!(e))?;
    controller.create_instance(INSTANCE, controller.default_instance_config())?;
    let mut replicas: BTreeMap<ReplicaId, Replica> = BTreeMap::new();
    for r in 1..=2 {
        let handle = start_replica("127.0.0.1:0".parse()?, &storage, &secret)?;
        let address = handle.local_addr();
        controller
            .add_replica(
                INSTANCE,
                ReplicaId(r),
                ReplicaLocation::Unmanaged { addresses: vec![address.to_string()] },
            )
            .await?;
        replicas.insert(ReplicaId(r), Replica { address, handle: Some(handle) });
    }

    let mut time = 0u64;
    let mut next_id = 1u64;
    let mut indexes: BTreeMap<GlobalId, (Vec<usize>, RelationType)> = BTreeMap::new();
    let mut subscribes: BTreeMap<GlobalId, SubscribeTracker> = BTreeMap::new();
    let (mut peeks_checked, mut batches_checked, mut faults) = (0u64, 0u64, 0u64);
    let started = std::time::Instant::now();
    let mut violation: Option<Violation> = None;

    while started.elapsed() < Duration::from_millis(config.duration_ms) && violation.is_none() {
        // Append to every table at the next time.
        let mut requests = Vec::new();
        for (id, desc) in &tables {
            let updates: Vec<_> = (0..rng.below(4))
                .map(|_| (random_row(&mut rng, desc), time, if rng.chance(0.8) { 1 } else { -1 }))
                .collect();
            oracle.record_append(*id, &updates, time + 1);
            requests.push(AppendRequest {
                id: *id,
                updates,
                expected_upper: Antichain::from_elem(time),
                new_upper: Antichain::from_elem(time + 1),
            });
        }
        dyn_storage.append(requests).await.context("append")?;
        time += 1;

        if rng.chance(0.05) {
            let (table, desc) = rng.pick(&tables).cloned().expect("tables exist");
            let mut df = DataflowDescription::new(format!("real{next_id}"));
            df.source_imports.insert(table, SourceImport { desc: desc.clone() });
            let values: Vec<u32> = (0..32).map(|_| rng.next_u64() as u32).collect();
            let (plan, typ) = plan_of(&mut Choices::new(values), &[(table, desc.typ().clone())], 1);
            let object = GlobalId::Transient(next_id);
            df.objects_to_build.push(BuildDesc { id: object, plan });
            let export = GlobalId::User(next_id);
            next_id += 1;
            let subscribe = rng.chance(0.3);
            if subscribe {
                let sink_desc = RelationDesc::new(
                    typ.column_types.iter().enumerate().map(|(i, t)| (format!("c{i}"), *t)),
                );
                df.sink_exports.insert(
                    export,
                    SinkExport {
                        from: object,
                        desc: sink_desc,
                        connection: SinkConnection::Subscribe { with_snapshot: true },
                    },
                );
            } else {
                let key = if typ.arity() == 0 { vec![] } else { vec![0] };
                df.index_exports.insert(export, IndexExport { on_id: object, key: key.clone() });
                indexes.insert(export, (key, typ));
            }
            let as_of = controller.create_dataflow(INSTANCE, df.clone()).await?;
            df.as_of = Some(as_of.clone());
            oracle.record_dataflow(&Arc::new(df));
            if subscribe {
                subscribes
                    .insert(export, SubscribeTracker::new(*as_of.as_option().expect("total order"), true));
            }
        }

        if rng.chance(0.2)
            && let Some((&id, (key, typ))) =
                indexes.iter().nth(rng.below(indexes.len().max(1) as u64) as usize)
        {
            let frontiers = controller.collection_frontiers(INSTANCE, id)?;
            if let (Some(since), Some(upper)) = (frontiers.since.as_option(), frontiers.upper.as_option())
                && *upper > *since
            {
                let timestamp = upper - 1;
                let mfp = MapFilterProject::new(typ.arity());
                let options = PeekOptions { map_filter_project: Some(mfp.clone()), ..Default::default() };
                let handle = controller.peek(INSTANCE, PeekTarget::Index { id }, timestamp, options).await?;
                let uuid = handle.uuid;
                let response = tokio::time::timeout(Duration::from_secs(30), handle.result())
                    .await
                    .map_err(|_| anyhow!("peek {uuid} of {id} at {timestamp} did not complete in 30 s"))?;
                let expectation = PeekExpectation {
                    id,
                    timestamp,
                    key: key.clone(),
                    constraints: None,
                    mfp,
                    finishing: RowSetFinishing::unordered(),
                    target: None,
                    cancelled: false,
                    issued_ms: 0,
                };
                peeks_checked += 1;
                if let Err(v) = expectation.check(uuid, &oracle, &response) {
                    violation = Some(v);
                }
            }
        }

        if rng.chance(0.01) {
            // Kill a replica and restart it on the same address: it reconnects and rehydrates.
            faults += 1;
            let ids: Vec<ReplicaId> = replicas.keys().copied().collect();
            let replica = replicas.get_mut(rng.pick(&ids).expect("replicas")).expect("listed");
            if let Some(handle) = replica.handle.take() {
                tokio::task::spawn_blocking(move || handle.shutdown()).await?;
            }
            tokio::time::sleep(Duration::from_millis(rng.range(10, 200))).await;
            replica.handle = Some(start_replica(replica.address, &storage, &secret)?);
        }

        if rng.chance(0.01) && !indexes.is_empty() {
            faults += 1;
            let id = *indexes.keys().nth(rng.below(indexes.len() as u64) as usize).expect("non-empty");
            controller.drop_collections(INSTANCE, vec![id]).await?;
            indexes.remove(&id);
        }

        while let Some(response) = controller.try_process() {
            if let ComputeControllerResponse::SubscribeResponse { id, response } = response
                && let Some(tracker) = subscribes.get_mut(&id)
            {
                match tracker.observe(id, &oracle, response, time) {
                    Ok(checked) => batches_checked += u64::from(checked),
                    Err(v) => violation = Some(v),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Liveness: every index catches up with storage.
    if violation.is_none() {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for id in indexes.keys() {
            loop {
                let upper = controller.collection_frontiers(INSTANCE, *id)?.upper;
                // An empty upper is a closed collection (e.g. a constant plan): caught up forever.
                if upper.as_option().is_none_or(|u| *u >= time) {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    violation = Some(Violation::new(
                        Invariant::Liveness,
                        format!("{id} stuck at {upper:?}, storage is at {time}"),
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    drop(controller);
    for (_, replica) in replicas {
        if let Some(handle) = replica.handle {
            tokio::task::spawn_blocking(move || handle.shutdown()).await?;
        }
    }
    Ok(Outcome {
        seed,
        steps: time,
        trace_hash: 0,
        peeks_checked,
        batches_checked,
        faults,
        // Storage is embedded and fault-free here; outages and lost replies run in the model mode.
        storage_outages: 0,
        storage: Default::default(),
        // The real replicas compute; no model runs here.
        model_evaluations: 0,
        model_memo_hits: 0,
        violation: violation.map(|v| (time, v)),
    })
}
