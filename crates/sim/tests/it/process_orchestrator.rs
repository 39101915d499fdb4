//! The controller's `ProcessOrchestrator` with real `compute-replica` processes on loopback: the events it
//! reports, the restart of a killed replica on the same address with a doubling backoff that starts over
//! once the replica ran stably, a two-process replica restarted as a whole, a replica whose worker panics
//! or whose I/O thread panics exiting on its own to be restarted, and dropping a replica killing its
//! processes. Also `compute-replica`'s flags (bad ones exit with status 2 and say why) and a replica that
//! opens the shards from the URLs the orchestrator gives it.
//!
//! These tests live here, not in the controller crate, because only `sim` can build the binary: the
//! cluster scenario's `binaries` helper (`sim::cluster::processes`) runs `cargo build` for
//! the profile of the running executable, a no-op when the binaries are fresh. The replicas open shards in
//! a temporary directory (blob files and a SQLite consensus). Every connection is secured as in the cluster
//! scenario (TLS with a throwaway CA and a shared secret, `sim::cluster::security`). Every wait is bounded.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use controller::{
    Orchestrator, ProcessEvent, ProcessOrchestrator, ProcessOrchestratorConfig, ReplicaSpec, ReplicaStorage,
};
use protocol::{InstanceId, ReplicaId};
use sim::cluster::processes;
use sim::cluster::security::ClusterSecurity;
use tokio::sync::mpsc::UnboundedReceiver;

const INSTANCE: InstanceId = InstanceId(1);
const INITIAL_BACKOFF_MS: u64 = 50;
/// Also how long a replica must run for its backoff to start over.
const MAX_BACKOFF_MS: u64 = 1_000;
/// How long to wait for any one process event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds (when stale) and finds `compute-replica`.
async fn compute_replica() -> PathBuf {
    tokio::task::spawn_blocking(|| {
        let layout = processes::Layout::of_current_exe().expect("the test's layout");
        let say = |message: &str| tracing::info!("{message}");
        processes::binaries(&layout, &say).expect("compute-replica is built").compute_replica
    })
    .await
    .expect("build task")
}

/// The tests' certificates and secret (made once, in a directory that lives as long as the tests).
fn security() -> &'static ClusterSecurity {
    static SECURITY: OnceLock<(tempfile::TempDir, ClusterSecurity)> = OnceLock::new();
    let (_, security) = SECURITY.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let security = ClusterSecurity::generate(&dir.path().join("security"), false).expect("certificates");
        (dir, security)
    });
    security
}

/// Shards in a temporary directory that lives as long as the tests (the replicas here create nothing in
/// them; they only open them).
fn shards() -> ReplicaStorage {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("a temporary directory"));
    let (blob, consensus) = storage::embedded_urls(dir.path());
    ReplicaStorage::shards(&blob, &consensus).expect("valid URLs")
}

async fn orchestrator() -> (ProcessOrchestrator, UnboundedReceiver<ProcessEvent>) {
    orchestrator_with_env(Vec::new()).await
}

/// An orchestrator whose children get `env` besides `RUST_LOG`.
async fn orchestrator_with_env(
    env: Vec<(String, String)>,
) -> (ProcessOrchestrator, UnboundedReceiver<ProcessEvent>) {
    let config = ProcessOrchestratorConfig {
        binary: compute_replica().await,
        storage: shards(),
        security: security().replicas(),
        initial_backoff_ms: INITIAL_BACKOFF_MS,
        max_backoff_ms: MAX_BACKOFF_MS,
        env: [vec![("RUST_LOG".to_string(), "warn".to_string())], env].concat(),
        log_dir: None,
        metrics: false,
    };
    ProcessOrchestrator::new(config)
}

async fn next_event(events: &mut UnboundedReceiver<ProcessEvent>) -> ProcessEvent {
    tokio::time::timeout(EVENT_TIMEOUT, events.recv())
        .await
        .unwrap_or_else(|_| panic!("no process event within {EVENT_TIMEOUT:?}"))
        .expect("the orchestrator's event channel is open")
}

