//! The materialized-view appender: one task per materialized view, in the process that holds global
//! worker 0, writing the view's batches to its storage target.
//!
//! **What this is.** [`spawn_appender`] starts a [`ViewAppender`] for one view. The core's sink merging
//! (`sinks.rs`) sends it every completed `[lower, upper)` range as an [`MvBatch`]; it waits for
//! `AllowWrites`, then appends with compare-and-append. On `UpperMismatch` (another replica wrote
//! first) it skips ahead to the current upper; before its first append it retracts, at the view's as-of,
//! what the target held from before the view existed. A transient storage failure (unreachable, log not
//! writable) is retried with a bounded backoff ([`RetryBackoff`]), logged; a failure that retrying cannot
//! cure (the target dropped, an append storage refuses, a multiplicity beyond `i64`, an error in the
//! view's data) stops the appender and is reported to the core as `CoreEvent::ExportFailed`, which the
//! controller hears as `StatusResponse::Failed`. Batches are taken in as they arrive, also while the
//! appender waits for `AllowWrites` or for storage to return; what it holds unwritten is bounded by
//! `ReplicaLimits::max_view_backlog_bytes` (1 GiB by default), beyond which the view fails the same way,
//! saying so, rather than growing without bound.
//!
//! **What this is not.** It does not merge the workers' output (the core's sink merging does) and does
//! not decide when a view is dropped (its task is aborted with its dataflow).
//!
//! **Invariants.** The target's upper only moves through compare-and-append from the upper last seen;
//! multiplicities are summed exactly ([`consolidate_checked`]) and never wrap; every failure that stops
//! the appender is reported once, and a transient one never is.
//!
//! **Tests.** `mod tests` below: each failure that stops the appender is reported, retries while storage
//! is unreachable (batches taken in meanwhile, nothing lost or doubled), the backlog before `AllowWrites`
//! written in one append, the backlog limit before writes and during an outage, the backoff's delays. Through the socket in `tests/it/exports.rs`.

use std::sync::Arc;

use frontiers::{Antichain, PartialOrder};
use protocol::{GlobalId, Row};
use storage::{AppendError, AppendRequest, ReadError, StorageCollections};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, warn};

use super::CoreEvent;
use crate::messages::DataflowKey;
use crate::render::{Diff, Time};

/// A batch of a materialized view for the appender.
#[derive(Debug)]
pub(super) struct MvBatch {
    /// Where the batch's range starts.
    pub lower: Antichain<Time>,
    /// Where it ends (the upper the append moves the target to).
    pub upper: Antichain<Time>,
    /// The view's updates in `[lower, upper)`, consolidated.
    pub updates: Vec<(Row, Time, Diff)>,
    /// The first error of the view's data in the batch's range, if it has any.
    pub error: Option<String>,
}

/// The first delay before a materialized view's appender retries a transient storage failure; it
/// doubles with each failure in a row, up to [`APPEND_RETRY_MAX_MS`].
const APPEND_RETRY_INITIAL_MS: u64 = 50;
/// The longest delay between two attempts of a materialized view's appender.
const APPEND_RETRY_MAX_MS: u64 = 5_000;

/// Where a task tells the core that an export can make no more progress.
#[derive(Debug)]
pub(super) struct FailureReport {
    /// The core's events.
    pub events: UnboundedSender<CoreEvent>,
    /// The export's dataflow.
    pub key: DataflowKey,
    /// The export.
    pub id: GlobalId,
}

/// Starts the appender of the materialized view `report.id` into `target`, from `as_of` on, writing once
/// `allow_writes` says so: returns where its batches go and its task (aborted with the dataflow).
pub(super) fn spawn_appender(
    storage: Arc<dyn StorageCollections>,
    target: GlobalId,
    as_of: Time,
    allow_writes: watch::Receiver<bool>,
    report: FailureReport,
    max_backlog_bytes: u64,
) -> (UnboundedSender<MvBatch>, JoinHandle<()>) {
    // Unbounded as a channel, bounded by what the appender holds: it takes every batch as it arrives,
    // also while it waits for `AllowWrites` or for storage to come back, and fails the view once what it
    // holds unwritten passes `max_backlog_bytes`.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let span = tracing::info_span!("appender", collection = %report.id, target = %target);
    let appending =
        append_materialized_view(storage, target, as_of, rx, allow_writes, report, max_backlog_bytes);
    (tx, tokio::spawn(appending.instrument(span)))
}

