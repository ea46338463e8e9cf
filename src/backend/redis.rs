//! `redis://`: `SETEX celery-task-meta-<id>` and `PUBLISH` on the same key.
//!
//! Celery's Redis backend stores the meta encoded with the client's
//! `result_serializer` (omega|ml: pickle) and publishes it so waiting
//! `AsyncResult.get()` calls wake up; without the PUBLISH they hang until their
//! timeout. Like Celery's key-value backends we never overwrite a stored
//! SUCCESS (a redelivered task must not clobber it): the check and the write
//! are one Lua script, so they are atomic.

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;

use super::{BackendError, ReplyTarget, ResultBackend};
use crate::protocol::result_codec::{self, Serializer};
use crate::protocol::ResultMeta;

/// `SETEX` + `PUBLISH` unless a SUCCESS is already stored. The stored value
/// may be JSON or pickle; a pickled SUCCESS is recognised by the bytes Python's
/// pickle writes for the `'status': 'SUCCESS'` item.
const STORE_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, doc = pcall(cjson.decode, cur)
  if ok and type(doc) == 'table' and doc['status'] == 'SUCCESS' then return 0 end
  if not ok and string.find(cur, 'status', 1, true) and string.find(cur, 'SUCCESS', 1, true) then return 0 end
end
redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"#;

/// Celery's Redis result backend.
pub struct RedisBackend {
    conn: ConnectionManager,
    expires: u64,
    serializer: Serializer,
    script: redis::Script,
}

impl RedisBackend {
    /// Connects to the backend URL.
    /// `tls` applies to a `rediss://` URL (ssl parameters already removed,
    /// [`crate::tls::for_url`]); `None` there trusts the system roots.
    pub async fn connect(
        url: &str,
        tls: Option<&crate::tls::TlsSettings>,
        expires: u64,
        serializer: Serializer,
    ) -> Result<Self, BackendError> {
        let default_tls;
        let tls = match (tls, url.starts_with("rediss://")) {
            (_, false) => None,
            (Some(s), true) => Some(s),
            (None, true) => {
                default_tls =
                    crate::tls::TlsSettings::new(&Default::default(), None).map_err(|e| {
                        BackendError::InvalidUrl {
                            url: crate::redact::mask_url(url),
                            reason: e.to_string(),
                        }
                    })?;
                Some(&default_tls)
            }
        };
        let trust = tls.map(crate::tls::TlsSettings::trust);
        let io = |e: redis::RedisError| {
            let text = e.to_string();
            BackendError::Io {
                backend: "redis",
                reason: format!(
                    "{} ({})",
                    crate::tls::explain("rediss", trust.as_deref(), &text).unwrap_or(text),
                    crate::redact::mask_url(url)
                ),
            }
        };
        let client = match tls {
            Some(s) => s.redis_client(url).map_err(|e| BackendError::InvalidUrl {
                url: crate::redact::mask_url(url),
                reason: e.to_string(),
            })?,
            None => redis::Client::open(url).map_err(|e| BackendError::InvalidUrl {
                url: crate::redact::mask_url(url),
                reason: e.to_string(),
            })?,
        };
        let conn = ConnectionManager::new_with_config(client, manager_config())
            .await
            .map_err(io)?;
        Ok(RedisBackend {
            conn,
            expires: expires.max(1),
            serializer,
            script: redis::Script::new(STORE_SCRIPT),
        })
    }

    /// The key Celery uses for a task's meta.
    pub fn key(task_id: &str) -> String {
        format!("celery-task-meta-{task_id}")
    }
}

/// Bounded reconnects: redis-rs' defaults (6 retries with exponential backoff,
/// 1 s connect timeout) let a refused port take over 10 s to report under load,
/// which made `om-worker check` and start-up slow to say what is wrong; its
/// 500 ms response timeout is too short for a multi-MiB result on a busy
/// server. The response timeout stays below the worker's per-attempt limit
/// (15 s, `worker::store`, which also retries a failed store a few times), so
/// the driver's own error is what gets logged.
fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(1))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)))
}

#[async_trait]
impl ResultBackend for RedisBackend {
    async fn store(&self, meta: &ResultMeta, _target: &ReplyTarget) -> Result<(), BackendError> {
        let payload = result_codec::encode_meta(self.serializer, meta);
        let mut conn = self.conn.clone();
        let _: i64 = self
            .script
            .key(Self::key(&meta.task_id))
            .arg(payload)
            .arg(self.expires)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| BackendError::Io {
                backend: "redis",
                reason: e.to_string(),
            })?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| BackendError::Io {
                backend: "redis",
                reason: e.to_string(),
            })
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}
