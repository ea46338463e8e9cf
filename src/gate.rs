//! A counting semaphore whose size can change while permits are out.
//!
//! The worker's task slots and the Redis broker's prefetch limit are both a
//! bound on how many things are held at once, and remote control
//! (`pool_grow`, `pool_shrink`) changes that bound while the worker runs.
//! tokio's `Semaphore` can add permits but only forget *available* ones, and
//! it is strictly FIFO: a pending "take N back" acquisition queues behind
//! every waiter that came earlier, so a shrink would only act after all the
//! messages already waiting had started. A [`Gate`] instead compares the
//! number of permits out with the current limit on every acquisition: a
//! shrink applies to the very next start, and never touches a permit that is
//! already held (a running task is never interrupted; it just frees one slot
//! fewer for the waiters when it ends).

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// A resizable counting semaphore (see the module docs).
#[derive(Debug)]
pub struct Gate {
    state: Mutex<GateState>,
    /// Woken when a permit is returned or the limit grows.
    changed: Notify,
}

#[derive(Debug)]
struct GateState {
    limit: usize,
    held: usize,
}

/// One permit of a [`Gate`]; returned when dropped.
#[derive(Debug)]
pub struct GatePermit {
    gate: Arc<Gate>,
}

impl Drop for GatePermit {
    fn drop(&mut self) {
        {
            let mut s = self.gate.lock();
            s.held = s.held.saturating_sub(1);
        }
        self.gate.changed.notify_waiters();
    }
}

impl Gate {
    /// A gate letting `limit` permits out at once.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Gate {
            state: Mutex::new(GateState { limit, held: 0 }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        // Plain counters: a panic elsewhere cannot leave them half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A permit now, if fewer than the limit are out.
    pub fn try_acquire(self: &Arc<Self>) -> Option<GatePermit> {
        let mut s = self.lock();
        if s.held < s.limit {
            s.held += 1;
            Some(GatePermit {
                gate: Arc::clone(self),
            })
        } else {
            None
        }
    }

    /// Waits for a permit. Cancel-safe: dropping the future takes nothing.
    pub async fn acquire(self: &Arc<Self>) -> GatePermit {
        loop {
            // Registered before the check, so a release between the check
            // and the wait is not missed.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(p) = self.try_acquire() {
                return p;
            }
            notified.await;
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Permits out now (may exceed the limit right after a shrink).
    pub fn held(&self) -> usize {
        self.lock().held
    }

    /// Raises the limit by `n` and wakes the waiters; returns the new limit.
    pub fn grow(&self, n: usize) -> usize {
        let limit = {
            let mut s = self.lock();
            s.limit = s.limit.saturating_add(n);
            s.limit
        };
        self.changed.notify_waiters();
        limit
    }

    /// Lowers the limit by `n` unless that would leave fewer than `min`:
    /// `Ok(new limit)`, or `Err(current limit)` with nothing changed.
    /// Permits out stay out; the next acquisitions see the new limit.
    pub fn shrink(&self, n: usize, min: usize) -> Result<usize, usize> {
        let mut s = self.lock();
        match s.limit.checked_sub(n) {
            Some(limit) if limit >= min => {
                s.limit = limit;
                Ok(limit)
            }
            _ => Err(s.limit),
        }
    }

    /// Sets the limit; waiters are woken when it grew. Returns the old one.
    pub fn set_limit(&self, limit: usize) -> usize {
        let old = {
            let mut s = self.lock();
            std::mem::replace(&mut s.limit, limit)
        };
        if limit > old {
            self.changed.notify_waiters();
        }
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn limits_grows_and_shrinks_without_taking_held_permits() {
        let g = Gate::new(1);
        let a = g.try_acquire().expect("one free");
        assert!(g.try_acquire().is_none());
        // A waiter is released by a grow.
        let g2 = Arc::clone(&g);
        let waiter = tokio::spawn(async move { g2.acquire().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        assert_eq!(g.set_limit(2), 1);
        let b = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("woken by the grow")
            .expect("joined");
        assert_eq!(g.held(), 2);
        // Shrink below what is out: nothing is taken back, no new permit.
        g.set_limit(1);
        assert_eq!(g.held(), 2);
        drop(a);
        assert!(g.try_acquire().is_none(), "2 out of 1 -> 1 out of 1");
        drop(b);
        let c = g.try_acquire().expect("free again");
        assert_eq!((g.held(), g.limit()), (1, 1));
        drop(c);
        assert_eq!(g.held(), 0);
        assert_eq!(g.grow(2), 3);
        assert_eq!(g.shrink(2, 1), Ok(1));
        assert_eq!(g.shrink(1, 1), Err(1), "never below the minimum");
        assert_eq!(g.limit(), 1);
    }

    #[tokio::test]
    async fn a_dropped_acquire_takes_nothing() {
        let g = Gate::new(0);
        let r = tokio::time::timeout(Duration::from_millis(20), g.acquire()).await;
        assert!(r.is_err());
        assert_eq!(g.held(), 0);
        g.set_limit(1);
        assert!(g.try_acquire().is_some());
    }
}
