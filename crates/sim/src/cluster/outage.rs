//! The cluster scenario's storage outages (`--outages N`, `--outage-secs S`): the throwaway PostgreSQL
//! server and `moto_server` of `--services local` ([`LocalServices`]), which the scenario can take down
//! and bring back while every process keeps running on them.
//!
//! **What an outage is.** [`OutageKind::Consensus`]: the PostgreSQL server is stopped (`pg_ctl stop -m
//! fast`: every connection is closed, a `COMMIT` in flight may or may not have happened) and, after the
//! outage's length, started again on the same port and data directory. [`OutageKind::Blob`]: `moto_server`
//! is paused (SIGSTOP: connections stay open and every S3 request hangs) and then resumed (SIGCONT).
//! Outages alternate, consensus first. What the scenario does around one (a replica killed while its view
//! append is stuck, the checks that appends and listens resume) is in `tasks.rs`.
//!
//! **Where it cannot be done** ([`unsupported`]): the embedded default is a SQLite file and a blob
//! directory that every process opens in-process: there is no server to stop, and an "outage" would be the
//! file system failing (storage's `tests/it/faults.rs` fills a disk instead); `--blob`/`--consensus` URLs
//! name servers the scenario did not start and must not stop. `--outages` with either is refused with that reason;
//! nothing is faked.
//!
//! **Invariant.** Every outage ends: both services are brought back before the outage's task returns, and
//! dropping [`LocalServices`] kills them whatever their state (a paused `moto_server` included).
//! **Tests:** `tests/it/cluster.rs` runs the scenario with a consensus outage; `storage`'s
//! `tests/it/faults.rs` covers both kinds under one writer and one listener.

use std::sync::Mutex;

use anyhow::{Context, anyhow};
use serde::Serialize;

use storage::services::{Moto, Postgres, PostgresOptions, ServiceHost};

use crate::cluster::StorageMode;

/// Which store an outage takes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutageKind {
    /// The consensus store: PostgreSQL stopped and started again.
    Consensus,
    /// The blob store: `moto_server` paused and resumed.
    Blob,
}

impl OutageKind {
    /// The `index`-th outage of a run: consensus first, then alternating.
    pub fn nth(index: usize) -> OutageKind {
        if index.is_multiple_of(2) { OutageKind::Consensus } else { OutageKind::Blob }
    }

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            OutageKind::Consensus => "consensus",
            OutageKind::Blob => "blob",
        }
    }

    /// What is done to the service.
    pub fn action(self) -> &'static str {
        match self {
            OutageKind::Consensus => "PostgreSQL stopped (pg_ctl stop -m fast) and started again",
            OutageKind::Blob => "moto_server paused (SIGSTOP) and resumed (SIGCONT)",
        }
    }
}

/// Why storage outages cannot be injected into `storage`, or `None` if they can (`--services local`).
pub fn unsupported(storage: &StorageMode) -> Option<&'static str> {
    match storage {
        StorageMode::LocalServices => None,
        StorageMode::Embedded => Some(
            "the embedded stores are a SQLite file and a blob directory opened in-process by every process: \
             there is no server to stop (use --services local)",
        ),
        StorageMode::Urls { .. } => Some(
            "the stores at --blob/--consensus were not started by the scenario, which will not stop them \
             (use --services local)",
        ),
    }
}

/// What the report says about outages when none could be injected.
pub fn not_injected(storage: &StorageMode) -> String {
    match unsupported(storage) {
        Some(why) => format!("not injected: {why}"),
        None => "none asked for (--outages 0)".to_string(),
    }
}

/// The throwaway PostgreSQL server (TLS only, a client certificate required) and `moto_server` of
/// `--services local`, with a database and a bucket for the run; each stops when dropped. Shared with the
/// scenario's tasks, which take them down and bring them back.
#[derive(Debug)]
pub struct LocalServices {
    postgres: Mutex<Postgres>,
    moto: Mutex<Moto>,
    /// The `--blob` URL of the run's bucket.
    pub blob: String,
    /// The `--consensus` URL of the run's database.
    pub consensus: String,
}

impl LocalServices {
    /// Starts both (blocking: `initdb`, and the first time a Python venv for moto) with a database and
    /// a bucket for the run, on `host` (`None`: loopback; `--netns`: the services' namespace).
    pub fn start(host: Option<ServiceHost>, say: &dyn Fn(&str)) -> anyhow::Result<LocalServices> {
        let host = host.unwrap_or_else(ServiceHost::loopback);
        say(&format!(
            "starting a throwaway PostgreSQL server and moto_server (S3) on {}{}",
            host.address,
            host.netns.as_ref().map_or(String::new(), |ns| format!(" in the network namespace {ns}"))
        ));
        // TLS only, both ways: every process's consensus connections check the server's certificate,
        // and the server admits only a client presenting a certificate from the run's CA.
        let options = PostgresOptions { tls: true, client_certificates: true, ..PostgresOptions::default() };
        let postgres = Postgres::start_on(options, host.clone()).context("cannot start PostgreSQL")?;
        let ca = postgres.ca_file().context("a TLS server has a CA file")?;
        let (cert, key) = postgres.client_certificate().context("a TLS server has a client certificate")?;
        postgres.create_database("cluster").context("cannot create the consensus database")?;
        let moto = Moto::start_on(host).context("cannot start moto_server")?;
        moto.create_bucket("cluster").context("cannot create the blob bucket")?;
        let blob = moto.blob_url("cluster", "shards");
        let consensus = format!(
            "{}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            postgres.url("cluster"),
            ca.display(),
            cert.display(),
            key.display()
        );
        Ok(LocalServices { postgres: Mutex::new(postgres), moto: Mutex::new(moto), blob, consensus })
    }

    /// Takes the store of `kind` away (blocking: `pg_ctl stop -w` waits for the server to go).
    pub fn take_down(&self, kind: OutageKind) -> anyhow::Result<()> {
        match kind {
            OutageKind::Consensus => lock(&self.postgres)?.stop().context("cannot stop PostgreSQL"),
            OutageKind::Blob => lock(&self.moto)?.pause().context("cannot pause moto_server"),
        }
    }

    /// Brings the store of `kind` back (blocking: `pg_ctl start -w` waits until it accepts connections).
    pub fn bring_back(&self, kind: OutageKind) -> anyhow::Result<()> {
        match kind {
            OutageKind::Consensus => {
                lock(&self.postgres)?.start_again().context("cannot start PostgreSQL again")
            }
            OutageKind::Blob => lock(&self.moto)?.resume().context("cannot resume moto_server"),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> anyhow::Result<std::sync::MutexGuard<'_, T>> {
    mutex.lock().map_err(|_| anyhow!("a task panicked while controlling a service"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_alternate_consensus_first_and_only_local_services_take_them() {
        let kinds: Vec<OutageKind> = (0..3).map(OutageKind::nth).collect();
        assert_eq!(kinds, [OutageKind::Consensus, OutageKind::Blob, OutageKind::Consensus]);
        assert_eq!(unsupported(&StorageMode::LocalServices), None);
        for mode in [
            StorageMode::Embedded,
            StorageMode::Urls { blob: "file:///b".into(), consensus: "sqlite:///c".into() },
        ] {
            let why = unsupported(&mode).expect("refused");
            assert!(why.contains("--services local"), "{mode:?}: {why}");
            assert!(not_injected(&mode).starts_with("not injected: "));
        }
    }
}
