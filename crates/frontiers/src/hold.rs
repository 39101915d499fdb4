//! Read holds as values, and the accounting that derives each collection's `since` from them.
//!
//! A [`ReadHold`] promises that its collection stays readable at every time beyond the hold's `since`. It is
//! created only by an issuer of holds (normally [`ReadHolds`]), moves only forward
//! ([`ReadHold::try_downgrade`]), is copied only explicitly ([`ReadHold::clone_hold`]), and is released
//! exactly once: when it is dropped, or by [`ReadHold::release`] (after which it holds nothing and dropping
//! it sends nothing). Every change travels as a [`ChangeBatch`] through a [`ChangeTx`] callback to the
//! issuer, so a hold can live in another task or thread than its issuer.
//!
//! [`ReadHolds`] is the issuer's side: per collection, a `HoldCounts` (`counts.rs`) counting outstanding
//! holds, whose frontier *is* the collection's `since`. [`ReadHolds::process`] applies the changes that holds sent
//! and reports every `since` that moved as a [`SinceChange`].
//!
//! **Invariants** (asserted): hold counts never go negative; a `since` never regresses; a collection's
//! `since` equals the meet of the holds applied so far.
//!
//! **Costs:** acquire, downgrade and release are one push onto a shared queue (a mutex-guarded vector
//! whose buffer is reused) plus, when processed, one hash-map lookup and one `HoldCounts` update:
//! O(holds at the frontier), independent of the number of collections (`cargo xtask bench frontiers`
//! compares 100 with 10,000 collections). The map is a hash index over one dense vector of entries
//! (`indexmap`) with a fixed hasher (no random seed): iteration is in insertion order (a removal moves the
//! last entry into the gap), deterministic but not sorted; [`ReadHolds::ids`] sorts. A collection may carry
//! an *attachment*, the owner's state kept in the same entry as its counts
//! ([`ReadHolds::with_attachments`]): an owner that updates both on a hot path (the compute controller,
//! on every frontier report) then reads one entry, not one in each of two maps.
//!
//! **Tests:** doctests on each method; a property test against a naive model at the bottom of this file.

use std::fmt::{self, Debug};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use indexmap::IndexMap;
use indexmap::map::Entry;

use crate::counts::HoldCounts;
use crate::{Antichain, AntichainRef, ChangeBatch, PartialOrder, Timestamp};

/// The channel through which a [`ReadHold`] reports its changes to its issuer: `(collection, changes)`,
/// where `changes` adds `+1` at each element of a new hold frontier and `-1` at each element of an old one.
///
/// Implementations must not panic and must not block; when the issuer has gone away they drop the change.
pub type ChangeTx<K, T> = Arc<dyn Fn(&K, ChangeBatch<T>) + Send + Sync>;

/// One read hold on one collection: the collection stays readable at every time beyond [`ReadHold::since`].
///
/// Not `Clone`: copying a hold registers a new hold with the issuer, so it is the explicit
/// [`ReadHold::clone_hold`]. Dropping the hold releases it.
///
/// # Examples
/// ```
/// use frontiers::{Antichain, ReadHolds};
/// let mut holds = ReadHolds::<&str, u64>::new();
/// let owner = holds.create("orders", Antichain::from_elem(5)).unwrap();
/// let mut reader = holds.acquire(&"orders", Antichain::from_elem(7)).unwrap();
/// drop(owner);
/// holds.process();
/// assert_eq!(holds.since(&"orders").unwrap().to_owned(), Antichain::from_elem(7));
/// reader.try_downgrade(Antichain::from_elem(9)).unwrap();
/// holds.process();
/// assert_eq!(holds.since(&"orders").unwrap().to_owned(), Antichain::from_elem(9));
/// ```
pub struct ReadHold<K, T: Timestamp> {
    id: K,
    since: Antichain<T>,
    tx: ChangeTx<K, T>,
}

impl<K: Clone + Debug, T: Timestamp> ReadHold<K, T> {
    /// Wraps a hold that the issuer behind `tx` has **already accounted** (`+1` at each element of `since`).
    ///
    /// This is for implementors of hold accounting (a remote storage client, say); everyone else obtains
    /// holds from [`ReadHolds::create`] or [`ReadHolds::acquire`].
    ///
    /// # Examples
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use frontiers::{Antichain, ChangeBatch, ReadHold};
    /// let log = Arc::new(Mutex::new(Vec::new()));
    /// let sink = Arc::clone(&log);
    /// let hold = ReadHold::new("t", Antichain::from_elem(3u64), Arc::new(move |id: &&str, mut changes: ChangeBatch<u64>| {
    ///     sink.lock().unwrap().push((*id, changes.drain().collect::<Vec<_>>()));
    /// }));
    /// drop(hold);
    /// assert_eq!(*log.lock().unwrap(), vec![("t", vec![(3, -1)])]);
    /// ```
    pub fn new(id: K, since: Antichain<T>, tx: ChangeTx<K, T>) -> Self {
        ReadHold { id, since, tx }
    }

