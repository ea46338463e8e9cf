//! One delivery from receipt to settlement: the pipeline's stages in
//! Celery's order, each asking [`super::decide`] what to do and applying it.
//!
//! decode → route (unknown task?) → admit (expired? revoked? ETA hold) →
//! slot → claim (duplicate? ledger record) → ack (omega|ml runs with
//! `acks_late=False`) → STARTED → run under the time limits → result →
//! ledger record removed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::decide::{self, Admit, Route, Settle, Verdict};
use super::order::Ticket;
use super::report::{conclude, settle, store};
use super::run::{renew_lease, run_limited};
use super::timings::{Step, Timings};
use super::Shared;
use crate::backend::ReplyTarget;
use crate::backoff::Backoff;
use crate::broker::{Acker, Delivery};
use crate::config::UnknownTaskPolicy;
use crate::control::state::RequestGuard;
use crate::ledger::{Begin, Ledger};
use crate::protocol::message::{peek_task_id, peek_task_name};
use crate::protocol::{Outgoing, RawMessage, ResultMeta, TaskMessage};
use crate::tasks::{DeliveryInfo, ErrorKind, TaskContext};
use crate::telemetry::{self, CeleryState};

/// Handles one delivery from receipt to settlement.
///
/// `ticket` is the delivery's place in line (see `order`): it asks for a slot
/// in arrival order, and leaves the line wherever it will not take one then.
pub(super) async fn handle(s: Arc<Shared>, d: Delivery, mut ticket: Ticket) {
    let received_at = Instant::now();
    let Delivery { message, acker } = d;
    let acker = acker.as_ref();
    // The name comes from the headers (protocol 2) without decoding the body,
    // so a task for another worker is forwarded byte for byte even when its
    // body holds what our decoder refuses.
    let peeked = peek_task_name(&message);
    let task = match &peeked {
        Some(name) => s.registry.resolve(name).await,
        None => None,
    };
    if let (Some(name), None, UnknownTaskPolicy::Forward(queue)) =
        (&peeked, &task, &s.config.unknown_tasks)
    {
        let id = peek_task_id(&message).unwrap_or_else(|| "?".into());
        ticket.pass();
        return forward(&s, &message, &id, name, queue, acker).await;
    }
    let msg = match decide::decode(&message) {
        Ok(m) => m,
        Err(v) => {
            let name = peeked.as_deref().map(telemetry::foreign_name);
            count_refused(name.as_deref().unwrap_or("unknown"), &message, None);
            ticket.pass();
            return conclude(s.backend.as_ref(), acker, "malformed", v).await;
        }
    };
    // Protocol 1 carries the name in the body only.
    let task = match (task, &peeked) {
        (None, None) => s.registry.resolve(&msg.name).await,
        (task, _) => task,
    };
    let task = match decide::route(&msg, &message.routing_key, task, &s.config.unknown_tasks) {
        Route::Run(task) => task,
        Route::End(v) => {
            let name = telemetry::foreign_name(&msg.name);
            count_refused(&name, &message, Some("NotRegistered"));
            ticket.pass();
            return conclude(s.backend.as_ref(), acker, &msg.id, v).await;
        }
        Route::Forward(queue) => {
            ticket.pass();
            return forward(&s, &message, &msg.id, &msg.name, &queue, acker).await;
        }
    };
    // om-worker's own tasks do not run canvas; omega|ml's Python task of the
    // same name does (e.g. `om.runtime.sequence()` starting with a ping).
    let canvas = decide::canvas(&msg);
    let task = if task.runs_canvas() || canvas.is_empty() {
        task
    } else if let Some(python) = s.registry.resolve_canvas(&msg.name).await {
        info!(task_id = %msg.id, task = %msg.name, "the message carries canvas: running omega|ml's Python task instead of om-worker's own");
        python
    } else {
        let v = decide::canvas_refusal(&msg, &canvas);
        count_refused(&msg.name, &message, Some("NotImplementedError"));
        ticket.pass();
        return conclude(s.backend.as_ref(), acker, &msg.id, v).await;
    };
    let mut req = s.state.received(&msg, &message);
    if !admitted(&s, &msg, acker, &req, &mut ticket).await {
        return;
    }

    // A rate limit set by remote control (`rate_limit`) spaces the starts of
    // this task name; the message waits unacked, in arrival order among its
    // name (other names go on, as past Celery's token buckets). A revoke
    // ends the wait: the revoked check after the slot settles it.
    if s.state.limits.rate_text(&msg.name).is_some() {
        ticket.pass();
    }
    tokio::select! {
        _ = s.state.limits.wait_for_rate(&msg.name) => {}
        _ = req.interrupted() => {}
        // Left unacked: the broker returns it when the connection closes.
        _ = s.stop_starting.cancelled() => return,
    }
    let permit = tokio::select! {
        p = async {
            ticket.my_turn().await;
            s.slots.acquire().await
        } => p,
        // Left unacked: the broker returns it when the connection closes.
        _ = s.stop_starting.cancelled() => return,
    };
    ticket.pass();
    if s.stop_starting.is_cancelled() {
        return;
    }
    if s.state.is_revoked(&msg.id) {
        req.revoked(false);
        return conclude(
            s.backend.as_ref(),
            acker,
            &msg.id,
            decide::revoked_by_control(&msg),
        )
        .await;
    }
    let running = match RunningGuard::enter(&s.running, &msg, &s.stop_starting).await {
        Enter::Ours(g) => g,
        Enter::Duplicate => {
            warn!(task_id = %msg.id, task = %msg.name, "duplicate delivery of a task running on this worker; acking it");
            return settle(acker, Settle::Ack, &msg.id).await;
        }
        // Left unacked: the broker returns it when the connection closes.
        Enter::Stopped => return,
    };
    let mut timings = Timings::new(received_at);

    // Durable tasks: record the message before acking it, so a worker that
    // dies mid-run does not lose it (see `ledger`).
    let ledger = match (task.durable(), &s.ledger) {
        (true, Some(l)) => match claim(&s, l.as_ref(), &msg, &message).await {
            Some(Begin::Run) => Some(Arc::clone(l)),
            Some(Begin::HeldBy(owner)) => {
                warn!(task_id = %msg.id, "duplicate delivery of a task running on {owner}; acking it");
                return settle(acker, Settle::Ack, &msg.id).await;
            }
            // Shutting down before the record was written: left unacked.
            None => return,
        },
        _ => None,
    };
    timings.mark(Step::Ledger);

    // omega|ml's Celery config leaves acks_late off: ack when execution starts.
    if let Err(e) = acker.ack().await {
        // The broker has the message back on its queue (RabbitMQ requeued it
        // when the delivery's connection closed; on Redis it was restored
        // after a reconnect; a Redis ack that only cannot reach the server is
        // retried by the broker and does not fail here). Running it now would
        // run it twice, so this delivery is abandoned completely: the ledger
        // record is released (a copy on another worker must not be taken for
        // a duplicate of a run that never happens) and, when this returns,
        // the running mark, so a copy waiting here runs.
        warn!(task_id = %msg.id, "ack failed, not running (the message is back on its queue): {e}");
        if let Some(l) = &ledger {
            if let Err(e) = l.finish(&msg.id).await {
                warn!(task_id = %msg.id, "releasing the in-flight record of an abandoned delivery: {e} (its lease expires)");
            }
        }
        return;
    }
    running.acked();
    timings.mark(Step::Ack);
    let started_at = Instant::now();
    info!(task_id = %msg.id, task = %msg.name, queue = %message.routing_key, "task started");
    let target = ReplyTarget {
        reply_to: msg.reply_to.clone(),
    };
    if msg.ignore_result != Some(true) {
        let meta = ResultMeta::started(&msg.id, std::process::id(), &s.config.nodename);
        store(s.backend.as_ref(), &meta, &target).await;
    }
    timings.mark(Step::Started);

    // The message's limits, else those `time_limit` set for this task name
    // (Celery's `task.soft_time_limit`/`task.time_limit`), else the worker's.
    let (named_soft, named_hard) = s.state.limits.time_limits(&msg.name);
    let soft = msg
        .soft_time_limit
        .or(named_soft)
        .or(Some(s.config.soft_time_limit));
    let hard = msg
        .hard_time_limit
        .or(named_hard)
        .unwrap_or(s.config.hard_time_limit);
    let ctx = TaskContext {
        nodename: s.config.nodename.clone(),
        cancel: s.stop_running.child_token(),
        cancel_reason: Arc::default(),
        soft_time_limit: soft,
        slot: req.start(),
        gpus: s.config.gpus.clone(),
        delivery: DeliveryInfo {
            exchange: message.exchange.clone(),
            routing_key: message.routing_key.clone(),
            priority: message.priority,
            redelivered: message.redelivered,
        },
        teardown: Default::default(),
    };
    let teardown = ctx.teardown.clone();
    req.running(&ctx);
    let renewer = ledger.clone().map(|l| renew_lease(l, msg.id.clone()));
    let outcome = run_limited(task.as_ref(), ctx, &msg, hard).await;
    let runtime = started_at.elapsed();
    timings.mark(Step::Run);
    req.finish(&outcome, |v| v.repr());
    match &outcome {
        Ok(_) => info!(task_id = %msg.id, task = %msg.name, "task succeeded in {runtime:.3?}"),
        Err(err) => {
            let exc = format!(
                "{}: {}",
                err.exception.exc_type,
                err.exception
                    .exc_message
                    .first()
                    .map(|m| m.repr())
                    .unwrap_or_default()
            );
            match err.kind {
                ErrorKind::Failure => {
                    warn!(task_id = %msg.id, task = %msg.name, "task failed in {runtime:.3?}: {exc}")
                }
                ErrorKind::Retry => {
                    info!(task_id = %msg.id, task = %msg.name, retries = msg.retries, "task retry in {runtime:.3?}: {exc}")
                }
                ErrorKind::Rejected => {
                    info!(task_id = %msg.id, task = %msg.name, "task rejected itself in {runtime:.3?} (Reject; the message was acked at start): {exc}")
                }
                ErrorKind::Ignored => {
                    info!(task_id = %msg.id, task = %msg.name, "task ignored in {runtime:.3?} (Ignore; no result stored)")
                }
            }
        }
    }
    if let Some(meta) = decide::outcome_report(&msg, outcome, req.terminated()) {
        store(s.backend.as_ref(), &meta, &target).await;
    }
    timings.mark(Step::Result);
    if let Some(r) = renewer {
        r.abort();
    }
    if let Some(l) = ledger {
        if let Err(e) = l.finish(&msg.id).await {
            // The record expires and the task is re-queued; it is idempotent.
            warn!(task_id = %msg.id, "{e}");
        }
    }
    timings.mark(Step::LedgerFinish);
    timings.log(&msg.id);
    // Reported and settled; the slot is free once the task's process is gone.
    teardown.finish().await;
    drop(permit);
}

