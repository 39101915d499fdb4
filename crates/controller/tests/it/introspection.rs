//! Introspection as the instance core writes it, with time as an input so every value is exact: replica
//! status transitions, hydration rows and times, wall-clock lag, and the peek duration histogram. (The
//! rows reaching storage, where they can be peeked and subscribed, are tested end to end in `e2e`.)

use controller::IntrospectionKind;
use frontiers::{Antichain, PartialOrder};
use protocol::{Datum, Diff, GlobalId, InstanceId, PeekResponse, ReplicaId, Row};
use replica_client::ReplicaStatus;

use crate::harness::{Harness, f, index_on_storage, peek_request, s, u};

const R1: ReplicaId = ReplicaId(1);
const R2: ReplicaId = ReplicaId(2);

/// The instance of every harness.
fn instance() -> String {
    InstanceId(1).to_string()
}

fn status_row(replica: ReplicaId, status: &str, reason: Option<&str>) -> Row {
    let (instance, replica) = (instance(), replica.to_string());
    Row::pack([
        Datum::Text(&instance),
        Datum::Text(&replica),
        Datum::Text(status),
        reason.map(Datum::Text).unwrap_or(Datum::Null),
    ])
}

/// A hydration row: `Some(ms)` is hydrated in that long, `None` is not hydrated.
fn hydration_row(replica: ReplicaId, id: GlobalId, hydration_time_ms: Option<i64>) -> Row {
    let (instance, replica, id) = (instance(), replica.to_string(), id.to_string());
    Row::pack([
        Datum::Text(&instance),
        Datum::Text(&replica),
        Datum::Text(&id),
        Datum::Bool(hydration_time_ms.is_some()),
        hydration_time_ms.map(Datum::Int64).unwrap_or(Datum::Null),
    ])
}

fn lag_row(replica: ReplicaId, id: GlobalId, lag_ms: i64) -> Row {
    let (instance, replica, id) = (instance(), replica.to_string(), id.to_string());
    Row::pack([Datum::Text(&instance), Datum::Text(&replica), Datum::Text(&id), Datum::Int64(lag_ms)])
}

fn frontier_row(replica: ReplicaId, id: GlobalId, frontier_ms: u64) -> Row {
    let (instance, replica, id) = (instance(), replica.to_string(), id.to_string());
    Row::pack([
        Datum::Text(&instance),
        Datum::Text(&replica),
        Datum::Text(&id),
        Datum::Timestamp(frontier_ms),
    ])
}

fn peek_row(replica: ReplicaId, bucket_upper_ms: i64, count: i64) -> Row {
    let (instance, replica) = (instance(), replica.to_string());
    Row::pack([
        Datum::Text(&instance),
        Datum::Text(&replica),
        Datum::Int64(bucket_upper_ms),
        Datum::Int64(count),
    ])
}

/// Sets the core's clock (it only moves forward).
fn at(h: &mut Harness, now_ms: u64) {
    h.core.advance_clock(now_ms);
}

/// Changes the replica's status and returns the status differences that caused.
fn change_status(h: &mut Harness, replica: ReplicaId, status: ReplicaStatus) -> Vec<(Row, Diff)> {
    h.status(replica, status);
    h.introspection_diffs(IntrospectionKind::ReplicaStatus)
}

