//! [`Client`]: a [`StorageCollections`] over one TCP connection to a [`crate::Server`].
//!
//! **What this is.** One connection multiplexing any number of concurrent requests, listens, frontier
//! watches and read holds: a writer task sends requests from an unbounded queue (its callers bound it by
//! awaiting their answers), a reader task routes each answer to its caller by request number. Read holds
//! are frontiers' [`ReadHold`] values whose change callback sends `HoldChanges` to the server, so dropping
//! or downgrading one here moves the server's since there.
//!
//! **What this is not.** No reconnect: once the connection is lost (or [`Client::close`] is called), every
//! pending and later call fails with `Disconnected`, and the server releases the connection's holds. Hold
//! values and listens keep the connection open while they live, like the `Client` itself.
//!
//! **Invariants.** A reply whose caller has gone away is discarded, except a granted read hold, which is
//! released at once (else the server would keep it until the connection closes). Listen and watch pulls
//! are cancellation-safe: an abandoned `next()` leaves its request in flight and the next call picks up
//! its answer.
//!
//! **Tests.** `tests/it/server.rs`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use frontiers::{Antichain, ChangeBatch, ReadHold, ReadPolicy};
use protocol::frame::{FrameDecoder, encode_frame};
use protocol::{Diff, GlobalId, RelationDesc, Row};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::api::{
    AppendRequest, BoxFuture, CollectionFrontiers, ListenEvent, StorageCollections, StorageReadHold,
};
use crate::error::{AppendError, CreateError, DropError, HoldError, ReadError};
use crate::listen::{FrontierWatch, Listen};
use crate::wire::{MAX_FRAME_BYTES, Reply, STORAGE_PROTOCOL_VERSION, StorageRequest, StorageResponse};

/// How long [`Client::connect`] waits for the server's answer to its handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why [`Client::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection or the handshake's I/O failed.
    #[error("cannot connect to storage: {0}")]
    Io(#[from] io::Error),
    /// The server refused the handshake or answered something else.
    #[error("storage handshake failed: {0}")]
    Handshake(String),
}

/// A caller waiting for a reply.
struct Waiter {
    tx: oneshot::Sender<Reply>,
    /// For a hold acquisition, the collection, so an abandoned grant can be released.
    hold: Option<GlobalId>,
}

/// What the tasks and the handle share.
struct Conn {
    out: mpsc::UnboundedSender<StorageRequest>,
    /// Callers waiting for a reply; `None` once the connection is gone.
    pending: Mutex<Option<HashMap<u64, Waiter>>>,
    next_request: AtomicU64,
    next_stream: AtomicU64,
}

impl Conn {
    fn close(&self) {
        // Dropping the senders wakes every waiting caller with `Disconnected`.
        self.pending.lock().expect("pending lock").take();
    }

    fn register(&self, hold: Option<GlobalId>) -> Option<(u64, oneshot::Receiver<Reply>)> {
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut pending = self.pending.lock().expect("pending lock");
        pending.as_mut()?.insert(request, Waiter { tx, hold });
        Some((request, rx))
    }

    /// Sends `make(request number)` and returns the receiver of its reply; `None` when disconnected.
    fn start(&self, make: impl FnOnce(u64) -> StorageRequest) -> Option<oneshot::Receiver<Reply>> {
        self.start_with(None, make)
    }

    fn start_with(
        &self,
        hold: Option<GlobalId>,
        make: impl FnOnce(u64) -> StorageRequest,
    ) -> Option<oneshot::Receiver<Reply>> {
        let (request, rx) = self.register(hold)?;
        if self.out.send(make(request)).is_err() {
            self.close();
            return None;
        }
        Some(rx)
    }
}

struct ClientHandle {
    conn: Arc<Conn>,
    peer: SocketAddr,
    reader: AbortHandle,
    writer: AbortHandle,
}

impl ClientHandle {
    fn close(&self) {
        self.reader.abort();
        self.writer.abort();
        self.conn.close();
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        self.close();
    }
}

