//! [`Server`]: serves an [`InProcess`] store to many clients over TCP, speaking [`crate::wire`].
//!
//! **Per connection** a reader loop decodes frames and dispatches them; a writer task encodes answers from a
//! bounded queue (a client that does not read its answers stops the reader, which stops reading its
//! requests: backpressure, not buffering). Both go through `transport` with the server's frame limit. An
//! answer over the limit becomes its kind's `ReadError::TooLarge` ([`Reply::too_large`]); one that has no
//! stand-in, or cannot be encoded at all, ends the connection (logged), which fails every request of the
//! client in flight on it, rather than leave one waiting. Requests that may wait (appends, snapshots, listen and watch
//! pulls) run as tasks owned by the connection; hold operations run inline, in order. The connection owns,
//! per collection, a `MutableAntichain` of the client's hold frontiers and one real `ReadHold` kept at that
//! antichain's frontier (released when it empties).
//!
//! **Failure isolation.** A malformed frame, a bad handshake, an invalid frontier or a hold change that
//! would go negative or backwards closes *that* connection only (logged with `tracing`); so does a client
//! that disappears. Closing drops the connection's holds, listens, watches and tasks.
//!
//! **What this is not:** the store (that is [`InProcess`]) or the process (`src/bin/storage-server.rs`).
//!
//! **Tests.** `tests/it/server.rs`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use frontiers::{Antichain, MutableAntichain};
use protocol::GlobalId;
use protocol::frame::FrameError;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use crate::api::{StorageCollections, StorageReadHold};
use crate::error::ReadError;
use crate::inprocess::InProcess;
use crate::listen::{FrontierWatch, Listen};
use crate::wire::{MAX_FRAME_BYTES, Reply, STORAGE_PROTOCOL_VERSION, StorageRequest, StorageResponse};
use transport::{FramedRead, FramedWrite};

/// Answers a connection may have queued for its writer before its reader stops reading.
const OUTGOING_QUEUE: usize = 256;
/// A pull answer (listen or watch) carries events up to about this many row bytes.
const PULL_BUDGET_BYTES: usize = 8 << 20;

/// A TCP server for one store. See the module documentation.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    store: InProcess,
    max_frame_bytes: usize,
}

