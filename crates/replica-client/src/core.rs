//! [`ReplicaCore`]: the synchronous state machine behind one replica connection.
//!
//! Inputs: commands from the owner ([`send`](ReplicaCore::send)), connection events from the transport
//! ([`connected`](ReplicaCore::connected), [`connect_failed`](ReplicaCore::connect_failed),
//! [`connection_lost`](ReplicaCore::connection_lost)), each process's responses
//! ([`receive`](ReplicaCore::receive)), and the passage of time ([`tick`](ReplicaCore::tick)). Outputs
//! ([`ReplicaOutput`], drained with [`poll`](ReplicaCore::poll)): connect, send a command to every process,
//! drop the connection, deliver a merged response, report a status change.
//!
//! Lifecycle of a connection (one *epoch* per attempt; events of older epochs are ignored):
//!
//! ```text
//! Idle --retry due--> Connecting --connected--> Handshaking --every process said Hello--> Live
//!   ^                     |                          |                                     |
//!   +---- backoff --------+---- failed / refused ----+------- lost / protocol violation ---+
//! ```
//!
//! On entering `Live` the core replays the compacted [`CommandHistory`] (through the [`HydrationGate`],
//! so the hydration limit applies again) and sends `InitializationComplete`. Merge state and hydration
//! progress are per epoch and reset on every new connection: frontiers are never carried across.
//!
//! **Protocol violations** (the connection is dropped and the replica rehydrated after backoff): a
//! handshake answer that does not match, a response the merger rejects (a regressing frontier, a peek
//! answered twice, a gap in a subscribe, an unknown process), and a response naming a collection this
//! connection never created, or one whose drop it already reported complete.
//!
//! **Peek contract:** every `Peek` given to [`send`](ReplicaCore::send) gets exactly one merged
//! `PeekResponse` back, however the connection fails, as long as the core lives: pending peeks are
//! replayed after a reconnect, and a peek cancelled while its answer cannot arrive any more is answered
//! `Canceled` by the core itself.
//!
//! No clock, no randomness: `now_ms` and the backoff jitter come from the caller (the tokio shell or the
//! simulator). **Tests:** `tests/it/core.rs` drives it without sockets.

use std::collections::{BTreeSet, VecDeque};

use frontiers::Timestamp;
use protocol::frame::check_hello_answer;
use protocol::{
    ComputeCommand, ComputeResponse, GlobalId, PROTOCOL_VERSION, PeekId, PeekResponse, ReplicaId,
    StatusResponse,
};

use crate::history::{CommandHistory, HistoryError};
use crate::hydration::HydrationGate;
use crate::merge::ResponseMerger;

/// Exponential backoff with jitter between connection attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure, in milliseconds.
    pub initial_ms: u64,
    /// The largest delay, in milliseconds.
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial_ms: 100, max_ms: 10_000 }
    }
}

impl Backoff {
    /// The delay after `failures` consecutive failures (at least 1): `initial * 2^(failures-1)` capped at
    /// `max`, of which the upper half is scaled by `jitter` in `[0, 1]` ("equal jitter": never below half
    /// the nominal delay, never above it).
    ///
    /// # Examples
    /// ```
    /// use replica_client::Backoff;
    /// let b = Backoff { initial_ms: 100, max_ms: 1_000 };
    /// assert_eq!(b.delay_ms(1, 1.0), 100);
    /// assert_eq!(b.delay_ms(1, 0.0), 50);
    /// assert_eq!(b.delay_ms(3, 1.0), 400);
    /// assert_eq!(b.delay_ms(30, 1.0), 1_000);
    /// ```
    pub fn delay_ms(&self, failures: u32, jitter: f64) -> u64 {
        let exponent = failures.saturating_sub(1).min(32);
        let nominal = self.initial_ms.saturating_mul(1u64 << exponent).min(self.max_ms);
        let half = nominal / 2;
        half + ((nominal - half) as f64 * jitter.clamp(0.0, 1.0)) as u64
    }
}

/// The configuration of one replica's core.
#[derive(Debug, Clone)]
pub struct ReplicaCoreConfig {
    /// The replica.
    pub replica_id: ReplicaId,
    /// How many processes it has (at least one).
    pub processes: usize,
    /// Reconnection backoff.
    pub backoff: Backoff,
    /// The initial hydration limit (`None`: unlimited); `UpdateConfiguration` changes it.
    pub hydration_concurrency: Option<usize>,
}

