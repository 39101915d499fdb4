//! Durability: a data directory holding a write-ahead log of every operation and periodic compacted
//! checkpoints, and the recovery that rebuilds a [`Store`] from them.
//!
//! **Layout.** `wal-<seq>.log` segments of framed records ([`wal`]), and `checkpoint-<seq>.bin` files. A
//! checkpoint with sequence number `n` holds the state after every record in segments before `n`; recovery
//! loads the newest checkpoint and replays the segments from `n` on. Checkpoints are written to a `.tmp`
//! file, fsynced, renamed and the directory fsynced; only then are older segments and checkpoints deleted,
//! so a crash at any point leaves a recoverable directory. Restart time is therefore bounded by the
//! compacted state plus the log written since the last checkpoint, not by the length of history.
//!
//! **Commit.** [`DataDir::commit`] writes a batch of already-encoded records and fsyncs; the caller
//! acknowledges the batch's operations only after it returns `Ok` (group commit: one fsync for every
//! operation in the batch). If the write or the fsync fails, the segment is truncated back to where the
//! batch began, so the log never holds an unacknowledged batch that recovery would resurrect; if even that
//! fails, the directory is poisoned and every later commit fails until a restart recovers it.
//!
//! **Recovery.** A torn or corrupt tail of the *last* segment (length + crc32 checked per record) is
//! truncated away and logged; records are never half-applied. Damage anywhere else is
//! [`OpenError::Corrupt`]: acknowledged data would be lost by skipping it.
//!
//! **What this is not.** No threads and no async: [`crate::InProcess`] runs a `DataDir` on its committer
//! thread. One process per directory (there is no lock file).
//!
//! **Tests.** `tests/it/durability.rs`: torn tails at every byte offset, injected I/O faults
//! ([`IoFaults`]), and a child process SIGKILLed mid-append at random moments.

pub mod wal;

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bincode::Options;

use crate::core::{Store, StoreCheckpoint};
use wal::LogRecord;

const CHECKPOINT_MAGIC: &[u8; 8] = b"STCKPT01";
const CHECKPOINT_HEADER_BYTES: usize = 8 + 8 + 4;

/// Counters of the log's physical work, for benchmarks and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DurabilityStats {
    /// Successful commits, i.e. fsyncs of the log.
    pub commits: u64,
    /// Bytes committed to the log.
    pub bytes: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
}

/// Injected I/O failures, for tests of the error paths (a test cannot make a directory unwritable when it
/// runs as root). Each counter fails that many of the next operations of its kind; a failed write first
/// writes half of its bytes, like a disk that fills up mid-write.
#[derive(Debug, Clone, Default)]
pub struct IoFaults {
    inner: Arc<FaultCounters>,
}

#[derive(Debug, Default)]
struct FaultCounters {
    writes: AtomicU64,
    syncs: AtomicU64,
    truncates: AtomicU64,
}

impl IoFaults {
    /// No faults yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails the next `n` log writes.
    pub fn fail_writes(&self, n: u64) {
        self.inner.writes.store(n, Ordering::SeqCst);
    }

    /// Fails the next `n` log fsyncs.
    pub fn fail_syncs(&self, n: u64) {
        self.inner.syncs.store(n, Ordering::SeqCst);
    }

    /// Fails the next `n` truncations (the rollback after a failed commit).
    pub fn fail_truncates(&self, n: u64) {
        self.inner.truncates.store(n, Ordering::SeqCst);
    }

    fn take(counter: &AtomicU64) -> bool {
        counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}

/// Why a data directory could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The directory or one of its files could not be read or written.
    #[error("i/o error on {path}: {error}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// A checkpoint or a segment other than the last one is damaged, or a record contradicts the state
    /// it is replayed on. Recovering would lose acknowledged data, so the store refuses to start.
    #[error("corrupt data directory at {path}: {reason}")]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// What recovery found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The checkpoint loaded, if any.
    pub checkpoint: Option<u64>,
    /// Records replayed from the log.
    pub records_replayed: u64,
    /// Bytes cut off the tail of the last segment (a torn or corrupt write), 0 if none.
    pub truncated_bytes: u64,
}

/// A checkpoint to be written; see [`DataDir::begin_checkpoint`].
#[derive(Debug)]
pub struct CheckpointJob {
    dir: PathBuf,
    seq: u64,
}