impl Server {
    /// Binds `addr` (use port 0 for any free port).
    pub async fn bind(addr: impl ToSocketAddrs, store: InProcess) -> io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Server { listener, store, max_frame_bytes: MAX_FRAME_BYTES })
    }

    /// The same server with another frame limit (default [`MAX_FRAME_BYTES`]); its clients must use the
    /// same (`ClientConfig::max_frame_bytes`).
    pub fn with_max_frame_bytes(mut self, max_frame_bytes: usize) -> Server {
        self.max_frame_bytes = max_frame_bytes;
        self
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts and serves connections until `shutdown` completes, then closes every connection (releasing
    /// their holds). It does not shut the store down; the caller does that (see
    /// [`InProcess::shutdown`]). Before it closes the connections it holds every collection at its since
    /// ([`InProcess::hold_sinces`]), so their clients can re-register their holds with the next server
    /// on this data; a caller that keeps using the store ends that with [`InProcess::end_recovery`].
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let mut connections = JoinSet::new();
        let next_connection = AtomicU64::new(0);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            // Out of file descriptors and the like: keep serving the connections we have.
                            tracing::warn!(%error, "accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let connection = next_connection.fetch_add(1, Ordering::Relaxed);
                    let store = self.store.clone();
                    connections.spawn(serve_connection(stream, peer, connection, store, self.max_frame_bytes));
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        tracing::info!(connections = connections.len(), "storage server stopping");
        // The clients will reconnect to the next server on this data: closing their connections must not
        // let compaction pass their holds meanwhile (the sinces reached now are what the next one recovers).
        self.store.hold_sinces();
        connections.shutdown().await;
        Ok(())
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnectionEnd {
    #[error("the client closed the connection")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("an answer cannot be sent: {0}")]
    Unsendable(String),
}

/// The connection's holds on one collection.
struct ConnectionHold {
    /// The client's hold frontiers, with counts.
    counts: MutableAntichain<u64>,
    /// The real hold, at `counts`' frontier.
    hold: StorageReadHold,
}

struct PullSlot<T> {
    stream: Arc<tokio::sync::Mutex<T>>,
    task: Option<AbortHandle>,
}

struct Connection {
    store: InProcess,
    connection: u64,
    out: mpsc::Sender<StorageResponse>,
    holds: HashMap<GlobalId, ConnectionHold>,
    listens: HashMap<u64, PullSlot<Listen>>,
    watches: HashMap<u64, PullSlot<FrontierWatch>>,
    tasks: JoinSet<()>,
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    connection: u64,
    store: InProcess,
    max_frame_bytes: usize,
) {
    let _ = stream.set_nodelay(true);
    let span = tracing::info_span!("storage_connection", connection, %peer);
    let _entered = span.enter();
    drop(_entered);
    tracing::debug!(connection, %peer, "storage client connected");
    let (read_half, write_half) = stream.into_split();
    let (out, out_rx) = mpsc::channel(OUTGOING_QUEUE);
    let mut writer = tokio::spawn(write_loop(FramedWrite::new(write_half, max_frame_bytes), out_rx));
    let mut state = Connection {
        store,
        connection,
        out,
        holds: HashMap::new(),
        listens: HashMap::new(),
        watches: HashMap::new(),
        tasks: JoinSet::new(),
    };
    let input = FramedRead::new(read_half, max_frame_bytes);
    // The writer ends early only when an answer cannot be sent: the connection ends with it.
    let (end, writer_done) = tokio::select! {
        end = state.read_loop(input) => (end, false),
        written = &mut writer => match written {
            Ok(Err(end)) => (end, true),
            Ok(Ok(())) | Err(_) => (ConnectionEnd::Closed, true),
        },
    };
    let holds = state.holds.len();
    // Dropping the state releases the holds, ends listens and watches, and aborts the tasks.
    drop(state);
    match end {
        ConnectionEnd::Closed => tracing::info!(connection, %peer, holds, "storage client disconnected"),
        ConnectionEnd::Unsendable(_) => {
            tracing::error!(connection, %peer, holds, error = %end, "closing storage connection")
        }
        end => tracing::warn!(connection, %peer, holds, error = %end, "closing storage connection"),
    }
    // The writer ends once every sender is gone (the tasks are aborted); let it flush what it has.
    if !writer_done {
        let _ = writer.await;
    }
}

/// Writes the answers queued on `rx`, coalescing what is queued into one write. Ends when every sender is
/// gone, when the client is gone, or with `Unsendable` when an answer cannot be sent (see the module
/// documentation).
async fn write_loop(
    mut output: FramedWrite<OwnedWriteHalf>,
    mut rx: mpsc::Receiver<StorageResponse>,
) -> Result<(), ConnectionEnd> {
    while let Some(message) = rx.recv().await {
        let mut next = Some(message);
        while let Some(message) = next.take() {
            encode_answer(&mut output, &message)?;
            if !output.batch_full() {
                next = rx.try_recv().ok();
            }
        }
        if output.flush().await.is_err() {
            return Ok(());
        }
    }
    let _ = output.shutdown().await;
    Ok(())
}

/// Appends `message` to the batch, or its stand-in if it is over the frame limit.
fn encode_answer(
    output: &mut FramedWrite<OwnedWriteHalf>,
    message: &StorageResponse,
) -> Result<(), ConnectionEnd> {
    let (len, max) = match output.encode(message) {
        Ok(()) => return Ok(()),
        Err(FrameError::TooLarge { len, max }) => (len, max),
        Err(error) => return Err(ConnectionEnd::Unsendable(error.to_string())),
    };
    let StorageResponse::Reply { request, reply } = message else {
        return Err(ConnectionEnd::Unsendable(format!("a handshake answer of {len} bytes")));
    };
    let Some(stand_in) = reply.too_large(len as u64, max as u64) else {
        return Err(ConnectionEnd::Unsendable(format!(
            "a reply of {len} bytes is over the frame limit of {max}"
        )));
    };
    tracing::warn!(request, len, max, "a reply is over the frame limit; answering TooLarge");
    output
        .encode(&StorageResponse::Reply { request: *request, reply: stand_in })
        .map_err(|error| ConnectionEnd::Unsendable(error.to_string()))
}

impl Connection {
    async fn read_loop(&mut self, mut input: FramedRead<OwnedReadHalf>) -> ConnectionEnd {
        let mut greeted = false;
        loop {
            let message = tokio::select! {
                message = input.recv::<StorageRequest>() => match message {
                    Ok(message) => message,
                    Err(FrameError::Closed) => return ConnectionEnd::Closed,
                    Err(FrameError::Io(error)) => return ConnectionEnd::Io(error),
                    Err(error) => return ConnectionEnd::Protocol(error.to_string()),
                },
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => continue,
            };
            if !greeted {
                match message {
                    StorageRequest::Hello { version } if version == STORAGE_PROTOCOL_VERSION => {
                        greeted = true;
                        let hello = StorageResponse::Hello { version: STORAGE_PROTOCOL_VERSION };
                        if self.out.send(hello).await.is_err() {
                            return ConnectionEnd::Closed;
                        }
                        continue;
                    }
                    StorageRequest::Hello { version } => {
                        let reason = format!("this server speaks version {STORAGE_PROTOCOL_VERSION}");
                        let refused =
                            StorageResponse::HelloRefused { version: STORAGE_PROTOCOL_VERSION, reason };
                        let _ = self.out.send(refused).await;
                        return ConnectionEnd::Protocol(format!("client speaks version {version}"));
                    }
                    _ => return ConnectionEnd::Protocol("the first message must be Hello".into()),
                }
            }
            if let Err(end) = self.handle(message).await {
                return end;
            }
        }
    }

    /// Runs `work` as a task of this connection and sends its reply.
    fn spawn_reply<F>(&mut self, request: u64, work: F) -> AbortHandle
    where
        F: Future<Output = Reply> + Send + 'static,
    {
        let out = self.out.clone();
        self.tasks.spawn(async move {
            let reply = work.await;
            let _ = out.send(StorageResponse::Reply { request, reply }).await;
        })
    }

    async fn reply(&self, request: u64, reply: Reply) -> Result<(), ConnectionEnd> {
        self.out.send(StorageResponse::Reply { request, reply }).await.map_err(|_| ConnectionEnd::Closed)
    }

    async fn handle(&mut self, message: StorageRequest) -> Result<(), ConnectionEnd> {
        message.validate().map_err(ConnectionEnd::Protocol)?;
        let store = self.store.clone();
        match message {
            StorageRequest::Hello { .. } => return Err(ConnectionEnd::Protocol("Hello sent twice".into())),
            StorageRequest::CreateCollection { request, id, desc } => {
                self.spawn_reply(
                    request,
                    async move { Reply::Created(store.create_collection(id, desc).await) },
                );
            }
            StorageRequest::DropCollection { request, id } => {
                self.spawn_reply(request, async move { Reply::Dropped(store.drop_collection(id).await) });
            }
            StorageRequest::ListCollections { request } => {
                self.spawn_reply(request, async move { Reply::Collections(store.list_collections().await) });
            }
            StorageRequest::Frontiers { request, id } => {
                self.spawn_reply(request, async move { Reply::Frontiers(store.frontiers(id).await) });
            }
            StorageRequest::Append { request, requests } => {
                self.spawn_reply(request, async move { Reply::Appended(store.append(requests).await) });
            }
            StorageRequest::SetReadPolicy { request, id, policy } => {
                self.spawn_reply(request, async move {
                    Reply::PolicySet(store.set_read_policy(id, policy).await)
                });
            }
            StorageRequest::Snapshot { request, id, as_of } => {
                self.spawn_reply(request, async move { Reply::Snapshot(store.snapshot(id, as_of).await) });
            }
            StorageRequest::AcquireReadHold { request, id, frontier } => {
                let reply = self.acquire(id, frontier).await;
                self.reply(request, Reply::HoldAcquired(reply)).await?;
            }
            StorageRequest::HoldChanges { id, changes } => self.hold_changes(id, changes)?,
            StorageRequest::Listen { request, listen, id, as_of, resume } => {
                if self.listens.contains_key(&listen) {
                    return Err(ConnectionEnd::Protocol(format!("listen number {listen} reused")));
                }
                let opened =
                    if resume { store.listen_from(id, as_of) } else { store.listen(id, as_of).await };
                let reply = match opened {
                    Ok(stream) => {
                        let slot = PullSlot { stream: Arc::new(tokio::sync::Mutex::new(stream)), task: None };
                        self.listens.insert(listen, slot);
                        Ok(())
                    }
                    Err(error) => Err(error),
                };
                self.reply(request, Reply::Listening(reply)).await?;
            }
            StorageRequest::ListenNext { request, listen } => {
                let Some(slot) = self.listens.get(&listen) else {
                    return Err(ConnectionEnd::Protocol(format!("unknown listen number {listen}")));
                };
                let stream = Arc::clone(&slot.stream);
                let task = self.spawn_reply(request, async move {
                    let mut stream = stream.lock().await;
                    Reply::ListenEvents(pull_listen(&mut stream).await)
                });
                if let Some(slot) = self.listens.get_mut(&listen) {
                    slot.task = Some(task);
                }
            }
            StorageRequest::ListenDrop { listen } => {
                if let Some(slot) = self.listens.remove(&listen)
                    && let Some(task) = slot.task
                {
                    task.abort();
                }
            }
            StorageRequest::WatchFrontiers { request, watch } => {
                if self.watches.contains_key(&watch) {
                    return Err(ConnectionEnd::Protocol(format!("watch number {watch} reused")));
                }
                let reply = match store.watch_frontiers().await {
                    Ok(stream) => {
                        let slot = PullSlot { stream: Arc::new(tokio::sync::Mutex::new(stream)), task: None };
                        self.watches.insert(watch, slot);
                        Ok(())
                    }
                    Err(error) => Err(error),
                };
                self.reply(request, Reply::Watching(reply)).await?;
            }
            StorageRequest::WatchNext { request, watch } => {
                let Some(slot) = self.watches.get(&watch) else {
                    return Err(ConnectionEnd::Protocol(format!("unknown watch number {watch}")));
                };
                let stream = Arc::clone(&slot.stream);
                let task = self.spawn_reply(request, async move {
                    let mut stream = stream.lock().await;
                    Reply::WatchEvents(pull_watch(&mut stream).await)
                });
                if let Some(slot) = self.watches.get_mut(&watch) {
                    slot.task = Some(task);
                }
            }
            StorageRequest::WatchDrop { watch } => {
                if let Some(slot) = self.watches.remove(&watch)
                    && let Some(task) = slot.task
                {
                    task.abort();
                }
            }
        }
        Ok(())
    }

    /// Registers one more client hold at `frontier` on `id`.
    async fn acquire(
        &mut self,
        id: GlobalId,
        frontier: Antichain<u64>,
    ) -> Result<Antichain<u64>, crate::HoldError> {
        let hold = self.store.acquire_read_hold(id, frontier.clone()).await?;
        match self.holds.get_mut(&id) {
            Some(entry) => {
                let changed = entry.counts.update_iter(frontier.iter().map(|t| (*t, 1))).count();
                let _ = changed;
                if let Err(error) = entry.hold.merge(hold) {
                    panic!("holds from one store always merge: {error}");
                }
                assert_eq!(
                    entry.hold.since().borrow(),
                    entry.counts.frontier(),
                    "a connection's real hold sits at its clients' holds' frontier"
                );
            }
            None => {
                let mut counts = MutableAntichain::new();
                let _ = counts.update_iter(frontier.iter().map(|t| (*t, 1))).count();
                self.holds.insert(id, ConnectionHold { counts, hold });
            }
        }
        tracing::trace!(connection = self.connection, %id, ?frontier, "client read hold acquired");
        Ok(frontier)
    }

    /// Applies a client's hold changes on `id`; a change that is not a legal hold transition is a protocol
    /// violation.
    fn hold_changes(&mut self, id: GlobalId, changes: Vec<(u64, i64)>) -> Result<(), ConnectionEnd> {
        let Some(entry) = self.holds.get_mut(&id) else {
            return Err(ConnectionEnd::Protocol(format!(
                "hold changes on {id}, which this connection does not hold"
            )));
        };
        let mut net: HashMap<u64, i64> = HashMap::new();
        for (time, delta) in &changes {
            *net.entry(*time).or_default() += delta;
        }
        for (time, delta) in &net {
            let after = entry.counts.count_for(time).checked_add(*delta);
            if after.is_none_or(|count| count < 0) {
                return Err(ConnectionEnd::Protocol(format!(
                    "hold count on {id} at {time} would go negative"
                )));
            }
        }
        let _ = entry.counts.update_iter(net.into_iter().filter(|(_, d)| *d != 0)).count();
        let frontier = entry.counts.frontier().to_owned();
        if frontier.is_empty() {
            self.holds.remove(&id);
            tracing::trace!(connection = self.connection, %id, "client read holds released");
            return Ok(());
        }
        if frontier != *entry.hold.since() {
            entry.hold.try_downgrade(frontier).map_err(|error| {
                ConnectionEnd::Protocol(format!("hold changes on {id} move the hold backwards: {error}"))
            })?;
        }
        Ok(())
    }
}

/// Waits for a listen's next event and adds every event ready right after it, up to a budget.
async fn pull_listen(listen: &mut Listen) -> Result<Vec<crate::ListenEvent>, ReadError> {
    let first = listen.next().await?;
    let mut bytes = event_bytes(&first);
    let mut events = vec![first];
    while bytes < PULL_BUDGET_BYTES {
        match listen.try_next() {
            Some(Ok(event)) => {
                bytes += event_bytes(&event);
                events.push(event);
            }
            // A final error is reported by the next pull.
            Some(Err(_)) | None => break,
        }
    }
    Ok(events)
}

fn event_bytes(event: &crate::ListenEvent) -> usize {
    match event {
        crate::ListenEvent::Updates(updates) => updates.iter().map(|(row, _, _)| row.byte_len() + 16).sum(),
        crate::ListenEvent::Progress(_) => 16,
    }
}

type FrontierChange = (GlobalId, Option<crate::CollectionFrontiers>);

async fn pull_watch(watch: &mut FrontierWatch) -> Result<Vec<FrontierChange>, ReadError> {
    let first = watch.next().await?;
    let mut changes = vec![first];
    while changes.len() < 4_096 {
        match watch.try_next() {
            Some(Ok(change)) => changes.push(change),
            Some(Err(_)) | None => break,
        }
    }
    Ok(changes)
}
