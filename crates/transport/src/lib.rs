//! Framed tokio connections, secured: the one place the workspace's socket shells read and write
//! `protocol::frame` frames, authenticate their peers and set up TLS.
//!
//! **What this is.** [`FramedRead`] turns any `AsyncRead` (a TCP read half, a TLS stream's) into a stream
//! of decoded messages; [`FramedWrite`] encodes messages (or writes pre-encoded [`Frame`]s) into a bounded
//! batch and writes it to any `AsyncWrite`. The replica (`compute`'s server), the controller's replica
//! client (`replica-client`) and the processes of a multi-process replica all use these two types
//! instead of their own read and write loops, and secure every connection with the same two calls:
//! - [`ServerSecurity::accept`] / [`ClientSecurity::connect`] (`security`): TLS (`tls`, rustls) unless
//!   explicitly insecure, then authentication (`auth`: an HMAC challenge-response over a
//!   [`SharedSecret`], `secret`), returning the framed halves;
//! - `auth`'s blocking drivers serve blocking sockets (the timely cluster's ports, test clients);
//! - `certs` (feature `certs`) makes throwaway certificate authorities for tests and the cluster scenario;
//! - [`SecurityFlags`] (`flags`): the binaries' shared `--tls-*`, `--insecure` and `--secret-file` flags.
//!
//! **What this is not.** No protocol: which messages flow after authentication, what a handshake says
//! and what to do with a message that cannot be sent are the shells' decisions. This crate only reports
//! them as errors ([`protocol::frame::FrameError`], [`AuthError`]), never skips a message and never logs
//! on a caller's behalf. Timeouts, connection caps and fencing are the shells' too (they know their
//! peers); this crate gives them what they need: an adjustable frame limit and keepalives.
//!
//! **Limits.** Every buffer is bounded, and each bound is a parameter or a constant named here:
//! - a frame larger than the connection's `max_frame_bytes` is refused on both sides: on the way out
//!   [`FramedWrite::encode`] returns `TooLarge` (with the frame's real size) and writes nothing; on the
//!   way in the length header is checked before the payload is buffered, so a peer cannot make us
//!   allocate more than one maximum frame plus one read chunk (at most [`READ_CHUNK_BYTES`], less for
//!   small limits);
//! - the limit can change during a connection ([`FramedRead::set_max_frame_bytes`],
//!   [`FramedWrite::set_max_frame_bytes`]): [`PRE_AUTH_MAX_FRAME_BYTES`] until the peer has
//!   authenticated, the full one after;
//! - a writer batches frames until [`FramedWrite::batch_full`] (`batch_bytes`, default
//!   [`DEFAULT_BATCH_BYTES`]); after each flush both sides give back capacity above their retention
//!   bound, so one large frame does not pin its memory for the life of the connection.
//!
//! **Keepalives.** [`FramedWrite::push_keepalive`] writes an empty frame; readers skip them
//! ([`FramedRead::recv`]) or report them ([`FramedRead::recv_or_keepalive`]) to a shell with an idle
//! timeout, so a quiet but live connection is told from a dead one.
//!
//! **Invariants.** A message is either written whole or reported as an error, never dropped; a frame is
//! decoded only once all its bytes arrived; after an error the stream's framing is lost and the shell
//! closes the connection. Reading is cancellation-safe, so a shell can race a read against a handshake or
//! idle timeout. Secrets never appear in `Debug` output or errors.
//!
//! **Tests.** `tests/it/` (over in-memory duplex streams and real sockets): round trips under arbitrary
//! chunking, garbage, oversize and truncated input, keepalives, the retention bounds, cancellation
//! safety, and TLS and authentication (`tests/it/security.rs`: wrong secrets, replays, wrong CAs and
//! names, client certificates); the exchange's steps in `auth`'s unit tests.

mod auth;
#[cfg(feature = "certs")]
pub mod certs;
mod flags;
mod secret;
mod security;
mod tls;

pub use auth::{
    AUTH_VERSION, Acceptor, AcceptorMessage, AuthError, AuthParams, Challenge, Connector, ConnectorMessage,
    PRE_AUTH_MAX_FRAME_BYTES, Proof, Refusal, Role, Step, Transcript, accept_blocking, connect_blocking,
};
pub use flags::SecurityFlags;
pub use secret::{MIN_SECRET_BYTES, SECRET_ENV, SecretError, SharedSecret};
pub use security::{ClientSecurity, Secured, SecurityError, ServerSecurity};
pub use tls::{
    EXPORTER_LABEL, SecureReadHalf, SecureWriteHalf, TlsClientConfig, TlsConfigError, TlsServerConfig,
};

