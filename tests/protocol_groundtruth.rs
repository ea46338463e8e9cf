//! Decodes the messages captured from a real omega|ml 0.18 / Celery 5.7 run
//! (tests/fixtures/groundtruth): task messages from AMQP and Redis, and the
//! pickled rpc result bodies the Python worker published.

use std::path::Path;

use base64::Engine as _;
use om_worker::protocol::json::from_json;
use om_worker::protocol::pickle::{self, PickleError};
use om_worker::protocol::{decode_task, Headers, RawMessage, Value};

fn load(name: &str) -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/groundtruth")
        .join(name);
    serde_json::from_slice(&std::fs::read(p).expect("fixture")).expect("JSON")
}

fn b64(s: &serde_json::Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s.as_str().expect("base64 string"))
        .expect("base64")
}

fn headers(h: &serde_json::Value) -> Headers {
    h.as_object()
        .expect("headers object")
        .iter()
        .map(|(k, v)| (k.clone(), from_json(v).expect("header value")))
        .collect()
}

fn s(v: &serde_json::Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

/// An AMQP capture: properties + application headers + base64 body.
fn amqp(name: &str) -> (RawMessage, String) {
    let f = load(name);
    let m = &f["message"];
    let p = &m["properties"];
    let raw = RawMessage {
        body: b64(&m["body_b64"]),
        content_type: s(&p["content_type"]),
        content_encoding: s(&p["content_encoding"]),
        headers: headers(&m["headers"]),
        correlation_id: s(&p["correlation_id"]),
        reply_to: s(&p["reply_to"]),
        priority: p["priority"].as_u64().and_then(|x| u8::try_from(x).ok()),
        delivery_mode: p["delivery_mode"]
            .as_u64()
            .and_then(|x| u8::try_from(x).ok()),
        routing_key: m["delivery_info"]["routing_key"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        ..Default::default()
    };
    let repr = m["body"]["decoded_repr"].as_str().expect("repr").to_owned();
    (raw, repr)
}

/// A Redis capture: kombu's JSON envelope (base64 body, properties, headers).
fn redis(name: &str) -> (RawMessage, String) {
    let f = load(name);
    let m = &f["message"];
    let env: serde_json::Value =
        serde_json::from_str(m["raw_list_element"].as_str().expect("element")).expect("envelope");
    let p = &env["properties"];
    let raw = RawMessage {
        body: b64(&env["body"]),
        content_type: s(&env["content-type"]),
        content_encoding: s(&env["content-encoding"]),
        headers: headers(&env["headers"]),
        correlation_id: s(&p["correlation_id"]),
        reply_to: s(&p["reply_to"]),
        routing_key: p["delivery_info"]["routing_key"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        ..Default::default()
    };
    let repr = m["body"]["decoded_repr"].as_str().expect("repr").to_owned();
    (raw, repr)
}

fn check(raw: &RawMessage, repr: &str, gpu: bool) {
    let t = decode_task(raw).expect("decodes");
    assert_eq!(Some(&t.id), raw.correlation_id.as_ref());
    assert_eq!(t.id.len(), 36);
    assert_eq!(t.name, "omegaml.notebook.tasks.run_omegaml_job");
    assert_eq!(t.protocol, 2);
    assert_eq!(t.args.len(), 1);
    let nb = t.args[0].as_str().expect("notebook name");
    assert!(nb.starts_with("tasks/") && nb.ends_with("-0.ipynb"), "{nb}");
    let keys: Vec<&str> = t.kwargs.iter().map(|(k, _)| k.as_str()).collect();
    if gpu {
        assert_eq!(keys, ["timeout", "__logging", "pure_python", "__bucket"]);
        assert_eq!(t.kwarg("__logging"), Some(&Value::None));
    } else {
        assert_eq!(keys, ["timeout", "pure_python", "__bucket"]);
    }
    assert_eq!(t.kwarg("timeout"), Some(&Value::None));
    assert_eq!(t.kwarg("pure_python"), Some(&Value::Bool(false)));
    assert_eq!(t.kwarg("__bucket"), Some(&Value::None));
    assert_eq!(t.hard_time_limit, Some(1230.0));
    assert_eq!(t.soft_time_limit, Some(1200.0));
    assert_eq!(t.reply_to, raw.reply_to);
    assert!(t.reply_to.as_deref().is_some_and(|r| r.len() == 36));
    assert_eq!(t.root_id.as_ref(), Some(&t.id));
    assert_eq!(t.parent_id, None);
    assert_eq!(t.eta, None);
    assert_eq!(t.expires, None);
    assert_eq!(t.retries, 0);
    assert_eq!(t.ignore_result, Some(false));
    assert_eq!(t.shadow, None);
    assert!(t.origin.as_deref().is_some_and(|o| o.starts_with("gen")));
    assert_eq!(t.embed.get("callbacks"), Some(&Value::None));
    // The argsrepr header equals our repr of the decoded args.
    assert_eq!(
        t.argsrepr.as_deref(),
        Some(Value::Tuple(t.args.clone()).repr().as_str())
    );
    // And the whole body reprs exactly as Python showed it.
    let body = pickle::decode(&raw.body).expect("body");
    assert_eq!(body.repr(), repr);
}

#[test]
fn amqp_task_message() {
    let (raw, repr) = amqp("broker_amqp_task_message.json");
    check(&raw, &repr, false);
}

#[test]
fn amqp_gpu_task_message() {
    let (raw, repr) = amqp("broker_amqp_task_message_gpu.json");
    assert_eq!(raw.routing_key, "gpu");
    check(&raw, &repr, true);
}

#[test]
fn redis_task_message() {
    let (raw, repr) = redis("broker_redis_task_message.json");
    check(&raw, &repr, false);
}

#[test]
fn redis_gpu_task_message() {
    let (raw, repr) = redis("broker_redis_task_message_gpu.json");
    check(&raw, &repr, true);
}

#[test]
fn id_falls_back_to_correlation_id() {
    let (mut raw, _) = amqp("broker_amqp_task_message.json");
    raw.headers.remove("id");
    let t = decode_task(&raw).expect("decodes");
    assert_eq!(Some(t.id), raw.correlation_id);
}

/// The rpc result bodies the Python worker published: plain ones decode to
/// exactly what Python showed; the FAILURE one pickles an AssertionError
/// instance and must be refused naming that global.
fn result_bodies(name: &str) {
    let f = load(name);
    let msgs = f["messages"].as_array().expect("messages");
    let (mut plain, mut refused) = (0, 0);
    for m in msgs {
        let (body_b64, decoded_repr) = if m.get("envelope").is_some() {
            (&m["envelope"]["body"], &m["body"]["decoded_repr"])
        } else {
            (&m["body_b64"], &m["body"]["decoded_repr"])
        };
        let body = b64(body_b64);
        let want = decoded_repr.as_str().expect("repr");
        match pickle::decode(&body) {
            Ok(v) => {
                assert_eq!(v.repr(), want);
                let status = v.get("status").and_then(Value::as_str).expect("status");
                assert!(["STARTED", "SUCCESS"].contains(&status), "{status}");
                assert!(v.get("task_id").is_some());
                plain += 1;
            }
            Err(e) => {
                assert!(want.contains("'status': 'FAILURE'"), "{want}");
                assert_eq!(
                    e,
                    PickleError::ForbiddenGlobal {
                        module: "builtins".into(),
                        name: "AssertionError".into()
                    }
                );
                assert_eq!(
                    e.to_string(),
                    "forbidden pickle global 'builtins.AssertionError'"
                );
                refused += 1;
            }
        }
    }
    assert!(plain >= 4, "{plain}");
    assert_eq!(refused, 1);
}

#[test]
fn amqp_result_bodies() {
    result_bodies("result_amqp_reply_messages.json");
}

#[test]
fn redis_result_bodies() {
    result_bodies("result_redis_reply_messages.json");
}
