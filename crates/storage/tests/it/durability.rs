//! Durability: a child process (this test binary, re-executed) appends in a loop and records every
//! acknowledged append; the test SIGKILLs it at random moments, reopens the data directory and checks that
//! every acknowledged append is there, that no append is half there (each writes several rows to two
//! collections atomically), and that uppers never regress. Also: a torn or corrupt last record at every byte
//! offset is cut off and the prefix kept; checkpoints bound what a restart replays; damage that would lose
//! acknowledged data refuses to open.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use frontiers::ReadPolicy;
use protocol::Row;
use storage::core::Store;
use storage::durable::wal::{LogRecordRef, encode_record};
use storage::durable::{DataDir, IoFaults, OpenError};
use storage::{InProcess, StorageCollections, StoreConfig};

use crate::*;
use test_support::XorShift;

const CHILD_DIR: &str = "STORAGE_CRASH_CHILD_DIR";
const CHILD_ACKS: &str = "STORAGE_CRASH_CHILD_ACKS";
const WRITERS: u64 = 4;
const ROWS_PER_APPEND: i64 = 3;
const KILLS: usize = 22;

/// A row of the crash tests' writers, padded (see `crate::crash_row`).
fn crash_row(writer: u64, seq: u64, part: i64) -> Row {
    crate::crash_row(writer, seq, part, "padding padding padding padding padding padding padding padding")
}

fn crash_config() -> StoreConfig {
    // Small checkpoints, so kills also land during checkpoints.
    StoreConfig { checkpoint_after_log_bytes: 48 << 10, ..StoreConfig::default() }
}

/// Collections `A_w` and `B_w` of writer `w`.
fn pair(writer: u64) -> (protocol::GlobalId, protocol::GlobalId) {
    (user(2 * writer), user(2 * writer + 1))
}

/// The child's body: runs only when the parent test sets the environment; otherwise it has nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_process_appends_until_it_is_killed_when_asked_to() {
    let (Ok(dir), Ok(acks)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_ACKS)) else {
        return;
    };
    let store = InProcess::open(Path::new(&dir), crash_config()).expect("child opens the store");
    let acks = Arc::new(OpenOptions::new().create(true).append(true).open(acks).expect("ack file"));
    // Writers run until the parent kills the process; the first failure ends the process instead.
    let (failures, mut failed) = tokio::sync::mpsc::unbounded_channel();
    for w in 0..WRITERS {
        let store = store.clone();
        let acks = Arc::clone(&acks);
        let failures = failures.clone();
        tokio::spawn(async move {
            let (a, b) = pair(w);
            for id in [a, b] {
                store.create_collection(id, crash_desc()).await.expect("create");
                store
                    .set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 3, granularity_ms: 0 })
                    .await
                    .expect("policy");
            }
            let mut seq = *store.frontiers(a).await.unwrap().upper.as_option().unwrap();
            loop {
                let rows: Vec<_> = (0..ROWS_PER_APPEND).map(|p| (crash_row(w, seq, p), seq, 1)).collect();
                let result = store
                    .append(vec![append(a, rows.clone(), seq, seq + 1), append(b, rows, seq, seq + 1)])
                    .await;
                if let Err(error) = result {
                    let _ = failures.send(format!("writer {w}: {error}"));
                    return;
                }
                // One write(2) per line on an O_APPEND file: lines never interleave, and a SIGKILL cannot
                // lose a line that was written (the kernel has it).
                (&*acks).write_all(format!("{w} {seq}\n").as_bytes()).expect("ack");
                seq += 1;
            }
        });
    }
    let failure = failed.recv().await;
    panic!("a child writer failed: {failure:?}");
}

