//! The tokio task of one compute instance: it owns the instance's [`InstanceCore`] and the
//! [`ReplicaClient`]s of its replicas, and turns commands from the API, replica events, storage frontier
//! changes, hold changes and its tick into calls of the core, and the core's outputs into commands to
//! replicas, responses to the user and peek results to their callers.
//!
//! The API reaches the task over a channel ([`InstanceCommand`]); cheap reads, hold acquisition and a
//! peek's checks and hold go straight to the instance's shared state instead (see `api.rs`). The task
//! also runs the instance's storage frontier watch (`storage_watch.rs`), whose changes feed the core's
//! materialized views, and hands the core's introspection updates to the writer task
//! (`introspection_writer.rs`) once per tick
//! ([`ControllerConfig::tick_interval_ms`](crate::ControllerConfig::tick_interval_ms)), not after every
//! event, so a peek's path has no third task.
//!
//! **Boundary:** I/O and plumbing only: every decision about holds, compaction, peeks and subscribes is
//! the core's (`instance.rs`), which the simulator drives without this task.
//!
//! **Tests:** end to end in `tests/it/e2e.rs`, `tests/it/faults.rs` and `tests/it/api_errors.rs`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, error};

use frontiers::{Antichain, ReadPolicy};
use protocol::{DataflowDescription, Diff, GlobalId, InstanceId, PeekId, ReplicaId, Row};
use replica_client::{
    ClientSecurity, ReplicaClient, ReplicaClientConfig, ReplicaCoreConfig, ReplicaEvent, SendError,
};
use storage::{StorageCollections, StorageReadHold};

use crate::clock::{Timestamp, wallclock_ms};
use crate::config::ComputeInstanceConfig;
use crate::error::{
    CancelPeekError, CollectionDropError, DataflowCreationError, InstanceMissing, ReadPolicyError,
    ReplicaCreationError, ReplicaDropError,
};
use crate::instance::{InstanceCore, InstanceOutput, PreparedPeek, SharedHandle};
use crate::introspection::IntrospectionKind;
use crate::metrics::PeekRecorder;
use crate::orchestrator::ReplicaSpec;
use crate::response::{ComputeControllerResponse, PeekResult};
use crate::storage_watch::watch_storage_frontiers;

/// Where an instance task sends a command's reply.
pub(crate) type Reply<T> = oneshot::Sender<T>;

/// Introspection differences on their way to storage.
pub(crate) type IntrospectionUpdates = Vec<(IntrospectionKind, Row, Diff)>;

/// What the API asks an instance task to do.
pub(crate) enum InstanceCommand {
    AddReplica {
        replica: ReplicaId,
        addresses: Vec<String>,
        reply: Reply<Result<(), ReplicaCreationError>>,
    },
    DropReplica {
        replica: ReplicaId,
        reply: Reply<Result<(), ReplicaDropError>>,
    },
    CreateDataflow {
        desc: DataflowDescription<Timestamp>,
        holds: BTreeMap<GlobalId, StorageReadHold>,
        /// The storage uppers of its materialized views' targets, read just before: fed to the core first,
        /// so the views follow storage from their creation even if the frontier watch is behind.
        target_uppers: Vec<(GlobalId, Antichain<Timestamp>)>,
        reply: Reply<Result<(), DataflowCreationError>>,
    },
    DropCollections {
        ids: Vec<GlobalId>,
        reply: Reply<Result<(), CollectionDropError>>,
    },
    SetReadPolicy {
        policies: Vec<(GlobalId, ReadPolicy<Timestamp>)>,
        reply: Reply<Result<(), ReadPolicyError>>,
    },
    Peek {
        prepared: PreparedPeek<Timestamp>,
        result: Reply<PeekResult>,
        /// When the caller asked, if peek durations are measured.
        started: Option<Instant>,
    },
    CancelPeek {
        uuid: PeekId,
        reply: Reply<Result<(), CancelPeekError>>,
    },
    AllowWrites {
        reply: Reply<()>,
    },
    Inspect(Inspector),
}

/// A closure run on an instance's core inside its task.
pub(crate) type Inspector = Box<dyn FnOnce(&InstanceCore<Timestamp>) + Send>;

