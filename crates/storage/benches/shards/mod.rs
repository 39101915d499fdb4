//! The shard engine's benchmarks (DESIGN §6 "Storage on shards"), each against a baseline measured in the
//! same run, on the embedded default (local files + SQLite, in a temporary directory) and on S3 + PostgreSQL
//! (a `moto_server` and a PostgreSQL 15 with fsync on, started by `storage::services`; skipped with a note
//! if they cannot start):
//!
//! - `storage.shard_append_{embedded,remote}_w{1,8,64}`: rows/s of appends of 10 rows of 100 bytes by 1, 8
//!   and 64 concurrent writers (one shard each), with p50/p99 latency; baseline: the floor of the same
//!   engines at the same concurrency, one raw blob put of a part of the same size plus one raw consensus
//!   compare-and-set of a state of the same size per append. Goal ratio >= 0.7.
//! - `storage.shard_listen_*`: append-to-delivery p50/p99 of a listener on another process's appends
//!   (in the same process: in-process notification), with and without the push channel (PostgreSQL
//!   `NOTIFY` vs polling every 100 ms); baseline: the append latency itself.
//! - `storage.shard_snapshot_1m_rows_*`: a snapshot of 1M rows (10 appends compacted as far as the since
//!   allows: two batches of 1 MiB parts whose rows interleave, printed in a note) by a fresh process (its
//!   part cache empty, as a hydrating replica's), rows/s, read as a storage peek reads it: chunks of
//!   1 MiB (`snapshot_stream`, `next_rows`), every row and count visited; `..._cached`: the same by the
//!   process that wrote the parts (its part cache holds them); `..._owned`: the whole snapshot as owned
//!   rows (`snapshot`, one `Row` per row) by a fresh process, the cost of a reader that keeps every row;
//!   baseline of all three: a raw blob read of the same parts (two in flight, around any cache),
//!   alternated with the first so that both run in the same state of the allocator and page cache, the
//!   best of five of each. Goal ratio >= 0.5 (the first). The embedded snapshot runs before the remote
//!   services start, so that no server's background work shares its two cores.
//!   `..._checks_floor`: the least a reader of the same parts must do before it trusts a row, measured
//!   the same way: the raw read (two parts at a time) with each part checked on the task that read it
//!   ([`check_part`]: size and checksum against the state, header, framing, order, every row
//!   validated), nothing built; `..._columnar_checks_floor`: the same for a columnar copy of the parts
//!   (a what-if format, [`columnar`]: would another format lift that floor?); `..._against_the_floor`:
//!   the first against the row format's floor (what summing, merging and handing out the rows add to
//!   the checks).
//! - `storage.shard_space_1m_updates`: blob bytes after 1M updates to 10k keys with the since following the
//!   upper and compaction running; baseline: the consolidated size (one part holding the live rows).
//!   Goal ratio <= 2.

mod columnar;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use frontiers::{Antichain, ReadPolicy};
use protocol::{ColumnType, Datum, GlobalId, RelationDesc, Row, ScalarType};
use storage::blob::{Blob, BlobConfig};
use storage::consensus::{Consensus, ConsensusConfig, VersionedData};
use storage::services::{Moto, Postgres, PostgresOptions};
use storage::shard::part::{check_part, decode_part, encode_part};
use storage::shard::state::PartRef;
use storage::{AppendRequest, ListenEvent, ShardCollections, ShardConfig, StorageCollections};

use crate::{append, desc, print_line, row};

const RUN: Duration = Duration::from_secs(3);
const ROWS_PER_APPEND: u64 = 10;

/// Where a benchmark's stores are.
struct Place {
    name: &'static str,
    blob: String,
    consensus: String,
    _dir: Option<tempfile::TempDir>,
}

struct Remote {
    postgres: Postgres,
    moto: Moto,
    next: u64,
}

