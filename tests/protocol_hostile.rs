//! Malformed and hostile messages through `decode_task`: each must fail with
//! the specific error kind, never panic, never execute anything.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use om_worker::protocol::compression::CompressionError;
use om_worker::protocol::json::JsonError;
use om_worker::protocol::message::ErrorClass;
use om_worker::protocol::pickle::PickleError;
use om_worker::protocol::{decode_task, DecodeError, Headers, RawMessage, Value};

const PICKLE: &str = "application/x-python-serialize";
const JSON: &str = "application/json";

fn v2_headers() -> Headers {
    let mut h = Headers::new();
    h.insert(
        "task".into(),
        Value::from("omegaml.notebook.tasks.run_omegaml_job"),
    );
    h.insert(
        "id".into(),
        Value::from("9960201a-d2e3-4eb6-bfdb-18e8c9200ce4"),
    );
    h
}

fn raw(ct: Option<&str>, body: Vec<u8>) -> RawMessage {
    RawMessage {
        body,
        content_type: ct.map(str::to_owned),
        headers: v2_headers(),
        correlation_id: Some("9960201a-d2e3-4eb6-bfdb-18e8c9200ce4".into()),
        reply_to: Some("c67e1808-5c71-3637-8a82-809734c84d33".into()),
        ..Default::default()
    }
}

fn with_header(mut r: RawMessage, k: &str, v: Value) -> RawMessage {
    r.headers.insert(k.into(), v);
    r
}

/// Protocol-4 pickle: PROTO 4, the ops, STOP.
fn p4(ops: &[u8]) -> Vec<u8> {
    let mut v = b"\x80\x04".to_vec();
    v.extend_from_slice(ops);
    v.push(b'.');
    v
}

fn sbu(s: &str) -> Vec<u8> {
    let mut v = vec![0x8c, s.len() as u8];
    v.extend_from_slice(s.as_bytes());
    v
}

/// `module.name` via STACK_GLOBAL.
fn stack_global(module: &str, name: &str) -> Vec<u8> {
    let mut v = sbu(module);
    v.extend(sbu(name));
    v.push(0x93);
    v
}

/// A valid `[args, kwargs, embed]` body in JSON, with substitutions.
fn json_body(args: &str, kwargs: &str, embed: &str) -> Vec<u8> {
    format!("[{args}, {kwargs}, {embed}]").into_bytes()
}

const EMBED: &str = r#"{"callbacks": null, "errbacks": null, "chain": null, "chord": null}"#;

fn forbidden(module: &'static str, name: &'static str) -> impl Fn(&DecodeError) -> bool {
    move |e| {
        matches!(e, DecodeError::Pickle(PickleError::ForbiddenGlobal { module: m, name: n })
            if m == module && n == name)
            && e.to_string().contains(&format!("'{module}.{name}'"))
            && e.class() == ErrorClass::Decode
    }
}

fn bad_field(field: &'static str) -> impl Fn(&DecodeError) -> bool {
    move |e| {
        matches!(e, DecodeError::BadField { field: f, .. } if f == field)
            && e.class() == ErrorClass::InvalidTask
    }
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("write");
    e.finish().expect("finish")
}

type Check = Box<dyn Fn(&DecodeError) -> bool>;

