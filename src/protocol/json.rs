//! JSON bodies and headers, with kombu's `{"__type__": T, "__value__": V}` wrappers.
//!
//! kombu ≥ 5.3 wraps values plain JSON cannot carry (datetime, date, time,
//! Decimal, UUID, bytes); an object whose key set is exactly
//! `{"__type__", "__value__"}` is such a wrapper. Older kombu sent plain
//! strings, which simply stay strings here.

use base64::Engine as _;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime};
use serde_json::{Map, Number};

use super::value::Value;

/// Deepest nesting accepted in a JSON document (arrays and objects).
pub const MAX_DEPTH: usize = 128;

/// Why JSON could not be decoded into a [`Value`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JsonError {
    /// Not JSON at all.
    #[error("invalid JSON: {0}")]
    Syntax(String),
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("JSON nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// A `__type__` wrapper kombu would refuse too.
    #[error("bad kombu JSON wrapper {kind:?}: {reason}")]
    BadWrapper {
        /// The `__type__` value.
        kind: String,
        /// What was wrong.
        reason: String,
    },
}

/// Parses JSON bytes into a [`Value`], unwrapping kombu wrappers.
///
/// Reads what Python's `json.loads` reads (kombu's JSON serializer is
/// `json.loads`): `NaN`, `Infinity` and `-Infinity` become floats, a float
/// literal too large for a double (`1e400`) becomes ±inf, and an integer
/// beyond 64 bits stays an exact [`Value::BigInt`] (see [`PythonJson`]).
pub fn decode(bytes: &[u8]) -> Result<Value, JsonError> {
    let text = PythonJson::new(bytes);
    // serde_json itself stops at 128 levels of recursion, so this cannot
    // overflow the stack; `from_json` re-checks depth for values built elsewhere.
    let v: serde_json::Value =
        serde_json::from_slice(text.bytes()).map_err(|e| JsonError::Syntax(e.to_string()))?;
    text.to_value(&v)
}

/// Converts a parsed JSON value into a [`Value`], unwrapping kombu wrappers.
pub fn from_json(v: &serde_json::Value) -> Result<Value, JsonError> {
    from_json_at(v, 0, None)
}

/// JSON text as Python's `json` module writes it, made readable by serde_json.
///
/// Python's `json.dumps` writes `NaN`, `Infinity` and `-Infinity` for
/// non-finite floats (`allow_nan=True` is the default, and kombu keeps it), and
/// `json.loads` reads them back, along with float literals that overflow to
/// ±inf and integers of any size. serde_json refuses the first three and the
/// overflowing floats, and rounds big integers to a double. So before parsing,
/// each such token (outside strings) is replaced by a JSON string
/// `"<MARKER>nan" | "<MARKER>inf" | "<MARKER>-inf" | "<MARKER><digits>"`, which
/// [`Self::to_value`] turns back into the float or [`Value::BigInt`]. The
/// marker is U+0001, a number and `:`; valid JSON can only spell U+0001 as the
/// escape `\u0001`, and a marker that a string of the input starts with is
/// skipped for the next number, so no input string is ever mistaken for a
/// replaced token. A string (not an object) keeps the parsed form small, and
/// both passes stream: nothing is collected per token. Text without such
/// tokens (every message a Celery client sends unless its arguments hold
/// them) is parsed as is, with no copy.
pub struct PythonJson<'a> {
    text: std::borrow::Cow<'a, [u8]>,
    marker: Option<String>,
}

