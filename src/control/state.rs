//! What the worker knows about itself, shared by the delivery pipeline
//! (which writes it through a few hooks) and by remote control, events and
//! metrics (which read it).
//!
//! Celery keeps the same facts in `celery/worker/state.py` (requests,
//! `active_requests`, `reserved_requests`, `total_count`, `revoked`) and in
//! the app's Lamport clock. The worker touches this only through
//! [`WorkerState::received`] and the returned [`RequestGuard`], so every
//! request leaves the tables when its handler returns, whatever the path.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::limits::TaskLimits;
use crate::gate::Gate;
use crate::protocol::json::to_json;
use crate::protocol::{RawMessage, TaskMessage, Value};
use crate::tasks::{CancelReason, ErrorKind, TaskContext, TaskError};
use crate::telemetry::CeleryState;

/// Celery's `CELERY_WORKER_REVOKES_MAX`: most ids remembered.
pub const REVOKES_MAX: usize = 50_000;
/// Celery's `CELERY_WORKER_REVOKE_EXPIRES`: how long a revoke is remembered.
pub const REVOKE_EXPIRES: Duration = Duration::from_secs(10_800);

/// Seconds since the epoch, as Python's `time.time()`.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Celery's Lamport clock (`kombu.clocks.LamportClock`): `forward` on every
/// event and reply, `adjust` to every clock value received.
#[derive(Debug, Default)]
pub struct LamportClock(AtomicU64);

