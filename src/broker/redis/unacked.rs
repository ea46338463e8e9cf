//! kombu's ack emulation: the `unacked` hash and `unacked_index` sorted set,
//! the restore of messages whose consumer vanished, and this process's own
//! set of unsettled delivery tags.
//!
//! Redis lists have no acks. kombu records every popped message in
//! `unacked` (with its exchange and routing key) until it is acked, and any
//! worker's periodic sweep pushes entries older than `visibility_timeout`
//! back onto their queues. Python workers sweep our entries and we sweep
//! theirs, so the entry format, the lock (`unacked_mutex`) and the push
//! direction must be kombu's (see the module docs of [`super`]).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{debug, error, info, warn};

use super::query::Request;
use super::Shared;
use crate::broker::BrokerError;
use crate::protocol::envelope;

/// Removes `unacked[tag]` and pushes the restored envelope only if the entry
/// is still the value that was read (compare-and-swap; kombu uses WATCH).
/// KEYS: unacked, unacked_index, destination lists...; ARGV: tag, expected
/// value, new envelope, "L" (LPUSH) or "R" (RPUSH).
pub(super) const RESTORE_CAS: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
local push = 'RPUSH'
if ARGV[4] == 'L' then push = 'LPUSH' end
for i = 3, #KEYS do redis.call(push, KEYS[i], ARGV[3]) end
return 1
"#;

