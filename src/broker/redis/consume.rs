//! Consuming: the `BRPOP` loop over every queue and priority step, kombu's
//! round robin, the prefetch limit, recording each pop in `unacked` before
//! handing it over, and queues added or cancelled at runtime.
//!
//! The loop has a dedicated connection (a blocking `BRPOP` would stall every
//! other command on a shared multiplexed one) and reconnects on its own; a
//! `BRPOP` is never cancelled mid-flight, as its reply would carry a message
//! nobody records.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::acker::{PoppedAcker, RedisAcker};
use super::connection::Conn;
use super::query::Request;
use super::unacked::HeldCopy;
use super::Shared;
use crate::backoff::Backoff;
use crate::broker::{BrokerError, Delivery};
use crate::gate::{Gate, GatePermit};
use crate::protocol::envelope;

impl Shared {
    /// The queues the loop polls now.
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

    /// [`crate::broker::Broker::consume`]: declares the queues, starts the
    /// consume loop and (once) the restore sweep.
    pub(super) async fn consume(
        self: &Arc<Self>,
        queues: &[String],
        prefetch: u16,
    ) -> Result<mpsc::Receiver<Delivery>, BrokerError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(BrokerError::Operation("broker is closed".into()));
        }
        let mut consumer = self.consumer.lock().await;
        if consumer.as_ref().is_some_and(|h| !h.is_finished()) {
            return Err(BrokerError::Operation("already consuming".into()));
        }
        for q in queues {
            self.declare_queue(q).await?;
        }
        // Registered before the first pop records a tag under it.
        self.renew_holder().await?;
        if !self.holder_started.swap(true, Ordering::SeqCst) {
            self.start_holder_lease();
        }
        let stop = CancellationToken::new();
        *self.consumer_stop.lock().await = stop.clone();
        self.set_live_queues(|q| *q = queues.to_vec());
        let semaphore = (prefetch > 0).then(|| Gate::new(usize::from(prefetch)));
        *self.prefetch.lock().unwrap_or_else(|p| p.into_inner()) = semaphore.clone();
        let (tx, rx) = mpsc::channel(usize::from(prefetch.max(1)).max(16));
        *consumer = Some(tokio::spawn(consume_loop(
            Arc::clone(self),
            queues.to_vec(),
            semaphore,
            tx,
            stop,
        )));
        self.start_restorer().await;
        info!(queues = ?queues, prefetch, "consuming from Redis");
        Ok(rx)
    }

    /// [`crate::broker::Broker::stop_consuming`]: stops the loop and waits
    /// for it (at most one `BRPOP` timeout plus a record).
    pub(super) async fn stop_consuming(&self) -> Result<(), BrokerError> {
        let asked_before = {
            let stop = self.consumer_stop.lock().await;
            let before = stop.is_cancelled();
            stop.cancel();
            before
        };
        let handle = self.consumer.lock().await.take();
        if let Some(mut h) = handle {
            if asked_before {
                // Waited for once already (the warm shutdown's stop; now
                // close): close waits for it again after marking the broker
                // closed, which is what ends its retries.
                *self.consumer.lock().await = Some(h);
                return Ok(());
            }
            // At most one BRPOP timeout plus a record.
            let limit = self.opts.brpop_timeout + Duration::from_secs(10);
            if tokio::time::timeout(limit, &mut h).await.is_err() {
                // Only a popped message whose record waits for Redis holds it
                // this long: kept, so that closing waits for its last word.
                warn!("Redis consumer did not stop in time (a popped message waits for Redis)");
                *self.consumer.lock().await = Some(h);
            }
        }
        Ok(())
    }

    /// [`crate::broker::Broker::set_prefetch`]: the loop pops only while
    /// fewer than `prefetch` deliveries are unsettled; deliveries already
    /// popped stay valid (a lower limit holds back the next `BRPOP`).
    pub(super) async fn set_prefetch(&self, prefetch: u16) -> Result<(), BrokerError> {
        let gate = self
            .prefetch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let (Some(gate), true) = (gate, prefetch > 0) {
            gate.set_limit(usize::from(prefetch));
            info!(prefetch, "prefetch changed by remote control");
        }
        Ok(())
    }

    /// [`crate::broker::Broker::add_queue`]: declared, then polled from the
    /// next `BRPOP` on.
    pub(super) async fn add_queue(&self, queue: &str) -> Result<(), BrokerError> {
        self.declare_queue(queue).await?;
        self.set_live_queues(|q| {
            if !q.iter().any(|x| x == queue) {
                q.push(queue.to_owned());
            }
        });
        info!(queue, "started consuming queue");
        Ok(())
    }

    /// [`crate::broker::Broker::cancel_queue`]: no longer polled from the
    /// next `BRPOP` on.
    pub(super) async fn cancel_queue(&self, queue: &str) -> Result<(), BrokerError> {
        self.set_live_queues(|q| q.retain(|x| x != queue));
        info!(queue, "stopped consuming queue");
        Ok(())
    }
}

