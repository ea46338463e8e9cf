//! The result codec: a [`ResultMeta`] → the bytes a Celery client reads back.
//!
//! This is the one place that decides how a task state is serialized for a
//! result backend; the backends (`crate::backend`) only do the I/O. It mirrors
//! what a Python worker's `celery.backends.base.Backend` writes:
//!
//! * [`meta_value`]: the meta dict of `_get_result_meta` plus `task_id`, as
//!   the rpc and key-value (redis) backends store and send it;
//! * [`encode_meta`]: that dict with the configured [`Serializer`]
//!   (rpc reply bodies, redis values);
//! * [`encode_result`]: only the `result` field (the MongoDB backend stores
//!   the other fields as BSON and only the result as serialized bytes);
//! * [`rpc_reply`]: the whole message `RPCBackend` publishes to the client's
//!   reply queue.
//!
//! Exceptions follow Celery's `prepare_exception`: under json the exception
//! dict (`{"exc_type", "exc_message", "exc_module"}`, which the client's
//! `exception_to_python` turns back into an exception); under pickle the
//! exception *instance*, which is what the client's `pickle.loads` expects
//! (a dict there would come back as a dict, not raise). We can only pickle an
//! instance of a class the client can import, so classes outside
//! [`CLIENT_EXCEPTION_MODULES`] stay the dict, which Celery clients also
//! accept and turn into a synthesised class.

use serde::Deserialize;

use super::message::Outgoing;
use super::result::{ResultMeta, SerializedValue, State};
use super::value::Value;
use super::{json, pickle};

/// The client's `result_serializer`: how stored results are encoded where the
/// reader has no content type to go by (redis and mongodb backends; rpc
/// replies carry one, see [`Serializer::content_type`]). omega|ml sets pickle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Serializer {
    /// Python pickle (protocol 4), plain values and client-importable exceptions.
    Pickle,
    /// JSON with kombu's wrappers.
    Json,
}

impl std::str::FromStr for Serializer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pickle" => Ok(Serializer::Pickle),
            "json" => Ok(Serializer::Json),
            other => Err(format!("expected `pickle` or `json`, got {other:?}")),
        }
    }
}

impl Serializer {
    /// The Celery name.
    pub fn as_str(self) -> &'static str {
        match self {
            Serializer::Pickle => "pickle",
            Serializer::Json => "json",
        }
    }

    /// kombu's `content_type` for this serializer's bytes (its registry names
    /// pickle `application/x-python-serialize`).
    pub fn content_type(self) -> &'static str {
        match self {
            Serializer::Pickle => "application/x-python-serialize",
            Serializer::Json => "application/json",
        }
    }

    /// kombu's `content_encoding` for this serializer's bytes.
    pub fn content_encoding(self) -> &'static str {
        match self {
            Serializer::Pickle => "binary",
            Serializer::Json => "utf-8",
        }
    }

    /// Encodes a plain value (no exception instances) with this serializer.
    pub fn encode(self, v: &Value) -> Vec<u8> {
        match self {
            Serializer::Pickle => pickle::encode(v),
            Serializer::Json => json::encode(v),
        }
    }
}

/// Modules whose exception classes every omega|ml client can import, so a
/// pickled instance of them loads there. Anything else stays the exception
/// dict, which Celery clients turn into a synthesised class.
pub const CLIENT_EXCEPTION_MODULES: [&str; 4] = [
    "builtins",
    "celery.exceptions",
    "billiard.exceptions",
    "kombu.exceptions",
];

/// Whether a state's result is an exception: Celery's
/// `celery.states.EXCEPTION_STATES` (FAILURE, RETRY, REVOKED).
pub fn is_exception_state(state: State) -> bool {
    matches!(state, State::Failure | State::Revoked | State::Retry)
}

/// The meta dict exactly as Celery's key-value backends store it
/// (`_get_result_meta` + `task_id`, in that key order; `date_done` an ISO
/// string).
pub fn meta_value(meta: &ResultMeta) -> Value {
    Value::dict([
        ("status", Value::from(meta.status.as_str())),
        ("result", result_value(meta)),
        (
            "traceback",
            meta.traceback.clone().map_or(Value::None, Value::Str),
        ),
        ("children", Value::List(meta.children.clone())),
        (
            "date_done",
            meta.date_done.map_or(Value::None, |d| {
                Value::Str(d.to_rfc3339_opts(chrono::SecondsFormat::Micros, false))
            }),
        ),
        ("task_id", Value::from(meta.task_id.as_str())),
    ])
}

