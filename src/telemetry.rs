//! Metric hooks: the names and the calls every layer records through.
//!
//! A leaf module (it depends on nothing of ours), so brokers, the worker
//! pipeline, the kernel pool and the remote-control state can all record
//! without depending on `control/`, and `control/metrics.rs` only installs
//! the exporter and serves it. Everything goes through the `metrics` facade:
//! with no recorder installed (`--metrics-addr` unset) each call is a no-op.

/// Tasks received, by `task` and `queue`.
pub const TASKS_RECEIVED: &str = "om_worker_tasks_received_total";
/// Tasks that succeeded, by `task` and `queue`.
pub const TASKS_SUCCEEDED: &str = "om_worker_tasks_succeeded_total";
/// Tasks that failed (including time limits and terminations), by `task` and `queue`.
pub const TASKS_FAILED: &str = "om_worker_tasks_failed_total";
/// Run time histogram, by `task`.
pub const TASK_RUNTIME: &str = "om_worker_task_runtime_seconds";
/// Kernels started ahead of time and ready for a task (0 until a pool exists).
pub const KERNELS_READY: &str = "om_worker_kernels_ready";
/// Broker reconnects after a lost connection.
pub const BROKER_RECONNECTS: &str = "om_worker_broker_reconnects_total";
/// Task failures caused by MongoDB (`pymongo.errors.*`).
pub const MONGODB_ERRORS: &str = "om_worker_mongodb_errors_total";

/// A task message was received.
pub fn task_received(task: &str, queue: &str) {
    metrics::counter!(TASKS_RECEIVED, "task" => task.to_owned(), "queue" => queue.to_owned())
        .increment(1);
}

/// A task run ended.
pub fn task_finished(task: &str, queue: &str, ok: bool, runtime_secs: f64) {
    let name = if ok { TASKS_SUCCEEDED } else { TASKS_FAILED };
    metrics::counter!(name, "task" => task.to_owned(), "queue" => queue.to_owned()).increment(1);
    metrics::histogram!(TASK_RUNTIME, "task" => task.to_owned()).record(runtime_secs);
}

/// The kernel pool: how many pre-started kernels are ready now.
pub fn set_kernels_ready(n: usize) {
    metrics::gauge!(KERNELS_READY).set(n as f64);
}

/// The broker connection came back.
pub fn broker_reconnected() {
    metrics::counter!(BROKER_RECONNECTS).increment(1);
}

/// A MongoDB operation failed a task.
pub fn mongodb_error() {
    metrics::counter!(MONGODB_ERRORS).increment(1);
}

/// Result states given up by the result outbox (full, too old, refused).
pub const RESULTS_DROPPED: &str = "om_worker_results_dropped_total";
/// Result states waiting in the outbox for the result backend.
pub const RESULTS_PENDING: &str = "om_worker_results_pending";

/// The result outbox dropped a state.
pub fn result_dropped() {
    metrics::counter!(RESULTS_DROPPED).increment(1);
}

/// How many result states wait in the outbox now.
pub fn set_results_pending(n: usize) {
    metrics::gauge!(RESULTS_PENDING).set(n as f64);
}
