//! The result outbox: a [`ResultBackend`] wrapped so that a state which
//! cannot be stored now is kept and delivered once the backend answers again.
//!
//! Why: a broker or result backend outage longer than a few seconds used to
//! drop the states of the tasks that finished during it, and the client
//! (`AsyncResult.get()`, `job.status()`) waited for ever on a task that had
//! run. Celery's own rpc backend retries for about 20 s; the client waits
//! much longer (results live `result_expires`, omega|ml: 3600 s).
//!
//! How, composed rather than special-cased: [`Outbox`] is itself a
//! [`ResultBackend`]. `store` tries the wrapped backend once (bounded by
//! [`OutboxLimits::attempt_timeout`]); if that fails — or if states are
//! already waiting, so a task's later state can never overtake its earlier
//! one — the state is queued and `store` returns at once, so a task slot is
//! never held while the backend is away. One background deliverer
//! ([`Outbox::start`]) sends the queue in order (first in, first out: per
//! task STARTED before SUCCESS, never STARTED after the final state), with a
//! doubling back-off while the backend stays away.
//!
//! Bounded: a state is kept for [`OutboxLimits::keep_for`] (at least the
//! result expiry; the client cannot be waiting longer), and the queue holds at
//! most [`OutboxLimits::max_entries`] states and [`OutboxLimits::max_bytes`]
//! (estimated) bytes; beyond that the oldest states are dropped, each with an
//! ERROR line and counted in `om_worker_results_dropped_total`. When the
//! first state fails, the first state of another task is tried: if the
//! backend takes that one, it is up and refuses only the first, which is
//! dropped after [`MAX_REFUSALS`] such refusals, so one bad state cannot
//! block the rest (no `ping` is trusted for this: rpc:// cannot ping).
//! At warm shutdown [`Outbox::flush`] waits a bounded time and logs exactly
//! which states were not delivered.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{BackendError, ReplyTarget, ResultBackend};
use crate::backoff::Backoff;
use crate::protocol::{ResultMeta, Value};

/// Refusals of one state while the backend takes other tasks' states,
/// before it is dropped (a broken state must not block the queue).
pub const MAX_REFUSALS: u32 = 5;

/// How long and how much the outbox keeps.
#[derive(Debug, Clone)]
pub struct OutboxLimits {
    /// A queued state older than this is dropped (no client waits for it).
    pub keep_for: Duration,
    /// At most this many queued states.
    pub max_entries: usize,
    /// At most this many (estimated) bytes of queued states.
    pub max_bytes: usize,
    /// One store attempt may take this long.
    pub attempt_timeout: Duration,
    /// Back-off between deliveries while the backend is away: first delay.
    pub retry_initial: Duration,
    /// Back-off cap.
    pub retry_max: Duration,
}

