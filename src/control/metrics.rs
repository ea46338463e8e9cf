//! Prometheus metrics, `/healthz` (liveness) and `/readyz` (readiness), off unless
//! `--metrics-addr` is given.
//! The metric names and the hooks that record them are in [`crate::telemetry`]: om-worker's own
//! (`om_worker_*`) and, beside them, celery-exporter's (`celery_*`, same names, labels and
//! meaning), so dashboards and alerts made for Python workers work unchanged. Two of those are
//! read when scraped: `celery_worker_tasks_active` from the worker state and
//! `celery_queue_length` from the broker (bounded by [`QUEUE_LENGTH_BOUND`]).
//!
//! Everything records through the `metrics` facade: without an installed
//! recorder the calls are no-ops, so the pipeline hooks cost nothing when
//! metrics are off. The HTTP side is a deliberately tiny HTTP/1.1 responder
//! (two GET paths, one request per connection) instead of a web framework:
//! it only ever talks to a scraper and a health probe, and binds exactly the
//! address the flag names.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::state::WorkerState;
use super::ControlError;
use crate::broker::Broker;
use crate::telemetry::{
    self, BROKER_RECONNECTS, CELERY_QUEUE_LENGTH, CELERY_RUNTIME_BUCKETS, CELERY_TASK_FAILED,
    CELERY_TASK_RECEIVED, CELERY_TASK_REJECTED, CELERY_TASK_RETRIED, CELERY_TASK_REVOKED,
    CELERY_TASK_RUNTIME, CELERY_TASK_SENT, CELERY_TASK_STARTED, CELERY_TASK_SUCCEEDED,
    CELERY_WORKER_TASKS_ACTIVE, CELERY_WORKER_UP, KERNELS_READY, MONGODB_ERRORS, TASKS_FAILED,
    TASKS_RECEIVED, TASKS_SUCCEEDED, TASK_RUNTIME,
};

/// How long one scrape waits for the broker's queue lengths; a queue not answered by then keeps
/// its last value, so a slow broker never makes the scrape itself time out.
pub const QUEUE_LENGTH_BOUND: Duration = Duration::from_secs(2);

/// Most queues whose length is reported: the ones consumed now and earlier (celery-exporter
/// keeps reporting a queue once seen, so a queue nobody consumes still shows its backlog).
pub const QUEUES_REPORTED_MAX: usize = 100;

/// Run-time buckets: notebooks take seconds to hours.
const RUNTIME_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0,
];

/// Installs the Prometheus recorder (process-wide, once) and returns the
/// handle that renders the exposition text.
pub fn install_recorder() -> Result<PrometheusHandle, ControlError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(TASK_RUNTIME.to_owned()), RUNTIME_BUCKETS)
        .map_err(|e| ControlError::Metrics(e.to_string()))?
        .set_buckets_for_metric(
            Matcher::Full(CELERY_TASK_RUNTIME.to_owned()),
            CELERY_RUNTIME_BUCKETS,
        )
        .map_err(|e| ControlError::Metrics(e.to_string()))?
        .install_recorder()
        .map_err(|e| ControlError::Metrics(e.to_string()))?;
    metrics::describe_counter!(TASKS_RECEIVED, "Task messages received, by task and queue");
    metrics::describe_counter!(TASKS_SUCCEEDED, "Tasks that succeeded, by task and queue");
    metrics::describe_counter!(TASKS_FAILED, "Tasks that failed, by task and queue");
    metrics::describe_histogram!(
        TASK_RUNTIME,
        metrics::Unit::Seconds,
        "Task run time, by task"
    );
    metrics::describe_gauge!(KERNELS_READY, "Pre-started kernels ready for a task");
    metrics::describe_counter!(BROKER_RECONNECTS, "Broker reconnects");
    metrics::describe_counter!(MONGODB_ERRORS, "Task failures caused by MongoDB errors");
    // celery-exporter's help texts.
    let celery = [
        (CELERY_TASK_SENT, "Sent when a task message is published."),
        (CELERY_TASK_RECEIVED, "Sent when the worker receives a task."),
        (CELERY_TASK_STARTED, "Sent just before the worker executes the task."),
        (CELERY_TASK_SUCCEEDED, "Sent if the task executed successfully."),
        (CELERY_TASK_FAILED, "Sent if the execution of the task failed."),
        (CELERY_TASK_REJECTED, "The task was rejected by the worker, possibly to be re-queued or moved to a dead letter queue."),
        (CELERY_TASK_REVOKED, "Sent if the task has been revoked."),
        (CELERY_TASK_RETRIED, "Sent if the task failed, but will be retried in the future."),
    ];
    for (name, help) in celery {
        metrics::describe_counter!(name, help);
    }
    metrics::describe_gauge!(
        CELERY_WORKER_UP,
        "Indicates if a worker has recently sent a heartbeat."
    );
    metrics::describe_gauge!(
        CELERY_WORKER_TASKS_ACTIVE,
        "The number of tasks the worker is currently processing"
    );
    metrics::describe_histogram!(
        CELERY_TASK_RUNTIME,
        "Histogram of task runtime measurements."
    );
    metrics::describe_gauge!(
        CELERY_QUEUE_LENGTH,
        "The number of message in broker queue."
    );
    // Present from the start, so dashboards see 0 rather than nothing.
    metrics::gauge!(KERNELS_READY).set(0.0);
    metrics::counter!(BROKER_RECONNECTS).increment(0);
    metrics::counter!(MONGODB_ERRORS).increment(0);
    Ok(handle)
}

