//! The controller's Prometheus metrics: [`ControllerMetrics`] (the families, registered once per
//! controller in the registry the embedding service gives it, or in the controller's own), and the
//! per-instance [`InstanceMetrics`] an [`InstanceCore`](crate::InstanceCore) owns.
//!
//! - `compute_controller_commands_total` (counter; instance, replica, command): commands the instance issued
//!   to the replica's client (replays of the history on a reconnect not included)
//! - `compute_controller_command_bytes_total` (counter; instance, replica, command): their encoded frame
//!   bytes
//! - `compute_controller_responses_total` (counter; instance, replica, response): responses received from the
//!   replica (merged over its processes)
//! - `compute_controller_replica_status` (gauge; instance, replica, status): 1 for the replica's current
//!   status (`connecting`, `failed`, `hydrating`, `rehydrating`, `connected`, `fenced`), 0 for the others
//! - `compute_controller_replica_reconnects_total` (counter; instance, replica): connections after the first
//! - `compute_controller_replica_unhydrated_collections` (gauge; instance, replica): live collections not
//!   hydrated on the replica's current connection
//! - `compute_controller_hydration_time_seconds` (gauge; instance, replica, collection): how long the
//!   collection took to hydrate on the replica's current connection (no series until it has)
//! - `compute_controller_wallclock_lag_seconds` (histogram; instance, collection): now minus the collection's
//!   upper, observed once per introspection interval
//! - `compute_controller_peeks_total` (counter; instance, outcome): finished peeks (index and storage) by
//!   outcome: `rows`, `error`, `canceled`, `timed_out`
//! - `compute_controller_peek_duration_seconds` (histogram; instance): from the `peek` call to its result
//! - `compute_controller_pending_peeks` (gauge; instance): peeks that hold their collection (answered or not,
//!   while a replica owes an answer)
//! - `compute_controller_subscribes` (gauge; instance): live subscribes whose stream has not ended
//! - `compute_controller_subscribe_updates_total` (counter; instance): subscribe updates delivered
//! - `compute_controller_history_commands` (gauge; instance): commands in the history a new replica is
//!   replayed
//! - `compute_controller_collections` (gauge; instance): collections with state (live, or dropped and still
//!   held)
//! - `compute_controller_read_holds` (gauge; instance, kind): read holds the instance keeps: `import`
//!   (dataflows on their inputs), `replica_input` (per replica on storage inputs), `peek`
//!
//! **Series go with their objects.** An [`InstanceMetrics`] owns the [`Series`] of its instance, of each
//! replica and of each live collection's hydration times; a collection's lag histogram lives in the
//! core's state of that collection (`LagSeries`, made at its first observation). When the replica is
//! dropped, the collection dropped (by the user) or the instance's core dropped, the series are removed
//! from the registry. Nothing stale is exposed.
//!
//! **Cost on hot paths.** A frontier report or a command costs plain additions to per-replica tallies
//! (no atomic operation, no label formatting, no lock), flushed into the registry on every tick of the
//! instance ([`InstanceCore::tick`](crate::InstanceCore::tick)); a command's bytes are its exact encoded
//! size, measured without encoding it. Per-collection values (lag, gauges) are refreshed once per
//! introspection interval, in the walk over the collections the introspection does anyway (no lookup
//! per collection). A peek's outcome and duration are two atomic updates of handles made when the
//! instance was created ([`PeekRecorder`]). `cargo xtask bench controller` measures the peek throughput
//! and the cost of a frontier update with metrics against without (`controller.metrics_*`).
//!
//! **Tests:** `tests/it/metrics.rs` (every family appears, series go with their replica, collection and
//! instance, the tallies reach the registry).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};
use telemetry::Series;

use frontiers::Timestamp;
use protocol::frame::{FRAME_HEADER_BYTES, encoded_len};
use protocol::{ComputeCommand, ComputeResponse, GlobalId, InstanceId, ReplicaId};

use crate::introspection::ReplicaHealth;
use crate::response::PeekResult;

