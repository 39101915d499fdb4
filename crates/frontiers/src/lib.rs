//! Frontiers, read holds, read policies and as-of arithmetic: the vocabulary of the compute controller.
//!
//! **What this is.** The bottom crate of the workspace. It re-exports timely's progress types
//! ([`Antichain`], [`MutableAntichain`], [`ChangeBatch`]) and adds, on top of them, exactly what a controller
//! needs to decide how far history may be compacted:
//!
//! - [`Timestamp`]: the time type every other crate is generic over (implemented for `u64` milliseconds and,
//!   for tests of partial orders, `Product<u64, u64>`);
//! - [`antichain`]: meet and join of frontiers, stepping a frontier back, "is `t` readable given since and
//!   upper";
//! - [`ReadHold`] and [`ReadHolds`]: a read hold is a *value* that releases itself on drop; the accounting
//!   derives each collection's `since` as the meet of its outstanding holds;
//! - [`ReadPolicy`]: how far a controller's own hold trails a collection's write frontier;
//! - [`as_of`]: choosing the as-of of a new dataflow from its imports' sinces and uppers.
//!
//! **What this is not.** No I/O, no async runtime, no protocol: a service may depend on this crate alone.
//! It depends on no other crate of the workspace; outside it on timely (its `progress` and `order`
//! modules), `indexmap` and `smallvec` (the hold accounting's map and inline vectors), `serde` and
//! `thiserror`.
//!
//! **Invariants.**
//! - A collection's `since` is the meet of its outstanding holds and never regresses ([`ReadHolds`] asserts
//!   it).
//! - A [`ReadHold`] only moves forward; it is released exactly once, on drop or by [`ReadHold::release`].
//! - [`ReadPolicy::frontier`] never returns a frontier ahead of the write frontier it is given, and is
//!   monotone in it.
//!
//! **Tests.** Every public function has a doctest that states its contract. Property tests against a naive
//! model (a `BTreeMap` of holds and a brute-force meet) live next to the types they exercise
//! (`hold.rs`, `policy.rs`, `antichain.rs`) and run with `PROPTEST_CASES` cases.

#![forbid(missing_docs)]

pub mod antichain;
pub mod as_of;
mod counts;
mod hold;
mod policy;
mod timestamp;

pub use hold::{
    AcquireError, ChangeTx, CreateError, DowngradeError, IdBuildHasher, IdHasher, MergeError, ReadHold,
    ReadHolds, SinceChange,
};
pub use policy::ReadPolicy;
pub use timely::order::{PartialOrder, Product, TotalOrder};
pub use timely::progress::frontier::{AntichainRef, MutableAntichain};
pub use timely::progress::{Antichain, ChangeBatch};
pub use timestamp::Timestamp;