#[test]
fn replica_status_goes_from_hydrating_to_connected_and_after_a_lost_connection_rehydrates() {
    let mut h = Harness::new();
    h.create_storage(s(1));
    h.core.add_replica(R1).unwrap();
    h.create(index_on_storage(s(1), u(1), 0)).unwrap();
    assert_eq!(
        h.introspection_rows(IntrospectionKind::ReplicaStatus),
        vec![status_row(R1, "connecting", None)]
    );
    h.introspection_diffs(IntrospectionKind::ReplicaStatus);

    assert_eq!(change_status(&mut h, R1, ReplicaStatus::Connecting { epoch: 1 }), vec![], "no change");
    assert_eq!(
        change_status(&mut h, R1, ReplicaStatus::Hydrating),
        vec![(status_row(R1, "connecting", None), -1), (status_row(R1, "hydrating", None), 1)],
        "the first connection hydrates",
    );
    assert_eq!(
        change_status(&mut h, R1, ReplicaStatus::Ready),
        vec![],
        "hydrated is the core's judgement: u1 has not passed its as-of yet",
    );
    h.report(R1, u(1), f(1));
    assert_eq!(
        h.introspection_diffs(IntrospectionKind::ReplicaStatus),
        vec![(status_row(R1, "hydrating", None), -1), (status_row(R1, "connected", None), 1)],
        "every collection hydrated",
    );

    let lost = ReplicaStatus::Failed { reason: "connection reset".to_string(), retry_in_ms: 10 };
    assert_eq!(
        change_status(&mut h, R1, lost),
        vec![
            (status_row(R1, "connected", None), -1),
            (status_row(R1, "failed", Some("connection reset")), 1)
        ],
    );
    assert_eq!(
        change_status(&mut h, R1, ReplicaStatus::Connecting { epoch: 2 }),
        vec![
            (status_row(R1, "failed", Some("connection reset")), -1),
            (status_row(R1, "connecting", None), 1)
        ],
    );
    assert_eq!(
        change_status(&mut h, R1, ReplicaStatus::Hydrating),
        vec![(status_row(R1, "connecting", None), -1), (status_row(R1, "rehydrating", None), 1)],
        "a later connection rehydrates",
    );
    h.report(R1, u(1), f(2));
    assert_eq!(
        h.introspection_diffs(IntrospectionKind::ReplicaStatus),
        vec![(status_row(R1, "rehydrating", None), -1), (status_row(R1, "connected", None), 1)],
    );
    assert_eq!(
        h.introspection_rows(IntrospectionKind::ReplicaStatus),
        vec![status_row(R1, "connected", None)]
    );

    // A new collection is not hydrated yet; dropping it leaves nothing to wait for.
    h.create(index_on_storage(s(1), u(2), 0)).unwrap();
    assert_eq!(
        h.introspection_rows(IntrospectionKind::ReplicaStatus),
        vec![status_row(R1, "rehydrating", None)]
    );
    h.core.drop_collections(&[u(2)]).unwrap();
    h.drain();
    assert_eq!(
        h.introspection_rows(IntrospectionKind::ReplicaStatus),
        vec![status_row(R1, "connected", None)]
    );

    h.core.drop_replica(R1).unwrap();
    h.drain();
    assert_eq!(h.introspection_rows(IntrospectionKind::ReplicaStatus), vec![]);
    assert_eq!(
        h.introspection_diffs(IntrospectionKind::ReplicaStatus),
        vec![
            (status_row(R1, "connected", None), -1),
            (status_row(R1, "rehydrating", None), 1),
            (status_row(R1, "rehydrating", None), -1),
            (status_row(R1, "connected", None), 1),
            (status_row(R1, "connected", None), -1),
        ],
    );
}

#[test]
fn hydration_rows_start_false_turn_true_with_the_time_taken_and_reset_when_the_connection_is_lost() {
    let mut h = Harness::new();
    h.create_storage(s(1));
    at(&mut h, 100);
    h.core.add_replica(R1).unwrap();
    assert_eq!(h.introspection_rows(IntrospectionKind::Hydration), vec![], "no collections yet");

    at(&mut h, 200);
    h.create(index_on_storage(s(1), u(1), 5)).unwrap();
    assert_eq!(h.introspection_rows(IntrospectionKind::Hydration), vec![hydration_row(R1, u(1), None)]);
    h.core.add_replica(R2).unwrap();
    h.drain();
    assert_eq!(
        h.introspection_rows(IntrospectionKind::Hydration),
        vec![hydration_row(R1, u(1), None), hydration_row(R2, u(1), None)],
        "a new replica has a row for every live collection",
    );

    at(&mut h, 300);
    h.status(R1, ReplicaStatus::Hydrating);
    at(&mut h, 500);
    h.report(R1, u(1), f(5));
    assert_eq!(
        h.introspection_rows(IntrospectionKind::Hydration)[0],
        hydration_row(R1, u(1), None),
        "at the as-of is not past it",
    );
    at(&mut h, 1_000);
    h.report(R1, u(1), f(6));
    assert_eq!(
        h.introspection_rows(IntrospectionKind::Hydration)[0],
        hydration_row(R1, u(1), Some(700)),
        "counted from the connection (at 300), which came after the collection (at 200)",
    );

    at(&mut h, 1_200);
    h.create(index_on_storage(s(1), u(2), 5)).unwrap();
    at(&mut h, 1_500);
    h.report(R1, u(2), f(6));
    assert_eq!(
        h.introspection_rows(IntrospectionKind::Hydration),
        vec![
            hydration_row(R1, u(1), Some(700)),
            hydration_row(R1, u(2), Some(300)),
            hydration_row(R2, u(1), None),
            hydration_row(R2, u(2), None),
        ],
        "u2 counts from its creation (at 1,200)",
    );

    at(&mut h, 2_000);
    h.status(R1, ReplicaStatus::Failed { reason: "gone".to_string(), retry_in_ms: 10 });
    assert_eq!(
        h.introspection_rows(IntrospectionKind::Hydration),
        vec![
            hydration_row(R1, u(1), None),
            hydration_row(R1, u(2), None),
            hydration_row(R2, u(1), None),
            hydration_row(R2, u(2), None),
        ],
        "a lost connection rehydrates everything",
    );
    at(&mut h, 3_000);
    h.status(R1, ReplicaStatus::Hydrating);
    at(&mut h, 3_500);
    h.report(R1, u(1), f(7));
    assert_eq!(h.introspection_rows(IntrospectionKind::Hydration)[0], hydration_row(R1, u(1), Some(500)));

    h.core.drop_collections(&[u(2)]).unwrap();
    h.drain();
    assert_eq!(
        h.introspection_rows(IntrospectionKind::Hydration),
        vec![hydration_row(R1, u(1), Some(500)), hydration_row(R2, u(1), None)],
        "a dropped collection's rows go at once",
    );
    h.report(R1, u(2), f(8));
    assert_eq!(h.introspection_rows(IntrospectionKind::Hydration).len(), 2, "late news adds no row");
    h.core.drop_replica(R2).unwrap();
    h.drain();
    assert_eq!(h.introspection_rows(IntrospectionKind::Hydration), vec![hydration_row(R1, u(1), Some(500))]);
}

