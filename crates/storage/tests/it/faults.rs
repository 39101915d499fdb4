//! The shard engine's faults, each with a test (issue 20):
//!
//! - a writer process SIGKILLed at random moments during appends, 22 times on local files + SQLite and on
//!   S3 + PostgreSQL: every acknowledged append is present after restart, none is there by half (each
//!   writes the same rows to two collections atomically), uppers never regress;
//! - PostgreSQL stopped, or `moto_server` paused (SIGSTOP), for two seconds under a writer and a listener
//!   in another engine: appends wait and resume, each applied exactly once, and the listen resumes with no
//!   gap and no duplicate; a process opening the shards while PostgreSQL is down waits for it (within the
//!   retry budget), and one that PostgreSQL refuses (no such database) is told at once;
//! - two writer processes racing compare-and-append on one shard: exactly one wins each interval, the
//!   loser gets the current upper;
//! - damage by hand (every backend that can be reached by hand): a bit flipped anywhere in a part, a part
//!   deleted, a state version's bytes flipped, the head version deleted: reads (and appends, and
//!   compaction) fail with a typed error naming the collection and the damaged key, nothing is skipped,
//!   no upper regresses, and repairing the damage makes everything readable again;
//! - a full disk (a 6 MiB tmpfs): appends fail with a clear error, resume when space returns, and the
//!   parts failed appends left behind are collected;
//! - a huge collection: its snapshot and listen stream in parts with bounded memory;
//! - space: churn with the since following the upper keeps the stored bytes near the consolidated size, and
//!   an explicit maintenance pass collects every part another process's merge retired, however few
//!   versions behind this process's version hold is.
//!
//! Child processes are this test binary re-executed with a filter and an environment naming their role.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use frontiers::ReadPolicy;
use protocol::{ColumnType, Datum, GlobalId, RelationDesc, Row, ScalarType};
use storage::services::services_required;
use storage::{AppendError, ListenEvent, ReadError, ShardCollections, ShardConfig, StorageCollections};

use crate::backends::{Backend, Services, Stores, quick_config};
use crate::*;
use test_support::XorShift;

const CHILD_ROLE: &str = "STORAGE_FAULT_CHILD_ROLE";
const CHILD_BLOB: &str = "STORAGE_FAULT_CHILD_BLOB";
const CHILD_CONSENSUS: &str = "STORAGE_FAULT_CHILD_CONSENSUS";
const CHILD_ACKS: &str = "STORAGE_FAULT_CHILD_ACKS";
const CHILD_WRITER: &str = "STORAGE_FAULT_CHILD_WRITER";
const KILLS: usize = 22;
const WRITERS: u64 = 3;
const ROWS_PER_APPEND: i64 = 3;

/// A row of the crash tests' writers, padded (see `crate::crash_row`).
fn crash_row(writer: u64, seq: u64, part: i64) -> Row {
    crate::crash_row(writer, seq, part, "padding padding padding padding padding padding")
}

/// Collections `A_w` and `B_w` of writer `w`.
fn pair(writer: u64) -> (GlobalId, GlobalId) {
    (user(2 * writer), user(2 * writer + 1))
}

/// The configuration of the crash children: compaction busy, so kills land in merges too.
fn crash_config() -> ShardConfig {
    ShardConfig { maintenance_interval: Duration::from_millis(50), max_batches: 3, ..quick_config() }
}

/// Re-executes this binary as a child running `role` on `stores`.
fn spawn_child(role: &str, stores: &Stores, acks: &Path, writer: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["faults::a_fault_child_runs_its_role_when_asked_to", "--exact", "--test-threads=1"])
        .env(CHILD_ROLE, role)
        .env(CHILD_BLOB, &stores.blob_url)
        .env(CHILD_CONSENSUS, &stores.consensus_url)
        .env(CHILD_ACKS, acks)
        .env(CHILD_WRITER, writer.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Appends one acknowledged line; one write(2) on an O_APPEND file, so a SIGKILL cannot tear it.
fn ack(file: &fs::File, line: String) {
    let mut file = file;
    file.write_all(format!("{line}\n").as_bytes()).expect("ack");
}

/// The children's body: runs only when a parent test set the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_child_runs_its_role_when_asked_to() {
    let (Ok(role), Ok(blob), Ok(consensus), Ok(acks)) = (
        std::env::var(CHILD_ROLE),
        std::env::var(CHILD_BLOB),
        std::env::var(CHILD_CONSENSUS),
        std::env::var(CHILD_ACKS),
    ) else {
        return;
    };
    let writer: u64 = std::env::var(CHILD_WRITER).unwrap().parse().unwrap();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let storage = ShardCollections::open(&blob.parse().unwrap(), &consensus.parse().unwrap(), crash_config())
        .await
        .expect("the child opens the stores");
    let acks = Arc::new(OpenOptions::new().create(true).append(true).open(acks).expect("ack file"));
    match role.as_str() {
        "crash" => crash_writer(storage, acks).await,
        "race" => race_writer(storage, acks, writer).await,
        other => panic!("unknown role {other}"),
    }
}

