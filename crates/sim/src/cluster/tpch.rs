//! `sim cluster --workload tpch`: the cluster scenario's faults on the 22 TPC-H views.
//!
//! The tables of `tpch` (scale factor `--scale-factor`, 0.01 by default) are loaded into the storage
//! server; the 22 queries' dataflows are installed on every replica of the instance; during the timed
//! run refresh batches are appended one after another, and after each one every query is peeked at its
//! time and compared with SQLite running the query's SQL on the same data (`tpch::sqlite`, with the
//! semantic differences in `tpch::sqlite::semantics`). On the scenario's schedule a replica's processes
//! are killed with SIGKILL (every query must then be answered *by that replica*, at the latest time, and
//! agree with SQLite) and a query's dataflow is dropped and recreated under new ids (it must hydrate and
//! agree). Every disagreement is a violation; the report is the scenario's (`report.rs`).
//!
//! **Not here:** the orders workload's subscribes and materialized view (`tasks.rs`); this workload
//! checks indexes through peeks only.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::sync::mpsc;

use controller::{
    ClientSecurity, ComputeController, ControllerConfig, ControllerEpoch, InstanceCoreConfig, PeekOptions,
    ProcessEvent, ProcessOrchestrator, ReplicaLocation,
};
use frontiers::{Antichain, ReadPolicy};
use protocol::{GlobalId, PeekTarget, ReplicaId, Row};
use storage::{AppendRequest, StorageCollections};
use tpch::sqlite::{Oracle, semantics};
use tpch::{Catalog, Data, Query, Refresh, TABLES};

use crate::cluster::report::{Recreation, Rehydration, Stats, Ui, lock};
use crate::cluster::tasks::{INSTANCE, ScenarioStorage, open_storage};
use crate::cluster::{ClusterArgs, now};

/// How long a check waits for an answer (through a replica's restart and rehydration).
const PATIENCE: Duration = Duration::from_secs(300);

/// The views' id bases: the first set, then one per recreation.
const VIEWS_STRIDE: u64 = 1_000_000;

struct Ctx {
    controller: ComputeController,
    storage: Arc<dyn StorageCollections>,
    oracle: Oracle,
    stats: Arc<Stats>,
    ui: Arc<Ui>,
    /// The queries currently installed.
    queries: Vec<Query>,
    /// The next time to write at.
    time: u64,
}

/// The scenario on the TPC-H views (see the module documentation).
pub async fn scenario(
    args: ClusterArgs,
    storage: ScenarioStorage,
    security: ClientSecurity,
    orchestrator: Arc<ProcessOrchestrator>,
    process_events: mpsc::UnboundedReceiver<ProcessEvent>,
    stats: Arc<Stats>,
    ui: Arc<Ui>,
) -> anyhow::Result<()> {
    let catalog = Catalog::new(0);
    let fresh: Vec<GlobalId> = TABLES.iter().map(|table| catalog.table(*table)).collect();
    // The controller and the loader share the controller's engine (the loader writes from its process).
    let (storage, _, shards) = open_storage(&storage, &fresh).await?;
    let result = scenario_on(args, storage, security, orchestrator, process_events, stats, ui).await;
    for engine in shards {
        // Releases the leased readers rather than leaving them to expire.
        engine.shutdown().await;
    }
    result
}

