//! [`Client`]: a [`StorageCollections`] over a TCP connection to a [`crate::Server`], reconnecting after a
//! lost connection (a server restart, a network blip).
//!
//! **What this is.** One connection at a time multiplexing any number of concurrent requests, listens,
//! frontier watches and read holds: a writer task sends requests from an unbounded queue (its callers bound
//! it by awaiting their answers), a reader task routes each answer to its caller by request number. Read
//! holds are frontiers' [`ReadHold`] values kept in a [`HoldSession`]: per collection one hold registered
//! on the server at the meet of the client's holds, moved with `HoldChanges` as they move.
//!
//! **Reconnect.** When the connection is lost, a supervisor task reconnects with exponential backoff (50 ms
//! to 1 s) for up to [`ClientConfig::reconnect_timeout`] (60 s by default), then gives up for good. On a
//! new connection it first re-registers the session's read holds where the client holds are by then (a
//! restarted server keeps every collection at its recovered since for a grace period, see
//! [`crate::core::Store::hold_for_recovery`], so this succeeds unless the client was away longer; a
//! collection whose holds cannot be re-registered is logged and counted as lost, see
//! [`Client::lost_holds`]), and only then serves calls again. While it reconnects:
//! - calls wait for the new connection; a call whose request was in flight when the connection broke fails
//!   with `Disconnected` (its outcome is unknown: an append may or may not have happened);
//! - hold values keep working: their changes are recorded and reach the server with the re-registration;
//! - a listen resumes where it was: the new connection's listen starts at the last `Progress` passed on,
//!   without a snapshot (before the first, at its `as_of`, snapshot included), and skips the updates
//!   already passed on since, so the consumer sees no gap and no duplicate (see `ListenPosition`);
//! - a frontier watch re-opens and reports every collection's current frontiers again (repeating some);
//!   a collection dropped while the client was away is not reported as dropped.
//!
//! **Frames.** Requests and replies go through `transport` with [`ClientConfig::max_frame_bytes`] (the
//! server's must match). A create, an append or a read policy over the limit fails at once with its
//! operation's `TooLarge` error and nothing is sent; every other request has a small fixed size that fits
//! [`MIN_FRAME_BYTES`], the smallest limit a client accepts. A reply over the limit arrives as
//! `ReadError::TooLarge` (the server's stand-in); a request that cannot be written closes the connection,
//! so its callers get `Disconnected` rather than wait.
//!
//! **What this is not.** No retry of a request that was in flight; no failover between servers.
//!
//! **Invariants.** A reply whose caller has gone away is discarded, except a granted read hold, which is
//! released at once (else the server would keep it until the connection closes). A hold granted over a
//! connection that has been replaced is never handed out (the session refuses it; the call retries). After
//! [`Client::close`], or once reconnecting gives up, every pending and later call fails with
//! `Disconnected`, and the server releases the connection's holds. Hold values and listens keep the client
//! alive while they live, like the `Client` itself. Listen and watch pulls are cancellation-safe: an
//! abandoned `next()` leaves its request in flight and the next call picks up its answer.
//!
//! **Tests.** `tests/it/server.rs` (including a server restart under a client with holds and a listen);
//! [`HoldSession`]'s own unit tests.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use frontiers::{Antichain, ChangeBatch, ReadHold, ReadPolicy};
use protocol::frame::{FrameError, encoded_len};
use protocol::{Diff, GlobalId, RelationDesc, Row};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use transport::{FramedRead, FramedWrite};

use crate::api::{
    AppendRequest, BoxFuture, CollectionFrontiers, ListenEvent, StorageCollections, StorageReadHold,
};
use crate::error::{AppendError, CreateError, DropError, HoldError, ReadError};
use crate::listen::{FrontierWatch, Listen};
use crate::session::HoldSession;
use crate::wire::{MAX_FRAME_BYTES, Reply, STORAGE_PROTOCOL_VERSION, StorageRequest, StorageResponse};

/// How long [`Client::connect`] waits for the server's answer to its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first and the longest pause between reconnect attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Why [`Client::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection or the handshake's I/O failed.
    #[error("cannot connect to storage: {0}")]
    Io(#[from] io::Error),
    /// The server refused the handshake or answered something else.
    #[error("storage handshake failed: {0}")]
    Handshake(String),
    /// The configuration cannot work (a frame limit below [`MIN_FRAME_BYTES`]).
    #[error("invalid storage client configuration: {0}")]
    InvalidConfig(String),
}

/// The smallest frame limit a client accepts: every request but a create, an append and a read policy
/// has a small fixed size and always fits it; those three are checked before they are sent.
pub const MIN_FRAME_BYTES: usize = 4 << 10;

