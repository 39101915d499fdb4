//! The PostgreSQL [`Consensus`] (cargo feature `postgres`), which also speaks CockroachDB's dialect.
//!
//! **How.** The same two tables as SQLite (`consensus` with every retained version, `consensus_heads`
//! with each key's head). A compare-and-set is one `READ COMMITTED` transaction that, per key in key order,
//! moves the head row (`UPDATE ... WHERE seqno = expected`, or `INSERT ... ON CONFLICT DO NOTHING` for a
//! new key) and inserts the version; a head row that did not move means a mismatch and a rollback. The head
//! row's lock serializes racing writers: the loser's `UPDATE` waits, then re-checks the moved row and finds
//! nothing to update. Each committed key is announced with `pg_notify('consensus_changes', key)` (in the
//! transaction, so only commits are announced); a dedicated connection `LISTEN`s and feeds
//! [`Consensus::changes`], reconnecting with backoff when the server goes away. CockroachDB (detected from
//! `version()`) has no `NOTIFY`: there the push channel is absent and readers poll.
//!
//! **Connections.** A pool of at most `connections` clients (URL parameter), opened lazily, each with its
//! statements prepared; a client whose call failed is dropped, not reused. TLS is not supported yet: use
//! `sslmode=disable` or `prefer` (the default, which falls back to plain TCP).
//!
//! **Errors.** The server refusing a statement (a `SQLSTATE`) is determinate, as is any failure before the
//! `COMMIT` was sent; a `COMMIT` whose answer is lost (connection closed, timeout) is indeterminate.
//!
//! **Tests.** The conformance suite in `tests/it/consensus.rs` against a throwaway PostgreSQL 15
//! (`storage::services`), and the outage test in `tests/it/faults.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use tokio::task::JoinHandle;
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

/// A pooled connection with its prepared statements.
struct Pooled {
    client: Client,
    head: Statement,
    move_head: Statement,
    new_head: Statement,
    insert: Statement,
    /// `None` on CockroachDB.
    notify: Option<Statement>,
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
    use tokio_postgres::error::SqlState;
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

async fn prepare(client: Client, notify: bool) -> Result<Pooled, tokio_postgres::Error> {
    Ok(Pooled {
        head: client
            .prepare(
                "SELECT h.seqno, c.data FROM consensus_heads h
                 LEFT JOIN consensus c ON c.key = h.key AND c.seqno = h.seqno WHERE h.key = $1",
            )
            .await?,
        move_head: client
            .prepare("UPDATE consensus_heads SET seqno = $3 WHERE key = $1 AND seqno = $2")
            .await?,
        new_head: client
            .prepare("INSERT INTO consensus_heads (key, seqno) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .await?,
        insert: client.prepare("INSERT INTO consensus (key, seqno, data) VALUES ($1, $2, $3)").await?,
        notify: match notify {
            true => Some(client.prepare(&format!("SELECT pg_notify('{CHANNEL}', $1::text)")).await?),
            false => None,
        },
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
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| ConsensusOpenError::Backend(format!("invalid postgres URL: {e}")))?;
        // A process that vanishes mid-transaction (killed, or its host cut off the network) would keep
        // its row locks, and every writer of that shard would wait, until the server notices the dead
        // client (TCP keepalive: hours). The server ends such a transaction after the call timeout.
        let options = format!(
            "{} -c idle_in_transaction_session_timeout={}",
            config.get_options().unwrap_or_default(),
            timeout.as_millis().max(1)
        );
        config.options(options.trim_start());
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
            self.shared
                .call(true, async move |pooled: &mut Pooled| {
                    let Pooled { client, move_head, new_head, insert, notify: notify_statement, .. } = pooled;
                    let tx = client.transaction().await.map_err(|e| determinate("begin", e))?;
                    for op in &ops {
                        let seqno = i64::try_from(op.new.seqno).expect("check_ops bounds seqnos");
                        let moved = match op.expected {
                            Some(expected) => {
                                let expected = i64::try_from(expected).expect("check_ops bounds seqnos");
                                tx.execute(&*move_head, &[&op.key, &expected, &seqno]).await
                            }
                            None => tx.execute(&*new_head, &[&op.key, &seqno]).await,
                        }
                        .map_err(|e| determinate("compare", e))?;
                        if moved != 1 {
                            // Dropping the transaction rolls it back.
                            return Ok(CasOutcome::Mismatch);
                        }
                        tx.execute(&*insert, &[&op.key, &seqno, &&op.new.data[..]])
                            .await
                            .map_err(|e| determinate("insert", e))?;
                        if let Some(notify) = notify_statement {
                            tx.execute(&*notify, &[&op.key]).await.map_err(|e| determinate("notify", e))?;
                        }
                    }
                    match tx.commit().await {
                        Ok(()) => Ok(CasOutcome::Committed),
                        Err(error) if error.as_db_error().is_some() => Err(determinate("commit", error)),
                        Err(error) => Err(ExternalError::Indeterminate(format!("postgres commit: {error}"))),
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
