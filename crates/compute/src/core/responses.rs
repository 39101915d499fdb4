//! Responses: how the core's responses reach the active controller connection, and what becomes of one
//! that cannot.
//!
//! **What this is.** The core encodes every response itself ([`Core::send`]) and queues the frame on the
//! connection task's [`Outbox`]. A response that does not fit a frame gets its stand-in
//! ([`fit_response`]: a peek's rows become `ResultTooLarge`, a subscribe batch the error batch that ends
//! the subscribe, an error message is cut) or, having none, closes the connection; a connection with more
//! than `max_queued_bytes` not yet written is dropped (its controller does not read). Also the refusals:
//! `CommandRejected` (with or without closing the connection) and `Fenced` for a controller that may not
//! take over.
//!
//! **What this is not.** No socket code: the connection task (`connection.rs`) writes the frames and
//! counts down what it wrote.
//!
//! **Invariants.** No response is skipped silently: it is sent, replaced by its stand-in, or the
//! connection closes (logged at ERROR, an internal error the controller recovers from by reconnecting).
//! The bytes queued for a connection are bounded by `max_queued_bytes` plus one frame.
//!
//! **Tests.** The stand-ins in `mod tests`; through the socket in `tests/it/limits.rs` (responses over the
//! frame limit, a controller that does not read).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use frontiers::Antichain;
use protocol::frame::FrameError;
use protocol::{
    ComputeResponse, ControllerEpoch, CopyToResponse, PeekResponse, SubscribeBatch, SubscribeResponse,
};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;
use tracing::{error, warn};
use transport::Frame;

use super::Core;

/// What the core sends a connection task.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A response, encoded (the core encodes, so that it decides what becomes of a response that does
    /// not fit a frame; see [`Core::send`]).
    Frame(Frame),
    /// Close the connection after writing what came before.
    Close,
}

/// The sending side of a connection's queue of [`Outgoing`] frames, with the count of bytes queued and not
/// yet written (the connection task subtracts what it wrote), and a switch that drops the connection at
/// once, without writing what is queued.
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    tx: UnboundedSender<Outgoing>,
    queued_bytes: Arc<AtomicUsize>,
    abort: Arc<watch::Sender<bool>>,
}

impl Outbox {
    /// An outbox for `tx`, the connection task's byte counter and its abort switch.
    pub fn new(
        tx: UnboundedSender<Outgoing>,
        queued_bytes: Arc<AtomicUsize>,
        abort: watch::Sender<bool>,
    ) -> Self {
        Outbox { tx, queued_bytes, abort: Arc::new(abort) }
    }

    /// Closes the connection after what is queued is written.
    pub(super) fn close(&self) {
        let _ = self.tx.send(Outgoing::Close);
    }

    /// Drops the connection now (a write waiting for the peer is abandoned).
    fn abort(&self) {
        self.abort.send_replace(true);
    }
}

/// Answers a connection whose controller may not take over with `Fenced`, and closes it.
pub(super) fn refuse_fenced(out: &Outbox, current: ControllerEpoch, max_frame_bytes: usize) {
    let fenced: ComputeResponse = ComputeResponse::Fenced { current };
    let frame = Frame::encode(&fenced, max_frame_bytes).expect("a Fenced answer fits any frame limit");
    out.queued_bytes.fetch_add(frame.len(), Ordering::AcqRel);
    let _ = out.tx.send(Outgoing::Frame(frame));
    out.close();
}

/// Error messages in responses that would not fit a frame are cut to this many bytes.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