#[test]
fn wallclock_lag_is_the_clock_minus_the_upper_in_whole_seconds_refreshed_once_per_interval() {
    // The default introspection interval is 1,000 ms; the core's clock starts at 0.
    let mut h = Harness::new();
    h.create_storage(s(1));
    h.add_replica(R1);
    h.create(index_on_storage(s(1), u(1), 0)).unwrap();
    h.report(R1, u(1), f(1_000));
    assert_eq!(h.introspection_rows(IntrospectionKind::WallclockLag), vec![], "not refreshed yet");

    h.core.tick(3_500);
    assert_eq!(h.introspection_rows(IntrospectionKind::WallclockLag), vec![lag_row(R1, u(1), 2_000)]);
    assert_eq!(h.introspection_rows(IntrospectionKind::Frontiers), vec![frontier_row(R1, u(1), 1_000)]);

    h.core.tick(4_500);
    assert_eq!(
        h.introspection_rows(IntrospectionKind::WallclockLag),
        vec![lag_row(R1, u(1), 3_000)],
        "the clock moved"
    );

    h.report(R1, u(1), f(3_900));
    h.core.tick(5_000);
    assert_eq!(
        h.introspection_rows(IntrospectionKind::WallclockLag),
        vec![lag_row(R1, u(1), 3_000)],
        "within the interval nothing is refreshed",
    );
    h.core.tick(5_500);
    assert_eq!(
        h.introspection_rows(IntrospectionKind::WallclockLag),
        vec![lag_row(R1, u(1), 1_000)],
        "the upper moved: 5,500 - 3,900 = 1,600 ms is 1 s",
    );
    assert_eq!(h.introspection_rows(IntrospectionKind::Frontiers), vec![frontier_row(R1, u(1), 3_900)]);

    h.report(R1, u(1), Antichain::new());
    h.core.tick(6_500);
    assert_eq!(
        h.introspection_rows(IntrospectionKind::WallclockLag),
        vec![lag_row(R1, u(1), 0)],
        "a closed upper does not lag",
    );

    h.core.drop_collections(&[u(1)]).unwrap();
    h.drain();
    assert_eq!(h.introspection_rows(IntrospectionKind::WallclockLag), vec![]);
    assert_eq!(h.introspection_rows(IntrospectionKind::Frontiers), vec![]);
    h.core.tick(7_500);
    assert_eq!(h.introspection_rows(IntrospectionKind::WallclockLag), vec![], "and they stay gone");
}