/// The API's handle on one instance: its task, the channel to it, and its shared state.
pub(crate) struct InstanceHandle {
    pub(crate) id: InstanceId,
    pub(crate) commands: mpsc::UnboundedSender<InstanceCommand>,
    pub(crate) shared: SharedHandle<Timestamp>,
    pub(crate) task: JoinHandle<()>,
    /// The replicas its orchestrator started, to stop with them.
    pub(crate) managed: BTreeMap<ReplicaId, ReplicaSpec>,
    /// The instance's default peek timeout (for storage peeks; the core applies it to index peeks).
    pub(crate) peek_timeout_ms: u64,
    /// The storage peeks in flight, for `cancel_peek`. Dropped with the handle, which ends them with
    /// `InstanceDropped`.
    pub(crate) storage_peeks: StoragePeeks,
    /// Records finished peeks in the instance's metrics, if it keeps any.
    pub(crate) peek_recorder: Option<PeekRecorder>,
}

/// The storage peeks of an instance in flight: the signal that cancels each. An entry goes when its
/// peek ends or is cancelled; the map holds at most one per storage peek its callers are waiting for.
pub(crate) type StoragePeeks = Arc<StoragePeeksMap>;

/// What [`StoragePeeks`] shares.
pub(crate) type StoragePeeksMap = Mutex<BTreeMap<PeekId, oneshot::Sender<()>>>;

/// Sends a command to an instance task and waits for its reply.
pub(crate) async fn request<R>(
    handle: &InstanceHandle,
    make: impl FnOnce(Reply<R>) -> InstanceCommand,
) -> Result<R, InstanceMissing> {
    let (tx, rx) = oneshot::channel();
    handle.commands.send(make(tx)).map_err(|_| InstanceMissing(handle.id))?;
    rx.await.map_err(|_| InstanceMissing(handle.id))
}

