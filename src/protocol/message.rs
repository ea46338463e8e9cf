//! Celery task messages: protocol v2 (headers carry the task) and v1 (dict body).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::compression::CompressionError;
use super::json::JsonError;
use super::pickle::PickleError;
use super::result::ExceptionInfo;
use super::value::Value;

/// Message headers (AMQP `application_headers` or the Redis envelope's `headers`).
pub type Headers = BTreeMap<String, Value>;

/// A message as a broker delivered it, independent of the transport.
///
/// Brokers fill this in; for Redis the body is already base64-decoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawMessage {
    /// Body bytes, still serialized (and maybe compressed).
    pub body: Vec<u8>,
    /// `content_type`, e.g. `application/x-python-serialize`.
    pub content_type: Option<String>,
    /// `content_encoding`, e.g. `binary` or `utf-8`.
    pub content_encoding: Option<String>,
    /// Application headers.
    pub headers: Headers,
    /// `correlation_id` property (the task id for Celery messages).
    pub correlation_id: Option<String>,
    /// `reply_to` property (the client's rpc reply queue).
    pub reply_to: Option<String>,
    /// `priority` property.
    pub priority: Option<u8>,
    /// `delivery_mode` property (2 = persistent).
    pub delivery_mode: Option<u8>,
    /// `expiration` property (AMQP TTL in ms, as a string).
    pub expiration: Option<String>,
    /// Whether the broker says this is a redelivery.
    pub redelivered: bool,
    /// Exchange the message was published to (`""` for the default exchange).
    pub exchange: String,
    /// Routing key it was published with (the queue name for Celery tasks).
    pub routing_key: String,
    /// Why the transport could not read the message (Redis: a broken kombu
    /// envelope whose task id was still readable). [`decode_task`] refuses
    /// such a message with this reason, so the client gets a FAILURE.
    pub transport_error: Option<String>,
}

/// A message to publish (results, forwarded tasks, control replies, events).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outgoing {
    /// Serialized body.
    pub body: Vec<u8>,
    /// `content_type`.
    pub content_type: String,
    /// `content_encoding`.
    pub content_encoding: String,
    /// Application headers.
    pub headers: Headers,
    /// `correlation_id`.
    pub correlation_id: Option<String>,
    /// `reply_to`.
    pub reply_to: Option<String>,
    /// `priority`.
    pub priority: Option<u8>,
    /// 1 = transient, 2 = persistent.
    pub delivery_mode: u8,
    /// `expiration` (ms, as a string).
    pub expiration: Option<String>,
}

/// A decoded Celery task request.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    /// Task id (`headers.id`, else `correlation_id`, v1: `body.id`).
    pub id: String,
    /// Registered task name.
    pub name: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments, in the sender's order; keys are `str`.
    pub kwargs: Vec<(String, Value)>,
    /// Protocol v2 `embed` (callbacks/errbacks/chain/chord), `Value::None` if absent.
    pub embed: Value,
    /// Where rpc:// results go.
    pub reply_to: Option<String>,
    /// Not before this instant.
    pub eta: Option<DateTime<Utc>>,
    /// Revoke (REVOKED "expired") when received after this instant.
    pub expires: Option<DateTime<Utc>>,
    /// Hard time limit in seconds (`timelimit[0]`).
    pub hard_time_limit: Option<f64>,
    /// Soft time limit in seconds (`timelimit[1]`).
    pub soft_time_limit: Option<f64>,
    /// Retry count.
    pub retries: i64,
    /// Root of the workflow.
    pub root_id: Option<String>,
    /// Sending task.
    pub parent_id: Option<String>,
    /// Group id.
    pub group: Option<String>,
    /// Position in the group.
    pub group_index: Option<i64>,
    /// `ignore_result` header (`None` = task default).
    pub ignore_result: Option<bool>,
    /// `argsrepr` header (display only; may be masked by the client).
    pub argsrepr: Option<String>,
    /// `kwargsrepr` header.
    pub kwargsrepr: Option<String>,
    /// Sender nodename.
    pub origin: Option<String>,
    /// `shadow` header: the name to show in logs instead of `name`.
    pub shadow: Option<String>,
    /// 1 or 2.
    pub protocol: u8,
}

impl TaskMessage {
    /// Celery's `Request.name`: `shadow` if set, else the task name (for logs).
    pub fn display_name(&self) -> &str {
        self.shadow.as_deref().unwrap_or(&self.name)
    }

