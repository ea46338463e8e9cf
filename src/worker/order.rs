//! Arrival order at the task slots.
//!
//! Each delivery is handled by its own tokio task, and on a multi-threaded
//! runtime a later message can reach the slots first: its name lookup or
//! decode finished sooner, or it ran on a freer thread. Celery's consumer
//! hands messages to its pool in the order received, and `-c 1` users rely
//! on that (jobs sent one after another run one after another). So a
//! delivery takes a [`Ticket`] on receipt and asks for a slot only when
//! every earlier delivery still in line has asked for one; it leaves the
//! line when it has its slot, or when it will not take one in order: it is
//! settled without running, forwarded, held for its ETA or waits under a
//! rate limit (Celery's timer and token buckets let other messages pass
//! those too).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// The line: tickets handed out and not yet passed.
#[derive(Debug, Default)]
pub struct Turnstile {
    state: Mutex<Line>,
    passed: Notify,
}

#[derive(Debug, Default)]
struct Line {
    next: u64,
    waiting: BTreeSet<u64>,
}

impl Turnstile {
    /// An empty line.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, Line> {
        // A set of numbers: a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next place in line; call in the order messages arrive.
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        let mut line = self.lock();
        let n = line.next;
        line.next += 1;
        line.waiting.insert(n);
        Ticket {
            line: Arc::clone(self),
            n,
            passed: false,
        }
    }

    /// How many tickets are in line.
    #[cfg(test)]
    fn in_line(&self) -> usize {
        self.lock().waiting.len()
    }
}

/// A delivery's place in line; leaves it when passed or dropped.
#[derive(Debug)]
pub struct Ticket {
    line: Arc<Turnstile>,
    n: u64,
    passed: bool,
}

impl Ticket {
    /// Waits until every earlier ticket has left the line. At once for a
    /// ticket that already left.
    pub async fn my_turn(&self) {
        loop {
            let notified = self.line.passed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a pass in between is not missed.
            notified.as_mut().enable();
            if self.passed || self.line.lock().waiting.first() == Some(&self.n) {
                return;
            }
            notified.await;
        }
    }

    /// Leaves the line: later tickets no longer wait for this one.
    pub fn pass(&mut self) {
        if !self.passed {
            self.passed = true;
            self.line.lock().waiting.remove(&self.n);
            self.line.passed.notify_waiters();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.pass();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_ticket_waits_only_for_earlier_ones_still_in_line() {
        let line = Turnstile::new();
        let mut a = line.ticket();
        let b = line.ticket();
        let c = line.ticket();
        a.my_turn().await;
        let waiting = tokio::spawn(async move {
            c.my_turn().await;
            c
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "c went before a and b");
        a.pass();
        b.my_turn().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "c went before b");
        drop(b);
        let c = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("c's turn after b left")
            .expect("task");
        drop(c);
        assert_eq!(line.in_line(), 0);
    }

    #[tokio::test]
    async fn a_passed_ticket_has_its_turn_at_once() {
        let line = Turnstile::new();
        let _a = line.ticket();
        let mut b = line.ticket();
        b.pass();
        tokio::time::timeout(Duration::from_secs(1), b.my_turn())
            .await
            .expect("at once");
        assert_eq!(line.in_line(), 1);
    }
}
