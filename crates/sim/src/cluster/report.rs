//! What the cluster scenario tells its user: the counters and latency samples it collects ([`Stats`]),
//! the terminal display ([`Ui`]: event lines, a hydration progress bar and a carriage-return status line),
//! and the final [`Report`], printed for people or as JSON.
//!
//! **Display rules.** Event lines (a replica killed, restarted, caught up; a dataflow recreated) go to
//! stderr as they happen. The progress bar and the live status line are drawn only when stderr is a
//! terminal; otherwise the scenario stays quiet until its report. The report goes to stdout (JSON with
//! `--json`, nothing else on stdout then).
//!
//! **Not here:** any checking; the checks record into [`Stats`] and this module only counts and prints.
//! **Tests:** percentile arithmetic below; the rest is seen by running `sim cluster`.

// This module is the scenario's user interface: printing is its job.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cluster::now;
use crate::cluster::outage::OutageKind;
use crate::cluster::timeline::Timeline;

/// Latency samples in microseconds, with percentiles.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    values: Vec<u64>,
}

impl Samples {
    /// Adds a sample.
    pub fn push(&mut self, value: u64) {
        self.values.push(value);
    }

    /// Summary in milliseconds.
    pub fn summary_ms(&self) -> LatencySummary {
        let mut sorted = self.values.clone();
        sorted.sort_unstable();
        let at = |p: f64| percentile_sorted(&sorted, p) as f64 / 1_000.0;
        LatencySummary {
            count: sorted.len() as u64,
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: sorted.last().copied().unwrap_or(0) as f64 / 1_000.0,
        }
    }
}

#[cfg(test)]
fn percentile(values: &mut [u64], p: f64) -> u64 {
    values.sort_unstable();
    percentile_sorted(values, p)
}

