//! Pickle decoder against CPython-generated fixtures, and the encoder against
//! CPython's `pickle.loads`.
//!
//! Fixtures come from `tests/fixtures/make_pickles.py` (run with the pinned
//! venv); `manifest.json` holds the repr each must decode to.

use std::path::{Path, PathBuf};
use std::process::Command;

use chrono::NaiveDate;
use om_worker::protocol::pickle::{self, PickleError};
use om_worker::protocol::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pickles")
}

fn python() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    p.exists().then_some(p)
}

#[test]
fn every_cpython_fixture_decodes_to_the_python_repr() {
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("manifest.json")).expect("manifest.json"),
    )
    .expect("manifest JSON");
    let files = manifest["files"].as_array().expect("files");
    assert!(files.len() >= 100, "expected the full fixture set");
    let mut protocols = std::collections::BTreeSet::new();
    for f in files {
        let name = f["file"].as_str().expect("file");
        let want = f["repr"].as_str().expect("repr");
        protocols.insert(f["protocol"].as_i64().expect("protocol"));
        let data = std::fs::read(fixtures().join(name)).expect("fixture file");
        let v = pickle::decode(&data).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v.repr(), want, "{name}");
    }
    assert_eq!(protocols.into_iter().collect::<Vec<_>>(), vec![0, 2, 4, 5]);
}

#[test]
fn omegaml_task_body_has_the_expected_structure_in_every_protocol() {
    for p in [0, 2, 4, 5] {
        let data =
            std::fs::read(fixtures().join(format!("omegaml_task_body.p{p}.pkl"))).expect("fixture");
        let v = pickle::decode(&data).expect("decodes");
        let parts = v.as_seq().expect("tuple");
        assert_eq!(parts.len(), 3);
        assert_eq!(
            parts[0],
            Value::Tuple(vec![Value::from("tasks/main/c05ecd89-0.ipynb")])
        );
        assert_eq!(parts[1].get("pure_python"), Some(&Value::Bool(false)));
        assert_eq!(parts[2].get("chord"), Some(&Value::None));
    }
}

#[test]
fn shared_references_see_later_mutation() {
    // x = [1, 'x']; [x, x, (x,)] — memoized before its items are appended.
    let data = std::fs::read(fixtures().join("shared_refs.p2.pkl")).expect("fixture");
    let v = pickle::decode(&data).expect("decodes");
    let inner = Value::List(vec![Value::Int(1), Value::from("x")]);
    assert_eq!(
        v,
        Value::List(vec![
            inner.clone(),
            inner.clone(),
            Value::Tuple(vec![inner])
        ])
    );
}

#[test]
fn datetime_values_are_exact() {
    let data = std::fs::read(fixtures().join("datetime_offset.p4.pkl")).expect("fixture");
    let v = pickle::decode(&data).expect("decodes");
    let naive = NaiveDate::from_ymd_opt(2024, 1, 2)
        .and_then(|d| d.and_hms_opt(3, 4, 0))
        .expect("valid");
    assert_eq!(
        v,
        Value::DateTime {
            naive,
            offset_seconds: Some(5 * 3600 + 1800)
        }
    );
}

#[test]
fn assertion_error_result_names_the_global() {
    // An exception instance is not plain data: refused, naming the class.
    let data = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x0eAssertionError\x94\x93\x94\x8c\x04boom\x94\x85\x94R\x94.";
    let err = pickle::decode(data).unwrap_err();
    assert_eq!(
        err.to_string(),
        "forbidden pickle global 'builtins.AssertionError'"
    );
}

