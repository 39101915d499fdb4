//! A faulty replica, found out by the controller itself, end to end: the async `ComputeController` against a
//! real compute replica behind a proxy that decodes the replica's frames and can slip a forged response
//! between two of them ([`ForgingProxy`]): a regressed frontier, then news of a collection that does not
//! exist. The controller must reject the forged response without applying
//! it, drop the connection, reconnect after backoff, replay its history, and serve again. Waits poll with a
//! bounded number of short sleeps.
//!
//! The connection is plain TCP with the shared secret (`--insecure`): the proxy is a man in the middle,
//! which TLS keeps out (`security.rs`); it passes the authentication exchange through untouched.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use controller::{ComputeController, PeekOptions, ReplicaLocation};
use frontiers::{Antichain, PartialOrder, ReadPolicy};
use protocol::frame::{DEFAULT_MAX_FRAME_BYTES, FrameDecoder, encode_frame};
use protocol::{ComputeResponse, FrontiersResponse, GlobalId, InstanceId, PeekTarget, ReplicaId, Row};
use storage::{AppendRequest, InProcess, StorageCollections, StoreConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};

use crate::harness::{any_port, controller_config, desc, eventually, f, index_on_storage, kv, s, u};

const INSTANCE: InstanceId = InstanceId(1);
const R1: ReplicaId = ReplicaId(1);

/// A TCP proxy in front of a replica. Bytes from the controller pass through as they are; the replica's
/// responses are decoded frame by frame and re-encoded, and a response sent to [`ForgingProxy::forge`] goes
/// out between two of them on the current connection. Counts the connections it accepted.
struct ForgingProxy {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    forged: mpsc::UnboundedSender<ComputeResponse>,
    task: tokio::task::JoinHandle<()>,
}

impl ForgingProxy {
    async fn start(target: SocketAddr) -> ForgingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy listen");
        let addr = listener.local_addr().expect("proxy address");
        let connections = Arc::new(AtomicUsize::new(0));
        let (forged, forged_rx) = mpsc::unbounded_channel::<ComputeResponse>();
        // Whichever connection is current takes the forged responses.
        let forged_rx = Arc::new(Mutex::new(forged_rx));
        let accepted = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            let mut pumps = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else { continue };
                for stream in [&inbound, &outbound] {
                    stream.set_nodelay(true).expect("nodelay");
                }
                accepted.fetch_add(1, Ordering::SeqCst);
                let (mut from_controller, to_controller) = inbound.into_split();
                let (from_replica, mut to_replica) = outbound.into_split();
                pumps.spawn(async move {
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        match from_controller.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if to_replica.write_all(&buffer[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = to_replica.shutdown().await;
                });
                pumps.spawn(forward_responses(from_replica, to_controller, Arc::clone(&forged_rx)));
            }
        });
        ForgingProxy { addr, connections, forged, task }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn forge(&self, response: ComputeResponse) {
        self.forged.send(response).expect("the proxy runs");
    }
}

impl Drop for ForgingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards the replica's responses frame by frame, with forged ones in between, until either side closes.
async fn forward_responses(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    forged: Arc<Mutex<mpsc::UnboundedReceiver<ComputeResponse>>>,
) {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut buffer = vec![0u8; 64 * 1024];
    let mut frame = Vec::new();
    let mut forged = forged.lock().await;
    // The replica's two messages of the authentication exchange (its challenge, its verdict) come first.
    let mut exchange_frames = 2;
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            Some(response) = forged.recv() => {
                frame.clear();
                encode_frame(&response, DEFAULT_MAX_FRAME_BYTES, &mut frame).expect("encode");
                if to.write_all(&frame).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.push(&buffer[..n]);
        while exchange_frames > 0
            && let Ok(Some(message)) = decoder.next_message::<transport::AcceptorMessage>()
        {
            exchange_frames -= 1;
            frame.clear();
            encode_frame(&message, DEFAULT_MAX_FRAME_BYTES, &mut frame).expect("encode");
            if to.write_all(&frame).await.is_err() {
                return;
            }
        }
        while exchange_frames == 0
            && let Ok(Some(response)) = decoder.next_message::<ComputeResponse>()
        {
            frame.clear();
            encode_frame(&response, DEFAULT_MAX_FRAME_BYTES, &mut frame).expect("encode");
            if to.write_all(&frame).await.is_err() {
                return;
            }
        }
    }
}

/// Appends `(kv(t, t), t, 1)` for each time in `from..to`; returns the new upper.
async fn write(storage: &InProcess, table: GlobalId, from: u64, to: u64) -> u64 {
    for t in from..to {
        let request = AppendRequest {
            id: table,
            updates: vec![(kv(t, t), t, 1)],
            expected_upper: f(t),
            new_upper: f(t + 1),
        };
        storage.append(vec![request]).await.expect("append");
    }
    to
}

/// What the table holds at `time`.
fn contents_at(time: u64) -> BTreeMap<Row, u64> {
    (0..=time).map(|t| (kv(t, t), 1)).collect()
}