/// The `p`-th percentile (nearest rank) of sorted values, `0` when empty.
fn percentile_sorted(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Percentiles of a latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// One replica crash and recovery.
#[derive(Debug, Clone, Serialize)]
pub struct Rehydration {
    /// The replica.
    pub replica: String,
    /// Its processes (all killed).
    pub processes: usize,
    /// When it was killed (or, for the fresh replica, added), seconds into the run.
    pub killed_at_s: f64,
    /// From the kill until the orchestrator had restarted its processes.
    pub restarted_ms: Option<u64>,
    /// From the kill until it answered a peek (targeted at it) at the latest time written before the kill.
    pub answered_peek_ms: Option<u64>,
    /// From the kill until every collection on it had passed that time again.
    pub caught_up_ms: Option<u64>,
    /// Appends in flight in the process that appends its materialized view (process 0), read from its
    /// `storage_appends_in_flight` gauge just before the SIGKILL (`None`: not read, e.g. the fresh
    /// replica).
    pub view_appends_in_flight: Option<u64>,
    /// Whether it was killed during a storage outage.
    pub during_outage: bool,
}

/// One storage outage (`outage.rs`) and what the scenario saw through it.
#[derive(Debug, Clone, Serialize)]
pub struct OutageReport {
    /// Which store.
    pub kind: OutageKind,
    /// What was done to it.
    pub action: String,
    /// When it was taken down, seconds into the run.
    pub started_at_s: f64,
    /// When it was back (accepting requests again), seconds into the run.
    pub ended_at_s: f64,
    /// Which outage of the run it was (1 for the first).
    #[serde(skip)]
    pub number: u64,
    /// Peeks a replica answered while the store was down, each checked against the oracle (the check may
    /// finish after the outage: see `peeks_checked_during`). Filled in when the run's report is made.
    pub peeks_answered: u64,
    /// Peeks whose check against the oracle finished while the store was down. Fewer than
    /// `peeks_answered` when the replicas had read a write whose acknowledgement the table writer was
    /// still waiting for: the checks of results at that write's time wait for it.
    pub peeks_checked_during: u64,
    /// Table appends acknowledged while it was down.
    pub appends_during: u64,
    /// Subscribe batches checked while it was down.
    pub subscribe_batches_during: u64,
    /// From the store's return until the table writer's next acknowledged append.
    pub appends_resumed_ms: Option<u64>,
    /// From the store's return until the next checked subscribe batch.
    pub subscribe_resumed_ms: Option<u64>,
    /// From the store's return until the materialized view's storage upper advanced (its appends resumed).
    pub view_resumed_ms: Option<u64>,
    /// Table rows written after it ended (to the end of the run).
    pub rows_written_after: u64,
    /// `rows_written` when it ended.
    #[serde(skip)]
    pub rows_written_at_end: u64,
    /// The replica killed during it while its view append was stuck, if one was.
    pub killed: Option<String>,
}

/// One cut of a replica's links (`--netns`, `netns.rs`) and what the scenario saw through it.
#[derive(Debug, Clone, Serialize)]
pub struct LinkCutReport {
    /// The replica cut off.
    pub replica: String,
    /// Its links taken down (one per process).
    pub links: usize,
    /// When they went down, seconds into the run.
    pub started_at_s: f64,
    /// When they were up again, seconds into the run.
    pub ended_at_s: f64,
    /// Peeks (not targeted) checked against the oracle while the links were down: answered by the other
    /// replicas, the victim being unreachable.
    pub peeks_answered: u64,
    /// Table appends acknowledged while they were down.
    pub appends_during: u64,
    /// Whether the controller dropped its connection to the replica and made a new one (its frontiers
    /// reset) between the cut and the catch-up; without it the connection outlived the cut.
    pub reconnected: bool,
    /// From the restore until the replica answered a peek targeted at it at the latest time written
    /// before the restore.
    pub answered_peek_ms: Option<u64>,
    /// From the restore until every collection on it had passed that time.
    pub caught_up_ms: Option<u64>,
}

/// One drop and recreation of a dataflow.
#[derive(Debug, Clone, Serialize)]
pub struct Recreation {
    /// The dropped index.
    pub dropped: String,
    /// Its replacement.
    pub created: String,
    /// From creation until its upper passed its as-of.
    pub hydrated_ms: Option<u64>,
    /// From the drop until the controller held no state for the dropped index any more.
    pub state_removed_ms: Option<u64>,
}

/// Counters and samples, shared by every task of the scenario.
#[derive(Debug)]
pub struct Stats {
    /// When the timed run started (after the initial hydration).
    pub started: Mutex<Option<Instant>>,
    /// The timed run's length once it is over, in seconds.
    pub finished_s: Mutex<Option<f64>>,
    /// Table updates written during the run (the initial load not counted).
    pub rows_written: AtomicU64,
    /// Rows of the initial load.
    pub rows_loaded: AtomicU64,
    /// Appends during the run.
    pub appends: AtomicU64,
    /// Index peeks checked against the oracle.
    pub peeks: AtomicU64,
    /// Peeks not issued because the index had no readable time yet (just recreated).
    pub peeks_skipped: AtomicU64,
    /// Storage peeks of the materialized view checked.
    pub storage_peeks: AtomicU64,
    /// Subscribe batches checked.
    pub subscribe_batches: AtomicU64,
    /// Subscribe updates received.
    pub subscribe_updates: AtomicU64,
    /// Full-contents checks at the end (every index on every replica, the materialized view).
    pub final_checks: AtomicU64,
    /// Latency of peeks at each index's latest readable time, in microseconds.
    pub latency: Mutex<Samples>,
    /// Latency of peeks at the latest written time (waiting for the dataflow to catch up), microseconds.
    pub fresh_latency: Mutex<Samples>,
    /// `latency`'s peeks that overlapped a storage outage, microseconds.
    pub outage_latency: Mutex<Samples>,
    /// `latency`'s peeks that did not, microseconds.
    pub steady_latency: Mutex<Samples>,
    /// Whether a storage outage is going on (from just before the store is taken down until it is back).
    outage_active: AtomicBool,
    /// Storage outages begun.
    outages_begun: AtomicU64,
    /// Storage outages, as they ended.
    pub outages: Mutex<Vec<OutageReport>>,
    /// Checked peeks answered during each outage, by its number (see [`Stats::peek_answered`]).
    outage_peeks: Mutex<BTreeMap<u64, u64>>,
    /// Link cuts, as they ended.
    pub link_cuts: Mutex<Vec<LinkCutReport>>,
    /// Replica processes that exited other than by the scenario's SIGKILLs.
    pub replica_exits: AtomicU64,
    /// Recent peek latencies for the live display: `(when, microseconds)`.
    recent: Mutex<VecDeque<(Instant, u64)>>,
    /// Peeks checked per kind.
    pub by_kind: Mutex<BTreeMap<&'static str, u64>>,
    /// Now minus the slowest index's upper, sampled, in milliseconds.
    pub frontier_lag: Mutex<Samples>,
    /// Initial hydration of every dataflow on every replica.
    pub hydration_ms: Mutex<Option<u64>>,
    /// Crashes and recoveries.
    pub rehydrations: Mutex<Vec<Rehydration>>,
    /// The baseline: a fresh replica hydrating the same data at the end.
    pub fresh_hydration: Mutex<Option<Rehydration>>,
    /// Drops and recreations.
    pub recreations: Mutex<Vec<Recreation>>,
    /// Replica status rows read back from introspection at the end.
    pub introspection: Mutex<Vec<String>>,
    /// Every child process the scenario started (every replica process, restarts included), to verify at the end that none is left.
    pub child_pids: Mutex<BTreeSet<u32>>,
    /// What the run sampled each second, and its faults, for `--report` (`timeline.rs`).
    pub timeline: Mutex<Timeline>,
    violation_count: AtomicU64,
    violations: Mutex<Vec<String>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Mutex::new(None),
            finished_s: Mutex::new(None),
            rows_written: AtomicU64::new(0),
            rows_loaded: AtomicU64::new(0),
            appends: AtomicU64::new(0),
            peeks: AtomicU64::new(0),
            peeks_skipped: AtomicU64::new(0),
            storage_peeks: AtomicU64::new(0),
            subscribe_batches: AtomicU64::new(0),
            subscribe_updates: AtomicU64::new(0),
            final_checks: AtomicU64::new(0),
            latency: Mutex::default(),
            fresh_latency: Mutex::default(),
            outage_latency: Mutex::default(),
            steady_latency: Mutex::default(),
            outage_active: AtomicBool::new(false),
            outages_begun: AtomicU64::new(0),
            outages: Mutex::default(),
            outage_peeks: Mutex::default(),
            link_cuts: Mutex::default(),
            replica_exits: AtomicU64::new(0),
            recent: Mutex::default(),
            by_kind: Mutex::default(),
            frontier_lag: Mutex::default(),
            hydration_ms: Mutex::new(None),
            rehydrations: Mutex::default(),
            fresh_hydration: Mutex::new(None),
            recreations: Mutex::default(),
            introspection: Mutex::default(),
            child_pids: Mutex::default(),
            timeline: Mutex::default(),
            violation_count: AtomicU64::new(0),
            violations: Mutex::default(),
        }
    }
}

