//! Starting and stopping a replica process: [`ReplicaServer::start`], [`ReplicaConfig`], [`ReplicaHandle`].
//!
//! **What this is.** The threads of one replica process and the socket shell around the core:
//! - one thread (`compute-io`) runs a current-thread tokio runtime with the listener, the connection tasks
//!   and the [`Core`](crate::core::Core) (protocol state, merging, storage I/O);
//! - one thread (`compute-timely`) runs `timely::execute` with `workers` worker threads (a
//!   `Config::process`, or a `Cluster` when `timely_addresses` has more than one address) and then joins
//!   them.
//!
//! A connection task reads length-prefixed frames (`protocol::frame`), checks the Hello itself (version
//! mismatch: `HelloRefused` and close; anything else first: `CommandRejected` and close; undecodable or
//! oversize frames: `CommandRejected` naming the decode error, and close), then hands the connection to
//! the core, which makes it the active one (replacing any previous one).
//!
//! **What this is not.** No protocol decisions after the Hello (the core's) and no dataflow code.
//!
//! **Invariants.** [`ReplicaHandle::shutdown`] (or dropping the handle) stops the listener, the core and
//! every worker, and joins all threads; no thread outlives the handle. A multi-process replica's timely
//! cluster start-up blocks the timely thread (not `start`) until every peer is there; timely prints
//! connection progress to stdout while it waits.
//!
//! **Tests.** `tests/it/` starts replicas in-process with this API (1 and 2 workers, 2 processes).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use prometheus::Registry;
use protocol::frame::{DEFAULT_MAX_FRAME_BYTES, FrameDecoder, check_version, encode_frame};
use protocol::{ComputeCommand, ComputeResponse, PROTOCOL_VERSION};
use storage::StorageCollections;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::core::{Core, CoreEvent, Outgoing, Topology};
use crate::messages::{FromWorker, ToWorker, WorkerTx};
use crate::metrics::ReplicaMetrics;
use crate::worker::run_worker;

/// Merge effort differential spends on idle arrangements (fixed at start: timely's worker configuration
/// cannot change while the workers run, so `UpdateConfiguration.idle_merge_effort` is not applied).
const IDLE_MERGE_EFFORT: isize = 1_000;

/// The configuration of one replica process.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Where to listen for the controller (port 0 picks a free port; see [`ReplicaHandle::local_addr`]).
    pub listen: SocketAddr,
    /// Timely worker threads in this process.
    pub workers: usize,
    /// This process's index in `timely_addresses` (0 for a single-process replica).
    pub process: usize,
    /// The timely addresses of every process of the replica; empty or one entry for a single process.
    pub timely_addresses: Vec<String>,
    /// The storage layer (embedded or a client).
    pub storage: Arc<dyn StorageCollections>,
}

/// Why a replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is inconsistent.
    #[error("invalid replica configuration: {0}")]
    InvalidConfig(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// A thread or the async runtime could not be started.
    #[error("cannot start the replica's threads: {0}")]
    Threads(std::io::Error),
    /// The replica's metrics could not be registered (the registry has them already).
    #[error("cannot register the replica's metrics: {0}")]
    Metrics(prometheus::Error),
}

/// Starts replica processes.
#[derive(Debug)]
pub struct ReplicaServer;

/// A running replica process. Dropping it shuts it down.
#[derive(Debug)]
pub struct ReplicaHandle {
    local_addr: SocketAddr,
    events: UnboundedSender<CoreEvent>,
    io_thread: Option<JoinHandle<()>>,
    timely_thread: Option<JoinHandle<()>>,
    built: Arc<AtomicU64>,
    /// Why the process stopped on its own (a worker panicked), once it has.
    failure: tokio::sync::watch::Receiver<Option<String>>,
    /// The registry the replica's metrics are in, and those metrics (unregistered at shutdown).
    registry: Registry,
    metrics: ReplicaMetrics,
}

impl ReplicaServer {
    /// Starts one replica process: binds the listener, starts the tokio thread and the timely workers.
    /// Returns once the listener is bound (a cluster's timely connections are made in the background).
    /// Its metrics go to a registry of its own ([`ReplicaHandle::registry`]).
    pub fn start(config: ReplicaConfig) -> Result<ReplicaHandle, StartError> {
        Self::start_with_registry(config, Registry::new())
    }

