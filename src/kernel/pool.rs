//! [`PooledLauncher`]: kernels started ahead of time, each handed to exactly one run.
//!
//! Even a forked kernel needs a few hundred milliseconds to build its IPython shell and
//! sockets; a plain kernel needs seconds. The pool keeps `size` kernels ready for one launch
//! configuration (the worker's default kernel, env and cwd), so a task normally gets a kernel
//! that answered `kernel_info` already.
//!
//! Isolation guarantee: a pooled kernel has never run any code of any task when it is handed
//! out, it is handed out once, and it is never taken back (the executor shuts it down after the
//! run as it does any kernel). No state can flow from one task to the next through the pool.
//!
//! - `launch()` with options equal to the pool's template takes the oldest ready kernel that is
//!   still alive (dead ones are discarded); otherwise, or when none is ready, it launches
//!   directly through the wrapped launcher;
//! - every take (and every discarded or failed start) wakes the refill task, which keeps
//!   `ready + starting == size`; repeated start failures back off up to 30 s;
//! - a 1 s sweep drops idle kernels that died (OOM killer, `kill`), so the pool refills them;
//! - [`KernelLauncher::shutdown`] stops refilling, kills the idle kernels, kills kernels that
//!   finish starting afterwards, and shuts the wrapped launcher down. Idle kernels are
//!   registered like any kernel, in the [`KernelTracker`](super::KernelTracker) of the wrapped
//!   launcher, so its [`kill_all`](super::KernelTracker::kill_all) reaches them too (the pool
//!   starts no process itself and so needs no tracker of its own).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{Kernel, KernelError, KernelLauncher, LaunchOptions};

/// Longest pause between refill attempts after consecutive start failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Counters (for logs and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Kernels ready now.
    pub ready: usize,
    /// Kernels being started for the pool now.
    pub starting: usize,
    /// Launches served from the pool.
    pub hits: u64,
    /// Launches that went to the wrapped launcher (no match or none ready).
    pub misses: u64,
    /// Idle kernels found dead and discarded.
    pub discarded: u64,
    /// Kernels started for the pool (successfully).
    pub started: u64,
    /// Pool starts that failed.
    pub failed: u64,
}

struct PoolShared {
    inner: Arc<dyn KernelLauncher>,
    template: LaunchOptions,
    size: usize,
    ready: Mutex<VecDeque<Kernel>>,
    starting: AtomicUsize,
    closed: AtomicBool,
    wake: Notify,
    /// Consecutive start failures and when the next start may be tried.
    backoff: Mutex<(u32, Option<tokio::time::Instant>)>,
    hits: AtomicU64,
    misses: AtomicU64,
    discarded: AtomicU64,
    started: AtomicU64,
    failed: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PoolShared {
    fn matches(&self, opts: &LaunchOptions) -> bool {
        let t = &self.template;
        opts.kernel_name.eq_ignore_ascii_case(&t.kernel_name)
            && opts.env == t.env
            && opts.cwd == t.cwd
            && opts.memory_limit_bytes == t.memory_limit_bytes
            && opts.transport == t.transport
            && opts.extra_args == t.extra_args
    }

    /// Removes dead idle kernels; returns them for an orderly kill outside the lock.
    fn take_dead(&self) -> Vec<Kernel> {
        let mut ready = lock(&self.ready);
        let mut dead = Vec::new();
        let mut keep = VecDeque::with_capacity(ready.len());
        while let Some(k) = ready.pop_front() {
            if k.is_alive() {
                keep.push_back(k);
            } else {
                dead.push(k);
            }
        }
        *ready = keep;
        self.discarded
            .fetch_add(dead.len() as u64, Ordering::Relaxed);
        dead
    }

    /// Starts kernels until `ready + starting == size` (unless backing off or closed).
    fn top_up(self: &Arc<Self>) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        if let (_, Some(until)) = *lock(&self.backoff) {
            if tokio::time::Instant::now() < until {
                return;
            }
        }
        loop {
            let have = lock(&self.ready).len() + self.starting.load(Ordering::SeqCst);
            if have >= self.size {
                return;
            }
            self.starting.fetch_add(1, Ordering::SeqCst);
            let shared = Arc::clone(self);
            tokio::spawn(async move {
                let result = shared.inner.launch(&shared.template).await;
                match result {
                    Ok(kernel) => {
                        *lock(&shared.backoff) = (0, None);
                        shared.started.fetch_add(1, Ordering::Relaxed);
                        if shared.closed.load(Ordering::SeqCst) {
                            kernel.shutdown(Duration::ZERO).await;
                        } else {
                            tracing::debug!(
                                pid = kernel.pid(),
                                startup_ms = kernel.startup_time.as_millis() as u64,
                                "pooled kernel ready"
                            );
                            lock(&shared.ready).push_back(kernel);
                        }
                    }
                    Err(e) => {
                        shared.failed.fetch_add(1, Ordering::Relaxed);
                        let pause = {
                            let mut b = lock(&shared.backoff);
                            b.0 = b.0.saturating_add(1);
                            let pause = Duration::from_millis(500)
                                .saturating_mul(1u32 << b.0.min(6))
                                .min(MAX_BACKOFF);
                            b.1 = Some(tokio::time::Instant::now() + pause);
                            pause
                        };
                        tracing::warn!(error = %e, retry_in = ?pause, "kernel pool: start failed");
                    }
                }
                shared.starting.fetch_sub(1, Ordering::SeqCst);
                shared.wake.notify_one();
            });
        }
    }