fn read_acks(path: &Path, acked: &mut BTreeMap<u64, BTreeSet<u64>>) {
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    for line in text.lines() {
        let mut words = line.split(' ');
        let (Some(w), Some(seq)) = (words.next(), words.next()) else {
            panic!("malformed ack line {line:?}");
        };
        acked.entry(w.parse().unwrap()).or_default().insert(seq.parse().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_appends_lose_nothing_acknowledged_and_apply_nothing_by_half() {
    let base = tempfile::tempdir().unwrap();
    let data = base.path().join("data");
    let seed = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mut rng = XorShift::new(seed);
    let mut acked: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut last_uppers: BTreeMap<u64, u64> = BTreeMap::new();
    let mut total_acks = 0usize;
    for run in 0..KILLS {
        let acks = base.path().join(format!("acks-{run}"));
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "durability::a_child_process_appends_until_it_is_killed_when_asked_to",
                "--exact",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, &data)
            .env(CHILD_ACKS, &acks)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = if run == 0 { 400 } else { 40 + rng.next() % 260 };
        tokio::time::sleep(Duration::from_millis(delay)).await;
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "seed {seed:#x} run {run}: the child must die by the kill, not exit: {status:?}"
        );

        read_acks(&acks, &mut acked);
        let store = InProcess::open(&data, crash_config()).unwrap();
        for w in 0..WRITERS {
            let (a, b) = pair(w);
            let (Ok(fa), Ok(fb)) = (store.frontiers(a).await, store.frontiers(b).await) else {
                assert!(
                    acked.get(&w).is_none_or(BTreeSet::is_empty),
                    "seed {seed:#x} run {run}: writer {w} lost its collections"
                );
                continue;
            };
            let upper = *fa.upper.as_option().unwrap();
            assert_eq!(fa.upper, fb.upper, "seed {seed:#x} run {run}: atomic appends keep both uppers equal");
            let previous = last_uppers.get(&w).copied().unwrap_or(0);
            assert!(
                upper >= previous,
                "seed {seed:#x} run {run}: upper of writer {w} regressed from {previous} to {upper}"
            );
            last_uppers.insert(w, upper);
            if let Some(max_acked) = acked.get(&w).and_then(|s| s.last()) {
                assert!(
                    *max_acked < upper,
                    "seed {seed:#x} run {run}: acknowledged seq {max_acked} of writer {w} is missing (upper {upper})"
                );
            }
            if upper == 0 {
                continue;
            }
            let contents_a = store.snapshot(a, upper - 1).await.unwrap();
            let contents_b = store.snapshot(b, upper - 1).await.unwrap();
            assert_eq!(contents_a, contents_b, "seed {seed:#x} run {run}: writer {w}'s collections differ");
            let expected: Vec<_> = {
                let mut rows: Vec<_> = (0..upper)
                    .flat_map(|seq| (0..ROWS_PER_APPEND).map(move |p| (crash_row(w, seq, p), 1)))
                    .collect();
                rows.sort();
                rows
            };
            assert_eq!(
                contents_a.len(),
                expected.len(),
                "seed {seed:#x} run {run}: writer {w} has a gap or a half append"
            );
            assert_eq!(contents_a, expected, "seed {seed:#x} run {run}: writer {w}");
        }
        store.shutdown().await;
        total_acks = acked.values().map(BTreeSet::len).sum();
    }
    assert!(total_acks >= 100, "seed {seed:#x}: only {total_acks} appends were acknowledged in {KILLS} runs");
}

/// Applies the records the torn-tail test logs to a store, the way recovery does.
fn apply(store: &mut Store, step: usize) {
    let id = user(1);
    match step {
        0 => drop(store.create_collection(id, int_desc()).unwrap()),
        1..=3 => {
            let t = step as u64 - 1;
            let rows = (0..4).map(|x| (int_row(x * 10 + t as i64), t, 1)).collect();
            store.append(vec![append(id, rows, t, t + 1)]).unwrap();
        }
        _ => store.set_read_policy(id, ReadPolicy::ValidFrom(at(2))).unwrap(),
    }
    store.process_holds();
}

fn encode(step: usize, out: &mut Vec<u8>) {
    let id = user(1);
    let desc = int_desc();
    let policy = ReadPolicy::ValidFrom(at(2));
    match step {
        0 => encode_record(&LogRecordRef::Create { id, desc: &desc }, out).unwrap(),
        1..=3 => {
            let t = step as u64 - 1;
            let rows = (0..4).map(|x| (int_row(x * 10 + t as i64), t, 1)).collect();
            encode_record(&LogRecordRef::Append(&[append(id, rows, t, t + 1)]), out).unwrap();
        }
        _ => encode_record(&LogRecordRef::Policy { id, policy: &policy }, out).unwrap(),
    }
}

fn noop() -> Arc<dyn Fn() + Send + Sync> {
    Arc::new(|| {})
}

#[test]
fn a_torn_or_corrupt_last_record_is_cut_off_at_every_byte_offset() {
    const STEPS: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let (mut data_dir, _, _) = DataDir::open(dir.path(), IoFaults::new(), noop()).unwrap();
    let segment = data_dir.active_segment();
    let mut ends = Vec::new();
    let mut total = 0;
    for step in 0..STEPS {
        let mut bytes = Vec::new();
        encode(step, &mut bytes);
        data_dir.commit(&bytes).unwrap();
        total += bytes.len();
        ends.push(total);
    }
    data_dir.close().unwrap();
    let full = fs::read(&segment).unwrap();
    assert_eq!(full.len(), total);
    let state_after = |steps: usize| {
        let mut store = Store::new();
        (0..steps).for_each(|step| apply(&mut store, step));
        store.to_checkpoint()
    };
    let prefix = state_after(STEPS - 1);
    let last_start = ends[STEPS - 2];

    let reopen = |bytes: &[u8]| {
        fs::write(&segment, bytes).unwrap();
        let (data_dir, mut store, report) = DataDir::open(dir.path(), IoFaults::new(), noop()).unwrap();
        data_dir.close().unwrap();
        // Recovery holds every collection at its logged since (none is logged here) for the clients to
        // come back; once they are released the since is the one the replayed policy sets.
        assert!(store.in_recovery());
        store.end_recovery();
        store.process_holds();
        (store.to_checkpoint(), report)
    };
    for cut in last_start..full.len() {
        let (state, report) = reopen(&full[..cut]);
        assert_eq!(state, prefix, "cut at {cut}");
        assert_eq!(report.truncated_bytes, (cut - last_start) as u64, "cut at {cut}");
        assert_eq!(
            fs::metadata(&segment).unwrap().len(),
            last_start as u64,
            "cut at {cut}: the tail is truncated"
        );
    }
    for offset in last_start..full.len() {
        let mut corrupt = full.clone();
        corrupt[offset] ^= 0x5a;
        let (state, report) = reopen(&corrupt);
        assert_eq!(state, prefix, "corrupt byte at {offset}");
        assert_eq!(report.truncated_bytes, (full.len() - last_start) as u64, "corrupt byte at {offset}");
    }
    // After a cut, appends continue where the prefix ends and survive a restart.
    fs::write(&segment, &full[..last_start + 3]).unwrap();
    let (mut data_dir, _, _) = DataDir::open(dir.path(), IoFaults::new(), noop()).unwrap();
    let mut bytes = Vec::new();
    encode(STEPS - 1, &mut bytes);
    data_dir.commit(&bytes).unwrap();
    data_dir.close().unwrap();
    let (state, report) = reopen(&fs::read(&segment).unwrap());
    assert_eq!(state, state_after(STEPS));
    assert_eq!(report.truncated_bytes, 0);
}

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn checkpoints_bound_what_a_restart_replays() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { checkpoint_after_log_bytes: 4 << 10, ..StoreConfig::default() };
    let id = user(1);
    let store = InProcess::open(dir.path(), config.clone()).unwrap();
    store.create_collection(id, int_desc()).await.unwrap();
    store.set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 2, granularity_ms: 0 }).await.unwrap();
    // 400 appends that insert and retract the same 10 rows: compacted, the live data is tiny.
    for t in 0..400u64 {
        let x = (t % 10) as i64;
        let updates =
            if t < 10 { vec![(int_row(x), t, 1)] } else { vec![(int_row(x), t, -1), (int_row(x), t, 1)] };
        store.append(vec![append(id, updates, t, t + 1)]).await.unwrap();
    }
    let before = store.snapshot(id, 399).await.unwrap();
    assert!(store.durability_stats().unwrap().checkpoints > 0);
    store.shutdown().await;
    assert_eq!(files(dir.path(), "checkpoint-").len(), 1, "older checkpoints are deleted");
    assert!(files(dir.path(), "wal-").len() <= 2, "segments before the checkpoint are deleted");

    let store = InProcess::open(dir.path(), config.clone()).unwrap();
    let report = store.recovery_report().unwrap().clone();
    assert!(report.checkpoint.is_some());
    assert!(report.records_replayed < 200, "{report:?}");
    assert_eq!(store.snapshot(id, 399).await.unwrap(), before);
    assert_eq!(store.frontiers(id).await.unwrap().upper, at(400));
    // An explicit checkpoint leaves nothing to replay.
    store.checkpoint().await.unwrap();
    store.shutdown().await;
    let store = InProcess::open(dir.path(), config).unwrap();
    assert!(store.recovery_report().unwrap().records_replayed <= 1, "{:?}", store.recovery_report());
    assert_eq!(store.snapshot(id, 399).await.unwrap(), before);
    assert!(store.with_core(|core| core.stored_updates(id).unwrap()) <= 10 + 2 * 3);
    store.shutdown().await;
}

