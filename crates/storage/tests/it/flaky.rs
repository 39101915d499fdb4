//! Fault injection around real stores: [`FlakyConsensus`] and [`FlakyBlob`] wrap any backend and, on
//! request, fail the next calls determinately (nothing happens) or lose their replies (the call happens,
//! then reports an indeterminate failure), or fail everything until told to stop (an outage).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use bytes::Bytes;
use storage::BoxFuture;
use storage::blob::{Blob, BlobMeta};
use storage::consensus::{CasOp, CasOutcome, Consensus, SeqNo, VersionedData};
use storage::external::ExternalError;

/// The knobs shared by a flaky store and its test.
#[derive(Debug, Default)]
pub struct Faults {
    /// Writes that fail without happening.
    pub fail_writes: AtomicU32,
    /// Writes that happen, then report an indeterminate failure.
    pub lose_replies: AtomicU32,
    /// Every call fails while set.
    pub down: AtomicBool,
}

impl Faults {
    fn take(counter: &AtomicU32) -> bool {
        counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }

    fn check_down(&self) -> Result<(), ExternalError> {
        if self.down.load(Ordering::SeqCst) {
            Err(ExternalError::Indeterminate("injected outage".into()))
        } else {
            Ok(())
        }
    }
}

/// A consensus store with injected faults.
#[derive(Debug)]
pub struct FlakyConsensus {
    pub inner: Arc<dyn Consensus>,
    pub faults: Arc<Faults>,
}

impl Consensus for FlakyConsensus {
    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<VersionedData>, ExternalError>> {
        Box::pin(async move {
            self.faults.check_down()?;
            self.inner.head(key).await
        })
    }

    fn compare_and_set_multi(&self, ops: Vec<CasOp>) -> BoxFuture<'_, Result<CasOutcome, ExternalError>> {
        Box::pin(async move {
            self.faults.check_down()?;
            if Faults::take(&self.faults.fail_writes) {
                return Err(ExternalError::Determinate("injected refusal".into()));
            }
            let result = self.inner.compare_and_set_multi(ops).await;
            if Faults::take(&self.faults.lose_replies) {
                return Err(ExternalError::Indeterminate(format!("injected lost reply (it was {result:?})")));
            }
            result
        })
    }

    fn scan<'a>(
        &'a self,
        key: &'a str,
        from: SeqNo,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<VersionedData>, ExternalError>> {
        Box::pin(async move {
            self.faults.check_down()?;
            self.inner.scan(key, from, limit).await
        })
    }

    fn truncate<'a>(&'a self, key: &'a str, below: SeqNo) -> BoxFuture<'a, Result<u64, ExternalError>> {
        Box::pin(async move {
            self.faults.check_down()?;
            self.inner.truncate(key, below).await
        })
    }

    fn list_keys(&self) -> BoxFuture<'_, Result<Vec<(String, SeqNo)>, ExternalError>> {
        Box::pin(async move {
            self.faults.check_down()?;
            self.inner.list_keys().await
        })
    }
}

/// A blob store with injected faults (writes only).
#[derive(Debug)]
pub struct FlakyBlob {
    pub inner: Arc<dyn Blob>,
    pub faults: Arc<Faults>,
}

impl Blob for FlakyBlob {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, ExternalError>> {
        Box::pin(async move {
            self.faults.check_down()?;
            self.inner.get(key).await
        })
    }

    fn set<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), ExternalError>> {
        Box::pin(async move {
            self.faults.check_down()?;
            if Faults::take(&self.faults.fail_writes) {
                return Err(ExternalError::Indeterminate("injected write failure".into()));
            }
            let result = self.inner.set(key, value).await;
            if Faults::take(&self.faults.lose_replies) {
                return Err(ExternalError::Indeterminate("injected lost reply".into()));
            }
            result
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), ExternalError>> {
        Box::pin(async move {
            self.faults.check_down()?;
            self.inner.delete(key).await
        })
    }

    fn list<'a>(&'a self, dir: &'a str) -> BoxFuture<'a, Result<Vec<BlobMeta>, ExternalError>> {
        Box::pin(async move {
            self.faults.check_down()?;
            self.inner.list(dir).await
        })
    }
}
