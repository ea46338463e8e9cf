//! Task implementations, one file per Celery task name, and the registry.
//!
//! A [`Task`] gets the decoded [`TaskMessage`] and a [`TaskContext`] and
//! returns the value Celery would store, or a [`TaskError`] carrying the
//! exception the client should re-raise. Unknown names are the worker's
//! business ([`crate::config::UnknownTaskPolicy`]), not the registry's.

pub mod execute_scripts;
pub mod omega_ping;
pub mod python_task;
pub mod run_omegaml_job;
pub mod schedule_omegaml_job;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::protocol::result::SerializedValue;
use crate::protocol::{ExceptionInfo, TaskMessage, Value};

/// Why a running task was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The soft time limit passed (Celery raises `SoftTimeLimitExceeded`).
    SoftTimeLimit,
    /// A `revoke(terminate=True)` named this task.
    Revoked,
    /// The worker is shutting down and the grace period is over.
    Shutdown,
    /// The hard time limit passed (Celery: `TimeLimitExceeded`); a durable
    /// task gets [`HARD_LIMIT_RECORD_GRACE`] to stop and record its run
    /// before it is dropped.
    HardTimeLimit,
}

/// How long a durable task (a notebook run) may take, after its hard time
/// limit, to stop its kernel and record the ERROR run. Celery kills the pool
/// process and omega|ml records nothing; om-worker records the run, as for
/// the soft limit, so `job_runs` and `attributes.state` say what happened.
pub const HARD_LIMIT_RECORD_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// What a task may know about the worker running it.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// This worker's nodename (`name@host`).
    pub nodename: String,
    /// Fires at the soft time limit, on revoke or at shutdown: stop, clean up, return.
    pub cancel: CancellationToken,
    /// Set just before `cancel` fires by whoever cancels; unset means shutdown
    /// (the worker cancels all tasks through a parent token).
    pub cancel_reason: Arc<std::sync::OnceLock<CancelReason>>,
    /// Soft time limit in seconds, for tasks that pass it on (e.g. to a kernel).
    pub soft_time_limit: Option<f64>,
    /// The concurrency slot this run occupies (0-based, below the
    /// concurrency): picks its GPU, see [`gpu_env_for_slot`].
    pub slot: usize,
    /// The worker's GPU list (`--gpus`); empty = no GPU assignment.
    pub gpus: Vec<String>,
    /// Where the message came from (Celery's `request.delivery_info`): a
    /// task's `self.retry()` republishes to the same exchange and routing key.
    pub delivery: DeliveryInfo,
    /// What must finish before the task's slot is free again, although the
    /// outcome is known (a Python child still exiting): the worker reports
    /// the result first, then waits for this.
    pub teardown: Teardown,
}

/// Work a task leaves running past its outcome that still occupies its slot
/// (see [`TaskContext::teardown`]): a GPU task's next run on the same slot
/// must not start while the previous process still holds the device.
#[derive(Debug, Clone, Default)]
pub struct Teardown(Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>);

impl Teardown {
    /// Runs `work` now; the slot stays taken until it is done.
    pub fn defer(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(work);
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(handle);
    }

    /// Waits for everything deferred.
    pub async fn finish(&self) {
        let handles = std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for h in handles {
            let _ = h.await;
        }
    }
}

/// Celery's `request.delivery_info` of a message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeliveryInfo {
    /// Exchange it was published to (`""`: the default exchange).
    pub exchange: String,
    /// Routing key it was published with (the queue, for Celery's tasks).
    pub routing_key: String,
    /// Its priority property, if any.
    pub priority: Option<u8>,
    /// Whether the broker redelivered it.
    pub redelivered: bool,
}

/// The `CUDA_VISIBLE_DEVICES` value for a task slot: slot `i` gets
/// `gpus[i % n]`, so N concurrent slots on N GPUs never share one (and more
/// slots than GPUs share them round-robin). `None` when no GPUs are
/// configured: the kernel then inherits the worker's environment unchanged.
pub fn gpu_env_for_slot(gpus: &[String], slot: usize) -> Option<String> {
    if gpus.is_empty() {
        return None;
    }
    gpus.get(slot % gpus.len()).cloned()
}

