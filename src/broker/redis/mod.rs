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
//! * **Outages** (beyond kombu, issue 13). An ack that cannot reach Redis is
//!   kept and retried until Redis answers (the task runs; no restore touches
//!   it meanwhile). When the consume loop's connection comes back, every
//!   delivery still unsettled is restored at once, from `unacked` or — if a
//!   restarted Redis lost it — from the envelope kept at delivery, so nothing
//!   held waits for the visibility timeout and nothing is lost with Redis'
//!   memory (`unacked.rs`).
//!
//! * **Holder leases** (beyond kombu, issue 15). Each process registers a
//!   lease and records the tags it holds next to kombu's `unacked` entry; a
//!   worker whose lease lapsed is declared dead by another, which restores
//!   what it held within about one lease instead of the visibility timeout
//!   (`holder.rs`).
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
//!
//! One job per file:
//!
//! | file | owns |
//! |---|---|
//! | `options.rs` | [`RedisOptions`] (kombu's transport options) and defaults |
//! | `connection.rs` | one lazily (re)connected multiplexed connection |
//! | `holder.rs` | holder leases: restoring what a dead worker held |
//! | `query.rs` | the one retrying query helper every command goes through |
//! | `keys.rs` | kombu's key, priority-queue and fanout-channel names |
//! | `bindings.rs` | the `_kombu.binding.*` sets: declaring and routing |
//! | `unacked.rs` | `unacked` bookkeeping, restores, the visibility sweep |
//! | `consume.rs` | the `BRPOP` loop, prefetch, runtime add/cancel of queues |
//! | `acker.rs` | ack / reject of one delivery |
//! | `publish.rs` | `LPUSH` onto bound queues, `PUBLISH` for fanout exchanges |
//! | `pubsub.rs` | broadcast subscriptions (`PSUBSCRIBE`) that survive drops |
//! | `length.rs` | queue lengths (`LLEN` over the priority sub-queues) for metrics |

mod acker;
mod bindings;
mod connection;
mod consume;
mod holder;
mod keys;
mod length;
mod options;
mod publish;
mod pubsub;
mod query;
mod unacked;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{Client, Script};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{Broker, BrokerError, Delivery, FanoutSubscription};
use crate::protocol::{Outgoing, RawMessage};
use crate::redact::mask_url;
use connection::Conn;
use query::Request;
use unacked::{MUTEX_RELEASE, RESTORE_CAS};

pub use options::RedisOptions;

/// A kombu-compatible Redis broker (see the module docs).
pub struct RedisBroker {
    shared: Arc<Shared>,
}

/// State shared by the broker handle, the consume loop, the ackers, the
/// restore sweep and the broadcast subscriptions; each submodule adds the
/// methods of its own job.
struct Shared {
    opts: RedisOptions,
    masked_url: String,
    db: i64,
    client: Client,
    cmd: Conn,
    /// Delivery tags popped by this broker and not yet settled, with the
    /// copy kept to restore them (see `unacked::HeldCopy`).
    unsettled: std::sync::Mutex<std::collections::HashMap<String, Arc<unacked::HeldCopy>>>,
    /// Tags acked while Redis was unreachable, whose `unacked` entries are
    /// removed once it answers (see `Shared::ack_later`).
    acking: std::sync::Mutex<HashSet<String>>,
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
    /// This process's holder ids (see `holder.rs`).
    holder: std::sync::Mutex<holder::HolderIds>,
    holder_scripts: holder::HolderScripts,
    /// Whether the holder lease loop runs.
    holder_started: AtomicBool,
    /// The consume loop's prefetch limit (`None`: unlimited); resized at
    /// runtime by `set_prefetch` (remote control `pool_grow`/`pool_shrink`).
    prefetch: std::sync::Mutex<Option<Arc<crate::gate::Gate>>>,
}