impl OutboxLimits {
    /// The worker's limits for a backend whose results expire after
    /// `result_expires` seconds (0 = never): states are kept at least that
    /// long and at least one hour; 10 000 states or 64 MiB at most.
    pub fn for_result_expires(result_expires: u64) -> Self {
        OutboxLimits {
            keep_for: Duration::from_secs(result_expires.max(3600)),
            max_entries: 10_000,
            max_bytes: 64 << 20,
            attempt_timeout: Duration::from_secs(10),
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// One queued state.
struct Entry {
    seq: u64,
    item: Arc<(ResultMeta, ReplyTarget)>,
    queued_at: Instant,
    size: usize,
    refusals: u32,
}

#[derive(Default)]
struct Queue {
    entries: VecDeque<Entry>,
    bytes: usize,
    next_seq: u64,
}

/// A [`ResultBackend`] that keeps what it cannot store now (see the module docs).
pub struct Outbox {
    inner: Arc<dyn ResultBackend>,
    limits: OutboxLimits,
    queue: Mutex<Queue>,
    /// Woken when a state is queued or leaves the queue.
    changed: Notify,
    /// Ends the deliverer's back-off early (a flush wants a try now).
    kick: Notify,
    delivered_late: AtomicU64,
    dropped: AtomicU64,
}

impl Outbox {
    /// Wraps `inner`; nothing is delivered late until [`Outbox::start`].
    pub fn new(inner: Arc<dyn ResultBackend>, limits: OutboxLimits) -> Arc<Self> {
        Arc::new(Outbox {
            inner,
            limits,
            queue: Mutex::default(),
            changed: Notify::new(),
            kick: Notify::new(),
            delivered_late: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// States waiting for the backend.
    pub fn pending(&self) -> usize {
        self.lock().entries.len()
    }

    /// States delivered from the queue so far (not on the first try).
    pub fn delivered_late(&self) -> u64 {
        self.delivered_late.load(Ordering::SeqCst)
    }

    /// States given up so far (over the caps, too old, or refused).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }

    /// One bounded attempt on the wrapped backend.
    async fn attempt(&self, meta: &ResultMeta, target: &ReplyTarget) -> Result<(), BackendError> {
        let limit = self.limits.attempt_timeout;
        tokio::time::timeout(limit, self.inner.store(meta, target))
            .await
            .unwrap_or_else(|_| {
                Err(BackendError::Io {
                    backend: self.inner.name(),
                    reason: format!("no answer within {limit:?}"),
                })
            })
    }

    fn drop_entry(&self, e: &Entry, why: &str) {
        let (meta, _) = &*e.item;
        self.dropped.fetch_add(1, Ordering::SeqCst);
        crate::telemetry::result_dropped();
        error!(
            task_id = %meta.task_id,
            "result state {} dropped, the client will not see it: {why} (queued {:.0?} ago)",
            meta.status.as_str(),
            e.queued_at.elapsed()
        );
    }

    /// Queues a state behind the others, dropping the oldest beyond the caps.
    fn enqueue(&self, meta: &ResultMeta, target: &ReplyTarget) {
        let size = approx_size(meta);
        let mut dropped = Vec::new();
        {
            let mut q = self.lock();
            let seq = q.next_seq;
            q.next_seq += 1;
            q.bytes += size;
            q.entries.push_back(Entry {
                seq,
                item: Arc::new((meta.clone(), target.clone())),
                queued_at: Instant::now(),
                size,
                refusals: 0,
            });
            while q.entries.len() > self.limits.max_entries
                || (q.bytes > self.limits.max_bytes && q.entries.len() > 1)
            {
                let Some(e) = q.entries.pop_front() else {
                    break;
                };
                q.bytes -= e.size;
                dropped.push(e);
            }
            crate::telemetry::set_results_pending(q.entries.len());
        }
        for e in &dropped {
            self.drop_entry(e, "the result outbox is full (oldest first)");
        }
        self.changed.notify_waiters();
    }

    /// Removes the entry `seq` if it is still queued.
    fn remove_seq(&self, seq: u64) -> Option<Entry> {
        let mut q = self.lock();
        let pos = q.entries.iter().position(|e| e.seq == seq)?;
        let e = q.entries.remove(pos)?;
        q.bytes -= e.size;
        crate::telemetry::set_results_pending(q.entries.len());
        Some(e)
    }

    /// The first queued state of another task than `task_id` (the earliest
    /// of its own task, as everything before it is `task_id`'s).
    fn probe_after(&self, task_id: &str) -> Option<(u64, Arc<(ResultMeta, ReplyTarget)>)> {
        self.lock()
            .entries
            .iter()
            .find(|e| e.item.0.task_id != task_id)
            .map(|e| (e.seq, Arc::clone(&e.item)))
    }

    fn delivered(&self, seq: u64) {
        if let Some(e) = self.remove_seq(seq) {
            let (meta, _) = &*e.item;
            self.delivered_late.fetch_add(1, Ordering::SeqCst);
            info!(task_id = %meta.task_id,
                "delivered result state {} (queued {:.1?} ago, {} still waiting)",
                meta.status.as_str(), e.queued_at.elapsed(), self.pending());
        }
        self.changed.notify_waiters();
    }

    /// Drops states older than `keep_for` from the front (the oldest).
    fn expire(&self) {
        let mut old = Vec::new();
        {
            let mut q = self.lock();
            while q
                .entries
                .front()
                .is_some_and(|e| e.queued_at.elapsed() > self.limits.keep_for)
            {
                if let Some(e) = q.entries.pop_front() {
                    q.bytes -= e.size;
                    old.push(e);
                }
            }
            crate::telemetry::set_results_pending(q.entries.len());
        }
        for e in &old {
            self.drop_entry(e, "kept longer than the result expiry");
        }
        if !old.is_empty() {
            self.changed.notify_waiters();
        }
    }

    /// Starts the deliverer; it ends when `stop` is cancelled.
    pub fn start(self: &Arc<Self>, stop: CancellationToken) -> JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move { me.deliver_forever(stop).await })
    }

    async fn deliver_forever(&self, stop: CancellationToken) {
        let mut backoff = Backoff::new(self.limits.retry_initial, self.limits.retry_max);
        let mut away_since: Option<Instant> = None;
        loop {
            let changed = self.changed.notified();
            self.expire();
            let head = self
                .lock()
                .entries
                .front()
                .map(|e| (e.seq, Arc::clone(&e.item)));
            let Some((seq, item)) = head else {
                tokio::select! {
                    _ = changed => continue,
                    _ = stop.cancelled() => return,
                }
            };
            let (meta, target) = &*item;
            match self.attempt(meta, target).await {
                Ok(()) => {
                    self.delivered(seq);
                    if away_since.take().is_some() {
                        info!("result backend {} answers again", self.inner.name());
                    }
                    backoff.reset();
                    continue;
                }
                Err(e @ BackendError::Refused { .. }) => {
                    if let Some(entry) = self.remove_seq(seq) {
                        self.drop_entry(&entry, &e.to_string());
                    }
                    continue;
                }
                Err(e) => {
                    // Down, or refusing this one state? A later state of
                    // another task tells (per-task order is kept: it is the
                    // earliest of its task).
                    if let Some((pseq, pitem)) = self.probe_after(&meta.task_id) {
                        if self.attempt(&pitem.0, &pitem.1).await.is_ok() {
                            self.delivered(pseq);
                            self.refused(seq, &e);
                            backoff.reset();
                            continue;
                        }
                    }
                    if away_since.is_none() {
                        away_since = Some(Instant::now());
                        warn!(
                            "result backend {} unavailable, {} state(s) kept for later: {e}",
                            self.inner.name(),
                            self.pending()
                        );
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = self.kick.notified() => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// The backend refused the state `seq` while it took another task's.
    fn refused(&self, seq: u64, e: &BackendError) {
        let give_up = {
            let mut q = self.lock();
            match q.entries.iter_mut().find(|x| x.seq == seq) {
                Some(entry) => {
                    entry.refusals += 1;
                    entry.refusals >= MAX_REFUSALS
                }
                None => false,
            }
        };
        if give_up {
            if let Some(entry) = self.remove_seq(seq) {
                self.drop_entry(&entry, &format!("refused {MAX_REFUSALS} times: {e}"));
                self.changed.notify_waiters();
            }
        }
    }

    /// Waits up to `within` for the queue to empty (the deliverer must be
    /// running), then logs every state still waiting, one ERROR line each.
    /// Returns how many were not delivered.
    pub async fn flush(&self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        if self.pending() > 0 {
            self.kick.notify_one();
        }
        loop {
            let changed = self.changed.notified();
            if self.pending() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                break;
            }
        }
        let left: Vec<Arc<(ResultMeta, ReplyTarget)>> = self
            .lock()
            .entries
            .iter()
            .map(|e| Arc::clone(&e.item))
            .collect();
        for item in &left {
            let (meta, _) = &**item;
            error!(task_id = %meta.task_id,
                "result state {} not delivered before shutdown (result backend {} unavailable)",
                meta.status.as_str(), self.inner.name());
        }
        if !left.is_empty() {
            error!(
                "{} result state(s) not delivered before shutdown",
                left.len()
            );
        }
        left.len()
    }
}

#[async_trait]
impl ResultBackend for Outbox {
    /// Stores now if the backend answers and nothing is waiting before it;
    /// otherwise queues the state. Never fails: what cannot be kept is
    /// logged by the outbox itself.
    async fn store(&self, meta: &ResultMeta, target: &ReplyTarget) -> Result<(), BackendError> {
        if self.pending() == 0 {
            match self.attempt(meta, target).await {
                Ok(()) => return Ok(()),
                Err(e @ BackendError::Refused { .. }) => {
                    // Never storable: one line, no retries.
                    self.dropped.fetch_add(1, Ordering::SeqCst);
                    crate::telemetry::result_dropped();
                    error!(task_id = %meta.task_id,
                        "result state {} dropped, the client will not see it: {e}", meta.status.as_str());
                    return Ok(());
                }
                Err(e) => warn!(task_id = %meta.task_id,
                    "storing {} failed, kept for later delivery: {e}", meta.status.as_str()),
            }
        }
        self.enqueue(meta, target);
        Ok(())
    }

    async fn ping(&self) -> Result<(), BackendError> {
        self.inner.ping().await
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

/// A cheap estimate of the memory a state holds (for the byte cap).
fn approx_size(meta: &ResultMeta) -> usize {
    let mut n = 256 + meta.task_id.len() + meta.traceback.as_ref().map_or(0, String::len);
    if let Some(s) = &meta.serialized {
        n += s.bytes.len() + s.repr.len();
    }
    let mut stack: Vec<&Value> = vec![&meta.result];
    stack.extend(meta.children.iter());
    while let Some(v) = stack.pop() {
        n += 32;
        match v {
            Value::BigInt(s) | Value::Str(s) | Value::Decimal(s) => n += s.len(),
            Value::Bytes(b) => n += b.len(),
            Value::List(items) | Value::Tuple(items) | Value::Set(items) => stack.extend(items),
            Value::Dict(items) => {
                for (k, v) in items {
                    stack.push(k);
                    stack.push(v);
                }
            }
            Value::Object(o) => {
                n += o.class.len();
                stack.extend(o.args.iter());
                stack.push(&o.state);
            }
            _ => {}
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::MemoryBackend;
    use crate::protocol::State;

    fn limits() -> OutboxLimits {
        OutboxLimits {
            retry_initial: Duration::from_millis(10),
            retry_max: Duration::from_millis(50),
            ..OutboxLimits::for_result_expires(3600)
        }
    }

    fn target() -> ReplyTarget {
        ReplyTarget {
            reply_to: Some("reply".into()),
        }
    }

    async fn within<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(10), f)
            .await
            .expect("timed out")
    }

    /// Refuses (for good) the states of task ids starting with "refuse",
    /// stores the others in `inner`.
    struct Refusing {
        inner: MemoryBackend,
        tries: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl ResultBackend for Refusing {
        async fn store(&self, meta: &ResultMeta, t: &ReplyTarget) -> Result<(), BackendError> {
            if meta.task_id.starts_with("refuse") {
                self.tries.fetch_add(1, Ordering::SeqCst);
                return Err(BackendError::Refused {
                    backend: "test",
                    reason: "id too long".into(),
                });
            }
            self.inner.store(meta, t).await
        }
        async fn ping(&self) -> Result<(), BackendError> {
            Ok(())
        }
        fn name(&self) -> &'static str {
            "test"
        }
    }

    #[tokio::test]
    async fn a_state_that_can_never_be_stored_is_dropped_at_once() {
        let mem = MemoryBackend::new();
        let backend = Arc::new(Refusing {
            inner: mem.clone(),
            tries: Default::default(),
        });
        let ob = Outbox::new(Arc::clone(&backend) as Arc<dyn ResultBackend>, limits());
        let stop = CancellationToken::new();
        let deliverer = ob.start(stop.clone());
        // Direct: tried once, dropped, nothing queued.
        ob.store(&ResultMeta::started("refuse-1", 1, "h"), &target())
            .await
            .expect("never fails");
        assert_eq!((ob.pending(), ob.dropped()), (0, 1));
        // Queued behind a state kept during an outage: dropped on its first
        // try when delivered, and the states behind it go on.
        mem.set_down(true);
        ob.store(&ResultMeta::started("a", 1, "h"), &target())
            .await
            .expect("queued");
        ob.store(&ResultMeta::started("refuse-2", 1, "h"), &target())
            .await
            .expect("queued");
        ob.store(&ResultMeta::success("a", Value::Int(1)), &target())
            .await
            .expect("queued");
        mem.set_down(false);
        within(mem.wait_until(|m| m.states("a").len() == 2)).await;
        within(async {
            while ob.pending() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(ob.dropped(), 2);
        assert_eq!(backend.tries.load(Ordering::SeqCst), 2, "each tried once");
        stop.cancel();
        let _ = deliverer.await;
    }

    #[test]
    fn keeps_at_least_the_result_expiry_and_an_hour() {
        assert_eq!(
            OutboxLimits::for_result_expires(7200).keep_for,
            Duration::from_secs(7200)
        );
        assert_eq!(
            OutboxLimits::for_result_expires(0).keep_for,
            Duration::from_secs(3600)
        );
    }

    #[tokio::test]
    async fn stores_directly_while_the_backend_answers() {
        let mem = MemoryBackend::new();
        let ob = Outbox::new(Arc::new(mem.clone()), limits());
        ob.store(&ResultMeta::started("a", 1, "h"), &target())
            .await
            .expect("never fails");
        assert_eq!(mem.states("a"), vec![State::Started]);
        assert_eq!(ob.pending(), 0);
    }

    #[tokio::test]
    async fn a_state_that_cannot_be_stored_is_delivered_later_in_order() {
        let mem = MemoryBackend::new();
        let ob = Outbox::new(Arc::new(mem.clone()), limits());
        let stop = CancellationToken::new();
        mem.set_down(true);
        let t0 = Instant::now();
        ob.store(&ResultMeta::started("a", 1, "h"), &target())
            .await
            .expect("queued");
        ob.store(&ResultMeta::started("b", 1, "h"), &target())
            .await
            .expect("queued");
        ob.store(&ResultMeta::success("a", Value::Int(1)), &target())
            .await
            .expect("queued");
        assert!(t0.elapsed() < Duration::from_secs(2), "store never waits");
        assert_eq!(ob.pending(), 3);
        let deliverer = ob.start(stop.clone());
        // Still away: nothing is lost and nothing reordered.
        within(mem.wait_until(|m| m.attempts() >= 6)).await;
        assert_eq!(ob.pending(), 3);
        mem.set_down(false);
        // Up again, but states are waiting: a new one queues behind them.
        ob.store(&ResultMeta::success("b", Value::Int(2)), &target())
            .await
            .expect("queued");
        within(mem.wait_until(|m| m.stored().len() >= 4)).await;
        assert_eq!(mem.states("a"), vec![State::Started, State::Success]);
        assert_eq!(mem.states("b"), vec![State::Started, State::Success]);
        assert_eq!(mem.targets("a")[1].reply_to.as_deref(), Some("reply"));
        assert_eq!(ob.pending(), 0);
        assert_eq!(ob.delivered_late(), 4);
        assert_eq!(ob.dropped(), 0);
        stop.cancel();
        deliverer.await.expect("deliverer ends");
    }

    #[tokio::test]
    async fn over_the_cap_the_oldest_states_are_dropped() {
        let mem = MemoryBackend::new();
        let ob = Outbox::new(
            Arc::new(mem.clone()),
            OutboxLimits {
                max_entries: 3,
                ..limits()
            },
        );
        mem.set_down(true);
        for id in ["a", "b", "c", "d", "e"] {
            ob.store(&ResultMeta::success(id, Value::None), &target())
                .await
                .expect("queued");
        }
        assert_eq!(ob.pending(), 3);
        assert_eq!(ob.dropped(), 2);
        mem.set_down(false);
        let stop = CancellationToken::new();
        let deliverer = ob.start(stop.clone());
        within(mem.wait_until(|m| m.stored().len() >= 3)).await;
        let ids: Vec<String> = mem.stored().into_iter().map(|m| m.task_id).collect();
        assert_eq!(ids, ["c", "d", "e"]);
        stop.cancel();
        deliverer.await.expect("deliverer ends");
    }

    #[tokio::test]
    async fn the_byte_cap_drops_oldest_first() {
        let mem = MemoryBackend::new();
        let ob = Outbox::new(
            Arc::new(mem.clone()),
            OutboxLimits {
                max_bytes: 3000,
                ..limits()
            },
        );
        mem.set_down(true);
        let big = Value::Bytes(vec![0; 1000]);
        for id in ["a", "b", "c", "d"] {
            ob.store(&ResultMeta::success(id, big.clone()), &target())
                .await
                .expect("queued");
        }
        assert_eq!(ob.pending(), 2, "two 1.3 kB states fit in 3000 bytes");
        assert_eq!(ob.dropped(), 2);
    }

    #[tokio::test]
    async fn states_older_than_the_expiry_are_dropped() {
        let mem = MemoryBackend::new();
        let ob = Outbox::new(
            Arc::new(mem.clone()),
            OutboxLimits {
                keep_for: Duration::from_millis(50),
                ..limits()
            },
        );
        mem.set_down(true);
        ob.store(&ResultMeta::success("old", Value::None), &target())
            .await
            .expect("queued");
        let stop = CancellationToken::new();
        let deliverer = ob.start(stop.clone());
        within(async {
            while ob.pending() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(ob.dropped(), 1);
        mem.set_down(false);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(mem.stored().is_empty());
        stop.cancel();
        deliverer.await.expect("deliverer ends");
    }

    /// A backend that answers pings but refuses one task's states.
    struct RefusesOne(MemoryBackend);

    #[async_trait]
    impl ResultBackend for RefusesOne {
        async fn store(&self, meta: &ResultMeta, t: &ReplyTarget) -> Result<(), BackendError> {
            if meta.task_id == "bad" {
                return Err(BackendError::Io {
                    backend: "memory",
                    reason: "too large".into(),
                });
            }
            self.0.store(meta, t).await
        }
        async fn ping(&self) -> Result<(), BackendError> {
            Ok(())
        }
        fn name(&self) -> &'static str {
            "refuses-one"
        }
    }

    #[tokio::test]
    async fn a_refused_state_does_not_block_the_others() {
        let mem = MemoryBackend::new();
        let ob = Outbox::new(Arc::new(RefusesOne(mem.clone())), limits());
        let stop = CancellationToken::new();
        let deliverer = ob.start(stop.clone());
        ob.store(&ResultMeta::success("bad", Value::None), &target())
            .await
            .expect("queued");
        let ids: Vec<String> = (0..MAX_REFUSALS).map(|i| format!("good{i}")).collect();
        for id in &ids {
            ob.store(&ResultMeta::success(id, Value::None), &target())
                .await
                .expect("queued behind");
        }
        within(mem.wait_until(|m| m.stored().len() >= ids.len())).await;
        within(async {
            while ob.pending() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(
            ob.dropped(),
            1,
            "the refused state, after {MAX_REFUSALS} refusals"
        );
        let got: Vec<String> = mem.stored().into_iter().map(|m| m.task_id).collect();
        assert_eq!(got, ids);
        stop.cancel();
        deliverer.await.expect("deliverer ends");
    }

    #[tokio::test]
    async fn flush_waits_for_delivery_and_reports_what_is_left() {
        let mem = MemoryBackend::new();
        let ob = Outbox::new(Arc::new(mem.clone()), limits());
        let stop = CancellationToken::new();
        let deliverer = ob.start(stop.clone());
        mem.set_down(true);
        ob.store(&ResultMeta::success("x", Value::None), &target())
            .await
            .expect("queued");
        assert_eq!(ob.flush(Duration::from_millis(100)).await, 1);
        mem.set_down(false);
        assert_eq!(within(ob.flush(Duration::from_secs(5))).await, 0);
        assert_eq!(mem.states("x"), vec![State::Success]);
        stop.cancel();
        deliverer.await.expect("deliverer ends");
    }
}
