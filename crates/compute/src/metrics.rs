//! The replica process's Prometheus metrics: [`ReplicaMetrics`] (the families, in the process's
//! registry), what each timely worker updates ([`WorkerTelemetry`]) and what each storage feed updates
//! ([`StorageReadLag`]).
//!
//! - `compute_replica_dataflows` (gauge): dataflows installed in this process
//! - `compute_replica_arrangement_records` (gauge; worker): updates held in the worker's arrangements
//!   (differential's batch, merge and drop events)
//! - `compute_replica_arrangement_batches` (gauge; worker): batches held in the worker's arrangements
//! - `compute_replica_worker_step_seconds` (histogram; worker): one pass of the worker's loop that stepped
//!   its dataflows rather than parked: the messages it took, compaction, peeks, reports and the timely step
//! - `compute_replica_peeks_queued` (gauge; worker): peeks the worker holds until their time is complete
//! - `compute_replica_peeks_answered_total` (counter; worker): peeks the worker answered (rows or error)
//! - `compute_replica_storage_read_lag_seconds` (gauge; collection): now minus the progress of this process's
//!   reads of a storage collection (its listens), set at each progress
//!
//! `worker` is the global worker index within the replica. Worker series live as long as the process
//! (the replica's families are unregistered when it shuts down); a storage collection's read lag series
//! goes when the last dataflow of this process reading it does ([`StorageReadLag`]'s drop).
//!
//! **Cost.** A worker updates plain handles, no lock and no label formatting: per pass of its loop two
//! clock reads and at most a few atomic operations. Arrangement sizes come from differential's own
//! logging of batch events (a handful per step with data). Parking is recognised through timely's
//! `Park` events, from a logger registered on the worker only while no dataflow is being built (a
//! dataflow built while a `timely` logger exists logs every operator's scheduling), so operators log
//! nothing.
//!
//! **Tests:** `tests/it/metrics.rs` (the families and their values on a running replica); the
//! `compute-replica --metrics-addr` endpoint with real Prometheus tooling in `sim`'s
//! `tests/it/observability.rs`.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use differential_dataflow::logging::{DifferentialEvent, DifferentialEventBuilder};
use prometheus::core::Collector;
use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use telemetry::Series;
use timely::logging::{ParkEvent, TimelyEvent, TimelyEventBuilder};
use timely::progress::Antichain;
use timely::worker::Worker;
use tracing::warn;

use protocol::GlobalId;

/// Worker step durations: 10 µs to 10 s.
const STEP_BUCKETS_S: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.5, 1.0, 10.0,
];

/// The replica's metric families, registered in one registry (the process's). Cloning shares them.
#[derive(Clone)]
pub struct ReplicaMetrics {
    dataflows: IntGauge,
    arrangement_records: IntGaugeVec,
    arrangement_batches: IntGaugeVec,
    step_seconds: HistogramVec,
    peeks_queued: IntGaugeVec,
    peeks_answered: IntCounterVec,
    storage_read_lag: GaugeVec,
    read_lags: ReadLagOwners,
}

/// The read lag series of each storage collection, with the number of feeds that share it.
type ReadLagOwners = Arc<Mutex<BTreeMap<GlobalId, (usize, Series<GaugeVec>)>>>;

impl fmt::Debug for ReplicaMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaMetrics").finish_non_exhaustive()
    }
}

