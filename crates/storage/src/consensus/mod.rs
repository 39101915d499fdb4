//! [`Consensus`]: a linearizable store of versioned values, changed only by compare-and-set (DESIGN §9). It
//! holds each shard's small state; the batch data lives in [`crate::blob`].
//!
//! **What this is.** Per key, a sequence of versions `(seqno, bytes)` with contiguous seqnos. `head` reads
//! the latest; `compare_and_set` appends version `expected + 1` (or `0` for a new key) iff the head is
//! still `expected`; [`Consensus::compare_and_set_multi`] does that for several keys in one transaction,
//! all or none (atomic appends across collections); `scan` reads old versions, `truncate` deletes those
//! below a seqno (never the head); `list_keys` lists every key with its head seqno. Backends, chosen by a
//! URL ([`ConsensusConfig`]):
//!
//! - `sqlite:///path/file.db`: one SQLite file (the embedded default) that every process on the machine
//!   can share: WAL mode, `synchronous=FULL`, a busy timeout, `BEGIN IMMEDIATE` for compare-and-set;
//! - `postgres://user@host:port/db` (cargo feature `postgres`): PostgreSQL, or CockroachDB (detected; no
//!   push channel there). Changes are announced with `NOTIFY` and pushed to [`Consensus::changes`]
//!   (`?listen=false` turns the receiving side off; `?connections=N` sizes the pool). TLS with
//!   `?sslmode=verify-full&sslrootcert=CA.pem`: the server's certificate checked against those CAs and
//!   for the host connected to. `sslmode=disable` and `prefer` (the default) connect without TLS;
//!   `require` and `verify-ca`, which do not check the server's name, are refused. With TLS,
//!   `&sslcert=FILE&sslkey=FILE` presents a client certificate (PostgreSQL's `clientcert`/`cert` auth);
//! - `mem://` or `mem://NAME`: in memory, a named one shared within the process.
//!
//! Both SQL backends keep a second table with each key's head seqno, written in the same transaction: a
//! head version deleted by hand is then reported as [`ExternalError::Corrupt`], not silently replaced by
//! the version before it (which would regress the shard's upper).
//!
//! **Errors.** Reads that fail are determinate. A write fails determinately when the database refused it
//! or rolled it back (including a full disk), indeterminately when its outcome is unknown (the connection
//! broke or timed out around the commit). Invalid requests (a seqno that is not `expected + 1`, a key
//! twice in one multi-key set) are determinate errors.
//!
//! **What this is not.** No retries and no interpretation of the bytes ([`crate::shard`] does both).
//!
//! **Tests.** The conformance suite `tests/it/consensus.rs` runs against every backend (PostgreSQL 15
//! started by `storage::services`), including racing compare-and-sets from many tasks.

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
mod sqlite;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::api::BoxFuture;
use crate::external::ExternalError;
use crate::url::{SplitUrl, UrlError};

/// A version number. Versions of a key are contiguous: `0, 1, 2, ...`.
pub type SeqNo = u64;

/// The largest seqno a backend stores (SQL integers are signed).
pub const MAX_SEQNO: SeqNo = i64::MAX as u64;

/// One version of a key.
#[derive(Clone, PartialEq, Eq)]
pub struct VersionedData {
    /// Its seqno.
    pub seqno: SeqNo,
    /// Its bytes.
    pub data: Bytes,
}

impl fmt::Debug for VersionedData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VersionedData").field("seqno", &self.seqno).field("bytes", &self.data.len()).finish()
    }
}

/// One key's part of a compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasOp {
    /// The key.
    pub key: String,
    /// The head seqno the caller expects (`None`: the key has no version yet).
    pub expected: Option<SeqNo>,
    /// The new version; its seqno must be `expected + 1` (or `0`).
    pub new: VersionedData,
}

/// What a compare-and-set did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasOutcome {
    /// Every key now has its new version.
    Committed,
    /// Some key's head was not the expected one; nothing changed.
    Mismatch,
}