/// The replica's connection status, as reported to the owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaStatus {
    /// A connection attempt is under way.
    Connecting {
        /// The attempt's epoch.
        epoch: u64,
    },
    /// Connected and initialized; some scheduled dataflow has not hydrated yet.
    Hydrating,
    /// Connected, initialized, and every scheduled dataflow has hydrated.
    Ready,
    /// The last attempt failed or the connection was lost; the next attempt is due in `retry_in_ms`.
    Failed {
        /// What went wrong.
        reason: String,
        /// When the next attempt starts, in milliseconds from the failure.
        retry_in_ms: u64,
    },
}

/// What the core asks its shell (or simulator) to do, or hands to its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicaOutput<T: Timestamp> {
    /// Open a connection to every process; report the result with `connected` or `connect_failed`.
    Connect {
        /// The attempt.
        epoch: u64,
    },
    /// Send this command to every process of the connection, after all earlier ones.
    Send {
        /// The connection.
        epoch: u64,
        /// The command.
        command: ComputeCommand<T>,
    },
    /// Close the connection (a protocol violation was detected); a reconnect follows after backoff.
    Disconnect {
        /// The connection.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// A merged response for the owner.
    Response(ComputeResponse<T>),
    /// The replica's status changed.
    Status(ReplicaStatus),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Connection {
    /// No connection; the next attempt is due at `retry_at_ms`.
    Idle {
        retry_at_ms: u64,
    },
    Connecting,
    Handshaking {
        nonce: u64,
        answered: Vec<bool>,
    },
    Live,
}

/// One replica's connection logic. See the module documentation.
#[derive(Debug)]
pub struct ReplicaCore<T: Timestamp> {
    config: ReplicaCoreConfig,
    history: CommandHistory<T>,
    gate: HydrationGate<T>,
    merger: ResponseMerger<T>,
    connection: Connection,
    epoch: u64,
    failures: u32,
    /// Peeks sent on the current connection and not yet answered.
    in_flight_peeks: BTreeSet<PeekId>,
    /// Collections created on the current connection and not yet reported gone after their drop: the
    /// only ids a response may name. (Exactly the lifetime of their merge state.)
    installed: BTreeSet<GlobalId>,
    status: Option<ReplicaStatus>,
    outputs: VecDeque<ReplicaOutput<T>>,
}

impl<T: Timestamp> ReplicaCore<T> {
    /// A core that starts connecting at once, with `history` as the state to replay (an instance's template,
    /// or empty).
    pub fn new(config: ReplicaCoreConfig, history: CommandHistory<T>) -> Self {
        assert!(config.processes > 0, "a replica has at least one process");
        let gate = HydrationGate::new(
            history.parameters().and_then(|p| p.hydration_concurrency).or(config.hydration_concurrency),
        );
        let merger = ResponseMerger::new(config.processes);
        ReplicaCore {
            config,
            history,
            gate,
            merger,
            connection: Connection::Idle { retry_at_ms: 0 },
            epoch: 0,
            failures: 0,
            in_flight_peeks: BTreeSet::new(),
            installed: BTreeSet::new(),
            status: None,
            outputs: VecDeque::new(),
        }
    }

    /// The replica's id.
    pub fn replica_id(&self) -> ReplicaId {
        self.config.replica_id
    }

    /// The current epoch (connection attempt).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the connection is live (initialized).
    pub fn is_live(&self) -> bool {
        self.connection == Connection::Live
    }

    /// The last reported status.
    pub fn status(&self) -> Option<&ReplicaStatus> {
        self.status.as_ref()
    }

    /// The compacted command history.
    pub fn history(&self) -> &CommandHistory<T> {
        &self.history
    }

    /// The hydration gate (for introspection and tests).
    pub fn hydration(&self) -> &HydrationGate<T> {
        &self.gate
    }

    /// The next output, if any.
    pub fn poll(&mut self) -> Option<ReplicaOutput<T>> {
        self.outputs.pop_front()
    }

    /// When [`tick`](Self::tick) has something to do, if anything is pending on the clock.
    pub fn next_timer_ms(&self) -> Option<u64> {
        match self.connection {
            Connection::Idle { retry_at_ms } => Some(retry_at_ms),
            _ => None,
        }
    }

    /// Advances time: starts a connection attempt once the backoff has passed.
    pub fn tick(&mut self, now_ms: u64) {
        if let Connection::Idle { retry_at_ms } = self.connection
            && retry_at_ms <= now_ms
        {
            self.epoch += 1;
            self.connection = Connection::Connecting;
            self.outputs.push_back(ReplicaOutput::Connect { epoch: self.epoch });
            self.set_status(ReplicaStatus::Connecting { epoch: self.epoch });
        }
    }

    /// Records and (if connected) forwards a command from the owner. `Hello` and `InitializationComplete`
    /// are the core's own and are refused.
    pub fn send(&mut self, command: ComputeCommand<T>) -> Result<(), HistoryError> {
        if let ComputeCommand::CancelPeek { uuid } = &command {
            let uuid = *uuid;
            let was_pending = self.history.contains_peek(uuid);
            self.history.push(&command)?;
            if self.is_live() && self.in_flight_peeks.contains(&uuid) {
                // The replica has it: it answers Canceled (or with the rows, if it was faster).
                self.transmit(command);
            } else if was_pending {
                // Not on the wire (disconnected, or not replayed yet): nobody else will answer it.
                self.outputs.push_back(ReplicaOutput::Response(ComputeResponse::PeekResponse {
                    uuid,
                    response: PeekResponse::Canceled,
                }));
            }
            return Ok(());
        }
        self.history.push(&command)?;
        if self.is_live() {
            self.transmit(command);
        }
        Ok(())
    }

    /// The transport connected to every process for `epoch`.
    pub fn connected(&mut self, epoch: u64) {
        if epoch != self.epoch || self.connection != Connection::Connecting {
            return;
        }
        let nonce = (self.config.replica_id.0 << 32) ^ epoch;
        self.connection = Connection::Handshaking { nonce, answered: vec![false; self.config.processes] };
        self.outputs.push_back(ReplicaOutput::Send {
            epoch,
            command: ComputeCommand::Hello { version: PROTOCOL_VERSION, nonce },
        });
    }

    /// The transport could not connect for `epoch`. `jitter` in `[0, 1]` scales the backoff.
    pub fn connect_failed(&mut self, epoch: u64, now_ms: u64, reason: &str, jitter: f64) {
        if epoch != self.epoch || self.connection != Connection::Connecting {
            return;
        }
        self.fail(now_ms, format!("connecting failed: {reason}"), jitter);
    }

    /// The connection of `epoch` broke (any process). `jitter` in `[0, 1]` scales the backoff.
    pub fn connection_lost(&mut self, epoch: u64, now_ms: u64, reason: &str, jitter: f64) {
        if epoch != self.epoch || matches!(self.connection, Connection::Idle { .. } | Connection::Connecting)
        {
            return;
        }
        self.fail(now_ms, format!("connection lost: {reason}"), jitter);
    }

    /// The owner found the replica faulty (e.g. a frontier regression it detected): drop the connection and
    /// reconnect after backoff, which rehydrates the replica from the history.
    pub fn disconnect(&mut self, now_ms: u64, reason: &str, jitter: f64) {
        if matches!(self.connection, Connection::Idle { .. }) {
            return;
        }
        self.violation(now_ms, reason.to_string(), jitter);
    }

    /// A response from `process` on the connection of `epoch`.
    pub fn receive(
        &mut self,
        epoch: u64,
        process: usize,
        response: ComputeResponse<T>,
        now_ms: u64,
        jitter: f64,
    ) {
        if epoch != self.epoch {
            return;
        }
        if let Err(malformed) = response.check() {
            self.violation(now_ms, malformed.to_string(), jitter);
            return;
        }
        match &mut self.connection {
            Connection::Handshaking { nonce, answered } => {
                if let Err(error) = check_hello_answer(&response, *nonce) {
                    self.violation(
                        now_ms,
                        format!("handshake with process {process} failed: {error}"),
                        jitter,
                    );
                    return;
                }
                if process >= answered.len() {
                    self.violation(now_ms, format!("handshake from unknown process {process}"), jitter);
                    return;
                }
                answered[process] = true;
                if answered.iter().all(|a| *a) {
                    self.go_live();
                }
            }
            Connection::Live
                if response_collection(&response).is_some_and(|id| !self.installed.contains(&id)) =>
            {
                let id = response_collection(&response).expect("checked");
                let reason =
                    format!("{} for collection {id}, which this connection never created", response.name());
                self.violation(now_ms, reason, jitter);
            }
            Connection::Live => match self.merger.receive(process, response) {
                Ok(merged) => {
                    for response in merged {
                        self.deliver(response);
                    }
                    self.update_live_status();
                }
                Err(error) => self.violation(now_ms, error.to_string(), jitter),
            },
            Connection::Idle { .. } | Connection::Connecting => {}
        }
    }

    fn go_live(&mut self) {
        self.connection = Connection::Live;
        self.failures = 0;
        self.merger.reset();
        self.gate.reset();
        self.in_flight_peeks.clear();
        self.installed.clear();
        for command in self.history.replay() {
            self.transmit(command);
        }
        self.outputs.push_back(ReplicaOutput::Send {
            epoch: self.epoch,
            command: ComputeCommand::InitializationComplete,
        });
        self.update_live_status();
    }

    fn deliver(&mut self, response: ComputeResponse<T>) {
        match &response {
            ComputeResponse::Frontiers { id, frontiers } => {
                if let Some(upper) = &frontiers.write_frontier {
                    for command in self.gate.on_write_frontier(*id, upper) {
                        self.outputs.push_back(ReplicaOutput::Send { epoch: self.epoch, command });
                    }
                    if upper.is_empty() && !self.history.contains_collection(*id) {
                        self.merger.forget_collection(*id);
                        self.installed.remove(id);
                    }
                }
            }
            ComputeResponse::PeekResponse { uuid, .. } => {
                self.in_flight_peeks.remove(uuid);
                self.history.retire_peek(*uuid);
            }
            _ => {}
        }
        self.outputs.push_back(ReplicaOutput::Response(response));
    }

    fn transmit(&mut self, command: ComputeCommand<T>) {
        match &command {
            ComputeCommand::Peek(peek) => {
                self.in_flight_peeks.insert(peek.uuid);
            }
            ComputeCommand::CreateDataflow(desc) => self.installed.extend(desc.export_ids()),
            _ => {}
        }
        for command in self.gate.on_command(command) {
            self.outputs.push_back(ReplicaOutput::Send { epoch: self.epoch, command });
        }
    }

    fn violation(&mut self, now_ms: u64, reason: String, jitter: f64) {
        self.outputs.push_back(ReplicaOutput::Disconnect { epoch: self.epoch, reason: reason.clone() });
        self.fail(now_ms, format!("protocol violation: {reason}"), jitter);
    }

    fn fail(&mut self, now_ms: u64, reason: String, jitter: f64) {
        // Peeks cancelled while on the wire were retired from the history; their answer is lost with the
        // connection, so answer them here. Peeks still in the history are replayed.
        let orphaned: Vec<PeekId> =
            self.in_flight_peeks.iter().copied().filter(|uuid| !self.history.contains_peek(*uuid)).collect();
        for uuid in orphaned {
            self.outputs.push_back(ReplicaOutput::Response(ComputeResponse::PeekResponse {
                uuid,
                response: PeekResponse::Canceled,
            }));
        }
        self.in_flight_peeks.clear();
        self.failures = self.failures.saturating_add(1);
        let retry_in_ms = self.config.backoff.delay_ms(self.failures, jitter);
        self.connection = Connection::Idle { retry_at_ms: now_ms.saturating_add(retry_in_ms) };
        self.set_status(ReplicaStatus::Failed { reason, retry_in_ms });
    }

    fn update_live_status(&mut self) {
        if self.connection == Connection::Live {
            let status =
                if self.gate.all_hydrated() { ReplicaStatus::Ready } else { ReplicaStatus::Hydrating };
            self.set_status(status);
        }
    }

    fn set_status(&mut self, status: ReplicaStatus) {
        if self.status.as_ref() != Some(&status) {
            self.status = Some(status.clone());
            self.outputs.push_back(ReplicaOutput::Status(status));
        }
    }
}

/// The collection a response is about, if any.
fn response_collection<T>(response: &ComputeResponse<T>) -> Option<GlobalId> {
    match response {
        ComputeResponse::Frontiers { id, .. }
        | ComputeResponse::SubscribeResponse { id, .. }
        | ComputeResponse::CopyToResponse { id, .. }
        | ComputeResponse::Status(StatusResponse::Hydration { id, .. } | StatusResponse::Failed { id, .. }) => {
            Some(*id)
        }
        ComputeResponse::Hello { .. }
        | ComputeResponse::HelloRefused { .. }
        | ComputeResponse::PeekResponse { .. }
        | ComputeResponse::CommandRejected { .. } => None,
    }
}
