//! Being a good citizen of a Celery fleet: remote control over the pidbox
//! ([`pidbox`], [`commands`]), events ([`events`]), Prometheus metrics and
//! health ([`metrics`]), all reading one shared [`state::WorkerState`] that
//! the worker pipeline keeps current through a few hooks.
//!
//! Without this module a worker runs tasks but is invisible: `celery
//! inspect`, `celery status`, Flower and omega|ml's `om.runtime.labels()`,
//! `workers()`, `stats()` and `status()` all discover workers over the
//! pidbox and the `celeryev` heartbeat.

pub mod commands;
pub mod events;
pub mod limits;
pub mod metrics;
pub mod pidbox;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
pub use state::WorkerState;

/// Errors setting up remote control, events or metrics.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The broker refused the pidbox subscription.
    #[error("remote control: {0}")]
    Broker(#[from] crate::broker::BrokerError),
    /// The metrics recorder could not be installed.
    #[error("metrics: {0}")]
    Metrics(String),
    /// The metrics address could not be bound.
    #[error("metrics: cannot listen on {0}: {1}")]
    Bind(String, String),
}

/// Starts events (online + heartbeats), the pidbox node and, when
/// `metrics_addr` is set, the metrics server; returns the events task.
/// Events and metrics stop when
/// `stop` is cancelled (after the worker sent `worker-offline` through
/// [`WorkerState::before_close`]); the pidbox ends with the broker.
pub async fn start(
    broker: Arc<dyn Broker>,
    state: Arc<WorkerState>,
    registered: commands::Registered,
    metrics_addr: Option<SocketAddr>,
    heartbeat: f64,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, ControlError> {
    if let Some(addr) = metrics_addr {
        crate::telemetry::set_nodename(&state.nodename);
        let handle = metrics::install_recorder()?;
        crate::telemetry::set_worker_up(state.consuming());
        let (st, br) = (Arc::clone(&state), Arc::clone(&broker));
        metrics::serve(addr, handle, st, br, stop.clone()).await?;
    }
    let ctx = Arc::new(commands::Context {
        broker: Arc::clone(&broker),
        state: Arc::clone(&state),
        registered,
    });
    pidbox::start(ctx).await?;
    Ok(events::start(broker, state, heartbeat, stop).await)
}
