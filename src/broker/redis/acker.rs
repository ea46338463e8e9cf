//! Settling Redis deliveries (kombu `QoS.ack` / `QoS.reject`) and giving
//! back their prefetch permits.
//!
//! A settlement removes the message's `unacked` entries or, on a requeue,
//! pushes it back marked redelivered ([`super::unacked`]). Each delivery is
//! claimed from this broker's unsettled set first, so a delivery already
//! restored (by `close`, or after an outage) cannot be settled twice — its
//! ack fails and the worker does not run it. An ack that only cannot reach
//! Redis is kept and retried until Redis answers (the task runs meanwhile:
//! omega|ml acks at start, and nothing restores a message whose ack is
//! pending).

use std::sync::Arc;

use async_trait::async_trait;

use tracing::warn;

use super::unacked::HeldCopy;
use super::Shared;
use crate::broker::{Acker, BrokerError};
use crate::gate::GatePermit;

/// Settles a delivery that was popped but never recorded in `unacked` (an
/// unreadable envelope): there is nothing left in Redis to settle; it only
/// holds the prefetch permit until the worker is done with it.
pub(super) struct PoppedAcker(pub(super) std::sync::Mutex<Option<GatePermit>>);

#[async_trait]
impl Acker for PoppedAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        drop(self.0.lock().map(|mut p| p.take()));
        Ok(())
    }

    /// The element is gone from Redis and cannot be read, so it cannot be put
    /// back: `requeue` is refused loudly rather than reported as done.
    async fn reject(&self, requeue: bool) -> Result<(), BrokerError> {
        drop(self.0.lock().map(|mut p| p.take()));
        if requeue {
            return Err(BrokerError::Operation(
                "cannot requeue an unreadable Redis element: it was popped and never recorded \
                 in unacked"
                    .to_owned(),
            ));
        }
        Ok(())
    }
}

/// Settles one Redis delivery (kombu `QoS.ack` / `QoS.reject`).
pub(super) struct RedisAcker {
    pub(super) shared: Arc<Shared>,
    pub(super) tag: String,
    pub(super) permit: std::sync::Mutex<Option<GatePermit>>,
}

impl RedisAcker {
    fn release(&self) {
        let permit = match self.permit.lock() {
            Ok(mut p) => p.take(),
            Err(p) => p.into_inner().take(),
        };
        drop(permit);
    }

    fn claim(&self) -> Result<Arc<HeldCopy>, BrokerError> {
        self.shared.unsettled_remove(&self.tag).ok_or_else(|| {
            BrokerError::Operation(format!(
                "delivery {} was already settled or restored to its queue",
                self.tag
            ))
        })
    }

    /// Removes the `unacked` entries; when Redis cannot be reached the
    /// removal is retried in the background and the settlement counts as
    /// done (see [`Shared::ack_later`]).
    async fn remove(&self) -> Result<(), BrokerError> {
        match self.shared.remove_unacked(&self.tag).await {
            Err(BrokerError::Connection(e)) => {
                warn!(tag = %self.tag, error = %e,
                    "Redis unreachable while acking; the ack is retried once it answers");
                self.shared.ack_later(&self.tag);
                Ok(())
            }
            Err(e) => Err(e),
            Ok(true) => Ok(()),
            // The entry is gone: either Redis lost its data (restarted
            // without persistence: run it from our copy, nobody else has
            // one) or this worker was declared dead while paused and another
            // restored the message (it is on its queue again: do not run it
            // here too). The tombstone tells the two apart (`holder.rs`).
            Ok(false) => match self.shared.declared_dead().await {
                Ok(true) => Err(BrokerError::Operation(format!(
                    "delivery {} was restored to its queue by another worker after this                      worker's holder lease lapsed",
                    self.tag
                ))),
                Ok(false) => Ok(()),
                Err(e) => {
                    warn!(tag = %self.tag, error = %e, "could not check the holder tombstone; running the task");
                    Ok(())
                }
            },
        }
    }
}

#[async_trait]
impl Acker for RedisAcker {
    /// Frees this delivery's prefetch permit: the consume loop may fetch
    /// one more message. The permit is not taken back after the hold (the
    /// worker's slots bound what runs), as Celery's QoS does in effect.
    async fn hold_outside_prefetch(&self) {
        self.release();
    }

    /// Fails only when the delivery was already restored to its queue (after
    /// an outage, or at close): then it must not run. An ack that cannot
    /// reach Redis succeeds here and is delivered later.
    async fn ack(&self) -> Result<(), BrokerError> {
        self.claim()?;
        let res = self.remove().await;
        self.release();
        res
    }

    async fn reject(&self, requeue: bool) -> Result<(), BrokerError> {
        let copy = self.claim()?;
        let res = if requeue {
            let res = self
                .shared
                .restore_by_tag(&self.tag, true, Some(&copy))
                .await
                .map(|_| ());
            if res.is_err() {
                // Held again: the reconnect restore (or close) puts it back.
                self.shared.unsettled_insert(&self.tag, copy);
            }
            res
        } else {
            self.remove().await
        };
        self.release();
        res
    }
}

impl Drop for RedisAcker {
    fn drop(&mut self) {
        self.release();
    }
}
