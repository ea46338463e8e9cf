//! kombu's Redis message envelope: the JSON string stored in a Redis list.
//!
//! kombu's virtual transport wraps every message in a JSON object
//! (`kombu/transport/virtual/base.py:prepare_message` and
//! `_inplace_augment_message`):
//!
//! ```json
//! {"body": "<base64>", "content-encoding": "binary", "content-type": "application/x-python-serialize",
//!  "headers": {...},
//!  "properties": {"correlation_id": "...", "reply_to": "...", "delivery_mode": 2,
//!                 "delivery_info": {"exchange": "", "routing_key": "default"}, "priority": 0,
//!                 "body_encoding": "base64", "delivery_tag": "<uuid4>"}}
//! ```
//!
//! Everything here is pure: bytes in, values out, no I/O. Readers are lenient
//! (every field but `body`, `headers`, `content-type` and
//! `properties.delivery_tag` is optional, as the spec asks) and never panic;
//! the writer emits kombu's exact shape and key order so that Python clients
//! and tools that eyeball the lists see nothing unusual.

use base64::Engine as _;
use serde_json::value::RawValue;
use serde_json::{Map, Value as Json};

use super::json::{JsonError, PythonJson};
use super::message::{Headers, Outgoing, RawMessage};
use super::value::Value;

/// Why a Redis list element is not a usable kombu envelope.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EnvelopeError {
    /// Not JSON, or not a JSON object.
    #[error("envelope is not a valid JSON object: {0}")]
    Syntax(String),
    /// A required field is absent or has the wrong JSON type.
    #[error("envelope field {0} is missing or has the wrong type")]
    Missing(&'static str),
    /// The body could not be decoded with its `body_encoding`.
    #[error("envelope body cannot be decoded: {0}")]
    Body(String),
    /// The headers contain a kombu JSON wrapper that does not decode.
    #[error("envelope headers cannot be decoded: {0}")]
    Headers(#[from] JsonError),
}

/// Parses one Redis list element into the message and its kombu delivery tag.
///
/// The body is base64-decoded when `properties.body_encoding == "base64"`
/// (kombu's default) and taken verbatim as UTF-8 text when the encoding is
/// absent or `utf-8` (`virtual/base.py:decode_body`). `redelivered` is true
/// when kombu's restore marked the envelope (`headers.redelivered`,
/// `properties.delivery_info.redelivered`, or the top-level `redelivered` of
/// non-emulated restores).
///
/// kombu's envelope is Python JSON, so `NaN`/`Infinity` in a header (a float
/// argument of Celery's own, or an application header) is read as Python
/// reads it ([`PythonJson`]) rather than refused.
pub fn parse(bytes: &[u8]) -> Result<(RawMessage, String), EnvelopeError> {
    let text = PythonJson::new(bytes);
    let env = top_level(text.bytes())?;
    if let Some(k) = env.keys().find(|k| text.check_key(k).is_err()) {
        return Err(EnvelopeError::Syntax(format!("bare token as a key: {k:?}")));
    }
    let empty = Map::new();
    let props = match env.get("properties") {
        Some(Json::Object(p)) => p,
        _ => return Err(EnvelopeError::Missing("properties.delivery_tag")),
    };
    let delivery_tag = match props.get("delivery_tag") {
        Some(Json::String(t)) => t.clone(),
        _ => return Err(EnvelopeError::Missing("properties.delivery_tag")),
    };

    let body_text = match env.get("body") {
        Some(Json::String(s)) => s.as_str(),
        _ => return Err(EnvelopeError::Missing("body")),
    };
    let body = match props.get("body_encoding").and_then(Json::as_str) {
        Some(enc) if enc.eq_ignore_ascii_case("base64") => decode_base64(body_text)?,
        None => body_text.as_bytes().to_vec(),
        Some(enc) if enc.eq_ignore_ascii_case("utf-8") => body_text.as_bytes().to_vec(),
        Some(other) => {
            return Err(EnvelopeError::Body(format!(
                "unknown body_encoding {other:?}"
            )))
        }
    };

    let content_type = match env.get("content-type") {
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Null) => None,
        _ => return Err(EnvelopeError::Missing("content-type")),
    };
    let headers = match env
        .raw_headers
        .as_deref()
        .map(|h| h.get().trim_start().as_bytes())
    {
        // kombu writes `headers or {}`; tolerate an explicit null.
        Some(b"null") => Headers::new(),
        Some(h) if h.first() == Some(&b'{') => headers_from(h, &text)?,
        _ => return Err(EnvelopeError::Missing("headers")),
    };

    let delivery_info = match props.get("delivery_info") {
        Some(Json::Object(d)) => d,
        _ => &empty,
    };
    let redelivered = is_true(delivery_info.get("redelivered"))
        || is_true(env.get("redelivered"))
        || matches!(headers.get("redelivered"), Some(Value::Bool(true)));

    let message = RawMessage {
        body,
        content_type,
        content_encoding: opt_string(env.get("content-encoding")),
        headers,
        correlation_id: opt_string(props.get("correlation_id")),
        reply_to: opt_string(props.get("reply_to")),
        priority: opt_u8(props.get("priority")),
        delivery_mode: opt_u8(props.get("delivery_mode")),
        expiration: match props.get("expiration") {
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Number(n)) => Some(n.to_string()),
            _ => None,
        },
        redelivered,
        exchange: opt_string(delivery_info.get("exchange")).unwrap_or_default(),
        routing_key: opt_string(delivery_info.get("routing_key")).unwrap_or_default(),
        transport_error: None,
    };
    Ok((message, delivery_tag))
}