    /// A keyword argument by name.
    pub fn kwarg(&self, name: &str) -> Option<&Value> {
        self.kwargs.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

/// Why a message could not be turned into a [`TaskMessage`].
///
/// The variants group into the three exceptions a Python worker would raise
/// (see [`DecodeError::exception`] and [`DecodeError::class`]); all of them
/// mean "drop the message" (ack or reject without requeue), and when an id
/// is known ([`peek_task_id`]) the worker can store a FAILURE with that exception.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// A content type this worker does not deserialize (yaml, msgpack, raw ...).
    #[error("content type {0:?} is not accepted (only pickle and json)")]
    UnsupportedContentType(String),
    /// The `compression` header names something we cannot decompress.
    #[error("{0}")]
    UnsupportedCompression(String),
    /// The compressed body is corrupt or expands beyond the cap.
    #[error("cannot decompress body: {0}")]
    Decompress(CompressionError),
    /// The pickle body is malformed or names a forbidden global.
    #[error("cannot unpickle body: {0}")]
    Pickle(PickleError),
    /// The JSON body is malformed.
    #[error("cannot decode JSON body: {0}")]
    Json(JsonError),
    /// The body is empty.
    #[error("message body is empty")]
    EmptyBody,
    /// The transport could not read the message (see [`RawMessage::transport_error`]).
    #[error("unreadable broker message: {0}")]
    Transport(String),
    /// Neither a `task` header (v2) nor a dict body with `task` (v1).
    #[error("not a Celery task message: {0}")]
    NotATask(String),
    /// No `headers.id`, no `correlation_id` (and for v1 no `body.id`).
    #[error("task message has no id (no id header, correlation_id or body id)")]
    MissingId,
    /// The body has the wrong shape (not `[args, kwargs, embed]`, ...).
    #[error("invalid task body: {0}")]
    BadBody(String),
    /// A header or body field has the wrong type or an unparsable value.
    #[error("invalid field {field:?}: expected {expected}, got {got}")]
    BadField {
        /// Field name, e.g. `timelimit` or `kwargs`.
        field: String,
        /// What it should be.
        expected: &'static str,
        /// What it was (Python type name or the offending text).
        got: String,
    },
}

/// Which Python exception a [`DecodeError`] corresponds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// `kombu.exceptions.ContentDisallowed`: Python rejects (no requeue).
    ContentDisallowed,
    /// `kombu.exceptions.DecodeError`: Python acks and logs critically.
    Decode,
    /// `celery.exceptions.InvalidTaskError`: Python rejects (no requeue).
    InvalidTask,
}

impl DecodeError {
    /// Which of the three Python exceptions this is.
    pub fn class(&self) -> ErrorClass {
        match self {
            DecodeError::UnsupportedContentType(_) | DecodeError::UnsupportedCompression(_) => {
                ErrorClass::ContentDisallowed
            }
            DecodeError::Decompress(_)
            | DecodeError::Pickle(_)
            | DecodeError::Json(_)
            | DecodeError::EmptyBody
            | DecodeError::Transport(_) => ErrorClass::Decode,
            DecodeError::NotATask(_)
            | DecodeError::MissingId
            | DecodeError::BadBody(_)
            | DecodeError::BadField { .. } => ErrorClass::InvalidTask,
        }
    }

    /// The exception a client should re-raise if the worker stores a FAILURE
    /// for this message: kombu's `ContentDisallowed`/`DecodeError` or celery's
    /// `InvalidTaskError`, with this error's text as the single argument.
    pub fn exception(&self) -> ExceptionInfo {
        let (module, ty) = match self.class() {
            ErrorClass::ContentDisallowed => ("kombu.exceptions", "ContentDisallowed"),
            ErrorClass::Decode => ("kombu.exceptions", "DecodeError"),
            ErrorClass::InvalidTask => ("celery.exceptions", "InvalidTaskError"),
        };
        ExceptionInfo::new(module, ty, self.to_string())
    }
}

impl From<PickleError> for DecodeError {
    fn from(e: PickleError) -> Self {
        DecodeError::Pickle(e)
    }
}

impl From<JsonError> for DecodeError {
    fn from(e: JsonError) -> Self {
        DecodeError::Json(e)
    }
}

impl From<CompressionError> for DecodeError {
    fn from(e: CompressionError) -> Self {
        match e {
            CompressionError::Unsupported(_) => DecodeError::UnsupportedCompression(e.to_string()),
            other => DecodeError::Decompress(other),
        }
    }
}