    /// [`start`](Self::start), with the replica's metrics (see the `metrics` module) in `registry`: the
    /// process's, which `compute-replica --metrics-addr` serves. One replica per registry; its families
    /// leave the registry when it shuts down.
    pub fn start_with_registry(
        config: ReplicaConfig,
        registry: Registry,
    ) -> Result<ReplicaHandle, StartError> {
        let metrics = ReplicaMetrics::register(&registry).map_err(StartError::Metrics)?;
        let started = Self::start_threads(config, registry.clone(), metrics.clone());
        if started.is_err() {
            metrics.unregister(&registry);
        }
        started
    }

    fn start_threads(
        config: ReplicaConfig,
        registry: Registry,
        metrics: ReplicaMetrics,
    ) -> Result<ReplicaHandle, StartError> {
        let ReplicaConfig { listen, workers, process, timely_addresses, storage } = config;
        if workers == 0 {
            return Err(StartError::InvalidConfig("at least one worker is needed".to_string()));
        }
        let processes = timely_addresses.len().max(1);
        if process >= processes {
            return Err(StartError::InvalidConfig(format!(
                "process {process} is not among the {processes} timely addresses"
            )));
        }
        let listener = std::net::TcpListener::bind(listen)
            .map_err(|source| StartError::Bind { addr: listen, source })?;
        listener.set_nonblocking(true).map_err(|source| StartError::Bind { addr: listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind { addr: listen, source })?;
        let topology = Topology { process, workers, peers: workers * processes };

        let (events_tx, events_rx) = unbounded_channel::<CoreEvent>();
        let (reports_tx, reports_rx) = unbounded_channel::<FromWorker>();
        let mut senders = Vec::with_capacity(workers);
        let mut receivers = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = std::sync::mpsc::channel::<ToWorker>();
            let thread = Arc::new(OnceLock::new());
            senders.push(WorkerTx::new(tx, Arc::clone(&thread)));
            receivers.push(Some(rx));
            threads.push(thread);
        }
        let built = Arc::new(AtomicU64::new(0));

        // Idle arrangements keep merging their batches, so peeks read few batches.
        let mut worker_config = timely::WorkerConfig::default();
        differential_dataflow::configure(
            &mut worker_config,
            &differential_dataflow::Config { idle_merge_effort: Some(IDLE_MERGE_EFFORT) },
        );
        let communication = if processes > 1 {
            timely::CommunicationConfig::Cluster {
                threads: workers,
                process,
                addresses: timely_addresses,
                report: false,
                zerocopy: false,
            }
        } else {
            timely::CommunicationConfig::Process(workers)
        };
        let timely_config = timely::Config { communication, worker: worker_config };
        let receivers = Arc::new(Mutex::new(receivers));
        let threads = Arc::new(threads);
        let worker_metrics = metrics.clone();
        let timely_thread = std::thread::Builder::new()
            .name(format!("compute-timely-{process}"))
            .spawn(move || {
                let first = process * workers;
                let result = timely::execute(timely_config, move |worker| {
                    let local = worker.index() - first;
                    let rx = receivers.lock().expect("receiver lock is never poisoned")[local]
                        .take()
                        .expect("each worker takes its receiver once");
                    let _ = threads[local].set(std::thread::current());
                    let reports = reports_tx.clone();
                    let metrics = worker_metrics.worker(worker.index(), local == 0);
                    let _span = info_span!("worker", process, worker = worker.index()).entered();
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_worker(worker, local, rx, reports, metrics)
                    }));
                    if let Err(panic) = outcome {
                        // The core stops the process: a replica missing a worker answers nothing. The
                        // panic goes on, so that timely does not step this worker's broken dataflows
                        // (it would park forever waiting for them to finish).
                        let message = panic_message(panic.as_ref());
                        let _ = reports_tx.send(FromWorker::Failed { worker: local, message });
                        std::panic::resume_unwind(panic);
                    }
                });
                match result {
                    Ok(guards) => {
                        for result in guards.join() {
                            if let Err(e) = result {
                                warn!(error = %e, "timely worker failed");
                            }
                        }
                    }
                    Err(e) => warn!(error = %e, "timely did not start"),
                }
            })
            .map_err(StartError::Threads)?;

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Threads)?;
        let core =
            Core::new(topology, senders, storage, events_tx.clone(), Arc::clone(&built), metrics.clone());
        let accept_events = events_tx.clone();
        let (failure_tx, failure) = tokio::sync::watch::channel(None);
        // Every log line of the process's core carries its instance and replica (recorded when the
        // controller says them, in `CreateInstance`) and its process.
        let span =
            info_span!("replica", instance = tracing::field::Empty, replica = tracing::field::Empty, process);
        let io_thread = std::thread::Builder::new()
            .name(format!("compute-io-{process}"))
            .spawn(move || {
                let served = async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(e) => {
                            warn!(error = %e, "cannot register the listener");
                            return;
                        }
                    };
                    let accept = tokio::spawn(accept_loop(listener, accept_events));
                    let failed = core.run(events_rx, reports_rx).await;
                    accept.abort();
                    if failed.is_some() {
                        let _ = failure_tx.send(failed);
                    }
                };
                runtime.block_on(served.instrument(span));
            })
            .map_err(StartError::Threads)?;
        info!(%local_addr, workers, process, processes, "replica started");
        Ok(ReplicaHandle {
            local_addr,
            events: events_tx,
            io_thread: Some(io_thread),
            timely_thread: Some(timely_thread),
            built,
            failure,
            registry,
            metrics,
        })
    }
}