use std::io;

use protocol::frame::{FRAME_HEADER_BYTES, FrameDecoder, FrameError, KEEPALIVE_FRAME, encode_frame};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How many bytes a [`FramedRead`] asks its stream for at once (the size of its read buffer), at most: a
/// reader whose frame limit is smaller reads in chunks of one maximum frame.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;

/// The read chunk of a reader whose limit is `max_frame_bytes`.
fn chunk_bytes(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_add(FRAME_HEADER_BYTES).min(READ_CHUNK_BYTES)
}

/// What [`FramedRead::recv_or_keepalive`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received<M> {
    /// A message.
    Message(M),
    /// One or more keepalives, and no message yet.
    Keepalive,
}

/// How many bytes a [`FramedWrite`] batches before [`FramedWrite::batch_full`] says to flush.
pub const DEFAULT_BATCH_BYTES: usize = 1 << 20;

/// A [`FramedWrite`] keeps at most this much buffer capacity (or twice its batch size, if larger) after a
/// flush.
pub const RETAINED_WRITE_BYTES: usize = 4 << 20;

/// One encoded frame (header and payload), ready to be written to any number of connections.
///
/// Built only by [`Frame::encode`], so it always holds exactly one valid frame within the limit it was
/// encoded with.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame").field("len", &self.bytes.len()).finish()
    }
}

impl Frame {
    /// Encodes `message` as one frame of at most `max_frame_bytes` payload bytes.
    ///
    /// # Examples
    /// ```
    /// use protocol::frame::FrameError;
    /// use transport::Frame;
    /// let frame = Frame::encode(&"hello".to_string(), 64).unwrap();
    /// assert_eq!(frame.payload_len(), 6);
    /// assert!(matches!(Frame::encode(&vec![0u8; 100], 64), Err(FrameError::TooLarge { len: 101, max: 64 })));
    /// ```
    pub fn encode<M: Serialize>(message: &M, max_frame_bytes: usize) -> Result<Frame, FrameError> {
        let mut bytes = Vec::new();
        encode_frame(message, max_frame_bytes, &mut bytes)?;
        Ok(Frame { bytes })
    }

    /// The frame's length on the wire, header included.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: a frame has at least its header.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The payload's length (what the frame limit applies to).
    pub fn payload_len(&self) -> usize {
        self.bytes.len() - FRAME_HEADER_BYTES
    }

    /// The bytes to write.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Decoded messages from a byte stream. See the crate documentation.
#[derive(Debug)]
pub struct FramedRead<R> {
    reader: R,
    decoder: FrameDecoder,
    chunk: Box<[u8]>,
}

impl<R: AsyncRead + Unpin> FramedRead<R> {
    /// Reads frames of at most `max_frame_bytes` from `reader`.
    pub fn new(reader: R, max_frame_bytes: usize) -> Self {
        FramedRead {
            reader,
            decoder: FrameDecoder::new(max_frame_bytes),
            chunk: vec![0; chunk_bytes(max_frame_bytes)].into(),
        }
    }

    /// The largest frame accepted.
    pub fn max_frame_bytes(&self) -> usize {
        self.decoder.max_frame_bytes()
    }

    /// Changes the largest frame accepted from now on (see [`FrameDecoder::set_max_frame_bytes`]).
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: usize) {
        self.decoder.set_max_frame_bytes(max_frame_bytes);
        if self.chunk.len() != chunk_bytes(max_frame_bytes) {
            self.chunk = vec![0; chunk_bytes(max_frame_bytes)].into();
        }
    }

    /// The next message among the bytes already received, without reading.
    pub fn try_recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, FrameError> {
        self.decoder.next_message()
    }

    /// The next message, reading as needed. [`FrameError::Closed`] when the stream ended cleanly between
    /// frames, [`FrameError::Truncated`] when it ended inside one.
    ///
    /// Cancellation-safe: its only await is one read of the stream, whose bytes are pushed into the
    /// decoder before the next await, so a cancelled `recv` loses nothing (use it in `select!`).
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<M, FrameError> {
        loop {
            if let Received::Message(message) = self.recv_or_keepalive().await? {
                return Ok(message);
            }
        }
    }

