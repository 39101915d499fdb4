//! Integration tests of the simulator: determinism (the same seed gives the same trace), a run passing its
//! invariant and oracle checks while checking peeks and subscribe batches, the model replicas computing
//! from storage (a storage layer that invents rows is caught), and the real stack against the oracle. The
//! seed ranges themselves run in `cargo xtask sim` (and in the `sim` step of `cargo xtask test-suite`, which
//! also checks that the planted peek-hold bug is found as a `peek-holds` violation). Also the controller's
//! process orchestrator with real `compute-replica` processes (`process_orchestrator`), here because only
//! `sim` can build that binary; the metrics endpoints of a replica process and of the controller checked
//! with `promtool`, and the report page rendered in headless Chromium (`observability`).

mod cluster;
mod observability;
mod process_orchestrator;

use sim::simulation::{Invariant, SimConfig, run_seed_with};

#[test]
fn sim_cluster_help_prints_every_flag_and_exits_0_and_an_unknown_flag_exits_non_zero_naming_it() {
    let sim =
        |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_sim")).args(args).output().unwrap();
    let help = sim(&["cluster", "--help"]);
    assert!(help.status.success(), "{help:?}");
    let usage = String::from_utf8(help.stdout).unwrap();
    for flag in
        ["--duration", "--rate", "--storage", "--services", "--blob", "--consensus", "--insecure", "--report"]
    {
        assert!(usage.contains(flag), "{flag} missing from:\n{usage}");
    }
    let wrong = sim(&["cluster", "--no-such-flag"]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("--no-such-flag"));
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let config = SimConfig { fault_ms: 800, liveness_ms: 600, ..SimConfig::default() };
    for seed in [3, 11] {
        let (a, b) = (run_seed_with(seed, config), run_seed_with(seed, config));
        assert_eq!(a.trace_hash, b.trace_hash, "seed {seed}");
        assert_eq!(
            (a.steps, a.peeks_checked, a.batches_checked, a.model_evaluations),
            (b.steps, b.peeks_checked, b.batches_checked, b.model_evaluations)
        );
    }
    assert_ne!(run_seed_with(3, config).trace_hash, run_seed_with(4, config).trace_hash);
}

#[test]
fn a_run_with_faults_checks_peeks_and_subscribes_and_finds_no_violation() {
    let outcome = run_seed_with(7, SimConfig::default());
    assert_eq!(outcome.violation, None);
    assert!(outcome.peeks_checked > 0, "no peek was checked");
    assert!(outcome.batches_checked > 0, "no subscribe batch was checked");
    assert!(outcome.faults > 0);
    assert!(outcome.model_evaluations > 0, "the model replicas computed nothing");
}

#[test]
fn model_replicas_answer_from_what_storage_holds_so_rows_the_oracle_never_saw_are_caught() {
    // From 300 ms in, every append writes a row to storage that the oracle does not record. The model
    // replicas compute from storage, so what they answer differs from the oracle's evaluation of its own
    // log. (Were the models to take their answers from the oracle, every seed would pass.)
    let config = SimConfig { unrecorded_rows_from_ms: Some(300), ..SimConfig::default() };
    let mut caught = 0;
    for seed in 0..4 {
        let outcome = run_seed_with(seed, config);
        if let Some((_, violation)) = outcome.violation {
            assert_eq!(violation.invariant, Invariant::Results, "seed {seed}: {violation}");
            caught += 1;
        }
    }
    assert_eq!(caught, 4, "only {caught} of 4 seeds noticed rows the oracle never saw");
    // And the same seeds pass when storage holds exactly what the oracle saw.
    for seed in 0..4 {
        assert_eq!(run_seed_with(seed, SimConfig::default()).violation, None, "seed {seed}");
    }
}

