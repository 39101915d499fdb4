//! Framing: length-prefixed `bincode` frames with a maximum size, and the version handshake check.
//!
//! A frame is a 4-byte little-endian payload length followed by the payload, one message encoded with
//! [`bincode_options`] (bincode 1.3, varint integers, trailing bytes rejected). The length is checked
//! against the configured maximum *before* anything is allocated, and decoding is bounded by the frame
//! length, so garbage, oversize or truncated input is a [`FrameError`], never a panic and never an
//! allocation beyond the maximum.
//!
//! The codec is transport-agnostic: [`FrameDecoder`] accepts bytes from any source (a tokio socket, a
//! simulated network); [`write_frame`] / [`read_frame`] serve blocking `std::io` streams.

use std::io::{self, Read, Write};

use bincode::Options;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::command::PROTOCOL_VERSION;

/// The default maximum frame size: 256 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 256 << 20;

/// The length of a frame header.
pub const FRAME_HEADER_BYTES: usize = 4;

/// A [`FrameDecoder`] keeps at most this much buffer capacity once it has no bytes left to decode.
pub const RETAINED_DECODER_BYTES: usize = 1 << 20;

/// The bincode configuration every frame uses.
pub fn bincode_options() -> impl Options + Copy {
    bincode::DefaultOptions::new().with_varint_encoding().with_little_endian().reject_trailing_bytes()
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The frame's declared (or encoded) length exceeds the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({got} of {expected} bytes)")]
    Truncated {
        /// Bytes the frame needed.
        expected: usize,
        /// Bytes available.
        got: usize,
    },
    /// The payload is not a valid message.
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// The message could not be encoded.
    #[error("unencodable message: {0}")]
    Encode(String),
    /// The stream ended cleanly between frames.
    #[error("connection closed")]
    Closed,
    /// The underlying stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Appends one frame holding `message` to `out`.
///
/// # Examples
/// ```
/// use protocol::frame::{decode_frame, encode_frame};
/// let mut buf = Vec::new();
/// encode_frame(&(1u32, "two".to_string()), 1024, &mut buf).unwrap();
/// let (message, used) = decode_frame::<(u32, String)>(&buf, 1024).unwrap().unwrap();
/// assert_eq!(message, (1, "two".to_string()));
/// assert_eq!(used, buf.len());
/// assert!(encode_frame(&vec![0u8; 100], 10, &mut buf).is_err());
/// ```
pub fn encode_frame<M: Serialize>(
    message: &M,
    max_frame_bytes: usize,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    let result = bincode_options()
        .with_limit(max_frame_bytes as u64)
        .serialize_into(&mut *out, message)
        .map_err(|e| match *e {
            // Only on this (rare) path is the whole message measured, to say how large it is.
            bincode::ErrorKind::SizeLimit => FrameError::TooLarge {
                len: usize::try_from(encoded_len(message)).unwrap_or(usize::MAX),
                max: max_frame_bytes,
            },
            other => FrameError::Encode(other.to_string()),
        });
    if let Err(error) = result {
        out.truncate(start);
        return Err(error);
    }
    let len = out.len() - start - FRAME_HEADER_BYTES;
    if len > max_frame_bytes || u32::try_from(len).is_err() {
        out.truncate(start);
        return Err(FrameError::TooLarge { len, max: max_frame_bytes });
    }
    out[start..start + FRAME_HEADER_BYTES].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// The length of `message`'s frame payload (without the header), measured without encoding it: one pass
/// over the message, no allocation. `u64::MAX` if the message cannot be encoded at all.
///
/// # Examples
/// ```
/// use protocol::frame::{FRAME_HEADER_BYTES, encode_frame, encoded_len};
/// let message = ("a row".to_string(), vec![1u64, 2, 3]);
/// let mut buf = Vec::new();
/// encode_frame(&message, 1024, &mut buf).unwrap();
/// assert_eq!(encoded_len(&message) as usize, buf.len() - FRAME_HEADER_BYTES);
/// ```
pub fn encoded_len<M: Serialize>(message: &M) -> u64 {
    bincode_options().serialized_size(message).unwrap_or(u64::MAX)
}

/// Decodes the frame at the start of `bytes`: `Ok(None)` if more bytes are needed, otherwise the message and
/// the number of bytes it used.
///
/// # Examples
/// ```
/// use protocol::frame::{FrameError, decode_frame, encode_frame};
/// let mut buf = Vec::new();
/// encode_frame(&42u64, 1024, &mut buf).unwrap();
/// assert!(decode_frame::<u64>(&buf[..2], 1024).unwrap().is_none());
/// assert!(matches!(decode_frame::<u64>(&[255, 255, 255, 255], 1024), Err(FrameError::TooLarge { .. })));
/// assert!(matches!(decode_frame::<String>(&[2, 0, 0, 0, 9, 9], 1024), Err(FrameError::Decode(_))));
/// ```
pub fn decode_frame<M: DeserializeOwned>(
    bytes: &[u8],
    max_frame_bytes: usize,
) -> Result<Option<(M, usize)>, FrameError> {
    let Some(header) = bytes.get(..FRAME_HEADER_BYTES) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(header.try_into().expect("four bytes")) as usize;
    if len > max_frame_bytes {
        return Err(FrameError::TooLarge { len, max: max_frame_bytes });
    }
    let Some(payload) = bytes.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len) else {
        return Ok(None);
    };
    let message = decode_payload(payload)?;
    Ok(Some((message, FRAME_HEADER_BYTES + len)))
}

fn decode_payload<M: DeserializeOwned>(payload: &[u8]) -> Result<M, FrameError> {
    bincode_options()
        .with_limit(payload.len() as u64)
        .deserialize(payload)
        .map_err(|e| FrameError::Decode(e.to_string()))
}

/// An incremental decoder: push bytes as they arrive, pop messages as they complete.
///
/// Its buffer holds at most one partial frame (checked against the maximum as soon as its header is
/// there) plus what was pushed after it; once it has been drained, capacity above
/// [`RETAINED_DECODER_BYTES`] is given back, so one large frame does not pin its memory for the life of
/// the connection.
///
/// # Examples
/// ```
/// use protocol::frame::{FrameDecoder, encode_frame};
/// let mut wire = Vec::new();
/// encode_frame(&1u8, 64, &mut wire).unwrap();
/// encode_frame(&2u8, 64, &mut wire).unwrap();
/// let mut decoder = FrameDecoder::new(64);
/// decoder.push(&wire[..3]);
/// assert_eq!(decoder.next_message::<u8>().unwrap(), None);
/// decoder.push(&wire[3..]);
/// assert_eq!(decoder.next_message::<u8>().unwrap(), Some(1));
/// assert_eq!(decoder.next_message::<u8>().unwrap(), Some(2));
/// assert_eq!(decoder.next_message::<u8>().unwrap(), None);
/// assert!(decoder.finish().is_ok());
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    start: usize,
    max_frame_bytes: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames over `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameDecoder { buffer: Vec::new(), start: 0, max_frame_bytes }
    }

    /// The largest frame this decoder accepts.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }

    /// Changes the largest frame accepted from now on (e.g. a small limit until a peer has authenticated,
    /// the full one after). A frame already partly buffered is checked against the new limit.
    pub fn set_max_frame_bytes(&mut self, max_frame_bytes: usize) {
        self.max_frame_bytes = max_frame_bytes;
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        }
        self.release_capacity();
        self.buffer.extend_from_slice(bytes);
    }

    /// Gives back capacity above [`RETAINED_DECODER_BYTES`] once nothing is buffered.
    fn release_capacity(&mut self) {
        if self.buffer.is_empty() && self.buffer.capacity() > RETAINED_DECODER_BYTES {
            self.buffer = Vec::new();
        }
    }

    /// The bytes of memory the decoder's buffer holds on to (for tests of its bounds).
    pub fn capacity_bytes(&self) -> usize {
        self.buffer.capacity()
    }

    /// Reads once from `reader` into the buffer; returns the bytes read (0 at end of stream).
    pub fn read_from<R: Read>(&mut self, reader: &mut R) -> io::Result<usize> {
        let mut chunk = [0u8; 64 * 1024];
        let n = reader.read(&mut chunk)?;
        self.push(&chunk[..n]);
        Ok(n)
    }

    /// The next complete message, if one has arrived. After an error the stream is unusable (the framing
    /// is lost); the caller closes the connection.
    pub fn next_message<M: DeserializeOwned>(&mut self) -> Result<Option<M>, FrameError> {
        match decode_frame(&self.buffer[self.start..], self.max_frame_bytes)? {
            None => {
                if self.start > 0 && self.start * 2 > self.buffer.len() {
                    self.buffer.drain(..self.start);
                    self.start = 0;
                    self.release_capacity();
                }
                Ok(None)
            }
            Some((message, used)) => {
                self.start += used;
                Ok(Some(message))
            }
        }
    }

    /// The number of buffered bytes not yet decoded.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len() - self.start
    }

    /// At end of stream: an error if a partial frame remains.
    pub fn finish(&self) -> Result<(), FrameError> {
        let remaining = self.buffered_bytes();
        if remaining == 0 {
            return Ok(());
        }
        let expected = self.buffer[self.start..]
            .get(..FRAME_HEADER_BYTES)
            .map(|h| FRAME_HEADER_BYTES + u32::from_le_bytes(h.try_into().expect("four bytes")) as usize)
            .unwrap_or(FRAME_HEADER_BYTES);
        Err(FrameError::Truncated { expected, got: remaining })
    }
}

/// Writes one frame to a blocking stream.
pub fn write_frame<W: Write, M: Serialize>(
    writer: &mut W,
    message: &M,
    max_frame_bytes: usize,
) -> Result<(), FrameError> {
    let mut buf = Vec::new();
    encode_frame(message, max_frame_bytes, &mut buf)?;
    writer.write_all(&buf)?;
    Ok(())
}

/// Reads one frame from a blocking stream. [`FrameError::Closed`] at a clean end of stream between frames.
///
/// # Examples
/// ```
/// use protocol::frame::{FrameError, read_frame, write_frame};
/// let mut wire = Vec::new();
/// write_frame(&mut wire, &"hi".to_string(), 64).unwrap();
/// let mut reader = &wire[..];
/// assert_eq!(read_frame::<_, String>(&mut reader, 64).unwrap(), "hi");
/// assert!(matches!(read_frame::<_, String>(&mut reader, 64), Err(FrameError::Closed)));
/// let mut cut = &wire[..5];
/// assert!(matches!(read_frame::<_, String>(&mut cut, 64), Err(FrameError::Truncated { .. })));
/// ```
pub fn read_frame<R: Read, M: DeserializeOwned>(
    reader: &mut R,
    max_frame_bytes: usize,
) -> Result<M, FrameError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    let got = read_full(reader, &mut header)?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    if got < FRAME_HEADER_BYTES {
        return Err(FrameError::Truncated { expected: FRAME_HEADER_BYTES, got });
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > max_frame_bytes {
        return Err(FrameError::TooLarge { len, max: max_frame_bytes });
    }
    let mut payload = vec![0u8; len];
    let got = read_full(reader, &mut payload)?;
    if got < len {
        return Err(FrameError::Truncated {
            expected: FRAME_HEADER_BYTES + len,
            got: FRAME_HEADER_BYTES + got,
        });
    }
    decode_payload(&payload)
}

fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// Our [`PROTOCOL_VERSION`].
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// The peer answered a different nonce (a stale or crossed connection).
    #[error("handshake nonce mismatch: sent {sent}, got {got}")]
    NonceMismatch {
        /// The nonce we sent.
        sent: u64,
        /// The nonce we got back.
        got: u64,
    },
    /// The peer refused us.
    #[error("refused by peer (version {version}): {reason}")]
    Refused {
        /// The peer's version.
        version: u32,
        /// Its reason.
        reason: String,
    },
    /// The peer sent something other than a handshake answer.
    #[error("expected a handshake answer, got {0}")]
    Unexpected(String),
}