    /// The collection this hold is on.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let hold = holds.create(7, Antichain::from_elem(0)).unwrap();
    /// assert_eq!(*hold.id(), 7);
    /// ```
    pub fn id(&self) -> &K {
        &self.id
    }

    /// The frontier this hold holds the collection's `since` back to. Empty once released.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let hold = holds.create(7, Antichain::from_elem(4)).unwrap();
    /// assert_eq!(hold.since(), &Antichain::from_elem(4));
    /// ```
    pub fn since(&self) -> &Antichain<T> {
        &self.since
    }

    /// Whether the hold has been released (it holds nothing; its `since` is empty).
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let mut hold = holds.create(7, Antichain::from_elem(4)).unwrap();
    /// assert!(!hold.is_released());
    /// hold.release();
    /// assert!(hold.is_released());
    /// ```
    pub fn is_released(&self) -> bool {
        self.since.is_empty()
    }

    /// Moves the hold forward to `frontier`.
    ///
    /// Errors, changing nothing, when the hold was released ([`DowngradeError::Released`]) or when
    /// `frontier` is not beyond the current one, i.e. it would move the hold backwards or sideways
    /// ([`DowngradeError::NotBeyond`]). Downgrading to the current frontier is a no-op, and downgrading to
    /// the empty frontier releases the hold.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, DowngradeError, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let mut hold = holds.create(1, Antichain::from_elem(5)).unwrap();
    /// hold.try_downgrade(Antichain::from_elem(8)).unwrap();
    /// assert!(matches!(hold.try_downgrade(Antichain::from_elem(6)), Err(DowngradeError::NotBeyond { .. })));
    /// assert_eq!(hold.since(), &Antichain::from_elem(8));
    /// hold.try_downgrade(Antichain::new()).unwrap();
    /// assert_eq!(hold.try_downgrade(Antichain::from_elem(9)), Err(DowngradeError::Released));
    /// ```
    pub fn try_downgrade(&mut self, frontier: Antichain<T>) -> Result<(), DowngradeError<T>> {
        if self.since.is_empty() {
            return if frontier.is_empty() { Ok(()) } else { Err(DowngradeError::Released) };
        }
        if !PartialOrder::less_equal(&self.since, &frontier) {
            return Err(DowngradeError::NotBeyond { current: self.since.clone(), requested: frontier });
        }
        if self.since == frontier {
            return Ok(());
        }
        let mut changes = ChangeBatch::new();
        changes.extend(frontier.iter().map(|t| (*t, 1)));
        changes.extend(self.since.iter().map(|t| (*t, -1)));
        self.since = frontier;
        self.send(changes);
        Ok(())
    }

    /// Releases the hold now; the value stays but holds nothing. Releasing twice is a no-op, and dropping a
    /// released hold sends nothing.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let mut hold = holds.create(1, Antichain::from_elem(5)).unwrap();
    /// hold.release();
    /// hold.release();
    /// holds.process();
    /// assert!(holds.since(&1).unwrap().is_empty());
    /// ```
    pub fn release(&mut self) {
        if !self.since.is_empty() {
            let mut changes = ChangeBatch::new();
            changes.extend(self.since.iter().map(|t| (*t, -1)));
            self.since = Antichain::new();
            self.send(changes);
        }
    }

    /// Registers a second hold on the same collection at the same frontier. This is the only way to copy a
    /// hold. A released hold clones into a released hold.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let first = holds.create(1, Antichain::from_elem(5)).unwrap();
    /// let mut second = first.clone_hold();
    /// drop(first);
    /// holds.process();
    /// assert_eq!(holds.since(&1).unwrap().to_owned(), Antichain::from_elem(5));
    /// second.try_downgrade(Antichain::from_elem(6)).unwrap();
    /// holds.process();
    /// assert_eq!(holds.since(&1).unwrap().to_owned(), Antichain::from_elem(6));
    /// ```
    pub fn clone_hold(&self) -> Self {
        if !self.since.is_empty() {
            let mut changes = ChangeBatch::new();
            changes.extend(self.since.iter().map(|t| (*t, 1)));
            self.send(changes);
        }
        ReadHold { id: self.id.clone(), since: self.since.clone(), tx: Arc::clone(&self.tx) }
    }

    fn send(&self, changes: ChangeBatch<T>) {
        (self.tx)(&self.id, changes);
    }
}