impl Core {
    /// Encodes `response` and queues it on the active connection (if any).
    ///
    /// **A response that does not fit a frame** is never skipped:
    /// - a peek's rows become `PeekResponse::ResultTooLarge` (with the encoded size and the frame limit);
    /// - a subscribe batch ends the subscribe: an error batch from the batch's lower with the empty upper,
    ///   the way a subscribe whose dataflow errs ends, so its consumer sees the error at the first time
    ///   range it misses (nothing after it is sent);
    /// - an error message (of a peek, a copy-to or a rejected command) is cut to [`MAX_MESSAGE_BYTES`];
    /// - anything else is an internal error: logged, and the connection is closed, so the controller
    ///   reconnects and rehydrates.
    ///
    /// A connection with more than `max_queued_bytes` not yet written is closed the same way.
    pub(super) fn send(&mut self, response: ComputeResponse) {
        if self.active.is_none() {
            return;
        }
        let frame = match Frame::encode(&response, self.limits.max_frame_bytes) {
            Ok(frame) => frame,
            Err(FrameError::TooLarge { len, max }) => {
                let name = response.name();
                let Some(substitute) = fit_response(response, len, max) else {
                    let reason = format!("a {name} response of {len} bytes is over the frame limit of {max}");
                    return self.close_unsendable(name, &reason);
                };
                if let ComputeResponse::SubscribeResponse { id, .. } = &substitute {
                    // The error batch ends the subscribe: nothing more is sent for it.
                    let collection = self.collections.get_mut(id);
                    assert!(collection.is_some(), "subscribe {id} sends a batch while it exists");
                    if let Some(collection) = collection {
                        collection.sink.done = true;
                    }
                    warn!(%id, size_bytes = len, max_bytes = max, "a subscribe batch is over the frame limit; the subscribe ends");
                }
                match Frame::encode(&substitute, self.limits.max_frame_bytes) {
                    Ok(frame) => frame,
                    Err(error) => return self.close_unsendable(substitute.name(), &error.to_string()),
                }
            }
            Err(error) => return self.close_unsendable(response.name(), &error.to_string()),
        };
        let conn = self.active.as_ref().expect("checked above");
        let queued = conn.out.queued_bytes.fetch_add(frame.len(), Ordering::AcqRel) + frame.len();
        if queued > self.limits.max_queued_bytes {
            warn!(
                conn = conn.id,
                queued,
                max = self.limits.max_queued_bytes,
                "the controller does not read its responses; dropping the connection"
            );
            conn.out.abort();
            self.active = None;
            return;
        }
        let _ = conn.out.tx.send(Outgoing::Frame(frame));
    }

    /// Closes the active connection because a response cannot be sent: an internal error (the controller
    /// reconnects and rehydrates).
    fn close_unsendable(&mut self, response: &str, reason: &str) {
        error!(response, %reason, "a response cannot be sent; dropping the connection");
        if let Some(conn) = self.active.take() {
            conn.out.abort();
        }
    }

    pub(super) fn close_active(&mut self) {
        if let Some(conn) = self.active.take() {
            conn.out.close();
        }
    }

    pub(super) fn reject_and_close(&mut self, command: &str, reason: String) {
        warn!(command, %reason, "rejecting command and closing the connection");
        self.send(ComputeResponse::CommandRejected { command: command.to_string(), reason });
        self.close_active();
    }

    pub(super) fn reject(&mut self, command: &str, reason: String) {
        warn!(command, %reason, "rejecting command");
        self.send(ComputeResponse::CommandRejected { command: command.to_string(), reason });
    }
}

/// The stand-in for a response of `len` bytes over the frame limit `max`, if it has one (see
/// [`Core::send`]): a peek's rows become `ResultTooLarge`; a subscribe batch becomes the error batch that
/// ends the subscribe (the caller marks the subscribe done); error messages are cut to
/// [`MAX_MESSAGE_BYTES`] (or half the frame, if less). Anything else has none.
fn fit_response(response: ComputeResponse, len: usize, max: usize) -> Option<ComputeResponse> {
    let limit = MAX_MESSAGE_BYTES.min(max / 2);
    let cut = |message: String| {
        if message.len() <= limit {
            return message;
        }
        let note = format!(" [cut from {} bytes]", message.len());
        let mut end = limit.saturating_sub(note.len());
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let mut cut = message;
        cut.truncate(end);
        cut + &note
    };
    let substitute = match response {
        ComputeResponse::PeekResponse { uuid, response: PeekResponse::Error(message) } => {
            ComputeResponse::PeekResponse { uuid, response: PeekResponse::Error(cut(message)) }
        }
        ComputeResponse::PeekResponse { uuid, response: PeekResponse::Rows(_) } => {
            let response = PeekResponse::ResultTooLarge { size_bytes: len as u64, max_bytes: max as u64 };
            ComputeResponse::PeekResponse { uuid, response }
        }
        ComputeResponse::SubscribeResponse { id, response: SubscribeResponse::Batch(batch) } => {
            let updates = Err(format!(
                "the subscribe's changes in [{:?}, {:?}) are {len} bytes, over the frame limit of {max} bytes: \
                 the subscribe ends here",
                batch.lower.elements(),
                batch.upper.elements()
            ));
            let batch = SubscribeBatch { lower: batch.lower, upper: Antichain::new(), updates };
            ComputeResponse::SubscribeResponse { id, response: SubscribeResponse::Batch(batch) }
        }
        ComputeResponse::CopyToResponse { id, response: CopyToResponse::Error(message) } => {
            ComputeResponse::CopyToResponse { id, response: CopyToResponse::Error(cut(message)) }
        }
        ComputeResponse::CommandRejected { command, reason } => {
            ComputeResponse::CommandRejected { command: cut(command), reason: cut(reason) }
        }
        _ => return None,
    };
    Some(substitute)
}