/// An open data directory. See the module documentation.
#[derive(Debug)]
pub struct DataDir {
    dir: PathBuf,
    segment: File,
    segment_seq: u64,
    segment_len: u64,
    /// Log bytes written since the last checkpoint began.
    log_bytes_since_checkpoint: u64,
    stats: DurabilityStats,
    faults: IoFaults,
    poisoned: Option<String>,
}

fn segment_name(seq: u64) -> String {
    format!("wal-{seq:020}.log")
}

fn checkpoint_name(seq: u64) -> String {
    format!("checkpoint-{seq:020}.bin")
}

fn parse_seq(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok()
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> OpenError + '_ {
    move |error| OpenError::Io { path: path.to_path_buf(), error }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl DataDir {
    /// Opens (creating if needed) the data directory `dir` and recovers the store from it. `notify` is the
    /// recovered store's hold-change callback ([`Store::with_notify`]).
    pub fn open(
        dir: &Path,
        faults: IoFaults,
        notify: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<(DataDir, Store, RecoveryReport), OpenError> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let mut segments = Vec::new();
        let mut checkpoints = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_at(dir))? {
            let entry = entry.map_err(io_at(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                fs::remove_file(entry.path()).map_err(io_at(&entry.path()))?;
            } else if let Some(seq) = parse_seq(&name, "wal-", ".log") {
                segments.push(seq);
            } else if let Some(seq) = parse_seq(&name, "checkpoint-", ".bin") {
                checkpoints.push(seq);
            }
        }
        segments.sort_unstable();
        checkpoints.sort_unstable();
        let mut report = RecoveryReport::default();

        let (mut store, first_seq) = match checkpoints.last() {
            Some(&seq) => {
                let path = dir.join(checkpoint_name(seq));
                let checkpoint = read_checkpoint(&path)?;
                let store = Store::from_checkpoint(checkpoint, notify)
                    .map_err(|e| OpenError::Corrupt { path: path.clone(), reason: e.to_string() })?;
                report.checkpoint = Some(seq);
                (store, seq)
            }
            None => (Store::with_notify(notify), 0),
        };
        // Hold every collection at its logged since while the log replays (the read policies would move
        // the sinces with the replayed uppers) and for the grace period after: see
        // [`Store::hold_for_recovery`].
        store.hold_for_recovery();

        let live: Vec<u64> = segments.iter().copied().filter(|s| *s >= first_seq).collect();
        for (index, &seq) in live.iter().enumerate() {
            let path = dir.join(segment_name(seq));
            let file = File::open(&path).map_err(io_at(&path))?;
            let total_len = file.metadata().map_err(io_at(&path))?.len();
            let mut reader = BufReader::with_capacity(1 << 20, file);
            let mut replay_error = None;
            let (valid_len, problem) = wal::scan_with(&mut reader, total_len, |record| {
                if replay_error.is_none() {
                    report.records_replayed += 1;
                    if let Err(reason) = replay(&mut store, record) {
                        replay_error = Some(reason);
                    }
                }
            })
            .map_err(io_at(&path))?;
            if let Some(reason) = replay_error {
                return Err(OpenError::Corrupt { path, reason });
            }
            if let Some(problem) = problem {
                if index + 1 != live.len() {
                    return Err(OpenError::Corrupt {
                        path,
                        reason: format!(
                            "damaged record at byte {valid_len} ({problem:?}) before the last segment"
                        ),
                    });
                }
                tracing::warn!(
                    path = %path.display(),
                    offset = valid_len,
                    dropped_bytes = total_len - valid_len,
                    ?problem,
                    "truncating the torn tail of the log"
                );
                let file = OpenOptions::new().write(true).open(&path).map_err(io_at(&path))?;
                file.set_len(valid_len).map_err(io_at(&path))?;
                file.sync_all().map_err(io_at(&path))?;
                report.truncated_bytes = total_len - valid_len;
            }
        }
        store.process_holds();

        // Files the newest checkpoint made obsolete (a crash came between writing it and deleting them).
        for &seq in segments.iter().filter(|s| **s < first_seq) {
            let path = dir.join(segment_name(seq));
            fs::remove_file(&path).map_err(io_at(&path))?;
        }
        for &seq in checkpoints.iter().filter(|s| **s < first_seq) {
            let path = dir.join(checkpoint_name(seq));
            fs::remove_file(&path).map_err(io_at(&path))?;
        }

        let segment_seq = live.last().copied().unwrap_or(first_seq);
        let path = dir.join(segment_name(segment_seq));
        let segment = OpenOptions::new().create(true).append(true).open(&path).map_err(io_at(&path))?;
        let segment_len = segment.metadata().map_err(io_at(&path))?.len();
        if live.is_empty() {
            sync_dir(dir).map_err(io_at(dir))?;
        }
        tracing::info!(
            dir = %dir.display(),
            checkpoint = ?report.checkpoint,
            records = report.records_replayed,
            truncated_bytes = report.truncated_bytes,
            "recovered storage"
        );
        let data_dir = DataDir {
            dir: dir.to_path_buf(),
            segment,
            segment_seq,
            segment_len,
            log_bytes_since_checkpoint: segment_len,
            stats: DurabilityStats::default(),
            faults,
            poisoned: None,
        };
        Ok((data_dir, store, report))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The path of the segment commits go to now.
    pub fn active_segment(&self) -> PathBuf {
        self.dir.join(segment_name(self.segment_seq))
    }

    /// Counters of the work done since open.
    pub fn stats(&self) -> DurabilityStats {
        self.stats
    }

    /// Log bytes written since the last checkpoint began: what a restart would replay.
    pub fn log_bytes_since_checkpoint(&self) -> u64 {
        self.log_bytes_since_checkpoint
    }

    /// Writes `bytes` (whole framed records, see [`wal::encode_record`]) to the log and fsyncs. On error
    /// the log is rolled back to where it was, and the error returned; the caller must not acknowledge
    /// the records.
    pub fn commit(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.append(bytes, true)
    }

    /// Writes `bytes` like [`commit`](Self::commit) but without the fsync: they become durable with the
    /// next commit (or are lost in a crash before it). For records that need not be acknowledged, such as
    /// since changes.
    pub fn write_unsynced(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.append(bytes, false)
    }

    fn append(&mut self, bytes: &[u8], sync: bool) -> io::Result<()> {
        if let Some(reason) = &self.poisoned {
            return Err(io::Error::other(format!("the log is unusable until a restart: {reason}")));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let start = self.segment_len;
        match self.write_and_sync(bytes, sync) {
            Ok(()) => {
                self.segment_len += bytes.len() as u64;
                self.log_bytes_since_checkpoint += bytes.len() as u64;
                self.stats.commits += u64::from(sync);
                self.stats.bytes += bytes.len() as u64;
                Ok(())
            }
            Err(error) => {
                tracing::warn!(%error, segment = self.segment_seq, offset = start, "log commit failed; rolling back");
                if let Err(rollback) = self.truncate_to(start) {
                    tracing::error!(%rollback, "cannot roll the log back; refusing further commits");
                    self.poisoned = Some(format!("rollback after `{error}` failed: {rollback}"));
                }
                Err(error)
            }
        }
    }

    fn write_and_sync(&mut self, bytes: &[u8], sync: bool) -> io::Result<()> {
        if IoFaults::take(&self.faults.inner.writes) {
            self.segment.write_all(&bytes[..bytes.len() / 2])?;
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "injected fault: no space left on device",
            ));
        }
        self.segment.write_all(bytes)?;
        if !sync {
            return Ok(());
        }
        if IoFaults::take(&self.faults.inner.syncs) {
            return Err(io::Error::other("injected fault: fsync failed"));
        }
        self.segment.sync_data()
    }

    fn truncate_to(&mut self, len: u64) -> io::Result<()> {
        if IoFaults::take(&self.faults.inner.truncates) {
            return Err(io::Error::other("injected fault: truncate failed"));
        }
        self.segment.set_len(len)?;
        self.segment.sync_all()
    }

    /// Starts a checkpoint: fsyncs and closes the current segment and starts a new one, so that the state
    /// now is exactly the state after every segment before the new one. The caller then takes
    /// [`Store::to_checkpoint`] (before committing anything else) and runs [`CheckpointJob::write`], on
    /// another thread if it likes.
    pub fn begin_checkpoint(&mut self) -> io::Result<CheckpointJob> {
        if let Some(reason) = &self.poisoned {
            return Err(io::Error::other(format!("the log is unusable until a restart: {reason}")));
        }
        self.segment.sync_all()?;
        let seq = self.segment_seq + 1;
        let path = self.dir.join(segment_name(seq));
        let segment = OpenOptions::new().create(true).append(true).open(&path)?;
        sync_dir(&self.dir)?;
        self.segment = segment;
        self.segment_seq = seq;
        self.segment_len = 0;
        self.log_bytes_since_checkpoint = 0;
        self.stats.checkpoints += 1;
        Ok(CheckpointJob { dir: self.dir.clone(), seq })
    }

    /// Fsyncs the log; for shutdown.
    pub fn close(self) -> io::Result<()> {
        self.segment.sync_all()
    }

    /// Fsyncs the log (including records written with [`write_unsynced`](Self::write_unsynced)).
    pub fn sync(&self) -> io::Result<()> {
        self.segment.sync_all()
    }
}

impl CheckpointJob {
    /// Writes `state` as the checkpoint and deletes the files it makes obsolete. Until it returns `Ok`,
    /// the previous checkpoint and every segment stay in place.
    pub fn write(self, state: &StoreCheckpoint) -> io::Result<()> {
        let payload = protocol::frame::bincode_options()
            .serialize(state)
            .map_err(|e| io::Error::other(format!("cannot encode a checkpoint: {e}")))?;
        let tmp = self.dir.join(format!("checkpoint-{:020}.tmp", self.seq));
        {
            let mut file = File::create(&tmp)?;
            let mut header = Vec::with_capacity(CHECKPOINT_HEADER_BYTES);
            header.extend_from_slice(CHECKPOINT_MAGIC);
            header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            header.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            file.write_all(&header)?;
            file.write_all(&payload)?;
            file.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(checkpoint_name(self.seq)))?;
        sync_dir(&self.dir)?;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let obsolete = parse_seq(&name, "wal-", ".log").is_some_and(|s| s < self.seq)
                || parse_seq(&name, "checkpoint-", ".bin").is_some_and(|s| s < self.seq);
            if obsolete {
                fs::remove_file(entry.path())?;
            }
        }
        tracing::debug!(seq = self.seq, bytes = payload.len(), "checkpoint written");
        Ok(())
    }
}

