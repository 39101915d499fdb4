//! Peek holds: released only after every replica the peek went to has answered, been cancelled and
//! answered, or been dropped.

use std::num::NonZeroU64;

use controller::{ComputeControllerResponse, PeekFailure, PeekOutcome, PeekResult};
use protocol::{ComputeCommand, Datum, PeekId, PeekResponse, ReplicaId, Row};

use crate::harness::{Harness, f, index_on_storage, peek_request, s, u};

fn rows(i: i64) -> PeekResponse {
    PeekResponse::Rows(vec![(Row::pack([Datum::Int64(i), Datum::Int64(0)]), NonZeroU64::new(1).unwrap())])
}

/// What the caller of a peek answered with [`rows`]`(i)` gets.
fn rows_result(i: i64) -> PeekResult {
    Ok(vec![(Row::pack([Datum::Int64(i), Datum::Int64(0)]), NonZeroU64::new(1).unwrap())])
}

fn two_replicas() -> Harness {
    // Lag 1: the latest complete time stays readable.
    let mut h =
        Harness::with_policy(frontiers::ReadPolicy::LagWriteFrontier { lag_ms: 1, granularity_ms: 0 });
    h.create_storage(s(1));
    h.add_replica(ReplicaId(1));
    h.add_replica(ReplicaId(2));
    h.create(index_on_storage(s(1), u(1), 0)).unwrap();
    for r in [ReplicaId(1), ReplicaId(2)] {
        h.report(r, u(1), f(5));
    }
    h
}

/// The index's since can pass the peek time only once the peek's hold is gone.
fn held_at(h: &Harness, t: u64) -> bool {
    h.since(u(1)) == f(t)
}

#[test]
fn the_peek_hold_stays_until_the_slow_replica_answers() {
    let mut h = two_replicas();
    h.core.peek(peek_request(1, u(1), 4)).unwrap();
    h.drain();
    for r in [ReplicaId(1), ReplicaId(2)] {
        h.report(r, u(1), f(20));
    }
    assert!(held_at(&h, 4));
    h.answer(ReplicaId(1), 1, rows(1));
    assert_eq!(h.peek_results[&PeekId(1)], rows_result(1), "the first answer wins");
    assert!(h.commands[&ReplicaId(2)].contains(&ComputeCommand::CancelPeek { uuid: PeekId(1) }));
    assert!(held_at(&h, 4), "the slow replica may still be reading at 4");
    h.answer(ReplicaId(2), 1, PeekResponse::Canceled);
    assert!(held_at(&h, 19));
    assert_eq!(h.core.pending_peek_count(), 0);
    let notification = h.responses.iter().find_map(|r| match r {
        ComputeControllerResponse::PeekNotification(n) => Some(n.clone()),
        _ => None,
    });
    let notification = notification.expect("a notification");
    assert_eq!(notification.replica, Some(ReplicaId(1)));
    assert_eq!(notification.outcome, PeekOutcome::Rows(1));
}

#[test]
fn a_cancelled_peek_keeps_its_hold_until_every_replica_answered() {
    let mut h = two_replicas();
    h.core.peek(peek_request(1, u(1), 4)).unwrap();
    h.core.cancel_peek(PeekId(1)).unwrap();
    h.drain();
    assert_eq!(h.peek_results[&PeekId(1)], Err(PeekFailure::Canceled));
    for r in [ReplicaId(1), ReplicaId(2)] {
        h.report(r, u(1), f(20));
        assert!(h.commands[&r].contains(&ComputeCommand::CancelPeek { uuid: PeekId(1) }));
    }
    h.answer(ReplicaId(1), 1, PeekResponse::Canceled);
    assert!(held_at(&h, 4));
    h.answer(ReplicaId(2), 1, rows(2));
    assert!(held_at(&h, 19));
    assert_eq!(h.peek_results[&PeekId(1)], Err(PeekFailure::Canceled), "a late answer changes nothing");
}

#[test]
fn dropping_a_replica_mid_peek_releases_its_share_of_the_hold() {
    let mut h = two_replicas();
    h.core.peek(peek_request(1, u(1), 4)).unwrap();
    h.drain();
    for r in [ReplicaId(1), ReplicaId(2)] {
        h.report(r, u(1), f(20));
    }
    h.answer(ReplicaId(1), 1, rows(1));
    assert!(held_at(&h, 4));
    h.core.drop_replica(ReplicaId(2)).unwrap();
    h.drain();
    assert!(held_at(&h, 19));
    assert_eq!(h.core.pending_peek_count(), 0);
}