/// Appends a materialized view's batches to storage with compare-and-append, once writes are allowed,
/// until its dataflow goes.
///
/// A failure that retrying cannot cure stops it and is reported to the core (`CoreEvent::ExportFailed`,
/// which the controller hears as `StatusResponse::Failed`): the target was dropped, storage refused the
/// append (a row that does not match the target, a request over its frame limit), a multiplicity left
/// `i64`, the view's data has an error, the target cannot be read. A transient one (storage unreachable,
/// its log not writable) is retried with a bounded backoff ([`RetryBackoff`]), logged. Batches that
/// arrive meanwhile are taken in; if what the appender then holds unwritten passes `max_backlog_bytes`
/// the view fails, saying so.
async fn append_materialized_view(
    storage: Arc<dyn StorageCollections>,
    target: GlobalId,
    as_of: Time,
    batches: UnboundedReceiver<MvBatch>,
    allow_writes: watch::Receiver<bool>,
    report: FailureReport,
    max_backlog_bytes: u64,
) {
    let appender = ViewAppender {
        storage,
        target,
        as_of,
        batches,
        batches_ended: false,
        upper: Antichain::from_elem(0),
        pending: Vec::new(),
        pending_upper: Antichain::from_elem(as_of),
        backlog_bytes: 0,
        max_backlog_bytes,
        reconciled: false,
        retry: RetryBackoff::default(),
    };
    if let Err(error) = appender.run(allow_writes).await {
        warn!(%target, id = %report.id, %error, "the materialized view stops appending");
        // Fails only once the core is gone, and with it whoever would hear of it.
        let _ = report.events.send(CoreEvent::ExportFailed { key: report.key, id: report.id, error });
    }
}

/// The state of one materialized view's appender (see [`append_materialized_view`]).
struct ViewAppender {
    storage: Arc<dyn StorageCollections>,
    target: GlobalId,
    as_of: Time,
    /// The view's batches, from the core's sink merging.
    batches: UnboundedReceiver<MvBatch>,
    /// The core let go of the sender (the dataflow is going): no batch comes any more.
    batches_ended: bool,
    /// The target's upper as last seen: where the next append starts.
    upper: Antichain<Time>,
    /// Updates received and not yet written, and the upper they complete.
    pending: Vec<(Row, Time, Diff)>,
    pending_upper: Antichain<Time>,
    /// The memory `pending` holds, about ([`update_bytes`]); at most `max_backlog_bytes`.
    backlog_bytes: u64,
    max_backlog_bytes: u64,
    /// Whether what the target held before the view's as-of has been taken into account.
    reconciled: bool,
    retry: RetryBackoff,
}

impl ViewAppender {
    /// Appends until the batches end (`Ok`) or a failure retrying cannot cure (`Err`, why).
    async fn run(mut self, mut allow_writes: watch::Receiver<bool>) -> Result<(), String> {
        // Until writes are allowed, batches are taken in (and counted against the backlog limit).
        loop {
            tokio::select! {
                allowed = allow_writes.wait_for(|allowed| *allowed) => {
                    if allowed.is_err() {
                        return Ok(()); // The core is gone.
                    }
                    break;
                }
                batch = self.batches.recv(), if !self.batches_ended => self.take_in(batch)?,
            }
        }
        self.upper = self.read_upper().await?;
        if self.pending_upper != Antichain::from_elem(self.as_of) {
            self.write_pending().await?;
        }
        loop {
            let batch = self.batches.recv().await;
            if batch.is_none() {
                return Ok(());
            }
            self.take_in(batch)?;
            while let Ok(next) = self.batches.try_recv() {
                self.take_in(Some(next))?;
            }
            self.write_pending().await?;
        }
    }

    /// Takes in the next batch (`None`: the batches ended): its updates join what is pending, unless
    /// the view's data has an error or the backlog passes its limit.
    fn take_in(&mut self, batch: Option<MvBatch>) -> Result<(), String> {
        let Some(batch) = batch else {
            self.batches_ended = true;
            return Ok(());
        };
        if let Some(error) = batch.error {
            return Err(format!("the view's data has an error: {error}"));
        }
        debug_assert!(PartialOrder::less_equal(&batch.lower, &self.pending_upper) || !self.reconciled);
        self.hold(batch.updates)?;
        self.pending_upper = batch.upper;
        Ok(())
    }