fn sample_values() -> Vec<Value> {
    let naive = NaiveDate::from_ymd_opt(2024, 1, 2)
        .and_then(|d| d.and_hms_micro_opt(3, 4, 5, 678_901))
        .expect("valid");
    vec![
        Value::None,
        Value::Bool(true),
        Value::Int(0),
        Value::Int(-1),
        Value::Int(255),
        Value::Int(65_536),
        Value::Int(i64::MAX),
        Value::Int(i64::MIN),
        Value::BigInt("-123456789012345678901234567890".into()),
        Value::Float(1e16),
        Value::Float(-0.0),
        Value::from("it's a \"test\"\n\u{0}ü😀"),
        Value::from("x".repeat(300)),
        Value::Bytes(vec![0, 0xff, b'\'']),
        Value::List((0..2500).map(Value::Int).collect()),
        Value::Tuple(vec![]),
        Value::Tuple(vec![Value::Int(1)]),
        Value::Tuple(vec![
            Value::Int(1),
            Value::Int(2),
            Value::Int(3),
            Value::Int(4),
        ]),
        Value::Set(vec![Value::Int(1), Value::Int(2)]),
        Value::Set(vec![]),
        Value::dict([
            ("status", Value::from("SUCCESS")),
            ("children", Value::List(vec![])),
        ]),
        Value::DateTime {
            naive,
            offset_seconds: Some(0),
        },
        Value::DateTime {
            naive,
            offset_seconds: Some(-18_000),
        },
        Value::DateTime {
            naive,
            offset_seconds: None,
        },
        Value::Date(naive.date()),
        Value::Time(naive.time()),
        Value::TimeDelta {
            days: -1,
            seconds: 5,
            microseconds: 7,
        },
        Value::Decimal("1.10".into()),
        Value::Uuid(uuid::Uuid::from_u128(
            0x1234_5678_1234_5678_1234_5678_1234_5678,
        )),
    ]
}

#[test]
fn encoder_round_trips_through_our_decoder() {
    for v in sample_values() {
        assert_eq!(
            pickle::decode(&pickle::encode(&v)),
            Ok(v.clone()),
            "{}",
            v.repr()
        );
    }
}

/// The mongodb result backend stores `Binary(pickle(result))`; Python must
/// read exactly the value we meant. Python prints the repr of what it loaded
/// (with the same folding rules as make_pickles.py), compared to `Value::repr`.
#[test]
fn cpython_loads_what_we_encode() {
    // A missing venv is a loud failure, never a skip (scripts/setup-venv.sh creates it).
    let py = python().expect(".venv/bin/python missing: run scripts/setup-venv.sh");
    let values = sample_values();
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, v) in values.iter().enumerate() {
        std::fs::write(dir.path().join(format!("{i}.pkl")), pickle::encode(v)).expect("write");
    }
    let script = r#"
import sys, pickle, datetime, os
sys.path.insert(0, sys.argv[1])
from make_pickles import prepr
d = sys.argv[2]
for i in range(int(sys.argv[3])):
    with open(os.path.join(d, f"{i}.pkl"), "rb") as f:
        print(prepr(pickle.loads(f.read())).encode("unicode_escape").decode("ascii"))
"#;
    let out = Command::new(py)
        .arg("-c")
        .arg(script)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
        .arg(dir.path())
        .arg(values.len().to_string())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("ascii");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), values.len());
    for (v, line) in values.iter().zip(lines) {
        let mine: String = v
            .repr()
            .chars()
            .flat_map(|c| {
                // the same unicode_escape folding Python applied
                let cp = u32::from(c);
                if c == '\\' {
                    vec!['\\', '\\']
                } else if (0x20..0x7f).contains(&cp) {
                    vec![c]
                } else if c == '\n' {
                    "\\n".chars().collect()
                } else if cp < 0x100 {
                    format!("\\x{cp:02x}").chars().collect()
                } else if cp < 0x10000 {
                    format!("\\u{cp:04x}").chars().collect()
                } else {
                    format!("\\U{cp:08x}").chars().collect()
                }
            })
            .collect();
        assert_eq!(mine, line, "{}", v.repr());
    }
}

#[test]
fn limits_are_enforced() {
    let limits = pickle::Limits {
        max_elements: 10,
        ..Default::default()
    };
    let data = std::fs::read(fixtures().join("big_list.p4.pkl")).expect("fixture");
    assert_eq!(
        pickle::decode_with_limits(&data, &limits),
        Err(PickleError::Limit("too many objects"))
    );
}
