//! [`Blob`]: the key → bytes store that holds shards' batch data (DESIGN §9), on the `object_store` crate.
//!
//! **What this is.** The trait (get, atomic set, delete, list under a directory) and its backends, chosen
//! by a URL ([`BlobConfig`]):
//!
//! - `file:///dir`: local files under `dir` (the embedded default), written to a staging file and renamed
//!   into place, with the file and its directory fsynced before `set` returns;
//! - `mem://` or `mem://NAME`: in memory; a named store is shared by every open of the same name in the
//!   process while one is open (tests and the simulator);
//! - `s3://bucket/prefix?endpoint=URL&region=R&access_key_id=K&secret_access_key=S`: S3 or an
//!   S3-compatible server (cargo feature `s3`; credentials may also come from the usual `AWS_*`
//!   environment variables; `http://` endpoints are allowed).
//!
//! **Contract.** `set` is atomic: a `get` sees all of the value or nothing. The shard engine never
//! overwrites a key (every key it writes is fresh, see [`crate::external::random_id`]), so plain object
//! stores suffice. `get` of a missing key is `Ok(None)`; `delete` of a missing key succeeds. Reads that fail
//! are determinate; failed writes and deletes are indeterminate (they may have happened). Every call is
//! bounded by [`BlobConfig`]'s timeout.
//!
//! **What this is not.** No checksums or retries: the shard engine checks every part it reads and decides
//! what to retry.
//!
//! **Tests.** The conformance suite `tests/it/blob.rs` runs against every backend (S3 against a
//! `moto_server` on loopback).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::api::BoxFuture;
use crate::external::ExternalError;
use crate::url::{SplitUrl, UrlError};

/// One stored object, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobMeta {
    /// The key.
    pub key: String,
    /// The size of the value.
    pub size_bytes: u64,
    /// When it was written, in milliseconds since the Unix epoch.
    pub last_modified_ms: u64,
}

/// A key → bytes store; see the module documentation for the contract.
pub trait Blob: Send + Sync + fmt::Debug {
    /// The value at `key`, or `None` if there is none.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, ExternalError>>;

    /// Stores `value` at `key`, atomically.
    fn set<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), ExternalError>>;

    /// Deletes `key`; succeeds if it does not exist.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ExternalError>>;

    /// Every key under the directory `dir` (`a/b` lists `a/b/c` and `a/b/c/d`, not `a/bc`), in no
    /// particular order; `""` lists everything.
    fn list<'a>(&'a self, dir: &'a str) -> BoxFuture<'a, Result<Vec<BlobMeta>, ExternalError>>;
}

/// Where an S3 blob store is.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// The directory inside the bucket that every key is under (may be empty).
    pub prefix: String,
    /// The endpoint, for S3-compatible servers (`http://127.0.0.1:9000`); `None` for AWS.
    pub endpoint: Option<String>,
    /// The region. Default `us-east-1`.
    pub region: String,
    /// Credentials; `None` takes them from the environment (`AWS_ACCESS_KEY_ID`, ...).
    pub access_key_id: Option<String>,
    /// The secret of `access_key_id`.
    pub secret_access_key: Option<String>,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Which blob store, parsed from a `--blob` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobKind {
    /// Local files under a directory.
    File {
        /// The directory.
        root: PathBuf,
    },
    /// In memory; `Some(name)` is shared within the process.
    Memory {
        /// The name, if any.
        name: Option<String>,
    },
    /// S3 or an S3-compatible server.
    S3(S3Config),
}

/// A blob store's configuration: which store, and the timeout of each call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobConfig {
    /// The store.
    pub kind: BlobKind,
    /// The most one call may take before it fails (determinate for reads, indeterminate for writes).
    /// URL parameter `timeout_ms`; default 30 s.
    pub timeout: Duration,
}

/// Why a blob store could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobOpenError {
    /// The local directory could not be created.
    #[error("cannot create the blob directory {path}: {error}")]
    Directory {
        /// The directory.
        path: String,
        /// The operating system's error.
        error: String,
    },
    /// The backend refused the configuration.
    #[error("cannot open the blob store: {0}")]
    Backend(String),
}

const SCHEMES: &str = "file, mem, s3";

impl std::str::FromStr for BlobConfig {
    type Err = UrlError;

