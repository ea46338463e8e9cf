//! Settling AMQP deliveries: `basic.ack` / `basic.reject` (never
//! `multiple`), refused once the delivery's connection is gone.
//!
//! RabbitMQ requeues everything unacked when a connection closes, so once a
//! delivery's connection is gone its message is already back on the queue
//! and settling it must fail loudly instead of reporting success. Each
//! delivery remembers its session's generation; [`AmqpAcker`] compares it
//! with the live one before every settlement. The ETA hold calls are
//! forwarded to the consumer's QoS ([`Inner::adjust_held`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use lapin::options::{BasicAckOptions, BasicRejectOptions};

use super::Inner;
use crate::broker::{Acker, BrokerError};

/// Settles one AMQP delivery; refuses when its connection is gone.
pub(super) struct AmqpAcker {
    pub(super) acker: lapin::Acker,
    pub(super) generation: u64,
    pub(super) inner: Arc<Inner>,
}

impl AmqpAcker {
    fn check_alive(&self) -> Result<(), BrokerError> {
        if self.inner.live_generation.load(Ordering::SeqCst) != self.generation {
            return Err(BrokerError::Connection(
                "the delivery's AMQP connection is gone; RabbitMQ has requeued the message".into(),
            ));
        }
        Ok(())
    }

    fn settled(res: lapin::Result<bool>, what: &str) -> Result<(), BrokerError> {
        match res {
            Ok(true) => Ok(()),
            Ok(false) => Err(BrokerError::Operation(format!(
                "{what}: delivery already settled or its channel is closed"
            ))),
            Err(e) => Err(BrokerError::Operation(format!("{what}: {e}"))),
        }
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    /// Only a delivery of the live connection counts: one held across a
    /// reconnect was requeued by RabbitMQ, and the new channel's prefetch
    /// starts from zero held (see `Inner::start_consuming`).
    async fn hold_outside_prefetch(&self) {
        if self.check_alive().is_ok() {
            self.inner.adjust_held(true).await;
        }
    }

    async fn end_hold(&self) {
        if self.check_alive().is_ok() {
            self.inner.adjust_held(false).await;
        }
    }

    async fn ack(&self) -> Result<(), BrokerError> {
        self.check_alive()?;
        Self::settled(
            self.acker.ack(BasicAckOptions { multiple: false }).await,
            "basic.ack",
        )
    }

    async fn reject(&self, requeue: bool) -> Result<(), BrokerError> {
        self.check_alive()?;
        Self::settled(
            self.acker.reject(BasicRejectOptions { requeue }).await,
            "basic.reject",
        )
    }
}
