//! The server and client over real TCP (127.0.0.1): many concurrent clients, holds released when a client
//! disconnects, hold downgrades moving the server's since, garbage and protocol violations closing only the
//! offending connection, and the `storage-server` binary with a graceful SIGTERM shutdown and restart.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use frontiers::ReadPolicy;
use protocol::GlobalId;
use protocol::frame::{FrameDecoder, encode_frame};
use storage::wire::{MAX_FRAME_BYTES, STORAGE_PROTOCOL_VERSION, StorageRequest, StorageResponse};
use storage::{Client, CollectionFrontiers, ListenEvent, StorageCollections};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::*;
use crate::{client_security, server_security};

async fn wait_for_since(storage: &dyn StorageCollections, id: GlobalId, since: u64) -> CollectionFrontiers {
    for _ in 0..1_000 {
        let frontiers = storage.frontiers(id).await.unwrap();
        if frontiers.since == at(since) {
            return frontiers;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("since of {id} never reached {since}: {:?}", storage.frontiers(id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_append_and_listen_concurrently() {
    let store = memory_store();
    let addr = serve(store.clone()).await;
    let writers = 16u64;
    let appends = 20u64;
    let mut tasks = Vec::new();
    for w in 0..writers {
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(addr, client_security()).await.unwrap();
            let id = user(w);
            client.create_collection(id, int_desc()).await.unwrap();
            let mut listen = client.listen(id, 0).await.unwrap();
            for t in 0..appends {
                client.append(vec![append(id, vec![(int_row(t as i64), t, 1)], t, t + 1)]).await.unwrap();
            }
            let mut seen = Vec::new();
            loop {
                match listen.next().await.unwrap() {
                    ListenEvent::Updates(updates) => seen.extend(updates),
                    ListenEvent::Progress(frontier) if frontier == at(appends) => break,
                    ListenEvent::Progress(_) => {}
                }
            }
            seen
        }));
    }
    for (w, task) in tasks.into_iter().enumerate() {
        let seen = task.await.unwrap();
        assert_eq!(seen, (0..appends).map(|t| (int_row(t as i64), t, 1)).collect::<Vec<_>>(), "writer {w}");
    }
    assert_eq!(store.list_collections().await.unwrap().len(), writers as usize);
}

#[tokio::test]
async fn a_client_that_disconnects_releases_its_holds() {
    let store = memory_store();
    let addr = serve(store.clone()).await;
    let id = user(1);
    store.create_collection(id, int_desc()).await.unwrap();
    store.set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 }).await.unwrap();

    let client = Client::connect(addr, client_security()).await.unwrap();
    let mut hold = client.acquire_read_hold(id, at(0)).await.unwrap();
    let second = client.acquire_read_hold(id, at(0)).await.unwrap();
    let copy = second.clone_hold();
    store.append(vec![append(id, vec![], 0, 10)]).await.unwrap();
    assert_eq!(store.frontiers(id).await.unwrap().since, at(0));

    // Downgrades and drops travel to the server.
    hold.try_downgrade(at(4)).unwrap();
    drop(second);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(store.frontiers(id).await.unwrap().since, at(0), "the copy still holds 0");
    drop(copy);
    wait_for_since(&store, id, 4).await;

    // A client that goes away without releasing: the server releases for it.
    let leaker = Client::connect(addr, client_security()).await.unwrap();
    let leaked = leaker.acquire_read_hold(id, at(5)).await.unwrap();
    hold.release();
    wait_for_since(&store, id, 5).await;
    leaker.close();
    wait_for_since(&store, id, 10).await;
    // The hold value outlives its connection and holds nothing.
    drop(leaked);
    drop(client);
}