    /// Adds `updates` to what is pending, counting them against the backlog limit.
    fn hold(&mut self, updates: Vec<(Row, Time, Diff)>) -> Result<(), String> {
        let bytes: u64 = updates.iter().map(update_bytes).sum();
        self.backlog_bytes = self.backlog_bytes.saturating_add(bytes);
        self.pending.extend(updates);
        if self.backlog_bytes > self.max_backlog_bytes {
            return Err(format!(
                "it holds {} bytes of updates not yet written to storage, beyond its limit of {} bytes \
                 (writes not allowed yet, or storage unreachable, for too long)",
                self.backlog_bytes, self.max_backlog_bytes
            ));
        }
        Ok(())
    }

    /// Everything pending is in the target.
    fn written(&mut self) {
        self.pending.clear();
        self.backlog_bytes = 0;
    }

    /// Logs a transient failure of `operation` and waits before the next attempt, taking in the
    /// batches that arrive meanwhile.
    async fn retry_later(
        &mut self,
        operation: &'static str,
        error: &(dyn std::fmt::Display + Sync),
    ) -> Result<(), String> {
        let delay = self.retry.failed(self.target, operation, error);
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return Ok(()),
                batch = self.batches.recv(), if !self.batches_ended => self.take_in(batch)?,
            }
        }
    }

    /// The target's upper, retrying while storage is unreachable.
    async fn read_upper(&mut self) -> Result<Antichain<Time>, String> {
        loop {
            match self.storage.frontiers(self.target).await {
                Ok(frontiers) => {
                    self.retry.reset();
                    return Ok(frontiers.upper);
                }
                Err(error @ ReadError::Disconnected) => {
                    self.retry_later("reading the target's upper", &error).await?
                }
                Err(ReadError::CollectionMissing(_) | ReadError::CollectionDropped(_)) => {
                    return Err(format!("its target {} was dropped", self.target));
                }
                Err(error) => {
                    return Err(format!("cannot read the upper of its target {}: {error}", self.target));
                }
            }
        }
    }

    /// Writes what is pending up to `pending_upper`, or finds it written by another replica.
    async fn write_pending(&mut self) -> Result<(), String> {
        loop {
            if !PartialOrder::less_than(&self.upper, &self.pending_upper) {
                // Someone (another replica) already wrote this range: everything pending is there.
                self.written();
                return Ok(());
            }
            if !self.reconciled {
                self.take_in_existing().await?;
            }
            let lower = self.upper.as_option().copied().unwrap_or(Time::MAX);
            let updates = consolidate_checked(self.pending.iter().filter(|(_, t, _)| *t >= lower).cloned())?;
            let request = AppendRequest {
                id: self.target,
                updates,
                expected_upper: self.upper.clone(),
                new_upper: self.pending_upper.clone(),
            };
            match self.storage.append(vec![request]).await {
                Ok(()) => {
                    self.retry.reset();
                    self.upper = self.pending_upper.clone();
                    self.written();
                    return Ok(());
                }
                Err(AppendError::UpperMismatch { current, .. }) => {
                    debug!(target = %self.target, ?current, "another writer appended first; skipping ahead");
                    self.upper = current;
                }
                Err(error @ (AppendError::Disconnected | AppendError::Io(_))) => {
                    self.retry_later("appending", &error).await?
                }
                Err(AppendError::CollectionMissing(_)) => {
                    // Storage never reuses an id: a dropped target stays dropped.
                    return Err(format!("its target {} was dropped", self.target));
                }
                Err(error) => return Err(format!("storage refused its append: {error}")),
            }
        }
    }

    /// Before the first append: what the target holds below the view's as-of (written before the view
    /// existed) is retracted at the as-of, so from there the target holds exactly the view.
    async fn take_in_existing(&mut self) -> Result<(), String> {
        let Some(current) = self.upper.as_option().copied().filter(|c| *c < self.as_of && *c > 0) else {
            self.reconciled = true;
            return Ok(());
        };
        let existing = loop {
            match self.storage.snapshot(self.target, current - 1).await {
                Ok(existing) => break existing,
                Err(error @ ReadError::Disconnected) => {
                    self.retry_later("reading the target's contents", &error).await?
                }
                Err(error) => {
                    return Err(format!("cannot read what its target {} holds: {error}", self.target));
                }
            }
        };
        self.retry.reset();
        let mut retractions = Vec::with_capacity(existing.len());
        for (row, diff) in existing {
            let Some(retraction) = diff.checked_neg() else {
                return Err(format!("its target holds row {row} {diff} times: the retraction leaves i64"));
            };
            retractions.push((row, self.as_of, retraction));
        }
        self.hold(retractions)?;
        self.reconciled = true;
        Ok(())
    }
}

