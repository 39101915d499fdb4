//! The SQLite [`Consensus`]: the embedded default, one database file that every process on the machine
//! can share.
//!
//! **How.** Two tables: `consensus (key, seqno, data)` with every retained version, and `consensus_heads
//! (key, seqno)` with each key's head, written in the same transaction (so a head version deleted by hand is
//! detected, see the parent module). WAL mode, so readers do not block the writer; `synchronous=FULL`, so a
//! committed version survives a power failure; a busy handler that retries every millisecond or less up to
//! the configured timeout, so processes queue for the write lock instead of failing at once, and take it soon
//! after it is free (SQLite's own busy timeout sleeps up to 100 ms between tries, which made compare-and-sets
//! across processes wait tens of milliseconds); `BEGIN IMMEDIATE` for every write, so a compare-and-set takes
//! the write lock before it reads the heads it compares. Calls run on tokio's blocking pool over a small pool
//! of connections (at most [`MAX_CONNECTIONS`]).
//!
//! **Group commit.** A process's compare-and-sets queue up and one committer task at a time takes them
//! (up to [`MAX_GROUP`]) into one transaction, each in its own savepoint: a request whose heads do not
//! match (or whose statements fail) is rolled back alone and answered with its own outcome, the others
//! commit together with one `COMMIT` (one log sync). Requests are applied in queue order, so one that
//! follows another on the same key sees it, as if they had run one after the other. Without it, the
//! process's own connections would take turns at the write lock, one transaction and one log sync each;
//! with it, the process holds the lock once per group.
//! A failed `COMMIT` fails every request of the group alike (determinate or not, as below).
//!
//! **Errors.** A failed `COMMIT` is determinate when SQLite reports that it did not write (full disk,
//! busy, locked, out of memory) and indeterminate otherwise (an I/O error after the log was written may
//! still commit on recovery). Everything before the commit is determinate.
//!
//! **Tests.** The conformance suite in `tests/it/consensus.rs`, including several processes' worth of
//! connections racing on one file.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{Semaphore, oneshot};

use crate::api::BoxFuture;
use crate::consensus::{CasOp, CasOutcome, Consensus, ConsensusOpenError, SeqNo, VersionedData, check_ops};
use crate::external::ExternalError;

/// The most connections one process keeps open to the file.
pub(crate) const MAX_CONNECTIONS: usize = 4;

