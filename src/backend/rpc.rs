//! `rpc://`: each state is a message to the client's reply queue.
//!
//! As Celery's `RPCBackend`: default exchange `""`, routing key = the task
//! message's `reply_to`; the message itself (`correlation_id` = task id,
//! delivery mode 1, no headers, priority 0, the configured result serializer —
//! omega|ml: pickle; its clients accept json too) is
//! [`result_codec::rpc_reply`]'s. The reply queue belongs to
//! the client; we never declare it, and a message without `reply_to` has
//! nowhere to send to.

use std::sync::Arc;

use async_trait::async_trait;

use super::{BackendError, ReplyTarget, ResultBackend};
use crate::broker::{Broker, BrokerError};
use crate::protocol::result_codec::{self, Serializer};
use crate::protocol::ResultMeta;

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
        let msg = result_codec::rpc_reply(self.serializer, meta);
        self.broker
            .publish("", reply_to, msg)
            .await
            .map_err(|e| match e {
                BrokerError::Unpublishable(reason) => BackendError::Refused {
                    backend: "rpc",
                    reason,
                },
                e => BackendError::Io {
                    backend: "rpc",
                    reason: e.to_string(),
                },
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
