//! Short runs of the cluster scenario (`sim cluster`, the `sim` binary as a child process) on shards that
//! every process opens itself: the embedded stores (a blob directory and a SQLite file), and PostgreSQL +
//! S3 (`moto_server`) started by `storage::services` for the test. Each run (6 s, one replica killed and
//! restarted, a fresh replica added and dropped, one dataflow recreated) must pass with 0 violations,
//! having checked peeks, subscribe batches and materialized-view contents against the oracle and compared
//! every index in full at the end; and the stores must hold the shards (the run did not quietly use
//! something else). A service that cannot start fails the test under `CI=true`; elsewhere the test says
//! why and skips (the storage tests' rule).
//!
//! A third run (8 s on `--services local`) stops PostgreSQL for two seconds halfway: it must pass with 0
//! violations, having answered peeks during the outage, resumed appends, the subscribe and the view after
//! it, killed a replica during it (aimed at an in-flight view append), and marked the outage on the report
//! page.
//!
//! A fourth run (8 s, `--services local --netns`) puts the controller, the services and each replica
//! process in a network namespace of its own and cuts the links of the two-process replica for four seconds: it must pass with
//! 0 violations, peeks answered (by the other replica) during the cut, the controller reconnecting to the
//! victim (silent past its idle timeout), the victim answering a peek targeted at it and catching up after
//! the restore, the cut marked on the report page, and every namespace, veth
//! and bridge gone at the end. Where network namespaces cannot be made, the test says why and skips, or
//! fails under `CI=true`.
//!
//! The full-length run is the `cluster` step of `cargo xtask test-suite`; this only shows the wiring.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use storage::services::{Moto, Postgres, PostgresOptions, ServiceError, services_required};

/// Runs `sim cluster` for a few seconds with `storage_flags` and a data directory of its own; returns the
/// report.
fn run_cluster(data_dir: &Path, storage_flags: &[&str]) -> Value {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sim"));
    command
        .args(["cluster", "--duration", "6", "--seed", "1", "--replicas", "2", "--processes", "2", "--json"])
        .args(["--kills", "1", "--recreations", "1", "--data-dir"])
        .arg(data_dir)
        .args(storage_flags)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let output = command.output().expect("sim runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("sim cluster ({}) printed no JSON report ({e}): {stdout}", output.status);
    });
    assert!(
        output.status.success(),
        "sim cluster exited with {}: {report:#}\n{}",
        output.status,
        replica_log_tails(&data_dir.join("logs"))
    );
    report
}

/// The last lines of every replica log in `dir`, for a failure's message: what a replica said before it
/// exited (the run's directory is gone once the test ends).
fn replica_log_tails(dir: &Path) -> String {
    let mut tails = String::new();
    let mut logs: Vec<_> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
    logs.sort();
    for log in logs.iter().filter(|p| p.file_name().is_some_and(|n| n != "sim.log")) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        tails.push_str(&format!("--- last lines of {}\n", log.display()));
        for line in &lines[lines.len().saturating_sub(5)..] {
            tails.push_str(line);
            tails.push('\n');
        }
    }
    tails
}

fn number(report: &Value, pointer: &str) -> u64 {
    report.pointer(pointer).and_then(Value::as_u64).unwrap_or_else(|| panic!("no {pointer} in {report:#}"))
}

/// The checks every run must pass, whatever the backend.
fn assert_checked(report: &Value) {
    assert_eq!(report["outcome"], "passed", "{report:#}");
    assert_eq!(number(report, "/violation_count"), 0, "{report:#}");
    assert!(number(report, "/peeks/checked") > 0, "no peek was checked: {report:#}");
    assert!(number(report, "/peeks/materialized_view_checked") > 0, "no view check: {report:#}");
    assert!(number(report, "/subscribe_batches") > 0, "no subscribe batch: {report:#}");
    // Five indexes on each of the two replicas, and the materialized view.
    assert_eq!(number(report, "/final_checks"), 11, "{report:#}");
    assert!(number(report, "/rows_written") > 0, "{report:#}");
}

/// Files under `dir`, recursively.
fn files_under(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| if e.path().is_dir() { files_under(&e.path()) } else { 1 }).sum()
}

