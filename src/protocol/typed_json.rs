//! A lossless, typed JSON form of [`Value`], for handing task arguments to a
//! Python child process and reading back what it returns.
//!
//! Why not pickle: the child rebuilds Python objects from this with its own
//! small decoder, so nothing on either side ever unpickles. Why not kombu's
//! JSON ([`super::json`]): it is lossy (tuples become lists, dict keys become
//! text, a `PassthroughDataset` becomes its name). This form keeps every
//! [`Value`] variant apart.
//!
//! The format (a Python peer implements the same, so it is fixed):
//!
//! | [`Value`] | typed JSON |
//! |---|---|
//! | `None` / `Bool` / `Int` / `Str` / `List` | `null` / `true`,`false` / integer / string / array |
//! | `Float` | a number that always has a `.` or an exponent (so Python's `json.loads` gives a `float`); NaN and ±inf as `{"$float": "nan" \| "inf" \| "-inf"}` |
//! | `Tuple` / `Set` | `{"$tuple": [..]}` / `{"$set": [..]}` |
//! | `Dict` (every dict, any key type, in order) | `{"$dict": [[k, v], ...]}` |
//! | `Bytes` | `{"$bytes": "<standard base64>"}` |
//! | `BigInt` | `{"$int": "<decimal text>"}` |
//! | `DateTime` | `{"$datetime": "YYYY-MM-DDTHH:MM:SS.ffffff[±HH:MM[:SS]]"}` (`datetime.fromisoformat` reads it) |
//! | `Date` / `Time` | `{"$date": "YYYY-MM-DD"}` / `{"$time": "HH:MM:SS.ffffff"}` |
//! | `TimeDelta` | `{"$timedelta": [days, seconds, microseconds]}` |
//! | `Decimal` / `Uuid` | `{"$decimal": "<text>"}` / `{"$uuid": "<canonical 8-4-4-4-12>"}` |
//! | `Object` | `{"$object": {"class": "module.QualName", "args": [..], "state": <value>}}` |
//!
//! Every non-JSON-native value is an object with exactly one key starting with
//! `$`; a plain JSON object never appears. [`from_typed_json`] is strict: it
//! accepts exactly this (plus a 32-hex-digit `$uuid` and a fraction of 0–6
//! digits in times), refuses an `$object` outside the data-class allow-list
//! ([`DataClass`]) or in the wrong shape, and bounds nesting.
//!
//! Integers outside `i64` must arrive as `$int`: a bare JSON integer beyond
//! `u64` has already become a float when serde_json parsed the text.

