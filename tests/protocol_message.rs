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

/// Bodies Celery published for a link and a chain (see make_pickles.py):
/// the signatures in `embed` and the inline PassthroughDataset argument
/// decode as data objects, and the rest of the message as usual.
#[test]
fn pickle_bodies_with_signatures_and_passthrough_data() {
    let read = |name: &str| {
        std::fs::read(format!(
            "{}/tests/fixtures/pickles/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .expect("fixture")
    };
    let headers = || {
        h(&[
            ("task", Value::from("omegaml.tasks.omega_predict")),
            ("id", Value::from("tid")),
        ])
    };
    let t = decode_task(&msg(
        "application/x-python-serialize",
        &read("celery_link_body.p4.pkl"),
        headers(),
    ))
    .expect("decodes");
    assert_eq!(t.args[0], Value::from("mymodel"));
    let Value::Object(pd) = &t.args[1] else {
        panic!("{}", t.args[1].repr())
    };
    assert_eq!(
        pd.class,
        "omegaml.mixins.store.passthrough.PassthroughDataset"
    );
    for key in ["callbacks", "errbacks"] {
        let sigs = t.embed.get(key).and_then(Value::as_seq).expect(key);
        assert!(
            matches!(&sigs[0], Value::Object(o) if o.class == "celery.canvas.signature"),
            "{key}"
        );
    }
    let t = decode_task(&msg(
        "application/x-python-serialize",
        &read("celery_chain_body.p2.pkl"),
        headers(),
    ))
    .expect("decodes");
    assert_eq!(
        t.embed.get("chain").and_then(Value::as_seq).map(<[_]>::len),
        Some(2)
    );
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
