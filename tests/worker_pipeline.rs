//! The worker's own decisions, without servers: the delivery pipeline driven
//! through the in-memory broker, result backend and ledger
//! (`broker::memory`, `backend::memory`, `ledger::memory`).
//!
//! Needs nothing running (no RabbitMQ, Redis, MongoDB or Python). What these
//! tests do not claim: interop. That the same decisions reach RabbitMQ,
//! Redis and the unchanged Celery client correctly is `broker_*.rs` and
//! `tests/interop`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::Semaphore;

use om_worker::backend::memory::MemoryBackend;
use om_worker::broker::memory::{MemoryBroker, Settlement};
use om_worker::broker::Broker;
use om_worker::cli::WorkerFlags;
use om_worker::config::{Config, FileConfig, UnknownTaskPolicy};
use om_worker::control::WorkerState;
use om_worker::ledger::memory::MemoryLedger;
use om_worker::protocol::publish::{encode_task_v2, TaskSend};
use om_worker::protocol::{ExceptionInfo, RawMessage, State, TaskMessage, Value};
use om_worker::shutdown::Shutdown;
use om_worker::tasks::{ErrorKind, Output, Registry, Task, TaskContext, TaskError};
use om_worker::worker::Worker;

const QUEUE: &str = "default";
/// Upper bound for any wait in these tests: a hang fails instead of blocking CI.
const LIMIT: Duration = Duration::from_secs(20);

// ---- test tasks --------------------------------------------------------

/// Returns its positional arguments.
struct Echo;

#[async_trait]
impl Task for Echo {
    fn name(&self) -> &'static str {
        "test.echo"
    }
    async fn run(&self, _ctx: TaskContext, msg: &TaskMessage) -> Result<Output, TaskError> {
        Ok(Value::List(msg.args.clone()).into())
    }
}

/// Runs until released (one permit per run) or cancelled; counts its runs.
struct Gate {
    name: &'static str,
    durable: bool,
    runs: AtomicUsize,
    release: Semaphore,
}

impl Gate {
    fn new(name: &'static str, durable: bool) -> Arc<Self> {
        Arc::new(Gate {
            name,
            durable,
            runs: AtomicUsize::new(0),
            release: Semaphore::new(0),
        })
    }
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
    fn open(&self, n: usize) {
        self.release.add_permits(n);
    }
    /// Returns once a run has begun.
    async fn started(&self) {
        within(async {
            while self.runs() < 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
}

#[async_trait]
impl Task for Gate {
    fn name(&self) -> &'static str {
        self.name
    }
    fn durable(&self) -> bool {
        self.durable
    }
    async fn run(&self, ctx: TaskContext, _msg: &TaskMessage) -> Result<Output, TaskError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        tokio::select! {
            p = self.release.acquire() => {
                if let Ok(p) = p { p.forget() }
                Ok(Value::from("released").into())
            }
            _ = ctx.cancel.cancelled() => Err(TaskError {
                exception: ExceptionInfo::new("builtins", "RuntimeError", "cancelled"),
                traceback: None,
                kind: ErrorKind::Failure,
            }),
        }
    }
}

/// Succeeds at once but leaves teardown work on its slot that runs until
/// released (a Python child still exiting after its outcome).
struct Lingers {
    release: Arc<Semaphore>,
}

#[async_trait]
impl Task for Lingers {
    fn name(&self) -> &'static str {
        "test.lingers"
    }
    async fn run(&self, ctx: TaskContext, _msg: &TaskMessage) -> Result<Output, TaskError> {
        let release = Arc::clone(&self.release);
        ctx.teardown.defer(async move {
            if let Ok(p) = release.acquire().await {
                p.forget();
            }
        });
        Ok(Value::from("done").into())
    }
}

/// Tasks found by a slow lookup (as omega|ml's Python tasks are listed):
/// `test.looked_up` echoes, after 100 ms of looking.
struct SlowSource;

#[async_trait]
impl om_worker::tasks::TaskSource for SlowSource {
    async fn get(&self, name: &str) -> Option<Arc<dyn Task>> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (name == "test.looked_up").then(|| Arc::new(LookedUp) as Arc<dyn Task>)
    }
}

struct LookedUp;

#[async_trait]
impl Task for LookedUp {
    fn name(&self) -> &'static str {
        "test.looked_up"
    }
    async fn run(&self, _ctx: TaskContext, msg: &TaskMessage) -> Result<Output, TaskError> {
        Ok(Value::List(msg.args.clone()).into())
    }
}

/// Panics.
struct Panics;

#[async_trait]
impl Task for Panics {
    fn name(&self) -> &'static str {
        "test.panics"
    }
    async fn run(&self, _ctx: TaskContext, _msg: &TaskMessage) -> Result<Output, TaskError> {
        panic!("boom");
    }
}

// ---- harness -----------------------------------------------------------

