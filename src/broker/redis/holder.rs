//! Holder leases: what a dead worker held is back on its queue within about
//! one lease, not after the visibility timeout.
//!
//! kombu keeps a popped message in `unacked` until it is acked, and only the
//! visibility-timeout sweep (1 h by default) puts it back; the entry does not
//! say which process holds it, so a sweep cannot tell a message held by a
//! live worker from one held by a dead worker. Running tasks are covered by
//! the in-flight ledger (acked at start, re-queued when their lease lapses);
//! messages a worker holds without running them — prefetched, waiting for a
//! slot, waiting for their ETA — would wait out the whole hour.
//!
//! So every om-worker process registers as a *holder* with its own id:
//!
//! | key (with `global_keyprefix`) | what |
//! |---|---|
//! | `_omw.holders` | set of holder ids |
//! | `_omw.holder.<id>` | alive marker, `PX` lease, renewed every lease/3 |
//! | `_omw.held.<id>` | set of the delivery tags it holds, written in the same `MULTI/EXEC` as kombu's `unacked` entry and removed with it |
//! | `_omw.dead.<id>` | tombstone (one day) once another worker declared it dead |
//!
//! Every worker sweeps the holders (as often as it renews): a holder whose
//! alive marker expired is declared dead atomically (the tombstone is only
//! written if the marker is absent, and a holder renews only while no
//! tombstone exists — one Lua script each, so the two never interleave), then
//! each tag in its held set is restored with kombu's compare-and-swap restore
//! (two sweepers restore a message once) and the set is removed.
//!
//! Only tags in a held set are ever restored early, so messages held by live
//! workers — om-worker or Celery, whose messages are never in a held set —
//! keep kombu's semantics. A worker that was only *paused* past its lease
//! (SIGSTOP, a frozen VM) finds its tombstone when it wakes: it takes a new
//! holder id, and an ack of a message that was restored meanwhile fails (the
//! `unacked` entry is gone and a tombstone of one of its ids exists), so the
//! message runs once, from its queue.

use std::time::Duration;

use redis::Script;
use tracing::{debug, error, info, warn};

use super::query::Request;
use super::Shared;
use crate::broker::BrokerError;

/// Tombstones outlive any plausible pause of a worker.
const TOMBSTONE_SECS: u64 = 86_400;

/// Renews the alive marker unless a tombstone exists. KEYS: alive, dead,
/// holders; ARGV: lease ms, id. Returns 0 when declared dead.
const RENEW: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
return 1
"#;

/// Declares a holder dead unless its alive marker exists. KEYS: alive,
/// dead; ARGV: tombstone seconds. Returns 1 when (already) dead.
const CLAIM_DEAD: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
return 1
"#;

/// This process's holder ids: the current one and any it had to give up
/// after being declared dead.
#[derive(Debug)]
pub(super) struct HolderIds {
    current: String,
    retired: Vec<String>,
}

impl HolderIds {
    pub(super) fn new() -> Self {
        Self {
            current: uuid::Uuid::new_v4().to_string(),
            retired: Vec::new(),
        }
    }
}

/// The two holder scripts, loaded once per broker.
pub(super) struct HolderScripts {
    renew: Script,
    claim_dead: Script,
}

impl HolderScripts {
    pub(super) fn new() -> Self {
        Self {
            renew: Script::new(RENEW),
            claim_dead: Script::new(CLAIM_DEAD),
        }
    }
}

impl Shared {
    fn holder_ids(&self) -> std::sync::MutexGuard<'_, HolderIds> {
        self.holder.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This process's current holder id.
    pub(super) fn holder_id(&self) -> String {
        self.holder_ids().current.clone()
    }

    fn holders_key(&self) -> String {
        self.key("_omw.holders")
    }

    fn alive_key(&self, id: &str) -> String {
        self.key(&format!("_omw.holder.{id}"))
    }

    /// The set of tags holder `id` holds.
    pub(super) fn held_key(&self, id: &str) -> String {
        self.key(&format!("_omw.held.{id}"))
    }

    fn dead_key(&self, id: &str) -> String {
        self.key(&format!("_omw.dead.{id}"))
    }

    /// The held-set key of this process's current id, or `None` when holder
    /// leases are off.
    pub(super) fn own_held_key(&self) -> Option<String> {
        self.opts
            .holder_lease
            .map(|_| self.held_key(&self.holder_id()))
    }