/// A delivery rejected without running (dead-lettered where the queue has a DLX): counted as
/// celery-exporter's `rejected`, and as `failed` with the exception the client is told where
/// Celery's worker sends `task-failed` for it (an unregistered task: `NotRegistered`).
fn count_refused(name: &str, message: &RawMessage, failed: Option<&str>) {
    let queue = &message.routing_key;
    if let Some(exception) = failed {
        telemetry::celery_task(CeleryState::Failed, name, queue, exception);
    }
    telemetry::celery_task(CeleryState::Rejected, name, queue, "");
}

/// Stage 3 applied: settles an expired or revoked message, holds one with a
/// future ETA (outside the prefetch count) until it is due. `false` when the
/// delivery ended here (settled, or left unacked at shutdown).
async fn admitted(
    s: &Shared,
    msg: &TaskMessage,
    acker: &dyn Acker,
    req: &RequestGuard,
    ticket: &mut Ticket,
) -> bool {
    // A revoke ends a hold early; the next round settles it. Once woken that
    // way, holds are no longer interruptible, so a wake-up can never spin.
    let mut interruptible = true;
    loop {
        match decide::admit(msg, Utc::now(), s.state.is_revoked(&msg.id)) {
            Admit::Now => return true,
            Admit::Expired(v) => {
                // Celery's `_announce_revoked('expired', ...)`: a `task-revoked` event.
                req.revoked(true);
                ticket.pass();
                conclude(s.backend.as_ref(), acker, &msg.id, v).await;
                return false;
            }
            Admit::Revoked(v) => {
                req.revoked(false);
                ticket.pass();
                conclude(s.backend.as_ref(), acker, &msg.id, v).await;
                return false;
            }
            Admit::HoldFor(wait) => {
                let Some(eta) = msg.eta else { return true };
                // Celery's timer holds it while later messages go on.
                ticket.pass();
                debug!(task_id = %msg.id, "holding until ETA {eta} ({wait:?})");
                req.scheduled(eta);
                acker.hold_outside_prefetch().await;
                let stopped = tokio::select! {
                    _ = tokio::time::sleep(wait) => false,
                    _ = req.interrupted(), if interruptible => {
                        interruptible = false;
                        false
                    }
                    _ = s.stop_starting.cancelled() => true,
                };
                if stopped {
                    // Left unacked: the broker returns it when the connection closes.
                    return false;
                }
                acker.end_hold().await;
                req.reserved();
            }
        }
    }
}