#[test]
fn a_short_cluster_run_on_the_embedded_shards_passes_its_checks() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let data_dir = dir.path().join("cluster");
    let report = run_cluster(&data_dir, &["--storage", "embedded"]);
    assert_checked(&report);
    let storage = report["storage"].as_str().expect("the report says where storage was");
    assert!(storage.starts_with("shards (blob file") && storage.contains("consensus sqlite"), "{storage}");
    // Every process wrote to and read from these stores.
    assert!(data_dir.join("consensus.db").is_file(), "no SQLite consensus in {}", data_dir.display());
    assert!(files_under(&data_dir.join("blob")) > 0, "no blob parts in {}", data_dir.display());
}

/// `Ok(service)`, or (outside CI) `None` after saying why the run is skipped; under CI a failure.
fn require<T>(what: &str, result: Result<T, ServiceError>) -> Option<T> {
    match result {
        Ok(service) => Some(service),
        Err(error) if services_required() => panic!("CI=true and {what} cannot start: {error}"),
        Err(error) => {
            // Tests may print: this is how a developer learns that the backend was not exercised.
            #[allow(clippy::print_stderr)]
            {
                eprintln!("SKIPPED the cluster run on {what}: {error}");
            }
            None
        }
    }
}

#[test]
fn a_short_cluster_run_on_postgres_and_s3_passes_its_checks() {
    let Some(postgres) = require("PostgreSQL", Postgres::start(PostgresOptions::default())) else { return };
    let Some(moto) = require("S3 (moto_server)", Moto::start()) else { return };
    postgres.create_database("cluster").expect("create the consensus database");
    moto.create_bucket("cluster").expect("create the bucket");
    let (blob, consensus) = (moto.blob_url("cluster", "run"), postgres.url("cluster"));
    let dir = tempfile::tempdir().expect("temporary directory");
    let report = run_cluster(&dir.path().join("cluster"), &["--blob", &blob, "--consensus", &consensus]);
    assert_checked(&report);
    let storage = report["storage"].as_str().expect("the report says where storage was");
    assert_eq!(storage, "shards (blob s3 bucket cluster, consensus postgres)");

    // A second run on the same stores is refused: they hold the first run's collections, which would
    // contradict the oracle.
    let mut again = Command::new(env!("CARGO_BIN_EXE_sim"));
    again
        .args(["cluster", "--duration", "1", "--json", "--data-dir"])
        .arg(dir.path().join("again"))
        .args(["--blob", &blob, "--consensus", &consensus])
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    let output = again.output().expect("sim runs");
    assert!(!output.status.success());
    let report: Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    assert_eq!(report["outcome"], "error", "{report:#}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(error.contains("already hold collection"), "{report:#}");
}

/// The outage run's flags: the scenario starts PostgreSQL and moto_server itself and stops PostgreSQL for
/// two seconds halfway through, killing a replica while its view append is stuck.
const OUTAGE_FLAGS: &[&str] = &[
    "--services",
    "local",
    "--outages",
    "1",
    "--outage-secs",
    "2",
    "--duration",
    "8",
    "--kills",
    "0",
    "--recreations",
    "0",
    "--seed",
    "3",
    "--replicas",
    "2",
    "--processes",
    "2",
    "--json",
];

// Index peeks go on during the outage, served from the replicas' arrangements: two peek loops answer about
// a thousand in its two seconds (972–1,100 measured on a loaded machine); a stall for the whole outage
// answers a few dozen. Two causes of such stalls were found and fixed: the scenario serialized every
// controller call behind one lock, so a storage peek waiting for the store held up every index peek (now
// a read-write lock, as the controller's `&self` API allows), and a read hold the registered reader already
// covered still waited for the reader's registration, which a move of the reader stalled by the outage held.
// The count itself undercounted: it counted the checks that finished during the outage, and when the
// replicas had read a write whose acknowledgement the table writer was still waiting for, every check waited
// for the outage to end. Two suite runs that reported 0 and 4 fit that (their logs were gone). The count now
// takes the outage going on as the rows arrived; `peeks_checked_during` beside it keeps the old figure, so
// a run where the two differ shows it. A third cause stalled a CI run at 48 (2 checked during it): the loops
// peeked just below the collection's upper, which the killed replica had reported (it was ahead, having
// read a write just before the store went) and which never goes back; the other replica, a step behind,
// could not catch up without the store. They now peek below the connected replicas' upper
// (`CollectionFrontiers::connected_upper`). That left the peek in flight when the replica died: a clean-clone
// run still stalled at 30, each loop stuck in one peek for the whole outage (2.5 s, the longest peek
// latency of the run). A loop now moves a wait longer than 250 ms to a task of its own and goes on.
// On failure the whole report is printed.

/// `sim cluster` with `flags`, its data in `dir/cluster` and its report page in `page_dir`, no input and
/// the default log level.
fn scenario(flags: &[&str], dir: &std::path::Path, page_dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sim"));
    command
        .arg("cluster")
        .args(flags)
        .arg("--data-dir")
        .arg(dir.join("cluster"))
        .arg("--report")
        .arg(page_dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    command
}

#[test]
fn a_consensus_outage_stalls_appends_and_loses_nothing_and_every_kind_of_write_resumes_after_it() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let page_dir = dir.path().join("page");
    let output =
        scenario(OUTAGE_FLAGS, dir.path(), &page_dir).stderr(Stdio::inherit()).output().expect("sim runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("sim cluster ({}) printed no JSON report ({e}): {stdout}", output.status));
    let error = report["error"].as_str().unwrap_or_default();
    if error.contains("cannot start PostgreSQL") || error.contains("cannot start moto_server") {
        let missing: Result<(), ServiceError> = Err(ServiceError::Io(error.to_string()));
        require("the services of --services local", missing);
        return;
    }
    assert!(output.status.success(), "sim cluster exited with {}: {report:#}", output.status);
    assert_eq!(report["outcome"], "passed", "{report:#}");
    assert_eq!(number(&report, "/violation_count"), 0, "nothing lost, nothing doubled: {report:#}");
    assert_eq!(number(&report, "/final_checks"), 11, "{report:#}");
    let storage = "shards (blob s3 bucket cluster, consensus postgres over TLS with a client certificate)";
    assert_eq!(report["storage"], storage, "every process authenticates to PostgreSQL by certificate");

    let outages = report["outages"].as_array().expect("an outages list");
    assert_eq!(outages.len(), 1, "{report:#}");
    let outage = &outages[0];
    assert_eq!(outage["kind"], "consensus");
    let answered = number(outage, "/peeks_answered");
    assert!(answered >= 100, "index peeks stalled in the outage: {answered} answered: {report:#}");
    // Appends wait for the store: at most one acknowledged after it went (its commit came just before).
    assert!(number(outage, "/appends_during") <= 1, "appends went on without consensus: {outage:#}");
    for resumed in ["appends_resumed_ms", "subscribe_resumed_ms", "view_resumed_ms"] {
        assert!(outage[resumed].is_u64(), "{resumed} never: {outage:#}");
    }
    assert!(number(outage, "/rows_written_after") > 0, "no rows written after the outage: {outage:#}");
    assert!(number(&report, "/peeks/outside_outages_latency_ms/count") > 0, "{report:#}");

    // A replica was killed during the outage, its view-append gauge read just before (an append is in
    // flight in most runs, not all: the scenario aims, it cannot force one), and came back.
    let rehydrations = report["rehydrations"].as_array().expect("a rehydrations list");
    let killed = rehydrations.iter().find(|r| r["during_outage"] == true).expect("a kill in the outage");
    assert!(killed["view_appends_in_flight"].is_u64(), "the gauge was not read: {killed:#}");
    assert_eq!(outage["killed"], killed["replica"], "{report:#}");
    assert!(killed["caught_up_ms"].is_u64(), "{killed:#}");
    // Restarted while the store was down, it waited for the store rather than exiting on it.
    assert_eq!(number(&report, "/replica_exits"), 0, "{report:#}");

    // The outage is marked on the report page, with its end.
    let page = std::fs::read_to_string(page_dir.join("report.html")).expect("the report page");
    assert!(page.contains("consensus outage postgres"), "the charts mark the outage");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(page_dir.join("report.json")).unwrap())
        .expect("report.json parses");
    let faults = json.pointer("/timeline/faults").and_then(Value::as_array).expect("faults");
    let mark = faults.iter().find(|f| f["kind"] == "consensus_outage").expect("the outage's mark");
    assert!(mark["until_s"].as_f64() > mark["at_s"].as_f64(), "{mark:#}");
}

/// The link-cut run's flags: the services and each replica process in a network namespace of their own,
/// and every link of one replica (`r2`, two processes) down for four seconds halfway through.
const LINK_CUT_FLAGS: &[&str] = &[
    "--services",
    "local",
    "--netns",
    "--link-cuts",
    "1",
    "--link-cut-secs",
    "4",
    "--outages",
    "0",
    "--kills",
    "0",
    "--recreations",
    "0",
    "--duration",
    "8",
    "--seed",
    "5",
    "--replicas",
    "2",
    "--processes",
    "2",
    "--json",
];

/// The names `ip` lists that a run with process id `pid` made (`netns.rs`'s naming).
fn network_leftovers(pid: u32) -> Vec<String> {
    let list = |args: &[&str]| {
        Command::new("ip").args(args).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let (namespaces, links) =
        (list(&["netns", "list"]).unwrap_or_default(), list(&["-o", "link"]).unwrap_or_default());
    let prefixes = [format!("sn-{pid}-"), format!("snb{pid}:"), format!("snv{pid}.")];
    namespaces
        .lines()
        .chain(links.lines())
        .filter(|line| prefixes.iter().any(|p| line.contains(p.as_str())))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_replica_cut_off_the_network_for_seconds_catches_up_after_while_the_other_answers_every_peek() {
    if let Err(why) = sim::cluster::netns::available() {
        let missing: Result<(), ServiceError> = Err(ServiceError::Io(format!("network namespaces: {why}")));
        require("network namespaces (ip netns)", missing);
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    let page_dir = dir.path().join("page");
    let child = scenario(LINK_CUT_FLAGS, dir.path(), &page_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sim runs");
    let pid = child.id();
    let output = child.wait_with_output().expect("sim runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if stderr.contains("cannot start PostgreSQL") || stderr.contains("cannot start moto_server") {
        let missing: Result<(), ServiceError> = Err(ServiceError::Io(stderr.to_string()));
        require("the services of --services local", missing);
        return;
    }
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("sim cluster ({}) printed no JSON report ({e}): {stdout}\n{stderr}", output.status)
    });
    assert!(output.status.success(), "sim cluster exited with {}: {report:#}\n{stderr}", output.status);
    assert_eq!(report["outcome"], "passed", "{report:#}");
    assert_eq!(number(&report, "/violation_count"), 0, "{report:#}");
    assert_eq!(number(&report, "/final_checks"), 11, "{report:#}");
    let network = report["network"].as_str().expect("the report says where the processes ran");
    assert!(network.starts_with("network namespaces on the bridge"), "{network}");
    // The controller (and the table writer) on a host of their own too: the scenario refuses to run
    // unless the thread driving it is in that namespace.
    assert!(network.contains("the controller and the table writer at 198.18."), "{network}");
    assert!(network.contains(&format!("(sn-{pid}-controller)")), "{network}");

    let cuts = report["link_cuts"].as_array().expect("a link_cuts list");
    assert_eq!(cuts.len(), 1, "{report:#}");
    let cut = &cuts[0];
    // The multi-process replica, both of its processes' links.
    assert_eq!(cut["replica"], "r2", "{cut:#}");
    assert_eq!(number(cut, "/links"), 2, "{cut:#}");
    assert!(cut["ended_at_s"].as_f64() >= cut["started_at_s"].as_f64().map(|s| s + 4.0), "{cut:#}");
    // While r2 was unreachable, r1 answered peeks (each checked against the oracle).
    assert!(number(cut, "/peeks_answered") > 0, "no peek answered during the cut: {cut:#}");
    // And the table writer kept appending: a process cut off mid-call holds no lock other writers need.
    assert!(number(cut, "/appends_during") > 0, "no append during the cut: {cut:#}");
    // After the restore, r2 answered a peek targeted at it and caught up past the restore time.
    assert!(cut["answered_peek_ms"].is_u64(), "{cut:#}");
    assert!(cut["caught_up_ms"].is_u64(), "{cut:#}");
    // Silent for longer than the controller's idle timeout (2.5 s), the connection was given up and made
    // again once the links were back.
    assert_eq!(cut["reconnected"], true, "{cut:#}");
    assert_eq!(number(&report, "/replica_exits"), 0, "{report:#}");

    // The cut is marked on the report page, with its end.
    let json: Value = serde_json::from_str(&std::fs::read_to_string(page_dir.join("report.json")).unwrap())
        .expect("report.json parses");
    let faults = json.pointer("/timeline/faults").and_then(Value::as_array).expect("faults");
    let mark = faults.iter().find(|f| f["kind"] == "link_cut").expect("the cut's mark");
    assert_eq!(mark["target"], "r2");
    assert!(mark["until_s"].as_f64() > mark["at_s"].as_f64(), "{mark:#}");
    let page = std::fs::read_to_string(page_dir.join("report.html")).expect("the report page");
    assert!(page.contains("link cut r2"), "the charts mark the cut");

    // Every namespace, veth and the bridge are gone.
    assert_eq!(network_leftovers(pid), Vec::<String>::new(), "left behind by sim cluster (pid {pid})");
}