/// The command kinds, in the order of [`command_kind`].
const COMMANDS: [&str; 10] = [
    "Hello",
    "CreateInstance",
    "InitializationComplete",
    "UpdateConfiguration",
    "CreateDataflow",
    "Schedule",
    "AllowCompaction",
    "Peek",
    "CancelPeek",
    "AllowWrites",
];

/// The index of a command's kind in [`COMMANDS`].
fn command_kind<T: Timestamp>(command: &ComputeCommand<T>) -> usize {
    match command {
        ComputeCommand::Hello { .. } => 0,
        ComputeCommand::CreateInstance(_) => 1,
        ComputeCommand::InitializationComplete => 2,
        ComputeCommand::UpdateConfiguration(_) => 3,
        ComputeCommand::CreateDataflow(_) => 4,
        ComputeCommand::Schedule(_) => 5,
        ComputeCommand::AllowCompaction { .. } => 6,
        ComputeCommand::Peek(_) => 7,
        ComputeCommand::CancelPeek { .. } => 8,
        ComputeCommand::AllowWrites => 9,
    }
}

/// The response kinds, in the order of [`response_kind`].
const RESPONSES: [&str; 9] = [
    "Hello",
    "HelloRefused",
    "Frontiers",
    "PeekResponse",
    "SubscribeResponse",
    "CopyToResponse",
    "Status",
    "CommandRejected",
    "Fenced",
];

/// The index of a response's kind in [`RESPONSES`].
fn response_kind<T: Timestamp>(response: &ComputeResponse<T>) -> usize {
    match response {
        ComputeResponse::Hello { .. } => 0,
        ComputeResponse::HelloRefused { .. } => 1,
        ComputeResponse::Frontiers { .. } => 2,
        ComputeResponse::PeekResponse { .. } => 3,
        ComputeResponse::SubscribeResponse { .. } => 4,
        ComputeResponse::CopyToResponse { .. } => 5,
        ComputeResponse::Status(_) => 6,
        ComputeResponse::CommandRejected { .. } => 7,
        ComputeResponse::Fenced { .. } => 8,
    }
}

/// The replica statuses of `compute_controller_replica_status`, in the order of [`status_index`].
const STATUSES: [&str; 6] = ["connecting", "failed", "hydrating", "rehydrating", "connected", "fenced"];

fn status_index(health: &ReplicaHealth) -> usize {
    match health {
        ReplicaHealth::Connecting => 0,
        ReplicaHealth::Failed { .. } => 1,
        ReplicaHealth::Hydrating => 2,
        ReplicaHealth::Rehydrating => 3,
        ReplicaHealth::Connected => 4,
        ReplicaHealth::Fenced { .. } => 5,
    }
}

/// The peek outcomes of `compute_controller_peeks_total`.
const OUTCOMES: [&str; 4] = ["rows", "error", "canceled", "timed_out"];

/// The kinds of `compute_controller_read_holds`.
const HOLD_KINDS: [&str; 3] = ["import", "replica_input", "peek"];

/// Peek durations: 50 µs to 30 s.
const PEEK_BUCKETS_S: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Wall-clock lags: 100 ms to an hour.
const LAG_BUCKETS_S: [f64; 13] =
    [0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3_600.0];

/// The controller's metric families, registered in one registry. Cloning shares them.
#[derive(Clone)]
pub struct ControllerMetrics {
    commands: IntCounterVec,
    command_bytes: IntCounterVec,
    responses: IntCounterVec,
    replica_status: IntGaugeVec,
    replica_reconnects: IntCounterVec,
    replica_unhydrated: IntGaugeVec,
    hydration_time: GaugeVec,
    wallclock_lag: HistogramVec,
    peeks: IntCounterVec,
    peek_duration: HistogramVec,
    pending_peeks: IntGaugeVec,
    subscribes: IntGaugeVec,
    subscribe_updates: IntCounterVec,
    history_commands: IntGaugeVec,
    collections: IntGaugeVec,
    read_holds: IntGaugeVec,
}

impl fmt::Debug for ControllerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControllerMetrics").finish_non_exhaustive()
    }
}

/// A counter family: `name` with `labels`.
fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let family = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(family.clone()))?;
    Ok(family)
}