/// The envelope's top-level fields, parsed, except `headers` (kept raw: a
/// header can nest deeper than serde_json's 128 levels, see [`headers_from`]).
struct TopLevel {
    fields: Map<String, Json>,
    raw_headers: Option<Box<RawValue>>,
}

impl std::ops::Deref for TopLevel {
    type Target = Map<String, Json>;
    fn deref(&self) -> &Self::Target {
        &self.fields
    }
}

fn top_level(bytes: &[u8]) -> Result<TopLevel, EnvelopeError> {
    // Skipping over a raw value has no depth limit, so this never fails on
    // nesting alone; each field is then parsed on its own.
    let raw: std::collections::BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Syntax(e.to_string()))?;
    let mut fields = Map::new();
    let mut raw_headers = None;
    for (k, v) in raw {
        if k == "headers" {
            raw_headers = Some(v);
            continue;
        }
        let parsed: Json = serde_json::from_str(v.get())
            .map_err(|e| EnvelopeError::Syntax(format!("field {k:?}: {e}")))?;
        fields.insert(k, parsed);
    }
    Ok(TopLevel {
        fields,
        raw_headers,
    })
}

/// Application headers, one by one. A header nested deeper than serde_json's
/// recursion limit (128) becomes `None`, as the AMQP side cuts such field
/// tables: Celery's own headers are flat, and an exotic extra header must not
/// make the whole task unreadable.
fn headers_from(raw: &[u8], text: &PythonJson<'_>) -> Result<Headers, EnvelopeError> {
    let fields: std::collections::BTreeMap<String, Box<RawValue>> =
        serde_json::from_slice(raw).map_err(|e| EnvelopeError::Syntax(format!("headers: {e}")))?;
    let mut headers = Headers::new();
    for (k, v) in fields {
        text.check_key(&k)?;
        let value = match serde_json::from_str::<Json>(v.get()) {
            Ok(j) => text.to_value(&j)?,
            Err(e) if e.to_string().contains("recursion limit") => {
                tracing::warn!(header = %k, "header nests deeper than 128 levels; read as None");
                Value::None
            }
            Err(e) => return Err(EnvelopeError::Syntax(format!("header {k:?}: {e}"))),
        };
        headers.insert(k, value);
    }
    Ok(headers)
}