/// A connection to a storage server. Cloning shares the connection. See the module documentation.
#[derive(Clone)]
pub struct Client {
    handle: Arc<ClientHandle>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("peer", &self.handle.peer).finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the server at `addr` and performs the handshake.
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<Client, ConnectError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        let (mut read_half, mut write_half) = stream.into_split();
        let mut buffer = Vec::new();
        encode_frame(
            &StorageRequest::Hello { version: STORAGE_PROTOCOL_VERSION },
            MAX_FRAME_BYTES,
            &mut buffer,
        )
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
        write_half.write_all(&buffer).await?;
        let mut decoder = FrameDecoder::new(MAX_FRAME_BYTES);
        let mut chunk = vec![0u8; 4096];
        let handshake = async {
            loop {
                match decoder.next_message::<StorageResponse>() {
                    Ok(Some(answer)) => return Ok(answer),
                    Ok(None) => {}
                    Err(error) => return Err(ConnectError::Handshake(error.to_string())),
                }
                let n = read_half.read(&mut chunk).await?;
                if n == 0 {
                    return Err(ConnectError::Handshake("the server closed the connection".into()));
                }
                decoder.push(&chunk[..n]);
            }
        };
        let answer = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(answer) => answer?,
            Err(_) => return Err(ConnectError::Handshake("the server did not answer the handshake".into())),
        };
        match answer {
            StorageResponse::Hello { version } if version == STORAGE_PROTOCOL_VERSION => {}
            StorageResponse::HelloRefused { version, reason } => {
                return Err(ConnectError::Handshake(format!(
                    "refused by server version {version}: {reason}"
                )));
            }
            other => return Err(ConnectError::Handshake(format!("unexpected answer {other:?}"))),
        }
        let (out, out_rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            out,
            pending: Mutex::new(Some(HashMap::new())),
            next_request: AtomicU64::new(0),
            next_stream: AtomicU64::new(0),
        });
        let writer = tokio::spawn(write_loop(write_half, out_rx)).abort_handle();
        let reader = tokio::spawn(read_loop(read_half, decoder, Arc::clone(&conn))).abort_handle();
        Ok(Client { handle: Arc::new(ClientHandle { conn, peer, reader, writer }) })
    }

    /// Closes the connection now: pending and later calls fail with `Disconnected`, listens end with it,
    /// and the server releases every hold this connection had (hold values here then hold nothing).
    pub fn close(&self) {
        self.handle.close();
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.handle.peer
    }

    async fn call(&self, make: impl FnOnce(u64) -> StorageRequest) -> Option<Reply> {
        let rx = self.handle.conn.start(make)?;
        rx.await.ok()
    }
}

async fn write_loop(mut socket: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<StorageRequest>) {
    let mut buffer = Vec::new();
    while let Some(message) = rx.recv().await {
        buffer.clear();
        let mut next = Some(message);
        while let Some(message) = next.take() {
            if let Err(error) = encode_frame(&message, MAX_FRAME_BYTES, &mut buffer) {
                tracing::error!(%error, "cannot encode a storage request; closing the connection");
                return;
            }
            if buffer.len() < (1 << 20) {
                next = rx.try_recv().ok();
            }
        }
        if let Err(error) = socket.write_all(&buffer).await {
            tracing::debug!(%error, "storage connection write failed");
            return;
        }
    }
}

async fn read_loop(mut socket: OwnedReadHalf, mut decoder: FrameDecoder, conn: Arc<Conn>) {
    let mut chunk = vec![0u8; 64 * 1024];
    let end = 'read: loop {
        loop {
            match decoder.next_message::<StorageResponse>() {
                Ok(Some(StorageResponse::Reply { request, reply })) => deliver(&conn, request, reply),
                Ok(Some(other)) => break 'read format!("unexpected message {other:?}"),
                Ok(None) => break,
                Err(error) => break 'read error.to_string(),
            }
        }
        match socket.read(&mut chunk).await {
            Ok(0) => break "the server closed the connection".to_string(),
            Ok(n) => decoder.push(&chunk[..n]),
            Err(error) => break error.to_string(),
        }
    };
    tracing::info!(reason = %end, "storage connection lost");
    conn.close();
}

fn deliver(conn: &Conn, request: u64, reply: Reply) {
    let waiter = conn.pending.lock().expect("pending lock").as_mut().and_then(|p| p.remove(&request));
    let Some(Waiter { tx, hold }) = waiter else {
        return;
    };
    if let Err(Reply::HoldAcquired(Ok(frontier))) = tx.send(reply)
        && let Some(id) = hold
    {
        // The caller stopped waiting, so nobody owns the granted hold: give it back.
        let changes = frontier.iter().map(|t| (*t, -1)).collect();
        let _ = conn.out.send(StorageRequest::HoldChanges { id, changes });
    }
}

fn hold_tx(handle: Arc<ClientHandle>) -> frontiers::ChangeTx<GlobalId, u64> {
    Arc::new(move |id: &GlobalId, changes: ChangeBatch<u64>| {
        let changes: Vec<(u64, i64)> = changes.into_inner().into_iter().collect();
        if !changes.is_empty() {
            let _ = handle.conn.out.send(StorageRequest::HoldChanges { id: *id, changes });
        }
    })
}

/// What the server answers to a pull: the next events, or the error that ends the stream.
type PullResult<E> = Result<Vec<E>, ReadError>;

