//! The backends every shard test runs on, and the real services behind them.
//!
//! - `Memory`: `mem://` blob and consensus;
//! - `Embedded`: local files and a SQLite file in a temporary directory (the default of DESIGN §9);
//! - `Remote`: S3 (`moto_server`) and PostgreSQL 15, each started by `storage::services` for this test
//!   process.
//!
//! A service that cannot start fails the test under `CI=true`; elsewhere the test prints why and skips
//! that backend (the message names the missing piece), so a developer without PostgreSQL still runs the
//! rest. Each `Stores` is a fresh namespace (a new database, a new bucket prefix, a new directory).

use std::sync::Arc;

use storage::blob::{Blob, BlobConfig};
use storage::consensus::{Consensus, ConsensusConfig};
use storage::services::{Moto, Postgres, PostgresOptions, ServiceError, services_required};
use storage::{ShardCollections, ShardConfig};

/// A backend pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Embedded,
    Remote,
}

pub const ALL: [Backend; 3] = [Backend::Memory, Backend::Embedded, Backend::Remote];

/// `Ok(service)`, or (outside CI) `None` after saying why the backend is skipped; under CI a failure.
pub fn require<T>(what: &str, result: Result<T, ServiceError>) -> Option<T> {
    match result {
        Ok(service) => Some(service),
        Err(error) if services_required() => panic!("CI=true and {what} cannot start: {error}"),
        Err(error) => {
            // Tests may print: this is how a developer learns that a backend was not exercised.
            #[allow(clippy::print_stderr)]
            {
                eprintln!("SKIPPED the {what} backend: {error}");
            }
            None
        }
    }
}

/// The running services of one test.
#[derive(Debug)]
pub struct Services {
    pub postgres: Postgres,
    pub moto: Moto,
    next: std::sync::atomic::AtomicU64,
}

impl Services {
    /// Starts PostgreSQL and moto (or skips, see [`require`]).
    pub fn start() -> Option<Services> {
        let postgres = require("PostgreSQL", Postgres::start(PostgresOptions::default()))?;
        let moto = require("S3 (moto_server)", Moto::start())?;
        if let Err(error) = moto.create_bucket("shards") {
            require::<()>("S3 (moto_server)", Err(error))?;
        }
        Some(Services { postgres, moto, next: std::sync::atomic::AtomicU64::new(0) })
    }

    /// A fresh database and bucket prefix.
    pub fn fresh(&self) -> (String, String) {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let db = format!("t{n}");
        self.postgres.create_database(&db).expect("create database");
        (self.moto.blob_url("shards", &format!("t{n}")), self.postgres.url(&db))
    }
}

/// A namespace of stores on one backend: URLs that several `ShardCollections` (or processes) can open.
#[derive(Debug)]
pub struct Stores {
    pub backend: Backend,
    pub blob_url: String,
    pub consensus_url: String,
    _dir: Option<tempfile::TempDir>,
    _services: Option<Arc<Services>>,
}

impl Stores {
    /// A fresh namespace on `backend`; `None` if its services are unavailable outside CI. `services` is
    /// started on first use of the remote backend and shared.
    pub fn new(backend: Backend, services: &mut Option<Option<Arc<Services>>>) -> Option<Stores> {
        match backend {
            Backend::Memory => {
                let name = format!("{:x}", storage::external::random_id());
                Some(Stores {
                    backend,
                    blob_url: format!("mem://{name}"),
                    consensus_url: format!("mem://{name}"),
                    _dir: None,
                    _services: None,
                })
            }
            Backend::Embedded => {
                let dir = tempfile::tempdir().unwrap();
                let (blob_url, consensus_url) = storage::embedded_urls(dir.path());
                Some(Stores { backend, blob_url, consensus_url, _dir: Some(dir), _services: None })
            }
            Backend::Remote => {
                let services = services.get_or_insert_with(|| Services::start().map(Arc::new)).clone()?;
                let (blob_url, consensus_url) = services.fresh();
                Some(Stores { backend, blob_url, consensus_url, _dir: None, _services: Some(services) })
            }
        }
    }

    pub fn blob_config(&self) -> BlobConfig {
        self.blob_url.parse().unwrap()
    }

    pub fn consensus_config(&self) -> ConsensusConfig {
        self.consensus_url.parse().unwrap()
    }

    pub async fn blob(&self) -> Arc<dyn Blob> {
        self.blob_config().open().unwrap()
    }

    pub async fn consensus(&self) -> Arc<dyn Consensus> {
        self.consensus_config().open().await.unwrap()
    }

    /// A process's engine on these stores.
    pub async fn open(&self, config: ShardConfig) -> ShardCollections {
        ShardCollections::open(&self.blob_config(), &self.consensus_config(), config).await.unwrap()
    }
}

/// Runs `scenario` once per backend, each on fresh stores.
pub async fn on_every_backend<F>(mut scenario: impl FnMut(Stores) -> F)
where
    F: std::future::Future<Output = ()>,
{
    let mut services = None;
    for backend in ALL {
        if let Some(stores) = Stores::new(backend, &mut services) {
            tracing::info!(?backend, "scenario");
            scenario(stores).await;
        }
    }
}

/// The shard configuration the behaviour tests use: quick polls and short waits, and every part in the
/// blob store (their small appends would otherwise ride inline in the state and never reach the blob
/// faults and damage they test); [`inline_config`] is the engine's default in that respect.
pub fn quick_config() -> ShardConfig {
    ShardConfig { inline_part_bytes: 0, ..inline_config() }
}

/// [`quick_config`] with small appends inline in the state (the engine's default).
pub fn inline_config() -> ShardConfig {
    ShardConfig {
        snapshot_timeout: std::time::Duration::from_millis(200),
        poll_interval: std::time::Duration::from_millis(20),
        hold_sync_interval: std::time::Duration::from_millis(20),
        maintenance_interval: std::time::Duration::from_millis(50),
        ..ShardConfig::default()
    }
}