/// Checks a peer's protocol version against ours.
///
/// # Examples
/// ```
/// use protocol::PROTOCOL_VERSION;
/// use protocol::frame::{HandshakeError, check_version};
/// assert!(check_version(PROTOCOL_VERSION).is_ok());
/// assert_eq!(
///     check_version(PROTOCOL_VERSION + 1),
///     Err(HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: PROTOCOL_VERSION + 1 })
/// );
/// ```
pub fn check_version(theirs: u32) -> Result<(), HandshakeError> {
    if theirs == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs })
    }
}

/// Checks the answer to our `Hello { version, nonce }`.
///
/// # Examples
/// ```
/// use protocol::{ComputeResponse, PROTOCOL_VERSION};
/// use protocol::frame::{HandshakeError, check_hello_answer};
/// let ok: ComputeResponse = ComputeResponse::Hello { version: PROTOCOL_VERSION, nonce: 7 };
/// assert!(check_hello_answer(&ok, 7).is_ok());
/// assert_eq!(check_hello_answer(&ok, 8), Err(HandshakeError::NonceMismatch { sent: 8, got: 7 }));
/// let refused: ComputeResponse = ComputeResponse::HelloRefused { version: 9, reason: "old".into() };
/// assert!(matches!(check_hello_answer(&refused, 7), Err(HandshakeError::Refused { version: 9, .. })));
/// ```
pub fn check_hello_answer<T>(answer: &crate::ComputeResponse<T>, nonce: u64) -> Result<(), HandshakeError> {
    match answer {
        crate::ComputeResponse::Hello { version, nonce: got } => {
            check_version(*version)?;
            if *got != nonce {
                return Err(HandshakeError::NonceMismatch { sent: nonce, got: *got });
            }
            Ok(())
        }
        crate::ComputeResponse::HelloRefused { version, reason } => {
            Err(HandshakeError::Refused { version: *version, reason: reason.clone() })
        }
        other => Err(HandshakeError::Unexpected(other.name().to_string())),
    }
}
