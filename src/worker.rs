//! The worker loop: deliveries in, task runs and result states out.
//!
//! Per delivery, in Celery's order (`celery/worker/strategy.py`, `request.py`):
//! decode → unknown task? → expired? → hold until the ETA → wait for a free
//! slot → ack (omega|ml runs with `acks_late=False`) → STARTED → run under the
//! soft/hard time limits → SUCCESS or FAILURE. Every message that cannot run
//! is settled explicitly — FAILURE where the client can receive one, then
//! ack or reject without requeue — so nothing loops and nothing vanishes
//! silently. Messages not yet started when a warm shutdown begins are left
//! unacked and go back to their queue when the broker connection closes.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::FutureExt as _;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::backend::{ReplyTarget, ResultBackend};
use crate::broker::{Acker, Broker, BrokerError, Delivery};
use crate::config::{Config, UnknownTaskPolicy};
use crate::control::state::{RequestGuard, WorkerState};
use crate::ledger::{Begin, Ledger};
use crate::protocol::message::{peek_task_id, peek_task_name};
use crate::protocol::{
    decode_task, DecodeError, ExceptionInfo, Outgoing, RawMessage, ResultMeta, TaskMessage,
};
use crate::tasks::{CancelReason, Registry, TaskContext, TaskError};

/// Errors that stop the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The broker refused to start consuming.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// How the worker is asked to stop.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Warm: stop consuming, let running tasks finish within the grace period.
    pub warm: CancellationToken,
    /// Cold: stop running tasks now.
    pub cold: CancellationToken,
}

/// Everything a delivery handler needs, shared by all of them.
struct Shared {
    config: Arc<Config>,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    registry: Registry,
    slots: Arc<Semaphore>,
    /// Cancelled at warm shutdown: held and waiting messages give up.
    stop_starting: CancellationToken,
    /// Cancelled when running tasks must stop (grace over, cold shutdown).
    stop_running: CancellationToken,
    /// What remote control, events and metrics see (src/control).
    state: Arc<WorkerState>,
    /// In-flight ledger for durable tasks (None: ack-at-start only).
    ledger: Option<Ledger>,
    /// Ids of the tasks running here: a second delivery of one of them (a
    /// publisher's duplicate, a re-queue racing its own run) is acked and
    /// dropped instead of running the task twice at once.
    running: std::sync::Mutex<HashSet<String>>,
}

/// A worker: one broker, one backend, a registry, N slots.
pub struct Worker {
    shared: Arc<Shared>,
}

impl Worker {
    /// Builds a worker; nothing happens until [`Worker::run`].
    pub fn new(
        config: Arc<Config>,
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
        registry: Registry,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
        let state = Arc::new(WorkerState::from_config(&config));
        Worker {
            shared: Arc::new(Shared {
                config,
                broker,
                backend,
                registry,
                slots,
                stop_starting: CancellationToken::new(),
                stop_running: CancellationToken::new(),
                state,
                ledger: None,
                running: std::sync::Mutex::default(),
            }),
        }
    }