    /// Parses a `--blob` URL (see the module documentation).
    fn from_str(url: &str) -> Result<Self, UrlError> {
        let mut split = SplitUrl::parse(url, "blob")?;
        let invalid =
            |reason: &str| UrlError::Invalid { what: "blob", url: url.to_owned(), reason: reason.into() };
        let timeout = match split.take("timeout_ms") {
            None => Duration::from_secs(30),
            Some(ms) => Duration::from_millis(ms.parse().map_err(|_| invalid("timeout_ms is not a number"))?),
        };
        let kind = match split.scheme.as_str() {
            "file" => {
                if split.rest.is_empty() {
                    return Err(invalid("file:// needs a directory, e.g. file:///var/lib/data/blob"));
                }
                BlobKind::File { root: PathBuf::from(&split.rest) }
            }
            "mem" => BlobKind::Memory { name: (!split.rest.is_empty()).then(|| split.rest.clone()) },
            "s3" => {
                if !cfg!(feature = "s3") {
                    return Err(UrlError::FeatureDisabled {
                        url: url.to_owned(),
                        backend: "S3",
                        feature: "s3",
                    });
                }
                let (bucket, prefix) = split.rest.split_once('/').unwrap_or((&split.rest, ""));
                if bucket.is_empty() {
                    return Err(invalid("s3:// needs a bucket, e.g. s3://bucket/prefix"));
                }
                BlobKind::S3(S3Config {
                    bucket: bucket.to_owned(),
                    prefix: prefix.trim_matches('/').to_owned(),
                    endpoint: split.take("endpoint"),
                    region: split.take("region").unwrap_or_else(|| "us-east-1".into()),
                    access_key_id: split.take("access_key_id"),
                    secret_access_key: split.take("secret_access_key"),
                })
            }
            other => {
                return Err(UrlError::UnknownScheme {
                    what: "blob",
                    scheme: other.to_owned(),
                    url: url.to_owned(),
                    expected: SCHEMES,
                });
            }
        };
        split.finish("blob", url)?;
        Ok(BlobConfig { kind, timeout })
    }
}

impl BlobConfig {
    /// Local files under `root`, default timeout.
    pub fn file(root: impl Into<PathBuf>) -> Self {
        BlobConfig { kind: BlobKind::File { root: root.into() }, timeout: Duration::from_secs(30) }
    }

    /// A fresh in-memory store, default timeout.
    pub fn memory() -> Self {
        BlobConfig { kind: BlobKind::Memory { name: None }, timeout: Duration::from_secs(30) }
    }

    /// Opens the store (creating a local directory if needed).
    pub fn open(&self) -> Result<Arc<dyn Blob>, BlobOpenError> {
        let (store, kind): (Arc<dyn ObjectStore>, &'static str) = match &self.kind {
            BlobKind::File { root } => {
                std::fs::create_dir_all(root).map_err(|error| BlobOpenError::Directory {
                    path: root.display().to_string(),
                    error: error.to_string(),
                })?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(root)
                    .map_err(|e| BlobOpenError::Backend(e.to_string()))?
                    .with_fsync(true)
                    .with_automatic_cleanup(true);
                (Arc::new(store), "file")
            }
            BlobKind::Memory { name } => (memory_store(name.as_deref()), "mem"),
            BlobKind::S3(config) => (open_s3(config)?, "s3"),
        };
        Ok(Arc::new(ObjectStoreBlob { store, kind, timeout: self.timeout }))
    }
}

fn memory_store(name: Option<&str>) -> Arc<dyn ObjectStore> {
    static NAMED: Mutex<BTreeMap<String, Weak<object_store::memory::InMemory>>> = Mutex::new(BTreeMap::new());
    let Some(name) = name else {
        return Arc::new(object_store::memory::InMemory::new());
    };
    let mut named = NAMED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    named.retain(|_, store| store.strong_count() > 0);
    if let Some(store) = named.get(name).and_then(Weak::upgrade) {
        return store;
    }
    let store = Arc::new(object_store::memory::InMemory::new());
    named.insert(name.to_owned(), Arc::downgrade(&store));
    store
}

#[cfg(feature = "s3")]
fn open_s3(config: &S3Config) -> Result<Arc<dyn ObjectStore>, BlobOpenError> {
    let mut builder = object_store::aws::AmazonS3Builder::from_env()
        .with_bucket_name(&config.bucket)
        .with_region(&config.region);
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
    }
    if let Some(key) = &config.access_key_id {
        builder = builder.with_access_key_id(key);
    }
    if let Some(secret) = &config.secret_access_key {
        builder = builder.with_secret_access_key(secret);
    }
    let store = builder.build().map_err(|e| BlobOpenError::Backend(e.to_string()))?;
    if config.prefix.is_empty() {
        Ok(Arc::new(store))
    } else {
        Ok(Arc::new(object_store::prefix::PrefixStore::new(store, config.prefix.as_str())))
    }
}

#[cfg(not(feature = "s3"))]
fn open_s3(_config: &S3Config) -> Result<Arc<dyn ObjectStore>, BlobOpenError> {
    Err(BlobOpenError::Backend("the S3 backend is not compiled in (cargo feature `s3`)".into()))
}

/// A [`Blob`] on an `object_store` backend.
struct ObjectStoreBlob {
    store: Arc<dyn ObjectStore>,
    kind: &'static str,
    timeout: Duration,
}

