//! Integration tests of the protocol crate: message round trips, decoding of hostile bytes, framing limits,
//! the handshake, and `validate` against generated valid and broken dataflows.

mod frames;
mod sqlite;
mod validate;