    /// Records durable tasks in `ledger` before acking them (see [`crate::ledger`]).
    pub fn with_ledger(mut self, ledger: Ledger) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.ledger = Some(ledger);
        }
        self
    }

    /// Shares `state` with remote control, events and metrics (src/control);
    /// call before [`Worker::run`].
    pub fn with_state(mut self, state: Arc<WorkerState>) -> Self {
        match Arc::get_mut(&mut self.shared) {
            Some(shared) => shared.state = state,
            None => warn!("worker already running; state not replaced"),
        }
        self
    }

    /// Consumes until `shutdown`, then drains as described in the README.
    pub async fn run(self, shutdown: Shutdown) -> Result<(), WorkerError> {
        let s = &self.shared;
        let cfg = &s.config;
        let mut deliveries = s.broker.consume(&cfg.queues, cfg.prefetch_count()).await?;
        info!(
            "om-worker {} ready: consuming {} (concurrency {}, prefetch {}, backend {})",
            cfg.nodename,
            cfg.queues.join(","),
            cfg.concurrency,
            cfg.prefetch_count(),
            s.backend.name()
        );
        s.state.set_consuming(true);
        let tracker = TaskTracker::new();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.warm.cancelled() => break,
                _ = shutdown.cold.cancelled() => break,
                d = deliveries.recv() => match d {
                    Some(d) => {
                        let shared = Arc::clone(&self.shared);
                        tracker.spawn(handle(shared, d));
                    }
                    None => {
                        error!("broker delivery channel closed; stopping");
                        break;
                    }
                },
            }
        }

        info!("warm shutdown: no new tasks; waiting for running tasks");
        s.stop_starting.cancel();
        if let Err(e) = s.broker.stop_consuming().await {
            warn!("stop consuming: {e}");
        }
        drop(deliveries);
        tracker.close();
        let grace = Duration::from_secs(cfg.shutdown_grace);
        tokio::select! {
            _ = tracker.wait() => {}
            _ = tokio::time::sleep(grace) => {
                warn!("shutdown grace of {grace:?} over: stopping running tasks");
            }
            _ = shutdown.cold.cancelled() => {
                warn!("cold shutdown: stopping running tasks");
            }
        }
        s.stop_running.cancel();
        // Cancelled tasks record their outcome and clean up their kernels.
        if tokio::time::timeout(Duration::from_secs(30), tracker.wait())
            .await
            .is_err()
        {
            error!("tasks did not stop within 30 s after cancellation");
        }
        s.state.before_close().await; // worker-offline while the broker is still open
        if let Err(e) = s.broker.close().await {
            warn!("closing broker connection: {e}");
        }
        info!("om-worker {} stopped", cfg.nodename);
        Ok(())
    }
}