fn config(concurrency: usize) -> Config {
    let mut c = Config::resolve(
        &WorkerFlags::default(),
        &|_| None,
        &FileConfig::default(),
        "h",
    )
    .expect("default config resolves");
    c.queues = vec![QUEUE.to_owned()];
    c.concurrency = concurrency;
    c.prefetch_multiplier = 1;
    c.shutdown_grace = 5;
    c.nodename = "om-worker@test".into();
    c.unknown_tasks = UnknownTaskPolicy::Fail;
    c
}

/// A protocol-v2 task message as Celery publishes it, as a broker delivers it.
fn message(name: &str, id: &str, args: Vec<Value>) -> RawMessage {
    let mut send = TaskSend::new(name, args, vec![]);
    send.id = id.to_owned();
    send.reply_to = Some("reply-queue".into());
    let out = encode_task_v2(&send);
    RawMessage {
        body: out.body,
        content_type: Some(out.content_type),
        content_encoding: Some(out.content_encoding),
        headers: out.headers,
        correlation_id: out.correlation_id,
        reply_to: out.reply_to,
        priority: out.priority,
        delivery_mode: Some(out.delivery_mode),
        expiration: None,
        redelivered: false,
        exchange: String::new(),
        routing_key: QUEUE.to_owned(),
        transport_error: None,
    }
}

fn with_header(mut m: RawMessage, key: &str, value: Value) -> RawMessage {
    m.headers.insert(key.to_owned(), value);
    m
}

fn iso(t: chrono::DateTime<Utc>) -> Value {
    Value::Str(t.to_rfc3339())
}

struct Harness {
    broker: MemoryBroker,
    backend: MemoryBackend,
    state: Arc<WorkerState>,
    shutdown: Shutdown,
    worker: tokio::task::JoinHandle<()>,
}

impl Harness {
    fn start(config: Config, tasks: Vec<Arc<dyn Task>>, ledger: Option<MemoryLedger>) -> Self {
        let mut registry = Registry::builtin();
        for t in tasks {
            registry.register(t);
        }
        Self::start_with(config, registry, ledger)
    }

    fn start_with(config: Config, registry: Registry, ledger: Option<MemoryLedger>) -> Self {
        let broker = MemoryBroker::new();
        let backend = MemoryBackend::new();
        let config = Arc::new(config);
        let state = Arc::new(WorkerState::from_config(&config));
        let mut worker = Worker::new(
            config,
            Arc::new(broker.clone()),
            Arc::new(backend.clone()),
            registry,
        )
        .with_state(Arc::clone(&state));
        if let Some(l) = ledger {
            worker = worker.with_ledger(Arc::new(l));
        }
        let shutdown = Shutdown::new();
        let sd = shutdown.clone();
        let worker = tokio::spawn(async move {
            worker.run(&sd).await.expect("worker runs");
        });
        Harness {
            broker,
            backend,
            state,
            shutdown,
            worker,
        }
    }

    async fn until_settled(&self, n: usize) {
        within(self.broker.wait_until(|b| b.settled().len() >= n)).await;
    }

    async fn until_states(&self, id: &str, n: usize) {
        within(self.backend.wait_until(|b| b.states(id).len() >= n)).await;
    }

    fn settlement(&self, id: &str) -> Vec<Settlement> {
        self.broker
            .settled()
            .into_iter()
            .filter(|s| s.correlation_id.as_deref() == Some(id))
            .map(|s| s.how)
            .collect()
    }

    /// Warm shutdown; returns once the worker drained. The broker stays
    /// open: closing it is its owner's job.
    async fn stop(self) -> (MemoryBroker, MemoryBackend) {
        self.shutdown.begin_warm();
        within(self.worker).await.expect("worker task ends cleanly");
        (self.broker, self.backend)
    }
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("timed out waiting for the worker")
}

fn exc_type(meta: &om_worker::protocol::ResultMeta) -> String {
    meta.result
        .as_dict()
        .and_then(|d| {
            d.iter().find_map(|(k, v)| {
                (k.as_str() == Some("exc_type")).then(|| v.as_str().map(str::to_owned))
            })
        })
        .flatten()
        .unwrap_or_else(|| meta.result.repr())
}

// ---- tests -------------------------------------------------------------

#[tokio::test]
async fn a_task_runs_started_then_success_then_ack() {
    let h = Harness::start(config(1), vec![Arc::new(Echo)], None);
    h.broker.push(message(
        "test.echo",
        "t-ok",
        vec![Value::Int(1), Value::from("a")],
    ));
    h.until_states("t-ok", 2).await;
    h.until_settled(1).await;
    assert_eq!(
        h.backend.states("t-ok"),
        vec![State::Started, State::Success]
    );
    let last = h.backend.last("t-ok").expect("stored");
    assert_eq!(
        last.result,
        Value::List(vec![Value::Int(1), Value::from("a")])
    );
    assert_eq!(h.settlement("t-ok"), vec![Settlement::Acked]);
    assert!(
        h.backend
            .targets("t-ok")
            .iter()
            .all(|t| t.reply_to.as_deref() == Some("reply-queue")),
        "every state goes to the message's reply_to"
    );
    let (broker, _) = h.stop().await;
    assert!(
        !broker.is_closed(),
        "the worker does not close a broker it does not own"
    );
}

