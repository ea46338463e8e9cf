//! Result backends: where task states go so `AsyncResult` can read them.
//!
//! One small trait, [`ResultBackend`], and one file per backend, each writing
//! exactly what Celery's Python backend of the same name writes:
//! [`rpc`] (messages to the client's reply queue), [`redis`] (`SETEX` +
//! `PUBLISH` of `celery-task-meta-<id>`) and [`mongodb`] (`celery_taskmeta`).
//! Backends only do I/O: what bytes they write comes from
//! [`crate::protocol::result_codec`], the one result encoder.

pub mod memory;
pub mod mongodb;
pub mod outbox;
pub mod redis;
pub mod rpc;

use std::sync::Arc;

use async_trait::async_trait;

use crate::broker::Broker;
use crate::protocol::result_codec::Serializer;
use crate::protocol::ResultMeta;

/// Errors from storing a result.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend URL cannot be used.
    #[error("invalid result backend URL {url}: {reason}")]
    InvalidUrl {
        /// The URL, password masked.
        url: String,
        /// Why.
        reason: String,
    },
    /// This state can never be stored, however often it is tried (a
    /// task id over AMQP's 255-byte limit for an rpc:// reply).
    #[error("result backend {backend} refuses it: {reason}")]
    Refused {
        /// Which backend.
        backend: &'static str,
        /// Why.
        reason: String,
    },
    /// Talking to the backend failed.
    #[error("result backend {backend}: {reason}")]
    Io {
        /// Which backend.
        backend: &'static str,
        /// What failed.
        reason: String,
    },
}

/// Where the result of one task goes, from its message.
#[derive(Debug, Clone, Default)]
pub struct ReplyTarget {
    /// The message's `reply_to` (rpc:// reply queue).
    pub reply_to: Option<String>,
}

/// A Celery result backend.
#[async_trait]
pub trait ResultBackend: Send + Sync {
    /// Stores (or publishes) one state of one task.
    async fn store(&self, meta: &ResultMeta, target: &ReplyTarget) -> Result<(), BackendError>;

    /// Checks that the backend is reachable (for `om-worker check`).
    async fn ping(&self) -> Result<(), BackendError>;

    /// Short name for logs.
    fn name(&self) -> &'static str;
}

/// Builds the backend a URL names. `rpc://` publishes through `broker`;
/// `mongo_url` supplies the database when a `mongodb://` URL names none.
pub async fn from_url(
    url: &str,
    broker: Arc<dyn Broker>,
    mongo_url: &str,
    result_expires: u64,
    serializer: Serializer,
    tls: &crate::tls::WorkerTls,
) -> Result<Arc<dyn ResultBackend>, BackendError> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or(url);
    match scheme {
        "rpc" => Ok(Arc::new(rpc::RpcBackend::new(broker, serializer))),
        "redis" | "rediss" => {
            // kombu's ssl_* parameters as for the broker (Celery's Redis backend reads the same).
            let (driver_url, settings) =
                crate::tls::for_url(url, tls).map_err(|e| BackendError::InvalidUrl {
                    url: crate::redact::mask_url(url),
                    reason: e.to_string(),
                })?;
            Ok(Arc::new(
                redis::RedisBackend::connect(
                    &driver_url,
                    settings.as_ref(),
                    result_expires,
                    serializer,
                )
                .await?,
            ))
        }
        // omega|ml hands Celery a mongodb:// backend URL with its TLS kwargs added (`mongo_url()`).
        "mongodb" | "mongodb+srv" => Ok(Arc::new(
            mongodb::MongoBackend::connect(
                &crate::tls::mongo_client_url(url, tls.use_ssl, tls.ca_certs.as_deref()),
                mongo_url,
                serializer,
            )
            .await?,
        )),
        other => Err(BackendError::InvalidUrl {
            url: crate::redact::mask_url(url),
            reason: format!(
                "unsupported result backend {other:?} (supported: rpc://, redis://, mongodb://)"
            ),
        }),
    }
}