impl Remote {
    fn start() -> Option<Remote> {
        let postgres = match Postgres::start(PostgresOptions { fsync: true, ..PostgresOptions::default() }) {
            Ok(postgres) => postgres,
            Err(error) => {
                println!("note: no PostgreSQL ({error}): the remote shard benchmarks are skipped");
                return None;
            }
        };
        let moto = match Moto::start().and_then(|moto| moto.create_bucket("bench").map(|()| moto)) {
            Ok(moto) => moto,
            Err(error) => {
                println!("note: no S3 server ({error}): the remote shard benchmarks are skipped");
                return None;
            }
        };
        Some(Remote { postgres, moto, next: 0 })
    }

    fn place(&mut self, listen: bool) -> Place {
        self.next += 1;
        let db = format!("b{}", self.next);
        self.postgres.create_database(&db).unwrap();
        let consensus = format!("{}?listen={listen}", self.postgres.url(&db));
        Place { name: "remote", blob: self.moto.blob_url("bench", &db), consensus, _dir: None }
    }
}

fn embedded() -> Place {
    let dir = tempfile::tempdir().unwrap();
    let (blob, consensus) = storage::embedded_urls(dir.path());
    Place { name: "embedded", blob, consensus, _dir: Some(dir) }
}

impl Place {
    async fn open(&self, config: ShardConfig) -> ShardCollections {
        let blob: BlobConfig = self.blob.parse().unwrap();
        let consensus: ConsensusConfig = self.consensus.parse().unwrap();
        ShardCollections::open(&blob, &consensus, config).await.unwrap()
    }

    async fn stores(&self) -> (Arc<dyn Blob>, Arc<dyn Consensus>) {
        let blob: BlobConfig = self.blob.parse().unwrap();
        let consensus: ConsensusConfig = self.consensus.parse().unwrap();
        (blob.open().unwrap(), consensus.open().await.unwrap())
    }
}

