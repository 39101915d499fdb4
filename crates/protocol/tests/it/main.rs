//! Integration tests of the protocol crate: message round trips, decoding of hostile bytes, framing limits,
//! the handshake, `validate` against generated valid and broken dataflows, and the reference interpreter
//! against SQLite on random plans, tables and updates (`sqlite`).

mod frames;
mod reference;
mod sqlite;
mod validate;
