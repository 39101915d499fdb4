//! The controller's link to one replica of a compute instance, i.e. to all of that replica's processes.
//!
//! **What this is.** Everything that makes an unreliable replica look reliable to the controller:
//!
//! - [`CommandHistory`]: the compacted record of every command sent, replayed after each (re)connect so the
//!   replica rebuilds exactly the live state (rehydration);
//! - [`HydrationGate`]: sequential hydration, holding back `Schedule`s so at most N dataflows hydrate at
//!   once, correct for multi-export dataflows, drops, runtime limit changes and reconnects;
//! - [`ResponseMerger`]: one answer from the answers of several processes;
//! - [`ReplicaCore`]: the synchronous state machine tying them together with the connection lifecycle
//!   (handshake, replay, backoff, status);
//! - [`ReplicaClient`]: the thin tokio shell that gives the core real sockets.
//!
//! **What this is not.** It knows nothing of instances, collections' read holds or storage: the controller
//! decides what to send; this crate makes sure it arrives, survives reconnects, and comes back merged.
//!
//! **Invariants.** The cores never read a clock or draw random numbers (time and jitter are inputs), so the
//! simulator drives them deterministically. The history's replay is O(live dataflows + pending peeks). Every
//! peek given to a core is answered exactly once. No more than the hydration limit of dataflows is released
//! to hydrate at once.
//!
//! **Tests.** Unit tests next to each module; `tests/it/` has the property test of history compaction
//! against a model replica, randomized hydration-gate checks, multi-process merging, and socket tests
//! against fake replica processes (restart, version mismatch, garbage).

mod client;
mod core;
mod history;
mod hydration;
mod merge;

pub use client::{
    COMMAND_HEADROOM_BYTES, ClientGone, CommandTooLarge, ReplicaClient, ReplicaClientConfig, ReplicaEvent,
    SendError, check_command_size,
};
pub use core::{Backoff, ReplicaCore, ReplicaCoreConfig, ReplicaOutput, ReplicaStatus};
pub use history::{CommandHistory, HistoryError};
pub use hydration::{HydrationGate, HydrationState};
pub use merge::{MergeError, ResponseMerger};