/// The pids of the next event, which must be `Running` for `replica`.
async fn running(events: &mut UnboundedReceiver<ProcessEvent>, replica: ReplicaId) -> Vec<u32> {
    match next_event(events).await {
        ProcessEvent::Running { instance, replica: r, pids } if instance == INSTANCE && r == replica => pids,
        other => panic!("expected {replica} running, got {other:?}"),
    }
}

/// The backoff of the next event, which must be `Crashed` for `replica` (killed by SIGKILL).
async fn crashed(events: &mut UnboundedReceiver<ProcessEvent>, replica: ReplicaId) -> u64 {
    match next_event(events).await {
        ProcessEvent::Crashed { instance, replica: r, status, restart_in_ms }
            if instance == INSTANCE && r == replica =>
        {
            assert!(status.contains('9'), "{replica} exited with {status}, not by SIGKILL");
            restart_in_ms
        }
        other => panic!("expected {replica} crashed, got {other:?}"),
    }
}

fn kill(pid: u32) {
    let status =
        std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().expect("run kill");
    assert!(status.success(), "kill -9 {pid}: {status}");
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits (up to about 10 s) until `address` accepts TCP connections.
async fn wait_until_listening(address: &str) {
    for _ in 0..1_000 {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{address} did not accept connections within about 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_restarts_in_place_after_a_doubling_backoff_that_resets_once_it_ran_stably() {
    let (orchestrator, mut events) = orchestrator().await;
    let replica = ReplicaId(1);
    let spec = ReplicaSpec { instance: INSTANCE, replica, workers: 1, processes: 1 };
    let addresses = orchestrator.ensure_replica(spec.clone()).await.expect("ensure replica");
    assert_eq!(addresses.len(), 1);
    let mut pids = running(&mut events, replica).await;
    assert_eq!(pids.len(), 1);
    assert_eq!(orchestrator.pids(INSTANCE, replica), pids);
    wait_until_listening(&addresses[0]).await;

    // Crashes in a row, each right after the restart: the backoff doubles.
    for expected_backoff_ms in [INITIAL_BACKOFF_MS, 2 * INITIAL_BACKOFF_MS, 4 * INITIAL_BACKOFF_MS] {
        kill(pids[0]);
        assert_eq!(crashed(&mut events, replica).await, expected_backoff_ms);
        let restarted = running(&mut events, replica).await;
        assert_eq!(restarted.len(), 1);
        assert_ne!(restarted, pids, "the restart reported the killed process");
        assert!(!alive(pids[0]), "the killed process {} was not reaped", pids[0]);
        pids = restarted;
    }
    assert_eq!(orchestrator.pids(INSTANCE, replica), pids);
    assert_eq!(
        orchestrator.ensure_replica(spec).await.expect("ensure again"),
        addresses,
        "the address moved"
    );
    wait_until_listening(&addresses[0]).await;

    // Having run longer than the longest backoff, the replica's next crash waits the initial backoff again.
    tokio::time::sleep(Duration::from_millis(MAX_BACKOFF_MS + 200)).await;
    kill(pids[0]);
    assert_eq!(crashed(&mut events, replica).await, INITIAL_BACKOFF_MS, "the backoff did not start over");
    pids = running(&mut events, replica).await;

    orchestrator.drop_replica(INSTANCE, replica).await.expect("drop replica");
    assert!(!alive(pids[0]), "process {} outlived its dropped replica", pids[0]);
    assert!(orchestrator.pids(INSTANCE, replica).is_empty());
    // Dropped, it is not restarted: no event comes.
    let after = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
    assert!(after.is_err(), "an event after the drop: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_process_replica_reports_both_pids_and_restarts_both_when_one_is_killed() {
    let (orchestrator, mut events) = orchestrator().await;
    let replica = ReplicaId(2);
    let spec = ReplicaSpec { instance: INSTANCE, replica, workers: 1, processes: 2 };
    let addresses = orchestrator.ensure_replica(spec).await.expect("ensure replica");
    assert_eq!(addresses.len(), 2);
    assert_ne!(addresses[0], addresses[1]);
    let pids = running(&mut events, replica).await;
    assert_eq!(pids.len(), 2);
    assert_ne!(pids[0], pids[1]);
    assert!(pids.iter().all(|pid| alive(*pid)), "{pids:?}");

    kill(pids[0]);
    assert_eq!(crashed(&mut events, replica).await, INITIAL_BACKOFF_MS);
    let restarted = running(&mut events, replica).await;
    assert_eq!(restarted.len(), 2);
    assert!(restarted.iter().all(|pid| !pids.contains(pid)), "{restarted:?} reuses one of {pids:?}");
    assert!(!alive(pids[1]), "the surviving process {} was not stopped with the killed one", pids[1]);
    for address in &addresses {
        wait_until_listening(address).await;
    }

    orchestrator.drop_replica(INSTANCE, replica).await.expect("drop replica");
    for pid in restarted {
        assert!(!alive(pid), "process {pid} outlived its dropped replica");
    }
}

/// Sends `commands` to the replica at `address` after the handshake (TLS, the secret, the Hello), on a
/// connection that stays open until the replica closes it; returns once it has (or panics after 10 s).
async fn send_until_closed(address: &str, commands: Vec<protocol::ComputeCommand>) {
    use protocol::frame::DEFAULT_MAX_FRAME_BYTES;
    let client = security().client().expect("client security");
    let stream = tokio::net::TcpStream::connect(address).await.expect("connect");
    let (mut input, mut output) =
        client.connect(stream, address, protocol::AUTH_SERVICE).await.expect("authenticated");
    input.set_max_frame_bytes(DEFAULT_MAX_FRAME_BYTES);
    output.set_max_frame_bytes(DEFAULT_MAX_FRAME_BYTES);
    let hello = protocol::ComputeCommand::<u64>::Hello {
        version: protocol::PROTOCOL_VERSION,
        nonce: 1,
        epoch: protocol::ControllerEpoch(1),
        session: 1,
    };
    // Writes may fail once the replica is gone; the wait below is what the test checks.
    let _ = output.send(&hello).await;
    for command in &commands {
        let _ = output.send(command).await;
    }
    let closed = async { while input.recv::<protocol::ComputeResponse>().await.is_ok() {} };
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the replica closes the connection within 10 s");
}

/// The commands of a controller that installs an index named for the replica's fault injection, so that
/// building it panics a worker (its multiplicities, a constant row `i64::MAX` times joined with itself,
/// overflow `i64`, which is only an error).
fn panicking_index() -> Vec<protocol::ComputeCommand> {
    use protocol::{
        BuildDesc, ColumnType, ComputeCommand, DataflowDescription, Datum, GlobalId, IndexExport,
        InstanceConfig, Plan, RelationType, Row, ScalarType,
    };
    let typ = RelationType::new(vec![ColumnType::new(ScalarType::Int64, false)]);
    let huge = Plan::Constant { rows: vec![(Row::pack([Datum::Int64(1)]), i64::MAX)], typ };
    // The replica's fault injection (debug builds): a dataflow of this name panics its worker.
    let mut dataflow = DataflowDescription::new("compute test: a worker panics building this dataflow");
    let object = GlobalId::Transient(1);
    dataflow.objects_to_build.push(BuildDesc {
        id: object,
        plan: Plan::Join { inputs: vec![huge.clone(), huge], equivalences: Vec::new() },
    });
    let index = GlobalId::User(1);
    dataflow.index_exports.insert(index, IndexExport { on_id: object, key: vec![0] });
    dataflow.as_of = Some(frontiers::Antichain::from_elem(0));
    vec![
        ComputeCommand::CreateInstance(InstanceConfig { instance_id: INSTANCE, replica_id: ReplicaId(3) }),
        ComputeCommand::InitializationComplete,
        ComputeCommand::CreateDataflow(dataflow),
        ComputeCommand::Schedule(index),
    ]
}

// A process whose worker panics cannot answer for that worker's share any more: it exits with a failure
// status (not a signal), and the orchestrator restarts it like any crashed replica. Nothing a controller
// sends panics a worker (overflowing multiplicities are errors), so the replica's fault injection stands in
// for a bug; it exists in debug builds only (these binaries are built with the test's profile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_worker_panics_exits_with_a_failure_status_and_is_restarted() {
    let fault_injection = cfg!(debug_assertions);
    let (orchestrator, mut events) = orchestrator().await;
    let replica = ReplicaId(3);
    let spec = ReplicaSpec { instance: INSTANCE, replica, workers: 2, processes: 1 };
    let addresses = orchestrator.ensure_replica(spec).await.expect("ensure replica");
    let pids = running(&mut events, replica).await;
    wait_until_listening(&addresses[0]).await;
    if !fault_injection {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(alive(pids[0]), "without fault injection nothing panics the replica");
        orchestrator.drop_replica(INSTANCE, replica).await.expect("drop replica");
        return;
    }
    let address = addresses[0].clone();
    send_until_closed(&address, panicking_index()).await;
    match next_event(&mut events).await {
        ProcessEvent::Crashed { replica: r, status, restart_in_ms, .. } if r == replica => {
            assert!(status.contains("exit status: 1"), "{status}");
            assert_eq!(restart_in_ms, INITIAL_BACKOFF_MS);
        }
        other => panic!("expected {replica} crashed, got {other:?}"),
    }
    let restarted = running(&mut events, replica).await;
    assert_ne!(restarted, pids);
    wait_until_listening(&addresses[0]).await;
    orchestrator.drop_replica(INSTANCE, replica).await.expect("drop replica");
}

// A process whose I/O thread panics has lost its connection handling: it must not linger with its
// listener closed, but exit with a failure status for the orchestrator to restart it. The panic is
// injected (`compute::FAULT_ENV`, honoured by debug builds only; these binaries are built with the
// test's profile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_io_thread_panics_exits_with_a_failure_status_and_is_restarted() {
    let fault = (compute::FAULT_ENV.to_string(), compute::FAULT_IO_PANIC_ON_CONNECT.to_string());
    let (orchestrator, mut events) = orchestrator_with_env(vec![fault]).await;
    let replica = ReplicaId(4);
    let spec = ReplicaSpec { instance: INSTANCE, replica, workers: 1, processes: 1 };
    let addresses = orchestrator.ensure_replica(spec).await.expect("ensure replica");
    let pids = running(&mut events, replica).await;
    wait_until_listening(&addresses[0]).await;
    if !cfg!(debug_assertions) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(alive(pids[0]), "a release build ignores the injected fault");
        orchestrator.drop_replica(INSTANCE, replica).await.expect("drop replica");
        return;
    }
    let address = addresses[0].clone();
    send_until_closed(&address, Vec::new()).await;
    match next_event(&mut events).await {
        ProcessEvent::Crashed { replica: r, status, restart_in_ms, .. } if r == replica => {
            assert!(status.contains("exit status: 1"), "{status}");
            assert_eq!(restart_in_ms, INITIAL_BACKOFF_MS);
        }
        other => panic!("expected {replica} crashed, got {other:?}"),
    }
    assert!(!alive(pids[0]), "the process whose I/O thread panicked is gone");
    let restarted = running(&mut events, replica).await;
    assert_ne!(restarted, pids);
    wait_until_listening(&addresses[0]).await;
    orchestrator.drop_replica(INSTANCE, replica).await.expect("drop replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_replica_refuses_missing_conflicting_or_malformed_storage_flags_with_status_2() {
    let binary = compute_replica().await;
    let shards = ["--blob", "file:///b", "--consensus", "sqlite:///c"];
    let with_shards = |more: &[&'static str]| -> Vec<&'static str> { [&shards[..], more].concat() };
    let cases: [(Vec<&str>, &str); 10] = [
        (with_shards(&["--shard-poll-interval-ms", "0"]), "not in 1..=60000"),
        (with_shards(&["--shard-part-cache-bytes", "1000"]), "the cache could not keep a part"),
        (with_shards(&["--shard-inline-part-bytes", "100000"]), "above max_inline_bytes 65536"),
        (with_shards(&["--shard-inline-part-bytes", "2000000"]), "not in 0..=1048576"),
        (vec![], "--blob <URL>"),
        (vec!["--blob", "file:///b"], "--consensus <URL>"),
        (vec!["--blob", "ftp://b", "--consensus", "sqlite:///c"], "unknown blob scheme \"ftp\""),
        (with_shards(&["--workers", "0"]), "must be at least 1"),
        (with_shards(&["--process", "2", "--addresses", "a:1,b:2"]), "--process 2 is out of range"),
        // The storage server is retired: its flag is refused, not ignored.
        (with_shards(&["--storage", "127.0.0.1:1"]), "unexpected argument '--storage'"),
    ];
    for (flags, expected) in cases {
        let output = tokio::process::Command::new(&binary)
            .args(["--listen", "127.0.0.1:0"])
            .args(&flags)
            .env_remove("COMPUTE_BLOB_URL")
            .env_remove("COMPUTE_CONSENSUS_URL")
            .env_remove("COMPUTE_SHARD_POLL_INTERVAL_MS")
            .env_remove("COMPUTE_SHARD_PART_CACHE_BYTES")
            .env_remove("COMPUTE_SHARD_INLINE_PART_BYTES")
            .output()
            .await
            .expect("compute-replica runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_shards_gets_its_urls_from_the_orchestrator_opens_them_and_serves_the_engines_metrics() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (blob, consensus) = storage::embedded_urls(dir.path());
    let (orchestrator, mut events) = ProcessOrchestrator::new(ProcessOrchestratorConfig {
        binary: compute_replica().await,
        storage: ReplicaStorage::shards(&blob, &consensus).expect("valid URLs"),
        initial_backoff_ms: INITIAL_BACKOFF_MS,
        max_backoff_ms: MAX_BACKOFF_MS,
        env: vec![("RUST_LOG".to_string(), "warn".to_string())],
        log_dir: None,
        metrics: true,
        security: security().replicas(),
    });
    let replica = ReplicaId(1);
    let spec = ReplicaSpec { instance: INSTANCE, replica, workers: 1, processes: 1 };
    let addresses = orchestrator.ensure_replica(spec).await.expect("started");
    let metrics_addr = *orchestrator.metrics_addresses(INSTANCE, replica).first().expect("a metrics address");
    running(&mut events, replica).await;
    // It listens (so it opened both stores: it only starts its server after that) ...
    let address = addresses[0].clone();
    let connected = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            if tokio::net::TcpStream::connect(&address).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    connected.await.expect("the replica listens");
    // ... and it opened the very stores it was given: the SQLite file exists now.
    assert!(dir.path().join("consensus.db").is_file());
    // It runs (a store it could not open would have made it exit, reported as a crash).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(events.try_recv().is_err(), "the replica on shards crashed");
    // Its shard engine records into the process's registry (what each event adds is storage's
    // `shard_metrics` test; an idle replica has done no storage operation yet).
    let page =
        tokio::task::spawn_blocking(move || telemetry::scrape(metrics_addr, "/metrics", EVENT_TIMEOUT))
            .await
            .expect("scrape task")
            .expect("the replica serves its metrics");
    let samples = telemetry::parse_text(&page.body).expect("the exposition parses");
    for family in
        ["storage_appends_total", "storage_consensus_operation_seconds_count", "storage_cas_conflicts_total"]
    {
        assert!(samples.iter().any(|s| s.name == family), "no {family}:\n{}", page.body);
    }
    assert!(page.body.contains("compute_replica_dataflows"), "the replica's own metrics are there too");
    orchestrator.drop_replica(INSTANCE, replica).await.expect("dropped");
}