async fn scenario_on(
    args: ClusterArgs,
    storage: Arc<dyn StorageCollections>,
    security: ClientSecurity,
    orchestrator: Arc<ProcessOrchestrator>,
    mut process_events: mpsc::UnboundedReceiver<ProcessEvent>,
    stats: Arc<Stats>,
    ui: Arc<Ui>,
) -> anyhow::Result<()> {
    // About one refresh batch a second, and some to spare.
    let batches = (args.duration.as_secs() as usize + 10).min(tpch::data::SLICES as usize / 2);
    let data = Data::generate(args.scale_factor, batches);
    let oracle = Oracle::load(&data).map_err(|e| anyhow!("{e}"))?;
    let catalog = Catalog::new(0);
    let config = ControllerConfig {
        instance: InstanceCoreConfig {
            default_index_policy: ReadPolicy::LagWriteFrontier { lag_ms: 1, granularity_ms: 0 },
            ..InstanceCoreConfig::default()
        },
        // The only controller of its replicas: epoch 1.
        ..ControllerConfig::new(ControllerEpoch(1), security)
    };
    let mut controller =
        ComputeController::new(Arc::clone(&storage), Some(Arc::clone(&orchestrator) as _), config)
            .await
            .map_err(|e| anyhow!("cannot start the controller: {e}"))?;
    controller.create_instance(INSTANCE, controller.default_instance_config())?;
    tokio::spawn(async move { while process_events.recv().await.is_some() {} });
    let mut ctx = Ctx { controller, storage, oracle, stats, ui, queries: tpch::all(catalog, 0), time: 0 };
    ctx.load(&data, catalog).await?;
    for (replica, processes) in args.replica_specs() {
        let location = ReplicaLocation::Managed { workers: args.workers, processes };
        ctx.controller.add_replica(INSTANCE, replica, location).await?;
    }
    let start = now();
    for query in ctx.queries.clone() {
        ctx.install(&query).await?;
    }
    for (replica, _) in args.replica_specs() {
        ctx.check_all(Some(replica), 0).await;
    }
    *lock(&ctx.stats.hydration_ms) = Some(start.elapsed().as_millis() as u64);
    ctx.ui.say(&format!("22 TPC-H views hydrated on {} replicas", args.replicas));

    *lock(&ctx.stats.started) = Some(now());
    let (kills, recreations) = (args.kill_count(), args.recreations);
    let (mut killed, mut recreated) = (0, 0);
    let mut refreshes = data.refreshes.iter();
    while ctx.stats.elapsed_s() < args.duration.as_secs_f64() {
        let Some(refresh) = refreshes.next() else { break };
        let time = ctx.refresh(refresh).await?;
        ctx.check_all(None, time).await;
        let progress = ctx.stats.elapsed_s() / args.duration.as_secs_f64();
        if killed < kills && progress >= (killed + 1) as f64 / (kills + 1) as f64 {
            let (replica, _) = args.replica_specs()[killed % args.replicas];
            ctx.kill_and_check(&orchestrator, replica).await;
            killed += 1;
        }
        if recreated < recreations && progress >= (recreated + 1) as f64 / (recreations + 1) as f64 {
            recreated += 1;
            ctx.recreate(recreated).await?;
        }
    }
    *lock(&ctx.stats.finished_s) = Some(ctx.stats.elapsed_s());
    ctx.ui.say(&format!("{} refresh batches maintained and checked", ctx.time - 1));
    Ok(())
}

impl Ctx {
    /// Creates the tables and writes the initial contents at time 0.
    async fn load(&mut self, data: &Data, catalog: Catalog) -> anyhow::Result<()> {
        for table in TABLES {
            self.storage.create_collection(catalog.table(table), table.desc()).await?;
        }
        let updates: Vec<(GlobalId, Vec<(Row, i64)>)> = TABLES
            .iter()
            .map(|t| (catalog.table(*t), data.tables[t].iter().map(|r| (r.clone(), 1)).collect()))
            .collect();
        self.stats.rows_loaded.store(data.rows() as u64, Ordering::SeqCst);
        self.append(updates).await?;
        self.ui.say(&format!("loaded TPC-H at scale factor {} ({} rows)", data.scale_factor, data.rows()));
        Ok(())
    }

    /// Appends a refresh batch (and applies it to SQLite); returns its time.
    async fn refresh(&mut self, refresh: &Refresh) -> anyhow::Result<u64> {
        let catalog = Catalog::new(0);
        let mut updates: Vec<(GlobalId, Vec<(Row, i64)>)> =
            TABLES.iter().map(|t| (catalog.table(*t), Vec::new())).collect();
        for (table, row, diff) in refresh.updates() {
            let id = catalog.table(table);
            updates.iter_mut().find(|(t, _)| *t == id).expect("every table").1.push((row.clone(), diff));
        }
        let count = refresh.inserts.len() + refresh.deletes.len();
        self.append(updates).await?;
        self.stats.rows_written.fetch_add(count as u64, Ordering::Relaxed);
        self.stats.appends.fetch_add(1, Ordering::Relaxed);
        self.oracle.apply(refresh).map_err(|e| anyhow!("{e}"))?;
        Ok(self.time - 1)
    }

    async fn append(&mut self, updates: Vec<(GlobalId, Vec<(Row, i64)>)>) -> anyhow::Result<()> {
        let time = self.time;
        let requests = updates
            .into_iter()
            .map(|(id, rows)| AppendRequest {
                id,
                updates: rows.into_iter().map(|(row, diff)| (row, time, diff)).collect(),
                expected_upper: Antichain::from_elem(time),
                new_upper: Antichain::from_elem(time + 1),
            })
            .collect();
        self.storage.append(requests).await.context("an append failed")?;
        self.time += 1;
        Ok(())
    }

    async fn install(&self, query: &Query) -> anyhow::Result<()> {
        let mut dataflow = query.dataflow.clone();
        dataflow.as_of = None;
        self.controller
            .create_dataflow(INSTANCE, dataflow)
            .await
            .with_context(|| format!("query {}", query.number))?;
        Ok(())
    }

