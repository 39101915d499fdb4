//! Controller connections of a replica process: accepting them, securing and authenticating them,
//! bounding them, and the task that carries one connection's frames between its socket and the core.
//!
//! **A connection's life.**
//! 1. *Accepted* ([`accept_loop`]) and counted among the unauthenticated connections
//!    ([`PendingConnections`]): at most `max_pending_connections` of them; when a new one arrives at the
//!    limit, the oldest unauthenticated one is closed to make room (logged once, then summarised at most
//!    every [`EVICTION_LOG_INTERVAL`]). An attacker holding every slot therefore delays a legitimate
//!    controller by at most its own handshake, and the active controller connection, authenticated, is
//!    not among them at all.
//! 2. *Handshake*, within `handshake_timeout_ms`: TLS (unless `--insecure`), authentication
//!    (`transport`'s challenge-response, frames at most `transport::PRE_AUTH_MAX_FRAME_BYTES`), then the Hello
//!    (version checked here: `HelloRefused` and close; anything else first: `CommandRejected` and close).
//!    A failure is logged with the peer's address and tells the peer only why the exchange failed: no
//!    instance or replica id, nothing about the process.
//! 3. *Admitted or fenced* by the core (`CoreEvent::Connected`, [`crate::fence`]): the core answers
//!    the Hello (or `Fenced`) through the connection's outbox.
//! 4. *Serving* ([`carry`]): commands to the core, the core's responses to the socket in batches. The
//!    frame limit is the full one. The process writes a keepalive after `keepalive_interval_ms` without
//!    writing, and closes a connection from which nothing (not even a keepalive) arrived for
//!    `idle_timeout_ms`: a controller (`replica-client`) sends keepalives every few seconds while it has
//!    nothing to say, so a quiet controller is not closed, and a vanished one is. Responses queued and
//!    not yet written are bounded by the core (`QUEUED_FRAMES` frames, then the connection is dropped).
//!
//! **Bounds per connection.** Before authentication: one read chunk and one pre-authentication frame
//! (a few KiB) plus TLS's own buffers (rustls bounds them); after: one read chunk, one maximum frame and
//! the core's queue limit.
//!
//! **What this is not.** Protocol decisions after the Hello (the core's), fencing (`fence`).
//!
//! **Tests.** `tests/it/security.rs` (in-process: TLS, secrets, fencing, timeouts, the pending limit) and
//! `tests/it/adversarial.rs` (against a `compute-replica` process, with its RSS bounded).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::frame::{FrameError, check_version};
use protocol::{AUTH_SERVICE, ComputeCommand, ComputeResponse, PROTOCOL_VERSION};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use transport::{
    AuthError, FramedRead, FramedWrite, Received, SecureReadHalf, SecureWriteHalf, ServerSecurity,
};

use crate::core::{ControllerHello, CoreEvent, Outbox, Outgoing};

/// How long a stopping process waits for its connections to write what is queued before it closes them;
/// also how long a closing connection may take to write its last frames.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Evictions of unauthenticated connections are summarised in the log at most this often.
pub(crate) const EVICTION_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How the process treats controller connections (from `ReplicaConfig` and `ReplicaLimits`).
#[derive(Debug)]
pub(crate) struct ConnectionConfig {
    /// TLS and authentication.
    pub security: ServerSecurity,
    /// The largest frame once authenticated.
    pub max_frame_bytes: usize,
    /// TLS, authentication and Hello must finish within this.
    pub handshake_timeout: Duration,
    /// A connection from which nothing arrived for this long is closed.
    pub idle_timeout: Duration,
    /// A keepalive is written after this long without writing.
    pub keepalive_interval: Duration,
    /// Unauthenticated connections at most.
    pub max_pending: usize,
}

/// The unauthenticated connections, oldest first, each with the switch that closes it.
#[derive(Debug)]
struct PendingConnections {
    max: usize,
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
    /// Evictions since the last log line, and when that was.
    evicted: u64,
    logged_at: Option<Instant>,
}

