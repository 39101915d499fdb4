//! [`TableWriter`]: a service's `INSERT` on top of any [`StorageCollections`], and the [`Clock`] it reads.
//!
//! **What this is.** Tables are storage collections that one writer owns. A write lands at the next
//! timestamp, `max(clock now, the tables' upper)`, and advances *every* registered table to just past it in
//! the same atomic append, so all tables share one upper and a reader can join them at any complete time.
//! [`TableWriter::tick`] advances all uppers to the clock's `now` with empty appends; a ticker task
//! ([`TableWriter::spawn_ticker`]) calls it every [`TableWriterConfig::tick`] (1 s by default), so tables that
//! nobody writes still become readable as time passes.
//!
//! **What this is not.** Not a transaction manager: one `TableWriter` per set of tables. If something else
//! appends to a table, the writer's compare-and-append fails; it re-reads the uppers and retries a few
//! times, then reports [`TableWriteError::Append`].
//!
//! **Invariants.** Timestamps handed out are strictly increasing, whatever the clock does (a clock that goes
//! backwards only delays the next timestamps). After a successful write or tick every registered table's
//! upper is the same.
//!
//! **Tests.** `tests/it/table_writer.rs`, with a [`ManualClock`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use frontiers::Antichain;
use protocol::{Diff, GlobalId, Row};

use crate::api::{AppendRequest, StorageCollections};
use crate::error::{AppendError, ReadError};