fn read_checkpoint(path: &Path) -> Result<StoreCheckpoint, OpenError> {
    let bytes = fs::read(path).map_err(io_at(path))?;
    let corrupt = |reason: &str| OpenError::Corrupt { path: path.to_path_buf(), reason: reason.to_string() };
    if bytes.len() < CHECKPOINT_HEADER_BYTES || &bytes[..8] != CHECKPOINT_MAGIC {
        return Err(corrupt("not a checkpoint file"));
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().expect("eight bytes"));
    let crc = u32::from_le_bytes(bytes[16..20].try_into().expect("four bytes"));
    let payload = &bytes[CHECKPOINT_HEADER_BYTES..];
    if payload.len() as u64 != len {
        return Err(corrupt("length mismatch"));
    }
    if crc32fast::hash(payload) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    protocol::frame::bincode_options()
        .with_limit(len)
        .deserialize(payload)
        .map_err(|e| corrupt(&format!("undecodable: {e}")))
}

/// Applies one logged record during recovery. A record that does not apply is corruption (every record was
/// validated before it was logged).
fn replay(store: &mut Store, record: LogRecord) -> Result<(), String> {
    match record {
        LogRecord::Create { id, desc } => {
            store.create_collection(id, desc).map_err(|e| format!("replaying a create: {e}"))?;
            store.hold_for_recovery_of(id);
        }
        LogRecord::Drop { id } => store.drop_collection(id).map_err(|e| format!("replaying a drop: {e}"))?,
        LogRecord::Append(requests) => {
            store.append(requests).map_err(|e| format!("replaying an append: {e}"))?;
            store.process_holds();
        }
        LogRecord::Since { id, since } => {
            if since.len() > 1 {
                return Err(format!("malformed since {since:?} for {id}"));
            }
            store.advance_policy_hold(id, &since);
            store.process_holds();
        }
        LogRecord::Policy { id, policy } => {
            store.set_read_policy(id, policy).map_err(|e| format!("replaying a read policy: {e}"))?;
            store.process_holds();
        }
    }
    Ok(())
}
