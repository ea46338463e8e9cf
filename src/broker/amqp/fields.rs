//! The AMQP field-table codec: `application_headers` (and queue arguments)
//! ↔ [`Headers`] / [`Value`].
//!
//! Celery puts the whole task header set (id, task name, ETA, retries, …)
//! in AMQP headers, so these bytes must be exactly what py-amqp writes and
//! every type py-amqp or RabbitMQ may send must decode. Kept separate from
//! the connection code because it is pure, and tested as such.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime};
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};

use super::short;
use crate::broker::BrokerError;
use crate::protocol::{Headers, Value};

/// Deepest nesting converted between field tables and [`Value`]s.
const MAX_DEPTH: usize = 64;

/// AMQP `application_headers` → [`Headers`], decoding every field type
/// py-amqp and RabbitMQ write (including `V` voids and nested tables/arrays).
pub fn table_to_headers(t: &FieldTable) -> Headers {
    t.inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), amqp_to_value(v)))
        .collect()
}

/// [`Headers`] → AMQP field table, using the types py-amqp would choose.
pub fn headers_to_table(h: &Headers) -> Result<FieldTable, BrokerError> {
    let mut map = BTreeMap::new();
    for (k, v) in h {
        map.insert(short(k)?, value_to_amqp_at(v, 0)?);
    }
    Ok(FieldTable::from(map))
}

/// One AMQP field value → [`Value`]. Like py-amqp: long strings become `str`
/// when they are UTF-8 (bytes otherwise), timestamps naive UTC datetimes,
/// decimals `Decimal(value) / 10**scale`.
pub fn amqp_to_value(v: &AMQPValue) -> Value {
    amqp_to_value_at(v, 0)
}

fn amqp_to_value_at(v: &AMQPValue, depth: usize) -> Value {
    if depth > MAX_DEPTH {
        return Value::None;
    }
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::ShortInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::ShortUInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::LongInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::LongUInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::LongLongInt(i) => Value::Int(*i),
        AMQPValue::Float(f) => Value::Float(f64::from(*f)),
        AMQPValue::Double(f) => Value::Float(*f),
        AMQPValue::DecimalValue(d) => Value::Decimal(decimal_text(d)),
        AMQPValue::ShortString(s) => Value::Str(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => Value::Str(text.to_owned()),
            Err(_) => Value::Bytes(s.as_bytes().to_vec()),
        },
        AMQPValue::ByteArray(b) => Value::Bytes(b.as_slice().to_vec()),
        AMQPValue::FieldArray(a) => Value::List(
            a.as_slice()
                .iter()
                .map(|x| amqp_to_value_at(x, depth + 1))
                .collect(),
        ),
        AMQPValue::FieldTable(t) => Value::Dict(
            t.inner()
                .iter()
                .map(|(k, x)| {
                    (
                        Value::Str(k.as_str().to_owned()),
                        amqp_to_value_at(x, depth + 1),
                    )
                })
                .collect(),
        ),
        AMQPValue::Timestamp(ts) => match i64::try_from(*ts)
            .ok()
            .and_then(|s| DateTime::from_timestamp(s, 0))
        {
            Some(dt) => Value::DateTime {
                naive: dt.naive_utc(),
                offset_seconds: None,
            },
            None => Value::Int(i64::try_from(*ts).unwrap_or(i64::MAX)),
        },
        AMQPValue::Void => Value::None,
    }
}

/// `Decimal(n) / Decimal(10**scale)` as Python prints it (trailing zeros of
/// the fraction dropped, as the division's ideal exponent does).
fn decimal_text(d: &DecimalValue) -> String {
    // py-amqp reads the value as a signed 32-bit integer.
    let n = i64::from(d.value as i32);
    let scale = usize::from(d.scale);
    let neg = n < 0;
    let digits = n.unsigned_abs().to_string();
    let (int_part, frac) = if digits.len() > scale {
        let (a, b) = digits.split_at(digits.len() - scale);
        (a.to_owned(), b.to_owned())
    } else {
        ("0".to_owned(), format!("{digits:0>scale$}"))
    };
    let frac = frac.trim_end_matches('0');
    let mut s = String::new();
    if neg {
        s.push('-');
    }
    s.push_str(&int_part);
    if !frac.is_empty() {
        s.push('.');
        s.push_str(frac);
    }
    s
}

/// [`Value`] → AMQP field value with py-amqp's type choices (`_write_item`):
/// `I` for ints within ±2147483647, `L`/`l` beyond, `d` for floats, `S` for
/// text, `T` for datetimes, `F`/`A` for dicts/sequences, `V` for `None`.
pub fn value_to_amqp(v: &Value) -> Result<AMQPValue, BrokerError> {
    value_to_amqp_at(v, 0)
}