/// The task id from headers/properties only (`headers.id`, else
/// `correlation_id`), so a FAILURE can be stored even when the body is garbage.
pub fn peek_task_id(raw: &RawMessage) -> Option<String> {
    match raw.headers.get("id") {
        Some(Value::Str(s)) if !s.is_empty() => Some(s.clone()),
        _ => raw.correlation_id.clone().filter(|s| !s.is_empty()),
    }
}

/// The task name from `headers.task` only (protocol v2), without touching the body.
pub fn peek_task_name(raw: &RawMessage) -> Option<String> {
    match raw.headers.get("task") {
        Some(Value::Str(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// Decompresses (per the `compression` header) and deserializes the body
/// by content type into a [`Value`]. Only pickle and JSON are accepted.
pub fn decode_body(raw: &RawMessage) -> Result<Value, DecodeError> {
    let decompressed;
    let body: &[u8] = match raw.headers.get("compression") {
        None | Some(Value::None) => &raw.body,
        Some(Value::Str(name)) => {
            decompressed = super::compression::decompress(name, &raw.body)?;
            &decompressed
        }
        Some(other) => return Err(bad_field("compression", "str", other)),
    };
    let ct = raw
        .content_type
        .as_deref()
        .map(|c| c.trim().to_ascii_lowercase());
    match ct.as_deref() {
        Some("application/x-python-serialize") => {
            if body.is_empty() {
                return Err(DecodeError::EmptyBody);
            }
            Ok(super::pickle::decode(body)?)
        }
        Some("application/json") => {
            if body.is_empty() {
                return Err(DecodeError::EmptyBody);
            }
            Ok(super::json::decode(body)?)
        }
        Some(other) => Err(DecodeError::UnsupportedContentType(other.to_owned())),
        // kombu treats a missing content type as trusted raw `application/data`:
        // raw bytes cannot carry a task.
        None => Err(DecodeError::UnsupportedContentType(
            "application/data (no content_type)".to_owned(),
        )),
    }
}

fn bad_field(field: &str, expected: &'static str, got: &Value) -> DecodeError {
    DecodeError::BadField {
        field: field.to_owned(),
        expected,
        got: got.type_name().to_owned(),
    }
}

/// Decodes a delivered message into a task request.
///
/// Version detection follows Celery's consumer: a `task` header means
/// protocol v2 (body `[args, kwargs, embed]`, or a "hybrid" dict body with
/// `args` whose fields the headers override); otherwise a dict body with
/// `task` is protocol v1, whose body doubles as the headers.
pub fn decode_task(raw: &RawMessage) -> Result<TaskMessage, DecodeError> {
    if let Some(e) = &raw.transport_error {
        return Err(DecodeError::Transport(e.clone()));
    }
    // Type-check the headers Celery reads before touching the body.
    let v2 = match raw.headers.get("task") {
        None => false,
        Some(Value::Str(_)) => true,
        Some(other) => return Err(bad_field("task", "str", other)),
    };
    let body = decode_body(raw)?;
    if v2 {
        if let Value::Dict(_) = body {
            return hybrid(raw, &body);
        }
        let parts = match &body {
            Value::List(p) | Value::Tuple(p) => p,
            other => {
                return Err(DecodeError::BadBody(format!(
                    "protocol 2 body must be [args, kwargs, embed], got {}",
                    other.type_name()
                )))
            }
        };
        let [args, kwargs, embed] = parts.as_slice() else {
            return Err(DecodeError::BadBody(format!(
                "protocol 2 body must have 3 elements [args, kwargs, embed], got {}",
                parts.len()
            )));
        };
        let fields = Fields::Headers(&raw.headers);
        build(raw, &fields, args, kwargs, embed.clone(), 2)
    } else {
        match &body {
            Value::Dict(_) => match body.get("task") {
                Some(Value::Str(_)) => v1(raw, &body),
                Some(other) => Err(bad_field("task", "str", other)),
                None => Err(DecodeError::NotATask(
                    "no task header and the body dict has no 'task'".to_owned(),
                )),
            },
            other => Err(DecodeError::NotATask(format!(
                "no task header and the body is a {}, not a v1 dict",
                other.type_name()
            ))),
        }
    }
}

/// Where the request fields come from: v2 headers, a v1 body, or a hybrid
/// (body fields overridden by headers, as `hybrid_to_proto2` does).
enum Fields<'a> {
    Headers(&'a Headers),
    Body(&'a Value),
    Hybrid(&'a Headers, &'a Value),
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Fields::Headers(h) => h.get(key),
            Fields::Body(b) => b.get(key),
            Fields::Hybrid(h, b) => h.get(key).or_else(|| b.get(key)),
        }
    }
}

fn empty_dict() -> Value {
    Value::Dict(Vec::new())
}

fn hybrid(raw: &RawMessage, body: &Value) -> Result<TaskMessage, DecodeError> {
    let Some(args) = body.get("args") else {
        return Err(DecodeError::BadBody(
            "protocol 2 body is a dict without 'args'".to_owned(),
        ));
    };
    let kwargs = body.get("kwargs").cloned().unwrap_or_else(empty_dict);
    let embed = embed_from_v1(body);
    build(
        raw,
        &Fields::Hybrid(&raw.headers, body),
        args,
        &kwargs,
        embed,
        2,
    )
}

fn v1(raw: &RawMessage, body: &Value) -> Result<TaskMessage, DecodeError> {
    let args = body
        .get("args")
        .cloned()
        .unwrap_or(Value::Tuple(Vec::new()));
    let kwargs = body.get("kwargs").cloned().unwrap_or_else(empty_dict);
    let embed = embed_from_v1(body);
    build(raw, &Fields::Body(body), &args, &kwargs, embed, 1)
}

/// v1 bodies carry callbacks/errbacks/chord at top level; there is no chain.
fn embed_from_v1(body: &Value) -> Value {
    let g = |k: &str| body.get(k).cloned().unwrap_or(Value::None);
    Value::dict([
        ("callbacks", g("callbacks")),
        ("errbacks", g("errbacks")),
        ("chord", g("chord")),
        ("chain", Value::None),
    ])
}

fn opt_str(f: &Fields, key: &str) -> Result<Option<String>, DecodeError> {
    match f.get(key) {
        None | Some(Value::None) => Ok(None),
        Some(Value::Str(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad_field(key, "str or None", other)),
    }
}

fn opt_int(f: &Fields, key: &str) -> Result<Option<i64>, DecodeError> {
    match f.get(key) {
        None | Some(Value::None) => Ok(None),
        Some(Value::Int(i)) => Ok(Some(*i)),
        Some(other) => Err(bad_field(key, "int or None", other)),
    }
}

fn opt_bool(f: &Fields, key: &str) -> Result<Option<bool>, DecodeError> {
    match f.get(key) {
        None | Some(Value::None) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(bad_field(key, "bool or None", other)),
    }
}

/// An ISO-8601 `eta`/`expires`. Naive means UTC (Celery's `maybe_make_aware`);
/// `Z`, `+HH:MM` and microseconds are accepted.
fn opt_time(f: &Fields, key: &str) -> Result<Option<DateTime<Utc>>, DecodeError> {
    let v = match f.get(key) {
        None | Some(Value::None) => return Ok(None),
        Some(Value::Str(s)) => {
            super::json::parse_datetime(s.trim()).ok_or_else(|| DecodeError::BadField {
                field: key.to_owned(),
                expected: "an ISO-8601 datetime",
                got: format!("{s:?}"),
            })?
        }
        Some(v @ Value::DateTime { .. }) => v.clone(),
        Some(other) => return Err(bad_field(key, "ISO-8601 str or None", other)),
    };
    match v {
        Value::DateTime {
            naive,
            offset_seconds,
        } => {
            let utc = naive - chrono::Duration::seconds(offset_seconds.unwrap_or(0).into());
            Ok(Some(DateTime::from_naive_utc_and_offset(utc, Utc)))
        }
        _ => Ok(None),
    }
}

/// One `timelimit` entry: seconds, `None`, or `0` (which Celery treats as
/// "no limit": `time_limit or task.time_limit`). NaN and +inf are no limit
/// either: billiard's timer compares against `start + limit` and never fires
/// for them, so the Python worker runs such a task unlimited (checked with
/// `celery worker`, prefork); a negative or -inf limit stays refused.
fn limit_value(v: &Value) -> Result<Option<f64>, DecodeError> {
    let secs = match v {
        Value::None => return Ok(None),
        Value::Int(i) => *i as f64,
        Value::Float(x) => *x,
        other => {
            return Err(bad_field(
                "timelimit",
                "[hard, soft] of numbers or None",
                other,
            ))
        }
    };
    if secs.is_nan() || secs == f64::INFINITY {
        return Ok(None);
    }
    if !secs.is_finite() || secs < 0.0 {
        return Err(DecodeError::BadField {
            field: "timelimit".to_owned(),
            expected: "non-negative finite seconds",
            got: super::value::Value::Float(secs).repr(),
        });
    }
    Ok((secs > 0.0).then_some(secs))
}

fn time_limits(f: &Fields) -> Result<(Option<f64>, Option<f64>), DecodeError> {
    match f.get("timelimit") {
        None | Some(Value::None) => Ok((None, None)),
        Some(Value::List(v) | Value::Tuple(v)) => match v.as_slice() {
            [hard, soft] => Ok((limit_value(hard)?, limit_value(soft)?)),
            _ => Err(DecodeError::BadField {
                field: "timelimit".to_owned(),
                expected: "[hard, soft]",
                got: format!("{} elements", v.len()),
            }),
        },
        Some(other) => Err(bad_field("timelimit", "[hard, soft]", other)),
    }
}

fn build(
    raw: &RawMessage,
    f: &Fields,
    args: &Value,
    kwargs: &Value,
    embed: Value,
    protocol: u8,
) -> Result<TaskMessage, DecodeError> {
    let name = match f.get("task") {
        Some(Value::Str(s)) if !s.is_empty() => s.clone(),
        Some(Value::Str(_)) => {
            return Err(DecodeError::BadField {
                field: "task".to_owned(),
                expected: "a non-empty task name",
                got: "''".to_owned(),
            })
        }
        Some(other) => return Err(bad_field("task", "str", other)),
        None => return Err(DecodeError::NotATask("no task name".to_owned())),
    };
    // v2 and hybrid: headers.id, else correlation_id; v1: body.id, else correlation_id.
    let id = match opt_str(f, "id")? {
        Some(id) if !id.is_empty() => id,
        _ => raw
            .correlation_id
            .clone()
            .filter(|c| !c.is_empty())
            .ok_or(DecodeError::MissingId)?,
    };
    let args = match args {
        Value::List(a) | Value::Tuple(a) => a.clone(),
        other => return Err(bad_field("args", "list or tuple", other)),
    };
    let kwargs = match kwargs {
        Value::Dict(items) => items
            .iter()
            .map(|(k, v)| match k {
                Value::Str(k) => Ok((k.clone(), v.clone())),
                other => Err(DecodeError::BadField {
                    field: "kwargs".to_owned(),
                    expected: "a dict with str keys",
                    got: format!("key {}", other.repr()),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?,
        other => return Err(bad_field("kwargs", "dict", other)),
    };
    match &embed {
        Value::None | Value::Dict(_) => {}
        other => return Err(bad_field("embed", "dict or None", other)),
    }
    let (hard_time_limit, soft_time_limit) = time_limits(f)?;
    let retries = opt_int(f, "retries")?.unwrap_or(0);
    // v1 messages have no argsrepr; Celery computes it with saferepr.
    let (argsrepr, kwargsrepr) = if protocol == 1 {
        let kw = Value::Dict(
            kwargs
                .iter()
                .map(|(k, v)| (Value::Str(k.clone()), v.clone()))
                .collect(),
        );
        (Some(Value::Tuple(args.clone()).repr()), Some(kw.repr()))
    } else {
        (opt_str(f, "argsrepr")?, opt_str(f, "kwargsrepr")?)
    };
    // v1 used `taskset` for the group id.
    let group = match opt_str(f, "group")? {
        Some(g) => Some(g),
        None if protocol == 1 => opt_str(f, "taskset")?,
        None => None,
    };
    Ok(TaskMessage {
        id,
        name,
        args,
        kwargs,
        embed,
        reply_to: raw.reply_to.clone(),
        eta: opt_time(f, "eta")?,
        expires: opt_time(f, "expires")?,
        hard_time_limit,
        soft_time_limit,
        retries,
        root_id: opt_str(f, "root_id")?,
        parent_id: opt_str(f, "parent_id")?,
        group,
        group_index: opt_int(f, "group_index")?,
        ignore_result: opt_bool(f, "ignore_result")?,
        argsrepr,
        kwargsrepr,
        origin: opt_str(f, "origin")?,
        shadow: opt_str(f, "shadow")?,
        protocol,
    })
}
