//! [`ReplicaClient`]: the tokio shell around a [`ReplicaCore`].
//!
//! One task per replica drives the core. It turns the core's outputs into I/O (TCP connections to every
//! process, one writer and one reader task per process) and I/O back into core inputs; it reads the clock
//! and draws the backoff jitter, which the core itself never does. Everything the owner needs comes out of
//! the `events` channel as [`ReplicaEvent`]s tagged with the replica id.
//!
//! **Commands the history refuses.** [`ReplicaClient::send`] hands a command to the core on the
//! caller's thread (the core sits behind a mutex the task shares, held only for the core's own
//! synchronous calls), so a command the [`CommandHistory`] refuses (a duplicate peek id, an export that
//! exists, an unknown collection, a compaction that moves back) comes back as
//! [`SendError::Rejected`] before anything is recorded or sent; the task is then woken to carry out
//! what the core asked for.
//!
//! Frames go through `transport` ([`FramedRead`], [`FramedWrite`]) with the configured frame limit. A
//! command is encoded once per send and written to every process.
//!
//! **Commands over the frame limit.** [`ReplicaClient::send`] refuses a command that does not fit a frame
//! with [`COMMAND_HEADROOM_BYTES`] to spare ([`check_command_size`]), before the history records it: the
//! caller gets [`SendError::TooLarge`] and nothing reaches the replica (the controller refuses such
//! commands at its API with the same check). The headroom covers what compaction can add to a recorded
//! command before a replay (a later as-of or compaction frontier is a few more varint bytes), so a command
//! the client accepted always fits; encoding one that does not is a broken invariant and panics.
//!
//! **Boundary:** no protocol logic lives here; a bug in what is sent or merged is a bug in the core.
//! **Tests:** `tests/it/sockets.rs` runs it against fake replica processes over real sockets (restart,
//! version mismatch, garbage, a command over the frame limit).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span, warn};
use transport::{Frame, FramedRead, FramedWrite};

use frontiers::Timestamp;
use protocol::frame::{DEFAULT_MAX_FRAME_BYTES, FrameError, encoded_len};
use protocol::{ComputeCommand, ComputeResponse, ReplicaId};

use crate::core::{ReplicaCore, ReplicaCoreConfig, ReplicaOutput, ReplicaStatus};
use crate::history::{CommandHistory, HistoryError};

/// How to reach a replica.
#[derive(Debug, Clone)]
pub struct ReplicaClientConfig {
    /// The core's configuration (id, process count, backoff, hydration limit).
    pub core: ReplicaCoreConfig,
    /// One address per process, in process order.
    pub addresses: Vec<String>,
    /// How long a connection attempt to all processes may take, in milliseconds.
    pub connect_timeout_ms: u64,
    /// The largest frame accepted from or sent to the replica.
    pub max_frame_bytes: usize,
}