/// Locks a mutex of the scenario's bookkeeping (a poisoned lock means a task panicked: give up).
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().expect("a scenario task panicked while holding a lock")
}

impl Stats {
    /// Records a violation: a result that differs from the oracle, or a broken promise of the system.
    pub fn violation(&self, what: String) {
        tracing::error!(violation = %what, "violation");
        self.violation_count.fetch_add(1, Ordering::SeqCst);
        let mut violations = lock(&self.violations);
        if violations.len() < 20 {
            violations.push(what);
        }
    }

    /// The number of violations.
    pub fn violation_count(&self) -> u64 {
        self.violation_count.load(Ordering::SeqCst)
    }

    /// A storage outage begins (`true`) or ends (`false`).
    pub fn set_outage(&self, active: bool) {
        if active {
            self.outages_begun.fetch_add(1, Ordering::SeqCst);
        }
        let was = self.outage_active.swap(active, Ordering::SeqCst);
        assert_ne!(was, active, "outages neither nest nor end twice");
    }

    /// Where outages stand, to take before an operation and give to [`overlapped_outage`](Self::overlapped_outage)
    /// after it.
    pub fn outage_marker(&self) -> (bool, u64) {
        (self.outage_active.load(Ordering::SeqCst), self.outages_begun.load(Ordering::SeqCst))
    }