/// Why a call did not get its reply.
#[derive(Debug)]
enum CallError {
    /// The client is closed, or the connection broke with the request in flight.
    Disconnected,
    /// The request does not fit a frame; it was not sent.
    TooLarge { bytes: u64, max_bytes: u64 },
}

/// How a [`Client`] deals with a lost connection.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long to keep trying to reconnect after the connection is lost before giving up for good
    /// (every call then fails with `Disconnected`). Zero: do not reconnect. Default 60 s.
    pub reconnect_timeout: Duration,
    /// The largest frame sent or accepted; the server's must be the same (`Server::with_max_frame_bytes`).
    /// At least [`MIN_FRAME_BYTES`]. Default [`MAX_FRAME_BYTES`].
    pub max_frame_bytes: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig { reconnect_timeout: Duration::from_secs(60), max_frame_bytes: MAX_FRAME_BYTES }
    }
}

/// A caller waiting for a reply.
struct Waiter {
    tx: oneshot::Sender<Reply>,
    /// For a hold acquisition, the collection, so an abandoned grant can be released.
    hold: Option<GlobalId>,
}

/// One TCP connection: what its tasks and the callers share.
struct Conn {
    out: mpsc::UnboundedSender<StorageRequest>,
    max_frame_bytes: usize,
    /// Callers waiting for a reply; `None` once the connection is gone.
    pending: Mutex<Option<HashMap<u64, Waiter>>>,
    next_request: AtomicU64,
    /// The [`HoldSession`] generation whose holds this connection registers.
    generation: u64,
    tasks: Mutex<Vec<AbortHandle>>,
    /// Where the connection reports its `generation` when it closes (the client's supervisor).
    ended: mpsc::UnboundedSender<u64>,
}

impl Conn {
    /// Closes the connection, however it was lost: fails every waiting caller with `Disconnected`, stops
    /// the reader and writer, and reports the loss to the supervisor, once.
    fn close(&self) {
        // Dropping the senders wakes every waiting caller with `Disconnected`.
        if self.pending.lock().expect("pending lock").take().is_some() {
            let _ = self.ended.send(self.generation);
        }
        // Last: this may abort the task that is running it (the reader), which then stops at its next
        // await.
        for task in self.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
    }

    fn is_open(&self) -> bool {
        self.pending.lock().expect("pending lock").is_some()
    }

    fn register(&self, hold: Option<GlobalId>) -> Option<(u64, oneshot::Receiver<Reply>)> {
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut pending = self.pending.lock().expect("pending lock");
        pending.as_mut()?.insert(request, Waiter { tx, hold });
        Some((request, rx))
    }

    /// Whether `message` fits a frame; if not, forgets its waiter (`request`), since it is not sent.
    fn check_size(&self, request: u64, message: &StorageRequest) -> Result<(), CallError> {
        let bytes = encoded_len(message);
        if bytes <= self.max_frame_bytes as u64 {
            return Ok(());
        }
        if let Some(pending) = self.pending.lock().expect("pending lock").as_mut() {
            pending.remove(&request);
        }
        Err(CallError::TooLarge { bytes, max_bytes: self.max_frame_bytes as u64 })
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
        let message = make(request);
        let fits = self.check_size(request, &message);
        assert!(fits.is_ok(), "a {message:?} does not fit the smallest frame limit");
        if self.out.send(message).is_err() {
            self.close();
            return None;
        }
        Some(rx)
    }

    /// Acquires a hold at `frontier` on `id`: the granted frontier, as a hold registered on this
    /// connection.
    async fn acquire(&self, id: GlobalId, frontier: Antichain<u64>) -> Result<StorageReadHold, HoldError> {
        let rx =
            self.start_with(Some(id), |request| StorageRequest::AcquireReadHold { request, id, frontier });
        let reply = match rx {
            Some(rx) => rx.await.ok(),
            None => None,
        };
        match reply {
            Some(Reply::HoldAcquired(Ok(frontier))) => {
                Ok(ReadHold::new(id, frontier, hold_tx(self.out.clone())))
            }
            Some(Reply::HoldAcquired(Err(error))) => Err(error),
            _ => Err(HoldError::Disconnected),
        }
    }
}

/// The state of a client's link to the server.
#[derive(Clone)]
enum Link {
    Up(Arc<Conn>),
    /// Lost; the supervisor is reconnecting.
    Down,
    /// Closed by the owner, or reconnecting gave up: final.
    Closed,
}

struct ClientHandle {
    peer: SocketAddr,
    link: watch::Sender<Link>,
    session: HoldSession,
    /// Listen and watch numbers, fresh across every connection of this client.
    next_stream: AtomicU64,
    closed: AtomicBool,
    supervisor: Mutex<Option<AbortHandle>>,
}