#[tokio::test]
async fn the_result_goes_out_before_the_teardown_and_the_slot_waits_for_it() {
    let release = Arc::new(Semaphore::new(0));
    let lingers = Arc::new(Lingers {
        release: Arc::clone(&release),
    });
    let h = Harness::start(config(1), vec![lingers, Arc::new(Echo)], None);
    h.broker.push(message("test.lingers", "t-linger", vec![]));
    h.broker
        .push(message("test.echo", "t-next", vec![Value::Int(1)]));
    // STARTED and SUCCESS are stored while the teardown still runs.
    h.until_states("t-linger", 2).await;
    assert_eq!(h.backend.states("t-linger")[1], State::Success);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        h.backend.states("t-next").is_empty(),
        "the next task started while the slot's teardown ran"
    );
    release.add_permits(1);
    h.until_states("t-next", 2).await;
    assert_eq!(h.backend.states("t-next")[1], State::Success);
    h.stop().await;
}

/// With one slot, tasks start in the order their messages arrived, even when
/// an earlier one takes longer to look up (Celery's pool gets them in order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slot_runs_tasks_in_arrival_order() {
    let mut registry = Registry::builtin();
    registry.register(Arc::new(Echo));
    let registry = registry.with_fallback(Arc::new(SlowSource));
    let mut config = config(1);
    config.prefetch_multiplier = 4; // all four delivered at once
    let h = Harness::start_with(config, registry, None);
    h.broker.push(message("test.looked_up", "t-1", vec![]));
    h.broker.push(message("test.echo", "t-2", vec![]));
    h.broker.push(message("test.looked_up", "t-3", vec![]));
    h.broker.push(message("test.echo", "t-4", vec![]));
    h.until_states("t-4", 2).await;
    h.until_states("t-3", 2).await;
    let started: Vec<String> = h
        .backend
        .stored()
        .into_iter()
        .filter(|m| m.status == State::Started)
        .map(|m| m.task_id)
        .collect();
    assert_eq!(started, ["t-1", "t-2", "t-3", "t-4"]);
    h.stop().await;
}

#[tokio::test]
async fn malformed_body_is_failed_and_rejected_never_requeued() {
    let h = Harness::start(config(1), vec![], None);
    let mut bad = message("test.echo", "t-bad", vec![]);
    bad.body = b"[[], {}, {".to_vec();
    h.broker.push(bad);
    let mut anonymous = message("test.echo", "x", vec![]);
    anonymous.body = b"\x00\x01".to_vec();
    anonymous.headers.clear();
    anonymous.correlation_id = None;
    h.broker.push(anonymous);
    h.until_settled(2).await;
    assert_eq!(h.backend.states("t-bad"), vec![State::Failure]);
    assert_eq!(h.settlement("t-bad"), vec![Settlement::Rejected]);
    let all: Vec<_> = h.broker.settled().iter().map(|s| s.how).collect();
    assert_eq!(all, vec![Settlement::Rejected, Settlement::Rejected]);
    assert_eq!(h.backend.stored().len(), 1, "no id, no result to store");
    assert!(
        h.broker.queued(QUEUE).is_empty(),
        "nothing back on the queue"
    );
    h.stop().await;
}

#[tokio::test]
async fn unknown_task_fails_with_not_registered_and_is_rejected() {
    let h = Harness::start(config(1), vec![], None);
    h.broker.push(message("no.such.task", "t-unknown", vec![]));
    h.until_settled(1).await;
    let meta = h.backend.last("t-unknown").expect("FAILURE stored");
    assert_eq!(meta.status, State::Failure);
    assert_eq!(exc_type(&meta), "NotRegistered");
    assert_eq!(h.settlement("t-unknown"), vec![Settlement::Rejected]);
    h.stop().await;
}

#[tokio::test]
async fn unknown_task_forwarded_unchanged_and_requeued_while_publishing_fails() {
    let mut c = config(1);
    c.unknown_tasks = UnknownTaskPolicy::Forward("python-workers".into());
    let h = Harness::start(c, vec![], None);
    let original = message("no.such.task", "t-fwd", vec![Value::Int(7)]);
    h.broker.fail_publish(true);
    h.broker.push(original.clone());
    within(
        h.broker
            .wait_until(|b| b.settled().iter().any(|s| s.how == Settlement::Requeued)),
    )
    .await;
    h.broker.fail_publish(false);
    within(
        h.broker
            .wait_until(|b| b.settled().iter().any(|s| s.how == Settlement::Acked)),
    )
    .await;
    let published = h.broker.published();
    assert_eq!(published.len(), 1);
    let p = &published[0];
    assert_eq!(
        (p.exchange.as_str(), p.routing_key.as_str()),
        ("", "python-workers")
    );
    assert_eq!(
        p.message.body, original.body,
        "body forwarded byte for byte"
    );
    assert_eq!(p.message.headers, original.headers);
    assert_eq!(p.message.correlation_id, original.correlation_id);
    assert_eq!(p.message.reply_to, original.reply_to);
    assert!(
        h.backend.stored().is_empty(),
        "a forwarded task gets no state from us"
    );
    h.stop().await;
}

