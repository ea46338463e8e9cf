//! Property tests: no input makes a decoder panic (errors are fine).
//! Case counts are modest so this stays fast in debug builds.

use om_worker::protocol::{compression, decode_task, json, pickle, typed_json, RawMessage, Value};
use proptest::prelude::*;

/// Opcodes and short argument-bearing sequences, so random programs get past
/// the first byte and exercise the stack machine, memo and globals.
fn op() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(
            b"(.012NI\nLFSTUVXabcdeghijlopqrstu}])G\x85\x86\x87\x88\x89\x8f\x90\x91\x93\x94\x81\x92RK"
                .to_vec()
        )
        .prop_map(|b| vec![b]),
        any::<u8>().prop_map(|n| vec![b'K', n]),
        any::<u8>().prop_map(|n| vec![b'h', n % 8]),
        any::<u8>().prop_map(|n| vec![b'q', n % 8]),
        "[a-z]{0,8}".prop_map(|s| {
            let mut v = vec![0x8c, s.len() as u8];
            v.extend_from_slice(s.as_bytes());
            v
        }),
        prop::sample::select(vec![
            b"\x8c\x08datetime\x8c\x08datetime\x93".to_vec(),
            b"\x8c\x08datetime\x8c\x08timezone\x93".to_vec(),
            b"\x8c\x04uuid\x8c\x04UUID\x93".to_vec(),
            b"\x8c\x08builtins\x8c\x03set\x93".to_vec(),
            b"\x8c\x0bcollections\x8c\x0bOrderedDict\x93".to_vec(),
            b"c_codecs\nencode\n".to_vec(),
            b"ccopy_reg\n_reconstructor\n".to_vec(),
            b"c__builtin__\nobject\n".to_vec(),
            b"c__builtin__\nunicode\n".to_vec(),
            b"\x8c\rcelery.canvas\x8c\tsignature\x93".to_vec(),
            b"\x8c omegaml.mixins.store.passthrough\x8c\x12PassthroughDataset\x93".to_vec(),
            b"comegaml.mixins.store.passthrough\nPassthroughDataset\n".to_vec(),
            b"C\x0a\x07\xe8\x01\x02\x03\x04\x05\x00\x00\x00".to_vec(),
            b"\x8a\x09\x01\x02\x03\x04\x05\x06\x07\x08\x89".to_vec(),
            b"I01\n".to_vec(),
            b"L123L\n".to_vec(),
            b"V\\u00fc\n".to_vec(),
            b"S'a'\n".to_vec(),
            b"p1\n".to_vec(),
            b"g1\n".to_vec(),
        ]),
        prop::collection::vec(any::<u8>(), 0..4),
    ]
}

fn program() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(op(), 0..40).prop_map(|ops| {
        let mut v = b"\x80\x04\x95".to_vec();
        v.extend_from_slice(&[0u8; 8]);
        for o in ops {
            v.extend(o);
        }
        v.push(b'.');
        v
    })
}

fn message(content_type: &str, body: Vec<u8>, compressed: bool) -> RawMessage {
    let mut headers = om_worker::protocol::Headers::new();
    headers.insert("task".into(), Value::from("t"));
    if compressed {
        headers.insert("compression".into(), Value::from("application/x-gzip"));
    }
    RawMessage {
        body,
        content_type: Some(content_type.to_owned()),
        headers,
        correlation_id: Some("id".into()),
        ..Default::default()
    }
}

const TYPES: [&str; 4] = [
    "application/x-python-serialize",
    "application/json",
    "application/x-yaml",
    "application/x-msgpack",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn pickle_decode_never_panics_on_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = pickle::decode(&data);
        let mut p4 = b"\x80\x04\x95".to_vec();
        p4.extend_from_slice(&data);
        let _ = pickle::decode(&p4);
    }

    #[test]
    fn pickle_decode_never_panics_on_programs(data in program()) {
        if let Ok(v) = pickle::decode(&data) {
            // Whatever decodes must re-encode and decode to the same value...
            let again = pickle::decode(&pickle::encode(&v));
            if !matches!(v, Value::Float(f) if f.is_nan()) && !contains_nan(&v) {
                prop_assert_eq!(again, Ok(v.clone()));
            }
            // ...so must its typed JSON...
            let typed = typed_json::from_typed_json(&typed_json::to_typed_json(&v));
            if !contains_nan(&v) {
                prop_assert_eq!(typed, Ok(v.clone()));
            }
            // ...and repr must not panic.
            let _ = v.repr();
        }
    }

    #[test]
    fn json_decode_never_panics(data in prop::collection::vec(any::<u8>(), 0..256), s in "[\\[\\]{}\",:0-9a-z_ ]{0,64}") {
        let _ = json::decode(&data);
        let _ = json::decode(s.as_bytes());
    }

    #[test]
    fn typed_json_decode_never_panics(s in "[\\[\\]{}\",:0-9a-z_$. -]{0,64}", tag in prop::sample::select(vec![
        "$float", "$int", "$tuple", "$set", "$dict", "$bytes", "$datetime", "$date", "$time",
        "$timedelta", "$decimal", "$uuid", "$object", "$x",
    ])) {
        for text in [s.clone(), format!("{{\"{tag}\": {s}}}"), format!("{{\"{tag}\": \"{s}\"}}")] {
            if let Ok(j) = serde_json::from_str::<serde_json::Value>(&text) {
                let _ = typed_json::from_typed_json(&j);
            }
        }
    }

    #[test]
    fn decode_task_never_panics(
        data in prop::collection::vec(any::<u8>(), 0..256),
        prog in program(),
        t in 0usize..4,
        compressed in any::<bool>(),
    ) {
        let _ = decode_task(&message(TYPES[t], data.clone(), compressed));
        let _ = decode_task(&message(TYPES[0], prog, false));
        let _ = om_worker::protocol::peek_task_id(&message(TYPES[t], data, compressed));
    }

    #[test]
    fn decompress_never_panics(data in prop::collection::vec(any::<u8>(), 0..256), name in prop::sample::select(vec!["application/x-gzip", "gzip", "zlib", "application/x-bz2", "application/x-lzma", "xz", "", "zstd"])) {
        let _ = compression::decompress(name, &data);
        let mut z = b"x\x9c".to_vec();
        z.extend_from_slice(&data);
        let _ = compression::decompress(name, &z);
        let mut g = vec![0x1f, 0x8b];
        g.extend_from_slice(&data);
        let _ = compression::decompress(name, &g);
    }
}

fn contains_nan(v: &Value) -> bool {
    match v {
        Value::Float(f) => f.is_nan(),
        Value::List(x) | Value::Tuple(x) | Value::Set(x) => x.iter().any(contains_nan),
        Value::Dict(d) => d.iter().any(|(k, v)| contains_nan(k) || contains_nan(v)),
        Value::Object(o) => o.args.iter().any(contains_nan) || contains_nan(&o.state),
        _ => false,
    }
}