fn value_to_amqp_at(v: &Value, depth: usize) -> Result<AMQPValue, BrokerError> {
    if depth > MAX_DEPTH {
        return Err(BrokerError::Operation(
            "header value nested too deeply".into(),
        ));
    }
    let long = |s: String| AMQPValue::LongString(LongString::from(s));
    Ok(match v {
        Value::None => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Int(i) => match i32::try_from(*i) {
            Ok(small) if small != i32::MIN => AMQPValue::LongInt(small),
            _ => AMQPValue::LongLongInt(*i),
        },
        Value::BigInt(s) => long(s.clone()),
        Value::Float(f) => AMQPValue::Double(*f),
        Value::Str(s) => long(s.clone()),
        Value::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.clone())),
        Value::List(items) | Value::Tuple(items) | Value::Set(items) => {
            AMQPValue::FieldArray(FieldArray::from(
                items
                    .iter()
                    .map(|x| value_to_amqp_at(x, depth + 1))
                    .collect::<Result<Vec<_>, _>>()?,
            ))
        }
        Value::Dict(items) => {
            let mut map = BTreeMap::new();
            for (k, x) in items {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    Value::Bool(b) => if *b { "True" } else { "False" }.to_owned(),
                    Value::None => "None".to_owned(),
                    other => crate::protocol::json::to_json(other).to_string(),
                };
                map.insert(short(&key)?, value_to_amqp_at(x, depth + 1)?);
            }
            AMQPValue::FieldTable(FieldTable::from(map))
        }
        Value::DateTime {
            naive,
            offset_seconds,
        } => {
            let utc: NaiveDateTime =
                *naive - chrono::Duration::seconds(i64::from(offset_seconds.unwrap_or(0)));
            match u64::try_from(utc.and_utc().timestamp()) {
                Ok(ts) => AMQPValue::Timestamp(ts),
                Err(_) => long(crate::protocol::json::isoformat(v)),
            }
        }
        Value::Date(d) => long(d.format("%Y-%m-%d").to_string()),
        Value::Time(t) => long(t.format("%H:%M:%S%.f").to_string()),
        Value::TimeDelta {
            days,
            seconds,
            microseconds,
        } => AMQPValue::Double(
            (*days as f64) * 86400.0 + (*seconds as f64) + (*microseconds as f64) / 1e6,
        ),
        Value::Decimal(text) => decimal_value(text).unwrap_or_else(|| long(text.clone())),
        Value::Uuid(u) => long(u.hyphenated().to_string()),
        // py-amqp sees a dict (Signature) or str (PassthroughDataset) subclass.
        Value::Object(o) => return value_to_amqp_at(&o.plain(), depth),
    })
}

/// Decimal text → AMQP decimal when it fits (scale ≤ 255, |value| < 2³¹).
fn decimal_value(text: &str) -> Option<AMQPValue> {
    let t = text.trim();
    let (neg, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (int_part, frac) = t.split_once('.').unwrap_or((t, ""));
    if int_part.is_empty() && frac.is_empty() {
        return None;
    }
    if !int_part
        .chars()
        .chain(frac.chars())
        .all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let scale = u8::try_from(frac.len()).ok()?;
    let n: i64 = format!("{int_part}{frac}").parse().ok()?;
    let n = if neg { -n } else { n };
    let n = i32::try_from(n).ok()?;
    Some(AMQPValue::DecimalValue(DecimalValue {
        scale,
        value: n as u32,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_values_round_trip() {
        let v = Value::dict([
            ("none", Value::None),
            ("b", Value::Bool(true)),
            ("small", Value::Int(-5)),
            ("big", Value::Int(1 << 40)),
            ("f", Value::Float(1.5)),
            ("s", Value::Str("héllo".into())),
            ("bytes", Value::Bytes(vec![0, 255])),
            ("list", Value::List(vec![Value::Int(1), Value::None])),
            ("dec", Value::Decimal("-12.50".into())),
        ]);
        let a = value_to_amqp(&v).expect("converts");
        let back = amqp_to_value(&a);
        let get = |k: &str| back.get(k).cloned();
        assert_eq!(get("none"), Some(Value::None));
        assert_eq!(get("b"), Some(Value::Bool(true)));
        assert_eq!(get("small"), Some(Value::Int(-5)));
        assert_eq!(get("big"), Some(Value::Int(1 << 40)));
        assert_eq!(get("f"), Some(Value::Float(1.5)));
        assert_eq!(get("s"), Some(Value::Str("héllo".into())));
        assert_eq!(get("bytes"), Some(Value::Bytes(vec![0, 255])));
        assert_eq!(
            get("list"),
            Some(Value::List(vec![Value::Int(1), Value::None]))
        );
        assert_eq!(get("dec"), Some(Value::Decimal("-12.5".into())));
    }

    #[test]
    fn decodes_all_wire_types() {
        assert_eq!(amqp_to_value(&AMQPValue::ShortShortInt(-1)), Value::Int(-1));
        assert_eq!(
            amqp_to_value(&AMQPValue::ShortUInt(65535)),
            Value::Int(65535)
        );
        assert_eq!(amqp_to_value(&AMQPValue::Float(0.5)), Value::Float(0.5));
        assert_eq!(
            amqp_to_value(&AMQPValue::LongString(LongString::from(vec![0xffu8]))),
            Value::Bytes(vec![0xff])
        );
        assert_eq!(
            amqp_to_value(&AMQPValue::DecimalValue(DecimalValue {
                scale: 3,
                value: 5
            })),
            Value::Decimal("0.005".into())
        );
        assert_eq!(
            amqp_to_value(&AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 100
            })),
            Value::Decimal("1".into())
        );
        match amqp_to_value(&AMQPValue::Timestamp(86400)) {
            Value::DateTime {
                naive,
                offset_seconds: None,
            } => assert_eq!(naive.to_string(), "1970-01-02 00:00:00"),
            other => panic!("{other:?}"),
        }
        // Far beyond chrono's range: no panic.
        let _ = amqp_to_value(&AMQPValue::Timestamp(u64::MAX));
    }

    #[test]
    fn long_keys_are_errors_not_panics() {
        let mut h = Headers::new();
        h.insert("k".repeat(300), Value::None);
        assert!(headers_to_table(&h).is_err());
        assert!(short(&"x".repeat(256)).is_err());
    }
}