impl PendingConnections {
    fn new(max: usize) -> Self {
        assert!(max > 0, "at least one unauthenticated connection is allowed");
        PendingConnections { max, waiting: BTreeMap::new(), evicted: 0, logged_at: None }
    }

    /// Counts connection `conn` in, closing the oldest if the limit is reached; its eviction switch.
    fn admit(&mut self, conn: u64, peer: SocketAddr) -> oneshot::Receiver<()> {
        if self.waiting.len() >= self.max {
            let (oldest, evict) = self.waiting.pop_first().expect("at the limit, some are waiting");
            let _ = evict.send(());
            self.evicted += 1;
            let now = Instant::now();
            if self.logged_at.is_none_or(|at| now.duration_since(at) >= EVICTION_LOG_INTERVAL) {
                warn!(
                    max_pending_connections = self.max,
                    evicted = self.evicted,
                    oldest,
                    %peer,
                    "unauthenticated connection limit reached: closing the oldest unauthenticated connections to make room"
                );
                self.logged_at = Some(now);
                self.evicted = 0;
            }
        }
        let (evict, evicted) = oneshot::channel();
        self.waiting.insert(conn, evict);
        assert!(self.waiting.len() <= self.max, "the pending limit holds");
        evicted
    }

    /// Connection `conn` authenticated or ended: it no longer counts.
    fn leave(&mut self, conn: u64) {
        self.waiting.remove(&conn);
    }
}

/// Accepts controller connections until `stop`, then gives the open ones [`CLOSE_GRACE`] to finish.
pub(crate) async fn accept_loop(
    listener: tokio::net::TcpListener,
    events: UnboundedSender<CoreEvent>,
    config: Arc<ConnectionConfig>,
    mut stop: oneshot::Receiver<()>,
) {
    let pending = Arc::new(Mutex::new(PendingConnections::new(config.max_pending)));
    let mut connections = JoinSet::new();
    let mut next_conn = 0u64;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    next_conn += 1;
                    debug!(conn = next_conn, %peer, "accepted connection");
                    let _ = stream.set_nodelay(true);
                    let evicted = pending.lock().expect("pending lock").admit(next_conn, peer);
                    let task = Connection {
                        conn: next_conn,
                        peer,
                        events: events.clone(),
                        config: Arc::clone(&config),
                        pending: Arc::clone(&pending),
                    };
                    connections.spawn(task.serve(stream, evicted));
                }
                Err(e) => {
                    // Out of file descriptors and the like: the connections we have go on.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    // The core closed the active connection; give it a moment to write what is queued.
    let _ =
        tokio::time::timeout(CLOSE_GRACE, async { while connections.join_next().await.is_some() {} }).await;
    connections.shutdown().await;
}

/// Why a connection did not get past its handshake.
#[derive(Debug, thiserror::Error)]
enum HandshakeEnd {
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error("the handshake did not finish within {0:?}")]
    TimedOut(Duration),
    #[error("closed to make room for newer unauthenticated connections")]
    Evicted,
    #[error("{0}")]
    Hello(String),
}

/// One connection's task.
struct Connection {
    conn: u64,
    peer: SocketAddr,
    events: UnboundedSender<CoreEvent>,
    config: Arc<ConnectionConfig>,
    pending: Arc<Mutex<PendingConnections>>,
}

type Input = FramedRead<SecureReadHalf>;
type Output = FramedWrite<SecureWriteHalf>;