/// Writes the in-flight record, retrying while the ledger is unreachable
/// (the message stays unacked meanwhile). `None` when shutdown began first.
async fn claim(
    s: &Shared,
    ledger: &dyn Ledger,
    msg: &TaskMessage,
    raw: &RawMessage,
) -> Option<Begin> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let held_since = Instant::now();
    loop {
        match ledger.begin(&msg.id, raw).await {
            // Another worker holds it. If that worker's own delivery is being
            // abandoned (its ack failed after a connection loss and the broker
            // gave this copy to us), it releases the record within moments:
            // look again for a little while before calling this a duplicate.
            Ok(Begin::HeldBy(owner)) if held_since.elapsed() < HELD_RECHECK => debug!(
                task_id = %msg.id,
                "in-flight record held by {owner}; checking again before treating this as a duplicate"
            ),
            Ok(b) => return Some(b),
            Err(e) => warn!(
                task_id = %msg.id,
                "cannot record the task yet, retrying in {:?}: {e}",
                backoff.peek()
            ),
        }
        tokio::select! {
            _ = backoff.wait() => {}
            _ = s.stop_starting.cancelled() => return None,
        }
    }
}

/// How long a delivery whose in-flight record another worker holds keeps
/// looking before it is acked as a duplicate (see [`claim`]).
const HELD_RECHECK: Duration = Duration::from_secs(3);