impl LamportClock {
    /// Advances and returns the new value.
    pub fn forward(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    /// `max(mine, other) + 1`.
    pub fn adjust(&self, other: u64) -> u64 {
        let mut cur = self.0.load(Ordering::SeqCst);
        loop {
            let next = cur.max(other) + 1;
            match self
                .0
                .compare_exchange(cur, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return next,
                Err(now) => cur = now,
            }
        }
    }
    /// The current value.
    pub fn value(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A bounded, expiring set of revoked task ids (Celery's `LimitedSet`):
/// memory stays bounded however many revokes a fleet broadcasts.
#[derive(Debug)]
pub struct RevokedSet {
    max: usize,
    expires: Duration,
    /// id → (when revoked (monotonic), wall clock seconds).
    items: HashMap<String, (Instant, f64)>,
    /// Insertion order for eviction; may hold stale entries for re-added ids.
    order: VecDeque<(String, Instant)>,
}

impl RevokedSet {
    /// An empty set holding at most `max` ids for `expires` each.
    pub fn new(max: usize, expires: Duration) -> Self {
        RevokedSet {
            max: max.max(1),
            expires,
            items: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Adds (or refreshes) an id.
    pub fn add(&mut self, id: &str, now: Instant) {
        self.purge(now);
        self.items.insert(id.to_owned(), (now, unix_now()));
        self.order.push_back((id.to_owned(), now));
        while self.items.len() > self.max {
            let Some((old, at)) = self.order.pop_front() else {
                break;
            };
            if self.items.get(&old).is_some_and(|(t, _)| *t == at) {
                self.items.remove(&old);
            }
        }
        // Keep the order queue from growing without bound on refreshes.
        if self.order.len() > self.max.saturating_mul(2) {
            let items = &self.items;
            self.order
                .retain(|(id, at)| items.get(id).is_some_and(|(t, _)| t == at));
        }
    }

    /// Whether `id` is revoked (and not expired).
    pub fn contains(&self, id: &str, now: Instant) -> bool {
        self.items
            .get(id)
            .is_some_and(|(t, _)| now.duration_since(*t) < self.expires)
    }

    /// Drops expired ids.
    pub fn purge(&mut self, now: Instant) {
        while let Some((id, at)) = self.order.front() {
            if now.duration_since(*at) < self.expires {
                break;
            }
            if self.items.get(id).is_some_and(|(t, _)| t == at) {
                self.items.remove(id);
            }
            self.order.pop_front();
        }
    }

    /// The ids, in no particular order.
    pub fn ids(&self, now: Instant) -> Vec<String> {
        self.items
            .iter()
            .filter(|(_, (t, _))| now.duration_since(*t) < self.expires)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// `{id: [timestamp, id]}`, the shape Python's `hello` reply carries.
    pub fn as_hello(&self, now: Instant) -> Json {
        let mut m = serde_json::Map::new();
        for (id, (t, wall)) in &self.items {
            if now.duration_since(*t) < self.expires {
                m.insert(id.clone(), json!([wall, id]));
            }
        }
        Json::Object(m)
    }

    /// Number of ids held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Where a request is in the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Received, waiting for a slot (`reserved`).
    Reserved,
    /// Held until its ETA (`scheduled`).
    Scheduled(DateTime<Utc>),
    /// Running since this unix time (`active`).
    Active(f64),
}

/// One request as remote control shows it.
#[derive(Debug, Clone)]
struct Request {
    id: String,
    name: String,
    args: Json,
    kwargs: Json,
    argsrepr: String,
    kwargsrepr: String,
    exchange: String,
    routing_key: String,
    priority: Option<u8>,
    redelivered: bool,
    phase: Phase,
    /// Fires on revoke: wakes a held request, stops a running one (terminate).
    interrupt: CancellationToken,
    /// The running task's context (set once running), for `terminate`.
    run_ctx: Option<TaskContext>,
    terminated: bool,
}

/// A message for the events publisher (see [`crate::control::events`]).
#[derive(Debug)]
pub enum EventOut {
    /// One complete event body.
    Event(Json),
    /// Send a heartbeat now (`heartbeat` control command).
    Heartbeat,
    /// Send `worker-offline` and stop; the sender is answered once it is out.
    Offline(oneshot::Sender<()>),
}

/// Facts about this worker process, shared by everything in [`crate::control`].
pub struct WorkerState {
    /// `name@host`.
    pub nodename: String,
    /// This process.
    pub pid: u32,
    /// The task slots: how many tasks run at once, resized at runtime by
    /// `pool_grow` / `pool_shrink` (see [`crate::gate`]).
    slots: Arc<Gate>,
    /// Prefetch = slots × this (0 = unlimited), as Celery's
    /// `worker_prefetch_multiplier`.
    pub prefetch_multiplier: u16,
    /// Limits set per task name by `time_limit` and `rate_limit`.
    pub limits: TaskLimits,
    /// The worker's settings under Celery's names, secrets masked (`conf`).
    settings: Json,
    /// Default soft/hard time limits (stats `pool.timeouts`).
    pub timeouts: (f64, f64),
    /// The broker URL without password, for `stats.broker`.
    pub broker_url: String,
    /// Lamport clock for events and replies.
    pub clock: LamportClock,
    started: Instant,
    seq: AtomicU64,
    task_events: AtomicBool,
    consuming: AtomicBool,
    draining: AtomicBool,
    events_tx: OnceLock<mpsc::UnboundedSender<EventOut>>,
    shutdown: OnceLock<CancellationToken>,
    inner: Mutex<Inner>,
    /// Wakes the events task when `heartbeat` is asked for.
    pub heartbeat_now: Notify,
}

struct Inner {
    requests: HashMap<u64, Request>,
    total: BTreeMap<String, u64>,
    processed: u64,
    revoked: RevokedSet,
    queues: Vec<String>,
    slots: Vec<bool>,
}

impl std::fmt::Debug for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerState")
            .field("nodename", &self.nodename)
            .finish_non_exhaustive()
    }
}

impl WorkerState {
    /// A fresh state for a worker consuming `queues` with `concurrency`
    /// slots, prefetching `concurrency × prefetch_multiplier` messages.
    pub fn new(
        nodename: &str,
        queues: &[String],
        concurrency: usize,
        prefetch_multiplier: u16,
        timeouts: (f64, f64),
        broker_url: &str,
    ) -> Self {
        WorkerState {
            nodename: nodename.to_owned(),
            pid: std::process::id(),
            slots: Gate::new(concurrency.max(1)),
            prefetch_multiplier,
            limits: TaskLimits::default(),
            settings: Json::Object(serde_json::Map::new()),
            timeouts,
            broker_url: crate::redact::mask_url(broker_url),
            clock: LamportClock::default(),
            started: Instant::now(),
            seq: AtomicU64::new(0),
            task_events: AtomicBool::new(false),
            consuming: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            events_tx: OnceLock::new(),
            shutdown: OnceLock::new(),
            inner: Mutex::new(Inner {
                requests: HashMap::new(),
                total: BTreeMap::new(),
                processed: 0,
                revoked: RevokedSet::new(REVOKES_MAX, REVOKE_EXPIRES),
                queues: queues.to_vec(),
                slots: vec![false; concurrency.max(1)],
            }),
            heartbeat_now: Notify::new(),
        }
    }

    /// A state built from the worker's configuration.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let mut st = Self::new(
            &config.nodename,
            &config.queues,
            config.concurrency,
            config.prefetch_multiplier,
            (config.soft_time_limit, config.hard_time_limit),
            &config.broker_url,
        );
        st.settings = config.celery_settings();
        st
    }

    // ---- pool -------------------------------------------------------------

    /// The task slots the worker takes a permit of before each run.
    pub fn slots(&self) -> Arc<Gate> {
        Arc::clone(&self.slots)
    }

    /// Tasks that may run at once now (`stats` `max-concurrency`).
    pub fn concurrency(&self) -> usize {
        self.slots.limit()
    }

    /// The prefetch count for the current concurrency (`stats`
    /// `prefetch_count`; 0 = unlimited).
    pub fn prefetch(&self) -> u16 {
        crate::config::prefetch_for(self.concurrency(), self.prefetch_multiplier)
    }

    /// `pool_grow n`: `n` more slots at once; returns the new concurrency.
    pub fn grow_pool(&self, n: usize) -> usize {
        self.slots.grow(n)
    }

    /// `pool_shrink n`: `n` slots fewer, never below one. Running tasks go
    /// on; fewer start once they end. `Err(current)` when refused.
    pub fn shrink_pool(&self, n: usize) -> Result<usize, usize> {
        self.slots.shrink(n, 1)
    }

    /// The settings `conf` answers with ([`crate::config::Config::celery_settings`]),
    /// with what remote control changes since start-up as it is now.
    pub fn settings(&self) -> Json {
        let mut s = self.settings.clone();
        if let Json::Object(m) = &mut s {
            m.insert("CELERYD_CONCURRENCY".into(), json!(self.concurrency()));
            m.insert("CELERY_SEND_EVENTS".into(), json!(self.task_events()));
            m.insert("CELERY_QUEUES".into(), json!(self.queues()));
        }
        s
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data; keep serving it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- wiring ---------------------------------------------------------

    /// Connects the events publisher (task and worker events go there).
    pub fn set_events(&self, tx: mpsc::UnboundedSender<EventOut>) {
        let _ = self.events_tx.set(tx);
    }

    /// The token that starts a warm shutdown (`shutdown` command).
    pub fn set_shutdown(&self, warm: CancellationToken) {
        let _ = self.shutdown.set(warm);
    }

    /// Starts a warm shutdown, as SIGTERM does.
    pub fn request_shutdown(&self) -> bool {
        match self.shutdown.get() {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    /// Turns task events on or off (`-E`, `enable_events`, `disable_events`);
    /// returns whether they were on before.
    pub fn set_task_events(&self, on: bool) -> bool {
        self.task_events.swap(on, Ordering::SeqCst)
    }

    /// Whether task events are sent.
    pub fn task_events(&self) -> bool {
        self.task_events.load(Ordering::SeqCst)
    }

    /// Marks the consumer as running or stopped (`/healthz`).
    pub fn set_consuming(&self, on: bool) {
        self.consuming.store(on, Ordering::SeqCst);
        crate::telemetry::set_worker_up(on);
    }

    /// True while deliveries are being consumed.
    pub fn consuming(&self) -> bool {
        self.consuming.load(Ordering::SeqCst)
    }

    /// Marks the start of a warm shutdown: no new tasks, running ones drain (`/readyz` 503,
    /// `/healthz` stays 200 until the worker closes, so a liveness probe never kills the drain).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Consuming and not shutting down: should be given work (`/readyz`).
    pub fn ready(&self) -> bool {
        self.consuming() && !self.draining.load(Ordering::SeqCst)
    }

    /// Called by the worker right before it closes the broker connection:
    /// `worker-offline` must go out while the connection still exists.
    pub async fn before_close(&self) {
        self.set_consuming(false);
        let Some(tx) = self.events_tx.get() else {
            return;
        };
        let (done_tx, done_rx) = oneshot::channel();
        if tx.send(EventOut::Offline(done_tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(3), done_rx).await;
        }
    }

    // ---- events ---------------------------------------------------------

    /// An event body with Celery's standard fields (`hostname`, `utcoffset`,
    /// `pid`, `clock`, `timestamp`, `type`) plus `fields`.
    pub fn event(&self, kind: &str, fields: Json) -> Json {
        let mut m = match fields {
            Json::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        m.insert("hostname".into(), json!(self.nodename));
        m.insert("utcoffset".into(), json!(utcoffset_hours_west()));
        m.insert("pid".into(), json!(self.pid));
        m.insert("clock".into(), json!(self.clock.forward()));
        m.insert("timestamp".into(), json!(unix_now()));
        m.insert("type".into(), json!(kind));
        Json::Object(m)
    }

    fn send_task_event(&self, kind: &str, fields: Json) {
        if !self.task_events() {
            return;
        }
        if let Some(tx) = self.events_tx.get() {
            let _ = tx.send(EventOut::Event(self.event(kind, fields)));
        }
    }

    /// Asks the events task for an immediate heartbeat.
    pub fn heartbeat(&self) {
        if let Some(tx) = self.events_tx.get() {
            let _ = tx.send(EventOut::Heartbeat);
        }
    }

    /// `worker-online/heartbeat/offline` fields (`freq`, `active`,
    /// `processed`, `loadavg`, `sw_*`).
    pub fn worker_event(&self, kind: &str, freq: f64) -> Json {
        let (active, processed) = {
            let g = self.lock();
            (active_in(&g), g.processed)
        };
        self.event(
            kind,
            json!({
                "freq": freq,
                "active": active,
                "processed": processed,
                "loadavg": loadavg(),
                "sw_ident": "om-worker",
                "sw_ver": env!("CARGO_PKG_VERSION"),
                "sw_sys": sw_sys(),
            }),
        )
    }

    /// Tasks running now (the heartbeat's `active`).
    pub fn active_count(&self) -> usize {
        active_in(&self.lock())
    }

    // ---- pipeline hooks -------------------------------------------------

    /// A task message was received and will be handled: it shows in
    /// `reserved` until [`RequestGuard::scheduled`] / [`RequestGuard::start`],
    /// and leaves every table when the guard is dropped.
    pub fn received(self: &Arc<Self>, msg: &TaskMessage, raw: &RawMessage) -> RequestGuard {
        let key = self.seq.fetch_add(1, Ordering::SeqCst);
        let interrupt = CancellationToken::new();
        let args = Value::List(msg.args.clone());
        let kwargs = Value::Dict(
            msg.kwargs
                .iter()
                .map(|(k, v)| (Value::Str(k.clone()), v.clone()))
                .collect(),
        );
        let argsrepr = msg.argsrepr.clone().unwrap_or_else(|| args.repr());
        let kwargsrepr = msg.kwargsrepr.clone().unwrap_or_else(|| kwargs.repr());
        let req = Request {
            id: msg.id.clone(),
            name: msg.name.clone(),
            args: to_json(&args),
            kwargs: to_json(&kwargs),
            argsrepr: argsrepr.clone(),
            kwargsrepr: kwargsrepr.clone(),
            exchange: raw.exchange.clone(),
            routing_key: raw.routing_key.clone(),
            priority: raw.priority,
            redelivered: raw.redelivered,
            phase: Phase::Reserved,
            interrupt: interrupt.clone(),
            run_ctx: None,
            terminated: false,
        };
        self.lock().requests.insert(key, req);
        crate::telemetry::task_received(&msg.name, &raw.routing_key);
        crate::telemetry::celery_task(CeleryState::Received, &msg.name, &raw.routing_key, "");
        self.send_task_event(
            "task-received",
            json!({
                "uuid": msg.id, "name": msg.name, "args": argsrepr, "kwargs": kwargsrepr,
                "root_id": msg.root_id, "parent_id": msg.parent_id, "retries": msg.retries,
                "eta": msg.eta.map(|e| e.to_rfc3339()),
                "expires": msg.expires.map(|e| e.to_rfc3339()),
            }),
        );
        RequestGuard {
            state: Arc::clone(self),
            key,
            id: msg.id.clone(),
            name: msg.name.clone(),
            queue: raw.routing_key.clone(),
            slot: None,
            interrupt,
            started_at: None,
        }
    }

    /// Whether `id` was revoked by a `revoke` command.
    pub fn is_revoked(&self, id: &str) -> bool {
        self.lock().revoked.contains(id, Instant::now())
    }

    // ---- remote control -------------------------------------------------

    /// `revoke`: remembers the ids; wakes held requests so they are settled
    /// as REVOKED at once; with `terminate`, cancels running ones. Returns
    /// the ids of the running requests that were terminated.
    pub fn revoke(&self, ids: &[String], terminate: bool) -> Vec<String> {
        let now = Instant::now();
        let mut g = self.lock();
        for id in ids {
            g.revoked.add(id, now);
        }
        let mut terminated = Vec::new();
        for r in g.requests.values_mut() {
            if !ids.contains(&r.id) {
                continue;
            }
            match r.phase {
                Phase::Active(_) => {
                    if terminate {
                        r.terminated = true;
                        if let Some(ctx) = &r.run_ctx {
                            ctx.cancel_with(CancelReason::Revoked);
                        }
                        r.interrupt.cancel();
                        if !terminated.contains(&r.id) {
                            terminated.push(r.id.clone());
                        }
                    }
                }
                _ => r.interrupt.cancel(),
            }
        }
        terminated
    }

    /// Merges revoked ids from another worker's `hello` (mingle).
    pub fn merge_revoked(&self, ids: impl IntoIterator<Item = String>) {
        let now = Instant::now();
        let mut g = self.lock();
        for id in ids {
            g.revoked.add(&id, now);
        }
    }

    /// `revoked` reply.
    pub fn revoked_ids(&self) -> Vec<String> {
        let mut v = self.lock().revoked.ids(Instant::now());
        v.sort();
        v
    }

    /// `hello` reply's `revoked`.
    pub fn revoked_hello(&self) -> Json {
        self.lock().revoked.as_hello(Instant::now())
    }

    /// `Request.info()` of each request in `phase` (`active`, `reserved`).
    pub fn infos(&self, want: fn(&Phase) -> bool, safe: bool) -> Vec<Json> {
        let g = self.lock();
        let mut v: Vec<(&u64, &Request)> =
            g.requests.iter().filter(|(_, r)| want(&r.phase)).collect();
        v.sort_by_key(|(k, _)| **k);
        v.into_iter().map(|(_, r)| self.info(r, safe)).collect()
    }

    /// `scheduled` reply: `{"eta", "priority", "request"}` per held request.
    pub fn scheduled(&self) -> Vec<Json> {
        let g = self.lock();
        let mut v: Vec<(&u64, &Request)> = g.requests.iter().collect();
        v.sort_by_key(|(k, _)| **k);
        v.into_iter()
            .filter_map(|(_, r)| match r.phase {
                Phase::Scheduled(eta) => Some(json!({
                    "eta": eta.to_rfc3339(),
                    "priority": r.priority.unwrap_or(0),
                    "request": self.info(r, false),
                })),
                _ => None,
            })
            .collect()
    }

    /// `query_task` reply: `{id: [state, info]}`.
    pub fn query(&self, ids: &[String]) -> Json {
        let g = self.lock();
        let mut m = serde_json::Map::new();
        for r in g.requests.values() {
            if ids.contains(&r.id) {
                // Celery 5.7's `_state_of_task`: ETA-held requests are `scheduled`.
                let st = match r.phase {
                    Phase::Active(_) => "active",
                    Phase::Reserved => "reserved",
                    Phase::Scheduled(_) => "scheduled",
                };
                m.insert(r.id.clone(), json!([st, self.info(r, false)]));
            }
        }
        Json::Object(m)
    }

    fn info(&self, r: &Request, safe: bool) -> Json {
        let (time_start, acknowledged) = match r.phase {
            Phase::Active(t) => (json!(t), true),
            _ => (Json::Null, false),
        };
        json!({
            "id": r.id,
            "name": r.name,
            "args": if safe { json!(r.argsrepr) } else { r.args.clone() },
            "kwargs": if safe { json!(r.kwargsrepr) } else { r.kwargs.clone() },
            "type": r.name,
            "hostname": self.nodename,
            "time_start": time_start,
            "acknowledged": acknowledged,
            "delivery_info": {
                "exchange": r.exchange,
                "routing_key": r.routing_key,
                "priority": r.priority,
                "redelivered": r.redelivered,
            },
            "worker_pid": if acknowledged { json!(self.pid) } else { Json::Null },
        })
    }

    /// `{task name: count}` of tasks run so far (`stats.total`).
    pub fn totals(&self) -> BTreeMap<String, u64> {
        self.lock().total.clone()
    }

    /// Seconds since start.
    pub fn uptime(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// The queues consumed now.
    pub fn queues(&self) -> Vec<String> {
        self.lock().queues.clone()
    }

    /// Records a queue added by `add_consumer`.
    pub fn add_queue(&self, q: &str) {
        let mut g = self.lock();
        if !g.queues.iter().any(|x| x == q) {
            g.queues.push(q.to_owned());
        }
    }

    /// Records a queue removed by `cancel_consumer`.
    pub fn remove_queue(&self, q: &str) {
        self.lock().queues.retain(|x| x != q);
    }

    fn claim_slot(&self) -> usize {
        let mut g = self.lock();
        match g.slots.iter().position(|busy| !busy) {
            Some(i) => {
                g.slots[i] = true;
                i
            }
            None => {
                // Only after `pool_grow` (or a shrink while the higher slots
                // still run): a new slot number.
                g.slots.push(true);
                g.slots.len() - 1
            }
        }
    }
}

/// One request's presence in the [`WorkerState`]; dropped when its handler
/// returns, which removes the request and frees its slot number.
#[derive(Debug)]
pub struct RequestGuard {
    state: Arc<WorkerState>,
    key: u64,
    id: String,
    name: String,
    queue: String,
    slot: Option<usize>,
    interrupt: CancellationToken,
    started_at: Option<Instant>,
}

impl RequestGuard {
    fn set_phase(&self, phase: Phase) {
        if let Some(r) = self.state.lock().requests.get_mut(&self.key) {
            r.phase = phase;
        }
    }

    /// Held until `eta` (`scheduled`).
    pub fn scheduled(&self, eta: DateTime<Utc>) {
        self.set_phase(Phase::Scheduled(eta));
    }

    /// Waiting for a slot again (`reserved`).
    pub fn reserved(&self) {
        self.set_phase(Phase::Reserved);
    }

    /// Completes when the request is revoked, so a held request can stop
    /// waiting and be settled right away.
    pub fn interrupted(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.interrupt.cancelled()
    }

    /// The task starts (`active`): returns its slot number (0-based, below
    /// the concurrency), which picks its GPU.
    pub fn start(&mut self) -> usize {
        let slot = self.state.claim_slot();
        self.slot = Some(slot);
        self.started_at = Some(Instant::now());
        self.set_phase(Phase::Active(unix_now()));
        crate::telemetry::celery_task(CeleryState::Started, &self.name, &self.queue, "");
        self.state
            .send_task_event("task-started", json!({"uuid": self.id}));
        slot
    }

    /// The run's context, so `revoke(terminate=True)` can stop it
    /// (`cancel_with(Revoked)`: the task cleans up its kernel and returns).
    pub fn running(&self, ctx: &TaskContext) {
        if let Some(r) = self.state.lock().requests.get_mut(&self.key) {
            if r.terminated {
                ctx.cancel_with(CancelReason::Revoked);
            }
            r.run_ctx = Some(ctx.clone());
        }
    }

    /// True when `revoke(terminate=True)` stopped this run: its outcome is
    /// REVOKED("terminated"), not the task's error.
    pub fn terminated(&self) -> bool {
        self.state
            .lock()
            .requests
            .get(&self.key)
            .is_some_and(|r| r.terminated)
    }

    /// Settled as REVOKED without running (`expired` or `revoked`).
    pub fn revoked(&self, expired: bool) {
        crate::telemetry::celery_task(CeleryState::Revoked, &self.name, &self.queue, "");
        self.state.send_task_event(
            "task-revoked",
            json!({"uuid": self.id, "terminated": false, "signum": null, "expired": expired}),
        );
    }

    /// The run ended: counts, metrics and the task event.
    pub fn finish<T>(
        &self,
        outcome: &Result<T, TaskError>,
        result_repr: impl FnOnce(&T) -> String,
    ) {
        let runtime = self
            .started_at
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        {
            let mut g = self.state.lock();
            *g.total.entry(self.name.clone()).or_insert(0) += 1;
            g.processed += 1;
        }
        crate::telemetry::task_finished(&self.name, &self.queue, outcome.is_ok(), runtime);
        if self.terminated() {
            crate::telemetry::celery_task(CeleryState::Revoked, &self.name, &self.queue, "");
            self.state.send_task_event(
                "task-revoked",
                json!({"uuid": self.id, "terminated": true, "signum": 15, "expired": false}),
            );
            return;
        }
        match outcome {
            Ok(v) => {
                crate::telemetry::celery_task(CeleryState::Succeeded, &self.name, &self.queue, "");
                crate::telemetry::celery_task_runtime(&self.name, &self.queue, runtime);
                self.state.send_task_event(
                    "task-succeeded",
                    json!({"uuid": self.id, "result": result_repr(v), "runtime": runtime}),
                )
            }
            Err(e) => {
                if e.exception.exc_module == "pymongo.errors" {
                    crate::telemetry::mongodb_error();
                }
                let msg = e
                    .exception
                    .exc_message
                    .iter()
                    .map(|m| m.repr())
                    .collect::<Vec<_>>()
                    .join(", ");
                // Celery's worker events for each ending (celery.worker.request).
                let (event, counted) = match e.kind {
                    ErrorKind::Failure => ("task-failed", CeleryState::Failed),
                    ErrorKind::Retry => ("task-retried", CeleryState::Retried),
                    ErrorKind::Rejected => {
                        let (name, queue) = (&self.name, &self.queue);
                        crate::telemetry::celery_task(CeleryState::Rejected, name, queue, "");
                        let fields = json!({"uuid": self.id, "requeue": false});
                        return self.state.send_task_event("task-rejected", fields);
                    }
                    ErrorKind::Ignored => return,
                };
                let exception = crate::telemetry::exception_label(&e.exception.exc_type);
                crate::telemetry::celery_task(counted, &self.name, &self.queue, &exception);
                self.state.send_task_event(
                    event,
                    json!({
                        "uuid": self.id,
                        "exception": format!("{}({msg})", e.exception.exc_type),
                        "traceback": e.traceback.clone().unwrap_or_default(),
                    }),
                );
            }
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut g = self.state.lock();
        g.requests.remove(&self.key);
        if let Some(slot) = self.slot {
            if let Some(s) = g.slots.get_mut(slot) {
                *s = false;
            }
        }
    }
}

/// Requests running now (phase `Active`), the number heartbeats and metrics report.
fn active_in(g: &Inner) -> usize {
    g.requests
        .values()
        .filter(|r| matches!(r.phase, Phase::Active(_)))
        .count()
}

/// Hours west of UTC, as Python's `time.timezone / 3600` (5.7 sends a float).
fn utcoffset_hours_west() -> f64 {
    let secs = chrono::Local::now().offset().local_minus_utc();
    f64::from(-secs) / 3600.0
}

/// `os.getloadavg()` rounded to 2 places, as Celery's heartbeat sends it.
pub fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut out = [0.0; 3];
    for (o, part) in out.iter_mut().zip(text.split_whitespace()) {
        *o = (part.parse::<f64>().unwrap_or(0.0) * 100.0).round() / 100.0;
    }
    out
}

fn sw_sys() -> &'static str {
    match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "windows" => "Windows",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_set_is_bounded_and_expires() {
        let t0 = Instant::now();
        let mut s = RevokedSet::new(3, Duration::from_secs(10));
        for i in 0..5 {
            s.add(&format!("id{i}"), t0);
        }
        assert_eq!(s.len(), 3);
        assert!(!s.contains("id0", t0));
        assert!(s.contains("id4", t0));
        assert!(!s.contains("id4", t0 + Duration::from_secs(11)));
        s.purge(t0 + Duration::from_secs(11));
        assert!(s.is_empty());
    }

    #[test]
    fn lamport_clock() {
        let c = LamportClock::default();
        assert_eq!(c.forward(), 1);
        assert_eq!(c.adjust(10), 11);
        assert_eq!(c.adjust(3), 12);
        assert_eq!(c.value(), 12);
    }
}
