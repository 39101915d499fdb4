//! [`HoldSession`]: a client's read holds on a store, kept across reconnects.
//!
//! **What this is.** The synchronous bookkeeping between the read holds a client hands out and the holds
//! it has registered upstream (on the server, over the current connection). Per collection the session
//! keeps the counts of every outstanding client hold's frontier and **one** upstream hold at their meet:
//! client holds move freely, and the upstream hold follows their meet (so the wire carries a change only
//! when the meet moves). When the connection is lost the upstream holds die with it (the server releases a
//! closed connection's holds) while the client holds live on; after a reconnect the session lists what to
//! re-register ([`HoldSession::to_restore`]) and takes the new upstream holds back
//! ([`HoldSession::restore`]). The network [`crate::Client`] uses it, and the simulator uses it in front of
//! a [`crate::core::Store`] that it restarts, so both run the same code.
//!
//! **What this is not.** No I/O: the caller acquires the upstream holds (over whatever connection) and
//! hands them in. It does not decide when to reconnect.
//!
//! **Invariants.** Each collection's upstream hold, when present, is at the meet of the client holds'
//! frontiers (or absent when they are all released). A client hold is never backed by an upstream hold
//! of an older connection ([`HoldSession::disconnect`] bumps the generation; handing in a hold of an
//! older generation is refused). A collection whose re-registration failed (the store's since passed the
//! client holds while the client was away, see [`crate::core::Store::hold_for_recovery`]) is **lost**: its
//! client holds hold nothing any more, which is counted and logged, never hidden.
//!
//! **Tests.** Unit tests at the bottom; across a real server restart in `tests/it/server.rs`; under
//! restarts in the simulator (`crates/sim`).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use frontiers::{Antichain, ChangeBatch, MutableAntichain, ReadHold};
use protocol::GlobalId;

use crate::api::StorageReadHold;
use crate::error::HoldError;

/// One collection's holds in a session.
struct Entry {
    /// The frontiers of the client holds, with counts.
    counts: MutableAntichain<u64>,
    /// The hold registered upstream over the current connection, at `counts`' frontier. `None` while
    /// disconnected, after the connection changed and before it is restored, or when lost.
    upstream: Option<StorageReadHold>,
    /// Which client holds count here: those wrapped since the entry was made or last lost.
    incarnation: u64,
}

impl Entry {
    /// Takes `upstream` as the upstream hold unless the one held is already at or before it.
    fn offer(&mut self, upstream: StorageReadHold) {
        match &self.upstream {
            Some(held) if frontiers::PartialOrder::less_equal(held.since(), upstream.since()) => {
                drop(upstream)
            }
            _ => self.upstream = Some(upstream),
        }
        self.follow();
    }

    /// Moves the upstream hold to the client holds' meet (releasing it when they are all gone).
    fn follow(&mut self) {
        let frontier = self.counts.frontier().to_owned();
        let Some(upstream) = &mut self.upstream else { return };
        if frontier.is_empty() {
            upstream.release();
            self.upstream = None;
        } else if frontier != *upstream.since() {
            upstream
                .try_downgrade(frontier)
                .unwrap_or_else(|error| panic!("client holds only move forward: {error}"));
        }
    }
}

struct State {
    entries: BTreeMap<GlobalId, Entry>,
    /// The client holds of lost incarnations, which hold nothing: counted only until they are dropped.
    lost_holds: BTreeMap<(GlobalId, u64), MutableAntichain<u64>>,
    next_incarnation: u64,
    /// Bumped by every [`HoldSession::disconnect`].
    generation: u64,
    /// Collections whose re-registration failed, in total.
    lost: u64,
}

/// A client's read holds across reconnects. Cloning shares the session. See the module documentation.
#[derive(Clone)]
pub struct HoldSession {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for HoldSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("HoldSession")
            .field("collections", &state.entries.len())
            .field("generation", &state.generation)
            .field("lost", &state.lost)
            .finish()
    }
}

impl Default for HoldSession {
    fn default() -> Self {
        Self::new()
    }
}