#[tokio::test]
async fn a_store_that_is_never_idle_still_checkpoints() {
    // A writer that keeps 16 appends outstanding: the committer always has the next one waiting, so a
    // checkpoint that waited for an idle moment might never come. Each append logs well under 200 bytes,
    // so with a 4 KiB threshold a checkpoint is due at least every 4 KiB + 16 * 200 bytes of log.
    const APPENDS: u64 = 2_000;
    const WINDOW: usize = 16;
    let threshold: u64 = 4 << 10;
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { checkpoint_after_log_bytes: threshold, ..StoreConfig::default() };
    let id = user(1);
    let store = InProcess::open(dir.path(), config.clone()).unwrap();
    store.create_collection(id, int_desc()).await.unwrap();
    let mut outstanding: futures::stream::FuturesOrdered<_> = futures::stream::FuturesOrdered::new();
    for t in 0..APPENDS {
        if outstanding.len() == WINDOW {
            let result: Result<(), storage::AppendError> =
                futures::StreamExt::next(&mut outstanding).await.unwrap();
            result.unwrap();
        }
        outstanding.push_back(store.append(vec![append(id, vec![(int_row(t as i64), t, 1)], t, t + 1)]));
    }
    while let Some(result) = futures::StreamExt::next(&mut outstanding).await {
        result.unwrap();
    }
    let stats = store.durability_stats().unwrap();
    let due = stats.bytes / (threshold + WINDOW as u64 * 200);
    assert!(stats.checkpoints >= due, "{stats:?}: at least {due} checkpoints were due");
    store.shutdown().await;
    let store = InProcess::open(dir.path(), config).unwrap();
    let report = store.recovery_report().unwrap().clone();
    assert!(report.records_replayed < 200, "{report:?}");
    assert_eq!(store.snapshot(id, APPENDS - 1).await.unwrap().len(), APPENDS as usize);
    store.shutdown().await;
}