/// kombu's `Mutex` release: delete the lock only if we still own it.
pub(super) const MUTEX_RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Seconds since the epoch, as kombu's `time()` scores in `unacked_index`.
fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Shared {
    pub(super) fn unsettled_snapshot(&self) -> Vec<String> {
        match self.unsettled.lock() {
            Ok(s) => s.iter().cloned().collect(),
            Err(p) => p.into_inner().iter().cloned().collect(),
        }
    }

    pub(super) fn unsettled_insert(&self, tag: &str) {
        match self.unsettled.lock() {
            Ok(mut s) => s.insert(tag.to_owned()),
            Err(p) => p.into_inner().insert(tag.to_owned()),
        };
    }

    pub(super) fn unsettled_remove(&self, tag: &str) -> bool {
        match self.unsettled.lock() {
            Ok(mut s) => s.remove(tag),
            Err(p) => p.into_inner().remove(tag),
        }
    }

    fn unsettled_contains(&self, tag: &str) -> bool {
        match self.unsettled.lock() {
            Ok(s) => s.contains(tag),
            Err(p) => p.into_inner().contains(tag),
        }
    }

    /// kombu `QoS.append`: MULTI; ZADD unacked_index; HSET unacked; EXEC.
    pub(super) async fn record_unacked(
        &self,
        tag: &str,
        envelope_text: &str,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), BrokerError> {
        let value = format!(
            "[{envelope_text}, {}, {}]",
            serde_json::Value::from(exchange),
            serde_json::Value::from(routing_key)
        );
        let score = format!("{}", now_secs());
        let idx = self.key(&self.opts.unacked_index_key);
        let hash = self.key(&self.opts.unacked_key);
        self.cmd
            .query(
                "record unacked",
                3,
                Request::Pipeline(
                    redis::pipe()
                        .atomic()
                        .cmd("ZADD")
                        .arg(&idx)
                        .arg(&score)
                        .arg(tag)
                        .ignore()
                        .cmd("HSET")
                        .arg(&hash)
                        .arg(tag)
                        .arg(&value)
                        .ignore(),
                ),
            )
            .await
    }

    /// kombu `_remove_from_indices`: MULTI; ZREM unacked_index; HDEL unacked; EXEC.
    pub(super) async fn remove_unacked(&self, tag: &str) -> Result<(), BrokerError> {
        let idx = self.key(&self.opts.unacked_index_key);
        let hash = self.key(&self.opts.unacked_key);
        self.cmd
            .query(
                "remove unacked",
                3,
                Request::Pipeline(
                    redis::pipe()
                        .atomic()
                        .cmd("ZREM")
                        .arg(&idx)
                        .arg(tag)
                        .ignore()
                        .cmd("HDEL")
                        .arg(&hash)
                        .arg(tag)
                        .ignore(),
                ),
            )
            .await
    }

    /// kombu `restore_by_tag`: puts `unacked[tag]` back on its queue(s),
    /// marked redelivered — `RPUSH` (front, consumed next) or, with
    /// `leftmost`, `LPUSH` (back) — and removes its unacked entries, all
    /// atomically. Returns whether a message was pushed.
    pub(super) async fn restore_by_tag(
        &self,
        tag: &str,
        leftmost: bool,
    ) -> Result<bool, BrokerError> {
        let hash = self.key(&self.opts.unacked_key);
        let idx = self.key(&self.opts.unacked_index_key);
        let stored: Option<String> = self
            .cmd
            .query(
                "HGET unacked",
                3,
                Request::Cmd(redis::cmd("HGET").arg(&hash).arg(tag)),
            )
            .await?;
        let Some(stored) = stored else {
            // Already settled or restored elsewhere; drop a stale index entry.
            self.remove_unacked(tag).await?;
            return Ok(false);
        };
        // Python JSON: a NaN/Infinity header in the envelope must not make it unrestorable.
        let text = crate::protocol::json::PythonJson::new(stored.as_bytes());
        let parsed: Result<serde_json::Value, _> = serde_json::from_slice(text.bytes());
        let (payload, exchange, routing_key) = match parsed {
            Ok(serde_json::Value::Array(items)) if items.len() == 3 => {
                let ex = items[1].as_str().unwrap_or_default().to_owned();
                let rk = items[2].as_str().unwrap_or_default().to_owned();
                (items[0].clone(), ex, rk)
            }
            _ => {
                return Err(BrokerError::Operation(format!(
                    "unacked entry {tag} is not [envelope, exchange, routing_key]; left in place"
                )))
            }
        };
        let marked = envelope::mark_redelivered(&text.dumps(&payload));
        let priority = envelope::priority_of(&payload);
        let queues = self.lookup(&exchange, &routing_key).await?;
        if queues.is_empty() {
            warn!(
                tag,
                exchange,
                routing_key,
                "no queue bound for restored message; dropping it as kombu does"
            );
        }
        let dests: Vec<String> = queues.iter().map(|q| self.queue_key(q, priority)).collect();
        let dir = if leftmost { "L" } else { "R" };
        let mut restore = self.restore_script.prepare_invoke();
        restore.key(&hash).key(&idx);
        for d in &dests {
            restore.key(d);
        }
        restore.arg(tag).arg(&stored).arg(&marked).arg(dir);
        let done: i64 = self
            .cmd
            .query("restore", 3, Request::Script(&restore))
            .await?;
        Ok(done == 1 && !dests.is_empty())
    }

    /// kombu `QoS.restore_visible` (without its 10-per-sweep cap).
    pub(super) async fn restore_visible(&self) -> Result<usize, BrokerError> {
        let mutex = self.key(&self.opts.unacked_mutex_key);
        let token = uuid::Uuid::new_v4().to_string();
        let px = u64::try_from(self.opts.unacked_mutex_expire.as_millis()).unwrap_or(300_000);
        let got: Option<String> = self
            .cmd
            .query(
                "SET unacked_mutex",
                3,
                Request::Cmd(
                    redis::cmd("SET")
                        .arg(&mutex)
                        .arg(&token)
                        .arg("NX")
                        .arg("PX")
                        .arg(px),
                ),
            )
            .await?;
        if got.is_none() {
            debug!("unacked_mutex held elsewhere; skipping restore sweep");
            return Ok(0);
        }
        let result = self.restore_visible_locked().await;
        let release: Result<i64, _> = self
            .cmd
            .query(
                "release unacked_mutex",
                3,
                Request::Script(self.mutex_script.key(&mutex).arg(&token)),
            )
            .await;
        if let Err(e) = release {
            warn!(error = %e, "could not release unacked_mutex (expires on its own)");
        }
        result
    }

    async fn restore_visible_locked(&self) -> Result<usize, BrokerError> {
        let idx = self.key(&self.opts.unacked_index_key);
        let ceil = now_secs() - self.opts.visibility_timeout.as_secs_f64();
        let ceil = format!("{ceil}");
        let batch = self.opts.restore_batch.max(1);
        let tags: Vec<String> = self
            .cmd
            .query(
                "ZRANGE unacked_index",
                3,
                Request::Cmd(
                    redis::cmd("ZRANGE")
                        .arg(&idx)
                        .arg(&ceil)
                        .arg(0)
                        .arg("BYSCORE")
                        .arg("REV")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(batch),
                ),
            )
            .await?;
        let mut restored = 0;
        for tag in tags {
            // Our own live deliveries are not lost; restoring them would only
            // duplicate a task we are running.
            if self.unsettled_contains(&tag) {
                continue;
            }
            match self.restore_by_tag(&tag, false).await {
                Ok(true) => restored += 1,
                Ok(false) => {}
                Err(e) => warn!(tag, error = %e, "could not restore unacked message"),
            }
        }
        if restored > 0 {
            info!(
                restored,
                "restored unacknowledged message(s) past the visibility timeout"
            );
        }
        Ok(restored)
    }

    /// Returns every unsettled delivery of this broker to its queue (RPUSH).
    pub(super) async fn restore_own(&self) -> usize {
        let tags: Vec<String> = match self.unsettled.lock() {
            Ok(mut s) => s.drain().collect(),
            Err(p) => p.into_inner().drain().collect(),
        };
        if tags.is_empty() {
            return 0;
        }
        info!("Restoring {} unacknowledged message(s)", tags.len());
        let mut n = 0;
        for tag in tags {
            match self.restore_by_tag(&tag, false).await {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => error!(tag, error = %e, "could not restore unacknowledged message"),
            }
        }
        n
    }

    /// Starts the periodic restore sweep (at once, then every
    /// `restore_interval`) unless it runs already or is disabled; it ends
    /// at broker shutdown.
    pub(super) async fn start_restorer(self: &Arc<Self>) {
        let mut restorer = self.restorer.lock().await;
        if restorer.is_none() && !self.opts.restore_interval.is_zero() {
            let s = Arc::clone(self);
            *restorer = Some(tokio::spawn(async move {
                loop {
                    if let Err(e) = s.restore_visible().await {
                        warn!(error = %e, "restore sweep failed");
                    }
                    tokio::select! {
                        _ = s.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(s.opts.restore_interval) => {}
                    }
                }
            }));
        }
    }
}