/// Handles one delivery from receipt to settlement.
async fn handle(s: Arc<Shared>, d: Delivery) {
    let received_at = Instant::now();
    let Delivery { message, acker } = d;
    let msg = match decode_task(&message) {
        Ok(m) => m,
        Err(e) => return reject_malformed(&s, &message, acker.as_ref(), &e).await,
    };
    let target = ReplyTarget {
        reply_to: msg.reply_to.clone(),
    };

    let Some(task) = s.registry.get(&msg.name) else {
        return unknown_task(&s, &message, &msg, acker.as_ref()).await;
    };
    let mut req = s.state.received(&msg, &message);
    if revoke_if_expired(&s, &msg, &target, acker.as_ref()).await
        || revoke_if_revoked(&s, &msg, &target, acker.as_ref(), &req).await
    {
        return;
    }

    // ETA/countdown: hold the message unacked until it is due.
    if let Some(eta) = msg.eta {
        if let Ok(wait) = (eta - Utc::now()).to_std() {
            debug!(task_id = %msg.id, "holding until ETA {eta} ({wait:?})");
            req.scheduled(eta);
            acker.hold_outside_prefetch().await;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = req.interrupted() => {} // revoked: settled just below
                // Left unacked: the broker returns it when the connection closes.
                _ = s.stop_starting.cancelled() => return,
            }
            acker.end_hold().await;
            req.reserved();
            if revoke_if_expired(&s, &msg, &target, acker.as_ref()).await
                || revoke_if_revoked(&s, &msg, &target, acker.as_ref(), &req).await
            {
                return;
            }
        }
    }

    let permit = tokio::select! {
        p = Arc::clone(&s.slots).acquire_owned() => match p {
            Ok(p) => p,
            Err(_) => return,
        },
        _ = s.stop_starting.cancelled() => return,
    };
    if s.stop_starting.is_cancelled()
        || revoke_if_revoked(&s, &msg, &target, acker.as_ref(), &req).await
    {
        return;
    }
    let Some(_running) = RunningGuard::enter(&s, &msg.id) else {
        warn!(task_id = %msg.id, task = %msg.name, "duplicate delivery of a task running on this worker; acking it");
        settle(acker.ack().await, &msg.id, "ack");
        return;
    };
    let mut timings = Timings::new(received_at);

    // Durable tasks: record the message before acking it, so a worker that
    // dies mid-run does not lose it (see `ledger`).
    let ledger = match (task.durable(), &s.ledger) {
        (true, Some(l)) => match begin_in_ledger(&s, l, &msg, &message).await {
            Some(Begin::Run) => Some(l),
            Some(Begin::HeldBy(owner)) => {
                warn!(task_id = %msg.id, "duplicate delivery of a task running on {owner}; acking it");
                settle(acker.ack().await, &msg.id, "ack");
                return;
            }
            // Shutting down before the record was written: left unacked.
            None => return,
        },
        _ => None,
    };
    timings.mark(Step::Ledger);

    // omega|ml's Celery config leaves acks_late off: ack when execution starts.
    if let Err(e) = acker.ack().await {
        // The channel this came on is gone, so the broker has requeued the
        // message; running it now would run it twice.
        warn!(task_id = %msg.id, "ack failed, not running (the broker redelivers it): {e}");
        return;
    }
    timings.mark(Step::Ack);
    let started_at = Instant::now();
    info!(task_id = %msg.id, task = %msg.name, queue = %message.routing_key, "task started");
    if msg.ignore_result != Some(true) {
        let meta = ResultMeta::started(&msg.id, std::process::id(), &s.config.nodename);
        store(&s, &meta, &target).await;
    }
    timings.mark(Step::Started);

    let soft = msg.soft_time_limit.or(Some(s.config.soft_time_limit));
    let hard = msg.hard_time_limit.unwrap_or(s.config.hard_time_limit);
    let cancel = s.stop_running.child_token();
    let slot = req.start();
    let ctx = TaskContext {
        nodename: s.config.nodename.clone(),
        cancel: cancel.clone(),
        cancel_reason: Arc::default(),
        soft_time_limit: soft,
        slot,
        gpus: s.config.gpus.clone(),
    };
    req.running(&ctx);
    let soft_timer = soft
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .map(|d| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                ctx.cancel_with(CancelReason::SoftTimeLimit);
            })
        });
    let renewer = ledger.map(|l| {
        let (l, id) = (l.clone(), msg.id.clone());
        tokio::spawn(async move {
            let every = (l.lease() / 3).max(Duration::from_millis(200));
            loop {
                tokio::time::sleep(every).await;
                match l.renew(&id).await {
                    Ok(true) => {}
                    Ok(false) => warn!(task_id = %id, "lease renewal found no record of ours (claimed by another worker?)"),
                    Err(e) => warn!(task_id = %id, "lease renewal failed: {e}"),
                }
            }
        })
    });
    let run = AssertUnwindSafe(task.run(ctx, &msg)).catch_unwind();
    let hard_limit = Duration::try_from_secs_f64(hard).unwrap_or(Duration::MAX);
    let outcome = match tokio::time::timeout(hard_limit, run).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".into());
            error!(task_id = %msg.id, "task panicked: {what}");
            Err(TaskError {
                exception: ExceptionInfo::new("om_worker.errors", "WorkerInternalError", what),
                traceback: None,
            })
        }
        Err(_) => Err(TaskError {
            exception: ExceptionInfo::time_limit_exceeded(hard),
            traceback: Some(format!(
                "TimeLimitExceeded: hard time limit ({hard}s) exceeded\n"
            )),
        }),
    };
    if let Some(t) = soft_timer {
        t.abort();
    }
    let runtime = started_at.elapsed();
    timings.mark(Step::Run);
    req.finish(&outcome, |v| v.repr());
    let meta = match outcome {
        Ok(value) => {
            info!(task_id = %msg.id, task = %msg.name, "task succeeded in {runtime:.3?}");
            (msg.ignore_result != Some(true)).then(|| ResultMeta::success(&msg.id, value))
        }
        Err(err) => {
            warn!(
                task_id = %msg.id, task = %msg.name,
                "task failed in {runtime:.3?}: {}: {}",
                err.exception.exc_type,
                err.exception.exc_message.first().map(|m| m.repr()).unwrap_or_default()
            );
            // Errors are stored even when results are ignored (store_errors_even_if_ignored).
            Some(ResultMeta::failure(&msg.id, err.exception, err.traceback))
        }
    };
    // revoke(terminate=True) stopped it: REVOKED("terminated"), as Celery stores.
    let meta = if req.terminated() {
        Some(ResultMeta::revoked(&msg.id, "terminated"))
    } else {
        meta
    };
    if let Some(meta) = meta {
        store(&s, &meta, &target).await;
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
    drop(permit);
}