/// An integer gauge family: `name` with `labels`.
fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let family = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(family.clone()))?;
    Ok(family)
}

/// A histogram family: `name` with `labels` and `buckets`.
fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> prometheus::Result<HistogramVec> {
    let family = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)?;
    registry.register(Box::new(family.clone()))?;
    Ok(family)
}

impl ControllerMetrics {
    /// Registers the controller's families in `registry`. Fails if they are registered there already
    /// (one controller per registry).
    pub fn register(registry: &Registry) -> prometheus::Result<ControllerMetrics> {
        let ir = ["instance", "replica"];
        let hydration_time = GaugeVec::new(
            Opts::new(
                "compute_controller_hydration_time_seconds",
                "How long a collection took to hydrate on a replica's current connection.",
            ),
            &["instance", "replica", "collection"],
        )?;
        registry.register(Box::new(hydration_time.clone()))?;
        Ok(ControllerMetrics {
            commands: counter(
                registry,
                "compute_controller_commands_total",
                "Commands an instance issued to a replica, by kind (history replays not included).",
                &["instance", "replica", "command"],
            )?,
            command_bytes: counter(
                registry,
                "compute_controller_command_bytes_total",
                "Encoded frame bytes of the commands an instance issued to a replica, by kind.",
                &["instance", "replica", "command"],
            )?,
            responses: counter(
                registry,
                "compute_controller_responses_total",
                "Responses an instance received from a replica, by kind.",
                &["instance", "replica", "response"],
            )?,
            replica_status: gauge(
                registry,
                "compute_controller_replica_status",
                "1 for a replica's current status, 0 for the others.",
                &["instance", "replica", "status"],
            )?,
            replica_reconnects: counter(
                registry,
                "compute_controller_replica_reconnects_total",
                "Connections to a replica after its first.",
                &ir,
            )?,
            replica_unhydrated: gauge(
                registry,
                "compute_controller_replica_unhydrated_collections",
                "Live collections not hydrated on a replica's current connection.",
                &ir,
            )?,
            hydration_time,
            wallclock_lag: histogram(
                registry,
                "compute_controller_wallclock_lag_seconds",
                "Now minus a collection's upper, observed once per introspection interval.",
                &["instance", "collection"],
                &LAG_BUCKETS_S,
            )?,
            peeks: counter(
                registry,
                "compute_controller_peeks_total",
                "Finished peeks by outcome (rows, error, canceled, timed_out).",
                &["instance", "outcome"],
            )?,
            peek_duration: histogram(
                registry,
                "compute_controller_peek_duration_seconds",
                "From a peek call to its result.",
                &["instance"],
                &PEEK_BUCKETS_S,
            )?,
            pending_peeks: gauge(
                registry,
                "compute_controller_pending_peeks",
                "Peeks holding their collection (until every replica sent it answered).",
                &["instance"],
            )?,
            subscribes: gauge(
                registry,
                "compute_controller_subscribes",
                "Live subscribes whose stream has not ended.",
                &["instance"],
            )?,
            subscribe_updates: counter(
                registry,
                "compute_controller_subscribe_updates_total",
                "Subscribe updates delivered.",
                &["instance"],
            )?,
            history_commands: gauge(
                registry,
                "compute_controller_history_commands",
                "Commands in the history a new replica is replayed.",
                &["instance"],
            )?,
            collections: gauge(
                registry,
                "compute_controller_collections",
                "Collections with state (live, or dropped and still held).",
                &["instance"],
            )?,
            read_holds: gauge(
                registry,
                "compute_controller_read_holds",
                "Read holds an instance keeps, by kind (import, replica_input, peek).",
                &["instance", "kind"],
            )?,
        })
    }

