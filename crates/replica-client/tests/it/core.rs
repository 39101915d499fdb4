//! The replica core's connection lifecycle, driven without sockets: handshake, replay, reconnect,
//! multi-process merging, the peek contract, protocol violations and backoff.

use std::num::NonZeroU64;

use frontiers::Antichain;
use protocol::{
    ComputeCommand, ComputeResponse, CopyToResponse, Datum, FrontiersResponse, GlobalId, InstanceConfig,
    InstanceId, MapFilterProject, PROTOCOL_VERSION, Peek, PeekId, PeekResponse, PeekTarget, ReplicaId, Row,
    RowSetFinishing, StatusResponse, SubscribeResponse,
};
use replica_client::{Backoff, CommandHistory, ReplicaCore, ReplicaCoreConfig, ReplicaOutput, ReplicaStatus};

use crate::model::dataflow;

/// A core plus everything it emitted.
struct Harness {
    core: ReplicaCore<u64>,
    now: u64,
    sent: Vec<(u64, ComputeCommand<u64>)>,
    delivered: Vec<ComputeResponse<u64>>,
    statuses: Vec<ReplicaStatus>,
    connects: Vec<u64>,
    disconnects: Vec<u64>,
}

impl Harness {
    fn new(processes: usize) -> Self {
        let config = ReplicaCoreConfig {
            replica_id: ReplicaId(7),
            processes,
            backoff: Backoff { initial_ms: 100, max_ms: 1_000 },
            hydration_concurrency: None,
        };
        let mut harness = Harness {
            core: ReplicaCore::new(config, CommandHistory::new()),
            now: 0,
            sent: Vec::new(),
            delivered: Vec::new(),
            statuses: Vec::new(),
            connects: Vec::new(),
            disconnects: Vec::new(),
        };
        harness.core.tick(0);
        harness.drain();
        harness
    }

    fn drain(&mut self) {
        while let Some(output) = self.core.poll() {
            match output {
                ReplicaOutput::Connect { epoch } => self.connects.push(epoch),
                ReplicaOutput::Send { epoch, command } => self.sent.push((epoch, command)),
                ReplicaOutput::Disconnect { epoch, .. } => self.disconnects.push(epoch),
                ReplicaOutput::Response(r) => self.delivered.push(r),
                ReplicaOutput::Status(s) => self.statuses.push(s),
            }
        }
    }

    /// Connects the current epoch and completes the handshake with every process.
    fn connect(&mut self) {
        let epoch = self.core.epoch();
        self.core.connected(epoch);
        self.drain();
        let nonce = match self.sent.last() {
            Some((_, ComputeCommand::Hello { nonce, .. })) => *nonce,
            other => panic!("expected a Hello, got {other:?}"),
        };
        for process in 0..2 {
            self.core.receive(
                epoch,
                process,
                ComputeResponse::Hello { version: PROTOCOL_VERSION, nonce },
                self.now,
                0.5,
            );
        }
        self.drain();
    }

    fn receive(&mut self, process: usize, response: ComputeResponse<u64>) {
        let epoch = self.core.epoch();
        self.core.receive(epoch, process, response, self.now, 0.5);
        self.drain();
    }

    fn lose_connection(&mut self) {
        let epoch = self.core.epoch();
        self.core.connection_lost(epoch, self.now, "test", 1.0);
        self.drain();
    }

    fn advance_to_retry(&mut self) {
        self.now = self.core.next_timer_ms().expect("a retry is scheduled");
        self.core.tick(self.now);
        self.drain();
    }

    fn sent_since(&self, start: usize) -> Vec<&ComputeCommand<u64>> {
        self.sent[start..].iter().map(|(_, c)| c).collect()
    }
}

fn peek(uuid: u64) -> ComputeCommand<u64> {
    ComputeCommand::Peek(Peek {
        uuid: PeekId(uuid),
        target: PeekTarget::Index { id: GlobalId::User(1) },
        timestamp: 5,
        literal_constraints: None,
        map_filter_project: MapFilterProject::new(1),
        finishing: RowSetFinishing::unordered(),
    })
}

fn rows(i: i64) -> PeekResponse {
    PeekResponse::Rows(vec![(Row::pack([Datum::Int64(i)]), NonZeroU64::new(1).unwrap())])
}