/// Binds `addr` and serves `/metrics` and `/healthz` until `stop`.
/// Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    state: Arc<WorkerState>,
    broker: Arc<dyn Broker>,
    stop: CancellationToken,
) -> Result<SocketAddr, ControlError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| ControlError::Bind(addr.to_string(), e.to_string()))?;
    let bound = listener
        .local_addr()
        .map_err(|e| ControlError::Bind(addr.to_string(), e.to_string()))?;
    info!("metrics on http://{bound}/metrics, health on http://{bound}/healthz and /readyz");
    let scrape = Arc::new(Scrape {
        state: Arc::clone(&state),
        broker,
        queues: Mutex::new(BTreeSet::new()),
    });
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    let handle = handle.clone();
                    let scrape = Arc::clone(&scrape);
                    tokio::spawn(async move {
                        if let Err(e) = respond(stream, &handle, &scrape).await {
                            debug!("metrics connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    warn!("metrics accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(bound)
}

/// What a scrape reads besides the recorder: the worker state and the broker.
struct Scrape {
    state: Arc<WorkerState>,
    broker: Arc<dyn Broker>,
    /// Every queue consumed since start (bounded), as celery-exporter's queue cache.
    queues: Mutex<BTreeSet<String>>,
}

impl Scrape {
    /// Brings the gauges read at scrape time up to date.
    async fn refresh(&self) {
        telemetry::set_worker_tasks_active(self.state.active_count());
        let queues = {
            let mut known = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            remember_queues(&mut known, self.state.queues(), QUEUES_REPORTED_MAX);
            known.iter().cloned().collect::<Vec<_>>()
        };
        for (queue, len) in queue_lengths(self.broker.as_ref(), &queues, QUEUE_LENGTH_BOUND).await {
            telemetry::set_queue_length(&queue, len);
        }
    }
}

/// Adds the queues consumed now to those remembered, at most `max` in all (the first ones kept).
pub fn remember_queues(known: &mut BTreeSet<String>, now: Vec<String>, max: usize) {
    for q in now {
        if known.len() >= max && !known.contains(&q) {
            continue;
        }
        known.insert(q);
    }
}

/// The length of each of `queues` the broker reports within `bound` (asked concurrently); a
/// queue that is missing, fails or is not answered in time is left out.
pub async fn queue_lengths(
    broker: &dyn Broker,
    queues: &[String],
    bound: Duration,
) -> Vec<(String, u64)> {
    let asks = queues.iter().map(|q| async move {
        match tokio::time::timeout(bound, broker.queue_length(q)).await {
            Ok(Ok(Some(n))) => Some((q.clone(), n)),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                debug!(queue = %q, "queue length: {e}");
                None
            }
            Err(_) => {
                debug!(queue = %q, "queue length: no answer within {bound:?}");
                None
            }
        }
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Writes whole-number bucket bounds as Python does (`le="1.0"`, not `le="1"`): Prometheus 2
/// keeps `le` as text, so a `sum by (le)` over Python workers (celery-exporter,
/// prometheus_client) and om-workers would otherwise split one bucket in two.
pub fn python_le(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.split_inclusive('\n') {
        match whole_le_end(line) {
            Some(end) => {
                out.push_str(&line[..end]);
                out.push_str(".0");
                out.push_str(&line[end..]);
            }
            None => out.push_str(line),
        }
    }
    out
}

/// Where a sample line's `le` value ends, when that value is a whole number. The exporter
/// writes `le` last (`x_bucket{a="..",le="1"} 3`), so it is found from the end of the label
/// set, never inside another label's value.
fn whole_le_end(line: &str) -> Option<usize> {
    if line.starts_with('#') {
        return None;
    }
    let labels = &line[..line.rfind("} ")?];
    let quote = labels
        .len()
        .checked_sub(1)
        .filter(|_| labels.ends_with('"'))?;
    let at = labels.rfind("le=\"")?;
    let before = labels[..at].chars().last();
    if !matches!(before, Some('{') | Some(',')) {
        return None;
    }
    let value = &labels[at + 4..quote];
    let digits = value.strip_prefix('-').unwrap_or(value);
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then_some(quote)
}

/// What a request line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics`
    Metrics,
    /// `GET /healthz`: 200 from the moment the worker consumes until it exits (also while a warm
    /// shutdown drains running tasks): a liveness probe.
    Health,
    /// `GET /readyz`: 200 only while the worker consumes and is not shutting down: a readiness
    /// probe (a draining worker takes no new work).
    Ready,
    /// Anything else but GET/HEAD.
    MethodNotAllowed,
    /// Any other path.
    NotFound,
}

/// Routes one HTTP request head (pure, for tests).
pub fn route(head: &str) -> Route {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return Route::MethodNotAllowed;
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Health,
        "/readyz" => Route::Ready,
        _ => Route::NotFound,
    }
}

async fn respond(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    scrape: &Scrape,
) -> std::io::Result<()> {
    let state = scrape.state.as_ref();
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // A head of at most 8 KiB within 5 s; anything else is dropped.
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > 8192 {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if read.is_err() {
        return Ok(());
    }
    read.unwrap_or(Ok(()))?;
    let head = String::from_utf8_lossy(&buf).into_owned();
    let route = route(&head);
    if route == Route::Metrics {
        scrape.refresh().await;
    }
    let (status, ctype, body) = match route {
        Route::Metrics => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            python_le(&handle.render()),
        ),
        Route::Health if state.consuming() => ("200 OK", "text/plain", "ok\n".to_owned()),
        Route::Health => (
            "503 Service Unavailable",
            "text/plain",
            "not consuming\n".to_owned(),
        ),
        Route::Ready if state.ready() => ("200 OK", "text/plain", "ready\n".to_owned()),
        Route::Ready => (
            "503 Service Unavailable",
            "text/plain",
            if state.consuming() {
                "shutting down\n"
            } else {
                "not consuming\n"
            }
            .to_owned(),
        ),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_owned(),
        ),
        Route::NotFound => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let head_only = head.starts_with("HEAD ");
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("GET /metrics HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route("GET /healthz?x=1 HTTP/1.0\r\n"), Route::Health);
        assert_eq!(route("HEAD /readyz HTTP/1.1\r\n"), Route::Ready);
        assert_eq!(route("POST /metrics HTTP/1.1\r\n"), Route::MethodNotAllowed);
        assert_eq!(route("GET / HTTP/1.1\r\n"), Route::NotFound);
        assert_eq!(route(""), Route::MethodNotAllowed);
    }

    #[test]
    fn bucket_bounds_are_written_as_python_writes_them() {
        let text = "# HELP x_bucket le=\"1\"\nx_bucket{name=\"a\",le=\"1\"} 3\n\
                    x_bucket{le=\"0.5\"} 2\nx_bucket{le=\"+Inf\"} 4\nx_bucket{q=\"b\",le=\"10\"} 1\n\
                    y{name=\"le=\"} 1\nz_bucket{name=\"x,le=\\\"1\",le=\"5\"} 1\n";
        assert_eq!(
            python_le(text),
            "# HELP x_bucket le=\"1\"\nx_bucket{name=\"a\",le=\"1.0\"} 3\n\
             x_bucket{le=\"0.5\"} 2\nx_bucket{le=\"+Inf\"} 4\nx_bucket{q=\"b\",le=\"10.0\"} 1\n\
             y{name=\"le=\"} 1\nz_bucket{name=\"x,le=\\\"1\",le=\"5.0\"} 1\n"
        );
    }

    #[test]
    fn queues_are_remembered_up_to_the_bound() {
        let mut known = BTreeSet::new();
        remember_queues(&mut known, vec!["a".into(), "b".into()], 3);
        // `a` is no longer consumed (cancel_consumer): still reported.
        remember_queues(&mut known, vec!["b".into(), "c".into(), "d".into()], 3);
        assert_eq!(known.into_iter().collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn queue_lengths_come_from_the_broker() {
        use crate::broker::memory::MemoryBroker;
        use crate::protocol::RawMessage;
        let broker = MemoryBroker::new();
        for _ in 0..3 {
            broker.push(RawMessage {
                routing_key: "q1".into(),
                ..RawMessage::default()
            });
        }
        broker.declare_queue("empty").await.expect("declare");
        let queues = ["q1", "empty", "missing"].map(String::from);
        let got = queue_lengths(&broker, &queues, Duration::from_secs(1)).await;
        assert_eq!(got, [("q1".to_owned(), 3), ("empty".to_owned(), 0)]);
    }

    /// A broker that never answers: the scrape still returns within the bound.
    struct Stuck;

    #[async_trait::async_trait]
    impl Broker for Stuck {
        async fn consume(
            &self,
            _: &[String],
            _: u16,
        ) -> Result<tokio::sync::mpsc::Receiver<crate::broker::Delivery>, crate::broker::BrokerError>
        {
            Err(crate::broker::BrokerError::Operation("no".into()))
        }
        async fn stop_consuming(&self) -> Result<(), crate::broker::BrokerError> {
            Ok(())
        }
        async fn publish(
            &self,
            _: &str,
            _: &str,
            _: crate::protocol::Outgoing,
        ) -> Result<(), crate::broker::BrokerError> {
            Ok(())
        }
        async fn declare_queue(&self, _: &str) -> Result<(), crate::broker::BrokerError> {
            Ok(())
        }
        async fn close(&self) -> Result<(), crate::broker::BrokerError> {
            Ok(())
        }
        async fn queue_length(&self, _: &str) -> Result<Option<u64>, crate::broker::BrokerError> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_stuck_broker_is_bounded() {
        let t = std::time::Instant::now();
        let got = queue_lengths(&Stuck, &["q".to_owned()], Duration::from_millis(100)).await;
        assert!(got.is_empty());
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
