//! Decode what kombu and nbformat decode: compressed bodies (zlib, bz2, lzma),
//! Python JSON with `NaN`/`Infinity`/big integers, and nbformat 3 notebooks.
//!
//! The bytes and the expected outcomes come from Python (kombu 5.7, nbformat
//! 5.10 in the pinned venv) via `tests/fixtures/gen_decode_parity.py`; each
//! case is checked against what Python did with the same bytes: the same
//! decoded value, or a refusal where Python refuses too.

use std::path::{Path, PathBuf};

use om_worker::notebook::Notebook;
use om_worker::protocol::compression::{self, CompressionError};
use om_worker::protocol::{decode_task, envelope, RawMessage, Value};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decode_parity")
}

fn manifest() -> Json {
    let text = std::fs::read_to_string(dir().join("manifest.json")).expect("manifest");
    serde_json::from_str(&text).expect("manifest is JSON")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).expect("fixture file")
}

fn cases<'a>(m: &'a Json, kind: &str) -> &'a Vec<Json> {
    m[kind].as_array().expect("case list")
}

#[test]
fn compressed_bodies_decode_as_kombu_decodes_them() {
    let m = manifest();
    let mut checked = 0;
    for case in cases(&m, "compression") {
        let name = case["name"].as_str().expect("name");
        let ctype = case["compression"].as_str().expect("compression");
        let data = read(case["file"].as_str().expect("file"));
        let got = compression::decompress(ctype, &data);
        if let Some(sha_len) = case.get("sha256_len") {
            let out = got.unwrap_or_else(|e| panic!("{name}: Python decodes it, we fail: {e}"));
            assert_eq!(
                out.len() as u64,
                sha_len[1].as_u64().expect("len"),
                "{name}"
            );
            let sha = format!("{:x}", Sha256::digest(&out));
            assert_eq!(sha, sha_len[0].as_str().expect("sha"), "{name}");
        } else if case.get("bomb").is_some() {
            // Python decodes these (80 MiB, no cap); we keep the 64 MiB bound.
            assert_eq!(
                got,
                Err(CompressionError::TooLarge {
                    limit: compression::MAX_DECOMPRESSED
                }),
                "{name}"
            );
            let len = case["python_len"].as_u64().expect("len") as usize;
            let under = compression::decompress_capped(ctype, &data, len)
                .unwrap_or_else(|e| panic!("{name} under a larger cap: {e}"));
            assert_eq!(under.len(), len, "{name}");
        } else {
            let py = case["python_error"].as_str().expect("python_error");
            let err = got.expect_err(name);
            if py.starts_with("KeyError") {
                assert!(
                    matches!(err, CompressionError::Unsupported(_)),
                    "{name}: {err}"
                );
            } else {
                assert!(
                    matches!(err, CompressionError::Corrupt { .. }),
                    "{name}: {err}"
                );
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 17, "every case in the manifest was checked");
}

#[test]
fn a_forged_lzma_dictionary_is_refused_before_allocating() {
    // .lzma header: props 0x5d, a 4 GiB - 1 dictionary, unknown size.
    let mut data = vec![0x5d, 0xff, 0xff, 0xff, 0xff];
    data.extend_from_slice(&[0xff; 8]);
    data.extend_from_slice(&[0; 16]);
    let err = compression::decompress("application/x-lzma", &data).expect_err("refused");
    assert!(
        matches!(err, CompressionError::Corrupt { kind: "lzma", .. }),
        "{err}"
    );
}

#[test]
fn python_json_decodes_as_kombu_loads_it() {
    let m = manifest();
    for case in cases(&m, "json") {
        let text = case["text"].as_str().expect("text");
        let got = om_worker::protocol::json::decode(text.as_bytes());
        match case.get("repr").and_then(Json::as_str) {
            Some(want) => {
                let v = got.unwrap_or_else(|e| panic!("{text}: Python reads it, we fail: {e}"));
                assert_eq!(v.repr(), want, "{text}");
            }
            None => assert!(got.is_err(), "{text}: Python refuses it, we read {got:?}"),
        }
    }
}

#[test]
fn a_json_task_with_nan_args_decodes_to_floats() {
    let body = br#"[[NaN, Infinity, -Infinity, 1e400], {"x": NaN}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;
    let mut raw = RawMessage {
        body: body.to_vec(),
        content_type: Some("application/json".into()),
        content_encoding: Some("utf-8".into()),
        ..RawMessage::default()
    };
    raw.headers.insert("id".into(), Value::from("nan-1"));
    raw.headers.insert("task".into(), Value::from("t"));
    let task = decode_task(&raw).expect("decodes");
    assert_eq!(
        Value::Tuple(task.args.clone()).repr(),
        "(nan, inf, -inf, inf)"
    );
    assert_eq!(task.kwargs.len(), 1);
    assert_eq!(task.kwargs[0].0, "x");
    assert!(matches!(task.kwargs[0].1, Value::Float(f) if f.is_nan()));
}

fn envelope_text(headers: &str) -> String {
    let body = base64_encode(br#"[[1], {}, {}]"#);
    format!(
        r#"{{"body": "{body}", "content-encoding": "utf-8", "content-type": "application/json", "headers": {headers}, "properties": {{"correlation_id": "env-nan", "delivery_mode": 2, "delivery_info": {{"exchange": "", "routing_key": "default"}}, "priority": 0, "body_encoding": "base64", "delivery_tag": "tag-1"}}}}"#
    )
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn a_redis_envelope_with_nan_headers_is_a_kombu_envelope() {
    let text = envelope_text(
        r#"{"lang": "py", "task": "t", "id": "env-nan", "x-score": NaN, "x-big": [Infinity, -Infinity, 123456789012345678901234567890], "timelimit": [null, null]}"#,
    );
    let (raw, tag) = envelope::parse(text.as_bytes()).expect("a kombu envelope");
    assert_eq!(tag, "tag-1");
    assert_eq!(
        raw.headers.get("x-score").map(Value::repr).as_deref(),
        Some("nan")
    );
    assert_eq!(
        raw.headers.get("x-big").map(Value::repr).as_deref(),
        Some("[inf, -inf, 123456789012345678901234567890]")
    );
    let task = decode_task(&raw).expect("runs as Celery runs it");
    assert_eq!(task.id, "env-nan");
    // A bare NaN as a header name is not JSON for Python either.
    let text = envelope_text(r#"{"task": "t", "id": "env-nan", NaN: 1}"#);
    assert!(envelope::parse(text.as_bytes()).is_err());
}

#[test]
fn nan_and_inf_time_limits_are_no_limit_as_in_celery() {
    // celery worker (prefork) runs a task with timelimit [NaN, inf] unlimited.
    let text = envelope_text(r#"{"task": "t", "id": "env-nan", "timelimit": [NaN, Infinity]}"#);
    let (raw, _) = envelope::parse(text.as_bytes()).expect("a kombu envelope");
    let task = decode_task(&raw).expect("runs");
    assert_eq!((task.hard_time_limit, task.soft_time_limit), (None, None));
    // A negative limit is still refused, with the id, so the client gets a FAILURE.
    let text = envelope_text(r#"{"task": "t", "id": "env-nan", "timelimit": [-Infinity, null]}"#);
    let (raw, _) = envelope::parse(text.as_bytes()).expect("a kombu envelope");
    let err = decode_task(&raw).expect_err("not a time limit");
    assert!(err.to_string().contains("timelimit"), "{err}");
    assert_eq!(
        om_worker::protocol::message::peek_task_id(&raw).as_deref(),
        Some("env-nan")
    );
}

/// The notebook as nbformat writes it, with cell ids numbered (they are random).
fn normalized(nb: &Notebook) -> String {
    let mut nb = nb.clone();
    for (i, cell) in nb.cells.iter_mut().enumerate() {
        cell.id = Some(format!("cell-{i}"));
    }
    nb.to_ipynb_string()
}

#[test]
fn nbformat3_notebooks_upgrade_as_nbformat_upgrades_them() {
    let m = manifest();
    let mut upgraded = 0;
    for case in cases(&m, "notebooks") {
        let name = case["name"].as_str().expect("name");
        let got = Notebook::from_slice(&read(case["file"].as_str().expect("file")));
        match case.get("v4_file").and_then(Json::as_str) {
            Some(v4) => {
                let nb = got.unwrap_or_else(|e| panic!("{name}: nbformat reads it, we fail: {e}"));
                assert_eq!((nb.nbformat, nb.nbformat_minor), (4, 5), "{name}");
                assert!(
                    nb.cells
                        .iter()
                        .all(|c| c.id.as_deref().is_some_and(|i| i.len() == 8)),
                    "{name}: every cell gets a fresh id"
                );
                let want = String::from_utf8(read(v4)).expect("utf-8");
                assert_eq!(normalized(&nb), want, "{name}");
                upgraded += 1;
            }
            None => {
                let py = case["python_error"].as_str().expect("python_error");
                let err = got.expect_err(name).to_string();
                let reason = py.split_once(": ").map_or(py, |(_, r)| r);
                assert!(err.contains(reason), "{name}: {err} vs {py}");
            }
        }
    }
    assert_eq!(upgraded, 2);
}

#[test]
fn other_old_formats_are_still_refused() {
    let err = Notebook::parse(r#"{"nbformat": 2, "nbformat_minor": 0, "worksheets": []}"#)
        .expect_err("v2");
    assert!(err.to_string().contains("nbformat 2"), "{err}");
}

mod properties {
    use om_worker::protocol::{json, Value};
    use proptest::prelude::*;

    /// JSON-ish text built from the tokens the Python-JSON scan cares about.
    fn jsonish() -> impl Strategy<Value = String> {
        let token = prop::sample::select(vec![
            "NaN",
            "Infinity",
            "-Infinity",
            "-",
            "1e400",
            "1.5",
            "0",
            "01",
            "12345678901234567890123",
            "\"",
            "\\\"",
            "\\",
            "\\u0001omw-nonfinite-0",
            "[",
            "]",
            "{",
            "}",
            ":",
            ",",
            " ",
            "null",
            "\"a\"",
            "N",
            "I",
            "e",
            ".",
        ]);
        prop::collection::vec(token, 0..24).prop_map(|t| t.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Floats of every kind (NaN, ±inf, -0.0, subnormals) and any string survive
        /// encode → decode exactly, as through Python's json.dumps/loads.
        #[test]
        fn floats_and_strings_round_trip(
            xs in prop::collection::vec(any::<f64>(), 0..16),
            s in ".*",
        ) {
            let mut items: Vec<Value> = xs.into_iter().map(Value::Float).collect();
            items.push(Value::Str(s));
            items.push(Value::Str("\u{1}omw-nonfinite-0:nan".into()));
            let v = Value::List(items);
            let back = json::decode(&json::encode(&v));
            prop_assert!(back.is_ok(), "{:?}", back);
            prop_assert_eq!(back.map(|b| b.repr()).unwrap_or_default(), v.repr());
        }

        /// The scan never panics, and whatever it accepts serde_json alone accepts
        /// too once NaN/Infinity/big numbers are out of the picture.
        #[test]
        fn python_json_scan_never_panics(text in jsonish()) {
            let got = json::decode(text.as_bytes());
            let plain = !["NaN", "Infinity", "1e400", "12345678901234567890123"]
                .iter()
                .any(|t| text.contains(t));
            if plain {
                prop_assert_eq!(got.is_ok(), serde_json::from_str::<serde_json::Value>(&text).is_ok(), "{}", text);
            }
        }
    }
}
