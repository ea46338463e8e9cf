//! One shutdown for the whole process, owned by `app` (tokio-rs/mini-redis's
//! `shutdown.rs` is the model): who asks for it, who listens, in what order
//! things stop.
//!
//! - [`Shutdown`]: the request. Warm (first SIGTERM/SIGINT, the `shutdown`
//!   control command): stop consuming, let running tasks finish within the
//!   grace period. Cold (a second signal): stop running tasks now.
//! - [`Services`]: the background services beside the worker (ledger
//!   sweeper, beat, remote control, events, metrics), all stopped by one
//!   token once the worker has drained, and awaited.
//!
//! The order, kept by `app::run_worker`: the worker drains → `worker-offline`
//! is sent → services stop → the broker is closed by its owner, last of the
//! things that publish through it (returning unstarted messages to their
//! queues) → kernels are ended.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A shutdown request, warm then cold. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    warm: CancellationToken,
    cold: CancellationToken,
}

impl Shutdown {
    /// Nobody has asked yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for a warm shutdown.
    pub fn begin_warm(&self) {
        self.warm.cancel();
    }

    /// Asks for a cold shutdown (implies warm).
    pub fn begin_cold(&self) {
        self.warm.cancel();
        self.cold.cancel();
    }

    /// Completes once a warm (or cold) shutdown was asked for.
    pub async fn warm_begun(&self) {
        self.warm.cancelled().await
    }

    /// Completes once a cold shutdown was asked for.
    pub async fn cold_begun(&self) {
        self.cold.cancelled().await
    }

    /// Whether a warm (or cold) shutdown was asked for.
    pub fn is_warm(&self) -> bool {
        self.warm.is_cancelled()
    }

    /// The warm token, for the one place that asks from outside the app
    /// (the `shutdown` control command, through `WorkerState`).
    pub fn warm_token(&self) -> CancellationToken {
        self.warm.clone()
    }

    /// First SIGTERM/SIGINT: warm shutdown; the second: cold.
    pub fn listen_for_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let shutdown = self.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            loop {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
                seen += 1;
                if seen == 1 {
                    info!("signal received: warm shutdown (send again for cold shutdown)");
                    shutdown.begin_warm();
                } else {
                    warn!("second signal: cold shutdown");
                    shutdown.begin_cold();
                }
            }
        });
        Ok(())
    }
}

/// The background services of a worker process: one stop token, every task
/// awaited at [`Services::stop`].
#[derive(Debug, Default)]
pub struct Services {
    stop: CancellationToken,
    running: Vec<(&'static str, JoinHandle<()>)>,
}

impl Services {
    /// No services yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The token every service watches; cancelled by [`Services::stop`].
    pub fn token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs `service` until it returns (it must return soon after the token
    /// is cancelled).
    pub fn spawn(
        &mut self,
        name: &'static str,
        service: impl Future<Output = ()> + Send + 'static,
    ) {
        self.running.push((name, tokio::spawn(service)));
    }

    /// Awaits `handle` at [`Services::stop`] too (a service started elsewhere
    /// that watches [`Services::token`]).
    pub fn adopt(&mut self, name: &'static str, handle: JoinHandle<()>) {
        self.running.push((name, handle));
    }

    /// Stops every service and waits for each, at most `limit` in all.
    pub async fn stop(self, limit: Duration) {
        self.stop.cancel();
        let deadline = tokio::time::Instant::now() + limit;
        for (name, handle) in self.running {
            match tokio::time::timeout_at(deadline, handle).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!("{name} ended abnormally: {e}"),
                Err(_) => warn!("{name} did not stop within {limit:?}"),
            }
        }
    }
}
