//! kombu's Redis transport (`kombu/transport/redis.py`), key for key.
//!
//! * **Queues** are lists: `L` for priority step 0 (served first) and
//!   `L\x06\x16<step>` for steps 3, 6, 9. Publishers `LPUSH`, consumers
//!   `BRPOP` over every queue and step, ordered by step first then queue,
//!   1 s timeout, rotating the queue order after each delivery (round robin),
//!   and only while fewer than `prefetch` deliveries are unsettled.
//! * **Ack emulation.** Right after a pop: `MULTI; ZADD unacked_index <time>
//!   <tag>; HSET unacked <tag> [envelope, exchange, routing_key]; EXEC`,
//!   exactly kombu's `QoS.append`. Ack and `reject(requeue=false)` remove both
//!   entries; `reject(requeue=true)` `LPUSH`es the envelope back (back of the
//!   queue) marked redelivered.
//! * **Restore sweep.** At start and every `restore_interval`, under the
//!   `unacked_mutex` lock (`SET NX PX`, released by compare-and-delete), every
//!   tag older than `visibility_timeout` is pushed back with `RPUSH` (front of
//!   the queue) marked redelivered. `close` restores this broker's own
//!   unsettled deliveries right away, as kombu does on channel close.
//!
//! **Crash window.** Like kombu, the pop (`BRPOP`) and the record
//! (`MULTI/EXEC`) are two round trips; a process killed between them loses
//! that message. A Lua "pop and record" cannot block (blocking commands do not
//! block inside scripts) and any staging list would be invisible to Python
//! workers' restore, so we keep kombu's exact sequence and record immediately
//! after the reply, retrying the record (never re-delivering unrecorded) if
//! Redis hiccups.
//!
//! **Per-message atomicity of restores** uses a small compare-and-swap Lua
//! script instead of kombu's `WATCH/MULTI`: the envelope is read and marked in
//! Rust, and the script removes the `unacked` entry and pushes the marked
//! copy only if the entry is still exactly what was read. The result on the
//! server is identical to kombu's transaction, and it works on a multiplexed
//! connection (where `WATCH` state would be shared).
//!
//! **Timeouts.** redis-rs 1.x gives async connections a 500 ms response
//! timeout by default (redis-rs#1924), which would cut a 1 s `BRPOP`. The
//! blocking connection is dedicated and uses `brpop_timeout + 5 s`; the
//! command connection uses 5 s.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, Script};
use tokio::sync::{mpsc, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{Acker, Broker, BrokerError, Delivery, FanoutSubscription};
use crate::protocol::envelope;
use crate::protocol::{Outgoing, RawMessage};
use crate::redact::mask_url;

/// Options for [`RedisBroker::connect`]; the names and defaults are kombu's
/// `broker_transport_options`, which must match the clients'.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Unacked messages older than this are restored by the sweep (kombu
    /// `visibility_timeout`, 3600 s).
    pub visibility_timeout: Duration,
    /// How often the restore sweep runs (kombu: about every 100 s). Zero
    /// disables the sweep (when other workers are trusted to run it).
    pub restore_interval: Duration,
    /// Priority buckets (kombu `priority_steps`, `[0, 3, 6, 9]`).
    pub priority_steps: Vec<u8>,
    /// Separator between queue name and step, and in binding members
    /// (kombu `sep`, `"\x06\x16"`).
    pub sep: String,
    /// Prepended verbatim to every key and pub/sub channel (kombu
    /// `global_keyprefix`, empty by default).
    pub global_keyprefix: String,
    /// kombu `unacked_key`.
    pub unacked_key: String,
    /// kombu `unacked_index_key`.
    pub unacked_index_key: String,
    /// kombu `unacked_mutex_key`.
    pub unacked_mutex_key: String,
    /// kombu `unacked_mutex_expire` (300 s).
    pub unacked_mutex_expire: Duration,
    /// `BRPOP` timeout (kombu `brpop_timeout`, 1 s; whole seconds are sent).
    pub brpop_timeout: Duration,
    /// Fanout pub/sub prefix; `None` = kombu's `"/{db}."`.
    pub fanout_prefix: Option<String>,
    /// Exchanges published with `PUBLISH` instead of list pushes. kombu knows
    /// exchange types from in-process declarations; a worker only ever
    /// publishes to these fanout ones (events, remote control).
    pub fanout_exchanges: Vec<String>,
    /// Most tags restored per sweep.
    pub restore_batch: usize,
    /// Upper bound of the reconnect backoff.
    pub max_backoff: Duration,
    /// `CLIENT SETNAME` for every connection, so operators (and tests) can
    /// tell the worker's connections apart in `CLIENT LIST`.
    pub client_name: Option<String>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            visibility_timeout: Duration::from_secs(3600),
            restore_interval: Duration::from_secs(60),
            priority_steps: vec![0, 3, 6, 9],
            sep: "\x06\x16".to_owned(),
            global_keyprefix: String::new(),
            unacked_key: "unacked".to_owned(),
            unacked_index_key: "unacked_index".to_owned(),
            unacked_mutex_key: "unacked_mutex".to_owned(),
            unacked_mutex_expire: Duration::from_secs(300),
            brpop_timeout: Duration::from_secs(1),
            fanout_prefix: None,
            fanout_exchanges: vec!["celery.pidbox".to_owned(), "celeryev".to_owned()],
            restore_batch: 1000,
            max_backoff: Duration::from_secs(2),
            client_name: None,
        }
    }
}