    /// The metrics of instance `id`, for its core
    /// ([`InstanceCore::with_metrics`](crate::InstanceCore::with_metrics)).
    pub fn instance(&self, id: InstanceId) -> InstanceMetrics {
        let instance = id.to_string();
        let one = |family: &IntGaugeVec| Series::new(family, &[&instance]);
        let peeks = PeekSeries {
            outcomes: OUTCOMES.map(|outcome| Series::new(&self.peeks, &[&instance, outcome])),
            duration: Series::new(&self.peek_duration, &[&instance]),
        };
        InstanceMetrics {
            pending_peeks: one(&self.pending_peeks),
            subscribes: one(&self.subscribes),
            history_commands: one(&self.history_commands),
            collections_gauge: one(&self.collections),
            subscribe_updates: Tally::new(Series::new(&self.subscribe_updates, &[&instance])),
            read_holds: HOLD_KINDS.map(|kind| Series::new(&self.read_holds, &[&instance, kind])),
            peeks,
            replicas: BTreeMap::new(),
            hydration_times: BTreeMap::new(),
            families: self.clone(),
            instance,
        }
    }
}

/// A count kept in a plain integer and added to its counter when flushed: what a hot path updates.
struct Tally {
    pending: u64,
    series: Series<IntCounterVec>,
}

impl Tally {
    fn new(series: Series<IntCounterVec>) -> Tally {
        Tally { pending: 0, series }
    }

    fn flush(&mut self) {
        if self.pending > 0 {
            self.series.inc_by(std::mem::take(&mut self.pending));
        }
    }
}

/// Counts by kind (commands or responses) for one replica, made into series the first time a kind
/// is flushed with a count: kinds that never occur have no series.
struct KindTallies {
    family: IntCounterVec,
    /// Instance and replica.
    labels: [String; 2],
    kinds: &'static [&'static str],
    pending: Vec<u64>,
    series: Vec<Option<Series<IntCounterVec>>>,
}

impl KindTallies {
    fn new(family: &IntCounterVec, labels: [String; 2], kinds: &'static [&'static str]) -> KindTallies {
        KindTallies {
            family: family.clone(),
            labels,
            kinds,
            pending: vec![0; kinds.len()],
            series: kinds.iter().map(|_| None).collect(),
        }
    }

    fn add(&mut self, kind: usize, count: u64) {
        self.pending[kind] += count;
    }

    fn flush(&mut self) {
        for (kind, pending) in self.pending.iter_mut().enumerate() {
            if *pending == 0 {
                continue;
            }
            let series = self.series[kind].get_or_insert_with(|| {
                Series::new(&self.family, &[&self.labels[0], &self.labels[1], self.kinds[kind]])
            });
            series.inc_by(std::mem::take(pending));
        }
    }
}

/// One replica's series.
struct ReplicaMetrics {
    commands: KindTallies,
    command_bytes: KindTallies,
    responses: KindTallies,
    status: [Series<IntGaugeVec>; 6],
    reconnects: Series<IntCounterVec>,
    unhydrated: Series<IntGaugeVec>,
}

/// One live collection's wall-clock lag histogram. The core keeps it in the collection's own state
/// (made at the collection's first observation), so the observation once per interval needs no lookup
/// and touches no memory the walk over the collections does not reach anyway; it goes from the registry
/// when the core drops it (the collection dropped by the user, or the core itself).
pub(crate) struct LagSeries(Series<HistogramVec>);

impl LagSeries {
    /// Observes a lag of `lag_ms`.
    pub(crate) fn observe(&self, lag_ms: u64) {
        self.0.observe(lag_ms as f64 / 1_000.0);
    }
}

impl fmt::Debug for LagSeries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LagSeries").field(&self.0.labels()).finish()
    }
}

/// An instance's peek series, owned by its [`InstanceMetrics`].
struct PeekSeries {
    outcomes: [Series<IntCounterVec>; 4],
    duration: Series<HistogramVec>,
}

/// Records finished peeks: handles on the instance's peek series, for whoever sees peeks end (the
/// instance task, storage peek tasks). Cloning is cheap. The series belong to the instance's
/// [`InstanceMetrics`]; a recorder that outlives them updates nothing anyone reads.
#[derive(Clone)]
pub struct PeekRecorder {
    outcomes: [IntCounter; 4],
    duration: Histogram,
}

impl fmt::Debug for PeekRecorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeekRecorder").finish_non_exhaustive()
    }
}

