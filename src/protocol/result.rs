//! Result metadata: the task states the worker reports, as a model.
//!
//! How a [`ResultMeta`] becomes the bytes a backend stores or publishes is
//! [`super::result_codec`]'s business (one place, per serializer).

use chrono::{DateTime, Utc};

use super::value::Value;

/// Celery task states the worker writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Execution began (`task_track_started`).
    Started,
    /// Finished with a return value.
    Success,
    /// Raised (or could not run).
    Failure,
    /// Revoked or expired.
    Revoked,
    /// Will be retried.
    Retry,
}

impl State {
    /// The Celery spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Started => "STARTED",
            State::Success => "SUCCESS",
            State::Failure => "FAILURE",
            State::Revoked => "REVOKED",
            State::Retry => "RETRY",
        }
    }

    /// SUCCESS, FAILURE and REVOKED are final (`celery.states.READY_STATES`).
    pub fn is_ready(self) -> bool {
        matches!(self, State::Success | State::Failure | State::Revoked)
    }
}

/// The exception a client re-raises from a FAILURE/REVOKED result.
#[derive(Debug, Clone, PartialEq)]
pub struct ExceptionInfo {
    /// Class name, e.g. `NotRegistered`.
    pub exc_type: String,
    /// Module the client imports it from, e.g. `celery.exceptions`.
    pub exc_module: String,
    /// Constructor arguments.
    pub exc_message: Vec<Value>,
}

/// A task's return value as its producer serialized it, with the worker's
/// result serializer: a task run in a Python child returns objects the
/// worker's value model cannot hold (a model's Metadata document, numpy
/// arrays), so the child pickles (or JSON-encodes) the value itself and the
/// worker relays those bytes inside the result it stores, never decoding them.
#[derive(Debug, Clone, PartialEq)]
pub struct SerializedValue {
    /// How `bytes` were written (the worker's `result_serializer`).
    pub serializer: super::Serializer,
    /// One whole serialized value: a pickle (PROTO … STOP) or a JSON text.
    pub bytes: Vec<u8>,
    /// Python's `repr()` of the value, shortened, for logs and task events.
    pub repr: String,
}

/// One result state for one task.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultMeta {
    /// Task id.
    pub task_id: String,
    /// State.
    pub status: State,
    /// Return value, STARTED info, or the exception dict.
    pub result: Value,
    /// A return value its producer already serialized (a task run by a
    /// Python child): written in place of [`ResultMeta::result`], byte for
    /// byte, see [`SerializedValue`].
    pub serialized: Option<SerializedValue>,
    /// Formatted traceback for failures.
    pub traceback: Option<String>,
    /// Child results (always empty here: no canvas support yet).
    pub children: Vec<Value>,
    /// Set for ready states.
    pub date_done: Option<DateTime<Utc>>,
}

impl ExceptionInfo {
    /// Any exception; `message` becomes the single constructor argument.
    pub fn new(module: &str, exc_type: &str, message: impl Into<String>) -> Self {
        ExceptionInfo {
            exc_type: exc_type.to_owned(),
            exc_module: module.to_owned(),
            exc_message: vec![Value::Str(message.into())],
        }
    }

    /// `celery.exceptions.NotRegistered(name)`, as the Python worker stores it
    /// for an unknown task name (`exc_message: [name]`).
    pub fn not_registered(task_name: &str) -> Self {
        Self::new("celery.exceptions", "NotRegistered", task_name)
    }

    /// `billiard.exceptions.TimeLimitExceeded(seconds)`: the hard limit killed the task.
    pub fn time_limit_exceeded(secs: f64) -> Self {
        ExceptionInfo {
            exc_type: "TimeLimitExceeded".to_owned(),
            exc_module: "billiard.exceptions".to_owned(),
            exc_message: vec![Value::Float(secs)],
        }
    }

    /// `billiard.exceptions.SoftTimeLimitExceeded()` (billiard raises it without arguments).
    pub fn soft_time_limit_exceeded() -> Self {
        ExceptionInfo {
            exc_type: "SoftTimeLimitExceeded".to_owned(),
            exc_module: "billiard.exceptions".to_owned(),
            exc_message: Vec::new(),
        }
    }

    /// `celery.exceptions.TaskRevokedError(reason)`; reason is `revoked`,
    /// `expired` or `terminated` in Celery.
    pub fn revoked(reason: &str) -> Self {
        Self::new("celery.exceptions", "TaskRevokedError", reason)
    }

    /// The dict Celery's `prepare_exception` stores for non-pickle
    /// serializers, which `exception_to_python` turns back into an exception
    /// on the client: `{"exc_type", "exc_message": [...], "exc_module"}`.
    pub fn to_value(&self) -> Value {
        Value::dict([
            ("exc_type", Value::Str(self.exc_type.clone())),
            ("exc_message", Value::List(self.exc_message.clone())),
            ("exc_module", Value::Str(self.exc_module.clone())),
        ])
    }

    /// `repr()` of the exception as Python shows it, e.g. `NotRegistered('x')`
    /// (used for `task-failed` events' `exception` field).
    pub fn repr(&self) -> String {
        match self.exc_message.as_slice() {
            [one] => format!("{}({})", self.exc_type, one.repr()),
            many => {
                let args: Vec<String> = many.iter().map(Value::repr).collect();
                format!("{}({})", self.exc_type, args.join(", "))
            }
        }
    }
}

impl ResultMeta {
    /// STARTED with `{"pid", "hostname"}`, as `task_track_started` writes it.
    pub fn started(task_id: &str, pid: u32, hostname: &str) -> Self {
        ResultMeta {
            task_id: task_id.to_owned(),
            status: State::Started,
            result: Value::dict([
                ("pid", Value::Int(pid.into())),
                ("hostname", Value::Str(hostname.to_owned())),
            ]),
            serialized: None,
            traceback: None,
            children: Vec::new(),
            date_done: None,
        }
    }

    /// SUCCESS with the task's return value.
    pub fn success(task_id: &str, result: Value) -> Self {
        ResultMeta {
            task_id: task_id.to_owned(),
            status: State::Success,
            result,
            serialized: None,
            traceback: None,
            children: Vec::new(),
            date_done: Some(Utc::now()),
        }
    }

    /// SUCCESS with a return value its producer serialized itself.
    pub fn success_serialized(task_id: &str, value: SerializedValue) -> Self {
        ResultMeta {
            serialized: Some(value),
            ..Self::success(task_id, Value::None)
        }
    }

    /// FAILURE carrying the exception dict and, if any, a formatted traceback.
    pub fn failure(task_id: &str, exc: ExceptionInfo, traceback: Option<String>) -> Self {
        ResultMeta {
            task_id: task_id.to_owned(),
            status: State::Failure,
            result: exc.to_value(),
            serialized: None,
            traceback,
            children: Vec::new(),
            date_done: Some(Utc::now()),
        }
    }

    /// RETRY carrying the exception that caused it (Celery's `mark_as_retry`);
    /// not a ready state, so no `date_done`.
    pub fn retry(task_id: &str, exc: ExceptionInfo, traceback: Option<String>) -> Self {
        ResultMeta {
            status: State::Retry,
            date_done: None,
            ..Self::failure(task_id, exc, traceback)
        }
    }

    /// REVOKED with `TaskRevokedError(reason)`.
    pub fn revoked(task_id: &str, reason: &str) -> Self {
        ResultMeta {
            task_id: task_id.to_owned(),
            status: State::Revoked,
            result: ExceptionInfo::revoked(reason).to_value(),
            serialized: None,
            traceback: None,
            children: Vec::new(),
            date_done: Some(Utc::now()),
        }
    }
}
