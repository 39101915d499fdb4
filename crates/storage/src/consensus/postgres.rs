//! The PostgreSQL [`Consensus`] (cargo feature `postgres`), which also speaks CockroachDB's dialect.
//!
//! **How.** The same two tables as SQLite (`consensus` with every retained version, `consensus_heads`
//! with each key's head). A compare-and-set is **one statement**, run in its own implicit transaction
//! ([`cas_statement`]): per key in key order, a step moves the head row (`UPDATE ... WHERE seqno =
//! expected`, or `INSERT ... ON CONFLICT DO NOTHING` for a new key), and each step runs only if the one
//! before it moved its row, so row locks are taken in key order (no deadlock between two multi-key sets).
//! Then the versions are inserted and each key is announced with `pg_notify('consensus_changes', key)`
//! (only commits are announced). A step that moved nothing ends the statement with a division by zero
//! (SQLSTATE `22012`, which nothing else in it can raise): the statement rolls back whole and the call
//! answers [`CasOutcome::Mismatch`]. A racing writer's `UPDATE` waits for the head row's lock, then
//! re-checks the moved row and finds nothing to update.
//!
//! **Why one statement.** The server never waits for this client while it holds a lock: it has the whole
//! statement before it starts, and commits before it answers. A transaction of several round trips would
//! keep its row locks while the client is silent, and a process cut off the network mid-transaction would
//! stall every writer of those shards until the server noticed (the cluster scenario's link cut did that
//! to the table writer for seconds). A dedicated connection `LISTEN`s and feeds [`Consensus::changes`],
//! reconnecting with backoff when the server goes away. CockroachDB (detected from `version()`) has no
//! `NOTIFY`, so there the push channel is absent and readers poll; it also refuses two writes to one table
//! in one statement, so multi-key compare-and-sets fail there (untested: no CockroachDB here).
//!
//! **Connections.** A pool of at most `connections` clients (URL parameter), opened lazily, each with its
//! statements prepared; a client whose call failed is dropped, not reused. TLS is not supported yet: use
//! `sslmode=disable` or `prefer` (the default, which falls back to plain TCP).
//!
//! **Errors.** The server refusing a statement (a `SQLSTATE`) is determinate: it rolled back. A
//! compare-and-set whose answer is lost (connection closed, timeout) is indeterminate: it may have
//! committed.
//!
//! **Tests.** The conformance suite in `tests/it/consensus.rs` against a throwaway PostgreSQL 15
//! (`storage::services`), and the outage test in `tests/it/faults.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};

use crate::api::BoxFuture;
use crate::consensus::{CasOp, CasOutcome, Consensus, ConsensusOpenError, SeqNo, VersionedData, check_ops};
use crate::external::{ExternalError, Retry};

const CHANNEL: &str = "consensus_changes";
/// How many announced keys a slow subscriber may fall behind before it is told it lagged.
const CHANGES_CAPACITY: usize = 1024;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS consensus (
        key text NOT NULL,
        seqno bigint NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (key, seqno)
    );
    CREATE TABLE IF NOT EXISTS consensus_heads (
        key text NOT NULL PRIMARY KEY,
        seqno bigint NOT NULL
    );
";

/// How many compare-and-set statements (one per number of keys) a pooled connection keeps prepared; a set
/// of another size prepares its statement for the call.
const CAS_STATEMENTS_KEPT: usize = 8;

/// A pooled connection with its prepared statements.
struct Pooled {
    client: Client,
    head: Statement,
    /// [`cas_statement`]s by number of keys, at most [`CAS_STATEMENTS_KEPT`].
    cas: std::collections::BTreeMap<usize, Statement>,
    scan: Statement,
    list: Statement,
}

struct Shared {
    config: tokio_postgres::Config,
    timeout: Duration,
    idle: Mutex<Vec<Pooled>>,
    permits: Arc<Semaphore>,
    /// Whether the server has `NOTIFY` (PostgreSQL, not CockroachDB).
    notify: bool,
}