/// The whole meta dict ([`meta_value`]) as the rpc and redis backends send
/// or store it. Under pickle, an exception state's `result` is a pickled
/// instance of its class, as a Python worker writes it (for classes in
/// [`CLIENT_EXCEPTION_MODULES`]; others stay Celery's exception dict).
pub fn encode_meta(serializer: Serializer, meta: &ResultMeta) -> Vec<u8> {
    let v = meta_value(meta);
    if let Some(s) = relayable(serializer, meta) {
        return splice(serializer, &v, &s.bytes);
    }
    match serializer {
        Serializer::Pickle if is_exception_state(meta.status) => {
            encode_with_exception(&v, "result")
        }
        _ => serializer.encode(&v),
    }
}

/// Only the result value (the MongoDB backend's `result` field), exceptions
/// as in [`encode_meta`].
pub fn encode_result(serializer: Serializer, meta: &ResultMeta) -> Vec<u8> {
    if let Some(s) = relayable(serializer, meta) {
        return s.bytes.clone();
    }
    match serializer {
        Serializer::Pickle if is_exception_state(meta.status) => {
            match exception_call(&meta.result) {
                Some(call) => pickle::encode_reduce(&call),
                None => pickle::encode(&meta.result),
            }
        }
        _ => serializer.encode(&result_value(meta)),
    }
}

/// The result as a [`Value`]: a producer-serialized one stands for its
/// `repr` where it cannot be relayed (see [`relayable`]).
fn result_value(meta: &ResultMeta) -> Value {
    match &meta.serialized {
        Some(s) => Value::Str(s.repr.clone()),
        None => meta.result.clone(),
    }
}

/// The producer-serialized value of `meta`, when it can be relayed as is:
/// written with this serializer and well-formed for it. Otherwise (never
/// the case for values from our own Python child, which is told the
/// serializer) the value's `repr` is stored instead, and logged.
fn relayable(serializer: Serializer, meta: &ResultMeta) -> Option<&SerializedValue> {
    let s = meta.serialized.as_ref()?;
    let usable = s.serializer == serializer
        && match serializer {
            Serializer::Pickle => pickle::pickle_body(&s.bytes).is_some(),
            Serializer::Json => serde_json::from_slice::<serde_json::Value>(&s.bytes).is_ok(),
        };
    if !usable {
        tracing::warn!(
            task_id = %meta.task_id,
            "serialized result is not {} as configured; storing its repr instead",
            serializer.as_str()
        );
        return None;
    }
    Some(s)
}

/// The meta dict `v` with `serialized` (checked by [`relayable`]) as its `result`.
fn splice(serializer: Serializer, v: &Value, serialized: &[u8]) -> Vec<u8> {
    let Value::Dict(items) = v else {
        return serializer.encode(v);
    };
    match serializer {
        Serializer::Pickle => {
            let body = pickle::pickle_body(serialized);
            pickle::encode_dict_with(items, |k, _| {
                (k.as_str() == Some("result"))
                    .then_some(body)
                    .flatten()
                    .map(pickle::Written::Pickled)
            })
        }
        Serializer::Json => {
            let mut meta = json::to_json(v);
            if let (Some(obj), Ok(result)) = (
                meta.as_object_mut(),
                serde_json::from_slice::<serde_json::Value>(serialized),
            ) {
                obj.insert("result".into(), result);
            }
            meta.to_string().into_bytes()
        }
    }
}

/// Pickles `value` like [`pickle::encode`], except that a Celery exception
/// dict of a client-importable class at the top-level key `exception_key`
/// becomes a pickled exception instance, `module.Type(*exc_message)`: what a
/// Python worker's pickle result serializer writes for FAILURE, RETRY and
/// REVOKED states. This only ever writes a global from
/// [`CLIENT_EXCEPTION_MODULES`]; our own decoder stays allow-listed.
pub fn encode_with_exception(value: &Value, exception_key: &str) -> Vec<u8> {
    let Value::Dict(items) = value else {
        return pickle::encode(value);
    };
    pickle::encode_dict_with(items, |k, v| {
        if k.as_str() == Some(exception_key) {
            exception_call(v).map(pickle::Written::Call)
        } else {
            None
        }
    })
}