#[test]
fn a_peek_targeted_at_a_replica_that_is_then_dropped_fails_and_lets_go() {
    let mut h = two_replicas();
    let mut request = peek_request(1, u(1), 4);
    request.options.target_replica = Some(ReplicaId(2));
    h.core.peek(request).unwrap();
    h.drain();
    assert!(
        !h.commands[&ReplicaId(1)].iter().any(|c| matches!(c, ComputeCommand::Peek(_))),
        "only the target is asked"
    );
    for r in [ReplicaId(1), ReplicaId(2)] {
        h.report(r, u(1), f(20));
    }
    assert!(held_at(&h, 4));
    h.core.drop_replica(ReplicaId(2)).unwrap();
    h.drain();
    assert_eq!(h.peek_results[&PeekId(1)], Err(PeekFailure::ReplicaDropped(ReplicaId(2))));
    assert!(held_at(&h, 19));
}

#[test]
fn a_peek_prepared_for_a_replica_dropped_before_it_starts_fails_at_once_and_lets_go() {
    // The controller's handle prepares a peek itself; a `drop_replica` it sent earlier (and did not
    // await) may reach the instance task first.
    let mut h = two_replicas();
    let mut request = peek_request(1, u(1), 4);
    request.options.target_replica = Some(ReplicaId(2));
    let prepared = controller::lock(&h.core.shared()).prepare_peek(request).unwrap();
    for r in [ReplicaId(1), ReplicaId(2)] {
        h.report(r, u(1), f(20));
    }
    assert!(held_at(&h, 4), "a prepared peek holds its index");
    h.core.drop_replica(ReplicaId(2)).unwrap();
    h.core.install_peek(prepared);
    h.drain();
    assert_eq!(h.peek_results[&PeekId(1)], Err(PeekFailure::ReplicaDropped(ReplicaId(2))));
    assert!(
        !h.commands[&ReplicaId(1)].iter().any(|c| matches!(c, ComputeCommand::Peek(_))),
        "nobody is asked"
    );
    assert_eq!(h.core.pending_peek_count(), 0);
    assert!(held_at(&h, 19), "the hold is released: since {:?}", h.since(u(1)));
}

#[test]
fn preparing_a_peek_checks_what_the_instance_would_and_takes_no_hold_on_failure() {
    let mut h = two_replicas();
    for r in [ReplicaId(1), ReplicaId(2)] {
        h.report(r, u(1), f(20));
    }
    let mut request = peek_request(1, u(1), 19);
    request.options.target_replica = Some(ReplicaId(3));
    let error = controller::lock(&h.core.shared()).prepare_peek(request).unwrap_err();
    assert_eq!(error, controller::PeekError::ReplicaMissing(ReplicaId(3)));
    let error = controller::lock(&h.core.shared()).prepare_peek(peek_request(2, u(2), 19)).unwrap_err();
    assert!(matches!(error, controller::PeekError::CollectionMissing(_)), "got {error:?}");
    let error = controller::lock(&h.core.shared()).prepare_peek(peek_request(3, u(1), 3)).unwrap_err();
    assert!(matches!(error, controller::PeekError::SinceViolation { .. }), "got {error:?}");
    assert!(held_at(&h, 19), "no hold was taken");
}

#[test]
fn a_replica_added_while_a_peek_is_pending_is_asked_too_and_awaited() {
    let mut h = two_replicas();
    h.core.peek(peek_request(1, u(1), 4)).unwrap();
    h.drain();
    let history = h.core.add_replica(ReplicaId(3)).unwrap();
    assert!(history.replay().iter().any(|c| matches!(c, ComputeCommand::Peek(p) if p.uuid == PeekId(1))));
    h.answer(ReplicaId(1), 1, rows(1));
    h.answer(ReplicaId(2), 1, rows(1));
    assert_eq!(h.core.pending_peek_count(), 1, "replica 3 still owes an answer");
    h.answer(ReplicaId(3), 1, PeekResponse::Canceled);
    assert_eq!(h.core.pending_peek_count(), 0);
}

