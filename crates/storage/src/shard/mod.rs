//! Shards: storage collections kept on a [`Blob`](crate::blob::Blob) store and a
//! [`Consensus`](crate::consensus::Consensus) database (DESIGN §9), read and written directly by any process
//! that reaches both.
//!
//! **What this is.** Each collection is a shard: a small versioned state in consensus under
//! `shard/<id>` ([`state::ShardState`]: since, upper, read policy, batches with their blob parts, readers,
//! writers) and immutable batch parts in blob under `<id>/` ([`part`]: sorted, consolidated, checksummed).
//! The state changes only by compare-and-set of a version computed by a pure function of the previous one
//! ([`state`]), retried by [`machine`] after conflicts and failures. [`ShardCollections`] implements the
//! whole [`StorageCollections`](crate::StorageCollections) contract on top:
//!
//! - **append** writes the batch's parts to blob, then compare-and-sets every named shard's state in one
//!   multi-key transaction iff each upper is still the expected one. It carries an idempotency token: a
//!   retry after an indeterminate failure first checks whether the token is already recorded, so an append
//!   is applied once, never twice, never lost. A writer with no entry at all (its first append to the
//!   shard) was not applied while its lease cannot have expired (less than half of it passed): the retry
//!   goes ahead rather than reporting an unknown outcome. Parts of a failed append are deleted.
//! - **holds**: the process's [`ReadHold`](frontiers::ReadHold)s are counted locally; one registered reader
//!   per shard holds their meet, moved forward at most once per [`ShardConfig::hold_sync_interval`] (each
//!   move is a state version that concurrent appends of other processes would have to retry after; holding a
//!   little longer is always safe). By default it is *leased* (it expires when the process stops
//!   heartbeating); [`ShardConfig::critical_reader`] makes it *critical* (it survives restarts). Every
//!   process also keeps a leased reader that heartbeats the oldest state version it is reading, which garbage
//!   collection respects.
//! - **snapshot** and **listen** stream the parts (one part per batch in memory at a time, see [`read`]);
//!   listens wait on one poller per shard per process, which polls the consensus head and is woken early
//!   by the backend's push channel (PostgreSQL `NOTIFY`) and by commits of this process. Every part read
//!   goes through the process's part cache ([`cache`], bounded by [`ShardConfig::part_cache_bytes`]), so
//!   the readers of one part in a process (listens, snapshots, compaction) fetch it once (a snapshot
//!   larger than a quarter of the cache reads through it, keeping nothing, so that it evicts nothing).
//! - **compaction and GC** ([`maintenance`]) run in the background of every process: merge batches,
//!   delete retired parts no reader can reach, truncate old consensus versions, expire leases, and sweep
//!   parts that failed appends left behind.
//!
//! **Invariants.** An upper never regresses, also across processes and restarts (a head version that goes
//! back is reported as damage); a since never regresses; every acknowledged append is in the state; a
//! batch part is deleted only once no state version from the oldest held one on references it; damaged or
//! missing data fails reads with a typed error naming the collection and the key.
//!
//! **What this is not.** Not the storage server: nothing here listens on a socket.
//!
//! **Tests.** Unit tests in each module; `tests/it/`: the `StorageCollections` behaviours on every backend
//! (`shards.rs`), the model test (`shard_model.rs`), the conformance suites (`blob.rs`, `consensus.rs`),
//! the faults (`faults.rs`) and the part cache (`part_cache.rs`).

pub mod cache;
pub mod collections;
mod listen;
pub mod machine;
pub mod maintenance;
pub mod metered;
pub mod part;
pub mod read;
pub mod state;

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use frontiers::ReadPolicy;
use protocol::GlobalId;

pub use cache::PartCacheStats;
pub use collections::{ShardCollections, ShardOpenError, ShardStats};
pub use listen::{ShardListen, ShardWatch};

use crate::metrics::StorageMetrics;
use crate::shard::state::ShardState;

/// The consensus key of a shard.
pub fn consensus_key(id: GlobalId) -> String {
    format!("shard/{id}")
}

/// The collection of a consensus key, if it is a shard's.
pub fn id_of_key(key: &str) -> Option<GlobalId> {
    key.strip_prefix("shard/")?.parse().ok()
}

/// The blob directory of a shard's parts.
pub fn blob_dir(id: GlobalId) -> String {
    id.to_string()
}