#[allow(clippy::too_many_arguments)]
/// How an instance's replica clients connect: the controller's epoch and session, and the security of
/// the connections.
#[derive(Debug, Clone)]
pub(crate) struct ReplicaConnections {
    /// The controller's epoch (`ControllerConfig::epoch`).
    pub epoch: protocol::ControllerEpoch,
    /// The controller's session, drawn once when it starts.
    pub session: u64,
    /// `ControllerConfig::replica_security`.
    pub security: ClientSecurity,
    /// `ControllerConfig::replica_keepalive_interval_ms`.
    pub keepalive_interval_ms: u64,
    /// `ControllerConfig::replica_idle_timeout_ms`.
    pub idle_timeout_ms: u64,
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_instance(
    mut core: InstanceCore<Timestamp>,
    mut commands: mpsc::UnboundedReceiver<InstanceCommand>,
    wake: Arc<Notify>,
    storage: Arc<dyn StorageCollections>,
    responses: mpsc::UnboundedSender<ComputeControllerResponse>,
    introspection: Option<mpsc::UnboundedSender<IntrospectionUpdates>>,
    config: ComputeInstanceConfig,
    tick_interval_ms: u64,
    connections: ReplicaConnections,
    peek_recorder: Option<PeekRecorder>,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel::<(ReplicaId, ReplicaEvent<Timestamp>)>();
    // Storage frontier changes, for the core's materialized views (see `InstanceCore::storage_upper`).
    let (frontiers_tx, mut storage_frontiers) = mpsc::unbounded_channel();
    let _watch = AbortOnDrop(tokio::spawn(
        watch_storage_frontiers(storage, frontiers_tx).instrument(tracing::Span::current()),
    ));
    let mut clients: BTreeMap<ReplicaId, ReplicaClient<Timestamp>> = BTreeMap::new();
    let mut peek_results: BTreeMap<PeekId, (Reply<PeekResult>, Option<Instant>)> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(tick_interval_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut ticked = false;
        tokio::select! {
            biased;
            command = commands.recv() => {
                let Some(command) = command else { break };
                core.advance_clock(wallclock_ms());
                match command {
                    InstanceCommand::AddReplica { replica, addresses, reply } => {
                        let result = core.add_replica(replica).map(|history| {
                            let mut client_config =
                                ReplicaClientConfig::new(replica, addresses, connections.security.clone());
                            client_config.keepalive_interval_ms = connections.keepalive_interval_ms;
                            client_config.idle_timeout_ms = connections.idle_timeout_ms;
                            client_config.core = ReplicaCoreConfig {
                                replica_id: replica,
                                processes: client_config.core.processes,
                                backoff: config.replica_backoff,
                                hydration_concurrency: config.hydration_concurrency,
                                epoch: connections.epoch,
                                session: connections.session,
                            };
                            clients.insert(replica, ReplicaClient::spawn(client_config, history, events_tx.clone()));
                        });
                        let _ = reply.send(result);
                    }
                    InstanceCommand::DropReplica { replica, reply } => {
                        let result = core.drop_replica(replica);
                        if let Some(client) = clients.remove(&replica) {
                            client.shutdown().await;
                        }
                        let _ = reply.send(result);
                    }
                    InstanceCommand::CreateDataflow { desc, holds, target_uppers, reply } => {
                        for (target, upper) in target_uppers {
                            core.storage_upper(target, upper);
                        }
                        let _ = reply.send(core.create_dataflow(desc, holds));
                    }
                    InstanceCommand::DropCollections { ids, reply } => {
                        let _ = reply.send(core.drop_collections(&ids));
                    }
                    InstanceCommand::SetReadPolicy { policies, reply } => {
                        let _ = reply.send(core.set_read_policy(policies));
                    }
                    InstanceCommand::Peek { prepared, result, started } => {
                        peek_results.insert(prepared.uuid(), (result, started));
                        core.install_peek(prepared);
                    }
                    InstanceCommand::CancelPeek { uuid, reply } => {
                        let _ = reply.send(core.cancel_peek(uuid));
                    }
                    InstanceCommand::AllowWrites { reply } => {
                        core.allow_writes();
                        let _ = reply.send(());
                    }
                    InstanceCommand::Inspect(f) => f(&core),
                }
            }
            Some((replica, event)) = events.recv() => {
                core.advance_clock(wallclock_ms());
                core.handle_replica_event(replica, event);
            }
            Some((id, frontiers)) = storage_frontiers.recv() => match frontiers {
                Some(frontiers) => core.storage_upper(id, frontiers.upper),
                None => core.storage_collection_dropped(id),
            },
            _ = wake.notified() => core.process_holds(),
            _ = tick.tick() => {
                core.tick(wallclock_ms());
                ticked = true;
            }
        }
        while let Some(output) = core.poll() {
            match output {
                InstanceOutput::Command { replica, command } => {
                    let Some(client) = clients.get(&replica) else { continue };
                    match client.send(command) {
                        Ok(()) => {}
                        Err(SendError::Gone(_)) => error!(%replica, "replica client task ended"),
                        // The core measured every command that can grow (dataflows, peeks) against the
                        // same rule before it recorded it; anything else is small.
                        Err(SendError::TooLarge(too_large)) => {
                            error!(%replica, %too_large, "invariant: a command the core admitted does not fit a frame")
                        }
                        // The core sends each replica what its own history template holds, with peek ids
                        // unique per instance: the replica's history can refuse nothing it sends.
                        Err(SendError::Rejected(rejected)) => {
                            error!(%replica, %rejected, "invariant: the replica's history refuses a command the core issued (unique peek ids, live exports, forward compactions)")
                        }
                    }
                }
                InstanceOutput::DisconnectReplica { replica, reason } => {
                    if let Some(client) = clients.get(&replica) {
                        let _ = client.disconnect(reason);
                    }
                }
                InstanceOutput::Response(response) => {
                    let _ = responses.send(response);
                }
                InstanceOutput::PeekResult { uuid, result } => {
                    if let Some((tx, started)) = peek_results.remove(&uuid) {
                        if let (Some(recorder), Some(started)) = (&peek_recorder, started) {
                            recorder.record(&result, started.elapsed());
                        }
                        let _ = tx.send(result);
                    } else {
                        debug!(%uuid, "peek result without a waiting caller");
                    }
                }
            }
        }
        // Once per tick, not per event: waking the writer task for every peek's histogram update would
        // put a third task on every peek's path (measured: 7–10 µs of its p50).
        if ticked {
            flush_introspection(&mut core, introspection.as_ref());
        }
    }
    flush_introspection(&mut core, introspection.as_ref());
}

/// Hands the introspection updates the core accumulated to the writer task (or drops them when
/// introspection is off).
fn flush_introspection(
    core: &mut InstanceCore<Timestamp>,
    introspection: Option<&mpsc::UnboundedSender<IntrospectionUpdates>>,
) {
    let updates = core.drain_introspection();
    if let Some(tx) = introspection
        && !updates.is_empty()
    {
        let _ = tx.send(updates);
    }
}

/// Aborts a task when dropped: the instance task's helpers end with it (also when it is aborted).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