/// The pull loop a remote listen and a remote frontier watch share: when its buffer is empty it asks the
/// server for the stream's next events (one request in flight at most), and it ends at the first error.
struct RemotePull<E> {
    handle: Arc<ClientHandle>,
    /// The stream's number on this connection.
    stream: u64,
    buffer: VecDeque<E>,
    inflight: Option<oneshot::Receiver<Reply>>,
    finished: Option<ReadError>,
    /// The request for the next events (given the request number and the stream).
    next_request: fn(u64, u64) -> StorageRequest,
    /// The events in a reply to it, or the reply back if it is of another kind.
    events: fn(Reply) -> Result<PullResult<E>, Reply>,
    /// The request that tells the server the stream is gone.
    drop_request: fn(u64) -> StorageRequest,
}

impl<E> RemotePull<E> {
    fn new(
        handle: Arc<ClientHandle>,
        stream: u64,
        next_request: fn(u64, u64) -> StorageRequest,
        events: fn(Reply) -> Result<PullResult<E>, Reply>,
        drop_request: fn(u64) -> StorageRequest,
    ) -> Self {
        RemotePull {
            handle,
            stream,
            buffer: VecDeque::new(),
            inflight: None,
            finished: None,
            next_request,
            events,
            drop_request,
        }
    }

    async fn next(&mut self) -> Result<E, ReadError> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                return Ok(event);
            }
            if let Some(error) = &self.finished {
                return Err(error.clone());
            }
            if self.inflight.is_none() {
                let (stream, next_request) = (self.stream, self.next_request);
                self.inflight = self.handle.conn.start(|request| next_request(request, stream));
                if self.inflight.is_none() {
                    self.finished = Some(ReadError::Disconnected);
                    continue;
                }
            }
            let rx = self.inflight.as_mut().expect("set above");
            let reply = rx.await;
            self.inflight = None;
            match reply.map(self.events) {
                Ok(Ok(Ok(events))) => self.buffer.extend(events),
                Ok(Ok(Err(error))) => self.finished = Some(error),
                Ok(Err(other)) => {
                    self.finished = Some(ReadError::Protocol(format!("unexpected reply {other:?}")));
                }
                Err(_) => self.finished = Some(ReadError::Disconnected),
            }
        }
    }

    fn try_next(&mut self) -> Option<Result<E, ReadError>> {
        self.buffer.pop_front().map(Ok)
    }
}

impl<E> Drop for RemotePull<E> {
    fn drop(&mut self) {
        let _ = self.handle.conn.out.send((self.drop_request)(self.stream));
    }
}

/// A listen over the network: pulls the next events when its buffer is empty.
pub(crate) struct RemoteListen {
    id: GlobalId,
    as_of: u64,
    pull: RemotePull<ListenEvent>,
}

impl RemoteListen {
    pub(crate) fn id(&self) -> GlobalId {
        self.id
    }

    pub(crate) fn as_of(&self) -> u64 {
        self.as_of
    }

    pub(crate) async fn next(&mut self) -> Result<ListenEvent, ReadError> {
        self.pull.next().await
    }

    pub(crate) fn try_next(&mut self) -> Option<Result<ListenEvent, ReadError>> {
        self.pull.try_next()
    }
}

/// A frontier watch over the network.
pub(crate) struct RemoteWatch {
    pull: RemotePull<(GlobalId, Option<CollectionFrontiers>)>,
}

impl RemoteWatch {
    pub(crate) async fn next(&mut self) -> Result<(GlobalId, Option<CollectionFrontiers>), ReadError> {
        self.pull.next().await
    }

    pub(crate) fn try_next(&mut self) -> Option<Result<(GlobalId, Option<CollectionFrontiers>), ReadError>> {
        self.pull.try_next()
    }
}

