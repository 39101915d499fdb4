//! The tokio client against fake replica processes over real sockets: a process killed and restarted
//! (reconnect, replay, state matches), a replica speaking another protocol version (refused with a clear
//! error), garbage from the socket (connection closed with an error, then a reconnect), a command over
//! the frame limit and commands the history refuses (refused at `send` with a typed error, never
//! recorded or sent).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use frontiers::Antichain;
use protocol::frame::{FrameDecoder, encode_frame};
use protocol::{
    ComputeCommand, ComputeResponse, FrontiersResponse, GlobalId, InstanceConfig, InstanceId,
    PROTOCOL_VERSION, ReplicaId,
};
use replica_client::{
    Backoff, COMMAND_HEADROOM_BYTES, CommandHistory, CommandTooLarge, ReplicaClient, ReplicaClientConfig,
    ReplicaEvent, ReplicaStatus, SendError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::model::{ModelReplica, dataflow};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Normal,
    /// Answers Hello with another protocol version.
    WrongVersion,
    /// Sends garbage right after the handshake of the first connection, then behaves.
    GarbageOnce,
}

/// A fake replica process: speaks the handshake, applies commands to a model, reports every export as
/// hydrated. Its installed state is what the last connection's replay (plus later commands) built.
struct FakeProcess {
    address: String,
    installed: Arc<Mutex<ModelReplica>>,
    connections: Arc<Mutex<usize>>,
    /// Every command received, on any connection, in order.
    received: Arc<Mutex<Vec<ComputeCommand<u64>>>>,
    task: JoinHandle<()>,
}

