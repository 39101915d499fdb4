//! The cluster scenario's tasks: setup, the table writer, the response pump, the peek loops, the subscribe
//! and materialized-view checkers, the fault schedule (replica kills, dataflow recreation, storage
//! outages), the live display, and the final checks.
//!
//! **Kills land on view appends.** A replica's process 0 appends the materialized view; before a kill the
//! scenario reads that process's `storage_appends_in_flight` gauge until an append is in flight (for up to
//! a second) and then SIGKILLs the replica, recording the reading (the report's `view_appends_in_flight`;
//! 0 when none was seen in time). An outage begins as soon as some replica's gauge shows an append (up to
//! 2 s): the append then waits on the stopped store, and the replica whose gauge shows one during the
//! outage (that one first) is killed, the reading recorded. Outside outages a kill lands within the few
//! milliseconds between the reading and the signal. Lost or doubled rows of the view would show in the next comparison of its
//! collection with the oracle (every 200 ms, and in full at the end).
//!
//! **Outages** (`outage.rs`): the store is taken down for `--outage-secs`; meanwhile peeks at the indexes'
//! readable times (just below the connected replicas' uppers, `CollectionFrontiers::connected_upper`: the
//! replica that was ahead may be the one killed) keep being answered from the replicas' arrangements,
//! checked and counted (the report's `peeks_answered`, by the outage going on when the rows arrived,
//! however late the check; the suite's outage test requires some). A peek not answered within
//! `LOOP_WAIT` (its time was only on the replica killed, with the store down) waits on its own task, and
//! so is a result the write log does not cover yet (the replicas read a write whose acknowledgement the
//! writer still waits for): the loop goes on. Peeks at the latest write pause (its data may be in the stopped store), and
//! one replica is killed as above. After the store is back, the table writer's appends, the subscribe and
//! the view's appends must each resume within `PATIENCE` (else a violation); the oracle comparisons,
//! unchanged, find anything lost or doubled. Peek latencies are kept apart for peeks that overlapped an
//! outage.
//!
//! **Link cuts** (`--netns`, `netns.rs`): every link of one replica (the multi-process one first) is
//! taken down for `--link-cut-secs` and brought back. Meanwhile peeks (untargeted) keep being checked: the
//! victim being unreachable, the other replicas answer them, and their count is reported. After the
//! restore the victim must answer a peek targeted at it at the latest time written before the restore,
//! and every collection on it must pass that time, within `PATIENCE` (else a violation); whether the
//! controller reconnected (the replica's frontiers reset) or the same connection went on is reported.
//!
//! **Sharing.** The controller sits behind a tokio read-write lock: its `&self` calls (peeks, dataflows,
//! inspections) share the read lock, so one that waits for storage (a dataflow created, or a storage
//! peek, while a store is down) holds up no index peek; `try_process` and replica changes need `&mut`.
//! The pump takes the write lock only with `try_write`, every couple of milliseconds: queued behind a
//! reader that waits for storage, it would queue every later reader behind itself. The oracle and the write
//! log sit together behind one std mutex ([`Truth`]), never held across an await. A `watch` of the log's
//! upper lets a check wait until the log covers its time: a replica can see a write a moment before the
//! writer task has logged it.
//!
//! **Invariant.** A result is only ever compared with the oracle at exactly the time it was read at.
//!
//! **Not here:** the oracle's logic (`oracle.rs`), the workload's shape (`workload.rs`), processes
//! (`processes.rs`), printing (`report.rs`). **Tests:** run the scenario.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use tokio::sync::{RwLock, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use controller::{
    ClientSecurity, ComputeController, ComputeControllerResponse, ControllerConfig, ControllerEpoch,
    IntrospectionKind, PeekError, PeekOptions, ProcessEvent, ProcessOrchestrator, wallclock_ms,
};
use frontiers::Antichain;
use protocol::reference::Multiset;
use protocol::{Datum, GlobalId, InstanceId, PeekTarget, ReplicaId, Row, RowSetFinishing, SubscribeResponse};
use storage::blob::BlobConfig;
use storage::consensus::ConsensusConfig;
use storage::{
    ShardCollections, ShardConfig, StorageCollections, SystemClock, TableWriter, TableWriterConfig,
};

use crate::cluster::netns::Network;
use crate::cluster::oracle::{Oracle, WriteLog, canonical, describe_difference, finish};
use crate::cluster::outage::{LocalServices, OutageKind};
use crate::cluster::report::{
    LinkCutReport, OutageReport, Recreation, Rehydration, Stats, Ui, bar, lock, thousands,
};
use crate::cluster::timeline::{FaultKind, TimelineSample};
use crate::cluster::workload::{self, Generator, PeekKind, PeekSpec, Table, Update};
use crate::cluster::{AsOfs, ClusterArgs, now};
use crate::simulation::Rng;

/// The scenario's one compute instance.
pub const INSTANCE: InstanceId = InstanceId(1);

/// Customers and orders of the initial load.
const INITIAL_CUSTOMERS: usize = 1_000;
const INITIAL_ORDERS: usize = 4_000;

/// How often the writer appends.
const WRITE_INTERVAL: Duration = Duration::from_millis(20);

/// How long a check waits for something that should happen (a peek, a catch-up) before it is a violation.
const PATIENCE: Duration = Duration::from_secs(60);

/// The write log and the oracle over it.
#[derive(Debug, Default)]
struct Truth {
    log: WriteLog,
    oracle: Oracle,
}

/// What every task shares.
struct Ctx {
    args: ClusterArgs,
    /// Shared, as the controller's API allows: `&self` calls (peeks, dataflows, inspections) take a
    /// read lock and run side by side, so one waiting for storage (a dataflow created during a storage
    /// outage) holds up no peek; the few `&mut self` calls take the write lock.
    controller: tokio::sync::RwLock<ComputeController>,
    storage: Arc<dyn StorageCollections>,
    /// The local services, which outages take down (`--services local`).
    services: Option<Arc<LocalServices>>,
    /// The network namespaces, whose links cuts take down (`--netns`).
    network: Option<Arc<Network>>,
    orchestrator: Arc<ProcessOrchestrator>,
    truth: Mutex<Truth>,
    /// The write log's upper.
    log_upper: watch::Sender<u64>,
    /// Set when the timed run ends: peeks, checks and faults stop.
    stop: watch::Sender<bool>,
    /// Set when the writer should stop (after the run).
    stop_writer: watch::Sender<bool>,
    /// Set by the writer once it stopped: its last append has landed (or failed).
    writer_stopped: watch::Sender<bool>,
    /// The current `status_summary` index; write-locked while it is dropped and recreated.
    status_summary: Arc<RwLock<Option<GlobalId>>>,
    /// The number of customers written (ids `1..=n`).
    customers: AtomicI64,
    as_ofs: Mutex<AsOfs>,
    /// Everything before this was delivered by the subscribe and checked.
    subscribe_upper: AtomicU64,
    /// The last time each replica's processes were (re)started, from the orchestrator's events.
    restarts: Mutex<BTreeMap<ReplicaId, Instant>>,
    /// What the display says about each replica.
    replica_state: Mutex<BTreeMap<ReplicaId, String>>,
    /// Why the run cannot go on (the table writer failed), if it cannot.
    fatal: Mutex<Option<String>>,
    stats: Arc<Stats>,
    ui: Arc<Ui>,
}

impl Ctx {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Waits until the write log covers `time` (bounded: the writer may have stopped below it).
    async fn covered(&self, time: u64) -> bool {
        let mut rx = self.log_upper.subscribe();
        tokio::time::timeout(PATIENCE, rx.wait_for(|upper| *upper > time)).await.is_ok_and(|r| r.is_ok())
    }

    /// Runs `f` on the oracle at `time`, once the log covers it.
    async fn at<R>(&self, time: u64, f: impl FnOnce(&Oracle) -> R) -> Option<R> {
        if !self.covered(time).await {
            self.stats
                .violation(format!("the write log never reached time {time}, which a result was read at"));
            return None;
        }
        let mut truth = lock(&self.truth);
        let Truth { log, oracle } = &mut *truth;
        oracle.seek(log, time);
        Some(f(oracle))
    }

    /// The latest time the table writer acknowledged.
    fn latest_write(&self) -> u64 {
        self.log_upper.borrow().saturating_sub(1)
    }

    /// Sleeps for `duration`, or less if the run stops; returns whether it is stopping.
    async fn sleep(&self, duration: Duration) -> bool {
        let mut stop = self.stop.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(duration) => self.stopping(),
            _ = stop.wait_for(|s| *s) => true,
        }
    }

    /// The exports the scenario currently maintains, with their as-ofs.
    fn live_exports(&self) -> AsOfs {
        lock(&self.as_ofs).clone()
    }
}

fn first(frontier: &Antichain<u64>) -> Option<u64> {
    frontier.as_option().copied()
}

