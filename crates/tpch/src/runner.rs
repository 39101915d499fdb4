//! Runs the queries as a service would: tables in a storage layer, the queries' dataflows installed
//! through a [`ComputeController`] on one in-process compute replica (real timely workers, over
//! loopback TCP), refresh batches appended to storage, and answers read with peeks (the query's `ORDER
//! BY` and `LIMIT` as the peek's finishing).
//!
//! Time: the initial load is written at time 0; refresh batch `i` (from 1) at time `i`. After
//! [`Runner::refresh`] returns time `t`, [`Runner::wait_until_complete`] waits for every index to be
//! complete at `t` and [`Runner::peek`] reads it there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use controller::{
    ComputeController, ControllerConfig, InstanceCoreConfig, PeekOptions, ProcessOrchestrator,
    ProcessOrchestratorConfig, ReplicaLocation, ReplicaStorage,
};
use frontiers::{Antichain, ReadPolicy};
use protocol::{GlobalId, InstanceId, PeekTarget, ReplicaId, Row};
use storage::{AppendRequest, InProcess, StorageCollections, StoreConfig};

use crate::data::{Data, Refresh};
use crate::queries::Query;
use crate::schema::{Catalog, TABLES, Table};

/// The instance the runner creates.
pub const INSTANCE: InstanceId = InstanceId(1);
/// The replica the runner adds.
pub const REPLICA: ReplicaId = ReplicaId(1);

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The storage layer refused an operation.
    #[error("storage: {0}")]
    Storage(String),
    /// The controller refused an operation.
    #[error("controller: {0}")]
    Controller(String),
    /// A peek failed.
    #[error("peek of query {query}: {reason}")]
    Peek {
        /// The query.
        query: usize,
        /// Why.
        reason: String,
    },
    /// The indexes did not become complete in time.
    #[error("indexes not complete at {time} after {waited_ms} ms: {pending:?}")]
    Timeout {
        /// The time waited for.
        time: u64,
        /// How long.
        waited_ms: u64,
        /// The indexes still short of it.
        pending: Vec<GlobalId>,
    },
}

/// Where the replica runs.
#[derive(Debug, Clone)]
pub enum ReplicaKind {
    /// In this process (threads), reading storage directly.
    InProcess {
        /// Timely workers.
        workers: usize,
    },
    /// A `compute-replica` process started by the controller's process orchestrator (so its memory is its
    /// own, measurable), reading the shards this runner keeps in a temporary directory (blob files and a
    /// SQLite consensus) as every process does, DESIGN §9.
    Process {
        /// The `compute-replica` binary.
        binary: PathBuf,
        /// Timely workers.
        workers: usize,
    },
}

/// The replica and what keeps it running.
#[derive(Debug)]
enum Replica {
    InProcess(compute::ReplicaHandle),
    Process {
        orchestrator: Arc<ProcessOrchestrator>,
        /// The runner's own handle on the shards (shut down last) and their directory.
        shards: storage::ShardCollections,
        _dir: tempfile::TempDir,
    },
}

/// Storage, a controller and one replica, with the TPC-H tables.
#[derive(Debug)]
pub struct Runner {
    storage: Arc<dyn StorageCollections>,
    controller: ComputeController,
    replica: Option<Replica>,
    catalog: Catalog,
    /// The next time to write at (every table's upper).
    time: u64,
}