/// What [`scan`] reports.
enum Token<'t> {
    /// A token to replace: its byte range and tag (`nan`, `inf`, `-inf`, digits).
    Special(usize, usize, &'t str),
    /// A string token written with escapes (only those can spell a marker).
    EscapedString(&'t [u8]),
}

impl<'a> PythonJson<'a> {
    /// Scans `bytes` (cheap when there is nothing to replace: no copy).
    pub fn new(bytes: &'a [u8]) -> Self {
        let mut specials = 0usize;
        let mut taken = std::collections::BTreeSet::new();
        scan(bytes, |t| match t {
            Token::Special(..) => specials += 1,
            Token::EscapedString(raw) => {
                if let Some(n) = marker_number(raw) {
                    taken.insert(n);
                }
            }
        });
        if specials == 0 {
            return PythonJson {
                text: std::borrow::Cow::Borrowed(bytes),
                marker: None,
            };
        }
        let n = (0u64..).find(|n| !taken.contains(n)).unwrap_or_default();
        let marker = format!("\u{1}{n}:");
        let mut out = Vec::with_capacity(bytes.len() + specials * 16);
        let mut at = 0;
        scan(bytes, |t| {
            if let Token::Special(start, end, tag) = t {
                out.extend_from_slice(&bytes[at..start]);
                out.extend_from_slice(b"\"\\u0001");
                out.extend_from_slice(n.to_string().as_bytes());
                out.push(b':');
                out.extend_from_slice(tag.as_bytes());
                out.push(b'"');
                at = end;
            }
        });
        out.extend_from_slice(&bytes[at..]);
        PythonJson {
            text: std::borrow::Cow::Owned(out),
            marker: Some(marker),
        }
    }

    /// Refuses an object key that stands for a replaced token (see
    /// [`from_json`]); for callers that read objects key by key.
    pub fn check_key(&self, key: &str) -> Result<(), JsonError> {
        key_not_replaced(key, self.marker.as_deref())
    }

    /// `v` (parsed from [`Self::bytes`], possibly changed) as JSON text with
    /// the replaced tokens written back as Python wrote them (`NaN`,
    /// `Infinity`, `-Infinity`, the integer's digits), compact. For a caller
    /// that edits a Python-JSON document and stores it again (the Redis
    /// restore marking an envelope redelivered).
    pub fn dumps(&self, v: &serde_json::Value) -> String {
        let mut out = String::new();
        write_python(v, self.marker.as_deref(), &mut out);
        out
    }

    /// The text to hand to serde_json.
    pub fn bytes(&self) -> &[u8] {
        &self.text
    }

    /// [`from_json`] for a value parsed from [`Self::bytes`] (or a part of it),
    /// putting the replaced tokens back.
    pub fn to_value(&self, v: &serde_json::Value) -> Result<Value, JsonError> {
        from_json_at(v, 0, self.marker.as_deref())
    }
}

fn write_python(v: &serde_json::Value, marker: Option<&str>, out: &mut String) {
    match v {
        serde_json::Value::String(s) => match marker.and_then(|m| s.strip_prefix(m)) {
            Some("nan") => out.push_str("NaN"),
            Some("inf") => out.push_str("Infinity"),
            Some("-inf") => out.push_str("-Infinity"),
            Some(digits) => out.push_str(digits),
            None => out.push_str(&v.to_string()),
        },
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_python(item, marker, out);
            }
            out.push(']');
        }
        serde_json::Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::from(k.as_str()).to_string());
                out.push(':');
                write_python(item, marker, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `n` when the escaped string token `raw` (quotes included) decodes to text
/// starting with a marker `U+0001 n :`.
fn marker_number(raw: &[u8]) -> Option<u64> {
    // U+0001 can only be written as this escape in valid JSON.
    if !raw.windows(6).any(|w| w == b"\\u0001") {
        return None;
    }
    let text: String = serde_json::from_slice(raw).ok()?;
    let (n, _) = text.strip_prefix('\u{1}')?.split_once(':')?;
    n.parse().ok()
}

/// Walks `b`, reporting the tokens [`PythonJson`] replaces and the string
/// tokens written with escapes. Invalid JSON is left for serde_json to report:
/// this only has to find strings and number/name tokens correctly in valid text.
fn scan(b: &[u8], mut report: impl FnMut(Token<'_>)) {
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let start = i;
                let mut has_escape = false;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        has_escape = true;
                        i += 1;
                    }
                    i += 1;
                }
                i = (i + 1).min(b.len());
                if has_escape {
                    report(Token::EscapedString(&b[start..i]));
                }
            }
            b'N' if b[i..].starts_with(b"NaN") => {
                report(Token::Special(i, i + 3, "nan"));
                i += 3;
            }
            b'I' if b[i..].starts_with(b"Infinity") => {
                report(Token::Special(i, i + 8, "inf"));
                i += 8;
            }
            b'-' if b[i..].starts_with(b"-Infinity") => {
                report(Token::Special(i, i + 9, "-inf"));
                i += 9;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                if let Some(tag) = number_tag(&b[start..i]) {
                    report(Token::Special(start, i, tag));
                }
            }
            _ => i += 1,
        }
    }
}