impl TaskContext {
    /// Stops the task for `reason` (the first reason given wins).
    pub fn cancel_with(&self, reason: CancelReason) {
        let _ = self.cancel_reason.set(reason);
        self.cancel.cancel();
    }

    /// Why the task was cancelled, if it was.
    pub fn cancelled_because(&self) -> Option<CancelReason> {
        self.cancel.is_cancelled().then(|| {
            self.cancel_reason
                .get()
                .copied()
                .unwrap_or(CancelReason::Shutdown)
        })
    }
}

/// What a task returns: a value of the worker's model, or a value its own
/// process serialized (a task run in a Python child), relayed as is.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A plain value, encoded by the result codec.
    Value(Value),
    /// Serialized by the task's process with the worker's result serializer.
    Serialized(SerializedValue),
}

impl From<Value> for Output {
    fn from(v: Value) -> Self {
        Output::Value(v)
    }
}

impl Output {
    /// Python's `repr()` of the result (task events, logs).
    pub fn repr(&self) -> String {
        match self {
            Output::Value(v) => v.repr(),
            Output::Serialized(s) => s.repr.clone(),
        }
    }
}

/// A task's failure: the exception for the client plus a traceback text.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskError {
    /// What the client re-raises.
    pub exception: ExceptionInfo,
    /// Traceback text stored with the FAILURE.
    pub traceback: Option<String>,
    /// How the task ended: a FAILURE, or one of Celery's other non-success endings.
    pub kind: ErrorKind,
}

/// How a task that did not return ended, as Celery's tracer tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorKind {
    /// It raised: FAILURE is stored.
    #[default]
    Failure,
    /// It called `self.retry()` and has already been republished (same id,
    /// `retries` + 1): RETRY is stored with the exception that caused it.
    Retry,
    /// It raised `celery.exceptions.Reject`: nothing is stored. The message
    /// was acked when the task started (omega|ml leaves `acks_late` off), so
    /// there is nothing to reject or requeue, as in Celery's worker.
    Rejected,
    /// It raised `celery.exceptions.Ignore`: nothing is stored.
    Ignored,
}

impl TaskError {
    /// Python's `module.exc_type(message)` raised by a task, with the last
    /// line of a Python traceback (`ExcType: message`) as the traceback text.
    /// Parameters in [`ExceptionInfo::new`]'s order: module, class, message.
    pub fn new(module: &str, exc_type: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        TaskError {
            traceback: Some(format!("{exc_type}: {message}\n")),
            exception: ExceptionInfo::new(module, exc_type, message),
            kind: ErrorKind::Failure,
        }
    }

    /// A `TypeError` for arguments of the wrong shape, as Python would raise.
    pub fn type_error(message: impl Into<String>) -> Self {
        Self::new("builtins", "TypeError", message)
    }
}

/// One Celery task.
#[async_trait]
pub trait Task: Send + Sync {
    /// The registered name, e.g. `omegaml.tasks.omega_ping`.
    fn name(&self) -> &'static str;
    /// Whether the worker records this task in the in-flight ledger before
    /// acking it, so a crash mid-run re-queues it. Such a task must be
    /// idempotent: a re-run of a task whose result is already recorded must
    /// not record it again.
    fn durable(&self) -> bool {
        false
    }
    /// Whether the task carries out the Celery canvas of its message itself
    /// (`link`/`link_error` callbacks, the rest of a `chain`, its `chord`'s
    /// counter), as a Python task run through Celery's tracer does. A task
    /// that does not has such messages failed instead of its canvas dropped.
    fn runs_canvas(&self) -> bool {
        false
    }
    /// Runs the task.
    async fn run(&self, ctx: TaskContext, msg: &TaskMessage) -> Result<Output, TaskError>;
}

/// Tasks known only at run time: the Python tasks omega|ml's Celery app
/// registers (see [`python_task::PythonCatalog`]).
#[async_trait]
pub trait TaskSource: Send + Sync {
    /// The task called `name`, if the source has one (may load the source's
    /// list on first use).
    async fn get(&self, name: &str) -> Option<Arc<dyn Task>>;
}

/// Task name → implementation: om-worker's own tasks, then a [`TaskSource`].
#[derive(Default, Clone)]
pub struct Registry {
    tasks: HashMap<&'static str, Arc<dyn Task>>,
    fallback: Option<Arc<dyn TaskSource>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The tasks om-worker implements.
    pub fn builtin() -> Self {
        let mut r = Self::new();
        r.register(Arc::new(omega_ping::OmegaPing));
        r
    }