/// The most compare-and-sets one transaction commits together.
pub(crate) const MAX_GROUP: usize = 64;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS consensus (
        key TEXT NOT NULL,
        seqno INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (key, seqno)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS consensus_heads (
        key TEXT NOT NULL PRIMARY KEY,
        seqno INTEGER NOT NULL
    ) WITHOUT ROWID;
";

#[derive(Debug)]
struct Pool {
    path: PathBuf,
    timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

/// A compare-and-set waiting for the next group commit, with where its outcome goes.
type Queued = (Vec<CasOp>, oneshot::Sender<Result<CasOutcome, ExternalError>>);

/// The compare-and-sets waiting for a group commit (bounded by the callers waiting on them).
#[derive(Debug, Default)]
struct Group {
    queue: Vec<Queued>,
    /// Whether a committer task is running; it takes the queue until it is empty.
    committing: bool,
    /// Transactions the committers ran (tests check that requests are grouped).
    #[cfg(test)]
    transactions: u64,
}

/// The SQLite store.
#[derive(Debug)]
pub(crate) struct SqliteConsensus {
    pool: Arc<Pool>,
    group: Arc<Mutex<Group>>,
}

/// The pauses between tries for a lock another process holds, by try (the last one repeats).
const BUSY_PAUSES: [Duration; 4] = [
    Duration::from_micros(100),
    Duration::from_micros(250),
    Duration::from_micros(500),
    Duration::from_millis(1),
];

std::thread_local! {
    /// When the call running on this thread stops waiting for a lock (set by [`with_connection`]).
    static BUSY_DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Sets this thread's [`BUSY_DEADLINE`] for one call; clears it when dropped.
struct BusyDeadline;

impl BusyDeadline {
    // The busy timeout is wall-clock time by definition (it bounds how long a real process waits).
    #[allow(clippy::disallowed_methods)]
    fn start(timeout: Duration) -> BusyDeadline {
        BUSY_DEADLINE.with(|deadline| deadline.set(Some(Instant::now() + timeout)));
        BusyDeadline
    }
}

impl Drop for BusyDeadline {
    fn drop(&mut self) {
        BUSY_DEADLINE.with(|deadline| deadline.set(None));
    }
}

/// The busy handler: waits a short pause and tries again until the call's deadline (no deadline: gives
/// up at once). SQLite's own (`busy_timeout`) sleeps up to 100 ms between tries, so a compare-and-set that
/// found the lock taken waits far longer than the other process holds it.
// See `BusyDeadline::start`.
#[allow(clippy::disallowed_methods)]
fn wait_for_lock(tries: i32) -> bool {
    let Some(deadline) = BUSY_DEADLINE.with(Cell::get) else {
        return false;
    };
    let now = Instant::now();
    if now >= deadline {
        return false;
    }
    let index = usize::try_from(tries).unwrap_or(0).min(BUSY_PAUSES.len() - 1);
    std::thread::sleep(BUSY_PAUSES[index].min(deadline - now));
    true
}

fn open_connection(path: &Path) -> Result<Connection, ExternalError> {
    let open = |e| determinate(&format!("open {}", path.display()), e);
    let mut conn = Connection::open(path).map_err(open)?;
    conn.busy_handler(Some(wait_for_lock)).map_err(open)?;
    // `journal_mode` answers with the mode now in effect.
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0)).map_err(open)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(ExternalError::Determinate(format!(
            "cannot switch {} to WAL mode (it is {mode})",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(open)?;
    Ok(conn)
}

/// Whether a failed `COMMIT` certainly did not commit.
fn commit_failure_is_determinate(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(
            ErrorCode::DiskFull
                | ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::OutOfMemory
        )
    )
}

fn determinate(what: &str, error: rusqlite::Error) -> ExternalError {
    ExternalError::Determinate(format!("sqlite {what}: {error}"))
}

fn seqno_of(value: i64) -> Result<SeqNo, ExternalError> {
    SeqNo::try_from(value)
        .map_err(|_| ExternalError::Corrupt(format!("negative seqno {value} in the sqlite store")))
}

impl SqliteConsensus {
    pub(crate) async fn open(path: &Path, timeout: Duration) -> Result<SqliteConsensus, ConsensusOpenError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                ConsensusOpenError::Backend(format!("cannot create the directory of {}: {e}", path.display()))
            })?;
        }
        let pool = Arc::new(Pool {
            path: path.to_owned(),
            timeout,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        });
        let store = SqliteConsensus { pool, group: Arc::new(Mutex::new(Group::default())) };
        store
            .with_connection(|conn| {
                conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA} COMMIT;"))
                    .map_err(|e| determinate("schema", e))
            })
            .await
            .map_err(|e| ConsensusOpenError::Backend(format!("{}: {e}", path.display())))?;
        Ok(store)
    }

    /// Runs `work` on a pooled connection on the blocking pool; see [`with_connection`].
    async fn with_connection<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, ExternalError> + Send + 'static,
    ) -> Result<T, ExternalError> {
        with_connection(&self.pool, work).await
    }

    /// Queues a compare-and-set for the next group commit, starting a committer if none runs.
    async fn queue_compare_and_set(&self, ops: Vec<CasOp>) -> Result<CasOutcome, ExternalError> {
        let (reply, outcome) = oneshot::channel();
        let start = {
            let mut group = self.group.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            group.queue.push((ops, reply));
            !std::mem::replace(&mut group.committing, true)
        };
        if start {
            tokio::spawn(commit_groups(Arc::clone(&self.pool), Arc::clone(&self.group)));
        }
        match outcome.await {
            Ok(result) => result,
            Err(_) => Err(ExternalError::Indeterminate("the sqlite committer stopped".into())),
        }
    }

    /// How many group transactions this store ran (tests).
    #[cfg(test)]
    fn transactions(&self) -> u64 {
        self.group.lock().unwrap_or_else(std::sync::PoisonError::into_inner).transactions
    }
}

/// Commits the queued compare-and-sets, [`MAX_GROUP`] at a time, until the queue is empty.
async fn commit_groups(pool: Arc<Pool>, group: Arc<Mutex<Group>>) {
    loop {
        let batch: Vec<Queued> = {
            let mut group = group.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if group.queue.is_empty() {
                group.committing = false;
                return;
            }
            #[cfg(test)]
            {
                group.transactions += 1;
            }
            let take = group.queue.len().min(MAX_GROUP);
            group.queue.drain(..take).collect()
        };
        let (requests, replies): (Vec<Vec<CasOp>>, Vec<_>) = batch.into_iter().unzip();
        let count = requests.len();
        match with_connection(&pool, move |conn| compare_and_set_group(conn, &requests)).await {
            Ok(outcomes) => {
                assert_eq!(outcomes.len(), count, "one outcome per request");
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Runs `work` on a pooled connection of `pool` on the blocking pool. A connection whose work failed is
/// closed rather than reused.
async fn with_connection<T: Send + 'static>(
    pool: &Arc<Pool>,
    work: impl FnOnce(&mut Connection) -> Result<T, ExternalError> + Send + 'static,
) -> Result<T, ExternalError> {
    // The permit moves into the blocking task, so a caller that stops waiting does not free its
    // connection slot before the work is done.
    let permit =
        Arc::clone(&pool.permits).acquire_owned().await.expect("the pool's semaphore is never closed");
    let pool = Arc::clone(pool);
    let task = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let _deadline = BusyDeadline::start(pool.timeout);
        let idle = pool.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => open_connection(&pool.path)?,
        };
        let result = work(&mut conn);
        if result.is_ok() {
            pool.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(conn);
        }
        result
    });
    match task.await {
        Ok(result) => result,
        Err(error) => Err(ExternalError::Indeterminate(format!("sqlite call did not finish: {error}"))),
    }
}

