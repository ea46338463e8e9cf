//! `rpc://`: each state is a message to the client's reply queue.
//!
//! As Celery's `RPCBackend`: default exchange `""`, routing key = the task
//! message's `reply_to`, `correlation_id` = task id, delivery mode 1, no
//! headers, priority 0, encoded with the configured result serializer
//! (omega|ml: pickle; its clients accept json too). The reply queue belongs to
//! the client; we never declare it, and a message without `reply_to` has
//! nowhere to send to.

use std::sync::Arc;

use async_trait::async_trait;

use super::{BackendError, ReplyTarget, ResultBackend, Serializer};
use crate::broker::Broker;
use crate::protocol::{Outgoing, ResultMeta};

/// Publishes results through the task broker.
pub struct RpcBackend {
    broker: Arc<dyn Broker>,
    serializer: Serializer,
}

impl RpcBackend {
    /// Publishes through `broker`, encoding with `serializer`.
    pub fn new(broker: Arc<dyn Broker>, serializer: Serializer) -> Self {
        RpcBackend { broker, serializer }
    }
}

#[async_trait]
impl ResultBackend for RpcBackend {
    async fn store(&self, meta: &ResultMeta, target: &ReplyTarget) -> Result<(), BackendError> {
        let Some(reply_to) = target.reply_to.as_deref().filter(|r| !r.is_empty()) else {
            tracing::debug!(task_id = %meta.task_id, "rpc:// result has no reply_to; not sent");
            return Ok(());
        };
        let (content_type, content_encoding) = super::content_type(self.serializer);
        let msg = Outgoing {
            body: super::encode_meta(self.serializer, meta),
            content_type: content_type.into(),
            content_encoding: content_encoding.into(),
            correlation_id: Some(meta.task_id.clone()),
            priority: Some(0),
            delivery_mode: 1,
            ..Default::default()
        };
        self.broker
            .publish("", reply_to, msg)
            .await
            .map_err(|e| BackendError::Io {
                backend: "rpc",
                reason: e.to_string(),
            })
    }

    async fn ping(&self) -> Result<(), BackendError> {
        // Reachable exactly when the broker is; `check` tests that separately.
        Ok(())
    }

    fn name(&self) -> &'static str {
        "rpc"
    }
}