impl ClientHandle {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        if let Some(supervisor) = self.supervisor.lock().expect("supervisor lock").take() {
            supervisor.abort();
        }
        let previous = self.link.send_replace(Link::Closed);
        if let Link::Up(conn) = previous {
            conn.close();
        }
    }

    /// The open connection, waiting while the client reconnects; `None` once the client is closed.
    async fn current(&self) -> Option<Arc<Conn>> {
        let mut rx = self.link.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                Link::Up(conn) if conn.is_open() => return Some(Arc::clone(conn)),
                Link::Closed => return None,
                // Down, or Up with a connection that just closed: its close told the supervisor, which
                // changes the link.
                _ => {}
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Sends the request `make` builds over the current connection (waiting for one) and awaits its reply;
    /// `Disconnected` if the client is closed or the connection broke with the request in flight,
    /// `TooLarge` (and nothing sent) if the request does not fit a frame.
    async fn call(&self, make: impl FnOnce(u64) -> StorageRequest) -> Result<Reply, CallError> {
        loop {
            let conn = self.current().await.ok_or(CallError::Disconnected)?;
            // Registering fails only if the connection broke since `current`: nothing was sent; try the
            // next one.
            let Some((request, rx)) = conn.register(None) else { continue };
            let message = make(request);
            conn.check_size(request, &message)?;
            if conn.out.send(message).is_err() {
                conn.close();
                return Err(CallError::Disconnected);
            }
            return rx.await.map_err(|_| CallError::Disconnected);
        }
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        self.close();
    }
}

/// A connection to a storage server that reconnects. Cloning shares it. See the module documentation.
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
    /// Connects to the server at `addr` and performs the handshake, with the default [`ClientConfig`].
    pub async fn connect(addr: impl tokio::net::ToSocketAddrs) -> Result<Client, ConnectError> {
        Self::connect_with(addr, ClientConfig::default()).await
    }

    /// Connects to the server at `addr` and performs the handshake. Later reconnects go to the address
    /// this first connection reached.
    pub async fn connect_with(
        addr: impl tokio::net::ToSocketAddrs,
        config: ClientConfig,
    ) -> Result<Client, ConnectError> {
        if config.max_frame_bytes < MIN_FRAME_BYTES {
            return Err(ConnectError::InvalidConfig(format!(
                "a frame limit of {} bytes is below the minimum of {MIN_FRAME_BYTES}",
                config.max_frame_bytes
            )));
        }
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let (conn, peer) = open(addr, 0, config.max_frame_bytes, ended_tx.clone()).await?;
        let handle = Arc::new(ClientHandle {
            peer,
            link: watch::Sender::new(Link::Up(conn)),
            session: HoldSession::new(),
            next_stream: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            supervisor: Mutex::new(None),
        });
        let supervisor =
            tokio::spawn(supervise(Arc::downgrade(&handle), peer, config, ended_tx, ended_rx)).abort_handle();
        *handle.supervisor.lock().expect("supervisor lock") = Some(supervisor);
        Ok(Client { handle })
    }

    /// Closes the client now: pending and later calls fail with `Disconnected`, listens end with it, it
    /// does not reconnect, and the server releases every hold it had (hold values here then hold nothing).
    pub fn close(&self) {
        self.handle.close();
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.handle.peer
    }

    /// Whether a connection is up now (false while reconnecting and once closed).
    pub fn is_connected(&self) -> bool {
        matches!(&*self.handle.link.borrow(), Link::Up(conn) if conn.is_open())
    }

    /// How many collections' read holds could not be re-registered after a reconnect, in total (the
    /// server had compacted past them; those hold values hold nothing).
    pub fn lost_holds(&self) -> u64 {
        self.handle.session.lost()
    }

    async fn call(&self, make: impl FnOnce(u64) -> StorageRequest) -> Result<Reply, CallError> {
        self.handle.call(make).await
    }
}