impl Runner {
    /// Starts a storage layer (in memory for an in-process replica, shards for a replica process), a
    /// controller and a replica.
    pub async fn start(catalog: Catalog, kind: ReplicaKind) -> Result<Runner, RunError> {
        // Loopback only: plain TCP, with a throwaway shared secret every connection proves.
        let secret = transport::SharedSecret::generate().map_err(|e| RunError::Controller(e.to_string()))?;
        let config = ControllerConfig {
            instance: InstanceCoreConfig {
                // Indexes keep one time of history: a peek reads the latest complete time.
                default_index_policy: ReadPolicy::LagWriteFrontier { lag_ms: 1, granularity_ms: 0 },
                default_peek_timeout_ms: 600_000,
                ..InstanceCoreConfig::default()
            },
            tick_interval_ms: 10,
            introspection: false,
            ..ControllerConfig::new(
                protocol::ControllerEpoch(1),
                transport::ClientSecurity::insecure(secret.clone()),
            )
        };
        let controller_error = |e: String| RunError::Controller(e);
        let (storage, replica, orchestrator) = match &kind {
            ReplicaKind::InProcess { workers } => {
                let storage: Arc<dyn StorageCollections> =
                    Arc::new(InProcess::in_memory(StoreConfig::default()));
                let listen: SocketAddr = "127.0.0.1:0".parse().expect("an address");
                let handle = compute::ReplicaServer::start(compute::ReplicaConfig {
                    listen,
                    workers: *workers,
                    process: 0,
                    timely_addresses: Vec::new(),
                    storage: Arc::clone(&storage),
                    security: transport::ServerSecurity::insecure(secret.clone()),
                })
                .map_err(|e| controller_error(format!("replica: {e}")))?;
                (storage, Replica::InProcess(handle), None)
            }
            ReplicaKind::Process { binary, .. } => {
                let storage_error = |e: String| RunError::Storage(format!("shards: {e}"));
                let dir = tempfile::tempdir().map_err(|e| storage_error(e.to_string()))?;
                let (blob, consensus) = storage::embedded_urls(dir.path());
                let replicas =
                    ReplicaStorage::shards(&blob, &consensus).map_err(|e| storage_error(e.to_string()))?;
                let config = storage::ShardConfig {
                    critical_reader: Some("controller".to_string()),
                    ..Default::default()
                };
                let blob = blob.parse().map_err(|e: storage::UrlError| storage_error(e.to_string()))?;
                let consensus =
                    consensus.parse().map_err(|e: storage::UrlError| storage_error(e.to_string()))?;
                let shards = storage::ShardCollections::open(&blob, &consensus, config)
                    .await
                    .map_err(|e| storage_error(e.to_string()))?;
                let storage: Arc<dyn StorageCollections> = Arc::new(shards.clone());
                let (orchestrator, _events) = ProcessOrchestrator::new(ProcessOrchestratorConfig {
                    binary: binary.clone(),
                    storage: replicas,
                    initial_backoff_ms: 100,
                    max_backoff_ms: 1_000,
                    env: vec![("RUST_LOG".to_string(), "warn".to_string())],
                    log_dir: None,
                    metrics: false,
                    security: controller::ReplicaProcessSecurity { tls: None, secret: Some(secret.clone()) },
                });
                let orchestrator = Arc::new(orchestrator);
                let replica = Replica::Process { orchestrator: Arc::clone(&orchestrator), shards, _dir: dir };
                (storage, replica, Some(orchestrator))
            }
        };
        let orchestrator = orchestrator.map(|o| o as Arc<dyn controller::Orchestrator>);
        let mut controller = ComputeController::new(Arc::clone(&storage) as _, orchestrator, config)
            .await
            .map_err(controller_error)?;
        let instance_config = controller.default_instance_config();
        controller.create_instance(INSTANCE, instance_config).map_err(|e| controller_error(e.to_string()))?;
        let location = match (&kind, &replica) {
            (_, Replica::InProcess(handle)) => {
                ReplicaLocation::Unmanaged { addresses: vec![handle.local_addr().to_string()] }
            }
            (ReplicaKind::Process { workers, .. }, _) => {
                ReplicaLocation::Managed { workers: *workers, processes: 1 }
            }
            (ReplicaKind::InProcess { .. }, _) => {
                unreachable!("an in-process kind has an in-process replica")
            }
        };
        controller
            .add_replica(INSTANCE, REPLICA, location)
            .await
            .map_err(|e| controller_error(e.to_string()))?;
        Ok(Runner { storage, controller, replica: Some(replica), catalog, time: 0 })
    }

    /// The replica's process id, if it runs in a process of its own.
    pub fn replica_pid(&self) -> Option<u32> {
        match &self.replica {
            Some(Replica::Process { orchestrator, .. }) => {
                orchestrator.pids(INSTANCE, REPLICA).first().copied()
            }
            _ => None,
        }
    }

    /// The storage layer.
    pub fn storage(&self) -> &Arc<dyn StorageCollections> {
        &self.storage
    }

    /// The controller.
    pub fn controller(&self) -> &ComputeController {
        &self.controller
    }

    /// Creates the tables and writes `data`'s initial contents at time 0.
    pub async fn load(&mut self, data: &Data) -> Result<(), RunError> {
        assert_eq!(self.time, 0, "load once, first");
        for table in TABLES {
            let id = self.catalog.table(table);
            self.storage
                .create_collection(id, table.desc())
                .await
                .map_err(|e| RunError::Storage(e.to_string()))?;
        }
        let updates =
            TABLES.iter().map(|t| (*t, data.tables[t].iter().map(|r| (r.clone(), 1)).collect())).collect();
        self.append(updates).await
    }