#[tokio::test]
async fn expired_message_is_revoked_and_acked_without_running() {
    let gate = Gate::new("test.gate", false);
    let h = Harness::start(config(1), vec![gate.clone()], None);
    let past = Utc::now() - chrono::Duration::seconds(5);
    h.broker.push(with_header(
        message("test.gate", "t-expired", vec![]),
        "expires",
        iso(past),
    ));
    h.until_settled(1).await;
    assert_eq!(h.backend.states("t-expired"), vec![State::Revoked]);
    assert_eq!(h.settlement("t-expired"), vec![Settlement::Acked]);
    assert_eq!(gate.runs(), 0);
    h.stop().await;
}

#[tokio::test]
async fn revoked_before_receipt_and_while_held_for_eta() {
    let gate = Gate::new("test.gate", false);
    let h = Harness::start(config(1), vec![gate.clone()], None);
    h.state.revoke(&["t-revoked".to_owned()], false);
    h.broker.push(message("test.gate", "t-revoked", vec![]));
    h.until_settled(1).await;
    assert_eq!(h.backend.states("t-revoked"), vec![State::Revoked]);
    assert_eq!(h.settlement("t-revoked"), vec![Settlement::Acked]);

    // Held for an ETA an hour away: the revoke settles it at once.
    let eta = Utc::now() + chrono::Duration::hours(1);
    h.broker.push(with_header(
        message("test.gate", "t-held", vec![]),
        "eta",
        iso(eta),
    ));
    within(async {
        while h.state.scheduled().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    h.state.revoke(&["t-held".to_owned()], false);
    h.until_settled(2).await;
    assert_eq!(h.backend.states("t-held"), vec![State::Revoked]);
    assert_eq!(h.settlement("t-held"), vec![Settlement::Acked]);
    assert_eq!(gate.runs(), 0);
    h.stop().await;
}

#[tokio::test]
async fn eta_hold_does_not_block_the_prefetch_and_returns_at_shutdown() {
    // One slot, prefetch 1: a message held for a far ETA must not starve the next one.
    let h = Harness::start(config(1), vec![Arc::new(Echo)], None);
    let eta = Utc::now() + chrono::Duration::hours(1);
    h.broker.push(with_header(
        message("test.echo", "t-later", vec![]),
        "eta",
        iso(eta),
    ));
    h.broker.push(message("test.echo", "t-now", vec![]));
    h.until_states("t-now", 2).await;
    h.until_settled(1).await;
    assert_eq!(h.settlement("t-now"), vec![Settlement::Acked]);
    assert!(
        h.backend.states("t-later").is_empty(),
        "not run before its ETA"
    );

    // Warm shutdown: the held message stays unsettled; closing returns it.
    let (broker, _) = h.stop().await;
    assert_eq!(broker.unsettled(), 1);
    broker.close().await.expect("close");
    let back = broker.queued(QUEUE);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].correlation_id.as_deref(), Some("t-later"));
    assert!(back[0].redelivered);
}

#[tokio::test]
async fn short_eta_runs_when_due() {
    let h = Harness::start(config(1), vec![Arc::new(Echo)], None);
    let eta = Utc::now() + chrono::Duration::milliseconds(300);
    h.broker.push(with_header(
        message("test.echo", "t-soon", vec![]),
        "eta",
        iso(eta),
    ));
    h.until_states("t-soon", 2).await;
    assert!(Utc::now() >= eta, "ran before its ETA");
    assert_eq!(
        h.backend.states("t-soon"),
        vec![State::Started, State::Success]
    );
    h.stop().await;
}

#[tokio::test]
async fn duplicate_delivery_of_a_running_task_is_acked_not_run_twice() {
    let gate = Gate::new("test.gate", false);
    let h = Harness::start(config(2), vec![gate.clone()], None);
    h.broker.push(message("test.gate", "t-dup", vec![]));
    gate.started().await;
    h.broker.push(message("test.gate", "t-dup", vec![]));
    h.until_settled(2).await;
    assert_eq!(gate.runs(), 1, "the duplicate did not run");
    gate.open(1);
    h.until_states("t-dup", 2).await;
    assert_eq!(
        h.backend.states("t-dup"),
        vec![State::Started, State::Success]
    );
    assert_eq!(
        h.settlement("t-dup"),
        vec![Settlement::Acked, Settlement::Acked]
    );
    h.stop().await;
}