/// The PostgreSQL store.
pub(crate) struct PostgresConsensus {
    shared: Arc<Shared>,
    changes: Option<broadcast::Sender<String>>,
    listener: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PostgresConsensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConsensus")
            .field("hosts", &self.shared.config.get_hosts())
            .field("dbname", &self.shared.config.get_dbname())
            .field("notify", &self.shared.notify)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresConsensus {
    fn drop(&mut self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
    }
}

fn determinate(what: &str, error: tokio_postgres::Error) -> ExternalError {
    ExternalError::Determinate(format!("postgres {what}: {error}"))
}

fn seqno_of(value: i64) -> Result<SeqNo, ExternalError> {
    SeqNo::try_from(value)
        .map_err(|_| ExternalError::Corrupt(format!("negative seqno {value} in the postgres store")))
}

/// Whether a failed call means the server could not be reached (down, starting up or shutting down, or
/// the connection closed), rather than the server answering with a refusal (a wrong database, user or
/// password; an SQL error).
fn unreachable(error: &tokio_postgres::Error) -> bool {
    match error.as_db_error() {
        None => true,
        // A server starting up, shutting down or in recovery answers, but cannot serve yet: as good as
        // unreachable for a moment (a restart after an outage passes through these).
        Some(db) => [SqlState::CANNOT_CONNECT_NOW, SqlState::ADMIN_SHUTDOWN, SqlState::CRASH_SHUTDOWN]
            .contains(db.code()),
    }
}

/// A failed connection attempt: the error, and whether the server could not be reached at all.
struct ConnectFailure {
    error: ExternalError,
    unreachable: bool,
}

impl From<ConnectFailure> for ExternalError {
    fn from(failure: ConnectFailure) -> ExternalError {
        failure.error
    }
}

async fn connect(config: &tokio_postgres::Config, timeout: Duration) -> Result<Client, ConnectFailure> {
    let connecting = config.connect(NoTls);
    let (client, connection) = match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(error)) => {
            let unreachable = unreachable(&error);
            return Err(ConnectFailure { error: determinate("connect", error), unreachable });
        }
        Err(_) => {
            let error = ExternalError::Determinate(format!("postgres connect timed out after {timeout:?}"));
            return Err(ConnectFailure { error, unreachable: true });
        }
    };
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "postgres consensus connection closed");
        }
    });
    Ok(client)
}

/// The compare-and-set of `keys` keys, as one statement. Its parameters are arrays with an element per
/// key, in key order: `$1` the keys, `$2` the expected head seqnos (`NULL` for a new key), `$3` the new
/// seqnos, `$4` the new versions' data. Step `i` moves key `i`'s head (`m{i}` an existing head, `c{i}` a
/// new one) only if step `i - 1` moved its own, so the steps lock rows in key order and stop at the first
/// mismatch; the last line turns a mismatch into a division by zero, which rolls back the steps before it.
/// On success it answers a row per key (the `pg_notify` calls, or the keys where there is no `NOTIFY`).
fn cas_statement(keys: usize, notify: bool) -> String {
    assert!(keys > 0, "check_ops refuses an empty set");
    let moved = |i: usize| format!("EXISTS (SELECT FROM m{i} UNION ALL SELECT FROM c{i})");
    let mut sql = String::from("WITH ");
    for i in 1..=keys {
        let gate = if i == 1 { "TRUE".to_owned() } else { moved(i - 1) };
        sql.push_str(&format!(
            "m{i} AS (UPDATE consensus_heads SET seqno = $3[{i}] \
             WHERE key = $1[{i}] AND seqno = $2[{i}] AND {gate} RETURNING 1), \
             c{i} AS (INSERT INTO consensus_heads (key, seqno) SELECT $1[{i}], $3[{i}] \
             WHERE $2[{i}] IS NULL AND {gate} ON CONFLICT (key) DO NOTHING RETURNING 1), "
        ));
    }
    let all = moved(keys);
    let answer = if notify { format!("pg_notify('{CHANNEL}', key)") } else { "key".to_owned() };
    sql.push_str(&format!(
        "v AS (INSERT INTO consensus (key, seqno, data) SELECT * FROM unnest($1, $3, $4) WHERE {all} \
         RETURNING key) SELECT {answer} FROM v WHERE 1 / ({all})::int = 1"
    ));
    sql
}

