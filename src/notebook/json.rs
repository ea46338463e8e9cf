//! JSON text in the exact shape Python's `nbformat.write` produces.
//!
//! omega|ml readers use `nbformat.read`, which accepts any valid JSON, but byte-compatible output
//! keeps diffs against notebooks written by the Python worker empty and makes golden tests
//! possible. Python writes with `json.dumps(indent=1, sort_keys=True, separators=(",", ": "),
//! ensure_ascii=False)` and `nbformat.write` appends a newline. Keys are sorted explicitly here
//! because `serde_json` may be built with `preserve_order` (insertion order) in this crate graph.

use serde_json::Value;

/// Serialises `value` like `json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False)`.
///
/// Known difference: floats are printed by `serde_json` (shortest round-trip form, e.g. `1e-5`)
/// where Python prints `1e-05`; both parse to the same number. Notebooks rarely carry floats.
pub fn to_python_json(value: &Value) -> String {
    let mut out = String::with_capacity(4096);
    write_value(&mut out, value, 0);
    out
}

fn write_value(out: &mut String, value: &Value, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline_indent(out, depth + 1);
                write_value(out, item, depth + 1);
            }
            newline_indent(out, depth);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut keys: Vec<&String> = map.keys().collect();
            // Python sorts str keys by code point; UTF-8 byte order is the same order.
            keys.sort();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline_indent(out, depth + 1);
                write_string(out, key);
                out.push_str(": ");
                if let Some(v) = map.get(key.as_str()) {
                    write_value(out, v, depth + 1);
                }
            }
            newline_indent(out, depth);
            out.push('}');
        }
    }
}

fn newline_indent(out: &mut String, depth: usize) {
    out.push('\n');
    for _ in 0..depth {
        out.push(' ');
    }
}

/// Escapes like Python's `json` with `ensure_ascii=False`: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`,
/// `\f`, other control characters as `\u00xx`; everything else (including non-ASCII) verbatim.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `str.splitlines(keepends=True)`: splits after `\n`, `\r\n`, `\r`, `\v`, `\f`,
/// `\x1c`, `\x1d`, `\x1e`, `\x85`, `\u2028`, `\u2029`. nbformat uses it to store multi-line
/// strings as lists of lines.
pub fn splitlines_keepends(s: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut iter = s.char_indices().peekable();
    while let Some((i, c)) = iter.next() {
        let end = match c {
            '\r' => {
                if let Some(&(_, '\n')) = iter.peek() {
                    iter.next();
                    i + 2
                } else {
                    i + 1
                }
            }
            '\n' | '\u{0b}' | '\u{0c}' | '\u{1c}' | '\u{1d}' | '\u{1e}' | '\u{85}' | '\u{2028}'
            | '\u{2029}' => i + c.len_utf8(),
            _ => continue,
        };
        lines.push(s[start..end].to_string());
        start = end;
    }
    if start < s.len() {
        lines.push(s[start..].to_string());
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_layout() {
        let v = json!({"b": [1, {"y": [], "x": {}}], "a": "é\u{1b}\n"});
        assert_eq!(
            to_python_json(&v),
            "{\n \"a\": \"é\\u001b\\n\",\n \"b\": [\n  1,\n  {\n   \"x\": {},\n   \"y\": []\n  }\n ]\n}"
        );
    }

    #[test]
    fn splitlines_like_python() {
        assert_eq!(
            splitlines_keepends("a\nb\r\nc\rd"),
            ["a\n", "b\r\n", "c\r", "d"]
        );
        assert_eq!(splitlines_keepends(""), Vec::<String>::new());
        assert_eq!(splitlines_keepends("x\n"), ["x\n"]);
        assert_eq!(splitlines_keepends("\r\r"), ["\r", "\r"]);
    }
}