impl PeekRecorder {
    /// Records a peek that ended with `result` after `duration`.
    pub fn record(&self, result: &PeekResult, duration: Duration) {
        use crate::error::PeekFailure;
        let outcome = match result {
            Ok(_) => 0,
            Err(PeekFailure::Canceled | PeekFailure::ReplicaCanceled(_)) => 2,
            Err(PeekFailure::TimedOut { .. }) => 3,
            Err(_) => 1,
        };
        self.outcomes[outcome].inc();
        self.duration.observe(duration.as_secs_f64());
    }
}

/// The metrics of one instance, owned by its core. See the module documentation.
pub struct InstanceMetrics {
    families: ControllerMetrics,
    instance: String,
    pending_peeks: Series<IntGaugeVec>,
    subscribes: Series<IntGaugeVec>,
    history_commands: Series<IntGaugeVec>,
    collections_gauge: Series<IntGaugeVec>,
    subscribe_updates: Tally,
    read_holds: [Series<IntGaugeVec>; 3],
    peeks: PeekSeries,
    replicas: BTreeMap<ReplicaId, ReplicaMetrics>,
    /// Per live collection that hydrated somewhere, per replica it hydrated on (current connection).
    hydration_times: BTreeMap<GlobalId, BTreeMap<ReplicaId, Series<GaugeVec>>>,
}

impl fmt::Debug for InstanceMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceMetrics")
            .field("instance", &self.instance)
            .field("replicas", &self.replicas.keys().collect::<Vec<_>>())
            .field("hydrated_collections", &self.hydration_times.len())
            .finish_non_exhaustive()
    }
}

/// What [`InstanceMetrics::refresh`] sets: the instance's gauges, read from its core.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct InstanceGauges {
    pub(crate) pending_peeks: usize,
    pub(crate) history_commands: usize,
    pub(crate) collections: usize,
}

/// What the core counts while it walks its collections once per introspection interval.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CollectionCounts {
    pub(crate) subscribes: usize,
    pub(crate) import_holds: usize,
    pub(crate) replica_input_holds: usize,
    pub(crate) peek_holds: usize,
}

impl InstanceMetrics {
    /// A recorder of this instance's finished peeks.
    pub fn peek_recorder(&self) -> PeekRecorder {
        PeekRecorder {
            outcomes: [0, 1, 2, 3].map(|i| IntCounter::clone(&self.peeks.outcomes[i])),
            duration: Histogram::clone(&self.peeks.duration),
        }
    }

    pub(crate) fn replica_added(&mut self, replica: ReplicaId) {
        let labels = [self.instance.clone(), replica.to_string()];
        let ir = [labels[0].as_str(), labels[1].as_str()];
        let families = &self.families;
        let metrics = ReplicaMetrics {
            commands: KindTallies::new(&families.commands, labels.clone(), &COMMANDS),
            command_bytes: KindTallies::new(&families.command_bytes, labels.clone(), &COMMANDS),
            responses: KindTallies::new(&families.responses, labels.clone(), &RESPONSES),
            status: STATUSES.map(|status| Series::new(&families.replica_status, &[ir[0], ir[1], status])),
            reconnects: Series::new(&families.replica_reconnects, &ir),
            unhydrated: Series::new(&families.replica_unhydrated, &ir),
        };
        let previous = self.replicas.insert(replica, metrics);
        assert!(previous.is_none(), "replica {replica} added twice to the metrics");
    }

    /// Removes every series of `replica`, its per-collection ones included.
    pub(crate) fn replica_dropped(&mut self, replica: ReplicaId) {
        self.replicas.remove(&replica);
        self.replica_disconnected(replica);
    }

    /// The replica lost its connection: its hydration times were of that connection.
    pub(crate) fn replica_disconnected(&mut self, replica: ReplicaId) {
        for replicas in self.hydration_times.values_mut() {
            replicas.remove(&replica);
        }
        self.hydration_times.retain(|_, replicas| !replicas.is_empty());
    }

    pub(crate) fn replica_reconnected(&mut self, replica: ReplicaId) {
        if let Some(metrics) = self.replicas.get(&replica) {
            metrics.reconnects.inc();
        }
    }