impl Connection {
    /// Serves the connection: its handshake (unless evicted first), then its frames through the core.
    async fn serve(self, stream: TcpStream, evicted: oneshot::Receiver<()>) {
        let timeout = self.config.handshake_timeout;
        let handshake = tokio::select! {
            outcome = tokio::time::timeout(timeout, self.handshake(stream)) => {
                outcome.unwrap_or(Err(HandshakeEnd::TimedOut(timeout)))
            }
            _ = evicted => Err(HandshakeEnd::Evicted),
        };
        self.pending.lock().expect("pending lock").leave(self.conn);
        let (input, mut output, hello) = match handshake {
            Ok(session) => session,
            Err(HandshakeEnd::Evicted) => return debug!(conn = self.conn, peer = %self.peer, "evicted"),
            Err(end) => {
                return warn!(conn = self.conn, peer = %self.peer, reason = %end, "connection refused");
            }
        };
        // Unbounded, but bounded in bytes: the core closes the connection when more than its limit is
        // queued and not yet written (`queued_bytes`).
        let (out_tx, out_rx) = unbounded_channel::<Outgoing>();
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let (abort_tx, abort) = watch::channel(false);
        let out = Outbox::new(out_tx, Arc::clone(&queued_bytes), abort_tx);
        if self.events.send(CoreEvent::Connected { conn: self.conn, out, hello }).is_err() {
            return;
        }
        let aborted = self.carry(input, &mut output, out_rx, &queued_bytes, abort).await;
        if !aborted {
            let _ = tokio::time::timeout(CLOSE_GRACE, output.shutdown()).await;
        }
        drop(output);
        let _ = self.events.send(CoreEvent::Disconnected { conn: self.conn });
    }

    /// TLS, authentication and the Hello.
    async fn handshake(&self, stream: TcpStream) -> Result<(Input, Output, ControllerHello), HandshakeEnd> {
        let (mut input, mut output) = self.config.security.accept(stream, AUTH_SERVICE).await?;
        input.set_max_frame_bytes(self.config.max_frame_bytes);
        output.set_max_frame_bytes(self.config.max_frame_bytes);
        debug!(conn = self.conn, peer = %self.peer, "controller authenticated");
        let refusal: ComputeResponse = match input.recv::<ComputeCommand>().await {
            Ok(ComputeCommand::Hello { version, nonce, epoch, session }) => match check_version(version) {
                Ok(()) => return Ok((input, output, ControllerHello { nonce, epoch, session })),
                Err(e) => {
                    info!(conn = self.conn, version, "refusing a controller of another protocol version");
                    ComputeResponse::HelloRefused { version: PROTOCOL_VERSION, reason: e.to_string() }
                }
            },
            Ok(other) => ComputeResponse::CommandRejected {
                command: other.name().to_string(),
                reason: "the first command on a connection must be Hello".to_string(),
            },
            Err(e) => ComputeResponse::CommandRejected {
                command: "<undecodable>".to_string(),
                reason: e.to_string(),
            },
        };
        let reason = match &refusal {
            ComputeResponse::HelloRefused { reason, .. }
            | ComputeResponse::CommandRejected { reason, .. } => reason.clone(),
            other => other.name().to_string(),
        };
        let _ = output.send(&refusal).await;
        let _ = output.shutdown().await;
        Err(HandshakeEnd::Hello(reason))
    }