/// `self.retry()` republishes the same id with `retries` + 1 while the first
/// run is still ending: that copy is not a duplicate and runs.
#[tokio::test]
async fn a_retry_of_a_running_task_is_not_a_duplicate() {
    let gate = Gate::new("test.gate", false);
    let h = Harness::start(config(2), vec![gate.clone()], None);
    h.broker.push(message("test.gate", "t-retry", vec![]));
    gate.started().await;
    h.broker.push(with_header(
        message("test.gate", "t-retry", vec![]),
        "retries",
        Value::Int(1),
    ));
    within(async {
        while gate.runs() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    gate.open(2);
    h.until_states("t-retry", 4).await;
    assert_eq!(
        h.settlement("t-retry"),
        vec![Settlement::Acked, Settlement::Acked]
    );
    h.stop().await;
}

#[tokio::test]
async fn failed_ack_means_not_run() {
    let gate = Gate::new("test.gate", false);
    let h = Harness::start(config(1), vec![gate.clone()], None);
    h.broker.fail_acks(true);
    h.broker.push(message("test.gate", "t-noack", vec![]));
    // The pipeline reached the ack and it failed; a wrong run would start right after it.
    within(h.broker.wait_until(|b| b.failed_settlements() >= 1)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gate.runs(), 0, "a message whose ack failed must not run");
    assert!(h.backend.states("t-noack").is_empty(), "no STARTED either");
    assert_eq!(h.broker.unsettled(), 1, "left for the broker to redeliver");
    h.broker.fail_acks(false);
    h.stop().await;
}

#[tokio::test]
async fn durable_task_recorded_before_ack_and_forgotten_after_result() {
    let gate = Gate::new("test.durable", true);
    let ledger = MemoryLedger::new("om-worker@test", Duration::from_secs(60));
    let h = Harness::start(config(1), vec![gate.clone()], Some(ledger.clone()));
    h.broker.push(message("test.durable", "t-dur", vec![]));
    gate.started().await;
    assert!(ledger.contains("t-dur"), "recorded while running");
    assert_eq!(h.settlement("t-dur"), vec![Settlement::Acked]);
    gate.open(1);
    h.until_states("t-dur", 2).await;
    within(ledger.wait_until(|l| !l.finished().is_empty())).await;
    assert_eq!(ledger.finished(), vec!["t-dur".to_owned()]);
    assert!(!ledger.contains("t-dur"));
    h.stop().await;
}

#[tokio::test]
async fn durable_task_held_by_another_worker_is_a_duplicate() {
    let gate = Gate::new("test.durable", true);
    let ledger = MemoryLedger::new("om-worker@test", Duration::from_secs(60));
    ledger.hold("t-elsewhere", "om-worker@other");
    let h = Harness::start(config(1), vec![gate.clone()], Some(ledger.clone()));
    h.broker
        .push(message("test.durable", "t-elsewhere", vec![]));
    h.until_settled(1).await;
    assert_eq!(h.settlement("t-elsewhere"), vec![Settlement::Acked]);
    assert_eq!(gate.runs(), 0);
    assert!(h.backend.states("t-elsewhere").is_empty());
    h.stop().await;
}

#[tokio::test]
async fn mongodb_outage_keeps_the_message_unacked_until_recorded() {
    let gate = Gate::new("test.durable", true);
    let ledger = MemoryLedger::new("om-worker@test", Duration::from_secs(60));
    ledger.set_down(true);
    let h = Harness::start(config(1), vec![gate.clone()], Some(ledger.clone()));
    h.broker.push(message("test.durable", "t-outage", vec![]));
    within(ledger.wait_until(|l| l.begins() >= 2)).await;
    assert_eq!(gate.runs(), 0, "not run without a record");
    assert!(h.broker.settled().is_empty(), "not acked without a record");
    ledger.set_down(false);
    gate.open(1);
    h.until_states("t-outage", 2).await;
    assert_eq!(h.settlement("t-outage"), vec![Settlement::Acked]);
    assert_eq!(gate.runs(), 1);
    h.stop().await;
}

#[tokio::test]
async fn shutdown_during_a_mongodb_outage_leaves_the_message_for_the_broker() {
    let gate = Gate::new("test.durable", true);
    let ledger = MemoryLedger::new("om-worker@test", Duration::from_secs(60));
    ledger.set_down(true);
    let h = Harness::start(config(1), vec![gate.clone()], Some(ledger.clone()));
    h.broker.push(message("test.durable", "t-away", vec![]));
    within(ledger.wait_until(|l| l.begins() >= 1)).await;
    let (broker, _) = h.stop().await;
    assert!(broker.settled().is_empty());
    broker.close().await.expect("close");
    assert_eq!(broker.queued(QUEUE).len(), 1, "back on its queue");
    assert_eq!(gate.runs(), 0);
}

#[tokio::test]
async fn results_kept_through_a_backend_outage_are_delivered_in_order_without_holding_the_slot() {
    let h = Harness::start(config(1), vec![Arc::new(Echo)], None);
    h.backend.set_down(true);
    h.broker.push(message("test.echo", "t-first", vec![]));
    h.broker.push(message("test.echo", "t-second", vec![]));
    // One slot: the second task can only run once the first let its slot go,
    // i.e. storing its states did not wait for the backend.
    h.until_settled(2).await;
    assert_eq!(h.settlement("t-first"), vec![Settlement::Acked]);
    assert_eq!(h.settlement("t-second"), vec![Settlement::Acked]);
    assert!(h.backend.stored().is_empty(), "the backend is still away");
    h.backend.set_down(false);
    within(h.backend.wait_until(|b| b.stored().len() >= 4)).await;
    let order: Vec<(String, State)> = h
        .backend
        .stored()
        .into_iter()
        .map(|m| (m.task_id, m.status))
        .collect();
    assert_eq!(
        order,
        vec![
            ("t-first".to_owned(), State::Started),
            ("t-first".to_owned(), State::Success),
            ("t-second".to_owned(), State::Started),
            ("t-second".to_owned(), State::Success),
        ],
        "every state delivered once, in order"
    );
    // Back to normal: stored directly.
    h.broker.push(message("test.echo", "t-after", vec![]));
    h.until_states("t-after", 2).await;
    assert_eq!(
        h.backend.states("t-after"),
        vec![State::Started, State::Success]
    );
    h.stop().await;
}

#[tokio::test]
async fn warm_shutdown_delivers_kept_results_when_the_backend_returns_in_time() {
    let h = Harness::start(config(1), vec![Arc::new(Echo)], None);
    h.backend.set_down(true);
    h.broker.push(message("test.echo", "t-kept", vec![]));
    h.until_settled(1).await;
    let backend = h.backend.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        backend.set_down(false);
    });
    let (_, backend) = h.stop().await;
    assert_eq!(
        backend.states("t-kept"),
        vec![State::Started, State::Success],
        "delivered during the shutdown"
    );
}