/// A linearizable versioned store; see the module documentation for the contract.
pub trait Consensus: Send + Sync + fmt::Debug {
    /// The latest version of `key`, if any.
    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<VersionedData>, ExternalError>>;

    /// Sets every key of `ops` to its new version iff every head is the expected one; all or none.
    fn compare_and_set_multi(&self, ops: Vec<CasOp>) -> BoxFuture<'_, Result<CasOutcome, ExternalError>>;

    /// The versions of `key` from seqno `from` on, at most `limit`, in seqno order.
    fn scan<'a>(
        &'a self,
        key: &'a str,
        from: SeqNo,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<VersionedData>, ExternalError>>;

    /// Deletes the versions of `key` below `below`, which must be at most the head's seqno (the head is
    /// never deleted); returns how many were deleted.
    fn truncate<'a>(&'a self, key: &'a str, below: SeqNo) -> BoxFuture<'a, Result<u64, ExternalError>>;

    /// Every key with its head seqno, in key order.
    fn list_keys(&self) -> BoxFuture<'_, Result<Vec<(String, SeqNo)>, ExternalError>>;

    /// A push channel of changed keys (committed by any process), if the backend has one. A lagged
    /// receiver has missed some: it should treat every key as changed.
    fn changes(&self) -> Option<broadcast::Receiver<String>> {
        None
    }

    /// A one-key [`compare_and_set_multi`](Self::compare_and_set_multi).
    fn compare_and_set<'a>(
        &'a self,
        key: &'a str,
        expected: Option<SeqNo>,
        new: VersionedData,
    ) -> BoxFuture<'a, Result<CasOutcome, ExternalError>> {
        self.compare_and_set_multi(vec![CasOp { key: key.to_owned(), expected, new }])
    }
}

/// Checks what every backend refuses before touching its store: seqnos that do not follow `expected`,
/// seqnos beyond [`MAX_SEQNO`], a key named twice. Sorts `ops` by key (so that transactions lock in one
/// order).
pub(crate) fn check_ops(ops: &mut [CasOp]) -> Result<(), ExternalError> {
    ops.sort_by(|a, b| a.key.cmp(&b.key));
    for pair in ops.windows(2) {
        if pair[0].key == pair[1].key {
            return Err(ExternalError::Determinate(format!(
                "key {:?} is set twice in one transaction",
                pair[0].key
            )));
        }
    }
    for op in ops.iter() {
        let follows = op.expected.map_or(Some(0), |e| e.checked_add(1));
        if follows != Some(op.new.seqno) || op.new.seqno > MAX_SEQNO {
            return Err(ExternalError::Determinate(format!(
                "invalid compare-and-set of {:?}: new seqno {} after {:?}",
                op.key, op.new.seqno, op.expected
            )));
        }
    }
    Ok(())
}

/// Which consensus store, parsed from a `--consensus` URL.
#[derive(Clone, PartialEq, Eq)]
pub enum ConsensusKind {
    /// A SQLite file.
    Sqlite {
        /// The file.
        path: PathBuf,
    },
    /// PostgreSQL (or CockroachDB).
    Postgres {
        /// The connection URL, as `tokio-postgres` parses it (our own parameters removed).
        url: String,
        /// Connections in the pool. URL parameter `connections`; default 4.
        connections: usize,
        /// Whether to `LISTEN` for changes (the push channel). URL parameter `listen`; default true.
        /// Writers announce their changes either way.
        listen: bool,
        /// With `sslmode=verify-full&sslrootcert=FILE`: TLS, the server's certificate checked against the
        /// CAs in this PEM file and for the host connected to. `None`: no TLS.
        root_cert: Option<PathBuf>,
        /// With `sslcert=FILE&sslkey=FILE` (and TLS): the certificate chain and key this client presents.
        client_cert: Option<(PathBuf, PathBuf)>,
    },
    /// In memory; `Some(name)` is shared within the process.
    Memory {
        /// The name, if any.
        name: Option<String>,
    },
}