    /// Carries frames until the connection ends; whether the core aborted it (nothing more may be
    /// written then).
    async fn carry(
        &self,
        mut input: Input,
        output: &mut Output,
        mut out_rx: UnboundedReceiver<Outgoing>,
        queued_bytes: &AtomicUsize,
        mut abort: watch::Receiver<bool>,
    ) -> bool {
        let mut idle_at = Instant::now() + self.config.idle_timeout;
        let mut keepalive_at = Instant::now() + self.config.keepalive_interval;
        loop {
            tokio::select! {
                // The core dropped the connection: no more writing (the peer may not be reading).
                () = dropped(&mut abort) => return true,
                () = tokio::time::sleep_until(idle_at) => {
                    info!(conn = self.conn, idle_timeout = ?self.config.idle_timeout, "nothing from the controller in time; closing the connection");
                    return false;
                }
                () = tokio::time::sleep_until(keepalive_at) => {
                    output.push_keepalive();
                    match self.flush(output, &mut abort, idle_at).await {
                        Flushed::Written => keepalive_at = Instant::now() + self.config.keepalive_interval,
                        Flushed::Failed => return false,
                        Flushed::Aborted => return true,
                    }
                }
                outgoing = out_rx.recv() => {
                    let (written, closing) = batch(output, outgoing, &mut out_rx);
                    match self.flush(output, &mut abort, idle_at).await {
                        Flushed::Written => {}
                        Flushed::Failed => return false,
                        Flushed::Aborted => return true,
                    }
                    keepalive_at = Instant::now() + self.config.keepalive_interval;
                    queued_bytes.fetch_sub(written, Ordering::AcqRel);
                    if closing {
                        return false;
                    }
                }
                command = input.recv_or_keepalive::<ComputeCommand>() => match command {
                    Ok(received) => {
                        idle_at = Instant::now() + self.config.idle_timeout;
                        if let Received::Message(command) = received {
                            let _ = self.events.send(CoreEvent::Command { conn: self.conn, command });
                        }
                    }
                    Err(FrameError::Closed | FrameError::Io(_)) => return false,
                    Err(e) => {
                        warn!(conn = self.conn, error = %e, "undecodable frame; closing the connection");
                        let rejected: ComputeResponse = ComputeResponse::CommandRejected {
                            command: "<undecodable>".to_string(),
                            reason: e.to_string(),
                        };
                        let _ = tokio::time::timeout(CLOSE_GRACE, output.send(&rejected)).await;
                        return false;
                    }
                },
            }
        }
    }

    /// Writes the batch, unless the core aborts the connection or the peer neither reads nor sends
    /// until `idle_at`.
    async fn flush(
        &self,
        output: &mut Output,
        abort: &mut watch::Receiver<bool>,
        idle_at: Instant,
    ) -> Flushed {
        tokio::select! {
            flushed = output.flush() => if flushed.is_ok() { Flushed::Written } else { Flushed::Failed },
            () = dropped(abort) => Flushed::Aborted,
            () = tokio::time::sleep_until(idle_at) => {
                info!(conn = self.conn, "the controller neither reads nor sends; closing the connection");
                Flushed::Failed
            }
        }
    }
}

/// How a flush ended.
enum Flushed {
    Written,
    Failed,
    Aborted,
}

/// Coalesces `first` and whatever else is queued into one batch: the bytes batched, and whether the
/// connection is to close after them.
fn batch(
    output: &mut Output,
    first: Option<Outgoing>,
    out_rx: &mut UnboundedReceiver<Outgoing>,
) -> (usize, bool) {
    let mut next = first;
    let mut written = 0;
    loop {
        match next {
            Some(Outgoing::Frame(frame)) => {
                written += frame.len();
                output.push(&frame);
            }
            Some(Outgoing::Close) | None => return (written, true),
        }
        if output.batch_full() {
            return (written, false);
        }
        next = out_rx.try_recv().ok();
        if next.is_none() {
            return (written, false);
        }
    }
}

/// Completes once the core drops the connection (its `Outbox::abort`); never if the core lets go of the
/// connection otherwise (a close after what is queued, or the core is gone: the queue's end says so).
async fn dropped(abort: &mut watch::Receiver<bool>) {
    if abort.wait_for(|abort| *abort).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_limit_the_oldest_unauthenticated_connection_is_evicted() {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut pending = PendingConnections::new(2);
        let mut first = pending.admit(1, peer);
        let mut second = pending.admit(2, peer);
        pending.leave(2);
        let mut third = pending.admit(3, peer);
        assert!(first.try_recv().is_err(), "below the limit nobody is evicted");
        let _fourth = pending.admit(4, peer);
        assert_eq!(first.try_recv(), Ok(()), "the oldest goes");
        assert!(third.try_recv().is_err(), "the others stay");
        assert!(second.try_recv().is_err(), "one that left is not evicted");
        assert_eq!(pending.waiting.keys().copied().collect::<Vec<_>>(), [3, 4]);
    }
}