/// The memory an update pending in an appender takes, about: the tuple and the row's bytes.
fn update_bytes(update: &(Row, Time, Diff)) -> u64 {
    (std::mem::size_of::<(Row, Time, Diff)>() + update.0.byte_len()) as u64
}

/// `updates` consolidated (one update per row and time, none zero), summed exactly: a multiplicity that
/// leaves `i64` (storage's multiplicities) is an error, never a wrap or a panic.
fn consolidate_checked(
    updates: impl Iterator<Item = (Row, Time, Diff)>,
) -> Result<Vec<(Row, Time, Diff)>, String> {
    let mut updates: Vec<(Row, Time, Diff)> = updates.collect();
    updates.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut sums: Vec<(Row, Time, i128)> = Vec::with_capacity(updates.len());
    for (row, time, diff) in updates {
        match sums.last_mut() {
            // At most 2^64 summands of at most 2^63 each: an `i128` sum is exact.
            Some((last, at, sum)) if *last == row && *at == time => *sum += i128::from(diff),
            _ => sums.push((row, time, i128::from(diff))),
        }
    }
    let mut consolidated = Vec::with_capacity(sums.len());
    for (row, time, sum) in sums {
        match Diff::try_from(sum) {
            Ok(0) => {}
            Ok(diff) => consolidated.push((row, time, diff)),
            Err(_) => return Err(format!("the multiplicity {sum} of row {row} at {time} leaves i64")),
        }
    }
    Ok(consolidated)
}

/// A bounded exponential backoff for transient storage failures: [`APPEND_RETRY_INITIAL_MS`] after the
/// first failure in a row, doubling with each further one, never more than [`APPEND_RETRY_MAX_MS`].
#[derive(Debug, Default)]
struct RetryBackoff {
    /// Failures in a row.
    failures: u32,
}

impl RetryBackoff {
    /// The delay after `failures` failures in a row (at least one).
    fn delay_ms(failures: u32) -> u64 {
        let doublings = failures.saturating_sub(1).min(32);
        APPEND_RETRY_INITIAL_MS.saturating_mul(1 << doublings).min(APPEND_RETRY_MAX_MS)
    }

    /// Counts and logs a transient failure of `operation`: how long to wait before the next attempt.
    fn failed(
        &mut self,
        target: GlobalId,
        operation: &'static str,
        error: &(dyn std::fmt::Display + Sync),
    ) -> std::time::Duration {
        self.failures = self.failures.saturating_add(1);
        let delay_ms = Self::delay_ms(self.failures);
        warn!(%target, operation, %error, attempt = self.failures, delay_ms, "storage unavailable to a materialized view; retrying");
        std::time::Duration::from_millis(delay_ms)
    }

    /// Forgets the failures: the last attempt succeeded.
    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use std::sync::atomic::{AtomicUsize, Ordering};

    use frontiers::{Antichain, ReadPolicy};
    use protocol::{ColumnType, Datum, GlobalId, RelationDesc, Row, ScalarType};
    use storage::{
        AppendError, AppendRequest, BoxFuture, CollectionFrontiers, CreateError, DropError, FrontierWatch,
        HoldError, InProcess, Listen, ReadError, StorageCollections, StorageReadHold, StoreConfig,
    };
    use tokio::sync::{mpsc, watch};

    use super::{FailureReport, MvBatch, RetryBackoff, append_materialized_view};
    use crate::core::CoreEvent;

    /// In-memory storage whose first `unreachable_appends` appends fail with `Disconnected`; it counts
    /// every append.
    #[derive(Debug)]
    struct FlakyStorage {
        inner: InProcess,
        unreachable_appends: AtomicUsize,
        appends: AtomicUsize,
    }