impl ReplicaClientConfig {
    /// A configuration with default backoff, timeouts and frame limit.
    pub fn new(replica_id: ReplicaId, addresses: Vec<String>) -> Self {
        ReplicaClientConfig {
            core: ReplicaCoreConfig {
                replica_id,
                processes: addresses.len().max(1),
                backoff: crate::Backoff::default(),
                hydration_concurrency: None,
            },
            addresses,
            connect_timeout_ms: 5_000,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// What a replica client tells its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicaEvent<T: Timestamp> {
    /// A merged response.
    Response(ComputeResponse<T>),
    /// A status change.
    Status(ReplicaStatus),
}

/// The owner dropped the client or its task ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replica client {0} is gone")]
pub struct ClientGone(pub ReplicaId);

/// How many bytes below the frame limit a command must stay to be accepted (see the module documentation).
pub const COMMAND_HEADROOM_BYTES: usize = 64;

/// A command too large to send: its encoded size with [`COMMAND_HEADROOM_BYTES`] is over the frame limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {command} command of {len} bytes does not fit the frame limit of {max} bytes ({headroom} bytes kept spare)", headroom = COMMAND_HEADROOM_BYTES)]
pub struct CommandTooLarge {
    /// The command's name.
    pub command: &'static str,
    /// Its encoded size.
    pub len: u64,
    /// The frame limit.
    pub max: usize,
}

/// Whether `command` fits a frame of `max_frame_bytes` with [`COMMAND_HEADROOM_BYTES`] to spare: the rule
/// [`ReplicaClient::send`] applies, for callers that refuse commands before deciding to send them.
///
/// # Examples
/// ```
/// use protocol::{ComputeCommand, GlobalId};
/// use replica_client::check_command_size;
/// let command: ComputeCommand<u64> = ComputeCommand::Schedule(GlobalId::User(1));
/// assert!(check_command_size(&command, 1 << 20).is_ok());
/// assert!(check_command_size(&command, 8).is_err());
/// ```
pub fn check_command_size<T: Timestamp>(
    command: &ComputeCommand<T>,
    max_frame_bytes: usize,
) -> Result<(), CommandTooLarge> {
    let len = encoded_len(command);
    if len.saturating_add(COMMAND_HEADROOM_BYTES as u64) > max_frame_bytes as u64 {
        return Err(CommandTooLarge { command: command.name(), len, max: max_frame_bytes });
    }
    Ok(())
}

/// Why [`ReplicaClient::send`] refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The client's task is gone.
    #[error(transparent)]
    Gone(#[from] ClientGone),
    /// The command does not fit a frame; nothing was recorded or sent.
    #[error(transparent)]
    TooLarge(#[from] CommandTooLarge),
    /// The command history refuses the command (it contradicts what was sent before: a bug in the
    /// sender); nothing was recorded or sent.
    #[error("the replica's command history refuses it: {0}")]
    Rejected(#[from] HistoryError),
}

/// The core, shared by the handle (which hands it commands) and the task (which drives it).
type SharedCore<T> = Arc<Mutex<ReplicaCore<T>>>;

/// Locks the core. A panic inside the core (a broken invariant) ends the task, so a poisoned lock is
/// only ever seen by a handle whose task is gone; it reports that rather than panic the owner.
fn lock<T: Timestamp>(core: &Mutex<ReplicaCore<T>>) -> MutexGuard<'_, ReplicaCore<T>> {
    core.lock().unwrap_or_else(PoisonError::into_inner)
}

enum Input<T: Timestamp> {
    Disconnect(String),
    Connected { epoch: u64, streams: Vec<TcpStream> },
    ConnectFailed { epoch: u64, reason: String },
    Received { epoch: u64, process: usize, result: Result<ComputeResponse<T>, String> },
}

/// A handle to one replica's client task.
#[derive(Debug)]
pub struct ReplicaClient<T: Timestamp> {
    replica_id: ReplicaId,
    max_frame_bytes: usize,
    core: SharedCore<T>,
    /// Wakes the task when `send` gave the core something to do.
    wake: Arc<Notify>,
    inputs: mpsc::UnboundedSender<Input<T>>,
    task: JoinHandle<()>,
}

impl<T: Timestamp> std::fmt::Debug for Input<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Disconnect(reason) => write!(f, "Disconnect({reason})"),
            Input::Connected { epoch, .. } => write!(f, "Connected({epoch})"),
            Input::ConnectFailed { epoch, reason } => write!(f, "ConnectFailed({epoch}, {reason})"),
            Input::Received { epoch, process, .. } => write!(f, "Received({epoch}, {process})"),
        }
    }
}

impl<T: Timestamp> ReplicaClient<T> {
    /// Starts the client task on the current tokio runtime. It connects at once and keeps reconnecting
    /// until shut down; `history` is replayed on every connection.
    pub fn spawn(
        config: ReplicaClientConfig,
        history: CommandHistory<T>,
        events: mpsc::UnboundedSender<(ReplicaId, ReplicaEvent<T>)>,
    ) -> Self {
        let replica_id = config.core.replica_id;
        let max_frame_bytes = config.max_frame_bytes;
        // Unbounded: what the owner sends is bounded by what it decided to send (and recorded in its own
        // history); responses are bounded by what the replica answers to it.
        let (inputs, rx) = mpsc::unbounded_channel();
        let core = Arc::new(Mutex::new(ReplicaCore::new(config.core.clone(), history)));
        let wake = Arc::new(Notify::new());
        let span = info_span!("replica", %replica_id);
        let shared = Shared { core: Arc::clone(&core), wake: Arc::clone(&wake) };
        let task = tokio::spawn(run(config, shared, rx, inputs.clone(), events).instrument(span));
        ReplicaClient { replica_id, max_frame_bytes, core, wake, inputs, task }
    }

    /// The replica's id.
    pub fn replica_id(&self) -> ReplicaId {
        self.replica_id
    }