fn ms(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

/// Groups updates by table for one atomic append.
fn by_table(updates: &[Update]) -> Vec<(GlobalId, Vec<(Row, i64)>)> {
    let mut grouped: BTreeMap<GlobalId, Vec<(Row, i64)>> = BTreeMap::new();
    for update in updates {
        grouped.entry(update.table.id()).or_default().push((update.row.clone(), update.diff));
    }
    grouped.into_iter().collect()
}

/// Where this process finds storage.
#[derive(Debug, Clone)]
pub enum ScenarioStorage {
    /// The shards: the controller and the table writer each open them, as separate processes would (the
    /// controller's holds are a critical reader, `critical-controller`; the writer's a leased one).
    Shards {
        /// The blob store.
        blob: BlobConfig,
        /// The consensus store.
        consensus: ConsensusConfig,
        /// `ShardConfig::inline_part_bytes` (`None`: the engine's default).
        inline_part_bytes: Option<usize>,
    },
}

/// The controller's storage, the table writer's, and the shard engines to shut down at the end.
pub(crate) type Opened = (Arc<dyn StorageCollections>, Arc<dyn StorageCollections>, Vec<ShardCollections>);

/// Opens the shards (twice: for the controller and for the table writer); they must not hold any of `fresh` yet
/// (the scenario's collections: a store used by an earlier run would contradict the oracle).
pub(crate) async fn open_storage(storage: &ScenarioStorage, fresh: &[GlobalId]) -> anyhow::Result<Opened> {
    match storage {
        ScenarioStorage::Shards { blob, consensus, inline_part_bytes } => {
            let poll_interval = Duration::from_millis(crate::cluster::SHARD_POLL_INTERVAL_MS);
            let defaults = ShardConfig::default();
            let inline_part_bytes = inline_part_bytes.unwrap_or(defaults.inline_part_bytes);
            let config = ShardConfig { poll_interval, inline_part_bytes, ..defaults };
            let controller_config =
                ShardConfig { critical_reader: Some("controller".to_string()), ..config.clone() };
            let controller = ShardCollections::open(blob, consensus, controller_config)
                .await
                .context("the controller cannot open the shards")?;
            let writer = ShardCollections::open(blob, consensus, config)
                .await
                .context("the table writer cannot open the shards")?;
            for &id in fresh {
                let existing = controller.state(id).await.context("cannot read the shards")?;
                if existing.is_some() {
                    bail!(
                        "the shard stores already hold collection {id} from an earlier run: point --blob and \
                         --consensus at empty stores"
                    );
                }
            }
            Ok((Arc::new(controller.clone()), Arc::new(writer.clone()), vec![controller, writer]))
        }
    }
}

/// The whole scenario after its processes exist: setup, hydration, the timed run, the end checks.
// The run's parts, each its own: a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub async fn scenario(
    args: ClusterArgs,
    storage: ScenarioStorage,
    services: Option<Arc<LocalServices>>,
    network: Option<Arc<Network>>,
    security: ClientSecurity,
    orchestrator: Arc<ProcessOrchestrator>,
    process_events: mpsc::UnboundedReceiver<ProcessEvent>,
    stats: Arc<Stats>,
    ui: Arc<Ui>,
) -> anyhow::Result<()> {
    let fresh: Vec<GlobalId> = Table::ALL.iter().map(|t| t.id()).chain([workload::STATUS_REVENUE]).collect();
    let (storage, writer_storage, shards) = open_storage(&storage, &fresh).await?;
    let parts = Parts { storage, writer_storage, services, network, security, orchestrator, stats, ui };
    let result = scenario_on(args, parts, process_events).await;
    for engine in shards {
        // Releases the leased readers rather than leaving them to expire.
        engine.shutdown().await;
    }
    result
}

/// What [`scenario_on`] runs on.
struct Parts {
    storage: Arc<dyn StorageCollections>,
    writer_storage: Arc<dyn StorageCollections>,
    services: Option<Arc<LocalServices>>,
    network: Option<Arc<Network>>,
    security: ClientSecurity,
    orchestrator: Arc<ProcessOrchestrator>,
    stats: Arc<Stats>,
    ui: Arc<Ui>,
}

async fn scenario_on(
    args: ClusterArgs,
    parts: Parts,
    mut process_events: mpsc::UnboundedReceiver<ProcessEvent>,
) -> anyhow::Result<()> {
    let Parts { storage, writer_storage, services, network, security, orchestrator, stats, ui } = parts;
    assert!(
        args.outage_count() == 0 || services.is_some(),
        "outages are refused where the scenario did not start the services"
    );
    assert!(args.link_cut_count() == 0 || network.is_some(), "link cuts are refused without --netns");
    // Storage: the tables, the materialized view's collection, and the initial load.
    for table in Table::ALL {
        storage
            .create_collection(table.id(), table.desc())
            .await
            .with_context(|| format!("cannot create {table:?}"))?;
    }
    storage
        .create_collection(workload::STATUS_REVENUE, workload::status_revenue_desc())
        .await
        .context("cannot create the materialized view's collection")?;
    let writer =
        Arc::new(TableWriter::new(writer_storage, Arc::new(SystemClock), TableWriterConfig::default()));
    for table in Table::ALL {
        writer.register(table.id()).await.context("cannot register a table")?;
    }
    let mut rng = Rng::new(args.seed);
    let mut generator = Generator::new(rng.fork());
    let initial = generator.initial(INITIAL_CUSTOMERS, INITIAL_ORDERS);
    let time = writer.write(by_table(&initial)).await.context("the initial load failed")?;
    stats.rows_loaded.store(initial.len() as u64, Ordering::SeqCst);
    let mut truth = Truth::default();
    truth.log.push(time, initial);
    let (log_upper, _) = watch::channel(truth.log.upper());
    ui.say(&format!(
        "loaded {} customers, {} orders and their line items ({} rows)",
        thousands(INITIAL_CUSTOMERS as u64),
        thousands(INITIAL_ORDERS as u64),
        thousands(stats.rows_loaded.load(Ordering::SeqCst))
    ));

    // The controller, the instance and its replicas.
    // The only controller of its replicas: epoch 1.
    let mut config = ControllerConfig::new(ControllerEpoch(1), security);
    if args.netns {
        // A replica cut off the network goes silent: noticed after a few keepalives (`netns.rs`).
        config.replica_keepalive_interval_ms = crate::cluster::netns::KEEPALIVE_INTERVAL_MS;
        config.replica_idle_timeout_ms = crate::cluster::netns::IDLE_TIMEOUT_MS;
    }
    let mut controller = ComputeController::new(
        Arc::clone(&storage),
        Some(Arc::clone(&orchestrator) as Arc<dyn controller::Orchestrator>),
        config,
    )
    .await
    .map_err(|e| anyhow!("cannot start the controller: {e}"))?;
    controller.create_instance(INSTANCE, controller.default_instance_config())?;
    controller.allow_writes(INSTANCE).await?;
    for (replica, processes) in args.replica_specs() {
        controller
            .add_replica(
                INSTANCE,
                replica,
                controller::ReplicaLocation::Managed { workers: args.workers, processes },
            )
            .await
            .with_context(|| format!("cannot start replica {replica}"))?;
    }
    let metrics_server = serve_metrics(&args, &controller, &orchestrator, &ui).await?;
    let mut as_ofs = AsOfs::new();
    for desc in workload::initial_dataflows() {
        let exports: Vec<GlobalId> = desc.export_ids().collect();
        let name = desc.debug_name.clone();
        let as_of = controller
            .create_dataflow(INSTANCE, desc)
            .await
            .with_context(|| format!("cannot create {name}"))?;
        let as_of = first(&as_of).ok_or_else(|| anyhow!("{name} got an empty as-of"))?;
        for id in exports {
            as_ofs.insert(id, as_of);
        }
    }
    let ctx = Arc::new(Ctx {
        args: args.clone(),
        controller: tokio::sync::RwLock::new(controller),
        storage,
        services,
        network,
        orchestrator,
        truth: Mutex::new(truth),
        log_upper,
        stop: watch::channel(false).0,
        stop_writer: watch::channel(false).0,
        writer_stopped: watch::channel(false).0,
        status_summary: Arc::new(RwLock::new(Some(workload::status_summary_id(0)))),
        customers: AtomicI64::new(generator.customer_count()),
        as_ofs: Mutex::new(as_ofs),
        subscribe_upper: AtomicU64::new(0),
        restarts: Mutex::new(BTreeMap::new()),
        replica_state: Mutex::new(
            args.replica_specs().into_iter().map(|(r, _)| (r, "hydrating".to_string())).collect(),
        ),
        fatal: Mutex::new(None),
        stats,
        ui,
    });

    // Background tasks that run from now to the end.
    let (subscribe_tx, subscribe_rx) = mpsc::unbounded_channel();
    let mut background: Vec<JoinHandle<()>> = Vec::new();
    background.push(tokio::spawn(pump(Arc::clone(&ctx), subscribe_tx)));
    background.push(tokio::spawn(check_subscribe(Arc::clone(&ctx), subscribe_rx)));
    {
        let ctx = Arc::clone(&ctx);
        background.push(tokio::spawn(async move {
            while let Some(event) = process_events.recv().await {
                on_process_event(&ctx, event);
            }
        }));
    }
    let writer_task = tokio::spawn(write(Arc::clone(&ctx), writer, generator));

    let outcome = run_phases(&ctx, &mut rng).await;
    if let Some(dir) = &ctx.args.report {
        scrape_metrics(&ctx, metrics_server.local_addr(), &dir.join("metrics")).await;
    }
    drop(metrics_server);

    // Whatever happened, stop everything this function started.
    ctx.stop.send_replace(true);
    ctx.stop_writer.send_replace(true);
    let writer_result = writer_task.await;
    for task in background {
        task.abort();
    }
    outcome?;
    match writer_result {
        Ok(result) => result,
        Err(e) => bail!("the writer task failed: {e}"),
    }
}

/// Hydration, the timed run, and the end.
async fn run_phases(ctx: &Arc<Ctx>, rng: &mut Rng) -> anyhow::Result<()> {
    hydrate(ctx).await?;
    *lock(&ctx.stats.started) = Some(now());
    ctx.ui.say(&format!(
        "running for {:.0} s: {} rows/s into 3 tables, {} peek loops, {} replica crash(es), {} dataflow recreation(s), {} storage outage(s), {} link cut(s)",
        ctx.args.duration.as_secs_f64(),
        ctx.args.rate,
        ctx.args.peekers,
        ctx.args.kill_count(),
        ctx.args.recreations,
        ctx.args.outage_count(),
        ctx.args.link_cut_count()
    ));
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    for _ in 0..ctx.args.peekers {
        tasks.push(tokio::spawn(peek_loop(Arc::clone(ctx), rng.fork())));
    }
    tasks.push(tokio::spawn(check_materialized_view(Arc::clone(ctx))));
    let display = tokio::spawn(display(Arc::clone(ctx)));
    tasks.push(tokio::spawn(sample(Arc::clone(ctx))));
    let faults = tokio::spawn(faults(Arc::clone(ctx)));

    ctx.sleep(ctx.args.duration).await;
    ctx.stop.send_replace(true);
    for task in tasks {
        task.await.map_err(|e| anyhow!("a check task failed: {e}"))?;
    }
    // A fault in progress finishes (each step is bounded by `PATIENCE`).
    if !faults.is_finished() {
        ctx.ui.event(&ctx.stats, "waiting for the fault in progress to finish");
    }
    faults.await.map_err(|e| anyhow!("the fault task failed: {e}"))?;
    let elapsed = ctx.stats.elapsed_s();
    ctx.stop_writer.send_replace(true);
    if let Some(fatal) = lock(&ctx.fatal).clone() {
        *lock(&ctx.stats.finished_s) = Some(elapsed);
        display.abort();
        bail!(fatal);
    }
    // The writer finishes its last append (it may be slow: behind a lock, or a store coming back), so
    // that the last write is final before everything is checked against it.
    let mut stopped = ctx.writer_stopped.subscribe();
    if tokio::time::timeout(PATIENCE, stopped.wait_for(|s| *s)).await.is_err() {
        ctx.stats.violation(format!(
            "liveness: the table writer's last append did not end within {} s",
            PATIENCE.as_secs()
        ));
    }
    // The report's duration is the timed run's.
    *lock(&ctx.stats.finished_s) = Some(elapsed);
    let result = final_checks(ctx).await;
    display.abort();
    ctx.ui.clear();
    result
}

