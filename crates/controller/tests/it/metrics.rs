//! The controller's Prometheus metrics: the families an instance with a replica, a collection and a peek
//! exposes, with the values the core's events imply; series that go with their collection, replica and
//! instance (nothing stale is left in the exposition); tallies that reach the registry when the instance
//! ticks; the status gauge and reconnects; one controller per registry.

use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use controller::{ComputeController, ControllerMetrics, PeekFailure};
use protocol::{InstanceId, PeekResponse, ReplicaId};
use replica_client::ReplicaStatus;
use storage::{InProcess, StoreConfig};

use crate::harness::{Harness, controller_config, f, index_on_storage, kv, peek_request, s, u};

const R1: ReplicaId = ReplicaId(1);
const R2: ReplicaId = ReplicaId(2);

/// The samples of the registry's exposition.
fn samples(registry: &prometheus::Registry) -> Vec<telemetry::Sample> {
    telemetry::parse_text(&telemetry::encode_text(registry)).expect("the exposition parses")
}

/// The value of the one sample of `name` whose labels include `labels`.
fn value(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    telemetry::sample_value(&samples(registry), name, labels)
}

/// Whether any sample has label `key` with `value`.
fn mentions(registry: &prometheus::Registry, key: &str, label_value: &str) -> bool {
    samples(registry).iter().any(|s| s.labels.get(key).map(String::as_str) == Some(label_value))
}

#[test]
fn an_instance_with_a_replica_a_collection_and_a_peek_exposes_every_family_with_its_values() {
    let (mut h, registry) = Harness::with_metrics();
    h.create_storage(s(1));
    h.add_replica(R1);
    h.create(index_on_storage(s(1), u(1), 0)).unwrap();
    h.core.advance_clock(500);
    h.report(R1, u(1), f(2));
    h.core.peek(peek_request(1, u(1), 1)).unwrap();
    h.drain();
    h.answer(R1, 1, PeekResponse::Rows(vec![(kv(1, 1), NonZeroU64::MIN)]));
    let recorder = h.core.metrics().expect("metrics").peek_recorder();
    recorder.record(&Ok(Vec::new()), Duration::from_micros(300));
    recorder.record(&Err(PeekFailure::TimedOut { after_ms: 5 }), Duration::from_millis(5));
    h.core.tick(2_000);

    let i = ("instance", "i1");
    let r = ("replica", "r1");
    let c = ("collection", "u1");
    let commands = |kind| value(&registry, "compute_controller_commands_total", &[i, r, ("command", kind)]);
    assert_eq!(commands("CreateDataflow"), Some(1.0));
    assert_eq!(commands("Schedule"), Some(1.0));
    assert_eq!(commands("Peek"), Some(1.0));
    assert!(commands("AllowCompaction").is_some_and(|n| n >= 1.0));
    assert_eq!(commands("Hello"), None, "a kind never sent has no series");
    let bytes = value(&registry, "compute_controller_command_bytes_total", &[i, r, ("command", "Schedule")]);
    assert!(bytes.is_some_and(|b| (4.0..64.0).contains(&b)), "a Schedule frame is a few bytes: {bytes:?}");
    let responses =
        |kind| value(&registry, "compute_controller_responses_total", &[i, r, ("response", kind)]);
    assert_eq!(responses("Frontiers"), Some(1.0));
    assert_eq!(responses("PeekResponse"), Some(1.0));
    let status = |name| value(&registry, "compute_controller_replica_status", &[i, r, ("status", name)]);
    assert_eq!(
        (status("connected"), status("hydrating"), status("failed")),
        (Some(1.0), Some(0.0), Some(0.0))
    );
    assert_eq!(value(&registry, "compute_controller_replica_reconnects_total", &[i, r]), Some(0.0));
    assert_eq!(value(&registry, "compute_controller_replica_unhydrated_collections", &[i, r]), Some(0.0));
    assert_eq!(value(&registry, "compute_controller_hydration_time_seconds", &[i, r, c]), Some(0.5));
    // The lag of u1's upper (2 ms) at 2,000 ms: 1.998 s, in the 2 s bucket.
    assert_eq!(value(&registry, "compute_controller_wallclock_lag_seconds_count", &[i, c]), Some(1.0));
    assert_eq!(
        value(&registry, "compute_controller_wallclock_lag_seconds_bucket", &[i, c, ("le", "1")]),
        Some(0.0)
    );
    assert_eq!(
        value(&registry, "compute_controller_wallclock_lag_seconds_bucket", &[i, c, ("le", "2")]),
        Some(1.0)
    );
    let peeks = |outcome| value(&registry, "compute_controller_peeks_total", &[i, ("outcome", outcome)]);
    assert_eq!(
        (peeks("rows"), peeks("timed_out"), peeks("error"), peeks("canceled")),
        (Some(1.0), Some(1.0), Some(0.0), Some(0.0))
    );
    assert_eq!(value(&registry, "compute_controller_peek_duration_seconds_count", &[i]), Some(2.0));
    assert_eq!(
        value(&registry, "compute_controller_peek_duration_seconds_bucket", &[i, ("le", "0.0005")]),
        Some(1.0)
    );
    assert_eq!(value(&registry, "compute_controller_pending_peeks", &[i]), Some(0.0));
    assert_eq!(value(&registry, "compute_controller_subscribes", &[i]), Some(0.0));
    assert_eq!(value(&registry, "compute_controller_subscribe_updates_total", &[i]), Some(0.0));
    assert!(value(&registry, "compute_controller_history_commands", &[i]).is_some_and(|n| n >= 2.0));
    assert_eq!(value(&registry, "compute_controller_collections", &[i]), Some(1.0));
    assert_eq!(value(&registry, "compute_controller_read_holds", &[i, ("kind", "import")]), Some(1.0));
    assert_eq!(value(&registry, "compute_controller_read_holds", &[i, ("kind", "replica_input")]), Some(1.0));
    assert_eq!(value(&registry, "compute_controller_read_holds", &[i, ("kind", "peek")]), Some(0.0));
}