    /// Whether an operation that began at `marker` overlapped an outage: one was going on then, is now, or
    /// began in between.
    pub fn overlapped_outage(&self, (active, begun): (bool, u64)) -> bool {
        let (now_active, now_begun) = self.outage_marker();
        active || now_active || now_begun != begun
    }

    /// Records that a peek whose rows arrived at `marker` (an [`outage_marker`](Self::outage_marker)
    /// read then) passed its check: it counts for the outage going on then, if one was, however late the
    /// check finished.
    pub fn peek_answered(&self, (active, begun): (bool, u64)) {
        if active {
            *lock(&self.outage_peeks).entry(begun).or_insert(0) += 1;
        }
    }

    /// Records a checked peek (`during_outage`: it overlapped a storage outage).
    pub fn peek(&self, kind: &'static str, fresh: bool, latency: Duration, during_outage: bool) {
        let micros = latency.as_micros() as u64;
        self.peeks.fetch_add(1, Ordering::Relaxed);
        if fresh {
            lock(&self.fresh_latency).push(micros);
        } else {
            lock(&self.latency).push(micros);
            lock(if during_outage { &self.outage_latency } else { &self.steady_latency }).push(micros);
            let mut recent = lock(&self.recent);
            recent.push_back((now(), micros));
            while recent.len() > 20_000 {
                recent.pop_front();
            }
        }
        *lock(&self.by_kind).entry(kind).or_insert(0) += 1;
    }

    /// p50 and p99 of the peeks of the last `window`, in microseconds.
    pub fn recent_percentiles(&self, window: Duration) -> (u64, u64) {
        let cutoff = now().checked_sub(window);
        let mut values: Vec<u64> = lock(&self.recent)
            .iter()
            .filter(|(at, _)| cutoff.is_none_or(|c| *at >= c))
            .map(|(_, v)| *v)
            .collect();
        values.sort_unstable();
        (percentile_sorted(&values, 50.0), percentile_sorted(&values, 99.0))
    }

    /// Seconds since the timed run started (its whole length once it is over).
    pub fn elapsed_s(&self) -> f64 {
        if let Some(finished) = *lock(&self.finished_s) {
            return finished;
        }
        lock(&self.started).map_or(0.0, |s| s.elapsed().as_secs_f64())
    }
}

/// The terminal: event lines, and the live line when stderr is a terminal.
#[derive(Debug)]
pub struct Ui {
    live: bool,
    /// The terminal's width: a live line longer than this would wrap, and `\r` could not redraw it.
    width: usize,
    /// Whether a live line is on screen (to be cleared before the next event line).
    drawn: Mutex<bool>,
}

/// The terminal's width in columns, from `stty size` on the controlling terminal (no libc), else
/// `$COLUMNS`, else 100.
fn terminal_width() -> usize {
    let from_stty = std::fs::File::open("/dev/tty").ok().and_then(|tty| {
        let output = std::process::Command::new("stty")
            .arg("size")
            .stdin(tty)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8(output.stdout).ok()?;
        text.split_whitespace().nth(1)?.parse::<usize>().ok()
    });
    from_stty
        .or_else(|| std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()))
        .filter(|w| *w >= 20)
        .unwrap_or(100)
}

impl Ui {
    /// A display; live lines only if stderr is a terminal.
    pub fn new() -> Ui {
        let live = std::io::stderr().is_terminal();
        Ui { live, width: if live { terminal_width() } else { 100 }, drawn: Mutex::new(false) }
    }

    /// Whether live lines are drawn.
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// Prints an event line (above the live line).
    pub fn say(&self, message: &str) {
        let mut drawn = lock(&self.drawn);
        let mut err = std::io::stderr().lock();
        if *drawn {
            let _ = write!(err, "\r\x1b[2K");
            *drawn = false;
        }
        let _ = writeln!(err, "{message}");
    }

    /// Prints an event line prefixed with the run's clock.
    pub fn event(&self, stats: &Stats, message: &str) {
        self.say(&format!("  {:>6.1}s  {message}", stats.elapsed_s()));
    }

