//! The in-memory [`Consensus`]: a map of version lists behind a lock (tests and the simulator). A named
//! store (`mem://NAME`) is shared by every open of that name in the process while one is open.
//!
//! **Tests.** The conformance suite in `tests/it/consensus.rs`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::api::BoxFuture;
use crate::consensus::{CasOp, CasOutcome, Consensus, SeqNo, VersionedData, check_ops};
use crate::external::ExternalError;

/// The in-memory store.
#[derive(Debug, Default)]
pub(crate) struct MemoryConsensus {
    /// Per key, its retained versions in seqno order (the last is the head; never empty).
    keys: Mutex<BTreeMap<String, Vec<VersionedData>>>,
}

impl MemoryConsensus {
    pub(crate) fn open(name: Option<&str>) -> Arc<dyn Consensus> {
        static NAMED: Mutex<BTreeMap<String, Weak<MemoryConsensus>>> = Mutex::new(BTreeMap::new());
        let Some(name) = name else {
            return Arc::new(MemoryConsensus::default());
        };
        let mut named = NAMED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        named.retain(|_, store| store.strong_count() > 0);
        if let Some(store) = named.get(name).and_then(Weak::upgrade) {
            return store;
        }
        let store = Arc::new(MemoryConsensus::default());
        named.insert(name.to_owned(), Arc::downgrade(&store));
        store
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Vec<VersionedData>>> {
        // Every critical section below leaves the map consistent, so a poisoned lock is still usable.
        self.keys.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Consensus for MemoryConsensus {
    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<VersionedData>, ExternalError>> {
        let head = self.lock().get(key).and_then(|versions| versions.last().cloned());
        Box::pin(std::future::ready(Ok(head)))
    }

    fn compare_and_set_multi(&self, mut ops: Vec<CasOp>) -> BoxFuture<'_, Result<CasOutcome, ExternalError>> {
        let result = check_ops(&mut ops).map(|()| {
            let mut keys = self.lock();
            let matches = ops.iter().all(|op| {
                keys.get(&op.key).and_then(|versions| versions.last()).map(|head| head.seqno) == op.expected
            });
            if !matches {
                return CasOutcome::Mismatch;
            }
            for op in ops {
                keys.entry(op.key).or_default().push(op.new);
            }
            CasOutcome::Committed
        });
        Box::pin(std::future::ready(result))
    }

    fn scan<'a>(
        &'a self,
        key: &'a str,
        from: SeqNo,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<VersionedData>, ExternalError>> {
        let versions = self
            .lock()
            .get(key)
            .map(|versions| versions.iter().filter(|v| v.seqno >= from).take(limit).cloned().collect())
            .unwrap_or_default();
        Box::pin(std::future::ready(Ok(versions)))
    }

    fn truncate<'a>(&'a self, key: &'a str, below: SeqNo) -> BoxFuture<'a, Result<u64, ExternalError>> {
        let mut keys = self.lock();
        let result = match keys.get_mut(key) {
            Some(versions) if versions.last().is_some_and(|head| head.seqno >= below) => {
                let before = versions.len();
                versions.retain(|v| v.seqno >= below);
                Ok((before - versions.len()) as u64)
            }
            _ => Err(ExternalError::Determinate(format!(
                "cannot truncate {key:?} below {below}: beyond its head"
            ))),
        };
        Box::pin(std::future::ready(result))
    }

    fn list_keys(&self) -> BoxFuture<'_, Result<Vec<(String, SeqNo)>, ExternalError>> {
        let keys = self
            .lock()
            .iter()
            .filter_map(|(key, versions)| versions.last().map(|head| (key.clone(), head.seqno)))
            .collect();
        Box::pin(std::future::ready(Ok(keys)))
    }
}