impl HoldSession {
    /// A session with no holds, at generation 0.
    pub fn new() -> Self {
        let state = State {
            entries: BTreeMap::new(),
            lost_holds: BTreeMap::new(),
            next_incarnation: 0,
            generation: 0,
            lost: 0,
        };
        HoldSession { state: Arc::new(Mutex::new(state)) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("the hold session lock is poisoned: a panic broke an invariant")
    }

    /// The current generation (the connection holds are registered over).
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Turns `upstream`, just acquired over the connection of `generation`, into a client hold at the same
    /// frontier. `keepalive` lives as long as the client hold (the client passes its connection handle).
    /// Fails with [`HoldError::Disconnected`] if the connection changed since (the server released
    /// `upstream` with it).
    pub fn wrap(
        &self,
        upstream: StorageReadHold,
        generation: u64,
        keepalive: Option<Arc<dyn std::any::Any + Send + Sync>>,
    ) -> Result<StorageReadHold, HoldError> {
        let id = *upstream.id();
        let frontier = upstream.since().clone();
        if frontier.is_empty() {
            return Err(HoldError::BeforeSince { id, since: Antichain::new(), requested: frontier });
        }
        let mut state = self.lock();
        if state.generation != generation {
            return Err(HoldError::Disconnected);
        }
        let state = &mut *state;
        let entry = state.entries.entry(id).or_insert_with(|| {
            state.next_incarnation += 1;
            Entry { counts: MutableAntichain::new(), upstream: None, incarnation: state.next_incarnation }
        });
        entry.counts.update_iter(frontier.iter().map(|t| (*t, 1)));
        let incarnation = entry.incarnation;
        entry.offer(upstream);
        let session = Arc::downgrade(&self.state);
        let tx: frontiers::ChangeTx<GlobalId, u64> =
            Arc::new(move |id: &GlobalId, changes: ChangeBatch<u64>| {
                let _keepalive = &keepalive;
                let Some(state) = session.upgrade() else { return };
                let mut state = state.lock().expect("the hold session lock is poisoned");
                match state.entries.get_mut(id) {
                    Some(entry) if entry.incarnation == incarnation => {
                        entry.counts.update_iter(changes.into_inner());
                        entry.follow();
                        if entry.counts.is_empty() {
                            state.entries.remove(id);
                        }
                    }
                    _ => {
                        let key = (*id, incarnation);
                        let Some(lost) = state.lost_holds.get_mut(&key) else {
                            panic!("a client hold on {id} outlived its session entry")
                        };
                        lost.update_iter(changes.into_inner());
                        if lost.is_empty() {
                            state.lost_holds.remove(&key);
                        }
                    }
                }
            });
        Ok(ReadHold::new(id, frontier, tx))
    }

    /// The connection is gone: forget every upstream hold (the server released them) and start the next
    /// generation. Returns the new generation.
    pub fn disconnect(&self) -> u64 {
        let mut state = self.lock();
        state.generation += 1;
        for entry in state.entries.values_mut() {
            // Releasing into a dead connection is harmless; the server already let go.
            entry.upstream = None;
        }
        state.generation
    }

    /// What to re-register over the connection of the current generation: each collection that has client
    /// holds but no upstream hold, with the client holds' meet.
    pub fn to_restore(&self) -> Vec<(GlobalId, Antichain<u64>)> {
        let state = self.lock();
        state
            .entries
            .iter()
            .filter(|(_, entry)| entry.upstream.is_none() && !entry.counts.is_empty())
            .map(|(id, entry)| (*id, entry.counts.frontier().to_owned()))
            .collect()
    }

    /// Takes back a re-registered upstream hold (acquired at what [`to_restore`](Self::to_restore) listed)
    /// over the connection of `generation`, and moves it to where the client holds are now. A hold of an
    /// older generation, or on a collection whose client holds are gone, is released.
    pub fn restore(&self, upstream: StorageReadHold, generation: u64) {
        let mut state = self.lock();
        if state.generation != generation {
            return;
        }
        let Some(entry) = state.entries.get_mut(upstream.id()) else { return };
        // Acquired at the client holds' meet as it was; the meet only advances (a client hold acquired
        // meanwhile brought its own upstream hold, and `offer` keeps the earlier of the two).
        entry.offer(upstream);
    }

    /// Re-registering the holds on `id` failed with `error`: its client holds hold nothing now.
    pub fn lose(&self, id: GlobalId, error: &HoldError) {
        let mut state = self.lock();
        if let Some(entry) = state.entries.remove(&id) {
            // The entry's client holds move to the lost ones; holds wrapped from now on start afresh.
            state.lost_holds.insert((id, entry.incarnation), entry.counts);
            state.lost += 1;
            tracing::warn!(%id, %error, "read holds lost: the store compacted past them while disconnected");
        }
    }

    /// The frontier the session's client holds on `id` ask for (empty if none).
    pub fn held(&self, id: GlobalId) -> Antichain<u64> {
        self.lock().entries.get(&id).map(|entry| entry.counts.frontier().to_owned()).unwrap_or_default()
    }

    /// The frontier registered upstream for `id` (empty if none: no client holds, disconnected, or lost).
    pub fn registered(&self, id: GlobalId) -> Antichain<u64> {
        let state = self.lock();
        state
            .entries
            .get(&id)
            .and_then(|entry| entry.upstream.as_ref())
            .map(|h| h.since().clone())
            .unwrap_or_default()
    }

    /// How many collections' holds were lost in total.
    pub fn lost(&self) -> u64 {
        self.lock().lost
    }
}

#[cfg(test)]
mod tests {
    use frontiers::ReadHolds;