    /// Installs the queries' dataflows, as of the freshest time their inputs allow (the controller's
    /// `select_as_of`).
    pub async fn install(&self, queries: &[Query]) -> Result<(), RunError> {
        for query in queries {
            let mut dataflow = query.dataflow.clone();
            dataflow.as_of = None;
            self.controller
                .create_dataflow(INSTANCE, dataflow)
                .await
                .map_err(|e| RunError::Controller(format!("query {}: {e}", query.number)))?;
        }
        Ok(())
    }

    /// Drops the queries' indexes (and so their dataflows).
    pub async fn uninstall(&self, queries: &[Query]) -> Result<(), RunError> {
        let ids: Vec<GlobalId> = queries.iter().map(|q| q.index).collect();
        self.controller.drop_collections(INSTANCE, ids).await.map_err(|e| RunError::Controller(e.to_string()))
    }

    /// The time of the latest write (the tables are complete up to and including it).
    pub fn latest_time(&self) -> u64 {
        assert!(self.time > 0, "the tables are loaded");
        self.time - 1
    }

    /// Appends a refresh batch at the next time, which it returns.
    pub async fn refresh(&mut self, refresh: &Refresh) -> Result<u64, RunError> {
        let mut updates: Vec<(Table, Vec<(Row, i64)>)> = TABLES.iter().map(|t| (*t, Vec::new())).collect();
        for (table, row, diff) in refresh.updates() {
            let slot = updates.iter_mut().find(|(t, _)| *t == table).expect("every table");
            slot.1.push((row.clone(), diff));
        }
        self.append(updates).await?;
        Ok(self.time - 1)
    }

    /// Appends `updates` to every table at the current time, atomically, and moves to the next.
    async fn append(&mut self, updates: Vec<(Table, Vec<(Row, i64)>)>) -> Result<(), RunError> {
        let time = self.time;
        let requests = updates
            .into_iter()
            .map(|(table, rows)| AppendRequest {
                id: self.catalog.table(table),
                updates: rows.into_iter().map(|(row, diff)| (row, time, diff)).collect(),
                expected_upper: Antichain::from_elem(time),
                new_upper: Antichain::from_elem(time + 1),
            })
            .collect();
        self.storage.append(requests).await.map_err(|e| RunError::Storage(e.to_string()))?;
        self.time += 1;
        Ok(())
    }

    /// Waits until every index of `queries` is complete at `time` (its upper beyond it), at most
    /// `limit`; returns how long it took.
    pub async fn wait_until_complete(
        &self,
        queries: &[Query],
        time: u64,
        limit: Duration,
    ) -> Result<Duration, RunError> {
        // tidy: the runner measures real work, not simulated time.
        #[allow(clippy::disallowed_methods)]
        let start = Instant::now();
        loop {
            let pending: Vec<GlobalId> = queries
                .iter()
                .map(|q| q.index)
                .filter(|id| {
                    self.controller
                        .collection_frontiers(INSTANCE, *id)
                        .is_ok_and(|f| f.upper.less_equal(&time))
                        || self.controller.collection_frontiers(INSTANCE, *id).is_err()
                })
                .collect();
            if pending.is_empty() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                let waited_ms = start.elapsed().as_millis() as u64;
                return Err(RunError::Timeout { time, waited_ms, pending });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The query's answer at `time`: its rows in the query's order, each as many times as it occurs.
    pub async fn peek(&self, query: &Query, time: u64) -> Result<Vec<Row>, RunError> {
        let options = PeekOptions { finishing: query.finishing.clone(), ..PeekOptions::default() };
        let failed = |reason: String| RunError::Peek { query: query.number, reason };
        let handle = self
            .controller
            .peek(INSTANCE, PeekTarget::Index { id: query.index }, time, options)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let rows = handle.result().await.map_err(|e| failed(e.to_string()))?;
        Ok(rows.into_iter().flat_map(|(row, count)| std::iter::repeat_n(row, count.get() as usize)).collect())
    }

    /// Stops the replica and the controller, and releases the shards' readers.
    pub async fn shutdown(mut self) {
        match self.replica.take() {
            Some(Replica::InProcess(handle)) => {
                let _ = tokio::task::spawn_blocking(move || handle.shutdown()).await;
            }
            Some(Replica::Process { shards, .. }) => {
                // Dropping the replica stops its process; then this process's readers go.
                let _ = self.controller.drop_replica(INSTANCE, REPLICA).await;
                shards.shutdown().await;
            }
            None => {}
        }
    }
}