/// Removes `unacked[tag]` and pushes the restored envelope only if the entry
/// is still the value that was read (compare-and-swap; kombu uses WATCH).
/// KEYS: unacked, unacked_index, destination lists...; ARGV: tag, expected
/// value, new envelope, "L" (LPUSH) or "R" (RPUSH).
const RESTORE_CAS: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
local push = 'RPUSH'
if ARGV[4] == 'L' then push = 'LPUSH' end
for i = 3, #KEYS do redis.call(push, KEYS[i], ARGV[3]) end
return 1
"#;

/// kombu's `Mutex` release: delete the lock only if we still own it.
const MUTEX_RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// A kombu-compatible Redis broker (see the module docs).
pub struct RedisBroker {
    shared: Arc<Shared>,
}

struct Shared {
    opts: RedisOptions,
    masked_url: String,
    db: i64,
    client: Client,
    cmd: Conn,
    /// Delivery tags popped by this broker and not yet settled.
    unsettled: std::sync::Mutex<HashSet<String>>,
    consumer_stop: Mutex<CancellationToken>,
    consumer: Mutex<Option<JoinHandle<()>>>,
    shutdown: CancellationToken,
    restorer: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
    restore_script: Script,
    mutex_script: Script,
    /// The queues the consume loop polls; changed at runtime by
    /// `add_queue`/`cancel_queue` (remote control), read once per BRPOP.
    live_queues: std::sync::Mutex<Vec<String>>,
}

/// One lazily (re)connected multiplexed connection.
struct Conn {
    client: Client,
    config: AsyncConnectionConfig,
    slot: Mutex<Option<MultiplexedConnection>>,
    max_backoff: Duration,
    client_name: Option<String>,
}

impl Conn {
    fn new(
        client: Client,
        response_timeout: Duration,
        max_backoff: Duration,
        client_name: Option<String>,
    ) -> Self {
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        Self {
            client,
            config,
            slot: Mutex::new(None),
            max_backoff,
            client_name,
        }
    }

    async fn get(&self) -> Result<MultiplexedConnection, RedisError> {
        let mut slot = self.slot.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let mut c = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        if let Some(name) = &self.client_name {
            redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(name)
                .query_async::<()>(&mut c)
                .await?;
        }
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn invalidate(&self) {
        *self.slot.lock().await = None;
    }

    /// Runs `f` on the connection, reconnecting and retrying (100 ms
    /// doubling backoff) on connection-level errors, up to `attempts` times.
    /// Only idempotent operations (or ones where a duplicate is acceptable,
    /// like publishing at-least-once) go through here.
    async fn run<T, F, Fut>(&self, what: &str, attempts: u32, f: F) -> Result<T, BrokerError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let mut backoff = Duration::from_millis(100);
        let mut last = String::new();
        for attempt in 0..attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(self.max_backoff);
            }
            let conn = match self.get().await {
                Ok(c) => c,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            match f(conn).await {
                Ok(v) => return Ok(v),
                Err(e) if is_connection_error(&e) => {
                    debug!(error = %e, what, "Redis connection error; reconnecting");
                    self.invalidate().await;
                    last = e.to_string();
                }
                Err(e) => return Err(BrokerError::Operation(format!("{what}: {e}"))),
            }
        }
        Err(BrokerError::Connection(format!("{what}: {last}")))
    }
}

fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl RedisBroker {
    /// Opens a client for `url` (`redis://[:password@]host:port/db`,
    /// `rediss://`, `unix://`, and kombu's `redis+socket://`) and checks that
    /// the server answers. Reconnects happen on their own later.
    pub async fn connect(url: &str, options: RedisOptions) -> Result<Self, BrokerError> {
        let masked_url = mask_url(url);
        let url_fixed = match url.strip_prefix("redis+socket://") {
            Some(rest) => format!("unix://{rest}"),
            None => url.to_owned(),
        };
        let client = Client::open(url_fixed.as_str())
            .map_err(|e| BrokerError::InvalidUrl(format!("{masked_url}: {:?}", e.kind())))?;
        let db = client.get_connection_info().redis_settings().db();
        let cmd = Conn::new(
            client.clone(),
            Duration::from_secs(5),
            options.max_backoff,
            options.client_name.clone(),
        );
        let shared = Arc::new(Shared {
            opts: options,
            masked_url,
            db,
            client,
            cmd,
            unsettled: std::sync::Mutex::new(HashSet::new()),
            consumer_stop: Mutex::new(CancellationToken::new()),
            consumer: Mutex::new(None),
            shutdown: CancellationToken::new(),
            restorer: Mutex::new(None),
            closed: AtomicBool::new(false),
            restore_script: Script::new(RESTORE_CAS),
            mutex_script: Script::new(MUTEX_RELEASE),
            live_queues: std::sync::Mutex::new(Vec::new()),
        });
        let pong: String = shared
            .cmd
            .run("PING", 1, |mut c| async move {
                redis::cmd("PING").query_async(&mut c).await
            })
            .await
            .map_err(|e| BrokerError::Connection(e.to_string()))?;
        debug!(reply = %pong, "Redis PING");
        info!(url = %shared.masked_url, "connected to Redis broker");
        Ok(Self { shared })
    }

    /// Declares `queue` the way kombu does for a queue without `x-expires`:
    /// `SADD _kombu.binding.L "L\x06\x16\x06\x16L"` and the same member in
    /// `_kombu.binding_permanent.L` (kombu ≥ 5.7), in one MULTI/EXEC.
    pub async fn declare_queue(&self, queue: &str) -> Result<(), BrokerError> {
        self.shared.declare_queue(queue).await
    }

    /// One restore sweep: returns the number of messages put back. Skips
    /// (returns 0) when another process holds `unacked_mutex`.
    pub async fn restore_visible(&self) -> Result<usize, BrokerError> {
        self.shared.restore_visible().await
    }

    /// The delivery tags this broker holds unsettled (for diagnostics).
    pub fn unsettled_tags(&self) -> Vec<String> {
        self.shared.unsettled_snapshot()
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        // A drop without close() is a crash as far as Redis is concerned:
        // stop polling, leave `unacked` for the visibility-timeout sweep.
        self.shared.shutdown.cancel();
        if let Ok(tok) = self.shared.consumer_stop.try_lock() {
            tok.cancel();
        }
    }
}

impl Shared {
    fn key(&self, name: &str) -> String {
        format!("{}{}", self.opts.global_keyprefix, name)
    }

    /// kombu `_q_for_pri(queue, priority(p))`, prefixed.
    fn queue_key(&self, queue: &str, priority: u8) -> String {
        let step = self.step_for(priority);
        if step == 0 {
            self.key(queue)
        } else {
            self.key(&format!("{queue}{}{step}", self.opts.sep))
        }
    }

    /// `steps[bisect(steps, p) - 1]`, `p` clamped to 0..=9.
    fn step_for(&self, priority: u8) -> u8 {
        let p = priority.min(9);
        self.opts
            .priority_steps
            .iter()
            .copied()
            .filter(|s| *s <= p)
            .max()
            .unwrap_or(0)
    }

    fn binding_member(&self, queue: &str) -> String {
        // routing_key + sep + pattern("") + sep + queue
        format!("{queue}{sep}{sep}{queue}", sep = self.opts.sep)
    }