#[test]
fn a_dropped_collection_leaves_no_series_and_the_others_stay() {
    let (mut h, registry) = Harness::with_metrics();
    h.create_storage(s(1));
    h.add_replica(R1);
    h.create(index_on_storage(s(1), u(1), 0)).unwrap();
    h.create(index_on_storage(s(1), u(2), 0)).unwrap();
    h.report(R1, u(1), f(1));
    h.report(R1, u(2), f(1));
    h.core.tick(1_000);
    assert!(mentions(&registry, "collection", "u1"));
    h.core.drop_collections(&[u(1)]).unwrap();
    h.drain();
    h.core.tick(2_000);
    assert!(!mentions(&registry, "collection", "u1"), "{}", telemetry::encode_text(&registry));
    assert!(mentions(&registry, "collection", "u2"));
    // Also once its replicas report it gone and its state is removed.
    h.report(R1, u(1), frontiers::Antichain::new());
    h.core.tick(3_000);
    assert!(!mentions(&registry, "collection", "u1"));
}

#[test]
fn a_dropped_core_takes_its_collections_lag_series_along_while_its_shared_state_lives_on() {
    let (mut h, registry) = Harness::with_metrics();
    h.create_storage(s(1));
    h.add_replica(R1);
    h.create(index_on_storage(s(1), u(1), 0)).unwrap();
    h.report(R1, u(1), f(1));
    h.core.tick(1_000);
    let lag_count =
        || value(&registry, "compute_controller_wallclock_lag_seconds_count", &[("collection", "u1")]);
    assert_eq!(lag_count(), Some(1.0));
    // The controller's handle on an instance keeps the shared state; the core's series go with the core.
    let shared = h.core.shared();
    drop(h);
    assert!(!mentions(&registry, "collection", "u1"), "{}", telemetry::encode_text(&registry));
    assert_eq!(lag_count(), None);
    drop(shared);
}