/// Opens one connection: TCP, the handshake, the reader and writer tasks. The connection reports its
/// `generation` on `ended` when it closes ([`Conn::close`]).
async fn open(
    addr: impl tokio::net::ToSocketAddrs,
    generation: u64,
    max_frame_bytes: usize,
    ended: mpsc::UnboundedSender<u64>,
) -> Result<(Arc<Conn>, SocketAddr), ConnectError> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr()?;
    let (read_half, write_half) = stream.into_split();
    let mut input = FramedRead::new(read_half, max_frame_bytes);
    let mut output = FramedWrite::new(write_half, max_frame_bytes);
    let hello = StorageRequest::Hello { version: STORAGE_PROTOCOL_VERSION };
    output.send(&hello).await.map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let answer = match tokio::time::timeout(HANDSHAKE_TIMEOUT, input.recv::<StorageResponse>()).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(FrameError::Closed)) => {
            return Err(ConnectError::Handshake("the server closed the connection".into()));
        }
        Ok(Err(FrameError::Io(error))) => return Err(ConnectError::Io(error)),
        Ok(Err(error)) => return Err(ConnectError::Handshake(error.to_string())),
        Err(_) => return Err(ConnectError::Handshake("the server did not answer the handshake".into())),
    };
    match answer {
        StorageResponse::Hello { version } if version == STORAGE_PROTOCOL_VERSION => {}
        StorageResponse::HelloRefused { version, reason } => {
            return Err(ConnectError::Handshake(format!("refused by server version {version}: {reason}")));
        }
        other => return Err(ConnectError::Handshake(format!("unexpected answer {other:?}"))),
    }
    // Unbounded: its callers bound it by awaiting their answers (see the module documentation).
    let (out, out_rx) = mpsc::unbounded_channel();
    let conn = Arc::new(Conn {
        out,
        max_frame_bytes,
        pending: Mutex::new(Some(HashMap::new())),
        next_request: AtomicU64::new(0),
        generation,
        tasks: Mutex::new(Vec::new()),
        ended,
    });
    let writer = tokio::spawn(write_loop(output, out_rx, Arc::downgrade(&conn))).abort_handle();
    let reader = tokio::spawn(read_loop(input, Arc::downgrade(&conn), generation)).abort_handle();
    conn.tasks.lock().expect("tasks lock").extend([writer, reader]);
    Ok((conn, peer))
}