/// Marks a task id as running here for as long as it lives.
struct RunningGuard<'a> {
    shared: &'a Shared,
    id: String,
}

impl<'a> RunningGuard<'a> {
    /// `None` when the id is already running here.
    fn enter(shared: &'a Shared, id: &str) -> Option<Self> {
        let mut running = shared.running.lock().unwrap_or_else(|p| p.into_inner());
        running.insert(id.to_owned()).then(|| RunningGuard {
            shared,
            id: id.to_owned(),
        })
    }
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        let mut running = self
            .shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        running.remove(&self.id);
    }
}

/// The steps of a delivery whose durations [`Timings`] records.
#[derive(Debug, Clone, Copy)]
enum Step {
    Ledger,
    Ack,
    Started,
    Run,
    Result,
    LedgerFinish,
}

/// Where a task's time went, logged as one `task timings` line (bench/ reads
/// it): received → slot, then each [`Step`].
struct Timings {
    last: Instant,
    /// Received → slot acquired (ETA holds and queueing for a slot).
    wait_slot: Duration,
    steps: [Duration; 6],
}

impl Timings {
    fn new(received_at: Instant) -> Self {
        let now = Instant::now();
        Timings {
            last: now,
            wait_slot: now - received_at,
            steps: [Duration::ZERO; 6],
        }
    }

    fn mark(&mut self, step: Step) {
        let now = Instant::now();
        self.steps[step as usize] = now - self.last;
        self.last = now;
    }

    fn log(&self, task_id: &str) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let [ledger, ack, started, run, result, ledger_finish] = self.steps.map(ms);
        info!(
            task_id,
            wait_slot_ms = ms(self.wait_slot),
            ledger_ms = ledger,
            ack_ms = ack,
            started_ms = started,
            run_ms = run,
            result_ms = result,
            ledger_finish_ms = ledger_finish,
            "task timings"
        );
    }
}