#[tokio::test]
async fn warm_shutdown_with_the_backend_away_ends_in_bounded_time() {
    let mut c = config(1);
    c.shutdown_grace = 1;
    let h = Harness::start(c, vec![Arc::new(Echo)], None);
    h.backend.set_down(true);
    h.broker.push(message("test.echo", "t-lost", vec![]));
    h.until_settled(1).await;
    let t0 = std::time::Instant::now();
    let (_, backend) = h.stop().await;
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "the flush is bounded"
    );
    assert!(backend.stored().is_empty());
}

#[tokio::test]
async fn a_copy_redelivered_while_the_original_ack_fails_runs_exactly_once() {
    // The race of a broker connection loss: the original delivery is about
    // to fail its ack (its channel is gone) while the broker already gave
    // the requeued copy to this worker. The copy must not be acked as a
    // duplicate of a run that never happens.
    let gate = Gate::new("test.gate", false);
    let h = Harness::start(config(2), vec![gate.clone()], None);
    h.broker.pause_settlements(true);
    h.broker.push(message("test.gate", "t-race", vec![]));
    within(h.broker.wait_until(|b| b.settlements_waiting() >= 1)).await;
    let mut copy = message("test.gate", "t-race", vec![]);
    copy.redelivered = true;
    h.broker.push(copy);
    // Let the copy reach the running check and wait there.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gate.runs(), 0);
    // The original (delivery 1) fails its ack: its connection is gone.
    h.broker.fail_settlement_of(1);
    h.broker.pause_settlements(false);
    gate.started().await;
    gate.open(1);
    h.until_states("t-race", 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gate.runs(), 1, "run exactly once");
    assert_eq!(
        h.backend.states("t-race"),
        vec![State::Started, State::Success]
    );
    assert_eq!(
        h.settlement("t-race"),
        vec![Settlement::Acked],
        "the copy was acked and run; the original's ack failed"
    );
    assert_eq!(h.broker.failed_settlements(), 1);
    h.stop().await;
}

#[tokio::test]
async fn a_copy_of_an_acked_running_task_is_still_a_duplicate() {
    let gate = Gate::new("test.gate", false);
    let h = Harness::start(config(2), vec![gate.clone()], None);
    h.broker.push(message("test.gate", "t-dup", vec![]));
    gate.started().await;
    h.broker.push(message("test.gate", "t-dup", vec![]));
    h.until_settled(2).await;
    assert_eq!(gate.runs(), 1);
    gate.open(1);
    h.until_states("t-dup", 2).await;
    h.stop().await;
}

#[tokio::test]
async fn a_durable_task_whose_ack_failed_releases_its_ledger_record() {
    let gate = Gate::new("test.durable", true);
    let ledger = MemoryLedger::new("om-worker@test", Duration::from_secs(60));
    let h = Harness::start(config(1), vec![gate.clone()], Some(ledger.clone()));
    h.broker.fail_settlement_of(1);
    h.broker.push(message("test.durable", "t-abandon", vec![]));
    within(ledger.wait_until(|l| !l.finished().is_empty())).await;
    assert!(
        !ledger.contains("t-abandon"),
        "released: a copy elsewhere must not be a duplicate"
    );
    assert_eq!(gate.runs(), 0);
    assert!(h.backend.states("t-abandon").is_empty());
    h.stop().await;
}

