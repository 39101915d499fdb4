//! The storage frontier watch of an instance task: every change of a storage collection's frontiers,
//! re-established after a failure, so the instance's materialized views follow their targets' durable
//! uppers (`InstanceCore::storage_upper`).
//!
//! **Tests:** `tests/it/materialized_views.rs` (a view's upper is its target's durable upper, end to
//! end) and `tests/it/e2e.rs`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::warn;

use protocol::GlobalId;
use storage::StorageCollections;

/// Sends every storage frontier change to `tx` (first the current frontiers of every collection), for as
/// long as `tx`'s receiver lives. A watch that fails or ends (its storage shut down, say) is
/// re-established after a backoff, which doubles up to two seconds and resets once a watch delivers; the
/// new watch starts again from every collection's current frontiers, which the core dedups.
pub(crate) async fn watch_storage_frontiers(
    storage: Arc<dyn StorageCollections>,
    tx: mpsc::UnboundedSender<(GlobalId, Option<storage::CollectionFrontiers>)>,
) {
    const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
    const MAX_BACKOFF: Duration = Duration::from_secs(2);
    let mut backoff = INITIAL_BACKOFF;
    loop {
        match storage.watch_frontiers().await {
            Ok(mut watch) => loop {
                match watch.next().await {
                    Ok(change) => {
                        backoff = INITIAL_BACKOFF;
                        if tx.send(change).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, ?backoff, "storage frontier watch ended; re-establishing it");
                        break;
                    }
                }
            },
            Err(e) => warn!(error = %e, ?backoff, "cannot watch storage frontiers; retrying"),
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