impl<K: Clone + Debug + Eq, T: Timestamp> ReadHold<K, T> {
    /// Absorbs `other`, a hold on the same collection from the same issuer; `self` then holds the meet of
    /// both frontiers. On error `other` is handed back inside the error, untouched.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let mut a = holds.create(1, Antichain::from_elem(5)).unwrap();
    /// let b = holds.acquire(&1, Antichain::from_elem(3)).unwrap_err(); // 3 is before the since
    /// # let _ = b;
    /// let b = holds.acquire(&1, Antichain::from_elem(9)).unwrap();
    /// a.try_downgrade(Antichain::from_elem(7)).unwrap();
    /// a.merge(b).unwrap();
    /// assert_eq!(a.since(), &Antichain::from_elem(7));
    /// let mut other = holds.create(2, Antichain::from_elem(0)).unwrap();
    /// assert!(other.merge(a).is_err());
    /// ```
    pub fn merge(&mut self, mut other: Self) -> Result<(), MergeError<K, T>> {
        if !Arc::ptr_eq(&self.tx, &other.tx) {
            return Err(MergeError::DifferentIssuer { other });
        }
        if self.id != other.id {
            return Err(MergeError::DifferentCollection { this: self.id.clone(), other });
        }
        let merged = crate::antichain::meet(&self.since.borrow(), &other.since.borrow());
        let mut changes = ChangeBatch::new();
        changes.extend(merged.iter().map(|t| (*t, 1)));
        changes.extend(self.since.iter().map(|t| (*t, -1)));
        changes.extend(other.since.iter().map(|t| (*t, -1)));
        // `other` is absorbed: its share leaves in `changes`, so its drop must send nothing.
        other.since = Antichain::new();
        self.since = merged;
        if !changes.is_empty() {
            self.send(changes);
        }
        Ok(())
    }
}

impl<K, T: Timestamp> Drop for ReadHold<K, T> {
    fn drop(&mut self) {
        if !self.since.is_empty() {
            let mut changes = ChangeBatch::new();
            changes.extend(self.since.iter().map(|t| (*t, -1)));
            self.since = Antichain::new();
            (self.tx)(&self.id, changes);
        }
    }
}

impl<K: Debug, T: Timestamp> Debug for ReadHold<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadHold").field("id", &self.id).field("since", &self.since).finish_non_exhaustive()
    }
}

/// Why [`ReadHold::try_downgrade`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DowngradeError<T: Debug> {
    /// The requested frontier is not beyond the hold's current one (it would move the hold backwards, or
    /// sideways in a partial order).
    #[error(
        "cannot downgrade a read hold from {current:?} to {requested:?}: not beyond the current frontier"
    )]
    NotBeyond {
        /// The hold's frontier, unchanged.
        current: Antichain<T>,
        /// The frontier that was asked for.
        requested: Antichain<T>,
    },
    /// The hold was already released; it can hold nothing again.
    #[error("cannot downgrade a read hold that was released")]
    Released,
}

/// Why [`ReadHold::merge`] refused. The hold that was to be absorbed is handed back.
#[derive(Debug, thiserror::Error)]
pub enum MergeError<K: Clone + Debug, T: Timestamp> {
    /// The holds are on different collections.
    #[error("cannot merge a read hold on {:?} into one on {this:?}", other.id())]
    DifferentCollection {
        /// The collection of the hold that absorbs.
        this: K,
        /// The hold that was to be absorbed.
        other: ReadHold<K, T>,
    },
    /// The holds were issued by different accountings.
    #[error("cannot merge read holds from different issuers (collection {:?})", other.id())]
    DifferentIssuer {
        /// The hold that was to be absorbed.
        other: ReadHold<K, T>,
    },
}

/// Why [`ReadHolds::create`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreateError<K: Debug> {
    /// A collection with this id is already accounted.
    #[error("collection {0:?} already exists")]
    AlreadyExists(K),
    /// A collection cannot start out fully compacted.
    #[error("collection {0:?} cannot be created with an empty since")]
    EmptySince(K),
}

/// Why [`ReadHolds::acquire`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError<K: Debug, T: Debug> {
    /// No collection with this id is accounted.
    #[error("collection {0:?} is missing")]
    CollectionMissing(K),
    /// The requested frontier is not beyond the collection's since: that history may already be gone.
    #[error("cannot hold {id:?} at {requested:?}: its since is {since:?}")]
    BeforeSince {
        /// The collection.
        id: K,
        /// Its current since.
        since: Antichain<T>,
        /// The frontier that was asked for.
        requested: Antichain<T>,
    },
}

/// A small, seedless multiplicative hasher (in the style of rustc's `FxHasher`) for collection ids: ids are
/// trusted, short keys, so the cost of SipHash buys nothing here, and a fixed hasher keeps every run alike.
///
/// Use it through [`IdBuildHasher`]: `HashMap<GlobalId, V, IdBuildHasher>`.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

/// Builds [`IdHasher`]s: the hasher of every map keyed by collection ids on a hot path.
pub type IdBuildHasher = BuildHasherDefault<IdHasher>;

