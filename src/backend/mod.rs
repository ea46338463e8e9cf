//! Result backends: where task states go so `AsyncResult` can read them.
//!
//! One small trait, [`ResultBackend`], and one file per backend, each writing
//! exactly what Celery's Python backend of the same name writes:
//! [`rpc`] (messages to the client's reply queue), [`redis`] (`SETEX` +
//! `PUBLISH` of `celery-task-meta-<id>`) and [`mongodb`] (`celery_taskmeta`).

pub mod memory;
pub mod mongodb;
pub mod redis;
pub mod rpc;

use std::sync::Arc;

use async_trait::async_trait;

use crate::broker::Broker;
pub use crate::config::Serializer;
use crate::protocol::{ResultMeta, Value};

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

/// Encodes a value with the configured result serializer.
pub fn encode(serializer: Serializer, v: &Value) -> Vec<u8> {
    match serializer {
        Serializer::Pickle => crate::protocol::pickle::encode(v),
        Serializer::Json => crate::protocol::json::encode(v),
    }
}

/// Content type and encoding of a serializer's bytes.
pub fn content_type(serializer: Serializer) -> (&'static str, &'static str) {
    match serializer {
        Serializer::Pickle => ("application/x-python-serialize", "binary"),
        Serializer::Json => ("application/json", "utf-8"),
    }
}

/// Whether a state carries an exception as its result (Celery's EXCEPTION_STATES).
fn is_exception_state(meta: &ResultMeta) -> bool {
    matches!(
        meta.status,
        crate::protocol::State::Failure
            | crate::protocol::State::Revoked
            | crate::protocol::State::Retry
    )
}

/// The whole meta dict as the backend stores or sends it. Under pickle an
/// exception is a pickled instance of its class, as a Python worker writes it
/// (for classes every client can import; others stay Celery's exception dict).
pub fn encode_meta(serializer: Serializer, meta: &ResultMeta) -> Vec<u8> {
    let v = meta_value(meta);
    match serializer {
        Serializer::Pickle if is_exception_state(meta) => {
            crate::protocol::pickle::encode_with_exception(&v, "result")
        }
        _ => encode(serializer, &v),
    }
}

/// Only the result value (the MongoDB backend's `result` field), exceptions as above.
pub fn encode_result(serializer: Serializer, meta: &ResultMeta) -> Vec<u8> {
    match serializer {
        Serializer::Pickle => {
            crate::protocol::pickle::encode_result(&meta.result, is_exception_state(meta))
        }
        Serializer::Json => encode(serializer, &meta.result),
    }
}

/// The meta dict exactly as Celery's key-value backends store it
/// (`_get_result_meta` + `task_id`; `date_done` an ISO string).
pub fn meta_value(meta: &ResultMeta) -> Value {
    Value::dict([
        ("status", Value::from(meta.status.as_str())),
        ("result", meta.result.clone()),
        (
            "traceback",
            meta.traceback.clone().map_or(Value::None, Value::Str),
        ),
        ("children", Value::List(meta.children.clone())),
        (
            "date_done",
            meta.date_done.map_or(Value::None, |d| {
                Value::Str(d.to_rfc3339_opts(chrono::SecondsFormat::Micros, false))
            }),
        ),
        ("task_id", Value::from(meta.task_id.as_str())),
    ])
}

/// Builds the backend a URL names. `rpc://` publishes through `broker`;
/// `mongo_url` supplies the database when a `mongodb://` URL names none.
pub async fn from_url(
    url: &str,
    broker: Arc<dyn Broker>,
    mongo_url: &str,
    result_expires: u64,
    serializer: Serializer,
) -> Result<Arc<dyn ResultBackend>, BackendError> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or(url);
    match scheme {
        "rpc" => Ok(Arc::new(rpc::RpcBackend::new(broker, serializer))),
        "redis" | "rediss" => Ok(Arc::new(
            redis::RedisBackend::connect(url, result_expires, serializer).await?,
        )),
        "mongodb" | "mongodb+srv" => Ok(Arc::new(
            mongodb::MongoBackend::connect(url, mongo_url, serializer).await?,
        )),
        other => Err(BackendError::InvalidUrl {
            url: crate::redact::mask_url(url),
            reason: format!(
                "unsupported result backend {other:?} (supported: rpc://, redis://, mongodb://)"
            ),
        }),
    }
}
