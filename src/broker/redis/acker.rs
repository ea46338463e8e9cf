//! Settling Redis deliveries (kombu `QoS.ack` / `QoS.reject`) and giving
//! back their prefetch permits.
//!
//! A settlement removes the message's `unacked` entries or, on a requeue,
//! pushes it back marked redelivered ([`super::unacked`]). Each delivery is
//! claimed from this broker's unsettled set first, so a delivery already
//! restored (by `close`) cannot be settled twice.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::OwnedSemaphorePermit;

use super::Shared;
use crate::broker::{Acker, BrokerError};

/// Settles a delivery that was popped but never recorded in `unacked` (an
/// unreadable envelope): there is nothing left in Redis to settle; it only
/// holds the prefetch permit until the worker is done with it.
pub(super) struct PoppedAcker(pub(super) std::sync::Mutex<Option<OwnedSemaphorePermit>>);

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
    pub(super) permit: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
}

impl RedisAcker {
    fn release(&self) {
        let permit = match self.permit.lock() {
            Ok(mut p) => p.take(),
            Err(p) => p.into_inner().take(),
        };
        drop(permit);
    }

    fn claim(&self) -> Result<(), BrokerError> {
        if self.shared.unsettled_remove(&self.tag) {
            Ok(())
        } else {
            Err(BrokerError::Operation(format!(
                "delivery {} was already settled or restored to its queue",
                self.tag
            )))
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

    async fn ack(&self) -> Result<(), BrokerError> {
        self.claim()?;
        let res = self.shared.remove_unacked(&self.tag).await;
        self.release();
        res
    }

    async fn reject(&self, requeue: bool) -> Result<(), BrokerError> {
        self.claim()?;
        let res = if requeue {
            self.shared
                .restore_by_tag(&self.tag, true)
                .await
                .map(|_| ())
        } else {
            self.shared.remove_unacked(&self.tag).await
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