impl IdHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    fn write_isize(&mut self, n: isize) {
        self.add(n as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A collection's `since` moved from `old` to `new` (reported by [`ReadHolds::process`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinceChange<K, T> {
    /// The collection.
    pub id: K,
    /// The since before.
    pub old: Antichain<T>,
    /// The since after; `new` is beyond `old`, and empty once every hold is gone.
    pub new: Antichain<T>,
}

/// Hold accounting for many collections: the issuer of [`ReadHold`]s and the authority on each collection's
/// `since`.
///
/// Changes sent by holds queue up until [`ReadHolds::process`] applies them; until then `since` reports the
/// last processed value (which is never ahead of the truth, so acquiring against it is safe).
pub struct ReadHolds<K, T: Timestamp, X = ()> {
    collections: IndexMap<K, Accounted<T, X>, IdBuildHasher>,
    tx: ChangeTx<K, T>,
    /// Changes sent by holds, not yet applied. Closed when the accounting is dropped, so holds that
    /// outlive their issuer send into nothing.
    queue: Arc<ChangeQueue<K, T>>,
    /// The other buffer: `process` swaps it with the queue's, so both keep their capacity.
    spare: Vec<(K, ChangeBatch<T>)>,
    stray_changes: u64,
}

/// Where holds put their changes until [`ReadHolds::process`] takes them. One lock per change, and no
/// other atomic operation: the senders own the queue with the accounting, and learn that the
/// accounting is gone from `open`, under the same lock.
type ChangeQueue<K, T> = Mutex<QueueState<K, T>>;

/// The contents of a [`ChangeQueue`].
struct QueueState<K, T> {
    /// The accounting still exists.
    open: bool,
    changes: Vec<(K, ChangeBatch<T>)>,
}

/// One accounted collection: the counts of its holds' frontiers, and the owner's attachment. `repr(C)`
/// keeps the counts first, next to the key, where a lookup has already brought the cache line in.
#[repr(C)]
struct Accounted<T: Timestamp, X> {
    counts: HoldCounts<T>,
    attachment: X,
}

/// Locks the change queue. A sender never panics while holding it, but a poisoned queue is still
/// consistent (a `Vec` push either happened or not), so poisoning is ignored rather than spread.
fn lock_queue<K, T>(queue: &ChangeQueue<K, T>) -> MutexGuard<'_, QueueState<K, T>> {
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K, T> Default for ReadHolds<K, T>
where
    K: Ord + Hash + Clone + Debug + Send + 'static,
    T: Timestamp,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<K, T> ReadHolds<K, T>
where
    K: Ord + Hash + Clone + Debug + Send + 'static,
    T: Timestamp,
{
    /// An empty accounting.
    ///
    /// # Examples
    /// ```
    /// use frontiers::ReadHolds;
    /// let holds = ReadHolds::<u32, u64>::new();
    /// assert_eq!(holds.len(), 0);
    /// ```
    pub fn new() -> Self {
        Self::with_notify(Arc::new(|| {}))
    }

    /// An empty accounting that calls `notify` after every change a hold sends, so an owner running in an
    /// async task can wake up and [`process`](Self::process) it. `notify` must not block.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use frontiers::{Antichain, ReadHolds};
    /// let wakeups = Arc::new(AtomicUsize::new(0));
    /// let counter = Arc::clone(&wakeups);
    /// let mut holds = ReadHolds::<u32, u64>::with_notify(Arc::new(move || { counter.fetch_add(1, Ordering::SeqCst); }));
    /// drop(holds.create(1, Antichain::from_elem(0)).unwrap());
    /// assert_eq!(wakeups.load(Ordering::SeqCst), 1);
    /// ```
    pub fn with_notify(notify: Arc<dyn Fn() + Send + Sync>) -> Self {
        Self::with_attachments(notify)
    }
}

impl<K, T, X> ReadHolds<K, T, X>
where
    K: Ord + Hash + Clone + Debug + Send + 'static,
    T: Timestamp,
{
    /// An empty accounting like [`with_notify`](ReadHolds::with_notify)'s whose collections each carry
    /// an attachment of type `X`: state of the owner's that lives beside the collection's hold counts,
    /// so that an owner updating both (a since and an upper, say) finds them in one place.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64, &str>::with_attachments(Arc::new(|| {}));
    /// // The first hold is handed to the closure; dropped here, it releases itself.
    /// holds.create_with(1, Antichain::from_elem(0), |_first_hold| "orders").unwrap();
    /// assert_eq!(holds.attachment(&1), Some(&"orders"));
    /// *holds.attachment_mut(&1).unwrap() = "lineitem";
    /// assert_eq!(holds.attachment(&1), Some(&"lineitem"));
    /// assert_eq!(holds.attachment(&2), None);
    /// ```
    pub fn with_attachments(notify: Arc<dyn Fn() + Send + Sync>) -> Self {
        let queue: Arc<ChangeQueue<K, T>> =
            Arc::new(Mutex::new(QueueState { open: true, changes: Vec::new() }));
        let sender = Arc::clone(&queue);
        let tx: ChangeTx<K, T> = Arc::new(move |id: &K, changes| {
            let mut queue = lock_queue(&sender);
            // The accounting may be gone; then the hold has nobody left to hold anything back for.
            if queue.open {
                queue.changes.push((id.clone(), changes));
                drop(queue);
                notify();
            }
        });
        ReadHolds { collections: IndexMap::default(), tx, queue, spare: Vec::new(), stray_changes: 0 }
    }

    /// Starts accounting a collection at `since`, with the attachment `attach` builds from the first hold
    /// on it (an owner keeping its own hold inside the attachment gets it this way), and returns the
    /// attachment. Fails as [`create`](ReadHolds::create) does, without calling `attach`.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use frontiers::{Antichain, ReadHold, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64, Option<ReadHold<u32, u64>>>::with_attachments(Arc::new(|| {}));
    /// holds.create_with(1, Antichain::from_elem(3), Some).unwrap();
    /// assert_eq!(holds.attachment(&1).unwrap().as_ref().unwrap().since(), &Antichain::from_elem(3));
    /// // The hold lives in the attachment: taking it out and dropping it releases it.
    /// drop(holds.attachment_mut(&1).unwrap().take());
    /// holds.process();
    /// assert!(holds.since(&1).unwrap().is_empty());
    /// assert!(holds.create_with(1, Antichain::from_elem(3), |_| None).is_err());
    /// ```
    pub fn create_with(
        &mut self,
        id: K,
        since: Antichain<T>,
        attach: impl FnOnce(ReadHold<K, T>) -> X,
    ) -> Result<&mut X, CreateError<K>> {
        let entry = match self.collections.entry(id) {
            Entry::Occupied(entry) => return Err(CreateError::AlreadyExists(entry.key().clone())),
            Entry::Vacant(entry) if since.is_empty() => {
                return Err(CreateError::EmptySince(entry.into_key()));
            }
            Entry::Vacant(entry) => entry,
        };
        let mut counts = HoldCounts::new();
        counts.update(since.iter().map(|t| (*t, 1)));
        let hold = ReadHold::new(entry.key().clone(), since, Arc::clone(&self.tx));
        Ok(&mut entry.insert(Accounted { counts, attachment: attach(hold) }).attachment)
    }

    /// Every accounted collection with its attachment, in insertion order (deterministic, not sorted).
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64, Vec<_>>::with_attachments(Arc::new(|| {}));
    /// holds.create_with(2, Antichain::from_elem(0), |h| vec![h]).unwrap();
    /// holds.create_with(1, Antichain::from_elem(0), |h| vec![h]).unwrap();
    /// let ids: Vec<u32> = holds.attachments().map(|(id, _)| *id).collect();
    /// assert_eq!(ids, vec![2, 1]);
    /// for (_, held) in holds.attachments_mut() {
    ///     held.clear(); // releases the hold inside
    /// }
    /// holds.process();
    /// assert!(holds.since(&1).unwrap().is_empty() && holds.since(&2).unwrap().is_empty());
    /// ```
    pub fn attachments(&self) -> impl Iterator<Item = (&K, &X)> {
        self.collections.iter().map(|(id, a)| (id, &a.attachment))
    }

    /// Every accounted collection with its attachment, to change, in insertion order.
    pub fn attachments_mut(&mut self) -> impl Iterator<Item = (&K, &mut X)> {
        self.collections.iter_mut().map(|(id, a)| (id, &mut a.attachment))
    }

    /// The attachment of `id`, or `None` if it is not accounted.
    pub fn attachment(&self, id: &K) -> Option<&X> {
        self.collections.get(id).map(|a| &a.attachment)
    }

    /// The attachment of `id`, to change, or `None` if it is not accounted.
    pub fn attachment_mut(&mut self, id: &K) -> Option<&mut X> {
        self.collections.get_mut(id).map(|a| &mut a.attachment)
    }

    /// The since of `id` (as of the last [`process`](Self::process)) and its attachment, from one lookup;
    /// `None` if it is not accounted.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64, Vec<_>>::with_attachments(Arc::new(|| {}));
    /// holds.create_with(1, Antichain::from_elem(3), |hold| vec![hold]).unwrap();
    /// let (since, held) = holds.since_and_attachment(&1).unwrap();
    /// assert_eq!((since.to_owned(), held.len()), (Antichain::from_elem(3), 1));
    /// assert!(holds.since_and_attachment(&2).is_none());
    /// ```
    pub fn since_and_attachment(&self, id: &K) -> Option<(AntichainRef<'_, T>, &X)> {
        self.collections.get(id).map(|a| (a.counts.frontier(), &a.attachment))
    }

    /// The since of `id` (as of the last [`process`](Self::process)) and its attachment, to change, from
    /// one lookup; `None` if it is not accounted.
    ///
    /// # Examples
    /// ```
    /// use std::sync::Arc;
    /// use frontiers::{Antichain, ReadHold, ReadHolds};
    /// // The attachment keeps the first hold (so the since stays at 3) and an upper.
    /// let mut holds = ReadHolds::<u32, u64, (ReadHold<u32, u64>, u64)>::with_attachments(Arc::new(|| {}));
    /// holds.create_with(1, Antichain::from_elem(3), |hold| (hold, 10)).unwrap();
    /// let (since, (_, upper)) = holds.since_and_attachment_mut(&1).unwrap();
    /// assert_eq!(since.to_owned(), Antichain::from_elem(3));
    /// *upper = 11;
    /// assert_eq!(holds.attachment(&1).unwrap().1, 11);
    /// assert!(holds.since_and_attachment_mut(&2).is_none());
    /// ```
    pub fn since_and_attachment_mut(&mut self, id: &K) -> Option<(AntichainRef<'_, T>, &mut X)> {
        self.collections.get_mut(id).map(|a| (a.counts.frontier(), &mut a.attachment))
    }

    /// Starts accounting a collection at `since` and returns the first hold on it.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, CreateError, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let hold = holds.create(1, Antichain::from_elem(3)).unwrap();
    /// assert_eq!(holds.since(&1).unwrap().to_owned(), Antichain::from_elem(3));
    /// assert_eq!(holds.create(1, Antichain::from_elem(3)).unwrap_err(), CreateError::AlreadyExists(1));
    /// assert_eq!(holds.create(2, Antichain::new()).unwrap_err(), CreateError::EmptySince(2));
    /// # drop(hold);
    /// ```
    pub fn create(&mut self, id: K, since: Antichain<T>) -> Result<ReadHold<K, T>, CreateError<K>>
    where
        X: Default,
    {
        let mut first = None;
        self.create_with(id, since, |hold| {
            first = Some(hold);
            X::default()
        })?;
        Ok(first.expect("create_with hands over the first hold"))
    }

    /// Acquires a new hold on `id` at `frontier`, which must be beyond the collection's `since`.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{AcquireError, Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let _owner = holds.create(1, Antichain::from_elem(10)).unwrap();
    /// let hold = holds.acquire(&1, Antichain::from_elem(12)).unwrap();
    /// assert_eq!(hold.since(), &Antichain::from_elem(12));
    /// assert!(matches!(holds.acquire(&1, Antichain::from_elem(9)), Err(AcquireError::BeforeSince { .. })));
    /// assert_eq!(holds.acquire(&2, Antichain::from_elem(9)).unwrap_err(), AcquireError::CollectionMissing(2));
    /// ```
    pub fn acquire(&mut self, id: &K, frontier: Antichain<T>) -> Result<ReadHold<K, T>, AcquireError<K, T>> {
        let Some(Accounted { counts, .. }) = self.collections.get_mut(id) else {
            return Err(AcquireError::CollectionMissing(id.clone()));
        };
        if counts.frontier().is_empty() || !PartialOrder::less_equal(&counts.frontier(), &frontier.borrow()) {
            return Err(AcquireError::BeforeSince {
                id: id.clone(),
                since: counts.frontier().to_owned(),
                requested: frontier,
            });
        }
        let changed = counts.update(frontier.iter().map(|t| (*t, 1)));
        assert!(!changed, "a hold beyond the since cannot move the since");
        Ok(ReadHold::new(id.clone(), frontier, Arc::clone(&self.tx)))
    }

    /// Acquires a new hold on `id` at its current `since`.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let _owner = holds.create(1, Antichain::from_elem(10)).unwrap();
    /// assert_eq!(holds.acquire_at_since(&1).unwrap().since(), &Antichain::from_elem(10));
    /// ```
    pub fn acquire_at_since(&mut self, id: &K) -> Result<ReadHold<K, T>, AcquireError<K, T>> {
        let since = match self.collections.get(id) {
            Some(a) => a.counts.frontier().to_owned(),
            None => return Err(AcquireError::CollectionMissing(id.clone())),
        };
        self.acquire(id, since)
    }

    /// The collection's `since` as of the last [`process`](Self::process), or `None` if it is not
    /// accounted. Empty when every hold is gone.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// assert!(holds.since(&1).is_none());
    /// let _hold = holds.create(1, Antichain::from_elem(10)).unwrap();
    /// assert_eq!(holds.since(&1).unwrap().to_owned(), Antichain::from_elem(10));
    /// ```
    pub fn since(&self, id: &K) -> Option<AntichainRef<'_, T>> {
        self.collections.get(id).map(|a| a.counts.frontier())
    }