use base64::Engine as _;
use chrono::{NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use serde_json::{json, Map, Number};

use super::value::{DataClass, DataObject, Value};

/// Deepest [`Value`] nesting [`from_typed_json`] accepts (as the JSON and
/// pickle decoders do). Typed JSON text nests up to three JSON levels per
/// Python level (`{"$dict": [[k, v]]}`), so text parsed by serde_json's
/// default 128-level parser holds about 40 levels of dicts.
pub const MAX_DEPTH: usize = super::json::MAX_DEPTH;

/// Why typed JSON could not be turned back into a [`Value`]. Each variant
/// says where (a JSON-pointer-like path) and what was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TypedJsonError {
    /// A JSON object that is not a one-key `{"$tag": ...}` wrapper.
    #[error("typed JSON at {path}: a plain JSON object is not a value (expected one \"$\" key, got {keys})")]
    NotTyped {
        /// Where.
        path: String,
        /// The keys found.
        keys: String,
    },
    /// A `$tag` this format does not define.
    #[error("typed JSON at {path}: unknown tag {tag:?}")]
    UnknownTag {
        /// Where.
        path: String,
        /// The key.
        tag: String,
    },
    /// A known tag with a payload of the wrong form.
    #[error("typed JSON at {path}: bad {tag} payload: {reason}")]
    BadPayload {
        /// Where.
        path: String,
        /// The tag, e.g. `$datetime`.
        tag: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A JSON number that is not an `i64`, `u64` or finite float.
    #[error("typed JSON at {path}: unrepresentable number {text}")]
    BadNumber {
        /// Where.
        path: String,
        /// The number as text.
        text: String,
    },
    /// An `$object` whose class is not an allow-listed data class, or whose
    /// arguments/state are not that class's shape.
    #[error("typed JSON at {path}: refused object: {reason}")]
    ForbiddenObject {
        /// Where.
        path: String,
        /// Why.
        reason: String,
    },
    /// Nested deeper than [`MAX_DEPTH`].
    #[error("typed JSON nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

// ---- Value -> typed JSON ---------------------------------------------------

/// The typed JSON form of `v` (see the module docs for the format).
pub fn to_typed_json(v: &Value) -> serde_json::Value {
    let seq = |items: &[Value]| serde_json::Value::Array(items.iter().map(to_typed_json).collect());
    match v {
        Value::None => serde_json::Value::Null,
        Value::Bool(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::BigInt(s) => tagged("$int", json!(s)),
        Value::Float(f) => match Number::from_f64(*f) {
            // serde_json writes a finite f64 with a `.` or an exponent
            // (`1.0`, `1e16`), so Python reads a float back.
            Some(n) => serde_json::Value::Number(n),
            None => tagged(
                "$float",
                json!(if f.is_nan() {
                    "nan"
                } else if *f > 0.0 {
                    "inf"
                } else {
                    "-inf"
                }),
            ),
        },
        Value::Str(s) => json!(s),
        Value::Bytes(b) => tagged(
            "$bytes",
            json!(base64::engine::general_purpose::STANDARD.encode(b)),
        ),
        Value::List(items) => seq(items),
        Value::Tuple(items) => tagged("$tuple", seq(items)),
        Value::Set(items) => tagged("$set", seq(items)),
        Value::Dict(items) => tagged(
            "$dict",
            serde_json::Value::Array(
                items
                    .iter()
                    .map(|(k, v)| json!([to_typed_json(k), to_typed_json(v)]))
                    .collect(),
            ),
        ),
        Value::DateTime {
            naive,
            offset_seconds,
        } => tagged("$datetime", json!(datetime_text(naive, *offset_seconds))),
        Value::Date(d) => tagged("$date", json!(d.format("%Y-%m-%d").to_string())),
        Value::Time(t) => tagged("$time", json!(time_text(t))),
        Value::TimeDelta {
            days,
            seconds,
            microseconds,
        } => tagged("$timedelta", json!([days, seconds, microseconds])),
        Value::Decimal(d) => tagged("$decimal", json!(d)),
        Value::Uuid(u) => tagged("$uuid", json!(u.hyphenated().to_string())),
        Value::Object(o) => tagged(
            "$object",
            json!({
                "class": o.class,
                "args": seq(&o.args),
                "state": to_typed_json(&o.state),
            }),
        ),
    }
}

fn tagged(tag: &str, payload: serde_json::Value) -> serde_json::Value {
    let mut m = Map::new();
    m.insert(tag.to_owned(), payload);
    serde_json::Value::Object(m)
}

/// `HH:MM:SS.ffffff`: always six fraction digits, as `isoformat(timespec='microseconds')`.
fn time_text(t: &NaiveTime) -> String {
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        t.hour(),
        t.minute(),
        t.second().min(59),
        (t.nanosecond() / 1000).min(999_999)
    )
}

fn datetime_text(naive: &NaiveDateTime, offset_seconds: Option<i32>) -> String {
    let mut s = format!(
        "{}T{}",
        naive.date().format("%Y-%m-%d"),
        time_text(&naive.time())
    );
    if let Some(off) = offset_seconds {
        let sign = if off < 0 { '-' } else { '+' };
        let a = off.unsigned_abs();
        s.push_str(&format!("{sign}{:02}:{:02}", a / 3600, (a % 3600) / 60));
        if a % 60 != 0 {
            s.push_str(&format!(":{:02}", a % 60));
        }
    }
    s
}

// ---- typed JSON -> Value ---------------------------------------------------

/// The [`Value`] a typed JSON document stands for; strict (see the module docs).
pub fn from_typed_json(v: &serde_json::Value) -> Result<Value, TypedJsonError> {
    let mut path = String::new();
    decode_at(v, 0, &mut path)
}

fn decode_at(
    v: &serde_json::Value,
    depth: usize,
    path: &mut String,
) -> Result<Value, TypedJsonError> {
    if depth > MAX_DEPTH {
        return Err(TypedJsonError::TooDeep);
    }
    Ok(match v {
        serde_json::Value::Null => Value::None,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => number(n, path)?,
        serde_json::Value::String(s) => Value::Str(s.clone()),
        serde_json::Value::Array(items) => Value::List(items_at(items, depth, path)?),
        serde_json::Value::Object(map) => {
            let (tag, payload) = match map.iter().next() {
                Some((k, p)) if map.len() == 1 && k.starts_with('$') => (k.as_str(), p),
                _ => {
                    return Err(TypedJsonError::NotTyped {
                        path: shown(path),
                        keys: format!("{:?}", map.keys().collect::<Vec<_>>()),
                    })
                }
            };
            let len = path.len();
            path.push('/');
            path.push_str(tag);
            let out = tagged_value(tag, payload, depth, path);
            path.truncate(len);
            out?
        }
    })
}

fn shown(path: &str) -> String {
    if path.is_empty() {
        "/".to_owned()
    } else {
        path.to_owned()
    }
}

fn number(n: &Number, path: &str) -> Result<Value, TypedJsonError> {
    if let Some(i) = n.as_i64() {
        Ok(Value::Int(i))
    } else if let Some(u) = n.as_u64() {
        // Above i64::MAX: exact, so keep it (a Python peer should send `$int`).
        Ok(Value::BigInt(u.to_string()))
    } else {
        match n.as_f64() {
            Some(f) if f.is_finite() => Ok(Value::Float(f)),
            _ => Err(TypedJsonError::BadNumber {
                path: shown(path),
                text: n.to_string(),
            }),
        }
    }
}

fn items_at(
    items: &[serde_json::Value],
    depth: usize,
    path: &mut String,
) -> Result<Vec<Value>, TypedJsonError> {
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let len = path.len();
        path.push_str(&format!("/{i}"));
        let v = decode_at(item, depth + 1, path);
        path.truncate(len);
        out.push(v?);
    }
    Ok(out)
}

/// Python refuses unhashable dict keys and set items; so does this decoder,
/// rather than hand back a value Python could not have sent.
fn check_hashable(v: &Value, tag: &'static str, path: &str) -> Result<(), TypedJsonError> {
    let unhashable = match v {
        Value::List(_) | Value::Dict(_) | Value::Set(_) => true,
        Value::Object(o) => {
            o.class == DataClass::CelerySignature.path() || o.class == DataClass::NdArray.path()
        }
        _ => false,
    };
    if unhashable {
        return Err(TypedJsonError::BadPayload {
            path: shown(path),
            tag,
            reason: format!("unhashable type: '{}'", v.type_name()),
        });
    }
    Ok(())
}

fn tagged_value(
    tag: &str,
    payload: &serde_json::Value,
    depth: usize,
    path: &mut String,
) -> Result<Value, TypedJsonError> {
    // Resolve the tag to its static name first, so errors can carry it.
    let tag: &'static str = match tag {
        "$float" => "$float",
        "$int" => "$int",
        "$tuple" => "$tuple",
        "$set" => "$set",
        "$dict" => "$dict",
        "$bytes" => "$bytes",
        "$datetime" => "$datetime",
        "$date" => "$date",
        "$time" => "$time",
        "$timedelta" => "$timedelta",
        "$decimal" => "$decimal",
        "$uuid" => "$uuid",
        "$object" => "$object",
        other => {
            return Err(TypedJsonError::UnknownTag {
                path: shown(path),
                tag: other.to_owned(),
            })
        }
    };
    let bad = |path: &str, reason: &str| TypedJsonError::BadPayload {
        path: shown(path),
        tag,
        reason: reason.to_owned(),
    };
    let text = |path: &str| {
        payload
            .as_str()
            .ok_or_else(|| bad(path, "expected a string"))
    };
    let array = |path: &str| {
        payload
            .as_array()
            .ok_or_else(|| bad(path, "expected an array"))
    };
    Ok(match tag {
        "$float" => match text(path)? {
            "nan" => Value::Float(f64::NAN),
            "inf" => Value::Float(f64::INFINITY),
            "-inf" => Value::Float(f64::NEG_INFINITY),
            _ => return Err(bad(path, "expected \"nan\", \"inf\" or \"-inf\"")),
        },
        "$int" => int_from_text(text(path)?).ok_or_else(|| bad(path, "not a decimal integer"))?,
        "$tuple" => Value::Tuple(items_at(array(path)?, depth, path)?),
        "$set" => {
            let items = items_at(array(path)?, depth, path)?;
            for i in &items {
                check_hashable(i, tag, path)?;
            }
            Value::Set(items)
        }
        "$dict" => {
            let pairs = array(path)?;
            let mut out = Vec::with_capacity(pairs.len());
            for (i, pair) in pairs.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("/{i}"));
                let kv = match pair.as_array().map(Vec::as_slice) {
                    Some([k, v]) => (|| {
                        let k = decode_at(k, depth + 1, path)?;
                        check_hashable(&k, tag, path)?;
                        Ok((k, decode_at(v, depth + 1, path)?))
                    })(),
                    _ => Err(bad(path, "each item must be a [key, value] array")),
                };
                path.truncate(len);
                out.push(kv?);
            }
            Value::Dict(out)
        }
        "$bytes" => Value::Bytes(
            base64::engine::general_purpose::STANDARD
                .decode(text(path)?)
                .map_err(|e| bad(path, &e.to_string()))?,
        ),
        "$datetime" => {
            let s = text(path)?;
            let (naive, offset_seconds) = parse_datetime(s)
                .ok_or_else(|| bad(path, "not YYYY-MM-DDTHH:MM:SS[.ffffff][±HH:MM[:SS]]"))?;
            Value::DateTime {
                naive,
                offset_seconds,
            }
        }
        "$date" => Value::Date(parse_date(text(path)?).ok_or_else(|| bad(path, "not YYYY-MM-DD"))?),
        "$time" => {
            Value::Time(parse_time(text(path)?).ok_or_else(|| bad(path, "not HH:MM:SS[.ffffff]"))?)
        }
        "$timedelta" => {
            let parts: Option<Vec<i64>> = array(path)?.iter().map(|x| x.as_i64()).collect();
            match parts.as_deref() {
                Some(&[days, seconds, microseconds])
                    if days.abs() <= 999_999_999
                        && (0..86_400).contains(&seconds)
                        && (0..1_000_000).contains(&microseconds) =>
                {
                    Value::TimeDelta {
                        days,
                        seconds,
                        microseconds,
                    }
                }
                _ => {
                    return Err(bad(
                        path,
                        "expected [days, seconds, microseconds] as Python normalizes them",
                    ))
                }
            }
        }
        "$decimal" => {
            let s = text(path)?;
            if !is_decimal_literal(s) {
                return Err(bad(path, "not a decimal.Decimal literal"));
            }
            Value::Decimal(s.to_owned())
        }
        "$uuid" => {
            let s = text(path)?;
            if s.len() != 32 && s.len() != 36 {
                return Err(bad(path, "expected 32 hex digits or the 8-4-4-4-12 form"));
            }
            Value::Uuid(uuid::Uuid::try_parse(s).map_err(|e| bad(path, &e.to_string()))?)
        }
        "$object" => object(payload, depth, path)?,
        _ => {
            return Err(TypedJsonError::UnknownTag {
                path: shown(path),
                tag: tag.to_owned(),
            })
        }
    })
}