fn head(conn: &mut Connection, key: &str) -> Result<Option<VersionedData>, ExternalError> {
    let mut statement = conn
        .prepare_cached(
            "SELECT h.seqno, c.data FROM consensus_heads h
             LEFT JOIN consensus c ON c.key = h.key AND c.seqno = h.seqno WHERE h.key = ?1",
        )
        .map_err(|e| determinate("head", e))?;
    let row = statement
        .query_row([key], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Option<Vec<u8>>>(1)?)))
        .optional()
        .map_err(|e| determinate("head", e))?;
    match row {
        None => Ok(None),
        Some((seqno, Some(data))) => {
            Ok(Some(VersionedData { seqno: seqno_of(seqno)?, data: Bytes::from(data) }))
        }
        Some((seqno, None)) => Err(ExternalError::Corrupt(format!(
            "version {seqno} of {key:?}, its head, is missing from the sqlite store"
        ))),
    }
}

/// Runs every request of a group in one transaction, each in its own savepoint; the outcomes in request
/// order, or the error that failed them all.
fn compare_and_set_group(
    conn: &mut Connection,
    requests: &[Vec<CasOp>],
) -> Result<Vec<Result<CasOutcome, ExternalError>>, ExternalError> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| determinate("begin", e))?;
    let mut outcomes = Vec::with_capacity(requests.len());
    for ops in requests {
        let savepoint = tx.savepoint().map_err(|e| determinate("savepoint", e))?;
        let outcome = compare_and_set(&savepoint, ops);
        if let Ok(CasOutcome::Committed) = outcome {
            savepoint.commit().map_err(|e| determinate("release savepoint", e))?;
        }
        // Otherwise dropping the savepoint rolls this request back alone.
        outcomes.push(outcome);
    }
    match tx.commit() {
        Ok(()) => Ok(outcomes),
        Err(error) if commit_failure_is_determinate(&error) => Err(determinate("commit", error)),
        Err(error) => Err(ExternalError::Indeterminate(format!("sqlite commit: {error}"))),
    }
}

/// One request's compare-and-set inside the group's transaction (nothing is committed here).
fn compare_and_set(tx: &Connection, ops: &[CasOp]) -> Result<CasOutcome, ExternalError> {
    for op in ops {
        let head: Option<i64> = tx
            .prepare_cached("SELECT seqno FROM consensus_heads WHERE key = ?1")
            .and_then(|mut s| s.query_row([&op.key], |row| row.get(0)).optional())
            .map_err(|e| determinate("compare", e))?;
        let head = head.map(seqno_of).transpose()?;
        if head != op.expected {
            return Ok(CasOutcome::Mismatch);
        }
        let seqno = i64::try_from(op.new.seqno).expect("check_ops bounds seqnos");
        tx.prepare_cached("INSERT INTO consensus (key, seqno, data) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![op.key, seqno, &op.new.data[..]]))
            .map_err(|e| determinate("insert", e))?;
        tx.prepare_cached(
            "INSERT INTO consensus_heads (key, seqno) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET seqno = excluded.seqno",
        )
        .and_then(|mut s| s.execute(params![op.key, seqno]))
        .map_err(|e| determinate("insert head", e))?;
    }
    Ok(CasOutcome::Committed)
}

fn truncate(conn: &mut Connection, key: &str, below: SeqNo) -> Result<u64, ExternalError> {
    let below_sql = i64::try_from(below).map_err(|_| {
        ExternalError::Determinate(format!("cannot truncate {key:?} below {below}: beyond its head"))
    })?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| determinate("begin", e))?;
    let head: Option<i64> = tx
        .query_row("SELECT seqno FROM consensus_heads WHERE key = ?1", [key], |row| row.get(0))
        .optional()
        .map_err(|e| determinate("truncate", e))?;
    if head.is_none_or(|head| head < below_sql) {
        return Err(ExternalError::Determinate(format!(
            "cannot truncate {key:?} below {below}: beyond its head"
        )));
    }
    let deleted = tx
        .execute("DELETE FROM consensus WHERE key = ?1 AND seqno < ?2", params![key, below_sql])
        .map_err(|e| determinate("truncate", e))?;
    match tx.commit() {
        Ok(()) => Ok(deleted as u64),
        Err(error) if commit_failure_is_determinate(&error) => Err(determinate("commit", error)),
        Err(error) => Err(ExternalError::Indeterminate(format!("sqlite commit: {error}"))),
    }
}