async fn prepare_cas(client: &Client, keys: usize, notify: bool) -> Result<Statement, tokio_postgres::Error> {
    use tokio_postgres::types::Type;
    let types = [Type::TEXT_ARRAY, Type::INT8_ARRAY, Type::INT8_ARRAY, Type::BYTEA_ARRAY];
    client.prepare_typed(&cas_statement(keys, notify), &types).await
}

async fn prepare(client: Client, notify: bool) -> Result<Pooled, tokio_postgres::Error> {
    Ok(Pooled {
        head: client
            .prepare(
                "SELECT h.seqno, c.data FROM consensus_heads h
                 LEFT JOIN consensus c ON c.key = h.key AND c.seqno = h.seqno WHERE h.key = $1",
            )
            .await?,
        cas: std::collections::BTreeMap::from([(1, prepare_cas(&client, 1, notify).await?)]),
        scan: client
            .prepare(
                "SELECT seqno, data FROM consensus WHERE key = $1 AND seqno >= $2 ORDER BY seqno LIMIT $3",
            )
            .await?,
        list: client.prepare("SELECT key, seqno FROM consensus_heads ORDER BY key").await?,
        client,
    })
}

impl Shared {
    /// A pooled connection and the permit that bounds the pool.
    async fn pooled(&self) -> Result<(Pooled, OwnedSemaphorePermit), ExternalError> {
        let permit =
            Arc::clone(&self.permits).acquire_owned().await.expect("the pool's semaphore is never closed");
        loop {
            let idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
            match idle {
                Some(pooled) if pooled.client.is_closed() => continue,
                Some(pooled) => return Ok((pooled, permit)),
                None => break,
            }
        }
        let client = connect(&self.config, self.timeout).await?;
        let pooled = match tokio::time::timeout(self.timeout, prepare(client, self.notify)).await {
            Ok(Ok(pooled)) => pooled,
            Ok(Err(error)) => return Err(determinate("prepare", error)),
            Err(_) => return Err(ExternalError::Determinate("postgres prepare timed out".into())),
        };
        Ok((pooled, permit))
    }

    /// Runs `work` on a pooled connection within the timeout; the connection goes back to the pool only
    /// if the work succeeded. A timeout is indeterminate iff `write`.
    async fn call<T>(
        &self,
        write: bool,
        work: impl AsyncFnOnce(&mut Pooled) -> Result<T, ExternalError>,
    ) -> Result<T, ExternalError> {
        let (mut pooled, permit) = self.pooled().await?;
        let result = match tokio::time::timeout(self.timeout, work(&mut pooled)).await {
            Ok(result) => result,
            Err(_) => {
                let message = format!("postgres call timed out after {:?}", self.timeout);
                return Err(if write {
                    ExternalError::Indeterminate(message)
                } else {
                    ExternalError::Determinate(message)
                });
            }
        };
        if result.is_ok() {
            self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(pooled);
        }
        drop(permit);
        result
    }
}