/// The URLs of the embedded stores in `dir` (the default of DESIGN §9): blob files under `dir/blob` and the
/// SQLite consensus file `dir/consensus.db`, which every process on the machine can open.
///
/// ```
/// let (blob, consensus) = storage::embedded_urls(std::path::Path::new("/data"));
/// assert_eq!((blob.as_str(), consensus.as_str()), ("file:///data/blob", "sqlite:///data/consensus.db"));
/// ```
pub fn embedded_urls(dir: &std::path::Path) -> (String, String) {
    let blob = format!("file://{}", dir.join("blob").display());
    let consensus = format!("sqlite://{}", dir.join("consensus.db").display());
    (blob, consensus)
}

/// How a process uses the shard engine.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// `Some(name)`: this process's holds are a critical reader `critical-<name>` that survives restarts
    /// (the controller); `None`: a leased reader that expires (everyone else). Default `None`.
    pub critical_reader: Option<String>,
    /// How long a leased reader lives without a heartbeat; heartbeats go every quarter of it. Default 60 s.
    pub reader_lease: Duration,
    /// How long a writer's idempotency entry lives without appends. Default 10 min.
    pub writer_lease: Duration,
    /// How long an operation retries failures of the engines before it gives up. Default 30 s.
    pub retry_budget: Duration,
    /// How long a snapshot waits for its `as_of` to become complete. Default 30 s.
    pub snapshot_timeout: Duration,
    /// How often a listen polls the consensus head when nothing pushed a change. Default 100 ms.
    pub poll_interval: Duration,
    /// The least time between two moves of this process's hold reader of one shard as its holds advance
    /// (every move writes a state version, which every other writer of the shard then has to wait for and
    /// retry after); a hold that needs the reader moved back still moves it at once. Default 1 s.
    pub hold_sync_interval: Duration,
    /// The target size of a batch part. Default 1 MiB.
    pub part_target_bytes: usize,
    /// An append whose run of a shard encodes to at most this many bytes is carried *inline* in the
    /// shard's state instead of being written to the blob store first: one compare-and-set instead of a
    /// blob put (with its fsyncs or round trip) and then a compare-and-set. `0` turns inline parts off.
    /// Default 4 KiB; at most [`MAX_INLINE_BYTES_LIMIT`].
    pub inline_part_bytes: usize,
    /// The most inline bytes a shard's state carries: an append that would take it past this goes to the
    /// blob store, and compaction moves inline parts into blob parts as it merges. (Writers racing on one
    /// shard may each add one inline part past it.) Default 64 KiB; at most [`MAX_INLINE_BYTES_LIMIT`].
    pub max_inline_bytes: usize,
    /// The most bytes of parts the process keeps in memory ([`cache`]), shared by all its readers of a
    /// part (listens, snapshots, compaction); `0` turns the cache off (every read fetches). Otherwise at
    /// least `part_target_bytes`. A snapshot of more than a quarter of it reads through it without keeping
    /// its parts ([`read::SCAN_CACHE_FRACTION`]). Default [`DEFAULT_PART_CACHE_BYTES`].
    pub part_cache_bytes: usize,
    /// A listen's events carry about this many row bytes at most. Default 1 MiB.
    pub listen_chunk_bytes: usize,
    /// The read policy of new collections. Default [`crate::core::default_read_policy`].
    pub default_read_policy: ReadPolicy<u64>,
    /// Whether this process runs compaction and garbage collection in the background. Default true.
    pub background_maintenance: bool,
    /// How often background maintenance visits each shard this process uses. Default 1 s.
    pub maintenance_interval: Duration,
    /// Compaction merges batches once a shard has more than this many. Default 4.
    pub max_batches: usize,
    /// Parts in a shard's blob directory that no state references are deleted once they are this old
    /// (parts of failed or crashed appends; younger ones may belong to an append in flight). Default 10 min.
    pub leaked_part_grace: Duration,
    /// How often maintenance lists a shard's blob directory for such parts. Default 5 min.
    pub sweep_interval: Duration,
    /// Where the engine's metrics go (the process's registry: [`StorageMetrics::register`]). Default
    /// `None`: a set of its own that no registry exports.
    pub metrics: Option<StorageMetrics>,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            critical_reader: None,
            reader_lease: Duration::from_secs(60),
            writer_lease: Duration::from_secs(600),
            retry_budget: Duration::from_secs(30),
            snapshot_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
            hold_sync_interval: Duration::from_secs(1),
            part_target_bytes: 1 << 20,
            inline_part_bytes: 4 << 10,
            max_inline_bytes: 64 << 10,
            part_cache_bytes: DEFAULT_PART_CACHE_BYTES,
            listen_chunk_bytes: 1 << 20,
            default_read_policy: crate::core::default_read_policy(),
            background_maintenance: true,
            maintenance_interval: Duration::from_secs(1),
            max_batches: 4,
            leaked_part_grace: Duration::from_secs(600),
            sweep_interval: Duration::from_secs(300),
            metrics: None,
        }
    }
}