    /// Peeks every query at `time` (on `replica` if given) and compares with SQLite; a disagreement or a
    /// failed peek is a violation.
    async fn check_all(&self, replica: Option<ReplicaId>, time: u64) {
        for query in &self.queries {
            self.check(query, replica, time).await;
        }
    }

    async fn check(&self, query: &Query, replica: Option<ReplicaId>, time: u64) -> bool {
        let options = PeekOptions {
            finishing: query.finishing.clone(),
            target_replica: replica,
            timeout_ms: Some(PATIENCE.as_millis() as u64),
            ..PeekOptions::default()
        };
        let start = now();
        let where_ = replica.map_or(String::new(), |r| format!(" on {r}"));
        let peeked = match self
            .controller
            .peek(INSTANCE, PeekTarget::Index { id: query.index }, time, options)
            .await
        {
            Ok(handle) => handle.result().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let rows: Vec<Row> = match peeked {
            Ok(rows) => {
                rows.into_iter().flat_map(|(r, n)| std::iter::repeat_n(r, n.get() as usize)).collect()
            }
            Err(e) => {
                self.stats
                    .violation(format!("TPC-H Q{}{where_} at {time}: the peek failed: {e}", query.number));
                return false;
            }
        };
        self.stats.peek("tpch", true, start.elapsed(), false);
        let expected = match self.oracle.query(query.sql) {
            Ok(expected) => expected,
            Err(e) => {
                self.stats.violation(format!("TPC-H Q{}: SQLite failed: {e}", query.number));
                return false;
            }
        };
        let global = query.finishing.order_by.is_empty() && query.typ.arity() == 1;
        match semantics::compare(&rows, &expected, &query.typ.column_types, global) {
            Ok(()) => true,
            Err(report) => {
                self.stats.violation(format!("TPC-H Q{}{where_} at {time}: {report}", query.number));
                false
            }
        }
    }

    /// SIGKILLs `replica`'s processes; every query must then be answered by it at the latest time.
    async fn kill_and_check(&self, orchestrator: &ProcessOrchestrator, replica: ReplicaId) {
        let pids = orchestrator.pids(INSTANCE, replica);
        let time = self.time - 1;
        let mut record = Rehydration {
            replica: replica.to_string(),
            processes: pids.len(),
            killed_at_s: self.stats.elapsed_s(),
            restarted_ms: None,
            answered_peek_ms: None,
            caught_up_ms: None,
            // The TPC-H views are indexes: no materialized view is appended.
            view_appends_in_flight: None,
            during_outage: false,
        };
        if let Err(e) = crate::cluster::processes::kill_processes(&pids) {
            self.stats.violation(format!("cannot kill {replica}: {e:#}"));
            return;
        }
        let killed = now();
        self.ui.event(&self.stats, &format!("killed {replica} with SIGKILL at time {time}"));
        let mut all = true;
        for query in &self.queries {
            let agreed = self.check(query, Some(replica), time).await;
            if record.answered_peek_ms.is_none() {
                record.answered_peek_ms = Some(killed.elapsed().as_millis() as u64);
            }
            all &= agreed;
        }
        if all {
            record.caught_up_ms = Some(killed.elapsed().as_millis() as u64);
            self.ui.event(
                &self.stats,
                &format!("{replica} answered all 22 views after {:.2} s", killed.elapsed().as_secs_f64()),
            );
        }
        lock(&self.stats.rehydrations).push(record);
    }

    /// Drops one query's dataflow and creates it again under new ids; it must hydrate and agree.
    async fn recreate(&mut self, round: usize) -> anyhow::Result<()> {
        let index = (round * 7) % self.queries.len();
        let old = self.queries[index].clone();
        self.controller.drop_collections(INSTANCE, vec![old.index]).await?;
        let catalog = Catalog { tables: 0, views: VIEWS_STRIDE * round as u64 };
        let new = tpch::all(catalog, 0).swap_remove(index);
        let start = now();
        self.install(&new).await?;
        let time = self.time - 1;
        let agreed = self.check(&new, None, time).await;
        let hydrated_ms = agreed.then(|| start.elapsed().as_millis() as u64);
        lock(&self.stats.recreations).push(Recreation {
            dropped: old.index.to_string(),
            created: new.index.to_string(),
            hydrated_ms,
            state_removed_ms: None,
        });
        self.ui.event(&self.stats, &format!("recreated TPC-H Q{} as {}", new.number, new.index));
        self.queries[index] = new;
        Ok(())
    }
}
