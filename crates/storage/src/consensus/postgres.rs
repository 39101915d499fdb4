//! The PostgreSQL [`Consensus`] (cargo feature `postgres`), which also speaks CockroachDB's dialect.
//!
//! **How.** The same two tables as SQLite (`consensus` with every retained version, `consensus_heads`
//! with each key's head). A compare-and-set is **one statement** in its own implicit transaction
//! ([`cas_statement`]): one `INSERT ... ON CONFLICT DO UPDATE` moves every head, a key at a time in key
//! order (so two multi-key sets lock rows in the same order), each only if it is still the expected
//! version; then the versions are inserted and each key is announced with `pg_notify('consensus_changes',
//! key)`, which only a commit delivers. If a head did not move, the statement divides by zero (SQLSTATE
//! `22012`, which nothing else in it can raise): it rolls back whole and the call answers
//! [`CasOutcome::Mismatch`]. A racing writer waits for the head row's lock, then re-checks the moved row
//! and finds it moved. The call's answer waits for the server's `ReadyForQuery`, which follows the commit.
//!
//! **Why one statement.** The server never waits for this client while it holds a lock: it has the whole
//! statement before it starts. A transaction of several round trips keeps its row locks while its client
//! is silent, so a process cut off the network mid-transaction stalls every writer of those shards until
//! the server gives up on it (the cluster scenario's link cut stalled the table writer that way for
//! seconds). A dedicated connection `LISTEN`s and feeds [`Consensus::changes`], reconnecting with backoff
//! when the server goes away. CockroachDB (detected from `version()`) has no `NOTIFY`: there the push
//! channel is absent and readers poll. The statement writes each table once, as CockroachDB requires; no
//! CockroachDB is installed here, so that dialect is untested.
//!
//! **Connections.** A pool of at most `connections` clients (URL parameter), opened lazily, each with its
//! statements prepared; a client whose call failed is dropped, not reused. With a root certificate
//! (`sslmode=verify-full&sslrootcert=FILE`) every connection, the `LISTEN` one included, is TLS 1.3
//! through `tokio-rustls`, configured by `transport`'s `TlsClientConfig` (module `tls` below): the
//! server's certificate must chain to those CAs and name the host connected to; with
//! `sslcert=FILE&sslkey=FILE` the client presents its own certificate (for the server's `clientcert` or
//! `cert` authentication). A handshake that refuses the server is a refusal
//! ([`ConsensusOpenError::Backend`]), not an unreachable server to wait for.
//!
//! **Errors.** The server refusing a statement (a `SQLSTATE` of severity `ERROR`) is determinate: it
//! rolled back. A compare-and-set whose answer is lost (connection closed, timeout, or the session ended
//! by a `FATAL`, which may follow the commit) is indeterminate: it may have committed. Messages carry the driver's causes ([`describe`]): what the server said, or why the
//! handshake failed (the driver's own message names only the kind, such as "db error").
//!
//! **Tests.** The conformance suite in `tests/it/consensus.rs` against a throwaway PostgreSQL 15
//! (`storage::services`), with a writer cut off mid-call, a TLS-only server (verified, plain and
//! untrusted connections) and one that wants client certificates; the outage test in
//! `tests/it/faults.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};
use tokio::task::JoinHandle;
use tokio_postgres::error::{Severity, SqlState};
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};

use self::tls::RustlsConnector;

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
    /// [`cas_statement`].
    cas: Statement,
    scan: Statement,
    list: Statement,
}

struct Shared {
    config: tokio_postgres::Config,
    /// `Some` with `sslmode=verify-full`: every connection is TLS, the server's certificate checked.
    tls: Option<RustlsConnector>,
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
    ExternalError::Determinate(format!("postgres {what}: {}", describe(&error)))
}