    /// Whether `id` is accounted.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let _hold = holds.create(1, Antichain::from_elem(10)).unwrap();
    /// assert!(holds.contains(&1) && !holds.contains(&2));
    /// ```
    pub fn contains(&self, id: &K) -> bool {
        self.collections.contains_key(id)
    }

    /// The number of accounted collections.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let _hold = holds.create(1, Antichain::from_elem(10)).unwrap();
    /// assert_eq!(holds.len(), 1);
    /// ```
    pub fn len(&self) -> usize {
        self.collections.len()
    }

    /// Whether no collection is accounted.
    ///
    /// # Examples
    /// ```
    /// use frontiers::ReadHolds;
    /// assert!(ReadHolds::<u32, u64>::new().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.collections.is_empty()
    }

    /// The accounted collections, in id order.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let _a = holds.create(2, Antichain::from_elem(0)).unwrap();
    /// let _b = holds.create(1, Antichain::from_elem(0)).unwrap();
    /// assert_eq!(holds.ids().copied().collect::<Vec<_>>(), vec![1, 2]);
    /// ```
    pub fn ids(&self) -> impl Iterator<Item = &K> {
        let mut ids: Vec<&K> = self.collections.keys().collect();
        ids.sort();
        ids.into_iter()
    }

    /// Stops accounting `id` and returns its last `since`. Holds still outstanding on it keep working;
    /// their later changes are ignored and counted by [`stray_changes`](Self::stray_changes). Owners that
    /// must not forget live holds check that the since is empty first.
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, ReadHolds};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let hold = holds.create(1, Antichain::from_elem(4)).unwrap();
    /// assert_eq!(holds.remove(&1), Some(Antichain::from_elem(4)));
    /// drop(hold);
    /// assert!(holds.process().is_empty());
    /// assert_eq!(holds.stray_changes(), 1);
    /// ```
    pub fn remove(&mut self, id: &K) -> Option<Antichain<T>> {
        self.collections.swap_remove(id).map(|a| a.counts.frontier().to_owned())
    }

    /// The number of changes received for collections no longer accounted.
    ///
    /// # Examples
    /// ```
    /// use frontiers::ReadHolds;
    /// assert_eq!(ReadHolds::<u32, u64>::new().stray_changes(), 0);
    /// ```
    pub fn stray_changes(&self) -> u64 {
        self.stray_changes
    }

    /// Applies every change that holds have sent since the last call and returns, in id order, each
    /// collection whose `since` moved (one entry per collection, from its since before the call to its
    /// since after).
    ///
    /// # Examples
    /// ```
    /// use frontiers::{Antichain, ReadHolds, SinceChange};
    /// let mut holds = ReadHolds::<u32, u64>::new();
    /// let mut hold = holds.create(1, Antichain::from_elem(4)).unwrap();
    /// hold.try_downgrade(Antichain::from_elem(6)).unwrap();
    /// hold.try_downgrade(Antichain::from_elem(8)).unwrap();
    /// assert_eq!(holds.process(), vec![SinceChange { id: 1, old: Antichain::from_elem(4), new: Antichain::from_elem(8) }]);
    /// assert!(holds.process().is_empty());
    /// ```
    pub fn process(&mut self) -> Vec<SinceChange<K, T>> {
        let mut changes = std::mem::take(&mut self.spare);
        std::mem::swap(&mut changes, &mut lock_queue(&self.queue).changes);
        // (collection, since before its first change here), in arrival order.
        let mut moved: Vec<(K, Antichain<T>)> = Vec::new();
        for (id, batch) in changes.drain(..) {
            let Some(Accounted { counts, .. }) = self.collections.get_mut(&id) else {
                self.stray_changes += 1;
                continue;
            };
            let before = counts.frontier().to_owned();
            // `into_inner` consolidates: one entry per time.
            let updates = batch.into_inner();
            let frontier_moved = counts.update(updates.iter().cloned());
            for (time, delta) in &updates {
                if *delta < 0 {
                    assert!(
                        counts.count_for(time) >= 0,
                        "read hold count for {id:?} at {time:?} went negative"
                    );
                }
            }
            if frontier_moved {
                assert!(
                    PartialOrder::less_equal(&before.borrow(), &counts.frontier()),
                    "since of {id:?} regressed from {before:?} to {:?}",
                    counts.frontier()
                );
                moved.push((id, before));
            }
        }
        self.spare = changes;
        // Id order, and for each collection the since before its first change (a stable sort keeps
        // arrival order among equal ids).
        moved.sort_by(|(a, _), (b, _)| a.cmp(b));
        moved.dedup_by(|(later, _), (first, _)| later == first);
        moved
            .into_iter()
            .filter_map(|(id, old)| {
                let new = self.collections[&id].counts.frontier().to_owned();
                (old != new).then_some(SinceChange { id, old, new })
            })
            .collect()
    }
}