#[tokio::test]
async fn garbage_from_one_client_closes_only_that_connection() {
    let store = memory_store();
    let addr = serve(store.clone()).await;
    let id = user(1);
    let good = Client::connect(addr, client_security()).await.unwrap();
    good.create_collection(id, int_desc()).await.unwrap();
    let held = good.acquire_read_hold(id, at(0)).await.unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", (0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()),
        ("an oversize frame", vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]),
        ("a request before Hello", {
            let mut out = Vec::new();
            encode_frame(&StorageRequest::ListCollections { request: 0 }, MAX_FRAME_BYTES, &mut out).unwrap();
            out
        }),
        ("a truncated frame", vec![10, 0, 0, 0, 1]),
    ];
    // Before the authentication (refused by it) and after it (by the storage protocol).
    let cases =
        cases.into_iter().flat_map(|(what, bytes)| [(what, bytes.clone(), false), (what, bytes, true)]);
    for (what, bytes, authenticate) in cases {
        let mut socket = if authenticate {
            crate::authenticated(addr).await
        } else {
            TcpStream::connect(addr).await.unwrap()
        };
        socket.write_all(&bytes).await.unwrap();
        socket.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "{what}: the server must close the connection");
        // The well-behaved client is unaffected.
        good.append(vec![append(
            id,
            vec![],
            good.frontiers(id).await.unwrap().upper.as_option().copied().unwrap(),
            100,
        )])
        .await
        .ok();
        assert!(good.frontiers(id).await.is_ok(), "{what}");
    }
    assert_eq!(store.frontiers(id).await.unwrap().since, at(0), "the good client's hold is intact");
    drop(held);
}

async fn raw_connection(addr: std::net::SocketAddr) -> (TcpStream, FrameDecoder) {
    let mut socket = crate::authenticated(addr).await;
    send(&mut socket, &StorageRequest::Hello { version: STORAGE_PROTOCOL_VERSION }).await;
    let mut decoder = FrameDecoder::new(MAX_FRAME_BYTES);
    assert_eq!(
        receive(&mut socket, &mut decoder).await,
        Some(StorageResponse::Hello { version: STORAGE_PROTOCOL_VERSION })
    );
    (socket, decoder)
}

async fn send(socket: &mut TcpStream, request: &StorageRequest) {
    let mut out = Vec::new();
    encode_frame(request, MAX_FRAME_BYTES, &mut out).unwrap();
    socket.write_all(&out).await.unwrap();
}

/// The next response, or `None` once the server closed the connection.
async fn receive(socket: &mut TcpStream, decoder: &mut FrameDecoder) -> Option<StorageResponse> {
    let mut chunk = vec![0u8; 4096];
    loop {
        if let Some(response) = decoder.next_message().unwrap() {
            return Some(response);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut chunk))
            .await
            .expect("server stalled")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        decoder.push(&chunk[..n]);
    }
}

#[tokio::test]
async fn illegal_hold_changes_close_the_connection_and_release_its_holds() {
    let store = memory_store();
    let addr = serve(store.clone()).await;
    let id = user(1);
    store.create_collection(id, int_desc()).await.unwrap();
    store.set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 }).await.unwrap();
    // Keep the since at 2 while the raw connections come and go.
    let anchor = store.acquire_read_hold(id, at(2)).await.unwrap();
    store.append(vec![append(id, vec![], 0, 10)]).await.unwrap();
    wait_for_since(&store, id, 2).await;

    let cases: Vec<(&str, Vec<(u64, i64)>)> = vec![
        ("a count that goes negative", vec![(3, -2)]),
        ("a hold that moves backwards", vec![(3, -1), (2, 1)]),
        ("a release at a time never held", vec![(7, -1)]),
    ];
    for (what, changes) in cases {
        let (mut socket, mut decoder) = raw_connection(addr).await;
        send(&mut socket, &StorageRequest::AcquireReadHold { request: 1, id, frontier: at(3) }).await;
        assert!(matches!(
            receive(&mut socket, &mut decoder).await,
            Some(StorageResponse::Reply { request: 1, .. })
        ));
        send(&mut socket, &StorageRequest::HoldChanges { id, changes }).await;
        assert_eq!(receive(&mut socket, &mut decoder).await, None, "{what}: the connection must close");
    }
    // Hold changes for a collection the connection never held.
    let (mut socket, mut decoder) = raw_connection(addr).await;
    send(&mut socket, &StorageRequest::HoldChanges { id, changes: vec![(3, 1)] }).await;
    assert_eq!(receive(&mut socket, &mut decoder).await, None);
    // A frontier that is not an antichain.
    let (mut socket, mut decoder) = raw_connection(addr).await;
    let bad: frontiers::Antichain<u64> =
        bincode::deserialize(&bincode::serialize(&vec![4u64, 5]).unwrap()).unwrap();
    send(&mut socket, &StorageRequest::AcquireReadHold { request: 1, id, frontier: bad }).await;
    assert_eq!(receive(&mut socket, &mut decoder).await, None);

    drop(anchor);
    wait_for_since(&store, id, 10).await;
}

