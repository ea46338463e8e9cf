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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{debug, error, info, warn};

use super::query::Request;
use super::Shared;
use crate::backoff::Backoff;
use crate::broker::BrokerError;
use crate::protocol::envelope;

/// What this process keeps of a delivery it holds unsettled, so it can put
/// the message back even if Redis lost its `unacked` entry (a restart
/// without persistence): the envelope text and where it was published.
#[derive(Debug)]
pub(super) struct HeldCopy {
    /// The kombu envelope, as popped.
    pub(super) text: String,
    /// Its exchange.
    pub(super) exchange: String,
    /// Its routing key.
    pub(super) routing_key: String,
}

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
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<HeldCopy>>> {
        self.unsettled.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn acking(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.acking.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn unsettled_snapshot(&self) -> Vec<String> {
        self.held().keys().cloned().collect()
    }

    pub(super) fn unsettled_insert(&self, tag: &str, copy: Arc<HeldCopy>) {
        self.held().insert(tag.to_owned(), copy);
    }

    /// Claims `tag` from the unsettled set: `Some` (its copy) for exactly
    /// one caller — the acker, a reconnect restore or `close`.
    pub(super) fn unsettled_remove(&self, tag: &str) -> Option<Arc<HeldCopy>> {
        self.held().remove(tag)
    }

    fn unsettled_contains(&self, tag: &str) -> bool {
        self.held().contains_key(tag)
    }

    /// Tags whose ack is being retried (see [`Shared::ack_later`]).
    pub(super) fn acking_tags(&self) -> Vec<String> {
        self.acking().iter().cloned().collect()
    }

    /// An ack (or a reject without requeue) that could not reach Redis:
    /// the delivery is settled as far as this process is concerned (the
    /// task runs, omega|ml acks at start) and its `unacked` entries are
    /// removed as soon as Redis answers again. Until then neither this
    /// process's restore sweep nor a reconnect restore touches it, so the
    /// message can never be put back while it runs here.
    pub(super) fn ack_later(self: &Arc<Self>, tag: &str) {
        if !self.acking().insert(tag.to_owned()) {
            return;
        }
        let s = Arc::clone(self);
        let tag = tag.to_owned();
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(200), s.opts.max_backoff);
            loop {
                tokio::select! {
                    _ = backoff.wait() => {}
                    // `close` makes the last attempt and reports what is left.
                    _ = s.shutdown.cancelled() => return,
                }
                match s.remove_unacked(&tag).await {
                    Ok(_) => {
                        s.acking().remove(&tag);
                        info!(tag, "delivered an ack deferred by the Redis outage");
                        return;
                    }
                    Err(e) => debug!(tag, error = %e, "deferred ack still failing; retrying"),
                }
            }
        });
    }

    /// One last attempt for every deferred ack (at close); each one that
    /// still fails is logged: its message stays in `unacked`, and after the
    /// visibility timeout a sweep would run it again.
    pub(super) async fn ack_pending_once(&self) {
        for tag in self.acking_tags() {
            match self.remove_unacked(&tag).await {
                Ok(_) => {
                    self.acking().remove(&tag);
                }
                Err(e) => error!(
                    tag,
                    error = %e,
                    "ack of a started task could not be delivered before closing; after the \
                     visibility timeout a restore sweep may run it again"
                ),
            }
        }
    }

    /// After the connection came back: every delivery this process holds
    /// and has not started (prefetched, waiting for a slot or its ETA) goes
    /// back to the front of its queue now, instead of after the visibility
    /// timeout — from `unacked` if Redis kept it, else from the copy kept at
    /// delivery (a restarted Redis may have lost `unacked`). Each is claimed
    /// first, so its original delivery's ack fails and it is not run twice.
    /// (A copy popped again by this process carries the same delivery tag:
    /// then whichever of the two is acked first runs, and the other's ack
    /// fails — still once.)
    pub(super) async fn restore_held_after_outage(&self) -> usize {
        let tags = self.unsettled_snapshot();
        let mut n = 0;
        for tag in tags {
            let Some(copy) = self.unsettled_remove(&tag) else {
                continue; // settled meanwhile
            };
            match self.restore_by_tag(&tag, false, Some(&copy)).await {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => {
                    // Still unreachable: keep holding it; the next reconnect
                    // or `close` tries again.
                    warn!(tag, error = %e, "could not restore a held message after the outage; keeping it");
                    self.unsettled_insert(&tag, copy);
                }
            }
        }
        if n > 0 {
            info!(
                restored = n,
                "returned held, unstarted message(s) to their queues after the Redis outage"
            );
        }
        n
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
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZADD")
            .arg(&idx)
            .arg(&score)
            .arg(tag)
            .ignore()
            .cmd("HSET")
            .arg(&hash)
            .arg(tag)
            .arg(&value)
            .ignore();
        // The holder's record of it, in the same transaction (`holder.rs`).
        if let Some(held) = self.own_held_key() {
            pipe.cmd("SADD").arg(held).arg(tag).ignore();
        }
        self.cmd
            .query("record unacked", 3, Request::Pipeline(&pipe))
            .await
    }

    /// kombu `_remove_from_indices`: MULTI; ZREM unacked_index; HDEL unacked; EXEC
    /// (and the holder's record of it). Returns whether the `unacked` entry
    /// was still there.
    pub(super) async fn remove_unacked(&self, tag: &str) -> Result<bool, BrokerError> {
        let idx = self.key(&self.opts.unacked_index_key);
        let hash = self.key(&self.opts.unacked_key);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZREM")
            .arg(&idx)
            .arg(tag)
            .ignore()
            .cmd("HDEL")
            .arg(&hash)
            .arg(tag);
        if let Some(held) = self.own_held_key() {
            pipe.cmd("SREM").arg(held).arg(tag).ignore();
        }
        let (removed,): (i64,) = self
            .cmd
            .query("remove unacked", 3, Request::Pipeline(&pipe))
            .await?;
        Ok(removed > 0)
    }

    /// Drops `tag` from this holder's record after it went back to a queue.
    async fn forget_held(&self, tag: &str) {
        let Some(held) = self.own_held_key() else {
            return;
        };
        let res = self
            .cmd
            .query::<i64>(
                "SREM held",
                3,
                Request::Cmd(redis::cmd("SREM").arg(held).arg(tag)),
            )
            .await;
        if let Err(e) = res {
            // A stale tag only makes a later dead-holder sweep find no entry.
            debug!(tag, error = %e, "could not drop a restored tag from the holder's set");
        }
    }

    /// kombu `restore_by_tag`: puts `unacked[tag]` back on its queue(s),
    /// marked redelivered — `RPUSH` (front, consumed next) or, with
    /// `leftmost`, `LPUSH` (back) — and removes its unacked entries, all
    /// atomically. Returns whether a message was pushed.
    /// With `fallback` (the copy this process kept at delivery), a message
    /// whose entry is gone from `unacked` is pushed from that copy: the
    /// entry is gone when Redis lost its data in a restart (or, rarely,
    /// another worker's sweep restored it after the visibility timeout,
    /// which would already run it twice).
    pub(super) async fn restore_by_tag(
        &self,
        tag: &str,
        leftmost: bool,
        fallback: Option<&HeldCopy>,
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
            if let Some(copy) = fallback {
                return self.push_copy(tag, copy, leftmost).await;
            }
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
        self.forget_held(tag).await;
        Ok(done == 1 && !dests.is_empty())
    }

    /// Pushes the copy kept at delivery back onto its queue(s), marked
    /// redelivered, and drops any stale index entry, in one MULTI/EXEC.
    async fn push_copy(
        &self,
        tag: &str,
        copy: &HeldCopy,
        leftmost: bool,
    ) -> Result<bool, BrokerError> {
        let payload: serde_json::Value = serde_json::from_str(&copy.text)
            .map_err(|e| BrokerError::Operation(format!("kept copy of {tag} is not JSON: {e}")))?;
        let marked = envelope::mark_redelivered(&copy.text);
        let priority = envelope::priority_of(&payload);
        let queues = self.lookup(&copy.exchange, &copy.routing_key).await?;
        let idx = self.key(&self.opts.unacked_index_key);
        let hash = self.key(&self.opts.unacked_key);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("ZREM").arg(&idx).arg(tag).ignore();
        pipe.cmd("HDEL").arg(&hash).arg(tag).ignore();
        let push = if leftmost { "LPUSH" } else { "RPUSH" };
        for q in &queues {
            pipe.cmd(push)
                .arg(self.queue_key(q, priority))
                .arg(&marked)
                .ignore();
        }
        if let Some(held) = self.own_held_key() {
            pipe.cmd("SREM").arg(held).arg(tag).ignore();
        }
        self.cmd
            .query::<()>("restore kept copy", 3, Request::Pipeline(&pipe))
            .await?;
        if queues.is_empty() {
            warn!(tag, exchange = %copy.exchange, routing_key = %copy.routing_key,
                "no queue bound for a kept message; dropping it as kombu does");
        } else {
            info!(tag, "unacked entry was gone (Redis restarted?): restored the message from the copy kept at delivery");
        }
        Ok(!queues.is_empty())
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
            if self.unsettled_contains(&tag) || self.acking().contains(&tag) {
                continue;
            }
            match self.restore_by_tag(&tag, false, None).await {
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
        let held: Vec<(String, Arc<HeldCopy>)> = self.held().drain().collect();
        if held.is_empty() {
            return 0;
        }
        info!("Restoring {} unacknowledged message(s)", held.len());
        let mut n = 0;
        for (tag, copy) in held {
            match self.restore_by_tag(&tag, false, Some(&copy)).await {
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