impl PostgresConsensus {
    pub(crate) async fn open(
        url: &str,
        connections: usize,
        listen_for_changes: bool,
        timeout: Duration,
    ) -> Result<Self, ConsensusOpenError> {
        let config: tokio_postgres::Config =
            url.parse().map_err(|e| ConsensusOpenError::Backend(format!("invalid postgres URL: {e}")))?;
        let client = connect(&config, timeout).await.map_err(|failure| match failure.unreachable {
            true => ConsensusOpenError::Unreachable(failure.error.to_string()),
            false => ConsensusOpenError::Backend(failure.error.to_string()),
        })?;
        let failed = |what: &str, e: tokio_postgres::Error| match unreachable(&e) {
            true => ConsensusOpenError::Unreachable(format!("postgres {what}: {e}")),
            false => ConsensusOpenError::Backend(format!("postgres {what}: {e}")),
        };
        let version: String =
            client.query_one("SELECT version()", &[]).await.map_err(|e| failed("version()", e))?.get(0);
        let notify = !version.contains("CockroachDB");
        // Concurrent `CREATE TABLE IF NOT EXISTS` can race in the catalog; one retry settles it.
        if client.batch_execute(SCHEMA).await.is_err() {
            client.batch_execute(SCHEMA).await.map_err(|e| failed("schema", e))?;
        }
        let shared = Arc::new(Shared {
            config,
            timeout,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(connections)),
            notify,
        });
        let (changes, listener) = if notify && listen_for_changes {
            let (tx, _) = broadcast::channel(CHANGES_CAPACITY);
            let listener = tokio::spawn(listen(Arc::clone(&shared), tx.clone()));
            (Some(tx), Some(listener))
        } else {
            (None, None)
        };
        Ok(PostgresConsensus { shared, changes, listener })
    }
}