fn object(
    payload: &serde_json::Value,
    depth: usize,
    path: &mut String,
) -> Result<Value, TypedJsonError> {
    let bad = |path: &str, reason: &str| TypedJsonError::BadPayload {
        path: shown(path),
        tag: "$object",
        reason: reason.to_owned(),
    };
    let map = payload
        .as_object()
        .ok_or_else(|| bad(path, "expected an object"))?;
    if map.len() != 3 {
        return Err(bad(path, "expected exactly the keys class, args, state"));
    }
    let (Some(class), Some(args), Some(state)) = (
        map.get("class").and_then(|c| c.as_str()),
        map.get("args").and_then(|a| a.as_array()),
        map.get("state"),
    ) else {
        return Err(bad(path, "expected class (string), args (array) and state"));
    };
    // Refuse an unknown class before decoding anything inside it.
    if DataClass::from_path(class).is_none() {
        return Err(TypedJsonError::ForbiddenObject {
            path: shown(path),
            reason: format!("{class} is not an allow-listed data class"),
        });
    }
    let len = path.len();
    path.push_str("/args");
    let args = items_at(args, depth, path);
    path.truncate(len);
    path.push_str("/state");
    let state = decode_at(state, depth + 1, path);
    path.truncate(len);
    let obj = DataObject {
        class: class.to_owned(),
        args: args?,
        state: state?,
    };
    obj.data_class()
        .map_err(|e| TypedJsonError::ForbiddenObject {
            path: shown(path),
            reason: e.to_string(),
        })?;
    Ok(Value::Object(Box::new(obj)))
}