impl FakeProcess {
    async fn start(address: &str, behaviour: Behaviour) -> FakeProcess {
        let listener = TcpListener::bind(address).await.expect("bind");
        let address = listener.local_addr().unwrap().to_string();
        let installed = Arc::new(Mutex::new(ModelReplica::default()));
        let connections = Arc::new(Mutex::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (state, count, log) = (Arc::clone(&installed), Arc::clone(&connections), Arc::clone(&received));
        let task = tokio::spawn(async move {
            let mut handlers = Handlers(Vec::new());
            while let Ok((stream, _)) = listener.accept().await {
                let n = {
                    let mut c = count.lock().unwrap();
                    *c += 1;
                    *c
                };
                let behaviour =
                    if behaviour == Behaviour::GarbageOnce && n > 1 { Behaviour::Normal } else { behaviour };
                handlers.0.push(tokio::spawn(serve(stream, behaviour, Arc::clone(&state), Arc::clone(&log))));
            }
        });
        FakeProcess { address, installed, connections, received, task }
    }

    /// Kills the process: the listener and every connection go away.
    async fn kill(self) -> String {
        self.task.abort();
        let _ = self.task.await;
        self.address
    }
}

/// Connection handlers, aborted when the process dies.
struct Handlers(Vec<JoinHandle<()>>);

impl Drop for Handlers {
    fn drop(&mut self) {
        for handler in &self.0 {
            handler.abort();
        }
    }
}

async fn send(stream: &mut TcpStream, response: ComputeResponse<u64>) -> std::io::Result<()> {
    let mut frame = Vec::new();
    encode_frame(&response, 1 << 20, &mut frame).unwrap();
    stream.write_all(&frame).await
}

async fn serve(
    mut stream: TcpStream,
    behaviour: Behaviour,
    installed: Arc<Mutex<ModelReplica>>,
    received: Arc<Mutex<Vec<ComputeCommand<u64>>>>,
) {
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut chunk = vec![0u8; 4096];
    let mut pending = ModelReplica::default();
    let mut initialized = false;
    loop {
        while let Ok(Some(command)) = decoder.next_message::<ComputeCommand<u64>>() {
            received.lock().unwrap().push(command.clone());
            match &command {
                ComputeCommand::Hello { nonce, .. } => {
                    let version = if behaviour == Behaviour::WrongVersion {
                        PROTOCOL_VERSION + 1
                    } else {
                        PROTOCOL_VERSION
                    };
                    if send(&mut stream, ComputeResponse::Hello { version, nonce: *nonce }).await.is_err() {
                        return;
                    }
                    if behaviour == Behaviour::GarbageOnce {
                        let _ = stream.write_all(&[0xff; 16]).await;
                    }
                }
                ComputeCommand::InitializationComplete => {
                    initialized = true;
                    *installed.lock().unwrap() = pending.clone();
                }
                other => {
                    pending.apply(other);
                    if initialized {
                        installed.lock().unwrap().apply(other);
                    }
                    if let ComputeCommand::CreateDataflow(desc) = other {
                        let upper = desc.as_of.as_ref().unwrap().elements()[0] + 1;
                        for id in desc.export_ids() {
                            let frontiers = FrontiersResponse {
                                write_frontier: Some(Antichain::from_elem(upper)),
                                ..Default::default()
                            };
                            if send(&mut stream, ComputeResponse::Frontiers { id, frontiers }).await.is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => decoder.push(&chunk[..n]),
        }
    }
}

fn client(
    addresses: Vec<String>,
) -> (ReplicaClient<u64>, mpsc::UnboundedReceiver<(ReplicaId, ReplicaEvent<u64>)>) {
    let mut config = ReplicaClientConfig::new(ReplicaId(3), addresses);
    config.core.backoff = Backoff { initial_ms: 10, max_ms: 50 };
    config.connect_timeout_ms = 1_000;
    let (events, rx) = mpsc::unbounded_channel();
    (ReplicaClient::spawn(config, CommandHistory::new(), events), rx)
}

/// Waits for a status matching `predicate`, returning every status seen on the way.
async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<(ReplicaId, ReplicaEvent<u64>)>,
    predicate: impl Fn(&ReplicaStatus) -> bool,
) -> Vec<ReplicaStatus> {
    let mut seen = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some((_, ReplicaEvent::Status(status))) => {
                    let done = predicate(&status);
                    seen.push(status);
                    if done { return seen; }
                }
                Some(_) => {}
                None => panic!("client gone; saw {seen:?}"),
            },
            _ = &mut deadline => panic!("timed out; saw {seen:?}"),
        }
    }
}

fn setup_commands(client: &ReplicaClient<u64>) {
    client
        .send(ComputeCommand::CreateInstance(InstanceConfig {
            instance_id: InstanceId(1),
            replica_id: ReplicaId(3),
        }))
        .unwrap();
    client.send(ComputeCommand::CreateDataflow(dataflow("kept", 1, 2, 5))).unwrap();
    client.send(ComputeCommand::CreateDataflow(dataflow("dropped", 10, 1, 5))).unwrap();
    client.send(ComputeCommand::Schedule(GlobalId::User(1))).unwrap();
    client
        .send(ComputeCommand::AllowCompaction { id: GlobalId::User(10), frontier: Antichain::new() })
        .unwrap();
    client
        .send(ComputeCommand::AllowCompaction { id: GlobalId::User(1), frontier: Antichain::from_elem(5) })
        .unwrap();
}

#[tokio::test]
async fn a_killed_and_restarted_process_gets_the_whole_replica_reconnected_and_its_state_rebuilt() {
    let p0 = FakeProcess::start("127.0.0.1:0", Behaviour::Normal).await;
    let p1 = FakeProcess::start("127.0.0.1:0", Behaviour::Normal).await;
    let (client, mut rx) = client(vec![p0.address.clone(), p1.address.clone()]);
    setup_commands(&client);
    wait_for(&mut rx, |s| *s == ReplicaStatus::Ready).await;
    let expected = p0.installed.lock().unwrap().clone();
    assert_eq!(expected.dataflows.len(), 1, "the dropped dataflow is gone: {expected:?}");

    let address = p1.kill().await;
    let p1 = FakeProcess::start(&address, Behaviour::Normal).await;
    let seen = wait_for(&mut rx, |s| *s == ReplicaStatus::Ready).await;
    assert!(seen.iter().any(|s| matches!(s, ReplicaStatus::Failed { .. })), "{seen:?}");
    // Both processes were reconnected (the survivor too) and hold exactly the live state.
    assert_eq!(*p0.connections.lock().unwrap(), 2);
    assert_eq!(*p1.installed.lock().unwrap(), expected);
    assert_eq!(*p0.installed.lock().unwrap(), expected);
    client.shutdown().await;
}

#[tokio::test]
async fn a_replica_speaking_another_protocol_version_is_refused_with_a_clear_error() {
    let process = FakeProcess::start("127.0.0.1:0", Behaviour::WrongVersion).await;
    let (client, mut rx) = client(vec![process.address.clone()]);
    let seen = wait_for(&mut rx, |s| matches!(s, ReplicaStatus::Failed { .. })).await;
    match seen.last() {
        Some(ReplicaStatus::Failed { reason, .. }) => {
            assert!(reason.contains("protocol version mismatch"), "{reason}");
            assert!(reason.contains(&(PROTOCOL_VERSION + 1).to_string()), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(*process.installed.lock().unwrap(), ModelReplica::default(), "nothing was installed");
    client.shutdown().await;
}

#[tokio::test]
async fn garbage_from_the_socket_closes_the_connection_with_an_error_and_the_client_reconnects() {
    let process = FakeProcess::start("127.0.0.1:0", Behaviour::GarbageOnce).await;
    let (client, mut rx) = client(vec![process.address.clone()]);
    setup_commands(&client);
    let seen = wait_for(&mut rx, |s| *s == ReplicaStatus::Ready).await;
    let failure = seen.iter().find_map(|s| match s {
        ReplicaStatus::Failed { reason, .. } => Some(reason.clone()),
        _ => None,
    });
    let failure = failure.expect("the garbage failed the first connection");
    assert!(failure.contains("undecodable") || failure.contains("exceeds"), "{failure}");
    assert_eq!(*process.connections.lock().unwrap(), 2);
    assert_eq!(process.installed.lock().unwrap().dataflows.len(), 1);
    client.shutdown().await;
}

#[tokio::test]
async fn a_command_over_the_frame_limit_is_refused_at_send_and_never_reaches_the_replica() {
    let process = FakeProcess::start("127.0.0.1:0", Behaviour::Normal).await;
    let mut config = ReplicaClientConfig::new(ReplicaId(3), vec![process.address.clone()]);
    config.core.backoff = Backoff { initial_ms: 10, max_ms: 50 };
    config.max_frame_bytes = 4 << 10;
    let (events, mut rx) = mpsc::unbounded_channel();
    let client = ReplicaClient::spawn(config, CommandHistory::new(), events);
    setup_commands(&client);
    // A constant of a few hundred rows does not fit 4 KiB.
    let mut huge = dataflow("huge", 30, 1, 5);
    let typ = protocol::RelationType::new(vec![protocol::ColumnType::new(protocol::ScalarType::Text, false)]);
    let rows =
        (0..500).map(|i| (protocol::Row::pack([protocol::Datum::Text(&format!("row {i}"))]), 1)).collect();
    huge.objects_to_build[0].plan = protocol::Plan::Constant { rows, typ };
    let refused = client.send(ComputeCommand::CreateDataflow(huge));
    match refused {
        Err(SendError::TooLarge(CommandTooLarge { command, len, max })) => {
            assert_eq!((command, max), ("CreateDataflow", 4 << 10));
            assert!(len + COMMAND_HEADROOM_BYTES as u64 > max as u64, "{len}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // The client goes on, and the replica holds exactly what was accepted.
    wait_for(&mut rx, |s| *s == ReplicaStatus::Ready).await;
    client.send(ComputeCommand::Schedule(GlobalId::User(1))).expect("a small command is accepted");
    let installed = process.installed.lock().unwrap().clone();
    assert_eq!(installed.dataflows.len(), 1, "only the kept dataflow: {installed:?}");
    client.shutdown().await;
}

#[tokio::test]
async fn a_command_the_history_refuses_is_a_typed_error_at_send_and_never_reaches_the_replica() {
    use protocol::{MapFilterProject, Peek, PeekId, PeekTarget, RowSetFinishing};
    use replica_client::HistoryError;

    let process = FakeProcess::start("127.0.0.1:0", Behaviour::Normal).await;
    let (client, mut rx) = client(vec![process.address.clone()]);
    setup_commands(&client);
    wait_for(&mut rx, |s| *s == ReplicaStatus::Ready).await;
    let peek = |uuid: u64| {
        ComputeCommand::Peek(Peek {
            uuid: PeekId(uuid),
            target: PeekTarget::Index { id: GlobalId::User(1) },
            timestamp: 5,
            literal_constraints: None,
            map_filter_project: MapFilterProject::new(1),
            finishing: RowSetFinishing::unordered(),
        })
    };
    client.send(peek(1)).expect("a new peek is accepted");
    let refused = [
        (peek(1), HistoryError::DuplicatePeek(PeekId(1))),
        (ComputeCommand::Schedule(GlobalId::User(99)), HistoryError::UnknownCollection(GlobalId::User(99))),
        (
            ComputeCommand::CreateDataflow(dataflow("again", 1, 1, 5)),
            HistoryError::DuplicateExport(GlobalId::User(1)),
        ),
        (
            ComputeCommand::AllowCompaction { id: GlobalId::User(1), frontier: Antichain::from_elem(2) },
            HistoryError::CompactionRegressed {
                id: GlobalId::User(1),
                current: format!("{:?}", Antichain::from_elem(5u64)),
                requested: format!("{:?}", Antichain::from_elem(2u64)),
            },
        ),
        (ComputeCommand::InitializationComplete, HistoryError::ConnectionCommand("InitializationComplete")),
    ];
    for (command, expected) in refused {
        let name = command.name();
        assert_eq!(client.send(command), Err(SendError::Rejected(expected)), "{name}");
    }
    // A command accepted after them arrives; none of the refused ones did.
    client.send(peek(2)).expect("the client goes on");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let peeks_received = || -> Vec<u64> {
        let received = process.received.lock().unwrap();
        received
            .iter()
            .filter_map(|c| match c {
                ComputeCommand::Peek(p) => Some(p.uuid.0),
                _ => None,
            })
            .collect()
    };
    while !peeks_received().contains(&2) {
        assert!(tokio::time::Instant::now() < deadline, "the accepted peek never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(peeks_received(), vec![1, 2], "each peek once, nothing else");
    let received = process.received.lock().unwrap().clone();
    let after_replay =
        received.iter().rposition(|c| matches!(c, ComputeCommand::InitializationComplete)).expect("init");
    assert!(
        received[after_replay + 1..].iter().all(|c| matches!(c, ComputeCommand::Peek(_))),
        "only the peeks followed the replay: {:?}",
        received[after_replay + 1..].iter().map(ComputeCommand::name).collect::<Vec<_>>()
    );
    assert_eq!(
        received.iter().filter(|c| matches!(c, ComputeCommand::InitializationComplete)).count(),
        1,
        "InitializationComplete only from the client's own handshake"
    );
    client.shutdown().await;
}