fn percentiles(mut latencies: Vec<Duration>) -> (f64, f64) {
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

/// Shard appends by `writers` concurrent writers; returns (rows/s, latencies, state bytes, part bytes).
async fn shard_appends(place: &Place, writers: u64) -> (f64, Vec<Duration>, usize, usize) {
    let storage = place.open(ShardConfig::default()).await;
    for w in 0..writers {
        storage.create_collection(GlobalId::User(w), desc()).await.unwrap();
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let storage = storage.clone();
        tasks.push(tokio::spawn(async move {
            let id = GlobalId::User(w);
            let mut latencies = Vec::new();
            let mut t = 0u64;
            while start.elapsed() < RUN {
                let rows = (0..ROWS_PER_APPEND).map(|i| (row(w, t * ROWS_PER_APPEND + i), t, 1)).collect();
                let began = Instant::now();
                storage.append(vec![append(id, rows, t, t + 1)]).await.unwrap();
                latencies.push(began.elapsed());
                t += 1;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let rate = latencies.len() as f64 * ROWS_PER_APPEND as f64 / start.elapsed().as_secs_f64();
    let state = storage.state(GlobalId::User(0)).await.unwrap().unwrap();
    let state_bytes = storage::shard::encode_state(&state).len();
    let rows: Vec<(Row, u64, i64)> = (0..ROWS_PER_APPEND).map(|i| (row(0, i), 0, 1)).collect();
    let part_bytes = encode_part(&rows).len();
    storage.shutdown().await;
    (rate, latencies, state_bytes, part_bytes)
}

/// The engines' floor: per append one raw blob put of `part_bytes` and one raw compare-and-set of
/// `state_bytes`, by `writers` concurrent writers.
async fn floor(place: &Place, writers: u64, part_bytes: usize, state_bytes: usize) -> (f64, Vec<Duration>) {
    let (blob, consensus) = place.stores().await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (blob, consensus) = (Arc::clone(&blob), Arc::clone(&consensus));
        tasks.push(tokio::spawn(async move {
            let part = Bytes::from(vec![0x5au8; part_bytes]);
            let state = Bytes::from(vec![0xa5u8; state_bytes]);
            let key = format!("floor/{w}");
            let mut latencies = Vec::new();
            let mut seqno = None;
            while start.elapsed() < RUN {
                let began = Instant::now();
                let next = seqno.map_or(0, |s: u64| s + 1);
                blob.set(&format!("floor-{w}/{next}"), part.clone()).await.unwrap();
                consensus
                    .compare_and_set(&key, seqno, VersionedData { seqno: next, data: state.clone() })
                    .await
                    .unwrap();
                seqno = Some(next);
                latencies.push(began.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let rate = latencies.len() as f64 * ROWS_PER_APPEND as f64 / start.elapsed().as_secs_f64();
    (rate, latencies)
}

async fn bench_appends(places: &mut dyn FnMut() -> Vec<Place>) {
    for writers in [1u64, 8, 64] {
        for (shard_place, floor_place) in places().into_iter().zip(places()) {
            let (rate, latencies, state_bytes, part_bytes) = shard_appends(&shard_place, writers).await;
            let (floor_rate, floor_latencies) = floor(&floor_place, writers, part_bytes, state_bytes).await;
            let name = format!("storage.shard_append_{}_w{writers}", shard_place.name);
            print_line(&name, rate, "rows/s", Some((floor_rate, "rows/s")));
            let ((p50, p99), (floor_p50, floor_p99)) = (percentiles(latencies), percentiles(floor_latencies));
            print_line(&format!("{name}_p50"), p50, "us", Some((floor_p50, "us")));
            print_line(&format!("{name}_p99"), p99, "us", Some((floor_p99, "us")));
            if rate / floor_rate < 0.7 {
                println!("warning: {name} is below the goal ratio 0.7");
            }
            println!("note: {name}: state {state_bytes} bytes, part {part_bytes} bytes");
        }
    }
}

/// Append-to-delivery latency of a listener (in `same_process` or another) on one appender.
async fn listen_latency(place: &Place, same_process: bool) -> (Vec<Duration>, Vec<Duration>) {
    let writer = place.open(ShardConfig::default()).await;
    let reader = if same_process { writer.clone() } else { place.open(ShardConfig::default()).await };
    let id = GlobalId::User(1);
    writer.create_collection(id, desc()).await.unwrap();
    writer.set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 10, granularity_ms: 0 }).await.unwrap();
    writer.append(vec![append(id, vec![], 0, 1)]).await.unwrap();
    let sent: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let mut listen = reader.listen(id, 0).await.unwrap();
    let listener = {
        let sent = Arc::clone(&sent);
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut delivered = 1u64;
            loop {
                match listen.next().await.unwrap() {
                    ListenEvent::Updates(_) => {}
                    ListenEvent::Progress(frontier) => {
                        let Some(upper) = frontier.as_option().copied() else { return latencies };
                        let now = Instant::now();
                        let sent = sent.lock().unwrap();
                        for t in delivered..upper.min(sent.len() as u64 + 1) {
                            latencies.push(now - sent[(t - 1) as usize]);
                        }
                        delivered = upper;
                    }
                }
            }
        })
    };
    let mut append_latencies = Vec::new();
    let start = Instant::now();
    let mut t = 1u64;
    while start.elapsed() < RUN {
        sent.lock().unwrap().push(Instant::now());
        let began = Instant::now();
        writer.append(vec![append(id, vec![(row(0, t), t, 1)], t, t + 1)]).await.unwrap();
        append_latencies.push(began.elapsed());
        t += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let close = AppendRequest {
        id,
        updates: vec![],
        expected_upper: Antichain::from_elem(t),
        new_upper: Antichain::new(),
    };
    writer.append(vec![close]).await.unwrap();
    let latencies = listener.await.unwrap();
    reader.shutdown().await;
    writer.shutdown().await;
    (latencies, append_latencies)
}

async fn bench_listen(embedded: Place, remote: &mut Option<Remote>) {
    let mut cases = vec![("embedded_in_process_push", embedded, true)];
    cases.push(("embedded_other_process_poll", self::embedded(), false));
    if let Some(remote) = remote {
        cases.push(("remote_other_process_push", remote.place(true), false));
        cases.push(("remote_other_process_poll", remote.place(false), false));
    }
    for (name, place, same_process) in cases {
        let (latencies, appends) = listen_latency(&place, same_process).await;
        let ((p50, p99), (append_p50, append_p99)) = (percentiles(latencies), percentiles(appends));
        print_line(&format!("storage.shard_listen_{name}_p50"), p50, "us", Some((append_p50, "us")));
        print_line(&format!("storage.shard_listen_{name}_p99"), p99, "us", Some((append_p99, "us")));
    }
}

fn snapshot_desc() -> RelationDesc {
    RelationDesc::new([
        ("k", ColumnType::new(ScalarType::Int64, false)),
        ("v", ColumnType::new(ScalarType::Text, false)),
    ])
}

/// The rows/s of a snapshot's readings, and what the snapshot was read from.
struct SnapshotRates {
    /// Read in chunks by a fresh process (cold part cache: a replica hydrating).
    cold: f64,
    /// Read in chunks by the process that wrote and compacted the parts (its part cache holds them).
    cached: f64,
    /// Read whole as owned rows by a fresh process.
    owned: f64,
    /// The raw blob read of the same parts.
    raw: f64,
    /// The same read with every check a reader of a part must make before it trusts a row
    /// ([`check_part`]), two parts at a time, each checked on the task that read it.
    floor: f64,
    /// The same with the parts in a what-if columnar format ([`columnar`]) and its checks.
    columnar_floor: f64,
    bytes: u64,
    batches: usize,
}

/// Reads the snapshot at `as_of` as a storage peek does, in chunks of rows lent out of each chunk,
/// visiting every row: answers the rows and the sum of their counts and encoded bytes.
async fn read_chunks(storage: &ShardCollections, id: GlobalId, as_of: u64) -> (u64, i64) {
    let mut chunks =
        StorageCollections::snapshot_stream(storage, id, as_of, storage::SNAPSHOT_CHUNK_BYTES).await.unwrap();
    let (mut rows, mut sum) = (0u64, 0i64);
    while let Some(chunk) = chunks.next_rows().await.unwrap() {
        let (chunk_rows, chunk_sum) = visit(&chunk);
        rows += chunk_rows;
        sum += chunk_sum;
    }
    (rows, sum)
}

/// Visits every row of `chunk` as a reader does, in plain code between two awaits (as a storage peek
/// applies its map/filter/project): the rows and the sum of their counts and encoded bytes.
fn visit(chunk: &storage::RowChunk) -> (u64, i64) {
    let (mut rows, mut sum) = (0u64, 0i64);
    for (row, diff) in chunk.iter() {
        rows += 1;
        sum += diff + row.as_bytes().len() as i64;
    }
    (rows, sum)
}

/// Reads the blobs at the keys of `parts` two at a time, each checked by `check` on the task that read it
/// (a floor of the checks; see the module documentation), and answers the seconds it took; every one of
/// the `updates` must have been checked.
async fn read_checked<P: Clone + Send + Sync + 'static>(
    blob: &Arc<dyn Blob>,
    parts: &[(String, P)],
    check: fn(&P, &[u8]) -> u64,
    updates: u64,
) -> f64 {
    let start = Instant::now();
    let mut checked = 0u64;
    for pair in parts.chunks(2) {
        let checks = pair.iter().map(|(key, part)| {
            let (blob, key, part) = (Arc::clone(blob), key.clone(), part.clone());
            tokio::spawn(async move {
                let bytes = blob.get(&key).await.unwrap().unwrap();
                check(&part, &bytes)
            })
        });
        for part_updates in futures::future::join_all(checks).await {
            checked += part_updates.unwrap();
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    assert_eq!(checked, updates);
    seconds
}

/// How many times the raw read and the fresh process's read each run (the best of each counts).
const SNAPSHOT_ROUNDS: usize = 5;

/// Reads a snapshot of 1M rows three ways, and the same parts raw (see the module documentation).
async fn snapshot_1m(place: &Place) -> SnapshotRates {
    const ROWS: u64 = 1_000_000;
    let config = ShardConfig { background_maintenance: false, ..ShardConfig::default() };
    let storage = place.open(config.clone()).await;
    let id = GlobalId::User(1);
    storage.create_collection(id, snapshot_desc()).await.unwrap();
    storage.set_read_policy(id, ReadPolicy::ValidFrom(Antichain::from_elem(9))).await.unwrap();
    let value = "0123456789abcdef";
    for t in 0..10u64 {
        let rows = (t * ROWS / 10..(t + 1) * ROWS / 10)
            .map(|k| (Row::pack([Datum::Int64(k as i64), Datum::Text(value)]), t, 1))
            .collect();
        storage.append(vec![append(id, rows, t, t + 1)]).await.unwrap();
    }
    while storage.maintain(id, false).await.unwrap().merges > 0 {}
    let state = storage.state(id).await.unwrap().unwrap();
    let parts: Vec<_> = state.batches.iter().flat_map(|b| b.parts.clone()).collect();
    let bytes: u64 = parts.iter().map(|p| p.bytes).sum();
    // Every row once, with count 1, and its bytes (27 each).
    let expected = (ROWS, (ROWS * 28) as i64);
    let [mut cold, mut cached, mut owned, mut raw, mut floor, mut columnar_floor] = [f64::MAX; 6];
    let (blob, _) = place.stores().await;
    let row_parts: Vec<(String, PartRef)> = parts.iter().map(|p| (p.key.clone(), p.clone())).collect();
    let mut columnar_parts = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let updates = decode_part(part, &blob.get(&part.key).await.unwrap().unwrap()).unwrap();
        if i == 0 {
            columnar::assert_refuses_damage(&updates);
        }
        let encoded = columnar::encode(&updates);
        let key = format!("bench-columnar/{i}");
        columnar_parts.push((key.clone(), (crc32fast::hash(&encoded), part.updates)));
        blob.set(&key, encoded).await.unwrap();
    }
    // The raw read and the fresh process's read alternate, each following the other, so that both run
    // in the same state of the allocator and the page cache: a raw read that follows the owned read (a
    // million rows freed) runs a third slower, which would flatter the ratio.
    for _ in 0..SNAPSHOT_ROUNDS {
        let start = Instant::now();
        let mut read = 0u64;
        for pair in parts.chunks(2) {
            let gets = pair.iter().map(|p| blob.get(&p.key));
            for got in futures::future::join_all(gets).await {
                read += got.unwrap().unwrap().len() as u64;
            }
        }
        raw = raw.min(start.elapsed().as_secs_f64());
        assert_eq!(read, bytes);
        let check_row_part = |part: &PartRef, bytes: &[u8]| check_part(part, bytes).unwrap();
        floor = floor.min(read_checked(&blob, &row_parts, check_row_part, ROWS).await);
        let check_columnar_part = |&(checksum, updates): &(u32, u64), bytes: &[u8]| {
            columnar::check(bytes, checksum, updates).unwrap()
        };
        columnar_floor =
            columnar_floor.min(read_checked(&blob, &columnar_parts, check_columnar_part, ROWS).await);
        let fresh = place.open(config.clone()).await;
        let start = Instant::now();
        let read = read_chunks(&fresh, id, 9).await;
        cold = cold.min(start.elapsed().as_secs_f64());
        assert_eq!(read, expected);
        fresh.shutdown().await;
    }
    for _ in 0..3 {
        let start = Instant::now();
        let read = read_chunks(&storage, id, 9).await;
        cached = cached.min(start.elapsed().as_secs_f64());
        assert_eq!(read, expected);
        let fresh = place.open(config.clone()).await;
        let start = Instant::now();
        let rows = fresh.snapshot(id, 9).await.unwrap();
        owned = owned.min(start.elapsed().as_secs_f64());
        assert_eq!(rows.len() as u64, ROWS);
        drop(rows);
        fresh.shutdown().await;
    }
    storage.shutdown().await;
    let rate = |seconds: f64| ROWS as f64 / seconds;
    SnapshotRates {
        cold: rate(cold),
        cached: rate(cached),
        owned: rate(owned),
        raw: rate(raw),
        floor: rate(floor),
        columnar_floor: rate(columnar_floor),
        bytes,
        batches: state.batches.len(),
    }
}

async fn bench_snapshot(places: Vec<Place>) {
    for place in places {
        let rates = snapshot_1m(&place).await;
        let name = format!("storage.shard_snapshot_1m_rows_{}", place.name);
        let baseline = Some((rates.raw, "rows/s"));
        print_line(&name, rates.cold, "rows/s", baseline);
        print_line(&format!("{name}_cached"), rates.cached, "rows/s", baseline);
        print_line(&format!("{name}_owned"), rates.owned, "rows/s", baseline);
        print_line(&format!("{name}_checks_floor"), rates.floor, "rows/s", baseline);
        print_line(&format!("{name}_columnar_checks_floor"), rates.columnar_floor, "rows/s", baseline);
        print_line(&format!("{name}_against_the_floor"), rates.cold, "rows/s", Some((rates.floor, "rows/s")));
        println!("note: {name}: {} bytes of parts in {} batches", rates.bytes, rates.batches);
        if rates.cold / rates.raw < 0.5 {
            println!("warning: {name} is below the goal ratio 0.5");
        }
    }
}

async fn bench_space(place: Place) {
    const KEYS: i64 = 10_000;
    const APPENDS: u64 = 1_000;
    const REPLACED: i64 = 500;
    let config = ShardConfig { maintenance_interval: Duration::from_millis(100), ..ShardConfig::default() };
    let storage = place.open(config).await;
    let id = GlobalId::User(1);
    storage.create_collection(id, snapshot_desc()).await.unwrap();
    storage.set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 1, granularity_ms: 0 }).await.unwrap();
    let mut values = vec![None::<u64>; KEYS as usize];
    let value = |t: u64| format!("value-{t:012}");
    for t in 0..APPENDS {
        let mut updates = Vec::with_capacity(2 * REPLACED as usize);
        for i in 0..REPLACED {
            let k = (t as i64 * REPLACED + i) % KEYS;
            if let Some(old) = values[k as usize] {
                updates.push((Row::pack([Datum::Int64(k), Datum::Text(&value(old))]), t, -1));
            }
            updates.push((Row::pack([Datum::Int64(k), Datum::Text(&value(t))]), t, 1));
            values[k as usize] = Some(t);
        }
        storage.append(vec![append(id, updates, t, t + 1)]).await.unwrap();
    }
    // Let background maintenance finish, then one more pass after the version holds moved.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while storage.maintain(id, false).await.unwrap().merges > 0 {}
    storage.maintain(id, false).await.unwrap();
    let stored: u64 = storage.blob().list("u1").await.unwrap().iter().map(|m| m.size_bytes).sum();
    let live: Vec<(Row, u64, i64)> = storage
        .snapshot(id, APPENDS - 1)
        .await
        .unwrap()
        .into_iter()
        .map(|(r, d)| (r, APPENDS - 2, d))
        .collect();
    assert_eq!(live.len() as i64, KEYS);
    let consolidated = encode_part(&live).len() as u64;
    print_line(
        "storage.shard_space_1m_updates",
        stored as f64,
        "bytes",
        Some((consolidated as f64, "bytes")),
    );
    if stored > 2 * consolidated {
        println!("warning: storage.shard_space_1m_updates is above the goal ratio 2");
    }
    storage.shutdown().await;
}

/// Runs the shard benchmarks `wants` selects.
pub async fn run(wants: &dyn Fn(&str) -> bool) {
    if !["shard_append", "shard_listen", "shard_snapshot", "shard_space"].iter().any(|g| wants(g)) {
        return;
    }
    if wants("shard_snapshot") {
        // Before the remote services start: the embedded engine's CPU-bound read measured alone on the
        // machine, not against a PostgreSQL still vacuuming and checkpointing the append benchmarks' rows
        // (a third slower in a full run when measured after them).
        bench_snapshot(vec![embedded()]).await;
    }
    let mut remote = Remote::start();
    if wants("shard_append") {
        let mut places = || {
            let mut places = vec![embedded()];
            places.extend(remote.as_mut().map(|r| r.place(true)));
            places
        };
        bench_appends(&mut places).await;
    }
    if wants("shard_listen") {
        bench_listen(embedded(), &mut remote).await;
    }
    if wants("shard_snapshot") {
        bench_snapshot(remote.as_mut().map(|r| r.place(true)).into_iter().collect()).await;
    }
    if wants("shard_space") {
        bench_space(embedded()).await;
    }
}