#[cfg(test)]
mod tests {
    use frontiers::Antichain;
    use protocol::{Datum, GlobalId, Row};

    use super::{MAX_MESSAGE_BYTES, fit_response};

    #[test]
    fn a_response_over_the_frame_limit_gets_its_stand_in_or_none() {
        use std::num::NonZeroU64;

        use protocol::{
            ComputeResponse, CopyToResponse, FrontiersResponse, PeekId, PeekResponse, StatusResponse,
            SubscribeBatch, SubscribeResponse,
        };

        let (len, max) = (1 << 20, 1 << 16);
        let uuid = PeekId(7);
        let id = GlobalId::User(3);
        let long = "é".repeat(200_000);
        let row = Row::pack([Datum::Int64(1)]);
        let rows = PeekResponse::Rows(vec![(row.clone(), NonZeroU64::new(1).expect("one"))]);
        let batch = SubscribeBatch {
            lower: Antichain::from_elem(5),
            upper: Antichain::from_elem(9),
            updates: Ok(vec![(5, row, 1)]),
        };
        let fitted = |response| fit_response(response, len, max);

        let peek = fitted(ComputeResponse::PeekResponse { uuid, response: rows });
        let too_large = PeekResponse::ResultTooLarge { size_bytes: len as u64, max_bytes: max as u64 };
        assert_eq!(peek, Some(ComputeResponse::PeekResponse { uuid, response: too_large }));

        match fitted(ComputeResponse::SubscribeResponse { id, response: SubscribeResponse::Batch(batch) }) {
            Some(ComputeResponse::SubscribeResponse { id: got, response: SubscribeResponse::Batch(b) }) => {
                assert_eq!(got, id);
                assert_eq!(b.lower, Antichain::from_elem(5), "the error starts where the batch started");
                assert!(b.upper.is_empty(), "the error batch ends the subscribe");
                assert!(b.updates.expect_err("an error").contains("over the frame limit"));
            }
            other => panic!("expected an error batch, got {other:?}"),
        }

        let cut_ok = |message: &str| {
            message.len() <= MAX_MESSAGE_BYTES.min(max / 2)
                && message.ends_with(&format!("[cut from {} bytes]", long.len()))
        };
        match fitted(ComputeResponse::PeekResponse { uuid, response: PeekResponse::Error(long.clone()) }) {
            Some(ComputeResponse::PeekResponse { response: PeekResponse::Error(message), .. }) => {
                assert!(cut_ok(&message), "{} bytes", message.len())
            }
            other => panic!("expected a cut error, got {other:?}"),
        }
        match fitted(ComputeResponse::CopyToResponse { id, response: CopyToResponse::Error(long.clone()) }) {
            Some(ComputeResponse::CopyToResponse { response: CopyToResponse::Error(message), .. }) => {
                assert!(cut_ok(&message))
            }
            other => panic!("expected a cut error, got {other:?}"),
        }
        match fitted(ComputeResponse::CommandRejected { command: "Peek".into(), reason: long.clone() }) {
            Some(ComputeResponse::CommandRejected { command, reason }) => {
                assert_eq!(command, "Peek", "a short field is kept whole");
                assert!(cut_ok(&reason));
            }
            other => panic!("expected a cut rejection, got {other:?}"),
        }

        // No stand-in: the connection closes.
        for response in [
            ComputeResponse::Frontiers { id, frontiers: FrontiersResponse::default() },
            ComputeResponse::Status(StatusResponse::Hydration { id, hydrated: true }),
            ComputeResponse::SubscribeResponse {
                id,
                response: SubscribeResponse::DroppedAt(Antichain::new()),
            },
            ComputeResponse::Hello { version: 1, nonce: 1 },
        ] {
            assert_eq!(fitted(response), None);
        }
    }
}