    fn live_queues(&self) -> Vec<String> {
        match self.live_queues.lock() {
            Ok(q) => q.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_live_queues(&self, f: impl FnOnce(&mut Vec<String>)) {
        match self.live_queues.lock() {
            Ok(mut q) => f(&mut q),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// kombu's fanout channel for `exchange` (`/<db>.<exchange>`, prefixed).
    fn fanout_channel(&self, exchange: &str) -> String {
        let prefix = self
            .opts
            .fanout_prefix
            .clone()
            .unwrap_or_else(|| format!("/{}.", self.db));
        format!("{}{prefix}{exchange}", self.opts.global_keyprefix)
    }

    fn unsettled_snapshot(&self) -> Vec<String> {
        match self.unsettled.lock() {
            Ok(s) => s.iter().cloned().collect(),
            Err(p) => p.into_inner().iter().cloned().collect(),
        }
    }

    fn unsettled_insert(&self, tag: &str) {
        match self.unsettled.lock() {
            Ok(mut s) => s.insert(tag.to_owned()),
            Err(p) => p.into_inner().insert(tag.to_owned()),
        };
    }

    fn unsettled_remove(&self, tag: &str) -> bool {
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

    async fn declare_queue(&self, queue: &str) -> Result<(), BrokerError> {
        let member = self.binding_member(queue);
        let k1 = self.key(&format!("_kombu.binding.{queue}"));
        let k2 = self.key(&format!("_kombu.binding_permanent.{queue}"));
        self.cmd
            .run("declare queue", 3, |mut c| {
                let (member, k1, k2) = (&member, &k1, &k2);
                async move {
                    redis::pipe()
                        .atomic()
                        .cmd("SADD")
                        .arg(k1)
                        .arg(member)
                        .ignore()
                        .cmd("SADD")
                        .arg(k2)
                        .arg(member)
                        .ignore()
                        .query_async::<()>(&mut c)
                        .await
                }
            })
            .await
    }

    /// Queues bound to `exchange` with exactly `routing_key` (kombu's direct
    /// lookup over `_kombu.binding.<exchange>`); the anon exchange routes to
    /// the queue named by the routing key.
    async fn lookup(&self, exchange: &str, routing_key: &str) -> Result<Vec<String>, BrokerError> {
        if exchange.is_empty() {
            return Ok(vec![routing_key.to_owned()]);
        }
        let key = self.key(&format!("_kombu.binding.{exchange}"));
        let members: Vec<Vec<u8>> = self
            .cmd
            .run("SMEMBERS", 3, |mut c| {
                let key = &key;
                async move { redis::cmd("SMEMBERS").arg(key).query_async(&mut c).await }
            })
            .await?;
        let mut queues = Vec::new();
        for m in members {
            let text = String::from_utf8_lossy(&m);
            let parts: Vec<&str> = text.split(self.opts.sep.as_str()).collect();
            if let [rk, _pattern, queue] = parts.as_slice() {
                if *rk == routing_key && !queues.iter().any(|q| q == queue) {
                    queues.push((*queue).to_owned());
                }
            }
        }
        Ok(queues)
    }

    /// kombu `QoS.append`: MULTI; ZADD unacked_index; HSET unacked; EXEC.
    async fn record_unacked(
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
            .run("record unacked", 3, |mut c| {
                let (value, score, idx, hash) = (&value, &score, &idx, &hash);
                async move {
                    redis::pipe()
                        .atomic()
                        .cmd("ZADD")
                        .arg(idx)
                        .arg(score)
                        .arg(tag)
                        .ignore()
                        .cmd("HSET")
                        .arg(hash)
                        .arg(tag)
                        .arg(value)
                        .ignore()
                        .query_async::<()>(&mut c)
                        .await
                }
            })
            .await
    }

    /// kombu `_remove_from_indices`: MULTI; ZREM unacked_index; HDEL unacked; EXEC.
    async fn remove_unacked(&self, tag: &str) -> Result<(), BrokerError> {
        let idx = self.key(&self.opts.unacked_index_key);
        let hash = self.key(&self.opts.unacked_key);
        self.cmd
            .run("remove unacked", 3, |mut c| {
                let (idx, hash) = (&idx, &hash);
                async move {
                    redis::pipe()
                        .atomic()
                        .cmd("ZREM")
                        .arg(idx)
                        .arg(tag)
                        .ignore()
                        .cmd("HDEL")
                        .arg(hash)
                        .arg(tag)
                        .ignore()
                        .query_async::<()>(&mut c)
                        .await
                }
            })
            .await
    }

    /// kombu `restore_by_tag`: puts `unacked[tag]` back on its queue(s),
    /// marked redelivered — `RPUSH` (front, consumed next) or, with
    /// `leftmost`, `LPUSH` (back) — and removes its unacked entries, all
    /// atomically. Returns whether a message was pushed.
    async fn restore_by_tag(&self, tag: &str, leftmost: bool) -> Result<bool, BrokerError> {
        let hash = self.key(&self.opts.unacked_key);
        let idx = self.key(&self.opts.unacked_index_key);
        let stored: Option<String> = self
            .cmd
            .run("HGET unacked", 3, |mut c| {
                let hash = &hash;
                async move {
                    redis::cmd("HGET")
                        .arg(hash)
                        .arg(tag)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        let Some(stored) = stored else {
            // Already settled or restored elsewhere; drop a stale index entry.
            self.remove_unacked(tag).await?;
            return Ok(false);
        };
        let parsed: Result<serde_json::Value, _> = serde_json::from_str(&stored);
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
        let marked = envelope::mark_redelivered(&payload.to_string());
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
        let done: i64 = self
            .cmd
            .run("restore", 3, |mut c| {
                let (hash, idx, dests, stored, marked) = (&hash, &idx, &dests, &stored, &marked);
                async move {
                    let mut inv = self.restore_script.prepare_invoke();
                    inv.key(hash).key(idx);
                    for d in dests {
                        inv.key(d);
                    }
                    inv.arg(tag).arg(stored).arg(marked).arg(dir);
                    inv.invoke_async(&mut c).await
                }
            })
            .await?;
        Ok(done == 1 && !dests.is_empty())
    }

    /// kombu `QoS.restore_visible` (without its 10-per-sweep cap).
    async fn restore_visible(&self) -> Result<usize, BrokerError> {
        let mutex = self.key(&self.opts.unacked_mutex_key);
        let token = uuid::Uuid::new_v4().to_string();
        let px = u64::try_from(self.opts.unacked_mutex_expire.as_millis()).unwrap_or(300_000);
        let got: Option<String> = self
            .cmd
            .run("SET unacked_mutex", 3, |mut c| {
                let (mutex, token) = (&mutex, &token);
                async move {
                    redis::cmd("SET")
                        .arg(mutex)
                        .arg(token)
                        .arg("NX")
                        .arg("PX")
                        .arg(px)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        if got.is_none() {
            debug!("unacked_mutex held elsewhere; skipping restore sweep");
            return Ok(0);
        }
        let result = self.restore_visible_locked().await;
        let release: Result<i64, _> = self
            .cmd
            .run("release unacked_mutex", 3, |mut c| {
                let (mutex, token) = (&mutex, &token);
                async move {
                    self.mutex_script
                        .key(mutex)
                        .arg(token)
                        .invoke_async(&mut c)
                        .await
                }
            })
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
            .run("ZRANGE unacked_index", 3, |mut c| {
                let (idx, ceil) = (&idx, &ceil);
                async move {
                    redis::cmd("ZRANGE")
                        .arg(idx)
                        .arg(ceil)
                        .arg(0)
                        .arg("BYSCORE")
                        .arg("REV")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(batch)
                        .query_async(&mut c)
                        .await
                }
            })
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
    async fn restore_own(&self) -> usize {
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
}

/// The consume loop: BRPOP while under the prefetch limit, record, deliver.
async fn consume_loop(
    shared: Arc<Shared>,
    queues: Vec<String>,
    semaphore: Option<Arc<Semaphore>>,
    tx: mpsc::Sender<Delivery>,
    stop: CancellationToken,
) {
    let conn = Conn::new(
        shared.client.clone(),
        shared.opts.brpop_timeout + Duration::from_secs(5),
        shared.opts.max_backoff,
        shared.opts.client_name.clone(),
    );
    let timeout_secs = shared.opts.brpop_timeout.as_secs().max(1);
    let mut order = queues;
    let mut backoff = Duration::from_millis(100);
    let mut was_down = false;
    loop {
        if stop.is_cancelled() {
            break;
        }
        let permit = match &semaphore {
            Some(sem) => tokio::select! {
                p = Arc::clone(sem).acquire_owned() => match p {
                    Ok(p) => Some(p),
                    Err(_) => break,
                },
                _ = stop.cancelled() => break,
            },
            None => None,
        };
        // Queues added or cancelled by remote control since the last pop.
        let live = shared.live_queues();
        order.retain(|q| live.contains(q));
        for q in live {
            if !order.contains(&q) {
                order.push(q);
            }
        }
        if order.is_empty() {
            drop(permit);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(shared.opts.brpop_timeout) => {}
            }
            continue;
        }
        let mut keys: Vec<String> = Vec::new();
        for step in &shared.opts.priority_steps {
            for q in &order {
                keys.push(shared.queue_key(q, *step));
            }
        }
        let popped = match conn.get().await {
            Ok(mut c) => {
                // Never cancelled mid-flight: a dropped BRPOP whose reply
                // arrives later would lose the popped message.
                redis::cmd("BRPOP")
                    .arg(&keys)
                    .arg(timeout_secs)
                    .query_async::<Option<(Vec<u8>, Vec<u8>)>>(&mut c)
                    .await
            }
            Err(e) => Err(e),
        };
        let (key, item) = match popped {
            Ok(Some(kv)) => kv,
            Ok(None) => {
                if was_down {
                    info!(url = %shared.masked_url, "Redis connection restored");
                    crate::telemetry::broker_reconnected();
                    was_down = false;
                    backoff = Duration::from_millis(100);
                }
                continue;
            }
            Err(e) => {
                drop(permit);
                conn.invalidate().await;
                if !was_down {
                    warn!(url = %shared.masked_url, error = %e, "Redis BRPOP failed; reconnecting");
                }
                was_down = true;
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(shared.opts.max_backoff);
                continue;
            }
        };
        if was_down {
            info!(url = %shared.masked_url, "Redis connection restored");
            crate::telemetry::broker_reconnected();
            was_down = false;
            backoff = Duration::from_millis(100);
        }
        // Which queue it came from: strip the prefix and the priority suffix
        // (kombu: `dest.rsplit(sep, 1)[0]`), then rotate it to the end.
        let key = String::from_utf8_lossy(&key).into_owned();
        let key = key
            .strip_prefix(shared.opts.global_keyprefix.as_str())
            .unwrap_or(&key)
            .to_owned();
        let dest = match key.rsplit_once(shared.opts.sep.as_str()) {
            Some((q, _)) => q.to_owned(),
            None => key.clone(),
        };
        // A BRPOP issued before `cancel_queue` may still pop from that queue:
        // put the message back at the front for whoever consumes it now.
        if !shared.live_queues().contains(&dest) {
            let full_key = format!("{}{key}", shared.opts.global_keyprefix);
            let back = shared
                .cmd
                .run("RPUSH (cancelled queue)", 5, |mut c| {
                    let (full_key, item) = (&full_key, &item);
                    async move {
                        redis::cmd("RPUSH")
                            .arg(full_key)
                            .arg(item)
                            .query_async::<i64>(&mut c)
                            .await
                    }
                })
                .await;
            match back {
                Ok(_) => {
                    drop(permit);
                    continue;
                }
                Err(e) => error!(queue = %dest, error = %e,
                    "could not return a message popped from a cancelled queue; delivering it"),
            }
        }
        if let Some(pos) = order.iter().position(|q| *q == dest) {
            let q = order.remove(pos);
            order.push(q);
        }
        if !deliver(&shared, &dest, item, permit, &tx).await {
            break;
        }
    }
    debug!("Redis consumer loop stopped");
}

/// Records and hands over one popped element. Returns false when the worker
/// dropped its receiver.
async fn deliver(
    shared: &Arc<Shared>,
    dest: &str,
    item: Vec<u8>,
    permit: Option<OwnedSemaphorePermit>,
    tx: &mpsc::Sender<Delivery>,
) -> bool {
    let (mut message, tag) = match envelope::parse(&item) {
        Ok(v) => v,
        Err(e) => {
            let preview: String = String::from_utf8_lossy(&item).chars().take(200).collect();
            let Some(mut salvaged) = envelope::salvage(&item, &e) else {
                // Not even a task id: nobody to answer. kombu would fail the
                // same way (and lose it); say what it was.
                error!(queue = dest, error = %e, preview, "dropping a list element that is not a kombu envelope");
                return true;
            };
            // The task id is readable: hand it to the worker, which fails it
            // (FAILURE to the client) with this reason. Already popped and
            // never recorded in `unacked`: settling it is a no-op.
            error!(
                queue = dest,
                task_id = salvaged.correlation_id.as_deref().unwrap_or("?"),
                error = %e, preview,
                "list element is not a valid kombu envelope; failing its task"
            );
            if salvaged.routing_key.is_empty() {
                salvaged.routing_key = dest.to_owned();
            }
            let delivery = Delivery {
                message: salvaged,
                acker: Box::new(PoppedAcker(std::sync::Mutex::new(permit))),
            };
            return tx.send(delivery).await.is_ok();
        }
    };
    let text = String::from_utf8_lossy(&item).into_owned();
    if message.routing_key.is_empty() && message.exchange.is_empty() {
        message.routing_key = dest.to_owned();
    }
    // Record before delivering; keep trying through a Redis hiccup rather
    // than run a message nobody could restore.
    let mut backoff = Duration::from_millis(200);
    loop {
        match shared
            .record_unacked(&tag, &text, &message.exchange, &message.routing_key)
            .await
        {
            Ok(()) => break,
            Err(e) => {
                error!(tag, error = %e, "could not record unacked delivery; retrying");
                if shared.closed.load(Ordering::SeqCst) {
                    return false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(shared.opts.max_backoff);
            }
        }
    }
    shared.unsettled_insert(&tag);
    let acker = RedisAcker {
        shared: Arc::clone(shared),
        tag: tag.clone(),
        permit: std::sync::Mutex::new(permit),
    };
    let delivery = Delivery {
        message,
        acker: Box::new(acker),
    };
    if tx.send(delivery).await.is_err() {
        // Nobody will settle it: put it back at the front right away.
        if let Err(e) = shared.restore_by_tag(&tag, false).await {
            error!(tag, error = %e, "could not restore undeliverable message");
        }
        shared.unsettled_remove(&tag);
        return false;
    }
    true
}

/// Settles a delivery that was popped but never recorded in `unacked` (an
/// unreadable envelope): there is nothing left in Redis to settle; it only
/// holds the prefetch permit until the worker is done with it.
struct PoppedAcker(std::sync::Mutex<Option<OwnedSemaphorePermit>>);

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
struct RedisAcker {
    shared: Arc<Shared>,
    tag: String,
    permit: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
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

#[async_trait]
impl Broker for RedisBroker {
    async fn declare_queue(&self, name: &str) -> Result<(), BrokerError> {
        RedisBroker::declare_queue(self, name).await
    }

    async fn consume(
        &self,
        queues: &[String],
        prefetch: u16,
    ) -> Result<mpsc::Receiver<Delivery>, BrokerError> {
        let shared = &self.shared;
        if shared.closed.load(Ordering::SeqCst) {
            return Err(BrokerError::Operation("broker is closed".into()));
        }
        let mut consumer = shared.consumer.lock().await;
        if consumer.as_ref().is_some_and(|h| !h.is_finished()) {
            return Err(BrokerError::Operation("already consuming".into()));
        }
        for q in queues {
            shared.declare_queue(q).await?;
        }
        let stop = CancellationToken::new();
        *shared.consumer_stop.lock().await = stop.clone();
        shared.set_live_queues(|q| *q = queues.to_vec());
        let semaphore = (prefetch > 0).then(|| Arc::new(Semaphore::new(usize::from(prefetch))));
        let (tx, rx) = mpsc::channel(usize::from(prefetch.max(1)).max(16));
        *consumer = Some(tokio::spawn(consume_loop(
            Arc::clone(shared),
            queues.to_vec(),
            semaphore,
            tx,
            stop,
        )));
        let mut restorer = shared.restorer.lock().await;
        if restorer.is_none() && !shared.opts.restore_interval.is_zero() {
            let s = Arc::clone(shared);
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
        info!(queues = ?queues, prefetch, "consuming from Redis");
        Ok(rx)
    }

    async fn stop_consuming(&self) -> Result<(), BrokerError> {
        self.shared.consumer_stop.lock().await.cancel();
        let handle = self.shared.consumer.lock().await.take();
        if let Some(h) = handle {
            // At most one BRPOP timeout plus a record.
            let limit = self.shared.opts.brpop_timeout + Duration::from_secs(10);
            if tokio::time::timeout(limit, h).await.is_err() {
                warn!("Redis consumer did not stop in time");
            }
        }
        Ok(())
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Outgoing,
    ) -> Result<(), BrokerError> {
        let s = &self.shared;
        let tag = uuid::Uuid::new_v4().to_string();
        let env = envelope::build(&message, exchange, routing_key, &tag);
        if s.opts.fanout_exchanges.iter().any(|e| e == exchange) {
            let mut channel = s.fanout_channel(exchange);
            if !routing_key.is_empty() {
                channel.push('/');
                channel.push_str(routing_key);
            }
            return s
                .cmd
                .run("PUBLISH", 3, |mut c| {
                    let (channel, env) = (&channel, &env);
                    async move {
                        redis::cmd("PUBLISH")
                            .arg(channel)
                            .arg(env)
                            .query_async::<i64>(&mut c)
                            .await
                    }
                })
                .await
                .map(|_| ());
        }
        let queues = s.lookup(exchange, routing_key).await?;
        if queues.is_empty() {
            debug!(
                exchange,
                routing_key, "no queue bound; message dropped as kombu does"
            );
        }
        let priority = message.priority.unwrap_or(0);
        for q in queues {
            let key = s.queue_key(&q, priority);
            s.cmd
                .run("LPUSH", 3, |mut c| {
                    let (key, env) = (&key, &env);
                    async move {
                        redis::cmd("LPUSH")
                            .arg(key)
                            .arg(env)
                            .query_async::<i64>(&mut c)
                            .await
                    }
                })
                .await?;
        }
        Ok(())
    }

    async fn close(&self) -> Result<(), BrokerError> {
        self.stop_consuming().await?;
        self.shared.closed.store(true, Ordering::SeqCst);
        let n = self.shared.restore_own().await;
        debug!(restored = n, "restored own unsettled deliveries on close");
        self.shared.shutdown.cancel();
        let restorer = self.shared.restorer.lock().await.take();
        if let Some(h) = restorer {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
        self.shared.cmd.invalidate().await;
        info!(url = %self.shared.masked_url, "closed Redis broker");
        Ok(())
    }

    async fn subscribe_fanout(
        &self,
        subscription: FanoutSubscription,
    ) -> Result<mpsc::Receiver<RawMessage>, BrokerError> {
        let s = &self.shared;
        // kombu's binding for the node's pidbox queue (routing key and
        // pattern empty); fanout delivery itself does not need it, but
        // tools that list bindings expect it.
        let key = s.key(&format!("_kombu.binding.{}", subscription.exchange));
        let member = format!("{sep}{sep}{}", subscription.queue, sep = s.opts.sep);
        s.cmd
            .run("SADD binding", 3, |mut c| {
                let (key, member) = (&key, &member);
                async move {
                    redis::cmd("SADD")
                        .arg(key)
                        .arg(member)
                        .query_async::<i64>(&mut c)
                        .await
                }
            })
            .await?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(pubsub_loop(Arc::clone(s), subscription, tx));
        Ok(rx)
    }

    async fn add_queue(&self, queue: &str) -> Result<(), BrokerError> {
        self.shared.declare_queue(queue).await?;
        self.shared.set_live_queues(|q| {
            if !q.iter().any(|x| x == queue) {
                q.push(queue.to_owned());
            }
        });
        info!(queue, "started consuming queue");
        Ok(())
    }

    async fn cancel_queue(&self, queue: &str) -> Result<(), BrokerError> {
        self.shared.set_live_queues(|q| q.retain(|x| x != queue));
        info!(queue, "stopped consuming queue");
        Ok(())
    }
}

/// kombu's fanout emulation: `PSUBSCRIBE /<db>.<exchange>` on a dedicated
/// pub/sub connection, each message a kombu envelope. Resubscribes after a
/// dropped connection (messages published meanwhile are lost, as with
/// kombu: pub/sub has no backlog). Ends at close or when the receiver is
/// dropped.
async fn pubsub_loop(shared: Arc<Shared>, sub: FanoutSubscription, tx: mpsc::Sender<RawMessage>) {
    use futures_util::StreamExt as _;
    let pattern = shared.fanout_channel(&sub.exchange);
    let mut backoff = Duration::from_millis(200);
    loop {
        if shared.shutdown.is_cancelled() || tx.is_closed() {
            break;
        }
        let subscribed = async {
            let mut ps = shared.client.get_async_pubsub().await?;
            ps.psubscribe(&pattern).await?;
            Ok::<_, RedisError>(ps)
        }
        .await;
        match subscribed {
            Ok(mut ps) => {
                debug!(pattern, "subscribed to broadcast channel");
                backoff = Duration::from_millis(200);
                let mut stream = ps.on_message();
                loop {
                    let msg = tokio::select! {
                        _ = shared.shutdown.cancelled() => None,
                        m = stream.next() => m,
                    };
                    let Some(msg) = msg else { break };
                    match envelope::parse(msg.get_payload_bytes()) {
                        Ok((raw, _tag)) => {
                            if tx.send(raw).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!(pattern, error = %e, "ignoring a broadcast that is not a kombu envelope")
                        }
                    }
                }
            }
            Err(e) => {
                warn!(pattern, error = %e, retry_in = ?backoff, "could not subscribe to {}", sub.exchange);
            }
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(shared.opts.max_backoff);
    }
    debug!(pattern, "broadcast subscription ended");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        let client = Client::open("redis://127.0.0.1:6379/3").expect("valid url");
        Shared {
            opts: RedisOptions::default(),
            masked_url: String::new(),
            db: 3,
            cmd: Conn::new(
                client.clone(),
                Duration::from_secs(1),
                Duration::from_secs(1),
                None,
            ),
            client,
            unsettled: std::sync::Mutex::new(HashSet::new()),
            consumer_stop: Mutex::new(CancellationToken::new()),
            consumer: Mutex::new(None),
            shutdown: CancellationToken::new(),
            restorer: Mutex::new(None),
            closed: AtomicBool::new(false),
            restore_script: Script::new(RESTORE_CAS),
            mutex_script: Script::new(MUTEX_RELEASE),
            live_queues: std::sync::Mutex::new(Vec::new()),
        }
    }

    #[test]
    fn priority_keys_follow_kombu_steps() {
        let s = shared();
        let want = [
            (0, "q"),
            (1, "q"),
            (2, "q"),
            (3, "q\x06\x163"),
            (5, "q\x06\x163"),
            (6, "q\x06\x166"),
            (8, "q\x06\x166"),
            (9, "q\x06\x169"),
            (200, "q\x06\x169"),
        ];
        for (p, k) in want {
            assert_eq!(s.queue_key("q", p), k, "priority {p}");
        }
        assert_eq!(
            s.binding_member("default"),
            "default\x06\x16\x06\x16default"
        );
    }
}
