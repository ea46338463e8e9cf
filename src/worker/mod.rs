//! The worker: deliveries in, task runs and result states out.
//!
//! Per delivery, in Celery's order (`celery/worker/strategy.py`, `request.py`):
//! decode → unknown task? → expired? → hold until the ETA → wait for a free
//! slot → ack (omega|ml runs with `acks_late=False`) → STARTED → run under the
//! soft/hard time limits → SUCCESS or FAILURE. Every message that cannot run
//! is settled explicitly — FAILURE where the client can receive one, then
//! ack or reject without requeue — so nothing loops and nothing vanishes
//! silently. Messages not yet started when a warm shutdown begins are left
//! unacked and go back to their queue when the broker's owner closes it.
//!
//! - [`decide`]: the decisions of each stage, pure (no I/O), unit-tested;
//! - `delivery`: one delivery through the stages, applying the decisions;
//! - `report`: storing states and settling messages; states go through the
//!   result outbox ([`crate::backend::outbox`]), so a backend outage never
//!   loses a state nor holds a slot;
//! - `run`: a task under its time limits, lease renewal;
//! - `timings`: the `task timings` log line.
//!
//! The worker uses the broker, backend and ledger it is given and closes
//! none of them: their owner (`app`) stops them after the worker drained.
//! `tests/worker_pipeline.rs` drives it with the in-memory broker, backend
//! and ledger, without servers.

pub mod decide;
mod delivery;
mod order;
mod report;
mod run;
mod timings;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::backend::outbox::{Outbox, OutboxLimits};
use crate::backend::ResultBackend;
use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::control::state::WorkerState;
use crate::gate::Gate;
use crate::ledger::Ledger;
use crate::shutdown::Shutdown;
use crate::tasks::Registry;

/// The least time a warm shutdown gives the result outbox to deliver what
/// it kept, even when the running tasks used up the whole grace.
const OUTBOX_FLUSH_MIN: Duration = Duration::from_secs(3);

/// Errors that stop the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The broker refused to start consuming.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Everything a delivery handler needs, shared by all of them.
struct Shared {
    config: Arc<Config>,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    registry: Registry,
    /// The task slots, shared with remote control (`pool_grow`/`pool_shrink`).
    slots: Arc<Gate>,
    /// Cancelled at warm shutdown: held and waiting messages give up.
    stop_starting: CancellationToken,
    /// Cancelled when running tasks must stop (grace over, cold shutdown).
    stop_running: CancellationToken,
    /// What remote control, events and metrics see (src/control).
    state: Arc<WorkerState>,
    /// In-flight ledger for durable tasks (None: ack-at-start only).
    ledger: Option<Arc<dyn Ledger>>,
    /// Ids (and retry counts) of the tasks running here (see `delivery::RunningGuard`).
    running: delivery::Running,
    /// Arrival order at the slots (see `order`).
    line: Arc<order::Turnstile>,
}

/// A worker: one broker, one backend, a registry, N slots. Built with
/// [`Worker::new`] and the `with_*` methods, then [`Worker::run`].
pub struct Worker {
    config: Arc<Config>,
    broker: Arc<dyn Broker>,
    backend: Arc<dyn ResultBackend>,
    registry: Registry,
    state: Arc<WorkerState>,
    ledger: Option<Arc<dyn Ledger>>,
}

impl Worker {
    /// Builds a worker; nothing happens until [`Worker::run`].
    pub fn new(
        config: Arc<Config>,
        broker: Arc<dyn Broker>,
        backend: Arc<dyn ResultBackend>,
        registry: Registry,
    ) -> Self {
        let state = Arc::new(WorkerState::from_config(&config));
        Worker {
            config,
            broker,
            backend,
            registry,
            state,
            ledger: None,
        }
    }

    /// Records durable tasks in `ledger` before acking them (see [`crate::ledger`]).
    pub fn with_ledger(mut self, ledger: Arc<dyn Ledger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Shares `state` with remote control, events and metrics (src/control).
    pub fn with_state(mut self, state: Arc<WorkerState>) -> Self {
        self.state = state;
        self
    }

    /// The state this worker reports to (revokes go there).
    pub fn state(&self) -> Arc<WorkerState> {
        Arc::clone(&self.state)
    }

    /// Consumes until `shutdown` begins, then drains as described in the
    /// README: running tasks get `shutdown_grace`, messages not started stay
    /// unacked for the broker's owner to return by closing it.
    pub async fn run(self, shutdown: &Shutdown) -> Result<(), WorkerError> {
        let cfg = Arc::clone(&self.config);
        // Every state goes through the outbox: one the backend cannot take
        // now is kept and delivered later, without holding the task's slot.
        let outbox = Outbox::new(
            self.backend,
            OutboxLimits::for_result_expires(cfg.result_expires),
        );
        let outbox_stop = CancellationToken::new();
        let deliverer = outbox.start(outbox_stop.clone());
        let s = Arc::new(Shared {
            slots: self.state.slots(),
            config: self.config,
            broker: self.broker,
            backend: Arc::clone(&outbox) as Arc<dyn ResultBackend>,
            registry: self.registry,
            stop_starting: CancellationToken::new(),
            stop_running: CancellationToken::new(),
            state: self.state,
            ledger: self.ledger,
            running: std::sync::Mutex::default(),
            line: order::Turnstile::new(),
        });
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
                _ = shutdown.warm_begun() => break,
                _ = shutdown.cold_begun() => break,
                d = deliveries.recv() => match d {
                    Some(d) => {
                        let ticket = s.line.ticket();
                        tracker.spawn(delivery::handle(Arc::clone(&s), d, ticket));
                    }
                    None => {
                        error!("broker delivery channel closed; stopping");
                        break;
                    }
                },
            }
        }

        info!("warm shutdown: no new tasks; waiting for running tasks");
        s.state.set_draining();
        s.stop_starting.cancel();
        if let Err(e) = s.broker.stop_consuming().await {
            warn!("stop consuming: {e}");
        }
        drop(deliveries);
        tracker.close();
        let grace = Duration::from_secs(cfg.shutdown_grace);
        let drain_began = tokio::time::Instant::now();
        tokio::select! {
            _ = tracker.wait() => {}
            _ = tokio::time::sleep(grace) => {
                warn!("shutdown grace of {grace:?} over: stopping running tasks");
            }
            _ = shutdown.cold_begun() => {
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
        // States kept during an outage: what is left of the grace (a few
        // seconds at least) to deliver them; each one left is logged.
        let flush_for = grace
            .saturating_sub(drain_began.elapsed())
            .max(OUTBOX_FLUSH_MIN);
        if outbox.pending() > 0 {
            info!(
                "delivering {} kept result state(s) before exiting (up to {flush_for:?})",
                outbox.pending()
            );
        }
        tokio::select! {
            biased;
            // Cold: no more waiting; what is left is logged.
            _ = shutdown.cold_begun() => {
                outbox.flush(Duration::ZERO).await;
            }
            _ = outbox.flush(flush_for) => {}
        }
        outbox_stop.cancel();
        if let Err(e) = deliverer.await {
            warn!("result outbox deliverer: {e}");
        }
        Ok(())
    }
}