async fn peek_rows(
    controller: &ComputeController,
    id: GlobalId,
    time: u64,
) -> Result<BTreeMap<Row, u64>, String> {
    let handle = controller
        .peek(INSTANCE, PeekTarget::Index { id }, time, PeekOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    match handle.result().await {
        Ok(rows) => Ok(rows.into_iter().map(|(row, n)| (row, n.get())).collect()),
        other => Err(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reporting_a_regressed_frontier_or_an_unknown_collection_is_disconnected_reconnected_and_serves_again()
 {
    let storage = Arc::new(InProcess::in_memory(StoreConfig::default()));
    let (table, index) = (s(1), u(1));
    storage.create_collection(table, desc()).await.expect("create table");
    storage
        .set_read_policy(table, ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 })
        .await
        .expect("policy");
    let mut upper = write(&storage, table, 0, 5).await;
    let secret = transport::SharedSecret::generate().expect("a secret");
    let replica = compute::ReplicaServer::start(compute::ReplicaConfig::new(
        any_port(),
        1,
        Arc::clone(&storage) as Arc<dyn StorageCollections>,
        transport::ServerSecurity::insecure(secret.clone()),
    ))
    .expect("start replica");
    let proxy = ForgingProxy::start(replica.local_addr()).await;

    let config = controller::ControllerConfig {
        replica_security: transport::ClientSecurity::insecure(secret),
        ..controller_config(false)
    };
    let mut controller =
        ComputeController::new(Arc::clone(&storage) as _, None, config).await.expect("controller");
    controller.create_instance(INSTANCE, controller.default_instance_config()).expect("instance");
    let addresses = vec![proxy.addr.to_string()];
    controller
        .add_replica(INSTANCE, R1, ReplicaLocation::Unmanaged { addresses })
        .await
        .expect("add replica");
    let mut df = index_on_storage(table, index, 0);
    df.as_of = None;
    controller.create_dataflow(INSTANCE, df).await.expect("create index");
    // The as-of is the freshest time the table allows; the index serves what is written after it.
    upper = write(&storage, table, upper, upper + 5).await;
    let reached = |controller: &ComputeController, upper: u64| {
        let got = controller.collection_frontiers(INSTANCE, index).expect("live index").upper;
        if PartialOrder::less_equal(&f(upper), &got) { Ok(got) } else { Err(format!("upper {got:?}")) }
    };
    eventually("the index catches up", async || reached(&controller, upper).map(|_| ())).await;
    assert_eq!(peek_rows(&controller, index, upper - 1).await, Ok(contents_at(upper - 1)));
    assert_eq!(proxy.connections(), 1);
    let before = reached(&controller, upper).expect("caught up");

    // The replica claims the index went back to time 1.
    let regressed = FrontiersResponse { write_frontier: Some(Antichain::from_elem(1)), ..Default::default() };
    proxy.forge(ComputeResponse::Frontiers { id: index, frontiers: regressed });
    eventually("the controller drops the connection and reconnects", async || match proxy.connections() {
        2 => Ok(()),
        n => Err(format!("{n} connections")),
    })
    .await;
    // The forged frontier was never applied: the controller's upper did not go back.
    let after = controller.collection_frontiers(INSTANCE, index).expect("live index").upper;
    assert!(PartialOrder::less_equal(&before, &after), "upper went from {before:?} to {after:?}");

    // The replayed connection serves: new data arrives in the index and peeks see it.
    upper = write(&storage, table, upper, upper + 5).await;
    eventually("the index catches up after the reconnect", async || reached(&controller, upper).map(|_| ()))
        .await;
    eventually("a peek after the reconnect sees every row", async || {
        match peek_rows(&controller, index, upper - 1).await {
            Ok(rows) if rows == contents_at(upper - 1) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(proxy.connections(), 2, "one reconnect, no more");

    // News of a collection the controller never created is a fault too.
    let unknown = FrontiersResponse { write_frontier: Some(Antichain::from_elem(3)), ..Default::default() };
    proxy.forge(ComputeResponse::Frontiers { id: u(99), frontiers: unknown });
    eventually("the controller drops the connection again and reconnects", async || {
        match proxy.connections() {
            3 => Ok(()),
            n => Err(format!("{n} connections")),
        }
    })
    .await;
    assert!(controller.collection_frontiers(INSTANCE, u(99)).is_err(), "u99 was not made up");
    upper = write(&storage, table, upper, upper + 5).await;
    eventually("the index catches up after the second reconnect", async || {
        reached(&controller, upper).map(|_| ())
    })
    .await;
    assert_eq!(peek_rows(&controller, index, upper - 1).await, Ok(contents_at(upper - 1)));
    // The same replica process reconciled the replayed index on each reconnect instead of building it
    // again.
    assert_eq!(replica.dataflows_built(), 1);

    drop(controller);
    drop(proxy);
    tokio::task::spawn_blocking(move || replica.shutdown()).await.expect("replica shutdown");
}