/// The largest [`ShardConfig::max_inline_bytes`] (and [`ShardConfig::inline_part_bytes`]) the engine
/// accepts: every state version is written whole, so inline data is rewritten by every change.
pub const MAX_INLINE_BYTES_LIMIT: usize = 1 << 20;

/// The default bound of the part cache: 64 MiB (64 parts of the default target size).
pub const DEFAULT_PART_CACHE_BYTES: usize = 64 << 20;

impl ShardConfig {
    /// Refuses settings the engine cannot honour; the error says which and why.
    pub fn validate(&self) -> Result<(), String> {
        if self.part_target_bytes == 0 {
            return Err("part_target_bytes must be at least 1".into());
        }
        if self.max_inline_bytes > MAX_INLINE_BYTES_LIMIT {
            return Err(format!(
                "max_inline_bytes {} is above {MAX_INLINE_BYTES_LIMIT}: every state version carries them",
                self.max_inline_bytes
            ));
        }
        if self.inline_part_bytes > self.max_inline_bytes {
            return Err(format!(
                "inline_part_bytes {} is above max_inline_bytes {}: no such part could be inline",
                self.inline_part_bytes, self.max_inline_bytes
            ));
        }
        if self.part_cache_bytes != 0 && self.part_cache_bytes < self.part_target_bytes {
            return Err(format!(
                "part_cache_bytes {} is below part_target_bytes {}: the cache could not keep a part \
                 (0 turns it off)",
                self.part_cache_bytes, self.part_target_bytes
            ));
        }
        Ok(())
    }
}

const STATE_MAGIC: &[u8; 4] = b"SHS1";

/// The most bytes a decoded state may claim (a corrupt length is refused, not allocated).
const MAX_STATE_BYTES: u64 = 64 << 20;

/// bincode with variable-length integers (states are rewritten by every change: small matters).
fn state_codec() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_varint_encoding().with_limit(MAX_STATE_BYTES)
}

/// Encodes a state for consensus: `SHS1`, the CRC-32 of the payload, the payload (bincode, varints).
pub fn encode_state(state: &ShardState) -> Bytes {
    use bincode::Options;
    let payload = state_codec().serialize(state).expect("a shard state always serializes");
    let mut out = BytesMut::with_capacity(8 + payload.len());
    out.put_slice(STATE_MAGIC);
    out.put_u32_le(crc32fast::hash(&payload));
    out.put_slice(&payload);
    out.freeze()
}

/// Decodes and checks the state stored at version `seqno` of `id`'s key; the error says what is wrong.
pub fn decode_state(id: GlobalId, seqno: u64, bytes: &[u8]) -> Result<ShardState, String> {
    let what =
        |detail: &str| format!("state version {seqno} of consensus key {}: {detail}", consensus_key(id));
    if bytes.len() < 8 || &bytes[..4] != STATE_MAGIC {
        return Err(what("not a shard state (bad header)"));
    }
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("four bytes"));
    if crc != crc32fast::hash(&bytes[8..]) {
        return Err(what("checksum mismatch"));
    }
    let state: ShardState = bincode::Options::deserialize(state_codec(), &bytes[8..])
        .map_err(|e| what(&format!("undecodable: {e}")))?;
    if state.id != id || state.seqno != seqno {
        return Err(what(&format!("it claims to be version {} of {}", state.seqno, state.id)));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{ColumnType, RelationDesc, ScalarType};

    #[test]
    fn keys_name_the_collection() {
        let id = GlobalId::User(7);
        assert_eq!(consensus_key(id), "shard/u7");
        assert_eq!(id_of_key("shard/u7"), Some(id));
        assert_eq!(id_of_key("other/u7"), None);
        assert_eq!(blob_dir(GlobalId::System(3)), "s3");
    }

    #[test]
    fn states_round_trip_and_damage_is_named() {
        let desc = RelationDesc::new([("x", ColumnType::new(ScalarType::Int64, false))]);
        let id = GlobalId::User(1);
        let state = ShardState::create(id, desc, ReadPolicy::NoPolicy);
        let bytes = encode_state(&state);
        assert_eq!(decode_state(id, 0, &bytes).unwrap(), state);
        for byte in 0..bytes.len() {
            let mut damaged = bytes.to_vec();
            damaged[byte] ^= 0x10;
            let error = decode_state(id, 0, &damaged).unwrap_err();
            assert!(error.contains("state version 0 of consensus key shard/u1"), "{error}");
        }
        assert!(decode_state(id, 1, &bytes).unwrap_err().contains("claims to be version 0"));
        assert!(decode_state(GlobalId::User(2), 0, &bytes).is_err());
    }
}