impl ReplicaMetrics {
    /// Registers the replica's families in `registry`; fails if they are there already (one replica
    /// process per registry).
    pub fn register(registry: &Registry) -> prometheus::Result<ReplicaMetrics> {
        let worker = ["worker"];
        let metrics = ReplicaMetrics {
            dataflows: IntGauge::new("compute_replica_dataflows", "Dataflows installed in this process.")?,
            arrangement_records: IntGaugeVec::new(
                Opts::new("compute_replica_arrangement_records", "Updates held in a worker's arrangements."),
                &worker,
            )?,
            arrangement_batches: IntGaugeVec::new(
                Opts::new("compute_replica_arrangement_batches", "Batches held in a worker's arrangements."),
                &worker,
            )?,
            step_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "compute_replica_worker_step_seconds",
                    "One pass of a worker's loop that stepped its dataflows rather than parked.",
                )
                .buckets(STEP_BUCKETS_S.to_vec()),
                &worker,
            )?,
            peeks_queued: IntGaugeVec::new(
                Opts::new(
                    "compute_replica_peeks_queued",
                    "Peeks a worker holds until their time is complete.",
                ),
                &worker,
            )?,
            peeks_answered: IntCounterVec::new(
                Opts::new("compute_replica_peeks_answered_total", "Peeks a worker answered."),
                &worker,
            )?,
            storage_read_lag: GaugeVec::new(
                Opts::new(
                    "compute_replica_storage_read_lag_seconds",
                    "Now minus the progress of this process's reads of a storage collection.",
                ),
                &["collection"],
            )?,
            read_lags: Arc::default(),
        };
        for collector in metrics.collectors() {
            registry.register(collector)?;
        }
        Ok(metrics)
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.dataflows.clone()),
            Box::new(self.arrangement_records.clone()),
            Box::new(self.arrangement_batches.clone()),
            Box::new(self.step_seconds.clone()),
            Box::new(self.peeks_queued.clone()),
            Box::new(self.peeks_answered.clone()),
            Box::new(self.storage_read_lag.clone()),
        ]
    }

    /// Takes the families out of `registry` (the replica stopped).
    pub fn unregister(&self, registry: &Registry) {
        for collector in self.collectors() {
            // Only missing if someone else took it out; nothing is left to remove then.
            let _ = registry.unregister(collector);
        }
    }

    /// The handles of worker `index` (global within the replica); `counts_dataflows` for the one worker
    /// per process that sets `compute_replica_dataflows` (every worker builds the same dataflows).
    pub(crate) fn worker(&self, index: usize, counts_dataflows: bool) -> WorkerMetrics {
        let label = index.to_string();
        let labels = [label.as_str()];
        WorkerMetrics {
            dataflows: counts_dataflows.then(|| self.dataflows.clone()),
            arrangement_records: self.arrangement_records.with_label_values(&labels),
            arrangement_batches: self.arrangement_batches.with_label_values(&labels),
            step_seconds: self.step_seconds.with_label_values(&labels),
            peeks_queued: self.peeks_queued.with_label_values(&labels),
            peeks_answered: self.peeks_answered.with_label_values(&labels),
        }
    }

    /// The read lag of storage collection `id`, for one feed of it: its series exists while some feed
    /// holds one.
    pub(crate) fn storage_read_lag(&self, id: GlobalId) -> StorageReadLag {
        let mut lags = self.read_lags.lock().expect("read lag owners poisoned");
        let (feeds, series) =
            lags.entry(id).or_insert_with(|| (0, Series::new(&self.storage_read_lag, &[&id.to_string()])));
        *feeds += 1;
        StorageReadLag { id, gauge: prometheus::Gauge::clone(series), owners: Arc::clone(&self.read_lags) }
    }
}

/// One storage feed's handle on its collection's read lag. The last one dropped removes the series.
pub(crate) struct StorageReadLag {
    id: GlobalId,
    gauge: prometheus::Gauge,
    owners: ReadLagOwners,
}

impl fmt::Debug for StorageReadLag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageReadLag").field("id", &self.id).finish_non_exhaustive()
    }
}

impl StorageReadLag {
    /// The feed's listen progressed to `frontier` (milliseconds since the epoch): the lag is now minus
    /// that; 0 once the collection is closed.
    pub(crate) fn progress(&self, frontier: &Antichain<u64>) {
        let lag_ms = match frontier.as_option() {
            Some(upper) => wallclock_ms().saturating_sub(*upper),
            None => 0,
        };
        self.gauge.set(lag_ms as f64 / 1_000.0);
    }
}

impl Drop for StorageReadLag {
    fn drop(&mut self) {
        let mut owners = self.owners.lock().expect("read lag owners poisoned");
        let Some((feeds, _)) = owners.get_mut(&self.id) else { return };
        assert!(*feeds > 0, "a read lag of {} without feeds", self.id);
        *feeds -= 1;
        if *feeds == 0 {
            owners.remove(&self.id);
        }
    }
}

/// Milliseconds since the epoch: storage times are wall-clock milliseconds.
// The replica is a real process: its lag is against the real clock.
#[allow(clippy::disallowed_methods)]
fn wallclock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The handles one timely worker updates; sent to its thread, where [`WorkerTelemetry::install`] puts them
/// to use.
pub(crate) struct WorkerMetrics {
    dataflows: Option<IntGauge>,
    arrangement_records: IntGauge,
    arrangement_batches: IntGauge,
    step_seconds: prometheus::Histogram,
    peeks_queued: IntGauge,
    peeks_answered: IntCounter,
}

impl fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

/// A worker's metrics at work on its thread: its loggers and what it last set.
pub(crate) struct WorkerTelemetry {
    metrics: WorkerMetrics,
    parks: ParkWatch,
    /// What `peeks_queued` and `dataflows` were last set to.
    last_queued: usize,
    last_dataflows: usize,
}

/// What the park-event logger tells the worker's loop: whether (and how long) it parked.
#[derive(Clone, Default)]
pub(crate) struct ParkWatch {
    /// Time parked during the current pass, from timely's park events.
    parked: Rc<Cell<Duration>>,
    /// When the park under way began (worker time).
    park_started: Rc<Cell<Option<Duration>>>,
}

impl fmt::Debug for ParkWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParkWatch").field("parked", &self.parked.get()).finish()
    }
}