/// The consume loop: BRPOP while under the prefetch limit, record, deliver.
async fn consume_loop(
    shared: Arc<Shared>,
    queues: Vec<String>,
    semaphore: Option<Arc<Gate>>,
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
    let mut backoff = Backoff::new(Duration::from_millis(100), shared.opts.max_backoff);
    let mut was_down = false;
    loop {
        if stop.is_cancelled() {
            break;
        }
        let permit = match &semaphore {
            Some(gate) => tokio::select! {
                p = gate.acquire() => Some(p),
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
                    backoff.reset();
                    shared.restore_held_after_outage().await;
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
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        };
        if was_down {
            info!(url = %shared.masked_url, "Redis connection restored");
            crate::telemetry::broker_reconnected();
            was_down = false;
            backoff.reset();
            // Before this pop is recorded, so it is not among them.
            shared.restore_held_after_outage().await;
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
                .query::<i64>(
                    "RPUSH (cancelled queue)",
                    5,
                    Request::Cmd(redis::cmd("RPUSH").arg(&full_key).arg(&item)),
                )
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
    permit: Option<GatePermit>,
    tx: &mpsc::Sender<Delivery>,
) -> bool {
    // Over the size limit: not decoded; its id (if readable) gets a FAILURE.
    let parsed = if item.len() > crate::broker::MAX_MESSAGE_BYTES {
        Err(envelope::EnvelopeError::Body(crate::broker::too_large(
            item.len(),
        )))
    } else {
        envelope::parse(&item)
    };
    let (mut message, tag) = match parsed {
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
    let mut backoff = Backoff::new(Duration::from_millis(200), shared.opts.max_backoff);
    loop {
        match shared
            .record_unacked(&tag, &text, &message.exchange, &message.routing_key)
            .await
        {
            Ok(()) => break,
            Err(e) => {
                if shared.closed.load(Ordering::SeqCst) {
                    // The worker is exiting and Redis has not answered through
                    // its whole shutdown: the message left its list with our
                    // BRPOP and nothing here can put it back. If the record
                    // reached Redis (only its reply was lost) the holder lease
                    // or kombu's visibility timeout restores it; if not, it is
                    // gone. Said once, with its id, never silently.
                    error!(
                        tag,
                        queue = dest,
                        task_id = message.correlation_id.as_deref().unwrap_or("?"),
                        error = %e,
                        "exiting while Redis does not answer: a popped message could not be \
                         recorded or returned to its queue; it is lost unless its record \
                         reached Redis"
                    );
                    return false;
                }
                error!(tag, error = %e, "could not record unacked delivery; retrying");
                tokio::select! {
                    _ = backoff.wait() => {}
                    // closing: one more try, then the word above
                    _ = shared.shutdown.cancelled() => {}
                }
            }
        }
    }
    let copy = HeldCopy {
        text,
        exchange: message.exchange.clone(),
        routing_key: message.routing_key.clone(),
    };
    shared.unsettled_insert(&tag, Arc::new(copy));
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
        if let Some(copy) = shared.unsettled_remove(&tag) {
            if let Err(e) = shared.restore_by_tag(&tag, false, Some(&copy)).await {
                error!(tag, error = %e, "could not restore undeliverable message");
            }
        }
        return false;
    }
    true
}