/// Watches the connection and replaces it when it is lost (see the module documentation). Holds the
/// client only weakly, so dropping the last `Client` ends it.
async fn supervise(
    client: Weak<ClientHandle>,
    addr: SocketAddr,
    config: ClientConfig,
    ended_tx: mpsc::UnboundedSender<u64>,
    mut ended: mpsc::UnboundedReceiver<u64>,
) {
    let mut current = 0;
    while let Some(generation) = ended.recv().await {
        if generation != current {
            continue; // A connection replaced already.
        }
        let Some(handle) = client.upgrade() else { return };
        if handle.closed.load(Ordering::SeqCst) {
            return;
        }
        handle.link.send_replace(Link::Down);
        drop(handle);
        tracing::warn!(%addr, "storage connection lost; reconnecting");
        let started = tokio::time::Instant::now();
        let mut backoff = BACKOFF_MIN;
        loop {
            let Some(handle) = client.upgrade() else { return };
            let generation = handle.session.disconnect();
            drop(handle);
            match open(addr, generation, config.max_frame_bytes, ended_tx.clone()).await {
                Ok((conn, _)) => {
                    let Some(handle) = client.upgrade() else { return };
                    if restore_holds(&handle.session, &conn).await {
                        current = generation;
                        handle.link.send_replace(Link::Up(conn));
                        tracing::info!(
                            %addr,
                            generation,
                            lost_holds = handle.session.lost(),
                            "storage connection re-established"
                        );
                        break;
                    }
                    conn.close();
                }
                Err(error) => tracing::debug!(%addr, %error, "storage reconnect attempt failed"),
            }
            if started.elapsed() >= config.reconnect_timeout {
                tracing::error!(%addr, "storage unreachable; giving up reconnecting: every call now fails");
                if let Some(handle) = client.upgrade() {
                    handle.close();
                }
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Re-registers the session's holds over `conn`; false if `conn` broke meanwhile.
async fn restore_holds(session: &HoldSession, conn: &Conn) -> bool {
    for (id, frontier) in session.to_restore() {
        match conn.acquire(id, frontier).await {
            Ok(upstream) => session.restore(upstream, conn.generation),
            Err(HoldError::Disconnected) => return false,
            Err(error) => session.lose(id, &error),
        }
    }
    true
}

/// Writes the queued requests, coalescing what is queued into one write. A request that cannot be encoded
/// (callers check the variable-sized ones before they queue them) or a failed write closes the connection,
/// so that every caller waiting on it gets `Disconnected` rather than wait.
async fn write_loop(
    mut output: FramedWrite<OwnedWriteHalf>,
    mut rx: mpsc::UnboundedReceiver<StorageRequest>,
    conn: Weak<Conn>,
) {
    let failure = 'write: loop {
        let Some(message) = rx.recv().await else { return };
        let mut next = Some(message);
        while let Some(message) = next.take() {
            if let Err(error) = output.encode(&message) {
                tracing::error!(%error, "cannot encode a storage request; closing the connection");
                break 'write error.to_string();
            }
            if !output.batch_full() {
                next = rx.try_recv().ok();
            }
        }
        if let Err(error) = output.flush().await {
            tracing::debug!(%error, "storage connection write failed");
            break error.to_string();
        }
    };
    tracing::info!(reason = %failure, "storage connection lost");
    if let Some(conn) = conn.upgrade() {
        conn.close();
    }
}

async fn read_loop(mut input: FramedRead<OwnedReadHalf>, conn: Weak<Conn>, generation: u64) {
    let end = loop {
        match input.recv::<StorageResponse>().await {
            Ok(StorageResponse::Reply { request, reply }) => {
                let Some(conn) = conn.upgrade() else { break "closed".to_string() };
                deliver(&conn, request, reply);
            }
            Ok(other) => break format!("unexpected message {other:?}"),
            Err(FrameError::Closed) => break "the server closed the connection".to_string(),
            Err(error) => break error.to_string(),
        }
    };
    tracing::info!(reason = %end, generation, "storage connection lost");
    // Gone only once nothing uses the connection any more (the link moved on): nobody to tell then.
    if let Some(conn) = conn.upgrade() {
        conn.close();
    }
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

/// The change callback of a hold registered on the connection whose queue is `out`.
fn hold_tx(out: mpsc::UnboundedSender<StorageRequest>) -> frontiers::ChangeTx<GlobalId, u64> {
    Arc::new(move |id: &GlobalId, changes: ChangeBatch<u64>| {
        let changes: Vec<(u64, i64)> = changes.into_inner().into_iter().collect();
        if !changes.is_empty() {
            // A closed connection's holds are released by the server; nothing to send then.
            let _ = out.send(StorageRequest::HoldChanges { id: *id, changes });
        }
    })
}

/// What the server answers to a pull: the next events, or the error that ends the stream.
type PullResult<E> = Result<Vec<E>, ReadError>;

/// The pull loop a remote listen and a remote frontier watch share, on one connection: when its buffer is
/// empty it asks the server for the stream's next events (one request in flight at most), and it ends at
/// the first error (`Disconnected` when the connection is lost; the owner may re-open on the next one).
struct RemotePull<E> {
    conn: Arc<Conn>,
    /// The stream's number.
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
        conn: Arc<Conn>,
        stream: u64,
        next_request: fn(u64, u64) -> StorageRequest,
        events: fn(Reply) -> Result<PullResult<E>, Reply>,
        drop_request: fn(u64) -> StorageRequest,
    ) -> Self {
        RemotePull {
            conn,
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
                self.inflight = self.conn.start(|request| next_request(request, stream));
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

    fn try_next(&mut self) -> Option<E> {
        self.buffer.pop_front()
    }
}

impl<E> Drop for RemotePull<E> {
    fn drop(&mut self) {
        let _ = self.conn.out.send((self.drop_request)(self.stream));
    }
}

/// How to open a pulled stream and pull from it (a listen or a watch).
struct StreamKind<E> {
    /// Whether a reply answers the opening request (and how), or the reply back if it is of another kind.
    opened: fn(Reply) -> Result<Result<(), ReadError>, Reply>,
    next_request: fn(u64, u64) -> StorageRequest,
    events: fn(Reply) -> Result<PullResult<E>, Reply>,
    drop_request: fn(u64) -> StorageRequest,
}

/// Opens a stream over the current connection with the request `open` makes (given the request and the
/// fresh stream number), waiting for a connection and trying the next one if it is lost meanwhile.
async fn open_pull<E>(
    handle: &ClientHandle,
    open: impl Fn(u64, u64) -> StorageRequest,
    kind: StreamKind<E>,
) -> Result<RemotePull<E>, ReadError> {
    loop {
        let conn = handle.current().await.ok_or(ReadError::Disconnected)?;
        let stream = handle.next_stream.fetch_add(1, Ordering::Relaxed);
        let Some(rx) = conn.start(|request| open(request, stream)) else { continue };
        // Lost with the request in flight: opening has no effect worth keeping; try the next one.
        let Ok(reply) = rx.await else { continue };
        return match (kind.opened)(reply) {
            Ok(Ok(())) => {
                Ok(RemotePull::new(conn, stream, kind.next_request, kind.events, kind.drop_request))
            }
            Ok(Err(error)) => Err(error),
            Err(other) => Err(ReadError::Protocol(format!("unexpected reply {other:?}"))),
        };
    }
}

/// Opens a listen on `id` over the current connection: at `as_of` with a snapshot, or resumed there.
async fn open_listen(
    handle: &ClientHandle,
    id: GlobalId,
    as_of: u64,
    resume: bool,
) -> Result<RemotePull<ListenEvent>, ReadError> {
    let open = |request, listen| StorageRequest::Listen { request, listen, id, as_of, resume };
    let kind = StreamKind {
        opened: |reply| match reply {
            Reply::Listening(result) => Ok(result),
            other => Err(other),
        },
        next_request: |request, listen| StorageRequest::ListenNext { request, listen },
        events: |reply| match reply {
            Reply::ListenEvents(result) => Ok(result),
            other => Err(other),
        },
        drop_request: |listen| StorageRequest::ListenDrop { listen },
    };
    open_pull(handle, open, kind).await
}

/// Opens a frontier watch over the current connection.
async fn open_watch(
    handle: &ClientHandle,
) -> Result<RemotePull<(GlobalId, Option<CollectionFrontiers>)>, ReadError> {
    let kind = StreamKind {
        opened: |reply| match reply {
            Reply::Watching(result) => Ok(result),
            other => Err(other),
        },
        next_request: |request, watch| StorageRequest::WatchNext { request, watch },
        events: |reply| match reply {
            Reply::WatchEvents(result) => Ok(result),
            other => Err(other),
        },
        drop_request: |watch| StorageRequest::WatchDrop { watch },
    };
    open_pull(handle, |request, watch| StorageRequest::WatchFrontiers { request, watch }, kind).await
}

/// A listen over the network that survives reconnects (see the module documentation and
/// [`ListenPosition`]).
pub(crate) struct RemoteListen {
    handle: Arc<ClientHandle>,
    id: GlobalId,
    as_of: u64,
    pull: RemotePull<ListenEvent>,
    position: ListenPosition,
}

/// What a remote listen has passed on, so that it can resume exactly after a reconnect.
///
/// Events pass straight through. After a reconnect the listen re-opens at the last `Progress` passed on
/// (resumed, no snapshot) or, before the first, at its `as_of` (snapshot included), and skips what it had
/// already passed on since: the server's events for the same range are the same updates in the same order
/// (the snapshot consolidated and sorted by row, then each time's updates consolidated and sorted by
/// row; every update passed on was durable, so the restarted server has it), so the first updates of the
/// re-opened stream are exactly those.
#[derive(Debug, Default)]
struct ListenPosition {
    /// The last `Progress` passed on; `None` before the first (the snapshot is not complete yet).
    progress: Option<Antichain<u64>>,
    /// Updates and events passed on since `progress`.
    updates_since_progress: usize,
    events_since_progress: usize,
    /// After a reconnect: updates of the re-opened stream still to skip (passed on before), and whether
    /// its first empty `Updates` (an empty snapshot, already passed on) is to be skipped.
    skip_updates: usize,
    skip_empty: bool,
}

impl ListenPosition {
    /// The event to pass on for `event` from the server, if any.
    fn pass(&mut self, id: GlobalId, event: ListenEvent) -> Option<ListenEvent> {
        match event {
            ListenEvent::Progress(frontier) => {
                if self.skip_updates > 0 {
                    tracing::error!(
                        %id,
                        missing = self.skip_updates,
                        "a resumed listen ended its range with fewer updates than were passed on before"
                    );
                }
                *self = ListenPosition { progress: Some(frontier.clone()), ..ListenPosition::default() };
                Some(ListenEvent::Progress(frontier))
            }
            ListenEvent::Updates(mut updates) => {
                if self.skip_updates > 0 {
                    let skipped = self.skip_updates.min(updates.len());
                    updates.drain(..skipped);
                    self.skip_updates -= skipped;
                    if updates.is_empty() {
                        return None;
                    }
                } else if updates.is_empty() && self.skip_empty {
                    self.skip_empty = false;
                    return None;
                }
                self.skip_empty = false;
                self.updates_since_progress += updates.len();
                self.events_since_progress += 1;
                Some(ListenEvent::Updates(updates))
            }
        }
    }

    /// Where to re-open a listen that started at `as_of` after a lost connection: `(time, resume)`, or
    /// `None` if it had passed on its last event (an empty `Progress`). Prepares the skipping.
    fn reopen(&mut self, as_of: u64) -> Option<(u64, bool)> {
        let at = match &self.progress {
            None => (as_of, false),
            Some(frontier) => (*frontier.as_option()?, true),
        };
        self.skip_updates = self.updates_since_progress;
        self.skip_empty = self.events_since_progress > 0;
        Some(at)
    }
}

impl RemoteListen {
    pub(crate) fn id(&self) -> GlobalId {
        self.id
    }

    pub(crate) fn as_of(&self) -> u64 {
        self.as_of
    }

    pub(crate) async fn next(&mut self) -> Result<ListenEvent, ReadError> {
        loop {
            match self.pull.next().await {
                Ok(event) => {
                    if let Some(event) = self.position.pass(self.id, event) {
                        return Ok(event);
                    }
                }
                Err(ReadError::Disconnected) if !self.handle.closed.load(Ordering::SeqCst) => {
                    // Complete: nothing follows an empty frontier.
                    let (at, resume) = self.position.reopen(self.as_of).ok_or(ReadError::Disconnected)?;
                    tracing::debug!(id = %self.id, at, resume, "resuming a storage listen");
                    self.pull = open_listen(&self.handle, self.id, at, resume).await?;
                }
                Err(error) => return Err(error),
            }
        }
    }

    pub(crate) fn try_next(&mut self) -> Option<Result<ListenEvent, ReadError>> {
        loop {
            let event = self.pull.try_next()?;
            if let Some(event) = self.position.pass(self.id, event) {
                return Some(Ok(event));
            }
        }
    }
}

/// A frontier watch over the network that re-opens after a reconnect.
pub(crate) struct RemoteWatch {
    handle: Arc<ClientHandle>,
    pull: RemotePull<(GlobalId, Option<CollectionFrontiers>)>,
}

impl RemoteWatch {
    pub(crate) async fn next(&mut self) -> Result<(GlobalId, Option<CollectionFrontiers>), ReadError> {
        loop {
            match self.pull.next().await {
                Err(ReadError::Disconnected) if !self.handle.closed.load(Ordering::SeqCst) => {
                    self.pull = open_watch(&self.handle).await?;
                }
                result => return result,
            }
        }
    }

    pub(crate) fn try_next(&mut self) -> Option<Result<(GlobalId, Option<CollectionFrontiers>), ReadError>> {
        self.pull.try_next().map(Ok)
    }
}

/// The error of a read whose call failed or got a reply of another kind.
fn read_error(call: Result<Reply, CallError>) -> ReadError {
    match call {
        Ok(other) => ReadError::Protocol(format!("unexpected reply {other:?}")),
        Err(CallError::Disconnected) => ReadError::Disconnected,
        Err(CallError::TooLarge { .. }) => unreachable!("a read request fits the smallest frame"),
    }
}

impl StorageCollections for Client {
    fn create_collection(&self, id: GlobalId, desc: RelationDesc) -> BoxFuture<'_, Result<(), CreateError>> {
        Box::pin(async move {
            match self.call(|request| StorageRequest::CreateCollection { request, id, desc }).await {
                Ok(Reply::Created(result)) => result,
                Err(CallError::TooLarge { bytes, max_bytes }) => {
                    Err(CreateError::TooLarge { bytes, max_bytes })
                }
                Ok(_) | Err(CallError::Disconnected) => Err(CreateError::Disconnected),
            }
        })
    }

    fn drop_collection(&self, id: GlobalId) -> BoxFuture<'_, Result<(), DropError>> {
        Box::pin(async move {
            match self.call(|request| StorageRequest::DropCollection { request, id }).await {
                Ok(Reply::Dropped(result)) => result,
                Err(CallError::TooLarge { .. }) => unreachable!("a drop request fits the smallest frame"),
                Ok(_) | Err(CallError::Disconnected) => Err(DropError::Disconnected),
            }
        })
    }

    fn list_collections(&self) -> BoxFuture<'_, Result<Vec<(GlobalId, RelationDesc)>, ReadError>> {
        Box::pin(async move {
            match self.call(|request| StorageRequest::ListCollections { request }).await {
                Ok(Reply::Collections(result)) => result,
                other => Err(read_error(other)),
            }
        })
    }

    fn frontiers(&self, id: GlobalId) -> BoxFuture<'_, Result<CollectionFrontiers, ReadError>> {
        Box::pin(async move {
            match self.call(|request| StorageRequest::Frontiers { request, id }).await {
                Ok(Reply::Frontiers(result)) => result,
                other => Err(read_error(other)),
            }
        })
    }

    fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'_, Result<(), AppendError>> {
        Box::pin(async move {
            match self.call(|request| StorageRequest::Append { request, requests }).await {
                Ok(Reply::Appended(result)) => result,
                Err(CallError::TooLarge { bytes, max_bytes }) => {
                    Err(AppendError::TooLarge { bytes, max_bytes })
                }
                Ok(_) | Err(CallError::Disconnected) => Err(AppendError::Disconnected),
            }
        })
    }

    fn acquire_read_hold(
        &self,
        id: GlobalId,
        frontier: Antichain<u64>,
    ) -> BoxFuture<'_, Result<StorageReadHold, HoldError>> {
        Box::pin(async move {
            loop {
                let conn = self.handle.current().await.ok_or(HoldError::Disconnected)?;
                let upstream = match conn.acquire(id, frontier.clone()).await {
                    Ok(upstream) => upstream,
                    // Lost with the request in flight: the server released whatever it granted.
                    Err(HoldError::Disconnected) if !self.handle.closed.load(Ordering::SeqCst) => continue,
                    Err(error) => return Err(error),
                };
                let keepalive: Arc<dyn std::any::Any + Send + Sync> = Arc::clone(&self.handle) as _;
                match self.handle.session.wrap(upstream, conn.generation, Some(keepalive)) {
                    // Granted over a connection replaced meanwhile: ask the new one.
                    Err(HoldError::Disconnected) => continue,
                    result => return result,
                }
            }
        })
    }

    fn set_read_policy(&self, id: GlobalId, policy: ReadPolicy<u64>) -> BoxFuture<'_, Result<(), HoldError>> {
        Box::pin(async move {
            match self.call(|request| StorageRequest::SetReadPolicy { request, id, policy }).await {
                Ok(Reply::PolicySet(result)) => result,
                Err(CallError::TooLarge { bytes, max_bytes }) => {
                    Err(HoldError::TooLarge { bytes, max_bytes })
                }
                Ok(_) | Err(CallError::Disconnected) => Err(HoldError::Disconnected),
            }
        })
    }

    fn snapshot(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Vec<(Row, Diff)>, ReadError>> {
        Box::pin(async move {
            match self.call(|request| StorageRequest::Snapshot { request, id, as_of }).await {
                Ok(Reply::Snapshot(result)) => result,
                other => Err(read_error(other)),
            }
        })
    }

    fn listen(&self, id: GlobalId, as_of: u64) -> BoxFuture<'_, Result<Listen, ReadError>> {
        Box::pin(async move {
            let pull = open_listen(&self.handle, id, as_of, false).await?;
            Ok(Listen::remote(RemoteListen {
                handle: Arc::clone(&self.handle),
                id,
                as_of,
                pull,
                position: ListenPosition::default(),
            }))
        })
    }

    fn watch_frontiers(&self) -> BoxFuture<'_, Result<FrontierWatch, ReadError>> {
        Box::pin(async move {
            let pull = open_watch(&self.handle).await?;
            Ok(FrontierWatch::remote(RemoteWatch { handle: Arc::clone(&self.handle), pull }))
        })
    }
}