/// What can still be read from an element [`parse`] refused: the task id
/// (`headers.id`, else `properties.correlation_id`), task name and reply
/// target, so the worker can answer a FAILURE instead of losing the message
/// silently. `None` when not even an id is readable. The message returned
/// carries `transport_error` and an empty body.
pub fn salvage(bytes: &[u8], error: &EnvelopeError) -> Option<RawMessage> {
    let text = PythonJson::new(bytes);
    let env = top_level(text.bytes()).ok()?;
    let props = env.get("properties").and_then(Json::as_object);
    let prop = |k: &str| opt_string(props.and_then(|p| p.get(k)));
    let raw_fields: std::collections::BTreeMap<String, Box<RawValue>> = env
        .raw_headers
        .as_deref()
        .and_then(|h| serde_json::from_str(h.get()).ok())
        .unwrap_or_default();
    let header = |k: &str| {
        raw_fields
            .get(k)
            .and_then(|v| serde_json::from_str::<Json>(v.get()).ok())
            .and_then(|j| j.as_str().map(str::to_owned))
    };
    let id = header("id").or_else(|| prop("correlation_id"))?;
    let mut headers = Headers::new();
    headers.insert("id".into(), Value::Str(id.clone()));
    if let Some(task) = header("task") {
        headers.insert("task".into(), Value::Str(task));
    }
    let delivery_info = props
        .and_then(|p| p.get("delivery_info"))
        .and_then(Json::as_object);
    Some(RawMessage {
        headers,
        correlation_id: Some(id),
        reply_to: prop("reply_to"),
        routing_key: opt_string(delivery_info.and_then(|d| d.get("routing_key")))
            .unwrap_or_default(),
        transport_error: Some(error.to_string()),
        ..RawMessage::default()
    })
}

/// Builds the envelope kombu would store for `msg` published to
/// `exchange`/`routing_key`, with the given (fresh, uuid4) delivery tag.
///
/// Key order follows kombu (`prepare_message`, then the properties the
/// Producer sets, then `_inplace_augment_message`). `reply_to` and
/// `expiration` are written only when set, as kombu omits absent properties;
/// `priority` is always present (0 by default).
pub fn build(msg: &Outgoing, exchange: &str, routing_key: &str, delivery_tag: &str) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(&msg.body);
    // Written as kombu's json.dumps writes them (a NaN/Infinity header as its token).
    let headers = super::json::encode(&Value::Dict(
        msg.headers
            .iter()
            .map(|(k, v)| (Value::Str(k.clone()), v.clone()))
            .collect(),
    ));
    let mut props = Vec::with_capacity(8);
    if let Some(c) = &msg.correlation_id {
        props.push(("correlation_id", Json::String(c.clone())));
    }
    if let Some(r) = &msg.reply_to {
        props.push(("reply_to", Json::String(r.clone())));
    }
    props.push(("delivery_mode", Json::from(msg.delivery_mode)));
    if let Some(e) = &msg.expiration {
        props.push(("expiration", Json::String(e.clone())));
    }
    let mut out = String::with_capacity(body.len() + 512);
    out.push_str("{\"body\": ");
    out.push_str(&json_text(&Json::String(body)));
    out.push_str(", \"content-encoding\": ");
    out.push_str(&json_text(&Json::String(msg.content_encoding.clone())));
    out.push_str(", \"content-type\": ");
    out.push_str(&json_text(&Json::String(msg.content_type.clone())));
    out.push_str(", \"headers\": ");
    out.push_str(&String::from_utf8_lossy(&headers));
    out.push_str(", \"properties\": {");
    for (k, v) in props {
        out.push_str(&json_text(&Json::String(k.to_owned())));
        out.push_str(": ");
        out.push_str(&json_text(&v));
        out.push_str(", ");
    }
    out.push_str("\"delivery_info\": {\"exchange\": ");
    out.push_str(&json_text(&Json::String(exchange.to_owned())));
    out.push_str(", \"routing_key\": ");
    out.push_str(&json_text(&Json::String(routing_key.to_owned())));
    out.push_str("}, \"priority\": ");
    out.push_str(&msg.priority.unwrap_or(0).to_string());
    out.push_str(", \"body_encoding\": \"base64\", \"delivery_tag\": ");
    out.push_str(&json_text(&Json::String(delivery_tag.to_owned())));
    out.push_str("}}");
    out
}

