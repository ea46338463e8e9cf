//! Telling the client and the broker: storing a state (through the result
//! outbox) and applying a [`Settle`] decision.

use std::time::Duration;

use tracing::{error, warn};

use super::decide::{Settle, Verdict};
use crate::backend::{BackendError, ReplyTarget, ResultBackend};
use crate::broker::Acker;
use crate::protocol::ResultMeta;

/// Upper bound for one store call. The worker's backend is the result
/// outbox ([`crate::backend::outbox`]), which answers at once when it keeps a
/// state for later; this only guards against a backend that never answers.
const STORE_TIMEOUT: Duration = Duration::from_secs(30);

/// Stores a state. The worker's backend is the result outbox: a state the
/// backend cannot take now is kept and delivered later, so this never holds
/// a task slot through an outage; an error here is logged, never a crash.
pub async fn store(backend: &dyn ResultBackend, meta: &ResultMeta, target: &ReplyTarget) {
    let result = tokio::time::timeout(STORE_TIMEOUT, backend.store(meta, target))
        .await
        .unwrap_or_else(|_| {
            Err(BackendError::Io {
                backend: backend.name(),
                reason: format!("no answer within {STORE_TIMEOUT:?}"),
            })
        });
    if let Err(e) = result {
        error!(task_id = %meta.task_id, "could not store {}: {e}", meta.status.as_str());
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
