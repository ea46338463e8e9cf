//! An in-memory [`ResultBackend`] for tests of the worker's own decisions:
//! it records every state stored, in order, and can be switched "down" to
//! check what the worker does when a backend does not answer. Interop with
//! Celery's backends is tested against the real servers, not with this.

use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{BackendError, ReplyTarget, ResultBackend};
use crate::protocol::{ResultMeta, State};

#[derive(Default)]
struct Inner {
    stored: Mutex<Vec<(ResultMeta, ReplyTarget)>>,
    down: Mutex<bool>,
    attempts: Mutex<usize>,
    changed: Notify,
}

/// The in-memory backend (see the module docs). Clones share one store.
#[derive(Clone, Default)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every state stored so far, in order.
    pub fn stored(&self) -> Vec<ResultMeta> {
        lock(&self.inner.stored)
            .iter()
            .map(|(m, _)| m.clone())
            .collect()
    }

    /// The states stored for `task_id`, in order.
    pub fn states(&self, task_id: &str) -> Vec<State> {
        lock(&self.inner.stored)
            .iter()
            .filter(|(m, _)| m.task_id == task_id)
            .map(|(m, _)| m.status)
            .collect()
    }

    /// The last state stored for `task_id`.
    pub fn last(&self, task_id: &str) -> Option<ResultMeta> {
        lock(&self.inner.stored)
            .iter()
            .rev()
            .find(|(m, _)| m.task_id == task_id)
            .map(|(m, _)| m.clone())
    }

    /// The reply target each state of `task_id` was stored with.
    pub fn targets(&self, task_id: &str) -> Vec<ReplyTarget> {
        lock(&self.inner.stored)
            .iter()
            .filter(|(m, _)| m.task_id == task_id)
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// While down, every store fails as an unreachable server would.
    pub fn set_down(&self, down: bool) {
        *lock(&self.inner.down) = down;
    }

    /// Store calls so far, failed ones included.
    pub fn attempts(&self) -> usize {
        *lock(&self.inner.attempts)
    }

    /// Waits until `done` holds (checked after every store attempt).
    pub async fn wait_until(&self, done: impl Fn(&MemoryBackend) -> bool) {
        loop {
            let changed = self.inner.changed.notified();
            if done(self) {
                return;
            }
            changed.await;
        }
    }
}

#[async_trait]
impl ResultBackend for MemoryBackend {
    async fn store(&self, meta: &ResultMeta, target: &ReplyTarget) -> Result<(), BackendError> {
        *lock(&self.inner.attempts) += 1;
        let result = if *lock(&self.inner.down) {
            Err(BackendError::Io {
                backend: "memory",
                reason: "down".into(),
            })
        } else {
            lock(&self.inner.stored).push((meta.clone(), target.clone()));
            Ok(())
        };
        self.inner.changed.notify_waiters();
        result
    }

    async fn ping(&self) -> Result<(), BackendError> {
        if *lock(&self.inner.down) {
            return Err(BackendError::Io {
                backend: "memory",
                reason: "down".into(),
            });
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}