impl Shared {
    /// The broker's state before any connection is made; `cmd` connects on
    /// first use.
    fn new(opts: RedisOptions, masked_url: String, db: i64, client: Client) -> Self {
        let cmd = Conn::new(
            client.clone(),
            Duration::from_secs(5),
            opts.max_backoff,
            opts.client_name.clone(),
        );
        Shared {
            opts,
            masked_url,
            db,
            client,
            cmd,
            unsettled: std::sync::Mutex::default(),
            acking: std::sync::Mutex::default(),
            consumer_stop: Mutex::new(CancellationToken::new()),
            consumer: Mutex::new(None),
            shutdown: CancellationToken::new(),
            restorer: Mutex::new(None),
            closed: AtomicBool::new(false),
            restore_script: Script::new(RESTORE_CAS),
            mutex_script: Script::new(MUTEX_RELEASE),
            live_queues: std::sync::Mutex::new(Vec::new()),
            holder: std::sync::Mutex::new(holder::HolderIds::new()),
            holder_scripts: holder::HolderScripts::new(),
            holder_started: AtomicBool::new(false),
            prefetch: std::sync::Mutex::new(None),
        }
    }
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
        let tls = match (&options.tls, url_fixed.starts_with("rediss://")) {
            (Some(s), true) => Some(s.clone()),
            (None, true) => Some(
                crate::tls::TlsSettings::new(&Default::default(), None)
                    .map_err(|e| BrokerError::InvalidUrl(e.to_string()))?,
            ),
            (_, false) => None,
        };
        let client = match &tls {
            Some(s) => s
                .redis_client(&url_fixed)
                .map_err(|e| BrokerError::InvalidUrl(format!("{masked_url}: {e}")))?,
            None => Client::open(url_fixed.as_str())
                .map_err(|e| BrokerError::InvalidUrl(format!("{masked_url}: {:?}", e.kind())))?,
        };
        let trust = tls.as_ref().map(crate::tls::TlsSettings::trust);
        let db = client.get_connection_info().redis_settings().db();
        let shared = Arc::new(Shared::new(options, masked_url, db, client));
        let pong: String = shared
            .cmd
            .query("PING", 1, Request::Cmd(&redis::cmd("PING")))
            .await
            .map_err(|e| match e {
                BrokerError::Connection(text) => BrokerError::Connection(
                    match crate::tls::explain("rediss", trust.as_deref(), &text) {
                        Some(line) => line,
                        // A plain Redis never answers a TLS ClientHello: say what to suspect.
                        None if trust.is_some() && text.contains("timed out") => format!(
                            "{text} (no answer to the TLS handshake: does the server speak TLS \
                             on this port?)"
                        ),
                        None => text,
                    },
                ),
                other => other,
            })?;
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

#[async_trait]
impl Broker for RedisBroker {
    async fn declare_queue(&self, name: &str) -> Result<(), BrokerError> {
        RedisBroker::declare_queue(self, name).await
    }

    async fn queue_length(&self, queue: &str) -> Result<Option<u64>, BrokerError> {
        self.shared.queue_length(queue).await.map(Some)
    }

    async fn consume(
        &self,
        queues: &[String],
        prefetch: u16,
    ) -> Result<mpsc::Receiver<Delivery>, BrokerError> {
        self.shared.consume(queues, prefetch).await
    }

    async fn stop_consuming(&self) -> Result<(), BrokerError> {
        self.shared.stop_consuming().await
    }

    async fn set_prefetch(&self, prefetch: u16) -> Result<(), BrokerError> {
        self.shared.set_prefetch(prefetch).await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Outgoing,
    ) -> Result<(), BrokerError> {
        self.shared.publish(exchange, routing_key, message).await
    }

    async fn close(&self) -> Result<(), BrokerError> {
        self.stop_consuming().await?;
        self.shared.closed.store(true, Ordering::SeqCst);
        let n = self.shared.restore_own().await;
        debug!(restored = n, "restored own unsettled deliveries on close");
        self.shared.ack_pending_once().await;
        self.shared.shutdown.cancel();
        // A consumer still retrying a record (stop_consuming gave up waiting):
        // it tries once more and returns the message or says it could not.
        let consumer = self.shared.consumer.lock().await.take();
        if let Some(h) = consumer {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
        self.shared.drop_holder().await;
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
        self.shared.subscribe_fanout(subscription).await
    }

    async fn add_queue(&self, queue: &str) -> Result<(), BrokerError> {
        self.shared.add_queue(queue).await
    }

    async fn cancel_queue(&self, queue: &str) -> Result<(), BrokerError> {
        self.shared.cancel_queue(queue).await
    }
}
