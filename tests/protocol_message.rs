//! Positive decoding paths: JSON v2, hybrid, v1, compression, eta/expires forms.

use std::io::Write as _;

use chrono::{TimeZone, Utc};
use om_worker::protocol::{decode_task, Headers, RawMessage, Value};

fn msg(ct: &str, body: &[u8], headers: Headers) -> RawMessage {
    RawMessage {
        body: body.to_vec(),
        content_type: Some(ct.into()),
        headers,
        correlation_id: Some("corr-id".into()),
        reply_to: Some("replyq".into()),
        ..Default::default()
    }
}

fn h(items: &[(&str, Value)]) -> Headers {
    items
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[test]
fn json_v2_with_eta_forms_and_limits() {
    let body = br#"[[2, 2], {"z": 1}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;
    for (eta, want) in [
        (
            "2026-11-22T02:59:22.871439+00:00",
            Utc.with_ymd_and_hms(2026, 11, 22, 2, 59, 22)
                .single()
                .map(|d| d + chrono::Duration::microseconds(871_439)),
        ),
        (
            "2030-01-01T12:00:00",
            Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).single(),
        ),
        (
            "2030-01-01T12:00:00Z",
            Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).single(),
        ),
        (
            "2030-01-01T14:00:00+02:00",
            Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).single(),
        ),
        (
            "2030-01-01T07:00:00.5-05:00",
            Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0)
                .single()
                .map(|d| d + chrono::Duration::milliseconds(500)),
        ),
    ] {
        let t = decode_task(&msg(
            "application/json",
            body,
            h(&[
                ("task", Value::from("proj.tasks.add")),
                ("eta", Value::from(eta)),
                (
                    "timelimit",
                    Value::List(vec![Value::Float(10.5), Value::None]),
                ),
                ("retries", Value::Int(2)),
                ("shadow", Value::from("alias")),
            ]),
        ))
        .expect("decodes");
        assert_eq!(t.eta, want, "{eta}");
        assert_eq!(t.id, "corr-id");
        assert_eq!(t.args, vec![Value::Int(2), Value::Int(2)]);
        assert_eq!(t.kwargs, vec![("z".to_string(), Value::Int(1))]);
        assert_eq!((t.hard_time_limit, t.soft_time_limit), (Some(10.5), None));
        assert_eq!(t.retries, 2);
        assert_eq!(t.display_name(), "alias");
    }
}

#[test]
fn zero_time_limit_means_none() {
    let t = decode_task(&msg(
        "application/json",
        b"[[], {}, null]",
        h(&[
            ("task", Value::from("t")),
            ("timelimit", Value::List(vec![Value::Int(0), Value::Int(0)])),
        ]),
    ))
    .expect("decodes");
    assert_eq!((t.hard_time_limit, t.soft_time_limit), (None, None));
}

#[test]
fn compressed_pickle_body() {
    let body = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pickles/omegaml_task_body.p4.pkl"
    ))
    .expect("fixture");
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(&body).expect("write");
    let z = e.finish().expect("finish");
    assert_eq!(&z[..2], b"x\x9c");
    let t = decode_task(&msg(
        "application/x-python-serialize",
        &z,
        h(&[
            (
                "task",
                Value::from("omegaml.notebook.tasks.run_omegaml_job"),
            ),
            ("id", Value::from("tid")),
            ("compression", Value::from("application/x-gzip")),
        ]),
    ))
    .expect("decodes");
    assert_eq!(t.id, "tid");
    assert_eq!(t.args, vec![Value::from("tasks/main/c05ecd89-0.ipynb")]);
}

#[test]
fn protocol_v1_dict_body() {
    let body = br#"{"task": "proj.tasks.add", "id": "d8b8e3fe", "args": [1, 2], "kwargs": {"z": 3}, "group": null, "group_index": null,
 "retries": 0, "eta": "2026-11-22T03:03:43.577688+00:00", "expires": null, "utc": true, "callbacks": null,
 "errbacks": null, "timelimit": [null, null], "taskset": "g1", "chord": null}"#;
    let t = decode_task(&msg("application/json", body, Headers::new())).expect("decodes");
    assert_eq!(t.protocol, 1);
    assert_eq!(t.id, "d8b8e3fe");
    assert_eq!(t.name, "proj.tasks.add");
    assert_eq!(t.group.as_deref(), Some("g1"));
    assert_eq!(t.argsrepr.as_deref(), Some("(1, 2)"));
    assert_eq!(t.kwargsrepr.as_deref(), Some("{'z': 3}"));
    assert!(t.eta.is_some());
    assert_eq!(t.embed.get("chain"), Some(&Value::None));
}

#[test]
fn hybrid_body_headers_override() {
    let body =
        br#"{"task": "from.body", "id": "body-id", "args": [1], "kwargs": {}, "retries": 3}"#;
    let t = decode_task(&msg(
        "application/json",
        body,
        h(&[("task", Value::from("from.headers"))]),
    ))
    .expect("decodes");
    assert_eq!(t.protocol, 2);
    assert_eq!(t.name, "from.headers");
    assert_eq!(t.id, "body-id");
    assert_eq!(t.retries, 3);
    assert_eq!(t.args, vec![Value::Int(1)]);
}