/// Writes the in-flight record, retrying while MongoDB is unreachable (the
/// message stays unacked meanwhile). `None` when shutdown began first.
async fn begin_in_ledger(
    s: &Shared,
    ledger: &Ledger,
    msg: &TaskMessage,
    raw: &RawMessage,
) -> Option<Begin> {
    let mut delay = Duration::from_millis(250);
    loop {
        match ledger.begin(&msg.id, raw).await {
            Ok(b) => return Some(b),
            Err(e) => {
                warn!(task_id = %msg.id, "cannot record the task yet, retrying in {delay:?}: {e}")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = s.stop_starting.cancelled() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Expired on receipt or at its ETA: REVOKED("expired") and ack, as Celery does.
async fn revoke_if_expired(
    s: &Shared,
    msg: &TaskMessage,
    target: &ReplyTarget,
    acker: &dyn Acker,
) -> bool {
    let Some(expires) = msg.expires else {
        return false;
    };
    if Utc::now() <= expires {
        return false;
    }
    warn!(task_id = %msg.id, task = %msg.name, "expired at {expires}; revoked");
    store(s, &ResultMeta::revoked(&msg.id, "expired"), target).await;
    settle(acker.ack().await, &msg.id, "ack");
    true
}

/// Revoked by a `revoke` control command: REVOKED("revoked") and ack, as Celery does.
async fn revoke_if_revoked(
    s: &Shared,
    msg: &TaskMessage,
    target: &ReplyTarget,
    acker: &dyn Acker,
    req: &RequestGuard,
) -> bool {
    if !s.state.is_revoked(&msg.id) {
        return false;
    }
    warn!(task_id = %msg.id, task = %msg.name, "revoked by remote control; not running it");
    req.revoked(false);
    store(s, &ResultMeta::revoked(&msg.id, "revoked"), target).await;
    settle(acker.ack().await, &msg.id, "ack");
    true
}

/// A message that is not a valid task: say why, answer FAILURE if we can,
/// and reject it without requeue so it can never loop.
async fn reject_malformed(s: &Shared, raw: &RawMessage, acker: &dyn Acker, e: &DecodeError) {
    let id = peek_task_id(raw);
    let name = peek_task_name(raw);
    error!(
        task_id = id.as_deref().unwrap_or("?"),
        task = name.as_deref().unwrap_or("?"),
        queue = %raw.routing_key,
        content_type = raw.content_type.as_deref().unwrap_or("?"),
        "rejecting malformed message: {e}"
    );
    if let Some(id) = id {
        let target = ReplyTarget {
            reply_to: raw.reply_to.clone(),
        };
        store(s, &ResultMeta::failure(&id, e.exception(), None), &target).await;
    }
    settle(acker.reject(false).await, "malformed", "reject");
}

/// A task name with no handler: fail it like Celery, or forward it.
async fn unknown_task(s: &Shared, raw: &RawMessage, msg: &TaskMessage, acker: &dyn Acker) {
    match &s.config.unknown_tasks {
        UnknownTaskPolicy::Fail => {
            error!(
                task_id = %msg.id, queue = %raw.routing_key,
                "received unregistered task {:?}; failing it (NotRegistered)", msg.name
            );
            let target = ReplyTarget {
                reply_to: msg.reply_to.clone(),
            };
            let meta = ResultMeta::failure(&msg.id, ExceptionInfo::not_registered(&msg.name), None);
            store(s, &meta, &target).await;
            settle(acker.reject(false).await, &msg.id, "reject");
        }
        UnknownTaskPolicy::Forward(queue) => {
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
            match s.broker.publish("", queue, out).await {
                Ok(()) => {
                    info!(task_id = %msg.id, "forwarded unregistered task {:?} to queue {queue:?}", msg.name);
                    settle(acker.ack().await, &msg.id, "ack");
                }
                Err(e) => {
                    // Not lost: back on its queue for another worker (or us, later).
                    error!(task_id = %msg.id, "forwarding to {queue:?} failed, requeueing: {e}");
                    settle(acker.reject(true).await, &msg.id, "requeue");
                }
            }
        }
    }
}

/// How long one attempt to store a result may take.
const STORE_TIMEOUT: Duration = Duration::from_secs(15);

/// Stores a state, retrying briefly: a result that cannot be stored is logged, never a crash.
async fn store(s: &Shared, meta: &ResultMeta, target: &ReplyTarget) {
    let mut delay = Duration::from_millis(200);
    for attempt in 1..=4 {
        // Bounded: a backend that stops answering must not hold the slot (or
        // a warm shutdown) forever.
        let attempt_result = tokio::time::timeout(STORE_TIMEOUT, s.backend.store(meta, target))
            .await
            .unwrap_or_else(|_| {
                Err(crate::backend::BackendError::Io {
                    backend: s.backend.name(),
                    reason: format!("no answer within {STORE_TIMEOUT:?}"),
                })
            });
        match attempt_result {
            Ok(()) => return,
            Err(e) if attempt < 4 => {
                warn!(task_id = %meta.task_id, "storing {} failed (attempt {attempt}): {e}", meta.status.as_str());
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                error!(task_id = %meta.task_id, "could not store {}: {e}", meta.status.as_str());
            }
        }
    }
}

fn settle(r: Result<(), BrokerError>, id: &str, what: &str) {
    if let Err(e) = r {
        warn!(task_id = %id, "{what} failed: {e}");
    }
}