impl ParkWatch {
    /// Registers the park-event logger.
    fn watch(&self, worker: &mut Worker) {
        let Some(mut register) = worker.log_register() else { return };
        let (parked, park_started) = (Rc::clone(&self.parked), Rc::clone(&self.park_started));
        register.insert::<TimelyEventBuilder, _>(TIMELY_LOG, move |_time, events| {
            let Some(events) = events else { return };
            for (time, event) in events.iter() {
                match event {
                    TimelyEvent::Park(ParkEvent::Park(_)) => park_started.set(Some(*time)),
                    TimelyEvent::Park(ParkEvent::Unpark) => {
                        if let Some(started) = park_started.take() {
                            parked.set(parked.get() + time.saturating_sub(started));
                        }
                    }
                    _ => {}
                }
            }
        });
    }

    /// Runs `build` (which builds a dataflow) without the park-event logger, so that the dataflow's
    /// operators and channels take no `timely` logger (they would log every scheduling).
    pub(crate) fn building<R>(&self, worker: &mut Worker, build: impl FnOnce(&mut Worker) -> R) -> R {
        let removed = worker.log_register().and_then(|mut register| register.remove(TIMELY_LOG));
        let result = build(worker);
        if removed.is_some() {
            self.watch(worker);
        }
        result
    }
}

impl fmt::Debug for WorkerTelemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerTelemetry").finish_non_exhaustive()
    }
}

/// The name of timely's own logging stream (which carries park events).
const TIMELY_LOG: &str = "timely";
/// The name of differential's arrangement logging stream.
const ARRANGE_LOG: &str = "differential/arrange";

impl WorkerTelemetry {
    /// Registers the worker's loggers (arrangement sizes, park events): before any dataflow is built,
    /// so that every arrangement reports its batches.
    pub(crate) fn install(worker: &mut Worker, metrics: WorkerMetrics) -> WorkerTelemetry {
        let telemetry =
            WorkerTelemetry { metrics, parks: ParkWatch::default(), last_queued: 0, last_dataflows: 0 };
        let Some(mut register) = worker.log_register() else {
            warn!("the timely worker has no logging registry: no arrangement sizes or step times");
            return telemetry;
        };
        let (records, batches) =
            (telemetry.metrics.arrangement_records.clone(), telemetry.metrics.arrangement_batches.clone());
        register.insert::<DifferentialEventBuilder, _>(ARRANGE_LOG, move |_time, events| {
            let Some(events) = events else { return };
            let (mut added_records, mut added_batches) = (0i64, 0i64);
            for (_, event) in events.iter() {
                // The spine's events balance (differential's `logging` docs): a batch per `Batch`, one
                // less per completed `Merge` and per `Drop`.
                match event {
                    DifferentialEvent::Batch(batch) => {
                        added_records += batch.length as i64;
                        added_batches += 1;
                    }
                    DifferentialEvent::Merge(merge) => {
                        if let Some(complete) = merge.complete {
                            added_records += complete as i64 - (merge.length1 + merge.length2) as i64;
                            added_batches -= 1;
                        }
                    }
                    DifferentialEvent::Drop(drop) => {
                        added_records -= drop.length as i64;
                        added_batches -= 1;
                    }
                    _ => {}
                }
            }
            if added_records != 0 {
                records.add(added_records);
            }
            if added_batches != 0 {
                batches.add(added_batches);
            }
        });
        drop(register);
        telemetry.parks.watch(worker);
        telemetry
    }

    /// The park watch, for building a dataflow ([`ParkWatch::building`]).
    pub(crate) fn parks(&self) -> ParkWatch {
        self.parks.clone()
    }

    /// The start of a pass of the worker's loop.
    // A replica is a real process: step times are real time.
    #[allow(clippy::disallowed_methods)]
    pub(crate) fn start_pass(&self) -> Instant {
        self.parks.parked.set(Duration::ZERO);
        Instant::now()
    }

    /// The end of a pass that began at `started`: its time is a step's unless the worker parked in it;
    /// the queue of peeks and the count of dataflows are set when they changed.
    pub(crate) fn end_pass(&mut self, started: Instant, peeks_queued: usize, dataflows: usize) {
        let elapsed = started.elapsed();
        if self.parks.parked.get().is_zero() && self.parks.park_started.get().is_none() {
            self.metrics.step_seconds.observe(elapsed.as_secs_f64());
        }
        if peeks_queued != self.last_queued {
            self.last_queued = peeks_queued;
            self.metrics.peeks_queued.set(peeks_queued as i64);
        }
        if dataflows != self.last_dataflows {
            self.last_dataflows = dataflows;
            if let Some(gauge) = &self.metrics.dataflows {
                gauge.set(dataflows as i64);
            }
        }
    }

    /// The worker answered `count` peeks.
    pub(crate) fn peeks_answered(&self, count: usize) {
        if count > 0 {
            self.metrics.peeks_answered.inc_by(count as u64);
        }
    }
}
