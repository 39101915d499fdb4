//! The storage wire protocol: [`StorageRequest`] (client to server) and [`StorageResponse`] (server to
//! client), carried in `protocol::frame` frames (length-prefixed bincode with a maximum size).
//!
//! **Conversation.** The client opens with `Hello { version }`; the server answers `Hello` or
//! `HelloRefused` (and closes). Then every request that carries a `request` number is answered by exactly
//! one `Reply` with that number, in any order (requests run concurrently on the server). Requests without a
//! number (`HoldChanges`, `ListenDrop`, `WatchDrop`) are not answered.
//!
//! **Read holds.** `AcquireReadHold` registers one hold of the connection at `frontier` (answered with the
//! frontier); from then on the client reports every change to its holds on that collection with
//! `HoldChanges`, exactly the `ChangeBatch`es its `ReadHold` values emit (`+1` at a new frontier, `-1` at an
//! old one). The server keeps, per collection, the multiset of the connection's hold frontiers; a change
//! that would make a count negative, or move the connection's hold backwards, is a protocol violation and
//! closes the connection. When the connection closes, all its holds are released.
//!
//! **Listens and watches** are pulled: `ListenNext` is answered when the listen has at least one event,
//! with every event ready at that moment (up to a size budget). The client sends the next `ListenNext` only
//! when it has consumed the previous answer, so neither side buffers more than one answer per listen.
//! Listen and watch numbers are chosen by the client and must be fresh for the connection.
//!
//! **Too large.** A request over the frame limit is refused by the client before it is sent, with the
//! operation's `TooLarge` error; a reply over it is replaced by the same kind of reply carrying
//! [`ReadError::TooLarge`] ([`Reply::too_large`]); anything else that does not fit closes the connection.
//!
//! **What this is not:** the transport ([`crate::Server`], [`crate::Client`]).
//!
//! **Tests.** `tests/it/server.rs` speaks this protocol through `Client`, and also sends garbage.

use frontiers::{Antichain, ReadPolicy};
use protocol::{Diff, GlobalId, RelationDesc, Row};
use serde::{Deserialize, Serialize};

use crate::api::{AppendRequest, CollectionFrontiers, ListenEvent};
use crate::error::{AppendError, CreateError, DropError, HoldError, ReadError};

/// The version of this protocol; a server refuses clients that speak another.
pub const STORAGE_PROTOCOL_VERSION: u32 = 2;

/// The largest frame either side sends or accepts.
pub const MAX_FRAME_BYTES: usize = protocol::frame::DEFAULT_MAX_FRAME_BYTES;

/// A message from a client. See the module documentation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StorageRequest {
    /// The first message of a connection.
    Hello {
        /// [`STORAGE_PROTOCOL_VERSION`].
        version: u32,
    },
    /// `create_collection`.
    CreateCollection {
        /// The request number.
        request: u64,
        /// The collection.
        id: GlobalId,
        /// Its schema.
        desc: RelationDesc,
    },
    /// `drop_collection`.
    DropCollection {
        /// The request number.
        request: u64,
        /// The collection.
        id: GlobalId,
    },
    /// `list_collections`.
    ListCollections {
        /// The request number.
        request: u64,
    },
    /// `frontiers`.
    Frontiers {
        /// The request number.
        request: u64,
        /// The collection.
        id: GlobalId,
    },
    /// `append`.
    Append {
        /// The request number.
        request: u64,
        /// The atomic append.
        requests: Vec<AppendRequest>,
    },
    /// `acquire_read_hold`: registers one hold of this connection.
    AcquireReadHold {
        /// The request number.
        request: u64,
        /// The collection.
        id: GlobalId,
        /// Where to hold it.
        frontier: Antichain<u64>,
    },
    /// Changes to this connection's holds on a collection (not answered).
    HoldChanges {
        /// The collection.
        id: GlobalId,
        /// `(time, delta)` pairs, as a `ReadHold` emits them.
        changes: Vec<(u64, i64)>,
    },
    /// `set_read_policy`.
    SetReadPolicy {
        /// The request number.
        request: u64,
        /// The collection.
        id: GlobalId,
        /// The policy.
        policy: ReadPolicy<u64>,
    },
    /// `snapshot`.
    Snapshot {
        /// The request number.
        request: u64,
        /// The collection.
        id: GlobalId,
        /// The time.
        as_of: u64,
    },
    /// `listen`: starts listen number `listen`.
    Listen {
        /// The request number.
        request: u64,
        /// The client's number for this listen.
        listen: u64,
        /// The collection.
        id: GlobalId,
        /// The time.
        as_of: u64,
        /// Resume a listen whose consumer has everything before `as_of`: no snapshot, the updates at
        /// times at or beyond `as_of` (a client's listen after a reconnect).
        resume: bool,
    },
    /// The next events of a listen.
    ListenNext {
        /// The request number.
        request: u64,
        /// The listen.
        listen: u64,
    },
    /// Ends a listen (not answered).
    ListenDrop {
        /// The listen.
        listen: u64,
    },
    /// `watch_frontiers`: starts watch number `watch`.
    WatchFrontiers {
        /// The request number.
        request: u64,
        /// The client's number for this watch.
        watch: u64,
    },
    /// The next changes of a watch.
    WatchNext {
        /// The request number.
        request: u64,
        /// The watch.
        watch: u64,
    },
    /// Ends a watch (not answered).
    WatchDrop {
        /// The watch.
        watch: u64,
    },
}

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StorageResponse {
    /// The handshake succeeded.
    Hello {
        /// [`STORAGE_PROTOCOL_VERSION`].
        version: u32,
    },
    /// The handshake failed; the server closes the connection.
    HelloRefused {
        /// The server's version.
        version: u32,
        /// Why.
        reason: String,
    },
    /// The answer to request number `request`.
    Reply {
        /// The request number.
        request: u64,
        /// The answer.
        reply: Reply,
    },
}