/// Writers appending the same rows to `A_w` and `B_w` atomically until killed.
async fn crash_writer(storage: ShardCollections, acks: Arc<fs::File>) {
    let (failures, mut failed) = tokio::sync::mpsc::channel(WRITERS as usize);
    for w in 0..WRITERS {
        let (storage, acks, failures) = (storage.clone(), Arc::clone(&acks), failures.clone());
        tokio::spawn(async move {
            let (a, b) = pair(w);
            for id in [a, b] {
                storage.create_collection(id, crash_desc()).await.expect("create");
                let policy = ReadPolicy::LagWriteFrontier { lag_ms: 3, granularity_ms: 0 };
                storage.set_read_policy(id, policy).await.expect("policy");
            }
            let mut seq = *storage.frontiers(a).await.unwrap().upper.as_option().unwrap();
            loop {
                let rows: Vec<_> = (0..ROWS_PER_APPEND).map(|p| (crash_row(w, seq, p), seq, 1)).collect();
                let result = storage
                    .append(vec![append(a, rows.clone(), seq, seq + 1), append(b, rows, seq, seq + 1)])
                    .await;
                if let Err(error) = result {
                    let _ = failures.send(format!("writer {w}: {error}")).await;
                    return;
                }
                ack(&acks, format!("{w} {seq}"));
                seq += 1;
            }
        });
    }
    let failure = failed.recv().await;
    panic!("a child writer failed: {failure:?}");
}

/// One of two processes racing on `user(0)`: appends `[t, t + 1)` with its own row, moving to the upper
/// it learns when it loses.
async fn race_writer(storage: ShardCollections, acks: Arc<fs::File>, writer: u64) {
    let id = user(0);
    let mut t = *storage.frontiers(id).await.unwrap().upper.as_option().unwrap();
    loop {
        let row = Row::pack([Datum::Int64(writer as i64)]);
        match storage.append(vec![append(id, vec![(row, t, 1)], t, t + 1)]).await {
            Ok(()) => {
                ack(&acks, format!("won {t}"));
                t += 1;
            }
            Err(AppendError::UpperMismatch { current, .. }) => {
                let current = *current.as_option().unwrap();
                assert!(current > t, "the loser's upper is beyond its attempt");
                ack(&acks, format!("lost {t} {current}"));
                t = current;
            }
            Err(error) => panic!("writer {writer}: {error}"),
        }
    }
}

fn read_acks(path: &Path) -> Vec<String> {
    fs::read_to_string(path).map(|text| text.lines().map(String::from).collect()).unwrap_or_default()
}

/// Checks a store after a crash: acknowledged appends present, none by half, uppers not regressed.
async fn check_after_crash(
    storage: &ShardCollections,
    acked: &BTreeMap<u64, BTreeSet<u64>>,
    last_uppers: &mut BTreeMap<u64, u64>,
    context: &str,
) {
    for w in 0..WRITERS {
        let (a, b) = pair(w);
        let (Ok(fa), Ok(fb)) = (storage.frontiers(a).await, storage.frontiers(b).await) else {
            assert!(
                acked.get(&w).is_none_or(BTreeSet::is_empty),
                "{context}: writer {w} lost its collections"
            );
            continue;
        };
        let upper = *fa.upper.as_option().unwrap();
        assert_eq!(fa.upper, fb.upper, "{context}: atomic appends keep both uppers equal");
        let previous = last_uppers.get(&w).copied().unwrap_or(0);
        assert!(upper >= previous, "{context}: upper of writer {w} regressed from {previous} to {upper}");
        last_uppers.insert(w, upper);
        if let Some(max_acked) = acked.get(&w).and_then(|s| s.last()) {
            assert!(
                *max_acked < upper,
                "{context}: acknowledged seq {max_acked} of writer {w} is missing (upper {upper})"
            );
        }
        if upper == 0 {
            continue;
        }
        let contents_a = storage.snapshot(a, upper - 1).await.unwrap();
        let contents_b = storage.snapshot(b, upper - 1).await.unwrap();
        assert_eq!(contents_a, contents_b, "{context}: writer {w}'s collections differ");
        let mut expected: Vec<(Row, i64)> =
            (0..upper).flat_map(|seq| (0..ROWS_PER_APPEND).map(move |p| (crash_row(w, seq, p), 1))).collect();
        expected.sort();
        assert_eq!(contents_a, expected, "{context}: writer {w} has a gap, a duplicate or a half append");
    }
}