fn write_frontier(id: u64, t: u64) -> ComputeResponse<u64> {
    ComputeResponse::Frontiers {
        id: GlobalId::User(id),
        frontiers: FrontiersResponse { write_frontier: Some(Antichain::from_elem(t)), ..Default::default() },
    }
}

fn instance() -> ComputeCommand<u64> {
    ComputeCommand::CreateInstance(InstanceConfig { instance_id: InstanceId(1), replica_id: ReplicaId(7) })
}

#[test]
fn after_the_handshake_the_history_is_replayed_then_initialization_completes() {
    let mut h = Harness::new(2);
    h.core.send(instance()).unwrap();
    h.core.send(ComputeCommand::CreateDataflow(dataflow("a", 1, 1, 0))).unwrap();
    h.core.send(ComputeCommand::Schedule(GlobalId::User(1))).unwrap();
    h.drain();
    assert!(h.sent.is_empty(), "nothing is sent before a connection");
    assert_eq!(h.connects, vec![1]);
    h.connect();
    let names: Vec<&str> = h.sent.iter().map(|(_, c)| c.name()).collect();
    assert_eq!(names, ["Hello", "CreateInstance", "CreateDataflow", "Schedule", "InitializationComplete"]);
    assert_eq!(h.statuses.last(), Some(&ReplicaStatus::Hydrating));
    h.receive(0, write_frontier(1, 1));
    assert_eq!(h.statuses.last(), Some(&ReplicaStatus::Hydrating), "one process is not the replica");
    h.receive(1, write_frontier(1, 3));
    assert_eq!(h.delivered, vec![write_frontier(1, 1)]);
    assert_eq!(h.statuses.last(), Some(&ReplicaStatus::Ready));
}

#[test]
fn a_reconnect_replays_only_the_live_state_and_resets_frontiers() {
    let mut h = Harness::new(2);
    h.core.send(instance()).unwrap();
    h.connect();
    h.core.send(ComputeCommand::CreateDataflow(dataflow("gone", 1, 1, 0))).unwrap();
    h.core.send(ComputeCommand::CreateDataflow(dataflow("kept", 2, 1, 0))).unwrap();
    h.core
        .send(ComputeCommand::AllowCompaction { id: GlobalId::User(2), frontier: Antichain::from_elem(4) })
        .unwrap();
    h.core
        .send(ComputeCommand::AllowCompaction { id: GlobalId::User(2), frontier: Antichain::from_elem(6) })
        .unwrap();
    h.core
        .send(ComputeCommand::AllowCompaction { id: GlobalId::User(1), frontier: Antichain::new() })
        .unwrap();
    h.drain();
    h.receive(0, write_frontier(2, 9));
    h.receive(1, write_frontier(2, 9));
    h.lose_connection();
    assert!(matches!(h.statuses.last(), Some(ReplicaStatus::Failed { .. })));
    h.advance_to_retry();
    let start = h.sent.len();
    h.connect();
    let replay: Vec<String> = h
        .sent_since(start)
        .iter()
        .map(|c| match c {
            ComputeCommand::CreateDataflow(d) => {
                format!("CreateDataflow {} as_of {:?}", d.debug_name, d.as_of.as_ref().unwrap().elements())
            }
            ComputeCommand::AllowCompaction { id, frontier } => {
                format!("AllowCompaction {id} {:?}", frontier.elements())
            }
            other => other.name().to_string(),
        })
        .collect();
    assert_eq!(
        replay,
        [
            "Hello",
            "CreateInstance",
            "CreateDataflow kept as_of [6]",
            "AllowCompaction u2 [6]",
            "InitializationComplete"
        ]
    );
    // A frontier below the last connection's is not a regression: state is per connection.
    h.delivered.clear();
    h.receive(0, write_frontier(2, 7));
    h.receive(1, write_frontier(2, 7));
    assert_eq!(h.delivered, vec![write_frontier(2, 7)]);
    assert!(h.disconnects.is_empty());
}