    impl FlakyStorage {
        fn new(unreachable_appends: usize) -> Arc<FlakyStorage> {
            Arc::new(FlakyStorage {
                inner: InProcess::in_memory(StoreConfig::default()),
                unreachable_appends: AtomicUsize::new(unreachable_appends),
                appends: AtomicUsize::new(0),
            })
        }
    }

    impl StorageCollections for FlakyStorage {
        fn create_collection(
            &self,
            id: GlobalId,
            desc: RelationDesc,
        ) -> BoxFuture<'_, Result<(), CreateError>> {
            self.inner.create_collection(id, desc)
        }
        fn drop_collection(&self, id: GlobalId) -> BoxFuture<'_, Result<(), DropError>> {
            self.inner.drop_collection(id)
        }
        fn list_collections(&self) -> BoxFuture<'_, Result<Vec<(GlobalId, RelationDesc)>, ReadError>> {
            self.inner.list_collections()
        }
        fn frontiers(&self, id: GlobalId) -> BoxFuture<'_, Result<CollectionFrontiers, ReadError>> {
            self.inner.frontiers(id)
        }
        fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'_, Result<(), AppendError>> {
            self.appends.fetch_add(1, Ordering::SeqCst);
            let unreachable =
                self.unreachable_appends
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if unreachable.is_ok() {
                return Box::pin(async { Err(AppendError::Disconnected) });
            }
            self.inner.append(requests)
        }
        fn acquire_read_hold(
            &self,
            id: GlobalId,
            frontier: Antichain<u64>,
        ) -> BoxFuture<'_, Result<StorageReadHold, HoldError>> {
            self.inner.acquire_read_hold(id, frontier)
        }
        fn set_read_policy(
            &self,
            id: GlobalId,
            policy: ReadPolicy<u64>,
        ) -> BoxFuture<'_, Result<(), HoldError>> {
            self.inner.set_read_policy(id, policy)
        }
        fn snapshot(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Vec<(Row, i64)>, ReadError>> {
            self.inner.snapshot(id, as_of)
        }
        fn listen(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Listen, ReadError>> {
            self.inner.listen(id, as_of)
        }
        fn watch_frontiers(&self) -> BoxFuture<'_, Result<FrontierWatch, ReadError>> {
            self.inner.watch_frontiers()
        }
    }

    /// A view's appender at as-of 0 into `target` (created with one `int64` column), writes allowed.
    struct Appender {
        batches: mpsc::UnboundedSender<MvBatch>,
        events: mpsc::UnboundedReceiver<CoreEvent>,
        task: tokio::task::JoinHandle<()>,
        target: GlobalId,
        allow_writes: watch::Sender<bool>,
    }

    const VIEW: GlobalId = GlobalId::User(100);
    const KEY: u64 = 7;

    async fn start_appender(storage: Arc<dyn StorageCollections>, target: GlobalId) -> Appender {
        start_appender_with(storage, target, true, crate::server::DEFAULT_MAX_VIEW_BACKLOG_BYTES).await
    }

    /// The appender, writes allowed or not yet, holding at most `max_backlog_bytes` unwritten.
    async fn start_appender_with(
        storage: Arc<dyn StorageCollections>,
        target: GlobalId,
        writes_allowed: bool,
        max_backlog_bytes: u64,
    ) -> Appender {
        let desc = RelationDesc::new([("a", ColumnType::new(ScalarType::Int64, false))]);
        storage.create_collection(target, desc).await.expect("create the target");
        let (batches, batches_rx) = mpsc::unbounded_channel();
        let (allow_writes, allow_writes_rx) = watch::channel(writes_allowed);
        let (events_tx, events) = mpsc::unbounded_channel();
        let report = FailureReport { events: events_tx, key: KEY, id: VIEW };
        let appending = append_materialized_view(
            storage,
            target,
            0,
            batches_rx,
            allow_writes_rx,
            report,
            max_backlog_bytes,
        );
        Appender { batches, events, task: tokio::spawn(appending), target, allow_writes }
    }

    fn batch(lower: u64, upper: u64, updates: &[(Row, u64, i64)]) -> MvBatch {
        MvBatch {
            lower: Antichain::from_elem(lower),
            upper: Antichain::from_elem(upper),
            updates: updates.to_vec(),
            error: None,
        }
    }

    fn int(value: i64) -> Row {
        Row::pack([Datum::Int64(value)])
    }

    /// Waits (up to 10 s) until the target's upper is `upper`.
    async fn wait_upper(storage: &dyn StorageCollections, target: GlobalId, upper: u64) {
        for _ in 0..1_000 {
            if storage.frontiers(target).await.expect("frontiers").upper == Antichain::from_elem(upper) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the upper of {target} never reached {upper}");
    }

    impl Appender {
        /// The failure the appender reported (within 10 s); it has stopped.
        async fn failure(mut self) -> String {
            let event = tokio::time::timeout(std::time::Duration::from_secs(10), self.events.recv())
                .await
                .expect("the appender reports its failure");
            let error = match event {
                Some(CoreEvent::ExportFailed { key, id, error }) => {
                    assert_eq!((key, id), (KEY, VIEW), "the report names the view's dataflow and export");
                    error
                }
                other => panic!("expected ExportFailed, got {other:?}"),
            };
            tokio::time::timeout(std::time::Duration::from_secs(5), self.task)
                .await
                .expect("the appender stops")
                .expect("the appender does not panic");
            error
        }
    }

    #[tokio::test]
    async fn a_materialized_view_whose_target_was_dropped_stops_appending_and_says_so() {
        let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
        let appender =
            start_appender(Arc::clone(&storage) as Arc<dyn StorageCollections>, GlobalId::User(1)).await;
        appender.batches.send(batch(0, 1, &[(int(0), 0, 1)])).expect("the appender runs");
        wait_upper(&*storage, appender.target, 1).await;

        storage.drop_collection(appender.target).await.expect("drop the target");
        let _ = appender.batches.send(batch(1, 2, &[(int(1), 1, 1)]));
        let error = appender.failure().await;
        assert!(error.contains("target u1 was dropped"), "{error}");
    }

    #[tokio::test]
    async fn a_materialized_view_whose_rows_do_not_match_its_target_stops_and_says_why() {
        let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
        let appender =
            start_appender(Arc::clone(&storage) as Arc<dyn StorageCollections>, GlobalId::User(1)).await;
        let text = Row::pack([Datum::Text("not an int64")]);
        appender.batches.send(batch(0, 1, &[(text, 0, 1)])).expect("the appender runs");
        let error = appender.failure().await;
        assert!(error.contains("storage refused its append") && error.contains("schema"), "{error}");
        let upper = storage.frontiers(GlobalId::User(1)).await.expect("frontiers").upper;
        assert_eq!(upper, Antichain::from_elem(0), "nothing was written");
    }

    #[tokio::test]
    async fn a_materialized_view_whose_multiplicity_leaves_i64_stops_and_says_so_but_one_that_returns_writes()
    {
        let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
        let shared = Arc::clone(&storage) as Arc<dyn StorageCollections>;
        // Summed in the order given, MAX + 1 wraps (or panics); the exact sum is MAX.
        let returns = start_appender(Arc::clone(&shared), GlobalId::User(1)).await;
        let updates = [(int(1), 0, i64::MAX), (int(1), 0, 1), (int(1), 0, -1)];
        returns.batches.send(batch(0, 1, &updates)).expect("the appender runs");
        wait_upper(&*storage, returns.target, 1).await;
        let written = storage.snapshot(returns.target, 0).await.expect("snapshot");
        assert_eq!(written, vec![(int(1), i64::MAX)]);

        let leaves = start_appender(shared, GlobalId::User(2)).await;
        leaves
            .batches
            .send(batch(0, 1, &[(int(1), 0, i64::MAX), (int(1), 0, 1)]))
            .expect("the appender runs");
        let error = leaves.failure().await;
        assert!(error.contains("leaves i64"), "{error}");
    }

    #[tokio::test]
    async fn a_materialized_view_with_an_error_in_its_data_stops_and_says_which() {
        let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
        let appender = start_appender(storage as Arc<dyn StorageCollections>, GlobalId::User(1)).await;
        let mut failing = batch(0, 1, &[]);
        failing.error = Some("division by zero".to_string());
        appender.batches.send(failing).expect("the appender runs");
        let error = appender.failure().await;
        assert!(error.contains("division by zero"), "{error}");
    }

    #[tokio::test]
    async fn a_materialized_view_retries_while_storage_is_unreachable_and_then_writes() {
        let storage = FlakyStorage::new(3);
        let mut appender =
            start_appender(Arc::clone(&storage) as Arc<dyn StorageCollections>, GlobalId::User(1)).await;
        appender.batches.send(batch(0, 1, &[(int(1), 0, 1)])).expect("the appender runs");
        wait_upper(&*storage, appender.target, 1).await;
        assert_eq!(storage.appends.load(Ordering::SeqCst), 4, "three refused attempts, then the append");
        assert!(appender.events.try_recv().is_err(), "nothing is reported for a transient failure");
        assert!(!appender.task.is_finished(), "the appender goes on");
    }

    /// A batch of one update for each `t` in `times`, `[t, t + 1)`.
    fn send_batches(appender: &Appender, times: std::ops::Range<u64>) {
        for t in times {
            let _ = appender.batches.send(batch(t, t + 1, &[(int(t as i64), t, 1)]));
        }
    }

    /// Waits until the appender tried its first append.
    async fn first_attempt(storage: &FlakyStorage) {
        while storage.appends.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_materialized_view_takes_in_its_batches_before_writes_are_allowed_and_then_writes_them_in_one_append()
     {
        let storage = FlakyStorage::new(0);
        let appender = start_appender_with(
            Arc::clone(&storage) as Arc<dyn StorageCollections>,
            GlobalId::User(1),
            false,
            1 << 20,
        )
        .await;
        send_batches(&appender, 0..50);
        // (That the batches are taken in while waiting, not left in the channel, is what the next test's
        // limit shows.)
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(storage.appends.load(Ordering::SeqCst), 0, "nothing is written before AllowWrites");
        appender.allow_writes.send(true).expect("the appender runs");
        wait_upper(&*storage, appender.target, 50).await;
        assert_eq!(storage.appends.load(Ordering::SeqCst), 1, "the backlog goes in one append");
        let written = storage.snapshot(appender.target, 49).await.expect("snapshot");
        assert_eq!(written.len(), 50, "every batch's update is written: {written:?}");
    }

    #[tokio::test]
    async fn a_materialized_view_whose_backlog_passes_its_limit_before_writes_are_allowed_fails_and_says_so()
    {
        let storage = FlakyStorage::new(0);
        // About 40 bytes an update: 50 of them pass 1 KiB.
        let appender = start_appender_with(
            Arc::clone(&storage) as Arc<dyn StorageCollections>,
            GlobalId::User(1),
            false,
            1_024,
        )
        .await;
        send_batches(&appender, 0..50);
        let error = appender.failure().await;
        assert!(error.contains("beyond its limit of 1024 bytes"), "{error}");
        assert_eq!(storage.appends.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_materialized_view_whose_storage_stays_unreachable_takes_in_batches_until_its_backlog_limit_and_then_fails()
     {
        let storage = FlakyStorage::new(usize::MAX);
        let appender = start_appender_with(
            Arc::clone(&storage) as Arc<dyn StorageCollections>,
            GlobalId::User(1),
            true,
            1_024,
        )
        .await;
        send_batches(&appender, 0..1);
        // The first append fails; the batches that arrive during the backoff are taken in and counted.
        first_attempt(&storage).await;
        send_batches(&appender, 1..50);
        let error = appender.failure().await;
        assert!(error.contains("not yet written to storage, beyond its limit of 1024 bytes"), "{error}");
    }

    #[tokio::test]
    async fn a_materialized_view_takes_in_batches_while_storage_is_unreachable_and_writes_them_all_when_it_returns()
     {
        let storage = FlakyStorage::new(2);
        let appender =
            start_appender(Arc::clone(&storage) as Arc<dyn StorageCollections>, GlobalId::User(1)).await;
        send_batches(&appender, 0..1);
        first_attempt(&storage).await;
        send_batches(&appender, 1..20);
        wait_upper(&*storage, appender.target, 20).await;
        let written = storage.snapshot(appender.target, 19).await.expect("snapshot");
        assert_eq!(written.len(), 20, "nothing lost: {written:?}");
        assert!(written.iter().all(|(_, diff)| *diff == 1), "nothing doubled: {written:?}");
    }

    #[test]
    fn the_appenders_retry_delay_doubles_from_50_ms_up_to_5_s() {
        for (failures, delay_ms) in [(1, 50), (2, 100), (3, 200), (7, 3_200), (8, 5_000), (1_000, 5_000)] {
            assert_eq!(RetryBackoff::delay_ms(failures), delay_ms, "after {failures} failures");
        }
    }
}