    /// Redraws the live line (nothing when stderr is not a terminal).
    pub fn live(&self, line: &str) {
        if !self.live {
            return;
        }
        // Cut to the terminal's width, so the line never wraps.
        let line =
            line.char_indices().nth(self.width.saturating_sub(1)).map_or(line, |(end, _)| &line[..end]);
        let mut drawn = lock(&self.drawn);
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
        *drawn = true;
    }

    /// Clears the live line.
    pub fn clear(&self) {
        let mut drawn = lock(&self.drawn);
        if *drawn {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
            *drawn = false;
        }
    }
}

/// A progress bar `[#####.....]` of `width` cells.
pub fn bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done * width).checked_div(total).unwrap_or(width).min(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every check passed.
    Passed,
    /// Some check failed (see `violations`).
    Failed,
    /// Ctrl-C.
    Interrupted,
    /// The scenario itself could not go on (see `error`).
    Error,
}

/// One replica of the run.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaReport {
    /// Its id.
    pub replica: String,
    /// Processes.
    pub processes: usize,
    /// Timely workers per process.
    pub workers: usize,
}

/// Peek counts and latencies.
#[derive(Debug, Clone, Serialize)]
pub struct PeekReport {
    /// Index peeks checked against the oracle.
    pub checked: u64,
    /// Per second of the run.
    pub per_second: f64,
    /// Peeks at each index's latest readable time (`upper - 1`), milliseconds.
    pub latency_ms: LatencySummary,
    /// Peeks at the latest written time (includes waiting for the dataflow), milliseconds.
    pub fresh_latency_ms: LatencySummary,
    /// `latency_ms`'s peeks that overlapped a storage outage.
    pub during_outages_latency_ms: LatencySummary,
    /// `latency_ms`'s peeks that did not.
    pub outside_outages_latency_ms: LatencySummary,
    /// Checked per kind.
    pub by_kind: BTreeMap<String, u64>,
    /// Not issued: the index had no readable time yet.
    pub skipped: u64,
    /// Storage peeks of the materialized view, checked.
    pub materialized_view_checked: u64,
}

/// The final report. See the module documentation.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// How it ended.
    pub outcome: Outcome,
    /// Why the scenario stopped early, if it did.
    pub error: Option<String>,
    /// Seconds of timed run.
    pub duration_s: f64,
    /// The workload's seed.
    pub seed: u64,
    /// Where the collections lived: `shards (blob KIND, consensus KIND)` (no credentials).
    pub storage: String,
    /// Which storage outages the run injected, or why none (`outage.rs`).
    pub outage_injection: String,
    /// The storage outages.
    pub outages: Vec<OutageReport>,
    /// Where the processes ran: `loopback`, or the network namespaces of `--netns` (`netns.rs`).
    pub network: String,
    /// Which link cuts the run injected, or why none.
    pub link_cut_injection: String,
    /// The link cuts.
    pub link_cuts: Vec<LinkCutReport>,
    /// Target rate, rows per second.
    pub target_rate: u64,
    /// The replicas.
    pub replicas: Vec<ReplicaReport>,
    /// Rows of the initial load.
    pub rows_loaded: u64,
    /// Table updates written during the run.
    pub rows_written: u64,
    /// Per second.
    pub rows_per_second: f64,
    /// Appends during the run.
    pub appends: u64,
    /// Initial hydration of every dataflow on every replica, milliseconds.
    pub hydration_ms: Option<u64>,
    /// Peeks.
    pub peeks: PeekReport,
    /// Subscribe batches checked (each time range once, accumulating to the oracle).
    pub subscribe_batches: u64,
    /// Subscribe updates received.
    pub subscribe_updates: u64,
    /// Replica crashes and recoveries.
    pub rehydrations: Vec<Rehydration>,
    /// The baseline: a fresh replica (shaped like the first one killed) added during the run, under the
    /// same load, timed like a rehydration.
    pub fresh_hydration: Option<Rehydration>,
    /// Dataflow drops and recreations.
    pub recreations: Vec<Recreation>,
    /// Now minus the slowest index's upper, milliseconds.
    pub frontier_lag_ms: LatencySummary,
    /// Full-contents checks at the end.
    pub final_checks: u64,
    /// Replica status rows read back from the introspection collection at the end.
    pub introspection: Vec<String>,
    /// Child processes started during the run, each verified gone after the cleanup (one still running
    /// is a violation).
    pub child_processes: u64,
    /// Replica processes that exited other than by the scenario's SIGKILLs (e.g. on a storage error; the
    /// orchestrator restarts them; the other processes of a killed multi-process replica may exit first
    /// when their peers die).
    pub replica_exits: u64,
    /// Violations (at most 20 described).
    pub violation_count: u64,
    /// Their descriptions.
    pub violations: Vec<String>,
}

