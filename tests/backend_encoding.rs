//! Result encodings the Python client reads: checked by loading them with the
//! real Python (`pickle.loads` in the project's venv), no mocks.

use std::io::Write as _;
use std::process::{Command, Stdio};

use om_worker::protocol::result_codec::{encode_meta, encode_result, Serializer};
use om_worker::protocol::{ExceptionInfo, ResultMeta, Value};

fn python() -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: run scripts/setup-venv.sh",
        p.display()
    );
    p
}

/// `repr(pickle.loads(bytes))` as the venv's Python prints it.
fn py_repr(bytes: &[u8], expr: &str) -> String {
    let mut child = Command::new(python())
        .args([
            "-c",
            &format!(
                "import pickle, sys; v = pickle.loads(sys.stdin.buffer.read()); print({expr})"
            ),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("write");
    let out = child.wait_with_output().expect("python finishes");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn failure_meta_pickles_an_exception_instance_like_a_python_worker() {
    let exc = ExceptionInfo {
        exc_type: "AssertionError".into(),
        exc_module: "builtins".into(),
        exc_message: vec![Value::from("Cannot run non-existent jobs gone")],
    };
    let meta = ResultMeta::failure("t-1", exc, Some("Traceback ...".into()));
    let bytes = encode_meta(Serializer::Pickle, &meta);
    assert_eq!(
        py_repr(&bytes, "(v['status'], repr(v['result']), v['task_id'])"),
        "('FAILURE', \"AssertionError('Cannot run non-existent jobs gone')\", 't-1')"
    );
    assert_eq!(
        py_repr(&encode_result(Serializer::Pickle, &meta), "repr(v)"),
        "AssertionError('Cannot run non-existent jobs gone')"
    );
}

#[test]
fn exceptions_of_modules_clients_cannot_import_stay_dicts() {
    let exc = ExceptionInfo::new("om_worker.errors", "WorkerInternalError", "boom");
    let meta = ResultMeta::failure("t-2", exc, None);
    let r = py_repr(
        &encode_meta(Serializer::Pickle, &meta),
        "sorted(v['result'])",
    );
    assert_eq!(r, "['exc_message', 'exc_module', 'exc_type']");
}

#[test]
fn success_values_are_plain() {
    let meta = ResultMeta::success(
        "t-3",
        Value::dict([
            ("exc_type", Value::from("x")),
            ("exc_message", Value::List(vec![])),
            ("exc_module", Value::from("builtins")),
        ]),
    );
    // A SUCCESS result that merely looks like an exception dict stays a dict.
    let r = py_repr(
        &encode_meta(Serializer::Pickle, &meta),
        "type(v['result']).__name__",
    );
    assert_eq!(r, "dict");
}

/// Runs `code` in the venv's Python and returns its stdout bytes.
fn py_bytes(code: &str) -> Vec<u8> {
    let out = Command::new(python())
        .args(["-c", code])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A result a Python child pickled itself (objects our value model cannot
/// hold, shared references, a FRAME, memo entries) is relayed inside the meta
/// dict byte for byte, and the client's `pickle.loads` gets the object back.
#[test]
fn serialized_child_results_are_spliced_into_the_meta() {
    use om_worker::protocol::result::SerializedValue;
    let pickled = py_bytes(
        "import pickle, sys, collections, fractions; \
         shared = [1, 2]; \
         v = {'od': collections.OrderedDict(a=shared), 'again': shared, 'f': fractions.Fraction(1, 3), 'big': 'x' * 70000}; \
         sys.stdout.buffer.write(pickle.dumps(v, protocol=4))",
    );
    assert!(pickled.contains(&0x95), "protocol 4 with a FRAME");
    let meta = ResultMeta::success_serialized(
        "t-ser",
        SerializedValue {
            serializer: Serializer::Pickle,
            bytes: pickled.clone(),
            repr: "{...}".into(),
        },
    );
    let check = "(v['status'], v['task_id'], type(v['result']['od']).__name__, \
                 v['result']['od']['a'] is v['result']['again'], str(v['result']['f']), len(v['result']['big']))";
    assert_eq!(
        py_repr(&encode_meta(Serializer::Pickle, &meta), check),
        "('SUCCESS', 't-ser', 'OrderedDict', True, '1/3', 70000)"
    );
    assert_eq!(
        encode_result(Serializer::Pickle, &meta),
        pickled,
        "the mongodb backend's result field is the child's pickle itself"
    );

    let json_meta = ResultMeta::success_serialized(
        "t-json",
        SerializedValue {
            serializer: Serializer::Json,
            bytes: br#"{"a": [1, 2.5, null], "__type__": "x"}"#.to_vec(),
            repr: "{...}".into(),
        },
    );
    let decoded: serde_json::Value =
        serde_json::from_slice(&encode_meta(Serializer::Json, &json_meta)).expect("json");
    assert_eq!(decoded["result"]["a"], serde_json::json!([1, 2.5, null]));
    assert_eq!(decoded["status"], "SUCCESS");

    // Written with another serializer than configured: never relayed as is.
    let bytes = encode_meta(Serializer::Json, &meta);
    let decoded: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(decoded["status"], "SUCCESS");
    assert_eq!(decoded["result"], "{...}", "its repr instead");
}