impl StorageCollections for Client {
    fn create_collection(&self, id: GlobalId, desc: RelationDesc) -> BoxFuture<'_, Result<(), CreateError>> {
        Box::pin(async move {
            match self.call(|request| StorageRequest::CreateCollection { request, id, desc }).await {
                Some(Reply::Created(result)) => result,
                _ => Err(CreateError::Disconnected),
            }
        })
    }

    fn drop_collection(&self, id: GlobalId) -> BoxFuture<'_, Result<(), DropError>> {
        Box::pin(async move {
            match self.call(|request| StorageRequest::DropCollection { request, id }).await {
                Some(Reply::Dropped(result)) => result,
                _ => Err(DropError::Disconnected),
            }
        })
    }

    fn list_collections(&self) -> BoxFuture<'_, Result<Vec<(GlobalId, RelationDesc)>, ReadError>> {
        Box::pin(async move {
            match self.call(|request| StorageRequest::ListCollections { request }).await {
                Some(Reply::Collections(result)) => result,
                Some(other) => Err(ReadError::Protocol(format!("unexpected reply {other:?}"))),
                None => Err(ReadError::Disconnected),
            }
        })
    }

    fn frontiers(&self, id: GlobalId) -> BoxFuture<'_, Result<CollectionFrontiers, ReadError>> {
        Box::pin(async move {
            match self.call(|request| StorageRequest::Frontiers { request, id }).await {
                Some(Reply::Frontiers(result)) => result,
                Some(other) => Err(ReadError::Protocol(format!("unexpected reply {other:?}"))),
                None => Err(ReadError::Disconnected),
            }
        })
    }

    fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'_, Result<(), AppendError>> {
        Box::pin(async move {
            match self.call(|request| StorageRequest::Append { request, requests }).await {
                Some(Reply::Appended(result)) => result,
                _ => Err(AppendError::Disconnected),
            }
        })
    }

    fn acquire_read_hold(
        &self,
        id: GlobalId,
        frontier: Antichain<u64>,
    ) -> BoxFuture<'_, Result<StorageReadHold, HoldError>> {
        Box::pin(async move {
            let rx = self.handle.conn.start_with(Some(id), |request| StorageRequest::AcquireReadHold {
                request,
                id,
                frontier,
            });
            let reply = match rx {
                Some(rx) => rx.await.ok(),
                None => None,
            };
            match reply {
                Some(Reply::HoldAcquired(Ok(frontier))) => {
                    Ok(ReadHold::new(id, frontier, hold_tx(Arc::clone(&self.handle))))
                }
                Some(Reply::HoldAcquired(Err(error))) => Err(error),
                _ => Err(HoldError::Disconnected),
            }
        })
    }

    fn set_read_policy(&self, id: GlobalId, policy: ReadPolicy<u64>) -> BoxFuture<'_, Result<(), HoldError>> {
        Box::pin(async move {
            match self.call(|request| StorageRequest::SetReadPolicy { request, id, policy }).await {
                Some(Reply::PolicySet(result)) => result,
                _ => Err(HoldError::Disconnected),
            }
        })
    }

    fn snapshot(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Vec<(Row, Diff)>, ReadError>> {
        Box::pin(async move {
            match self.call(|request| StorageRequest::Snapshot { request, id, as_of }).await {
                Some(Reply::Snapshot(result)) => result,
                Some(other) => Err(ReadError::Protocol(format!("unexpected reply {other:?}"))),
                None => Err(ReadError::Disconnected),
            }
        })
    }

    fn listen(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Listen, ReadError>> {
        Box::pin(async move {
            let listen = self.handle.conn.next_stream.fetch_add(1, Ordering::Relaxed);
            match self.call(|request| StorageRequest::Listen { request, listen, id, as_of }).await {
                Some(Reply::Listening(Ok(()))) => Ok(Listen::remote(RemoteListen {
                    id,
                    as_of,
                    pull: RemotePull::new(
                        Arc::clone(&self.handle),
                        listen,
                        |request, listen| StorageRequest::ListenNext { request, listen },
                        |reply| match reply {
                            Reply::ListenEvents(result) => Ok(result),
                            other => Err(other),
                        },
                        |listen| StorageRequest::ListenDrop { listen },
                    ),
                })),
                Some(Reply::Listening(Err(error))) => Err(error),
                Some(other) => Err(ReadError::Protocol(format!("unexpected reply {other:?}"))),
                None => Err(ReadError::Disconnected),
            }
        })
    }

    fn watch_frontiers(&self) -> BoxFuture<'_, Result<FrontierWatch, ReadError>> {
        Box::pin(async move {
            let watch = self.handle.conn.next_stream.fetch_add(1, Ordering::Relaxed);
            match self.call(|request| StorageRequest::WatchFrontiers { request, watch }).await {
                Some(Reply::Watching(Ok(()))) => Ok(FrontierWatch::remote(RemoteWatch {
                    pull: RemotePull::new(
                        Arc::clone(&self.handle),
                        watch,
                        |request, watch| StorageRequest::WatchNext { request, watch },
                        |reply| match reply {
                            Reply::WatchEvents(result) => Ok(result),
                            other => Err(other),
                        },
                        |watch| StorageRequest::WatchDrop { watch },
                    ),
                })),
                Some(Reply::Watching(Err(error))) => Err(error),
                Some(other) => Err(ReadError::Protocol(format!("unexpected reply {other:?}"))),
                None => Err(ReadError::Disconnected),
            }
        })
    }
}