/// Marks an envelope as redelivered, as kombu's restore does
/// (`redis.py:Channel._do_restore_message`): `headers.redelivered = true` and
/// `properties.delivery_info.redelivered = true`.
///
/// Like kombu, a missing `headers`/`delivery_info` object is skipped rather
/// than created. Text that is not a JSON object is returned unchanged, so a
/// restore never destroys a message it cannot read.
///
/// The envelope is Python JSON: `NaN`/`Infinity` tokens in it (a float header)
/// are read and written back as they were ([`PythonJson`]).
pub fn mark_redelivered(envelope_json: &str) -> String {
    let text = PythonJson::new(envelope_json.as_bytes());
    let Ok(Json::Object(mut env)) = serde_json::from_slice::<Json>(text.bytes()) else {
        return envelope_json.to_owned();
    };
    // kombu: `payload['headers']['redelivered'] = True` then the delivery
    // info; a KeyError on the first stops the second.
    match env.get_mut("headers") {
        Some(Json::Object(h)) => {
            h.insert("redelivered".into(), Json::Bool(true));
        }
        _ => return text.dumps(&Json::Object(env)),
    }
    if let Some(Json::Object(p)) = env.get_mut("properties") {
        if let Some(Json::Object(d)) = p.get_mut("delivery_info") {
            d.insert("redelivered".into(), Json::Bool(true));
        }
    }
    text.dumps(&Json::Object(env))
}

/// The `properties.priority` of an envelope clamped to 0..=9, as kombu's
/// `_get_message_priority` (0 when absent or not a number).
pub fn priority_of(envelope: &Json) -> u8 {
    envelope
        .get("properties")
        .and_then(|p| p.get("priority"))
        .and_then(|p| {
            p.as_i64()
                .or_else(|| p.as_f64().map(|f| f as i64))
                .or_else(|| p.as_str().and_then(|s| s.trim().parse::<i64>().ok()))
        })
        .map(|p| p.clamp(0, 9) as u8)
        .unwrap_or(0)
}

fn decode_base64(text: &str) -> Result<Vec<u8>, EnvelopeError> {
    let engine = base64::engine::general_purpose::STANDARD;
    match engine.decode(text) {
        Ok(b) => Ok(b),
        // Python's b64decode ignores whitespace (e.g. encodebytes' newlines).
        Err(first) => {
            let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
            engine
                .decode(compact)
                .map_err(|_| EnvelopeError::Body(first.to_string()))
        }
    }
}