impl fmt::Debug for ConsensusKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsensusKind::Sqlite { path } => f.debug_struct("Sqlite").field("path", path).finish(),
            ConsensusKind::Postgres { url, connections, listen, root_cert, client_cert } => f
                .debug_struct("Postgres")
                .field("url", &redact_password(url))
                .field("connections", connections)
                .field("listen", listen)
                .field("root_cert", root_cert)
                .field("client_cert", client_cert)
                .finish(),
            ConsensusKind::Memory { name } => f.debug_struct("Memory").field("name", name).finish(),
        }
    }
}

fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some((userinfo, host)) = rest.split_once('@') else { return url.to_owned() };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_owned(),
    }
}

/// A consensus store's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsensusConfig {
    /// The store.
    pub kind: ConsensusKind,
    /// The most one call may take (SQLite: the busy timeout; PostgreSQL: connect and statement time).
    /// URL parameter `timeout_ms`; default 10 s.
    pub timeout: Duration,
}

/// Why a consensus store could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsensusOpenError {
    /// The database could not be opened or its tables created.
    #[error("cannot open the consensus store: {0}")]
    Backend(String),
    /// The server could not be reached (refused, timed out, or the connection closed while opening): it
    /// may be down for a while, and opening again may succeed (`ShardCollections::open` retries within
    /// its budget). A server that answers with a refusal (no such database, a wrong password) is
    /// [`Backend`](Self::Backend).
    #[error("the consensus store is unreachable: {0}")]
    Unreachable(String),
}

const SCHEMES: &str = "sqlite, postgres, mem";

impl std::str::FromStr for ConsensusConfig {
    type Err = UrlError;