    /// Adds (or replaces) a task.
    pub fn register(&mut self, task: Arc<dyn Task>) {
        self.tasks.insert(task.name(), task);
    }

    /// Names not registered here are looked up in `source`.
    pub fn with_fallback(mut self, source: Arc<dyn TaskSource>) -> Self {
        self.fallback = Some(source);
        self
    }

    /// Looks one of om-worker's own tasks up by name.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Task>> {
        self.tasks.get(name).cloned()
    }

    /// Looks a task up by name: ours first, then the fallback source.
    pub async fn resolve(&self, name: &str) -> Option<Arc<dyn Task>> {
        if let Some(t) = self.get(name) {
            return Some(t);
        }
        match &self.fallback {
            Some(source) => source.get(name).await,
            None => None,
        }
    }

    /// A task that runs the canvas a message carries (see
    /// [`Task::runs_canvas`]): ours if it does, else the fallback source's
    /// task of that name (omega|ml's own, for a message that pairs one of
    /// om-worker's native tasks with a chain or a callback).
    pub async fn resolve_canvas(&self, name: &str) -> Option<Arc<dyn Task>> {
        if let Some(t) = self.get(name).filter(|t| t.runs_canvas()) {
            return Some(t);
        }
        match &self.fallback {
            Some(source) => source.get(name).await.filter(|t| t.runs_canvas()),
            None => None,
        }
    }

    /// Registered names, sorted (for `registered` and logs).
    pub fn names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.tasks.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// A keyword argument, borrowed from the message.
pub type Kwarg<'a> = &'a (String, Value);

/// Splits kwargs as omega|ml's `OmegamlTask` does: keys starting with `__`
/// are system kwargs (first), the rest go to the task function (second).
pub fn split_system_kwargs(kwargs: &[(String, Value)]) -> (Vec<Kwarg<'_>>, Vec<Kwarg<'_>>) {
    kwargs.iter().partition(|(k, _)| k.starts_with("__"))
}

/// The notebook name a notebook task is called with: `args[0]`, else the
/// `nb_file` keyword, a `str` either way — as Python would bind
/// `task(nb_file, ...)`, with Python's `TypeError` texts otherwise.
pub fn nb_file_arg(msg: &TaskMessage, task: &str) -> Result<String, TaskError> {
    match (msg.args.first(), msg.kwarg("nb_file")) {
        (Some(Value::Str(s)), _) | (None, Some(Value::Str(s))) => Ok(s.clone()),
        (Some(other), _) | (None, Some(other)) => Err(TaskError::type_error(format!(
            "{task}() nb_file must be str, not {}",
            other.type_name()
        ))),
        (None, None) => Err(TaskError::type_error(format!(
            "{task}() missing 1 required positional argument: 'nb_file'"
        ))),
    }
}

/// The `__bucket` system kwarg (None/`default` → the default bucket).
pub fn bucket_from(msg: &TaskMessage) -> Result<String, TaskError> {
    let (system, _) = split_system_kwargs(&msg.kwargs);
    let mut bucket = None;
    for (k, v) in system {
        match (k.as_str(), v) {
            ("__bucket", Value::Str(b)) => bucket = Some(b.as_str()),
            ("__bucket", Value::None) => {}
            ("__bucket", other) => {
                return Err(TaskError::type_error(format!(
                    "__bucket must be str or None, not {}",
                    other.type_name()
                )))
            }
            _ => {}
        }
    }
    Ok(crate::store::bucket_name(bucket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_error_is_the_python_exception_and_its_last_traceback_line() {
        let e = TaskError::new("gridfs.errors", "NoFile", "gone");
        assert_eq!(
            e,
            TaskError {
                exception: ExceptionInfo {
                    exc_type: "NoFile".into(),
                    exc_module: "gridfs.errors".into(),
                    exc_message: vec![Value::from("gone")],
                },
                traceback: Some("NoFile: gone\n".into()),
                kind: ErrorKind::Failure,
            }
        );
        assert_eq!(
            TaskError::type_error("bad"),
            TaskError::new("builtins", "TypeError", "bad")
        );
    }
}