/// Where timestamps come from.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time in milliseconds (since the Unix epoch, for the system clock).
    fn now_ms(&self) -> u64;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    // Table timestamps are wall-clock milliseconds by definition; simulated code uses a `ManualClock`.
    #[allow(clippy::disallowed_methods)]
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to; clones share the time.
#[derive(Debug, Default, Clone)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        ManualClock { now: Arc::new(AtomicU64::new(now_ms)) }
    }

    /// Sets the time.
    pub fn set(&self, now_ms: u64) {
        self.now.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the time forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// Configuration of a [`TableWriter`].
#[derive(Debug, Clone)]
pub struct TableWriterConfig {
    /// How often the ticker advances the tables' uppers. Default 1 s.
    pub tick: Duration,
    /// How many times a write retries after another writer moved an upper. Default 3.
    pub retries: usize,
}

impl Default for TableWriterConfig {
    fn default() -> Self {
        TableWriterConfig { tick: Duration::from_secs(1), retries: 3 }
    }
}

/// Why a table write failed; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableWriteError {
    /// The table is not registered with this writer.
    #[error("table {0} is not registered with this writer")]
    NotRegistered(GlobalId),
    /// The append failed (after retries, for upper mismatches).
    #[error(transparent)]
    Append(#[from] AppendError),
    /// Reading a table's frontiers failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The table is closed (its upper is empty): nothing can be written to it.
    #[error("table {0} is closed")]
    Closed(GlobalId),
}

/// See the module documentation.
pub struct TableWriter {
    storage: Arc<dyn StorageCollections>,
    clock: Arc<dyn Clock>,
    config: TableWriterConfig,
    /// Registered tables and their uppers as last written.
    tables: tokio::sync::Mutex<BTreeMap<GlobalId, u64>>,
}

impl fmt::Debug for TableWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableWriter")
            .field("clock", &self.clock)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TableWriter {
    /// A writer with no tables.
    pub fn new(
        storage: Arc<dyn StorageCollections>,
        clock: Arc<dyn Clock>,
        config: TableWriterConfig,
    ) -> Self {
        TableWriter { storage, clock, config, tables: tokio::sync::Mutex::new(BTreeMap::new()) }
    }

    /// Starts writing `id` (an existing collection). Its upper joins the others at the next write or tick.
    pub async fn register(&self, id: GlobalId) -> Result<(), TableWriteError> {
        let upper = self.read_upper(id).await?;
        self.tables.lock().await.insert(id, upper);
        Ok(())
    }

    /// Stops writing `id`.
    pub async fn deregister(&self, id: GlobalId) {
        self.tables.lock().await.remove(&id);
    }

    /// The shared upper: every registered table is complete before it (after a write or tick).
    pub async fn upper(&self) -> u64 {
        self.tables.lock().await.values().copied().max().unwrap_or(0)
    }

    /// Inserts `rows` into `id` (each once); returns the timestamp they were written at.
    pub async fn insert(&self, id: GlobalId, rows: Vec<Row>) -> Result<u64, TableWriteError> {
        self.write(vec![(id, rows.into_iter().map(|row| (row, 1)).collect())]).await
    }

    /// Writes `updates` (per table) atomically at the next timestamp and advances every registered table
    /// past it; returns the timestamp.
    pub async fn write(&self, updates: Vec<(GlobalId, Vec<(Row, Diff)>)>) -> Result<u64, TableWriteError> {
        let mut tables = self.tables.lock().await;
        for (id, _) in &updates {
            if !tables.contains_key(id) {
                return Err(TableWriteError::NotRegistered(*id));
            }
        }
        let mut by_table: BTreeMap<GlobalId, Vec<(Row, Diff)>> = BTreeMap::new();
        for (id, rows) in updates {
            by_table.entry(id).or_default().extend(rows);
        }
        let mut attempt = 0;
        loop {
            let shared = tables.values().copied().max().unwrap_or(0);
            let ts = self.clock.now_ms().max(shared);
            let new_upper = ts.checked_add(1).ok_or(AppendError::TimeOutOfRange {
                id: *tables.keys().next().expect("a write names a registered table"),
                time: ts,
                lower: Antichain::from_elem(shared),
                upper: Antichain::new(),
            })?;
            let requests: Vec<AppendRequest> = tables
                .iter()
                .map(|(id, upper)| AppendRequest {
                    id: *id,
                    updates: by_table
                        .get(id)
                        .map(|rows| rows.iter().map(|(r, d)| (r.clone(), ts, *d)).collect())
                        .unwrap_or_default(),
                    expected_upper: Antichain::from_elem(*upper),
                    new_upper: Antichain::from_elem(new_upper),
                })
                .collect();
            match self.storage.append(requests).await {
                Ok(()) => {
                    for upper in tables.values_mut() {
                        *upper = new_upper;
                    }
                    return Ok(ts);
                }
                Err(AppendError::UpperMismatch { id, current, .. }) if attempt < self.config.retries => {
                    attempt += 1;
                    let Some(current) = current.as_option() else {
                        return Err(TableWriteError::Closed(id));
                    };
                    tracing::debug!(%id, current, attempt, "table upper moved under the writer; retrying");
                    tables.insert(id, *current);
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Advances every registered table's upper to the clock's now (if it is ahead); returns the shared
    /// upper.
    pub async fn tick(&self) -> Result<u64, TableWriteError> {
        let mut tables = self.tables.lock().await;
        let mut attempt = 0;
        loop {
            let target = self.clock.now_ms().max(tables.values().copied().max().unwrap_or(0));
            let requests: Vec<AppendRequest> = tables
                .iter()
                .filter(|(_, upper)| **upper < target)
                .map(|(id, upper)| AppendRequest {
                    id: *id,
                    updates: Vec::new(),
                    expected_upper: Antichain::from_elem(*upper),
                    new_upper: Antichain::from_elem(target),
                })
                .collect();
            if requests.is_empty() {
                return Ok(target);
            }
            match self.storage.append(requests).await {
                Ok(()) => {
                    for upper in tables.values_mut() {
                        *upper = target;
                    }
                    return Ok(target);
                }
                Err(AppendError::UpperMismatch { id, current, .. }) if attempt < self.config.retries => {
                    attempt += 1;
                    let Some(current) = current.as_option() else {
                        return Err(TableWriteError::Closed(id));
                    };
                    tables.insert(id, *current);
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Spawns a task that calls [`tick`](Self::tick) every [`TableWriterConfig::tick`] until the writer is
    /// dropped (or the task aborted). Failures are logged and retried at the next tick.
    pub fn spawn_ticker(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let writer: Weak<TableWriter> = Arc::downgrade(self);
        let period = self.config.tick;
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(writer) = writer.upgrade() else {
                    return;
                };
                if let Err(error) = writer.tick().await {
                    tracing::warn!(%error, "table tick failed");
                }
            }
        })
    }

    async fn read_upper(&self, id: GlobalId) -> Result<u64, TableWriteError> {
        let frontiers = self.storage.frontiers(id).await?;
        frontiers.upper.as_option().copied().ok_or(TableWriteError::Closed(id))
    }
}