    use super::*;

    fn store_hold(holds: &mut ReadHolds<GlobalId, u64>, id: GlobalId, t: u64) -> StorageReadHold {
        holds.acquire(&id, Antichain::from_elem(t)).expect("valid")
    }

    #[test]
    fn the_upstream_hold_follows_the_meet_of_the_client_holds() {
        let id = GlobalId::User(1);
        let mut upstream = ReadHolds::new();
        let mut base = upstream.create(id, Antichain::from_elem(0)).expect("fresh");
        upstream.process();
        let session = HoldSession::new();
        let mut a = session.wrap(store_hold(&mut upstream, id, 3), 0, None).expect("current");
        let b = session.wrap(store_hold(&mut upstream, id, 5), 0, None).expect("current");
        base.try_downgrade(Antichain::from_elem(10)).expect("forward");
        upstream.process();
        assert_eq!(upstream.since(&id).map(|s| s.to_owned()), Some(Antichain::from_elem(3)));
        a.try_downgrade(Antichain::from_elem(7)).expect("forward");
        upstream.process();
        assert_eq!(session.registered(id), Antichain::from_elem(5));
        assert_eq!(upstream.since(&id).map(|s| s.to_owned()), Some(Antichain::from_elem(5)));
        drop(b);
        drop(a);
        upstream.process();
        assert_eq!(upstream.since(&id).map(|s| s.to_owned()), Some(Antichain::from_elem(10)));
        assert_eq!(session.registered(id), Antichain::new());
        assert_eq!(session.held(id), Antichain::new());
    }

    #[test]
    fn holds_are_restored_after_a_disconnect_where_the_client_holds_are_by_then() {
        let id = GlobalId::User(1);
        let mut first = ReadHolds::new();
        let _base = first.create(id, Antichain::from_elem(0)).expect("fresh");
        let session = HoldSession::new();
        let mut hold = session.wrap(store_hold(&mut first, id, 4), 0, None).expect("current");
        let generation = session.disconnect();
        assert_eq!(session.registered(id), Antichain::new());
        hold.try_downgrade(Antichain::from_elem(6)).expect("forward while disconnected");
        assert_eq!(session.to_restore(), vec![(id, Antichain::from_elem(6))]);
        let mut second = ReadHolds::new();
        let mut base = second.create(id, Antichain::from_elem(2)).expect("fresh");
        // A hold granted over the old connection is refused.
        assert_eq!(
            session.wrap(store_hold(&mut second, id, 9), 0, None).err(),
            Some(HoldError::Disconnected)
        );
        session.restore(store_hold(&mut second, id, 6), generation);
        hold.try_downgrade(Antichain::from_elem(8)).expect("forward");
        base.try_downgrade(Antichain::from_elem(20)).expect("forward");
        second.process();
        assert_eq!(second.since(&id).map(|s| s.to_owned()), Some(Antichain::from_elem(8)));
        assert!(session.to_restore().is_empty());
    }

    #[test]
    fn a_lost_collection_is_counted_and_later_holds_on_it_count_afresh() {
        let id = GlobalId::User(1);
        let mut holds = ReadHolds::new();
        let _base = holds.create(id, Antichain::from_elem(0)).expect("fresh");
        let session = HoldSession::new();
        let hold = session.wrap(store_hold(&mut holds, id, 1), 0, None).expect("current");
        session.disconnect();
        let error =
            HoldError::BeforeSince { id, since: Antichain::from_elem(9), requested: Antichain::from_elem(1) };
        session.lose(id, &error);
        assert_eq!(session.lost(), 1);
        assert!(session.to_restore().is_empty());
        // A hold taken afterwards counts on its own: the lost one does not pin it.
        let mut fresh =
            session.wrap(store_hold(&mut holds, id, 9), session.generation(), None).expect("current");
        fresh.try_downgrade(Antichain::from_elem(11)).expect("forward");
        assert_eq!(session.registered(id), Antichain::from_elem(11));
        drop(hold);
        assert_eq!(session.held(id), Antichain::from_elem(11));
        drop(fresh);
        assert_eq!(session.held(id), Antichain::new());
    }
}