#[test]
fn a_dropped_replica_leaves_no_series_and_a_lost_connection_loses_its_hydration_times() {
    let (mut h, registry) = Harness::with_metrics();
    h.create_storage(s(1));
    h.add_replica(R1);
    h.add_replica(R2);
    h.create(index_on_storage(s(1), u(1), 0)).unwrap();
    h.report(R1, u(1), f(1));
    h.report(R2, u(1), f(1));
    h.core.tick(1_000);
    assert!(mentions(&registry, "replica", "r2"));
    let hydration = |replica| {
        value(
            &registry,
            "compute_controller_hydration_time_seconds",
            &[("replica", replica), ("collection", "u1")],
        )
    };
    assert!(hydration("r1").is_some() && hydration("r2").is_some());
    h.status(R1, ReplicaStatus::Failed { reason: "gone".into(), retry_in_ms: 10 });
    assert_eq!(hydration("r1"), None, "not hydrated on a connection it does not have");
    h.core.drop_replica(R2).unwrap();
    h.drain();
    h.core.tick(2_000);
    assert!(!mentions(&registry, "replica", "r2"), "{}", telemetry::encode_text(&registry));
    assert!(mentions(&registry, "replica", "r1"));
}

#[test]
fn the_status_gauge_follows_the_replica_and_reconnects_are_counted() {
    let (mut h, registry) = Harness::with_metrics();
    h.create_storage(s(1));
    h.add_replica(R1);
    h.create(index_on_storage(s(1), u(1), 0)).unwrap();
    let current = |registry: &prometheus::Registry| -> Vec<String> {
        samples(registry)
            .into_iter()
            .filter(|s| s.name == "compute_controller_replica_status" && s.value == 1.0)
            .map(|s| s.labels["status"].clone())
            .collect()
    };
    assert_eq!(current(&registry), ["hydrating"]);
    h.status(R1, ReplicaStatus::Failed { reason: "gone".into(), retry_in_ms: 10 });
    assert_eq!(current(&registry), ["failed"]);
    h.status(R1, ReplicaStatus::Connecting { epoch: 2 });
    assert_eq!(current(&registry), ["connecting"]);
    h.status(R1, ReplicaStatus::Ready);
    assert_eq!(current(&registry), ["rehydrating"]);
    h.report(R1, u(1), f(1));
    assert_eq!(current(&registry), ["connected"]);
    assert_eq!(
        value(&registry, "compute_controller_replica_reconnects_total", &[("replica", "r1")]),
        Some(1.0)
    );
}

#[test]
fn command_and_response_counts_reach_the_registry_when_the_instance_ticks() {
    let (mut h, registry) = Harness::with_metrics();
    h.create_storage(s(1));
    h.add_replica(R1);
    h.create(index_on_storage(s(1), u(1), 0)).unwrap();
    let created = || value(&registry, "compute_controller_commands_total", &[("command", "CreateDataflow")]);
    assert_eq!(created(), None, "counted in the core, not yet in the registry");
    h.core.tick(1);
    assert_eq!(created(), Some(1.0));
    for t in 2..12 {
        h.report(R1, u(1), f(t));
    }
    h.core.tick(2);
    assert_eq!(
        value(&registry, "compute_controller_responses_total", &[("response", "Frontiers")]),
        Some(10.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_instance_leaves_no_series() {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let config = controller_config(false);
    let registry = config.metrics.clone().expect("metrics on");
    let mut controller = ComputeController::new(storage, None, config).await.expect("controller");
    assert!(controller.metrics_registry().is_some());
    controller.create_instance(InstanceId(1), controller.default_instance_config()).unwrap();
    controller.create_instance(InstanceId(2), controller.default_instance_config()).unwrap();
    crate::harness::eventually("both instances tick", async || {
        match (
            value(&registry, "compute_controller_collections", &[("instance", "i1")]),
            value(&registry, "compute_controller_collections", &[("instance", "i2")]),
        ) {
            (Some(_), Some(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    controller.drop_instance(InstanceId(1)).await.unwrap();
    assert!(!mentions(&registry, "instance", "i1"), "{}", telemetry::encode_text(&registry));
    assert!(mentions(&registry, "instance", "i2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_registry_holds_the_metrics_of_one_controller() {
    let registry = prometheus::Registry::new();
    ControllerMetrics::register(&registry).expect("the first");
    assert!(ControllerMetrics::register(&registry).is_err());
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let mut config = controller_config(false);
    config.metrics = Some(registry);
    let error = ComputeController::new(storage, None, config).await.expect_err("a second controller");
    assert!(error.contains("cannot register the controller's metrics"), "{error}");
}