/// Keeps a `LISTEN` connection open and forwards every notified key, reconnecting with backoff.
async fn listen(shared: Arc<Shared>, changes: broadcast::Sender<String>) {
    loop {
        let mut retry = Retry::new(Duration::from_millis(50), Duration::from_secs(2), Duration::MAX);
        let (client, mut connection) = loop {
            match tokio::time::timeout(shared.timeout, shared.config.connect(NoTls)).await {
                Ok(Ok(pair)) => break pair,
                _ => {
                    retry.wait().await;
                }
            }
        };
        let forward = {
            let changes = changes.clone();
            async move {
                while let Some(message) = futures::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    match message {
                        Ok(AsyncMessage::Notification(note)) => {
                            // No subscriber is fine: nobody is listening right now.
                            let _ = changes.send(note.payload().to_owned());
                        }
                        Ok(_) => {}
                        Err(error) => {
                            tracing::debug!(%error, "postgres consensus change listener disconnected");
                            return;
                        }
                    }
                }
            }
        };
        let subscribe = async {
            if let Err(error) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                tracing::debug!(%error, "postgres LISTEN failed");
                return;
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = forward => {}
            () = subscribe => {}
        }
        drop(client);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Consensus for PostgresConsensus {
    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<VersionedData>, ExternalError>> {
        Box::pin(self.shared.call(false, async move |pooled: &mut Pooled| {
            let row =
                pooled.client.query_opt(&pooled.head, &[&key]).await.map_err(|e| determinate("head", e))?;
            let Some(row) = row else { return Ok(None) };
            let seqno: i64 = row.get(0);
            match row.get::<_, Option<Vec<u8>>>(1) {
                Some(data) => Ok(Some(VersionedData { seqno: seqno_of(seqno)?, data: Bytes::from(data) })),
                None => Err(ExternalError::Corrupt(format!(
                    "version {seqno} of {key:?}, its head, is missing from the postgres store"
                ))),
            }
        }))
    }

    fn compare_and_set_multi(&self, mut ops: Vec<CasOp>) -> BoxFuture<'_, Result<CasOutcome, ExternalError>> {
        Box::pin(async move {
            check_ops(&mut ops)?;
            let notify = self.shared.notify;
            self.shared
                .call(true, async move |pooled: &mut Pooled| {
                    let keys: Vec<&str> = ops.iter().map(|op| op.key.as_str()).collect();
                    let expected = ops
                        .iter()
                        .map(|op| op.expected.map(|e| i64::try_from(e).expect("check_ops bounds seqnos")))
                        .collect::<Vec<Option<i64>>>();
                    let seqnos = ops
                        .iter()
                        .map(|op| i64::try_from(op.new.seqno).expect("check_ops bounds seqnos"))
                        .collect::<Vec<i64>>();
                    let data: Vec<&[u8]> = ops.iter().map(|op| &op.new.data[..]).collect();
                    let statement = match pooled.cas.get(&ops.len()) {
                        Some(statement) => statement.clone(),
                        None => {
                            let statement = prepare_cas(&pooled.client, ops.len(), notify)
                                .await
                                .map_err(|e| determinate("prepare", e))?;
                            if pooled.cas.len() < CAS_STATEMENTS_KEPT {
                                pooled.cas.insert(ops.len(), statement.clone());
                            }
                            statement
                        }
                    };
                    match pooled.client.execute(&statement, &[&keys, &expected, &seqnos, &data]).await {
                        Ok(rows) => {
                            assert_eq!(rows, ops.len() as u64, "a committed set answers a row per key");
                            Ok(CasOutcome::Committed)
                        }
                        Err(error) if error.code() == Some(&SqlState::DIVISION_BY_ZERO) => {
                            Ok(CasOutcome::Mismatch)
                        }
                        Err(error) if error.as_db_error().is_some() => {
                            Err(determinate("compare-and-set", error))
                        }
                        Err(error) => {
                            Err(ExternalError::Indeterminate(format!("postgres compare-and-set: {error}")))
                        }
                    }
                })
                .await
        })
    }

    fn scan<'a>(
        &'a self,
        key: &'a str,
        from: SeqNo,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<VersionedData>, ExternalError>> {
        Box::pin(self.shared.call(false, async move |pooled: &mut Pooled| {
            let from = i64::try_from(from).unwrap_or(i64::MAX);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = pooled
                .client
                .query(&pooled.scan, &[&key, &from, &limit])
                .await
                .map_err(|e| determinate("scan", e))?;
            rows.iter()
                .map(|row| {
                    Ok(VersionedData {
                        seqno: seqno_of(row.get(0))?,
                        data: Bytes::from(row.get::<_, Vec<u8>>(1)),
                    })
                })
                .collect()
        }))
    }

    fn truncate<'a>(&'a self, key: &'a str, below: SeqNo) -> BoxFuture<'a, Result<u64, ExternalError>> {
        Box::pin(self.shared.call(true, async move |pooled: &mut Pooled| {
            let beyond = || {
                ExternalError::Determinate(format!("cannot truncate {key:?} below {below}: beyond its head"))
            };
            let below = i64::try_from(below).map_err(|_| beyond())?;
            // One statement: the head check and the delete see the same snapshot.
            let deleted = pooled
                .client
                .execute(
                    "DELETE FROM consensus WHERE key = $1 AND seqno < $2
                     AND $2 <= (SELECT seqno FROM consensus_heads WHERE key = $1)",
                    &[&key, &below],
                )
                .await
                .map_err(|e| determinate("truncate", e))?;
            if deleted == 0 {
                let head = pooled
                    .client
                    .query_opt("SELECT seqno FROM consensus_heads WHERE key = $1", &[&key])
                    .await
                    .map_err(|e| determinate("truncate", e))?;
                if head.is_none_or(|row| row.get::<_, i64>(0) < below) {
                    return Err(beyond());
                }
            }
            Ok(deleted)
        }))
    }

    fn list_keys(&self) -> BoxFuture<'_, Result<Vec<(String, SeqNo)>, ExternalError>> {
        Box::pin(self.shared.call(false, async move |pooled: &mut Pooled| {
            let rows = pooled.client.query(&pooled.list, &[]).await.map_err(|e| determinate("list", e))?;
            rows.iter().map(|row| Ok((row.get::<_, String>(0), seqno_of(row.get(1))?))).collect()
        }))
    }

    fn changes(&self) -> Option<broadcast::Receiver<String>> {
        self.changes.as_ref().map(broadcast::Sender::subscribe)
    }
}