impl ReplicaHandle {
    /// The address the replica listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The registry the replica's metrics are in (see the `metrics` module): what a process serves at
    /// its `/metrics` endpoint.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// How many dataflows this process has built since it started (for tests of reconciliation: a kept
    /// dataflow is not built again).
    pub fn dataflows_built(&self) -> u64 {
        self.built.load(Ordering::Relaxed)
    }

    /// Why the process stopped serving on its own, if it has: a timely worker panicked (dataflow code
    /// hit a bug, or a multiplicity overflowed in a build with overflow checks). It then closed its
    /// connection and its listener; only [`Self::shutdown`] is left to do.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// Waits until the process stops serving on its own (see [`Self::failure`]) and returns why. Pending
    /// forever while it runs normally.
    pub async fn failed(&self) -> String {
        let mut failure = self.failure.clone();
        match failure.wait_for(Option::is_some).await {
            Ok(message) => message.clone().expect("waited for Some"),
            // The io thread ended without a failure (a shutdown): nothing more will come.
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops the process and joins its threads.
    ///
    /// For a multi-process replica, shut all processes down concurrently (one thread each): a timely
    /// cluster process finishes only once its peers' connections close.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.events.send(CoreEvent::Shutdown);
        if let Some(thread) = self.io_thread.take() {
            let _ = thread.join();
        }
        if let Some(thread) = self.timely_thread.take() {
            let _ = thread.join();
        }
        self.metrics.unregister(&self.registry);
    }
}

impl Drop for ReplicaHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<String>(), panic.downcast_ref::<&str>()) {
        (Some(message), _) => message.clone(),
        (None, Some(message)) => (*message).to_string(),
        (None, None) => "a panic without a message".to_string(),
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, events: UnboundedSender<CoreEvent>) {
    let mut next_conn = 0u64;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                next_conn += 1;
                debug!(conn = next_conn, %peer, "accepted connection");
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(stream, next_conn, events.clone()));
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

/// Writes one response frame.
async fn write_response(stream: &mut TcpStream, response: &ComputeResponse, buffer: &mut Vec<u8>) -> bool {
    buffer.clear();
    if let Err(e) = encode_frame(response, DEFAULT_MAX_FRAME_BYTES, buffer) {
        warn!(error = %e, response = response.name(), "cannot encode a response");
        return true;
    }
    stream.write_all(buffer).await.is_ok()
}