/// The message Celery's `RPCBackend` publishes for one state to the client's
/// reply queue (routing key `reply_to` on the default exchange; the caller
/// publishes it): the [`encode_meta`] body with its serializer's content type,
/// `correlation_id` = task id (the client matches replies by it), priority 0,
/// delivery mode 1 (transient, as Celery's `persistent=False` reply), no
/// headers.
pub fn rpc_reply(serializer: Serializer, meta: &ResultMeta) -> Outgoing {
    Outgoing {
        body: encode_meta(serializer, meta),
        content_type: serializer.content_type().into(),
        content_encoding: serializer.content_encoding().into(),
        correlation_id: Some(meta.task_id.clone()),
        priority: Some(0),
        delivery_mode: 1,
        ..Default::default()
    }
}

/// `module.exc_type(*exc_message)` for a Celery exception dict (exactly the
/// three keys) of a class the client can import; `None` for anything else.
fn exception_call(v: &Value) -> Option<pickle::Reduce<'_>> {
    if v.as_dict()?.len() != 3 {
        return None;
    }
    let module = v.get("exc_module")?.as_str()?;
    let name = v.get("exc_type")?.as_str()?;
    let args = v.get("exc_message")?.as_seq()?;
    if !CLIENT_EXCEPTION_MODULES.contains(&module) {
        return None;
    }
    pickle::Reduce::new(module, name, args)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use serde_json::json;

    use super::*;
    use crate::protocol::ExceptionInfo;

    /// The meta as the json serializer writes it, parsed back for comparison.
    fn to_json(meta: &ResultMeta) -> serde_json::Value {
        json::to_json(&meta_value(meta))
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn at(meta: ResultMeta) -> ResultMeta {
        let d = chrono::Utc
            .with_ymd_and_hms(2026, 1, 2, 3, 4, 5)
            .single()
            .expect("valid date")
            + chrono::Duration::microseconds(456_332);
        ResultMeta {
            date_done: Some(d),
            ..meta
        }
    }

    #[test]
    fn serializer_names_and_content_types() {
        for (s, name, ct, ce) in [
            (
                Serializer::Pickle,
                "pickle",
                "application/x-python-serialize",
                "binary",
            ),
            (Serializer::Json, "json", "application/json", "utf-8"),
        ] {
            assert_eq!(s.as_str(), name);
            assert_eq!(name.parse::<Serializer>(), Ok(s));
            assert_eq!(s.content_type(), ct);
            assert_eq!(s.content_encoding(), ce);
        }
        assert!("yaml".parse::<Serializer>().is_err());
    }

    #[test]
    fn exception_states_are_celerys() {
        for (s, exc) in [
            (State::Started, false),
            (State::Success, false),
            (State::Failure, true),
            (State::Retry, true),
            (State::Revoked, true),
        ] {
            assert_eq!(is_exception_state(s), exc, "{s:?}");
        }
    }

    /// Bytes captured from the encoder before it moved here (byte-identical
    /// payloads are the contract: Python clients have read these).
    #[test]
    fn json_meta_is_byte_stable() {
        let meta = at(ResultMeta::failure(
            "f1",
            ExceptionInfo::not_registered("proj.nope"),
            None,
        ));
        assert_eq!(
            String::from_utf8(encode_meta(Serializer::Json, &meta)).expect("utf-8"),
            r#"{"status":"FAILURE","result":{"exc_type":"NotRegistered","exc_message":["proj.nope"],"exc_module":"celery.exceptions"},"traceback":null,"children":[],"date_done":"2026-01-02T03:04:05.456332+00:00","task_id":"f1"}"#
        );
        assert_eq!(
            String::from_utf8(encode_result(Serializer::Json, &meta)).expect("utf-8"),
            r#"{"exc_type":"NotRegistered","exc_message":["proj.nope"],"exc_module":"celery.exceptions"}"#
        );
    }

    #[test]
    fn pickled_exceptions_are_byte_stable() {
        let meta = at(ResultMeta::failure(
            "f1",
            ExceptionInfo::not_registered("proj.nope"),
            None,
        ));
        // GLOBAL `celery.exceptions\nNotRegistered\n`, args `('proj.nope',)`, REDUCE.
        let instance = concat!(
            "6363656c6572792e657863657074696f6e730a4e6f74526567697374657265640a",
            "8c0970726f6a2e6e6f70658552"
        );
        assert_eq!(
            hex(&encode_result(Serializer::Pickle, &meta)),
            format!("8004{instance}2e")
        );
        assert_eq!(
            hex(&encode_meta(Serializer::Pickle, &meta)),
            [
                "80047d28",
                "8c067374617475738c074641494c555245",
                "8c06726573756c74",
                instance,
                "8c0974726163656261636b4e",
                "8c086368696c6472656e5d",
                "8c09646174655f646f6e65",
                "8c20323032362d30312d30325430333a30343a30352e3435363333322b30303a3030",
                "8c077461736b5f69648c026631",
                "752e",
            ]
            .concat()
        );
    }

    #[test]
    fn only_exception_states_of_importable_classes_become_instances() {
        let exc = ExceptionInfo::new("builtins", "ValueError", "x");
        let importable = at(ResultMeta::failure("t", exc.clone(), None));
        let plain = pickle::encode(&importable.result);
        assert_ne!(encode_result(Serializer::Pickle, &importable), plain);
        // The same dict as a SUCCESS value is just a dict.
        let success = at(ResultMeta::success("t", exc.to_value()));
        assert_eq!(encode_result(Serializer::Pickle, &success), plain);
        assert_eq!(
            encode_meta(Serializer::Pickle, &success),
            pickle::encode(&meta_value(&success))
        );
        // Not importable by the client, or not a plain class name: the dict.
        for (module, name) in [
            ("om_worker.errors", "WorkerInternalError"),
            ("builtins", "Bad.Name"),
            ("builtins", "Bad\nName"),
            ("builtins", ""),
        ] {
            let m = at(ResultMeta::failure(
                "t",
                ExceptionInfo::new(module, name, "x"),
                None,
            ));
            assert_eq!(
                encode_result(Serializer::Pickle, &m),
                pickle::encode(&m.result)
            );
            assert_eq!(
                encode_meta(Serializer::Pickle, &m),
                pickle::encode(&meta_value(&m))
            );
        }
    }

    #[test]
    fn rpc_reply_is_celerys_reply_message() {
        let meta = at(ResultMeta::revoked("t-9", "expired"));
        for s in [Serializer::Pickle, Serializer::Json] {
            let msg = rpc_reply(s, &meta);
            assert_eq!(msg.body, encode_meta(s, &meta));
            assert_eq!(msg.content_type, s.content_type());
            assert_eq!(msg.content_encoding, s.content_encoding());
            assert_eq!(msg.correlation_id.as_deref(), Some("t-9"));
            assert_eq!(msg.priority, Some(0));
            assert_eq!(msg.delivery_mode, 1);
            assert!(msg.headers.is_empty());
            assert_eq!(msg.reply_to, None);
            assert_eq!(msg.expiration, None);
        }
    }

    #[test]
    fn started_has_celery_shape() {
        let j = to_json(&ResultMeta::started("t1", 25341, "gtworker@vm"));
        assert_eq!(
            j,
            json!({"status": "STARTED", "result": {"pid": 25341, "hostname": "gtworker@vm"},
                   "traceback": null, "children": [], "date_done": null, "task_id": "t1"})
        );
    }

    #[test]
    fn failure_and_revoked_carry_exception_dicts() {
        let j = to_json(&ResultMeta::failure(
            "t",
            ExceptionInfo::not_registered("proj.nope"),
            None,
        ));
        assert_eq!(j["status"], "FAILURE");
        assert_eq!(
            j["result"],
            json!({"exc_type": "NotRegistered", "exc_message": ["proj.nope"], "exc_module": "celery.exceptions"})
        );
        let d = j["date_done"].as_str().expect("date_done set");
        assert!(d.ends_with("+00:00"), "{d}");
        let r = to_json(&ResultMeta::revoked("t", "expired"));
        assert_eq!(r["result"]["exc_message"], json!(["expired"]));
        assert_eq!(
            ExceptionInfo::time_limit_exceeded(1230.0)
                .to_value()
                .get("exc_message"),
            Some(&Value::List(vec![Value::Float(1230.0)]))
        );
        assert_eq!(
            ExceptionInfo::not_registered("x").repr(),
            "NotRegistered('x')"
        );
    }
}