#[test]
fn a_peek_is_answered_once_with_the_union_of_both_processes_in_either_order() {
    for first in [0, 1] {
        let mut h = Harness::new(2);
        h.connect();
        h.core.send(peek(1)).unwrap();
        h.drain();
        h.receive(first, ComputeResponse::PeekResponse { uuid: PeekId(1), response: rows(first as i64) });
        assert!(h.delivered.is_empty());
        h.receive(
            1 - first,
            ComputeResponse::PeekResponse { uuid: PeekId(1), response: rows(1 - first as i64) },
        );
        assert_eq!(h.delivered.len(), 1);
        match &h.delivered[0] {
            ComputeResponse::PeekResponse { response: PeekResponse::Rows(r), .. } => assert_eq!(r.len(), 2),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(h.core.history().peek_count(), 0, "an answered peek leaves the history");
    }
}

#[test]
fn a_pending_peek_is_replayed_after_a_reconnect_and_answered_there() {
    let mut h = Harness::new(2);
    h.connect();
    h.core.send(peek(1)).unwrap();
    h.drain();
    h.receive(0, ComputeResponse::PeekResponse { uuid: PeekId(1), response: rows(0) });
    h.lose_connection();
    h.advance_to_retry();
    let start = h.sent.len();
    h.connect();
    assert!(h.sent_since(start).iter().any(|c| matches!(c, ComputeCommand::Peek(p) if p.uuid == PeekId(1))));
    // The half answer of the old connection is gone: both processes answer again.
    h.receive(0, ComputeResponse::PeekResponse { uuid: PeekId(1), response: rows(0) });
    assert!(h.delivered.is_empty());
    h.receive(1, ComputeResponse::PeekResponse { uuid: PeekId(1), response: rows(1) });
    assert_eq!(h.delivered.len(), 1);
}

#[test]
fn a_peek_cancelled_while_disconnected_is_answered_canceled_by_the_core() {
    let mut h = Harness::new(2);
    h.core.send(peek(1)).unwrap();
    h.core.send(ComputeCommand::CancelPeek { uuid: PeekId(1) }).unwrap();
    h.drain();
    assert_eq!(
        h.delivered,
        vec![ComputeResponse::PeekResponse { uuid: PeekId(1), response: PeekResponse::Canceled }]
    );
    assert_eq!(h.core.history().peek_count(), 0);
}

#[test]
fn a_peek_cancelled_on_the_wire_and_then_cut_off_is_answered_canceled_by_the_core() {
    let mut h = Harness::new(2);
    h.connect();
    h.core.send(peek(1)).unwrap();
    h.core.send(ComputeCommand::CancelPeek { uuid: PeekId(1) }).unwrap();
    h.drain();
    assert!(h.sent.iter().any(|(_, c)| matches!(c, ComputeCommand::CancelPeek { .. })));
    assert!(h.delivered.is_empty(), "the replica will answer");
    h.lose_connection();
    assert_eq!(
        h.delivered,
        vec![ComputeResponse::PeekResponse { uuid: PeekId(1), response: PeekResponse::Canceled }]
    );
}

#[test]
fn a_refused_hello_fails_the_replica_with_both_versions_in_the_reason_and_retries() {
    let mut h = Harness::new(2);
    let epoch = h.core.epoch();
    h.core.connected(epoch);
    h.drain();
    h.core.receive(
        epoch,
        0,
        ComputeResponse::HelloRefused { version: PROTOCOL_VERSION + 1, reason: "too new".into() },
        0,
        0.0,
    );
    h.drain();
    match h.statuses.last() {
        Some(ReplicaStatus::Failed { reason, retry_in_ms }) => {
            assert!(reason.contains(&(PROTOCOL_VERSION + 1).to_string()), "{reason}");
            assert_eq!(*retry_in_ms, 50);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(h.disconnects, vec![epoch]);
    // A mismatched version in an accepting Hello is refused the same way.
    h.advance_to_retry();
    let epoch = h.core.epoch();
    h.core.connected(epoch);
    h.drain();
    let nonce = match h.sent.last() {
        Some((_, ComputeCommand::Hello { nonce, .. })) => *nonce,
        _ => unreachable!(),
    };
    h.core.receive(epoch, 0, ComputeResponse::Hello { version: PROTOCOL_VERSION + 3, nonce }, h.now, 0.0);
    h.drain();
    assert!(
        matches!(h.statuses.last(), Some(ReplicaStatus::Failed { reason, .. }) if reason.contains("version mismatch"))
    );
}

#[test]
fn a_process_regressing_a_frontier_gets_the_replica_disconnected() {
    let mut h = Harness::new(2);
    h.connect();
    h.core.send(ComputeCommand::CreateDataflow(dataflow("df", 1, 1, 0))).unwrap();
    h.receive(0, write_frontier(1, 5));
    h.receive(0, write_frontier(1, 4));
    assert_eq!(h.disconnects, vec![1]);
    assert!(
        matches!(h.statuses.last(), Some(ReplicaStatus::Failed { reason, .. }) if reason.contains("regressed"))
    );
}

#[test]
fn a_response_for_a_collection_the_connection_never_created_gets_the_replica_disconnected() {
    let unknown: [ComputeResponse<u64>; 4] = [
        write_frontier(9, 5),
        ComputeResponse::SubscribeResponse {
            id: GlobalId::User(9),
            response: SubscribeResponse::DroppedAt(Antichain::from_elem(1)),
        },
        ComputeResponse::CopyToResponse { id: GlobalId::User(9), response: CopyToResponse::Dropped },
        ComputeResponse::Status(StatusResponse::Hydration { id: GlobalId::User(9), hydrated: true }),
    ];
    for response in unknown {
        let name = response.name();
        let mut h = Harness::new(2);
        h.connect();
        h.core.send(ComputeCommand::CreateDataflow(dataflow("df", 1, 1, 0))).unwrap();
        h.drain();
        h.receive(0, write_frontier(1, 5));
        assert!(h.disconnects.is_empty(), "{name}: a created collection's frontier is fine");
        h.receive(1, response);
        assert_eq!(h.disconnects, vec![1], "{name}: unknown id disconnects");
        assert!(
            matches!(h.statuses.last(), Some(ReplicaStatus::Failed { reason, .. })
                if reason.contains("u9") && reason.contains("never created")),
            "{name}: {:?}",
            h.statuses.last()
        );
        assert!(h.delivered.is_empty(), "{name}: nothing about the unknown id reaches the owner");
    }
}

#[test]
fn a_collection_is_known_again_after_a_replay_and_forgotten_once_dropped_and_reported_gone() {
    let mut h = Harness::new(2);
    h.core.send(ComputeCommand::CreateDataflow(dataflow("kept", 1, 1, 0))).unwrap();
    h.core.send(ComputeCommand::CreateDataflow(dataflow("dropped", 2, 1, 0))).unwrap();
    // Created before the connection: known through the replay.
    h.connect();
    h.receive(0, write_frontier(1, 5));
    h.receive(1, write_frontier(1, 5));
    assert_eq!(h.delivered, vec![write_frontier(1, 5)]);
    h.core
        .send(ComputeCommand::AllowCompaction { id: GlobalId::User(2), frontier: Antichain::new() })
        .unwrap();
    h.drain();
    let gone = FrontiersResponse {
        write_frontier: Some(Antichain::new()),
        input_frontier: Some(Antichain::new()),
        output_frontier: Some(Antichain::new()),
    };
    h.receive(0, ComputeResponse::Frontiers { id: GlobalId::User(2), frontiers: gone.clone() });
    h.receive(1, ComputeResponse::Frontiers { id: GlobalId::User(2), frontiers: gone });
    assert!(h.disconnects.is_empty(), "the dropped collection's last report is fine");
    // After its drop was reported, the collection is gone: news of it is a violation.
    h.receive(0, write_frontier(2, 7));
    assert_eq!(h.disconnects, vec![1]);
}

#[test]
fn responses_from_an_old_connection_are_ignored() {
    let mut h = Harness::new(2);
    h.connect();
    h.lose_connection();
    h.advance_to_retry();
    h.connect();
    h.core.receive(1, 0, write_frontier(1, 5), h.now, 0.0);
    h.core.receive(1, 1, write_frontier(1, 5), h.now, 0.0);
    h.drain();
    assert!(h.delivered.is_empty());
}

#[test]
fn backoff_doubles_with_each_failure_and_resets_after_a_success() {
    let mut h = Harness::new(2);
    let mut delays = Vec::new();
    for _ in 0..5 {
        let epoch = h.core.epoch();
        h.core.connect_failed(epoch, h.now, "refused", 1.0);
        h.drain();
        let retry_at = h.core.next_timer_ms().unwrap();
        delays.push(retry_at - h.now);
        h.advance_to_retry();
    }
    assert_eq!(delays, vec![100, 200, 400, 800, 1_000]);
    h.connect();
    h.lose_connection();
    assert_eq!(h.core.next_timer_ms().unwrap() - h.now, 100);
}