#[test]
fn peek_durations_are_counted_per_replica_in_power_of_two_buckets() {
    let mut h = Harness::new();
    h.create_storage(s(1));
    h.add_replica(R1);
    h.add_replica(R2);
    h.create(index_on_storage(s(1), u(1), 0)).unwrap();
    h.report(R1, u(1), f(10));
    h.report(R2, u(1), f(10));

    // (peek, start, end, the replica answering first); the other replica answers after it.
    let peeks = [(1, 1_000, 1_003, R1), (2, 2_000, 2_005, R1), (3, 3_000, 3_002, R1), (4, 4_000, 4_000, R2)];
    for (uuid, start, end, first) in peeks {
        at(&mut h, start);
        h.core.peek(peek_request(uuid, u(1), 10)).unwrap();
        h.drain();
        at(&mut h, end);
        h.answer(first, uuid, PeekResponse::Rows(vec![]));
        let second = if first == R1 { R2 } else { R1 };
        h.answer(second, uuid, PeekResponse::Rows(vec![]));
    }
    assert_eq!(
        h.introspection_rows(IntrospectionKind::PeekDurations),
        vec![peek_row(R1, 4, 2), peek_row(R1, 8, 1), peek_row(R2, 1, 1)],
        "3 ms and 2 ms are in bucket 4, 5 ms in bucket 8, 0 ms in bucket 1; late answers are not counted",
    );

    h.core.drop_replica(R1).unwrap();
    h.drain();
    assert_eq!(h.introspection_rows(IntrospectionKind::PeekDurations), vec![peek_row(R2, 1, 1)]);
}

#[test]
fn a_reconnected_replica_is_hydrated_only_past_the_compacted_as_of_it_was_replayed_at() {
    let mut h = Harness::new();
    h.create_storage(s(1));
    h.core.add_replica(R1).unwrap();
    h.create(index_on_storage(s(1), u(1), 5)).unwrap();
    h.status(R1, ReplicaStatus::Hydrating);
    h.report(R1, u(1), f(20));
    assert_ne!(h.introspection_rows(IntrospectionKind::Hydration), vec![hydration_row(R1, u(1), None)]);
    // The index compacts (its policy trails the upper): a replay now starts it at its since, not at 5.
    let since = h.core.collection_frontiers(u(1)).expect("live").since;
    assert!(PartialOrder::less_equal(&f(10), &since), "compacted to {since:?}");
    h.status(R1, ReplicaStatus::Failed { reason: "gone".to_string(), retry_in_ms: 10 });
    h.status(R1, ReplicaStatus::Hydrating);
    // Reporting the replayed as-of is not being past it, however far that is beyond the original.
    let replayed = *since.as_option().expect("a time");
    h.report(R1, u(1), f(replayed));
    assert_eq!(
        h.introspection_rows(IntrospectionKind::Hydration),
        vec![hydration_row(R1, u(1), None)],
        "at the replayed as-of {replayed}, not hydrated"
    );
    assert_eq!(
        h.introspection_rows(IntrospectionKind::ReplicaStatus),
        vec![status_row(R1, "rehydrating", None)]
    );
    h.report(R1, u(1), f(replayed + 1));
    assert_ne!(h.introspection_rows(IntrospectionKind::Hydration), vec![hydration_row(R1, u(1), None)]);
    assert_eq!(
        h.introspection_rows(IntrospectionKind::ReplicaStatus),
        vec![status_row(R1, "connected", None)]
    );
}

fn history_row(replica: ReplicaId, id: GlobalId, minute_ms: u64, max_lag_ms: i64) -> Row {
    let (instance, replica, id) = (instance(), replica.to_string(), id.to_string());
    Row::pack([
        Datum::Text(&instance),
        Datum::Text(&replica),
        Datum::Text(&id),
        Datum::Timestamp(minute_ms),
        Datum::Int64(max_lag_ms),
    ])
}

