//! Observability with real tools: a `compute-replica` process started with `--metrics-addr` (by the
//! process orchestrator, as `sim cluster` starts them) and a controller whose registry is served as
//! `sim cluster` serves it are scraped over HTTP while they run, and `promtool check metrics` accepts both
//! expositions; a dropped collection leaves no series at the controller's endpoint; the replica's log lines
//! about a dataflow carry its instance, replica and exports (its `tracing` span). And the report page,
//! rendered in headless Chromium: its screenshot has the size asked for, the fault marks and the status
//! bands (`sim::tools::check_screenshot`). The tools are installed from Debian's packages where missing
//! (`sim::tools::ensure_tool`); a test that cannot get them fails, it never skips.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use controller::{
    ComputeController, ControllerConfig, Orchestrator, ProcessOrchestrator, ProcessOrchestratorConfig,
    ReplicaLocation,
};
use frontiers::Antichain;
use protocol::{
    BuildDesc, ColumnType, DataflowDescription, Datum, GlobalId, IndexExport, InstanceId, PeekTarget, Plan,
    RelationDesc, ReplicaId, Row, ScalarType, SourceImport,
};
use sim::cluster::processes;
use sim::cluster::security::ClusterSecurity;
use sim::tools;
use storage::{AppendRequest, StorageCollections};
use telemetry::{Sample, parse_text, sample_value};

const INSTANCE: InstanceId = InstanceId(1);
const REPLICA: ReplicaId = ReplicaId(1);
const TABLE: GlobalId = GlobalId::User(1);
const INDEX: GlobalId = GlobalId::User(2);

fn kv_desc() -> RelationDesc {
    RelationDesc::new([
        ("k", ColumnType::new(ScalarType::Int64, false)),
        ("v", ColumnType::new(ScalarType::Int64, false)),
    ])
}

fn index(export: GlobalId) -> DataflowDescription<u64> {
    let object = GlobalId::Transient(export_number(export));
    let mut df = DataflowDescription::new(format!("index {export}"));
    df.source_imports.insert(TABLE, SourceImport { desc: kv_desc() });
    df.objects_to_build.push(BuildDesc { id: object, plan: Plan::get(TABLE) });
    df.index_exports.insert(export, IndexExport { on_id: object, key: vec![0] });
    df
}

fn export_number(id: GlobalId) -> u64 {
    match id {
        GlobalId::User(n) | GlobalId::System(n) | GlobalId::Transient(n) => n,
    }
}

/// Scrapes `addr` (blocking, off the runtime's threads) and checks the answer is a 200 with samples.
async fn scrape(addr: SocketAddr) -> (String, Vec<Sample>) {
    let page =
        tokio::task::spawn_blocking(move || telemetry::scrape(addr, "/metrics", Duration::from_secs(10)))
            .await
            .expect("scrape task")
            .unwrap_or_else(|e| panic!("cannot scrape {addr}: {e}"));
    assert_eq!(page.status, 200, "{addr}: {page:?}");
    let samples = parse_text(&page.body).expect("the exposition parses");
    (page.body, samples)
}

async fn promtool(exposition: String) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || tools::promtool_check(&exposition)).await.expect("promtool task")
}