#[test]
fn a_peek_that_times_out_fails_with_timed_out_cancels_at_its_replicas_and_releases_its_hold() {
    let mut h = two_replicas();
    let mut request = peek_request(1, u(1), 4);
    request.options.timeout_ms = Some(100);
    h.core.peek(request).unwrap();
    for r in [ReplicaId(1), ReplicaId(2)] {
        h.report(r, u(1), f(20));
    }
    h.core.tick(99);
    h.drain();
    assert!(h.peek_results.is_empty());
    assert!(held_at(&h, 4));
    h.core.tick(100);
    h.drain();
    assert_eq!(h.peek_results[&PeekId(1)], Err(PeekFailure::TimedOut { after_ms: 100 }));
    for r in [ReplicaId(1), ReplicaId(2)] {
        assert!(
            h.commands[&r].contains(&ComputeCommand::CancelPeek { uuid: PeekId(1) }),
            "{r} told to cancel"
        );
    }
    assert_eq!(h.core.pending_peek_count(), 0, "nobody is waited for past the deadline");
    assert!(held_at(&h, 19), "the hold is released: since {:?}", h.since(u(1)));
    h.answer(ReplicaId(1), 1, PeekResponse::Canceled);
    h.answer(ReplicaId(2), 1, rows(1));
    assert!(h.disconnects.is_empty(), "late answers to a finished peek are ignored");
}

#[test]
fn a_peek_without_its_own_timeout_ends_at_the_instance_default() {
    let mut h = two_replicas();
    h.core.peek(peek_request(1, u(1), 4)).unwrap();
    let default_ms = controller::InstanceCoreConfig::<u64>::default().default_peek_timeout_ms;
    h.core.tick(default_ms - 1);
    h.drain();
    assert!(h.peek_results.is_empty());
    h.core.tick(default_ms);
    h.drain();
    assert_eq!(h.peek_results[&PeekId(1)], Err(PeekFailure::TimedOut { after_ms: default_ms }));
    assert_eq!(h.core.pending_peek_count(), 0);
}

#[test]
fn an_answered_peek_stops_waiting_for_a_silent_replica_at_its_deadline() {
    let mut h = two_replicas();
    let mut request = peek_request(1, u(1), 4);
    request.options.timeout_ms = Some(100);
    h.core.peek(request).unwrap();
    for r in [ReplicaId(1), ReplicaId(2)] {
        h.report(r, u(1), f(20));
    }
    h.answer(ReplicaId(1), 1, rows(1));
    assert_eq!(h.peek_results[&PeekId(1)], rows_result(1));
    h.core.tick(99);
    h.drain();
    assert!(held_at(&h, 4), "replica 2 may still be reading until the deadline");
    h.core.tick(100);
    h.drain();
    assert_eq!(h.core.pending_peek_count(), 0);
    assert!(held_at(&h, 19), "the hold is released: since {:?}", h.since(u(1)));
    assert_eq!(h.peek_results[&PeekId(1)], rows_result(1), "the caller's answer stays the first one");
}

#[test]
fn peek_results_get_the_full_finishing_applied_by_the_controller() {
    let mut h = two_replicas();
    let mut request = peek_request(1, u(1), 4);
    request.options.finishing = protocol::RowSetFinishing {
        order_by: vec![protocol::ColumnOrder::desc(0)],
        limit: Some(2),
        offset: 1,
    };
    h.core.peek(request).unwrap();
    h.drain();
    let sent = h.commands[&ReplicaId(1)].iter().find_map(|c| match c {
        ComputeCommand::Peek(p) => Some(p.finishing.clone()),
        _ => None,
    });
    assert_eq!(sent.map(|f| (f.limit, f.offset)), Some((Some(3), 0)), "replicas get the partial finishing");
    let all = PeekResponse::Rows(
        (1..=5)
            .map(|i| (Row::pack([Datum::Int64(i), Datum::Int64(0)]), NonZeroU64::new(1).unwrap()))
            .collect(),
    );
    h.answer(ReplicaId(1), 1, all);
    match &h.peek_results[&PeekId(1)] {
        Ok(rows) => {
            let keys: Vec<Datum<'_>> = rows.iter().map(|(r, _)| r.get(0).unwrap()).collect();
            assert_eq!(keys, vec![Datum::Int64(4), Datum::Int64(3)]);
        }
        other => panic!("unexpected {other:?}"),
    }
}