    /// Parses a `--consensus` URL (see the module documentation).
    fn from_str(url: &str) -> Result<Self, UrlError> {
        let mut split = SplitUrl::parse(url, "consensus")?;
        let invalid = |reason: &str| UrlError::Invalid {
            what: "consensus",
            url: url.to_owned(),
            reason: reason.into(),
        };
        let timeout = match split.take("timeout_ms") {
            None => Duration::from_secs(10),
            Some(ms) => Duration::from_millis(ms.parse().map_err(|_| invalid("timeout_ms is not a number"))?),
        };
        let kind = match split.scheme.as_str() {
            "sqlite" => {
                if split.rest.is_empty() {
                    return Err(invalid("sqlite:// needs a file, e.g. sqlite:///var/lib/data/consensus.db"));
                }
                ConsensusKind::Sqlite { path: PathBuf::from(&split.rest) }
            }
            "postgres" | "postgresql" => {
                if !cfg!(feature = "postgres") {
                    return Err(UrlError::FeatureDisabled {
                        url: url.to_owned(),
                        backend: "PostgreSQL",
                        feature: "postgres",
                    });
                }
                let connections = match split.take("connections") {
                    None => 4,
                    Some(n) => match n.parse::<usize>() {
                        Ok(n) if (1..=64).contains(&n) => n,
                        _ => return Err(invalid("connections must be a number from 1 to 64")),
                    },
                };
                let listen = match split.take("listen").as_deref() {
                    None | Some("true") => true,
                    Some("false") => false,
                    Some(_) => return Err(invalid("listen must be true or false")),
                };
                // TLS: only with the server's certificate checked, name included (libpq's `verify-full`).
                let root_cert = split.take("sslrootcert").map(PathBuf::from);
                let sslmode = split.take("sslmode");
                let (sslmode, root_cert) = match (sslmode.as_deref(), root_cert) {
                    (Some("verify-full"), Some(ca)) => (Some("require"), Some(ca)),
                    (Some("verify-full"), None) => {
                        return Err(invalid("sslmode=verify-full needs sslrootcert=FILE (the CAs to trust)"));
                    }
                    (Some("require" | "verify-ca"), _) => {
                        return Err(invalid(
                            "sslmode=require and verify-ca do not check the server's name: use \
                             sslmode=verify-full with sslrootcert=FILE",
                        ));
                    }
                    (_, Some(_)) => return Err(invalid("sslrootcert is only used with sslmode=verify-full")),
                    (mode @ (None | Some("disable" | "prefer")), None) => (mode, None),
                    (Some(_), None) => {
                        return Err(invalid("sslmode must be disable, prefer (no TLS) or verify-full"));
                    }
                };
                if let Some(mode) = sslmode {
                    split.params.insert("sslmode".into(), mode.into());
                }
                let client_cert = match (split.take("sslcert"), split.take("sslkey")) {
                    (None, None) => None,
                    (Some(_), Some(_)) if root_cert.is_none() => {
                        return Err(invalid("sslcert and sslkey are only used with sslmode=verify-full"));
                    }
                    (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
                    _ => return Err(invalid("sslcert and sslkey go together")),
                };
                // The rest of the parameters are tokio-postgres's (application_name, ...).
                let query: Vec<String> = split.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                split.params.clear();
                let mut pg_url = format!("postgres://{}", split.rest);
                if !query.is_empty() {
                    pg_url = format!("{pg_url}?{}", query.join("&"));
                }
                #[cfg(feature = "postgres")]
                postgres::check_url(&pg_url).map_err(|reason| invalid(&reason))?;
                ConsensusKind::Postgres { url: pg_url, connections, listen, root_cert, client_cert }
            }
            "mem" => ConsensusKind::Memory { name: (!split.rest.is_empty()).then(|| split.rest.clone()) },
            other => {
                return Err(UrlError::UnknownScheme {
                    what: "consensus",
                    scheme: other.to_owned(),
                    url: url.to_owned(),
                    expected: SCHEMES,
                });
            }
        };
        split.finish("consensus", url)?;
        Ok(ConsensusConfig { kind, timeout })
    }
}

impl ConsensusConfig {
    /// A SQLite file, default timeout.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        ConsensusConfig {
            kind: ConsensusKind::Sqlite { path: path.into() },
            timeout: Duration::from_secs(10),
        }
    }

    /// A fresh in-memory store, default timeout.
    pub fn memory() -> Self {
        ConsensusConfig { kind: ConsensusKind::Memory { name: None }, timeout: Duration::from_secs(10) }
    }

    /// Opens the store, creating its tables if needed.
    pub async fn open(&self) -> Result<Arc<dyn Consensus>, ConsensusOpenError> {
        match &self.kind {
            ConsensusKind::Sqlite { path } => {
                Ok(Arc::new(sqlite::SqliteConsensus::open(path, self.timeout).await?))
            }
            ConsensusKind::Memory { name } => Ok(memory::MemoryConsensus::open(name.as_deref())),
            #[cfg(feature = "postgres")]
            ConsensusKind::Postgres { url, connections, listen, root_cert, client_cert } => {
                let tls = root_cert.as_deref().map(|ca| postgres::Tls {
                    root_cert: ca,
                    client_cert: client_cert.as_ref().map(|(cert, key)| (cert.as_path(), key.as_path())),
                });
                Ok(Arc::new(
                    postgres::PostgresConsensus::open(url, *connections, *listen, tls, self.timeout).await?,
                ))
            }
            #[cfg(not(feature = "postgres"))]
            ConsensusKind::Postgres { .. } => Err(ConsensusOpenError::Backend(
                "the PostgreSQL backend is not compiled in (cargo feature `postgres`)".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consensus_urls_parse_into_typed_configs() {
        let config: ConsensusConfig = "sqlite:///var/data/consensus.db".parse().unwrap();
        assert_eq!(config.kind, ConsensusKind::Sqlite { path: PathBuf::from("/var/data/consensus.db") });
        let config: ConsensusConfig = "mem://x?timeout_ms=5".parse().unwrap();
        assert_eq!(config.kind, ConsensusKind::Memory { name: Some("x".into()) });
        assert_eq!(config.timeout, Duration::from_millis(5));
        let pg: Result<ConsensusConfig, _> =
            "postgres://postgres:secret@127.0.0.1:5432/db?connections=2&application_name=x".parse();
        if cfg!(feature = "postgres") {
            let config = pg.unwrap();
            assert_eq!(
                config.kind,
                ConsensusKind::Postgres {
                    url: "postgres://postgres:secret@127.0.0.1:5432/db?application_name=x".into(),
                    connections: 2,
                    listen: true,
                    root_cert: None,
                    client_cert: None,
                }
            );
            assert!(!format!("{config:?}").contains("secret"), "{config:?}");
            let tls: ConsensusConfig =
                "postgres://u@db.example:5432/db?sslmode=verify-full&sslrootcert=/ca&sslcert=/c&sslkey=/k"
                    .parse()
                    .unwrap();
            assert_eq!(
                tls.kind,
                ConsensusKind::Postgres {
                    url: "postgres://u@db.example:5432/db?sslmode=require".into(),
                    connections: 4,
                    listen: true,
                    root_cert: Some(PathBuf::from("/ca")),
                    client_cert: Some((PathBuf::from("/c"), PathBuf::from("/k"))),
                }
            );
        } else {
            assert!(matches!(pg, Err(UrlError::FeatureDisabled { feature: "postgres", .. })));
        }
    }

    #[test]
    fn bad_consensus_urls_are_refused_with_the_reason() {
        let cases = [
            ("mysql://x", "unknown consensus scheme"),
            ("sqlite://", "needs a file"),
            ("sqlite:///x?journal=off", "unknown parameter \"journal\""),
            ("postgres://h/db?connections=0", "connections must be"),
            ("postgres://h/db?listen=maybe", "listen must be"),
            ("postgres://h/db?sslmode=require", "do not check the server's name"),
            ("postgres://h/db?sslmode=verify-ca&sslrootcert=/ca.pem", "do not check the server's name"),
            ("postgres://h/db?sslmode=verify-full", "needs sslrootcert"),
            ("postgres://h/db?sslrootcert=/ca.pem", "only used with sslmode=verify-full"),
            ("postgres://h/db?sslmode=sometimes", "sslmode must be"),
            ("postgres://h/db?sslcert=/c.pem&sslkey=/c.key", "only used with sslmode=verify-full"),
            ("postgres://h/db?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c.pem", "go together"),
            ("postgres://h/db?keepalives=maybe", "invalid postgres URL"),
        ];
        for (url, expected) in cases {
            let error = url.parse::<ConsensusConfig>().unwrap_err().to_string();
            if url.starts_with("postgres") && !cfg!(feature = "postgres") {
                assert!(error.contains("feature `postgres`"), "{url}: {error}");
            } else {
                assert!(error.contains(expected), "{url}: {error}");
            }
        }
    }

    #[test]
    fn compare_and_set_requests_are_checked_before_any_backend_sees_them() {
        let op = |key: &str, expected: Option<SeqNo>, seqno: SeqNo| CasOp {
            key: key.into(),
            expected,
            new: VersionedData { seqno, data: Bytes::new() },
        };
        assert!(check_ops(&mut [op("a", None, 0), op("b", Some(4), 5)]).is_ok());
        assert!(check_ops(&mut [op("a", None, 1)]).is_err());
        assert!(check_ops(&mut [op("a", Some(4), 6)]).is_err());
        assert!(check_ops(&mut [op("a", Some(u64::MAX), 0)]).is_err());
        assert!(check_ops(&mut [op("a", Some(MAX_SEQNO), MAX_SEQNO + 1)]).is_err());
        assert!(check_ops(&mut [op("a", None, 0), op("a", None, 0)]).is_err());
        let mut ops = [op("b", None, 0), op("a", None, 0)];
        check_ops(&mut ops).unwrap();
        assert_eq!(ops[0].key, "a");
    }
}