/// Serves one controller connection: the Hello here, everything after it through the core.
async fn serve_connection(mut stream: TcpStream, conn: u64, events: UnboundedSender<CoreEvent>) {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut read_buffer = vec![0u8; 64 * 1024];
    let mut write_buffer = Vec::new();
    // The Hello.
    let first = loop {
        match decoder.next_message::<ComputeCommand>() {
            Ok(Some(command)) => break Ok(command),
            Ok(None) => {}
            Err(e) => break Err(e.to_string()),
        }
        match stream.read(&mut read_buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => decoder.push(&read_buffer[..n]),
        }
    };
    match first {
        Ok(ComputeCommand::Hello { version, nonce }) => match check_version(version) {
            Ok(()) => {
                let hello = ComputeResponse::Hello { version: PROTOCOL_VERSION, nonce };
                if !write_response(&mut stream, &hello, &mut write_buffer).await {
                    return;
                }
            }
            Err(e) => {
                info!(conn, version, "refusing a controller of another protocol version");
                let refused =
                    ComputeResponse::HelloRefused { version: PROTOCOL_VERSION, reason: e.to_string() };
                write_response(&mut stream, &refused, &mut write_buffer).await;
                return;
            }
        },
        Ok(other) => {
            let rejected: ComputeResponse = ComputeResponse::CommandRejected {
                command: other.name().to_string(),
                reason: "the first command on a connection must be Hello".to_string(),
            };
            write_response(&mut stream, &rejected, &mut write_buffer).await;
            return;
        }
        Err(reason) => {
            let rejected: ComputeResponse =
                ComputeResponse::CommandRejected { command: "<undecodable>".to_string(), reason };
            write_response(&mut stream, &rejected, &mut write_buffer).await;
            return;
        }
    }
    let (out_tx, mut out_rx) = unbounded_channel::<Outgoing>();
    if events.send(CoreEvent::Connected { conn, out: out_tx }).is_err() {
        return;
    }
    // Commands that arrived with the Hello.
    let mut pending_error: Option<String> = None;
    loop {
        match decoder.next_message::<ComputeCommand>() {
            Ok(Some(command)) => {
                let _ = events.send(CoreEvent::Command { conn, command });
            }
            Ok(None) => break,
            Err(e) => {
                pending_error = Some(e.to_string());
                break;
            }
        }
    }
    let (mut reader, mut writer) = stream.into_split();
    let mut closing = pending_error.is_some();
    if let Some(reason) = pending_error {
        let rejected: ComputeResponse =
            ComputeResponse::CommandRejected { command: "<undecodable>".to_string(), reason };
        write_buffer.clear();
        if encode_frame(&rejected, DEFAULT_MAX_FRAME_BYTES, &mut write_buffer).is_ok() {
            let _ = writer.write_all(&write_buffer).await;
        }
    }
    while !closing {
        tokio::select! {
            outgoing = out_rx.recv() => {
                let mut next = outgoing;
                write_buffer.clear();
                // Coalesce whatever is queued into one write.
                loop {
                    match next {
                        Some(Outgoing::Response(response)) => {
                            if let Err(e) = encode_frame(&response, DEFAULT_MAX_FRAME_BYTES, &mut write_buffer) {
                                warn!(error = %e, response = response.name(), "cannot encode a response");
                            }
                        }
                        Some(Outgoing::Close) | None => {
                            closing = true;
                            break;
                        }
                    }
                    if write_buffer.len() > 1 << 20 {
                        break;
                    }
                    match out_rx.try_recv() {
                        Ok(more) => next = Some(more),
                        Err(_) => break,
                    }
                }
                if !write_buffer.is_empty() && writer.write_all(&write_buffer).await.is_err() {
                    break;
                }
            }
            read = reader.read(&mut read_buffer) => {
                match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        decoder.push(&read_buffer[..n]);
                        loop {
                            match decoder.next_message::<ComputeCommand>() {
                                Ok(Some(command)) => {
                                    let _ = events.send(CoreEvent::Command { conn, command });
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    warn!(conn, error = %e, "undecodable frame; closing the connection");
                                    let rejected: ComputeResponse = ComputeResponse::CommandRejected {
                                        command: "<undecodable>".to_string(),
                                        reason: e.to_string(),
                                    };
                                    write_buffer.clear();
                                    if encode_frame(&rejected, DEFAULT_MAX_FRAME_BYTES, &mut write_buffer).is_ok() {
                                        let _ = writer.write_all(&write_buffer).await;
                                    }
                                    closing = true;
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let _ = writer.shutdown().await;
    let _ = events.send(CoreEvent::Disconnected { conn });
}