impl Report {
    /// The report with where the collections lived (see [`Report::storage`]).
    pub fn with_storage(mut self, storage: String) -> Report {
        self.storage = storage;
        self
    }

    /// The report with what it says about outages (see [`Report::outage_injection`]).
    pub fn with_outage_injection(mut self, injection: String) -> Report {
        self.outage_injection = injection;
        self
    }

    /// The report with where the processes ran and what it says about link cuts (see [`Report::network`],
    /// [`Report::link_cut_injection`]).
    pub fn with_network(mut self, network: String, link_cut_injection: String) -> Report {
        self.network = network;
        self.link_cut_injection = link_cut_injection;
        self
    }

    /// The report of a run from its stats.
    pub fn new(
        stats: &Stats,
        outcome: Outcome,
        error: Option<String>,
        seed: u64,
        target_rate: u64,
        replicas: Vec<ReplicaReport>,
    ) -> Report {
        let duration_s = stats.elapsed_s();
        let rows_written = stats.rows_written.load(Ordering::SeqCst);
        let outage_peeks = lock(&stats.outage_peeks).clone();
        let peeks = stats.peeks.load(Ordering::SeqCst);
        let per_second = |n: u64| if duration_s > 0.0 { n as f64 / duration_s } else { 0.0 };
        let violation_count = stats.violation_count();
        let outcome = match outcome {
            Outcome::Passed if violation_count > 0 => Outcome::Failed,
            other => other,
        };
        Report {
            outcome,
            error,
            duration_s,
            seed,
            storage: String::new(),
            outage_injection: String::new(),
            network: "loopback".to_string(),
            link_cut_injection: String::new(),
            link_cuts: lock(&stats.link_cuts).clone(),
            outages: lock(&stats.outages)
                .iter()
                .map(|o| OutageReport {
                    rows_written_after: rows_written.saturating_sub(o.rows_written_at_end),
                    peeks_answered: outage_peeks.get(&o.number).copied().unwrap_or(0),
                    ..o.clone()
                })
                .collect(),
            target_rate,
            replicas,
            rows_loaded: stats.rows_loaded.load(Ordering::SeqCst),
            rows_written,
            rows_per_second: per_second(rows_written),
            appends: stats.appends.load(Ordering::SeqCst),
            hydration_ms: *lock(&stats.hydration_ms),
            peeks: PeekReport {
                checked: peeks,
                per_second: per_second(peeks),
                latency_ms: lock(&stats.latency).summary_ms(),
                fresh_latency_ms: lock(&stats.fresh_latency).summary_ms(),
                during_outages_latency_ms: lock(&stats.outage_latency).summary_ms(),
                outside_outages_latency_ms: lock(&stats.steady_latency).summary_ms(),
                by_kind: lock(&stats.by_kind).iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                skipped: stats.peeks_skipped.load(Ordering::SeqCst),
                materialized_view_checked: stats.storage_peeks.load(Ordering::SeqCst),
            },
            subscribe_batches: stats.subscribe_batches.load(Ordering::SeqCst),
            subscribe_updates: stats.subscribe_updates.load(Ordering::SeqCst),
            rehydrations: lock(&stats.rehydrations).clone(),
            fresh_hydration: lock(&stats.fresh_hydration).clone(),
            recreations: lock(&stats.recreations).clone(),
            frontier_lag_ms: {
                let lag = lock(&stats.frontier_lag);
                // Lag samples are milliseconds already; the summary divides by 1,000.
                let mut micros = Samples::default();
                for v in &lag.values {
                    micros.push(v * 1_000);
                }
                micros.summary_ms()
            },
            final_checks: stats.final_checks.load(Ordering::SeqCst),
            introspection: lock(&stats.introspection).clone(),
            child_processes: lock(&stats.child_pids).len() as u64,
            replica_exits: stats.replica_exits.load(Ordering::SeqCst),
            violation_count,
            violations: lock(&stats.violations).clone(),
        }
    }