    async fn supervise(self: Arc<Self>) {
        while !self.closed.load(Ordering::SeqCst) {
            for k in self.take_dead() {
                tracing::info!(pid = k.pid(), "kernel pool: idle kernel died; replacing it");
                k.shutdown(Duration::ZERO).await;
            }
            self.top_up();
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// A pool of ready kernels in front of another launcher (see the module docs).
pub struct PooledLauncher {
    shared: Arc<PoolShared>,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for PooledLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledLauncher")
            .field("size", &self.shared.size)
            .field("kernel", &self.shared.template.kernel_name)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl PooledLauncher {
    /// Starts filling a pool of `size` kernels launched by `inner` with `template` (must be
    /// called inside a tokio runtime). `size == 0` makes a pass-through.
    pub fn new(inner: Arc<dyn KernelLauncher>, template: LaunchOptions, size: usize) -> Self {
        let shared = Arc::new(PoolShared {
            inner,
            template,
            size,
            ready: Mutex::new(VecDeque::new()),
            starting: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            wake: Notify::new(),
            backoff: Mutex::new((0, None)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            started: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let supervisor = (size > 0).then(|| tokio::spawn(Arc::clone(&shared).supervise()));
        PooledLauncher {
            shared,
            supervisor: Mutex::new(supervisor),
        }
    }

    /// Counters and current fill.
    pub fn stats(&self) -> PoolStats {
        let s = &self.shared;
        PoolStats {
            ready: lock(&s.ready).len(),
            starting: s.starting.load(Ordering::SeqCst),
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            discarded: s.discarded.load(Ordering::Relaxed),
            started: s.started.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
        }
    }

    /// Pids of the idle kernels (for diagnostics and tests).
    pub fn ready_pids(&self) -> Vec<i32> {
        lock(&self.shared.ready).iter().map(Kernel::pid).collect()
    }

    /// Waits until `n` kernels are ready (or `within` passes); returns how many are ready.
    pub async fn wait_ready(&self, n: usize, within: Duration) -> usize {
        let end = Instant::now() + within;
        loop {
            let have = lock(&self.shared.ready).len();
            if have >= n || Instant::now() >= end {
                return have;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The launch options pooled kernels are started with.
    pub fn template(&self) -> &LaunchOptions {
        &self.shared.template
    }
}

#[async_trait]
impl KernelLauncher for PooledLauncher {
    async fn launch(&self, opts: &LaunchOptions) -> Result<Kernel, KernelError> {
        let s = &self.shared;
        if s.size > 0 && !s.closed.load(Ordering::SeqCst) && s.matches(opts) {
            let took = Instant::now();
            loop {
                let next = lock(&s.ready).pop_front();
                let Some(mut kernel) = next else {
                    break;
                };
                if kernel.is_alive() {
                    s.hits.fetch_add(1, Ordering::Relaxed);
                    s.wake.notify_one();
                    tracing::debug!(
                        pid = kernel.pid(),
                        started_ms = kernel.startup_time.as_millis() as u64,
                        "kernel taken from the pool"
                    );
                    // What this run waited for its kernel.
                    kernel.startup_time = took.elapsed();
                    return Ok(kernel);
                }
                s.discarded.fetch_add(1, Ordering::Relaxed);
                tracing::info!(pid = kernel.pid(), "kernel pool: discarding a dead kernel");
                kernel.shutdown(Duration::ZERO).await;
            }
            s.wake.notify_one();
        }
        s.misses.fetch_add(1, Ordering::Relaxed);
        s.inner.launch(opts).await
    }

    async fn shutdown(&self) {
        let s = &self.shared;
        s.closed.store(true, Ordering::SeqCst);
        s.wake.notify_one();
        let supervisor = lock(&self.supervisor).take();
        if let Some(h) = supervisor {
            h.abort();
            let _ = h.await;
        }
        let idle: Vec<Kernel> = lock(&s.ready).drain(..).collect();
        for k in idle {
            k.shutdown(Duration::ZERO).await;
        }
        // Starts in flight kill their kernel when they finish (they see `closed`).
        let end = Instant::now() + Duration::from_secs(10);
        while s.starting.load(Ordering::SeqCst) > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.inner.shutdown().await;
    }
}

impl Drop for PooledLauncher {
    fn drop(&mut self) {
        // Stop refilling; the idle kernels die with the shared state (their drop guards kill
        // their process groups) once in-flight starts have finished.
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        if let Some(h) = lock(&self.supervisor).take() {
            h.abort();
        }
    }
}