    /// Registers or renews this process as a holder. A holder that finds its
    /// tombstone (it was paused past its lease and another worker restored
    /// what it held) takes a new id and registers that.
    pub(super) async fn renew_holder(&self) -> Result<(), BrokerError> {
        let Some(lease) = self.opts.holder_lease else {
            return Ok(());
        };
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1);
        for _ in 0..2 {
            let id = self.holder_id();
            let mut call = self.holder_scripts.renew.prepare_invoke();
            call.key(self.alive_key(&id))
                .key(self.dead_key(&id))
                .key(self.holders_key())
                .arg(lease_ms)
                .arg(&id);
            let alive: i64 = self
                .cmd
                .query("renew holder lease", 3, Request::Script(&call))
                .await?;
            if alive == 1 {
                return Ok(());
            }
            error!(
                holder = %id,
                "this worker missed its holder lease ({}s: paused or cut off from Redis) and \
                 another worker restored the messages it held to their queues; those deliveries \
                 will not run here; continuing under a new holder id",
                lease.as_secs()
            );
            let mut ids = self.holder_ids();
            let old = std::mem::replace(&mut ids.current, uuid::Uuid::new_v4().to_string());
            ids.retired.push(old);
        }
        Err(BrokerError::Operation(
            "could not register a holder lease".into(),
        ))
    }

    /// True when one of this process's holder ids has a tombstone: what it
    /// held may have been restored by another worker.
    pub(super) async fn declared_dead(&self) -> Result<bool, BrokerError> {
        if self.opts.holder_lease.is_none() {
            return Ok(false);
        }
        let keys: Vec<String> = {
            let ids = self.holder_ids();
            std::iter::once(&ids.current)
                .chain(ids.retired.iter())
                .map(|id| self.dead_key(id))
                .collect()
        };
        let n: i64 = self
            .cmd
            .query(
                "EXISTS tombstone",
                3,
                Request::Cmd(redis::cmd("EXISTS").arg(&keys)),
            )
            .await?;
        Ok(n > 0)
    }

    /// Restores what dead holders held; returns how many messages went back.
    pub(super) async fn sweep_dead_holders(&self) -> Result<usize, BrokerError> {
        if self.opts.holder_lease.is_none() {
            return Ok(0);
        }
        let own = self.holder_id();
        let ids: Vec<String> = self
            .cmd
            .query(
                "SMEMBERS holders",
                3,
                Request::Cmd(redis::cmd("SMEMBERS").arg(self.holders_key())),
            )
            .await?;
        let mut total = 0;
        for id in ids.into_iter().filter(|id| *id != own) {
            let mut call = self.holder_scripts.claim_dead.prepare_invoke();
            call.key(self.alive_key(&id))
                .key(self.dead_key(&id))
                .arg(TOMBSTONE_SECS);
            let dead: i64 = self
                .cmd
                .query("claim dead holder", 3, Request::Script(&call))
                .await?;
            if dead != 1 {
                continue;
            }
            let held = self.held_key(&id);
            let tags: Vec<String> = self
                .cmd
                .query(
                    "SMEMBERS held",
                    3,
                    Request::Cmd(redis::cmd("SMEMBERS").arg(&held)),
                )
                .await?;
            let mut restored = 0;
            let mut complete = true;
            for tag in &tags {
                match self.restore_by_tag(tag, false, None).await {
                    Ok(true) => restored += 1,
                    Ok(false) => {}
                    Err(e) => {
                        complete = false;
                        warn!(holder = %id, tag, error = %e, "could not restore a message a dead worker held; the next sweep retries");
                    }
                }
            }
            if complete {
                self.cmd
                    .query::<()>(
                        "forget dead holder",
                        3,
                        Request::Pipeline(
                            redis::pipe()
                                .atomic()
                                .cmd("DEL")
                                .arg(&held)
                                .ignore()
                                .cmd("SREM")
                                .arg(self.holders_key())
                                .arg(&id)
                                .ignore(),
                        ),
                    )
                    .await?;
            }
            if restored > 0 {
                warn!(
                    holder = %id,
                    restored,
                    "a worker stopped renewing its holder lease (died?): restored the message(s) \
                     it held but had not started to their queues"
                );
            } else {
                debug!(holder = %id, "forgot a dead holder that held nothing");
            }
            total += restored;
        }
        Ok(total)
    }

    /// Unregisters this process (at close, after its deliveries went back).
    pub(super) async fn drop_holder(&self) {
        if self.opts.holder_lease.is_none() {
            return;
        }
        let id = self.holder_id();
        let res = self
            .cmd
            .query::<()>(
                "unregister holder",
                1,
                Request::Pipeline(
                    redis::pipe()
                        .atomic()
                        .cmd("SREM")
                        .arg(self.holders_key())
                        .arg(&id)
                        .ignore()
                        .cmd("DEL")
                        .arg(self.alive_key(&id))
                        .arg(self.held_key(&id))
                        .ignore(),
                ),
            )
            .await;
        if let Err(e) = res {
            // Harmless: its lease expires and a sweep finds an empty set.
            debug!(error = %e, "could not unregister the holder lease");
        }
    }

    /// Renews this holder and sweeps dead ones every lease/3 until the
    /// broker shuts down.
    pub(super) fn start_holder_lease(self: &std::sync::Arc<Self>) {
        let Some(lease) = self.opts.holder_lease else {
            return;
        };
        let period = (lease / 3).max(Duration::from_millis(500));
        let s = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = s.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(period) => {}
                }
                let res = async {
                    s.renew_holder().await?;
                    s.sweep_dead_holders().await
                }
                .await;
                match res {
                    Ok(_) if failing => {
                        failing = false;
                        info!("holder lease renewed again");
                    }
                    Ok(_) => {}
                    Err(e) if !failing => {
                        failing = true;
                        warn!(error = %e, "could not renew the holder lease / sweep dead holders; retrying");
                    }
                    Err(_) => {}
                }
            }
        });
    }
}