/// The replacement tag for a number token serde_json would refuse or round:
/// a float literal that overflows (Python's `float()` gives ±inf), or a valid
/// JSON integer outside `i64`/`u64` (Python keeps it exact). `None` for every
/// other token, malformed ones included (serde_json reports those).
fn number_tag(tok: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(tok).ok()?;
    if !is_json_number(tok) {
        return None;
    }
    if tok.iter().any(|c| matches!(c, b'.' | b'e' | b'E')) {
        let f: f64 = text.parse().ok()?;
        return f
            .is_infinite()
            .then_some(if f > 0.0 { "inf" } else { "-inf" });
    }
    (text.parse::<i64>().is_err() && text.parse::<u64>().is_err()).then_some(text)
}

/// JSON's number grammar (Python's `NUMBER_RE`):
/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?`.
fn is_json_number(tok: &[u8]) -> bool {
    fn digits(t: &[u8]) -> usize {
        t.iter().take_while(|c| c.is_ascii_digit()).count()
    }
    let mut i = usize::from(tok.first() == Some(&b'-'));
    let int = digits(&tok[i..]);
    if int == 0 || (int > 1 && tok[i] == b'0') {
        return false;
    }
    i += int;
    if tok.get(i) == Some(&b'.') {
        let frac = digits(&tok[i + 1..]);
        if frac == 0 {
            return false;
        }
        i += 1 + frac;
    }
    if matches!(tok.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(tok.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp = digits(&tok[i..]);
        if exp == 0 {
            return false;
        }
        i += exp;
    }
    i == tok.len()
}

fn from_json_at(
    v: &serde_json::Value,
    depth: usize,
    marker: Option<&str>,
) -> Result<Value, JsonError> {
    if depth > MAX_DEPTH {
        return Err(JsonError::TooDeep);
    }
    Ok(match v {
        serde_json::Value::Null => Value::None,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => number(n),
        serde_json::Value::String(s) => {
            replaced_token(s, marker).unwrap_or_else(|| Value::Str(s.clone()))
        }
        serde_json::Value::Array(items) => Value::List(
            items
                .iter()
                .map(|i| from_json_at(i, depth + 1, marker))
                .collect::<Result<_, _>>()?,
        ),
        serde_json::Value::Object(map) => {
            if let Some(w) = unwrap_kombu(map, marker)? {
                return Ok(w);
            }
            Value::Dict(
                map.iter()
                    .map(|(k, v)| {
                        key_not_replaced(k, marker)?;
                        Ok((Value::Str(k.clone()), from_json_at(v, depth + 1, marker)?))
                    })
                    .collect::<Result<_, JsonError>>()?,
            )
        }
    })
}

/// An object key that is a replaced token was a bare `NaN`/number in key
/// position, which Python's json refuses ("Expecting property name enclosed in
/// double quotes"); no input string can start with the marker.
fn key_not_replaced(key: &str, marker: Option<&str>) -> Result<(), JsonError> {
    match marker {
        Some(m) if key.starts_with(m) => Err(JsonError::Syntax(
            "expecting property name enclosed in double quotes".into(),
        )),
        _ => Ok(()),
    }
}

/// A `"<MARKER>tag"` string [`PythonJson`] put in place of a token.
fn replaced_token(s: &str, marker: Option<&str>) -> Option<Value> {
    let tag = s.strip_prefix(marker?)?;
    Some(match tag {
        "nan" => Value::Float(f64::NAN),
        "inf" => Value::Float(f64::INFINITY),
        "-inf" => Value::Float(f64::NEG_INFINITY),
        digits => Value::BigInt(digits.to_owned()),
    })
}

fn number(n: &Number) -> Value {
    if let Some(i) = n.as_i64() {
        Value::Int(i)
    } else if let Some(u) = n.as_u64() {
        Value::BigInt(u.to_string())
    } else {
        Value::Float(n.as_f64().unwrap_or(f64::NAN))
    }
}

fn bad(kind: &str, reason: impl Into<String>) -> JsonError {
    JsonError::BadWrapper {
        kind: kind.to_owned(),
        reason: reason.into(),
    }
}

fn unwrap_kombu(
    map: &Map<String, serde_json::Value>,
    marker: Option<&str>,
) -> Result<Option<Value>, JsonError> {
    if map.len() != 2 {
        return Ok(None);
    }
    let (Some(kind), Some(value)) = (map.get("__type__"), map.get("__value__")) else {
        return Ok(None);
    };
    let replaced = |v: &serde_json::Value| v.as_str().and_then(|s| replaced_token(s, marker));
    let kind = match kind.as_str() {
        Some(k) if replaced(&serde_json::Value::from(k)).is_none() => k,
        _ => return Err(bad("?", "__type__ is not a string")),
    };
    // A NaN/Infinity/big-integer token as the value: Python's `Decimal(x)`
    // takes it (Decimal('NaN')); every other wrapper wants a string.
    if let Some(token) = replaced(value) {
        return match (kind, token) {
            ("decimal", Value::Float(f)) => Ok(Some(Value::Decimal(
                if f.is_nan() {
                    "NaN"
                } else if f > 0.0 {
                    "Infinity"
                } else {
                    "-Infinity"
                }
                .to_owned(),
            ))),
            ("decimal", Value::BigInt(digits)) => Ok(Some(Value::Decimal(digits))),
            _ => Err(bad(kind, "__value__ is not a string")),
        };
    }
    let text = || {
        value
            .as_str()
            .ok_or_else(|| bad(kind, "__value__ is not a string"))
    };
    let v = match kind {
        "datetime" => parse_datetime(text()?).ok_or_else(|| bad(kind, "not an ISO datetime"))?,
        "date" => Value::Date(
            NaiveDate::parse_from_str(text()?, "%Y-%m-%d").map_err(|e| bad(kind, e.to_string()))?,
        ),
        "time" => Value::Time(
            NaiveTime::parse_from_str(text()?, "%H:%M:%S%.f")
                .map_err(|e| bad(kind, e.to_string()))?,
        ),
        "decimal" => Value::Decimal(text()?.to_owned()),
        "uuid" => {
            let hex = value
                .get("hex")
                .and_then(|h| h.as_str())
                .or_else(|| value.as_str())
                .ok_or_else(|| bad(kind, "no hex"))?;
            Value::Uuid(uuid::Uuid::parse_str(hex).map_err(|e| bad(kind, e.to_string()))?)
        }
        "bytes" => Value::Bytes(
            text()?
                .chars()
                .map(latin1_or_utf8)
                .collect::<Vec<_>>()
                .concat(),
        ),
        "base64" => Value::Bytes(
            base64::engine::general_purpose::STANDARD
                .decode(text()?)
                .map_err(|e| bad(kind, e.to_string()))?,
        ),
        other => return Err(bad(other, "unknown __type__")),
    };
    Ok(Some(v))
}

/// kombu encodes valid-UTF-8 bytes as the decoded text, so re-encode as UTF-8.
fn latin1_or_utf8(c: char) -> Vec<u8> {
    let mut buf = [0u8; 4];
    c.encode_utf8(&mut buf).as_bytes().to_vec()
}

/// Parses an ISO-8601 datetime as Python's `fromisoformat` writes it
/// (naive or with an offset / `Z`).
pub fn parse_datetime(s: &str) -> Option<Value> {
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(Value::DateTime {
            naive: dt.naive_local(),
            offset_seconds: Some(dt.offset().local_minus_utc()),
        });
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%:z"] {
        if let Ok(dt) = DateTime::parse_from_str(s, fmt) {
            return Some(Value::DateTime {
                naive: dt.naive_local(),
                offset_seconds: Some(dt.offset().local_minus_utc()),
            });
        }
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(Value::DateTime {
                naive,
                offset_seconds: None,
            });
        }
    }
    None
}

/// Encodes a [`Value`] as kombu's JSON encoder would.
///
/// A [`Value::Object`] is written as the plain value Python's `json` sees in
/// it ([`super::value::DataObject::plain`]): a signature as its dict, a
/// `PassthroughDataset` as its name. That is what a Python worker would
/// send, and it is lossy for the dataset, as it is in Python.
pub fn to_json(v: &Value) -> serde_json::Value {
    to_json_marked(v, None)
}

/// [`to_json`], writing a non-finite float as the string `"{marker}:{tag}"`
/// when a marker is given (for [`encode`] to turn into Python's tokens), else
/// as `null` (JSON has no such number).
fn to_json_marked(v: &Value, marker: Option<&str>) -> serde_json::Value {
    use serde_json::json;
    let to_json = |v: &Value| to_json_marked(v, marker);
    match v {
        Value::None => serde_json::Value::Null,
        Value::Bool(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::BigInt(s) => s
            .parse::<Number>()
            .map(serde_json::Value::Number)
            .unwrap_or_else(|_| json!(s)),
        Value::Float(f) => match (Number::from_f64(*f), marker) {
            (Some(n), _) => serde_json::Value::Number(n),
            (None, Some(m)) => serde_json::Value::String(format!("{m}:{}", nonfinite_tag(*f))),
            (None, None) => serde_json::Value::Null,
        },
        Value::Str(s) => json!(s),
        Value::Bytes(b) => match std::str::from_utf8(b) {
            Ok(s) => json!({"__type__": "bytes", "__value__": s}),
            Err(_) => json!({"__type__": "base64",
                "__value__": base64::engine::general_purpose::STANDARD.encode(b)}),
        },
        Value::List(items) | Value::Tuple(items) | Value::Set(items) => {
            serde_json::Value::Array(items.iter().map(&to_json).collect())
        }
        Value::Dict(items) => {
            let mut map = Map::new();
            for (k, v) in items {
                map.insert(key_text(k), to_json(v));
            }
            serde_json::Value::Object(map)
        }
        Value::DateTime { .. } => json!({"__type__": "datetime", "__value__": isoformat(v)}),
        Value::Date(d) => {
            json!({"__type__": "date", "__value__": d.format("%Y-%m-%d").to_string()})
        }
        Value::Time(t) => json!({"__type__": "time", "__value__": time_iso(t)}),
        Value::TimeDelta {
            days,
            seconds,
            microseconds,
        } => json!((*days as f64) * 86400.0 + (*seconds as f64) + (*microseconds as f64) / 1e6),
        Value::Decimal(d) => json!({"__type__": "decimal", "__value__": d}),
        Value::Uuid(u) => json!({"__type__": "uuid", "__value__": {"hex": u.simple().to_string()}}),
        // kombu has no wrapper for objects; Python's json writes a str
        // subclass as the str (a PassthroughDataset's inline data is lost)
        // and a dict subclass as the dict (a Signature's dict, which
        // Celery turns back into a signature on receipt). See DataObject::plain.
        Value::Object(o) => to_json(&o.plain()),
    }
}

/// Encodes a [`Value`] as JSON bytes (kombu's `dumps`).
///
/// A NaN or infinite float is written as Python's `json.dumps` writes it
/// (`NaN`, `Infinity`, `-Infinity`; kombu keeps `allow_nan=True`), so a
/// client's `json.loads` gets the float back rather than `None`.
pub fn encode(v: &Value) -> Vec<u8> {
    if !has_non_finite(v) {
        // Serializing a serde_json::Value cannot fail.
        return serde_json::to_vec(&to_json(v)).unwrap_or_default();
    }
    // serde_json cannot write those tokens: write each as a marker string no
    // string of `v` contains, then replace the markers' JSON text.
    let marker = (0u64..)
        .map(|n| format!("\u{1}omw-nonfinite-{n}"))
        .find(|m| !mentions(v, m))
        .unwrap_or_default();
    let mut text = serde_json::to_string(&to_json_marked(v, Some(&marker))).unwrap_or_default();
    for (tag, token) in [("nan", "NaN"), ("inf", "Infinity"), ("-inf", "-Infinity")] {
        let quoted = serde_json::Value::String(format!("{marker}:{tag}")).to_string();
        text = text.replace(&quoted, token);
    }
    text.into_bytes()
}

fn nonfinite_tag(f: f64) -> &'static str {
    if f.is_nan() {
        "nan"
    } else if f > 0.0 {
        "inf"
    } else {
        "-inf"
    }
}

/// True when `v` holds a NaN or infinite float anywhere.
fn has_non_finite(v: &Value) -> bool {
    match v {
        Value::Float(f) => !f.is_finite(),
        Value::List(items) | Value::Tuple(items) | Value::Set(items) => {
            items.iter().any(has_non_finite)
        }
        Value::Dict(items) => items
            .iter()
            .any(|(k, v)| has_non_finite(k) || has_non_finite(v)),
        Value::Object(o) => has_non_finite(&o.plain()),
        _ => false,
    }
}

/// True when a string of `v` (a value, key or object part) contains `needle`.
fn mentions(v: &Value, needle: &str) -> bool {
    match v {
        Value::Str(s) => s.contains(needle),
        Value::Bytes(b) => String::from_utf8_lossy(b).contains(needle),
        Value::List(items) | Value::Tuple(items) | Value::Set(items) => {
            items.iter().any(|i| mentions(i, needle))
        }
        Value::Dict(items) => items
            .iter()
            .any(|(k, v)| mentions(k, needle) || mentions(v, needle)),
        Value::Object(o) => mentions(&o.plain(), needle),
        _ => false,
    }
}

/// JSON object keys must be strings; Python's json turns ints/floats/bools/None into text.
fn key_text(k: &Value) -> String {
    match k {
        Value::Str(s) => s.clone(),
        Value::None => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::BigInt(s) => s.clone(),
        // json.dumps writes a float key with float.__repr__, non-finite ones as its tokens.
        Value::Float(f) if f.is_nan() => "NaN".into(),
        Value::Float(f) if f.is_infinite() => {
            if *f > 0.0 { "Infinity" } else { "-Infinity" }.into()
        }
        Value::Float(f) => super::value::float_repr(*f),
        other => to_json(other).to_string(),
    }
}

fn time_iso(t: &NaiveTime) -> String {
    use chrono::Timelike;
    if t.nanosecond() / 1000 == 0 {
        t.format("%H:%M:%S").to_string()
    } else {
        t.format("%H:%M:%S%.6f").to_string()
    }
}

/// Python's `datetime.isoformat()` for a [`Value::DateTime`] (microseconds
/// omitted when zero, `+HH:MM` offset for aware values).
pub fn isoformat(v: &Value) -> String {
    use chrono::Timelike;
    let Value::DateTime {
        naive,
        offset_seconds,
    } = v
    else {
        return String::new();
    };
    let mut s = if naive.nanosecond() / 1000 == 0 {
        naive.format("%Y-%m-%dT%H:%M:%S").to_string()
    } else {
        naive.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
    };
    if let Some(off) = offset_seconds {
        let sign = if *off < 0 { '-' } else { '+' };
        let a = off.unsigned_abs();
        s.push_str(&format!("{sign}{:02}:{:02}", a / 3600, (a % 3600) / 60));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kombu_wrappers_round_trip() {
        let src = br#"[{"__type__": "datetime", "__value__": "2024-01-02T03:04:05.678901+00:00"},
            {"__type__": "date", "__value__": "2024-01-02"},
            {"__type__": "decimal", "__value__": "1.10"},
            {"__type__": "uuid", "__value__": {"hex": "12345678123456781234567812345678"}},
            {"__type__": "base64", "__value__": "AP9hYg=="},
            {"__type__": "bytes", "__value__": "hello"}]"#;
        let v = decode(src).expect("decodes");
        let items = v.as_seq().expect("list");
        assert!(matches!(
            items[0],
            Value::DateTime {
                offset_seconds: Some(0),
                ..
            }
        ));
        assert_eq!(items[2], Value::Decimal("1.10".into()));
        assert_eq!(items[4], Value::Bytes(vec![0, 0xff, b'a', b'b']));
        assert_eq!(items[5], Value::Bytes(b"hello".to_vec()));
        let back = to_json(&v);
        assert_eq!(back[0]["__value__"], "2024-01-02T03:04:05.678901+00:00");
        assert_eq!(
            back[3]["__value__"]["hex"],
            "12345678123456781234567812345678"
        );
        assert_eq!(back[4]["__value__"], "AP9hYg==");
    }

    #[test]
    fn unknown_wrapper_is_an_error() {
        let err = decode(br#"{"__type__": "pickle", "__value__": "x"}"#).unwrap_err();
        assert!(matches!(err, JsonError::BadWrapper { .. }), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(decode(deep.as_bytes()).is_err());
    }

    #[test]
    fn data_objects_encode_as_python_json_sees_them() {
        use crate::protocol::value::{DataClass, DataObject};
        let sig = Value::Object(Box::new(DataObject::new(
            DataClass::CelerySignature,
            vec![Value::dict([
                ("task", Value::from("t")),
                ("args", Value::Tuple(vec![Value::Int(1)])),
            ])],
            Value::None,
        )));
        let pd = Value::Object(Box::new(DataObject::new(
            DataClass::PassthroughDataset,
            vec![Value::from("./system/passthrough/0123")],
            Value::dict([("_passthrough_data", Value::List(vec![Value::Int(1)]))]),
        )));
        // What kombu.utils.json.dumps writes for the same objects.
        assert_eq!(
            String::from_utf8(encode(&Value::List(vec![sig, pd]))).expect("utf-8"),
            r#"[{"task":"t","args":[1]},"./system/passthrough/0123"]"#
        );
        // Not a data-class shape (hand-built): the parts, no class to import.
        let odd = Value::Object(Box::new(DataObject {
            class: "os.system".into(),
            args: vec![Value::from("id")],
            state: Value::None,
        }));
        assert_eq!(
            to_json(&odd),
            serde_json::json!({"class": "os.system", "args": ["id"], "state": null})
        );
    }

    #[test]
    fn non_finite_floats_encode_as_python_json_writes_them() {
        let v = Value::List(vec![
            Value::Float(f64::NAN),
            Value::dict([("x", Value::Float(f64::INFINITY))]),
            Value::Float(f64::NEG_INFINITY),
            Value::from("\u{1}omw-nonfinite-0:nan"),
            Value::Float(1.5),
        ]);
        // json.dumps([nan, {"x": inf}, -inf, "\x01omw-nonfinite-0:nan", 1.5], separators=(",", ":"))
        assert_eq!(
            String::from_utf8(encode(&v)).expect("utf-8"),
            r#"[NaN,{"x":Infinity},-Infinity,"\u0001omw-nonfinite-0:nan",1.5]"#
        );
        assert_eq!(decode(&encode(&v)).expect("reads back").repr(), v.repr());
        // json.dumps({nan: 1, inf: 2, 1e16: 3, 0.5: 4})
        let keys = Value::Dict(vec![
            (Value::Float(f64::NAN), Value::Int(1)),
            (Value::Float(f64::INFINITY), Value::Int(2)),
            (Value::Float(1e16), Value::Int(3)),
            (Value::Float(0.5), Value::Int(4)),
        ]);
        assert_eq!(
            String::from_utf8(encode(&keys)).expect("utf-8"),
            r#"{"NaN":1,"Infinity":2,"1e+16":3,"0.5":4}"#
        );
        // to_json (a serde_json value) still has no such numbers.
        assert_eq!(to_json(&Value::Float(f64::NAN)), serde_json::Value::Null);
    }

    #[test]
    fn python_json_tokens_and_big_ints_decode() {
        let v =
            decode(br#"[NaN, -Infinity, Infinity, 1e999, 123456789012345678901234567890, "NaN"]"#)
                .expect("decodes");
        assert_eq!(
            v.repr(),
            "[nan, -inf, inf, inf, 123456789012345678901234567890, 'NaN']"
        );
        for bad in ["[nan]", "[-NaN]", "[1.e5]", "[01]", "[Infinit]"] {
            assert!(decode(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn python_tokens_inside_kombu_wrappers() {
        // kombu.utils.json.loads gives Decimal('NaN') / Decimal('<digits>'), and
        // refuses a non-string datetime or a NaN __type__.
        let v = decode(br#"[{"__type__": "decimal", "__value__": NaN}, {"__type__": "decimal", "__value__": 123456789012345678901234567890}]"#)
            .expect("decodes");
        assert_eq!(
            v,
            Value::List(vec![
                Value::Decimal("NaN".into()),
                Value::Decimal("123456789012345678901234567890".into())
            ])
        );
        assert!(decode(br#"{"__type__": "datetime", "__value__": NaN}"#).is_err());
        assert!(decode(br#"{"__type__": NaN, "__value__": 1}"#).is_err());
    }

    #[test]
    fn a_marker_spelled_by_the_input_is_never_taken() {
        let v = decode(br#"["\u00010:nan", "\u00011:inf", NaN]"#).expect("decodes");
        assert_eq!(v.repr(), "['\\x010:nan', '\\x011:inf', nan]");
    }

    #[test]
    fn three_keys_is_a_plain_dict() {
        let v = decode(br#"{"__type__": "x", "__value__": 1, "y": 2}"#).expect("decodes");
        assert_eq!(v.get("y"), Some(&Value::Int(2)));
    }
}