#[tokio::test]
async fn hard_time_limit_and_panic_become_failures() {
    let gate = Gate::new("test.gate", false);
    let h = Harness::start(config(2), vec![gate.clone(), Arc::new(Panics)], None);
    h.broker.push(with_header(
        message("test.gate", "t-hard", vec![]),
        "timelimit",
        Value::List(vec![Value::Float(0.2), Value::None]),
    ));
    h.broker.push(message("test.panics", "t-panic", vec![]));
    h.until_states("t-hard", 2).await;
    h.until_states("t-panic", 2).await;
    let hard = h.backend.last("t-hard").expect("stored");
    assert_eq!(hard.status, State::Failure);
    assert_eq!(exc_type(&hard), "TimeLimitExceeded");
    let panicked = h.backend.last("t-panic").expect("stored");
    assert_eq!(panicked.status, State::Failure);
    assert_eq!(exc_type(&panicked), "WorkerInternalError");
    h.stop().await;
}

#[tokio::test]
async fn ignore_result_stores_nothing_on_success_but_stores_failures() {
    let h = Harness::start(config(1), vec![Arc::new(Echo), Arc::new(Panics)], None);
    h.broker.push(with_header(
        message("test.echo", "t-ignored", vec![]),
        "ignore_result",
        Value::Bool(true),
    ));
    h.broker.push(with_header(
        message("test.panics", "t-ignored-fail", vec![]),
        "ignore_result",
        Value::Bool(true),
    ));
    h.until_settled(2).await;
    h.until_states("t-ignored-fail", 1).await;
    assert!(h.backend.states("t-ignored").is_empty());
    assert_eq!(h.backend.states("t-ignored-fail"), vec![State::Failure]);
    h.stop().await;
}

#[tokio::test]
async fn revoke_with_terminate_stores_terminated() {
    let gate = Gate::new("test.gate", false);
    let h = Harness::start(config(1), vec![gate.clone()], None);
    h.broker.push(message("test.gate", "t-term", vec![]));
    gate.started().await;
    h.state.revoke(&["t-term".to_owned()], true);
    h.until_states("t-term", 2).await;
    let meta = h.backend.last("t-term").expect("stored");
    assert_eq!(meta.status, State::Revoked);
    assert!(
        meta.result.repr().contains("terminated"),
        "{}",
        meta.result.repr()
    );
    h.stop().await;
}

#[tokio::test]
async fn warm_shutdown_finishes_running_tasks_and_returns_unstarted_ones() {
    let gate = Gate::new("test.gate", false);
    let mut c = config(1);
    c.prefetch_multiplier = 3;
    let h = Harness::start(c, vec![gate.clone()], None);
    for id in ["t-a", "t-b", "t-c"] {
        h.broker.push(message("test.gate", id, vec![]));
    }
    gate.started().await;
    h.shutdown.begin_warm();
    // The running task may finish within the grace period.
    gate.open(1);
    within(h.worker).await.expect("worker ends");
    let broker = h.broker;
    assert_eq!(
        h.backend.states("t-a"),
        vec![State::Started, State::Success]
    );
    assert_eq!(
        gate.runs(),
        1,
        "nothing new started after the shutdown began"
    );
    assert_eq!(
        broker.unsettled(),
        2,
        "the two waiting messages stay unacked"
    );
    broker.close().await.expect("close");
    let back: Vec<_> = broker
        .queued(QUEUE)
        .into_iter()
        .filter_map(|m| m.correlation_id)
        .collect();
    assert_eq!(back, vec!["t-b".to_owned(), "t-c".to_owned()], "in order");
}

#[tokio::test]
async fn cold_shutdown_cancels_running_tasks() {
    let gate = Gate::new("test.gate", false);
    let h = Harness::start(config(1), vec![gate.clone()], None);
    h.broker.push(message("test.gate", "t-cold", vec![]));
    gate.started().await;
    h.shutdown.begin_cold();
    within(h.worker).await.expect("worker ends");
    let meta = h.backend.last("t-cold").expect("outcome stored");
    assert_eq!(
        meta.status,
        State::Failure,
        "the cancelled run reports its failure"
    );
}

#[tokio::test]
async fn canvas_is_refused_with_a_failure_never_silently_dropped() {
    let h = Harness::start(config(1), vec![Arc::new(Echo)], None);
    let mut m = message("test.echo", "t-chain", vec![]);
    m.body = br#"[[], {}, {"callbacks": null, "errbacks": null, "chain": [{"task": "test.echo", "args": [], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false}], "chord": null}]"#.to_vec();
    h.broker.push(m);
    h.until_settled(1).await;
    assert_eq!(h.settlement("t-chain"), vec![Settlement::Rejected]);
    let meta = h.backend.last("t-chain").expect("FAILURE stored");
    assert_eq!(meta.status, State::Failure);
    assert_eq!(exc_type(&meta), "NotImplementedError");
    assert!(
        h.broker.published().is_empty(),
        "nothing of the chain was sent"
    );
    h.stop().await;
}

