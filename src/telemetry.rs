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

// ---- celery-exporter's metrics ------------------------------------------------------------
//
// The names, labels and meaning of danihodovic/celery-exporter, so the dashboards and alerts a
// Celery operator already has work on om-worker unchanged. The exporter derives them from task
// events; om-worker counts at the source, at the same points where it sends (or would send, with
// `-E` off) the event of the same name (`control::state`), so the two agree for a Python worker
// watched by the exporter and an om-worker scraped directly.

/// Task messages published (`task-sent`): by om-worker's beat and `execute_scripts`, and by the
/// Python tasks it runs (chain elements, callbacks, `self.retry()`). Labels `name`, `hostname`,
/// `queue_name`.
pub const CELERY_TASK_SENT: &str = "celery_task_sent_total";
/// Task messages taken for execution (`task-received`).
pub const CELERY_TASK_RECEIVED: &str = "celery_task_received_total";
/// Tasks started (`task-started`).
pub const CELERY_TASK_STARTED: &str = "celery_task_started_total";
/// Tasks that succeeded (`task-succeeded`).
pub const CELERY_TASK_SUCCEEDED: &str = "celery_task_succeeded_total";
/// Tasks that failed (`task-failed`); extra label `exception` (the class name).
pub const CELERY_TASK_FAILED: &str = "celery_task_failed_total";
/// Task messages rejected (`task-rejected`, a `Reject` raised by the task) or dead-lettered by
/// the worker (malformed, unregistered, refused canvas).
pub const CELERY_TASK_REJECTED: &str = "celery_task_rejected_total";
/// Tasks revoked (`task-revoked`): skipped because revoked or expired, or terminated.
pub const CELERY_TASK_REVOKED: &str = "celery_task_revoked_total";
/// Tasks that will be retried (`task-retried`).
pub const CELERY_TASK_RETRIED: &str = "celery_task_retried_total";
/// 1 while the worker consumes, 0 once it is going offline. Label `hostname`.
pub const CELERY_WORKER_UP: &str = "celery_worker_up";
/// Tasks running now (the heartbeat's `active`). Label `hostname`.
pub const CELERY_WORKER_TASKS_ACTIVE: &str = "celery_worker_tasks_active";
/// Run time of succeeded tasks (histogram, the exporter's default buckets).
pub const CELERY_TASK_RUNTIME: &str = "celery_task_runtime";
/// Messages ready in each queue the worker consumes (or consumed). Label `queue_name`.
pub const CELERY_QUEUE_LENGTH: &str = "celery_queue_length";

/// Every name above, for the dashboard test and the docs.
pub const CELERY_METRICS: &[&str] = &[
    CELERY_TASK_SENT,
    CELERY_TASK_RECEIVED,
    CELERY_TASK_STARTED,
    CELERY_TASK_SUCCEEDED,
    CELERY_TASK_FAILED,
    CELERY_TASK_REJECTED,
    CELERY_TASK_REVOKED,
    CELERY_TASK_RETRIED,
    CELERY_WORKER_UP,
    CELERY_WORKER_TASKS_ACTIVE,
    CELERY_TASK_RUNTIME,
    CELERY_QUEUE_LENGTH,
];

/// The exporter's runtime buckets (`prometheus_client.Histogram.DEFAULT_BUCKETS`, its
/// `--buckets` default), so `histogram_quantile` over a mixed fleet adds up.
pub const CELERY_RUNTIME_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The task states counted per task, in celery-exporter's order (its `state_counters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CeleryState {
    /// `task-received`.
    Received,
    /// `task-started`.
    Started,
    /// `task-succeeded`.
    Succeeded,
    /// `task-failed`, with the exception class name.
    Failed,
    /// `task-rejected`.
    Rejected,
    /// `task-revoked`.
    Revoked,
    /// `task-retried`.
    Retried,
}

impl CeleryState {
    const ALL: [CeleryState; 7] = [
        CeleryState::Received,
        CeleryState::Started,
        CeleryState::Succeeded,
        CeleryState::Failed,
        CeleryState::Rejected,
        CeleryState::Revoked,
        CeleryState::Retried,
    ];