/// `-?[0-9]+` as `Int` when it fits, else canonical `BigInt` text.
fn int_from_text(s: &str) -> Option<Value> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let trimmed = digits.trim_start_matches('0');
    let text = match (neg, trimmed.is_empty()) {
        (_, true) => "0".to_owned(),
        (true, false) => format!("-{trimmed}"),
        (false, false) => trimmed.to_owned(),
    };
    Some(match text.parse::<i64>() {
        Ok(i) => Value::Int(i),
        Err(_) => Value::BigInt(text),
    })
}

/// What `decimal.Decimal(text)` accepts (without `_` separators or
/// surrounding spaces): a signed number with optional fraction and
/// exponent, `Infinity`/`Inf`, or `NaN`/`sNaN` with optional digits.
fn is_decimal_literal(s: &str) -> bool {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let lower = body.to_ascii_lowercase();
    if matches!(lower.as_str(), "inf" | "infinity") {
        return true;
    }
    if let Some(rest) = lower
        .strip_prefix("snan")
        .or_else(|| lower.strip_prefix("nan"))
    {
        return rest.bytes().all(|b| b.is_ascii_digit());
    }
    let (mantissa, exponent) = match lower.split_once('e') {
        Some((m, e)) => (m, Some(e)),
        None => (lower.as_str(), None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = (!int.is_empty() || !frac.is_empty()) && digits(int) && digits(frac);
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    mantissa_ok && exponent_ok
}

fn two_digits(b: &[u8]) -> Option<u32> {
    match b {
        [a, c] if a.is_ascii_digit() && c.is_ascii_digit() => {
            Some(u32::from(a - b'0') * 10 + u32::from(c - b'0'))
        }
        _ => None,
    }
}

/// Exactly `YYYY-MM-DD`.
fn parse_date(s: &str) -> Option<NaiveDate> {
    let b = s.as_bytes();
    if b.len() != 10 || b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    let year = b.get(..4)?;
    if !year.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let y: i32 = std::str::from_utf8(year).ok()?.parse().ok()?;
    NaiveDate::from_ymd_opt(y, two_digits(b.get(5..7)?)?, two_digits(b.get(8..10)?)?)
}

/// `HH:MM:SS` with an optional `.` and 1–6 fraction digits (what
/// `time.isoformat()` writes for any timespec of seconds or finer).
fn parse_time(s: &str) -> Option<NaiveTime> {
    let b = s.as_bytes();
    if b.len() < 8 || b.get(2) != Some(&b':') || b.get(5) != Some(&b':') {
        return None;
    }
    let (h, m, sec) = (
        two_digits(b.get(0..2)?)?,
        two_digits(b.get(3..5)?)?,
        two_digits(b.get(6..8)?)?,
    );
    let micro = match b.get(8..)? {
        [] => 0,
        [b'.', frac @ ..]
            if (1..=6).contains(&frac.len()) && frac.iter().all(u8::is_ascii_digit) =>
        {
            let digits: u32 = std::str::from_utf8(frac).ok()?.parse().ok()?;
            digits * 10u32.pow(6 - u32::try_from(frac.len()).ok()?)
        }
        _ => return None,
    };
    NaiveTime::from_hms_micro_opt(h, m, sec, micro)
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,6}]` and an optional `±HH:MM[:SS]` offset
/// strictly within ±24h.
fn parse_datetime(s: &str) -> Option<(NaiveDateTime, Option<i32>)> {
    let date = parse_date(s.get(..10)?)?;
    let rest = s.get(10..)?.strip_prefix('T')?;
    let (time, offset) = match rest.find(['+', '-']) {
        Some(i) => (rest.get(..i)?, Some(rest.get(i..)?)),
        None => (rest, None),
    };
    let time = parse_time(time)?;
    let offset = match offset {
        None => None,
        Some(o) => {
            let b = o.as_bytes();
            let sign = if b.first() == Some(&b'-') { -1 } else { 1 };
            let (h, m, sec) = match b.get(1..)? {
                [h1, h2, b':', m1, m2] => (two_digits(&[*h1, *h2])?, two_digits(&[*m1, *m2])?, 0),
                [h1, h2, b':', m1, m2, b':', s1, s2] => (
                    two_digits(&[*h1, *h2])?,
                    two_digits(&[*m1, *m2])?,
                    two_digits(&[*s1, *s2])?,
                ),
                _ => return None,
            };
            if m > 59 || sec > 59 {
                return None;
            }
            let total = i32::try_from(h * 3600 + m * 60 + sec).ok()?;
            if total >= 86_400 {
                return None;
            }
            Some(sign * total)
        }
    };
    Some((NaiveDateTime::new(date, time), offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn dt(us: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(2024, 1, 2)
            .and_then(|d| d.and_hms_micro_opt(3, 4, 5, us))
            .expect("valid")
    }

    fn every_variant() -> Vec<Value> {
        vec![
            Value::None,
            Value::Bool(true),
            Value::Bool(false),
            Value::Int(i64::MIN),
            Value::Int(0),
            Value::BigInt("-123456789012345678901234567890".into()),
            Value::BigInt("9223372036854775808".into()),
            Value::Float(1.0),
            Value::Float(-0.0),
            Value::Float(1e16),
            Value::Float(0.1),
            Value::Float(5e-324),
            Value::Float(f64::MAX),
            Value::Float(f64::INFINITY),
            Value::Float(f64::NEG_INFINITY),
            Value::Str("it's \"x\"\n\u{0}ü😀 $dict".into()),
            Value::Bytes(vec![0, 0xff, b'a']),
            Value::Bytes(vec![]),
            Value::List(vec![Value::Int(1), Value::List(vec![])]),
            Value::Tuple(vec![]),
            Value::Tuple(vec![Value::Int(1)]),
            Value::Set(vec![Value::Int(1), Value::from("a")]),
            Value::Dict(vec![]),
            Value::Dict(vec![
                (Value::Int(1), Value::None),
                (
                    Value::Tuple(vec![Value::Int(1), Value::Int(2)]),
                    Value::Float(3.5),
                ),
                (Value::None, Value::Bool(true)),
                (Value::from("$tuple"), Value::dict([("a", Value::Int(1))])),
            ]),
            Value::DateTime {
                naive: dt(678_901),
                offset_seconds: None,
            },
            Value::DateTime {
                naive: dt(0),
                offset_seconds: Some(0),
            },
            Value::DateTime {
                naive: dt(1),
                offset_seconds: Some(-18_000),
            },
            Value::DateTime {
                naive: dt(1),
                offset_seconds: Some(19_815),
            },
            Value::Date(dt(0).date()),
            Value::Time(dt(678_901).time()),
            Value::Time(NaiveTime::from_hms_opt(0, 0, 0).expect("valid")),
            Value::TimeDelta {
                days: -1,
                seconds: 5,
                microseconds: 7,
            },
            Value::Decimal("1.10".into()),
            Value::Decimal("-Infinity".into()),
            Value::Decimal("1E+3".into()),
            Value::Uuid(uuid::Uuid::from_u128(
                0x1234_5678_1234_5678_1234_5678_1234_5678,
            )),
            Value::Object(Box::new(DataObject::new(
                DataClass::PassthroughDataset,
                vec![Value::from("./system/passthrough/0123")],
                Value::dict([(
                    "_passthrough_data",
                    Value::List(vec![Value::List(vec![Value::Int(1), Value::Int(2)])]),
                )]),
            ))),
            Value::Object(Box::new(DataObject::new(
                DataClass::PassthroughDataset,
                vec![Value::from("./system/passthrough/0123")],
                Value::None,
            ))),
            Value::Object(Box::new(DataObject::new(
                DataClass::CelerySignature,
                vec![Value::dict([
                    ("task", Value::from("tasks.add")),
                    ("args", Value::Tuple(vec![Value::Int(1)])),
                    ("subtask_type", Value::None),
                ])],
                Value::None,
            ))),
        ]
    }

    /// Through text, as it travels: serialize, parse, decode.
    fn through_text(v: &Value) -> Value {
        let text = serde_json::to_string(&to_typed_json(v)).expect("serializes");
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("parses");
        from_typed_json(&parsed).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn every_variant_round_trips() {
        for v in every_variant() {
            assert_eq!(through_text(&v), v, "{}", v.repr());
        }
        // NaN != NaN, so separately.
        let nan = through_text(&Value::Float(f64::NAN));
        assert!(matches!(nan, Value::Float(f) if f.is_nan()), "{nan:?}");
    }

    /// Every finite double survives the trip through text exactly (this needs
    /// serde_json's `float_roundtrip` feature; without it about a third of
    /// random doubles come back an ulp off).
    #[test]
    fn floats_are_exact_through_text() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = f64::from_bits(x);
            if f.is_finite() {
                assert_eq!(through_text(&Value::Float(f)), Value::Float(f), "{f:e}");
            }
        }
    }

    #[test]
    fn the_documented_forms() {
        let cases: Vec<(Value, serde_json::Value)> = vec![
            (Value::Float(1.0), json!(1.0)),
            (Value::Float(f64::NAN), json!({"$float": "nan"})),
            (Value::Float(f64::NEG_INFINITY), json!({"$float": "-inf"})),
            (
                Value::BigInt("-99999999999999999999".into()),
                json!({"$int": "-99999999999999999999"}),
            ),
            (Value::Tuple(vec![Value::Int(1)]), json!({"$tuple": [1]})),
            (
                Value::dict([("a", Value::Int(1))]),
                json!({"$dict": [["a", 1]]}),
            ),
            (Value::Bytes(vec![0, 0xff]), json!({"$bytes": "AP8="})),
            (
                Value::DateTime {
                    naive: dt(0),
                    offset_seconds: Some(5 * 3600 + 1800),
                },
                json!({"$datetime": "2024-01-02T03:04:05.000000+05:30"}),
            ),
            (
                Value::DateTime {
                    naive: dt(7),
                    offset_seconds: Some(-3600),
                },
                json!({"$datetime": "2024-01-02T03:04:05.000007-01:00"}),
            ),
            (Value::Date(dt(0).date()), json!({"$date": "2024-01-02"})),
            (
                Value::Time(dt(5).time()),
                json!({"$time": "03:04:05.000005"}),
            ),
            (
                Value::TimeDelta {
                    days: -1,
                    seconds: 5,
                    microseconds: 7,
                },
                json!({"$timedelta": [-1, 5, 7]}),
            ),
            (
                Value::Uuid(uuid::Uuid::from_u128(1)),
                json!({"$uuid": "00000000-0000-0000-0000-000000000001"}),
            ),
            (
                Value::Object(Box::new(DataObject::new(
                    DataClass::CelerySignature,
                    vec![Value::dict([("task", Value::from("t"))])],
                    Value::None,
                ))),
                json!({"$object": {"class": "celery.canvas.signature",
                    "args": [{"$dict": [["task", "t"]]}], "state": null}}),
            ),
        ];
        for (v, want) in cases {
            assert_eq!(to_typed_json(&v), want, "{}", v.repr());
        }
        // Floats always carry a `.` or an exponent in the text.
        for f in [1.0, 1e16, 1e300, -0.0, 123456789.0] {
            let text = serde_json::to_string(&to_typed_json(&Value::Float(f))).expect("text");
            assert!(text.contains(['.', 'e', 'E']), "{text}");
        }
    }

    #[test]
    fn lenient_only_where_python_differs() {
        let ok = |j: serde_json::Value| from_typed_json(&j).unwrap_or_else(|e| panic!("{j}: {e}"));
        assert_eq!(
            ok(json!({"$uuid": "00000000000000000000000000000001"})),
            Value::Uuid(uuid::Uuid::from_u128(1))
        );
        assert_eq!(
            ok(json!({"$datetime": "2024-01-02T03:04:05"})),
            Value::DateTime {
                naive: dt(0),
                offset_seconds: None
            }
        );
        assert_eq!(
            ok(json!({"$datetime": "2024-01-02T03:04:05.5+00:00:30"})),
            Value::DateTime {
                naive: dt(500_000),
                offset_seconds: Some(30)
            }
        );
        assert_eq!(ok(json!({"$int": "-0012"})), Value::Int(-12));
        assert_eq!(
            ok(json!(18446744073709551615_u64)),
            Value::BigInt("18446744073709551615".into())
        );
    }

    #[test]
    fn strict_refusals() {
        for (j, want) in [
            (json!({"a": 1}), "plain JSON object"),
            (json!({"$tuple": [], "$set": []}), "plain JSON object"),
            (json!({"$list": []}), "unknown tag"),
            (json!({"$float": "NaN"}), "bad $float"),
            (json!({"$int": "1.5"}), "bad $int"),
            (json!({"$int": ""}), "bad $int"),
            (json!({"$bytes": "AP8"}), "bad $bytes"),
            (json!({"$dict": [[1]]}), "[key, value]"),
            (json!({"$dict": [[[1], 2]]}), "unhashable type: 'list'"),
            (json!({"$set": [{"$dict": []}]}), "unhashable type: 'dict'"),
            (json!({"$datetime": "2024-01-02 03:04:05"}), "bad $datetime"),
            (
                json!({"$datetime": "2024-01-02T03:04:05Z"}),
                "bad $datetime",
            ),
            (
                json!({"$datetime": "2024-01-02T03:04:05+24:00"}),
                "bad $datetime",
            ),
            (
                json!({"$datetime": "2024-01-02T03:04:05.1234567"}),
                "bad $datetime",
            ),
            (json!({"$date": "2024-1-02"}), "bad $date"),
            (json!({"$date": "2024-02-30"}), "bad $date"),
            (json!({"$time": "25:00:00"}), "bad $time"),
            (json!({"$timedelta": [0, 86400, 0]}), "bad $timedelta"),
            (json!({"$timedelta": [0, 0]}), "bad $timedelta"),
            (json!({"$decimal": "1.2.3"}), "bad $decimal"),
            (json!({"$decimal": ""}), "bad $decimal"),
            (
                json!({"$uuid": "{00000000-0000-0000-0000-000000000001}"}),
                "bad $uuid",
            ),
            (
                json!({"$object": {"class": "os.system", "args": ["id"], "state": null}}),
                "os.system is not an allow-listed data class",
            ),
            (
                json!({"$object": {"class": "celery.canvas.Signature", "args": [{"$dict": []}], "state": null}}),
                "celery.canvas.Signature is not an allow-listed data class",
            ),
            (
                json!({"$object": {"class": "celery.canvas.signature", "args": [[]], "state": null}}),
                "expects exactly one dict argument",
            ),
            (
                json!({"$object": {"class": "celery.canvas.signature", "args": [{"$dict": []}], "state": {"$dict": []}}}),
                "takes no state",
            ),
            (
                json!({"$object": {"class": "omegaml.mixins.store.passthrough.PassthroughDataset",
                "args": ["a", "b"], "state": null}}),
                "expects exactly one str argument",
            ),
            (
                json!({"$object": {"class": "omegaml.mixins.store.passthrough.PassthroughDataset",
                "args": ["a"], "state": [1]}}),
                "state must be a dict or None",
            ),
            (
                json!({"$object": {"class": "celery.canvas.signature", "args": []}}),
                "class, args, state",
            ),
        ] {
            let err = from_typed_json(&j).expect_err(&j.to_string()).to_string();
            assert!(err.contains(want), "{j}: {err}");
        }
        // The path says where.
        let err = from_typed_json(&json!([1, {"$tuple": [{"x": 1}]}])).expect_err("plain");
        assert!(err.to_string().contains("at /1/$tuple/0:"), "{err}");
    }

    #[test]
    fn nesting_is_bounded() {
        let mut j = json!(1);
        for _ in 0..(MAX_DEPTH + 5) {
            j = json!({"$tuple": [j]});
        }
        assert_eq!(from_typed_json(&j), Err(TypedJsonError::TooDeep));
    }

    #[test]
    fn decoded_cpython_fixtures_round_trip() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pickles");
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("manifest.json")).expect("manifest.json"),
        )
        .expect("manifest JSON");
        let files = manifest["files"].as_array().expect("files");
        let mut objects = 0;
        for f in files {
            let name = f["file"].as_str().expect("file");
            let data = std::fs::read(dir.join(name)).expect("fixture");
            let v = super::super::pickle::decode(&data).unwrap_or_else(|e| panic!("{name}: {e}"));
            if to_typed_json(&v).to_string().contains("\"$object\"") {
                objects += 1;
            }
            let back = through_text(&v);
            // Floats fixtures hold inf but no NaN, so equality is exact.
            assert_eq!(back, v, "{name}");
        }
        assert!(
            objects >= 8,
            "the data-class fixtures are present ({objects})"
        );
    }
}