#[test]
fn holds_and_appends_survive_storage_outages_lost_replies_compaction_and_lease_expiry() {
    // The tables are shards over the simulated blob store and consensus. Outages stall appends,
    // reads and new holds; lost replies leave the writer to find out from its idempotency token;
    // compaction and garbage collection run throughout (small appends inline in the state, on some
    // seeds); crashed replica processes' leased readers
    // expire. The world checks after every step that no since passed a live client's hold, after
    // every acknowledged append that storage holds exactly what was acknowledged, and at the end that
    // no blob part leaked.
    let mut totals = sim::simulation::StorageStats::default();
    let mut outages = 0;
    for seed in 0..8 {
        let outcome = run_seed_with(seed, SimConfig::default());
        assert_eq!(outcome.violation, None, "seed {seed}");
        outages += outcome.storage_outages;
        let s = outcome.storage;
        totals.lost_replies += s.lost_replies;
        totals.appends_applied_unacknowledged += s.appends_applied_unacknowledged;
        totals.found_applied += s.found_applied;
        totals.merges += s.merges;
        totals.parts_collected += s.parts_collected;
        totals.readers_expired += s.readers_expired;
        totals.inline_parts += s.inline_parts;
    }
    assert!(outages > 0, "no seed had a storage outage");
    assert!(
        totals.appends_applied_unacknowledged > 0,
        "no append was applied with its reply lost: {totals:?}"
    );
    assert_eq!(
        totals.found_applied, totals.appends_applied_unacknowledged,
        "every append applied with its reply lost is found by its token, and no other"
    );
    assert!(totals.merges > 0 && totals.parts_collected > 0, "no compaction or collection: {totals:?}");
    assert!(totals.readers_expired > 0, "no crashed process's reader expired: {totals:?}");
    assert!(totals.inline_parts > 0, "no append went inline in the state: {totals:?}");
}

#[test]
fn a_writer_that_appends_again_after_a_lost_reply_is_caught_by_the_storage_contents_check() {
    // The planted writer ignores its idempotency token after a lost reply and appends at the shard's
    // current upper: an append applied before its reply was lost lands twice. The contents check reads
    // the shards' blob parts and compares them with the world's ledger of acknowledged appends.
    let config = SimConfig { rebase_after_lost_reply: true, ..SimConfig::default() };
    let mut caught = 0;
    for seed in 0..8 {
        let outcome = run_seed_with(seed, config);
        let duplicated = outcome.storage.appends_applied_unacknowledged > 0;
        match outcome.violation {
            Some((_, violation)) => {
                assert_eq!(violation.invariant, Invariant::StorageContents, "seed {seed}: {violation}");
                assert!(duplicated, "seed {seed} failed with no append to duplicate: {violation}");
                caught += 1;
            }
            None => assert!(!duplicated, "seed {seed} duplicated an append and nothing noticed"),
        }
    }
    assert!(caught > 0, "no seed lost a reply to an applied append");
}

#[test]
fn the_real_stack_agrees_with_the_oracle_under_replica_restarts() {
    use sim::simulation::{RealConfig, run_real};
    for seed in [1, 2] {
        let outcome = run_real(seed, RealConfig { duration_ms: 3_000 }).expect("the run completes");
        assert_eq!(outcome.violation, None, "seed {seed}");
        assert!(outcome.peeks_checked > 0, "seed {seed} checked no peeks");
    }
}

#[test]
fn the_tpch_workload_refuses_the_metrics_and_report_options_it_does_not_honour() {
    use sim::cluster::ClusterArgs;
    let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(ClusterArgs::parse(&args(&["--workload", "tpch"])).is_ok());
    for extra in [["--report", "/tmp/r"], ["--metrics-addr", "127.0.0.1:0"]] {
        let error = ClusterArgs::parse(&args(&["--workload", "tpch", extra[0], extra[1]])).unwrap_err();
        assert!(error.to_string().contains("not built for --workload tpch"), "{error}");
        assert!(ClusterArgs::parse(&args(&extra)).is_ok(), "{extra:?} with the orders workload");
    }
}
