//! Integration tests of the replica client: history compaction against a model replica, sequential
//! hydration under random events, multi-process merging, the core's connection lifecycle, and the tokio
//! client against fake replica processes over real sockets.

mod core;
mod history;
mod hydration;
mod model;
mod sockets;