/// A driver error with its causes: `tokio-postgres` prints only its kind ("db error", "error
/// performing TLS handshake"), and keeps what the server said, or why the handshake failed, as sources.
fn describe(error: &tokio_postgres::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
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

/// The messages a connection receives that answer no call (notifications, notices), until it closes.
type Messages = futures::stream::BoxStream<'static, Result<AsyncMessage, tokio_postgres::Error>>;

/// Opens a connection, over TLS if `tls`; answers the client and the connection's other messages, which
/// must be polled for the client to make progress.
async fn open_connection(
    config: &tokio_postgres::Config,
    tls: Option<&RustlsConnector>,
) -> Result<(Client, Messages), tokio_postgres::Error> {
    fn messages<S, T>(mut connection: tokio_postgres::Connection<S, T>) -> Messages
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        Box::pin(futures::stream::poll_fn(move |cx| connection.poll_message(cx)))
    }
    Ok(match tls {
        Some(tls) => {
            let (client, connection) = config.connect(tls.clone()).await?;
            (client, messages(connection))
        }
        None => {
            let (client, connection) = config.connect(NoTls).await?;
            (client, messages(connection))
        }
    })
}

async fn connect(
    config: &tokio_postgres::Config,
    tls: Option<&RustlsConnector>,
    timeout: Duration,
) -> Result<Client, ConnectFailure> {
    let (client, mut messages) = match tokio::time::timeout(timeout, open_connection(config, tls)).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(error)) => {
            let unreachable = unreachable(&error) && !tls::refused(&error);
            return Err(ConnectFailure { error: determinate("connect", error), unreachable });
        }
        Err(_) => {
            let error = ExternalError::Determinate(format!("postgres connect timed out after {timeout:?}"));
            return Err(ConnectFailure { error, unreachable: true });
        }
    };
    tokio::spawn(async move {
        // Pooled connections do not listen: their notifications and notices are dropped.
        while let Some(message) = futures::StreamExt::next(&mut messages).await {
            if let Err(error) = message {
                tracing::debug!(error = %describe(&error), "postgres consensus connection closed");
                return;
            }
        }
    });
    Ok(client)
}

/// The compare-and-set, as one statement for any number of keys. Its parameters are arrays with an
/// element per key, in key order: `$1` the keys, `$2` the new seqnos, `$3` the new versions' data (the
/// expected head is the new seqno minus one, or none for seqno 0: [`check_ops`] made sure of that).
///
/// - `heads` moves every head in one `INSERT ... ON CONFLICT DO UPDATE`, a key at a time in key order
///   (`ORDER BY` the array position), so its row locks are taken in key order. A new key (seqno 0) is
///   inserted unless it exists; an existing head moves only if it is the new seqno minus one (a racing
///   writer's move is seen after waiting for its lock). A key expected to exist that does not is not
///   inserted. Keys that did not move return no row.
/// - `versions` inserts the new versions if every head moved.
/// - The last line answers a row per key (its `pg_notify` call where there is `NOTIFY`), or, if a head did
///   not move, divides by zero: the error rolls the whole statement back.
///
/// One write to each table, so CockroachDB's rule of one modification per table and statement holds.
fn cas_statement(notify: bool) -> String {
    let answer = if notify { format!("pg_notify('{CHANNEL}', key)") } else { "key".to_owned() };
    format!(
        "WITH ops AS (SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[]) \
         WITH ORDINALITY AS o(key, seqno, data, position)), \
         heads AS (INSERT INTO consensus_heads (key, seqno) \
         SELECT key, seqno FROM ops \
         WHERE seqno = 0 OR EXISTS (SELECT 1 FROM consensus_heads h WHERE h.key = ops.key) \
         ORDER BY position \
         ON CONFLICT (key) DO UPDATE SET seqno = EXCLUDED.seqno \
         WHERE consensus_heads.seqno = EXCLUDED.seqno - 1 RETURNING 1), \
         moved AS (SELECT (SELECT count(*) FROM heads) = cardinality($1::text[]) AS all_moved), \
         versions AS (INSERT INTO consensus (key, seqno, data) \
         SELECT key, seqno, data FROM ops WHERE (SELECT all_moved FROM moved) RETURNING key) \
         SELECT {answer} FROM versions WHERE 1 / (SELECT all_moved FROM moved)::int = 1"
    )
}