/// Polls `scrape(addr)` until `check` holds (about 30 s at most).
async fn scrape_until(addr: SocketAddr, what: &str, check: impl Fn(&[Sample]) -> bool) -> String {
    let mut last = String::new();
    for _ in 0..300 {
        let (text, samples) = scrape(addr).await;
        if check(&samples) {
            return text;
        }
        last = text;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not seen at {addr}; last exposition:\n{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_replica_process_and_the_controller_serve_metrics_promtool_accepts() {
    // promtool itself is a real check: it refuses a broken exposition.
    assert!(promtool("compute_replica_dataflows{ 1\n".to_string()).await.is_err());

    let binary = tokio::task::spawn_blocking(|| {
        let layout = processes::Layout::of_current_exe().expect("the test's layout");
        processes::binaries(&layout, &|message: &str| tracing::info!("{message}"))
            .expect("built")
            .compute_replica
    })
    .await
    .expect("build task");
    // Secured as in the cluster scenario: TLS with a throwaway CA and a shared secret.
    let security_dir = tempfile::tempdir().expect("a temporary directory");
    let security =
        ClusterSecurity::generate(&security_dir.path().join("security"), false).expect("certificates");
    // Shards in a temporary directory, which this process (the controller) and the replica open.
    let (blob, consensus) = storage::embedded_urls(security_dir.path());
    let shards = storage::ShardCollections::open(
        &blob.parse().expect("blob url"),
        &consensus.parse().expect("consensus url"),
        storage::ShardConfig { critical_reader: Some("controller".to_string()), ..Default::default() },
    )
    .await
    .expect("open the shards");
    let storage: Arc<dyn StorageCollections> = Arc::new(shards);
    storage.create_collection(TABLE, kv_desc()).await.expect("table");
    let updates = (0..50).map(|k| (Row::pack([Datum::Int64(k), Datum::Int64(k)]), 0, 1)).collect();
    let append = AppendRequest {
        id: TABLE,
        updates,
        expected_upper: Antichain::from_elem(0),
        new_upper: Antichain::from_elem(1),
    };
    storage.append(vec![append]).await.expect("append");

    let log_dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("observability-logs-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).expect("log directory");
    let (orchestrator, _events) = ProcessOrchestrator::new(ProcessOrchestratorConfig {
        binary,
        storage: controller::ReplicaStorage::shards(&blob, &consensus).expect("shard urls"),
        security: security.replicas(),
        initial_backoff_ms: 100,
        max_backoff_ms: 1_000,
        env: vec![("RUST_LOG".to_string(), "info".to_string()), ("NO_COLOR".to_string(), "1".to_string())],
        log_dir: Some(log_dir.clone()),
        metrics: true,
    });
    let orchestrator = Arc::new(orchestrator);
    let config =
        ControllerConfig::new(controller::ControllerEpoch(1), security.client().expect("client security"));
    let mut controller = ComputeController::new(
        Arc::clone(&storage),
        Some(Arc::clone(&orchestrator) as Arc<dyn Orchestrator>),
        config,
    )
    .await
    .expect("controller");
    controller.create_instance(INSTANCE, controller.default_instance_config()).expect("instance");
    let location = ReplicaLocation::Managed { workers: 1, processes: 1 };
    controller.add_replica(INSTANCE, REPLICA, location).await.expect("replica");
    let metrics = telemetry::MetricsServer::bind(
        "127.0.0.1:0".parse().expect("address"),
        controller.metrics_registry().expect("the controller keeps metrics").clone(),
    )
    .await
    .expect("the controller's endpoint");
    let dropped = GlobalId::User(3);
    controller.create_dataflow(INSTANCE, index(INDEX)).await.expect("index");
    controller.create_dataflow(INSTANCE, index(dropped)).await.expect("second index");
    let peek = controller
        .peek(INSTANCE, PeekTarget::Index { id: INDEX }, 0, controller::PeekOptions::default())
        .await
        .expect("peek");
    assert_eq!(peek.result().await.expect("rows").len(), 50);

    let replica_addr = *orchestrator.metrics_addresses(INSTANCE, REPLICA).first().expect("a metrics address");
    let replica_text = scrape_until(replica_addr, "the replica's dataflows and arrangements", |samples| {
        sample_value(samples, "compute_replica_dataflows", &[]) == Some(2.0)
            && samples
                .iter()
                .filter(|s| s.name == "compute_replica_arrangement_records")
                .map(|s| s.value)
                .sum::<f64>()
                >= 100.0
            && sample_value(samples, "compute_replica_peeks_answered_total", &[("worker", "0")])
                .is_some_and(|n| n >= 1.0)
    })
    .await;
    promtool(replica_text).await.expect("the replica's exposition");

    let controller_addr = metrics.local_addr();
    let u3 = dropped.to_string();
    let controller_text = scrape_until(controller_addr, "the controller's peeks and hydration", |samples| {
        sample_value(samples, "compute_controller_peeks_total", &[("outcome", "rows")]) == Some(1.0)
            && sample_value(samples, "compute_controller_hydration_time_seconds", &[("collection", &u3)])
                .is_some()
            && sample_value(samples, "compute_controller_replica_status", &[("status", "connected")])
                == Some(1.0)
    })
    .await;
    promtool(controller_text).await.expect("the controller's exposition");

    controller.drop_collections(INSTANCE, vec![dropped]).await.expect("drop");
    let text = scrape_until(controller_addr, "no series of the dropped collection", |samples| {
        !samples.iter().any(|s| s.labels.get("collection") == Some(&u3))
    })
    .await;
    assert!(text.contains(&format!("collection=\"{INDEX}\"")), "the live index keeps its series");
    promtool(text).await.expect("after the drop");

    controller.drop_replica(INSTANCE, REPLICA).await.expect("drop replica");
    drop(controller);

    // The replica's log: what it says about a dataflow names the instance, the replica and the exports.
    let log = std::fs::read_to_string(log_dir.join("i1-r1-p0.log")).expect("the replica's log");
    let created = log.lines().find(|line| line.contains("creating dataflow")).expect("a dataflow created");
    for needle in ["instance=i1", "replica=r1", "process=0", "exports=[\"u2\"]"] {
        assert!(created.contains(needle), "{needle} missing from {created}");
    }
    std::fs::remove_dir_all(&log_dir).expect("clean up the logs");
}

#[test]
fn the_report_page_renders_in_chromium_with_its_charts_and_fault_marks() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("observability-report");
    let page = sim::cluster::html::write_example(&dir).expect("the example page");
    let png = dir.join("report.png");
    let shot = tools::screenshot(&page, &png, tools::REPORT_SCREENSHOT).expect("a screenshot");
    tools::check_screenshot(&shot, tools::REPORT_SCREENSHOT)
        .unwrap_or_else(|e| panic!("{e:#}; see {}", png.display()));
    // And a page without charts fails the same check: it is not one a test cannot fail.
    let blank = dir.join("blank.html");
    std::fs::write(&blank, "<!DOCTYPE html><html><body><p>nothing</p></body></html>").expect("blank page");
    let blank_shot =
        tools::screenshot(&blank, &dir.join("blank.png"), tools::REPORT_SCREENSHOT).expect("a screenshot");
    assert!(tools::check_screenshot(&blank_shot, tools::REPORT_SCREENSHOT).is_err(), "{blank_shot:?}");
}