fn json_text(v: &Json) -> String {
    // Serializing an in-memory serde_json::Value cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

fn is_true(v: Option<&Json>) -> bool {
    matches!(v, Some(Json::Bool(true)))
}

fn opt_string(v: Option<&Json>) -> Option<String> {
    match v {
        Some(Json::String(s)) => Some(s.clone()),
        _ => None,
    }
}

fn opt_u8(v: Option<&Json>) -> Option<u8> {
    v.and_then(Json::as_u64).and_then(|n| u8::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Json {
        let path = format!(
            "{}/tests/fixtures/groundtruth/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(path).expect("fixture readable");
        serde_json::from_str(&text).expect("fixture is JSON")
    }

    fn raw_element(doc: &Json) -> String {
        doc["message"]["raw_list_element"]
            .as_str()
            .expect("raw_list_element")
            .to_owned()
    }

    #[test]
    fn parses_groundtruth_task_message() {
        let doc = fixture("broker_redis_task_message.json");
        let (msg, tag) = parse(raw_element(&doc).as_bytes()).expect("parses");
        assert_eq!(tag, "b6369cac-64d5-43b0-a889-2fe78fa5fe3b");
        assert_eq!(
            msg.content_type.as_deref(),
            Some("application/x-python-serialize")
        );
        assert_eq!(msg.content_encoding.as_deref(), Some("binary"));
        assert_eq!(msg.body.len(), 137);
        assert_eq!(msg.body[0], 0x80); // pickle PROTO opcode
        assert_eq!(
            msg.headers.get("task").and_then(Value::as_str),
            Some("omegaml.notebook.tasks.run_omegaml_job")
        );
        assert_eq!(
            msg.headers.get("timelimit"),
            Some(&Value::List(vec![Value::Int(1230), Value::Int(1200)]))
        );
        assert_eq!(msg.headers.get("shadow"), Some(&Value::None));
        assert_eq!(
            msg.correlation_id.as_deref(),
            Some("5dee9b6e-6cf1-4fce-991e-bbc6b0a1725e")
        );
        assert_eq!(
            msg.reply_to.as_deref(),
            Some("5219dbc9-2ed4-31be-9587-c54b241d7277")
        );
        assert_eq!(msg.delivery_mode, Some(2));
        assert_eq!(msg.priority, Some(0));
        assert_eq!(msg.exchange, "");
        assert_eq!(msg.routing_key, "default");
        assert!(!msg.redelivered);
    }

    #[test]
    fn parses_groundtruth_gpu_and_reply_messages() {
        let doc = fixture("broker_redis_task_message_gpu.json");
        let (msg, _) = parse(raw_element(&doc).as_bytes()).expect("parses");
        assert_eq!(msg.routing_key, "gpu");

        let replies = fixture("result_redis_reply_messages.json");
        let list = replies["messages"].as_array().expect("messages");
        assert!(!list.is_empty());
        for m in list {
            let raw = m["raw_list_element"].as_str().expect("raw");
            let (msg, tag) = parse(raw.as_bytes()).expect("reply parses");
            assert!(!tag.is_empty());
            assert_eq!(msg.reply_to, None);
            assert_eq!(msg.delivery_mode, Some(1));
            assert!(msg.headers.is_empty());
            assert_eq!(msg.routing_key, "5219dbc9-2ed4-31be-9587-c54b241d7277");
        }
    }

    #[test]
    fn build_round_trips_and_matches_kombu_shape() {
        let doc = fixture("broker_redis_task_message.json");
        let raw = raw_element(&doc);
        let (msg, tag) = parse(raw.as_bytes()).expect("parses");
        let out = Outgoing {
            body: msg.body.clone(),
            content_type: msg.content_type.clone().unwrap_or_default(),
            content_encoding: msg.content_encoding.clone().unwrap_or_default(),
            headers: msg.headers.clone(),
            correlation_id: msg.correlation_id.clone(),
            reply_to: msg.reply_to.clone(),
            priority: msg.priority,
            delivery_mode: msg.delivery_mode.unwrap_or(2),
            expiration: None,
        };
        let built = build(&out, &msg.exchange, &msg.routing_key, &tag);
        let ours: Json = serde_json::from_str(&built).expect("valid JSON");
        let theirs: Json = serde_json::from_str(&raw).expect("valid JSON");
        // Same JSON value as kombu wrote (headers compare as maps).
        assert_eq!(ours, theirs);
        // Same key order as kombu for the top level and the properties.
        let keys: Vec<&str> = ["\"body\"", "\"content-encoding\"", "\"content-type\""]
            .into_iter()
            .chain(["\"headers\"", "\"properties\""])
            .collect();
        let pos: Vec<usize> = keys.iter().filter_map(|k| built.find(k)).collect();
        assert_eq!(pos.len(), keys.len());
        assert!(pos.windows(2).all(|w| w[0] < w[1]));
        let props_order = [
            "correlation_id",
            "reply_to",
            "delivery_mode",
            "delivery_info",
            "priority",
            "body_encoding",
            "delivery_tag",
        ];
        let ppos: Vec<usize> = props_order
            .iter()
            .filter_map(|k| built.find(&format!("\"{k}\"")))
            .collect();
        assert_eq!(ppos.len(), props_order.len());
        assert!(ppos.windows(2).all(|w| w[0] < w[1]));
        // And it parses back to the same message.
        let (again, tag2) = parse(built.as_bytes()).expect("parses back");
        assert_eq!(again, msg);
        assert_eq!(tag2, tag);
    }

    #[test]
    fn build_omits_absent_properties_and_keeps_expiration() {
        let out = Outgoing {
            body: b"[1]".to_vec(),
            content_type: "application/json".into(),
            content_encoding: "utf-8".into(),
            delivery_mode: 1,
            expiration: Some("60000".into()),
            priority: Some(5),
            ..Outgoing::default()
        };
        let built = build(&out, "ex", "rk", "tag-1");
        let v: Json = serde_json::from_str(&built).expect("json");
        let p = &v["properties"];
        assert!(p.get("reply_to").is_none());
        assert!(p.get("correlation_id").is_none());
        assert_eq!(p["expiration"], "60000");
        assert_eq!(p["priority"], 5);
        assert_eq!(p["delivery_info"]["exchange"], "ex");
        assert_eq!(v["body"], "WzFd");
        assert_eq!(v["headers"], serde_json::json!({}));
    }

    #[test]
    fn build_writes_non_finite_headers_as_python_tokens() {
        let mut msg = Outgoing {
            body: b"[[], {}, {}]".to_vec(),
            content_type: "application/json".into(),
            content_encoding: "utf-8".into(),
            ..Outgoing::default()
        };
        msg.headers.insert("id".into(), Value::from("b1"));
        msg.headers
            .insert("x".into(), Value::List(vec![Value::Float(f64::NAN)]));
        let built = build(&msg, "", "q", "t1");
        assert!(built.contains(r#""x":[NaN]"#), "{built}");
        let (raw, _) = parse(built.as_bytes()).expect("parses back");
        assert_eq!(
            raw.headers.get("x").map(Value::repr).as_deref(),
            Some("[nan]")
        );
    }

    #[test]
    fn mark_redelivered_keeps_python_json_tokens() {
        let env = r#"{"body": "W1tdLCB7fSwge31d", "content-type": "application/json", "headers": {"id": "n1", "x": [NaN, -Infinity, 123456789012345678901234567890, "\u00010:nan"]}, "properties": {"delivery_info": {"exchange": "", "routing_key": "q"}, "delivery_tag": "t1"}}"#;
        let marked = mark_redelivered(env);
        assert!(
            marked.contains(r#""x":[NaN,-Infinity,123456789012345678901234567890,"\u00010:nan"]"#),
            "{marked}"
        );
        let (raw, tag) = parse(marked.as_bytes()).expect("still a kombu envelope");
        assert_eq!(tag, "t1");
        assert!(raw.redelivered);
        assert_eq!(
            raw.headers.get("x").map(Value::repr).as_deref(),
            Some("[nan, -inf, 123456789012345678901234567890, '\\x010:nan']")
        );
    }

    #[test]
    fn mark_redelivered_sets_both_flags() {
        let doc = fixture("broker_redis_task_message.json");
        let marked = mark_redelivered(&raw_element(&doc));
        let v: Json = serde_json::from_str(&marked).expect("json");
        assert_eq!(v["headers"]["redelivered"], true);
        assert_eq!(v["properties"]["delivery_info"]["redelivered"], true);
        let (msg, _) = parse(marked.as_bytes()).expect("parses");
        assert!(msg.redelivered);
        assert_eq!(msg.headers.get("redelivered"), Some(&Value::Bool(true)));
        // Garbage passes through untouched.
        assert_eq!(mark_redelivered("not json"), "not json");
    }

    #[test]
    fn utf8_body_and_optional_fields() {
        let raw = br#"{"body": "[[], {}, {}]", "content-type": "application/json", "headers": null,
            "properties": {"delivery_tag": "t"}}"#;
        let (msg, tag) = parse(raw).expect("parses");
        assert_eq!(tag, "t");
        assert_eq!(msg.body, b"[[], {}, {}]");
        assert!(msg.headers.is_empty());
        assert_eq!(msg.priority, None);
        assert_eq!(msg.routing_key, "");
    }

    #[test]
    fn malformed_inputs_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            b"",
            b"[]",
            b"{}",
            b"{\"body\": 1}",
            br#"{"body": "!!", "content-type": "x", "headers": {}, "properties": {"delivery_tag": "t", "body_encoding": "base64"}}"#,
            br#"{"body": "", "headers": {}, "properties": {"delivery_tag": "t"}}"#,
            br#"{"body": "", "content-type": "x", "headers": [], "properties": {"delivery_tag": "t"}}"#,
            br#"{"body": "", "content-type": "x", "headers": {}, "properties": {"delivery_tag": 5}}"#,
            br#"{"body": "", "content-type": "x", "headers": {"a": {"__type__": "nope", "__value__": 1}}, "properties": {"delivery_tag": "t"}}"#,
            br#"{"body": "", "content-type": "x", "headers": {}, "properties": {"delivery_tag": "t", "body_encoding": "rot13"}}"#,
        ];
        for c in cases {
            assert!(parse(c).is_err(), "{:?}", String::from_utf8_lossy(c));
        }
        for junk in [&b"\xff\xfe"[..], b"{\"properties\": null}", b"null"] {
            assert!(parse(junk).is_err());
        }
    }

    #[test]
    fn priority_is_clamped_like_kombu() {
        let v = |p: Json| serde_json::json!({"properties": {"priority": p}});
        assert_eq!(priority_of(&v(Json::from(12))), 9);
        assert_eq!(priority_of(&v(Json::from(-3))), 0);
        assert_eq!(priority_of(&v(Json::from("5"))), 5);
        assert_eq!(priority_of(&serde_json::json!({})), 0);
    }

    fn nested(depth: usize) -> String {
        format!("{}1{}", "{\"a\": ".repeat(depth), "}".repeat(depth))
    }

    #[test]
    fn a_header_nested_past_the_recursion_limit_reads_as_none() {
        let element = format!(
            r#"{{"body": "", "content-type": "application/json", "headers": {{"id": "t1", "task": "x", "deep": {}}}, "properties": {{"delivery_tag": "t"}}}}"#,
            nested(150)
        );
        let (msg, tag) = parse(element.as_bytes()).expect("parses");
        assert_eq!(tag, "t");
        assert_eq!(msg.headers.get("deep"), Some(&Value::None));
        assert_eq!(msg.headers.get("id"), Some(&Value::Str("t1".into())));
        // 100k levels anywhere: an error (or None), never a stack overflow
        let deep_body = format!(
            r#"{{"body": {}, "content-type": "x", "headers": {{}}, "properties": {{"delivery_tag": "t"}}}}"#,
            nested(100_000)
        );
        assert!(parse(deep_body.as_bytes()).is_err());
    }

    #[test]
    fn salvage_reads_the_task_id_of_a_broken_envelope() {
        let cases = [
            // headers that are a list: id from correlation_id
            (
                r#"{"body": "", "content-type": "x", "headers": [], "properties": {"delivery_tag": "t", "correlation_id": "c1", "reply_to": "r1"}}"#,
                Some(("c1", Some("r1"))),
            ),
            // invalid base64 body: id from headers
            (
                r#"{"body": "!!", "content-type": "x", "headers": {"id": "h1", "task": "t"}, "properties": {"delivery_tag": "t", "body_encoding": "base64"}}"#,
                Some(("h1", None)),
            ),
            // no delivery tag
            (
                r#"{"body": "", "content-type": "x", "headers": {"id": "h2"}, "properties": {}}"#,
                Some(("h2", None)),
            ),
            // an unknown kombu wrapper in a header: the id is still readable
            (
                r#"{"body": "", "content-type": "x", "headers": {"id": "h3", "a": {"__type__": "nope", "__value__": 1}}, "properties": {"delivery_tag": "t"}}"#,
                Some(("h3", None)),
            ),
            // nothing that names a task: dropped
            (r#"{"body": "", "headers": {}, "properties": {}}"#, None),
            (r#"not json"#, None),
        ];
        for (element, want) in cases {
            let err = parse(element.as_bytes()).expect_err(element);
            let got = salvage(element.as_bytes(), &err);
            match (want, got) {
                (None, None) => {}
                (Some((id, reply_to)), Some(m)) => {
                    assert_eq!(m.correlation_id.as_deref(), Some(id), "{element}");
                    assert_eq!(m.reply_to.as_deref(), reply_to, "{element}");
                    assert!(m.transport_error.is_some());
                    let decoded = crate::protocol::decode_task(&m);
                    assert!(
                        matches!(decoded, Err(crate::protocol::DecodeError::Transport(_))),
                        "{decoded:?}"
                    );
                }
                (want, got) => panic!("{element}: want {want:?}, got {got:?}"),
            }
        }
    }
}