impl Consensus for SqliteConsensus {
    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<VersionedData>, ExternalError>> {
        let key = key.to_owned();
        Box::pin(self.with_connection(move |conn| head(conn, &key)))
    }

    fn compare_and_set_multi(&self, mut ops: Vec<CasOp>) -> BoxFuture<'_, Result<CasOutcome, ExternalError>> {
        Box::pin(async move {
            check_ops(&mut ops)?;
            self.queue_compare_and_set(ops).await
        })
    }

    fn scan<'a>(
        &'a self,
        key: &'a str,
        from: SeqNo,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<VersionedData>, ExternalError>> {
        let key = key.to_owned();
        Box::pin(self.with_connection(move |conn| {
            let from = i64::try_from(from).unwrap_or(i64::MAX);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let mut statement = conn
                .prepare_cached(
                    "SELECT seqno, data FROM consensus WHERE key = ?1 AND seqno >= ?2 ORDER BY seqno LIMIT ?3",
                )
                .map_err(|e| determinate("scan", e))?;
            let rows = statement
                .query_map(params![key, from, limit], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?)))
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(|e| determinate("scan", e))?;
            rows.into_iter()
                .map(|(seqno, data)| Ok(VersionedData { seqno: seqno_of(seqno)?, data: Bytes::from(data) }))
                .collect()
        }))
    }

    fn truncate<'a>(&'a self, key: &'a str, below: SeqNo) -> BoxFuture<'a, Result<u64, ExternalError>> {
        let key = key.to_owned();
        Box::pin(self.with_connection(move |conn| truncate(conn, &key, below)))
    }

    fn list_keys(&self) -> BoxFuture<'_, Result<Vec<(String, SeqNo)>, ExternalError>> {
        Box::pin(self.with_connection(|conn| {
            let mut statement = conn
                .prepare_cached("SELECT key, seqno FROM consensus_heads ORDER BY key")
                .map_err(|e| determinate("list", e))?;
            let rows = statement
                .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(|e| determinate("list", e))?;
            rows.into_iter().map(|(key, seqno)| Ok((key, seqno_of(seqno)?))).collect()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(key: &str, expected: Option<SeqNo>, data: &'static [u8]) -> CasOp {
        let seqno = expected.map_or(0, |e| e + 1);
        CasOp { key: key.into(), expected, new: VersionedData { seqno, data: Bytes::from_static(data) } }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_compare_and_sets_commit_in_groups_each_with_its_own_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(SqliteConsensus::open(&dir.path().join("c.db"), Duration::from_secs(30)).await.unwrap());
        store.compare_and_set_multi(vec![op("held", None, b"h")]).await.unwrap();
        let mut tasks = Vec::new();
        for key in 0..64 {
            for data in [&b"a"[..], &b"b"[..]] {
                let store = Arc::clone(&store);
                let key = format!("k{key}");
                tasks.push(tokio::spawn(async move {
                    (
                        key.clone(),
                        data,
                        store.compare_and_set_multi(vec![op(&key, None, data)]).await.unwrap(),
                    )
                }));
            }
            // A multi-key request of which one key does not match: neither key changes.
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let ops = vec![op(&format!("m{key}"), None, b"m"), op("held", None, b"x")];
                (format!("m{key}"), &b"m"[..], store.compare_and_set_multi(ops).await.unwrap())
            }));
        }
        let mut winners = std::collections::BTreeMap::new();
        for task in tasks {
            let (key, data, outcome) = task.await.unwrap();
            if key.starts_with('m') {
                assert_eq!(outcome, CasOutcome::Mismatch, "{key}");
                assert_eq!(store.head(&key).await.unwrap(), None, "{key} was rolled back with its request");
            } else if outcome == CasOutcome::Committed {
                assert!(winners.insert(key, data).is_none(), "one winner per key");
            }
        }
        assert_eq!(winners.len(), 64, "one winner per key");
        for (key, data) in winners {
            let head = store.head(&key).await.unwrap().unwrap();
            assert_eq!((head.seqno, &head.data[..]), (0, data), "{key} holds its winner's version");
        }
        assert_eq!(store.head("held").await.unwrap().unwrap().data, Bytes::from_static(b"h"));
        let transactions = store.transactions();
        assert!(transactions < 64 * 3, "{transactions} transactions for {} requests", 64 * 3);
    }
}