    /// Sends a command (recorded in the history; forwarded when connected). A command that does not fit
    /// a frame ([`check_command_size`]) or that the history refuses ([`SendError::Rejected`]) is
    /// neither recorded nor sent.
    pub fn send(&self, command: ComputeCommand<T>) -> Result<(), SendError> {
        check_command_size(&command, self.max_frame_bytes)?;
        if self.inputs.is_closed() {
            return Err(ClientGone(self.replica_id).into());
        }
        lock(&self.core).send(command)?;
        self.wake.notify_one();
        Ok(())
    }

    /// Drops the current connection because the owner found the replica faulty; the client reconnects
    /// after backoff and replays its history (rehydration).
    pub fn disconnect(&self, reason: impl Into<String>) -> Result<(), ClientGone> {
        self.inputs.send(Input::Disconnect(reason.into())).map_err(|_| ClientGone(self.replica_id))
    }

    /// Stops the task and closes every connection.
    pub async fn shutdown(mut self) {
        self.task.abort();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
    }
}

impl<T: Timestamp> Drop for ReplicaClient<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The live I/O of one epoch.
struct Connection {
    epoch: u64,
    writers: Vec<mpsc::UnboundedSender<Arc<Frame>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

// The shell owns the wall clock and the jitter source; the core never sees either directly.
#[allow(clippy::disallowed_methods)]
fn clock() -> impl FnMut() -> u64 {
    let start = std::time::Instant::now();
    move || start.elapsed().as_millis() as u64
}

#[allow(clippy::disallowed_methods)]
fn jitter_source(replica_id: ReplicaId) -> impl FnMut() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut state = nanos ^ replica_id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What the task shares with the handle: the core and the handle's wake-up.
struct Shared<T: Timestamp> {
    core: SharedCore<T>,
    wake: Arc<Notify>,
}

async fn run<T: Timestamp>(
    config: ReplicaClientConfig,
    shared: Shared<T>,
    mut rx: mpsc::UnboundedReceiver<Input<T>>,
    inputs: mpsc::UnboundedSender<Input<T>>,
    events: mpsc::UnboundedSender<(ReplicaId, ReplicaEvent<T>)>,
) {
    let replica_id = config.core.replica_id;
    let mut now = clock();
    let mut jitter = jitter_source(replica_id);
    let Shared { core, wake } = shared;
    let mut connection: Option<Connection> = None;
    lock(&core).tick(now());
    loop {
        let outputs: Vec<ReplicaOutput<T>> = {
            let mut core = lock(&core);
            std::iter::from_fn(|| core.poll()).collect()
        };
        for output in outputs {
            match output {
                ReplicaOutput::Connect { epoch } => {
                    connection = None;
                    let addresses = config.addresses.clone();
                    let inputs = inputs.clone();
                    let timeout = Duration::from_millis(config.connect_timeout_ms);
                    tokio::spawn(async move {
                        let input = match tokio::time::timeout(timeout, connect_all(&addresses)).await {
                            Ok(Ok(streams)) => Input::Connected { epoch, streams },
                            Ok(Err(reason)) => Input::ConnectFailed { epoch, reason },
                            Err(_) => {
                                Input::ConnectFailed { epoch, reason: format!("timed out after {timeout:?}") }
                            }
                        };
                        let _ = inputs.send(input);
                    });
                }
                ReplicaOutput::Send { epoch, command } => {
                    let Some(conn) = connection.as_ref().filter(|c| c.epoch == epoch) else { continue };
                    let frame = match Frame::encode(&command, config.max_frame_bytes) {
                        Ok(frame) => Arc::new(frame),
                        // `send` accepted only commands that fit with room for what compaction adds.
                        Err(e) => panic!("a recorded {} command cannot be encoded: {e}", command.name()),
                    };
                    for writer in &conn.writers {
                        let _ = writer.send(Arc::clone(&frame));
                    }
                }
                ReplicaOutput::Disconnect { epoch, reason } => {
                    warn!(epoch, %reason, "disconnecting replica");
                    if connection.as_ref().is_some_and(|c| c.epoch == epoch) {
                        connection = None;
                    }
                }
                ReplicaOutput::Response(response) => {
                    if events.send((replica_id, ReplicaEvent::Response(response))).is_err() {
                        return;
                    }
                }
                ReplicaOutput::Status(status) => {
                    match &status {
                        ReplicaStatus::Failed { reason, retry_in_ms } => {
                            warn!(%reason, retry_in_ms, "replica failed")
                        }
                        other => info!(status = ?other, "replica status"),
                    }
                    if events.send((replica_id, ReplicaEvent::Status(status))).is_err() {
                        return;
                    }
                }
            }
        }
        let timer = lock(&core).next_timer_ms().map(|at| at.saturating_sub(now()));
        let input = tokio::select! {
            input = rx.recv() => input,
            // `send` handed the core a command: carry out its outputs.
            () = wake.notified() => continue,
            () = tokio::time::sleep(Duration::from_millis(timer.unwrap_or(0))), if timer.is_some() => {
                lock(&core).tick(now());
                continue;
            }
        };
        let Some(input) = input else { return };
        let mut locked = lock(&core);
        let core = &mut *locked;
        match input {
            Input::Disconnect(reason) => core.disconnect(now(), &reason, jitter()),
            Input::Connected { epoch, streams } => {
                if epoch != core.epoch() {
                    continue;
                }
                debug!(epoch, "connected to every process");
                connection = Some(start_io(epoch, streams, config.max_frame_bytes, inputs.clone()));
                core.connected(epoch);
            }
            Input::ConnectFailed { epoch, reason } => core.connect_failed(epoch, now(), &reason, jitter()),
            Input::Received { epoch, process, result } => match result {
                Ok(response) => core.receive(epoch, process, response, now(), jitter()),
                Err(reason) => {
                    if connection.as_ref().is_some_and(|c| c.epoch == epoch) {
                        connection = None;
                    }
                    core.connection_lost(epoch, now(), &format!("process {process}: {reason}"), jitter());
                }
            },
        }
    }
}

async fn connect_all(addresses: &[String]) -> Result<Vec<TcpStream>, String> {
    let mut streams = Vec::with_capacity(addresses.len());
    for address in addresses {
        let stream = TcpStream::connect(address).await.map_err(|e| format!("{address}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| format!("{address}: {e}"))?;
        streams.push(stream);
    }
    Ok(streams)
}

fn start_io<T: Timestamp>(
    epoch: u64,
    streams: Vec<TcpStream>,
    max_frame_bytes: usize,
    inputs: mpsc::UnboundedSender<Input<T>>,
) -> Connection {
    let mut writers = Vec::new();
    let mut tasks = Vec::new();
    for (process, stream) in streams.into_iter().enumerate() {
        let (read, write) = stream.into_split();
        // Unbounded: the commands of one epoch, each sent once (see `ReplicaClient::spawn`).
        let (writer, frames) = mpsc::unbounded_channel::<Arc<Frame>>();
        writers.push(writer);
        tasks.push(tokio::spawn(write_frames(
            epoch,
            process,
            FramedWrite::new(write, max_frame_bytes),
            frames,
            inputs.clone(),
        )));
        tasks.push(tokio::spawn(read_responses(
            epoch,
            process,
            FramedRead::new(read, max_frame_bytes),
            inputs.clone(),
        )));
    }
    Connection { epoch, writers, tasks }
}

/// Writes one process's frames, coalescing what is queued into one write; reports a failed write.
async fn write_frames<T: Timestamp>(
    epoch: u64,
    process: usize,
    mut output: FramedWrite<tokio::net::tcp::OwnedWriteHalf>,
    mut frames: mpsc::UnboundedReceiver<Arc<Frame>>,
    lost: mpsc::UnboundedSender<Input<T>>,
) {
    while let Some(frame) = frames.recv().await {
        output.push(&frame);
        while !output.batch_full() {
            match frames.try_recv() {
                Ok(frame) => output.push(&frame),
                Err(_) => break,
            }
        }
        if let Err(e) = output.flush().await {
            let _ = lost.send(Input::Received { epoch, process, result: Err(format!("write failed: {e}")) });
            return;
        }
    }
}

/// Reads one process's responses until the connection ends or breaks, and says why.
async fn read_responses<T: Timestamp>(
    epoch: u64,
    process: usize,
    mut input: FramedRead<tokio::net::tcp::OwnedReadHalf>,
    received: mpsc::UnboundedSender<Input<T>>,
) {
    loop {
        let result = match input.recv::<ComputeResponse<T>>().await {
            Ok(response) => Ok(response),
            Err(FrameError::Closed) => Err("closed by the replica".to_string()),
            Err(FrameError::Io(e)) => Err(format!("read failed: {e}")),
            Err(e) => Err(e.to_string()),
        };
        let failed = result.is_err();
        if received.send(Input::Received { epoch, process, result }).is_err() || failed {
            return;
        }
    }
}
