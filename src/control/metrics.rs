//! Prometheus metrics, `/healthz` (liveness) and `/readyz` (readiness), off unless
//! `--metrics-addr` is given.
//! The metric names and the hooks that record them are in [`crate::telemetry`].
//!
//! Everything records through the `metrics` facade: without an installed
//! recorder the calls are no-ops, so the pipeline hooks cost nothing when
//! metrics are off. The HTTP side is a deliberately tiny HTTP/1.1 responder
//! (two GET paths, one request per connection) instead of a web framework:
//! it only ever talks to a scraper and a health probe, and binds exactly the
//! address the flag names.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::state::WorkerState;
use super::ControlError;
use crate::telemetry::{
    BROKER_RECONNECTS, KERNELS_READY, MONGODB_ERRORS, TASKS_FAILED, TASKS_RECEIVED,
    TASKS_SUCCEEDED, TASK_RUNTIME,
};

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
    stop: CancellationToken,
) -> Result<SocketAddr, ControlError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| ControlError::Bind(addr.to_string(), e.to_string()))?;
    let bound = listener
        .local_addr()
        .map_err(|e| ControlError::Bind(addr.to_string(), e.to_string()))?;
    info!("metrics on http://{bound}/metrics, health on http://{bound}/healthz and /readyz");
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    let handle = handle.clone();
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        if let Err(e) = respond(stream, &handle, &state).await {
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
    state: &WorkerState,
) -> std::io::Result<()> {
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
    let head = String::from_utf8_lossy(&buf);
    let (status, ctype, body) = match route(&head) {
        Route::Metrics => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
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
}
