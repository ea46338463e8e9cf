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

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// A resizable counting semaphore (see the module docs). Waiters are served
/// in arrival order, one at a time, as tokio's semaphore serves them: a
/// returned permit goes straight to the oldest waiter still waiting.
#[derive(Debug)]
pub struct Gate {
    state: Mutex<GateState>,
}

#[derive(Debug)]
struct GateState {
    limit: usize,
    held: usize,
    /// Waiting acquisitions, oldest first; a dropped one is skipped.
    waiters: VecDeque<oneshot::Sender<GatePermit>>,
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
        self.gate.hand_over();
    }
}

impl Gate {
    /// A gate letting `limit` permits out at once.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Gate {
            state: Mutex::new(GateState {
                limit,
                held: 0,
                waiters: VecDeque::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        // Plain counters: a panic elsewhere cannot leave them half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives free permits to the oldest waiters.
    fn hand_over(self: &Arc<Self>) {
        // A waiter that went away between the check and the send gives its
        // permit back here, dropped once the lock is released.
        let mut returned = Vec::new();
        {
            let mut s = self.lock();
            while s.held < s.limit {
                let Some(tx) = s.waiters.pop_front() else {
                    break;
                };
                if tx.is_closed() {
                    continue;
                }
                s.held += 1;
                if let Err(p) = tx.send(GatePermit {
                    gate: Arc::clone(self),
                }) {
                    returned.push(p);
                }
            }
        }
        drop(returned);
    }

    /// A permit now, if fewer than the limit are out and nobody waits.
    pub fn try_acquire(self: &Arc<Self>) -> Option<GatePermit> {
        let mut s = self.lock();
        while s.waiters.front().is_some_and(|w| w.is_closed()) {
            s.waiters.pop_front();
        }
        if s.held < s.limit && s.waiters.is_empty() {
            s.held += 1;
            Some(GatePermit {
                gate: Arc::clone(self),
            })
        } else {
            None
        }
    }

    /// Waits for a permit, after those who waited first. Cancel-safe:
    /// dropping the future takes nothing (a permit already handed to it is
    /// returned).
    pub async fn acquire(self: &Arc<Self>) -> GatePermit {
        loop {
            if let Some(p) = self.try_acquire() {
                return p;
            }
            let rx = {
                let (tx, rx) = oneshot::channel();
                self.lock().waiters.push_back(tx);
                rx
            };
            // Between the check and the push a permit may have come back.
            self.hand_over();
            if let Ok(p) = rx.await {
                return p;
            }
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

    /// Raises the limit by `n` and serves the waiters; returns the new limit.
    pub fn grow(self: &Arc<Self>, n: usize) -> usize {
        let limit = {
            let mut s = self.lock();
            s.limit = s.limit.saturating_add(n);
            s.limit
        };
        self.hand_over();
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

    /// Sets the limit and serves the waiters it lets through. Returns the old one.
    pub fn set_limit(self: &Arc<Self>, limit: usize) -> usize {
        let old = {
            let mut s = self.lock();
            std::mem::replace(&mut s.limit, limit)
        };
        self.hand_over();
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
    async fn waiters_are_served_in_order() {
        let g = Gate::new(1);
        let first = g.try_acquire().expect("free");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut joins = Vec::new();
        for i in 0..5 {
            let (g2, order) = (Arc::clone(&g), Arc::clone(&order));
            joins.push(tokio::spawn(async move {
                let _p = g2.acquire().await;
                order.lock().expect("lock").push(i);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }));
            // Queued one after the other.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(first);
        for j in joins {
            tokio::time::timeout(Duration::from_secs(5), j)
                .await
                .expect("served")
                .expect("joined");
        }
        assert_eq!(*order.lock().expect("lock"), vec![0, 1, 2, 3, 4]);
        assert_eq!(g.held(), 0);
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