// ---- remote control acting on the pipeline -----------------------------

/// Runs one remote control command against the harness's worker.
async fn control(
    h: &Harness,
    names: &[&'static str],
    method: &str,
    args: Value,
) -> serde_json::Value {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let ctx = om_worker::control::commands::Context {
        broker: Arc::new(h.broker.clone()),
        state: Arc::clone(&h.state),
        registered: Arc::new(move || names.clone()),
    };
    om_worker::control::commands::dispatch(&ctx, method, &args)
        .await
        .expect("a reply")
}

async fn until<F: Fn() -> bool>(f: F) {
    within(async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn pool_grow_and_shrink_change_how_many_run_at_once_and_lose_nothing() {
    let gate = Gate::new("test.gate", false);
    let h = Harness::start(config(1), vec![gate.clone()], None);
    for i in 0..4 {
        h.broker
            .push(message("test.gate", &format!("t-pool{i}"), vec![]));
    }
    gate.started().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gate.runs(), 1, "-c 1: one at a time");
    let n = |i: i64| Value::dict([("n", Value::Int(i))]);
    let reply = control(&h, &[], "pool_grow", n(1)).await;
    assert_eq!(reply, serde_json::json!({"ok": "pool will grow"}));
    // The prefetch (multiplier 1) follows, so the second message is delivered and runs.
    until(|| gate.runs() == 2).await;
    assert_eq!(h.state.concurrency(), 2);
    let reply = control(&h, &[], "pool_shrink", n(1)).await;
    assert_eq!(reply, serde_json::json!({"ok": "pool will shrink"}));
    // Both running tasks go on; one ending frees no slot for a third.
    gate.open(1);
    h.until_states("t-pool0", 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        gate.runs(),
        2,
        "after the shrink, 2 running -> 1 slot: nothing new starts"
    );
    gate.open(1);
    until(|| gate.runs() == 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gate.runs(), 3, "one at a time again");
    gate.open(2);
    for i in 0..4 {
        h.until_states(&format!("t-pool{i}"), 2).await;
        let last = h.backend.last(&format!("t-pool{i}")).expect("stored");
        assert_eq!(last.status, State::Success, "t-pool{i}");
        assert_eq!(h.settlement(&format!("t-pool{i}")), vec![Settlement::Acked]);
    }
    h.stop().await;
}

#[tokio::test]
async fn time_limit_applies_to_later_tasks_of_that_name() {
    let gate = Gate::new("test.gate", false);
    let h = Harness::start(config(1), vec![gate.clone(), Arc::new(Echo)], None);
    let names = ["test.gate", "test.echo"];
    let args = Value::dict([
        ("task_name", Value::from("test.gate")),
        ("soft", Value::None),
        ("hard", Value::Float(0.2)),
    ]);
    let reply = control(&h, &names, "time_limit", args).await;
    assert_eq!(
        reply,
        serde_json::json!({"ok": "time limits set successfully"})
    );
    h.broker.push(message("test.gate", "t-tl", vec![]));
    h.broker.push(message("test.echo", "t-other", vec![]));
    h.until_states("t-tl", 2).await;
    let last = h.backend.last("t-tl").expect("stored");
    assert_eq!(last.status, State::Failure);
    assert_eq!(exc_type(&last), "TimeLimitExceeded");
    h.until_states("t-other", 2).await;
    assert_eq!(
        h.backend.last("t-other").expect("stored").status,
        State::Success
    );
    h.stop().await;
}

#[tokio::test]
async fn rate_limit_spaces_the_starts_and_keeps_messages_unacked_meanwhile() {
    let mut c = config(4);
    c.prefetch_multiplier = 4;
    let h = Harness::start(c, vec![Arc::new(Echo)], None);
    let args = Value::dict([
        ("task_name", Value::from("test.echo")),
        ("rate_limit", Value::from("4/s")),
    ]);
    let reply = control(&h, &["test.echo"], "rate_limit", args).await;
    assert_eq!(
        reply,
        serde_json::json!({"ok": "new rate limit set successfully"})
    );
    let t0 = std::time::Instant::now();
    for i in 0..3 {
        h.broker
            .push(message("test.echo", &format!("t-rate{i}"), vec![]));
    }
    h.until_states("t-rate0", 2).await;
    assert!(h.broker.unsettled() >= 1, "the others wait unacked");
    for i in 0..3 {
        h.until_states(&format!("t-rate{i}"), 2).await;
    }
    // Tokens at 0, 0.25 s and 0.5 s (the bucket starts full).
    assert!(
        t0.elapsed() >= Duration::from_millis(450),
        "{:?}",
        t0.elapsed()
    );
    for i in 0..3 {
        assert_eq!(h.settlement(&format!("t-rate{i}")), vec![Settlement::Acked]);
    }
    h.stop().await;
}