#[cfg(test)]
mod tests {
    use protocol::{Datum, Row};

    use super::*;

    fn updates(range: std::ops::Range<i64>, time: u64) -> ListenEvent {
        ListenEvent::Updates(range.map(|x| (Row::pack([Datum::Int64(x)]), time, 1)).collect())
    }

    fn progress(t: u64) -> ListenEvent {
        ListenEvent::Progress(Antichain::from_elem(t))
    }

    /// Passes `first` until `cut` events, then reconnects and passes `second` (the re-opened stream).
    fn cut_and_resume(
        first: Vec<ListenEvent>,
        cut: usize,
        second: Vec<ListenEvent>,
    ) -> (Vec<ListenEvent>, Option<(u64, bool)>) {
        let id = GlobalId::User(1);
        let mut position = ListenPosition::default();
        let mut out: Vec<ListenEvent> =
            first.into_iter().take(cut).filter_map(|e| position.pass(id, e)).collect();
        let at = position.reopen(5);
        out.extend(second.into_iter().filter_map(|e| position.pass(id, e)));
        (out, at)
    }

    fn all_updates(events: &[ListenEvent]) -> Vec<(Row, u64, i64)> {
        events
            .iter()
            .flat_map(|e| match e {
                ListenEvent::Updates(u) => u.clone(),
                ListenEvent::Progress(_) => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn a_listen_cut_inside_a_range_resumes_without_a_gap_or_a_duplicate() {
        // Before the cut: the snapshot at 5 in two chunks, its progress, then part of the next range.
        let before =
            vec![updates(0..3, 5), updates(3..5, 5), progress(6), updates(10..12, 6), updates(12..14, 7)];
        let uncut = [before.clone(), vec![progress(8)]].concat();
        for cut in 0..before.len() {
            // The re-opened stream, from the last progress passed on: the same updates, chunked otherwise.
            let second = if cut < 3 {
                vec![updates(0..5, 5), progress(6), updates(10..12, 6), updates(12..14, 7), progress(8)]
            } else {
                vec![updates(10..11, 6), updates(11..12, 6), updates(12..14, 7), progress(8)]
            };
            let (out, at) = cut_and_resume(before.clone(), cut, second);
            assert_eq!(at, Some(if cut < 3 { (5, false) } else { (6, true) }), "cut after {cut} events");
            assert_eq!(all_updates(&out), all_updates(&uncut), "cut after {cut} events");
            assert_eq!(out.last(), Some(&progress(8)));
        }
    }

    #[test]
    fn an_empty_snapshot_is_passed_on_once_across_a_reconnect() {
        let (out, at) = cut_and_resume(vec![updates(0..0, 5)], 1, vec![updates(0..0, 5), progress(6)]);
        assert_eq!(at, Some((5, false)));
        assert_eq!(out, vec![updates(0..0, 5), progress(6)]);
    }

    #[test]
    fn a_complete_listen_does_not_reopen() {
        let id = GlobalId::User(1);
        let mut position = ListenPosition::default();
        assert!(position.pass(id, updates(0..0, 5)).is_some());
        assert!(position.pass(id, ListenEvent::Progress(Antichain::new())).is_some());
        assert_eq!(position.reopen(5), None);
    }
}