// -------------------------------------------------------------------------------------------------
// Writing

/// Writes table changes at the configured rate until told to stop; a failed write ends the run.
async fn write(ctx: Arc<Ctx>, writer: Arc<TableWriter>, generator: Generator) -> anyhow::Result<()> {
    let result = write_at_rate(&ctx, &writer, generator).await;
    ctx.writer_stopped.send_replace(true);
    if let Err(e) = &result {
        ctx.ui.event(&ctx.stats, &format!("the table writer failed: {e:#}; stopping"));
        *lock(&ctx.fatal) = Some(format!("the table writer failed: {e:#}"));
        ctx.stop.send_replace(true);
    }
    result
}

async fn write_at_rate(ctx: &Ctx, writer: &TableWriter, mut generator: Generator) -> anyhow::Result<()> {
    let started = now();
    let mut produced: u64 = 0;
    let mut interval = tokio::time::interval(WRITE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stop = ctx.stop_writer.subscribe();
    let rate = ctx.args.rate;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let target = (rate as f64 * started.elapsed().as_secs_f64()) as u64;
        // At most a fifth of a second's worth per append, so a slow append does not snowball.
        let due = target.saturating_sub(produced).min((rate / 5).max(1));
        if due == 0 {
            let upper = writer.tick().await.context("a table tick failed")?;
            let mut truth = lock(&ctx.truth);
            truth.log.advance(upper);
            ctx.log_upper.send_replace(truth.log.upper());
            continue;
        }
        let updates = generator.changes(due as usize);
        let count = updates.len() as u64;
        let time = writer.write(by_table(&updates)).await.context("a table write failed")?;
        produced += count;
        {
            let mut truth = lock(&ctx.truth);
            truth.log.push(time, updates);
            ctx.log_upper.send_replace(truth.log.upper());
        }
        ctx.customers.store(generator.customer_count(), Ordering::SeqCst);
        if lock(&ctx.stats.started).is_some() && !ctx.stopping() {
            ctx.stats.rows_written.fetch_add(count, Ordering::Relaxed);
            ctx.stats.appends.fetch_add(1, Ordering::Relaxed);
        }
    }
    info!(produced, orders = generator.order_count(), "writer stopped");
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// Responses

/// Drains the controller's responses: subscribe batches go to their checker.
async fn pump(ctx: Arc<Ctx>, subscribe: mpsc::UnboundedSender<SubscribeResponse>) {
    loop {
        tokio::time::sleep(Duration::from_millis(2)).await;
        // Not `write().await`: queued behind a reader that waits for storage, it would queue every
        // later reader (peeks) behind itself. Responses wait in the controller's channel meanwhile.
        let Ok(mut controller) = ctx.controller.try_write() else { continue };
        while let Some(response) = controller.try_process() {
            if let ComputeControllerResponse::SubscribeResponse { id, response } = response
                && id == workload::NATION_SUBSCRIBE
            {
                let _ = subscribe.send(response);
            }
        }
    }
}

fn on_process_event(ctx: &Ctx, event: ProcessEvent) {
    match event {
        ProcessEvent::Running { replica, pids, .. } => {
            lock(&ctx.stats.child_pids).extend(pids.iter().copied());
            let restarted = lock(&ctx.restarts).insert(replica, now()).is_some();
            if restarted {
                let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
                ctx.ui.event(
                    &ctx.stats,
                    &format!("{replica} restarted by the orchestrator (pids {})", pids.join(" ")),
                );
                lock(&ctx.replica_state).insert(replica, "rehydrating".to_string());
            }
        }
        ProcessEvent::Crashed { replica, status, restart_in_ms, .. } => {
            if !status.contains("SIGKILL") {
                ctx.stats.replica_exits.fetch_add(1, Ordering::Relaxed);
            }
            ctx.ui
                .event(&ctx.stats, &format!("{replica} exited ({status}); restarting in {restart_in_ms} ms"));
            lock(&ctx.replica_state).insert(replica, "down".to_string());
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Hydration

/// How many (replica, export) pairs are hydrated: the replica's write frontier passed the export's as-of.
async fn hydrated_pairs(
    ctx: &Ctx,
    replicas: &[ReplicaId],
    exports: &AsOfs,
) -> anyhow::Result<(usize, usize)> {
    let total = replicas.len() * exports.len();
    let (replicas, exports) = (replicas.to_vec(), exports.clone());
    let controller = ctx.controller.read().await;
    let count = controller
        .inspect(INSTANCE, move |core| {
            let mut done = 0;
            for replica in &replicas {
                for (id, as_of) in &exports {
                    if core.replica_write_frontier(*replica, *id).is_some_and(|f| !f.less_equal(as_of)) {
                        done += 1;
                    }
                }
            }
            done
        })
        .await?;
    Ok((count, total))
}

async fn hydrate(ctx: &Arc<Ctx>) -> anyhow::Result<()> {
    let started = now();
    let replicas: Vec<ReplicaId> = ctx.args.replica_specs().into_iter().map(|(r, _)| r).collect();
    let exports = ctx.live_exports();
    ctx.ui.say(&format!("hydrating {} exports on {} replicas", exports.len(), replicas.len()));
    loop {
        let (done, total) = hydrated_pairs(ctx, &replicas, &exports).await?;
        ctx.ui.live(&format!(
            "  hydrating {} {done}/{total} (export, replica) pairs  {:.1} s",
            bar(done, total, 30),
            started.elapsed().as_secs_f64()
        ));
        if done == total {
            break;
        }
        if started.elapsed() > PATIENCE * 5 {
            bail!("hydration did not finish within {} s ({done}/{total})", (PATIENCE * 5).as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ctx.ui.clear();
    let took = started.elapsed();
    *lock(&ctx.stats.hydration_ms) = Some(ms(took));
    for state in lock(&ctx.replica_state).values_mut() {
        *state = "ready".to_string();
    }
    ctx.ui.say(&format!(
        "hydrated {} exports on {} replicas in {:.2} s",
        exports.len(),
        replicas.len(),
        took.as_secs_f64()
    ));
    Ok(())
}

// -------------------------------------------------------------------------------------------------
// Peeks

/// What happened to one peek.
enum Peeked {
    /// Rows.
    Rows(Vec<(Row, std::num::NonZeroU64)>),
    /// Not issued: the time is not readable (yet).
    Unreadable,
}

/// Peeks an index (or, with `target`, one replica of it) at `time` and waits for the answer.
async fn peek_index(
    ctx: &Ctx,
    id: GlobalId,
    time: u64,
    spec: &PeekSpec,
    target: Option<ReplicaId>,
    timeout: Duration,
) -> Result<Peeked, String> {
    match submit_peek(ctx, id, time, spec, target, timeout).await? {
        Some(submitted) => submitted.answer().await.map(|(rows, _)| Peeked::Rows(rows)),
        None => Ok(Peeked::Unreadable),
    }
}

/// A peek the controller took, waiting for its answer.
struct Submitted {
    id: GlobalId,
    time: u64,
    started: Instant,
    handle: controller::PeekHandle,
}

impl Submitted {
    /// Waits for the answer: the rows, and how long from the call to the answer.
    async fn answer(self) -> Result<(Vec<(Row, std::num::NonZeroU64)>, Duration), String> {
        let Submitted { id, time, started, handle } = self;
        let response = handle.result().await;
        tracing::debug!(%id, total_us = started.elapsed().as_micros() as u64, "peek answered");
        match response {
            Ok(rows) => Ok((rows, started.elapsed())),
            Err(failure) => Err(format!("peek of {id} at {time} failed: {failure}")),
        }
    }
}

/// Gives the controller a peek of an index (or, with `target`, one replica of it) at `time`; `None` if
/// the time is not readable (yet).
async fn submit_peek(
    ctx: &Ctx,
    id: GlobalId,
    time: u64,
    spec: &PeekSpec,
    target: Option<ReplicaId>,
    timeout: Duration,
) -> Result<Option<Submitted>, String> {
    let options = PeekOptions {
        literal_constraints: spec.literal_constraints.clone(),
        map_filter_project: spec.map_filter_project.clone(),
        finishing: spec.finishing.clone(),
        target_replica: target,
        timeout_ms: Some(ms(timeout)),
    };
    let started = now();
    let (handle, locked, submitted) = {
        let controller = ctx.controller.read().await;
        let locked = started.elapsed();
        let handle = controller.peek(INSTANCE, PeekTarget::Index { id }, time, options).await;
        (handle, locked, started.elapsed())
    };
    tracing::debug!(
        %id,
        lock_us = locked.as_micros() as u64,
        submit_us = submitted.as_micros() as u64,
        "peek submitted"
    );
    match handle {
        Ok(handle) => Ok(Some(Submitted { id, time, started, handle })),
        Err(PeekError::SinceViolation { .. }) => Ok(None),
        Err(e) => Err(format!("peek of {id} at {time} refused: {e}")),
    }
}

/// Compares a peek's rows with the oracle's at `time`; records a violation naming `what` if they differ.
async fn check_rows(
    ctx: &Ctx,
    what: &str,
    time: u64,
    spec: &PeekSpec,
    rows: Vec<(Row, std::num::NonZeroU64)>,
) -> bool {
    let actual = canonical(rows, spec);
    let Some(expected) = ctx.at(time, |oracle| oracle.expected(spec)).await else { return false };
    match expected {
        Ok(expected) if expected == actual => true,
        Ok(expected) => {
            ctx.stats.violation(format!("{what} at {time}: {}", describe_difference(&expected, &actual)));
            false
        }
        Err(e) => {
            ctx.stats.violation(format!("{what} at {time}: the oracle failed: {e}"));
            false
        }
    }
}

/// One loop of peeks at the latest time, each checked against the oracle.
async fn peek_loop(ctx: Arc<Ctx>, mut rng: Rng) {
    let interval = Duration::from_millis(ctx.args.peek_interval_ms);
    let deferred = Arc::new(tokio::sync::Semaphore::new(MAX_DEFERRED_CHECKS));
    while !ctx.stopping() {
        let kind = PeekKind::pick(&mut rng);
        // One in ten peeks asks for the latest written time, waiting for the dataflow to get there; not
        // during a storage outage, where the latest write's data may sit in the stopped store until it
        // returns (such a peek would measure the outage, and hold up its loop's index peeks).
        let fresh = rng.chance(0.1) && !ctx.stats.outage_marker().0;
        let customers = ctx.customers.load(Ordering::Relaxed).max(1);
        let customer = rng.range(1, customers as u64 + 5) as i64;
        let spec = PeekSpec::new(kind, customer);
        // Keeps a recreation of `status_summary` from dropping it under the peek (owned: the wait for the
        // answer may move to a task of its own).
        let guard = Arc::clone(&ctx.status_summary).try_read_owned();
        let id = match kind {
            PeekKind::StatusSummary => match guard.as_ref().ok().and_then(|current| **current) {
                Some(id) => id,
                None => {
                    // Being recreated: peek something else.
                    tokio::task::yield_now().await;
                    continue;
                }
            },
            other => other.index(workload::status_summary_id(0)),
        };
        let frontiers = ctx.controller.read().await.collection_frontiers(INSTANCE, id);
        let frontiers = match frontiers {
            Ok(frontiers) => frontiers,
            Err(e) => {
                ctx.stats.violation(format!("{} ({id}): no frontiers: {e}", kind.name()));
                ctx.sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (Some(_), Some(since)) = (first(&frontiers.upper), first(&frontiers.since)) else {
            ctx.stats.violation(format!("{} ({id}) is closed: {frontiers:?}", kind.name()));
            continue;
        };
        // The latest time a replica connected now has complete: the collection's upper may be ahead of
        // every one of them when the replica that was ahead went (killed, or cut off), and a peek there
        // waits for another to catch up, which in a storage outage means until the store returns.
        let readable = first(&frontiers.connected_upper).unwrap_or(u64::MAX);
        let time = if fresh { ctx.latest_write() } else { readable.saturating_sub(1) };
        if readable == 0 || time < since {
            ctx.stats.peeks_skipped.fetch_add(1, Ordering::Relaxed);
            ctx.sleep(interval.max(Duration::from_millis(5))).await;
            continue;
        }
        let what = format!("{} ({id})", kind.name());
        let outages = ctx.stats.outage_marker();
        match submit_peek(&ctx, id, time, &spec, None, Duration::from_secs(30)).await {
            Ok(Some(submitted)) => {
                let peek = LoopPeek { kind, fresh, spec, what, time, outages, guard };
                let mut answer = Box::pin(submitted.answer());
                // A peek not answered within `LOOP_WAIT` (one at a time the replica that was ahead had,
                // when that replica died with the store down) waits on its own task, and the loop goes on.
                match tokio::time::timeout(LOOP_WAIT, &mut answer).await {
                    Ok(answered) => peek.finish(&ctx, answered, Some(&deferred)).await,
                    Err(_) => {
                        let permit = Arc::clone(&deferred).acquire_owned().await.expect("never closed");
                        let ctx = Arc::clone(&ctx);
                        tokio::spawn(async move {
                            let _permit = permit;
                            let answered = answer.await;
                            peek.finish(&ctx, answered, None).await;
                        });
                    }
                }
            }
            Ok(None) => {
                drop(guard);
                ctx.stats.peeks_skipped.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => ctx.stats.violation(format!("{what}: {e}")),
        }
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
    }
    // Every deferred check ends (within `PATIENCE`) before the loop does: none goes unreported.
    let _ = deferred.acquire_many(MAX_DEFERRED_CHECKS as u32).await;
}

/// The most peeks one loop keeps waiting on tasks of their own, for their answer or for the write log
/// to cover their time (see [`peek_loop`]).
const MAX_DEFERRED_CHECKS: usize = 4_096;

/// How long a peek loop waits for an answer before the wait moves to a task of its own. Answers take
/// about 10 ms on a loaded machine, and peeks at the latest write up to a few hundred.
const LOOP_WAIT: Duration = Duration::from_millis(250);

/// A peek of a peek loop, from its submission to its check.
struct LoopPeek {
    kind: PeekKind,
    fresh: bool,
    spec: PeekSpec,
    what: String,
    time: u64,
    /// Where outages stood when it was submitted.
    outages: (bool, u64),
    /// The read lock on the current `status_summary` id, held until the answer.
    guard: Result<tokio::sync::OwnedRwLockReadGuard<Option<GlobalId>>, tokio::sync::TryLockError>,
}

impl LoopPeek {
    /// Checks the answer against the oracle and counts it. The oracle checks a result once the write log
    /// covers its time. In a storage outage the replicas may have read a write whose acknowledgement the
    /// table writer still waits for: then, with `deferred` (the loop's bound on what waits on tasks of
    /// its own), the check waits on a task of its own and the loop goes on; without it (already on such
    /// a task) it waits here.
    async fn finish(
        self,
        ctx: &Arc<Ctx>,
        answered: Result<(Vec<(Row, std::num::NonZeroU64)>, Duration), String>,
        deferred: Option<&Arc<tokio::sync::Semaphore>>,
    ) {
        let LoopPeek { kind, fresh, spec, what, time, outages, guard } = self;
        drop(guard);
        let (rows, latency) = match answered {
            Ok(answer) => answer,
            Err(e) => {
                ctx.stats.violation(format!("{what}: {e}"));
                return;
            }
        };
        let during_outage = ctx.stats.overlapped_outage(outages);
        // An outage's count of peeks answered takes the outage going on as the rows arrived.
        let answered_at = ctx.stats.outage_marker();
        let check = {
            let ctx = Arc::clone(ctx);
            async move {
                if check_rows(&ctx, &what, time, &spec, rows).await {
                    ctx.stats.peek(kind.name(), fresh, latency, during_outage);
                    ctx.stats.peek_answered(answered_at);
                }
            }
        };
        match deferred {
            Some(deferred) if *ctx.log_upper.borrow() <= time => {
                let permit = Arc::clone(deferred).acquire_owned().await.expect("never closed");
                tokio::spawn(async move {
                    let _permit = permit;
                    check.await;
                });
            }
            _ => check.await,
        }
    }
}

// -------------------------------------------------------------------------------------------------
// The subscribe and the materialized view

/// Checks every subscribe batch: contiguous with the last one, times inside its range, and the
/// accumulated contents equal to the oracle's `revenue_by_nation` just before its upper.
async fn check_subscribe(ctx: Arc<Ctx>, mut batches: mpsc::UnboundedReceiver<SubscribeResponse>) {
    let as_of = lock(&ctx.as_ofs).get(&workload::NATION_SUBSCRIBE).copied().unwrap_or(0);
    let mut expected_lower = Antichain::from_elem(as_of);
    let mut contents = Multiset::new();
    let spec = PeekSpec::new(PeekKind::NationRevenue, 0);
    while let Some(response) = batches.recv().await {
        let batch = match response {
            SubscribeResponse::Batch(batch) => batch,
            SubscribeResponse::DroppedAt(_) => return,
        };
        if batch.lower != expected_lower {
            ctx.stats.violation(format!(
                "subscribe: batch [{:?}, {:?}) does not start where the last one ended ({:?}): a gap or a repeat",
                batch.lower.elements(),
                batch.upper.elements(),
                expected_lower.elements()
            ));
        }
        let updates = match batch.updates {
            Ok(updates) => updates,
            Err(e) => {
                ctx.stats.violation(format!("subscribe: batch carries an error: {e}"));
                continue;
            }
        };
        ctx.stats.subscribe_updates.fetch_add(updates.len() as u64, Ordering::Relaxed);
        for (time, row, diff) in updates {
            if !batch.lower.less_equal(&time) || batch.upper.less_equal(&time) {
                ctx.stats.violation(format!(
                    "subscribe: update at {time} outside its batch [{:?}, {:?})",
                    batch.lower.elements(),
                    batch.upper.elements()
                ));
            }
            let entry = contents.entry(row).or_insert(0);
            *entry += diff;
        }
        contents.retain(|_, d| *d != 0);
        expected_lower = batch.upper.clone();
        let Some(upper) = first(&batch.upper) else { return };
        let rows: Vec<(Row, std::num::NonZeroU64)> = match contents
            .iter()
            .map(|(r, d)| {
                u64::try_from(*d)
                    .ok()
                    .and_then(std::num::NonZeroU64::new)
                    .map(|n| (r.clone(), n))
                    .ok_or((r, d))
            })
            .collect()
        {
            Ok(rows) => rows,
            Err((row, diff)) => {
                ctx.stats.violation(format!("subscribe: ({row}) accumulated to {diff} by {upper}"));
                continue;
            }
        };
        if check_rows(&ctx, "subscribe to revenue_by_nation", upper - 1, &spec, rows).await {
            ctx.stats.subscribe_batches.fetch_add(1, Ordering::Relaxed);
        }
        ctx.subscribe_upper.store(upper, Ordering::SeqCst);
    }
}

/// Reads the materialized view's storage collection at its latest readable time and compares.
async fn check_mv_once(ctx: &Ctx) -> anyhow::Result<Option<u64>> {
    let as_of = lock(&ctx.as_ofs).get(&workload::STATUS_REVENUE_SINK).copied().unwrap_or(0);
    let frontiers = ctx.storage.frontiers(workload::STATUS_REVENUE).await?;
    let (Some(upper), Some(since)) = (first(&frontiers.upper), first(&frontiers.since)) else {
        bail!("the materialized view's collection is closed: {frontiers:?}");
    };
    let time = upper.saturating_sub(1);
    if upper == 0 || time < as_of || time < since {
        return Ok(None);
    }
    // This process's own hold at `time`, taken first: the controller's storage peek then takes its hold
    // locally (the shards' registered reader covers it), not through a consensus store that may be down.
    let hold = match ctx.storage.acquire_read_hold(workload::STATUS_REVENUE, Antichain::from_elem(time)).await
    {
        Ok(hold) => hold,
        Err(storage::HoldError::BeforeSince { .. }) => return Ok(None),
        Err(e) => bail!("cannot hold the materialized view at {time}: {e}"),
    };
    let handle = {
        let controller = ctx.controller.read().await;
        controller
            .peek(
                INSTANCE,
                PeekTarget::Storage { id: workload::STATUS_REVENUE },
                time,
                PeekOptions::default(),
            )
            .await
    };
    drop(hold);
    let handle = match handle {
        Ok(handle) => handle,
        Err(PeekError::SinceViolation { .. }) => return Ok(None),
        Err(e) => bail!("storage peek refused: {e}"),
    };
    let rows = match handle.result().await {
        Ok(rows) => rows,
        Err(failure) => bail!("storage peek at {time} failed: {failure}"),
    };
    let spec = PeekSpec {
        kind: PeekKind::StatusSummary,
        customer: None,
        literal_constraints: None,
        map_filter_project: None,
        finishing: RowSetFinishing::unordered(),
    };
    let actual = canonical(rows, &spec);
    let expected = ctx.at(time, |oracle| finish(&oracle.status_revenue(), &spec)).await;
    match expected {
        Some(Ok(expected)) if expected == actual => {
            ctx.stats.storage_peeks.fetch_add(1, Ordering::Relaxed);
        }
        Some(Ok(expected)) => ctx.stats.violation(format!(
            "materialized view status_revenue at {time}: {}",
            describe_difference(&expected, &actual)
        )),
        Some(Err(e)) => ctx.stats.violation(format!("materialized view: the oracle failed: {e}")),
        None => {}
    }
    Ok(Some(upper))
}

async fn check_materialized_view(ctx: Arc<Ctx>) {
    while !ctx.sleep(Duration::from_millis(200)).await {
        if let Err(e) = check_mv_once(&ctx).await {
            ctx.stats.violation(format!("materialized view status_revenue: {e:#}"));
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Faults

#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill(ReplicaId),
    Recreate,
    /// Add a fresh replica, time its hydration, drop it: the baseline for rehydration.
    FreshReplica,
    /// Take a store down for `--outage-secs` (`outage.rs`).
    Outage(OutageKind),
    /// Take a replica's links down for `--link-cut-secs` (`netns.rs`).
    LinkCut(ReplicaId),
}

/// The fault schedule: kills and recreations spread over the run, alternating, never overlapping.
fn schedule(args: &ClusterArgs) -> Vec<(f64, Fault)> {
    let specs = args.replica_specs();
    // The multi-process replica first: the most interesting to lose.
    let mut victims: Vec<ReplicaId> = specs
        .iter()
        .filter(|(_, p)| *p > 1)
        .chain(specs.iter().filter(|(_, p)| *p == 1))
        .map(|(r, _)| *r)
        .collect();
    victims.dedup();
    let mut faults: Vec<Fault> = Vec::new();
    let (mut kills, mut recreations) = (args.kill_count(), args.recreations);
    let mut next_victim = 0;
    while kills + recreations > 0 {
        if recreations > 0 && (recreations >= kills || kills == 0) {
            faults.push(Fault::Recreate);
            recreations -= 1;
        }
        if kills > 0 {
            faults.push(Fault::Kill(victims[next_victim % victims.len()]));
            if next_victim == 0 {
                faults.push(Fault::FreshReplica);
            }
            next_victim += 1;
            kills -= 1;
        }
    }
    // Outages spread among the others, then link cuts (their victims in the same order as the kills').
    let outages = args.outage_count();
    for i in (0..outages).rev() {
        let at = ((i + 1) * (faults.len() + 1)).div_ceil(outages + 1).min(faults.len());
        faults.insert(at, Fault::Outage(OutageKind::nth(i)));
    }
    let cuts = args.link_cut_count();
    for i in (0..cuts).rev() {
        let at = ((i + 1) * (faults.len() + 1)).div_ceil(cuts + 1).min(faults.len());
        faults.insert(at, Fault::LinkCut(victims[i % victims.len()]));
    }
    let n = faults.len() as f64;
    faults.into_iter().enumerate().map(|(i, f)| (0.15 + 0.7 * (i as f64 + 0.5) / n, f)).collect()
}

async fn faults(ctx: Arc<Ctx>) {
    let mut generation = 0;
    for (at, fault) in schedule(&ctx.args) {
        let due = ctx.args.duration.mul_f64(at);
        let elapsed = Duration::from_secs_f64(ctx.stats.elapsed_s());
        if ctx.sleep(due.saturating_sub(elapsed)).await {
            return;
        }
        match fault {
            Fault::Kill(replica) => {
                let in_flight = aim_at_view_append(&ctx, replica, Duration::from_secs(1)).await;
                kill_and_rehydrate(&ctx, replica, in_flight, false).await
            }
            Fault::Outage(kind) => outage(&ctx, kind).await,
            Fault::LinkCut(replica) => link_cut(&ctx, replica).await,
            Fault::Recreate => {
                generation += 1;
                recreate(&ctx, generation).await;
            }
            Fault::FreshReplica => fresh_replica(&ctx).await,
        }
    }
}

/// SIGKILLs every process of `replica`, then measures: the orchestrator's restart, a peek targeted at the
/// replica at the latest time written before the kill, and every collection on it passing that time.
/// `in_flight` is what [`aim_at_view_append`] read just before; `during_outage`, whether a store is down.
async fn kill_and_rehydrate(ctx: &Ctx, replica: ReplicaId, in_flight: Option<u64>, during_outage: bool) {
    let pids = ctx.orchestrator.pids(INSTANCE, replica);
    let processes = pids.len();
    let kill_time = ctx.latest_write();
    let killed_at_s = ctx.stats.elapsed_s();
    if let Err(e) = crate::cluster::processes::kill_processes(&pids) {
        ctx.stats.violation(format!("cannot kill {replica}: {e:#}"));
        return;
    }
    let killed = now();
    lock(&ctx.stats.timeline).fault(killed_at_s, FaultKind::Kill, replica.to_string());
    let pid_list: Vec<String> = pids.iter().map(u32::to_string).collect();
    ctx.ui.event(
        &ctx.stats,
        &format!("killed {replica} with SIGKILL (pids {}) at time {kill_time}", pid_list.join(" ")),
    );
    lock(&ctx.replica_state).insert(replica, "killed".to_string());
    let mut record = Rehydration {
        replica: replica.to_string(),
        processes,
        killed_at_s,
        restarted_ms: None,
        answered_peek_ms: None,
        caught_up_ms: None,
        view_appends_in_flight: in_flight,
        during_outage,
    };

    // The replica must answer a peek at the kill time itself (the peek waits through its restart), and
    // catch up: restarted after the kill, its connection reset (seen at least once), and every export's
    // write frontier on it beyond the kill time.
    let watch = async {
        let restarted =
            first_held(killed, || async { lock(&ctx.restarts).get(&replica).is_some_and(|at| *at > killed) });
        tokio::join!(restarted, caught_up(ctx, replica, kill_time, killed))
    };
    let peek = answer_at(ctx, replica, kill_time, killed);
    let (answered, (restarted, caught_up)) = tokio::join!(peek, watch);
    record.restarted_ms = restarted.map(ms);
    record.answered_peek_ms = answered.map(ms);
    record.caught_up_ms = caught_up.map(ms);
    match caught_up {
        Some(took) => {
            lock(&ctx.replica_state).insert(replica, "ready".to_string());
            ctx.ui.event(
                &ctx.stats,
                &format!(
                    "{replica} rehydrated: answered at the kill time after {}, every collection past it after {:.2} s",
                    answered.map_or("-".to_string(), |a| format!("{:.2} s", a.as_secs_f64())),
                    took.as_secs_f64()
                ),
            );
        }
        None => ctx.stats.violation(format!(
            "{replica} did not catch up to the kill time {kill_time} within {} s of its kill",
            PATIENCE.as_secs()
        )),
    }
    lock(&ctx.stats.rehydrations).push(record);
}

/// Reads the `storage_appends_in_flight` gauge of `replica`'s process 0 (the one that appends the
/// materialized view) until it shows an append in flight, for up to `within`; returns the last reading
/// (`None`: none could be read).
async fn aim_at_view_append(ctx: &Ctx, replica: ReplicaId, within: Duration) -> Option<u64> {
    let address = *ctx.orchestrator.metrics_addresses(INSTANCE, replica).first()?;
    let started = now();
    let mut last = None;
    loop {
        let reading = tokio::task::spawn_blocking(move || appends_in_flight(address)).await.ok().flatten();
        last = reading.or(last);
        if reading.is_some_and(|n| n > 0) || started.elapsed() >= within {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// [`aim_at_view_append`] over several replicas: the first of `candidates` whose process 0 shows an
/// append in flight within `within`, with its reading; else the first candidate and its last reading.
async fn aim_at_any_view_append(
    ctx: &Ctx,
    candidates: &[ReplicaId],
    within: Duration,
) -> (ReplicaId, Option<u64>) {
    assert!(!candidates.is_empty(), "a replica to kill");
    let started = now();
    let mut first_reading = None;
    loop {
        for (i, replica) in candidates.iter().enumerate() {
            let reading = aim_at_view_append(ctx, *replica, Duration::ZERO).await;
            if i == 0 {
                first_reading = reading.or(first_reading);
            }
            if reading.is_some_and(|n| n > 0) {
                return (*replica, reading);
            }
        }
        if started.elapsed() >= within {
            return (candidates[0], first_reading);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The `storage_appends_in_flight` gauge of the metrics endpoint at `address`.
fn appends_in_flight(address: std::net::SocketAddr) -> Option<u64> {
    let page = telemetry::scrape(address, "/metrics", Duration::from_secs(1)).ok()?;
    if page.status != 200 {
        return None;
    }
    let samples = telemetry::parse_text(&page.body).ok()?;
    telemetry::sample_value(&samples, "storage_appends_in_flight", &[]).map(|value| value as u64)
}

/// Takes the store of `kind` away, or brings it back, on a blocking thread.
async fn switch_store(services: &Arc<LocalServices>, kind: OutageKind, down: bool) -> anyhow::Result<()> {
    let services = Arc::clone(services);
    tokio::task::spawn_blocking(
        move || if down { services.take_down(kind) } else { services.bring_back(kind) },
    )
    .await
    .map_err(|e| anyhow!("the service task failed: {e}"))?
}

/// How long after `since` `holds` first held (polled every 5 ms, for up to `PATIENCE`); `None` if it did
/// not within it.
async fn first_held<F: Future<Output = bool>>(since: Instant, holds: impl Fn() -> F) -> Option<Duration> {
    while since.elapsed() < PATIENCE {
        if holds().await {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Peeks, table appends and subscribe batches checked so far.
fn progress_counts(stats: &Stats) -> [u64; 3] {
    [&stats.peeks, &stats.appends, &stats.subscribe_batches].map(|c| c.load(Ordering::SeqCst))
}

/// One storage outage (`outage.rs`): the store of `kind` is taken down for `--outage-secs`, and a replica
/// is killed while its view append is stuck on it; then the store is brought back and the table writer's
/// appends, the subscribe and the materialized view's appends must each resume.
async fn outage(ctx: &Ctx, kind: OutageKind) {
    let services = Arc::clone(ctx.services.as_ref().expect("outages only run on local services"));
    let (fault, target) = match kind {
        OutageKind::Consensus => (FaultKind::ConsensusOutage, "postgres"),
        OutageKind::Blob => (FaultKind::BlobOutage, "moto_server"),
    };
    // The store goes down just as a replica's view append is in flight, so that the append is stuck on it
    // (the first the schedule kills, if both are); that replica is killed during the outage.
    let scheduled = schedule(&ctx.args)
        .into_iter()
        .find_map(|(_, fault)| if let Fault::Kill(replica) = fault { Some(replica) } else { None })
        .unwrap_or(ReplicaId(1));
    let mut candidates: Vec<ReplicaId> = ctx.args.replica_specs().into_iter().map(|(r, _)| r).collect();
    candidates.sort_by_key(|r| *r != scheduled);
    let (preferred, _) = aim_at_any_view_append(ctx, &candidates, Duration::from_secs(2)).await;
    candidates.sort_by_key(|r| *r != preferred);
    let started_at_s = ctx.stats.elapsed_s();
    let mark = lock(&ctx.stats.timeline).fault(started_at_s, fault, target);
    ctx.stats.set_outage(true);
    let number = ctx.stats.outage_marker().1;
    if let Err(e) = switch_store(&services, kind, true).await {
        ctx.stats.violation(format!("cannot take the {} store down: {e:#}", kind.name()));
        ctx.stats.set_outage(false);
        lock(&ctx.stats.timeline).end_fault(mark, ctx.stats.elapsed_s());
        return;
    }
    let down = now();
    let before = progress_counts(&ctx.stats);
    ctx.ui.event(&ctx.stats, &format!("{} outage: {}", kind.name(), kind.action()));
    // Whichever replica's append is stuck (it finished just before the store went, for the other).
    let victim = std::sync::OnceLock::new();
    let kill = async {
        let (replica, in_flight) =
            aim_at_any_view_append(ctx, &candidates, ctx.args.outage_duration / 2).await;
        let _ = victim.set(replica);
        kill_and_rehydrate(ctx, replica, in_flight, true).await;
    };
    let restore = async {
        tokio::time::sleep(ctx.args.outage_duration.saturating_sub(down.elapsed())).await;
        let during = progress_counts(&ctx.stats);
        let back = switch_store(&services, kind, false).await;
        let ended_at_s = ctx.stats.elapsed_s();
        let rows_written_at_end = ctx.stats.rows_written.load(Ordering::SeqCst);
        ctx.stats.set_outage(false);
        lock(&ctx.stats.timeline).end_fault(mark, ended_at_s);
        if let Err(e) = back {
            ctx.stats.violation(format!("cannot bring the {} store back: {e:#}", kind.name()));
            return;
        }
        ctx.ui.event(
            &ctx.stats,
            &format!("{} store back after {:.1} s", kind.name(), down.elapsed().as_secs_f64()),
        );
        let back = now();
        let (log_upper, subscribe_upper) =
            (*ctx.log_upper.borrow(), ctx.subscribe_upper.load(Ordering::SeqCst));
        let view_upper =
            async || ctx.storage.frontiers(workload::STATUS_REVENUE).await.ok().and_then(|f| first(&f.upper));
        let view_before = view_upper().await;
        let (appends, subscribe, view) = tokio::join!(
            first_held(back, || async { *ctx.log_upper.borrow() > log_upper }),
            first_held(back, || async { ctx.subscribe_upper.load(Ordering::SeqCst) > subscribe_upper }),
            first_held(back, || async { view_upper().await > view_before }),
        );
        for (what, resumed) in
            [("table appends", appends), ("the subscribe", subscribe), ("the view's appends", view)]
        {
            if resumed.is_none() {
                ctx.stats.violation(format!(
                    "{what} did not resume within {} s of the {} store's return",
                    PATIENCE.as_secs(),
                    kind.name()
                ));
            }
        }
        lock(&ctx.stats.outages).push(OutageReport {
            kind,
            action: kind.action().to_string(),
            started_at_s,
            ended_at_s,
            number,
            // Filled in when the report is made: some of the checks may still be waiting.
            peeks_answered: 0,
            peeks_checked_during: during[0] - before[0],
            appends_during: during[1] - before[1],
            subscribe_batches_during: during[2] - before[2],
            appends_resumed_ms: appends.map(ms),
            subscribe_resumed_ms: subscribe.map(ms),
            view_resumed_ms: view.map(ms),
            rows_written_after: 0,
            rows_written_at_end,
            killed: victim.get().map(ReplicaId::to_string),
        });
    };
    tokio::join!(kill, restore);
}

/// Takes down the links of every process of `replica` for `--link-cut-secs` and brings them back; then
/// the replica must answer a peek at the latest time written before the restore and catch up past it.
async fn link_cut(ctx: &Ctx, replica: ReplicaId) {
    let network = Arc::clone(ctx.network.as_ref().expect("link cuts only run with --netns"));
    let started_at_s = ctx.stats.elapsed_s();
    let mark = lock(&ctx.stats.timeline).fault(started_at_s, FaultKind::LinkCut, replica.to_string());
    let links = match switch_links(&network, replica, false).await {
        Ok(links) => links,
        Err(e) => {
            ctx.stats.violation(format!("cannot cut the links of {replica}: {e:#}"));
            lock(&ctx.stats.timeline).end_fault(mark, ctx.stats.elapsed_s());
            return;
        }
    };
    let down = now();
    lock(&ctx.replica_state).insert(replica, "cut off".to_string());
    ctx.ui.event(&ctx.stats, &format!("cut the {links} link(s) of {replica} (ip link set down)"));
    let before = progress_counts(&ctx.stats);
    // Watches the replica's frontiers from the cut on: a reset means the controller reconnected.
    let reset = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = watch_for_reset(ctx, replica, Arc::clone(&reset), Arc::clone(&watching));
    let restore = async {
        tokio::time::sleep(ctx.args.link_cut_duration.saturating_sub(down.elapsed())).await;
        let during = progress_counts(&ctx.stats);
        let restored = switch_links(&network, replica, true).await;
        let ended_at_s = ctx.stats.elapsed_s();
        lock(&ctx.stats.timeline).end_fault(mark, ended_at_s);
        if let Err(e) = restored {
            ctx.stats.violation(format!("cannot restore the links of {replica}: {e:#}"));
            watching.store(false, Ordering::SeqCst);
            return;
        }
        let (answered, caught) = after_restore(ctx, replica, down).await;
        watching.store(false, Ordering::SeqCst);
        lock(&ctx.stats.link_cuts).push(LinkCutReport {
            replica: replica.to_string(),
            links,
            started_at_s,
            ended_at_s,
            peeks_answered: during[0] - before[0],
            appends_during: during[1] - before[1],
            reconnected: reset.load(Ordering::SeqCst),
            answered_peek_ms: answered.map(ms),
            caught_up_ms: caught.map(ms),
        });
    };
    tokio::join!(watcher, restore);
}

/// Takes `replica`'s links down or brings them up, on a blocking thread; returns how many.
async fn switch_links(network: &Arc<Network>, replica: ReplicaId, up: bool) -> anyhow::Result<usize> {
    let network = Arc::clone(network);
    tokio::task::spawn_blocking(move || {
        if up { network.restore(INSTANCE, replica) } else { network.cut(INSTANCE, replica) }
    })
    .await
    .map_err(|e| anyhow!("the network task failed: {e}"))?
}

/// Once `replica`'s links are back (they went down at `down`): how long until it answered a peek at the
/// latest time written before the restore, and until every collection on it passed that time (a
/// violation if it does not within `PATIENCE`).
async fn after_restore(ctx: &Ctx, replica: ReplicaId, down: Instant) -> (Option<Duration>, Option<Duration>) {
    let back = now();
    let time = ctx.latest_write();
    ctx.ui.event(
        &ctx.stats,
        &format!(
            "restored the links of {replica} after {:.1} s, at time {time}",
            down.elapsed().as_secs_f64()
        ),
    );
    let (answered, caught) =
        tokio::join!(answer_at(ctx, replica, time, back), caught_up_past(ctx, replica, time, back));
    match caught {
        Some(_) => {
            lock(&ctx.replica_state).insert(replica, "ready".to_string());
        }
        None => ctx.stats.violation(format!(
            "{replica} did not catch up to time {time} within {} s of its links' restore",
            PATIENCE.as_secs()
        )),
    }
    let secs = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2} s", d.as_secs_f64()));
    ctx.ui.event(
        &ctx.stats,
        &format!(
            "{replica} back: answered at the restore time after {}, every collection past it after {}",
            secs(answered),
            secs(caught)
        ),
    );
    (answered, caught)
}

/// The controller's write frontier of each of `ids` on `replica` (`None` for one it has not heard of on
/// the replica's current connection); `None` if the instance cannot be inspected.
async fn replica_frontiers(ctx: &Ctx, replica: ReplicaId, ids: &[GlobalId]) -> Option<Vec<Option<u64>>> {
    let ids = ids.to_vec();
    let controller = ctx.controller.read().await;
    controller
        .inspect(INSTANCE, move |core| {
            ids.iter().map(|id| core.replica_write_frontier(replica, *id).and_then(|f| first(&f))).collect()
        })
        .await
        .ok()
}

/// Sets `reset` once any live export's write frontier on `replica` is unknown to the controller (a new
/// connection, not yet reported), polling every 5 ms while `watching`.
async fn watch_for_reset(
    ctx: &Ctx,
    replica: ReplicaId,
    reset: Arc<std::sync::atomic::AtomicBool>,
    watching: Arc<std::sync::atomic::AtomicBool>,
) {
    let ids: Vec<GlobalId> = ctx.live_exports().keys().copied().collect();
    while watching.load(Ordering::SeqCst) && !reset.load(Ordering::SeqCst) {
        if replica_frontiers(ctx, replica, &ids).await.is_some_and(|f| f.iter().any(Option::is_none)) {
            reset.store(true, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How long after `since` every live export's write frontier on `replica` passed `time` (no reset
/// needed, unlike [`caught_up`]).
async fn caught_up_past(ctx: &Ctx, replica: ReplicaId, time: u64, since: Instant) -> Option<Duration> {
    let ids: Vec<GlobalId> = ctx.live_exports().keys().copied().collect();
    first_held(since, || async {
        let frontiers = replica_frontiers(ctx, replica, &ids).await;
        frontiers.is_some_and(|f| f.iter().all(|f| f.is_some_and(|t| t > time)))
    })
    .await
}

/// How long after `since` `replica` answered a peek targeted at it at `time` (checked against the oracle).
async fn answer_at(ctx: &Ctx, replica: ReplicaId, time: u64, since: Instant) -> Option<Duration> {
    let spec = PeekSpec::new(PeekKind::NationRevenue, 0);
    match peek_index(ctx, workload::REVENUE_BY_NATION, time, &spec, Some(replica), PATIENCE).await {
        Ok(Peeked::Rows(rows)) => {
            let answered = since.elapsed();
            let what = format!("revenue by nation on {replica} (targeted)");
            check_rows(ctx, &what, time, &spec, rows).await.then_some(answered)
        }
        Ok(Peeked::Unreadable) => {
            ctx.stats.violation(format!("{replica}: time {time} was no longer readable"));
            None
        }
        Err(e) => {
            ctx.stats.violation(format!("{replica}, targeted: {e}"));
            None
        }
    }
}

/// How long after `since` every live export's write frontier on `replica` passed `time`, having been
/// reset (no frontier: a new connection) at least once if `time` was already passed at the start.
async fn caught_up(ctx: &Ctx, replica: ReplicaId, time: u64, since: Instant) -> Option<Duration> {
    let exports = ctx.live_exports();
    let mut reset_seen = false;
    while since.elapsed() < PATIENCE {
        let ids: Vec<GlobalId> = exports.keys().copied().collect();
        let states = {
            let controller = ctx.controller.read().await;
            controller
                .inspect(INSTANCE, move |core| {
                    ids.iter()
                        .map(|id| core.replica_write_frontier(replica, *id).and_then(|f| first(&f)))
                        .collect::<Vec<_>>()
                })
                .await
        };
        let states = states.ok()?;
        reset_seen |= states.iter().any(Option::is_none);
        if reset_seen && states.iter().all(|s| s.is_some_and(|t| t > time)) {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// Drops the current `status_summary` and creates generation `generation` under a new id; checks the new
/// one hydrates and the old one's state goes away.
async fn recreate(ctx: &Ctx, generation: u64) {
    let mut current = ctx.status_summary.write().await;
    let Some(old) = *current else { return };
    let new = workload::status_summary_id(generation);
    let dropped = now();
    lock(&ctx.stats.timeline).fault(ctx.stats.elapsed_s(), FaultKind::Recreation, format!("{old} as {new}"));
    if let Err(e) = ctx.controller.read().await.drop_collections(INSTANCE, vec![old]).await {
        ctx.stats.violation(format!("cannot drop {old}: {e}"));
        return;
    }
    lock(&ctx.as_ofs).remove(&old);
    let created = now();
    let as_of = ctx.controller.read().await.create_dataflow(INSTANCE, workload::status_summary(new)).await;
    let as_of = match as_of.map(|a| first(&a)) {
        Ok(Some(as_of)) => as_of,
        other => {
            ctx.stats.violation(format!("cannot recreate status_summary as {new}: {other:?}"));
            *current = None;
            return;
        }
    };
    lock(&ctx.as_ofs).insert(new, as_of);
    let hydration = first_held(created, || async {
        let frontiers = ctx.controller.read().await.collection_frontiers(INSTANCE, new);
        frontiers.ok().and_then(|f| first(&f.upper)).is_some_and(|u| u > as_of)
    });
    // The dropped index's state (holds, history) must go away once no replica reports on it any more.
    let removal = first_held(dropped, || async {
        let gone = ctx
            .controller
            .read()
            .await
            .inspect(INSTANCE, move |core| core.collection_frontiers(old).is_none())
            .await;
        gone.unwrap_or(false)
    });
    let (hydrated, removed) = tokio::join!(hydration, removal);
    *current = Some(new);
    drop(current);
    if hydrated.is_none() {
        ctx.stats.violation(format!(
            "the recreated status_summary {new} did not hydrate within {} s",
            PATIENCE.as_secs()
        ));
    }
    if removed.is_none() {
        let state =
            ctx.controller.read().await.inspect(INSTANCE, move |core| core.describe_collection(old)).await;
        ctx.stats.violation(format!(
            "the dropped index {old} still has controller state {} s later: {}",
            PATIENCE.as_secs(),
            state.unwrap_or_default()
        ));
    }
    ctx.ui.event(
        &ctx.stats,
        &format!(
            "dropped status_summary {old} and recreated it as {new}: hydrated in {}, old state gone after {}",
            hydrated.map_or("-".to_string(), |h| format!("{} ms", h.as_millis())),
            removed.map_or("-".to_string(), |r| format!("{} ms", r.as_millis())),
        ),
    );
    lock(&ctx.stats.recreations).push(Recreation {
        dropped: old.to_string(),
        created: new.to_string(),
        hydrated_ms: hydrated.map(ms),
        state_removed_ms: removed.map(ms),
    });
}

// -------------------------------------------------------------------------------------------------
// Metrics and the timeline

/// Serves the controller's metrics at `--metrics-addr` and says where every endpoint of the run is
/// (the controller's, and each replica process's, which the orchestrator gave a port).
async fn serve_metrics(
    args: &ClusterArgs,
    controller: &ComputeController,
    orchestrator: &ProcessOrchestrator,
    ui: &Ui,
) -> anyhow::Result<telemetry::MetricsServer> {
    let registry = controller.metrics_registry().cloned().context("the controller keeps no metrics")?;
    let server = telemetry::MetricsServer::bind(args.metrics_addr, registry)
        .await
        .with_context(|| format!("cannot serve metrics on {}", args.metrics_addr))?;
    let mut endpoints = vec![format!("controller {}", server.url())];
    for (replica, _) in args.replica_specs() {
        for (process, addr) in orchestrator.metrics_addresses(INSTANCE, replica).iter().enumerate() {
            endpoints.push(format!("{replica} process {process} http://{addr}/metrics"));
        }
    }
    ui.say(&format!("metrics: {}", endpoints.join(", ")));
    info!(endpoints = ?endpoints, "metrics endpoints");
    Ok(server)
}

/// Scrapes every metrics endpoint of the run (the controller's at `controller`, every replica process's)
/// into `dir` (`controller.prom`, `<replica>-p<process>.prom`): what `promtool check metrics` reads. A
/// failed scrape is a violation.
async fn scrape_metrics(ctx: &Ctx, controller: std::net::SocketAddr, dir: &std::path::Path) {
    let mut targets = vec![("controller".to_string(), controller)];
    for (replica, _) in ctx.args.replica_specs() {
        for (process, addr) in ctx.orchestrator.metrics_addresses(INSTANCE, replica).into_iter().enumerate() {
            targets.push((format!("{replica}-p{process}"), addr));
        }
    }
    let dir = dir.to_path_buf();
    let scraped = tokio::task::spawn_blocking(move || -> anyhow::Result<usize> {
        // Scrapes of an earlier run (of replicas this one may not have) would be checked as this run's.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot empty {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (name, addr) in &targets {
            let page = telemetry::scrape(*addr, "/metrics", PATIENCE)
                .with_context(|| format!("cannot scrape {name} at {addr}"))?;
            if page.status != 200 {
                bail!("{name} at {addr} answered {}", page.status);
            }
            std::fs::write(dir.join(format!("{name}.prom")), page.body).context("cannot write a scrape")?;
        }
        Ok(targets.len())
    })
    .await;
    match scraped {
        Ok(Ok(count)) => info!(count, "metrics endpoints scraped"),
        Ok(Err(e)) => ctx.stats.violation(format!("metrics: {e:#}")),
        Err(e) => ctx.stats.violation(format!("the scrape task failed: {e}")),
    }
}

/// Samples the timeline once a second during the timed run (`timeline.rs`): peek latency over the last
/// second, rows written since the last sample, each live export's wall-clock lag on its slowest replica
/// and each replica's status, both from the controller.
async fn sample(ctx: Arc<Ctx>) {
    let mut rows_before = ctx.stats.rows_written.load(Ordering::Relaxed);
    let mut before = now();
    while !ctx.sleep(Duration::from_secs(1)).await {
        let exports: Vec<GlobalId> = ctx.live_exports().into_keys().collect();
        let (mut lag_s, mut status) = (BTreeMap::new(), BTreeMap::new());
        {
            let controller = ctx.controller.read().await;
            for id in exports {
                let slowest = controller
                    .wallclock_lag(INSTANCE, id)
                    .await
                    .ok()
                    .and_then(|replicas| replicas.iter().filter_map(|r| r.lag_ms).max());
                if let Some(lag_ms) = slowest {
                    lag_s.insert(id.to_string(), lag_ms as f64 / 1_000.0);
                }
            }
            for (replica, health) in controller.replica_statuses(INSTANCE).await.unwrap_or_default() {
                status.insert(replica.to_string(), health.name().to_string());
            }
        }
        let rows = ctx.stats.rows_written.load(Ordering::Relaxed);
        let seconds = before.elapsed().as_secs_f64().max(0.001);
        let rows_per_s = rows.saturating_sub(rows_before) as f64 / seconds;
        (rows_before, before) = (rows, now());
        // Latencies are positive: a 0 means no peek finished in the last second.
        let (p50, p99) = ctx.stats.recent_percentiles(Duration::from_secs(1));
        let ms = |micros: u64| (micros > 0).then(|| micros as f64 / 1_000.0);
        lock(&ctx.stats.timeline).sample(TimelineSample {
            at_s: ctx.stats.elapsed_s(),
            peek_p50_ms: ms(p50),
            peek_p99_ms: ms(p99),
            rows_per_s,
            lag_s,
            status,
        });
    }
}

// -------------------------------------------------------------------------------------------------
// Display

/// Samples frontier lag and redraws the live status line, four times a second.
async fn display(ctx: Arc<Ctx>) {
    let mut history: std::collections::VecDeque<(Instant, u64, u64)> = std::collections::VecDeque::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let indexes: Vec<GlobalId> = ctx
            .live_exports()
            .into_keys()
            .filter(|id| ![workload::STATUS_REVENUE_SINK, workload::NATION_SUBSCRIBE].contains(id))
            .collect();
        let (mut slowest_upper, mut slowest_since) = (u64::MAX, u64::MAX);
        {
            let controller = ctx.controller.read().await;
            for id in &indexes {
                if let Ok(f) = controller.collection_frontiers(INSTANCE, *id) {
                    slowest_upper = slowest_upper.min(first(&f.upper).unwrap_or(u64::MAX));
                    slowest_since = slowest_since.min(first(&f.since).unwrap_or(u64::MAX));
                }
            }
        }
        let wall = wallclock_ms();
        let lag = wall.saturating_sub(slowest_upper);
        if slowest_upper != u64::MAX && !ctx.stopping() {
            lock(&ctx.stats.frontier_lag).push(lag);
        }
        if !ctx.ui.is_live() {
            continue;
        }
        let mv_upper =
            ctx.storage.frontiers(workload::STATUS_REVENUE).await.ok().and_then(|f| first(&f.upper));
        let rows = ctx.stats.rows_written.load(Ordering::Relaxed);
        let peeks = ctx.stats.peeks.load(Ordering::Relaxed);
        let at = now();
        history.push_back((at, rows, peeks));
        while history.len() > 9 {
            history.pop_front();
        }
        let (t0, r0, p0) = history.front().copied().unwrap_or((at, rows, peeks));
        let span = at.duration_since(t0).as_secs_f64().max(0.001);
        let (p50, p99) = ctx.stats.recent_percentiles(Duration::from_secs(2));
        let replicas: Vec<String> =
            lock(&ctx.replica_state).iter().map(|(r, s)| format!("{r} {s}")).collect();
        let violations = ctx.stats.violation_count();
        let rate = |n: u64| if span < 0.2 { "-".to_string() } else { format!("{:.0}", n as f64 / span) };
        // Most important first: a narrow terminal cuts the end.
        ctx.ui.live(&format!(
            "{:>5.1}/{:.0}s | {} rows/s | {} peeks/s p50 {:.1}ms p99 {:.1}ms | {} | {} | upper -{}ms since -{:.1}s mv -{}ms | sub {}",
            ctx.stats.elapsed_s(),
            ctx.args.duration.as_secs_f64(),
            rate(rows - r0),
            rate(peeks - p0),
            p50 as f64 / 1_000.0,
            p99 as f64 / 1_000.0,
            if violations == 0 { "ok".to_string() } else { format!("{violations} VIOLATIONS") },
            replicas.join(" "),
            lag,
            wall.saturating_sub(slowest_since) as f64 / 1_000.0,
            mv_upper.map_or("?".to_string(), |u| wall.saturating_sub(u).to_string()),
            thousands(ctx.stats.subscribe_batches.load(Ordering::Relaxed)),
        ));
    }
}

// -------------------------------------------------------------------------------------------------
// The end

/// After the last write: every collection catches up to it, then every index on every replica and the
/// materialized view are compared with the oracle in full.
async fn final_checks(ctx: &Ctx) -> anyhow::Result<()> {
    let last = ctx.latest_write();
    ctx.ui.say(&format!("writes stopped at time {last}; waiting for every collection to catch up"));
    let started = now();
    let exports = ctx.live_exports();
    loop {
        let mut behind: Vec<String> = Vec::new();
        {
            let controller = ctx.controller.read().await;
            for id in exports.keys() {
                let upper = controller.collection_frontiers(INSTANCE, *id).ok().and_then(|f| first(&f.upper));
                if upper.is_none_or(|u| u <= last) {
                    behind.push(format!("{id} at {upper:?}"));
                }
            }
        }
        let mv = ctx.storage.frontiers(workload::STATUS_REVENUE).await?;
        if first(&mv.upper).is_none_or(|u| u <= last) {
            behind.push(format!("{} (storage) at {:?}", workload::STATUS_REVENUE, mv.upper.elements()));
        }
        if ctx.subscribe_upper.load(Ordering::SeqCst) <= last {
            behind.push(format!("subscribe checked to {}", ctx.subscribe_upper.load(Ordering::SeqCst)));
        }
        if behind.is_empty() {
            break;
        }
        if started.elapsed() > PATIENCE {
            ctx.stats.violation(format!(
                "liveness: {} s after the last write, still behind it: {}",
                PATIENCE.as_secs(),
                behind.join(", ")
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ctx.ui.say(&format!(
        "caught up in {} ms; comparing every index on every replica in full",
        started.elapsed().as_millis()
    ));

    let status_summary = ctx.status_summary.read().await.unwrap_or(workload::status_summary_id(0));
    let full = |kind| PeekSpec {
        literal_constraints: None,
        map_filter_project: None,
        finishing: RowSetFinishing::unordered(),
        ..PeekSpec::new(kind, 0)
    };
    // The full contents of the key-lookup indexes, as the oracle has them.
    let (customers, enriched) = ctx
        .at(last, |oracle| (oracle.customers(), oracle.orders_enriched()))
        .await
        .ok_or_else(|| anyhow!("the write log does not cover the last write"))?;
    let checks: Vec<(GlobalId, PeekSpec, Option<Multiset>)> = vec![
        (workload::CUSTOMERS_BY_ID, full(PeekKind::CustomerLookup), Some(customers)),
        (workload::ORDERS_BY_CUSTOMER, full(PeekKind::CustomerOrders), Some(enriched)),
        (workload::REVENUE_BY_NATION, full(PeekKind::NationRevenue), None),
        (workload::TOP_CUSTOMERS, full(PeekKind::TopCustomers), None),
        (status_summary, full(PeekKind::StatusSummary), None),
    ];
    for (replica, _) in ctx.args.replica_specs() {
        for (id, spec, contents) in &checks {
            let what = format!("final full contents of {id} on {replica}");
            match peek_index(ctx, *id, last, spec, Some(replica), PATIENCE).await {
                Ok(Peeked::Rows(rows)) => {
                    let ok = match contents {
                        Some(contents) => {
                            let expected = finish(contents, spec).map_err(|e| anyhow!(e))?;
                            let actual = canonical(rows, spec);
                            if expected != actual {
                                ctx.stats.violation(format!(
                                    "{what}: {}",
                                    describe_difference(&expected, &actual)
                                ));
                            }
                            expected == actual
                        }
                        None => check_rows(ctx, &what, last, spec, rows).await,
                    };
                    if ok {
                        ctx.stats.final_checks.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Peeked::Unreadable) => {
                    ctx.stats.violation(format!("{what}: the last write's time is not readable"))
                }
                Err(e) => ctx.stats.violation(format!("{what}: {e}")),
            }
        }
    }
    match check_mv_once(ctx).await {
        Ok(Some(upper)) if upper > last => {
            ctx.stats.final_checks.fetch_add(1, Ordering::Relaxed);
        }
        Ok(other) => {
            ctx.stats.violation(format!("materialized view: not readable after the last write ({other:?})"))
        }
        Err(e) => ctx.stats.violation(format!("materialized view: {e:#}")),
    }
    read_introspection(ctx).await;
    Ok(())
}

/// The baseline for rehydration: a fresh replica, shaped like the first one killed, added under the same
/// load, timed until it answers a peek at the latest write's time when it was added and until every
/// collection on it passed that time; then it is dropped again, and its processes must be gone.
async fn fresh_replica(ctx: &Ctx) {
    let processes = schedule(&ctx.args)
        .into_iter()
        .find_map(|(_, fault)| match fault {
            Fault::Kill(replica) => {
                ctx.args.replica_specs().into_iter().find(|(r, _)| *r == replica).map(|(_, p)| p)
            }
            Fault::Recreate | Fault::FreshReplica | Fault::Outage(_) | Fault::LinkCut(_) => None,
        })
        .unwrap_or(1);
    let replica = ReplicaId(ctx.args.replicas as u64 + 1);
    ctx.ui.event(
        &ctx.stats,
        &format!(
            "baseline: adding a fresh replica {replica} ({processes} process(es)) to time a full hydration"
        ),
    );
    lock(&ctx.replica_state).insert(replica, "hydrating".to_string());
    let last = ctx.latest_write();
    let added_at_s = ctx.stats.elapsed_s();
    lock(&ctx.stats.timeline).fault(added_at_s, FaultKind::FreshReplica, replica.to_string());
    let started = now();
    let location = controller::ReplicaLocation::Managed { workers: ctx.args.workers, processes };
    if let Err(e) = ctx.controller.write().await.add_replica(INSTANCE, replica, location).await {
        ctx.stats.violation(format!("cannot add the fresh replica {replica}: {e}"));
        return;
    }
    let (answered, caught_up) =
        tokio::join!(answer_at(ctx, replica, last, started), caught_up(ctx, replica, last, started));
    if let Err(e) = ctx.controller.write().await.drop_replica(INSTANCE, replica).await {
        ctx.stats.violation(format!("cannot drop the fresh replica {replica}: {e}"));
    }
    let leftover = ctx.orchestrator.pids(INSTANCE, replica);
    if !leftover.is_empty() {
        ctx.stats.violation(format!("the dropped replica {replica} still has processes {leftover:?}"));
    }
    if caught_up.is_none() {
        ctx.stats.violation(format!(
            "the fresh replica {replica} did not hydrate within {} s",
            PATIENCE.as_secs()
        ));
    }
    *lock(&ctx.stats.fresh_hydration) = Some(Rehydration {
        replica: replica.to_string(),
        processes,
        killed_at_s: added_at_s,
        restarted_ms: None,
        answered_peek_ms: answered.map(ms),
        caught_up_ms: caught_up.map(ms),
        view_appends_in_flight: None,
        during_outage: false,
    });
    lock(&ctx.replica_state).remove(&replica);
    ctx.ui.event(&ctx.stats, &format!(
        "baseline: {replica} answered at the latest write after {}, every collection past it after {}; dropped",
        answered.map_or("-".to_string(), |a| format!("{:.2} s", a.as_secs_f64())),
        caught_up.map_or("-".to_string(), |a| format!("{:.2} s", a.as_secs_f64())),
    ));
}

/// Reads the replica status rows back from the introspection collection (storage), for the report.
async fn read_introspection(ctx: &Ctx) {
    let id = IntrospectionKind::ReplicaStatus.default_id();
    let deadline = now() + Duration::from_secs(5);
    loop {
        let rows = async {
            let frontiers = ctx.storage.frontiers(id).await.ok()?;
            let time = first(&frontiers.upper)?.checked_sub(1)?;
            let handle = {
                let controller = ctx.controller.read().await;
                controller
                    .peek(INSTANCE, PeekTarget::Storage { id }, time, PeekOptions::default())
                    .await
                    .ok()?
            };
            handle.result().await.ok()
        }
        .await;
        let statuses: Vec<String> = rows
            .unwrap_or_default()
            .iter()
            .map(|(row, _)| {
                let d = row.unpack();
                match (d.get(1), d.get(2)) {
                    (Some(Datum::Text(replica)), Some(Datum::Text(status))) => format!("{replica} {status}"),
                    _ => format!("({row})"),
                }
            })
            .collect();
        // `connected`: connected with every dataflow hydrated (see `controller`'s introspection docs).
        let all_ready =
            statuses.len() == ctx.args.replicas && statuses.iter().all(|s| s.ends_with(" connected"));
        if all_ready || now() > deadline {
            if !all_ready {
                warn!(?statuses, "introspection does not show every replica connected");
            }
            *lock(&ctx.stats.introspection) =
                statuses.into_iter().map(|s| format!("{s} (compute_replica_status)")).collect();
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