    pub(crate) fn replica_status(&mut self, replica: ReplicaId, health: &ReplicaHealth) {
        let Some(metrics) = self.replicas.get(&replica) else { return };
        let current = status_index(health);
        for (index, series) in metrics.status.iter().enumerate() {
            series.set(i64::from(index == current));
        }
    }

    /// A command the core hands to its shell for `replica`: counted, with its frame's exact size.
    pub(crate) fn command<T: Timestamp>(&mut self, replica: ReplicaId, command: &ComputeCommand<T>) {
        let Some(metrics) = self.replicas.get_mut(&replica) else { return };
        let kind = command_kind(command);
        // The size the frame's payload would have, walked without writing, plus its header (a command
        // that reached here fits a frame: `check_command_size` admitted it).
        let bytes = encoded_len(command).saturating_add(FRAME_HEADER_BYTES as u64);
        metrics.commands.add(kind, 1);
        metrics.command_bytes.add(kind, bytes);
    }

    pub(crate) fn response<T: Timestamp>(&mut self, replica: ReplicaId, response: &ComputeResponse<T>) {
        if let Some(metrics) = self.replicas.get_mut(&replica) {
            metrics.responses.add(response_kind(response), 1);
        }
    }

    pub(crate) fn subscribe_updates(&mut self, updates: usize) {
        self.subscribe_updates.pending += updates as u64;
    }

    /// The lag histogram of live collection `id`, for the core to keep in the collection's state.
    pub(crate) fn lag_series(&self, id: GlobalId) -> LagSeries {
        LagSeries(Series::new(&self.families.wallclock_lag, &[&self.instance, &id.to_string()]))
    }

    /// The user dropped `id`: its hydration times go (its lag series goes with the core's state of it).
    pub(crate) fn collection_dropped(&mut self, id: GlobalId) {
        self.hydration_times.remove(&id);
    }

    /// Live collection `id` hydrated on `replica`'s current connection in `hydration_ms`.
    pub(crate) fn hydrated(&mut self, id: GlobalId, replica: ReplicaId, hydration_ms: u64) {
        let series = self.hydration_times.entry(id).or_default().entry(replica).or_insert_with(|| {
            Series::new(
                &self.families.hydration_time,
                &[&self.instance, &replica.to_string(), &id.to_string()],
            )
        });
        series.set(hydration_ms as f64 / 1_000.0);
    }

    /// The replica's count of live collections not hydrated on its current connection.
    pub(crate) fn unhydrated(&mut self, replica: ReplicaId, count: usize) {
        if let Some(metrics) = self.replicas.get(&replica) {
            metrics.unhydrated.set(count as i64);
        }
    }

    /// Sets the instance's gauges and adds every tally to its counter.
    pub(crate) fn refresh(&mut self, gauges: InstanceGauges) {
        self.pending_peeks.set(gauges.pending_peeks as i64);
        self.history_commands.set(gauges.history_commands as i64);
        self.collections_gauge.set(gauges.collections as i64);
        self.subscribe_updates.flush();
        for metrics in self.replicas.values_mut() {
            metrics.commands.flush();
            metrics.command_bytes.flush();
            metrics.responses.flush();
        }
    }

    /// Sets the gauges counted in a walk over the collections.
    pub(crate) fn collection_counts(&mut self, counts: CollectionCounts) {
        self.subscribes.set(counts.subscribes as i64);
        let holds = [counts.import_holds, counts.replica_input_holds, counts.peek_holds];
        for (series, count) in self.read_holds.iter().zip(holds) {
            series.set(count as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_and_response_kind_has_its_name() {
        let commands: [ComputeCommand<u64>; 3] = [
            ComputeCommand::AllowWrites,
            ComputeCommand::Schedule(GlobalId::User(1)),
            ComputeCommand::InitializationComplete,
        ];
        for command in &commands {
            assert_eq!(COMMANDS[command_kind(command)], command.name());
        }
        let response: ComputeResponse<u64> =
            ComputeResponse::CommandRejected { command: "x".into(), reason: "y".into() };
        assert_eq!(RESPONSES[response_kind(&response)], response.name());
        let status = ReplicaHealth::Failed { reason: "boom".into() };
        assert_eq!(STATUSES[status_index(&status)], status.name());
    }
}