    /// Prints the report for people (stdout).
    pub fn print(&self) {
        let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{:.2} s", v as f64 / 1_000.0));
        let lat = |l: &LatencySummary| {
            format!("p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.1} ms", l.p50, l.p90, l.p99, l.max)
        };
        let replicas: Vec<String> = self
            .replicas
            .iter()
            .map(|r| {
                format!(
                    "{} ({} process{} x {} worker{})",
                    r.replica,
                    r.processes,
                    if r.processes == 1 { "" } else { "es" },
                    r.workers,
                    if r.workers == 1 { "" } else { "s" }
                )
            })
            .collect();
        println!();
        println!(
            "cluster scenario report (seed {}, {:.1} s, replicas {})",
            self.seed,
            self.duration_s,
            replicas.join(", ")
        );
        println!(
            "  rows written      {} ({:.0}/s, target {}/s) in {} appends, after an initial load of {}",
            thousands(self.rows_written),
            self.rows_per_second,
            thousands(self.target_rate),
            thousands(self.appends),
            thousands(self.rows_loaded)
        );
        println!("  storage           {}", self.storage);
        println!("  hydration         every dataflow on every replica in {}", ms(self.hydration_ms));
        println!(
            "  peeks             {} checked ({:.0}/s), {} skipped while an index was not yet readable",
            thousands(self.peeks.checked),
            self.peeks.per_second,
            thousands(self.peeks.skipped)
        );
        println!("    at index upper  {}", lat(&self.peeks.latency_ms));
        println!(
            "    at latest write {} ({} peeks)",
            lat(&self.peeks.fresh_latency_ms),
            thousands(self.peeks.fresh_latency_ms.count)
        );
        if !self.outages.is_empty() {
            println!(
                "    in outages      {} ({} peeks)",
                lat(&self.peeks.during_outages_latency_ms),
                thousands(self.peeks.during_outages_latency_ms.count)
            );
            println!(
                "    outside them    {} ({} peeks)",
                lat(&self.peeks.outside_outages_latency_ms),
                thousands(self.peeks.outside_outages_latency_ms.count)
            );
        }
        let kinds: Vec<String> =
            self.peeks.by_kind.iter().map(|(k, v)| format!("{k} {}", thousands(*v))).collect();
        println!("    by kind         {}", kinds.join(", "));
        println!(
            "  materialized view {} storage peeks checked",
            thousands(self.peeks.materialized_view_checked)
        );
        println!(
            "  subscribe         {} batches checked ({} updates): contiguous, each time range once, equal to the oracle",
            thousands(self.subscribe_batches),
            thousands(self.subscribe_updates)
        );
        println!(
            "  frontier lag      p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (now minus the slowest index's upper)",
            self.frontier_lag_ms.p50, self.frontier_lag_ms.p99, self.frontier_lag_ms.max
        );
        println!("  storage outages   {}", self.outage_injection);
        for o in &self.outages {
            println!(
                "  outage            {} from {:.1} s to {:.1} s ({}): {} peeks answered, {} appends, {} subscribe batches during it; after it appends resumed in {}, the subscribe in {}, the view's appends in {}; {} rows written after it{}",
                o.kind.name(),
                o.started_at_s,
                o.ended_at_s,
                o.action,
                thousands(o.peeks_answered),
                thousands(o.appends_during),
                thousands(o.subscribe_batches_during),
                ms(o.appends_resumed_ms),
                ms(o.subscribe_resumed_ms),
                ms(o.view_resumed_ms),
                thousands(o.rows_written_after),
                o.killed.as_ref().map_or(String::new(), |r| format!("; {r} killed during it")),
            );
        }
        println!("  network           {}", self.network);
        println!("  link cuts         {}", self.link_cut_injection);
        for c in &self.link_cuts {
            println!(
                "  link cut          {} ({} link{}) from {:.1} s to {:.1} s: {} peeks answered by the other replicas, {} appends during it; after it {}, answered a peek at the restore time after {}, caught up after {}",
                c.replica,
                c.links,
                if c.links == 1 { "" } else { "s" },
                c.started_at_s,
                c.ended_at_s,
                thousands(c.peeks_answered),
                thousands(c.appends_during),
                if c.reconnected { "reconnected" } else { "the same connection went on" },
                ms(c.answered_peek_ms),
                ms(c.caught_up_ms)
            );
        }
        for r in &self.rehydrations {
            println!(
                "  rehydration       {} ({} process{}) killed at {:.1} s{} with {} view append(s) in flight: restarted after {}, answered a peek at the kill time after {}, caught up after {}",
                r.replica,
                r.processes,
                if r.processes == 1 { "" } else { "es" },
                r.killed_at_s,
                if r.during_outage { " (in an outage)" } else { "" },
                r.view_appends_in_flight.map_or("?".to_string(), |n| n.to_string()),
                ms(r.restarted_ms),
                ms(r.answered_peek_ms),
                ms(r.caught_up_ms)
            );
        }
        if let Some(fresh) = &self.fresh_hydration {
            let ratio = |a: Option<u64>, b: Option<u64>| match (a, b) {
                (Some(a), Some(b)) if b > 0 => format!("{:.2}x", a as f64 / b as f64),
                _ => "-".to_string(),
            };
            let worst = |f: fn(&Rehydration) -> Option<u64>| self.rehydrations.iter().filter_map(f).max();
            println!(
                "  fresh replica     {} ({} process{}) added at {:.1} s: answered a peek at the latest write after {}, caught up after {} (slowest rehydration / fresh: {} answering, {} caught up)",
                fresh.replica,
                fresh.processes,
                if fresh.processes == 1 { "" } else { "es" },
                fresh.killed_at_s,
                ms(fresh.answered_peek_ms),
                ms(fresh.caught_up_ms),
                ratio(worst(|r| r.answered_peek_ms), fresh.answered_peek_ms),
                ratio(worst(|r| r.caught_up_ms), fresh.caught_up_ms),
            );
        }
        for r in &self.recreations {
            println!(
                "  recreated         {} as {}: hydrated in {}, old state gone after {}",
                r.dropped,
                r.created,
                ms(r.hydrated_ms),
                ms(r.state_removed_ms)
            );
        }
        println!("  final checks      {} full-contents comparisons after the last write", self.final_checks);
        if !self.introspection.is_empty() {
            println!("  introspection     {}", self.introspection.join(", "));
        }
        println!(
            "  cleanup           {} child processes started, each checked gone after the cleanup; {} replica exit(s) other than the scenario's kills",
            self.child_processes, self.replica_exits
        );
        if let Some(error) = &self.error {
            println!("  error             {error}");
        }
        println!("  violations        {}", self.violation_count);
        for v in &self.violations {
            println!("    - {v}");
        }
        match self.outcome {
            Outcome::Passed => println!("passed"),
            Outcome::Failed => println!("FAILED: {} violation(s)", self.violation_count),
            Outcome::Interrupted => println!("interrupted"),
            Outcome::Error => println!("FAILED: the scenario could not complete"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let cases: [(&[u64], f64, u64); 5] = [
            (&[], 50.0, 0),
            (&[7], 99.0, 7),
            (&[1, 2, 3, 4], 50.0, 2),
            (&[4, 3, 2, 1], 99.0, 4),
            (&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90.0, 9),
        ];
        for (values, p, expected) in cases {
            assert_eq!(percentile(&mut values.to_vec(), p), expected, "{values:?} p{p}");
        }
    }

    #[test]
    fn numbers_and_bars_render() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(bar(1, 4, 8), "[##......]");
        assert_eq!(bar(0, 0, 4), "[####]");
    }
}