async fn prepare(client: Client, notify: bool) -> Result<Pooled, tokio_postgres::Error> {
    Ok(Pooled {
        head: client
            .prepare(
                "SELECT h.seqno, c.data FROM consensus_heads h
                 LEFT JOIN consensus c ON c.key = h.key AND c.seqno = h.seqno WHERE h.key = $1",
            )
            .await?,
        cas: {
            use tokio_postgres::types::Type;
            let types = [Type::TEXT_ARRAY, Type::INT8_ARRAY, Type::BYTEA_ARRAY];
            client.prepare_typed(&cas_statement(notify), &types).await?
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
        let client = connect(&self.config, self.tls.as_ref(), self.timeout).await?;
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

/// Checks a PostgreSQL URL (tokio-postgres's syntax, after [`ConsensusConfig`](super::ConsensusConfig)
/// took its own parameters out) when it is parsed, before anything connects: a malformed one is refused
/// with the reason.
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    parse_url(url).map(drop)
}

/// The connection settings of a PostgreSQL URL, or why it is malformed.
fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    url.parse().map_err(|e| format!("invalid postgres URL: {e}"))
}

/// The TLS of a PostgreSQL store's connections: the CAs the server's certificate must chain to, and the
/// client's own certificate chain and key, if it presents one (PEM files).
pub(crate) struct Tls<'a> {
    pub(crate) root_cert: &'a std::path::Path,
    pub(crate) client_cert: Option<(&'a std::path::Path, &'a std::path::Path)>,
}

impl PostgresConsensus {
    pub(crate) async fn open(
        url: &str,
        connections: usize,
        listen_for_changes: bool,
        tls: Option<Tls<'_>>,
        timeout: Duration,
    ) -> Result<Self, ConsensusOpenError> {
        let config = parse_url(url).map_err(ConsensusOpenError::Backend)?;
        let tls = match tls {
            Some(tls) => Some(
                RustlsConnector::new(tls.root_cert, tls.client_cert)
                    .map_err(|e| ConsensusOpenError::Backend(format!("postgres TLS: {e}")))?,
            ),
            None => None,
        };
        let client =
            connect(&config, tls.as_ref(), timeout).await.map_err(|failure| match failure.unreachable {
                true => ConsensusOpenError::Unreachable(failure.error.to_string()),
                false => ConsensusOpenError::Backend(failure.error.to_string()),
            })?;
        let failed = |what: &str, e: tokio_postgres::Error| match unreachable(&e) {
            true => ConsensusOpenError::Unreachable(format!("postgres {what}: {}", describe(&e))),
            false => ConsensusOpenError::Backend(format!("postgres {what}: {}", describe(&e))),
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
            tls,
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
        let (client, mut messages) = loop {
            let connecting = open_connection(&shared.config, shared.tls.as_ref());
            match tokio::time::timeout(shared.timeout, connecting).await {
                Ok(Ok(pair)) => break pair,
                _ => {
                    retry.wait().await;
                }
            }
        };
        let forward = {
            let changes = changes.clone();
            async move {
                while let Some(message) = futures::StreamExt::next(&mut messages).await {
                    match message {
                        Ok(AsyncMessage::Notification(note)) => {
                            // No subscriber is fine: nobody is listening right now.
                            let _ = changes.send(note.payload().to_owned());
                        }
                        Ok(_) => {}
                        Err(error) => {
                            let error = describe(&error);
                            tracing::debug!(%error, "postgres consensus change listener disconnected");
                            return;
                        }
                    }
                }
            }
        };
        let subscribe = async {
            if let Err(error) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                tracing::debug!(error = %describe(&error), "postgres LISTEN failed");
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
                    let keys: Vec<&str> = ops.iter().map(|op| op.key.as_str()).collect();
                    let seqnos = ops
                        .iter()
                        .map(|op| i64::try_from(op.new.seqno).expect("check_ops bounds seqnos"))
                        .collect::<Vec<i64>>();
                    let data: Vec<&[u8]> = ops.iter().map(|op| &op.new.data[..]).collect();
                    match pooled.client.execute(&pooled.cas, &[&keys, &seqnos, &data]).await {
                        Ok(rows) if rows == ops.len() as u64 => Ok(CasOutcome::Committed),
                        // Not what the statement answers: whether it committed is for the caller to find.
                        Ok(rows) => Err(ExternalError::Indeterminate(format!(
                            "postgres compare-and-set of {} keys answered {rows} rows",
                            ops.len()
                        ))),
                        Err(error) if error.code() == Some(&SqlState::DIVISION_BY_ZERO) => {
                            Ok(CasOutcome::Mismatch)
                        }
                        // An `ERROR` ends the statement, which rolls back; a `FATAL` or `PANIC` ends the
                        // session, which may come just after the commit.
                        Err(error)
                            if error
                                .as_db_error()
                                .is_some_and(|db| db.parsed_severity() == Some(Severity::Error)) =>
                        {
                            Err(determinate("compare-and-set", error))
                        }
                        Err(error) => Err(ExternalError::Indeterminate(format!(
                            "postgres compare-and-set: {}",
                            describe(&error)
                        ))),
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

/// TLS for the PostgreSQL connections: a `tokio-postgres` connector over `tokio-rustls`, configured by
/// `transport::tls` (TLS 1.3, the server's certificate checked against the CAs of `sslrootcert` and for
/// the host connected to).
mod tls {
    use std::io;
    use std::path::Path;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_postgres::Socket;
    use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::pki_types::ServerName;

    use crate::api::BoxFuture;

    /// Makes a TLS connection per PostgreSQL connection.
    #[derive(Clone)]
    pub(super) struct RustlsConnector {
        config: Arc<tokio_rustls::rustls::ClientConfig>,
    }

    impl RustlsConnector {
        /// A connector trusting the CAs in the PEM file `root_cert`, presenting the chain and key of
        /// `client_cert` if given.
        pub(super) fn new(
            root_cert: &Path,
            client_cert: Option<(&Path, &Path)>,
        ) -> Result<Self, transport::TlsConfigError> {
            let config = transport::TlsClientConfig::from_pem_files(root_cert, client_cert)?;
            Ok(RustlsConnector { config: config.rustls_config() })
        }
    }

    impl MakeTlsConnect<Socket> for RustlsConnector {
        type Stream = RustlsStream;
        type TlsConnect = RustlsConnect;
        type Error = io::Error;

        fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnect, io::Error> {
            let name = ServerName::try_from(host.to_owned()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("invalid server name {host:?}"))
            })?;
            Ok(RustlsConnect { connector: TlsConnector::from(Arc::clone(&self.config)), name })
        }
    }

    /// One connection's handshake, for the server name it must prove.
    pub(super) struct RustlsConnect {
        connector: TlsConnector,
        name: ServerName<'static>,
    }

    impl TlsConnect<Socket> for RustlsConnect {
        type Stream = RustlsStream;
        type Error = io::Error;
        type Future = BoxFuture<'static, io::Result<RustlsStream>>;

        fn connect(self, stream: Socket) -> Self::Future {
            Box::pin(async move { self.connector.connect(self.name, stream).await.map(RustlsStream) })
        }
    }

    /// A TLS stream to the server.
    pub(super) struct RustlsStream(tokio_rustls::client::TlsStream<Socket>);

    impl tokio_postgres::tls::TlsStream for RustlsStream {
        /// No channel binding: the server's certificate is checked instead (and the server does not ask
        /// for SCRAM with channel binding unless the client offers it).
        fn channel_binding(&self) -> ChannelBinding {
            ChannelBinding::none()
        }
    }

    impl AsyncRead for RustlsStream {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for RustlsStream {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// Whether a failed connect is the TLS handshake refusing the server (an untrusted certificate, a
    /// wrong name): a refusal, not an unreachable server, so it is not retried.
    pub(super) fn refused(error: &tokio_postgres::Error) -> bool {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(error) = source {
            if error.downcast_ref::<tokio_rustls::rustls::Error>().is_some() {
                return true;
            }
            if let Some(io) = error.downcast_ref::<io::Error>()
                && io.get_ref().is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>())
            {
                return true;
            }
            source = error.source();
        }
        false
    }
}