/// `--unknown-tasks forward:<queue>`: the message goes on unchanged; if the
/// publish fails it goes back on its own queue rather than being lost.
async fn forward(
    s: &Shared,
    raw: &RawMessage,
    task_id: &str,
    name: &str,
    queue: &str,
    acker: &dyn Acker,
) {
    let out = Outgoing {
        body: raw.body.clone(),
        content_type: raw.content_type.clone().unwrap_or_default(),
        content_encoding: raw.content_encoding.clone().unwrap_or_default(),
        headers: raw.headers.clone(),
        correlation_id: raw.correlation_id.clone(),
        reply_to: raw.reply_to.clone(),
        priority: raw.priority,
        delivery_mode: raw.delivery_mode.unwrap_or(2),
        expiration: raw.expiration.clone(),
    };
    let how = match s.broker.publish("", queue, out).await {
        Ok(()) => {
            info!(task_id = %task_id, "forwarded unregistered task {name:?} to queue {queue:?}");
            Settle::Ack
        }
        Err(e) => {
            // Not lost: back on its queue for another worker (or us, later).
            tracing::error!(task_id = %task_id, "forwarding to {queue:?} failed, requeueing: {e}");
            Settle::Requeue
        }
    };
    conclude(s.backend.as_ref(), acker, task_id, Verdict::settle(how)).await;
}

/// The deliveries running here (see [`RunningGuard`]): key → whether its
/// ack went through, and what wakes a copy waiting on it.
pub(super) type Running = Mutex<HashMap<(String, i64), RunningEntry>>;

/// One entry of [`Running`].
pub(super) struct RunningEntry {
    /// The delivery was acked: it runs, and a copy is a true duplicate.
    acked: bool,
    /// Woken when the entry is acked or removed.
    changed: Arc<Notify>,
}

/// What [`RunningGuard::enter`] found.
enum Enter<'a> {
    /// This delivery runs; the guard marks it until dropped.
    Ours(RunningGuard<'a>),
    /// The same delivery is acked and running here: a duplicate.
    Duplicate,
    /// Shutdown began while waiting on another delivery of the same task.
    Stopped,
}

/// Marks a task id as running here for as long as it lives: a second
/// delivery of a running id (a publisher's duplicate, a re-queue racing its
/// own run) is acked and dropped instead of running the task twice at once.
/// Keyed by id and `retries`: a task's `self.retry()` republishes the same id
/// with `retries` + 1 before its run has ended here, and that copy must run.
///
/// A copy that arrives while the first delivery is not acked yet waits for
/// it: after a connection loss the broker redelivers a message whose first
/// delivery is about to fail its ack and be abandoned, and then the copy must
/// run — acking it as a duplicate would lose the task.
struct RunningGuard<'a> {
    running: &'a Running,
    key: (String, i64),
}

impl<'a> RunningGuard<'a> {
    /// Marks this delivery as running, or finds it a duplicate, waiting
    /// while another delivery of it is still before its ack.
    async fn enter(running: &'a Running, msg: &TaskMessage, stop: &CancellationToken) -> Enter<'a> {
        let key = (msg.id.clone(), msg.retries);
        loop {
            let changed = {
                let mut map = running.lock().unwrap_or_else(|p| p.into_inner());
                match map.get(&key) {
                    None => {
                        map.insert(
                            key.clone(),
                            RunningEntry {
                                acked: false,
                                changed: Arc::new(Notify::new()),
                            },
                        );
                        return Enter::Ours(RunningGuard { running, key });
                    }
                    Some(e) if e.acked => return Enter::Duplicate,
                    Some(e) => Arc::clone(&e.changed),
                }
            };
            debug!(task_id = %msg.id, "another delivery of this task is not acked yet; waiting for it");
            // `notify_waiters` reaches a `Notified` from its creation; the
            // short sleep covers a change made before it was created.
            let notified = changed.notified();
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop.cancelled() => return Enter::Stopped,
            }
        }
    }

    /// The ack went through: from now on another delivery is a duplicate.
    fn acked(&self) {
        let mut map = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(&self.key) {
            e.acked = true;
            e.changed.notify_waiters();
        }
    }
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.remove(&self.key) {
            e.changed.notify_waiters();
        }
    }
}
