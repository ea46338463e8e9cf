//! Telling the client and the broker: storing a state with bounded retries,
//! and applying a [`Settle`] decision.

use std::time::Duration;

use tracing::{error, warn};

use super::decide::{Settle, Verdict};
use crate::backend::{BackendError, ReplyTarget, ResultBackend};
use crate::backoff::Backoff;
use crate::broker::Acker;
use crate::protocol::ResultMeta;

/// How long one attempt to store a result may take.
const STORE_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts per state before it is given up (logged, never a crash).
const STORE_ATTEMPTS: u32 = 4;

/// Stores a state, retrying briefly: a result that cannot be stored is
/// logged, never a crash.
pub async fn store(backend: &dyn ResultBackend, meta: &ResultMeta, target: &ReplyTarget) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    for attempt in 1..=STORE_ATTEMPTS {
        // Bounded: a backend that stops answering must not hold the slot (or
        // a warm shutdown) forever.
        let result = tokio::time::timeout(STORE_TIMEOUT, backend.store(meta, target))
            .await
            .unwrap_or_else(|_| {
                Err(BackendError::Io {
                    backend: backend.name(),
                    reason: format!("no answer within {STORE_TIMEOUT:?}"),
                })
            });
        match result {
            Ok(()) => return,
            Err(e) if attempt < STORE_ATTEMPTS => {
                warn!(task_id = %meta.task_id, "storing {} failed (attempt {attempt}): {e}", meta.status.as_str());
                backoff.wait().await;
            }
            Err(e) => {
                error!(task_id = %meta.task_id, "could not store {}: {e}", meta.status.as_str());
            }
        }
    }
}

/// Settles a message as decided; a failed settlement is logged (the broker
/// then redelivers it, or the lease does).
pub async fn settle(acker: &dyn Acker, how: Settle, task_id: &str) {
    let (result, what) = match how {
        Settle::Ack => (acker.ack().await, "ack"),
        Settle::Reject => (acker.reject(false).await, "reject"),
        Settle::Requeue => (acker.reject(true).await, "requeue"),
        Settle::Leave => return,
    };
    if let Err(e) = result {
        warn!(task_id = %task_id, "{what} failed: {e}");
    }
}

/// Ends a delivery that does not run: the client's state first, then the settlement.
pub async fn conclude(
    backend: &dyn ResultBackend,
    acker: &dyn Acker,
    task_id: &str,
    verdict: Verdict,
) {
    if let Some((meta, target)) = &verdict.report {
        store(backend, meta, target).await;
    }
    settle(acker, verdict.settle, task_id).await;
}