    /// The counter's name.
    pub fn metric(self) -> &'static str {
        match self {
            CeleryState::Received => CELERY_TASK_RECEIVED,
            CeleryState::Started => CELERY_TASK_STARTED,
            CeleryState::Succeeded => CELERY_TASK_SUCCEEDED,
            CeleryState::Failed => CELERY_TASK_FAILED,
            CeleryState::Rejected => CELERY_TASK_REJECTED,
            CeleryState::Revoked => CELERY_TASK_REVOKED,
            CeleryState::Retried => CELERY_TASK_RETRIED,
        }
    }
}

/// The `hostname` label, set once at start from the worker's nodename.
static HOSTNAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the `hostname` label from the nodename (`om-worker@host`); first call wins.
pub fn set_nodename(nodename: &str) {
    let _ = HOSTNAME.set(hostname_label(nodename));
}

fn hostname() -> String {
    HOSTNAME.get().cloned().unwrap_or_default()
}

/// celery-exporter's `hostname` label: the host part of a nodename (`celery@host` → `host`,
/// Celery's `nodesplit`), so many processes on one host share a label and the series of
/// Python workers and om-workers on one host line up.
pub fn hostname_label(nodename: &str) -> String {
    match nodename.split_once('@') {
        Some((_, host)) => host.to_owned(),
        None => nodename.to_owned(),
    }
}

/// celery-exporter's `exception` label: the class name its regex `^(\w+)\(` finds at the start
/// of the event's `exception` text (`ValueError('x')` → `ValueError`), else `UnknownException`.
pub fn exception_label(exc_type: &str) -> String {
    let word = !exc_type.is_empty() && exc_type.chars().all(|c| c.is_alphanumeric() || c == '_');
    if word {
        exc_type.to_owned()
    } else {
        "UnknownException".to_owned()
    }
}

/// Most distinct task names from messages the worker does not run (unregistered, malformed,
/// published by a task) kept as label values; more become `other`. Names of registered tasks
/// are bounded by the registry; these come from whoever can publish, so they are bounded here.
pub const FOREIGN_NAMES_MAX: usize = 200;
/// Longest label value kept for such a name (in characters).
const FOREIGN_NAME_CHARS: usize = 200;

static FOREIGN_NAMES: std::sync::Mutex<Option<std::collections::HashSet<String>>> =
    std::sync::Mutex::new(None);

/// The `name` label for a task name that came from outside the registry: at most
/// [`FOREIGN_NAMES_MAX`] distinct values (then `other`), each at most 200 characters.
pub fn foreign_name(name: &str) -> String {
    let name: String = name.chars().take(FOREIGN_NAME_CHARS).collect();
    let mut g = FOREIGN_NAMES.lock().unwrap_or_else(|p| p.into_inner());
    bounded_insert(
        g.get_or_insert_with(Default::default),
        name,
        FOREIGN_NAMES_MAX,
    )
}

/// `name` when `seen` has it or room for it (then it is added), else `other`.
fn bounded_insert(
    seen: &mut std::collections::HashSet<String>,
    name: String,
    max: usize,
) -> String {
    if seen.contains(&name) {
        return name;
    }
    if seen.len() >= max {
        return "other".to_owned();
    }
    seen.insert(name.clone());
    name
}

/// The labels of one task series: `name`, `hostname`, `queue_name` (+ `exception` for failed,
/// empty on the zero series, as the exporter instantiates them).
pub fn celery_task_labels(
    state: CeleryState,
    name: &str,
    hostname: &str,
    queue: &str,
    exception: &str,
) -> Vec<metrics::Label> {
    let mut labels = vec![
        metrics::Label::new("name", name.to_owned()),
        metrics::Label::new("hostname", hostname.to_owned()),
        metrics::Label::new("queue_name", queue.to_owned()),
    ];
    if state == CeleryState::Failed {
        labels.push(metrics::Label::new("exception", exception.to_owned()));
    }
    labels
}