impl fmt::Debug for ObjectStoreBlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStoreBlob")
            .field("kind", &self.kind)
            .field("store", &self.store.to_string())
            .finish()
    }
}

fn path(key: &str) -> Result<ObjectPath, ExternalError> {
    ObjectPath::parse(key).map_err(|e| ExternalError::Determinate(format!("invalid blob key {key:?}: {e}")))
}

impl ObjectStoreBlob {
    async fn bounded<T>(
        &self,
        what: &str,
        key: &str,
        write: bool,
        op: impl Future<Output = Result<T, object_store::Error>>,
    ) -> Result<Result<T, object_store::Error>, ExternalError> {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(result) => Ok(result),
            Err(_) => {
                let message =
                    format!("{} blob {what} of {key:?} timed out after {:?}", self.kind, self.timeout);
                Err(if write {
                    ExternalError::Indeterminate(message)
                } else {
                    ExternalError::Determinate(message)
                })
            }
        }
    }
}

impl Blob for ObjectStoreBlob {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, ExternalError>> {
        Box::pin(async move {
            let location = path(key)?;
            let op = async { self.store.get(&location).await?.bytes().await };
            match self.bounded("get", key, false, op).await? {
                Ok(bytes) => Ok(Some(bytes)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(error) => {
                    Err(ExternalError::Determinate(format!("{} blob get of {key:?}: {error}", self.kind)))
                }
            }
        })
    }

    fn set<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), ExternalError>> {
        Box::pin(async move {
            let location = path(key)?;
            let op = self.store.put(&location, PutPayload::from_bytes(value));
            match self.bounded("set", key, true, op).await? {
                Ok(_) => Ok(()),
                Err(error) => {
                    Err(ExternalError::Indeterminate(format!("{} blob set of {key:?}: {error}", self.kind)))
                }
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ExternalError>> {
        Box::pin(async move {
            let location = path(key)?;
            match self.bounded("delete", key, true, self.store.delete(&location)).await? {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(error) => Err(ExternalError::Indeterminate(format!(
                    "{} blob delete of {key:?}: {error}",
                    self.kind
                ))),
            }
        })
    }

    fn list<'a>(&'a self, dir: &'a str) -> BoxFuture<'a, Result<Vec<BlobMeta>, ExternalError>> {
        Box::pin(async move {
            let prefix = if dir.is_empty() { None } else { Some(path(dir)?) };
            let op = self.store.list(prefix.as_ref()).try_collect::<Vec<_>>();
            match self.bounded("list", dir, false, op).await? {
                Ok(metas) => Ok(metas
                    .into_iter()
                    .map(|meta| BlobMeta {
                        key: meta.location.to_string(),
                        size_bytes: meta.size,
                        last_modified_ms: u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0),
                    })
                    .collect()),
                Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
                Err(error) => {
                    Err(ExternalError::Determinate(format!("{} blob list of {dir:?}: {error}", self.kind)))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_urls_parse_into_typed_configs() {
        let config: BlobConfig = "file:///var/data/blob".parse().unwrap();
        assert_eq!(config.kind, BlobKind::File { root: PathBuf::from("/var/data/blob") });
        assert_eq!(config.timeout, Duration::from_secs(30));
        let config: BlobConfig = "mem://shared?timeout_ms=50".parse().unwrap();
        assert_eq!(config.kind, BlobKind::Memory { name: Some("shared".into()) });
        assert_eq!(config.timeout, Duration::from_millis(50));
        assert_eq!("mem://".parse::<BlobConfig>().unwrap().kind, BlobKind::Memory { name: None });
        let s3: Result<BlobConfig, _> =
            "s3://bucket/some/prefix/?endpoint=http://127.0.0.1:9000&access_key_id=k&secret_access_key=s"
                .parse();
        if cfg!(feature = "s3") {
            let BlobKind::S3(s3) = s3.unwrap().kind else { panic!("not s3") };
            assert_eq!(s3.bucket, "bucket");
            assert_eq!(s3.prefix, "some/prefix");
            assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
            assert_eq!(s3.region, "us-east-1");
            assert!(!format!("{s3:?}").contains("\"s\""), "the secret is redacted");
        } else {
            assert!(matches!(s3, Err(UrlError::FeatureDisabled { feature: "s3", .. })));
        }
    }

    #[test]
    fn bad_blob_urls_are_refused_with_the_reason() {
        let cases = [
            ("ftp://x", "unknown blob scheme"),
            ("file://", "needs a directory"),
            ("file:///x?fsync=false", "unknown parameter \"fsync\""),
            ("mem://?timeout_ms=soon", "timeout_ms is not a number"),
            ("/var/data", "not a URL"),
        ];
        for (url, expected) in cases {
            let error = url.parse::<BlobConfig>().unwrap_err().to_string();
            assert!(error.contains(expected), "{url}: {error}");
        }
    }
}