impl<K, T: Timestamp, X> Drop for ReadHolds<K, T, X> {
    fn drop(&mut self) {
        let mut queue = lock_queue(&self.queue);
        queue.open = false;
        // Dropped outside the lock: nothing in a change batch sends, but keep the critical section short.
        let changes = std::mem::take(&mut queue.changes);
        drop(queue);
        drop(changes);
    }
}

impl<K: Debug, T: Timestamp, X> Debug for ReadHolds<K, T, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadHolds")
            .field("collections", &self.collections.len())
            .field("stray_changes", &self.stray_changes)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Product;
    use proptest::prelude::*;

    type P = Product<u64, u64>;

    #[test]
    fn a_hold_that_outlives_its_accounting_sends_into_nothing() {
        let notified = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&notified);
        let mut holds = ReadHolds::<u32, u64>::with_notify(Arc::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        let mut hold = holds.create(1, Antichain::from_elem(3)).unwrap();
        hold.try_downgrade(Antichain::from_elem(4)).unwrap();
        let queue = Arc::clone(&holds.queue);
        drop(holds);
        assert!(lock_queue(&queue).changes.is_empty(), "dropping the accounting drops what was queued");
        hold.try_downgrade(Antichain::from_elem(5)).unwrap();
        let copy = hold.clone_hold();
        drop(hold);
        drop(copy);
        assert!(lock_queue(&queue).changes.is_empty(), "later changes are not queued");
        assert_eq!(
            notified.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "only the change before the drop woke anyone"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire { collection: usize, delta: (u64, u64) },
        Clone { slot: usize },
        Downgrade { slot: usize, delta: (u64, u64) },
        Release { slot: usize },
        Drop { slot: usize },
        Merge { into: usize, from: usize },
        Process,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..4, (0u64..3, 0u64..3)).prop_map(|(collection, delta)| Op::Acquire { collection, delta }),
            (0usize..16).prop_map(|slot| Op::Clone { slot }),
            (0usize..16, (0u64..3, 0u64..3)).prop_map(|(slot, delta)| Op::Downgrade { slot, delta }),
            (0usize..16).prop_map(|slot| Op::Release { slot }),
            (0usize..16).prop_map(|slot| Op::Drop { slot }),
            (0usize..16, 0usize..16).prop_map(|(into, from)| Op::Merge { into, from }),
            Just(Op::Process),
        ]
    }

    fn shift(t: &P, d: (u64, u64)) -> P {
        Product::new(t.outer + d.0, t.inner + d.1)
    }

    /// The naive model: the since of a collection is the brute-force meet of its live holds' frontiers.
    fn model_since(slots: &[Option<ReadHold<usize, P>>], collection: usize) -> Antichain<P> {
        let mut since = Antichain::new();
        for hold in slots.iter().flatten().filter(|h| *h.id() == collection) {
            for t in hold.since().iter() {
                since.insert(*t);
            }
        }
        since
    }

    proptest! {
        #[test]
        fn since_is_the_meet_of_live_holds_after_every_step(ops in prop::collection::vec(op(), 1..80)) {
            let mut holds = ReadHolds::<usize, P>::new();
            let mut slots: Vec<Option<ReadHold<usize, P>>> = Vec::new();
            // Every collection starts with one hold at (0, 0); partial order is exercised by downgrades.
            for c in 0..4 {
                slots.push(Some(holds.create(c, Antichain::from_elem(Product::new(0, 0))).unwrap()));
            }
            let mut observed: Vec<Antichain<P>> = (0..4).map(|_| Antichain::from_elem(Product::new(0, 0))).collect();
            for op in ops {
                match op {
                    Op::Acquire { collection, delta } => {
                        let since = holds.since(&collection).unwrap().to_owned();
                        let frontier: Antichain<P> = since.iter().map(|t| shift(t, delta)).collect();
                        match holds.acquire(&collection, frontier.clone()) {
                            Ok(hold) => slots.push(Some(hold)),
                            Err(AcquireError::BeforeSince { .. }) => prop_assert!(since.is_empty()),
                            Err(e) => prop_assert!(false, "unexpected {e:?}"),
                        }
                    }
                    Op::Clone { slot } => {
                        if let Some(Some(hold)) = slots.get(slot) {
                            let copy = hold.clone_hold();
                            prop_assert_eq!(copy.since(), hold.since());
                            slots.push(Some(copy));
                        }
                    }
                    Op::Downgrade { slot, delta } => {
                        if let Some(Some(hold)) = slots.get_mut(slot) {
                            let before = hold.since().clone();
                            let frontier: Antichain<P> = before.iter().map(|t| shift(t, delta)).collect();
                            let result = hold.try_downgrade(frontier.clone());
                            if before.is_empty() {
                                prop_assert!(result.is_ok() || result == Err(DowngradeError::Released));
                            } else {
                                prop_assert!(result.is_ok());
                                prop_assert_eq!(hold.since(), &frontier);
                                // Moving back to where it was must now fail, unless nothing moved.
                                if before != frontier {
                                    let back = hold.try_downgrade(before);
                                    let is_not_beyond = matches!(back, Err(DowngradeError::NotBeyond { .. }));
                                    prop_assert!(is_not_beyond);
                                }
                            }
                        }
                    }
                    Op::Release { slot } => {
                        if let Some(Some(hold)) = slots.get_mut(slot) {
                            hold.release();
                            prop_assert!(hold.is_released());
                        }
                    }
                    Op::Drop { slot } => {
                        if let Some(entry) = slots.get_mut(slot) {
                            entry.take();
                        }
                    }
                    Op::Merge { into, from } => {
                        let both_live = into != from
                            && slots.get(into).is_some_and(Option::is_some)
                            && slots.get(from).is_some_and(Option::is_some);
                        if both_live {
                            let other = slots[from].take().unwrap();
                            let target = slots[into].as_mut().unwrap();
                            let expected = crate::antichain::meet(&target.since().borrow(), &other.since().borrow());
                            match target.merge(other) {
                                Ok(()) => prop_assert_eq!(target.since(), &expected),
                                Err(MergeError::DifferentCollection { other, .. }) => slots[from] = Some(other),
                                Err(e) => prop_assert!(false, "unexpected {e:?}"),
                            }
                        }
                    }
                    Op::Process => {}
                }
                // After every step: process, and compare with the model.
                for change in holds.process() {
                    prop_assert_eq!(&change.old, &observed[change.id], "reported changes must chain");
                    prop_assert!(PartialOrder::less_equal(&change.old, &change.new), "since regressed");
                    observed[change.id] = change.new.clone();
                }
                for (c, seen) in observed.iter().enumerate() {
                    let since = holds.since(&c).unwrap().to_owned();
                    prop_assert_eq!(&since, &model_since(&slots, c));
                    prop_assert_eq!(&since, seen);
                }
            }
            drop(slots);
            holds.process();
            for c in 0..4 {
                prop_assert!(holds.since(&c).unwrap().is_empty(), "every hold released on drop");
            }
        }
    }
}