fn corpus() -> Vec<(&'static str, RawMessage, Check)> {
    let good_pickle_body = {
        let mut ops = sbu("tasks/main/x-0.ipynb");
        ops.extend_from_slice(b"\x85}]\x87"); // TUPLE1, {}, [] , TUPLE3
        p4(&ops)
    };
    // A 100k-deep list: EMPTY_LIST x N, then APPEND x (N-1).
    let deep_pickle = {
        let n = 100_000;
        let mut ops = vec![b']'; n];
        ops.extend(std::iter::repeat_n(b'a', n - 1));
        p4(&ops)
    };
    let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes();
    // Billion laughs: L0 = [], Lk = [Lk-1, Lk-1] via the memo, 64 levels.
    let laughs = {
        let mut ops = b"]q\x00".to_vec();
        for k in 1..64u8 {
            ops.extend_from_slice(&[b']', b'(', b'h', k - 1, b'h', k - 1, b'e', b'q', k]);
        }
        p4(&ops)
    };
    let signature_embed = {
        // (( ), {}, {'callbacks': [Signature(...)]}) — celery.canvas.Signature is a dict subclass.
        let mut ops = b")}}".to_vec();
        ops.extend(sbu("callbacks"));
        ops.push(b']');
        ops.extend(stack_global("celery.canvas", "Signature"));
        ops.extend_from_slice(b"}\x85Ra"); // Signature({}) appended
        ops.extend_from_slice(b"s\x87");
        p4(&ops)
    };
    // (( ), {}, {'callbacks': [signature({'task': 'x', 'args': (posix.system('id'),)})]}):
    // celery.canvas.signature is an allow-listed data class, its content is not.
    let signature_with_gadget = {
        let mut ops = b")}}".to_vec();
        ops.extend(sbu("callbacks"));
        ops.push(b']');
        ops.extend(stack_global("celery.canvas", "signature"));
        ops.extend_from_slice(b"}("); // the signature's dict, MARK
        ops.extend(sbu("task"));
        ops.extend(sbu("x"));
        ops.extend(sbu("args"));
        ops.extend(stack_global("posix", "system"));
        ops.extend(sbu("id"));
        ops.extend_from_slice(b"\x85R\x85u"); // (system('id'),), SETITEMS
        ops.extend_from_slice(b"\x85Ra"); // signature(d), APPEND to callbacks
        ops.extend_from_slice(b"s\x87"); // embed['callbacks'] = [...], TUPLE3
        p4(&ops)
    };
    let bomb = zlib(&vec![0u8; 64 * 1024 * 1024 + 1]);

    let mut c: Vec<(&'static str, RawMessage, Check)> = vec![
        (
            "truncated pickle",
            raw(
                Some(PICKLE),
                good_pickle_body[..good_pickle_body.len() / 2].to_vec(),
            ),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::Truncated { .. }))),
        ),
        (
            "pickle without STOP",
            raw(Some(PICKLE), b"\x80\x04N".to_vec()),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::Truncated { .. }))),
        ),
        (
            "only PROTO",
            raw(Some(PICKLE), b"\x80".to_vec()),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::Truncated { .. }))),
        ),
        (
            "empty pickle body",
            raw(Some(PICKLE), Vec::new()),
            Box::new(|e| *e == DecodeError::EmptyBody && e.class() == ErrorClass::Decode),
        ),
        (
            "GLOBAL os system (protocol 0)",
            raw(Some(PICKLE), b"cos\nsystem\n(S'echo hi'\ntR.".to_vec()),
            Box::new(forbidden("os", "system")),
        ),
        (
            "STACK_GLOBAL posix.system",
            raw(
                Some(PICKLE),
                p4(&[
                    stack_global("posix", "system"),
                    sbu("id"),
                    b"\x85R".to_vec(),
                ]
                .concat()),
            ),
            Box::new(forbidden("posix", "system")),
        ),
        (
            "builtins.eval",
            raw(
                Some(PICKLE),
                p4(&[
                    stack_global("builtins", "eval"),
                    sbu("1+1"),
                    b"\x85R".to_vec(),
                ]
                .concat()),
            ),
            Box::new(forbidden("builtins", "eval")),
        ),
        (
            "__builtin__ eval (py2 spelling)",
            raw(Some(PICKLE), b"c__builtin__\neval\n(S'1'\ntR.".to_vec()),
            Box::new(forbidden("builtins", "eval")),
        ),
        (
            "subprocess.Popen",
            raw(
                Some(PICKLE),
                p4(&[
                    stack_global("subprocess", "Popen"),
                    sbu("ls"),
                    b"\x85R".to_vec(),
                ]
                .concat()),
            ),
            Box::new(forbidden("subprocess", "Popen")),
        ),
        (
            "INST os system",
            raw(Some(PICKLE), b"(S'ls'\nios\nsystem\n.".to_vec()),
            Box::new(forbidden("os", "system")),
        ),
        (
            "OBJ with os.system",
            raw(Some(PICKLE), b"(cos\nsystem\nS'ls'\no.".to_vec()),
            Box::new(forbidden("os", "system")),
        ),
        (
            "NEWOBJ on a forbidden class",
            raw(
                Some(PICKLE),
                p4(&[stack_global("collections", "UserDict"), b")\x81".to_vec()].concat()),
            ),
            Box::new(forbidden("collections", "UserDict")),
        ),
        (
            "NEWOBJ on an allow-listed non-UUID class",
            raw(
                Some(PICKLE),
                p4(&[stack_global("datetime", "datetime"), b")\x81".to_vec()].concat()),
            ),
            Box::new(
                |e| matches!(e, DecodeError::Pickle(PickleError::BadCall { callable, .. }) if callable == "datetime.datetime"),
            ),
        ),
        (
            "celery.canvas.Signature in embed",
            raw(Some(PICKLE), signature_embed),
            Box::new(forbidden("celery.canvas", "Signature")),
        ),
        (
            "forbidden global inside an allowed celery.canvas.signature",
            raw(Some(PICKLE), signature_with_gadget),
            Box::new(forbidden("posix", "system")),
        ),
        (
            "builtins.getattr gadget",
            raw(
                Some(PICKLE),
                p4(&[stack_global("builtins", "getattr")].concat()),
            ),
            Box::new(forbidden("builtins", "getattr")),
        ),
        (
            "_reconstructor of a non-UUID class",
            raw(
                Some(PICKLE),
                b"ccopy_reg\n_reconstructor\n(cdatetime\ndate\nc__builtin__\nobject\nNtR.".to_vec(),
            ),
            Box::new(
                |e| matches!(e, DecodeError::Pickle(PickleError::BadCall { callable, .. }) if callable == "copyreg._reconstructor"),
            ),
        ),
        (
            "BUILD on a dict",
            raw(Some(PICKLE), p4(b"}}b")),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::BadCall { .. }))),
        ),
        (
            "PERSID",
            raw(Some(PICKLE), b"P1\n.".to_vec()),
            Box::new(|e| {
                matches!(
                    e,
                    DecodeError::Pickle(PickleError::Unsupported {
                        opcode: "PERSID",
                        ..
                    })
                )
            }),
        ),
        (
            "BINPERSID",
            raw(Some(PICKLE), p4(b"NQ")),
            Box::new(|e| {
                matches!(
                    e,
                    DecodeError::Pickle(PickleError::Unsupported {
                        opcode: "BINPERSID",
                        ..
                    })
                )
            }),
        ),
        (
            "EXT1",
            raw(Some(PICKLE), p4(b"\x82\x01")),
            Box::new(|e| {
                matches!(
                    e,
                    DecodeError::Pickle(PickleError::Unsupported { opcode: "EXT1", .. })
                )
            }),
        ),
        (
            "NEXT_BUFFER (protocol 5 out-of-band)",
            raw(Some(PICKLE), b"\x80\x05\x97.".to_vec()),
            Box::new(|e| {
                matches!(
                    e,
                    DecodeError::Pickle(PickleError::Unsupported {
                        opcode: "NEXT_BUFFER",
                        ..
                    })
                )
            }),
        ),
        (
            "pickle nested 100k levels",
            raw(Some(PICKLE), deep_pickle),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::Limit(_)))),
        ),
        (
            "100k MARKs",
            raw(Some(PICKLE), p4(&vec![b'('; 100_000])),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::Limit(_)))),
        ),
        (
            "JSON nested 100k levels",
            raw(Some(JSON), deep_json),
            Box::new(|e| matches!(e, DecodeError::Json(_)) && e.class() == ErrorClass::Decode),
        ),
        (
            "billion laughs via memo",
            raw(Some(PICKLE), laughs),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::Limit(_)))),
        ),
        (
            "recursive list",
            raw(Some(PICKLE), p4(b"]q\x00h\x00a")),
            Box::new(|e| *e == DecodeError::Pickle(PickleError::Recursive)),
        ),
        (
            "BINUNICODE8 claiming 2^60 bytes",
            raw(
                Some(PICKLE),
                p4(&[&[0x8d][..], &(1u64 << 60).to_le_bytes(), b"abc"].concat()),
            ),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::Truncated { .. }))),
        ),
        (
            "BINBYTES claiming 4 GiB",
            raw(
                Some(PICKLE),
                p4(&[&b"B"[..], &u32::MAX.to_le_bytes()].concat()),
            ),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::Truncated { .. }))),
        ),
        (
            "FRAME longer than the data",
            raw(
                Some(PICKLE),
                p4(&[&[0x95][..], &u64::MAX.to_le_bytes()].concat()),
            ),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::Truncated { .. }))),
        ),
        (
            "LONG4 negative length",
            raw(
                Some(PICKLE),
                p4(&[&[0x8b][..], &(-5i32).to_le_bytes()].concat()),
            ),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::Malformed { .. }))),
        ),
        (
            "LONG4 100k-byte integer",
            raw(
                Some(PICKLE),
                p4(&[&[0x8b][..], &100_000i32.to_le_bytes(), &vec![1u8; 100_000]].concat()),
            ),
            Box::new(|e| *e == DecodeError::Pickle(PickleError::Limit("integer too large"))),
        ),
        (
            "memo GET of a missing index",
            raw(Some(PICKLE), p4(b"h\x07")),
            Box::new(|e| {
                matches!(
                    e,
                    DecodeError::Pickle(PickleError::MemoMissing { key: 7, .. })
                )
            }),
        ),
        (
            "non-UTF-8 in str",
            raw(Some(PICKLE), p4(b"\x8c\x02\xff\xfe")),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::BadString { .. }))),
        ),
        (
            "non-ASCII py2 STRING",
            raw(Some(PICKLE), b"S'\xe9'\n.".to_vec()),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::BadString { .. }))),
        ),
        (
            "invalid opcode",
            raw(Some(PICKLE), p4(b"\xff")),
            Box::new(|e| {
                matches!(
                    e,
                    DecodeError::Pickle(PickleError::BadOpcode { opcode: 0xff, .. })
                )
            }),
        ),
        (
            "protocol 6",
            raw(Some(PICKLE), b"\x80\x06N.".to_vec()),
            Box::new(|e| *e == DecodeError::Pickle(PickleError::UnsupportedProtocol(6))),
        ),
        (
            "APPEND on an empty stack",
            raw(Some(PICKLE), p4(b"a")),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::StackUnderflow { .. }))),
        ),
        (
            "APPENDS without MARK",
            raw(Some(PICKLE), p4(b"]e")),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::NoMark { .. }))),
        ),
        (
            "unhashable dict key",
            raw(Some(PICKLE), p4(b"}]Ns")),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::Malformed { .. }))),
        ),
        (
            "STACK_GLOBAL with non-str",
            raw(Some(PICKLE), p4(b"NN\x93")),
            Box::new(|e| matches!(e, DecodeError::Pickle(PickleError::Malformed { .. }))),
        ),
        (
            "datetime with month 13",
            raw(
                Some(PICKLE),
                p4(&[
                    stack_global("datetime", "datetime"),
                    b"C\x0a\x07\xe8\x0d\x01\x00\x00\x00\x00\x00\x00\x85R".to_vec(),
                ]
                .concat()),
            ),
            Box::new(
                |e| matches!(e, DecodeError::Pickle(PickleError::BadCall { callable, .. }) if callable == "datetime.datetime"),
            ),
        ),
        (
            "yaml content type",
            raw(Some("application/x-yaml"), b"- - 1\n".to_vec()),
            Box::new(|e| {
                *e == DecodeError::UnsupportedContentType("application/x-yaml".into())
                    && e.class() == ErrorClass::ContentDisallowed
            }),
        ),
        (
            "msgpack content type",
            raw(Some("application/x-msgpack"), b"\x93\x90\x80\x80".to_vec()),
            Box::new(|e| *e == DecodeError::UnsupportedContentType("application/x-msgpack".into())),
        ),
        (
            "text/plain content type",
            raw(Some("text/plain"), b"hello".to_vec()),
            Box::new(|e| *e == DecodeError::UnsupportedContentType("text/plain".into())),
        ),
        (
            "no content type",
            raw(None, b"[[], {}, {}]".to_vec()),
            Box::new(|e| matches!(e, DecodeError::UnsupportedContentType(_))),
        ),
        (
            "bz2 compression header + garbage",
            with_header(
                raw(Some(JSON), b"BZh9garbage".to_vec()),
                "compression",
                Value::from("application/x-bz2"),
            ),
            Box::new(|e| {
                matches!(
                    e,
                    DecodeError::Decompress(CompressionError::Corrupt { kind: "bzip2", .. })
                ) && e.class() == ErrorClass::Decode
            }),
        ),
        (
            "x-lzma header + garbage",
            with_header(
                raw(Some(JSON), b"\xfd7zXZ\0garbage".to_vec()),
                "compression",
                Value::from("application/x-lzma"),
            ),
            Box::new(|e| {
                matches!(
                    e,
                    DecodeError::Decompress(CompressionError::Corrupt { kind: "xz", .. })
                )
            }),
        ),
        (
            "brotli compression header (not installed for kombu either)",
            with_header(
                raw(Some(JSON), b"\x0b\x02\x80hello\x03".to_vec()),
                "compression",
                Value::from("application/x-brotli"),
            ),
            Box::new(|e| {
                matches!(e, DecodeError::UnsupportedCompression(m) if m.contains("application/x-brotli"))
                    && e.class() == ErrorClass::ContentDisallowed
            }),
        ),
        (
            "x-gzip header + garbage",
            with_header(
                raw(Some(JSON), b"this is not zlib".to_vec()),
                "compression",
                Value::from("application/x-gzip"),
            ),
            Box::new(|e| matches!(e, DecodeError::Decompress(CompressionError::Corrupt { .. }))),
        ),
        (
            "zlib bomb",
            with_header(
                raw(Some(JSON), bomb),
                "compression",
                Value::from("application/x-gzip"),
            ),
            Box::new(|e| {
                matches!(
                    e,
                    DecodeError::Decompress(CompressionError::TooLarge { .. })
                )
            }),
        ),
        (
            "compression header not a str",
            with_header(
                raw(Some(JSON), b"[]".to_vec()),
                "compression",
                Value::Int(1),
            ),
            Box::new(bad_field("compression")),
        ),
        (
            "missing id and correlation_id",
            {
                let mut r = raw(Some(JSON), json_body("[]", "{}", EMBED));
                r.headers.remove("id");
                r.correlation_id = None;
                r
            },
            Box::new(|e| *e == DecodeError::MissingId),
        ),
        (
            "task header is an int",
            with_header(
                raw(Some(JSON), json_body("[]", "{}", EMBED)),
                "task",
                Value::Int(5),
            ),
            Box::new(bad_field("task")),
        ),
        (
            "task header is empty",
            with_header(
                raw(Some(JSON), json_body("[]", "{}", EMBED)),
                "task",
                Value::from(""),
            ),
            Box::new(bad_field("task")),
        ),
        (
            "id header is a list",
            with_header(
                raw(Some(JSON), json_body("[]", "{}", EMBED)),
                "id",
                Value::List(vec![]),
            ),
            Box::new(bad_field("id")),
        ),
        (
            "timelimit is a str",
            with_header(
                raw(Some(JSON), json_body("[]", "{}", EMBED)),
                "timelimit",
                Value::from("1200"),
            ),
            Box::new(bad_field("timelimit")),
        ),
        (
            "timelimit has 3 entries",
            with_header(
                raw(Some(JSON), json_body("[]", "{}", EMBED)),
                "timelimit",
                Value::List(vec![Value::Int(1), Value::Int(2), Value::Int(3)]),
            ),
            Box::new(bad_field("timelimit")),
        ),
        (
            "timelimit negative",
            with_header(
                raw(Some(JSON), json_body("[]", "{}", EMBED)),
                "timelimit",
                Value::List(vec![Value::Int(-1), Value::None]),
            ),
            Box::new(bad_field("timelimit")),
        ),
        (
            "timelimit -inf (NaN and +inf are no limit, as in Celery)",
            with_header(
                raw(Some(JSON), json_body("[]", "{}", EMBED)),
                "timelimit",
                Value::List(vec![Value::Float(f64::NEG_INFINITY), Value::None]),
            ),
            Box::new(bad_field("timelimit")),
        ),
        (
            "eta unparsable",
            with_header(
                raw(Some(JSON), json_body("[]", "{}", EMBED)),
                "eta",
                Value::from("tomorrow-ish"),
            ),
            Box::new(bad_field("eta")),
        ),
        (
            "expires is an int",
            with_header(
                raw(Some(JSON), json_body("[]", "{}", EMBED)),
                "expires",
                Value::Int(60),
            ),
            Box::new(bad_field("expires")),
        ),
        (
            "retries is a str",
            with_header(
                raw(Some(JSON), json_body("[]", "{}", EMBED)),
                "retries",
                Value::from("0"),
            ),
            Box::new(bad_field("retries")),
        ),
        (
            "ignore_result is a str",
            with_header(
                raw(Some(JSON), json_body("[]", "{}", EMBED)),
                "ignore_result",
                Value::from("no"),
            ),
            Box::new(bad_field("ignore_result")),
        ),
        (
            "body is not a list",
            raw(Some(JSON), b"42".to_vec()),
            Box::new(|e| {
                matches!(e, DecodeError::BadBody(_)) && e.class() == ErrorClass::InvalidTask
            }),
        ),
        (
            "body has 2 elements",
            raw(Some(JSON), b"[[], {}]".to_vec()),
            Box::new(|e| matches!(e, DecodeError::BadBody(_))),
        ),
        (
            "hybrid dict body without args",
            raw(Some(JSON), br#"{"kwargs": {}}"#.to_vec()),
            Box::new(|e| matches!(e, DecodeError::BadBody(_))),
        ),
        (
            "args not a list",
            raw(Some(JSON), json_body(r#""nb.ipynb""#, "{}", EMBED)),
            Box::new(bad_field("args")),
        ),
        (
            "kwargs not a dict",
            raw(Some(JSON), json_body("[]", "[]", EMBED)),
            Box::new(bad_field("kwargs")),
        ),
        (
            "kwargs with non-str keys (pickle)",
            raw(Some(PICKLE), p4(b")}K\x01Ns}\x87")),
            Box::new(bad_field("kwargs")),
        ),
        (
            "embed is an int",
            raw(Some(JSON), json_body("[]", "{}", "7")),
            Box::new(bad_field("embed")),
        ),
        (
            "v1 dict without task",
            {
                let mut r = raw(
                    Some(JSON),
                    br#"{"id": "x", "args": [], "kwargs": {}}"#.to_vec(),
                );
                r.headers.clear();
                r
            },
            Box::new(|e| {
                matches!(e, DecodeError::NotATask(_)) && e.class() == ErrorClass::InvalidTask
            }),
        ),
        (
            "no task header and a list body",
            {
                let mut r = raw(Some(JSON), json_body("[]", "{}", EMBED));
                r.headers.clear();
                r
            },
            Box::new(|e| matches!(e, DecodeError::NotATask(_))),
        ),
        (
            "v1 task is an int",
            {
                let mut r = raw(Some(JSON), br#"{"task": 1, "id": "x"}"#.to_vec());
                r.headers.clear();
                r
            },
            Box::new(bad_field("task")),
        ),
        (
            "invalid JSON",
            raw(Some(JSON), b"[[], {}, ".to_vec()),
            Box::new(|e| matches!(e, DecodeError::Json(JsonError::Syntax(_)))),
        ),
        (
            "unknown kombu JSON wrapper",
            raw(
                Some(JSON),
                json_body(r#"[{"__type__": "pickle", "__value__": "x"}]"#, "{}", EMBED),
            ),
            Box::new(|e| matches!(e, DecodeError::Json(JsonError::BadWrapper { .. }))),
        ),
        (
            "empty JSON body",
            raw(Some(JSON), Vec::new()),
            Box::new(|e| *e == DecodeError::EmptyBody),
        ),
    ];
    c.shrink_to_fit();
    c
}

#[test]
fn hostile_corpus_fails_with_the_specific_error() {
    let corpus = corpus();
    assert!(corpus.len() >= 30, "corpus has {}", corpus.len());
    let mut failures = Vec::new();
    for (name, msg, check) in &corpus {
        match decode_task(msg) {
            Ok(t) => failures.push(format!("{name}: decoded as {t:?}")),
            Err(e) => {
                if !check(&e) {
                    failures.push(format!("{name}: unexpected error {e:?} ({e})"));
                }
                // Every error maps to one of the three Python exceptions, with a message.
                let exc = e.exception();
                assert!(["ContentDisallowed", "DecodeError", "InvalidTaskError"]
                    .contains(&exc.exc_type.as_str()));
                assert_eq!(exc.exc_message.len(), 1);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        corpus.len(),
        failures.join("\n")
    );
    eprintln!("hostile corpus: {} cases", corpus.len());
}

#[test]
fn peek_helpers_work_when_the_body_is_garbage() {
    let r = raw(Some(PICKLE), b"\x80\x04garbage".to_vec());
    assert!(decode_task(&r).is_err());
    assert_eq!(
        om_worker::protocol::peek_task_id(&r).as_deref(),
        Some("9960201a-d2e3-4eb6-bfdb-18e8c9200ce4")
    );
    assert_eq!(
        om_worker::protocol::peek_task_name(&r).as_deref(),
        Some("omegaml.notebook.tasks.run_omegaml_job")
    );
    let mut r = r;
    r.headers.clear();
    assert_eq!(om_worker::protocol::peek_task_id(&r), r.correlation_id);
    assert_eq!(om_worker::protocol::peek_task_name(&r), None);
}

#[test]
fn exception_mapping() {
    let e = DecodeError::UnsupportedContentType("application/x-yaml".into()).exception();
    assert_eq!(
        (e.exc_module.as_str(), e.exc_type.as_str()),
        ("kombu.exceptions", "ContentDisallowed")
    );
    let e = DecodeError::Pickle(PickleError::ForbiddenGlobal {
        module: "posix".into(),
        name: "system".into(),
    })
    .exception();
    assert_eq!(
        (e.exc_module.as_str(), e.exc_type.as_str()),
        ("kombu.exceptions", "DecodeError")
    );
    assert_eq!(
        e.exc_message,
        vec![Value::from(
            "cannot unpickle body: forbidden pickle global 'posix.system'"
        )]
    );
    let e = DecodeError::MissingId.exception();
    assert_eq!(
        (e.exc_module.as_str(), e.exc_type.as_str()),
        ("celery.exceptions", "InvalidTaskError")
    );
}

fn python() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    p.exists().then_some(p)
}

/// A real Python payload whose `__reduce__` is `(os.system, ("touch <path>",))`,
/// inside a Celery task body, as a given pickle protocol.
fn python_payload(py: &Path, target: &Path, protocol: u8) -> Vec<u8> {
    let script = r#"
import os, pickle, sys
class Pwn:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[1],))
body = ((Pwn(),), {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
sys.stdout.buffer.write(pickle.dumps(body, protocol=int(sys.argv[2])))
"#;
    let out = Command::new(py)
        .arg("-c")
        .arg(script)
        .arg(target)
        .arg(protocol.to_string())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The same payload built by hand (what CPython 3.11 emits for protocol 4).
fn handmade_payload(target: &Path) -> Vec<u8> {
    let cmd = format!("touch {}", target.display());
    let mut ops = stack_global("posix", "system");
    ops.push(0x8c);
    ops.push(u8::try_from(cmd.len()).expect("short path"));
    ops.extend_from_slice(cmd.as_bytes());
    ops.extend_from_slice(b"\x85R\x85}}\x87");
    p4(&ops)
}

/// Mandatory: a pickle that *would* run `os.system("touch <tmp>/pwned")` is
/// refused naming the global, and the file does not exist afterwards. A control
/// run through CPython's `pickle.loads` proves the payload is live.
#[test]
fn os_system_payload_is_refused_and_never_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("pwned");
    let mut payloads = vec![handmade_payload(&target)];
    // A missing venv is a loud failure, never a silent downgrade.
    let py = python().expect(".venv/bin/python missing: run scripts/setup-venv.sh");
    {
        for proto in [0, 2, 4, 5] {
            payloads.push(python_payload(&py, &target, proto));
        }
        // Control: CPython itself does run it (so the test is meaningful).
        let control = dir.path().join("control");
        let body = python_payload(&py, &control, 4);
        let path = dir.path().join("control.pkl");
        std::fs::write(&path, body).expect("write");
        let status = Command::new(&py)
            .arg("-c")
            .arg("import pickle,sys; pickle.loads(open(sys.argv[1],'rb').read())")
            .arg(&path)
            .status()
            .expect("python");
        assert!(status.success());
        assert!(
            control.exists(),
            "control payload did not run under CPython"
        );
    }
    for (i, body) in payloads.into_iter().enumerate() {
        let err = decode_task(&raw(Some(PICKLE), body)).expect_err("must be refused");
        assert_eq!(
            err,
            DecodeError::Pickle(PickleError::ForbiddenGlobal {
                module: "posix".into(),
                name: "system".into()
            }),
            "payload {i}"
        );
        assert!(err
            .to_string()
            .contains("forbidden pickle global 'posix.system'"));
        assert!(!target.exists(), "payload {i} ran!");
    }
    assert!(!target.exists());
}