/// The answer to one request; the variant matches the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// To `CreateCollection`.
    Created(Result<(), CreateError>),
    /// To `DropCollection`.
    Dropped(Result<(), DropError>),
    /// To `ListCollections`.
    Collections(Result<Vec<(GlobalId, RelationDesc)>, ReadError>),
    /// To `Frontiers`.
    Frontiers(Result<CollectionFrontiers, ReadError>),
    /// To `Append`.
    Appended(Result<(), AppendError>),
    /// To `AcquireReadHold`: the frontier now held.
    HoldAcquired(Result<Antichain<u64>, HoldError>),
    /// To `SetReadPolicy`.
    PolicySet(Result<(), HoldError>),
    /// To `Snapshot`.
    Snapshot(Result<Vec<(Row, Diff)>, ReadError>),
    /// To `Listen`.
    Listening(Result<(), ReadError>),
    /// To `ListenNext`: at least one event, or the listen's final error.
    ListenEvents(Result<Vec<ListenEvent>, ReadError>),
    /// To `WatchFrontiers`.
    Watching(Result<(), ReadError>),
    /// To `WatchNext`: at least one change, or the watch's final error.
    WatchEvents(Result<Vec<(GlobalId, Option<CollectionFrontiers>)>, ReadError>),
}

impl Reply {
    /// The stand-in for this reply when it is `bytes` long, over the frame limit `max_bytes`: the same kind
    /// of reply with [`ReadError::TooLarge`], for the replies whose size the data decides (a snapshot, a
    /// listen's or a watch's events, the list of collections). `None` for the others, which are small
    /// (the server closes the connection if one ever does not fit).
    pub fn too_large(&self, bytes: u64, max_bytes: u64) -> Option<Reply> {
        let error = ReadError::TooLarge { bytes, max_bytes };
        match self {
            Reply::Snapshot(Ok(_)) => Some(Reply::Snapshot(Err(error))),
            Reply::ListenEvents(Ok(_)) => Some(Reply::ListenEvents(Err(error))),
            Reply::WatchEvents(Ok(_)) => Some(Reply::WatchEvents(Err(error))),
            Reply::Collections(Ok(_)) => Some(Reply::Collections(Err(error))),
            _ => None,
        }
    }
}

fn check_frontier(what: &str, frontier: &Antichain<u64>) -> Result<(), String> {
    if frontiers::antichain::is_antichain(frontier.elements()) {
        Ok(())
    } else {
        Err(format!("{what} {frontier:?} is not an antichain"))
    }
}

fn check_policy(policy: &ReadPolicy<u64>) -> Result<(), String> {
    match policy {
        ReadPolicy::ValidFrom(frontier) => check_frontier("policy frontier", frontier),
        ReadPolicy::Multiple(policies) => policies.iter().try_for_each(check_policy),
        ReadPolicy::LagWriteFrontier { .. } | ReadPolicy::NoPolicy => Ok(()),
    }
}

impl StorageRequest {
    /// Checks what bincode cannot: every frontier received is an antichain (timely's deserialisation
    /// accepts any list). A request that fails is a protocol violation.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            StorageRequest::Append { requests, .. } => requests.iter().try_for_each(|r| {
                check_frontier("expected upper", &r.expected_upper)?;
                check_frontier("new upper", &r.new_upper)
            }),
            StorageRequest::AcquireReadHold { frontier, .. } => check_frontier("hold frontier", frontier),
            StorageRequest::SetReadPolicy { policy, .. } => check_policy(policy),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_with_frontiers_that_are_not_antichains_are_rejected() {
        let bad: Antichain<u64> = bincode::deserialize(&bincode::serialize(&vec![1u64, 2]).unwrap()).unwrap();
        assert_eq!(bad.elements(), &[1, 2]);
        let cases = vec![
            (
                StorageRequest::AcquireReadHold { request: 0, id: GlobalId::User(1), frontier: bad.clone() },
                false,
            ),
            (
                StorageRequest::AcquireReadHold {
                    request: 0,
                    id: GlobalId::User(1),
                    frontier: Antichain::new(),
                },
                true,
            ),
            (
                StorageRequest::SetReadPolicy {
                    request: 0,
                    id: GlobalId::User(1),
                    policy: ReadPolicy::Multiple(vec![ReadPolicy::ValidFrom(bad.clone())]),
                },
                false,
            ),
            (
                StorageRequest::Append {
                    request: 0,
                    requests: vec![AppendRequest {
                        id: GlobalId::User(1),
                        updates: vec![],
                        expected_upper: Antichain::from_elem(0),
                        new_upper: bad,
                    }],
                },
                false,
            ),
        ];
        for (request, ok) in cases {
            assert_eq!(request.validate().is_ok(), ok, "{request:?}");
        }
    }
}
