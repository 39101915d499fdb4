//! The SQLite [`Consensus`]: the embedded default, one database file that every process on the machine
//! can share.
//!
//! **How.** Two tables: `consensus (key, seqno, data)` with every retained version, and
//! `consensus_heads (key, seqno)` with each key's head, written in the same transaction (so a head version
//! deleted by hand is detected, see the parent module). WAL mode, so readers do not block the writer;
//! `synchronous=FULL`, so a committed version survives a power failure; a busy timeout, so processes
//! queue for the write lock instead of failing at once; `BEGIN IMMEDIATE` for every write, so a
//! compare-and-set takes the write lock before it reads the heads it compares. Calls run on tokio's
//! blocking pool over a small pool of connections (at most [`MAX_CONNECTIONS`]).
//!
//! **Errors.** A failed `COMMIT` is determinate when SQLite reports that it did not write (full disk,
//! busy, locked, out of memory) and indeterminate otherwise (an I/O error after the log was written may
//! still commit on recovery). Everything before the commit is determinate.
//!
//! **Tests.** The conformance suite in `tests/it/consensus.rs`, including several processes' worth of
//! connections racing on one file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};
use tokio::sync::Semaphore;

use crate::api::BoxFuture;
use crate::consensus::{CasOp, CasOutcome, Consensus, ConsensusOpenError, SeqNo, VersionedData, check_ops};
use crate::external::ExternalError;

/// The most connections one process keeps open to the file.
pub(crate) const MAX_CONNECTIONS: usize = 4;

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

/// The SQLite store.
#[derive(Debug)]
pub(crate) struct SqliteConsensus {
    pool: Arc<Pool>,
}

fn open_connection(path: &Path, timeout: Duration) -> Result<Connection, ExternalError> {
    let open = |e| determinate(&format!("open {}", path.display()), e);
    let conn = Connection::open(path).map_err(open)?;
    conn.busy_timeout(timeout).map_err(open)?;
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
        let store = SqliteConsensus { pool };
        store
            .with_connection(|conn| {
                conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA} COMMIT;"))
                    .map_err(|e| determinate("schema", e))
            })
            .await
            .map_err(|e| ConsensusOpenError::Backend(format!("{}: {e}", path.display())))?;
        Ok(store)
    }

    /// Runs `work` on a pooled connection on the blocking pool. A connection whose work failed is closed
    /// rather than reused.
    async fn with_connection<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, ExternalError> + Send + 'static,
    ) -> Result<T, ExternalError> {
        // The permit moves into the blocking task, so a caller that stops waiting does not free its
        // connection slot before the work is done.
        let permit = Arc::clone(&self.pool.permits)
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        let pool = Arc::clone(&self.pool);
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let idle = pool.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
            let mut conn = match idle {
                Some(conn) => conn,
                None => open_connection(&pool.path, pool.timeout)?,
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

fn compare_and_set(conn: &mut Connection, ops: &[CasOp]) -> Result<CasOutcome, ExternalError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| determinate("begin", e))?;
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
    match tx.commit() {
        Ok(()) => Ok(CasOutcome::Committed),
        Err(error) if commit_failure_is_determinate(&error) => Err(determinate("commit", error)),
        Err(error) => Err(ExternalError::Indeterminate(format!("sqlite commit: {error}"))),
    }
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
            self.with_connection(move |conn| compare_and_set(conn, &ops)).await
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