    /// The next message, or [`Received::Keepalive`] if keepalives arrived and no message yet (for a shell
    /// that closes idle connections). Otherwise as [`Self::recv`], and as cancellation-safe.
    pub async fn recv_or_keepalive<M: DeserializeOwned>(&mut self) -> Result<Received<M>, FrameError> {
        loop {
            let keepalives = self.decoder.keepalives();
            if let Some(message) = self.decoder.next_message()? {
                return Ok(Received::Message(message));
            }
            if self.decoder.keepalives() != keepalives {
                return Ok(Received::Keepalive);
            }
            let n = self.reader.read(&mut self.chunk).await?;
            if n == 0 {
                self.decoder.finish()?;
                return Err(FrameError::Closed);
            }
            self.decoder.push(&self.chunk[..n]);
        }
    }

    /// Bytes received and not yet decoded.
    pub fn buffered_bytes(&self) -> usize {
        self.decoder.buffered_bytes()
    }

    /// The memory the decoder's buffer holds on to.
    pub fn buffer_capacity_bytes(&self) -> usize {
        self.decoder.capacity_bytes()
    }

    /// The stream and the decoder (with whatever it buffered).
    pub fn into_parts(self) -> (R, FrameDecoder) {
        (self.reader, self.decoder)
    }
}

/// Batched, framed writes to a byte stream. See the crate documentation.
#[derive(Debug)]
pub struct FramedWrite<W> {
    writer: W,
    buffer: Vec<u8>,
    max_frame_bytes: usize,
    batch_bytes: usize,
}

impl<W: AsyncWrite + Unpin> FramedWrite<W> {
    /// Writes frames of at most `max_frame_bytes` to `writer`, batching up to [`DEFAULT_BATCH_BYTES`].
    pub fn new(writer: W, max_frame_bytes: usize) -> Self {
        FramedWrite { writer, buffer: Vec::new(), max_frame_bytes, batch_bytes: DEFAULT_BATCH_BYTES }
    }

    /// The same writer batching up to `batch_bytes` (at least one byte).
    pub fn with_batch_bytes(mut self, batch_bytes: usize) -> Self {
        self.batch_bytes = batch_bytes.max(1);
        self
    }

    /// The largest frame written.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Changes the largest frame written from now on (a small limit until the peer is authenticated).
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: usize) {
        self.max_frame_bytes = max_frame_bytes;
    }

    /// Appends a keepalive (an empty frame, which readers skip) to the batch.
    pub fn push_keepalive(&mut self) {
        self.buffer.extend_from_slice(&KEEPALIVE_FRAME);
    }

    /// Appends `message` as one frame to the batch. On an error (the message is over the frame limit, or
    /// cannot be encoded) nothing is appended and the caller decides what becomes of the message.
    pub fn encode<M: Serialize>(&mut self, message: &M) -> Result<(), FrameError> {
        encode_frame(message, self.max_frame_bytes, &mut self.buffer)
    }

    /// Appends a frame encoded earlier. It must fit this connection's limit (the shells encode with the
    /// limit of the connections they write to).
    pub fn push(&mut self, frame: &Frame) {
        assert!(
            frame.payload_len() <= self.max_frame_bytes,
            "a frame of {} bytes is written to a connection whose limit is {}",
            frame.payload_len(),
            self.max_frame_bytes
        );
        self.buffer.extend_from_slice(frame.as_bytes());
    }

    /// Whether the batch reached its size: flush before appending more.
    pub fn batch_full(&self) -> bool {
        self.buffer.len() >= self.batch_bytes
    }

    /// Bytes batched and not yet written.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len()
    }

    /// The memory the batch buffer holds on to.
    pub fn buffer_capacity_bytes(&self) -> usize {
        self.buffer.capacity()
    }

    /// Writes the batch. Not cancellation-safe: a flush cancelled midway leaves part of a frame written,
    /// so the connection must be closed then (the shells flush outside `select!` arms).
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.buffer.is_empty() {
            self.writer.write_all(&self.buffer).await?;
            self.buffer.clear();
            // A TLS stream may keep the last records it encrypted until flushed.
            self.writer.flush().await?;
        }
        if self.buffer.capacity() > RETAINED_WRITE_BYTES.max(2 * self.batch_bytes) {
            self.buffer = Vec::new();
        }
        Ok(())
    }

    /// Encodes and writes one message at once.
    pub async fn send<M: Serialize>(&mut self, message: &M) -> Result<(), FrameError> {
        self.encode(message)?;
        self.flush().await?;
        Ok(())
    }

    /// Writes what is batched and shuts the stream's write side down (the peer reads end of stream).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.writer.shutdown().await
    }

    /// The stream.
    pub fn into_inner(self) -> W {
        self.writer
    }
}