#[tokio::test]
async fn the_server_binary_serves_shuts_down_on_sigterm_and_restarts_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let id = user(1);
    for round in 0..2u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_storage-server"))
            .args(["--data-dir", dir.path().to_str().unwrap(), "--listen", "127.0.0.1:0", "--insecure"])
            .env(transport::SECRET_ENV, crate::TEST_SECRET)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected {line:?}"));
        let client: Arc<dyn StorageCollections> =
            Arc::new(Client::connect(addr, client_security()).await.unwrap());
        client.create_collection(id, int_desc()).await.unwrap();
        client
            .append(vec![append(id, vec![(int_row(round as i64), round, 1)], round, round + 1)])
            .await
            .unwrap();
        let expected: Vec<_> = (0..=round).map(|r| (int_row(r as i64), 1)).collect();
        assert_eq!(client.snapshot(id, round).await.unwrap(), expected);
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let exit = child.wait().unwrap();
        assert!(exit.success(), "graceful shutdown exits 0: {exit:?}");
    }
}

/// A durable store served on `addr` (port 0 for any) until `stop` fires; returns the bound address and
/// the serving task, which shuts the store down when the server stops.
async fn serve_durable(
    dir: &std::path::Path,
    addr: std::net::SocketAddr,
    config: storage::StoreConfig,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> (std::net::SocketAddr, storage::InProcess, tokio::task::JoinHandle<()>) {
    let store = storage::InProcess::open(dir, config).unwrap();
    let server = storage::Server::bind(addr, store.clone(), server_security()).await.unwrap();
    let addr = server.local_addr().unwrap();
    let shut = store.clone();
    let task = tokio::spawn(async move {
        server.serve(async { drop(stop.await) }).await.unwrap();
        shut.shutdown().await;
    });
    (addr, store, task)
}

async fn wait_connected(client: &Client) {
    for _ in 0..1_000 {
        if client.is_connected() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the client never reconnected");
}

/// A durable server (see [`serve_durable`]) with a client and one table whose read policy follows its
/// upper (so only holds keep history).
struct DurableSetup {
    dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<()>,
    client: Client,
    id: GlobalId,
}

async fn durable_setup() -> DurableSetup {
    let dir = tempfile::tempdir().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (addr, _, serving) =
        serve_durable(dir.path(), "127.0.0.1:0".parse().unwrap(), storage::StoreConfig::default(), stopped)
            .await;
    let client = Client::connect(addr, client_security()).await.unwrap();
    let id = user(1);
    client.create_collection(id, int_desc()).await.unwrap();
    client.set_read_policy(id, ReadPolicy::LagWriteFrontier { lag_ms: 0, granularity_ms: 0 }).await.unwrap();
    DurableSetup { dir, addr, stop, serving, client, id }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_keeps_its_holds_and_listens_across_a_server_restart() {
    let DurableSetup { dir, addr, stop, serving, client, id } = durable_setup().await;
    let mut hold = client.acquire_read_hold(id, at(0)).await.unwrap();
    for t in 0..5 {
        client.append(vec![append(id, vec![(int_row(t as i64), t, 1)], t, t + 1)]).await.unwrap();
    }
    let mut listen = client.listen(id, 2).await.unwrap();
    hold.try_downgrade(at(2)).unwrap();
    let mut seen = Vec::new();
    loop {
        match listen.next().await.unwrap() {
            ListenEvent::Updates(updates) => seen.extend(updates),
            ListenEvent::Progress(frontier) if frontier == at(5) => break,
            ListenEvent::Progress(_) => {}
        }
    }

    // The server goes away; a call made meanwhile waits for it.
    stop.send(()).unwrap();
    serving.await.unwrap();
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { client.frontiers(id).await }
    });
    hold.try_downgrade(at(3)).unwrap(); // Recorded while disconnected.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!client.is_connected());

    // It comes back on the same address with its recovery grace; the client re-registers its hold at 3.
    let (_stop, stopped) = tokio::sync::oneshot::channel();
    let (_, store, _serving) =
        serve_durable(dir.path(), addr, storage::StoreConfig::default(), stopped).await;
    assert_eq!(waiting.await.unwrap().unwrap().upper, at(5));
    wait_connected(&client).await;
    // End the grace early: from now on only the client's re-registered hold keeps the history.
    assert_eq!(store.end_recovery(), 1);
    for t in 5..8 {
        client.append(vec![append(id, vec![(int_row(t as i64), t, 1)], t, t + 1)]).await.unwrap();
    }
    assert_eq!(wait_for_since(&client, id, 3).await.upper, at(8));
    assert_eq!(client.lost_holds(), 0);

    // The listen resumed at 5: every update once, none missing.
    loop {
        match listen.next().await.unwrap() {
            ListenEvent::Updates(updates) => seen.extend(updates),
            ListenEvent::Progress(frontier) if frontier == at(8) => break,
            ListenEvent::Progress(_) => {}
        }
    }
    let mut expected: Vec<_> = (0..3).map(|t| (int_row(t as i64), 2, 1)).collect();
    expected.extend((3..8).map(|t| (int_row(t as i64), t, 1)));
    assert_eq!(seen, expected);

    // Releasing the hold lets the since follow the policy again (to the upper, where the listen is).
    drop(hold);
    wait_for_since(&client, id, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_the_restarted_server_compacted_past_are_reported_lost() {
    let DurableSetup { dir, addr, stop, serving, client, id } = durable_setup().await;
    let hold = client.acquire_read_hold(id, at(0)).await.unwrap();
    client.append(vec![append(id, vec![], 0, 3)]).await.unwrap();
    stop.send(()).unwrap();
    serving.await.unwrap();

    // The next server has no grace and compacts before the client is back.
    let store = storage::InProcess::open(
        dir.path(),
        storage::StoreConfig { recovery_grace: Duration::ZERO, ..storage::StoreConfig::default() },
    )
    .unwrap();
    store.append(vec![append(id, vec![], 3, 10)]).await.unwrap();
    wait_for_since(&store, id, 10).await;
    let server = storage::Server::bind(addr, store.clone(), server_security()).await.unwrap();
    tokio::spawn(server.serve(std::future::pending()));
    wait_connected(&client).await;
    assert_eq!(client.lost_holds(), 1);
    // The client works on: a new hold is granted at the new since and holds.
    let mut fresh = client.acquire_read_hold(id, at(10)).await.unwrap();
    store.append(vec![append(id, vec![], 10, 12)]).await.unwrap();
    assert_eq!(store.frontiers(id).await.unwrap().since, at(10));
    fresh.try_downgrade(at(11)).unwrap();
    wait_for_since(&store, id, 11).await;
    drop(hold);
}

#[tokio::test]
async fn a_client_gives_up_after_its_reconnect_timeout_and_then_fails_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (addr, _, serving) =
        serve_durable(dir.path(), "127.0.0.1:0".parse().unwrap(), storage::StoreConfig::default(), stopped)
            .await;
    let config = storage::ClientConfig {
        reconnect_timeout: Duration::from_millis(200),
        ..storage::ClientConfig::new(client_security())
    };
    let client = Client::connect_with(addr, config).await.unwrap();
    let id = user(1);
    client.create_collection(id, int_desc()).await.unwrap();
    let mut listen = client.listen(id, 0).await.unwrap();
    // From before the server stops: the client's reconnect window starts when it sees the connection
    // close, which may be before the server's task has ended here (a loaded machine).
    let started = tokio::time::Instant::now();
    stop.send(()).unwrap();
    serving.await.unwrap();
    assert_eq!(client.frontiers(id).await, Err(storage::ReadError::Disconnected));
    assert!(started.elapsed() >= Duration::from_millis(150), "it waited for the reconnect first");
    loop {
        match listen.next().await {
            Ok(_) => {}
            Err(error) => {
                assert_eq!(error, storage::ReadError::Disconnected);
                break;
            }
        }
    }
    assert!(!client.is_connected());
}

/// A server and a client with a small frame limit.
async fn small_frames(store: storage::InProcess, max_frame_bytes: usize) -> Client {
    let server = storage::Server::bind("127.0.0.1:0", store, server_security())
        .await
        .expect("bind")
        .with_max_frame_bytes(max_frame_bytes);
    let addr = server.local_addr().expect("local addr");
    tokio::spawn(server.serve(std::future::pending()));
    let config = storage::ClientConfig { max_frame_bytes, ..storage::ClientConfig::new(client_security()) };
    Client::connect_with(addr, config).await.expect("connect")
}

#[tokio::test]
async fn requests_and_answers_over_the_frame_limit_are_typed_errors_and_the_connection_serves_on() {
    const MAX: usize = 8 << 10;
    let store = memory_store();
    let client = small_frames(store.clone(), MAX).await;
    let id = user(1);
    client.create_collection(id, int_desc()).await.unwrap();
    // An append over the limit is refused before it is sent: nothing changes.
    let rows: Vec<_> = (0..2_000).map(|i| (int_row(i), 0, 1)).collect();
    match client.append(vec![append(id, rows.clone(), 0, 1)]).await {
        Err(storage::AppendError::TooLarge { bytes, max_bytes }) => {
            assert_eq!(max_bytes, MAX as u64);
            assert!(bytes > MAX as u64, "{bytes}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(client.frontiers(id).await.unwrap().upper, at(0), "nothing was appended");
    // Written in process, the same rows make a snapshot and a listen's first event over the limit.
    store.append(vec![append(id, rows, 0, 1)]).await.unwrap();
    match client.snapshot(id, 0).await {
        Err(storage::ReadError::TooLarge { bytes, max_bytes }) => assert!(bytes > max_bytes, "{bytes}"),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let mut listen = client.listen(id, 0).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), listen.next()).await.expect("an answer") {
        Err(storage::ReadError::TooLarge { .. }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // The connection is still up and serves small requests.
    assert!(client.is_connected());
    client.append(vec![append(id, vec![(int_row(-1), 1, 1)], 1, 2)]).await.unwrap();
    assert_eq!(client.frontiers(id).await.unwrap().upper, at(2));
    // A read policy and a schema over the limit.
    let policy = ReadPolicy::Multiple(vec![ReadPolicy::ValidFrom(at(0)); 5_000]);
    assert!(matches!(client.set_read_policy(id, policy).await, Err(storage::HoldError::TooLarge { .. })));
    let columns: Vec<(String, protocol::ColumnType)> = (0..1_000)
        .map(|i| (format!("column {i}"), protocol::ColumnType::new(protocol::ScalarType::Int64, false)))
        .collect();
    let wide = protocol::RelationDesc::new(columns.iter().map(|(n, t)| (n.as_str(), *t)));
    assert!(matches!(
        client.create_collection(user(2), wide).await,
        Err(storage::CreateError::TooLarge { .. })
    ));
    assert!(client.is_connected());
}

#[tokio::test]
async fn a_client_refuses_a_frame_limit_below_the_minimum() {
    let addr = serve(memory_store()).await;
    let config = storage::ClientConfig {
        max_frame_bytes: storage::MIN_FRAME_BYTES - 1,
        ..storage::ClientConfig::new(client_security())
    };
    assert!(matches!(Client::connect_with(addr, config).await, Err(storage::ConnectError::InvalidConfig(_))));
}