async fn sigkill_writers(stores: Stores) {
    let base = tempfile::tempdir().unwrap();
    let seed = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mut rng = XorShift::new(seed);
    let mut acked: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut last_uppers = BTreeMap::new();
    for run in 0..KILLS {
        let acks = base.path().join(format!("acks-{run}"));
        let mut child = spawn_child("crash", &stores, &acks, 0);
        let delay = if run == 0 { 600 } else { 60 + rng.next() % 300 };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        child.kill().unwrap();
        let status = child.wait().unwrap();
        let context = format!("{:?} seed {seed:#x} run {run}", stores.backend);
        assert!(!status.success(), "{context}: the child must die by the kill, not exit: {status:?}");
        for line in read_acks(&acks) {
            let (w, seq) = line.split_once(' ').unwrap();
            acked.entry(w.parse().unwrap()).or_default().insert(seq.parse().unwrap());
        }
        let storage = stores.open(ShardConfig { background_maintenance: false, ..quick_config() }).await;
        check_after_crash(&storage, &acked, &mut last_uppers, &context).await;
        storage.shutdown().await;
    }
    let total: usize = acked.values().map(BTreeSet::len).sum();
    assert!(
        total >= 60,
        "{:?} seed {seed:#x}: only {total} appends were acknowledged in {KILLS} runs",
        stores.backend
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_writers_lose_nothing_acknowledged_on_sqlite_and_on_postgres() {
    let mut services = None;
    for backend in [Backend::Embedded, Backend::Remote] {
        if let Some(stores) = Stores::new(backend, &mut services) {
            sigkill_writers(stores).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writer_processes_racing_on_one_shard_win_each_interval_once() {
    let mut services = None;
    for backend in [Backend::Embedded, Backend::Remote] {
        let Some(stores) = Stores::new(backend, &mut services) else { continue };
        let storage = stores.open(quick_config()).await;
        let id = user(0);
        storage.create_collection(id, int_desc()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let paths = [dir.path().join("w0"), dir.path().join("w1")];
        let mut children: Vec<Child> =
            paths.iter().enumerate().map(|(w, path)| spawn_child("race", &stores, path, w as u64)).collect();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        for child in &mut children {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        let upper = *storage.frontiers(id).await.unwrap().upper.as_option().unwrap();
        let contents: BTreeMap<u64, Vec<(Row, i64)>> = {
            let mut by_time: BTreeMap<u64, Vec<(Row, i64)>> = BTreeMap::new();
            let mut listen = storage.listen(id, 0).await.unwrap();
            let mut done = upper == 0;
            while !done {
                match listen.next().await.unwrap() {
                    ListenEvent::Updates(updates) => {
                        for (row, time, diff) in updates {
                            by_time.entry(time).or_default().push((row, diff));
                        }
                    }
                    ListenEvent::Progress(frontier) => {
                        done = frontier.as_option().is_none_or(|u| *u >= upper)
                    }
                }
            }
            by_time
        };
        let mut losses = 0;
        for (w, path) in paths.iter().enumerate() {
            for line in read_acks(path) {
                let words: Vec<u64> = line.split(' ').skip(1).map(|x| x.parse().unwrap()).collect();
                let mine = Row::pack([Datum::Int64(w as i64)]);
                if line.starts_with("won") {
                    assert_eq!(
                        contents.get(&words[0]),
                        Some(&vec![(mine, 1)]),
                        "{backend:?}: writer {w} won {}",
                        words[0]
                    );
                } else {
                    losses += 1;
                    assert!(
                        contents.get(&words[0]).is_some_and(|rows| rows[0].0 != mine),
                        "{backend:?}: writer {w} lost {}",
                        words[0]
                    );
                }
            }
        }
        // Every interval below the upper has exactly one row, from one writer (the snapshot at 0 folds
        // time 0 into the listen's first event, which is at time 0 too).
        for t in 0..upper {
            assert_eq!(contents.get(&t).map(Vec::len), Some(1), "{backend:?}: interval {t}");
        }
        assert!(upper >= 20, "{backend:?}: only {upper} intervals in 1.5 s");
        assert!(losses > 0, "{backend:?}: the writers never raced");
    }
}

/// Which service an outage test takes away.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// PostgreSQL stopped (fast shutdown) and started again on its port and data.
    Consensus,
    /// `moto_server` paused (SIGSTOP) and resumed: requests hang rather than fail.
    Blob,
}

/// A writer appends 400 intervals while a listener in another engine reads them; after the 100th the
/// `outage` lasts two seconds. Every append is applied exactly once and the listen delivers each once,
/// in order, with no gap.
// Real services in real time: the monotonic clock measures how long an append waited.
#[allow(clippy::disallowed_methods)]
async fn appends_and_listens_survive(outage: Outage) {
    let Some(mut services) = Services::start() else { return };
    let (blob_url, consensus_url) = services.fresh();
    let (blob, consensus) = (blob_url.parse().unwrap(), consensus_url.parse().unwrap());
    let writer = ShardCollections::open(&blob, &consensus, quick_config()).await.unwrap();
    let reader = ShardCollections::open(&blob, &consensus, quick_config()).await.unwrap();
    let id = user(1);
    writer.create_collection(id, int_desc()).await.unwrap();
    let mut listen = reader.listen(id, 0).await.unwrap();
    let appends = tokio::spawn({
        let writer = writer.clone();
        async move {
            let mut longest = Duration::ZERO;
            for t in 0..400u64 {
                let started = std::time::Instant::now();
                writer.append(vec![append(id, vec![(int_row(t as i64), t, 1)], t, t + 1)]).await.unwrap();
                longest = longest.max(started.elapsed());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            longest
        }
    });
    let mut delivered: Vec<(Row, u64, i64)> = Vec::new();
    let mut progress = 0;
    let mut outage_done = false;
    while progress < 400 {
        let event = tokio::time::timeout(Duration::from_secs(30), listen.next())
            .await
            .expect("listen stalled for good");
        match event.unwrap() {
            ListenEvent::Updates(updates) => delivered.extend(updates),
            ListenEvent::Progress(frontier) => progress = *frontier.as_option().unwrap(),
        }
        if progress >= 100 && !outage_done {
            outage_done = true;
            match outage {
                Outage::Consensus => services.postgres.stop().unwrap(),
                Outage::Blob => services.moto.pause().unwrap(),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            match outage {
                Outage::Consensus => services.postgres.start_again().unwrap(),
                Outage::Blob => services.moto.resume().unwrap(),
            }
        }
    }
    let longest_append = appends.await.unwrap();
    let expected: Vec<_> = (0..400u64).map(|t| (int_row(t as i64), t, 1)).collect();
    assert_eq!(delivered.len(), 400, "no gap and no duplicate");
    assert_eq!(delivered, expected);
    assert_eq!(writer.frontiers(id).await.unwrap().upper, at(400));
    let snapshot = writer.snapshot(id, 399).await.unwrap();
    assert_eq!(snapshot.len(), 400, "every append applied exactly once");
    assert!(snapshot.iter().all(|(_, diff)| *diff == 1));
    // The outage was felt: an append waited through it (a stopped PostgreSQL fails calls, which are
    // retried; a paused moto_server holds them).
    assert!(longest_append >= Duration::from_secs(1), "{outage:?}: longest append {longest_append:?}");
    if let Outage::Consensus = outage {
        assert!(writer.stats().retries > 0, "the outage was retried through");
    }
    assert!(!services.moto.is_paused());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_stalls_appends_and_listens_which_then_resume_exactly_once() {
    appends_and_listens_survive(Outage::Consensus).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_blob_server_stalls_appends_and_listens_which_then_resume_exactly_once() {
    appends_and_listens_survive(Outage::Blob).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Real services in real time: the monotonic clock bounds how long a refusal took.
#[allow(clippy::disallowed_methods)]
async fn opening_the_shards_while_postgres_is_down_waits_for_it_and_a_refusal_is_not_retried() {
    let Some(mut services) = Services::start() else { return };
    let (blob_url, consensus_url) = services.fresh();
    let blob: storage::blob::BlobConfig = blob_url.parse().unwrap();
    let consensus: storage::consensus::ConsensusConfig = consensus_url.parse().unwrap();
    services.postgres.stop().unwrap();
    // Down for longer than the budget: unreachable, said so.
    let short = ShardConfig { retry_budget: Duration::from_millis(300), ..quick_config() };
    let refused = ShardCollections::open(&blob, &consensus, short).await.map(|_| ()).unwrap_err();
    assert!(refused.to_string().contains("unreachable"), "{refused}");
    // Back within the budget: the open waits for it.
    let opening = tokio::spawn({
        let (blob, consensus) = (blob.clone(), consensus.clone());
        async move { ShardCollections::open(&blob, &consensus, quick_config()).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!opening.is_finished(), "the open waits for the server");
    services.postgres.start_again().unwrap();
    let storage = tokio::time::timeout(Duration::from_secs(20), opening).await.unwrap().unwrap().unwrap();
    storage.create_collection(user(1), int_desc()).await.unwrap();
    // A server that answers with a refusal (no such database) is not waited for.
    let missing: storage::consensus::ConsensusConfig = services.postgres.url("no_such_db").parse().unwrap();
    let started = std::time::Instant::now();
    let refused = ShardCollections::open(&blob, &missing, quick_config()).await.map(|_| ()).unwrap_err();
    assert!(!refused.to_string().contains("unreachable"), "{refused}");
    assert!(started.elapsed() < Duration::from_secs(5), "retried a refusal for {:?}", started.elapsed());
}

/// Flips `bit` of the blob at `key` (through the blob API, so on every backend).
async fn flip(storage: &ShardCollections, key: &str, bit: usize) -> Bytes {
    let original = storage.blob().get(key).await.unwrap().unwrap();
    let mut damaged = original.to_vec();
    damaged[bit / 8] ^= 1 << (bit % 8);
    storage.blob().set(key, Bytes::from(damaged)).await.unwrap();
    original
}

/// Writes (or deletes, with `None`) the stored bytes of version `seqno` of `key`, by hand.
async fn tamper_with_consensus(stores: &Stores, key: &str, seqno: u64, data: Option<Vec<u8>>) -> bool {
    match stores.backend {
        Backend::Memory => false,
        Backend::Embedded => {
            let path = stores.consensus_url.strip_prefix("sqlite://").unwrap();
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.busy_timeout(Duration::from_secs(5)).unwrap();
            let seqno = seqno as i64;
            match data {
                Some(data) => conn
                    .execute(
                        "INSERT INTO consensus (key, seqno, data) VALUES (?1, ?2, ?3)
                         ON CONFLICT (key, seqno) DO UPDATE SET data = excluded.data",
                        rusqlite::params![key, seqno, data],
                    )
                    .unwrap(),
                None => conn
                    .execute(
                        "DELETE FROM consensus WHERE key = ?1 AND seqno = ?2",
                        rusqlite::params![key, seqno],
                    )
                    .unwrap(),
            };
            true
        }
        Backend::Remote => {
            let (client, connection) =
                tokio_postgres::connect(&stores.consensus_url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            let seqno = seqno as i64;
            match data {
                Some(data) => client
                    .execute(
                        "INSERT INTO consensus (key, seqno, data) VALUES ($1, $2, $3)
                         ON CONFLICT (key, seqno) DO UPDATE SET data = EXCLUDED.data",
                        &[&key, &seqno, &data],
                    )
                    .await
                    .unwrap(),
                None => client
                    .execute("DELETE FROM consensus WHERE key = $1 AND seqno = $2", &[&key, &seqno])
                    .await
                    .unwrap(),
            };
            true
        }
    }
}

async fn damage_is_reported_by_name(stores: Stores) {
    let config = ShardConfig { background_maintenance: false, max_batches: 1, ..quick_config() };
    let storage = stores.open(config.clone()).await;
    let id = user(1);
    storage.create_collection(id, int_desc()).await.unwrap();
    storage.set_read_policy(id, ReadPolicy::ValidFrom(at(0))).await.unwrap();
    for t in 0..6u64 {
        let updates = (0..50).map(|x| (int_row(x * 10 + t as i64), t, 1)).collect();
        storage.append(vec![append(id, updates, t, t + 1)]).await.unwrap();
    }
    let good = storage.snapshot(id, 5).await.unwrap();
    assert_eq!(good.len(), 300);
    let state = storage.state(id).await.unwrap().unwrap();
    let part = state.batches[2].parts[0].clone();
    let mut rng = XorShift::new(0x5eed ^ u64::from(std::process::id()));
    // A flipped bit anywhere: header, middle, last byte.
    let bits = [0, 37, rng.next() as usize % (part.bytes as usize * 8), part.bytes as usize * 8 - 1];
    for bit in bits {
        let original = flip(&storage, &part.key, bit).await;
        let error = storage.snapshot(id, 5).await.unwrap_err();
        assert!(
            matches!(&error, ReadError::Corrupt { id: got, what } if *got == id && what.contains(&part.key)),
            "bit {bit}: {error:?}"
        );
        let mut listen = storage.listen(id, 5).await.unwrap();
        assert!(matches!(listen.next().await, Err(ReadError::Corrupt { .. })));
        let compaction = storage.maintain(id, false).await;
        assert!(
            matches!(&compaction, Err(ReadError::Corrupt { what, .. }) if what.contains(&part.key)),
            "{compaction:?}"
        );
        let after = storage.state(id).await.unwrap().unwrap();
        let still_there = after.batches.iter().flat_map(|b| &b.parts).any(|p| p.key == part.key);
        assert!(still_there, "compaction did not merge the damaged part away");
        storage.blob().set(&part.key, original).await.unwrap();
        assert_eq!(storage.snapshot(id, 5).await.unwrap(), good, "repaired");
    }
    // A deleted part.
    let original = storage.blob().get(&part.key).await.unwrap().unwrap();
    storage.blob().delete(&part.key).await.unwrap();
    let error = storage.snapshot(id, 5).await.unwrap_err();
    assert!(
        matches!(&error, ReadError::Corrupt { what, .. } if what.contains("missing") && what.contains(&part.key)),
        "{error:?}"
    );
    storage.blob().set(&part.key, original).await.unwrap();

    // The head state version, damaged or deleted by hand (once this process's background hold changes,
    // which write new versions, have settled).
    let key = storage::shard::consensus_key(id);
    let mut head = storage.consensus().head(&key).await.unwrap().unwrap();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = storage.consensus().head(&key).await.unwrap().unwrap();
        if now.seqno == head.seqno {
            break;
        }
        head = now;
    }
    let mut damaged = head.data.to_vec();
    let at_byte = rng.next() as usize % damaged.len();
    damaged[at_byte] ^= 0x04;
    if tamper_with_consensus(&stores, &key, head.seqno, Some(damaged)).await {
        let fresh = stores.open(config.clone()).await;
        for error in [fresh.frontiers(id).await.unwrap_err(), storage.frontiers(id).await.unwrap_err()] {
            let named = format!("state version {} of consensus key {key}", head.seqno);
            assert!(matches!(&error, ReadError::Corrupt { what, .. } if what.contains(&named)), "{error:?}");
        }
        // A process without a copy of the version cannot append on it (this one has the version it wrote
        // cached, and would supersede the damage with a correct successor).
        let append_error = fresh.append(vec![append(id, vec![], 6, 7)]).await.unwrap_err();
        assert!(matches!(append_error, AppendError::Corrupt { .. }), "{append_error:?}");
        tamper_with_consensus(&stores, &key, head.seqno, Some(head.data.to_vec())).await;
        assert_eq!(storage.frontiers(id).await.unwrap().upper, at(6), "repaired");

        tamper_with_consensus(&stores, &key, head.seqno, None).await;
        let fresh = stores.open(config.clone()).await;
        for process in [&fresh, &storage] {
            let error = process.frontiers(id).await.unwrap_err();
            assert!(
                matches!(&error, ReadError::Corrupt { what, .. } if what.contains("missing")),
                "{error:?}"
            );
        }
        let error = fresh.append(vec![append(id, vec![], 6, 7)]).await.unwrap_err();
        assert!(
            matches!(error, AppendError::Corrupt { .. }),
            "no append lands on an older version: {error:?}"
        );
        tamper_with_consensus(&stores, &key, head.seqno, Some(head.data.to_vec())).await;
    }
    // Nothing acknowledged disappeared, and the upper never went back.
    assert_eq!(storage.frontiers(id).await.unwrap().upper, at(6));
    assert_eq!(storage.snapshot(id, 5).await.unwrap(), good);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_parts_and_state_versions_are_reported_by_name_on_every_backend() {
    crate::backends::on_every_backend(damage_is_reported_by_name).await;
}

/// Mounts a tmpfs of `bytes` at a fresh directory; `None` (or a failure under CI) if mounting fails.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let result = match output {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(String::from_utf8_lossy(&output.stderr).into_owned()),
            Err(error) => Err(error.to_string()),
        };
        match result {
            Ok(()) => Some(Tmpfs { dir }),
            Err(error) if services_required() => panic!("CI=true and a tmpfs cannot be mounted: {error}"),
            Err(error) => {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("SKIPPED the full-disk test: cannot mount a tmpfs ({error})");
                }
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| {
            if e.path().is_dir() { dir_bytes(&e.path()) } else { e.metadata().map(|m| m.len()).unwrap_or(0) }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_appends_clearly_and_they_resume_when_space_returns() {
    let Some(tmpfs) = Tmpfs::mount(6 << 20) else { return };
    let root = tmpfs.dir.path();
    let blob: storage::blob::BlobConfig = format!("file://{}", root.join("blob").display()).parse().unwrap();
    let consensus: storage::consensus::ConsensusConfig =
        format!("sqlite://{}", root.join("consensus.db").display()).parse().unwrap();
    let config = ShardConfig {
        retry_budget: Duration::from_millis(300),
        background_maintenance: false,
        leaked_part_grace: Duration::ZERO,
        ..quick_config()
    };
    let storage = ShardCollections::open(&blob, &consensus, config).await.unwrap();
    let id = user(1);
    storage.create_collection(id, int_desc()).await.unwrap();
    storage.set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 1, granularity_ms: 0 }).await.unwrap();
    // Fill most of the disk with a file we can delete later.
    let filler = root.join("filler");
    fs::write(&filler, vec![0u8; 5 << 20]).unwrap();
    let mut t = 0u64;
    let mut failure = None;
    for _ in 0..200 {
        let updates = (0..2_000).map(|x| (int_row(x + 2_000 * t as i64), t, 1)).collect();
        match storage.append(vec![append(id, updates, t, t + 1)]).await {
            Ok(()) => t += 1,
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
    }
    let failure = failure.expect("a 6 MiB disk fills up");
    let message = failure.to_string();
    assert!(
        message.contains("No space left") || message.contains("disk is full") || message.contains("full"),
        "the error says the disk is full: {message}"
    );
    assert!(matches!(failure, AppendError::Io(_) | AppendError::Indeterminate(_)), "{failure:?}");
    // Space returns: appends resume from the upper the store has.
    fs::remove_file(&filler).unwrap();
    let upper = *storage.frontiers(id).await.unwrap().upper.as_option().unwrap();
    assert!(
        upper == t || (upper == t + 1 && matches!(failure, AppendError::Indeterminate(_))),
        "upper {upper}, t {t}"
    );
    storage.append(vec![append(id, vec![(int_row(-1), upper, 1)], upper, upper + 1)]).await.unwrap();
    // Parts of failed appends are collected: afterwards the directory holds only what a state knows.
    let report = storage.maintain(id, true).await.unwrap();
    let state = storage.state(id).await.unwrap().unwrap();
    let listed: BTreeSet<String> =
        storage.blob().list("u1").await.unwrap().into_iter().map(|m| m.key).collect();
    let known: BTreeSet<String> = state.known_keys().into_iter().map(String::from).collect();
    assert_eq!(listed, known, "no part is left behind (sweep deleted {})", report.leaked_deleted);
    assert!(
        dir_bytes(&root.join("blob"))
            <= state.live_bytes() + state.retired.iter().map(|r| r.part.bytes).sum::<u64>()
    );
    assert_eq!(storage.snapshot(id, upper).await.unwrap().len() as u64, upper * 2_000 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_listens_of_a_huge_collection_stream_in_bounded_parts() {
    let stores = Stores::new(Backend::Embedded, &mut None).unwrap();
    const PART: usize = 64 << 10;
    let config = ShardConfig {
        part_target_bytes: PART,
        listen_chunk_bytes: 128 << 10,
        background_maintenance: false,
        max_batches: 2,
        ..quick_config()
    };
    let storage = stores.open(config).await;
    let id = user(1);
    let desc = RelationDesc::new([
        ("k", ColumnType::new(ScalarType::Int64, false)),
        ("pad", ColumnType::new(ScalarType::Text, false)),
    ]);
    storage.create_collection(id, desc).await.unwrap();
    let pad = "p".repeat(80);
    let rows = |range: std::ops::Range<i64>, t: u64| -> Vec<(Row, u64, i64)> {
        range.map(|k| (Row::pack([Datum::Int64(k), Datum::Text(&pad)]), t, 1)).collect()
    };
    const ROWS: i64 = 120_000;
    for (t, chunk) in (0..ROWS).step_by(20_000).enumerate() {
        storage
            .append(vec![append(id, rows(chunk..chunk + 20_000, t as u64), t as u64, t as u64 + 1)])
            .await
            .unwrap();
    }
    storage.maintain(id, false).await.unwrap();
    let state = storage.state(id).await.unwrap().unwrap();
    let total_bytes = state.live_bytes();
    assert!(total_bytes > 10 << 20, "the collection is {total_bytes} bytes");
    let mut stream = storage.snapshot_stream(id, 5).await.unwrap();
    let mut count = 0i64;
    let mut previous: Option<Row> = None;
    while let Some(chunk) = stream.next_chunk(256 << 10).await.unwrap() {
        for (row, diff) in chunk {
            assert_eq!(diff, 1);
            assert!(previous.as_ref().is_none_or(|p| *p < row), "rows in order, each once");
            previous = Some(row);
            count += 1;
        }
    }
    assert_eq!(count, ROWS);
    // One part per batch and the ones fetched ahead: never the collection.
    let per_batch = 1 + storage::shard::read::SNAPSHOT_PREFETCH_PARTS as u64;
    let bound = state.batches.len() as u64 * per_batch * (PART as u64 + 4096);
    assert!(stream.peak_buffered_bytes() <= bound, "peak {} > bound {bound}", stream.peak_buffered_bytes());
    assert!(
        stream.peak_buffered_bytes() * 10 < total_bytes,
        "peak {} of {total_bytes}",
        stream.peak_buffered_bytes()
    );
    // A listen delivers the same snapshot in events of about the chunk size.
    let mut listen = storage.listen(id, 5).await.unwrap();
    let mut listened = 0;
    loop {
        match listen.next().await.unwrap() {
            ListenEvent::Updates(updates) => {
                let bytes: usize = updates.iter().map(|u| u.0.byte_len() + 16).sum();
                assert!(bytes <= (128 << 10) + 200, "an event of {bytes} bytes");
                listened += updates.len() as i64;
            }
            ListenEvent::Progress(frontier) => {
                assert_eq!(frontier, at(6));
                break;
            }
        }
    }
    assert_eq!(listened, ROWS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_with_the_since_following_the_upper_keeps_space_near_the_consolidated_size() {
    let stores = Stores::new(Backend::Embedded, &mut None).unwrap();
    let config = ShardConfig {
        background_maintenance: false,
        reader_lease: Duration::from_millis(200),
        ..quick_config()
    };
    let storage = stores.open(config).await;
    let id = user(1);
    storage.create_collection(id, int_desc()).await.unwrap();
    storage.set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 1, granularity_ms: 0 }).await.unwrap();
    // 100k updates to 1k keys: each append replaces the values of 100 keys.
    const KEYS: i64 = 1_000;
    let mut values = vec![0i64; KEYS as usize];
    for t in 0..500u64 {
        let mut updates = Vec::new();
        for k in 0..100 {
            let key = (k * 10 + t as i64) % KEYS;
            if t >= 10 {
                updates.push((Row::pack([Datum::Int64(key * 1_000_000 + values[key as usize])]), t, -1));
            }
            values[key as usize] = t as i64;
            updates.push((Row::pack([Datum::Int64(key * 1_000_000 + t as i64)]), t, 1));
        }
        storage.append(vec![append(id, updates, t, t + 1)]).await.unwrap();
        if t % 10 == 9 {
            storage.maintain(id, false).await.unwrap();
        }
    }
    storage.maintain(id, false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    storage.maintain(id, false).await.unwrap();
    let state = storage.state(id).await.unwrap().unwrap();
    let stored = dir_bytes(Path::new(stores.blob_url.strip_prefix("file://").unwrap()));
    let consolidated = storage::shard::part::encode_part(
        &storage
            .snapshot(id, 499)
            .await
            .unwrap()
            .into_iter()
            .map(|(row, diff)| (row, 498, diff))
            .collect::<Vec<_>>(),
    )
    .len() as u64;
    assert!(
        stored <= 2 * consolidated,
        "stored {stored} bytes in {} batches ({} retired) vs {consolidated} consolidated",
        state.batches.len(),
        state.retired.len()
    );
    let _ = Arc::new(());
}

/// A process's leased reader holds the versions from the one it last read; a background pass moves that
/// hold only once it lags by more than a few versions (each move is a write), so a merge by another
/// process can leave retired parts behind for a while. An explicit pass moves it however little it lags,
/// and collects them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_maintenance_pass_collects_what_another_process_retired_however_little_its_hold_lags() {
    let stores = Stores::new(Backend::Embedded, &mut None).unwrap();
    let config = ShardConfig { background_maintenance: false, ..quick_config() };
    let (reader, merger) = (stores.open(config.clone()).await, stores.open(config).await);
    let id = user(1);
    reader.create_collection(id, int_desc()).await.unwrap();
    for t in 0..8u64 {
        reader.append(vec![append(id, vec![(int_row(t as i64), t, 1)], t, t + 1)]).await.unwrap();
    }
    // The reader's hold is now at the version it read.
    assert_eq!(reader.snapshot(id, 7).await.unwrap().len(), 8);
    let merged = merger.maintain(id, false).await.unwrap();
    assert!(merged.merges > 0, "{merged:?}");
    let state = merger.state(id).await.unwrap().unwrap();
    assert!(!state.retired.is_empty(), "the reader's hold keeps the merged parts: {merged:?}");
    assert!(state.seqno - state.gc_floor() <= 16, "the hold lags by a few versions only");
    let collected = reader.maintain(id, false).await.unwrap();
    let state = reader.state(id).await.unwrap().unwrap();
    assert!(state.retired.is_empty(), "{collected:?}");
    let listed: BTreeSet<String> =
        reader.blob().list("u1").await.unwrap().into_iter().map(|m| m.key).collect();
    let live: BTreeSet<String> = state.batches.iter().flat_map(|b| &b.parts).map(|p| p.key.clone()).collect();
    assert_eq!(listed, live, "the blob store holds the live parts and nothing else");
    assert_eq!(reader.snapshot(id, 7).await.unwrap().len(), 8);
}