/// One task event, counted as celery-exporter counts it: the counter of `state` goes up by one
/// (`exception` only matters for [`CeleryState::Failed`]) and the other states' counters of the
/// same task series are created at 0, so `rate()` and ratios see every series from the start.
pub fn celery_task(state: CeleryState, name: &str, queue: &str, exception: &str) {
    let host = hostname();
    for s in CeleryState::ALL {
        let exc = if s == state { exception } else { "" };
        let labels = celery_task_labels(s, name, &host, queue, exc);
        metrics::counter!(s.metric(), labels).increment(u64::from(s == state));
    }
}

/// A task succeeded after `runtime_secs` (the exporter observes the runtime of successes only).
pub fn celery_task_runtime(name: &str, queue: &str, runtime_secs: f64) {
    let labels = celery_task_labels(CeleryState::Succeeded, name, &hostname(), queue, "");
    metrics::histogram!(CELERY_TASK_RUNTIME, labels).record(runtime_secs);
}

/// `n` task messages were published (`task-sent`; no zero series for the others, as the
/// exporter).
pub fn celery_task_sent(name: &str, queue: &str, n: u64) {
    let labels = celery_task_labels(CeleryState::Received, name, &hostname(), queue, "");
    metrics::counter!(CELERY_TASK_SENT, labels).increment(n);
}

/// The worker is consuming (1) or going offline (0).
pub fn set_worker_up(up: bool) {
    metrics::gauge!(CELERY_WORKER_UP, "hostname" => hostname()).set(if up { 1.0 } else { 0.0 });
}

/// Tasks running now.
pub fn set_worker_tasks_active(n: usize) {
    metrics::gauge!(CELERY_WORKER_TASKS_ACTIVE, "hostname" => hostname()).set(n as f64);
}

/// Messages ready in `queue`.
pub fn set_queue_length(queue: &str, n: u64) {
    metrics::gauge!(CELERY_QUEUE_LENGTH, "queue_name" => queue.to_owned()).set(n as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_is_the_host_part_of_the_nodename() {
        assert_eq!(hostname_label("celery@web-1"), "web-1");
        assert_eq!(hostname_label("om-worker@pod-7f9@x"), "pod-7f9@x");
        assert_eq!(hostname_label("justahost"), "justahost");
    }

    #[test]
    fn exception_label_is_the_class_name_or_unknown() {
        assert_eq!(exception_label("ValueError"), "ValueError");
        assert_eq!(exception_label("NotRegistered"), "NotRegistered");
        assert_eq!(exception_label(""), "UnknownException");
        assert_eq!(exception_label("pymongo.errors.X"), "UnknownException");
        assert_eq!(exception_label("Bad Name"), "UnknownException");
    }

    #[test]
    fn task_labels_have_the_exporters_names() {
        let keys = |s| {
            celery_task_labels(s, "t", "h", "q", "E")
                .iter()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect::<Vec<_>>()
        };
        let base = vec![
            ("name".to_owned(), "t".to_owned()),
            ("hostname".to_owned(), "h".to_owned()),
            ("queue_name".to_owned(), "q".to_owned()),
        ];
        for s in CeleryState::ALL {
            let mut want = base.clone();
            if s == CeleryState::Failed {
                want.push(("exception".to_owned(), "E".to_owned()));
            }
            assert_eq!(keys(s), want, "{s:?}");
        }
    }

    #[test]
    fn foreign_names_are_bounded() {
        let mut seen = std::collections::HashSet::new();
        assert_eq!(bounded_insert(&mut seen, "a".into(), 2), "a");
        assert_eq!(bounded_insert(&mut seen, "b".into(), 2), "b");
        assert_eq!(bounded_insert(&mut seen, "c".into(), 2), "other");
        assert_eq!(bounded_insert(&mut seen, "a".into(), 2), "a");
        assert_eq!(foreign_name(&"x".repeat(500)).len(), 200);
    }

    #[test]
    fn every_metric_name_is_listed_once() {
        let mut v = CELERY_METRICS.to_vec();
        v.sort_unstable();
        v.dedup();
        assert_eq!(v.len(), 12);
        for s in CeleryState::ALL {
            assert!(CELERY_METRICS.contains(&s.metric()));
        }
    }
}