#[test]
fn the_lag_history_keeps_each_minutes_largest_lag_once_the_minute_is_over_and_forgets_old_minutes() {
    let config = controller::InstanceCoreConfig {
        default_index_policy: frontiers::ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 },
        wallclock_lag_history_minutes: 2,
        ..Default::default()
    };
    let mut h = Harness::with_config(config);
    h.create_storage(s(1));
    h.add_replica(R1);
    h.add_replica(R2);
    h.create(index_on_storage(s(1), u(1), 0)).unwrap();
    h.report(R1, u(1), f(1_000));
    h.report(R2, u(1), f(1_000));
    // Minute 0: lags 2,000 then 9,000 on R1 (R2 follows later).
    h.core.tick(3_000);
    h.core.tick(10_000);
    h.report(R1, u(1), f(9_500));
    h.core.tick(11_000);
    assert_eq!(h.introspection_rows(IntrospectionKind::WallclockLagHistory), vec![], "minute 0 is not over");
    let lags = h.core.wallclock_lag(u(1)).unwrap();
    assert_eq!(lags[0].lag_ms, Some(1_500), "now minus R1's upper");
    assert_eq!(lags[0].current_minute, Some(controller::LagMinute { minute_ms: 0, max_lag_ms: 9_000 }));
    assert_eq!(lags[1].current_minute, Some(controller::LagMinute { minute_ms: 0, max_lag_ms: 10_000 }));
    assert!(lags.iter().all(|l| l.history.is_empty()));

    // Minute 1 begins: minute 0 is written, its largest lag per replica.
    h.report(R1, u(1), f(60_000));
    h.report(R2, u(1), f(60_000));
    h.core.tick(61_000);
    assert_eq!(
        h.introspection_rows(IntrospectionKind::WallclockLagHistory),
        vec![history_row(R1, u(1), 0, 9_000), history_row(R2, u(1), 0, 10_000)]
    );
    let lags = h.core.wallclock_lag(u(1)).unwrap();
    assert_eq!(lags[0].history, vec![controller::LagMinute { minute_ms: 0, max_lag_ms: 9_000 }]);
    assert_eq!(lags[0].current_minute, Some(controller::LagMinute { minute_ms: 60_000, max_lag_ms: 1_000 }));

    // Minutes 2 and 3 (no refresh in minute 2, so it has no row): with two minutes kept, minute 0 goes
    // once minute 3 begins.
    h.core.tick(121_000);
    assert_eq!(h.introspection_rows(IntrospectionKind::WallclockLagHistory).len(), 4, "minutes 0 and 1");
    h.core.tick(181_000);
    assert_eq!(
        h.introspection_rows(IntrospectionKind::WallclockLagHistory),
        vec![
            history_row(R1, u(1), 60_000, 1_000),
            history_row(R1, u(1), 120_000, 61_000),
            history_row(R2, u(1), 60_000, 1_000),
            history_row(R2, u(1), 120_000, 61_000),
        ]
    );

    // A dropped replica's history goes, and a dropped collection's.
    h.core.drop_replica(R2).unwrap();
    h.drain();
    assert_eq!(h.introspection_rows(IntrospectionKind::WallclockLagHistory).len(), 2);
    h.core.drop_collections(&[u(1)]).unwrap();
    h.drain();
    assert_eq!(h.introspection_rows(IntrospectionKind::WallclockLagHistory), vec![]);
    assert_eq!(h.core.wallclock_lag(u(1)), None, "not a live collection");
    h.core.tick(241_000);
    assert_eq!(
        h.introspection_rows(IntrospectionKind::WallclockLagHistory),
        vec![],
        "and nothing comes back"
    );
}

#[test]
fn hydration_status_says_since_when_each_replica_hydrates_and_how_long_it_took() {
    let mut h = Harness::new();
    h.create_storage(s(1));
    at(&mut h, 100);
    h.add_replica(R1);
    at(&mut h, 200);
    h.create(index_on_storage(s(1), u(1), 5)).unwrap();
    at(&mut h, 1_200);
    h.report(R1, u(1), f(6));
    h.core.add_replica(R2).unwrap();
    let status = h.core.hydration_status(u(1)).unwrap();
    assert_eq!(
        status,
        vec![
            controller::ReplicaHydration {
                replica: R1,
                hydrated: true,
                hydrating_since_ms: Some(200),
                hydrated_at_ms: Some(1_200),
                hydration_time_ms: Some(1_000),
            },
            controller::ReplicaHydration {
                replica: R2,
                hydrated: false,
                hydrating_since_ms: None,
                hydrated_at_ms: None,
                hydration_time_ms: None,
            },
        ]
    );
    // R2 connects at 1,500 and hydrates at 1,800 (past the as-of it was replayed at: the index's since,
    // 6 by then): its time counts from its connection.
    at(&mut h, 1_500);
    h.status(R2, ReplicaStatus::Ready);
    assert_eq!(h.core.replica_health(R2), Some(&controller::ReplicaHealth::Hydrating));
    at(&mut h, 1_800);
    h.report(R2, u(1), f(7));
    assert_eq!(h.core.replica_health(R2), Some(&controller::ReplicaHealth::Connected));
    let r2 = h.core.hydration_status(u(1)).unwrap().remove(1);
    assert_eq!(
        (r2.hydrating_since_ms, r2.hydrated_at_ms, r2.hydration_time_ms),
        (Some(1_500), Some(1_800), Some(300))
    );
    assert_eq!(h.core.hydration_status(u(9)), None);
}