#[tokio::test]
async fn damage_that_would_lose_acknowledged_data_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let id = user(1);
    let store = InProcess::open(dir.path(), StoreConfig::default()).unwrap();
    store.create_collection(id, int_desc()).await.unwrap();
    store.append(vec![append(id, vec![(int_row(1), 0, 1)], 0, 1)]).await.unwrap();
    store.checkpoint().await.unwrap();
    store.append(vec![append(id, vec![(int_row(2), 1, 1)], 1, 2)]).await.unwrap();
    store.checkpoint().await.unwrap();
    store.append(vec![append(id, vec![(int_row(3), 2, 1)], 2, 3)]).await.unwrap();
    store.shutdown().await;

    // A damaged checkpoint.
    let checkpoint = files(dir.path(), "checkpoint-").pop().unwrap();
    let good = fs::read(&checkpoint).unwrap();
    let mut bad = good.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 1;
    fs::write(&checkpoint, &bad).unwrap();
    assert!(matches!(InProcess::open(dir.path(), StoreConfig::default()), Err(OpenError::Corrupt { .. })));
    fs::write(&checkpoint, &good).unwrap();

    // A damaged segment that is not the last one: put a bad segment before the active one.
    let segments = files(dir.path(), "wal-");
    let last = segments.last().unwrap().clone();
    let name = last.file_name().unwrap().to_string_lossy().into_owned();
    let seq: u64 = name.trim_start_matches("wal-").trim_end_matches(".log").parse().unwrap();
    let next = dir.path().join(format!("wal-{:020}.log", seq + 1));
    fs::write(&next, b"").unwrap();
    let mut torn = fs::read(&last).unwrap();
    torn.truncate(torn.len() - 1);
    fs::write(&last, &torn).unwrap();
    assert!(matches!(InProcess::open(dir.path(), StoreConfig::default()), Err(OpenError::Corrupt { .. })));
    fs::remove_file(&next).unwrap();
    // As the last segment, the same damage is a torn tail: cut off, the rest kept.
    let store = InProcess::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(store.frontiers(id).await.unwrap().upper, at(2));
    assert_eq!(store.snapshot(id, 1).await.unwrap(), vec![(int_row(1), 1), (int_row(2), 1)]);
    store.shutdown().await;
}
