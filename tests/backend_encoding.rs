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
